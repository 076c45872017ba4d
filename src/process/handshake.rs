//! Starting the conversation with a fresh child: the same for a `Process` and a pool
//! worker.

use std::os::unix::net::UnixStream;

use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

use super::ChildHandle;
use crate::error::{Error, Result};
use crate::target::Image;
use crate::wire::{
    Channel, DEFAULT_MAX_FRAME, Down, Hello, PROTOCOL_VERSION, Role, Run, Up, WireError,
};

/// The parent's end of a child's channel, as the current runtime's I/O.
pub(crate) type ChildChannel = Channel<OwnedReadHalf, OwnedWriteHalf>;

/// Registers the parent's end of a fresh child's channel with the current runtime.
pub(crate) fn channel(stream: UnixStream) -> std::io::Result<ChildChannel> {
    stream.set_nonblocking(true)?;
    let (rd, wr) = tokio::net::UnixStream::from_std(stream)?.into_split();
    Ok(Channel::new(rd, wr, DEFAULT_MAX_FRAME))
}

/// The first message to a child: who it is, what it is for, and the build it must be.
pub(crate) fn hello(name: &str, identity: Vec<u32>, role: Role, init: Option<Run>) -> Result<Down> {
    let fingerprint = Image::get()
        .map_err(|reason| Error::spawn(reason, None))?
        .fingerprint();
    Ok(Down::Hello(Hello {
        version: PROTOCOL_VERSION,
        fingerprint,
        name: name.to_owned(),
        identity,
        parent_name: crate::runtime::current_process().name,
        role,
        init,
        log_level: crate::log::current_level(),
        log_print: crate::log::children_print(),
    }))
}

/// Sends `first` (a `Hello`, perhaps with more behind it) and waits for the child's
/// `Ready`, forwarding its log events meanwhile (an initializer may log).
///
/// On failure the child has ended (or was killed, if it misbehaved) and is reaped; the
/// error says why: the initializer's own error, or [`Error::Spawn`].
pub(crate) async fn handshake(
    chan: &mut ChildChannel,
    child: &ChildHandle,
    name: &str,
    first: &[Down],
) -> Result<()> {
    // A child that refuses closes its end; the reason is in the reply read below.
    let sent = chan.send_all(first).await;
    if let Err(e) = &sent
        && e.kind() == std::io::ErrorKind::InvalidInput
    {
        // Nothing was written (a frame over the limit is refused before it is): the
        // child would wait for its Hello forever, and we for its Ready.
        let err = misbehaved(child, format!("cannot send {name} its first messages: {e}"));
        child.wait(&mut None).await;
        return Err(err);
    }
    let reply = loop {
        match chan.recv::<Up>().await {
            Ok(Some(Up::Log(record))) => crate::log::reemit(name, child.pid, &record),
            other => break other,
        }
    };
    let err = match reply {
        Ok(Some(Up::Ready { .. })) if sent.is_ok() => return Ok(()),
        Ok(Some(Up::InitFailed { outcome })) => outcome
            .to_result::<()>(name)
            .err()
            .unwrap_or_else(|| Error::spawn("the initializer failed", None)),
        Ok(Some(Up::Refused { reason })) => {
            Error::spawn(format!("{name} refused to run: {reason}"), None)
        }
        Ok(None) | Ok(Some(Up::Ready { .. })) | Err(WireError::Truncated | WireError::Io(_)) => {
            let exit = child.wait(&mut None).await;
            return Err(Error::spawn(
                format!("{name} ended with {exit} before it was ready"),
                None,
            ));
        }
        Ok(Some(other)) => misbehaved(child, format!("{name} sent {other:?} instead of Ready")),
        Err(e) => misbehaved(child, format!("{name} sent garbage: {e}")),
    };
    child.wait(&mut None).await;
    Err(err)
}

/// Kills a child that broke the protocol, before its channel closes, so its exit status
/// says it was killed.
fn misbehaved(child: &ChildHandle, reason: String) -> Error {
    if let Err(e) = child.signal(rustix::process::Signal::KILL) {
        tracing::warn!(target: "procpool::lifecycle", pid = child.pid,
            "cannot kill a child that broke the protocol: {e}");
    }
    Error::spawn(reason, None)
}
