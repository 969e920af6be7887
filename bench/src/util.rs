//! Shared helpers: process CPU time, message bodies, statistics, broker housekeeping and
//! machine facts.

use std::error::Error as StdError;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cottontail::lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use cottontail::lapin::types::FieldTable;
use cottontail::lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Boxed error for the bench (every failure aborts the run with a message).
pub type BoxError = Box<dyn StdError + Send + Sync>;
/// Result with [`BoxError`].
pub type Res<T> = Result<T, BoxError>;

/// User + system CPU time consumed by this process so far (`getrusage(RUSAGE_SELF)`).
pub fn cpu_time() -> Duration {
    // SAFETY: `getrusage` only writes into the zeroed struct we pass.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        if libc::getrusage(libc::RUSAGE_SELF, &mut usage) != 0 {
            return Duration::ZERO;
        }
        usage
    };
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// The broker's OS process (`beam.smp`), if it runs on this machine.
pub fn broker_pid() -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.find_map(|entry| {
        let entry = entry.ok()?;
        let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
        let comm = std::fs::read_to_string(entry.path().join("comm")).ok()?;
        if comm.trim() != "beam.smp" {
            return None;
        }
        // The broker boots with `-s rabbit boot`; rabbitmqctl and friends are beam.smp too.
        let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        cmdline.contains("-s rabbit boot").then_some(pid)
    })
}

/// User + system CPU time of process `pid` (from `/proc/<pid>/stat`).
pub fn process_cpu(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) start at state (field 3).
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let ticks = u64::try_from(ticks).ok().filter(|t| *t > 0)?;
    Some(Duration::from_secs_f64(
        (utime + stime) as f64 / ticks as f64,
    ))
}

/// Busy CPU time of the whole machine (all cores; `/proc/stat`, everything but idle and
/// iowait).
pub fn machine_busy() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|t| t.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let busy: u64 = ticks.iter().take(8).sum::<u64>() - ticks.get(3)? - ticks.get(4)?;
    // SAFETY: sysconf has no preconditions.
    let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) })
        .ok()
        .filter(|t| *t > 0)?;
    Some(Duration::from_secs_f64(busy as f64 / hz as f64))
}

/// CPU counters of this process, the broker (if found) and the machine, read together.
#[derive(Clone, Copy, Debug)]
pub struct CpuMark {
    own: Duration,
    broker: Option<Duration>,
    machine: Option<Duration>,
}

/// CPU used in a window.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuDelta {
    /// This process.
    pub own: Duration,
    /// The broker process.
    pub broker: Option<Duration>,
    /// Every other process on the machine (other work competing for the cores).
    pub other: Option<Duration>,
}

impl CpuMark {
    pub fn now(broker: Option<u32>) -> Self {
        Self {
            own: cpu_time(),
            broker: broker.and_then(process_cpu),
            machine: machine_busy(),
        }
    }

    /// CPU used since `self`.
    pub fn since(&self, broker: Option<u32>) -> CpuDelta {
        let now = Self::now(broker);
        let own = now.own.saturating_sub(self.own);
        let broker = match (self.broker, now.broker) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a)),
            _ => None,
        };
        let other = match (self.machine, now.machine) {
            (Some(a), Some(b)) => Some(
                b.saturating_sub(a)
                    .saturating_sub(own)
                    .saturating_sub(broker.unwrap_or_default()),
            ),
            _ => None,
        };
        CpuDelta { own, broker, other }
    }
}

/// With `COTTONTAIL_BENCH_MARKS` set, prints `mark <what> <CLOCK_MONOTONIC seconds>` to
/// stderr, so a `perf record -k CLOCK_MONOTONIC` profile can be cut to one phase with
/// `perf report --time START,END`.
pub fn mark(what: &str) {
    if std::env::var_os("COTTONTAIL_BENCH_MARKS").is_none() {
        return;
    }
    // SAFETY: clock_gettime only writes into the struct we pass.
    let ts = unsafe {
        let mut ts: libc::timespec = std::mem::zeroed();
        libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts);
        ts
    };
    eprintln!("mark {what} {}.{:06}", ts.tv_sec, ts.tv_nsec / 1000);
}

/// A JSON body of exactly `BODY_BYTES` bytes (for ids below 10^12).
pub const BODY_BYTES: usize = 200;

/// The ~200-byte JSON job body for message `id`.
pub fn body(id: u64) -> Vec<u8> {
    let base = serde_json::json!({
        "id": id,
        "kind": "bench.noop",
        "tenant": "acme",
        "created_at": "2024-01-01T00:00:00Z",
        "payload": "",
    })
    .to_string();
    let pad = BODY_BYTES.saturating_sub(base.len());
    serde_json::json!({
        "id": id,
        "kind": "bench.noop",
        "tenant": "acme",
        "created_at": "2024-01-01T00:00:00Z",
        "payload": "x".repeat(pad),
    })
    .to_string()
    .into_bytes()
}

