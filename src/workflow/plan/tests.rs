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
            Next::FanOut(_) => panic!("no fan-out step here"),
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

// ---------------------------------------------------------------------------------------------
// Fan-out and join
// ---------------------------------------------------------------------------------------------

fn album_slip() -> Slip {
    let Plan {
        next: Next::Send(out),
        ..
    } = start(
        "albums",
        "a-1",
        &["thumbnails".into(), "publish".into()],
        Caller {
            reply_to: Some("replies".into()),
            correlation_id: Some("c-1".into()),
        },
        json!({"album_id": "a-1"}),
        7,
        &finish_refs(),
    )
    else {
        panic!("the first step is sent");
    };
    out.slip
}

fn fanned_out(items: Value, compensable: bool) -> Plan {
    let body = Body {
        input: json!({"album_id": "a-1"}),
        results: Default::default(),
    };
    fan_out(
        album_slip(),
        body,
        items,
        "thumbnails",
        compensable,
        &finish_refs(),
    )
}

/// The join's store fields as the join queue would leave them: the state, then each child's
/// record — in any order, duplicates keeping the first.
fn fields(out: &FanOut, records: &[(u64, Record)]) -> BTreeMap<String, Vec<u8>> {
    let mut fields = BTreeMap::new();
    let state = serde_json::to_vec(&out.state).unwrap();
    fields.insert(JOIN_STATE.to_owned(), state);
    for (i, record) in records {
        fields
            .entry(i.to_string())
            .or_insert_with(|| serde_json::to_vec(record).unwrap());
    }
    fields
}

fn the_fan_out(plan: Plan) -> FanOut {
    match plan.next {
        Next::FanOut(out) => *out,
        other => panic!("not a fan-out: {other:?}"),
    }
}

#[test]
fn a_fan_out_sends_one_child_per_item_replying_to_the_join() {
    let plan = fanned_out(
        json!([{"image": "a"}, {"image": "b"}, {"image": "c"}]),
        false,
    );
    assert_eq!(
        plan.progress, None,
        "the step is done when its children are"
    );
    let out = the_fan_out(plan);
    assert_eq!(out.queue, "thumbnails");
    assert_eq!(out.join_queue, "albums.thumbnails.join");
    assert_eq!(out.join_id, "a-1:thumbnails");
    let ids: Vec<_> = out.children.iter().map(|c| c.message_id.as_str()).collect();
    assert_eq!(
        ids,
        ["a-1:thumbnails:0", "a-1:thumbnails:1", "a-1:thumbnails:2"]
    );
    assert_eq!(out.children[2].body, json!({"image": "c"}));
    assert_eq!(out.state.children, 3);
    assert_eq!(out.state.slip.step, "thumbnails");
    assert_eq!(out.state.slip.itinerary, ["publish"]);
    for (i, child) in out.children.iter().enumerate() {
        assert_eq!(
            parse_child(&child.correlation_id),
            Some(("a-1:thumbnails", i as u64, 3))
        );
    }
}

#[test]
fn child_correlation_ids_are_parsed_strictly() {
    // Workflow ids may contain ':' themselves.
    assert_eq!(parse_child("x:y:s:2/5"), Some(("x:y:s", 2, 5)));
    assert_eq!(parse_child("a:s:5/5"), None, "index out of range");
    assert_eq!(parse_child("s:1/5"), None, "no workflow id");
    assert_eq!(parse_child("a:s:1"), None);
    assert_eq!(parse_child("a:s:x/5"), None);
    assert_eq!(parse_child("c-1"), None);
}

#[test]
fn the_join_orders_results_by_index_whatever_the_arrival_order() {
    let out = the_fan_out(fanned_out(json!([1, 2, 3]), false));
    let ok = |i: u64| (i, Record::Ok(json!({"width": i})));
    // Arrival order 2, 0, 0 again (a duplicate with another output), 1.
    let mut arrivals = vec![ok(2), ok(0), (0, Record::Ok(json!("late copy"))), ok(1)];
    let partial = fields(&out, &arrivals[..3]);
    assert!(!join_complete(partial.len() as u64, 3));
    assert_eq!(joined(&partial, false, &finish_refs()), None);
    let all = fields(&out, &arrivals);
    assert!(join_complete(all.len() as u64, 3));
    let plan = joined(&all, false, &finish_refs()).unwrap();
    assert_eq!(plan.progress, Some(done("thumbnails")));
    let Next::Send(next) = plan.next else {
        panic!("the itinerary goes on");
    };
    assert_eq!(next.queue, "albums.publish");
    assert_eq!(
        next.body.results["thumbnails"],
        json!([{"width": 0}, {"width": 1}, {"width": 2}])
    );
    // The first record of an index is the one joined.
    arrivals.swap(1, 2);
    let Next::Send(next) = joined(&fields(&out, &arrivals), false, &finish_refs())
        .unwrap()
        .next
    else {
        panic!("the itinerary goes on");
    };
    assert_eq!(next.body.results["thumbnails"][0], "late copy");
}

