//! The load balancer end to end in the lab: a client, an LB running the real
//! agent (`ha-user attach`), and stand-in apiservers, with real TCP through
//! the VIP.

mod common;

use std::{
    collections::HashMap,
    io::{BufRead, BufReader, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    time::Duration,
};

use common::{
    Session, apiserver_vip, host_state, start_agent, start_apiservers, vip_config, whoami,
    write_config, write_file,
};
use ha_lab::{
    HOST_IFACE, Lab, bin_path,
    config::{self, VipExt},
};
use ha_user::config::PortRange;
use nix::sys::signal::Signal;

const HOSTS: [&str; 6] = ["client", "lb", "api1", "api2", "api3", "api4"];

#[test]
fn a_thousand_connections_spread_by_weight_and_backends_see_the_lb_address() {
    let lab = Lab::new(&HOSTS[..5]).unwrap();
    let _apis = start_apiservers(&lab, &["api1", "api2", "api3"]);
    let conf = config::agent([
        apiserver_vip(&lab, &["api1", "api2", "api3"]).weight(lab.host("api3").addr, 2)
    ]);
    let config = write_config(&lab, "config.yaml", &conf);
    let _agent = start_agent(&lab, "lb", &config, &[]);
    let vip = lab.vip(0);
    let lb = lab.host("lb").addr.to_string();

    const CONNECTIONS: usize = 1000;
    let served: Vec<(String, String)> = lab
        .in_host("client", || {
            (0..CONNECTIONS)
                .map(|i| whoami(vip, 6443).unwrap_or_else(|e| panic!("connection {i}: {e}")))
                .collect()
        })
        .unwrap();
    let mut per_backend: HashMap<&str, usize> = HashMap::new();
    for (name, client) in &served {
        *per_backend.entry(name.as_str()).or_default() += 1;
        let seen = client.rsplit_once(':').unwrap().0;
        assert_eq!(
            seen, lb,
            "full NAT: the backend sees the LB's address, not the client's"
        );
    }
    for (name, weight) in [("api1", 1.0), ("api2", 1.0), ("api3", 2.0)] {
        let expected = CONNECTIONS as f64 * weight / 4.0;
        let got = *per_backend.get(name).unwrap_or(&0) as f64;
        assert!(
            (got - expected).abs() <= 0.15 * expected,
            "{name}: {got} connections, expected {expected} +-15% ({per_backend:?})"
        );
    }
}

/// Connects from a fixed source port and closes with RST (SO_LINGER 0), so
/// the same 5-tuple can be used again at once (no TIME_WAIT).
fn whoami_from_port(vip: Ipv4Addr, source_port: u16) -> String {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_reuse_address(true).unwrap();
    socket
        .bind(&SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, source_port)).into())
        .unwrap();
    socket
        .connect_timeout(
            &SocketAddr::from((vip, 6443)).into(),
            Duration::from_secs(2),
        )
        .unwrap();
    socket.set_linger(Some(Duration::ZERO)).unwrap();
    let stream: TcpStream = socket.into();
    stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    (&stream).write_all(b"whoami\n").unwrap();
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line).unwrap();
    line.split_whitespace().next().unwrap().to_string()
}

#[test]
fn a_fixed_five_tuple_always_reaches_the_same_backend() {
    let lab = Lab::new(&HOSTS[..5]).unwrap();
    let _apis = start_apiservers(&lab, &["api1", "api2", "api3"]);
    let config = write_config(
        &lab,
        "config.yaml",
        &vip_config(&lab, &["api1", "api2", "api3"]),
    );
    let _agent = start_agent(&lab, "lb", &config, &[]);
    let vip = lab.vip(0);
    let backends_by_port: Vec<Vec<String>> = lab
        .in_host("client", || {
            (0..12u16)
                .map(|p| (0..5).map(|_| whoami_from_port(vip, 41000 + p)).collect())
                .collect()
        })
        .unwrap();
    for (p, backends) in backends_by_port.iter().enumerate() {
        assert!(
            backends.iter().all(|b| b == &backends[0]),
            "source port {}: {backends:?}",
            41000 + p
        );
    }
    let distinct: std::collections::HashSet<&String> =
        backends_by_port.iter().map(|b| &b[0]).collect();
    assert!(
        distinct.len() > 1,
        "12 source ports all hashed to one backend: {distinct:?}"
    );
}

