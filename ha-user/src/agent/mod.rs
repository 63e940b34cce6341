//! `ha-user attach`: the agent.
//!
//! A few tokio tasks joined by channels, with one owner per piece of state:
//!
//! ```text
//!  probe task (one per VIP backend) ──HealthReport──┐
//!  VRRP announcer (adverts, timers) ──Own/Release───┤
//!  admin socket (status/drain/undrain/reload/stop) ─┼──> reconciler ──> data plane maps
//!  signals (SIGHUP reload, SIGTERM/SIGINT stop) ────┘    (this loop)     VIP addresses, neighbours
//!                                        reconciler ──Track──> announcer (priority, fault)
//! ```
//!
//! The reconciler owns the config, every backend's health, the operator's
//! drains and the data plane; on any change it recomputes the desired state
//! and lets [`DataPlane::apply`] swap in the tables that changed.
//!
//! Start-up validates everything before touching the host, and a start that
//! fails before the program switch changes nothing. SIGTERM or SIGINT stop
//! with the `--on-stop` intent: release removes what ha-lb added, keep
//! leaves the data path serving for the next agent (docs/operations.md).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use ha_common::Verdict;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
    task::JoinHandle,
};
use tracing::{error, info, warn};

use crate::{
    admin::{self, Request, Response},
    blackhole,
    config::{CheckConfig, Config, Listen, VrrpConfig},
    dataplane::{AttachMode, DataPlane, LoadOptions, monotonic_coarse_ns},
    garp,
    handover::{self, BackendRecord, BackendRef, Record, StopIntent, VrrpRecord, VrrpStart},
    health::{Checker, Health, Timing},
    netlink::Netlink,
    probe::{Outcome, Prober},
    status::{BackendStatus, ConntrackStatus, LastCheck, StatusReport, Traffic, VipStatus},
    system, telemetry,
    vrrp::{announcer, machine::MachineConfig},
};

pub struct AttachOptions {
    pub iface: String,
    pub config_path: PathBuf,
    pub xdp_mode: AttachMode,
    /// Print counters this often (zero: never).
    pub stats_interval: Duration,
    /// Where to pin the connection tables so a restart adopts them.
    pub pin: PinLocation,
    /// What SIGTERM and SIGINT mean.
    pub on_stop: StopIntent,
    /// Replace pinned flow tables this build cannot adopt (their flows are lost).
    pub accept_flow_loss: bool,
}

pub enum PinLocation {
    /// The per-namespace default under /sys/fs/bpf (see `system::pin_dir`).
    Auto,
    Dir(PathBuf),
    Off,
}

/// How often ended flows are swept from the connection table.
const SWEEP_INTERVAL: Duration = Duration::from_secs(10);
/// How often VRRP tracking looks at the interface and the XDP attachment.
const LINK_CHECK_INTERVAL: Duration = Duration::from_millis(500);
/// How often the black-hole detector samples the data path's counters.
const DATA_PATH_CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// Time a restarted agent may still need, after deciding, to send its first
/// VRRP advertisement (it decides before loading the program).
const VRRP_RESUME_MARGIN: Duration = Duration::from_millis(500);

/// The signals the agent answers, installed first thing: one that arrives
/// while the agent starts (a migration of a large table takes seconds) is
/// held until it serves, not fatal half way: SIGHUP then reloads, SIGTERM
/// and SIGINT stop with the intent.
struct Signals {
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
    hangup: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> Result<Self> {
        Ok(Self {
            terminate: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            interrupt: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
            hangup: signal(SignalKind::hangup()).context("installing the SIGHUP handler")?,
        })
    }
}

/// The running VRRP instance, as the reconciler sees it.
struct Vrrp {
    commands: mpsc::Sender<announcer::Command>,
    status: Arc<Mutex<announcer::VrrpStatus>>,
    config: VrrpConfig,
    /// The last (priority, fault) sent to the announcer.
    tracked: (u8, bool),
    /// From the last link check: interface up, XDP attached.
    link: (bool, bool),
    /// Started as master, resuming the previous agent's mastership.
    resumed: bool,
}

pub mod decide;

use decide::BackendKey;

/// A probe task's result, tagged with the task's generation so that a report
/// from a task replaced by a reload is ignored.
struct HealthReport {
    key: BackendKey,
    generation: u64,
    outcome: Outcome,
    health: Health,
}

struct ProbeTask {
    check: CheckConfig,
    generation: u64,
    handle: JoinHandle<()>,
}

impl Drop for ProbeTask {
    fn drop(&mut self) {
        self.handle.abort();
    }
}

struct BackendHealth {
    health: Health,
    since: Instant,
    last: Option<(Outcome, Instant)>,
    checks: u64,
}

/// Everything the agent owns, and everything it changed on the host, so it
/// can undo exactly that.
struct Agent {
    options: AttachOptions,
    netlink: Netlink,
    ifindex: u32,
    mac: [u8; 6],
    lb_addr: Ipv4Addr,
    xdp_mode: &'static str,
    started: Instant,
    dataplane: DataPlane,
    config: Config,
    health: BTreeMap<BackendKey, BackendHealth>,
    /// Backends an operator drained (`ha-user drain`): maintenance.
    maintenance: BTreeSet<BackendKey>,
    probes: HashMap<BackendKey, ProbeTask>,
    next_generation: u64,
    health_tx: mpsc::Sender<HealthReport>,
    /// VIPs currently failing open.
    failing_open: BTreeSet<String>,
    /// VIP addresses this agent added (not ones that were already there).
    added_addresses: BTreeSet<Ipv4Addr>,
    /// Managed neighbour entries this agent added.
    added_neighbours: BTreeSet<Ipv4Addr>,
    /// Backend addresses that are this host's own (found at each config apply).
    local_backends: HashSet<Ipv4Addr>,
    /// Whether this host answers for the VIPs now: always without VRRP,
    /// as VRRP master otherwise.
    holding: bool,
    vrrp: Option<Vrrp>,
    forwarding: system::ForwardingGuard,
    /// Whether the data path's packets are answered (docs/operations.md).
    blackhole: blackhole::Detector,
    /// What the detector counts as new flows, from the backends' totals.
    new_flow_totals: blackhole::Accumulator<(Ipv4Addr, u16)>,
    /// The attach interface is a veth (the remedies differ).
    veth: bool,
    /// Health the last agent recorded, for the probes that start now.
    seeded: HashMap<BackendKey, Health>,
    /// The pins outlive this process (the keep intent can keep anything).
    durable_pins: bool,
}

