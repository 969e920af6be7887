//! Cluster failover: a PRIVATE 3-node cluster (scripts/cluster.sh), quorum queues
//! (cottontail's default) replicated on all three, workers and publisher given all three
//! URLs. One node is stopped under load (`rabbitmqctl -n node2 stop_app`): processing
//! continues on the other two, nothing is lost; the node is brought back; the cluster is
//! stopped by a Drop guard.
mod common;

use std::time::{Duration, Instant};

use common::*;

/// The child-process side: a no-op unless the parent set the `COTTONTAIL_CHAOS_*` variables.
#[tokio::test]
async fn chaos_worker() {
    chaos_worker_main().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_a_cluster_node_under_load_loses_nothing() {
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
    let chaos = Chaos::new("cluster_node_down", &all, "chaos_worker");
    bounded(limit, async {
        // Worker A prefers node2, so it declares the queues there (the quorum leader is
        // placed on the declaring node) and is connected to the node that goes down.
        let name_a = unique("chaos-cluster-a");
        let mut worker_a = chaos.spawn_worker(&name_a, "steady", Some(&urls([1, 2, 0])));
        chaos.wait_queue(Duration::from_secs(60)).await;
        let mut worker_b = chaos.spawn_worker(&unique("chaos-cluster-b"), "steady", Some(&all));
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
        eprintln!("chaos cluster_node_down: {line}");
        assert!(
            cluster.nodes.iter().all(|n| line.contains(n.as_str())),
            "the quorum queue should have a member on every node: {line}"
        );
        // The publisher also starts on node2 and must fail over.
        // Half the messages before the fault, the rest released once node2 is down.
        let mut publisher = ChaosPublisher::spawn_gated(
            &urls([1, 0, 2]),
            &chaos.queue,
            (0..messages).map(|i| format!("cl-{i}")).collect(),
            20,
            Duration::from_millis(100),
            messages / 2,
        );
        publisher
            .wait_published(messages / 4, Duration::from_secs(120))
            .await;
        let busy = chaos.ledger.len() + 1;
        chaos
            .wait_handled(busy, Duration::from_secs(60), "the workers handling")
            .await;

        let down = Instant::now();
        cluster.ctl(1, &["stop_app"]);
        let from = chaos.ledger.len();
        publisher.release(messages);
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
            "chaos cluster_node_down: processing continued {recovery} ms after node2 stop_app \
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
        assert_eq!(
            tally.dead_lettered, 0,
            "nothing here should be dead-lettered"
        );
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
