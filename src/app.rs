//! The `App` builder and its supervisor: connect, declare, consume; reconnect on loss; drain
//! on shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};

use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, Consumer};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::acker::{AckBatch, Settle, ACK_DELAY, STRAGGLER_WAIT};
use crate::config::Config;
use crate::connection::{bounded, Connector, CLEANUP};
use crate::handler::{Handler, Layer, Service};
use crate::health::Health;
use crate::http;
use crate::jobs::{JobRecorder, JobStore, MemoryJobs};
use crate::message::Context;
use crate::metrics::Metrics;
use crate::ordering;
use crate::pipeline::{Route, Worker};
use crate::publisher::Publisher;
use crate::queue::Queue;
use crate::schedule::{self, Schedule};
use crate::status::RecentDeadLetters;
use crate::topology;
use crate::Error;

/// A set of handlers with their state, ready to run against a broker.
///
/// ```no_run
/// use cottontail::{App, Config, Json, Queue, State};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Deserialize)]
/// struct Greet { name: String }
/// #[derive(Serialize)]
/// struct Greeting { text: String }
///
/// async fn greet(State(prefix): State<String>, Json(req): Json<Greet>)
///     -> Result<Json<Greeting>, cottontail::HandlerError>
/// {
///     Ok(Json(Greeting { text: format!("{prefix}, {}!", req.name) }))
/// }
///
/// # async fn run() -> Result<(), cottontail::Error> {
/// App::new("Hello".to_string())
///     .handler(Queue::new("greetings").concurrency(8), greet)
///     .run(Config::from_env()?)
///     .await
/// # }
/// ```
pub struct App<S> {
    state: S,
    handlers: Vec<Registered>,
    layers: Vec<Layer>,
    metrics: Metrics,
    jobs: Arc<dyn JobStore>,
    schedules: Vec<(Arc<Schedule>, String)>,
    outputs: Vec<String>,
    instrumented: bool,
}

struct Registered {
    queue: Arc<Queue>,
    service: Service,
}

