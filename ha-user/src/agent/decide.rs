//! The reconciler's decisions, pure: plain values in, plain values out,
//! unit-tested without root. The rest of `agent/` gathers the inputs
//! and carries the outputs out.

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    net::{IpAddr, SocketAddr},
};

use crate::{
    config::{BackendConfig, Config, TrackAction, TrackConfig, VipConfig},
    dataplane::{DesiredBackend, DesiredVip},
    health::{CheckResult, Health},
};

/// One backend of one VIP: what a probe task checks and the reconciler tracks.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendKey {
    pub vip: String,
    pub address: IpAddr,
    pub port: u16,
}

impl BackendKey {
    /// The key of `backend`, one of `vip`'s.
    pub fn of(vip: &VipConfig, backend: &BackendConfig) -> Self {
        BackendKey {
            vip: vip.name.clone(),
            address: backend.address,
            port: backend.port(),
        }
    }
}

/// Every configured backend, with its key and its VIP, in the config's order.
pub fn backends(config: &Config) -> impl Iterator<Item = (BackendKey, &VipConfig, &BackendConfig)> {
    config.vips.iter().flat_map(|vip| {
        vip.backends
            .iter()
            .map(move |backend| (BackendKey::of(vip, backend), vip, backend))
    })
}

impl std::fmt::Display for BackendKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // `vip/10.0.0.11:6443`; an IPv6 address would be bracketed.
        write!(
            f,
            "{}/{}",
            self.vip,
            SocketAddr::new(self.address, self.port)
        )
    }
}

/// What the data plane should serve, and which VIPs fail open.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Desired {
    pub vips: Vec<DesiredVip>,
    /// VIPs with no backend up and not in maintenance: traffic goes to all.
    pub failing_open: BTreeSet<String>,
}

/// The desired data-plane state (docs/health-checks.md, "Fail open"):
/// - a backend takes new flows (its weight) when it is up and not drained;
///   draining, down and drained ones get weight 0 and keep their record, so
///   their flows stay valid;
/// - a down one is also flagged down, which moves its flows, except while
///   its VIP fails open;
/// - a VIP none of whose backends can take new flows fails open: every
///   backend an operator did not drain takes them (all of them, when every
///   one is drained), except the dead: while some backend still answers its
///   check (draining: not ready), one whose check fails at the transport
///   level (down: refused, reset, timeout) takes none and its flows move,
///   since a connection to it is refused anyway;
/// - a backend whose address is this host's is local; the VIPs are enabled
///   while this host holds them.
///
/// `health`: backends without an entry are up (checks start optimistic, as
/// haproxy's); `maintenance`: drained backends.
pub fn desired_state(
    config: &Config,
    health: &BTreeMap<BackendKey, Health>,
    maintenance: &BTreeSet<BackendKey>,
    local: &HashSet<IpAddr>,
    holding: bool,
) -> Desired {
    let mut vips = Vec::new();
    let mut failing_open = BTreeSet::new();
    for vip in &config.vips {
        let state = |backend: &BackendConfig| {
            let key = BackendKey::of(vip, backend);
            let health = health.get(&key).copied().unwrap_or(Health::Up);
            (health, maintenance.contains(&key))
        };
        let eligible = vip.backends.iter().filter(|b| {
            let (health, maintenance) = state(b);
            health == Health::Up && !maintenance && b.weight > 0
        });
        let fail_open = eligible.count() == 0;
        if fail_open {
            failing_open.insert(vip.name.clone());
        }
        let all_in_maintenance = vip.backends.iter().all(|b| state(b).1);
        // Failing open while some backend answers (not ready): the dead are left out.
        let some_answer = vip.backends.iter().any(|b| {
            let (health, maintenance) = state(b);
            health == Health::Draining && !maintenance && b.weight > 0
        });
        let dead_left_out = fail_open && some_answer;
        let backends = vip
            .backends
            .iter()
            .map(|b| {
                let (health, maintenance) = state(b);
                let serving = if dead_left_out {
                    !maintenance && health != Health::Down
                } else if fail_open {
                    // Fail open: every backend an operator did not take out.
                    !maintenance || all_in_maintenance
                } else {
                    health == Health::Up && !maintenance
                };
                DesiredBackend {
                    address: b.address,
                    port: b.port(),
                    weight: if serving { b.weight } else { 0 },
                    local: local.contains(&b.address),
                    down: (!fail_open || dead_left_out) && health == Health::Down,
                }
            })
            .collect();
        vips.push(DesiredVip {
            name: vip.name.clone(),
            address: vip.address,
            port: vip.port,
            protocol: vip.protocol.number(),
            enabled: holding,
            backends,
        });
    }
    Desired { vips, failing_open }
}

