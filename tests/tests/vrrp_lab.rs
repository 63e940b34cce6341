//! VIP ownership with VRRP between two LB hosts, in the lab: election,
//! failover on kill -9 and SIGTERM, preemption, a healed partition, and
//! keepalived (Debian's) as the peer in both directions, versions 2 and 3.

mod common;

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

use common::{start_agent, start_apiservers, telemetry, vip_config, whoami, write_config};
use ha_lab::{HOST_IFACE, Lab, LabProcess, bin_path, config};
use ha_user::config::{Config, TrackAction, VrrpConfig, VrrpVersion};
use nix::sys::signal::Signal;

const HOSTS: [&str; 6] = ["client", "lb1", "lb2", "api1", "api2", "api3"];

/// What the tests vary of an agent's `vrrp` section (vrid 51).
struct Vrrp {
    priority: u8,
    version: u8,
    interval: Duration,
    /// Unicast to the other LB; multicast otherwise.
    unicast: bool,
    preempt_delay: Duration,
}

const DEFAULT: Vrrp = Vrrp {
    priority: 100,
    version: 3,
    interval: Duration::from_millis(100),
    unicast: false,
    preempt_delay: Duration::ZERO,
};

fn other(lb: &str) -> &'static str {
    if lb == "lb1" { "lb2" } else { "lb1" }
}

fn config(lab: &Lab, lb: &str, vrrp: &Vrrp) -> std::path::PathBuf {
    write_config(lab, &format!("{lb}.yaml"), &agent_config(lab, vrrp))
}

/// The apiserver VIP in front of api1..api3, owned by VRRP as `vrrp` says.
fn agent_config(lab: &Lab, vrrp: &Vrrp) -> Config {
    let mut conf = vip_config(lab, &["api1", "api2", "api3"]);
    conf.vrrp = Some(VrrpConfig {
        priority: vrrp.priority,
        version: match vrrp.version {
            2 => VrrpVersion::V2,
            3 => VrrpVersion::V3,
            other => panic!("VRRP version {other}"),
        },
        advert_interval: vrrp.interval,
        preempt_delay: vrrp.preempt_delay,
        // Both LBs, as one file shared by every LB host lists them: each
        // agent skips its own address.
        unicast_peers: if vrrp.unicast {
            vec![
                config::ip(lab.host("lb1").addr),
                config::ip(lab.host("lb2").addr),
            ]
        } else {
            Vec::new()
        },
        ..config::vrrp(51)
    });
    conf
}

fn holds_vip(lab: &Lab, lb: &str) -> bool {
    let out = lab
        .exec(lb, &["ip", "-o", "-4", "addr", "show", "dev", HOST_IFACE])
        .unwrap();
    String::from_utf8_lossy(&out.stdout).contains(&format!("{}/32", lab.vip(0)))
}

fn holders(lab: &Lab) -> Vec<&'static str> {
    ["lb1", "lb2"]
        .into_iter()
        .filter(|lb| holds_vip(lab, lb))
        .collect()
}

fn wait_for_single_holder(lab: &Lab, lb: &str, timeout: Duration) -> Duration {
    lab.wait_until(timeout, &format!("{lb} alone holds the VIP"), || {
        holders(lab) == [lb]
    })
    .unwrap_or_else(|e| panic!("{e}; holders now {:?}", holders(lab)))
}

/// The MAC the client's ARP cache has for the VIP.
fn client_arp_for_vip(lab: &Lab) -> String {
    let out = lab
        .exec("client", &["ip", "neigh", "show", &lab.vip(0).to_string()])
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    text.split_whitespace()
        .skip_while(|w| *w != "lladdr")
        .nth(1)
        .unwrap_or_default()
        .to_string()
}

fn vrrp_status(lab: &Lab, lb: &str) -> serde_json::Value {
    let out = lab
        .exec(
            lb,
            &[bin_path("ha-user").to_str().unwrap(), "status", "--json"],
        )
        .unwrap();
    serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["vrrp"].clone()
}

fn pair(vrrp1: &Vrrp, vrrp2: &Vrrp) -> (Lab, Vec<LabProcess>, LabProcess, LabProcess) {
    let lab = Lab::new(&HOSTS).unwrap();
    let apis = start_apiservers(&lab, &["api1", "api2", "api3"]);
    let lb1 = start_agent(&lab, "lb1", &config(&lab, "lb1", vrrp1), &[]);
    let lb2 = start_agent(&lab, "lb2", &config(&lab, "lb2", vrrp2), &[]);
    (lab, apis, lb1, lb2)
}

