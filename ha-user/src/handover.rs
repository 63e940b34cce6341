//! What outlives the agent, and how the next agent takes it over
//! (docs/operations.md, "Restarts and upgrades").
//!
//! The pin directory (`/sys/fs/bpf/ha-lb/[netns-<inode>/]<iface>`) holds:
//!
//! ```text
//!  link         the XDP bpf_link: the program stays attached while no agent runs
//!  CONNTRACK    flows             ┐ the flow tables, adopted together when their
//!  REVERSE_NAT  reverse NAT       │ layout version, kinds and sizes fit
//!  BACKENDS     backend records   ┘
//!  AGENT        this record: layout version, VIP addresses the agent added,
//!               backends' health and drains, VRRP state, forwarding's old value
//! ```
//!
//! The decisions here are pure; `dataplane` does the bpffs and bpf(2) work.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr},
    time::Duration,
};

use ha_common::{addr_from_wire, addr_to_wire};

use crate::{
    health::Health,
    ip::{NotIpv4, ipv4},
};

/// Version of the pinned layout: the flow tables' key and value structs and
/// what their fields mean, and this record's. A build with another version
/// does not adopt the tables (it migrates them or refuses, see [`plan_tables`]).
/// Pins written before versions existed have the layout of version 1.
pub const LAYOUT_VERSION: u32 = 1;
/// The pinned XDP link, in the pin directory.
pub const LINK_PIN: &str = "link";
/// The agent's record, in the pin directory.
pub const RECORD_PIN: &str = "AGENT";
/// Room in the record: addresses plus backends of every VIP, with margin.
pub const RECORD_ENTRIES: u32 = 16_384;

const KIND_LAYOUT: u8 = 1;
const KIND_VRRP: u8 = 2;
const KIND_ADDRESS: u8 = 3;
const KIND_BACKEND: u8 = 4;
const KIND_FORWARDING: u8 = 5;
const KIND_NEIGHBOUR: u8 = 6;
const KIND_PROGRAM: u8 = 7;
const KIND_NAT: u8 = 8;

/// A key of the pinned record (BPF hash map, user space only). Addresses are
/// in network byte order, ports in host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RecordKey {
    pub kind: u8,
    pub protocol: u8,
    pub vip_port: u16,
    pub vip_addr: u32,
    pub backend_addr: u32,
    pub backend_port: u16,
    pub _pad: u16,
}
const _: () = assert!(std::mem::size_of::<RecordKey>() == 16);

/// A value of the pinned record: a number and a second one (a
/// CLOCK_MONOTONIC time in ns for VRRP, the program id for the program).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecordValue {
    pub value: u64,
    pub time_ns: u64,
}
const _: () = assert!(std::mem::size_of::<RecordValue>() == 16);

// SAFETY: plain `#[repr(C)]` integers with explicit padding, no invalid bit patterns.
unsafe impl aya::Pod for RecordKey {}
// SAFETY: as above.
unsafe impl aya::Pod for RecordValue {}

/// One backend of one VIP, by addresses: VIP names may change between configs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BackendRef {
    pub vip: Ipv4Addr,
    pub vip_port: u16,
    pub protocol: u8,
    pub address: Ipv4Addr,
    pub port: u16,
}

impl BackendRef {
    /// The reference of a backend the agent names by [`IpAddr`]: the
    /// record's layout (pinned, `LAYOUT_VERSION`) stores IPv4 addresses, so
    /// the conversion happens here, at its boundary.
    ///
    /// # Errors
    /// An IPv6 VIP or backend (validation refuses them first).
    pub fn of(
        vip: IpAddr,
        vip_port: u16,
        protocol: u8,
        address: IpAddr,
        port: u16,
    ) -> Result<Self, NotIpv4> {
        Ok(Self {
            vip: ipv4(vip)?,
            vip_port,
            protocol,
            address: ipv4(address)?,
            port,
        })
    }
}

