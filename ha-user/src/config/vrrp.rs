//! `vrrp`: VIP ownership by VRRP between LB hosts, and what the agent
//! tracks to lower its priority. [`VrrpVersion`] is also the version the
//! advert codec (`crate::vrrp::packet`) encodes and decodes.

use std::{fmt, net::IpAddr, time::Duration};

use serde::{Deserialize, Serialize};

/// The VRRP version: 3 (RFC 9568) or 2 (RFC 3768, keepalived's default),
/// written `3` or `2`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VrrpVersion {
    #[serde(rename = "2")]
    V2,
    #[serde(rename = "3")]
    V3,
}

impl VrrpVersion {
    /// The number that names it, in the config and in an advert's version field.
    pub fn number(self) -> u8 {
        match self {
            VrrpVersion::V2 => 2,
            VrrpVersion::V3 => 3,
        }
    }
}

/// What a condition does to the VRRP priority.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrackAction {
    /// Never master while the condition holds.
    Fault,
    /// Lower the priority by this much while it holds.
    Decrease(u8),
}

impl fmt::Display for TrackAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TrackAction::Fault => f.write_str("fault"),
            TrackAction::Decrease(n) => write!(f, "decrease {n}"),
        }
    }
}

impl std::str::FromStr for TrackAction {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let words: Vec<&str> = s.split_whitespace().collect();
        match words.as_slice() {
            ["fault"] => Ok(TrackAction::Fault),
            ["decrease", n] => n
                .parse::<u8>()
                .map(TrackAction::Decrease)
                .map_err(|e| format!("{s:?}: {e}")),
            _ => Err(format!("{s:?} is not `fault` or `decrease <n>`")),
        }
    }
}

