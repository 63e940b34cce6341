//! Socket-level balancing of the LB host's own connections (issue 16, the
//! stacked control plane): a process on the host that holds the VIP
//! connects to VIP:8443 and reaches the backends on :6443, one of them on
//! the host itself, bound to the node address only. XDP never sees such a
//! connection; without the cgroup programs it is refused (nothing listens
//! on VIP:8443).

mod common;

use std::{
    collections::BTreeMap,
    net::{SocketAddr, TcpStream},
    path::Path,
    time::Duration,
};

use common::{start_apiservers, status_json, whoami, write_config};
use ha_lab::{Lab, LabProcess, config};
use ha_user::config::Config;
use nix::sys::signal::Signal;
use serde_json::Value;

const HOSTS: [&str; 4] = ["lb", "api2", "api3", "client"];
const BACKENDS: [&str; 3] = ["lb", "api2", "api3"];
const VIP_PORT: u16 = 8443;

/// VIP:8443 in front of BACKENDS on :6443.
fn socket_config(lab: &Lab) -> Config {
    let mut vip = config::vip("apiserver", lab.vip(0), VIP_PORT);
    for address in config::addresses(lab, &BACKENDS) {
        let mut backend = config::backend(address);
        backend.port = Some(6443);
        vip.backends.push(backend);
    }
    config::agent([vip])
}

fn wait_checked(lab: &Lab) {
    lab.wait_until(Duration::from_secs(10), "first checks", || {
        status_json(lab, "lb")["vips"][0]["backends"]
            .as_array()
            .unwrap()
            .iter()
            .all(|b| b["checks"].as_u64().unwrap() > 0)
    })
    .unwrap();
}

/// `count` fresh connections to VIP:8443 from `host`: which backend served
/// each (or the error).
fn connect_many(lab: &Lab, host: &str, count: usize) -> Vec<Result<(String, String), String>> {
    let vip = lab.vip(0);
    lab.in_host(host, || {
        (0..count)
            .map(|_| whoami(vip, VIP_PORT).map_err(|e| e.to_string()))
            .collect()
    })
    .unwrap()
}

fn by_backend(results: &[Result<(String, String), String>]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for result in results {
        let key = match result {
            Ok((name, _)) => name.clone(),
            Err(e) => format!("error: {e}"),
        };
        *counts.entry(key).or_insert(0) += 1;
    }
    counts
}

fn socket_lb(lab: &Lab) -> Value {
    status_json(lab, "lb")["socket_lb"].clone()
}

fn counter(status: &Value, name: &str) -> u64 {
    status["events"][name].as_u64().unwrap_or(0)
}

/// The bpf_link id a pin holds (bpftool), `None` when there is no such pin.
fn pinned_link_id(pin: &Path) -> Option<u64> {
    let out = std::process::Command::new("bpftool")
        .args(["-j", "link", "show", "pinned"])
        .arg(pin)
        .output()
        .ok()?;
    let value: Value = serde_json::from_slice(&out.stdout).ok()?;
    value["id"].as_u64()
}

fn link_exists(id: u64) -> bool {
    std::process::Command::new("bpftool")
        .args(["link", "show", "id", &id.to_string()])
        .output()
        .is_ok_and(|out| out.status.success())
}

#[test]
fn host_connections_to_the_vip_reach_live_backends_and_report_the_vip() {
    let lab = Lab::new(&HOSTS).unwrap();
    let apis = start_apiservers(&lab, &BACKENDS);
    let path = write_config(&lab, "config.yaml", &socket_config(&lab));
    let _agent = lab.start_agent("lb", &path, &[]).unwrap();
    wait_checked(&lab);
    let status = socket_lb(&lab);
    assert_eq!(status["attached"], true, "{status}");
    assert_eq!(status["enabled"], true, "{status}");
    // Under `ip netns exec` no cgroup2 mount is visible: the agent mounted one.
    assert_eq!(status["cgroup_source"], "mounted_by_agent", "{status}");
    assert_eq!(status["cgroup_is_root"], true, "{status}");

    let n = 90;
    let results = connect_many(&lab, "lb", n);
    let counts = by_backend(&results);
    eprintln!("measured: {n} connections from the LB host to VIP:{VIP_PORT}: {counts:?}");
    assert!(results.iter().all(Result::is_ok), "{counts:?}");
    for name in BACKENDS {
        let got = counts.get(name).copied().unwrap_or(0);
        assert!(got >= n / 10, "{name} got {got} of {n}: {counts:?}");
    }
    // No NAT: the backend sees the host's own address.
    let lb = lab.host("lb").addr.to_string();
    assert!(
        results
            .iter()
            .flatten()
            .all(|(_, client)| client.starts_with(&lb)),
        "{results:?}"
    );

    // The socket's owner sees the VIP as its peer, not the backend.
    let vip = lab.vip(0);
    let peer = lab
        .in_host("lb", || {
            let stream = TcpStream::connect((vip, VIP_PORT)).unwrap();
            stream.peer_addr().unwrap()
        })
        .unwrap();
    assert_eq!(peer, SocketAddr::from((vip, VIP_PORT)));

    // api2 dies: once its check takes it out, every connection succeeds and none goes to it.
    apis[1].signal(Signal::SIGKILL).unwrap();
    lab.wait_until(Duration::from_secs(10), "api2 down", || {
        status_json(&lab, "lb")["vips"][0]["backends"][1]["state"] == "down"
    })
    .unwrap();
    let results = connect_many(&lab, "lb", n);
    let counts = by_backend(&results);
    eprintln!("measured: after api2 was killed: {counts:?}");
    assert!(results.iter().all(Result::is_ok), "{counts:?}");
    assert!(!counts.contains_key("api2"), "{counts:?}");
    assert!(
        counts.get("lb").copied().unwrap_or(0) >= n / 10,
        "{counts:?}"
    );
    assert!(
        counts.get("api3").copied().unwrap_or(0) >= n / 10,
        "{counts:?}"
    );

    let status = socket_lb(&lab);
    assert!(
        counter(&status, "connect_balanced") > 2 * n as u64,
        "{status}"
    );
    assert!(counter(&status, "peer_restored") >= 1, "{status}");
    assert_eq!(counter(&status, "other_netns"), 0, "{status}");
    let metrics = common::telemetry(&lab, "lb", "/metrics").1;
    assert!(metrics.contains("ha_lb_socket_lb_attached 1"), "{metrics}");
    assert!(
        metrics.contains("ha_lb_socket_lb_events_total{event=\"connect_balanced\"}"),
        "{metrics}"
    );
}

