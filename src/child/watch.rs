//! A child's watcher thread: it exits the process as soon as the parent's end of the
//! channel closes, and answers a pool worker's recalls (the [`Gate`] it shares with the
//! main thread), handing the arena's file over to the main thread ([`Handover`]).

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::EXIT_ORPHANED;
use crate::wire::{self, Outbox, Up};

/// The arena's file, from the watcher (which reads the recall channel it came on) to the
/// main thread.
#[derive(Default)]
pub(super) struct Handover {
    fd: Mutex<Option<OwnedFd>>,
    came: std::sync::Condvar,
}

impl Handover {
    fn give(&self, fd: OwnedFd) {
        *self.fd.lock().unwrap_or_else(|p| p.into_inner()) = Some(fd);
        self.came.notify_all();
    }

    pub(super) fn take(&self, limit: Duration) -> Result<OwnedFd, String> {
        let slot = self.fd.lock().unwrap_or_else(|p| p.into_inner());
        let (mut slot, _) = self
            .came
            .wait_timeout_while(slot, limit, |fd| fd.is_none())
            .unwrap_or_else(|p| p.into_inner());
        slot.take()
            .ok_or_else(|| format!("its file did not arrive within {limit:?}"))
    }
}

/// Which tasks a pool worker has started, and which the parent took back: the one
/// place where the main thread (starting tasks) and the watcher (answering recalls)
/// meet, so that every task is either started here or given back, never both.
#[derive(Debug, Default)]
pub(super) struct Gate {
    /// The number of the last task started (or answered as skipped).
    started: u64,
    /// Tasks `lo + 1 ..= hi` were given back: they are dropped unanswered.
    revoked: VecDeque<(u64, u64)>,
}

impl Gate {
    /// Called before task `seq` runs: false if it was given back.
    pub(super) fn start(&mut self, seq: u64) -> bool {
        while self.revoked.front().is_some_and(|&(_, hi)| hi < seq) {
            self.revoked.pop_front();
        }
        if self.revoked.iter().any(|&(lo, hi)| lo < seq && seq <= hi) {
            return false;
        }
        self.started = self.started.max(seq);
        true
    }

    /// The parent asks for every task up to `upto` not started yet: gives back
    /// `after + 1 ..= upto` and returns `after`.
    fn recall(&mut self, upto: u64) -> u64 {
        let after = self.started.min(upto);
        if after < upto {
            self.revoked.push_back((after, upto));
        }
        after
    }
}

/// The watcher's part of a pool worker's recall channel: the socket, the gate, and
/// where answers go.
type Control = (UnixStream, Arc<Mutex<Gate>>, Outbox, Arc<Handover>);

/// Watches the parent on a thread of its own while the main thread runs tasks:
///
/// - exits as soon as the parent's end of the channel closes (the parent died, or gave
///   up on this child): the parent-death signal alone misses a parent that gave up
///   while staying alive, for example a cancelled pool build while an initializer runs.
///   It polls for the peer's hang-up without reading, so it never takes a frame meant
///   for the thread that serves tasks;
/// - answers recalls on a pool worker's recall channel (`wire::RECALL`): the tasks sent
///   ahead that have not started are given back at once, even while a long task runs,
///   so the parent can run them on an idle worker.
pub(super) fn watch_parent(stream: &UnixStream, control: Option<Control>) {
    let Ok(stream) = stream.try_clone() else {
        return;
    };
    let spawned = std::thread::Builder::new()
        .name("procpool-eof-watch".into())
        .spawn(move || {
            use rustix::event::{PollFd, PollFlags, poll};
            let mut control = control;
            loop {
                let mut fds = vec![PollFd::new(&stream, PollFlags::RDHUP)];
                if let Some((c, ..)) = &control {
                    fds.push(PollFd::new(c, PollFlags::IN));
                }
                match poll(&mut fds, None) {
                    Ok(_) => {
                        let got = fds[0].revents();
                        if got.intersects(PollFlags::RDHUP | PollFlags::HUP | PollFlags::ERR) {
                            std::process::exit(EXIT_ORPHANED);
                        }
                        let ready = fds.get(1).is_some_and(|f| !f.revents().is_empty());
                        drop(fds);
                        if ready
                            && let Some(c) = &control
                            && !answer_recall(c)
                        {
                            // The parent closed it: no more recalls; keep watching.
                            control = None;
                        }
                    }
                    Err(rustix::io::Errno::INTR) => {}
                    Err(_) => std::process::exit(EXIT_ORPHANED),
                }
            }
        });
    if let Err(e) = spawned {
        eprintln!("procpool: cannot watch the parent channel: {e}");
    }
}

/// Reads one recall and answers it; false once the recall channel is closed or broken.
fn answer_recall((sock, gate, outbox, handover): &Control) -> bool {
    use std::io::Read;
    let mut msg = [0u8; wire::RECALL_LEN];
    // The arena's file comes with the first byte of its message.
    let (got, fd) = match wire::fdpass::recv_with_fd(sock, &mut msg) {
        Ok((0, _)) | Err(_) => return false,
        Ok(got) => got,
    };
    if got < msg.len() && (&*sock).read_exact(&mut msg[got..]).is_err() {
        return false;
    }
    let upto = wire::recall_upto(msg);
    if upto == wire::ARENA_MARK {
        match fd {
            Some(fd) => handover.give(fd),
            // A parent that broke the protocol: the main thread's wait for the file
            // gives up and says so.
            None => tracing::error!("procpool: the arena's message came without its file"),
        }
        return true;
    }
    let after = gate.lock().unwrap_or_else(|p| p.into_inner()).recall(upto);
    // A failed send means the parent is gone; the EOF watch ends the process.
    outbox.send(&Up::Recalled { after, upto }).is_ok()
}
