//! `cargo xtask bench`: the parts measured so far.
//!
//! Per-packet cost of the XDP program through BPF_PROG_TEST_RUN, by the
//! honest method of ../shared/notes/benchmarking.md: the NAT paths rewrite
//! the packet, so each run is one call with `repeat = 1` and a fresh input
//! buffer; the kernel-measured duration of each call is collected; a path's
//! figure is the median, over several runs, of the trimmed mean of its
//! calls; the trivial `ha_xdp_pass` program is measured the same way in the
//! same run and is the floor. Every call's verdict is checked, so a run that
//! fell onto another path fails instead of reporting a wrong number. A SYN
//! run uses a new source port on every call, so every call inserts a flow.

pub mod chart;
pub mod e2e;
pub mod failover;

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use aya::programs::{TestRun, TestRunOptions, Xdp};
use ha_common::PROTO_TCP;
use ha_user::{
    config::DataPlaneConfig,
    dataplane::{DataPlane, DesiredBackend, DesiredVip, LoadOptions},
    maglev::{MaglevBackend, build_table},
};

use ha_lab::{
    HOST_IFACE, Lab,
    packet::{ACK, Frame, L4, SYN, SYN_ACK, TTL},
};

const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("lab: {0}")]
    Lab(#[from] ha_lab::LabError),
    #[error("data plane: {0}")]
    DataPlane(#[from] ha_user::dataplane::DataPlaneError),
    #[error("BPF_PROG_TEST_RUN: {0}")]
    TestRun(#[from] aya::programs::ProgramError),
    #[error(
        "{path}: verdict {got}, expected {expected}: the run did not take the path it measures"
    )]
    WrongPath {
        path: &'static str,
        got: u32,
        expected: u32,
    },
}

type Result<T> = std::result::Result<T, BenchError>;

/// How much to measure.
#[derive(Clone, Copy, Debug)]
pub struct Effort {
    /// Calls per run.
    pub calls: u32,
    /// Runs per path (the median is reported).
    pub runs: u32,
    /// Flows pre-loaded for the large-table measurement.
    pub big_table: u32,
    /// The end-to-end comparison.
    pub e2e: e2e::E2eEffort,
    /// Trials per failover scenario (the median is reported).
    pub failover_trials: u32,
}

impl Effort {
    pub const FULL: Effort = Effort {
        calls: 200_000,
        runs: 5,
        big_table: 1_000_000,
        e2e: e2e::E2eEffort {
            seconds: 10,
            latency_rate: 200,
        },
        failover_trials: 5,
    };
    pub const QUICK: Effort = Effort {
        calls: 2_000,
        runs: 3,
        big_table: 20_000,
        e2e: e2e::E2eEffort {
            seconds: 1,
            latency_rate: 100,
        },
        failover_trials: 1,
    };
}

/// One measured path.
#[derive(Clone, Debug)]
pub struct PathCost {
    pub name: String,
    /// The median over runs of each run's trimmed mean.
    pub ns_per_packet: f64,
    /// The lowest and highest run.
    pub min_ns: f64,
    pub max_ns: f64,
    pub above_floor: f64,
    pub calls: u64,
}

/// Everything `cargo xtask bench` measured.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub per_packet: Vec<PathCost>,
    /// (backends, table size, build time).
    pub table_builds: Vec<(usize, u32, Duration)>,
    /// Per-packet cost by number of backends and with a large connection table.
    pub scale: Vec<PathCost>,
    pub e2e: Vec<e2e::E2eResult>,
    pub failover: Vec<failover::FailoverResult>,
}

/// A TCP frame from `src:sport` to `dst:dport` with sequence number 1
/// (`ha_lab::packet`, the fixtures' builder).
fn tcp_frame(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    l4: L4,
) -> Vec<u8> {
    Frame {
        src_mac,
        dst_mac,
        vlan: None,
        src,
        dst,
        sport,
        dport,
        l4,
        payload: b"",
    }
    .build_with(TTL, 1)
}

/// The lab and the loaded data plane the measurements run in.
struct Bench {
    lab: Lab,
    dataplane: DataPlane,
    ctx: [u8; 24],
    vip: Ipv4Addr,
}

