//! The data plane made to match the running config, health and drains: the
//! desired state is the pure decision in [`decide::desired_state`]; this
//! writes it and says when a VIP starts or stops failing open.

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    net::IpAddr,
};

use anyhow::{Context, Result};
use tracing::{error, info};

use ha_common::Settings;

use crate::{config::Config, health::Health};

use super::{
    Agent,
    decide::{self, BackendKey},
};

impl Agent {
    /// For health, drain and VRRP changes: the running config, with the
    /// host's own addresses found when it was applied.
    pub(super) fn apply_data_plane(&mut self) -> Result<()> {
        let planned = self.desired(
            &self.config,
            self.lb_addr,
            &self.local_backends,
            &BTreeSet::new(),
        )?;
        self.write_desired(planned)
    }

    /// Every backend's health as the desired state and the record see it:
    /// as its running probe has it, else as the last agent recorded it
    /// (until its probe starts), else up (absent). A backend in `restarting`
    /// is one whose probe a reload starts afresh: its running health does
    /// not count.
    pub(super) fn health_view(
        &self,
        restarting: &BTreeSet<BackendKey>,
    ) -> BTreeMap<BackendKey, Health> {
        let mut view: BTreeMap<BackendKey, Health> = self
            .seeded
            .iter()
            .map(|(key, health)| (key.clone(), *health))
            .collect();
        view.extend(
            self.health
                .iter()
                .filter(|(key, _)| !restarting.contains(*key))
                .map(|(key, h)| (key.clone(), h.health)),
        );
        view
    }

    /// Computes the desired tables for `config` from health and drains, and
    /// writes them; the backends in `restarting` count with the health their
    /// new probe starts with ([`Agent::health_view`]).
    ///
    /// # Errors
    /// The data plane's, when a map write fails (the tables may then be
    /// part-way: apply a config again to put them right).
    pub(super) fn write_data_plane(
        &mut self,
        config: &Config,
        lb_addr: IpAddr,
        local: &HashSet<IpAddr>,
        restarting: &BTreeSet<BackendKey>,
    ) -> Result<()> {
        let planned = self.desired(config, lb_addr, local, restarting)?;
        self.write_desired(planned)
    }

    /// The settings and the desired tables for `config`
    /// ([`decide::desired_state`] over [`Agent::health_view`]).
    fn desired(
        &self,
        config: &Config,
        lb_addr: IpAddr,
        local: &HashSet<IpAddr>,
        restarting: &BTreeSet<BackendKey>,
    ) -> Result<(Settings, decide::Desired)> {
        let settings = config.data_plane.settings(lb_addr)?;
        let health = self.health_view(restarting);
        let desired =
            decide::desired_state(config, &health, &self.maintenance, local, self.holding);
        Ok((settings, desired))
    }

    /// [`Agent::apply_data_plane`] for a health or drain change, with VRRP
    /// tracking evaluated between the decision and the writes: the election
    /// does not wait for the Maglev tables to be built and written.
    pub(super) async fn apply_data_plane_and_track(&mut self) -> Result<()> {
        let planned = self.desired(
            &self.config,
            self.lb_addr,
            &self.local_backends,
            &BTreeSet::new(),
        );
        if let Ok((_, desired)) = &planned {
            self.note_failing_open(desired.failing_open.clone());
        }
        self.track().await;
        self.write_desired(planned?)
    }

    /// Says which VIPs start or stop failing open, and keeps the set.
    fn note_failing_open(&mut self, failing_open: BTreeSet<String>) {
        for name in failing_open.difference(&self.failing_open) {
            error!(vip = %name, "every backend of the VIP is down or draining: FAILING OPEN, traffic goes to all of them");
        }
        for name in self.failing_open.difference(&failing_open) {
            info!(vip = %name, "a backend is up again: no longer failing open");
        }
        self.failing_open = failing_open;
    }

    /// Writes a desired state, and says which VIPs start or stop failing open.
    fn write_desired(
        &mut self,
        (settings, decide::Desired { vips, failing_open }): (Settings, decide::Desired),
    ) -> Result<()> {
        self.note_failing_open(failing_open);
        let applied = self
            .dataplane
            .apply(&settings, &vips)
            .context("writing the data plane's maps");
        self.save_record();
        applied
    }
}
