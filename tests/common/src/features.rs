//! The chaos matrix's feature columns (RELIABILITY.md, "Fault × feature"): one worker process
//! runs every feature at once, each on its own queue with its own ledger, so one fault
//! scenario exercises them all and prints one line per feature:
//!
//! - `plain`: the scenario's own queue (the classic chaos handler);
//! - `retries`: every first attempt fails, so each message passes through a retry tier queue;
//! - `ordered`: an [`Ordering`] with a Redis sequence store, 10 keys in sequence order;
//! - `dedup`: a Redis dedup store; every 10th id is also published twice by the producer;
//! - `schedule`: a schedule firing every second into a dedup'ed job handler;
//! - `jobs`: job statuses in Redis.
//!
//! Publisher-fed ids name their column: `retries:17`, `ordered:k3.7` (key `k3`, number 7),
//! `dedup:5`, `jobs:9`; plain ids have no `:`.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use cottontail::stores::SequenceStore;
use cottontail::stores::{Claim, DedupStore, StoreError};
use cottontail::{BoxFuture, Dedup, Ordering, Queue};

use super::*;

/// The columns besides `plain`, in the table's order.
pub const FEATURES: [&str; 5] = ["retries", "ordered", "dedup", "schedule", "jobs"];

/// Keys of the ordered column.
const KEYS: usize = 10;

/// The store and schedule of a features run.
#[derive(Clone, Debug)]
pub struct FeatureStore {
    pub redis_url: String,
    /// Every Redis key of the run starts with `<prefix>:`.
    pub prefix: String,
    pub schedule: String,
}

impl FeatureStore {
    pub fn new(redis_url: &str, scenario: &str) -> Self {
        Self {
            redis_url: redis_url.to_owned(),
            prefix: unique(&format!("chaos-{scenario}")),
            schedule: unique(&format!("chaos-{scenario}-tick")),
        }
    }

    /// The [`CHAOS_STORE`] value.
    pub fn env(&self) -> String {
        format!("{} {} {}", self.redis_url, self.prefix, self.schedule)
    }

    pub fn parse(env: &str) -> Self {
        let mut parts = env.split(' ');
        let mut next = || {
            parts
                .next()
                .expect("CHAOS_STORE: url prefix schedule")
                .to_owned()
        };
        Self {
            redis_url: next(),
            prefix: next(),
            schedule: next(),
        }
    }
}

/// The column an id belongs to.
pub fn column_of(id: &str) -> &str {
    id.split_once(':').map_or("plain", |(feature, _)| feature)
}

/// `ordered:<key>.<n>` → (key, n).
pub fn sequence_of(id: &str) -> Option<(&str, u64)> {
    let (key, n) = id.strip_prefix("ordered:")?.rsplit_once('.')?;
    Some((key, n.parse().ok()?))
}

/// Where the publisher sends `id`: the plain queue, or `<queue>.<feature>`; ordered ids carry
/// their sequence headers.
pub fn target(queue: &str, id: &str) -> (String, BasicProperties) {
    let props = json_props().with_message_id(id.into());
    match id.split_once(':') {
        None => (queue.to_owned(), props),
        Some((feature, _)) => {
            let props = match sequence_of(id) {
                Some((key, n)) => props.with_headers(cottontail::client::sequence_headers(key, n)),
                None => props,
            };
            (format!("{queue}.{feature}"), props)
        }
    }
}

/// `n` plain ids `<prefix>-<i>` and, spread evenly among them (so every publishing phase
/// carries every column), `n / 10` ids of each publisher-fed feature: ordered ids go key by
/// key in sequence order, and every 10th dedup id is published twice.
pub fn ids(prefix: &str, n: usize) -> Vec<String> {
    let mut ids = Vec::with_capacity(n * 15 / 10);
    for i in 0..n {
        ids.push(format!("{prefix}-{i}"));
        if i % 10 == 9 {
            let j = i / 10;
            ids.push(format!("retries:{j}"));
            ids.push(format!("ordered:k{}.{}", j % KEYS, j / KEYS + 1));
            ids.push(format!("dedup:{j}"));
            if j % 10 == 0 {
                ids.push(format!("dedup:{j}"));
            }
            ids.push(format!("jobs:{j}"));
        }
    }
    ids
}

/// The feature handlers' queues on `base` (the plain queue); `ordered` and `dedup` pass the
/// stores (any: the names do not depend on them).
pub struct FeatureQueues {
    pub retries: Queue,
    pub ordered: Queue,
    pub dedup: Queue,
    pub schedule: Queue,
    pub jobs: Queue,
}

