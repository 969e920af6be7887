//! Workflows against the real broker: the `bookings` demo workflow (docs/contracts.md,
//! "Workflows") under a unique name. Every booking ends with exactly one final reply after one progress
//! reply per completed step; failed ones are compensated in reverse order, once each (the
//! events queue shows it); a redelivered step or compensation runs no effect again and sends
//! nothing again; a compensation that keeps failing is dead-lettered as `compensation_failed`.
use cottontail_test_support as common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use cottontail::lapin::types::FieldTable;
use cottontail::lapin::BasicProperties;
use cottontail::stores::{MemoryJobs, MemoryStore};
use cottontail::workflow::{Input, Workflow};
use cottontail::{headers, App, Attempt, Dedup, HandlerError, Json, Queue, RetryPolicy};
use cottontail_bookings::Event;
use serde_json::{json, Value};

/// `fail_at` of booking `i`: a third fail at payment, a sixth at flight, a twelfth at hotel.
fn fail_at(i: usize) -> Option<&'static str> {
    match i % 12 {
        0..=3 => Some("payment"),
        4 | 5 => Some("flight"),
        6 => Some("hotel"),
        _ => None,
    }
}

fn booking(i: usize) -> Value {
    json!({"trip_id": format!("t-{i}"), "hotel": "Ritz", "flight": "LH 400",
        "amount_cents": 1200, "fail_at": fail_at(i)})
}

/// The events a booking must leave, in order.
fn expected_events(i: usize) -> Vec<(&'static str, &'static str)> {
    match fail_at(i) {
        None => vec![
            ("hotel", "reserved"),
            ("flight", "reserved"),
            ("payment", "charged"),
        ],
        Some("payment") => vec![
            ("hotel", "reserved"),
            ("flight", "reserved"),
            ("flight", "cancelled"),
            ("hotel", "cancelled"),
        ],
        Some("flight") => vec![("hotel", "reserved"), ("hotel", "cancelled")],
        _ => vec![],
    }
}

/// Replies by correlation id: `x-status` and body, in arrival order.
fn replies_by_caller(inbox: &Inbox) -> BTreeMap<String, Vec<(String, Value)>> {
    let mut by = BTreeMap::<String, Vec<(String, Value)>>::new();
    for reply in inbox.all() {
        let id = reply
            .properties
            .correlation_id()
            .as_ref()
            .map(|c| c.to_string())
            .expect("replies carry the correlation id");
        let status = header_str(&reply, "x-status").expect("replies carry x-status");
        by.entry(id)
            .or_default()
            .push((status, serde_json::from_slice(&reply.data).unwrap()));
    }
    by
}

fn finals(inbox: &Inbox) -> usize {
    inbox
        .all()
        .iter()
        .filter(|r| header_str(r, "x-status").as_deref() != Some("progress"))
        .count()
}

/// Events by trip, in arrival order.
fn events_by_trip(inbox: &Inbox) -> BTreeMap<String, Vec<(String, String)>> {
    let mut by = BTreeMap::<String, Vec<(String, String)>>::new();
    for message in inbox.all() {
        let event: Event = serde_json::from_slice(&message.data).unwrap();
        by.entry(event.trip_id)
            .or_default()
            .push((event.step, event.action));
    }
    by
}

