//! The agent's sweep of the connection and reverse NAT tables
//! (docs/data-path.md, "The agent's sweep"): decided from snapshots by pure
//! functions with the data path's own rules, then applied with each removal
//! checked again against the tables as they are now.

use std::{
    collections::{HashMap, HashSet},
    net::Ipv4Addr,
};

use aya::maps::{Array, HashMap as BpfHashMap};
use ha_common::{
    BACKEND_INDEX_MAP, BACKENDS_MAP, BackendAddr, BackendInfo, CONNTRACK_MAP, Flow, FlowKey,
    NatEntry, NatKey, ORPHAN_GRACE_NS, REVERSE_NAT_MAP, Settings,
};
use tracing::{debug, info};

use super::{DataPlane, Result, describe_range, map_error, ranges_in_use, writer::backend_addr};

/// What one sweep of the connection and reverse NAT tables found and did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Flows left in the table.
    pub live: usize,
    /// Ended flows removed with their reverse entries.
    pub expired: usize,
    /// Live NATed flows whose missing reverse entry was put back.
    pub reverse_recovered: usize,
    /// Reverse entries whose flow was gone, removed (their NAT port is free again).
    pub orphans_freed: usize,
}

/// Running totals of what the sweeps did since the agent started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SweepTotals {
    pub sweeps: u64,
    /// Flows in the table after the last sweep.
    pub live: u64,
    pub expired: u64,
    pub reverse_recovered: u64,
    pub orphans_freed: u64,
}

impl SweepTotals {
    fn add(&mut self, report: &SweepReport) {
        self.sweeps += 1;
        self.live = report.live as u64;
        self.expired += report.expired as u64;
        self.reverse_recovered += report.reverse_recovered as u64;
        self.orphans_freed += report.orphans_freed as u64;
    }
}

/// What a sweep will change, decided from snapshots of both tables.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SweepPlan {
    /// Ended flows to remove (their reverse entries are in `remove_reverse`).
    pub remove_flows: Vec<FlowKey>,
    /// Reverse entries of ended flows to remove, as the snapshot had them.
    pub remove_reverse: Vec<(NatKey, NatEntry)>,
    /// Orphans to remove (reverse entries no live flow names, past the
    /// grace), as the snapshot had them.
    pub orphans: Vec<(NatKey, NatEntry)>,
    /// Reverse entries to put back for live flows that lost theirs.
    pub recover_reverse: Vec<(NatKey, NatEntry)>,
    /// Backend ids that live flows name.
    pub referenced: HashSet<u32>,
}

/// A sweep decided and not yet applied ([`DataPlane::plan_sweep`]).
#[derive(Debug)]
pub struct PlannedSweep {
    settings: Settings,
    now_ns: u64,
    flows: Vec<(FlowKey, Flow)>,
    entries: Vec<(NatKey, NatEntry)>,
    pub plan: SweepPlan,
}

