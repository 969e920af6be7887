//! Schedules fire once per tick across a fleet, hand over when the leader dies; singleton
//! handlers never overlap and survive the death of the active instance.
use cottontail_test_support as common;

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
) -> Vec<(Running, String, cottontail::ops::Metrics)> {
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

fn is_leader(metrics: &cottontail::ops::Metrics, schedule: &str) -> bool {
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
    assert!(
        fleet.iter().all(|(app, _, _)| app.health().is_ready()),
        "standbys waiting for leadership are ready too"
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

/// Ticks recorded after `after_ms` (epoch ms).
fn ticks_after(ticks: &Counter, after_ms: i64) -> usize {
    ticks
        .snapshot()
        .keys()
        .filter(|k| k.parse::<i64>().unwrap() > after_ms)
        .count()
}

async fn wait_for_ticks(ticks: &Counter, after_ms: i64, n: usize, limit: Duration, what: &str) {
    let t = ticks.clone();
    wait_until(limit, what, move || {
        let t = t.clone();
        async move { ticks_after(&t, after_ms) >= n }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_leader_keeps_firing_after_its_state_queue_is_deleted() {
    bounded(Duration::from_secs(60), async {
        let schedule = unique("lost-state");
        let queue = Queue::new(unique("lost-state-job")).expires(EXPIRES);
        let ticks = Counter::default();
        let s = Schedule::new(&schedule, "* * * * * *").unwrap();
        let app = App::new(ticks.clone()).schedule(s, queue.clone(), record_tick);
        let running = start(app, &unique("lost-state-app")).await;
        wait_for_ticks(&ticks, 0, 2, Duration::from_secs(10), "ticks flowing").await;
        // The next fire's mandatory publish of its state is unroutable.
        delete_queues(&[format!("cottontail.schedule.{schedule}.state")]).await;
        let deleted_at = chrono::Utc::now().timestamp_millis();
        wait_for_ticks(
            &ticks,
            deleted_at + 1000,
            3,
            Duration::from_secs(20),
            "ticks after the state queue was deleted",
        )
        .await;
        assert!(
            ticks.snapshot().values().all(|n| *n == 1),
            "a tick fired twice"
        );
        assert!(running.health().is_ready());
        running.stop().await.unwrap();
        cleanup(&schedule, &queue).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schedule_that_cannot_queue_up_retries_and_fails_readiness_meanwhile() {
    bounded(Duration::from_secs(60), async {
        let schedule = unique("blocked");
        let queue = Queue::new(unique("blocked-job")).expires(EXPIRES);
        // A leader queue of the wrong type: every declare of the scheduler fails.
        let conn = connect(&unique("blocker")).await;
        let ch = conn.create_channel().await.unwrap();
        let leader = format!("cottontail.leader.{schedule}");
        let mut args = cottontail::lapin::types::FieldTable::default();
        args.insert(
            "x-expires".into(),
            cottontail::lapin::types::AMQPValue::LongLongInt(EXPIRES.as_millis() as i64),
        );
        declare_plain(&ch, &leader, args).await;

        let ticks = Counter::default();
        let s = Schedule::new(&schedule, "* * * * * *").unwrap();
        let app = App::new(ticks.clone()).schedule(s, queue.clone(), record_tick);
        let config = config(&unique("blocked-app")).http("127.0.0.1:0".parse().unwrap());
        let running = app.start(config).await.expect("app starts");
        let http = running.http_addr().unwrap();
        let sched = schedule.clone();
        // Connected, handler consuming, and still 503: the schedule says why.
        wait_until(
            Duration::from_secs(10),
            "503 naming the schedule and its failure",
            move || {
                let sched = sched.clone();
                async move {
                    let (code, body) = http_get(http, "/health/ready").await;
                    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
                    code == 503
                        && body["connected"] == true
                        && body["handlers"]
                            .as_object()
                            .unwrap()
                            .values()
                            .all(|v| v == true)
                        && body["schedules"][&sched]
                            .as_str()
                            .is_some_and(|e| e.contains("PRECONDITION_FAILED"))
                }
            },
        )
        .await;
        assert_eq!(ticks.keys(), 0);

        // The obstacle goes away: the scheduler gets through by itself.
        delete_queues(&[leader]).await;
        wait_until(Duration::from_secs(20), "200 again", || async move {
            http_get(http, "/health/ready").await.0 == 200
        })
        .await;
        wait_for_ticks(
            &ticks,
            0,
            2,
            Duration::from_secs(10),
            "ticks after recovery",
        )
        .await;
        let _ = conn.close(200, "bye".into()).await;
        running.stop().await.unwrap();
        cleanup(&schedule, &queue).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_whose_fires_keep_failing_stays_unready_until_one_succeeds() {
    bounded(Duration::from_secs(90), async {
        // A private vhost: the policy below reaches no other test.
        let vhost = PrivateVhost::new("sched-fire");
        let schedule = unique("refused-state");
        let queue = Queue::new(unique("refused-state-job")).expires(EXPIRES);
        let ticks = Counter::default();
        let s = Schedule::new(&schedule, "* * * * * *").unwrap();
        let app = App::new(ticks.clone()).schedule(s, queue.clone(), record_tick);
        let config = cottontail::Config::new(vhost.url())
            .connection_name(unique("refused-state-app"))
            .http("127.0.0.1:0".parse().unwrap());
        let running = start_with(app, config).await;
        let http = running.http_addr().unwrap();
        wait_for_ticks(&ticks, 0, 2, Duration::from_secs(10), "ticks flowing").await;

        // The state queue (one message, full) now refuses publishes: every fire fails.
        let policy = ["-p", vhost.name.as_str(), "refuse-state"];
        rabbitmqctl(&[
            "set_policy",
            policy[0],
            policy[1],
            policy[2],
            r"^cottontail\.schedule\..*\.state$",
            r#"{"overflow":"reject-publish"}"#,
            "--apply-to",
            "queues",
        ]);
        wait_until(
            Duration::from_secs(10),
            "503 after a failed fire",
            || async move { http_get(http, "/health/ready").await.0 == 503 },
        )
        .await;
        // It stays unready while its fires fail, through retries that lead again.
        let until = Instant::now() + Duration::from_secs(8);
        let mut samples = 0;
        while Instant::now() < until {
            let (code, body) = http_get(http, "/health/ready").await;
            assert_eq!(code, 503, "ready while every fire fails: {body}");
            samples += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(samples > 50, "{samples} samples");

        // Here (3.10) the existing queue kept refusing after the policy was cleared: it goes,
        // and the leader declares a fresh one.
        rabbitmqctl(&["clear_policy", policy[0], policy[1], policy[2]]);
        let conn = cottontail::lapin::Connection::connect(&vhost.url(), Default::default())
            .await
            .unwrap();
        let ch = conn.create_channel().await.unwrap();
        let state = format!("cottontail.schedule.{schedule}.state");
        ch.queue_delete(state.as_str().into(), Default::default())
            .await
            .unwrap();
        let _ = conn.close(200, "bye".into()).await;
        wait_until(
            Duration::from_secs(20),
            "200 once a fire succeeds",
            || async move { http_get(http, "/health/ready").await.0 == 200 },
        )
        .await;
        running.stop().await.unwrap();
    })
    .await;
}

/// A private vhost whose `cottontail.*` queues drop a message returned more than 3 times. On
/// RabbitMQ 4.0–4.2 every quorum queue has such a limit (20 unless set) and every requeue counts
/// (a consumer's channel or connection ending included); here (3.10) a policy makes one.
fn delivery_limited(prefix: &str) -> PrivateVhost {
    let vhost = PrivateVhost::new(prefix);
    rabbitmqctl(&[
        "set_policy",
        "-p",
        &vhost.name,
        "delivery-limit",
        r"^cottontail\.",
        r#"{"delivery-limit":3}"#,
        "--apply-to",
        "queues",
    ]);
    vhost
}

fn vhost_config(vhost: &PrivateVhost, name: &str) -> cottontail::Config {
    cottontail::Config::new(vhost.url())
        .connection_name(unique(name))
        .shutdown_timeout(Duration::from_secs(10))
}

fn assert_each_tick_once(ticks: &Counter) {
    let twice: Vec<_> = ticks
        .snapshot()
        .into_iter()
        .filter(|(_, n)| *n > 1)
        .collect();
    assert!(twice.is_empty(), "ticks fired more than once: {twice:?}");
}

/// Polls `cond` until it holds (true) or `limit` passes (false).
async fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while !cond() {
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leadership_outlasts_more_leader_changes_than_the_delivery_limit() {
    bounded(Duration::from_secs(180), async {
        let vhost = delivery_limited("sched-token");
        let schedule = unique("token-limit");
        let queue = Queue::new(unique("token-limit-job")).expires(EXPIRES);
        let ticks = Counter::default();
        let mut fleet = Vec::new();
        for i in 0..9 {
            let s = Schedule::new(&schedule, "* * * * * *").unwrap();
            let app = App::new(ticks.clone()).schedule(s, queue.clone(), record_tick);
            let metrics = app.metrics().clone();
            let config = vhost_config(&vhost, &format!("token-limit-{i}"));
            fleet.push((start_with(app, config).await, metrics));
        }
        wait_for_ticks(&ticks, 0, 2, Duration::from_secs(10), "ticks flowing").await;
        // The fleet shrinks to one, a leader at a time: leadership changes hands eight times,
        // more than the tokens there are (the one held and a spare) could survive unrenewed.
        for change in 1..=8 {
            let metrics: Vec<_> = fleet.iter().map(|(_, m)| m.clone()).collect();
            let led = eventually(Duration::from_secs(10), || {
                metrics.iter().filter(|m| is_leader(m, &schedule)).count() == 1
            })
            .await;
            let ready: Vec<bool> = fleet.iter().map(|(a, _)| a.health().is_ready()).collect();
            assert!(
                led,
                "no leader before leader change {change} of 8 (delivery limit 3); \
                 the {} instances left report ready: {ready:?}",
                fleet.len()
            );
            let leader = metrics
                .iter()
                .position(|m| is_leader(m, &schedule))
                .unwrap();
            fleet.remove(leader).0.stop().await.unwrap();
            let left_at = chrono::Utc::now().timestamp_millis();
            let fired = eventually(Duration::from_secs(10), || {
                ticks_after(&ticks, left_at + 1000) > 0
            })
            .await;
            let ready: Vec<bool> = fleet.iter().map(|(a, _)| a.health().is_ready()).collect();
            assert!(
                fired,
                "nothing fired after leader change {change} of 8 (delivery limit 3); \
                 the {} instances left report ready: {ready:?}",
                fleet.len()
            );
        }
        let now = chrono::Utc::now().timestamp_millis();
        wait_for_ticks(
            &ticks,
            now,
            3,
            Duration::from_secs(10),
            "the last one firing",
        )
        .await;
        assert_each_tick_once(&ticks);
        assert!(fleet[0].0.health().is_ready());
        for (app, _) in fleet {
            app.stop().await.unwrap();
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_fired_tick_outlasts_more_takeovers_than_the_delivery_limit() {
    bounded(Duration::from_secs(120), async {
        let vhost = delivery_limited("sched-state");
        let schedule = unique("state-limit");
        let queue = Queue::new(unique("state-limit-job")).expires(EXPIRES);
        let ticks = Counter::default();
        let app = |pattern: &str| {
            let s = Schedule::new(&schedule, pattern)
                .unwrap()
                .missed(cottontail::Missed::FireOnce);
            App::new(ticks.clone()).schedule(s, queue.clone(), record_tick)
        };
        // One instance fires, and so records its last fired tick.
        let first = start_with(app("* * * * * *"), vhost_config(&vhost, "state-first")).await;
        wait_for_ticks(&ticks, 0, 1, Duration::from_secs(10), "a first tick").await;
        first.stop().await.unwrap();
        let stopped_at = chrono::Utc::now();
        // Six instances take over in turn (each reads the last fired tick); their schedule
        // fires on 1 January only, so not during this test.
        for i in 0..6 {
            let takeover = app("0 0 0 1 1 *");
            let metrics = takeover.metrics().clone();
            let config = vhost_config(&vhost, &format!("state-takeover-{i}"));
            let running = start_with(takeover, config).await;
            let sched = schedule.clone();
            wait_until(Duration::from_secs(10), "a leader", || {
                let leads = is_leader(&metrics, &sched);
                async move { leads }
            })
            .await;
            running.stop().await.unwrap();
        }
        // A tick passes while no instance runs: the next leader fires it once, as long as it
        // knows the tick came after the last one fired.
        let missed = chrono::DateTime::from_timestamp(stopped_at.timestamp() + 1, 0).unwrap();
        wait_until(Duration::from_secs(5), "the missed tick", || async move {
            chrono::Utc::now() > missed
        })
        .await;
        let daily = missed.format("%S %M %H * * *").to_string();
        let last = start_with(app(&daily), vhost_config(&vhost, "state-last")).await;
        let key = missed.timestamp_millis().to_string();
        let fired = eventually(Duration::from_secs(10), || ticks.get(&key) > 0).await;
        assert!(
            fired,
            "the tick missed at {missed} did not fire after 6 takeovers (delivery limit 3): \
             the last fired tick was lost; ticks: {:?}",
            ticks.snapshot()
        );
        assert_each_tick_once(&ticks);
        last.stop().await.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_whose_token_is_taken_away_stops_firing() {
    bounded(Duration::from_secs(60), async {
        let schedule = unique("token-gone");
        let queue = Queue::new(unique("token-gone-job")).expires(EXPIRES);
        let ticks = Counter::default();
        let fleet = fleet(&schedule, &queue, &ticks).await;
        wait_for_ticks(&ticks, 0, 2, Duration::from_secs(10), "ticks flowing").await;
        // The leader queue goes: the broker cancels every consumer, the leader's included.
        delete_queues(&[format!("cottontail.leader.{schedule}")]).await;
        let gone_at = chrono::Utc::now().timestamp_millis();
        wait_for_ticks(
            &ticks,
            gone_at + 1000,
            5,
            Duration::from_secs(20),
            "ticks after",
        )
        .await;
        assert_each_tick_once(&ticks);
        let leaders = fleet
            .iter()
            .filter(|(_, _, m)| is_leader(m, &schedule))
            .count();
        assert_eq!(leaders, 1, "instances leading");
        for (app, _, _) in fleet {
            app.stop().await.unwrap();
        }
        cleanup(&schedule, &queue).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_keeps_its_token_past_the_brokers_consumer_timeout() {
    bounded(Duration::from_secs(150), async {
        // A private node (the setting is node-wide): a delivery held unacked for 15 s times out
        // (30 min by default), checked every second (every minute by default). 3.10 reads both
        // when a channel opens.
        let node = PrivateNode::start("sched-timeout", None);
        node.ctl(&[
            "eval",
            "application:set_env(rabbit, consumer_timeout, 15000).",
        ]);
        node.ctl(&[
            "eval",
            "application:set_env(rabbit, channel_tick_interval, 1000).",
        ]);
        let schedule = unique("timeout");
        let queue = Queue::new(unique("timeout-job")).expires(EXPIRES);
        let ticks = Counter::default();
        let mut fleet = Vec::new();
        for i in 0..2 {
            let s = Schedule::new(&schedule, "* * * * * *").unwrap();
            let app = App::new(ticks.clone()).schedule(s, queue.clone(), record_tick);
            let metrics = app.metrics().clone();
            let config = cottontail::Config::new(node.url.clone())
                .connection_name(unique(&format!("timeout-{i}")))
                .shutdown_timeout(Duration::from_secs(10));
            fleet.push((start_with(app, config).await, metrics));
        }
        let t0 = chrono::Utc::now().timestamp_millis();
        // Long enough for the token to be held past the consumer timeout twice over; who leads
        // (and whether all are ready) is sampled all along.
        let mut led = std::collections::BTreeSet::new();
        let mut unready = 0;
        let done = eventually(Duration::from_secs(60), || {
            for (i, (app, m)) in fleet.iter().enumerate() {
                if is_leader(m, &schedule) {
                    led.insert(i);
                }
                unready += usize::from(!app.health().is_ready());
            }
            ticks_after(&ticks, t0) >= 35
        })
        .await;
        assert!(done, "35 s of ticks");
        assert_each_tick_once(&ticks);
        assert_eq!(led.len(), 1, "leadership moved: {led:?} led");
        assert_eq!(unready, 0, "unready samples");
        for (app, _) in fleet {
            app.stop().await.unwrap();
        }
    })
    .await;
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
