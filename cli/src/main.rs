//! `cottontail`: the operator CLI. Publish a message, call a handler, inspect and replay
//! dead-letters, cancel a job.
//!
//! Environment: `AMQP_URL` (or `--amqp-url`), `AMQP_TLS_CA_FILE` (PEM of a private CA for
//! `amqps://`).
//!
//! Exit codes: 0 success; 1 failure (for `call`: the handler answered `error`); 2 for `call`
//! timeouts and connection problems, and for usage errors.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use cottontail::client::{Client, PublishOptions, Publisher, RequestOptions, RpcError};
use cottontail::connection::{redact, Connector};
use cottontail::headers;
use cottontail::lapin::message::Delivery;
use cottontail::lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    QueueDeclareOptions,
};
use cottontail::lapin::types::FieldTable;
use cottontail::lapin::{BasicProperties, Connection};
use cottontail::Config;
use futures::{FutureExt, StreamExt};

/// Headers the framework or the broker add on the way to the DLQ; removed on replay so the
/// message starts over with a fresh attempt count. `x-reply-sent` stays: the caller already
/// got its final reply, and the framework sends none for a message carrying it.
const STRIPPED_ON_REPLAY: &[&str] = &[
    headers::ERROR,
    headers::ERROR_KIND,
    headers::ATTEMPTS,
    headers::HANDLER,
    headers::LAST_ERROR,
    headers::DELIVERY_COUNT,
    headers::REDELIVERIES,
    "x-death",
    "x-first-death-exchange",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-last-death-exchange",
    "x-last-death-queue",
    "x-last-death-reason",
];

/// Headers the broker sets per delivery (quorum queues; `x-acquired-count` from 4.3): they
/// describe the delivery, not the message, so a rotated copy starts without them.
const DELIVERY_STATE: &[&str] = &[headers::DELIVERY_COUNT, "x-acquired-count"];

/// How many moved messages are published before their confirms are awaited.
const TRANSFER_BATCH: u32 = 64;

#[derive(Parser)]
#[command(
    name = "cottontail",
    version,
    about = "Operate cottontail handlers on RabbitMQ"
)]
struct Cli {
    /// Broker URL (default: the local broker, user guest); several comma-separated URLs = a
    /// cluster.
    #[arg(
        long,
        global = true,
        env = "AMQP_URL",
        hide_env_values = true,
        default_value = cottontail::connection::DEFAULT_AMQP_URL,
        hide_default_value = true
    )]
    amqp_url: String,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Publish one JSON message to QUEUE (persistent, confirmed; a missing queue is an error).
    Publish {
        /// Target queue.
        queue: String,
        /// The message body, JSON.
        json: String,
        /// Message priority (for queues with priority levels).
        #[arg(long)]
        priority: Option<u8>,
        /// message_id (idempotency key).
        #[arg(long)]
        message_id: Option<String>,
        /// A header, K=V; repeatable.
        #[arg(long = "header", value_name = "K=V", value_parser = parse_header)]
        headers: Vec<(String, String)>,
    },
    /// Call the handler on QUEUE and print its reply (progress goes to stderr).
    ///
    /// Exit code 0 on an `ok` reply, 1 on an `error` reply, 2 on timeout or other failure.
    Call {
        /// Target queue.
        queue: String,
        /// The request body, JSON.
        json: String,
        /// Seconds to wait for the final reply.
        #[arg(long, default_value_t = 30.0)]
        timeout: f64,
    },
    /// Inspect or replay the dead-letter queue `QUEUE.dlq`.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// Cancel a queued or running job: broadcast to every running instance, so the one
    /// running it stops within a second and a queued one is skipped when delivered (its caller
    /// gets an `error` reply of kind `cancelled`).
    ///
    /// Exit code 0 once the broker confirmed the cancel (it does not wait for the job to stop;
    /// an unknown or finished id is no error), 1 otherwise.
    Cancel {
        /// The job's message_id.
        message_id: String,
    },
}