impl Serialize for TrackAction {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for TrackAction {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrackConfig {
    /// When some VIP has no backend up.
    pub no_healthy_backend: TrackAction,
    /// When a backend at one of this host's own addresses is down by its
    /// check (not drained, not merely not ready): the stacked layout's "the
    /// local apiserver fails", what the classic guides' keepalived
    /// `track_script` watched. Off (`None`) by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_backend_down: Option<TrackAction>,
}

/// `decrease 50` rather than `fault` by default: when every LB host sees
/// every backend down (a wrong check path), `fault` would leave the VIP with
/// no master at all, the outage fail-open exists to prevent; with a decrease,
/// an LB that alone sees its backends down yields to a healthy peer.
impl Default for TrackConfig {
    fn default() -> Self {
        Self {
            no_healthy_backend: TrackAction::Decrease(50),
            local_backend_down: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VrrpConfig {
    /// Interface for the adverts; default the attach interface.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
    /// Virtual router id, 1-255; the same on every LB host of the pair.
    pub vrid: u8,
    /// 1-254, or 255 for the address owner (master at once).
    #[serde(default = "default_priority")]
    pub priority: u8,
    #[serde(default = "default_vrrp_version")]
    pub version: VrrpVersion,
    /// v3: 10 ms steps from 10 ms; v2: whole seconds.
    #[serde(default = "default_advert_interval", with = "humantime_serde")]
    pub advert_interval: Duration,
    #[serde(default = "default_true")]
    pub preempt: bool,
    #[serde(default, with = "humantime_serde")]
    pub preempt_delay: Duration,
    /// A master that stops with the keep intent (a restart or upgrade in
    /// place) sends a last advert announcing this interval, so the backups
    /// wait three of it before taking over, and its VIP address lives four
    /// of it: the time a restarted agent has to resume as master. 0s: the
    /// backups keep their normal Master_Down_Interval. docs/operations.md.
    #[serde(default = "default_restart_hold", with = "humantime_serde")]
    pub restart_hold: Duration,
    /// Send adverts to these addresses instead of 224.0.0.18; adverts from
    /// other sources are dropped and counted.
    #[serde(default)]
    /// IPv4 only for now (the VRRP socket is IPv4): validation refuses IPv6 peers.
    pub unicast_peers: Vec<IpAddr>,
    #[serde(default)]
    pub checksum: crate::vrrp::packet::ChecksumMode,
    #[serde(default)]
    pub track: TrackConfig,
}

impl VrrpConfig {
    /// The section for `vrid` with every other key at the default a file
    /// that leaves it out gets (priority 100, version 3, 100 ms adverts,
    /// preemption without delay, a 10 s restart hold, multicast, the attach
    /// interface, the default tracking).
    pub fn new(vrid: u8) -> Self {
        VrrpConfig {
            interface: None,
            vrid,
            priority: default_priority(),
            version: default_vrrp_version(),
            advert_interval: default_advert_interval(),
            preempt: default_true(),
            preempt_delay: Duration::ZERO,
            restart_hold: default_restart_hold(),
            unicast_peers: Vec::new(),
            checksum: Default::default(),
            track: TrackConfig::default(),
        }
    }
}

fn default_priority() -> u8 {
    100
}

fn default_vrrp_version() -> VrrpVersion {
    VrrpVersion::V3
}

fn default_advert_interval() -> Duration {
    Duration::from_millis(100)
}

fn default_restart_hold() -> Duration {
    Duration::from_secs(10)
}

fn default_true() -> bool {
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, GarpConfig};

    #[test]
    fn a_version_is_written_as_the_number_its_adverts_carry() {
        for version in [VrrpVersion::V2, VrrpVersion::V3] {
            let written = serde_yaml_ng::to_string(&version).unwrap();
            assert_eq!(
                written.trim().trim_matches('\''),
                version.number().to_string()
            );
            let read: VrrpVersion = serde_yaml_ng::from_str(&written).unwrap();
            assert_eq!(read, version);
        }
    }

    #[test]
    fn the_documented_vrrp_section_parses_with_defaults() {
        let config = Config::from_yaml(
            r#"
vips:
  - {name: api, address: 192.168.205.254, port: 6443, backends: [{address: 192.168.205.11}]}
vrrp:
  interface: ens33            # default: the attach interface
  vrid: 51
  priority: 100
  version: 3                  # 2 | 3
  advert_interval: 100ms
  preempt: true
  preempt_delay: 0s
  restart_hold: 10s           # 0s: none
  unicast_peers: [192.168.205.253]   # empty: multicast
  checksum: pseudo-header     # pseudo-header | rfc9568
  track:
    no_healthy_backend: fault # fault | decrease <n>
"#,
            "t",
        )
        .unwrap();
        let vrrp = config.vrrp.as_ref().unwrap();
        assert_eq!(
            (vrrp.vrid, vrrp.priority, vrrp.version),
            (51, 100, VrrpVersion::V3)
        );
        assert_eq!(vrrp.unicast_peers, vec![IpAddr::from([192, 168, 205, 253])]);
        assert_eq!(vrrp.track.no_healthy_backend, TrackAction::Fault);
        let minimal = Config::from_yaml(
            "vips:\n  - {name: a, address: 10.0.0.1, port: 6443, backends: [{address: 10.0.0.2}]}\nvrrp: {vrid: 7, track: {no_healthy_backend: decrease 60}}\n",
            "t",
        )
        .unwrap();
        let vrrp = minimal.vrrp.unwrap();
        assert_eq!(
            (vrrp.priority, vrrp.advert_interval, vrrp.preempt),
            (100, Duration::from_millis(100), true)
        );
        assert_eq!(vrrp.track.no_healthy_backend, TrackAction::Decrease(60));
        // `VrrpConfig::new` is what a file that names only the vrid gets.
        assert_eq!(
            vrrp,
            VrrpConfig {
                track: TrackConfig {
                    no_healthy_backend: TrackAction::Decrease(60),
                    ..TrackConfig::default()
                },
                ..VrrpConfig::new(7)
            }
        );
        assert_eq!(
            TrackConfig::default().no_healthy_backend,
            TrackAction::Decrease(50)
        );
        assert_eq!(
            minimal.garp,
            GarpConfig {
                count: 5,
                interval: Duration::ZERO,
                refresh: Duration::ZERO
            }
        );
    }
}
