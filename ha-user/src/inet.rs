//! The Internet checksum (RFC 1071) over bytes in wire order, for the
//! packets the agent builds itself: VRRP adverts, ICMP echo, the TCP
//! segments of reset on mark-down.

use std::net::Ipv4Addr;

/// Adds `bytes` as big-endian 16-bit words (an odd last byte padded with
/// zero) to the running ones'-complement `sum`, unfolded.
pub fn sum16(mut sum: u32, bytes: &[u8]) -> u32 {
    let mut chunks = bytes.chunks_exact(2);
    for pair in &mut chunks {
        sum += u16::from_be_bytes([pair[0], pair[1]]) as u32;
    }
    if let [last] = chunks.remainder() {
        sum += (*last as u32) << 8;
    }
    sum
}

/// Folds a running sum and complements it: the checksum to write.
pub fn finish(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The checksum of `bytes` (with their checksum field as it is: zero to
/// compute one, as sent to verify one, which then gives 0).
pub fn checksum(bytes: &[u8]) -> u16 {
    finish(sum16(0, bytes))
}

/// The IPv4 pseudo-header's sum (RFC 793 section 3.1, RFC 768) for a
/// transport message of `length` bytes of `protocol`.
pub fn pseudo_header_sum(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, length: usize) -> u32 {
    let sum = sum16(sum16(0, &src.octets()), &dst.octets());
    sum + protocol as u32 + length as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc_1071_example_and_verification_give_zero() {
        // RFC 1071 section 3: the words 0001 f203 f4f5 f6f7 sum to ddf2 (folded).
        let bytes = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(checksum(&bytes), !0xddf2);
        let mut with_sum = bytes.to_vec();
        with_sum.extend_from_slice(&checksum(&bytes).to_be_bytes());
        assert_eq!(checksum(&with_sum), 0);
        // An odd length pads with zero.
        assert_eq!(checksum(&[0xab]), !0xab00);
    }
}
