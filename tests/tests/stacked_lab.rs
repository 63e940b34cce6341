//! The stacked control plane (docs/deployment.md, "On the masters"): the
//! agent on each of three masters, VRRP among them, the apiserver VIP on
//! 8443 in front of the masters' apiservers on 6443, and an etcd-like VIP on
//! 2379 whose listeners are bound to the node address and 127.0.0.1 only, as
//! kubeadm's etcd binds them. Every master is a backend of both VIPs: the
//! holder's own backend is reached through local translation (XDP in, tc
//! egress out), and the holder's own connections through socket-level
//! balancing (cgroup/connect4).

mod common;

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::PathBuf,
    time::{Duration, Instant},
};

use common::{Session, status_json, whoami, write_config, write_file};
use ha_lab::{Lab, LabProcess, bin_path, config};
use ha_user::config::{CheckKind, Config, TrackAction, VipConfig, VrrpConfig, VrrpVersion};
use nix::sys::signal::Signal;

const HOSTS: [&str; 4] = ["client", "m1", "m2", "m3"];
const MASTERS: [&str; 3] = ["m1", "m2", "m3"];
const API_VIP_PORT: u16 = 8443;
const API_PORT: u16 = 6443;
const ETCD_PORT: u16 = 2379;

/// m1 is the first holder; m2 takes over from it.
fn priority(master: &str) -> u8 {
    match master {
        "m1" => 150,
        "m2" => 100,
        _ => 50,
    }
}

const CHECK_INTERVAL: Duration = Duration::from_millis(100);
const FAST_INTERVAL: Duration = Duration::from_millis(50);
const FALL: u32 = 3;
const ADVERT_INTERVAL: Duration = Duration::from_millis(100);

/// A VIP in front of the three masters on `backend_port`, checked often.
fn master_vip(lab: &Lab, name: &str, index: u8, port: u16, backend_port: u16) -> VipConfig {
    let mut vip = config::vip(name, lab.vip(index), port);
    for address in config::addresses(lab, &MASTERS) {
        let mut backend = config::backend(address);
        backend.port = Some(backend_port);
        vip.backends.push(backend);
    }
    let check = &mut vip.check;
    check.kind = Some(CheckKind::Tcp);
    check.interval = CHECK_INTERVAL;
    check.fast_interval = FAST_INTERVAL;
    check.timeout = Duration::from_millis(100);
    check.fall = FALL;
    check.rise = 2;
    vip
}

/// One master's config: both VIPs, VRRP vrid 51, `track` for its own apiserver.
fn master_config(lab: &Lab, master: &str, track: Option<TrackAction>) -> PathBuf {
    let mut conf = config::agent([
        master_vip(lab, "apiserver", 0, API_VIP_PORT, API_PORT),
        master_vip(lab, "etcd", 1, ETCD_PORT, ETCD_PORT),
    ]);
    let mut vrrp = VrrpConfig {
        priority: priority(master),
        version: VrrpVersion::V3,
        advert_interval: ADVERT_INTERVAL,
        ..config::vrrp(51)
    };
    vrrp.track.local_backend_down = track;
    conf.vrrp = Some(vrrp);
    write_config(lab, &format!("{master}.yaml"), &conf)
}

/// A master's processes: its apiserver (on its address, 6443) and its
/// etcd-like listeners (its address and 127.0.0.1, 2379).
struct Master {
    apiserver: LabProcess,
    _etcd: [LabProcess; 2],
}

fn standin(lab: &Lab, host: &str, listen: &str) -> LabProcess {
    let program = bin_path("standin-apiserver");
    let mut process = lab
        .spawn(
            host,
            &[
                program.to_str().unwrap(),
                "--name",
                host,
                "--listen",
                listen,
            ],
        )
        .unwrap();
    process
        .wait_for_log("listening", Duration::from_secs(10))
        .unwrap();
    process
}

