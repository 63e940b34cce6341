//! Maglev lookup table (Eisenbud et al., NSDI 2016, section 3.4), with weights.
//!
//! Deterministic by construction: backends are sorted by (address, port) and
//! hashed with fixed seeds, so every LB host given the same backends builds a
//! byte-identical table and a flow maps to the same backend whichever host
//! owns the VIP.

use std::net::IpAddr;

use ha_common::NO_BACKEND;

/// One backend as the table builder sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaglevBackend {
    /// An IPv4 backend hashes its 4 octets (as every release before), an
    /// IPv6 one its 16.
    pub address: IpAddr,
    pub port: u16,
    pub weight: u32,
    /// What the table stores for this backend (the data plane's backend id).
    pub id: u32,
}

const OFFSET_SEED: u64 = 0x6a09_e667_f3bc_c908;
const SKIP_SEED: u64 = 0xbb67_ae85_84ca_a73b;

/// FNV-1a over the backend's address and port, from a seed: stable across
/// builds, platforms and Rust versions (unlike `std`'s hasher).
fn stable_hash(seed: u64, address: IpAddr, port: u16) -> u64 {
    let mut h = seed ^ 0xcbf2_9ce4_8422_2325;
    let octets: &[u8] = match &address {
        IpAddr::V4(v4) => &v4.octets(),
        IpAddr::V6(v6) => &v6.octets(),
    };
    for byte in octets.iter().copied().chain(port.to_be_bytes()) {
        h ^= byte as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // FNV's low bits are weak; finish with a 64-bit mix (splitmix64).
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// Builds a table of `size` entries (a prime). Backends with weight 0 get no
/// entries; with none left every entry is [`NO_BACKEND`]. Each backend fills
/// entries in proportion to its weight.
pub fn build_table(backends: &[MaglevBackend], size: u32) -> Vec<u32> {
    assert!(size > 1, "table size must be a prime above 1");
    let mut live: Vec<MaglevBackend> = backends.iter().copied().filter(|b| b.weight > 0).collect();
    let mut table = vec![NO_BACKEND; size as usize];
    if live.is_empty() {
        return table;
    }
    // `IpAddr` orders IPv4 among itself as `Ipv4Addr` does (and before IPv6).
    live.sort_by_key(|b| (b.address, b.port));
    let common = live.iter().fold(0, |g, b| gcd(g, b.weight));
    let m = size as u64;
    let permutations: Vec<(u64, u64)> = live
        .iter()
        .map(|b| {
            let offset = stable_hash(OFFSET_SEED, b.address, b.port) % m;
            let skip = stable_hash(SKIP_SEED, b.address, b.port) % (m - 1) + 1;
            (offset, skip)
        })
        .collect();
    let mut next = vec![0u64; live.len()];
    let mut filled = 0u64;
    'rounds: loop {
        for (i, backend) in live.iter().enumerate() {
            let (offset, skip) = permutations[i];
            // A round gives each backend `weight / gcd` turns.
            for _ in 0..backend.weight / common {
                let mut slot = (offset + next[i] * skip) % m;
                while table[slot as usize] != NO_BACKEND {
                    next[i] += 1;
                    slot = (offset + next[i] * skip) % m;
                }
                table[slot as usize] = backend.id;
                next[i] += 1;
                filled += 1;
                if filled == m {
                    break 'rounds;
                }
            }
        }
    }
    table
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    const M: u32 = 65537;

    fn backends(n: u8) -> Vec<MaglevBackend> {
        (0..n)
            .map(|i| MaglevBackend {
                address: Ipv4Addr::new(10, 0, 0, 10 + i).into(),
                port: 6443,
                weight: 1,
                id: i as u32,
            })
            .collect()
    }

    fn shares(table: &[u32], ids: usize) -> Vec<f64> {
        let mut counts = vec![0usize; ids];
        for id in table {
            counts[*id as usize] += 1;
        }
        counts
            .iter()
            .map(|c| *c as f64 / table.len() as f64)
            .collect()
    }

    #[test]
    fn equal_weights_balance_within_one_percent() {
        for n in [2u8, 3, 5, 7] {
            let table = build_table(&backends(n), M);
            assert!(table.iter().all(|id| *id != NO_BACKEND));
            for share in shares(&table, n as usize) {
                let ideal = 1.0 / n as f64;
                assert!((share - ideal).abs() / ideal < 0.01, "n={n}: share {share}");
            }
        }
    }

    #[test]
    fn weights_are_honoured() {
        let mut set = backends(3);
        set[0].weight = 1;
        set[1].weight = 2;
        set[2].weight = 3;
        let table = build_table(&set, M);
        let s = shares(&table, 3);
        for (share, ideal) in s.iter().zip([1.0 / 6.0, 2.0 / 6.0, 3.0 / 6.0]) {
            assert!((share - ideal).abs() / ideal < 0.01, "{s:?}");
        }
        // Weight 0: no entries at all.
        set[1].weight = 0;
        let table = build_table(&set, M);
        assert!(!table.contains(&1));
    }

    #[test]
    fn same_backends_in_any_order_give_a_byte_identical_table() {
        let set = backends(5);
        let mut reversed = set.clone();
        reversed.reverse();
        let mut rotated = set.clone();
        rotated.rotate_left(2);
        let a = build_table(&set, M);
        assert_eq!(a, build_table(&reversed, M));
        assert_eq!(a, build_table(&rotated, M));
    }

    #[test]
    fn the_table_is_fixed_across_releases() {
        // Every LB host (and the next agent version) must agree on this: a
        // flow keeps its backend across a failover only if the tables match.
        let table = build_table(&backends(3), 101);
        let digest = table
            .iter()
            .fold(0u64, |h, id| h.wrapping_mul(31).wrapping_add(*id as u64));
        let first: Vec<u32> = table[..12].to_vec();
        assert_eq!(
            (first, digest),
            (FIXED_FIRST.to_vec(), FIXED_DIGEST),
            "the Maglev table changed"
        );
    }
    const FIXED_FIRST: [u32; 12] = [1, 0, 1, 2, 0, 0, 2, 2, 2, 2, 1, 1];
    const FIXED_DIGEST: u64 = 4996173840875408632;

    #[test]
    fn removing_one_of_n_backends_moves_about_one_nth_of_the_slots() {
        for n in [3u8, 5, 10] {
            let all = backends(n);
            let before = build_table(&all, M);
            let removed = (n / 2) as u32;
            let remaining: Vec<MaglevBackend> =
                all.iter().copied().filter(|b| b.id != removed).collect();
            let after = build_table(&remaining, M);
            let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count() as f64 / M as f64;
            let must_move = 1.0 / n as f64;
            // The removed backend's slots must move; Maglev moves only a few more.
            assert!(moved >= must_move * 0.99, "n={n}: moved {moved}");
            assert!(
                moved <= must_move * 1.25,
                "n={n}: moved {moved}, ideal {must_move}"
            );
            // And no slot of a surviving backend went to another survivor more than a little.
            let between_survivors = before
                .iter()
                .zip(&after)
                .filter(|(a, b)| a != b && **a != removed)
                .count() as f64
                / M as f64;
            assert!(
                between_survivors < 0.25 * must_move,
                "n={n}: {between_survivors}"
            );
        }
    }

    #[test]
    fn no_backends_or_all_zero_weights_give_an_empty_table() {
        assert!(build_table(&[], 101).iter().all(|id| *id == NO_BACKEND));
        let mut set = backends(2);
        set.iter_mut().for_each(|b| b.weight = 0);
        assert!(build_table(&set, 101).iter().all(|id| *id == NO_BACKEND));
    }

    #[test]
    fn an_ipv6_backend_hashes_its_own_sixteen_octets() {
        let v4 = Ipv4Addr::new(10, 0, 0, 10);
        let mapped = IpAddr::V6(v4.to_ipv6_mapped());
        assert_ne!(
            stable_hash(OFFSET_SEED, IpAddr::V4(v4), 6443),
            stable_hash(OFFSET_SEED, mapped, 6443)
        );
        let mixed = [
            MaglevBackend {
                address: v4.into(),
                port: 6443,
                weight: 1,
                id: 0,
            },
            MaglevBackend {
                address: Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1).into(),
                port: 6443,
                weight: 1,
                id: 1,
            },
        ];
        let share = shares(&build_table(&mixed, M), 2);
        assert!((share[0] - 0.5).abs() < 0.01, "{share:?}");
    }
}
