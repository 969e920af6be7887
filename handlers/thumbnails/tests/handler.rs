//! The thumbnails handler through `cottontail::testing`: no broker, the handler's own queue
//! settings, the same pipeline as in the service.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use cottontail::testing::{Status, TestHandler, TestMessage};
use cottontail_thumbnails::{handle, queue, render, Request, Thumbnail, QUEUE};
use serde_json::{json, Value};

/// A `w`×`h` PNG, base64 (the crate's own encoder writes it).
fn png(w: u32, h: u32) -> String {
    render(image::DynamicImage::new_rgb8(w, h), w.max(h))
        .unwrap()
        .image
}

fn request(image: String, max_side: u32) -> TestMessage {
    TestMessage::json(&Request { image, max_side })
        .reply_to("caller")
        .correlation_id("c-1")
}

#[tokio::test]
async fn a_thumbnail_comes_after_two_progress_replies() {
    let run = TestHandler::new(queue(), handle)
        .run(request(png(200, 100), 64))
        .await;
    assert!(run.is_ok(), "{run:?}");
    let progress: Vec<Value> = run.progress().map(|r| r.json()).collect();
    assert_eq!(
        progress,
        [
            json!({"stage": "decoded", "width": 200, "height": 100}),
            json!({"stage": "resized"})
        ]
    );
    let reply = run.reply().unwrap();
    assert_eq!(reply.status, Status::Ok);
    assert_eq!(reply.correlation_id.as_deref(), Some("c-1"));
    let thumb: Thumbnail = reply.json();
    assert_eq!((thumb.width, thumb.height), (64, 32));
    // The progress replies precede the final one.
    assert_eq!(run.replies.last().unwrap().status, Status::Ok);
    assert!(run.outbox.is_empty());
}

#[tokio::test]
async fn an_invalid_image_is_dead_lettered_with_an_error_reply() {
    let t = TestHandler::new(queue(), handle);
    let garbage = BASE64.encode(b"definitely not an image");
    let run = t.run(request(garbage, 64)).await;
    let dead = run.dead_letter().expect("dead-lettered");
    assert_eq!(dead.kind, "invalid_input");
    assert!(dead.error.contains("not a PNG or JPEG"), "{}", dead.error);
    assert_eq!(dead.handler, QUEUE);
    assert_eq!(dead.attempts, 1, "bad input is not retried");
    assert_eq!(run.progress().count(), 0);
    let reply = run.reply().unwrap();
    assert_eq!(reply.status, Status::Error);
    assert_eq!(reply.json::<Value>()["error"]["kind"], "invalid_input");
}

#[tokio::test]
async fn bad_requests_are_invalid_input() {
    let t = TestHandler::new(queue(), handle);
    for msg in [
        request(png(4, 4), 0),
        request("%%% not base64".into(), 64),
        TestMessage::json(&json!({"image": 5})),
    ] {
        let run = t.run(msg).await;
        assert_eq!(
            run.dead_letter().expect("dead-lettered").kind,
            "invalid_input"
        );
    }
}
