//! What a pin directory holds, read without changing anything (the link and
//! the program it runs, the flow tables and whether they fit, the agent
//! record), and the pin files themselves: staged `<NAME>_NEW` pins and
//! their removal.

use std::path::{Path, PathBuf};

use aya::{
    maps::{HashMap as BpfHashMap, MapData, MapError},
    programs::links::{FdLink, PinnedLink},
};
use ha_common::{
    BACKENDS_MAP, BackendInfo, CONNTRACK_MAP, Flow, FlowKey, NatEntry, NatKey, REVERSE_NAT_MAP,
    XDP_PROGRAM_NAME,
};
use tracing::warn;

use super::{DataPlaneError, LoadOptions, Result, map_error};
use crate::handover::{
    self, LINK_PIN, RECORD_ENTRIES, RECORD_PIN, Record, RecordKey, RecordValue, TablesFound,
    TablesPlan,
};

/// Maps pinned so a restarted agent finds its flows: their entries name
/// backends by id, so the backend table goes with them.
pub(super) const PINNED_MAPS: [&str; 3] = [CONNTRACK_MAP, REVERSE_NAT_MAP, BACKENDS_MAP];

/// The program a pinned link runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkFound {
    pub program_id: u32,
    pub program_name: String,
    pub program_tag: u64,
}

/// What a pin directory holds, read without changing anything.
#[derive(Clone, Debug, Default)]
pub struct PinnedState {
    pub link: Option<LinkFound>,
    /// `None` when no flow table is pinned.
    pub tables: Option<TablesFound>,
    pub record: Option<Record>,
}

impl PinnedState {
    /// One paragraph for `check-config` and the agent's log: what is pinned
    /// and what an agent with `options` will do with it.
    pub fn describe(&self, dir: &Path, accept_flow_loss: bool) -> String {
        let mut lines = vec![format!("pinned state in {}:", dir.display())];
        match &self.link {
            Some(link) => lines.push(format!(
                "  program {} (tag {}, id {}) attached through the pinned link: the new agent \
                 replaces it in place (bpf_link_update), no packet meets an empty interface",
                link.program_name,
                handover::tag_hex(link.program_tag),
                link.program_id
            )),
            None => lines.push("  no pinned link: the program is attached anew".to_string()),
        }
        lines.push(
            match handover::plan_tables(self.tables.as_ref(), accept_flow_loss) {
                Ok(TablesPlan::Fresh) => "  no pinned flow tables: they start empty".to_string(),
                Ok(TablesPlan::Adopt { flows }) => format!(
                    "  flow tables (layout version {}) adopted with their {flows} flows",
                    handover::LAYOUT_VERSION
                ),
                Ok(TablesPlan::Migrate { flows, resized }) => format!(
                    "  flow tables resized ({}): their {flows} flows are copied into the new ones",
                    describe_resized(&resized)
                ),
                Ok(TablesPlan::Replace { flows, reason }) => format!(
                    "  flow tables REPLACED by empty ones ({reason}): {flows} flows are lost"
                ),
                Err(refusal) => format!("  REFUSED: {refusal}"),
            },
        );
        if let Some(record) = &self.record {
            lines.push(format!(
                "  agent record: {} VIP addresses added by ha-lb, {} backends' health and drains{}",
                record.addresses.len(),
                record.backends.len(),
                match record.vrrp {
                    Some(v) if v.master => ", last VRRP state master",
                    Some(_) => ", last VRRP state backup",
                    None => "",
                }
            ));
        }
        lines.join("\n")
    }
}

/// Reads what `dir` holds: the link and the program it runs, the flow
/// tables (do they fit `options`, how many flows), the agent record.
///
/// # Errors
/// [`DataPlaneError::PinnedLink`] when the pinned link cannot be read or runs
/// a program that is not ha-lb's.
pub fn inspect_pins(dir: &Path, options: &LoadOptions) -> Result<PinnedState> {
    inspect_and_open(dir, options).map(|(state, _)| state)
}

/// [`inspect_pins`], and the pinned link itself, opened once.
pub(super) fn inspect_and_open(
    dir: &Path,
    options: &LoadOptions,
) -> Result<(PinnedState, Option<FdLink>)> {
    let pinned: Vec<(&str, PathBuf)> = PINNED_MAPS
        .iter()
        .map(|name| (*name, dir.join(name)))
        .filter(|(_, path)| path.exists())
        .collect();
    let record_path = dir.join(RECORD_PIN);
    let record = if record_path.exists() {
        match open_record(&record_path) {
            Ok(map) => Some(read_record(&map)?),
            Err(e) => {
                warn!(pin = %record_path.display(), error = %e, "unreadable agent record; ignored");
                None
            }
        }
    } else {
        None
    };
    let link_path = dir.join(LINK_PIN);
    let (fd_link, link) = if link_path.exists() {
        let (fd_link, found) = open_pinned_link(&link_path, record.as_ref())?;
        (Some(fd_link), Some(found))
    } else {
        (None, None)
    };
    let tables = (!pinned.is_empty()).then(|| {
        let mut misfits: Vec<String> = PINNED_MAPS
            .iter()
            .filter(|name| !pinned.iter().any(|(n, _)| n == *name))
            .map(|name| format!("{name} is missing"))
            .collect();
        let mut resized = Vec::new();
        for (name, path) in &pinned {
            match pin_misfit(name, path, &pinned_layout(name, options)) {
                None => {}
                Some(Misfit::Entries { pinned, wanted }) => {
                    resized.push((name.to_string(), pinned, wanted))
                }
                Some(Misfit::Structure(why)) => misfits.push(why),
            }
        }
        let flows = pinned
            .iter()
            .find(|(name, _)| *name == CONNTRACK_MAP)
            .map_or(0, |(_, path)| count_entries(path));
        TablesFound {
            layout: record.as_ref().and_then(|r| r.layout),
            flows,
            misfits,
            resized,
        }
    });
    let state = PinnedState {
        link,
        tables,
        record,
    };
    Ok((state, fd_link))
}

