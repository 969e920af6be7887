//! Example handler crate: the `bookings` workflow (docs/contracts.md, "Workflows").
//!
//! Input `{"trip_id": "t-1", "hotel": "...", "flight": "...", "amount_cents": 1200,
//! "fail_at": null | "hotel" | "flight" | "payment"}` on the queue `bookings`, with
//! `reply_to`, `correlation_id` and `message_id`. Steps hotel → flight → payment; hotel and
//! flight have compensations. `fail_at` makes that step fail permanently (kind `declined`).
//! Every effect is announced on `bookings.events` as `{"trip_id", "step", "action":
//! "reserved" | "charged" | "cancelled"}`, through the `Outbox` (confirmed before the step's
//! ack). The caller gets one `progress` reply per completed step, then `ok`
//! `{"trip_id", "hotel_ref", "flight_ref", "payment_ref"}` or the `compensated` error.
//!
//! The workflow's name is a parameter (tests run it under unique names); its events queue
//! is `<name>.events`.

use cottontail::workflow::{Context, Recorded, Workflow};
use cottontail::{HandlerError, Json, Outbox};
use serde::{Deserialize, Serialize};

/// The workflow name of the contract (docs/contracts.md, "Workflows").
pub const WORKFLOW: &str = "bookings";

/// The queue effects are announced on: `<workflow>.events`.
pub fn events_queue(workflow: &str) -> String {
    format!("{workflow}.events")
}

/// A booking request: the workflow's input.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct Booking {
    /// The trip.
    pub trip_id: String,
    /// The hotel to reserve.
    #[serde(default)]
    pub hotel: String,
    /// The flight to reserve.
    #[serde(default)]
    pub flight: String,
    /// What to charge.
    #[serde(default)]
    pub amount_cents: u64,
    /// The step that fails (for demonstration).
    #[serde(default)]
    pub fail_at: Option<String>,
}

/// An announced effect, on `<workflow>.events`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct Event {
    /// The trip.
    pub trip_id: String,
    /// `hotel`, `flight` or `payment`.
    pub step: String,
    /// `reserved`, `charged` or `cancelled` (a compensation).
    pub action: String,
}

/// What a step recorded: the reference of its reservation or charge.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct Reference {
    /// e.g. `hotel-t-1`.
    pub reference: String,
}

/// The final `ok` reply.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct Trip {
    /// The trip.
    pub trip_id: String,
    /// The hotel reservation.
    pub hotel_ref: String,
    /// The flight reservation.
    pub flight_ref: String,
    /// The payment.
    pub payment_ref: String,
}

/// The `bookings` workflow under `name`, for any app state.
pub fn workflow<S: Clone + Send + Sync + 'static>(name: &str) -> Workflow<S> {
    Workflow::new(name)
        .step("hotel", reserve_hotel)
        .compensate(cancel_hotel)
        .step("flight", reserve_flight)
        .compensate(cancel_flight)
        .step("payment", charge)
        .finish(|context: &Context| {
            let booking: Booking = context.input()?;
            let reference = |step: &str| context.result::<Reference>(step).map(|r| r.reference);
            Ok(Trip {
                trip_id: booking.trip_id,
                hotel_ref: reference("hotel")?,
                flight_ref: reference("flight")?,
                payment_ref: reference("payment")?,
            })
        })
}

/// Reserves the hotel.
pub async fn reserve_hotel(
    context: Context,
    outbox: Outbox,
) -> Result<Json<Reference>, HandlerError> {
    effect(&context, &outbox, "hotel", "reserved").await
}

/// Reserves the flight.
pub async fn reserve_flight(
    context: Context,
    outbox: Outbox,
) -> Result<Json<Reference>, HandlerError> {
    effect(&context, &outbox, "flight", "reserved").await
}

/// Charges the card.
pub async fn charge(context: Context, outbox: Outbox) -> Result<Json<Reference>, HandlerError> {
    effect(&context, &outbox, "payment", "charged").await
}

/// Cancels the hotel reservation its step recorded.
pub async fn cancel_hotel(
    context: Context,
    Recorded(_reservation): Recorded<Reference>,
    outbox: Outbox,
) -> Result<(), HandlerError> {
    announce(&context, &outbox, "hotel", "cancelled").await
}

/// Cancels the flight reservation its step recorded.
pub async fn cancel_flight(
    context: Context,
    Recorded(_reservation): Recorded<Reference>,
    outbox: Outbox,
) -> Result<(), HandlerError> {
    announce(&context, &outbox, "flight", "cancelled").await
}

/// A step's effect: declined when `fail_at` names it, else announced and referenced.
async fn effect(
    context: &Context,
    outbox: &Outbox,
    step: &str,
    action: &str,
) -> Result<Json<Reference>, HandlerError> {
    let booking: Booking = context.input()?;
    if booking.fail_at.as_deref() == Some(step) {
        return Err(HandlerError::permanent(
            "declined",
            format!("{step} declined for trip {}", booking.trip_id),
        ));
    }
    announce(context, outbox, step, action).await?;
    Ok(Json(Reference {
        reference: format!("{step}-{}", booking.trip_id),
    }))
}

/// Publishes the effect on the events queue (confirmed before the step's ack).
async fn announce(
    context: &Context,
    outbox: &Outbox,
    step: &str,
    action: &str,
) -> Result<(), HandlerError> {
    let booking: Booking = context.input()?;
    let event = Event {
        trip_id: booking.trip_id,
        step: step.to_owned(),
        action: action.to_owned(),
    };
    // The same id on every copy a redelivered step can announce.
    let id = format!("{}:{step}:{action}", context.id());
    outbox
        .send_json_as(&events_queue(context.workflow()), &id, &event)
        .await
}
