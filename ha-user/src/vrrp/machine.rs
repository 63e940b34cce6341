//! The VRRP state machine (RFC 9568 section 6.4), pure: time comes in as an
//! argument, decisions come out as [`Action`]s, and the announcer task
//! carries them out. Unit-tested without sockets or clocks.
//!
//! Beyond the RFC, as keepalived does:
//! - a master that hears a *lower*-priority master re-asserts at once with
//!   an advert and gratuitous ARP, and a master that steps down for a higher
//!   one sends a parting advert at its own priority first, so after a
//!   partition heals exactly one master remains within one interval and
//!   every ARP cache points at it, whichever side's advert arrived first;
//! - a backup that may preempt and hears a *lower*-priority master takes
//!   over after its skew time, not after a Master_Down_Interval (RFC 9568
//!   section 6.4.2 discards such an advert and lets the timer run out;
//!   keepalived forces an election at once). The skew time, shorter for a
//!   higher priority, lets the highest of several backups win before the
//!   others, which then hear a higher master and stay backup. With a master
//!   that advertises a lowered priority at once (below), a tracked
//!   condition moves the VIP within the skew time of its detection;
//! - a master whose priority tracking lowers advertises it at once, not at
//!   its next interval;
//! - `preempt_delay`: for that long after start (or after leaving fault) a
//!   backup does not preempt a lower-priority master;
//! - a fault state (interface down, program detached, no healthy backend)
//!   that never becomes master;
//! - a restart hold (docs/vrrp.md, "Restarts"): a master whose agent
//!   restarts announces a long interval in its last advert; while the master
//!   it learned announces a longer interval than ours, a backup watches the
//!   master's host with ICMP echo and takes over after its own
//!   Master_Down_Interval of silence, so a host that goes down during the
//!   hold costs no more than a normal failover.

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use serde::Serialize;

use super::packet::Advert;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MachineConfig {
    pub priority: u8,
    /// Our advertisement interval, in centiseconds.
    pub advert_interval_cs: u16,
    pub preempt: bool,
    pub preempt_delay: Duration,
    /// Our primary address: ties between equal priorities go to the higher address.
    pub local_address: Ipv4Addr,
}

/// RFC 9568 section 6.4's states; the serde spelling is the label.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    #[default]
    Initialize,
    Backup,
    Master,
    Fault,
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.label())
    }
}

impl State {
    pub fn label(self) -> &'static str {
        match self {
            State::Initialize => "initialize",
            State::Backup => "backup",
            State::Master => "master",
            State::Fault => "fault",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Send an advertisement with this priority.
    Advertise(u8),
    /// Take the VIPs: add the addresses, enable them in the data plane, gratuitous ARP.
    BecomeMaster,
    /// Give the VIPs up (backup or fault).
    Release,
    /// Still master: repeat the gratuitous ARP (re-assertion after a split brain).
    Announce,
}

pub struct Machine {
    config: MachineConfig,
    state: State,
    priority: u8,
    /// The master's interval as last heard (ours when we are master), in centiseconds.
    master_adver_interval_cs: u16,
    master: Option<Ipv4Addr>,
    timer: Option<Instant>,
    /// Preemption is held back until this instant (`preempt_delay`).
    preempt_after: Instant,
    transitions: u64,
}

fn centis(cs: u64) -> Duration {
    Duration::from_millis(cs * 10)
}

impl Machine {
    pub fn new(config: MachineConfig, now: Instant) -> Self {
        Self {
            config,
            state: State::Initialize,
            priority: config.priority,
            master_adver_interval_cs: config.advert_interval_cs,
            master: None,
            timer: None,
            preempt_after: now + config.preempt_delay,
            transitions: 0,
        }
    }

    pub fn state(&self) -> State {
        self.state
    }

    pub fn priority(&self) -> u8 {
        self.priority
    }

    /// The current master's address, as far as this host knows.
    pub fn master(&self) -> Option<Ipv4Addr> {
        match self.state {
            State::Master => Some(self.config.local_address),
            _ => self.master,
        }
    }