/// Opens the pinned link and says which program it runs: the one the agent
/// record names when the ids match, else one looked up by id (which needs
/// CAP_SYS_ADMIN); a program that is not ha-lb's is refused.
fn open_pinned_link(path: &Path, record: Option<&Record>) -> Result<(FdLink, LinkFound)> {
    let error = |reason: String| DataPlaneError::PinnedLink {
        path: path.display().to_string(),
        reason,
    };
    let link: FdLink = PinnedLink::from_pin(path)
        .map_err(|e| error(e.to_string()))?
        .into();
    let info = link.info().map_err(|e| error(e.to_string()))?;
    if info.link_type().ok() != Some(aya::programs::links::LinkType::Xdp) {
        return Err(error("not an XDP link".to_string()));
    }
    let program_id = info.program_id();
    if let Some(program) = record.and_then(|r| r.program)
        && program.id == program_id
    {
        return Ok((
            link,
            LinkFound {
                program_id,
                program_name: XDP_PROGRAM_NAME.to_string(),
                program_tag: program.tag,
            },
        ));
    }
    let program = aya::programs::loaded_programs()
        .filter_map(|p| p.ok())
        .find(|p| p.id() == program_id)
        .ok_or_else(|| {
            error(format!(
                "it runs program id {program_id}, which the agent record does not name and \
                 which cannot be looked up (that needs CAP_SYS_ADMIN): not touching it; \
                 `ha-user detach` removes it"
            ))
        })?;
    let program_name = program.name_as_str().unwrap_or("").to_string();
    if program_name != XDP_PROGRAM_NAME {
        return Err(error(format!(
            "it runs program {program_name:?} (id {program_id}), not ha-lb's {XDP_PROGRAM_NAME}: \
             not touching it"
        )));
    }
    Ok((
        link,
        LinkFound {
            program_id,
            program_name,
            program_tag: program.tag(),
        },
    ))
}

pub(super) type RecordMap = BpfHashMap<MapData, RecordKey, RecordValue>;

fn open_record(path: &Path) -> Result<RecordMap, MapError> {
    let data = MapData::from_pin(path)?;
    RecordMap::try_from(aya::maps::Map::HashMap(data))
}

fn read_record(map: &RecordMap) -> Result<Record> {
    let entries: Vec<(RecordKey, RecordValue)> = map
        .iter()
        .collect::<Result<_, _>>()
        .map_err(map_error(RECORD_PIN))?;
    Ok(Record::from_entries(entries))
}

/// Entries of a pinned hash map, whatever its key size (BPF_MAP_GET_NEXT_KEY).
fn count_entries(path: &Path) -> usize {
    use std::os::fd::{AsFd, AsRawFd};
    let Ok(map) = MapData::from_pin(path) else {
        return 0;
    };
    let Ok(info) = map.info() else {
        return 0;
    };
    #[repr(C)]
    struct NextKey {
        map_fd: u32,
        _pad: u32,
        key: u64,
        next_key: u64,
    }
    const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
    let size = info.key_size() as usize;
    let (mut key, mut next) = (vec![0u8; size], vec![0u8; size]);
    let fd = map.fd().as_fd().as_raw_fd() as u32;
    let mut count = 0;
    let mut first = true;
    loop {
        let attr = NextKey {
            map_fd: fd,
            _pad: 0,
            key: if first { 0 } else { key.as_ptr() as u64 },
            next_key: next.as_mut_ptr() as u64,
        };
        // SAFETY: bpf(2) with a valid attr whose pointers outlive the call
        // and point at buffers of the map's key size.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_GET_NEXT_KEY,
                &attr as *const NextKey,
                std::mem::size_of::<NextKey>(),
            )
        };
        if rc != 0 {
            return count;
        }
        count += 1;
        first = false;
        std::mem::swap(&mut key, &mut next);
    }
}

/// What a pinned map must look like to be adopted: (kind, key size, value size, entries).
#[derive(Clone, Copy, Debug, PartialEq)]
struct PinLayout {
    kind: aya::maps::MapType,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
}