/// `addresses` as the record stores them (IPv4, its pinned layout). An
/// IPv6 address, which validation refuses before any is added to the host,
/// has no place in the record and is left out.
pub fn ipv4_set(addresses: &BTreeSet<IpAddr>) -> BTreeSet<Ipv4Addr> {
    addresses.iter().filter_map(|a| ipv4(*a).ok()).collect()
}

/// What the last agent knew of a backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendRecord {
    pub health: Health,
    /// Drained by an operator (`ha-user drain`).
    pub drained: bool,
}

/// The last agent's VRRP state, when it last held it (CLOCK_MONOTONIC ns),
/// and the advertisement interval its last advert told the backups (the
/// restart hold when it stopped with the keep intent).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VrrpRecord {
    pub master: bool,
    pub at_ns: u64,
    pub announced: Duration,
}

/// The agent's state that a restart must not forget.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Record {
    /// The flow tables' layout version; `None` for pins older than versions.
    pub layout: Option<u32>,
    pub vrrp: Option<VrrpRecord>,
    /// VIP addresses an agent added (and so removes when it releases them).
    pub addresses: BTreeSet<Ipv4Addr>,
    /// Managed neighbour entries an agent added for backends.
    pub neighbours: BTreeSet<Ipv4Addr>,
    /// The interface's `forwarding` before an agent switched it on.
    pub forwarding_was: Option<bool>,
    pub backends: BTreeMap<BackendRef, BackendRecord>,
    /// The program the pinned link runs, as the agent that attached it
    /// recorded: a new agent knows it as ha-lb's without looking programs up
    /// by id (which needs CAP_SYS_ADMIN).
    pub program: Option<ProgramRecord>,
    /// The NAT source that program creates flows with (`settings.nat[0]`):
    /// a new agent keeps it live, so flows the old program creates while
    /// the new one starts are translated after the switch too.
    pub nat: Option<ha_common::NatRange>,
}

/// A program by its kernel id and tag.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProgramRecord {
    pub id: u32,
    pub tag: u64,
}

fn health_code(health: Health) -> u64 {
    match health {
        Health::Up => 0,
        Health::Draining => 1,
        Health::Down => 2,
    }
}

fn health_of(code: u64) -> Health {
    match code & 0xff {
        0 => Health::Up,
        1 => Health::Draining,
        _ => Health::Down,
    }
}

const DRAINED: u64 = 1 << 8;

impl Record {
    /// The record as map entries.
    pub fn entries(&self) -> BTreeMap<RecordKey, RecordValue> {
        let mut entries = BTreeMap::new();
        let key = |kind| RecordKey {
            kind,
            ..RecordKey::default()
        };
        if let Some(layout) = self.layout {
            entries.insert(
                key(KIND_LAYOUT),
                RecordValue {
                    value: layout.into(),
                    time_ns: 0,
                },
            );
        }
        if let Some(vrrp) = self.vrrp {
            entries.insert(
                key(KIND_VRRP),
                RecordValue {
                    value: u64::from(vrrp.master)
                        | (u64::try_from(vrrp.announced.as_millis()).unwrap_or(0) << 8),
                    time_ns: vrrp.at_ns,
                },
            );
        }
        if let Some(program) = self.program {
            entries.insert(
                key(KIND_PROGRAM),
                RecordValue {
                    value: program.tag,
                    time_ns: program.id.into(),
                },
            );
        }
        if let Some(nat) = self.nat {
            entries.insert(
                RecordKey {
                    vip_addr: nat.addr,
                    ..key(KIND_NAT)
                },
                RecordValue {
                    value: u64::from(nat.port_min) | (u64::from(nat.port_max) << 16),
                    time_ns: 0,
                },
            );
        }
        if let Some(was) = self.forwarding_was {
            entries.insert(
                key(KIND_FORWARDING),
                RecordValue {
                    value: was.into(),
                    time_ns: 0,
                },
            );
        }
        for address in &self.addresses {
            entries.insert(
                RecordKey {
                    vip_addr: addr_to_wire(address.octets()),
                    ..key(KIND_ADDRESS)
                },
                RecordValue::default(),
            );
        }
        for address in &self.neighbours {
            entries.insert(
                RecordKey {
                    backend_addr: addr_to_wire(address.octets()),
                    ..key(KIND_NEIGHBOUR)
                },
                RecordValue::default(),
            );
        }
        for (backend, record) in &self.backends {
            entries.insert(
                RecordKey {
                    kind: KIND_BACKEND,
                    protocol: backend.protocol,
                    vip_port: backend.vip_port,
                    vip_addr: addr_to_wire(backend.vip.octets()),
                    backend_addr: addr_to_wire(backend.address.octets()),
                    backend_port: backend.port,
                    _pad: 0,
                },
                RecordValue {
                    value: health_code(record.health) | if record.drained { DRAINED } else { 0 },
                    time_ns: 0,
                },
            );
        }
        entries
    }

