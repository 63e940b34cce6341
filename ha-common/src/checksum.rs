//! Incremental Internet checksum update (RFC 1624, eqn. 3: HC' = ~(~HC + ~m + m')).
//!
//! All values are 16-bit words exactly as loaded from the packet (native
//! integers holding wire bytes). The ones'-complement sum does not depend on
//! byte order as long as every word is read the same way (RFC 1071, 2.B), so
//! neither side needs to swap bytes.

#[inline(always)]
const fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// The checksum after one 16-bit word of the covered data changed from `old` to `new`.
#[inline(always)]
pub const fn replace_u16(check: u16, old: u16, new: u16) -> u16 {
    let sum = (!check) as u32 + (!old) as u32 + new as u32;
    !fold(sum)
}

/// The checksum after one 32-bit field (an IPv4 address) changed.
#[inline(always)]
pub const fn replace_u32(check: u16, old: u32, new: u32) -> u16 {
    let sum = (!check) as u32
        + (!(old as u16)) as u32
        + (!((old >> 16) as u16)) as u32
        + (new as u16) as u32
        + ((new >> 16) as u16) as u32;
    !fold(sum)
}

/// UDP over IPv4: a zero checksum means "none" and must stay zero; a
/// computed zero is sent as 0xffff (RFC 768).
#[inline(always)]
pub const fn udp_finish(old_check: u16, updated: u16) -> u16 {
    if old_check == 0 {
        0
    } else if updated == 0 {
        0xffff
    } else {
        updated
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Full RFC 1071 checksum over native-read 16-bit words, for comparison.
    fn full(words: &[u16]) -> u16 {
        let mut sum: u32 = 0;
        for w in words {
            sum += *w as u32;
        }
        !fold(sum)
    }

    #[test]
    fn replace_matches_a_full_recompute() {
        // A 20-byte IPv4 header as words, checksum field (index 5) zero.
        let mut header: [u16; 10] = [
            0x4500, 0x003c, 0x1c46, 0x4000, 0x4006, 0, 0xac10, 0x0a63, 0xac10, 0x0a0c,
        ];
        let check = full(&header);
        assert_eq!(check, 0xb1e6, "RFC 1071 example header");
        // Change the destination address, one 32-bit field made of words 8 and 9.
        let old = (header[8] as u32) | ((header[9] as u32) << 16);
        let new: u32 = 0xc0a8_cdfe;
        header[8] = new as u16;
        header[9] = (new >> 16) as u16;
        assert_eq!(replace_u32(check, old, new), full(&header));
        // And a port-sized word.
        let old_word = header[2];
        header[2] = 0x1234;
        assert_eq!(
            replace_u16(full(&header[..]), 0x1234, 0x1234),
            full(&header)
        );
        let before = {
            let mut h = header;
            h[2] = old_word;
            full(&h)
        };
        assert_eq!(replace_u16(before, old_word, 0x1234), full(&header));
    }

    #[test]
    fn replace_is_exhaustively_right_for_one_changing_word() {
        // Every old/new pair of one word against a fixed rest: the incremental
        // result must equal the recomputed one (modulo the 0x0000/0xffff
        // equivalence of ones'-complement zero, which RFC 1624 settles to 0xffff... or not).
        let rest = [0x1111u16, 0xfedc, 0x0001];
        for old in (0u16..=0xffff).step_by(251) {
            for new in (0u16..=0xffff).step_by(257) {
                let before = full(&[rest[0], rest[1], rest[2], old]);
                let after = full(&[rest[0], rest[1], rest[2], new]);
                let incremental = replace_u16(before, old, new);
                assert!(
                    incremental == after
                        || (incremental == 0xffff && after == 0)
                        || (incremental == 0 && after == 0xffff),
                    "old {old:#x} new {new:#x}: {incremental:#x} vs {after:#x}"
                );
            }
        }
    }

    #[test]
    fn udp_zero_checksum_stays_zero_and_computed_zero_becomes_ffff() {
        assert_eq!(udp_finish(0, 0x1234), 0);
        assert_eq!(udp_finish(0x5555, 0), 0xffff);
        assert_eq!(udp_finish(0x5555, 0x1234), 0x1234);
    }
}
