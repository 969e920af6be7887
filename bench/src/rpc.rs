//! RPC benchmark over direct reply-to: cottontail `Client::request` against raw lapin
//! callers, all served by the same raw lapin responder that echoes bodies.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cottontail::client::{Client, RequestOptions};
use cottontail::lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    QueueDeclareOptions,
};
use cottontail::lapin::types::{AMQPValue, FieldTable, LongString};
use cottontail::lapin::{BasicProperties, Channel, Confirmation, Connection};
use futures::{StreamExt, TryStreamExt};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::util::{self, Res};

const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";

/// The RPC callers compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Caller {
    /// Raw lapin: publish (no confirm), wait for the reply.
    Raw,
    /// Raw lapin: publish with confirm + mandatory (what `Client::request` does), then wait.
    RawConfirmed,
    /// cottontail `Client::request`.
    Client,
}

impl Caller {
    pub const ALL: [Caller; 3] = [Caller::Raw, Caller::RawConfirmed, Caller::Client];

    pub fn label(self) -> &'static str {
        match self {
            Caller::Raw => "raw lapin (no confirm)",
            Caller::RawConfirmed => "raw lapin (confirm+mandatory)",
            Caller::Client => "cottontail Client::request",
        }
    }
}

/// Results of one caller in one round.
#[derive(Clone, Debug, Default)]
pub struct RpcRound {
    /// Sequential call latencies, seconds.
    pub sequential: Vec<f64>,
    /// Calls per second with `outstanding` calls in flight.
    pub parallel_rate: f64,
    /// Latencies under that load, seconds.
    pub parallel: Vec<f64>,
}

/// The echo responder: consumes `queue` (auto-ack) and replies with the same body,
/// `correlation_id` and `x-status: ok`, without confirms.
pub struct Responder {
    conn: Connection,
    task: JoinHandle<()>,
}

