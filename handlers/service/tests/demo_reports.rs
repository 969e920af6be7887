//! The demo's scheduled `reports` job: with three demo processes and a 2-second schedule,
//! exactly one `reports.generated` message per tick.
mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::{amqp_url, Demo};
use cottontail::lapin::options::*;
use cottontail::lapin::types::FieldTable;
use cottontail::lapin::{Connection, ConnectionProperties};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_demo_processes_generate_one_report_per_tick() {
    let env = [("REPORTS_SCHEDULE", "*/2 * * * * *")];
    let demos: Vec<Demo> = (1..=3).map(|slot| Demo::start_with(slot, &env)).collect();
    let conn = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.queue_purge("reports.generated".into(), QueuePurgeOptions::default())
        .await
        .unwrap();
    let started = chrono_ms();

    // Collect for ~11 s: five or six ticks.
    let deadline = Instant::now() + Duration::from_secs(11);
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let ended = chrono_ms();
    for d in demos {
        d.stop();
    }
    let mut per_tick: HashMap<i64, u32> = HashMap::new();
    while let Some(got) = ch
        .basic_get("reports.generated".into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        let v: serde_json::Value = serde_json::from_slice(&got.delivery.data).unwrap();
        assert!(v["generated_at"].as_f64().is_some(), "{v}");
        let tick = v["report"]["tick_ms"].as_i64().expect("tick_ms");
        if tick >= started && tick <= ended {
            *per_tick.entry(tick).or_default() += 1;
        }
    }
    assert!(per_tick.len() >= 4, "too few ticks: {per_tick:?}");
    assert!(
        per_tick.values().all(|n| *n == 1),
        "a tick produced several reports: {per_tick:?}"
    );
    let mut ticks: Vec<_> = per_tick.keys().copied().collect();
    ticks.sort();
    assert!(
        ticks.windows(2).all(|w| w[1] - w[0] == 2000),
        "a tick was skipped: {ticks:?}"
    );
    let _ = conn.close(200, "bye".into()).await;
    let _ = FieldTable::default();
}

fn chrono_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}
