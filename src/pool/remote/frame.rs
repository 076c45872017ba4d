//! What travels through Redis between a parent and its nodes: the key names, the task
//! and result frames, and the HMAC-SHA256 that authenticates each.

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;
use sha2::Sha256;

use std::sync::Arc;

use crate::error::{Error, ExitReason};
use crate::pool::message::{Finished, TaskResult};
use crate::wire::Outcome;

/// The keys of one namespace; the `{pp:<ns>}` hash tag keeps them in one cluster slot.
#[derive(Debug, Clone)]
pub(crate) struct Keys {
    prefix: String,
}

impl Keys {
    pub(crate) fn new(namespace: &str) -> Keys {
        Keys {
            prefix: format!("{{pp:{namespace}}}"),
        }
    }

    /// The stream of tasks for build `build`, read by its nodes' consumer group.
    pub(crate) fn tasks(&self, build: &str) -> String {
        format!("{}:b:{build}:tasks", self.prefix)
    }

    /// The nodes of build `build`: a sorted set of `<node>/<processes>` scored by when
    /// their registration expires (ms since the epoch).
    pub(crate) fn nodes(&self, build: &str) -> String {
        format!("{}:b:{build}:nodes", self.prefix)
    }

    /// Where the results for parent `parent` go.
    pub(crate) fn results(&self, parent: &str) -> String {
        format!("{}:r:{parent}", self.prefix)
    }

    /// Parent `parent` is alive while this key is (`SET ... PX`, renewed every second):
    /// nodes stop its tasks once it expires.
    pub(crate) fn parent(&self, parent: &str) -> String {
        format!("{}:p:{parent}", self.prefix)
    }

    /// The channel cancels are published on (`<parent>/<task>`), for speed.
    pub(crate) fn cancel_channel(&self) -> String {
        format!("{}:cancel", self.prefix)
    }

    /// The cancelled tasks (`<parent>/<task>`, scored by when), for safety: a node
    /// looks here before it runs a task, so a cancel it did not hear still counts.
    pub(crate) fn cancelled(&self) -> String {
        format!("{}:cancelled", self.prefix)
    }

    /// Who reaps the build's lost entries this second (`SET NX PX`).
    pub(crate) fn reaper(&self, build: &str) -> String {
        format!("{}:b:{build}:reaper", self.prefix)
    }

    /// Frames that failed authentication or did not decode, kept for inspection.
    pub(crate) fn dead_letters(&self) -> String {
        format!("{}:dead", self.prefix)
    }
}

/// How a task is named in cancels.
pub(crate) fn cancel_name(parent: &str, task: u64) -> String {
    format!("{parent}/{task}")
}

/// How long a cancel is kept in [`Keys::cancelled`] (ms): longer than any task waits
/// in a stream in practice.
pub(crate) const CANCEL_KEPT_MS: u64 = 3_600_000;

/// The consumer group of a task stream.
pub(crate) const GROUP: &str = "nodes";

/// A task, as a parent writes it to its build's stream (field `f`, its MAC in `m`).
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct TaskFrame {
    /// The parent's id for it.
    pub(crate) task: u64,
    /// The parent: where the result goes (see [`Keys::results`]).
    pub(crate) parent: String,
    /// The build it is for.
    pub(crate) build: String,
    pub(crate) attempt: u32,
    /// How many times it may run again after its node was lost (`Builder::retries`).
    pub(crate) retries: u32,
    /// When it must be done, in ms since the epoch; 0: no deadline.
    pub(crate) deadline_ms: u64,
    pub(crate) target: u64,
    pub(crate) target_name: String,
    pub(crate) args: ByteBuf,
}

/// A task's end, as a node writes it to the parent's result stream.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct ResultFrame {
    pub(crate) task: u64,
    pub(crate) attempt: u32,
    /// `node-<id>:PoolWorker-<n>`.
    pub(crate) worker: String,
    pub(crate) end: End,
    /// The `tracing` events its worker emitted while it ran (bounded), emitted again in
    /// the parent.
    pub(crate) events: crate::log::capture::TaskEvents,
}

