//! `vips[]`: each VIP, its backends and their health check.

use std::{
    fmt,
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Tcp,
    Udp,
}

impl Protocol {
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => ha_common::PROTO_TCP,
            Protocol::Udp => ha_common::PROTO_UDP,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

/// Only full NAT for now; the key exists so DSR can be added without a format change.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Nat,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            Mode::Nat => "nat",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VipConfig {
    pub name: String,
    /// IPv4 only for now: validation refuses an IPv6 VIP.
    pub address: IpAddr,
    pub port: u16,
    #[serde(default = "default_protocol")]
    pub protocol: Protocol,
    #[serde(default)]
    pub mode: Mode,
    /// Health check of every backend of this VIP.
    #[serde(default)]
    pub check: CheckConfig,
    /// What happens to a backend's established TCP flows when its check
    /// marks it down as dead (haproxy's `on-marked-down`).
    #[serde(default, skip_serializing_if = "OnMarkedDown::is_default")]
    pub on_marked_down: OnMarkedDown,
    pub backends: Vec<BackendConfig>,
}

/// `vips[].on_marked_down` (docs/health-checks.md, "Reset on mark-down").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnMarkedDown {
    /// haproxy's `shutdown-sessions`: when the check marks a backend down
    /// because it is dead (refused, reset, timed out; not merely not ready),
    /// each of its established TCP flows is reset towards its client at
    /// once, so a client-go watch reconnects now instead of after its HTTP/2
    /// ping times out.
    #[default]
    ShutdownSessions,
    /// Leave them: each moves to a live backend on its client's next packet
    /// (which that backend refuses with a reset).
    Keep,
}

impl OnMarkedDown {
    pub fn is_default(&self) -> bool {
        *self == OnMarkedDown::default()
    }
}

impl fmt::Display for OnMarkedDown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            OnMarkedDown::ShutdownSessions => "shutdown-sessions",
            OnMarkedDown::Keep => "keep",
        })
    }
}

impl VipConfig {
    /// Fills in the defaults that depend on the VIP: the check's type and
    /// the backends' port.
    pub(super) fn apply_defaults(&mut self) {
        // /readyz fails as soon as a kube-apiserver starts graceful shutdown
        // while /livez and /healthz stay ok: it is what an LB must probe.
        self.check.kind.get_or_insert(if self.port == 6443 {
            CheckKind::Https
        } else {
            CheckKind::Tcp
        });
        for backend in &mut self.backends {
            backend.port.get_or_insert(self.port);
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckKind {
    /// A TCP connect.
    Tcp,
    /// HTTP GET, expecting a status (and optionally a body substring).
    Http,
    /// HTTP GET over TLS (rustls).
    Https,
}

/// TLS server certificate verification for `https` checks.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub enum Verify {
    /// Accept any certificate (kube-apiservers often have IP-less certs).
    #[default]
    None,
    /// Verify against the CA certificates in this PEM file.
    CaFile(PathBuf),
}

impl Serialize for Verify {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Verify::None => serializer.serialize_str("none"),
            Verify::CaFile(path) => serializer.serialize_str(&path.display().to_string()),
        }
    }
}

impl<'de> Deserialize<'de> for Verify {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Ok(if text == "none" {
            Verify::None
        } else {
            Verify::CaFile(PathBuf::from(text))
        })
    }
}

/// A backend health check, with haproxy's timing semantics (`inter`,
/// `fastinter`, `downinter`, `timeout check`, `rise`, `fall`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckConfig {
    /// `tcp`, `http` or `https`; default `https` for a VIP on port 6443, `tcp` otherwise.
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<CheckKind>,
    /// Port to check; default the backend's port.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    pub path: String,
    pub expect_status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expect_body: Option<String>,
    pub verify: Verify,
    /// TLS server name (SNI, and the name verified); default the backend's IP address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sni: Option<String>,
    /// Client certificate and key (PEM) for backends that require one, like etcd.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_cert: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_key: Option<PathBuf>,
    /// Between checks while the state is settled (haproxy `inter`).
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Between checks while a change is pending (haproxy `fastinter`).
    #[serde(with = "humantime_serde")]
    pub fast_interval: Duration,
    /// Between checks while the backend is down (haproxy `downinter`); default `interval`.
    #[serde(
        with = "humantime_serde::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub down_interval: Option<Duration>,
    /// One check's deadline, connect to last byte (haproxy `timeout check`).
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Consecutive successes to become up.
    pub rise: u32,
    /// Consecutive failures to leave up.
    pub fall: u32,
}

