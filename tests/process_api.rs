//! Every call of DESIGN.md §2 against real child processes.

mod support;

use std::time::Duration;

use procpool::{Error, Process, current_process};
use serde::{Deserialize, Serialize};
use support::{NoEncode, TempDir, wait_for_file, write_file};

fn doubler(x: i64) -> i64 {
    x * 2
}

fn my_name() -> String {
    current_process().name().to_owned()
}

fn my_pid() -> u32 {
    std::process::id()
}

/// Blocks until `release` exists, then returns `value`.
fn gated(release: String, value: u64) -> u64 {
    wait_for_file(&release);
    value
}

#[tokio::test]
async fn join_returns_the_value_and_exitcode_is_zero() {
    let mut p = Process::new(doubler, (21,));
    assert_eq!(p.pid(), None);
    assert!(!p.is_alive());
    assert_eq!(p.exitcode(), None);
    p.start().await.unwrap();
    let pid = p.pid().expect("pid after start");
    assert_ne!(pid, std::process::id());
    assert_eq!(p.join().await.unwrap(), 42);
    assert_eq!(p.exitcode(), Some(0));
    assert!(!p.is_alive());
    // Joining again gives the same value.
    assert_eq!(p.join().await.unwrap(), 42);
}

#[tokio::test]
async fn the_child_runs_in_another_process() {
    let mut p = procpool::spawn(my_pid, ()).await.unwrap();
    let child_pid = p.join().await.unwrap();
    assert_eq!(Some(child_pid), p.pid());
    assert_ne!(child_pid, std::process::id());
}

#[tokio::test]
async fn names_follow_python() {
    assert_eq!(current_process().name(), "MainProcess");
    assert_eq!(current_process().pid(), std::process::id());

    let mut a = Process::new(my_name, ());
    let b = Process::new(my_name, ());
    let na: u32 = a.name().strip_prefix("Process-").unwrap().parse().unwrap();
    let nb: u32 = b.name().strip_prefix("Process-").unwrap().parse().unwrap();
    assert!(nb > na, "counter advances at creation: {na} then {nb}");
    a.start().await.unwrap();
    assert_eq!(a.join().await.unwrap(), a.name());

    let mut t = Process::new(my_name, ()).with_name("Test");
    assert_eq!(t.name(), "Test");
    t.start().await.unwrap();
    assert_eq!(t.join().await.unwrap(), "Test");
}

async fn nested_names() -> (String, String, String) {
    let mut inner = Process::new(my_name, ());
    inner.start().await.expect("nested start");
    let inner_name = inner.join().await.expect("nested join");
    let mut second = Process::new(my_name, ()).with_name("inner-named");
    second.start().await.expect("nested start");
    (
        my_name(),
        inner_name,
        second.join().await.expect("nested join"),
    )
}

#[tokio::test]
async fn nested_processes_are_named_parent_colon_n() {
    let mut p = Process::new(nested_names, ());
    let n = p.name().to_owned();
    p.start().await.unwrap();
    let (outer, inner, second) = p.join().await.unwrap();
    assert_eq!(outer, n);
    assert_eq!(inner, format!("{n}:1"));
    assert_eq!(second, "inner-named");

    // A custom-named parent's children still use its number, as in Python.
    let t = Process::new(nested_names, ());
    let t_id = t.name().strip_prefix("Process-").unwrap().to_owned();
    let mut t = t.with_name("Outer");
    t.start().await.unwrap();
    let (outer, inner, _) = t.join().await.unwrap();
    assert_eq!(outer, "Outer");
    assert_eq!(inner, format!("Process-{t_id}:1"));
}

#[tokio::test]
async fn is_alive_terminate_and_active_children() {
    let dir = TempDir::new("alive");
    let mut p = Process::new(gated, (dir.path("never"), 1));
    p.start().await.unwrap();
    let pid = p.pid().unwrap();
    assert!(p.is_alive());
    assert_eq!(p.exitcode(), None);
    let kids = procpool::active_children();
    let me = kids
        .iter()
        .find(|k| k.pid() == pid)
        .expect("listed while alive");
    assert_eq!(me.name(), p.name());

    p.terminate().unwrap();
    let err = p.join().await.unwrap_err();
    assert!(
        matches!(err, Error::WorkerDied { pid: dead, reason: procpool::ExitReason::Signal(15), .. } if dead == pid),
        "{err:?}"
    );
    assert_eq!(p.exitcode(), Some(-15));
    assert!(!p.is_alive());
    assert!(procpool::active_children().iter().all(|k| k.pid() != pid));
    // Signals to a process that is gone are ignored, as in Python.
    p.terminate().unwrap();
    p.kill().unwrap();
}

