//! Starting and stopping: the start-up sequence (everything validated before the host changes, one
//! program switch, then the addresses), the VRRP instance's start, and the stop intents (release or
//! keep) with the record a restart adopts.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::{IpAddr, Ipv4Addr},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::{mpsc, watch},
};
use tracing::{error, info, warn};

use crate::{
    admin, blackhole, cgroup,
    config::{Config, Listen, SocketLbConfig, VrrpConfig},
    control::Command,
    dataplane::{AttachMode, DataPlane, LoadOptions, monotonic_coarse_ns},
    handover::{self, BackendRecord, BackendRef, Record, StopIntent, VrrpRecord, VrrpStart},
    health::Health,
    ip::{NotIpv4, ipv4},
    netlink::{LinkHealth, Netlink},
    status::SocketLbStatus,
    system, telemetry,
    vrrp::{announcer, machine::MachineConfig},
};

use super::{
    Agent, AttachOptions, VRRP_RESUME_MARGIN, Vrrp,
    commands::resolve_pin_dir,
    decide::{self, BackendKey},
    host::nat_source,
    probes::{HealthReport, build_probers},
};

/// The signals the agent answers, installed first thing: one that arrives
/// while the agent starts (a migration of a large table takes seconds) is
/// held until it serves, not fatal half way: SIGHUP then reloads, SIGTERM
/// and SIGINT stop with the intent.
pub(super) struct Signals {
    pub(super) terminate: tokio::signal::unix::Signal,
    pub(super) interrupt: tokio::signal::unix::Signal,
    pub(super) hangup: tokio::signal::unix::Signal,
}

impl Signals {
    pub(super) fn install() -> Result<Self> {
        Ok(Self {
            terminate: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            interrupt: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
            hangup: signal(SignalKind::hangup()).context("installing the SIGHUP handler")?,
        })
    }
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
    let (admin_tx, mut admin_rx) = mpsc::channel::<Command>(16);
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
        .write_settings(&dp.settings(lb_addr)?)
        .context("writing the data plane settings")?;
    dataplane.set_tx_ports(&netlink.interface_indexes().await?)?;
    let veth = kind.as_deref() == Some("veth");
    let record = dataplane.found_record().cloned().unwrap_or_default();
    forwarding.remember_original(record.forwarding_was);
    if dataplane.found_link() {
        forwarding.defer_to_running_data_path();
    }

