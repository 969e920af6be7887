//! `cottontail-demo`: one service running every example handler (DESIGN.md contract).

use cottontail::{App, Config};

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

async fn run() -> Result<(), cottontail::Error> {
    let config = Config::from_env()?;
    tracing::info!(url = %cottontail::redact(&config.amqp_url), http = ?config.http_addr, "starting");
    let reports = std::env::var("REPORTS_SCHEDULE")
        .unwrap_or_else(|_| cottontail_reports::DEFAULT_SCHEDULE.to_owned());
    App::new(DemoState::default())
        .handler(
            cottontail_thumbnails::queue(),
            cottontail_thumbnails::handle,
        )
        .handler(cottontail_orders::queue(), cottontail_orders::handle)
        .schedule(
            cottontail_reports::schedule(&reports)?,
            cottontail_reports::queue(),
            cottontail_reports::handle,
        )
        .output(cottontail_reports::OUTPUT)
        .run(config)
        .await
}

/// `RUST_LOG` filters (default `info`); `COTTONTAIL_LOG_FORMAT=json` switches to JSON lines.
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if std::env::var("COTTONTAIL_LOG_FORMAT").as_deref() == Ok("json") {
        builder.json().init();
    } else {
        builder.init();
    }
}
