//! The differential fuzzer in `cargo xtask test`: a short fixed-seed
//! campaign, the replay of every fixture in `tests/fuzz-fixtures/` (cases a
//! campaign found diverging, kept once fixed, and the cases written
//! as sequences), and a self-test that a model which disagrees is caught.
//! `cargo xtask fuzz --packets N --seed S` runs long campaigns.

use std::path::Path;

use ha_common::{Event, Verdict};

use ha_lab::fuzz::{
    self, Harness,
    steps::{Frame, Kind, Mutation, Step},
};

/// Frames in the short campaign, over two workers (CPUs 0 and 1).
const CAMPAIGN_PACKETS: u64 = 200_000;

#[test]
fn a_short_fixed_seed_campaign_finds_no_divergence() {
    let reports: Vec<fuzz::Report> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..2)
            .map(|cpu| {
                scope.spawn(move || {
                    fuzz::campaign(CAMPAIGN_PACKETS / 2, 20261130, cpu, None, |_| {})
                        .expect("setting up the fuzzer")
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    let mut coverage = fuzz::Coverage::default();
    for (cpu, report) in reports.iter().enumerate() {
        coverage.merge(&report.coverage);
        if let Some((fixture, trace, _)) = &report.divergence {
            panic!(
                "worker {cpu}: divergence; minimal case (fixture):\n{}\n{trace}",
                serde_json::to_string_pretty(fixture).unwrap()
            );
        }
        assert!(report.packets >= CAMPAIGN_PACKETS / 2, "{report:?}");
        eprintln!(
            "worker {cpu}: {} packets in {} cases, {:.1} s",
            report.packets,
            report.cases,
            report.elapsed.as_secs_f64()
        );
    }
    // A campaign that agrees proves something only where it went: every
    // path the fuzz world can reach was reached (all but redirects to
    // other interfaces, which its one interface has none of; a backend
    // record vanishing mid-packet, which takes a concurrent agent; forwarding
    // switched off, and the FIB's rarer refusals (a lightweight tunnel, no
    // source address), which its routing table has none of).
    let unreachable = [
        Verdict::ForwardRedirect,
        Verdict::ReplyRedirect,
        Verdict::IcmpForwardRedirect,
        Verdict::IcmpReplyRedirect,
        Verdict::DropNoTxPort,
        Verdict::DropStaleBackend,
        Verdict::DropForwardingDisabled,
        Verdict::DropFibFailure,
    ];
    // A full PASSIVE_EVENTS ring (64 KiB of records the agent did not read)
    // takes thousands of backends becoming suspect; the world has three.
    let unreachable_events = [Event::PassiveEventLost];
    let missed: Vec<&str> = (0..Verdict::COUNT)
        .map(Verdict::from_index)
        .filter(|v| !unreachable.contains(v) && coverage.verdicts[*v as usize] == 0)
        .map(Verdict::label)
        .chain(
            (0..Event::COUNT)
                .map(Event::from_index)
                .filter(|e| !unreachable_events.contains(e) && coverage.events[*e as usize] == 0)
                .map(Event::label),
        )
        .collect();
    assert!(
        missed.is_empty(),
        "the campaign never reached {missed:?}:\n{}",
        coverage.render()
    );
}

#[test]
fn every_fixture_runs_the_same_on_both_sides() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz-fixtures");
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    paths.sort();
    assert!(!paths.is_empty(), "no fixtures in {}", dir.display());
    let mut harness = Harness::new(0).expect("setting up the fuzzer");
    for path in &paths {
        let fixture =
            fuzz::read_fixture(path).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
        if let Err(why) = harness.run(&fixture.steps) {
            panic!(
                "{} ({}):\n{why}\n{}",
                path.display(),
                fixture.note,
                harness.trace(&fixture.steps)
            );
        }
    }
}

fn client(flags: u8) -> Step {
    Step::Frame {
        advance_ns: 0,
        frame: Frame {
            kind: Kind::Client {
                client: 0,
                port: 0,
                target: 0,
                udp: false,
            },
            tcp_flags: flags,
            payload: 0,
            vlan: false,
            mutation: Mutation::None,
        },
    }
}

fn reply(flags: u8) -> Step {
    Step::Frame {
        advance_ns: 0,
        frame: Frame {
            kind: Kind::ReplyOfFlow { index: 0 },
            tcp_flags: flags,
            payload: 0,
            vlan: false,
            mutation: Mutation::None,
        },
    }
}

/// Passive health on both sides: a refused SYN (RST+ACK to a new flow)
/// suspects its backend, tells the agent and is redispatched (its RST
/// dropped, the flow forgotten); the client's retransmission goes to
/// another backend; its refusal reaches the client; once the agent clears
/// a suspect, and after the TTL, selection is the plain slot again.
#[test]
fn a_refused_syn_is_redispatched_alike_on_both_sides() {
    let mut harness = Harness::new(0).expect("setting up the fuzzer");
    let later = |step: Step, advance: u64| match step {
        Step::Frame { frame, .. } => Step::Frame {
            advance_ns: advance,
            frame,
        },
        other => other,
    };
    let steps = [
        client(0x02),
        reply(0x14),
        later(client(0x02), 1_000_000_000),
        reply(0x14),
        Step::Confirm { index: 0 },
        later(client(0x02), 6_000_000_000),
    ];
    harness.run(&steps).expect("both sides agree");
    let state = harness.state();
    let event = |e: Event| state.events[e as usize];
    assert_eq!(
        state.verdicts[Verdict::DropRedispatched as usize].packets,
        1
    );
    assert_eq!(event(Event::Redispatched), 1);
    assert_eq!(event(Event::RedispatchLimit), 1);
    assert_eq!(event(Event::SuspectSkipped), 1);
    assert_eq!(event(Event::BackendSuspected), 2);
    assert_eq!(state.passive_events.len(), 2);
    assert_eq!(state.suspect.len(), 1, "one suspect cleared by the agent");
    assert_eq!(state.redispatched.len(), 1);
    // The model's suspects are compared with the kernel's.
    let caught = harness.run_with_model(&steps[..2], |model| {
        model.state.suspect.insert(0, 1);
    });
    assert!(caught.expect_err("a suspect").contains("SUSPECT"));
}

#[test]
fn a_model_that_disagrees_is_caught() {
    let mut harness = Harness::new(0).expect("setting up the fuzzer");
    let handshake = [client(0x02), reply(0x12), client(0x10)];
    harness.run(&handshake).expect("both sides agree");
    // A model that picks another NAT port, or lets established flows end at
    // once, or miscounts: each is caught.
    let caught = harness.run_with_model(&handshake, |model| {
        // A disjoint range: whatever the hash, the model's port differs.
        let nat = &mut model.config.settings.nat[0];
        nat.port_min += 100;
        nat.port_max += 100;
    });
    let why = caught.expect_err("another NAT port went unnoticed");
    assert!(why.contains("output"), "{why}");
    let mut late = handshake.to_vec();
    late.push(Step::Frame {
        advance_ns: 3_000_000_000,
        frame: Frame {
            kind: Kind::ClientOfFlow { index: 0 },
            tcp_flags: 0x10,
            payload: 0,
            vlan: false,
            mutation: Mutation::None,
        },
    });
    let caught = harness.run_with_model(&late, |model| {
        model.config.settings.timeouts_ns[ha_common::TIMEOUT_TCP_ESTABLISHED] = 0;
    });
    let why = caught.expect_err("an established flow expired in the model only");
    assert!(why.contains("CONNTRACK") || why.contains("EVENTS"), "{why}");
    let caught = harness.run_with_model(&handshake, |model| {
        model.state.verdicts[0].packets = 1;
    });
    assert!(caught.expect_err("a counter").contains("VERDICTS"));
}

/// A local flow is established only once its backend answered (seen by the
/// tc egress program), as a NATed flow: blind handshakes to a local VIP (a
/// spoofed SYN and ACK, never answered) leave embryonic flows, which must
/// not lock the connection table against new flows.
#[test]
fn blind_handshakes_to_a_local_backend_do_not_lock_the_table() {
    let mut harness = Harness::new(0).expect("setting up the fuzzer");
    let blind = |port: u8, tcp_flags: u8| Step::Frame {
        advance_ns: 0,
        frame: Frame {
            kind: Kind::Client {
                client: 1,
                port,
                target: 2,
                udp: false,
            },
            tcp_flags,
            payload: 0,
            vlan: false,
            mutation: Mutation::None,
        },
    };
    // Eight (the world's table size) SYN + ACK pairs from spoofed sources to the local VIP.
    let mut steps: Vec<Step> = (0..8)
        .flat_map(|i| [blind(10 + i, 0x02), blind(10 + i, 0x10)])
        .collect();
    // Then a real client to the NATed VIP.
    steps.push(Step::Handshake {
        client: 0,
        port: 40,
        target: 0,
    });
    harness.run(&steps).expect("both sides agree");
    let state = harness.state();
    assert_eq!(state.conntrack.len(), 8, "the table is full");
    assert_eq!(state.verdicts[Verdict::DropTableFull as usize].packets, 0);
    assert!(state.events[Event::EmbryonicEvicted as usize] >= 1);
    assert_eq!(
        state
            .conntrack
            .values()
            .filter(|flow| flow.flags & ha_common::FLOW_LOCAL == 0)
            .count(),
        1,
        "the real client's flow is in"
    );
}
