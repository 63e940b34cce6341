//! The socket-level balancer (docs/data-path.md, "Socket-level
//! balancing"): the cgroup/connect4, sendmsg4, getpeername4 and recvmsg4
//! programs of the same object as the XDP program (they read its VIPS,
//! MAGLEV and BACKENDS maps), attached to a cgroup v2 directory with
//! bpf_links, pinned beside the XDP link so they outlive the agent.
//!
//! A restart is gapless: the new agent attaches its own links first, pins
//! them as `<pin>_NEW`, then renames them over the old pins, which detaches
//! the old agent's links (nothing else holds them). Meanwhile both run for
//! a connect(): the first rewrites the VIP to a backend, and the second
//! then sees an address that is no VIP and leaves it alone.

use std::{
    fs::File,
    path::{Path, PathBuf},
};

use aya::{
    maps::{Array, PerCpuArray},
    programs::{CgroupAttachMode, CgroupSockAddr, links::FdLink},
};
use ha_common::{
    SOCK_CONNECT4_PROGRAM_NAME, SOCK_GETPEERNAME4_PROGRAM_NAME, SOCK_LB_EVENTS_MAP,
    SOCK_LB_NETNS_MAP, SOCK_RECVMSG4_PROGRAM_NAME, SOCK_SENDMSG4_PROGRAM_NAME, SockLbEvent,
};
use tracing::{info, warn};

use super::{DataPlane, DataPlaneError, Result, load_retrying, map_error, pins::staged};

/// Each program and the name of its link's pin in the pin directory
/// (connect4 first: it is the one that balances).
pub(super) const SOCK_PROGRAMS: [(&str, &str); 4] = [
    (SOCK_CONNECT4_PROGRAM_NAME, "sock_connect4"),
    (SOCK_SENDMSG4_PROGRAM_NAME, "sock_sendmsg4"),
    (SOCK_GETPEERNAME4_PROGRAM_NAME, "sock_getpeername4"),
    (SOCK_RECVMSG4_PROGRAM_NAME, "sock_recvmsg4"),
];

/// The pins of the socket-level balancer's links.
pub(super) fn link_pins() -> impl Iterator<Item = &'static str> {
    SOCK_PROGRAMS.iter().map(|(_, pin)| *pin)
}

/// The links this agent attached, and their pins.
pub(super) struct SocketLbAttachment {
    cgroup: PathBuf,
    links: Vec<(FdLink, Option<PathBuf>)>,
}

