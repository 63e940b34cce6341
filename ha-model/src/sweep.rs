//! **The agent's sweep**, steps 1 and 2 (docs/data-path.md, "The agent's sweep"). NAT-range
//! pruning (3) and backend freeing (4) change the agent's maps, not the data path's, and are
//! not modelled.
//!
//! Choices:
//! - Both snapshots are taken first (`CONNTRACK`, then `REVERSE_NAT`), and walked in key order
//!   (the agent walks the kernel's hash order; the order matters only when `REVERSE_NAT` is
//!   full or entries collide).
//! - A live flow whose `BACKENDS` record is missing has no nat key: nothing is recovered.
//! - Step 2 looks only at snapshot entries still present (an entry "removed in 1" is gone).

use std::collections::BTreeMap;

use ha_common::{NatKey, ORPHAN_GRACE_NS};

use crate::ctx::Update;
use crate::flow::{has_reverse, names};
use crate::{Ctx, SweepReport};

impl Ctx<'_> {
    /// Steps 1 and 2 of the sweep at `self.now`.
    pub fn sweep(&mut self) -> SweepReport {
        let mut report = SweepReport::default();
        let flows = self.state.conntrack.clone();
        let reverse = self.state.reverse.clone();

        // Live flows per NAT key: a lost reverse entry comes back only for a key one flow names.
        let mut named: BTreeMap<NatKey, usize> = BTreeMap::new();
        for (key, flow) in &flows {
            if !self.expired(key, flow)
                && has_reverse(key, flow)
                && let Some(nat_key) = self.nat_key_of(key, flow)
            {
                *named.entry(nat_key).or_default() += 1;
            }
        }

        // 1. Each flow: expired ones are forgotten; live ones get their reverse entry back.
        for (key, flow) in &flows {
            if self.expired(key, flow) {
                self.forget(key, flow);
                report.expired += 1;
                continue;
            }
            report.live += 1;
            if !has_reverse(key, flow) {
                continue;
            }
            if let Some(nat_key) = self.nat_key_of(key, flow)
                && !reverse.contains_key(&nat_key)
                && named.get(&nat_key) == Some(&1)
            {
                let entry = self.nat_entry(*key, flow.backend_id);
                if self.put_reverse(nat_key, entry, Update::NoExist) {
                    report.reverse_recovered += 1;
                }
            }
        }

        // 2. Each reverse entry left: an orphan older than the grace is removed.
        for (nat_key, entry) in &reverse {
            if !self.state.reverse.contains_key(nat_key) {
                continue;
            }
            let named = self.flow(&entry.flow).is_some_and(|flow| {
                names(&flow, nat_key.lb_addr, nat_key.nat_port, entry.backend_id)
            });
            if !named && self.now > entry.created_ns.saturating_add(ORPHAN_GRACE_NS) {
                self.state.reverse.remove(nat_key);
                report.orphans_freed += 1;
            }
        }
        report
    }
}

#[cfg(test)]
mod tests {
    use crate::{Config, Model};
    use ha_common::{
        BackendInfo, FLOW_LOCAL, Flow, FlowKey, LAST_SEEN_GRANULARITY_NS, NatEntry, NatKey,
        PROTO_TCP, Settings,
    };

    const G: u64 = LAST_SEEN_GRANULARITY_NS;

    fn key(n: u8) -> FlowKey {
        FlowKey {
            src_addr: u32::from_ne_bytes([10, 0, 0, n]),
            dst_addr: 1,
            src_port: 1,
            dst_port: 1,
            protocol: PROTO_TCP,
            _pad: [0; 3],
        }
    }

    fn nk(port: u16) -> NatKey {
        NatKey {
            backend_addr: 7,
            lb_addr: 9,
            backend_port: 8,
            nat_port: port,
            protocol: PROTO_TCP,
            _pad: [0; 3],
        }
    }

    fn model() -> Model {
        let config = Config {
            settings: Settings {
                timeouts_ns: ha_common::Timeouts {
                    tcp_syn_ns: 10 * G,
                    ..ha_common::Timeouts::default()
                }
                .table(),
                ..Settings::default()
            },
            backends: vec![BackendInfo {
                addr: 7,
                port: 8,
                flags: 0,
                _pad: 0,
            }],
            ..Config::default()
        };
        Model::new(config, crate::Capacity::both(2), 0)
    }

    fn flow(backend_id: u32, flags: u32, port: u16) -> Flow {
        Flow {
            backend_id,
            flags,
            last_seen_ns: 100 * G,
            nat_addr: 9,
            nat_port: port,
            ..Flow::default()
        }
    }

    #[test]
    fn local_flows_and_flows_without_backend_get_no_reverse_entry() {
        let mut m = model();
        m.state.conntrack.insert(key(1), flow(0, FLOW_LOCAL, 1));
        m.state.conntrack.insert(key(2), flow(5, 0, 2));
        let report = m.sweep(100 * G);
        assert_eq!(report.live, 2);
        assert_eq!(report.reverse_recovered, 0);
        assert!(m.state.reverse.is_empty());
    }

    #[test]
    fn recovery_is_limited_by_the_table_size() {
        let mut m = model();
        for n in 1..=3 {
            m.state.conntrack.insert(key(n), flow(0, 0, u16::from(n)));
        }
        let report = m.sweep(100 * G);
        assert_eq!((report.live, report.reverse_recovered), (3, 2));
        assert_eq!(m.state.reverse.len(), 2);
    }

    #[test]
    fn orphans_by_missing_flow_or_other_port_after_the_grace() {
        let mut m = model();
        m.state.conntrack.insert(key(1), flow(0, 0, 1));
        let entry = |k, backend_id, created_ns| NatEntry {
            flow: k,
            backend_id,
            _pad: 0,
            created_ns,
        };
        m.state.reverse.insert(nk(1), entry(key(1), 0, 0));
        m.state.reverse.insert(nk(2), entry(key(1), 0, 99 * G));
        m.state.reverse.insert(nk(3), entry(key(3), 0, 99 * G - 1));
        // A fourth entry would not fit: capacity 2 is only enforced on inserts.
        let report = m.sweep(100 * G);
        assert_eq!(report.orphans_freed, 1, "nk(2) is exactly at the grace");
        assert!(m.state.reverse.contains_key(&nk(1)));
        assert!(m.state.reverse.contains_key(&nk(2)));
        let report = m.sweep(100 * G + 1);
        assert_eq!(report.orphans_freed, 1);
        assert_eq!(m.state.reverse.len(), 1);
        // An expired flow takes its reverse entry with it, and is not an orphan count.
        let report = m.sweep(112 * G);
        assert_eq!((report.expired, report.orphans_freed), (1, 0));
        assert!(m.state.reverse.is_empty() && m.state.conntrack.is_empty());
    }
}
