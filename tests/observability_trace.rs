//! Trace propagation: a request's `traceparent` becomes the handler span's trace id, the
//! reply carries the same trace onward, and a retried message stays in one trace.
use cottontail_test_support as common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use cottontail::lapin::types::AMQPValue;
use cottontail::{App, Attempt, HandlerError, Queue, RetryPolicy};
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::Layer;

/// Records the `message_id` and `trace_id` fields of every `message` span.
#[derive(Clone, Default)]
struct SpanTraces(Arc<Mutex<Vec<(String, String)>>>);

impl SpanTraces {
    fn traces_of(&self, message_id: &str) -> Vec<String> {
        let spans = self.0.lock().unwrap();
        spans
            .iter()
            .filter(|(id, _)| id == message_id)
            .map(|(_, trace)| trace.clone())
            .collect()
    }
}

#[derive(Default)]
struct TraceIdVisitor {
    message_id: String,
    trace_id: Option<String>,
}

impl Visit for TraceIdVisitor {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message_id" {
            self.message_id = value.to_owned();
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "trace_id" {
            self.trace_id = Some(format!("{value:?}"));
        }
    }
}

impl<S: tracing::Subscriber> Layer<S> for SpanTraces {
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        _: &tracing::span::Id,
        _: Context<'_, S>,
    ) {
        if attrs.metadata().name() == "message" {
            let mut v = TraceIdVisitor::default();
            attrs.record(&mut v);
            if let Some(trace) = v.trace_id {
                self.0.lock().unwrap().push((v.message_id, trace));
            }
        }
    }
}

async fn echo(
    cottontail::Json(v): cottontail::Json<serde_json::Value>,
) -> cottontail::Json<serde_json::Value> {
    cottontail::Json(v)
}

/// Fails the first attempt of every message, transiently.
async fn fails_once(
    Attempt(attempt): Attempt,
    cottontail::Json(v): cottontail::Json<serde_json::Value>,
) -> Result<cottontail::Json<serde_json::Value>, HandlerError> {
    if attempt == 1 {
        return Err(HandlerError::transient("flaky", "first attempt fails"));
    }
    Ok(cottontail::Json(v))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traceparent_flows_from_request_to_handler_span_to_reply() {
    let spans = SpanTraces::default();
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(spans.clone()))
        .unwrap();

    let name = unique("trace");
    let queue = Queue::new(&name).expires(EXPIRES);
    let flaky_name = unique("trace-retry");
    let retry = RetryPolicy::fixed(Duration::from_millis(100)).max_attempts(3);
    let flaky = Queue::new(&flaky_name)
        .expires(EXPIRES)
        .retry(retry.clone());
    let app = start(
        App::new(())
            .handler(queue.clone(), echo)
            .handler(flaky.clone(), fails_once),
        &unique("app"),
    )
    .await;
    let conn = connect(&unique("client")).await;
    let (reply_to, replies) = reply_queue(&conn).await;
    let ch = confirm_channel(&conn).await;

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent = format!("00-{trace_id}-00f067aa0ba902b7-01");
    let props = with_header(
        json_props()
            .with_reply_to(reply_to.as_str().into())
            .with_correlation_id("traced".into())
            .with_message_id("traced-msg".into()),
        "traceparent",
        AMQPValue::LongString(parent.as_str().into()),
    );
    publish(&ch, &name, b"{}", props).await;
    let untraced = json_props()
        .with_reply_to(reply_to.as_str().into())
        .with_correlation_id("fresh".into());
    publish(&ch, &name, b"{}", untraced).await;

    let got = replies.wait_for(2, Duration::from_secs(20)).await;
    let by_cid = |cid: &str| {
        got.iter()
            .find(|r| r.properties.correlation_id().as_ref().unwrap().as_str() == cid)
            .unwrap()
    };
    let reply_tp = header_str(by_cid("traced"), "traceparent").expect("reply carries traceparent");
    assert!(
        reply_tp.starts_with(&format!("00-{trace_id}-")),
        "{reply_tp}"
    );
    assert_ne!(reply_tp, parent, "the handler's span id is its own");
    assert_eq!(spans.traces_of("traced-msg"), vec![trace_id.to_owned()]);

    let fresh =
        cottontail::TraceContext::parse(&header_str(by_cid("fresh"), "traceparent").unwrap())
            .unwrap();
    assert_ne!(
        fresh.trace_id_hex(),
        trace_id,
        "a message without a trace starts a new one"
    );

    // A message without a trace that is retried: the handler starts a trace on the first
    // attempt and the retry copy carries it, so both attempts are in it.
    publish(
        &ch,
        &flaky_name,
        b"{}",
        json_props()
            .with_reply_to(reply_to.as_str().into())
            .with_correlation_id("retried".into())
            .with_message_id("retried-msg".into()),
    )
    .await;
    let got = replies.wait_for(3, Duration::from_secs(20)).await;
    let reply = got
        .iter()
        .find(|r| r.properties.correlation_id().as_ref().unwrap().as_str() == "retried")
        .unwrap();
    let attempts = spans.traces_of("retried-msg");
    assert_eq!(attempts.len(), 2, "{attempts:?}");
    assert_eq!(attempts[0], attempts[1], "both attempts are in one trace");
    let reply_tp = header_str(reply, "traceparent").unwrap();
    assert!(
        reply_tp.starts_with(&format!("00-{}-", attempts[0])),
        "{reply_tp}"
    );

    app.stop().await.unwrap();
    delete_queues(&handler_queues(&queue, &RetryPolicy::default())).await;
    delete_queues(&handler_queues(&flaky, &retry)).await;
}
