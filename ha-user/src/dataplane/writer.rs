//! The desired state: SETTINGS, the VIP table with each VIP's Maglev table
//! halves, the backend table and BACKEND_INDEX, and the interfaces the
//! program may redirect to.

use std::{
    collections::{BTreeMap, HashSet},
    net::{IpAddr, Ipv4Addr},
};

use aya::maps::{Array, DevMapHash, HashMap as BpfHashMap};
use ha_common::{
    BACKEND_FLAG_DOWN, BACKEND_FLAG_LOCAL, BACKEND_INDEX_MAP, BACKENDS_MAP, BackendAddr,
    BackendInfo, MAGLEV_MAP, NatRange, SETTINGS_ACTIVE_MAP, SETTINGS_MAP, Settings, TX_PORTS_MAP,
    VIP_FLAG_ENABLED, VIPS_MAP, VipInfo, VipKey, addr_to_wire, port_to_wire,
};
use tracing::{debug, info};

use super::{DataPlane, DataPlaneError, Result, describe_range, map_error, next_nat_ranges};
use crate::{
    ip::ipv4,
    maglev::{MaglevBackend, build_table},
};

/// A VIP as the data plane should serve it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredVip {
    pub name: String,
    /// IPv4 only for now: [`DataPlane::apply`] refuses an IPv6 one.
    pub address: IpAddr,
    pub port: u16,
    pub protocol: u8,
    /// Whether this host answers for the VIP now (VRRP master, or static).
    pub enabled: bool,
    pub backends: Vec<DesiredBackend>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredBackend {
    /// IPv4 only for now: [`DataPlane::apply`] refuses an IPv6 one.
    pub address: IpAddr,
    pub port: u16,
    pub weight: u32,
    /// The backend is an address of this host: deliver locally, no NAT.
    pub local: bool,
    /// The backend does not answer: move its established flows (draining is weight 0 alone).
    pub down: bool,
}

impl DesiredVip {
    /// The VIP's key in VIPS: the IPv4 edge (the map stores IPv4 addresses).
    fn key(&self) -> Result<VipKey> {
        let address = ipv4(self.address).map_err(|source| DataPlaneError::NotIpv4 {
            what: format!("VIP {}", self.name),
            source,
        })?;
        Ok(VipKey {
            addr: addr_to_wire(address.octets()),
            port: port_to_wire(self.port),
            protocol: self.protocol,
            _pad: 0,
        })
    }

    /// `backend`'s address as the backend table stores it (IPv4).
    fn backend_ipv4(&self, backend: &DesiredBackend) -> Result<Ipv4Addr> {
        ipv4(backend.address).map_err(|source| DataPlaneError::NotIpv4 {
            what: format!("VIP {}, backend", self.name),
            source,
        })
    }
}

/// What the writer knows about a VIP it has written.
pub(super) struct VipSlot {
    pub(super) name: String,
    pub(super) slot: u32,
    /// 0 or 1: which half of the slot's region is live.
    pub(super) active_half: u32,
    pub(super) table: Vec<u32>,
    /// What `table` was built from: the same members need no new build (a
    /// Maglev build of 65,537 entries is the costly part of an apply).
    pub(super) members: Vec<MaglevBackend>,
    pub(super) flags: u32,
}

pub(super) fn backend_addr(address: Ipv4Addr, port: u16) -> BackendAddr {
    BackendAddr {
        addr: addr_to_wire(address.octets()),
        port: port_to_wire(port),
        _pad: 0,
    }
}

impl DataPlane {
    /// Interfaces the program may redirect to (XDP_REDIRECT through TX_PORTS).
    pub fn set_tx_ports(&mut self, ifindexes: &[u32]) -> Result<()> {
        let mut ports: DevMapHash<_> = self.map_mut(TX_PORTS_MAP)?;
        for ifindex in ifindexes {
            ports
                .insert(*ifindex, *ifindex, None, 0)
                .map_err(|source| DataPlaneError::TxPort {
                    ifindex: *ifindex,
                    source,
                })?;
        }
        Ok(())
    }

    /// What SETTINGS holds: the last settings applied, with the earlier NAT
    /// ranges that still have flows and the size of the queues of recent flows.
    pub fn settings(&self) -> Settings {
        self.settings
    }

    /// The settings `settings` would become: `nat[0]` as given, the earlier
    /// ranges this data plane keeps for live flows, the queue size.
    ///
    /// # Errors
    /// [`DataPlaneError::TooManyNatRanges`] when the NAT source changes while
    /// [`NAT_RANGES`](ha_common::NAT_RANGES) - 1 earlier ones still have flows: nothing is written.
    pub fn plan_settings(&self, settings: &Settings) -> Result<(Settings, Vec<NatRange>)> {
        let current = (self.settings.nat[0].addr != 0).then_some(self.settings.nat[0]);
        let earlier = next_nat_ranges(current, &self.earlier_nat, settings.nat[0])?;
        let mut planned = *settings;
        for (i, slot) in planned.nat.iter_mut().enumerate().skip(1) {
            *slot = earlier.get(i - 1).copied().unwrap_or_default();
        }
        planned.embryonic_slots = self.embryonic_slots;
        Ok((planned, earlier))
    }

