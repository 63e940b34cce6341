//! Bounds-checked header parsing. Every packet access goes through
//! [`ptr_at`], the one place that proves to the verifier that an access
//! stays inside the frame.

use aya_ebpf::programs::XdpContext;
use ha_common::{PROTO_TCP, PROTO_UDP};

pub const ETH_HDR_LEN: usize = 14;
const VLAN_HDR_LEN: usize = 4;
const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const IPV4_HDR_LEN: usize = 20;
const TCP_HDR_LEN: usize = 20;
const UDP_HDR_LEN: usize = 8;
pub const IPPROTO_ICMP: u8 = 1;
/// ICMP header, and the most of the embedded packet an error needs: its
/// IPv4 header (without options) and the first 8 bytes of its L4 header.
pub const ICMP_HDR_LEN: usize = 8;
pub const ICMP_ERROR_MIN: usize = IPV4_HDR_LEN + ICMP_HDR_LEN + IPV4_HDR_LEN + 8;
pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_TIME_EXCEEDED: u8 = 11;
pub const ICMP_PARAMETER_PROBLEM: u8 = 12;

// Offsets inside the IPv4 header.
pub const IP_TOT_LEN: usize = 2;
pub const IP_FRAG: usize = 6;
pub const IP_TTL: usize = 8;
const IP_PROTO: usize = 9;
pub const IP_CHECK: usize = 10;
pub const IP_SRC: usize = 12;
pub const IP_DST: usize = 16;
// Offsets inside the TCP/UDP header.
pub const L4_SPORT: usize = 0;
pub const L4_DPORT: usize = 2;
const TCP_FLAGS: usize = 13;
pub const TCP_CHECK: usize = 16;
pub const UDP_CHECK: usize = 6;
/// The ICMP checksum, inside the ICMP header.
pub const ICMP_CHECK: usize = 2;
/// DF in the fragment field (host order).
pub const IP_DF: u16 = 0x4000;

/// A pointer to a `T` at `offset` bytes into the frame, or `None` if it
/// would run past the end.
///
/// `data` and `data_end` are loaded volatile on purpose: otherwise LLVM
/// proves a later check redundant from an earlier one and drops it, while
/// the verifier, which tracks bounds per pointer register, can no longer
/// follow once an offset was spilled and reloaded. One check per access, on
/// the pointer that is used, is what the verifier can always see.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    // SAFETY: ctx.ctx is the kernel's xdp_md for this run.
    let (start, end) = unsafe {
        (
            core::ptr::read_volatile(&(*ctx.ctx).data) as usize,
            core::ptr::read_volatile(&(*ctx.ctx).data_end) as usize,
        )
    };
    if start + offset + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// The frame's length, all its buffers: with multi-buffer XDP (a frame
/// larger than a page, as with a jumbo MTU) `data_end` ends the first buffer
/// only, which always holds the headers.
#[inline(always)]
pub fn frame_len(ctx: &XdpContext) -> usize {
    // SAFETY: ctx.ctx is the kernel's xdp_md for this run.
    unsafe { aya_ebpf::helpers::bpf_xdp_get_buff_len(ctx.ctx) as usize }
}

/// The frame's length as far as a packet that ends at `end` needs to know
/// it: the first buffer's, measured directly, unless the packet reaches past
/// it (multi-buffer, rare), which alone costs the helper call that measures
/// all of them.
#[inline(always)]
fn length_for(ctx: &XdpContext, end: usize) -> usize {
    let linear = ctx.data_end() - ctx.data();
    if end > linear { frame_len(ctx) } else { linear }
}

/// Reads a `T` (a plain integer or byte array) at `offset`.
#[inline(always)]
pub fn read<T: Copy>(ctx: &XdpContext, offset: usize) -> Option<T> {
    // SAFETY: ptr_at checked that the bytes are inside the frame; unaligned
    // because packet fields are not aligned to their size.
    ptr_at::<T>(ctx, offset).map(|p| unsafe { p.read_unaligned() })
}

/// Writes a `T` at `offset`.
#[inline(always)]
pub fn write<T: Copy>(ctx: &XdpContext, offset: usize, value: T) -> Option<()> {
    // SAFETY: as in `read`.
    ptr_at::<T>(ctx, offset).map(|p| unsafe { p.write_unaligned(value) })
}

pub enum Fragment {
    /// Not a fragment.
    No,
    /// The first fragment: has the L4 header, more follow. (Later fragments
    /// have no L4 header and are told apart as [`Parsed::LaterFragment`].)
    First,
}

