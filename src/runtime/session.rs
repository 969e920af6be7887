//! Everything that lives as long as one connection: topology, publisher, consume loops,
//! ordered partitions and schedulers; a graceful drain or an abandon at the end.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use lapin::Connection;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::client::Publisher;
use crate::connection::{bounded, CLEANUP};
use crate::control::Control;
use crate::handler::BoxedHandler;
use crate::message::Context;
use crate::ops::health::Health;
use crate::ops::metrics::Metrics;
use crate::ops::status::RecentDeadLetters;
use crate::queue::Queue;
use crate::runtime::consume::{ConsumeLoop, Source};
use crate::runtime::job_writer::{JobRecorder, Jobs};
use crate::runtime::ordered;
use crate::runtime::pipeline::{Flow, Route, Worker};
use crate::runtime::scheduler;
use crate::runtime::topology;
use crate::schedule::Schedule;
use crate::Error;

/// A handler as registered: its queue settings and its middleware-wrapped handler.
pub(crate) struct Registered {
    pub(crate) queue: Arc<Queue>,
    pub(crate) service: BoxedHandler,
    /// Set on the queues of a workflow: which part of it.
    pub(crate) workflow: Option<Arc<crate::workflow::Role>>,
}

/// What every session of an app is built from.
pub(crate) struct Plan {
    pub(crate) handlers: Vec<Registered>,
    pub(crate) health: Arc<Health>,
    pub(crate) metrics: Metrics,
    pub(crate) jobs: Arc<Jobs>,
    pub(crate) schedules: Vec<(Arc<Schedule>, String)>,
    pub(crate) outputs: Vec<String>,
    pub(crate) instrumented: bool,
    pub(crate) recent: RecentDeadLetters,
    /// Checkpoints and cancellation.
    pub(crate) control: Arc<Control>,
    /// This instance's identity (connection name and a random part).
    pub(crate) owner: Arc<str>,
    /// The connection name, which consumer tags start with.
    pub(crate) name: String,
}

/// Everything that lives as long as one connection.
pub(crate) struct Session {
    /// Held until the connection is closed: dropping the last handle makes lapin close the
    /// channel on its own, which races our connection close and can leave it unresolved.
    pub(crate) _publisher: Publisher,
    pub(crate) failed: CancellationToken,
    pub(crate) stop: CancellationToken,
    pub(crate) abort: CancellationToken,
    pub(crate) loops: Vec<JoinHandle<()>>,
}

impl Session {
    pub(crate) async fn start(connection: &Arc<Connection>, sup: &Plan) -> Result<Session, Error> {
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
        // Cancels are heard before the first delivery is taken.
        session.loops.push(
            sup.control
                .listen(connection, publisher.clone(), session.stop.clone())
                .await
                .map_err(Error::broker)?,
        );
        for (index, h) in sup.handlers.iter().enumerate() {
            let make_worker = {
                let (h_queue, h_service) = (h.queue.clone(), h.service.clone());
                let context = Arc::new(Context {
                    handler: h.queue.handler().to_owned(),
                    queue: h.queue.name().to_owned(),
                    publisher: publisher.clone(),
                    store_down: Default::default(),
                    control: sup.control.clone(),
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
                let workflow = h.workflow.as_ref().map(|role| {
                    let name = &role.definition.name;
                    let own = !matches!(
                        role.kind,
                        crate::workflow::RoleKind::Entry | crate::workflow::RoleKind::Supervisor
                    );
                    let step = own
                        .then(|| h.queue.name().strip_prefix(&format!("{name}.")))
                        .flatten()
                        .map(|s| s.trim_end_matches(".compensate").trim_end_matches(".join"));
                    Flow {
                        role: role.clone(),
                        metrics: sup.metrics.workflow(name, step),
                        jobs: Some(JobRecorder::new(sup.jobs.clone(), name)),
                    }
                });
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
                    workflow: workflow.clone(),
                }
            };
            let consumer_tag = |n: usize| {
                let tag = format!("{}/{}/{n}", sup.name, h.queue.handler());
                lapin::types::ShortString::try_new(tag).unwrap_or_else(|_| "".into())
            };
            let route = if let Some(ordering) = &h.queue.ordering {
                // The entry queue only routes to partitions; partitions are owned by
                // `ordering::balance`.
                session.loops.push(tokio::spawn(ordered::balance(
                    h.queue.name().to_owned(),
                    ordering.clone(),
                    connection.clone(),
                    Arc::new(make_worker.clone()),
                    sup.metrics.ordering(h.queue.handler(), h.queue.name()),
                    crate::runtime::Lifecycle {
                        stop: session.stop.clone(),
                        failed: session.failed.clone(),
                        abort: session.abort.clone(),
                    },
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
                    let band = crate::names::band_queue(h.queue.name(), n);
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
        for (index, (schedule, target)) in sup.schedules.iter().enumerate() {
            let scheduler = scheduler::Scheduler {
                schedule: schedule.clone(),
                target: target.clone(),
                connection: connection.clone(),
                publisher: publisher.clone(),
                metrics: sup.metrics.schedule(schedule.name()),
                status: scheduler::Status {
                    health: sup.health.clone(),
                    index,
                },
            };
            session
                .loops
                .push(tokio::spawn(scheduler.run(session.stop.clone())));
        }
        tracing::info!(handlers = sup.handlers.len(), "consuming");
        Ok(session)
    }

    fn spawn_loop(&mut self, mut consume: ConsumeLoop, sup: &Plan, index: usize) {
        consume.stop = self.stop.clone();
        consume.failed = self.failed.clone();
        consume.abort = self.abort.clone();
        consume.health = Some((sup.health.clone(), index));
        self.loops.push(tokio::spawn(consume.run()));
    }

    /// Graceful: stop deliveries, let in-flight work finish (bounded), send the acks, close.
    /// Whatever did not finish stays unacked and the broker requeues it on close.
    pub(crate) async fn drain(self, connection: &Connection, limit: Duration) {
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
    pub(crate) async fn abandon(self, connection: &Connection) {
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
