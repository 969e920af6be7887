//! Schedules fire once per tick across a fleet, hand over when the leader dies; singleton
//! handlers never overlap and survive the death of the active instance.
mod common;

use std::io::Write;
use std::time::{Duration, Instant};

use common::*;
use cottontail::{App, HandlerError, Json, Queue, Running, Schedule, Tick};

async fn record_tick(
    cottontail::State(ticks): cottontail::State<Counter>,
    tick: Tick,
) -> Result<(), HandlerError> {
    ticks.add(&tick.tick_ms.to_string());
    Ok(())
}

async fn fleet(
    schedule: &str,
    queue: &Queue,
    ticks: &Counter,
) -> Vec<(Running, String, cottontail::Metrics)> {
    let mut fleet = Vec::new();
    for i in 0..3 {
        let name = unique(&format!("sched-{i}"));
        let s = Schedule::new(schedule, "* * * * * *").unwrap();
        let app = App::new(ticks.clone()).schedule(s, queue.clone(), record_tick);
        let metrics = app.metrics().clone();
        fleet.push((start(app, &name).await, name, metrics));
    }
    fleet
}

fn is_leader(metrics: &cottontail::Metrics, schedule: &str) -> bool {
    metric_value(
        &metrics.render(),
        "cottontail_schedule_leader",
        &[("schedule", schedule)],
    ) == Some(1.0)
}

