//! NAT sources: the current range new flows are given ports from, and the
//! earlier ones (a changed `nat.port_range` or `nat.source_address`, or
//! those adopted flows use) kept while flows still use them.

use std::{collections::BTreeMap, net::Ipv4Addr};

use ha_common::{NAT_RANGES, NatKey, NatRange, addr_from_wire};
use tracing::{info, warn};

use super::{DataPlane, DataPlaneError, Result};

/// The NAT sources after the current one becomes `next`: the previous
/// current one moves to the earlier ranges (replies to its flows stay
/// translated until the sweep finds none left), and `next` leaves them if it
/// was there. At most [`NAT_RANGES`] - 1 earlier ranges.
///
/// # Errors
/// [`DataPlaneError::TooManyNatRanges`] when one more would be needed.
pub fn next_nat_ranges(
    current: Option<NatRange>,
    earlier: &[NatRange],
    next: NatRange,
) -> Result<Vec<NatRange>, DataPlaneError> {
    // A range the next one covers needs no slot of its own: its flows' replies are in `next`.
    let covered = |r: &NatRange| {
        r.addr == next.addr && r.port_min >= next.port_min && r.port_max <= next.port_max
    };
    let mut ranges: Vec<NatRange> = earlier.iter().copied().filter(|r| !covered(r)).collect();
    if let Some(current) = current
        && !covered(&current)
        && current.addr != 0
        && !ranges.contains(&current)
    {
        ranges.insert(0, current);
    }
    if ranges.len() > NAT_RANGES - 1 {
        return Err(DataPlaneError::TooManyNatRanges {
            next: describe_range(&next),
            live: earlier.iter().map(describe_range).collect(),
        });
    }
    Ok(ranges)
}

/// The NAT sources a set of reverse entries uses: per NAT address, the
/// range from its lowest to its highest port, split around `host_ports`
/// (`(min, max)`, the host's own ephemeral ports, which a NAT source must
/// never cover: their replies would be taken for NAT replies; ports inside
/// them, only possible if the host's range changed, are left out); the
/// [`NAT_RANGES`] - 1 sources with the most entries, most used first.
pub fn nat_sources_of(keys: &[NatKey], host_ports: Option<(u16, u16)>) -> Vec<NatRange> {
    // (address, side of the host's ports: 0 below, 1 inside, 2 above)
    let mut by_addr: BTreeMap<(u32, u8), (usize, u16, u16)> = BTreeMap::new();
    for key in keys {
        let port = ha_common::port_from_wire(key.nat_port);
        let side = match host_ports {
            Some((min, _)) if port < min => 0,
            Some((_, max)) if port > max => 2,
            Some(_) => 1,
            None => 0,
        };
        let entry = by_addr
            .entry((key.lb_addr, side))
            .or_insert((0, port, port));
        entry.0 += 1;
        entry.1 = entry.1.min(port);
        entry.2 = entry.2.max(port);
    }
    let mut sources: Vec<(usize, NatRange)> = by_addr
        .into_iter()
        .filter(|((addr, side), (count, _, _))| {
            if *side == 1 {
                warn!(
                    flows = count,
                    "adopted flows use NAT ports inside net.ipv4.ip_local_port_range; they are not kept as a NAT source"
                );
            }
            *addr != 0 && *side != 1
        })
        .map(|((addr, _), (count, port_min, port_max))| {
            (
                count,
                NatRange {
                    addr,
                    port_min,
                    port_max,
                },
            )
        })
        .collect();
    sources.sort_by_key(|s| std::cmp::Reverse(s.0));
    if sources.len() > NAT_RANGES - 1 {
        warn!(
            sources = sources.len(),
            "adopted flows use more NAT addresses than can stay live; those of the least used are lost"
        );
    }
    sources
        .into_iter()
        .take(NAT_RANGES - 1)
        .map(|(_, range)| range)
        .collect()
}

/// `address:min-max` of a NAT range.
pub fn describe_range(range: &NatRange) -> String {
    format!(
        "{}:{}-{}",
        Ipv4Addr::from(addr_from_wire(range.addr)),
        range.port_min,
        range.port_max
    )
}

/// Which of the `earlier` ranges the NAT sources in use keep alive (each
/// `(address, port)` in wire order, of a reverse entry or a flow): those
/// holding one, unless the current range holds it too.
pub fn ranges_in_use(
    current: &NatRange,
    earlier: &[NatRange],
    in_use: impl IntoIterator<Item = (u32, u16)>,
) -> Vec<bool> {
    let mut used = vec![false; earlier.len()];
    for (addr, port) in in_use {
        if current.contains(addr, port) {
            continue;
        }
        for (i, range) in earlier.iter().enumerate() {
            if range.contains(addr, port) {
                used[i] = true;
            }
        }
    }
    used
}

