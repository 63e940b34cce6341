//! Step 5, **Rewrite** (docs/data-path.md, "5. Rewrite"): addresses and ports replaced, the
//! IPv4 header checksum and the TCP/UDP checksum updated incrementally by RFC 1624 eqn. 3,
//! one 16-bit word at a time.
//!
//! Choices (the spec says "one 16-bit word at a time (each address is two words)"):
//! - every word of every replaced field is put through eqn. 3, also when it does not change
//!   (an unchanged word turns an incoming checksum of `0xffff` into `0x0000`; any other value
//!   stays as it is);
//! - the order is source address (high word, low word), destination address, source port,
//!   destination port; the IPv4 header checksum takes the four address words. With eqn. 3 the
//!   order makes no difference to the result (see the test `word_order_does_not_matter`).

use ha_common::PROTO_UDP;

use crate::parse::Packet;

/// Ones' complement addition of two 16-bit values (end-around carry). The result is 0 only if
/// both are 0.
pub fn ones_add(a: u16, b: u16) -> u16 {
    let sum = u32::from(a) + u32::from(b);
    ((sum & 0xffff) + (sum >> 16)) as u16
}

/// RFC 1624 eqn. 3: the checksum `hc` after the 16-bit word `old` becomes `new`:
/// `HC' = ~(~HC + ~m + m')`.
pub fn csum_update(hc: u16, old: u16, new: u16) -> u16 {
    !ones_add(ones_add(!hc, !old), new)
}

/// The two big-endian 16-bit words of an address held as wire bytes in a native integer.
pub fn addr_words(wire: u32) -> [u16; 2] {
    let b = wire.to_ne_bytes();
    [
        u16::from_be_bytes([b[0], b[1]]),
        u16::from_be_bytes([b[2], b[3]]),
    ]
}

/// The big-endian 16-bit word of a port held as wire bytes in a native integer.
pub fn port_word(wire: u16) -> u16 {
    u16::from_be_bytes(wire.to_ne_bytes())
}

/// The new addresses and ports (wire order, as in map keys).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rewrite {
    /// New source address.
    pub src_addr: u32,
    /// New destination address.
    pub dst_addr: u32,
    /// New source port.
    pub src_port: u16,
    /// New destination port.
    pub dst_port: u16,
}

pub(crate) fn read_be16(frame: &[u8], at: usize) -> Option<u16> {
    let b = frame.get(at..at.checked_add(2)?)?;
    Some(u16::from_be_bytes([b[0], b[1]]))
}

pub(crate) fn write_bytes(frame: &mut [u8], at: usize, bytes: &[u8]) -> Option<()> {
    frame
        .get_mut(at..at.checked_add(bytes.len())?)?
        .copy_from_slice(bytes);
    Some(())
}

/// Applies eqn. 3 for each `(old, new)` word pair, in order.
pub fn csum_update_words(hc: u16, words: &[(u16, u16)]) -> u16 {
    words
        .iter()
        .fold(hc, |hc, &(old, new)| csum_update(hc, old, new))
}

/// Step 5 on `frame` (parsed as `packet`): the four fields become `to`'s, the checksums follow.
/// `None` only if the frame is shorter than `packet` says (never, for a frame `packet` came
/// from).
pub fn rewrite(frame: &mut [u8], packet: &Packet, to: &Rewrite) -> Option<()> {
    let l3 = packet.l3;
    let l4 = packet.l4;
    let [old_src_hi, old_src_lo] = addr_words(packet.src_addr);
    let [old_dst_hi, old_dst_lo] = addr_words(packet.dst_addr);
    let [new_src_hi, new_src_lo] = addr_words(to.src_addr);
    let [new_dst_hi, new_dst_lo] = addr_words(to.dst_addr);
    let address_words = [
        (old_src_hi, new_src_hi),
        (old_src_lo, new_src_lo),
        (old_dst_hi, new_dst_hi),
        (old_dst_lo, new_dst_lo),
    ];
    let port_words = [
        (port_word(packet.src_port), port_word(to.src_port)),
        (port_word(packet.dst_port), port_word(to.dst_port)),
    ];

    // IPv4 header checksum: the addresses.
    let ip_at = l3 + 10;
    let ip_checksum = csum_update_words(read_be16(frame, ip_at)?, &address_words);
    write_bytes(frame, ip_at, &ip_checksum.to_be_bytes())?;

    // TCP/UDP checksum: the pseudo-header's addresses and the ports.
    let udp = packet.protocol() == PROTO_UDP;
    let l4_at = if udp { l4 + 6 } else { l4 + 16 };
    let old = read_be16(frame, l4_at)?;
    if !(udp && old == 0) {
        let mut checksum = csum_update_words(old, &address_words);
        checksum = csum_update_words(checksum, &port_words);
        if udp && checksum == 0 {
            checksum = 0xffff;
        }
        write_bytes(frame, l4_at, &checksum.to_be_bytes())?;
    }

    write_bytes(frame, l3 + 12, &to.src_addr.to_ne_bytes())?;
    write_bytes(frame, l3 + 16, &to.dst_addr.to_ne_bytes())?;
    write_bytes(frame, l4, &to.src_port.to_ne_bytes())?;
    write_bytes(frame, l4 + 2, &to.dst_port.to_ne_bytes())?;
    Some(())
}

