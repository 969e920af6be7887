//! Cluster failover: a PRIVATE 3-node cluster (scripts/cluster.sh), quorum queues
//! (cottontail's default) replicated on all three, workers and publisher given all three
//! URLs. One node is stopped under load (`rabbitmqctl -n node2 stop_app`): processing
//! continues on the other two, nothing is lost; the node is brought back; the cluster is
//! stopped by a Drop guard. The first scenario runs every feature column too (the cluster row
//! of RELIABILITY.md's "Fault × feature" table).
use cottontail_test_support as common;

use std::time::{Duration, Instant};

use common::*;

/// The child-process side: a no-op unless the parent set the `COTTONTAIL_CHAOS_*` variables.
#[tokio::test]
async fn chaos_worker() {
    chaos_worker_main().await;
}

/// One cluster at a time: each test starts three nodes of its own.
static ONE_CLUSTER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_a_cluster_node_under_load_loses_nothing() {
    lose_node2_under_load("cluster_node_down", "steady", true, |_, _| {}).await;
}

/// Every message fails its first attempt and waits in the retry tier queue. The tier queue's
/// leader is moved to node1, the work queue's stays on node2, and node2 stops: copies keep
/// expiring while the work queue elects a new leader. At-least-once dead-lettering keeps
/// them until the work queue takes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_while_losing_a_cluster_node_lose_nothing() {
    lose_node2_under_load("retries_node_down", "retrying", false, |cluster, chaos| {
        let tier = cottontail::names::tier_queue(&chaos.queue, CHAOS_RETRY_DELAY);
        let moved = cluster.ctl(
            1,
            &[
                "eval",
                &format!(
                    "{{ok, Q}} = rabbit_amqqueue:lookup(rabbit_misc:r(<<\"/\">>, queue, \
                     <<\"{tier}\">>)), {{Ra, _}} = amqqueue:get_pid(Q), \
                     ra:transfer_leadership({{Ra, '{}'}}, {{Ra, '{}'}}).",
                    cluster.nodes[1], cluster.nodes[0]
                ),
            ],
        );
        eprintln!(
            "chaos retries_node_down: tier leader moved to node1: {}",
            moved.trim()
        );
    })
    .await;
}

/// A private 3-node cluster; worker A (and the queues' leaders) on node2, worker B on all
/// three; `prepare` runs once the queues exist; node2 stops under load and comes back. With
/// `features`, the workers run every feature column too (RELIABILITY.md, "Fault × feature").
async fn lose_node2_under_load(
    scenario: &str,
    mode: &str,
    features: bool,
    prepare: impl FnOnce(&PrivateCluster, &Chaos),
) {
    let _one = ONE_CLUSTER.lock().await;
    let soak = chaos_soak();
    let (messages, limit) = if soak {
        (20_000, Duration::from_secs(900))
    } else {
        (2_000, Duration::from_secs(150))
    };
    let cluster = PrivateCluster::start("cl");
    let urls = |order: [usize; 3]| {
        order
            .iter()
            .map(|&i| cluster.urls[i].clone())
            .collect::<Vec<_>>()
            .join(",")
    };
    // node1,node2,node3: the AMQP_URL format of a cluster.
    let all = urls([0, 1, 2]);
    let mut chaos = Chaos::new(scenario, &all, "chaos_worker");
    if features {
        chaos = chaos.with_features(&redis_url());
    }
    bounded(limit, async {
        // Worker A prefers node2, so it declares the queues there (the quorum leader is
        // placed on the declaring node) and is connected to the node that goes down.
        let name_a = unique("chaos-cluster-a");
        let mut worker_a = chaos.spawn_worker(&name_a, mode, Some(&urls([1, 2, 0])));
        chaos.wait_queue(Duration::from_secs(60)).await;
        prepare(&cluster, &chaos);
        let mut worker_b = chaos.spawn_worker(&unique("chaos-cluster-b"), mode, Some(&all));
        let on_node2 = cluster.ctl(1, &["list_connections", "client_properties", "-q"]);
        assert!(
            on_node2.contains(&name_a),
            "worker A should be connected to node2"
        );
        let queues = cluster.ctl(0, &["list_queues", "name", "leader", "members", "-q"]);
        let line = queues
            .lines()
            .find(|l| l.split_whitespace().next() == Some(chaos.queue.as_str()))
            .unwrap_or_else(|| panic!("queue {} not listed: {queues}", chaos.queue));
        eprintln!("chaos {scenario}: {line}");
        assert!(
            cluster.nodes.iter().all(|n| line.contains(n.as_str())),
            "the quorum queue should have a member on every node: {line}"
        );
        // The publisher also starts on node2 and must fail over.
        // Half the messages before the fault, the rest released once node2 is down.
        let ids = chaos.ids("cl", messages);
        let total = ids.len();
        let mut publisher = ChaosPublisher::spawn_gated(
            &urls([1, 0, 2]),
            &chaos.queue,
            ids,
            20 * total / messages,
            Duration::from_millis(100),
            total / 2,
        );
        publisher
            .wait_published(total / 4, Duration::from_secs(120))
            .await;
        let busy = chaos.ledger.len() + 1;
        chaos
            .wait_handled(busy, Duration::from_secs(60), "the workers handling")
            .await;

        let down = Instant::now();
        chaos.mark_fault();
        cluster.ctl(1, &["stop_app"]);
        // Losing the node is the fault; the other two carry on.
        chaos.fault_over();
        let from = chaos.ledger.len();
        publisher.release(total);
        let published_at_stop = publisher.count();
        // Processing continues with node2 down: two workers × concurrency 8 in flight at
        // most, so more lines than that mean real progress after the failover.
        let recovery = chaos
            .recovery(down, from, 2 * 8 + 50, Duration::from_secs(90))
            .await;
        publisher
            .wait_published(published_at_stop + 200, Duration::from_secs(90))
            .await;
        eprintln!(
            "chaos {scenario}: processing continued {recovery} ms after node2 stop_app \
             ({} handled, {} confirmed while node2 was down)",
            chaos.ledger.len() - from,
            publisher.count() - published_at_stop
        );
        cluster.ctl(1, &["start_app"]);
        publisher.finish(Duration::from_secs(120)).await;
        let tally = chaos
            .settle(
                &publisher,
                &mut [
                    std::mem::replace(&mut worker_a, ChildGuard(None)),
                    std::mem::replace(&mut worker_b, ChildGuard(None)),
                ],
                recovery,
                Duration::from_secs(120),
            )
            .await;
        tally.assert_nothing_dead_lettered();
        // All three members are back.
        let status = cluster.ctl(0, &["cluster_status"]);
        let running = status
            .split("Running Nodes")
            .nth(1)
            .and_then(|s| s.split("Versions").next())
            .unwrap_or_default();
        for node in &cluster.nodes {
            assert!(
                running.contains(node.as_str()),
                "{node} not running: {status}"
            );
        }
    })
    .await;
    drop(chaos);
    drop(cluster);
}
