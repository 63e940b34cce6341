//! The ha-lb XDP program.
//!
//! A short pipeline, one module per step:
//! parse -> classify (VIP? reply?) -> conntrack -> select (Maglev) -> rewrite (NAT) -> forward.
//! The entry point only runs it, counts the verdict and returns the action.
#![no_std]
#![no_main]

mod classify;
mod conntrack;
mod forward;
mod maps;
mod nat;
mod parse;
mod select;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use ha_common::{
    BACKEND_FLAG_DOWN, BACKEND_FLAG_LOCAL, BackendInfo, Event, FLOW_LOCAL, Flow, FlowKey,
    NAT_PORT_ATTEMPTS, NatKey, PROTO_TCP, PROTO_UDP, SETTINGS_FLAG_DEBUG, Settings,
    VIP_FLAG_ENABLED, Verdict, VipInfo, hash::nat_port_candidate, port_to_wire,
};

use crate::{
    classify::Class,
    conntrack::Lifecycle,
    maps::{
        BACKEND_STATS, BACKENDS, CONNTRACK, REVERSE_NAT, SETTINGS, VIP_STATS, count_event,
        count_traffic, count_verdict,
    },
    nat::Rewrite,
    parse::{Fragment, IPPROTO_ICMP, Packet, Parsed, TCP_SYN},
};

const BPF_NOEXIST: u64 = 1;

#[xdp]
pub fn ha_xdp(ctx: XdpContext) -> u32 {
    let frame_len = ctx.data_end() - ctx.data();
    let (action, verdict) = process(&ctx, frame_len);
    count_verdict(verdict, frame_len);
    action
}

