//! The seed's pipe program: a sender process sends messages through one end of a
//! `pipe`, a receiver process prints them from the other, until `END`.
//!
//! ```text
//! cargo run --release --example pipe
//! Sent the message: START
//! Sent the message: hello
//! Sent the message: world
//! Sent the message: END
//! Received the message: START
//! Received the message: hello
//! Received the message: world
//! ```
//!
//! Both processes run at once, so their lines may interleave; each side's lines are in
//! order.

use procpool::{Connection, Process, pipe};

fn sender(conn: Connection<String>, msgs: Vec<String>) {
    for msg in msgs {
        conn.blocking_send(msg.clone())
            .expect("the receiver is there");
        println!("Sent the message: {msg}");
    }
}

fn receiver(conn: Connection<String>) {
    loop {
        let msg = conn
            .blocking_recv()
            .expect("the sender sends END before it goes");
        if msg == "END" {
            return;
        }
        println!("Received the message: {msg}");
    }
}

#[tokio::main]
async fn main() -> procpool::Result<()> {
    let msgs = ["START", "hello", "world", "END"]
        .map(String::from)
        .to_vec();
    let (parent_conn, child_conn) = pipe();
    let mut p1 = Process::new(sender, (parent_conn, msgs));
    let mut p2 = Process::new(receiver, (child_conn,));
    p1.start().await?;
    p2.start().await?;
    p1.join().await?;
    p2.join().await?;
    Ok(())
}
