//! Room for a new flow: a NAT port claimed in the reverse table, and an
//! entry in the connection table. When either runs out, flows that are not
//! established go first; an established flow is never evicted.
//! docs/data-path.md, 5a and 5b.

use ha_common::{
    BackendInfo, Event, Flow, FlowKey, MAKE_ROOM_ATTEMPTS, NAT_PORT_ATTEMPTS, NatEntry, NatKey,
    NatRange, ORPHAN_GRACE_NS, Settings, hash::nat_port_candidate, port_to_wire,
};

use crate::{
    conntrack::{BPF_NOEXIST, forget},
    maps::{CONNTRACK, EMBRYONIC, EMBRYONIC_HEAD, REVERSE_NAT, count_event},
};

/// The backend Maglev picked for a new flow.
pub struct Selected {
    pub id: u32,
    pub info: BackendInfo,
    /// The flow hash (NAT port candidates derive from it).
    pub hash: u32,
}

/// The wire-order port of the `attempt`-th NAT port candidate of a flow.
#[inline(always)]
fn candidate(backend: &Selected, range: &NatRange, attempt: u32) -> u16 {
    port_to_wire(nat_port_candidate(
        backend.hash,
        attempt,
        range.port_min,
        range.port_max,
    ))
}

/// The NAT port for a new flow `key` to `backend` from `settings.nat[0]`,
/// claimed in the reverse table, or `None` when every candidate belongs to a
/// live, established flow. docs/data-path.md, 5a:
///
/// 1. `pickup` (a first packet that is not a bare SYN: a connection already
///    under way): a candidate whose reverse entry names this very flow is its
///    own port, left when its connection-table entry was lost: taken back.
/// 2. The first free candidate.
/// 3. All taken: the first whose owner is gone (an orphan), has ended, or
///    is not established (evicted). An established flow keeps its port.
///
/// `entry` is the reverse entry to claim with (its flow, backend, and the
/// time now); it lives in the per-CPU scratch, off the stack.
#[inline(always)]
pub fn claim(
    entry: &NatEntry,
    backend: &Selected,
    settings: &Settings,
    pickup: bool,
) -> Option<u16> {
    let port = claim_port(entry, backend, settings, pickup);
    (port != NO_PORT).then_some(port as u16)
}

/// What [`claim_port`] returns when there is no port (a BPF subprogram
/// returns one register: a port in the low 16 bits, or this).
const NO_PORT: u32 = u32::MAX;

/// [`claim`] as a BPF subprogram of its own. Each pass ends its loop at the
/// first match, so the paths that go on are all alike and the verifier's
/// walk stays linear in the number of candidates; one reverse key is
/// reused throughout, to keep the frame small.
#[inline(never)]
fn claim_port(entry: &NatEntry, backend: &Selected, settings: &Settings, pickup: bool) -> u32 {
    let (key, now) = (&entry.flow, entry.created_ns);
    let range = &settings.nat[0];
    let mut nat_key = NatKey::new(&backend.info, range.addr, 0, key.protocol);
    if pickup {
        for attempt in 0..NAT_PORT_ATTEMPTS {
            nat_key.nat_port = candidate(backend, range, attempt);
            // SAFETY: compared at once.
            if unsafe { REVERSE_NAT.get(&nat_key) }.is_some_and(|o| o.flow.same(key)) {
                count_event(Event::ForwardRecovered);
                return u32::from(nat_key.nat_port);
            }
        }
    }
    for attempt in 0..NAT_PORT_ATTEMPTS {
        nat_key.nat_port = candidate(backend, range, attempt);
        if REVERSE_NAT.insert(&nat_key, entry, BPF_NOEXIST).is_ok() {
            return u32::from(nat_key.nat_port);
        }
        count_event(Event::NatPortCollision);
    }
    for attempt in 0..NAT_PORT_ATTEMPTS {
        nat_key.nat_port = candidate(backend, range, attempt);
        if displace(&nat_key, entry, settings, now) {
            return u32::from(nat_key.nat_port);
        }
    }
    NO_PORT
}

/// The port of `nat_key`, taken from its owner if that is gone (no flow,
/// or a flow that uses another port: an orphan), has ended, or is not
/// established (evicted); false if the owner keeps it. A BPF subprogram:
/// all its ways of saying no return the same state to the loop.
#[inline(never)]
pub fn displace(nat_key: &NatKey, entry: &NatEntry, settings: &Settings, now: u64) -> bool {
    displace_owner(nat_key, entry, settings, now).is_some()
}

#[inline(always)]
fn displace_owner(nat_key: &NatKey, entry: &NatEntry, settings: &Settings, now: u64) -> Option<()> {
    // SAFETY: map value pointers, valid for this program run, read in place.
    let owner = unsafe { REVERSE_NAT.get(nat_key) }?;
    // The key is copied: forgetting the owner frees the entry it lives in.
    let (owner_flow, owner_backend, owner_created) =
        (owner.flow, owner.backend_id, owner.created_ns);
    // SAFETY: as above.
    let flow = unsafe { CONNTRACK.get(&owner_flow) }
        .filter(|f| f.names(nat_key.lb_addr, nat_key.nat_port, owner_backend));
    let Some(flow) = flow else {
        // A young entry may be a flow that another CPU is creating
        // (reverse entry first, then the flow).
        if now <= owner_created.saturating_add(ORPHAN_GRACE_NS) {
            return None;
        }
        REVERSE_NAT.insert(nat_key, entry, 0).ok()?;
        count_event(Event::OrphanFreed);
        return Some(());
    };
    let event = if flow.is_expired(owner_flow.protocol, settings, now) {
        Event::ExpiredFlowReplaced
    } else if flow.is_evictable() {
        Event::EmbryonicEvicted
    } else {
        return None;
    };
    forget(&owner_flow, flow);
    count_event(event);
    REVERSE_NAT.insert(nat_key, entry, BPF_NOEXIST).ok()
}

