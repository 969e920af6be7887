//! `cottontail-demo`: one service running every example handler and workflow (the contract
//! is in `docs/contracts.md`, "Demo service" and "Workflows").
//!
//! Stores: `REDIS_URL` set → Redis for dedup, job statuses, sequence state, checkpoints and
//! the order book; else `DATABASE_URL` set → PostgreSQL for dedup, job statuses, sequence
//! state and checkpoints (the order book stays in memory); neither → in memory (one instance
//! only).

use std::sync::Arc;

use cottontail::stores::{
    CheckpointStore, DedupStore, JobStore, MemoryCheckpoints, MemoryJobs, MemorySequences,
    MemoryStore, SequenceStore,
};
use cottontail::{App, Config, Dedup};

#[derive(Clone, Default)]
struct DemoState {
    orders: cottontail_orders::Orders,
}

impl cottontail::FromRef<DemoState> for cottontail_orders::Orders {
    fn from_ref(state: &DemoState) -> Self {
        state.orders.clone()
    }
}

#[tokio::main]
async fn main() {
    init_logging();
    if let Err(error) = run().await {
        tracing::error!(%error, "cottontail-demo stopped");
        eprintln!("cottontail-demo: {error}");
        std::process::exit(1);
    }
}

/// The stores the environment selects.
struct Stores {
    dedup: Arc<dyn DedupStore>,
    jobs: Arc<dyn JobStore>,
    sequences: Arc<dyn SequenceStore>,
    checkpoints: Arc<dyn CheckpointStore>,
    orders: cottontail_orders::Orders,
    kind: &'static str,
}

async fn stores() -> Result<Stores, cottontail::Error> {
    let store_error = |e: cottontail::stores::StoreError| cottontail::Error::Config(e.to_string());
    if let Ok(url) = std::env::var("REDIS_URL") {
        let redis = cottontail::stores::RedisStore::connect_default(&url)
            .await
            .map_err(store_error)?;
        return Ok(Stores {
            dedup: Arc::new(redis.clone()),
            jobs: Arc::new(redis.clone()),
            sequences: Arc::new(redis.clone()),
            checkpoints: Arc::new(redis.clone()),
            orders: cottontail_orders::Orders::new(cottontail_orders::RedisBook::new(&redis)),
            kind: "redis",
        });
    }
    if let Ok(url) = std::env::var("DATABASE_URL") {
        let pg = cottontail::stores::PostgresStore::connect(&url)
            .await
            .map_err(store_error)?;
        return Ok(Stores {
            dedup: Arc::new(pg.clone()),
            jobs: Arc::new(pg.clone()),
            sequences: Arc::new(pg.clone()),
            checkpoints: Arc::new(pg),
            orders: cottontail_orders::Orders::default(),
            kind: "postgres",
        });
    }
    Ok(Stores {
        dedup: Arc::new(MemoryStore::new(100_000)),
        jobs: Arc::new(MemoryJobs::default()),
        sequences: Arc::new(MemorySequences::new()),
        checkpoints: Arc::new(MemoryCheckpoints::default()),
        orders: cottontail_orders::Orders::default(),
        kind: "memory",
    })
}

async fn run() -> Result<(), cottontail::Error> {
    let config = Config::from_env()?;
    let stores = stores().await?;
    tracing::info!(url = %cottontail::connection::redact(&config.amqp_url), http = ?config.http_addr, stores = stores.kind, "starting");
    let reports = std::env::var("REPORTS_SCHEDULE")
        .unwrap_or_else(|_| cottontail_reports::DEFAULT_SCHEDULE.to_owned());
    App::new(DemoState {
        orders: stores.orders,
    })
    .shared_job_store(stores.jobs)
    .checkpoint_store(stores.checkpoints)
    .handler(
        cottontail_thumbnails::queue(),
        cottontail_thumbnails::handle,
    )
    .handler(
        cottontail_orders::queue(stores.sequences, Some(Dedup::shared(stores.dedup.clone()))),
        cottontail_orders::handle,
    )
    .schedule(
        cottontail_reports::schedule(&reports)?,
        // A shared dedup store makes a tick run once even across a leader change.
        cottontail_reports::queue().dedup(Dedup::shared(stores.dedup.clone())),
        cottontail_reports::handle,
    )
    .output(cottontail_reports::OUTPUT)
    // Each step runs once per booking across instances through the shared store.
    .workflow(
        cottontail_bookings::workflow(cottontail_bookings::WORKFLOW)
            .dedup(Dedup::shared(stores.dedup.clone())),
    )
    .output(cottontail_bookings::events_queue(
        cottontail_bookings::WORKFLOW,
    ))
    // Thumbnails of an album, one child job per image on the thumbnails queue, joined
    // once across instances through the shared store.
    .workflow(
        cottontail_albums::workflow(cottontail_albums::WORKFLOW, cottontail_thumbnails::QUEUE)
            .dedup(Dedup::shared(stores.dedup)),
    )
    .handler(cottontail_crunch::queue(), cottontail_crunch::handle)
    .run(config)
    .await
}

/// `RUST_LOG` filters (default `info`); `COTTONTAIL_LOG_FORMAT=json` switches to JSON lines.
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour codes only for a terminal: not in container logs or files.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()));
    if std::env::var("COTTONTAIL_LOG_FORMAT").as_deref() == Ok("json") {
        builder.json().init();
    } else {
        builder.init();
    }
}
