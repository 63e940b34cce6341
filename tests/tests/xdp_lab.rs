//! The XDP program attached in native mode to a lab host's veth, with real
//! packets from another host; and the agent binary's attach/detach cycle.

use std::{
    net::{SocketAddr, TcpStream, UdpSocket},
    time::Duration,
};

use ha_common::{ProtoCounter, ProtoIndex};
use ha_lab::{HOST_IFACE, Lab, bin_path};
use ha_user::dataplane::{AttachMode, AttachedMode, DataPlane};
use nix::sys::signal::Signal;

const UDP_PAYLOAD: usize = 100;
const UDP_FRAME: u64 = 14 + 20 + 8 + UDP_PAYLOAD as u64;

fn counts(dataplane: &DataPlane) -> [ProtoCounter; ProtoIndex::COUNT as usize] {
    dataplane.proto_counters().expect("reading counters")
}

#[test]
fn native_xdp_counts_real_packets_sent_by_another_host() {
    let lab = Lab::new(&["client", "lb"]).unwrap();
    let lb = lab.host("lb").addr;
    let mut dataplane = DataPlane::load().expect("loading");
    let mode = lab
        .in_host("lb", || dataplane.attach(HOST_IFACE, AttachMode::Native))
        .unwrap()
        .expect("native attach to a veth");
    assert_eq!(mode, AttachedMode::Native);

    // Resolve ARP first so the counted traffic below is only what we send.
    lab.exec("client", &["ping", "-c", "1", "-W", "1", &lb.to_string()])
        .unwrap();
    let before = counts(&dataplane);

    const DATAGRAMS: u64 = 50;
    const CONNECTS: u64 = 7;
    const PINGS: u64 = 5;
    lab.in_host("client", || {
        let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
        for _ in 0..DATAGRAMS {
            socket.send_to(&[0xab; UDP_PAYLOAD], (lb, 9999)).unwrap();
        }
        for _ in 0..CONNECTS {
            // Nothing listens: each connect is one SYN in, one RST out (not seen by XDP).
            let refused =
                TcpStream::connect_timeout(&SocketAddr::from((lb, 7777)), Duration::from_secs(1));
            assert!(refused.is_err());
        }
    })
    .unwrap();
    lab.exec(
        "client",
        &[
            "ping",
            "-c",
            &PINGS.to_string(),
            "-i",
            "0.05",
            "-W",
            "1",
            &lb.to_string(),
        ],
    )
    .unwrap();

    let delta = |after: &[ProtoCounter], index: ProtoIndex| {
        let (a, b) = (after[index as usize], before[index as usize]);
        (a.packets - b.packets, a.bytes - b.bytes)
    };
    lab.wait_until(Duration::from_secs(5), "all UDP datagrams counted", || {
        delta(&counts(&dataplane), ProtoIndex::Udp).0 >= DATAGRAMS
    })
    .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let after = counts(&dataplane);
    assert_eq!(
        delta(&after, ProtoIndex::Udp),
        (DATAGRAMS, DATAGRAMS * UDP_FRAME),
        "udp"
    );
    assert_eq!(delta(&after, ProtoIndex::Tcp).0, CONNECTS, "tcp SYNs");
    assert_eq!(
        delta(&after, ProtoIndex::Icmp).0,
        PINGS,
        "icmp echo requests"
    );
    assert_eq!(delta(&after, ProtoIndex::Malformed).0, 0, "malformed");

    lab.in_host("lb", || dataplane.detach()).unwrap().unwrap();
    let link = lab.exec("lb", &["ip", "link", "show", HOST_IFACE]).unwrap();
    assert!(
        !String::from_utf8_lossy(&link.stdout).contains("xdp"),
        "detached"
    );
}

fn xdp_attached(lab: &Lab, host: &str) -> bool {
    let link = lab
        .exec(host, &["ip", "-d", "link", "show", HOST_IFACE])
        .unwrap();
    String::from_utf8_lossy(&link.stdout).contains("prog/xdp")
}

#[test]
fn agent_attaches_in_native_mode_and_detaches_on_sigterm() {
    let lab = Lab::new(&["client", "lb"]).unwrap();
    let ha_user = bin_path("ha-user");
    let addresses_before = lab
        .exec("lb", &["ip", "-o", "addr", "show"])
        .unwrap()
        .stdout;
    let mut agent = lab
        .spawn(
            "lb",
            &[
                ha_user.to_str().unwrap(),
                "attach",
                "--iface",
                HOST_IFACE,
                "--xdp-mode",
                "native",
                "--stats-interval",
                "100ms",
            ],
        )
        .unwrap();
    agent
        .wait_for_log("XDP program attached", Duration::from_secs(10))
        .unwrap();
    assert!(agent.log().contains("mode=\"native\""), "{}", agent.log());
    assert!(xdp_attached(&lab, "lb"));

    // Its counter lines move with real traffic.
    let lb = lab.host("lb").addr.to_string();
    lab.exec("client", &["ping", "-c", "3", "-i", "0.05", &lb])
        .unwrap();
    lab.wait_until(
        Duration::from_secs(5),
        "icmp=3 in the agent's counters",
        || agent.log().lines().any(|line| line.contains(" icmp=3/")),
    )
    .unwrap();

    agent.signal(Signal::SIGTERM).unwrap();
    let status = agent
        .wait_timeout(Duration::from_secs(5))
        .unwrap()
        .expect("agent exits on SIGTERM");
    assert!(status.success(), "exit status {status}\n{}", agent.log());
    assert!(!xdp_attached(&lab, "lb"), "XDP left attached after SIGTERM");
    let addresses_after = lab
        .exec("lb", &["ip", "-o", "addr", "show"])
        .unwrap()
        .stdout;
    assert_eq!(
        addresses_before, addresses_after,
        "the agent left the addresses as they were"
    );
}

#[test]
fn agent_fails_clearly_on_an_unknown_interface() {
    let lab = Lab::new(&["lb"]).unwrap();
    let ha_user = bin_path("ha-user");
    let output = lab
        .command("lb", &ha_user)
        .args(["attach", "--iface", "nosuch0"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("nosuch0"),
        "error names the interface: {stderr}"
    );
}