    pub fn transitions(&self) -> u64 {
        self.transitions
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        self.timer
    }

    /// Skew_Time = ((256 - Priority) x Master_Adver_Interval) / 256.
    pub fn skew_time(&self) -> Duration {
        centis((256 - self.priority as u64) * self.master_adver_interval_cs as u64) / 256
    }

    /// Master_Down_Interval = 3 x Master_Adver_Interval + Skew_Time.
    pub fn master_down_interval(&self) -> Duration {
        centis(3 * self.master_adver_interval_cs as u64) + self.skew_time()
    }

    fn advert_interval(&self) -> Duration {
        centis(self.config.advert_interval_cs as u64)
    }

    fn enter(&mut self, state: State) {
        if self.state != state {
            self.state = state;
            self.transitions += 1;
        }
    }

    fn become_master(&mut self, now: Instant) -> Vec<Action> {
        self.enter(State::Master);
        self.master_adver_interval_cs = self.config.advert_interval_cs;
        self.timer = Some(now + self.advert_interval());
        vec![Action::Advertise(self.priority), Action::BecomeMaster]
    }

    fn become_backup(&mut self, now: Instant) -> Vec<Action> {
        self.enter(State::Backup);
        self.timer = Some(now + self.master_down_interval());
        vec![Action::Release]
    }

    /// Startup (RFC 6.4.1): the address owner (255) is master at once;
    /// everyone else waits a Master_Down_Interval as backup.
    pub fn start(&mut self, now: Instant, fault: bool) -> Vec<Action> {
        if fault {
            self.enter(State::Fault);
            return vec![Action::Release];
        }
        if self.priority == 255 {
            return self.become_master(now);
        }
        self.become_backup(now)
    }

    /// Startup of a restarted agent whose previous instance was master moments
    /// ago, sooner than any backup's Master_Down_Interval could end
    /// (`handover::vrrp_start` decides): master at once, with an
    /// advertisement, so the peers' timers are reset and the VIP never moves.
    /// Beyond the RFC, which starts every non-owner as backup.
    pub fn resume_master(&mut self, now: Instant) -> Vec<Action> {
        self.become_master(now)
    }

    /// The master host a backup watches: the master it learned announced a
    /// longer interval than ours (a restart hold, or a slower peer).
    pub fn host_to_watch(&self) -> Option<Ipv4Addr> {
        match (self.state, self.master) {
            (State::Backup, Some(master))
                if self.master_adver_interval_cs > self.config.advert_interval_cs =>
            {
                Some(master)
            }
            _ => None,
        }
    }

    /// Our own Master_Down_Interval: 3 x our interval + our skew.
    fn own_master_down_interval(&self) -> Duration {
        let interval = self.config.advert_interval_cs as u64;
        centis(3 * interval) + centis((256 - self.priority as u64) * interval) / 256
    }

    /// The watched master host has not answered for `silent` since its last
    /// reply (`None`: it never answered, and may not answer ICMP echo at
    /// all, so its silence proves nothing and the hold is waited out). Once
    /// that is our own Master_Down_Interval, the host is taken for down and
    /// the backup becomes master, as if the master's timer had run out.
    pub fn on_host_silence(&mut self, now: Instant, silent: Option<Duration>) -> Vec<Action> {
        let Some(silent) = silent else {
            return Vec::new();
        };
        if self.host_to_watch().is_none() || silent < self.own_master_down_interval() {
            return Vec::new();
        }
        self.master = None;
        self.become_master(now)
    }

    pub fn on_timer(&mut self, now: Instant) -> Vec<Action> {
        match (self.state, self.timer) {
            (_, Some(deadline)) if now < deadline => Vec::new(),
            (State::Backup, Some(_)) => {
                self.master = None;
                self.become_master(now)
            }
            (State::Master, Some(_)) => {
                self.timer = Some(now + self.advert_interval());
                vec![Action::Advertise(self.priority)]
            }
            _ => Vec::new(),
        }
    }

