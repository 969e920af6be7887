//! The built-in status page (`GET /`) and its data (`GET /status.json`): handlers, counts,
//! in-flight work and recent dead-letters, for people without Grafana.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::ops::health::Health;
use crate::ops::metrics::Metrics;

/// How many recent dead-letters the page keeps.
const RECENT: usize = 50;

/// A dead-letter as shown on the status page.
#[derive(Clone, Debug, Serialize)]
pub struct DeadLetterNote {
    /// Seconds since the epoch.
    pub at: f64,
    /// The handler.
    pub handler: String,
    /// The message id, if any.
    pub message_id: Option<String>,
    /// `x-error-kind`.
    pub kind: String,
    /// `x-error`.
    pub error: String,
}

/// A bounded list of the latest dead-letters.
#[derive(Clone, Default)]
pub(crate) struct RecentDeadLetters(Arc<Mutex<VecDeque<DeadLetterNote>>>);

impl RecentDeadLetters {
    pub(crate) fn push(&self, handler: &str, message_id: Option<&str>, kind: &str, error: &str) {
        let at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        if let Ok(mut list) = self.0.lock() {
            if list.len() == RECENT {
                list.pop_front();
            }
            list.push_back(DeadLetterNote {
                at,
                handler: handler.to_owned(),
                message_id: message_id.map(str::to_owned),
                kind: kind.to_owned(),
                error: error.chars().take(500).collect(),
            });
        }
    }

    fn latest_first(&self) -> Vec<DeadLetterNote> {
        self.0
            .lock()
            .map(|l| l.iter().rev().cloned().collect())
            .unwrap_or_default()
    }
}

/// Counts are integers in the JSON (`3`, not `3.0`), though Prometheus keeps them as `f64`.
#[derive(Serialize, Default)]
struct HandlerRow {
    handler: String,
    queue: String,
    consuming: bool,
    ok: u64,
    retried: u64,
    dead_lettered: u64,
    duplicate: u64,
    in_flight: u64,
}

/// A Prometheus counter or gauge value as a count (they only ever hold whole numbers).
fn count(value: f64) -> u64 {
    // `as` saturates: a negative or NaN value becomes 0.
    value.round() as u64
}

/// The JSON behind the page.
pub(crate) fn snapshot(
    metrics: &Metrics,
    health: &Health,
    recent: &RecentDeadLetters,
) -> serde_json::Value {
    let mut rows: BTreeMap<String, HandlerRow> = health
        .handlers()
        .into_iter()
        .map(|(h, up)| {
            let row = HandlerRow {
                handler: h.clone(),
                consuming: up,
                ..HandlerRow::default()
            };
            (h, row)
        })
        .collect();
    for family in metrics.registry().gather() {
        let name = family.name();
        if name != "cottontail_messages_total" && name != "cottontail_in_flight" {
            continue;
        }
        for m in family.get_metric() {
            let label = |k: &str| {
                m.get_label()
                    .iter()
                    .find(|l| l.name() == k)
                    .map(|l| l.value().to_owned())
                    .unwrap_or_default()
            };
            let Some(row) = rows.get_mut(&label("handler")) else {
                continue;
            };
            row.queue = label("queue");
            if name == "cottontail_in_flight" {
                row.in_flight = count(m.get_gauge().get_value());
                continue;
            }
            let value = count(m.get_counter().get_value());
            match label("outcome").as_str() {
                "ok" => row.ok = value,
                "retried" => row.retried = value,
                "dead_lettered" => row.dead_lettered = value,
                "duplicate" => row.duplicate = value,
                _ => {}
            }
        }
    }
    serde_json::json!({
        "ready": health.is_ready(),
        "connected": health.is_connected(),
        "handlers": rows.into_values().collect::<Vec<_>>(),
        "recent_dead_letters": recent.latest_first(),
    })
}