fn start_master(lab: &Lab, master: &str) -> Master {
    let address = lab.host(master).addr;
    Master {
        apiserver: lab.start_standin(master, &[]).unwrap(),
        _etcd: [
            standin(lab, master, &format!("{address}:{ETCD_PORT}")),
            standin(lab, master, &format!("127.0.0.1:{ETCD_PORT}")),
        ],
    }
}

fn holds(lab: &Lab, host: &str, vip: Ipv4Addr) -> bool {
    let out = lab
        .exec(host, &["ip", "-o", "-4", "addr", "show", "dev", "eth0"])
        .unwrap();
    String::from_utf8_lossy(&out.stdout).contains(&format!("{vip}/32"))
}

/// The masters holding every one of `vips`.
fn holders_of(lab: &Lab, vips: &[Ipv4Addr]) -> Vec<&'static str> {
    MASTERS
        .into_iter()
        .filter(|m| vips.iter().all(|vip| holds(lab, m, *vip)))
        .collect()
}

/// The masters holding both VIPs.
fn holders(lab: &Lab) -> Vec<&'static str> {
    holders_of(lab, &[lab.vip(0), lab.vip(1)])
}

/// Waits until one of `wanted` alone holds `vips`: which, and how long it took.
fn wait_for_holder_of(
    lab: &Lab,
    vips: &[Ipv4Addr],
    wanted: &[&str],
    timeout: Duration,
) -> (&'static str, Duration) {
    let mut holder = None;
    let took = lab
        .wait_until(
            timeout,
            &format!("one of {wanted:?} alone holds {vips:?}"),
            || {
                let now = holders_of(lab, vips);
                holder = (now.len() == 1 && wanted.contains(&now[0])).then(|| now[0]);
                holder.is_some()
            },
        )
        .unwrap_or_else(|e| panic!("{e}; holders now {:?}", holders_of(lab, vips)));
    (holder.unwrap(), took)
}

/// [`wait_for_holder_of`] both VIPs.
fn wait_for_holder(lab: &Lab, wanted: &[&str], timeout: Duration) -> (&'static str, Duration) {
    wait_for_holder_of(lab, &[lab.vip(0), lab.vip(1)], wanted, timeout)
}

/// `n` fresh connections to `vip:port` from `host`: how many each server
/// answered, and how many failed.
fn connect_n(
    lab: &Lab,
    host: &str,
    vip: Ipv4Addr,
    port: u16,
    n: usize,
) -> (BTreeMap<String, usize>, Vec<String>) {
    lab.in_host(host, || {
        let mut served = BTreeMap::new();
        let mut failed = Vec::new();
        for _ in 0..n {
            match whoami(vip, port) {
                Ok((name, _)) => *served.entry(name).or_insert(0) += 1,
                Err(e) => failed.push(e.to_string()),
            }
        }
        (served, failed)
    })
    .unwrap()
}

