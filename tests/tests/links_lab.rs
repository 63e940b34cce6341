//! The links real networks have (docs/design.md, "Fragments, VLANs, generic
//! mode, jumbo frames"): a data path that says when it is not working (with
//! the agent on a plain veth, whose peer runs no XDP program, the frames XDP
//! sends never reach the wire; the agent must say so in /readyz, the metrics
//! and its log, naming the remedy, instead of reporting ready while every
//! connection times out); a VLAN device and generic mode refused at start
//! with what to do; jumbo frames served in native mode.

mod common;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use common::{
    DOWNLOAD, download, host_state, start_agent, start_apiservers, start_file_vip, status_json,
    telemetry, vip_config, whoami, write_config,
};
use ha_lab::Lab;

const BACKENDS: [&str; 3] = ["api1", "api2", "api3"];

#[test]
fn an_agent_on_a_plain_veth_reports_the_black_hole_within_10_s() {
    let mut lab = Lab::new(&["client", "lb", "api1", "api2", "api3"]).unwrap();
    let _apis = start_apiservers(&lab, &BACKENDS);
    let config = write_config(&lab, "config.yaml", &vip_config(&lab, &BACKENDS));
    let agent = start_agent(&lab, "lb", &config, &[]);
    let vip = lab.vip(0);
    // Ready, and serving, on a link that behaves like a wire.
    lab.wait_until(Duration::from_secs(10), "ready", || {
        telemetry(&lab, "lb", "/readyz").0 == 200
    })
    .unwrap();
    lab.in_host("client", || whoami(vip, 6443))
        .unwrap()
        .expect("a connection through the VIP on the lab's wire-like link");

    // Now a container's link: the agent's veth peer runs no XDP program,
    // and the client keeps the kernel's default checksum offload (its
    // frames carry checksums that were never completed). Without the
    // offload the frames would only wait in the peer's queue, and late
    // answers would come back whenever other traffic flushes it.
    lab.remove_switch_xdp("lb").unwrap();
    lab.exec("client", &["ethtool", "-K", "eth0", "tx", "on"])
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let first_attempt = Instant::now();
    let (answered, found_after, body, metrics) = std::thread::scope(|scope| {
        let clients = scope.spawn(|| {
            lab.in_host("client", || {
                let mut answered = 0;
                while !stop.load(Ordering::Relaxed) {
                    if whoami(vip, 6443).is_ok() {
                        answered += 1;
                    }
                }
                answered
            })
            .unwrap()
        });
        let mut found = None;
        while first_attempt.elapsed() < Duration::from_secs(20) {
            let (code, body) = telemetry(&lab, "lb", "/readyz");
            if code == 503 && body.contains("not answered") {
                found = Some((first_attempt.elapsed(), body));
                break;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        let metrics = telemetry(&lab, "lb", "/metrics").1;
        eprintln!(
            "verdicts at the end: {}",
            common::status_json(&lab, "lb")["verdicts"]
        );
        stop.store(true, Ordering::Relaxed);
        let answered = clients.join().unwrap();
        let (after, body) = found.unwrap_or_else(|| (first_attempt.elapsed(), String::new()));
        (answered, after, body, metrics)
    });
    eprintln!(
        "measured: on a plain veth, {answered} connections answered; /readyz said 503 {found_after:?} \
         after the first unanswered connection: {body}"
    );
    assert!(
        body.contains("not answered"),
        "/readyz never named the black hole within 20 s"
    );
    assert!(
        found_after <= Duration::from_secs(10),
        "found only after {found_after:?}"
    );
    assert!(
        body.contains("eth0 is a veth") && body.contains("XDP program to the peer"),
        "the remedy for veth is named: {body}"
    );
    assert!(
        metrics.lines().any(|l| l == "ha_lb_data_path_unanswered 1"),
        "{metrics}"
    );
    assert!(
        agent.log().contains("the data path is not answered"),
        "the log says so"
    );
}

/// `ha-user attach` as an operator would run it; its exit status and stderr.
fn attach(lab: &Lab, iface: &str, config: &std::path::Path, extra: &[&str]) -> (bool, String) {
    let mut command = lab.command("lb", ha_lab::bin_path("ha-user"));
    command
        .args(["attach", "--iface", iface, "--config"])
        .arg(config)
        .args(extra);
    let out = command.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_vlan_device_and_generic_mode_are_refused_at_start_with_what_to_do() {
    let lab = Lab::new(&["client", "lb", "api1", "api2", "api3"]).unwrap();
    let lb = lab.host("lb").addr.octets();
    let config = write_config(&lab, "config.yaml", &vip_config(&lab, &BACKENDS));
    // Some kernels (this project's CI VM among them) are built without
    // 802.1Q: then the refusal is covered by ha-user's unit test
    // (`system::check_attach_kind`) and this part says why it did not run.
    let vlan = lab.exec(
        "lb",
        &[
            "ip", "link", "add", "link", "eth0", "name", "eth0.100", "type", "vlan", "id", "100",
        ],
    );
    match vlan {
        Ok(_) => {
            let vlan_addr = format!("10.203.{}.2/24", lb[2]);
            lab.exec("lb", &["ip", "addr", "add", &vlan_addr, "dev", "eth0.100"])
                .unwrap();
            lab.exec("lb", &["ip", "link", "set", "eth0.100", "up"])
                .unwrap();
            let before = host_state(&lab, "lb");
            let (ok, stderr) = attach(&lab, "eth0.100", &config, &[]);
            eprintln!("measured: attach to a VLAN device: {stderr}");
            assert!(!ok, "attach to a VLAN device must fail");
            assert!(
                stderr.contains("eth0.100 is a VLAN device")
                    && stderr.contains("untagged interface"),
                "{stderr}"
            );
            assert_eq!(
                host_state(&lab, "lb"),
                before,
                "nothing on the host changed"
            );
        }
        Err(e) => eprintln!("this kernel cannot create a VLAN device ({e}): that part did not run"),
    }
    let before = host_state(&lab, "lb");
    let (ok, stderr) = attach(&lab, "eth0", &config, &["--xdp-mode", "generic"]);
    eprintln!("measured: attach in generic mode: {stderr}");
    assert!(!ok, "generic mode must be refused");
    assert!(
        stderr.contains("generic (skb) XDP is not supported") && stderr.contains("natively"),
        "{stderr}"
    );
    assert_eq!(
        host_state(&lab, "lb"),
        before,
        "nothing on the host changed"
    );
}

/// A LAN with a 9,000-byte MTU: the program attaches in native mode (it is
/// multi-buffer aware; a program that is not is refused by veth above a
/// page) and jumbo frames pass through the VIP both ways.
#[test]
fn jumbo_frames_are_served_in_native_mode() {
    let lab = Lab::new(&["client", "lb", "api1", "api2", "api3"]).unwrap();
    lab.set_mtu(9000).unwrap();
    let (_servers, _agent) = start_file_vip(&lab, &BACKENDS);
    let before = status_json(&lab, "lb");
    let sizes: Vec<String> = (0..3).map(|_| download(&lab, "client")).collect();
    let after = status_json(&lab, "lb");
    let reply = |s: &serde_json::Value| s["verdicts"]["reply_tx"].as_u64().unwrap_or(0);
    let replies = reply(&after) - reply(&before);
    eprintln!(
        "measured: MTU 9000, mode {}: downloads {sizes:?}, {replies} replies",
        after["xdp_mode"]
    );
    assert_eq!(after["xdp_mode"], "native");
    assert!(
        sizes.iter().all(|s| *s == DOWNLOAD.to_string()),
        "downloads: {sizes:?}"
    );
    // 3 x 2 MiB in 9,000-byte frames is about 700 replies; in 1,500-byte
    // frames it would be about 4,300.
    assert!(
        replies < 2000,
        "{replies} replies: the frames were not jumbo"
    );
}

/// Forwarding switched off behind the agent's back: `bpf_fib_lookup` then
/// refuses every forwarded packet. Counted by its own verdict and a
/// readiness failure that says what to do; switched back on, all is well.
#[test]
fn forwarding_switched_off_is_counted_and_makes_the_agent_unready() {
    let lab = Lab::new(&["client", "lb", "api1", "api2", "api3"]).unwrap();
    let _apis = start_apiservers(&lab, &BACKENDS);
    let config = write_config(&lab, "config.yaml", &vip_config(&lab, &BACKENDS));
    let _agent = start_agent(&lab, "lb", &config, &[]);
    let vip = lab.vip(0);
    lab.wait_until(Duration::from_secs(10), "ready", || {
        telemetry(&lab, "lb", "/readyz").0 == 200
    })
    .unwrap();
    let sysctl = |value: &str| {
        lab.exec(
            "lb",
            &[
                "sysctl",
                "-qw",
                &format!("net.ipv4.conf.eth0.forwarding={value}"),
            ],
        )
        .unwrap();
    };
    sysctl("0");
    let before = status_json(&lab, "lb");
    let refused = lab.in_host("client", || whoami(vip, 6443)).unwrap();
    let after = status_json(&lab, "lb");
    let (code, body) = telemetry(&lab, "lb", "/readyz");
    let dropped = |s: &serde_json::Value| {
        s["verdicts"]["drop_forwarding_disabled"]
            .as_u64()
            .unwrap_or(0)
    };
    eprintln!(
        "measured: forwarding off: connection {refused:?}, drop_forwarding_disabled {}, /readyz {code} {body}",
        dropped(&after) - dropped(&before)
    );
    assert!(refused.is_err());
    assert!(dropped(&after) > dropped(&before));
    assert_eq!(code, 503);
    assert!(body.contains("IPv4 forwarding is off on eth0"), "{body}");
    sysctl("1");
    assert_eq!(telemetry(&lab, "lb", "/readyz").0, 200);
    lab.in_host("client", || whoami(vip, 6443))
        .unwrap()
        .expect("served again");
}
