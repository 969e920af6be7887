//! The `App` builder and the handle of a started app ([`Running`]); what runs it lives in
//! `runtime` (supervisor, session, consume loops).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::control::Control;
use crate::handler::{BoxedHandler, Handler, Middleware};
use crate::ops::health::Health;
use crate::ops::http;
use crate::ops::metrics::Metrics;
use crate::ops::status::RecentDeadLetters;
use crate::queue::Queue;
use crate::runtime::job_writer::Jobs;
use crate::runtime::session::{Plan, Registered};
use crate::runtime::supervisor::Supervisor;
use crate::schedule::Schedule;
use crate::stores::{
    CheckpointStore, JobStore, MemoryCheckpoints, MemoryJobs, DEFAULT_CHECKPOINT_TTL,
};
use crate::workflow::Workflow;
use crate::Error;

/// How often a workflow's supervisor looks for steps past their deadline (a cron pattern
/// with seconds).
const SUPERVISE_EVERY: &str = "*/2 * * * * *";

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
    middlewares: Vec<Middleware>,
    metrics: Metrics,
    jobs: Arc<dyn JobStore>,
    schedules: Vec<(Arc<Schedule>, String)>,
    outputs: Vec<String>,
    instrumented: bool,
    checkpoints: Arc<dyn CheckpointStore>,
    checkpoint_ttl: Duration,
    /// Registration mistakes, reported by `start` (builders cannot fail).
    errors: Vec<String>,
}

impl<S: Clone + Send + Sync + 'static> App<S> {
    /// An app whose handlers can extract `state` with [`State`](crate::State).
    pub fn new(state: S) -> Self {
        Self {
            state,
            handlers: Vec::new(),
            middlewares: Vec::new(),
            metrics: Metrics::default(),
            jobs: Arc::new(MemoryJobs::default()),
            schedules: Vec::new(),
            outputs: Vec::new(),
            instrumented: true,
            checkpoints: Arc::new(MemoryCheckpoints::default()),
            checkpoint_ttl: DEFAULT_CHECKPOINT_TTL,
            errors: Vec::new(),
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
        let service = BoxedHandler::from_handler(handler, self.state.clone());
        self.handlers.push(Registered {
            queue: Arc::new(queue),
            service,
            workflow: None,
        });
        self
    }

    /// Registers `workflow`: its entry queue, and a queue per step and compensation (see
    /// [`workflow`](crate::workflow)).
    pub fn workflow(mut self, workflow: Workflow<S>) -> Self {
        match workflow.into_handlers(&self.state) {
            Ok(handlers) => {
                for (queue, service, role) in handlers {
                    if role.kind == crate::workflow::RoleKind::Supervisor {
                        // The supervisor is a singleton the way schedules are: its ticks come
                        // from the one instance leading its schedule.
                        match Schedule::new(queue.name(), SUPERVISE_EVERY) {
                            Ok(schedule) => self
                                .schedules
                                .push((Arc::new(schedule), queue.name().to_owned())),
                            Err(error) => self.errors.push(error.to_string()),
                        }
                    }
                    self.handlers.push(Registered {
                        queue: Arc::new(queue),
                        service,
                        workflow: Some(role),
                    });
                }
            }
            Err(error) => self.errors.push(error),
        }
        self
    }

    /// Wraps every handler in a middleware (see [`from_fn`](crate::from_fn)); the last one
    /// added runs first.
    pub fn middleware(mut self, middleware: Middleware) -> Self {
        self.middlewares.push(middleware);
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

    /// Keeps long jobs' [`Checkpoint`](crate::Checkpoint)s (and cancelled message ids) in
    /// `store` instead of process memory: with Redis or PostgreSQL a job resumes from its
    /// checkpoint on any instance, and a cancel reaches instances that start after it was
    /// sent (each delivery of a message with a `message_id` then asks the store whether it was
    /// cancelled: one round trip).
    pub fn checkpoint_store(mut self, store: Arc<dyn CheckpointStore>) -> Self {
        self.checkpoints = store;
        self
    }

    /// How long a checkpoint outlives its last save when its job never ends (default
    /// [`DEFAULT_CHECKPOINT_TTL`], 7 days); a job that ends removes its checkpoint at once.
    pub fn checkpoint_ttl(mut self, ttl: Duration) -> Self {
        self.checkpoint_ttl = ttl;
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
        if let Some(error) = self.errors.first() {
            return Err(Error::Config(error.clone()));
        }
        for h in &self.handlers {
            h.queue.validate()?;
            h.queue.check_consumer_timeout(config.consumer_timeout)?;
            if h.workflow.is_some() && (h.queue.ordering.is_some() || h.queue.bands.is_some()) {
                return Err(Error::Config(format!(
                    "workflow queue '{}': ordering and priority bands do not apply to workflows",
                    h.queue.name()
                )));
            }
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
            self.schedules.iter().map(|(s, _)| s.name().to_owned()),
        ));
        let stop = CancellationToken::new();
        let recent = RecentDeadLetters::default();
        let jobs = Arc::new(Jobs::new(self.jobs.clone(), &self.metrics));
        let control = Arc::new(Control::new(self.checkpoints, self.checkpoint_ttl));
        let http_addr = match config.http_addr {
            Some(addr) => Some(
                http::serve(
                    addr,
                    config.api_token.as_deref(),
                    http::HttpState {
                        metrics: self.metrics.clone(),
                        health: health.clone(),
                        jobs: jobs.clone(),
                        recent: recent.clone(),
                        control: control.clone(),
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
                    .middlewares
                    .iter()
                    .fold(h.service, |service, layer| layer(service)),
                queue: h.queue,
                workflow: h.workflow,
            })
            .collect();
        let plan = Plan {
            handlers,
            health: health.clone(),
            metrics: self.metrics.clone(),
            jobs: jobs.clone(),
            schedules: self.schedules,
            outputs: self.outputs,
            instrumented: self.instrumented,
            recent,
            control,
            owner: format!("{}#{:08x}", config.connection_name, fastrand::u32(..)).into(),
            name: connector.name().to_owned(),
        };
        let supervisor = Supervisor {
            connector,
            shutdown_timeout: config.shutdown_timeout,
            plan,
        };
        // The job writer outlives the supervisor (statuses recorded while draining are written
        // too) and ends after it, even by a panic, with a last flush within the shutdown
        // timeout.
        let written = CancellationToken::new();
        let writer =
            tokio::spawn(jobs.write_until(stop.clone(), written.clone(), config.shutdown_timeout));
        let supervised = supervisor.run(stop.clone());
        let join = tokio::spawn(async move {
            let ended = written.drop_guard();
            let result = supervised.await;
            drop(ended);
            let _ = writer.await;
            result
        });
        Ok(Running {
            stop,
            health,
            join,
            http_addr,
        })
    }
}

fn flatten(result: Result<Result<(), Error>, tokio::task::JoinError>) -> Result<(), Error> {
    result.map_err(|e| Error::Internal(format!("supervisor task failed: {e}")))?
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
