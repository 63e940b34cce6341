//! The agent's HTTP endpoint: `/livez` and `/readyz` for kubelet probes and
//! systemd watchdogs, `/metrics` for Prometheus.
//!
//! Every answer is built from the same [`StatusReport`] that `ha-user status`
//! shows, fetched from the agent's main loop through the admin command
//! channel: one owner of the state, and a main loop that stops answering
//! fails `/livez` by construction.

use std::{convert::Infallible, net::SocketAddr, sync::atomic::AtomicU64, time::Duration};

use http_body_util::Full;
use hyper::{
    Method, Request as HttpRequest, Response as HttpResponse, StatusCode, body::Bytes,
    header::CONTENT_TYPE, server::conn::http1, service::service_fn,
};
use hyper_util::rt::TokioIo;
use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::{
    net::TcpListener,
    sync::{mpsc, oneshot},
};
use tracing::debug;

use crate::{
    control::{Command, Request},
    status::{BackendState, ReloadOutcome, StatusReport},
    vrrp::machine::State,
};

/// How long a probe waits for the main loop before calling the agent stuck.
const MAIN_LOOP_DEADLINE: Duration = Duration::from_secs(2);

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Debug, thiserror::Error)]
#[error("telemetry.listen {address}: {source}")]
pub struct TelemetryError {
    address: SocketAddr,
    #[source]
    source: std::io::Error,
}

/// Binds before anything on the host changes, so a taken port fails the
/// start cleanly.
pub async fn bind(address: SocketAddr) -> Result<TcpListener, TelemetryError> {
    TcpListener::bind(address)
        .await
        .map_err(|source| TelemetryError { address, source })
}

/// Serves until the process ends.
pub fn serve(listener: TcpListener, commands: mpsc::Sender<Command>) {
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let commands = commands.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request| answer(request, commands.clone()));
                if let Err(e) = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await
                {
                    debug!(error = %e, "telemetry connection");
                }
            });
        }
    });
}

async fn status(commands: &mpsc::Sender<Command>) -> Option<StatusReport> {
    let (reply, answer) = oneshot::channel();
    let asked = async {
        commands.send((Request::Status, reply)).await.ok()?;
        answer.await.ok()?.status
    };
    tokio::time::timeout(MAIN_LOOP_DEADLINE, asked)
        .await
        .ok()
        .flatten()
}

fn text(code: StatusCode, content_type: &str, body: String) -> HttpResponse<Full<Bytes>> {
    let mut response = HttpResponse::new(Full::new(Bytes::from(body)));
    *response.status_mut() = code;
    if let Ok(value) = content_type.parse() {
        response.headers_mut().insert(CONTENT_TYPE, value);
    }
    response
}

async fn answer(
    request: HttpRequest<hyper::body::Incoming>,
    commands: mpsc::Sender<Command>,
) -> Result<HttpResponse<Full<Bytes>>, Infallible> {
    const PLAIN: &str = "text/plain; charset=utf-8";
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return Ok(text(
            StatusCode::METHOD_NOT_ALLOWED,
            PLAIN,
            "GET only\n".into(),
        ));
    }
    let path = request.uri().path();
    if !matches!(path, "/livez" | "/readyz" | "/metrics") {
        return Ok(text(
            StatusCode::NOT_FOUND,
            PLAIN,
            "try /livez, /readyz or /metrics\n".into(),
        ));
    }
    let Some(report) = status(&commands).await else {
        return Ok(text(
            StatusCode::SERVICE_UNAVAILABLE,
            PLAIN,
            format!(
                "the agent's main loop did not answer within {}s\n",
                MAIN_LOOP_DEADLINE.as_secs()
            ),
        ));
    };
    Ok(match path {
        "/livez" => text(StatusCode::OK, PLAIN, "ok\n".into()),
        "/readyz" if report.not_ready.is_empty() => text(StatusCode::OK, PLAIN, "ok\n".into()),
        "/readyz" => text(
            StatusCode::SERVICE_UNAVAILABLE,
            PLAIN,
            report.not_ready.iter().map(|r| format!("{r}\n")).collect(),
        ),
        _ => text(StatusCode::OK, OPENMETRICS, render_metrics(&report)),
    })
}

type Labels = Vec<(String, String)>;
type Counters = Family<Labels, Counter>;
type Gauges = Family<Labels, Gauge>;
type FloatGauges = Family<Labels, Gauge<f64, AtomicU64>>;

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Registers families under `ha_lb_` and fills them from one report.
struct Metrics {
    registry: Registry,
}