impl Bench {
    fn new(backends: usize, table_size: u32, max_flows: u32) -> Result<Bench> {
        let lab = Lab::new(&["client", "lb", "api1"])?;
        let lb = lab.host("lb").addr;
        let api1 = lab.host("api1");
        // Backends beyond the LAN are routed through api1, so every one resolves.
        lab.exec(
            "lb",
            &[
                "sh",
                "-c",
                "echo 1 > /proc/sys/net/ipv4/conf/eth0/forwarding",
            ],
        )?;
        lab.pin_neighbours("lb", &["client", "api1"])?;
        lab.exec(
            "lb",
            &[
                "ip",
                "route",
                "add",
                "10.250.0.0/16",
                "via",
                &api1.addr.to_string(),
            ],
        )?;
        let mut dataplane = DataPlane::load(&LoadOptions {
            host_ports: None,
            accept_flow_loss: false,
            maglev_table_size: table_size,
            max_vips: 1,
            max_flows,
            pin_dir: None,
        })?;
        dataplane.load_pass_program()?;
        let mut settings = DataPlaneConfig::default()
            .settings(lb.into())
            .expect("an IPv4 NAT source has settings");
        settings.nat[0].port_min = 1024;
        settings.nat[0].port_max = 65535;
        let backends: Vec<DesiredBackend> = (0..backends)
            .map(|i| DesiredBackend {
                address: Ipv4Addr::new(10, 250, (i / 250) as u8, (i % 250 + 1) as u8).into(),
                port: 6443,
                weight: 1,
                local: false,
                down: false,
            })
            .collect();
        let vip = lab.vip(0);
        dataplane.apply(
            &settings,
            &[DesiredVip {
                name: "apiserver".into(),
                address: vip.into(),
                port: 6443,
                protocol: PROTO_TCP,
                enabled: true,
                backends,
            }],
        )?;
        let ifindex = lab.in_host("lb", || {
            nix::net::if_::if_nametoindex(HOST_IFACE).expect("eth0")
        })?;
        let mut ctx = [0u8; 24];
        ctx[4..8].copy_from_slice(&54u32.to_ne_bytes());
        ctx[12..16].copy_from_slice(&ifindex.to_ne_bytes());
        Ok(Bench {
            lab,
            dataplane,
            ctx,
            vip,
        })
    }

    fn client_frame(&self, sport: u16, l4: L4) -> Vec<u8> {
        let client = self.lab.host("client");
        tcp_frame(
            client.mac,
            self.lab.host("lb").mac,
            client.addr,
            self.vip,
            sport,
            6443,
            l4,
        )
    }

    /// One call with `repeat = 1`: (verdict, kernel-measured duration).
    fn call(
        program: &Xdp,
        ctx: &[u8; 24],
        frame: &[u8],
        out: &mut [u8],
    ) -> Result<(u32, Duration)> {
        let mut options = TestRunOptions::new();
        options.data_in = Some(frame);
        options.data_out = Some(out);
        options.ctx_in = Some(ctx);
        let result = program.test_run(options)?;
        Ok((result.return_value, result.duration))
    }

    /// Runs `calls` calls of frames from `next_frame` (given the call's
    /// index), expecting `verdict`; `between` runs every `batch` calls,
    /// outside the measurement. Returns the trimmed mean in ns.
    #[allow(clippy::too_many_arguments)]
    fn measure(
        &mut self,
        path: &'static str,
        floor_program: bool,
        calls: u32,
        verdict: u32,
        mut next_frame: impl FnMut(u32) -> Vec<u8>,
        batch: u32,
        mut between: impl FnMut(&mut DataPlane),
    ) -> Result<f64> {
        let ctx = self.ctx;
        let mut durations = Vec::with_capacity(calls as usize);
        let mut out = vec![0u8; 256];
        let mut done = 0;
        while done < calls {
            let n = batch.min(calls - done);
            let frames: Vec<Vec<u8>> = (done..done + n).map(&mut next_frame).collect();
            let dataplane = &self.dataplane;
            let measured = self.lab.in_host("lb", || -> Result<Vec<Duration>> {
                pin_to_measuring_cpu();
                let program: &Xdp = if floor_program {
                    dataplane.pass_program()
                } else {
                    dataplane.program()
                };
                frames
                    .iter()
                    .map(|frame| {
                        let (got, duration) = Bench::call(program, &ctx, frame, &mut out)?;
                        if got != verdict {
                            return Err(BenchError::WrongPath {
                                path,
                                got,
                                expected: verdict,
                            });
                        }
                        Ok(duration)
                    })
                    .collect()
            })??;
            durations.extend(measured);
            done += n;
            between(&mut self.dataplane);
        }
        Ok(trimmed_mean_ns(&mut durations))
    }
}

