//! Loading the program and adopting what the pin directory holds; attaching
//! it (a new pinned link, or the pinned link switched to it in place);
//! letting go of it (detach or keep); the agent record.

use std::{
    borrow::Cow,
    collections::{BTreeMap, HashMap, HashSet},
    net::Ipv4Addr,
    path::PathBuf,
};

use aya::{
    EbpfLoader,
    maps::Array,
    programs::{
        ProgramError, Xdp, XdpMode,
        links::FdLink,
        xdp::{XdpLink, XdpLinkId},
    },
};
use ha_common::{
    BACKENDS_MAP, BackendInfo, CONNTRACK_MAP, EMBRYONIC_MAP, MAGLEV_MAP, REVERSE_NAT_MAP, Settings,
    XDP_PROGRAM_NAME, addr_from_wire,
};
use tracing::{debug, info, warn};

use super::{
    AttachMode, AttachedMode, DataPlane, DataPlaneError, LoadOptions, Result, map_error,
    migrate::OldTable,
    pins::{
        LinkFound, PINNED_MAPS, describe_resized, inspect_and_open, record_map, remove_if_present,
        remove_pins, staged,
    },
    sweep::SweepTotals,
};
use crate::{
    ebpf_object,
    handover::{self, LINK_PIN, RECORD_PIN, Record, StartKind, TablesPlan},
};

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK; newer ones use
/// memory cgroups and ignore it. Raising it is harmless either way.
fn raise_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscall with a valid pointer to a local struct.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) };
    if rc != 0 {
        debug!(
            "could not raise RLIMIT_MEMLOCK: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// The object to load: the embedded one, or in a build with the
/// `test-hooks` feature the file `HA_LB_XDP_OBJECT` names (the upgrade test,
/// docs/development.md).
fn xdp_object() -> Result<Cow<'static, [u8]>> {
    #[cfg(feature = "test-hooks")]
    if let Some(bytes) = super::test_hooks::object_override()? {
        return Ok(Cow::Owned(bytes));
    }
    #[cfg(not(feature = "test-hooks"))]
    if std::env::var_os("HA_LB_XDP_OBJECT").is_some() {
        warn!(
            "HA_LB_XDP_OBJECT is ignored: this build has no test hooks (feature `test-hooks`); loading the embedded XDP object"
        );
    }
    ebpf_object::embedded()
        .map(Cow::Borrowed)
        .ok_or(DataPlaneError::NoXdpObject)
}

/// The program's XDP attachment: a bpf_link, pinned (it then outlives the
/// agent) unless pinning is off.
pub(super) struct Attachment {
    link: FdLink,
    pin: Option<PathBuf>,
    iface: String,
}

/// A pinned link found at load, replaced by [`DataPlane::attach`].
pub(super) struct PendingLink {
    link: FdLink,
    path: PathBuf,
    found: LinkFound,
}

impl DataPlane {
    /// Loads the XDP program (verifier included), adopting what the pin
    /// directory holds: the flow tables where they fit, the agent record, and
    /// the pinned link, which [`DataPlane::attach`] then points at this
    /// program. Nothing in the directory changes before every check passed.
    ///
    /// # Errors
    /// [`DataPlaneError::WouldDropFlows`] when pinned flows cannot be adopted
    /// and `options.accept_flow_loss` is off; [`DataPlaneError::PinnedLink`]
    /// when the pinned link is not ha-lb's; loading or verifying failures.
    pub fn load(options: &LoadOptions) -> Result<Self> {
        raise_memlock_limit();
        let maglev_entries = options.maglev_table_size * 2 * options.max_vips;
        let embryonic_slots = options.embryonic_slots();
        let mut loader = EbpfLoader::new();
        loader
            .map_max_entries(MAGLEV_MAP, maglev_entries)
            .map_max_entries(CONNTRACK_MAP, options.table_entries())
            .map_max_entries(REVERSE_NAT_MAP, options.reverse_entries())
            .map_max_entries(EMBRYONIC_MAP, embryonic_slots);
        let mut pending_link = None;
        let mut found_record = None;
        let mut migrating = Vec::new();
        let mut staged_pins = Vec::new();
        if let Some(dir) = &options.pin_dir {
            std::fs::create_dir_all(dir).map_err(|source| DataPlaneError::PinDir {
                path: dir.display().to_string(),
                source,
            })?;
            // New tables of a start that failed before its switch.
            for name in PINNED_MAPS {
                let _ = remove_if_present(&staged(dir, name));
            }
            let (pinned, fd_link) = inspect_and_open(dir, options)?;
            let plan = handover::plan_tables(pinned.tables.as_ref(), options.accept_flow_loss)?;
            if let (Some(link), Some(found)) = (fd_link, pinned.link.clone()) {
                pending_link = Some(PendingLink {
                    link,
                    path: dir.join(LINK_PIN),
                    found,
                });
            }
            match &plan {
                TablesPlan::Fresh => {}
                TablesPlan::Migrate { flows, resized } => {
                    info!(dir = %dir.display(), flows, resized = %describe_resized(resized), "migrating the pinned flow tables to new sizes");
                    for (name, _, _) in resized {
                        migrating.push(OldTable::open(name, &dir.join(name))?);
                        staged_pins.push(name.clone());
                    }
                }
                TablesPlan::Adopt { flows } => {
                    info!(dir = %dir.display(), flows, "adopting the pinned flow tables")
                }
                TablesPlan::Replace { flows, reason } => {
                    warn!(dir = %dir.display(), flows, %reason, "replacing the pinned flow tables with empty ones; their flows are lost");
                    staged_pins.extend(PINNED_MAPS.iter().map(|name| name.to_string()));
                }
            }
            found_record = pinned.record;
            // New tables are pinned beside the old ones and take their names
            // only once the program switch is done (`commit_staged_pins`):
            // a start that fails before leaves the old ones as they were.
            for name in PINNED_MAPS {
                let path = if staged_pins.iter().any(|s| s == name) {
                    staged(dir, name)
                } else {
                    dir.join(name)
                };
                loader.map_pin_path(name, path);
            }
        }
        let object = xdp_object()?;
        let mut ebpf = loader.load(&object)?;
        let program: &mut Xdp = ebpf
            .program_mut(XDP_PROGRAM_NAME)
            .ok_or(DataPlaneError::MissingProgram)?
            .try_into()
            .map_err(DataPlaneError::Verify)?;
        super::load_program(program).map_err(DataPlaneError::Verify)?;
        let info = program.info().map_err(DataPlaneError::Verify)?;
        let (tag, program_id) = (info.tag(), info.id());
        let egress = super::egress::Egress::load(&mut ebpf, options.pin_dir.as_deref())?;
        let record_map = match &options.pin_dir {
            Some(dir) => Some(record_map(&dir.join(RECORD_PIN))?),
            None => None,
        };
        let found_link = pending_link.is_some();
        let mut dataplane = Self {
            ebpf,
            attachment: None,
            pending_link,
            pin_dir: options.pin_dir.clone(),
            record_map,
            record: Record::default(),
            found_record: found_record.clone(),
            tag,
            program_id,
            found_link,
            migrating,
            staged_pins,
            start: StartKind::Fresh,
            replaced_tag: None,
            table_size: options.maglev_table_size,
            max_vips: options.max_vips,
            vips: HashMap::new(),
            backend_ids: BTreeMap::new(),
            retired: HashSet::new(),
            settings: Settings::default(),
            earlier_nat: Vec::new(),
            embryonic_slots,
            sweep_totals: SweepTotals::default(),
            settings_slot: 0,
            socket_lb: None,
            egress,
        };
        if dataplane.record_map.is_some() {
            dataplane.record = found_record.unwrap_or_default();
            let mut record = dataplane.record.clone();
            record.layout = Some(handover::LAYOUT_VERSION);
            dataplane.store_record(&record)?;
        }
        dataplane.migrate(false)?;
        dataplane.adopt_backends()?;
        let running_nat = dataplane
            .found_link
            .then(|| dataplane.found_record.as_ref().and_then(|r| r.nat))
            .flatten();
        dataplane.adopt_nat_sources(options.host_ports, running_nat)?;
        Ok(dataplane)
    }

    /// The record the previous agent left in the pin directory, if any.
    pub fn found_record(&self) -> Option<&Record> {
        self.found_record.as_ref()
    }

    /// Writes `record` to the pinned record (the entries that changed); a
    /// no-op without a pin directory.
    ///
    /// # Errors
    /// A map write failing; the record then holds part of the change.
    pub fn store_record(&mut self, record: &Record) -> Result<()> {
        // The layout and the attached program are the data plane's to say.
        let mut record = record.clone();
        record.layout = Some(handover::LAYOUT_VERSION);
        if record.program.is_none() {
            record.program = self.record.program;
        }
        if record.nat.is_none() {
            record.nat = self.record.nat;
        }
        let Some(map) = self.record_map.as_mut() else {
            self.record = record;
            return Ok(());
        };
        let (old, new) = (self.record.entries(), record.entries());
        for (key, value) in &new {
            if old.get(key) != Some(value) {
                map.insert(key, value, 0).map_err(map_error(RECORD_PIN))?;
            }
        }
        for key in old.keys().filter(|k| !new.contains_key(k)) {
            map.remove(key).map_err(map_error(RECORD_PIN))?;
        }
        self.record = record;
        Ok(())
    }

    /// Whether a pinned link ran a program when this data plane was loaded
    /// (an earlier agent's, serving while this one starts).
    pub fn found_link(&self) -> bool {
        self.found_link
    }

    /// Whether [`DataPlane::attach`] has attached (or adopted) the program.
    pub fn is_attached(&self) -> bool {
        self.attachment.is_some()
    }

    /// Whether the tc egress program (local backends' replies) is attached.
    pub fn egress_attached(&self) -> bool {
        self.egress.is_attached()
    }

    /// The egress program at `iface` (after the XDP program, which serves first).
    fn attach_egress(&mut self, iface: &str) -> Result<()> {
        self.egress
            .attach(&mut self.ebpf, iface, self.pin_dir.as_deref())
    }

    /// The loaded program's tag (a SHA of its instructions, as bpftool shows it).
    pub fn program_tag(&self) -> u64 {
        self.tag
    }

    /// How this data plane came to be attached, and the tag of the program it replaced.
    pub fn start_kind(&self) -> (StartKind, Option<u64>) {
        (self.start, self.replaced_tag)
    }

    /// Backend ids from a pinned table: flows adopted with the connection
    /// table keep naming the same backends. All start retired; the first
    /// `apply` takes back the ones still configured.
    fn adopt_backends(&mut self) -> Result<()> {
        let mut found = Vec::new();
        {
            let backends: Array<_, BackendInfo> = self.map(BACKENDS_MAP)?;
            for id in 0..ha_common::MAX_BACKENDS {
                let info = backends.get(&id, 0).map_err(map_error(BACKENDS_MAP))?;
                if info.addr != 0 {
                    let key = (
                        Ipv4Addr::from(addr_from_wire(info.addr)),
                        ha_common::port_from_wire(info.port),
                    );
                    found.push((key, id));
                }
            }
        }
        for (key, id) in found {
            self.backend_ids.insert(key, id);
            self.retired.insert(id);
            self.index_backend(key.0, key.1, id)?;
        }
        if !self.backend_ids.is_empty() {
            info!(
                backends = self.backend_ids.len(),
                "adopted pinned backend table"
            );
        }
        Ok(())
    }

    fn program_mut(&mut self) -> &mut Xdp {
        self.ebpf
            .program_mut(XDP_PROGRAM_NAME)
            .and_then(|p| p.try_into().ok())
            .expect("load() checked the program exists and is XDP")
    }

    /// Turns on the program's aya-log output (the `debug` setting).
    pub fn take_logger(&mut self) -> Option<aya_log::EbpfLogger<&'static dyn log::Log>> {
        aya_log::EbpfLogger::init(&mut self.ebpf)
            .map_err(|e| warn!("XDP debug log unavailable: {e}"))
            .ok()
    }

    /// Attaches to `iface` (resolved in the calling thread's network namespace)
    /// in native mode. A pinned link found at load is pointed at this program
    /// instead (bpf_link_update: one atomic switch, the interface is never
    /// without a program); otherwise a new link is made and pinned.
    ///
    /// # Errors
    /// [`DataPlaneError::GenericRefused`] for [`AttachMode::Generic`];
    /// [`DataPlaneError::Attach`] when the driver refuses native mode or the
    /// pinned link refuses the update (the old program then stays).
    pub fn attach(&mut self, iface: &str, mode: AttachMode) -> Result<AttachedMode> {
        if mode == AttachMode::Generic {
            return Err(DataPlaneError::GenericRefused {
                iface: iface.to_string(),
            });
        }
        let attach_error = |source| DataPlaneError::Attach {
            iface: iface.to_string(),
            mode: AttachedMode::Native.label(),
            source,
        };
        if let Some(pending) = self.pending_link.take() {
            let xdp_link =
                XdpLink::try_from(pending.link).map_err(|e| DataPlaneError::PinnedLink {
                    path: pending.path.display().to_string(),
                    reason: e.to_string(),
                })?;
            match self.program_mut().attach_to_link(xdp_link) {
                Ok(id) => {
                    let link = self.take_fd_link(id, iface)?;
                    self.start = StartKind::of(Some(pending.found.program_tag), self.tag);
                    self.replaced_tag = Some(pending.found.program_tag);
                    info!(
                        %iface,
                        from = %handover::tag_hex(pending.found.program_tag),
                        to = %handover::tag_hex(self.tag),
                        start = self.start.label(),
                        "replaced the program of the pinned XDP link in place"
                    );
                    self.attachment = Some(Attachment {
                        link,
                        pin: Some(pending.path),
                        iface: iface.to_string(),
                    });
                    self.record_program()?;
                    // The new tables are live: their pins first, then the
                    // second copy pass from the old ones (still held open).
                    self.commit_staged_pins()?;
                    self.migrate(true)?;
                    self.attach_egress(iface)?;
                    return Ok(AttachedMode::Native);
                }
                Err(ProgramError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(libc::ENOLINK) =>
                {
                    // The interface it was made for is gone (recreated with
                    // the same name): the link serves nothing any more.
                    warn!(%iface, pin = %pending.path.display(), "the pinned XDP link is defunct (its interface was removed); attaching anew");
                    let _ = std::fs::remove_file(&pending.path);
                }
                Err(e) => return Err(attach_error(e)),
            }
        }
        let id = match self.program_mut().attach(iface, XdpMode::Driver) {
            Err(ProgramError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::EBUSY) =>
            {
                return Err(DataPlaneError::AlreadyAttached {
                    iface: iface.to_string(),
                });
            }
            other => other.map_err(attach_error)?,
        };
        let link = self.take_fd_link(id, iface)?;
        let (link, pin) = super::pins::pin_link(link, self.pin_dir.as_deref(), LINK_PIN)?;
        debug!(%iface, pinned = pin.is_some(), "XDP attached");
        self.attachment = Some(Attachment {
            link,
            pin,
            iface: iface.to_string(),
        });
        self.record_program()?;
        self.commit_staged_pins()?;
        self.migrate(true)?;
        self.attach_egress(iface)?;
        Ok(AttachedMode::Native)
    }

    /// After the switch: the new tables take the pinned names, replacing
    /// the old ones (which the replaced program held until now).
    fn commit_staged_pins(&mut self) -> Result<()> {
        let Some(dir) = self.pin_dir.clone() else {
            return Ok(());
        };
        for name in std::mem::take(&mut self.staged_pins) {
            let (from, to) = (staged(&dir, &name), dir.join(&name));
            std::fs::rename(&from, &to).map_err(|source| DataPlaneError::PinDir {
                path: format!("{} -> {}", from.display(), to.display()),
                source,
            })?;
        }
        Ok(())
    }

    /// Names the attached program, and the NAT source it creates flows
    /// with, in the agent record, for the next agent.
    fn record_program(&mut self) -> Result<()> {
        let mut record = self.record.clone();
        record.program = Some(handover::ProgramRecord {
            id: self.program_id,
            tag: self.tag,
        });
        record.nat = (self.settings.nat[0].addr != 0).then_some(self.settings.nat[0]);
        self.store_record(&record)
    }

    /// The link `id` as a bpf_link this data plane holds (the program no
    /// longer detaches it when dropped).
    fn take_fd_link(&mut self, id: XdpLinkId, iface: &str) -> Result<FdLink> {
        let error = |reason: String| DataPlaneError::Pin {
            path: format!("the XDP link on {iface}"),
            reason,
        };
        let link = self
            .program_mut()
            .take_link(id)
            .map_err(|e| error(e.to_string()))?;
        FdLink::try_from(link).map_err(|e| {
            error(format!(
                "{e}: the kernel attached without a bpf_link (netlink), which cannot outlive the agent"
            ))
        })
    }

    /// Release: removes the attachment made by [`DataPlane::attach`] and
    /// everything pinned (link, flow tables, record): the interface is left
    /// as it was before the first agent. Before [`DataPlane::attach`] (a
    /// start that failed) nothing is removed: a program attached by an
    /// earlier agent goes on serving.
    pub fn detach(&mut self) -> Result<(), std::io::Error> {
        self.pending_link = None;
        if self.attachment.is_some() {
            self.detach_socket_lb()?;
        }
        let Some(attachment) = self.attachment.take() else {
            self.egress.keep();
            return Ok(());
        };
        self.egress.detach()?;
        if let Some(pin) = &attachment.pin {
            remove_if_present(pin)?;
        }
        drop(attachment.link);
        debug!(iface = %attachment.iface, "XDP detached");
        if let Some(dir) = &self.pin_dir {
            remove_pins(dir)?;
        }
        Ok(())
    }

    /// Keep: lets go of the attachment without detaching. With a pin
    /// directory the program stays attached and the tables and record stay
    /// for the next agent; without one, this is [`DataPlane::detach`].
    pub fn keep(&mut self) -> Result<(), std::io::Error> {
        match self.attachment.as_ref().and_then(|a| a.pin.as_ref()) {
            Some(_) => {
                self.attachment = None;
                self.keep_socket_lb();
                self.egress.keep();
                Ok(())
            }
            None => self.detach(),
        }
    }
}