/// What the pipeline needs from an IPv4 packet. Addresses and ports are in
/// wire order, as stored in the maps. It lives in the per-CPU scratch map,
/// whose contents the verifier does not track: the header offsets are read
/// through [`Packet::l3`] and [`Packet::l4`], which bound them.
pub struct Packet {
    /// Offset of the IPv4 header (after Ethernet and any VLAN tag).
    l3: usize,
    /// Offset of the TCP/UDP header.
    l4: usize,
    pub vlan_tagged: bool,
    pub protocol: u8,
    pub src_addr: u32,
    pub dst_addr: u32,
    pub src_port: u16,
    pub dst_port: u16,
    pub has_ip_options: bool,
    pub fragment: Fragment,
    /// IPv4 total length, host order (for the FIB lookup's MTU check).
    pub ip_total_len: u16,
    /// An ICMP error ([`Parsed::IcmpError`]): `protocol`, the addresses and
    /// ports above are those of the packet it embeds (the one it is about),
    /// found at [`Packet::inner`]; `l4` is the ICMP header.
    pub icmp_error: bool,
    /// Offset of the embedded IPv4 header of an ICMP error.
    inner: usize,
    /// The frame's length, all its buffers (what the counters count).
    pub frame_len: usize,
    /// The outer addresses of an ICMP error (wire order).
    pub outer_src: u32,
    pub outer_dst: u32,
}

/// Every header ends within the frame's first 128 bytes (Ethernet, one tag,
/// a 60-byte IPv4 header, a TCP header), so an offset masked with this is
/// unchanged, and provably bounded.
const HEADER_OFFSET_MASK: usize = 0x7f;

impl Packet {
    /// Offset of the IPv4 header.
    #[inline(always)]
    pub fn l3(&self) -> usize {
        self.l3 & HEADER_OFFSET_MASK
    }

    /// Offset of the TCP/UDP header (of an ICMP error: the ICMP header).
    #[inline(always)]
    pub fn l4(&self) -> usize {
        self.l4 & HEADER_OFFSET_MASK
    }

    /// Offset of an ICMP error's embedded IPv4 header.
    #[inline(always)]
    pub fn inner(&self) -> usize {
        self.inner & HEADER_OFFSET_MASK
    }

    /// The TCP flags byte (0 for UDP), read from the frame each time it is
    /// needed rather than kept: the BPF verifier would otherwise remember
    /// every bit tested on a kept copy and walk the rest of the program once
    /// per combination.
    #[inline(always)]
    pub fn tcp_flags(&self, ctx: &XdpContext) -> u8 {
        if self.protocol != PROTO_TCP {
            return 0;
        }
        // Two bytes (the data offset's, then the flags): a one-byte check
        // `p + 1 > end` may be compiled as `p >= end`, which the verifier
        // does not take as a bound on `p`'s byte.
        read::<[u8; 2]>(ctx, self.l4() + TCP_FLAGS - 1).map_or(0, |b| b[1])
    }
}

pub enum Parsed {
    NotIpv4,
    /// Shorter than its headers claim, or an impossible IPv4 header.
    Malformed,
    /// IPv4, but not TCP or UDP: only the protocol matters.
    OtherIpv4(u8),
    /// A non-first fragment: no ports.
    LaterFragment,
    /// An ICMP error (destination unreachable, time exceeded, parameter
    /// problem) about a TCP or UDP packet: the `Packet` holds the embedded one.
    IcmpError,
    /// TCP or UDP over IPv4: the `Packet` given to [`parse`] is filled in.
    Ipv4,
}

