//! Many small rooms on a Redis Cluster of 1 shard and of 3 shards, the same gateways and the
//! same generator (issue 15): confirmed messages per second, Redis CPU per message on each
//! shard, gateway CPU per message, and how rooms and messages spread over the shards.
//!
//! ```sh
//! cargo build --release -p gateway -p e2e --bin gateway --bin bench_shards
//! E2E_RELEASE=1 target/release/bench_shards --masters 1 --secs 15
//! E2E_RELEASE=1 target/release/bench_shards --masters 3 --secs 15
//! ```
//!
//! Each room has a sender on the first node and a listener on the second; each sender keeps
//! `--window` messages in flight (a new one on each confirmation: its own copy) for `--secs`.
//! This 2-core machine runs everything side by side, so throughput is bounded by the cores,
//! not by the shards: what scales is read from the CPU each shard spends per message.
//!
//! With `--replicas 1 --kill-after-secs S` the master of the first room's shard is SIGKILLed
//! after S seconds, and afterwards the history of every room on that shard is read back: the
//! messages that were confirmed (the sender got its own copy) but are not there were lost in
//! the failover — the window `GATEWAY_REDIS_WAIT_REPLICAS` (`--wait-replicas`) closes.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use clap::Parser;
use e2e::procfs::cpu_seconds;
use e2e::redis_cluster::{ClusterOpts, RedisCluster};
use e2e::{is, Client, Gateway, GatewayOpts};
use serde_json::json;

#[derive(Parser)]
struct Args {
    /// Shards (masters, no replicas).
    #[arg(long, default_value_t = 3)]
    masters: usize,
    /// Rooms, each with one sender and one listener.
    #[arg(long, default_value_t = 200)]
    rooms: usize,
    /// Messages in flight per sender.
    #[arg(long, default_value_t = 4)]
    window: usize,
    #[arg(long, default_value_t = 15)]
    secs: u64,
    /// Replicas per master.
    #[arg(long, default_value_t = 0)]
    replicas: usize,
    /// SIGKILL the first room's master after this many seconds (needs `--replicas 1`).
    #[arg(long)]
    kill_after_secs: Option<u64>,
    /// GATEWAY_REDIS_WAIT_REPLICAS of the gateways.
    #[arg(long, default_value_t = 0)]
    wait_replicas: u32,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let mut cluster = RedisCluster::start(ClusterOpts {
        masters: args.masters,
        replicas_per_master: args.replicas,
        ..ClusterOpts::default()
    })
    .await?;
    let nodes = start_gateways(&cluster, &args).await?;
    // Which shard serves each room.
    let mut shard_of_room = Vec::new();
    for r in 0..args.rooms {
        shard_of_room.push(cluster.master_of(&format!("gw:{{r:b{r}}}:s")).await?);
    }
    let mut senders = Vec::new();
    let mut listeners = Vec::new();
    for r in 0..args.rooms {
        let room = format!("b{r}");
        let mut sender = Client::connect(&nodes[0].ws_url()).await?;
        sender.login(&format!("s{r}"), json!(room)).await?;
        let mut listener = Client::connect(&nodes[1].ws_url()).await?;
        listener.login(&format!("l{r}"), json!(room)).await?;
        senders.push(sender);
        listeners.push(listener);
    }
    let redis_pids: Vec<(u16, u32)> = cluster
        .nodes
        .iter()
        .filter_map(|n| Some((n.port, n.pid()?)))
        .collect();
    let gateway_pids: Vec<u32> = nodes.iter().filter_map(|n| n.proc.pid()).collect();
    let cpu = |pids: &[u32]| pids.iter().map(|&p| cpu_seconds(p)).sum::<f64>();
    let redis_before: Vec<f64> = redis_pids.iter().map(|(_, p)| cpu_seconds(*p)).collect();
    let gateways_before = cpu(&gateway_pids);

