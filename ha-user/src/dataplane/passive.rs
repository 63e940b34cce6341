//! Passive health's maps (docs/data-path.md, "Passive health"): the SUSPECT
//! array the data path sets and the agent clears, and the PASSIVE_EVENTS
//! ring the agent reads. A program built without them (an older object)
//! leaves passive health off: every call here then says so instead of failing.

use std::net::Ipv4Addr;

use aya::maps::{Array, MapData, RingBuf};
use ha_common::{PASSIVE_EVENTS_MAP, PassiveEvent, SUSPECT_MAP};

use super::{DataPlane, DataPlaneError, Result, map_error};

/// The PASSIVE_EVENTS ring, owned by the task that reads it.
pub type PassiveEvents = RingBuf<MapData>;

impl DataPlane {
    /// Whether the program has passive health (its SUSPECT map).
    pub fn has_passive_health(&self) -> bool {
        self.ebpf.map(SUSPECT_MAP).is_some()
    }

    /// Takes the PASSIVE_EVENTS ring out of the program's maps, for the task
    /// that reads it (one reader). `Ok(None)`: the program has none.
    ///
    /// # Errors
    /// The map exists but is not a ring buffer, or mapping it failed.
    pub fn take_passive_ring(&mut self) -> Result<Option<PassiveEvents>> {
        let Some(map) = self.ebpf.take_map(PASSIVE_EVENTS_MAP) else {
            return Ok(None);
        };
        RingBuf::try_from(map)
            .map(Some)
            .map_err(map_error(PASSIVE_EVENTS_MAP))
    }

    /// Clears backend `id`'s suspect flag (writes 0). `Ok(false)` when the
    /// program has no SUSPECT map.
    ///
    /// # Errors
    /// The map write failing.
    pub fn clear_suspect_id(&mut self, id: u32) -> Result<bool> {
        let mut map: Array<_, u64> = match self.map_mut(SUSPECT_MAP) {
            Ok(map) => map,
            Err(DataPlaneError::MissingMap(_)) => return Ok(false),
            Err(e) => return Err(e),
        };
        map.set(id, 0, 0).map_err(map_error(SUSPECT_MAP))?;
        Ok(true)
    }

    /// Clears the suspect flag of the backend at `address:port`, if it has an id.
    ///
    /// # Errors
    /// As [`DataPlane::clear_suspect_id`].
    pub fn clear_suspect(&mut self, address: Ipv4Addr, port: u16) -> Result<bool> {
        match self.backend_ids.get(&(address, port)).copied() {
            Some(id) => self.clear_suspect_id(id),
            None => Ok(false),
        }
    }

    /// The backend that has id `id` now (`None`: no backend has it).
    pub fn backend_of_id(&self, id: u32) -> Option<(Ipv4Addr, u16)> {
        self.backend_ids
            .iter()
            .find(|(_, v)| **v == id)
            .map(|(key, _)| *key)
    }
}

/// One record of the ring: a [`PassiveEvent`] (`None`: too short, from a
/// data path that does not agree on the layout).
pub fn parse_passive_event(bytes: &[u8]) -> Option<PassiveEvent> {
    let backend_id = u32::from_ne_bytes(bytes.get(0..4)?.try_into().ok()?);
    let reason = u32::from_ne_bytes(bytes.get(4..8)?.try_into().ok()?);
    let at_ns = u64::from_ne_bytes(bytes.get(8..16)?.try_into().ok()?);
    Some(PassiveEvent {
        backend_id,
        reason,
        at_ns,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_reads_back_as_the_data_path_wrote_it() {
        let event = PassiveEvent {
            backend_id: 7,
            reason: ha_common::PASSIVE_REASON_RST_TO_SYN,
            at_ns: 123_456_789_012,
        };
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&event.backend_id.to_ne_bytes());
        bytes.extend_from_slice(&event.reason.to_ne_bytes());
        bytes.extend_from_slice(&event.at_ns.to_ne_bytes());
        assert_eq!(bytes.len(), std::mem::size_of::<PassiveEvent>());
        assert_eq!(parse_passive_event(&bytes), Some(event));
        assert_eq!(parse_passive_event(&bytes[..12]), None, "short: refused");
    }
}
