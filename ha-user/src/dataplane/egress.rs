//! The tc egress program (docs/data-path.md, "Local backends"): loaded from
//! the same object as the XDP program (so both use the same maps), attached
//! at the egress of the XDP interface, and let go of with it.
//!
//! Attachment: a TCX link (kernel >= 6.6), pinned beside the XDP link as
//! [`EGRESS_LINK_PIN`]. A restarted agent switches the pinned link to its
//! own program in place (bpf_link_update), as it does the XDP link: there is
//! never a moment without the program, nor two of them. Older kernels get a
//! clsact filter by netlink at a fixed priority and handle, which the next
//! agent replaces in place (NLM_F_REPLACE); it is not pinned, and a crashed
//! agent's filter keeps running until then. Should two programs ever see a
//! reply (another loader's filter beside ours), the first translates it and
//! the second finds no reverse entry for a packet from the VIP: it passes it
//! untouched, so nothing is translated twice.

use std::path::{Path, PathBuf};

use aya::maps::PerCpuArray;
use aya::{
    Ebpf,
    programs::{
        LinkOrder, ProgramError, SchedClassifier, TcAttachType,
        links::{FdLink, LinkError, PinnedLink},
        tc::{NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle},
    },
    util::KernelVersion,
};
use ha_common::{Counter, EGRESS_VERDICTS_MAP, EgressVerdict, TC_EGRESS_PROGRAM_NAME};
use tracing::{debug, info, warn};

use super::{DataPlaneError, PROG_LOAD_ATTEMPTS, Result};

/// The pinned TCX link of the egress program, beside the XDP link.
pub const EGRESS_LINK_PIN: &str = "egress_link";
/// The clsact filter's priority and handle on kernels without TCX: fixed,
/// so a new agent finds and replaces its predecessor's filter.
const NETLINK_PRIORITY: u16 = 0x4a4c;
const NETLINK_HANDLE: u32 = 0x4a4c;

/// How the egress program is attached.
pub(super) enum Attached {
    /// A TCX link (pinned at `pin` when there is a pin directory).
    Tcx { link: FdLink, pin: Option<PathBuf> },
    /// A clsact filter by netlink (kernels before 6.6).
    Netlink { link: SchedClassifierLink },
}

/// The egress program's attachment: a pinned link found at load, and what
/// [`Egress::attach`] made.
#[derive(Default)]
pub(super) struct Egress {
    pending: Option<(FdLink, PathBuf)>,
    attached: Option<Attached>,
}

fn program(ebpf: &mut Ebpf) -> Result<&mut SchedClassifier> {
    ebpf.program_mut(TC_EGRESS_PROGRAM_NAME)
        .ok_or(DataPlaneError::MissingEgressProgram)?
        .try_into()
        .map_err(DataPlaneError::EgressVerify)
}

