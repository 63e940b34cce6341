//! The agent's configuration file: its schema, section by section, parsing,
//! defaults and validation.
//!
//! A config is accepted whole or not at all: [`Config::from_yaml`] returns
//! every problem it finds, each naming the key it is about, and the caller
//! keeps running whatever it had before. [`validate`] judges the values
//! alone; [`host`] checks what they name on this machine (the check files).
//!
//! Every type serializes back to the YAML it was read from: a [`Config`]
//! written with [`Config::to_yaml`] reads back as the same config.

mod data_plane;
mod garp;
pub mod host;
mod socket_lb;
mod telemetry;
pub mod validate;
mod vip;
mod vrrp;

use std::path::Path;

use serde::{Deserialize, Serialize};

pub use self::{
    data_plane::{ConntrackConfig, DataPlaneConfig, NatConfig, PortRange},
    garp::GarpConfig,
    socket_lb::{CgroupSetting, SocketLbConfig},
    telemetry::{Listen, TelemetryConfig},
    validate::{MAX_WEIGHT, is_prime},
    vip::{BackendConfig, CheckConfig, CheckKind, Mode, OnMarkedDown, Protocol, Verify, VipConfig},
    vrrp::{TrackAction, TrackConfig, VrrpConfig, VrrpVersion},
};

pub const DEFAULT_CONFIG_PATH: &str = "/etc/ha-lb/config.yaml";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("{path} is not valid:\n{}", .problems.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid { path: String, problems: Vec<String> },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub vips: Vec<VipConfig>,
    #[serde(default)]
    pub data_plane: DataPlaneConfig,
    /// VIP ownership by VRRP between LB hosts; without it this host owns the VIPs statically.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vrrp: Option<VrrpConfig>,
    /// Gratuitous ARP after taking the VIPs.
    #[serde(default)]
    pub garp: GarpConfig,
    /// The agent's own HTTP endpoint: /livez, /readyz, /metrics.
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    /// Socket-level balancing of this host's own connections to the VIPs.
    #[serde(default)]
    pub socket_lb: SocketLbConfig,
}

impl Config {
    /// Reads the file, parses it, and validates it: the values, then what
    /// they name on this host.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_yaml(&text, &path.display().to_string())
    }

    /// Parses and validates, the values and what they name on this host;
    /// `origin` names the source in error messages.
    pub fn from_yaml(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let config = Self::read_yaml(text, origin)?;
        let problems = config.problems();
        config.unless_problems(problems, origin)
    }

    /// Parses and validates the values alone: nothing on this host is
    /// looked at (a CA file a check names may live only on the LB hosts).
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let config = Self::read_yaml(text, origin)?;
        let problems = validate::problems(&config);
        config.unless_problems(problems, origin)
    }

    /// The YAML as a config with its defaults filled in, not yet validated.
    fn read_yaml(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let mut config: Config = serde_yaml_ng::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_string(),
            message: e.to_string(),
        })?;
        config.apply_defaults();
        Ok(config)
    }

    fn unless_problems(self, problems: Vec<String>, origin: &str) -> Result<Config, ConfigError> {
        if problems.is_empty() {
            Ok(self)
        } else {
            Err(ConfigError::Invalid {
                path: origin.to_string(),
                problems,
            })
        }
    }

    fn apply_defaults(&mut self) {
        for vip in &mut self.vips {
            vip.apply_defaults();
        }
    }

    /// Every reason this config cannot be used on this host, each naming
    /// its key: the values' problems, then the host's.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = validate::problems(self);
        problems.extend(host::problems(self));
        problems
    }

    /// The normalized config as YAML (what `check-config` prints).
    pub fn to_yaml(&self) -> String {
        serde_yaml_ng::to_string(self).expect("a Config always serializes")
    }

    /// Why `next` cannot replace `self` without restarting the agent (the
    /// data plane's map sizes are fixed when it loads).
    pub fn restart_needed_for(&self, next: &Config) -> Vec<String> {
        let (a, b) = (&self.data_plane, &next.data_plane);
        let mut reasons = Vec::new();
        if a.maglev_table_size != b.maglev_table_size {
            reasons.push("data_plane.maglev_table_size changed".to_string());
        }
        if a.max_vips != b.max_vips {
            reasons.push("data_plane.max_vips changed".to_string());
        }
        if a.conntrack.max_flows != b.conntrack.max_flows {
            reasons.push("data_plane.conntrack.max_flows changed".to_string());
        }
        if self.vrrp != next.vrrp {
            reasons.push("the vrrp section changed".to_string());
        }
        if self.telemetry != next.telemetry {
            reasons.push("telemetry.listen changed".to_string());
        }
        if self.socket_lb != next.socket_lb {
            reasons.push("the socket_lb section changed".to_string());
        }
        reasons
    }
}

#[cfg(test)]
mod tests {
    use std::{net::Ipv4Addr, time::Duration};

    use super::*;