    /// The record from map entries; entries of kinds this build does not
    /// know are ignored.
    pub fn from_entries(entries: impl IntoIterator<Item = (RecordKey, RecordValue)>) -> Self {
        let mut record = Record::default();
        for (key, value) in entries {
            match key.kind {
                KIND_LAYOUT => record.layout = u32::try_from(value.value).ok(),
                KIND_VRRP => {
                    record.vrrp = Some(VrrpRecord {
                        master: value.value & 1 == 1,
                        at_ns: value.time_ns,
                        announced: Duration::from_millis(value.value >> 8),
                    })
                }
                KIND_FORWARDING => record.forwarding_was = Some(value.value == 1),
                KIND_NAT => {
                    record.nat = Some(ha_common::NatRange {
                        addr: key.vip_addr,
                        port_min: value.value as u16,
                        port_max: (value.value >> 16) as u16,
                    })
                }
                KIND_PROGRAM => {
                    record.program = u32::try_from(value.time_ns).ok().map(|id| ProgramRecord {
                        id,
                        tag: value.value,
                    })
                }
                KIND_ADDRESS => {
                    record
                        .addresses
                        .insert(Ipv4Addr::from(addr_from_wire(key.vip_addr)));
                }
                KIND_NEIGHBOUR => {
                    record
                        .neighbours
                        .insert(Ipv4Addr::from(addr_from_wire(key.backend_addr)));
                }
                KIND_BACKEND => {
                    record.backends.insert(
                        BackendRef {
                            vip: Ipv4Addr::from(addr_from_wire(key.vip_addr)),
                            vip_port: key.vip_port,
                            protocol: key.protocol,
                            address: Ipv4Addr::from(addr_from_wire(key.backend_addr)),
                            port: key.backend_port,
                        },
                        BackendRecord {
                            health: health_of(value.value),
                            drained: value.value & DRAINED != 0,
                        },
                    );
                }
                _ => {}
            }
        }
        record
    }
}

/// How this agent came to run the data path (status, `/metrics`); the
/// serde spelling is the label.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StartKind {
    /// No pinned link: the program was attached now.
    #[default]
    Fresh,
    /// A pinned link ran the same program (same tag); it was replaced in place
    /// by this agent's instance of it, with this agent's VIP tables.
    Adopted,
    /// A pinned link ran another program (another tag); it was replaced in place.
    Upgraded,
}

impl std::fmt::Display for StartKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.label())
    }
}

impl StartKind {
    pub fn label(self) -> &'static str {
        match self {
            StartKind::Fresh => "fresh",
            StartKind::Adopted => "adopted",
            StartKind::Upgraded => "upgraded",
        }
    }

    pub fn of(previous_tag: Option<u64>, tag: u64) -> Self {
        match previous_tag {
            None => StartKind::Fresh,
            Some(previous) if previous == tag => StartKind::Adopted,
            Some(_) => StartKind::Upgraded,
        }
    }
}