impl Metrics {
    fn counters(&mut self, name: &str, help: &str) -> Counters {
        let family = Counters::default();
        self.registry.register(name, help, family.clone());
        family
    }

    fn gauges(&mut self, name: &str, help: &str) -> Gauges {
        let family = Gauges::default();
        self.registry.register(name, help, family.clone());
        family
    }

    fn float_gauges(&mut self, name: &str, help: &str) -> FloatGauges {
        let family = FloatGauges::default();
        self.registry.register(name, help, family.clone());
        family
    }
}

const VRRP_STATES: [State; 3] = [State::Backup, State::Master, State::Fault];

/// The report as OpenMetrics text. A fresh registry per scrape: the
/// counters live in the data plane's maps, not in this process.
pub fn render_metrics(report: &StatusReport) -> String {
    let mut m = Metrics {
        registry: Registry::with_prefix("ha_lb"),
    };
    let ready = Gauge::<i64>::default();
    m.registry
        .register("ready", "1 when /readyz answers ok", ready.clone());
    let unanswered = Gauge::<i64>::default();
    m.registry.register(
        "data_path_unanswered",
        "1 while the data path forwards packets that no backend answers although the health checks reach them (a black hole: see the not-ready reason)",
        unanswered.clone(),
    );
    let xdp_mode = m.gauges("xdp_mode", "1 for the mode the XDP program is attached in");
    let egress_attached = Gauge::<i64>::default();
    m.registry.register(
        "egress_translation",
        "1 when the tc egress program (local backends' replies back to their VIP) is attached",
        egress_attached.clone(),
    );
    let program = m.gauges(
        "program_info",
        "1 for the XDP program the agent runs: its tag, and how the agent started (fresh, adopted, upgraded)",
    );
    let uptime = Gauge::<f64, AtomicU64>::default();
    m.registry.register(
        "uptime_seconds",
        "Seconds since the agent started",
        uptime.clone(),
    );
    let vip_packets = m.counters("vip_packets", "Packets to the VIP, both directions");
    let vip_bytes = m.counters("vip_bytes", "Bytes to the VIP, both directions");
    let vip_flows = m.counters("vip_flows", "New connections to the VIP");
    let fail_open = m.gauges(
        "vip_fail_open",
        "1 while every backend is down and traffic goes to all",
    );
    let backend_up = m.gauges("backend_up", "1 while the backend takes new connections");
    let backend_state = m.gauges("backend_state", "1 for the backend's current state");
    let backend_packets = m.counters("backend_packets", "Packets through the backend's flows");
    let backend_bytes = m.counters("backend_bytes", "Bytes through the backend's flows");
    let backend_flows = m.counters("backend_flows", "New connections sent to the backend");
    let checks = m.counters("backend_checks", "Health checks run against the backend");
    let check_latency = m.float_gauges(
        "backend_check_latency_seconds",
        "Duration of the backend's last health check",
    );
    let verdicts = m.counters("packets", "Packets seen by the XDP program, by verdict");
    let events = m.counters("events", "Data-plane slow-path events");
    let egress = m.counters(
        "egress_packets",
        "Packets seen by the tc egress program (local backends' replies translated to their VIP), by verdict",
    );
    let reloads = m.counters(
        "reloads",
        "Config reloads since the agent started, by outcome: applied, rejected (nothing changed), rolled_back (a step failed and was undone), incomplete (undoing failed too)",
    );

    ready.set(i64::from(report.not_ready.is_empty()));
    unanswered.set(i64::from(report.data_path_unanswered));
    egress_attached.set(i64::from(report.egress_translation));
    if let Some(mode) = report.xdp_mode {
        xdp_mode
            .get_or_create(&vec![("mode".to_string(), mode.to_string())])
            .set(1);
    }
    program
        .get_or_create(&vec![
            ("tag".to_string(), report.program.tag.clone()),
            ("start".to_string(), report.program.start.to_string()),
        ])
        .set(1);
    uptime.set(report.uptime_seconds);
    for outcome in ReloadOutcome::ALL {
        reloads
            .get_or_create(&labels(&[("outcome", outcome.label())]))
            .inc_by(report.reloads.get(&outcome).copied().unwrap_or(0));
    }
    for vip in &report.vips {
        let at = labels(&[("vip", &vip.name)]);
        vip_packets.get_or_create(&at).inc_by(vip.traffic.packets);
        vip_bytes.get_or_create(&at).inc_by(vip.traffic.bytes);
        vip_flows.get_or_create(&at).inc_by(vip.traffic.flows);
        fail_open.get_or_create(&at).set(i64::from(vip.fail_open));
        for backend in &vip.backends {
            let name = std::net::SocketAddr::new(backend.address, backend.port).to_string();
            let at = labels(&[("vip", &vip.name), ("backend", &name)]);
            backend_up
                .get_or_create(&at)
                .set(i64::from(backend.state == BackendState::Up));
            for state in BackendState::ALL {
                backend_state
                    .get_or_create(&labels(&[
                        ("vip", &vip.name),
                        ("backend", &name),
                        ("state", state.label()),
                    ]))
                    .set(i64::from(backend.state == state));
            }
            backend_packets
                .get_or_create(&at)
                .inc_by(backend.traffic.packets);
            backend_bytes
                .get_or_create(&at)
                .inc_by(backend.traffic.bytes);
            backend_flows
                .get_or_create(&at)
                .inc_by(backend.traffic.flows);
            checks.get_or_create(&at).inc_by(backend.checks);
            if let Some(last) = &backend.last_check {
                check_latency
                    .get_or_create(&at)
                    .set(last.latency_ms / 1000.0);
            }
        }
    }
    for (verdict, packets) in &report.verdicts {
        verdicts
            .get_or_create(&labels(&[("verdict", verdict)]))
            .inc_by(*packets);
    }
    for (verdict, packets) in &report.egress_verdicts {
        egress
            .get_or_create(&labels(&[("verdict", verdict)]))
            .inc_by(*packets);
    }
    for (event, count) in &report.events {
        events
            .get_or_create(&labels(&[("event", event)]))
            .inc_by(*count);
    }
    let socket_lb_attached = Gauge::<i64>::default();
    m.registry.register(
        "socket_lb_attached",
        "1 when the socket-level balancer of this host's own connections is attached (0: disabled, or its attach failed: see status)",
        socket_lb_attached.clone(),
    );
    socket_lb_attached.set(i64::from(report.socket_lb.attached));
    let socket_lb_events = m.counters(
        "socket_lb_events",
        "What the socket-level balancer did: connect_balanced, sendmsg_balanced, no_backend, vip_disabled, other_netns, peer_restored, source_restored, reverse_not_recorded",
    );
    for event in ha_common::SockLbEvent::ALL {
        socket_lb_events
            .get_or_create(&labels(&[("event", event.label())]))
            .inc_by(
                report
                    .socket_lb
                    .events
                    .get(event.label())
                    .copied()
                    .unwrap_or(0),
            );
    }
    render_passive_health(&mut m, report);
    let ct = &report.conntrack;
    let flows = Gauge::<i64>::default();
    m.registry.register(
        "conntrack_flows",
        "Flows in the connection table after the last sweep",
        flows.clone(),
    );
    flows.set(i64::try_from(ct.flows).unwrap_or(i64::MAX));
    let nat_sources = Gauge::<i64>::default();
    m.registry.register(
        "nat_sources",
        "NAT sources replies are translated for (1 + earlier ones whose flows still live)",
        nat_sources.clone(),
    );
    nat_sources.set(ct.nat_sources.len() as i64);
    let sweep = m.counters(
        "sweep",
        "What the agent's sweeps of the connection tables did",
    );
    for (what, count) in [
        ("expired", ct.expired),
        ("reverse_recovered", ct.reverse_recovered),
        ("orphans_freed", ct.orphans_freed),
    ] {
        sweep
            .get_or_create(&labels(&[("action", what)]))
            .inc_by(count);
    }
    let sessions_reset = Counter::<u64>::default();
    m.registry.register(
        "sessions_reset",
        "Flows of backends marked down as dead whose clients were told to reset (on_marked_down: shutdown-sessions)",
        sessions_reset.clone(),
    );
    sessions_reset.inc_by(ct.sessions_reset);
    if let Some(vrrp) = &report.vrrp {
        let state = m.gauges("vrrp_state", "1 for the VRRP instance's current state");
        let priority = m.gauges("vrrp_priority", "Priority advertised now, after tracking");
        let transitions = m.counters("vrrp_transitions", "VRRP state changes");
        let sent = m.counters("vrrp_adverts_sent", "VRRP adverts sent");
        let received = m.counters(
            "vrrp_adverts_received",
            "VRRP adverts received and accepted",
        );
        let dropped = m.counters("vrrp_adverts_dropped", "VRRP adverts dropped, by reason");
        let vrid = vrrp.vrid.to_string();
        let at = labels(&[("vrid", &vrid)]);
        for name in VRRP_STATES {
            state
                .get_or_create(&labels(&[("vrid", &vrid), ("state", name.label())]))
                .set(i64::from(vrrp.state == name));
        }
        priority.get_or_create(&at).set(i64::from(vrrp.priority));
        transitions.get_or_create(&at).inc_by(vrrp.transitions);
        sent.get_or_create(&at).inc_by(vrrp.adverts_sent);
        received.get_or_create(&at).inc_by(vrrp.adverts_received);
        for (reason, count) in [
            ("unknown_source", vrrp.dropped_unknown_source),
            ("bad_ttl", vrrp.dropped_bad_ttl),
            ("malformed", vrrp.dropped_malformed),
            ("other_vrid", vrrp.dropped_other_vrid),
        ] {
            dropped
                .get_or_create(&labels(&[("vrid", &vrid), ("reason", reason)]))
                .inc_by(count);
        }
    }
    let mut out = String::new();
    encode(&mut out, &m.registry).expect("writing to a String cannot fail");
    out
}