pub async fn run(options: AttachOptions) -> Result<()> {
    let mut signals = Signals::install()?;
    let config = Config::load(&options.config_path)?;
    let iface = options.iface.clone();
    if options.xdp_mode == AttachMode::Generic {
        // Before anything on the host changes.
        return Err(crate::dataplane::DataPlaneError::GenericRefused { iface }.into());
    }
    system::check_nat_port_range(config.data_plane.nat.port_range)?;
    let probers = build_probers(&config)?;
    let netlink = Netlink::connect()?;
    let ifindex = netlink.interface_index(&iface).await?;
    let kind = netlink.link_kind(ifindex).await?;
    system::check_attach_kind(&iface, kind.as_deref())?;
    let mac = netlink.interface_mac(ifindex).await?;
    let lb_addr = nat_source(&netlink, &iface, ifindex, &config).await?;
    let telemetry = match config.telemetry.listen {
        Listen::At(address) => Some(telemetry::bind(address).await?),
        Listen::Off => None,
    };
    let (admin_tx, mut admin_rx) = mpsc::channel::<admin::Command>(16);
    if let Some(listener) = telemetry {
        info!(address = %config.telemetry.listen, "telemetry endpoint listening: /livez, /readyz, /metrics");
        telemetry::serve(listener, admin_tx.clone());
    }
    admin::serve(&iface, admin_tx)?;
    let mut forwarding = system::ForwardingGuard::enable(&iface)?;
    let (pin_dir, durable_pins) = match resolve_pin_dir(&iface, &options.pin) {
        Some((dir, durable)) => (Some(dir), durable),
        None => (None, false),
    };
    if pin_dir.is_some() && !durable_pins {
        warn!(
            pin_dir = ?pin_dir,
            "the pins are on a bpffs only this agent's mount namespace sees (as under `ip netns exec`): \
             they go with the agent, so the data path cannot outlive it and --on-stop keep acts as release; \
             pass --pin-dir on the host's bpffs"
        );
    }
    let dp = &config.data_plane;
    let mut dataplane = DataPlane::load(&LoadOptions {
        maglev_table_size: dp.maglev_table_size,
        max_vips: dp.max_vips,
        max_flows: dp.conntrack.max_flows,
        pin_dir,
        host_ports: system::local_port_range()
            .ok()
            .map(|range| (range.min, range.max)),
        accept_flow_loss: options.accept_flow_loss,
    })
    .context("loading the XDP program")?;
    let mut logger = if dp.debug {
        dataplane.take_logger()
    } else {
        None
    };
    // Settings before the program sees a packet: a restart's adopted flows
    // get their replies translated from the first one.
    dataplane
        .write_settings(&dp.settings(lb_addr))
        .context("writing the data plane settings")?;
    dataplane.set_tx_ports(&netlink.interface_indexes().await?)?;
    let veth = kind.as_deref() == Some("veth");
    let record = dataplane.found_record().cloned().unwrap_or_default();
    forwarding.remember_original(record.forwarding_was);
    if dataplane.found_link() {
        forwarding.defer_to_running_data_path();
    }

    let (health_tx, mut health_rx) = mpsc::channel::<HealthReport>(256);
    let (vrrp_tx, mut vrrp_rx) = mpsc::channel::<announcer::Event>(16);
    let vrrp = match &config.vrrp {
        Some(vrrp_config) => {
            let now_ns = monotonic_coarse_ns();
            let start = handover::vrrp_start(
                record.vrrp,
                now_ns,
                vrrp_config.advert_interval,
                VRRP_RESUME_MARGIN,
            );
            if start == VrrpStart::ResumeMaster {
                // Before the first advert, which tells the backups the
                // configured interval again: should this agent die, the
                // next one must measure against that, not the hold.
                let mut resumed = record.clone();
                resumed.vrrp = Some(VrrpRecord {
                    master: true,
                    at_ns: now_ns,
                    announced: vrrp_config.advert_interval,
                });
                dataplane
                    .store_record(&resumed)
                    .context("writing the agent record before resuming as VRRP master")?;
            }
            Some(start_vrrp(&netlink, &iface, vrrp_config, &config, vrrp_tx, start).await?)
        }
        None => None,
    };
    let resumed = vrrp.as_ref().is_some_and(|v| v.resumed);
    let mut agent = Agent {
        options,
        netlink,
        ifindex,
        mac,
        lb_addr,
        xdp_mode: "none",
        started: Instant::now(),
        dataplane,
        config: config.clone(),
        health: BTreeMap::new(),
        maintenance: BTreeSet::new(),
        probes: HashMap::new(),
        next_generation: 0,
        health_tx,
        failing_open: BTreeSet::new(),
        added_addresses: BTreeSet::new(),
        added_neighbours: BTreeSet::new(),
        local_backends: HashSet::new(),
        holding: vrrp.is_none() || resumed,
        vrrp,
        forwarding,
        blackhole: blackhole::Detector::default(),
        new_flow_totals: blackhole::Accumulator::default(),
        veth,
        seeded: HashMap::new(),
        durable_pins,
    };
    agent.seed(&record);
    let result = async {
        // The whole desired state is in the new program's maps before it
        // sees a packet; then one switch (a new attachment, or the pinned
        // link pointed at it); then the addresses that draw traffic.
        agent.apply_config(&config, probers).await?;
        let mode = agent
            .dataplane
            .attach(&agent.options.iface, agent.options.xdp_mode)
            .with_context(|| format!("attaching to interface {}", agent.options.iface))?;
        agent.xdp_mode = mode.label();
        let (start, replaced) = agent.dataplane.start_kind();
        info!(
            iface = %agent.options.iface,
            mode = mode.label(),
            %lb_addr,
            start = start.label(),
            tag = %handover::tag_hex(agent.dataplane.program_tag()),
            replaced = ?replaced.map(handover::tag_hex),
            "XDP program attached"
        );
        agent.sync_vip_addresses().await?;
        agent.save_record();
        info!(
            vips = config.vips.len(),
            on_stop = agent.options.on_stop.label(),
            "serving; SIGHUP reloads the config, SIGTERM stops"
        );
        agent
            .serve(
                &mut signals,
                &mut health_rx,
                &mut admin_rx,
                &mut vrrp_rx,
                &mut logger,
            )
            .await
    }
    .await;
    let intent = match &result {
        Ok(intent) => *intent,
        Err(_) => agent.options.on_stop,
    };
    agent.shut_down(intent).await;
    result.map(|_| ())
}

/// The NAT source address for `config`: `nat.source_address`, which must be
/// an address of this host (the backends' replies go to it), or the
/// interface's primary address.
async fn nat_source(
    netlink: &Netlink,
    iface: &str,
    ifindex: u32,
    config: &Config,
) -> Result<Ipv4Addr> {
    match config.data_plane.nat.source_address {
        Some(address) => {
            if !netlink.local_addresses().await?.contains(&address) {
                anyhow::bail!(
                    "data_plane.nat.source_address: {address} is not an address of this host; \
                     the backends' replies to it would never reach the data path"
                );
            }
            if !netlink.has_address(ifindex, address).await? {
                warn!(
                    %address, %iface,
                    "data_plane.nat.source_address is not on the interface the data path is attached to: \
                     the backends' replies reach the data path only if they arrive on it (this host \
                     answers ARP for it there, unless arp_ignore says otherwise)"
                );
            }
            Ok(address)
        }
        None => Ok(netlink.primary_address(iface, ifindex).await?),
    }
}

/// Opens the VRRP socket and starts the announcer (as backup: nothing held yet).
async fn start_vrrp(
    netlink: &Netlink,
    attach_iface: &str,
    vrrp: &VrrpConfig,
    config: &Config,
    events: mpsc::Sender<announcer::Event>,
    start: VrrpStart,
) -> Result<Vrrp> {
    let iface = vrrp
        .interface
        .clone()
        .unwrap_or_else(|| attach_iface.to_string());
    let ifindex = netlink.interface_index(&iface).await?;
    let local_address = netlink.primary_address(&iface, ifindex).await?;
    let mut vips: Vec<Ipv4Addr> = config.vips.iter().map(|v| v.address).collect();
    vips.sort();
    vips.dedup();
    let status = Arc::new(Mutex::new(announcer::VrrpStatus::default()));
    let commands = announcer::spawn(
        announcer::AnnouncerSetup {
            iface: iface.clone(),
            local_address,
            vrid: vrrp.vrid,
            version: vrrp.version,
            checksum: vrrp.checksum,
            // One file can serve every LB host (a DaemonSet's ConfigMap):
            // the host's own address among the peers is skipped.
            unicast_peers: vrrp
                .unicast_peers
                .iter()
                .copied()
                .filter(|peer| *peer != local_address)
                .collect(),
            vips,
            machine: MachineConfig {
                priority: vrrp.priority,
                advert_interval_cs: (vrrp.advert_interval.as_millis() / 10) as u16,
                preempt: vrrp.preempt,
                preempt_delay: vrrp.preempt_delay,
                local_address,
            },
            fault: false,
            resume_master: start == VrrpStart::ResumeMaster,
        },
        events,
        status.clone(),
    )
    .with_context(|| format!("opening the VRRP socket on {iface}"))?;
    info!(
        %iface,
        vrid = vrrp.vrid,
        priority = vrrp.priority,
        %local_address,
        "VRRP started as {}",
        if start == VrrpStart::ResumeMaster { "master (resumed)" } else { "backup" }
    );
    Ok(Vrrp {
        resumed: start == VrrpStart::ResumeMaster,
        commands,
        status,
        config: vrrp.clone(),
        tracked: (vrrp.priority, false),
        link: (true, true),
    })
}

