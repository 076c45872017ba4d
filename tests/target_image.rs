//! Where targets are found: the load base and code of the main executable come from the
//! dynamic loader, so nothing in `/proc/self/maps` (a path that is not UTF-8, the
//! executable mapped twice) can break a spawn.

mod support;

use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::process::Command;

use support::TempDir;

fn doubler(x: i64) -> i64 {
    x * 2
}

/// Set in the copy of this test binary that runs the spawn.
const PROBE: &str = "PROCPOOL_TEST_NON_UTF8_PROBE";

#[tokio::test]
async fn spawns_from_an_executable_whose_path_is_not_utf8() {
    if std::env::var_os(PROBE).is_some() {
        // The copy: its own path, in /proc/self/maps, is not UTF-8.
        let exe = std::env::current_exe().unwrap();
        assert!(exe.to_str().is_none(), "{exe:?} should not be UTF-8");
        let got = procpool::spawn(doubler, (21,)).await.unwrap().join().await;
        println!("probe: {got:?}");
        return;
    }
    let dir = TempDir::new("non-utf8-exe");
    let copy = dir
        .root()
        .join(std::ffi::OsStr::from_bytes(b"prog-\xff\xfe"));
    std::fs::copy(std::env::current_exe().unwrap(), &copy).unwrap();
    // (argv[0] stays UTF-8: the test harness insists on it; /proc/self/exe does not.)
    let out = Command::new(&copy)
        .arg0("target_image")
        .args([
            "--exact",
            "spawns_from_an_executable_whose_path_is_not_utf8",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(PROBE, "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("probe: Ok(42)"), "{stdout}\n{stderr}");
}
