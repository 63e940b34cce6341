//! **ICMP** (docs/data-path.md, "ICMP"): errors about a flow's packets translated to the other
//! side (RFC 5508 section 3), and the errors the data path raises itself (time exceeded,
//! fragmentation needed; RFC 792, RFC 1812 section 4.3).
//!
//! Choices where the spec leaves room: none beyond the spec's own; the checksum updates follow
//! "5. Rewrite" (eqn. 3, word by word, every word of every replaced field).

use ha_common::{FLOW_LOCAL, FlowKey, NatKey, PROTO_TCP, PROTO_UDP, Verdict, VipKey};

use crate::classify::is_live_nat_port;
use crate::forward::{Hop, Sent, Translate};
use crate::frame::internet_checksum;
use crate::nat::{
    Rewrite, addr_words, csum_update, csum_update_words, port_word, read_be16, write_bytes,
};
use crate::parse::{
    ETH_HLEN, ETH_TAGGED_HLEN, ETHERTYPE_8021AD, ETHERTYPE_8021Q, be16, wire16, wire32,
};
use crate::{Ctx, Fib, XDP_PASS, flow::names};

/// ICMP destination unreachable.
pub const DEST_UNREACH: u8 = 3;
/// Code "fragmentation needed and DF set".
pub const FRAG_NEEDED: u8 = 4;
/// ICMP time exceeded.
pub const TIME_EXCEEDED: u8 = 11;
/// ICMP parameter problem.
pub const PARAMETER_PROBLEM: u8 = 12;
/// The least `tot_len` of an ICMP error the data path looks into: IPv4 20, ICMP 8, embedded
/// IPv4 20, 8 bytes of embedded L4.
pub const ERROR_MIN_TOT_LEN: u16 = 56;
/// The `tot_len` from which an embedded TCP header is whole (its checksum is updated).
pub const TCP_WHOLE_TOT_LEN: u16 = 68;

/// An ICMP error about a TCP or UDP packet. Addresses and ports are wire order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IcmpError {
    /// One VLAN tag.
    pub tagged: bool,
    /// Offset of the outer IPv4 header.
    pub l3: usize,
    /// Outer `tot_len`.
    pub tot_len: u16,
    /// Outer source and destination.
    pub outer_src: u32,
    /// Outer destination.
    pub outer_dst: u32,
    /// Offset of the embedded IPv4 header (`l3 + 28`).
    pub inner: usize,
    /// The embedded packet's protocol (TCP or UDP).
    pub protocol: u8,
    /// Embedded source address.
    pub src_addr: u32,
    /// Embedded destination address.
    pub dst_addr: u32,
    /// Embedded source port.
    pub src_port: u16,
    /// Embedded destination port.
    pub dst_port: u16,
    /// The ICMP type (3, 11 or 12).
    pub icmp_type: u8,
    /// The ICMP code.
    pub icmp_code: u8,
}

/// Parse step 5 for ICMP: given a frame that parse stopped with `pass_icmp`, the error, if it is
/// one: outer `ihl == 20`, not a first fragment, `tot_len >= 56`, type 3, 11 or 12, embedded
/// `f[e] == 0x45`, embedded fragment offset 0, embedded protocol TCP or UDP.
pub fn parse_error(f: &[u8]) -> Option<IcmpError> {
    let mut l3 = ETH_HLEN;
    let mut tagged = false;
    let ethertype = be16(f, 12)?;
    if ethertype == ETHERTYPE_8021Q || ethertype == ETHERTYPE_8021AD {
        l3 = ETH_TAGGED_HLEN;
        tagged = true;
    }
    let tot_len = be16(f, l3 + 2)?;
    let fragment = be16(f, l3 + 6)?;
    if *f.get(l3)? & 0x0f != 5 || fragment & 0x2000 != 0 || tot_len < ERROR_MIN_TOT_LEN {
        return None;
    }
    let l4 = l3 + 20;
    if ![DEST_UNREACH, TIME_EXCEEDED, PARAMETER_PROBLEM].contains(f.get(l4)?) {
        return None;
    }
    let e = l4 + 8;
    let protocol = *f.get(e + 9)?;
    if *f.get(e)? != 0x45
        || be16(f, e + 6)? & 0x1fff != 0
        || (protocol != PROTO_TCP && protocol != PROTO_UDP)
    {
        return None;
    }
    Some(IcmpError {
        tagged,
        l3,
        tot_len,
        outer_src: wire32(f, l3 + 12)?,
        outer_dst: wire32(f, l3 + 16)?,
        inner: e,
        protocol,
        src_addr: wire32(f, e + 12)?,
        dst_addr: wire32(f, e + 16)?,
        src_port: wire16(f, e + 20)?,
        dst_port: wire16(f, e + 22)?,
        icmp_type: *f.get(l4)?,
        icmp_code: *f.get(l4 + 1)?,
    })
}

