//! [`Run`]: what the pipeline did with one message, read back from what it published.

use std::time::Duration;

use serde::de::DeserializeOwned;

use crate::client::recorder::{from_json, Published, Recording};
use crate::client::reply::Status;
use crate::headers;
use crate::names::DEAD_LETTER_EXCHANGE;
use crate::runtime::pipeline::Verdict;

/// What happened to one message: how it left the pipeline, the replies, the messages the
/// handler sent, in the order they were published.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Run {
    /// How the message left the pipeline (the row of the README's "What happens to a
    /// message").
    pub handled: Handled,
    /// Replies to `reply_to`, in order: `progress`, then the final `ok` or `error`.
    pub replies: Vec<Reply>,
    /// Messages the handler published ([`Outbox`](crate::Outbox) or its publisher), in order.
    pub outbox: Vec<Published>,
    /// Every publish, in order: the outbox, the replies and the pipeline's copies (retry,
    /// dead-letter, deferral).
    pub published: Vec<Published>,
    /// How many times the pipeline called the handler (its extractors, then its body): 0 when
    /// the message never reached it (a guard dead-lettered or moved it, or it was a
    /// duplicate), more than 1 with immediate retries.
    pub runs: u32,
}

/// How a message left the pipeline.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum Handled {
    /// The handler succeeded; its `ok` reply (if asked for) was confirmed; acked.
    Ok,
    /// The dedup store knew the `message_id` as done: not run, the cached reply was sent; acked.
    Duplicate,
    /// A transient failure (error, panic, timeout) with attempts left: a copy waits in the
    /// retry queue; acked.
    Retried(Retry),
    /// Dead-lettered with its reason (then an `error` reply, if asked for); acked.
    DeadLettered(DeadLetter),
    /// Put back in the broker, not run and without spending an attempt: its id is busy on
    /// another instance, the dedup store did not answer, or (classic queues) a redelivery was
    /// counted. The copy says where it went.
    Deferred(Published),
    /// A publish the outcome needed failed: the message goes back to the queue (not acked).
    Requeued,
    /// The job was cancelled: not run (or stopped), an `error` reply of kind `cancelled`;
    /// acked.
    Cancelled,
    /// The handler returned a [`Continue`](crate::Continue): the copy is the next slice, in
    /// the handler's queue; acked.
    Continued(Published),
}

/// A retry copy (in `<queue>.retry.<ms>`).
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Retry {
    /// The delay of the retry queue (the copy's TTL is this with jitter).
    pub delay: Duration,
    /// `x-attempts`: attempts made so far (the next run is attempt `attempts + 1`).
    pub attempts: u32,
    /// The copy itself.
    pub copy: Published,
}

/// A dead-letter copy (to `<queue>.dlq` through `cottontail.dlx`) and its reason.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct DeadLetter {
    /// `x-error-kind`, e.g. `invalid_input`, `crash_loop`, or the kind of the last error.
    pub kind: String,
    /// `x-error`: the reason.
    pub error: String,
    /// `x-attempts`.
    pub attempts: u32,
    /// `x-handler`.
    pub handler: String,
    /// The copy itself: the original body and properties plus those headers.
    pub copy: Published,
}

/// A reply to `reply_to`.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Reply {
    /// `x-status`: `ok`, `error` or `progress`.
    pub status: Status,
    /// The body: the handler's output, the error envelope or the progress value (JSON).
    pub body: Vec<u8>,
    /// The request's `correlation_id`, echoed.
    pub correlation_id: Option<String>,
}

impl Reply {
    /// The body, deserialized from JSON.
    ///
    /// # Panics
    ///
    /// When the body is not valid JSON for `T` (this is for tests: the panic says why).
    #[track_caller]
    pub fn json<T: DeserializeOwned>(&self) -> T {
        from_json(&self.body)
    }

