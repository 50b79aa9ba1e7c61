//! Presence benchmark: N users online in one room spread over several nodes.
//!
//! ```text
//! cargo build --release -p gateway
//! GATEWAY_BIN=target/release/gateway cargo run --release -p e2e --bin bench_presence -- \
//!     [--users 10000] [--ttl-ms 30000,5000] [--markdown FILE]
//! ```
//!
//! For each presence TTL it starts its own `redis-server` (free loopback port) and its own
//! gateway nodes through the e2e harness, then measures:
//!
//! 1. join latency: login sent → the connection's own `login` frame, with a bounded number of
//!    logins in flight, split by the room's size at the join (rooms of at most
//!    `GATEWAY_ANNOUNCE_MAX_ROOM_SIZE` users broadcast every login to every member);
//! 2. steady state with everyone idle: Redis commands per second spent on presence (refresh
//!    and prune scripts), Redis CPU and gateway CPU per second;
//! 3. leave latency: a client closes its socket → `HLEN gw:{r:<room>}:pu` drops;
//! 4. convergence after SIGKILL of one node: time until `HLEN` equals the survivors' users;
//! 5. gateway RSS before and after the joins.
//!
//! Every client socket is read until the end (a node disconnects clients that stop reading).
//! Everything runs on loopback and stops by itself; nothing touches the Redis on port 6379.

#[path = "../bench_util.rs"]
mod bench_util;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bench_util::{
    ensure_open_files, latency_cells, nofile_limits, Info, InfoDelta, Section, Table,
};
use clap::Parser;
use e2e::procfs::{cpu_seconds, rss_mib};
use e2e::wire::{self, Ws};
use e2e::{gateway_bin, http_get, Gateway, GatewayOpts, RedisServer};
use futures_util::StreamExt;
use tokio::sync::{oneshot, Semaphore};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;

/// The gateway's default `GATEWAY_ANNOUNCE_MAX_ROOM_SIZE`.
const DEFAULT_ANNOUNCE_MAX: u64 = 1000;
/// Entries per refresh script call (gateway/src/broker/redis.rs, `REFRESH_BATCH`).
const REFRESH_BATCH: u64 = 500;
/// Expired entries removed per prune call (gateway/src/broker/redis.rs, `PRUNE_BATCH`).
const PRUNE_BATCH: u64 = 1000;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "bench_presence",
    about = "Presence benchmark: N users in one room over several gateway nodes (loopback only)"
)]
struct Args {
    /// Users (one WebSocket connection each), spread round-robin over the nodes.
    #[arg(long, default_value_t = 10_000)]
    users: usize,

    /// Gateway nodes.
    #[arg(long, default_value_t = 3)]
    nodes: usize,

    /// GATEWAY_PRESENCE_TTL_MS; a comma-separated list runs the whole benchmark once per value,
    /// each time with a fresh Redis and fresh nodes.
    #[arg(long, value_delimiter = ',', default_value = "30000")]
    ttl_ms: Vec<u64>,

    /// Logins in flight at once (connect + login + own login frame).
    #[arg(long, default_value_t = 200)]
    concurrency: usize,

    /// Length of the idle steady-state sample, rounded up to whole refresh periods (TTL/3).
    #[arg(long, default_value_t = 30)]
    steady_secs: u64,

    /// Users that close their socket one at a time for the leave latency.
    #[arg(long, default_value_t = 200)]
    leave_sample: usize,

    /// GATEWAY_ANNOUNCE_MAX_ROOM_SIZE for the nodes (default: the gateway's own, 1000).
    #[arg(long)]
    announce_max: Option<u64>,

    /// Room id.
    #[arg(long, default_value = "bench")]
    room: String,

    /// Skip the SIGKILL convergence phase.
    #[arg(long)]
    no_kill: bool,

    /// Also write the report as Markdown to this file.
    #[arg(long)]
    markdown: Option<PathBuf>,
}

// ---------------------------------------------------------------------------------------------
// Client connections

/// What one connection's join measured.
struct Joined {
    node: usize,
    connect: Duration,
    login: Duration,
    /// `num` in the connection's own login frame (the room's size at the join).
    num: u64,
}

/// Frames seen by all connections after their own login frame.
#[derive(Default)]
struct Counters {
    frames: AtomicU64,
    logins: AtomicU64,
    logouts: AtomicU64,
    errors: AtomicU64,
    /// Connections that ended without being asked to close (server close, reset, EOF).
    ended: AtomicU64,
}

async fn join(url: &str, user: &str, room: &str) -> Result<(Ws, Duration, Duration, u64)> {
    let started = Instant::now();
    // Small buffers: 10k connections in one process.
    let opts = wire::Opts::default()
        .small_buffers()
        .nodelay()
        .timeout(Duration::from_secs(30));
    let mut ws = wire::connect(url, &opts).await?;
    let connect = started.elapsed();
    let login = wire::Login::new(user, room)
        .name(format!("name {user}"))
        .room_name(format!("room {room}"));
    let sent = Instant::now();
    let own = wire::log_in(&mut ws, &login, Duration::from_secs(30)).await?;
    let latency = sent.elapsed();
    let frame: serde_json::Value = serde_json::from_str(&own)?;
    let num = frame["num"].as_u64().unwrap_or(0);
    Ok((ws, connect, latency, num))
}

