//! ICMP through the VIP, end to end in the lab with the real agent
//! (docs/data-path.md, "ICMP"): a client behind a smaller path MTU downloads
//! through the VIP because the router's "fragmentation needed" reaches the
//! backend; a UDP backend's "port unreachable" reaches the client from the
//! VIP; a packet whose TTL runs out at the balancer is answered with "time
//! exceeded".

mod common;

use std::{
    net::{Ipv4Addr, UdpSocket},
    os::fd::AsRawFd,
    time::Duration,
};

use common::{
    DOWNLOAD, download, start_agent, start_apiservers, start_file_vip, status_json, write_config,
};
use ha_lab::{
    Lab,
    config::{self, VipExt},
};
use ha_user::config::{CheckConfig, CheckKind, Protocol};
use serde_json::Value;

const BACKENDS: [&str; 3] = ["api1", "api2", "api3"];

fn verdict(status: &Value, name: &str) -> u64 {
    status["verdicts"][name].as_u64().unwrap_or(0)
}

/// The path MTU black hole: the client sits behind a router whose
/// link towards it has MTU 1400 (the client's own is 1500, so it announces
/// MSS 1460). The backends' full-size segments reach the router, which
/// answers "fragmentation needed" to their source, the VIP. Without the
/// translation that error died in the balancer's kernel and every download
/// stalled at 0 bytes.
#[test]
fn a_client_behind_a_smaller_path_mtu_downloads_through_the_vip() {
    let mut lab = Lab::new(&["client", "lb", "api1", "api2", "api3", "router"]).unwrap();
    let far = lab.add_routed_host("far", "router", 1400).unwrap();
    let router = lab.host("router").addr;
    let far_net = format!("{}/24", Ipv4Addr::from(u32::from(far.addr) & !0xff));
    lab.exec(
        "lb",
        &["ip", "route", "add", &far_net, "via", &router.to_string()],
    )
    .unwrap();
    let (_servers, _agent) = start_file_vip(&lab, &BACKENDS);
    let before = status_json(&lab, "lb");
    let sizes: Vec<String> = (0..5).map(|_| download(&lab, "far")).collect();
    let after = status_json(&lab, "lb");
    let delta = |name: &str| verdict(&after, name) - verdict(&before, name);
    eprintln!(
        "measured: downloads of {DOWNLOAD} bytes through a 1400-byte path: {sizes:?}; \
         icmp_forward_tx {}, forward_tx {}, reply_tx {}",
        delta("icmp_forward_tx"),
        delta("forward_tx"),
        delta("reply_tx")
    );
    let complete = sizes.iter().filter(|s| **s == DOWNLOAD.to_string()).count();
    assert_eq!(complete, 5, "downloads: {sizes:?}");
    assert!(
        delta("icmp_forward_tx") >= 1,
        "no fragmentation-needed error was translated to a backend"
    );
}

/// Sets IP_RECVERR: a UDP socket then reports every ICMP error about its
/// datagrams, not only the ones Linux deems hard.
fn receive_errors(socket: &UdpSocket) {
    let on: libc::c_int = 1;
    // SAFETY: a valid socket and a c_int option of the size given.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_RECVERR,
            &on as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as u32,
        )
    };
    assert_eq!(rc, 0, "IP_RECVERR: {}", std::io::Error::last_os_error());
}

/// What a connected UDP socket's next receive says, after sending one datagram.
fn udp_answer(to: (Ipv4Addr, u16), ttl: Option<u32>) -> std::io::Result<usize> {
    let socket = UdpSocket::bind("0.0.0.0:0")?;
    receive_errors(&socket);
    if let Some(ttl) = ttl {
        socket.set_ttl(ttl)?;
    }
    socket.connect(to)?;
    socket.set_read_timeout(Some(Duration::from_secs(2)))?;
    socket.send(b"query")?;
    let mut buf = [0u8; 64];
    socket.recv(&mut buf)
}

/// A UDP VIP whose backends have nothing on the port: each backend answers
/// "port unreachable" to the NAT port, and the client must hear it from
/// VIP:port (its connected socket gets ECONNREFUSED at once instead of
/// waiting out a timeout). And a datagram with TTL 1: the balancer, one hop,
/// answers "time exceeded" as a router would (EHOSTUNREACH on the socket).
#[test]
fn icmp_errors_reach_the_client_from_the_vip() {
    let lab = Lab::new(&["client", "lb", "api1", "api2", "api3"]).unwrap();
    let _apis = start_apiservers(&lab, &BACKENDS);
    let vip = lab.vip(0);
    // UDP, checked by TCP connects to the stand-ins' port.
    let dns = config::vip("dns", vip, 5353)
        .protocol(Protocol::Udp)
        .check(CheckConfig {
            kind: Some(CheckKind::Tcp),
            port: Some(6443),
            ..CheckConfig::default()
        })
        .backends(&config::addresses(&lab, &BACKENDS));
    let config = write_config(&lab, "config.yaml", &config::agent([dns]));
    let _agent = start_agent(&lab, "lb", &config, &[]);
    let before = status_json(&lab, "lb");

    let refused = lab
        .in_host("client", || udp_answer((vip, 5353), None))
        .unwrap();
    let after_refused = status_json(&lab, "lb");
    let expired = lab
        .in_host("client", || udp_answer((vip, 5353), Some(1)))
        .unwrap();
    let after = status_json(&lab, "lb");
    let delta = |a: &Value, b: &Value, name: &str| verdict(a, name) - verdict(b, name);
    eprintln!(
        "measured: to a UDP VIP whose backends have no listener: {refused:?} \
         (icmp_reply_tx {}); with TTL 1: {expired:?} (icmp_time_exceeded_tx {})",
        delta(&after_refused, &before, "icmp_reply_tx"),
        delta(&after, &after_refused, "icmp_time_exceeded_tx"),
    );
    assert_eq!(
        refused.map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionRefused),
        "port unreachable from the backend, translated to the client"
    );
    assert_eq!(delta(&after_refused, &before, "icmp_reply_tx"), 1);
    assert_eq!(
        expired.map_err(|e| e.raw_os_error()),
        Err(Some(libc::EHOSTUNREACH)),
        "time exceeded from the balancer"
    );
    assert_eq!(delta(&after, &after_refused, "icmp_time_exceeded_tx"), 1);
    assert_eq!(
        delta(&after, &after_refused, "forward_tx"),
        0,
        "the expired datagram was not sent on"
    );
}
