//! Step 1, **Parse** (docs/data-path.md, "Processing a frame" / "1. Parse").
//!
//! Every read goes through [`be16`], [`wire16`] or [`wire32`], which return `None` past the end
//! of the frame; the length checks below are the spec's, made before the reads they protect.

use ha_common::{PROTO_TCP, PROTO_UDP, Verdict};

/// Length of an Ethernet header.
pub const ETH_HLEN: usize = 14;
/// Length of an Ethernet header with one 802.1Q/802.1ad tag.
pub const ETH_TAGGED_HLEN: usize = 18;
/// Ethertype IPv4.
pub const ETHERTYPE_IPV4: u16 = 0x0800;
/// Ethertype 802.1Q.
pub const ETHERTYPE_8021Q: u16 = 0x8100;
/// Ethertype 802.1ad.
pub const ETHERTYPE_8021AD: u16 = 0x88a8;
/// Minimum IPv4 header.
pub const IPV4_MIN_HLEN: usize = 20;
/// `IPPROTO_ICMP`.
pub const PROTO_ICMP: u8 = 1;
/// Bytes of TCP header the data path needs.
pub const TCP_NEEDED: usize = 20;
/// Bytes of UDP header the data path needs.
pub const UDP_NEEDED: usize = 8;

/// The two L4 protocols a packet the data path looks at can have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L4 {
    /// TCP, with its flags byte (`f[l4+13]`).
    Tcp {
        /// The TCP flags byte.
        flags: u8,
    },
    /// UDP (no flags).
    Udp,
}

/// A frame that passed step 1: the fields the later steps use.
///
/// Addresses and ports are the wire bytes in native integers (as in map keys).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Packet {
    /// One VLAN tag was present.
    pub tagged: bool,
    /// Offset of the IPv4 header (14 or 18).
    pub l3: usize,
    /// IPv4 header length in bytes (`ihl * 4`).
    pub ihl: usize,
    /// Offset of the L4 header (`l3 + ihl`).
    pub l4: usize,
    /// IPv4 total length (host order).
    pub tot_len: u16,
    /// MF set (and offset 0): a first fragment.
    pub first_fragment: bool,
    /// `ihl != 20`.
    pub options: bool,
    /// TCP (with flags) or UDP.
    pub l4_proto: L4,
    /// Source address (wire order).
    pub src_addr: u32,
    /// Destination address (wire order).
    pub dst_addr: u32,
    /// Source port (wire order).
    pub src_port: u16,
    /// Destination port (wire order).
    pub dst_port: u16,
}

impl Packet {
    /// The IP protocol number (6 or 17).
    pub fn protocol(&self) -> u8 {
        match self.l4_proto {
            L4::Tcp { .. } => PROTO_TCP,
            L4::Udp => PROTO_UDP,
        }
    }

    /// The TCP flags byte; 0 for UDP ("UDP packets have no flags").
    pub fn flags(&self) -> u8 {
        match self.l4_proto {
            L4::Tcp { flags } => flags,
            L4::Udp => 0,
        }
    }

    /// Whether this is TCP.
    pub fn is_tcp(&self) -> bool {
        matches!(self.l4_proto, L4::Tcp { .. })
    }
}

/// A big-endian (host-value) 16-bit field.
pub fn be16(f: &[u8], at: usize) -> Option<u16> {
    let bytes = f.get(at..at.checked_add(2)?)?;
    Some(u16::from_be_bytes([bytes[0], bytes[1]]))
}

/// A 16-bit field as wire bytes in a native integer.
pub fn wire16(f: &[u8], at: usize) -> Option<u16> {
    let bytes = f.get(at..at.checked_add(2)?)?;
    Some(u16::from_ne_bytes([bytes[0], bytes[1]]))
}

