//! How a function is named across the process boundary.
//!
//! A *target* is a fn item or a closure that captures nothing (a zero-sized type), with 0
//! to 8 parameters, passed with its arguments as a tuple. Plain functions and `async`
//! functions both work:
//!
//! ```
//! fn doubler(x: i64) -> i64 { x * 2 }
//! async fn fetch(n: u32, tag: String) -> String { format!("{tag}{n}") }
//! # fn check<F: procpool::Target<A, M>, A, M>(_: F, _: A) {}
//! check(doubler, (5,));
//! check(fetch, (1, "n".to_string()));
//! check(|a: u8, b: u8, c: u8| a + b + c, (1, 2, 3));
//! fn parse<T: std::str::FromStr>(s: String) -> Option<T> { s.parse().ok() }
//! check(parse::<u32>, ("7".to_string(),));   // generic functions: name the types
//! ```
//!
//! A closure that captures a variable is refused at compile time (when the program is
//! built, not by `cargo check`):
//!
//! ```compile_fail
//! # #[tokio::main] async fn main() {
//! let factor = 3;
//! let p = procpool::Process::new(move |x: i64| x * factor, (5,));
//! # }
//! ```
//!
//! The machinery and its soundness argument are in the private module `sys`, the only
//! place in the crate with `unsafe` code.

mod image;
#[allow(unsafe_code)]
mod sys;

use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};

use serde::{Serialize, de::DeserializeOwned};
use serde_bytes::ByteBuf;

pub(crate) use image::Image;
pub(crate) use sys::{
    RegionGuard, SharedMap, SharedRegion, holder_is_dead, ignore_sigpipe, keep_boot_linked, lookup,
    my_pid, register_fd, report_stack_overflow, watch_pidfd,
};

use crate::error::Error;
use crate::wire::chunk::ChunkWriter;
use crate::wire::{self, Outcome};

/// A function that can run in another process with arguments `Args` (a tuple).
///
/// Implemented for every fn item and non-capturing closure whose parameters and return
/// value are `Serialize + DeserializeOwned + Send + 'static`, both plain
/// (`Fn(A, B) -> R`, marker [`Blocking`]) and async (`Fn(A, B) -> impl Future<Output = R>`,
/// marker [`Async`]). You never implement it yourself; the `Marker` parameter only lets
/// the compiler tell the two kinds apart.
///
/// A plain target runs on the child's main thread with no async runtime around it, so it
/// may block (use the `blocking_*` methods of the IPC types). An async target runs on a
/// current-thread tokio runtime created in the child.
///
/// # The rule for closures
///
/// A target is `Copy` and zero-sized. The child never receives the parent's value of
/// it: it makes its own out of nothing, which is the same as naming the function only if
/// the value holds nothing. So:
///
/// - a fn item, or a closure that captures nothing, is a target;
/// - a closure that captures a value with data (a number, a `String`) is refused when the
///   program is built (pass the value as an argument instead);
/// - a closure that captures a zero-sized value that is not `Copy` (a one-of-a-kind
///   token, a guard whose `Drop` does something) is refused by the type checker, since
///   the child would get that value without its constructor having run:
///
/// ```compile_fail,E0277
/// # #[tokio::main] async fn main() {
/// /// Proof that `init()` ran; made only by it.
/// pub struct Initialized(());
/// let proof = Initialized(());
/// let p = procpool::Process::new(move || { let _p = &proof; 1u8 }, ());
/// # }
/// ```
///
/// - what Rust cannot tell apart from a closure that captures nothing, and procpool
///   therefore cannot refuse, is a closure that captures a zero-sized **`Copy`** value.
///   Such a value is made in the child without its constructor: don't capture a `Copy`
///   zero-sized type whose existence proves something (that an initialisation ran, that
///   a check passed) and guards `unsafe` code. Types without such a meaning
///   (`PhantomData`, unit structs anyone can write) are harmless.
///
/// `Target` is sealed: procpool implements it for every function and closure that can be
/// one, and no other type can. Arguments are a tuple; a missing comma is the usual
/// mistake, and the compiler then says what to write:
///
/// ```compile_fail
/// # async fn f(pool: procpool::AsyncPool) {
/// fn double(x: u32) -> u32 { x * 2 }
/// let _ = pool.apply(double, (5)).await; // `(5)` is `5`: write `(5,)`
/// # }
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot run in a child process with arguments `{Args}`",
    label = "not a function or capture-free closure taking `{Args}`",
    note = "arguments are a tuple of values that are `Serialize + DeserializeOwned + Send + \
            'static`: write `(5,)` for one argument (`(5)` is just `5`), `()` for none",
    note = "a target is a function or a closure that captures nothing (or only zero-sized \
            `Copy` values), returning a serializable value or a future of one"
)]
pub trait Target<Args, Marker>:
    sealed::Sealed<Args, Marker> + Copy + Send + Sync + 'static
{
    /// What the target returns (for an async target, what its future resolves to).
    type Output: Serialize + DeserializeOwned + Send + 'static;

    #[doc(hidden)]
    fn __invoke(self, args: Args, cx: &mut Context) -> Self::Output;
}

