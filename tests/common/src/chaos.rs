//! The chaos harness (tests/chaos_*.rs): worker processes that record every handled id in a
//! ledger, a publisher that counts only confirmed ids, faults, and the checker.

use super::*;

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
/// Set for a features run (see [`features`]): `<redis url> <key prefix> <schedule name>`.
pub const CHAOS_STORE: &str = "COTTONTAIL_CHAOS_STORE";

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
    /// Whether nothing was handled yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Handlings per id.
    pub fn counts(&self) -> HashMap<String, u32> {
        let mut counts = HashMap::new();
        for line in self.lines() {
            *counts.entry(line).or_default() += 1;
        }
        counts
    }
    /// The complete lines so far, in the order they were written.
    pub fn lines(&self) -> Vec<String> {
        let text = std::fs::read_to_string(&self.0).unwrap_or_default();
        let complete = match text.rfind('\n') {
            Some(end) => &text[..end],
            None => "",
        };
        complete
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect()
    }
}

#[derive(Clone)]
pub struct ChaosState {
    pub ledger: Ledger,
    pub mode: String,
    /// How long a successful handling works before it records its id.
    pub work: Duration,
}

#[derive(serde::Deserialize)]
pub struct ChaosJob {
    pub id: String,
}

/// The chaos handler. Modes: `steady` (2 ms of work), `slow` (10 ms), `flaky` (random
/// panics 12 %, runs past the timeout 10 %, otherwise like `steady`), `retrying` (every first
/// attempt fails transiently, so every message passes through a retry tier queue).
pub async fn chaos_handle(
    cottontail::State(state): cottontail::State<ChaosState>,
    cottontail::Attempt(attempt): cottontail::Attempt,
    cottontail::Json(job): cottontail::Json<ChaosJob>,
) -> Result<(), cottontail::HandlerError> {
    chaos_step(&state, attempt, &job.id).await
}

