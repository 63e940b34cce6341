//! Hashes used by the data path, here so that the agent and the tests can
//! predict exactly which Maglev slot and which NAT port a flow gets.

use crate::FlowKey;

/// The murmur3 32-bit finaliser: cheap, and every input bit affects every output bit.
#[inline(always)]
const fn mix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h
}

/// Hash of a client flow (addresses, ports, protocol). Fixed seed: every LB
/// host computes the same value, so a flow maps to the same Maglev slot on
/// whichever host owns the VIP.
#[inline(always)]
pub const fn flow_hash(flow: &FlowKey) -> u32 {
    let mut h = 0x9e37_79b9u32;
    h = mix32(h ^ flow.src_addr);
    h = mix32(h ^ flow.dst_addr);
    h = mix32(h ^ ((flow.src_port as u32) << 16 | flow.dst_port as u32));
    mix32(h ^ flow.protocol as u32)
}

/// Hash of a socket connecting to a VIP, for the socket-level balancer:
/// its cookie (`bpf_get_socket_cookie`, unique per socket for the life of
/// the kernel) with the VIP's address and port (wire order). The same
/// socket asking for the same VIP again (a retried connect, each datagram
/// of an unconnected UDP socket) gets the same slot; other sockets spread
/// over the table.
#[inline(always)]
pub const fn socket_hash(cookie: u64, vip_addr: u32, vip_port: u16) -> u32 {
    let mut h = 0x85eb_ca77u32;
    h = mix32(h ^ cookie as u32);
    h = mix32(h ^ (cookie >> 32) as u32);
    h = mix32(h ^ vip_addr);
    mix32(h ^ vip_port as u32)
}

/// The `attempt`-th (from 1) other hash of a flow whose Maglev slot names a
/// suspect backend (docs/data-path.md, "Passive health"): another seed per
/// attempt, so each attempt lands on an unrelated slot of the same table.
#[inline(always)]
pub const fn rehash(flow_hash: u32, attempt: u32) -> u32 {
    mix32(flow_hash ^ attempt.wrapping_mul(0x61c8_8647))
}

/// The `attempt`-th NAT port candidate for a flow, in `min..=max` (host order).
///
/// Derived from the flow hash so a retransmitted SYN after a lost entry tends
/// to get the same port, and varied per attempt so collisions walk away
/// from each other.
#[inline(always)]
pub const fn nat_port_candidate(flow_hash: u32, attempt: u32, min: u16, max: u16) -> u16 {
    let span = (max as u32).wrapping_sub(min as u32).wrapping_add(1);
    let h = mix32(flow_hash ^ attempt.wrapping_mul(0x27d4_eb2d));
    // checked_rem: no divide-by-zero panic path, which the BPF verifier rejects.
    match h.checked_rem(span) {
        Some(offset) => min.wrapping_add(offset as u16),
        None => min,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(src_port: u16) -> FlowKey {
        FlowKey {
            src_addr: 0x0100_000a,
            dst_addr: 0xfe00_000a,
            src_port,
            dst_port: 0x2b19,
            protocol: 6,
            _pad: [0; 3],
        }
    }

    #[test]
    fn flow_hash_is_stable_and_spreads_ports() {
        // Stable across builds and hosts: a fixed value for a fixed flow.
        assert_eq!(flow_hash(&flow(40000)), flow_hash(&flow(40000)));
        let mut buckets = [0u32; 3];
        for port in 1024..31024u16 {
            buckets[(flow_hash(&flow(port)) % 3) as usize] += 1;
        }
        for count in buckets {
            assert!((9_500..=10_500).contains(&count), "{buckets:?}");
        }
    }

    #[test]
    fn socket_hash_is_stable_per_socket_and_spreads_sockets() {
        let (vip, port) = (0xfe00_000a, 0xfb20);
        assert_eq!(socket_hash(7, vip, port), socket_hash(7, vip, port));
        assert_ne!(socket_hash(7, vip, port), socket_hash(7, vip, port ^ 1));
        assert_ne!(socket_hash(7, vip, port), socket_hash(7, vip ^ 1, port));
        // Cookies are consecutive numbers: they must still spread.
        let mut buckets = [0u32; 3];
        for cookie in 4096..34096u64 {
            buckets[(socket_hash(cookie, vip, port) % 3) as usize] += 1;
        }
        for count in buckets {
            assert!((9_500..=10_500).contains(&count), "{buckets:?}");
        }
        // The high half of the cookie counts too.
        assert_ne!(
            socket_hash(1, vip, port),
            socket_hash(1 | 1 << 32, vip, port)
        );
    }

    #[test]
    fn nat_port_candidates_stay_in_range_and_differ_per_attempt() {
        let h = flow_hash(&flow(40000));
        let candidates: [u16; 8] =
            core::array::from_fn(|i| nat_port_candidate(h, i as u32, 10000, 10007));
        assert!(candidates.iter().all(|p| (10000..=10007).contains(p)));
        let wide: [u16; 8] = core::array::from_fn(|i| nat_port_candidate(h, i as u32, 1024, 65535));
        for i in 0..8 {
            for j in 0..i {
                assert_ne!(wide[i], wide[j], "attempts {i} and {j}");
            }
        }
        assert_eq!(nat_port_candidate(h, 0, 5000, 5000), 5000);
    }
}
