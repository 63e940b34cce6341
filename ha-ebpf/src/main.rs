//! The ha-lb XDP program.
//!
//! A short pipeline, one module per step:
//! parse -> classify (VIP? reply?) -> conntrack -> select (Maglev) -> rewrite (NAT) -> forward;
//! passive health watches replies and ICMP errors for refusals (`passive`).
//! The entry point only runs it, counts the verdict and returns the action.
#![no_std]
#![no_main]
// Atomic OR on a flow's flag bits: the BPF target has no atomic types in
// core, but LLVM lowers the intrinsic to BPF_ATOMIC | BPF_OR.
#![allow(internal_features)]
#![feature(core_intrinsics)]
// Map keys and values are passed by reference, not moved into `impl Borrow`
// arguments: a move may copy them onto the 512-byte stack the call chain shares.
#![allow(clippy::needless_borrows_for_generic_args)]

mod classify;
mod conntrack;
mod egress;
mod forward;
mod icmp;
mod local;
mod maps;
mod nat;
mod parse;
mod passive;
mod ports;
mod select;
mod sock_lb;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use ha_common::{
    BACKEND_FLAG_LOCAL, Event, FLOW_LOCAL, Flow, FlowKey, NatEntry, NatKey,
    PASSIVE_REASON_RST_TO_SYN, PROTO_TCP, PROTO_UDP, SETTINGS_FLAG_DEBUG, Settings,
    VIP_FLAG_ENABLED, Verdict, VipInfo, client_packet_bits, tcp_bare_syn, tcp_flags_valid,
};

use crate::{
    classify::{Class, Owner},
    maps::{
        BACKEND_STATS, BACKENDS, CONNTRACK, SETTINGS, SETTINGS_ACTIVE, VIP_STATS, count_event,
        count_traffic,
    },
    nat::Rewrite,
    parse::{Fragment, IPPROTO_ICMP, Packet, Parsed},
};

/// Multi-buffer aware (`xdp.frags`): a driver may attach it to an
/// interface whose MTU is larger than a page (jumbo frames) in native mode.
#[xdp(frags)]
pub fn ha_xdp(ctx: XdpContext) -> u32 {
    let (action, verdict) = process(&ctx);
    // As `process` measured it, before any answer replaced the frame.
    let frame_len = maps::SCRATCH.get_ptr(0).map_or(0, |s| {
        // SAFETY: this CPU's scratch, written by `process` for this frame.
        unsafe { (*s).frame_len }
    });
    maps::count_verdict(verdict, frame_len);
    action
}

/// Passes everything. Not used by the agent: it is the floor that benchmarks
/// measure the data path against, and the lab attaches it to the far end of
/// each veth, because veth delivers XDP_TX frames promptly only to a peer
/// that runs an XDP program.
#[xdp(frags)]
pub fn ha_xdp_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[inline(always)]
fn pass(verdict: Verdict) -> (u32, Verdict) {
    (xdp_action::XDP_PASS, verdict)
}

#[inline(always)]
fn drop(verdict: Verdict) -> (u32, Verdict) {
    (xdp_action::XDP_DROP, verdict)
}

#[inline(always)]
fn pass_by_protocol(protocol: u8) -> (u32, Verdict) {
    pass(match protocol {
        PROTO_TCP => Verdict::PassTcp,
        PROTO_UDP => Verdict::PassUdp,
        IPPROTO_ICMP => Verdict::PassIcmp,
        _ => Verdict::PassOtherIpv4,
    })
}

/// A rewrite that a path decided on, carried out by `process` itself: the
/// forward step's frame then sits on top of `process`'s, not of the path's
/// (the whole call chain shares 512 bytes of stack).
pub struct Send {
    /// New addresses and ports (of an ICMP error: its outer addresses).
    to: Rewrite,
    /// An ICMP error's embedded packet: its new addresses and ports.
    inner: Rewrite,
    exits: forward::Exits,
    /// A new flow's entry, built here before it is inserted (off the stack).
    flow: Flow,
    /// A new flow's reverse entry, built here while a NAT port is claimed.
    entry: NatEntry,
    /// A new local flow's reverse key, built here while it is claimed.
    local_key: NatKey,
}

/// The action a path returns when `Send` holds what to do.
const SEND: u32 = 0xff;

/// A path's result in one register (a BPF subprogram returns one): the
/// action in the high half, the verdict in the low half.
#[inline(always)]
fn encode((action, verdict): (u32, Verdict)) -> u64 {
    (u64::from(action) << 32) | verdict as u64
}

#[inline(always)]
fn decode(result: u64) -> (u32, u32) {
    ((result >> 32) as u32, result as u32)
}