    /// Writes `settings` as [`DataPlane::plan_settings`] plans them. The
    /// agent does so before it attaches the program, so that the first
    /// packets already see the NAT ranges (with those of adopted flows) and
    /// the timeouts, not a zeroed SETTINGS.
    ///
    /// # Errors
    /// As [`DataPlane::plan_settings`], or the map write failing.
    pub fn write_settings(&mut self, settings: &Settings) -> Result<()> {
        let (planned, earlier) = self.plan_settings(settings)?;
        {
            self.store_settings(&planned)?;
        }
        for range in earlier.iter().filter(|r| !self.earlier_nat.contains(r)) {
            info!(range = %describe_range(range), "earlier NAT source kept for the flows that use it");
        }
        self.settings = planned;
        self.earlier_nat = earlier;
        Ok(())
    }

    /// Writes `settings` into SETTINGS' idle slot, then makes it the live
    /// one: the data path reads whole values, old or new, never a mix (a map
    /// update of an array copies into the live value in place).
    pub(super) fn store_settings(&mut self, settings: &Settings) -> Result<()> {
        let idle = 1 - self.settings_slot;
        {
            let mut map: Array<_, Settings> = self.map_mut(SETTINGS_MAP)?;
            map.set(idle, settings, 0)
                .map_err(map_error(SETTINGS_MAP))?;
        }
        let mut active: Array<_, u32> = self.map_mut(SETTINGS_ACTIVE_MAP)?;
        active
            .set(0, idle, 0)
            .map_err(map_error(SETTINGS_ACTIVE_MAP))?;
        self.settings_slot = idle;
        Ok(())
    }

    /// Writes `settings` and makes the VIP and backend tables match `vips`:
    /// new and changed VIPs get a freshly built Maglev table swapped in
    /// atomically; unchanged ones are not touched; removed ones disappear.
    /// Established flows keep their backend (their entries name it by id)
    /// and their NAT source: when `settings.nat[0]` changes, the previous
    /// range stays valid for replies until no flow uses it.
    ///
    /// # Errors
    /// Nothing is written when the settings cannot be planned
    /// ([`DataPlane::plan_settings`]), there are too many VIPs, or an
    /// address is IPv6 ([`DataPlaneError::NotIpv4`]: the maps are IPv4).
    pub fn apply(&mut self, settings: &Settings, vips: &[DesiredVip]) -> Result<()> {
        if vips.len() > self.max_vips as usize {
            return Err(DataPlaneError::TooManyVips {
                wanted: vips.len(),
                max_vips: self.max_vips,
            });
        }
        // The IPv4 edge, checked whole before anything is written.
        for vip in vips {
            vip.key()?;
            for backend in &vip.backends {
                vip.backend_ipv4(backend)?;
            }
        }
        self.write_settings(settings)?;

        // Backends first, so a table never names an id without a record. A
        // backend in several VIPs has one record: it is local if it is in any,
        // and down (its flows moved) only if every VIP that uses it says so.
        let mut records: BTreeMap<u32, BackendInfo> = BTreeMap::new();
        for vip in vips {
            for backend in &vip.backends {
                let address = vip.backend_ipv4(backend)?;
                let id = self.backend_id(address, backend.port)?;
                let record = records.entry(id).or_insert(BackendInfo {
                    addr: addr_to_wire(address.octets()),
                    port: port_to_wire(backend.port),
                    flags: BACKEND_FLAG_DOWN,
                    _pad: 0,
                });
                if backend.local {
                    record.flags |= BACKEND_FLAG_LOCAL;
                }
                if !backend.down {
                    record.flags &= !BACKEND_FLAG_DOWN;
                }
            }
        }
        let in_use: HashSet<u32> = records.keys().copied().collect();
        {
            let mut map: Array<_, BackendInfo> = self.map_mut(BACKENDS_MAP)?;
            for (id, record) in &records {
                map.set(*id, record, 0).map_err(map_error(BACKENDS_MAP))?;
            }
        }
        let indexed: Vec<((Ipv4Addr, u16), u32)> = self
            .backend_ids
            .iter()
            .filter(|(_, id)| records.contains_key(id))
            .map(|(key, id)| (*key, *id))
            .collect();
        for ((address, port), id) in indexed {
            self.index_backend(address, port, id)?;
        }
        for id in self.backend_ids.values() {
            if in_use.contains(id) {
                self.retired.remove(id);
            } else if self.retired.insert(*id) {
                debug!(id, "backend retired; kept while flows use it");
            }
        }

        let wanted: HashSet<VipKey> = vips.iter().map(DesiredVip::key).collect::<Result<_>>()?;
        let gone: Vec<VipKey> = self
            .vips
            .keys()
            .filter(|k| !wanted.contains(k))
            .copied()
            .collect();
        for key in gone {
            let mut map: BpfHashMap<_, VipKey, VipInfo> = self.map_mut(VIPS_MAP)?;
            map.remove(&key).map_err(map_error(VIPS_MAP))?;
            if let Some(slot) = self.vips.remove(&key) {
                info!(vip = %slot.name, "VIP removed from the data plane");
            }
        }
        for vip in vips {
            self.apply_vip(vip)?;
        }
        Ok(())
    }