/// Probers for every VIP, built before anything changes (a bad CA file fails here).
fn build_probers(config: &Config) -> Result<HashMap<String, Arc<Prober>>> {
    config
        .vips
        .iter()
        .map(|vip| {
            let prober =
                Prober::new(&vip.check).with_context(|| format!("vips {}: check", vip.name))?;
            Ok((vip.name.clone(), Arc::new(prober)))
        })
        .collect()
}

impl Agent {
    async fn serve(
        &mut self,
        signals: &mut Signals,
        health_rx: &mut mpsc::Receiver<HealthReport>,
        admin_rx: &mut mpsc::Receiver<admin::Command>,
        vrrp_rx: &mut mpsc::Receiver<announcer::Event>,
        logger: &mut Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    ) -> Result<StopIntent> {
        let mut sweep = tokio::time::interval(SWEEP_INTERVAL);
        let stats_every = if self.options.stats_interval.is_zero() {
            Duration::from_secs(3600)
        } else {
            self.options.stats_interval
        };
        let mut stats = tokio::time::interval(stats_every);
        let mut log_flush = tokio::time::interval(Duration::from_millis(200));
        let mut link_check = tokio::time::interval(LINK_CHECK_INTERVAL);
        let mut data_path_check = tokio::time::interval(DATA_PATH_CHECK_INTERVAL);
        let refresh = self.config.garp.refresh;
        let mut garp_refresh = tokio::time::interval(if refresh.is_zero() {
            Duration::from_secs(3600)
        } else {
            refresh
        });
        loop {
            tokio::select! {
                _ = signals.terminate.recv() => {
                    info!(intent = self.options.on_stop.label(), "SIGTERM: stopping");
                    return Ok(self.options.on_stop);
                }
                _ = signals.interrupt.recv() => {
                    info!(intent = self.options.on_stop.label(), "SIGINT: stopping");
                    return Ok(self.options.on_stop);
                }
                _ = signals.hangup.recv() => {
                    if let Err(e) = self.reload().await {
                        error!("{e}");
                    }
                }
                Some(report) = health_rx.recv() => self.on_health(report).await,
                Some(event) = vrrp_rx.recv() => self.on_vrrp(event).await,
                _ = link_check.tick(), if self.vrrp.is_some() => {
                    self.check_link().await;
                    self.renew_address_leases().await;
                    // The VRRP state's time: how fresh a restart finds it.
                    self.save_record();
                }
                _ = data_path_check.tick() => self.check_data_path(),
                _ = garp_refresh.tick(), if !refresh.is_zero() && self.holding => self.announce_vips(),
                Some((request, reply)) = admin_rx.recv() => {
                    if let Request::Stop { intent } = request {
                        info!(intent = intent.label(), "stop requested");
                        let _ = reply.send(Response::ok(format!("stopping ({})", intent.label())));
                        return Ok(intent);
                    }
                    let response = self.on_request(request).await;
                    let _ = reply.send(response);
                }
                _ = sweep.tick() => {
                    match self.dataplane.sweep_flows(monotonic_coarse_ns()) {
                        Ok(report) if report.reverse_recovered > 0 || report.orphans_freed > 0 => warn!(
                            live = report.live,
                            expired = report.expired,
                            reverse_recovered = report.reverse_recovered,
                            orphans_freed = report.orphans_freed,
                            "swept the connection tables; some entries had lost their other half"
                        ),
                        Ok(report) if report.expired > 0 => info!(live = report.live, expired = report.expired, "swept ended flows"),
                        Ok(_) => {}
                        Err(e) => warn!(error = %e, "sweeping the connection table"),
                    }
                    // Retired backends the sweep freed need no neighbour entry.
                    self.prune_neighbours().await;
                }
                _ = stats.tick(), if !self.options.stats_interval.is_zero() => self.print_stats(),
                _ = log_flush.tick(), if logger.is_some() => {
                    if let Some(logger) = logger.as_mut() { logger.flush(); }
                }
            }
        }
    }

    async fn on_request(&mut self, request: Request) -> Response {
        match request {
            Request::Status => Response {
                ok: true,
                message: None,
                status: Some(self.status()),
            },
            Request::Reload => match self.reload().await {
                Ok(message) => Response::ok(message),
                Err(message) => Response::error(message),
            },
            Request::Drain { vip, backend } => self.set_maintenance(&vip, &backend, true).await,
            Request::Undrain { vip, backend } => self.set_maintenance(&vip, &backend, false).await,
            Request::Stop { .. } => Response::error("handled by the event loop".to_string()),
        }
    }

    /// Finds `backend` (`ADDRESS` or `ADDRESS:PORT`) among the backends of VIP `vip`.
    fn find_backend(&self, vip: &str, backend: &str) -> Result<BackendKey, String> {
        let config = self
            .config
            .vips
            .iter()
            .find(|v| v.name == vip)
            .ok_or_else(|| {
                let names: Vec<&str> = self.config.vips.iter().map(|v| v.name.as_str()).collect();
                format!("no VIP named {vip:?} (VIPs: {})", names.join(", "))
            })?;
        let (address, port) = match backend.rsplit_once(':') {
            Some((address, port)) => (
                address,
                Some(
                    port.parse::<u16>()
                        .map_err(|e| format!("port in {backend:?}: {e}"))?,
                ),
            ),
            None => (backend, None),
        };
        let address: Ipv4Addr = address
            .parse()
            .map_err(|e| format!("address in {backend:?}: {e}"))?;
        config
            .backends
            .iter()
            .find(|b| b.address == address && port.is_none_or(|p| p == b.port()))
            .map(|b| BackendKey {
                vip: vip.to_string(),
                address,
                port: b.port(),
            })
            .ok_or_else(|| format!("VIP {vip} has no backend {backend}"))
    }

    async fn set_maintenance(&mut self, vip: &str, backend: &str, on: bool) -> Response {
        let key = match self.find_backend(vip, backend) {
            Ok(key) => key,
            Err(message) => return Response::error(message),
        };
        let changed = if on {
            self.maintenance.insert(key.clone())
        } else {
            self.maintenance.remove(&key)
        };
        if !changed {
            return Response::ok(format!(
                "{key} was already {}",
                if on {
                    "in maintenance"
                } else {
                    "out of maintenance"
                }
            ));
        }
        info!(backend = %key, maintenance = on, "operator {}", if on { "drained the backend" } else { "undrained the backend" });
        let applied = self.apply_data_plane();
        self.track().await;
        match applied {
            Ok(()) => Response::ok(format!(
                "{key} {}",
                if on {
                    "in maintenance: no new flows, established flows stay"
                } else {
                    "back to its health state"
                }
            )),
            Err(e) => Response::error(format!("{e:#}")),
        }
    }