#[inline(always)]
fn process(ctx: &XdpContext) -> (u32, Verdict) {
    let Some(scratch) = maps::SCRATCH.get_ptr_mut(0) else {
        return pass(Verdict::PassMalformed);
    };
    // SAFETY: this CPU's scratch; nothing else runs on it meanwhile.
    let (packet, send, frame_len) = unsafe {
        (
            &mut (*scratch).packet,
            &mut (*scratch).send,
            &mut (*scratch).frame_len,
        )
    };
    // The first buffer: all of a frame that is not parsed as IPv4 is
    // counted by it (measuring a multi-buffer frame costs a helper call,
    // which only a parsed packet that reaches past its first buffer pays).
    *frame_len = ctx.data_end() - ctx.data();
    let icmp_error = match parse::parse(ctx, packet) {
        Parsed::Ipv4 => false,
        Parsed::IcmpError => true,
        Parsed::NotIpv4 => return pass(Verdict::PassNonIpv4),
        Parsed::Malformed => return pass(Verdict::PassMalformed),
        Parsed::OtherIpv4(protocol) => return pass_by_protocol(protocol),
        Parsed::LaterFragment => return pass(Verdict::PassFragment),
    };
    *frame_len = packet.frame_len;
    let packet: &Packet = packet;
    // SAFETY: copied out at once.
    let slot = SETTINGS_ACTIVE.get(0).map_or(0, |s| *s & 1);
    let Some(settings) = SETTINGS.get(slot) else {
        return pass_by_protocol(if icmp_error {
            IPPROTO_ICMP
        } else {
            packet.protocol
        });
    };
    let result = if icmp_error {
        icmp_path(ctx, packet, settings, send)
    } else {
        match classify::classify(packet, settings) {
            Class::ToVip(vip) => to_vip(ctx, packet, &vip, settings, send),
            Class::Reply(owner) => reply(ctx, packet, &owner, settings, send),
            Class::ReplyNoFlow => return drop(Verdict::DropReplyNoFlow),
            Class::NotOurs => return pass_by_protocol(packet.protocol),
        }
    };
    let (action, verdict) = decode(result);
    if action != SEND {
        return (action, Verdict::from_index(verdict));
    }
    forward::forward(ctx, packet, send)
}

/// An ICMP error: translated if it is about one of our flows, else passed.
/// Sent by the same forward step as every other packet (one call to verify).
#[inline(never)]
fn icmp_path(ctx: &XdpContext, packet: &Packet, settings: &Settings, send: &mut Send) -> u64 {
    match icmp::classify(ctx, packet, settings, send) {
        Some(verdict) => encode((SEND, verdict)),
        None => encode(pass(Verdict::PassIcmp)),
    }
}

/// What neither direction handles: IP options (which may carry addresses a
/// NAT would leave wrong), a first fragment (its flow cannot be followed
/// into the later ones), TCP flags no real TCP sends together.
#[inline(always)]
fn unhandled(ctx: &XdpContext, packet: &Packet) -> Option<(u32, Verdict)> {
    if packet.has_ip_options {
        return Some(drop(Verdict::DropVipIpOptions));
    }
    if let Fragment::First = packet.fragment {
        return Some(drop(Verdict::DropVipFragment));
    }
    if packet.protocol == PROTO_TCP && !tcp_flags_valid(packet.tcp_flags(ctx)) {
        return Some(drop(Verdict::DropInvalidTcpFlags));
    }
    None
}

/// A client packet to a VIP: find or pick its backend, NAT it, send it.
/// A BPF subprogram (as is `reply`): the two paths get frames of their own
/// instead of one frame holding both, under the 512-byte stack limit.
#[inline(never)]
fn to_vip(
    ctx: &XdpContext,
    packet: &Packet,
    vip: &VipInfo,
    settings: &Settings,
    send: &mut Send,
) -> u64 {
    encode(client_path(ctx, packet, vip, settings, send))
}

#[inline(always)]
fn client_path(
    ctx: &XdpContext,
    packet: &Packet,
    vip: &VipInfo,
    settings: &Settings,
    send: &mut Send,
) -> (u32, Verdict) {
    let frame_len = packet.frame_len;
    if vip.flags & VIP_FLAG_ENABLED == 0 {
        return pass(Verdict::PassVipDisabled);
    }
    if let Some(verdict) = unhandled(ctx, packet) {
        return verdict;
    }
    let key = conntrack::key_of(packet);
    let now = conntrack::now_ns(settings);
    match conntrack::existing(&key, packet.tcp_flags(ctx), settings, now) {
        Some(flow) => existing_flow(ctx, packet, vip, &key, flow, frame_len, now, send),
        None => new_flow(ctx, packet, vip, &key, settings, frame_len, now, send),
    }
}

