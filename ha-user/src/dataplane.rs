//! Loading the XDP program, attaching it to an interface and reading its maps.

use aya::{
    Ebpf, EbpfLoader,
    maps::PerCpuArray,
    programs::{ProgramError, Xdp, XdpMode, xdp::XdpLinkId},
};
use ha_common::{PROTO_COUNTERS_MAP, ProtoCounter, ProtoIndex, XDP_PROGRAM_NAME};
use tracing::{debug, warn};

use crate::ebpf_object::EBPF_OBJECT;

#[derive(Debug, thiserror::Error)]
pub enum DataPlaneError {
    #[error("loading the embedded eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("the eBPF object has no program named {XDP_PROGRAM_NAME}")]
    MissingProgram,
    #[error("the eBPF object has no map named {0}")]
    MissingMap(&'static str),
    #[error("the kernel rejected the XDP program: {0}")]
    Verify(#[source] ProgramError),
    #[error("attaching XDP to interface {iface} in {mode} mode: {source}")]
    Attach {
        iface: String,
        mode: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("reading map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
}

/// How to attach. `Auto` is what operators want: native (driver) mode where
/// the NIC driver supports it, generic (skb) mode with a warning otherwise.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AttachMode {
    Auto,
    Native,
    Generic,
}

/// The mode an attachment ended up in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachedMode {
    Native,
    Generic,
}

impl AttachedMode {
    pub fn label(self) -> &'static str {
        match self {
            AttachedMode::Native => "native",
            AttachedMode::Generic => "generic",
        }
    }
}

/// The loaded program and its maps. Dropping it detaches the program.
pub struct DataPlane {
    ebpf: Ebpf,
    attachment: Option<(XdpLinkId, String, AttachedMode)>,
}

impl DataPlane {
    /// Loads the embedded object and the XDP program into the kernel (verifier
    /// included) without attaching it anywhere.
    pub fn load() -> Result<Self, DataPlaneError> {
        raise_memlock_limit();
        let mut ebpf = EbpfLoader::new().load(EBPF_OBJECT)?;
        let program: &mut Xdp = ebpf
            .program_mut(XDP_PROGRAM_NAME)
            .ok_or(DataPlaneError::MissingProgram)?
            .try_into()
            .map_err(DataPlaneError::Verify)?;
        program.load().map_err(DataPlaneError::Verify)?;
        Ok(Self {
            ebpf,
            attachment: None,
        })
    }

    /// The loaded program, for BPF_PROG_TEST_RUN in tests and benchmarks.
    pub fn program(&self) -> &Xdp {
        self.ebpf
            .program(XDP_PROGRAM_NAME)
            .and_then(|p| p.try_into().ok())
            .expect("load() checked the program exists and is XDP")
    }

    fn program_mut(&mut self) -> &mut Xdp {
        self.ebpf
            .program_mut(XDP_PROGRAM_NAME)
            .and_then(|p| p.try_into().ok())
            .expect("load() checked the program exists and is XDP")
    }

    /// Attaches to `iface` (resolved in the calling thread's network namespace).
    pub fn attach(
        &mut self,
        iface: &str,
        mode: AttachMode,
    ) -> Result<AttachedMode, DataPlaneError> {
        let attach_as = |program: &mut Xdp, attached: AttachedMode| {
            let xdp_mode = match attached {
                AttachedMode::Native => XdpMode::Driver,
                AttachedMode::Generic => XdpMode::Skb,
            };
            program
                .attach(iface, xdp_mode)
                .map_err(|source| DataPlaneError::Attach {
                    iface: iface.to_string(),
                    mode: attached.label(),
                    source,
                })
        };
        let (link, attached) = match mode {
            AttachMode::Native => (
                attach_as(self.program_mut(), AttachedMode::Native)?,
                AttachedMode::Native,
            ),
            AttachMode::Generic => (
                attach_as(self.program_mut(), AttachedMode::Generic)?,
                AttachedMode::Generic,
            ),
            AttachMode::Auto => match attach_as(self.program_mut(), AttachedMode::Native) {
                Ok(link) => (link, AttachedMode::Native),
                Err(native_error) => {
                    warn!(%iface, error = %native_error, "native XDP unavailable, falling back to generic mode (slower)");
                    (
                        attach_as(self.program_mut(), AttachedMode::Generic)?,
                        AttachedMode::Generic,
                    )
                }
            },
        };
        debug!(%iface, mode = attached.label(), "XDP attached");
        self.attachment = Some((link, iface.to_string(), attached));
        Ok(attached)
    }

    /// Removes the attachment made by [`DataPlane::attach`], if any.
    pub fn detach(&mut self) -> Result<(), ProgramError> {
        if let Some((link, iface, _)) = self.attachment.take() {
            self.program_mut().detach(link)?;
            debug!(%iface, "XDP detached");
        }
        Ok(())
    }

    /// Per-protocol totals summed over all CPUs, in [`ProtoIndex`] order.
    pub fn proto_counters(
        &self,
    ) -> Result<[ProtoCounter; ProtoIndex::COUNT as usize], DataPlaneError> {
        let map = self
            .ebpf
            .map(PROTO_COUNTERS_MAP)
            .ok_or(DataPlaneError::MissingMap(PROTO_COUNTERS_MAP))?;
        let array: PerCpuArray<_, ProtoCounter> =
            PerCpuArray::try_from(map).map_err(|source| DataPlaneError::Map {
                map: PROTO_COUNTERS_MAP,
                source,
            })?;
        let mut totals = [ProtoCounter::default(); ProtoIndex::COUNT as usize];
        for index in ProtoIndex::ALL {
            let per_cpu = array
                .get(&(index as u32), 0)
                .map_err(|source| DataPlaneError::Map {
                    map: PROTO_COUNTERS_MAP,
                    source,
                })?;
            for cpu_value in per_cpu.iter() {
                totals[index as usize].merge(cpu_value);
            }
        }
        Ok(totals)
    }
}

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
