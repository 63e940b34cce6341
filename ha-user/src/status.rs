//! What `ha-user status` shows: the agent's view of every VIP and backend,
//! and the data plane's counters. Built by the agent, sent as JSON over the
//! admin socket, and rendered as a table for people.

use std::{
    collections::BTreeMap,
    fmt::Write,
    net::{IpAddr, Ipv4Addr, SocketAddr},
};

use serde::{Deserialize, Serialize};

use crate::{
    config::{Mode, Protocol},
    dataplane::AttachedMode,
    handover::{StartKind, StopIntent},
    health::{CheckResult, Health},
    probe::Outcome,
};

/// Addresses are [`IpAddr`]s, serialized as the strings they always were
/// (`"10.0.0.2"`); a default report has `0.0.0.0`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StatusReport {
    pub interface: String,
    /// The XDP attachment's mode (`None`: not attached).
    #[serde(default)]
    pub xdp_mode: Option<AttachedMode>,
    /// Whether the tc egress program (local backends' replies, back to
    /// their VIP) is attached at the interface's egress.
    #[serde(default)]
    pub egress_translation: bool,
    /// The tc egress program's packets per verdict (only those seen).
    #[serde(default)]
    pub egress_verdicts: BTreeMap<String, u64>,
    /// The NAT source.
    pub lb_address: IpAddr,
    pub uptime_seconds: f64,
    /// VRRP, when the VIPs are owned through it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vrrp: Option<crate::vrrp::announcer::VrrpStatus>,
    pub vips: Vec<VipStatus>,
    /// Packets per verdict (only those seen).
    pub verdicts: BTreeMap<String, u64>,
    /// Slow-path events (only those seen).
    pub events: BTreeMap<String, u64>,
    /// Why the agent is not ready (empty: ready). What /readyz answers.
    #[serde(default)]
    pub not_ready: Vec<String>,
    #[serde(default)]
    pub conntrack: ConntrackStatus,
    /// The data path forwards packets that no backend answers although the
    /// health checks reach them (the reason is in `not_ready`).
    #[serde(default)]
    pub data_path_unanswered: bool,
    #[serde(default)]
    pub program: ProgramStatus,
    /// Reloads since the agent started, by outcome.
    #[serde(default)]
    pub reloads: BTreeMap<ReloadOutcome, u64>,
    /// The socket-level balancer of this host's own connections.
    #[serde(default)]
    pub socket_lb: SocketLbStatus,
    /// Passive health: the data path's suspicions and their confirmations.
    #[serde(default)]
    pub passive_health: PassiveHealthStatus,
}

/// Passive health (docs/health-checks.md, "Passive health").
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PassiveHealthStatus {
    /// The program has the SUSPECT map and the PASSIVE_EVENTS ring.
    pub enabled: bool,
    /// Suspicions the data path reported, by reason (`rst_to_syn`,
    /// `icmp_unreachable`), only those seen.
    #[serde(default)]
    pub events: BTreeMap<String, u64>,
    /// Suspects whose confirming check passed (the flag cleared).
    #[serde(default)]
    pub suspects_cleared: u64,
    /// Suspects whose confirming check failed too (down at once).
    #[serde(default)]
    pub suspects_confirmed: u64,
}

impl PassiveHealthStatus {
    /// One line of `ha-user status`.
    pub fn render(&self) -> String {
        if !self.enabled {
            return "passive health: off (the XDP program has no SUSPECT map)".to_string();
        }
        let events: Vec<String> = self
            .events
            .iter()
            .map(|(reason, n)| format!("{reason} {n}"))
            .collect();
        format!(
            "passive health: on; suspicions {}; suspects cleared {}, confirmed down {}",
            if events.is_empty() {
                "none".to_string()
            } else {
                events.join(", ")
            },
            self.suspects_cleared,
            self.suspects_confirmed
        )
    }
}

/// A backend the data path suspects: it refused a client's SYN `seconds_ago`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SuspectStatus {
    /// `rst_to_syn` or `icmp_unreachable`.
    pub reason: String,
    pub seconds_ago: f64,
}

