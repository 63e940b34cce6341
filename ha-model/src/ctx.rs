//! The context one frame (or one sweep) runs in: the maps, the clock, and the map primitives
//! every step uses (bounded hash-map inserts, counters).

use std::collections::BTreeMap;

use ha_common::{BackendInfo, Event, Flow, FlowKey, NatEntry, NatKey, TrafficCounter, Verdict};

use crate::classify::Class;
use crate::{
    BACKEND_STATS_SLOTS, Capacity, Config, Fib, State, VIP_STATS_SLOTS, XDP_DROP, XDP_PASS,
};

/// How a hash-map update treats an existing key (`bpf_map_update_elem` flags).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Update {
    /// `BPF_NOEXIST`: "insert only if absent".
    NoExist,
    /// `BPF_ANY`: "replacing any entry".
    Any,
}

/// Why a hash-map update was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// `EEXIST`: the key is there and the update was "only if absent".
    Exists,
    /// `E2BIG`: a new key, and the map is full.
    Full,
}

/// A plain (non-LRU) BPF hash map update: replacing an existing key always works (unless
/// `NoExist`); a new key fails when the map already holds `capacity` entries.
pub fn map_update<K: Ord, V>(
    map: &mut BTreeMap<K, V>,
    capacity: usize,
    key: K,
    value: V,
    mode: Update,
) -> Result<(), Refused> {
    if map.contains_key(&key) {
        match mode {
            Update::NoExist => Err(Refused::Exists),
            Update::Any => {
                map.insert(key, value);
                Ok(())
            }
        }
    } else if map.len() >= capacity {
        Err(Refused::Full)
    } else {
        map.insert(key, value);
        Ok(())
    }
}

/// The maps and the clock of one run of the data path (or of the agent's sweep).
///
/// Each step of the spec adds its methods in its own module.
#[derive(Debug)]
pub struct Ctx<'a> {
    /// The agent-written maps.
    pub config: &'a Config,
    /// The data-path-written maps.
    pub state: &'a mut State,
    /// Max entries of `CONNTRACK` and of `REVERSE_NAT`.
    pub capacity: Capacity,
    /// `now` of this run.
    pub now: u64,
}

impl<'a> Ctx<'a> {
    /// A context over `config` and `state` at `now`.
    pub fn new(config: &'a Config, state: &'a mut State, capacity: Capacity, now: u64) -> Ctx<'a> {
        Ctx {
            config,
            state,
            capacity,
            now,
        }
    }

    /// Runs the frame in `frame` (rewritten in place, or replaced by an ICMP error) through
    /// steps 1 to 6; returns the action and the verdict (not yet counted).
    pub fn run(&mut self, frame: &mut Vec<u8>, ingress: u32, fib: &dyn Fib) -> (u32, Verdict) {
        let packet = match crate::parse::parse(frame) {
            Ok(packet) => packet,
            Err(Verdict::PassIcmp) => match crate::icmp::parse_error(frame) {
                Some(error) => return self.icmp_error(&error, frame, ingress, fib),
                None => return (XDP_PASS, Verdict::PassIcmp),
            },
            Err(verdict) => return (XDP_PASS, verdict),
        };
        match self.classify(&packet) {
            Class::ToVip(vip) => self.client_to_vip(&packet, vip, frame, ingress, fib),
            Class::Reply { nat_key, entry } => {
                self.backend_reply(&packet, nat_key, entry, frame, ingress, fib)
            }
            Class::Pass(verdict) => (XDP_PASS, verdict),
            Class::Drop(verdict) => (XDP_DROP, verdict),
        }
    }

    /// `BACKENDS[id]`.
    pub fn backend(&self, id: u32) -> Option<BackendInfo> {
        self.config.backend(id)
    }

    /// `CONNTRACK[key]` (a copy).
    pub fn flow(&self, key: &FlowKey) -> Option<Flow> {
        self.state.conntrack.get(key).copied()
    }

    /// `CONNTRACK` update.
    pub fn put_flow(&mut self, key: FlowKey, flow: Flow, mode: Update) -> Result<(), Refused> {
        map_update(
            &mut self.state.conntrack,
            self.capacity.conntrack,
            key,
            flow,
            mode,
        )
    }

    /// `REVERSE_NAT` update.
    pub fn put_reverse(&mut self, key: NatKey, entry: NatEntry, mode: Update) -> bool {
        map_update(
            &mut self.state.reverse,
            self.capacity.reverse,
            key,
            entry,
            mode,
        )
        .is_ok()
    }

    /// A reverse entry for `flow` to `backend_id`, created now.
    pub fn nat_entry(&self, flow: FlowKey, backend_id: u32) -> NatEntry {
        NatEntry {
            flow,
            backend_id,
            _pad: 0,
            created_ns: self.now,
        }
    }

    /// "count `event`".
    pub fn count_event(&mut self, event: Event) {
        if let Some(slot) = self.state.events.get_mut(event as usize) {
            *slot = slot.wrapping_add(1);
        }
    }

    /// The frame's one `VERDICTS` count.
    pub fn count_verdict(&mut self, verdict: Verdict, frame_len: usize) {
        if let Some(slot) = self.state.verdicts.get_mut(verdict as usize) {
            slot.packets = slot.packets.wrapping_add(1);
            slot.bytes = slot.bytes.wrapping_add(frame_len as u64);
        }
    }

    /// **Traffic** (section 3): `VIP_STATS[vip_slot]` and `BACKEND_STATS[backend_id]` count one
    /// packet of `frame_len` bytes, and a new flow when `new_flow`. A slot or id outside its array
    /// ([`VIP_STATS_SLOTS`], [`BACKEND_STATS_SLOTS`]) is not counted (the array lookup fails).
    pub fn count_traffic(
        &mut self,
        vip_slot: u32,
        backend_id: u32,
        frame_len: usize,
        new_flow: bool,
    ) {
        let add = |counter: &mut TrafficCounter| {
            counter.packets = counter.packets.wrapping_add(1);
            counter.bytes = counter.bytes.wrapping_add(frame_len as u64);
            if new_flow {
                counter.new_flows = counter.new_flows.wrapping_add(1);
            }
        };
        if vip_slot < VIP_STATS_SLOTS {
            add(self.state.vip_stats.entry(vip_slot).or_default());
        }
        if backend_id < BACKEND_STATS_SLOTS {
            add(self.state.backend_stats.entry(backend_id).or_default());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_map_updates_like_a_bpf_hash_map() {
        let mut map = BTreeMap::new();
        assert_eq!(map_update(&mut map, 2, 1, 'a', Update::NoExist), Ok(()));
        assert_eq!(
            map_update(&mut map, 2, 1, 'b', Update::NoExist),
            Err(Refused::Exists)
        );
        assert_eq!(map[&1], 'a');
        assert_eq!(map_update(&mut map, 2, 2, 'c', Update::Any), Ok(()));
        assert_eq!(
            map_update(&mut map, 2, 3, 'd', Update::Any),
            Err(Refused::Full)
        );
        assert_eq!(
            map_update(&mut map, 2, 3, 'd', Update::NoExist),
            Err(Refused::Full)
        );
        assert_eq!(
            map_update(&mut map, 2, 2, 'e', Update::Any),
            Ok(()),
            "replacing when full"
        );
        assert_eq!(map.len(), 2);
        assert_eq!(map[&2], 'e');
        assert_eq!(
            map_update(&mut map, 0, 9, 'z', Update::Any),
            Err(Refused::Full)
        );
    }
}
