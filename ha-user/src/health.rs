//! A backend's health from its check results, with haproxy's semantics, so
//! operators can carry `inter`, `fastinter`, `downinter`, `rise` and `fall`
//! over unchanged:
//!
//! - an up backend leaves up after `fall` consecutive failures; a success
//!   in between resets the count;
//! - a backend that is not up comes back after `rise` consecutive successes;
//! - checks run every `interval` while the state is settled, every
//!   `fast_interval` while a change is pending (up with failures, or not up
//!   with successes), and every `down_interval` while fully down.
//!
//! Beyond haproxy, a failed check says *how* it failed. A backend that
//! answers but is not ready (kube-apiserver's `/readyz` returning 500 during
//! graceful shutdown) becomes **draining**: no new flows, established flows
//! stay. A backend that does not answer at all (refused, unreachable, timed
//! out) becomes **down**: its established flows are moved on their next
//! packet, since they are broken anyway.
//!
//! Passive health (docs/health-checks.md, "Passive health"): when the data
//! path sees a backend refuse a client's SYN, the backend's probe task runs a
//! **confirming check** at once ([`Checker::confirm`]). Two pieces of evidence
//! that agree (the client's connection refused, and the check failing at the
//! transport level) take the backend down at once, without waiting for
//! `fall` failures: haproxy's `observe layer4` with `on-error mark-down`.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// What one check found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckResult {
    Pass,
    /// It answered, but not as expected (status or body).
    NotReady,
    /// No answer: refused, unreachable, TLS failure, timeout.
    Fail,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    Up,
    Draining,
    Down,
}

impl Health {
    pub fn label(self) -> &'static str {
        match self {
            Health::Up => "up",
            Health::Draining => "draining",
            Health::Down => "down",
        }
    }
}

/// The check timings (a copy of the config's, in one place).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    pub interval: Duration,
    pub fast_interval: Duration,
    pub down_interval: Duration,
    pub rise: u32,
    pub fall: u32,
}

#[derive(Clone, Debug)]
pub struct Checker {
    timing: Timing,
    health: Health,
    successes: u32,
    failures: u32,
}

impl Checker {
    /// Backends start up, as in haproxy: traffic flows from the first moment,
    /// and a dead backend is out after `fall` checks at `fast_interval`.
    pub fn new(timing: Timing) -> Self {
        Self {
            timing,
            health: Health::Up,
            successes: 0,
            failures: 0,
        }
    }

    /// A checker that starts from `health` (what the previous agent knew):
    /// a backend recorded down needs `rise` passes before it takes flows.
    pub fn starting(timing: Timing, health: Health) -> Self {
        Self {
            health,
            ..Self::new(timing)
        }
    }

    pub fn health(&self) -> Health {
        self.health
    }

    /// Records one result; returns the new health if it changed.
    pub fn record(&mut self, result: CheckResult) -> Option<Health> {
        let before = self.health;
        match result {
            CheckResult::Pass => {
                self.failures = 0;
                self.successes = self.successes.saturating_add(1);
                if self.health != Health::Up && self.successes >= self.timing.rise {
                    self.health = Health::Up;
                }
            }
            CheckResult::NotReady | CheckResult::Fail => {
                self.successes = 0;
                self.failures = self.failures.saturating_add(1);
                let failed = if result == CheckResult::NotReady {
                    Health::Draining
                } else {
                    Health::Down
                };
                match self.health {
                    Health::Up if self.failures >= self.timing.fall => self.health = failed,
                    Health::Up => {}
                    // Already out of rotation: only whether its flows stay changes.
                    Health::Draining | Health::Down => self.health = failed,
                }
            }
        }
        (self.health != before).then_some(self.health)
    }

    /// Records the result of a confirming check, run because the data path
    /// suspected the backend (it refused a client's SYN). A transport-level
    /// failure (refused, reset, timeout) agrees with the data path: the
    /// backend is down at once, whatever `fall` says. A pass or a not-ready
    /// answer counts as any check's (not ready: the normal rules, towards
    /// draining after `fall`). Returns the new health if it changed.
    pub fn confirm(&mut self, result: CheckResult) -> Option<Health> {
        if result != CheckResult::Fail {
            return self.record(result);
        }
        let before = self.health;
        self.successes = 0;
        self.failures = self.failures.saturating_add(1).max(self.timing.fall);
        self.health = Health::Down;
        (self.health != before).then_some(self.health)
    }

    /// When to check next.
    pub fn next_interval(&self) -> Duration {
        let pending = match self.health {
            Health::Up => self.failures > 0,
            Health::Draining | Health::Down => self.successes > 0,
        };
        if pending {
            self.timing.fast_interval
        } else if self.health == Health::Down {
            self.timing.down_interval
        } else {
            self.timing.interval
        }
    }
}

