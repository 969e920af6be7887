//! The orders handler through `cottontail::testing`: state transitions per order, the
//! `x-sequence` headers, dedup. (The ordering across partitions needs a broker: see the
//! `ordering_*` tests of cottontail.)

use std::sync::Arc;

use cottontail::stores::{MemorySequences, MemoryStore};
use cottontail::testing::{Handled, Status, TestHandler, TestMessage};
use cottontail::Dedup;
use cottontail_orders::{handle, queue, Order, Orders};
use serde_json::json;

fn orders(dedup: Option<Dedup>) -> (TestHandler, Orders) {
    let book = Orders::default();
    let queue = queue(Arc::new(MemorySequences::default()), dedup);
    (TestHandler::with_state(queue, handle, book.clone()), book)
}

fn event(order: &str, seq: u64, event: &str) -> TestMessage {
    TestMessage::json(&json!({"order_id": order, "event": event, "item": {"sku": "a"}}))
        .sequence(order, seq)
        .reply_to("caller")
}

#[tokio::test]
async fn events_move_an_order_through_its_states() {
    let (t, book) = orders(None);
    let mut statuses = Vec::new();
    for (seq, ev) in [
        (1, "created"),
        (2, "item_added"),
        (3, "paid"),
        (4, "shipped"),
    ] {
        let run = t.run(event("o-1", seq, ev)).await;
        assert!(run.is_ok(), "{ev}: {run:?}");
        let order: Order = run.reply().unwrap().json();
        assert_eq!(order.last_sequence, seq);
        statuses.push(order.status);
    }
    assert_eq!(statuses, ["open", "open", "paid", "shipped"]);
    let saved = book.get("o-1").await.unwrap().unwrap();
    assert_eq!((saved.status.as_str(), saved.items.len()), ("shipped", 1));
}

#[tokio::test]
async fn an_impossible_transition_is_dead_lettered() {
    let (t, book) = orders(None);
    assert!(t.run(event("o-2", 1, "created")).await.is_ok());
    let run = t.run(event("o-2", 2, "shipped")).await;
    let dead = run.dead_letter().expect("dead-lettered");
    assert_eq!(dead.kind, "invalid_transition");
    assert!(
        dead.error.contains("Shipped in status open"),
        "{}",
        dead.error
    );
    assert_eq!(dead.copy.header_u64("x-sequence"), Some(2));
    assert_eq!(run.reply().unwrap().status, Status::Error);
    // The order is unchanged.
    assert_eq!(book.get("o-2").await.unwrap().unwrap().status, "open");
}

#[tokio::test]
async fn an_event_applied_before_answers_with_the_current_state() {
    let (t, _) = orders(None);
    t.run(event("o-3", 1, "created")).await;
    t.run(event("o-3", 2, "paid")).await;
    let run = t.run(event("o-3", 1, "created")).await;
    let order: Order = run.reply().unwrap().json();
    assert_eq!((order.status.as_str(), order.last_sequence), ("paid", 2));
}

#[tokio::test]
async fn sequence_headers_must_be_there_and_match_the_order() {
    let (t, _) = orders(None);
    let unsequenced = TestMessage::json(&json!({"order_id": "o-4", "event": "created"}));
    let run = t.run(unsequenced).await;
    assert_eq!(run.dead_letter().unwrap().kind, "invalid_input");
    let run = t
        .run(TestMessage::json(&json!({"order_id": "o-4", "event": "created"})).sequence("o-5", 1))
        .await;
    let dead = run.dead_letter().unwrap();
    assert_eq!(dead.kind, "invalid_input");
    assert!(dead.error.contains("does not match"), "{}", dead.error);
}

#[tokio::test]
async fn a_redelivered_event_with_its_message_id_is_not_applied_twice() {
    let (t, _) = orders(Some(Dedup::new(MemoryStore::new(1000))));
    let created = event("o-6", 1, "created").message_id("evt-1");
    assert!(t.run(created.clone()).await.is_ok());
    let again = t.run(created).await;
    assert!(matches!(again.handled, Handled::Duplicate), "{again:?}");
    assert_eq!(again.runs, 0);
    let order: Order = again.reply().unwrap().json();
    assert_eq!(order.status, "open");
}