#[derive(Subcommand)]
enum DlqCommand {
    /// List dead-lettered messages with their reasons; they stay in the DLQ, in their order.
    ///
    /// Every message in the DLQ is re-queued as an identical, confirmed copy (so listing never
    /// uses up a quorum queue's delivery limit); a crash midway can leave a duplicate, never a
    /// loss.
    List(DlqArgs),
    /// Move dead-lettered messages back to QUEUE with a fresh attempt count (each is confirmed
    /// on QUEUE before its DLQ copy is removed).
    ///
    /// A request whose caller got its `error` reply when it was dead-lettered (header
    /// `x-reply-sent`) gets no reply at all when replayed, neither `ok` nor a second `error`:
    /// each request has one final reply. Its new outcome shows in the metrics, its job status
    /// and, if it fails again, the DLQ.
    Replay(DlqReplayArgs),
}

#[derive(Args)]
struct DlqArgs {
    /// The handler's queue (the DLQ is QUEUE.dlq).
    queue: String,
    /// At most this many messages.
    #[arg(long, default_value_t = 100)]
    limit: u32,
}

#[derive(Args)]
struct DlqReplayArgs {
    /// The handler's queue (the DLQ is QUEUE.dlq).
    queue: String,
    /// At most this many messages (default: all that are in the DLQ when the replay starts).
    #[arg(long)]
    limit: Option<u32>,
}

fn parse_header(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("'{text}' is not K=V")),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Publish {
            queue,
            json,
            priority,
            message_id,
            headers,
        } => {
            let options = PublishOptions {
                priority,
                message_id,
                headers,
                ..PublishOptions::default()
            };
            exit(publish(&cli.amqp_url, &queue, &json, options).await)
        }
        Command::Call {
            queue,
            json,
            timeout,
        } => call(&cli.amqp_url, &queue, &json, timeout).await,
        Command::Dlq {
            command: DlqCommand::List(args),
        } => exit(dlq_list(&cli.amqp_url, &args.queue, args.limit).await),
        Command::Dlq {
            command: DlqCommand::Replay(args),
        } => exit(dlq_replay(&cli.amqp_url, &args.queue, args.limit).await),
        Command::Cancel { message_id } => exit(cancel(&cli.amqp_url, &message_id).await),
    }
}

fn exit(result: Result<(), String>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {}", redact(&message));
            ExitCode::from(1)
        }
    }
}

fn connection_name(command: &str) -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "local".into());
    format!("cottontail-cli {command}@{host}:{}", std::process::id())
}

fn check_json(json: &str) -> Result<(), String> {
    serde_json::from_str::<serde_json::Value>(json)
        .map(|_| ())
        .map_err(|e| format!("the message is not valid JSON: {e}"))
}

/// URLs, connection name and `AMQP_TLS_CA_FILE` (a private CA for `amqps://`).
fn connector(url: &str, command: &str) -> Result<Connector, String> {
    let mut config = Config::new(url).connection_name(connection_name(command));
    if let Ok(path) = std::env::var("AMQP_TLS_CA_FILE") {
        if !path.trim().is_empty() {
            config = config.tls_ca_file(path.trim());
        }
    }
    config.connector().map_err(|e| e.to_string())
}

async fn client(url: &str, command: &str) -> Result<Client, String> {
    Client::builder(url)
        .connector(connector(url, command)?)
        .connect()
        .await
        .map_err(|e| e.to_string())
}

async fn publish(
    url: &str,
    queue: &str,
    json: &str,
    options: PublishOptions,
) -> Result<(), String> {
    check_json(json)?;
    let client = client(url, "publish").await?;
    let result = client.publish(queue, json.as_bytes(), options).await;
    client.close().await;
    result.map_err(|e| e.to_string())?;
    eprintln!("published to '{queue}' (confirmed)");
    Ok(())
}

