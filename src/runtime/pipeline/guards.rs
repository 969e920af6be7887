//! Guards: checks before anything else runs — unreadable properties, oversized bodies and
//! crash loops are dead-lettered with their reason (a workflow step compensates instead).

use super::{Verdict, Worker};
use crate::error::HandlerError;
use crate::headers;
use crate::message::Message;
use crate::queue::QueueType;
use crate::runtime::copies;

impl Worker {
    /// Checks that run before the handler: unreadable properties, oversized bodies and
    /// crash loops.
    pub(crate) async fn guard(&self, msg: &Message) -> Option<Verdict> {
        if let Some(fields) = headers::get_str(msg.headers(), headers::INVALID_UTF8) {
            let error = HandlerError::permanent(
                "invalid_properties",
                format!("not valid UTF-8: {fields} (the invalid bytes were replaced by '?')"),
            );
            return Some(self.give_up(msg, error, msg.attempt()).await);
        }
        if msg.body().len() > self.queue.max_body {
            let error = HandlerError::permanent(
                "too_large",
                format!(
                    "body of {} bytes exceeds the handler's limit of {} bytes",
                    msg.body().len(),
                    self.queue.max_body
                ),
            );
            return Some(self.give_up(msg, error, msg.attempt()).await);
        }
        let limit = u64::from(self.queue.delivery_limit);
        let redeliveries = match self.queue.effective_type() {
            QueueType::Quorum => {
                headers::get_u64(msg.headers(), headers::DELIVERY_COUNT).unwrap_or(0)
            }
            QueueType::Classic => {
                let counted = headers::get_u64(msg.headers(), headers::REDELIVERIES).unwrap_or(0);
                if msg.redelivered() && counted < limit {
                    // Classic queues do not count redeliveries: re-enqueue a counted copy
                    // (confirmed) and drop this delivery.
                    return Some(match copies::requeue_counted(msg, counted + 1).await {
                        Ok(()) => Verdict::Moved,
                        Err(e) => self.publish_failed(e),
                    });
                }
                counted
            }
        };
        if redeliveries >= limit {
            let error = HandlerError::permanent(
                "crash_loop",
                format!(
                    "delivered {} times without a verdict (the worker crashed, was killed or \
                     lost its connection while handling it); delivery limit is {limit}",
                    // The count comes from a header: any value, u64::MAX included.
                    redeliveries.saturating_add(1)
                ),
            );
            return Some(self.give_up(msg, error, msg.attempt()).await);
        }
        None
    }
}
