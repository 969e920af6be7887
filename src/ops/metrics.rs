//! Prometheus metrics. Per-handler handles are resolved once at registration, so recording a
//! message is a few atomic adds, with no label hashing on the hot path.

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

/// The app's metric families, in a registry applications can add their own metrics to.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    messages: IntCounterVec,
    duration: HistogramVec,
    in_flight: IntGaugeVec,
    age: HistogramVec,
    retries: IntCounterVec,
    dead_letters: IntCounterVec,
    deferred: IntCounterVec,
    replies: IntCounterVec,
    connection_up: IntGauge,
    recoveries: IntCounter,
    confirm_seconds: Histogram,
    schedule_fires: IntCounterVec,
    schedule_leader: IntGaugeVec,
    ordering_held: IntGaugeVec,
    ordering_holds: IntCounterVec,
    ordering_parked: IntCounterVec,
    ordering_gaps: IntGaugeVec,
    ordering_skipped: IntCounterVec,
    ordering_partitions: IntGaugeVec,
    job_status_dropped: IntCounterVec,
    workflows_started: IntCounterVec,
    workflows_completed: IntCounterVec,
    workflows_compensated: IntCounterVec,
    workflows_failed: IntCounterVec,
    workflow_deadlines: IntCounterVec,
    compensation_failures: IntCounterVec,
    step_duration: HistogramVec,
}

const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];
const AGE_BUCKETS: &[f64] = &[
    0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 21600.0, 86400.0,
];

impl Default for Metrics {
    fn default() -> Self {
        Self::new(Registry::new())
    }
}