    pub(super) const ISSUE_EXAMPLE: &str = r#"
vips:
  - name: apiserver
    address: 192.168.205.254
    port: 6443
    protocol: tcp            # tcp | udp
    mode: nat                # full NAT (default)
    backends:
      - address: 192.168.205.11
        port: 6443           # default: the VIP's port
        weight: 1            # default 1
      - address: 192.168.205.12
      - address: 192.168.205.13
"#;

    #[test]
    fn the_documented_example_parses_with_defaults_filled_in() {
        let config = Config::from_yaml(ISSUE_EXAMPLE, "example").unwrap();
        let vip = &config.vips[0];
        assert_eq!(vip.address, Ipv4Addr::new(192, 168, 205, 254));
        assert_eq!(vip.backends.len(), 3);
        assert!(
            vip.backends
                .iter()
                .all(|b| b.port == Some(6443) && b.weight == 1)
        );
        assert_eq!(config.data_plane, DataPlaneConfig::default());
    }

    #[test]
    fn normalized_output_parses_back_to_the_same_config() {
        let config = Config::from_yaml(ISSUE_EXAMPLE, "example").unwrap();
        let again = Config::from_yaml(&config.to_yaml(), "normalized").unwrap();
        assert_eq!(config, again);
        assert!(config.to_yaml().contains("maglev_table_size: 65537"));
    }

    /// Every key away from its default, so that each one is written and read back.
    const EVERY_KEY: &str = r#"
vips:
  - name: api
    address: 10.0.0.100
    port: 6443
    check:
      type: https
      port: 6444
      path: /livez
      expect_status: 204
      expect_body: ok
      verify: /etc/ha-lb/ca.crt
      sni: kubernetes
      client_cert: /etc/ha-lb/check.crt
      client_key: /etc/ha-lb/check.key
      interval: 2s
      fast_interval: 250ms
      down_interval: 5s
      timeout: 1500ms
      rise: 3
      fall: 4
    backends:
      - {address: 10.0.0.11, port: 16443, weight: 0}
      - {address: 10.0.0.12, weight: 1000}
  - name: dns
    address: 10.0.0.100
    port: 53
    protocol: udp
    mode: nat
    check: {type: http, path: /health, port: 8080}
    backends: [{address: 10.0.0.13}]
data_plane:
  maglev_table_size: 131071
  max_vips: 2
  debug: true
  conntrack:
    max_flows: 1024
    tcp_syn_timeout: 20s
    tcp_idle_timeout: 1h 30m
    tcp_closing_timeout: 90s
    fin_linger: 0s
    udp_unreplied_timeout: 10s
    udp_idle_timeout: 2m
  nat:
    source_address: 10.0.0.2
    port_range: 20000-29999
vrrp:
  interface: eth1
  vrid: 7
  priority: 255
  version: 2
  advert_interval: 2s
  preempt: false
  preempt_delay: 30s
  restart_hold: 0s
  unicast_peers: [10.0.0.3, 10.0.0.4]
  checksum: rfc9568
  track: {no_healthy_backend: fault}
garp: {count: 3, interval: 200ms, refresh: 60s}
telemetry: {listen: off}
socket_lb: {enabled: false, cgroup: /sys/fs/cgroup/unified}
"#;

    /// The ```yaml blocks of a Markdown page.
    fn yaml_blocks(markdown: &str) -> Vec<String> {
        let mut blocks = Vec::new();
        let mut open: Option<String> = None;
        for line in markdown.lines() {
            match (open.as_mut(), line.trim_end()) {
                (None, "```yaml") => open = Some(String::new()),
                (Some(_), "```") => blocks.extend(open.take()),
                (Some(block), _) => {
                    block.push_str(line);
                    block.push('\n');
                }
                (None, _) => {}
            }
        }
        blocks
    }

    /// The complete configs the repository shows: the deployment examples,
    /// the DaemonSet's ConfigMap, the docs' examples, and every key set.
    fn example_configs() -> Vec<(&'static str, String)> {
        let readme = yaml_blocks(include_str!("../../../README.md"));
        let minimal = yaml_blocks(include_str!("../../../docs/configuration.md"));
        let vrrp = yaml_blocks(include_str!("../../../docs/vrrp.md"));
        let check = yaml_blocks(include_str!("../../../docs/health-checks.md"));
        let daemonset =
            serde_yaml_ng::Deserializer::from_str(include_str!("../../../deploy/daemonset.yaml"))
                .map(|document| serde_yaml_ng::Value::deserialize(document).unwrap())
                .find(|document| document["kind"].as_str() == Some("ConfigMap"))
                .expect("the DaemonSet's ConfigMap");
        vec![
            (
                "deploy/examples/dedicated-lb.yaml",
                include_str!("../../../deploy/examples/dedicated-lb.yaml").to_string(),
            ),
            (
                "deploy/examples/on-masters.yaml",
                include_str!("../../../deploy/examples/on-masters.yaml").to_string(),
            ),
            (
                "deploy/daemonset.yaml ConfigMap",
                daemonset["data"]["config.yaml"]
                    .as_str()
                    .unwrap()
                    .to_string(),
            ),
            ("README.md", readme[0].clone()),
            ("docs/configuration.md", minimal[0].clone()),
            ("docs/vrrp.md", format!("{}{}", minimal[0], vrrp[0])),
            (
                "docs/health-checks.md",
                check[0].replace("backends: [...]", "backends: [{address: 192.168.205.11}]"),
            ),
            ("every key", EVERY_KEY.to_string()),
            (
                "every key, telemetry on all addresses",
                EVERY_KEY.replace("listen: off", "listen: 0.0.0.0:9641"),
            ),
        ]
    }