impl FeatureQueues {
    pub fn new(
        base: &str,
        sequences: Arc<dyn SequenceStore>,
        dedup: Arc<dyn DedupStore>,
        ticks: Arc<dyn DedupStore>,
    ) -> Self {
        // A killed worker's claims lapse within 3 s (the default 60 s would stall the run).
        let dedup_of = |store| Dedup::shared(store).lease(Duration::from_secs(3));
        let untracked = |name: &str| {
            Queue::new(format!("{base}.{name}"))
                .expires(EXPIRES)
                .concurrency(8)
                .prefetch(32)
                .track_jobs(false)
        };
        Self {
            retries: chaos_queue(&format!("{base}.retries"), "retrying").track_jobs(false),
            ordered: untracked("ordered").ordered(
                Ordering::shared(sequences)
                    .partitions(2)
                    .rebalance_interval(Duration::from_millis(500)),
            ),
            dedup: untracked("dedup").dedup(dedup_of(dedup)),
            schedule: untracked("schedule").dedup(dedup_of(ticks)),
            jobs: chaos_queue(&format!("{base}.jobs"), "steady"),
        }
    }

    /// With in-memory stores: for queue names.
    pub fn names_only(base: &str) -> Self {
        Self::new(
            base,
            Arc::new(cottontail::stores::MemorySequences::new()),
            Arc::new(cottontail::stores::MemoryStore::new(1)),
            Arc::new(cottontail::stores::MemoryStore::new(1)),
        )
    }

    /// Every queue the feature handlers (and the schedule) declare.
    pub fn all_queue_names(&self, schedule: &str) -> Vec<String> {
        let policy = cottontail::RetryPolicy::default();
        let mut names = Vec::new();
        for q in [
            &self.retries,
            &self.ordered,
            &self.dedup,
            &self.schedule,
            &self.jobs,
        ] {
            names.extend(handler_queues(q, &policy));
        }
        for n in 0..2 {
            names.push(cottontail::names::partition_queue(self.ordered.name(), n));
        }
        names.push(cottontail::names::members_queue(self.ordered.name()));
        names.push(format!("cottontail.leader.{schedule}"));
        names.push(format!("cottontail.schedule.{schedule}.state"));
        names
    }
}

/// A dedup store that also writes what it answered to a ledger: `done <id>` once a
/// completion is stored, `dup <id>` when a delivery is suppressed as already done. With the
/// handler's `run <id>` lines, the ledger shows whether an effect ever ran again after its
/// completion was recorded (a dedup failure) or only after a run that never recorded one (a
/// worker killed between its effect and the store: at-least-once allows that).
pub struct Recorded {
    pub inner: Arc<dyn DedupStore>,
    pub ledger: Ledger,
}

impl Recorded {
    fn note(ledger: &Ledger, what: &str, id: &str) -> Result<(), StoreError> {
        ledger
            .record(&format!("{what} {id}"))
            .map_err(|e| StoreError(format!("chaos ledger: {e}")))
    }
}

impl DedupStore for Recorded {
    fn claim(
        &self,
        scope: &str,
        id: &str,
        owner: &str,
        lease: Duration,
    ) -> BoxFuture<Result<Claim, StoreError>> {
        let (claim, ledger, id) = (
            self.inner.claim(scope, id, owner, lease),
            self.ledger.clone(),
            id.to_owned(),
        );
        Box::pin(async move {
            let claim = claim.await?;
            if let Claim::Done { .. } = claim {
                Self::note(&ledger, "dup", &id)?;
            }
            Ok(claim)
        })
    }

    fn complete(
        &self,
        scope: &str,
        id: &str,
        owner: &str,
        reply: Option<Vec<u8>>,
        retention: Duration,
    ) -> BoxFuture<Result<(), StoreError>> {
        let (done, ledger, id) = (
            self.inner.complete(scope, id, owner, reply, retention),
            self.ledger.clone(),
            id.to_owned(),
        );
        Box::pin(async move {
            done.await?;
            Self::note(&ledger, "done", &id)
        })
    }

    fn release(&self, scope: &str, id: &str, owner: &str) -> BoxFuture<Result<(), StoreError>> {
        self.inner.release(scope, id, owner)
    }
}

