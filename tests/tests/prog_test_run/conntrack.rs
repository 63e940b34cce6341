//! The flow state machine step by step, FINs crossing on two CPUs, and a lost
//! half of a flow coming back.

use super::*;

#[test]
fn the_flow_state_machine_follows_the_handshake_and_both_fins() {
    use ha_common::{FLOW_ASSURED, FLOW_FIN_BACKEND, FLOW_FIN_CLIENT, FLOW_SEEN_REPLY};
    let w = world();
    let c = Conversation::new(&w, CLIENT_PORT);
    assert_eq!(c.client(SYN).0, XDP_TX);
    assert_eq!(c.flags(), Some(0), "new: SYN seen, nothing answered");
    // A client packet never answers for the backend.
    assert_eq!(c.client(SYN).0, XDP_TX);
    assert_eq!(c.flags(), Some(0), "a retransmitted SYN changes nothing");
    assert_eq!(c.backend(SYN_ACK).0, XDP_TX);
    assert_eq!(c.flags(), Some(FLOW_SEEN_REPLY), "replied (SYN_RECV)");
    assert_eq!(c.client(ACK).0, XDP_TX);
    let established = FLOW_SEEN_REPLY | FLOW_ASSURED;
    assert_eq!(
        c.flags(),
        Some(established),
        "established by the client's ACK"
    );
    assert_eq!(c.client(FIN).0, XDP_TX);
    assert_eq!(c.flags(), Some(established | FLOW_FIN_CLIENT), "closing");
    assert_eq!(c.backend(FIN).0, XDP_TX);
    assert_eq!(
        c.flags(),
        Some(established | FLOW_FIN_CLIENT | FLOW_FIN_BACKEND),
        "closed"
    );
    // The last ACK passes within fin_linger.
    assert_eq!(c.client(ACK).0, XDP_TX);
}

#[test]
fn a_syn_on_a_closing_or_closed_flow_starts_a_fresh_one_on_a_fresh_state() {
    // Issue 12, case 5: a SYN on an entry that was closing neither reopened
    // nor re-hashed it; the new connection inherited the old FIN state.
    for close in [&[FIN][..], &[FIN, FIN], &[RST]] {
        let w = world();
        let c = Conversation::new(&w, CLIENT_PORT);
        c.handshake();
        for (i, l4) in close.iter().enumerate() {
            // Client FIN first, then the backend's.
            let sent = if i == 0 {
                c.client(*l4)
            } else {
                c.backend(*l4)
            };
            assert_eq!(sent.0, XDP_TX);
        }
        let before = w.dataplane.event(Event::NewFlow).unwrap();
        let (verdict, out) = c.client(SYN);
        assert_eq!(verdict, XDP_TX);
        assert_eq!(
            c.flags(),
            Some(0),
            "after {close:?}: a fresh entry, no FIN, not assured"
        );
        assert_eq!(w.dataplane.event(Event::SynRestartedFlow).unwrap(), 1);
        assert_eq!(w.dataplane.event(Event::NewFlow).unwrap(), before + 1);
        // Re-hashed from scratch: the same backend and port the hash gives (the old ones were freed).
        assert_eq!(
            nat_target(&out),
            (
                c.backend.addr,
                c.nat_port.load(std::sync::atomic::Ordering::Relaxed)
            )
        );
        assert_eq!(w.dataplane.reverse_entries().unwrap().len(), 1);
    }
}

#[test]
fn a_closed_flow_ends_fin_linger_after_its_last_packet() {
    let mut w = world();
    {
        let c = Conversation::new(&w, CLIENT_PORT);
        c.handshake();
        c.client(FIN);
        c.backend(FIN);
    }
    // fin_linger is 5 s (plus the 1 s refresh granularity): at 6 s it is still there.
    w.dataplane.set_clock(T0 + 6 * SECOND).unwrap();
    let c = Conversation::new(&w, CLIENT_PORT);
    assert_eq!(c.client(ACK).0, XDP_TX);
    assert_eq!(w.dataplane.event(Event::ExpiredFlowReplaced).unwrap(), 0);
    // That ACK refreshed it; 7 s after it, the flow has ended: the next packet
    // of the 5-tuple is a new flow (a pickup, since it is no SYN).
    w.dataplane.set_clock(T0 + 13 * SECOND + 1).unwrap();
    let c = Conversation::new(&w, CLIENT_PORT);
    assert_eq!(c.client(ACK).0, XDP_TX);
    assert_eq!(w.dataplane.event(Event::ExpiredFlowReplaced).unwrap(), 1);
    assert_eq!(w.dataplane.event(Event::MidstreamPickup).unwrap(), 1);
    assert_eq!(c.flags(), Some(0), "a fresh entry");
}