#[test]
fn a_long_lived_connection_keeps_its_backend_while_a_fourth_backend_is_added() {
    let lab = Lab::new(&HOSTS).unwrap();
    let _apis = start_apiservers(&lab, &["api1", "api2", "api3", "api4"]);
    let config = write_config(
        &lab,
        "config.yaml",
        &vip_config(&lab, &["api1", "api2", "api3"]),
    );
    let mut agent = start_agent(&lab, "lb", &config, &[]);
    let vip = lab.vip(0);

    let after_reload = lab
        .in_host("client", || {
            let mut session = Session::open(vip);
            let mut exchange = |text: &str| session.exchange(text);
            let first = exchange("whoami");
            for i in 0..20 {
                assert_eq!(exchange(&format!("before {i}")), format!("before {i}\n"));
            }
            std::fs::write(
                &config,
                vip_config(&lab, &["api1", "api2", "api3", "api4"]).to_yaml(),
            )
            .unwrap();
            agent.signal(Signal::SIGHUP).unwrap();
            agent
                .wait_for_log("reload applied", Duration::from_secs(10))
                .unwrap();
            for i in 0..200 {
                assert_eq!(
                    exchange(&format!("after {i}")),
                    format!("after {i}\n"),
                    "the connection broke after the reload"
                );
                std::thread::sleep(Duration::from_millis(2));
            }
            assert_eq!(
                exchange("whoami"),
                first,
                "the connection moved to another backend"
            );
            (0..100)
                .map(|_| whoami(vip, 6443).unwrap().0)
                .collect::<Vec<_>>()
        })
        .unwrap();
    let to_api4 = after_reload.iter().filter(|n| *n == "api4").count();
    assert!(
        (10..=45).contains(&to_api4),
        "new connections reaching api4 after the reload: {to_api4}/100"
    );
    assert!(
        agent.log().contains("Maglev table swapped in"),
        "{}",
        agent.log()
    );
}

#[test]
fn stopping_the_agent_leaves_the_host_as_it_was() {
    let lab = Lab::new(&HOSTS[..5]).unwrap();
    let _apis = start_apiservers(&lab, &["api1", "api2", "api3"]);
    let config = write_config(
        &lab,
        "config.yaml",
        &vip_config(&lab, &["api1", "api2", "api3"]),
    );
    let before = host_state(&lab, "lb");
    let mut agent = start_agent(&lab, "lb", &config, &[]);
    let during = host_state(&lab, "lb");
    assert!(
        during.contains(&format!("{}/32", lab.vip(0))),
        "VIP added:\n{during}"
    );
    assert!(during.contains("xdp attached: true"), "{during}");
    assert!(
        during.contains("managed"),
        "backends' neighbours managed:\n{during}"
    );
    assert!(during.ends_with("forwarding: 1\n"), "{during}");
    lab.in_host("client", || whoami(lab.vip(0), 6443))
        .unwrap()
        .expect("served through the VIP");

    agent.signal(Signal::SIGTERM).unwrap();
    let status = agent
        .wait_timeout(Duration::from_secs(10))
        .unwrap()
        .expect("the agent exits on SIGTERM");
    assert!(status.success(), "{status}\n{}", agent.log());
    assert_eq!(
        host_state(&lab, "lb"),
        before,
        "the agent left changes behind"
    );
}

