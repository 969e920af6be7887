//! Calls in flight: the reply consumer's session, the map of outstanding calls by
//! correlation id, and [`Call`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use futures::{FutureExt, StreamExt};
use lapin::message::BasicReturnMessage;
use lapin::message::Delivery;
use lapin::options::BasicConsumeOptions;
use lapin::types::FieldTable;
use lapin::{Channel, Connection, Consumer};
use tokio::sync::{mpsc, oneshot, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::AbortHandle;
use tokio::time::Instant;

use super::reply::Status;
use super::{PublishError, Publisher, RpcError, CONNECT_TIMEOUT, DIRECT_REPLY_TO, RETURN_CHECK};
use crate::connection::{redact, Connector};
use crate::headers;
use crate::Error;

pub(super) struct Inner {
    pub(super) connector: Connector,
    /// Held while connecting, so concurrent calls open one session, not one each.
    pub(super) session: tokio::sync::Mutex<Option<Arc<Session>>>,
    /// The live session for the fast path: calls do not queue on the async lock above.
    pub(super) current: Mutex<Option<Arc<Session>>>,
    pub(super) permits: Arc<Semaphore>,
    pub(super) max_outstanding: usize,
    pub(super) progress_buffer: usize,
    pub(super) discarded: Arc<AtomicU64>,
    pub(super) next_id: AtomicU64,
    pub(super) id_prefix: String,
}

/// One broker connection: a publishing channel and the reply channel, which both consumes
/// direct reply-to and publishes the requests (the broker requires the same channel).
pub(super) struct Session {
    pub(super) connection: Connection,
    pub(super) publisher: Publisher,
    /// Requests go out here and replies come back here; no confirm mode.
    pub(super) rpc: Channel,
    pub(super) pending: Arc<Pending>,
    pub(super) dispatcher: AbortHandle,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.dispatcher.abort();
        // Calls may outlive their client: tell them now rather than at their timeout.
        self.pending.close("client dropped".into());
    }
}

impl Session {
    pub(super) fn alive(&self) -> bool {
        self.connection.status().connected()
            && self
                .publisher
                .channel()
                .is_some_and(|c| c.status().connected())
            && self.rpc.status().connected()
            && self.pending.lock().closed.is_none()
    }
}

/// Calls waiting for replies, by correlation id.
#[derive(Debug, Default)]
pub(super) struct Pending {
    pub(super) state: Mutex<PendingState>,
    /// Wakes the reply task when a call starts, so it watches for returns.
    pub(super) started: Notify,
}

#[derive(Debug, Default)]
pub(super) struct PendingState {
    /// Set once the reply consumer stopped: no reply can arrive any more.
    pub(super) closed: Option<String>,
    pub(super) calls: HashMap<String, Entry>,
}

#[derive(Debug)]
pub(super) struct Entry {
    pub(super) progress: Option<mpsc::Sender<Vec<u8>>>,
    pub(super) done: oneshot::Sender<Result<Vec<u8>, RpcError>>,
}

impl Pending {
    pub(super) fn lock(&self) -> MutexGuard<'_, PendingState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn is_empty(&self) -> bool {
        self.lock().calls.is_empty()
    }

    pub(super) fn remove(&self, id: &str) -> Option<Entry> {
        self.lock().calls.remove(id)
    }

    /// Fails every waiting call: their replies can no longer arrive.
    pub(super) fn close(&self, reason: String) {
        let calls = {
            let mut state = self.lock();
            state.closed = Some(reason.clone());
            std::mem::take(&mut state.calls)
        };
        for (_, entry) in calls {
            let _ = entry.done.send(Err(RpcError::Connection(reason.clone())));
        }
    }
}

impl Inner {
    /// The live session, connecting a new one if there is none or it broke.
    pub(super) async fn session(&self) -> Result<Arc<Session>, Error> {
        if let Some(session) = self.live() {
            return Ok(session);
        }
        let mut slot = self.session.lock().await;
        if let Some(session) = slot.as_ref() {
            if session.alive() {
                return Ok(Arc::clone(session));
            }
            session.pending.close("connection lost".into());
        }
        *slot = None;
        self.set_current(None);
        let session = Arc::new(self.open().await?);
        *slot = Some(Arc::clone(&session));
        self.set_current(Some(Arc::clone(&session)));
        Ok(session)
    }