impl DataPlane {
    /// The NAT sources adopted flows use, kept as earlier ranges: a restart
    /// that also changed `nat.port_range` or `nat.source_address` must not
    /// hand their replies to the host's stack. The first sweep drops those
    /// the new current range covers, and the rest as their flows end.
    /// `running`: the NAT source of the program the pinned link runs (from
    /// the record), which may create flows until the switch; kept first.
    pub(super) fn adopt_nat_sources(
        &mut self,
        host_ports: Option<(u16, u16)>,
        running: Option<NatRange>,
    ) -> Result<()> {
        // The reverse entries' sources, and those of flows that lost theirs.
        let mut keys: Vec<NatKey> = self
            .reverse_entries()?
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        keys.extend(
            self.flows()?
                .into_iter()
                .filter(|(_, f)| f.flags & ha_common::FLOW_LOCAL == 0)
                .map(|(_, f)| NatKey {
                    lb_addr: f.nat_addr,
                    nat_port: f.nat_port,
                    ..NatKey::default()
                }),
        );
        self.earlier_nat = nat_sources_of(&keys, host_ports);
        if let Some(running) = running {
            self.earlier_nat.retain(|r| {
                !(r.addr == running.addr
                    && r.port_min >= running.port_min
                    && r.port_max <= running.port_max)
            });
            self.earlier_nat.insert(0, running);
            self.earlier_nat.truncate(NAT_RANGES - 1);
        }
        for range in &self.earlier_nat {
            info!(range = %describe_range(range), "adopted flows use this NAT source");
        }
        Ok(())
    }

    /// The NAT sources replies are translated for: the current one first,
    /// then earlier ones that still have flows.
    pub fn nat_sources(&self) -> Vec<NatRange> {
        std::iter::once(self.settings.nat[0])
            .chain(self.earlier_nat.iter().copied())
            .filter(|r| r.addr != 0)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ha_common::{addr_to_wire, port_to_wire};

    fn range(last: u8, min: u16, max: u16) -> NatRange {
        NatRange {
            addr: addr_to_wire([10, 0, 0, last]),
            port_min: min,
            port_max: max,
        }
    }

    #[test]
    fn a_changed_nat_source_keeps_the_previous_one_until_four_would_be_needed() {
        let (a, b, c, d, e) = (
            range(2, 10000, 32767),
            range(2, 20000, 32767),
            range(9, 20000, 32767),
            range(2, 15000, 19999),
            range(2, 5000, 9999),
        );
        assert_eq!(next_nat_ranges(None, &[], a).unwrap(), vec![]);
        assert_eq!(
            next_nat_ranges(Some(a), &[], a).unwrap(),
            vec![],
            "unchanged"
        );
        let earlier = next_nat_ranges(Some(a), &[], b).unwrap();
        assert_eq!(earlier, vec![a]);
        let earlier = next_nat_ranges(Some(b), &earlier, c).unwrap();
        assert_eq!(earlier, vec![b, a], "the newest earlier one first");
        let earlier = next_nat_ranges(Some(c), &earlier, d).unwrap();
        assert_eq!(earlier, vec![c, b, a]);
        let refused = next_nat_ranges(Some(d), &earlier, e)
            .unwrap_err()
            .to_string();
        assert!(refused.contains("10.0.0.2:5000-9999"), "{refused}");
        assert!(refused.contains("3 earlier sources"), "{refused}");
        // Going back to an earlier range takes it out of the earlier ones.
        assert_eq!(
            next_nat_ranges(Some(d), &earlier, b).unwrap(),
            vec![d, c, a]
        );
        // A wider range on the same address covers the previous one (and any
        // earlier one inside it): no slot is kept for them.
        assert_eq!(next_nat_ranges(Some(b), &[], a).unwrap(), vec![]);
        assert_eq!(next_nat_ranges(Some(d), &[b, c], a).unwrap(), vec![c]);
    }

    #[test]
    fn adopted_reverse_entries_give_their_nat_sources_most_used_first() {
        let key = |last: u8, port: u16| NatKey {
            lb_addr: addr_to_wire([10, 0, 0, last]),
            nat_port: port_to_wire(port),
            ..NatKey::default()
        };
        let keys = [
            key(2, 12000),
            key(2, 31000),
            key(2, 15000),
            key(9, 20000),
            key(7, 20000),
            key(7, 20005),
            key(5, 40000),
        ];
        assert_eq!(
            nat_sources_of(&keys, None),
            vec![
                range(2, 12000, 31000),
                range(7, 20000, 20005),
                range(5, 40000, 40000)
            ]
        );
        assert!(nat_sources_of(&[], None).is_empty());
        // Never across the host's own ports: one source on each side.
        assert_eq!(
            nat_sources_of(&keys[..3], Some((13000, 20000))),
            vec![range(2, 12000, 12000), range(2, 31000, 31000)]
        );
        // They become the earlier ranges of the first settings applied.
        let earlier = next_nat_ranges(
            None,
            &nat_sources_of(&keys[..3], None),
            range(2, 20000, 32767),
        );
        assert_eq!(earlier.unwrap(), vec![range(2, 12000, 31000)]);
    }

    #[test]
    fn an_earlier_range_is_in_use_while_an_entry_falls_in_it_and_not_in_the_current_one() {
        let current = range(2, 20000, 32767);
        let earlier = [range(2, 10000, 32767), range(9, 20000, 32767)];
        let key = |last: u8, port: u16| NatKey {
            lb_addr: addr_to_wire([10, 0, 0, last]),
            nat_port: port_to_wire(port),
            ..NatKey::default()
        };
        let at = |key: NatKey| (key.lb_addr, key.nat_port);
        assert_eq!(
            ranges_in_use(&current, &earlier, [at(key(2, 25000))]),
            vec![false, false]
        );
        assert_eq!(
            ranges_in_use(&current, &earlier, [at(key(2, 12000))]),
            vec![true, false]
        );
        assert_eq!(
            ranges_in_use(&current, &earlier, [at(key(9, 25000))]),
            vec![false, true]
        );
    }
}
