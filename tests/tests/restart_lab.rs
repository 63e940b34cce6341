//! The data path outlives its agent (docs/operations.md, "Restarts and
//! upgrades"): one LB host with a static VIP, 20 busy keep-alive connections
//! (a request every 50 ms each) and a new connection every 50 ms throughout,
//! while the agent is killed and restarted, is away for 10 s, is upgraded to
//! another program, or stops with the keep or the release intent.

mod common;

use std::{
    io::{BufRead, BufReader, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use common::{host_state, start_apiservers, status_json, vip_config, write_config};
use ha_lab::{HOST_IFACE, Lab, LabProcess, config};
use ha_user::config::{Config, PortRange, VrrpConfig};
use nix::sys::signal::Signal;

const HOSTS: [&str; 5] = ["client", "lb", "api1", "api2", "api3"];
const BACKENDS: [&str; 3] = ["api1", "api2", "api3"];
const SESSIONS: usize = 20;
const PACE: Duration = Duration::from_millis(50);

/// What the load saw.
#[derive(Debug, Default)]
struct LoadReport {
    /// Long-lived connections that answered every request to the end.
    sessions_alive: usize,
    /// How each broken one broke.
    sessions_broken: Vec<String>,
    requests: u64,
    new_ok: u64,
    /// New connections that failed, with why.
    new_failed: Vec<String>,
}

/// The load, running on threads in the client's namespace.
struct Load {
    stop: Arc<AtomicBool>,
    sessions: Vec<JoinHandle<Result<u64, String>>>,
    connector: JoinHandle<(u64, Vec<String>)>,
}

fn exchange(
    writer: &mut TcpStream,
    reader: &mut BufReader<TcpStream>,
    text: &str,
) -> std::io::Result<String> {
    writer.write_all(format!("{text}\n").as_bytes())?;
    let mut line = String::new();
    reader.read_line(&mut line)?;
    Ok(line)
}

impl Load {
    /// Opens the sessions (all must connect) and starts the traffic; call
    /// from inside the client's namespace (threads inherit it).
    fn start(vip: Ipv4Addr) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let sessions = (0..SESSIONS)
            .map(|n| {
                let stream = TcpStream::connect_timeout(
                    &SocketAddr::from((vip, 6443)),
                    Duration::from_secs(2),
                )
                .unwrap();
                stream
                    .set_read_timeout(Some(Duration::from_secs(3)))
                    .unwrap();
                let mut writer = stream.try_clone().unwrap();
                let mut reader = BufReader::new(stream);
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut sent = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let text = format!("session {n} request {sent}");
                        match exchange(&mut writer, &mut reader, &text) {
                            Ok(line) if line == format!("{text}\n") => sent += 1,
                            Ok(line) => {
                                return Err(format!("session {n}: {text:?} answered {line:?}"));
                            }
                            Err(e) => return Err(format!("session {n}: {text:?}: {e}")),
                        }
                        std::thread::sleep(PACE);
                    }
                    Ok(sent)
                })
            })
            .collect();
        let connector = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let (mut ok, mut failed) = (0u64, Vec::new());
                while !stop.load(Ordering::Relaxed) {
                    match common::whoami_within(vip, 6443, Duration::from_secs(1)) {
                        Ok(_) => ok += 1,
                        Err(e) => failed.push(e.to_string()),
                    }
                    std::thread::sleep(PACE);
                }
                (ok, failed)
            })
        };
        Load {
            stop,
            sessions,
            connector,
        }
    }

    fn finish(self) -> LoadReport {
        self.stop.store(true, Ordering::Relaxed);
        let mut report = LoadReport::default();
        for session in self.sessions {
            match session.join().unwrap() {
                Ok(sent) => {
                    report.sessions_alive += 1;
                    report.requests += sent;
                }
                Err(why) => report.sessions_broken.push(why),
            }
        }
        let (ok, failed) = self.connector.join().unwrap();
        report.new_ok = ok;
        report.new_failed = failed;
        report
    }
}

/// Runs `during` (on this thread, in the root namespace) while the load runs
/// in the client, and returns what the load saw.
fn under_load(lab: &Lab, settle: Duration, during: impl FnOnce() + Send) -> LoadReport {
    let vip = lab.vip(0);
    let load = lab.in_host("client", move || Load::start(vip)).unwrap();
    std::thread::sleep(settle);
    during();
    std::thread::sleep(settle);
    load.finish()
}

fn assert_lossless(report: &LoadReport, what: &str) {
    assert_eq!(
        report.sessions_alive, SESSIONS,
        "{what}: established connections broke: {:?}",
        report.sessions_broken
    );
    assert!(
        report.new_failed.is_empty(),
        "{what}: {} of {} new connections failed: {:?}",
        report.new_failed.len(),
        report.new_failed.len() as u64 + report.new_ok,
        report.new_failed
    );
    assert!(report.new_ok > 20, "{what}: the load ran: {report:?}");
    assert!(report.requests > 20 * SESSIONS as u64, "{report:?}");
}

struct Setup {
    lab: Lab,
    apis: Vec<LabProcess>,
    config: PathBuf,
    pins: PathBuf,
}