/// Passive health: whether it is on, the data path's suspicions by reason,
/// what the confirming checks decided, and which backends are suspect now.
fn render_passive_health(m: &mut Metrics, report: &StatusReport) {
    let passive = &report.passive_health;
    let enabled = Gauge::<i64>::default();
    m.registry.register(
        "passive_health_enabled",
        "1 when the data path reports backends that refuse clients' connections (its SUSPECT map and PASSIVE_EVENTS ring exist)",
        enabled.clone(),
    );
    enabled.set(i64::from(passive.enabled));
    let events = m.counters(
        "passive_events",
        "Backends the data path suspected, by reason: rst_to_syn (a RST answered a client's SYN), icmp_unreachable",
    );
    for reason in ["rst_to_syn", "icmp_unreachable"] {
        events
            .get_or_create(&labels(&[("reason", reason)]))
            .inc_by(0);
    }
    for (reason, count) in &passive.events {
        events
            .get_or_create(&labels(&[("reason", reason)]))
            .inc_by(*count);
    }
    let resolved = m.counters(
        "passive_suspects",
        "Suspects by what their confirming check decided: cleared (it passed), confirmed (it failed at the transport level: down at once)",
    );
    resolved
        .get_or_create(&labels(&[("outcome", "cleared")]))
        .inc_by(passive.suspects_cleared);
    resolved
        .get_or_create(&labels(&[("outcome", "confirmed")]))
        .inc_by(passive.suspects_confirmed);
    let suspect = m.gauges(
        "backend_suspect",
        "1 while the data path suspects the backend and takes no new flows to it (until its confirming check decides)",
    );
    for vip in &report.vips {
        for backend in &vip.backends {
            let name = std::net::SocketAddr::new(backend.address, backend.port).to_string();
            suspect
                .get_or_create(&labels(&[("vip", &vip.name), ("backend", &name)]))
                .set(i64::from(backend.suspect.is_some()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{BackendStatus, Traffic, VipStatus};

    fn report() -> StatusReport {
        StatusReport {
            interface: "eth0".into(),
            uptime_seconds: 12.5,
            vips: vec![VipStatus {
                name: "apiserver".into(),
                address: std::net::IpAddr::from([10, 0, 0, 100]),
                port: 6443,
                traffic: Traffic {
                    packets: 10,
                    bytes: 1000,
                    flows: 2,
                },
                backends: vec![
                    BackendStatus {
                        address: std::net::IpAddr::from([10, 0, 0, 11]),
                        port: 6443,
                        state: crate::status::BackendState::Up,
                        checks: 7,
                        traffic: Traffic {
                            packets: 6,
                            bytes: 600,
                            flows: 1,
                        },
                        ..Default::default()
                    },
                    BackendStatus {
                        address: std::net::IpAddr::from([10, 0, 0, 12]),
                        port: 6443,
                        state: crate::status::BackendState::Down,
                        ..Default::default()
                    },
                ],
                ..Default::default()
            }],
            verdicts: [("tx".to_string(), 9u64)].into(),
            not_ready: vec!["not checked yet: x".into()],
            conntrack: crate::status::ConntrackStatus {
                nat_sources: vec!["10.0.0.2:20000-32767".into(), "10.0.0.2:10000-32767".into()],
                flows: 30,
                sweeps: 4,
                expired: 2,
                reverse_recovered: 1,
                orphans_freed: 3,
                sessions_reset: 2,
            },
            data_path_unanswered: true,
            xdp_mode: Some(crate::dataplane::AttachedMode::Native),
            program: crate::status::ProgramStatus {
                start: crate::handover::StartKind::Upgraded,
                tag: "00112233aabbccdd".into(),
                replaced_tag: Some("0011223344556677".into()),
                on_stop: crate::handover::StopIntent::Keep,
            },
            ..Default::default()
        }
    }

    #[test]
    fn metrics_carry_the_report() {
        let text = render_metrics(&report());
        for line in [
            "ha_lb_ready 0",
            "ha_lb_data_path_unanswered 1",
            "ha_lb_program_info{tag=\"00112233aabbccdd\",start=\"upgraded\"} 1",
            "ha_lb_xdp_mode{mode=\"native\"} 1",
            "ha_lb_uptime_seconds 12.5",
            "ha_lb_vip_flows_total{vip=\"apiserver\"} 2",
            "ha_lb_backend_up{vip=\"apiserver\",backend=\"10.0.0.11:6443\"} 1",
            "ha_lb_backend_up{vip=\"apiserver\",backend=\"10.0.0.12:6443\"} 0",
            "ha_lb_backend_state{vip=\"apiserver\",backend=\"10.0.0.12:6443\",state=\"down\"} 1",
            "ha_lb_backend_state{vip=\"apiserver\",backend=\"10.0.0.12:6443\",state=\"up\"} 0",
            "ha_lb_backend_checks_total{vip=\"apiserver\",backend=\"10.0.0.11:6443\"} 7",
            "ha_lb_packets_total{verdict=\"tx\"} 9",
            "ha_lb_conntrack_flows 30",
            "ha_lb_nat_sources 2",
            "ha_lb_sweep_total{action=\"orphans_freed\"} 3",
            "ha_lb_sessions_reset_total 2",
            "ha_lb_sweep_total{action=\"reverse_recovered\"} 1",
            "# EOF",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in:\n{text}"
            );
        }
        assert!(!text.contains("vrrp"), "no VRRP family without VRRP");
    }

    #[test]
    fn passive_health_metrics() {
        let mut r = report();
        r.passive_health = crate::status::PassiveHealthStatus {
            enabled: true,
            events: [("rst_to_syn".to_string(), 4u64)].into(),
            suspects_cleared: 1,
            suspects_confirmed: 3,
        };
        r.vips[0].backends[0].suspect = Some(crate::status::SuspectStatus {
            reason: "rst_to_syn".into(),
            seconds_ago: 0.1,
        });
        r.events = [("syn_redispatched".to_string(), 5u64)].into();
        let text = render_metrics(&r);
        for line in [
            "ha_lb_passive_health_enabled 1",
            "ha_lb_passive_events_total{reason=\"rst_to_syn\"} 4",
            "ha_lb_passive_events_total{reason=\"icmp_unreachable\"} 0",
            "ha_lb_passive_suspects_total{outcome=\"cleared\"} 1",
            "ha_lb_passive_suspects_total{outcome=\"confirmed\"} 3",
            "ha_lb_backend_suspect{vip=\"apiserver\",backend=\"10.0.0.11:6443\"} 1",
            "ha_lb_backend_suspect{vip=\"apiserver\",backend=\"10.0.0.12:6443\"} 0",
            // The data path's events, whatever their names, come through the events family.
            "ha_lb_events_total{event=\"syn_redispatched\"} 5",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in:\n{text}"
            );
        }
        assert!(
            render_metrics(&report())
                .lines()
                .any(|l| l == "ha_lb_passive_health_enabled 0")
        );
    }

    #[test]
    fn vrrp_state_is_one_hot() {
        let mut r = report();
        r.vrrp = Some(crate::vrrp::announcer::VrrpStatus {
            state: crate::vrrp::machine::State::Master,
            vrid: 51,
            priority: 150,
            ..Default::default()
        });
        let text = render_metrics(&r);
        assert!(text.contains("ha_lb_vrrp_state{vrid=\"51\",state=\"master\"} 1"));
        assert!(text.contains("ha_lb_vrrp_state{vrid=\"51\",state=\"backup\"} 0"));
        assert!(text.contains("ha_lb_vrrp_priority{vrid=\"51\"} 150"));
    }
}