/// The ledger of `column` next to the plain one.
pub fn ledger_of(plain: &Ledger, column: &str) -> Ledger {
    let dir = plain.0.parent().expect("ledger in a directory");
    Ledger(dir.join(format!("{column}.ledger")))
}

/// A column for the checker: its work queue and how to read its ledger.
pub struct Column {
    pub name: &'static str,
    pub queue: String,
    pub ledger: Ledger,
    /// Ledger lines of handlings are `run <id>` (dedup'ed columns) instead of `<id>`.
    pub runs_prefixed: bool,
}

impl Column {
    /// Handlings per id.
    pub fn handled(&self) -> HashMap<String, u32> {
        let mut counts = HashMap::new();
        for line in self.ledger.lines() {
            let id = if self.runs_prefixed {
                match line.strip_prefix("run ") {
                    Some(id) => id,
                    None => continue,
                }
            } else {
                line.as_str()
            };
            *counts.entry(id.to_owned()).or_default() += 1;
        }
        counts
    }

    pub fn dlq(&self) -> String {
        format!("{}.dlq", self.queue)
    }
}

/// The run's columns: `plain` first; the features when it has them.
pub fn columns(chaos: &Chaos) -> Vec<Column> {
    let mut columns = vec![Column {
        name: "plain",
        queue: chaos.queue.clone(),
        ledger: chaos.ledger.clone(),
        runs_prefixed: false,
    }];
    if chaos.features.is_some() {
        for name in FEATURES {
            columns.push(Column {
                name,
                queue: format!("{}.{name}", chaos.queue),
                ledger: ledger_of(&chaos.ledger, name),
                runs_prefixed: matches!(name, "dedup" | "schedule"),
            });
        }
    }
    columns
}

/// Checks the per-key order of the ordered column's ledger: each key's first applications
/// are 1..n in order; a re-application may only repeat the number just applied (its worker
/// died between running it and saving the key's state). Returns (keys, re-applications).
pub fn check_order(lines: &[String]) -> Result<(usize, usize), String> {
    let mut per_key: HashMap<&str, Vec<u64>> = HashMap::new();
    for line in lines {
        let (key, n) = sequence_of(line).ok_or_else(|| format!("bad ordered line {line:?}"))?;
        per_key.entry(key).or_default().push(n);
    }
    let mut repeats = 0;
    for (key, seqs) in &per_key {
        let mut expected = 1;
        for (i, n) in seqs.iter().enumerate() {
            if *n == expected {
                expected += 1;
            } else if i > 0 && *n == seqs[i - 1] {
                repeats += 1;
            } else {
                return Err(format!("key {key}: {n} applied out of order: {seqs:?}"));
            }
        }
    }
    Ok((per_key.len(), repeats))
}

/// What a dedup'ed column's ledger says about its effects.
#[derive(Debug, Default)]
pub struct Effects {
    /// Runs beyond an id's first.
    pub twice: usize,
    /// Deliveries the store answered "already done" (producer duplicates, redeliveries).
    pub suppressed: usize,
    /// Ids that ran again after their completion was recorded: dedup failures.
    pub after_done: Vec<String>,
}

pub fn effects(lines: &[String]) -> Effects {
    let mut fx = Effects::default();
    let mut done: std::collections::HashSet<&str> = Default::default();
    let mut ran: std::collections::HashSet<&str> = Default::default();
    for line in lines {
        match line.split_once(' ') {
            Some(("run", id)) => {
                if done.contains(id) {
                    fx.after_done.push(id.to_owned());
                }
                if !ran.insert(id) {
                    fx.twice += 1;
                }
            }
            Some(("done", id)) => {
                done.insert(id);
            }
            Some(("dup", _)) => fx.suppressed += 1,
            _ => panic!("bad ledger line {line:?}"),
        }
    }
    fx
}

/// How long after a fault ended an instance must lead again: the scheduler's longest retry
/// delay.
pub const LEAD_AGAIN_WITHIN: i64 = 10_000;

