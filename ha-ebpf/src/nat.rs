//! Address and port rewriting with incremental checksum updates (RFC 1624).

use aya_ebpf::programs::XdpContext;
use ha_common::{
    PROTO_UDP,
    checksum::{replace_u16, replace_u32, udp_finish},
};

use crate::parse::{
    IP_CHECK, IP_DST, IP_SRC, IP_TTL, L4_DPORT, L4_SPORT, Packet, TCP_CHECK, UDP_CHECK, read, write,
};

/// New source and destination (wire order) for a packet.
pub struct Rewrite {
    pub src_addr: u32,
    pub dst_addr: u32,
    pub src_port: u16,
    pub dst_port: u16,
}

/// Rewrites the IPv4 addresses and L4 ports and fixes both checksums.
/// `None` only if the headers vanished, which parse() already ruled out.
#[inline(always)]
pub fn rewrite(ctx: &XdpContext, packet: &Packet, to: &Rewrite) -> Option<()> {
    let l3 = packet.l3();
    let l4 = packet.l4();

    let ip_check: u16 = read(ctx, l3 + IP_CHECK)?;
    let ip_check = replace_u32(ip_check, packet.src_addr, to.src_addr);
    let ip_check = replace_u32(ip_check, packet.dst_addr, to.dst_addr);
    write(ctx, l3 + IP_SRC, to.src_addr)?;
    write(ctx, l3 + IP_DST, to.dst_addr)?;
    write(ctx, l3 + IP_CHECK, ip_check)?;

    // The L4 checksum covers the pseudo-header (both addresses) and the ports.
    let check_at = if packet.protocol == PROTO_UDP {
        l4 + UDP_CHECK
    } else {
        l4 + TCP_CHECK
    };
    let old_check: u16 = read(ctx, check_at)?;
    let mut check = replace_u32(old_check, packet.src_addr, to.src_addr);
    check = replace_u32(check, packet.dst_addr, to.dst_addr);
    check = replace_u16(check, packet.src_port, to.src_port);
    check = replace_u16(check, packet.dst_port, to.dst_port);
    if packet.protocol == PROTO_UDP {
        check = udp_finish(old_check, check);
    }
    write(ctx, l4 + L4_SPORT, to.src_port)?;
    write(ctx, l4 + L4_DPORT, to.dst_port)?;
    write(ctx, check_at, check)?;
    Some(())
}

/// Takes one from the TTL (the caller checked it is above 1) and updates
/// the IPv4 header checksum for the word it shares with the protocol.
#[inline(always)]
pub fn decrement_ttl(ctx: &XdpContext, packet: &Packet) -> Option<()> {
    let l3 = packet.l3();
    let old: [u8; 2] = read(ctx, l3 + IP_TTL)?;
    let new = [old[0].wrapping_sub(1), old[1]];
    let check: u16 = read(ctx, l3 + IP_CHECK)?;
    let check = replace_u16(check, u16::from_ne_bytes(old), u16::from_ne_bytes(new));
    write(ctx, l3 + IP_TTL, new)?;
    write(ctx, l3 + IP_CHECK, check)
}
