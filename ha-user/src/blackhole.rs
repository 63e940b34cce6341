//! Is the data path sending flows into a hole? A pure decision over the
//! data path's counters, sampled by the agent about once a second.
//!
//! XDP cannot see whether a frame it sent arrived. The agent can see that
//! the data path keeps sending new connections to backends while fewer
//! backend packets than that come back to NAT ports, although its own health checks
//! (which leave by the host's stack, not by XDP) reach those backends. Then
//! the frames the program sends are lost between it and the wire: a veth
//! whose peer runs no XDP program holds XDP_TX frames until other traffic
//! wakes it, and veth with the kernel's default checksum offload sends
//! frames whose checksums were never completed. docs/operations.md,
//! "The data path is not answered".

use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

/// The data path's totals that matter here (over all CPUs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// New TCP flows sent to backends that are not this host (the
    /// backends' `new_flows`): each one's SYN is answered by a healthy
    /// path, with a SYN-ACK or an RST, within a round trip.
    pub new_flows: u64,
    /// Client packets sent on to backends (`forward_tx`, `forward_redirect`):
    /// a new flow whose first packet the balancer answered itself (TTL run
    /// out, too large) or dropped was never sent, and is not expected to be
    /// answered.
    pub forwarded: u64,
    /// Backend packets that reached a NAT port: translated back
    /// (`reply_tx`, `reply_redirect`, `icmp_reply_*`) or dropped for want of
    /// a flow (`drop_reply_no_flow`). Any of them shows the path works.
    pub answered: u64,
}

/// Found: over the window ending now, `new_flows` new flows went to
/// backends and only `answered` backend packets came back (fewer than the
/// flows: a healthy path answers every SYN).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Finding {
    pub since: Instant,
    pub new_flows: u64,
    pub answered: u64,
    /// The window the counts were taken over.
    pub over: Duration,
    /// When the counts last showed it (an idle path shows nothing).
    pub confirmed: Instant,
}

/// What one observation changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    Found(Finding),
    Cleared,
}

/// The detector's state: the samples of the last window, and the finding.
#[derive(Clone, Debug)]
pub struct Detector {
    /// How far back the samples reach.
    window: Duration,
    /// How many new flows the window must hold before it says anything.
    min_new_flows: u64,
    samples: VecDeque<(Instant, Counters)>,
    finding: Option<Finding>,
}

/// A finding that nothing has confirmed for this long (no new connection
/// at all) is dropped: the cause may be gone, and nothing says otherwise.
pub const IDLE_CLEAR: Duration = Duration::from_secs(60);

/// Defaults: 5 s and 3 new flows. Unanswered connection attempts (a client
/// that gives up after 2 s and tries again) are found about 5 s after the
/// first one.
pub const WINDOW: Duration = Duration::from_secs(5);
pub const MIN_NEW_FLOWS: u64 = 3;

impl Default for Detector {
    fn default() -> Self {
        Detector::new(WINDOW, MIN_NEW_FLOWS)
    }
}

impl Detector {
    pub fn new(window: Duration, min_new_flows: u64) -> Detector {
        Detector {
            window,
            min_new_flows,
            samples: VecDeque::new(),
            finding: None,
        }
    }

    /// The current finding, if any.
    pub fn finding(&self) -> Option<Finding> {
        self.finding
    }

    /// One sample at `now`. `backends_pass_checks`: at least one backend the
    /// data path forwards to (not local) passes its health check, so answers
    /// are to be expected.
    ///
    /// Found when the window holds at least `min_new_flows` new flows and
    /// fewer answers than new flows. Kept until answers come back at least as
    /// many as new flows (an idle path stays reported: nothing showed it
    /// works again), or the backends fail their checks (then silence is
    /// theirs). Counters that go backwards (the maps were replaced) start
    /// afresh.
    pub fn observe(
        &mut self,
        now: Instant,
        counters: Counters,
        backends_pass_checks: bool,
    ) -> Option<Change> {
        if let Some((_, last)) = self.samples.back()
            && (counters.new_flows < last.new_flows || counters.answered < last.answered)
        {
            self.samples.clear();
        }
        self.samples.push_back((now, counters));
        while self.samples.len() > 1
            && self
                .samples
                .get(1)
                .is_some_and(|(at, _)| now.duration_since(*at) >= self.window)
        {
            self.samples.pop_front();
        }
        let (since, oldest) = *self.samples.front()?;
        let new_flows = counters.new_flows - oldest.new_flows;
        let forwarded = counters.forwarded.saturating_sub(oldest.forwarded);
        let answered = counters.answered - oldest.answered;
        let unanswered =
            new_flows >= self.min_new_flows && answered < new_flows && forwarded >= new_flows;
        let healthy = answered > 0 && answered >= new_flows;
        let finding = Finding {
            since,
            new_flows,
            answered,
            over: now.duration_since(since),
            confirmed: now,
        };
        match self.finding {
            None if unanswered && backends_pass_checks => {
                self.finding = Some(finding);
                Some(Change::Found(finding))
            }
            Some(_) if healthy || !backends_pass_checks => {
                self.finding = None;
                Some(Change::Cleared)
            }
            Some(_) if unanswered => {
                self.finding = Some(finding);
                None
            }
            Some(last) if now.duration_since(last.confirmed) >= IDLE_CLEAR => {
                self.finding = None;
                Some(Change::Cleared)
            }
            _ => None,
        }
    }
}