/// Issue 12, case 5: FIN flags were set by a plain read-modify-write, so
/// FINs crossing on two CPUs could lose one and hold the port for an hour.
/// Two threads, pinned to two CPUs, send the client's and the backend's FIN
/// of the same established flow at the same moment, thousands of times;
/// both bits must be set every time.
#[test]
fn fins_crossing_on_two_cpus_are_both_recorded() {
    use std::sync::atomic::{AtomicU32, Ordering};
    if ha_user::dataplane::possible_cpus() < 2 {
        eprintln!("one CPU: nothing can cross");
        return;
    }
    // With a plain read-modify-write, about one round in six lost a FIN.
    const ROUNDS: u16 = 1000;
    let mut w = world();
    // 10,000 NAT ports per backend: every SYN finds one.
    let mut settings = w.dataplane.settings();
    settings.nat[0].port_max = NAT_MIN + 9999;
    let vips = vec![vip(
        "apiserver",
        w.tcp_vip,
        6443,
        PROTO_TCP,
        backends(&w.lab, 6443),
    )];
    w.dataplane.apply(&settings, &vips).unwrap();
    let w = w;
    let netns = format!("/run/netns/{}", w.lab.host("lb").netns);
    // Each round's flow: its own client port, established before the race.
    let conversations: Vec<Conversation> = (0..ROUNDS)
        .map(|i| Conversation::new(&w, 30000 + i))
        .collect();
    // A spinning barrier: a sleeping one wakes the threads microseconds
    // apart, and the race is a few nanoseconds wide.
    let arrived = AtomicU32::new(0);
    let start = |i: u32| {
        arrived.fetch_add(1, Ordering::AcqRel);
        while arrived.load(Ordering::Acquire) < 2 * (i + 1) {
            std::hint::spin_loop();
        }
    };
    let round = AtomicU32::new(0);
    let lost = AtomicU32::new(0);
    let run_on = |cpu: usize, frame: &dyn Fn(&Conversation) -> Vec<u8>| {
        let file = std::fs::File::open(&netns).unwrap();
        nix::sched::setns(
            std::os::fd::AsFd::as_fd(&file),
            nix::sched::CloneFlags::CLONE_NEWNET,
        )
        .unwrap();
        let mut set = nix::sched::CpuSet::new();
        set.set(cpu).unwrap();
        nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).unwrap();
        let mut ctx = [0u8; 24];
        ctx[12..16].copy_from_slice(&w.ifindex.to_ne_bytes());
        for (i, c) in conversations.iter().enumerate() {
            let bytes = frame(c);
            ctx[4..8].copy_from_slice(&(bytes.len() as u32).to_ne_bytes());
            let mut out = vec![0u8; bytes.len() + 256];
            // Both threads wait here, then fire together.
            start(i as u32);
            let mut options = TestRunOptions::new();
            options.data_in = Some(&bytes);
            options.data_out = Some(&mut out);
            options.ctx_in = Some(&ctx);
            let result = w.dataplane.program().test_run(options).unwrap();
            assert_eq!(result.return_value, XDP_TX, "round {i}");
            if cpu == 0 {
                round.store(i as u32 + 1, Ordering::Release);
            }
        }
    };
    // Establish every flow first (single-threaded, on the test's own thread via World::run).
    for c in &conversations {
        c.handshake();
    }
    let client_fin = |c: &Conversation| {
        let mut f = c.w.client_frame(c.w.tcp_vip, 6443, FIN);
        f.sport = c.client_port;
        f.build()
    };
    let backend_fin = |c: &Conversation| {
        Frame {
            src_mac: c.backend.mac,
            dst_mac: c.w.lb_mac,
            vlan: None,
            src: c.backend.addr,
            dst: c.w.lb,
            sport: 6443,
            dport: c.nat_port.load(std::sync::atomic::Ordering::Relaxed),
            l4: FIN,
            payload: b"",
        }
        .build()
    };
    std::thread::scope(|s| {
        s.spawn(|| run_on(0, &client_fin));
        s.spawn(|| run_on(1, &backend_fin));
    });
    let both = ha_common::FLOW_FIN_CLIENT | ha_common::FLOW_FIN_BACKEND;
    for c in &conversations {
        if c.flags().unwrap() & both != both {
            lost.fetch_add(1, Ordering::Relaxed);
        }
    }
    assert_eq!(round.load(Ordering::Acquire), ROUNDS as u32);
    assert_eq!(
        lost.load(Ordering::Relaxed),
        0,
        "flows that lost a FIN out of {ROUNDS}"
    );
}

