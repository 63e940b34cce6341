//! `ha-user attach`: the agent's main loop.
//!
//! Start-up validates everything before touching the host; then it loads
//! and attaches the program, writes the maps, takes the VIP addresses
//! (static ownership: no `vrrp` section yet) and announces them. SIGHUP
//! re-reads the config (validate, then apply the difference); SIGTERM or
//! SIGINT removes what the agent added and exits.

use std::{
    collections::{BTreeSet, HashSet},
    net::Ipv4Addr,
    path::PathBuf,
    time::Duration,
};

use anyhow::{Context, Result};
use ha_common::{SETTINGS_FLAG_DEBUG, Settings, addr_to_wire};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};

use crate::{
    config::Config,
    dataplane::{
        AttachMode, DataPlane, DesiredBackend, DesiredVip, LoadOptions, monotonic_coarse_ns,
    },
    garp,
    netlink::Netlink,
    system,
};

pub struct AttachOptions {
    pub iface: String,
    pub config_path: PathBuf,
    pub xdp_mode: AttachMode,
    /// Print counters this often (zero: never).
    pub stats_interval: Duration,
    /// Where to pin the connection tables so a restart adopts them:
    /// `Auto` picks the per-namespace default under /sys/fs/bpf.
    pub pin: PinLocation,
    /// Gratuitous ARPs sent after taking a VIP, and their spacing.
    pub garp_count: u32,
    pub garp_interval: Duration,
}

pub enum PinLocation {
    Auto,
    Dir(PathBuf),
    Off,
}

/// How often ended flows are swept from the connection table.
const SWEEP_INTERVAL: Duration = Duration::from_secs(10);

/// Everything the agent has changed on the host, so it can undo exactly that.
struct Agent {
    options: AttachOptions,
    netlink: Netlink,
    ifindex: u32,
    mac: [u8; 6],
    lb_addr: Ipv4Addr,
    dataplane: DataPlane,
    config: Config,
    /// VIP addresses this agent added (not ones that were already there).
    added_addresses: BTreeSet<Ipv4Addr>,
    /// Managed neighbour entries this agent added.
    added_neighbours: BTreeSet<Ipv4Addr>,
    _forwarding: system::ForwardingGuard,
}

pub async fn run(options: AttachOptions) -> Result<()> {
    let config = Config::load(&options.config_path)?;
    let iface = options.iface.clone();
    system::check_nat_port_range(config.data_plane.nat.port_range)?;
    let netlink = Netlink::connect()?;
    let ifindex = netlink.interface_index(&iface).await?;
    let mac = netlink.interface_mac(ifindex).await?;
    let lb_addr = match config.data_plane.nat.source_address {
        Some(address) => address,
        None => netlink.primary_address(&iface, ifindex).await?,
    };
    let forwarding = system::ForwardingGuard::enable(&iface)?;
    let pin_dir = match &options.pin {
        PinLocation::Off => None,
        PinLocation::Dir(dir) => Some(dir.clone()),
        PinLocation::Auto => match system::pin_dir(&iface) {
            Ok(dir) => Some(dir),
            Err(e) => {
                warn!(error = %e, "cannot pin the connection tables; a restart will start with empty ones");
                None
            }
        },
    };
    let dp = &config.data_plane;
    let mut dataplane = DataPlane::load(&LoadOptions {
        maglev_table_size: dp.maglev_table_size,
        max_vips: dp.max_vips,
        max_flows: dp.conntrack.max_flows,
        pin_dir,
    })
    .context("loading the XDP program")?;
    let logger = if dp.debug {
        dataplane.take_logger()
    } else {
        None
    };
    let mode = dataplane
        .attach(&iface, options.xdp_mode)
        .with_context(|| format!("attaching to interface {iface}"))?;
    info!(%iface, mode = mode.label(), %lb_addr, "XDP program attached");
    dataplane.set_tx_ports(&netlink.interface_indexes().await?)?;

    let mut agent = Agent {
        options,
        netlink,
        ifindex,
        mac,
        lb_addr,
        dataplane,
        config: config.clone(),
        added_addresses: BTreeSet::new(),
        added_neighbours: BTreeSet::new(),
        _forwarding: forwarding,
    };
    let result = agent.serve(config, logger).await;
    agent.shut_down().await;
    result
}

impl Agent {
    async fn serve(
        &mut self,
        config: Config,
        mut logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    ) -> Result<()> {
        self.apply(&config).await?;
        info!(
            vips = config.vips.len(),
            "serving; SIGHUP reloads the config, SIGTERM stops"
        );

        let mut sigterm =
            signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
        let mut sigint =
            signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
        let mut sighup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
        let mut sweep = tokio::time::interval(SWEEP_INTERVAL);
        let stats_every = if self.options.stats_interval.is_zero() {
            Duration::from_secs(3600)
        } else {
            self.options.stats_interval
        };
        let mut stats = tokio::time::interval(stats_every);
        let mut log_flush = tokio::time::interval(Duration::from_millis(200));
        loop {
            tokio::select! {
                _ = sigterm.recv() => { info!("SIGTERM: stopping"); return Ok(()); }
                _ = sigint.recv() => { info!("SIGINT: stopping"); return Ok(()); }
                _ = sighup.recv() => self.reload().await,
                _ = sweep.tick() => {
                    match self.dataplane.sweep_flows(monotonic_coarse_ns()) {
                        Ok(report) if report.expired > 0 => info!(live = report.live, expired = report.expired, "swept ended flows"),
                        Ok(_) => {}
                        Err(e) => warn!(error = %e, "sweeping the connection table"),
                    }
                }
                _ = stats.tick(), if !self.options.stats_interval.is_zero() => self.print_stats(),
                _ = log_flush.tick(), if logger.is_some() => {
                    if let Some(logger) = logger.as_mut() { logger.flush(); }
                }
            }
        }
    }

