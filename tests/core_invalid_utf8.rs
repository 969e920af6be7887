//! A message whose short strings (`message_id`, `correlation_id`, header names) are not valid
//! UTF-8 is published with hand-written frames (RabbitMQ stores it as it is). lapin's parser
//! would fail the whole connection on it, on every redelivery; the consumer survives and the
//! message is dead-lettered with kind `invalid_properties`, body intact, while the normal
//! messages around it are all handled on the same connection.
use cottontail_test_support as common;

use std::time::Duration;

use common::raw_amqp::{RawProps, RawPublisher};
use common::*;
use cottontail::ops::Metrics;
use cottontail::{App, Json, Queue, State};

#[derive(serde::Deserialize)]
struct Job {
    id: String,
}

async fn record(State(done): State<Counter>, Json(job): Json<Job>) {
    done.add(&job.id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_utf8_in_properties_is_dead_lettered_without_losing_the_connection() {
    bounded(Duration::from_secs(90), async {
        let name = unique("utf8");
        let done = Counter::default();
        let metrics = Metrics::default();
        let queue = Queue::new(&name).expires(EXPIRES);
        let running = start(
            App::new(done.clone())
                .with_metrics(metrics.clone())
                .handler(queue.clone(), record),
            &unique("utf8-app"),
        )
        .await;
        let conn = connect(&unique("utf8-test")).await;
        let dlq = collect(&conn, &queue.dlq_name()).await;
        let ch = confirm_channel(&conn).await;

        let bad = [
            (
                "bad-message-id",
                RawProps {
                    message_id: Some(b"id-\xff\xfe".to_vec()),
                    ..Default::default()
                },
                "message_id",
            ),
            (
                "bad-correlation-id",
                RawProps {
                    correlation_id: Some(b"corr-\xc3(".to_vec()),
                    ..Default::default()
                },
                "correlation_id",
            ),
            (
                "bad-header-name",
                RawProps {
                    message_id: Some(b"fine-id".to_vec()),
                    header_name: Some(b"x-\x80name".to_vec()),
                    ..Default::default()
                },
                "header name",
            ),
        ];
        for (normal, (id, props, _)) in bad.iter().enumerate() {
            let batch: Vec<_> = (0..20)
                .map(|i| {
                    let id = format!("ok-{normal}-{i}");
                    (format!(r#"{{"id":"{id}"}}"#).into_bytes(), json_props())
                })
                .collect();
            publish_many(&ch, &name, batch).await;
            let (queue_name, props, body) = (
                name.clone(),
                props.clone(),
                format!(r#"{{"id":"{id}"}}"#).into_bytes(),
            );
            tokio::task::spawn_blocking(move || {
                RawPublisher::connect(&amqp_url()).publish(&queue_name, &props, &body)
            })
            .await
            .unwrap();
        }
        let batch: Vec<_> = (0..20)
            .map(|i| {
                (
                    format!(r#"{{"id":"ok-last-{i}"}}"#).into_bytes(),
                    json_props(),
                )
            })
            .collect();
        publish_many(&ch, &name, batch).await;

        let handled = done.clone();
        wait_until(
            Duration::from_secs(30),
            "80 normal messages handled",
            move || {
                let handled = handled.clone();
                async move { handled.keys() == 80 }
            },
        )
        .await;
        let dead = dlq.wait_for(3, Duration::from_secs(30)).await;
        for (id, _, field) in &bad {
            let body = format!(r#"{{"id":"{id}"}}"#).into_bytes();
            let d = dead
                .iter()
                .find(|d| d.data == body)
                .unwrap_or_else(|| panic!("{id} not dead-lettered with its body intact"));
            assert_eq!(
                header_str(d, "x-error-kind").as_deref(),
                Some("invalid_properties")
            );
            let error = header_str(d, "x-error").unwrap_or_default();
            assert!(error.contains(field), "{id}: x-error {error:?}");
            assert!(
                header_str(d, "x-invalid-utf8").is_none(),
                "{id}: marker kept"
            );
            assert_eq!(done.get(id), 0, "{id} must not reach the handler");
        }
        // The consumer's connection never went down.
        let text = metrics.render();
        assert_eq!(
            metric_value(&text, "cottontail_connection_recoveries_total", &[]),
            Some(0.0),
            "{text}"
        );
        assert_eq!(queue_depth(&conn, &name).await, 0);
        running.stop().await.unwrap();
        let _ = conn.close(200, "bye".into()).await;
    })
    .await;
}
