//! The two worlds a case runs in: the XDP program on a lab host's real
//! interface through BPF_PROG_TEST_RUN, and the reference model; how a
//! symbolic step becomes a frame; and the comparison after every step.

use std::{collections::BTreeMap, fmt::Write as _, fs::File, net::Ipv4Addr, os::fd::AsFd};

use aya::programs::{TestRun, TestRunOptions};
use ha_common::{
    BACKEND_INDEX_MAP, BACKEND_STATS_MAP, BACKENDS_MAP, BackendAddr, BackendInfo, CONNTRACK_MAP,
    Counter, EMBRYONIC_HEAD_MAP, EMBRYONIC_MAP, EVENTS_MAP, Event, Flow, FlowKey, MAGLEV_MAP,
    NatEntry, NatKey, NatRange, PROTO_TCP, PROTO_UDP, REVERSE_NAT_MAP, Settings, TrafficCounter,
    VERDICTS_MAP, VIP_STATS_MAP, VIPS_MAP, Verdict, VipInfo, VipKey, addr_from_wire, addr_to_wire,
    port_from_wire,
};
use ha_model::{
    Config, FibAnswer, Model,
    frame::{FrameSpec, Transport},
};
use ha_user::{
    config::DataPlaneConfig,
    dataplane::{DataPlane, DesiredBackend, DesiredVip, LoadOptions},
};
use nix::sched::{CloneFlags, CpuSet, sched_setaffinity, setns};

use super::{
    batch,
    steps::{BackendState, Frame, Kind, Mutation, Step},
};
use crate::{HOST_IFACE, Lab};

/// Routes of the lb host that refuse (`ip route add KIND ADDR/32`), to
/// client addresses of the pool.
const REFUSING_ROUTES: [(&str, Ipv4Addr); 3] = [
    ("blackhole", Ipv4Addr::new(198, 51, 100, 8)),
    ("unreachable", Ipv4Addr::new(198, 51, 100, 9)),
    ("prohibit", Ipv4Addr::new(198, 51, 100, 10)),
];

/// The virtual clock at the start of every case.
pub const T0: u64 = 1_000_000_000_000_000;
/// Small tables, so that they fill, evict and collide within a case.
const MAX_FLOWS: u32 = 8;
const TABLE_SIZE: u32 = 101;
const MAX_VIPS: u32 = 8;
/// How many backend ids and VIP slots the counters are compared for.
const STAT_SLOTS: usize = 8;

/// Why a case failed: the step, and what differed.
pub type Divergence = String;

/// One worker's lab, data plane and model, on one CPU.
pub struct Harness {
    /// Keeps the namespaces alive.
    _lab: Lab,
    dataplane: DataPlane,
    ctx: [u8; 24],
    cpu: usize,
    cpus: usize,
    capacity: ha_model::Capacity,
    pools: Pools,
    // The case in progress.
    model: Model,
    now: u64,
    baseline: Counters,
    backends: [BackendState; 3],
    nat_current: usize,
    settings: Settings,
    /// The maps hold something other than the base configuration.
    dirty: bool,
    /// The PASSIVE_EVENTS records the program put in its ring in this case,
    /// oldest first (the ring is drained after every step).
    passive_events: Vec<ha_common::PassiveEvent>,
    /// Verdicts and events counted over every case run so far (what paths
    /// the campaign reached).
    pub coverage: Coverage,
}

/// How often each verdict and event occurred over the cases run.
#[derive(Clone, Debug, Default)]
pub struct Coverage {
    pub verdicts: Vec<u64>,
    pub events: Vec<u64>,
}

impl Coverage {
    fn add(&mut self, state: &ha_model::State) {
        self.verdicts.resize(Verdict::COUNT as usize, 0);
        self.events.resize(Event::COUNT as usize, 0);
        for (total, c) in self.verdicts.iter_mut().zip(&state.verdicts) {
            *total += c.packets;
        }
        for (total, n) in self.events.iter_mut().zip(&state.events) {
            *total += n;
        }
    }

    /// Adds another worker's.
    pub fn merge(&mut self, other: &Coverage) {
        self.verdicts.resize(Verdict::COUNT as usize, 0);
        self.events.resize(Event::COUNT as usize, 0);
        for (a, b) in self.verdicts.iter_mut().zip(&other.verdicts) {
            *a += b;
        }
        for (a, b) in self.events.iter_mut().zip(&other.events) {
            *a += b;
        }
    }

    /// `label count` for every verdict and event, the unreached ones marked.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for (i, n) in self.verdicts.iter().enumerate() {
            let _ = writeln!(
                out,
                "  verdict {:<24} {n}",
                Verdict::from_index(i as u32).label()
            );
        }
        for (i, n) in self.events.iter().enumerate() {
            let _ = writeln!(
                out,
                "  event   {:<24} {n}",
                Event::from_index(i as u32).label()
            );
        }
        out
    }
}

/// The addresses, ports and MACs steps choose from.
struct Pools {
    lb: Ipv4Addr,
    lb_mac: [u8; 6],
    /// Client addresses: the lab's client (resolved), two spoofed ones on
    /// the LAN (no neighbour: replies use the learned MAC), one with no route,
    /// three behind refusing routes, one from 127/8.
    clients: Vec<(Ipv4Addr, [u8; 6])>,
    client_ports: Vec<u16>,
    /// (address, port): the VIPs and some addresses and ports that are not.
    targets: Vec<(Ipv4Addr, u16)>,
    /// Backend-side sources: the backends on their ports, and impostors.
    sources: Vec<(Ipv4Addr, u16, [u8; 6])>,
    /// Destinations of backend-side packets.
    dsts: Vec<Ipv4Addr>,
    /// Destination ports of backend-side packets: the NAT ranges and others.
    ports: Vec<u16>,
    /// NAT ranges a reload may switch between.
    ranges: Vec<NatRange>,
    apis: Vec<(Ipv4Addr, [u8; 6])>,
    client_host: (Ipv4Addr, [u8; 6]),
    vips: [Ipv4Addr; 4],
    subnet: [u8; 3],
}