#[tokio::test]
async fn join_can_be_retried_after_a_timeout_gave_up() {
    let dir = TempDir::new("rejoin");
    let release = dir.path("go");
    let mut p = Process::new(gated, (release.clone(), 7));
    p.start().await.unwrap();
    let first = tokio::time::timeout(Duration::from_millis(50), p.join()).await;
    assert!(
        first.is_err(),
        "the child waits for the file, so join must time out"
    );
    tokio::select! {
        _ = p.join() => panic!("join cannot finish before the release"),
        _ = tokio::time::sleep(Duration::from_millis(20)) => {}
    }
    assert!(p.is_alive());
    write_file(&release, "go");
    assert_eq!(p.join().await.unwrap(), 7);
    assert_eq!(p.join().await.unwrap(), 7);
}

#[tokio::test]
async fn misuse_is_a_typed_error() {
    let mut p = Process::new(doubler, (1,));
    assert!(matches!(p.join().await, Err(Error::NotStarted)));
    assert!(matches!(p.terminate(), Err(Error::NotStarted)));
    p.start().await.unwrap();
    assert!(matches!(p.start().await, Err(Error::AlreadyStarted)));
    assert_eq!(p.join().await.unwrap(), 2);
}

// ------------------------------------------------------------------------- targets

fn zero() -> u8 {
    0
}
fn six(a: u8, b: u16, c: u32, d: u64, e: i8, f: String) -> String {
    format!("{a}{b}{c}{d}{e}{f}")
}
fn parse<T: std::str::FromStr>(s: String) -> Option<T> {
    s.parse().ok()
}
fn checked_div(a: i32, b: i32) -> Result<i32, String> {
    if b == 0 {
        Err("division by zero".into())
    } else {
        Ok(a / b)
    }
}
async fn async_add(a: u32, b: u32) -> u32 {
    tokio::task::yield_now().await;
    a + b
}

#[tokio::test]
async fn every_kind_of_target() {
    assert_eq!(
        procpool::spawn(zero, ())
            .await
            .unwrap()
            .join()
            .await
            .unwrap(),
        0
    );
    let s = procpool::spawn(six, (1, 2, 3, 4, -5, "x".to_string()))
        .await
        .unwrap();
    assert_eq!(join(s).await, "1234-5x");
    let eight = |a: u8, b: u8, c: u8, d: u8, e: u8, f: u8, g: u8, h: u8| {
        [a, b, c, d, e, f, g, h]
            .iter()
            .map(|x| u32::from(*x))
            .sum::<u32>()
    };
    let p = procpool::spawn(eight, (1, 2, 3, 4, 5, 6, 7, 8))
        .await
        .unwrap();
    assert_eq!(join(p).await, 36);
    let p = procpool::spawn(|x: i64| x * 3, (5,)).await.unwrap();
    assert_eq!(join(p).await, 15);
    let p = procpool::spawn(parse::<u32>, ("17".to_string(),))
        .await
        .unwrap();
    assert_eq!(join(p).await, Some(17));
    let p = procpool::spawn(async_add, (2, 3)).await.unwrap();
    assert_eq!(join(p).await, 5);
    // A target returning Result is not flattened: Ok(Err(e)).
    let p = procpool::spawn(checked_div, (1, 0)).await.unwrap();
    assert_eq!(join(p).await, Err("division by zero".to_string()));
}

async fn join<R: serde::de::DeserializeOwned>(mut p: Process<R>) -> R {
    p.join().await.expect("join")
}

#[derive(Serialize, Deserialize, Debug, PartialEq)]
#[serde(tag = "kind")]
enum Shape {
    Circle { r: f64 },
    Rect { w: u32, h: u32 },
}

#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct Meta {
    id: u32,
}

#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct Tagged {
    #[serde(flatten)]
    meta: Meta,
    shape: Shape,
}

fn grow(t: Tagged) -> Tagged {
    let shape = match t.shape {
        Shape::Circle { r } => Shape::Circle { r: r * 2.0 },
        Shape::Rect { w, h } => Shape::Rect { w: w * 2, h: h * 2 },
    };
    Tagged {
        meta: t.meta,
        shape,
    }
}

#[tokio::test]
async fn flatten_and_internally_tagged_enums_cross() {
    let t = Tagged {
        meta: Meta { id: 4 },
        shape: Shape::Rect { w: 1, h: 2 },
    };
    let p = procpool::spawn(grow, (t,)).await.unwrap();
    assert_eq!(
        join(p).await,
        Tagged {
            meta: Meta { id: 4 },
            shape: Shape::Rect { w: 2, h: 4 }
        }
    );
}

// ----------------------------------------------------------------- encode / decode

/// Serialises fine in the parent; refuses in a child.
#[derive(Debug, Deserialize)]
struct FailsInChild;

