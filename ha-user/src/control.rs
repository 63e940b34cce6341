//! The vocabulary of the agent's command channel: what the admin socket
//! (`ha-user status|drain|undrain|reload|stop`) and the telemetry endpoint
//! (`/livez`, `/readyz`, `/metrics`) ask the agent's main loop, and what it
//! answers. Both serve the same [`Command`]s over one `mpsc` channel into
//! the loop, the one owner of the state.

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::status::{ReloadOutcome, ReloadStep, StatusReport};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Request {
    Status,
    /// Maintenance: no new flows to the backend, established flows stay.
    Drain {
        vip: String,
        backend: String,
    },
    Undrain {
        vip: String,
        backend: String,
    },
    Reload,
    /// Stop the agent with this intent (`ha-user stop`).
    Stop {
        intent: crate::handover::StopIntent,
    },
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<StatusReport>,
    /// For a reload: how it ended, and for a failed one where and what is left.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reload: Option<ReloadReport>,
}

impl Response {
    pub fn ok(message: impl Into<String>) -> Self {
        Self {
            ok: true,
            message: Some(message.into()),
            status: None,
            reload: None,
        }
    }

    pub fn error(message: impl Into<String>) -> Self {
        Self {
            ok: false,
            message: Some(message.into()),
            status: None,
            reload: None,
        }
    }
}

/// A request for the agent's main loop, with where to send its answer.
pub type Command = (Request, oneshot::Sender<Response>);

/// How a reload ended, carried by the admin response (`ha-user reload`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadReport {
    pub outcome: ReloadOutcome,
    /// The step that failed (`rolled_back`, `incomplete`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<ReloadStep>,
    /// What is not as the running config wants it (`incomplete`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub left: Vec<String>,
}