    async fn on_health(&mut self, report: HealthReport) {
        let current = self.probes.get(&report.key).map(|task| task.generation);
        if current != Some(report.generation) {
            return; // from a task a reload replaced
        }
        let now = Instant::now();
        let entry = self
            .health
            .entry(report.key.clone())
            .or_insert(BackendHealth {
                health: Health::Up,
                since: now,
                last: None,
                checks: 0,
            });
        entry.checks += 1;
        let previous = entry.health;
        entry.last = Some((report.outcome.clone(), now));
        if report.health == previous {
            return;
        }
        let in_previous = now.duration_since(entry.since);
        entry.health = report.health;
        entry.since = now;
        let outcome = &report.outcome;
        let message = format!("backend {} -> {}", previous.label(), report.health.label());
        match report.health {
            Health::Up => info!(
                backend = %report.key, from = previous.label(), to = "up", reason = %outcome.detail,
                latency_ms = outcome.latency.as_micros() as f64 / 1000.0, after = ?in_previous, "{message}"
            ),
            Health::Draining | Health::Down => warn!(
                backend = %report.key, from = previous.label(), to = report.health.label(), reason = %outcome.detail,
                latency_ms = outcome.latency.as_micros() as f64 / 1000.0, after = ?in_previous, "{message}"
            ),
        }
        if let Err(e) = self.apply_data_plane() {
            error!("applying a health change to the data plane: {e:#}");
        }
        self.track().await;
    }

    /// The announcer says whether to hold the VIPs.
    async fn on_vrrp(&mut self, event: announcer::Event) {
        match event {
            announcer::Event::Own(hold) => {
                if hold == self.holding {
                    return;
                }
                self.holding = hold;
                // Data plane first when taking over (ready before the ARP
                // announcement draws traffic), last when releasing.
                let result = if hold {
                    let applied = self.apply_data_plane();
                    applied.and(self.sync_vip_addresses().await)
                } else {
                    let synced = self.sync_vip_addresses().await;
                    synced.and(self.apply_data_plane())
                };
                match result {
                    Ok(()) => info!(
                        holding = hold,
                        "VIPs {}",
                        if hold {
                            "taken (VRRP master)"
                        } else {
                            "released"
                        }
                    ),
                    Err(e) => error!(
                        "{} the VIPs: {e:#}",
                        if hold { "taking" } else { "releasing" }
                    ),
                }
            }
            announcer::Event::Reannounce => self.announce_vips(),
        }
    }

    /// VRRP tracking: fault when the interface is down or the program is not
    /// attached; for a VIP without a backend up, fault or a lower priority.
    async fn track(&mut self) {
        let no_healthy_backend = !self.failing_open.is_empty();
        let Some(vrrp) = self.vrrp.as_mut() else {
            return;
        };
        let (link_up, xdp_attached) = vrrp.link;
        let (priority, fault) = decide::tracked(
            vrrp.config.priority,
            vrrp.config.track.no_healthy_backend,
            decide::TrackedState {
                link_up,
                xdp_attached,
                no_healthy_backend,
            },
        );
        if (priority, fault) == vrrp.tracked {
            return;
        }
        vrrp.tracked = (priority, fault);
        info!(
            priority,
            fault, link_up, xdp_attached, no_healthy_backend, "VRRP tracking changed"
        );
        let _ = vrrp
            .commands
            .send(announcer::Command::Track { priority, fault })
            .await;
    }

    async fn check_link(&mut self) {
        let Some(vrrp) = self.vrrp.as_mut() else {
            return;
        };
        match self.netlink.link_health(self.ifindex).await {
            Ok(link) if link != vrrp.link => {
                vrrp.link = link;
                self.track().await;
            }
            Ok(_) => {}
            Err(e) => warn!(error = %e, "checking the interface for VRRP tracking"),
        }
    }

    /// Gratuitous ARP for every VIP address (a re-announcement).
    fn announce_vips(&self) {
        self.announce(self.config.vips.iter().map(|v| v.address).collect());
    }

    /// The one gratuitous-ARP path: `garp.count` announcements (at least
    /// one: taking a VIP without telling the LAN would leave the clients on
    /// the old holder) `garp.interval` apart, for each address, in the
    /// background.
    fn announce(&self, addresses: BTreeSet<Ipv4Addr>) {
        if addresses.is_empty() {
            return;
        }
        let (ifindex, mac, garp) = (self.ifindex, self.mac, self.config.garp.clone());
        tokio::spawn(async move {
            for vip in addresses {
                if let Err(e) =
                    garp::announce(ifindex, mac, vip, garp.count.max(1), garp.interval).await
                {
                    warn!(error = %e, "gratuitous ARP");
                }
            }
        });
    }

    /// Re-reads the config; one that does not validate, or that would need a
    /// restart, is refused and the running one stays.
    async fn reload(&mut self) -> Result<String, String> {
        let path = self.options.config_path.clone();
        let refuse = |why: String| {
            let message = format!("reload rejected, the running config stays: {why}");
            error!("{message}");
            message
        };
        let next = Config::load(&path).map_err(|e| refuse(e.to_string()))?;
        let restart = self.config.restart_needed_for(&next);
        if !restart.is_empty() {
            return Err(refuse(format!(
                "{} (needs an agent restart)",
                restart.join(", ")
            )));
        }
        system::check_nat_port_range(next.data_plane.nat.port_range)
            .map_err(|e| refuse(e.to_string()))?;
        // Plan: the NAT source must resolve and fit beside the earlier ones
        // that still have flows, before anything changes.
        let lb_addr = nat_source(&self.netlink, &self.options.iface, self.ifindex, &next)
            .await
            .map_err(|e| refuse(format!("{e:#}")))?;
        self.dataplane
            .plan_settings(&next.data_plane.settings(lb_addr))
            .map_err(|e| refuse(e.to_string()))?;
        let probers = build_probers(&next).map_err(|e| refuse(format!("{e:#}")))?;
        if lb_addr != self.lb_addr {
            info!(from = %self.lb_addr, to = %lb_addr, "NAT source address changes; open flows keep theirs");
        }
        let (previous, previous_lb_addr) = (self.config.clone(), self.lb_addr);
        self.lb_addr = lb_addr;
        if let Err(e) = self.apply_config(&next, probers).await {
            // Put the running config back whole: the data plane, probes and
            // addresses must not stay half way between the two.
            self.lb_addr = previous_lb_addr;
            let restored = match build_probers(&previous) {
                Ok(probers) => self.apply_config(&previous, probers).await,
                Err(e) => Err(e),
            };
            let message = match restored {
                Ok(()) => format!("reload failed, the running config was put back: {e:#}"),
                Err(again) => format!(
                    "reload failed part-way ({e:#}), and putting the running config back failed too ({again:#}); \
                     restart the agent"
                ),
            };
            error!("{message}");
            return Err(message);
        }
        info!(path = %path.display(), "reload applied");
        Ok(format!("reload applied from {}", path.display()))
    }

    /// Makes probes, neighbour entries, the data plane and the VIP addresses match `config`.
    async fn apply_config(
        &mut self,
        config: &Config,
        probers: HashMap<String, Arc<Prober>>,
    ) -> Result<()> {
        self.config = config.clone();
        self.sync_probes(&probers);
        let wanted: BTreeSet<BackendKey> = self.backend_keys().into_iter().collect();
        self.health.retain(|key, _| wanted.contains(key));
        self.maintenance.retain(|key| wanted.contains(key));

        // Neighbours first, so the first packets to a new backend find its MAC.
        let local = self.local_addresses().await?;
        let wanted_neighbours: BTreeSet<Ipv4Addr> = config
            .vips
            .iter()
            .flat_map(|v| &v.backends)
            .map(|b| b.address)
            .filter(|a| !local.contains(a))
            .collect();
        for address in wanted_neighbours.difference(&self.added_neighbours.clone()) {
            match self
                .netlink
                .add_managed_neighbour(self.ifindex, *address)
                .await
            {
                Ok(()) => {
                    self.added_neighbours.insert(*address);
                }
                Err(e) => {
                    warn!(error = %e, "the data path drops a backend's packets until its MAC is known")
                }
            }
        }
        self.apply_data_plane_with(&local)?;
        self.prune_neighbours().await;
        self.sync_vip_addresses().await
    }

