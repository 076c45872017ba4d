//! A small TCP service that offloads every request to a process pool and answers within
//! a deadline with `tokio::select!`: a request that hangs or crashes costs its worker,
//! never the service.
//!
//! The example starts the service on a free port, sends it a few requests as a client
//! would, prints the answers and exits. Protocol: one request per line, one answer per
//! line: `fib N`, `hang`, `crash`.
//!
//! ```text
//! cargo run --example service
//! > fib 30        < 832040
//! > hang          < error: deadline of 300ms exceeded, worker stopped
//! ...
//! ```

use std::time::Duration;

use procpool::{AsyncPool, Error};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

const DEADLINE: Duration = Duration::from_millis(300);

/// The CPU-heavy, crash-prone, hang-prone work: runs in a worker process.
fn handle(request: String) -> Result<u64, String> {
    let mut words = request.split_whitespace();
    match (words.next(), words.next().map(str::parse::<u64>)) {
        (Some("fib"), Some(Ok(n))) if n <= 90 => Ok(fib(n)),
        (Some("hang"), _) => loop {
            std::thread::sleep(Duration::from_secs(60));
        },
        (Some("crash"), _) => std::process::abort(),
        _ => Err(format!("bad request {request:?}")),
    }
}

fn fib(n: u64) -> u64 {
    if n < 2 { n } else { fib(n - 1) + fib(n - 2) }
}

async fn serve_connection(pool: AsyncPool, stream: TcpStream) -> std::io::Result<()> {
    let (rd, mut wr) = stream.into_split();
    let mut lines = BufReader::new(rd).lines();
    while let Some(line) = lines.next_line().await? {
        let answer = tokio::select! {
            r = pool.apply(handle, (line,)) => match r {
                Ok(Ok(v)) => v.to_string(),
                Ok(Err(msg)) => format!("error: {msg}"),
                Err(Error::WorkerDied { reason, .. }) => format!("error: worker died ({reason})"),
                Err(e) => format!("error: {e}"),
            },
            // The losing branch drops the pool future, which stops its worker.
            () = tokio::time::sleep(DEADLINE) => {
                format!("error: deadline of {DEADLINE:?} exceeded, worker stopped")
            }
        };
        wr.write_all(format!("{answer}\n").as_bytes()).await?;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let pool = AsyncPool::new(2).await?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = {
        let pool = pool.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    break;
                };
                let pool = pool.clone();
                tokio::spawn(async move {
                    if let Err(e) = serve_connection(pool, stream).await {
                        eprintln!("connection error: {e}");
                    }
                });
            }
        })
    };
    println!("service listening on {addr}");

    // A client: a few requests, some of them nasty.
    let stream = TcpStream::connect(addr).await?;
    let (rd, mut wr) = stream.into_split();
    let mut answers = BufReader::new(rd).lines();
    for req in ["fib 30", "hang", "fib 20", "crash", "fib x", "fib 40"] {
        wr.write_all(format!("{req}\n").as_bytes()).await?;
        let answer = answers.next_line().await?.unwrap_or_default();
        println!("> {req:<8} < {answer}");
    }
    let s = pool.stats();
    println!(
        "pool: {} workers, {} completed, {} failed, {} cancelled, {} replaced",
        s.workers, s.completed, s.failed, s.cancelled, s.restarts
    );
    server.abort();
    pool.close().await;
    Ok(())
}