impl<S: Clone + Send + Sync + 'static> App<S> {
    /// An app whose handlers can extract `state` with [`State`](crate::State).
    pub fn new(state: S) -> Self {
        Self {
            state,
            handlers: Vec::new(),
            layers: Vec::new(),
            metrics: Metrics::default(),
            jobs: Arc::new(MemoryJobs::default()),
            schedules: Vec::new(),
            outputs: Vec::new(),
            instrumented: true,
        }
    }

    /// Turns per-message spans and per-handler metrics off (on by default). Exists to
    /// measure what they cost (see the benchmark); production services keep them on.
    pub fn instrumented(mut self, on: bool) -> Self {
        self.instrumented = on;
        self
    }

    /// Runs `handler` on `queue` on every tick of `schedule`, fired by exactly one instance
    /// of the fleet (see [`Schedule`]). The handler receives a [`Tick`](crate::Tick).
    pub fn schedule<H, Args>(mut self, schedule: Schedule, queue: Queue, handler: H) -> Self
    where
        H: Handler<Args, S>,
    {
        self.schedules
            .push((Arc::new(schedule), queue.name().to_owned()));
        self.handler(queue, handler)
    }

    /// Declares a durable (quorum) queue that handlers publish results into, so it exists
    /// before the first publish (publishes are `mandatory`).
    pub fn output(mut self, queue: impl Into<String>) -> Self {
        self.outputs.push(queue.into());
        self
    }

    /// Registers `handler` on `queue`.
    pub fn handler<H, Args>(mut self, queue: Queue, handler: H) -> Self
    where
        H: Handler<Args, S>,
    {
        let service = Service::from_handler(handler, self.state.clone());
        self.handlers.push(Registered {
            queue: Arc::new(queue),
            service,
        });
        self
    }

    /// Wraps every handler in a middleware (see [`from_fn`](crate::from_fn)); the last layer
    /// added runs first.
    pub fn layer(mut self, layer: Layer) -> Self {
        self.layers.push(layer);
        self
    }

    /// Uses `metrics` (and its registry) instead of a fresh one.
    pub fn with_metrics(mut self, metrics: Metrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// Stores job statuses (`/jobs/{message_id}`) in `store` instead of process memory.
    pub fn job_store(mut self, store: impl JobStore) -> Self {
        self.jobs = Arc::new(store);
        self
    }

    /// The same, with a store shared with other parts of the service.
    pub fn shared_job_store(mut self, store: Arc<dyn JobStore>) -> Self {
        self.jobs = store;
        self
    }

    /// The app's metrics; register your own in its registry.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Runs until SIGTERM or SIGINT, then drains in-flight work (bounded by the configured
    /// shutdown timeout) and returns.
    pub async fn run(self, config: Config) -> Result<(), Error> {
        let running = self.start(config).await?;
        let stop = running.stop.clone();
        let mut join = running.join;
        tokio::select! {
            result = &mut join => return flatten(result),
            _ = shutdown_signal() => tracing::info!("shutdown signal received; draining"),
        }
        stop.cancel();
        flatten(join.await)
    }

    /// Starts the app in the background (binding HTTP first, so a taken port fails here).
    pub async fn start(self, config: Config) -> Result<Running, Error> {
        for h in &self.handlers {
            h.queue.validate()?;
        }
        let mut names: Vec<&str> = self.handlers.iter().map(|h| h.queue.name()).collect();
        names.sort_unstable();
        if let Some(pair) = names.windows(2).find(|w| w[0] == w[1]) {
            return Err(Error::Config(format!(
                "two handlers registered on queue '{}'",
                pair[0]
            )));
        }
        let connector = config.connector()?;
        let health = Arc::new(Health::new(
            self.handlers.iter().map(|h| h.queue.handler().to_owned()),
        ));
        let stop = CancellationToken::new();
        let recent = RecentDeadLetters::default();
        let http_addr = match config.http_addr {
            Some(addr) => Some(
                http::serve(
                    addr,
                    http::HttpState {
                        metrics: self.metrics.clone(),
                        health: health.clone(),
                        jobs: self.jobs.clone(),
                        recent: recent.clone(),
                    },
                    stop.child_token(),
                )
                .await?,
            ),
            None => None,
        };
        let handlers: Vec<Registered> = self
            .handlers
            .into_iter()
            .map(|h| Registered {
                service: self
                    .layers
                    .iter()
                    .fold(h.service, |service, layer| layer(service)),
                queue: h.queue,
            })
            .collect();
        let supervisor = Supervisor {
            connector,
            handlers,
            health: health.clone(),
            metrics: self.metrics.clone(),
            shutdown_timeout: config.shutdown_timeout,
            jobs: self.jobs.clone(),
            schedules: self.schedules,
            outputs: self.outputs,
            instrumented: self.instrumented,
            recent,
            owner: format!("{}#{:08x}", config.connection_name, fastrand::u32(..)).into(),
        };
        let join = tokio::spawn(supervisor.run(stop.clone()));
        Ok(Running {
            stop,
            health,
            join,
            http_addr,
        })
    }
}

fn flatten(result: Result<Result<(), Error>, tokio::task::JoinError>) -> Result<(), Error> {
    result.map_err(|e| Error::Config(format!("supervisor task failed: {e}")))?
}

/// A started app.
pub struct Running {
    stop: CancellationToken,
    health: Arc<Health>,
    join: JoinHandle<Result<(), Error>>,
    http_addr: Option<SocketAddr>,
}

impl Running {
    /// Connection and consumer status.
    pub fn health(&self) -> &Arc<Health> {
        &self.health
    }