    /// Removes the neighbour entries ha-lb added for backends that have no
    /// record any more: a backend removed from the config keeps its entry
    /// while flows may still name it (the data path forwards them by FIB
    /// lookup, which needs the MAC), until the sweep frees it.
    async fn prune_neighbours(&mut self) {
        let needed = self.dataplane.backend_addresses();
        let unneeded: Vec<Ipv4Addr> = self
            .added_neighbours
            .iter()
            .filter(|address| !needed.contains(address))
            .copied()
            .collect();
        for address in unneeded {
            if self
                .netlink
                .remove_neighbour(self.ifindex, address)
                .await
                .is_ok()
            {
                self.added_neighbours.remove(&address);
            }
        }
    }

    fn backend_keys(&self) -> Vec<BackendKey> {
        self.config
            .vips
            .iter()
            .flat_map(|vip| {
                vip.backends.iter().map(|b| BackendKey {
                    vip: vip.name.clone(),
                    address: b.address,
                    port: b.port(),
                })
            })
            .collect()
    }

    /// Starts probe tasks for new backends, restarts those whose check
    /// changed, stops those that are gone; unchanged ones keep running with
    /// their state.
    fn sync_probes(&mut self, probers: &HashMap<String, Arc<Prober>>) {
        let checks: HashMap<&str, &CheckConfig> = self
            .config
            .vips
            .iter()
            .map(|v| (v.name.as_str(), &v.check))
            .collect();
        let keys = self.backend_keys();
        let wanted: HashSet<&BackendKey> = keys.iter().collect();
        self.probes.retain(|key, task| {
            wanted.contains(key) && checks.get(key.vip.as_str()) == Some(&&task.check)
        });
        for key in &keys {
            if self.probes.contains_key(key) {
                continue;
            }
            let check = checks[key.vip.as_str()].clone();
            let prober = probers[&key.vip].clone();
            self.next_generation += 1;
            let generation = self.next_generation;
            let timing = Timing {
                interval: check.interval,
                fast_interval: check.fast_interval,
                down_interval: check.down_interval(),
                rise: check.rise,
                fall: check.fall,
            };
            let initial = self.seeded.remove(key);
            let handle = tokio::spawn(probe_loop(
                key.clone(),
                generation,
                prober,
                timing,
                initial.unwrap_or(Health::Up),
                self.health_tx.clone(),
            ));
            match initial {
                // What the last agent knew, until this one's checks say otherwise.
                Some(health) => {
                    self.health.insert(
                        key.clone(),
                        BackendHealth {
                            health,
                            since: Instant::now(),
                            last: None,
                            checks: 0,
                        },
                    );
                }
                None => {
                    self.health.remove(key);
                }
            }
            self.probes.insert(
                key.clone(),
                ProbeTask {
                    check,
                    generation,
                    handle,
                },
            );
        }
    }

    async fn local_addresses(&self) -> Result<HashSet<Ipv4Addr>> {
        let vip_addresses: HashSet<Ipv4Addr> = self.config.vips.iter().map(|v| v.address).collect();
        Ok(self
            .netlink
            .local_addresses()
            .await?
            .into_iter()
            .filter(|a| !vip_addresses.contains(a))
            .collect())
    }

    /// For health and drain changes: the host's own addresses are those found
    /// at the last config apply.
    fn apply_data_plane(&mut self) -> Result<()> {
        let local = self.local_backends.clone();
        self.apply_data_plane_with(&local)
    }

    /// Computes the desired tables from config, health and drains, and writes them.
    fn apply_data_plane_with(&mut self, local: &HashSet<Ipv4Addr>) -> Result<()> {
        self.local_backends = local.clone();
        let settings = self.config.data_plane.settings(self.lb_addr);
        let health: BTreeMap<BackendKey, Health> = self
            .health
            .iter()
            .map(|(key, h)| (key.clone(), h.health))
            .collect();
        let decide::Desired { vips, failing_open } = decide::desired_state(
            &self.config,
            &health,
            &self.maintenance,
            local,
            self.holding,
        );
        for name in failing_open.difference(&self.failing_open) {
            error!(vip = %name, "every backend of the VIP is down or draining: FAILING OPEN, traffic goes to all of them");
        }
        for name in self.failing_open.difference(&failing_open) {
            info!(vip = %name, "a backend is up again: no longer failing open");
        }
        self.failing_open = failing_open;
        let applied = self
            .dataplane
            .apply(&settings, &vips)
            .context("writing the data plane's maps");
        self.save_record();
        applied
    }

    /// Adds the VIP addresses while holding them (and announces each one
    /// added), removes them otherwise. Under VRRP the agent owns every VIP
    /// address, so one left on the interface by a killed agent goes too.
    async fn sync_vip_addresses(&mut self) -> Result<()> {
        if !self.dataplane.is_attached() {
            // Start-up: the addresses come after the program (see `run`).
            return Ok(());
        }
        let synced = self.sync_vip_addresses_now().await;
        self.save_record();
        synced
    }

    /// The lifetime of a VIP address this agent holds: under VRRP a lease it
    /// renews (`handover::held_address_lease`), without VRRP permanent.
    fn held_address_lifetime(&self) -> Option<u32> {
        self.vrrp
            .as_ref()
            .map(|vrrp| handover::held_address_lease(vrrp.config.advert_interval))
    }

    /// Renews the lease of the VIP addresses a VRRP master holds.
    async fn renew_address_leases(&mut self) {
        let Some(lease) = self.held_address_lifetime() else {
            return;
        };
        if !self.holding {
            return;
        }
        for address in self.added_addresses.clone() {
            if let Err(e) = self
                .netlink
                .set_vip_lifetime(self.ifindex, address, Some(lease))
                .await
            {
                warn!(vip = %address, error = %e, "renewing the VIP address's lease");
            }
        }
    }

    async fn sync_vip_addresses_now(&mut self) -> Result<()> {
        let configured: BTreeSet<Ipv4Addr> = self.config.vips.iter().map(|v| v.address).collect();
        let wanted: BTreeSet<Ipv4Addr> = if self.holding {
            configured.clone()
        } else {
            BTreeSet::new()
        };
        let mut added = Vec::new();
        let lifetime = self.held_address_lifetime();
        for address in &wanted {
            if self.netlink.has_address(self.ifindex, *address).await? {
                if self.added_addresses.contains(address) {
                    // A kept VRRP master gave it a longer lifetime
                    // (operations.md, "Stopping"); held now, it gets the
                    // holder's: a lease under VRRP, permanent otherwise.
                    self.netlink
                        .set_vip_lifetime(self.ifindex, *address, lifetime)
                        .await?;
                }
                continue;
            }
            self.netlink.add_vip(self.ifindex, *address).await?;
            if lifetime.is_some() {
                self.netlink
                    .set_vip_lifetime(self.ifindex, *address, lifetime)
                    .await?;
            }
            self.added_addresses.insert(*address);
            added.push(*address);
            info!(vip = %address, iface = %self.options.iface, "VIP address added");
        }
        self.announce(added.into_iter().collect());
        let mut unwanted: BTreeSet<Ipv4Addr> =
            self.added_addresses.difference(&wanted).copied().collect();
        if self.vrrp.is_some() {
            unwanted.extend(configured.difference(&wanted));
        }
        for address in unwanted {
            if self.netlink.has_address(self.ifindex, address).await? {
                self.netlink.remove_vip(self.ifindex, address).await?;
                info!(vip = %address, "VIP address removed");
            }
            self.added_addresses.remove(&address);
        }
        Ok(())
    }