/// Decides a sweep (docs/data-path.md, "The agent's sweep") from snapshots
/// of the connection table (taken first), the reverse table and the backend
/// records the flows name. Pure: the same rules as the data path, from
/// `ha_common`.
pub fn plan_sweep(
    settings: &Settings,
    flows: &[(FlowKey, Flow)],
    entries: &[(NatKey, NatEntry)],
    backends: &HashMap<u32, BackendInfo>,
    now_ns: u64,
) -> SweepPlan {
    let reverse: HashMap<&NatKey, &NatEntry> = entries.iter().map(|(k, e)| (k, e)).collect();
    let nat_key_of = |key: &FlowKey, flow: &Flow| {
        // A local flow's reverse entry names its client (see Flow::has_reverse).
        if !flow.has_reverse(key) {
            return None;
        }
        let backend = backends.get(&flow.backend_id)?;
        Some(NatKey::new(
            backend,
            flow.nat_addr,
            flow.nat_port,
            key.protocol,
        ))
    };
    let mut plan = SweepPlan::default();
    let mut live: HashMap<&FlowKey, &Flow> = HashMap::new();
    // How many live flows name each NAT key: a lost reverse entry is put back
    // only for a key that one flow alone names, so the order flows come in
    // never decides which of two gets it.
    let mut named: HashMap<NatKey, usize> = HashMap::new();
    for (key, flow) in flows {
        if !flow.is_expired(key.protocol, settings, now_ns)
            && let Some(nat_key) = nat_key_of(key, flow)
        {
            *named.entry(nat_key).or_default() += 1;
        }
    }
    for (key, flow) in flows {
        let nat_key = nat_key_of(key, flow);
        if flow.is_expired(key.protocol, settings, now_ns) {
            plan.remove_flows.push(*key);
            if let Some(nat_key) = nat_key
                && let Some(entry) = reverse.get(&nat_key).filter(|e| e.flow == *key)
            {
                plan.remove_reverse.push((nat_key, **entry));
            }
            continue;
        }
        live.insert(key, flow);
        plan.referenced.insert(flow.backend_id);
        if let Some(nat_key) = nat_key
            && !reverse.contains_key(&nat_key)
            && named.get(&nat_key) == Some(&1)
        {
            let entry = NatEntry {
                flow: *key,
                backend_id: flow.backend_id,
                _pad: 0,
                created_ns: now_ns,
            };
            plan.recover_reverse.push((nat_key, entry));
        }
    }
    let removed: HashSet<NatKey> = plan.remove_reverse.iter().map(|(k, _)| *k).collect();
    for (nat_key, entry) in entries {
        if removed.contains(nat_key) {
            continue;
        }
        let owned = live
            .get(&entry.flow)
            .is_some_and(|f| f.names(nat_key.lb_addr, nat_key.nat_port, entry.backend_id));
        if !owned && now_ns > entry.created_ns.saturating_add(ORPHAN_GRACE_NS) {
            plan.orphans.push((*nat_key, *entry));
        }
    }
    plan
}

/// Whether a flow the sweep planned to remove may still go: the table holds
/// it still (`current`), still expired at `now_ns`. The snapshot is a walk of
/// the whole table; meanwhile a packet may have refreshed the flow, or a SYN
/// made a new one under the same key.
pub fn flow_still_expired(
    key: &FlowKey,
    current: Option<&Flow>,
    settings: &Settings,
    now_ns: u64,
) -> bool {
    current.is_some_and(|flow| flow.is_expired(key.protocol, settings, now_ns))
}

/// Whether a reverse entry the sweep planned to remove may still go: the
/// table holds the very entry the snapshot had (`current`; not a new flow's
/// claim of the same port), and its flow (`owner`, looked up now) does not
/// name it while live.
pub fn reverse_still_removable(
    nat_key: &NatKey,
    planned: &NatEntry,
    current: Option<&NatEntry>,
    owner: Option<&Flow>,
    settings: &Settings,
    now_ns: u64,
) -> bool {
    current == Some(planned)
        && !owner.is_some_and(|flow| {
            flow.names(nat_key.lb_addr, nat_key.nat_port, planned.backend_id)
                && !flow.is_expired(planned.flow.protocol, settings, now_ns)
        })
}

impl DataPlane {
    /// The agent's sweep (docs/data-path.md, "The agent's sweep"): removes
    /// ended flows with their reverse entries, puts back a live flow's lost
    /// reverse entry, frees reverse entries whose flow is gone, drops earlier
    /// NAT ranges no flow uses, and frees retired backends no flow names.
    ///
    /// # Errors
    /// A map that cannot be walked or written: the sweep stops there (what
    /// it removed so far was checked entry by entry).
    pub fn sweep_flows(&mut self, now_ns: u64) -> Result<SweepReport> {
        let planned = self.plan_sweep(now_ns)?;
        self.apply_sweep(planned)
    }

