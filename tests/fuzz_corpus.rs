//! Replays the committed fuzz corpus (`fuzz/corpus/<target>/`, grown by `cargo fuzz run`)
//! through the same entry points the fuzz targets call, so `cargo test` catches a
//! decoder regression in seconds without nightly or libFuzzer. Every decoder that reads
//! bytes from another process is covered: frames, every protocol message (worker,
//! parent, hub both ways), map chunk answers, pipe messages.

use std::path::Path;

/// Debug builds use several times the stack of the release builds that were fuzzed (and
/// that users run) for the same nesting (rmp-serde stops at depth 1024): the replay runs
/// on a thread with room for that.
fn replay(target: &'static str, run: fn(&[u8])) {
    std::thread::Builder::new()
        .stack_size(64 << 20)
        .spawn(move || replay_here(target, run))
        .unwrap()
        .join()
        .unwrap();
}

fn replay_here(target: &str, run: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        let caught = std::panic::catch_unwind(|| run(&data));
        assert!(caught.is_ok(), "{target}: {} panicked", path.display());
        n += 1;
    }
    assert!(n > 0, "no corpus for {target} in {}", dir.display());
}

#[test]
fn the_frames_corpus_decodes_without_a_panic() {
    replay("frames", procpool::__fuzz::frames);
}

#[test]
fn the_messages_corpus_decodes_without_a_panic() {
    replay("messages", procpool::__fuzz::messages);
}

#[test]
fn the_chunk_answer_corpus_decodes_without_a_panic() {
    replay("chunk_answer", procpool::__fuzz::chunk_answer);
}

#[test]
fn the_pipe_corpus_decodes_without_a_panic() {
    replay("pipe", procpool::__fuzz::pipe);
}