    /// A publish to the caller's `reply_to` with an `x-status` is a reply.
    fn from_published(published: &Published, reply_to: Option<&str>) -> Option<Self> {
        if !published.exchange.is_empty() || reply_to != Some(published.routing_key.as_str()) {
            return None;
        }
        let status = published.header(headers::STATUS)?;
        Some(Reply {
            status: Status::parse(&status)?,
            body: published.body.clone(),
            correlation_id: published
                .properties
                .correlation_id()
                .as_ref()
                .map(|id| id.to_string()),
        })
    }
}

impl Run {
    /// Sorts what was recorded into replies, the handler's messages and the pipeline's copy,
    /// which says how the message left.
    pub(super) fn new(verdict: Verdict, recording: Recording, reply_to: Option<&str>) -> Self {
        let mut replies = Vec::new();
        let mut outbox = Vec::new();
        let mut copies = Vec::new();
        for (by_handler, published) in &recording.published {
            if let Some(reply) = Reply::from_published(published, reply_to) {
                replies.push(reply);
            } else if *by_handler {
                outbox.push(published.clone());
            } else {
                copies.push(published.clone());
            }
        }
        // Each of these verdicts follows a confirmed copy: the last the pipeline published.
        let mut copy = || {
            copies
                .pop()
                .expect("cottontail::testing: the pipeline's verdict has no copy")
        };
        let handled = match verdict {
            Verdict::Done => Handled::Ok,
            Verdict::Duplicate => Handled::Duplicate,
            Verdict::Retried => Handled::Retried(Retry::from_copy(copy())),
            Verdict::DeadLettered => Handled::DeadLettered(DeadLetter::from_copy(copy())),
            Verdict::Moved => Handled::Deferred(copy()),
            Verdict::Cancelled => Handled::Cancelled,
            Verdict::Continued => Handled::Continued(copy()),
            Verdict::Requeue => Handled::Requeued,
        };
        Run {
            handled,
            replies,
            outbox,
            published: recording.published.into_iter().map(|(_, p)| p).collect(),
            runs: recording.runs,
        }
    }

    /// The handler succeeded (and its reply, if any, went out).
    pub fn is_ok(&self) -> bool {
        matches!(self.handled, Handled::Ok)
    }

    /// Whether the message was acked; `false` only when it went back to the queue because a
    /// publish failed.
    pub fn acked(&self) -> bool {
        !matches!(self.handled, Handled::Requeued)
    }

    /// The retry copy, when the message was retried.
    pub fn retry(&self) -> Option<&Retry> {
        match &self.handled {
            Handled::Retried(retry) => Some(retry),
            _ => None,
        }
    }

    /// The dead-letter, when the message was dead-lettered.
    pub fn dead_letter(&self) -> Option<&DeadLetter> {
        match &self.handled {
            Handled::DeadLettered(dead_letter) => Some(dead_letter),
            _ => None,
        }
    }

    /// The final reply (`ok` or `error`), if one was sent.
    pub fn reply(&self) -> Option<&Reply> {
        self.replies.iter().rfind(|r| r.status != Status::Progress)
    }

    /// The `progress` replies, in order.
    pub fn progress(&self) -> impl Iterator<Item = &Reply> {
        self.replies.iter().filter(|r| r.status == Status::Progress)
    }
}

impl Retry {
    fn from_copy(copy: Published) -> Self {
        Retry {
            delay: crate::names::tier_delay(&copy.routing_key).unwrap_or_default(),
            attempts: attempts(&copy),
            copy,
        }
    }
}

impl DeadLetter {
    fn from_copy(copy: Published) -> Self {
        debug_assert_eq!(copy.exchange, DEAD_LETTER_EXCHANGE);
        DeadLetter {
            kind: copy.header(headers::ERROR_KIND).unwrap_or_default(),
            error: copy.header(headers::ERROR).unwrap_or_default(),
            attempts: attempts(&copy),
            handler: copy.header(headers::HANDLER).unwrap_or_default(),
            copy,
        }
    }
}

fn attempts(copy: &Published) -> u32 {
    copy.header_u64(headers::ATTEMPTS)
        .map_or(0, |n| u32::try_from(n).unwrap_or(u32::MAX))
}