/// Reads frames until told to close (then closes and drains) or until the server ends it.
async fn read_until_closed(mut ws: Ws, mut close: oneshot::Receiver<()>, counters: Arc<Counters>) {
    loop {
        tokio::select! {
            biased;
            _ = &mut close => {
                let _ = ws.close(None).await;
                let _ = tokio::time::timeout(Duration::from_secs(5), async {
                    while let Some(Ok(_)) = ws.next().await {}
                })
                .await;
                return;
            }
            next = ws.next() => match next {
                Some(Ok(Message::Text(text))) => {
                    counters.frames.fetch_add(1, Ordering::Relaxed);
                    let counter = match wire::event(&text) {
                        Some("login") => Some(&counters.logins),
                        Some("logout") => Some(&counters.logouts),
                        Some("error") => Some(&counters.errors),
                        _ => None,
                    };
                    if let Some(counter) = counter {
                        counter.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => {
                    counters.ended.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
        }
    }
}

struct Conn {
    node: usize,
    close: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
    joined: bool,
}

// ---------------------------------------------------------------------------------------------
// One run

async fn hlen(con: &mut redis::aio::MultiplexedConnection, key: &str) -> Result<u64> {
    Ok(redis::cmd("HLEN").arg(key).query_async(con).await?)
}

/// `num` from `/api/rooms/{room}/members?limit=1` on a node.
async fn api_num(gw: &Gateway, room: &str) -> Result<u64> {
    let (status, body) =
        http_get(&gw.addr(), &format!("/api/rooms/{room}/members?limit=1")).await?;
    if status != 200 {
        bail!("members API answered {status}: {body}");
    }
    let v: serde_json::Value = serde_json::from_str(&body)?;
    v["num"]
        .as_u64()
        .with_context(|| format!("no num in {body}"))
}

fn expected_refresh_per_sec(per_node: &[u64], ttl: Duration) -> f64 {
    let period = (ttl / 3).as_secs_f64();
    per_node
        .iter()
        .map(|n| n.div_ceil(REFRESH_BATCH) as f64)
        .sum::<f64>()
        / period
}

fn prune_interval(ttl: Duration) -> Duration {
    (ttl / 10).clamp(Duration::from_millis(50), Duration::from_secs(1))
}

/// Redis and the gateway nodes of one run, with what the phases need to sample them.
struct Cluster {
    redis_server: RedisServer,
    con: redis::aio::MultiplexedConnection,
    redis_pid: u32,
    gateways: Vec<Gateway>,
    pids: Vec<u32>,
    /// The room's presence hash, `gw:{r:<room>}:pu`.
    users_key: String,
}

/// Starts a fresh Redis and `--nodes` gateway nodes with the run's presence TTL and waits until
/// every node is ready.
async fn start_cluster(args: &Args, ttl_ms: u64) -> Result<Cluster> {
    let redis_server = RedisServer::start().await?;
    let mut con = redis_server.connection().await?;
    let redis_pid: u32 = Info::take(&mut con).await?.num("process_id") as u32;
    let mut gateways = Vec::new();
    for i in 0..args.nodes {
        let mut opts = GatewayOpts::redis(&redis_server.url())
            .node(&format!("bench-{i}"))
            .env("GATEWAY_PRESENCE_TTL_MS", ttl_ms)
            .env("GATEWAY_HEARTBEAT_TIMEOUT_MS", 3_600_000)
            .env("GATEWAY_MAX_CONNECTIONS", args.users + 100);
        if let Some(max) = args.announce_max {
            opts = opts.env("GATEWAY_ANNOUNCE_MAX_ROOM_SIZE", max);
        }
        gateways.push(Gateway::start(opts).await?);
    }
    for gw in &gateways {
        gw.wait_ready(200).await?;
    }
    let pids: Vec<u32> = gateways.iter().filter_map(|g| g.proc.pid()).collect();
    Ok(Cluster {
        redis_server,
        con,
        redis_pid,
        gateways,
        pids,
        users_key: format!("gw:{{r:{}}}:pu", args.room),
    })
}

/// The gateways' RSS and Redis's `used_memory`, both in MiB.
struct Memory {
    rss: Vec<f64>,
    redis: f64,
}

/// Samples the memory of the gateways and of Redis.
async fn sample_memory(cluster: &mut Cluster) -> Result<Memory> {
    let rss = cluster.pids.iter().map(|p| rss_mib(*p)).collect();
    let redis = Info::take(&mut cluster.con).await?.num("used_memory") / 1048576.0;
    Ok(Memory { rss, redis })
}

/// What the join phase left: the connections, what each join measured, and the samples taken
/// around the phase.
struct Joins {
    counters: Arc<Counters>,
    conns: Vec<Conn>,
    joined: Vec<Joined>,
    failures: BTreeMap<String, usize>,
    wall: Duration,
    /// `HLEN` of the presence hash once it equals the joins (or why it did not).
    count: Result<u64>,
    info_a: Info,
    info_b: Info,
    cpu_a: Vec<f64>,
    cpu_b: Vec<f64>,
    memory_after: Memory,
    bench_rss: f64,
}

impl Joins {
    /// Users that joined.
    fn ok(&self) -> u64 {
        self.joined.len() as u64
    }

    /// Users that joined, per node.
    fn per_node(&self, nodes: usize) -> Vec<u64> {
        (0..nodes)
            .map(|n| self.joined.iter().filter(|j| j.node == n).count() as u64)
            .collect()
    }
}

/// Spawns one task per user (round-robin over the nodes) that joins with at most
/// `--concurrency` logins in flight, then reads its socket until told to close.
fn spawn_joins(
    args: &Args,
    cluster: &Cluster,
    counters: &Arc<Counters>,
) -> (Vec<Conn>, Vec<oneshot::Receiver<Result<Joined>>>) {
    let sem = Arc::new(Semaphore::new(args.concurrency.max(1)));
    let mut conns = Vec::with_capacity(args.users);
    let mut readies = Vec::with_capacity(args.users);
    for i in 0..args.users {
        let node = i % args.nodes;
        let url = cluster.gateways[node].ws_url();
        let user = format!("u{i:06}");
        let room = args.room.clone();
        let (ready_tx, ready_rx) = oneshot::channel();
        let (close_tx, close_rx) = oneshot::channel();
        let sem = sem.clone();
        let counters = counters.clone();
        let task = tokio::spawn(async move {
            let permit = sem.acquire_owned().await;
            let result = join(&url, &user, &room).await;
            drop(permit);
            match result {
                Ok((ws, connect, login, num)) => {
                    let _ = ready_tx.send(Ok(Joined {
                        node,
                        connect,
                        login,
                        num,
                    }));
                    read_until_closed(ws, close_rx, counters).await;
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            }
        });
        conns.push(Conn {
            node,
            close: Some(close_tx),
            task,
            joined: false,
        });
        readies.push(ready_rx);
    }
    (conns, readies)
}

/// Waits for every join's outcome (marking the connections that joined), with progress every
/// 2000 users; returns the joins and the failures counted by message.
async fn collect_joins(
    conns: &mut [Conn],
    readies: Vec<oneshot::Receiver<Result<Joined>>>,
    started: Instant,
) -> (Vec<Joined>, BTreeMap<String, usize>) {
    let mut joined = Vec::with_capacity(conns.len());
    let mut failures: BTreeMap<String, usize> = BTreeMap::new();
    for (i, ready) in readies.into_iter().enumerate() {
        match ready.await {
            Ok(Ok(j)) => {
                conns[i].joined = true;
                joined.push(j);
            }
            Ok(Err(e)) => *failures.entry(format!("{e:#}")).or_default() += 1,
            Err(_) => *failures.entry("task ended".into()).or_default() += 1,
        }
        if (i + 1) % 2000 == 0 {
            eprintln!(
                "  {} joined after {:.1} s",
                i + 1,
                started.elapsed().as_secs_f64()
            );
        }
    }
    (joined, failures)
}

/// Phase 1: every user joins; Redis INFO and the gateways' CPU are sampled around the joins,
/// memory once the presence hash holds every joined user.
async fn join_phase(args: &Args, cluster: &mut Cluster) -> Result<Joins> {
    eprintln!("joining {} users ...", args.users);
    let counters = Arc::new(Counters::default());
    let info_a = Info::take(&mut cluster.con).await?;
    let cpu_a: Vec<f64> = cluster.pids.iter().map(cpu_seconds).collect();
    let started = Instant::now();
    let (mut conns, readies) = spawn_joins(args, cluster, &counters);
    let (joined, failures) = collect_joins(&mut conns, readies, started).await;
    let wall = started.elapsed();
    let info_b = Info::take(&mut cluster.con).await?;
    let cpu_b: Vec<f64> = cluster.pids.iter().map(cpu_seconds).collect();
    let ok = joined.len() as u64;
    let count = wait_count(
        &mut cluster.con,
        &cluster.users_key,
        ok,
        Duration::from_secs(10),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let memory_after = sample_memory(cluster).await?;
    let bench_rss = rss_mib(std::process::id());
    Ok(Joins {
        counters,
        conns,
        joined,
        failures,
        wall,
        count,
        info_a,
        info_b,
        cpu_a,
        cpu_b,
        memory_after,
        bench_rss,
    })
}

/// The join phase's lines and tables: latency (all, by announcement, by room size), Redis
/// commands and CPU per join.
fn report_joins(args: &Args, cluster: &Cluster, joins: &Joins, section: &mut Section) {
    let ok = joins.ok();
    section.lines.push(format!(
        "joins: {ok} of {} in {:.1} s ({:.0} joins/s) with at most {} logins in flight; \
         HLEN {} = {}",
        args.users,
        joins.wall.as_secs_f64(),
        ok as f64 / joins.wall.as_secs_f64(),
        args.concurrency,
        cluster.users_key,
        match joins.count {
            Ok(n) => n.to_string(),
            Err(ref e) => format!("MISMATCH ({e:#})"),
        }
    ));
    for (e, n) in &joins.failures {
        section.lines.push(format!("join failures: {n} × {e}"));
    }
    let announce_max = args.announce_max.unwrap_or(DEFAULT_ANNOUNCE_MAX);
    section
        .tables
        .push(join_latency_table(&joins.joined, announce_max));
    section
        .tables
        .push(join_latency_by_size_table(args, &joins.joined));

    let d = InfoDelta {
        a: &joins.info_a,
        b: &joins.info_b,
    };
    let gw_cpu: f64 = joins
        .cpu_b
        .iter()
        .zip(&joins.cpu_a)
        .map(|(b, a)| b - a)
        .sum();
    let mut t = Table::new(
        "Redis commands during the join phase (inner script calls included by Redis)",
        &["command", "calls", "failed", "per join", "µs/call"],
    );
    for (cmd, st) in d.changed() {
        t.row(vec![
            cmd,
            st.calls.to_string(),
            st.failed.to_string(),
            format!("{:.2}", st.calls as f64 / ok.max(1) as f64),
            format!("{:.1}", st.usec as f64 / st.calls.max(1) as f64),
        ]);
    }
    section.tables.push(t);
    section.lines.push(format!(
        "join phase CPU: Redis {:.0} µs per join, gateways {:.0} µs per join (all nodes), \
         frames received by clients while joining: {} (login broadcasts {})",
        d.cpu() * 1e6 / ok.max(1) as f64,
        gw_cpu * 1e6 / ok.max(1) as f64,
        joins.counters.frames.load(Ordering::Relaxed),
        joins.counters.logins.load(Ordering::Relaxed),
    ));
}

/// Join latency of all joins, of those announced to the room and of the silent ones, and the
/// WebSocket connect time.
fn join_latency_table(joined: &[Joined], announce_max: u64) -> Table {
    let mut t = Table::new(
        "Join latency (ms): login sent → own login frame",
        &["joins", "count", "p50", "p90", "p99", "max"],
    );
    let all: Vec<Duration> = joined.iter().map(|j| j.login).collect();
    let announced: Vec<Duration> = joined
        .iter()
        .filter(|j| j.num <= announce_max)
        .map(|j| j.login)
        .collect();
    let silent: Vec<Duration> = joined
        .iter()
        .filter(|j| j.num > announce_max)
        .map(|j| j.login)
        .collect();
    let connects: Vec<Duration> = joined.iter().map(|j| j.connect).collect();
    let mut push = |name: String, sample: &[Duration]| {
        let mut cells = vec![name];
        cells.extend(latency_cells(sample));
        t.row(cells);
    };
    push("all".into(), &all);
    push(
        format!("room ≤ {announce_max} (login broadcast to the room)"),
        &announced,
    );
    push(
        format!("room > {announce_max} (only the joiner hears it)"),
        &silent,
    );
    push("WebSocket connect (TCP + upgrade)".into(), &connects);
    t
}

/// Join latency by the room's size at the join, in tenths of `--users`.
fn join_latency_by_size_table(args: &Args, joined: &[Joined]) -> Table {
    let mut t = Table::new(
        "Join latency (ms) by room size at the join",
        &["num at join", "count", "p50", "p90", "p99", "max"],
    );
    let bucket = (args.users / 10).max(1) as u64;
    let mut by_bucket: BTreeMap<u64, Vec<Duration>> = BTreeMap::new();
    for j in joined {
        by_bucket
            .entry(j.num.saturating_sub(1) / bucket)
            .or_default()
            .push(j.login);
    }
    for (b, sample) in &by_bucket {
        let mut cells = vec![format!("{}–{}", b * bucket + 1, (b + 1) * bucket)];
        cells.extend(latency_cells(sample));
        t.row(cells);
    }
    t
}

/// What the steady-state sample measured.
struct Steady {
    /// Length of one refresh period (TTL/3) and the number of periods sampled.
    period: Duration,
    periods: f64,
    secs: f64,
    info_a: Info,
    info_b: Info,
    cpu_a: Vec<f64>,
    cpu_b: Vec<f64>,
    bench_cpu: f64,
    frames: u64,
    /// Redis PING round trips on a connection of its own during the sample.
    pings: Vec<Duration>,
}

/// Phase 2: everyone idle for whole refresh periods (after one to settle); samples Redis INFO,
/// CPU and frames around the window while a probe PINGs Redis every 10 ms.
async fn sample_steady(
    args: &Args,
    ttl: Duration,
    cluster: &mut Cluster,
    counters: &Counters,
) -> Result<Steady> {
    let period = ttl / 3;
    let periods = (Duration::from_secs(args.steady_secs).as_secs_f64() / period.as_secs_f64())
        .ceil()
        .max(1.0);
    let window = period.mul_f64(periods);
    // Every node's first refresh with entries (which may find the script not yet loaded in
    // Redis: NOSCRIPT, SCRIPT LOAD, again) happens before the sample starts.
    let settle = period + Duration::from_millis(500);
    eprintln!(
        "steady state: settling {:.1} s, then sampling {:.1} s with everyone idle ...",
        settle.as_secs_f64(),
        window.as_secs_f64()
    );
    tokio::time::sleep(settle).await;
    let frames_a = counters.frames.load(Ordering::Relaxed);
    let info_a = Info::take(&mut cluster.con).await?;
    let cpu_a: Vec<f64> = cluster.pids.iter().map(cpu_seconds).collect();
    let bench_cpu_a = cpu_seconds(std::process::id());
    let t0 = Instant::now();
    let probe = spawn_ping_probe(cluster.redis_server.connection().await?, window);
    tokio::time::sleep(window).await;
    let pings = probe.await.unwrap_or_default();
    let info_b = Info::take(&mut cluster.con).await?;
    let secs = t0.elapsed().as_secs_f64();
    let cpu_b: Vec<f64> = cluster.pids.iter().map(cpu_seconds).collect();
    let bench_cpu_b = cpu_seconds(std::process::id());
    let frames_b = counters.frames.load(Ordering::Relaxed);
    Ok(Steady {
        period,
        periods,
        secs,
        info_a,
        info_b,
        cpu_a,
        cpu_b,
        bench_cpu: bench_cpu_b - bench_cpu_a,
        frames: frames_b - frames_a,
        pings,
    })
}

/// A PING every 10 ms on a connection of its own for `window`: how long other clients wait for
/// Redis while a refresh batch runs.
fn spawn_ping_probe(
    mut probe_con: redis::aio::MultiplexedConnection,
    window: Duration,
) -> JoinHandle<Vec<Duration>> {
    tokio::spawn(async move {
        let mut rtts = Vec::new();
        let end = Instant::now() + window;
        while Instant::now() < end {
            let sent = Instant::now();
            if redis::cmd("PING")
                .query_async::<String>(&mut probe_con)
                .await
                .is_err()
            {
                break;
            }
            rtts.push(sent.elapsed());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        rtts
    })
}

/// The steady state's tables: presence work against what is expected, the PING probe, and
/// every Redis command.
fn report_steady(args: &Args, ttl: Duration, joins: &Joins, s: &Steady, section: &mut Section) {
    section.tables.push(steady_state_table(args, ttl, joins, s));
    let mut t = Table::new(
        "Redis PING round trip during the steady-state sample (ms), one every 10 ms",
        &["probe", "count", "p50", "p90", "p99", "max"],
    );
    let mut cells = vec!["PING".to_string()];
    cells.extend(latency_cells(&s.pings));
    t.row(cells);
    section.tables.push(t);
    let d = InfoDelta {
        a: &s.info_a,
        b: &s.info_b,
    };
    let mut t = Table::new(
        "Redis commands at steady state (inner script calls included)",
        &["command", "calls", "failed", "per second", "µs/call"],
    );
    for (cmd, st) in d.changed() {
        t.row(vec![
            cmd,
            st.calls.to_string(),
            st.failed.to_string(),
            format!("{:.2}", st.calls as f64 / s.secs),
            format!("{:.1}", st.usec as f64 / st.calls.max(1) as f64),
        ]);
    }
    section.tables.push(t);
}

/// Refresh and prune calls, entries refreshed, Redis and process CPU and frames received over
/// the steady-state window, against what the refresh period and prune interval predict.
fn steady_state_table(args: &Args, ttl: Duration, joins: &Joins, s: &Steady) -> Table {
    let ok = joins.ok();
    let per_node = joins.per_node(args.nodes);
    let secs = s.secs;
    let d = InfoDelta {
        a: &s.info_a,
        b: &s.info_b,
    };
    let evalsha = d.calls("evalsha") + d.calls("eval");
    let failed = d.failed("evalsha") + d.failed("eval");
    let prune_calls = d.calls("zrangebyscore");
    let refresh_calls = evalsha.saturating_sub(prune_calls + failed);
    let refreshed = d.calls("zadd");
    let exp_refresh = expected_refresh_per_sec(&per_node, ttl);
    let exp_prune = args.nodes as f64 / prune_interval(ttl).as_secs_f64();
    let mut t = Table::new(
        &format!(
            "Steady state, everyone idle, {:.1} s ({} refresh periods of {:.2} s)",
            secs,
            s.periods,
            s.period.as_secs_f64()
        ),
        &["what", "measured", "per second", "expected per second"],
    );
    t.row(vec![
        "refresh script calls (EVALSHA, 500 entries each)".into(),
        refresh_calls.to_string(),
        format!("{:.2}", refresh_calls as f64 / secs),
        format!("{exp_refresh:.2}"),
    ]);
    t.row(vec![
        "entries refreshed (ZADD inside the script)".into(),
        refreshed.to_string(),
        format!("{:.0}", refreshed as f64 / secs),
        format!("{:.0}", ok as f64 / s.period.as_secs_f64()),
    ]);
    t.row(vec![
        "prune script calls (EVALSHA)".into(),
        prune_calls.to_string(),
        format!("{:.2}", prune_calls as f64 / secs),
        format!("{exp_prune:.2}"),
    ]);
    t.row(vec![
        "presence script calls (EVALSHA; a node's refresh calls are one pipeline)".into(),
        evalsha.to_string(),
        format!("{:.2}", evalsha as f64 / secs),
        format!("{:.2}", exp_refresh + exp_prune),
    ]);
    t.row(vec![
        "of which failed (NOSCRIPT, then loaded and sent again)".into(),
        failed.to_string(),
        format!("{:.2}", failed as f64 / secs),
        "0".into(),
    ]);
    t.row(vec![
        "all commands incl. inner script calls".into(),
        d.total_commands().to_string(),
        format!("{:.0}", d.total_commands() as f64 / secs),
        String::new(),
    ]);
    t.row(vec![
        "Redis time inside presence scripts (commandstats usec)".into(),
        format!("{} µs", d.usec("evalsha") + d.usec("eval")),
        format!(
            "{:.0} µs ({:.2} % of a core)",
            (d.usec("evalsha") + d.usec("eval")) as f64 / secs,
            (d.usec("evalsha") + d.usec("eval")) as f64 / secs / 1e4
        ),
        String::new(),
    ]);
    t.row(vec![
        "Redis CPU (used_cpu_user + used_cpu_sys)".into(),
        format!("{:.3} s", d.cpu()),
        format!(
            "{:.1} ms ({:.2} % of a core)",
            d.cpu() / secs * 1e3,
            d.cpu() / secs * 100.0
        ),
        String::new(),
    ]);
    for (i, (b, a)) in s.cpu_b.iter().zip(&s.cpu_a).enumerate() {
        t.row(vec![
            format!("gateway bench-{i} CPU ({} users)", per_node[i]),
            format!("{:.3} s", b - a),
            format!(
                "{:.1} ms ({:.2} % of a core)",
                (b - a) / secs * 1e3,
                (b - a) / secs * 100.0
            ),
            String::new(),
        ]);
    }
    t.row(vec![
        format!("benchmark client CPU ({ok} idle sockets)"),
        format!("{:.3} s", s.bench_cpu),
        format!("{:.1} ms", s.bench_cpu / secs * 1e3),
        String::new(),
    ]);
    t.row(vec![
        "frames received by clients".into(),
        s.frames.to_string(),
        String::new(),
        "0".into(),
    ]);
    t
}

/// Phase 5: the gateways' and Redis's memory before and after the joins, per user.
fn memory_table(args: &Args, cluster: &Cluster, before: &Memory, joins: &Joins) -> Table {
    let ok = joins.ok();
    let per_node = joins.per_node(args.nodes);
    let after = &joins.memory_after;
    let mut t = Table::new(
        "Memory",
        &[
            "process",
            "before joins (MiB)",
            "after joins (MiB)",
            "per user (KiB)",
        ],
    );
    for (i, (b, a)) in before.rss.iter().zip(&after.rss).enumerate() {
        t.row(vec![
            format!("gateway bench-{i} RSS ({} users)", per_node[i]),
            format!("{b:.1}"),
            format!("{a:.1}"),
            format!("{:.1}", (a - b) * 1024.0 / per_node[i].max(1) as f64),
        ]);
    }
    t.row(vec![
        "Redis used_memory".into(),
        format!("{:.1}", before.redis),
        format!("{:.1}", after.redis),
        format!(
            "{:.2}",
            (after.redis - before.redis) * 1024.0 / ok.max(1) as f64
        ),
    ]);
    t.row(vec![
        format!("redis-server RSS (pid {})", cluster.redis_pid),
        String::new(),
        format!("{:.1}", rss_mib(cluster.redis_pid)),
        String::new(),
    ]);
    t.row(vec![
        format!("benchmark client RSS ({ok} sockets)"),
        String::new(),
        format!("{:.1}", joins.bench_rss),
        String::new(),
    ]);
    t
}

/// `num` of the room from each of `gateways` (or the error it answered).
async fn api_nums(gateways: &[Gateway], room: &str) -> Vec<String> {
    let mut api = Vec::new();
    for gw in gateways {
        api.push(match api_num(gw, room).await {
            Ok(n) => n.to_string(),
            Err(e) => format!("error: {e:#}"),
        });
    }
    api
}

/// Phase 3: `--leave-sample` users spread over the joined ones close their sockets one at a
/// time; each leave is timed until `HLEN` drops. Returns which connections left.
async fn leave_phase(
    args: &Args,
    cluster: &mut Cluster,
    joins: &mut Joins,
    section: &mut Section,
) -> Result<Vec<bool>> {
    let conns = &mut joins.conns;
    let counters = &joins.counters;
    let candidates: Vec<usize> = (0..conns.len()).filter(|i| conns[*i].joined).collect();
    let sample = args.leave_sample.min(candidates.len());
    let mut leave_latencies = Vec::with_capacity(sample);
    let mut left = vec![false; conns.len()];
    let mut leave_errors = 0;
    let ended_before_leaves = counters.ended.load(Ordering::Relaxed);
    if sample > 0 {
        eprintln!("leaves: {sample} users close their sockets one at a time ...");
    }
    for k in 0..sample {
        let index = candidates[k * candidates.len() / sample];
        let before = hlen(&mut cluster.con, &cluster.users_key).await?;
        let Some(close) = conns[index].close.take() else {
            continue;
        };
        let started = Instant::now();
        let _ = close.send(());
        left[index] = true;
        let deadline = started + Duration::from_secs(10);
        loop {
            if hlen(&mut cluster.con, &cluster.users_key).await? < before {
                leave_latencies.push(started.elapsed());
                break;
            }
            if Instant::now() > deadline {
                leave_errors += 1;
                break;
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let after_leaves = hlen(&mut cluster.con, &cluster.users_key).await?;
    let api = api_nums(&cluster.gateways, &args.room).await;
    let mut t = Table::new(
        "Leave latency (ms): client closes its socket → HLEN drops (polled every ~0.2 ms)",
        &["leaves", "count", "p50", "p90", "p99", "max"],
    );
    let mut cells = vec!["socket close (one at a time)".to_string()];
    cells.extend(latency_cells(&leave_latencies));
    t.row(cells);
    section.tables.push(t);
    section.lines.push(format!(
        "after {} leaves: HLEN = {after_leaves} (expected {}), /api/rooms/{}/members num per node: \
         [{}], leaves not seen within 10 s: {leave_errors}, other connections ended: {}",
        leave_latencies.len(),
        joins.ok() - sample as u64,
        args.room,
        api.join(", "),
        counters.ended.load(Ordering::Relaxed) - ended_before_leaves,
    ));
    Ok(left)
}

/// How `HLEN` moved after the kill.
struct Convergence {
    first_drop: Option<Duration>,
    converged: Option<Duration>,
    last: u64,
}

/// Polls `HLEN` every 10 ms until it is at most `expected` or the deadline passes.
async fn watch_convergence(
    cluster: &mut Cluster,
    killed_at: Instant,
    before: u64,
    expected: u64,
    deadline: Instant,
) -> Result<Convergence> {
    let mut c = Convergence {
        first_drop: None,
        converged: None,
        last: before,
    };
    while Instant::now() < deadline {
        let n = hlen(&mut cluster.con, &cluster.users_key).await?;
        if n < before && c.first_drop.is_none() {
            c.first_drop = Some(killed_at.elapsed());
        }
        c.last = n;
        if n <= expected {
            c.converged = Some(killed_at.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(c)
}

/// Phase 4: SIGKILL of the last node; times until the survivors' prune loops remove its users
/// from the presence hash, and checks what the survivors and clients saw.
async fn kill_phase(
    args: &Args,
    ttl: Duration,
    cluster: &mut Cluster,
    joins: &Joins,
    left: &[bool],
    section: &mut Section,
) -> Result<()> {
    let conns = &joins.conns;
    let counters = &joins.counters;
    let announce_max = args.announce_max.unwrap_or(DEFAULT_ANNOUNCE_MAX);
    let victim = args.nodes - 1;
    let victim_alive = (0..conns.len())
        .filter(|i| conns[*i].joined && !left[*i] && conns[*i].node == victim)
        .count() as u64;
    let before = hlen(&mut cluster.con, &cluster.users_key).await?;
    let expected = before - victim_alive;
    let ended_before = counters.ended.load(Ordering::Relaxed);
    let logouts_before = counters.logouts.load(Ordering::Relaxed);
    eprintln!(
        "SIGKILL bench-{victim} ({victim_alive} users); waiting for HLEN {before} → {expected} ..."
    );
    let killed_at = Instant::now();
    cluster.gateways[victim].proc.kill();
    let deadline = killed_at + ttl + Duration::from_secs(30);
    let c = watch_convergence(cluster, killed_at, before, expected, deadline).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let settled = hlen(&mut cluster.con, &cluster.users_key).await?;
    let api = api_nums(&cluster.gateways[..victim], &args.room).await;
    let ended = counters.ended.load(Ordering::Relaxed) - ended_before;
    let prune = prune_interval(ttl);
    let survivors = (args.nodes - 1) as u64;
    let batches_secs =
        (victim_alive.div_ceil(PRUNE_BATCH * survivors)) as f64 * prune.as_secs_f64();
    let mut t = Table::new(
        &format!("Convergence after SIGKILL of bench-{victim} ({victim_alive} users)"),
        &["what", "value"],
    );
    t.row(vec![
        "first presence entries pruned after".into(),
        c.first_drop
            .map(|d| format!("{:.2} s", d.as_secs_f64()))
            .unwrap_or_else(|| "never".into()),
    ]);
    t.row(vec![
        format!("HLEN reached the survivors' {expected} users after"),
        c.converged
            .map(|d| format!("{:.2} s", d.as_secs_f64()))
            .unwrap_or_else(|| format!("not within the deadline (last HLEN {})", c.last)),
    ]);
    t.row(vec![
        "expected window".into(),
        format!(
            "{:.2}–{:.2} s",
            (ttl - ttl / 3).as_secs_f64(),
            ttl.as_secs_f64() + batches_secs
        ),
    ]);
    section.lines.push(format!(
        "expected convergence: the victim's entries expire TTL after its last refresh \
         (which was 0..TTL/3 before the kill), then the survivors' prune loops (every \
         {:.2} s, at most {PRUNE_BATCH} entries per call and node) remove them: \
         {} prune round(s) for {victim_alive} entries over {survivors} survivor(s)",
        prune.as_secs_f64(),
        victim_alive.div_ceil(PRUNE_BATCH * survivors),
    ));
    t.row(vec!["HLEN 2 s later".into(), settled.to_string()]);
    t.row(vec![
        "/api/rooms/{room}/members num on the survivors".into(),
        api.join(", "),
    ]);
    t.row(vec![
        "client connections ended (the victim's)".into(),
        format!("{ended} (expected {victim_alive})"),
    ]);
    t.row(vec![
        "logout frames received by survivors".into(),
        format!(
            "{} (room above {announce_max}: none announced)",
            counters.logouts.load(Ordering::Relaxed) - logouts_before
        ),
    ]);
    section.tables.push(t);
    Ok(())
}

/// One run with one presence TTL: start, joins, steady state, memory, leaves, SIGKILL
/// convergence, teardown; returns the run's report section.
async fn run(args: &Args, ttl_ms: u64) -> Result<Section> {
    let ttl = Duration::from_millis(ttl_ms);
    let mut section = Section {
        title: format!(
            "{} users, {} nodes, one room, GATEWAY_PRESENCE_TTL_MS={ttl_ms}",
            args.users, args.nodes
        ),
        ..Default::default()
    };
    eprintln!("--- {}", section.title);

    let mut cluster = start_cluster(args, ttl_ms).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let memory_before = sample_memory(&mut cluster).await?;

    let mut joins = join_phase(args, &mut cluster).await?;
    report_joins(args, &cluster, &joins, &mut section);

    let steady = sample_steady(args, ttl, &mut cluster, &joins.counters).await?;
    report_steady(args, ttl, &joins, &steady, &mut section);

    section
        .tables
        .push(memory_table(args, &cluster, &memory_before, &joins));

    let left = leave_phase(args, &mut cluster, &mut joins, &mut section).await?;

    if !args.no_kill && args.nodes > 1 {
        kill_phase(args, ttl, &mut cluster, &joins, &left, &mut section).await?;
    }

    let errors = joins.counters.errors.load(Ordering::Relaxed);
    if errors > 0 {
        section
            .lines
            .push(format!("error frames received by clients: {errors}"));
    }

    teardown(cluster, joins.conns).await;
    Ok(section)
}

/// Closes every client, then the processes (dropped: SIGKILL by pid).
async fn teardown(cluster: Cluster, conns: Vec<Conn>) {
    for conn in &conns {
        conn.task.abort();
    }
    for conn in conns {
        let _ = conn.task.await;
    }
    let Cluster {
        redis_server,
        gateways,
        ..
    } = cluster;
    drop(gateways);
    drop(redis_server);
}

async fn wait_count(
    con: &mut redis::aio::MultiplexedConnection,
    key: &str,
    expected: u64,
    timeout: Duration,
) -> Result<u64> {
    let deadline = Instant::now() + timeout;
    loop {
        let n = hlen(con, key).await?;
        if n == expected {
            return Ok(n);
        }
        if Instant::now() > deadline {
            bail!("HLEN {n}, expected {expected}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    if args.nodes == 0 || args.users == 0 {
        bail!("--nodes and --users must be at least 1");
    }
    if args.ttl_ms.iter().any(|t| *t < 300) {
        bail!("--ttl-ms must be at least 300");
    }
    let bin = gateway_bin();
    if !bin.is_file() {
        bail!(
            "gateway binary {} not found: cargo build --release -p gateway, then set \
             GATEWAY_BIN or E2E_RELEASE=1",
            bin.display()
        );
    }
    ensure_open_files(args.users as u64 + 200)?;
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mut header = String::new();
    let _ = writeln!(
        header,
        "gateway {} · {} CPU(s) · open files {:?} · concurrency {} · announce max {}",
        bin.display(),
        cores,
        nofile_limits().unwrap_or((0, 0)),
        args.concurrency,
        args.announce_max
            .map(|m| m.to_string())
            .unwrap_or_else(|| format!("{DEFAULT_ANNOUNCE_MAX} (default)")),
    );
    print!("{header}");
    let mut sections = Vec::new();
    for ttl in &args.ttl_ms {
        let section = run(&args, *ttl).await?;
        println!("\n{}", section.text());
        sections.push(section);
    }
    if let Some(path) = &args.markdown {
        let mut md = format!("## bench_presence\n\n{header}\n");
        for s in &sections {
            md.push_str(&s.markdown());
            md.push('\n');
        }
        std::fs::write(path, md).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}
