//! Health-check tasks: one per backend, each reporting to the reconciler; a reload keeps the tasks
//! whose check did not change. The reconciler can ask a task for a check now
//! ([`ProbeCommand::CheckNow`]): the confirming check of passive health.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use tokio::{sync::mpsc, task::JoinHandle};

use crate::{
    config::{CheckConfig, Config},
    health::{Checker, Health, Timing, confirm_delay},
    probe::{Outcome, Prober},
};

use super::{
    Agent,
    decide::{self, BackendKey},
};

/// A probe task's result, tagged with the task's generation so that a report
/// from a task replaced by a reload is ignored.
pub(super) struct HealthReport {
    pub(super) key: BackendKey,
    pub(super) generation: u64,
    pub(super) outcome: Outcome,
    pub(super) health: Health,
    /// The check confirmed a passive suspicion ([`ProbeCommand::CheckNow`]).
    pub(super) confirming: bool,
}

/// What the reconciler asks of a probe task.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ProbeCommand {
    /// The data path suspects the backend: check it now, and take it down at
    /// once if the check fails at the transport level ([`Checker::confirm`]).
    CheckNow,
}

pub(super) struct ProbeTask {
    pub(super) check: CheckConfig,
    pub(super) generation: u64,
    pub(super) handle: JoinHandle<()>,
    /// One command waits at most: asking again while one waits changes nothing.
    pub(super) commands: mpsc::Sender<ProbeCommand>,
}

impl ProbeTask {
    /// Asks for a confirming check now; `false` if one is already asked for
    /// (it answers this too) or the task is gone.
    pub(super) fn check_now(&self) -> bool {
        self.commands.try_send(ProbeCommand::CheckNow).is_ok()
    }
}

impl Drop for ProbeTask {
    fn drop(&mut self) {
        self.handle.abort();
    }
}

pub(super) struct BackendHealth {
    pub(super) health: Health,
    pub(super) since: Instant,
    pub(super) last: Option<(Outcome, Instant)>,
    pub(super) checks: u64,
    /// Down because a confirming check agreed with the data path's suspicion (why).
    pub(super) confirmed: Option<decide::PassiveReason>,
}

/// Probers for every VIP, built before anything changes (a bad CA file fails here).
pub(super) fn build_probers(config: &Config) -> Result<HashMap<String, Arc<Prober>>> {
    config
        .vips
        .iter()
        .map(|vip| {
            let prober =
                Prober::new(&vip.check).with_context(|| format!("vips {}: check", vip.name))?;
            Ok((vip.name.clone(), Arc::new(prober)))
        })
        .collect()
}

impl Agent {
    pub(super) fn backend_keys(&self) -> Vec<BackendKey> {
        decide::backends(&self.config)
            .map(|(key, ..)| key)
            .collect()
    }

    /// The backends of `next` whose probe [`Agent::sync_probes`] will start
    /// afresh: new ones, and those whose VIP's check changed. Their health
    /// starts over (as up, or as the last agent recorded it).
    pub(super) fn restarting_probes(&self, next: &Config) -> BTreeSet<BackendKey> {
        decide::backends(next)
            .filter(|(key, vip, _)| {
                self.probes
                    .get(key)
                    .is_none_or(|task| task.check != vip.check)
            })
            .map(|(key, ..)| key)
            .collect()
    }

    /// Starts probe tasks for new backends, restarts those whose check
    /// changed, stops those that are gone; unchanged ones keep running with
    /// their state.
    pub(super) fn sync_probes(&mut self, probers: &HashMap<String, Arc<Prober>>) {
        let checks: HashMap<&str, &CheckConfig> = self
            .config
            .vips
            .iter()
            .map(|v| (v.name.as_str(), &v.check))
            .collect();
        let keys = self.backend_keys();
        let wanted: HashSet<&BackendKey> = keys.iter().collect();
        self.probes.retain(|key, task| {
            wanted.contains(key) && checks.get(key.vip.as_str()) == Some(&&task.check)
        });
        for key in &keys {
            if self.probes.contains_key(key) {
                continue;
            }
            let check = checks[key.vip.as_str()].clone();
            let prober = probers[&key.vip].clone();
            self.next_generation += 1;
            let generation = self.next_generation;
            let timing = Timing {
                interval: check.interval,
                fast_interval: check.fast_interval,
                down_interval: check.down_interval(),
                rise: check.rise,
                fall: check.fall,
            };
            let initial = self.seeded.remove(key);
            let (commands, commands_rx) = mpsc::channel(1);
            let handle = tokio::spawn(probe_loop(
                key.clone(),
                generation,
                prober,
                timing,
                initial.unwrap_or(Health::Up),
                self.health_tx.clone(),
                commands_rx,
            ));
            match initial {
                // What the last agent knew, until this one's checks say otherwise.
                Some(health) => {
                    self.health.insert(
                        key.clone(),
                        BackendHealth {
                            health,
                            since: Instant::now(),
                            last: None,
                            checks: 0,
                            confirmed: None,
                        },
                    );
                }
                None => {
                    self.health.remove(key);
                }
            }
            self.probes.insert(
                key.clone(),
                ProbeTask {
                    check,
                    generation,
                    handle,
                    commands,
                },
            );
        }
    }
}

/// Checks one backend forever (until aborted), reporting every result.
/// Each backend has its own task: a hung backend delays only itself. A
/// [`ProbeCommand::CheckNow`] cuts the wait short for a confirming check,
/// spaced by `fast_interval` from the previous one ([`confirm_delay`]).
pub(super) async fn probe_loop(
    key: BackendKey,
    generation: u64,
    prober: Arc<Prober>,
    timing: Timing,
    initial: Health,
    reports: mpsc::Sender<HealthReport>,
    mut commands: mpsc::Receiver<ProbeCommand>,
) {
    let target = SocketAddr::from((key.address, key.port));
    let mut checker = Checker::starting(timing, initial);
    let mut confirming = false;
    let mut last_confirm: Option<Instant> = None;
    loop {
        if confirming {
            last_confirm = Some(Instant::now());
        }
        let outcome = prober.check(target).await;
        if confirming {
            checker.confirm(outcome.result);
        } else {
            checker.record(outcome.result);
        }
        let report = HealthReport {
            key: key.clone(),
            generation,
            outcome,
            health: checker.health(),
            confirming,
        };
        if reports.send(report).await.is_err() {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(checker.next_interval()) => confirming = false,
            Some(ProbeCommand::CheckNow) = commands.recv() => {
                let since = last_confirm.map(|at| at.elapsed());
                let delay = confirm_delay(since, timing.fast_interval);
                if delay > Duration::ZERO {
                    tokio::time::sleep(delay).await;
                }
                confirming = true;
            }
        }
    }
}
