//! Backend selection and NAT port claiming for a new flow (docs/data-path.md, section 3,
//! step **5** (Maglev) and **5a** (claiming a NAT port)).

use ha_common::hash::nat_port_candidate;
use ha_common::{
    BackendInfo, Event, Flow, FlowKey, NAT_PORT_ATTEMPTS, NO_BACKEND, NatEntry, NatKey,
    ORPHAN_GRACE_NS, VipInfo, port_to_wire,
};

use crate::Ctx;
use crate::ctx::Update;
use crate::flow::{is_evictable, names};

/// Who holds a NAT port candidate that this flow could not insert (5a).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortOwner {
    /// No entry (the insert failed because the table is full).
    Missing,
    /// The entry is this flow's own (`o.flow == key`).
    Own,
    /// `CONNTRACK[o.flow]` is missing or does not name this port: an orphan entry.
    Orphan(NatEntry),
    /// The owner's flow is expired.
    Expired(FlowKey, Flow),
    /// The owner's flow is evictable (a victim candidate).
    Evictable(FlowKey, Flow),
    /// The owner's flow is live and not evictable (established or closing).
    Live,
}

impl Ctx<'_> {
    /// Step 5, Maglev: `MAGLEV[table_offset + flow_hash % M]`, and its `BACKENDS` record, or
    /// `None` (`drop_no_backend`) when the slot is `NO_BACKEND` or missing, or the record is
    /// missing or has addr 0.
    ///
    /// Not in the spec, chosen here: `M == 0` selects nothing; the index is computed in `u32`,
    /// wrapping on overflow (the index is then looked up like any other).
    pub fn maglev_pick(&self, vip: &VipInfo, hash: u32) -> Option<(u32, BackendInfo)> {
        let offset = hash.checked_rem(vip.table_size)?;
        let slot = vip.table_offset.wrapping_add(offset);
        let id = *self.config.maglev.get(usize::try_from(slot).ok()?)?;
        if id == NO_BACKEND {
            return None;
        }
        let backend = self.backend(id)?;
        (backend.addr != 0).then_some((id, backend))
    }

    /// 5a: who owns the reverse entry `nat_key` that `key` could not insert.
    pub fn port_owner(&self, nat_key: &NatKey, key: &FlowKey) -> PortOwner {
        let Some(owner) = self.state.reverse.get(nat_key).copied() else {
            return PortOwner::Missing;
        };
        if owner.flow == *key {
            return PortOwner::Own;
        }
        match self.flow(&owner.flow) {
            Some(flow) if names(&flow, nat_key.lb_addr, nat_key.nat_port, owner.backend_id) => {
                if self.expired(&owner.flow, &flow) {
                    PortOwner::Expired(owner.flow, flow)
                } else if is_evictable(flow.flags) {
                    PortOwner::Evictable(owner.flow, flow)
                } else {
                    PortOwner::Live
                }
            }
            _ => PortOwner::Orphan(owner),
        }
    }

    /// **5a. Claiming a NAT port** from `nat[0]` for the new flow `key` (hash `hash`) to
    /// `backend` (`backend_id`); `pickup`: its first packet continues a connection (TCP, not
    /// a bare SYN). Returns the claimed reverse key, or `None` (no port).
    ///
    /// Three passes over the 8 candidates, each stopping at its first match:
    /// 1. a pickup takes back its own entry (`forward_recovered`);
    /// 2. the first free candidate (each one taken counts `nat_port_collision`);
    /// 3. the first candidate whose owner gives the port up: an orphan past its grace
    ///    (overwritten, `orphan_freed`), an expired flow (`expired_flow_replaced`) or an
    ///    evictable one (`embryonic_evicted`), forgotten and then inserted only if absent (if
    ///    that fails, the next candidate).
    pub fn claim_nat_port(
        &mut self,
        key: FlowKey,
        hash: u32,
        backend_id: u32,
        backend: BackendInfo,
        pickup: bool,
    ) -> Option<NatKey> {
        let range = self.config.settings.nat[0];
        let mine = self.nat_entry(key, backend_id);
        let candidates: Vec<NatKey> = (0..NAT_PORT_ATTEMPTS)
            .map(|attempt| NatKey {
                backend_addr: backend.addr,
                lb_addr: range.addr,
                backend_port: backend.port,
                nat_port: port_to_wire(nat_port_candidate(
                    hash,
                    attempt,
                    range.port_min,
                    range.port_max,
                )),
                protocol: key.protocol,
                _pad: [0; 3],
            })
            .collect();
        if pickup {
            for nat_key in &candidates {
                if self.port_owner(nat_key, &key) == PortOwner::Own {
                    self.count_event(Event::ForwardRecovered);
                    return Some(*nat_key);
                }
            }
        }
        for nat_key in &candidates {
            if self.put_reverse(*nat_key, mine, Update::NoExist) {
                return Some(*nat_key);
            }
            self.count_event(Event::NatPortCollision);
        }
        for nat_key in &candidates {
            if self.displace_owner(nat_key, &key, mine) {
                return Some(*nat_key);
            }
        }
        None
    }

    /// 5a's third pass for one candidate `nat_key` of the flow `key` (whose entry would be
    /// `mine`): true when its owner gives it up and `mine` went in.
    pub fn displace_owner(&mut self, nat_key: &NatKey, key: &FlowKey, mine: NatEntry) -> bool {
        let (owner_key, owner_flow, event) = match self.port_owner(nat_key, key) {
            PortOwner::Orphan(owner)
                if self.now > owner.created_ns.saturating_add(ORPHAN_GRACE_NS) =>
            {
                if self.put_reverse(*nat_key, mine, Update::Any) {
                    self.count_event(Event::OrphanFreed);
                    return true;
                }
                return false;
            }
            // This flow's own entry is an orphan for pass 3 too (its flow is missing).
            PortOwner::Own => match self.state.reverse.get(nat_key).copied() {
                Some(owner) if self.now > owner.created_ns.saturating_add(ORPHAN_GRACE_NS) => {
                    if self.put_reverse(*nat_key, mine, Update::Any) {
                        self.count_event(Event::OrphanFreed);
                        return true;
                    }
                    return false;
                }
                _ => return false,
            },
            PortOwner::Expired(k, f) => (k, f, Event::ExpiredFlowReplaced),
            PortOwner::Evictable(k, f) => (k, f, Event::EmbryonicEvicted),
            _ => return false,
        };
        self.forget(&owner_key, &owner_flow);
        self.count_event(event);
        self.put_reverse(*nat_key, mine, Update::NoExist)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Config, State};
    use ha_common::hash::flow_hash;
    use ha_common::{
        FLOW_ASSURED, FLOW_LOCAL, FLOW_SEEN_REPLY, LAST_SEEN_GRANULARITY_NS, NatRange, PROTO_TCP,
        Settings, addr_to_wire,
    };

    const G: u64 = LAST_SEEN_GRANULARITY_NS;
    const NOW: u64 = 1000 * G;

    fn backend() -> BackendInfo {
        BackendInfo {
            addr: addr_to_wire([10, 0, 1, 1]),
            port: port_to_wire(8080),
            flags: 0,
            _pad: 0,
        }
    }

    fn config(port_min: u16, port_max: u16) -> Config {
        let mut settings = Settings {
            timeouts_ns: ha_common::Timeouts {
                tcp_syn_ns: 10 * G,
                tcp_established_ns: 100 * G,
                ..ha_common::Timeouts::default()
            }
            .table(),
            ..Settings::default()
        };
        settings.nat[0] = NatRange {
            addr: addr_to_wire([10, 0, 0, 2]),
            port_min,
            port_max,
        };
        Config {
            settings,
            backends: vec![backend(), backend()],
            maglev: vec![0, NO_BACKEND, 1, 5],
            ..Config::default()
        }
    }

    fn key(n: u8) -> FlowKey {
        FlowKey {
            src_addr: addr_to_wire([10, 0, 0, n]),
            dst_addr: addr_to_wire([10, 0, 0, 254]),
            src_port: port_to_wire(40000),
            dst_port: port_to_wire(80),
            protocol: PROTO_TCP,
            _pad: [0; 3],
        }
    }

    fn nk(port: u16) -> NatKey {
        NatKey {
            backend_addr: backend().addr,
            lb_addr: addr_to_wire([10, 0, 0, 2]),
            backend_port: backend().port,
            nat_port: port_to_wire(port),
            protocol: PROTO_TCP,
            _pad: [0; 3],
        }
    }

    /// Puts flow `k` in both tables at `port` with these flags and time.
    fn own(state: &mut State, k: FlowKey, port: u16, flags: u32, last_seen_ns: u64) {
        state.conntrack.insert(
            k,
            Flow {
                backend_id: 0,
                flags,
                last_seen_ns,
                nat_addr: addr_to_wire([10, 0, 0, 2]),
                nat_port: port_to_wire(port),
                ..Flow::default()
            },
        );
        state.reverse.insert(
            nk(port),
            NatEntry {
                flow: k,
                backend_id: 0,
                _pad: 0,
                created_ns: last_seen_ns,
            },
        );
    }

    fn claim(config: &Config, state: &mut State, k: FlowKey, capacity: usize) -> Option<u16> {
        let mut ctx = Ctx::new(config, state, crate::Capacity::both(capacity), NOW);
        ctx.claim_nat_port(k, flow_hash(&k), 0, backend(), false)
            .map(|nat_key| ha_common::port_from_wire(nat_key.nat_port))
    }

    #[test]
    fn maglev_slots() {
        let config = config(1, 1);
        let mut state = State::empty(0);
        let ctx = Ctx::new(&config, &mut state, crate::Capacity::both(1), 0);
        let vip = |table_offset, table_size| VipInfo {
            slot: 0,
            table_offset,
            table_size,
            flags: 1,
        };
        assert_eq!(ctx.maglev_pick(&vip(0, 1), 12345), Some((0, backend())));
        assert_eq!(ctx.maglev_pick(&vip(1, 1), 12345), None, "NO_BACKEND");
        assert_eq!(ctx.maglev_pick(&vip(2, 1), 12345), Some((1, backend())));
        assert_eq!(
            ctx.maglev_pick(&vip(3, 1), 12345),
            None,
            "backend 5 missing"
        );
        assert_eq!(ctx.maglev_pick(&vip(4, 1), 12345), None, "slot missing");
        assert_eq!(ctx.maglev_pick(&vip(0, 0), 12345), None, "M = 0");
        // hash % M picks within the VIP's table.
        assert_eq!(ctx.maglev_pick(&vip(0, 3), 6), Some((0, backend())));
        assert_eq!(ctx.maglev_pick(&vip(0, 3), 8), Some((1, backend())));
        // Wrapping index: u32::MAX + 3 = 2.
        assert_eq!(ctx.maglev_pick(&vip(u32::MAX, 5), 3), Some((1, backend())));
    }

    #[test]
    fn a_free_candidate_is_claimed_first_try() {
        let config = config(20000, 20999);
        let mut state = State::empty(0);
        let port = claim(&config, &mut state, key(1), 10).unwrap();
        let expected = nat_port_candidate(flow_hash(&key(1)), 0, 20000, 20999);
        assert_eq!(port, expected);
        let entry = state.reverse[&nk(port)];
        assert_eq!(
            (entry.flow, entry.backend_id, entry.created_ns),
            (key(1), 0, NOW)
        );
        assert_eq!(state.event(Event::NatPortCollision), 0);
    }

    #[test]
    fn a_single_port_taken_by_an_established_flow_is_exhausted() {
        let config = config(20000, 20000);
        let mut state = State::empty(0);
        own(
            &mut state,
            key(9),
            20000,
            FLOW_SEEN_REPLY | FLOW_ASSURED,
            NOW,
        );
        assert_eq!(claim(&config, &mut state, key(1), 10), None);
        assert_eq!(state.event(Event::NatPortCollision), 8);
        assert_eq!(state.conntrack.len(), 1);
        assert_eq!(state.reverse[&nk(20000)].flow, key(9));
    }

    #[test]
    fn own_entry_is_claimed_as_it_is() {
        let config = config(20000, 20000);
        let mut state = State::empty(0);
        state.reverse.insert(
            nk(20000),
            NatEntry {
                flow: key(1),
                backend_id: 0,
                _pad: 0,
                created_ns: 5,
            },
        );
        // A pickup (a connection under way) takes its own port back as it is.
        let mut ctx = Ctx::new(&config, &mut state, crate::Capacity::both(10), NOW);
        let claimed = ctx.claim_nat_port(key(1), flow_hash(&key(1)), 0, backend(), true);
        assert_eq!(claimed, Some(nk(20000)));
        assert_eq!(state.reverse[&nk(20000)].created_ns, 5, "not rewritten");
        assert_eq!(state.event(Event::ForwardRecovered), 1);
        assert_eq!(state.event(Event::NatPortCollision), 0);
        // A bare SYN finds it taken, and takes it over as an orphan (its flow is missing).
        let mut state = State::empty(0);
        state.reverse.insert(
            nk(20000),
            NatEntry {
                flow: key(1),
                backend_id: 0,
                _pad: 0,
                created_ns: 5,
            },
        );
        assert_eq!(claim(&config, &mut state, key(1), 10), Some(20000));
        assert_eq!(state.reverse[&nk(20000)].created_ns, NOW, "rewritten");
        assert_eq!(state.event(Event::ForwardRecovered), 0);
        assert_eq!(state.event(Event::OrphanFreed), 1);
    }

    #[test]
    fn orphans_are_taken_after_the_grace() {
        let config = config(20000, 20000);
        // Young orphan (flow missing): not taken.
        let mut state = State::empty(0);
        state.reverse.insert(
            nk(20000),
            NatEntry {
                flow: key(9),
                backend_id: 0,
                _pad: 0,
                created_ns: NOW - G,
            },
        );
        assert_eq!(claim(&config, &mut state, key(1), 10), None);
        assert_eq!(state.event(Event::NatPortCollision), 8);
        // Just older than the grace: overwritten.
        state.reverse.get_mut(&nk(20000)).unwrap().created_ns = NOW - G - 1;
        assert_eq!(claim(&config, &mut state, key(1), 10), Some(20000));
        assert_eq!(state.reverse[&nk(20000)].flow, key(1));
        assert_eq!(state.reverse[&nk(20000)].created_ns, NOW);
        assert_eq!(state.event(Event::OrphanFreed), 1);
        // An owner flow that names another port (or another backend id) is an orphan too,
        // and is left in place.
        let mut state = State::empty(0);
        own(
            &mut state,
            key(9),
            20001,
            FLOW_SEEN_REPLY | FLOW_ASSURED,
            NOW,
        );
        state.reverse.insert(
            nk(20000),
            NatEntry {
                flow: key(9),
                backend_id: 0,
                _pad: 0,
                created_ns: 0,
            },
        );
        assert_eq!(claim(&config, &mut state, key(1), 10), Some(20000));
        assert!(state.conntrack.contains_key(&key(9)));
        assert_eq!(state.event(Event::OrphanFreed), 1);
        let mut state = State::empty(0);
        own(
            &mut state,
            key(9),
            20000,
            FLOW_SEEN_REPLY | FLOW_ASSURED,
            NOW,
        );
        state.reverse.get_mut(&nk(20000)).unwrap().backend_id = 1;
        state.reverse.get_mut(&nk(20000)).unwrap().created_ns = 0;
        assert_eq!(claim(&config, &mut state, key(1), 10), Some(20000));
    }

    #[test]
    fn an_expired_owner_is_forgotten_and_its_port_taken() {
        let config = config(20000, 20000);
        let mut state = State::empty(0);
        own(
            &mut state,
            key(9),
            20000,
            FLOW_SEEN_REPLY | FLOW_ASSURED,
            NOW - 102 * G,
        );
        assert_eq!(claim(&config, &mut state, key(1), 10), Some(20000));
        assert!(!state.conntrack.contains_key(&key(9)));
        assert_eq!(state.reverse[&nk(20000)].flow, key(1));
        assert_eq!(state.event(Event::ExpiredFlowReplaced), 1);
        assert_eq!(
            state.event(Event::NatPortCollision),
            8,
            "every free-port attempt failed"
        );
        // Just not expired (now == last_seen + timeout + G): live, established: exhausted.
        let mut state = State::empty(0);
        own(
            &mut state,
            key(9),
            20000,
            FLOW_SEEN_REPLY | FLOW_ASSURED,
            NOW - 101 * G,
        );
        assert_eq!(claim(&config, &mut state, key(1), 10), None);
    }

    /// A client whose 8 candidates in 20000..=20001 include both ports.
    fn covering_key() -> FlowKey {
        (100..=255)
            .map(key)
            .find(|k| {
                let ports: Vec<u16> = (0..NAT_PORT_ATTEMPTS)
                    .map(|a| nat_port_candidate(flow_hash(k), a, 20000, 20001))
                    .collect();
                ports.contains(&20000) && ports.contains(&20001)
            })
            .unwrap()
    }

    #[test]
    fn the_first_evictable_owner_in_candidate_order_is_evicted() {
        // Two ports, both held by embryonic flows: the first candidate's owner goes.
        let config = config(20000, 20001);
        let mut state = State::empty(0);
        own(&mut state, key(8), 20000, 0, NOW - 2 * G);
        own(&mut state, key(9), 20001, FLOW_SEEN_REPLY, NOW - 3 * G);
        let client = covering_key();
        let first = nat_port_candidate(flow_hash(&client), 0, 20000, 20001);
        let (evicted, kept) = if first == 20000 {
            (key(8), key(9))
        } else {
            (key(9), key(8))
        };
        assert_eq!(claim(&config, &mut state, client, 10), Some(first));
        assert!(!state.conntrack.contains_key(&evicted));
        assert!(state.conntrack.contains_key(&kept));
        assert_eq!(state.event(Event::EmbryonicEvicted), 1);
        assert_eq!(state.event(Event::NatPortCollision), 8);
        let mut state = State::empty(0);
        own(&mut state, key(8), 20000, 0, NOW);
        own(&mut state, key(9), 20001, 0, NOW);
        let first = nat_port_candidate(flow_hash(&key(1)), 0, 20000, 20001);
        assert_eq!(claim(&config, &mut state, key(1), 10), Some(first));
        // A closed (assured) flow is evictable too; a closing one is not.
        let mut state = State::empty(0);
        own(
            &mut state,
            key(8),
            20000,
            FLOW_SEEN_REPLY | FLOW_ASSURED | 16,
            NOW,
        );
        own(
            &mut state,
            key(9),
            20001,
            FLOW_SEEN_REPLY | FLOW_ASSURED | 4,
            NOW - G / 2,
        );
        assert_eq!(claim(&config, &mut state, covering_key(), 10), Some(20000));
        assert!(state.conntrack.contains_key(&key(9)));
    }

    #[test]
    fn a_full_reverse_table_gives_no_port() {
        let four = config(20000, 20003);
        let mut state = State::empty(0);
        own(
            &mut state,
            key(9),
            30000,
            FLOW_SEEN_REPLY | FLOW_ASSURED,
            NOW,
        );
        assert_eq!(claim(&four, &mut state, key(1), 1), None);
        assert_eq!(
            state.event(Event::NatPortCollision),
            8,
            "owner missing counts too"
        );
        // A local flow never names a port (its nat is 0:0).
        let mut state = State::empty(0);
        own(&mut state, key(9), 20000, FLOW_LOCAL, NOW);
        state.conntrack.get_mut(&key(9)).unwrap().nat_port = 0;
        state.reverse.get_mut(&nk(20000)).unwrap().created_ns = 0;
        let single = config(20000, 20000);
        assert_eq!(claim(&single, &mut state, key(1), 10), Some(20000));
        assert_eq!(state.event(Event::OrphanFreed), 1);
    }
}