    fn owner_label(&self) -> String {
        match &self.vrrp {
            None => "static".to_string(),
            Some(vrrp) => {
                let status = vrrp.status.lock().expect("status lock");
                match (status.state.as_str(), &status.master) {
                    ("backup", Some(master)) => format!("vrrp backup (master {master})"),
                    (state, _) => format!("vrrp {state}"),
                }
            }
        }
    }

    fn status(&self) -> StatusReport {
        let now = Instant::now();
        let traffic = self.dataplane.traffic().unwrap_or_default();
        let backend_traffic: HashMap<(Ipv4Addr, u16), Traffic> = traffic
            .backends
            .iter()
            .map(|(key, c)| {
                (
                    *key,
                    Traffic {
                        packets: c.packets,
                        bytes: c.bytes,
                        flows: c.new_flows,
                    },
                )
            })
            .collect();
        let vip_traffic: HashMap<&str, Traffic> = traffic
            .vips
            .iter()
            .map(|(name, c)| {
                (
                    name.as_str(),
                    Traffic {
                        packets: c.packets,
                        bytes: c.bytes,
                        flows: c.new_flows,
                    },
                )
            })
            .collect();
        let vips = self
            .config
            .vips
            .iter()
            .map(|vip| VipStatus {
                name: vip.name.clone(),
                address: vip.address.to_string(),
                port: vip.port,
                protocol: vip.protocol.to_string(),
                mode: "nat".to_string(),
                owner: self.owner_label(),
                fail_open: self.failing_open.contains(&vip.name),
                traffic: vip_traffic
                    .get(vip.name.as_str())
                    .copied()
                    .unwrap_or_default(),
                backends: vip
                    .backends
                    .iter()
                    .map(|b| {
                        let key = BackendKey {
                            vip: vip.name.clone(),
                            address: b.address,
                            port: b.port(),
                        };
                        let health = self.health.get(&key);
                        let state = if self.maintenance.contains(&key) {
                            "maintenance"
                        } else {
                            health.map_or(Health::Up, |h| h.health).label()
                        };
                        BackendStatus {
                            address: b.address.to_string(),
                            port: b.port(),
                            weight: b.weight,
                            state: state.to_string(),
                            in_state_seconds: health
                                .map_or(now.duration_since(self.started), |h| {
                                    now.duration_since(h.since)
                                })
                                .as_secs_f64(),
                            checks: health.map_or(0, |h| h.checks),
                            last_check: health.and_then(|h| h.last.as_ref()).map(
                                |(outcome, at)| {
                                    LastCheck::from_outcome(
                                        outcome,
                                        now.duration_since(*at).as_secs_f64(),
                                    )
                                },
                            ),
                            traffic: backend_traffic
                                .get(&(b.address, b.port()))
                                .copied()
                                .unwrap_or_default(),
                        }
                    })
                    .collect(),
            })
            .collect();
        StatusReport {
            not_ready: self.not_ready(),
            data_path_unanswered: self.blackhole.finding().is_some(),
            program: {
                let (start, replaced) = self.dataplane.start_kind();
                crate::status::ProgramStatus {
                    start: start.label().to_string(),
                    tag: handover::tag_hex(self.dataplane.program_tag()),
                    replaced_tag: replaced.map(handover::tag_hex),
                    on_stop: self.options.on_stop.label().to_string(),
                }
            },
            vrrp: self
                .vrrp
                .as_ref()
                .map(|v| v.status.lock().expect("status lock").clone()),
            interface: self.options.iface.clone(),
            xdp_mode: self.xdp_mode.to_string(),
            lb_address: self.lb_addr.to_string(),
            uptime_seconds: now.duration_since(self.started).as_secs_f64(),
            vips,
            verdicts: self
                .dataplane
                .verdicts()
                .unwrap_or_default()
                .into_iter()
                .filter(|(_, c)| c.packets > 0)
                .map(|(v, c)| (v.label().to_string(), c.packets))
                .collect(),
            events: self
                .dataplane
                .events()
                .unwrap_or_default()
                .into_iter()
                .filter(|(_, n)| *n > 0)
                .map(|(e, n)| (e.label().to_string(), n))
                .collect(),
            conntrack: {
                let totals = self.dataplane.sweep_totals();
                ConntrackStatus {
                    nat_sources: self
                        .dataplane
                        .nat_sources()
                        .iter()
                        .map(crate::dataplane::describe_range)
                        .collect(),
                    flows: totals.live,
                    sweeps: totals.sweeps,
                    expired: totals.expired,
                    reverse_recovered: totals.reverse_recovered,
                    orphans_freed: totals.orphans_freed,
                }
            },
        }
    }

    /// Readiness: the program is attached and the interface up, VRRP is
    /// not in fault, and every backend has had its first check, so the
    /// answer no longer rests on the optimistic start state. Backends being
    /// down does not make the agent unready: it still fails open and hands
    /// the VIP over, and a DaemonSet rollout must not stall on an apiserver
    /// outage.
    fn not_ready(&self) -> Vec<String> {
        let checks: BTreeMap<BackendKey, u64> = self
            .health
            .iter()
            .map(|(key, h)| (key.clone(), h.checks))
            .collect();
        decide::not_ready(&decide::Readiness {
            iface: &self.options.iface,
            vrrp: self.vrrp.as_ref().map(|vrrp| decide::VrrpReadiness {
                link_up: vrrp.link.0,
                xdp_attached: vrrp.link.1,
                fault: vrrp.status.lock().expect("status lock").state == "fault",
            }),
            unchecked: decide::unchecked(&self.backend_keys(), &self.maintenance, &checks),
            forwarding_on: self.forwarding.still_on(),
            blackhole: self
                .blackhole
                .finding()
                .map(|finding| blackhole::reason(&self.options.iface, &finding, self.veth)),
        })
    }

    /// Feeds the black-hole detector a sample of the data path's counters
    /// and says what changed (docs/operations.md, "The data path is not answered").
    fn check_data_path(&mut self) {
        let Ok(verdicts) = self.dataplane.verdicts() else {
            return;
        };
        let count = |wanted: &[Verdict]| -> u64 {
            verdicts
                .iter()
                .filter(|(v, _)| wanted.contains(v))
                .map(|(_, c)| c.packets)
                .sum()
        };
        let Ok(traffic) = self.dataplane.traffic() else {
            return;
        };
        let Ok(pickups) = self.dataplane.event(ha_common::Event::MidstreamPickup) else {
            return;
        };
        // New flows count only for backends that are expected to answer:
        // of a TCP VIP, not this host, up by their checks, not drained.
        let eligible: HashSet<(Ipv4Addr, u16)> = self
            .config
            .vips
            .iter()
            .filter(|v| v.protocol == crate::config::Protocol::Tcp)
            .flat_map(|v| {
                v.backends.iter().map(|b| BackendKey {
                    vip: v.name.clone(),
                    address: b.address,
                    port: b.port(),
                })
            })
            .filter(|key| {
                !self.local_backends.contains(&key.address)
                    && !self.maintenance.contains(key)
                    && self
                        .health
                        .get(key)
                        .is_some_and(|h| h.health == Health::Up && h.checks > 0)
            })
            .map(|key| (key.address, key.port))
            .collect();
        let totals: Vec<((Ipv4Addr, u16), u64)> = traffic
            .backends
            .iter()
            .map(|(key, c)| (*key, c.new_flows))
            .collect();
        let new_flows = self.new_flow_totals.add(&totals, &eligible, pickups);
        let counters = blackhole::Counters {
            new_flows,
            forwarded: count(&[Verdict::ForwardTx, Verdict::ForwardRedirect]),
            answered: count(&[
                Verdict::ReplyTx,
                Verdict::ReplyRedirect,
                Verdict::IcmpReplyTx,
                Verdict::IcmpReplyRedirect,
                Verdict::DropReplyNoFlow,
            ]),
        };
        let pass_checks = !eligible.is_empty();
        let now = Instant::now();
        match self.blackhole.observe(now, counters, pass_checks) {
            Some(blackhole::Change::Found(finding)) => {
                let reason = blackhole::reason(&self.options.iface, &finding, self.veth);
                error!(iface = %self.options.iface, "{reason}");
            }
            Some(blackhole::Change::Cleared) => {
                info!(iface = %self.options.iface, "the data path is answered again");
            }
            None => {}
        }
    }

