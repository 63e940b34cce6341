//! The status report (`ha-user status`, /readyz, /metrics), readiness, the black-hole check and the
//! periodic stats lines.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::IpAddr,
    time::Instant,
};

use ha_common::Verdict;
use tracing::{error, info};

use crate::{
    blackhole,
    handover::{self},
    health::Health,
    status::{
        self, BackendState, BackendStatus, ConntrackStatus, LastCheck, PassiveHealthStatus,
        StatusReport, SuspectStatus, Traffic, VipStatus,
    },
    vrrp::machine::State,
};

use super::{
    Agent,
    decide::{self, BackendKey},
};

impl Agent {
    pub(super) fn owner_label(&self) -> String {
        match &self.vrrp {
            None => "static".to_string(),
            Some(vrrp) => {
                let status = vrrp.status.borrow();
                match (status.state, &status.master) {
                    (State::Backup, Some(master)) => format!("vrrp backup (master {master})"),
                    (state, _) => format!("vrrp {state}"),
                }
            }
        }
    }

    pub(super) fn status(&self) -> StatusReport {
        let now = Instant::now();
        let traffic = self.dataplane.traffic().unwrap_or_default();
        let backend_traffic: HashMap<(IpAddr, u16), Traffic> = traffic
            .backends
            .iter()
            .map(|(key, c)| {
                (
                    *key,
                    Traffic {
                        packets: c.packets,
                        bytes: c.bytes,
                        flows: c.new_flows,
                    },
                )
            })
            .collect();
        let vip_traffic: HashMap<&str, Traffic> = traffic
            .vips
            .iter()
            .map(|(name, c)| {
                (
                    name.as_str(),
                    Traffic {
                        packets: c.packets,
                        bytes: c.bytes,
                        flows: c.new_flows,
                    },
                )
            })
            .collect();
        let vips =
            self.config
                .vips
                .iter()
                .map(|vip| VipStatus {
                    name: vip.name.clone(),
                    address: vip.address,
                    port: vip.port,
                    protocol: vip.protocol,
                    mode: vip.mode,
                    owner: self.owner_label(),
                    fail_open: self.failing_open.contains(&vip.name),
                    traffic: vip_traffic
                        .get(vip.name.as_str())
                        .copied()
                        .unwrap_or_default(),
                    backends: vip
                        .backends
                        .iter()
                        .map(|b| {
                            let key = BackendKey::of(vip, b);
                            let health = self.health.get(&key);
                            let state = BackendState::of(
                                health.map_or(Health::Up, |h| h.health),
                                self.maintenance.contains(&key),
                            );
                            let suspect = self.passive.suspect(b.address, b.port(), now).map(|s| {
                                SuspectStatus {
                                    reason: s.reason.label().to_string(),
                                    seconds_ago: now.duration_since(s.since).as_secs_f64(),
                                }
                            });
                            let last_check =
                                health.and_then(|h| h.last.as_ref()).map(|(outcome, at)| {
                                    LastCheck::from_outcome(
                                        outcome,
                                        now.duration_since(*at).as_secs_f64(),
                                    )
                                });
                            let out_reason = status::out_reason(
                                state,
                                last_check.as_ref(),
                                suspect.as_ref(),
                                health.and_then(|h| h.confirmed).map(|r| r.label()),
                            );
                            BackendStatus {
                                address: b.address,
                                port: b.port(),
                                weight: b.weight,
                                state,
                                suspect,
                                out_reason,
                                in_state_seconds: health
                                    .map_or(now.duration_since(self.started), |h| {
                                        now.duration_since(h.since)
                                    })
                                    .as_secs_f64(),
                                checks: health.map_or(0, |h| h.checks),
                                last_check,
                                traffic: backend_traffic
                                    .get(&(b.address, b.port()))
                                    .copied()
                                    .unwrap_or_default(),
                            }
                        })
                        .collect(),
                })
                .collect();
        StatusReport {
            socket_lb: crate::status::SocketLbStatus {
                events: self
                    .dataplane
                    .socket_lb_events()
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|(_, n)| *n > 0)
                    .map(|(e, n)| (e.label().to_string(), n))
                    .collect(),
                ..self.socket_lb.clone()
            },
            reloads: self.reloads.clone(),
            passive_health: PassiveHealthStatus {
                enabled: self.passive.enabled,
                events: self.passive.events.iter().fold(
                    std::collections::BTreeMap::new(),
                    |mut by_label, (reason, n)| {
                        *by_label.entry(reason.label().to_string()).or_default() += *n;
                        by_label
                    },
                ),
                suspects_cleared: self.passive.cleared,
                suspects_confirmed: self.passive.confirmed,
            },
            not_ready: self.not_ready(),
            data_path_unanswered: self.blackhole.finding().is_some(),
            program: {
                let (start, replaced) = self.dataplane.start_kind();
                crate::status::ProgramStatus {
                    start,
                    tag: handover::tag_hex(self.dataplane.program_tag()),
                    replaced_tag: replaced.map(handover::tag_hex),
                    on_stop: self.options.on_stop,
                }
            },
            vrrp: self.vrrp.as_ref().map(|v| v.status.borrow().clone()),
            interface: self.options.iface.clone(),
            xdp_mode: self.xdp_mode,
            egress_translation: self.dataplane.egress_attached(),
            egress_verdicts: self
                .dataplane
                .egress_verdicts()
                .unwrap_or_default()
                .into_iter()
                .filter(|(_, c)| c.packets > 0)
                .map(|(v, c)| (v.label().to_string(), c.packets))
                .collect(),
            lb_address: self.lb_addr,
            uptime_seconds: now.duration_since(self.started).as_secs_f64(),
            vips,
            verdicts: self
                .dataplane
                .verdicts()
                .unwrap_or_default()
                .into_iter()
                .filter(|(_, c)| c.packets > 0)
                .map(|(v, c)| (v.label().to_string(), c.packets))
                .collect(),
            events: self
                .dataplane
                .events()
                .unwrap_or_default()
                .into_iter()
                .filter(|(_, n)| *n > 0)
                .map(|(e, n)| (e.label().to_string(), n))
                .collect(),
            conntrack: {
                let totals = self.dataplane.sweep_totals();
                ConntrackStatus {
                    nat_sources: self
                        .dataplane
                        .nat_sources()
                        .iter()
                        .map(crate::dataplane::describe_range)
                        .collect(),
                    flows: totals.live,
                    sweeps: totals.sweeps,
                    expired: totals.expired,
                    reverse_recovered: totals.reverse_recovered,
                    orphans_freed: totals.orphans_freed,
                    sessions_reset: self.sessions_reset,
                }
            },
        }
    }

    /// Readiness: the program is attached and the interface up, VRRP is
    /// not in fault, and every backend has had its first check, so the
    /// answer no longer rests on the optimistic start state. Backends being
    /// down does not make the agent unready: it still fails open and hands
    /// the VIP over, and a DaemonSet rollout must not stall on an apiserver
    /// outage.
    pub(super) fn not_ready(&self) -> Vec<String> {
        let checks: BTreeMap<BackendKey, u64> = self
            .health
            .iter()
            .map(|(key, h)| (key.clone(), h.checks))
            .collect();
        decide::not_ready(&decide::Readiness {
            iface: &self.options.iface,
            vrrp: self.vrrp.as_ref().map(|vrrp| decide::VrrpReadiness {
                link_up: vrrp.link.up,
                xdp_attached: vrrp.link.xdp_attached,
                fault: vrrp.status.borrow().state == State::Fault,
            }),
            unchecked: decide::unchecked(&self.backend_keys(), &self.maintenance, &checks),
            forwarding_on: self.forwarding.still_on(),
            blackhole: self
                .blackhole
                .finding()
                .map(|finding| blackhole::reason(&self.options.iface, &finding, self.veth)),
        })
    }

    /// Feeds the black-hole detector a sample of the data path's counters
    /// and says what changed (docs/operations.md, "The data path is not answered").
    pub(super) fn check_data_path(&mut self) {
        let Ok(verdicts) = self.dataplane.verdicts() else {
            return;
        };
        let count = |wanted: &[Verdict]| -> u64 {
            verdicts
                .iter()
                .filter(|(v, _)| wanted.contains(v))
                .map(|(_, c)| c.packets)
                .sum()
        };
        let Ok(traffic) = self.dataplane.traffic() else {
            return;
        };
        let Ok(pickups) = self.dataplane.event(ha_common::Event::MidstreamPickup) else {
            return;
        };
        // New flows count only for backends that are expected to answer:
        // of a TCP VIP, not this host, up by their checks, not drained.
        let eligible: HashSet<(IpAddr, u16)> = decide::backends(&self.config)
            .filter(|(_, vip, _)| vip.protocol == crate::config::Protocol::Tcp)
            .map(|(key, ..)| key)
            .filter(|key| {
                !self.local_backends.contains(&key.address)
                    && !self.maintenance.contains(key)
                    && self
                        .health
                        .get(key)
                        .is_some_and(|h| h.health == Health::Up && h.checks > 0)
            })
            .map(|key| (key.address, key.port))
            .collect();
        let totals: Vec<((IpAddr, u16), u64)> = traffic
            .backends
            .iter()
            .map(|(key, c)| (*key, c.new_flows))
            .collect();
        let new_flows = self.new_flow_totals.add(&totals, &eligible, pickups);
        let counters = blackhole::Counters {
            new_flows,
            forwarded: count(&[Verdict::ForwardTx, Verdict::ForwardRedirect]),
            answered: count(&[
                Verdict::ReplyTx,
                Verdict::ReplyRedirect,
                Verdict::IcmpReplyTx,
                Verdict::IcmpReplyRedirect,
                Verdict::DropReplyNoFlow,
            ]),
        };
        let pass_checks = !eligible.is_empty();
        let now = Instant::now();
        match self.blackhole.observe(now, counters, pass_checks) {
            Some(blackhole::Change::Found(finding)) => {
                let reason = blackhole::reason(&self.options.iface, &finding, self.veth);
                error!(iface = %self.options.iface, "{reason}");
            }
            Some(blackhole::Change::Cleared) => {
                info!(iface = %self.options.iface, "the data path is answered again");
            }
            None => {}
        }
    }

    pub(super) fn print_stats(&self) {
        let Ok(traffic) = self.dataplane.traffic() else {
            return;
        };
        for (name, counter) in &traffic.vips {
            println!(
                "stats vip={name} packets={} bytes={} flows={}",
                counter.packets, counter.bytes, counter.new_flows
            );
        }
        for ((address, port), counter) in &traffic.backends {
            println!(
                "stats backend={address}:{port} packets={} bytes={} flows={}",
                counter.packets, counter.bytes, counter.new_flows
            );
        }
        if let Ok(verdicts) = self.dataplane.verdicts() {
            let line: Vec<String> = verdicts
                .iter()
                .filter(|(_, c)| c.packets > 0)
                .map(|(v, c)| format!("{}={}", v.label(), c.packets))
                .collect();
            println!("stats verdicts {}", line.join(" "));
        }
    }
}