/// The translation of an ICMP error in `frame`: outer addresses to `outer`'s, embedded addresses
/// and ports to `inner`'s, with the outer and embedded IPv4 checksums, the embedded UDP checksum
/// (unless 0; a result of 0 is written `0xffff`) or TCP checksum (only when `tot_len >= 68`), and
/// the ICMP checksum (every embedded word that changed: addresses, ports, the embedded IPv4
/// checksum, the embedded L4 checksum when it was updated) following by eqn. 3.
pub fn translate(frame: &mut [u8], e: &IcmpError, outer: &Rewrite, inner: &Rewrite) -> Option<()> {
    let pairs = |a: u32, b: u32| {
        let (old, new) = (addr_words(a), addr_words(b));
        [(old[0], new[0]), (old[1], new[1])]
    };
    let outer_words: Vec<(u16, u16)> = pairs(e.outer_src, outer.src_addr)
        .into_iter()
        .chain(pairs(e.outer_dst, outer.dst_addr))
        .collect();
    let l3 = e.l3;
    let check = csum_update_words(read_be16(frame, l3 + 10)?, &outer_words);
    write_bytes(frame, l3 + 10, &check.to_be_bytes())?;
    write_bytes(frame, l3 + 12, &outer.src_addr.to_ne_bytes())?;
    write_bytes(frame, l3 + 16, &outer.dst_addr.to_ne_bytes())?;

    let address_words: Vec<(u16, u16)> = pairs(e.src_addr, inner.src_addr)
        .into_iter()
        .chain(pairs(e.dst_addr, inner.dst_addr))
        .collect();
    let port_words = [
        (port_word(e.src_port), port_word(inner.src_port)),
        (port_word(e.dst_port), port_word(inner.dst_port)),
    ];
    let icmp_at = l3 + 22;
    let mut icmp = csum_update_words(read_be16(frame, icmp_at)?, &address_words);
    icmp = csum_update_words(icmp, &port_words);

    let ip_at = e.inner + 10;
    let old_ip = read_be16(frame, ip_at)?;
    let new_ip = csum_update_words(old_ip, &address_words);
    icmp = csum_update(icmp, old_ip, new_ip);
    write_bytes(frame, ip_at, &new_ip.to_be_bytes())?;
    write_bytes(frame, e.inner + 12, &inner.src_addr.to_ne_bytes())?;
    write_bytes(frame, e.inner + 16, &inner.dst_addr.to_ne_bytes())?;

    let l4 = e.inner + 20;
    let udp = e.protocol == PROTO_UDP;
    let l4_at = if udp { l4 + 6 } else { l4 + 16 };
    let whole = udp || e.tot_len >= TCP_WHOLE_TOT_LEN;
    if whole {
        let old = read_be16(frame, l4_at)?;
        if !(udp && old == 0) {
            let mut l4_check = csum_update_words(old, &address_words);
            l4_check = csum_update_words(l4_check, &port_words);
            if udp && l4_check == 0 {
                l4_check = 0xffff;
            }
            icmp = csum_update(icmp, old, l4_check);
            write_bytes(frame, l4_at, &l4_check.to_be_bytes())?;
        }
    }
    write_bytes(frame, l4, &inner.src_port.to_ne_bytes())?;
    write_bytes(frame, l4 + 2, &inner.dst_port.to_ne_bytes())?;
    write_bytes(frame, icmp_at, &icmp.to_be_bytes())
}

/// Replaces `frame` by an ICMP error about it: Ethernet with the MACs swapped and the rest of
/// the L2 header (any tag) kept; IPv4 `45 c0`, `tot_len` 56, id 0, no fragment bits, TTL 64,
/// protocol 1, from the frame's destination address to its source; ICMP `icmp_type`, `code`,
/// 2 zero bytes, `mtu` (big-endian); the frame's IPv4 header and first 8 bytes after it as they
/// arrived. Both checksums computed in full.
pub fn answer(frame: &mut Vec<u8>, l3: usize, icmp_type: u8, code: u8, mtu: u16) {
    let original = frame.clone();
    let mut out = Vec::with_capacity(l3 + 56);
    out.extend_from_slice(&original[6..12]);
    out.extend_from_slice(&original[0..6]);
    out.extend_from_slice(&original[12..l3]);
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[1] = 0xc0;
    ip[2..4].copy_from_slice(&56u16.to_be_bytes());
    ip[8] = 64;
    ip[9] = 1;
    ip[12..16].copy_from_slice(&original[l3 + 16..l3 + 20]);
    ip[16..20].copy_from_slice(&original[l3 + 12..l3 + 16]);
    let check = internet_checksum(&ip);
    ip[10..12].copy_from_slice(&check.to_be_bytes());
    out.extend_from_slice(&ip);
    let mut icmp = vec![icmp_type, code, 0, 0, 0, 0];
    icmp.extend_from_slice(&mtu.to_be_bytes());
    icmp.extend_from_slice(&original[l3..l3 + 28]);
    let check = internet_checksum(&icmp);
    icmp[2..4].copy_from_slice(&check.to_be_bytes());
    out.extend_from_slice(&icmp);
    *frame = out;
}