async fn cleanup(schedule: &str, queue: &Queue) {
    let mut names = handler_queues(queue, &cottontail::RetryPolicy::default());
    names.push(format!("cottontail.schedule.{schedule}.state"));
    names.push(format!("cottontail.leader.{schedule}"));
    delete_queues(&names).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_fire_a_one_second_schedule_once_per_tick() {
    let schedule = unique("every-second");
    let queue = Queue::new(unique("tick-job")).expires(EXPIRES);
    let ticks = Counter::default();
    let fleet = fleet(&schedule, &queue, &ticks).await;
    let t0 = chrono::Utc::now().timestamp_millis();
    let window = Instant::now() + Duration::from_secs(10);
    wait_until(Duration::from_secs(15), "10 s window", || async move {
        Instant::now() >= window
    })
    .await;
    let t1 = t0 + 10_000;
    // Ticks scheduled inside the window may still be in flight: wait for them to land.
    let t = ticks.clone();
    wait_until(
        Duration::from_secs(5),
        "last tick of the window",
        move || {
            let t = t.clone();
            async move {
                t.snapshot()
                    .keys()
                    .any(|k| k.parse::<i64>().unwrap() >= t1 - 1000)
            }
        },
    )
    .await;
    let snapshot = ticks.snapshot();
    let in_window: Vec<_> = snapshot
        .iter()
        .filter(|(k, _)| (t0..t1).contains(&k.parse::<i64>().unwrap()))
        .collect();
    assert!(
        (9..=11).contains(&in_window.len()),
        "{} ticks in 10 s: {snapshot:?}",
        in_window.len()
    );
    assert!(
        snapshot.values().all(|n| *n == 1),
        "a tick fired twice: {snapshot:?}"
    );
    assert_eq!(
        fleet
            .iter()
            .filter(|(_, _, m)| is_leader(m, &schedule))
            .count(),
        1
    );
    for (app, _, _) in fleet {
        app.stop().await.unwrap();
    }
    cleanup(&schedule, &queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_hands_scheduling_to_another_instance() {
    let schedule = unique("failover");
    let queue = Queue::new(unique("failover-job")).expires(EXPIRES);
    let ticks = Counter::default();
    let mut fleet = fleet(&schedule, &queue, &ticks).await;
    let t = ticks.clone();
    wait_until(Duration::from_secs(10), "ticks flowing", move || {
        let t = t.clone();
        async move { t.keys() >= 2 }
    })
    .await;
    // The leader goes away (its connection, and with it the exclusive leader queue, is gone).
    let leader = fleet
        .iter()
        .position(|(_, _, m)| is_leader(m, &schedule))
        .expect("a leader");
    fleet.remove(leader).0.stop().await.unwrap();
    let killed_at = chrono::Utc::now().timestamp_millis();
    let sched = schedule.clone();
    let metrics: Vec<_> = fleet.iter().map(|(_, _, m)| m.clone()).collect();
    wait_until(Duration::from_secs(5), "a new leader", move || {
        let ok = metrics.iter().any(|m| is_leader(m, &sched));
        async move { ok }
    })
    .await;
    let t = ticks.clone();
    wait_until(
        Duration::from_secs(10),
        "ticks after the handover",
        move || {
            let t = t.clone();
            async move {
                t.snapshot()
                    .keys()
                    .filter(|k| k.parse::<i64>().unwrap() > killed_at + 1000)
                    .count()
                    >= 3
            }
        },
    )
    .await;
    let mut fired: Vec<i64> = ticks
        .snapshot()
        .keys()
        .map(|k| k.parse().unwrap())
        .collect();
    fired.sort();
    let gap = fired.windows(2).map(|w| w[1] - w[0]).max().unwrap();
    assert!(gap <= 4000, "scheduling stopped for {gap} ms");
    assert!(
        ticks.snapshot().values().all(|n| *n == 1),
        "a tick fired twice"
    );
    for (app, _, _) in fleet {
        app.stop().await.unwrap();
    }
    cleanup(&schedule, &queue).await;
}

const CHILD_QUEUE: &str = "COTTONTAIL_TEST_SINGLETON_QUEUE";
const CHILD_LOG: &str = "COTTONTAIL_TEST_SINGLETON_LOG";

/// Appends `start|end <id> <instance> <unix ns>` lines: the concurrency probe, across processes.
async fn exclusive(
    cottontail::State(log): cottontail::State<String>,
    Json(v): Json<serde_json::Value>,
) -> Result<(), HandlerError> {
    let line = |what: &str| {
        let ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        writeln!(f, "{what} {} {} {ns}", v["id"], std::process::id()).unwrap();
    };
    line("start");
    tokio::time::sleep(Duration::from_millis(40)).await;
    line("end");
    Ok(())
}

fn singleton_queue(name: &str) -> Queue {
    Queue::new(name).expires(EXPIRES).singleton().concurrency(8)
}

#[tokio::test]
async fn singleton_child() {
    let (Ok(name), Ok(log)) = (std::env::var(CHILD_QUEUE), std::env::var(CHILD_LOG)) else {
        return;
    };
    App::new(log)
        .handler(singleton_queue(&name), exclusive)
        .run(config(&unique("singleton-child")))
        .await
        .unwrap();
}

fn read_log(path: &str) -> Vec<(String, String, u32, u128)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let p: Vec<_> = l.split(' ').collect();
            Some((
                p.first()?.to_string(),
                p.get(1)?.to_string(),
                p.get(2)?.parse().ok()?,
                p.get(3)?.parse().ok()?,
            ))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_singleton_never_runs_twice_at_once_and_survives_its_active_instance() {
    let name = unique("singleton");
    let log = std::env::temp_dir()
        .join(unique("singleton-log"))
        .to_string_lossy()
        .to_string();
    let env = [(CHILD_QUEUE, name.clone()), (CHILD_LOG, log.clone())];
    let mut children: Vec<_> = (0..3)
        .map(|_| spawn_child("singleton_child", &env))
        .collect();
    let conn = connect(&unique("client")).await;
    wait_until(Duration::from_secs(20), "queue declared", || {
        let conn = &conn;
        let name = name.clone();
        async move {
            let ch = conn.create_channel().await.unwrap();
            ch.queue_declare(
                name.as_str().into(),
                cottontail::lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                Default::default(),
            )
            .await
            .is_ok()
        }
    })
    .await;
    let ch = confirm_channel(&conn).await;
    let items = (0..60)
        .map(|i| (format!(r#"{{"id":{i}}}"#).into_bytes(), json_props()))
        .collect();
    publish_many(&ch, &name, items).await;

    let path = log.clone();
    wait_until(Duration::from_secs(30), "10 handled", move || {
        let path = path.clone();
        async move { read_log(&path).iter().filter(|l| l.0 == "end").count() >= 10 }
    })
    .await;
    // Kill the active instance outright.
    let active = read_log(&log).last().unwrap().2;
    let victim = children
        .iter()
        .position(|c| c.id() == active)
        .expect("active child");
    let mut dead = children.remove(victim);
    dead.kill().unwrap();
    let _ = dead.wait();
    let killed_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();

    let path = log.clone();
    wait_until(Duration::from_secs(60), "all 60 handled", move || {
        let path = path.clone();
        async move {
            let mut ids: Vec<_> = read_log(&path)
                .into_iter()
                .filter(|l| l.0 == "end")
                .map(|l| l.1)
                .collect();
            ids.sort();
            ids.dedup();
            ids.len() == 60
        }
    })
    .await;
    for c in &children {
        sigterm(c);
    }
    for mut c in children {
        assert!(wait_exit(&mut c, Duration::from_secs(30)).await.success());
    }

    // The probe: intervals never overlap (an unfinished run of the killed child ends at the kill).
    let mut open: Option<(u32, u128)> = None;
    let mut instances = std::collections::HashSet::new();
    for (what, _, pid, ns) in read_log(&log) {
        instances.insert(pid);
        match what.as_str() {
            "start" => {
                if let Some((other, _)) = open {
                    assert!(
                        other == active && ns >= killed_at,
                        "two runs at once: {other} and {pid}"
                    );
                }
                open = Some((pid, ns));
            }
            _ => open = None,
        }
    }
    assert!(instances.len() >= 2, "work continued on another instance");
    let _ = std::fs::remove_file(&log);
    delete_queues(&handler_queues(
        &singleton_queue(&name),
        &cottontail::RetryPolicy::default(),
    ))
    .await;
}
