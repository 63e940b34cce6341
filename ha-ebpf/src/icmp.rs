//! ICMP, as a NAT on a router path must speak it (RFC 5508 section 3, RFC
//! 1812 section 4.3): errors about a flow's packets translated to the other
//! side, and the two errors the balancer itself raises when it cannot
//! forward (time exceeded, fragmentation needed). docs/data-path.md, "ICMP".

use aya_ebpf::{
    helpers::{bpf_csum_diff, bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use ha_common::{
    FLOW_LOCAL, FlowKey, NatKey, PASSIVE_REASON_ICMP_UNREACHABLE, PROTO_UDP, Settings,
    VIP_FLAG_ENABLED, Verdict, VipKey,
    checksum::{replace_u16, replace_u32, udp_finish},
};

use crate::{
    Send,
    forward::Exits,
    maps::{BACKENDS, CONNTRACK, REVERSE_NAT, VIPS},
    nat::Rewrite,
    parse::{
        ICMP_CHECK, ICMP_HDR_LEN, IP_CHECK, IP_DST, IP_SRC, IPPROTO_ICMP, L4_DPORT, L4_SPORT,
        Packet, TCP_CHECK, UDP_CHECK, ptr_at, read, write,
    },
    passive,
};

/// Bytes of a generated error after the frame's L2 header: its IPv4 and
/// ICMP headers, then the offending packet's IPv4 header and first 8 bytes
/// of L4 (RFC 792).
pub const ERROR_LEN: usize = 20 + 8 + 20 + 8;
/// The new headers an error puts in front of the offending packet's.
const PREPENDED: usize = 20 + ICMP_HDR_LEN;
pub const TIME_EXCEEDED: u8 = 11;
pub const DEST_UNREACH: u8 = 3;
pub const FRAG_NEEDED: u8 = 4;
/// IPv4 TTL of a generated error (Linux's `ip_default_ttl`). The upgrade
/// test build (`cargo xtask build-ebpf --variant`, `HA_EBPF_VARIANT` set at
/// build time) uses 63: another program, another tag, the same behaviour
/// otherwise.
const ERROR_TTL: u8 = if option_env!("HA_EBPF_VARIANT").is_some() {
    63
} else {
    64
};
/// TOS of a generated error: precedence "internetwork control", as Linux sends.
const ERROR_TOS: u8 = 0xc0;
/// An embedded TCP header is whole, and its checksum updated, only when
/// the error carries all 20 bytes of it: outer IPv4 + ICMP + inner IPv4 + 20.
const TCP_WHOLE_TOT_LEN: u16 = 20 + 8 + 20 + 20;

/// An ICMP error about one of our flows: where to translate it, in `send`;
/// `None` when it is not about a flow of ours (passed to the kernel).
///
/// From the client's side it is about a packet the VIP sent the client: the
/// embedded packet is VIP:port -> client, the flow the reverse of it. From
/// the backend's side it is about a packet a NAT port sent the backend: the
/// embedded packet is NAT address:port -> backend, found in `REVERSE_NAT`.
/// Either way the error must be addressed to the embedded packet's source.
#[inline(always)]
pub fn classify(
    ctx: &XdpContext,
    packet: &Packet,
    settings: &Settings,
    send: &mut Send,
) -> Option<Verdict> {
    if packet.outer_dst != packet.src_addr {
        return None;
    }
    let vip_key = VipKey {
        addr: packet.src_addr,
        port: packet.src_port,
        protocol: packet.protocol,
        _pad: 0,
    };
    // SAFETY: only the flags are read, at once.
    if let Some(vip) = unsafe { VIPS.get(vip_key) } {
        if vip.flags & VIP_FLAG_ENABLED == 0 {
            return None;
        }
        let key = FlowKey {
            src_addr: packet.dst_addr,
            dst_addr: packet.src_addr,
            src_port: packet.dst_port,
            dst_port: packet.src_port,
            protocol: packet.protocol,
            _pad: [0; 3],
        };
        // SAFETY: map value, read at once.
        let flow = unsafe { CONNTRACK.get(&key) }?;
        if flow.flags & FLOW_LOCAL != 0 {
            return None;
        }
        let backend = BACKENDS.get(flow.backend_id)?;
        if backend.addr == 0 {
            return None;
        }
        send.to = Rewrite {
            src_addr: flow.nat_addr,
            dst_addr: backend.addr,
            src_port: 0,
            dst_port: 0,
        };
        send.inner = Rewrite {
            src_addr: backend.addr,
            dst_addr: flow.nat_addr,
            src_port: backend.port,
            dst_port: flow.nat_port,
        };
        send.exits = Exits {
            tx: Verdict::IcmpForwardTx,
            redirect: Verdict::IcmpForwardRedirect,
            learned_mac: None,
        };
        return Some(Verdict::IcmpForwardTx);
    }
    if !settings.is_nat_port(packet.src_addr, packet.src_port) {
        return None;
    }
    let nat_key = NatKey {
        backend_addr: packet.dst_addr,
        lb_addr: packet.src_addr,
        backend_port: packet.dst_port,
        nat_port: packet.src_port,
        protocol: packet.protocol,
        _pad: [0; 3],
    };
    // SAFETY: map value, copied at once.
    let entry = unsafe { REVERSE_NAT.get(&nat_key) }?;
    let client = entry.flow;
    let backend_id = entry.backend_id;
    // SAFETY: map value, read at once.
    let flow = unsafe { CONNTRACK.get(&client) }?;
    // A local flow names its reverse entry too; errors about it are not translated here.
    if flow.flags & FLOW_LOCAL != 0 || !flow.names(nat_key.lb_addr, nat_key.nat_port, backend_id) {
        return None;
    }
    // Passive health: the backend (or the way to it) refused a new flow.
    if passive::flow_is_new(flow.flags) && unreachable(ctx, packet) {
        let now = crate::conntrack::now_ns(settings);
        passive::suspect(backend_id, PASSIVE_REASON_ICMP_UNREACHABLE, now);
    }
    let mac = flow.client_mac;
    send.to = Rewrite {
        src_addr: client.dst_addr,
        dst_addr: client.src_addr,
        src_port: 0,
        dst_port: 0,
    };
    send.inner = Rewrite {
        src_addr: client.src_addr,
        dst_addr: client.dst_addr,
        src_port: client.src_port,
        dst_port: client.dst_port,
    };
    send.exits = Exits {
        tx: Verdict::IcmpReplyTx,
        redirect: Verdict::IcmpReplyRedirect,
        learned_mac: (mac != [0; 6]).then_some(mac),
    };
    Some(Verdict::IcmpReplyTx)
}

/// Whether an ICMP error says its destination is unreachable: type 3, any
/// code but fragmentation needed (a path MTU, not a refusal).
#[inline(always)]
fn unreachable(ctx: &XdpContext, packet: &Packet) -> bool {
    read::<[u8; 2]>(ctx, packet.l4())
        .is_some_and(|[t, code]| t == DEST_UNREACH && code != FRAG_NEEDED)
}

/// Translates an ICMP error: the outer addresses become `outer`'s, the
/// embedded packet's addresses and ports `inner`'s; the outer and embedded
/// IPv4 checksums, the embedded UDP checksum (unless 0) or TCP checksum
/// (only when the error carries the whole TCP header), and the ICMP checksum
/// follow, each by RFC 1624 eqn. 3. `None` if the headers vanished. A BPF
/// subprogram: verified once, not in every path that sends.
#[inline(never)]
pub fn rewrite(ctx: &XdpContext, packet: &Packet, outer: &Rewrite, inner: &Rewrite) -> Option<()> {
    let l3 = packet.l3();
    let e = packet.inner();
    let icmp_check_at = packet.l4() + ICMP_CHECK;

    let check: u16 = read(ctx, l3 + IP_CHECK)?;
    let check = replace_u32(check, packet.outer_src, outer.src_addr);
    let check = replace_u32(check, packet.outer_dst, outer.dst_addr);
    write(ctx, l3 + IP_SRC, outer.src_addr)?;
    write(ctx, l3 + IP_DST, outer.dst_addr)?;
    write(ctx, l3 + IP_CHECK, check)?;

    let mut icmp: u16 = read(ctx, icmp_check_at)?;
    icmp = replace_u32(icmp, packet.src_addr, inner.src_addr);
    icmp = replace_u32(icmp, packet.dst_addr, inner.dst_addr);
    icmp = replace_u16(icmp, packet.src_port, inner.src_port);
    icmp = replace_u16(icmp, packet.dst_port, inner.dst_port);

    let old_ip_check: u16 = read(ctx, e + IP_CHECK)?;
    let ip_check = replace_u32(old_ip_check, packet.src_addr, inner.src_addr);
    let ip_check = replace_u32(ip_check, packet.dst_addr, inner.dst_addr);
    icmp = replace_u16(icmp, old_ip_check, ip_check);
    write(ctx, e + IP_SRC, inner.src_addr)?;
    write(ctx, e + IP_DST, inner.dst_addr)?;
    write(ctx, e + IP_CHECK, ip_check)?;

    let l4 = e + 20;
    let udp = packet.protocol == PROTO_UDP;
    let l4_check_at = if udp { l4 + UDP_CHECK } else { l4 + TCP_CHECK };
    if udp || packet.ip_total_len >= TCP_WHOLE_TOT_LEN {
        let old: u16 = read(ctx, l4_check_at)?;
        if !udp || old != 0 {
            let mut l4_check = replace_u32(old, packet.src_addr, inner.src_addr);
            l4_check = replace_u32(l4_check, packet.dst_addr, inner.dst_addr);
            l4_check = replace_u16(l4_check, packet.src_port, inner.src_port);
            l4_check = replace_u16(l4_check, packet.dst_port, inner.dst_port);
            if udp {
                l4_check = udp_finish(old, l4_check);
            }
            icmp = replace_u16(icmp, old, l4_check);
            write(ctx, l4_check_at, l4_check)?;
        }
    }
    write(ctx, l4 + L4_SPORT, inner.src_port)?;
    write(ctx, l4 + L4_DPORT, inner.dst_port)?;
    write(ctx, icmp_check_at, icmp)?;
    Some(())
}

/// The Internet checksum (RFC 1071) of `N` bytes of the frame at `at`
/// (`N` a multiple of 4), summed by the kernel's `bpf_csum_diff`.
#[inline(always)]
fn checksum<const N: usize>(ctx: &XdpContext, at: usize) -> Option<u16> {
    let bytes = ptr_at::<[u8; N]>(ctx, at)?;
    // SAFETY: `bytes` is inside the frame (checked by ptr_at) for N bytes.
    let sum = unsafe { bpf_csum_diff(core::ptr::null_mut(), 0, bytes as *mut u32, N as u32, 0) };
    if sum < 0 {
        return None;
    }
    let mut sum = sum as u64 & 0xffff_ffff;
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    Some(!(sum as u16))
}

/// Turns the frame into an ICMP error about it (type, code, and for
/// fragmentation needed the next-hop MTU, host order), sent back where it
/// came from: MACs swapped, any VLAN tag kept, from the address the packet
/// was sent to, to its source; the offending IPv4 header and first 8 bytes
/// of L4 as they arrived. A BPF subprogram. `None` if the frame could not
/// be reshaped (then it is dropped).
#[inline(never)]
pub fn answer(ctx: &XdpContext, packet: &Packet, icmp_type: u8, code: u8, mtu: u16) -> Option<()> {
    let l3 = packet.l3();
    let (src, dst) = (packet.src_addr, packet.dst_addr);
    let to_mac: [u8; 6] = read(ctx, 6)?;
    let from_mac: [u8; 6] = read(ctx, 0)?;
    // SAFETY: the helper checks the headroom itself.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(PREPENDED as i32)) } != 0 {
        return None;
    }
    write(ctx, 0, to_mac)?;
    write(ctx, 6, from_mac)?;
    // The ethertype, or the tag and the ethertype (with an untagged frame,
    // the extra bytes land where the IPv4 header is written next).
    let rest: [u8; 6] = read(ctx, PREPENDED + 12)?;
    write(ctx, 12, rest)?;
    let total = (ERROR_LEN as u16).to_be_bytes();
    write(ctx, l3, [0x45, ERROR_TOS, total[0], total[1], 0, 0, 0, 0])?;
    write(ctx, l3 + 8, [ERROR_TTL, IPPROTO_ICMP, 0, 0])?;
    write(ctx, l3 + IP_SRC, dst)?;
    write(ctx, l3 + IP_DST, src)?;
    let ip = checksum::<20>(ctx, l3)?;
    write(ctx, l3 + IP_CHECK, ip)?;
    let m = mtu.to_be_bytes();
    let icmp = l3 + 20;
    write(ctx, icmp, [icmp_type, code, 0, 0, 0, 0, m[0], m[1]])?;
    let body = checksum::<{ ERROR_LEN - 20 }>(ctx, icmp)?;
    write(ctx, icmp + ICMP_CHECK, body)?;
    let len = crate::parse::frame_len(ctx) as i32;
    let cut = (l3 + ERROR_LEN) as i32 - len;
    // SAFETY: shrinks the frame; the helper checks the bounds.
    if cut < 0 && unsafe { bpf_xdp_adjust_tail(ctx.ctx, cut) } != 0 {
        return None;
    }
    Some(())
}