/// A 32-bit field as wire bytes in a native integer.
pub fn wire32(f: &[u8], at: usize) -> Option<u32> {
    let bytes = f.get(at..at.checked_add(4)?)?;
    Some(u32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
}

/// Step 1: the packet, or the `XDP_PASS` verdict it stops with (`pass_malformed`,
/// `pass_non_ipv4`, `pass_fragment`, `pass_icmp`, `pass_other_ipv4`).
pub fn parse(f: &[u8]) -> Result<Packet, Verdict> {
    let n = f.len();
    let malformed = Verdict::PassMalformed;

    // 1. Ethernet, at most one tag.
    if n < ETH_HLEN {
        return Err(malformed);
    }
    let mut ethertype = be16(f, 12).ok_or(malformed)?;
    let mut l3 = ETH_HLEN;
    let mut tagged = false;
    if ethertype == ETHERTYPE_8021Q || ethertype == ETHERTYPE_8021AD {
        if n < ETH_TAGGED_HLEN {
            return Err(malformed);
        }
        ethertype = be16(f, 16).ok_or(malformed)?;
        l3 = ETH_TAGGED_HLEN;
        tagged = true;
    }

    // 2. IPv4 only.
    if ethertype != ETHERTYPE_IPV4 {
        return Err(Verdict::PassNonIpv4);
    }

    // 3. The IPv4 header and its lengths.
    if n < l3 + IPV4_MIN_HLEN {
        return Err(malformed);
    }
    let first = *f.get(l3).ok_or(malformed)?;
    let version = first >> 4;
    let ihl = usize::from(first & 0x0f) * 4;
    let tot_len = be16(f, l3 + 2).ok_or(malformed)?;
    if version != 4
        || ihl < IPV4_MIN_HLEN
        || usize::from(tot_len) < ihl
        || l3 + usize::from(tot_len) > n
    {
        return Err(malformed);
    }

    // 4. Fragments.
    let fragment = be16(f, l3 + 6).ok_or(malformed)?;
    if fragment & 0x1fff != 0 {
        return Err(Verdict::PassFragment);
    }
    let first_fragment = fragment & 0x2000 != 0;

    // 5. Protocol.
    let protocol = *f.get(l3 + 9).ok_or(malformed)?;
    let needed = match protocol {
        PROTO_TCP => TCP_NEEDED,
        PROTO_UDP => UDP_NEEDED,
        PROTO_ICMP => return Err(Verdict::PassIcmp),
        _ => return Err(Verdict::PassOtherIpv4),
    };

    // 6. The L4 header within the total length.
    let l4 = l3 + ihl;
    if ihl + needed > usize::from(tot_len) {
        return Err(malformed);
    }

    // 7. Fields.
    let l4_proto = if protocol == PROTO_TCP {
        L4::Tcp {
            flags: *f.get(l4 + 13).ok_or(malformed)?,
        }
    } else {
        L4::Udp
    };
    Ok(Packet {
        tagged,
        l3,
        ihl,
        l4,
        tot_len,
        first_fragment,
        options: ihl != IPV4_MIN_HLEN,
        l4_proto,
        src_addr: wire32(f, l3 + 12).ok_or(malformed)?,
        dst_addr: wire32(f, l3 + 16).ok_or(malformed)?,
        src_port: wire16(f, l4).ok_or(malformed)?,
        dst_port: wire16(f, l4 + 2).ok_or(malformed)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::FrameSpec;
    use ha_common::{addr_to_wire, port_to_wire};

    fn tcp() -> Vec<u8> {
        FrameSpec::tcp([10, 0, 0, 50], 40000, [10, 0, 0, 254], 80, 0x02).build()
    }

    #[test]
    fn a_plain_tcp_frame_parses() {
        let p = parse(&tcp()).unwrap();
        assert_eq!(p.l3, 14);
        assert_eq!(p.l4, 34);
        assert_eq!(p.ihl, 20);
        assert!(!p.tagged && !p.options && !p.first_fragment);
        assert_eq!(p.l4_proto, L4::Tcp { flags: 0x02 });
        assert_eq!(p.src_addr, addr_to_wire([10, 0, 0, 50]));
        assert_eq!(p.dst_addr, addr_to_wire([10, 0, 0, 254]));
        assert_eq!(p.src_port, port_to_wire(40000));
        assert_eq!(p.dst_port, port_to_wire(80));
        assert_eq!(p.protocol(), PROTO_TCP);
    }

    #[test]
    fn truncation_at_every_length_is_malformed_or_parses_only_when_complete() {
        for spec in [
            FrameSpec::tcp([1, 2, 3, 4], 1, [5, 6, 7, 8], 2, 0x10).payload(5),
            FrameSpec::udp([1, 2, 3, 4], 1, [5, 6, 7, 8], 2).payload(3),
            FrameSpec::tcp([1, 2, 3, 4], 1, [5, 6, 7, 8], 2, 0x10).vlan(7),
            FrameSpec::udp([1, 2, 3, 4], 1, [5, 6, 7, 8], 2)
                .vlan(7)
                .options(8),
        ] {
            let full = spec.build();
            assert!(parse(&full).is_ok());
            for n in 0..full.len() {
                // The IPv4 total length still claims the whole packet: any cut is malformed.
                assert_eq!(parse(&full[..n]), Err(Verdict::PassMalformed), "cut at {n}");
            }
            // Padding after tot_len is allowed.
            let mut padded = full.clone();
            padded.extend_from_slice(&[0xee; 9]);
            assert_eq!(parse(&padded).unwrap(), parse(&full).unwrap());
        }
    }

    #[test]
    fn header_boundaries() {
        // Exactly 14 bytes of non-IPv4: fine; 13 bytes: malformed.
        let mut arp = vec![0u8; 14];
        arp[12] = 0x08;
        arp[13] = 0x06;
        assert_eq!(parse(&arp), Err(Verdict::PassNonIpv4));
        assert_eq!(parse(&arp[..13]), Err(Verdict::PassMalformed));
        // Ethertype IPv4 with nothing after the Ethernet header.
        let mut bare = vec![0u8; 14];
        bare[12] = 0x08;
        assert_eq!(parse(&bare), Err(Verdict::PassMalformed));
        // A tag needs 18 bytes; then the inner type decides.
        let mut tagged = vec![0u8; 17];
        tagged[12] = 0x81;
        assert_eq!(parse(&tagged), Err(Verdict::PassMalformed));
        tagged.push(0);
        tagged[16] = 0x86;
        tagged[17] = 0xdd;
        assert_eq!(parse(&tagged), Err(Verdict::PassNonIpv4));
        // 802.1ad too; a second tag is not looked into.
        let mut qinq = FrameSpec::udp([1, 1, 1, 1], 1, [2, 2, 2, 2], 2)
            .vlan(5)
            .build();
        qinq[12] = 0x88;
        qinq[13] = 0xa8;
        assert!(parse(&qinq).unwrap().tagged);
        qinq[16] = 0x81;
        qinq[17] = 0x00;
        assert_eq!(parse(&qinq), Err(Verdict::PassNonIpv4));
    }

    #[test]
    fn ipv4_header_checks() {
        let good = tcp();
        let with = |at: usize, value: u8| {
            let mut f = good.clone();
            f[at] = value;
            parse(&f)
        };
        assert_eq!(with(14, 0x65), Err(Verdict::PassMalformed), "version 6");
        assert_eq!(with(14, 0x44), Err(Verdict::PassMalformed), "ihl 16");
        assert_eq!(with(14, 0x40), Err(Verdict::PassMalformed), "ihl 0");
        // ihl 24 without room for it and the TCP header: malformed (tot_len 40 < 24 + 20).
        assert_eq!(with(14, 0x46), Err(Verdict::PassMalformed));
        // tot_len below ihl, beyond the frame, and too short for the L4 header.
        let mut f = good.clone();
        f[16] = 0;
        f[17] = 19;
        assert_eq!(parse(&f), Err(Verdict::PassMalformed));
        f[17] = good.len() as u8 - 14 + 1;
        assert_eq!(parse(&f), Err(Verdict::PassMalformed));
        f[17] = 39;
        assert_eq!(parse(&f), Err(Verdict::PassMalformed));
        f[17] = 40;
        assert!(parse(&f).is_ok());
        // UDP needs 8 bytes only.
        let udp = FrameSpec::udp([1, 1, 1, 1], 1, [2, 2, 2, 2], 2).build();
        assert_eq!(udp.len(), 14 + 28);
        assert!(parse(&udp).is_ok());
        let mut short = udp.clone();
        short[17] = 27;
        assert_eq!(parse(&short), Err(Verdict::PassMalformed));
        // Options: ihl 24 with room.
        let p = parse(
            &FrameSpec::tcp([1, 1, 1, 1], 1, [2, 2, 2, 2], 2, 0x10)
                .options(4)
                .build(),
        )
        .unwrap();
        assert!(p.options);
        assert_eq!(p.ihl, 24);
        assert_eq!(p.l4, 38);
    }

    #[test]
    fn fragments_and_protocols() {
        let frag = |field: u16| {
            let mut f = tcp();
            f[20..22].copy_from_slice(&field.to_be_bytes());
            parse(&f)
        };
        assert!(!frag(0x4000).unwrap().first_fragment, "DF only");
        assert!(frag(0x2000).unwrap().first_fragment);
        assert_eq!(frag(0x0001), Err(Verdict::PassFragment));
        assert_eq!(frag(0x3fff), Err(Verdict::PassFragment));
        assert_eq!(frag(0x1000), Err(Verdict::PassFragment));
        // A later fragment is passed as such before its protocol or length is looked at.
        let mut f = FrameSpec::icmp([1, 1, 1, 1], [2, 2, 2, 2]).build();
        assert_eq!(parse(&f), Err(Verdict::PassIcmp));
        f[20] = 0x00;
        f[21] = 0x10;
        assert_eq!(parse(&f), Err(Verdict::PassFragment));
        let mut other = FrameSpec::icmp([1, 1, 1, 1], [2, 2, 2, 2]).build();
        other[23] = 112; // VRRP
        assert_eq!(parse(&other), Err(Verdict::PassOtherIpv4));
        // ICMP needs no L4 bytes at all.
        let mut bare_icmp = other.clone();
        bare_icmp[23] = 1;
        bare_icmp.truncate(34);
        bare_icmp[16..18].copy_from_slice(&20u16.to_be_bytes());
        assert_eq!(parse(&bare_icmp), Err(Verdict::PassIcmp));
    }

    #[test]
    fn tcp_flags_come_from_byte_13_whatever_the_data_offset() {
        let mut f = tcp();
        f[34 + 12] = 0x00; // data offset 0
        f[34 + 13] = 0xff;
        assert_eq!(parse(&f).unwrap().flags(), 0xff);
        let udp = FrameSpec::udp([1, 1, 1, 1], 1, [2, 2, 2, 2], 2).build();
        assert_eq!(parse(&udp).unwrap().flags(), 0);
    }
}