impl Default for CheckConfig {
    fn default() -> Self {
        Self {
            kind: None,
            port: None,
            path: "/readyz".to_string(),
            expect_status: 200,
            expect_body: None,
            verify: Verify::None,
            sni: None,
            client_cert: None,
            client_key: None,
            interval: Duration::from_secs(1),
            fast_interval: Duration::from_millis(200),
            down_interval: None,
            timeout: Duration::from_secs(1),
            rise: 2,
            fall: 3,
        }
    }
}

impl CheckConfig {
    /// The kind after defaults were applied.
    pub fn kind(&self) -> CheckKind {
        self.kind.unwrap_or(CheckKind::Tcp)
    }

    pub fn down_interval(&self) -> Duration {
        self.down_interval.unwrap_or(self.interval)
    }

    /// The files the check reads, each with its key: the CA file it
    /// verifies against, the client certificate and key.
    pub fn files(&self) -> Vec<(&'static str, &Path)> {
        let ca_file = match &self.verify {
            Verify::CaFile(path) => Some(path.as_path()),
            Verify::None => None,
        };
        [
            ("verify", ca_file),
            ("client_cert", self.client_cert.as_deref()),
            ("client_key", self.client_key.as_deref()),
        ]
        .into_iter()
        .filter_map(|(key, path)| Some((key, path?)))
        .collect()
    }
}

fn default_protocol() -> Protocol {
    Protocol::Tcp
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    /// IPv4 only for now: validation refuses an IPv6 backend.
    pub address: IpAddr,
    /// Defaults to the VIP's port (filled in by validation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_weight() -> u32 {
    1
}

impl BackendConfig {
    /// The port after defaults were applied.
    pub fn port(&self) -> u16 {
        self.port.unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn checks_default_to_https_readyz_on_6443_and_tcp_elsewhere() {
        let config = Config::from_yaml(
            "vips:\n  - {name: api, address: 10.0.0.1, port: 6443, backends: [{address: 10.0.0.2}]}\n  - {name: etcd, address: 10.0.0.1, port: 2379, backends: [{address: 10.0.0.2}]}\n",
            "t",
        )
        .unwrap();
        let api = &config.vips[0].check;
        assert_eq!(
            (api.kind(), api.path.as_str(), api.expect_status),
            (CheckKind::Https, "/readyz", 200)
        );
        assert_eq!(
            (
                api.interval,
                api.fast_interval,
                api.down_interval(),
                api.timeout
            ),
            (
                Duration::from_secs(1),
                Duration::from_millis(200),
                Duration::from_secs(1),
                Duration::from_secs(1)
            )
        );
        assert_eq!((api.rise, api.fall), (2, 3));
        assert_eq!(config.vips[1].check.kind(), CheckKind::Tcp);
        // The normalized form names the resolved type.
        assert!(
            config.to_yaml().contains("type: https"),
            "{}",
            config.to_yaml()
        );
    }

    #[test]
    fn the_documented_check_block_parses() {
        let config = Config::from_yaml(
            r#"
vips:
  - name: apiserver
    address: 192.168.205.254
    port: 6443
    check:
      type: https            # tcp | http | https
      path: /readyz
      expect_status: 200
      expect_body: ok        # optional
      verify: none           # none | ca file path
      interval: 1s
      fast_interval: 200ms
      timeout: 1s
      rise: 2
      fall: 3
    backends: [{address: 192.168.205.11}]
"#,
            "t",
        )
        .unwrap();
        assert_eq!(config.vips[0].check.expect_body.as_deref(), Some("ok"));
    }
}