/// Why a backend takes no new flows, in words (`None`: it takes them).
/// `confirmed`: the reason of the suspicion a confirming check agreed with,
/// when that is what took it down.
pub fn out_reason(
    state: BackendState,
    last_check: Option<&LastCheck>,
    suspect: Option<&SuspectStatus>,
    confirmed: Option<&str>,
) -> Option<String> {
    let detail = last_check.map_or("no check yet", |c| c.detail.as_str());
    match state {
        BackendState::Maintenance => Some(
            "maintenance: drained by an operator (ha-user drain); no new flows, established flows stay"
                .to_string(),
        ),
        BackendState::Down => Some(match confirmed {
            Some(reason) => format!(
                "down: the data path saw {reason} and the confirming check failed ({detail}): down at once; its flows move"
            ),
            None => format!("down: its check fails ({detail}); its flows move"),
        }),
        BackendState::Draining => Some(format!(
            "draining: it answers but is not ready ({detail}); no new flows, established flows stay"
        )),
        BackendState::Up => suspect.map(|s| {
            format!(
                "suspect: {} {:.1}s ago; no new flows until its confirming check passes",
                s.reason, s.seconds_ago
            )
        }),
    }
}

/// The socket-level balancer (docs/data-path.md, "Socket-level balancing").
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SocketLbStatus {
    /// `socket_lb.enabled` in the config.
    pub enabled: bool,
    /// Its programs are attached (enabled, and the attach succeeded).
    pub attached: bool,
    /// The cgroup v2 directory they are attached to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
    /// How that directory was found.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup_source: Option<crate::cgroup::CgroupSource>,
    /// The directory is the cgroup2 hierarchy's root: every process of the
    /// host is balanced (otherwise only those in and below it).
    #[serde(default)]
    pub cgroup_is_root: bool,
    /// Why it is not attached although enabled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Its counters (only those seen), by `SockLbEvent` label.
    #[serde(default)]
    pub events: BTreeMap<String, u64>,
}

/// How a reload ended (docs/operations.md, "Reloading").
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReloadOutcome {
    /// The new config is the running one.
    Applied,
    /// Refused before anything changed (invalid, or needs a restart).
    Rejected,
    /// A step failed; what had changed was put back.
    RolledBack,
    /// A step failed and putting the running config back failed too.
    Incomplete,
}

impl ReloadOutcome {
    pub const ALL: [ReloadOutcome; 4] = [
        ReloadOutcome::Applied,
        ReloadOutcome::Rejected,
        ReloadOutcome::RolledBack,
        ReloadOutcome::Incomplete,
    ];

    /// The serde spelling, as `/metrics` labels it.
    pub fn label(self) -> &'static str {
        match self {
            ReloadOutcome::Applied => "applied",
            ReloadOutcome::Rejected => "rejected",
            ReloadOutcome::RolledBack => "rolled_back",
            ReloadOutcome::Incomplete => "incomplete",
        }
    }
}

/// The step of a reload's apply that failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReloadStep {
    /// The data plane's tables (VIPs, Maglev, backends, settings).
    DataPlane,
    /// The VIP addresses on the interface.
    Addresses,
}

impl std::fmt::Display for ReloadStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(match self {
            ReloadStep::DataPlane => "the data plane's tables",
            ReloadStep::Addresses => "the VIP addresses",
        })
    }
}

/// The XDP program this agent runs and how it came to (docs/operations.md,
/// "Restarts and upgrades").
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgramStatus {
    /// `fresh` (attached now), `adopted` (the pinned link ran the same
    /// program), `upgraded` (it ran another one).
    pub start: StartKind,
    /// The program's tag, 16 hex digits as bpftool prints it.
    pub tag: String,
    /// The tag of the program the pinned link ran before, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replaced_tag: Option<String>,
    /// What SIGTERM does: `release` or `keep`.
    pub on_stop: StopIntent,
}