/// What seals [`Target`]: public items no one outside the crate can name.
mod sealed {
    /// Implemented, with `Target`, for exactly the functions and closures that can be
    /// targets.
    pub trait Sealed<Args, Marker> {}

    /// What a target runs with in the child: a lazily built runtime for async targets.
    #[derive(Debug, Default)]
    pub struct Context {
        pub(super) rt: Option<tokio::runtime::Runtime>,
    }
}

pub(crate) use sealed::Context;

/// Marker for plain (non-async) targets. See [`Target`].
#[derive(Debug)]
pub enum Blocking {}

/// Marker for async targets. See [`Target`].
#[derive(Debug)]
pub enum Async {}

impl Context {
    fn block_on<F: Future>(&mut self, fut: F) -> F::Output {
        let rt =
            self.rt.get_or_insert_with(|| {
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => panic!("procpool: could not build a tokio runtime in the child: {e}"),
                }
            });
        rt.block_on(fut)
    }
}

macro_rules! impl_target {
    ($($A:ident),*) => {
        impl<Func, Ret, $($A,)*> sealed::Sealed<($($A,)*), Blocking> for Func
        where
            Func: Fn($($A),*) -> Ret + Copy + Send + Sync + 'static,
            Ret: Serialize + DeserializeOwned + Send + 'static,
            $($A: Serialize + DeserializeOwned + Send + 'static,)*
        {
        }

        impl<Func, Fut, $($A,)*> sealed::Sealed<($($A,)*), Async> for Func
        where
            Func: Fn($($A),*) -> Fut + Copy + Send + Sync + 'static,
            Fut: Future,
            Fut::Output: Serialize + DeserializeOwned + Send + 'static,
            $($A: Serialize + DeserializeOwned + Send + 'static,)*
        {
        }

        impl<Func, Ret, $($A,)*> Target<($($A,)*), Blocking> for Func
        where
            Func: Fn($($A),*) -> Ret + Copy + Send + Sync + 'static,
            Ret: Serialize + DeserializeOwned + Send + 'static,
            $($A: Serialize + DeserializeOwned + Send + 'static,)*
        {
            type Output = Ret;

            #[allow(non_snake_case)]
            fn __invoke(self, args: ($($A,)*), _cx: &mut Context) -> Ret {
                let ($($A,)*) = args;
                self($($A),*)
            }
        }

        impl<Func, Fut, $($A,)*> Target<($($A,)*), Async> for Func
        where
            Func: Fn($($A),*) -> Fut + Copy + Send + Sync + 'static,
            Fut: Future,
            Fut::Output: Serialize + DeserializeOwned + Send + 'static,
            $($A: Serialize + DeserializeOwned + Send + 'static,)*
        {
            type Output = Fut::Output;

            #[allow(non_snake_case)]
            fn __invoke(self, args: ($($A,)*), cx: &mut Context) -> Fut::Output {
                let ($($A,)*) = args;
                cx.block_on(self($($A),*))
            }
        }
    };
}

impl_target!();
impl_target!(A1);
impl_target!(A1, A2);
impl_target!(A1, A2, A3);
impl_target!(A1, A2, A3, A4);
impl_target!(A1, A2, A3, A4, A5);
impl_target!(A1, A2, A3, A4, A5, A6);
impl_target!(A1, A2, A3, A4, A5, A6, A7);
impl_target!(A1, A2, A3, A4, A5, A6, A7, A8);

/// The entry point a child calls: decode arguments, run, encode the result.
pub(crate) type Entry = fn(&[u8], &mut Context) -> Outcome;

/// A target as the parent sends it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TargetRef {
    pub(crate) offset: u64,
    pub(crate) name: &'static str,
}

/// Names the target `F` for a child. Fails to compile if `F` captures anything.
pub(crate) fn resolve<F, M, A>() -> Result<TargetRef, Error>
where
    F: Target<A, M>,
    A: Serialize + DeserializeOwned + Send + 'static,
    M: 'static,
{
    resolve_entry::<F>(entry::<F, M, A>)
}

/// Names the chunk runner of `F` for `map`: a chunk is an array of single arguments.
pub(crate) fn resolve_map<F, M, T>() -> Result<TargetRef, Error>
where
    F: Target<(T,), M>,
    T: Serialize + DeserializeOwned + Send + 'static,
    M: 'static,
{
    resolve_entry::<F>(map_entry::<F, M, T>)
}

/// Names the chunk runner of `F` for `starmap`: a chunk is an array of argument tuples.
pub(crate) fn resolve_starmap<F, M, A>() -> Result<TargetRef, Error>
where
    F: Target<A, M>,
    A: Serialize + DeserializeOwned + Send + 'static,
    M: 'static,
{
    resolve_entry::<F>(starmap_entry::<F, M, A>)
}

fn resolve_entry<F>(entry: Entry) -> Result<TargetRef, Error> {
    const {
        assert!(
            size_of::<F>() == 0,
            "procpool: a target must be a fn item or a closure that captures nothing; \
             pass captured values as arguments instead"
        )
    };
    keep_boot_linked();
    let name = std::any::type_name::<F>();
    let image = Image::get().map_err(|reason| Error::UnsupportedTarget {
        name: name.to_owned(),
        reason,
    })?;
    let offset = image
        .offset_of(entry as usize)
        .ok_or_else(|| Error::UnsupportedTarget {
            name: name.to_owned(),
            reason: "it is not code of the main executable (is it in a dynamically loaded \
                     library?); only functions linked into the program can run in a child"
                .to_owned(),
        })?;
    Ok(TargetRef { offset, name })
}

fn map_entry<F, M, T>(args: &[u8], cx: &mut Context) -> Outcome
where
    F: Target<(T,), M>,
    T: Serialize + DeserializeOwned + Send + 'static,
{
    run_chunk::<F, M, (T,), T>(args, cx, |t| (t,))
}

fn starmap_entry<F, M, A>(args: &[u8], cx: &mut Context) -> Outcome
where
    F: Target<A, M>,
    A: Serialize + DeserializeOwned + Send + 'static,
{
    run_chunk::<F, M, A, A>(args, cx, |a| a)
}

/// Runs a chunk's items as they are decoded, writing each result as it comes: no vector
/// of items or of results, so a chunk of small items costs little more than their
/// encodings. The first item that fails to decode, panics (in its `Deserialize`, the
/// target, or its result's `Serialize`), or whose result cannot be encoded stops the
/// chunk; the results before it are kept.
fn run_chunk<F, M, A, T>(args: &[u8], cx: &mut Context, wrap: fn(T) -> A) -> Outcome
where
    F: Target<A, M>,
    T: DeserializeOwned + 'static,
{
    let mut rest = args;
    let n = match wire::chunk::read_request_len(&mut rest) {
        Ok(n) => n,
        Err(reason) => {
            return Outcome::Decode {
                type_name: std::any::type_name::<Vec<T>>().to_owned(),
                reason,
            };
        }
    };
    let mut items = wire::ValueReader::new::<T>(rest);
    // Results are often about as large as the items.
    let mut out = ChunkWriter::new::<F::Output>(args.len());
    let mut failure = None;
    for i in 0..n {
        // A user's `Deserialize` panics here as its target would: caught the same way.
        let run = catch_unwind(AssertUnwindSafe(|| {
            let item = items.next::<T>().map_err(|reason| Outcome::Decode {
                type_name: std::any::type_name::<T>().to_owned(),
                reason,
            })?;
            let f: F = sys::conjure::<F>();
            out.push(&f.__invoke(wrap(item), cx))
                .map_err(|reason| Outcome::Encode {
                    type_name: std::any::type_name::<F::Output>().to_owned(),
                    reason,
                })
        }));
        let failed = match run {
            Ok(Ok(())) => None,
            Ok(Err(outcome)) => Some(outcome),
            Err(payload) => {
                let (message, location) = crate::target::panic_details(payload.as_ref());
                Some(Outcome::Panicked { message, location })
            }
        };
        if let Some(outcome) = failed {
            failure = Some((i, outcome));
            break;
        }
    }
    match out.finish(&failure) {
        Ok(bytes) => Outcome::Value(ByteBuf::from(bytes)),
        // Plain data of our own: it encodes.
        Err(reason) => Outcome::Encode {
            type_name: std::any::type_name::<Outcome>().to_owned(),
            reason,
        },
    }
}

fn entry<F, M, A>(args: &[u8], cx: &mut Context) -> Outcome
where
    F: Target<A, M>,
    A: Serialize + DeserializeOwned + Send + 'static,
{
    // A user's `Deserialize` or `Serialize` that panics is caught as the target is.
    let run = catch_unwind(AssertUnwindSafe(|| {
        let args: A = wire::decode_value(args).map_err(|reason| Outcome::Decode {
            type_name: std::any::type_name::<A>().to_owned(),
            reason,
        })?;
        let f: F = sys::conjure::<F>();
        let value = f.__invoke(args, cx);
        let encode_error = |reason| Outcome::Encode {
            type_name: std::any::type_name::<F::Output>().to_owned(),
            reason,
        };
        let bytes = wire::encode_value(&value).map_err(encode_error)?;
        if bytes.len() > wire::MAX_ARGS {
            // It could not be sent: the caller is told why, and the worker serves on.
            return Err(encode_error(wire::oversize_reason(bytes.len())));
        }
        Ok(bytes)
    }));
    match run {
        Ok(Ok(bytes)) => Outcome::Value(ByteBuf::from(bytes)),
        Ok(Err(outcome)) => outcome,
        Err(payload) => {
            let (message, location) = crate::target::panic_details(payload.as_ref());
            Outcome::Panicked { message, location }
        }
    }
}

thread_local! {
    static LAST_PANIC_LOCATION: std::cell::RefCell<Option<String>> =
        const { std::cell::RefCell::new(None) };
}

/// Where the last panic on this thread happened (a child's panic hook records it: the
/// payload does not carry it).
pub(crate) fn note_panic_location(loc: Option<String>) {
    LAST_PANIC_LOCATION.with(|c| *c.borrow_mut() = loc);
}

/// The message and location of a panic caught on this thread.
pub(crate) fn panic_details(payload: &(dyn std::any::Any + Send)) -> (String, Option<String>) {
    let location = LAST_PANIC_LOCATION.with(|c| c.borrow_mut().take());
    (payload_message(payload).to_owned(), location)
}

pub(crate) fn payload_message(payload: &(dyn std::any::Any + Send)) -> &str {
    if let Some(s) = payload.downcast_ref::<&'static str>() {
        s
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s
    } else {
        "Box<dyn Any>"
    }
}