    pub fn on_advert(&mut self, now: Instant, from: Ipv4Addr, advert: &Advert) -> Vec<Action> {
        match self.state {
            State::Backup => {
                if advert.priority == 0 {
                    // The master is leaving: take over after the skew time only.
                    self.timer = Some(now + self.skew_time());
                    return Vec::new();
                }
                let may_preempt = self.config.preempt && now >= self.preempt_after;
                if !may_preempt || advert.priority >= self.priority {
                    self.master_adver_interval_cs = advert.interval_cs.max(1);
                    self.master = Some(from);
                    self.timer = Some(now + self.master_down_interval());
                    return Vec::new();
                }
                // A lower-priority master while we may preempt: take over
                // after the skew time (or sooner, if the timer ends first).
                let preempt_at = now + self.skew_time();
                self.timer = Some(self.timer.map_or(preempt_at, |t| t.min(preempt_at)));
                Vec::new()
            }
            State::Master => {
                if advert.priority == 0 {
                    self.timer = Some(now + self.advert_interval());
                    return vec![Action::Advertise(self.priority)];
                }
                let theirs_wins = advert.priority > self.priority
                    || (advert.priority == self.priority
                        && u32::from(from) > u32::from(self.config.local_address));
                if theirs_wins {
                    self.master_adver_interval_cs = advert.interval_cs.max(1);
                    self.master = Some(from);
                    // A parting advert at our (lower) priority: the winner,
                    // hearing a lower master, re-asserts with gratuitous ARP,
                    // so ARP caches we drew during a split brain come back
                    // to it even if its adverts reached us first.
                    let parting = Action::Advertise(self.priority);
                    let mut actions = vec![parting];
                    actions.extend(self.become_backup(now));
                    return actions;
                }
                // Another master with lower priority (a healed partition): re-assert now.
                self.timer = Some(now + self.advert_interval());
                vec![Action::Advertise(self.priority), Action::Announce]
            }
            State::Initialize | State::Fault => {
                if advert.priority != 0 {
                    self.master = Some(from);
                }
                Vec::new()
            }
        }
    }

    /// A new effective priority (tracking lowered or restored it). A master
    /// whose priority drops advertises it at once, so a backup that now
    /// outranks it preempts after its skew time; otherwise the priority goes
    /// out with the next advert (a backup's, once it is master).
    pub fn set_priority(&mut self, now: Instant, priority: u8) -> Vec<Action> {
        let priority = priority.clamp(1, 255);
        let lowered = priority < self.priority;
        self.priority = priority;
        if lowered && self.state == State::Master {
            self.timer = Some(now + self.advert_interval());
            return vec![Action::Advertise(priority)];
        }
        Vec::new()
    }

    /// Entering fault gives the VIP up (with a priority-0 advert if we were
    /// master); leaving it starts over as backup, with `preempt_delay` again.
    pub fn set_fault(&mut self, now: Instant, fault: bool) -> Vec<Action> {
        match (fault, self.state) {
            (true, State::Fault) | (false, State::Backup | State::Master) => Vec::new(),
            (true, state) => {
                let mut actions = Vec::new();
                if state == State::Master {
                    actions.push(Action::Advertise(0));
                }
                self.enter(State::Fault);
                self.timer = None;
                actions.push(Action::Release);
                actions
            }
            (false, _) => {
                self.preempt_after = now + self.config.preempt_delay;
                self.become_backup(now)
            }
        }
    }

