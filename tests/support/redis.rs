//! A `redis-server` per test on a unix socket, and nodes: this test binary in node mode.
#![allow(dead_code, unreachable_pub)]

use std::process::{Child, Command, Stdio};
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

    fn spawn(
        server: &RedisServer,
        ns: &str,
        key: &str,
        n: usize,
        processes: usize,
        logs: Option<TempDir>,
    ) -> Nodes {
        let exe = std::env::current_exe().unwrap();
        let children = (0..n)
            .map(|i| {
                let stderr = match &logs {
                    Some(dir) => {
                        Stdio::from(std::fs::File::create(dir.path(&format!("{i}"))).unwrap())
                    }
                    None => Stdio::inherit(),
                };
                Command::new(&exe)
                    .env("PROCPOOL_NODE", &server.url)
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
