//! The broker's consumer timeout: a handler whose run may outlast it is refused at start with
//! an explanation; on a private node with a lowered `consumer_timeout`, a channel the broker
//! closes for a delivery held too long is reopened (logged as such) while the other handlers'
//! in-flight work finishes once, on the same connection, and a continued job longer than the
//! timeout completes without ever tripping it.
use cottontail_test_support as common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use cottontail::lapin::{Connection, ConnectionProperties};
use cottontail::{
    App, Config, Continue, Error, IntoOutcome, Json, MessageId, Outcome, Queue, State,
};

const LIMIT: Duration = Duration::from_secs(90);

async fn noop() {}

#[tokio::test]
async fn a_handler_that_may_outlast_the_brokers_consumer_timeout_is_refused_at_start() {
    let name = unique("too-long");
    let refused = App::new(())
        .handler(
            Queue::new(&name).timeout(Duration::from_secs(31 * 60)),
            noop,
        )
        .start(config(&unique("too-long-app")))
        .await
        .err()
        .expect("refused");
    let Error::Config(text) = refused else {
        panic!("not a configuration error: {refused}");
    };
    assert!(text.contains(&name), "{text}");
    assert!(text.contains("consumer_timeout"), "{text}");
    assert!(text.contains("Continue"), "{text}");

    // A broker told to have a longer timeout takes it.
    let app = start_with(
        App::new(()).handler(
            Queue::new(&name)
                .timeout(Duration::from_secs(31 * 60))
                .expires(EXPIRES),
            noop,
        ),
        config(&unique("long-ok-app")).consumer_timeout(Some(Duration::from_secs(3600))),
    )
    .await;
    app.stop().await.unwrap();
}

#[derive(Clone, Default)]
struct Runs {
    hold: Arc<AtomicU32>,
    steady: Counter,
    slices: Arc<AtomicU32>,
}

/// Holds its first delivery past the broker's consumer timeout; later ones pass at once.
async fn hold(State(runs): State<Runs>) {
    if runs.hold.fetch_add(1, Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}

/// Work well within the timeout, counted per message id.
async fn steady(State(runs): State<Runs>, MessageId(id): MessageId) {
    tokio::time::sleep(Duration::from_millis(700)).await;
    runs.steady.add(&id.unwrap_or_default());
}

/// 12 slices of 400 ms: 4.8 s of work, each delivery held for one slice only.
async fn sliced(State(runs): State<Runs>, Json(done): Json<u32>) -> Outcome {
    tokio::time::sleep(Duration::from_millis(400)).await;
    runs.slices.fetch_add(1, Ordering::SeqCst);
    if done + 1 < 12 {
        return Continue::with(&(done + 1)).into_outcome();
    }
    Json(done + 1).into_outcome()
}

#[tokio::test]
async fn a_channel_closed_for_an_ack_timeout_is_reopened_and_other_work_finishes_once() {
    let logs = common::logs::logs();
    let node = PrivateNode::start("ctimeout", None);
    // 2 s instead of 30 min, checked every 250 ms instead of every minute (read by each new
    // channel).
    node.ctl(&[
        "eval",
        "application:set_env(rabbit, consumer_timeout, 2000).",
    ]);
    node.ctl(&[
        "eval",
        "application:set_env(rabbit, channel_tick_interval, 250).",
    ]);
    let runs = Runs::default();
    let (hold_q, steady_q, sliced_q) = (unique("hold"), unique("steady"), unique("sliced"));
    let app = App::new(runs.clone())
        // The broker's timeout is deliberately not told (as if misconfigured): the run
        // outlives it.
        .handler(Queue::new(&hold_q).concurrency(1).prefetch(1), hold)
        .handler(Queue::new(&steady_q).concurrency(2).prefetch(2), steady)
        .handler(Queue::new(&sliced_q).concurrency(1).prefetch(1), sliced);
    let metrics = app.metrics().clone();
    let config = Config::new(node.url.clone())
        .connection_name(unique("ctimeout-app"))
        .shutdown_timeout(Duration::from_secs(10))
        .consumer_timeout(None);
    let app = start_with(app, config).await;

    let conn = Connection::connect(&node.url, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = confirm_channel(&conn).await;
    let steady_ids: Vec<String> = (0..8).map(|i| format!("s-{i}")).collect();
    let props = |id: &str| json_props().with_message_id(id.into());
    publish(&ch, &hold_q, b"null", props("h")).await;
    publish(&ch, &sliced_q, b"0", props("c")).await;
    for id in &steady_ids {
        publish(&ch, &steady_q, b"null", props(id)).await;
    }

    let r = runs.clone();
    wait_until(LIMIT, "the held message redelivered and done", || {
        let r = r.clone();
        async move { r.hold.load(Ordering::SeqCst) >= 2 }
    })
    .await;
    let r = runs.clone();
    wait_until(LIMIT, "every steady message done", || {
        let r = r.clone();
        async move { r.steady.keys() == 8 }
    })
    .await;
    let r = runs.clone();
    wait_until(LIMIT, "the sliced job done", || {
        let r = r.clone();
        async move { r.slices.load(Ordering::SeqCst) >= 12 }
    })
    .await;
    // Let anything requeued come back before counting.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for id in &steady_ids {
        assert_eq!(
            runs.steady.get(id),
            1,
            "{id} ran once: {:?}",
            runs.steady.snapshot()
        );
    }
    assert_eq!(
        runs.slices.load(Ordering::SeqCst),
        12,
        "no slice was held past the timeout (none redelivered)"
    );
    assert_eq!(
        runs.hold.load(Ordering::SeqCst),
        2,
        "the held delivery came back once, then passed"
    );
    let text = metrics.render();
    assert_eq!(
        metric_value(&text, "cottontail_connection_recoveries_total", &[]).unwrap_or(0.0),
        0.0,
        "the connection was never restarted"
    );
    let text = logs.text();
    assert!(
        text.contains("went unacknowledged past its consumer_timeout")
            && text.contains("delivery acknowledgement on channel"),
        "the ack timeout is logged as such"
    );
    for q in [&hold_q, &steady_q, &sliced_q] {
        let counts = queue_counts(&conn, q).await;
        assert_eq!(counts, (0, 1), "{q}: empty, and consumed again");
    }
    app.stop().await.unwrap();
}