impl Bench {
    /// The common case: the same frame on every call, no work between batches.
    fn measure_steady(
        &mut self,
        path: &'static str,
        floor_program: bool,
        calls: u32,
        verdict: u32,
        frame: &[u8],
    ) -> Result<f64> {
        self.measure(
            path,
            floor_program,
            calls,
            verdict,
            |_| frame.to_vec(),
            calls,
            |_| {},
        )
    }
}

/// The mean of the middle 98% (interrupts and page faults hit a few calls
/// hard; the kernel clock's steps average out over many calls).
fn trimmed_mean_ns(durations: &mut [Duration]) -> f64 {
    durations.sort();
    let cut = durations.len() / 100;
    let kept = &durations[cut..durations.len() - cut];
    kept.iter().map(|d| d.as_nanos() as f64).sum::<f64>() / kept.len().max(1) as f64
}

/// Pins the calling thread to the last CPU: unpinned, figures scatter by up
/// to 50% between runs on these VMs (../shared/notes/benchmarking.md).
fn pin_to_measuring_cpu() {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut set = nix::sched::CpuSet::new();
    if set.set(cpus - 1).is_ok() {
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// A source port for call `i` that gives every call a new flow.
fn syn_port(i: u32) -> u16 {
    1024 + (i % 64000) as u16
}

/// Per-packet cost of each path, and of the floor.
fn per_packet(bench: &mut Bench, effort: Effort, label: &str) -> Result<Vec<PathCost>> {
    let calls = effort.calls;
    let mut floor_runs = Vec::new();
    let mut syn_runs = Vec::new();
    let mut established_runs = Vec::new();
    let mut reply_runs = Vec::new();
    let mut pass_runs = Vec::new();
    let lb = bench.lab.host("lb").clone();
    let client = bench.lab.host("client").clone();
    let api1_mac = bench.lab.host("api1").mac;
    for run in 0..effort.runs {
        let pass_frame = tcp_frame(client.mac, lb.mac, client.addr, lb.addr, 40000, 22, SYN);
        floor_runs.push(bench.measure_steady(
            "trivial XDP_PASS",
            true,
            calls,
            XDP_PASS,
            &pass_frame,
        )?);
        pass_runs.push(bench.measure_steady(
            "non-VIP packet",
            false,
            calls,
            XDP_PASS,
            &pass_frame,
        )?);
        // New flows: a new source address and port on every call; the tables
        // are emptied every 10,000 flows so NAT ports stay plentiful.
        let base = run * calls;
        let client_mac = client.mac;
        let lb_mac = lb.mac;
        let vip = bench.vip;
        syn_runs.push(bench.measure(
            "SYN of a new flow",
            false,
            calls,
            XDP_TX,
            |i| {
                let n = base + i;
                let src =
                    Ipv4Addr::new(10, 240, (n / 64000 % 250) as u8, 1 + (n / 16_000_000) as u8);
                tcp_frame(client_mac, lb_mac, src, vip, syn_port(n), 6443, SYN)
            },
            10_000,
            |dataplane| {
                dataplane
                    .clear_flows()
                    .expect("clearing the connection table");
            },
        )?);
        // One established flow, hit again and again, and its backend's reply.
        let established = bench.client_frame(45000, ACK);
        let out = bench.lab.in_host("lb", || {
            let mut out = vec![0u8; 256];
            let program = bench.dataplane.program();
            Bench::call(
                program,
                &bench.ctx,
                &bench.client_frame(45000, SYN),
                &mut out,
            )
            .map(|_| out)
        })??;
        let (backend, nat_port) = (
            Ipv4Addr::new(out[30], out[31], out[32], out[33]),
            u16::from_be_bytes([out[34], out[35]]),
        );
        established_runs.push(bench.measure_steady(
            "established flow",
            false,
            calls,
            XDP_TX,
            &established,
        )?);
        let reply = tcp_frame(api1_mac, lb.mac, backend, lb.addr, 6443, nat_port, SYN_ACK);
        reply_runs.push(bench.measure_steady("backend reply", false, calls, XDP_TX, &reply)?);
        bench.dataplane.clear_flows()?;
    }
    let total = (calls as u64) * effort.runs as u64;
    let floor_spread = spread(&floor_runs);
    let floor = median(floor_runs);
    let cost = |name: &str, runs: Vec<f64>| {
        let (min_ns, max_ns) = spread(&runs);
        let ns = median(runs);
        PathCost {
            name: format!("{name}{label}"),
            ns_per_packet: ns,
            min_ns,
            max_ns,
            above_floor: ns - floor,
            calls: total,
        }
    };
    Ok(vec![
        PathCost {
            name: format!("trivial XDP_PASS program (floor){label}"),
            ns_per_packet: floor,
            min_ns: floor_spread.0,
            max_ns: floor_spread.1,
            above_floor: 0.0,
            calls: total,
        },
        cost("SYN to a VIP: Maglev + table inserts + NAT", syn_runs),
        cost("established flow: table hit + NAT", established_runs),
        cost("backend reply: reverse NAT", reply_runs),
        cost("packet to a non-VIP address, passed", pass_runs),
    ])
}

/// Runs every part measured so far.
/// Part 1 alone: the per-packet cost of each path, 3 backends, M = 65537.
pub fn per_packet_only(effort: Effort) -> Result<Vec<PathCost>> {
    let mut bench = Bench::new(3, 65537, 262_144)?;
    per_packet(&mut bench, effort, "")
}

pub fn run(effort: Effort, mut progress: impl FnMut(&str)) -> Result<Report> {
    let mut report = Report::default();
    progress("per-packet cost, 3 backends, M = 65537");
    let mut bench = Bench::new(3, 65537, 262_144)?;
    report.per_packet = per_packet(&mut bench, effort, "")?;
    drop(bench);

    report.e2e = e2e::run(effort.e2e, &mut progress)?;
    report.failover = failover::run(effort.failover_trials, &mut progress)?;

    progress("Maglev table build times");
    for (backends, size) in [(3usize, 65537u32), (64, 65537), (1024, 131071)] {
        let members: Vec<MaglevBackend> = (0..backends)
            .map(|i| MaglevBackend {
                address: Ipv4Addr::new(10, 250, (i / 250) as u8, (i % 250 + 1) as u8).into(),
                port: 6443,
                weight: 1,
                id: i as u32,
            })
            .collect();
        let mut times = Vec::new();
        for _ in 0..effort.runs {
            let started = Instant::now();
            std::hint::black_box(build_table(&members, size));
            times.push(started.elapsed());
        }
        times.sort();
        report
            .table_builds
            .push((backends, size, times[times.len() / 2]));
    }

    for (backends, size) in [(64usize, 65537u32), (1024, 131071)] {
        progress(&format!("per-packet cost, {backends} backends"));
        let mut bench = Bench::new(backends, size, 262_144)?;
        let costs = per_packet(&mut bench, effort, &format!(" ({backends} backends)"))?;
        report.scale.extend(
            costs
                .into_iter()
                .filter(|c| c.name.starts_with("SYN") || c.name.starts_with("established")),
        );
    }

    progress(&format!(
        "per-packet cost with {} flows in the connection table",
        effort.big_table
    ));
    let mut bench = Bench::new(3, 65537, effort.big_table + 1024)?;
    bench.dataplane.fill_flows(effort.big_table)?;
    let label = format!(" ({} flows in the table)", effort.big_table);
    let costs = per_packet(
        &mut bench,
        Effort {
            runs: effort.runs.min(3),
            ..effort
        },
        &label,
    )?;
    report.scale.extend(
        costs
            .into_iter()
            .filter(|c| c.name.starts_with("established")),
    );
    Ok(report)
}

/// The Markdown section for the parts measured.
pub fn render(report: &Report, effort: Effort, machine: &str) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Benchmarks\n\nGenerated by `cargo xtask bench` on {machine}.\n"
    );
    let _ = writeln!(
        out,
        "## 1. Per-packet cost of the XDP program (BPF_PROG_TEST_RUN)\n\n\
         Method (../shared/notes/benchmarking.md, method 1): the NAT paths rewrite the packet, so every run is a \
         call with `repeat = 1` on a fresh buffer, in a lab namespace whose FIB and neighbours are real; the \
         kernel-measured duration of each call is kept, on a thread pinned to one CPU; a path's figure is the \
         median over {} runs of the trimmed mean (middle 98%) of {} calls, with the lowest and highest run \
         beside it; the floor is the trivial `ha_xdp_pass` program measured the same way in the same run. \
         Every call's verdict is checked (XDP_TX for the NAT paths). The SYN path uses a new source address \
         and port on every call, so every call inserts a flow and claims a NAT port; the established path \
         repeats one flow's ACK. How these compare with the data path before its state machine: design.md, \
         \"What the state machine costs\".\n",
        effort.runs, effort.calls
    );
    cost_table(&mut out, &report.per_packet);
    let _ = writeln!(
        out,
        "\nKatran's figures on this machine kind (benchmarking.md, a restoring wrapper, not this method): floor 29, SYN 344 (304 above), established 173 (133 above), non-VIP 80 (51 above).\n"
    );
    if !report.e2e.is_empty() {
        render_e2e(&mut out, report, effort);
    }
    render_failover(&mut out, report, effort);
    let _ = writeln!(
        out,
        "## 4. Scale\n\n| Maglev table build | size M | time |\n|---|---|---|"
    );
    for (backends, size, time) in &report.table_builds {
        let _ = writeln!(
            out,
            "| {backends} backends | {size} | {:.1} ms |",
            time.as_secs_f64() * 1000.0
        );
    }
    let _ = writeln!(out);
    cost_table(&mut out, &report.scale);
    out
}

