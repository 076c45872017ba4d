//! References shared by the benches.

use std::io::{Read, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

/// The floor for a round trip between two processes: 8 bytes to `cat` through a pipe
/// and back, blocking I/O.
pub(crate) struct CatPingPong {
    cat: Child,
    to: Option<ChildStdin>,
    from: ChildStdout,
}

impl CatPingPong {
    pub(crate) fn start() -> Self {
        let mut cat = Command::new("cat")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("cat");
        let to = cat.stdin.take();
        let from = cat.stdout.take().expect("stdout");
        CatPingPong { cat, to, from }
    }

    pub(crate) fn round_trip(&mut self) {
        let mut buf = [0u8; 8];
        if let Some(to) = &mut self.to {
            to.write_all(&[7u8; 8]).expect("write");
        }
        self.from.read_exact(&mut buf).expect("read");
    }
}

impl Drop for CatPingPong {
    fn drop(&mut self) {
        drop(self.to.take());
        self.cat.wait().expect("cat exits");
    }
}