/// One handling of `id` by a chaos handler in `state.mode` (see [`chaos_handle`]).
pub async fn chaos_step(
    state: &ChaosState,
    attempt: u32,
    id: &str,
) -> Result<(), cottontail::HandlerError> {
    match state.mode.as_str() {
        "retrying" if attempt == 1 => {
            return Err(cottontail::HandlerError::transient(
                "chaos",
                "every first attempt fails",
            ))
        }
        "flaky" => {
            let roll = fastrand::f64();
            if roll < 0.12 {
                panic!("chaos: random panic handling {id}");
            }
            if roll < 0.22 {
                // Past the queue's 300 ms timeout: cancelled, counted as a transient failure.
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        }
        _ => {}
    }
    tokio::time::sleep(state.work).await;
    state.ledger.record(id)?;
    Ok(())
}

/// How long a handling of `mode` works: 10 ms when `slow`, 2 ms otherwise.
pub fn chaos_work(mode: &str) -> Duration {
    Duration::from_millis(if mode == "slow" { 10 } else { 2 })
}

/// The retry delay of the `retrying` mode (one tier queue).
pub const CHAOS_RETRY_DELAY: Duration = Duration::from_millis(300);

/// The chaos handler's queue settings.
pub fn chaos_queue(name: &str, mode: &str) -> cottontail::Queue {
    let q = cottontail::Queue::new(name)
        .expires(EXPIRES)
        .concurrency(8)
        .prefetch(32);
    match mode {
        "flaky" => q.timeout(Duration::from_millis(300)).retry(
            cottontail::RetryPolicy::fixed(Duration::from_millis(100))
                .max_attempts(3)
                .jitter(0.0),
        ),
        "retrying" => q.retry(
            cottontail::RetryPolicy::fixed(CHAOS_RETRY_DELAY)
                .max_attempts(5)
                .jitter(0.0),
        ),
        _ => q,
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
    let config = Config::new(url)
        .connection_name(name)
        .shutdown_timeout(Duration::from_secs(20));
    if let Ok(store) = std::env::var(CHAOS_STORE) {
        let ledger = Ledger(ledger.into());
        return features::worker_main(&queue, &ledger, &mode, &store, config).await;
    }
    let state = ChaosState {
        ledger: Ledger(ledger.into()),
        work: chaos_work(&mode),
        mode: mode.clone(),
    };
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
    /// Set: the workers run every feature column too (see [`features`]).
    pub features: Option<features::FeatureStore>,
    /// Each fault that can interrupt schedule leadership: from, to (epoch ms).
    pub faults: Mutex<Vec<(i64, i64)>>,
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
            features: None,
            faults: Mutex::new(Vec::new()),
        }
    }

    /// The workers also run every feature column, with their stores in Redis at `redis_url`
    /// (under a key prefix of this run, deleted when it ends).
    pub fn with_features(mut self, redis_url: &str) -> Self {
        self.features = Some(features::FeatureStore::new(redis_url, &self.scenario));
        self
    }

    /// Notes that a fault that can interrupt schedule leadership begins (ticks due until an
    /// instance leads again are skipped by design: see [`features::due_ticks`]).
    pub fn mark_fault(&self) {
        let now = chrono::Utc::now().timestamp_millis();
        self.faults.lock().unwrap().push((now, now));
    }

    /// Notes that the last fault is over (the broker is back, a new worker started).
    pub fn fault_over(&self) {
        let now = chrono::Utc::now().timestamp_millis();
        if let Some(fault) = self.faults.lock().unwrap().last_mut() {
            fault.1 = now;
        }
    }

    /// The ids to publish: `n` plain ones `<prefix>-<i>`, plus the feature columns' ids in a
    /// features run (see [`features::ids`]).
    pub fn ids(&self, prefix: &str, n: usize) -> Vec<String> {
        if self.features.is_some() {
            features::ids(prefix, n)
        } else {
            (0..n).map(|i| format!("{prefix}-{i}")).collect()
        }
    }

    /// Starts a worker process with connection name `name`, on `urls` (or the run's URLs).
    pub fn spawn_worker(&self, name: &str, mode: &str, urls: Option<&str>) -> ChildGuard {
        let mut env = vec![
            (CHAOS_QUEUE, self.queue.clone()),
            (CHAOS_LEDGER, self.ledger.0.to_string_lossy().into_owned()),
            (CHAOS_URL, urls.unwrap_or(&self.urls).to_owned()),
            (CHAOS_NAME, name.to_owned()),
            (CHAOS_MODE, mode.to_owned()),
        ];
        if let Some(store) = &self.features {
            env.push((CHAOS_STORE, store.env()));
        }
        ChildGuard(Some(spawn_child_quiet(&self.worker_test, &env)))
    }

    /// Connects to the run's broker(s) (first URL that answers), within `limit`.
    pub async fn connect(&self, limit: Duration) -> Connection {
        let connector =
            cottontail::connection::Connector::new(&self.urls, unique("chaos-check")).unwrap();
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

    /// Waits until the worker declared its queues (so publishes are routable) and consumes.
    pub async fn wait_queue(&self, limit: Duration) {
        let conn = self.connect(limit).await;
        let queue = self.queue.clone();
        // A consumer means the worker's session started: every queue (tiers too) is declared.
        wait_until(limit, "the worker declared its queues and consumes", || {
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
                    .is_ok_and(|q| q.consumer_count() > 0);
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

    /// Waits until every confirmed id is handled or dead-lettered and the work queues are
    /// empty, then stops the workers gracefully, drains the DLQs and tallies. Asserts
    /// lost = 0 and prints the scenario line (in a features run, one line per column, each
    /// with its own checks: see [`features::report`]).
    pub async fn settle(
        &self,
        publisher: &ChaosPublisher,
        workers: &mut [ChildGuard],
        recovery_ms: u128,
        limit: Duration,
    ) -> ChaosTally {
        let published = publisher.published.lock().unwrap().clone();
        let columns = features::columns(self);
        let handled = || {
            let mut all = HashMap::new();
            for column in &columns {
                all.extend(column.handled());
            }
            all
        };
        let mut dead = HashMap::<String, String>::new();
        let mut conn = Some(self.connect(Duration::from_secs(60)).await);
        let deadline = Instant::now() + limit;
        loop {
            let done = handled();
            let missing: Vec<&String> = published
                .iter()
                .filter(|id| !done.contains_key(*id) && !dead.contains_key(*id))
                .collect();
            if conn.as_ref().is_none_or(|c| !c.status().connected()) {
                let connector =
                    cottontail::connection::Connector::new(&self.urls, unique("chaos-check"))
                        .expect("chaos URLs");
                conn = tokio::time::timeout(Duration::from_secs(10), connector.connect_once())
                    .await
                    .ok()
                    .and_then(Result::ok);
            }
            if let Some(c) = &conn {
                let check = async {
                    if !missing.is_empty() {
                        for column in &columns {
                            dead.extend(drain_dead(c, &column.dlq()).await?);
                        }
                        return Some(false);
                    }
                    // Everything accounted for; let redeliveries in the queues finish too
                    // (schedule ticks keep coming: not waited for).
                    for column in columns.iter().filter(|c| c.name != "schedule") {
                        if ready(c, &column.queue).await? > 0 {
                            return Some(false);
                        }
                    }
                    Some(true)
                };
                match tokio::time::timeout(Duration::from_secs(10), check).await {
                    Ok(Some(true)) => break,
                    Ok(Some(false)) => {}
                    _ => conn = None,
                }
            }
            if Instant::now() >= deadline {
                eprintln!("{}", self.diagnose());
                if self.features.is_some() {
                    eprintln!("{}", features::diagnose(self, &missing).await);
                }
                panic!(
                    "chaos {}: timed out after {limit:?} waiting for every published message \
                     handled or dead-lettered ({} of {} missing, e.g. {:?})",
                    self.scenario,
                    missing.len(),
                    published.len(),
                    missing.iter().take(10).collect::<Vec<_>>()
                );
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        for w in workers.iter_mut() {
            let status = w.terminate(Duration::from_secs(40)).await;
            assert!(status.success(), "worker exited with {status:?}");
        }
        if let Some(c) = conn.take() {
            for column in &columns {
                if let Ok(Some(found)) =
                    tokio::time::timeout(Duration::from_secs(10), drain_dead(&c, &column.dlq()))
                        .await
                {
                    dead.extend(found);
                }
            }
            let _ = c.close(200, "bye".into()).await;
        }
        let plain: Vec<String> = published
            .iter()
            .filter(|id| features::column_of(id) == "plain")
            .cloned()
            .collect();
        let mut tally = ChaosTally::new(&plain, &columns[0].handled(), &dead, recovery_ms);
        let name = match self.features {
            Some(_) => format!("{}/plain", self.scenario),
            None => self.scenario.clone(),
        };
        println!(
            "chaos {name}: published={} handled={} duplicates={} dead_lettered={} lost={} recovery_ms={}",
            tally.published,
            tally.handled,
            tally.duplicates,
            tally.dead_lettered,
            tally.lost.len(),
            tally.recovery_ms
        );
        assert!(
            tally.lost.is_empty(),
            "chaos {name}: {} confirmed messages neither handled nor dead-lettered, e.g. {:?}",
            tally.lost.len(),
            tally.lost.iter().take(10).collect::<Vec<_>>()
        );
        if self.features.is_some() {
            tally.columns = features::report(self, &published, &dead).await;
        }
        tally
    }

    /// Removes the run's queues from the broker (best effort).
    pub async fn cleanup(&self) {
        let q = chaos_queue(&self.queue, "flaky");
        let mut names = handler_queues(&q, &cottontail::RetryPolicy::default());
        if let Some(store) = &self.features {
            names.extend(
                features::FeatureQueues::names_only(&self.queue).all_queue_names(&store.schedule),
            );
        }
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

impl Drop for Chaos {
    /// What a features run leaves that would not expire goes with it, also when the test
    /// failed.
    fn drop(&mut self) {
        if let Some(store) = &self.features {
            features::delete_leftovers(&self.urls, store);
        }
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
    /// A features run's other columns (this tally is the plain one).
    pub columns: Vec<(String, ChaosTally)>,
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
            columns: Vec::new(),
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

    /// Every column's tally, plain first.
    pub fn all(&self) -> impl Iterator<Item = (&str, &ChaosTally)> {
        std::iter::once(("plain", self)).chain(self.columns.iter().map(|(n, t)| (n.as_str(), t)))
    }

    /// A fault scenario dead-letters nothing, in any column.
    pub fn assert_nothing_dead_lettered(&self) {
        for (column, t) in self.all() {
            assert_eq!(
                t.dead_lettered, 0,
                "{column}: nothing here should be dead-lettered"
            );
        }
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
        let connector =
            cottontail::connection::Connector::new(urls, unique("chaos-publisher")).unwrap();
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
    connector: cottontail::connection::Connector,
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
            let (target, props) = features::target(&queue, &id);
            let confirm = if broken {
                None
            } else {
                ch.basic_publish(
                    "".into(),
                    target.as_str().into(),
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
