//! A Redis Cluster of the test's own: `redis-server` processes in cluster mode on free ports
//! (masters with their replicas), created with `redis-cli --cluster create`, for the tests and
//! benchmarks of the cluster backend (issue 15).
//!
//! Pitfalls this handles (see ../shared/DESIGN.md): a node's cluster bus listens on its port +
//! 10000, which must be free and below the kernel's ephemeral range too; a replica that never
//! finished its first sync refuses to fail over, so replicas sync without delay and `start`
//! waits for every replica's link.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::{free_port, wait_for, Proc};

/// One `redis-server` of the cluster.
pub struct ClusterNode {
    pub port: u16,
    proc: Option<Proc>,
}

impl ClusterNode {
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().and_then(Proc::pid)
    }

    pub fn is_running(&mut self) -> bool {
        self.proc.as_mut().is_some_and(Proc::is_running)
    }
}

/// A running cluster; every process is killed when it is dropped.
pub struct RedisCluster {
    pub nodes: Vec<ClusterNode>,
    dir: PathBuf,
}

/// Options of a cluster.
#[derive(Debug, Clone, Copy)]
pub struct ClusterOpts {
    pub masters: usize,
    pub replicas_per_master: usize,
    /// `cluster-node-timeout`: how long a master may be unreachable before its replica is
    /// promoted (2000 ms → promoted 3–4 s after a SIGKILL on this machine).
    pub node_timeout_ms: u64,
}

impl Default for ClusterOpts {
    fn default() -> Self {
        ClusterOpts {
            masters: 3,
            replicas_per_master: 1,
            node_timeout_ms: 2000,
        }
    }
}

/// A free port whose cluster bus port (+10000) is free too, both below the ephemeral range.
fn free_cluster_port() -> u16 {
    loop {
        let port = free_port();
        let bus = port as u32 + 10_000;
        if bus < 32_768 && std::net::TcpListener::bind(("127.0.0.1", bus as u16)).is_ok() {
            return port;
        }
    }
}

