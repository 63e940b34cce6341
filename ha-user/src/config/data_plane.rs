//! `data_plane`: the XDP data path's table sizes, connection tracking and NAT.

use std::{fmt, net::IpAddr, time::Duration};

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataPlaneConfig {
    /// Maglev table size M: prime, at least 100 x the backends of any VIP.
    pub maglev_table_size: u32,
    /// How many VIPs the data plane reserves Maglev tables for.
    pub max_vips: u32,
    pub conntrack: ConntrackConfig,
    pub nat: NatConfig,
    /// Log new flows from the XDP program (aya-log); slow, for debugging.
    pub debug: bool,
}

impl DataPlaneConfig {
    /// What the data path's SETTINGS should hold for this config, with
    /// `nat_source` (the resolved `nat.source_address`) as the current NAT
    /// source. Earlier NAT ranges and the ring size are the data plane's to fill in.
    ///
    /// # Errors
    /// An IPv6 `nat_source`: SETTINGS holds an IPv4 one (validation refuses
    /// an IPv6 `nat.source_address` first).
    pub fn settings(&self, nat_source: IpAddr) -> Result<ha_common::Settings, crate::ip::NotIpv4> {
        let nat_source = crate::ip::ipv4(nat_source)?;
        let ct = &self.conntrack;
        let ns = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        use ha_common::*;
        let timeouts = Timeouts {
            tcp_syn_ns: ns(ct.tcp_syn_timeout),
            tcp_established_ns: ns(ct.tcp_idle_timeout),
            tcp_closing_ns: ns(ct.tcp_closing_timeout),
            tcp_closed_ns: ns(ct.fin_linger),
            udp_unreplied_ns: ns(ct.udp_unreplied_timeout),
            udp_established_ns: ns(ct.udp_idle_timeout),
        };
        let mut settings = Settings {
            timeouts_ns: timeouts.table(),
            flags: if self.debug { SETTINGS_FLAG_DEBUG } else { 0 },
            ..Settings::default()
        };
        settings.nat[0] = NatRange {
            addr: addr_to_wire(nat_source.octets()),
            port_min: self.nat.port_range.min,
            port_max: self.nat.port_range.max,
        };
        Ok(settings)
    }
}

impl Default for DataPlaneConfig {
    fn default() -> Self {
        Self {
            maglev_table_size: 65537,
            max_vips: 8,
            conntrack: ConntrackConfig::default(),
            nat: NatConfig::default(),
            debug: false,
        }
    }
}

/// The connection table: its size and the timeout of each flow state
/// (docs/data-path.md, "The flow state machine").
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConntrackConfig {
    /// Entries in the connection table. When it is full, the oldest flows
    /// that are not established make room; established ones never do.
    pub max_flows: u32,
    /// A TCP flow not yet established (SYN_SENT, SYN_RECV) ends after this long without a packet.
    #[serde(with = "humantime_serde")]
    pub tcp_syn_timeout: Duration,
    /// An established TCP flow ends after this long without a packet.
    #[serde(with = "humantime_serde")]
    pub tcp_idle_timeout: Duration,
    /// An established TCP flow after one side's FIN ends after this long without a packet.
    #[serde(with = "humantime_serde")]
    pub tcp_closing_timeout: Duration,
    /// How long a closed flow (RST, or FIN from both sides) stays, for the last ACKs and retransmissions.
    #[serde(with = "humantime_serde")]
    pub fin_linger: Duration,
    /// A UDP flow not yet answered and confirmed ends after this long without a packet.
    #[serde(with = "humantime_serde")]
    pub udp_unreplied_timeout: Duration,
    /// An established UDP flow ends after this long without a packet.
    #[serde(with = "humantime_serde")]
    pub udp_idle_timeout: Duration,
}

