//! [`PoolService`]: a pool function as a `tower::Service` (feature `tower`), ready when
//! the pool's queue has room.

use std::marker::PhantomData;
use std::sync::Arc;
use std::task::{Context, Poll};

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{Admission, AsyncPool, Shared, TaskHandle, encode_call};
use crate::error::{Error, Result};
use crate::target::Target;

impl AsyncPool {
    /// The one-argument function `f` as a [`tower::Service`](tower_service::Service)
    /// (feature `tower`): a request `T` runs `f(T)` in a worker, and the response is its
    /// return value, as [`apply`](Self::apply) does.
    ///
    /// [`poll_ready`](tower_service::Service::poll_ready) follows the pool's queue: it
    /// is ready when there is a place among the [`Builder::max_queued`](super::Builder::max_queued)
    /// the queue holds, and keeps that place for the next `call` (so a service that
    /// submits faster than the workers finish is pushed back, as a full `tower::buffer`
    /// pushes back); once the pool is closed, it answers [`Error::PoolClosed`]. The
    /// response future is a [`TaskHandle`]: dropping it cancels the task, so tower's
    /// `Timeout` stops the work, not only the wait (its worker is stopped and replaced,
    /// unless the pool's [`kill_on_cancel`](super::Builder::kill_on_cancel) is off).
    ///
    /// Each clone of the service keeps its own place (a clone starts with none), and a
    /// service dropped holding one gives it back. A `call` made without a `poll_ready`
    /// before it submits at once, past the bound, as [`apply_async`](Self::apply_async)
    /// does. For a function of several arguments, take them as one tuple or struct.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower::{Service, ServiceBuilder, ServiceExt};
    ///
    /// fn render(page: u32) -> String {
    ///     format!("<h1>page {page}</h1>")
    /// }
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), tower::BoxError> {
    /// let pool = procpool::AsyncPool::new(2).await?;
    /// let mut svc = ServiceBuilder::new()
    ///     .timeout(Duration::from_secs(10)) // a slow render is stopped, not only left
    ///     .concurrency_limit(8)
    ///     .service(pool.service(render));
    /// let html = svc.ready().await?.call(7).await?;
    /// assert_eq!(html, "<h1>page 7</h1>");
    /// # Ok(()) }
    /// ```
    pub fn service<F, T, M>(&self, f: F) -> PoolService<F, T, M>
    where
        F: Target<(T,), M>,
        T: Serialize + DeserializeOwned + Send + 'static,
        M: 'static,
    {
        let _: F = f; // It holds nothing: the child makes its own (see `Target`).
        PoolService {
            shared: Arc::clone(&self.shared),
            admission: Admission::default(),
            reserved: false,
            _f: PhantomData,
        }
    }
}

/// A pool function as a [`tower::Service`](tower_service::Service), from
/// [`AsyncPool::service`] (feature `tower`).
///
/// # Drop
///
/// A service dropped holding a place in the queue (its `poll_ready` was ready and no
/// `call` followed) gives it back. Requests already called are not affected.
pub struct PoolService<F, T, M> {
    shared: Arc<Shared>,
    admission: Admission,
    /// `poll_ready` took a place in the queue for the next `call`.
    reserved: bool,
    _f: PhantomData<fn(T) -> (F, M)>,
}

impl<F, T, M> std::fmt::Debug for PoolService<F, T, M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolService")
            .field("target", &std::any::type_name::<F>())
            .field("reserved", &self.reserved)
            .finish_non_exhaustive()
    }
}

impl<F, T, M> Clone for PoolService<F, T, M> {
    /// A clone with no place in the queue of its own (it takes one at its `poll_ready`).
    fn clone(&self) -> Self {
        PoolService {
            shared: Arc::clone(&self.shared),
            admission: Admission::default(),
            reserved: false,
            _f: PhantomData,
        }
    }
}

impl<F, T, M> tower_service::Service<T> for PoolService<F, T, M>
where
    F: Target<(T,), M>,
    T: Serialize + DeserializeOwned + Send + 'static,
    M: 'static,
{
    type Response = F::Output;
    type Error = Error;
    type Future = TaskHandle<F::Output>;

    /// Ready once the pool's queue has a place for the next `call` (kept until then);
    /// [`Error::PoolClosed`] once the pool takes no more work.
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<()>> {
        if self.reserved {
            return Poll::Ready(Ok(()));
        }
        match self.shared.poll_admit(&mut self.admission, cx) {
            Poll::Ready(true) => {
                self.reserved = true;
                Poll::Ready(Ok(()))
            }
            Poll::Ready(false) => Poll::Ready(Err(Error::PoolClosed)),
            Poll::Pending => Poll::Pending,
        }
    }

    /// Submits `f(request)` with the place `poll_ready` kept (without one, at once,
    /// past the bound); the handle resolves with its return value.
    fn call(&mut self, request: T) -> TaskHandle<F::Output> {
        let mut admitted = std::mem::take(&mut self.reserved);
        let call = encode_call::<F, M, (T,)>((request,));
        if admitted && call.is_err() {
            // Nothing is submitted (the handle answers `Encode`): the place goes back.
            self.shared.give_back_place();
            admitted = false;
        }
        // A closed pool refuses it (`PoolClosed`), and gives the place back.
        TaskHandle::submit(&self.shared, call, admitted, None)
    }
}

impl<F, T, M> Drop for PoolService<F, T, M> {
    fn drop(&mut self) {
        if self.reserved {
            self.shared.give_back_place();
        }
    }
}