/// The VIP config with room for 4096 flows instead of the default.
fn resized_config(lab: &Lab) -> Config {
    let mut resized = vip_config(lab, &BACKENDS);
    resized.data_plane.conntrack.max_flows = 4096;
    resized
}

fn setup() -> Setup {
    let lab = Lab::new(&HOSTS).unwrap();
    let apis = start_apiservers(&lab, &BACKENDS);
    let config = write_config(&lab, "config.yaml", &vip_config(&lab, &BACKENDS));
    let pins = lab.bpffs().unwrap().join("lb");
    Setup {
        lab,
        apis,
        config,
        pins,
    }
}

fn agent_args(pins: &Path) -> Vec<String> {
    vec![
        "--pin-dir".to_string(),
        pins.display().to_string(),
        "--on-stop".to_string(),
        "keep".to_string(),
    ]
}

fn start(setup: &Setup, extra: &[&str]) -> LabProcess {
    let mut args = agent_args(&setup.pins);
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    setup.lab.start_agent("lb", &setup.config, &args).unwrap()
}

/// The agent with the upgrade test's program (`cargo xtask build-ebpf --variant`).
fn start_variant(setup: &Setup) -> LabProcess {
    let object = format!("HA_LB_XDP_OBJECT={}", variant_object().display());
    let args = agent_args(&setup.pins);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut agent = setup
        .lab
        .spawn_agent("lb", &setup.config, &args, &[&object])
        .unwrap();
    agent
        .wait_for_log("serving;", Duration::from_secs(15))
        .unwrap();
    agent
}

fn variant_object() -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/ebpf-variant/bpfel-unknown-none/release/ha-ebpf");
    assert!(
        path.exists(),
        "the upgrade test's program is not built: run `cargo xtask build-ebpf --variant` \
         (`cargo xtask test` does) — looked for {}",
        path.display()
    );
    path
}

/// `ha-user check-config --config CONFIG --iface eth0 --pin-dir PINS` on
/// the LB host: what it tells on stderr (it must succeed).
fn check_config_told(setup: &Setup, config: &Path) -> String {
    let pins = setup.pins.display().to_string();
    let check = setup
        .lab
        .command("lb", ha_lab::bin_path("ha-user"))
        .args(["check-config", "--config"])
        .arg(config)
        .args(["--iface", HOST_IFACE, "--pin-dir", &pins])
        .output()
        .unwrap();
    let told = String::from_utf8_lossy(&check.stderr).into_owned();
    assert!(check.status.success(), "{told}");
    told
}

/// `ha-user attach` on the LB host that must fail at start: why, from stderr.
fn attach_refused(setup: &Setup, config: &Path, extra: &[&str]) -> String {
    let failed = setup
        .lab
        .command("lb", ha_lab::bin_path("ha-user"))
        .args(["attach", "--iface", HOST_IFACE, "--config"])
        .arg(config)
        .args(extra)
        .output()
        .unwrap();
    let why = String::from_utf8_lossy(&failed.stderr).into_owned();
    assert!(!failed.status.success(), "{why}");
    why
}

/// [`attach_refused`] with the setup's config and pins, as [`start`] runs it.
fn attach_refused_pinned(setup: &Setup) -> String {
    let args = agent_args(&setup.pins);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    attach_refused(setup, &setup.config, &args)
}

fn kill_9(agent: &mut LabProcess) {
    agent.signal(Signal::SIGKILL).unwrap();
    assert!(
        agent
            .wait_timeout(Duration::from_secs(5))
            .unwrap()
            .is_some()
    );
}

fn program(lab: &Lab) -> (String, String) {
    let status = status_json(lab, "lb");
    let program = &status["program"];
    (
        program["start"].as_str().unwrap_or_default().to_string(),
        program["tag"].as_str().unwrap_or_default().to_string(),
    )
}

fn xdp_attached(lab: &Lab) -> bool {
    let link = lab
        .exec("lb", &["ip", "-d", "link", "show", HOST_IFACE])
        .unwrap()
        .stdout;
    String::from_utf8_lossy(&link).contains("prog/xdp")
}

fn has_vip(lab: &Lab) -> bool {
    let out = lab
        .exec("lb", &["ip", "-o", "addr", "show", "dev", HOST_IFACE])
        .unwrap()
        .stdout;
    String::from_utf8_lossy(&out).contains(&format!("{}/32", lab.vip(0)))
}

#[test]
fn kill_9_and_a_restart_half_a_second_later_lose_no_connection() {
    let setup = setup();
    let mut agent = start(&setup, &[]);
    assert_eq!(program(&setup.lab).0, "fresh");
    let mut restarted = None;
    let report = under_load(&setup.lab, Duration::from_secs(1), || {
        kill_9(&mut agent);
        std::thread::sleep(Duration::from_millis(500));
        restarted = Some(start(&setup, &[]));
    });
    assert_lossless(&report, "kill -9, restart after 0.5 s");
    let restarted = restarted.unwrap();
    assert!(
        restarted.log().contains("adopting the pinned flow tables"),
        "{}",
        restarted.log()
    );
    assert_eq!(program(&setup.lab).0, "adopted");
}

