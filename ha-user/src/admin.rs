//! The agent's local admin socket, for `status`, `drain`, `undrain`, `reload` and `stop`.
//!
//! An abstract Unix socket named `ha-lb/<interface>`: abstract names belong
//! to the network namespace, so agents in several namespaces (one per LB in
//! the lab, all on `eth0`) never collide, and nothing is left on the
//! filesystem. It has no file permissions, so the server checks the peer's
//! credentials: root, or the agent's own user, only.
//!
//! One JSON request per line, one JSON response per line.

use std::{
    io::{BufRead, BufReader, Write},
    os::linux::net::SocketAddrExt,
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt},
    net::UnixListener,
    sync::{mpsc, oneshot},
};
use tracing::{debug, warn};

use crate::control::{Command, Request, Response};

const NAME_PREFIX: &str = "ha-lb/";

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("admin socket {name}: {source}")]
    Io {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no ha-lb agent runs in this network namespace (no abstract socket @{NAME_PREFIX}*)")]
    NoAgent,
    #[error("several agents run here ({0}); name one with --iface")]
    SeveralAgents(String),
    #[error("the agent answered something unreadable: {0}")]
    Protocol(String),
}

pub fn socket_name(iface: &str) -> String {
    format!("{NAME_PREFIX}{iface}")
}

/// Serves the socket until the process ends, passing requests to `commands`.
pub fn serve(iface: &str, commands: mpsc::Sender<Command>) -> Result<(), AdminError> {
    let name = socket_name(iface);
    let io = |source| AdminError::Io {
        name: name.clone(),
        source,
    };
    let address =
        std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).map_err(io)?;
    let listener = std::os::unix::net::UnixListener::bind_addr(&address).map_err(io)?;
    listener.set_nonblocking(true).map_err(io)?;
    let listener = UnixListener::from_std(listener).map_err(io)?;
    // SAFETY: geteuid has no preconditions.
    let own_uid = unsafe { libc::geteuid() };
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let allowed = stream
                .peer_cred()
                .map(|c| c.uid() == 0 || c.uid() == own_uid)
                .unwrap_or(false);
            if !allowed {
                warn!("admin socket: refused a client that is neither root nor the agent's user");
                continue;
            }
            let commands = commands.clone();
            tokio::spawn(async move {
                let (reader, mut writer) = stream.into_split();
                let mut lines = tokio::io::BufReader::new(reader).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let response = match serde_json::from_str::<Request>(&line) {
                        Ok(request) => {
                            let (reply, answer) = oneshot::channel();
                            if commands.send((request, reply)).await.is_err() {
                                return;
                            }
                            answer
                                .await
                                .unwrap_or_else(|_| Response::error("the agent is stopping"))
                        }
                        Err(e) => Response::error(format!("bad request: {e}")),
                    };
                    let mut text =
                        serde_json::to_string(&response).expect("a Response always serializes");
                    text.push('\n');
                    if writer.write_all(text.as_bytes()).await.is_err() {
                        return;
                    }
                }
                debug!("admin client gone");
            });
        }
    });
    Ok(())
}

/// The agents of this network namespace, by interface, from /proc/net/unix.
pub fn running_agents() -> Vec<String> {
    let table = std::fs::read_to_string("/proc/net/unix").unwrap_or_default();
    let mut found: Vec<String> = table
        .lines()
        .filter_map(|line| line.split_whitespace().nth(7))
        .filter_map(|path| {
            path.strip_prefix('@')?
                .strip_prefix(NAME_PREFIX)
                .map(str::to_string)
        })
        .collect();
    found.sort();
    found.dedup();
    found
}

/// Sends one request to the agent on `iface` (or the only agent here).
pub fn request(iface: Option<&str>, request: &Request) -> Result<Response, AdminError> {
    let iface = match iface {
        Some(iface) => iface.to_string(),
        None => {
            let agents = running_agents();
            match agents.as_slice() {
                [] => return Err(AdminError::NoAgent),
                [one] => one.clone(),
                several => return Err(AdminError::SeveralAgents(several.join(", "))),
            }
        }
    };
    let name = socket_name(&iface);
    let io = |source| AdminError::Io {
        name: name.clone(),
        source,
    };
    let address =
        std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).map_err(io)?;
    let stream = std::os::unix::net::UnixStream::connect_addr(&address).map_err(io)?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(io)?;
    let mut text = serde_json::to_string(request).expect("a Request always serializes");
    text.push('\n');
    (&stream).write_all(text.as_bytes()).map_err(io)?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line).map_err(io)?;
    serde_json::from_str(&line).map_err(|e| AdminError::Protocol(format!("{e}: {line:?}")))
}
