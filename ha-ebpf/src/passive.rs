//! Passive health and L4 redispatch (docs/data-path.md, "Passive health"):
//! a backend that refuses a new flow (RST to its SYN, or an ICMP
//! destination unreachable about a packet sent to it) is suspect at once,
//! without waiting for the agent's active check; selection skips it for new
//! flows, and the refused SYN's RST is dropped so that the client's
//! retransmission is balanced again, to another backend.

use ha_common::{
    Event, FLOW_ASSURED, FLOW_RESET, FLOW_SEEN_REPLY, FlowKey, PassiveEvent, REDISPATCH_WINDOW_NS,
    TCP_ACK, TCP_RST, VIP_FLAG_ENABLED, VipKey, suspect_holds,
};

use crate::{
    maps::{PASSIVE_EVENTS, REDISPATCHED, SUSPECT, VIPS, count_event},
    select,
};

/// Whether backend `id` is suspect at `now`.
#[inline(always)]
pub fn is_suspect(id: u32, now: u64) -> bool {
    SUSPECT.get(id).is_some_and(|at| suspect_holds(*at, now))
}

/// Whether a flow with `flow_flags` is new: nothing but RSTs from its
/// backend yet, not confirmed, not reset.
#[inline(always)]
pub fn flow_is_new(flow_flags: u32) -> bool {
    flow_flags & (FLOW_SEEN_REPLY | FLOW_ASSURED | FLOW_RESET) == 0
}

/// Whether a backend's TCP flags, on a flow with `flow_flags`, refuse its
/// SYN: RST with ACK (a TCP answers a segment without ACK, a SYN, with
/// RST+ACK; a segment with ACK, as a picked-up flow's, with a bare RST) on
/// a flow that is still new.
#[inline(always)]
pub fn refuses_syn(tcp_flags: u8, flow_flags: u32) -> bool {
    tcp_flags & (TCP_RST | TCP_ACK) == TCP_RST | TCP_ACK && flow_is_new(flow_flags)
}

/// Marks backend `id` suspect at `now` (`reason`: `PASSIVE_REASON_*`).
/// When it was not suspect already, counts `backend_suspected` and tells
/// the agent through PASSIVE_EVENTS (`passive_event_lost` when full).
#[inline(never)]
pub fn suspect(id: u32, reason: u32, now: u64) {
    let Some(slot) = SUSPECT.get_ptr_mut(id) else {
        return;
    };
    // SAFETY: an array value pointer, valid for this run. Another CPU may
    // write it at once: both write the clock, and at worst both tell the agent.
    let was = unsafe {
        let was = core::ptr::read_volatile(slot);
        core::ptr::write_volatile(slot, now);
        was
    };
    if suspect_holds(was, now) {
        return;
    }
    count_event(Event::BackendSuspected);
    let event = PassiveEvent {
        backend_id: id,
        reason,
        at_ns: now,
    };
    if PASSIVE_EVENTS.output::<PassiveEvent>(&event, 0).is_err() {
        count_event(Event::PassiveEventLost);
    }
}

/// A backend (`backend_id`) refused flow `key`'s SYN, and is suspect now:
/// whether to redispatch (drop its RST, the caller forgets the flow). Yes
/// when the flow key was not redispatched within the window and the
/// client's retransmission would go to another backend, not suspect (what
/// selection gives the key now); the key is then recorded. A BPF
/// subprogram: the reply path's frame does not hold its VIP and selection.
#[inline(never)]
pub fn redispatch(key: &FlowKey, backend_id: u32, now: u64) -> bool {
    // SAFETY: copied at once.
    if let Some(at) = unsafe { REDISPATCHED.get(key) }.copied()
        && now < at.saturating_add(REDISPATCH_WINDOW_NS)
    {
        count_event(Event::RedispatchLimit);
        return false;
    }
    let vip_key = VipKey {
        addr: key.dst_addr,
        port: key.dst_port,
        protocol: key.protocol,
        _pad: 0,
    };
    // SAFETY: copied at once.
    let vip = unsafe { VIPS.get(&vip_key) }.copied();
    let next = vip
        .filter(|v| v.flags & VIP_FLAG_ENABLED != 0)
        .and_then(|v| select::select(&v, key, now, false));
    let eligible = next.is_some_and(|s| s.id != backend_id && !is_suspect(s.id, now));
    if !eligible {
        count_event(Event::RedispatchNoAlternative);
        return false;
    }
    let _ = REDISPATCHED.insert(key, &now, 0);
    count_event(Event::Redispatched);
    true
}