/// Whether a backend at one of this host's addresses (`local`) is down by
/// its check, for `track.local_backend_down`: the stacked layout's local
/// apiserver failing. A drained backend (the operator's maintenance) and one
/// merely not ready (draining) do not count; unchecked ones count as up.
pub fn local_backend_down(
    health: &BTreeMap<BackendKey, Health>,
    maintenance: &BTreeSet<BackendKey>,
    local: &HashSet<IpAddr>,
) -> bool {
    health.iter().any(|(key, health)| {
        *health == Health::Down && local.contains(&key.address) && !maintenance.contains(key)
    })
}

/// What VRRP tracking looks at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TrackedState {
    pub link_up: bool,
    pub xdp_attached: bool,
    /// Some VIP has no backend up (it fails open).
    pub no_healthy_backend: bool,
    /// A backend at one of this host's addresses is down by its check.
    pub local_backend_down: bool,
}

/// VRRP tracking (docs/vrrp.md, "Tracking"): the priority to advertise and
/// whether to be in fault. The interface down or the program detached is a
/// fault; a VIP without a backend up, and (when `track.local_backend_down`
/// is set) this host's own backend down, each is a fault or lowers the
/// priority by its `n`, as its rule says; decreases add up (as keepalived's
/// tracked scripts' weights do), never below 1.
pub fn tracked(configured: u8, track: &TrackConfig, state: TrackedState) -> Tracking {
    let mut fault = !state.link_up || !state.xdp_attached;
    let mut priority = configured;
    let rules = [
        (state.no_healthy_backend, Some(track.no_healthy_backend)),
        (state.local_backend_down, track.local_backend_down),
    ];
    for (holds, action) in rules {
        match (holds, action) {
            (true, Some(TrackAction::Fault)) => fault = true,
            (true, Some(TrackAction::Decrease(n))) => priority = priority.saturating_sub(n).max(1),
            _ => {}
        }
    }
    Tracking { priority, fault }
}

/// What VRRP tracking tells the announcer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tracking {
    /// The priority to advertise.
    pub priority: u8,
    /// Go to (or stay in) the fault state.
    pub fault: bool,
}

/// VRRP's part in readiness.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VrrpReadiness {
    pub link_up: bool,
    pub xdp_attached: bool,
    pub fault: bool,
}

/// What readiness looks at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Readiness<'a> {
    pub iface: &'a str,
    /// `None` without VRRP.
    pub vrrp: Option<VrrpReadiness>,
    /// Backends (not drained) without a finished check, as `vip/address:port`.
    pub unchecked: Vec<String>,
    /// The interface's forwarding sysctl (`None`: unreadable).
    pub forwarding_on: Option<bool>,
    /// The black-hole detector's reason, if it found one.
    pub blackhole: Option<String>,
}

/// Backends that are not drained and have no finished check yet.
pub fn unchecked(
    keys: &[BackendKey],
    maintenance: &BTreeSet<BackendKey>,
    checks: &BTreeMap<BackendKey, u64>,
) -> Vec<String> {
    keys.iter()
        .filter(|key| !maintenance.contains(key))
        .filter(|key| checks.get(key).is_none_or(|n| *n == 0))
        .map(|key| key.to_string())
        .collect()
}

