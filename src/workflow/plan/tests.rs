//! The routing-slip logic without a broker: whole workflows walked through the plans, each
//! hop's slip and body passed through their wire form (headers, JSON) as a broker would.

use serde_json::json;

use super::*;

/// What a walk saw: the queues in the order their messages were sent, the progress replies,
/// and the end.
struct Walk {
    queues: Vec<String>,
    ids: Vec<String>,
    progress: Vec<Value>,
    end: Final,
}

fn finish_refs() -> Finish {
    Arc::new(|context: &Context| {
        let trip: Value = context.input()?;
        let mut out = json!({"trip_id": trip["trip_id"]});
        for (step, output) in context.results() {
            out[format!("{step}_ref")] = output["ref"].clone();
        }
        Ok(out)
    })
}

/// Runs `steps` (name, has a compensation): `fail_at` fails for good, compensations in
/// `broken` are dead-lettered; every other handler succeeds with `{"ref": "<step>-1"}`.
fn walk(steps: &[(&str, bool)], fail_at: Option<&str>, broken: &[&str], finish: &Finish) -> Walk {
    let names: Vec<String> = steps.iter().map(|(s, _)| s.to_string()).collect();
    let caller = Caller {
        reply_to: Some("replies".into()),
        correlation_id: Some("c-1".into()),
    };
    let mut plan = start(
        "bookings",
        "b-1",
        &names,
        caller.clone(),
        json!({"trip_id": "t-1"}),
        7,
        finish,
    );
    let mut walk = Walk {
        queues: vec![],
        ids: vec![],
        progress: vec![],
        end: Final::Succeeded(Value::Null),
    };
    for _ in 0..100 {
        walk.progress.extend(plan.progress.take());
        let out = match plan.next {
            Next::Finish(end) => {
                walk.end = end;
                return walk;
            }
            Next::Send(out) => out,
        };
        // What the next instance reads off the wire.
        let slip = Slip::from_headers(Some(&out.slip.to_headers())).unwrap();
        let body = Body::parse(&out.body.to_bytes()).unwrap();
        assert_eq!(
            (&slip.caller, slip.started_ms, slip.id.as_str()),
            (&caller, 7, "b-1")
        );
        walk.queues.push(out.queue.clone());
        walk.ids.push(out.message_id.clone());
        let step = slip.step.clone();
        plan = if out.queue.ends_with(".compensate") {
            assert_eq!(
                body.results[&step],
                json!({"ref": format!("{step}-1")}),
                "a compensation gets its step's output"
            );
            compensation_done(slip, body, !broken.contains(&step.as_str()))
        } else if fail_at == Some(step.as_str()) {
            step_failed(slip, body, &HandlerError::permanent("declined", "no"))
        } else {
            let compensable = steps.iter().any(|(s, c)| *s == step && *c);
            let output = json!({"ref": format!("{step}-1")});
            step_done(slip, body, output, compensable, finish)
        };
    }
    panic!("the workflow did not end");
}

const BOOKINGS: &[(&str, bool)] = &[("hotel", true), ("flight", true), ("payment", false)];

fn done(step: &str) -> Value {
    json!({"step": step, "state": "done"})
}

#[test]
fn the_itinerary_runs_in_order_and_finishes_with_every_result() {
    let walk = walk(BOOKINGS, None, &[], &finish_refs());
    assert_eq!(
        walk.queues,
        ["bookings.hotel", "bookings.flight", "bookings.payment"]
    );
    assert_eq!(walk.ids, ["b-1:hotel", "b-1:flight", "b-1:payment"]);
    assert_eq!(
        walk.progress,
        [done("hotel"), done("flight"), done("payment")]
    );
    let output = json!({"trip_id": "t-1", "hotel_ref": "hotel-1", "flight_ref": "flight-1",
        "payment_ref": "payment-1"});
    assert_eq!(walk.end.reply(), Ok(&output));
    assert_eq!(walk.end.job_status(), "succeeded");
}

#[test]
fn a_failed_step_undoes_the_completed_ones_in_reverse_order() {
    let walk = walk(BOOKINGS, Some("payment"), &[], &finish_refs());
    assert_eq!(
        walk.queues,
        [
            "bookings.hotel",
            "bookings.flight",
            "bookings.payment",
            "bookings.flight.compensate",
            "bookings.hotel.compensate"
        ]
    );
    assert_eq!(
        walk.ids[3..],
        ["b-1:flight:compensate", "b-1:hotel:compensate"]
    );
    assert_eq!(walk.progress, [done("hotel"), done("flight")]);
    assert_eq!(
        walk.end.reply(),
        Err(json!({"error": {
            "kind": "compensated",
            "message": "step 'payment' failed (declined): no",
            "failed_step": "payment",
            "compensated": ["flight", "hotel"],
        }}))
    );
    assert_eq!(walk.end.job_status(), "compensated");
}

#[test]
fn failing_at_the_first_step_compensates_nothing() {
    let walk = walk(BOOKINGS, Some("hotel"), &[], &finish_refs());
    assert_eq!(walk.queues, ["bookings.hotel"]);
    assert!(walk.progress.is_empty());
    let error = walk.end.reply().unwrap_err();
    assert_eq!(error["error"]["compensated"], json!([]));
    assert_eq!(error["error"]["failed_step"], "hotel");

    let walk = super::tests::walk(BOOKINGS, Some("flight"), &[], &finish_refs());
    assert_eq!(walk.queues[2..], ["bookings.hotel.compensate"]);
    assert_eq!(
        walk.end.reply().unwrap_err()["error"]["compensated"],
        json!(["hotel"])
    );
}

#[test]
fn steps_without_a_compensation_are_not_undone() {
    let steps = &[("a", true), ("b", false), ("c", true), ("d", false)];
    let walk = walk(steps, Some("d"), &[], &finish_refs());
    assert_eq!(
        walk.queues[4..],
        ["bookings.c.compensate", "bookings.a.compensate"]
    );
    assert_eq!(
        walk.end.reply().unwrap_err()["error"]["compensated"],
        json!(["c", "a"])
    );
}

#[test]
fn a_dead_lettered_compensation_does_not_stop_the_others() {
    let walk = walk(BOOKINGS, Some("payment"), &["flight"], &finish_refs());
    assert_eq!(
        walk.queues[3..],
        ["bookings.flight.compensate", "bookings.hotel.compensate"]
    );
    let error = walk.end.reply().unwrap_err();
    assert_eq!(error["error"]["compensated"], json!(["hotel"]));
    assert_eq!(error["error"]["compensation_failed"], json!(["flight"]));
    assert_eq!(walk.end.job_status(), "dead_lettered");
}

#[test]
fn a_failing_finish_undoes_every_step() {
    let finish: Finish = Arc::new(|_: &Context| Err(HandlerError::permanent("bug", "no output")));
    let walk = walk(BOOKINGS, None, &[], &finish);
    assert_eq!(walk.progress.len(), 3, "every step completed");
    let error = walk.end.reply().unwrap_err();
    assert_eq!(error["error"]["failed_step"], "finish");
    assert_eq!(error["error"]["compensated"], json!(["flight", "hotel"]));
}

#[test]
fn a_workflow_without_steps_finishes_at_once() {
    let walk = walk(&[], None, &[], &finish_refs());
    assert!(walk.queues.is_empty());
    assert_eq!(walk.end.reply(), Ok(&json!({"trip_id": "t-1"})));
}