impl Responder {
    pub async fn start(url: &str, queue: &str) -> Res<Self> {
        let conn = util::connect(url, &format!("bench-rpc-responder:{queue}")).await?;
        let ch = conn.create_channel().await?;
        ch.basic_qos(1000, BasicQosOptions { global: false })
            .await?;
        let mut consumer = ch
            .basic_consume(
                queue.to_owned().into(),
                "responder".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        let task = tokio::spawn(async move {
            let mut status = FieldTable::default();
            status.insert(
                cottontail::headers::STATUS.into(),
                AMQPValue::LongString(LongString::from("ok")),
            );
            while let Some(Ok(delivery)) = consumer.next().await {
                let Some(reply_to) = delivery.properties.reply_to().clone() else {
                    continue;
                };
                let mut props = BasicProperties::default()
                    .with_content_type("application/json".into())
                    .with_headers(status.clone());
                if let Some(id) = delivery.properties.correlation_id() {
                    props = props.with_correlation_id(id.clone());
                }
                if ch
                    .basic_publish(
                        "".into(),
                        reply_to,
                        BasicPublishOptions::default(),
                        &delivery.data,
                        props,
                    )
                    .await
                    .is_err()
                {
                    break;
                }
            }
        });
        Ok(Self { conn, task })
    }

    pub async fn stop(self) {
        let _ = self.conn.close(200, "done".into()).await;
        self.task.abort();
    }
}

/// Declares the request queue (quorum, like a handler's).
pub async fn declare_queue(admin: &Connection, queue: &str) -> Res<()> {
    let ch = admin.create_channel().await?;
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    ch.queue_declare(
        queue.to_owned().into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await?;
    let _ = ch.close(200, "declared".into()).await;
    Ok(())
}

/// A raw lapin direct reply-to caller: one channel publishes requests and consumes replies.
struct RawCaller {
    conn: Connection,
    channel: Channel,
    confirm: bool,
    pending: Arc<Mutex<HashMap<String, oneshot::Sender<Vec<u8>>>>>,
    next: AtomicU64,
    dispatcher: JoinHandle<()>,
}

impl RawCaller {
    async fn connect(url: &str, confirm: bool) -> Res<Self> {
        let conn = util::connect(url, "bench-rpc-raw-caller").await?;
        let channel = conn.create_channel().await?;
        if confirm {
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await?;
        }
        let mut consumer = channel
            .basic_consume(
                DIRECT_REPLY_TO.into(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        let pending: Arc<Mutex<HashMap<String, oneshot::Sender<Vec<u8>>>>> = Arc::default();
        let routes = pending.clone();
        let dispatcher = tokio::spawn(async move {
            while let Some(Ok(delivery)) = consumer.next().await {
                let Some(id) = delivery.properties.correlation_id() else {
                    continue;
                };
                let waiter = routes
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(id.as_str());
                if let Some(tx) = waiter {
                    let _ = tx.send(delivery.data);
                }
            }
        });
        Ok(Self {
            conn,
            channel,
            confirm,
            pending,
            next: AtomicU64::new(0),
            dispatcher,
        })
    }

    async fn request(&self, queue: &str, body: &[u8]) -> Res<Vec<u8>> {
        let id = self.next.fetch_add(1, Ordering::Relaxed).to_string();
        let (tx, rx) = oneshot::channel();
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.clone(), tx);
        let props = util::job_properties()
            .with_correlation_id(id.into())
            .with_reply_to(DIRECT_REPLY_TO.into());
        let confirm = self
            .channel
            .basic_publish(
                "".into(),
                queue.to_owned().into(),
                BasicPublishOptions {
                    mandatory: self.confirm,
                    ..Default::default()
                },
                body,
                props,
            )
            .await?;
        if self.confirm {
            match confirm.await? {
                Confirmation::Ack(None) => {}
                other => return Err(format!("request not confirmed: {other:?}").into()),
            }
        }
        Ok(tokio::time::timeout(Duration::from_secs(30), rx).await??)
    }

    async fn close(self) {
        let _ = self.conn.close(200, "done".into()).await;
        self.dispatcher.abort();
    }
}

enum AnyCaller {
    Raw(Box<RawCaller>),
    Client(Client),
}

impl AnyCaller {
    async fn request(&self, queue: &str, body: &[u8]) -> Res<Vec<u8>> {
        match self {
            AnyCaller::Raw(raw) => raw.request(queue, body).await,
            AnyCaller::Client(client) => Ok(client
                .request(queue, body, RequestOptions::default())
                .await?),
        }
    }
}

/// One round for `caller`: warm-up, `sequential` calls one at a time, then `parallel` calls
/// with `outstanding` in flight.
pub async fn round(
    url: &str,
    queue: &str,
    caller: Caller,
    sequential: usize,
    parallel: usize,
    outstanding: usize,
) -> Res<RpcRound> {
    let any = match caller {
        Caller::Raw => AnyCaller::Raw(Box::new(RawCaller::connect(url, false).await?)),
        Caller::RawConfirmed => AnyCaller::Raw(Box::new(RawCaller::connect(url, true).await?)),
        Caller::Client => AnyCaller::Client(
            Client::builder(url)
                .connection_name("bench-rpc-client")
                .connect()
                .await?,
        ),
    };
    let body = util::body(42);
    for _ in 0..100 {
        let reply = any.request(queue, &body).await?;
        if reply != body {
            return Err(format!("{}: echo differs from the request", caller.label()).into());
        }
    }
    let mut out = RpcRound::default();
    for _ in 0..sequential {
        let t = Instant::now();
        any.request(queue, &body).await?;
        out.sequential.push(t.elapsed().as_secs_f64());
    }
    let t0 = Instant::now();
    let any_ref = &any;
    let body_ref = &body;
    out.parallel = futures::stream::iter(0..parallel)
        .map(|_| async move {
            let t = Instant::now();
            any_ref.request(queue, body_ref).await?;
            Ok::<f64, util::BoxError>(t.elapsed().as_secs_f64())
        })
        .buffer_unordered(outstanding)
        .try_collect()
        .await?;
    out.parallel_rate = parallel as f64 / t0.elapsed().as_secs_f64();
    match any {
        AnyCaller::Raw(raw) => raw.close().await,
        AnyCaller::Client(client) => client.close().await,
    }
    Ok(out)
}