/// Connection attempts from the client every 10 ms while `during` runs;
/// returns (start of attempt, succeeded).
fn probe_while(
    lab: &Lab,
    during: impl FnOnce() -> Instant + Send,
    window: Duration,
) -> (Instant, Vec<(Instant, bool)>) {
    let attempts = Mutex::new(Vec::new());
    let vip = lab.vip(0);
    let at = std::thread::scope(|scope| {
        let client = scope.spawn(|| {
            lab.in_host("client", || {
                let start = Instant::now();
                while start.elapsed() < window {
                    let at = Instant::now();
                    let ok = whoami(vip, 6443).is_ok();
                    attempts.lock().unwrap().push((at, ok));
                    std::thread::sleep(Duration::from_millis(10));
                }
            })
            .unwrap()
        });
        std::thread::sleep(Duration::from_millis(500));
        let at = during();
        client.join().unwrap();
        at
    });
    (at, attempts.into_inner().unwrap())
}

#[test]
fn one_lb_holds_the_vip_and_kill_9_moves_it_in_under_half_a_second() {
    let (lab, _apis, lb1, _lb2) = pair(
        &Vrrp {
            priority: 150,
            ..DEFAULT
        },
        &DEFAULT,
    );
    wait_for_single_holder(&lab, "lb1", Duration::from_secs(3));
    lab.in_host("client", || whoami(lab.vip(0), 6443))
        .unwrap()
        .expect("served through lb1");
    let status = vrrp_status(&lab, "lb1");
    assert_eq!(
        (status["state"].as_str(), status["priority"].as_u64()),
        (Some("master"), Some(150)),
        "{status}"
    );
    let status = vrrp_status(&lab, "lb2");
    assert_eq!(status["state"], "backup", "{status}");
    assert_eq!(
        status["master"],
        lab.host("lb1").addr.to_string(),
        "{status}"
    );

    let (killed_at, attempts) = probe_while(
        &lab,
        || {
            lb1.signal(Signal::SIGKILL).unwrap();
            Instant::now()
        },
        Duration::from_secs(3),
    );
    let after: Vec<_> = attempts.iter().filter(|(at, _)| *at >= killed_at).collect();
    let first_failure = after.iter().find(|(_, ok)| !ok).map(|(at, _)| *at);
    let recovered = match first_failure {
        Some(failed_at) => after
            .iter()
            .find(|(at, ok)| *ok && *at > failed_at)
            .map(|(at, _)| at.duration_since(killed_at)),
        None => Some(Duration::ZERO),
    }
    .expect("connections succeed again after the kill");
    let failed = after.iter().filter(|(_, ok)| !ok).count();
    eprintln!(
        "measured: kill -9 of the master -> first successful connection {:.0} ms; {failed} attempts failed",
        recovered.as_secs_f64() * 1000.0
    );
    assert!(
        recovered < Duration::from_millis(500),
        "failover took {recovered:?}"
    );
    assert!(holds_vip(&lab, "lb2"));
    assert_eq!(
        client_arp_for_vip(&lab),
        lab.host("lb2").mac_string(),
        "the client's ARP entry follows the new master"
    );
}

#[test]
fn sigterm_hands_over_through_priority_zero_in_about_a_skew_time() {
    let (lab, _apis, mut lb1, lb2) = pair(
        &Vrrp {
            priority: 150,
            ..DEFAULT
        },
        &DEFAULT,
    );
    wait_for_single_holder(&lab, "lb1", Duration::from_secs(3));
    lb1.signal(Signal::SIGTERM).unwrap();
    let stopped = Instant::now();
    lab.wait_until(Duration::from_secs(2), "lb2 takes the VIP", || {
        lb2.log().contains("VIPs taken")
    })
    .unwrap();
    let took = stopped.elapsed();
    // lb2 (priority 100): skew = 156 x 100 ms / 256 = 61 ms; without priority 0 it would wait 361 ms.
    eprintln!(
        "measured: SIGTERM of the master -> backup took the VIP after {:.0} ms (skew 61 ms)",
        took.as_secs_f64() * 1000.0
    );
    assert!(
        took < Duration::from_millis(250),
        "takeover took {took:?}: not through priority 0"
    );
    assert!(
        lb1.wait_timeout(Duration::from_secs(5))
            .unwrap()
            .is_some_and(|s| s.success())
    );
    wait_for_single_holder(&lab, "lb2", Duration::from_secs(1));
}