async fn cancel(url: &str, message_id: &str) -> Result<(), String> {
    if message_id.is_empty() {
        return Err("the message id is empty".into());
    }
    let client = client(url, "cancel").await?;
    let result = client.cancel(message_id).await;
    client.close().await;
    result.map_err(|e| e.to_string())?;
    eprintln!("cancel of '{message_id}' sent (confirmed)");
    Ok(())
}

async fn call(url: &str, queue: &str, json: &str, timeout: f64) -> ExitCode {
    let failure = |message: String| {
        eprintln!("error: {}", redact(&message));
        ExitCode::from(2)
    };
    if let Err(e) = check_json(json) {
        return failure(e);
    }
    if !(timeout.is_finite() && timeout > 0.0) {
        return failure(format!(
            "--timeout must be a positive number of seconds, got {timeout}"
        ));
    }
    let client = match client(url, "call").await {
        Ok(client) => client,
        Err(e) => return failure(e),
    };
    let options = RequestOptions::timeout(Duration::from_secs_f64(timeout));
    let outcome = match client
        .request_with_progress(queue, json.as_bytes(), options)
        .await
    {
        Ok(mut call) => {
            while let Some(update) = call.next_progress().await {
                eprintln!("progress: {update}");
            }
            call.result().await
        }
        Err(e) => Err(e),
    };
    client.close().await;
    match outcome {
        Ok(body) => {
            println!("{}", String::from_utf8_lossy(&body));
            ExitCode::SUCCESS
        }
        Err(RpcError::Remote { kind, message }) => {
            println!(
                "{}",
                serde_json::json!({"error": {"kind": kind, "message": message}})
            );
            eprintln!("error reply: {kind}: {message}");
            ExitCode::from(1)
        }
        Err(RpcError::Timeout) => failure(format!("no reply from '{queue}' within {timeout} s")),
        Err(other) => failure(other.to_string()),
    }
}

async fn connect(url: &str, command: &str) -> Result<Connection, String> {
    let connector = connector(url, command)?;
    match tokio::time::timeout(Duration::from_secs(30), connector.connect_once()).await {
        Ok(result) => result.map_err(|e| e.to_string()),
        Err(_) => Err("connecting to the broker took longer than 30 s".into()),
    }
}

/// Messages ready in `queue`, or an explanation if it does not exist.
async fn depth(connection: &Connection, queue: &str) -> Result<u32, String> {
    let channel = connection
        .create_channel()
        .await
        .map_err(|e| e.to_string())?;
    let declared = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| format!("queue '{queue}': {e}"))?;
    let _ = channel.close(200, "ok".into()).await;
    Ok(declared.message_count())
}

/// Lists without consuming. AMQP 0-9-1 has no peek, and a get that is requeued is not free:
/// RabbitMQ counts every requeue of a quorum queue message against its delivery limit on 3.x
/// and 4.0–4.2 (4.0 made 20 the default when none is set, as for `<queue>.dlq`) and drops the
/// message past it, so ~20 listings would silently empty the DLQ. 4.3 counts only failure-like
/// returns (`basic.reject`, not `basic.nack`), which still leaves 3.x and 4.0–4.2.
///
/// So every message in the DLQ when the listing starts is *rotated*: taken unacked, an
/// identical copy (properties and headers, see [`rotated_properties`]) published to the back
/// of the DLQ and confirmed, then the original acked. The copy starts with a fresh delivery
/// count, whatever the broker version. All of them are rotated, not only the `limit` printed:
/// the DLQ keeps its order, so `list --limit N` and a following `replay --limit N` see the same
/// messages (the cost is one confirmed publish per message in the DLQ).
///
/// Crash safety: a crash between a copy's confirm and its original's ack leaves both in the
/// DLQ (a duplicate, never a loss); a crash midway leaves the messages rotated so far at the
/// back. Concurrent listers and replayers never lose a message either (a message held by one
/// is invisible to the others), but may see each other's copies, out of order, in their run.
async fn dlq_list(url: &str, queue: &str, limit: u32) -> Result<(), String> {
    let dlq = format!("{queue}.dlq");
    let connection = connect(url, "dlq-list").await?;
    let total = depth(&connection, &dlq).await?;
    let mut listed = 0u32;
    let (_, result) = transfer(
        &connection,
        &dlq,
        &dlq,
        total,
        rotated_properties,
        |message| {
            if listed < limit {
                listed += 1;
                print_message(listed, &message.properties, &message.data);
            }
        },
    )
    .await;
    let _ = connection.close(200, "bye".into()).await;
    result?;
    println!("{listed} of {total} message(s) in '{dlq}' listed (all left in place)");
    Ok(())
}

