//! Memory behind one hung delivery: one message whose handler never returns, then N others
//! (200,000 by default) flowing past it. Prints the process's resident memory (`VmRSS`) and
//! the rate every 10,000 messages; after warm-up both should stay flat (the ack ledger keeps
//! only the prefetch window, whatever the hung delivery holds back).
//!
//! ```text
//! cargo run --release -p cottontail-bench --example hung_handler -- [MESSAGES] [CONSUMERS]
//! ```
//!
//! With one consumer (the default) every message passes through the hung delivery's channel.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cottontail::lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeleteOptions};
use cottontail::lapin::{BasicProperties, Connection, ConnectionProperties};
use cottontail::{App, Config, Message, Queue, QueueType, RetryPolicy, State};

const SAMPLE_EVERY: u64 = 10_000;

async fn work(State(handled): State<Arc<AtomicU64>>, msg: Message) {
    if msg.body() == b"hang" {
        std::future::pending::<()>().await;
    }
    handled.fetch_add(1, Ordering::Relaxed);
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

#[tokio::main]
async fn main() {
    let total: u64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(200_000);
    let consumers: usize = std::env::args()
        .nth(2)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| cottontail::connection::DEFAULT_AMQP_URL.into());
    let queue = format!("bench.hung-handler.{}", std::process::id());
    let handled = Arc::new(AtomicU64::new(0));
    let app = App::new(handled.clone()).handler(
        Queue::new(&queue)
            .queue_type(QueueType::Classic)
            .consumers(consumers)
            // Gone a minute after the run, however it ends.
            .expires(Duration::from_secs(60))
            .retry(RetryPolicy::none()),
        work,
    );
    let running = app
        .start(
            Config::new(&url)
                .connection_name(format!("hung-handler:{queue}"))
                .shutdown_timeout(Duration::from_secs(1)),
        )
        .await
        .expect("start");
    assert!(running.wait_ready(Duration::from_secs(20)).await, "ready");

    let publisher = Connection::connect(&url, ConnectionProperties::default())
        .await
        .expect("connect");
    let channel = publisher.create_channel().await.expect("channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let publish = {
        let queue = queue.clone();
        move |body: &'static [u8]| {
            let (channel, queue) = (channel.clone(), queue.clone());
            async move {
                channel
                    .basic_publish(
                        "".into(),
                        queue.as_str().into(),
                        BasicPublishOptions::default(),
                        body,
                        BasicProperties::default(),
                    )
                    .await
                    .expect("publish")
                    .await
                    .expect("confirm");
            }
        }
    };
    publish(b"hang").await;
    // Publishing runs alongside consuming, a window of confirms at a time.
    let feed = publish.clone();
    let feeder = tokio::spawn(async move {
        let mut sent = 0;
        while sent < total {
            let n = (total - sent).min(500);
            futures::future::join_all((0..n).map(|_| feed(b"{}"))).await;
            sent += n;
        }
    });

    let started = Instant::now();
    let mut last = (0, Instant::now());
    println!("handled  VmRSS(KiB)  msg/s");
    println!("{:>7}  {:>10}  {:>5}", 0, rss_kib(), "-");
    let deadline = Instant::now() + Duration::from_secs(600);
    while last.0 < total {
        if Instant::now() >= deadline {
            println!("stalled at {}", last.0);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = handled.load(Ordering::Relaxed);
        if now >= last.0 + SAMPLE_EVERY || now == total {
            let rate = (now - last.0) as f64 / last.1.elapsed().as_secs_f64();
            println!("{now:>7}  {:>10}  {rate:>5.0}", rss_kib());
            last = (now, Instant::now());
        }
    }
    feeder.abort();
    println!(
        "{} messages past one hung delivery in {:.1} s",
        last.0,
        started.elapsed().as_secs_f64()
    );
    running.shutdown();
    let _ = tokio::time::timeout(Duration::from_secs(5), running.join()).await;
    let admin = publisher.create_channel().await.expect("channel");
    for name in [queue.clone(), format!("{queue}.dlq")] {
        let _ = admin
            .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
}