/// A program tag as bpftool prints it (16 hex digits).
pub fn tag_hex(tag: u64) -> String {
    format!("{tag:016x}")
}

/// The flow tables found in the pin directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TablesFound {
    /// The layout version the record names (`None`: pins older than versions).
    pub layout: Option<u32>,
    /// Live entries in the pinned connection table.
    pub flows: usize,
    /// Why a table cannot be adopted or migrated (kind, key or value size,
    /// missing), one line per table; empty when none.
    pub misfits: Vec<String>,
    /// Tables that differ only in their number of entries (a new
    /// `conntrack.max_flows`): `(name, pinned, wanted)`. Their entries are
    /// copied into new tables of the wanted size.
    pub resized: Vec<(String, u32, u32)>,
}

/// What the agent does with the pinned flow tables.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TablesPlan {
    /// Nothing pinned: new, empty tables.
    Fresh,
    /// Same layout, kinds and sizes: the tables are used as they are.
    Adopt { flows: usize },
    /// Same layout and kinds, other sizes, and the flows fit: the resized
    /// tables are made anew and their entries copied over, before and again
    /// right after the program switch.
    Migrate {
        flows: usize,
        resized: Vec<(String, u32, u32)>,
    },
    /// They do not fit and hold no flow, or the operator accepted the loss:
    /// they are removed and new ones made.
    Replace { flows: usize, reason: String },
}

/// Why the pinned tables are not taken over.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "the pinned flow tables hold {flows} flows that this agent cannot adopt: {reason}. \
     Starting would drop every one of those connections; the program attached now keeps \
     serving them meanwhile. Start the previous version again, or accept the loss with \
     `--accept-flow-loss`"
)]
pub struct WouldDropFlows {
    pub flows: usize,
    pub reason: String,
}

/// Decides what happens to the pinned flow tables (`found`; `None` when
/// there are none). Tables that do not fit are replaced only when they hold
/// no flow or `accept_flow_loss`; otherwise nothing is changed.
///
/// # Errors
/// [`WouldDropFlows`] when live flows would be lost without consent.
pub fn plan_tables(
    found: Option<&TablesFound>,
    accept_flow_loss: bool,
) -> Result<TablesPlan, WouldDropFlows> {
    let Some(found) = found else {
        return Ok(TablesPlan::Fresh);
    };
    let layout = found.layout.unwrap_or(1);
    let too_small = found
        .resized
        .iter()
        .find(|(_, _, wanted)| found.flows > *wanted as usize);
    let reason = if layout != LAYOUT_VERSION {
        Some(format!(
            "they have layout version {layout}, this build version {LAYOUT_VERSION}"
        ))
    } else if !found.misfits.is_empty() {
        Some(found.misfits.join("; "))
    } else if let Some((name, _, wanted)) = too_small {
        Some(format!(
            "{name} would have {wanted} entries, fewer than the {} flows",
            found.flows
        ))
    } else {
        None
    };
    match reason {
        None if found.resized.is_empty() => Ok(TablesPlan::Adopt { flows: found.flows }),
        None => Ok(TablesPlan::Migrate {
            flows: found.flows,
            resized: found.resized.clone(),
        }),
        Some(reason) if found.flows == 0 || accept_flow_loss => Ok(TablesPlan::Replace {
            flows: found.flows,
            reason,
        }),
        Some(reason) => Err(WouldDropFlows {
            flows: found.flows,
            reason,
        }),
    }
}

/// What a restarted VRRP instance does first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VrrpStart {
    /// As RFC 9568 6.4.1: backup for a Master_Down_Interval.
    Backup,
    /// The last agent was master moments ago, sooner than any backup can have
    /// taken over (3 advertisement intervals): master again at once, with an
    /// advertisement, so the peers' timers never fire.
    ResumeMaster,
}

