//! A Redis and nodes on this machine, for the examples (feature `redis`): a
//! `redis-server` of its own on a unix socket, no persistence, and nodes that are the
//! example's own binary in node mode (`PROCPOOL_NODE`). Everything is killed on drop.
#![allow(dead_code, unreachable_pub)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// What to install when `redis-server` is missing.
pub const INSTALL_REDIS: &str = "install redis-server: `apt-get install redis-server` (Debian, \
    Ubuntu), `dnf install redis` (Fedora) or `brew install redis` (macOS)";

pub struct LocalCluster {
    /// The server's url (`unix://...`).
    pub url: String,
    /// The nodes' pids.
    pub nodes: Vec<u32>,
    children: Vec<Child>,
    dir: PathBuf,
}

impl LocalCluster {
    /// A `redis-server` and `nodes` nodes of `processes` workers, in namespace `ns`
    /// with key `key`; `Ok(None)` if `redis-server` is not installed.
    pub async fn start(
        ns: &str,
        key: &str,
        nodes: usize,
        processes: usize,
    ) -> Result<Option<LocalCluster>, Box<dyn std::error::Error>> {
        let dir = std::env::temp_dir().join(format!("procpool-cluster-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let socket = dir.join("redis.sock");
        let redis = Command::new("redis-server")
            .args(["--port", "0", "--save", "", "--appendonly", "no"])
            .arg("--unixsocket")
            .arg(&socket)
            .stdout(Stdio::null())
            .spawn();
        let redis = match redis {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::remove_dir_all(&dir)?;
                return Ok(None);
            }
            Err(e) => return Err(format!("cannot start redis-server: {e}").into()),
        };
        let mut cluster = LocalCluster {
            url: format!("unix://{}", socket.display()),
            nodes: Vec::new(),
            children: vec![redis],
            dir,
        };
        let until = Instant::now() + Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            if Instant::now() > until {
                return Err("redis-server did not open its socket within 10 s".into());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // This same executable with PROCPOOL_NODE set becomes a node before main.
        for _ in 0..nodes {
            let node = Command::new(std::env::current_exe()?)
                .env("PROCPOOL_NODE", &cluster.url)
                .env("PROCPOOL_NAMESPACE", ns)
                .env("PROCPOOL_KEY", key)
                .env("PROCPOOL_NODE_PROCESSES", processes.to_string())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?;
            cluster.nodes.push(node.id());
            cluster.children.push(node);
        }
        Ok(Some(cluster))
    }

    /// A file path in the cluster's own temporary directory.
    pub fn path(&self, name: &str) -> String {
        self.dir.join(name).to_string_lossy().into_owned()
    }

    /// SIGKILLs node `pid`.
    pub fn kill_node(&mut self, pid: u32) -> std::io::Result<()> {
        if let Some(c) = self.children.iter_mut().find(|c| c.id() == pid) {
            c.kill()?;
            c.wait()?;
        }
        Ok(())
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for c in &mut self.children {
            // Gone already is fine: the point is that nothing outlives the example.
            if c.kill().is_ok() {
                c.wait().ok();
            }
        }
        std::fs::remove_dir_all(&self.dir).ok();
    }
}