fn pinned_layout(name: &str, options: &LoadOptions) -> PinLayout {
    use aya::maps::MapType;
    use std::mem::size_of;
    let size = |n: usize| n as u32;
    match name {
        BACKENDS_MAP => PinLayout {
            kind: MapType::Array,
            key_size: 4,
            value_size: size(size_of::<BackendInfo>()),
            max_entries: ha_common::MAX_BACKENDS,
        },
        REVERSE_NAT_MAP => PinLayout {
            kind: MapType::Hash,
            key_size: size(size_of::<NatKey>()),
            value_size: size(size_of::<NatEntry>()),
            max_entries: options.reverse_entries(),
        },
        _ => PinLayout {
            kind: MapType::Hash,
            key_size: size(size_of::<FlowKey>()),
            value_size: size(size_of::<Flow>()),
            max_entries: options.table_entries(),
        },
    }
}

/// How a pinned table differs from what this build and config need.
enum Misfit {
    /// Only in its number of entries: it can be migrated.
    Entries { pinned: u32, wanted: u32 },
    /// In its kind or entry layout, or it is unreadable.
    Structure(String),
}

pub(super) fn describe_resized(resized: &[(String, u32, u32)]) -> String {
    resized
        .iter()
        .map(|(name, from, to)| format!("{name} {from} -> {to} entries"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Why a pinned table cannot be adopted as it is (`None`: it can): its
/// kind, entry layout or size differ from what this build and config need
/// (aya would otherwise reuse it as it is, and the program would misread it).
fn pin_misfit(name: &str, path: &Path, expected: &PinLayout) -> Option<Misfit> {
    match MapData::from_pin(path).and_then(|map| map.info()) {
        Ok(info)
            if info.map_type().ok() == Some(expected.kind)
                && info.key_size() == expected.key_size
                && info.value_size() == expected.value_size =>
        {
            (info.max_entries() != expected.max_entries).then_some(Misfit::Entries {
                pinned: info.max_entries(),
                wanted: expected.max_entries,
            })
        }
        Ok(info) => Some(Misfit::Structure(format!(
            "{name} is {:?} with {}-byte keys, {}-byte values and {} entries, this build and config need {:?} with {}, {} and {}",
            info.map_type().ok(),
            info.key_size(),
            info.value_size(),
            info.max_entries(),
            expected.kind,
            expected.key_size,
            expected.value_size,
            expected.max_entries
        ))),
        Err(e) => Some(Misfit::Structure(format!("{name} is unreadable ({e})"))),
    }
}

/// Opens the pinned agent record at `path`, or makes and pins a new one.
pub(super) fn record_map(path: &Path) -> Result<RecordMap> {
    let pin_error = |reason: String| DataPlaneError::Pin {
        path: path.display().to_string(),
        reason,
    };
    if path.exists() {
        match open_record(path) {
            Ok(map) => return Ok(map),
            Err(e) => {
                warn!(pin = %path.display(), error = %e, "unreadable agent record; making a new one");
                let _ = std::fs::remove_file(path);
            }
        }
    }
    RecordMap::create(RECORD_ENTRIES, 0)
        .map_err(|e| pin_error(e.to_string()))?
        .pin(path)
        .map_err(|e| pin_error(e.to_string()))?;
    open_record(path).map_err(|e| pin_error(e.to_string()))
}

/// Where a new table is pinned until the program switch commits it.
pub(super) fn staged(dir: &Path, name: &str) -> PathBuf {
    // bpffs refuses names with a dot.
    dir.join(format!("{name}_NEW"))
}

pub(super) fn remove_if_present(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Pins a new link as `name` in the pin directory, so it outlives the
/// agent; without a pin directory the link stays the agent's own.
///
/// # Errors
/// [`DataPlaneError::Pin`] naming the path.
pub(super) fn pin_link(
    link: FdLink,
    pin_dir: Option<&Path>,
    name: &str,
) -> Result<(FdLink, Option<PathBuf>)> {
    let Some(dir) = pin_dir else {
        return Ok((link, None));
    };
    let path = dir.join(name);
    let pinned = link.pin(&path).map_err(|e| DataPlaneError::Pin {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    Ok((FdLink::from(pinned), Some(path)))
}

/// Removes everything ha-lb pins in `dir` (links, flow tables, record) and
/// the directory if it is then empty. Removing the link's pin detaches the
/// program once no process holds the link.
pub fn remove_pins(dir: &Path) -> std::io::Result<()> {
    // The socket-level balancer's links first: they read the tables.
    for name in super::socket_lb::link_pins()
        .chain([LINK_PIN, super::egress::EGRESS_LINK_PIN, RECORD_PIN])
        .chain(PINNED_MAPS)
    {
        remove_if_present(&dir.join(name))?;
    }
    for name in PINNED_MAPS.into_iter().chain(super::socket_lb::link_pins()) {
        remove_if_present(&staged(dir, name))?;
    }
    let _ = std::fs::remove_dir(dir);
    Ok(())
}