#[test]
fn the_higher_priority_host_takes_the_vip_back_after_preempt_delay() {
    let lab = Lab::new(&HOSTS).unwrap();
    let _apis = start_apiservers(&lab, &["api1", "api2", "api3"]);
    let _lb2 = start_agent(&lab, "lb2", &config(&lab, "lb2", &DEFAULT), &[]);
    wait_for_single_holder(&lab, "lb2", Duration::from_secs(3));
    // Measured from before the start: preempt_delay runs from the VRRP
    // machine's start, which comes before the agent says it serves (a
    // backup preempts a lower master after its skew time once the delay is
    // over, so a slow start left less than 1 s between "serving" and it).
    let returned = Instant::now();
    let lb1 = start_agent(
        &lab,
        "lb1",
        &config(
            &lab,
            "lb1",
            &Vrrp {
                priority: 150,
                preempt_delay: Duration::from_secs(1),
                ..DEFAULT
            },
        ),
        &[],
    );
    std::thread::sleep(Duration::from_millis(700).saturating_sub(returned.elapsed()));
    assert_eq!(
        holders(&lab),
        ["lb2"],
        "lb1 preempted before its preempt_delay"
    );
    lab.wait_until(Duration::from_secs(3), "lb1 takes the VIP back", || {
        lb1.log().contains("VIPs taken")
    })
    .unwrap();
    let took = returned.elapsed();
    eprintln!(
        "measured: preemption {:.0} ms after the higher-priority host returned (preempt_delay 1 s)",
        took.as_secs_f64() * 1000.0
    );
    assert!(
        // Above: the agent's own start (program load and verification) comes first.
        took >= Duration::from_secs(1) && took < Duration::from_secs(3),
        "{took:?}"
    );
    wait_for_single_holder(&lab, "lb1", Duration::from_secs(1));
}

#[test]
fn after_a_partition_heals_one_master_remains_and_the_client_follows_it() {
    let unicast = Vrrp {
        unicast: true,
        ..DEFAULT
    };
    let (lab, _apis, _lb1, lb2) = pair(
        &Vrrp {
            priority: 150,
            ..unicast
        },
        &unicast,
    );
    wait_for_single_holder(&lab, "lb1", Duration::from_secs(3));
    // The client talks to the VIP, so it has an ARP entry for gratuitous ARP to move.
    lab.in_host("client", || whoami(lab.vip(0), 6443))
        .unwrap()
        .expect("served by lb1");
    assert_eq!(client_arp_for_vip(&lab), lab.host("lb1").mac_string());
    // Cut VRRP between the LBs (both ways, at lb2), leaving everything else.
    lab.exec("lb2", &["nft", "add table inet cut; add chain inet cut in { type filter hook input priority 0; }; add chain inet cut out { type filter hook output priority 0; }; add rule inet cut in ip protocol 112 drop; add rule inet cut out ip protocol 112 drop"]).unwrap();
    lab.wait_until(Duration::from_secs(2), "both masters", || {
        holders(&lab) == ["lb1", "lb2"]
    })
    .unwrap();
    // lb2's gratuitous ARP drew the client to it.
    lab.wait_until(Duration::from_secs(1), "client follows lb2", || {
        client_arp_for_vip(&lab) == lab.host("lb2").mac_string()
    })
    .unwrap();
    lab.exec("lb2", &["nft", "delete table inet cut"]).unwrap();
    let healed = Instant::now();
    lab.wait_until(
        Duration::from_secs(1),
        "one master, the client on it",
        || holders(&lab) == ["lb1"] && client_arp_for_vip(&lab) == lab.host("lb1").mac_string(),
    )
    .unwrap();
    let took = healed.elapsed();
    eprintln!(
        "measured: partition healed -> one master and the client's ARP on it after {:.0} ms (interval 100 ms)",
        took.as_secs_f64() * 1000.0
    );
    assert!(took < Duration::from_millis(300), "{took:?}");
    assert!(lb2.log().contains("VRRP master -> backup"), "{}", lb2.log());
}

