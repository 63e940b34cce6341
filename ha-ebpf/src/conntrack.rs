//! The connection table and its state machine (docs/data-path.md, "The flow
//! state machine"). A flow keeps its backend and NAT source for its whole
//! life; its state lives in flag bits that are only ever set, atomically, so
//! packets of one flow on several CPUs never lose a transition.

use core::intrinsics::{AtomicOrdering, atomic_or};

use ha_common::{
    BACKEND_FLAG_DOWN, Event, FLOW_RESET, FLOW_RESTART_ON_SYN, Flow, FlowKey,
    LAST_SEEN_GRANULARITY_NS, NatEntry, NatKey, Settings, backend_packet_bits, client_packet_bits,
    tcp_bare_syn,
};

use crate::{
    maps::{BACKENDS, CONNTRACK, REVERSE_NAT, count_event},
    parse::Packet,
};

pub const BPF_NOEXIST: u64 = 1;

/// The time every decision of this packet uses: the settings' virtual clock
/// when set (tests), the kernel's coarse clock otherwise.
#[inline(always)]
pub fn now_ns(settings: &Settings) -> u64 {
    if settings.clock_ns != 0 {
        return settings.clock_ns;
    }
    // SAFETY: helper without arguments. The coarse clock (tick resolution)
    // is enough for second-scale timeouts and cheaper than the precise one.
    unsafe { aya_ebpf::helpers::bpf_ktime_get_coarse_ns() }
}

/// The connection-table key of a client packet.
#[inline(always)]
pub fn key_of(packet: &Packet) -> FlowKey {
    FlowKey {
        src_addr: packet.src_addr,
        dst_addr: packet.dst_addr,
        src_port: packet.src_port,
        dst_port: packet.dst_port,
        protocol: packet.protocol,
        _pad: [0; 3],
    }
}

/// The live entry for a client packet's flow, or `None`: no entry, or one
/// that must not carry this packet (expired, backend down or gone, or a
/// bare SYN on a flow that was established or is ending), which is
/// forgotten first.
#[inline(always)]
pub fn existing(key: &FlowKey, tcp_flags: u8, settings: &Settings, now: u64) -> Option<*mut Flow> {
    let ptr = CONNTRACK.get_ptr_mut(key)?;
    // SAFETY: a map value pointer, valid for this program run. Read in
    // place, not copied: a copy's flag bits would be tracked by the verifier
    // bit by bit, path by path.
    let flow = unsafe { &*ptr };
    let reason = if flow.is_expired(key.protocol, settings, now) {
        Some(Event::ExpiredFlowReplaced)
    } else if BACKENDS
        .get(flow.backend_id)
        .is_none_or(|b| b.addr == 0 || b.flags & BACKEND_FLAG_DOWN != 0)
    {
        Some(Event::MovedFromDownBackend)
    } else if tcp_bare_syn(tcp_flags) && flow.flags & FLOW_RESTART_ON_SYN != 0 {
        Some(Event::SynRestartedFlow)
    } else {
        None
    };
    match reason {
        None => Some(ptr),
        Some(event) => {
            forget(key, flow);
            count_event(event);
            None
        }
    }
}

/// The reverse key of a flow (none if its backend record is gone). A local
/// flow's names its client's address and port where a NATed flow's names
/// its NAT source: the tuple of the backend's replies either way.
#[inline(always)]
pub fn nat_key_of(key: &FlowKey, flow: &Flow) -> Option<NatKey> {
    let backend = BACKENDS.get(flow.backend_id)?;
    Some(NatKey::new(
        backend,
        flow.nat_addr,
        flow.nat_port,
        key.protocol,
    ))
}

/// Removes a flow: its reverse entry (if it still names the flow), then the flow.
#[inline(always)]
pub fn forget(key: &FlowKey, flow: &Flow) {
    if let Some(nat_key) = nat_key_of(key, flow) {
        release(&nat_key, key);
    }
    let _ = CONNTRACK.remove(key);
}

/// Removes a reverse entry if it belongs to `key` (another flow may own the port by now).
#[inline(always)]
pub fn release(nat_key: &NatKey, key: &FlowKey) {
    // SAFETY: compared at once.
    if unsafe { REVERSE_NAT.get(nat_key) }.is_some_and(|e| e.flow.same(key)) {
        let _ = REVERSE_NAT.remove(nat_key);
    }
}

/// Puts back a flow's reverse entry if it is missing (it was lost:
/// without it the backend's replies would be dropped).
#[inline(always)]
pub fn ensure_reverse(nat_key: &NatKey, key: &FlowKey, backend_id: u32, now: u64) {
    // SAFETY: only tested for presence.
    if unsafe { REVERSE_NAT.get(nat_key) }.is_some() {
        return;
    }
    let entry = NatEntry {
        flow: *key,
        backend_id,
        _pad: 0,
        created_ns: now,
    };
    if REVERSE_NAT.insert(nat_key, &entry, BPF_NOEXIST).is_ok() {
        count_event(Event::ReverseRecovered);
    }
}

/// Applies a client packet (its TCP flags) to its flow; true if it refreshed the entry.
#[inline(always)]
pub fn track_client(flow: *mut Flow, tcp_flags: u8, now: u64) -> bool {
    // SAFETY: a map value pointer, valid for this program run.
    let current = unsafe { core::ptr::read_volatile(&(*flow).flags) };
    update(
        flow,
        current,
        client_packet_bits(current, tcp_flags, false),
        now,
    )
}

/// Applies a backend packet (its TCP flags) to its flow.
#[inline(always)]
pub fn track_backend(flow: *mut Flow, tcp_flags: u8, now: u64) {
    // SAFETY: as above.
    let current = unsafe { core::ptr::read_volatile(&(*flow).flags) };
    update(flow, current, backend_packet_bits(tcp_flags), now);
}

/// Sets `add` on a flow that had `current`, refreshing `last_seen`. A state
/// change writes the time first and then ORs the bits in, so another CPU
/// never sees the new state with the old time.
#[inline(always)]
fn update(flow: *mut Flow, current: u32, add: u32, now: u64) -> bool {
    // SAFETY: a map value pointer, valid for this program run; `flags` is an
    // aligned u32, so it can be used atomically.
    unsafe {
        if current | add != current {
            (*flow).last_seen_ns = now;
            atomic_or::<u32, u32, { AtomicOrdering::Release }>(&raw mut (*flow).flags, add);
            if add & FLOW_RESET != 0 && current & FLOW_RESET == 0 {
                count_event(Event::FlowReset);
            }
            return true;
        }
        if now
            > (*flow)
                .last_seen_ns
                .saturating_add(LAST_SEEN_GRANULARITY_NS)
        {
            (*flow).last_seen_ns = now;
            return true;
        }
    }
    false
}
