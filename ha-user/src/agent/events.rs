//! The event loop: signals, probe reports, VRRP events, admin requests and timers, each handled by
//! one method of the reconciler.

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use anyhow::Result;
use ha_common::PassiveEvent;
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use crate::{
    control::{Command, ReloadReport, Request, Response},
    dataplane::monotonic_coarse_ns,
    handover::StopIntent,
    health::Health,
    netlink::LinkHealth,
    status::ReloadOutcome,
    vrrp::announcer,
};

use super::{
    Agent, DATA_PATH_CHECK_INTERVAL, LINK_CHECK_INTERVAL, SWEEP_INTERVAL,
    decide::{self, BackendKey},
    lifecycle::Signals,
    probes::{BackendHealth, HealthReport},
};

impl Agent {
    pub(super) async fn serve(
        &mut self,
        signals: &mut Signals,
        health_rx: &mut mpsc::Receiver<HealthReport>,
        passive_rx: &mut mpsc::Receiver<PassiveEvent>,
        admin_rx: &mut mpsc::Receiver<Command>,
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
                    // The outcome is logged and counted by the reload.
                    let _ = self.reload().await;
                }
                Some(report) = health_rx.recv() => self.on_health(report).await,
                Some(event) = passive_rx.recv() => self.on_passive(event),
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

    pub(super) async fn on_request(&mut self, request: Request) -> Response {
        match request {
            Request::Status => Response {
                ok: true,
                status: Some(self.status()),
                ..Response::default()
            },
            Request::Reload => match self.reload().await {
                Ok(message) => Response {
                    reload: Some(ReloadReport {
                        outcome: ReloadOutcome::Applied,
                        step: None,
                        left: Vec::new(),
                    }),
                    ..Response::ok(message)
                },
                Err(e) => Response {
                    reload: Some(e.report()),
                    ..Response::error(e.to_string())
                },
            },
            Request::Drain { vip, backend } => self.set_maintenance(&vip, &backend, true).await,
            Request::Undrain { vip, backend } => self.set_maintenance(&vip, &backend, false).await,
            Request::Stop { .. } => Response::error("handled by the event loop".to_string()),
        }
    }

    /// Finds `backend` (`ADDRESS` or `ADDRESS:PORT`) among the backends of VIP `vip`.
    pub(super) fn find_backend(&self, vip: &str, backend: &str) -> Result<BackendKey, String> {
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
        let address: IpAddr = address
            .parse()
            .map_err(|e| format!("address in {backend:?}: {e}"))?;
        config
            .backends
            .iter()
            .find(|b| b.address == address && port.is_none_or(|p| p == b.port()))
            .map(|b| BackendKey::of(config, b))
            .ok_or_else(|| format!("VIP {vip} has no backend {backend}"))
    }

    pub(super) async fn set_maintenance(&mut self, vip: &str, backend: &str, on: bool) -> Response {
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
        let applied = self.apply_data_plane_and_track().await;
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

    pub(super) async fn on_health(&mut self, report: HealthReport) {
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
                confirmed: None,
            });
        entry.checks += 1;
        let previous = entry.health;
        entry.last = Some((report.outcome.clone(), now));
        if report.confirming {
            self.resolve_suspect(&report);
        }
        let Some(entry) = self.health.get_mut(&report.key) else {
            return;
        };
        if report.health == previous {
            return;
        }
        let in_previous = now.duration_since(entry.since);
        entry.health = report.health;
        entry.since = now;
        if report.health == Health::Up {
            self.on_backend_up(&report.key);
        }
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
        if let Err(e) = self.apply_data_plane_and_track().await {
            error!("applying a health change to the data plane: {e:#}");
        }
        if report.health == Health::Down {
            // Dead, not merely not ready: its flows are broken; tell their clients now.
            self.reset_sessions_of(&report.key);
        }
    }

    /// The announcer says whether to hold the VIPs.
    pub(super) async fn on_vrrp(&mut self, event: announcer::Event) {
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
    pub(super) async fn track(&mut self) {
        let no_healthy_backend = !self.failing_open.is_empty();
        let local_backend_down = decide::local_backend_down(
            &self.health_view(&Default::default()),
            &self.maintenance,
            &self.local_backends,
        );
        let Some(vrrp) = self.vrrp.as_mut() else {
            return;
        };
        let LinkHealth {
            up: link_up,
            xdp_attached,
        } = vrrp.link;
        let tracking = decide::tracked(
            vrrp.config.priority,
            &vrrp.config.track,
            decide::TrackedState {
                link_up,
                xdp_attached,
                no_healthy_backend,
                local_backend_down,
            },
        );
        if tracking == vrrp.tracked {
            return;
        }
        vrrp.tracked = tracking;
        let decide::Tracking { priority, fault } = tracking;
        info!(
            priority,
            fault,
            link_up,
            xdp_attached,
            no_healthy_backend,
            local_backend_down,
            "VRRP tracking changed"
        );
        let _ = vrrp
            .commands
            .send(announcer::Command::Track { priority, fault })
            .await;
    }

    pub(super) async fn check_link(&mut self) {
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
}
