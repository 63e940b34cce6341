//! One-shot commands beside the agent: `detach`, `check-config`, and where the pins live.

use std::path::PathBuf;

use anyhow::{Context, Result};
use tracing::warn;

use crate::{
    admin, config::Config, control::Request, dataplane::LoadOptions, handover::StopIntent,
    netlink::Netlink, system,
};

use super::{PinLocation, probes::build_probers};

/// The pin directory `pin` names for `iface`, and whether pins there
/// outlive the agent (`None`: pinning off or impossible).
pub fn resolve_pin_dir(iface: &str, pin: &PinLocation) -> Option<(PathBuf, bool)> {
    match pin {
        PinLocation::Off => None,
        PinLocation::Dir(dir) => Some((dir.clone(), true)),
        PinLocation::Auto => match system::pin_dir(iface) {
            Ok(dir) => Some((dir.path, dir.outlives_agent)),
            Err(e) => {
                warn!(error = %e, "cannot pin the data path; it will not outlive the agent");
                None
            }
        },
    }
}

/// `ha-user detach`: removes everything ha-lb put on `iface`. A running
/// agent is asked to stop with the release intent; otherwise the pinned
/// record names the VIP addresses to remove, and removing the pins detaches
/// the program.
pub async fn detach(iface: &str, pin: &PinLocation) -> Result<String> {
    if admin::running_agents().iter().any(|a| a == iface) {
        let response = admin::request(
            Some(iface),
            &Request::Stop {
                intent: StopIntent::Release,
            },
        )?;
        return Ok(format!(
            "the agent on {iface} releases everything and exits: {}",
            response.message.unwrap_or_default()
        ));
    }
    let (dir, _) = resolve_pin_dir(iface, pin).context("no pin directory to look in")?;
    if !dir.exists() {
        return Ok(format!(
            "nothing pinned in {}: nothing to detach",
            dir.display()
        ));
    }
    let state = crate::dataplane::inspect_pins(
        &dir,
        &LoadOptions {
            maglev_table_size: 0,
            max_vips: 0,
            max_flows: 0,
            pin_dir: None,
            host_ports: None,
            accept_flow_loss: false,
        },
    )
    .or_else(|e| {
        // A link that is not ours is left alone, but our own pins still go.
        warn!(error = %e, "the pinned link");
        Ok::<_, anyhow::Error>(crate::dataplane::PinnedState::default())
    })?;
    let record = state.record.unwrap_or_default();
    let netlink = Netlink::connect()?;
    let mut removed = Vec::new();
    if let Ok(ifindex) = netlink.interface_index(iface).await {
        for address in &record.addresses {
            if netlink.has_address(ifindex, (*address).into()).await? {
                netlink
                    .remove_vip(ifindex, (*address).into())
                    .await
                    .with_context(|| format!("removing VIP address {address} from {iface}"))?;
                removed.push(address.to_string());
            }
        }
        for address in &record.neighbours {
            let _ = netlink.remove_neighbour(ifindex, (*address).into()).await;
        }
        if record.forwarding_was == Some(false) {
            let path = format!("/proc/sys/net/ipv4/conf/{iface}/forwarding");
            if let Err(e) = std::fs::write(&path, "0") {
                warn!(%path, error = %e, "restoring forwarding");
            }
        }
    }
    crate::dataplane::remove_pins(&dir)
        .with_context(|| format!("removing the pins in {}", dir.display()))?;
    Ok(format!(
        "detached from {iface}: pins in {} removed (the program goes with its link){}",
        dir.display(),
        if removed.is_empty() {
            String::new()
        } else {
            format!(", VIP addresses removed: {}", removed.join(", "))
        }
    ))
}

/// `ha-user check-config`: the normalized config, or every problem with it;
/// with an interface, also what an agent started now would do with what is
/// pinned for it (adopt, replace, refuse), changing nothing.
pub fn check_config(
    path: &std::path::Path,
    pinned_for: Option<(&str, &PinLocation)>,
    accept_flow_loss: bool,
) -> Result<(String, Option<String>)> {
    let config = Config::load(path)?;
    build_probers(&config)?;
    let pinned = match pinned_for {
        Some((iface, pin)) => match match pin {
            // Looking changes nothing: no bpffs is mounted for it.
            PinLocation::Auto => system::pin_dir_path(iface).ok(),
            PinLocation::Dir(dir) => Some(dir.clone()),
            PinLocation::Off => None,
        } {
            Some(dir) if dir.exists() => {
                let dp = &config.data_plane;
                let options = LoadOptions {
                    maglev_table_size: dp.maglev_table_size,
                    max_vips: dp.max_vips,
                    max_flows: dp.conntrack.max_flows,
                    pin_dir: Some(dir.clone()),
                    host_ports: None,
                    accept_flow_loss,
                };
                let state = crate::dataplane::inspect_pins(&dir, &options)?;
                Some(state.describe(&dir, accept_flow_loss))
            }
            Some(dir) => Some(format!(
                "nothing pinned in {}: an agent starts fresh",
                dir.display()
            )),
            None => Some("pinning is off: an agent starts fresh".to_string()),
        },
        None => None,
    };
    Ok((config.to_yaml(), pinned))
}