/// The schedule column: the ticks that were due, from the ledger's ticks (`<schedule>@<ms>`).
/// With [`cottontail::Missed::Skip`], ticks due while no instance can lead are dropped by
/// design: a run of ticks missing between two handled ones is *skipped* when it overlaps a
/// fault of `faults` (epoch ms from, to), from the tick in flight before it (1.5 s) until an
/// instance leads again ([`LEAD_AGAIN_WITHIN`] after it ended). Any other missing tick counts
/// as due, so the checker reports it lost. Returns (due tick ids, skipped ticks).
pub fn due_ticks(lines: &[String], faults: &[(i64, i64)]) -> (Vec<String>, usize) {
    let mut schedule = String::new();
    let mut ticks = BTreeSet::new();
    for line in lines {
        let (_, id) = line.split_once(' ').expect("ledger line");
        let (name, ms) = id.rsplit_once('@').expect("tick id <schedule>@<ms>");
        schedule = name.to_owned();
        ticks.insert(ms.parse::<i64>().expect("tick ms"));
    }
    let (Some(&first), Some(&last)) = (ticks.first(), ticks.last()) else {
        return (Vec::new(), 0);
    };
    let mut due = Vec::new();
    let mut skipped = 0;
    let mut gap = Vec::new();
    let mut t = first;
    while t <= last {
        if ticks.contains(&t) {
            if let (Some(&from), Some(&to)) = (gap.first(), gap.last()) {
                let excused = faults
                    .iter()
                    .any(|(start, end)| from <= end + LEAD_AGAIN_WITHIN && start - 1500 <= to);
                if excused {
                    skipped += gap.len();
                } else {
                    due.append(&mut gap);
                }
            }
            gap.clear();
            due.push(t);
        } else {
            gap.push(t);
        }
        t += 1000;
    }
    (
        due.into_iter().map(|t| format!("{schedule}@{t}")).collect(),
        skipped,
    )
}

/// A column's own check: fields for its line, and what failed (reported after the line).
#[derive(Default)]
struct Check {
    extra: String,
    failure: Option<String>,
}

/// The feature lines of a settled run: one per feature, each asserted lost = 0 plus its own
/// invariant (order, effect once, ticks, job statuses). A failing column still prints its
/// line first. Returns the tallies.
pub async fn report(
    chaos: &Chaos,
    published: &[String],
    dead: &HashMap<String, String>,
) -> Vec<(String, ChaosTally)> {
    let mut tallies = Vec::new();
    let faults = chaos.faults.lock().unwrap().clone();
    for column in columns(chaos).into_iter().skip(1) {
        let lines = column.ledger.lines();
        let mut mine: Vec<String> = published
            .iter()
            .filter(|id| column_of(id) == column.name)
            .cloned()
            .collect();
        let check = match column.name {
            "ordered" => match check_order(&lines) {
                Ok((keys, repeats)) => Check {
                    extra: format!("keys={keys} in_order=yes reapplied={repeats}"),
                    failure: None,
                },
                Err(e) => Check {
                    extra: "in_order=NO".into(),
                    failure: Some(e),
                },
            },
            "dedup" | "schedule" => {
                let fx = effects(&lines);
                let mut check = Check {
                    extra: format!("effect_twice={} suppressed={}", fx.twice, fx.suppressed),
                    failure: (!fx.after_done.is_empty()).then(|| {
                        format!(
                            "ran again after its completion was recorded: {:?}",
                            fx.after_done
                        )
                    }),
                };
                if column.name == "schedule" {
                    let runs: Vec<String> = lines
                        .iter()
                        .filter(|l| l.starts_with("run "))
                        .cloned()
                        .collect();
                    let (due, skipped) = due_ticks(&runs, &faults);
                    if due.len() < 5 {
                        check.failure = Some(format!("only {} ticks were due", due.len()));
                    }
                    mine = due;
                    check
                        .extra
                        .push_str(&format!(" skipped_across_faults={skipped}"));
                }
                check
            }
            "jobs" => job_statuses(chaos, &column).await,
            _ => Check::default(),
        };
        let tally = ChaosTally::new(&mine, &column.handled(), dead, 0);
        let line = format!(
            "chaos {}/{}: published={} handled={} duplicates={} dead_lettered={} lost={} {}",
            chaos.scenario,
            column.name,
            tally.published,
            tally.handled,
            tally.duplicates,
            tally.dead_lettered,
            tally.lost.len(),
            check.extra,
        );
        println!("{}", line.trim_end());
        assert!(
            tally.lost.is_empty(),
            "chaos {}/{}: {} neither handled nor dead-lettered, e.g. {:?}",
            chaos.scenario,
            column.name,
            tally.lost.len(),
            tally.lost.iter().take(10).collect::<Vec<_>>()
        );
        if let Some(failure) = check.failure {
            panic!("chaos {}/{}: {failure}", chaos.scenario, column.name);
        }
        tallies.push((column.name.to_owned(), tally));
    }
    tallies
}