/// Why the agent is not ready (empty: ready), what `/readyz` answers
/// (docs/operations.md, "Telemetry"): the interface down, the program
/// detached or VRRP in fault; a backend not checked yet; forwarding
/// switched off; the data path's packets unanswered.
pub fn not_ready(readiness: &Readiness<'_>) -> Vec<String> {
    let iface = readiness.iface;
    let mut reasons = Vec::new();
    if let Some(vrrp) = readiness.vrrp {
        if !vrrp.link_up {
            reasons.push(format!("interface {iface} is down"));
        }
        if !vrrp.xdp_attached {
            reasons.push(format!("the XDP program is no longer attached to {iface}"));
        }
        if vrrp.fault {
            reasons.push("VRRP is in fault".to_string());
        }
    }
    if !readiness.unchecked.is_empty() {
        reasons.push(format!(
            "not checked yet: {}",
            readiness.unchecked.join(", ")
        ));
    }
    if readiness.forwarding_on == Some(false) {
        reasons.push(format!(
            "IPv4 forwarding is off on {iface}: the kernel's FIB refuses to answer the data \
             path, which drops every packet it would forward (drop_forwarding_disabled); \
             the agent switched it on at start and something switched it off since \
             (sysctl -w net.ipv4.conf.{iface}.forwarding=1)"
        ));
    }
    reasons.extend(readiness.blackhole.clone());
    reasons
}

/// What a reload changes (vector's config diff is the model): VIPs and
/// backends by name and address, for the reload's log line and answer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConfigDiff {
    pub vips_added: Vec<String>,
    pub vips_removed: Vec<String>,
    /// In both, with another address, port, protocol, mode or check.
    pub vips_changed: Vec<String>,
    pub backends_added: Vec<BackendKey>,
    pub backends_removed: Vec<BackendKey>,
    /// In both, with another weight.
    pub backends_reweighted: Vec<BackendKey>,
    /// Something outside the VIPs changed (data plane settings, VRRP,
    /// gratuitous ARP, telemetry).
    pub other: bool,
}

impl ConfigDiff {
    pub fn is_empty(&self) -> bool {
        *self == ConfigDiff::default()
    }
}

impl std::fmt::Display for ConfigDiff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_empty() {
            return f.write_str("no change");
        }
        let mut parts = Vec::new();
        for (sign, names) in [
            ('+', &self.vips_added),
            ('-', &self.vips_removed),
            ('~', &self.vips_changed),
        ] {
            if !names.is_empty() {
                parts.push(format!("VIPs {sign}{}", names.join(&format!(" {sign}"))));
            }
        }
        for (what, keys) in [
            ("added", &self.backends_added),
            ("removed", &self.backends_removed),
            ("reweighted", &self.backends_reweighted),
        ] {
            if !keys.is_empty() {
                let keys: Vec<String> = keys.iter().map(ToString::to_string).collect();
                parts.push(format!("backends {what}: {}", keys.join(", ")));
            }
        }
        if self.other {
            parts.push("settings outside the VIPs changed".to_string());
        }
        f.write_str(&parts.join("; "))
    }
}

/// The difference from the running config `old` to `new`.
pub fn config_diff(old: &Config, new: &Config) -> ConfigDiff {
    let mut diff = ConfigDiff::default();
    let weights = |config: &Config| -> BTreeMap<BackendKey, u32> {
        backends(config)
            .map(|(key, _, backend)| (key, backend.weight))
            .collect()
    };
    for vip in &new.vips {
        match old.vips.iter().find(|o| o.name == vip.name) {
            None => diff.vips_added.push(vip.name.clone()),
            Some(o) => {
                let without_backends = |v: &crate::config::VipConfig| crate::config::VipConfig {
                    backends: Vec::new(),
                    ..v.clone()
                };
                if without_backends(o) != without_backends(vip) {
                    diff.vips_changed.push(vip.name.clone());
                }
            }
        }
    }
    for vip in &old.vips {
        if !new.vips.iter().any(|n| n.name == vip.name) {
            diff.vips_removed.push(vip.name.clone());
        }
    }
    let (before, after) = (weights(old), weights(new));
    for (key, weight) in &after {
        match before.get(key) {
            None => diff.backends_added.push(key.clone()),
            Some(w) if w != weight => diff.backends_reweighted.push(key.clone()),
            Some(_) => {}
        }
    }
    diff.backends_removed = before
        .keys()
        .filter(|key| !after.contains_key(*key))
        .cloned()
        .collect();
    diff.other = Config {
        vips: Vec::new(),
        ..old.clone()
    } != Config {
        vips: Vec::new(),
        ..new.clone()
    };
    diff
}

