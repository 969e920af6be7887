//! Fan-out / fan-in against the real broker: the `albums` demo workflow (docs/contracts.md,
//! "Workflows") under a unique name, on two instances sharing Redis, its children sent to a
//! thumbnails handler on a unique queue. An album of 20 images gets 20 thumbnails in input
//! order; an album with one undecodable image gets an `invalid_input` error naming its index;
//! copies of child replies published by hand to the join queue do not fire the join again.
#![cfg(feature = "redis")]
use cottontail_test_support as common;

use std::io::Cursor;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use common::*;
use cottontail::headers;
use cottontail::lapin::types::AMQPValue;
use cottontail::stores::{JobStore, RedisStore};
use cottontail::{App, Dedup, Queue};
use serde_json::{json, Value};

/// A `w`×`h` PNG, base64.
fn png(w: u32, h: u32) -> String {
    let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, 7]));
    let mut out = Vec::new();
    image::DynamicImage::ImageRgb8(img)
        .write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png)
        .unwrap();
    BASE64.encode(out)
}

/// One instance: the albums workflow and the thumbnails handler it fans out to.
fn instance(name: &str, thumbnails: &str, store: &RedisStore) -> App<()> {
    let dedup = Dedup::new(store.clone())
        .lease(Duration::from_secs(5))
        .busy_delay(Duration::from_millis(200))
        .retention(Duration::from_secs(600));
    App::new(())
        .workflow(
            cottontail_albums::workflow(name, thumbnails)
                .dedup(dedup)
                .queues(|q| q.expires(EXPIRES)),
        )
        .handler(
            Queue::new(thumbnails)
                .priority(9)
                .concurrency(2)
                .expires(EXPIRES),
            cottontail_thumbnails::handle,
        )
        .job_store(store.clone())
}