/// Records a flow this CPU just created in its queue of recent flows (the
/// oldest record is overwritten when the queue is full). Two per-CPU array
/// writes: nothing is looked up on the way of a new flow.
#[inline(always)]
pub fn record(key: &FlowKey, settings: &Settings) {
    let slots = settings.embryonic_slots;
    let Some(head) = EMBRYONIC_HEAD.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU values; nothing else on this CPU runs meanwhile.
    let head = unsafe { &mut *head };
    let next = if head.next >= slots { 0 } else { head.next };
    let Some(cell) = EMBRYONIC.get_ptr_mut(next) else {
        return;
    };
    // SAFETY: as above.
    unsafe { *cell = *key };
    head.next = if next + 1 >= slots { 0 } else { next + 1 };
    if head.len < slots {
        head.len += 1;
    }
}

/// Inserts a new flow, making room when the table is full: true if it is in.
/// `flags`: 0 (replace) or [`BPF_NOEXIST`].
#[inline(always)]
pub fn insert_flow(key: &FlowKey, flow: &Flow, flags: u64, settings: &Settings, now: u64) -> bool {
    match CONNTRACK.insert(key, flow, flags) {
        Ok(()) => {}
        Err(E2BIG) => {
            if !make_room(settings, now) || CONNTRACK.insert(key, flow, flags).is_err() {
                return false;
            }
        }
        Err(_) => return false,
    }
    record(key, settings);
    true
}

/// `-E2BIG`: a map insert found the map full.
const E2BIG: i32 = -7;

/// Makes room in a full connection table, as Linux conntrack's early drop:
/// takes records from the oldest end of this CPU's queue, at most
/// [`MAKE_ROOM_ATTEMPTS`], and forgets the first whose flow has ended or is
/// not established. Records of flows that are gone or established just leave
/// the queue. False if none of them could go: an established flow is never
/// evicted. A BPF subprogram, so its loop's ways of failing rejoin.
#[inline(never)]
fn make_room(settings: &Settings, now: u64) -> bool {
    let slots = settings.embryonic_slots;
    for _ in 0..MAKE_ROOM_ATTEMPTS {
        let Some(head) = EMBRYONIC_HEAD.get_ptr_mut(0) else {
            return false;
        };
        // SAFETY: per-CPU values; nothing else on this CPU runs meanwhile.
        let head = unsafe { &mut *head };
        if head.len == 0 || head.len > slots || head.next >= slots {
            return false;
        }
        let oldest = if head.next >= head.len {
            head.next - head.len
        } else {
            head.next + slots - head.len
        };
        head.len -= 1;
        let Some(cell) = EMBRYONIC.get_ptr(oldest) else {
            return false;
        };
        // SAFETY: as above; the key is copied, the flow forgotten frees nothing it lives in.
        let key = unsafe { *cell };
        // SAFETY: a map value pointer, read in place.
        let Some(flow) = (unsafe { CONNTRACK.get(&key) }) else {
            continue;
        };
        if flow.is_expired(key.protocol, settings, now) {
            forget(&key, flow);
            count_event(Event::ExpiredFlowReplaced);
            return true;
        }
        if flow.is_evictable() {
            forget(&key, flow);
            count_event(Event::EmbryonicEvicted);
            return true;
        }
    }
    false
}

/// Rebuilds a lost connection-table entry from its reverse entry, for a
/// backend's reply: the flow's backend and NAT port are known, its state
/// starts as a first reply. `Err` is the verdict to drop the reply with.
#[inline(always)]
pub fn recover_forward(
    nat_key: &NatKey,
    entry: &NatEntry,
    settings: &Settings,
    now: u64,
) -> Result<*mut Flow, ha_common::Verdict> {
    use ha_common::Verdict;
    let backend = crate::maps::BACKENDS
        .get(entry.backend_id)
        .ok_or(Verdict::DropReplyNoFlow)?;
    // A local backend's flow is never rebuilt from a packet that came in
    // (its replies leave through tc egress, not XDP).
    if backend.addr != nat_key.backend_addr
        || backend.port != nat_key.backend_port
        || backend.flags & ha_common::BACKEND_FLAG_LOCAL != 0
    {
        return Err(Verdict::DropReplyNoFlow);
    }
    let flow = Flow {
        backend_id: entry.backend_id,
        flags: 0,
        last_seen_ns: now,
        nat_addr: nat_key.lb_addr,
        nat_port: nat_key.nat_port,
        client_mac: [0; 6],
        _pad: 0,
    };
    if !insert_flow(&entry.flow, &flow, BPF_NOEXIST, settings, now) {
        return Err(Verdict::DropTableFull);
    }
    count_event(Event::ForwardRecovered);
    CONNTRACK
        .get_ptr_mut(&entry.flow)
        .ok_or(Verdict::DropTableFull)
}