/// A step message as the workflow sends it, published by hand: what a redelivery looks like.
fn step_message(
    name: &str,
    id: &str,
    step: &str,
    compensation: bool,
    reply_to: &str,
    input: Value,
    results: Value,
) -> (String, Vec<u8>, BasicProperties) {
    let mut table = FieldTable::default();
    headers::set_string(&mut table, headers::WORKFLOW, name);
    headers::set_string(&mut table, headers::WORKFLOW_ID, id);
    headers::set_string(&mut table, headers::WORKFLOW_STEP, step);
    headers::set_strings(&mut table, headers::WORKFLOW_ITINERARY, &[]);
    headers::set_strings(&mut table, headers::WORKFLOW_COMPENSATIONS, &[]);
    headers::set_string(&mut table, headers::WORKFLOW_REPLY_TO, reply_to);
    headers::set_string(&mut table, headers::WORKFLOW_CORRELATION_ID, id);
    let (queue, message_id) = if compensation {
        headers::set_string(&mut table, headers::WORKFLOW_FAILED_STEP, "payment");
        headers::set_string(&mut table, headers::WORKFLOW_ERROR_KIND, "declined");
        (
            cottontail::names::workflow_compensation(name, step),
            cottontail::names::workflow_compensation_id(id, step),
        )
    } else {
        (
            cottontail::names::workflow_step(name, step),
            cottontail::names::workflow_step_id(id, step),
        )
    };
    let body = json!({"input": input, "results": results}).to_string();
    let props = json_props()
        .with_message_id(message_id.into())
        .with_headers(table);
    (queue, body.into_bytes(), props)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bookings_end_once_and_failed_ones_are_compensated_in_reverse_order_once() {
    bounded(Duration::from_secs(120), async {
        const N: usize = 60;
        let name = unique("bookings");
        let events = cottontail_bookings::events_queue(&name);
        let dedup = Dedup::new(MemoryStore::new(10_000));
        let jobs = Arc::new(MemoryJobs::default());
        let conn = connect(&unique("caller")).await;
        let ch = confirm_channel(&conn).await;
        declare_plain(&ch, &events, expiring_quorum_args()).await;
        let app = App::new(()).workflow(
            cottontail_bookings::workflow(&name)
                .dedup(dedup.clone())
                .queues(|q| q.expires(EXPIRES)),
        );
        let metrics = app.metrics().clone();
        let app = start(app.shared_job_store(jobs.clone()), &unique("app")).await;
        let (reply_to, replies) = reply_queue(&conn).await;
        let announced = collect(&conn, &events).await;

        let request = |i: usize| {
            let props = json_props()
                .with_reply_to(reply_to.as_str().into())
                .with_correlation_id(format!("b-{i}").into())
                .with_message_id(format!("b-{i}").into());
            (booking(i).to_string().into_bytes(), props)
        };
        publish_many(&ch, &name, (0..N).map(request).collect()).await;
        wait_until(Duration::from_secs(60), "a final reply per booking", || {
            let n = finals(&replies);
            async move { n >= N }
        })
        .await;

        // Redeliveries of finished steps and compensations (an ok booking's first and last
        // step, a compensated booking's last compensation): acked as duplicates, with no
        // effect and nothing sent again.
        let ok = (0..N).find(|i| fail_at(*i).is_none()).unwrap();
        let undone = (0..N).find(|i| fail_at(*i) == Some("payment")).unwrap();
        let hotel = json!({"hotel": {"reference": format!("hotel-t-{undone}")}});
        let again = [
            step_message(
                &name,
                &format!("b-{ok}"),
                "hotel",
                false,
                &reply_to,
                booking(ok),
                json!({}),
            ),
            step_message(
                &name,
                &format!("b-{ok}"),
                "payment",
                false,
                &reply_to,
                booking(ok),
                json!({}),
            ),
            step_message(
                &name,
                &format!("b-{undone}"),
                "hotel",
                true,
                &reply_to,
                booking(undone),
                hotel,
            ),
        ];
        for (queue, body, props) in &again {
            publish(&ch, queue, body, props.clone()).await;
        }
        let counted = |handler: String| {
            let metrics = metrics.clone();
            move || {
                let n = common::dedup::outcome(&metrics, &handler, "duplicate");
                async move { n >= 1.0 }
            }
        };
        for queue in ["hotel", "payment", "hotel.compensate"] {
            let handler = format!("{name}.{queue}");
            wait_until(
                Duration::from_secs(20),
                &format!("a duplicate on {handler}"),
                counted(handler.clone()),
            )
            .await;
        }
        // A booking published after them finishes after anything they could have set off.
        publish_many(&ch, &name, vec![request(N + 7)]).await;
        wait_until(Duration::from_secs(20), "the last booking's reply", || {
            let n = finals(&replies);
            async move { n > N }
        })
        .await;
        let expected_events_total: usize = (0..N)
            .chain([N + 7])
            .map(|i| expected_events(i).len())
            .sum();
        announced
            .wait_for(expected_events_total, Duration::from_secs(20))
            .await;

        let by_caller = replies_by_caller(&replies);
        let by_trip = events_by_trip(&announced);
        assert_eq!(by_caller.len(), N + 1);
        for i in (0..N).chain([N + 7]) {
            let all = &by_caller[&format!("b-{i}")];
            let (last_status, last) = all.last().unwrap();
            let progress: Vec<&Value> = all[..all.len() - 1]
                .iter()
                .map(|(status, body)| {
                    assert_eq!(status, "progress", "b-{i}: one final reply, last: {all:?}");
                    body
                })
                .collect();
            let completed: Vec<Value> = expected_events(i)
                .iter()
                .filter(|(_, action)| *action != "cancelled")
                .map(|(step, _)| json!({"step": step, "state": "done"}))
                .collect();
            assert_eq!(progress, completed.iter().collect::<Vec<_>>(), "b-{i}");
            match fail_at(i) {
                None => {
                    assert_eq!(last_status, "ok", "b-{i}: {last}");
                    assert_eq!(
                        last,
                        &json!({"trip_id": format!("t-{i}"), "hotel_ref": format!("hotel-t-{i}"),
                            "flight_ref": format!("flight-t-{i}"),
                            "payment_ref": format!("payment-t-{i}")})
                    );
                }
                Some(step) => {
                    assert_eq!(last_status, "error", "b-{i}: {last}");
                    let error = &last["error"];
                    assert_eq!(error["kind"], "compensated", "b-{i}: {last}");
                    assert_eq!(error["failed_step"], step);
                    assert!(error["message"].as_str().unwrap().contains("declined"));
                    let undone: Vec<&str> = expected_events(i)
                        .iter()
                        .filter(|(_, action)| *action == "cancelled")
                        .map(|(step, _)| *step)
                        .collect();
                    assert_eq!(error["compensated"], json!(undone), "b-{i}");
                    assert_eq!(error.as_object().unwrap().len(), 4, "{error}");
                }
            }
            let seen: Vec<(String, String)> =
                by_trip.get(&format!("t-{i}")).cloned().unwrap_or_default();
            let expected: Vec<(String, String)> = expected_events(i)
                .iter()
                .map(|(s, a)| (s.to_string(), a.to_string()))
                .collect();
            assert_eq!(seen, expected, "events of t-{i}");
        }

        // `/jobs/{message_id}` of each booking.
        for i in 0..N {
            let want = if fail_at(i).is_none() {
                "succeeded"
            } else {
                "compensated"
            };
            wait_job_status(&*jobs, &format!("b-{i}"), want, Duration::from_secs(10)).await;
        }
        let text = metrics.render();
        let counter = |metric: &str| {
            metric_value(&text, metric, &[("workflow", name.as_str())]).unwrap_or(0.0)
        };
        let failed = (0..N).filter(|i| fail_at(*i).is_some()).count();
        assert_eq!(
            counter("cottontail_workflows_started_total"),
            (N + 1) as f64
        );
        assert_eq!(
            counter("cottontail_workflows_compensated_total"),
            failed as f64
        );
        assert_eq!(
            counter("cottontail_workflows_completed_total"),
            (N + 1 - failed) as f64
        );
        assert!(metric_value(
            &text,
            "cottontail_workflow_step_duration_seconds_count",
            &[("workflow", name.as_str()), ("step", "payment")]
        )
        .is_some_and(|n| n >= 1.0));

        app.stop().await.unwrap();
        let mut queues = workflow_queues(
            &name,
            &["hotel", "flight", "payment"],
            &["hotel", "flight"],
            &dedup,
        );
        queues.push(events);
        delete_queues_quietly(&queues).await;
    })
    .await;
}

/// Step `a` fails once (transient, retried) and then reserves; step `b` is declined.
async fn flaky(Attempt(n): Attempt, Input(v): Input<Value>) -> Result<Json<Value>, HandlerError> {
    if n == 1 {
        return Err(HandlerError::transient("busy", "try again"));
    }
    Ok(Json(json!({"reserved": v["id"], "attempt": n})))
}

async fn declined() -> Result<(), HandlerError> {
    Err(HandlerError::permanent("declined", "no"))
}

async fn broken_undo(Attempt(n): Attempt) -> Result<(), HandlerError> {
    Err(HandlerError::transient(
        "down",
        format!("undo service down (attempt {n})"),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retried_steps_run_again_and_a_failing_compensation_is_dead_lettered() {
    bounded(Duration::from_secs(60), async {
        let name = unique("flaky");
        let dedup = Dedup::new(MemoryStore::new(100));
        let retry = RetryPolicy::fixed(Duration::from_millis(100)).max_attempts(3);
        let app = App::new(()).workflow(
            Workflow::new(&name)
                .step("a", flaky)
                .compensate(broken_undo)
                .step("b", declined)
                .dedup(dedup.clone())
                .queues(move |q| q.expires(EXPIRES).retry(retry.clone())),
        );
        let metrics = app.metrics().clone();
        let app = start(app, &unique("app")).await;
        let conn = connect(&unique("caller")).await;
        let ch = confirm_channel(&conn).await;
        let (reply_to, replies) = reply_queue(&conn).await;
        let props = json_props()
            .with_reply_to(reply_to.as_str().into())
            .with_correlation_id("c-1".into())
            .with_message_id("w-1".into());
        publish(&ch, &name, br#"{"id": 7}"#, props).await;
        let all = replies.wait_for(2, Duration::from_secs(30)).await;

        assert_eq!(header_str(&all[0], "x-status").as_deref(), Some("progress"));
        assert_eq!(header_str(&all[1], "x-status").as_deref(), Some("error"));
        let error: Value = serde_json::from_slice(&all[1].data).unwrap();
        assert_eq!(
            error["error"],
            json!({"kind": "compensated", "message": "step 'b' failed (declined): no",
                "failed_step": "b", "compensated": [], "compensation_failed": ["a"]})
        );
        let dlq = cottontail::names::dlq(&cottontail::names::workflow_compensation(&name, "a"));
        wait_until(
            Duration::from_secs(10),
            "the compensation in its DLQ",
            || {
                let (conn, dlq) = (&conn, dlq.clone());
                async move { queue_depth(conn, &dlq).await == 1 }
            },
        )
        .await;
        let dead = drain(&conn, &dlq).await;
        assert_eq!(
            header_str(&dead[0], "x-error-kind").as_deref(),
            Some("compensation_failed")
        );
        assert_eq!(header_u64(&dead[0], "x-attempts"), Some(3));
        assert_eq!(
            dead[0]
                .properties
                .message_id()
                .as_ref()
                .map(|id| id.to_string()),
            Some("w-1:a:compensate".to_owned())
        );
        let text = metrics.render();
        let labels = [("workflow", name.as_str()), ("step", "a")];
        assert_eq!(
            metric_value(
                &text,
                "cottontail_workflow_compensation_failures_total",
                &labels
            ),
            Some(1.0)
        );
        // Step `b` failed for good: compensated, not dead-lettered.
        let b_dlq = cottontail::names::dlq(&cottontail::names::workflow_step(&name, "b"));
        assert_eq!(queue_depth(&conn, &b_dlq).await, 0);

        app.stop().await.unwrap();
        delete_queues_quietly(&workflow_queues(&name, &["a", "b"], &["a"], &dedup)).await;
    })
    .await;
}

#[tokio::test]
async fn invalid_workflows_are_refused_at_start() {
    async fn step() {}
    for (workflow, why) in [
        (
            Workflow::new("w").compensate(step).step("a", step),
            "after the step",
        ),
        (Workflow::new("w").step("a", step).step("a", step), "twice"),
        (Workflow::new("w").step("dlq", step), "must be"),
        (Workflow::new("w").step("a.b", step), "must be"),
    ] {
        let error = App::new(())
            .workflow(workflow)
            .start(config(&unique("app")))
            .await
            .err()
            .expect("refused");
        assert!(error.to_string().contains(why), "{error}");
    }
}

/// Set on the child processes of the fleet test: the workflow's name and the Redis key prefix.
const WORKER_WORKFLOW: &str = "COTTONTAIL_TEST_WORKFLOW";
const WORKER_PREFIX: &str = "COTTONTAIL_TEST_WORKFLOW_PREFIX";

/// The dedup settings of the fleet: a killed instance's claims lapse after 3 s.
fn fleet_dedup(store: cottontail::stores::RedisStore) -> Dedup {
    Dedup::new(store)
        .lease(Duration::from_secs(3))
        .busy_delay(Duration::from_millis(200))
        .retention(Duration::from_secs(600))
}

/// The child side of the fleet test: a no-op unless the parent set [`WORKER_WORKFLOW`], then
/// one instance of the bookings workflow, with Redis for dedup and job statuses, until
/// killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workflow_worker() {
    let (Ok(name), Ok(prefix)) = (std::env::var(WORKER_WORKFLOW), std::env::var(WORKER_PREFIX))
    else {
        return;
    };
    let store = cottontail::stores::RedisStore::connect(&redis_url(), &prefix)
        .await
        .expect("Redis");
    App::new(())
        .workflow(
            cottontail_bookings::workflow(&name)
                .dedup(fleet_dedup(store.clone()))
                .queues(|q| q.expires(EXPIRES)),
        )
        .job_store(store)
        .run(config(&unique("fleet")))
        .await
        .expect("worker runs until killed");
}

/// 200 bookings on 3 instances sharing Redis, one killed with SIGKILL mid-run: every booking
/// ends (all its final replies alike, none contradicting another), none is left half-done,
/// effects and compensations come in order, and `/jobs` (the shared store) says how each
/// ended. What SIGKILL can cost is a repeat of what the killed instance had confirmed but not
/// yet recorded (a reply or an event, within one store round trip): counted and printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_sharing_redis_finishes_every_booking_when_an_instance_is_killed() {
    if std::env::var(WORKER_WORKFLOW).is_ok() {
        return;
    }
    bounded(Duration::from_secs(180), async {
        const N: usize = 200;
        let name = unique("fleet");
        let prefix = unique("fleet-redis");
        let events = cottontail_bookings::events_queue(&name);
        let conn = connect(&unique("caller")).await;
        let ch = confirm_channel(&conn).await;
        declare_plain(&ch, &events, expiring_quorum_args()).await;
        let env = [
            (WORKER_WORKFLOW, name.clone()),
            (WORKER_PREFIX, prefix.clone()),
        ];
        let mut workers: Vec<ChildGuard> = (0..3)
            .map(|_| ChildGuard(Some(spawn_child_quiet("workflow_worker", &env))))
            .collect();
        let last = cottontail::names::workflow_compensation(&name, "flight");
        // Consumers per queue and instance on this machine.
        let per_instance = Queue::new(&name).consumer_shares().len() as u32;
        wait_until(Duration::from_secs(60), "3 instances consuming", || {
            let (conn, name, last) = (&conn, name.clone(), last.clone());
            async move {
                let consumers = |q: Option<(u32, u32)>| q.map_or(0, |(_, c)| c);
                consumers(queue_counts_if_declared(conn, &name).await) >= 3 * per_instance
                    && consumers(queue_counts_if_declared(conn, &last).await) >= 3 * per_instance
            }
        })
        .await;
        let (reply_to, replies) = reply_queue(&conn).await;
        let announced = collect(&conn, &events).await;
        let items = (0..N)
            .map(|i| {
                let props = json_props()
                    .with_reply_to(reply_to.as_str().into())
                    .with_correlation_id(format!("b-{i}").into())
                    .with_message_id(format!("b-{i}").into());
                (booking(i).to_string().into_bytes(), props)
            })
            .collect();
        publish_many(&ch, &name, items).await;
        wait_until(
            Duration::from_secs(60),
            "a third of the bookings done",
            || {
                let n = finals(&replies);
                async move { n >= N / 3 }
            },
        )
        .await;
        workers[0].kill9().await;
        wait_until(
            Duration::from_secs(90),
            "every booking's final reply",
            || {
                let by = replies_by_caller(&replies);
                async move {
                    by.len() == N
                        && by
                            .values()
                            .all(|all| all.iter().any(|(s, _)| s != "progress"))
                }
            },
        )
        .await;
        let expected_total: usize = (0..N).map(|i| expected_events(i).len()).sum();
        announced
            .wait_for(expected_total, Duration::from_secs(20))
            .await;

        let by_caller = replies_by_caller(&replies);
        let by_trip = events_by_trip(&announced);
        let (mut repeated_replies, mut repeated_events) = (0, 0);
        for i in 0..N {
            let finals: Vec<&(String, Value)> = by_caller[&format!("b-{i}")]
                .iter()
                .filter(|(s, _)| s != "progress")
                .collect();
            assert!(
                finals.windows(2).all(|w| w[0] == w[1]),
                "b-{i}: contradicting final replies {finals:?}"
            );
            repeated_replies += finals.len() - 1;
            let want = if fail_at(i).is_none() { "ok" } else { "error" };
            assert_eq!(finals[0].0, want, "b-{i}: {:?}", finals[0]);
            if let Some(step) = fail_at(i) {
                assert_eq!(finals[0].1["error"]["failed_step"], step);
            }
            // Each event once, in order; a repeat can only follow its original.
            let seen = by_trip.get(&format!("t-{i}")).cloned().unwrap_or_default();
            let mut distinct = seen.clone();
            distinct.dedup();
            repeated_events += seen.len() - distinct.len();
            let expected: Vec<(String, String)> = expected_events(i)
                .iter()
                .map(|(s, a)| (s.to_string(), a.to_string()))
                .collect();
            assert_eq!(
                distinct, expected,
                "events of t-{i} (half-done or out of order)"
            );
        }
        eprintln!(
            "fleet: {repeated_replies} repeated final replies, {repeated_events} repeated events \
             after one SIGKILL"
        );
        // Repeats carry the original's message_id: by id, one final reply per booking
        // (`<id>#final`) and each effect and compensation once (`<id>:<step>:<action>`).
        let id_of = |r: &Received| {
            r.properties
                .message_id()
                .as_ref()
                .map(|m| m.to_string())
                .expect("a message id")
        };
        let final_ids: std::collections::BTreeSet<String> = replies
            .all()
            .iter()
            .filter(|r| header_str(r, "x-status").as_deref() != Some("progress"))
            .map(id_of)
            .collect();
        let want: std::collections::BTreeSet<String> =
            (0..N).map(|i| format!("b-{i}#final")).collect();
        assert_eq!(final_ids, want, "one distinct final reply per booking");
        let event_ids: std::collections::BTreeSet<String> =
            announced.all().iter().map(id_of).collect();
        let want: std::collections::BTreeSet<String> = (0..N)
            .flat_map(|i| {
                expected_events(i)
                    .into_iter()
                    .map(move |(step, action)| format!("b-{i}:{step}:{action}"))
            })
            .collect();
        assert_eq!(
            event_ids, want,
            "each effect and compensation once by message_id"
        );
        eprintln!(
            "fleet: raw counts {} final replies, {} events; distinct by message_id {} and {}",
            finals(&replies),
            announced.len(),
            final_ids.len(),
            event_ids.len()
        );

        let jobs = cottontail::stores::RedisStore::connect(&redis_url(), &prefix)
            .await
            .unwrap();
        for i in 0..N {
            let want = if fail_at(i).is_none() {
                "succeeded"
            } else {
                "compensated"
            };
            wait_job_status(&jobs, &format!("b-{i}"), want, Duration::from_secs(10)).await;
        }

        for worker in &mut workers {
            worker.kill9().await;
        }
        let dedup = fleet_dedup(jobs);
        let mut queues = workflow_queues(
            &name,
            &["hotel", "flight", "payment"],
            &["hotel", "flight"],
            &dedup,
        );
        queues.push(events);
        delete_queues_quietly(&queues).await;
    })
    .await;
}