/// Why the data path suspected a backend (`PassiveEvent::reason`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PassiveReason {
    /// The backend answered a client's SYN with a RST.
    RstToSyn,
    /// An ICMP destination unreachable about a SYN sent to the backend.
    IcmpUnreachable,
    /// A reason this agent does not know (a newer data path).
    Unknown(u32),
}

impl PassiveReason {
    pub fn from_wire(reason: u32) -> Self {
        match reason {
            ha_common::PASSIVE_REASON_RST_TO_SYN => PassiveReason::RstToSyn,
            ha_common::PASSIVE_REASON_ICMP_UNREACHABLE => PassiveReason::IcmpUnreachable,
            other => PassiveReason::Unknown(other),
        }
    }

    /// The label of status, logs and `/metrics`.
    pub fn label(self) -> &'static str {
        match self {
            PassiveReason::RstToSyn => "rst_to_syn",
            PassiveReason::IcmpUnreachable => "icmp_unreachable",
            PassiveReason::Unknown(_) => "unknown",
        }
    }
}

/// What a suspected backend's confirming check decides (docs/health-checks.md,
/// "Passive health").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SuspectResolution {
    /// The check passes: the refusal was a moment's (a restart, a full accept
    /// queue); the suspect flag is cleared and the backend takes new flows.
    Cleared,
    /// The check fails at the transport level (refused, reset, timeout): the
    /// client's refusal and the check agree, the backend is down at once
    /// ([`crate::health::Checker::confirm`]); its flows move.
    Confirmed,
    /// It answers but is not ready: the normal rules (draining after
    /// `fall`); the suspect flag is left to expire (`SUSPECT_TTL_NS`).
    Undecided,
}

pub fn resolve_suspect(result: CheckResult) -> SuspectResolution {
    match result {
        CheckResult::Pass => SuspectResolution::Cleared,
        CheckResult::Fail => SuspectResolution::Confirmed,
        CheckResult::NotReady => SuspectResolution::Undecided,
    }
}

