//! Lost tasks: entries a node took and stopped heartbeating (it died, or was cut off)
//! are claimed back, queued again with their attempt raised while retries are left,
//! else answered `NodeLost` to their parent. One reaper a second per build, elected
//! among its nodes and parents with `SET NX PX`.

use std::sync::Arc;
use std::time::Duration;

use super::Con;
use super::frame::{self, End, GROUP, Keys, ResultFrame, TaskFrame};

/// A node renews its entries' idle time this often (`XCLAIM ... JUSTID`).
pub(crate) const HEARTBEAT: Duration = Duration::from_secs(1);

/// An entry idle this long (three heartbeats) is its node's no longer.
pub(crate) const LOST_AFTER: Duration = Duration::from_millis(3000);

/// What a reaper needs.
#[derive(Debug, Clone)]
pub(crate) struct Reaper {
    pub(crate) keys: Keys,
    pub(crate) build: &'static str,
    pub(crate) key: Arc<Vec<u8>>,
    /// Its consumer name (entries it claims are its own until it handles them).
    pub(crate) me: String,
}

impl Reaper {
    /// Reaps once a heartbeat when elected, until dropped.
    pub(crate) async fn run(self, mut con: Con) {
        loop {
            tokio::time::sleep(HEARTBEAT).await;
            let elected: redis::RedisResult<Option<String>> = redis::cmd("SET")
                .arg(self.keys.reaper(self.build))
                .arg(&self.me)
                .arg("NX")
                .arg("PX")
                .arg(u64::try_from(HEARTBEAT.as_millis()).unwrap_or(1000))
                .query_async(&mut con)
                .await;
            match elected {
                Ok(Some(_)) => match self.reap(&mut con).await {
                    Ok(()) => {}
                    // No group (yet, or again after a Redis restart): nothing to reap;
                    // the next node to read makes it.
                    Err(e) if e.code() == Some("NOGROUP") => {}
                    Err(e) => {
                        tracing::warn!(target: "procpool::remote", "cannot reap lost tasks: {e}")
                    }
                },
                Ok(None) => {} // another one's turn
                Err(e) => tracing::debug!(target: "procpool::remote", "reaper election: {e}"),
            }
        }
    }

    async fn reap(&self, con: &mut Con) -> redis::RedisResult<()> {
        let stream = self.keys.tasks(self.build);
        let idle = u64::try_from(LOST_AFTER.as_millis()).unwrap_or(3000);
        let pending: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
            .arg(&stream)
            .arg(GROUP)
            .arg("IDLE")
            .arg(idle)
            .arg("-")
            .arg("+")
            .arg(100)
            .query_async(con)
            .await?;
        for (id, node, _, _) in pending {
            // Claimed only if still idle: a node that heartbeat meanwhile keeps it.
            let claimed: redis::streams::StreamClaimReply = redis::cmd("XCLAIM")
                .arg(&stream)
                .arg(GROUP)
                .arg(&self.me)
                .arg(idle)
                .arg(&id)
                .query_async(con)
                .await?;
            for entry in claimed.ids {
                self.handle(con, &stream, &node, entry).await?;
            }
        }
        Ok(())
    }

    /// An entry claimed from lost node `node`: queued again, or answered `NodeLost`;
    /// either way it leaves the stream in the same transaction.
    async fn handle(
        &self,
        con: &mut Con,
        stream: &str,
        node: &str,
        entry: redis::streams::StreamId,
    ) -> redis::RedisResult<()> {
        let mut pipe = redis::pipe();
        pipe.atomic();
        let frame = entry
            .get::<Vec<u8>>("f")
            .zip(entry.get::<Vec<u8>>("m"))
            .filter(|(f, m)| frame::verify(&self.key, f, m))
            .and_then(|(f, _)| frame::decode::<TaskFrame>(&f).ok());
        let Some(mut task) = frame else {
            tracing::warn!(target: "procpool::remote", entry = %entry.id,
                "a lost entry that fails its MAC was dropped");
            return take_off(pipe, stream, &entry.id).query_async(con).await;
        };
        if task.attempt < task.retries {
            task.attempt += 1;
            match frame::encode(&task) {
                Ok(f) => {
                    tracing::info!(target: "procpool::lifecycle", task = task.task, node,
                        attempt = task.attempt, "node lost; task queued again");
                    push_signed(&mut pipe, stream, &self.key, &f);
                    return take_off(pipe, stream, &entry.id).query_async(con).await;
                }
                Err(e) => {
                    // Decoded a moment ago, so this does not happen; if it did, the
                    // parent hears NodeLost rather than nothing.
                    tracing::error!(target: "procpool::remote", task = task.task,
                        "a lost task cannot be queued again: {e}");
                    task.attempt -= 1;
                }
            }
        }
        tracing::info!(target: "procpool::lifecycle", task = task.task, node,
            "node lost; its task fails with NodeLost");
        let result = ResultFrame {
            task: task.task,
            attempt: task.attempt,
            worker: format!("node-{node}"),
            end: End::Lost {
                node: node.to_owned(),
            },
            events: Default::default(),
        };
        match frame::encode(&result) {
            Ok(f) => push_signed(&mut pipe, &self.keys.results(&task.parent), &self.key, &f),
            // Its parent's own deadline, or its handle's drop, is then all that ends it.
            Err(e) => tracing::error!(target: "procpool::remote", task = task.task,
                "cannot encode a NodeLost answer: {e}"),
        }
        take_off(pipe, stream, &entry.id).query_async(con).await
    }
}

/// Appends the ack and deletion of `entry` of `stream` to `pipe`.
fn take_off(mut pipe: redis::Pipeline, stream: &str, entry: &str) -> redis::Pipeline {
    pipe.cmd("XACK").arg(stream).arg(GROUP).arg(entry).ignore();
    pipe.cmd("XDEL").arg(stream).arg(entry).ignore();
    pipe
}

/// Appends an `XADD` of frame `f` and its MAC to `stream`.
fn push_signed(pipe: &mut redis::Pipeline, stream: &str, key: &[u8], f: &[u8]) {
    let m = frame::sign(key, f);
    pipe.cmd("XADD")
        .arg(stream)
        .arg("*")
        .arg("f")
        .arg(f)
        .arg("m")
        .arg(m)
        .ignore();
}
