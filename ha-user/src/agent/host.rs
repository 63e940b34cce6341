//! Host effects: VIP addresses (and their VRRP leases), managed neighbour entries, the one
//! gratuitous-ARP path, the NAT source address.

use std::{
    collections::{BTreeSet, HashSet},
    net::IpAddr,
};

use anyhow::Result;
use tracing::{info, warn};

use crate::{
    config::{Config, GarpConfig},
    fault, garp, handover,
    netlink::Netlink,
};

use super::Agent;

/// The NAT source address for `config`: `nat.source_address`, which must be
/// an address of this host (the backends' replies go to it), or the
/// interface's primary address.
pub(super) async fn nat_source(
    netlink: &Netlink,
    iface: &str,
    ifindex: u32,
    config: &Config,
) -> Result<IpAddr> {
    match config.data_plane.nat.source_address {
        Some(address) => {
            if !netlink.local_addresses().await?.contains(&address) {
                anyhow::bail!(
                    "data_plane.nat.source_address: {address} is not an address of this host; \
                     the backends' replies to it would never reach the data path"
                );
            }
            if !netlink.has_address(ifindex, address).await? {
                warn!(
                    %address, %iface,
                    "data_plane.nat.source_address is not on the interface the data path is attached to: \
                     the backends' replies reach the data path only if they arrive on it (this host \
                     answers ARP for it there, unless arp_ignore says otherwise)"
                );
            }
            Ok(address)
        }
        None => Ok(netlink.primary_address(iface, ifindex).await?),
    }
}

impl Agent {
    /// Gratuitous ARP for every VIP address (a re-announcement).
    pub(super) fn announce_vips(&self) {
        self.announce(vip_addresses(&self.config));
    }

    /// The one gratuitous-ARP path: `garp.count` announcements (at least
    /// one: taking a VIP without telling the LAN would leave the clients on
    /// the old holder) `garp.interval` apart, for each address, in the
    /// background.
    pub(super) fn announce(&self, addresses: BTreeSet<IpAddr>) {
        self.announce_with(addresses, &self.config.garp);
    }

    /// [`Agent::announce`] with `garp`'s count and interval (a reload's,
    /// before it is the running config).
    pub(super) fn announce_with(&self, addresses: BTreeSet<IpAddr>, garp: &GarpConfig) {
        if addresses.is_empty() {
            return;
        }
        let (ifindex, mac, garp) = (self.ifindex, self.mac, garp.clone());
        tokio::spawn(async move {
            for vip in addresses {
                if let Err(e) =
                    garp::announce(ifindex, mac, vip, garp.count.max(1), garp.interval).await
                {
                    warn!(error = %e, "gratuitous ARP");
                }
            }
        });
    }

    /// Removes the neighbour entries ha-lb added for backends that have no
    /// record any more: a backend removed from the config keeps its entry
    /// while flows may still name it (the data path forwards them by FIB
    /// lookup, which needs the MAC), until the sweep frees it.
    pub(super) async fn prune_neighbours(&mut self) {
        let needed = self.dataplane.backend_addresses();
        let unneeded: Vec<IpAddr> = self
            .added_neighbours
            .iter()
            .filter(|address| !needed.contains(address))
            .copied()
            .collect();
        for address in unneeded {
            if self
                .netlink
                .remove_neighbour(self.ifindex, address)
                .await
                .is_ok()
            {
                self.added_neighbours.remove(&address);
            }
        }
    }

    /// This host's own addresses, but for `vips` (VIP addresses are not
    /// backends): a backend at one of them is local.
    pub(super) async fn local_addresses(&self, vips: &BTreeSet<IpAddr>) -> Result<HashSet<IpAddr>> {
        Ok(self
            .netlink
            .local_addresses()
            .await?
            .into_iter()
            .filter(|a| !vips.contains(a))
            .collect())
    }

    /// Adds the VIP addresses while holding them (and announces each one
    /// added), removes them otherwise. Under VRRP the agent owns every VIP
    /// address, so one left on the interface by a killed agent goes too.
    pub(super) async fn sync_vip_addresses(&mut self) -> Result<()> {
        let (configured, garp) = (vip_addresses(&self.config), self.config.garp.clone());
        self.sync_vip_addresses_to(&configured, &garp).await
    }