impl DataPlane {
    /// Attaches the socket-level balancer to the cgroup v2 directory
    /// `cgroup`, for the sockets of the network namespace whose cookie is
    /// `netns_cookie` (`SO_NETNS_COOKIE`). With a pin directory the links
    /// are pinned there, replacing an earlier agent's (see the module).
    ///
    /// # Errors
    /// [`DataPlaneError::Cgroup`] (the directory cannot be opened),
    /// [`DataPlaneError::SocketLbProgram`] (a program fails to load or
    /// attach: nothing stays attached, an earlier agent's pins are left),
    /// [`DataPlaneError::Pin`] / [`DataPlaneError::PinDir`] (pinning).
    pub fn attach_socket_lb(&mut self, cgroup: &Path, netns_cookie: u64) -> Result<()> {
        {
            let mut netns: Array<_, u64> = self.map_mut(SOCK_LB_NETNS_MAP)?;
            netns
                .set(0, netns_cookie, 0)
                .map_err(map_error(SOCK_LB_NETNS_MAP))?;
        }
        let dir = File::open(cgroup).map_err(|source| DataPlaneError::Cgroup {
            path: cgroup.display().to_string(),
            source,
        })?;
        // All four attached, or none: a failure drops the ones made so far,
        // which detaches them.
        let mut attached = Vec::new();
        for (name, pin) in SOCK_PROGRAMS {
            let error = |source| DataPlaneError::SocketLbProgram {
                program: name,
                source,
            };
            let program: &mut CgroupSockAddr = self
                .ebpf
                .program_mut(name)
                .ok_or(DataPlaneError::MissingProgram)?
                .try_into()
                .map_err(error)?;
            load_retrying(|| program.load()).map_err(error)?;
            // A bpf_link on a cgroup is always one of many (the kernel
            // attaches links with BPF_F_ALLOW_MULTI): other agents' and
            // other tools' programs run beside it.
            let id = program
                .attach(&dir, CgroupAttachMode::Single)
                .map_err(error)?;
            let link = program.take_link(id).map_err(error)?;
            let link = FdLink::try_from(link).map_err(|e| DataPlaneError::Pin {
                path: format!("the {name} link on {}", cgroup.display()),
                reason: format!("{e}: not a bpf_link (kernel before 5.7)"),
            })?;
            attached.push((link, pin));
        }
        let mut links = Vec::new();
        for (link, pin) in attached {
            let Some(pin_dir) = self.pin_dir.clone() else {
                links.push((link, None));
                continue;
            };
            let (new, path) = (staged(&pin_dir, pin), pin_dir.join(pin));
            let _ = std::fs::remove_file(&new);
            let pinned = link.pin(&new).map_err(|e| DataPlaneError::Pin {
                path: new.display().to_string(),
                reason: e.to_string(),
            })?;
            // Over the earlier agent's pin: its link goes with it.
            std::fs::rename(&new, &path).map_err(|source| DataPlaneError::PinDir {
                path: format!("{} -> {}", new.display(), path.display()),
                source,
            })?;
            links.push((FdLink::from(pinned), Some(path)));
        }
        info!(cgroup = %cgroup.display(), netns_cookie, pinned = self.pin_dir.is_some(), "socket-level balancer attached");
        self.socket_lb = Some(SocketLbAttachment {
            cgroup: cgroup.to_path_buf(),
            links,
        });
        Ok(())
    }

    /// The cgroup directory the socket-level balancer is attached to.
    pub fn socket_lb_cgroup(&self) -> Option<&Path> {
        self.socket_lb.as_ref().map(|a| a.cgroup.as_path())
    }

    /// Removes the socket-level balancer: its pins, then its links. Also
    /// removes an earlier agent's pinned links when this agent has none
    /// (socket_lb disabled, or its attach failed): they would balance with
    /// that agent's tables, which nothing updates any more.
    pub fn detach_socket_lb(&mut self) -> std::io::Result<()> {
        if let Some(dir) = &self.pin_dir {
            for pin in link_pins() {
                let path = dir.join(pin);
                if path.exists() {
                    if self.socket_lb.is_none() {
                        warn!(pin = %path.display(), "removing an earlier agent's socket-level balancer link");
                    }
                    super::pins::remove_if_present(&path)?;
                }
                super::pins::remove_if_present(&staged(dir, pin))?;
            }
        }
        if let Some(attachment) = self.socket_lb.take() {
            drop(attachment.links);
            info!(cgroup = %attachment.cgroup.display(), "socket-level balancer detached");
        }
        Ok(())
    }

    /// Keep: lets go of the links; pinned ones stay attached for the next agent.
    pub(super) fn keep_socket_lb(&mut self) {
        if let Some(attachment) = self.socket_lb.take() {
            let pinned = attachment.links.iter().all(|(_, pin)| pin.is_some());
            drop(attachment.links);
            if !pinned {
                info!("socket-level balancer detached (its links were not pinned)");
            }
        }
    }

    /// The socket-level balancer's counters, summed over CPUs.
    ///
    /// # Errors
    /// The map cannot be read.
    pub fn socket_lb_events(&self) -> Result<Vec<(SockLbEvent, u64)>> {
        let array: PerCpuArray<_, u64> = self.map(SOCK_LB_EVENTS_MAP)?;
        SockLbEvent::ALL
            .iter()
            .map(|event| {
                let per_cpu = array
                    .get(&(*event as u32), 0)
                    .map_err(map_error(SOCK_LB_EVENTS_MAP))?;
                Ok((*event, per_cpu.iter().sum()))
            })
            .collect()
    }
}
