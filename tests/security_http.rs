//! Access to the HTTP surface: job results and the status data need the API token when one
//! is set, and are served only on a loopback address when none is; metrics and health stay
//! open.
use cottontail_test_support as common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use cottontail::{App, Config, HandlerError, Json, Queue, Running};

const TOKEN: &str = "s3cret-token";

async fn echo(Json(v): Json<serde_json::Value>) -> Result<Json<serde_json::Value>, HandlerError> {
    Ok(Json(v))
}

/// Starts an echo handler with `config` and runs one job (`message_id` "job-1") through it.
async fn app_with_a_job(config: Config) -> (Running, Queue) {
    let queue = Queue::new(unique("secured")).expires(EXPIRES);
    let app = start_with(App::new(()).handler(queue.clone(), echo), config).await;
    let conn = connect(&unique("client")).await;
    let ch = confirm_channel(&conn).await;
    publish(
        &ch,
        queue.name(),
        br#"{"order":"o-1"}"#,
        json_props().with_message_id("job-1".into()),
    )
    .await;
    let _ = conn.close(200, "bye".into()).await;
    (app, queue)
}

/// The app's port on the loopback interface (it may be bound to 0.0.0.0).
fn local(app: &Running) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], app.http_addr().unwrap().port()))
}

async fn open_endpoints_answer(http: SocketAddr) {
    for path in ["/metrics", "/health/live", "/"] {
        assert_eq!(http_get(http, path).await.0, 200, "{path} must stay open");
    }
}

async fn finish(app: Running, queue: Queue) {
    app.stop().await.unwrap();
    delete_queues(&handler_queues(&queue, &cottontail::RetryPolicy::default())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_token_set_jobs_and_status_need_it() {
    bounded(Duration::from_secs(60), async {
        let config = config(&unique("token-app"))
            .http("127.0.0.1:0".parse().unwrap())
            .api_token(TOKEN);
        let (app, queue) = app_with_a_job(config).await;
        let http = local(&app);
        let bearer = format!("Bearer {TOKEN}");
        let good = [("Authorization", bearer.as_str())];
        wait_until(Duration::from_secs(20), "the job succeeded", || async {
            let (code, body) = http_get_with(http, "/jobs/job-1", &good).await;
            code == 200 && body.contains("succeeded")
        })
        .await;

        let wrong = format!("Bearer {TOKEN}x");
        let short = format!("Bearer {}", &TOKEN[..4]);
        for path in ["/jobs/job-1", "/jobs/unknown", "/status.json"] {
            let (code, body) = http_get(http, path).await;
            assert_eq!(code, 401, "{path} without a token: {body}");
            assert!(!body.contains("o-1"), "{body}");
            for header in [
                ("Authorization", wrong.as_str()),
                ("Authorization", short.as_str()),
                ("Authorization", TOKEN),
                ("Authorization", "Basic czNjcmV0LXRva2Vu"),
            ] {
                let (code, _) = http_get_with(http, path, &[header]).await;
                assert_eq!(code, 401, "{path} with {header:?}");
            }
        }
        // Cancelling a job changes state: behind the token too.
        for header in [&[][..], &[("Authorization", wrong.as_str())][..]] {
            let (code, _) = http_post_with(http, "/jobs/job-1/cancel", header).await;
            assert_eq!(code, 401, "cancel with {header:?}");
        }
        let (code, body) = http_get_with(http, "/status.json", &good).await;
        assert_eq!(code, 200, "{body}");
        assert!(body.contains(queue.name()), "{body}");
        assert_eq!(http_get_with(http, "/jobs/unknown", &good).await.0, 404);
        open_endpoints_answer(http).await;
        finish(app, queue).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_a_non_loopback_address_refuses_data_but_serves_health() {
    bounded(Duration::from_secs(60), async {
        let config = config(&unique("open-app")).http("0.0.0.0:0".parse().unwrap());
        let (app, queue) = app_with_a_job(config).await;
        let http = local(&app);
        // The job ran (the handler's metrics say so) but nobody may read it here.
        wait_until(Duration::from_secs(20), "the job handled", || async {
            http_get(http, "/metrics")
                .await
                .1
                .contains("outcome=\"ok\"")
        })
        .await;
        for path in ["/jobs/job-1", "/jobs/unknown", "/status.json"] {
            let (code, body) = http_get(http, path).await;
            assert_eq!(code, 403, "{path}: {body}");
            assert!(body.contains("COTTONTAIL_API_TOKEN"), "{body}");
            let bearer = format!("Bearer {TOKEN}");
            let (code, _) = http_get_with(http, path, &[("Authorization", &bearer)]).await;
            assert_eq!(
                code, 403,
                "{path}: no token is configured, none is accepted"
            );
        }
        let (code, _) = http_post_with(http, "/jobs/job-1/cancel", &[]).await;
        assert_eq!(code, 403, "cancel needs a token off loopback");
        open_endpoints_answer(http).await;
        assert_eq!(http_get(http, "/health/ready").await.0, 200);
        finish(app, queue).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_a_loopback_address_serves_everything() {
    bounded(Duration::from_secs(60), async {
        let config = config(&unique("local-app")).http("127.0.0.1:0".parse().unwrap());
        let (app, queue) = app_with_a_job(config).await;
        let http = local(&app);
        wait_until(Duration::from_secs(20), "the job succeeded", || async {
            let (code, body) = http_get(http, "/jobs/job-1").await;
            code == 200 && body.contains("succeeded")
        })
        .await;
        assert_eq!(http_get(http, "/status.json").await.0, 200);
        open_endpoints_answer(http).await;
        finish(app, queue).await;
    })
    .await;
}
