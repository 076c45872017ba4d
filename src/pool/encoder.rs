//! procpool's encoder thread: where large map items are encoded for their workers (see
//! `WorkerConn::stage`), so that a user's `Serialize` of megabytes never runs on a
//! dispatcher, which meanwhile goes on answering results, cancels and deadlines.

use std::sync::OnceLock;
use std::sync::mpsc::Sender;

/// Work for the encoder: it must not unwind (see `WorkerConn::stage`).
pub(crate) type Job = Box<dyn FnOnce() + Send>;

/// Runs `job` on the encoder thread, in the order given; on the caller's thread if that
/// thread cannot be started (a warning says so).
pub(crate) fn run(job: Job) {
    static ENCODER: OnceLock<Option<Sender<Job>>> = OnceLock::new();
    let tx = ENCODER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        let started = std::thread::Builder::new()
            .name("procpool-encode".into())
            .spawn(move || {
                for job in rx {
                    job();
                }
            });
        match started {
            Ok(_) => Some(tx),
            Err(e) => {
                tracing::warn!(
                    "procpool: cannot start the encoder thread ({e}); large map items are \
                     encoded by the dispatcher"
                );
                None
            }
        }
    });
    match tx {
        // The thread never ends (it holds the receiver), so a send cannot fail; if it
        // did, the job runs here.
        Some(tx) => {
            if let Err(failed) = tx.send(job) {
                (failed.0)();
            }
        }
        None => job(),
    }
}
