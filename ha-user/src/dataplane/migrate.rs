//! Migrating resized flow tables: the old pinned maps, held open, copied
//! into the new ones before the program switch and again right after it.

use std::{
    collections::{HashMap, HashSet},
    path::Path,
};

use aya::maps::{Array, HashMap as BpfHashMap, MapData};
use ha_common::{
    BACKENDS_MAP, BackendInfo, CONNTRACK_MAP, Flow, FlowKey, NatEntry, NatKey, REVERSE_NAT_MAP,
};
use tracing::info;

use super::{DataPlane, DataPlaneError, Result, map_error};

/// A flow table being migrated to a new size, held open by this agent.
pub(super) enum OldTable {
    Flows(BpfHashMap<MapData, FlowKey, Flow>),
    Reverse(BpfHashMap<MapData, NatKey, NatEntry>),
}

impl OldTable {
    pub(super) fn open(name: &str, path: &Path) -> Result<Self> {
        let pin_error = |reason: String| DataPlaneError::Pin {
            path: path.display().to_string(),
            reason,
        };
        let data = MapData::from_pin(path).map_err(|e| pin_error(e.to_string()))?;
        let map = aya::maps::Map::HashMap(data);
        match name {
            CONNTRACK_MAP => Ok(OldTable::Flows(
                BpfHashMap::try_from(map).map_err(|e| pin_error(e.to_string()))?,
            )),
            REVERSE_NAT_MAP => Ok(OldTable::Reverse(
                BpfHashMap::try_from(map).map_err(|e| pin_error(e.to_string()))?,
            )),
            _ => Err(pin_error("this table cannot be resized".to_string())),
        }
    }
}

impl DataPlane {
    /// Copies the entries of the resized tables being migrated into the new
    /// ones. The first pass (`after_switch` false) copies everything; the
    /// second, right after the program switch, copies what the old program
    /// created meanwhile, and where the new program already picked such a
    /// flow up mid-stream with another NAT port, puts the original back (the
    /// backend knows the connection by it) and frees the pickup's port. The
    /// old tables go after the second pass.
    ///
    /// # Errors
    /// A map read or write failing.
    pub(super) fn migrate(&mut self, after_switch: bool) -> Result<()> {
        if self.migrating.is_empty() {
            return Ok(());
        }
        let old = std::mem::take(&mut self.migrating);
        let result = self.copy_migrating(&old, after_switch);
        if !after_switch {
            self.migrating = old;
        }
        if let Ok((copied, corrected)) = result {
            info!(
                copied,
                corrected,
                pass = if after_switch {
                    "after the switch"
                } else {
                    "before the switch"
                },
                "migrated flow table entries"
            );
        }
        result.map(|_| ())
    }

    fn copy_migrating(&mut self, old: &[OldTable], after_switch: bool) -> Result<(usize, usize)> {
        let (mut copied, mut corrected) = (0, 0);
        // Reverse entries first: a restored flow finds its own back.
        for table in old {
            if let OldTable::Reverse(old) = table {
                let entries: Vec<(NatKey, NatEntry)> = old
                    .iter()
                    .collect::<Result<_, _>>()
                    .map_err(map_error(REVERSE_NAT_MAP))?;
                let current: HashSet<NatKey> = if after_switch {
                    self.reverse_entries()?
                        .into_iter()
                        .map(|(k, _)| k)
                        .collect()
                } else {
                    HashSet::new()
                };
                for (key, entry) in entries.iter().filter(|(k, _)| !current.contains(k)) {
                    self.insert_reverse_entry(key, entry)?;
                    copied += 1;
                }
            }
        }
        for table in old {
            if let OldTable::Flows(old) = table {
                let entries: Vec<(FlowKey, Flow)> = old
                    .iter()
                    .collect::<Result<_, _>>()
                    .map_err(map_error(CONNTRACK_MAP))?;
                let current: HashMap<FlowKey, Flow> = if after_switch {
                    self.flows()?.into_iter().collect()
                } else {
                    HashMap::new()
                };
                for (key, flow) in entries {
                    match current.get(&key) {
                        None => {
                            self.insert_flow(&key, &flow)?;
                            copied += 1;
                        }
                        Some(now)
                            if (now.nat_addr, now.nat_port) != (flow.nat_addr, flow.nat_port) =>
                        {
                            if now.flags & ha_common::FLOW_LOCAL == 0 {
                                let backends: Array<_, BackendInfo> = self.map(BACKENDS_MAP)?;
                                if let Ok(backend) = backends.get(&now.backend_id, 0) {
                                    let pickup = NatKey::new(
                                        &backend,
                                        now.nat_addr,
                                        now.nat_port,
                                        key.protocol,
                                    );
                                    let _ = self.remove_reverse_entry(&pickup);
                                }
                            }
                            self.insert_flow(&key, &flow)?;
                            corrected += 1;
                        }
                        Some(_) => {}
                    }
                }
            }
        }
        Ok((copied, corrected))
    }
}
