//! A child that writes garbage on its channel ends with `Error::Protocol` and is killed;
//! the parent never panics. The target finds its channel as the first socket among its
//! file descriptors, which is exactly what a buggy native library scribbling on fds
//! could do.

use std::io::Write;
use std::os::unix::net::UnixStream;

use procpool::{Error, Process};

fn channel_of_this_child() -> UnixStream {
    let mut fds: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    fds.sort_unstable();
    let fd = fds
        .into_iter()
        .find(|fd| {
            std::fs::read_link(format!("/proc/self/fd/{fd}"))
                .is_ok_and(|l| l.to_string_lossy().starts_with("socket:"))
        })
        .expect("a child has its channel");
    let borrowed = {
        #[allow(unsafe_code)]
        // SAFETY: the child's channel stays open for the whole life of the child.
        unsafe {
            std::os::fd::BorrowedFd::borrow_raw(fd)
        }
    };
    UnixStream::from(borrowed.try_clone_to_owned().unwrap())
}

fn scribble(bytes: Vec<u8>) -> u8 {
    let mut s = channel_of_this_child();
    s.write_all(&bytes).unwrap();
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}

async fn expect_protocol_error(bytes: Vec<u8>, what: &str) {
    let mut p = Process::new(scribble, (bytes,));
    p.start().await.unwrap();
    match p.join().await {
        Err(Error::Protocol { reason, name, .. }) => {
            assert!(reason.contains(what), "{reason}");
            assert_eq!(name, p.name());
        }
        other => panic!("expected Protocol, got {other:?}"),
    }
    // The child was killed, not left running.
    assert_eq!(p.exitcode(), Some(-9));
    // And the outcome stays the same on a second join.
    assert!(matches!(p.join().await, Err(Error::Protocol { .. })));
}

#[tokio::test]
async fn garbage_frame_is_a_protocol_error() {
    expect_protocol_error(vec![0, 0, 0, 3, 0xc1, 0xc1, 0xc1], "undecodable").await;
}

#[tokio::test]
async fn oversize_frame_is_a_protocol_error() {
    expect_protocol_error(vec![0xff, 0xff, 0xff, 0xff], "frame of more than").await;
}

/// Announces a frame of almost 1 GiB, sends nothing more, and dies.
fn announces_then_dies() -> u8 {
    let mut s = channel_of_this_child();
    s.write_all(&[0x3f, 0xff, 0xff, 0xff]).unwrap();
    std::process::abort()
}

#[tokio::test]
async fn a_child_that_announces_a_large_frame_and_dies_still_resolves_join() {
    let mut p = Process::new(announces_then_dies, ());
    p.start().await.unwrap();
    let r = tokio::time::timeout(std::time::Duration::from_secs(30), p.join())
        .await
        .expect("join resolves");
    assert!(matches!(r, Err(Error::WorkerDied { .. })), "{r:?}");
    assert_eq!(p.exitcode(), Some(-6));
}

fn title() -> (String, String) {
    let comm = std::fs::read_to_string("/proc/self/comm").unwrap();
    let argv0 = std::env::args().next().unwrap();
    (comm.trim_end().to_owned(), argv0)
}

#[tokio::test]
async fn children_have_a_readable_title() {
    let mut p = Process::new(title, ()).with_name("resize-images");
    p.start().await.unwrap();
    let (comm, argv0) = p.join().await.unwrap();
    assert_eq!(comm, "resize-images"); // what top shows
    assert_eq!(argv0, "resize-images (procpool)"); // what ps shows
}