/// How a new VRRP instance starts, from the record the last agent left:
/// it resumes as master only if that agent was master and the gap since it
/// last confirmed so is shorter than three advertisement intervals minus
/// `margin` (the time the new agent still needs to send its first
/// advertisement). The interval is the one the backups were last told (the
/// restart hold after a keep stop), at least `advert_interval`; a backup's
/// Master_Down_Interval is at least three of it (RFC 9568 6.1), so no
/// backup has become master yet.
pub fn vrrp_start(
    record: Option<VrrpRecord>,
    now_ns: u64,
    advert_interval: Duration,
    margin: Duration,
) -> VrrpStart {
    match record {
        Some(VrrpRecord {
            master: true,
            at_ns,
            announced,
        }) if now_ns >= at_ns => {
            let gap = Duration::from_nanos(now_ns - at_ns);
            if gap + margin < announced.max(advert_interval) * 3 {
                VrrpStart::ResumeMaster
            } else {
                VrrpStart::Backup
            }
        }
        _ => VrrpStart::Backup,
    }
}

/// How long a VIP address kept by an agent that stops with the keep intent
/// while VRRP master stays valid: until a peer has surely taken over (its
/// Master_Down_Interval, at most four of our intervals), so a host whose
/// agent does not come back stops answering ARP for the VIP by itself.
/// Whole seconds (the kernel's unit), at least 1.
pub fn kept_address_lifetime(advert_interval: Duration) -> u32 {
    let bound = advert_interval * 4;
    u32::try_from(bound.as_millis().div_ceil(1000))
        .unwrap_or(u32::MAX)
        .max(1)
}

/// The lifetime, in whole seconds, of a VIP address a VRRP master holds:
/// renewed every 0.5 s while its agent runs, so a master whose agent is
/// killed (no last advert, no clean-up) stops answering ARP for the VIP by
/// itself soon after a backup took over, instead of for good. Four
/// advertisement intervals, at least 5 s: a busy event loop must not let it
/// lapse.
pub fn held_address_lease(advert_interval: Duration) -> u32 {
    kept_address_lifetime(advert_interval).max(5)
}

/// What an agent does when it stops (SIGTERM/SIGINT, `ha-user stop`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StopIntent {
    /// The host goes out of service: VRRP priority 0 (a peer takes over at
    /// once), VIP addresses and neighbour entries removed, program detached,
    /// pins removed.
    #[default]
    Release,
    /// The agent restarts or is upgraded in place: program, flow tables and
    /// VIP addresses stay, and the data path goes on serving the last desired
    /// state until the next agent adopts it.
    Keep,
}

impl std::fmt::Display for StopIntent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.label())
    }
}