/// The page: static HTML that polls `/status.json` and computes rates between polls.
pub(crate) const PAGE: &str = r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>cottontail</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body{font:14px system-ui,sans-serif;margin:2em;color:#222;background:#fafafa}
 h1{font-size:20px;margin:0 0 .2em} h2{font-size:16px;margin:1.6em 0 .4em}
 table{border-collapse:collapse;background:#fff;min-width:40em}
 th,td{border:1px solid #ddd;padding:.35em .7em;text-align:right}
 th.l,td.l{text-align:left}
 th{background:#f0f0f0} .up{color:#1a7f37} .down{color:#cf222e;font-weight:bold}
 #state{margin-bottom:1em} .muted{color:#777}
</style></head><body>
<h1>cottontail</h1>
<div id="state" class="muted">loading…</div>
<form id="auth" hidden><label>API token (<code>COTTONTAIL_API_TOKEN</code>):
<input id="token" type="password" autocomplete="off" size="32"></label> <button>Show status</button>
<span id="auth-note" class="down"></span></form>
<h2>Handlers</h2>
<table id="handlers"><thead><tr><th class="l">handler</th><th class="l">queue</th><th class="l">consumer</th><th>ok</th>
<th>ok/s</th><th>retried</th><th>dead-lettered</th><th>duplicate</th><th>in flight</th></tr></thead>
<tbody></tbody></table>
<h2>Recent dead-letters</h2>
<table id="dead"><thead><tr><th class="l">time</th><th class="l">handler</th><th class="l">message id</th><th class="l">kind</th><th class="l">error</th></tr></thead>
<tbody></tbody></table>
<p class="muted">Prometheus metrics: <a href="/metrics">/metrics</a> · readiness: <a href="/health/ready">/health/ready</a></p>
<script>
let last = null;
// The data needs the API token when the service has one: it is asked for on a 401 (or taken
// from a #token=… fragment, which never reaches the server), kept for this tab only and sent
// as a bearer header.
const KEY = 'cottontail-api-token';
if (location.hash.startsWith('#token=')) {
  sessionStorage.setItem(KEY, decodeURIComponent(location.hash.slice(7)));
  history.replaceState(null, '', location.pathname + location.search);
}
const auth = document.getElementById('auth');
auth.addEventListener('submit', (e) => {
  e.preventDefault();
  sessionStorage.setItem(KEY, document.getElementById('token').value);
  auth.hidden = true;
  refresh();
});
function cell(text, cls) { const td = document.createElement('td'); td.textContent = text; if (cls) td.className = cls; return td; }
function say(text) { const st = document.getElementById('state'); st.textContent = text; st.className = 'down'; }
async function refresh() {
  try {
    const token = sessionStorage.getItem(KEY);
    const headers = token ? {Authorization: 'Bearer ' + token} : {};
    const r = await fetch('/status.json', {cache: 'no-store', headers});
    if (r.status === 401) {
      sessionStorage.removeItem(KEY);
      if (token) document.getElementById('auth-note').textContent = 'that token was refused';
      auth.hidden = false;
      return say('this service needs its API token');
    }
    if (r.status === 403) return say('status data is refused: the service has no API token and listens beyond loopback');
    const s = await r.json();
    const now = Date.now() / 1000;
    document.getElementById('state').textContent =
      (s.ready ? 'ready' : 'NOT READY') + ' · ' + (s.connected ? 'connected to the broker' : 'disconnected');
    document.getElementById('state').className = s.ready ? 'up' : 'down';
    const body = document.querySelector('#handlers tbody');
    body.replaceChildren();
    for (const h of s.handlers) {
      const prev = last && last.s.handlers.find(p => p.handler === h.handler);
      const rate = prev ? ((h.ok - prev.ok) / Math.max(now - last.t, 0.001)).toFixed(1) : '–';
      const tr = document.createElement('tr');
      tr.append(cell(h.handler, 'l'), cell(h.queue, 'l'), cell(h.consuming ? 'up' : 'down', h.consuming ? 'l up' : 'l down'),
        cell(h.ok), cell(rate), cell(h.retried), cell(h.dead_lettered), cell(h.duplicate), cell(h.in_flight));
      body.append(tr);
    }
    const dead = document.querySelector('#dead tbody');
    dead.replaceChildren();
    for (const d of s.recent_dead_letters) {
      const tr = document.createElement('tr');
      tr.append(cell(new Date(d.at * 1000).toISOString(), 'l'), cell(d.handler, 'l'), cell(d.message_id || '', 'l'),
        cell(d.kind, 'l'), cell(d.error, 'l'));
      dead.append(tr);
    }
    last = {s, t: now};
  } catch (e) {
    document.getElementById('state').textContent = 'status unavailable: ' + e;
  }
}
refresh();
setInterval(refresh, 2000);
</script></body></html>
"#;