    fn print_stats(&self) {
        let Ok(traffic) = self.dataplane.traffic() else {
            return;
        };
        for (name, counter) in &traffic.vips {
            println!(
                "stats vip={name} packets={} bytes={} flows={}",
                counter.packets, counter.bytes, counter.new_flows
            );
        }
        for ((address, port), counter) in &traffic.backends {
            println!(
                "stats backend={address}:{port} packets={} bytes={} flows={}",
                counter.packets, counter.bytes, counter.new_flows
            );
        }
        if let Ok(verdicts) = self.dataplane.verdicts() {
            let line: Vec<String> = verdicts
                .iter()
                .filter(|(_, c)| c.packets > 0)
                .map(|(v, c)| format!("{}={}", v.label(), c.packets))
                .collect();
            println!("stats verdicts {}", line.join(" "));
        }
    }

    /// Undoes what the agent added: VIP addresses, neighbour entries, the
    /// XDP attachment; the forwarding sysctl is restored when the guard drops.
    /// Stops as `intent` says (docs/operations.md, "Stopping: release or keep").
    async fn shut_down(&mut self, intent: StopIntent) {
        self.probes.clear();
        if !self.dataplane.is_attached() {
            // The start failed before this agent took the data path over:
            // what an earlier agent left goes on serving, untouched.
            if let Some(vrrp) = &self.vrrp {
                let (done, wait) = tokio::sync::oneshot::channel();
                let stop = announcer::Command::Stop {
                    hold_cs: None,
                    done,
                };
                if vrrp.commands.send(stop).await.is_ok() {
                    let _ = tokio::time::timeout(Duration::from_secs(1), wait).await;
                }
            }
            warn!(iface = %self.options.iface, "the start failed before the program was attached; nothing on the host was changed");
            return;
        }
        match intent {
            StopIntent::Keep if !self.durable_pins => {
                warn!(
                    "keep asked, but nothing pinned outlives this agent (--no-pin, or a private bpffs): releasing instead"
                );
                self.release().await
            }
            StopIntent::Release => self.release().await,
            StopIntent::Keep => self.keep().await,
        }
    }

    /// The host goes out of service: priority 0, addresses and neighbours
    /// removed, program detached, pins removed, forwarding as it was.
    async fn release(&mut self) {
        if let Some(vrrp) = &self.vrrp {
            // Priority 0 first: the backup takes over after its skew time.
            let (done, wait) = tokio::sync::oneshot::channel();
            if vrrp
                .commands
                .send(announcer::Command::Shutdown(done))
                .await
                .is_ok()
            {
                let _ = tokio::time::timeout(Duration::from_secs(1), wait).await;
            }
        }
        for address in std::mem::take(&mut self.added_addresses) {
            match self.netlink.remove_vip(self.ifindex, address).await {
                Ok(()) => info!(vip = %address, "VIP address removed"),
                Err(e) => error!(error = %e, "removing a VIP address"),
            }
        }
        for address in std::mem::take(&mut self.added_neighbours) {
            let _ = self.netlink.remove_neighbour(self.ifindex, address).await;
        }
        if let Err(e) = self.dataplane.detach() {
            error!(error = %e, iface = %self.options.iface, "detaching XDP and removing the pins");
        }
        self.forwarding.release();
        info!(iface = %self.options.iface, "released: detached, VIP addresses removed; exiting");
    }

    /// A restart or upgrade in place: program, flow tables, VIP addresses,
    /// neighbours and forwarding stay; the next agent adopts them. Under VRRP
    /// no priority 0 is sent, and a held VIP address gets a lifetime that ends
    /// when a backup has surely taken over, so a host whose agent does not
    /// come back stops answering for it.
    async fn keep(&mut self) {
        let mut announced = None;
        if let Some(vrrp) = &self.vrrp {
            let hold = vrrp.config.restart_hold;
            let hold_cs = (!hold.is_zero()).then_some((hold.as_millis() / 10) as u16);
            let (done, wait) = tokio::sync::oneshot::channel();
            if vrrp
                .commands
                .send(announcer::Command::Stop { hold_cs, done })
                .await
                .is_ok()
            {
                let _ = tokio::time::timeout(Duration::from_secs(1), wait).await;
            }
            let told = hold.max(vrrp.config.advert_interval);
            announced = Some(told);
            if self.holding {
                let lifetime = handover::kept_address_lifetime(told);
                let addresses: BTreeSet<Ipv4Addr> = self
                    .config
                    .vips
                    .iter()
                    .map(|v| v.address)
                    .filter(|a| self.added_addresses.contains(a))
                    .collect();
                for address in addresses {
                    if let Err(e) = self
                        .netlink
                        .set_vip_lifetime(self.ifindex, address, Some(lifetime))
                        .await
                    {
                        warn!(vip = %address, error = %e, "limiting the kept VIP address's lifetime");
                    }
                }
                info!(
                    seconds = lifetime,
                    "VIP addresses kept for the next agent; they expire unless it resumes as VRRP master"
                );
            }
        }
        self.save_record_with(announced);
        self.forwarding.keep();
        if let Err(e) = self.dataplane.keep() {
            error!(error = %e, iface = %self.options.iface, "leaving the data path in place");
        }
        info!(
            iface = %self.options.iface,
            "kept: the program stays attached with its flow tables and VIP addresses; the next agent adopts them"
        );
    }

    /// Health and drains the last agent recorded, for the configured backends.
    fn seed(&mut self, record: &Record) {
        for vip in &self.config.vips {
            for backend in &vip.backends {
                let reference = BackendRef {
                    vip: vip.address,
                    vip_port: vip.port,
                    protocol: vip.protocol.number(),
                    address: backend.address,
                    port: backend.port(),
                };
                let Some(recorded) = record.backends.get(&reference) else {
                    continue;
                };
                let key = BackendKey {
                    vip: vip.name.clone(),
                    address: backend.address,
                    port: backend.port(),
                };
                if recorded.drained {
                    self.maintenance.insert(key.clone());
                }
                self.seeded.insert(key, recorded.health);
            }
        }
        if !self.seeded.is_empty() {
            info!(
                backends = self.seeded.len(),
                drained = self.maintenance.len(),
                "health and drains adopted from the last agent until the checks say otherwise"
            );
        }
        self.added_addresses
            .extend(record.addresses.iter().copied());
        self.added_neighbours
            .extend(record.neighbours.iter().copied());
    }

    /// Writes what a restart must not forget to the pinned record.
    fn save_record(&mut self) {
        self.save_record_with(None);
    }