#[test]
fn ten_seconds_without_an_agent_lose_no_connection() {
    let setup = setup();
    let mut agent = start(&setup, &[]);
    let report = under_load(&setup.lab, Duration::from_secs(1), || {
        kill_9(&mut agent);
        std::thread::sleep(Duration::from_secs(10));
        // Nobody runs, and the data path still serves.
        assert!(xdp_attached(&setup.lab));
        assert!(has_vip(&setup.lab));
        let _restarted = start(&setup, &[]);
        std::thread::sleep(Duration::from_secs(1));
    });
    assert_lossless(&report, "10 s without an agent");
}

#[test]
fn an_upgrade_replaces_the_program_in_place_under_load() {
    let setup = setup();
    let mut agent = start(&setup, &[]);
    let (_, before) = program(&setup.lab);
    let mut upgraded = None;
    let report = under_load(&setup.lab, Duration::from_secs(1), || {
        // A rollout: the old agent stops with the keep intent, the new one
        // starts with another program.
        agent.stop(Duration::from_secs(10)).unwrap();
        upgraded = Some(start_variant(&setup));
        std::thread::sleep(Duration::from_secs(1));
    });
    assert_lossless(&report, "upgrade");
    let (kind, after) = program(&setup.lab);
    assert_eq!(kind, "upgraded");
    assert_ne!(before, after, "the program tag changes");
    let status = status_json(&setup.lab, "lb");
    assert_eq!(status["program"]["replaced_tag"].as_str(), Some(&*before));
    // And back: a downgrade is the same operation.
    let mut upgraded = upgraded.unwrap();
    let report = under_load(&setup.lab, Duration::from_secs(1), || {
        upgraded.stop(Duration::from_secs(10)).unwrap();
        let _back = start(&setup, &[]);
        std::thread::sleep(Duration::from_secs(1));
        assert_eq!(
            program(&setup.lab),
            ("upgraded".to_string(), before.clone())
        );
    });
    assert_lossless(&report, "downgrade");
}

fn backend_state(lab: &Lab, backend: &str) -> String {
    let address = lab.host(backend).addr.to_string();
    let status = status_json(lab, "lb");
    status["vips"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["address"].as_str() == Some(&*address))
        .map(|b| b["state"].as_str().unwrap_or_default().to_string())
        .unwrap_or_default()
}

/// The last desired state outlives the agent: a drained backend and a dead
/// one get no new connection from the restarted agent's first moment (it
/// starts from the recorded health and drains, not from "all up").
#[test]
fn a_restart_keeps_the_backends_health_and_drains() {
    let mut setup = setup();
    let mut agent = start(&setup, &[]);
    let lab = &setup.lab;
    let drained = lab.host("api1").addr.to_string();
    lab.exec(
        "lb",
        &[
            ha_lab::bin_path("ha-user").to_str().unwrap(),
            "drain",
            "apiserver",
            &drained,
        ],
    )
    .unwrap();
    drop(setup.apis.remove(1)); // api2 dies
    let lab = &setup.lab;
    lab.wait_until(Duration::from_secs(10), "api2 down", || {
        backend_state(lab, "api2") == "down"
    })
    .unwrap();
    let mut restarted = None;
    let report = under_load(lab, Duration::from_secs(1), || {
        kill_9(&mut agent);
        std::thread::sleep(Duration::from_millis(500));
        restarted = Some(start(&setup, &[]));
    });
    assert_lossless(&report, "restart with a drained and a dead backend");
    assert_eq!(backend_state(lab, "api1"), "maintenance");
    assert_eq!(backend_state(lab, "api2"), "down");
    let vip = lab.vip(0);
    let served: Vec<String> = lab
        .in_host("client", || {
            (0..20)
                .map(|_| common::whoami(vip, 6443).unwrap().0)
                .collect()
        })
        .unwrap();
    assert!(served.iter().all(|name| name == "api3"), "{served:?}");
}