/// How long a confirming check waits: none, unless the previous one
/// started less than `spacing` (the VIP's `fast_interval`) ago, then until
/// then. A backend that keeps refusing SYNs while its checks pass (a full
/// accept queue, a check on another port) costs at most one check per
/// `spacing`, not one per refused SYN.
pub fn confirm_delay(since_last_confirm: Option<Duration>, spacing: Duration) -> Duration {
    match since_last_confirm {
        Some(elapsed) => spacing.saturating_sub(elapsed),
        None => Duration::ZERO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMING: Timing = Timing {
        interval: Duration::from_millis(1000),
        fast_interval: Duration::from_millis(200),
        down_interval: Duration::from_millis(3000),
        rise: 2,
        fall: 3,
    };
    use CheckResult::*;

    #[test]
    fn up_leaves_after_fall_consecutive_failures_at_fast_interval() {
        let mut checker = Checker::new(TIMING);
        assert_eq!(checker.next_interval(), TIMING.interval);
        assert_eq!(checker.record(Fail), None);
        assert_eq!(
            checker.next_interval(),
            TIMING.fast_interval,
            "a change is pending"
        );
        assert_eq!(checker.record(Fail), None);
        assert_eq!(checker.record(Fail), Some(Health::Down));
        assert_eq!(checker.next_interval(), TIMING.down_interval);
    }

    #[test]
    fn a_success_between_failures_resets_the_count() {
        let mut checker = Checker::new(TIMING);
        checker.record(Fail);
        checker.record(Fail);
        checker.record(Pass);
        assert_eq!(checker.next_interval(), TIMING.interval);
        checker.record(Fail);
        checker.record(Fail);
        assert_eq!(checker.health(), Health::Up);
        assert_eq!(checker.record(Fail), Some(Health::Down));
    }

    #[test]
    fn not_ready_answers_drain_instead_of_down() {
        let mut checker = Checker::new(TIMING);
        for _ in 0..2 {
            assert_eq!(checker.record(NotReady), None);
        }
        assert_eq!(checker.record(NotReady), Some(Health::Draining));
        assert_eq!(
            checker.next_interval(),
            TIMING.interval,
            "draining is settled, not down"
        );
        // It stops answering at all: its flows are broken, so it goes down at once.
        assert_eq!(checker.record(Fail), Some(Health::Down));
    }

    #[test]
    fn coming_back_takes_rise_consecutive_successes_at_fast_interval() {
        let mut checker = Checker::new(TIMING);
        (0..3).for_each(|_| {
            checker.record(Fail);
        });
        assert_eq!(checker.record(Pass), None);
        assert_eq!(checker.next_interval(), TIMING.fast_interval);
        assert_eq!(checker.record(Fail), None, "still down");
        assert_eq!(
            checker.next_interval(),
            TIMING.down_interval,
            "the pending rise was reset"
        );
        assert_eq!(checker.record(Pass), None);
        assert_eq!(checker.record(Pass), Some(Health::Up));
        assert_eq!(checker.next_interval(), TIMING.interval);
    }

    #[test]
    fn a_confirming_check_that_fails_takes_the_backend_down_at_once() {
        let mut checker = Checker::new(TIMING);
        assert_eq!(
            checker.confirm(Fail),
            Some(Health::Down),
            "not after fall = 3"
        );
        assert_eq!(checker.next_interval(), TIMING.down_interval);
        // Coming back takes rise passes, as for any down backend.
        assert_eq!(checker.confirm(Pass), None);
        assert_eq!(checker.record(Pass), Some(Health::Up));
    }

    #[test]
    fn a_confirming_check_that_passes_or_is_not_ready_counts_as_any_check() {
        let mut checker = Checker::new(TIMING);
        assert_eq!(checker.confirm(Pass), None);
        assert_eq!(checker.health(), Health::Up);
        // Not ready: the normal rules, draining after fall.
        assert_eq!(checker.confirm(NotReady), None);
        assert_eq!(checker.confirm(NotReady), None);
        assert_eq!(checker.confirm(NotReady), Some(Health::Draining));
        // A failed confirmation of a draining backend: down (its flows move).
        assert_eq!(checker.confirm(Fail), Some(Health::Down));
        // Then the ordinary rules hold: one later failure changes nothing.
        assert_eq!(checker.record(Fail), None);
    }

    #[test]
    fn confirming_checks_are_spaced_by_the_fast_interval() {
        let spacing = TIMING.fast_interval;
        assert_eq!(
            confirm_delay(None, spacing),
            Duration::ZERO,
            "the first at once"
        );
        assert_eq!(
            confirm_delay(Some(Duration::from_millis(50)), spacing),
            Duration::from_millis(150)
        );
        assert_eq!(
            confirm_delay(Some(Duration::from_secs(2)), spacing),
            Duration::ZERO
        );
    }

    #[test]
    fn detection_time_with_the_defaults() {
        // Documented: a backend that dies right after a check is out after one
        // interval plus (fall - 1) fast intervals of checking, each check
        // failing within its timeout when it hangs.
        let mut checker = Checker::new(TIMING);
        let mut elapsed = checker.next_interval();
        let mut result = checker.record(Fail);
        while result.is_none() {
            elapsed += checker.next_interval();
            result = checker.record(Fail);
        }
        assert_eq!(
            elapsed,
            TIMING.interval + TIMING.fast_interval * (TIMING.fall - 1)
        );
    }
}