    /// The first half of [`DataPlane::sweep_flows`]: snapshots of the
    /// tables and what to change, decided from them.
    ///
    /// # Errors
    /// A map that cannot be walked: nothing is decided from part of a table.
    pub fn plan_sweep(&self, now_ns: u64) -> Result<PlannedSweep> {
        let settings = self.settings;
        let flows: Vec<(FlowKey, Flow)> = self.flows()?;
        let entries: Vec<(NatKey, NatEntry)> = self.reverse_entries()?;
        let backends: HashMap<u32, BackendInfo> = {
            let array: Array<_, BackendInfo> = self.map(BACKENDS_MAP)?;
            let ids: HashSet<u32> = flows.iter().map(|(_, f)| f.backend_id).collect();
            ids.into_iter()
                .filter_map(|id| array.get(&id, 0).ok().map(|b| (id, b)))
                .collect()
        };
        let plan = plan_sweep(&settings, &flows, &entries, &backends, now_ns);
        Ok(PlannedSweep {
            settings,
            now_ns,
            flows,
            entries,
            plan,
        })
    }

    /// The second half of [`DataPlane::sweep_flows`]: applies a plan, each
    /// removal checked again against the tables as they are now.
    ///
    /// # Errors
    /// As [`DataPlane::sweep_flows`].
    pub fn apply_sweep(&mut self, planned: PlannedSweep) -> Result<SweepReport> {
        let PlannedSweep {
            settings,
            now_ns,
            flows,
            entries,
            plan,
        } = planned;
        // Each removal is checked again against the maps as they are now: the
        // data path kept running while the snapshots were taken. (What is
        // left is the moment between that check and the delete.)
        let mut removed_flows: HashSet<FlowKey> = HashSet::new();
        {
            let mut table: BpfHashMap<_, FlowKey, Flow> = self.map_mut(CONNTRACK_MAP)?;
            for key in &plan.remove_flows {
                let current = table.get(key, 0).ok();
                if flow_still_expired(key, current.as_ref(), &settings, now_ns)
                    && table.remove(key).is_ok()
                {
                    removed_flows.insert(*key);
                }
            }
        }
        let expired = removed_flows.len();
        let mut removed_reverse: HashSet<NatKey> = HashSet::new();
        let mut orphans_freed = 0;
        {
            let table: BpfHashMap<_, FlowKey, Flow> = self.map(CONNTRACK_MAP)?;
            let owners: Vec<Option<Flow>> = plan
                .remove_reverse
                .iter()
                .chain(&plan.orphans)
                .map(|(_, entry)| table.get(&entry.flow, 0).ok())
                .collect();
            let mut reverse: BpfHashMap<_, NatKey, NatEntry> = self.map_mut(REVERSE_NAT_MAP)?;
            let planned = plan.remove_reverse.iter().map(|p| (p, false));
            let planned = planned.chain(plan.orphans.iter().map(|p| (p, true)));
            for (((nat_key, entry), orphan), owner) in planned.zip(&owners) {
                let current = reverse.get(nat_key, 0).ok();
                if reverse_still_removable(
                    nat_key,
                    entry,
                    current.as_ref(),
                    owner.as_ref(),
                    &settings,
                    now_ns,
                ) && reverse.remove(nat_key).is_ok()
                {
                    removed_reverse.insert(*nat_key);
                    orphans_freed += usize::from(orphan);
                }
            }
        }
        let mut reverse_recovered = 0;
        {
            let mut reverse: BpfHashMap<_, NatKey, NatEntry> = self.map_mut(REVERSE_NAT_MAP)?;
            for (key, entry) in &plan.recover_reverse {
                // Only if absent (BPF_NOEXIST): the data path may have claimed it meanwhile.
                if reverse.insert(key, entry, 1).is_ok() {
                    reverse_recovered += 1;
                }
            }
        }
        let report = SweepReport {
            live: flows.len() - expired,
            expired,
            reverse_recovered,
            orphans_freed,
        };
        self.sweep_totals.add(&report);

        // Earlier NAT ranges that nothing uses any more: no reverse entry
        // left, and no flow left (a flow that lost its reverse entry still
        // needs its range, or its replies would reach the host's stack).
        if !self.earlier_nat.is_empty() {
            let reverse_left = entries
                .iter()
                .map(|(k, _)| k)
                .filter(|k| !removed_reverse.contains(k))
                .map(|k| (k.lb_addr, k.nat_port));
            let flows_left = flows
                .iter()
                .filter(|(k, f)| f.flags & ha_common::FLOW_LOCAL == 0 && !removed_flows.contains(k))
                .map(|(_, f)| (f.nat_addr, f.nat_port));
            let used = ranges_in_use(
                &settings.nat[0],
                &self.earlier_nat,
                reverse_left.chain(flows_left),
            );
            if used.iter().any(|u| !u) {
                let mut keep = Vec::new();
                for (range, used) in self.earlier_nat.iter().zip(&used) {
                    if *used {
                        keep.push(*range);
                    } else {
                        info!(range = %describe_range(range), "no flow uses the earlier NAT source any more; dropped");
                    }
                }
                let mut next = settings;
                for (i, slot) in next.nat.iter_mut().enumerate().skip(1) {
                    *slot = keep.get(i - 1).copied().unwrap_or_default();
                }
                self.store_settings(&next)?;
                self.settings = next;
                self.earlier_nat = keep;
            }
        }

        let free: Vec<u32> = self
            .retired
            .iter()
            .filter(|id| !plan.referenced.contains(id))
            .copied()
            .collect();
        for id in free {
            {
                let mut array: Array<_, BackendInfo> = self.map_mut(BACKENDS_MAP)?;
                array
                    .set(id, BackendInfo::default(), 0)
                    .map_err(map_error(BACKENDS_MAP))?;
            }
            let keys: Vec<(Ipv4Addr, u16)> = self
                .backend_ids
                .iter()
                .filter(|(_, v)| **v == id)
                .map(|(k, _)| *k)
                .collect();
            let mut index: BpfHashMap<_, BackendAddr, u32> = self.map_mut(BACKEND_INDEX_MAP)?;
            for (address, port) in &keys {
                let _ = index.remove(&backend_addr(*address, *port));
            }
            self.clear_suspect_id(id)?;
            self.retired.remove(&id);
            self.backend_ids.retain(|_, v| *v != id);
            debug!(id, "retired backend freed");
        }
        Ok(report)
    }

