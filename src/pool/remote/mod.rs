//! The pool's remote backend: tasks run on nodes (this same executable in node mode)
//! through Redis Streams (DESIGN.md §10). This module holds what a parent needs: the
//! configuration ([`Redis`]), the frames and keys (`frame`), the build fingerprint, and
//! the dispatcher that stands where the local one does (`client`).

pub(crate) mod client;
pub(crate) mod fingerprint;
pub(crate) mod frame;
pub(crate) mod reaper;

use std::path::PathBuf;

use crate::error::{Error, Result};

/// Where a pool's tasks run when not in local processes: nodes reached through a
/// Redis (or Valkey) server, with every frame authenticated by a shared key.
///
/// ```no_run
/// # async fn f() -> procpool::Result<()> {
/// use std::time::Duration;
/// use procpool::AsyncPool;
/// use procpool::remote::Redis;
///
/// fn doubler(x: i64) -> i64 {
///     x * 2
/// }
///
/// let pool = AsyncPool::builder()
///     .backend(Redis::new("redis://127.0.0.1:6379").namespace("thumbs").key_env("PROCPOOL_KEY"))
///     .wait_for_nodes(Duration::from_secs(5))
///     .build()
///     .await?;
/// assert_eq!(pool.map(doubler, vec![5, 10, 20]).await?, vec![10, 20, 40]);
/// # Ok(()) }
/// ```
///
/// Nodes are this same executable started with `PROCPOOL_NODE=<url>` (and the same
/// namespace and key) in the environment, or running [`node`](crate::remote::node).
/// The URL is `redis://host:port`, `rediss://` for TLS (feature `redis-tls`), or
/// `unix:///path/to/socket`. Running nodes: `DEPLOY.md` and `deploy/` in the repository.
///
/// A pool keeps at most 4,096 of its tasks in Redis at once (or 256 per worker process
/// of the nodes it found at start, if that is more: twice what they can hold); the
/// others wait in the pool, in order, and count as [`queued`](crate::PoolStats::queued)
/// in its stats. A million `apply_async` calls take the parent's memory, as in a local
/// pool, not Redis's, and one given up while it waits never reaches Redis.
#[derive(Debug, Clone)]
pub struct Redis {
    pub(crate) url: String,
    pub(crate) namespace: String,
    key: KeySource,
    pub(crate) node_processes: Option<usize>,
    pub(crate) node_grace: Option<std::time::Duration>,
}

#[derive(Debug, Clone)]
enum KeySource {
    /// `PROCPOOL_KEY`, else the file `PROCPOOL_KEY_FILE` names.
    Default,
    Bytes(Vec<u8>),
    Env(String),
    File(PathBuf),
}

impl Redis {
    /// The server at `url`, namespace `default`, the key from the environment
    /// (`PROCPOOL_KEY`, else the file named by `PROCPOOL_KEY_FILE`).
    pub fn new(url: impl Into<String>) -> Redis {
        Redis {
            url: url.into(),
            namespace: "default".to_owned(),
            key: KeySource::Default,
            node_processes: None,
            node_grace: None,
        }
    }

    /// Every key goes under `{pp:<namespace>}`; parents and nodes of one namespace see
    /// each other only.
    pub fn namespace(mut self, namespace: impl Into<String>) -> Redis {
        self.namespace = namespace.into();
        self
    }

    /// The HMAC key itself.
    pub fn key(mut self, key: impl Into<Vec<u8>>) -> Redis {
        self.key = KeySource::Bytes(key.into());
        self
    }

    /// The HMAC key is the text of environment variable `var`.
    pub fn key_env(mut self, var: impl Into<String>) -> Redis {
        self.key = KeySource::Env(var.into());
        self
    }

    /// The HMAC key is the content of file `path`.
    pub fn key_file(mut self, path: impl Into<PathBuf>) -> Redis {
        self.key = KeySource::File(path.into());
        self
    }

    /// For a node: how many local worker processes run its tasks. Default: the
    /// available cores (`PROCPOOL_NODE_PROCESSES` in node mode).
    pub fn node_processes(mut self, n: usize) -> Redis {
        self.node_processes = Some(n);
        self
    }

    /// For a node: on SIGTERM it takes no new task and waits this long for the ones it
    /// holds (after that, they are its reaper's: retried or `NodeLost`). Default: 30 s
    /// (`PROCPOOL_NODE_GRACE`, in seconds, in node mode).
    pub fn node_grace(mut self, grace: std::time::Duration) -> Redis {
        self.node_grace = Some(grace);
        self
    }