/// A table of per-packet costs.
/// The lowest and highest of some runs.
fn spread(runs: &[f64]) -> (f64, f64) {
    runs.iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), r| {
            (lo.min(*r), hi.max(*r))
        })
}

/// The Markdown table of per-packet costs: median, spread over runs, and above the floor.
pub fn cost_table(out: &mut String, costs: &[PathCost]) {
    use std::fmt::Write;
    let _ = writeln!(
        out,
        "| path | ns/packet (median) | min-max over runs | above the floor |\n|---|---|---|---|"
    );
    for cost in costs {
        let _ = writeln!(
            out,
            "| {} | {:.0} | {:.0}-{:.0} | {:.0} |",
            cost.name, cost.ns_per_packet, cost.min_ns, cost.max_ns, cost.above_floor
        );
    }
}

fn render_e2e(out: &mut String, report: &Report, effort: Effort) {
    use e2e::Balancer;
    use std::fmt::Write;
    let _ = writeln!(
        out,
        "## 2. End to end: client -> VIP -> three nginx backends\n\n\
         One run on one machine: each balancer in turn on an LB host with fresh namespaces (a new lab \
         each, so TIME_WAIT sockets one balancer's burst leaves on the backends do not slow the next). wrk (2 threads, 64 \
         connections, {} s) with `Connection: close` (a new connection per request) and with keep-alive; \
         latency percentiles of new connections (connect to last byte) at {} per second from a paced \
         client, measured first, before the wrk bursts; CPU is the whole machine's (client, LB and \
         backends share its cores), in seconds per 100,000 requests. The last row has no balancer: \
         the client talks to one of the three backends itself, the direct path's figures on this \
         machine (one backend instead of three, so not a like-for-like rival).\n",
        effort.e2e.seconds, effort.e2e.latency_rate
    );
    let _ = writeln!(
        out,
        "| balancer | new connections/s | keep-alive requests/s | p50 ms | p99 ms | CPU s/100k (new conn.) | CPU s/100k (keep-alive) |\n|---|---|---|---|---|---|---|"
    );
    for r in &report.e2e {
        let _ = writeln!(
            out,
            "| {} | {:.0} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} |",
            r.balancer.label(),
            r.connections_per_second,
            r.keepalive_requests_per_second,
            r.p50_ms,
            r.p99_ms,
            r.cpu_seconds_per_100k_close,
            r.cpu_seconds_per_100k_keepalive
        );
    }
    let Some(ours) = report.e2e.iter().find(|r| r.balancer == Balancer::HaLb) else {
        return;
    };
    let _ = writeln!(
        out,
        "\n| ha-lb compared with | new connections/s | keep-alive requests/s | p99 latency | CPU per request (new conn.) |\n|---|---|---|---|---|"
    );
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
    for other in report.e2e.iter().filter(|r| r.balancer != Balancer::HaLb) {
        let _ = writeln!(
            out,
            "| {} | {:.2}x | {:.2}x | {:.2}x | {:.2}x |",
            other.balancer.label(),
            ratio(ours.connections_per_second, other.connections_per_second),
            ratio(
                ours.keepalive_requests_per_second,
                other.keepalive_requests_per_second
            ),
            ratio(ours.p99_ms, other.p99_ms),
            ratio(
                ours.cpu_seconds_per_100k_close,
                other.cpu_seconds_per_100k_close
            )
        );
    }
    let _ = writeln!(out);
}