/// Per-CPU counters of one CPU, as the maps hold them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Counters {
    verdicts: Vec<Counter>,
    events: Vec<u64>,
    vip_stats: Vec<TrafficCounter>,
    backend_stats: Vec<TrafficCounter>,
}

impl Counters {
    fn minus(&self, base: &Counters) -> Counters {
        let sub = |a: &TrafficCounter, b: &TrafficCounter| TrafficCounter {
            packets: a.packets - b.packets,
            bytes: a.bytes - b.bytes,
            new_flows: a.new_flows - b.new_flows,
        };
        Counters {
            verdicts: self
                .verdicts
                .iter()
                .zip(&base.verdicts)
                .map(|(a, b)| Counter {
                    packets: a.packets - b.packets,
                    bytes: a.bytes - b.bytes,
                })
                .collect(),
            events: self
                .events
                .iter()
                .zip(&base.events)
                .map(|(a, b)| a - b)
                .collect(),
            vip_stats: self
                .vip_stats
                .iter()
                .zip(&base.vip_stats)
                .map(|(a, b)| sub(a, b))
                .collect(),
            backend_stats: self
                .backend_stats
                .iter()
                .zip(&base.backend_stats)
                .map(|(a, b)| sub(a, b))
                .collect(),
        }
    }
}

/// The lab's FIB as bpf_fib_lookup answers it: resolved neighbours for the
/// lab's hosts, none for other addresses on the LAN, no route elsewhere, an
/// MTU of 1500. (The environment, not the data path: a divergence here is a
/// mistake in this description of the lab.)
struct LabFib<'a> {
    pools: &'a Pools,
    ifindex: u32,
}

impl ha_model::Fib for LabFib<'_> {
    fn lookup(&self, _ingress: u32, _src: Ipv4Addr, dst: Ipv4Addr, tot_len: u16) -> FibAnswer {
        let p = self.pools;
        let o = dst.octets();
        match REFUSING_ROUTES.iter().position(|(_, a)| *a == dst) {
            Some(0) => return FibAnswer::Blackhole,
            Some(1) => return FibAnswer::Unreachable,
            Some(_) => return FibAnswer::Prohibit,
            None => {}
        }
        // The subnet's broadcast address and the host's own are not
        // forwarded; the network address (.0) is an ordinary neighbour to
        // this kernel (found by the fuzzer).
        if o[..3] != p.subnet || o[3] == 255 || dst == p.lb {
            return FibAnswer::NoRoute;
        }
        if tot_len > 1500 {
            return FibAnswer::FragNeeded { mtu: 1500 };
        }
        let resolved = std::iter::once(&p.client_host)
            .chain(&p.apis)
            .find(|(addr, _)| *addr == dst);
        match resolved {
            Some((_, mac)) => FibAnswer::Success {
                ifindex: self.ifindex,
                smac: p.lb_mac,
                dmac: *mac,
            },
            None => FibAnswer::NoNeighbour,
        }
    }
}

fn backend_of(address: Ipv4Addr, port: u16, state: BackendState, local: bool) -> DesiredBackend {
    DesiredBackend {
        address: address.into(),
        port,
        weight: u32::from(state == BackendState::Up),
        local,
        down: state == BackendState::Down,
    }
}

impl Harness {
    /// A lab (client, lb, api1-3) and the data plane loaded with small
    /// tables, in this thread, which it moves into the lb host's network
    /// namespace and pins to `cpu`.
    pub fn new(cpu: usize) -> anyhow::Result<Harness> {
        let lab = Lab::new(&["client", "lb", "api1", "api2", "api3"])?;
        lab.exec(
            "lb",
            &[
                "sh",
                "-c",
                "echo 1 > /proc/sys/net/ipv4/conf/eth0/forwarding",
            ],
        )?;
        lab.pin_neighbours("lb", &["client", "api1", "api2", "api3"])?;
        // Routes that refuse: each FIB answer has its verdict.
        for (kind, addr) in REFUSING_ROUTES {
            lab.exec("lb", &["ip", "route", "add", kind, &format!("{addr}/32")])?;
        }
        let netns = File::open(format!("/run/netns/{}", lab.host("lb").netns))?;
        setns(netns.as_fd(), CloneFlags::CLONE_NEWNET)?;
        let mut cpus = CpuSet::new();
        cpus.set(cpu)?;
        sched_setaffinity(nix::unistd::Pid::from_raw(0), &cpus)?;
        let options = LoadOptions {
            host_ports: None,
            accept_flow_loss: false,
            maglev_table_size: TABLE_SIZE,
            max_vips: MAX_VIPS,
            max_flows: MAX_FLOWS,
            pin_dir: None,
        };
        let dataplane = DataPlane::load(&options)?;
        let ifindex = nix::net::if_::if_nametoindex(HOST_IFACE)?;
        let mut ctx = [0u8; 24];
        ctx[12..16].copy_from_slice(&ifindex.to_ne_bytes());
        let host = |name: &str| (lab.host(name).addr, lab.host(name).mac);
        let lb = lab.host("lb").addr;
        let o = lb.octets();
        let on_lan = |last: u8| Ipv4Addr::new(o[0], o[1], o[2], last);
        let apis = vec![host("api1"), host("api2"), host("api3")];
        let pools = Pools {
            lb,
            lb_mac: lab.host("lb").mac,
            clients: vec![
                host("client"),
                (on_lan(150), [0x02, 0, 0, 0, 0x96, 1]),
                (on_lan(151), [0x02, 0, 0, 0, 0x97, 1]),
                (Ipv4Addr::new(198, 51, 100, 7), [0x02, 0, 0, 0, 0x98, 1]),
                (REFUSING_ROUTES[0].1, [0x02, 0, 0, 0, 0x98, 2]),
                (REFUSING_ROUTES[1].1, [0x02, 0, 0, 0, 0x98, 3]),
                (REFUSING_ROUTES[2].1, [0x02, 0, 0, 0, 0x98, 4]),
                // A source that is never answered with an ICMP error.
                (Ipv4Addr::new(127, 0, 0, 9), [0x02, 0, 0, 0, 0x98, 5]),
            ],
            // A few ports, often met again, then many: enough flows to fill the tables.
            client_ports: [40000, 40001, 40002, 40003, 50000, 1024, 65535]
                .into_iter()
                .chain(30000..30064)
                .collect(),
            targets: vec![
                (lab.vip(0), 6443),
                (lab.vip(1), 53),
                (lab.vip(2), 6443),
                (lab.vip(3), 6443),
                (lab.vip(0), 22),
                (lb, 6443),
            ],
            sources: vec![
                (apis[0].0, 6443, apis[0].1),
                (apis[1].0, 6443, apis[1].1),
                (apis[2].0, 6443, apis[2].1),
                (apis[0].0, 5353, apis[0].1),
                (apis[1].0, 5353, apis[1].1),
                (host("client").0, 6443, host("client").1),
                (apis[0].0, 7777, apis[0].1),
            ],
            dsts: vec![lb, lb, lb, on_lan(99), lab.vip(0)],
            ports: (20000..=20003)
                .chain(21000..=21001)
                .chain([19999, 22, 32768, 20004])
                .collect(),
            ranges: vec![
                NatRange {
                    addr: addr_to_wire(lb.octets()),
                    port_min: 20000,
                    port_max: 20003,
                },
                NatRange {
                    addr: addr_to_wire(lb.octets()),
                    port_min: 21000,
                    port_max: 21001,
                },
                NatRange {
                    addr: addr_to_wire(on_lan(99).octets()),
                    port_min: 20000,
                    port_max: 20003,
                },
            ],
            apis,
            client_host: host("client"),
            vips: [lab.vip(0), lab.vip(1), lab.vip(2), lab.vip(3)],
            subnet: [o[0], o[1], o[2]],
        };
        let mut settings = DataPlaneConfig::default().settings(lb.into())?;
        settings.clock_ns = T0;
        let mut harness = Harness {
            _lab: lab,
            dataplane,
            ctx,
            cpu,
            cpus: ha_user::dataplane::possible_cpus() as usize,
            capacity: ha_model::Capacity {
                conntrack: options.table_entries() as usize,
                reverse: options.reverse_entries() as usize,
            },
            pools,
            model: Model::new(Config::default(), ha_model::Capacity::both(0), 0),
            now: T0,
            baseline: Counters::default(),
            backends: [BackendState::Up; 3],
            nat_current: 0,
            settings,
            dirty: true,
            coverage: Coverage::default(),
            passive_events: Vec::new(),
        };
        harness.reset()?;
        Ok(harness)
    }