/// `--on-stop keep`: program, tables, VIP address stay and serve; `ha-user
/// stop --release` (and `detach` without an agent) leaves the host as it
/// was before the first agent.
#[test]
fn keep_leaves_the_data_path_serving_and_release_removes_everything() {
    let setup = setup();
    let lab = &setup.lab;
    let before = host_state(lab, "lb");
    let mut agent = start(&setup, &[]);
    let vip = lab.vip(0);
    // Keep (SIGTERM with --on-stop keep): everything stays and serves.
    assert!(agent.stop(Duration::from_secs(10)).unwrap().success());
    assert!(agent.log().contains("kept:"), "{}", agent.log());
    assert!(xdp_attached(lab) && has_vip(lab));
    assert!(setup.pins.join("link").exists());
    lab.in_host("client", || common::whoami(vip, 6443).unwrap())
        .unwrap();
    // An agent that does not look in that pin directory cannot attach, and
    // says why.
    let why = attach_refused(&setup, &setup.config, &["--no-pin"]);
    assert!(
        why.contains("already has an XDP program attached") && why.contains("ha-user detach"),
        "{why}"
    );
    assert!(xdp_attached(lab) && has_vip(lab));

    // Release (`ha-user stop --release`): nothing left.
    let mut agent = start(&setup, &[]);
    assert!(agent.log().contains("start=\"adopted\""), "{}", agent.log());
    // A second agent on the interface fails at once and takes nothing over.
    let why = attach_refused_pinned(&setup);
    assert!(why.contains("in use"), "{why}");
    assert_eq!(program(lab).0, "adopted", "the first agent still runs it");
    let out = lab
        .exec(
            "lb",
            &[
                ha_lab::bin_path("ha-user").to_str().unwrap(),
                "stop",
                "--release",
            ],
        )
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("release"),
        "{said} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        agent
            .wait_timeout(Duration::from_secs(10))
            .unwrap()
            .is_some()
    );
    assert!(agent.log().contains("released:"), "{}", agent.log());
    assert_eq!(host_state(lab, "lb"), before, "release restores the host");
    assert!(!setup.pins.exists(), "release removes the pins");

    // Keep again, then `ha-user detach` with no agent running.
    let mut agent = start(&setup, &[]);
    assert!(agent.log().contains("start=\"fresh\""), "{}", agent.log());
    kill_9(&mut agent);
    assert!(xdp_attached(lab) && has_vip(lab));
    let pins = setup.pins.display().to_string();
    let out = lab
        .exec(
            "lb",
            &[
                ha_lab::bin_path("ha-user").to_str().unwrap(),
                "detach",
                "--iface",
                HOST_IFACE,
                "--pin-dir",
                &pins,
            ],
        )
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains(&vip.to_string()), "{said}");
    assert_eq!(host_state(lab, "lb"), before, "detach restores the host");
    assert!(
        lab.in_host("client", || common::whoami_within(
            vip,
            6443,
            Duration::from_millis(500)
        ))
        .unwrap()
        .is_err()
    );
}

/// Under `ip netns exec` the default pin directory is on a bpffs the agent
/// mounts in its own mount namespace, which goes with it: the agent says so
/// at start, and the keep intent then releases (a program left attached with
/// no pins and no agent would be a VIP nobody manages).
#[test]
fn keep_without_pins_that_outlive_the_agent_releases_and_says_so() {
    let setup = setup();
    let lab = &setup.lab;
    let before = host_state(lab, "lb");
    let mut agent = lab
        .start_agent("lb", &setup.config, &["--on-stop", "keep"])
        .unwrap();
    assert!(
        agent
            .log()
            .contains("only this agent's mount namespace sees"),
        "{}",
        agent.log()
    );
    assert!(agent.stop(Duration::from_secs(10)).unwrap().success());
    assert!(agent.log().contains("releasing instead"), "{}", agent.log());
    assert_eq!(host_state(lab, "lb"), before);
}

/// A new `conntrack.max_flows` makes tables of another size: the restarted
/// agent copies the flows into new ones (before the program switch, and
/// again right after for the flows the old program made meanwhile), and
/// `check-config --iface` says so first.
#[test]
fn a_new_max_flows_migrates_the_flow_tables_under_load() {
    let mut setup = setup();
    let mut agent = start(&setup, &[]);
    let lab = &setup.lab;
    let resized = write_config(lab, "resized.yaml", &resized_config(lab));
    let told = check_config_told(&setup, &resized);
    assert!(
        told.contains("resized (CONNTRACK") && told.contains("-> 4096 entries"),
        "{told}"
    );
    assert!(told.contains("tag "), "{told}");
    setup.config = resized;
    let mut migrated = None;
    let report = under_load(lab, Duration::from_secs(1), || {
        agent.stop(Duration::from_secs(10)).unwrap();
        migrated = Some(start(&setup, &[]));
        std::thread::sleep(Duration::from_secs(1));
    });
    assert_lossless(&report, "max_flows changed");
    let log = migrated.unwrap().log();
    assert!(log.contains("migrating the pinned flow tables"), "{log}");
    assert!(log.contains("after the switch"), "{log}");
}

/// Tables of another layout version (an upgrade that changed the entries)
/// cannot be adopted: `check-config --iface` says so, and `attach` refuses
/// while they hold flows, changing nothing: the attached program goes on
/// serving them. `--accept-flow-loss` starts with empty tables.
#[test]
fn tables_of_another_layout_are_told_and_refused_while_they_hold_flows() {
    use aya::maps::{HashMap as BpfHashMap, Map, MapData};
    use ha_user::handover::{LAYOUT_VERSION, Record, RecordKey, RecordValue};

    let setup = setup();
    let lab = &setup.lab;
    let mut agent = start(&setup, &[]);
    let vip = lab.vip(0);
    lab.in_host("client", || {
        let mut session = common::Session::open(vip);
        session.assert_alive(2);
        agent.stop(Duration::from_secs(10)).unwrap();
        // What a build with another layout would have recorded.
        let data = MapData::from_pin(setup.pins.join("AGENT")).unwrap();
        let mut map: BpfHashMap<MapData, RecordKey, RecordValue> =
            BpfHashMap::try_from(Map::HashMap(data)).unwrap();
        let entries: Vec<_> = map.iter().map(|e| e.unwrap()).collect();
        let mut record = Record::from_entries(entries);
        record.layout = Some(LAYOUT_VERSION + 1);
        for (key, value) in record.entries() {
            map.insert(key, value, 0).unwrap();
        }
        let told = check_config_told(&setup, &setup.config);
        assert!(
            told.contains("REFUSED") && told.contains("layout version"),
            "{told}"
        );
        let why = attach_refused_pinned(&setup);
        assert!(why.contains("--accept-flow-loss"), "{why}");
        // Nothing changed: the old program still serves the connection.
        session.assert_alive(5);
        assert!(xdp_attached(lab));
        let accepted = start(&setup, &["--accept-flow-loss"]);
        assert!(
            accepted.log().contains("replacing the pinned flow tables"),
            "{}",
            accepted.log()
        );
        assert_eq!(program(lab).0, "adopted", "the link is still adopted");
    })
    .unwrap();
}