/// Whether a suspicion at `since` still holds `now`: the data path honours
/// the flag for [`ha_common::SUSPECT_TTL_NS`], the agent shows it as long.
pub fn suspect_live(since: std::time::Instant, now: std::time::Instant) -> bool {
    now.saturating_duration_since(since).as_nanos() < u128::from(ha_common::SUSPECT_TTL_NS)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEALTHY: TrackedState = TrackedState {
        link_up: true,
        xdp_attached: true,
        no_healthy_backend: false,
        local_backend_down: false,
    };

    /// `no_healthy_backend: action`, no local-backend rule.
    fn track(action: TrackAction) -> TrackConfig {
        TrackConfig {
            no_healthy_backend: action,
            local_backend_down: None,
        }
    }

    fn config() -> Config {
        Config::from_yaml(
            "vips:\n  - name: api\n    address: 10.0.0.100\n    port: 6443\n    backends:\n      \
             - address: 10.0.0.11\n      - address: 10.0.0.12\n      - {address: 10.0.0.13, weight: 2}\n",
            "test",
        )
        .unwrap()
    }

    fn key(last: u8) -> BackendKey {
        BackendKey {
            vip: "api".into(),
            address: IpAddr::from([10, 0, 0, last]),
            port: 6443,
        }
    }

    /// (weight, down) per backend of the only VIP.
    fn shape(desired: &Desired) -> Vec<(u32, bool)> {
        desired.vips[0]
            .backends
            .iter()
            .map(|b| (b.weight, b.down))
            .collect()
    }

    fn decide(health: &[(u8, Health)], drained: &[u8]) -> Desired {
        let health = health.iter().map(|(last, h)| (key(*last), *h)).collect();
        let drained = drained.iter().map(|last| key(*last)).collect();
        desired_state(&config(), &health, &drained, &HashSet::new(), true)
    }

    #[test]
    fn up_backends_keep_their_weights_and_unchecked_ones_count_as_up() {
        let desired = decide(&[(11, Health::Up)], &[]);
        assert_eq!(shape(&desired), [(1, false), (1, false), (2, false)]);
        assert!(desired.failing_open.is_empty());
        assert!(desired.vips[0].enabled);
    }

    #[test]
    fn draining_down_and_drained_backends_take_no_new_flows_and_only_down_ones_move_theirs() {
        let desired = decide(&[(11, Health::Draining), (12, Health::Down)], &[13]);
        // Nothing left to take new flows: fail open, below.
        assert_eq!(desired.failing_open, BTreeSet::from(["api".to_string()]));
        let desired = decide(&[(11, Health::Draining), (12, Health::Down)], &[]);
        assert_eq!(shape(&desired), [(0, false), (0, true), (2, false)]);
        assert!(desired.failing_open.is_empty());
    }

    #[test]
    fn failing_open_leaves_out_the_dead_while_some_backend_answers() {
        // All not ready (an etcd hiccup), then one process dies: the dead one
        // takes no new flows and its flows move; the not-ready ones serve.
        let desired = decide(
            &[
                (11, Health::Draining),
                (12, Health::Down),
                (13, Health::Draining),
            ],
            &[],
        );
        assert_eq!(desired.failing_open, BTreeSet::from(["api".to_string()]));
        assert_eq!(shape(&desired), [(1, false), (0, true), (2, false)]);
        // A drained one that answers does not count as answering for the VIP.
        let desired = decide(
            &[
                (11, Health::Draining),
                (12, Health::Down),
                (13, Health::Down),
            ],
            &[11],
        );
        assert_eq!(shape(&desired), [(0, false), (1, false), (2, false)]);
        // Nothing answers at all (the checks may be what is broken): every one serves.
        let all_down = [(11, Health::Down), (12, Health::Down), (13, Health::Down)];
        assert_eq!(
            shape(&decide(&all_down, &[])),
            [(1, false), (1, false), (2, false)]
        );
    }

    #[test]
    fn a_vip_with_no_backend_up_fails_open_to_every_backend_not_drained() {
        let all_down = [(11, Health::Down), (12, Health::Down), (13, Health::Down)];
        let desired = decide(&all_down, &[12]);
        assert_eq!(desired.failing_open, BTreeSet::from(["api".to_string()]));
        // No down flag while failing open: their flows stay where they are.
        assert_eq!(shape(&desired), [(1, false), (0, false), (2, false)]);
        // Every one drained: all of them.
        let desired = decide(&all_down, &[11, 12, 13]);
        assert_eq!(shape(&desired), [(1, false), (1, false), (2, false)]);
    }

    #[test]
    fn local_backends_are_marked_and_the_vips_follow_holding() {
        let local = HashSet::from([IpAddr::from([10, 0, 0, 12])]);
        let desired = desired_state(&config(), &BTreeMap::new(), &BTreeSet::new(), &local, false);
        let locals: Vec<bool> = desired.vips[0].backends.iter().map(|b| b.local).collect();
        assert_eq!(locals, [false, true, false]);
        assert!(!desired.vips[0].enabled, "not holding: disabled");
    }

    #[test]
    fn readiness_names_every_reason_and_is_empty_when_all_is_well() {
        let ready = Readiness {
            iface: "eth0",
            vrrp: Some(VrrpReadiness {
                link_up: true,
                xdp_attached: true,
                fault: false,
            }),
            unchecked: Vec::new(),
            forwarding_on: Some(true),
            blackhole: None,
        };
        assert!(not_ready(&ready).is_empty());
        let all_wrong = Readiness {
            vrrp: Some(VrrpReadiness {
                link_up: false,
                xdp_attached: false,
                fault: true,
            }),
            unchecked: vec!["api/10.0.0.11:6443".into()],
            forwarding_on: Some(false),
            blackhole: Some("the data path's packets go unanswered".into()),
            ..ready.clone()
        };
        let reasons = not_ready(&all_wrong);
        assert_eq!(reasons.len(), 6, "{reasons:?}");
        assert_eq!(reasons[0], "interface eth0 is down");
        assert!(reasons[1].contains("no longer attached to eth0"));
        assert_eq!(reasons[2], "VRRP is in fault");
        assert_eq!(reasons[3], "not checked yet: api/10.0.0.11:6443");
        assert!(reasons[4].contains("forwarding is off on eth0"));
        assert!(reasons[5].contains("unanswered"));
        // Without VRRP, and forwarding unreadable: neither counts.
        let static_vip = Readiness {
            vrrp: None,
            forwarding_on: None,
            ..ready
        };
        assert!(not_ready(&static_vip).is_empty());
    }

    #[test]
    fn a_backend_is_unchecked_until_its_first_check_unless_drained() {
        let keys = [key(11), key(12), key(13)];
        let checks = BTreeMap::from([(key(11), 3), (key(12), 0)]);
        let drained = BTreeSet::from([key(13)]);
        assert_eq!(
            unchecked(&keys, &drained, &checks),
            ["api/10.0.0.12:6443"],
            "12 has no finished check; 13 is drained"
        );
    }

    #[test]
    fn tracking_faults_on_a_down_link_or_a_detached_program() {
        assert_eq!(
            tracked(150, &track(TrackAction::Decrease(50)), HEALTHY),
            Tracking {
                priority: 150,
                fault: false
            }
        );
        for state in [
            TrackedState {
                link_up: false,
                ..HEALTHY
            },
            TrackedState {
                xdp_attached: false,
                ..HEALTHY
            },
        ] {
            assert_eq!(
                tracked(150, &track(TrackAction::Decrease(50)), state),
                Tracking {
                    priority: 150,
                    fault: true
                }
            );
        }
    }

    #[test]
    fn tracking_a_vip_without_a_backend_up_lowers_the_priority_or_faults() {
        let none_up = TrackedState {
            no_healthy_backend: true,
            ..HEALTHY
        };
        assert_eq!(
            tracked(150, &track(TrackAction::Decrease(50)), none_up),
            Tracking {
                priority: 100,
                fault: false
            }
        );
        assert_eq!(
            tracked(30, &track(TrackAction::Decrease(50)), none_up),
            Tracking {
                priority: 1,
                fault: false
            },
            "never below 1 (0 means leaving)"
        );
        assert_eq!(
            tracked(150, &track(TrackAction::Fault), none_up),
            Tracking {
                priority: 150,
                fault: true
            }
        );
    }

    #[test]
    fn tracking_this_hosts_own_backend_down_acts_only_when_the_rule_is_set() {
        let local_down = TrackedState {
            local_backend_down: true,
            ..HEALTHY
        };
        let at = |priority, fault| Tracking { priority, fault };
        // Off by default: the stacked layout asks for it.
        assert_eq!(
            tracked(150, &TrackConfig::default(), local_down),
            at(150, false)
        );
        let decrease = TrackConfig {
            local_backend_down: Some(TrackAction::Decrease(60)),
            ..TrackConfig::default()
        };
        assert_eq!(tracked(150, &decrease, local_down), at(90, false));
        assert_eq!(tracked(150, &decrease, HEALTHY), at(150, false));
        let fault = TrackConfig {
            local_backend_down: Some(TrackAction::Fault),
            ..TrackConfig::default()
        };
        assert_eq!(tracked(150, &fault, local_down), at(150, true));
    }

    #[test]
    fn a_local_backend_is_down_only_by_its_check_and_not_when_drained() {
        let local: HashSet<IpAddr> = [IpAddr::from([10, 0, 0, 12])].into();
        let with = |h: Health| BTreeMap::from([(key(11), Health::Down), (key(12), h)]);
        let none = BTreeSet::new();
        assert!(local_backend_down(&with(Health::Down), &none, &local));
        assert!(
            !local_backend_down(&with(Health::Up), &none, &local),
            "a remote backend down is not local"
        );
        assert!(
            !local_backend_down(&with(Health::Draining), &none, &local),
            "not ready is not down"
        );
        let drained = BTreeSet::from([key(12)]);
        assert!(!local_backend_down(&with(Health::Down), &drained, &local));
    }

    #[test]
    fn tracking_decreases_of_both_rules_add_up_and_stay_at_least_1() {
        let both = TrackedState {
            no_healthy_backend: true,
            local_backend_down: true,
            ..HEALTHY
        };
        let track = TrackConfig {
            no_healthy_backend: TrackAction::Decrease(50),
            local_backend_down: Some(TrackAction::Decrease(60)),
        };
        assert_eq!(
            tracked(150, &track, both),
            Tracking {
                priority: 40,
                fault: false
            }
        );
        assert_eq!(tracked(100, &track, both).priority, 1);
    }

    #[test]
    fn config_diff_names_vips_and_backends_added_removed_and_changed() {
        let old = config();
        assert!(config_diff(&old, &old).is_empty());
        assert_eq!(config_diff(&old, &old).to_string(), "no change");
        let new = Config::from_yaml(
            "vips:\n  - name: api\n    address: 10.0.0.100\n    port: 6443\n    backends:\n      \
             - address: 10.0.0.11\n      - {address: 10.0.0.13, weight: 3}\n      - address: 10.0.0.14\n  \
             - name: etcd\n    address: 10.0.0.101\n    port: 2379\n    backends:\n      - address: 10.0.0.11\n\
             garp:\n  count: 9\n",
            "test",
        )
        .unwrap();
        let diff = config_diff(&old, &new);
        assert_eq!(diff.vips_added, ["etcd"]);
        assert!(diff.vips_removed.is_empty() && diff.vips_changed.is_empty());
        assert_eq!(
            diff.backends_added,
            [
                key(14),
                BackendKey {
                    vip: "etcd".into(),
                    address: IpAddr::from([10, 0, 0, 11]),
                    port: 2379
                }
            ]
        );
        assert_eq!(diff.backends_removed, [key(12)]);
        assert_eq!(diff.backends_reweighted, [key(13)]);
        assert!(diff.other, "garp changed");
        let back = config_diff(&new, &old);
        assert_eq!(back.vips_removed, ["etcd"]);
        assert_eq!(back.backends_added, [key(12)]);
    }

    #[test]
    fn config_diff_sees_a_vip_whose_own_settings_changed() {
        let old = config();
        let mut new = old.clone();
        new.vips[0].port = 8443;
        let diff = config_diff(&old, &new);
        assert_eq!(diff.vips_changed, ["api"]);
        // Its backends keep their keys (the VIP's name), so none moves.
        assert!(diff.backends_added.is_empty() && diff.backends_removed.is_empty());
        assert!(!diff.other);
        assert_eq!(diff.to_string(), "VIPs ~api");
    }

    #[test]
    fn a_suspects_confirming_check_clears_confirms_or_leaves_it() {
        assert_eq!(
            resolve_suspect(CheckResult::Pass),
            SuspectResolution::Cleared
        );
        assert_eq!(
            resolve_suspect(CheckResult::Fail),
            SuspectResolution::Confirmed
        );
        assert_eq!(
            resolve_suspect(CheckResult::NotReady),
            SuspectResolution::Undecided
        );
    }

    #[test]
    fn passive_reasons_from_the_wire() {
        assert_eq!(
            PassiveReason::from_wire(ha_common::PASSIVE_REASON_RST_TO_SYN).label(),
            "rst_to_syn"
        );
        assert_eq!(
            PassiveReason::from_wire(ha_common::PASSIVE_REASON_ICMP_UNREACHABLE).label(),
            "icmp_unreachable"
        );
        assert_eq!(PassiveReason::from_wire(99), PassiveReason::Unknown(99));
    }

    #[test]
    fn a_suspicion_lasts_as_long_as_the_data_path_honours_it() {
        let since = std::time::Instant::now();
        let ttl = std::time::Duration::from_nanos(ha_common::SUSPECT_TTL_NS);
        assert!(suspect_live(since, since));
        assert!(suspect_live(since, since + ttl / 2));
        assert!(!suspect_live(since, since + ttl));
    }
}
