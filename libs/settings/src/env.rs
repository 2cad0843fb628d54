//! Typed readers for environment variables. Every error names the variable.
//!
//! The readers take a lookup function rather than reading `std::env` directly so that tests (and services started
//! in-process by tests) can supply their own variables without mutating the process environment.

use std::collections::HashMap;
use std::fmt::Display;
use std::str::FromStr;

/// A configuration error, naming the variable at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A required variable is unset or empty.
    #[error("environment variable {0} is required but not set")]
    Missing(&'static str),
    /// A variable is set but cannot be used.
    #[error("environment variable {name} is invalid: {reason}")]
    Invalid {
        /// The variable.
        name: &'static str,
        /// Why (never contains the value of a secret).
        reason: String,
    },
}

impl ConfigError {
    /// An `Invalid` error.
    pub fn invalid(name: &'static str, reason: impl Display) -> Self {
        Self::Invalid { name, reason: reason.to_string() }
    }
}

/// A source of variables: the process environment or a map (tests).
#[derive(Debug, Clone, Default)]
pub struct Env {
    overrides: Option<HashMap<String, String>>,
}

impl Env {
    /// The process environment.
    pub fn process() -> Self {
        Self { overrides: None }
    }

    /// Only the given variables (tests).
    pub fn from_pairs<I, K, V>(pairs: I) -> Self
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        Self { overrides: Some(pairs.into_iter().map(|(k, v)| (k.into(), v.into())).collect()) }
    }

    /// The raw value; unset and empty are the same.
    pub fn get(&self, name: &str) -> Option<String> {
        let v = match &self.overrides {
            Some(map) => map.get(name).cloned(),
            None => std::env::var(name).ok(),
        };
        v.filter(|s| !s.trim().is_empty())
    }

    /// A required string.
    pub fn required(&self, name: &'static str) -> Result<String, ConfigError> {
        self.get(name).ok_or(ConfigError::Missing(name))
    }

    /// A parsed value, or `default` when unset.
    pub fn parse_or<T>(&self, name: &'static str, default: T) -> Result<T, ConfigError>
    where
        T: FromStr,
        T::Err: Display,
    {
        match self.get(name) {
            None => Ok(default),
            Some(raw) => raw.trim().parse().map_err(|e| ConfigError::invalid(name, e)),
        }
    }

    /// A comma-separated list of parsed values; empty when unset.
    pub fn list<T>(&self, name: &'static str) -> Result<Vec<T>, ConfigError>
    where
        T: FromStr,
        T::Err: Display,
    {
        let Some(raw) = self.get(name) else { return Ok(Vec::new()) };
        raw.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| s.parse().map_err(|e| ConfigError::invalid(name, format!("{s:?}: {e}"))))
            .collect()
    }

    /// A comma-separated list of IP addresses or CIDR ranges (`1.2.3.4`, `::1`, `10.0.0.0/8`); empty when unset.
    pub fn nets(&self, name: &'static str) -> Result<Vec<ipnet::IpNet>, ConfigError> {
        let Some(raw) = self.get(name) else { return Ok(Vec::new()) };
        raw.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                s.parse::<ipnet::IpNet>()
                    .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                    .map_err(|_| ConfigError::invalid(name, format!("{s:?}: not an IP address or CIDR range")))
            })
            .collect()
    }

    /// A boolean (`true/false/1/0/yes/no`), or `default` when unset.
    pub fn bool_or(&self, name: &'static str, default: bool) -> Result<bool, ConfigError> {
        match self.get(name).map(|s| s.trim().to_ascii_lowercase()) {
            None => Ok(default),
            Some(v) if matches!(v.as_str(), "true" | "1" | "yes") => Ok(true),
            Some(v) if matches!(v.as_str(), "false" | "0" | "no") => Ok(false),
            Some(_) => Err(ConfigError::invalid(name, "expected true or false")),
        }
    }

    /// A duration in whole seconds, or `default` when unset; zero is refused.
    pub fn seconds_or(
        &self,
        name: &'static str,
        default: std::time::Duration,
    ) -> Result<std::time::Duration, ConfigError> {
        match self.get(name) {
            None => Ok(default),
            Some(raw) => match raw.trim().parse::<f64>() {
                Ok(s) if s > 0.0 && s.is_finite() => Ok(std::time::Duration::from_secs_f64(s)),
                _ => Err(ConfigError::invalid(name, "expected a positive number of seconds")),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_variable() {
        let env = Env::from_pairs([("PROXY_USE_MAX", "three"), ("IP_ALLOWED", "127.0.0.1, nope")]);
        let e = env.parse_or("PROXY_USE_MAX", 3u32).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("PROXY_USE_MAX"), "{e}");
        let e = env.list::<std::net::IpAddr>("IP_ALLOWED").err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("IP_ALLOWED") && e.contains("nope"), "{e}");
        let e = env.required("API_KEY").err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("API_KEY"), "{e}");
        assert_eq!(env.parse_or("PORT", 33033u16).ok(), Some(33033));
    }
}