    /// The current session if it is alive, without waiting on the connect lock.
    pub(super) fn live(&self) -> Option<Arc<Session>> {
        let session = self
            .current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()?;
        session.alive().then_some(session)
    }

    pub(super) fn set_current(&self, session: Option<Arc<Session>>) {
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = session;
    }

    /// Drops `session` if it is still the current one, so the next use reconnects.
    pub(super) async fn forget(&self, session: &Arc<Session>) {
        let mut slot = self.session.lock().await;
        if slot.as_ref().is_some_and(|s| Arc::ptr_eq(s, session)) && !session.alive() {
            session.pending.close("connection lost".into());
            *slot = None;
            self.set_current(None);
        }
    }

    pub(super) async fn open(&self) -> Result<Session, Error> {
        let connection = tokio::time::timeout(CONNECT_TIMEOUT, self.connector.connect_once())
            .await
            .map_err(|_| {
                Error::Broker(format!(
                    "connecting took longer than {} s",
                    CONNECT_TIMEOUT.as_secs()
                ))
            })??;
        let broker = |e: lapin::Error| Error::Broker(redact(&e.to_string()));
        let publisher = Publisher::new(connection.create_channel().await.map_err(broker)?)
            .await
            .map_err(broker)?;
        let rpc = connection.create_channel().await.map_err(broker)?;
        // Consume before any request is published on this channel (a broker requirement).
        let consumer = rpc
            .basic_consume(
                DIRECT_REPLY_TO.into(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(broker)?;
        let pending = Arc::new(Pending::default());
        let dispatcher = tokio::spawn(dispatch(
            consumer,
            rpc.clone(),
            Arc::clone(&pending),
            Arc::clone(&self.discarded),
        ))
        .abort_handle();
        Ok(Session {
            connection,
            publisher,
            rpc,
            pending,
            dispatcher,
        })
    }
}

/// Routes every reply to its call until the consumer stops, then fails the calls still waiting.
/// While calls wait it also fails those whose request the broker returned as unroutable.
async fn dispatch(
    mut consumer: Consumer,
    channel: Channel,
    pending: Arc<Pending>,
    discarded: Arc<AtomicU64>,
) {
    // Kept across loop turns: a steady stream of replies must not keep postponing the check.
    let mut check = tokio::time::interval(RETURN_CHECK);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let reason = loop {
        let waiting = !pending.is_empty();
        tokio::select! {
            biased;
            next = consumer.next() => match next {
                Some(Ok(delivery)) => route(delivery, &pending, &discarded),
                Some(Err(e)) => break format!("reply consumer failed: {}", redact(&e.to_string())),
                None => break "reply consumer stopped".to_owned(),
            },
            _ = check.tick(), if waiting => fail_returned(&channel, &pending),
            // The first check comes a full period after calls start: most are answered by then.
            _ = pending.started.notified(), if !waiting => check.reset(),
        }
    };
    tracing::debug!(%reason, "client reply consumer ended");
    pending.close(reason);
}

/// Fails the calls whose request came back unroutable.
fn fail_returned(channel: &Channel, pending: &Pending) {
    // Without confirm mode this only takes the returns lapin collected; it never waits.
    let Some(Ok(returned)) = channel.wait_for_confirms().now_or_never() else {
        return;
    };
    for message in returned {
        fail_unroutable(message, pending);
    }
}

fn fail_unroutable(message: BasicReturnMessage, pending: &Pending) {
    let Some(id) = message.properties.correlation_id().as_ref() else {
        return;
    };
    if let Some(entry) = pending.remove(id.as_str()) {
        let _ = entry
            .done
            .send(Err(RpcError::Publish(PublishError::Unroutable {
                exchange: message.exchange.to_string(),
                routing_key: message.routing_key.to_string(),
            })));
    }
}

fn route(delivery: Delivery, pending: &Pending, discarded: &AtomicU64) {
    let Some(id) = delivery.properties.correlation_id().as_ref() else {
        discarded.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let status = headers::get_string(delivery.properties.headers().as_ref(), headers::STATUS)
        .and_then(|s| Status::parse(&s));
    if status == Some(Status::Progress) {
        let state = pending.lock();
        match state.calls.get(id.as_str()) {
            None => {
                discarded.fetch_add(1, Ordering::Relaxed);
            }
            Some(Entry {
                progress: Some(tx), ..
            }) => {
                if tx.try_send(delivery.data).is_err() {
                    discarded.fetch_add(1, Ordering::Relaxed);
                }
            }
            // A plain `request`: progress is not wanted.
            Some(_) => {}
        }
        return;
    }
    let Some(entry) = pending.remove(id.as_str()) else {
        discarded.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let result = match status {
        Some(Status::Ok) => Ok(delivery.data),
        Some(Status::Error) => Err(parse_error(&delivery.data)),
        // A final answer either way: the caller must not wait for a reply that will not come.
        _ => Err(RpcError::Remote {
            kind: "malformed_reply".into(),
            message: "reply without a valid x-status header".into(),
        }),
    };
    let _ = entry.done.send(result);
}

/// Reads `{"error": {"kind": ..., "message": ...}}`, tolerating anything else.
fn parse_error(body: &[u8]) -> RpcError {
    let value: Option<serde_json::Value> = serde_json::from_slice(body).ok();
    let error = value.as_ref().and_then(|v| v.get("error"));
    let kind = error
        .and_then(|e| e.get("kind"))
        .and_then(|k| k.as_str())
        .map(str::to_owned);
    let message = error
        .and_then(|e| e.get("message"))
        .and_then(|m| m.as_str())
        .map(str::to_owned);
    match (kind, message) {
        (Some(kind), message) => RpcError::Remote {
            kind,
            message: message.unwrap_or_default(),
        },
        (None, _) => RpcError::Remote {
            kind: "malformed_reply".into(),
            message: format!(
                "error reply without an error envelope: {}",
                preview(body, 200)
            ),
        },
    }
}

/// The first `max` characters of `body` as text.
fn preview(body: &[u8], max: usize) -> String {
    let text = String::from_utf8_lossy(body);
    match text.char_indices().nth(max) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.into_owned(),
    }
}
/// One outstanding RPC call. Dropping it abandons the call (a later reply is discarded).
#[derive(Debug)]
pub struct Call {
    pub(super) id: String,
    pub(super) pending: Arc<Pending>,
    pub(super) progress: Option<mpsc::Receiver<Vec<u8>>>,
    pub(super) done: oneshot::Receiver<Result<Vec<u8>, RpcError>>,
    pub(super) deadline: Instant,
    pub(super) _permit: OwnedSemaphorePermit,
}

impl Call {
    /// The request's `correlation_id`.
    pub fn correlation_id(&self) -> &str {
        &self.id
    }

    /// The next progress update (JSON; a non-JSON body comes as a JSON string), or `None` once
    /// the final reply arrived, the call failed or its timeout passed. Updates arrive in the
    /// order the handler sent them, all before the final reply.
    pub async fn next_progress(&mut self) -> Option<serde_json::Value> {
        let rx = self.progress.as_mut()?;
        let body = tokio::time::timeout_at(self.deadline, rx.recv())
            .await
            .ok()??;
        Some(serde_json::from_slice(&body).unwrap_or_else(|_| {
            serde_json::Value::String(String::from_utf8_lossy(&body).into_owned())
        }))
    }

    /// Waits for the final reply: the `ok` body, or why there is none.
    pub async fn result(mut self) -> Result<Vec<u8>, RpcError> {
        match tokio::time::timeout_at(self.deadline, &mut self.done).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(RpcError::Connection("reply consumer stopped".into())),
            // The reply may have raced the deadline: prefer it over a timeout.
            Err(_) => match self.done.try_recv() {
                Ok(result) => result,
                Err(_) => Err(RpcError::Timeout),
            },
        }
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        self.pending.remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_envelopes_parse_and_malformed_ones_are_tolerated() {
        match parse_error(br#"{"error":{"kind":"invalid_input","message":"bad"}}"#) {
            RpcError::Remote { kind, message } => {
                assert_eq!((kind.as_str(), message.as_str()), ("invalid_input", "bad"))
            }
            other => panic!("{other:?}"),
        }
        for body in [&b"not json"[..], b"{}", br#"{"error":"x"}"#, b"\xff\xfe"] {
            match parse_error(body) {
                RpcError::Remote { kind, .. } => assert_eq!(kind, "malformed_reply"),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn previews_cut_on_character_boundaries() {
        assert_eq!(preview("héllo".as_bytes(), 2), "hé…");
        assert_eq!(preview(b"abc", 5), "abc");
    }
}