    /// The bound HTTP address, when HTTP is enabled.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    /// Waits until every handler consumes, or `limit` passes (returns readiness).
    pub async fn wait_ready(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        while !self.health.is_ready() {
            if tokio::time::Instant::now() >= deadline || self.join.is_finished() {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    /// Starts a graceful shutdown without waiting for it.
    pub fn shutdown(&self) {
        self.stop.cancel();
    }

    /// Shuts down gracefully and waits for the drain to finish.
    pub async fn stop(self) -> Result<(), Error> {
        self.stop.cancel();
        flatten(self.join.await)
    }

    /// Waits for the app to end (after [`Running::shutdown`] or a fatal error).
    pub async fn join(self) -> Result<(), Error> {
        flatten(self.join.await)
    }
}

struct Supervisor {
    connector: Connector,
    handlers: Vec<Registered>,
    health: Arc<Health>,
    metrics: Metrics,
    shutdown_timeout: Duration,
    jobs: Arc<dyn JobStore>,
    schedules: Vec<(Arc<Schedule>, String)>,
    outputs: Vec<String>,
    instrumented: bool,
    recent: RecentDeadLetters,
    owner: Arc<str>,
}

impl Supervisor {
    async fn run(self, stop: CancellationToken) -> Result<(), Error> {
        let mut sessions = 0u64;
        loop {
            let Some(connection) = self.connector.connect(stop.cancelled()).await else {
                return Ok(());
            };
            let connection = Arc::new(connection);
            sessions += 1;
            if sessions > 1 {
                self.metrics.recovered();
            }
            self.health.set_connected(true);
            self.metrics.set_connected(true);
            let result = Session::start(&connection, &self).await;
            let session = match result {
                Ok(session) => session,
                Err(e) => {
                    self.health.set_connected(false);
                    self.metrics.set_connected(false);
                    let _ = bounded(CLEANUP, connection.close(200, "setup failed".into())).await;
                    if matches!(e, Error::QueueMismatch(_) | Error::Config(_)) {
                        tracing::error!(error = %e, "cannot start");
                        return Err(e);
                    }
                    tracing::warn!(error = %e, "session setup failed; reconnecting");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                        _ = stop.cancelled() => return Ok(()),
                    }
                }
            };
            tokio::select! {
                _ = session.failed.cancelled() => {
                    tracing::warn!("connection lost; reconnecting");
                    self.health.set_connected(false);
                    self.metrics.set_connected(false);
                    session.abandon(&connection).await;
                }
                _ = stop.cancelled() => {
                    session.drain(&connection, self.shutdown_timeout).await;
                    self.health.set_connected(false);
                    self.metrics.set_connected(false);
                    return Ok(());
                }
            }
        }
    }
}

/// Everything that lives as long as one connection.
struct Session {
    /// Held until the connection is closed: dropping the last handle makes lapin close the
    /// channel on its own, which races our connection close and can leave it unresolved.
    _publisher: Publisher,
    failed: CancellationToken,
    stop: CancellationToken,
    abort: CancellationToken,
    loops: Vec<JoinHandle<()>>,
}

impl Session {
    async fn start(connection: &Arc<Connection>, sup: &Supervisor) -> Result<Session, Error> {
        for h in &sup.handlers {
            topology::declare(connection, &h.queue).await?;
        }
        for output in &sup.outputs {
            topology::declare_output(connection, output).await?;
        }
        let failed = CancellationToken::new();
        watch_connection(connection, failed.clone());
        let publisher = Publisher::new(connection.create_channel().await.map_err(Error::broker)?)
            .await
            .map_err(Error::broker)?
            .with_confirm_histogram(sup.metrics.confirm_histogram());
        let mut session = Session {
            _publisher: publisher.clone(),
            failed,
            stop: CancellationToken::new(),
            abort: CancellationToken::new(),
            loops: Vec::new(),
        };
        for (index, h) in sup.handlers.iter().enumerate() {
            let make_worker = {
                let (h_queue, h_service) = (h.queue.clone(), h.service.clone());
                let context = Arc::new(Context {
                    handler: h.queue.handler().to_owned(),
                    queue: h.queue.name().to_owned(),
                    publisher: publisher.clone(),
                });
                // Uninstrumented: the handles count into a registry nobody exports.
                let metrics = if sup.instrumented {
                    sup.metrics.handler(h.queue.handler(), h.queue.name())
                } else {
                    Metrics::default().handler(h.queue.handler(), h.queue.name())
                };
                let instrumented = sup.instrumented;
                let failed = session.failed.clone();
                let owner = sup.owner.clone();
                let recent = sup.recent.clone();
                let claims = Arc::new(std::sync::atomic::AtomicU64::new(0));
                let jobs = h
                    .queue
                    .track_jobs
                    .then(|| JobRecorder::new(sup.jobs.clone(), h.queue.handler()));
                move || Worker {
                    queue: h_queue.clone(),
                    service: h_service.clone(),
                    context: context.clone(),
                    metrics: metrics.clone(),
                    session_failed: failed.clone(),
                    owner: owner.clone(),
                    recent: recent.clone(),
                    claims: claims.clone(),
                    jobs: jobs.clone(),
                    route: None,
                    instrumented,
                }
            };
            let consumer_tag = |n: usize| {
                let tag = format!("{}/{}/{n}", sup.connector.name(), h.queue.handler());
                lapin::types::ShortString::try_new(tag).unwrap_or_else(|_| "".into())
            };
            let route = if let Some(ordering) = &h.queue.ordering {
                // The entry queue only routes to partitions; partitions are owned by
                // `ordering::balance`.
                session.loops.push(tokio::spawn(ordering::balance(
                    h.queue.name().to_owned(),
                    ordering.clone(),
                    connection.clone(),
                    Arc::new(make_worker.clone()),
                    sup.metrics.ordering(h.queue.handler(), h.queue.name()),
                    session.stop.clone(),
                    session.failed.clone(),
                )));
                Some(Route::Partitions(ordering.partitions))
            } else {
                h.queue.bands.clone().map(Route::Bands)
            };
            let shares = match route {
                // Routers: one consumer, a deep window of routing publishes.
                Some(_) => vec![(entry_prefetch(&h.queue), usize::from(ROUTER_WINDOW))],
                None => h.queue.consumer_shares(),
            };
            let mut router = None;
            for (n, (prefetch, concurrency)) in shares.into_iter().enumerate() {
                let mut worker = make_worker();
                worker.route = route.clone();
                let source = Source::open(
                    connection,
                    h.queue.name(),
                    prefetch,
                    consumer_tag(n),
                    worker,
                )
                .await?;
                let consume = ConsumeLoop::new(vec![source], concurrency);
                router = Some(consume.in_flight.clone());
                session.spawn_loop(consume, sup, index);
            }
            if let Some(bands) = &h.queue.bands {
                let mut sources = Vec::new();
                for (n, (_, weight)) in bands.levels.iter().enumerate() {
                    let band = crate::queue::band_queue(h.queue.name(), n);
                    let prefetch = h.queue.prefetch_count();
                    let mut source =
                        Source::open(connection, &band, prefetch, "".into(), make_worker()).await?;
                    source.weight = *weight;
                    sources.push(source);
                }
                let mut bands_loop = ConsumeLoop::new(sources, h.queue.effective_concurrency());
                bands_loop.sort_first = Some((
                    connection.clone(),
                    h.queue.name().to_owned(),
                    router.unwrap_or_default(),
                ));
                session.spawn_loop(bands_loop, sup, index);
            }
            sup.health.set_consuming(index, true);
        }
        for (schedule, target) in &sup.schedules {
            session.loops.push(tokio::spawn(schedule::run(
                schedule.clone(),
                target.clone(),
                connection.clone(),
                publisher.clone(),
                sup.metrics.schedule(schedule.name()),
                session.stop.clone(),
            )));
        }
        tracing::info!(handlers = sup.handlers.len(), "consuming");
        Ok(session)
    }

    fn spawn_loop(&mut self, mut consume: ConsumeLoop, sup: &Supervisor, index: usize) {
        consume.stop = self.stop.clone();
        consume.failed = self.failed.clone();
        consume.abort = self.abort.clone();
        consume.health = Some((sup.health.clone(), index));
        self.loops.push(tokio::spawn(consume.run()));
    }

    /// Graceful: stop deliveries, let in-flight work finish (bounded), send the acks, close.
    /// Whatever did not finish stays unacked and the broker requeues it on close.
    async fn drain(self, connection: &Connection, limit: Duration) {
        self.stop.cancel();
        let abort = self.abort.clone();
        let deadline = tokio::spawn(async move {
            tokio::time::sleep(limit).await;
            tracing::warn!(
                ?limit,
                "shutdown timeout: unfinished messages go back to the queue"
            );
            abort.cancel();
        });
        for handle in self.loops {
            // A loop ends once its in-flight messages are done and acked, or at the deadline.
            let _ = bounded(limit + CLEANUP, handle).await;
        }
        deadline.abort();
        // Our own close is not a failure: stop watching first.
        self.failed.cancel();
        let _ = bounded(CLEANUP, connection.close(200, "shutdown".into())).await;
        tracing::info!("drained and closed");
    }

    /// After a lost connection: stop everything; the broker has requeued what was unacked.
    /// Every step is time-limited: the connection may be half dead.
    async fn abandon(self, connection: &Connection) {
        self.stop.cancel();
        self.abort.cancel();
        for handle in self.loops {
            let _ = bounded(CLEANUP, handle).await;
        }
        let _ = bounded(CLEANUP, connection.close(200, "recovering".into())).await;
    }
}

fn watch_connection(connection: &Connection, failed: CancellationToken) {
    let mut events = connection.events_listener();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                event = events.next() => match event {
                    Some(lapin::Event::Error(error)) if is_channel_error(&error) => {
                        // A channel-level (soft) error closes that channel only; whoever
                        // used it handles it. The connection is fine.
                        tracing::debug!(error = %crate::connection::redact(&error.to_string()), "channel error");
                    }
                    Some(lapin::Event::Error(error)) => {
                        tracing::warn!(error = %crate::connection::redact(&error.to_string()), "connection error");
                        failed.cancel();
                        return;
                    }
                    Some(_) => {}
                    None => { failed.cancel(); return; }
                },
                _ = failed.cancelled() => return,
            }
        }
    });
}