/// The next packet of a flow in the table.
#[inline(always)]
// Its arguments stay separate: gathered in a struct, they took room of
// their own on the 512-byte stack.
#[allow(clippy::too_many_arguments)]
fn existing_flow(
    ctx: &XdpContext,
    packet: &Packet,
    vip: &VipInfo,
    key: &FlowKey,
    flow_ptr: *mut Flow,
    frame_len: usize,
    now: u64,
    send: &mut Send,
) -> (u32, Verdict) {
    let refreshed = conntrack::track_client(flow_ptr, packet.tcp_flags(ctx), now);
    // SAFETY: map value pointer, valid for this run.
    let flow = unsafe { &*flow_ptr };
    let Some(backend) = BACKENDS.get(flow.backend_id) else {
        return drop(Verdict::DropStaleBackend);
    };
    if backend.addr == 0 {
        return drop(Verdict::DropStaleBackend);
    }
    let local = flow.flags & FLOW_LOCAL != 0;
    if local && !local::translated(key, flow) {
        count_traffic(&VIP_STATS, vip.slot, frame_len, false);
        count_traffic(&BACKEND_STATS, flow.backend_id, frame_len, false);
        return pass(Verdict::PassLocalBackend);
    }
    if refreshed {
        // At most once a second per flow: a lost reverse entry comes back
        // before the backend's retransmission gives up.
        let nat_key = NatKey::new(backend, flow.nat_addr, flow.nat_port, key.protocol);
        conntrack::ensure_reverse(&nat_key, key, flow.backend_id, now);
    }
    count_traffic(&VIP_STATS, vip.slot, frame_len, false);
    count_traffic(&BACKEND_STATS, flow.backend_id, frame_len, false);
    if local {
        local::deliver(ctx, packet, backend);
        return pass(Verdict::PassLocalBackend);
    }
    let to = Rewrite {
        src_addr: flow.nat_addr,
        dst_addr: backend.addr,
        src_port: flow.nat_port,
        dst_port: backend.port,
    };
    sending(send, to, Verdict::ForwardTx, Verdict::ForwardRedirect, None)
}

/// The first packet of a flow: pick its backend by Maglev, claim room, insert it.
#[inline(always)]
// As for `existing_flow`.
#[allow(clippy::too_many_arguments)]
fn new_flow(
    ctx: &XdpContext,
    packet: &Packet,
    vip: &VipInfo,
    key: &FlowKey,
    settings: &Settings,
    frame_len: usize,
    now: u64,
    send: &mut Send,
) -> (u32, Verdict) {
    let Some(selected) = select::select(vip, key, now, true) else {
        return drop(Verdict::DropNoBackend);
    };
    let (backend_id, backend) = (selected.id, selected.info);
    let local = backend.flags & BACKEND_FLAG_LOCAL != 0;
    let base = if local { FLOW_LOCAL } else { 0 };
    let flags = base | client_packet_bits(base, packet.tcp_flags(ctx), true);
    send.flow = Flow {
        backend_id,
        flags,
        last_seen_ns: now,
        nat_addr: 0,
        nat_port: 0,
        client_mac: [0; 6],
        _pad: 0,
    };
    send.entry = NatEntry {
        flow: *key,
        backend_id,
        _pad: 0,
        created_ns: now,
    };
    if local {
        // Its reverse entry names the client's own address and port.
        if !local::claim(&send.entry, &mut send.local_key, &backend, settings) {
            return drop(Verdict::DropNatExhausted);
        }
        send.flow.nat_addr = key.src_addr;
        send.flow.nat_port = key.src_port;
    } else {
        let range = &settings.nat[0];
        // A first packet that is not a bare SYN continues a connection: it
        // looks for its own NAT port first.
        let pickup = packet.protocol == PROTO_TCP && !tcp_bare_syn(packet.tcp_flags(ctx));
        let Some(port) = ports::claim(&send.entry, &selected, settings, pickup) else {
            return drop(Verdict::DropNatExhausted);
        };
        let flow = &mut send.flow;
        flow.nat_addr = range.addr;
        flow.nat_port = port;
        flow.client_mac = parse::read(ctx, 6).unwrap_or([0; 6]);
    }
    let flow = &send.flow;
    if !ports::insert_flow(key, flow, 0, settings, now) {
        let nat_key = NatKey::new(&backend, flow.nat_addr, flow.nat_port, key.protocol);
        conntrack::release(&nat_key, key);
        return drop(Verdict::DropTableFull);
    }
    let (nat_addr, nat_port) = (flow.nat_addr, flow.nat_port);
    count_event(Event::NewFlow);
    if packet.protocol == PROTO_TCP {
        // Read again, not taken from `flags`: see Packet::tcp_flags.
        let tcp_flags = packet.tcp_flags(ctx);
        if !tcp_bare_syn(tcp_flags) {
            count_event(Event::MidstreamPickup);
        }
        if tcp_flags & ha_common::TCP_RST != 0 {
            count_event(Event::FlowReset);
        }
    }
    count_traffic(&VIP_STATS, vip.slot, frame_len, true);
    count_traffic(&BACKEND_STATS, backend_id, frame_len, true);
    if settings.flags & SETTINGS_FLAG_DEBUG != 0 {
        aya_log_ebpf::info!(
            ctx,
            "new flow to backend {} nat port {}",
            backend_id,
            u16::from_be(nat_port)
        );
    }
    if local {
        local::deliver(ctx, packet, &backend);
        return pass(Verdict::PassLocalBackend);
    }
    let to = Rewrite {
        src_addr: nat_addr,
        dst_addr: backend.addr,
        src_port: nat_port,
        dst_port: backend.port,
    };
    sending(send, to, Verdict::ForwardTx, Verdict::ForwardRedirect, None)
}

