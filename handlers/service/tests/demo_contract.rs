//! The demo service's contract (`docs/contracts.md`, "Demo service"), driven from outside by
//! a plain AMQP client (raw lapin, not cottontail's client) against the real `cottontail-demo`
//! binary.
//!
//! The demo owns fixed queue names (`thumbnails`, `orders`), so everything here runs in one
//! test, in sequence.
mod common;

use common::{amqp_url, Demo};

use std::io::Cursor;
use std::time::Duration;

use base64::Engine;
use cottontail::lapin::options::*;
use cottontail::lapin::types::{AMQPValue, FieldTable};
use cottontail::lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use futures::StreamExt;

fn png(w: u32, h: u32) -> String {
    let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, 99]));
    let mut out = Vec::new();
    image::DynamicImage::ImageRgb8(img)
        .write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png)
        .unwrap();
    base64::engine::general_purpose::STANDARD.encode(out)
}

struct Client {
    conn: Connection,
    ch: Channel,
    reply_to: String,
    replies: futures::channel::mpsc::UnboundedReceiver<cottontail::lapin::message::Delivery>,
}

impl Client {
    async fn new() -> Client {
        let conn = Connection::connect(&amqp_url(), ConnectionProperties::default())
            .await
            .unwrap();
        let ch = conn.create_channel().await.unwrap();
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        let q = ch
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        let reply_to = q.name().to_string();
        let rch = conn.create_channel().await.unwrap();
        let mut consumer = rch
            .basic_consume(
                q.name().clone(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        let (tx, replies) = futures::channel::mpsc::unbounded();
        tokio::spawn(async move {
            let _keep = rch;
            while let Some(Ok(d)) = consumer.next().await {
                let _ = tx.unbounded_send(d);
            }
        });
        Client {
            conn,
            ch,
            reply_to,
            replies,
        }
    }

    async fn send(
        &self,
        queue: &str,
        body: &serde_json::Value,
        cid: &str,
        priority: u8,
        headers: FieldTable,
    ) {
        let props = BasicProperties::default()
            .with_priority(priority)
            .with_headers(headers);
        self.send_with(queue, body, cid, props).await;
    }

    /// Sends a request with `props` (reply address, JSON and persistence added).
    async fn send_with(
        &self,
        queue: &str,
        body: &serde_json::Value,
        cid: &str,
        props: BasicProperties,
    ) {
        let props = props
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_reply_to(self.reply_to.as_str().into())
            .with_correlation_id(cid.into());
        let confirm = self
            .ch
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                body.to_string().as_bytes(),
                props,
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(confirm.is_ack());
    }

    /// The next final (ok/error) reply, skipping progress.
    async fn final_reply(&mut self) -> (String, String, serde_json::Value) {
        loop {
            let d = tokio::time::timeout(Duration::from_secs(60), self.replies.next())
                .await
                .expect("reply in time")
                .unwrap();
            let status =
                cottontail::headers::get_string(d.properties.headers().as_ref(), "x-status")
                    .unwrap_or_default();
            if status == "progress" {
                continue;
            }
            let cid = d
                .properties
                .correlation_id()
                .as_ref()
                .map(|c| c.to_string())
                .unwrap_or_default();
            return (cid, status, serde_json::from_slice(&d.data).unwrap());
        }
    }
}

async fn purge(ch: &Channel, queue: &str) {
    let _ = ch
        .queue_purge(queue.into(), QueuePurgeOptions::default())
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_keeps_its_contract_with_plain_amqp_clients() {
    let demo = Demo::start();
    let mut client = Client::new().await;
    purge(&client.ch, "thumbnails").await;
    purge(&client.ch, "thumbnails.dlq").await;

    // 1. A thumbnail: aspect ratio kept, longest side <= max_side, correlation id echoed.
    client
        .send(
            "thumbnails",
            &serde_json::json!({"image": png(300, 150), "max_side": 64}),
            "t-1",
            0,
            FieldTable::default(),
        )
        .await;
    let (cid, status, body) = client.final_reply().await;
    assert_eq!((cid.as_str(), status.as_str()), ("t-1", "ok"), "{body}");
    assert_eq!(
        (body["width"].as_u64(), body["height"].as_u64()),
        (Some(64), Some(32))
    );
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(body["image"].as_str().unwrap())
        .unwrap();
    let thumb = image::load_from_memory(&bytes).unwrap();
    assert_eq!((thumb.width(), thumb.height()), (64, 32));

    // 2. Not an image: an `invalid_input` error reply and the message in thumbnails.dlq.
    let garbage = base64::engine::general_purpose::STANDARD.encode(b"not an image at all");
    client
        .send(
            "thumbnails",
            &serde_json::json!({"image": garbage, "max_side": 64}),
            "t-2",
            0,
            FieldTable::default(),
        )
        .await;
    let (cid, status, body) = client.final_reply().await;
    assert_eq!((cid.as_str(), status.as_str()), ("t-2", "error"));
    assert_eq!(body["error"]["kind"], "invalid_input");
    let dead = client
        .ch
        .basic_get("thumbnails.dlq".into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .expect("message in thumbnails.dlq");
    let h = dead.delivery.properties.headers().clone();
    assert!(cottontail::headers::get_string(h.as_ref(), "x-error")
        .unwrap()
        .contains("not a PNG or JPEG"));
    assert_eq!(
        cottontail::headers::get_u64(h.as_ref(), "x-attempts"),
        Some(1),
        "no retries for bad input"
    );

    // 3. Orders: events in sequence, an impossible transition dead-lettered.
    let order = format!("o-{}", std::process::id());
    for (seq, event) in [(1, "created"), (2, "item_added"), (3, "paid")] {
        let mut headers = FieldTable::default();
        headers.insert(
            "x-sequence-key".into(),
            AMQPValue::LongString(order.as_str().into()),
        );
        headers.insert("x-sequence".into(), AMQPValue::LongLongInt(seq));
        let body = serde_json::json!({"order_id": order, "event": event, "item": {"sku": "book"}});
        client
            .send("orders", &body, &format!("o-{seq}"), 0, headers)
            .await;
        let (_, status, reply) = client.final_reply().await;
        assert_eq!(status, "ok", "{reply}");
        assert_eq!(reply["last_sequence"], seq);
    }
    let mut headers = FieldTable::default();
    headers.insert(
        "x-sequence-key".into(),
        AMQPValue::LongString(order.as_str().into()),
    );
    headers.insert("x-sequence".into(), AMQPValue::LongLongInt(4));
    client
        .send(
            "orders",
            &serde_json::json!({"order_id": order, "event": "created"}),
            "o-4",
            0,
            headers,
        )
        .await;
    let (_, status, reply) = client.final_reply().await;
    assert_eq!(status, "error");
    assert_eq!(reply["error"]["kind"], "invalid_transition");

    // 4. Bookings: one that succeeds, one declined at payment and compensated in reverse
    //    order; one progress reply per completed step, then one final reply; the effects on
    //    `bookings.events`; `/jobs` says how each ended.
    purge(&client.ch, "bookings.events").await;
    let trip = |n: u32| format!("trip-{}-{n}", std::process::id());
    let mut finals = std::collections::BTreeMap::new();
    for (n, fail_at) in [(1, None), (2, Some("payment"))] {
        let body = serde_json::json!({"trip_id": trip(n), "hotel": "Ritz", "flight": "LH 400",
            "amount_cents": 1200, "fail_at": fail_at});
        let props = BasicProperties::default().with_message_id(trip(n).into());
        client.send_with("bookings", &body, &trip(n), props).await;
    }
    let mut progress = std::collections::BTreeMap::<String, Vec<serde_json::Value>>::new();
    while finals.len() < 2 {
        let d = tokio::time::timeout(Duration::from_secs(60), client.replies.next())
            .await
            .expect("booking replies in time")
            .unwrap();
        let cid = d.properties.correlation_id().as_ref().unwrap().to_string();
        let status = cottontail::headers::get_string(d.properties.headers().as_ref(), "x-status")
            .unwrap_or_default();
        let body: serde_json::Value = serde_json::from_slice(&d.data).unwrap();
        if status == "progress" {
            progress.entry(cid).or_default().push(body);
        } else {
            assert!(
                finals.insert(cid, (status, body)).is_none(),
                "two final replies"
            );
        }
    }
    let done = |s: &str| serde_json::json!({"step": s, "state": "done"});
    assert_eq!(
        progress[&trip(1)],
        [done("hotel"), done("flight"), done("payment")]
    );
    assert_eq!(progress[&trip(2)], [done("hotel"), done("flight")]);
    assert_eq!(
        finals[&trip(1)],
        (
            "ok".to_owned(),
            serde_json::json!({"trip_id": trip(1), "hotel_ref": format!("hotel-{}", trip(1)),
                "flight_ref": format!("flight-{}", trip(1)),
                "payment_ref": format!("payment-{}", trip(1))})
        )
    );
    let (status, error) = &finals[&trip(2)];
    assert_eq!(status, "error");
    assert_eq!(error["error"]["kind"], "compensated");
    assert_eq!(error["error"]["failed_step"], "payment");
    assert_eq!(
        error["error"]["compensated"],
        serde_json::json!(["flight", "hotel"])
    );
    assert!(error["error"]["message"]
        .as_str()
        .unwrap()
        .contains("declined"));
    let mut events = Vec::new();
    while events.len() < 7 {
        let got = client
            .ch
            .basic_get("bookings.events".into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap();
        match got {
            Some(m) => {
                events.push(serde_json::from_slice::<serde_json::Value>(&m.delivery.data).unwrap())
            }
            None => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    let of = |n: u32| -> Vec<(String, String)> {
        events
            .iter()
            .filter(|e| e["trip_id"] == trip(n))
            .map(|e| {
                (
                    e["step"].as_str().unwrap().into(),
                    e["action"].as_str().unwrap().into(),
                )
            })
            .collect()
    };
    let pairs = |v: &[(&str, &str)]| -> Vec<(String, String)> {
        v.iter()
            .map(|(s, a)| (s.to_string(), a.to_string()))
            .collect()
    };
    assert_eq!(
        of(1),
        pairs(&[
            ("hotel", "reserved"),
            ("flight", "reserved"),
            ("payment", "charged")
        ])
    );
    assert_eq!(
        of(2),
        pairs(&[
            ("hotel", "reserved"),
            ("flight", "reserved"),
            ("flight", "cancelled"),
            ("hotel", "cancelled")
        ])
    );
    for (n, want) in [(1, "succeeded"), (2, "compensated")] {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let response = demo.get(&format!("/jobs/{}", trip(n)));
            if response.contains(&format!("\"status\":\"{want}\"")) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "/jobs/{}: {response}",
                trip(n)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    // 5. Albums: thumbnails of every image, joined in input order; an undecodable image is
    //    named by its index.
    let album = |n: u32| format!("album-{}-{n}", std::process::id());
    let images = [png(80, 40), png(30, 60), png(20, 20)];
    let bad = [png(80, 40), "bm90IGFuIGltYWdl".to_owned(), "%%%".to_owned()];
    for (n, images) in [(1, &images), (2, &bad)] {
        let body = serde_json::json!({"album_id": album(n), "images": images, "max_side": 32});
        let props = BasicProperties::default().with_message_id(album(n).into());
        client.send_with("albums", &body, &album(n), props).await;
    }
    let mut albums = std::collections::BTreeMap::new();
    while albums.len() < 2 {
        let (cid, status, body) = client.final_reply().await;
        assert!(
            albums.insert(cid, (status, body)).is_none(),
            "two final replies"
        );
    }
    let (status, body) = &albums[&album(1)];
    assert_eq!(status, "ok", "{body}");
    assert_eq!(body["album_id"], album(1));
    let sizes: Vec<(u64, u64)> = body["thumbnails"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["width"].as_u64().unwrap(), t["height"].as_u64().unwrap()))
        .collect();
    assert_eq!(sizes, [(32, 16), (16, 32), (20, 20)]);
    let (status, body) = &albums[&album(2)];
    assert_eq!(status, "error");
    assert_eq!(body["error"]["kind"], "invalid_input", "{body}");
    assert_eq!(body["error"]["index"], 1, "{body}");

    // 6. Priorities: with the service stopped, 500 priority-0 then 50 priority-9 requests;
    //    after it starts, all 50 urgent ones finish before the 100th completion.
    demo.stop();
    let small = png(40, 20);
    for i in 0..500 {
        client
            .send(
                "thumbnails",
                &serde_json::json!({"image": small, "max_side": 16}),
                &format!("low-{i}"),
                0,
                FieldTable::default(),
            )
            .await;
    }
    for i in 0..50 {
        client
            .send(
                "thumbnails",
                &serde_json::json!({"image": small, "max_side": 16}),
                &format!("high-{i}"),
                9,
                FieldTable::default(),
            )
            .await;
    }
    let demo = Demo::start();
    let mut order_of_completion = Vec::new();
    while order_of_completion.len() < 550 {
        let (cid, status, _) = client.final_reply().await;
        assert_eq!(status, "ok");
        order_of_completion.push(cid);
    }
    let last_high = order_of_completion
        .iter()
        .rposition(|c| c.starts_with("high-"))
        .unwrap();
    assert!(
        last_high < 99,
        "the last urgent request completed as #{}",
        last_high + 1
    );
    demo.stop();
    let _ = client.conn.close(200, "bye".into()).await;
}