    /// Re-reads the config; a config that does not validate, or that would
    /// need a restart, is refused and the running one stays.
    async fn reload(&mut self) {
        let path = self.options.config_path.clone();
        let next = match Config::load(&path) {
            Ok(next) => next,
            Err(e) => {
                error!("reload rejected, the running config stays: {e}");
                return;
            }
        };
        let restart = self.config.restart_needed_for(&next);
        if !restart.is_empty() {
            error!(
                "reload rejected, the running config stays: {} (needs an agent restart)",
                restart.join(", ")
            );
            return;
        }
        if let Err(e) = system::check_nat_port_range(next.data_plane.nat.port_range) {
            error!("reload rejected, the running config stays: {e}");
            return;
        }
        match self.apply(&next).await {
            Ok(()) => info!(path = %path.display(), "reload applied"),
            Err(e) => error!("reload failed part-way: {e:#}"),
        }
    }

    /// Makes the data plane, the VIP addresses and the neighbour entries match `config`.
    async fn apply(&mut self, config: &Config) -> Result<()> {
        let vip_addresses: BTreeSet<Ipv4Addr> = config.vips.iter().map(|v| v.address).collect();
        let local: HashSet<Ipv4Addr> = self
            .netlink
            .local_addresses()
            .await?
            .into_iter()
            .filter(|a| !vip_addresses.contains(a))
            .collect();
        let dp = &config.data_plane;
        let settings = Settings {
            lb_addr: addr_to_wire(self.lb_addr.octets()),
            nat_port_min: dp.nat.port_range.min,
            nat_port_max: dp.nat.port_range.max,
            tcp_idle_timeout_ns: dp.conntrack.tcp_idle_timeout.as_nanos() as u64,
            udp_idle_timeout_ns: dp.conntrack.udp_idle_timeout.as_nanos() as u64,
            fin_linger_ns: dp.conntrack.fin_linger.as_nanos() as u64,
            flags: if dp.debug { SETTINGS_FLAG_DEBUG } else { 0 },
            _pad: 0,
        };
        let vips: Vec<DesiredVip> = config
            .vips
            .iter()
            .map(|vip| DesiredVip {
                name: vip.name.clone(),
                address: vip.address,
                port: vip.port,
                protocol: vip.protocol.number(),
                enabled: true,
                backends: vip
                    .backends
                    .iter()
                    .map(|b| DesiredBackend {
                        address: b.address,
                        port: b.port(),
                        weight: b.weight,
                        local: local.contains(&b.address),
                    })
                    .collect(),
            })
            .collect();

        // Neighbours first, so the first packets to a new backend find its MAC.
        let wanted_neighbours: BTreeSet<Ipv4Addr> = vips
            .iter()
            .flat_map(|v| &v.backends)
            .filter(|b| !b.local)
            .map(|b| b.address)
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
        self.dataplane
            .apply(&settings, &vips)
            .context("writing the data plane's maps")?;
        for address in self.added_neighbours.clone().difference(&wanted_neighbours) {
            if self
                .netlink
                .remove_neighbour(self.ifindex, *address)
                .await
                .is_ok()
            {
                self.added_neighbours.remove(address);
            }
        }

        for address in &vip_addresses {
            if self.netlink.has_address(self.ifindex, *address).await? {
                continue;
            }
            self.netlink.add_vip(self.ifindex, *address).await?;
            self.added_addresses.insert(*address);
            info!(vip = %address, iface = %self.options.iface, "VIP address added");
            let (ifindex, mac, count, interval) = (
                self.ifindex,
                self.mac,
                self.options.garp_count,
                self.options.garp_interval,
            );
            let vip = *address;
            tokio::spawn(async move {
                if let Err(e) = garp::announce(ifindex, mac, vip, count, interval).await {
                    warn!(error = %e, "gratuitous ARP");
                }
            });
        }
        for address in self.added_addresses.clone().difference(&vip_addresses) {
            self.netlink.remove_vip(self.ifindex, *address).await?;
            self.added_addresses.remove(address);
            info!(vip = %address, "VIP address removed");
        }
        self.config = config.clone();
        Ok(())
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
    async fn shut_down(&mut self) {
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
            error!(error = %e, iface = %self.options.iface, "detaching XDP");
        }
        info!(iface = %self.options.iface, "detached; exiting");
    }
}

/// `ha-user check-config`: the normalized config, or every problem with it.
pub fn check_config(path: &std::path::Path) -> Result<String> {
    Ok(Config::load(path)?.to_yaml())
}