    /// Makes BACKEND_INDEX tell `address:port`'s packets as a backend's.
    pub(super) fn index_backend(&mut self, address: Ipv4Addr, port: u16, id: u32) -> Result<()> {
        let mut index: BpfHashMap<_, BackendAddr, u32> = self.map_mut(BACKEND_INDEX_MAP)?;
        index
            .insert(backend_addr(address, port), id, 0)
            .map_err(map_error(BACKEND_INDEX_MAP))
    }

    fn backend_id(&mut self, address: Ipv4Addr, port: u16) -> Result<u32> {
        if let Some(id) = self.backend_ids.get(&(address, port)) {
            return Ok(*id);
        }
        let used: HashSet<u32> = self.backend_ids.values().copied().collect();
        let id = (0..ha_common::MAX_BACKENDS)
            .find(|id| !used.contains(id))
            .ok_or(DataPlaneError::TooManyBackends)?;
        // A new backend starts unsuspected, whatever the id's last holder did.
        self.clear_suspect_id(id)?;
        self.backend_ids.insert((address, port), id);
        Ok(id)
    }

    fn apply_vip(&mut self, vip: &DesiredVip) -> Result<()> {
        let key = vip.key()?;
        let mut members = Vec::with_capacity(vip.backends.len());
        for b in &vip.backends {
            let id = self.backend_ids[&(vip.backend_ipv4(b)?, b.port)];
            members.push(MaglevBackend {
                address: b.address,
                port: b.port,
                weight: b.weight,
                id,
            });
        }
        let flags = if vip.enabled { VIP_FLAG_ENABLED } else { 0 };
        let table = match self.vips.get(&key) {
            Some(existing) if existing.members == members => {
                if existing.flags == flags && existing.name == vip.name {
                    return Ok(());
                }
                existing.table.clone()
            }
            _ => build_table(&members, self.table_size),
        };

        let (slot, half, write_table) = match self.vips.get(&key) {
            Some(existing) if existing.table == table => {
                if existing.flags == flags && existing.name == vip.name {
                    return Ok(());
                }
                (existing.slot, existing.active_half, false)
            }
            Some(existing) => (existing.slot, 1 - existing.active_half, true),
            None => {
                let taken: HashSet<u32> = self.vips.values().map(|v| v.slot).collect();
                let slot = (0..self.max_vips).find(|s| !taken.contains(s)).ok_or(
                    DataPlaneError::TooManyVips {
                        wanted: self.vips.len() + 1,
                        max_vips: self.max_vips,
                    },
                )?;
                (slot, 0, true)
            }
        };
        let offset = (slot * 2 + half) * self.table_size;
        if write_table {
            let started = std::time::Instant::now();
            let batched = crate::batch::update_u32_array(self.map_fd(MAGLEV_MAP)?, offset, &table);
            if let Err(e) = batched {
                debug!(error = %e, "no batch update: the Maglev table one entry at a time");
                let mut map: Array<_, u32> = self.map_mut(MAGLEV_MAP)?;
                for (i, id) in table.iter().enumerate() {
                    map.set(offset + i as u32, id, 0)
                        .map_err(map_error(MAGLEV_MAP))?;
                }
            }
            debug!(vip = %vip.name, half, elapsed = ?started.elapsed(), "Maglev table written to the idle half");
        }
        // The flip: one hash-map update replaces the whole value atomically.
        let info = VipInfo {
            slot,
            table_offset: offset,
            table_size: self.table_size,
            flags,
        };
        let mut map: BpfHashMap<_, VipKey, VipInfo> = self.map_mut(VIPS_MAP)?;
        map.insert(key, info, 0).map_err(map_error(VIPS_MAP))?;
        if write_table {
            info!(
                vip = %vip.name,
                backends = vip.backends.len(),
                enabled = vip.enabled,
                "Maglev table swapped in"
            );
        }
        self.vips.insert(
            key,
            VipSlot {
                name: vip.name.clone(),
                slot,
                active_half: half,
                table,
                members,
                flags,
            },
        );
        Ok(())
    }
}
