//! The fault-injection suite of issue 16 with its history checker, on a short fixed schedule:
//! Redis and every gateway node in network namespaces of their own (`e2e::netns`), faults from
//! real partitions (links set down), a fault proxy on each node's Redis link and each node's
//! client link (`e2e::faultproxy`), signals to Redis, nodes and nginx. Every test runs ack-mode
//! clients (proven by JWT) that resume and retry as `client.js` does, then checks the whole
//! history (`e2e::checker`): no confirmed message lost, first deliveries in id order, duplicates
//! only as redeliveries, presence right within the deadline after each fault, no phantom users,
//! no leaked subscriptions. Each test prints its recovery times.
//!
//! Needs root (network namespaces): a test fails with a clear message otherwise. The longer
//! randomized run is `cargo run -p e2e --bin faults -- --seed N --secs S`.

use e2e::chaos::{assert_clean, run_schedule, Fault, LabConfig};

async fn run(name: &str, schedule: &[Fault]) -> anyhow::Result<e2e::chaos::RunReport> {
    let report = run_schedule(LabConfig::small(name), schedule).await?;
    assert_clean(&report)?;
    // Every fault recovered fully (traffic for everyone, presence right), and no member saw a
    // connected user logged out unless a node was cut off from Redis (see
    // `Fault::may_log_out_connected_users`; docs/reliability.md).
    for r in &report.recoveries {
        assert!(
            r.all_confirm.is_some() && r.all_delivery.is_some() && r.presence.is_some(),
            "{r}"
        );
        if !r.fault.may_log_out_connected_users() {
            assert_eq!(r.logouts_of_connected, 0, "{r}");
        }
    }
    assert!(report.stats.confirmed > 50, "{:?}", report.stats);
    Ok(report)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_partitioned_from_redis_loses_nothing() -> anyhow::Result<()> {
    run(
        "pnr",
        &[Fault::PartitionNodeFromRedis { node: 0, secs: 4.0 }],
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_cut_off_from_their_node_resume_elsewhere() -> anyhow::Result<()> {
    run(
        "pcn",
        &[
            Fault::PartitionClientsFromNode { node: 0, secs: 5.0 },
            Fault::ClientLinkCut { node: 1 },
            Fault::ClientLinkStall { node: 0, secs: 4.0 },
        ],
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_cut_stalled_or_lossy_redis_link_loses_nothing() -> anyhow::Result<()> {
    run(
        "rlink",
        &[
            Fault::RedisLinkDelay {
                node: 0,
                ms: 400,
                secs: 3.0,
            },
            Fault::RedisLinkCut { node: 1 },
            Fault::RedisLinkStall { node: 0, secs: 3.0 },
            Fault::RedisLinkLoss { node: 1, secs: 4.0 },
        ],
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_redis_loses_nothing_and_logs_nobody_out() -> anyhow::Result<()> {
    // Longer than the presence TTL (3 s).
    run("rstop", &[Fault::RedisSigstop { secs: 4.0 }]).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_from_its_aof_keeps_every_confirmed_message() -> anyhow::Result<()> {
    let report = run("raof", &[Fault::RedisRestartAof { secs: 1.0 }]).await?;
    assert_eq!(report.stats.lost_with_redis_data, 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_empty_tells_members_and_recovers() -> anyhow::Result<()> {
    // What Redis lost is exempt from the loss check (and counted); everything after the
    // restart is owed as usual, and presence comes back.
    run("rempty", &[Fault::RedisRestartEmpty { secs: 1.0 }]).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_or_frozen_node_loses_nothing() -> anyhow::Result<()> {
    run(
        "node",
        &[
            Fault::NodeKill { node: 0 },
            Fault::NodeSigstop { node: 1, secs: 4.0 },
        ],
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_nginx_reload_under_traffic_loses_nothing() -> anyhow::Result<()> {
    run("ngx", &[Fault::NginxReload]).await?;
    Ok(())
}

/// Negative control: the same run with clients that do not resume (they log in again without
/// `ack` or `lastId` after a reconnect, as the tutorial's page does) must be reported as losing
/// messages — the checker is not blind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checker_reports_what_careless_clients_missed() -> anyhow::Result<()> {
    let config = LabConfig {
        careless: true,
        drain: std::time::Duration::from_secs(5),
        ..LabConfig::small("careless")
    };
    let report = run_schedule(config, &[Fault::ClientLinkStall { node: 1, secs: 4.0 }]).await?;
    let lost = report
        .violations
        .iter()
        .filter(|v| matches!(v, e2e::checker::Violation::Lost { .. }))
        .count();
    assert!(lost > 0, "no loss reported:\n{report}");
    Ok(())
}
