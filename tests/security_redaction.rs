//! Credentials never appear in logs, errors or metrics; HTTP binds to loopback by default;
//! bodies over `Queue::max_body` are dead-lettered unread.
//!
//! The redaction test runs as a dedicated broker user (created with `rabbitmqctl`, deleted
//! at the end) whose password is unique to this run, captures every tracing event of the
//! process (all targets, TRACE level, lapin included) and searches all of it, plus every
//! error's `Display`/`Debug` and every HTTP body, for the password.
use cottontail_test_support as common;

use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::logs::logs;
use common::*;
use cottontail::client::{Client, RequestOptions, RpcError};
use cottontail::connection::Connector;
use cottontail::{App, Config, HandlerError, Json, Queue, RetryPolicy, State};
use serde_json::Value;

/// Overall deadline of each test.
const LIMIT: Duration = Duration::from_secs(180);

/// A broker user for this run, deleted on drop.
struct SecretUser {
    name: String,
    password: String,
}

impl SecretUser {
    fn create() -> Self {
        let pid = std::process::id();
        let me = Self {
            name: format!("cottontail-sec-{pid}-{}", fastrand::u32(..)),
            password: format!("S3cr3t-p4ss-{pid}"),
        };
        rabbitmqctl(&["add_user", &me.name, &me.password]);
        rabbitmqctl(&["set_permissions", "-p", "/", &me.name, ".*", ".*", ".*"]);
        me
    }

    fn url_with(&self, password: &str, port: u16) -> String {
        format!("amqp://{}:{password}@127.0.0.1:{port}/%2f", self.name)
    }

    fn url(&self) -> String {
        self.url_with(&self.password, 5672)
    }
}