/// The end of both paths: what to rewrite, and how to count the ways out.
#[inline(always)]
fn sending(
    send: &mut Send,
    to: Rewrite,
    tx: Verdict,
    redirect: Verdict,
    learned_mac: Option<[u8; 6]>,
) -> (u32, Verdict) {
    send.to = to;
    send.exits = forward::Exits {
        tx,
        redirect,
        learned_mac,
    };
    (SEND, tx)
}

/// A backend's reply to a NAT port: back to VIP -> client.
#[inline(never)]
fn reply(
    ctx: &XdpContext,
    packet: &Packet,
    owner: &Owner,
    settings: &Settings,
    send: &mut Send,
) -> u64 {
    encode(reply_path(ctx, packet, owner, settings, send))
}

#[inline(always)]
fn reply_path(
    ctx: &XdpContext,
    packet: &Packet,
    owner: &Owner,
    settings: &Settings,
    send: &mut Send,
) -> (u32, Verdict) {
    // SAFETY: a map value pointer, valid for this run.
    let (nat_key, entry) = (&owner.nat_key, unsafe { &*owner.entry });
    if let Some(verdict) = unhandled(ctx, packet) {
        return verdict;
    }
    let now = conntrack::now_ns(settings);
    // Copied once: a preallocated hash element that another CPU deletes is
    // reused by the next insert, so the entry must not be read after a
    // delete (ours below, or a concurrent one).
    let client = entry.flow;
    let flow_ptr = match CONNTRACK.get_ptr_mut(&client) {
        None => match ports::recover_forward(nat_key, entry, settings, now) {
            Ok(flow) => flow,
            Err(verdict) => return drop(verdict),
        },
        Some(flow_ptr) => {
            // SAFETY: map value pointer, valid for this run.
            let flow = unsafe { &*flow_ptr };
            // A local flow's replies leave through tc egress, never here.
            if flow.flags & FLOW_LOCAL != 0
                || !flow.names(nat_key.lb_addr, nat_key.nat_port, entry.backend_id)
            {
                // A stale reverse entry: the flow uses another port now.
                return drop(Verdict::DropReplyNoFlow);
            }
            if flow.is_expired(client.protocol, settings, now) {
                conntrack::forget(&client, flow);
                count_event(Event::ExpiredFlowReplaced);
                return drop(Verdict::DropReplyNoFlow);
            }
            if passive::refuses_syn(packet.tcp_flags(ctx), flow.flags) {
                let backend_id = entry.backend_id;
                passive::suspect(backend_id, PASSIVE_REASON_RST_TO_SYN, now);
                if passive::redispatch(&client, backend_id, now) {
                    conntrack::forget(&client, flow);
                    return drop(Verdict::DropRedispatched);
                }
            }
            flow_ptr
        }
    };
    conntrack::track_backend(flow_ptr, packet.tcp_flags(ctx), now);
    // SAFETY: map value pointer, valid for this run.
    let mac = unsafe { (*flow_ptr).client_mac };
    let to = Rewrite {
        src_addr: client.dst_addr,
        dst_addr: client.src_addr,
        src_port: client.dst_port,
        dst_port: client.src_port,
    };
    let learned = (mac != [0; 6]).then_some(mac);
    sending(send, to, Verdict::ReplyTx, Verdict::ReplyRedirect, learned)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier proves there is no reachable panic; this only satisfies no_std.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