/// Turns the data path's per-backend totals of new flows into the
/// detector's `new_flows`: only backends that are `eligible` now count (up
/// and checked, not local, of a TCP VIP), each from the second sample it is
/// seen in, so a backend id reused with an earlier backend's counts, or a
/// backend that just became eligible, adds nothing at once; a total that
/// went back (the maps were replaced) adds nothing. First packets that were
/// not SYNs (`midstream_pickup`: an RST, a packet of a connection picked up
/// after a restart) are taken off: nothing obliges a backend to answer them.
#[derive(Clone, Debug)]
pub struct Accumulator<K> {
    previous: std::collections::HashMap<K, u64>,
    previous_pickups: Option<u64>,
    new_flows: u64,
}

impl<K> Default for Accumulator<K> {
    fn default() -> Self {
        Accumulator {
            previous: std::collections::HashMap::new(),
            previous_pickups: None,
            new_flows: 0,
        }
    }
}

impl<K: std::hash::Hash + Eq + Clone> Accumulator<K> {
    /// One sample: every backend's total of new flows, the eligible ones,
    /// and the data path's total of midstream pickups. Returns the running
    /// total of counted new flows.
    pub fn add(
        &mut self,
        totals: &[(K, u64)],
        eligible: &std::collections::HashSet<K>,
        pickups: u64,
    ) -> u64 {
        let mut added = 0u64;
        let mut next = std::collections::HashMap::with_capacity(totals.len());
        for (key, total) in totals {
            if eligible.contains(key)
                && let Some(before) = self.previous.get(key)
            {
                added += total.saturating_sub(*before);
            }
            next.insert(key.clone(), *total);
        }
        self.previous = next;
        let picked_up = self
            .previous_pickups
            .map_or(0, |before| pickups.saturating_sub(before));
        self.previous_pickups = Some(pickups);
        self.new_flows += added.saturating_sub(picked_up);
        self.new_flows
    }
}