impl Drop for SecretUser {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args(["delete_user", &self.name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Fails with where the secret showed up.
fn assert_clean(what: &str, text: &str, secrets: &[&str]) {
    for secret in secrets {
        if let Some(at) = text.find(secret) {
            let from = text[..at]
                .char_indices()
                .rev()
                .nth(120)
                .map_or(0, |(i, _)| i);
            let to = (at + secret.len() + 120).min(text.len());
            let to = (to..=text.len())
                .find(|i| text.is_char_boundary(*i))
                .unwrap();
            panic!(
                "password leaked in {what}: …{}…",
                &text[from..to].replace(secret, "<<PASSWORD>>")
            );
        }
    }
}

async fn refuse(Json(v): Json<Value>) -> Result<Json<Value>, HandlerError> {
    Err(HandlerError::permanent(
        "invalid_input",
        format!("refused {v}"),
    ))
}

async fn flaky(Json(_): Json<Value>) -> Result<(), HandlerError> {
    Err(HandlerError::transient("db_down", "database unavailable"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_never_appear_in_logs_errors_or_http() {
    let logs = logs();
    let user = SecretUser::create();
    let wrong = format!("Wr0ng-p4ss-{}", std::process::id());
    let secrets = [user.password.as_str(), wrong.as_str()];
    // Everything that must stay clean besides the logs: (what, text).
    let mut shown: Vec<(String, String)> = Vec::new();

    bounded(LIMIT, async {
        // 1. A working app as the secret user, with a failing handler and HTTP.
        let name = unique("sec-refuse");
        let retry_name = unique("sec-flaky");
        let queue = Queue::new(&name).expires(EXPIRES);
        let retry_queue = Queue::new(&retry_name)
            .expires(EXPIRES)
            .retry(RetryPolicy::fixed(Duration::from_millis(50)).max_attempts(2));
        let config = Config::new(user.url())
            .connection_name(unique("sec-app"))
            .http(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
            .shutdown_timeout(Duration::from_secs(10));
        shown.push(("Config Debug".into(), format!("{config:?}")));
        shown.push((
            "Connector Debug".into(),
            format!("{:?}", config.connector().unwrap()),
        ));
        let app = start_with(
            App::new(())
                .handler(queue.clone(), refuse)
                .handler(retry_queue.clone(), flaky),
            config,
        )
        .await;
        let http = app.http_addr().unwrap();

        // A handler error, seen by a client connected as the same user.
        let client = Client::connect(&user.url(), unique("sec-client"))
            .await
            .expect("client connects as the secret user");
        shown.push(("Client Debug".into(), format!("{client:?}")));
        shown.push((
            "ClientBuilder Debug".into(),
            format!("{:?}", Client::builder(&user.url())),
        ));
        let err = client
            .request(
                &name,
                br#"{"x":1}"#,
                RequestOptions::timeout(Duration::from_secs(20)),
            )
            .await
            .unwrap_err();
        assert!(matches!(err, RpcError::Remote { .. }), "{err:?}");
        shown.push(("RpcError".into(), format!("{err} {err:?}")));
        client
            .publish(&retry_name, b"{}", Default::default())
            .await
            .unwrap();
        let conn = connect(&unique("sec-observer")).await;
        let dlq = collect(&conn, &retry_queue.dlq_name()).await;
        dlq.wait_for(1, Duration::from_secs(20)).await;

        for path in [
            "/metrics",
            "/health/ready",
            "/health/live",
            "/status.json",
            "/",
            "/jobs/none",
        ] {
            let (code, body) = http_get(http, path).await;
            assert!(code == 200 || code == 404, "{path}: {code}");
            shown.push((format!("GET {path}"), body));
        }
        let (_, metrics) = http_get(http, "/metrics").await;
        assert!(metrics.contains("cottontail_"), "metrics rendered");
        assert!(!metrics.contains("amqp://"), "no URL in metrics");

        // 2. Failed connects: wrong port, wrong password (direct and through an app).
        let refused = Connector::new(&user.url_with(&user.password, 1), "sec-port")
            .unwrap()
            .connect_once()
            .await
            .map(drop)
            .unwrap_err();
        shown.push(("wrong port error".into(), format!("{refused} {refused:?}")));
        let denied = Client::connect(&user.url_with(&wrong, 5672), "sec-denied")
            .await
            .map(drop)
            .unwrap_err();
        shown.push((
            "wrong password error".into(),
            format!("{denied} {denied:?}"),
        ));
        let denied = Client::connect(&user.url_with(&user.password, 1), "sec-port2")
            .await
            .map(drop)
            .unwrap_err();
        shown.push((
            "client wrong port error".into(),
            format!("{denied} {denied:?}"),
        ));
        // An app that cannot connect keeps retrying (and logging) until stopped.
        let retrying = App::new(())
            .handler(Queue::new(unique("sec-never")), refuse)
            .start(Config::new(format!(
                "{},{}",
                user.url_with(&wrong, 5672),
                user.url_with(&user.password, 1)
            )))
            .await
            .expect("starts (connects in the background)");
        assert!(!retrying.wait_ready(Duration::from_secs(2)).await);
        retrying.stop().await.unwrap();

        // 3. Malformed URLs: configuration errors must not echo the password.
        for bad in [
            format!(
                "amqp://{}:{}@127.0.0.1:notaport/%2f",
                user.name, user.password
            ),
            format!("http://{}:{}@127.0.0.1:5672/%2f", user.name, user.password),
            format!("amqp://{}:{}@/%2f", user.name, user.password),
            format!(
                "amqp://{}:{}/x@127.0.0.1:5672/%2f",
                user.name, user.password
            ),
            format!(
                "amqp://{}:'{}'@127.0.0.1:5672/%2f",
                user.name, user.password
            ),
            format!(
                "amqp://{}:\"{}\"@127.0.0.1:5672/%2f",
                user.name, user.password
            ),
            format!(
                "amqp://{}:{}@127.0.0.1:5672/%2f?heartbeat=x",
                user.name, user.password
            ),
        ] {
            if let Err(e) = Connector::new(&bad, "sec-bad") {
                shown.push((format!("Connector error for {bad}"), format!("{e} {e:?}")));
            }
            let config = Config::new(bad.clone());
            shown.push((format!("Config Debug for {bad}"), format!("{config:?}")));
            if let Err(e) = App::new(()).start(config).await.map(drop) {
                shown.push((format!("App::start error for {bad}"), format!("{e} {e:?}")));
            }
            if let Err(e) = Client::connect(&bad, "sec-bad").await.map(drop) {
                shown.push((format!("Client error for {bad}"), format!("{e} {e:?}")));
            }
            shown.push((
                format!("redact({bad})"),
                cottontail::connection::redact(&bad),
            ));
        }

        client.close().await;
        app.stop().await.unwrap();
        let _ = conn.close(200, "bye".into()).await;
        let mut names = handler_queues(&queue, &RetryPolicy::default());
        names.extend(handler_queues(&retry_queue, &RetryPolicy::default()));
        delete_queues(&names).await;
    })
    .await;

    // Give the last log lines (connection close, consumer end) a moment.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for (what, text) in &shown {
        assert_clean(what, text, &secrets);
    }
    let text = logs.text();
    // The capture works and saw the interesting events.
    assert!(
        text.contains("connected to broker"),
        "no connect log captured"
    );
    assert!(
        text.contains("connect failed"),
        "no failed-connect log captured"
    );
    assert!(
        text.contains("dead-lettering message"),
        "no handler-error log captured"
    );
    assert!(
        text.contains(&format!("{}:***@", user.name)),
        "redacted URL logged"
    );
    assert_clean("logs", &text, &secrets);
}

#[test]
fn http_binds_to_loopback_by_default() {
    // Only this test touches these variables.
    std::env::remove_var("COTTONTAIL_HTTP_ADDR");
    let config = Config::from_env().unwrap();
    let addr = config.http_addr.expect("HTTP on by default");
    assert!(addr.ip().is_loopback(), "{addr}");
    assert_eq!(addr, SocketAddr::from((Ipv4Addr::LOCALHOST, 9090)));
    std::env::set_var("COTTONTAIL_HTTP_ADDR", "");
    assert_eq!(Config::from_env().unwrap().http_addr, None);
    std::env::remove_var("COTTONTAIL_HTTP_ADDR");
}

async fn count(State(ran): State<Counter>, Json(v): Json<Value>) -> Result<(), HandlerError> {
    ran.add(v["id"].as_str().unwrap_or("?"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_max_body_are_dead_lettered_unread() {
    bounded(LIMIT, async {
        let name = unique("sec-size");
        let queue = Queue::new(&name).expires(EXPIRES).max_body(100);
        let ran = Counter::default();
        let app = start(
            App::new(ran.clone()).handler(queue.clone(), count),
            &unique("app"),
        )
        .await;
        let conn = connect(&unique("client")).await;
        let dlq = collect(&conn, &queue.dlq_name()).await;
        let ch = confirm_channel(&conn).await;

        // Exactly at the limit: handled. One byte over, and far over: dead-lettered.
        let body_of = |id: &str, len: usize| {
            let mut body = format!(r#"{{"id":"{id}","pad":""#).into_bytes();
            let pad = len - body.len() - 2;
            body.extend(std::iter::repeat_n(b'x', pad));
            body.extend_from_slice(b"\"}");
            assert_eq!(body.len(), len);
            body
        };
        let at_limit = body_of("fits", 100);
        let over = body_of("over", 101);
        let huge = body_of("huge", 1024 * 1024);
        for (id, body) in [("fits", &at_limit), ("over", &over), ("huge", &huge)] {
            publish(&ch, &name, body, json_props().with_message_id(id.into())).await;
        }
        let dead = dlq.wait_for(2, Duration::from_secs(20)).await;
        let r2 = ran.clone();
        wait_until(Duration::from_secs(20), "the fitting message", move || {
            let r2 = r2.clone();
            async move { r2.get("fits") == 1 }
        })
        .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(ran.get("over"), 0, "handler ran on an oversized body");
        assert_eq!(ran.get("huge"), 0, "handler ran on an oversized body");
        assert_eq!(dlq.len(), 2);
        for d in &dead {
            let id = d.properties.message_id().as_ref().unwrap().to_string();
            assert_eq!(header_str(d, "x-error-kind").as_deref(), Some("too_large"));
            let reason = header_str(d, "x-error").unwrap();
            assert!(reason.contains("limit of 100 bytes"), "{reason}");
            let want = if id == "over" { &over } else { &huge };
            assert_eq!(&d.data, want, "body kept intact");
        }
        assert!(app.health().is_ready());
        app.stop().await.unwrap();
        delete_queues(&handler_queues(&queue, &RetryPolicy::default())).await;
    })
    .await;
}
