//! A blocking `Dict` call from another process goes over a connection of the calling
//! thread's own (no procpool thread in between). That connection opens the dict for
//! itself, so it must let go of it once this process holds no handle to it: else the
//! owner keeps every dict a worker ever touched.
//!
//! One test function: it counts the owner's live objects and the direct connections,
//! which are per process.

mod support;

use procpool::{Dict, Error, Event, Process, Queue};
use support::{SOON, eventually, soon};

type Pair = (Dict<u32, u32>, Dict<u32, u32>);

/// Writes into the first dict, lets go of it, makes one more blocking call (to the
/// second), says so and waits to be told to exit.
fn use_and_let_go(dicts: Queue<Pair>, used: Event, exit: Event) -> u32 {
    let (d, other) = dicts.blocking_get().unwrap();
    d.blocking_insert(1, 2).unwrap();
    drop(d);
    assert_eq!(other.blocking_get(&0).unwrap(), None);
    used.set().unwrap();
    exit.blocking_wait().unwrap();
    7
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dict_a_child_let_go_of_is_not_kept_by_its_direct_connection() {
    let dicts: Queue<Pair> = Queue::new();
    let (used, exit) = (Event::new(), Event::new());
    let mut child = Process::new(use_and_let_go, (dicts.clone(), used.clone(), exit.clone()));
    child.start().await.unwrap();
    let (d, other) = (Dict::new(), Dict::new());
    dicts.put((d.clone(), other.clone())).await.unwrap();
    soon(used.wait()).await.unwrap();
    assert_eq!(d.get(&1).await.unwrap(), Some(2), "the child's insert");

    // The child is alive and connected, and holds no handle to `d`: the parent's is the
    // last, and dropping it frees the dict.
    let with_d = procpool::__tables().objects;
    drop(d);
    assert!(
        eventually(SOON, || procpool::__tables().objects < with_d),
        "the dict outlived its last handle ({with_d} objects, still {})",
        procpool::__tables().objects
    );
    exit.set().unwrap();
    assert_eq!(soon(child.join()).await.unwrap(), 7);
    drop(other);

    // This process as the caller: a thread's connection to an owner that is gone is
    // closed at its next call, not kept until the thread ends.
    let (to_parent, exit) = (Queue::new(), Event::new());
    let mut owner = Process::new(own_a_dict, (to_parent.clone(), exit.clone()));
    owner.start().await.unwrap();
    let d: Dict<u32, u32> = soon(to_parent.get()).await.unwrap();
    let (calls, answers) = (
        std::sync::mpsc::channel::<()>(),
        std::sync::mpsc::channel::<String>(),
    );
    let (ask, asked) = calls;
    let (answer, answered) = answers;
    let thread = std::thread::spawn({
        let d = d.clone();
        move || {
            while asked.recv().is_ok() {
                answer.send(format!("{:?}", d.blocking_get(&1))).unwrap();
            }
        }
    });
    let call = || {
        ask.send(()).unwrap();
        answered.recv_timeout(SOON).unwrap()
    };
    assert_eq!(call(), "Ok(Some(2))");
    assert_eq!(procpool::__tables().direct, 1, "the thread's connection");
    exit.set().unwrap();
    assert_eq!(soon(owner.join()).await.unwrap(), 0);
    assert_eq!(
        call(),
        format!("{:?}", Err::<Option<u32>, _>(Error::Closed))
    );
    assert_eq!(procpool::__tables().direct, 0, "closed with its owner gone");
    drop(ask);
    thread.join().unwrap();
}

/// Owns a dict (1 => 2), hands it to the parent, and exits when told.
fn own_a_dict(to_parent: Queue<Dict<u32, u32>>, exit: Event) -> u8 {
    let d = Dict::new();
    d.blocking_insert(1, 2).unwrap();
    to_parent.blocking_put(d.clone()).unwrap();
    exit.blocking_wait().unwrap();
    0
}
