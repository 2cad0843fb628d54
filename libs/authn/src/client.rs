//! Who a consumer is, for every door: the static key compared in constant time, and the client IP, believing
//! `X-Forwarded-For` only from `TRUSTED_PROXIES`.
//!
//! The client IP is the TCP peer's address. When the peer is a trusted proxy, the client is the right-most address
//! in `X-Forwarded-For` that is not itself a trusted proxy: addresses further left were written by the client and
//! can be forged.

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use subtle::ConstantTimeEq;

/// Normalises IPv4-mapped IPv6 addresses (`::ffff:1.2.3.4`) to IPv4, as dual-stack listeners report them.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Whether `ip` is in one of `nets`.
pub fn contains(nets: &[IpNet], ip: IpAddr) -> bool {
    nets.iter().any(|n| n.contains(&ip))
}

/// The client's IP per the module doc, from the peer and the `X-Forwarded-For` header values.
pub fn client_ip<'a>(peer: SocketAddr, forwarded_for: impl IntoIterator<Item = &'a str>, trusted: &[IpNet]) -> IpAddr {
    let peer_ip = canonical(peer.ip());
    if !contains(trusted, peer_ip) {
        return peer_ip;
    }
    let forwarded: Vec<IpAddr> = forwarded_for
        .into_iter()
        .flat_map(|v| v.split(','))
        .filter_map(|s| s.trim().parse::<IpAddr>().ok())
        .map(canonical)
        .collect();
    forwarded.iter().rev().copied().find(|ip| !contains(trusted, *ip)).or(forwarded.first().copied()).unwrap_or(peer_ip)
}

/// Whether `given` is exactly `key`. Constant time in the key's content.
pub fn key_matches(given: &[u8], key: &str) -> bool {
    bool::from(given.ct_eq(key.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(s: &str) -> SocketAddr {
        SocketAddr::new(s.parse().unwrap_or(IpAddr::from([0, 0, 0, 0])), 1)
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_peers() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap_or_default()];
        let spoof = ["1.1.1.1"];
        assert_eq!(client_ip(peer("8.8.8.8"), spoof, &trusted), "8.8.8.8".parse().unwrap_or(peer("0.0.0.0").ip()));
        let via_lb = ["6.6.6.6, 2.2.2.2, 10.0.0.5"];
        assert_eq!(client_ip(peer("10.0.0.1"), via_lb, &trusted), peer("2.2.2.2").ip());
        assert_eq!(canonical(peer("::ffff:1.2.3.4").ip()), peer("1.2.3.4").ip());
        assert!(key_matches(b"abc", "abc"));
        assert!(!key_matches(b"abd", "abc"));
        assert!(!key_matches(b"ab", "abc"));
    }
}
