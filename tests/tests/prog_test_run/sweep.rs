//! The agent's sweep of ended flows, a flow renewed after its snapshot, and
//! orphaned reverse entries.

use super::*;

#[test]
fn the_agent_sweep_removes_ended_flows_and_their_reverse_entries() {
    let mut w = world();
    for port in 0..5u16 {
        let mut syn = w.client_frame(w.tcp_vip, 6443, SYN);
        syn.sport = 42000 + port;
        assert_eq!(w.run(&syn.build()).0, XDP_TX);
    }
    assert_eq!(w.dataplane.flows().unwrap().len(), 5);
    assert_eq!(w.dataplane.reverse_entries().unwrap().len(), 5);
    let report = w.dataplane.sweep_flows(T0).unwrap();
    assert_eq!(
        (report.live, report.expired),
        (5, 0),
        "nothing has ended yet"
    );
    // Unanswered SYNs end after tcp_syn_timeout (60 s, plus the 1 s granularity).
    let report = w.dataplane.sweep_flows(T0 + 61 * SECOND).unwrap();
    assert_eq!((report.live, report.expired), (5, 0));
    let report = w.dataplane.sweep_flows(T0 + 61 * SECOND + 1).unwrap();
    assert_eq!((report.live, report.expired), (0, 5));
    assert!(w.dataplane.flows().unwrap().is_empty());
    assert!(
        w.dataplane.reverse_entries().unwrap().is_empty(),
        "NAT ports freed"
    );
}

/// The sweep decides from a walk of both tables, and the data path keeps
/// running meanwhile: a flow made anew (a SYN on its expired entry) between
/// the walk and the deletes must stay, with its reverse entry.
#[test]
fn the_sweep_keeps_a_flow_renewed_after_its_snapshot() {
    let mut w = world();
    for port in [42000u16, 42001] {
        let mut syn = w.client_frame(w.tcp_vip, 6443, SYN);
        syn.sport = port;
        assert_eq!(w.run(&syn.build()).0, XDP_TX);
    }
    let later = T0 + 61 * SECOND + 1;
    let planned = w.dataplane.plan_sweep(later).unwrap();
    assert_eq!(
        planned.plan.remove_flows.len(),
        2,
        "both unanswered SYNs ended"
    );
    // Meanwhile the first client tries again.
    w.dataplane.set_clock(later).unwrap();
    let mut syn = w.client_frame(w.tcp_vip, 6443, SYN);
    syn.sport = 42000;
    assert_eq!(w.run(&syn.build()).0, XDP_TX);
    let report = w.dataplane.apply_sweep(planned).unwrap();
    assert_eq!((report.live, report.expired), (1, 1));
    let flows = w.dataplane.flows().unwrap();
    assert_eq!(flows.len(), 1);
    assert_eq!(flows[0].0.src_port, 42000u16.to_be());
    assert_eq!(flows[0].1.last_seen_ns, later, "the renewed flow");
    let entries = w.dataplane.reverse_entries().unwrap();
    assert_eq!(entries.len(), 1, "with its reverse entry");
    assert_eq!(entries[0].1.flow, flows[0].0);
}

/// Issue 12, case 4, the other half: reverse entries whose flow is gone were
/// never swept (the sweep walked the connection table only) and, pinned,
/// survived restarts. Now the sweep frees them, past a one-second grace.
#[test]
fn the_sweep_frees_orphaned_reverse_entries_and_restores_lost_ones() {
    let mut w = world();
    let mut keys = Vec::new();
    for port in [CLIENT_PORT, CLIENT_PORT + 1] {
        let c = Conversation::new(&w, port);
        c.handshake();
        keys.push(c.key());
    }
    let entries = w.dataplane.reverse_entries().unwrap();
    let orphaned = entries.iter().find(|(_, e)| e.flow == keys[0]).unwrap().0;
    let lost = entries.iter().find(|(_, e)| e.flow == keys[1]).unwrap().0;
    w.dataplane.remove_flow(&keys[0]).unwrap();
    w.dataplane.remove_reverse_entry(&lost).unwrap();
    let report = w.dataplane.sweep_flows(T0).unwrap();
    assert_eq!(
        (report.orphans_freed, report.reverse_recovered),
        (0, 1),
        "within the grace an entry may be a flow being created"
    );
    let report = w.dataplane.sweep_flows(T0 + SECOND + 1).unwrap();
    assert_eq!((report.orphans_freed, report.reverse_recovered), (1, 0));
    let entries = w.dataplane.reverse_entries().unwrap();
    assert!(entries.iter().all(|(k, _)| *k != orphaned), "orphan freed");
    assert!(
        entries.iter().any(|(k, e)| *k == lost && e.flow == keys[1]),
        "lost one restored"
    );
    let totals = w.dataplane.sweep_totals();
    assert_eq!((totals.orphans_freed, totals.reverse_recovered), (1, 1));
}
