//! Middleware: wrap every handler of an app with your own code, in the spirit of axum's
//! `middleware::from_fn`.

use std::future::Future;
use std::sync::Arc;

use super::Handler;
use crate::message::Message;
use crate::outcome::Outcome;
use crate::BoxFuture;

/// A type-erased handler with its state bound: what the consumer loop runs.
#[derive(Clone)]
pub struct BoxedHandler(Arc<dyn Fn(Message) -> BoxFuture<Outcome> + Send + Sync>);

impl BoxedHandler {
    pub(crate) fn from_handler<H, Args, S>(handler: H, state: S) -> Self
    where
        H: Handler<Args, S>,
        S: Send + Sync + 'static,
    {
        BoxedHandler(Arc::new(move |msg| handler.call(msg, &state)))
    }

    /// Runs the service on one message.
    pub fn call(&self, msg: Message) -> BoxFuture<Outcome> {
        (self.0)(msg)
    }
}

/// The rest of the chain, handed to a middleware.
#[derive(Clone)]
pub struct Next(BoxedHandler);

impl Next {
    /// Runs the inner middleware and finally the handler.
    pub fn run(self, msg: Message) -> BoxFuture<Outcome> {
        self.0.call(msg)
    }
}

/// A middleware: wraps every handler of an app (see [`App::middleware`](crate::App::middleware)).
/// Named apart from tower's `Layer`/`Service` traits on purpose: it is a plain function from
/// handler to handler, not a tower layer.
pub type Middleware = Arc<dyn Fn(BoxedHandler) -> BoxedHandler + Send + Sync>;

/// Builds a middleware from an async function `(Message, Next) -> Outcome`, in the spirit of
/// axum's `middleware::from_fn`.
///
/// ```
/// use cottontail::{from_fn, Message, Next, Outcome};
///
/// let log = from_fn(|msg: Message, next: Next| async move {
///     let started = std::time::Instant::now();
///     let outcome = next.run(msg).await;
///     tracing::info!(elapsed = ?started.elapsed(), ok = matches!(outcome, Outcome::Done(_)));
///     outcome
/// });
/// # let _ = log;
/// ```
pub fn from_fn<F, Fut>(f: F) -> Middleware
where
    F: Fn(Message, Next) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Outcome> + Send + 'static,
{
    Arc::new(move |inner: BoxedHandler| {
        let f = f.clone();
        BoxedHandler(Arc::new(move |msg| {
            let next = Next(inner.clone());
            Box::pin(f(msg, next))
        }))
    })
}