/// The original properties and headers as they were, minus what describes one delivery rather
/// than the message (`x-delivery-count`, `x-acquired-count`: the copy starts afresh) and minus
/// `user_id` (the broker refuses one that is not the lister's own; it was checked when the
/// message was first published).
fn rotated_properties(original: &BasicProperties) -> BasicProperties {
    let mut properties = cottontail::client::republish_properties(original).with_headers(
        headers::without(original.headers().as_ref(), DELIVERY_STATE),
    );
    if let Some(v) = original.delivery_mode() {
        properties = properties.with_delivery_mode(*v);
    }
    if let Some(v) = original.expiration() {
        properties = properties.with_expiration(v.clone());
    }
    properties
}

/// Moves up to `count` messages from `from` to `to` (the same queue rotates them), each copy
/// confirmed by the broker before its original is acked; `shape` makes a copy's properties
/// and `seen` sees each message as it is taken. Returns how many moved, and the first error.
///
/// Messages are consumed in queue order, a window of [`TRANSFER_BATCH`] at a time (a
/// `basic.get` per message was ~4 ms on a quorum queue: 42 s to rotate 11,000). Before each
/// window is acked, the prefetch shrinks to what is left of `count`, so the broker never
/// delivers more than `count` messages: none is taken and handed back, which would count
/// against a delivery limit. It stops early when the queue has no ready message left.
async fn transfer(
    connection: &Connection,
    from: &str,
    to: &str,
    count: u32,
    shape: fn(&BasicProperties) -> BasicProperties,
    mut seen: impl FnMut(&Delivery),
) -> (u32, Result<(), String>) {
    if count == 0 {
        return (0, Ok(()));
    }
    let window = |left: u32| left.min(TRANSFER_BATCH) as u16;
    let open = async {
        let channel = connection.create_channel().await?;
        channel
            .basic_qos(window(count), BasicQosOptions::default())
            .await?;
        let consumer = channel
            .basic_consume(
                from.into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let publisher = Publisher::new(connection.create_channel().await?).await?;
        Ok::<_, cottontail::lapin::Error>((channel, consumer, publisher))
    };
    let (channel, mut consumer, publisher) = match open.await {
        Ok(opened) => opened,
        Err(e) => return (0, Err(format!("consuming '{from}': {e}"))),
    };
    let mut moved = 0u32;
    let mut result = Ok(());
    'outer: while moved < count {
        // Wait for the first of a window, then take what has arrived of it.
        let first = tokio::select! {
            next = consumer.next() => next,
            () = drained(connection, from) => None,
        };
        let Some(first) = first else { break };
        let mut batch = Vec::new();
        let mut next = Some(first);
        while let Some(item) = next.take() {
            match item {
                Ok(delivery) => {
                    seen(&delivery);
                    batch.push(delivery);
                }
                Err(e) => {
                    result = Err(format!("consuming '{from}': {e}"));
                    break;
                }
            }
            if moved + (batch.len() as u32) < count {
                next = consumer.next().now_or_never().flatten();
            }
        }
        if batch.is_empty() {
            break;
        }
        // Publish the window without waiting, then settle each original after its own
        // confirm: ack when the broker has the copy, requeue when it does not.
        let publishes = batch.iter().map(|delivery| {
            publisher.publish("", to, &delivery.data, shape(&delivery.properties), true)
        });
        let outcomes = futures::future::join_all(publishes).await;
        let left = count - moved - batch.len() as u32;
        let narrowed = if left == 0 {
            channel
                .basic_cancel(consumer.tag(), BasicCancelOptions::default())
                .await
        } else {
            channel
                .basic_qos(window(left), BasicQosOptions::default())
                .await
        };
        if let Err(e) = narrowed {
            result = Err(format!("consuming '{from}': {e}"));
        }
        for (delivery, outcome) in batch.iter().zip(outcomes) {
            match outcome {
                Ok(()) => {
                    if let Err(e) = delivery.acker.ack(BasicAckOptions::default()).await {
                        // The copy is in `to`; the original returns to `from` (a duplicate,
                        // never a loss).
                        result = Err(format!("ack on '{from}' failed: {e}"));
                        break 'outer;
                    }
                    moved += 1;
                }
                Err(e) => {
                    let _ = delivery
                        .acker
                        .nack(BasicNackOptions {
                            multiple: false,
                            requeue: true,
                        })
                        .await;
                    if result.is_ok() {
                        result = Err(format!("republishing to '{to}' failed: {e}"));
                    }
                }
            }
        }
        if result.is_err() {
            break;
        }
    }
    let _ = channel.close(200, "moved".into()).await;
    if let Some(channel) = publisher.channel() {
        let _ = channel.close(200, "moved".into()).await;
    }
    (moved, result)
}