/// The operator-facing reason for a finding on `iface`; `veth` names the
/// remedies for that driver.
pub fn reason(iface: &str, finding: &Finding, veth: bool) -> String {
    let secs = finding.over.as_secs();
    let mut text = format!(
        "the data path is not answered: {} new connections sent to backends over the last {secs} s \
         and {} of their packets came back, while the health checks reach them",
        finding.new_flows, finding.answered
    );
    if veth {
        text.push_str(&format!(
            "; {iface} is a veth: XDP_TX frames reach the wire only if the peer interface runs an \
             XDP program, and with the default checksum offload their checksums are left \
             incomplete: attach an XDP program to the peer, or run `ethtool -K PEER tx off` \
             on both ends"
        ));
    } else {
        text.push_str(&format!(
            "; frames sent by XDP on {iface} are lost (driver, offload or a filter on the path)"
        ));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(t0: Instant, secs: u64) -> Instant {
        t0 + Duration::from_secs(secs)
    }

    /// Every new flow's first packet forwarded.
    fn c(new_flows: u64, answered: u64) -> Counters {
        Counters {
            new_flows,
            forwarded: new_flows * 2,
            answered,
        }
    }

    #[test]
    fn unanswered_connections_are_found_and_cleared_by_answers() {
        let t0 = Instant::now();
        let mut d = Detector::default();
        assert_eq!(d.observe(t0, c(100, 900), true), None);
        // A client tries every 2 s; nothing comes back.
        assert_eq!(d.observe(at(t0, 1), c(101, 900), true), None);
        assert_eq!(d.observe(at(t0, 2), c(101, 900), true), None);
        assert_eq!(d.observe(at(t0, 3), c(102, 900), true), None);
        assert_eq!(
            d.observe(at(t0, 5), c(103, 900), true),
            Some(Change::Found(Finding {
                since: t0,
                new_flows: 3,
                answered: 0,
                over: Duration::from_secs(5),
                confirmed: at(t0, 5),
            }))
        );
        // Still broken, then idle for a while: kept.
        assert_eq!(d.observe(at(t0, 7), c(104, 900), true), None);
        assert_eq!(d.observe(at(t0, 30), c(104, 900), true), None);
        assert!(d.finding().is_some());
        // A connection answered: cleared.
        assert_eq!(
            d.observe(at(t0, 31), c(105, 904), true),
            Some(Change::Cleared)
        );
        assert_eq!(d.finding(), None);
    }

    #[test]
    fn a_finding_nothing_confirms_for_a_minute_is_dropped() {
        let t0 = Instant::now();
        let mut d = Detector::default();
        for s in 0..6 {
            d.observe(at(t0, s), c(s, 0), true);
        }
        assert!(d.finding().is_some());
        assert_eq!(d.observe(at(t0, 60), c(5, 0), true), None);
        assert_eq!(d.observe(at(t0, 66), c(5, 0), true), Some(Change::Cleared));
    }

    #[test]
    fn flows_the_balancer_answered_or_dropped_itself_are_not_expected_answered() {
        // mtr-style probes whose TTL runs out at the balancer: new flows,
        // answered by time exceeded, never forwarded.
        let t0 = Instant::now();
        let mut d = Detector::default();
        for s in 0..20 {
            let probes = Counters {
                new_flows: 3 * s,
                forwarded: 0,
                answered: 0,
            };
            assert_eq!(d.observe(at(t0, s), probes, true), None);
        }
    }

    #[test]
    fn late_answers_here_and_there_do_not_hide_a_broken_path() {
        let t0 = Instant::now();
        let mut d = Detector::default();
        d.observe(t0, c(0, 0), true);
        let mut found = None;
        for s in 1..=12 {
            // A new attempt every 2 s, one late answer every 4 s.
            let change = d.observe(at(t0, s), c(s / 2, s / 4), true);
            if matches!(change, Some(Change::Found(_))) {
                found = Some(s);
            }
        }
        assert!(found.is_some_and(|s| s <= 8), "found at {found:?}");
    }

    #[test]
    fn a_healthy_path_is_never_found_busy_idle_or_uploading() {
        let t0 = Instant::now();
        let mut d = Detector::default();
        for s in 0..60 {
            // Busy: every connection answered several times.
            assert_eq!(d.observe(at(t0, s), c(5 * s, 20 * s), true), None);
        }
        for s in 60..120 {
            // Idle.
            assert_eq!(d.observe(at(t0, s), c(300, 1200), true), None);
        }
        for s in 120..180 {
            // One long upload: no new connection, few answers.
            assert_eq!(
                d.observe(at(t0, s), c(301, 1201 + (s - 120) / 10), true),
                None
            );
        }
        // Two unanswered connections are not enough.
        assert_eq!(d.observe(at(t0, 181), c(303, 1206), true), None);
        assert!(d.finding().is_none());
    }

    #[test]
    fn backends_failing_their_checks_explain_the_silence() {
        let t0 = Instant::now();
        let mut d = Detector::default();
        d.observe(t0, c(0, 0), false);
        for s in 1..6 {
            assert_eq!(d.observe(at(t0, s), c(s, 0), false), None);
        }
        assert!(matches!(
            d.observe(at(t0, 6), c(6, 0), true),
            Some(Change::Found(_))
        ));
        assert_eq!(d.observe(at(t0, 7), c(7, 0), false), Some(Change::Cleared));
    }

    #[test]
    fn counters_that_go_back_start_afresh() {
        let t0 = Instant::now();
        let mut d = Detector::default();
        for s in 0..6 {
            d.observe(at(t0, s), c(s, 0), true);
        }
        assert!(d.finding().is_some());
        assert_eq!(d.observe(at(t0, 6), c(0, 0), true), None);
        assert_eq!(d.observe(at(t0, 7), c(1, 1), true), Some(Change::Cleared));
    }

    #[test]
    fn the_reason_names_the_remedy_for_veth() {
        let t0 = Instant::now();
        let f = Finding {
            since: t0,
            new_flows: 7,
            answered: 1,
            over: Duration::from_secs(6),
            confirmed: at(t0, 6),
        };
        let text = reason("eth0", &f, true);
        assert!(text.contains("7 new connections"), "{text}");
        assert!(text.contains("last 6 s and 1 of"), "{text}");
        assert!(text.contains("XDP program to the peer"), "{text}");
        assert!(text.contains("tx off"), "{text}");
        assert!(!reason("ens33", &f, false).contains("veth"));
    }

    #[test]
    fn the_accumulator_counts_eligible_backends_from_their_second_sample() {
        let mut a = Accumulator::default();
        let eligible: std::collections::HashSet<&str> = ["b1", "b2"].into();
        assert_eq!(a.add(&[("b1", 100), ("b2", 50)], &eligible, 0), 0);
        assert_eq!(a.add(&[("b1", 103), ("b2", 51)], &eligible, 0), 4);
        // b3 not eligible (down, local or UDP); b2 removed; b4 appears with
        // an earlier backend's counts (a reused id): nothing at once.
        assert_eq!(
            a.add(&[("b1", 104), ("b3", 900), ("b4", 7000)], &eligible, 0),
            5
        );
        let eligible: std::collections::HashSet<&str> = ["b1", "b4"].into();
        assert_eq!(a.add(&[("b1", 104), ("b4", 7002)], &eligible, 0), 7);
        // The maps were replaced: totals went back, nothing added.
        assert_eq!(a.add(&[("b1", 0), ("b4", 0)], &eligible, 0), 7);
        // Three new flows, one of them a midstream pickup (an RST).
        assert_eq!(a.add(&[("b1", 3), ("b4", 0)], &eligible, 1), 9);
    }
}