#[test]
fn a_failed_child_fails_the_join_with_the_first_bad_index() {
    let out = the_fan_out(fanned_out(json!([1, 2, 3, 4]), false));
    let bad = |i: u64| {
        (
            i,
            Record::Failed {
                kind: "invalid_input".into(),
                message: format!("cannot decode image {i}"),
            },
        )
    };
    let ok = |i: u64| (i, Record::Ok(json!(i)));
    let records = [bad(3), ok(0), bad(1), ok(2)];
    let plan = joined(&fields(&out, &records), false, &finish_refs()).unwrap();
    assert_eq!(plan.progress, None);
    let Next::Finish(end) = plan.next else {
        panic!("nothing to undo: the workflow ends");
    };
    // A workflow without compensations reports the child's own error and its index.
    let end = end.without_compensations();
    assert_eq!(
        end.reply(),
        Err(
            json!({"error": {"kind": "invalid_input", "message": "cannot decode image 1",
            "index": 1}})
        )
    );
    assert_eq!(end.job_status(), "failed");
}

#[test]
fn a_failed_join_compensates_what_completed() {
    // hotel (compensable) completed, then a fan-out step whose child 0 failed.
    let mut slip = album_slip();
    slip.compensations = vec!["hotel".into()];
    let body = Body {
        input: json!({}),
        results: [("hotel".to_owned(), json!({"ref": "hotel-1"}))]
            .into_iter()
            .collect(),
    };
    let out = the_fan_out(fan_out(slip, body, json!([1]), "q", true, &finish_refs()));
    let failed = Record::Failed {
        kind: "timeout".into(),
        message: "slow".into(),
    };
    let plan = joined(&fields(&out, &[(0, failed)]), true, &finish_refs()).unwrap();
    let Next::Send(next) = plan.next else {
        panic!("the hotel is undone");
    };
    assert_eq!(next.queue, "albums.hotel.compensate");
    let slip = Slip::from_headers(Some(&next.slip.to_headers())).unwrap();
    let end = compensation_done(slip, next.body, true).next;
    let Next::Finish(end) = end else {
        panic!("nothing else to undo");
    };
    let error = end.without_compensations().reply().unwrap_err();
    assert_eq!(error["error"]["kind"], "compensated");
    assert_eq!(error["error"]["failed_step"], "thumbnails");
    assert_eq!(error["error"]["index"], 0);
    assert_eq!(error["error"]["compensated"], json!(["hotel"]));
}

#[test]
fn an_empty_fan_out_joins_at_once_and_a_non_array_fails_the_step() {
    let plan = fanned_out(json!([]), false);
    assert_eq!(plan.progress, Some(done("thumbnails")));
    let Next::Send(next) = plan.next else {
        panic!("the itinerary goes on");
    };
    assert_eq!(next.body.results["thumbnails"], json!([]));
    let plan = fanned_out(json!({"not": "a list"}), false);
    let Next::Finish(end) = plan.next else {
        panic!("the step failed");
    };
    assert_eq!(
        end.without_compensations().reply().unwrap_err()["error"]["kind"],
        "workflow"
    );
}

#[test]
fn child_replies_are_recorded_as_outputs_or_errors() {
    assert_eq!(
        child_record(true, br#"{"width": 4}"#),
        Record::Ok(json!({"width": 4}))
    );
    assert_eq!(
        child_record(
            false,
            br#"{"error": {"kind": "invalid_input", "message": "bad"}}"#
        ),
        Record::Failed {
            kind: "invalid_input".into(),
            message: "bad".into()
        }
    );
    assert_eq!(
        child_record(false, b"garbage"),
        Record::Failed {
            kind: "failed".into(),
            message: String::new()
        }
    );
}