/// The connection tables, as the agent's sweeps (every 10 s) see them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConntrackStatus {
    /// `address:min-max`, the current NAT source first, then earlier ones
    /// whose flows still live (after a reload changed it).
    pub nat_sources: Vec<String>,
    /// Flows in the table after the last sweep.
    pub flows: u64,
    pub sweeps: u64,
    /// Ended flows the sweeps removed.
    pub expired: u64,
    /// Reverse entries put back for live flows that had lost theirs.
    pub reverse_recovered: u64,
    /// Reverse entries removed because their flow was gone.
    pub orphans_freed: u64,
    /// Flows of backends marked down as dead whose clients were told to
    /// reset (reset on mark-down: the challenges sent).
    #[serde(default)]
    pub sessions_reset: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VipStatus {
    pub name: String,
    pub address: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    /// The VIP's configured mode.
    pub mode: Mode,
    /// Who answers for the VIP: `static` (this host, no VRRP).
    pub owner: String,
    /// Every backend is down or draining: traffic goes to all of them.
    pub fail_open: bool,
    pub traffic: Traffic,
    pub backends: Vec<BackendStatus>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BackendStatus {
    pub address: IpAddr,
    pub port: u16,
    pub weight: u32,
    pub state: BackendState,
    /// Seconds in this state.
    pub in_state_seconds: f64,
    pub checks: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_check: Option<LastCheck>,
    pub traffic: Traffic,
    /// The data path suspects it (passive health), until its confirming
    /// check decides or the suspicion expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suspect: Option<SuspectStatus>,
    /// Why it takes no new flows ([`out_reason`]); absent while it takes them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub out_reason: Option<String>,
}

const NO_ADDRESS: IpAddr = IpAddr::V4(Ipv4Addr::UNSPECIFIED);

impl Default for StatusReport {
    fn default() -> Self {
        Self {
            interface: String::new(),
            xdp_mode: None,
            egress_translation: false,
            egress_verdicts: BTreeMap::new(),
            lb_address: NO_ADDRESS,
            uptime_seconds: 0.0,
            vrrp: None,
            vips: Vec::new(),
            verdicts: BTreeMap::new(),
            events: BTreeMap::new(),
            not_ready: Vec::new(),
            conntrack: ConntrackStatus::default(),
            data_path_unanswered: false,
            program: ProgramStatus::default(),
            reloads: BTreeMap::new(),
            socket_lb: SocketLbStatus::default(),
            passive_health: PassiveHealthStatus::default(),
        }
    }
}

impl Default for VipStatus {
    fn default() -> Self {
        Self {
            name: String::new(),
            address: NO_ADDRESS,
            port: 0,
            protocol: Protocol::default(),
            mode: Mode::default(),
            owner: String::new(),
            fail_open: false,
            traffic: Traffic::default(),
            backends: Vec::new(),
        }
    }
}

impl Default for BackendStatus {
    fn default() -> Self {
        Self {
            address: NO_ADDRESS,
            port: 0,
            weight: 0,
            state: BackendState::default(),
            in_state_seconds: 0.0,
            checks: 0,
            last_check: None,
            traffic: Traffic::default(),
            suspect: None,
            out_reason: None,
        }
    }
}

/// A backend's state as status and `/metrics` show it: its health, or
/// maintenance when an operator drained it (which hides the health).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendState {
    #[default]
    Up,
    Draining,
    Down,
    Maintenance,
}

impl BackendState {
    pub const ALL: [BackendState; 4] = [
        BackendState::Up,
        BackendState::Draining,
        BackendState::Down,
        BackendState::Maintenance,
    ];

    /// The state of a backend with `health`, drained or not.
    pub fn of(health: Health, maintenance: bool) -> Self {
        match (maintenance, health) {
            (true, _) => BackendState::Maintenance,
            (false, Health::Up) => BackendState::Up,
            (false, Health::Draining) => BackendState::Draining,
            (false, Health::Down) => BackendState::Down,
        }
    }

