//! Example handler crate: order events applied as a state machine.
//!
//! Message `{"order_id": "o-1", "event": "created" | "item_added" | "paid" | "shipped" |
//! "cancelled", "item": {...}?}` with `x-sequence-key` = order id and `x-sequence`. An
//! impossible transition (e.g. `shipped` before `paid`) is dead-lettered with kind
//! `invalid_transition`. With `reply_to`, the reply is
//! `{"order_id", "status", "items", "last_sequence"}`.
//!
//! The queue is *ordered* (`cottontail::Ordering`): events of one order are applied in
//! `x-sequence` order, once each, even with several instances, retries and redeliveries; and
//! *deduplicated* by `message_id` when a dedup store is configured. The order book itself is
//! pluggable ([`OrderBook`]): in memory for one instance, Redis for several (every instance
//! must see the same book, since partitions move between instances).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cottontail::stores::SequenceStore;
use cottontail::{BoxFuture, Dedup, HandlerError, Json, Ordering, Queue, Sequence, State};
use serde::{Deserialize, Serialize};

/// The queue name of the contract (`docs/contracts.md`, "Demo service").
pub const QUEUE: &str = "orders";

/// An order event.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct Event {
    /// The order.
    pub order_id: String,
    /// What happened.
    pub event: Kind,
    /// The item, for `item_added`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub item: Option<serde_json::Value>,
}

/// Event kinds.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// The order exists.
    Created,
    /// An item was added (before payment).
    ItemAdded,
    /// Paid.
    Paid,
    /// Shipped (after payment).
    Shipped,
    /// Cancelled (before shipping).
    Cancelled,
}

/// An order's state, also the reply body.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct Order {
    /// The order.
    pub order_id: String,
    /// `new`, `open`, `paid`, `shipped` or `cancelled`.
    pub status: String,
    /// Items added.
    pub items: Vec<serde_json::Value>,
    /// The last applied `x-sequence`.
    pub last_sequence: u64,
}

/// Where orders live.
pub trait OrderBook: Send + Sync + 'static {
    /// The order, if it exists.
    fn get(&self, id: &str) -> BoxFuture<Result<Option<Order>, HandlerError>>;
    /// Saves the order.
    fn put(&self, order: Order) -> BoxFuture<Result<(), HandlerError>>;
}

/// The handler's state: the order book.
#[derive(Clone)]
pub struct Orders(Arc<dyn OrderBook>);

impl Default for Orders {
    fn default() -> Self {
        Self::new(MemoryBook::default())
    }
}

impl Orders {
    /// Orders kept in `book`.
    pub fn new(book: impl OrderBook) -> Self {
        Self(Arc::new(book))
    }

    /// A copy of one order.
    pub async fn get(&self, id: &str) -> Result<Option<Order>, HandlerError> {
        self.0.get(id).await
    }
}

/// Orders in process memory (one instance).
#[derive(Clone, Default)]
pub struct MemoryBook(Arc<Mutex<HashMap<String, Order>>>);

impl OrderBook for MemoryBook {
    fn get(&self, id: &str) -> BoxFuture<Result<Option<Order>, HandlerError>> {
        let found = self
            .0
            .lock()
            .map(|m| m.get(id).cloned())
            .map_err(|_| HandlerError::transient("state", "order book lock poisoned"));
        Box::pin(async move { found })
    }

    fn put(&self, order: Order) -> BoxFuture<Result<(), HandlerError>> {
        let saved = self
            .0
            .lock()
            .map(|mut m| {
                m.insert(order.order_id.clone(), order);
            })
            .map_err(|_| HandlerError::transient("state", "order book lock poisoned"));
        Box::pin(async move { saved })
    }
}

/// Orders in Redis (JSON at `<prefix>:order:<id>`), shared by every instance.
#[derive(Clone)]
pub struct RedisBook {
    conn: cottontail::stores::redis::client::aio::ConnectionManager,
    prefix: String,
}

impl RedisBook {
    /// Uses the connection of a cottontail `RedisStore`.
    pub fn new(store: &cottontail::stores::RedisStore) -> Self {
        Self {
            conn: store.connection(),
            prefix: store.prefix().to_owned(),
        }
    }
}

