//! Time to start and join one child running a no-op, beside the raw cost of starting
//! `/bin/true` and waiting for it, measured in the same run: through std's default path
//! (`posix_spawn`, vfork-like) and through fork+exec (what procpool does, since the child
//! must inherit its channel).
//!
//! ```text
//! cargo bench --bench process_spawn
//! ```

use criterion::{Criterion, criterion_group, criterion_main};

fn noop() {}

fn spawn(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut g = c.benchmark_group("process_spawn");
    g.sample_size(200);
    g.bench_function("baseline: posix_spawn /bin/true spawn+wait", |b| {
        b.iter(|| {
            let status = std::process::Command::new("/bin/true")
                .status()
                .expect("/bin/true");
            assert!(status.success());
        })
    });
    g.bench_function("baseline: fork+exec /bin/true spawn+wait", |b| {
        b.iter(|| {
            use std::os::unix::process::CommandExt;
            let mut cmd = std::process::Command::new("/bin/true");
            #[allow(unsafe_code)]
            // SAFETY: an empty pre-exec hook does nothing in the child; it only makes std
            // fork+exec instead of posix_spawn, which is what this baseline measures.
            unsafe {
                cmd.pre_exec(|| Ok(()));
            }
            assert!(cmd.status().expect("/bin/true").success());
        })
    });
    g.bench_function("procpool: Process start+join of a no-op", |b| {
        b.iter(|| {
            rt.block_on(async {
                let mut p = procpool::Process::new(noop, ());
                p.start().await.expect("start");
                p.join().await.expect("join");
            })
        })
    });
    g.finish();
}

criterion_group!(benches, spawn);
criterion_main!(benches);
