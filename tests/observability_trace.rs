//! Trace propagation: a request's `traceparent` becomes the handler span's trace id, and the
//! reply carries the same trace onward.
mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use cottontail::lapin::types::AMQPValue;
use cottontail::{App, Queue};
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::Layer;

/// Records the `trace_id` field of every `message` span.
#[derive(Clone, Default)]
struct SpanTraces(Arc<Mutex<Vec<String>>>);

struct TraceIdVisitor(Option<String>);

impl Visit for TraceIdVisitor {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "trace_id" {
            self.0 = Some(format!("{value:?}"));
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
            let mut v = TraceIdVisitor(None);
            attrs.record(&mut v);
            if let Some(id) = v.0 {
                self.0.lock().unwrap().push(id);
            }
        }
    }
}

async fn echo(
    cottontail::Json(v): cottontail::Json<serde_json::Value>,
) -> cottontail::Json<serde_json::Value> {
    cottontail::Json(v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traceparent_flows_from_request_to_handler_span_to_reply() {
    let spans = SpanTraces::default();
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(spans.clone()))
        .unwrap();

    let name = unique("trace");
    let queue = Queue::new(&name).expires(EXPIRES);
    let app = start(App::new(()).handler(queue.clone(), echo), &unique("app")).await;
    let conn = connect(&unique("client")).await;
    let (reply_to, replies) = reply_queue(&conn).await;
    let ch = confirm_channel(&conn).await;

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent = format!("00-{trace_id}-00f067aa0ba902b7-01");
    let props = with_header(
        json_props()
            .with_reply_to(reply_to.as_str().into())
            .with_correlation_id("traced".into()),
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
    assert!(
        spans.0.lock().unwrap().iter().any(|t| t == trace_id),
        "{:?}",
        spans.0.lock().unwrap()
    );

    let fresh =
        cottontail::TraceContext::parse(&header_str(by_cid("fresh"), "traceparent").unwrap())
            .unwrap();
    assert_ne!(
        fresh.trace_id_hex(),
        trace_id,
        "a message without a trace starts a new one"
    );
    app.stop().await.unwrap();
    delete_queues(&handler_queues(&queue, &cottontail::RetryPolicy::default())).await;
}
