use super::*;
use crate::stores::memory::jobs::job;
use crate::stores::MemoryJobs;
use tokio::sync::Semaphore;

/// A store that logs each batch and writes it to memory once a permit allows it (none:
/// hung).
struct Gated {
    memory: Arc<MemoryJobs>,
    permits: Arc<Semaphore>,
    batches: Mutex<Vec<Vec<(String, String)>>>,
    /// Set: every write fails at once, like a store that refuses connections.
    refusing: std::sync::atomic::AtomicBool,
}

impl Gated {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            memory: Arc::new(MemoryJobs::default()),
            permits: Arc::new(Semaphore::new(0)),
            batches: Mutex::default(),
            refusing: Default::default(),
        })
    }

    fn batches(&self) -> Vec<Vec<(String, String)>> {
        self.batches.lock().unwrap().clone()
    }
}

impl JobStore for Gated {
    fn get(&self, message_id: &str) -> BoxFuture<Result<Option<JobStatus>, StoreError>> {
        self.memory.get(message_id)
    }

    fn put(&self, _: JobStatus) -> BoxFuture<Result<(), StoreError>> {
        unreachable!("the writer writes batches")
    }

    fn put_many(self: Arc<Self>, statuses: Vec<JobStatus>) -> BoxFuture<Result<(), StoreError>> {
        let batch = statuses
            .iter()
            .map(|s| (s.message_id.clone(), s.status.clone()));
        self.batches.lock().unwrap().push(batch.collect());
        if self.refusing.load(std::sync::atomic::Ordering::SeqCst) {
            return Box::pin(async { Err(StoreError("connection refused".into())) });
        }
        Box::pin(async move {
            self.permits
                .acquire()
                .await
                .map_err(|e| StoreError(e.to_string()))?
                .forget();
            self.memory.clone().put_many(statuses).await
        })
    }
}

struct Running {
    jobs: Arc<Jobs>,
    metrics: Metrics,
    stop: CancellationToken,
    done: CancellationToken,
    writer: tokio::task::JoinHandle<()>,
}

fn start(store: Arc<Gated>, limit: Duration) -> Running {
    let metrics = Metrics::default();
    let jobs = Arc::new(Jobs::new(store, &metrics));
    let (stop, done) = (CancellationToken::new(), CancellationToken::new());
    let writer = tokio::spawn(jobs.clone().write_until(stop.clone(), done.clone(), limit));
    Running {
        jobs,
        metrics,
        stop,
        done,
        writer,
    }
}

fn dropped(metrics: &Metrics, reason: &str) -> u64 {
    metrics.job_status_dropped(reason).get()
}

async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..2000 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!("not within 2 s: {what}");
}

#[tokio::test]
async fn transitions_waiting_together_are_written_once_with_the_first_creation_time() {
    let store = Gated::new();
    store.permits.add_permits(100);
    // Not yet started: everything below waits for the writer together.
    let metrics = Metrics::default();
    let jobs = Arc::new(Jobs::new(store.clone(), &metrics));
    jobs.record(job("m1", "running", 1.0));
    jobs.record(job("m2", "running", 1.5));
    jobs.record(job("m1", "succeeded", 2.0));
    let (stop, done) = (CancellationToken::new(), CancellationToken::new());
    let writer = tokio::spawn(jobs.clone().write_until(stop, done.clone(), Duration::ZERO));
    until("written", || store.batches().len() == 1).await;
    let mut batch = store.batches()[0].clone();
    batch.sort();
    assert_eq!(
        batch,
        [
            ("m1".into(), "succeeded".into()),
            ("m2".into(), "running".into())
        ]
    );
    let m1 = store.memory.get("m1").await.unwrap().unwrap();
    assert_eq!((m1.created_at, m1.updated_at), (1.0, 2.0));
    done.cancel();
    writer.await.unwrap();
}

#[tokio::test]
async fn a_status_recorded_during_a_write_follows_it_and_reads_see_the_newest() {
    let store = Gated::new();
    let run = start(store.clone(), Duration::from_secs(1));
    run.jobs.record(job("m", "running", 1.0));
    until("running taken", || store.batches().len() == 1).await;
    assert_eq!(run.jobs.get("m").await.unwrap().unwrap().status, "running");
    run.jobs.record(job("m", "succeeded", 2.0));
    assert_eq!(
        run.jobs.get("m").await.unwrap().unwrap().status,
        "succeeded"
    );
    store.permits.add_permits(2);
    // Each batch writes to memory as soon as it has its permit.
    until("both written", || store.permits.available_permits() == 0).await;
    assert_eq!(store.batches().len(), 2);
    let stored = store.memory.get("m").await.unwrap().unwrap();
    assert_eq!(stored.status, "succeeded", "never overwritten by running");
    let read = run.jobs.get("m").await.unwrap().unwrap();
    assert_eq!((read.status.as_str(), read.created_at), ("succeeded", 1.0));
    run.done.cancel();
    run.writer.await.unwrap();
}

#[tokio::test]
async fn a_hung_store_fills_the_buffer_to_its_bound_and_the_rest_is_counted() {
    let store = Gated::new();
    let run = start(store.clone(), Duration::from_millis(50));
    run.jobs.record(job("first", "running", 1.0));
    until("first taken", || store.batches().len() == 1).await;
    for i in 0..PENDING_JOBS + 5 {
        run.jobs.record(job(&format!("m{i}"), "running", 1.0));
    }
    // A job already waiting still gets its newest status.
    run.jobs.record(job("m0", "succeeded", 2.0));
    assert_eq!(dropped(&run.metrics, "buffer_full"), 5);
    assert_eq!(run.jobs.buffer().pending.len(), PENDING_JOBS);
    // Shutdown: the writes end at the deadline; what they held is counted.
    run.stop.cancel();
    run.done.cancel();
    tokio::time::timeout(Duration::from_secs(2), run.writer)
        .await
        .expect("the writer ends within the shutdown timeout")
        .unwrap();
    assert_eq!(
        dropped(&run.metrics, "store_error"),
        1 + PENDING_JOBS as u64
    );
}

#[tokio::test]
async fn statuses_the_store_refused_are_written_once_it_answers() {
    use std::sync::atomic::Ordering::SeqCst;
    let store = Gated::new();
    store.refusing.store(true, SeqCst);
    let run = start(store.clone(), Duration::from_secs(1));
    run.jobs.record(job("during", "running", 1.0));
    until("refused", || !store.batches().is_empty()).await;
    run.jobs.record(job("during", "succeeded", 2.0));
    run.jobs.record(job("meanwhile", "running", 3.0));
    until("tried again", || store.batches().len() >= 3).await;
    store.refusing.store(false, SeqCst);
    store.permits.add_permits(10);
    let mut written = false;
    for _ in 0..2000 {
        let during = store.memory.get("during").await.unwrap();
        let meanwhile = store.memory.get("meanwhile").await.unwrap();
        if let (Some(during), Some(_)) = (during, meanwhile) {
            assert_eq!(during.status, "succeeded");
            assert_eq!(during.created_at, 1.0, "the first creation time kept");
            written = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(written, "not written within 10 s of the store answering");
    assert_eq!(dropped(&run.metrics, "store_error"), 0, "nothing lost");
    run.done.cancel();
    run.writer.await.unwrap();
}