impl Serialize for FailsInChild {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if current_process().name() == "MainProcess" {
            s.serialize_unit()
        } else {
            Err(serde::ser::Error::custom("no serialising in children"))
        }
    }
}

/// Encodes fine, but refuses to decode in the parent.
#[derive(Debug, Serialize)]
struct NoDecodeInParent(u8);
impl<'de> Deserialize<'de> for NoDecodeInParent {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = u8::deserialize(d)?;
        if current_process().name() == "MainProcess" {
            Err(serde::de::Error::custom("not in the parent"))
        } else {
            Ok(NoDecodeInParent(v))
        }
    }
}

fn take_no_encode(_: NoEncode) -> u8 {
    1
}
fn make_fails_in_child() -> FailsInChild {
    FailsInChild
}
fn make_no_decode() -> NoDecodeInParent {
    NoDecodeInParent(3)
}

#[tokio::test]
async fn argument_that_cannot_encode_fails_at_start_and_spawns_nothing() {
    // Other tests of this binary start children meanwhile: look for this one by name.
    let mut p = Process::new(take_no_encode, (NoEncode,)).with_name("never-started");
    let err = p.start().await.unwrap_err();
    assert!(
        matches!(&err, Error::Encode { type_name, reason, .. } if type_name.contains("NoEncode") && reason.contains("never encodes")),
        "{err:?}"
    );
    assert_eq!(p.pid(), None);
    let children = procpool::active_children();
    assert!(
        children.iter().all(|c| c.name() != "never-started"),
        "{children:?}"
    );
}

#[tokio::test]
async fn result_that_cannot_encode_or_decode_is_typed() {
    let mut p = procpool::spawn(make_fails_in_child, ()).await.unwrap();
    let err = p.join().await.unwrap_err();
    assert!(
        matches!(&err, Error::Encode { type_name, .. } if type_name.contains("FailsInChild")),
        "{err:?}"
    );
    let mut p = procpool::spawn(make_no_decode, ()).await.unwrap();
    let err = p.join().await.unwrap_err();
    assert!(
        matches!(&err, Error::Decode { type_name, reason, .. } if type_name.contains("NoDecodeInParent") && reason.contains("not in the parent")),
        "{err:?}"
    );
}

// --------------------------------------------------------------------- environment

fn env_of_child() -> Vec<(String, String)> {
    let mut v: Vec<_> = std::env::vars().collect();
    v.sort();
    v
}

fn args_of_child() -> Vec<String> {
    std::env::args().collect()
}

#[tokio::test]
async fn the_child_sees_the_parents_environment_unchanged() {
    let mut mine = env_of_child();
    mine.sort();
    let theirs = join(procpool::spawn(env_of_child, ()).await.unwrap()).await;
    assert_eq!(theirs, mine);
    // The child never sees the parent's argv (and never ran the test harness).
    let argv = join(procpool::spawn(args_of_child, ()).await.unwrap()).await;
    let parent_argv: Vec<String> = std::env::args().collect();
    assert!(argv.iter().all(|a| !parent_argv.contains(a)), "{argv:?}");
    assert!(argv[0].ends_with("(procpool)"), "readable title: {argv:?}");
}

/// What a child sees: its stdin's first read, the link of its channel (its first socket
/// above the standard streams), and the fds a process it starts inherits.
fn stdin_channel_and_grandchild_fds() -> (usize, String, Vec<String>) {
    use std::io::Read;
    let mut buf = Vec::new();
    let n = std::io::stdin().read_to_end(&mut buf).expect("stdin reads");
    let mut fds: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .expect("proc")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|fd| *fd > 2)
        .collect();
    fds.sort_unstable();
    let channel = fds
        .into_iter()
        .filter_map(|fd| std::fs::read_link(format!("/proc/self/fd/{fd}")).ok())
        .map(|l| l.to_string_lossy().into_owned())
        .find(|l| l.starts_with("socket:"))
        .expect("a child has its channel");
    let out = std::process::Command::new("sh")
        .args(["-c", "for f in /proc/$$/fd/*; do readlink $f; done"])
        .output()
        .expect("sh runs");
    let links = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    (n, channel, links)
}

#[tokio::test]
async fn a_childs_stdin_is_dev_null_and_its_channel_is_not_passed_on() {
    // As in Python's multiprocessing, a child does not share the parent's stdin; the
    // channel reaches it as fd 0 (so it can be started with posix_spawn) and moves.
    let mut p = Process::new(stdin_channel_and_grandchild_fds, ());
    p.start().await.unwrap();
    let (n, channel, links) = p.join().await.unwrap();
    assert_eq!(n, 0, "stdin is at its end at once");
    assert_eq!(
        links.first().map(String::as_str),
        Some("/dev/null"),
        "{links:?}"
    );
    assert!(!links.contains(&channel), "{channel} leaked: {links:?}");
}
