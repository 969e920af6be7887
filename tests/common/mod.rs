//! Shared helpers for integration tests against the real broker.
//!
//! Every test uses unique queue names (and `x-expires` or explicit deletes), waits on
//! conditions with deadlines, and disrupts only its own connections.
#![allow(dead_code)]

pub mod dedup;
pub mod priority;

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
    std::env::var("AMQP_URL").unwrap_or_else(|_| cottontail::DEFAULT_AMQP_URL.to_owned())
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

/// Deletes queues (and ignores those already gone).
pub async fn delete_queues(names: &[String]) {
    let conn = connect("test-cleanup").await;
    for name in names {
        let ch = conn.create_channel().await.unwrap();
        let _ = ch
            .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    let _ = conn.close(200, "bye".into()).await;
}

/// Every queue cottontail declares for a handler on `queue` with `policy` tiers.
pub fn handler_queues(queue: &cottontail::Queue, _policy: &cottontail::RetryPolicy) -> Vec<String> {
    let mut names = vec![queue.name().to_owned(), queue.dlq_name()];
    for tier in queue.delay_tiers() {
        names.push(cottontail::tier_queue(queue.name(), tier));
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

/// Messages ready in a queue (passive declare).
pub async fn queue_depth(conn: &Connection, queue: &str) -> u32 {
    queue_counts(conn, queue).await.0
}

/// Messages ready in a queue and its consumers (passive declare).
pub async fn queue_counts(conn: &Connection, queue: &str) -> (u32, u32) {
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
        .unwrap();
    let _ = ch.close(200, "".into()).await;
    (q.message_count(), q.consumer_count())
}

pub fn header_str(d: &Received, key: &str) -> Option<String> {
    cottontail::headers::get_string(d.properties.headers().as_ref(), key)
}

pub fn header_u64(d: &Received, key: &str) -> Option<u64> {
    cottontail::headers::get_u64(d.properties.headers().as_ref(), key)
}

/// Closes this test's own broker connection(s) by connection name.
pub fn close_connection(name: &str) -> usize {
    let out = Command::new("rabbitmqctl")
        .args([
            "list_connections",
            "pid",
            "client_properties",
            "-q",
            "--no-table-headers",
        ])
        .output()
        .expect("rabbitmqctl");
    let text = String::from_utf8_lossy(&out.stdout);
    let needle = format!("{{\"connection_name\",\"{name}\"}}");
    let mut closed = 0;
    for line in text.lines().filter(|l| l.contains(&needle)) {
        let pid = line.split_whitespace().next().unwrap_or_default();
        let status = Command::new("rabbitmqctl")
            .args(["close_connection", pid, "test: simulated connection loss"])
            .stdout(Stdio::null())
            .status()
            .expect("rabbitmqctl");
        if status.success() {
            closed += 1;
        }
    }
    closed
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

/// Runs this same test binary as a child process executing only the test `test_name`, with
/// `env` set: the child-side test function checks the variable and acts as a worker.
pub fn spawn_child(test_name: &str, env: &[(&str, String)]) -> Child {
    let exe = std::env::current_exe().unwrap();
    let mut cmd = Command::new(exe);
    cmd.args([test_name, "--exact", "--nocapture", "--test-threads=1"]);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.stdin(Stdio::null())
        .spawn()
        .expect("spawn child worker")
}

/// Sends SIGTERM (graceful shutdown) to a child.
pub fn sigterm(child: &Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
}

/// Waits for a child to exit, with a deadline.
pub async fn wait_exit(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("child did not exit within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A minimal HTTP/1.1 GET (no client crate needed): status code and body.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect http");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
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

/// Runs `rabbitmqctl ARGS…` and asserts success.
pub fn rabbitmqctl(args: &[&str]) {
    let out = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("rabbitmqctl");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A private virtual host for tests that change permissions: nothing they do reaches other
/// tests, and deleting it removes all its queues.
pub struct PrivateVhost {
    pub name: String,
}

impl PrivateVhost {
    pub fn new(prefix: &str) -> Self {
        let name = unique(prefix);
        rabbitmqctl(&["add_vhost", &name]);
        let me = Self { name };
        me.allow();
        me
    }
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:5672/{}", self.name)
    }
    pub fn allow(&self) {
        rabbitmqctl(&[
            "set_permissions",
            "-p",
            &self.name,
            "guest",
            ".*",
            ".*",
            ".*",
        ]);
    }
    pub fn deny(&self) {
        rabbitmqctl(&["clear_permissions", "-p", &self.name, "guest"]);
    }
}

impl Drop for PrivateVhost {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args(["delete_vhost", &self.name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
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

/// Runs a built binary with `args` and `AMQP_URL`, returning (exit code, stdout, stderr).
pub async fn run_cli(exe: &str, args: &[&str]) -> (i32, String, String) {
    let mut cmd = tokio::process::Command::new(exe);
    cmd.args(args)
        .env("AMQP_URL", amqp_url())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .expect("CLI finished within 120 s")
        .expect("CLI runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
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

// ---------------------------------------------------------------------------------------
// Private broker nodes (scripts/rabbit-node.sh, scripts/cluster.sh) for disruptive tests:
// their own node names, ports and data, stopped by a Drop guard even when the test fails.
// ---------------------------------------------------------------------------------------

/// The workspace root (where `scripts/` lives).
pub fn repo_root() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn port_free(port: u32) -> bool {
    u16::try_from(port)
        .ok()
        .is_some_and(|p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok())
}

/// A base port `p` such that `p..p+span` (AMQP, TLS) and `p+20000..p+20000+span` (Erlang
/// distribution) are free; random in 20000..29000 so parallel runs rarely meet.
pub fn free_node_port(span: u16) -> u16 {
    for _ in 0..200 {
        let base = fastrand::u16(20_000..29_000);
        let ok = (0..u32::from(span))
            .all(|i| port_free(u32::from(base) + i) && port_free(u32::from(base) + 20_000 + i));
        if ok {
            return base;
        }
    }
    panic!("no free port range for a private broker node");
}

/// A node name no other test run uses: `ct-<prefix>-<pid>-<n>`.
pub fn node_name(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "ct-{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn run_script(script: &str, args: &[&str]) -> std::process::Output {
    Command::new(repo_root().join("scripts").join(script))
        .args(args)
        .env("RABBIT_NODE_OWNER_PID", std::process::id().to_string())
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run scripts/{script}: {e}"))
}

/// `rabbitmqctl -n NODE ARGS…` (bounded to 60 s); returns (success, stdout+stderr).
pub fn rabbitmqctl_on(node: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new("timeout")
        .arg("60")
        .arg("rabbitmqctl")
        .args(["-n", node])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("rabbitmqctl");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Closes connections named `name` on `node` (`None` = the shared node); returns how many.
pub fn close_connection_on(node: Option<&str>, name: &str) -> usize {
    let Some(node) = node else {
        return close_connection(name);
    };
    let (_, text) = rabbitmqctl_on(
        node,
        &[
            "list_connections",
            "pid",
            "client_properties",
            "-q",
            "--no-table-headers",
        ],
    );
    let needle = format!("{{\"connection_name\",\"{name}\"}}");
    text.lines()
        .filter(|l| l.contains(&needle))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|pid| {
            rabbitmqctl_on(
                node,
                &["close_connection", pid, "test: simulated connection loss"],
            )
            .0
        })
        .count()
}

/// A private single RabbitMQ node (see `scripts/rabbit-node.sh`), stopped and deleted on drop.
pub struct PrivateNode {
    /// Short name (`ct-…`), as given to the script.
    pub name: String,
    /// Erlang node name for `rabbitmqctl -n`.
    pub node: String,
    pub port: u16,
    /// `amqp://guest:guest@127.0.0.1:<port>/%2f`
    pub url: String,
}

impl PrivateNode {
    /// Starts a node (retrying on another port if the chosen one was taken meanwhile); with
    /// `tls`, an amqps listener on `port + 1` with `tls/{ca.pem,server.pem,server.key}`.
    pub fn start(prefix: &str, tls: Option<&std::path::Path>) -> Self {
        let name = node_name(prefix);
        let mut last = String::new();
        for _ in 0..3 {
            let port = free_node_port(2);
            let port_arg = port.to_string();
            let mut args = vec!["start", name.as_str(), port_arg.as_str()];
            let tls_dir;
            if let Some(dir) = tls {
                tls_dir = dir.to_string_lossy().into_owned();
                args.extend(["--tls", tls_dir.as_str()]);
            }
            let out = run_script("rabbit-node.sh", &args);
            if out.status.success() {
                let url = String::from_utf8_lossy(&out.stdout).trim().to_owned();
                return Self {
                    node: format!("{name}@localhost"),
                    name,
                    port,
                    url,
                };
            }
            last = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            let _ = run_script("rabbit-node.sh", &["stop", &name]);
        }
        panic!("private node {name} did not start: {last}");
    }

    pub fn tls_port(&self) -> u16 {
        self.port + 1
    }

    /// `rabbitmqctl -n <node> ARGS…`, asserting success.
    pub fn ctl(&self, args: &[&str]) -> String {
        let (ok, text) = rabbitmqctl_on(&self.node, args);
        assert!(ok, "rabbitmqctl -n {} {args:?}: {text}", self.node);
        text
    }
}

impl Drop for PrivateNode {
    fn drop(&mut self) {
        let _ = run_script("rabbit-node.sh", &["stop", &self.name]);
    }
}

/// A private 3-node cluster (see `scripts/cluster.sh`), stopped and deleted on drop.
pub struct PrivateCluster {
    pub prefix: String,
    /// Erlang node names, node 1..3.
    pub nodes: Vec<String>,
    /// AMQP URL of each node.
    pub urls: Vec<String>,
}

impl PrivateCluster {
    pub fn start(prefix: &str) -> Self {
        let prefix = node_name(prefix);
        let mut last = String::new();
        for _ in 0..2 {
            let base = free_node_port(3);
            let out = run_script("cluster.sh", &["start", &prefix, &base.to_string()]);
            if out.status.success() {
                let urls: Vec<String> = String::from_utf8_lossy(&out.stdout)
                    .trim()
                    .split(',')
                    .map(str::to_owned)
                    .collect();
                assert_eq!(urls.len(), 3, "cluster.sh printed {urls:?}");
                return Self {
                    nodes: (1..=3).map(|i| format!("{prefix}{i}@localhost")).collect(),
                    prefix,
                    urls,
                };
            }
            last = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            let _ = run_script("cluster.sh", &["stop", &prefix]);
        }
        panic!("cluster {prefix} did not start: {last}");
    }

    /// `rabbitmqctl -n <node i (0-based)> ARGS…`, asserting success.
    pub fn ctl(&self, i: usize, args: &[&str]) -> String {
        let (ok, text) = rabbitmqctl_on(&self.nodes[i], args);
        assert!(ok, "rabbitmqctl -n {} {args:?}: {text}", self.nodes[i]);
        text
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        let _ = run_script("cluster.sh", &["stop", &self.prefix]);
    }
}

/// A fresh directory under the temp dir, removed on drop.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> Self {
        let dir = std::env::temp_dir().join(unique(prefix));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        Self(dir)
    }
    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------------------------------
// Chaos harness (tests/chaos_*.rs): a worker process that records every handled id in a
// ledger file, a publisher that counts a message as published only once confirmed (and
// retries the rest), and a checker: lost = published − (handled ∪ dead-lettered).
// ---------------------------------------------------------------------------------------

pub const CHAOS_QUEUE: &str = "COTTONTAIL_CHAOS_QUEUE";
pub const CHAOS_LEDGER: &str = "COTTONTAIL_CHAOS_LEDGER";
pub const CHAOS_URL: &str = "COTTONTAIL_CHAOS_URL";
pub const CHAOS_NAME: &str = "COTTONTAIL_CHAOS_NAME";
pub const CHAOS_MODE: &str = "COTTONTAIL_CHAOS_MODE";

/// `COTTONTAIL_CHAOS_SOAK=1` makes the chaos scenarios longer (more messages, more faults).
pub fn chaos_soak() -> bool {
    std::env::var("COTTONTAIL_CHAOS_SOAK").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// The handled-ids file: one line per completed handling (duplicates are repeated lines).
#[derive(Clone, Debug)]
pub struct Ledger(pub std::path::PathBuf);

impl Ledger {
    pub fn new(dir: &std::path::Path) -> Self {
        Self(dir.join("handled.ledger"))
    }
    /// One `write` of a whole line with O_APPEND: lines from several processes never mix,
    /// and a process killed mid-way leaves no partial line.
    pub fn record(&self, id: &str) -> std::io::Result<()> {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.0)?;
        f.write_all(format!("{id}\n").as_bytes())
    }
    /// Complete lines so far.
    pub fn len(&self) -> usize {
        std::fs::read(&self.0)
            .map(|b| b.iter().filter(|c| **c == b'\n').count())
            .unwrap_or(0)
    }
    /// Handlings per id.
    pub fn counts(&self) -> HashMap<String, u32> {
        let text = std::fs::read_to_string(&self.0).unwrap_or_default();
        let mut counts = HashMap::new();
        let complete = match text.rfind('\n') {
            Some(end) => &text[..end],
            None => "",
        };
        for line in complete.lines().filter(|l| !l.is_empty()) {
            *counts.entry(line.to_owned()).or_default() += 1;
        }
        counts
    }
}

#[derive(Clone)]
pub struct ChaosState {
    pub ledger: Ledger,
    pub mode: String,
}

#[derive(serde::Deserialize)]
pub struct ChaosJob {
    pub id: String,
}

/// The chaos handler. Modes: `steady` (2 ms of work), `slow` (10 ms), `flaky` (random
/// panics 12 %, runs past the timeout 10 %, otherwise like `steady`).
pub async fn chaos_handle(
    cottontail::State(state): cottontail::State<ChaosState>,
    cottontail::Json(job): cottontail::Json<ChaosJob>,
) -> Result<(), cottontail::HandlerError> {
    match state.mode.as_str() {
        "slow" => tokio::time::sleep(Duration::from_millis(10)).await,
        "flaky" => {
            let roll = fastrand::f64();
            if roll < 0.12 {
                panic!("chaos: random panic handling {}", job.id);
            }
            if roll < 0.22 {
                // Past the queue's 300 ms timeout: cancelled, counted as a transient failure.
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        _ => tokio::time::sleep(Duration::from_millis(2)).await,
    }
    state.ledger.record(&job.id)?;
    Ok(())
}

/// The chaos handler's queue settings.
pub fn chaos_queue(name: &str, mode: &str) -> cottontail::Queue {
    let q = cottontail::Queue::new(name)
        .expires(EXPIRES)
        .concurrency(8)
        .prefetch(32);
    if mode == "flaky" {
        q.timeout(Duration::from_millis(300)).retry(
            cottontail::RetryPolicy::fixed(Duration::from_millis(100))
                .max_attempts(3)
                .jitter(0.0),
        )
    } else {
        q
    }
}

/// The worker process's body: a no-op unless the parent set `CHAOS_*` (then runs until
/// SIGTERM, or until killed).
pub async fn chaos_worker_main() {
    let (Ok(queue), Ok(ledger)) = (std::env::var(CHAOS_QUEUE), std::env::var(CHAOS_LEDGER)) else {
        return;
    };
    let url = std::env::var(CHAOS_URL).unwrap_or_else(|_| amqp_url());
    let name = std::env::var(CHAOS_NAME).unwrap_or_else(|_| unique("chaos-worker"));
    let mode = std::env::var(CHAOS_MODE).unwrap_or_else(|_| "steady".into());
    // `COTTONTAIL_CHAOS_LOG=info` (an EnvFilter) shows the workers' logs on stderr.
    if let Ok(filter) = std::env::var("COTTONTAIL_CHAOS_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::io::stderr)
            .try_init();
    }
    if mode == "flaky" {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !info.to_string().contains("chaos: random panic") {
                default(info);
            }
        }));
    }
    let state = ChaosState {
        ledger: Ledger(ledger.into()),
        mode: mode.clone(),
    };
    let config = Config::new(url)
        .connection_name(name)
        .shutdown_timeout(Duration::from_secs(20));
    App::new(state)
        .handler(chaos_queue(&queue, &mode), chaos_handle)
        .run(config)
        .await
        .expect("chaos worker runs until SIGTERM");
}

/// A child worker process, killed (SIGKILL) on drop if still running.
pub struct ChildGuard(pub Option<Child>);

impl ChildGuard {
    pub fn child(&mut self) -> &mut Child {
        self.0.as_mut().expect("child present")
    }
    /// SIGKILL now and reap.
    pub async fn kill9(&mut self) {
        let child = self.child();
        let _ = child.kill();
        let _ = wait_exit(child, Duration::from_secs(20)).await;
    }
    /// SIGTERM, wait for the drain; returns the exit status.
    pub async fn terminate(&mut self, limit: Duration) -> std::process::ExitStatus {
        let child = self.child();
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        sigterm(child);
        wait_exit(child, limit).await
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(child) = self.0.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Like [`spawn_child`], with the child's stdout (libtest chatter) discarded; stderr (panics,
/// failures) is kept.
pub fn spawn_child_quiet(test_name: &str, env: &[(&str, String)]) -> Child {
    let exe = std::env::current_exe().unwrap();
    let mut cmd = Command::new(exe);
    cmd.args([test_name, "--exact", "--nocapture", "--test-threads=1"]);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn child worker")
}

/// One chaos run: its queue, ledger, broker URL(s) and the workers' settings.
pub struct Chaos {
    pub scenario: String,
    pub queue: String,
    pub urls: String,
    pub dir: TempDir,
    pub ledger: Ledger,
    /// The test function that runs [`chaos_worker_main`] in this binary.
    pub worker_test: String,
}

impl Chaos {
    pub fn new(scenario: &str, urls: &str, worker_test: &str) -> Self {
        let dir = TempDir::new(&format!("chaos-{scenario}"));
        Self {
            scenario: scenario.to_owned(),
            queue: unique(&format!("chaos-{scenario}")),
            urls: urls.to_owned(),
            ledger: Ledger::new(dir.path()),
            dir,
            worker_test: worker_test.to_owned(),
        }
    }

    /// Starts a worker process with connection name `name`, on `urls` (or the run's URLs).
    pub fn spawn_worker(&self, name: &str, mode: &str, urls: Option<&str>) -> ChildGuard {
        let env = [
            (CHAOS_QUEUE, self.queue.clone()),
            (CHAOS_LEDGER, self.ledger.0.to_string_lossy().into_owned()),
            (CHAOS_URL, urls.unwrap_or(&self.urls).to_owned()),
            (CHAOS_NAME, name.to_owned()),
            (CHAOS_MODE, mode.to_owned()),
        ];
        ChildGuard(Some(spawn_child_quiet(&self.worker_test, &env)))
    }

    /// Connects to the run's broker(s) (first URL that answers), within `limit`.
    pub async fn connect(&self, limit: Duration) -> Connection {
        let connector = cottontail::Connector::new(&self.urls, unique("chaos-check")).unwrap();
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Ok(conn)) =
                tokio::time::timeout(Duration::from_secs(10), connector.connect_once()).await
            {
                return conn;
            }
            assert!(
                Instant::now() < deadline,
                "broker unreachable for {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits until the worker declared the queue (so publishes are routable).
    pub async fn wait_queue(&self, limit: Duration) {
        let conn = self.connect(limit).await;
        let queue = self.queue.clone();
        wait_until(limit, "the worker declared the queue", || {
            let conn = &conn;
            let queue = queue.clone();
            async move {
                let Ok(ch) = conn.create_channel().await else {
                    return false;
                };
                let ok = ch
                    .queue_declare(
                        queue.as_str().into(),
                        QueueDeclareOptions {
                            passive: true,
                            ..Default::default()
                        },
                        FieldTable::default(),
                    )
                    .await
                    .is_ok();
                let _ = ch.close(200, "".into()).await;
                ok
            }
        })
        .await;
        let _ = conn.close(200, "bye".into()).await;
    }

    /// Waits until the ledger has at least `n` lines.
    pub async fn wait_handled(&self, n: usize, limit: Duration, what: &str) {
        let ledger = self.ledger.clone();
        wait_until(limit, what, move || {
            let ledger = ledger.clone();
            async move { ledger.len() >= n }
        })
        .await;
    }

    /// Recovery time: from `fault` until the ledger grew past `from + by` lines. On a
    /// timeout, prints the broker's view of the queue before failing.
    pub async fn recovery(&self, fault: Instant, from: usize, by: usize, limit: Duration) -> u128 {
        let deadline = Instant::now() + limit;
        while self.ledger.len() < from + by {
            if Instant::now() >= deadline {
                eprintln!("{}", self.diagnose());
                panic!(
                    "chaos {}: processing did not resume within {limit:?} ({} of {} lines)",
                    self.scenario,
                    self.ledger.len(),
                    from + by
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        fault.elapsed().as_millis()
    }

    /// The broker's view (queue depths, consumers) for a failure message.
    pub fn diagnose(&self) -> String {
        let port = self
            .urls
            .split(',')
            .next()
            .and_then(|u| u.rsplit(':').next())
            .and_then(|p| p.split('/').next())
            .unwrap_or("5672")
            .to_owned();
        let mut out = format!(
            "chaos {} diagnostics (ledger {} lines):\n",
            self.scenario,
            self.ledger.len()
        );
        let nodes_dir = std::path::Path::new("/tmp/cottontail-nodes");
        let node = std::fs::read_dir(nodes_dir)
            .into_iter()
            .flatten()
            .flatten()
            .find(|e| {
                std::fs::read_to_string(e.path().join("rabbitmq.conf"))
                    .is_ok_and(|c| c.contains(&format!("127.0.0.1:{port}\n")))
            })
            .map(|e| format!("{}@localhost", e.file_name().to_string_lossy()));
        let ctl = |args: &[&str]| match &node {
            Some(n) => rabbitmqctl_on(n, args).1,
            None => {
                let o = Command::new("timeout")
                    .arg("60")
                    .arg("rabbitmqctl")
                    .args(args)
                    .output();
                o.map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                    .unwrap_or_default()
            }
        };
        let queues = ctl(&[
            "list_queues",
            "name",
            "messages_ready",
            "messages_unacknowledged",
            "consumers",
            "-q",
        ]);
        for line in queues.lines().filter(|l| l.contains(&self.queue)) {
            out.push_str(&format!("  queue: {line}\n"));
        }
        let consumers = ctl(&["list_consumers", "-q"]);
        for line in consumers.lines().filter(|l| l.contains(&self.queue)) {
            out.push_str(&format!("  consumer: {line}\n"));
        }
        out
    }

    /// Waits until every confirmed id is handled or dead-lettered and the work queue is
    /// empty, then stops the workers gracefully, drains the DLQ and tallies. Asserts
    /// lost = 0 and prints the scenario line.
    pub async fn settle(
        &self,
        publisher: &ChaosPublisher,
        workers: &mut [ChildGuard],
        recovery_ms: u128,
        limit: Duration,
    ) -> ChaosTally {
        let published: Arc<Vec<String>> = Arc::new(publisher.published.lock().unwrap().clone());
        let dead = Arc::new(Mutex::new(HashMap::<String, String>::new()));
        let dlq = format!("{}.dlq", self.queue);
        let conn = Arc::new(tokio::sync::Mutex::new(Some(
            self.connect(Duration::from_secs(60)).await,
        )));
        let last_check = Arc::new(Mutex::new(Instant::now() - Duration::from_secs(1)));
        {
            let (dead, conn, ledger, queue) = (
                dead.clone(),
                conn.clone(),
                self.ledger.clone(),
                self.queue.clone(),
            );
            let published = published.clone();
            let urls = self.urls.clone();
            let dlq = dlq.clone();
            wait_until(
                limit,
                "every published message handled or dead-lettered",
                move || {
                    let (dead, conn, ledger, queue, dlq) = (
                        dead.clone(),
                        conn.clone(),
                        ledger.clone(),
                        queue.clone(),
                        dlq.clone(),
                    );
                    let published = published.clone();
                    let last_check = last_check.clone();
                    let urls = urls.clone();
                    async move {
                        let handled = ledger.counts();
                        let missing = published
                            .iter()
                            .filter(|id| !handled.contains_key(*id))
                            .filter(|id| !dead.lock().unwrap().contains_key(*id))
                            .count();
                        {
                            let mut last = last_check.lock().unwrap();
                            if last.elapsed() < Duration::from_millis(500) {
                                return false;
                            }
                            *last = Instant::now();
                        }
                        let mut guard = conn.lock().await;
                        if guard.as_ref().is_none_or(|c| !c.status().connected()) {
                            let connector =
                                cottontail::Connector::new(&urls, unique("chaos-check")).unwrap();
                            *guard = tokio::time::timeout(
                                Duration::from_secs(10),
                                connector.connect_once(),
                            )
                            .await
                            .ok()
                            .and_then(Result::ok);
                        }
                        let Some(c) = guard.as_ref() else {
                            return false;
                        };
                        if missing > 0 {
                            match tokio::time::timeout(Duration::from_secs(10), drain_dead(c, &dlq))
                                .await
                            {
                                Ok(Some(found)) => dead.lock().unwrap().extend(found),
                                _ => *guard = None,
                            }
                            return false;
                        }
                        // Everything accounted for; let redeliveries in the queue finish too.
                        match tokio::time::timeout(Duration::from_secs(10), ready(c, &queue)).await
                        {
                            Ok(Some(n)) => n == 0,
                            _ => {
                                *guard = None;
                                false
                            }
                        }
                    }
                },
            )
            .await;
        }
        for w in workers.iter_mut() {
            let status = w.terminate(Duration::from_secs(40)).await;
            assert!(status.success(), "worker exited with {status:?}");
        }
        if let Some(c) = conn.lock().await.take() {
            if let Ok(Some(found)) =
                tokio::time::timeout(Duration::from_secs(10), drain_dead(&c, &dlq)).await
            {
                dead.lock().unwrap().extend(found);
            }
            let _ = c.close(200, "bye".into()).await;
        }
        let dead = dead.lock().unwrap().clone();
        let tally = ChaosTally::new(&published, &self.ledger.counts(), &dead, recovery_ms);
        println!(
            "chaos {}: published={} handled={} duplicates={} dead_lettered={} lost={} recovery_ms={}",
            self.scenario,
            tally.published,
            tally.handled,
            tally.duplicates,
            tally.dead_lettered,
            tally.lost.len(),
            tally.recovery_ms
        );
        assert!(
            tally.lost.is_empty(),
            "chaos {}: {} confirmed messages neither handled nor dead-lettered, e.g. {:?}",
            self.scenario,
            tally.lost.len(),
            tally.lost.iter().take(10).collect::<Vec<_>>()
        );
        tally
    }

    /// Removes the run's queues from the broker (best effort).
    pub async fn cleanup(&self) {
        let q = chaos_queue(&self.queue, "flaky");
        let names = handler_queues(&q, &cottontail::RetryPolicy::default());
        let attempt = async {
            let conn = self.connect(Duration::from_secs(10)).await;
            for name in &names {
                let Ok(ch) = conn.create_channel().await else {
                    break;
                };
                let _ = ch
                    .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
                    .await;
            }
            let _ = conn.close(200, "bye".into()).await;
        };
        let _ = tokio::time::timeout(Duration::from_secs(20), attempt).await;
    }
}

async fn ready(conn: &Connection, queue: &str) -> Option<u32> {
    let ch = conn.create_channel().await.ok()?;
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
        .ok()?;
    let _ = ch.close(200, "".into()).await;
    Some(q.message_count())
}

/// Takes every message out of a DLQ: id → `x-error-kind`.
async fn drain_dead(conn: &Connection, dlq: &str) -> Option<HashMap<String, String>> {
    let ch = conn.create_channel().await.ok()?;
    let mut out = HashMap::new();
    while let Some(msg) = ch
        .basic_get(dlq.into(), BasicGetOptions { no_ack: false })
        .await
        .ok()?
    {
        msg.delivery
            .acker
            .ack(BasicAckOptions::default())
            .await
            .ok()?;
        let received = Received::from(msg.delivery);
        let id = serde_json::from_slice::<serde_json::Value>(&received.data)
            .ok()
            .and_then(|v| v["id"].as_str().map(str::to_owned))
            .unwrap_or_default();
        let kind = header_str(&received, "x-error-kind").unwrap_or_default();
        out.insert(id, kind);
    }
    let _ = ch.close(200, "".into()).await;
    Some(out)
}

/// The checker's result.
#[derive(Debug)]
pub struct ChaosTally {
    /// Confirmed publishes (distinct ids).
    pub published: usize,
    /// Distinct confirmed ids handled at least once.
    pub handled: usize,
    /// Extra handlings beyond the first, over all ids.
    pub duplicates: u64,
    /// Distinct confirmed ids found in the DLQ (and never handled).
    pub dead_lettered: usize,
    /// `x-error-kind` of each dead-lettered id.
    pub dead_kinds: HashMap<String, String>,
    /// Confirmed ids neither handled nor dead-lettered.
    pub lost: Vec<String>,
    pub recovery_ms: u128,
}

impl ChaosTally {
    pub fn new(
        published: &[String],
        handled: &HashMap<String, u32>,
        dead: &HashMap<String, String>,
        recovery_ms: u128,
    ) -> Self {
        let published: std::collections::HashSet<&String> = published.iter().collect();
        let mut tally = ChaosTally {
            published: published.len(),
            handled: 0,
            duplicates: 0,
            dead_lettered: 0,
            dead_kinds: HashMap::new(),
            lost: Vec::new(),
            recovery_ms,
        };
        // Duplicates over everything handled (a publish retried after a lost confirm can be
        // handled although it was never counted as published).
        tally.duplicates = handled
            .values()
            .map(|n| u64::from(n.saturating_sub(1)))
            .sum();
        for id in published {
            if handled.contains_key(id) {
                tally.handled += 1;
            } else if let Some(kind) = dead.get(id) {
                tally.dead_lettered += 1;
                tally.dead_kinds.insert(id.clone(), kind.clone());
            } else {
                tally.lost.push(id.clone());
            }
        }
        tally.lost.sort();
        tally
    }
}

/// Publishes ids in batches at a pace, each counted once confirmed (mandatory, so an
/// unroutable message is not mistaken for a stored one); whatever fails (connection lost,
/// nack, return, no confirm within 10 s) is published again on a fresh connection.
pub struct ChaosPublisher {
    pub published: Arc<Mutex<Vec<String>>>,
    pub failures: Arc<AtomicU64>,
    /// How many of the ids may be sent so far (see [`ChaosPublisher::release`]).
    pub limit: Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl ChaosPublisher {
    pub fn spawn(urls: &str, queue: &str, ids: Vec<String>, batch: usize, pace: Duration) -> Self {
        Self::spawn_gated(urls, queue, ids, batch, pace, usize::MAX)
    }

    /// Like [`ChaosPublisher::spawn`], sending only the first `limit` ids until
    /// [`ChaosPublisher::release`] allows more: a fault scenario releases the next phase after
    /// each fault, so there is always work left to show that processing resumed.
    pub fn spawn_gated(
        urls: &str,
        queue: &str,
        ids: Vec<String>,
        batch: usize,
        pace: Duration,
        limit: usize,
    ) -> Self {
        let published = Arc::new(Mutex::new(Vec::with_capacity(ids.len())));
        let failures = Arc::new(AtomicU64::new(0));
        let limit = Arc::new(std::sync::atomic::AtomicUsize::new(limit));
        let connector = cottontail::Connector::new(urls, unique("chaos-publisher")).unwrap();
        let task = tokio::spawn(publish_loop(
            connector,
            queue.to_owned(),
            ids,
            batch.max(1),
            pace,
            (published.clone(), failures.clone(), limit.clone()),
        ));
        Self {
            published,
            failures,
            limit,
            task,
        }
    }

    /// Allows the first `n` ids to be sent.
    pub fn release(&self, n: usize) {
        self.limit.fetch_max(n, Ordering::Relaxed);
    }

    pub fn count(&self) -> usize {
        self.published.lock().unwrap().len()
    }

    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    pub async fn wait_published(&self, n: usize, limit: Duration) {
        let published = self.published.clone();
        wait_until(limit, &format!("{n} confirmed publishes"), move || {
            let published = published.clone();
            async move { published.lock().unwrap().len() >= n }
        })
        .await;
    }

    /// Waits for every id to be confirmed.
    pub async fn finish(&mut self, limit: Duration) {
        match tokio::time::timeout(limit, &mut self.task).await {
            Ok(result) => result.expect("publisher task"),
            Err(_) => panic!(
                "publisher did not get every message confirmed within {limit:?} ({} confirmed)",
                self.count()
            ),
        }
    }
}

impl Drop for ChaosPublisher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Confirmed ids, failed publishes, ids allowed so far.
type PublisherCounters = (
    Arc<Mutex<Vec<String>>>,
    Arc<AtomicU64>,
    Arc<std::sync::atomic::AtomicUsize>,
);

async fn publish_loop(
    connector: cottontail::Connector,
    queue: String,
    ids: Vec<String>,
    batch: usize,
    pace: Duration,
    (published, failures, limit): PublisherCounters,
) {
    use cottontail::lapin::Confirmation;
    let total = ids.len();
    let mut fresh = ids.into_iter();
    let mut taken = 0usize;
    // Ids whose publish failed, sent again before any new one.
    let mut pending: std::collections::VecDeque<String> = Default::default();
    let mut session: Option<(Connection, Channel)> = None;
    while taken < total || !pending.is_empty() {
        if pending.is_empty() && taken >= limit.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        }
        if session.is_none() {
            let attempt = async {
                let conn = connector.connect_once().await.ok()?;
                let ch = conn.create_channel().await.ok()?;
                ch.confirm_select(ConfirmSelectOptions::default())
                    .await
                    .ok()?;
                Some((conn, ch))
            };
            match tokio::time::timeout(Duration::from_secs(10), attempt).await {
                Ok(Some(s)) => session = Some(s),
                _ => {
                    failures.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            }
        }
        let (_, ch) = session.as_ref().unwrap();
        let mut chunk: Vec<String> = pending.drain(..batch.min(pending.len())).collect();
        let allowed = limit.load(Ordering::Relaxed).min(total);
        while chunk.len() < batch && taken < allowed {
            chunk.extend(fresh.next());
            taken += 1;
        }
        let mut sent = Vec::with_capacity(chunk.len());
        let mut broken = false;
        for id in chunk {
            let body = format!(r#"{{"id":"{id}"}}"#);
            let props = json_props().with_message_id(id.as_str().into());
            let confirm = if broken {
                None
            } else {
                ch.basic_publish(
                    "".into(),
                    queue.as_str().into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    body.as_bytes(),
                    props,
                )
                .await
                .ok()
            };
            broken |= confirm.is_none();
            sent.push((id, confirm));
        }
        let mut retry = Vec::new();
        for (id, confirm) in sent {
            let ok = match confirm {
                Some(c) => matches!(
                    tokio::time::timeout(Duration::from_secs(10), c).await,
                    Ok(Ok(Confirmation::Ack(None)))
                ),
                None => false,
            };
            if ok {
                published.lock().unwrap().push(id);
            } else {
                retry.push(id);
            }
        }
        if !retry.is_empty() {
            failures.fetch_add(retry.len() as u64, Ordering::Relaxed);
            for id in retry.into_iter().rev() {
                pending.push_front(id);
            }
            if let Some((conn, _)) = session.take() {
                let _ =
                    tokio::time::timeout(Duration::from_secs(2), conn.close(200, "".into())).await;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        } else {
            tokio::time::sleep(pace).await;
        }
    }
    if let Some((conn, _)) = session {
        let _ = conn.close(200, "done".into()).await;
    }
}
