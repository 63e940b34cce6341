//! `telemetry`: the agent's own HTTP endpoint (/livez, /readyz, /metrics).

use std::{fmt, net::Ipv4Addr};

use serde::{Deserialize, Serialize};

/// Where kubelet probes and Prometheus reach the agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// `address:port`, or `off`. Loopback by default: with hostNetwork the
    /// kubelet probes 127.0.0.1 on the node, and counters stay off the wire
    /// unless an operator opens them.
    pub listen: Listen,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            listen: Listen::At(std::net::SocketAddr::from((Ipv4Addr::LOCALHOST, 9641))),
        }
    }
}

/// A listening address that can be switched off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listen {
    Off,
    At(std::net::SocketAddr),
}

impl fmt::Display for Listen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Listen::Off => f.write_str("off"),
            Listen::At(address) => write!(f, "{address}"),
        }
    }
}

impl Serialize for Listen {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Listen {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        if text == "off" {
            return Ok(Listen::Off);
        }
        text.parse().map(Listen::At).map_err(|_| {
            serde::de::Error::custom(format!("{text:?} is not `address:port` or `off`"))
        })
    }
}
