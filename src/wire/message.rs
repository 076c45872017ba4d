//! The messages between a parent and a child: the handshake, tasks and their outcomes,
//! log records, and recalls on a pool worker's recall channel.

use bytes::{BufMut, BytesMut};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use serde_bytes::ByteBuf;

use super::frame::seal_frame;
use super::{decode_value, frame_into};

/// Version of this protocol; both sides must agree.
pub(crate) const PROTOCOL_VERSION: u32 = 3;

/// Length of a recall on a pool worker's recall channel: the number (in the order the
/// worker received them) of the last task the parent sent, little-endian. The worker
/// gives back every task up to it that it has not started and answers
/// [`Up::Recalled`].
pub(crate) const RECALL_LEN: usize = 8;

/// The recall-channel message that carries a worker's arena file (no task has this
/// number).
pub(crate) const ARENA_MARK: u64 = u64::MAX;

/// A recall of the tasks up to number `upto` (see [`RECALL_LEN`]).
pub(crate) fn recall(upto: u64) -> [u8; RECALL_LEN] {
    upto.to_le_bytes()
}

/// The `upto` of a recall.
pub(crate) fn recall_upto(msg: [u8; RECALL_LEN]) -> u64 {
    u64::from_le_bytes(msg)
}

/// What a child is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Role {
    /// Run one target, send its outcome, exit.
    Process,
    /// Serve tasks for a pool, in order, until `Shutdown` or the end of the channel.
    Worker,
}

/// First frame from the parent.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Hello {
    pub(crate) version: u32,
    pub(crate) fingerprint: u64,
    pub(crate) name: String,
    /// Python's `_identity`: `[3]` for `Process-3`, `[3, 1]` for `Process-3:1`.
    pub(crate) identity: Vec<u32>,
    /// The parent's own name (`MainProcess`, `Process-3`): the child's
    /// `parent_process()`, with the pid from its command line.
    pub(crate) parent_name: String,
    pub(crate) role: Role,
    /// A pool's initializer: runs once before `Ready`.
    pub(crate) init: Option<Run>,
    /// The most verbose level the parent's subscriber wants (0 = off, 1 = ERROR ..
    /// 5 = TRACE): events above it are disabled in the child and cost nothing.
    pub(crate) log_level: u8,
    /// The parent's subscriber is `log_to_stderr`'s: print events here in its format.
    pub(crate) log_print: bool,
}

/// Run one target.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Run {
    pub(crate) id: u64,
    /// Offset of the target's entry point from the executable's load base.
    pub(crate) target: u64,
    pub(crate) target_name: String,
    pub(crate) args: ByteBuf,
}

/// [`Down`] as a worker decodes it: a task's arguments are borrowed from the frame.
#[derive(Debug, Deserialize)]
pub(crate) enum DownIn<'a> {
    Hello(serde::de::IgnoredAny),
    #[serde(borrow)]
    Run(RunIn<'a>),
    Skip {
        id: u64,
    },
    Shutdown,
    Arena(Arena),
    #[serde(borrow)]
    RunShared(RunShared<'a>),
}

/// A worker's arena for large arguments: a memory file of `size` bytes the parent maps
/// too. The file itself went first, on the worker's recall channel (a message of
/// [`ARENA_MARK`] with the descriptor attached), sealed so that only the parent's
/// mapping writes it and nobody can shrink it under the parent.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Arena {
    pub(crate) size: u64,
}

/// [`Run`] whose arguments are bytes `offset..offset + len` of the worker's arena. The
/// parent writes them before it sends this and not again until the task is answered.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct RunShared<'a> {
    pub(crate) id: u64,
    pub(crate) target: u64,
    pub(crate) target_name: &'a str,
    pub(crate) offset: u64,
    pub(crate) len: u64,
}

/// [`Run`] with borrowed arguments (see [`DownIn`]).
#[derive(Debug, Deserialize)]
pub(crate) struct RunIn<'a> {
    pub(crate) id: u64,
    pub(crate) target: u64,
    pub(crate) target_name: &'a str,
    pub(crate) args: &'a [u8],
}

/// Parent to child.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Down {
    Hello(Hello),
    Run(Run),
    /// Do not run task `id` if it has not started (its caller gave up).
    Skip {
        id: u64,
    },
    /// Finish the tasks already sent, then exit.
    Shutdown,
    /// The worker's arena (see [`Arena`]), before the first [`RunShared`].
    Arena(Arena),
    /// Read by workers as [`DownIn`] only.
    #[serde(skip_deserializing)]
    RunShared(RunShared<'static>),
}