/// How a remote task ended.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum End {
    /// It ran: its value, or its panic, as a local worker answers.
    Ran(Outcome),
    /// Its deadline passed; its process was stopped.
    Timeout { after_ms: u64 },
    /// Its worker process died (`exitcode` as `ExitReason::exitcode` gives it).
    Died { pid: u32, exitcode: Option<i32> },
    /// The node could not run it (what it said).
    Failed { reason: String },
    /// Its node stopped heartbeating while it had the task, with no retry left.
    Lost { node: String },
}

impl End {
    /// What a local pool's answer becomes.
    pub(crate) fn from_error(e: &Error) -> End {
        match e {
            Error::Timeout { after } => End::Timeout {
                after_ms: u64::try_from(after.as_millis()).unwrap_or(u64::MAX),
            },
            Error::WorkerDied { pid, reason, .. } => End::Died {
                pid: *pid,
                exitcode: reason.exitcode(),
            },
            other => End::Failed {
                reason: other.to_string(),
            },
        }
    }
}

impl End {
    /// What the task's caller gets; `worker` ran it (`node-<id>:PoolWorker-<n>`).
    pub(crate) fn into_result(self, worker: Arc<str>) -> TaskResult {
        Err(match self {
            End::Ran(outcome) => return Ok(Finished { outcome, worker }),
            End::Timeout { after_ms } => Error::Timeout {
                after: std::time::Duration::from_millis(after_ms),
            },
            End::Died { pid, exitcode } => Error::WorkerDied {
                pid,
                name: worker.to_string(),
                reason: ExitReason::from_exitcode(exitcode),
            },
            End::Failed { reason } => Error::Backend {
                reason: format!("{worker}: {reason}"),
            },
            End::Lost { node } => Error::NodeLost { node },
        })
    }
}

/// The HMAC-SHA256 of `frame` under `key`.
pub(crate) fn sign(key: &[u8], frame: &[u8]) -> Vec<u8> {
    mac(key, frame).finalize().into_bytes().to_vec()
}

/// Whether `tag` is `frame`'s HMAC under `key` (compared in constant time).
pub(crate) fn verify(key: &[u8], frame: &[u8], tag: &[u8]) -> bool {
    mac(key, frame).verify_slice(tag).is_ok()
}

fn mac(key: &[u8], frame: &[u8]) -> Hmac<Sha256> {
    // HMAC takes a key of any length.
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC-SHA256 accepts keys of every length"));
    m.update(frame);
    m
}

/// Encodes a frame (MessagePack, field names kept).
pub(crate) fn encode<T: Serialize>(frame: &T) -> Result<Vec<u8>, Error> {
    rmp_serde::to_vec_named(frame).map_err(|e| Error::Encode {
        type_name: std::any::type_name::<T>().to_owned(),
        reason: e.to_string(),
    })
}

/// Decodes a frame that passed its MAC.
pub(crate) fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, Error> {
    rmp_serde::from_slice(bytes).map_err(|e| Error::Decode {
        type_name: std::any::type_name::<T>().to_owned(),
        reason: e.to_string(),
    })
}

/// Milliseconds since the epoch.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A random id (16 hex digits).
pub(crate) fn random_id() -> String {
    let mut b = [0u8; 8];
    // Not a secret: a failure leaves the time and pid, which are unique enough.
    if rustix::rand::getrandom(&mut b, rustix::rand::GetRandomFlags::empty()).is_err() {
        b = (now_ms() ^ (u64::from(std::process::id()) << 40)).to_le_bytes();
    }
    super::fingerprint::hex(&b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_passes_only_under_its_key_and_unchanged() {
        let frame = encode(&TaskFrame {
            task: 7,
            parent: "p".into(),
            build: "id-1".into(),
            attempt: 0,
            retries: 0,
            deadline_ms: 0,
            target: 1,
            target_name: "t".into(),
            args: ByteBuf::from(vec![1, 2, 3]),
        })
        .unwrap();
        let tag = sign(b"secret", &frame);
        assert!(verify(b"secret", &frame, &tag));
        assert!(!verify(b"other", &frame, &tag));
        let mut changed = frame.clone();
        *changed.last_mut().unwrap() ^= 1;
        assert!(!verify(b"secret", &changed, &tag));
        assert!(!verify(b"secret", &frame, &tag[..16]));
        let back: TaskFrame = decode(&frame).unwrap();
        assert_eq!((back.task, back.args.as_slice()), (7, &[1u8, 2, 3][..]));
    }
}
