//! The dedup scenarios shared by the memory, Redis and PostgreSQL suites: the store changes,
//! the guarantees checked do not.

use std::time::Duration;

use cottontail::{App, Dedup, HandlerError, Json, MessageId, Queue, State};
use serde::{Deserialize, Serialize};

use super::*;

#[derive(Deserialize, Serialize)]
pub struct Pay {
    pub amount: u32,
}

/// Every run of the handler, by message id (the "side effect").
#[derive(Clone)]
pub struct Effects {
    pub runs: Counter,
    pub delay: Duration,
}

impl Effects {
    pub fn new(delay: Duration) -> Self {
        Self {
            runs: Counter::default(),
            delay,
        }
    }
}

pub async fn pay(
    State(fx): State<Effects>,
    MessageId(id): MessageId,
    Json(p): Json<Pay>,
) -> Result<Json<serde_json::Value>, HandlerError> {
    tokio::time::sleep(fx.delay).await;
    fx.runs.add(id.as_deref().unwrap_or("none"));
    Ok(Json(
        serde_json::json!({"charged": p.amount, "run": fx.runs.total()}),
    ))
}

/// One handler's messages settled with `outcome`, from its app's metrics.
pub fn outcome(metrics: &cottontail::ops::Metrics, handler: &str, outcome: &str) -> f64 {
    let labels = [("handler", handler), ("outcome", outcome)];
    metric_value(&metrics.render(), "cottontail_messages_total", &labels).unwrap_or(0.0)
}