    let (health_tx, mut health_rx) = mpsc::channel::<HealthReport>(256);
    let (passive_tx, mut passive_rx) = mpsc::channel::<ha_common::PassiveEvent>(256);
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
        xdp_mode: None,
        started: Instant::now(),
        dataplane,
        config: config.clone(),
        health: BTreeMap::new(),
        maintenance: BTreeSet::new(),
        probes: HashMap::new(),
        next_generation: 0,
        health_tx,
        failing_open: BTreeSet::new(),
        sessions_reset: 0,
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
        reloads: BTreeMap::new(),
        socket_lb: SocketLbStatus::default(),
        passive: Default::default(),
    };
    agent.seed(&record);
    agent.start_passive_health(passive_tx);
    let result = async {
        // The whole desired state is in the new program's maps before it
        // sees a packet; then one switch (a new attachment, or the pinned
        // link pointed at it); then the addresses that draw traffic.
        agent.apply_first(config.clone(), probers).await?;
        let mode = agent
            .dataplane
            .attach(&agent.options.iface, agent.options.xdp_mode)
            .with_context(|| format!("attaching to interface {}", agent.options.iface))?;
        agent.xdp_mode = Some(mode);
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
        agent.socket_lb = start_socket_lb(&mut agent.dataplane, &agent.config.socket_lb);
        agent.sync_vip_addresses().await?;
        agent.save_record();
        // Tracking from the first moment: health adopted from the last
        // agent may already call for a lower priority or a fault.
        agent.track().await;
        info!(
            vips = config.vips.len(),
            on_stop = agent.options.on_stop.label(),
            "serving; SIGHUP reloads the config, SIGTERM stops"
        );
        agent
            .serve(
                &mut signals,
                &mut health_rx,
                &mut passive_rx,
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

/// Attaches the socket-level balancer as `config` says, after the XDP
/// program (its maps hold the desired state by then). A failure is not
/// fatal: the XDP path serves every other host whatever happens here, so
/// the agent says so loudly (log, `status`, `/metrics`) and serves on; an
/// earlier agent's socket-level links are removed then, since they would
/// balance with tables nothing updates any more.
fn start_socket_lb(dataplane: &mut DataPlane, config: &SocketLbConfig) -> SocketLbStatus {
    let mut status = SocketLbStatus {
        enabled: config.enabled,
        ..SocketLbStatus::default()
    };
    let attached = if config.enabled {
        cgroup::resolve(&config.cgroup)
            .map_err(|e| e.to_string())
            .and_then(|resolved| {
                let cookie = cgroup::netns_cookie().map_err(|e| e.to_string())?;
                dataplane
                    .attach_socket_lb(&resolved.path, cookie)
                    .map_err(|e| e.to_string())?;
                Ok(resolved)
            })
    } else {
        Err(String::new())
    };
    match attached {
        Ok(resolved) => {
            if !resolved.is_root {
                warn!(
                    cgroup = %resolved.path.display(),
                    "the socket-level balancer is attached to a cgroup that is not the cgroup2 root: \
                     only processes in and below it are balanced (mount the host's cgroup2 root into the agent)"
                );
            }
            status.attached = true;
            status.cgroup = Some(resolved.path.display().to_string());
            status.cgroup_source = Some(resolved.source);
            status.cgroup_is_root = resolved.is_root;
        }
        Err(reason) => {
            if config.enabled {
                error!(
                    error = %reason,
                    "SOCKET-LEVEL BALANCING IS OFF: processes on this host connecting to a VIP are not \
                     balanced (the XDP path serves other hosts as before); see docs/operations.md"
                );
                status.error = Some(reason);
            }
            if let Err(e) = dataplane.detach_socket_lb() {
                warn!(error = %e, "removing an earlier agent's socket-level balancer pins");
            }
        }
    }
    status
}

/// Opens the VRRP socket and starts the announcer (as backup: nothing held yet).
pub(super) async fn start_vrrp(
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
    // VRRP is IPv4 inside (its socket, adverts and state machine): the
    // addresses become IPv4 here, at its setup.
    let local_address = ipv4(netlink.primary_address(&iface, ifindex).await?)?;
    let mut vips: Vec<Ipv4Addr> = config
        .vips
        .iter()
        .map(|v| ipv4(v.address))
        .collect::<Result<_, NotIpv4>>()
        .context("vips[].address (VRRP announces IPv4 VIPs)")?;
    vips.sort();
    vips.dedup();
    let unicast_peers: Vec<Ipv4Addr> = vrrp
        .unicast_peers
        .iter()
        .map(|peer| ipv4(*peer))
        .collect::<Result<_, NotIpv4>>()
        .context("vrrp.unicast_peers")?;
    let (status_tx, status) = watch::channel(announcer::VrrpStatus::default());
    let commands = announcer::spawn(
        announcer::AnnouncerSetup {
            iface: iface.clone(),
            local_address,
            vrid: vrrp.vrid,
            version: vrrp.version,
            checksum: vrrp.checksum,
            // One file can serve every LB host (a DaemonSet's ConfigMap):
            // the host's own address among the peers is skipped.
            unicast_peers: unicast_peers
                .into_iter()
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
        status_tx,
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
        tracked: decide::Tracking {
            priority: vrrp.priority,
            fault: false,
        },
        link: LinkHealth {
            up: true,
            xdp_attached: true,
        },
    })
}

impl Agent {
    /// Undoes what the agent added: VIP addresses, neighbour entries, the
    /// XDP attachment; the forwarding sysctl is restored when the guard drops.
    /// Stops as `intent` says (docs/operations.md, "Stopping: release or keep").
    pub(super) async fn shut_down(&mut self, intent: StopIntent) {
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
            // The neighbour entries this start added (the earlier agent's
            // stay: its record names them).
            let inherited: BTreeSet<IpAddr> = self
                .dataplane
                .found_record()
                .map(|record| record.neighbours.iter().copied().map(IpAddr::V4).collect())
                .unwrap_or_default();
            for address in std::mem::take(&mut self.added_neighbours) {
                if !inherited.contains(&address) {
                    let _ = self.netlink.remove_neighbour(self.ifindex, address).await;
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
    pub(super) async fn release(&mut self) {
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
    pub(super) async fn keep(&mut self) {
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
                let addresses: BTreeSet<IpAddr> = self
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
    pub(super) fn seed(&mut self, record: &Record) {
        let configured: Vec<(BackendKey, BackendRef)> = recorded_backends(&self.config).collect();
        for (key, reference) in configured {
            let Some(recorded) = record.backends.get(&reference) else {
                continue;
            };
            if recorded.drained {
                self.maintenance.insert(key.clone());
            }
            self.seeded.insert(key, recorded.health);
        }
        if !self.seeded.is_empty() {
            info!(
                backends = self.seeded.len(),
                drained = self.maintenance.len(),
                "health and drains adopted from the last agent until the checks say otherwise"
            );
        }
        self.added_addresses
            .extend(record.addresses.iter().copied().map(IpAddr::V4));
        self.added_neighbours
            .extend(record.neighbours.iter().copied().map(IpAddr::V4));
    }

    /// Writes what a restart must not forget to the pinned record.
    pub(super) fn save_record(&mut self) {
        self.save_record_with(None);
    }

    /// [`Agent::save_record`], with the interval the last VRRP advert told
    /// the backups when it was not the configured one.
    ///
    /// Only once this agent's program is attached: until the switch the
    /// record is the running data path's (a start that fails must leave it
    /// as the last agent wrote it, VRRP state included), and the first
    /// write after the switch holds everything.
    pub(super) fn save_record_with(&mut self, announced: Option<Duration>) {
        if !self.dataplane.is_attached() {
            return;
        }
        let record = record_of(
            &self.config,
            &self.health_view(&BTreeSet::new()),
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

/// Every configured backend, by its key and by its reference in the record.
/// The record's layout is IPv4 (pinned, `handover::LAYOUT_VERSION`): an IPv6
/// backend, which validation refuses first, has no reference and is left out.
fn recorded_backends(config: &Config) -> impl Iterator<Item = (BackendKey, BackendRef)> + '_ {
    decide::backends(config).filter_map(|(key, vip, backend)| {
        let reference = BackendRef::of(
            vip.address,
            vip.port,
            vip.protocol.number(),
            backend.address,
            backend.port(),
        )
        .ok()?;
        Some((key, reference))
    })
}

/// The record of the agent's state: every configured backend's health (up
/// when unchecked) and drain, the VIP addresses it added, VRRP, forwarding.
pub(super) fn record_of(
    config: &Config,
    health: &BTreeMap<BackendKey, Health>,
    maintenance: &BTreeSet<BackendKey>,
    added_addresses: &BTreeSet<IpAddr>,
    added_neighbours: &BTreeSet<IpAddr>,
    vrrp: Option<VrrpRecord>,
    forwarding_was_on: bool,
) -> Record {
    let backends = recorded_backends(config)
        .map(|(key, reference)| {
            let recorded = BackendRecord {
                health: health.get(&key).copied().unwrap_or(Health::Up),
                drained: maintenance.contains(&key),
            };
            (reference, recorded)
        })
        .collect();
    Record {
        layout: Some(handover::LAYOUT_VERSION),
        vrrp,
        addresses: handover::ipv4_set(added_addresses),
        neighbours: handover::ipv4_set(added_neighbours),
        forwarding_was: Some(forwarding_was_on),
        backends,
        // The data plane keeps the program's and the NAT source's entries.
        program: None,
        nat: None,
    }
}