    /// [`Agent::save_record`], with the interval the last VRRP advert told
    /// the backups when it was not the configured one.
    fn save_record_with(&mut self, announced: Option<Duration>) {
        let record = record_of(
            &self.config,
            &self.health,
            &self.maintenance,
            &self.added_addresses,
            &self.added_neighbours,
            self.vrrp.as_ref().map(|vrrp| VrrpRecord {
                master: self.holding,
                at_ns: monotonic_coarse_ns(),
                announced: announced.unwrap_or(vrrp.config.advert_interval),
            }),
            self.forwarding.was_on(),
        );
        if let Err(e) = self.dataplane.store_record(&record) {
            warn!(error = %e, "writing the agent record (a restart may forget health, drains or addresses)");
        }
    }
}

/// The record of the agent's state: every configured backend's health (up
/// when unchecked) and drain, the VIP addresses it added, VRRP, forwarding.
fn record_of(
    config: &Config,
    health: &BTreeMap<BackendKey, BackendHealth>,
    maintenance: &BTreeSet<BackendKey>,
    added_addresses: &BTreeSet<Ipv4Addr>,
    added_neighbours: &BTreeSet<Ipv4Addr>,
    vrrp: Option<VrrpRecord>,
    forwarding_was_on: bool,
) -> Record {
    let mut backends = BTreeMap::new();
    for vip in &config.vips {
        for backend in &vip.backends {
            let key = BackendKey {
                vip: vip.name.clone(),
                address: backend.address,
                port: backend.port(),
            };
            backends.insert(
                BackendRef {
                    vip: vip.address,
                    vip_port: vip.port,
                    protocol: vip.protocol.number(),
                    address: backend.address,
                    port: backend.port(),
                },
                BackendRecord {
                    health: health.get(&key).map_or(Health::Up, |h| h.health),
                    drained: maintenance.contains(&key),
                },
            );
        }
    }
    Record {
        layout: Some(handover::LAYOUT_VERSION),
        vrrp,
        addresses: added_addresses.clone(),
        neighbours: added_neighbours.clone(),
        forwarding_was: Some(forwarding_was_on),
        backends,
        // The data plane keeps the program's and the NAT source's entries.
        program: None,
        nat: None,
    }
}

/// Checks one backend forever (until aborted), reporting every result.
/// Each backend has its own task: a hung backend delays only itself.
async fn probe_loop(
    key: BackendKey,
    generation: u64,
    prober: Arc<Prober>,
    timing: Timing,
    initial: Health,
    reports: mpsc::Sender<HealthReport>,
) {
    let target = SocketAddr::from((key.address, key.port));
    let mut checker = Checker::starting(timing, initial);
    loop {
        let outcome = prober.check(target).await;
        checker.record(outcome.result);
        let report = HealthReport {
            key: key.clone(),
            generation,
            outcome,
            health: checker.health(),
        };
        if reports.send(report).await.is_err() {
            return;
        }
        tokio::time::sleep(checker.next_interval()).await;
    }
}

/// The pin directory `pin` names for `iface`, and whether pins there
/// outlive the agent (`None`: pinning off or impossible).
pub fn resolve_pin_dir(iface: &str, pin: &PinLocation) -> Option<(PathBuf, bool)> {
    match pin {
        PinLocation::Off => None,
        PinLocation::Dir(dir) => Some((dir.clone(), true)),
        PinLocation::Auto => match system::pin_dir(iface) {
            Ok(dir) => Some((dir.path, dir.outlives_agent)),
            Err(e) => {
                warn!(error = %e, "cannot pin the data path; it will not outlive the agent");
                None
            }
        },
    }
}

/// `ha-user detach`: removes everything ha-lb put on `iface`. A running
/// agent is asked to stop with the release intent; otherwise the pinned
/// record names the VIP addresses to remove, and removing the pins detaches
/// the program.
pub async fn detach(iface: &str, pin: &PinLocation) -> Result<String> {
    if admin::running_agents().iter().any(|a| a == iface) {
        let response = admin::request(
            Some(iface),
            &Request::Stop {
                intent: StopIntent::Release,
            },
        )?;
        return Ok(format!(
            "the agent on {iface} releases everything and exits: {}",
            response.message.unwrap_or_default()
        ));
    }
    let (dir, _) = resolve_pin_dir(iface, pin).context("no pin directory to look in")?;
    if !dir.exists() {
        return Ok(format!(
            "nothing pinned in {}: nothing to detach",
            dir.display()
        ));
    }
    let state = crate::dataplane::inspect_pins(
        &dir,
        &LoadOptions {
            maglev_table_size: 0,
            max_vips: 0,
            max_flows: 0,
            pin_dir: None,
            host_ports: None,
            accept_flow_loss: false,
        },
    )
    .or_else(|e| {
        // A link that is not ours is left alone, but our own pins still go.
        warn!(error = %e, "the pinned link");
        Ok::<_, anyhow::Error>(crate::dataplane::PinnedState::default())
    })?;
    let record = state.record.unwrap_or_default();
    let netlink = Netlink::connect()?;
    let mut removed = Vec::new();
    if let Ok(ifindex) = netlink.interface_index(iface).await {
        for address in &record.addresses {
            if netlink.has_address(ifindex, *address).await? {
                netlink
                    .remove_vip(ifindex, *address)
                    .await
                    .with_context(|| format!("removing VIP address {address} from {iface}"))?;
                removed.push(address.to_string());
            }
        }
        for address in &record.neighbours {
            let _ = netlink.remove_neighbour(ifindex, *address).await;
        }
        if record.forwarding_was == Some(false) {
            let path = format!("/proc/sys/net/ipv4/conf/{iface}/forwarding");
            if let Err(e) = std::fs::write(&path, "0") {
                warn!(%path, error = %e, "restoring forwarding");
            }
        }
    }
    crate::dataplane::remove_pins(&dir)
        .with_context(|| format!("removing the pins in {}", dir.display()))?;
    Ok(format!(
        "detached from {iface}: pins in {} removed (the program goes with its link){}",
        dir.display(),
        if removed.is_empty() {
            String::new()
        } else {
            format!(", VIP addresses removed: {}", removed.join(", "))
        }
    ))
}

/// `ha-user check-config`: the normalized config, or every problem with it;
/// with an interface, also what an agent started now would do with what is
/// pinned for it (adopt, replace, refuse), changing nothing.
pub fn check_config(
    path: &std::path::Path,
    pinned_for: Option<(&str, &PinLocation)>,
    accept_flow_loss: bool,
) -> Result<(String, Option<String>)> {
    let config = Config::load(path)?;
    build_probers(&config)?;
    let pinned = match pinned_for {
        Some((iface, pin)) => match match pin {
            // Looking changes nothing: no bpffs is mounted for it.
            PinLocation::Auto => system::pin_dir_path(iface).ok(),
            PinLocation::Dir(dir) => Some(dir.clone()),
            PinLocation::Off => None,
        } {
            Some(dir) if dir.exists() => {
                let dp = &config.data_plane;
                let options = LoadOptions {
                    maglev_table_size: dp.maglev_table_size,
                    max_vips: dp.max_vips,
                    max_flows: dp.conntrack.max_flows,
                    pin_dir: Some(dir.clone()),
                    host_ports: None,
                    accept_flow_loss,
                };
                let state = crate::dataplane::inspect_pins(&dir, &options)?;
                Some(state.describe(&dir, accept_flow_loss))
            }
            Some(dir) => Some(format!(
                "nothing pinned in {}: an agent starts fresh",
                dir.display()
            )),
            None => Some("pinning is off: an agent starts fresh".to_string()),
        },
        None => None,
    };
    Ok((config.to_yaml(), pinned))
}