#[test]
fn status_and_logs_show_the_vrrp_state() {
    let (lab, _apis, lb1, _lb2) = pair(
        &Vrrp {
            priority: 150,
            ..DEFAULT
        },
        &DEFAULT,
    );
    wait_for_single_holder(&lab, "lb1", Duration::from_secs(3));
    std::thread::sleep(Duration::from_millis(300));
    let status = vrrp_status(&lab, "lb1");
    assert_eq!(status["state"], "master");
    assert_eq!(status["vrid"], 51);
    assert_eq!(status["version"], 3);
    assert_eq!(status["mode"], "multicast");
    assert_eq!(status["advert_interval_ms"], 100);
    assert!(status["transitions"].as_u64().unwrap() >= 2, "{status}");
    assert!(status["adverts_sent"].as_u64().unwrap() >= 2, "{status}");
    let backup = vrrp_status(&lab, "lb2");
    assert!(
        backup["adverts_received"].as_u64().unwrap() >= 2,
        "{backup}"
    );
    assert_eq!(
        backup["checksum_pseudo_header"], backup["adverts_received"],
        "we send keepalived's checksum form"
    );
    let table = lab
        .exec("lb2", &[bin_path("ha-user").to_str().unwrap(), "status"])
        .unwrap();
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains("VRRP v3 vrid 51: backup")
            && table.contains(&format!("master {}", lab.host("lb1").addr)),
        "{table}"
    );
    assert!(
        table.contains(&format!(
            "owner vrrp backup (master {})",
            lab.host("lb1").addr
        )),
        "{table}"
    );
    assert!(lb1.log().contains("VRRP backup -> master"), "{}", lb1.log());
}

#[test]
fn unicast_adverts_from_unknown_sources_are_dropped_and_counted() {
    let lab = Lab::new(&HOSTS).unwrap();
    let _apis = start_apiservers(&lab, &["api1"]);
    // lb1 expects only lb2; "client" sends it an advert with a higher priority.
    let _lb1 = start_agent(
        &lab,
        "lb1",
        &config(
            &lab,
            "lb1",
            &Vrrp {
                unicast: true,
                ..DEFAULT
            },
        ),
        &[],
    );
    wait_for_single_holder(&lab, "lb1", Duration::from_secs(3));
    let lb1_addr = lab.host("lb1").addr;
    let client_addr = lab.host("client").addr;
    lab.in_host("client", || {
        let socket = socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::RAW,
            Some(socket2::Protocol::from(112)),
        )
        .unwrap();
        socket.set_ttl_v4(255).unwrap();
        let advert = ha_user::vrrp::packet::Advert {
            version: ha_user::config::VrrpVersion::V3,
            vrid: 51,
            priority: 254,
            interval_cs: 10,
            addresses: vec![lab.vip(0)],
        };
        let bytes = advert.encode(
            client_addr,
            lb1_addr,
            ha_user::vrrp::packet::ChecksumMode::PseudoHeader,
        );
        for _ in 0..5 {
            socket
                .send_to(&bytes, &std::net::SocketAddrV4::new(lb1_addr, 0).into())
                .unwrap();
        }
    })
    .unwrap();
    lab.wait_until(Duration::from_secs(2), "drops counted", || {
        vrrp_status(&lab, "lb1")["dropped_unknown_source"] == 5
    })
    .unwrap();
    assert_eq!(
        vrrp_status(&lab, "lb1")["state"],
        "master",
        "an unknown source cannot take the VIP"
    );
}