fn is_channel_error(error: &lapin::Error) -> bool {
    matches!(
        error.kind(),
        lapin::ErrorKind::ProtocolError(e) if matches!(e.kind(), lapin::protocol::AMQPErrorKind::Soft(_))
    )
}

/// Entry queues of ordered and banded handlers only route (one confirmed publish each):
/// a deep window keeps routing far ahead of handling.
const ROUTER_WINDOW: u16 = 256;

fn entry_prefetch(queue: &Queue) -> u16 {
    if queue.ordering.is_some() || queue.bands.is_some() {
        queue.prefetch_count().max(ROUTER_WINDOW)
    } else {
        queue.prefetch_count()
    }
}

/// One queue a consume loop takes deliveries from, on its own channel (so its own
/// delivery tags and acks).
struct Source {
    worker: Arc<Worker>,
    /// Priority bands: picks in a row before a lower band with work gets one.
    weight: u32,
    channel: Channel,
    consumer: Consumer,
    acks: AckBatch,
    peeked: Option<Next>,
}

impl Source {
    async fn open(
        connection: &Connection,
        queue: &str,
        prefetch: u16,
        tag: lapin::types::ShortString,
        worker: Worker,
    ) -> Result<Source, Error> {
        let channel = connection.create_channel().await.map_err(Error::broker)?;
        channel
            .basic_qos(prefetch, BasicQosOptions { global: false })
            .await
            .map_err(Error::broker)?;
        let consumer = channel
            .basic_consume(
                queue.into(),
                tag,
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(Error::broker)?;
        Ok(Source {
            worker: Arc::new(worker),
            weight: 1,
            acks: AckBatch::new(channel.clone(), prefetch),
            channel,
            consumer,
            peeked: None,
        })
    }
}

/// One task that consumes, runs the handler and acks: deliveries become handler futures
/// polled right here (no task per message, no hand-off to an ack task), and their verdicts
/// go into each channel's [`AckBatch`], flushed whenever the task runs out of ready work.
/// Parallelism across cores comes from several loops per queue
/// ([`Queue::consumers`](crate::Queue::consumers)).
struct ConsumeLoop {
    /// Priority bands: highest first.
    sources: Vec<Source>,
    /// Banded handlers: wait for the entry queue's backlog to be sorted into bands before
    /// taking work, so a backlog's urgent messages are seen before its older routine ones
    /// (the entry queue, and the router's in-flight count: 0 = nothing being routed).
    sort_first: Option<(Arc<Connection>, String, Arc<AtomicUsize>)>,
    /// Handler runs at once in this loop.
    limit: usize,
    /// Handler runs in flight right now (watched by `sort_first` of a band loop).
    in_flight: Arc<AtomicUsize>,
    stop: CancellationToken,
    failed: CancellationToken,
    abort: CancellationToken,
    health: Option<(Arc<Health>, usize)>,
}

/// Runs one delivery; a panic outside the handler (which is caught inside) requeues it.
async fn run_one(worker: Arc<Worker>, source: usize, delivery: Delivery) -> (usize, u64, Settle) {
    let tag = delivery.delivery_tag;
    let settle = AssertUnwindSafe(worker.process(delivery))
        .catch_unwind()
        .await
        .unwrap_or_else(|_| {
            tracing::error!(handler = %worker.queue.handler(), "pipeline panicked; message requeued");
            Settle::Requeue
        });
    (source, tag, settle)
}

/// An empty set of `run`'s futures (names their type before the first push).
fn in_flight_set<F: std::future::Future>(
    _run: fn(Arc<Worker>, usize, Delivery) -> F,
) -> FuturesUnordered<F> {
    FuturesUnordered::new()
}

impl ConsumeLoop {
    fn new(sources: Vec<Source>, limit: usize) -> Self {
        Self {
            sources,
            sort_first: None,
            limit: limit.max(1),
            in_flight: Arc::default(),
            stop: CancellationToken::new(),
            failed: CancellationToken::new(),
            abort: CancellationToken::new(),
            health: None,
        }
    }

