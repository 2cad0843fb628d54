//! Reaching a target through a leased upstream proxy: TCP to the upstream, then `CONNECT host:port` with the
//! upstream's credentials, or an HTTP/1.1 connection for absolute-URI requests. Failures are sorted into the kinds
//! the door retries elsewhere and records on the proxy ([`UpstreamFailure`]), and the ones it does not (the
//! upstream reached but the target refused).

use std::time::Duration;

use base64::Engine as _;
use proxypool_contracts::lease::{LeaseGrant, UpstreamFailure};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The largest CONNECT answer head read from an upstream.
const HEAD_MAX: usize = 16 * 1024;

/// Why the target could not be reached through one upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DialError {
    /// The upstream itself failed: try another proxy, and record it.
    Upstream(UpstreamFailure),
    /// The upstream answered, but not with a tunnel (e.g. 502: it could not reach the target). Not the proxy's
    /// fault; answered to the client as it is.
    Refused(u16),
}

impl DialError {
    /// The reason sent to the client (`X-Proxypool-Reason`) and used as a metric label.
    pub fn reason(&self) -> String {
        match self {
            DialError::Upstream(f) => format!("upstream_{}", f.as_str()),
            DialError::Refused(status) => format!("upstream_answered_{status}"),
        }
    }
}

/// `Basic …` for the upstream's credentials; `None` when it needs none.
pub fn basic_auth(grant: &LeaseGrant) -> Option<String> {
    if grant.username.is_empty() {
        return None;
    }
    let raw = format!("{}:{}", grant.username, grant.password);
    Some(format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(raw)))
}

fn io_kind(e: &std::io::Error) -> UpstreamFailure {
    match e.kind() {
        std::io::ErrorKind::TimedOut => UpstreamFailure::Timeout,
        std::io::ErrorKind::ConnectionRefused => UpstreamFailure::Refused,
        _ => UpstreamFailure::Reset,
    }
}

/// Opens a TCP connection to the upstream within `timeout`.
pub async fn connect(grant: &LeaseGrant, timeout: Duration) -> Result<TcpStream, DialError> {
    let addr = (grant.ip.as_str(), grant.port);
    match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Err(_) => Err(DialError::Upstream(UpstreamFailure::Timeout)),
        Ok(Err(e)) => Err(DialError::Upstream(io_kind(&e))),
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Ok(s)
        }
    }
}

/// A tunnel to `target` (`host:port`) through the upstream: its stream, and any bytes the upstream sent after its
/// answer (already the target's).
pub async fn tunnel(grant: &LeaseGrant, target: &str, timeout: Duration) -> Result<(TcpStream, Vec<u8>), DialError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut s = connect(grant, timeout).await?;
    let mut req = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
    if let Some(auth) = basic_auth(grant) {
        req.push_str("Proxy-Authorization: ");
        req.push_str(&auth);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    let exchange = async {
        s.write_all(req.as_bytes()).await.map_err(|e| DialError::Upstream(io_kind(&e)))?;
        let mut buf = Vec::with_capacity(1024);
        let mut chunk = [0u8; 1024];
        loop {
            let n = s.read(&mut chunk).await.map_err(|e| DialError::Upstream(io_kind(&e)))?;
            if n == 0 {
                return Err(DialError::Upstream(UpstreamFailure::Reset));
            }
            buf.extend_from_slice(&chunk[..n]);
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let rest = buf.split_off(end + 4);
                return Ok((status_of(&buf)?, rest));
            }
            if buf.len() > HEAD_MAX {
                return Err(DialError::Upstream(UpstreamFailure::BadAnswer));
            }
        }
    };
    let (status, rest) = tokio::time::timeout_at(deadline, exchange)
        .await
        .map_err(|_| DialError::Upstream(UpstreamFailure::Timeout))??;
    match status {
        200..=299 => Ok((s, rest)),
        // tinyproxy answers a wrong password with 401, the standard says 407: both mean our credentials failed.
        401 | 407 => Err(DialError::Upstream(UpstreamFailure::Auth)),
        other => Err(DialError::Refused(other)),
    }
}

fn status_of(head: &[u8]) -> Result<u16, DialError> {
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let text = std::str::from_utf8(line).map_err(|_| DialError::Upstream(UpstreamFailure::BadAnswer))?;
    let mut words = text.split_whitespace();
    match (words.next(), words.next().and_then(|c| c.parse::<u16>().ok())) {
        (Some(v), Some(code)) if v.starts_with("HTTP/") => Ok(code),
        _ => Err(DialError::Upstream(UpstreamFailure::BadAnswer)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_status_line() {
        assert_eq!(status_of(b"HTTP/1.0 200 Connection established\r\n\r\n"), Ok(200));
        assert_eq!(status_of(b"HTTP/1.1 407 Proxy Authentication Required\r\n"), Ok(407));
        assert_eq!(status_of(b"SSH-2.0-OpenSSH\r\n"), Err(DialError::Upstream(UpstreamFailure::BadAnswer)));
    }
}