impl OrderBook for RedisBook {
    fn get(&self, id: &str) -> BoxFuture<Result<Option<Order>, HandlerError>> {
        let mut conn = self.conn.clone();
        let key = format!("{}:order:{id}", self.prefix);
        Box::pin(async move {
            use cottontail::stores::redis::client::AsyncCommands;
            let raw: Option<Vec<u8>> = conn.get(key).await?;
            Ok(match raw {
                Some(bytes) => Some(serde_json::from_slice(&bytes)?),
                None => None,
            })
        })
    }

    fn put(&self, order: Order) -> BoxFuture<Result<(), HandlerError>> {
        let mut conn = self.conn.clone();
        let key = format!("{}:order:{}", self.prefix, order.order_id);
        Box::pin(async move {
            use cottontail::stores::redis::client::AsyncCommands;
            let bytes = serde_json::to_vec(&order)?;
            let _: () = conn.set(key, bytes).await?;
            Ok(())
        })
    }
}

/// The queue settings: ordered by `x-sequence-key`/`x-sequence` with sequence state in
/// `sequences`, deduplicated by `message_id` when `dedup` is given.
pub fn queue(sequences: Arc<dyn SequenceStore>, dedup: Option<Dedup>) -> Queue {
    let queue = Queue::new(QUEUE).ordered(Ordering::shared(sequences));
    match dedup {
        Some(dedup) => queue.dedup(dedup),
        None => queue,
    }
}

/// Applies `event` to `order`, or explains why it cannot happen.
pub fn apply(order: &mut Order, event: &Event) -> Result<(), HandlerError> {
    let next = match (order.status.as_str(), event.event) {
        ("new", Kind::Created) => "open",
        ("open", Kind::ItemAdded) => {
            let item = event
                .item
                .clone()
                .ok_or_else(|| HandlerError::invalid_input("item_added without an item"))?;
            order.items.push(item);
            "open"
        }
        ("open", Kind::Paid) => "paid",
        ("paid", Kind::Shipped) => "shipped",
        ("open" | "paid", Kind::Cancelled) => "cancelled",
        (status, kind) => {
            return Err(HandlerError::permanent(
                "invalid_transition",
                format!(
                    "order {}: cannot apply {kind:?} in status {status}",
                    order.order_id
                ),
            ))
        }
    };
    order.status = next.to_owned();
    Ok(())
}

/// The handler.
pub async fn handle(
    State(orders): State<Orders>,
    seq: Sequence,
    Json(event): Json<Event>,
) -> Result<Json<Order>, HandlerError> {
    if seq.key != event.order_id {
        return Err(HandlerError::invalid_input(format!(
            "x-sequence-key '{}' does not match order_id '{}'",
            seq.key, event.order_id
        )));
    }
    let mut order = orders.get(&event.order_id).await?.unwrap_or_else(|| Order {
        order_id: event.order_id.clone(),
        status: "new".into(),
        ..Order::default()
    });
    if seq.number <= order.last_sequence {
        // Already applied (ordering makes this rare): answer with the current state.
        return Ok(Json(order));
    }
    apply(&mut order, &event)?;
    order.last_sequence = seq.number;
    orders.0.put(order.clone()).await?;
    Ok(Json(order))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(kind: Kind) -> Event {
        Event {
            order_id: "o-1".into(),
            event: kind,
            item: Some(serde_json::json!({"sku": "a"})),
        }
    }

    #[test]
    fn happy_path_and_impossible_transitions() {
        let mut o = Order {
            order_id: "o-1".into(),
            status: "new".into(),
            ..Default::default()
        };
        assert_eq!(
            apply(&mut o, &ev(Kind::Shipped)).unwrap_err().kind(),
            "invalid_transition"
        );
        for k in [Kind::Created, Kind::ItemAdded, Kind::Paid, Kind::Shipped] {
            apply(&mut o, &ev(k)).unwrap();
        }
        assert_eq!(o.status, "shipped");
        assert_eq!(o.items.len(), 1);
        assert_eq!(
            apply(&mut o, &ev(Kind::Cancelled)).unwrap_err().kind(),
            "invalid_transition"
        );
    }
}