/// Takes one from the TTL at `f[l3+8]` and updates the IPv4 header checksum for the word it
/// shares with the protocol (eqn. 3). `None` if the frame is too short.
pub fn decrement_ttl(frame: &mut [u8], l3: usize) -> Option<()> {
    let old = read_be16(frame, l3 + 8)?;
    let new = old.wrapping_sub(0x100);
    let check = csum_update(read_be16(frame, l3 + 10)?, old, new);
    write_bytes(frame, l3 + 8, &new.to_be_bytes())?;
    write_bytes(frame, l3 + 10, &check.to_be_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{
        FrameSpec, ipv4_checksum_ok, ipv4_checksum_recomputed, l4_checksum_ok,
        l4_checksum_recomputed,
    };
    use crate::parse::parse;
    use ha_common::{addr_to_wire, port_to_wire};

    fn to() -> Rewrite {
        Rewrite {
            src_addr: addr_to_wire([10, 0, 0, 2]),
            dst_addr: addr_to_wire([10, 0, 1, 12]),
            src_port: port_to_wire(21877),
            dst_port: port_to_wire(6443),
        }
    }

    fn field(f: &[u8], at: usize) -> u16 {
        u16::from_be_bytes([f[at], f[at + 1]])
    }

    #[test]
    fn eqn3_basics() {
        // Changing a word and back restores the checksum (away from the 0/0xffff edge).
        let hc = 0x1234;
        assert_eq!(
            csum_update(csum_update(hc, 0xaaaa, 0x5555), 0x5555, 0xaaaa),
            hc
        );
        // An unchanged word keeps any checksum but 0xffff, which becomes 0.
        for hc in [0u16, 1, 0x8000, 0xfffe] {
            assert_eq!(csum_update(hc, 0x4321, 0x4321), hc);
        }
        assert_eq!(csum_update(0xffff, 0x4321, 0x4321), 0);
        // The one way to reach 0xffff: from 0xffff, a word 0xffff becomes 0.
        assert_eq!(csum_update(0xffff, 0xffff, 0), 0xffff);
        assert_eq!(ones_add(0xffff, 1), 1);
        assert_eq!(ones_add(0, 0), 0);
        assert_eq!(ones_add(0xffff, 0xffff), 0xffff);
    }

    #[test]
    fn word_order_does_not_matter() {
        // Exhaustive over small sets of words and edge checksums.
        let values = [0u16, 1, 0x7fff, 0x8000, 0xfffe, 0xffff];
        for &hc in &values {
            for &a in &values {
                for &b in &values {
                    for &c in &values {
                        for &d in &values {
                            let ab = csum_update(csum_update(hc, a, b), c, d);
                            let ba = csum_update(csum_update(hc, c, d), a, b);
                            assert_eq!(ab, ba, "{hc:#x} {a:#x}->{b:#x} {c:#x}->{d:#x}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn rewritten_checksums_equal_a_full_recomputation() {
        for spec in [
            FrameSpec::tcp([10, 0, 0, 50], 40001, [10, 0, 0, 254], 6443, 0x02).payload(0),
            FrameSpec::tcp([192, 168, 7, 9], 1, [172, 16, 0, 1], 80, 0x18).payload(101),
            FrameSpec::udp([10, 0, 0, 50], 5353, [10, 0, 0, 254], 53).payload(17),
            FrameSpec::udp([255, 255, 0, 1], 65535, [0, 0, 0, 1], 1)
                .vlan(12)
                .padding(6),
        ] {
            let mut f = spec.build();
            let packet = parse(&f).unwrap();
            rewrite(&mut f, &packet, &to()).unwrap();
            let after = parse(&f).unwrap();
            assert_eq!(after.src_addr, to().src_addr);
            assert_eq!(after.dst_addr, to().dst_addr);
            assert_eq!(after.src_port, to().src_port);
            assert_eq!(after.dst_port, to().dst_port);
            assert_eq!(ipv4_checksum_ok(&f), Some(true));
            assert_eq!(l4_checksum_ok(&f), Some(true));
            let l3 = packet.l3;
            assert_eq!(Some(field(&f, l3 + 10)), ipv4_checksum_recomputed(&f));
            let at = if packet.is_tcp() { 16 } else { 6 };
            assert_eq!(Some(field(&f, packet.l4 + at)), l4_checksum_recomputed(&f));
        }
    }

    #[test]
    fn an_incoming_checksum_error_is_carried_over() {
        for spec in [
            FrameSpec::tcp([10, 0, 0, 50], 40001, [10, 0, 0, 254], 6443, 0x10).payload(9),
            FrameSpec::udp([10, 0, 0, 50], 5353, [10, 0, 0, 254], 53).payload(3),
        ] {
            let good = spec.build();
            let packet = parse(&good).unwrap();
            let l4_at = packet.l4 + if packet.is_tcp() { 16 } else { 6 };
            let mut bad = good.clone();
            // Off by 5 in both checksums.
            let ip = ones_add(field(&bad, 24), 5);
            bad[24..26].copy_from_slice(&ip.to_be_bytes());
            let l4 = ones_add(field(&bad, l4_at), 5);
            bad[l4_at..l4_at + 2].copy_from_slice(&l4.to_be_bytes());
            let mut good_out = good.clone();
            rewrite(&mut good_out, &packet, &to()).unwrap();
            rewrite(&mut bad, &packet, &to()).unwrap();
            assert_eq!(ipv4_checksum_ok(&good_out), Some(true));
            assert_eq!(ipv4_checksum_ok(&bad), Some(false));
            assert_eq!(l4_checksum_ok(&bad), Some(false));
            // The error is exactly the one that came in.
            assert_eq!(field(&bad, 24), ones_add(field(&good_out, 24), 5));
            assert_eq!(field(&bad, l4_at), ones_add(field(&good_out, l4_at), 5));
        }
    }

    #[test]
    fn udp_zero_checksum_stays_zero_and_zero_results_become_ffff() {
        let mut f = FrameSpec::udp([10, 0, 0, 50], 5353, [10, 0, 0, 254], 53)
            .zero_udp_checksum()
            .payload(4)
            .build();
        let packet = parse(&f).unwrap();
        rewrite(&mut f, &packet, &to()).unwrap();
        assert_eq!(field(&f, 40), 0);
        assert_eq!(ipv4_checksum_ok(&f), Some(true));
        assert_eq!(parse(&f).unwrap().dst_port, to().dst_port);

        // A datagram whose rewritten checksum is 0 (sum all ones): written as 0xffff. Find the
        // payload byte that makes it so, using the full recomputation.
        let spec = FrameSpec::udp([10, 0, 0, 50], 5353, [10, 0, 0, 254], 53).payload(2);
        let base = spec.build();
        let packet = parse(&base).unwrap();
        let mut found = false;
        for value in 0..=0xffffu16 {
            let mut f = base.clone();
            f[42..44].copy_from_slice(&value.to_be_bytes());
            // Make the incoming checksum right for this payload.
            f[40] = 0;
            f[41] = 0;
            let c = l4_checksum_recomputed(&f).unwrap();
            f[40..42].copy_from_slice(&c.to_be_bytes());
            let mut out = f.clone();
            rewrite(&mut out, &packet, &to()).unwrap();
            let mut zeroed = out.clone();
            zeroed[40] = 0;
            zeroed[41] = 0;
            let plain = !crate::frame::ones_complement_sum(
                crate::frame::pseudo_header_sum([10, 0, 0, 2], [10, 0, 1, 12], 17, 10),
                &zeroed[34..44],
            );
            if plain == 0 {
                assert_eq!(field(&out, 40), 0xffff);
                assert_eq!(l4_checksum_ok(&out), Some(true));
                found = true;
                break;
            }
        }
        assert!(found);
    }

    #[test]
    fn tcp_zero_checksum_is_updated_like_any_other() {
        let mut f = FrameSpec::tcp([10, 0, 0, 50], 40001, [10, 0, 0, 254], 6443, 0x10).build();
        f[50] = 0;
        f[51] = 0;
        let packet = parse(&f).unwrap();
        rewrite(&mut f, &packet, &to()).unwrap();
        assert_ne!(field(&f, 50), 0);
    }
}