/// The same message (`message_id` "pay-1", each with its own reply_to/correlation id) is
/// published 3 times to a handler deduplicated by `dedup`: the effect happens once, 2 are
/// counted duplicates, and all 3 callers get the same reply. Returns the queue name (the
/// dedup scope) and the reply body, for store-specific checks; the app is stopped and its
/// queues deleted.
pub async fn same_message_three_times(prefix: &str, dedup: Dedup) -> (String, Vec<u8>) {
    let name = unique(prefix);
    let queue = Queue::new(&name)
        .expires(EXPIRES)
        .concurrency(1)
        .dedup(dedup);
    let fx = Effects::new(Duration::ZERO);
    let app = App::new(fx.clone()).handler(queue.clone(), pay);
    let metrics = app.metrics().clone();
    let running = start(app, &unique("app")).await;

    let conn = connect(&unique("client")).await;
    let (reply_to, replies) = reply_queue(&conn).await;
    let ch = confirm_channel(&conn).await;
    for i in 0..3 {
        let props = json_props()
            .with_message_id("pay-1".into())
            .with_reply_to(reply_to.as_str().into())
            .with_correlation_id(format!("call-{i}").into());
        publish(&ch, &name, br#"{"amount":42}"#, props).await;
    }
    let got = replies.wait_for(3, Duration::from_secs(20)).await;
    assert_eq!(fx.runs.get("pay-1"), 1, "the effect happened once");
    let bodies: Vec<_> = got.iter().map(|r| r.data.clone()).collect();
    assert!(
        bodies.iter().all(|b| b == &bodies[0]),
        "same reply each time: {bodies:?}"
    );
    let mut cids: Vec<_> = got
        .iter()
        .map(|r| r.properties.correlation_id().as_ref().unwrap().to_string())
        .collect();
    cids.sort();
    assert_eq!(cids, vec!["call-0", "call-1", "call-2"]);
    assert_eq!(outcome(&metrics, &name, "duplicate"), 2.0);
    assert_eq!(outcome(&metrics, &name, "ok"), 1.0);
    running.stop().await.unwrap();
    let _ = conn.close(200, "bye".into()).await;
    delete_queues(&handler_queues(&queue, &cottontail::RetryPolicy::default())).await;
    (name, bodies[0].clone())
}

/// A batch of job statuses (`put_many`) replaces each job's status but keeps the `created_at`
/// of the one stored, and touches nothing else that looks like it (a `created_at` inside the
/// result, the text in an id). Ids start with `prefix`; returns them for cleanup.
pub async fn job_batches_keep_the_first_creation_time(
    store: std::sync::Arc<dyn cottontail::stores::JobStore>,
    prefix: &str,
) -> Vec<String> {
    use cottontail::stores::JobStatus;
    let ids = [format!("{prefix}-1"), format!("{prefix}-\"created_at\":7,")];
    let job = |id: &str, status: &str, at: f64| JobStatus {
        status: status.into(),
        message_id: id.into(),
        handler: "h".into(),
        attempts: 1,
        created_at: at,
        updated_at: at,
        ..JobStatus::default()
    };
    store.put(job(&ids[0], "running", 1.25)).await.unwrap();
    let mut done = job(&ids[0], "succeeded", 5.5);
    done.result = Some(serde_json::json!({"created_at": 42, "nested": {"created_at": 43}}));
    store
        .clone()
        .put_many(vec![done.clone(), job(&ids[1], "running", 6.5)])
        .await
        .unwrap();
    let stored = store.get(&ids[0]).await.unwrap().unwrap();
    assert_eq!(
        stored,
        JobStatus {
            created_at: 1.25,
            ..done
        }
    );
    assert_eq!(
        store.get(&ids[1]).await.unwrap(),
        Some(job(&ids[1], "running", 6.5))
    );
    ids.to_vec()
}

/// A claim left by an instance that died (never completed nor released) keeps the id busy
/// until its lease lapses: the message waits (deferred, not run) while the lease holds, then
/// runs once. Timed from the claim itself, so a slow start of the app cannot make it look
/// early.
/// Returns the queue name (the dedup scope), for store cleanup.
pub async fn an_orphaned_claim_lapses(
    prefix: &str,
    dead: &dyn cottontail::stores::DedupStore,
    live: Dedup,
) -> String {
    const LEASE: Duration = Duration::from_secs(5);
    let name = unique(prefix);
    let claimed_at = std::time::Instant::now();
    let claimed = dead.claim(&name, "orphan", "dead-instance", LEASE).await;
    assert_eq!(claimed, Ok(cottontail::stores::Claim::Acquired));
    let queue = Queue::new(&name)
        .expires(EXPIRES)
        .dedup(live.busy_delay(Duration::from_millis(200)));
    let fx = Effects::new(Duration::ZERO);
    let app = App::new(fx.clone()).handler(queue.clone(), pay);
    let metrics = app.metrics().clone();
    let app = start(app, &unique("app")).await;
    let conn = connect(&unique("client")).await;
    let ch = confirm_channel(&conn).await;
    let props = json_props().with_message_id("orphan".into());
    publish(&ch, &name, br#"{"amount":5}"#, props).await;
    let (m, q) = (metrics.clone(), name.clone());
    wait_until(LEASE, "deferred while the lease holds", move || {
        let labels = [("handler", q.as_str()), ("reason", "busy")];
        let waits = metric_value(&m.render(), "cottontail_deferred_total", &labels);
        async move { waits.unwrap_or(0.0) >= 1.0 }
    })
    .await;
    assert!(
        claimed_at.elapsed() < LEASE,
        "too slow to tell: {:?}",
        claimed_at.elapsed()
    );
    assert_eq!(
        fx.runs.get("orphan"),
        0,
        "ran while the dead instance's lease held"
    );
    let runs = fx.runs.clone();
    wait_until(Duration::from_secs(30), "orphan processed", move || {
        let runs = runs.clone();
        async move { runs.get("orphan") == 1 }
    })
    .await;
    assert!(claimed_at.elapsed() >= LEASE, "ran before the lease lapsed");
    app.stop().await.unwrap();
    assert_eq!(fx.runs.get("orphan"), 1);
    delete_queues(&handler_queues(&queue, &cottontail::RetryPolicy::default())).await;
    name
}

/// Fan-in on a store: 20 fields recorded concurrently, each twice with different values —
/// counts never pass 20, some record sees the join complete (the record that completed it
/// does), a duplicate after the end sees 20 too, the first value of each field stays, and the
/// fields read back.
pub async fn join_completes_once(store: std::sync::Arc<dyn cottontail::stores::DedupStore>) {
    let scope = unique("join");
    let retention = Duration::from_secs(60);
    let mut tasks = Vec::new();
    for round in 0..2u8 {
        for i in 0..20u32 {
            let (store, scope) = (store.clone(), scope.clone());
            tasks.push(tokio::spawn(async move {
                let value = format!("{i}/{round}").into_bytes();
                let count = store
                    .join_record(&scope, "album-1", &i.to_string(), value, retention)
                    .await
                    .unwrap();
                (round, count)
            }));
        }
    }
    let mut counts = Vec::new();
    for task in tasks {
        counts.push(task.await.unwrap());
    }
    assert!(
        counts.iter().all(|(_, c)| (1..=20).contains(c)),
        "{counts:?}"
    );
    assert!(counts.iter().any(|(_, c)| *c == 20), "{counts:?}");
    let again = store
        .join_record(&scope, "album-1", "3", b"late".to_vec(), retention)
        .await
        .unwrap();
    assert_eq!(
        again, 20,
        "a duplicate after the end sees the join complete"
    );
    let fields = store.join_fields(&scope, "album-1").await.unwrap();
    assert_eq!(fields.len(), 20);
    for (field, value) in &fields {
        let value = String::from_utf8(value.clone()).unwrap();
        assert!(
            value.starts_with(&format!("{field}/")),
            "{field} holds {value}"
        );
    }
    assert!(store
        .join_fields(&scope, "album-2")
        .await
        .unwrap()
        .is_empty());
    // Sequential records: the count grows by one per new field, not per record.
    let counts: Vec<u64> = futures::future::join_all((0..3).map(|i| {
        let (store, scope) = (store.clone(), scope.clone());
        async move {
            store
                .join_record(&scope, "album-3", &(i % 2).to_string(), vec![i], retention)
                .await
                .unwrap()
        }
    }))
    .await;
    assert_eq!(counts.iter().max(), Some(&2), "{counts:?}");
}

/// Supervision watches on a store: due ones come back earliest first (up to the limit), one
/// not yet due does not, a watch kept again replaces its value and due time, an unwatched one
/// is gone, and scopes are apart.
pub async fn watches_come_due_in_order(store: std::sync::Arc<dyn cottontail::stores::DedupStore>) {
    let scope = unique("watch");
    for (id, due) in [
        ("w-3", 300u64),
        ("w-1", 100),
        ("w-2", 200),
        ("later", 10_000),
    ] {
        store
            .watch(&scope, id, due, id.as_bytes().to_vec())
            .await
            .unwrap();
    }
    let due = store.due(&scope, 1_000, 10).await.unwrap();
    let ids: Vec<&str> = due.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(ids, ["w-1", "w-2", "w-3"]);
    assert_eq!(due[0].1, b"w-1");
    assert_eq!(store.due(&scope, 1_000, 2).await.unwrap().len(), 2);
    store
        .watch(&scope, "w-1", 5_000, b"again".to_vec())
        .await
        .unwrap();
    store.unwatch(&scope, "w-2").await.unwrap();
    store.unwatch(&scope, "never-watched").await.unwrap();
    let ids: Vec<String> = store
        .due(&scope, 1_000, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(ids, ["w-3"]);
    let all = store.due(&scope, 20_000, 10).await.unwrap();
    assert_eq!(
        all,
        [
            ("w-3".to_string(), b"w-3".to_vec()),
            ("w-1".to_string(), b"again".to_vec()),
            ("later".to_string(), b"later".to_vec()),
        ]
    );
    assert!(store
        .due(&unique("watch"), 20_000, 10)
        .await
        .unwrap()
        .is_empty());
}
