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