    /// Takes deliveries while fewer than `limit` run. With several sources (priority bands,
    /// highest first) the highest band with a delivery ready goes first, except that after
    /// `weight` picks in a row a lower band with work gets one, so low priorities keep moving
    /// under a steady stream of urgent work.
    async fn run(mut self) {
        let Some(first) = self.sources.first() else {
            return;
        };
        let handler = first.worker.queue.handler().to_owned();
        if let Some((connection, entry, router)) = self.sort_first.take() {
            sort_backlog_first(&connection, &entry, &router, &self.stop).await;
        }
        let mut running = in_flight_set(run_one);
        let mut streak = 0u32;
        let (stop, failed) = (self.stop.clone(), self.failed.clone());
        let (stopped, lost) = (stop.cancelled(), failed.cancelled());
        tokio::pin!(stopped, lost);
        // Finished tags waiting behind an unfinished one are acked alone when this fires.
        let stragglers = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(stragglers);
        let mut stragglers_armed = false;
        // Verdicts not yet sent are flushed this long after the loop runs out of ready work
        // (or at once when a batch fills): small acks are what costs a quorum queue most.
        let flush_at = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(flush_at);
        let mut flush_armed = false;
        while !stop.is_cancelled() && !failed.is_cancelled() {
            tokio::select! {
                biased;
                Some((source, tag, how)) = running.next(), if !running.is_empty() => {
                    if self.sources[source].acks.settle(tag, how) {
                        self.flush(&mut stragglers_armed, stragglers.as_mut());
                    }
                }
                next = next_delivery(&mut self.sources, &mut streak), if running.len() < self.limit => match next {
                    (source, Some(Ok(delivery))) => {
                        running.push(run_one(self.sources[source].worker.clone(), source, delivery));
                    }
                    (_, Some(Err(error))) => {
                        tracing::warn!(%handler, error = %crate::connection::redact(&error.to_string()), "consumer failed");
                        failed.cancel();
                    }
                    (_, None) => {
                        tracing::warn!(%handler, "consumer cancelled by the broker");
                        failed.cancel();
                    }
                },
                () = &mut stragglers, if stragglers_armed => {
                    stragglers_armed = false;
                    for source in &mut self.sources {
                        source.acks.release_stragglers();
                    }
                }
                () = &mut stopped => {}
                () = &mut lost => {}
                () = &mut flush_at, if flush_armed => {
                    flush_armed = false;
                    self.flush(&mut stragglers_armed, stragglers.as_mut());
                }
                // Nothing else ready: send what has been settled soon.
                () = std::future::ready(()), if !flush_armed && self.unflushed() => {
                    flush_armed = true;
                    flush_at.as_mut().reset(tokio::time::Instant::now() + ACK_DELAY);
                }
            }
            self.in_flight.store(running.len(), AtomicOrdering::Relaxed);
        }
        if let Some((health, index)) = &self.health {
            health.set_consuming(*index, false);
        }
        if failed.is_cancelled() {
            // The connection is going away: the broker requeues everything unacked.
            return;
        }
        // Stop: no new deliveries (the ones prefetched stay unacked and go back to the queue
        // when the channel closes); let the running ones finish until the abort, then ack.
        let cancels = self
            .sources
            .iter()
            .map(|s| (s.channel.clone(), s.consumer.tag()))
            .collect::<Vec<_>>();
        let cancel = async move {
            for (channel, tag) in cancels {
                let cancel = channel.basic_cancel(tag, BasicCancelOptions::default());
                let _ = bounded(CLEANUP, cancel).await;
            }
        };
        let finish = async {
            let aborted = self.abort.cancelled();
            tokio::pin!(aborted);
            loop {
                tokio::select! {
                    biased;
                    () = &mut aborted => break,
                    done = running.next() => match done {
                        Some((source, tag, how)) => {
                            self.sources[source].acks.settle(tag, how);
                        }
                        None => break,
                    },
                }
            }
            drop(running);
            for source in &mut self.sources {
                let _ = bounded(CLEANUP, source.acks.finish()).await;
            }
        };
        futures::join!(cancel, finish);
        // Closed here, not by lapin when the last handle drops: that close would race the
        // connection close that follows and could leave it unresolved (a hung stop).
        let closes = self
            .sources
            .iter()
            .map(|s| bounded(CLEANUP, s.channel.close(200, "stopped".into())));
        futures::future::join_all(closes).await;
    }

