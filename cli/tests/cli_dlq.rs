//! The operator CLI against the real broker: `dlq list` leaves messages in place, `dlq replay`
//! moves them back with the dead-letter headers stripped and loses nothing when killed midway,
//! a replayed request whose caller already got its `error` reply gets no second reply, and
//! `publish` / `call` talk to cottontail handlers.
use cottontail_test_support as common;

use std::collections::HashSet;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::dedup::outcome;
use common::*;
use cottontail::lapin::types::AMQPValue;
use cottontail::lapin::{BasicProperties, Connection};
use cottontail::{App, HandlerError, Json, Progress, Queue, RetryPolicy, State};
use serde_json::{json, Value};

/// Overall deadline of each test.
const LIMIT: Duration = Duration::from_secs(180);

const CLI: &str = env!("CARGO_BIN_EXE_cottontail");

/// Declares `Q` and `Q.dlq` as expiring quorum queues.
async fn queue_pair(conn: &Connection, prefix: &str) -> (String, String) {
    let q = unique(prefix);
    let dlq = format!("{q}.dlq");
    let ch = conn.create_channel().await.unwrap();
    declare_plain(&ch, &q, expiring_quorum_args()).await;
    declare_plain(&ch, &dlq, expiring_quorum_args()).await;
    (q, dlq)
}

