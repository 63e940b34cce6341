//! The announcer: the task that owns the VRRP state machine and its socket.
//! It sends and receives adverts, runs the timers, and tells the reconciler
//! when this host becomes master or stops being it; the reconciler takes or
//! releases the VIPs (addresses, data plane, gratuitous ARP).

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{info, warn};

use super::{
    echo::{self, EchoSocket},
    machine::{Action, Machine, MachineConfig, State},
    packet::{Advert, ChecksumMode, MULTICAST_GROUP},
    socket::VrrpSocket,
};
use crate::config::VrrpVersion;

pub struct AnnouncerSetup {
    pub iface: String,
    pub local_address: Ipv4Addr,
    pub vrid: u8,
    pub version: VrrpVersion,
    pub checksum: ChecksumMode,
    /// Empty: multicast to 224.0.0.18.
    pub unicast_peers: Vec<Ipv4Addr>,
    /// The addresses listed in our adverts (the VIPs).
    pub vips: Vec<Ipv4Addr>,
    pub machine: MachineConfig,
    /// Start in fault (tracking says so).
    pub fault: bool,
    /// Start as master at once (`handover::vrrp_start`).
    pub resume_master: bool,
}

#[derive(Debug)]
pub enum Command {
    /// Tracking: the effective priority and whether we are in fault.
    Track { priority: u8, fault: bool },
    /// SIGTERM with the release intent: send priority 0 if master, then answer.
    Shutdown(oneshot::Sender<()>),
    /// Stop with the keep intent, then answer. A master announces the hold
    /// (centiseconds; `vrrp.restart_hold`) as its interval in a last advert,
    /// so backups wait three of it; without one it sends nothing and backups
    /// wait their normal Master_Down_Interval.
    Stop {
        hold_cs: Option<u16>,
        done: oneshot::Sender<()>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// Take the VIPs (true) or release them (false).
    Own(bool),
    /// Still master after a split brain: announce the VIPs again.
    Reannounce,
}

/// How adverts travel: to the VRRP multicast group, or to configured peers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AdvertMode {
    #[default]
    Multicast,
    Unicast,
}

impl std::fmt::Display for AdvertMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(match self {
            AdvertMode::Multicast => "multicast",
            AdvertMode::Unicast => "unicast",
        })
    }
}

/// What `status` shows about VRRP; written by the announcer only, read by
/// the agent through a `watch` channel (the latest value, no lock).
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize)]
pub struct VrrpStatus {
    pub state: State,
    pub vrid: u8,
    pub version: u8,
    pub priority: u8,
    pub configured_priority: u8,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub master: Option<String>,
    pub advert_interval_ms: u64,
    pub mode: AdvertMode,
    pub transitions: u64,
    pub seconds_in_state: f64,
    pub adverts_sent: u64,
    pub adverts_received: u64,
    /// Unicast mode: adverts from an address that is not a configured peer.
    pub dropped_unknown_source: u64,
    pub dropped_bad_ttl: u64,
    pub dropped_malformed: u64,
    pub dropped_other_vrid: u64,
    /// Received with keepalived's pseudo-header checksum / with RFC 9568's.
    pub checksum_pseudo_header: u64,
    pub checksum_rfc9568: u64,
    pub send_errors: u64,
}

struct Announcer {
    setup: AnnouncerSetup,
    socket: VrrpSocket,
    machine: Machine,
    events: mpsc::Sender<Event>,
    status: watch::Sender<VrrpStatus>,
    entered_state: Instant,
    /// The master's host, watched while it announces a restart hold.
    watch: Option<HostWatch>,
    /// A host whose watch could not start (the socket failed): not retried.
    watch_failed: Option<Ipv4Addr>,
}

/// ICMP echo to a master's host during its restart hold.
struct HostWatch {
    target: Ipv4Addr,
    socket: EchoSocket,
    id: u16,
    seq: u16,
    /// The last reply. Until a first one, silence proves nothing (the
    /// host may not answer ICMP echo at all): the hold is waited out.
    heard: Option<Instant>,
    /// Said that the host does not answer (once per watch).
    told_unanswered: bool,
    started: Instant,
    next_probe: Instant,
}

/// Opens the socket and starts the announcer on a thread of its own, with
/// its own single-threaded runtime: adverts and timers never wait for the
/// agent's work (a Maglev table build, a sweep, a reload), which a shared
/// runtime would let delay an advert or a takeover by as long as it runs.
/// Returns where to send commands, once the socket is open.
///
/// # Errors
/// Opening the socket (or starting the thread or its runtime).
pub fn spawn(
    setup: AnnouncerSetup,
    events: mpsc::Sender<Event>,
    status: watch::Sender<VrrpStatus>,
) -> std::io::Result<mpsc::Sender<Command>> {
    let (commands, receiver) = mpsc::channel(16);
    let (opened, opening) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("vrrp".to_string())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(e) => {
                    let _ = opened.send(Err(e));
                    return;
                }
            };
            runtime.block_on(async move {
                match Announcer::open(setup, events, status) {
                    Ok(announcer) => {
                        let _ = opened.send(Ok(()));
                        announcer.run(receiver).await;
                    }
                    Err(e) => {
                        let _ = opened.send(Err(e));
                    }
                }
            });
        })?;
    opening
        .recv()
        .map_err(|_| std::io::Error::other("the VRRP thread ended before opening its socket"))??;
    Ok(commands)
}