    let confirmed: Vec<Arc<AtomicU64>> = (0..args.rooms).map(|_| Arc::default()).collect();
    let confirmed_ids: Vec<Arc<std::sync::Mutex<Vec<String>>>> =
        (0..args.rooms).map(|_| Arc::default()).collect();
    let errors = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(args.secs);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (r, mut sender) in senders.into_iter().enumerate() {
        let count = confirmed[r].clone();
        let ids = confirmed_ids[r].clone();
        let errors = errors.clone();
        let window = args.window;
        tasks.push(tokio::spawn(async move {
            let room = format!("b{r}");
            let send = |i: u64| json!({"roomId": room, "content": format!("m{i}"), "clientMsgId": format!("c{i}")});
            let mut next = 0u64;
            for _ in 0..window {
                sender.send(send(next)).await?;
                next += 1;
            }
            while Instant::now() < deadline {
                let answer = sender
                    .recv_until_timeout(Duration::from_secs(1), |f| {
                        f["event"] == "message" || f["event"] == "error"
                    })
                    .await;
                let Ok(frame) = answer else { continue }; // waiting out a failover
                if frame["event"] == "message" {
                    count.fetch_add(1, Ordering::Relaxed);
                    let id = frame["clientMsgId"].as_str().unwrap_or_default().to_string();
                    ids.lock().expect("ids").push(id);
                } else {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
                sender.send(send(next)).await?;
                next += 1;
            }
            anyhow::Ok(())
        }));
    }
    let drain: Vec<_> = listeners
        .into_iter()
        .map(|mut l| {
            tokio::spawn(async move { while l.recv_until(is("message")).await.is_ok() {} })
        })
        .collect();
    let killed = match args.kill_after_secs {
        Some(after) => {
            tokio::time::sleep(Duration::from_secs(after)).await;
            let master = cluster.master_of("gw:{r:b0}:s").await?;
            cluster.kill(master);
            Some(master)
        }
        None => None,
    };
    for task in tasks {
        task.await??;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let redis_cpu: Vec<f64> = redis_pids
        .iter()
        .zip(&redis_before)
        .map(|((_, p), before)| cpu_seconds(*p) - before)
        .collect();
    let gateway_cpu = cpu(&gateway_pids) - gateways_before;
    for task in drain {
        task.abort();
    }
    report(
        &args,
        &redis_pids,
        &redis_cpu,
        gateway_cpu,
        elapsed,
        &shard_of_room,
        &confirmed,
    );
    println!("error frames: {}", errors.load(Ordering::Relaxed));
    if let Some(master) = killed {
        lost_in_failover(&nodes[1], master, &shard_of_room, &confirmed_ids).await?;
    }
    Ok(())
}

/// Reads back the history of every room on the killed shard; prints the confirmed messages
/// that are not there.
async fn lost_in_failover(
    node: &Gateway,
    killed: u16,
    shard_of_room: &[u16],
    confirmed_ids: &[Arc<std::sync::Mutex<Vec<String>>>],
) -> Result<()> {
    let mut reader = Client::connect(&node.ws_url()).await?;
    let (mut confirmed_total, mut lost_total) = (0, 0);
    for (r, shard) in shard_of_room.iter().enumerate() {
        if *shard != killed {
            continue;
        }
        let room = format!("b{r}");
        reader.login("reader", json!(room)).await?;
        let stored = history(&mut reader, &room).await?;
        let confirmed = confirmed_ids[r].lock().expect("ids").clone();
        let lost: Vec<&String> = confirmed
            .iter()
            .filter(|id| !stored.contains(*id))
            .collect();
        confirmed_total += confirmed.len();
        lost_total += lost.len();
        if !lost.is_empty() {
            println!(
                "room {room}: lost {} confirmed messages: {lost:?}",
                lost.len()
            );
        }
    }
    println!(
        "failover of the shard on {killed}: {lost_total} of {confirmed_total} confirmed messages \
         of its rooms lost"
    );
    Ok(())
}

/// The clientMsgIds in a room's history, read page by page.
async fn history(reader: &mut Client, room: &str) -> Result<std::collections::HashSet<String>> {
    let mut stored = std::collections::HashSet::new();
    let mut since = "0".to_string();
    loop {
        reader
            .send(json!({"event":"sync","roomId": room,"since": since,"limit":1000}))
            .await?;
        let mut got = 0;
        loop {
            let frame = reader
                .recv_until(|f| f["event"] == "message" || f["event"] == "synced")
                .await?;
            if frame["event"] == "synced" {
                break;
            }
            got += 1;
            since = frame["id"].as_str().unwrap_or_default().to_string();
            stored.insert(
                frame["clientMsgId"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            );
        }
        if got < 1000 {
            return Ok(stored);
        }
    }
}

/// Two gateway nodes on `cluster`, their per-address limits out of the generator's way.
async fn start_gateways(cluster: &RedisCluster, args: &Args) -> Result<Vec<Gateway>> {
    let mut nodes = Vec::new();
    for i in 0..2 {
        let opts = GatewayOpts::default()
            .node(&format!("s{i}"))
            .env("GATEWAY_REDIS_CLUSTER_URLS", cluster.urls())
            .env("GATEWAY_MAX_CONNECTIONS_PER_IP", 100_000)
            .env("GATEWAY_MAX_UPGRADES_PER_IP_PER_SEC", 100_000)
            .env("GATEWAY_MAX_PENDING_LOGINS_PER_IP", 100_000)
            .env("GATEWAY_MAX_FRAMES_PER_SEC", 10_000)
            .env("GATEWAY_REDIS_WAIT_REPLICAS", args.wait_replicas);
        nodes.push(Gateway::start(opts).await?);
    }
    for node in &nodes {
        node.wait_ready(200).await?;
    }
    Ok(nodes)
}

fn report(
    args: &Args,
    redis_pids: &[(u16, u32)],
    redis_cpu: &[f64],
    gateway_cpu: f64,
    elapsed: f64,
    shard_of_room: &[u16],
    confirmed: &[Arc<AtomicU64>],
) {
    let mut rooms_on: BTreeMap<u16, usize> = BTreeMap::new();
    let mut messages_on: BTreeMap<u16, u64> = BTreeMap::new();
    for (r, shard) in shard_of_room.iter().enumerate() {
        *rooms_on.entry(*shard).or_default() += 1;
        *messages_on.entry(*shard).or_default() += confirmed[r].load(Ordering::Relaxed);
    }
    let total: u64 = messages_on.values().sum();
    println!(
        "## {} shard(s): {} rooms, window {}, {:.1} s\n",
        args.masters, args.rooms, args.window, elapsed
    );
    println!(
        "confirmed messages: {total} ({:.0}/s); gateway CPU {:.1} µs per message (2 nodes)\n",
        total as f64 / elapsed,
        gateway_cpu * 1e6 / total.max(1) as f64
    );
    println!("| shard | rooms | messages | share | Redis CPU s | Redis CPU µs per message |");
    println!("|---|---:|---:|---:|---:|---:|");
    for ((port, _), cpu) in redis_pids.iter().zip(redis_cpu) {
        let messages = messages_on.get(port).copied().unwrap_or(0);
        println!(
            "| {port} | {} | {messages} | {:.1} % | {cpu:.2} | {:.1} |",
            rooms_on.get(port).copied().unwrap_or(0),
            100.0 * messages as f64 / total.max(1) as f64,
            cpu * 1e6 / messages.max(1) as f64
        );
    }
    let all_redis: f64 = redis_cpu.iter().sum();
    println!(
        "\nall shards: {:.1} µs of Redis CPU per message",
        all_redis * 1e6 / total.max(1) as f64
    );
}