fn finals(inbox: &Inbox, correlation_id: &str) -> Vec<(String, Value)> {
    inbox
        .all()
        .iter()
        .filter(|r| {
            r.properties.correlation_id().as_ref().map(|c| c.as_str()) == Some(correlation_id)
        })
        .filter(|r| header_str(r, "x-status").as_deref() != Some("progress"))
        .map(|r| {
            (
                header_str(r, "x-status").unwrap(),
                serde_json::from_slice(&r.data).unwrap(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn albums_join_in_order_name_the_bad_image_and_ignore_duplicate_completions() {
    bounded(Duration::from_secs(120), async {
        let name = unique("albums");
        let thumbnails = unique("thumbs");
        let store = RedisStore::connect(&redis_url(), &unique("albums"))
            .await
            .expect("Redis");
        let mut apps = Vec::new();
        let mut metrics = Vec::new();
        for _ in 0..2 {
            let app = instance(&name, &thumbnails, &store);
            metrics.push(app.metrics().clone());
            apps.push(start(app, &unique("albums")).await);
        }
        let conn = connect(&unique("caller")).await;
        let ch = confirm_channel(&conn).await;
        let (reply_to, replies) = reply_queue(&conn).await;
        let call = |id: &str, body: Value| {
            let props = json_props()
                .with_reply_to(reply_to.as_str().into())
                .with_correlation_id(id.into())
                .with_message_id(id.into());
            (body.to_string().into_bytes(), props)
        };
        // 20 images of different shapes; a second album whose image 3 is not an image.
        let sizes: Vec<(u32, u32)> = (0..20).map(|i| (100 + 10 * i, 50 + 7 * i)).collect();
        let images: Vec<String> = sizes.iter().map(|(w, h)| png(*w, *h)).collect();
        let mut bad = images[..6].to_vec();
        bad[3] = BASE64.encode(b"definitely not an image");
        bad[5] = "%%% not base64".into();
        publish_many(
            &ch,
            &name,
            vec![
                call(
                    "a-1",
                    json!({"album_id": "a-1", "images": images, "max_side": 64}),
                ),
                call(
                    "a-2",
                    json!({"album_id": "a-2", "images": bad, "max_side": 64}),
                ),
            ],
        )
        .await;
        wait_until(Duration::from_secs(60), "both albums answered", || {
            let n = finals(&replies, "a-1").len() + finals(&replies, "a-2").len();
            async move { n >= 2 }
        })
        .await;

        let ok = finals(&replies, "a-1");
        assert_eq!(ok.len(), 1);
        let (status, body) = &ok[0];
        assert_eq!(status, "ok", "{body}");
        assert_eq!(body["album_id"], "a-1");
        let thumbs = body["thumbnails"].as_array().unwrap();
        assert_eq!(thumbs.len(), 20);
        for (i, (thumb, (w, h))) in thumbs.iter().zip(&sizes).enumerate() {
            // Longest side 64, aspect ratio kept: the order is the input's.
            let want_h = (f64::from(*h) * 64.0 / f64::from(*w)).round() as u64;
            assert_eq!(thumb["width"], 64, "thumbnail {i}");
            assert!(
                thumb["height"].as_u64().unwrap().abs_diff(want_h) <= 1,
                "thumbnail {i}: {} for {w}x{h}",
                thumb["height"]
            );
            let png = BASE64.decode(thumb["image"].as_str().unwrap()).unwrap();
            assert!(png.starts_with(b"\x89PNG"), "thumbnail {i} is a PNG");
        }
        let failed = finals(&replies, "a-2");
        assert_eq!(failed.len(), 1);
        let (status, body) = &failed[0];
        assert_eq!(status, "error");
        assert_eq!(body["error"]["kind"], "invalid_input", "{body}");
        assert_eq!(body["error"]["index"], 3, "the first bad image: {body}");
        assert!(body["error"]["message"].as_str().unwrap().contains("image"));
        wait_job_status(&store, "a-1", "succeeded", Duration::from_secs(10)).await;
        wait_job_status(&store, "a-2", "failed", Duration::from_secs(10)).await;

        // Copies of child completions published by hand to the join queue: the last child of
        // the complete album (it completes the join again), and an early one.
        let join = cottontail::names::workflow_join(&name, "thumbnails");
        let handler_ok = |app: usize| common::dedup::outcome(&metrics[app], &join, "ok");
        let before = handler_ok(0) + handler_ok(1);
        for i in [19, 0, 19] {
            let props = json_props().with_correlation_id(format!("a-1:thumbnails:{i}/20").into());
            let props = with_header(props, headers::STATUS, AMQPValue::LongString("ok".into()));
            let body = json!({"width": 1, "height": 1, "image": "copy"}).to_string();
            publish(&ch, &join, body.as_bytes(), props).await;
        }
        wait_until(Duration::from_secs(20), "the copies consumed", || {
            let n = handler_ok(0) + handler_ok(1);
            async move { n >= before + 3.0 }
        })
        .await;
        // Anything the copies could have sent would be confirmed before their ack.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(finals(&replies, "a-1").len(), 1, "the join fired once");
        let completed: f64 = metrics
            .iter()
            .map(|metrics| {
                metric_value(
                    &metrics.render(),
                    "cottontail_workflows_completed_total",
                    &[("workflow", name.as_str())],
                )
                .unwrap_or(0.0)
            })
            .sum();
        assert_eq!(completed, 1.0);
        let status = store.get("a-1").await.unwrap().unwrap();
        assert_eq!(status.status, "succeeded");
        let first: Value = status.result.unwrap();
        assert_eq!(
            first["thumbnails"][19]["width"], 64,
            "the first record stays"
        );

        for app in apps {
            app.stop().await.unwrap();
        }
        let step = cottontail::names::workflow_step(&name, "thumbnails");
        let queues: Vec<String> = [&name, &thumbnails, &join, &step]
            .iter()
            .flat_map(|q| handler_queues(&Queue::new(*q), &Default::default()))
            .collect();
        delete_queues_quietly(&queues).await;
    })
    .await;
}
