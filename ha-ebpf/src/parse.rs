//! Bounds-checked header parsing. Every packet access goes through [`ptr_at`],
//! which is the one place that proves to the verifier that a read stays
//! inside the frame.

use aya_ebpf::programs::XdpContext;
use ha_common::ProtoIndex;

pub const ETH_HDR_LEN: usize = 14;
pub const VLAN_HDR_LEN: usize = 4;
pub const ETH_P_IPV4: u16 = 0x0800;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;
pub const IPV4_MIN_HDR_LEN: usize = 20;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// The frame is shorter than the headers it announces.
pub struct Malformed;

pub enum L3 {
    Ipv4 { protocol: u8 },
    Other,
}

pub struct Frame {
    pub l3: L3,
}

/// A pointer to a `T` at `offset` bytes into the frame, or `None` if it would
/// run past the end.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*const T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *const T)
}

#[inline(always)]
fn read_be16(ctx: &XdpContext, offset: usize) -> Result<u16, Malformed> {
    let p = ptr_at::<[u8; 2]>(ctx, offset).ok_or(Malformed)?;
    // SAFETY: ptr_at checked the two bytes are inside the frame.
    Ok(u16::from_be_bytes(unsafe { *p }))
}

#[inline(always)]
fn read_u8(ctx: &XdpContext, offset: usize) -> Result<u8, Malformed> {
    let p = ptr_at::<u8>(ctx, offset).ok_or(Malformed)?;
    // SAFETY: ptr_at checked the byte is inside the frame.
    Ok(unsafe { *p })
}

/// Ethernet, at most one 802.1Q/802.1ad tag, then the IPv4 header if any.
#[inline(always)]
pub fn parse_frame(ctx: &XdpContext) -> Result<Frame, Malformed> {
    let mut ether_type = read_be16(ctx, 12)?;
    let mut offset = ETH_HDR_LEN;
    if ether_type == ETH_P_8021Q || ether_type == ETH_P_8021AD {
        ether_type = read_be16(ctx, offset + 2)?;
        offset += VLAN_HDR_LEN;
    }
    if ether_type != ETH_P_IPV4 {
        return Ok(Frame { l3: L3::Other });
    }
    let version_ihl = read_u8(ctx, offset)?;
    let header_len = ((version_ihl & 0x0f) as usize) * 4;
    if version_ihl >> 4 != 4 || header_len < IPV4_MIN_HDR_LEN {
        return Err(Malformed);
    }
    // The whole announced header must be present.
    ptr_at::<[u8; IPV4_MIN_HDR_LEN]>(ctx, offset).ok_or(Malformed)?;
    if ctx.data() + offset + header_len > ctx.data_end() {
        return Err(Malformed);
    }
    let protocol = read_u8(ctx, offset + 9)?;
    Ok(Frame {
        l3: L3::Ipv4 { protocol },
    })
}

#[inline(always)]
pub fn classify_ipv4_protocol(protocol: u8) -> ProtoIndex {
    match protocol {
        IPPROTO_TCP => ProtoIndex::Tcp,
        IPPROTO_UDP => ProtoIndex::Udp,
        IPPROTO_ICMP => ProtoIndex::Icmp,
        _ => ProtoIndex::OtherIpv4,
    }
}