fn tshark_decodes_adverts(lab: &Lab, host: &str) -> String {
    let out = lab
        .command(host, "tshark")
        .args([
            "-i",
            HOST_IFACE,
            "-f",
            "ip proto 112",
            "-a",
            "duration:2",
            "-V",
            "-o",
            "vrrp.v3_checksum_as_in_v2:FALSE",
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).to_string()
}

#[test]
fn tshark_decodes_our_adverts_without_warnings() {
    let (lab, _apis, _lb1, _lb2) = pair(
        &Vrrp {
            priority: 150,
            ..DEFAULT
        },
        &DEFAULT,
    );
    wait_for_single_holder(&lab, "lb1", Duration::from_secs(3));
    let decoded = tshark_decodes_adverts(&lab, "client");
    assert!(
        decoded.contains("Virtual Router Redundancy Protocol"),
        "{decoded}"
    );
    assert!(
        decoded.contains("VRRP protocol version: 3")
            && decoded.contains("Virtual Rtr ID: 51")
            && decoded.contains("Priority: 150"),
        "{decoded}"
    );
    assert!(decoded.contains("[Checksum Status: Good]"), "{decoded}");
    assert!(
        !decoded.contains("Malformed") && !decoded.contains("Bad"),
        "{decoded}"
    );
}

/// keepalived as the other LB: `version`, unicast to the agent.
fn keepalived(lab: &Lab, lb: &str, priority: u8, version: u8) -> LabProcess {
    let interval = if version == 3 { "0.1" } else { "1" };
    lab.start_keepalived(lb, other(lb), priority, version, interval)
        .unwrap()
}

fn assert_keepalived_content(log: &str) {
    for complaint in [
        "checksum",
        "interval mismatch",
        "Invalid",
        "invalid",
        "ttl",
        "wrong",
    ] {
        let bad: Vec<&str> = log.lines().filter(|l| l.contains(complaint)).collect();
        assert!(
            bad.is_empty(),
            "keepalived complained ({complaint}): {bad:?}\n{log}"
        );
    }
}

fn interop(version: u8) {
    let lab = Lab::new(&HOSTS).unwrap();
    let _apis = start_apiservers(&lab, &["api1", "api2", "api3"]);
    let interval = if version == 3 {
        Duration::from_millis(100)
    } else {
        Duration::from_secs(1)
    };
    let settle = if version == 3 {
        Duration::from_secs(3)
    } else {
        Duration::from_secs(8)
    };
    let agent_vrrp = |priority| Vrrp {
        priority,
        version,
        interval,
        unicast: true,
        preempt_delay: Duration::ZERO,
    };

    // The agent outranks keepalived: agent master, keepalived backup.
    let mut agent = start_agent(&lab, "lb1", &config(&lab, "lb1", &agent_vrrp(150)), &[]);
    let mut kept = keepalived(&lab, "lb2", 100, version);
    wait_for_single_holder(&lab, "lb1", settle);
    lab.in_host("client", || whoami(lab.vip(0), 6443))
        .unwrap()
        .expect("served by the agent");
    // keepalived, as backup, is silent: the agent hears it once it is master (below).
    // The agent leaves: keepalived takes over.
    agent.stop(Duration::from_secs(5)).unwrap();
    wait_for_single_holder(&lab, "lb2", settle);
    // It returns with the higher priority: it preempts keepalived.
    let agent = start_agent(&lab, "lb1", &config(&lab, "lb1", &agent_vrrp(150)), &[]);
    wait_for_single_holder(&lab, "lb1", settle);
    drop(agent);
    kept.stop(Duration::from_secs(5)).unwrap();
    assert_keepalived_content(&kept.log());

    // keepalived outranks the agent: keepalived master, the agent backup; then the other way round.
    let kept = keepalived(&lab, "lb2", 200, version);
    let _agent = start_agent(&lab, "lb1", &config(&lab, "lb1", &agent_vrrp(100)), &[]);
    wait_for_single_holder(&lab, "lb2", settle);
    // The agent started as backup; it names the master once an advert of
    // keepalived's reached it (one advert interval, longer on a loaded host).
    let _ = lab.wait_until(settle, "the agent names the master", || {
        vrrp_status(&lab, "lb1")["master"].is_string()
    });
    let status = vrrp_status(&lab, "lb1");
    assert_eq!(status["state"], "backup", "{status}");
    assert_eq!(
        status["master"],
        lab.host("lb2").addr.to_string(),
        "{status}"
    );
    if version == 3 {
        assert_eq!(
            status["checksum_pseudo_header"], status["adverts_received"],
            "keepalived's checksum form: {status}"
        );
    }
    kept.signal(Signal::SIGKILL).unwrap();
    // keepalived killed: its VIP stays on lb2, but the agent takes over and announces itself.
    lab.wait_until(settle, "the agent takes over", || holds_vip(&lab, "lb1"))
        .unwrap();
    lab.in_host("client", || whoami(lab.vip(0), 6443))
        .unwrap()
        .expect("served by the agent after keepalived died");
    assert_keepalived_content(&kept.log());
}

#[test]
fn keepalived_interop_version_3_unicast() {
    interop(3);
}

#[test]
fn keepalived_interop_version_2_unicast() {
    interop(2);
}

/// Makes `lb`'s own health checks fail (its kernel's packets to port 6443
/// are dropped) without touching the traffic it load-balances, which XDP
/// sends before netfilter sees it.
fn break_checks(lab: &Lab, lb: &str, broken: bool) {
    if broken {
        lab.exec(lb, &["nft", "add table inet checks; add chain inet checks out { type filter hook output priority 0; }; add rule inet checks out tcp dport 6443 drop"]).unwrap();
    } else {
        lab.exec(lb, &["nft", "delete table inet checks"]).unwrap();
    }
}

#[test]
fn an_lb_that_alone_sees_its_backends_down_yields_by_priority_or_fault() {
    for (track, lowered_state) in [
        (TrackAction::Decrease(100), "backup"),
        (TrackAction::Fault, "fault"),
    ] {
        let lab = Lab::new(&HOSTS).unwrap();
        let _apis = start_apiservers(&lab, &["api1", "api2", "api3"]);
        let fast_checks = |lb| {
            let mut conf = agent_config(
                &lab,
                &Vrrp {
                    priority: if lb == "lb1" { 150 } else { 100 },
                    ..DEFAULT
                },
            );
            conf.vrrp.as_mut().unwrap().track.no_healthy_backend = track;
            // Quick checks so the test is quick: out after 3 x 50 ms.
            let check = &mut conf.vips[0].check;
            check.interval = Duration::from_millis(100);
            check.fast_interval = Duration::from_millis(50);
            check.timeout = Duration::from_millis(100);
            write_config(&lab, &format!("{lb}.yaml"), &conf)
        };
        let lb1 = start_agent(&lab, "lb1", &fast_checks("lb1"), &[]);
        let _lb2 = start_agent(&lab, "lb2", &fast_checks("lb2"), &[]);
        wait_for_single_holder(&lab, "lb1", Duration::from_secs(3));
        break_checks(&lab, "lb1", true);
        wait_for_single_holder(&lab, "lb2", Duration::from_secs(3));
        let status = vrrp_status(&lab, "lb1");
        assert_eq!(status["state"], lowered_state, "track {track}: {status}");
        if lowered_state == "backup" {
            assert_eq!(status["priority"], 50, "150 - 100: {status}");
        }
        assert!(lb1.log().contains("VRRP tracking changed"), "{}", lb1.log());
        // Its checks pass again: it outranks lb2 again and takes the VIP back.
        break_checks(&lab, "lb1", false);
        wait_for_single_holder(&lab, "lb1", Duration::from_secs(3));
        assert_eq!(vrrp_status(&lab, "lb1")["priority"], 150);
    }
}

/// The stacked layout: each LB host is also a master with its own apiserver
/// among the backends. With `track.local_backend_down`, the VIP leaves a
/// master whose own apiserver dies, though the other backends are up, and
/// comes back by preemption when it is back (docs/vrrp.md, "Tracking").
/// `fault` hands over at once (a priority-0 advert: the backup's skew
/// time); `decrease` as RFC 9568 says (the backup lets its
/// Master_Down_Interval run out).
#[test]
fn the_vip_leaves_a_master_whose_own_apiserver_dies_and_comes_back() {
    for track in [TrackAction::Fault, TrackAction::Decrease(60)] {
        let lab = Lab::new(&HOSTS).unwrap();
        let _api1 = start_apiservers(&lab, &["api1"]);
        let local = |lb: &str| lab.start_standin(lb, &[]).unwrap();
        let (lb1_api, _lb2_api) = (local("lb1"), local("lb2"));
        let stacked = |lb: &str| {
            let mut conf = agent_config(
                &lab,
                &Vrrp {
                    priority: if lb == "lb1" { 150 } else { 100 },
                    ..DEFAULT
                },
            );
            conf.vips[0] = common::apiserver_vip(&lab, &["lb1", "lb2", "api1"]);
            let check = &mut conf.vips[0].check;
            check.interval = Duration::from_millis(100);
            check.fast_interval = Duration::from_millis(50);
            check.timeout = Duration::from_millis(100);
            conf.vrrp.as_mut().unwrap().track.local_backend_down = Some(track);
            write_config(&lab, &format!("{lb}.yaml"), &conf)
        };
        let lb1 = start_agent(&lab, "lb1", &stacked("lb1"), &[]);
        let _lb2 = start_agent(&lab, "lb2", &stacked("lb2"), &[]);
        wait_for_single_holder(&lab, "lb1", Duration::from_secs(3));
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(
            holders(&lab),
            ["lb1"],
            "track {track}: lb1 keeps the VIP while its apiserver is up"
        );
        lb1_api.signal(Signal::SIGKILL).unwrap();
        let killed = Instant::now();
        wait_for_single_holder(&lab, "lb2", Duration::from_secs(5));
        let moved = killed.elapsed();
        eprintln!("track {track}: the VIP left lb1 {moved:?} after its apiserver was killed");
        let status = vrrp_status(&lab, "lb1");
        match track {
            TrackAction::Fault => assert_eq!(status["state"], "fault", "{status}"),
            TrackAction::Decrease(_) => {
                assert_eq!(status["state"], "backup", "{status}");
                assert_eq!(status["priority"], 90, "150 - 60: {status}");
            }
        }
        assert!(
            lb1.log().contains("local_backend_down=true"),
            "{}",
            lb1.log()
        );
        // lb1's apiserver is back: it outranks lb2 again and preempts.
        let _lb1_api = local("lb1");
        wait_for_single_holder(&lab, "lb1", Duration::from_secs(5));
        assert_eq!(vrrp_status(&lab, "lb1")["priority"], 150);
        drop(lb1_api);
    }
}

#[test]
fn every_lb_seeing_every_backend_down_still_serves_the_vip_by_default() {
    let (lab, apis, _lb1, _lb2) = pair(
        &Vrrp {
            priority: 150,
            ..DEFAULT
        },
        &DEFAULT,
    );
    wait_for_single_holder(&lab, "lb1", Duration::from_secs(3));
    for api in &apis {
        api.signal(Signal::SIGUSR1).unwrap(); // every /readyz fails
    }
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        holders(&lab),
        ["lb1"],
        "the VIP stays up (decrease, not fault, by default)"
    );
    assert_eq!(vrrp_status(&lab, "lb1")["priority"], 100);
    lab.in_host("client", || whoami(lab.vip(0), 6443))
        .unwrap()
        .expect("failing open through the master");
}

