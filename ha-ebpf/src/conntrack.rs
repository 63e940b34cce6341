//! The connection table: a flow keeps its backend and NAT port for its whole
//! life. Entries end on RST, FIN_LINGER after both sides sent FIN, on idle
//! timeout (checked here on use, and swept by the agent), or by LRU eviction.

use ha_common::{
    Event, FLOW_FIN_BACKEND, FLOW_FIN_CLIENT, Flow, FlowKey, LAST_SEEN_GRANULARITY_NS, NatKey,
    PROTO_TCP, Settings,
};

use crate::{
    maps::{CONNTRACK, REVERSE_NAT, count_event},
    parse::{TCP_FIN, TCP_RST},
};

#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: helper without arguments. The coarse clock (tick resolution)
    // is enough for second-scale timeouts and cheaper than the precise one.
    unsafe { aya_ebpf::helpers::bpf_ktime_get_coarse_ns() }
}

/// A live entry for `key`, or `None` (an expired one is removed first).
#[inline(always)]
pub fn lookup(key: &FlowKey, settings: &Settings, now: u64) -> Option<*mut Flow> {
    let flow = CONNTRACK.get_ptr_mut(key)?;
    // SAFETY: a map value pointer, valid for this program run.
    if unsafe { &*flow }.is_expired(key.protocol, settings, now) {
        // SAFETY: as above.
        let nat_key = reverse_key_of(key, unsafe { &*flow }, settings);
        forget(key, nat_key.as_ref());
        count_event(Event::ExpiredFlowReplaced);
        return None;
    }
    Some(flow)
}

/// The reverse NAT key of a NATed flow (none for a local-backend flow).
#[inline(always)]
fn reverse_key_of(key: &FlowKey, flow: &Flow, settings: &Settings) -> Option<NatKey> {
    if flow.flags & ha_common::FLOW_LOCAL != 0 {
        return None;
    }
    let backend = crate::maps::BACKENDS.get(flow.backend_id)?;
    Some(NatKey::new(
        backend,
        settings.lb_addr,
        flow.nat_port,
        key.protocol,
    ))
}

#[inline(always)]
pub fn forget(key: &FlowKey, nat_key: Option<&NatKey>) {
    let _ = CONNTRACK.remove(key);
    if let Some(nat_key) = nat_key {
        let _ = REVERSE_NAT.remove(nat_key);
    }
}

/// What a packet means for its flow's life.
pub enum Lifecycle {
    Continue,
    /// RST: remove the entries once the packet is on its way.
    Reset,
}

/// The flags and lifecycle of a new flow's first packet (a client's).
#[inline(always)]
pub fn first_packet(protocol: u8, tcp_flags: u8) -> (u8, Lifecycle) {
    if protocol != PROTO_TCP {
        (0, Lifecycle::Continue)
    } else if tcp_flags & TCP_RST != 0 {
        (0, Lifecycle::Reset)
    } else if tcp_flags & TCP_FIN != 0 {
        (FLOW_FIN_CLIENT, Lifecycle::Continue)
    } else {
        (0, Lifecycle::Continue)
    }
}

/// Refreshes `last_seen` and follows FIN/RST. `from_client` tells the direction.
#[inline(always)]
pub fn track(
    flow: *mut Flow,
    protocol: u8,
    tcp_flags: u8,
    from_client: bool,
    now: u64,
) -> Lifecycle {
    // SAFETY: a map value pointer, valid for this program run. Racing
    // updates from other CPUs can only lose a timestamp refresh or a flag
    // that the next packet sets again.
    let flow = unsafe { &mut *flow };
    if now > flow.last_seen_ns + LAST_SEEN_GRANULARITY_NS {
        flow.last_seen_ns = now;
    }
    if protocol != PROTO_TCP {
        return Lifecycle::Continue;
    }
    if tcp_flags & TCP_RST != 0 {
        return Lifecycle::Reset;
    }
    if tcp_flags & TCP_FIN != 0 {
        let side = if from_client {
            FLOW_FIN_CLIENT
        } else {
            FLOW_FIN_BACKEND
        };
        if flow.flags & side == 0 {
            flow.flags |= side;
            let both = FLOW_FIN_CLIENT | FLOW_FIN_BACKEND;
            if flow.flags & both == both {
                flow.closing_since_ns = now;
            }
        }
    }
    Lifecycle::Continue
}
