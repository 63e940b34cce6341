//! Fault injection for the lab's tests: with the `test-hooks` feature, the
//! file that `HA_LB_FAULTS` names lists fault points, one per line, and a
//! point listed there fails where the code passes it. A test writes the file
//! while the agent runs to make a real host step fail part-way (a reload
//! that must then put the running config back). Without the feature, or
//! without the variable, every point passes.
//!
//! Points: `vip-address-added` (after a VIP address was added to the
//! interface, as if the next netlink request had failed) and
//! `data-plane-written` (after a reload wrote the new config's tables, as
//! if the last map write had failed).

/// A fault point the test listed was reached.
#[derive(Debug, thiserror::Error)]
#[error("injected fault at {point} (HA_LB_FAULTS, a test hook)")]
pub struct InjectedFault {
    pub point: &'static str,
}

/// Passes unless the fault file lists `point`.
///
/// # Errors
/// [`InjectedFault`] when the test asked for a fault here.
pub fn point(point: &'static str) -> Result<(), InjectedFault> {
    #[cfg(feature = "test-hooks")]
    if let Some(path) = std::env::var_os("HA_LB_FAULTS")
        && let Ok(listed) = std::fs::read_to_string(path)
        && listed.lines().any(|line| line.trim() == point)
    {
        return Err(InjectedFault { point });
    }
    let _ = point;
    Ok(())
}