    /// The key's bytes.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] if there is none, or it is empty.
    pub(crate) fn load_key(&self) -> Result<Vec<u8>> {
        let invalid = |reason: String| Error::InvalidConfig { reason };
        let from_env = |var: &str| std::env::var_os(var).map(|v| v.into_encoded_bytes());
        let from_file = |path: &std::path::Path| {
            std::fs::read(path)
                .map_err(|e| invalid(format!("cannot read the key file {}: {e}", path.display())))
        };
        let key = match &self.key {
            KeySource::Bytes(b) => b.clone(),
            KeySource::Env(var) => from_env(var)
                .ok_or_else(|| invalid(format!("the key variable {var} is not set")))?,
            KeySource::File(path) => from_file(path)?,
            KeySource::Default => match (
                from_env("PROCPOOL_KEY"),
                std::env::var_os("PROCPOOL_KEY_FILE"),
            ) {
                (Some(k), _) => k,
                (None, Some(path)) => from_file(path.as_ref())?,
                (None, None) => {
                    return Err(invalid(
                        "a remote pool needs an HMAC key: set PROCPOOL_KEY or \
                         PROCPOOL_KEY_FILE, or call Redis::key"
                            .to_owned(),
                    ));
                }
            },
        };
        if key.is_empty() {
            return Err(invalid("the HMAC key is empty".to_owned()));
        }
        Ok(key)
    }
}

/// The backend's error for a Redis failure.
pub(crate) fn backend(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Backend {
        reason: format!("{what}: {e}"),
    }
}

/// How long a blocking read (`XREAD BLOCK`, `XREADGROUP BLOCK`) waits for entries.
pub(crate) const BLOCK: std::time::Duration = std::time::Duration::from_secs(1);

/// A connection to `client`'s server for blocking reads (`XREAD BLOCK`,
/// `XREADGROUP BLOCK`): each answer is waited for up to [`BLOCK`] plus a margin, and it is
/// used for nothing else (a blocked command holds up every other one on a multiplexed
/// connection, redis-rs #643). Its owner reconnects it when a read fails.
///
/// # Errors
///
/// [`Error::Backend`] if the server cannot be reached.
pub(crate) async fn connect_blocking(
    client: &redis::Client,
) -> Result<redis::aio::MultiplexedConnection> {
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(MARGIN))
        .set_response_timeout(Some(BLOCK + MARGIN));
    client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .map_err(|e| backend("cannot connect to Redis", e))
}

/// How long an answer from Redis (other than a blocking read's) or a connection attempt
/// is waited for.
const MARGIN: std::time::Duration = std::time::Duration::from_secs(5);

/// The connection for everything but blocking reads: multiplexed, and reconnected by
/// redis-rs's `ConnectionManager` after an error (a command sent while Redis is down
/// fails at once; the next one after it is back goes through), so a Redis restart does
/// not leave a pool or a node with a dead connection for good.
pub(crate) type Con = redis::aio::ConnectionManager;

/// A [`Con`] to `client`'s server.
///
/// # Errors
///
/// [`Error::Backend`] if the server cannot be reached.
pub(crate) async fn connect(client: &redis::Client) -> Result<Con> {
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(MARGIN))
        .set_response_timeout(Some(MARGIN))
        .set_number_of_retries(2)
        .set_max_delay(std::time::Duration::from_millis(500));
    redis::aio::ConnectionManager::new_with_config(client.clone(), config)
        .await
        .map_err(|e| backend("cannot connect to Redis", e))
}

/// Whether `e` says the connection broke (the command may have run or not): what
/// [`again_once`] and the node's answer batches send once more, and what a parent's
/// writes count as Redis unreachable.
pub(crate) fn connection_broke(e: &redis::RedisError) -> bool {
    e.is_connection_dropped() || e.is_io_error()
}

/// A command or pipeline that may run twice: sent again once if the connection broke
/// (the first command on a [`Con`] after Redis restarted fails so, and the manager
/// reconnects for the next). Only for commands whose second run changes nothing
/// (`SET`, `ZADD`, reads, the node's owner-checked scripts).
pub(crate) async fn again_once<T: redis::FromRedisValue>(
    con: &mut Con,
    query: &(impl Query + ?Sized),
) -> redis::RedisResult<T> {
    match query.run(con).await {
        Err(e) if connection_broke(&e) => query.run(con).await,
        r => r,
    }
}

/// A [`redis::Cmd`] or [`redis::Pipeline`], for [`again_once`].
pub(crate) trait Query {
    fn run<T: redis::FromRedisValue>(
        &self,
        con: &mut Con,
    ) -> impl std::future::Future<Output = redis::RedisResult<T>> + Send;
}

impl Query for redis::Cmd {
    fn run<T: redis::FromRedisValue>(
        &self,
        con: &mut Con,
    ) -> impl std::future::Future<Output = redis::RedisResult<T>> + Send {
        self.query_async(con)
    }
}

impl Query for redis::Pipeline {
    fn run<T: redis::FromRedisValue>(
        &self,
        con: &mut Con,
    ) -> impl std::future::Future<Output = redis::RedisResult<T>> + Send {
        self.query_async(con)
    }
}
