//! Repro for a hang in `Running::stop()`: start an app on a fresh quorum queue, wait until
//! ready, stop; repeat. Reports the step that does not finish within 20 s (seen about once
//! in 120-150 cycles: lapin closes the publisher channel, whose last handle the drain just
//! dropped, while `Connection::close` marks every channel Closing; lapin then fails the
//! connection and the close promise never resolves). `RUST_LOG=lapin=trace` shows it.
//!
//! ```text
//! cargo run --release -p cottontail-bench --example stop_hang -- [ITERATIONS]
//! ```

use std::time::{Duration, Instant};

use cottontail::lapin::options::QueueDeleteOptions;
use cottontail::lapin::{Connection, ConnectionProperties};
use cottontail::{App, Config, Queue, RetryPolicy};

async fn noop() {}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            std::env::var("RUST_LOG").unwrap_or_else(|_| "cottontail=debug,lapin=info".into()),
        )
        .init();
    let iterations: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(100);
    let url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| cottontail::connection::DEFAULT_AMQP_URL.into());
    let limit = Duration::from_secs(20);
    let admin = Connection::connect(&url, ConnectionProperties::default())
        .await
        .expect("connect")
        .create_channel()
        .await
        .expect("channel");
    for i in 0..iterations {
        let queue = format!("bench.stop-hang.{}.{i}", std::process::id());
        let t = Instant::now();
        let app = App::new(()).handler(
            Queue::new(&queue).prefetch(1).retry(RetryPolicy::none()),
            noop,
        );
        let start = app.start(Config::new(&url).connection_name(format!("stop-hang:{queue}")));
        let running = match tokio::time::timeout(limit, start).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => panic!("{i}: start failed: {e}"),
            Err(_) => panic!("{i}: start hung"),
        };
        if !running.wait_ready(limit).await {
            panic!("{i}: not ready within {limit:?}");
        }
        let ready = t.elapsed();
        match tokio::time::timeout(limit, running.stop()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("{i}: stop failed: {e}"),
            Err(_) => {
                eprintln!("{i}: STOP HUNG (> {limit:?}) on {queue}");
                std::process::exit(2);
            }
        }
        eprintln!(
            "{i}: ready in {:?}, stopped in {:?}",
            ready,
            t.elapsed() - ready
        );
        for name in [queue.clone(), format!("{queue}.dlq")] {
            let _ = admin
                .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
    }
    eprintln!("{iterations} start/stop cycles without a hang");
}
