//! Example handler crate: order events applied as a state machine.
//!
//! Message `{"order_id": "o-1", "event": "created" | "item_added" | "paid" | "shipped" |
//! "cancelled", "item": {...}?}` with `x-sequence-key` = order id and `x-sequence`. An
//! impossible transition (e.g. `shipped` before `paid`) is dead-lettered with kind
//! `invalid_transition`. With `reply_to`, the reply is
//! `{"order_id", "status", "items", "last_sequence"}`.
//!
//! State lives in an in-memory map here; the ordering guarantee (events applied in
//! `x-sequence` order across instances) and persistent stores come with cottontail's ordering
//! and store modules.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cottontail::{HandlerError, Json, Queue, Sequence, State};
use serde::{Deserialize, Serialize};

/// The queue name of the DESIGN.md contract.
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

/// Shared order book.
#[derive(Clone, Default)]
pub struct Orders(Arc<Mutex<HashMap<String, Order>>>);

impl Orders {
    /// A copy of one order.
    pub fn get(&self, id: &str) -> Option<Order> {
        self.0.lock().ok()?.get(id).cloned()
    }
}

/// The queue settings.
pub fn queue() -> Queue {
    Queue::new(QUEUE)
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
    let mut book = orders
        .0
        .lock()
        .map_err(|_| HandlerError::transient("state", "order book lock poisoned"))?;
    let order = book.entry(event.order_id.clone()).or_insert_with(|| Order {
        order_id: event.order_id.clone(),
        status: "new".into(),
        ..Order::default()
    });
    if seq.number <= order.last_sequence {
        // Already applied: answer with the current state (idempotent).
        return Ok(Json(order.clone()));
    }
    let mut next = order.clone();
    apply(&mut next, &event)?;
    next.last_sequence = seq.number;
    *order = next.clone();
    Ok(Json(next))
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