    /// [`Agent::sync_vip_addresses`] for the VIP addresses `configured`
    /// (a reload's, before it is the running config).
    pub(super) async fn sync_vip_addresses_to(
        &mut self,
        configured: &BTreeSet<IpAddr>,
        garp: &GarpConfig,
    ) -> Result<()> {
        if !self.dataplane.is_attached() {
            // Start-up: the addresses come after the program (see `run`).
            return Ok(());
        }
        let synced = self.sync_vip_addresses_now(configured, garp).await;
        self.save_record();
        synced
    }

    /// The lifetime of a VIP address this agent holds: under VRRP a lease it
    /// renews (`handover::held_address_lease`), without VRRP permanent.
    pub(super) fn held_address_lifetime(&self) -> Option<u32> {
        self.vrrp
            .as_ref()
            .map(|vrrp| handover::held_address_lease(vrrp.config.advert_interval))
    }

    /// Renews the lease of the VIP addresses a VRRP master holds.
    pub(super) async fn renew_address_leases(&mut self) {
        let Some(lease) = self.held_address_lifetime() else {
            return;
        };
        if !self.holding {
            return;
        }
        for address in self.added_addresses.clone() {
            if let Err(e) = self
                .netlink
                .set_vip_lifetime(self.ifindex, address, Some(lease))
                .await
            {
                warn!(vip = %address, error = %e, "renewing the VIP address's lease");
            }
        }
    }

    async fn sync_vip_addresses_now(
        &mut self,
        configured: &BTreeSet<IpAddr>,
        garp: &GarpConfig,
    ) -> Result<()> {
        let wanted: BTreeSet<IpAddr> = if self.holding {
            configured.clone()
        } else {
            BTreeSet::new()
        };
        let mut added = BTreeSet::new();
        let result = self.add_vip_addresses(&wanted, &mut added).await;
        // Announced even when a later one failed: those are on the interface.
        self.announce_with(added, garp);
        result?;
        let mut unwanted: BTreeSet<IpAddr> =
            self.added_addresses.difference(&wanted).copied().collect();
        if self.vrrp.is_some() {
            unwanted.extend(configured.difference(&wanted));
        }
        for address in unwanted {
            if self.netlink.has_address(self.ifindex, address).await? {
                self.netlink.remove_vip(self.ifindex, address).await?;
                info!(vip = %address, "VIP address removed");
            }
            self.added_addresses.remove(&address);
        }
        Ok(())
    }

    /// Adds the addresses of `wanted` that are not on the interface, each
    /// one known as added (so a failure later, or a rollback, removes it)
    /// from the moment it is there; `added` collects them for the
    /// announcement.
    async fn add_vip_addresses(
        &mut self,
        wanted: &BTreeSet<IpAddr>,
        added: &mut BTreeSet<IpAddr>,
    ) -> Result<()> {
        let lifetime = self.held_address_lifetime();
        for address in wanted {
            if self.netlink.has_address(self.ifindex, *address).await? {
                if self.added_addresses.contains(address) {
                    // A kept VRRP master gave it a longer lifetime
                    // (operations.md, "Stopping"); held now, it gets the
                    // holder's: a lease under VRRP, permanent otherwise.
                    self.netlink
                        .set_vip_lifetime(self.ifindex, *address, lifetime)
                        .await?;
                }
                continue;
            }
            self.netlink.add_vip(self.ifindex, *address).await?;
            self.added_addresses.insert(*address);
            added.insert(*address);
            info!(vip = %address, iface = %self.options.iface, "VIP address added");
            if lifetime.is_some() {
                self.netlink
                    .set_vip_lifetime(self.ifindex, *address, lifetime)
                    .await?;
            }
            fault::point("vip-address-added")?;
        }
        Ok(())
    }
}

/// The VIP addresses of `config`, each once.
pub(super) fn vip_addresses(config: &Config) -> BTreeSet<IpAddr> {
    config.vips.iter().map(|v| v.address).collect()
}