#[test]
fn a_detached_xdp_program_puts_the_lb_in_fault() {
    let (lab, _apis, lb1, _lb2) = pair(
        &Vrrp {
            priority: 150,
            ..DEFAULT
        },
        &DEFAULT,
    );
    wait_for_single_holder(&lab, "lb1", Duration::from_secs(3));
    assert_eq!(telemetry(&lab, "lb1", "/readyz").0, 200);
    // Someone detaches the program behind the agent's back: `ip link set xdp
    // off` cannot (a bpf_link attachment refuses it), `bpftool link detach` can.
    let link = String::from_utf8(
        lab.exec("lb1", &["ip", "-d", "link", "show", HOST_IFACE])
            .unwrap()
            .stdout,
    )
    .unwrap();
    let prog_id: u64 = link
        .split("prog/xdp id ")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let links: serde_json::Value = serde_json::from_slice(
        &lab.exec("lb1", &["bpftool", "-j", "link", "show"])
            .unwrap()
            .stdout,
    )
    .unwrap();
    let link_id = links
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["prog_id"] == prog_id)
        .map(|l| l["id"].to_string())
        .expect("the agent's XDP link");
    lab.exec("lb1", &["bpftool", "link", "detach", "id", &link_id])
        .unwrap();
    wait_for_single_holder(&lab, "lb2", Duration::from_secs(3));
    assert_eq!(vrrp_status(&lab, "lb1")["state"], "fault");
    assert!(lb1.log().contains("xdp_attached=false"), "{}", lb1.log());
    let (code, reasons) = telemetry(&lab, "lb1", "/readyz");
    assert_eq!(code, 503, "{reasons}");
    assert!(
        reasons.contains("the XDP program is no longer attached to eth0")
            && reasons.contains("VRRP is in fault"),
        "{reasons}"
    );
    assert_eq!(telemetry(&lab, "lb1", "/livez").0, 200);
}