/// A VRRP pair (lb1 priority 150 master, lb2 100; the default 100 ms
/// adverts, a 2 s restart hold), both with the keep intent and their own pins.
fn vrrp_pair() -> (Lab, Vec<LabProcess>, [PathBuf; 2]) {
    let lab = Lab::new(&["client", "lb1", "lb2", "api1", "api2", "api3"]).unwrap();
    let apis = start_apiservers(&lab, &BACKENDS);
    let bpffs = lab.bpffs().unwrap();
    let configs = [("lb1", 150), ("lb2", 100)].map(|(lb, priority)| {
        let mut conf = vip_config(&lab, &BACKENDS);
        conf.vrrp = Some(VrrpConfig {
            priority,
            restart_hold: Duration::from_secs(2),
            ..config::vrrp(51)
        });
        write_config(&lab, &format!("{lb}.yaml"), &conf);
        (lb, bpffs.join(lb))
    });
    let pins = configs.map(|(_, pins)| pins);
    (lab, apis, pins)
}

/// [`vrrp_pair`] with both agents running and lb1 master: (lab,
/// apiservers, pins, lb1, lb2).
fn vrrp_pair_running() -> (Lab, Vec<LabProcess>, [PathBuf; 2], LabProcess, LabProcess) {
    let (lab, apis, pins) = vrrp_pair();
    let lb1 = start_lb(&lab, "lb1", &pins[0]);
    let lb2 = start_lb(&lab, "lb2", &pins[1]);
    lab.wait_until(Duration::from_secs(10), "lb1 alone holds the VIP", || {
        vip_holders(&lab) == ["lb1"]
    })
    .unwrap();
    (lab, apis, pins, lb1, lb2)
}

fn start_lb(lab: &Lab, lb: &str, pins: &Path) -> LabProcess {
    let config = lab.log_dir().join(format!("{lb}.yaml"));
    let args = agent_args(pins);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    lab.start_agent(lb, &config, &args).unwrap()
}

fn vip_holders(lab: &Lab) -> Vec<&'static str> {
    ["lb1", "lb2"]
        .into_iter()
        .filter(|lb| {
            let out = lab
                .exec(lb, &["ip", "-o", "addr", "show", "dev", HOST_IFACE])
                .unwrap()
                .stdout;
            String::from_utf8_lossy(&out).contains(&format!("{}/32", lab.vip(0)))
        })
        .collect()
}

fn vrrp_of(lab: &Lab, lb: &str) -> (String, u64) {
    let vrrp = status_json(lab, lb)["vrrp"].clone();
    (
        vrrp["state"].as_str().unwrap_or_default().to_string(),
        vrrp["transitions"].as_u64().unwrap_or_default(),
    )
}

/// In a VRRP pair, a master restarted with the keep intent resumes as
/// master: its last advert announced the restart hold, so the backup waits
/// three of it (not 3 x 100 ms) and never takes over, and no connection is
/// lost; also when the master's host does not answer the backup's ICMP
/// echo.
#[test]
fn a_vrrp_master_restarted_with_the_keep_intent_stays_master() {
    let (lab, _apis, pins, mut lb1, _lb2) = vrrp_pair_running();
    let backup_before = vrrp_of(&lab, "lb2");
    assert_eq!(backup_before.0, "backup");
    // A master host that does not answer ICMP echo: its silence proves
    // nothing, the backup waits the hold out.
    lab.exec("lb1", &["sysctl", "-qw", "net.ipv4.icmp_echo_ignore_all=1"])
        .unwrap();
    let mut restarted = None;
    let report = under_load(&lab, Duration::from_secs(1), || {
        lb1.stop(Duration::from_secs(10)).unwrap();
        std::thread::sleep(Duration::from_millis(500));
        restarted = Some(start_lb(&lab, "lb1", &pins[0]));
        std::thread::sleep(Duration::from_secs(3));
    });
    assert_lossless(&report, "VRRP master restarted with the keep intent");
    let restarted = restarted.unwrap();
    assert!(
        restarted.log().contains("VRRP resumes as master"),
        "{}",
        restarted.log()
    );
    assert_eq!(
        vrrp_of(&lab, "lb2"),
        backup_before,
        "the backup never moved"
    );
    assert_eq!(vrrp_of(&lab, "lb1").0, "master");
    assert_eq!(vip_holders(&lab), ["lb1"]);
}

