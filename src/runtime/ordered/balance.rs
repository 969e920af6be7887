//! Partition ownership: each instance keeps its fair share of an ordered handler's partitions,
//! counting the instances through the consumers of `Q.members`.

use std::collections::HashMap;
use std::sync::Arc;

use lapin::options::{BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use tokio_util::sync::CancellationToken;

use super::partition::Partition;
use crate::connection::{bounded, CLEANUP};
use crate::queue::Ordering;
use crate::runtime::pipeline::Worker;
use crate::runtime::Lifecycle;

/// Builds a partition worker (the handler's worker; the partition acks on its own channel).
pub(crate) type MakeWorker = Arc<dyn Fn() -> Worker + Send + Sync>;

/// Keeps this instance's fair share of partitions: joins `Q.members`, grabs unowned
/// partitions while below `ceil(partitions / members)`, releases extras when above.
pub(crate) async fn balance(
    queue: String,
    ordering: Ordering,
    connection: Arc<Connection>,
    make_worker: MakeWorker,
    metrics: crate::ops::metrics::OrderingMetrics,
    session: Lifecycle,
) {
    let Lifecycle {
        stop,
        failed,
        abort,
    } = session.clone();
    let members = crate::names::members_queue(&queue);
    // Keep the consumer: dropping a lapin consumer cancels it, and it is what counts us.
    let (member_channel, _member) = match join_members(&connection, &members).await {
        Ok(joined) => joined,
        Err(error) => {
            tracing::warn!(%error, queue, "cannot join the members queue");
            failed.cancel();
            return;
        }
    };
    let mut owned: HashMap<u16, Owned> = HashMap::new();
    let offset = fastrand::u16(..ordering.partitions);
    let instance = make_worker().owner;
    loop {
        owned.retain(|_, o| !o.handle.is_finished());
        let live = count_consumers(&connection, &members)
            .await
            .unwrap_or(1)
            .max(1);
        let fair = usize::from(ordering.partitions).div_ceil(live as usize);
        // Standby: we subscribed at the same moment as another instance and the broker made
        // the other one active. Step back so the partition counts once. The broker cannot
        // tell us: a quorum queue's consumer count leaves out waiting single-active consumers.
        // So a partition that never delivered to us is given up when a partition has no
        // consumer at all: held as a standby it would keep that one unowned for good.
        let mut standby = Vec::new();
        let mut orphans: Option<bool> = None;
        for (p, o) in &owned {
            if o.active.load(std::sync::atomic::Ordering::Relaxed)
                || o.since.elapsed() < ordering.rebalance
            {
                continue;
            }
            let orphaned = match orphans {
                Some(known) => known,
                None => {
                    let known =
                        any_unconsumed(&connection, &queue, ordering.partitions, &owned).await;
                    orphans = Some(known);
                    known
                }
            };
            if orphaned {
                standby.push(*p);
            }
        }
        // Too many (someone joined): hand partitions over (finish in-flight, return held,
        // cancel).
        let extra = owned
            .len()
            .saturating_sub(standby.len())
            .saturating_sub(fair);
        let mut release: Vec<u16> = standby;
        release.extend(
            owned
                .keys()
                .copied()
                .filter(|p| !release.contains(p))
                .take(extra)
                .collect::<Vec<_>>(),
        );
        for p in release {
            if let Some(o) = owned.remove(&p) {
                o.release.cancel();
                let _ = bounded(CLEANUP * 2, o.handle).await;
                tracing::info!(%instance, queue, partition = p, "released partition");
            }
        }
        if owned.len() < fair {
            for i in 0..ordering.partitions {
                if owned.len() >= fair {
                    break;
                }
                let p = (i + offset) % ordering.partitions;
                if owned.contains_key(&p) {
                    continue;
                }
                let name = crate::names::partition_queue(&queue, p);
                if count_consumers(&connection, &name).await != Ok(0) {
                    continue;
                }
                match own(&connection, &name, &ordering).await {
                    Ok((channel, consumer)) => {
                        let release = CancellationToken::new();
                        let active = Arc::new(std::sync::atomic::AtomicBool::new(false));
                        let partition = Partition::new(
                            make_worker(),
                            (channel, consumer),
                            name.clone(),
                            ordering.clone(),
                            metrics.clone(),
                            (active.clone(), release.clone()),
                            session.clone(),
                        );
                        let handle = tokio::spawn(partition.run());
                        let since = std::time::Instant::now();
                        owned.insert(
                            p,
                            Owned {
                                release,
                                handle,
                                active,
                                since,
                            },
                        );
                        tracing::info!(%instance, queue, partition = p, "consumes partition");
                    }
                    Err(error) => {
                        tracing::debug!(%error, partition = p, "cannot consume partition");
                    }
                }
            }
        }
        metrics.partitions.set(owned.len() as i64);
        tokio::select! {
            _ = tokio::time::sleep(ordering.rebalance) => {}
            _ = stop.cancelled() => break,
            _ = failed.cancelled() => break,
        }
    }
    // Stopping: each partition finishes its running message (until the shutdown deadline
    // aborts it) and hands its held messages back by itself.
    let partitions = futures::future::join_all(owned.into_values().map(|o| o.handle));
    tokio::select! {
        _ = partitions => {}
        _ = async { abort.cancelled().await; tokio::time::sleep(CLEANUP).await } => {}
    }
    metrics.partitions.set(0);
    let _ = bounded(CLEANUP, member_channel.close(200, "bye".into())).await;
}

/// A partition this instance consumes.
struct Owned {
    release: CancellationToken,
    handle: tokio::task::JoinHandle<()>,
    /// Set on the first delivery: the broker made us the partition's active consumer.
    active: Arc<std::sync::atomic::AtomicBool>,
    since: std::time::Instant,
}

async fn join_members(
    connection: &Connection,
    members: &str,
) -> Result<(Channel, lapin::Consumer), lapin::Error> {
    let channel = connection.create_channel().await?;
    let consumer = channel
        .basic_consume(
            members.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok((channel, consumer))
}

/// Whether a partition we do not own has no consumer at all.
async fn any_unconsumed(
    connection: &Connection,
    queue: &str,
    partitions: u16,
    owned: &HashMap<u16, Owned>,
) -> bool {
    for p in (0..partitions).filter(|p| !owned.contains_key(p)) {
        if count_consumers(connection, &crate::names::partition_queue(queue, p)).await == Ok(0) {
            return true;
        }
    }
    false
}

async fn count_consumers(connection: &Connection, queue: &str) -> Result<u32, ()> {
    bounded(CLEANUP, count_consumers_now(connection, queue))
        .await
        .unwrap_or(Err(()))
}

async fn count_consumers_now(connection: &Connection, queue: &str) -> Result<u32, ()> {
    let channel = connection.create_channel().await.map_err(|_| ())?;
    let result = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .map(|q| q.consumer_count())
        .map_err(|_| ());
    let _ = channel.close(200, "".into()).await;
    result
}

async fn own(
    connection: &Connection,
    queue: &str,
    ordering: &Ordering,
) -> Result<(Channel, lapin::Consumer), lapin::Error> {
    let channel = connection.create_channel().await?;
    channel
        .basic_qos(ordering.prefetch, BasicQosOptions { global: false })
        .await?;
    let consumer = channel
        .basic_consume(
            queue.into(),
            "".into(),
            // Partition queues are single-active-consumer: the broker lets one consumer
            // have deliveries at a time, on quorum queues too (which ignore `exclusive`).
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok((channel, consumer))
}