/// Resolves once `queue` has no ready message (checked every 200 ms): with nothing of ours
/// unacked, no delivery is coming.
async fn drained(connection: &Connection, queue: &str) {
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if matches!(depth(connection, queue).await, Ok(0)) {
            return;
        }
    }
}

fn print_message(n: u32, properties: &BasicProperties, body: &[u8]) {
    let table = properties.headers().as_ref();
    let header = |name: &str| headers::get_string(table, name).unwrap_or_else(|| "-".into());
    let prop = |value: Option<&str>| value.unwrap_or("-").to_owned();
    println!("#{n}");
    println!(
        "  message_id:     {}",
        prop(properties.message_id().as_ref().map(|s| s.as_str()))
    );
    println!(
        "  correlation_id: {}",
        prop(properties.correlation_id().as_ref().map(|s| s.as_str()))
    );
    println!("  x-error-kind:   {}", header(headers::ERROR_KIND));
    println!("  x-error:        {}", header(headers::ERROR));
    println!("  x-attempts:     {}", header(headers::ATTEMPTS));
    println!("  x-handler:      {}", header(headers::HANDLER));
    println!("  body:           {}", preview(body, 200));
}

fn preview(body: &[u8], max: usize) -> String {
    let text = String::from_utf8_lossy(body);
    let one_line: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    match one_line.char_indices().nth(max) {
        Some((cut, _)) => format!("{}…", &one_line[..cut]),
        None => one_line,
    }
}

async fn dlq_replay(url: &str, queue: &str, limit: Option<u32>) -> Result<(), String> {
    let dlq = format!("{queue}.dlq");
    let connection = connect(url, "dlq-replay").await?;
    let limit = match limit {
        Some(n) => n,
        // Only what is there now: a replayed message that fails again and returns to the DLQ
        // is not replayed twice in one run.
        None => depth(&connection, &dlq).await?,
    };
    let (replayed, result) =
        transfer(&connection, &dlq, queue, limit, replay_properties, |_| {}).await;
    let _ = connection.close(200, "bye".into()).await;
    println!("{replayed} message(s) replayed from '{dlq}' to '{queue}'");
    result
}

/// The original properties and headers, minus the dead-letter bookkeeping (which resets the
/// attempt counter), `user_id` and `expiration` (see `republish_properties`).
fn replay_properties(original: &BasicProperties) -> BasicProperties {
    cottontail::client::republish_properties(original).with_headers(headers::without(
        original.headers().as_ref(),
        STRIPPED_ON_REPLAY,
    ))
}
