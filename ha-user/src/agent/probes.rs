//! Health-check tasks: one per backend, each reporting to the reconciler; a reload keeps the tasks
//! whose check did not change.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    net::SocketAddr,
    sync::Arc,
    time::Instant,
};

use anyhow::{Context, Result};
use tokio::{sync::mpsc, task::JoinHandle};

use crate::{
    config::{CheckConfig, Config},
    health::{Checker, Health, Timing},
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
}

pub(super) struct ProbeTask {
    pub(super) check: CheckConfig,
    pub(super) generation: u64,
    pub(super) handle: JoinHandle<()>,
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
            let handle = tokio::spawn(probe_loop(
                key.clone(),
                generation,
                prober,
                timing,
                initial.unwrap_or(Health::Up),
                self.health_tx.clone(),
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
                },
            );
        }
    }
}

/// Checks one backend forever (until aborted), reporting every result.
/// Each backend has its own task: a hung backend delays only itself.
pub(super) async fn probe_loop(
    key: BackendKey,
    generation: u64,
    prober: Arc<Prober>,
    timing: Timing,
    initial: Health,
    reports: mpsc::Sender<HealthReport>,
) {
    let target = SocketAddr::from((key.address, key.port));
    let mut checker = Checker::starting(timing, initial);
    loop {
        let outcome = prober.check(target).await;
        checker.record(outcome.result);
        let report = HealthReport {
            key: key.clone(),
            generation,
            outcome,
            health: checker.health(),
        };
        if reports.send(report).await.is_err() {
            return;
        }
        tokio::time::sleep(checker.next_interval()).await;
    }
}