fn render_failover(out: &mut String, report: &Report, effort: Effort) {
    use std::fmt::Write;
    let _ = writeln!(
        out,
        "## 3. Failover\n\n\
         Each trial in a fresh lab: the client connects through the VIP every 10 ms; the figure is the \
         time from the event until every new connection succeeds again (the start of the first attempt \
         after the last failed one; attempts time out after 200 ms), \
         median of {} trials. A backend is killed with SIGKILL; an LB master dies by having its link \
         cut (the same for every stack). The keepalived pairs run haproxy on both LB hosts, as in the \
         classic guides. Beside it a patient client opens a connection every 10 ms (each in its own \
         thread) and waits up to 3 s, as a real client's connect timeout would: its failures are the \
         client connections the event cost (a SYN that ha-lb redispatches is answered on the client's \
         first retransmission and does not fail). The first client's failures are bounded by its own \
         timeouts (one attempt of up to 0.7 s at a time); the patient client's count every connection: \
         haproxy at its defaults (`retries 3`, no `option redispatch`) tries a dead server again three \
         times, a second apart, and then closes the client's connection, so each connection it gave \
         the dead server fails (the kubeadm guide's `option redispatch` with `retries 1` would move it \
         after 1 s).\n",
        effort.failover_trials
    );
    let _ = writeln!(
        out,
        "| scenario | median | trials | failed attempts (median) | failed connections, 3 s client (median) |\n|---|---|---|---|---|"
    );
    for result in &report.failover {
        let trials: Vec<String> = result
            .trials
            .iter()
            .map(|t| format!("{:.2}", t.as_secs_f64()))
            .collect();
        let _ = writeln!(
            out,
            "| {} | {:.2} s | {} | {} | {} |",
            result.scenario.label(),
            result.median().as_secs_f64(),
            trials.join(", "),
            result.median_failed(),
            result.median_failed_connections()
        );
    }
    let find = |scenario| {
        report
            .failover
            .iter()
            .find(|r| r.scenario == scenario)
            .map(|r| r.median().as_secs_f64())
    };
    use failover::Scenario::*;
    if let (Some(ours), Some(theirs)) = (find(MasterDiesHaLb), find(MasterDiesKeepalivedDefaults))
        && ours > 0.0
    {
        let _ = writeln!(
            out,
            "\nLB master failover: ha-lb at its defaults is {:.1}x faster than keepalived at its defaults.",
            theirs / ours
        );
    }
    if let (Some(ours), Some(theirs)) = (find(BackendKilledHaLb), find(BackendKilledHaproxy))
        && ours > 0.0
    {
        let _ = writeln!(
            out,
            "Backend failover: ha-lb at its defaults is {:.1}x faster than haproxy at its defaults.",
            theirs / ours
        );
    }
    let failed = |scenario| {
        report
            .failover
            .iter()
            .find(|r| r.scenario == scenario)
            .map(|r| r.median_failed_connections())
    };
    if let (Some(ours), Some(theirs)) = (failed(BackendKilledHaLb), failed(BackendKilledHaproxy)) {
        let _ = writeln!(
            out,
            "Backend killed, failed client connections (3 s client, median): ha-lb {ours}, haproxy {theirs}."
        );
    }
    let _ = writeln!(out);
}