/// Passes everything. Not used by the agent: it is the floor that benchmarks
/// measure the data path against, and the lab attaches it to the far end of
/// each veth, because veth delivers XDP_TX frames promptly only to a peer
/// that runs an XDP program.
#[xdp]
pub fn ha_xdp_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[inline(always)]
fn pass(verdict: Verdict) -> (u32, Verdict) {
    (xdp_action::XDP_PASS, verdict)
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

#[inline(always)]
fn process(ctx: &XdpContext, frame_len: usize) -> (u32, Verdict) {
    let packet = match parse::parse(ctx) {
        Parsed::Ipv4(packet) => packet,
        Parsed::NotIpv4 => return pass(Verdict::PassNonIpv4),
        Parsed::Malformed => return pass(Verdict::PassMalformed),
        Parsed::OtherIpv4(protocol) => return pass_by_protocol(protocol),
        Parsed::LaterFragment => return pass(Verdict::PassFragment),
    };
    let Some(settings) = SETTINGS.get(0) else {
        return pass_by_protocol(packet.protocol);
    };
    let settings = *settings;
    match classify::classify(&packet, &settings) {
        Class::ToVip(vip) => to_vip(ctx, &packet, &vip, &settings, frame_len),
        Class::Reply(client_flow, nat_key) => reply(ctx, &packet, &client_flow, &nat_key),
        Class::NotOurs => pass_by_protocol(packet.protocol),
    }
}

/// A client packet to a VIP: find or pick its backend, NAT it, send it.
#[inline(always)]
fn to_vip(
    ctx: &XdpContext,
    packet: &Packet,
    vip: &VipInfo,
    settings: &Settings,
    frame_len: usize,
) -> (u32, Verdict) {
    if vip.flags & VIP_FLAG_ENABLED == 0 {
        return pass(Verdict::PassVipDisabled);
    }
    // Options may carry addresses (source routing, record route) that a NAT
    // would leave wrong, and a first fragment's flow cannot be followed into
    // the later ones: neither appears in control-plane traffic.
    if packet.has_ip_options {
        return (xdp_action::XDP_DROP, Verdict::DropVipIpOptions);
    }
    if let Fragment::First = packet.fragment {
        return (xdp_action::XDP_DROP, Verdict::DropVipFragment);
    }
    let key = FlowKey {
        src_addr: packet.src_addr,
        dst_addr: packet.dst_addr,
        src_port: packet.src_port,
        dst_port: packet.dst_port,
        protocol: packet.protocol,
        _pad: [0; 3],
    };
    let now = conntrack::now_ns();
    let existing = conntrack::lookup(&key, settings, now)
        .and_then(|flow| leave_down_backend(&key, flow, settings));
    let (backend_id, backend, nat_port, new_flow, lifecycle) = match existing {
        Some(flow_ptr) => {
            let lifecycle =
                conntrack::track(flow_ptr, packet.protocol, packet.tcp_flags, true, now);
            // SAFETY: map value pointer, valid for this run.
            let flow = unsafe { *flow_ptr };
            let Some(backend) = BACKENDS.get(flow.backend_id) else {
                return (xdp_action::XDP_DROP, Verdict::DropStaleBackend);
            };
            if flow.flags & FLOW_LOCAL != 0 {
                count_traffic(&VIP_STATS, vip.slot, frame_len, false);
                count_traffic(&BACKEND_STATS, flow.backend_id, frame_len, false);
                if let Lifecycle::Reset = lifecycle {
                    conntrack::forget(&key, None);
                }
                return pass(Verdict::PassLocalBackend);
            }
            if backend.addr == 0 {
                return (xdp_action::XDP_DROP, Verdict::DropStaleBackend);
            }
            (flow.backend_id, *backend, flow.nat_port, false, lifecycle)
        }
        None => {
            if packet.protocol == PROTO_TCP && packet.tcp_flags & TCP_SYN == 0 {
                count_event(Event::MidstreamPickup);
            }
            let Some((backend_id, backend, hash)) = select::select(vip, &key) else {
                return (xdp_action::XDP_DROP, Verdict::DropNoBackend);
            };
            if backend.flags & BACKEND_FLAG_LOCAL != 0 {
                let flow = Flow {
                    backend_id,
                    nat_port: 0,
                    flags: FLOW_LOCAL,
                    _pad: 0,
                    last_seen_ns: now,
                    closing_since_ns: 0,
                    client_mac: [0; 6],
                    _pad2: [0; 2],
                };
                let _ = CONNTRACK.insert(key, flow, 0);
                count_event(Event::NewFlow);
                count_traffic(&VIP_STATS, vip.slot, frame_len, true);
                count_traffic(&BACKEND_STATS, backend_id, frame_len, true);
                return pass(Verdict::PassLocalBackend);
            }
            let Some(nat_port) = allocate_nat_port(&key, hash, &backend, settings) else {
                return (xdp_action::XDP_DROP, Verdict::DropNatExhausted);
            };
            let (flags, lifecycle) = conntrack::first_packet(packet.protocol, packet.tcp_flags);
            let flow = Flow {
                backend_id,
                nat_port,
                flags,
                _pad: 0,
                last_seen_ns: now,
                closing_since_ns: 0,
                client_mac: parse::read(ctx, 6).unwrap_or([0; 6]),
                _pad2: [0; 2],
            };
            let _ = CONNTRACK.insert(key, flow, 0);
            count_event(Event::NewFlow);
            if settings.flags & SETTINGS_FLAG_DEBUG != 0 {
                aya_log_ebpf::info!(
                    ctx,
                    "new flow to backend {} nat port {}",
                    backend_id,
                    u16::from_be(nat_port)
                );
            }
            (backend_id, backend, nat_port, true, lifecycle)
        }
    };
    count_traffic(&VIP_STATS, vip.slot, frame_len, new_flow);
    count_traffic(&BACKEND_STATS, backend_id, frame_len, new_flow);

    let to = Rewrite {
        src_addr: settings.lb_addr,
        dst_addr: backend.addr,
        src_port: nat_port,
        dst_port: backend.port,
    };
    let nat_key = NatKey::new(&backend, settings.lb_addr, nat_port, packet.protocol);
    let outward = (Verdict::ForwardTx, Verdict::ForwardRedirect);
    send(ctx, packet, &to, outward, None, (lifecycle, &key, &nat_key))
}

/// The end of both paths: rewrite, forward, and once the packet is on its
/// way, forget the flow if it was an RST.
#[inline(always)]
fn send(
    ctx: &XdpContext,
    packet: &Packet,
    to: &Rewrite,
    (tx, redirect): (Verdict, Verdict),
    learned_mac: Option<[u8; 6]>,
    (lifecycle, flow, nat_key): (Lifecycle, &FlowKey, &NatKey),
) -> (u32, Verdict) {
    if nat::rewrite(ctx, packet, to).is_none() {
        return pass(Verdict::PassMalformed);
    }
    let result = forward::forward(
        ctx,
        packet,
        to.src_addr,
        to.dst_addr,
        tx,
        redirect,
        learned_mac,
    );
    if let Lifecycle::Reset = lifecycle {
        count_event(Event::FlowReset);
        conntrack::forget(flow, Some(nat_key));
    }
    result
}

/// An established flow whose backend is down is forgotten here, so its
/// packet takes a live backend as a new flow would.
#[inline(always)]
fn leave_down_backend(key: &FlowKey, flow: *mut Flow, settings: &Settings) -> Option<*mut Flow> {
    // SAFETY: map value pointer, valid for this run.
    let entry = unsafe { *flow };
    let backend = BACKENDS.get(entry.backend_id)?;
    if backend.flags & BACKEND_FLAG_DOWN == 0 {
        return Some(flow);
    }
    let nat_key = NatKey::new(backend, settings.lb_addr, entry.nat_port, key.protocol);
    conntrack::forget(key, Some(&nat_key));
    count_event(Event::MovedFromDownBackend);
    None
}

/// Claims a NAT port for a new flow by inserting its reverse entry with
/// BPF_NOEXIST: the insert either wins the port or fails, so two flows never
/// share one, whichever CPUs they run on.
#[inline(always)]
fn allocate_nat_port(
    key: &FlowKey,
    hash: u32,
    backend: &BackendInfo,
    settings: &Settings,
) -> Option<u16> {
    for attempt in 0..NAT_PORT_ATTEMPTS {
        let port = port_to_wire(nat_port_candidate(
            hash,
            attempt,
            settings.nat_port_min,
            settings.nat_port_max,
        ));
        let nat_key = NatKey::new(backend, settings.lb_addr, port, key.protocol);
        if REVERSE_NAT.insert(nat_key, key, BPF_NOEXIST).is_ok() {
            return Some(port);
        }
        count_event(Event::NatPortCollision);
    }
    None
}

/// A backend's reply to a NAT port: back to VIP -> client.
#[inline(always)]
fn reply(
    ctx: &XdpContext,
    packet: &Packet,
    client_flow: &FlowKey,
    nat_key: &NatKey,
) -> (u32, Verdict) {
    if packet.has_ip_options {
        return pass_by_protocol(packet.protocol);
    }
    let now = conntrack::now_ns();
    let (lifecycle, learned_mac) = match CONNTRACK.get_ptr_mut(client_flow) {
        Some(flow) => {
            // SAFETY: map value pointer, valid for this run.
            let mac = unsafe { (*flow).client_mac };
            let lifecycle = conntrack::track(flow, packet.protocol, packet.tcp_flags, false, now);
            (lifecycle, (mac != [0; 6]).then_some(mac))
        }
        None => {
            // The reverse entry alone still says where the reply goes.
            count_event(Event::ReplyOrphaned);
            (Lifecycle::Continue, None)
        }
    };
    let to = Rewrite {
        src_addr: client_flow.dst_addr,
        dst_addr: client_flow.src_addr,
        src_port: client_flow.dst_port,
        dst_port: client_flow.src_port,
    };
    let back = (Verdict::ReplyTx, Verdict::ReplyRedirect);
    send(
        ctx,
        packet,
        &to,
        back,
        learned_mac,
        (lifecycle, client_flow, nat_key),
    )
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