/// Issue 12, case 3: a backend's reply that misses the reverse table was
/// handed to the LB's own stack, which reset the flow. Now it is dropped
/// (the backend retransmits), the client's next packet puts the reverse
/// entry back from the connection table, and the flow carries on.
#[test]
fn a_lost_reverse_entry_drops_the_reply_and_comes_back_from_the_flow() {
    let mut w = world();
    let (nat_key, reply, client_ack) = {
        let c = Conversation::new(&w, CLIENT_PORT);
        c.handshake();
        let entries = w.dataplane.reverse_entries().unwrap();
        assert_eq!(entries.len(), 1);
        let reply = Frame {
            src_mac: c.backend.mac,
            dst_mac: w.lb_mac,
            vlan: None,
            src: c.backend.addr,
            dst: w.lb,
            sport: 6443,
            dport: c.nat_port.load(std::sync::atomic::Ordering::Relaxed),
            l4: ACK,
            payload: b"",
        }
        .build();
        let mut ack = w.client_frame(w.tcp_vip, 6443, ACK);
        ack.sport = CLIENT_PORT;
        (entries[0].0, reply, ack.build())
    };
    w.dataplane.remove_reverse_entry(&nat_key).unwrap();
    let before = w.dataplane.verdicts().unwrap();
    let (verdict, _) = w.run(&reply);
    assert_eq!(verdict, XDP_DROP, "not passed to the host's stack");
    assert_eq!(w.delta(Verdict::DropReplyNoFlow, &before), 1);
    // The client's next packet, a second later (the flow's refresh), restores it.
    w.dataplane.set_clock(T0 + 2 * SECOND).unwrap();
    assert_eq!(w.run(&client_ack).0, XDP_TX);
    assert_eq!(w.dataplane.event(Event::ReverseRecovered).unwrap(), 1);
    assert_eq!(
        w.run(&reply).0,
        XDP_TX,
        "the backend's retransmission gets through"
    );
    assert_eq!(
        w.dataplane.reverse_entries().unwrap()[0].0,
        nat_key,
        "same port"
    );
}

/// Issue 12, case 4: a flow whose connection-table entry was lost but whose
/// reverse entry stayed collided with itself on its old NAT port and moved
/// to another one mid-connection. Now its next packet, from either side,
/// rebuilds the entry on the same port and backend.
#[test]
fn a_lost_flow_entry_comes_back_on_its_own_port_from_either_side() {
    for from_client in [true, false] {
        let mut w = world();
        let (key, port, backend) = {
            let c = Conversation::new(&w, CLIENT_PORT);
            c.handshake();
            (
                c.key(),
                c.nat_port.load(std::sync::atomic::Ordering::Relaxed),
                c.backend.addr,
            )
        };
        w.dataplane.remove_flow(&key).unwrap();
        let c = Conversation::new(&w, CLIENT_PORT);
        c.nat_port.store(port, std::sync::atomic::Ordering::Relaxed);
        if from_client {
            // A pickup (no SYN): it finds its own reverse entry among its candidates.
            let (verdict, out) = c.client(ACK);
            assert_eq!(verdict, XDP_TX);
            assert_eq!(nat_target(&out), (backend, port), "same backend, same port");
        } else {
            let (verdict, _) = c.backend(ACK);
            assert_eq!(verdict, XDP_TX, "the reply rebuilds the flow");
            assert_eq!(c.client(ACK).0, XDP_TX);
        }
        assert_eq!(w.dataplane.event(Event::ForwardRecovered).unwrap(), 1);
        assert_eq!(w.dataplane.event(Event::NatPortCollision).unwrap(), 0);
        let entries = w.dataplane.reverse_entries().unwrap();
        assert_eq!(entries.len(), 1, "no second port");
        assert_eq!(entries[0].1.flow, key);
        let flows = w.dataplane.flows().unwrap();
        assert_eq!(flows.len(), 1);
        assert_eq!(flows[0].1.nat_port, ha_common::port_to_wire(port));
    }
}
