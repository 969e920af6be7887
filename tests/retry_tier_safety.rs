//! Retry tier queues hand their copies back to the work queue with at-least-once
//! dead-lettering: a copy that expires while the work queue is unavailable waits in its tier
//! queue instead of being dropped. Tier queues an older cottontail declared without it are
//! upgraded when empty and kept (with a warning) while they still hold copies.
use cottontail_test_support as common;

use std::time::Duration;

use common::*;
use cottontail::lapin::types::{AMQPValue, FieldTable};
use cottontail::lapin::Connection;
use cottontail::{App, Attempt, Config, HandlerError, Json, Queue, RetryPolicy, State};
use serde::Deserialize;

#[derive(Deserialize)]
struct Job {
    id: String,
}

/// Counts every run per id; the first attempt of each fails transiently.
async fn fail_once(
    State(runs): State<Counter>,
    Attempt(attempt): Attempt,
    Json(job): Json<Job>,
) -> Result<(), HandlerError> {
    runs.add(&job.id);
    if attempt == 1 {
        return Err(HandlerError::transient("flaky", "first attempt fails"));
    }
    Ok(())
}

fn job(id: &str) -> (Vec<u8>, cottontail::lapin::BasicProperties) {
    (
        format!(r#"{{"id":"{id}"}}"#).into_bytes(),
        json_props().with_message_id(id.into()),
    )
}

async fn connect_to(url: &str) -> Connection {
    cottontail::connection::Connector::new(url, unique("dls-test"))
        .unwrap()
        .connect_once()
        .await
        .expect("connect to the private node")
}

/// Runs `code` (an Erlang expression using `Q`, the queue's Raft server id on this node) on
/// `node`: the way to make one quorum queue unavailable without touching the others.
fn on_raft_member(node: &PrivateNode, queue: &str, code: &str) -> String {
    let expr = format!(
        "{{ok, Q0}} = rabbit_amqqueue:lookup(rabbit_misc:r(<<\"/\">>, queue, <<\"{queue}\">>)), \
         {{RaName, _}} = amqqueue:get_pid(Q0), Q = {{RaName, node()}}, {code}."
    );
    node.ctl(&["eval", &expr])
}

/// A retry copy whose delay runs out while the work queue has no leader (here: its only
/// Raft member is stopped, as during a leader election or the loss of its node) stays in the
/// tier queue and is handled once the work queue is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_copy_expiring_while_the_work_queue_is_down_is_not_lost() {
    let node = PrivateNode::start("dls", None);
    // The broker resends an unconfirmed dead-letter after this long (default 180 s).
    node.ctl(&[
        "eval",
        "application:set_env(rabbit, dead_letter_worker_publisher_confirm_timeout, 1000).",
    ]);
    let name = unique("dls");
    // Long enough for `rabbitmqctl eval` to stop the work queue before the copies expire.
    let delay = Duration::from_secs(5);
    let queue = Queue::new(&name)
        .expires(EXPIRES)
        .retry(RetryPolicy::fixed(delay).max_attempts(3).jitter(0.0));
    let tier = cottontail::names::tier_queue(&name, delay);
    let runs = Counter::default();
    let running = start_with(
        App::new(runs.clone()).handler(queue, fail_once),
        Config::new(node.url.clone())
            .connection_name(unique("dls-app"))
            .shutdown_timeout(Duration::from_secs(5)),
    )
    .await;
    let conn = connect_to(&node.url).await;
    let ids: Vec<String> = (0..20).map(|i| format!("dls-{i}")).collect();
    let ch = confirm_channel(&conn).await;
    publish_many(&ch, &name, ids.iter().map(|id| job(id)).collect()).await;

    // Every first attempt failed and its copy waits in the tier queue…
    wait_until(
        Duration::from_secs(20),
        "20 copies in the tier queue",
        || {
            let conn = &conn;
            let tier = &tier;
            async move { queue_depth(conn, tier).await == 20 }
        },
    )
    .await;
    // …when the work queue becomes unavailable, until well after the copies expired.
    on_raft_member(&node, &name, "ra:stop_server(quorum_queues, Q)");
    assert_eq!(
        queue_depth(&conn, &tier).await,
        20,
        "the work queue should stop before the copies expire"
    );
    // The copies expire: the tier queue hands them on (or, at most once, drops them).
    let expiry = (&conn, &tier);
    wait_until(
        delay * 3,
        "the copies to leave the tier queue",
        move || async move { queue_depth(expiry.0, expiry.1).await == 0 },
    )
    .await;
    on_raft_member(&node, &name, "ra:restart_server(quorum_queues, Q)");

    let handled = runs.clone();
    let all_retried = wait_until_ok(Duration::from_secs(30), move || {
        let handled = handled.clone();
        async move { handled.keys() == 20 && handled.total() >= 40 }
    })
    .await;
    let retried = ids.iter().filter(|id| runs.get(id) >= 2).count();
    assert!(
        all_retried,
        "only {retried} of 20 retry copies came back after the work queue was unavailable \
         when they expired (tier queue now holds {})",
        queue_depth(&conn, &tier).await
    );
    running.stop().await.unwrap();
    let _ = conn.close(200, "bye".into()).await;
}