    fn desired(&self) -> Vec<DesiredVip> {
        let p = &self.pools;
        let pool = |port: u16| {
            p.apis
                .iter()
                .zip(self.backends)
                .map(|((addr, _), state)| backend_of(*addr, port, state, false))
                .collect::<Vec<_>>()
        };
        let vip = |name: &str, address: Ipv4Addr, port, protocol, enabled, backends| DesiredVip {
            name: name.into(),
            address: address.into(),
            port,
            protocol,
            enabled,
            backends,
        };
        vec![
            vip("tcp", p.vips[0], 6443, PROTO_TCP, true, pool(6443)),
            vip("udp", p.vips[1], 53, PROTO_UDP, true, pool(5353)),
            vip(
                "local",
                p.vips[2],
                6443,
                PROTO_TCP,
                true,
                vec![backend_of(p.lb, 6443, BackendState::Up, true)],
            ),
            vip("disabled", p.vips[3], 6443, PROTO_TCP, false, pool(6443)),
        ]
    }

    /// Writes the current settings and VIPs; `Err` when the data plane refuses.
    fn apply(&mut self) -> Result<(), ha_user::dataplane::DataPlaneError> {
        let vips = self.desired();
        let mut settings = self.settings;
        settings.nat[0] = self.pools.ranges[self.nat_current];
        settings.clock_ns = self.now;
        self.dataplane.apply(&settings, &vips)?;
        self.settings = settings;
        self.dirty = true;
        Ok(())
    }

    /// Empty tables, the base configuration (with one earlier NAT range), the
    /// clock at T0, and a fresh model of the same.
    pub fn reset(&mut self) -> anyhow::Result<()> {
        self.dataplane.clear_flows()?;
        self.dataplane.clear_embryonic_ring()?;
        self.dataplane.clear_suspects()?;
        self.dataplane.clear_redispatched()?;
        self.dataplane.take_passive_events()?;
        self.passive_events.clear();
        self.now = T0;
        if self.dirty || self.backends != [BackendState::Up; 3] || self.nat_current != 0 {
            self.backends = [BackendState::Up; 3];
            self.nat_current = 1;
            self.apply()?;
            self.nat_current = 0;
            self.apply()?;
        }
        self.dataplane.set_clock(T0)?;
        let config = self.read_config()?;
        self.model = Model::new(config, self.capacity, self.dataplane.embryonic_slots());
        self.baseline = self.read_counters()?;
        self.dirty = false;
        Ok(())
    }

    /// The configuration maps as the program reads them, for the model.
    fn read_config(&self) -> anyhow::Result<Config> {
        let dp = &self.dataplane;
        let mut config = Config {
            settings: dp.settings(),
            ..Config::default()
        };
        for (k, v) in batch::dump(dp.map_fd(VIPS_MAP)?, 8, 16, ha_common::MAX_VIPS as usize)? {
            config
                .vips
                .insert(batch::read::<VipKey>(&k), batch::read::<VipInfo>(&v));
        }
        // Backend ids are given from 0 up; this world uses fewer than 16.
        let backends = batch::dump(dp.map_fd(BACKENDS_MAP)?, 4, 8, 16)?;
        config.backends = backends
            .iter()
            .map(|(_, v)| batch::read::<BackendInfo>(v))
            .collect();
        for (k, v) in batch::dump(dp.map_fd(BACKEND_INDEX_MAP)?, 8, 4, 64)? {
            config
                .backend_index
                .insert(batch::read::<BackendAddr>(&k), batch::read::<u32>(&v));
        }
        let maglev = batch::dump(
            dp.map_fd(MAGLEV_MAP)?,
            4,
            4,
            (TABLE_SIZE * 2 * MAX_VIPS) as usize,
        )?;
        config.maglev = maglev.iter().map(|(_, v)| batch::read::<u32>(v)).collect();
        Ok(config)
    }