    /// SIGTERM: a master sends priority 0 so the backups take over after
    /// their skew time instead of a whole Master_Down_Interval.
    pub fn shutdown(&mut self) -> Vec<Action> {
        let was_master = self.state == State::Master;
        self.enter(State::Initialize);
        self.timer = None;
        if was_master {
            vec![Action::Advertise(0), Action::Release]
        } else {
            vec![Action::Release]
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::VrrpVersion;

    const LOCAL: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
    const PEER_LOW: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
    const PEER_HIGH: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 3);

    fn config(priority: u8) -> MachineConfig {
        MachineConfig {
            priority,
            advert_interval_cs: 10,
            preempt: true,
            preempt_delay: Duration::ZERO,
            local_address: LOCAL,
        }
    }

    fn advert(priority: u8) -> Advert {
        Advert {
            version: VrrpVersion::V3,
            vrid: 51,
            priority,
            interval_cs: 10,
            addresses: vec![],
        }
    }

    #[test]
    fn timers_follow_the_rfc_formulas() {
        let now = Instant::now();
        let machine = Machine::new(config(100), now);
        // Skew = (256 - 100) x 100 ms / 256 = 60.9 ms; MDI = 300 ms + skew.
        assert_eq!(machine.skew_time(), Duration::from_nanos(60_937_500));
        assert_eq!(
            machine.master_down_interval(),
            Duration::from_nanos(360_937_500)
        );
        let owner = Machine::new(config(254), now);
        assert_eq!(owner.skew_time(), Duration::from_nanos(781_250));
    }

    #[test]
    fn a_backup_becomes_master_when_adverts_stop() {
        let t0 = Instant::now();
        let mut m = Machine::new(config(100), t0);
        assert_eq!(m.start(t0, false), vec![Action::Release]);
        assert_eq!(m.state(), State::Backup);
        // Adverts from a higher-priority master keep it backup.
        let mut now = t0;
        for _ in 0..10 {
            now += Duration::from_millis(100);
            assert!(m.on_advert(now, PEER_HIGH, &advert(150)).is_empty());
            assert!(m.on_timer(now).is_empty());
        }
        assert_eq!(m.master(), Some(PEER_HIGH));
        // They stop: master after Master_Down_Interval, not before.
        assert!(m.on_timer(now + Duration::from_millis(360)).is_empty());
        let taken = m.on_timer(now + m.master_down_interval());
        assert_eq!(taken, vec![Action::Advertise(100), Action::BecomeMaster]);
        assert_eq!((m.state(), m.master()), (State::Master, Some(LOCAL)));
        // And advertises every interval.
        let next = m.next_deadline().unwrap();
        assert_eq!(m.on_timer(next), vec![Action::Advertise(100)]);
    }

    #[test]
    fn priority_zero_hands_over_after_the_skew_time_only() {
        let t0 = Instant::now();
        let mut m = Machine::new(config(100), t0);
        m.start(t0, false);
        m.on_advert(t0, PEER_HIGH, &advert(150));
        assert!(m.on_advert(t0, PEER_HIGH, &advert(0)).is_empty());
        assert_eq!(m.next_deadline(), Some(t0 + m.skew_time()));
        assert_eq!(
            m.on_timer(t0 + m.skew_time()),
            vec![Action::Advertise(100), Action::BecomeMaster]
        );
    }

    #[test]
    fn a_master_steps_down_for_higher_priority_or_equal_priority_and_higher_address() {
        let t0 = Instant::now();
        for (priority, from, steps_down) in [
            (150, PEER_LOW, true),
            (100, PEER_HIGH, true),
            (100, PEER_LOW, false),
            (50, PEER_HIGH, false),
        ] {
            let mut m = Machine::new(config(100), t0);
            m.start(t0, false);
            m.on_timer(t0 + m.master_down_interval());
            assert_eq!(m.state(), State::Master);
            let actions = m.on_advert(t0 + Duration::from_secs(1), from, &advert(priority));
            if steps_down {
                // A parting advert at our priority, then the VIPs go.
                assert_eq!(
                    actions,
                    vec![Action::Advertise(100), Action::Release],
                    "priority {priority} from {from}"
                );
                assert_eq!((m.state(), m.master()), (State::Backup, Some(from)));
            } else {
                // A lower master (healed partition): re-assert at once.
                assert_eq!(
                    actions,
                    vec![Action::Advertise(100), Action::Announce],
                    "priority {priority} from {from}"
                );
                assert_eq!(m.state(), State::Master);
            }
        }
    }

    #[test]
    fn a_resumed_master_advertises_at_once_and_keeps_its_interval() {
        let t0 = Instant::now();
        let mut m = Machine::new(config(100), t0);
        assert_eq!(
            m.resume_master(t0),
            vec![Action::Advertise(100), Action::BecomeMaster]
        );
        assert_eq!(m.state(), State::Master);
        assert_eq!(m.next_deadline(), Some(t0 + Duration::from_millis(100)));
    }

    #[test]
    fn a_backup_watches_a_master_that_announced_a_hold_and_takes_over_when_its_host_is_silent() {
        let t0 = Instant::now();
        let mut m = Machine::new(config(100), t0);
        m.start(t0, false);
        let master = Ipv4Addr::new(10, 0, 0, 9);
        m.on_advert(t0, master, &advert(150));
        assert_eq!(m.host_to_watch(), None, "the same interval: no hold");
        let mut hold = advert(150);
        hold.interval_cs = 1000;
        m.on_advert(t0, master, &hold);
        assert_eq!(m.host_to_watch(), Some(master));
        assert_eq!(
            m.next_deadline(),
            Some(t0 + Duration::from_secs(30) + Duration::from_micros(6_093_750)),
            "the backups' timer follows the announced interval"
        );
        // Own Master_Down_Interval: 3 x 100 ms + (156 x 100 ms) / 256.
        assert!(
            m.on_host_silence(t0, Some(Duration::from_millis(350)))
                .is_empty(),
            "a live host keeps the hold"
        );
        assert!(
            m.on_host_silence(t0, None).is_empty(),
            "a host that never answered proves nothing"
        );
        assert_eq!(m.state(), State::Backup);
        assert_eq!(
            m.on_host_silence(t0, Some(Duration::from_millis(361))),
            vec![Action::Advertise(100), Action::BecomeMaster]
        );
        assert_eq!(m.state(), State::Master);
        assert_eq!(m.host_to_watch(), None);
        assert!(
            m.on_host_silence(t0, Some(Duration::from_secs(9)))
                .is_empty()
        );
    }

    #[test]
    fn preemption_waits_for_preempt_delay_and_can_be_off() {
        let t0 = Instant::now();
        let mut m = Machine::new(
            MachineConfig {
                preempt_delay: Duration::from_secs(2),
                ..config(200)
            },
            t0,
        );
        m.start(t0, false);
        // During the delay a lower-priority master is followed.
        let mut now = t0;
        while now < t0 + Duration::from_secs(2) {
            now += Duration::from_millis(100);
            m.on_advert(now, PEER_LOW, &advert(100));
            assert!(m.on_timer(now).is_empty(), "preempted during the delay");
        }
        // After it, its adverts are ignored and the timer takes us to master.
        m.on_advert(now + Duration::from_millis(100), PEER_LOW, &advert(100));
        let deadline = m.next_deadline().unwrap();
        assert_eq!(
            m.on_timer(deadline),
            vec![Action::Advertise(200), Action::BecomeMaster]
        );

        let mut no_preempt = Machine::new(
            MachineConfig {
                preempt: false,
                ..config(200)
            },
            t0,
        );
        no_preempt.start(t0, false);
        for i in 1..50 {
            let now = t0 + Duration::from_millis(100 * i);
            no_preempt.on_advert(now, PEER_LOW, &advert(100));
            assert!(no_preempt.on_timer(now).is_empty());
        }
        assert_eq!(no_preempt.state(), State::Backup);
    }

    #[test]
    fn a_backup_preempts_a_lower_priority_master_after_its_skew_time() {
        let t0 = Instant::now();
        let mut m = Machine::new(config(150), t0);
        m.start(t0, false);
        assert!(m.on_advert(t0, PEER_LOW, &advert(100)).is_empty());
        // Not a Master_Down_Interval: the skew time, (256 - 150) x 100 ms / 256.
        assert_eq!(m.next_deadline(), Some(t0 + m.skew_time()));
        assert!(m.on_timer(t0 + Duration::from_millis(41)).is_empty());
        assert_eq!(
            m.on_timer(t0 + m.skew_time()),
            vec![Action::Advertise(150), Action::BecomeMaster]
        );
        // A later lower advert never pushes an earlier deadline back.
        let mut m = Machine::new(config(150), t0);
        m.start(t0, false);
        m.on_advert(t0, PEER_LOW, &advert(100));
        let first = m.next_deadline();
        m.on_advert(t0 + Duration::from_millis(30), PEER_LOW, &advert(100));
        assert_eq!(m.next_deadline(), first);
    }

    #[test]
    fn of_two_backups_above_a_lowered_master_the_higher_takes_over_and_the_other_stays() {
        let t0 = Instant::now();
        let high_address = Ipv4Addr::new(10, 0, 0, 4);
        let mut high = Machine::new(config(140), t0);
        let mut low = Machine::new(config(120), t0);
        high.start(t0, false);
        low.start(t0, false);
        high.on_advert(t0, PEER_LOW, &advert(100));
        low.on_advert(t0, PEER_LOW, &advert(100));
        assert!(high.next_deadline() < low.next_deadline());
        let at = high.next_deadline().unwrap();
        assert_eq!(
            high.on_timer(at),
            vec![Action::Advertise(140), Action::BecomeMaster]
        );
        // The lower backup hears the new master before its own skew ends.
        assert!(at < low.next_deadline().unwrap());
        assert!(low.on_advert(at, high_address, &advert(140)).is_empty());
        assert!(low.on_timer(at + low.skew_time()).is_empty());
        assert_eq!(
            (low.state(), low.master()),
            (State::Backup, Some(high_address))
        );
    }

    #[test]
    fn a_master_advertises_a_lowered_priority_at_once() {
        let t0 = Instant::now();
        let mut m = Machine::new(config(150), t0);
        m.start(t0, false);
        m.on_timer(t0 + m.master_down_interval());
        assert_eq!(m.state(), State::Master);
        let now = t0 + Duration::from_secs(1);
        assert_eq!(m.set_priority(now, 130), vec![Action::Advertise(130)]);
        assert_eq!(m.next_deadline(), Some(now + Duration::from_millis(100)));
        // Raised, or unchanged: the next advert carries it.
        assert!(m.set_priority(now, 150).is_empty());
        assert!(m.set_priority(now, 150).is_empty());
        // A backup sends nothing.
        let mut backup = Machine::new(config(150), t0);
        backup.start(t0, false);
        assert!(backup.set_priority(now, 100).is_empty());
        assert_eq!(backup.priority(), 100);
    }

    #[test]
    fn fault_never_becomes_master_and_leaving_it_starts_as_backup() {
        let t0 = Instant::now();
        let mut m = Machine::new(config(100), t0);
        m.start(t0, false);
        m.on_timer(t0 + m.master_down_interval());
        assert_eq!(
            m.set_fault(t0 + Duration::from_secs(1), true),
            vec![Action::Advertise(0), Action::Release]
        );
        assert_eq!(m.next_deadline(), None);
        assert!(m.on_timer(t0 + Duration::from_secs(10)).is_empty());
        assert_eq!(m.state(), State::Fault);
        assert_eq!(
            m.set_fault(t0 + Duration::from_secs(11), false),
            vec![Action::Release]
        );
        assert_eq!(m.state(), State::Backup);
        assert_eq!(m.transitions(), 4, "backup, master, fault, backup");
    }

    #[test]
    fn the_address_owner_is_master_at_once_and_shutdown_sends_priority_zero() {
        let t0 = Instant::now();
        let mut owner = Machine::new(config(255), t0);
        assert_eq!(
            owner.start(t0, false),
            vec![Action::Advertise(255), Action::BecomeMaster]
        );
        assert_eq!(
            owner.shutdown(),
            vec![Action::Advertise(0), Action::Release]
        );
        let mut backup = Machine::new(config(100), t0);
        backup.start(t0, false);
        assert_eq!(backup.shutdown(), vec![Action::Release]);
    }
}