/// `true` once `cond` holds, `false` when `limit` passes first.
async fn wait_until_ok<F, Fut>(limit: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if cond().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// A tier queue declared the way cottontail did before at-least-once dead-lettering.
async fn declare_old_tier(conn: &Connection, queue: &str, delay: Duration) -> String {
    let tier = cottontail::names::tier_queue(queue, delay);
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    args.insert(
        "x-expires".into(),
        AMQPValue::LongLongInt(EXPIRES.as_millis() as i64),
    );
    args.insert(
        "x-message-ttl".into(),
        AMQPValue::LongLongInt(delay.as_millis() as i64),
    );
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString("".into()),
    );
    args.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString(queue.into()),
    );
    let ch = conn.create_channel().await.unwrap();
    declare_plain(&ch, &tier, args).await;
    let _ = ch.close(200, "".into()).await;
    tier
}

/// The queue's arguments as `rabbitmqctl list_queues` shows them.
fn queue_arguments(name: &str) -> String {
    let text = rabbitmqctl(&[
        "list_queues",
        "name",
        "arguments",
        "-q",
        "--no-table-headers",
    ]);
    text.lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .unwrap_or_else(|| panic!("queue {name} not listed"))
        .to_owned()
}

/// An upgrade: the tier queue exists empty, without at-least-once. The service starts, and
/// the tier queue is declared anew with it.
#[tokio::test]
async fn an_empty_tier_queue_from_an_older_version_is_upgraded() {
    let name = unique("dls-upgrade");
    let delay = Duration::from_millis(1500);
    let conn = connect(&unique("dls-setup")).await;
    let tier = declare_old_tier(&conn, &name, delay).await;
    assert!(!queue_arguments(&tier).contains("at-least-once"));

    let queue = Queue::new(&name)
        .expires(EXPIRES)
        .retry(RetryPolicy::fixed(delay).max_attempts(2).jitter(0.0));
    let runs = Counter::default();
    let running = start(
        App::new(runs.clone()).handler(queue.clone(), fail_once),
        &unique("dls-app"),
    )
    .await;
    let args = queue_arguments(&tier);
    assert!(args.contains("at-least-once"), "{args}");
    assert!(args.contains("reject-publish"), "{args}");
    // And retries go through it.
    let ch = confirm_channel(&conn).await;
    publish_many(&ch, &name, vec![job("up-1")]).await;
    let handled = runs.clone();
    wait_until(Duration::from_secs(20), "the retry", move || {
        let handled = handled.clone();
        async move { handled.get("up-1") == 2 }
    })
    .await;
    running.stop().await.unwrap();
    let _ = conn.close(200, "bye".into()).await;
    delete_queues(&handler_queues(&queue, &RetryPolicy::default())).await;
}

/// An upgrade while copies wait in the old tier queue: the service starts anyway, the copies
/// are handled when they expire, and the next start upgrades the (now empty) tier queue.
#[tokio::test]
async fn a_tier_queue_from_an_older_version_holding_copies_is_kept_until_it_drains() {
    let name = unique("dls-keep");
    let delay = Duration::from_secs(3);
    let conn = connect(&unique("dls-setup")).await;
    let tier = declare_old_tier(&conn, &name, delay).await;
    // A copy an older version scheduled; it returns to the work queue when its TTL runs out.
    let ch = confirm_channel(&conn).await;
    let (body, props) = job("old-copy");
    let props = with_header(props, "x-attempts", AMQPValue::LongLongInt(1));
    publish(&ch, &tier, &body, props).await;

    let queue = Queue::new(&name)
        .expires(EXPIRES)
        .retry(RetryPolicy::fixed(delay).max_attempts(2).jitter(0.0));
    let runs = Counter::default();
    let app = || App::new(runs.clone()).handler(queue.clone(), fail_once);
    let running = start(app(), &unique("dls-app")).await;
    assert!(!queue_arguments(&tier).contains("at-least-once"));
    let handled = runs.clone();
    wait_until(Duration::from_secs(20), "the old copy handled", move || {
        let handled = handled.clone();
        async move { handled.get("old-copy") == 1 }
    })
    .await;
    running.stop().await.unwrap();
    assert_eq!(queue_depth(&conn, &tier).await, 0);

    // The next start finds it empty and upgrades it.
    let running = start(app(), &unique("dls-app")).await;
    let args = queue_arguments(&tier);
    assert!(args.contains("at-least-once"), "{args}");
    running.stop().await.unwrap();
    let _ = conn.close(200, "bye".into()).await;
    delete_queues(&handler_queues(&queue, &RetryPolicy::default())).await;
}
