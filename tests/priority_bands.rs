//! Priority on quorum queues through weighted bands: a backlog of low-priority work is
//! overtaken by urgent messages published after it, and the low band keeps moving.
use cottontail_test_support as common;

use common::*;
use cottontail::{Bands, Queue};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_urgent_messages_overtake_a_backlog_of_five_hundred_through_bands() {
    let name = unique("bands");
    let queue = Queue::new(&name)
        .expires(EXPIRES)
        .bands(Bands::new(&[(5, 8), (0, 1)]))
        .concurrency(4);
    let done = priority::urgent_overtakes_backlog(&queue).await;
    let last_urgent = done.iter().rposition(|p| *p == 9).unwrap();
    // Weighted, not starved: low-priority work kept moving while urgent work was waiting.
    assert!(
        done[..last_urgent].contains(&0),
        "the low band never got a turn"
    );
    let mut names = handler_queues(&queue, &cottontail::RetryPolicy::default());
    names.extend((0..2).map(|n| cottontail::names::band_queue(&name, n)));
    delete_queues(&names).await;
}