impl Metrics {
    /// Registers cottontail's families in `registry`.
    pub fn new(registry: Registry) -> Self {
        let hl = &["handler", "queue"];
        let messages = IntCounterVec::new(
            Opts::new("cottontail_messages_total", "Messages settled, by outcome"),
            &["handler", "queue", "outcome"],
        )
        .expect("static metric definition");
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "cottontail_handler_duration_seconds",
                "Time spent in the handler per attempt",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            hl,
        )
        .expect("static metric definition");
        let in_flight = IntGaugeVec::new(
            Opts::new("cottontail_in_flight", "Messages being handled now"),
            hl,
        )
        .expect("static metric definition");
        let age = HistogramVec::new(
            HistogramOpts::new(
                "cottontail_message_age_seconds",
                "Now minus the message's timestamp property, at delivery",
            )
            .buckets(AGE_BUCKETS.to_vec()),
            hl,
        )
        .expect("static metric definition");
        let retries = IntCounterVec::new(
            Opts::new(
                "cottontail_retries_total",
                "Retries scheduled, by failed attempt number",
            ),
            &["handler", "queue", "attempt"],
        )
        .expect("static metric definition");
        let dead_letters = IntCounterVec::new(
            Opts::new(
                "cottontail_dead_letters_total",
                "Dead-lettered messages, by error kind",
            ),
            &["handler", "queue", "kind"],
        )
        .expect("static metric definition");
        let deferred = IntCounterVec::new(
            Opts::new(
                "cottontail_deferred_total",
                "Messages put back in the broker for later without spending an attempt, by reason",
            ),
            &["handler", "queue", "reason"],
        )
        .expect("static metric definition");
        let replies = IntCounterVec::new(
            Opts::new("cottontail_replies_total", "Replies sent, by x-status"),
            &["handler", "queue", "status"],
        )
        .expect("static metric definition");
        let connection_up = IntGauge::new(
            "cottontail_connection_up",
            "1 while connected to the broker",
        )
        .expect("static metric definition");
        let recoveries = IntCounter::new(
            "cottontail_connection_recoveries_total",
            "Reconnections after a lost connection",
        )
        .expect("static metric definition");
        let confirm_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "cottontail_publish_confirm_seconds",
                "Time from publish to broker confirm",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
        )
        .expect("static metric definition");
        let schedule_fires = IntCounterVec::new(
            Opts::new(
                "cottontail_schedule_fires_total",
                "Schedule ticks fired by this instance",
            ),
            &["schedule"],
        )
        .expect("static metric definition");
        let schedule_leader = IntGaugeVec::new(
            Opts::new(
                "cottontail_schedule_leader",
                "1 while this instance leads the schedule",
            ),
            &["schedule"],
        )
        .expect("static metric definition");
        let ordering_held = IntGaugeVec::new(
            Opts::new(
                "cottontail_ordering_held",
                "Out-of-order messages held in memory",
            ),
            hl,
        )
        .expect("static metric definition");
        let ordering_holds = IntCounterVec::new(
            Opts::new(
                "cottontail_ordering_holds_total",
                "Messages that arrived ahead of their key's next number",
            ),
            hl,
        )
        .expect("static metric definition");
        let ordering_parked = IntCounterVec::new(
            Opts::new(
                "cottontail_ordering_parked_total",
                "Held messages parked in the broker (hold limit)",
            ),
            hl,
        )
        .expect("static metric definition");
        let ordering_gaps = IntGaugeVec::new(
            Opts::new(
                "cottontail_ordering_gaps",
                "Keys waiting for a missing number past the gap timeout",
            ),
            hl,
        )
        .expect("static metric definition");
        let ordering_skipped = IntCounterVec::new(
            Opts::new(
                "cottontail_ordering_gap_actions_total",
                "Gap timeouts acted on (skipped or dead-lettered)",
            ),
            hl,
        )
        .expect("static metric definition");
        let ordering_partitions = IntGaugeVec::new(
            Opts::new(
                "cottontail_ordering_partitions_owned",
                "Partitions this instance consumes",
            ),
            hl,
        )
        .expect("static metric definition");
        let job_status_dropped = IntCounterVec::new(
            Opts::new(
                "cottontail_job_status_dropped_total",
                "Job statuses not recorded: the buffer was full, or the store failed",
            ),
            &["reason"],
        )
        .expect("static metric definition");
        let workflow_counter = |name: &str, help: &str| {
            IntCounterVec::new(Opts::new(name, help), &["workflow"])
                .expect("static metric definition")
        };
        let workflows_started =
            workflow_counter("cottontail_workflows_started_total", "Workflows started");
        let workflows_completed = workflow_counter(
            "cottontail_workflows_completed_total",
            "Workflows whose every step completed (final ok reply)",
        );
        let workflows_compensated = workflow_counter(
            "cottontail_workflows_compensated_total",
            "Workflows that failed at a step and were compensated (final error reply)",
        );
        let workflows_failed = workflow_counter(
            "cottontail_workflows_failed_total",
            "Workflows without compensations that failed at a step (final error reply)",
        );
        let workflow_deadlines = IntCounterVec::new(
            Opts::new(
                "cottontail_workflow_deadlines_total",
                "Workflow steps past their deadline, by what the supervisor did (redispatched, compensated)",
            ),
            &["workflow", "action"],
        )
        .expect("static metric definition");
        let compensation_failures = IntCounterVec::new(
            Opts::new(
                "cottontail_workflow_compensation_failures_total",
                "Compensations dead-lettered (compensation_failed): something is left to undo by hand",
            ),
            &["workflow", "step"],
        )
        .expect("static metric definition");
        let step_duration = HistogramVec::new(
            HistogramOpts::new(
                "cottontail_workflow_step_duration_seconds",
                "Time of a workflow step's successful run (its handler, immediate retries included)",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["workflow", "step"],
        )
        .expect("static metric definition");
        for c in [
            Box::new(messages.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(duration.clone()),
            Box::new(in_flight.clone()),
            Box::new(age.clone()),
            Box::new(retries.clone()),
            Box::new(dead_letters.clone()),
            Box::new(deferred.clone()),
            Box::new(replies.clone()),
            Box::new(connection_up.clone()),
            Box::new(recoveries.clone()),
            Box::new(confirm_seconds.clone()),
            Box::new(schedule_fires.clone()),
            Box::new(schedule_leader.clone()),
            Box::new(ordering_held.clone()),
            Box::new(ordering_holds.clone()),
            Box::new(ordering_parked.clone()),
            Box::new(ordering_gaps.clone()),
            Box::new(ordering_skipped.clone()),
            Box::new(ordering_partitions.clone()),
            Box::new(job_status_dropped.clone()),
            Box::new(workflows_started.clone()),
            Box::new(workflows_completed.clone()),
            Box::new(workflows_compensated.clone()),
            Box::new(workflows_failed.clone()),
            Box::new(workflow_deadlines.clone()),
            Box::new(compensation_failures.clone()),
            Box::new(step_duration.clone()),
        ] {
            // Registering twice in one registry is the only failure; ignore it so two apps
            // can share a registry.
            let _ = registry.register(c);
        }
        Self {
            registry,
            messages,
            duration,
            in_flight,
            age,
            retries,
            dead_letters,
            deferred,
            replies,
            connection_up,
            recoveries,
            confirm_seconds,
            schedule_fires,
            schedule_leader,
            ordering_held,
            ordering_holds,
            ordering_parked,
            ordering_gaps,
            ordering_skipped,
            ordering_partitions,
            job_status_dropped,
            workflows_started,
            workflows_completed,
            workflows_compensated,
            workflows_failed,
            workflow_deadlines,
            compensation_failures,
            step_duration,
        }
    }

    /// One queue of a workflow's handles (`step` is `None` for the entry queue).
    pub(crate) fn workflow(&self, workflow: &str, step: Option<&str>) -> WorkflowMetrics {
        WorkflowMetrics {
            started: self.workflows_started.with_label_values(&[workflow]),
            completed: self.workflows_completed.with_label_values(&[workflow]),
            compensated: self.workflows_compensated.with_label_values(&[workflow]),
            failed: self.workflows_failed.with_label_values(&[workflow]),
            redispatched: self
                .workflow_deadlines
                .with_label_values(&[workflow, "redispatched"]),
            deadline_compensated: self
                .workflow_deadlines
                .with_label_values(&[workflow, "compensated"]),
            step: step.map(|step| StepMetrics {
                compensation_failures: self
                    .compensation_failures
                    .with_label_values(&[workflow, step]),
                duration: self.step_duration.with_label_values(&[workflow, step]),
            }),
        }
    }

    /// Job statuses not recorded for `reason` (`buffer_full`, `store_error`).
    pub(crate) fn job_status_dropped(&self, reason: &str) -> IntCounter {
        self.job_status_dropped.with_label_values(&[reason])
    }

    pub(crate) fn ordering(&self, handler: &str, queue: &str) -> OrderingMetrics {
        let l = [handler, queue];
        OrderingMetrics {
            held: self.ordering_held.with_label_values(&l),
            holds: self.ordering_holds.with_label_values(&l),
            parked: self.ordering_parked.with_label_values(&l),
            gaps: self.ordering_gaps.with_label_values(&l),
            skipped: self.ordering_skipped.with_label_values(&l),
            partitions: self.ordering_partitions.with_label_values(&l),
        }
    }

    pub(crate) fn schedule(&self, name: &str) -> ScheduleMetrics {
        ScheduleMetrics {
            fires: self.schedule_fires.with_label_values(&[name]),
            leader: self.schedule_leader.with_label_values(&[name]),
        }
    }

    /// The registry (add your own metrics; `/metrics` serves them all).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Resolves one handler's handles.
    pub(crate) fn handler(&self, handler: &str, queue: &str) -> HandlerMetrics {
        let outcome = |o: &str| self.messages.with_label_values(&[handler, queue, o]);
        let reply = |s: &str| self.replies.with_label_values(&[handler, queue, s]);
        HandlerMetrics {
            handler: handler.to_owned(),
            queue: queue.to_owned(),
            ok: outcome("ok"),
            retried: outcome("retried"),
            dead_lettered: outcome("dead_lettered"),
            duplicate: outcome("duplicate"),
            cancelled: outcome("cancelled"),
            continued: outcome("continued"),
            duration: self.duration.with_label_values(&[handler, queue]),
            in_flight: self.in_flight.with_label_values(&[handler, queue]),
            age: self.age.with_label_values(&[handler, queue]),
            reply_ok: reply("ok"),
            reply_error: reply("error"),
            deferred_busy: self.deferred.with_label_values(&[handler, queue, "busy"]),
            deferred_store: self
                .deferred
                .with_label_values(&[handler, queue, "store_unavailable"]),
            retries: self.retries.clone(),
            dead_letters: self.dead_letters.clone(),
        }
    }

    pub(crate) fn confirm_histogram(&self) -> Histogram {
        self.confirm_seconds.clone()
    }

    pub(crate) fn set_connected(&self, up: bool) {
        self.connection_up.set(i64::from(up));
    }

    pub(crate) fn recovered(&self) {
        self.recoveries.inc();
    }

    /// Renders the Prometheus text format.
    pub fn render(&self) -> String {
        use prometheus::Encoder;
        let mut out = Vec::new();
        let encoder = prometheus::TextEncoder::new();
        if encoder.encode(&self.registry.gather(), &mut out).is_err() {
            return String::new();
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

/// One handler's pre-resolved metric handles.
#[derive(Clone)]
pub(crate) struct HandlerMetrics {
    handler: String,
    queue: String,
    pub ok: IntCounter,
    pub retried: IntCounter,
    pub dead_lettered: IntCounter,
    pub duplicate: IntCounter,
    pub cancelled: IntCounter,
    /// Slices that ended in a continuation (not part of the contract's outcomes).
    pub continued: IntCounter,
    pub duration: Histogram,
    pub in_flight: IntGauge,
    pub age: Histogram,
    pub reply_ok: IntCounter,
    pub reply_error: IntCounter,
    /// Deferred because another instance holds the message id's claim.
    pub deferred_busy: IntCounter,
    /// Deferred because a store the pipeline needs did not answer.
    pub deferred_store: IntCounter,
    retries: IntCounterVec,
    dead_letters: IntCounterVec,
}

impl HandlerMetrics {
    /// Retries are rare: labelling by attempt here is fine.
    pub(crate) fn retry(&self, attempt: u32) {
        self.retried.inc();
        self.retries
            .with_label_values(&[&self.handler, &self.queue, &attempt.to_string()])
            .inc();
    }

    pub(crate) fn dead_letter(&self, kind: &str) {
        self.dead_lettered.inc();
        self.dead_letters
            .with_label_values(&[&self.handler, &self.queue, kind])
            .inc();
    }
}

/// One workflow queue's handles.
#[derive(Clone)]
pub(crate) struct WorkflowMetrics {
    pub started: IntCounter,
    pub completed: IntCounter,
    pub compensated: IntCounter,
    pub failed: IntCounter,
    /// Steps past their deadline sent again by the supervisor.
    pub redispatched: IntCounter,
    /// Steps past their deadline the supervisor failed (the workflow compensated).
    pub deadline_compensated: IntCounter,
    /// A step's or compensation's own series (none for the entry queue).
    pub step: Option<StepMetrics>,
}

/// One workflow step's handles.
#[derive(Clone)]
pub(crate) struct StepMetrics {
    /// Its compensation was dead-lettered.
    pub compensation_failures: IntCounter,
    /// Its successful runs.
    pub duration: Histogram,
}

/// One schedule's handles.
#[derive(Clone)]
pub(crate) struct ScheduleMetrics {
    pub fires: IntCounter,
    pub leader: IntGauge,
}

/// One ordered handler's handles (shared by its partitions in this instance).
#[derive(Clone)]
pub(crate) struct OrderingMetrics {
    pub held: IntGauge,
    pub holds: IntCounter,
    pub parked: IntCounter,
    pub gaps: IntGauge,
    pub skipped: IntCounter,
    pub partitions: IntGauge,
}
