//! Shared helpers for cottontail's integration tests against the real broker (a crate of its
//! own, `cottontail-test-support`, so it is compiled once rather than into every test binary).
//!
//! Every test uses unique queue names (and `x-expires` or explicit deletes), waits on
//! conditions with deadlines, and disrupts only its own connections.

pub mod dedup;
pub mod features;
pub mod logs;
pub mod long_jobs;
pub mod ordering;
pub mod priority;
pub mod private_redis;
pub mod raw_amqp;

mod chaos;
mod nodes;
mod process;

pub use chaos::*;
pub use nodes::*;
pub use private_redis::*;
pub use process::*;

use std::collections::HashMap;
use std::future::Future;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cottontail::lapin::message::Delivery;
use cottontail::lapin::options::*;
use cottontail::lapin::types::{AMQPValue, FieldTable};
use cottontail::lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use cottontail::{App, Config, Running};
use futures::StreamExt;

pub fn amqp_url() -> String {
    std::env::var("AMQP_URL")
        .unwrap_or_else(|_| cottontail::connection::DEFAULT_AMQP_URL.to_owned())
}

/// A name no other test (or test run) uses.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "test.{prefix}.{}.{}.{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed),
        fastrand::u32(..)
    )
}

/// How long broker-side queues of a test live after it ends, whatever happens to it.
pub const EXPIRES: Duration = Duration::from_secs(120);

/// A config with a unique connection name (so a test can close only its own connection).
pub fn config(name: &str) -> Config {
    Config::new(amqp_url())
        .connection_name(name)
        .shutdown_timeout(Duration::from_secs(10))
}

/// Starts `app` and waits until it consumes.
pub async fn start<S: Clone + Send + Sync + 'static>(app: App<S>, name: &str) -> Running {
    start_with(app, config(name)).await
}

pub async fn start_with<S: Clone + Send + Sync + 'static>(app: App<S>, config: Config) -> Running {
    let running = app.start(config).await.expect("app starts");
    assert!(
        running.wait_ready(Duration::from_secs(20)).await,
        "app did not become ready"
    );
    running
}

/// A raw lapin connection (the "plain AMQP client" side of the contract).
pub async fn connect(name: &str) -> Connection {
    Connection::connect(
        &amqp_url(),
        ConnectionProperties::default().with_connection_name(name.into()),
    )
    .await
    .expect("connect to RabbitMQ at AMQP_URL")
}

/// A confirm-mode channel.
pub async fn confirm_channel(conn: &Connection) -> Channel {
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    ch
}

pub fn json_props() -> BasicProperties {
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
}

pub fn with_header(props: BasicProperties, key: &str, value: AMQPValue) -> BasicProperties {
    let mut table = props.headers().clone().unwrap_or_default();
    table.insert(key.into(), value);
    props.with_headers(table)
}

/// Publishes to a queue through the default exchange and waits for the confirm.
pub async fn publish(ch: &Channel, queue: &str, body: &[u8], props: BasicProperties) {
    let confirm = ch
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            body,
            props,
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(confirm.is_ack(), "publish not confirmed");
}

/// Publishes many, pipelined, then waits for all confirms.
pub async fn publish_many(ch: &Channel, queue: &str, items: Vec<(Vec<u8>, BasicProperties)>) {
    let mut confirms = Vec::with_capacity(items.len());
    for (body, props) in items {
        confirms.push(
            ch.basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                &body,
                props,
            )
            .await
            .unwrap(),
        );
    }
    for c in confirms {
        assert!(c.await.unwrap().is_ack());
    }
}