/// A master stopped with the keep intent that does not come back: its VIP
/// address expires as the backup takes over (no two hosts answer ARP for
/// it), and when it does come back it joins as backup first.
#[test]
fn a_kept_vrrp_master_that_stays_away_lets_its_address_expire() {
    let (lab, _apis, pins, mut lb1, _lb2) = vrrp_pair_running();
    lb1.stop(Duration::from_secs(10)).unwrap();
    assert_eq!(vip_holders(&lab), ["lb1"], "kept at first");
    // lb2 is master after 3 x 2 s + skew; lb1's address lives 4 x 2 s.
    lab.wait_until(Duration::from_secs(12), "lb2 alone holds the VIP", || {
        vip_holders(&lab) == ["lb2"]
    })
    .unwrap();
    assert_eq!(vrrp_of(&lab, "lb2").0, "master");
    let lb1 = start_lb(&lab, "lb1", &pins[0]);
    assert!(
        lb1.log().contains("VRRP started as backup"),
        "{}",
        lb1.log()
    );
}

/// A kept master whose host then goes down (a node shut down after its pod
/// stopped with the keep intent): the backup, watching the host with ICMP
/// echo during the hold, takes over after its own Master_Down_Interval of
/// silence, not after 3 x restart_hold. While the host answers, it waits.
#[test]
fn a_kept_vrrp_master_whose_host_goes_down_is_replaced_at_once() {
    let (lab, _apis, _pins, mut lb1, lb2) = vrrp_pair_running();
    lb1.stop(Duration::from_secs(10)).unwrap();
    // Twice the backup's normal Master_Down_Interval: the host answers, so
    // the hold stands.
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(vrrp_of(&lab, "lb2").0, "backup");
    assert!(lb2.log().contains("watching its host"), "{}", lb2.log());
    lab.set_link("lb1", false).unwrap();
    let took = lab
        .wait_until(Duration::from_secs(5), "lb2 master", || {
            vrrp_of(&lab, "lb2").0 == "master"
        })
        .unwrap();
    assert!(
        took < Duration::from_secs(2),
        "{took:?}; the hold is 2 s x 3"
    );
    assert!(lb2.log().contains("stopped answering"), "{}", lb2.log());
    let vip = lab.vip(0);
    lab.in_host("client", || {
        lab.wait_until(Duration::from_secs(5), "the VIP answers", || {
            common::whoami(vip, 6443).is_ok()
        })
    })
    .unwrap()
    .unwrap();
}

/// A connection's two halves.
type OpenSession = (TcpStream, BufReader<TcpStream>);

/// Long-lived connections opened every 10 ms until `stop`, each checked at
/// once: the threads run in the client's namespace.
fn open_sessions_until(
    vip: Ipv4Addr,
    stop: Arc<AtomicBool>,
) -> JoinHandle<Vec<Result<OpenSession, String>>> {
    std::thread::spawn(move || {
        let mut sessions = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let opened =
                TcpStream::connect_timeout(&SocketAddr::from((vip, 6443)), Duration::from_secs(1))
                    .and_then(|stream| {
                        stream.set_read_timeout(Some(Duration::from_secs(3)))?;
                        let mut writer = stream.try_clone()?;
                        let mut reader = BufReader::new(stream);
                        match exchange(&mut writer, &mut reader, "hello")? {
                            line if line == "hello\n" => Ok((writer, reader)),
                            line => Err(std::io::Error::other(format!("answered {line:?}"))),
                        }
                    })
                    .map_err(|e| e.to_string());
            sessions.push(opened);
            std::thread::sleep(Duration::from_millis(10));
        }
        sessions
    })
}

/// A restart that moves the NAT range: connections the old program opens
/// while the new agent starts (from the old range, and here the only ones,
/// so no adopted flow covers their ports) stay translated after the switch:
/// the record names the running program's NAT source, which the new agent
/// keeps live. A connection is opened every 10 ms while it starts.
#[test]
fn connections_opened_while_a_restart_moves_the_nat_range_keep_answering() {
    let mut setup = setup();
    let mut agent = start(&setup, &[]);
    let lab = &setup.lab;
    let vip = lab.vip(0);
    let mut moved = vip_config(lab, &BACKENDS);
    moved.data_plane.nat.port_range = PortRange {
        min: 2000,
        max: 9000,
    };
    setup.config = write_config(lab, "moved.yaml", &moved);
    agent.stop(Duration::from_secs(10)).unwrap();
    // Connections from the moment the new agent has scanned the tables
    // (its record's health is adopted just after) until after it serves.
    let args = agent_args(&setup.pins);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut restarted = lab.spawn_agent("lb", &setup.config, &args, &[]).unwrap();
    restarted
        .wait_for_log("health and drains adopted", Duration::from_secs(15))
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let opener = {
        let stop = stop.clone();
        lab.in_host("client", move || open_sessions_until(vip, stop))
            .unwrap()
    };
    restarted
        .wait_for_log("serving;", Duration::from_secs(15))
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let opened = opener.join().unwrap();
    assert!(opened.len() > 10, "{} opened", opened.len());
    let broken: Vec<String> = opened
        .into_iter()
        .enumerate()
        .filter_map(|(i, session)| match session {
            Ok((mut writer, mut reader)) => match exchange(&mut writer, &mut reader, "again") {
                Ok(line) if line == "again\n" => None,
                other => Some(format!("{i}: {other:?}")),
            },
            Err(e) => Some(format!("{i}: opening: {e}")),
        })
        .collect();
    assert!(
        broken.is_empty(),
        "connections opened during the start broke: {broken:?}"
    );
}