/// Every handled id of the jobs column ends `succeeded` in the store.
#[cfg(feature = "redis")]
async fn job_statuses(chaos: &Chaos, column: &Column) -> Check {
    use cottontail::stores::JobStore;
    let store = chaos.features.as_ref().expect("a features run");
    let jobs = cottontail::stores::RedisStore::connect(&store.redis_url, &store.prefix)
        .await
        .expect("the run's Redis");
    let handled = column.handled();
    let mut wrong = Vec::new();
    for id in handled.keys() {
        let status = jobs.get(id).await.expect("job status readable");
        let status = status.map_or_else(|| "(none)".to_owned(), |s| s.status);
        if status != "succeeded" {
            wrong.push(format!("{id}={status}"));
        }
    }
    wrong.sort();
    Check {
        extra: format!(
            "succeeded={}/{}",
            handled.len() - wrong.len(),
            handled.len()
        ),
        failure: (!wrong.is_empty()).then(|| {
            format!(
                "{} of {} handled jobs do not end `succeeded`: {:?}",
                wrong.len(),
                handled.len(),
                wrong.iter().take(20).collect::<Vec<_>>()
            )
        }),
    }
}

#[cfg(not(feature = "redis"))]
async fn job_statuses(_: &Chaos, _: &Column) -> Check {
    unreachable!("features runs need the redis feature")
}

/// For a stalled run: each missing ordered id's key and the number its store expects next.
#[cfg(feature = "redis")]
pub async fn diagnose(chaos: &Chaos, missing: &[&String]) -> String {
    let store = chaos.features.as_ref().expect("a features run");
    let Ok(redis) = cottontail::stores::RedisStore::connect(&store.redis_url, &store.prefix).await
    else {
        return "the run's Redis does not answer".to_owned();
    };
    let scope = format!("{}.ordered", chaos.queue);
    let mut out = String::new();
    for id in missing.iter().take(20) {
        if let Some((key, n)) = sequence_of(id) {
            let next = redis.next(&scope, key).await;
            out.push_str(&format!(
                "  missing {id}: key {key} expects {next:?} next (this is {n})\n"
            ));
        }
    }
    out
}

#[cfg(not(feature = "redis"))]
pub async fn diagnose(_: &Chaos, _: &[&String]) -> String {
    String::new()
}

/// What outlives a features run unless deleted: its Redis keys (sequence numbers never
/// expire) and the schedule's leader and state queues (no `x-expires`). Blocking, so that it
/// also runs from `Drop` when a test fails; best effort, bounded to a few seconds each.
pub fn delete_leftovers(urls: &str, store: &FeatureStore) {
    let (urls, store) = (urls.to_owned(), store.clone());
    let work = move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async {
            let queues = async {
                let connector =
                    cottontail::connection::Connector::new(&urls, unique("chaos-cleanup")).ok()?;
                let conn = connector.connect_once().await.ok()?;
                for name in [
                    format!("cottontail.leader.{}", store.schedule),
                    format!("cottontail.schedule.{}.state", store.schedule),
                ] {
                    let ch = conn.create_channel().await.ok()?;
                    let _ = ch
                        .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
                        .await;
                }
                let _ = conn.close(200, "bye".into()).await;
                Some(())
            };
            let _ = tokio::time::timeout(Duration::from_secs(10), queues).await;
            let _ = tokio::time::timeout(Duration::from_secs(10), delete_keys(&store)).await;
        });
    };
    let _ = std::thread::spawn(work).join();
}

#[cfg(feature = "redis")]
async fn delete_keys(store: &FeatureStore) {
    let Ok(redis) = cottontail::stores::RedisStore::connect(&store.redis_url, &store.prefix).await
    else {
        return;
    };
    let mut conn = redis.connection();
    let keys: Vec<Vec<u8>> = cottontail::stores::redis::client::cmd("KEYS")
        .arg(format!("{}:*", store.prefix))
        .query_async(&mut conn)
        .await
        .unwrap_or_default();
    for chunk in keys.chunks(500) {
        let _: Result<i64, _> = cottontail::stores::redis::client::cmd("DEL")
            .arg(chunk)
            .query_async(&mut conn)
            .await;
    }
}

#[cfg(not(feature = "redis"))]
async fn delete_keys(_: &FeatureStore) {}

