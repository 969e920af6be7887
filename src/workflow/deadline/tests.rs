//! The deadline decision and the `/jobs` state, without a broker.

use std::sync::Arc;

use serde_json::json;

use super::*;
use crate::workflow::plan::{Final, Finish};
use crate::workflow::slip::Caller;
use crate::workflow::Context;

const D: Duration = Duration::from_secs(2);

fn steps() -> Vec<String> {
    vec!["hotel".into(), "flight".into(), "payment".into()]
}

fn finish() -> Finish {
    Arc::new(|context: &Context| Ok(Value::Object(context.results().clone())))
}

fn sent(plan: Plan) -> Outgoing {
    match plan.next {
        Next::Send(out) => *out,
        other => panic!("expected a message, got {other:?}"),
    }
}

/// The watch of the `flight` step message: `hotel` (compensable) completed.
fn flight_watch() -> Watch {
    let first = sent(plan::start(
        "bookings",
        "b-1",
        &steps(),
        Caller::default(),
        json!({"trip_id": "t-1"}),
        1_000,
        &finish(),
    ));
    let flight = sent(plan::step_done(
        first.slip,
        first.body,
        json!({"ref": "H-1"}),
        true,
        &finish(),
    ));
    Watch::new(&flight, 10_000, D)
}

#[test]
fn a_watch_is_due_a_deadline_after_its_send_and_again_after_each_redispatch() {
    let watch = flight_watch();
    assert_eq!(
        (watch.message_id.as_str(), watch.queue.as_str()),
        ("b-1:flight", "bookings.flight")
    );
    assert_eq!((watch.due_ms, watch.redispatches), (12_000, 0));
    let again = watch.redispatched(13_500, D);
    assert_eq!((again.due_ms, again.redispatches), (15_500, 1));
    assert_eq!(again.outgoing(), watch.outgoing(), "the same message again");
}

#[test]
fn redispatch_while_the_policy_allows_then_compensate() {
    let policy = OnDeadline::Redispatch { max: 2 };
    let mut watch = flight_watch();
    assert_eq!(decide(&watch, policy), Action::Redispatch);
    watch = watch.redispatched(0, D);
    assert_eq!(decide(&watch, policy), Action::Redispatch);
    watch = watch.redispatched(0, D);
    assert_eq!(decide(&watch, policy), Action::Compensate);
    assert_eq!(
        decide(&flight_watch(), OnDeadline::Redispatch { max: 0 }),
        Action::Compensate
    );
    assert_eq!(
        decide(&flight_watch(), OnDeadline::Compensate),
        Action::Compensate
    );
}

#[test]
fn a_compensation_past_its_deadline_is_always_sent_again() {
    let watch = flight_watch();
    let compensation = sent(exceeded(&watch, D));
    assert_eq!(compensation.queue, "bookings.hotel.compensate");
    let mut watch = Watch::new(&compensation, 0, D);
    for _ in 0..5 {
        assert_eq!(decide(&watch, OnDeadline::Compensate), Action::Redispatch);
        watch = watch.redispatched(0, D);
    }
}

#[test]
fn an_exceeded_deadline_fails_the_stuck_step_and_compensates_the_completed_ones() {
    let watch = flight_watch().redispatched(0, D);
    let compensation = sent(exceeded(&watch, D));
    let failure = compensation.slip.failure.clone().unwrap();
    assert_eq!(failure.step, "flight");
    assert_eq!(failure.kind, "deadline_exceeded");
    assert!(
        failure.message.contains("deadline exceeded") && failure.message.contains("1 re-dis"),
        "{}",
        failure.message
    );
    // The compensation of hotel runs, then the end names the stuck step.
    let end = plan::compensation_done(compensation.slip, compensation.body, true);
    let Next::Finish(last) = end.next else {
        panic!("expected the end")
    };
    let error = last.error();
    assert_eq!(error["kind"], "compensated");
    assert_eq!(error["failed_step"], "flight");
    assert_eq!(error["compensated"], json!(["hotel"]));
    assert!(error["message"]
        .as_str()
        .unwrap()
        .contains("deadline exceeded"));
}

#[test]
fn the_jobs_state_follows_the_workflow() {
    let watch = flight_watch();
    let before = completed(&steps(), &watch.body);
    assert_eq!(before, ["hotel"]);
    // Flight completes: payment is current.
    let to_payment = plan::step_done(
        watch.slip.clone(),
        watch.body.clone(),
        json!({"ref": "F-1"}),
        true,
        &finish(),
    );
    let running = state(&steps(), &before, &to_payment);
    assert_eq!(running["current_step"], "payment");
    assert_eq!(running["completed"], json!(["hotel", "flight"]));
    assert_eq!(running["outcome"], Value::Null);
    // Flight misses its deadline: hotel is being compensated, then the end.
    let compensating = exceeded(&watch, D);
    let state_now = state(&steps(), &before, &compensating);
    assert_eq!(state_now["current_step"], Value::Null);
    assert_eq!(state_now["failed_step"], "flight");
    assert_eq!(state_now["compensating"], "hotel");
    assert_eq!(state_now["completed"], json!(["hotel"]));
    let out = sent(compensating);
    let end = plan::compensation_done(out.slip, out.body, true);
    let ended = state(&steps(), &before, &end);
    assert_eq!(ended["outcome"], "compensated");
    assert_eq!(ended["compensated"], json!(["hotel"]));
    assert_eq!(ended["compensating"], Value::Null);
    let done = state(
        &steps(),
        &steps()[..2],
        &Plan {
            progress: Some(json!({"step": "payment", "state": "done"})),
            next: Next::Finish(Final::Succeeded(json!({}))),
        },
    );
    assert_eq!(done["completed"], json!(steps()));
    assert_eq!(done["outcome"], "succeeded");
}