/// A backend removed from the config, by reload or across a restart: its
/// open connections go on (its flows, backend record and neighbour entry
/// stay until the flows end), and no new connection reaches it.
#[test]
fn a_removed_backend_keeps_its_open_connections_across_reload_and_restart() {
    let setup = setup();
    let mut agent = start(&setup, &[]);
    let lab = &setup.lab;
    let vip = lab.vip(0);
    lab.in_host("client", || {
        let mut on_api1 = common::Session::to(vip, "api1");
        let fewer = vip_config(lab, &["api2", "api3"]);
        std::fs::write(&setup.config, fewer.to_yaml()).unwrap();
        common::reload(lab, "lb").unwrap();
        on_api1.assert_alive(5);
        let served: Vec<String> = (0..10)
            .map(|_| common::whoami(vip, 6443).unwrap().0)
            .collect();
        assert!(!served.contains(&"api1".to_string()), "{served:?}");
        // And across a restart to a config without api2 either.
        let mut on_api2 = common::Session::to(vip, "api2");
        agent.stop(Duration::from_secs(10)).unwrap();
        let fewer = write_config(lab, "fewer.yaml", &vip_config(lab, &["api3"]));
        let args = agent_args(&setup.pins);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let _restarted = lab.start_agent("lb", &fewer, &args).unwrap();
        on_api1.assert_alive(5);
        on_api2.assert_alive(5);
    })
    .unwrap();
}

/// A start that fails after finding the data path of an earlier agent
/// changes nothing: the flow tables stay pinned as they were (even when it
/// was about to migrate them), forwarding stays on, and the program goes on
/// serving; the next good start adopts everything.
#[test]
fn a_failed_start_changes_nothing_under_the_running_data_path() {
    let setup = setup();
    let lab = &setup.lab;
    let original = lab
        .exec("lb", &["sysctl", "-n", "net.ipv4.conf.eth0.forwarding"])
        .unwrap()
        .stdout;
    assert_eq!(String::from_utf8_lossy(&original).trim(), "0");
    let mut agent = start(&setup, &[]);
    let vip = lab.vip(0);
    lab.in_host("client", || {
        let mut session = common::Session::open(vip);
        session.assert_alive(2);
        agent.stop(Duration::from_secs(10)).unwrap();
        let pinned = || {
            let mut names: Vec<String> = std::fs::read_dir(&setup.pins)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            names
        };
        let before = pinned();
        // 1. A config whose VRRP interface does not exist: fails after the load.
        let mut bad = vip_config(lab, &BACKENDS);
        bad.vrrp = Some(VrrpConfig {
            interface: Some("nosuch0".to_string()),
            ..config::vrrp(51)
        });
        let bad = write_config(lab, "bad-vrrp.yaml", &bad);
        // 2. A new max_flows (a migration) with an object that does not load.
        let resized = write_config(lab, "resized.yaml", &resized_config(lab));
        let garbage = lab.log_dir().join("garbage.o");
        std::fs::write(&garbage, b"not an ELF object").unwrap();
        let pins = setup.pins.display().to_string();
        for (config, env) in [(&bad, None), (&resized, Some(&garbage))] {
            let mut command = lab.command("lb", "env");
            if let Some(object) = env {
                command.arg(format!("HA_LB_XDP_OBJECT={}", object.display()));
            }
            let failed = command
                .arg(ha_lab::bin_path("ha-user"))
                .args(["attach", "--iface", HOST_IFACE, "--config"])
                .arg(config)
                .args(["--pin-dir", &pins, "--on-stop", "keep"])
                .output()
                .unwrap();
            assert!(!failed.status.success(), "{failed:?}");
            assert_eq!(pinned(), before, "the pins are as they were");
            let forwarding = lab
                .exec("lb", &["sysctl", "-n", "net.ipv4.conf.eth0.forwarding"])
                .unwrap()
                .stdout;
            assert_eq!(String::from_utf8_lossy(&forwarding).trim(), "1");
            session.assert_alive(3);
        }
        let args = agent_args(&setup.pins);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let next = lab.start_agent("lb", &resized, &args).unwrap();
        assert!(
            next.log().contains("migrating the pinned flow tables"),
            "{}",
            next.log()
        );
        session.assert_alive(3);
    })
    .unwrap();
}

