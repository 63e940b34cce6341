//! The agent's configuration file: parsing, defaults and validation.
//!
//! A config is accepted whole or not at all: [`Config::from_yaml`] returns
//! every problem it finds, each naming the key it is about, and the caller
//! keeps running whatever it had before.

use std::{
    collections::{HashMap, HashSet},
    fmt,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

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
}

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

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VrrpVersion {
    #[serde(rename = "2")]
    V2,
    #[serde(rename = "3")]
    V3,
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
}

/// `decrease 50` rather than `fault` by default: when every LB host sees
/// every backend down (a wrong check path), `fault` would leave the VIP with
/// no master at all, the outage fail-open exists to prevent; with a decrease,
/// an LB that alone sees its backends down yields to a healthy peer.
impl Default for TrackConfig {
    fn default() -> Self {
        Self {
            no_healthy_backend: TrackAction::Decrease(50),
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
    pub unicast_peers: Vec<Ipv4Addr>,
    #[serde(default)]
    pub checksum: crate::vrrp::packet::ChecksumMode,
    #[serde(default)]
    pub track: TrackConfig,
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

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GarpConfig {
    /// Announcements sent on taking the VIPs (keepalived's garp_master_repeat).
    pub count: u32,
    /// Between them (keepalived's garp_interval).
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// While master, announce again this often; 0s: never (keepalived's garp_master_refresh).
    #[serde(with = "humantime_serde")]
    pub refresh: Duration,
}

impl Default for GarpConfig {
    fn default() -> Self {
        Self {
            count: 5,
            interval: Duration::ZERO,
            refresh: Duration::ZERO,
        }
    }
}

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
        f.write_str(match self {
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
        f.write_str(match self {
            Mode::Nat => "nat",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VipConfig {
    pub name: String,
    pub address: Ipv4Addr,
    pub port: u16,
    #[serde(default = "default_protocol")]
    pub protocol: Protocol,
    #[serde(default)]
    pub mode: Mode,
    /// Health check of every backend of this VIP.
    #[serde(default)]
    pub check: CheckConfig,
    pub backends: Vec<BackendConfig>,
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
}

fn default_protocol() -> Protocol {
    Protocol::Tcp
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    pub address: Ipv4Addr,
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
    pub fn settings(&self, nat_source: Ipv4Addr) -> ha_common::Settings {
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
        settings
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
    pub source_address: Option<Ipv4Addr>,
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

/// Weights above this are refused: they would only slow the table build.
pub const MAX_WEIGHT: u32 = 1000;
const MAX_TABLE_SIZE: u32 = 1_000_003;

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_yaml(&text, &path.display().to_string())
    }

    /// Parses and validates; `origin` names the source in error messages.
    pub fn from_yaml(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let mut config: Config = serde_yaml_ng::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_string(),
            message: e.to_string(),
        })?;
        config.apply_defaults();
        let problems = config.problems();
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid {
                path: origin.to_string(),
                problems,
            })
        }
    }

    fn apply_defaults(&mut self) {
        for vip in &mut self.vips {
            // /readyz fails as soon as a kube-apiserver starts graceful shutdown
            // while /livez and /healthz stay ok: it is what an LB must probe.
            vip.check.kind.get_or_insert(if vip.port == 6443 {
                CheckKind::Https
            } else {
                CheckKind::Tcp
            });
            for backend in &mut vip.backends {
                backend.port.get_or_insert(vip.port);
            }
        }
    }

    /// Every reason this config cannot be used, each naming its key.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let dp = &self.data_plane;
        let m = dp.maglev_table_size;
        if !is_prime(m) || !(101..=MAX_TABLE_SIZE).contains(&m) {
            problems.push(format!(
                "data_plane.maglev_table_size: {m} must be a prime between 101 and {MAX_TABLE_SIZE} (default 65537)"
            ));
        }
        if dp.max_vips == 0 || dp.max_vips > ha_common::MAX_VIPS {
            problems.push(format!(
                "data_plane.max_vips: {} must be 1..={}",
                dp.max_vips,
                ha_common::MAX_VIPS
            ));
        }
        if dp.conntrack.max_flows < 1024 {
            problems.push(format!(
                "data_plane.conntrack.max_flows: {} is below the minimum of 1024",
                dp.conntrack.max_flows
            ));
        }
        let ct = &dp.conntrack;
        for (key, value) in [
            ("tcp_syn_timeout", ct.tcp_syn_timeout),
            ("tcp_idle_timeout", ct.tcp_idle_timeout),
            ("tcp_closing_timeout", ct.tcp_closing_timeout),
            ("udp_unreplied_timeout", ct.udp_unreplied_timeout),
            ("udp_idle_timeout", ct.udp_idle_timeout),
        ] {
            if value < Duration::from_secs(1) {
                problems.push(format!(
                    "data_plane.conntrack.{key}: {} is below 1s",
                    humantime::format_duration(value)
                ));
            }
        }
        let range = dp.nat.port_range;
        if range.min > range.max || range.min < 1024 {
            problems.push(format!(
                "data_plane.nat.port_range: {range} must be MIN-MAX with 1024 <= MIN <= MAX"
            ));
        }
        if let Some(source) = dp.nat.source_address
            && !is_unicast(source)
        {
            problems.push(format!(
                "data_plane.nat.source_address: {source} is not a unicast address"
            ));
        }
        if let Some(source) = dp.nat.source_address
            && let Some(vip) = self.vips.iter().find(|v| v.address == source)
        {
            problems.push(format!(
                "data_plane.nat.source_address: {source} is the address of VIP {}; the NAT source \
                 must be an address of this host that is not a VIP (a VIP moves with VRRP, and \
                 its packets are the clients')",
                vip.name
            ));
        }

        if self.vips.is_empty() {
            problems.push("vips: at least one VIP is required".to_string());
        }
        if self.vips.len() > dp.max_vips as usize {
            problems.push(format!(
                "vips: {} VIPs configured but data_plane.max_vips is {}",
                self.vips.len(),
                dp.max_vips
            ));
        }
        let mut names = HashSet::new();
        let mut listeners = HashMap::new();
        let mut all_backends = HashSet::new();
        for (i, vip) in self.vips.iter().enumerate() {
            let at = format!("vips[{i}] ({})", vip.name);
            if vip.name.is_empty()
                || !vip
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                problems.push(format!(
                    "{at}.name: {:?} must be non-empty letters, digits, '-' or '_'",
                    vip.name
                ));
            }
            if !names.insert(vip.name.as_str()) {
                problems.push(format!("{at}.name: {:?} is used by another VIP", vip.name));
            }
            if !is_unicast(vip.address) {
                problems.push(format!(
                    "{at}.address: {} is not a unicast address",
                    vip.address
                ));
            }
            if vip.port == 0 {
                problems.push(format!("{at}.port: must be 1-65535"));
            }
            if let Some(other) = listeners.insert((vip.address, vip.port, vip.protocol), &vip.name)
            {
                problems.push(format!(
                    "{at}: {}:{}/{} is also VIP {other}",
                    vip.address, vip.port, vip.protocol
                ));
            }
            if vip.backends.is_empty() {
                problems.push(format!("{at}.backends: at least one backend is required"));
            }
            if m as u64 <= 100 * vip.backends.len() as u64 {
                problems.push(format!(
                    "{at}.backends: {} backends need data_plane.maglev_table_size >= 100 x {} (it is {m})",
                    vip.backends.len(),
                    vip.backends.len()
                ));
            }
            let mut seen = HashSet::new();
            for (j, backend) in vip.backends.iter().enumerate() {
                let bat = format!("{at}.backends[{j}]");
                if !is_unicast(backend.address) {
                    problems.push(format!(
                        "{bat}.address: {} is not a unicast address",
                        backend.address
                    ));
                }
                if backend.port() == 0 {
                    problems.push(format!("{bat}.port: must be 1-65535"));
                }
                if backend.weight > MAX_WEIGHT {
                    problems.push(format!(
                        "{bat}.weight: {} is above {MAX_WEIGHT}",
                        backend.weight
                    ));
                }
                if backend.address == vip.address {
                    problems.push(format!(
                        "{bat}.address: {} is the VIP itself",
                        backend.address
                    ));
                }
                if !seen.insert((backend.address, backend.port())) {
                    problems.push(format!(
                        "{bat}: {}:{} is listed twice",
                        backend.address,
                        backend.port()
                    ));
                }
                all_backends.insert((backend.address, backend.port()));
            }
            problems.extend(check_problems(&at, &vip.check));
            if !vip.backends.is_empty() && vip.backends.iter().all(|b| b.weight == 0) {
                problems.push(format!(
                    "{at}.backends: every weight is 0; at least one must be above 0"
                ));
            }
        }
        if let Some(vrrp) = &self.vrrp {
            problems.extend(vrrp_problems(vrrp));
        }
        if self.garp.count > 100 {
            problems.push(format!("garp.count: {} is above 100", self.garp.count));
        }
        if !self.garp.refresh.is_zero() && self.garp.refresh < Duration::from_secs(1) {
            problems.push("garp.refresh: below 1s (0s turns it off)".to_string());
        }
        if all_backends.len() > ha_common::MAX_BACKENDS as usize {
            problems.push(format!(
                "vips: {} distinct backends, at most {}",
                all_backends.len(),
                ha_common::MAX_BACKENDS
            ));
        }
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
        reasons
    }
}

fn vrrp_problems(vrrp: &VrrpConfig) -> Vec<String> {
    let mut problems = Vec::new();
    if vrrp.vrid == 0 {
        problems.push("vrrp.vrid: must be 1-255".to_string());
    }
    if vrrp.priority == 0 {
        problems
            .push("vrrp.priority: must be 1-255 (0 is what a leaving master sends)".to_string());
    }
    let ms = vrrp.advert_interval.as_millis();
    match vrrp.version {
        VrrpVersion::V3
            if !(10..=40_950).contains(&ms)
                || !vrrp
                    .advert_interval
                    .subsec_nanos()
                    .is_multiple_of(10_000_000) =>
        {
            problems.push(format!(
                "vrrp.advert_interval: {} must be 10ms to 40.95s in steps of 10ms (version 3 counts centiseconds)",
                humantime::format_duration(vrrp.advert_interval)
            ));
        }
        VrrpVersion::V2
            if vrrp.advert_interval.subsec_nanos() != 0
                || !(1..=255).contains(&vrrp.advert_interval.as_secs()) =>
        {
            problems.push(format!(
                "vrrp.advert_interval: {} must be whole seconds 1-255 with version 2",
                humantime::format_duration(vrrp.advert_interval)
            ));
        }
        _ => {}
    }
    let hold = vrrp.restart_hold;
    if !hold.is_zero() {
        let fits = match vrrp.version {
            VrrpVersion::V3 => {
                (10..=40_950).contains(&hold.as_millis())
                    && hold.subsec_nanos().is_multiple_of(10_000_000)
            }
            VrrpVersion::V2 => hold.subsec_nanos() == 0 && (1..=255).contains(&hold.as_secs()),
        };
        if !fits || hold < vrrp.advert_interval {
            problems.push(format!(
                "vrrp.restart_hold: {} must be 0s, or at least advert_interval and an interval an advert can carry \
                 (version 3: up to 40.95s in steps of 10ms; version 2: whole seconds up to 255)",
                humantime::format_duration(hold)
            ));
        }
    }
    for peer in &vrrp.unicast_peers {
        if !is_unicast(*peer) {
            problems.push(format!(
                "vrrp.unicast_peers: {peer} is not a unicast address"
            ));
        }
    }
    if let TrackAction::Decrease(0) = vrrp.track.no_healthy_backend {
        problems.push("vrrp.track.no_healthy_backend: decrease 0 does nothing".to_string());
    }
    problems
}

fn check_problems(at: &str, check: &CheckConfig) -> Vec<String> {
    let mut problems = Vec::new();
    let at = format!("{at}.check");
    if check.rise == 0 || check.fall == 0 {
        problems.push(format!("{at}: rise and fall must be at least 1"));
    }
    let minimum = Duration::from_millis(10);
    for (key, value) in [
        ("interval", check.interval),
        ("fast_interval", check.fast_interval),
        ("down_interval", check.down_interval()),
        ("timeout", check.timeout),
    ] {
        if value < minimum {
            problems.push(format!(
                "{at}.{key}: {} is below 10ms",
                humantime::format_duration(value)
            ));
        }
    }
    if check.port == Some(0) {
        problems.push(format!("{at}.port: must be 1-65535"));
    }
    if check.kind() != CheckKind::Tcp {
        if !check.path.starts_with('/') {
            problems.push(format!("{at}.path: {:?} must start with /", check.path));
        }
        if !(100..=599).contains(&check.expect_status) {
            problems.push(format!(
                "{at}.expect_status: {} is not an HTTP status",
                check.expect_status
            ));
        }
    }
    if check.client_cert.is_some() != check.client_key.is_some() {
        problems.push(format!("{at}: client_cert and client_key go together"));
    }
    let files = [
        (
            "verify",
            match &check.verify {
                Verify::CaFile(path) => Some(path),
                Verify::None => None,
            },
        ),
        ("client_cert", check.client_cert.as_ref()),
        ("client_key", check.client_key.as_ref()),
    ];
    for (key, path) in files {
        if let Some(path) = path
            && let Err(e) = std::fs::metadata(path)
        {
            problems.push(format!("{at}.{key}: {}: {e}", path.display()));
        }
    }
    if check.kind() != CheckKind::Https
        && (check.client_cert.is_some() || check.sni.is_some() || check.verify != Verify::None)
    {
        problems.push(format!(
            "{at}: verify, sni and client_cert apply to type https only"
        ));
    }
    problems
}

fn is_unicast(addr: Ipv4Addr) -> bool {
    !(addr.is_unspecified() || addr.is_multicast() || addr.is_broadcast() || addr.is_loopback())
}

pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2u32;
    while (d as u64) * (d as u64) <= n as u64 {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    const ISSUE_EXAMPLE: &str = r#"
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

    fn problems_of(yaml: &str) -> Vec<String> {
        match Config::from_yaml(yaml, "test") {
            Err(ConfigError::Invalid { problems, .. }) => problems,
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn every_problem_is_reported_with_its_key() {
        let problems = problems_of(
            r#"
vips:
  - name: api
    address: 224.0.0.1
    port: 0
    backends: []
  - name: api
    address: 10.0.0.1
    port: 6443
    backends:
      - address: 10.0.0.2
        weight: 5000
      - address: 10.0.0.2
data_plane:
  maglev_table_size: 65536
  nat:
    port_range: 40000-30000
    source_address: 10.0.0.1
"#,
        );
        let text = problems.join("\n");
        for needle in [
            "vips[0] (api).address: 224.0.0.1 is not a unicast address",
            "vips[0] (api).port: must be 1-65535",
            "vips[0] (api).backends: at least one backend is required",
            "vips[1] (api).name: \"api\" is used by another VIP",
            "vips[1] (api).backends[0].weight: 5000 is above 1000",
            "vips[1] (api).backends[1]: 10.0.0.2:6443 is listed twice",
            "data_plane.maglev_table_size: 65536 must be a prime",
            "data_plane.nat.port_range: 40000-30000",
            "data_plane.nat.source_address: 10.0.0.1 is the address of VIP api",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
        }
    }

    #[test]
    fn table_size_below_100_per_backend_is_refused() {
        let problems = problems_of(
            r#"
vips:
  - name: api
    address: 10.0.0.1
    port: 6443
    backends: [{address: 10.0.0.2}, {address: 10.0.0.3}]
data_plane: {maglev_table_size: 199}
"#,
        );
        assert!(
            problems
                .iter()
                .any(|p| p.contains(">= 100 x 2 (it is 199)")),
            "{problems:?}"
        );
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
        let source = Ipv4Addr::new(10, 0, 0, 2);
        let settings = config.data_plane.settings(source);
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

    #[test]
    fn bad_checks_are_reported() {
        let problems = problems_of(
            r#"
vips:
  - name: api
    address: 10.0.0.1
    port: 6443
    check: {type: http, path: readyz, rise: 0, interval: 1ms, client_cert: /nonexistent.pem}
    backends: [{address: 10.0.0.2}]
"#,
        );
        let text = problems.join("\n");
        for needle in [
            "check: rise and fall must be at least 1",
            "check.interval: 1ms is below 10ms",
            "check.path: \"readyz\" must start with /",
            "check: client_cert and client_key go together",
            "check.client_cert: /nonexistent.pem",
            "check: verify, sni and client_cert apply to type https only",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
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
        assert_eq!(vrrp.unicast_peers, vec![Ipv4Addr::new(192, 168, 205, 253)]);
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

    #[test]
    fn vrrp_intervals_follow_the_version() {
        let base = "vips:\n  - {name: a, address: 10.0.0.1, port: 6443, backends: [{address: 10.0.0.2}]}\n";
        for (vrrp, bad) in [
            ("{vrid: 1, advert_interval: 5ms}", true),
            ("{vrid: 1, advert_interval: 15ms}", true),
            ("{vrid: 1, advert_interval: 20ms}", false),
            ("{vrid: 1, version: 2, advert_interval: 100ms}", true),
            ("{vrid: 1, version: 2, advert_interval: 1s}", false),
            ("{vrid: 0}", true),
            ("{vrid: 1, priority: 0}", true),
            ("{vrid: 1, track: {no_healthy_backend: maybe}}", true),
            ("{vrid: 1, restart_hold: 0s}", false),
            ("{vrid: 1, restart_hold: 41s}", true),
            ("{vrid: 1, restart_hold: 50ms}", true),
            (
                "{vrid: 1, version: 2, advert_interval: 1s, restart_hold: 1500ms}",
                true,
            ),
            (
                "{vrid: 1, version: 2, advert_interval: 2s, restart_hold: 1s}",
                true,
            ),
            (
                "{vrid: 1, version: 2, advert_interval: 1s, restart_hold: 30s}",
                false,
            ),
        ] {
            let result = Config::from_yaml(&format!("{base}vrrp: {vrrp}\n"), "t");
            assert_eq!(result.is_err(), bad, "{vrrp}: {result:?}");
        }
    }

    #[test]
    fn primes() {
        assert!(is_prime(65537) && is_prime(101) && is_prime(131071));
        assert!(!is_prime(65536) && !is_prime(1) && !is_prime(100));
    }
}
