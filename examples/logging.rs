//! The seed's logging program: `log_to_stderr` shows each child's lifecycle, in
//! Python's format, beside the children's own output.
//!
//! ```text
//! cargo run --example logging
//! [INFO/Process-1] child process calling self.run()
//! tango
//! [INFO/Process-1] process shutting down
//! [INFO/Process-1] process exiting with exitcode 0
//! ...
//! ```
//!
//! The seed also holds a `Lock` around the print; procpool's `Lock` is not built yet, so
//! the children are joined in turn to keep their lines apart.

use procpool::Process;

fn printer(item: String) {
    println!("{item}");
    tracing::info!("printed {item}");
}

#[tokio::main]
async fn main() -> procpool::Result<()> {
    procpool::log_to_stderr(tracing::Level::INFO)?;
    tracing::info!("starting {} printers", 3);
    for item in ["tango", "foxtrot", "10"] {
        let mut p = Process::new(printer, (item.to_string(),));
        p.start().await?;
        p.join().await?;
    }
    Ok(())
}