    fn unflushed(&self) -> bool {
        self.sources.iter().any(|s| s.acks.unflushed())
    }

    fn flush(&mut self, armed: &mut bool, timer: std::pin::Pin<&mut tokio::time::Sleep>) {
        let mut stragglers = false;
        for source in &mut self.sources {
            stragglers |= source.acks.flush();
        }
        if stragglers && !*armed {
            *armed = true;
            timer.reset(tokio::time::Instant::now() + STRAGGLER_WAIT);
        }
    }
}

/// How long a banded handler waits at most for its entry backlog to be sorted.
const SORT_GRACE: Duration = Duration::from_secs(5);

async fn sort_backlog_first(
    connection: &Connection,
    entry: &str,
    router: &AtomicUsize,
    stop: &CancellationToken,
) {
    let deadline = tokio::time::Instant::now() + SORT_GRACE;
    while tokio::time::Instant::now() < deadline && !stop.is_cancelled() {
        let Ok(channel) = connection.create_channel().await else {
            return;
        };
        let ready = channel
            .queue_declare(
                entry.into(),
                lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map(|q| q.message_count());
        let _ = bounded(CLEANUP, channel.close(200, "".into())).await;
        match ready {
            Ok(0) if router.load(AtomicOrdering::Relaxed) == 0 => return,
            Ok(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            Err(_) => return,
        }
    }
}

type Next = Option<Result<lapin::message::Delivery, lapin::Error>>;

/// The next delivery by band preference (see [`ConsumeLoop::run`]), waiting if none is ready.
/// A delivery looked at but not chosen stays in its source's `peeked` slot for a later pick.
async fn next_delivery(sources: &mut [Source], streak: &mut u32) -> (usize, Next) {
    if sources.len() == 1 {
        return (0, sources[0].consumer.next().await);
    }
    for source in sources.iter_mut() {
        if source.peeked.is_none() {
            source.peeked = source.consumer.next().now_or_never();
        }
    }
    let mut ready = sources
        .iter()
        .enumerate()
        .filter(|(_, s)| s.peeked.is_some())
        .map(|(band, _)| band);
    let chosen = match (ready.next(), ready.next()) {
        (Some(best), Some(lower)) if *streak >= sources[best].weight => {
            *streak = 0;
            Some(lower)
        }
        (Some(best), _) => {
            *streak += 1;
            Some(best)
        }
        (None, _) => None,
    };
    if let Some(band) = chosen {
        if let Some(item) = sources[band].peeked.take() {
            return (band, item);
        }
    }
    let nexts = sources.iter_mut().map(|s| Box::pin(s.consumer.next()));
    let (item, band, _) = futures::future::select_all(nexts).await;
    *streak = 0;
    (band, item)
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
