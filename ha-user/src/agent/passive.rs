//! Passive health from the agent's side (docs/health-checks.md, "Passive
//! health"): a task reads the data path's PASSIVE_EVENTS ring and hands each
//! event to the reconciler, which logs and counts it and asks the backend's
//! probe task for a confirming check; the check's result clears the suspect
//! flag or takes the backend down at once ([`decide::resolve_suspect`]).

use std::{collections::BTreeMap, net::IpAddr, time::Instant};

use ha_common::PassiveEvent;
use tokio::{
    io::{Interest, unix::AsyncFd},
    sync::mpsc,
    task::JoinHandle,
};
use tracing::{debug, info, warn};

use crate::dataplane::{PassiveEvents, parse_passive_event};

use super::{
    Agent,
    decide::{self, BackendKey, PassiveReason, SuspectResolution},
    probes::HealthReport,
};

/// A backend the data path suspects, as the reconciler knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Suspect {
    pub(super) since: Instant,
    pub(super) reason: PassiveReason,
}

/// Passive health's state, owned by the reconciler.
#[derive(Debug, Default)]
pub(super) struct PassiveHealth {
    /// The program has the SUSPECT map and the PASSIVE_EVENTS ring.
    pub(super) enabled: bool,
    /// By backend address and port (one data-path id, whatever its VIPs).
    pub(super) suspects: BTreeMap<(IpAddr, u16), Suspect>,
    /// Events received, by reason.
    pub(super) events: BTreeMap<PassiveReason, u64>,
    /// Suspects whose confirming check passed.
    pub(super) cleared: u64,
    /// Suspects whose confirming check failed: down at once.
    pub(super) confirmed: u64,
    /// The reader task (aborted with the agent).
    pub(super) reader: Option<JoinHandle<()>>,
}

impl Drop for PassiveHealth {
    fn drop(&mut self) {
        if let Some(reader) = self.reader.take() {
            reader.abort();
        }
    }
}

impl PassiveHealth {
    /// The live suspicion of `address:port`, if any.
    pub(super) fn suspect(&self, address: IpAddr, port: u16, now: Instant) -> Option<Suspect> {
        self.suspects
            .get(&(address, port))
            .filter(|s| decide::suspect_live(s.since, now))
            .copied()
    }
}

/// Reads the ring until the agent's side of `events` is gone. Readiness
/// comes from the ring's fd (epoll): no polling interval, no busy loop.
pub(super) fn spawn_reader(
    ring: PassiveEvents,
    events: mpsc::Sender<PassiveEvent>,
) -> std::io::Result<JoinHandle<()>> {
    // SAFETY: the ring owns its map's fd, open for the ring's whole life
    // (this `AsyncFd` owns the ring), and `as_raw_fd` always returns that fd.
    let mut ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
        .map_err(std::io::Error::from)?;
    Ok(tokio::spawn(async move {
        loop {
            let mut guard = match ring.readable_mut().await {
                Ok(guard) => guard,
                Err(e) => {
                    warn!(error = %e, "passive health: waiting on the PASSIVE_EVENTS ring failed; passive health events stop");
                    return;
                }
            };
            let mut batch = Vec::new();
            {
                let ring = guard.get_inner_mut();
                while let Some(item) = ring.next() {
                    match parse_passive_event(&item) {
                        Some(event) => batch.push(event),
                        None => debug!(len = item.len(), "passive health: short record skipped"),
                    }
                }
            }
            guard.clear_ready();
            for event in batch {
                if events.send(event).await.is_err() {
                    return;
                }
            }
        }
    }))
}