    /// What the sweeps have done since this data plane was loaded.
    pub fn sweep_totals(&self) -> SweepTotals {
        self.sweep_totals
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ha_common::{
        FLOW_ASSURED, FLOW_LOCAL, FLOW_SEEN_REPLY, PROTO_TCP, Timeouts, addr_to_wire, port_to_wire,
    };

    fn settings() -> Settings {
        let g = 1_000_000_000;
        Settings {
            timeouts_ns: Timeouts {
                tcp_syn_ns: 60 * g,
                tcp_established_ns: 3600 * g,
                tcp_closing_ns: 120 * g,
                tcp_closed_ns: 5 * g,
                udp_unreplied_ns: 30 * g,
                udp_established_ns: 60 * g,
            }
            .table(),
            ..Settings::default()
        }
    }

    fn flow_key(port: u16) -> FlowKey {
        FlowKey {
            src_addr: addr_to_wire([10, 0, 0, 50]),
            dst_addr: addr_to_wire([10, 0, 0, 254]),
            src_port: port_to_wire(port),
            dst_port: port_to_wire(6443),
            protocol: PROTO_TCP,
            _pad: [0; 3],
        }
    }

    #[test]
    fn the_sweep_plan_expires_recovers_and_frees_by_the_data_paths_rules() {
        let now = 10_000 * 1_000_000_000u64;
        let backend = BackendInfo {
            addr: addr_to_wire([10, 0, 0, 11]),
            port: port_to_wire(6443),
            ..BackendInfo::default()
        };
        let backends = HashMap::from([(0, backend)]);
        let lb = addr_to_wire([10, 0, 0, 2]);
        let flow = |port: u16, flags: u32, last_seen_ns: u64| Flow {
            backend_id: 0,
            flags,
            last_seen_ns,
            nat_addr: lb,
            nat_port: port_to_wire(port),
            ..Flow::default()
        };
        let established = FLOW_SEEN_REPLY | FLOW_ASSURED;
        let nat = |port: u16| NatKey::new(&backend, lb, port_to_wire(port), PROTO_TCP);
        let entry = |key: FlowKey, created_ns: u64| NatEntry {
            flow: key,
            backend_id: 0,
            _pad: 0,
            created_ns,
        };
        let flows = vec![
            // Live, both halves.
            (flow_key(1), flow(20001, established, now)),
            // Unanswered for over a minute: expired.
            (flow_key(2), flow(20002, 0, now - 62 * 1_000_000_000)),
            // Live, lost its reverse entry: restored.
            (flow_key(3), flow(20003, established, now)),
            // Two live flows on one port after a lost entry: neither restored.
            (flow_key(4), flow(20004, established, now)),
            (flow_key(5), flow(20004, established, now)),
            // Local: no reverse entry to have.
            (
                flow_key(6),
                Flow {
                    flags: FLOW_LOCAL | established,
                    last_seen_ns: now,
                    ..Flow::default()
                },
            ),
        ];
        let entries = vec![
            (nat(20001), entry(flow_key(1), now)),
            (nat(20002), entry(flow_key(2), now)),
            // An orphan past the grace, and one within it.
            (nat(20007), entry(flow_key(7), now - 2 * ORPHAN_GRACE_NS)),
            (nat(20008), entry(flow_key(8), now)),
        ];
        let plan = plan_sweep(&settings(), &flows, &entries, &backends, now);
        assert_eq!(plan.remove_flows, vec![flow_key(2)]);
        assert_eq!(
            plan.remove_reverse,
            vec![(nat(20002), entry(flow_key(2), now))]
        );
        assert_eq!(
            plan.orphans,
            vec![(nat(20007), entry(flow_key(7), now - 2 * ORPHAN_GRACE_NS))]
        );
        assert_eq!(
            plan.recover_reverse,
            vec![(nat(20003), entry(flow_key(3), now))]
        );
        assert_eq!(plan.referenced, HashSet::from([0]));

        // Checked again at delete time: a flow refreshed since the snapshot,
        // or made anew by a SYN, stays.
        let s = settings();
        let stale = flow(20002, 0, now - 62 * 1_000_000_000);
        assert!(flow_still_expired(&flow_key(2), Some(&stale), &s, now));
        let refreshed = flow(20002, 0, now - 1_000_000_000);
        assert!(!flow_still_expired(&flow_key(2), Some(&refreshed), &s, now));
        assert!(!flow_still_expired(&flow_key(2), None, &s, now));
        // A reverse entry goes only if it is the one planned and no live flow names it.
        let orphan = entry(flow_key(7), now - 2 * ORPHAN_GRACE_NS);
        let k = nat(20007);
        assert!(reverse_still_removable(
            &k,
            &orphan,
            Some(&orphan),
            None,
            &s,
            now
        ));
        let claimed = entry(flow_key(9), now);
        assert!(!reverse_still_removable(
            &k,
            &orphan,
            Some(&claimed),
            None,
            &s,
            now
        ));
        assert!(!reverse_still_removable(&k, &orphan, None, None, &s, now));
        let owner = flow(20007, established, now);
        assert!(!reverse_still_removable(
            &k,
            &orphan,
            Some(&orphan),
            Some(&owner),
            &s,
            now
        ));
        let elsewhere = flow(20008, established, now);
        assert!(reverse_still_removable(
            &k,
            &orphan,
            Some(&orphan),
            Some(&elsewhere),
            &s,
            now
        ));
        assert!(reverse_still_removable(
            &k,
            &orphan,
            Some(&orphan),
            Some(&stale_owner(&owner)),
            &s,
            now
        ));
    }

    fn stale_owner(flow: &Flow) -> Flow {
        Flow {
            last_seen_ns: flow.last_seen_ns - 4000 * 1_000_000_000,
            ..*flow
        }
    }
}