impl RedisCluster {
    /// Starts the nodes, creates the cluster, and waits until every node sees it whole
    /// (`cluster_state:ok`) and every replica is in sync with its master.
    pub async fn start(opts: ClusterOpts) -> Result<RedisCluster> {
        let count = opts.masters * (1 + opts.replicas_per_master);
        if opts.masters == 0 || (opts.masters < 3 && opts.replicas_per_master > 0) {
            bail!("a cluster of 1 or 2 masters has no replicas here; 3 or more may");
        }
        let dir = std::env::temp_dir().join(format!(
            "e2e-redis-cluster-{}-{}",
            std::process::id(),
            free_port()
        ));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut cluster = RedisCluster {
            nodes: Vec::new(),
            dir,
        };
        for _ in 0..count {
            let port = free_cluster_port();
            let proc = cluster.spawn_node(port, opts.node_timeout_ms)?;
            cluster.nodes.push(ClusterNode {
                port,
                proc: Some(proc),
            });
        }
        for node in &cluster.nodes {
            ping(node.port).await?;
        }
        if opts.masters < 3 {
            // `redis-cli --cluster create` wants three masters: share the slots out by hand
            // (the single-shard baseline of the benchmarks).
            cluster.assign_slots_by_hand().await?;
            cluster.wait_whole(Duration::from_secs(30)).await?;
            return Ok(cluster);
        }
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for node in &cluster.nodes {
            create.arg(format!("127.0.0.1:{}", node.port));
        }
        let output = create
            .args(["--cluster-replicas", &opts.replicas_per_master.to_string()])
            .arg("--cluster-yes")
            .stdin(Stdio::null())
            .output()
            .context("running redis-cli --cluster create")?;
        if !output.status.success() {
            bail!(
                "redis-cli --cluster create failed: {}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        cluster.wait_whole(Duration::from_secs(30)).await?;
        Ok(cluster)
    }

    /// Masters without replicas, the slots split evenly, every node introduced to the first.
    async fn assign_slots_by_hand(&self) -> Result<()> {
        let n = self.nodes.len();
        for (i, node) in self.nodes.iter().enumerate() {
            let first = (16384 * i / n).to_string();
            let last = (16384 * (i + 1) / n - 1).to_string();
            command(node.port, &["CLUSTER", "ADDSLOTSRANGE", &first, &last]).await?;
            if i > 0 {
                let port = self.nodes[0].port.to_string();
                command(node.port, &["CLUSTER", "MEET", "127.0.0.1", &port]).await?;
            }
        }
        Ok(())
    }

    fn spawn_node(&self, port: u16, node_timeout_ms: u64) -> Result<Proc> {
        Proc::spawn(
            "redis-server (cluster)",
            Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--cluster-enabled", "yes"])
                .arg("--cluster-config-file")
                .arg(self.dir.join(format!("nodes-{port}.conf")))
                .args(["--cluster-node-timeout", &node_timeout_ms.to_string()])
                .arg("--dir")
                .arg(&self.dir)
                .args(["--save", "", "--appendonly", "no"])
                .args([
                    "--repl-diskless-sync",
                    "yes",
                    "--repl-diskless-sync-delay",
                    "0",
                ])
                .args(["--daemonize", "no", "--loglevel", "warning"])
                .stdout(Stdio::null()),
        )
    }

    /// Seed URLs of every node, comma-separated (`GATEWAY_REDIS_CLUSTER_URLS`).
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(ClusterNode::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Waits until every running node reports `cluster_state:ok` and every running replica's
    /// link to its master is up.
    pub async fn wait_whole(&mut self, timeout: Duration) -> Result<()> {
        let ports: Vec<u16> = self
            .nodes
            .iter_mut()
            .filter_map(|n| n.is_running().then_some(n.port))
            .collect();
        wait_for("the cluster to be whole", timeout, || {
            let ports = ports.clone();
            async move {
                for port in ports {
                    let info = command(port, &["CLUSTER", "INFO"]).await.ok()?;
                    if !info.contains("cluster_state:ok") {
                        return None;
                    }
                    let replication = command(port, &["INFO", "replication"]).await.ok()?;
                    if replication.contains("role:slave")
                        && !replication.contains("master_link_status:up")
                    {
                        return None;
                    }
                }
                Some(())
            }
        })
        .await
    }

    /// The port of the master serving `key` now (asked of any running node).
    pub async fn master_of(&mut self, key: &str) -> Result<u16> {
        let slot = slot_of(key);
        let port = self.any_running_port()?;
        let nodes = command(port, &["CLUSTER", "NODES"]).await?;
        masters_by_slot(&nodes)
            .into_iter()
            .find(|(range, _)| range.contains(&slot))
            .map(|(_, port)| port)
            .with_context(|| format!("no master serves slot {slot} ({key:?})"))
    }

    fn any_running_port(&mut self) -> Result<u16> {
        self.nodes
            .iter_mut()
            .find_map(|n| n.is_running().then_some(n.port))
            .context("no cluster node is running")
    }

    /// Kills (SIGKILL) the node on `port`.
    pub fn kill(&mut self, port: u16) {
        if let Some(node) = self.nodes.iter_mut().find(|n| n.port == port) {
            if let Some(mut proc) = node.proc.take() {
                proc.kill();
            }
        }
    }

    /// Kills the master serving `key` and waits until another node serves its slot and the
    /// cluster reports itself whole again; returns how long that took after the kill.
    pub async fn kill_master_of(&mut self, key: &str, timeout: Duration) -> Result<Duration> {
        let old = self.master_of(key).await?;
        self.kill(old);
        let killed = Instant::now();
        let deadline = killed + timeout;
        loop {
            if let Ok(new) = self.master_of(key).await {
                if new != old {
                    let port = self.any_running_port()?;
                    let info = command(port, &["CLUSTER", "INFO"])
                        .await
                        .unwrap_or_default();
                    if info.contains("cluster_state:ok") {
                        return Ok(killed.elapsed());
                    }
                }
            }
            if Instant::now() >= deadline {
                bail!("no replica took over {key:?}'s slot within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut proc) = node.proc.take() {
                proc.kill();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn ping(port: u16) -> Result<()> {
    wait_for(
        "a cluster node to answer PING",
        crate::WAIT,
        || async move { command(port, &["PING"]).await.ok() },
    )
    .await?;
    Ok(())
}

impl RedisCluster {
    /// The replica of the master on `master` (its port), as the master's view of the cluster
    /// lists it (asked until it does: a view right after a change can lag).
    pub async fn replica_of(&mut self, master: u16) -> Result<u16> {
        let master_id = command(master, &["CLUSTER", "MYID"]).await?;
        let master_id = master_id.as_str();
        wait_for(
            "the master's replica",
            Duration::from_secs(5),
            || async move {
                let nodes = command(master, &["CLUSTER", "NODES"]).await.ok()?;
                nodes
                    .lines()
                    .map(|line| line.split_whitespace().collect::<Vec<_>>())
                    .find(|f| f.len() > 3 && f[2].contains("slave") && f[3] == master_id)
                    .and_then(|f| f[1].split('@').next()?.rsplit(':').next()?.parse().ok())
            },
        )
        .await
    }

    /// `CLUSTER FAILOVER` on the replica of `key`'s master (a graceful, coordinated switch);
    /// returns once the replica serves the key's slot.
    pub async fn manual_failover(&mut self, key: &str) -> Result<Duration> {
        let master = self.master_of(key).await?;
        let replica = self.replica_of(master).await?;
        let started = Instant::now();
        command(replica, &["CLUSTER", "FAILOVER"]).await?;
        let deadline = started + Duration::from_secs(20);
        loop {
            if self.master_of(key).await.ok() == Some(replica) {
                return Ok(started.elapsed());
            }
            if Instant::now() > deadline {
                bail!("the replica {replica} did not take {key:?} over within 20 s");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Moves `key`'s slot to the master on `to` the way `redis-cli --cluster reshard` does:
    /// IMPORTING / MIGRATING, `MIGRATE` of its keys in batches, then the new owner announced
    /// to every master. Returns the number of keys moved.
    pub async fn migrate_slot_of(&mut self, key: &str, to: u16) -> Result<usize> {
        let from = self.master_of(key).await?;
        let slot = slot_of(key).to_string();
        let from_id = command(from, &["CLUSTER", "MYID"]).await?;
        let to_id = command(to, &["CLUSTER", "MYID"]).await?;
        command(to, &["CLUSTER", "SETSLOT", &slot, "IMPORTING", &from_id]).await?;
        command(from, &["CLUSTER", "SETSLOT", &slot, "MIGRATING", &to_id]).await?;
        let client = redis::Client::open(format!("redis://127.0.0.1:{from}/"))?;
        let mut con = client.get_multiplexed_async_connection().await?;
        let mut moved = 0;
        loop {
            let keys: Vec<String> = redis::cmd("CLUSTER")
                .arg("GETKEYSINSLOT")
                .arg(&slot)
                .arg(100)
                .query_async(&mut con)
                .await?;
            if keys.is_empty() {
                break;
            }
            moved += keys.len();
            let _: redis::Value = redis::cmd("MIGRATE")
                .arg("127.0.0.1")
                .arg(to)
                .arg("")
                .arg(0)
                .arg(5000)
                .arg("KEYS")
                .arg(&keys)
                .query_async(&mut con)
                .await?;
        }
        let masters: Vec<u16> = {
            let nodes = command(to, &["CLUSTER", "NODES"]).await?;
            masters_by_slot(&nodes)
                .into_iter()
                .map(|(_, port)| port)
                .collect()
        };
        let mut told = std::collections::BTreeSet::from([to, from]);
        told.extend(masters);
        for port in told {
            command(port, &["CLUSTER", "SETSLOT", &slot, "NODE", &to_id]).await?;
        }
        Ok(moved)
    }
}

/// One command to one node, its reply as text (bulk or status replies).
pub async fn command(port: u16, args: &[&str]) -> Result<String> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/"))?;
    let mut con = tokio::time::timeout(
        Duration::from_secs(2),
        client.get_multiplexed_async_connection(),
    )
    .await
    .context("connect timed out")??;
    let mut cmd = redis::cmd(args[0]);
    for arg in &args[1..] {
        cmd.arg(*arg);
    }
    let reply: redis::Value =
        tokio::time::timeout(Duration::from_secs(2), cmd.query_async(&mut con))
            .await
            .context("command timed out")??;
    Ok(match reply {
        redis::Value::BulkString(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        redis::Value::SimpleString(text) => text,
        redis::Value::VerbatimString { text, .. } => text,
        redis::Value::Okay => "OK".into(),
        redis::Value::Int(n) => n.to_string(),
        other => format!("{other:?}"),
    })
}

/// `(slot range, port)` of every master in a `CLUSTER NODES` reply.
fn masters_by_slot(nodes: &str) -> Vec<(std::ops::RangeInclusive<u16>, u16)> {
    let mut out = Vec::new();
    for line in nodes.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 9 || !fields[2].contains("master") || fields[2].contains("fail") {
            continue;
        }
        // 127.0.0.1:7000@17000
        let Some(port) = fields[1]
            .split('@')
            .next()
            .and_then(|a| a.rsplit(':').next())
            .and_then(|p| p.parse().ok())
        else {
            continue;
        };
        for range in &fields[8..] {
            if range.starts_with('[') {
                continue; // a slot being migrated
            }
            let (start, end) = range.split_once('-').unwrap_or((range, range));
            if let (Ok(start), Ok(end)) = (start.parse(), end.parse()) {
                out.push((start..=end, port));
            }
        }
    }
    out
}

/// The hash slot of a key: CRC16 (XMODEM) of its `{hashtag}` (or the whole key) mod 16384.
pub fn slot_of(key: &str) -> u16 {
    let bytes = key.as_bytes();
    let hashed = match key.find('{') {
        Some(open) => match key[open + 1..].find('}') {
            Some(len) if len > 0 => &bytes[open + 1..open + 1 + len],
            _ => bytes,
        },
        None => bytes,
    };
    crc16_xmodem(hashed) % 16384
}

fn crc16_xmodem(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in data {
        crc ^= (byte as u16) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_follow_the_hashtag() {
        // Values from `CLUSTER KEYSLOT` of redis 7.0.
        assert_eq!(slot_of("foo"), 12182);
        assert_eq!(slot_of("{user1000}.following"), slot_of("user1000"));
        assert_eq!(slot_of("gw:{r:lobby}:s"), slot_of("r:lobby"));
    }
}