/// Child to parent.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Up {
    Ready {
        version: u32,
        pid: u32,
    },
    Refused {
        reason: String,
    },
    /// The pool's initializer failed; the child exits.
    InitFailed {
        outcome: Outcome,
    },
    Done {
        id: u64,
        outcome: Outcome,
    },
    /// A `tracing` event emitted in the child.
    Log(LogRecord),
    /// The answer to a recall of the tasks up to number `upto`: tasks `after + 1 ..=
    /// upto` are given back and will not run (nor be answered); the ones up to `after`
    /// run (or ran) here.
    Recalled {
        after: u64,
        upto: u64,
    },
}

/// A child's `tracing` event as it crosses.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct LogRecord {
    /// 1 = ERROR .. 5 = TRACE.
    pub(crate) level: u8,
    pub(crate) target: String,
    pub(crate) message: String,
    /// The event's other fields, `key=value` separated by spaces.
    pub(crate) fields: String,
    /// The pool task the child was running when the event was emitted (on any of its
    /// threads), if any.
    pub(crate) task: Option<u64>,
}

/// What running a target produced.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Outcome {
    /// The encoded return value.
    Value(ByteBuf),
    Panicked {
        message: String,
        location: Option<String>,
    },
    Encode {
        type_name: String,
        reason: String,
    },
    Decode {
        type_name: String,
        reason: String,
    },
    /// The child refused the target (not a function of this executable).
    BadTarget {
        reason: String,
    },
    /// The task was skipped on request (`Down::Skip`).
    Skipped,
}

impl Outcome {
    /// What the caller gets: the decoded value or the matching error. Does not consume
    /// the outcome, so a result can be read again (`Process::join` twice).
    pub(crate) fn to_result<R: DeserializeOwned>(&self, name: &str) -> crate::Result<R> {
        use crate::Error;
        match self {
            Outcome::Value(bytes) => decode_value::<R>(bytes).map_err(Error::decode::<R>),
            Outcome::Panicked { message, location } => Err(Error::Panicked {
                message: message.clone(),
                location: location.clone(),
                name: name.to_owned(),
            }),
            Outcome::Encode { type_name, reason } => Err(Error::Encode {
                type_name: type_name.clone(),
                reason: reason.clone(),
            }),
            Outcome::Decode { type_name, reason } => Err(Error::Decode {
                type_name: type_name.clone(),
                reason: reason.clone(),
            }),
            Outcome::BadTarget { reason } => Err(Error::UnsupportedTarget {
                name: name.to_owned(),
                reason: reason.clone(),
            }),
            Outcome::Skipped => Err(Error::Cancelled),
        }
    }
}

/// The start of a `Down::Run` frame, appended to `buf`: everything up to its arguments,
/// which the caller sends next, `args_len` bytes of them. The dispatcher sends one per
/// task; the arguments are never copied into an owned [`Run`], nor (when large) into
/// the outgoing buffer. With the arguments after it, it is the frame [`frame_into`]
/// writes for `Down::Run` (tested).
///
/// False, with nothing left in `buf`, if the frame would be over the limit (the pool
/// refuses such arguments at submission; this is the backstop).
#[must_use = "a frame over the limit is not written"]
pub(crate) fn run_frame_head(
    buf: &mut BytesMut,
    id: u64,
    target: u64,
    target_name: &str,
    args_len: usize,
) -> bool {
    #[derive(Serialize)]
    struct RunRef<'a> {
        id: u64,
        target: u64,
        target_name: &'a str,
        #[serde(with = "serde_bytes")]
        args: &'a [u8],
    }
    /// Mirrors [`Down`] up to `Run`: same variant names and indices.
    #[derive(Serialize)]
    enum DownRef<'a> {
        #[allow(dead_code)]
        Hello(()),
        Run(RunRef<'a>),
    }
    let start = buf.len();
    let Ok(bin_len) = u32::try_from(args_len) else {
        return false;
    };
    // The message with empty arguments ends with their empty `bin 8` (0xc4 0x00): the
    // arguments are the last field. That header is replaced by the real one.
    let run = DownRef::Run(RunRef {
        id,
        target,
        target_name,
        args: &[],
    });
    if !frame_into(buf, &run) {
        return false;
    }
    if !buf.ends_with(&[0xc4, 0x00]) {
        unreachable!("an empty byte string encodes as bin 8 of length 0");
    }
    buf.truncate(buf.len() - 2);
    // Writing into a BytesMut cannot fail.
    drop(rmp::encode::write_bin_len(
        &mut (&mut *buf).writer(),
        bin_len,
    ));
    seal_frame(buf, start, buf.len() - start - 4 + args_len)
}