/// Two "masters" on one kernel, each with its agent and the same VIP (as
/// the lab runs them): each balances its own namespace's sockets only.
#[test]
fn each_agent_balances_only_its_own_network_namespace() {
    let lab = Lab::new(&HOSTS).unwrap();
    let _apis = start_apiservers(&lab, &BACKENDS);
    let path = write_config(&lab, "config.yaml", &socket_config(&lab));
    let _agent = lab.start_agent("lb", &path, &[]).unwrap();
    wait_checked(&lab);
    // A second agent on `client` with the same config: both hold the VIP,
    // each in its own namespace, both attached to the root cgroup.
    let _other = lab.start_agent("client", &path, &[]).unwrap();
    let from_lb = connect_many(&lab, "lb", 30);
    let from_client = connect_many(&lab, "client", 30);
    assert!(
        from_lb.iter().all(Result::is_ok),
        "{:?}",
        by_backend(&from_lb)
    );
    assert!(
        from_client.iter().all(Result::is_ok),
        "{:?}",
        by_backend(&from_client)
    );
    let lb_status = socket_lb(&lab);
    let client_status = status_json(&lab, "client")["socket_lb"].clone();
    // Each counted its own 30 (and the other's as another namespace's).
    assert!(counter(&lb_status, "connect_balanced") >= 30, "{lb_status}");
    assert!(
        counter(&client_status, "connect_balanced") >= 30,
        "{client_status}"
    );
    assert!(counter(&lb_status, "other_netns") >= 30, "{lb_status}");
    // The client's sockets were balanced by its own agent: the backends
    // saw the client's address, not a NAT source.
    let client = lab.host("client").addr.to_string();
    assert!(
        from_client
            .iter()
            .flatten()
            .all(|(_, seen)| seen.starts_with(&client)),
        "{from_client:?}"
    );
}

/// Pinned links outlive the agent: `kill -9` leaves host connections
/// balanced, the next agent replaces the links (the old ones go), and
/// release removes them.
#[test]
fn a_restart_keeps_balancing_and_release_removes_the_links() {
    let lab = Lab::new(&HOSTS).unwrap();
    let _apis = start_apiservers(&lab, &BACKENDS);
    let path = write_config(&lab, "config.yaml", &socket_config(&lab));
    let pins = lab.bpffs().unwrap().join("lb");
    let pins_arg = pins.to_str().unwrap().to_string();
    let args = ["--pin-dir", pins_arg.as_str()];
    let mut agent: LabProcess = lab.start_agent("lb", &path, &args).unwrap();
    wait_checked(&lab);
    let connect_pin = pins.join("sock_connect4");
    let first = pinned_link_id(&connect_pin).expect("the connect4 link is pinned");
    assert!(connect_many(&lab, "lb", 20).iter().all(Result::is_ok));

    agent.signal(Signal::SIGKILL).unwrap();
    agent.wait_timeout(Duration::from_secs(5)).unwrap();
    let results = connect_many(&lab, "lb", 30);
    assert!(
        results.iter().all(Result::is_ok),
        "without an agent: {:?}",
        by_backend(&results)
    );

    let mut agent = lab.start_agent("lb", &path, &args).unwrap();
    assert!(
        agent.log().contains("adopting the pinned flow tables"),
        "{}",
        agent.log()
    );
    let second = pinned_link_id(&connect_pin).expect("the new connect4 link is pinned");
    assert_ne!(first, second);
    assert!(
        !link_exists(first),
        "the old agent's link {first} is still there"
    );
    let results = connect_many(&lab, "lb", 30);
    assert!(
        results.iter().all(Result::is_ok),
        "{:?}",
        by_backend(&results)
    );
    assert!(counter(&socket_lb(&lab), "connect_balanced") >= 30);

    // SIGTERM with the default intent (release): links and pins are gone,
    // and with them the balancing (the VIP address went too).
    agent.stop(Duration::from_secs(10)).unwrap();
    assert!(!connect_pin.exists());
    assert!(
        !link_exists(second),
        "link {second} still there after release"
    );
    let vip = lab.vip(0);
    let after = lab
        .in_host("lb", || {
            TcpStream::connect_timeout(
                &SocketAddr::from((vip, VIP_PORT)),
                Duration::from_millis(500),
            )
            .is_ok()
        })
        .unwrap();
    assert!(!after, "a connection to the VIP succeeded after release");
}