/// Declares a durable queue the way cottontail would not (for mismatch tests) or an
/// exclusive reply queue.
pub async fn declare_plain(ch: &Channel, name: &str, args: FieldTable) {
    ch.queue_declare(
        name.into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await
    .unwrap();
}

/// Deletes queues (and ignores those already gone). Time-bounded: a connection the broker
/// drops mid-delete can leave lapin's promise pending forever (seen once: a whole test binary
/// hung after its assertions had passed).
pub async fn delete_queues(names: &[String]) {
    delete_queues_quietly(names).await
}

/// Every queue cottontail declares for a handler on `queue` with `policy` tiers.
pub fn handler_queues(queue: &cottontail::Queue, _policy: &cottontail::RetryPolicy) -> Vec<String> {
    let mut names = vec![queue.name().to_owned(), queue.dlq_name()];
    for tier in queue.delay_tiers() {
        names.push(cottontail::names::tier_queue(queue.name(), tier));
    }
    names
}

/// A received message (lapin's `Delivery` minus its acker, so it can be cloned).
#[derive(Clone, Debug)]
pub struct Received {
    pub data: Vec<u8>,
    pub properties: BasicProperties,
    pub redelivered: bool,
}

impl From<Delivery> for Received {
    fn from(d: Delivery) -> Self {
        Self {
            data: d.data,
            properties: d.properties,
            redelivered: d.redelivered,
        }
    }
}

/// Collects every message of a queue (auto-ack) into a shared list.
#[derive(Clone, Default)]
pub struct Inbox(Arc<Mutex<Vec<Received>>>);

impl Inbox {
    pub fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn all(&self) -> Vec<Received> {
        self.0.lock().unwrap().clone()
    }
    pub async fn wait_for(&self, n: usize, limit: Duration) -> Vec<Received> {
        let me = self.clone();
        wait_until(limit, &format!("{n} messages"), move || {
            let me = me.clone();
            async move { me.len() >= n }
        })
        .await;
        self.all()
    }
}

/// Consumes `queue` (which must exist) into an [`Inbox`].
pub async fn collect(conn: &Connection, queue: &str) -> Inbox {
    let ch = conn.create_channel().await.unwrap();
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let inbox = Inbox::default();
    let sink = inbox.clone();
    tokio::spawn(async move {
        let _keep = ch;
        while let Some(Ok(d)) = consumer.next().await {
            sink.0.lock().unwrap().push(d.into());
        }
    });
    inbox
}

/// An exclusive, server-named reply queue and its inbox.
pub async fn reply_queue(conn: &Connection) -> (String, Inbox) {
    let ch = conn.create_channel().await.unwrap();
    let q = ch
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let name = q.name().to_string();
    (name.clone(), collect(conn, &name).await)
}

/// Polls `cond` until it holds or `limit` passes (then panics with `what`).
pub async fn wait_until<F, Fut>(limit: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    loop {
        if cond().await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `store` says `want` for job `id`; on timeout, panics naming what it said.
pub async fn wait_job_status(
    store: &dyn cottontail::stores::JobStore,
    id: &str,
    want: &str,
    limit: Duration,
) {
    let deadline = Instant::now() + limit;
    loop {
        let status = store.get(id).await.ok().flatten();
        if status.as_ref().is_some_and(|j| j.status == want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "job {id} is not {want} after {limit:?}: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Messages ready in a queue (passive declare).
pub async fn queue_depth(conn: &Connection, queue: &str) -> u32 {
    queue_counts(conn, queue).await.0
}

/// Messages ready in a queue and its consumers (passive declare).
pub async fn queue_counts(conn: &Connection, queue: &str) -> (u32, u32) {
    queue_counts_if_declared(conn, queue)
        .await
        .unwrap_or_else(|| panic!("queue {queue} does not exist"))
}

/// [`queue_counts`], or `None` while nobody has declared the queue yet.
pub async fn queue_counts_if_declared(conn: &Connection, queue: &str) -> Option<(u32, u32)> {
    let ch = conn.create_channel().await.unwrap();
    let q = ch
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .ok();
    let _ = ch.close(200, "".into()).await;
    q.map(|q| (q.message_count(), q.consumer_count()))
}

pub fn header_str(d: &Received, key: &str) -> Option<String> {
    cottontail::headers::get_string(d.properties.headers().as_ref(), key)
}

pub fn header_u64(d: &Received, key: &str) -> Option<u64> {
    cottontail::headers::get_u64(d.properties.headers().as_ref(), key)
}

/// Counts per key, shared between handler and test.
#[derive(Clone, Default)]
pub struct Counter(pub Arc<Mutex<HashMap<String, u32>>>);

impl Counter {
    pub fn add(&self, key: &str) {
        *self.0.lock().unwrap().entry(key.to_owned()).or_default() += 1;
    }
    pub fn get(&self, key: &str) -> u32 {
        self.0.lock().unwrap().get(key).copied().unwrap_or(0)
    }
    pub fn keys(&self) -> usize {
        self.0.lock().unwrap().len()
    }
    pub fn total(&self) -> u32 {
        self.0.lock().unwrap().values().sum()
    }
    pub fn snapshot(&self) -> HashMap<String, u32> {
        self.0.lock().unwrap().clone()
    }
}

/// A minimal HTTP/1.1 GET (no client crate needed): status code and body.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    http_get_with(addr, path, &[]).await
}

/// The same, with request headers (e.g. `("Authorization", "Bearer …")`).
pub async fn http_get_with(
    addr: std::net::SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String) {
    http_request(addr, "GET", path, headers).await
}

/// A minimal HTTP/1.1 POST without a body, with request headers: status code and body.
pub async fn http_post_with(
    addr: std::net::SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String) {
    http_request(addr, "POST", path, headers).await
}

/// A minimal HTTP/1.1 request without a body: status code and body.
pub async fn http_request(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect http");
    let extra: String = headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    let length = if method == "GET" {
        ""
    } else {
        "Content-Length: 0\r\n"
    };
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{extra}{length}Connection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8_lossy(&raw).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// Arguments of a durable quorum queue that the broker deletes `EXPIRES` after its last use.
pub fn expiring_quorum_args() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    args.insert(
        "x-expires".into(),
        AMQPValue::LongLongInt(EXPIRES.as_millis() as i64),
    );
    args
}

/// Takes every message out of `queue` (basic.get + ack) and returns them.
pub async fn drain(conn: &Connection, queue: &str) -> Vec<Received> {
    let ch = conn.create_channel().await.unwrap();
    let mut out = Vec::new();
    while let Some(msg) = ch
        .basic_get(queue.into(), BasicGetOptions { no_ack: false })
        .await
        .unwrap()
    {
        msg.delivery
            .acker
            .ack(BasicAckOptions::default())
            .await
            .unwrap();
        out.push(Received::from(msg.delivery));
    }
    let _ = ch.close(200, "".into()).await;
    out
}

/// The value of one sample in Prometheus text, e.g.
/// `metric_value(&text, "cottontail_messages_total", &[("handler", "h"), ("outcome", "ok")])`.
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .find(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Runs a whole test body with an overall deadline, so a stuck broker call fails the test
/// instead of hanging the run.
pub async fn bounded<F: Future>(limit: Duration, body: F) -> F::Output {
    match tokio::time::timeout(limit, body).await {
        Ok(output) => output,
        Err(_) => panic!("test did not finish within {limit:?}"),
    }
}

/// Deletes queues best-effort: errors are ignored and each step is time-bounded (RabbitMQ
/// 3.10 occasionally drops the connection while deleting quorum queues; `x-expires` removes
/// whatever is left).
pub async fn delete_queues_quietly(names: &[String]) {
    let attempt = async {
        let conn = Connection::connect(
            &amqp_url(),
            ConnectionProperties::default().with_connection_name("test-cleanup".into()),
        )
        .await
        .ok()?;
        for name in names {
            let Ok(ch) = conn.create_channel().await else {
                break;
            };
            let _ = ch
                .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
                .await;
            let _ = ch.close(200, "".into()).await;
        }
        let _ = conn.close(200, "bye".into()).await;
        Some(())
    };
    let _ = tokio::time::timeout(Duration::from_secs(20), attempt).await;
}

/// Every queue the workflow `name` declares (for the cleanup; `x-expires` catches the rest).
pub fn workflow_queues(
    name: &str,
    steps: &[&str],
    compensated: &[&str],
    dedup: &cottontail::Dedup,
) -> Vec<String> {
    let mut queues = vec![name.to_owned()];
    queues.extend(
        steps
            .iter()
            .map(|s| cottontail::names::workflow_step(name, s)),
    );
    queues.extend(
        compensated
            .iter()
            .map(|s| cottontail::names::workflow_compensation(name, s)),
    );
    queues
        .iter()
        .flat_map(|q| {
            let queue = cottontail::Queue::new(q).dedup(dedup.clone());
            handler_queues(&queue, &cottontail::RetryPolicy::default())
        })
        .collect()
}