impl Agent {
    /// Takes the ring and starts its reader; without the maps (a program
    /// built before passive health) says so once and leaves it off.
    pub(super) fn start_passive_health(&mut self, events: mpsc::Sender<PassiveEvent>) {
        let ring = match self.dataplane.take_passive_ring() {
            Ok(Some(ring)) if self.dataplane.has_passive_health() => ring,
            Ok(_) => {
                warn!(
                    "passive health off: the XDP program has no SUSPECT map or PASSIVE_EVENTS ring \
                     (built before passive health); backends are judged by their checks alone"
                );
                return;
            }
            Err(e) => {
                warn!(error = %e, "passive health off: the PASSIVE_EVENTS ring cannot be read");
                return;
            }
        };
        match spawn_reader(ring, events) {
            Ok(reader) => {
                self.passive.reader = Some(reader);
                self.passive.enabled = true;
                info!(
                    "passive health on: a backend that refuses a client's SYN is checked at once"
                );
            }
            Err(e) => warn!(error = %e, "passive health off: polling the PASSIVE_EVENTS ring"),
        }
    }

    /// The data path suspected a backend: log, count, and ask its probe
    /// tasks (one per VIP it serves) for a confirming check now.
    pub(super) fn on_passive(&mut self, event: PassiveEvent) {
        let reason = PassiveReason::from_wire(event.reason);
        *self.passive.events.entry(reason).or_default() += 1;
        let Some((address, port)) = self.dataplane.backend_of_id(event.backend_id) else {
            debug!(
                id = event.backend_id,
                reason = reason.label(),
                "passive health event for a backend id no backend has now"
            );
            return;
        };
        let address = IpAddr::V4(address);
        let now = Instant::now();
        let keys: Vec<BackendKey> = self
            .backend_keys()
            .into_iter()
            .filter(|key| key.address == address && key.port == port)
            .collect();
        let asked = keys
            .iter()
            .filter_map(|key| self.probes.get(key))
            .filter(|task| task.check_now())
            .count();
        warn!(
            backend = %std::net::SocketAddr::new(address, port),
            reason = reason.label(),
            confirming_checks = asked,
            "passive health: the backend refused a client's connection; no new flows to it until a confirming check passes"
        );
        self.passive
            .suspects
            .insert((address, port), Suspect { since: now, reason });
    }

    /// A confirming check's result (`report.confirming`), before the report
    /// counts as a health change: clears the suspect flag on a pass, counts a
    /// confirmation (the checker took the backend down at once) on a
    /// transport-level failure, leaves the flag to expire otherwise.
    pub(super) fn resolve_suspect(&mut self, report: &HealthReport) {
        let at = (report.key.address, report.key.port);
        let Some(suspect) = self.passive.suspects.get(&at).copied() else {
            return; // another VIP's check of the same backend resolved it
        };
        match decide::resolve_suspect(report.outcome.result) {
            SuspectResolution::Cleared => {
                self.passive.suspects.remove(&at);
                self.passive.cleared += 1;
                self.clear_suspect_flag(&report.key);
                info!(
                    backend = %report.key,
                    reason = suspect.reason.label(),
                    check = %report.outcome.detail,
                    "passive health: the confirming check passes; suspect cleared"
                );
            }
            SuspectResolution::Confirmed => {
                self.passive.suspects.remove(&at);
                self.passive.confirmed += 1;
                if let Some(entry) = self.health.get_mut(&report.key) {
                    entry.confirmed = Some(suspect.reason);
                }
                warn!(
                    backend = %report.key,
                    reason = suspect.reason.label(),
                    check = %report.outcome.detail,
                    "passive health: the confirming check fails too; the backend is down at once"
                );
            }
            SuspectResolution::Undecided => info!(
                backend = %report.key,
                check = %report.outcome.detail,
                "passive health: the backend answers but is not ready; the normal rules apply, its suspect flag expires"
            ),
        }
    }

    /// Writes 0 to the backend's SUSPECT entry (the data path selects it again).
    pub(super) fn clear_suspect_flag(&mut self, key: &BackendKey) {
        let IpAddr::V4(address) = key.address else {
            return;
        };
        if let Err(e) = self.dataplane.clear_suspect(address, key.port) {
            warn!(backend = %key, error = %e, "clearing the backend's suspect flag");
        }
    }

    /// A backend came up: whatever the data path suspected is over.
    pub(super) fn on_backend_up(&mut self, key: &BackendKey) {
        self.passive.suspects.remove(&(key.address, key.port));
        self.clear_suspect_flag(key);
        if let Some(entry) = self.health.get_mut(key) {
            entry.confirmed = None;
        }
    }
}
