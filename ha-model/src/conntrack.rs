//! Connection-table operations of section 3 (docs/data-path.md, "3. A client packet to a VIP"):
//! **forgetting** a flow, the *nat key of a flow*, step 3 (when an existing entry is dropped),
//! and step **5b** (admitting a new entry to the embryonic ring).

use ha_common::{
    BACKEND_FLAG_DOWN, Event, FLOW_ASSURED, FLOW_FIN_BACKEND, FLOW_FIN_CLIENT, FLOW_LOCAL,
    FLOW_RESET, Flow, FlowKey, NatKey,
};

use crate::Ctx;
use crate::flow::{is_bare_syn, is_evictable, is_expired};
use crate::parse::Packet;

impl Ctx<'_> {
    /// Whether `flow` (of `key`) is expired now.
    pub fn expired(&self, key: &FlowKey, flow: &Flow) -> bool {
        is_expired(flow, key.protocol, &self.config.settings, self.now)
    }

    /// The *nat key of a flow*: (`BACKENDS[backend_id]`.addr, `nat_addr`,
    /// `BACKENDS[backend_id]`.port, `nat_port`, protocol), the protocol being the flow key's.
    /// `None` when the backend record is missing.
    pub fn nat_key_of(&self, key: &FlowKey, flow: &Flow) -> Option<NatKey> {
        let backend = self.backend(flow.backend_id)?;
        Some(NatKey {
            backend_addr: backend.addr,
            lb_addr: flow.nat_addr,
            backend_port: backend.port,
            nat_port: flow.nat_port,
            protocol: key.protocol,
            _pad: [0; 3],
        })
    }

    /// **Forgetting** a flow: unless `LOCAL`, if `BACKENDS[backend_id]` exists and
    /// `REVERSE_NAT[nat key of the flow]` exists and names `key` (its `flow` is `key`), remove
    /// it; then remove `CONNTRACK[key]`.
    pub fn forget(&mut self, key: &FlowKey, flow: &Flow) {
        if flow.flags & FLOW_LOCAL == 0
            && let Some(nat_key) = self.nat_key_of(key, flow)
            && self
                .state
                .reverse
                .get(&nat_key)
                .is_some_and(|entry| entry.flow == *key)
        {
            self.state.reverse.remove(&nat_key);
        }
        self.state.conntrack.remove(key);
    }

    /// Step 3: why the existing entry `flow` of `key` must be dropped for `packet`, as the event
    /// to count, checked in the spec's order (expired; backend missing, addr 0 or `DOWN`; a bare SYN on a flow that
    /// has `ASSURED`, a FIN or `RESET`). `None`: the entry stays.
    pub fn stale_reason(&self, key: &FlowKey, flow: &Flow, packet: &Packet) -> Option<Event> {
        if self.expired(key, flow) {
            return Some(Event::ExpiredFlowReplaced);
        }
        if self
            .backend(flow.backend_id)
            .is_none_or(|backend| backend.addr == 0 || backend.flags & BACKEND_FLAG_DOWN != 0)
        {
            return Some(Event::MovedFromDownBackend);
        }
        let started = FLOW_ASSURED | FLOW_FIN_CLIENT | FLOW_FIN_BACKEND | FLOW_RESET;
        if packet.is_tcp() && is_bare_syn(packet.flags()) && flow.flags & started != 0 {
            return Some(Event::SynRestartedFlow);
        }
        None
    }

    /// **5b. Admitting a new entry to the embryonic ring** for `key`.
    ///
    /// Skipped when `Settings.embryonic_slots` is 0. The slot `s` is `EMBRYONIC_HEAD`, taken as 0
    /// when `>= embryonic_slots`; if `s` is beyond the `EMBRYONIC` array (the setting is larger
    /// than the array), the array lookup fails and the whole step is skipped (no eviction, no
    /// head update). The occupant, if not empty, not `key`, and in `CONNTRACK`, is forgotten if
    /// expired (`expired_flow_replaced`), else if evictable (`embryonic_evicted`). Then
    /// `EMBRYONIC[s] = key` and the head moves on, wrapping at `embryonic_slots`.
    pub fn admit(&mut self, key: FlowKey) {
        let slots = self.config.settings.embryonic_slots;
        if slots == 0 {
            return;
        }
        let head = self.state.embryonic_head;
        let s = if head >= slots { 0 } else { head };
        let Some(occupant) = self.state.embryonic.get(s as usize).copied() else {
            return;
        };
        if occupant != FlowKey::EMPTY
            && occupant != key
            && let Some(flow) = self.flow(&occupant)
        {
            if self.expired(&occupant, &flow) {
                self.forget(&occupant, &flow);
                self.count_event(Event::ExpiredFlowReplaced);
            } else if is_evictable(flow.flags) {
                self.forget(&occupant, &flow);
                self.count_event(Event::EmbryonicEvicted);
            }
        }
        if let Some(slot) = self.state.embryonic.get_mut(s as usize) {
            *slot = key;
        }
        let next = s + 1;
        self.state.embryonic_head = if next >= slots { 0 } else { next };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Config, State};
    use ha_common::{
        BackendInfo, FLOW_SEEN_REPLY, LAST_SEEN_GRANULARITY_NS, NatEntry, PROTO_TCP, Settings,
    };

    const G: u64 = LAST_SEEN_GRANULARITY_NS;

    fn key(n: u8) -> FlowKey {
        FlowKey {
            src_addr: u32::from_ne_bytes([10, 0, 0, n]),
            dst_addr: u32::from_ne_bytes([10, 0, 0, 254]),
            src_port: 1000,
            dst_port: 80,
            protocol: PROTO_TCP,
            _pad: [0; 3],
        }
    }

    fn config(slots: u32) -> Config {
        Config {
            settings: Settings {
                timeouts_ns: ha_common::Timeouts {
                    tcp_syn_ns: 10 * G,
                    tcp_established_ns: 100 * G,
                    ..ha_common::Timeouts::default()
                }
                .table(),
                embryonic_slots: slots,
                ..Settings::default()
            },
            backends: vec![BackendInfo {
                addr: 7,
                port: 8,
                flags: 0,
                _pad: 0,
            }],
            ..Config::default()
        }
    }

    fn flow(flags: u32, last_seen_ns: u64, nat_port: u16) -> Flow {
        Flow {
            flags,
            last_seen_ns,
            nat_addr: 9,
            nat_port,
            ..Flow::default()
        }
    }

    fn nat_key(port: u16) -> NatKey {
        NatKey {
            backend_addr: 7,
            lb_addr: 9,
            backend_port: 8,
            nat_port: port,
            protocol: PROTO_TCP,
            _pad: [0; 3],
        }
    }

    fn entry(k: FlowKey) -> NatEntry {
        NatEntry {
            flow: k,
            ..NatEntry::default()
        }
    }

    #[test]
    fn forgetting_removes_the_reverse_entry_only_if_it_names_the_flow() {
        let config = config(0);
        let mut state = State::empty(0);
        state.conntrack.insert(key(1), flow(0, 0, 1));
        state.reverse.insert(nat_key(1), entry(key(1)));
        state.conntrack.insert(key(2), flow(0, 0, 2));
        state.reverse.insert(nat_key(2), entry(key(3)));
        state.conntrack.insert(key(4), flow(FLOW_LOCAL, 0, 4));
        state.reverse.insert(nat_key(4), entry(key(4)));
        state.conntrack.insert(
            key(5),
            Flow {
                backend_id: 1,
                ..flow(0, 0, 5)
            },
        );
        state.reverse.insert(nat_key(5), entry(key(5)));
        let mut ctx = Ctx::new(&config, &mut state, 10, 0);
        for n in [1, 2, 4, 5] {
            let f = ctx.flow(&key(n)).unwrap();
            ctx.forget(&key(n), &f);
        }
        assert!(state.conntrack.is_empty());
        // Kept: the one naming another flow, the local flow's, the one of a missing backend.
        assert_eq!(
            state.reverse.keys().copied().collect::<Vec<_>>(),
            vec![nat_key(2), nat_key(4), nat_key(5)]
        );
    }

    #[test]
    fn the_ring_evicts_the_oldest_unassured_and_spares_established() {
        let config = config(2);
        let mut state = State::empty(2);
        let now = 5 * G;
        {
            let mut ctx = Ctx::new(&config, &mut state, 10, now);
            ctx.state.conntrack.insert(key(1), flow(0, now, 1));
            ctx.state.reverse.insert(nat_key(1), entry(key(1)));
            ctx.admit(key(1));
            ctx.state
                .conntrack
                .insert(key(2), flow(FLOW_SEEN_REPLY | FLOW_ASSURED, now, 2));
            ctx.admit(key(2));
            assert_eq!(ctx.state.embryonic_head, 0);
            // Slot 0 holds key 1 (embryonic): evicted with its reverse entry.
            ctx.admit(key(3));
            assert!(ctx.flow(&key(1)).is_none());
            assert!(ctx.state.reverse.is_empty());
            assert_eq!(ctx.state.event(Event::EmbryonicEvicted), 1);
            // Slot 1 holds key 2 (established): kept, slot overwritten.
            ctx.admit(key(4));
            assert!(ctx.flow(&key(2)).is_some());
            assert_eq!(ctx.state.embryonic, vec![key(3), key(4)]);
            // A slot holding the key itself, or a key not in the table: nothing happens.
            ctx.state.conntrack.insert(key(3), flow(0, now, 3));
            ctx.admit(key(3));
            assert!(ctx.flow(&key(3)).is_some());
            ctx.admit(key(6));
            assert_eq!(ctx.state.event(Event::EmbryonicEvicted), 1);
        }
        // An expired occupant (even established) is forgotten as expired.
        state
            .conntrack
            .insert(key(6), flow(FLOW_SEEN_REPLY | FLOW_ASSURED, 0, 6));
        assert_eq!(state.embryonic_head, 0);
        let mut ctx = Ctx::new(&config, &mut state, 10, 200 * G);
        ctx.admit(key(7)); // slot 0 holds key 3 (expired by now)
        ctx.admit(key(8)); // slot 1 holds key 6 (expired)
        assert_eq!(ctx.state.event(Event::ExpiredFlowReplaced), 2);
        assert!(ctx.flow(&key(3)).is_none() && ctx.flow(&key(6)).is_none());
    }

    #[test]
    fn the_ring_bound() {
        // The setting is 0: skipped entirely.
        let mut state = State::empty(2);
        Ctx::new(&config(0), &mut state, 10, 0).admit(key(1));
        assert_eq!(state.embryonic, vec![FlowKey::EMPTY; 2]);
        // A head at or beyond the setting starts at 0.
        let mut state = State::empty(3);
        state.embryonic_head = 7;
        Ctx::new(&config(2), &mut state, 10, 0).admit(key(1));
        assert_eq!(state.embryonic[0], key(1));
        assert_eq!(state.embryonic_head, 1);
        // The head wraps at the setting, not at the array size.
        Ctx::new(&config(2), &mut state, 10, 0).admit(key(2));
        assert_eq!(state.embryonic_head, 0);
        assert_eq!(state.embryonic[2], FlowKey::EMPTY);
        // A setting larger than the array: slots beyond it are skipped.
        let mut state = State::empty(1);
        let config = config(3);
        for n in 1..=4 {
            Ctx::new(&config, &mut state, 10, 0).admit(key(n));
        }
        // head: 0 -> 1 (slot 0 = key 1), slot 1 missing: skipped (head stays 1) ...
        assert_eq!(state.embryonic, vec![key(1)]);
        assert_eq!(state.embryonic_head, 1);
    }
}