impl StopIntent {
    pub fn label(self) -> &'static str {
        match self {
            StopIntent::Release => "release",
            StopIntent::Keep => "keep",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Record {
        let mut record = Record {
            layout: Some(LAYOUT_VERSION),
            vrrp: Some(VrrpRecord {
                master: true,
                at_ns: 123_456_789,
                announced: Duration::from_secs(10),
            }),
            forwarding_was: Some(false),
            program: Some(ProgramRecord {
                id: 42,
                tag: 0x0123_4567_89ab_cdef,
            }),
            nat: Some(ha_common::NatRange {
                addr: addr_to_wire([10, 0, 0, 2]),
                port_min: 10000,
                port_max: 32767,
            }),
            ..Record::default()
        };
        record.addresses.insert(Ipv4Addr::new(10, 0, 0, 100));
        record.addresses.insert(Ipv4Addr::new(10, 0, 0, 101));
        record.neighbours.insert(Ipv4Addr::new(10, 0, 1, 1));
        for (i, health) in [Health::Up, Health::Draining, Health::Down]
            .into_iter()
            .enumerate()
        {
            record.backends.insert(
                BackendRef {
                    vip: Ipv4Addr::new(10, 0, 0, 100),
                    vip_port: 6443,
                    protocol: 6,
                    address: Ipv4Addr::new(10, 0, 1, i as u8 + 1),
                    port: 6443,
                },
                BackendRecord {
                    health,
                    drained: i == 1,
                },
            );
        }
        record
    }

    #[test]
    fn backend_refs_and_address_sets_convert_to_the_ipv4_record_at_its_boundary() {
        let v4 = |last: u8| IpAddr::from([10, 0, 0, last]);
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        assert_eq!(
            BackendRef::of(v4(100), 6443, 6, v4(11), 6443),
            Ok(BackendRef {
                vip: Ipv4Addr::new(10, 0, 0, 100),
                vip_port: 6443,
                protocol: 6,
                address: Ipv4Addr::new(10, 0, 0, 11),
                port: 6443,
            })
        );
        assert!(BackendRef::of(v6, 6443, 6, v4(11), 6443).is_err());
        assert!(BackendRef::of(v4(100), 6443, 6, v6, 6443).is_err());
        assert_eq!(
            ipv4_set(&BTreeSet::from([v4(100), v6])),
            BTreeSet::from([Ipv4Addr::new(10, 0, 0, 100)])
        );
    }

    #[test]
    fn a_record_reads_back_as_written() {
        let record = sample();
        let entries = record.entries();
        assert_eq!(entries.len(), 1 + 1 + 1 + 1 + 1 + 2 + 1 + 3);
        assert_eq!(Record::from_entries(entries), record);
        assert_eq!(Record::from_entries([]), Record::default());
    }

    #[test]
    fn entries_of_unknown_kinds_are_ignored() {
        let mut entries: Vec<_> = sample().entries().into_iter().collect();
        entries.push((
            RecordKey {
                kind: 200,
                ..RecordKey::default()
            },
            RecordValue {
                value: 7,
                time_ns: 7,
            },
        ));
        assert_eq!(Record::from_entries(entries), sample());
    }

    fn found(layout: Option<u32>, flows: usize, misfits: &[&str]) -> TablesFound {
        TablesFound {
            layout,
            flows,
            misfits: misfits.iter().map(|m| m.to_string()).collect(),
            resized: Vec::new(),
        }
    }

    #[test]
    fn resized_tables_are_migrated_when_the_flows_fit() {
        let resized = |to| TablesFound {
            resized: vec![("CONNTRACK".to_string(), 1000, to)],
            ..found(Some(LAYOUT_VERSION), 500, &[])
        };
        assert_eq!(
            plan_tables(Some(&resized(2000)), false),
            Ok(TablesPlan::Migrate {
                flows: 500,
                resized: vec![("CONNTRACK".to_string(), 1000, 2000)]
            })
        );
        assert_eq!(
            plan_tables(Some(&resized(600)), false),
            Ok(TablesPlan::Migrate {
                flows: 500,
                resized: vec![("CONNTRACK".to_string(), 1000, 600)]
            }),
            "smaller, and the flows still fit"
        );
        let refused = plan_tables(Some(&resized(400)), false).unwrap_err();
        assert!(refused.reason.contains("400 entries"), "{refused}");
        assert!(matches!(
            plan_tables(Some(&resized(400)), true),
            Ok(TablesPlan::Replace { flows: 500, .. })
        ));
        // Another layout is never migrated by size alone.
        let other = TablesFound {
            layout: Some(LAYOUT_VERSION + 1),
            ..resized(2000)
        };
        assert!(plan_tables(Some(&other), false).is_err());
    }

    #[test]
    fn fitting_tables_are_adopted_and_unversioned_ones_are_version_one() {
        assert_eq!(plan_tables(None, false), Ok(TablesPlan::Fresh));
        for layout in [Some(LAYOUT_VERSION), None] {
            assert_eq!(
                plan_tables(Some(&found(layout, 12, &[])), false),
                Ok(TablesPlan::Adopt { flows: 12 })
            );
        }
    }

    #[test]
    fn tables_that_do_not_fit_are_replaced_only_when_empty_or_the_loss_is_accepted() {
        let misfit = found(
            Some(LAYOUT_VERSION),
            3,
            &["CONNTRACK: 16-byte keys, 24 wanted"],
        );
        let refused = plan_tables(Some(&misfit), false).unwrap_err();
        assert_eq!(refused.flows, 3);
        assert!(
            refused.to_string().contains("--accept-flow-loss"),
            "{refused}"
        );
        assert!(refused.reason.contains("CONNTRACK"), "{refused}");
        assert!(matches!(
            plan_tables(Some(&misfit), true),
            Ok(TablesPlan::Replace { flows: 3, .. })
        ));
        let empty = found(Some(LAYOUT_VERSION), 0, &["CONNTRACK: kind"]);
        assert!(matches!(
            plan_tables(Some(&empty), false),
            Ok(TablesPlan::Replace { flows: 0, .. })
        ));
        let other_layout = found(Some(LAYOUT_VERSION + 1), 5, &[]);
        let refused = plan_tables(Some(&other_layout), false).unwrap_err();
        assert!(refused.reason.contains("layout version"), "{refused}");
    }

    #[test]
    fn vrrp_resumes_as_master_only_within_three_intervals_of_the_last_master() {
        let second = 1_000_000_000u64;
        let interval = Duration::from_secs(1);
        let margin = Duration::from_millis(500);
        let master = |at_ns| {
            Some(VrrpRecord {
                master: true,
                at_ns,
                announced: Duration::ZERO,
            })
        };
        assert_eq!(
            vrrp_start(master(10 * second), 12 * second, interval, margin),
            VrrpStart::ResumeMaster
        );
        assert_eq!(
            vrrp_start(
                master(10 * second),
                12 * second + second / 2,
                interval,
                margin
            ),
            VrrpStart::Backup,
            "2.5 s + 0.5 s margin is not under 3 intervals"
        );
        assert_eq!(
            vrrp_start(
                Some(VrrpRecord {
                    master: false,
                    at_ns: 10 * second,
                    announced: Duration::ZERO,
                }),
                10 * second,
                interval,
                margin
            ),
            VrrpStart::Backup
        );
        assert_eq!(
            vrrp_start(None, second, interval, margin),
            VrrpStart::Backup
        );
        // A record from the future (another boot's clock): never trusted.
        assert_eq!(
            vrrp_start(master(20 * second), second, interval, margin),
            VrrpStart::Backup
        );
        // 100 ms adverts: a restart can never be back within 300 ms...
        let fast = Duration::from_millis(100);
        assert_eq!(
            vrrp_start(master(10 * second), 10 * second + second / 5, fast, margin),
            VrrpStart::Backup
        );
        // ...unless the last advert announced a 10 s restart hold: 30 s.
        let held = Some(VrrpRecord {
            master: true,
            at_ns: 10 * second,
            announced: Duration::from_secs(10),
        });
        assert_eq!(
            vrrp_start(held, 35 * second, fast, margin),
            VrrpStart::ResumeMaster
        );
        assert_eq!(
            vrrp_start(held, 40 * second, fast, margin),
            VrrpStart::Backup
        );
    }

    #[test]
    fn a_kept_address_lives_four_intervals_in_whole_seconds() {
        assert_eq!(kept_address_lifetime(Duration::from_millis(100)), 1);
        assert_eq!(kept_address_lifetime(Duration::from_secs(1)), 4);
        assert_eq!(kept_address_lifetime(Duration::from_millis(1500)), 6);
    }

    #[test]
    fn a_held_address_lease_is_at_least_five_seconds() {
        assert_eq!(held_address_lease(Duration::from_millis(100)), 5);
        assert_eq!(held_address_lease(Duration::from_secs(3)), 12);
    }

    #[test]
    fn the_start_kind_follows_the_previous_tag() {
        assert_eq!(StartKind::of(None, 1), StartKind::Fresh);
        assert_eq!(StartKind::of(Some(1), 1), StartKind::Adopted);
        assert_eq!(StartKind::of(Some(2), 1), StartKind::Upgraded);
        assert_eq!(tag_hex(0xab), "00000000000000ab");
    }
}