fn backend_state(lab: &Lab, host: &str, vip: &str, address: Ipv4Addr) -> String {
    let status = status_json(lab, host);
    let vip = status["vips"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == vip)
        .unwrap_or_else(|| panic!("no VIP {vip}: {status}"));
    let backend = vip["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["address"] == address.to_string())
        .unwrap_or_else(|| panic!("no backend {address}: {vip}"));
    backend["state"].as_str().unwrap().to_string()
}

/// Waits until `host`'s agent has the backend at `address` of `vip` down.
fn wait_for_down(lab: &Lab, host: &str, vip: &str, address: Ipv4Addr) {
    lab.wait_until(
        Duration::from_secs(10),
        &format!("{host} has {vip}/{address} down"),
        || backend_state(lab, host, vip, address) == "down",
    )
    .unwrap();
}

struct Stacked {
    lab: Lab,
    masters: BTreeMap<&'static str, Master>,
    _agents: Vec<LabProcess>,
}

impl Stacked {
    /// `kill -9` of `master`'s apiserver (its etcd-like listeners stay).
    fn kill_apiserver(&self, master: &str) {
        self.masters[master]
            .apiserver
            .signal(Signal::SIGKILL)
            .unwrap();
    }
}

fn stacked(track: Option<TrackAction>) -> Stacked {
    let lab = Lab::new(&HOSTS).unwrap();
    let masters = MASTERS
        .into_iter()
        .map(|m| (m, start_master(&lab, m)))
        .collect();
    let agents = MASTERS
        .into_iter()
        .map(|m| {
            lab.start_agent(m, &master_config(&lab, m, track), &[])
                .unwrap()
        })
        .collect();
    wait_for_holder(&lab, &["m1"], Duration::from_secs(5));
    Stacked {
        lab,
        masters,
        _agents: agents,
    }
}

fn assert_all_served(
    what: &str,
    (served, failed): &(BTreeMap<String, usize>, Vec<String>),
    n: usize,
    by: &[&str],
) {
    assert!(
        failed.is_empty(),
        "{what}: {} of {n} failed: {failed:?}",
        failed.len()
    );
    assert_eq!(served.values().sum::<usize>(), n, "{what}: {served:?}");
    let names: Vec<&str> = served.keys().map(String::as_str).collect();
    assert_eq!(names, by, "{what}: served by {served:?}");
}

/// 60 of 60 LAN clients' connections to each VIP succeed and are spread
/// over all three masters, the holder's own backend included (before local
/// translation a third of them were refused: passed up as VIP:8443, where
/// nothing listens, or to 2379 on the VIP, where the node-address-bound
/// listener is not).
#[test]
fn every_client_connection_to_each_vip_succeeds_spread_over_the_three_masters() {
    let s = stacked(None);
    for (vip, port) in [(s.lab.vip(0), API_VIP_PORT), (s.lab.vip(1), ETCD_PORT)] {
        let result = connect_n(&s.lab, "client", vip, port, 60);
        eprintln!("client -> {vip}:{port}: {result:?}");
        assert_all_served(&format!("client -> {vip}:{port}"), &result, 60, &MASTERS);
    }
}

/// On the holder itself, 10 of 10 connections to each VIP succeed, spread
/// over the masters; after its own apiserver is killed (and marked down)
/// they go to the other two, the etcd VIP is untouched, and LAN clients too
/// see only the live apiservers.
#[test]
fn the_holders_own_connections_reach_both_vips_and_survive_its_apiservers_death() {
    let s = stacked(None);
    let lab = &s.lab;
    for (vip, port) in [(lab.vip(0), API_VIP_PORT), (lab.vip(1), ETCD_PORT)] {
        let result = connect_n(lab, "m1", vip, port, 10);
        eprintln!("m1 -> {vip}:{port}: {result:?}");
        assert!(result.1.is_empty(), "m1 -> {vip}:{port}: {result:?}");
        assert_eq!(result.0.values().sum::<usize>(), 10, "{result:?}");
    }
    // Spread: 30 more from the holder reach every master.
    let spread = connect_n(lab, "m1", lab.vip(0), API_VIP_PORT, 30);
    assert_all_served("m1 -> apiserver VIP", &spread, 30, &MASTERS);

    s.kill_apiserver("m1");
    wait_for_down(lab, "m1", "apiserver", lab.host("m1").addr);
    assert_eq!(holders(lab), ["m1"], "no tracking: m1 keeps the VIPs");
    let result = connect_n(lab, "m1", lab.vip(0), API_VIP_PORT, 10);
    assert_all_served(
        "m1 -> apiserver VIP, m1's apiserver dead",
        &result,
        10,
        &["m2", "m3"],
    );
    let result = connect_n(lab, "m1", lab.vip(1), ETCD_PORT, 10);
    assert!(result.1.is_empty(), "m1 -> etcd VIP: {result:?}");
    let result = connect_n(lab, "client", lab.vip(0), API_VIP_PORT, 60);
    assert_all_served(
        "client -> apiserver VIP, m1's apiserver dead",
        &result,
        60,
        &["m2", "m3"],
    );
}

/// With `track.local_backend_down: decrease 60`, the VIPs leave a master
/// whose apiserver is killed within the check's fall time plus one advert
/// interval (the master advertises its lowered priority at once and the
/// backup that now outranks it preempts after its skew time), and come back
/// by preemption when it recovers.
#[test]
fn the_vips_follow_the_local_apiserver_within_the_fall_time_and_one_advert() {
    let mut s = stacked(Some(TrackAction::Decrease(60)));
    let lab = &s.lab;
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        holders(lab),
        ["m1"],
        "m1 keeps the VIPs while its apiserver is up"
    );
    s.kill_apiserver("m1");
    let killed = Instant::now();
    let (holder, _) = wait_for_holder(lab, &["m2"], Duration::from_secs(5));
    let moved = killed.elapsed();
    // The fall time: the next check (within one interval), then fall - 1
    // fast checks; then one advert interval. 100 ms for the lab's scheduling.
    let bound = CHECK_INTERVAL + FAST_INTERVAL * (FALL - 1) + ADVERT_INTERVAL;
    eprintln!(
        "the VIPs left m1 for {holder} {moved:?} after its apiserver was killed (bound {bound:?} + 100 ms)"
    );
    assert!(moved <= bound + Duration::from_millis(100), "{moved:?}");
    // Clients follow: once the new holder's own check has m1 down too (its
    // checks run on their own phase), every connection succeeds, none reaches m1.
    wait_for_down(lab, holder, "apiserver", lab.host("m1").addr);
    let result = connect_n(lab, "client", lab.vip(0), API_VIP_PORT, 30);
    assert_all_served(
        "client -> apiserver VIP after the move",
        &result,
        30,
        &["m2", "m3"],
    );
    // m1's apiserver is back: it outranks m2 again and preempts.
    s.masters.get_mut("m1").unwrap().apiserver = lab.start_standin("m1", &[]).unwrap();
    let (_, back) = wait_for_holder(lab, &["m1"], Duration::from_secs(5));
    eprintln!("m1 took the VIPs back {back:?} after its apiserver listened again");
    let result = connect_n(lab, "client", lab.vip(0), API_VIP_PORT, 60);
    assert_all_served("client -> apiserver VIP, m1 back", &result, 60, &MASTERS);
}

