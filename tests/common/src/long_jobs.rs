//! Long jobs: a step-counting handler with checkpoints, and a caller that collects progress
//! and the final reply of one request.

use super::*;

use cottontail::{Checkpoint, HandlerError, Json, MessageId, Progress, State};
use serde::{Deserialize, Serialize};

/// `{"steps": N, "step_ms": M, "fail_at": k?}`: N steps of M ms; with `fail_at`, the first
/// attempt panics right after saving step k (a crash after a checkpoint).
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct Steps {
    pub steps: u64,
    pub step_ms: u64,
    #[serde(default)]
    pub fail_at: Option<u64>,
}

/// The final reply: the checkpoint the attempt started from and the steps it ran.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct Ran {
    pub steps: u64,
    pub resumed_from: u64,
    pub executed: u64,
}

/// Every step run, per message id, in order (shared between handler and test).
#[derive(Clone, Default)]
pub struct StepLog(pub Arc<Mutex<HashMap<String, Vec<u64>>>>);

impl StepLog {
    pub fn steps(&self, id: &str) -> Vec<u64> {
        self.0.lock().unwrap().get(id).cloned().unwrap_or_default()
    }
    fn push(&self, id: &str, step: u64) {
        self.0
            .lock()
            .unwrap()
            .entry(id.to_owned())
            .or_default()
            .push(step);
    }
}

/// The step handler: resumes from its checkpoint, saves after each step, then reports
/// `{"step": s}` progress.
pub async fn steps(
    State(log): State<StepLog>,
    MessageId(id): MessageId,
    attempt: cottontail::Attempt,
    Json(req): Json<Steps>,
    checkpoint: Checkpoint<u64>,
    progress: Progress,
) -> Result<Json<Ran>, HandlerError> {
    let id = id.unwrap_or_default();
    let resumed_from = checkpoint.load().await?.unwrap_or(0);
    for done in resumed_from..req.steps {
        tokio::time::sleep(Duration::from_millis(req.step_ms)).await;
        let s = done + 1;
        log.push(&id, s);
        checkpoint.save(&s).await?;
        if req.fail_at == Some(s) && attempt.0 == 1 {
            panic!("crash after checkpoint {s}");
        }
        progress.send(&serde_json::json!({ "step": s })).await?;
    }
    Ok(Json(Ran {
        steps: req.steps,
        resumed_from,
        executed: req.steps - resumed_from,
    }))
}

/// One request's replies, as a plain AMQP caller sees them.
pub struct Caller {
    pub message_id: String,
    pub correlation_id: String,
    pub inbox: Inbox,
}

impl Caller {
    /// Publishes `body` to `queue` with a fresh message id, a `reply_to` of its own and a
    /// correlation id.
    pub async fn send(conn: &Connection, queue: &str, body: &serde_json::Value) -> Caller {
        let (reply_to, inbox) = reply_queue(conn).await;
        let message_id = unique("job");
        let correlation_id = unique("corr");
        let props = json_props()
            .with_message_id(message_id.as_str().into())
            .with_correlation_id(correlation_id.as_str().into())
            .with_reply_to(reply_to.as_str().into());
        let ch = confirm_channel(conn).await;
        publish(&ch, queue, body.to_string().as_bytes(), props).await;
        Caller {
            message_id,
            correlation_id,
            inbox,
        }
    }

    /// `(x-status, body)` of every reply so far, in arrival order.
    pub fn replies(&self) -> Vec<(String, serde_json::Value)> {
        self.inbox
            .all()
            .iter()
            .map(|r| {
                let status = header_str(r, "x-status").unwrap_or_default();
                let body = serde_json::from_slice(&r.data).unwrap_or(serde_json::Value::Null);
                (status, body)
            })
            .collect()
    }

    /// The `step` of every progress reply so far, in order.
    pub fn progress_steps(&self) -> Vec<u64> {
        self.replies()
            .iter()
            .filter(|(s, _)| s == "progress")
            .filter_map(|(_, b)| b["step"].as_u64())
            .collect()
    }

    /// Waits for the final (`ok` or `error`) reply: `(x-status, body)`.
    pub async fn final_reply(&self, limit: Duration) -> (String, serde_json::Value) {
        let me = &self;
        wait_until(limit, "the final reply", || async move {
            me.replies().iter().any(|(s, _)| s != "progress")
        })
        .await;
        let replies = self.replies();
        let finals: Vec<_> = replies.iter().filter(|(s, _)| s != "progress").collect();
        for r in self.inbox.all() {
            assert_eq!(
                r.properties
                    .correlation_id()
                    .as_ref()
                    .map(|c| c.to_string()),
                Some(self.correlation_id.clone()),
                "every reply carries the request's correlation id"
            );
        }
        finals[0].clone()
    }

    /// Waits until a progress reply reports at least `step`.
    pub async fn wait_step(&self, step: u64, limit: Duration) {
        let me = &self;
        wait_until(limit, &format!("progress step {step}"), || async move {
            me.progress_steps().iter().any(|s| *s >= step)
        })
        .await;
    }
}