#[test]
fn an_invalid_config_is_refused_before_the_host_is_touched() {
    let lab = Lab::new(&["lb", "api1"]).unwrap();
    let config = write_file(
        &lab,
        "bad.yaml",
        &format!(
            "vips:\n  - name: api\n    address: {}\n    port: 6443\n    backends: []\n",
            lab.vip(0)
        ),
    );
    let before = host_state(&lab, "lb");
    let output = lab
        .command("lb", bin_path("ha-user"))
        .args([
            "attach",
            "--iface",
            HOST_IFACE,
            "--config",
            config.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("bad.yaml") && stderr.contains("at least one backend"),
        "{stderr}"
    );
    assert_eq!(host_state(&lab, "lb"), before);

    let check = lab
        .command("lb", bin_path("ha-user"))
        .args(["check-config", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!check.status.success());
    assert!(String::from_utf8_lossy(&check.stderr).contains("at least one backend"));
}

#[test]
fn an_unknown_interface_is_named_in_the_error() {
    let lab = Lab::new(&["lb", "api1"]).unwrap();
    let config = write_config(&lab, "config.yaml", &vip_config(&lab, &["api1"]));
    let output = lab
        .command("lb", bin_path("ha-user"))
        .args([
            "attach",
            "--iface",
            "nosuch0",
            "--config",
            config.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("nosuch0"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn a_malformed_config_on_reload_changes_nothing() {
    let lab = Lab::new(&HOSTS[..4]).unwrap();
    let _apis = start_apiservers(&lab, &["api1", "api2"]);
    let config = write_config(&lab, "config.yaml", &vip_config(&lab, &["api1", "api2"]));
    let mut agent = start_agent(&lab, "lb", &config, &[]);
    std::fs::write(&config, "vips: [ {name: broken").unwrap();
    agent.signal(Signal::SIGHUP).unwrap();
    agent
        .wait_for_log("reload rejected", Duration::from_secs(10))
        .unwrap();
    let served: Vec<String> = lab
        .in_host("client", || {
            (0..20)
                .map(|_| whoami(lab.vip(0), 6443).unwrap().0)
                .collect()
        })
        .unwrap();
    assert!(
        served.iter().all(|n| n == "api1" || n == "api2"),
        "{served:?}"
    );
}

#[test]
fn an_established_connection_survives_an_agent_restart_through_the_pinned_tables() {
    let lab = Lab::new(&HOSTS[..5]).unwrap();
    let _apis = start_apiservers(&lab, &["api1", "api2", "api3"]);
    let config = write_config(
        &lab,
        "config.yaml",
        &vip_config(&lab, &["api1", "api2", "api3"]),
    );
    let pins = lab.bpffs().unwrap().join("lb");
    let pin_arg = ["--pin-dir", pins.to_str().unwrap(), "--on-stop", "keep"];
    let mut agent = start_agent(&lab, "lb", &config, &pin_arg);
    let vip = lab.vip(0);
    lab.in_host("client", || {
        let mut session = Session::open(vip);
        let mut exchange = |text: &str| session.exchange(text);
        let first = exchange("whoami");
        agent.stop(Duration::from_secs(10)).unwrap();
        let mut restarted = start_agent(&lab, "lb", &config, &pin_arg);
        assert!(
            restarted.log().contains("adopting the pinned flow tables"),
            "{}",
            restarted.log()
        );
        for i in 0..20 {
            assert_eq!(
                exchange(&format!("after restart {i}")),
                format!("after restart {i}\n")
            );
        }
        // Same backend, and the same NAT source port: the backend's socket is the same one.
        assert_eq!(exchange("whoami"), first);
        restarted.stop(Duration::from_secs(10)).unwrap();
    })
    .unwrap();
}

/// A restart that also moves `nat.port_range` away from an established
/// connection's NAT port: the adopted flow's port stays a live NAT source
/// (seeded from the pinned reverse table), so the backend's replies are still
/// translated, not handed to the host's stack and reset.
#[test]
fn an_established_connection_survives_a_restart_that_moves_the_nat_range() {
    let lab = Lab::new(&HOSTS[..5]).unwrap();
    let _apis = start_apiservers(&lab, &["api1", "api2", "api3"]);
    let conf = vip_config(&lab, &["api1", "api2", "api3"]);
    let config = write_config(&lab, "config.yaml", &conf);
    let pins = lab.bpffs().unwrap().join("lb");
    let pin_arg = ["--pin-dir", pins.to_str().unwrap(), "--on-stop", "keep"];
    let mut agent = start_agent(&lab, "lb", &config, &pin_arg);
    let vip = lab.vip(0);
    lab.in_host("client", || {
        let mut session = Session::open(vip);
        let mut exchange = |text: &str| session.exchange(text);
        let first = exchange("whoami");
        // "<server> <lb address>:<NAT port>"
        let port: u16 = first.trim().rsplit(':').next().unwrap().parse().unwrap();
        let moved = if port < 20000 {
            PortRange {
                min: 20000,
                max: 32767,
            }
        } else {
            PortRange {
                min: 10000,
                max: 19999,
            }
        };
        agent.stop(Duration::from_secs(10)).unwrap();
        let mut moved_conf = conf.clone();
        moved_conf.data_plane.nat.port_range = moved;
        let moved_config = write_config(&lab, "moved.yaml", &moved_conf);
        let mut restarted = start_agent(&lab, "lb", &moved_config, &pin_arg);
        assert!(
            restarted
                .log()
                .contains("adopted flows use this NAT source"),
            "{}",
            restarted.log()
        );
        for i in 0..10 {
            assert_eq!(
                exchange(&format!("after restart {i}")),
                format!("after restart {i}\n"),
                "NAT port {port}, new range {moved}"
            );
        }
        assert_eq!(exchange("whoami"), first, "same backend, same NAT port");
        // New connections take the new range.
        let (_, seen) = whoami(vip, 6443).unwrap();
        let new_port: u16 = seen.rsplit(':').next().unwrap().parse().unwrap();
        assert!(
            (moved.min..=moved.max).contains(&new_port),
            "{new_port} in {moved}"
        );
        restarted.stop(Duration::from_secs(10)).unwrap();
    })
    .unwrap();
}

/// Receives ARP frames on the host's eth0 for `window` (an AF_PACKET socket
/// in that host's namespace: real frames off the wire).
fn capture_arp(window: Duration) -> Vec<Vec<u8>> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    const ETH_P_ARP: u16 = 0x0806;
    // SAFETY: plain socket(2); the fd is owned at once.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, (ETH_P_ARP.to_be()) as i32) };
    assert!(
        fd >= 0,
        "AF_PACKET socket: {}",
        std::io::Error::last_os_error()
    );
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let timeout = libc::timeval {
        tv_sec: 0,
        tv_usec: 100_000,
    };
    // SAFETY: valid pointer and length for SO_RCVTIMEO.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            &timeout as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    let start = std::time::Instant::now();
    let mut frames = Vec::new();
    let mut buf = [0u8; 1514];
    while start.elapsed() < window {
        // SAFETY: buf is valid for its length.
        let n = unsafe {
            libc::recv(
                fd.as_raw_fd(),
                buf.as_mut_ptr() as *mut libc::c_void,
                buf.len(),
                0,
            )
        };
        if n > 0 {
            frames.push(buf[..n as usize].to_vec());
        }
    }
    frames
}

#[test]
fn taking_the_vip_sends_gratuitous_arp_on_the_wire() {
    let lab = Lab::new(&HOSTS[..3]).unwrap();
    let _apis = start_apiservers(&lab, &["api1"]);
    let mut conf = vip_config(&lab, &["api1"]);
    conf.garp.count = 3;
    conf.garp.interval = Duration::from_millis(100);
    let config = write_config(&lab, "config.yaml", &conf);
    let frames = std::thread::scope(|scope| {
        let capture = scope.spawn(|| {
            lab.in_host("client", || capture_arp(Duration::from_secs(3)))
                .unwrap()
        });
        std::thread::sleep(Duration::from_millis(300));
        let _agent = start_agent(&lab, "lb", &config, &[]);
        capture.join().unwrap()
    });
    let expected = ha_user::garp::announcement(lab.host("lb").mac, lab.vip(0)).to_vec();
    let announcements = frames
        .iter()
        .filter(|f| f.len() >= 42 && f[..42] == expected[..])
        .count();
    assert_eq!(
        announcements,
        3,
        "gratuitous ARPs for the VIP seen by the client: {announcements} of {} ARP frames",
        frames.len()
    );
}

#[test]
fn the_debug_switch_logs_new_flows_from_the_xdp_program() {
    let lab = Lab::new(&HOSTS[..3]).unwrap();
    let _apis = start_apiservers(&lab, &["api1"]);
    let mut conf = vip_config(&lab, &["api1"]);
    conf.data_plane.debug = true;
    let config = write_config(&lab, "config.yaml", &conf);
    let agent = start_agent(&lab, "lb", &config, &[]);
    lab.in_host("client", || whoami(lab.vip(0), 6443))
        .unwrap()
        .unwrap();
    lab.wait_until(
        Duration::from_secs(5),
        "the XDP program's debug log line",
        || agent.log().contains("new flow to backend"),
    )
    .unwrap();
}
