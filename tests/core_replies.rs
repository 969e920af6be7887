//! Replies: `reply_to` + `correlation_id` get `x-status: ok` with the output, or `error` with
//! the envelope; a plain AMQP client is on the other side.
use cottontail_test_support as common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use cottontail::{App, HandlerError, Json, Queue};
use serde::{Deserialize, Serialize};

#[derive(Deserialize, Serialize)]
struct Req {
    n: i64,
}

async fn double(Json(req): Json<Req>) -> Result<Json<Req>, HandlerError> {
    if req.n < 0 {
        return Err(HandlerError::permanent(
            "negative",
            format!("{} is negative", req.n),
        ));
    }
    Ok(Json(Req { n: req.n * 2 }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_carry_the_requests_correlation_id_and_status() {
    let name = unique("replies");
    let queue = Queue::new(&name).expires(EXPIRES);
    let app = start(App::new(()).handler(queue.clone(), double), &unique("app")).await;

    let conn = connect(&unique("caller")).await;
    let ch = confirm_channel(&conn).await;
    let (reply_to, inbox) = reply_queue(&conn).await;
    let items = (0..200)
        .map(|n| {
            let props = json_props()
                .with_reply_to(reply_to.as_str().into())
                .with_correlation_id(format!("c-{n}").into());
            (format!(r#"{{"n":{n}}}"#).into_bytes(), props)
        })
        .collect();
    publish_many(&ch, &name, items).await;

    let replies = inbox.wait_for(200, Duration::from_secs(20)).await;
    let mut ids = HashSet::new();
    for r in &replies {
        let cid = r.properties.correlation_id().as_ref().unwrap().to_string();
        let n: i64 = cid.trim_start_matches("c-").parse().unwrap();
        let body: Req = serde_json::from_slice(&r.data).unwrap();
        assert_eq!(
            body.n,
            n * 2,
            "reply for {cid} carries another request's answer"
        );
        assert_eq!(header_str(r, "x-status").as_deref(), Some("ok"));
        assert!(ids.insert(cid));
    }
    assert_eq!(ids.len(), 200);

    // A permanent failure answers with the error envelope and keeps the correlation id.
    let props = json_props()
        .with_reply_to(reply_to.as_str().into())
        .with_correlation_id("bad-1".into());
    publish(&ch, &name, br#"{"n":-5}"#, props).await;
    let replies = inbox.wait_for(201, Duration::from_secs(20)).await;
    let err = replies
        .iter()
        .find(|r| r.properties.correlation_id().as_ref().map(|c| c.as_str()) == Some("bad-1"))
        .unwrap();
    assert_eq!(header_str(err, "x-status").as_deref(), Some("error"));
    let body: serde_json::Value = serde_json::from_slice(&err.data).unwrap();
    assert_eq!(body["error"]["kind"], "negative");
    assert_eq!(body["error"]["message"], "-5 is negative");

    app.stop().await.unwrap();
    delete_queues(&handler_queues(&queue, &cottontail::RetryPolicy::default())).await;
}
