//! The program's counters, summed over CPUs: packets and bytes per verdict,
//! slow-path events, and traffic per VIP and per backend.

use std::net::IpAddr;

use aya::maps::{MapData, PerCpuArray};
use ha_common::{
    BACKEND_STATS_MAP, Counter, EVENTS_MAP, Event, TrafficCounter, VERDICTS_MAP, VIP_STATS_MAP,
    Verdict,
};

use super::{DataPlane, Result, map_error, writer::VipSlot};

/// Per-VIP and per-backend totals, summed over CPUs.
#[derive(Clone, Debug, Default)]
pub struct TrafficSnapshot {
    pub vips: Vec<(String, TrafficCounter)>,
    /// Keyed by backend address and port.
    pub backends: Vec<((IpAddr, u16), TrafficCounter)>,
}

impl DataPlane {
    /// Packets and bytes per verdict, summed over CPUs.
    pub fn verdicts(&self) -> Result<Vec<(Verdict, Counter)>> {
        let array: PerCpuArray<_, Counter> = self.map(VERDICTS_MAP)?;
        Verdict::ALL
            .iter()
            .map(|verdict| {
                let per_cpu = array
                    .get(&(*verdict as u32), 0)
                    .map_err(map_error(VERDICTS_MAP))?;
                let mut total = Counter::default();
                per_cpu.iter().for_each(|c| total.merge(c));
                Ok((*verdict, total))
            })
            .collect()
    }

    pub fn events(&self) -> Result<Vec<(Event, u64)>> {
        let array: PerCpuArray<_, u64> = self.map(EVENTS_MAP)?;
        Event::ALL
            .iter()
            .map(|event| {
                let per_cpu = array
                    .get(&(*event as u32), 0)
                    .map_err(map_error(EVENTS_MAP))?;
                Ok((*event, per_cpu.iter().sum()))
            })
            .collect()
    }

    pub fn event(&self, event: Event) -> Result<u64> {
        Ok(self.events()?[event as usize].1)
    }

    /// Per-VIP and per-backend traffic (client -> VIP direction).
    pub fn traffic(&self) -> Result<TrafficSnapshot> {
        let sum = |array: &PerCpuArray<&MapData, TrafficCounter>,
                   index: u32,
                   name: &'static str|
         -> Result<TrafficCounter> {
            let per_cpu = array.get(&index, 0).map_err(map_error(name))?;
            let mut total = TrafficCounter::default();
            per_cpu.iter().for_each(|c| total.merge(c));
            Ok(total)
        };
        let vip_stats: PerCpuArray<_, TrafficCounter> = self.map(VIP_STATS_MAP)?;
        let backend_stats: PerCpuArray<_, TrafficCounter> = self.map(BACKEND_STATS_MAP)?;
        let mut snapshot = TrafficSnapshot::default();
        let mut vips: Vec<&VipSlot> = self.vips.values().collect();
        vips.sort_by_key(|v| v.slot);
        for vip in vips {
            snapshot
                .vips
                .push((vip.name.clone(), sum(&vip_stats, vip.slot, VIP_STATS_MAP)?));
        }
        for ((address, port), id) in &self.backend_ids {
            snapshot.backends.push((
                (IpAddr::V4(*address), *port),
                sum(&backend_stats, *id, BACKEND_STATS_MAP)?,
            ));
        }
        Ok(snapshot)
    }
}
