//! Handlers are plain async functions whose arguments are extractors; this module turns them
//! into type-erased [`Service`]s and offers the middleware extension point ([`from_fn`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use crate::extract::FromMessage;
use crate::message::Message;
use crate::outcome::{IntoOutcome, Outcome};

/// A boxed, sendable future.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// An async function from an argument tuple of extractors to something [`IntoOutcome`].
///
/// Implemented for `async fn`s and closures with up to eight extractor arguments; you never
/// implement it yourself.
pub trait Handler<Args, S>: Clone + Send + Sync + Sized + 'static {
    /// Runs the handler on one message.
    fn call(&self, msg: Message, state: &S) -> BoxFuture<Outcome>;
}

macro_rules! impl_handler {
    ($($arg:ident),*) => {
        #[allow(non_snake_case, unused_variables)]
        impl<F, Fut, R, S, $($arg,)*> Handler<($($arg,)*), S> for F
        where
            F: Fn($($arg,)*) -> Fut + Clone + Send + Sync + 'static,
            Fut: Future<Output = R> + Send + 'static,
            R: IntoOutcome,
            $($arg: FromMessage<S> + Send + 'static,)*
        {
            fn call(&self, msg: Message, state: &S) -> BoxFuture<Outcome> {
                $(
                    let $arg = match $arg::from_message(&msg, state) {
                        Ok(value) => value,
                        Err(error) => return Box::pin(std::future::ready(Outcome::Failed(error))),
                    };
                )*
                let fut = (self)($($arg,)*);
                Box::pin(async move { fut.await.into_outcome() })
            }
        }
    };
}

impl_handler!();
impl_handler!(A1);
impl_handler!(A1, A2);
impl_handler!(A1, A2, A3);
impl_handler!(A1, A2, A3, A4);
impl_handler!(A1, A2, A3, A4, A5);
impl_handler!(A1, A2, A3, A4, A5, A6);
impl_handler!(A1, A2, A3, A4, A5, A6, A7);
impl_handler!(A1, A2, A3, A4, A5, A6, A7, A8);

/// A type-erased handler with its state bound: what the consumer loop runs.
#[derive(Clone)]
pub struct Service(Arc<dyn Fn(Message) -> BoxFuture<Outcome> + Send + Sync>);

impl Service {
    pub(crate) fn from_handler<H, Args, S>(handler: H, state: S) -> Self
    where
        H: Handler<Args, S>,
        S: Send + Sync + 'static,
    {
        Service(Arc::new(move |msg| handler.call(msg, &state)))
    }

    /// Runs the service on one message.
    pub fn call(&self, msg: Message) -> BoxFuture<Outcome> {
        (self.0)(msg)
    }
}

/// The rest of the chain, handed to a middleware.
#[derive(Clone)]
pub struct Next(Service);

impl Next {
    /// Runs the inner middleware and finally the handler.
    pub fn run(self, msg: Message) -> BoxFuture<Outcome> {
        self.0.call(msg)
    }
}

/// A middleware: wraps every handler of an app (see [`App::layer`](crate::App::layer)).
pub type Layer = Arc<dyn Fn(Service) -> Service + Send + Sync>;

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
pub fn from_fn<F, Fut>(f: F) -> Layer
where
    F: Fn(Message, Next) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Outcome> + Send + 'static,
{
    Arc::new(move |inner: Service| {
        let f = f.clone();
        Service(Arc::new(move |msg| {
            let next = Next(inner.clone());
            Box::pin(f(msg, next))
        }))
    })
}
