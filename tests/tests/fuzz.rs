//! The differential fuzzer in `cargo xtask test`: a short fixed-seed
//! campaign, the replay of every fixture in `tests/fuzz-fixtures/` (cases a
//! campaign found diverging, kept once fixed, and the cases written
//! as sequences), and a self-test that a model which disagrees is caught.
//! `cargo xtask fuzz --packets N --seed S` runs long campaigns.

use std::path::Path;

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
    for (cpu, report) in reports.iter().enumerate() {
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

#[test]
fn a_model_that_disagrees_is_caught() {
    let mut harness = Harness::new(0).expect("setting up the fuzzer");
    let handshake = [client(0x02), reply(0x12), client(0x10)];
    harness.run(&handshake).expect("both sides agree");
    // A model that picks another NAT port, or lets established flows end at
    // once, or miscounts: each is caught.
    let caught = harness.run_with_model(&handshake, |model| {
        model.config.settings.nat[0].port_min += 1;
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
