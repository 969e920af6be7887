//! The built-in status page: its data (`/status.json`), and the page rendered by headless
//! Chromium (Debian's `chromium` package).
use cottontail_test_support as common;

use std::time::Duration;

use common::*;
use cottontail::{App, HandlerError, Json, Queue};

async fn picky(Json(v): Json<serde_json::Value>) -> Result<(), HandlerError> {
    if v["bad"] == true {
        return Err(HandlerError::permanent(
            "rejected_by_test",
            "bad on purpose",
        ));
    }
    Ok(())
}

/// The fields of a `/status.json` handler row that count messages.
const COUNTS: [&str; 5] = ["ok", "retried", "dead_lettered", "duplicate", "in_flight"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_json_counts_are_integers() {
    let name = unique("status-json");
    let queue = Queue::new(&name).expires(EXPIRES);
    let config = config(&unique("app")).http("127.0.0.1:0".parse().unwrap());
    let app = start_with(App::new(()).handler(queue.clone(), picky), config).await;
    let http = app.http_addr().unwrap();
    let conn = connect(&unique("client")).await;
    let ch = confirm_channel(&conn).await;
    for _ in 0..3 {
        publish(&ch, &name, br#"{"bad":false}"#, json_props()).await;
    }
    for _ in 0..2 {
        publish(&ch, &name, br#"{"bad":true}"#, json_props()).await;
    }
    let row = |status: &serde_json::Value| {
        status["handlers"]
            .as_array()
            .and_then(|rows| rows.iter().find(|r| r["handler"] == name.as_str()))
            .cloned()
            .unwrap_or_else(|| panic!("no row for {name}: {status}"))
    };
    let status = || async {
        let (code, body) = http_get(http, "/status.json").await;
        assert_eq!(code, 200, "{body}");
        serde_json::from_str::<serde_json::Value>(&body).expect("JSON")
    };
    wait_until(Duration::from_secs(20), "all five settled", || async {
        let row = row(&status().await);
        row["ok"].as_f64() == Some(3.0) && row["dead_lettered"].as_f64() == Some(2.0)
    })
    .await;

    let status = status().await;
    let row = row(&status);
    // Integers, not `3.0`: a client in a typed language reading counts must not get floats.
    for field in COUNTS {
        assert!(row[field].is_u64(), "{field} is not an integer: {row}");
    }
    assert_eq!(row["ok"], 3, "{row}");
    assert_eq!(row["dead_lettered"], 2, "{row}");
    assert_eq!(row["retried"], 0, "{row}");
    assert_eq!(row["duplicate"], 0, "{row}");
    assert_eq!(row["in_flight"], 0, "{row}");
    // Times stay fractional seconds.
    assert!(status["recent_dead_letters"][0]["at"].is_f64(), "{status}");

    app.stop().await.unwrap();
    delete_queues(&handler_queues(&queue, &cottontail::RetryPolicy::default())).await;
}

fn chromium(args: &[&str]) -> std::process::Output {
    let user_dir = std::env::temp_dir().join(unique("chromium-profile"));
    let out = std::process::Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--virtual-time-budget=5000",
        ])
        .arg(format!("--user-data-dir={}", user_dir.display()))
        .args(args)
        .output()
        .expect("chromium is installed (scripts/test.sh installs it)");
    let _ = std::fs::remove_dir_all(user_dir);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_renders_the_handlers_table_in_chromium() {
    let name = unique("status");
    let queue = Queue::new(&name).expires(EXPIRES);
    let config = config(&unique("app")).http("127.0.0.1:0".parse().unwrap());
    let app = start_with(App::new(()).handler(queue.clone(), picky), config).await;
    let http = app.http_addr().unwrap();
    let conn = connect(&unique("client")).await;
    let ch = confirm_channel(&conn).await;
    publish(&ch, &name, br#"{"bad":false}"#, json_props()).await;
    publish(
        &ch,
        &name,
        br#"{"bad":true}"#,
        json_props().with_message_id("the-bad-one".into()),
    )
    .await;
    wait_until(Duration::from_secs(20), "both settled", || async move {
        http_get(http, "/status.json")
            .await
            .1
            .contains("the-bad-one")
    })
    .await;

    let url = format!("http://{http}/");
    let dom = tokio::task::spawn_blocking({
        let url = url.clone();
        move || chromium(&["--dump-dom", &url])
    })
    .await
    .unwrap();
    let dom = String::from_utf8_lossy(&dom.stdout).to_string();
    assert!(
        dom.contains(&format!("<td class=\"l\">{name}</td>")),
        "handlers table not rendered:\n{dom}"
    );
    assert!(
        dom.contains("rejected_by_test"),
        "recent dead-letters not rendered:\n{dom}"
    );
    assert!(dom.contains(">ready<") || dom.contains(">ready ·"), "{dom}");

    let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("status-page.png");
    let _ = std::fs::remove_file(&shot);
    let arg = format!("--screenshot={}", shot.display());
    let out =
        tokio::task::spawn_blocking(move || chromium(&[&arg, "--window-size=1200,700", &url]))
            .await
            .unwrap();
    let png = std::fs::read(&shot)
        .unwrap_or_else(|_| panic!("no screenshot: {}", String::from_utf8_lossy(&out.stderr)));
    assert!(png.starts_with(b"\x89PNG"), "not a PNG");
    assert!(
        png.len() > 10_000,
        "suspiciously small screenshot ({} bytes)",
        png.len()
    );
    app.stop().await.unwrap();
    delete_queues(&handler_queues(&queue, &cottontail::RetryPolicy::default())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_an_api_token_the_status_page_asks_for_it_then_renders() {
    const TOKEN: &str = "page-token-123";
    let name = unique("status-token");
    let queue = Queue::new(&name).expires(EXPIRES);
    let config = config(&unique("app"))
        .http("127.0.0.1:0".parse().unwrap())
        .api_token(TOKEN);
    let app = start_with(App::new(()).handler(queue.clone(), picky), config).await;
    let http = app.http_addr().unwrap();
    assert_eq!(http_get(http, "/status.json").await.0, 401);
    let dom_of = |url: String| async move {
        let out = tokio::task::spawn_blocking(move || chromium(&["--dump-dom", &url]))
            .await
            .unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    };

    // Without the token: the page asks for it and shows no data.
    let dom = dom_of(format!("http://{http}/")).await;
    assert!(
        dom.contains(r#"<form id="auth">"#),
        "the token form is not shown:\n{dom}"
    );
    assert!(dom.contains("needs its API token"), "{dom}");
    assert!(
        !dom.contains(&name),
        "data rendered without the token:\n{dom}"
    );

    // Given the token (as the form would store it), its data calls carry it and render.
    let dom = dom_of(format!("http://{http}/#token={TOKEN}")).await;
    assert!(
        dom.contains(&format!("<td class=\"l\">{name}</td>")),
        "handlers table not rendered with the token:\n{dom}"
    );
    assert!(dom.contains(r#"<form id="auth" hidden="">"#), "{dom}");
    app.stop().await.unwrap();
    delete_queues(&handler_queues(&queue, &cottontail::RetryPolicy::default())).await;
}
