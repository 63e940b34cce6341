//! The lab: a LAN of hosts built out of network namespaces, for integration
//! tests, the demo and the benchmarks (crate `ha-bench`).
//!
//! Layout of one lab (slot `N`, claimed for the life of the [`Lab`]):
//!
//! ```text
//!   namespace hlN-sw (the switch)          namespace hlN-<host> (one per host)
//!   +---------------------------+          +-----------------------------+
//!   | br0 -- p0 ================|== veth ==|  eth0 10.201.N.1/24          |
//!   |     \- p1 ================|== veth ==|  eth0 10.201.N.2/24  (next) |
//!   +---------------------------+          +-----------------------------+
//! ```
//!
//! Every switch port runs a pass-everything XDP program, and every host has
//! checksum offload off, so XDP_TX behaves as on a real NIC (see
//! `attach_switch_xdp` and `build`).
//!
//! The bridge lives in a namespace of its own, so a lab touches nothing in
//! the root namespace and no packet can leave it: there is no route out of
//! any lab namespace. Every host's interface is called `eth0`, as on the LB
//! hosts the agent is written for.
//!
//! Slots are claimed with `flock` on `/run/ha-lab/slot-N.lock`; the kernel
//! drops the lock when a process dies, however it dies, so a later lab that
//! finds a free lock with namespaces still named `hlN-*` knows they are stale
//! and removes them. Each slot has its own names and its own /24, so labs in
//! parallel test threads or processes never meet.

pub mod config;
pub mod fuzz;
pub mod nginx;
pub mod packet;
pub mod process;

use std::{
    fs::{File, OpenOptions},
    net::Ipv4Addr,
    os::fd::AsFd,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use nix::{
    fcntl::{Flock, FlockArg},
    sched::{CloneFlags, setns},
};

pub use process::LabProcess;

/// Where slot locks live: tmpfs, so a reboot clears them with the namespaces.
const LOCK_DIR: &str = "/run/ha-lab";
/// Slots 1..=MAX_SLOT; slot N owns 10.201.N.0/24.
const MAX_SLOT: u32 = 250;
const NS_PREFIX: &str = "hl";
/// Host addresses start at .1; addresses from .200 up are left free for VIPs.
const FIRST_VIP_OCTET: u8 = 200;
/// The interface name of every lab host.
pub const HOST_IFACE: &str = "eth0";

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error(
        "the lab needs root (network namespaces, veth, XDP); run as root or through `cargo xtask test`"
    )]
    NotRoot,
    #[error("all {MAX_SLOT} lab slots under {LOCK_DIR} are taken")]
    NoFreeSlot,
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("no host named {0} in this lab")]
    UnknownHost(String),
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, String),
}

pub type Result<T, E = LabError> = std::result::Result<T, E>;