impl Egress {
    /// Loads the program (the verifier runs here, EAGAIN tried again as for
    /// the XDP program), and opens the pinned link in `pin_dir` if there is one.
    pub(super) fn load(ebpf: &mut Ebpf, pin_dir: Option<&Path>) -> Result<Self> {
        let program = program(ebpf)?;
        let mut attempt = 1;
        loop {
            match program.load() {
                Err(ProgramError::LoadError { io_error, .. })
                    if io_error.raw_os_error() == Some(libc::EAGAIN)
                        && attempt < PROG_LOAD_ATTEMPTS =>
                {
                    attempt += 1;
                }
                other => {
                    other.map_err(DataPlaneError::EgressVerify)?;
                    break;
                }
            }
        }
        let mut egress = Egress::default();
        if let Some(dir) = pin_dir {
            let path = dir.join(EGRESS_LINK_PIN);
            match PinnedLink::from_pin(&path) {
                Ok(link) => egress.pending = Some((FdLink::from(link), path)),
                Err(LinkError::SyscallError(e))
                    if e.io_error.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    warn!(pin = %path.display(), error = %e, "unreadable pinned egress link; removed, attaching anew");
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        Ok(egress)
    }

    /// Whether the program is attached (status: `egress_translation`).
    pub(super) fn is_attached(&self) -> bool {
        self.attached.is_some()
    }

    /// Attaches at `iface`'s egress: the pinned link switched to this
    /// program, else a new TCX link (pinned in `pin_dir`), else (a kernel
    /// before 6.6) a clsact filter.
    pub(super) fn attach(
        &mut self,
        ebpf: &mut Ebpf,
        iface: &str,
        pin_dir: Option<&Path>,
    ) -> Result<()> {
        let error = |reason: String| DataPlaneError::EgressAttach {
            iface: iface.to_string(),
            reason,
        };
        let program = program(ebpf)?;
        if let Some((link, path)) = self.pending.take() {
            let updated = SchedClassifierLink::try_from(link)
                .map_err(|e| e.to_string())
                .and_then(|link| program.attach_to_link(link).map_err(|e| e.to_string()));
            match updated {
                Ok(id) => {
                    let link =
                        FdLink::try_from(program.take_link(id).map_err(|e| error(e.to_string()))?)
                            .map_err(|e| error(e.to_string()))?;
                    info!(%iface, "replaced the program of the pinned egress link in place");
                    self.attached = Some(Attached::Tcx {
                        link,
                        pin: Some(path),
                    });
                    return Ok(());
                }
                Err(e) => {
                    warn!(%iface, pin = %path.display(), error = %e, "the pinned egress link cannot be updated (its interface was removed?); attaching anew");
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        let tcx = KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0));
        if tcx {
            let id = program
                .attach_with_options(
                    iface,
                    TcAttachType::Egress,
                    TcAttachOptions::TcxOrder(LinkOrder::default()),
                )
                .map_err(|e| error(e.to_string()))?;
            let link = FdLink::try_from(program.take_link(id).map_err(|e| error(e.to_string()))?)
                .map_err(|e| error(e.to_string()))?;
            let (link, pin) = super::pins::pin_link(link, pin_dir, EGRESS_LINK_PIN)?;
            debug!(%iface, pinned = pin.is_some(), "tc egress attached (TCX)");
            self.attached = Some(Attached::Tcx { link, pin });
            return Ok(());
        }
        warn!(
            %iface,
            "kernel before 6.6: the tc egress program is attached as a clsact filter by netlink \
             (not pinned: a restarted agent replaces it in place)"
        );
        if let Err(e) = aya::programs::tc::qdisc_add_clsact(iface) {
            debug!(%iface, error = %e, "adding the clsact qdisc (it may exist already)");
        }
        let options = NlOptions {
            priority: NETLINK_PRIORITY,
            handle: NETLINK_HANDLE.into(),
            ..NlOptions::default()
        };
        let id = match program.attach_with_options(
            iface,
            TcAttachType::Egress,
            TcAttachOptions::Netlink(options),
        ) {
            Ok(id) => id,
            Err(first) => {
                // A predecessor's filter holds the place: replaced in place.
                let existing = SchedClassifierLink::attached(
                    iface,
                    TcAttachType::Egress,
                    NETLINK_PRIORITY,
                    TcHandle::from(NETLINK_HANDLE),
                    None,
                )
                .map_err(|e| error(e.to_string()))?;
                program
                    .attach_to_link(existing)
                    .map_err(|e| error(format!("{first}; replacing: {e}")))?
            }
        };
        let link = program.take_link(id).map_err(|e| error(e.to_string()))?;
        self.attached = Some(Attached::Netlink { link });
        Ok(())
    }

    /// Release: the program leaves the interface (its pin removed, the link
    /// closed; a netlink filter deleted).
    pub(super) fn detach(&mut self) -> std::io::Result<()> {
        self.pending = None;
        match self.attached.take() {
            None => {}
            Some(Attached::Tcx { link, pin }) => {
                if let Some(pin) = &pin {
                    super::pins::remove_if_present(pin)?;
                }
                drop(link);
            }
            Some(Attached::Netlink { link }) => {
                use aya::programs::links::Link as _;
                if let Err(e) = link.detach() {
                    warn!(error = %e, "removing the tc egress filter");
                }
            }
        }
        Ok(())
    }

    /// Keep: the program stays attached for the next agent (a pinned TCX
    /// link, or the netlink filter, which the next agent replaces).
    pub(super) fn keep(&mut self) {
        self.pending = None;
        match self.attached.take() {
            Some(Attached::Tcx { pin: None, link }) => drop(link),
            Some(Attached::Tcx { link, .. }) => drop(link),
            // Dropping the link would delete the filter.
            Some(Attached::Netlink { link }) => std::mem::forget(link),
            None => {}
        }
    }
}

impl super::DataPlane {
    /// The tc egress program's verdict counters, summed over CPUs.
    ///
    /// # Errors
    /// The map cannot be read.
    pub fn egress_verdicts(&self) -> Result<Vec<(EgressVerdict, Counter)>> {
        let array: PerCpuArray<_, Counter> = self.map(EGRESS_VERDICTS_MAP)?;
        EgressVerdict::ALL
            .iter()
            .map(|verdict| {
                let per_cpu = array
                    .get(&(*verdict as u32), 0)
                    .map_err(super::map_error(EGRESS_VERDICTS_MAP))?;
                let mut total = Counter::default();
                per_cpu.iter().for_each(|c| total.merge(c));
                Ok((*verdict, total))
            })
            .collect()
    }
}
