//! Priority queues that actually prioritise: a backlog of low-priority work is overtaken by
//! urgent messages published after it (classic queue with `x-max-priority`).
use cottontail_test_support as common;

use common::*;
use cottontail::Queue;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_urgent_messages_overtake_a_backlog_of_five_hundred() {
    let queue = Queue::new(unique("prio"))
        .expires(EXPIRES)
        .priority(9)
        .concurrency(4);
    // The defaults for priority handlers: prefetch = concurrency.
    assert_eq!(queue.prefetch_count(), 4);
    priority::urgent_overtakes_backlog(&queue).await;
    delete_queues(&handler_queues(&queue, &cottontail::RetryPolicy::default())).await;
}