/// Parses the frame's headers into `packet` (the per-CPU scratch). A BPF
/// subprogram: its temporaries (the IPv4 header among them) take a frame of
/// their own, not room in the one every later step stacks on.
#[inline(never)]
pub fn parse(ctx: &XdpContext, packet: &mut Packet) -> Parsed {
    let Some(mut ether_type) = read::<[u8; 2]>(ctx, 12).map(u16::from_be_bytes) else {
        return Parsed::Malformed;
    };
    let mut l3 = ETH_HDR_LEN;
    let mut vlan_tagged = false;
    if ether_type == ETH_P_8021Q || ether_type == ETH_P_8021AD {
        let Some(inner) = read::<[u8; 2]>(ctx, l3 + 2).map(u16::from_be_bytes) else {
            return Parsed::Malformed;
        };
        ether_type = inner;
        l3 += VLAN_HDR_LEN;
        vlan_tagged = true;
    }
    if ether_type != ETH_P_IPV4 {
        return Parsed::NotIpv4;
    }
    let Some(header) = read::<[u8; IPV4_HDR_LEN]>(ctx, l3) else {
        return Parsed::Malformed;
    };
    let version = header[0] >> 4;
    let header_len = ((header[0] & 0x0f) as usize) * 4;
    let ip_total_len = u16::from_be_bytes([header[IP_TOT_LEN], header[IP_TOT_LEN + 1]]);
    if version != 4 || header_len < IPV4_HDR_LEN || (ip_total_len as usize) < header_len {
        return Parsed::Malformed;
    }
    let frame_len = length_for(ctx, l3 + ip_total_len as usize);
    if l3 + ip_total_len as usize > frame_len {
        return Parsed::Malformed;
    }
    let frag = u16::from_be_bytes([header[IP_FRAG], header[IP_FRAG + 1]]);
    let fragment = if frag & 0x1fff != 0 {
        return Parsed::LaterFragment;
    } else if frag & 0x2000 != 0 {
        Fragment::First
    } else {
        Fragment::No
    };
    let protocol = header[IP_PROTO];
    let l4_min = match protocol {
        PROTO_TCP => TCP_HDR_LEN,
        PROTO_UDP => UDP_HDR_LEN,
        IPPROTO_ICMP => {
            let plain = header_len == IPV4_HDR_LEN && matches!(fragment, Fragment::No);
            if plain && ip_total_len as usize >= ICMP_ERROR_MIN {
                return icmp_error(ctx, l3, vlan_tagged, &header, frame_len, packet);
            }
            return Parsed::OtherIpv4(IPPROTO_ICMP);
        }
        other => return Parsed::OtherIpv4(other),
    };
    let l4 = l3 + header_len;
    // The whole fixed L4 header must be inside both the frame and the IP packet.
    if header_len + l4_min > ip_total_len as usize {
        return Parsed::Malformed;
    }
    let Some(ports) = read::<[u16; 2]>(ctx, l4) else {
        return Parsed::Malformed;
    };
    let l4_len = if protocol == PROTO_TCP {
        read::<[u8; TCP_HDR_LEN]>(ctx, l4).map(|_| ())
    } else {
        read::<[u8; UDP_HDR_LEN]>(ctx, l4).map(|_| ())
    };
    if l4_len.is_none() {
        return Parsed::Malformed;
    }
    *packet = Packet {
        l3,
        l4,
        vlan_tagged,
        protocol,
        src_addr: u32::from_ne_bytes([
            header[IP_SRC],
            header[IP_SRC + 1],
            header[IP_SRC + 2],
            header[IP_SRC + 3],
        ]),
        dst_addr: u32::from_ne_bytes([
            header[IP_DST],
            header[IP_DST + 1],
            header[IP_DST + 2],
            header[IP_DST + 3],
        ]),
        src_port: ports[0],
        dst_port: ports[1],
        has_ip_options: header_len != IPV4_HDR_LEN,
        fragment,
        ip_total_len,
        icmp_error: false,
        inner: 0,
        frame_len,
        outer_src: 0,
        outer_dst: 0,
    };
    Parsed::Ipv4
}

fn addr_at(header: &[u8; IPV4_HDR_LEN], at: usize) -> u32 {
    u32::from_ne_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]])
}

/// An ICMP packet of at least [`ICMP_ERROR_MIN`] bytes, without options and
/// not a fragment: an error about a TCP or UDP packet whose IPv4 header has no
/// options and which is not a later fragment, or `OtherIpv4(ICMP)`.
#[inline(always)]
fn icmp_error(
    ctx: &XdpContext,
    l3: usize,
    vlan_tagged: bool,
    outer: &[u8; IPV4_HDR_LEN],
    frame_len: usize,
    packet: &mut Packet,
) -> Parsed {
    let l4 = l3 + IPV4_HDR_LEN;
    let not_an_error = Parsed::OtherIpv4(IPPROTO_ICMP);
    let Some(icmp_type) = read::<u8>(ctx, l4) else {
        return not_an_error;
    };
    if icmp_type != ICMP_DEST_UNREACH
        && icmp_type != ICMP_TIME_EXCEEDED
        && icmp_type != ICMP_PARAMETER_PROBLEM
    {
        return not_an_error;
    }
    let inner = l4 + ICMP_HDR_LEN;
    let Some(header) = read::<[u8; IPV4_HDR_LEN]>(ctx, inner) else {
        return not_an_error;
    };
    let frag = u16::from_be_bytes([header[IP_FRAG], header[IP_FRAG + 1]]);
    let protocol = header[IP_PROTO];
    if header[0] != 0x45 || frag & 0x1fff != 0 || (protocol != PROTO_TCP && protocol != PROTO_UDP) {
        return not_an_error;
    }
    let Some(ports) = read::<[u16; 2]>(ctx, inner + IPV4_HDR_LEN) else {
        return not_an_error;
    };
    *packet = Packet {
        l3,
        l4,
        vlan_tagged,
        protocol,
        src_addr: addr_at(&header, IP_SRC),
        dst_addr: addr_at(&header, IP_DST),
        src_port: ports[0],
        dst_port: ports[1],
        has_ip_options: false,
        fragment: Fragment::No,
        ip_total_len: u16::from_be_bytes([outer[IP_TOT_LEN], outer[IP_TOT_LEN + 1]]),
        icmp_error: true,
        inner,
        frame_len,
        outer_src: addr_at(outer, IP_SRC),
        outer_dst: addr_at(outer, IP_DST),
    };
    Parsed::IcmpError
}
