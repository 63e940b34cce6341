//! Reload: plan, apply, then commit (docs/operations.md, "Reloading").
//!
//! - **Plan** reads and validates the new file and everything it needs from
//!   the host (the NAT source, the host's addresses, the probers) and
//!   computes the difference ([`decide::config_diff`]); a plan that fails
//!   changes nothing: [`ReloadError::Rejected`].
//! - **Apply** makes the host match the new config step by step
//!   ([`ReloadStep`]): neighbour entries, the data plane's tables, the VIP
//!   addresses, keeping a journal of what it changed.
//! - **Commit** makes the new config the running one (probes follow it) only
//!   when every step applied. A step that fails part-way undoes the journal
//!   in reverse, back to the running config: [`ReloadError::RolledBack`], or
//!   [`ReloadError::Incomplete`] naming what could not be put back.
//!
//! The start-up applies its config through the same apply and commit.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    net::IpAddr,
    sync::Arc,
};

use anyhow::Result;
use tracing::{error, info, warn};

use crate::{
    config::Config,
    control::ReloadReport,
    fault,
    probe::Prober,
    status::{ReloadOutcome, ReloadStep},
    system,
};

use super::{
    Agent,
    decide::{self, BackendKey},
    host::{nat_source, vip_addresses},
    probes::build_probers,
};

/// Why a reload did not become the running config. The admin response
/// carries it, and `/metrics` counts it as `ha_lb_reloads_total{outcome}`.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The new config was refused before anything changed.
    #[error("reload rejected, the running config stays: {reason}")]
    Rejected { reason: String },
    /// A step failed; everything it and the steps before it changed was put
    /// back, and the running config serves as before.
    #[error("reload failed at {step} and was rolled back, the running config stays: {cause}")]
    RolledBack { step: ReloadStep, cause: String },
    /// A step failed and putting the running config back failed too: `left`
    /// names what is not as the running config wants it.
    #[error(
        "reload failed at {step} ({cause}), and putting the running config back failed too; \
         left as it is: {}; restart the agent",
        left.join("; ")
    )]
    Incomplete {
        step: ReloadStep,
        cause: String,
        left: Vec<String>,
    },
}

impl ReloadError {
    pub fn outcome(&self) -> ReloadOutcome {
        match self {
            ReloadError::Rejected { .. } => ReloadOutcome::Rejected,
            ReloadError::RolledBack { .. } => ReloadOutcome::RolledBack,
            ReloadError::Incomplete { .. } => ReloadOutcome::Incomplete,
        }
    }

    /// What the admin response carries.
    pub fn report(&self) -> ReloadReport {
        let (step, left) = match self {
            ReloadError::Rejected { .. } => (None, Vec::new()),
            ReloadError::RolledBack { step, .. } => (Some(*step), Vec::new()),
            ReloadError::Incomplete { step, left, .. } => (Some(*step), left.clone()),
        };
        ReloadReport {
            outcome: self.outcome(),
            step,
            left,
        }
    }
}

/// A config ready to apply: validated, with what it needs from the host.
pub(super) struct Plan {
    pub(super) next: Config,
    /// The NAT source address it resolves to.
    pub(super) lb_addr: IpAddr,
    pub(super) probers: HashMap<String, Arc<Prober>>,
    /// This host's own addresses (its backends there are local).
    pub(super) local: HashSet<IpAddr>,
    pub(super) diff: decide::ConfigDiff,
    /// Backends whose probe starts afresh at the commit: the tables are
    /// written with the health it starts with, as they will stand after it.
    pub(super) restarting: BTreeSet<BackendKey>,
}

/// What an apply changed, for the undo.
#[derive(Default)]
struct Journal {
    /// Neighbour entries added for the new config's backends.
    neighbours: BTreeSet<IpAddr>,
    /// The data plane's tables were (perhaps partly) written.
    data_plane: bool,
    /// The VIP addresses were (perhaps partly) changed.
    addresses: bool,
}

struct Failure {
    step: ReloadStep,
    cause: anyhow::Error,
    journal: Journal,
}

impl Agent {
    /// Re-reads the config file and applies it: plan, apply, commit.
    ///
    /// # Errors
    /// [`ReloadError`]: in every case the running config stays (or, for
    /// `Incomplete`, what is not as it wants is named).
    pub(super) async fn reload(&mut self) -> Result<String, ReloadError> {
        let path = self.options.config_path.clone();
        let result = match self.plan_reload().await {
            Err(reason) => Err(ReloadError::Rejected { reason }),
            Ok(plan) => {
                let summary = plan.diff.to_string();
                match self.apply(&plan).await {
                    Ok(()) => {
                        self.commit(plan);
                        // A VIP that fails open, or no longer does, under the
                        // new config changes what VRRP tracking advertises.
                        self.track().await;
                        Ok(format!(
                            "reload applied from {} ({summary})",
                            path.display()
                        ))
                    }
                    Err(failure) => Err(self.roll_back(failure).await),
                }
            }
        };
        let outcome = match &result {
            Ok(message) => {
                info!(path = %path.display(), "{message}");
                ReloadOutcome::Applied
            }
            Err(e) => {
                error!(path = %path.display(), "{e}");
                e.outcome()
            }
        };
        *self.reloads.entry(outcome).or_default() += 1;
        result
    }