/// A UDP echo that answers each datagram with its host's name, until `stop`.
fn udp_name_server(
    lab: &Lab,
    host: &str,
    ready: std::sync::mpsc::Sender<()>,
    stop: &std::sync::atomic::AtomicBool,
) {
    let address = SocketAddr::from((lab.host(host).addr, 5300));
    lab.in_host(host, || {
        let socket = std::net::UdpSocket::bind(address).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        ready.send(()).unwrap();
        let mut buf = [0u8; 64];
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            if let Ok((_, from)) = socket.recv_from(&mut buf) {
                let _ = socket.send_to(host.as_bytes(), from);
            }
        }
    })
    .unwrap();
}

/// UDP: an unconnected socket's datagrams to VIP:5353 go to a backend's
/// :5300 and the answers come from the VIP (sendmsg4, recvmsg4); a
/// connected socket reports the VIP as its peer.
#[test]
fn host_udp_to_the_vip_is_balanced_and_answered_from_the_vip() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let lab = Lab::new(&HOSTS).unwrap();
    let udp_backends = ["api2", "api3"];
    let _apis = start_apiservers(&lab, &udp_backends);
    let vip = lab.vip(0);
    let mut dns = config::vip("dns", vip, 5353);
    dns.protocol = ha_user::config::Protocol::Udp;
    dns.check = ha_user::config::CheckConfig {
        kind: Some(ha_user::config::CheckKind::Tcp),
        port: Some(6443),
        ..ha_user::config::CheckConfig::default()
    };
    for address in config::addresses(&lab, &udp_backends) {
        let mut backend = config::backend(address);
        backend.port = Some(5300);
        dns.backends.push(backend);
    }
    let path = write_config(&lab, "config.yaml", &config::agent([dns]));
    let _agent = lab.start_agent("lb", &path, &[]).unwrap();
    wait_checked(&lab);
    let stop = AtomicBool::new(false);
    let (names, connected_peer) = std::thread::scope(|scope| {
        let (ready_tx, ready) = std::sync::mpsc::channel();
        for host in udp_backends {
            let (lab, stop, ready_tx) = (&lab, &stop, ready_tx.clone());
            scope.spawn(move || udp_name_server(lab, host, ready_tx, stop));
        }
        for _ in udp_backends {
            ready.recv_timeout(Duration::from_secs(5)).unwrap();
        }
        let result = lab
            .in_host("lb", || {
                let to = SocketAddr::from((vip, 5353));
                let mut names = Vec::new();
                for _ in 0..40 {
                    let socket = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
                    socket
                        .set_read_timeout(Some(Duration::from_secs(2)))
                        .unwrap();
                    socket.send_to(b"name?", to).unwrap();
                    let mut buf = [0u8; 64];
                    let (n, from) = socket.recv_from(&mut buf).unwrap();
                    names.push((String::from_utf8_lossy(&buf[..n]).into_owned(), from));
                }
                let connected = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
                connected
                    .set_read_timeout(Some(Duration::from_secs(2)))
                    .unwrap();
                connected.connect(to).unwrap();
                connected.send(b"name?").unwrap();
                let mut buf = [0u8; 64];
                let n = connected.recv(&mut buf).unwrap();
                assert!(n > 0);
                (names, connected.peer_addr().unwrap())
            })
            .unwrap();
        stop.store(true, Ordering::Relaxed);
        result
    });
    let to = SocketAddr::from((vip, 5353));
    assert!(names.iter().all(|(_, from)| *from == to), "{names:?}");
    for host in udp_backends {
        let got = names.iter().filter(|(name, _)| name == host).count();
        assert!(got >= 4, "{host} answered {got} of 40: {names:?}");
    }
    assert_eq!(connected_peer, to);
    let status = socket_lb(&lab);
    assert!(counter(&status, "sendmsg_balanced") >= 40, "{status}");
    assert!(counter(&status, "source_restored") >= 40, "{status}");
    assert!(counter(&status, "connect_balanced") >= 1, "{status}");
}
