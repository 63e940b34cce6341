//! Connection-table operations of section 3 (docs/data-path.md, "3. A client packet to a VIP"):
//! **forgetting** a flow, the *nat key of a flow*, step 3 (when an existing entry is dropped),
//! and step **5b** (the queue of recent flows, and making room in a full table).

use ha_common::{
    BACKEND_FLAG_DOWN, Event, FLOW_ASSURED, FLOW_FIN_BACKEND, FLOW_FIN_CLIENT, FLOW_RESET, Flow,
    FlowKey, MAKE_ROOM_ATTEMPTS, NatKey, QueueHead,
};

use crate::Ctx;
use crate::ctx::{Refused, Update};
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

    /// **Forgetting** a flow (local or NATed): if `BACKENDS[backend_id]` exists and
    /// `REVERSE_NAT[nat key of the flow]` exists and names `key` (its `flow` is `key`), remove
    /// it; then remove `CONNTRACK[key]`.
    pub fn forget(&mut self, key: &FlowKey, flow: &Flow) {
        if let Some(nat_key) = self.nat_key_of(key, flow)
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

    /// **5b, recording**: `key` goes into this CPU's queue of recent flows at `next` (taken
    /// as 0 when `>= embryonic_slots`); `next` moves on, wrapping at `embryonic_slots`, and the
    /// length grows up to `embryonic_slots` (the oldest record is then overwritten). A `next`
    /// beyond the `EMBRYONIC` array skips the whole step (the array lookup fails).
    pub fn record(&mut self, key: FlowKey) {
        let slots = self.config.settings.embryonic_slots;
        let head = self.state.embryonic_head;
        let next = if head.next >= slots { 0 } else { head.next };
        let Some(cell) = self.state.embryonic.get_mut(next as usize) else {
            return;
        };
        *cell = key;
        let after = next + 1;
        self.state.embryonic_head = QueueHead {
            next: if after >= slots { 0 } else { after },
            len: if head.len < slots {
                head.len + 1
            } else {
                head.len
            },
        };
    }

    /// **5b, making room** in a full `CONNTRACK`: up to `MAKE_ROOM_ATTEMPTS` records are taken
    /// from the oldest end of the queue (the length shrinks by one each); the first whose flow
    /// is expired (`expired_flow_replaced`) or evictable (`embryonic_evicted`) is forgotten and
    /// `true` returned. A record without a flow, or of an established one, is passed over.
    /// `false` when the queue is empty, its head is out of range, or nothing could go.
    pub fn make_room(&mut self) -> bool {
        let slots = self.config.settings.embryonic_slots;
        for _ in 0..MAKE_ROOM_ATTEMPTS {
            let head = self.state.embryonic_head;
            if head.len == 0 || head.len > slots || head.next >= slots {
                return false;
            }
            let oldest = (head.next + slots - head.len) % slots;
            self.state.embryonic_head.len -= 1;
            let Some(key) = self.state.embryonic.get(oldest as usize).copied() else {
                return false;
            };
            let Some(flow) = self.flow(&key) else {
                continue;
            };
            if self.expired(&key, &flow) {
                self.forget(&key, &flow);
                self.count_event(Event::ExpiredFlowReplaced);
                return true;
            }
            if is_evictable(flow.flags) {
                self.forget(&key, &flow);
                self.count_event(Event::EmbryonicEvicted);
                return true;
            }
        }
        false
    }

    /// Inserts a new flow (`mode`: replace, or only if absent), making room once if the table
    /// is full, and records it in the queue if it went in.
    pub fn insert_new_flow(&mut self, key: FlowKey, flow: Flow, mode: Update) -> bool {
        let inserted = match self.put_flow(key, flow, mode) {
            Ok(()) => true,
            Err(Refused::Full) => self.make_room() && self.put_flow(key, flow, mode).is_ok(),
            Err(Refused::Exists) => false,
        };
        if inserted {
            self.record(key);
        }
        inserted
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
        state
            .conntrack
            .insert(key(4), flow(ha_common::FLOW_LOCAL, 0, 4));
        state.reverse.insert(nat_key(4), entry(key(4)));
        state.conntrack.insert(
            key(5),
            Flow {
                backend_id: 1,
                ..flow(0, 0, 5)
            },
        );
        state.reverse.insert(nat_key(5), entry(key(5)));
        let mut ctx = Ctx::new(&config, &mut state, crate::Capacity::both(10), 0);
        for n in [1, 2, 4, 5] {
            let f = ctx.flow(&key(n)).unwrap();
            ctx.forget(&key(n), &f);
        }
        assert!(state.conntrack.is_empty());
        // Kept: the one naming another flow, the one of a missing backend (a local
        // flow's goes with it as a NATed flow's does).
        assert_eq!(
            state.reverse.keys().copied().collect::<Vec<_>>(),
            vec![nat_key(2), nat_key(5)]
        );
    }

    #[test]
    fn a_full_table_evicts_the_oldest_unestablished_record_and_spares_established_ones() {
        use crate::Capacity;
        let config = config(4);
        let mut state = State::empty(4);
        let now = 1000 * G;
        {
            let mut ctx = Ctx::new(&config, &mut state, Capacity::both(3), now);
            // Three flows: the first established, the second embryonic, the third embryonic.
            assert!(ctx.insert_new_flow(
                key(1),
                flow(FLOW_SEEN_REPLY | FLOW_ASSURED, now, 1),
                Update::Any
            ));
            assert!(ctx.insert_new_flow(key(2), flow(0, now, 2), Update::Any));
            assert!(ctx.insert_new_flow(key(3), flow(FLOW_SEEN_REPLY, now, 3), Update::Any));
            assert_eq!(ctx.state.embryonic_head, QueueHead { next: 3, len: 3 });
            // Full: the oldest record (established) is passed over, the next goes.
            assert!(ctx.insert_new_flow(key(4), flow(0, now, 4), Update::Any));
            assert!(
                ctx.flow(&key(1)).is_some(),
                "established flows are never evicted"
            );
            assert!(ctx.flow(&key(2)).is_none());
            assert_eq!(ctx.state.event(Event::EmbryonicEvicted), 1);
            assert_eq!(ctx.state.embryonic_head, QueueHead { next: 0, len: 2 });
            assert_eq!(ctx.state.embryonic, vec![key(1), key(2), key(3), key(4)]);
        }
        // Only established flows left to look at: nothing goes, the new one is refused.
        state.conntrack.get_mut(&key(3)).unwrap().flags = FLOW_SEEN_REPLY | FLOW_ASSURED;
        state.conntrack.get_mut(&key(4)).unwrap().flags = FLOW_SEEN_REPLY | FLOW_ASSURED;
        let mut ctx = Ctx::new(&config, &mut state, Capacity::both(3), now);
        assert!(!ctx.insert_new_flow(key(5), flow(0, now, 5), Update::Any));
        assert_eq!(
            ctx.state.embryonic_head.len, 0,
            "every record was looked at"
        );
        assert_eq!(ctx.state.conntrack.len(), 3);
        // An expired record goes as expired; the queue refills as flows are made.
        let later = now + 10_000 * G;
        let mut ctx = Ctx::new(&config, &mut state, Capacity::both(3), later);
        assert!(
            !ctx.insert_new_flow(key(5), flow(0, later, 5), Update::Any),
            "queue empty"
        );
        ctx.record(key(4));
        assert!(ctx.insert_new_flow(key(5), flow(0, later, 5), Update::Any));
        assert_eq!(ctx.state.event(Event::ExpiredFlowReplaced), 1);
    }

    #[test]
    fn the_queue_wraps_and_keeps_the_newest() {
        use crate::Capacity;
        let mut state = State::empty(2);
        let two = config(2);
        let mut ctx = Ctx::new(&two, &mut state, Capacity::both(10), 0);
        for n in 1..=5 {
            ctx.record(key(n));
        }
        assert_eq!(ctx.state.embryonic, vec![key(5), key(4)]);
        assert_eq!(ctx.state.embryonic_head, QueueHead { next: 1, len: 2 });
        // A head beyond the array skips the step; slots 0 still writes slot 0.
        let mut state = State::empty(1);
        let config0 = config(0);
        let mut ctx = Ctx::new(&config0, &mut state, Capacity::both(10), 0);
        ctx.record(key(1));
        assert_eq!(ctx.state.embryonic, vec![key(1)]);
        assert_eq!(ctx.state.embryonic_head, QueueHead { next: 0, len: 0 });
        assert!(!ctx.make_room(), "no slots: nothing to look at");
    }
}
