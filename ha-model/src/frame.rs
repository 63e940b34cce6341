//! Building test frames, and checking their checksums by a full RFC 1071 computation.
//!
//! Not part of the data path: the tests here use it, and so may the fuzzer.

use ha_common::{PROTO_TCP, PROTO_UDP};

use crate::parse::PROTO_ICMP;

/// RFC 1071: the ones' complement sum of `data` as big-endian 16-bit words (an odd last byte is
/// padded with zero), folded to 16 bits, added to `initial`.
pub fn ones_complement_sum(initial: u32, data: &[u8]) -> u16 {
    let mut sum = u64::from(initial);
    let mut words = data.chunks_exact(2);
    for word in &mut words {
        sum += u64::from(u16::from_be_bytes([word[0], word[1]]));
    }
    if let [last] = words.remainder() {
        sum += u64::from(u16::from_be_bytes([*last, 0]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// RFC 1071: the checksum to put into a zeroed checksum field.
pub fn internet_checksum(data: &[u8]) -> u16 {
    !ones_complement_sum(0, data)
}

/// The sum of the TCP/UDP pseudo-header for `src`, `dst` (wire bytes), `protocol`, `length`.
pub fn pseudo_header_sum(src: [u8; 4], dst: [u8; 4], protocol: u8, length: u16) -> u32 {
    let mut pseudo = [0u8; 12];
    pseudo[0..4].copy_from_slice(&src);
    pseudo[4..8].copy_from_slice(&dst);
    pseudo[9] = protocol;
    pseudo[10..12].copy_from_slice(&length.to_be_bytes());
    u32::from(ones_complement_sum(0, &pseudo))
}

/// Where the IPv4 header of an Ethernet frame starts (after at most one tag), if it is IPv4.
fn l3_offset(frame: &[u8]) -> Option<usize> {
    let ethertype = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    match ethertype {
        0x0800 => Some(14),
        0x8100 | 0x88a8 => {
            (u16::from_be_bytes([*frame.get(16)?, *frame.get(17)?]) == 0x0800).then_some(18)
        }
        _ => None,
    }
}

/// The IPv4 header of `frame`: `(l3, ihl, tot_len)`, if it is complete.
fn ipv4_header(frame: &[u8]) -> Option<(usize, usize, usize)> {
    let l3 = l3_offset(frame)?;
    let ihl = usize::from(frame.get(l3)? & 0x0f) * 4;
    let tot_len = usize::from(u16::from_be_bytes([
        *frame.get(l3 + 2)?,
        *frame.get(l3 + 3)?,
    ]));
    (ihl >= 20 && tot_len >= ihl && l3 + tot_len <= frame.len()).then_some((l3, ihl, tot_len))
}

/// Whether the IPv4 header checksum of `frame` verifies (RFC 1071: the sum over the header,
/// checksum included, is all ones). `None` when there is no complete IPv4 header.
pub fn ipv4_checksum_ok(frame: &[u8]) -> Option<bool> {
    let (l3, ihl, _) = ipv4_header(frame)?;
    Some(ones_complement_sum(0, frame.get(l3..l3 + ihl)?) == 0xffff)
}

/// Whether the TCP or UDP checksum of `frame` verifies over the pseudo-header and
/// `l3 + ihl .. l3 + tot_len` (a UDP checksum of 0 means none, and verifies). `None` when the
/// frame is not a complete, unfragmented IPv4 TCP/UDP packet.
pub fn l4_checksum_ok(frame: &[u8]) -> Option<bool> {
    let (l3, ihl, tot_len) = ipv4_header(frame)?;
    let fragment = u16::from_be_bytes([*frame.get(l3 + 6)?, *frame.get(l3 + 7)?]);
    if fragment & 0x3fff != 0 {
        return None;
    }
    let protocol = *frame.get(l3 + 9)?;
    let segment = frame.get(l3 + ihl..l3 + tot_len)?;
    let checksum_at = match protocol {
        PROTO_TCP if segment.len() >= 20 => 16,
        PROTO_UDP if segment.len() >= 8 => 6,
        _ => return None,
    };
    if protocol == PROTO_UDP && segment[checksum_at..checksum_at + 2] == [0, 0] {
        return Some(true);
    }
    let src: [u8; 4] = frame.get(l3 + 12..l3 + 16)?.try_into().ok()?;
    let dst: [u8; 4] = frame.get(l3 + 16..l3 + 20)?.try_into().ok()?;
    let pseudo = pseudo_header_sum(src, dst, protocol, segment.len() as u16);
    Some(ones_complement_sum(pseudo, segment) == 0xffff)
}

/// The IPv4 header checksum RFC 1071 gives for `frame`'s header as it is (its checksum field
/// taken as zero).
pub fn ipv4_checksum_recomputed(frame: &[u8]) -> Option<u16> {
    let (l3, ihl, _) = ipv4_header(frame)?;
    let mut header = frame.get(l3..l3 + ihl)?.to_vec();
    header[10] = 0;
    header[11] = 0;
    Some(internet_checksum(&header))
}

/// The TCP/UDP checksum RFC 1071 gives for `frame`'s segment as it is (its checksum field taken
/// as zero; a UDP result of 0 given as `0xffff`).
pub fn l4_checksum_recomputed(frame: &[u8]) -> Option<u16> {
    let (l3, ihl, tot_len) = ipv4_header(frame)?;
    let protocol = *frame.get(l3 + 9)?;
    let mut segment = frame.get(l3 + ihl..l3 + tot_len)?.to_vec();
    let at = match protocol {
        PROTO_TCP if segment.len() >= 20 => 16,
        PROTO_UDP if segment.len() >= 8 => 6,
        _ => return None,
    };
    segment[at] = 0;
    segment[at + 1] = 0;
    let src: [u8; 4] = frame.get(l3 + 12..l3 + 16)?.try_into().ok()?;
    let dst: [u8; 4] = frame.get(l3 + 16..l3 + 20)?.try_into().ok()?;
    let pseudo = pseudo_header_sum(src, dst, protocol, segment.len() as u16);
    let checksum = !ones_complement_sum(pseudo, &segment);
    Some(if protocol == PROTO_UDP && checksum == 0 {
        0xffff
    } else {
        checksum
    })
}

/// What follows the IPv4 header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// A 20-byte TCP header with these flags.
    Tcp {
        /// Source port (host order).
        sport: u16,
        /// Destination port (host order).
        dport: u16,
        /// Flags byte.
        flags: u8,
    },
    /// An 8-byte UDP header.
    Udp {
        /// Source port (host order).
        sport: u16,
        /// Destination port (host order).
        dport: u16,
        /// Send a checksum of 0 (none).
        zero_checksum: bool,
    },
    /// An 8-byte ICMP echo request.
    Icmp,
}

/// A frame to build: Ethernet (with at most one tag), IPv4 (with options), TCP/UDP/ICMP, and a
/// payload, with correct checksums.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrameSpec {
    /// Destination MAC.
    pub dst_mac: [u8; 6],
    /// Source MAC.
    pub src_mac: [u8; 6],
    /// One 802.1Q tag with this VLAN id.
    pub vlan: Option<u16>,
    /// Source address.
    pub src: [u8; 4],
    /// Destination address.
    pub dst: [u8; 4],
    /// Bytes of IPv4 options (a multiple of 4, at most 40; filled with NOP).
    pub options: usize,
    /// The IPv4 fragment field (flags and offset).
    pub fragment: u16,
    /// The IPv4 identification.
    pub id: u16,
    /// TCP/UDP/ICMP.
    pub transport: Transport,
    /// Payload bytes (a pattern).
    pub payload: usize,
    /// Bytes of Ethernet padding after the IPv4 packet.
    pub padding: usize,
}

impl FrameSpec {
    fn new(src: [u8; 4], dst: [u8; 4], transport: Transport) -> FrameSpec {
        FrameSpec {
            dst_mac: [0x02, 0, 0, 0, 0, 0x01],
            src_mac: [0x02, 0, 0, 0, 0, 0x50],
            vlan: None,
            src,
            dst,
            options: 0,
            fragment: 0x4000,
            id: 0x1234,
            transport,
            payload: 0,
            padding: 0,
        }
    }

    /// A TCP segment (ports host order).
    pub fn tcp(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, flags: u8) -> FrameSpec {
        FrameSpec::new(
            src,
            dst,
            Transport::Tcp {
                sport,
                dport,
                flags,
            },
        )
    }

    /// A UDP datagram with a checksum (ports host order).
    pub fn udp(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> FrameSpec {
        FrameSpec::new(
            src,
            dst,
            Transport::Udp {
                sport,
                dport,
                zero_checksum: false,
            },
        )
    }

    /// An ICMP echo request.
    pub fn icmp(src: [u8; 4], dst: [u8; 4]) -> FrameSpec {
        FrameSpec::new(src, dst, Transport::Icmp)
    }

    /// With one 802.1Q tag.
    pub fn vlan(mut self, id: u16) -> FrameSpec {
        self.vlan = Some(id);
        self
    }

    /// With `bytes` of IPv4 options.
    pub fn options(mut self, bytes: usize) -> FrameSpec {
        self.options = bytes;
        self
    }

    /// With a payload of `bytes`.
    pub fn payload(mut self, bytes: usize) -> FrameSpec {
        self.payload = bytes;
        self
    }

    /// With this IPv4 fragment field.
    pub fn fragment(mut self, field: u16) -> FrameSpec {
        self.fragment = field;
        self
    }

    /// With these MACs.
    pub fn macs(mut self, src: [u8; 6], dst: [u8; 6]) -> FrameSpec {
        self.src_mac = src;
        self.dst_mac = dst;
        self
    }

    /// A UDP datagram without checksum (0).
    pub fn zero_udp_checksum(mut self) -> FrameSpec {
        if let Transport::Udp { zero_checksum, .. } = &mut self.transport {
            *zero_checksum = true;
        }
        self
    }

    /// With `bytes` of Ethernet padding.
    pub fn padding(mut self, bytes: usize) -> FrameSpec {
        self.padding = bytes;
        self
    }

    /// The frame bytes.
    pub fn build(&self) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&self.dst_mac);
        f.extend_from_slice(&self.src_mac);
        if let Some(id) = self.vlan {
            f.extend_from_slice(&[0x81, 0x00]);
            f.extend_from_slice(&(id & 0x0fff).to_be_bytes());
        }
        f.extend_from_slice(&[0x08, 0x00]);
        let l3 = f.len();
        let options = self.options.min(40) / 4 * 4;
        let ihl = 20 + options;
        let (protocol, l4_header) = match self.transport {
            Transport::Tcp {
                sport,
                dport,
                flags,
            } => {
                let mut h = vec![0u8; 20];
                h[0..2].copy_from_slice(&sport.to_be_bytes());
                h[2..4].copy_from_slice(&dport.to_be_bytes());
                h[4..8].copy_from_slice(&0x0102_0304u32.to_be_bytes());
                h[8..12].copy_from_slice(&0x0a0b_0c0du32.to_be_bytes());
                h[12] = 5 << 4;
                h[13] = flags;
                h[14..16].copy_from_slice(&64240u16.to_be_bytes());
                (PROTO_TCP, h)
            }
            Transport::Udp { sport, dport, .. } => {
                let mut h = vec![0u8; 8];
                h[0..2].copy_from_slice(&sport.to_be_bytes());
                h[2..4].copy_from_slice(&dport.to_be_bytes());
                h[4..6].copy_from_slice(&((8 + self.payload) as u16).to_be_bytes());
                (PROTO_UDP, h)
            }
            Transport::Icmp => (PROTO_ICMP, vec![8, 0, 0, 0, 0, 1, 0, 1]),
        };
        let tot_len = (ihl + l4_header.len() + self.payload) as u16;
        let mut ip = vec![0u8; ihl];
        ip[0] = 0x40 | (ihl / 4) as u8;
        ip[2..4].copy_from_slice(&tot_len.to_be_bytes());
        ip[4..6].copy_from_slice(&self.id.to_be_bytes());
        ip[6..8].copy_from_slice(&self.fragment.to_be_bytes());
        ip[8] = 64;
        ip[9] = protocol;
        ip[12..16].copy_from_slice(&self.src);
        ip[16..20].copy_from_slice(&self.dst);
        for byte in &mut ip[20..] {
            *byte = 1; // NOP
        }
        let ip_checksum = internet_checksum(&ip);
        ip[10..12].copy_from_slice(&ip_checksum.to_be_bytes());
        f.extend_from_slice(&ip);
        let mut segment = l4_header;
        segment.extend((0..self.payload).map(|i| (i as u8).wrapping_mul(31).wrapping_add(7)));
        match self.transport {
            Transport::Tcp { .. } => {
                let pseudo = pseudo_header_sum(self.src, self.dst, protocol, segment.len() as u16);
                let checksum = !ones_complement_sum(pseudo, &segment);
                segment[16..18].copy_from_slice(&checksum.to_be_bytes());
            }
            Transport::Udp { zero_checksum, .. } => {
                if !zero_checksum {
                    let pseudo =
                        pseudo_header_sum(self.src, self.dst, protocol, segment.len() as u16);
                    let mut checksum = !ones_complement_sum(pseudo, &segment);
                    if checksum == 0 {
                        checksum = 0xffff;
                    }
                    segment[6..8].copy_from_slice(&checksum.to_be_bytes());
                }
            }
            Transport::Icmp => {
                let checksum = internet_checksum(&segment);
                segment[2..4].copy_from_slice(&checksum.to_be_bytes());
            }
        }
        f.extend_from_slice(&segment);
        debug_assert_eq!(f.len(), l3 + usize::from(tot_len));
        f.extend(std::iter::repeat_n(0u8, self.padding));
        f
    }
}

impl FrameSpec {
    /// An ICMP message built on this spec (its MACs, tag, addresses, id, fragment field,
    /// options, padding; the transport is ignored): `icmp_type`, `code`, the 4 bytes `rest`,
    /// then `quote` (for an error, the packet it is about from its IPv4 header on). The IPv4
    /// and ICMP checksums are complete.
    pub fn build_icmp(&self, icmp_type: u8, code: u8, rest: [u8; 4], quote: &[u8]) -> Vec<u8> {
        let mut spec = self.clone();
        spec.transport = Transport::Icmp;
        spec.payload = quote.len();
        let mut f = spec.build();
        let l3 = if spec.vlan.is_some() { 18 } else { 14 };
        let l4 = l3 + 20 + spec.options.min(40) / 4 * 4;
        let end = l4 + 8 + quote.len();
        f[l4] = icmp_type;
        f[l4 + 1] = code;
        f[l4 + 2..l4 + 4].copy_from_slice(&[0, 0]);
        f[l4 + 4..l4 + 8].copy_from_slice(&rest);
        f[l4 + 8..end].copy_from_slice(quote);
        let checksum = internet_checksum(&f[l4..end]);
        f[l4 + 2..l4 + 4].copy_from_slice(&checksum.to_be_bytes());
        f
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn icmp_messages_verify() {
        let quote = FrameSpec::udp([10, 0, 0, 2], 53, [10, 0, 0, 1], 1234).build()[14..].to_vec();
        let f = FrameSpec::icmp([10, 0, 0, 9], [10, 0, 0, 2])
            .vlan(4)
            .build_icmp(3, 3, [0; 4], &quote);
        assert_eq!(f.len(), 18 + 20 + 8 + quote.len());
        assert_eq!(ipv4_checksum_ok(&f), Some(true));
        assert_eq!(
            internet_checksum(&f[38..]),
            0,
            "the ICMP checksum covers the message"
        );
        assert_eq!(&f[38..40], &[3, 3]);
        assert_eq!(&f[46..], &quote[..]);
    }

    #[test]
    fn built_frames_verify() {
        for spec in [
            FrameSpec::tcp([10, 0, 0, 1], 1234, [10, 0, 0, 2], 80, 0x02).payload(13),
            FrameSpec::udp([10, 0, 0, 1], 1234, [10, 0, 0, 2], 53)
                .vlan(3)
                .options(8),
            FrameSpec::udp([10, 0, 0, 1], 1234, [10, 0, 0, 2], 53).zero_udp_checksum(),
        ] {
            let f = spec.build();
            assert_eq!(ipv4_checksum_ok(&f), Some(true));
            assert_eq!(l4_checksum_ok(&f), Some(true));
            let l3 = if spec.vlan.is_some() { 18 } else { 14 };
            assert_eq!(
                ipv4_checksum_recomputed(&f),
                Some(u16::from_be_bytes([f[l3 + 10], f[l3 + 11]]))
            );
        }
        // A known header (RFC 1071 example style): the classic 0xb861 example.
        let header = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(internet_checksum(&header), 0xb861);
        assert_eq!(ones_complement_sum(0, &[0xff]), 0xff00);
    }
}