fn io_error(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> LabError {
    let context = context.into();
    move |source| LabError::Io { context, source }
}

/// One host of the lab: its namespace, address and MAC on the lab LAN.
#[derive(Clone, Debug)]
pub struct Host {
    pub name: String,
    pub netns: String,
    pub addr: Ipv4Addr,
    pub mac: [u8; 6],
    /// The bridge port in the switch namespace that this host's veth plugs into.
    switch_port: String,
}

impl Host {
    pub fn mac_string(&self) -> String {
        self.mac
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    }
}

/// A lab; everything it made is removed when it is dropped, also on panic.
pub struct Lab {
    slot: u32,
    switch_ns: String,
    hosts: Vec<Host>,
    log_dir: PathBuf,
    /// The pass-everything program on every switch port (see `attach_switch_xdp`).
    switch_xdp: Option<aya::Ebpf>,
    /// Its attachments, by switch port.
    switch_links: Vec<(String, aya::programs::xdp::XdpLinkId)>,
    _slot_lock: Flock<File>,
}

impl Lab {
    /// Builds a LAN with one host per name, in order: the first gets .1, etc.
    pub fn new(host_names: &[&str]) -> Result<Lab> {
        if !nix::unistd::geteuid().is_root() {
            return Err(LabError::NotRoot);
        }
        std::fs::create_dir_all(LOCK_DIR).map_err(io_error(format!("creating {LOCK_DIR}")))?;
        sweep_stale_labs()?;
        let (slot, lock) = claim_slot()?;
        // A crashed run may have left namespaces or a bpffs in the slot we just claimed.
        remove_namespaces(&namespaces_of_slot(slot)?);
        unmount_bpffs(slot);

        let log_dir = std::env::temp_dir().join(format!("ha-lab-{slot}"));
        let _ = std::fs::remove_dir_all(&log_dir);
        std::fs::create_dir_all(&log_dir)
            .map_err(io_error(format!("creating {}", log_dir.display())))?;

        let switch_ns = format!("{NS_PREFIX}{slot}-sw");
        let hosts = host_names
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let index = u8::try_from(i + 1).expect("a lab has fewer than 200 hosts");
                assert!(index < FIRST_VIP_OCTET, "a lab has fewer than 200 hosts");
                Host {
                    name: name.to_string(),
                    netns: format!("{NS_PREFIX}{slot}-{name}"),
                    addr: Ipv4Addr::new(10, 201, slot as u8, index),
                    mac: [0x02, 0x00, 0x0a, 0xc9, slot as u8, index],
                    switch_port: format!("p{index}"),
                }
            })
            .collect();
        // From here on, Drop cleans up whatever part of the build succeeded.
        let mut lab = Lab {
            slot,
            switch_ns,
            hosts,
            log_dir,
            switch_xdp: None,
            switch_links: Vec::new(),
            _slot_lock: lock,
        };
        lab.build()?;
        let (ebpf, links) = lab.attach_switch_xdp()?;
        lab.switch_xdp = Some(ebpf);
        lab.switch_links = links;
        Ok(lab)
    }

    fn build(&self) -> Result<()> {
        let sw = &self.switch_ns;
        run(Command::new("ip").args(["netns", "add", sw]))?;
        ip(sw, &["link", "set", "lo", "up"])?;
        ip(sw, &["link", "add", "br0", "type", "bridge"])?;
        ip(sw, &["link", "set", "br0", "up"])?;
        for host in &self.hosts {
            run(Command::new("ip").args(["netns", "add", &host.netns]))?;
            ip(&host.netns, &["link", "set", "lo", "up"])?;
            let mac = host.mac_string();
            ip(
                sw,
                &[
                    "link",
                    "add",
                    &host.switch_port,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    HOST_IFACE,
                    "address",
                    &mac,
                    "netns",
                    &host.netns,
                ],
            )?;
            // veth offloads checksums to a "device" that never computes them:
            // frames would carry only the pseudo-header sum. Real NICs put full
            // checksums on the wire, so the lab does too (the data path updates
            // checksums incrementally and needs them complete).
            ethtool(&host.netns, HOST_IFACE, &["-K", "tx", "off"])?;
            ethtool(sw, &host.switch_port, &["-K", "tx", "off"])?;
            ip(sw, &["link", "set", &host.switch_port, "master", "br0"])?;
            ip(sw, &["link", "set", &host.switch_port, "up"])?;
            let cidr = format!("{}/24", host.addr);
            ip(&host.netns, &["addr", "add", &cidr, "dev", HOST_IFACE])?;
            ip(&host.netns, &["link", "set", HOST_IFACE, "up"])?;
        }
        Ok(())
    }

    /// veth hands an XDP_TX'ed frame to its peer at once only if the peer
    /// runs an XDP program (otherwise the frame waits in the peer's queue
    /// until other traffic wakes it). The switch ports are those peers, so
    /// each gets a program that passes everything, as a NIC would deliver
    /// to the wire. Real NICs need nothing of the kind.
    #[allow(clippy::type_complexity)]
    fn attach_switch_xdp(
        &self,
    ) -> Result<(aya::Ebpf, Vec<(String, aya::programs::xdp::XdpLinkId)>)> {
        use aya::programs::{Xdp, XdpMode};
        let object = ha_user::ebpf_object::embedded().ok_or_else(|| {
            io_error("the XDP object")(std::io::Error::other(
                "ha-user was built without it: run `cargo xtask build-ebpf --release` and rebuild",
            ))
        })?;
        let mut ebpf = aya::EbpfLoader::new()
            .load(object)
            .map_err(|e| io_error("loading the XDP object")(std::io::Error::other(e)))?;
        let program: &mut Xdp = ebpf
            .program_mut(ha_common::XDP_PASS_PROGRAM_NAME)
            .and_then(|p| p.try_into().ok())
            .ok_or_else(|| io_error("the XDP object")(std::io::Error::other("no pass program")))?;
        ha_user::dataplane::load_program(program)
            .map_err(|e| io_error("loading the pass program")(std::io::Error::other(e)))?;
        let path = format!("/run/netns/{}", self.switch_ns);
        let netns = File::open(&path).map_err(io_error(format!("opening {path}")))?;
        let ports: Vec<String> = self.hosts.iter().map(|h| h.switch_port.clone()).collect();
        let links = std::thread::scope(|scope| {
            scope
                .spawn(|| -> Result<Vec<(String, aya::programs::xdp::XdpLinkId)>> {
                    setns(netns.as_fd(), CloneFlags::CLONE_NEWNET)
                        .map_err(|e| io_error(format!("entering {path}"))(e.into()))?;
                    let mut links = Vec::new();
                    for port in &ports {
                        let link = program.attach(port, XdpMode::Driver).map_err(|e| {
                            io_error(format!("attaching XDP to switch port {port}"))(
                                std::io::Error::other(e),
                            )
                        })?;
                        links.push((port.clone(), link));
                    }
                    Ok(links)
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })?;
        Ok((ebpf, links))
    }

    pub fn slot(&self) -> u32 {
        self.slot
    }

    /// Sets the MTU of every host's eth0 and of the switch's ports and bridge
    /// (jumbo frames on the whole LAN).
    pub fn set_mtu(&self, mtu: u32) -> Result<()> {
        let mtu = mtu.to_string();
        for host in self.hosts.iter().filter(|h| !h.switch_port.is_empty()) {
            ip(
                &self.switch_ns,
                &["link", "set", "dev", &host.switch_port, "mtu", &mtu],
            )?;
            ip(
                &host.netns,
                &["link", "set", "dev", HOST_IFACE, "mtu", &mtu],
            )?;
        }
        ip(&self.switch_ns, &["link", "set", "dev", "br0", "mtu", &mtu])?;
        Ok(())
    }

    /// Removes the pass-everything XDP program from `host`'s switch port:
    /// that host's link then behaves as a plain veth does (frames it sends
    /// with XDP_TX wait in the peer's queue; see `attach_switch_xdp`).
    pub fn remove_switch_xdp(&mut self, host: &str) -> Result<()> {
        use aya::programs::Xdp;
        let port = self.try_host(host)?.switch_port.clone();
        let Some(at) = self.switch_links.iter().position(|(p, _)| *p == port) else {
            return Ok(());
        };
        let (_, link) = self.switch_links.remove(at);
        let program: &mut Xdp = self
            .switch_xdp
            .as_mut()
            .and_then(|e| e.program_mut(ha_common::XDP_PASS_PROGRAM_NAME))
            .and_then(|p| p.try_into().ok())
            .ok_or_else(|| {
                io_error("the switch's XDP object")(std::io::Error::other("no pass program"))
            })?;
        program.detach(link).map_err(|e| {
            io_error(format!("detaching XDP from switch port {port}"))(std::io::Error::other(e))
        })
    }

    /// Adds a host `name` behind the lab host `router`, on a network of its
    /// own (10.202.SLOT.0/24: the router .1 on its interface `r-NAME`, the
    /// host .2 on eth0, its default route via the router, the router
    /// forwarding). The link has `router_mtu` on the router's side and the
    /// LAN's 1500 on the host's: a path MTU smaller than the LAN's, as behind
    /// a tunnel or a WAN link. The LAN reaches the network only through a
    /// route each host adds itself. Removed with the lab.
    pub fn add_routed_host(&mut self, name: &str, router: &str, router_mtu: u32) -> Result<Host> {
        let router = self.try_host(router)?.clone();
        let host = Host {
            name: name.to_string(),
            netns: format!("{NS_PREFIX}{}-{name}", self.slot),
            addr: Ipv4Addr::new(10, 202, self.slot as u8, 2),
            mac: [0x02, 0x00, 0x0a, 0xca, self.slot as u8, 2],
            switch_port: String::new(),
        };
        run(Command::new("ip").args(["netns", "add", &host.netns]))?;
        // From here on, Drop removes it.
        self.hosts.push(host.clone());
        let side = format!("r-{name}");
        ip(&host.netns, &["link", "set", "lo", "up"])?;
        ip(
            &router.netns,
            &[
                "link",
                "add",
                &side,
                "mtu",
                &router_mtu.to_string(),
                "type",
                "veth",
                "peer",
                "name",
                HOST_IFACE,
                "address",
                &host.mac_string(),
                "netns",
                &host.netns,
            ],
        )?;
        ethtool(&router.netns, &side, &["-K", "tx", "off"])?;
        ethtool(&host.netns, HOST_IFACE, &["-K", "tx", "off"])?;
        let net = format!("10.202.{}", self.slot);
        ip(
            &router.netns,
            &["addr", "add", &format!("{net}.1/24"), "dev", &side],
        )?;
        ip(&router.netns, &["link", "set", &side, "up"])?;
        ip(
            &host.netns,
            &["addr", "add", &format!("{net}.2/24"), "dev", HOST_IFACE],
        )?;
        ip(&host.netns, &["link", "set", HOST_IFACE, "up"])?;
        ip(
            &host.netns,
            &["route", "add", "default", "via", &format!("{net}.1")],
        )?;
        run(Command::new("ip").args([
            "netns",
            "exec",
            &router.netns,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ]))?;
        Ok(host)
    }

    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    pub fn host(&self, name: &str) -> &Host {
        self.try_host(name).unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn try_host(&self, name: &str) -> Result<&Host> {
        self.hosts
            .iter()
            .find(|h| h.name == name)
            .ok_or_else(|| LabError::UnknownHost(name.to_string()))
    }

    /// An address on the lab LAN that no host uses, for VIPs: `vip(0)` is .200.
    pub fn vip(&self, index: u8) -> Ipv4Addr {
        assert!(index <= 54, "VIP index {index} out of range 0..=54");
        Ipv4Addr::new(10, 201, self.slot as u8, FIRST_VIP_OCTET + index)
    }

    pub fn prefix_len(&self) -> u8 {
        24
    }

    /// A bpffs mounted for this lab, outside every host's private /sys (which
    /// `ip netns exec` replaces): pins there outlive the process that made
    /// them, as they do on a real host. Unmounted when the lab drops.
    pub fn bpffs(&self) -> Result<PathBuf> {
        let dir = bpffs_mount_point(self.slot);
        if !is_mount_point(&dir) {
            std::fs::create_dir_all(&dir)
                .map_err(io_error(format!("creating {}", dir.display())))?;
            run(Command::new("mount").args(["-t", "bpf", "bpffs"]).arg(&dir))?;
        }
        Ok(dir)
    }

    /// Where spawned processes' output is written; kept until the lab drops.
    pub fn log_dir(&self) -> &Path {
        &self.log_dir
    }

    /// A command that will run inside `host`'s namespace.
    pub fn command(&self, host: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &self.host(host).netns])
            .arg(program);
        command
    }

    /// Runs a command in `host` to completion; a non-zero exit is an error.
    pub fn exec(&self, host: &str, argv: &[&str]) -> Result<Output> {
        let (program, args) = argv.split_first().expect("argv has a program");
        run(self.command(host, program).args(args))
    }

    /// Starts a long-running process in `host`; output goes to a log file in
    /// [`Lab::log_dir`]. The process is stopped when the handle drops, and in
    /// any case when the lab drops.
    pub fn spawn(&self, host: &str, argv: &[&str]) -> Result<LabProcess> {
        let (program, args) = argv.split_first().expect("argv has a program");
        let mut command = self.command(host, program);
        command.args(args);
        let label = format!(
            "{host}-{}",
            Path::new(program)
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
        );
        LabProcess::spawn(command, &self.log_dir, &label)
    }

    /// Starts the stand-in kube-apiserver on `host`, named after it, on
    /// `<host address>:6443`, with `extra` arguments; returns once it listens.
    pub fn start_standin(&self, host: &str, extra: &[&str]) -> Result<LabProcess> {
        let program = bin_path("standin-apiserver");
        let listen = format!("{}:6443", self.host(host).addr);
        let mut argv = vec![
            program.to_str().expect("a UTF-8 path"),
            "--name",
            host,
            "--listen",
            &listen,
        ];
        argv.extend_from_slice(extra);
        let mut process = self.spawn(host, &argv)?;
        process.wait_for_log("listening", Duration::from_secs(10))?;
        Ok(process)
    }

    /// Starts `ha-user attach --iface eth0 --config CONFIG [extra]` on `host`;
    /// returns once the agent serves.
    pub fn start_agent(&self, host: &str, config: &Path, extra: &[&str]) -> Result<LabProcess> {
        let mut agent = self.spawn_agent(host, config, extra, &[])?;
        agent.wait_for_log("serving;", Duration::from_secs(15))?;
        Ok(agent)
    }

    /// Starts `ha-user attach --iface eth0 --config CONFIG [extra]` on `host`
    /// with `env` (`NAME=value`) added to its environment, and returns at
    /// once: for tests that act while the agent starts.
    pub fn spawn_agent(
        &self,
        host: &str,
        config: &Path,
        extra: &[&str],
        env: &[&str],
    ) -> Result<LabProcess> {
        let program = bin_path("ha-user");
        let config = config.to_str().expect("a UTF-8 path");
        let mut argv = Vec::new();
        if !env.is_empty() {
            argv.push("env");
            argv.extend_from_slice(env);
        }
        argv.extend_from_slice(&[
            program.to_str().expect("a UTF-8 path"),
            "attach",
            "--iface",
            HOST_IFACE,
            "--config",
            config,
        ]);
        argv.extend_from_slice(extra);
        self.spawn(host, &argv)
    }

    /// Starts Debian's keepalived on `host` as the VRRP peer of `peer`
    /// (unicast, vrid 51, the lab's first VIP), with `version` and
    /// `advert_int` as keepalived spells them ("1", "0.1", "0.01").
    pub fn start_keepalived(
        &self,
        host: &str,
        peer: &str,
        priority: u8,
        version: u8,
        advert_int: &str,
    ) -> Result<LabProcess> {
        let conf = format!(
            "global_defs {{\n  router_id {host}\n}}\nvrrp_instance VI_1 {{\n  state BACKUP\n  interface {HOST_IFACE}\n  \
             virtual_router_id 51\n  priority {priority}\n  advert_int {advert_int}\n  version {version}\n  \
             unicast_src_ip {}\n  unicast_peer {{\n    {}\n  }}\n  virtual_ipaddress {{\n    {}/32 dev {HOST_IFACE}\n  }}\n}}\n",
            self.host(host).addr,
            self.host(peer).addr,
            self.vip(0)
        );
        let path = self.log_dir.join(format!("keepalived-{host}.conf"));
        std::fs::write(&path, conf).map_err(io_error(format!("writing {}", path.display())))?;
        let pid = |name: &str| {
            self.log_dir
                .join(format!("{host}-{name}.pid"))
                .display()
                .to_string()
        };
        let (conf, k, v, c) = (path.display().to_string(), pid("k"), pid("v"), pid("c"));
        self.spawn(
            host,
            &[
                "keepalived",
                "--dont-fork",
                "--log-console",
                "--log-detail",
                "--use-file",
                &conf,
                "--pid",
                &k,
                "--vrrp_pid",
                &v,
                "--checkers_pid",
                &c,
                "--vrrp",
            ],
        )
    }

    /// Permanent neighbour entries on `host` for each of `peers` (their lab
    /// MACs), so `bpf_fib_lookup` there answers without waiting for ARP.
    pub fn pin_neighbours(&self, host: &str, peers: &[&str]) -> Result<()> {
        for peer in peers {
            let p = self.host(peer);
            let (addr, mac) = (p.addr.to_string(), p.mac_string());
            ip(
                &self.host(host).netns,
                &[
                    "neigh",
                    "replace",
                    &addr,
                    "lladdr",
                    &mac,
                    "dev",
                    HOST_IFACE,
                    "nud",
                    "permanent",
                ],
            )?;
        }
        Ok(())
    }

    /// Brings the host's own interface down (its veth's carrier drops too).
    pub fn set_link(&self, host: &str, up: bool) -> Result<()> {
        ip(
            &self.host(host).netns,
            &["link", "set", HOST_IFACE, if up { "up" } else { "down" }],
        )?;
        Ok(())
    }

    /// Unplugs (or replugs) the host's cable at the switch: the host's
    /// interface stays configured, but nothing reaches it or leaves it.
    pub fn set_switch_port(&self, host: &str, up: bool) -> Result<()> {
        let port = self.host(host).switch_port.clone();
        ip(
            &self.switch_ns,
            &["link", "set", &port, if up { "up" } else { "down" }],
        )?;
        Ok(())
    }

    /// Runs `f` on a thread that has entered `host`'s network namespace, so
    /// sockets it opens live there. Returns what `f` returns.
    pub fn in_host<R: Send>(&self, host: &str, f: impl FnOnce() -> R + Send) -> Result<R> {
        let path = format!("/run/netns/{}", self.host(host).netns);
        let netns = File::open(&path).map_err(io_error(format!("opening {path}")))?;
        std::thread::scope(|scope| {
            scope
                .spawn(move || {
                    setns(netns.as_fd(), CloneFlags::CLONE_NEWNET)
                        .map_err(|e| io_error(format!("entering {path}"))(e.into()))?;
                    Ok(f())
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Polls `condition` every 20 ms until it holds or `timeout` passes.
    pub fn wait_until(
        &self,
        timeout: Duration,
        what: &str,
        mut condition: impl FnMut() -> bool,
    ) -> Result<Duration> {
        let start = Instant::now();
        loop {
            if condition() {
                return Ok(start.elapsed());
            }
            if start.elapsed() > timeout {
                return Err(LabError::Timeout(timeout, what.to_string()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn namespaces(&self) -> Vec<String> {
        let mut names: Vec<String> = self.hosts.iter().map(|h| h.netns.clone()).collect();
        names.push(self.switch_ns.clone());
        names
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "lab {}: test failed; logs of its processes follow",
                self.slot
            );
            process::dump_logs(&self.log_dir);
        }
        self.switch_xdp = None;
        remove_namespaces(&self.namespaces());
        unmount_bpffs(self.slot);
        let _ = std::fs::remove_dir_all(&self.log_dir);
        // The slot lock is released when `_slot_lock` drops, after the namespaces are gone.
    }
}

fn claim_slot() -> Result<(u32, Flock<File>)> {
    // Start at a pid-derived slot so parallel processes rarely contend.
    let start = std::process::id() % MAX_SLOT;
    for step in 0..MAX_SLOT {
        let slot = (start + step) % MAX_SLOT + 1;
        if let Some(lock) = try_lock_slot(slot)? {
            return Ok((slot, lock));
        }
    }
    Err(LabError::NoFreeSlot)
}

fn try_lock_slot(slot: u32) -> Result<Option<Flock<File>>> {
    let path = format!("{LOCK_DIR}/slot-{slot}.lock");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io_error(format!("opening {path}")))?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(Some(lock)),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, errno)) => Err(io_error(format!("locking {path}"))(errno.into())),
    }
}

fn lab_namespaces() -> Result<Vec<(u32, String)>> {
    let entries = match std::fs::read_dir("/run/netns") {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_error("listing /run/netns")(e)),
    };
    Ok(entries
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .filter_map(|name| {
            let rest = name.strip_prefix(NS_PREFIX)?;
            let (slot, _) = rest.split_once('-')?;
            Some((slot.parse().ok()?, name))
        })
        .collect())
}

fn namespaces_of_slot(slot: u32) -> Result<Vec<String>> {
    Ok(lab_namespaces()?
        .into_iter()
        .filter(|(s, _)| *s == slot)
        .map(|(_, name)| name)
        .collect())
}

/// Removes the namespaces of every slot whose lock nobody holds: leftovers of
/// a run that was killed before its labs could drop.
pub fn sweep_stale_labs() -> Result<()> {
    let mut slots: Vec<u32> = lab_namespaces()?
        .into_iter()
        .map(|(slot, _)| slot)
        .collect();
    slots.sort_unstable();
    slots.dedup();
    for slot in slots {
        if let Some(_lock) = try_lock_slot(slot)? {
            let stale = namespaces_of_slot(slot)?;
            eprintln!(
                "ha-lab: removing stale namespaces of slot {slot}: {}",
                stale.join(" ")
            );
            remove_namespaces(&stale);
        }
    }
    Ok(())
}

/// Kills every process still inside the namespaces (a namespace with a
/// process in it outlives `ip netns del`), then deletes them. Best effort:
/// it runs from Drop and must not panic.
fn remove_namespaces(names: &[String]) {
    for name in names {
        if let Ok(output) = Command::new("ip").args(["netns", "pids", name]).output() {
            for pid in String::from_utf8_lossy(&output.stdout).split_whitespace() {
                if let Ok(pid) = pid.parse::<i32>() {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
    }
    for name in names {
        let _ = Command::new("ip")
            .args(["netns", "del", name])
            .stderr(Stdio::null())
            .status();
    }
}

fn bpffs_mount_point(slot: u32) -> PathBuf {
    PathBuf::from(format!("{LOCK_DIR}/bpffs-{slot}"))
}

fn is_mount_point(dir: &Path) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|info| {
            info.lines()
                .any(|line| line.split(' ').nth(4) == dir.to_str())
        })
        .unwrap_or(false)
}

fn unmount_bpffs(slot: u32) {
    let dir = bpffs_mount_point(slot);
    if is_mount_point(&dir) {
        let _ = Command::new("umount").arg("-l").arg(&dir).status();
    }
    let _ = std::fs::remove_dir(&dir);
}

fn ip(netns: &str, args: &[&str]) -> Result<Output> {
    run(Command::new("ip").arg("-n").arg(netns).args(args))
}

fn ethtool(netns: &str, iface: &str, args: &[&str]) -> Result<Output> {
    let (flag, rest) = args.split_first().expect("an ethtool flag");
    run(Command::new("ip")
        .args(["netns", "exec", netns, "ethtool", flag, iface])
        .args(rest))
}

/// Runs a command to completion; a non-zero exit becomes an error carrying stderr.
pub fn run(command: &mut Command) -> Result<Output> {
    let rendered = format!("{command:?}").replace('"', "");
    let output = command
        .stdin(Stdio::null())
        .output()
        .map_err(io_error(format!("running {rendered}")))?;
    if !output.status.success() {
        return Err(LabError::Command {
            command: rendered,
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    Ok(output)
}

/// Where the workspace's binaries are: `HA_BIN_DIR` if set (xtask sets it),
/// else the profile directory the running test or binary was built into.
pub fn bin_path(name: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os("HA_BIN_DIR") {
        return PathBuf::from(dir).join(name);
    }
    let exe = std::env::current_exe().expect("current executable path");
    let mut dir = exe
        .parent()
        .expect("executable has a directory")
        .to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir.join(name)
}
