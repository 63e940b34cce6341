//! Applying a config: probes, neighbours, the data plane and the addresses made to match it; health
//! and drain changes rewrite the data plane from the pure decision in `decide`.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::Ipv4Addr,
    sync::Arc,
};

use anyhow::{Context, Result};
use tracing::{error, info, warn};

use crate::{config::Config, health::Health, probe::Prober, system};

use super::{
    Agent,
    decide::{self, BackendKey},
    host::nat_source,
    probes::build_probers,
};

impl Agent {
    /// Re-reads the config; one that does not validate, or that would need a
    /// restart, is refused and the running one stays.
    pub(super) async fn reload(&mut self) -> Result<String, String> {
        let path = self.options.config_path.clone();
        let refuse = |why: String| {
            let message = format!("reload rejected, the running config stays: {why}");
            error!("{message}");
            message
        };
        let next = Config::load(&path).map_err(|e| refuse(e.to_string()))?;
        let restart = self.config.restart_needed_for(&next);
        if !restart.is_empty() {
            return Err(refuse(format!(
                "{} (needs an agent restart)",
                restart.join(", ")
            )));
        }
        system::check_nat_port_range(next.data_plane.nat.port_range)
            .map_err(|e| refuse(e.to_string()))?;
        // Plan: the NAT source must resolve and fit beside the earlier ones
        // that still have flows, before anything changes.
        let lb_addr = nat_source(&self.netlink, &self.options.iface, self.ifindex, &next)
            .await
            .map_err(|e| refuse(format!("{e:#}")))?;
        self.dataplane
            .plan_settings(&next.data_plane.settings(lb_addr))
            .map_err(|e| refuse(e.to_string()))?;
        let probers = build_probers(&next).map_err(|e| refuse(format!("{e:#}")))?;
        if lb_addr != self.lb_addr {
            info!(from = %self.lb_addr, to = %lb_addr, "NAT source address changes; open flows keep theirs");
        }
        let (previous, previous_lb_addr) = (self.config.clone(), self.lb_addr);
        self.lb_addr = lb_addr;
        if let Err(e) = self.apply_config(&next, probers).await {
            // Put the running config back whole: the data plane, probes and
            // addresses must not stay half way between the two.
            self.lb_addr = previous_lb_addr;
            let restored = match build_probers(&previous) {
                Ok(probers) => self.apply_config(&previous, probers).await,
                Err(e) => Err(e),
            };
            let message = match restored {
                Ok(()) => format!("reload failed, the running config was put back: {e:#}"),
                Err(again) => format!(
                    "reload failed part-way ({e:#}), and putting the running config back failed too ({again:#}); \
                     restart the agent"
                ),
            };
            error!("{message}");
            return Err(message);
        }
        info!(path = %path.display(), "reload applied");
        Ok(format!("reload applied from {}", path.display()))
    }

    /// Makes probes, neighbour entries, the data plane and the VIP addresses match `config`.
    pub(super) async fn apply_config(
        &mut self,
        config: &Config,
        probers: HashMap<String, Arc<Prober>>,
    ) -> Result<()> {
        self.config = config.clone();
        self.sync_probes(&probers);
        let wanted: BTreeSet<BackendKey> = self.backend_keys().into_iter().collect();
        self.health.retain(|key, _| wanted.contains(key));
        self.maintenance.retain(|key| wanted.contains(key));

        // Neighbours first, so the first packets to a new backend find its MAC.
        let local = self.local_addresses().await?;
        let wanted_neighbours: BTreeSet<Ipv4Addr> = config
            .vips
            .iter()
            .flat_map(|v| &v.backends)
            .map(|b| b.address)
            .filter(|a| !local.contains(a))
            .collect();
        for address in wanted_neighbours.difference(&self.added_neighbours.clone()) {
            match self
                .netlink
                .add_managed_neighbour(self.ifindex, *address)
                .await
            {
                Ok(()) => {
                    self.added_neighbours.insert(*address);
                }
                Err(e) => {
                    warn!(error = %e, "the data path drops a backend's packets until its MAC is known")
                }
            }
        }
        self.apply_data_plane_with(&local)?;
        self.prune_neighbours().await;
        self.sync_vip_addresses().await
    }

    /// For health and drain changes: the host's own addresses are those found
    /// at the last config apply.
    pub(super) fn apply_data_plane(&mut self) -> Result<()> {
        let local = self.local_backends.clone();
        self.apply_data_plane_with(&local)
    }

    /// Computes the desired tables from config, health and drains, and writes them.
    pub(super) fn apply_data_plane_with(&mut self, local: &HashSet<Ipv4Addr>) -> Result<()> {
        self.local_backends = local.clone();
        let settings = self.config.data_plane.settings(self.lb_addr);
        let health: BTreeMap<BackendKey, Health> = self
            .health
            .iter()
            .map(|(key, h)| (key.clone(), h.health))
            .collect();
        let decide::Desired { vips, failing_open } = decide::desired_state(
            &self.config,
            &health,
            &self.maintenance,
            local,
            self.holding,
        );
        for name in failing_open.difference(&self.failing_open) {
            error!(vip = %name, "every backend of the VIP is down or draining: FAILING OPEN, traffic goes to all of them");
        }
        for name in self.failing_open.difference(&failing_open) {
            info!(vip = %name, "a backend is up again: no longer failing open");
        }
        self.failing_open = failing_open;
        let applied = self
            .dataplane
            .apply(&settings, &vips)
            .context("writing the data plane's maps");
        self.save_record();
        applied
    }
}