/// The properties cottontail's `Client::publish` sets (JSON, persistent, timestamp), so raw
/// and cottontail-published messages are byte-for-byte the same kind of message.
pub fn job_properties() -> BasicProperties {
    let mut p = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2);
    if let Ok(now) = SystemTime::now().duration_since(UNIX_EPOCH) {
        p = p.with_timestamp(now.as_secs());
    }
    p
}

/// Opens a connection with a recognisable name.
pub async fn connect(url: &str, name: &str) -> Res<Connection> {
    let props = ConnectionProperties::default().with_connection_name(name.to_owned().into());
    Ok(Connection::connect(url, props).await?)
}

/// Ready messages in `queue` (passive declare).
pub async fn ready_count(channel: &Channel, queue: &str) -> Res<u32> {
    let q = channel
        .queue_declare(
            queue.to_owned().into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    Ok(q.message_count())
}

/// Deletes `queue` if it exists (errors ignored: a missing queue is fine).
pub async fn delete_queue(conn: &Connection, queue: &str) {
    if let Ok(ch) = conn.create_channel().await {
        let _ = ch
            .queue_delete(queue.to_owned().into(), QueueDeleteOptions::default())
            .await;
        let _ = ch.close(200, "deleted".into()).await;
    }
}

/// A name unique to this process and call.
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}.{}.{n}", std::process::id())
}

/// Median (upper median for even counts) of `values`; NaN when empty.
pub fn median(values: &[f64]) -> f64 {
    percentile(values, 0.5)
}

/// The `p`-quantile (nearest rank) of `values`; NaN when empty.
pub fn percentile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

/// Smallest and largest of `values`.
pub fn range(values: &[f64]) -> (f64, f64) {
    values
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| {
            (lo.min(x), hi.max(x))
        })
}

/// CPU model and core count.
pub fn machine() -> String {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| format!("{:.1} GiB", kb as f64 / 1024.0 / 1024.0))
        .unwrap_or_else(|| "?".into());
    format!("nproc {cores}, {model}, {mem} RAM")
}

/// The broker's product and version from `connection.start`'s server-properties (lapin does
/// not expose them, so this reads the first frame of a bare AMQP handshake).
pub async fn broker_version(url: &str) -> Option<String> {
    let uri: cottontail::lapin::uri::AMQPUri = url.split(',').next()?.trim().parse().ok()?;
    let addr = format!("{}:{}", uri.authority.host, uri.authority.port);
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        s.write_all(b"AMQP\x00\x00\x09\x01").await.ok()?;
        let mut header = [0u8; 7];
        s.read_exact(&mut header).await.ok()?;
        let size = u32::from_be_bytes([header[3], header[4], header[5], header[6]]) as usize;
        let mut frame = vec![0u8; size.min(1 << 20)];
        s.read_exact(&mut frame).await.ok()?;
        let product = long_string_field(&frame, b"product").unwrap_or_else(|| "broker".into());
        let version = long_string_field(&frame, b"version")?;
        Some(format!("{product} {version}"))
    };
    tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .ok()
        .flatten()
}

/// Finds `<len><key>S<u32 len><value>` in a raw field table.
fn long_string_field(frame: &[u8], key: &[u8]) -> Option<String> {
    let mut needle = vec![key.len() as u8];
    needle.extend_from_slice(key);
    needle.push(b'S');
    let at = frame.windows(needle.len()).position(|w| w == needle)? + needle.len();
    let len = u32::from_be_bytes(frame.get(at..at + 4)?.try_into().ok()?) as usize;
    let value = frame.get(at + 4..at + 4 + len)?;
    Some(String::from_utf8_lossy(value).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_200_bytes_of_json() {
        for id in [0, 7, 123_456, 99_999_999] {
            let b = body(id);
            assert_eq!(b.len(), BODY_BYTES);
            let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
            assert_eq!(v["id"], id);
        }
    }

    #[test]
    fn stats() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(percentile(&[1.0, 2.0, 3.0, 4.0], 0.99), 4.0);
        assert_eq!(range(&[2.0, 5.0, 1.0]), (1.0, 5.0));
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn finds_long_string_fields() {
        let mut f = vec![0u8; 4];
        f.extend_from_slice(b"\x07versionS\x00\x00\x00\x063.10.8");
        assert_eq!(long_string_field(&f, b"version").as_deref(), Some("3.10.8"));
        assert_eq!(long_string_field(&f, b"product"), None);
    }
}