    #[test]
    fn every_example_config_serializes_and_reads_back_as_the_same_config() {
        for (name, yaml) in example_configs() {
            // The values alone: the CA and certificate files are the LB hosts'.
            let config = Config::parse(&yaml, name).unwrap_or_else(|e| panic!("{e}"));
            let written = config.to_yaml();
            let again = Config::parse(&written, name).unwrap_or_else(|e| panic!("{e}\n{written}"));
            assert_eq!(again, config, "{name}, written as:\n{written}");
            // Serde alone reads it back too: every default is written out.
            let read: Config = serde_yaml_ng::from_str(&written).unwrap();
            assert_eq!(read, config, "{name}, written as:\n{written}");
        }
    }

    #[test]
    fn socket_lb_is_on_by_default_and_reads_auto_or_a_path() {
        let config = Config::parse(ISSUE_EXAMPLE, "example").unwrap();
        assert_eq!(
            config.socket_lb,
            SocketLbConfig {
                enabled: true,
                cgroup: CgroupSetting::Auto
            }
        );
        let text = format!("{ISSUE_EXAMPLE}socket_lb: {{cgroup: auto}}\n");
        assert_eq!(
            Config::parse(&text, "auto").unwrap().socket_lb.cgroup,
            CgroupSetting::Auto
        );
        let text = format!("{ISSUE_EXAMPLE}socket_lb: {{cgroup: /run/ha-lb/cgroupv2}}\n");
        assert_eq!(
            Config::parse(&text, "path").unwrap().socket_lb.cgroup,
            CgroupSetting::Path("/run/ha-lb/cgroupv2".into())
        );
        assert!(config.to_yaml().contains("cgroup: auto"));
    }

    #[test]
    fn a_socket_lb_change_needs_a_restart() {
        let config = Config::parse(ISSUE_EXAMPLE, "example").unwrap();
        let mut next = config.clone();
        next.socket_lb.enabled = false;
        assert_eq!(
            config.restart_needed_for(&next),
            vec!["the socket_lb section changed".to_string()]
        );
        let mut next = config.clone();
        next.socket_lb.cgroup = CgroupSetting::Path("/sys/fs/cgroup".into());
        assert_eq!(config.restart_needed_for(&next).len(), 1);
    }

    /// Every problem `Config::from_yaml` finds in `yaml`.
    pub(super) fn problems_of(yaml: &str) -> Vec<String> {
        invalid(Config::from_yaml(yaml, "test"))
    }

    /// Every problem `Config::parse` finds in `yaml`: the values alone.
    pub(super) fn value_problems_of(yaml: &str) -> Vec<String> {
        invalid(Config::parse(yaml, "test"))
    }

    fn invalid(result: Result<Config, ConfigError>) -> Vec<String> {
        match result {
            Err(ConfigError::Invalid { problems, .. }) => problems,
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn unknown_keys_and_bad_types_are_parse_errors_naming_the_key() {
        let err = Config::from_yaml("vips: []\nfrobnicate: 1\n", "f.yaml")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("f.yaml") && err.contains("frobnicate"),
            "{err}"
        );
        let err = Config::from_yaml(
            "vips:\n  - {name: a, address: 10.0.0.1, port: 6443, protocol: sctp, backends: []}\n",
            "f.yaml",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("sctp"), "{err}");
    }

    #[test]
    fn restart_is_needed_only_for_map_sizes() {
        let a = Config::from_yaml(ISSUE_EXAMPLE, "a").unwrap();
        let mut b = a.clone();
        b.vips[0].backends.pop();
        b.data_plane.conntrack.tcp_idle_timeout = Duration::from_secs(60);
        assert!(a.restart_needed_for(&b).is_empty());
        b.data_plane.conntrack.tcp_syn_timeout = Duration::from_secs(10);
        b.data_plane.nat.port_range = PortRange {
            min: 20000,
            max: 30000,
        };
        assert!(
            a.restart_needed_for(&b).is_empty(),
            "timeouts and NAT reload live"
        );
        b.data_plane.maglev_table_size = 131071;
        b.data_plane.conntrack.max_flows = 1024;
        assert_eq!(
            a.restart_needed_for(&b),
            vec![
                "data_plane.maglev_table_size changed",
                "data_plane.conntrack.max_flows changed"
            ]
        );
    }
}