    /// The serde spelling.
    pub fn label(self) -> &'static str {
        match self {
            BackendState::Up => "up",
            BackendState::Draining => "draining",
            BackendState::Down => "down",
            BackendState::Maintenance => "maintenance",
        }
    }
}

impl std::fmt::Display for BackendState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.label())
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct LastCheck {
    pub result: String,
    pub latency_ms: f64,
    pub detail: String,
    pub seconds_ago: f64,
}

impl LastCheck {
    pub fn from_outcome(outcome: &Outcome, seconds_ago: f64) -> Self {
        let result = match outcome.result {
            CheckResult::Pass => "pass",
            CheckResult::NotReady => "not_ready",
            CheckResult::Fail => "fail",
        };
        Self {
            result: result.to_string(),
            latency_ms: outcome.latency.as_secs_f64() * 1000.0,
            detail: outcome.detail.clone(),
            seconds_ago,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct Traffic {
    pub packets: u64,
    pub bytes: u64,
    pub flows: u64,
}

fn duration(seconds: f64) -> String {
    if seconds < 60.0 {
        format!("{seconds:.0}s")
    } else if seconds < 3600.0 {
        format!(
            "{}m{:02}s",
            (seconds / 60.0) as u64,
            (seconds % 60.0) as u64
        )
    } else {
        format!(
            "{}h{:02}m",
            (seconds / 3600.0) as u64,
            ((seconds % 3600.0) / 60.0) as u64
        )
    }
}

impl SocketLbStatus {
    /// One line of `ha-user status`.
    pub fn render(&self) -> String {
        let counters = self
            .events
            .iter()
            .map(|(name, n)| format!("{name} {n}"))
            .collect::<Vec<_>>()
            .join(", ");
        match (self.enabled, self.attached) {
            (false, _) => "socket LB: disabled (socket_lb.enabled: false)".to_string(),
            (true, true) => format!(
                "socket LB: attached to {}{}{}",
                self.cgroup.as_deref().unwrap_or("?"),
                if self.cgroup_is_root {
                    " (cgroup2 root)"
                } else {
                    " (NOT the cgroup2 root: only processes below it are balanced)"
                },
                if counters.is_empty() {
                    String::new()
                } else {
                    format!("; {counters}")
                }
            ),
            (true, false) => format!(
                "socket LB: NOT ATTACHED: {}",
                self.error.as_deref().unwrap_or("unknown reason")
            ),
        }
    }
}

impl StatusReport {
    /// The table `ha-user status` prints.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "interface {} (XDP {}), NAT source {}, up {}",
            self.interface,
            self.xdp_mode
                .map_or("not attached".to_string(), |m| m.to_string()),
            self.lb_address,
            duration(self.uptime_seconds)
        );
        let program = &self.program;
        let _ = writeln!(
            out,
            "program tag {} ({}{}), on stop: {}",
            program.tag,
            program.start,
            program
                .replaced_tag
                .as_ref()
                .map(|t| format!(" from tag {t}"))
                .unwrap_or_default(),
            program.on_stop
        );
        if !self.reloads.is_empty() {
            let counts: Vec<String> = self
                .reloads
                .iter()
                .map(|(outcome, n)| format!("{} {n}", outcome.label()))
                .collect();
            let _ = writeln!(out, "reloads: {}", counts.join(", "));
        }
        for reason in &self.not_ready {
            let _ = writeln!(out, "not ready: {reason}");
        }
        let _ = writeln!(out, "{}", self.socket_lb.render());
        let _ = writeln!(out, "{}", self.passive_health.render());
        let ct = &self.conntrack;
        if !ct.nat_sources.is_empty() {
            let _ = writeln!(
                out,
                "flows {} (last sweep); NAT ports {}{}; sweeps {}: expired {}, reverse recovered {}, orphans freed {}",
                ct.flows,
                ct.nat_sources[0],
                if ct.nat_sources.len() > 1 {
                    format!(" (earlier, flows live: {})", ct.nat_sources[1..].join(", "))
                } else {
                    String::new()
                },
                ct.sweeps,
                ct.expired,
                ct.reverse_recovered,
                ct.orphans_freed
            );
        }
        if let Some(vrrp) = &self.vrrp {
            let _ = writeln!(
                out,
                "VRRP v{} vrid {}: {} (priority {} of {}), master {}, {} {}ms, {} transitions, {} in state; adverts sent {} received {}, dropped: unknown source {} bad TTL {} malformed {}",
                vrrp.version,
                vrrp.vrid,
                vrrp.state,
                vrrp.priority,
                vrrp.configured_priority,
                vrrp.master.as_deref().unwrap_or("unknown"),
                vrrp.mode,
                vrrp.advert_interval_ms,
                vrrp.transitions,
                duration(vrrp.seconds_in_state),
                vrrp.adverts_sent,
                vrrp.adverts_received,
                vrrp.dropped_unknown_source,
                vrrp.dropped_bad_ttl,
                vrrp.dropped_malformed
            );
        }
        for vip in &self.vips {
            let _ = writeln!(
                out,
                "\nVIP {} {}/{}  mode {}  owner {}{}  packets {} bytes {} flows {}",
                vip.name,
                SocketAddr::new(vip.address, vip.port),
                vip.protocol,
                vip.mode,
                vip.owner,
                if vip.fail_open {
                    "  FAIL-OPEN: every backend is down, traffic goes to all"
                } else {
                    ""
                },
                vip.traffic.packets,
                vip.traffic.bytes,
                vip.traffic.flows
            );
            let _ = writeln!(
                out,
                "  {:<21} {:>6}  {:<11} {:>7}  {:<32} {:>9}  {:>7} {:>9}",
                "BACKEND", "WEIGHT", "STATE", "FOR", "LAST CHECK", "LATENCY", "FLOWS", "PACKETS"
            );
            for backend in &vip.backends {
                let (check, latency) = match &backend.last_check {
                    Some(last) => {
                        let mut text = format!("{} {}", last.result, last.detail);
                        text.truncate(32);
                        (text, format!("{:.1}ms", last.latency_ms))
                    }
                    None => ("-".to_string(), "-".to_string()),
                };
                let _ = writeln!(
                    out,
                    "  {:<21} {:>6}  {:<11} {:>7}  {:<32} {:>9}  {:>7} {:>9}",
                    SocketAddr::new(backend.address, backend.port).to_string(),
                    backend.weight,
                    backend.state,
                    duration(backend.in_state_seconds),
                    check,
                    latency,
                    backend.traffic.flows,
                    backend.traffic.packets
                );
                if let Some(reason) = &backend.out_reason {
                    let _ = writeln!(out, "    {reason}");
                }
            }
        }
        if !self.verdicts.is_empty() {
            let verdicts: Vec<String> = self
                .verdicts
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            let _ = writeln!(out, "\nverdicts: {}", verdicts.join(" "));
        }
        if !self.events.is_empty() {
            let events: Vec<String> = self
                .events
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            let _ = writeln!(out, "events: {}", events.join(" "));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_keep_their_json_spelling() {
        let report = StatusReport {
            lb_address: IpAddr::from([10, 0, 0, 2]),
            vips: vec![VipStatus {
                address: IpAddr::from([10, 0, 0, 254]),
                backends: vec![BackendStatus {
                    address: IpAddr::from([10, 0, 0, 11]),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        };
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["lb_address"], "10.0.0.2");
        assert_eq!(json["vips"][0]["address"], "10.0.0.254");
        assert_eq!(json["vips"][0]["backends"][0]["address"], "10.0.0.11");
        // And the strings an earlier agent sent read back.
        let back: StatusReport = serde_json::from_value(json).unwrap();
        assert_eq!(
            back.vips[0].backends[0].address,
            IpAddr::from([10, 0, 0, 11])
        );
    }

    #[test]
    fn the_table_shows_states_checks_and_fail_open() {
        let report = StatusReport {
            interface: "eth0".into(),
            xdp_mode: Some(AttachedMode::Native),
            egress_translation: true,
            egress_verdicts: BTreeMap::new(),
            lb_address: IpAddr::from([10, 0, 0, 2]),
            uptime_seconds: 75.0,
            vrrp: None,
            vips: vec![VipStatus {
                name: "apiserver".into(),
                address: IpAddr::from([10, 0, 0, 254]),
                port: 6443,
                protocol: crate::config::Protocol::Tcp,
                mode: crate::config::Mode::Nat,
                owner: "static".into(),
                fail_open: true,
                traffic: Traffic {
                    packets: 10,
                    bytes: 600,
                    flows: 2,
                },
                backends: vec![BackendStatus {
                    address: IpAddr::from([10, 0, 0, 11]),
                    port: 6443,
                    weight: 1,
                    state: crate::status::BackendState::Down,
                    in_state_seconds: 3.0,
                    checks: 7,
                    last_check: Some(LastCheck {
                        result: "fail".into(),
                        latency_ms: 0.42,
                        detail: "connection refused".into(),
                        seconds_ago: 0.1,
                    }),
                    traffic: Traffic {
                        packets: 10,
                        bytes: 600,
                        flows: 2,
                    },
                    suspect: None,
                    out_reason: Some(
                        "down: its check fails (connection refused); its flows move".into(),
                    ),
                }],
            }],
            verdicts: BTreeMap::from([("forward_tx".to_string(), 10)]),
            events: BTreeMap::new(),
            not_ready: vec!["not checked yet: apiserver/10.0.0.12:6443".into()],
            conntrack: ConntrackStatus {
                nat_sources: vec!["10.0.0.2:20000-32767".into(), "10.0.0.2:10000-32767".into()],
                flows: 30,
                sweeps: 4,
                expired: 2,
                reverse_recovered: 1,
                orphans_freed: 3,
                sessions_reset: 2,
            },
            data_path_unanswered: false,
            program: ProgramStatus {
                start: crate::handover::StartKind::Upgraded,
                tag: "00112233aabbccdd".into(),
                replaced_tag: Some("0011223344556677".into()),
                on_stop: crate::handover::StopIntent::Keep,
            },
            reloads: BTreeMap::from([(ReloadOutcome::Applied, 2), (ReloadOutcome::RolledBack, 1)]),
            socket_lb: SocketLbStatus {
                enabled: true,
                attached: true,
                cgroup: Some("/sys/fs/cgroup/unified".into()),
                cgroup_source: Some(crate::cgroup::CgroupSource::Mounted),
                cgroup_is_root: true,
                error: None,
                events: BTreeMap::from([("connect_balanced".to_string(), 12)]),
            },
            passive_health: PassiveHealthStatus::default(),
        };
        let table = report.render();
        assert!(
            table.contains(
                "socket LB: attached to /sys/fs/cgroup/unified (cgroup2 root); connect_balanced 12"
            ),
            "{table}"
        );
        assert!(
            table.contains("reloads: applied 2, rolled_back 1"),
            "{table}"
        );
        assert!(
            table.contains(
                "program tag 00112233aabbccdd (upgraded from tag 0011223344556677), on stop: keep"
            ),
            "{table}"
        );
        assert!(
            table.contains(
                "flows 30 (last sweep); NAT ports 10.0.0.2:20000-32767 (earlier, flows live: 10.0.0.2:10000-32767); \
                 sweeps 4: expired 2, reverse recovered 1, orphans freed 3"
            ),
            "{table}"
        );
        assert!(
            table.contains("not ready: not checked yet: apiserver/10.0.0.12:6443"),
            "{table}"
        );
        assert!(table.contains("up 1m15s"), "{table}");
        let failed = SocketLbStatus {
            enabled: true,
            error: Some("no cgroup2 mount".into()),
            ..SocketLbStatus::default()
        };
        assert_eq!(failed.render(), "socket LB: NOT ATTACHED: no cgroup2 mount");
        assert_eq!(
            SocketLbStatus::default().render(),
            "socket LB: disabled (socket_lb.enabled: false)"
        );
        assert!(table.contains("FAIL-OPEN"), "{table}");
        assert!(table.contains("10.0.0.11:6443"), "{table}");
        // Typed states keep the table's columns (their Display pads).
        assert!(
            table.contains(
                "  10.0.0.11:6443             1  down             3s  fail connection refused"
            ),
            "{table}"
        );
        assert!(table.contains("fail connection refused"), "{table}");
        assert!(
            table.contains("\n    down: its check fails (connection refused); its flows move\n"),
            "{table}"
        );
        assert!(table.contains("0.4ms"), "{table}");
        assert!(table.contains("verdicts: forward_tx=10"), "{table}");
    }

    #[test]
    fn why_a_backend_is_out_reads_clearly() {
        let refused = LastCheck {
            result: "fail".into(),
            detail: "connection refused".into(),
            ..LastCheck::default()
        };
        let suspect = SuspectStatus {
            reason: "rst_to_syn".into(),
            seconds_ago: 0.25,
        };
        assert_eq!(out_reason(BackendState::Up, None, None, None), None);
        assert_eq!(
            out_reason(BackendState::Up, None, Some(&suspect), None).as_deref(),
            Some("suspect: rst_to_syn 0.2s ago; no new flows until its confirming check passes")
        );
        assert_eq!(
            out_reason(BackendState::Down, Some(&refused), None, Some("rst_to_syn")).as_deref(),
            Some(
                "down: the data path saw rst_to_syn and the confirming check failed (connection refused): \
                 down at once; its flows move"
            )
        );
        assert_eq!(
            out_reason(BackendState::Down, Some(&refused), None, None).as_deref(),
            Some("down: its check fails (connection refused); its flows move")
        );
        let not_ready = LastCheck {
            detail: "status 500".into(),
            ..LastCheck::default()
        };
        assert!(
            out_reason(BackendState::Draining, Some(&not_ready), None, None).is_some_and(
                |r| r.starts_with("draining: it answers but is not ready (status 500)")
            )
        );
        assert!(
            out_reason(
                BackendState::Maintenance,
                Some(&refused),
                Some(&suspect),
                None
            )
            .is_some_and(|r| r.starts_with("maintenance: drained by an operator"))
        );
    }

    #[test]
    fn the_table_shows_suspects_and_passive_health() {
        let report = StatusReport {
            passive_health: PassiveHealthStatus {
                enabled: true,
                events: BTreeMap::from([("rst_to_syn".to_string(), 3)]),
                suspects_cleared: 1,
                suspects_confirmed: 2,
            },
            vips: vec![VipStatus {
                name: "apiserver".into(),
                backends: vec![BackendStatus {
                    address: IpAddr::from([10, 0, 0, 11]),
                    port: 6443,
                    suspect: Some(SuspectStatus {
                        reason: "rst_to_syn".into(),
                        seconds_ago: 0.5,
                    }),
                    out_reason: Some("suspect: rst_to_syn 0.5s ago; no new flows until its confirming check passes".into()),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        };
        let table = report.render();
        assert!(
            table.contains(
                "passive health: on; suspicions rst_to_syn 3; suspects cleared 1, confirmed down 2"
            ),
            "{table}"
        );
        assert!(
            table.contains("\n    suspect: rst_to_syn 0.5s ago; no new flows"),
            "{table}"
        );
        let json = serde_json::to_value(&report).unwrap();
        let backend = &json["vips"][0]["backends"][0];
        assert_eq!(backend["suspect"]["reason"], "rst_to_syn");
        assert_eq!(json["passive_health"]["suspects_confirmed"], 2);
        assert_eq!(
            PassiveHealthStatus::default().render(),
            "passive health: off (the XDP program has no SUSPECT map)"
        );
    }
}