/// The kubeadm guide's static-pod pair (haproxy.cfg on *:8443 in front of
/// the masters' 6443, keepalived.conf with check_apiserver.sh tracked with
/// weight -2), with the lab's addresses, imported by `ha-user import`: the
/// config it prints passes the same tests (at the guide's own timings:
/// checks every 2 s, fall 3; adverts every second).
#[test]
fn the_imported_kubeadm_guide_pair_passes_the_stacked_tests() {
    let lab = Lab::new(&HOSTS).unwrap();
    let mut masters: BTreeMap<&str, Master> = MASTERS
        .into_iter()
        .map(|m| (m, start_master(&lab, m)))
        .collect();
    let servers: String = MASTERS
        .iter()
        .enumerate()
        .map(|(i, m)| {
            format!(
                "        server master{} {}:6443 check\n",
                i + 1,
                lab.host(m).addr
            )
        })
        .collect();
    let guide_haproxy =
        include_str!("../../ha-user/tests/fixtures/import/kubeadm-static-pods/haproxy.cfg");
    let haproxy: String = guide_haproxy
        .lines()
        .filter(|line| !line.trim_start().starts_with("server "))
        .map(|line| format!("{line}\n"))
        .collect::<String>()
        + &servers;
    let haproxy = write_file(&lab, "haproxy.cfg", &haproxy);
    let guide_keepalived =
        include_str!("../../ha-user/tests/fixtures/import/kubeadm-static-pods/keepalived.conf");
    let agents: Vec<LabProcess> = MASTERS
        .into_iter()
        .map(|m| {
            // As the guide says: MASTER 101 on the first, BACKUP 100 on the others.
            let keepalived = guide_keepalived
                .replace("192.0.2.100", &lab.vip(0).to_string())
                .replace(
                    "priority 101",
                    if m == "m1" {
                        "priority 101"
                    } else {
                        "priority 100"
                    },
                )
                .replace(
                    "state MASTER",
                    if m == "m1" {
                        "state MASTER"
                    } else {
                        "state BACKUP"
                    },
                );
            let keepalived = write_file(&lab, &format!("keepalived-{m}.conf"), &keepalived);
            let out = lab
                .exec(
                    m,
                    &[
                        bin_path("ha-user").to_str().unwrap(),
                        "import",
                        "--haproxy",
                        haproxy.to_str().unwrap(),
                        "--keepalived",
                        keepalived.to_str().unwrap(),
                    ],
                )
                .unwrap();
            assert!(
                out.status.success(),
                "import: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let yaml = String::from_utf8(out.stdout).unwrap();
            let parsed = Config::from_yaml(&yaml, "imported").unwrap();
            assert_eq!(
                parsed.vrrp.as_ref().unwrap().track.local_backend_down,
                Some(TrackAction::Decrease(2))
            );
            let path = write_file(&lab, &format!("imported-{m}.yaml"), &yaml);
            lab.start_agent(m, &path, &[]).unwrap()
        })
        .collect();
    let vip = lab.vip(0);
    // keepalived's defaults: adverts every second, so m1 (101) wins after
    // its Master_Down_Interval.
    wait_for_holder_of(&lab, &[vip], &["m1"], Duration::from_secs(8));
    let result = connect_n(&lab, "client", vip, API_VIP_PORT, 60);
    assert_all_served("client -> imported VIP", &result, 60, &MASTERS);
    let result = connect_n(&lab, "m1", vip, API_VIP_PORT, 10);
    assert!(result.1.is_empty(), "m1 -> imported VIP: {result:?}");

    masters
        .get_mut("m1")
        .unwrap()
        .apiserver
        .signal(Signal::SIGKILL)
        .unwrap();
    let killed = Instant::now();
    // m2 and m3 tie at 100; the higher address wins.
    let (holder, _) = wait_for_holder_of(&lab, &[vip], &["m2", "m3"], Duration::from_secs(12));
    let moved = killed.elapsed();
    // haproxy's defaults the import carried over: inter 2s, fall 3 (the
    // next check within 2 s, then two more 2 s apart), adverts every 1 s.
    let bound = Duration::from_secs(2 + 2 * 2 + 1);
    eprintln!(
        "imported: the VIP left m1 for {holder} {moved:?} after its apiserver was killed (bound {bound:?})"
    );
    assert!(moved <= bound + Duration::from_millis(200), "{moved:?}");
    wait_for_down(&lab, holder, "apiserver", lab.host("m1").addr);
    let result = connect_n(&lab, "client", vip, API_VIP_PORT, 30);
    assert_all_served(
        "client -> imported VIP after the move",
        &result,
        30,
        &["m2", "m3"],
    );
    let result = connect_n(&lab, holder, vip, API_VIP_PORT, 10);
    assert_all_served("the new holder -> imported VIP", &result, 10, &["m2", "m3"]);
    // m1's apiserver comes back: it preempts.
    masters.get_mut("m1").unwrap().apiserver = lab.start_standin("m1", &[]).unwrap();
    wait_for_holder_of(&lab, &[vip], &["m1"], Duration::from_secs(12));
    drop(agents);
}

/// An agent restart on the holder (the keep intent, pins on the host's
/// bpffs) loses no connection: a LAN client's connection translated to the
/// holder's own apiserver (XDP in, the pinned tc egress link out), one
/// NATed to another master, and the holder's own socket-balanced one, all
/// answer after the new agent has taken the pinned links over, and the
/// holder stays master.
#[test]
fn a_restart_of_the_holders_agent_keeps_its_local_nated_and_own_connections() {
    let lab = Lab::new(&HOSTS).unwrap();
    let _masters: Vec<Master> = MASTERS.into_iter().map(|m| start_master(&lab, m)).collect();
    let bpffs = lab.bpffs().unwrap();
    let start = |m: &str| {
        let pins = bpffs.join(m).display().to_string();
        lab.start_agent(
            m,
            &master_config(&lab, m, None),
            &["--pin-dir", &pins, "--on-stop", "keep"],
        )
        .unwrap()
    };
    let mut m1 = start("m1");
    let _others: Vec<LabProcess> = ["m2", "m3"].into_iter().map(start).collect();
    wait_for_holder(&lab, &["m1"], Duration::from_secs(5));
    let vip = lab.vip(0);
    let (mut local, mut nated) = lab
        .in_host("client", || {
            (
                Session::to_port(vip, API_VIP_PORT, "m1"),
                Session::to_port(vip, API_VIP_PORT, "m2"),
            )
        })
        .unwrap();
    let mut own = lab
        .in_host("m1", || Session::to_port(vip, API_VIP_PORT, "m3"))
        .unwrap();
    m1.signal(Signal::SIGTERM).unwrap();
    assert!(
        m1.wait_timeout(Duration::from_secs(10)).unwrap().is_some(),
        "m1's agent stopped"
    );
    // While no agent runs, the pinned programs go on serving.
    local.assert_alive(3);
    nated.assert_alive(3);
    let _m1 = start("m1");
    assert_eq!(holders(&lab), ["m1"], "m1 resumed as master");
    local.assert_alive(3);
    nated.assert_alive(3);
    own.assert_alive(3);
    let result = connect_n(&lab, "client", vip, API_VIP_PORT, 30);
    assert_all_served(
        "client -> apiserver VIP after the restart",
        &result,
        30,
        &MASTERS,
    );
    let result = connect_n(&lab, "m1", vip, API_VIP_PORT, 10);
    assert!(
        result.1.is_empty(),
        "m1 -> VIP after the restart: {result:?}"
    );
}

/// The holder's own apiserver dies under load from the LAN: the first SYN
/// it refuses (the host's stack answers RST, leaving through the tc egress
/// program) makes it suspect and is redispatched, so no LAN client's
/// connection fails (each waits up to 3 s, as a real client's connect
/// timeout would), and none goes to the dead one after it.
#[test]
fn the_holders_apiserver_dying_under_load_costs_lan_clients_nothing() {
    let s = stacked(None);
    let lab = &s.lab;
    let vip = lab.vip(0);
    let results: std::sync::Mutex<Vec<Result<String, String>>> = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        let results = &results;
        let client = scope.spawn(move || {
            lab.in_host("client", || {
                std::thread::scope(|inner| {
                    let start = Instant::now();
                    while start.elapsed() < Duration::from_secs(2) {
                        inner.spawn(move || {
                            let result =
                                common::whoami_within(vip, API_VIP_PORT, Duration::from_secs(3))
                                    .map(|(name, _)| name)
                                    .map_err(|e| e.to_string());
                            results.lock().unwrap().push(result);
                        });
                        std::thread::sleep(Duration::from_millis(10));
                    }
                });
            })
            .unwrap()
        });
        std::thread::sleep(Duration::from_millis(500));
        s.kill_apiserver("m1");
        client.join().unwrap();
    });
    let results = results.into_inner().unwrap();
    let failed: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    eprintln!(
        "{} connections while m1's apiserver died, {} failed; m1 events: {}",
        results.len(),
        failed.len(),
        status_json(lab, "m1")["events"]
    );
    assert!(failed.is_empty(), "{failed:?}");
    assert!(results.len() > 150, "{}", results.len());
}