/// A VRRP master stopped with the keep intent gives its VIP address a
/// lifetime; whichever agent holds the VIP next (here one with the vrrp
/// section removed, which only a restart can do) makes it permanent again.
#[test]
fn a_kept_address_is_permanent_again_under_the_next_holder() {
    let (lab, _apis, pins) = vrrp_pair();
    let mut lb1 = start_lb(&lab, "lb1", &pins[0]);
    lab.wait_until(Duration::from_secs(10), "lb1 holds the VIP", || {
        vip_holders(&lab) == ["lb1"]
    })
    .unwrap();
    let vip_line = || {
        let out = lab
            .exec("lb1", &["ip", "-o", "addr", "show", "dev", HOST_IFACE])
            .unwrap()
            .stdout;
        String::from_utf8_lossy(&out)
            .lines()
            .find(|l| l.contains(&format!("{}/32", lab.vip(0))))
            .unwrap_or_default()
            .to_string()
    };
    lb1.stop(Duration::from_secs(10)).unwrap();
    assert!(!vip_line().contains("valid_lft forever"), "{}", vip_line());
    let static_config = write_config(&lab, "lb1-static.yaml", &vip_config(&lab, &BACKENDS));
    let args = agent_args(&pins[0]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let _lb1 = lab.start_agent("lb1", &static_config, &args).unwrap();
    assert!(vip_line().contains("valid_lft forever"), "{}", vip_line());
    std::thread::sleep(Duration::from_secs(9));
    assert_eq!(vip_holders(&lab), ["lb1"], "still there after 4 x the hold");
}

/// A restarted agent that resumed as VRRP master and then died (killed
/// during its start) told the backups the normal interval again: the next
/// agent must not resume from the older record of a hold, because a backup
/// may be master by then. It starts as backup.
#[test]
fn an_agent_that_died_after_resuming_leaves_no_stale_resume() {
    let (lab, _apis, pins, mut lb1, _lb2) = vrrp_pair_running();
    lb1.stop(Duration::from_secs(10)).unwrap();
    // Killed as soon as it has resumed, before anything else it does.
    let config = lab.log_dir().join("lb1.yaml");
    let args = agent_args(&pins[0]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut resumed = lab.spawn_agent("lb1", &config, &args, &[]).unwrap();
    resumed
        .wait_for_log("VRRP resumes as master", Duration::from_secs(15))
        .unwrap();
    kill_9(&mut resumed);
    assert!(!resumed.log().contains("serving;"), "{}", resumed.log());
    // 3 x 100 ms + skew later lb2 is master; the next lb1 agent comes after.
    std::thread::sleep(Duration::from_millis(600));
    let next = start_lb(&lab, "lb1", &pins[0]);
    assert!(
        next.log().contains("VRRP started as backup"),
        "{}",
        next.log()
    );
}

/// Signals that arrive while the agent starts are held until it serves:
/// SIGHUP then reloads (it does not kill the agent half way through a
/// start), SIGTERM then stops it with its intent.
#[test]
fn signals_during_the_start_are_answered_once_the_agent_serves() {
    let setup = setup();
    let lab = &setup.lab;
    let spawn = |intent: &str| {
        let pins = setup.pins.display().to_string();
        let args = ["--pin-dir", &pins, "--on-stop", intent];
        let mut agent = lab.spawn_agent("lb", &setup.config, &args, &[]).unwrap();
        agent
            .wait_for_log("telemetry endpoint listening", Duration::from_secs(15))
            .unwrap();
        agent
    };
    let mut agent = spawn("keep");
    agent.signal(Signal::SIGHUP).unwrap();
    agent
        .wait_for_log("reload applied", Duration::from_secs(15))
        .unwrap();
    assert!(agent.log().contains("serving;"), "{}", agent.log());
    assert!(agent.wait_timeout(Duration::ZERO).unwrap().is_none());
    agent.stop(Duration::from_secs(10)).unwrap();
    let before_release = host_state(lab, "lb");
    let mut releasing = spawn("release");
    releasing.signal(Signal::SIGTERM).unwrap();
    let status = releasing.wait_timeout(Duration::from_secs(15)).unwrap();
    assert!(status.is_some_and(|s| s.success()), "{}", releasing.log());
    assert!(releasing.log().contains("released:"), "{}", releasing.log());
    assert!(!setup.pins.exists(), "release removes the pins");
    assert!(!xdp_attached(lab) && !has_vip(lab), "{before_release}");
}

/// A VRRP master's VIP address is a lease its agent renews: when the agent
/// is killed and no agent comes back, a backup takes over after its
/// Master_Down_Interval and the old host stops answering for the VIP when
/// the lease ends (5 s at 100 ms adverts), not never.
#[test]
fn a_killed_vrrp_master_lets_its_address_lease_run_out() {
    let (lab, _apis, _pins, mut lb1, _lb2) = vrrp_pair_running();
    kill_9(&mut lb1);
    lab.wait_until(Duration::from_secs(3), "lb2 master", || {
        vrrp_of(&lab, "lb2").0 == "master"
    })
    .unwrap();
    let alone = lab
        .wait_until(Duration::from_secs(10), "lb2 alone holds the VIP", || {
            vip_holders(&lab) == ["lb2"]
        })
        .unwrap();
    assert!(alone <= Duration::from_secs(7), "{alone:?}");
}