    fn read_counters(&self) -> anyhow::Result<Counters> {
        let dp = &self.dataplane;
        let cpu = self.cpu;
        let per_cpu = |name: &'static str, size: usize, entries: usize| {
            batch::dump(dp.map_fd(name)?, 4, size, entries).map_err(anyhow::Error::from)
        };
        let counter = batch::per_cpu_size::<Counter>(self.cpus);
        let traffic = batch::per_cpu_size::<TrafficCounter>(self.cpus);
        let verdicts = per_cpu(VERDICTS_MAP, counter, Verdict::COUNT as usize)?;
        let events = per_cpu(
            EVENTS_MAP,
            batch::per_cpu_size::<u64>(self.cpus),
            Event::COUNT as usize,
        )?;
        let vips = per_cpu(VIP_STATS_MAP, traffic, STAT_SLOTS)?;
        let backends = per_cpu(BACKEND_STATS_MAP, traffic, STAT_SLOTS)?;
        Ok(Counters {
            verdicts: verdicts
                .iter()
                .map(|(_, v)| batch::per_cpu(v, cpu))
                .collect(),
            events: events.iter().map(|(_, v)| batch::per_cpu(v, cpu)).collect(),
            vip_stats: vips
                .iter()
                .take(STAT_SLOTS)
                .map(|(_, v)| batch::per_cpu(v, cpu))
                .collect(),
            backend_stats: backends
                .iter()
                .take(STAT_SLOTS)
                .map(|(_, v)| batch::per_cpu(v, cpu))
                .collect(),
        })
    }

    /// Runs a case from a reset world; the first divergence ends it.
    pub fn run(&mut self, steps: &[Step]) -> Result<(), Divergence> {
        self.run_with_model(steps, |_| {})
    }

    /// [`Harness::run`], with the model changed by `perturb` after the reset
    /// (the fuzzer's self-test: a model that disagrees must be caught).
    pub fn run_with_model(
        &mut self,
        steps: &[Step],
        perturb: impl FnOnce(&mut Model),
    ) -> Result<(), Divergence> {
        self.reset()
            .map_err(|e| format!("resetting the world: {e:#}"))?;
        perturb(&mut self.model);
        for (i, step) in steps.iter().enumerate() {
            self.step(step)
                .map_err(|why| format!("step {i} of {}: {step:?}\n{why}", steps.len()))?;
        }
        self.coverage.add(&self.model.state);
        Ok(())
    }

    /// Runs a case and tells what each step did on both sides (a divergence report).
    pub fn trace(&mut self, steps: &[Step]) -> String {
        let mut out = String::new();
        if let Err(e) = self.reset() {
            return format!("resetting the world: {e:#}");
        }
        for (i, step) in steps.iter().enumerate() {
            let _ = writeln!(out, "step {i}: {step:?}");
            if let Step::Frame { frame, .. } = step {
                let bytes = self.resolve(frame);
                let _ = writeln!(out, "  frame {}", hex(&bytes));
            }
            match self.step(step) {
                Ok(()) => {
                    let _ = writeln!(out, "  same on both sides");
                }
                Err(why) => {
                    let _ = writeln!(out, "  DIVERGENCE:\n{why}");
                    break;
                }
            }
        }
        out
    }

    /// The model's maps and counters after the last case: the program's
    /// too, as long as that case ran without a divergence.
    pub fn state(&self) -> &ha_model::State {
        &self.model.state
    }

    /// Packets (frames) in a case.
    pub fn frames(steps: &[Step]) -> usize {
        steps
            .iter()
            .filter(|s| matches!(s, Step::Frame { .. }))
            .count()
    }

    fn step(&mut self, step: &Step) -> Result<(), Divergence> {
        match step {
            Step::Frame { advance_ns, frame } => {
                self.advance(*advance_ns)?;
                self.frame(frame)?;
            }
            Step::Egress { advance_ns, frame } => {
                self.advance(*advance_ns)?;
                self.egress(frame)?;
            }
            Step::Sweep { advance_ns } => {
                self.now = self.now.saturating_add(*advance_ns);
                let kernel = self
                    .dataplane
                    .sweep_flows(self.now)
                    .map_err(|e| format!("sweep: {e}"))?;
                let model = self.model.sweep(self.now);
                let kernel = (
                    kernel.live,
                    kernel.expired,
                    kernel.reverse_recovered,
                    kernel.orphans_freed,
                );
                let model = (
                    model.live,
                    model.expired,
                    model.reverse_recovered,
                    model.orphans_freed,
                );
                if kernel != model {
                    return Err(format!(
                        "sweep (live, expired, reverse recovered, orphans freed): agent {kernel:?}, model {model:?}"
                    ));
                }
                // The sweep may drop earlier NAT ranges from the settings.
                self.settings = self.dataplane.settings();
                self.refresh_config()?;
            }
            Step::Backend { index, state } => {
                self.backends[*index as usize % 3] = *state;
                self.apply().map_err(|e| format!("apply: {e}"))?;
                self.refresh_config()?;
            }
            Step::Handshake {
                client,
                port,
                target,
            } => {
                let syn = |kind, tcp_flags| Frame {
                    kind,
                    tcp_flags,
                    payload: 0,
                    vlan: false,
                    mutation: Mutation::None,
                };
                let kind = Kind::Client {
                    client: *client,
                    port: *port,
                    target: *target,
                    udp: false,
                };
                self.frame(&syn(kind.clone(), 0x02))?;
                self.check()?;
                // The flow's reverse entry, if it got one: the backend answers it.
                let key = self.key_of(&kind);
                let reply = self
                    .model
                    .state
                    .reverse
                    .iter()
                    .position(|(_, e)| e.flow == key);
                if let Some(index) = reply {
                    let reply = Kind::ReplyOfFlow { index: index as u8 };
                    // A local flow's answer leaves through the tc egress program.
                    let local = self
                        .model
                        .state
                        .conntrack
                        .get(&key)
                        .is_some_and(|f| f.flags & ha_common::FLOW_LOCAL != 0);
                    if index < 256 {
                        if local {
                            self.egress(&syn(reply, 0x12))?;
                        } else {
                            self.frame(&syn(reply, 0x12))?;
                        }
                        self.check()?;
                    }
                }
                self.frame(&syn(kind, 0x10))?;
            }
            Step::Lose { reverse, index } => {
                let state = &mut self.model.state;
                if *reverse {
                    let len = state.reverse.len().max(1);
                    if let Some(key) = state.reverse.keys().nth(*index as usize % len).copied() {
                        state.reverse.remove(&key);
                        self.dataplane
                            .remove_reverse_entry(&key)
                            .map_err(|e| format!("removing {key:?}: {e}"))?;
                    }
                } else {
                    let len = state.conntrack.len().max(1);
                    if let Some(key) = state.conntrack.keys().nth(*index as usize % len).copied() {
                        state.conntrack.remove(&key);
                        self.dataplane
                            .remove_flow(&key)
                            .map_err(|e| format!("removing {key:?}: {e}"))?;
                    }
                }
            }
            Step::Confirm { index } => {
                let state = &mut self.model.state;
                let len = state.suspect.len().max(1);
                if let Some(id) = state.suspect.keys().nth(*index as usize % len).copied() {
                    state.suspect.remove(&id);
                    self.dataplane
                        .set_suspect_since(id, 0)
                        .map_err(|e| format!("clearing SUSPECT[{id}]: {e}"))?;
                }
            }
            Step::NatRange { index } => {
                let previous = self.nat_current;
                self.nat_current = *index as usize % self.pools.ranges.len();
                if self.apply().is_err() {
                    // Refused (too many earlier ranges): nothing changed.
                    self.nat_current = previous;
                }
                self.refresh_config()?;
            }
        }
        self.check()
    }

    /// Drains the PASSIVE_EVENTS ring, then compares every map.
    fn check(&mut self) -> Result<(), Divergence> {
        let drained = self
            .dataplane
            .take_passive_events()
            .map_err(|e| format!("draining PASSIVE_EVENTS: {e}"))?;
        self.passive_events.extend(drained);
        self.compare()
    }

    fn advance(&mut self, advance_ns: u64) -> Result<(), Divergence> {
        if advance_ns == 0 {
            return Ok(());
        }
        self.now = self.now.saturating_add(advance_ns);
        self.dataplane
            .set_clock(self.now)
            .map_err(|e| format!("setting the clock: {e}"))?;
        self.settings.clock_ns = self.now;
        self.model.config.settings.clock_ns = self.now;
        Ok(())
    }

    fn refresh_config(&mut self) -> Result<(), Divergence> {
        let config = self
            .read_config()
            .map_err(|e| format!("reading the maps: {e:#}"))?;
        self.model.config = config;
        Ok(())
    }

    fn frame(&mut self, frame: &Frame) -> Result<(), Divergence> {
        let bytes = self.resolve(frame);
        let mut ctx = self.ctx;
        ctx[4..8].copy_from_slice(&(bytes.len() as u32).to_ne_bytes());
        let mut out = vec![0u8; bytes.len() + 256];
        let mut options = TestRunOptions::new();
        options.data_in = Some(&bytes);
        options.data_out = Some(&mut out);
        options.ctx_in = Some(&ctx);
        let result = self
            .dataplane
            .program()
            .test_run(options)
            .map_err(|e| format!("BPF_PROG_TEST_RUN: {e}"))?;
        out.truncate(result.data_size_out as usize);
        let fib = LabFib {
            pools: &self.pools,
            ifindex: u32::from_ne_bytes(self.ctx[12..16].try_into().expect("4 bytes")),
        };
        let ingress = fib.ifindex;
        let expected = self.model.process(&bytes, ingress, self.now, &fib);
        let frame_hex = hex(&bytes);
        if result.return_value != expected.action {
            return Err(format!(
                "frame {frame_hex}\naction: XDP {} ({}), model {} ({})",
                result.return_value,
                self.last_verdict().unwrap_or_default(),
                expected.action,
                expected.verdict.label()
            ));
        }
        if expected.action != ha_model::XDP_DROP && out != expected.output {
            return Err(format!(
                "frame  {frame_hex}\noutput: XDP   {}\n        model {}",
                hex(&out),
                hex(&expected.output)
            ));
        }
        Ok(())
    }

    /// One frame through the tc egress program and the model's egress
    /// function: the action (always TC_ACT_OK), the bytes that leave, and
    /// the verdict counted. A frame the kernel refuses to build an skb of
    /// (shorter than its Ethernet or IPv4 header) is skipped on both sides.
    fn egress(&mut self, frame: &Frame) -> Result<(), Divergence> {
        let bytes = self.resolve(frame);
        let before = self
            .dataplane
            .egress_verdicts()
            .map_err(|e| format!("EGRESS_VERDICTS: {e}"))?;
        let mut out = vec![0u8; bytes.len() + 256];
        let mut options = TestRunOptions::new();
        options.data_in = Some(&bytes);
        options.data_out = Some(&mut out);
        let result = match self.dataplane.egress_program().test_run(options) {
            Ok(result) => result,
            Err(aya::programs::ProgramError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::EINVAL) =>
            {
                return Ok(());
            }
            Err(e) => return Err(format!("BPF_PROG_TEST_RUN (tc): {e}")),
        };
        out.truncate(result.data_size_out as usize);
        let expected = self.model.egress(&bytes, self.now);
        let frame_hex = hex(&bytes);
        if result.return_value as i32 != expected.action {
            return Err(format!(
                "egress frame {frame_hex}
action: tc {}, model {}",
                result.return_value, expected.action
            ));
        }
        if out != expected.output {
            return Err(format!(
                "egress frame  {frame_hex}
output: tc    {}
        model {}",
                hex(&out),
                hex(&expected.output)
            ));
        }
        let after = self
            .dataplane
            .egress_verdicts()
            .map_err(|e| format!("EGRESS_VERDICTS: {e}"))?;
        let counted: Vec<&str> = after
            .iter()
            .zip(&before)
            .filter(|((_, a), (_, b))| a.packets != b.packets)
            .map(|((v, _), _)| v.label())
            .collect();
        if counted != [expected.verdict.label()] {
            return Err(format!(
                "egress frame {frame_hex}
verdict: tc {counted:?}, model {}",
                expected.verdict.label()
            ));
        }
        Ok(())
    }

    /// The verdict the last packet was counted as (for reports).
    fn last_verdict(&self) -> Option<String> {
        let now = self.read_counters().ok()?.minus(&self.baseline);
        let model = &self.model.state.verdicts;
        now.verdicts
            .iter()
            .zip(model)
            .enumerate()
            .find(|(_, (k, m))| k.packets != m.packets)
            .map(|(i, _)| Verdict::from_index(i as u32).label().to_string())
    }

    /// Every map the data path writes, against the model's.
    fn compare(&self) -> Result<(), Divergence> {
        let dp = &self.dataplane;
        let fail = |what: &str, e: &dyn std::fmt::Display| format!("reading {what}: {e}");
        let conntrack: BTreeMap<FlowKey, Flow> = batch::dump(
            dp.map_fd(CONNTRACK_MAP)
                .map_err(|e| fail("CONNTRACK", &e))?,
            16,
            32,
            self.capacity.conntrack,
        )
        .map_err(|e| fail("CONNTRACK", &e))?
        .iter()
        .map(|(k, v)| (batch::read(k), batch::read(v)))
        .collect();
        let reverse: BTreeMap<NatKey, NatEntry> = batch::dump(
            dp.map_fd(REVERSE_NAT_MAP)
                .map_err(|e| fail("REVERSE_NAT", &e))?,
            16,
            32,
            self.capacity.reverse,
        )
        .map_err(|e| fail("REVERSE_NAT", &e))?
        .iter()
        .map(|(k, v)| (batch::read(k), batch::read(v)))
        .collect();
        let m = &self.model.state;
        let mut diff = String::new();
        diff_maps(&mut diff, "CONNTRACK", &conntrack, &m.conntrack);
        diff_maps(&mut diff, "REVERSE_NAT", &reverse, &m.reverse);
        let suspect: BTreeMap<u32, u64> = dp
            .suspect_entries()
            .map_err(|e| fail("SUSPECT", &e))?
            .into_iter()
            .collect();
        diff_maps(&mut diff, "SUSPECT", &suspect, &m.suspect);
        let redispatched: BTreeMap<FlowKey, u64> = dp
            .redispatched_flows()
            .map_err(|e| fail("REDISPATCHED", &e))?
            .into_iter()
            .collect();
        diff_maps(&mut diff, "REDISPATCHED", &redispatched, &m.redispatched);
        if self.passive_events != m.passive_events {
            let _ = writeln!(
                diff,
                "PASSIVE_EVENTS: XDP {:?}\n                model {:?}",
                self.passive_events, m.passive_events
            );
        }
        let slots = m.embryonic.len();
        let ring: Vec<FlowKey> = batch::dump(
            dp.map_fd(EMBRYONIC_MAP)
                .map_err(|e| fail("EMBRYONIC", &e))?,
            4,
            batch::per_cpu_size::<FlowKey>(self.cpus),
            slots,
        )
        .map_err(|e| fail("EMBRYONIC", &e))?
        .iter()
        .map(|(_, v)| batch::per_cpu(v, self.cpu))
        .collect();
        let head: ha_common::QueueHead = batch::dump(
            dp.map_fd(EMBRYONIC_HEAD_MAP)
                .map_err(|e| fail("EMBRYONIC_HEAD", &e))?,
            4,
            batch::per_cpu_size::<ha_common::QueueHead>(self.cpus),
            1,
        )
        .map_err(|e| fail("EMBRYONIC_HEAD", &e))?
        .first()
        .map_or_else(Default::default, |(_, v)| batch::per_cpu(v, self.cpu));
        if ring != m.embryonic || head != m.embryonic_head {
            let _ = writeln!(
                diff,
                "EMBRYONIC: XDP head {head:?} {:?}\n           model head {:?} {:?}",
                ring, m.embryonic_head, m.embryonic
            );
        }
        let counters = self
            .read_counters()
            .map_err(|e| fail("counters", &e))?
            .minus(&self.baseline);
        for (i, (k, mv)) in counters.verdicts.iter().zip(&m.verdicts).enumerate() {
            if k != mv {
                let _ = writeln!(
                    diff,
                    "VERDICTS {}: XDP {k:?}, model {mv:?}",
                    Verdict::from_index(i as u32).label()
                );
            }
        }
        for (i, (k, me)) in counters.events.iter().zip(&m.events).enumerate() {
            if k != me {
                let _ = writeln!(
                    diff,
                    "EVENTS {}: XDP {k}, model {me}",
                    Event::from_index(i as u32).label()
                );
            }
        }
        let stats = |model: &BTreeMap<u32, TrafficCounter>, slot: usize| {
            model.get(&(slot as u32)).copied().unwrap_or_default()
        };
        for (slot, k) in counters.vip_stats.iter().enumerate() {
            if *k != stats(&m.vip_stats, slot) {
                let _ = writeln!(
                    diff,
                    "VIP_STATS {slot}: XDP {k:?}, model {:?}",
                    stats(&m.vip_stats, slot)
                );
            }
        }
        for (id, k) in counters.backend_stats.iter().enumerate() {
            if *k != stats(&m.backend_stats, id) {
                let _ = writeln!(
                    diff,
                    "BACKEND_STATS {id}: XDP {k:?}, model {:?}",
                    stats(&m.backend_stats, id)
                );
            }
        }
        if diff.is_empty() { Ok(()) } else { Err(diff) }
    }

    /// The connection-table key a client frame of `kind` has.
    fn key_of(&self, kind: &Kind) -> FlowKey {
        let p = &self.pools;
        let Kind::Client {
            client,
            port,
            target,
            udp,
        } = kind
        else {
            return FlowKey::EMPTY;
        };
        let (src, _) = p.clients[*client as usize % p.clients.len()];
        let (dst, dport) = p.targets[*target as usize % p.targets.len()];
        FlowKey {
            src_addr: addr_to_wire(src.octets()),
            dst_addr: addr_to_wire(dst.octets()),
            src_port: ha_common::port_to_wire(
                p.client_ports[*port as usize % p.client_ports.len()],
            ),
            dst_port: ha_common::port_to_wire(dport),
            protocol: if *udp { PROTO_UDP } else { PROTO_TCP },
            _pad: [0; 3],
        }
    }

    /// The frame bytes a symbolic frame stands for, in the world as it is now.
    fn resolve(&self, frame: &Frame) -> Vec<u8> {
        let p = &self.pools;
        let pick = |i: u8, len: usize| i as usize % len;
        let state = &self.model.state;
        let mac_of = |addr: Ipv4Addr| {
            p.clients
                .iter()
                .map(|(a, m)| (*a, *m))
                .chain(p.apis.iter().copied())
                .find(|(a, _)| *a == addr)
                .map_or([0x02, 0, 0, 0, 0x99, 1], |(_, m)| m)
        };
        let ip = |a: Ipv4Addr| a.octets();
        // (spec, source MAC)
        let (mut spec, src_mac) = match &frame.kind {
            Kind::Client {
                client,
                port,
                target,
                udp,
            } => {
                let (addr, mac) = p.clients[pick(*client, p.clients.len())];
                let sport = p.client_ports[pick(*port, p.client_ports.len())];
                let (dst, dport) = p.targets[pick(*target, p.targets.len())];
                (
                    l4_spec(*udp, ip(addr), sport, ip(dst), dport, frame.tcp_flags),
                    mac,
                )
            }
            Kind::ClientOfFlow { index } => match state
                .conntrack
                .keys()
                .nth(pick(*index, state.conntrack.len().max(1)))
            {
                Some(key) => {
                    let src = Ipv4Addr::from(addr_from_wire(key.src_addr));
                    let dst = Ipv4Addr::from(addr_from_wire(key.dst_addr));
                    (
                        l4_spec(
                            key.protocol == PROTO_UDP,
                            ip(src),
                            port_from_wire(key.src_port),
                            ip(dst),
                            port_from_wire(key.dst_port),
                            frame.tcp_flags,
                        ),
                        mac_of(src),
                    )
                }
                None => {
                    let (addr, mac) = p.clients[0];
                    (
                        l4_spec(false, ip(addr), 40000, ip(p.vips[0]), 6443, frame.tcp_flags),
                        mac,
                    )
                }
            },
            Kind::Backend {
                source,
                dst,
                port,
                udp,
            } => {
                let (addr, sport, mac) = p.sources[pick(*source, p.sources.len())];
                let dst = p.dsts[pick(*dst, p.dsts.len())];
                let dport = p.ports[pick(*port, p.ports.len())];
                (
                    l4_spec(*udp, ip(addr), sport, ip(dst), dport, frame.tcp_flags),
                    mac,
                )
            }
            Kind::ReplyOfFlow { index } => match state
                .reverse
                .keys()
                .nth(pick(*index, state.reverse.len().max(1)))
            {
                Some(key) => {
                    let src = Ipv4Addr::from(addr_from_wire(key.backend_addr));
                    let dst = Ipv4Addr::from(addr_from_wire(key.lb_addr));
                    (
                        l4_spec(
                            key.protocol == PROTO_UDP,
                            ip(src),
                            port_from_wire(key.backend_port),
                            ip(dst),
                            port_from_wire(key.nat_port),
                            frame.tcp_flags,
                        ),
                        mac_of(src),
                    )
                }
                None => {
                    let (addr, sport, mac) = p.sources[0];
                    (
                        l4_spec(false, ip(addr), sport, ip(p.lb), 20000, frame.tcp_flags),
                        mac,
                    )
                }
            },
            Kind::Other { protocol } => {
                let (addr, mac) = p.clients[0];
                let mut spec = FrameSpec::icmp(ip(addr), ip(p.vips[0]));
                spec.id = u16::from(*protocol);
                (spec, mac)
            }
            Kind::Icmp {
                source,
                from_backend,
                ..
            } => {
                let (addr, mac) = if *from_backend {
                    let (addr, _, mac) = p.sources[pick(*source, p.sources.len())];
                    (addr, mac)
                } else {
                    p.clients[pick(*source, p.clients.len())]
                };
                // The destination is filled in below, with the message.
                (FrameSpec::icmp(ip(addr), ip(p.lb)), mac)
            }
        };
        spec = spec.macs(src_mac, p.lb_mac).payload(frame.payload as usize);
        if frame.vlan || frame.mutation == Mutation::QinQ {
            spec = spec.vlan(205);
        }
        match frame.mutation {
            Mutation::Options(words) => spec = spec.options(words as usize * 4),
            Mutation::FirstFragment => spec = spec.fragment(0x2000),
            Mutation::LaterFragment(offset) => spec = spec.fragment(offset & 0x1fff),
            Mutation::Padding(bytes) => spec = spec.padding(bytes as usize),
            Mutation::ZeroUdpChecksum => spec = spec.zero_udp_checksum(),
            _ => {}
        }
        if let Mutation::NoDf = frame.mutation {
            let field = spec.fragment & !0x4000;
            spec = spec.fragment(field);
        }
        let mut bytes = match &frame.kind {
            Kind::Icmp { .. } => self.icmp_message(&mut spec, frame),
            _ => spec.build(),
        };
        let l3 = if spec.vlan.is_some() { 18 } else { 14 };
        let l4 = l3 + 20 + spec.options.min(40) / 4 * 4;
        if let Kind::Other { protocol } = frame.kind {
            match protocol % 4 {
                // Not IPv4: IPv6's ethertype, or ARP's.
                0 => bytes[l3 - 2..l3].copy_from_slice(&[0x86, 0xdd]),
                1 => bytes[l3 - 2..l3].copy_from_slice(&[0x08, 0x06]),
                // ICMP as built, or another protocol number.
                2 => {}
                _ => bytes[l3 + 9] = protocol,
            }
        }
        match frame.mutation {
            Mutation::Truncate(n) => bytes.truncate((n as usize).max(14)),
            Mutation::Ihl(v) => bytes[l3] = (bytes[l3] & 0xf0) | (v & 0x0f),
            Mutation::Version(v) => bytes[l3] = (v << 4) | (bytes[l3] & 0x0f),
            Mutation::TotalLength(delta) => {
                let tot = u16::from_be_bytes([bytes[l3 + 2], bytes[l3 + 3]]);
                let tot = tot.wrapping_add_signed(delta);
                bytes[l3 + 2..l3 + 4].copy_from_slice(&tot.to_be_bytes());
            }
            Mutation::BadIpChecksum => bytes[l3 + 10] ^= 0x5a,
            Mutation::BadL4Checksum => {
                let at = match spec.transport {
                    Transport::Tcp { .. } => l4 + 16,
                    _ => l4 + 6,
                };
                if let Some(b) = bytes.get_mut(at) {
                    *b ^= 0x33;
                }
            }
            Mutation::QinQ => bytes[12..14].copy_from_slice(&[0x88, 0xa8]),
            Mutation::Flip { offset, xor } => {
                let at = offset as usize % bytes.len();
                bytes[at] ^= xor;
            }
            Mutation::Ttl(ttl) => {
                let old = u16::from_be_bytes([bytes[l3 + 8], bytes[l3 + 9]]);
                let new = u16::from_be_bytes([ttl, bytes[l3 + 9]]);
                let check = u16::from_be_bytes([bytes[l3 + 10], bytes[l3 + 11]]);
                let check = ha_model::nat::csum_update(check, old, new);
                bytes[l3 + 8] = ttl;
                bytes[l3 + 10..l3 + 12].copy_from_slice(&check.to_be_bytes());
            }
            _ => {}
        }
        bytes
    }

    /// An ICMP message about a flow of the tables (or a made-up one when they are empty):
    /// the quoted packet is the one the balancer sent, VIP -> client or NAT port -> backend;
    /// `spec` gets its destination (the quoted packet's source, unless misaddressed).
    fn icmp_message(&self, spec: &mut FrameSpec, frame: &Frame) -> Vec<u8> {
        let Kind::Icmp {
            index,
            from_backend,
            icmp_type,
            code,
            quote,
            misaddressed,
            udp,
            ..
        } = frame.kind
        else {
            return spec.build();
        };
        let p = &self.pools;
        let state = &self.model.state;
        let at = |len: usize| index as usize % len.max(1);
        let wire_ip = |a: u32| Ipv4Addr::from(addr_from_wire(a)).octets();
        // The quoted packet: (src, sport, dst, dport, udp).
        let quoted = if from_backend {
            match state.reverse.keys().nth(at(state.reverse.len())) {
                Some(k) => (
                    wire_ip(k.lb_addr),
                    port_from_wire(k.nat_port),
                    wire_ip(k.backend_addr),
                    port_from_wire(k.backend_port),
                    k.protocol == PROTO_UDP,
                ),
                None => (p.lb.octets(), 20000, p.apis[0].0.octets(), 6443, udp),
            }
        } else {
            match state.conntrack.keys().nth(at(state.conntrack.len())) {
                Some(k) => (
                    wire_ip(k.dst_addr),
                    port_from_wire(k.dst_port),
                    wire_ip(k.src_addr),
                    port_from_wire(k.src_port),
                    k.protocol == PROTO_UDP,
                ),
                None => (
                    p.vips[0].octets(),
                    6443,
                    p.clients[0].0.octets(),
                    40000,
                    udp,
                ),
            }
        };
        let (src, sport, dst, dport, quoted_udp) = quoted;
        let payload = usize::from(quote).saturating_sub(if quoted_udp { 8 } else { 20 });
        let inner = l4_spec(quoted_udp, src, sport, dst, dport, 0x18)
            .payload(payload)
            .build();
        let keep = (20 + usize::from(quote)).min(inner.len() - 14);
        let quoted_bytes = &inner[14..14 + keep];
        spec.dst = if misaddressed { p.lb.octets() } else { src };
        if misaddressed && spec.dst == src {
            spec.dst = p.vips[1].octets();
        }
        spec.fragment &= !0x4000;
        let mtu = if icmp_type == 3 && code == 4 {
            1400u16
        } else {
            0
        };
        let m = mtu.to_be_bytes();
        spec.build_icmp(icmp_type, code, [0, 0, m[0], m[1]], quoted_bytes)
    }
}

fn l4_spec(udp: bool, src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, flags: u8) -> FrameSpec {
    if udp {
        FrameSpec::udp(src, sport, dst, dport)
    } else {
        FrameSpec::tcp(src, sport, dst, dport, flags)
    }
}

fn diff_maps<K: Ord + std::fmt::Debug, V: PartialEq + std::fmt::Debug>(
    out: &mut String,
    name: &str,
    kernel: &BTreeMap<K, V>,
    model: &BTreeMap<K, V>,
) {
    for (k, v) in kernel {
        match model.get(k) {
            None => {
                let _ = writeln!(out, "{name}: only in XDP: {k:?} -> {v:?}");
            }
            Some(m) if m != v => {
                let _ = writeln!(out, "{name}: {k:?}\n   XDP   {v:?}\n   model {m:?}");
            }
            _ => {}
        }
    }
    for (k, v) in model {
        if !kernel.contains_key(k) {
            let _ = writeln!(out, "{name}: only in the model: {k:?} -> {v:?}");
        }
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