/// A dead-lettered message as cottontail writes it, with a caller header to keep.
fn dead_letter(n: usize) -> (Vec<u8>, BasicProperties) {
    let mut props = json_props().with_message_id(format!("m-{n}").into());
    props = with_header(
        props,
        "x-error",
        AMQPValue::LongString(format!("boom {n}").into()),
    );
    props = with_header(
        props,
        "x-error-kind",
        AMQPValue::LongString("invalid_input".into()),
    );
    props = with_header(props, "x-attempts", AMQPValue::LongLongInt(3));
    props = with_header(props, "x-handler", AMQPValue::LongString("resize".into()));
    props = with_header(
        props,
        "x-last-error",
        AMQPValue::LongString("error: earlier".into()),
    );
    props = with_header(props, "x-tenant", AMQPValue::LongString("acme".into()));
    (format!(r#"{{"n":{n}}}"#).into_bytes(), props)
}

async fn wait_depth(conn: &Connection, queue: &str, n: u32) {
    wait_until(
        Duration::from_secs(20),
        &format!("{n} messages in {queue}"),
        || async { queue_depth(conn, queue).await == n },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_list_shows_reasons_and_leaves_the_messages_in_place() {
    bounded(LIMIT, async {
        let conn = connect(&unique("test")).await;
        let (q, dlq) = queue_pair(&conn, "cli-list").await;
        let ch = confirm_channel(&conn).await;
        publish_many(&ch, &dlq, (0..5).map(dead_letter).collect()).await;

        let (code, stdout, stderr) = run_cli(CLI, &["dlq", "list", &q]).await;
        assert_eq!(code, 0, "stdout: {stdout}\nstderr: {stderr}");
        for n in 0..5 {
            assert!(stdout.contains(&format!("boom {n}")), "{stdout}");
            assert!(stdout.contains(&format!("m-{n}")), "{stdout}");
        }
        assert!(stdout.contains("invalid_input"), "{stdout}");
        assert!(stdout.contains("resize"), "{stdout}");
        assert!(stdout.contains(r#"{"n":4}"#), "{stdout}");
        assert!(stdout.contains("5 of 5 message(s)"), "{stdout}");
        wait_depth(&conn, &dlq, 5).await;

        let (code, stdout, _) = run_cli(CLI, &["dlq", "list", &q, "--limit", "2"]).await;
        assert_eq!(code, 0);
        assert!(stdout.contains("2 of 5 message(s)"), "{stdout}");
        assert!(!stdout.contains("boom 2"), "{stdout}");
        wait_depth(&conn, &dlq, 5).await;

        // A long body is cut to a preview.
        let long = json!({ "blob": "x".repeat(1000) }).to_string();
        publish(&ch, &dlq, long.as_bytes(), json_props()).await;
        let (code, stdout, _) = run_cli(CLI, &["dlq", "list", &q]).await;
        assert_eq!(code, 0);
        assert!(
            !stdout.contains(&"x".repeat(300)),
            "the body preview is not truncated"
        );
        wait_depth(&conn, &dlq, 6).await;

        // A queue without a DLQ is an error, not an empty listing.
        let (code, _, stderr) = run_cli(CLI, &["dlq", "list", &unique("nothing")]).await;
        assert_ne!(code, 0);
        assert!(stderr.contains("NOT_FOUND"), "{stderr}");

        delete_queues_quietly(&[q, dlq]).await;
    })
    .await;
}

/// A dead-lettered message with every property a replay or a caller may rely on.
fn rich_dead_letter(n: usize) -> (Vec<u8>, BasicProperties) {
    let (body, props) = dead_letter(n);
    let props = with_header(
        props
            .with_correlation_id(format!("c-{n}").into())
            .with_reply_to("amq.rabbitmq.reply-to.x".into())
            .with_timestamp(1_700_000_000 + n as u64)
            .with_type("resize-request".into())
            .with_app_id("shop".into())
            .with_content_encoding("identity".into()),
        "traceparent",
        AMQPValue::LongString("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
    );
    (body, props)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_fifty_times_under_a_small_delivery_limit_keeps_every_message_as_it_was() {
    bounded(LIMIT, async {
        let conn = connect(&unique("test")).await;
        let q = unique("cli-list-limit");
        let dlq = format!("{q}.dlq");
        let ch = confirm_channel(&conn).await;
        declare_plain(&ch, &q, expiring_quorum_args()).await;
        // RabbitMQ 4.0-4.2 count every requeue against the delivery limit (20 when unset) and
        // drop the message past it; 3.10 does the same for an explicit limit.
        let mut args = expiring_quorum_args();
        args.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(3));
        declare_plain(&ch, &dlq, args).await;
        let items: Vec<_> = (0..5).map(rich_dead_letter).collect();
        publish_many(&ch, &dlq, items.clone()).await;

        for i in 0..50 {
            let (code, stdout, stderr) = run_cli(CLI, &["dlq", "list", &q]).await;
            assert_eq!(code, 0, "listing {i}: {stdout}\n{stderr}");
            assert!(
                stdout.contains("5 of 5 message(s)"),
                "listing {i} lost messages: {stdout}"
            );
        }
        // A partial listing shows the head and leaves the order alone.
        let (code, stdout, _) = run_cli(CLI, &["dlq", "list", &q, "--limit", "2"]).await;
        assert_eq!(code, 0);
        assert!(stdout.contains("2 of 5 message(s)"), "{stdout}");
        assert!(
            stdout.contains("boom 0") && stdout.contains("boom 1"),
            "{stdout}"
        );
        assert!(!stdout.contains("boom 2"), "{stdout}");

        wait_depth(&conn, &dlq, 5).await;
        let left = drain(&conn, &dlq).await;
        assert_eq!(left.len(), 5);
        for (n, (m, (body, props))) in left.iter().zip(&items).enumerate() {
            assert_eq!(&m.data, body, "message {n}: body or order changed");
            // The broker sets x-delivery-count on each delivery: fresh, after 51 listings.
            assert_eq!(
                header_u64(m, "x-delivery-count").unwrap_or(0),
                0,
                "message {n}"
            );
            let headers = cottontail::headers::without(
                m.properties.headers().as_ref(),
                &["x-delivery-count"],
            );
            let delivered = m.properties.clone().with_headers(headers);
            assert_eq!(&delivered, props, "message {n}: properties changed");
        }
        delete_queues_quietly(&[q, dlq]).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_replay_moves_messages_back_with_the_attempt_count_reset() {
    bounded(LIMIT, async {
        let conn = connect(&unique("test")).await;
        let (q, dlq) = queue_pair(&conn, "cli-replay").await;
        let ch = confirm_channel(&conn).await;
        let mut items: Vec<_> = (0..5).map(dead_letter).collect();
        // Properties that must not follow the message back.
        items[0].1 = items[0]
            .1
            .clone()
            .with_expiration("600000".into())
            .with_user_id("guest".into())
            .with_priority(4)
            .with_correlation_id("c-0".into());
        publish_many(&ch, &dlq, items).await;

        let (code, stdout, stderr) = run_cli(CLI, &["dlq", "replay", &q, "--limit", "3"]).await;
        assert_eq!(code, 0, "stdout: {stdout}\nstderr: {stderr}");
        assert!(stdout.contains("3 message(s) replayed"), "{stdout}");
        wait_depth(&conn, &dlq, 2).await;
        wait_depth(&conn, &q, 3).await;

        let replayed = drain(&conn, &q).await;
        let ids: Vec<String> = replayed
            .iter()
            .map(|m| m.properties.message_id().as_ref().unwrap().to_string())
            .collect();
        assert_eq!(ids, ["m-0", "m-1", "m-2"]);
        for (n, m) in replayed.iter().enumerate() {
            assert_eq!(m.data, format!(r#"{{"n":{n}}}"#).into_bytes());
            for stripped in [
                "x-error",
                "x-error-kind",
                "x-attempts",
                "x-handler",
                "x-last-error",
            ] {
                assert_eq!(header_str(m, stripped), None, "{stripped} was not stripped");
            }
            assert_eq!(header_str(m, "x-tenant").as_deref(), Some("acme"));
            assert_eq!(
                m.properties.content_type().as_ref().map(|s| s.as_str()),
                Some("application/json")
            );
            assert_eq!(*m.properties.delivery_mode(), Some(2));
            assert!(m.properties.expiration().is_none());
            assert!(m.properties.user_id().is_none());
        }
        assert_eq!(*replayed[0].properties.priority(), Some(4));
        assert_eq!(
            replayed[0]
                .properties
                .correlation_id()
                .as_ref()
                .map(|s| s.as_str()),
            Some("c-0")
        );

        // Without --limit: everything that is left.
        let (code, stdout, _) = run_cli(CLI, &["dlq", "replay", &q]).await;
        assert_eq!(code, 0);
        assert!(stdout.contains("2 message(s) replayed"), "{stdout}");
        wait_depth(&conn, &dlq, 0).await;
        wait_depth(&conn, &q, 2).await;

        // Nothing to replay is fine.
        let (code, stdout, _) = run_cli(CLI, &["dlq", "replay", &q]).await;
        assert_eq!(code, 0);
        assert!(stdout.contains("0 message(s) replayed"), "{stdout}");

        delete_queues_quietly(&[q, dlq]).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_replay_to_a_missing_queue_fails_and_keeps_the_messages() {
    bounded(LIMIT, async {
        let conn = connect(&unique("test")).await;
        // Only the DLQ exists: the replays are unroutable.
        let q = unique("cli-gone");
        let dlq = format!("{q}.dlq");
        let ch = confirm_channel(&conn).await;
        declare_plain(&ch, &dlq, expiring_quorum_args()).await;
        publish_many(&ch, &dlq, (0..3).map(dead_letter).collect()).await;

        let (code, _, stderr) = run_cli(CLI, &["dlq", "replay", &q]).await;
        assert_ne!(code, 0);
        assert!(stderr.contains("unroutable"), "{stderr}");
        wait_depth(&conn, &dlq, 3).await;

        delete_queues_quietly(&[dlq]).await;
    })
    .await;
}

/// Kills `cottontail dlq COMMAND Q` once it has taken messages from a DLQ of 500, then checks
/// that every message is still in Q or the DLQ (a duplicate is allowed, a loss is not).
async fn killing_midway_loses_nothing(command: &str) {
    const N: usize = 500;
    let conn = connect(&unique("test")).await;
    let (q, dlq) = queue_pair(&conn, &format!("cli-kill-{command}")).await;
    let ch = confirm_channel(&conn).await;
    publish_many(&ch, &dlq, (0..N).map(dead_letter).collect()).await;
    wait_depth(&conn, &dlq, N as u32).await;

    let mut child = std::process::Command::new(CLI)
        .args(["dlq", command, &q])
        .env("AMQP_URL", amqp_url())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until(Duration::from_secs(30), "the command to start", || async {
        queue_depth(&conn, &dlq).await < N as u32
    })
    .await;
    child.kill().unwrap();
    let status = child.wait().unwrap();
    let moved = queue_depth(&conn, &q).await;
    eprintln!("{command} killed ({status}) with {moved} of {N} in {q}");

    // The broker returns the killed channel's unacked messages to the DLQ.
    wait_until(Duration::from_secs(20), "all messages settled", || async {
        queue_depth(&conn, &q).await + queue_depth(&conn, &dlq).await >= N as u32
    })
    .await;
    let mut ids = HashSet::new();
    for queue in [&q, &dlq] {
        for m in drain(&conn, queue).await {
            ids.insert(m.properties.message_id().as_ref().unwrap().to_string());
        }
    }
    let missing: Vec<usize> = (0..N)
        .filter(|n| !ids.contains(&format!("m-{n}")))
        .collect();
    assert!(missing.is_empty(), "lost messages: {missing:?}");

    delete_queues_quietly(&[q, dlq]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_replay_midway_loses_nothing() {
    bounded(LIMIT, killing_midway_loses_nothing("replay")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_listing_midway_loses_nothing() {
    bounded(LIMIT, killing_midway_loses_nothing("list")).await;
}

/// Whether [`gated`] refuses its messages; the test flips it between the first run and the
/// replay.
#[derive(Clone, Default)]
struct Refusing(Arc<AtomicBool>);

async fn gated(
    State(refusing): State<Refusing>,
    Json(v): Json<Value>,
) -> Result<Json<Value>, HandlerError> {
    if refusing.0.load(Ordering::SeqCst) {
        return Err(HandlerError::permanent("invalid_input", "refused"));
    }
    Ok(Json(v))
}

/// A request with `reply_to` is dead-lettered (its caller gets the `error` reply), replayed
/// with `cottontail dlq replay` and handled again: refused again, or, when `fixed`, accepted.
/// Returns every reply the caller got (`x-status`, body), once the replay was handled and any
/// reply it sent has arrived.
async fn replay_a_request_that_got_its_error_reply(fixed: bool) -> Vec<(String, String)> {
    let refusing = Refusing::default();
    refusing.0.store(true, Ordering::SeqCst);
    let queue = Queue::new(unique("cli-replied")).expires(EXPIRES);
    let app = App::new(refusing.clone()).handler(queue.clone(), gated);
    let metrics = app.metrics().clone();
    let app = start(app, &unique("app")).await;
    let conn = connect(&unique("test")).await;
    let (reply_to, replies) = reply_queue(&conn).await;
    let ch = confirm_channel(&conn).await;
    let request = json_props()
        .with_message_id("m-1".into())
        .with_correlation_id("c-1".into())
        .with_reply_to(reply_to.clone().into());
    publish(&ch, queue.name(), br#"{"n":1}"#, request).await;
    let first = replies.wait_for(1, Duration::from_secs(20)).await;
    assert_eq!(header_str(&first[0], "x-status").as_deref(), Some("error"));
    wait_depth(&conn, &queue.dlq_name(), 1).await;

    refusing.0.store(!fixed, Ordering::SeqCst);
    let (code, stdout, stderr) = run_cli(CLI, &["dlq", "replay", queue.name()]).await;
    assert_eq!(code, 0, "stdout: {stdout}\nstderr: {stderr}");
    assert!(stdout.contains("1 message(s) replayed"), "{stdout}");
    // The outcome is counted after any reply was confirmed, so a reply is in the queue by then.
    let (settled, runs) = if fixed {
        ("ok", 1.0)
    } else {
        ("dead_lettered", 2.0)
    };
    wait_until(
        Duration::from_secs(20),
        "the replay to be handled",
        || async { outcome(&metrics, queue.name(), settled) == runs },
    )
    .await;
    // A marker behind any such reply: once it arrives, everything before it has too.
    let marker = json_props().with_correlation_id("marker".into());
    publish(&ch, &reply_to, b"marker", marker).await;
    let is_marker = |r: &Received| r.data == b"marker";
    wait_until(Duration::from_secs(20), "the marker", || async {
        replies.all().iter().any(is_marker)
    })
    .await;
    let all = replies.all();
    let before_marker = &all[..all.iter().position(is_marker).unwrap()];

    wait_depth(&conn, &queue.dlq_name(), u32::from(!fixed)).await;
    app.stop().await.unwrap();
    delete_queues_quietly(&handler_queues(&queue, &RetryPolicy::default())).await;
    before_marker
        .iter()
        .map(|r| {
            let correlation_id = r.properties.correlation_id().as_ref().map(|s| s.as_str());
            assert_eq!(correlation_id, Some("c-1"));
            let status = header_str(r, "x-status").unwrap_or_default();
            (status, String::from_utf8_lossy(&r.data).into_owned())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_request_refused_again_sends_no_second_error_reply() {
    bounded(LIMIT, async {
        let replies = replay_a_request_that_got_its_error_reply(false).await;
        let statuses: Vec<&str> = replies.iter().map(|(s, _)| s.as_str()).collect();
        assert_eq!(statuses, ["error"], "replies: {replies:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_request_that_succeeds_sends_no_reply_after_the_error() {
    bounded(LIMIT, async {
        let replies = replay_a_request_that_got_its_error_reply(true).await;
        // One final reply per request: the caller already has its `error`.
        let statuses: Vec<&str> = replies.iter().map(|(s, _)| s.as_str()).collect();
        assert_eq!(statuses, ["error"], "replies: {replies:?}");
    })
    .await;
}

async fn echo(Json(v): Json<Value>) -> Json<Value> {
    Json(json!({ "got": v }))
}

async fn refuse(Json(_): Json<Value>) -> Result<Json<Value>, HandlerError> {
    Err(HandlerError::permanent("invalid_input", "not today"))
}

async fn steps(progress: Progress) -> Result<Json<Value>, HandlerError> {
    for step in 1..=3 {
        progress.send(&json!({ "step": step })).await?;
    }
    Ok(Json(json!("finished")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_and_call_through_the_cli() {
    bounded(LIMIT, async {
        let echo_q = Queue::new(unique("cli-echo")).expires(EXPIRES);
        let refuse_q = Queue::new(unique("cli-refuse")).expires(EXPIRES);
        let steps_q = Queue::new(unique("cli-steps")).expires(EXPIRES);
        let app = App::new(())
            .handler(echo_q.clone(), echo)
            .handler(refuse_q.clone(), refuse)
            .handler(steps_q.clone(), steps);
        let app = start(app, &unique("app")).await;
        let conn = connect(&unique("test")).await;
        let (plain, plain_dlq) = queue_pair(&conn, "cli-plain").await;

        // publish: properties and headers arrive as given.
        let args = [
            "publish",
            &plain,
            r#"{"a":1}"#,
            "--priority",
            "2",
            "--message-id",
            "id-7",
            "--header",
            "x-tenant=acme",
            "--header",
            "x-sequence=3",
        ];
        let (code, _, stderr) = run_cli(CLI, &args).await;
        assert_eq!(code, 0, "{stderr}");
        let got = drain(&conn, &plain).await;
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].data, br#"{"a":1}"#);
        assert_eq!(
            got[0].properties.message_id().as_ref().unwrap().as_str(),
            "id-7"
        );
        assert_eq!(*got[0].properties.priority(), Some(2));
        assert_eq!(header_str(&got[0], "x-tenant").as_deref(), Some("acme"));
        assert_eq!(header_u64(&got[0], "x-sequence"), Some(3));

        // publish: bad JSON and a missing queue are errors.
        let (code, _, stderr) = run_cli(CLI, &["publish", &plain, "{nope"]).await;
        assert_ne!(code, 0);
        assert!(stderr.contains("not valid JSON"), "{stderr}");
        let (code, _, stderr) = run_cli(CLI, &["publish", &unique("missing"), "{}"]).await;
        assert_ne!(code, 0);
        assert!(stderr.contains("unroutable"), "{stderr}");

        // call: ok → 0 with the body on stdout.
        let (code, stdout, stderr) = run_cli(CLI, &["call", echo_q.name(), r#"{"x":1}"#]).await;
        assert_eq!(code, 0, "{stderr}");
        let body: Value = serde_json::from_str(stdout.trim()).unwrap();
        assert_eq!(body, json!({ "got": { "x": 1 } }));

        // call: progress on stderr, result on stdout.
        let (code, stdout, stderr) = run_cli(CLI, &["call", steps_q.name(), "{}"]).await;
        assert_eq!(code, 0, "{stderr}");
        assert_eq!(stdout.trim(), r#""finished""#);
        let progress: Vec<&str> = stderr
            .lines()
            .filter(|l| l.starts_with("progress:"))
            .collect();
        assert_eq!(
            progress,
            [
                r#"progress: {"step":1}"#,
                r#"progress: {"step":2}"#,
                r#"progress: {"step":3}"#
            ]
        );

        // call: error reply → 1 with the envelope.
        let (code, stdout, _) = run_cli(CLI, &["call", refuse_q.name(), "{}"]).await;
        assert_eq!(code, 1);
        let body: Value = serde_json::from_str(stdout.trim()).unwrap();
        assert_eq!(
            body,
            json!({ "error": { "kind": "invalid_input", "message": "not today" } })
        );

        // call: nobody answers → 2 after the timeout.
        let (code, _, stderr) = run_cli(CLI, &["call", &plain, "{}", "--timeout", "1"]).await;
        assert_eq!(code, 2, "{stderr}");
        assert!(stderr.contains("no reply"), "{stderr}");

        app.stop().await.unwrap();
        let mut queues = vec![plain, plain_dlq];
        for q in [&echo_q, &refuse_q, &steps_q] {
            queues.extend(handler_queues(q, &RetryPolicy::default()));
        }
        delete_queues_quietly(&queues).await;
    })
    .await;
}