    /// Everything a reload needs, found before anything changes.
    async fn plan_reload(&self) -> Result<Plan, String> {
        let next = Config::load(&self.options.config_path).map_err(|e| e.to_string())?;
        let restart = self.config.restart_needed_for(&next);
        if !restart.is_empty() {
            return Err(format!("{} (needs an agent restart)", restart.join(", ")));
        }
        system::check_nat_port_range(next.data_plane.nat.port_range).map_err(|e| e.to_string())?;
        // The NAT source must resolve and fit beside the earlier ones that
        // still have flows.
        let lb_addr = nat_source(&self.netlink, &self.options.iface, self.ifindex, &next)
            .await
            .map_err(|e| format!("{e:#}"))?;
        self.dataplane
            .plan_settings(
                &next
                    .data_plane
                    .settings(lb_addr)
                    .map_err(|e| format!("data_plane.nat.source_address: {e}"))?,
            )
            .map_err(|e| e.to_string())?;
        let probers = build_probers(&next).map_err(|e| format!("{e:#}"))?;
        self.plan(next, lb_addr, probers)
            .await
            .map_err(|e| format!("{e:#}"))
    }

    /// A plan for `next` (at start-up, against an empty running config).
    pub(super) async fn plan(
        &self,
        next: Config,
        lb_addr: IpAddr,
        probers: HashMap<String, Arc<Prober>>,
    ) -> Result<Plan> {
        // Neither config's VIP addresses count as the host's own.
        let mut vips = vip_addresses(&self.config);
        vips.extend(vip_addresses(&next));
        let local = self.local_addresses(&vips).await?;
        let diff = decide::config_diff(&self.config, &next);
        let restarting = self.restarting_probes(&next);
        Ok(Plan {
            next,
            lb_addr,
            probers,
            local,
            diff,
            restarting,
        })
    }

    /// The start-up's apply and commit: there is no running config to go
    /// back to, so a failure fails the start (which then changes nothing
    /// more: the program is not attached yet).
    pub(super) async fn apply_first(
        &mut self,
        config: Config,
        probers: HashMap<String, Arc<Prober>>,
    ) -> Result<()> {
        let plan = self.plan(config, self.lb_addr, probers).await?;
        if let Err(failure) = self.apply(&plan).await {
            return Err(failure
                .cause
                .context(format!("applying the config: {}", failure.step)));
        }
        self.commit(plan);
        Ok(())
    }

    /// Makes the host match `plan`, step by step; the running config is
    /// untouched.
    async fn apply(&mut self, plan: &Plan) -> Result<(), Failure> {
        let mut journal = Journal::default();
        // Neighbours first, so the first packets to a new backend find its
        // MAC. One that cannot be added is not fatal: the data path drops
        // that backend's packets until the kernel resolves it.
        let wanted: BTreeSet<IpAddr> = plan
            .next
            .vips
            .iter()
            .flat_map(|v| &v.backends)
            .map(|b| b.address)
            .filter(|a| !plan.local.contains(a))
            .collect();
        for address in wanted.difference(&self.added_neighbours.clone()) {
            match self
                .netlink
                .add_managed_neighbour(self.ifindex, *address)
                .await
            {
                Ok(()) => {
                    self.added_neighbours.insert(*address);
                    journal.neighbours.insert(*address);
                }
                Err(e) => {
                    warn!(error = %e, "the data path drops a backend's packets until its MAC is known")
                }
            }
        }
        journal.data_plane = true;
        let written = self
            .write_data_plane(&plan.next, plan.lb_addr, &plan.local, &plan.restarting)
            .and_then(|()| Ok(fault::point("data-plane-written")?));
        if let Err(cause) = written {
            return Err(Failure {
                step: ReloadStep::DataPlane,
                cause,
                journal,
            });
        }
        journal.addresses = true;
        if let Err(cause) = self
            .sync_vip_addresses_to(&vip_addresses(&plan.next), &plan.next.garp)
            .await
        {
            return Err(Failure {
                step: ReloadStep::Addresses,
                cause,
                journal,
            });
        }
        Ok(())
    }

    /// Makes an applied plan the running config: probes follow it, health
    /// and drains of removed backends go, and the record says so.
    pub(super) fn commit(&mut self, plan: Plan) {
        let Plan {
            next,
            lb_addr,
            probers,
            local,
            diff: _,
            restarting: _,
        } = plan;
        if lb_addr != self.lb_addr {
            info!(from = %self.lb_addr, to = %lb_addr, "NAT source address changed; open flows keep theirs");
        }
        self.config = next;
        self.lb_addr = lb_addr;
        self.local_backends = local;
        self.sync_probes(&probers);
        let wanted: BTreeSet<BackendKey> = self.backend_keys().into_iter().collect();
        self.health.retain(|key, _| wanted.contains(key));
        self.maintenance.retain(|key| wanted.contains(key));
        self.save_record();
    }

    /// Applies the running config again over what `failure` changed, in
    /// reverse order, and says what could not be put back.
    async fn roll_back(&mut self, failure: Failure) -> ReloadError {
        let Failure {
            step,
            cause,
            journal,
        } = failure;
        let mut left = Vec::new();
        if journal.addresses
            && let Err(e) = self.sync_vip_addresses().await
        {
            left.push(format!(
                "VIP addresses on {} (now {:?}): {e:#}",
                self.options.iface, self.added_addresses
            ));
        }
        if journal.data_plane
            && let Err(e) = self.apply_data_plane()
        {
            left.push(format!("the data plane's tables: {e:#}"));
        }
        // Those no table names any more; one a flow still names (the new
        // tables served a moment) goes with the sweep that frees it.
        let needed = self.dataplane.backend_addresses();
        for address in journal.neighbours {
            if needed.contains(&address) {
                continue;
            }
            match self.netlink.remove_neighbour(self.ifindex, address).await {
                Ok(()) => {
                    self.added_neighbours.remove(&address);
                }
                Err(e) => left.push(format!("neighbour entry {address}: {e:#}")),
            }
        }
        self.save_record();
        let cause = format!("{cause:#}");
        if left.is_empty() {
            ReloadError::RolledBack { step, cause }
        } else {
            ReloadError::Incomplete { step, cause, left }
        }
    }
}