/// Every feature's state: its ledger, mode and work per handling.
#[derive(Clone)]
struct Workers {
    plain: ChaosState,
    retries: ChaosState,
    ordered: ChaosState,
    dedup: ChaosState,
    schedule: ChaosState,
    jobs: ChaosState,
}

/// The chaos handler on one column's state.
fn chaos_on(
    column: fn(&Workers) -> &ChaosState,
) -> impl Fn(
    cottontail::State<Workers>,
    cottontail::Attempt,
    cottontail::Json<ChaosJob>,
) -> BoxFuture<Result<(), cottontail::HandlerError>>
       + Clone
       + Send
       + Sync
       + 'static {
    move |cottontail::State(w), cottontail::Attempt(attempt), cottontail::Json(job)| {
        Box::pin(async move { chaos_step(column(&w), attempt, &job.id).await })
    }
}

async fn ordered(
    cottontail::State(w): cottontail::State<Workers>,
    seq: cottontail::Sequence,
) -> Result<(), cottontail::HandlerError> {
    let id = format!("ordered:{}.{}", seq.key, seq.number);
    chaos_step(&w.ordered, 1, &id).await
}

async fn dedup(
    cottontail::State(w): cottontail::State<Workers>,
    cottontail::MessageId(id): cottontail::MessageId,
) -> Result<(), cottontail::HandlerError> {
    chaos_step(&w.dedup, 1, &format!("run {}", id.unwrap_or_default())).await
}

async fn tick(
    cottontail::State(w): cottontail::State<Workers>,
    cottontail::MessageId(id): cottontail::MessageId,
    _tick: cottontail::Tick,
) -> Result<(), cottontail::HandlerError> {
    chaos_step(&w.schedule, 1, &format!("run {}", id.unwrap_or_default())).await
}

/// The features worker: the plain handler of `mode` on `base` and every feature beside it,
/// until SIGTERM. The feature handlers work 20 ms, so a fault finds some of their messages in
/// flight. In `slow` mode they work 100 ms: 8 at a time that is 80 msg/s per column beside the
/// plain column's 800 (10 ms), in proportion to the 1:10 mix of the published ids, so every
/// column still has a backlog when (d) sends SIGTERM a third of the way through the plain one.
#[cfg(feature = "redis")]
pub async fn worker_main(
    base: &str,
    ledger: &Ledger,
    mode: &str,
    store: &str,
    config: cottontail::Config,
) {
    let store = FeatureStore::parse(store);
    let redis = cottontail::stores::RedisStore::connect(&store.redis_url, &store.prefix)
        .await
        .expect("the run's Redis");
    let feature_work = Duration::from_millis(if mode == "slow" { 100 } else { 20 });
    let state = |column: &str, mode: &str, work: Duration| ChaosState {
        ledger: ledger_of(ledger, column),
        mode: mode.to_owned(),
        work,
    };
    let workers = Workers {
        plain: ChaosState {
            ledger: ledger.clone(),
            mode: mode.to_owned(),
            work: chaos_work(mode),
        },
        retries: state("retries", "retrying", feature_work),
        ordered: state("ordered", "steady", feature_work),
        dedup: state("dedup", "steady", feature_work),
        schedule: state("schedule", "steady", feature_work),
        jobs: state("jobs", "steady", feature_work),
    };
    let recorded = |column: &str| -> Arc<dyn DedupStore> {
        Arc::new(Recorded {
            inner: Arc::new(redis.clone()),
            ledger: ledger_of(ledger, column),
        })
    };
    let queues = FeatureQueues::new(
        base,
        Arc::new(redis.clone()),
        recorded("dedup"),
        recorded("schedule"),
    );
    let every_second = cottontail::Schedule::new(&store.schedule, "* * * * * *").unwrap();
    App::new(workers)
        .job_store(redis.clone())
        .handler(
            chaos_queue(base, mode).track_jobs(false),
            chaos_on(|w| &w.plain),
        )
        .handler(queues.retries, chaos_on(|w| &w.retries))
        .handler(queues.ordered, ordered)
        .handler(queues.dedup, dedup)
        .schedule(every_second, queues.schedule, tick)
        .handler(queues.jobs, chaos_on(|w| &w.jobs))
        .run(config)
        .await
        .expect("chaos worker runs until SIGTERM");
}

#[cfg(not(feature = "redis"))]
pub async fn worker_main(_: &str, _: &Ledger, _: &str, _: &str, _: cottontail::Config) {
    panic!("features runs need the redis feature");
}
