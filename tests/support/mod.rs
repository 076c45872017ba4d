//! Helpers shared by the integration tests.
#![allow(dead_code, unreachable_pub)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A fresh, empty directory for one test, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("procpool-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }

    pub fn root(&self) -> &std::path::Path {
        &self.0
    }

    pub fn path(&self, name: &str) -> String {
        self.0.join(name).to_string_lossy().into_owned()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Blocks (in a child) until `path` exists: the parent's half of a file handshake.
pub fn wait_for_file(path: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !Path::new(path).exists() {
        assert!(
            Instant::now() < deadline,
            "handshake file {path} never appeared"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A pool target: waits for file `gate`, then appends `i` to `log` (one line, one
/// `write` with `O_APPEND`: lines of several processes do not mix).
pub fn gated_append(gate: String, log: String, i: u32) -> u32 {
    use std::io::Write;
    wait_for_file(&gate);
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(&log)
        .unwrap();
    f.write_all(format!("{i}\n").as_bytes()).unwrap();
    i
}

/// The numbers `gated_append` wrote to `log`, sorted (none if it is missing).
pub fn ran(log: &str) -> Vec<u32> {
    let mut ran: Vec<u32> = std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    ran.sort_unstable();
    ran
}

/// Creates `path` atomically (write then rename), so a reader never sees it half written.
pub fn write_file(path: &str, contents: &str) {
    // Unique per process and call: several children may write the same file at once.
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = format!("{path}.{}.{n}.tmp", std::process::id());
    std::fs::write(&tmp, contents).expect("write handshake file");
    std::fs::rename(&tmp, path).expect("rename handshake file");
}

/// Waits up to `limit` for `path` to appear and returns its contents.
pub fn read_file_within(path: &str, limit: Duration) -> String {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(s) = std::fs::read_to_string(path) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "{path} did not appear within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The first line of `path` once it is whole (a writer that appends may have created
/// the file and not yet written to it).
pub fn read_line_within(path: &str, limit: Duration) -> String {
    let deadline = Instant::now() + limit;
    loop {
        if let Some((line, _)) = read_file_within(path, limit).split_once('\n') {
            return line.to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "{path} had no whole line within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The state letter of a process from `/proc/PID/stat` (`R`, `S`, `Z`, ...), or `None`
/// if there is no such process.
pub fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces: the state follows ") ".
    let after = stat.rsplit_once(") ")?.1;
    after.chars().next()
}

/// True if `pid` is gone or a zombie (dead either way).
pub fn is_dead(pid: u32) -> bool {
    matches!(proc_state(pid), None | Some('Z') | Some('X'))
}

/// Waits up to `limit` for `cond`, checking every few milliseconds; returns whether it
/// held. Used only for real-process events with generous bounds, never to order events.
pub fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Direct children of this process according to `/proc` (any state, zombies included).
/// What a process is doing, for a failure message: its name, command line, and each
/// thread's name, state and wait channel.
pub fn describe_process(pid: u32) -> String {
    let read = |p: String| std::fs::read_to_string(p).unwrap_or_default();
    let cmdline = read(format!("/proc/{pid}/cmdline")).replace('\0', " ");
    let mut out = format!(
        "{pid} [{}] {cmdline}:",
        read(format!("/proc/{pid}/comm")).trim()
    );
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            let t = t.path();
            let state = read(format!("{}/stat", t.display()));
            let state = state
                .rsplit_once(") ")
                .map_or("?", |(_, r)| &r[..1])
                .to_owned();
            out += &format!(
                " {{{} {state} {}}}",
                read(format!("{}/comm", t.display())).trim(),
                read(format!("{}/wchan", t.display())).trim()
            );
        }
    }
    out
}

/// [`os_children`], each described by [`describe_process`].
pub fn describe_os_children() -> Vec<String> {
    os_children()
        .into_iter()
        .map(|(pid, _)| describe_process(pid))
        .collect()
}

pub fn os_children() -> Vec<(u32, char)> {
    let me = std::process::id();
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some((_, rest)) = stat.rsplit_once(") ") else {
            continue;
        };
        let mut f = rest.split(' ');
        let state = f.next().and_then(|s| s.chars().next()).unwrap_or('?');
        let ppid: u32 = f.next().and_then(|s| s.parse().ok()).unwrap_or(0);
        if ppid == me {
            out.push((pid, state));
        }
    }
    out
}

/// Path of example `name`, built now if needed: `cargo test` builds examples beside the
/// tests, but `cargo test --test <one>` does not, and a binary left from an earlier build
/// may be stale. `cargo build` (a no-op when the binary is fresh) runs once per test
/// binary, for every example, with the profile and target directory of this test.
pub fn example_bin(name: &str) -> PathBuf {
    static BUILT: std::sync::OnceLock<Result<PathBuf, String>> = std::sync::OnceLock::new();
    let dir = BUILT
        .get_or_init(|| {
            let exe = std::env::current_exe().map_err(|e| e.to_string())?;
            // <target>/<profile>/deps/<test binary>
            let profile_dir = exe
                .parent()
                .and_then(Path::parent)
                .ok_or("no profile directory")?;
            let target_dir = profile_dir.parent().ok_or("no target directory")?;
            let mut cargo = std::process::Command::new(env!("CARGO"));
            cargo
                .args(["build", "--quiet", "--examples", "--manifest-path"])
                .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"))
                .arg("--target-dir")
                .arg(target_dir);
            if profile_dir.file_name() == Some(std::ffi::OsStr::new("release")) {
                cargo.arg("--release");
            }
            let out = cargo
                .output()
                .map_err(|e| format!("cannot run cargo: {e}"))?;
            if !out.status.success() {
                return Err(format!(
                    "cargo build --examples failed:\n{}",
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
            Ok(profile_dir.join("examples"))
        })
        .as_ref()
        .unwrap_or_else(|e| panic!("building the examples: {e}"));
    let bin = dir.join(name);
    assert!(
        bin.exists(),
        "example {name} not found at {}",
        bin.display()
    );
    bin
}

/// Like [`read_file_within`], without blocking the runtime's thread.
pub async fn read_file_async(path: &str, limit: Duration) -> String {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(s) = std::fs::read_to_string(path) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "{path} did not appear within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Waits up to `limit` for `cond` without blocking the runtime's thread.
pub async fn eventually_async(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Waits for `pid` to be dead (a zombie counts), failing if a look started more than
/// `limit` from now still finds it running (see [`ended_within`]).
pub async fn gone_within(pid: u32, limit: Duration) {
    ended_within(pid, Instant::now(), limit, running).await;
}

/// A `kB` figure of this process's `/proc/self/status` (`"VmRSS"`, `"VmHWM"`, ...).
pub fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/self/status"))
}

/// Waits until `running(pid)` is false, and fails only if the process
/// was *seen* running more than `limit` after `since` (the fault: a kill, a drop). Each
/// look is timed before it is taken, so a look that comes late (a loaded machine that
/// did not run this test for a while) is not mistaken for a late exit: only a look
/// started after `limit` that still finds the process running fails.
pub async fn ended_within(
    pid: u32,
    since: Instant,
    limit: Duration,
    running: impl Fn(u32) -> bool,
) {
    loop {
        let looked = Instant::now();
        if !running(pid) {
            return;
        }
        let after = looked.duration_since(since);
        assert!(
            after <= limit,
            "process {pid} still there {after:?} after the fault (limit {limit:?}): {}",
            describe_process(pid)
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Running, or a zombie nobody reaped: what "none is left" excludes for our own children.
pub fn not_reaped(pid: u32) -> bool {
    proc_state(pid).is_some()
}

/// Still running (a zombie counts as gone: a process that is not our child is reaped by
/// someone else, if at all).
pub fn running(pid: u32) -> bool {
    !is_dead(pid)
}

/// A target that never returns.
pub fn hangs() -> u8 {
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// A stack overflow from safe code: the child prints std's "has overflowed its stack"
/// and exits with code 77 (`ExitReason::is_stack_overflow`).
pub fn overflows(depth: u64) -> u64 {
    let pad = std::hint::black_box([depth; 64]);
    if depth == u64::MAX {
        return pad[0];
    }
    overflows(depth + 1) + std::hint::black_box(pad[63])
}

/// A SIGSEGV that is no stack overflow: sent to itself (the child's handler passes it on).
pub fn segfaults() -> u8 {
    rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::SEGV)
        .expect("SIGSEGV to self");
    hangs()
}

/// Decodes anywhere, never encodes: an argument or result that cannot cross.
pub struct NoEncode;

impl serde::Serialize for NoEncode {
    fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
        Err(serde::ser::Error::custom("never encodes"))
    }
}

impl<'de> serde::Deserialize<'de> for NoEncode {
    fn deserialize<D: serde::Deserializer<'de>>(_: D) -> Result<Self, D::Error> {
        Ok(NoEncode)
    }
}

/// Generous bound for anything that should be quick, on a loaded 2-core machine.
pub const SOON: Duration = Duration::from_secs(10);

/// Awaits `f`, failing the test if it takes longer than [`SOON`].
pub async fn soon<F: std::future::Future>(f: F) -> F::Output {
    match tokio::time::timeout(SOON, f).await {
        Ok(out) => out,
        Err(_) => panic!("did not finish within {SOON:?}"),
    }
}

/// A byte pattern that a shifted, truncated or duplicated chunk cannot reproduce.
pub fn pattern(len: usize, seed: u8) -> serde_bytes::ByteBuf {
    serde_bytes::ByteBuf::from(
        (0..len)
            .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_be_bytes()[0] ^ seed)
            .collect::<Vec<u8>>(),
    )
}
