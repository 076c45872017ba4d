//! A `redis-server` per test on a unix socket, and nodes: this test binary in node mode.
#![allow(dead_code, unreachable_pub)]

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::TempDir;

/// A running `redis-server`, killed on drop.
pub struct RedisServer {
    child: Child,
    pub url: String,
    pub socket: String,
    _dir: TempDir,
}

impl RedisServer {
    /// A fresh server, or `None` (with a message) when `redis-server` is not installed,
    /// unless `PROCPOOL_REQUIRE_REDIS` is set: then a missing server fails the test.
    pub fn start() -> Option<RedisServer> {
        let dir = TempDir::new("redis");
        let socket = dir.path("redis.sock");
        let child = match spawn(&socket) {
            Ok(c) => c,
            Err(e) if std::env::var_os("PROCPOOL_REQUIRE_REDIS").is_some() => {
                panic!("PROCPOOL_REQUIRE_REDIS is set but redis-server cannot start: {e}")
            }
            Err(_) => {
                eprintln!(
                    "skipped: redis-server is not installed (Debian/Ubuntu: apt-get install \
                     redis-server); set PROCPOOL_REQUIRE_REDIS=1 to make this a failure"
                );
                return None;
            }
        };
        let mut server = RedisServer {
            child,
            url: format!("unix://{socket}"),
            socket,
            _dir: dir,
        };
        server.wait_ready();
        Some(server)
    }

