//! The test harness's Redis Cluster (issue 15's groundwork): it starts whole, routes keys by
//! their hash slot as Redis does, and a killed master's replica takes its slots over.

use std::time::Duration;

use e2e::redis_cluster::{command, slot_of, ClusterOpts, RedisCluster};

#[tokio::test]
async fn a_local_cluster_routes_by_slot_and_fails_over_a_killed_master() -> anyhow::Result<()> {
    let mut cluster = RedisCluster::start(ClusterOpts::default()).await?;
    assert_eq!(cluster.nodes.len(), 6);
    assert_eq!(cluster.urls().split(',').count(), 6);

    // Slots as the harness computes them are Redis's.
    let keys = [
        "foo",
        "gw:{r:lobby}:s",
        "gw:{u:bob}:acks",
        "{r:a}",
        "x{}y",
        "é{ü}",
    ];
    let any = cluster.nodes[0].port;
    for key in keys {
        let slot = command(any, &["CLUSTER", "KEYSLOT", key]).await?;
        assert_eq!(slot, slot_of(key).to_string(), "{key}");
    }

    // A master SIGKILLed: its replica takes the slot over and serves the key's slot.
    let key = "gw:{r:lobby}:s";
    let master = cluster.master_of(key).await?;
    assert_eq!(command(master, &["SET", key, "kept"]).await?, "OK");
    let acked = command(master, &["WAIT", "1", "2000"]).await?;
    assert_eq!(acked, "1", "the replica did not acknowledge the write");
    let took = cluster.kill_master_of(key, Duration::from_secs(30)).await?;
    let promoted = cluster.master_of(key).await?;
    assert_ne!(promoted, master);
    // Not asserted yet: whether the WAIT-acknowledged write is there. It was in 10 local runs
    // but missing ("nil") in one CI run; issue 15 has to find out why before it promises
    // anything about WAIT.
    let value = command(promoted, &["GET", key]).await?;
    println!("failover after a master SIGKILL (node timeout 2000 ms): {took:?}; the key: {value}");
    Ok(())
}