impl Default for ConntrackConfig {
    fn default() -> Self {
        Self {
            max_flows: 262_144,
            tcp_syn_timeout: Duration::from_secs(60),
            tcp_idle_timeout: Duration::from_secs(3600),
            tcp_closing_timeout: Duration::from_secs(120),
            fin_linger: Duration::from_secs(5),
            udp_unreplied_timeout: Duration::from_secs(30),
            udp_idle_timeout: Duration::from_secs(60),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatConfig {
    /// Source address of NATed packets; `None`: the interface's primary IPv4 address.
    #[serde(skip_serializing_if = "Option::is_none")]
    /// IPv4 only for now: validation refuses an IPv6 one.
    pub source_address: Option<IpAddr>,
    /// Source ports of NATed packets, `MIN-MAX`. Must not overlap the host's
    /// `net.ipv4.ip_local_port_range`, or replies to the host's own
    /// connections could be mistaken for NAT replies.
    pub port_range: PortRange,
}

impl Default for NatConfig {
    fn default() -> Self {
        Self {
            source_address: None,
            port_range: PortRange {
                min: 10000,
                max: 32767,
            },
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    pub min: u16,
    pub max: u16,
}

impl PortRange {
    pub fn overlaps(&self, other: &PortRange) -> bool {
        self.min <= other.max && other.min <= self.max
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.min, self.max)
    }
}

impl std::str::FromStr for PortRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (min, max) = s
            .split_once('-')
            .ok_or_else(|| format!("port range {s:?} is not MIN-MAX"))?;
        let parse = |p: &str| {
            p.trim()
                .parse::<u16>()
                .map_err(|e| format!("port range {s:?}: {e}"))
        };
        Ok(PortRange {
            min: parse(min)?,
            max: parse(max)?,
        })
    }
}

impl Serialize for PortRange {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::ISSUE_EXAMPLE;
    use crate::config::Config;

    #[test]
    fn conntrack_keys_are_validated_and_reach_the_settings_by_state() {
        let yaml = format!(
            "{ISSUE_EXAMPLE}data_plane:\n  conntrack:\n    tcp_syn_timeout: 20s\n    tcp_closing_timeout: 0s\n    udp_unreplied_timeout: 500ms\n"
        );
        let err = Config::from_yaml(&yaml, "t").unwrap_err().to_string();
        for key in [
            "data_plane.conntrack.tcp_closing_timeout: 0s is below 1s",
            "data_plane.conntrack.udp_unreplied_timeout: 500ms is below 1s",
        ] {
            assert!(err.contains(key), "{key} in {err}");
        }
        let config = Config::from_yaml(ISSUE_EXAMPLE, "t").unwrap();
        let source = std::net::Ipv4Addr::new(10, 0, 0, 2);
        let settings = config.data_plane.settings(source.into()).unwrap();
        assert!(
            config
                .data_plane
                .settings("2001:db8::2".parse().unwrap())
                .is_err(),
            "SETTINGS is IPv4"
        );
        let ns = |s: u64| s * 1_000_000_000;
        use ha_common::*;
        assert_eq!(settings.timeouts_ns[TIMEOUT_TCP_EMBRYONIC], ns(60));
        assert_eq!(settings.timeouts_ns[TIMEOUT_TCP_ESTABLISHED], ns(3600));
        assert_eq!(settings.timeouts_ns[TIMEOUT_TCP_CLOSING], ns(120));
        assert_eq!(settings.timeouts_ns[TIMEOUT_TCP_CLOSED], ns(5));
        assert_eq!(settings.timeouts_ns[TIMEOUT_UDP_UNREPLIED], ns(30));
        assert_eq!(settings.timeouts_ns[TIMEOUT_UDP_ESTABLISHED], ns(60));
        assert_eq!(
            settings.nat[0],
            NatRange {
                addr: addr_to_wire(source.octets()),
                port_min: 10000,
                port_max: 32767
            }
        );
        assert_eq!(
            settings.nat[1],
            NatRange::default(),
            "earlier ranges are the data plane's"
        );
        assert_eq!(
            settings.clock_ns, 0,
            "the agent never sets the virtual clock"
        );
    }
}