    fn wait_ready(&mut self) {
        let until = Instant::now() + Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(&self.socket).is_err() {
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("redis-server exited at start: {st}");
            }
            assert!(
                Instant::now() < until,
                "redis-server did not open its socket in 10 s"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// SIGKILLs the server and starts a new one (empty: no persistence) on the same
    /// socket.
    pub fn restart(&mut self) {
        self.kill();
        self.start_again();
    }

    /// SIGKILLs the server (and reaps it).
    pub fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Starts a new, empty server on the socket of the one killed.
    pub fn start_again(&mut self) {
        self.child = spawn(&self.socket).expect("redis-server starts again");
        self.wait_ready();
    }

    /// A connection for the test's own commands.
    pub async fn connect(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url.as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }
}

fn spawn(socket: &str) -> std::io::Result<Child> {
    Command::new("redis-server")
        .args([
            "--port",
            "0",
            "--unixsocket",
            socket,
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Node processes (this test binary with `PROCPOOL_NODE` set), killed on drop.
pub struct Nodes(Vec<Child>, Option<TempDir>);

impl Nodes {
    /// `n` nodes of `processes` workers each, in namespace `ns`, with key `key`; their
    /// logs go to the test's stderr.
    pub fn start(server: &RedisServer, ns: &str, key: &str, n: usize, processes: usize) -> Nodes {
        Nodes::spawn(server, ns, key, n, processes, None)
    }

    /// As [`Nodes::start`], with each node's log kept for [`Nodes::log`].
    pub fn start_logged(
        server: &RedisServer,
        ns: &str,
        key: &str,
        n: usize,
        processes: usize,
    ) -> Nodes {
        Nodes::spawn(
            server,
            ns,
            key,
            n,
            processes,
            Some(TempDir::new("node-logs")),
        )
    }

    /// One logged node per url in `urls` (a [`Proxy`]'s, say), as [`Nodes::start_logged`].
    pub fn start_via(urls: &[&str], ns: &str, key: &str, processes: usize) -> Nodes {
        Nodes::spawn_at(urls, ns, key, processes, Some(TempDir::new("node-logs")))
    }

    fn spawn(
        server: &RedisServer,
        ns: &str,
        key: &str,
        n: usize,
        processes: usize,
        logs: Option<TempDir>,
    ) -> Nodes {
        let urls = vec![server.url.as_str(); n];
        Nodes::spawn_at(&urls, ns, key, processes, logs)
    }

    fn spawn_at(
        urls: &[&str],
        ns: &str,
        key: &str,
        processes: usize,
        logs: Option<TempDir>,
    ) -> Nodes {
        let exe = std::env::current_exe().unwrap();
        let children = urls
            .iter()
            .enumerate()
            .map(|(i, url)| {
                let stderr = match &logs {
                    Some(dir) => {
                        Stdio::from(std::fs::File::create(dir.path(&format!("{i}"))).unwrap())
                    }
                    None => Stdio::inherit(),
                };
                Command::new(&exe)
                    .env("PROCPOOL_NODE", url)
                    .env("PROCPOOL_NAMESPACE", ns)
                    .env("PROCPOOL_KEY", key)
                    .env("PROCPOOL_NODE_PROCESSES", processes.to_string())
                    .stdout(Stdio::null())
                    .stderr(stderr)
                    .spawn()
                    .unwrap()
            })
            .collect();
        Nodes(children, logs)
    }

    /// What node `pid` has logged so far (nodes started with [`Nodes::start_logged`]).
    pub fn log(&self, pid: u32) -> String {
        let i = self
            .0
            .iter()
            .position(|c| c.id() == pid)
            .expect("one of these nodes");
        let dir = self.1.as_ref().expect("nodes started with start_logged");
        std::fs::read_to_string(dir.path(&format!("{i}"))).unwrap_or_default()
    }

    /// Sends `signal` (`STOP`, `CONT`, `TERM`...) to node `pid`.
    pub fn signal(&self, pid: u32, signal: &str) {
        let st = Command::new("kill")
            .args([&format!("-{signal}"), &pid.to_string()])
            .status()
            .unwrap();
        assert!(st.success());
    }

    /// SIGKILLs the node `pid` (and reaps it).
    pub fn kill(&mut self, pid: u32) {
        let c = self
            .0
            .iter_mut()
            .find(|c| c.id() == pid)
            .expect("one of these nodes");
        c.kill().unwrap();
        c.wait().unwrap();
    }

    /// SIGTERMs the node `pid`.
    pub fn terminate(&self, pid: u32) {
        self.signal(pid, "TERM");
    }

    /// Waits up to `limit` for node `pid` to exit; its status.
    pub fn wait(&mut self, pid: u32, limit: Duration) -> std::process::ExitStatus {
        let c = self
            .0
            .iter_mut()
            .find(|c| c.id() == pid)
            .expect("one of these nodes");
        let until = Instant::now() + limit;
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                return st;
            }
            assert!(
                Instant::now() < until,
                "node {pid} still runs after {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn pids(&self) -> Vec<u32> {
        self.0.iter().map(Child::id).collect()
    }
}

impl Drop for Nodes {
    fn drop(&mut self) {
        for c in &mut self.0 {
            // A stopped node dies of SIGKILL too.
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A namespace of its own for each test.
pub fn namespace(tag: &str) -> String {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{tag}-{}-{n}", std::process::id())
}

/// A unix-socket proxy in front of a server that can be cut off as a network can: its
/// connections stay open (new ones are accepted too) but nothing crosses, the bytes sent
/// meanwhile are held, and on [`Proxy::heal`] they are delivered, late, in order.
pub struct Proxy {
    pub url: String,
    state: Arc<ProxyState>,
    _dir: TempDir,
}

#[derive(Default)]
struct ProxyState {
    cut: AtomicBool,
    links: Mutex<Vec<Arc<Link>>>,
    /// Every byte held on its way to the server while cut.
    held_upstream: Mutex<Vec<u8>>,
}

/// One direction of one connection.
struct Link {
    upstream: bool,
    inner: Mutex<LinkInner>,
}

struct LinkInner {
    to: UnixStream,
    held: Vec<u8>,
    eof: bool,
}

impl Proxy {
    /// A proxy to `server`, forwarding.
    pub fn start(server: &RedisServer) -> Proxy {
        let dir = TempDir::new("redis-proxy");
        let socket = dir.path("proxy.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let state = Arc::new(ProxyState::default());
        let (st, upstream) = (Arc::clone(&state), server.socket.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(server) = UnixStream::connect(&upstream) else {
                    continue;
                };
                for (from, to, up) in [
                    (
                        client.try_clone().unwrap(),
                        server.try_clone().unwrap(),
                        true,
                    ),
                    (server, client, false),
                ] {
                    let link = Arc::new(Link {
                        upstream: up,
                        inner: Mutex::new(LinkInner {
                            to,
                            held: Vec::new(),
                            eof: false,
                        }),
                    });
                    st.links.lock().unwrap().push(Arc::clone(&link));
                    let st = Arc::clone(&st);
                    std::thread::spawn(move || link.pump(from, &st));
                }
            }
        });
        Proxy {
            url: format!("unix://{socket}"),
            state,
            _dir: dir,
        }
    }

    /// Stops forwarding: from here on bytes are held, in both directions.
    pub fn cut(&self) {
        self.state.cut.store(true, Ordering::SeqCst);
    }

    /// Delivers what was held and forwards again.
    pub fn heal(&self) {
        self.state.cut.store(false, Ordering::SeqCst);
        for link in self.state.links.lock().unwrap().iter() {
            let mut inner = link.inner.lock().unwrap();
            let held = std::mem::take(&mut inner.held);
            // The other end may be gone: what it sent is delivered as far as it can be.
            if inner.to.write_all(&held).is_ok() && inner.eof {
                inner.to.shutdown(Shutdown::Write).ok();
            }
        }
    }

    /// Whether the bytes held on their way to the server include `needle`.
    pub fn held_upstream_contains(&self, needle: &str) -> bool {
        let held = self.state.held_upstream.lock().unwrap();
        held.windows(needle.len()).any(|w| w == needle.as_bytes())
    }
}

impl Link {
    fn pump(&self, mut from: UnixStream, state: &ProxyState) {
        let mut buf = vec![0; 64 << 10];
        loop {
            let n = from.read(&mut buf).unwrap_or(0);
            let mut inner = self.inner.lock().unwrap();
            if state.cut.load(Ordering::SeqCst) {
                if n == 0 {
                    inner.eof = true;
                    return;
                }
                inner.held.extend_from_slice(&buf[..n]);
                if self.upstream {
                    state
                        .held_upstream
                        .lock()
                        .unwrap()
                        .extend_from_slice(&buf[..n]);
                }
                continue;
            }
            // Healed, but not flushed yet: the held bytes go first.
            let held = std::mem::take(&mut inner.held);
            if inner.to.write_all(&held).is_err() {
                return;
            }
            if n == 0 {
                inner.to.shutdown(Shutdown::Write).ok();
                return;
            }
            if inner.to.write_all(&buf[..n]).is_err() {
                return;
            }
        }
    }
}

/// A pool whose tasks run on the nodes of namespace `ns` on `server` (key `key`),
/// waiting up to 20 s for the first.
pub async fn remote_pool(server: &RedisServer, ns: &str, key: &str) -> procpool::AsyncPool {
    procpool::AsyncPool::builder()
        .backend(
            procpool::remote::Redis::new(&server.url)
                .namespace(ns)
                .key(key),
        )
        .wait_for_nodes(Duration::from_secs(20))
        .build()
        .await
        .unwrap()
}

/// The task stream of namespace `ns` (one build: this test binary's).
pub async fn task_stream(con: &mut redis::aio::MultiplexedConnection, ns: &str) -> String {
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{{pp:{ns}}}:b:*:tasks"))
        .query_async(con)
        .await
        .unwrap();
    assert_eq!(keys.len(), 1, "{keys:?}");
    keys.into_iter().next().unwrap()
}

/// Waits until the sorted set `key` has `n` members, looking every 10 ms for at most
/// `limit`; how many it had at the last look.
pub async fn zcard_reaches(
    con: &mut redis::aio::MultiplexedConnection,
    key: &str,
    n: usize,
    limit: Duration,
) -> usize {
    let deadline = Instant::now() + limit;
    loop {
        let got: usize = redis::cmd("ZCARD").arg(key).query_async(con).await.unwrap();
        if got == n || Instant::now() >= deadline {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
