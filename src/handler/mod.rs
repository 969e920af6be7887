//! Handlers are plain async functions whose arguments are extractors; this module turns them
//! into type-erased [`BoxedHandler`]s; [`middleware`] is the extension point ([`from_fn`]).

use std::future::Future;

mod middleware;

pub use middleware::{from_fn, BoxedHandler, Middleware, Next};

use crate::error::HandlerError;
use crate::extract::FromMessage;
use crate::message::Message;
use crate::outcome::{IntoOutcome, Outcome};
use crate::BoxFuture;

/// An async function from an argument tuple of extractors to something [`IntoOutcome`].
///
/// Implemented for every `async fn` (and closure returning a future) with up to eight
/// arguments, each an extractor ([`FromMessage`]), whose output is [`IntoOutcome`]; you never
/// implement it yourself. It is assembled from three narrower traits so that a handler that
/// does not fit is reported by the rule it breaks: the argument that is no extractor, the
/// return type that is no outcome (see `docs/handlers-that-do-not-compile.md`).
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a cottontail handler",
    label = "not an async handler",
    note = "a handler is an `async fn` (or a closure returning a future) with up to 8 arguments, \
            each an extractor (`Json<T>`, `State<T>`, `Attempt`, `MessageId`, … or your own \
            `FromMessage<{S}>`), returning `()`, `Json<T>` or `Result<T: Serialize, E>`",
    note = "a plain `fn` is not enough: make it `async fn`"
)]
pub trait Handler<Args, S>: Clone + Send + Sync + Sized + 'static {
    /// Runs the handler on one message.
    fn call(&self, msg: Message, state: &S) -> BoxFuture<Outcome>;
}

impl<H, Args, S> Handler<Args, S> for H
where
    H: HandlerFn<Args>,
    Args: Extract<S>,
    H::Output: IntoOutcome,
{
    fn call(&self, msg: Message, state: &S) -> BoxFuture<Outcome> {
        match Args::extract(&msg, state) {
            Ok(args) => {
                let fut = self.call_with(args);
                Box::pin(async move { fut.await.into_outcome() })
            }
            Err(error) => Box::pin(std::future::ready(Outcome::Failed(error))),
        }
    }
}

/// An async function of an argument tuple: fixes the arguments from the signature alone, so
/// each argument is then checked as an extractor on its own.
#[doc(hidden)]
pub trait HandlerFn<Args>: Clone + Send + Sync + 'static {
    /// What the future resolves to.
    type Output;
    /// The handler's future.
    type Future: Future<Output = Self::Output> + Send + 'static;
    /// Calls the function.
    fn call_with(&self, args: Args) -> Self::Future;
}

/// A tuple of extractors, extracted left to right; the first failure stops the handler.
#[doc(hidden)]
pub trait Extract<S>: Sized + Send + 'static {
    /// Extracts every argument.
    fn extract(msg: &Message, state: &S) -> Result<Self, HandlerError>;
}

macro_rules! impl_handler {
    ($($arg:ident),*) => {
        #[allow(non_snake_case)]
        impl<F, Fut, $($arg,)*> HandlerFn<($($arg,)*)> for F
        where
            F: Fn($($arg,)*) -> Fut + Clone + Send + Sync + 'static,
            Fut: Future + Send + 'static,
        {
            type Output = Fut::Output;
            type Future = Fut;
            fn call_with(&self, ($($arg,)*): ($($arg,)*)) -> Fut {
                (self)($($arg,)*)
            }
        }

        #[allow(non_snake_case, unused_variables)]
        impl<S, $($arg,)*> Extract<S> for ($($arg,)*)
        where
            $($arg: FromMessage<S> + Send + 'static,)*
        {
            fn extract(msg: &Message, state: &S) -> Result<Self, HandlerError> {
                Ok(($($arg::from_message(msg, state)?,)*))
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
