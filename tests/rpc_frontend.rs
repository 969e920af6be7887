//! Results for callers in other languages: a Python (pika) front-end consumes replies from its
//! own reply queue and polls `GET /jobs/{message_id}` to watch the job run.
use cottontail_test_support as common;

use std::time::Duration;

use common::*;
use cottontail::{App, HandlerError, Json, Queue};
use serde::{Deserialize, Serialize};

#[derive(Deserialize, Serialize)]
struct Text {
    text: String,
}

async fn shout(Json(t): Json<Text>) -> Result<Json<Text>, HandlerError> {
    // Long enough for a poller to see `running`.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    Ok(Json(Text {
        text: t.text.to_uppercase(),
    }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pika_front_end_gets_its_reply_and_sees_running_then_succeeded() {
    let name = unique("frontend");
    let queue = Queue::new(&name).expires(EXPIRES);
    let config = config(&unique("app")).http("127.0.0.1:0".parse().unwrap());
    let app = start_with(App::new(()).handler(queue.clone(), shout), config).await;
    let http = app.http_addr().unwrap().to_string();
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/frontend/pika_frontend.py"
    );
    let out = tokio::process::Command::new("python3")
        .args([
            script,
            "--url",
            &amqp_url(),
            "--queue",
            &name,
            "--http",
            &http,
        ])
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), out)
        .await
        .unwrap()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "python front-end failed (is pika installed? scripts/test.sh installs it)\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("status: running"), "{stdout}");
    assert!(stdout.contains("status: succeeded"), "{stdout}");
    assert!(stdout.contains(r#"reply: {"text":"HELLO"}"#), "{stdout}");
    app.stop().await.unwrap();
    delete_queues(&handler_queues(&queue, &cottontail::RetryPolicy::default())).await;
}