impl Announcer {
    fn open(
        setup: AnnouncerSetup,
        events: mpsc::Sender<Event>,
        status: watch::Sender<VrrpStatus>,
    ) -> std::io::Result<Announcer> {
        let socket = VrrpSocket::open(
            &setup.iface,
            setup.local_address,
            setup.unicast_peers.is_empty(),
        )?;
        let now = Instant::now();
        let machine = Machine::new(setup.machine, now);
        status.send_modify(|s| {
            s.vrid = setup.vrid;
            s.version = setup.version.number();
            s.configured_priority = setup.machine.priority;
            s.advert_interval_ms = setup.machine.advert_interval_cs as u64 * 10;
            s.mode = if setup.unicast_peers.is_empty() {
                AdvertMode::Multicast
            } else {
                AdvertMode::Unicast
            };
        });
        Ok(Announcer {
            setup,
            socket,
            machine,
            events,
            status,
            entered_state: now,
            watch: None,
            watch_failed: None,
        })
    }

    async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        let fault = self.setup.fault;
        let actions = if self.setup.resume_master && !fault {
            info!("VRRP resumes as master: the previous agent was master moments ago");
            self.machine.resume_master(Instant::now())
        } else {
            self.machine.start(Instant::now(), fault)
        };
        self.execute(actions, State::Initialize).await;
        loop {
            self.update_watch();
            let before = self.machine.state();
            let deadline = self.machine.next_deadline();
            let probe_at = self.watch.as_ref().map(|w| w.next_probe);
            let actions = tokio::select! {
                _ = async { tokio::time::sleep_until(probe_at.expect("guarded").into()).await }, if probe_at.is_some() => {
                    self.probe_host().await
                }
                received = async {
                    match &self.watch {
                        Some(watch) => watch.socket.recv().await,
                        None => std::future::pending().await,
                    }
                } => {
                    if let (Ok(packet), Some(watch)) = (received, self.watch.as_mut())
                        && echo::echo_reply_from(&packet, watch.id) == Some(watch.target)
                    {
                        watch.heard = Some(Instant::now());
                    }
                    Vec::new()
                }
                received = self.socket.recv() => match received {
                    Ok(packet) => self.on_packet(packet),
                    Err(e) => {
                        warn!(error = %e, "VRRP receive");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        Vec::new()
                    }
                },
                _ = async { tokio::time::sleep_until(deadline.expect("guarded").into()).await }, if deadline.is_some() => {
                    self.machine.on_timer(Instant::now())
                }
                command = commands.recv() => match command {
                    Some(Command::Track { priority, fault }) => {
                        if priority != self.machine.priority() {
                            info!(from = self.machine.priority(), to = priority, "VRRP priority changed by tracking");
                        }
                        let now = Instant::now();
                        let mut actions = self.machine.set_priority(now, priority);
                        actions.extend(self.machine.set_fault(now, fault));
                        actions
                    }
                    Some(Command::Stop { hold_cs, done }) => {
                        if let (State::Master, Some(hold_cs)) = (self.machine.state(), hold_cs) {
                            let priority = self.machine.priority();
                            self.send_advert(priority, hold_cs).await;
                            info!(hold_ms = u64::from(hold_cs) * 10, "VRRP: last advert announces the restart hold");
                        }
                        let _ = done.send(());
                        return;
                    }
                    Some(Command::Shutdown(done)) => {
                        let actions = self.machine.shutdown();
                        self.execute(actions, before).await;
                        let _ = done.send(());
                        return;
                    }
                    None => return,
                },
            };
            self.execute(actions, before).await;
        }
    }

    /// Starts or ends the watch of the master's host as the machine says.
    fn update_watch(&mut self) {
        let wanted = self.machine.host_to_watch();
        if self.watch.as_ref().map(|w| w.target) == wanted {
            return;
        }
        self.watch = None;
        let Some(target) = wanted else {
            self.watch_failed = None;
            return;
        };
        if self.watch_failed == Some(target) {
            return;
        }
        match EchoSocket::open() {
            Ok(socket) => {
                info!(master = %target, "the master announced a longer interval (a restart hold): watching its host with ICMP echo");
                let now = Instant::now();
                self.watch = Some(HostWatch {
                    target,
                    socket,
                    id: std::process::id() as u16,
                    seq: 0,
                    heard: None,
                    told_unanswered: false,
                    started: now,
                    next_probe: now,
                });
            }
            Err(e) => {
                warn!(master = %target, error = %e, "cannot watch the master's host during its restart hold; a host that goes down is noticed only when the hold ends");
                self.watch_failed = Some(target);
            }
        }
    }

    /// One echo to the watched host, and the silence so far to the machine.
    async fn probe_host(&mut self) -> Vec<Action> {
        let interval = Duration::from_millis(u64::from(self.setup.machine.advert_interval_cs) * 10);
        let Some(watch) = self.watch.as_mut() else {
            return Vec::new();
        };
        let now = Instant::now();
        watch.seq = watch.seq.wrapping_add(1);
        if let Err(e) = watch
            .socket
            .send(watch.target, &echo::echo_request(watch.id, watch.seq))
            .await
        {
            tracing::debug!(error = %e, "ICMP echo to the master's host");
        }
        watch.next_probe = now + interval;
        if watch.heard.is_none()
            && !watch.told_unanswered
            && now.duration_since(watch.started) > interval * 10
        {
            watch.told_unanswered = true;
            warn!(master = %watch.target, "the master's host does not answer ICMP echo: its restart hold is waited out in full");
        }
        let silent = watch.heard.map(|heard| now.duration_since(heard));
        let actions = self.machine.on_host_silence(now, silent);
        if let (false, Some(silent)) = (actions.is_empty(), silent) {
            warn!(
                silent_ms = silent.as_millis() as u64,
                "the master's host stopped answering during its restart hold: taking over"
            );
        }
        actions
    }

    fn on_packet(&mut self, packet: super::socket::Received) -> Vec<Action> {
        let (setup, mut advert) = (&self.setup, None);
        self.status.send_modify(|status| {
            if packet.ttl != 255 {
                status.dropped_bad_ttl += 1;
                return;
            }
            if !setup.unicast_peers.is_empty() && !setup.unicast_peers.contains(&packet.src) {
                status.dropped_unknown_source += 1;
                return;
            }
            let (decoded, checksum) = match Advert::decode(&packet.message, packet.src, packet.dst)
            {
                Ok(decoded) => decoded,
                Err(_) => {
                    status.dropped_malformed += 1;
                    return;
                }
            };
            if decoded.vrid != setup.vrid {
                status.dropped_other_vrid += 1;
                return;
            }
            status.adverts_received += 1;
            match checksum {
                ChecksumMode::PseudoHeader => status.checksum_pseudo_header += 1,
                ChecksumMode::Rfc9568 => status.checksum_rfc9568 += 1,
            }
            advert = Some(decoded);
        });
        match advert {
            Some(advert) => self.machine.on_advert(Instant::now(), packet.src, &advert),
            None => Vec::new(),
        }
    }

    async fn execute(&mut self, actions: Vec<Action>, before: State) {
        for action in actions {
            match action {
                Action::Advertise(priority) => self.advertise(priority).await,
                Action::BecomeMaster => {
                    let _ = self.events.send(Event::Own(true)).await;
                }
                Action::Release => {
                    let _ = self.events.send(Event::Own(false)).await;
                }
                Action::Announce => {
                    let _ = self.events.send(Event::Reannounce).await;
                }
            }
        }
        let after = self.machine.state();
        if after != before {
            self.entered_state = Instant::now();
            info!(
                vrid = self.setup.vrid,
                priority = self.machine.priority(),
                master = ?self.machine.master(),
                "VRRP {} -> {}",
                before.label(),
                after.label()
            );
        }
        let machine = &self.machine;
        let seconds_in_state = self.entered_state.elapsed().as_secs_f64();
        self.status.send_modify(|status| {
            status.state = after;
            status.priority = machine.priority();
            status.master = machine.master().map(|m| m.to_string());
            status.transitions = machine.transitions();
            status.seconds_in_state = seconds_in_state;
        });
    }

    async fn advertise(&mut self, priority: u8) {
        self.send_advert(priority, self.setup.machine.advert_interval_cs)
            .await;
    }

    async fn send_advert(&mut self, priority: u8, interval_cs: u16) {
        let advert = Advert {
            version: self.setup.version,
            vrid: self.setup.vrid,
            priority,
            interval_cs,
            addresses: self.setup.vips.clone(),
        };
        let destinations: Vec<Ipv4Addr> = if self.setup.unicast_peers.is_empty() {
            vec![MULTICAST_GROUP]
        } else {
            self.setup.unicast_peers.clone()
        };
        for dst in destinations {
            let message = advert.encode(self.setup.local_address, dst, self.setup.checksum);
            match self.socket.send(dst, &message).await {
                Ok(()) => self.status.send_modify(|status| status.adverts_sent += 1),
                Err(e) => {
                    let mut errors = 0;
                    self.status.send_modify(|status| {
                        status.send_errors += 1;
                        errors = status.send_errors;
                    });
                    if errors.is_power_of_two() {
                        warn!(error = %e, %dst, errors, "sending a VRRP advert");
                    }
                }
            }
        }
    }
}