impl Ctx<'_> {
    /// "ICMP errors": an error about one of our flows is translated and forwarded (step 6);
    /// anything else is `pass_icmp`.
    pub fn icmp_error(
        &mut self,
        e: &IcmpError,
        frame: &mut Vec<u8>,
        ingress: u32,
        fib: &dyn Fib,
    ) -> (u32, Verdict) {
        let pass = (XDP_PASS, Verdict::PassIcmp);
        if e.outer_dst != e.src_addr {
            return pass;
        }
        let vip_key = VipKey {
            addr: e.src_addr,
            port: e.src_port,
            protocol: e.protocol,
            _pad: 0,
        };
        let hop = Hop::of_error(e);
        if let Some(vip) = self.config.vips.get(&vip_key) {
            if vip.flags & ha_common::VIP_FLAG_ENABLED == 0 {
                return pass;
            }
            let key = FlowKey {
                src_addr: e.dst_addr,
                dst_addr: e.src_addr,
                src_port: e.dst_port,
                dst_port: e.src_port,
                protocol: e.protocol,
                _pad: [0; 3],
            };
            let Some(flow) = self.flow(&key) else {
                return pass;
            };
            if flow.flags & FLOW_LOCAL != 0 {
                return pass;
            }
            let Some(backend) = self.backend(flow.backend_id) else {
                return pass;
            };
            if backend.addr == 0 {
                return pass;
            }
            let translate = Translate::IcmpError {
                error: *e,
                outer: Rewrite {
                    src_addr: flow.nat_addr,
                    dst_addr: backend.addr,
                    src_port: 0,
                    dst_port: 0,
                },
                inner: Rewrite {
                    src_addr: backend.addr,
                    dst_addr: flow.nat_addr,
                    src_port: backend.port,
                    dst_port: flow.nat_port,
                },
            };
            return self.forward(
                frame,
                &hop,
                &translate,
                ingress,
                fib,
                None,
                Sent::ICMP_FORWARD,
            );
        }
        if !is_live_nat_port(&self.config.settings, e.src_addr, e.src_port) {
            return pass;
        }
        let nat_key = NatKey {
            backend_addr: e.dst_addr,
            lb_addr: e.src_addr,
            backend_port: e.dst_port,
            nat_port: e.src_port,
            protocol: e.protocol,
            _pad: [0; 3],
        };
        let Some(entry) = self.state.reverse.get(&nat_key).copied() else {
            return pass;
        };
        let client = entry.flow;
        let Some(flow) = self.flow(&client) else {
            return pass;
        };
        if flow.flags & FLOW_LOCAL != 0
            || !names(&flow, nat_key.lb_addr, nat_key.nat_port, entry.backend_id)
        {
            return pass;
        }
        // Passive health: destination unreachable (not fragmentation needed) for a new flow.
        if crate::passive::is_new(flow.flags)
            && e.icmp_type == DEST_UNREACH
            && e.icmp_code != FRAG_NEEDED
        {
            self.suspect(entry.backend_id, ha_common::PASSIVE_REASON_ICMP_UNREACHABLE);
        }
        let translate = Translate::IcmpError {
            error: *e,
            outer: Rewrite {
                src_addr: client.dst_addr,
                dst_addr: client.src_addr,
                src_port: 0,
                dst_port: 0,
            },
            inner: Rewrite {
                src_addr: client.src_addr,
                dst_addr: client.dst_addr,
                src_port: client.src_port,
                dst_port: client.dst_port,
            },
        };
        let learned = (flow.client_mac != [0; 6]).then_some(flow.client_mac);
        self.forward(
            frame,
            &hop,
            &translate,
            ingress,
            fib,
            learned,
            Sent::ICMP_REPLY,
        )
    }
}
