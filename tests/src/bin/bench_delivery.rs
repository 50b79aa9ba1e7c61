//! Delivery benchmark: confirmed messages per second through several nodes, with acks.
//!
//! ```text
//! cargo build --release -p gateway
//! GATEWAY_BIN=target/release/gateway cargo run --release -p e2e --bin bench_delivery -- \
//!     [--members 60] [--senders 6] [--window 32] [--secs 20] [--markdown FILE]
//! ```
//!
//! Starts its own `redis-server` (free loopback port) and gateway nodes through the e2e
//! harness. One room; its members are spread round-robin over the nodes and all log in with
//! `"ack": true`, acknowledging cumulatively every `--ack-every` messages or `--ack-ms`. The
//! first `--senders` members (so on different nodes) each keep `--window` messages in flight:
//! a message is confirmed when its sender receives its own copy (same `clientMsgId`), and
//! then the next one goes out. After a warm-up, one measured window reports:
//!
//! - confirmed messages/s, deliveries/s, confirm latency percentiles;
//! - Redis round trips per published message, by operation, as counted by the gateways
//!   themselves (`gateway_redis_command_duration_seconds_count`), and Redis `INFO
//!   commandstats` deltas (calls made inside Lua scripts are counted by Redis too, but they
//!   are not network round trips);
//! - ack writes: acks sent by clients vs HSETs and pipelines reaching Redis;
//! - CPU per message: Redis (used_cpu_user + used_cpu_sys), gateways (/proc utime + stime),
//!   the benchmark client, and the whole machine.
//!
//! Then sending stops, every member must have received every message, and the stored ack
//! positions must equal the last id. Everything is on loopback and stops by itself.

#[path = "../bench_util.rs"]
mod bench_util;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bench_util::{ensure_open_files, latency_cells, Info, InfoDelta, Section, Table};
use clap::Parser;
use e2e::procfs::{cpu_seconds, machine_jiffies};
use e2e::wire::{self, Ws};
use e2e::{gateway_bin, http_get, Gateway, GatewayOpts, RedisServer};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::Message;

const CLIENT_MSG_ID: &str = r#""clientMsgId":""#;

/// Commands the gateway's Lua scripts call (append, prune, refresh): counted by Redis, but
/// executed inside one EVALSHA, not sent over the network.
const SCRIPT_INNER: [&str; 14] = [
    "xadd",
    "xlen",
    "xrange",
    "xtrim",
    "publish",
    "hlen",
    "get",
    "set",
    "zrangebyscore",
    "zrem",
    "hdel",
    "hincrby",
    "hsetnx",
    "zadd",
];

#[derive(Parser, Debug, Clone)]
#[command(
    name = "bench_delivery",
    about = "Delivery benchmark: confirmed messages/s through several gateway nodes with acks (loopback only)"
)]
struct Args {
    /// Gateway nodes.
    #[arg(long, default_value_t = 3)]
    nodes: usize,

    /// Room members (one connection each, round-robin over the nodes), senders included.
    #[arg(long, default_value_t = 60)]
    members: usize,

    /// Members that send (the first ones, so they sit on different nodes).
    #[arg(long, default_value_t = 6)]
    senders: usize,

    /// Unconfirmed messages each sender keeps in flight.
    #[arg(long, default_value_t = 32)]
    window: usize,

    /// Bytes of `content` per message.
    #[arg(long, default_value_t = 100)]
    size: usize,

    /// Seconds of sending before the measured window.
    #[arg(long, default_value_t = 3)]
    warmup_secs: u64,

    /// Seconds of the measured window.
    #[arg(long, default_value_t = 20)]
    secs: u64,

    /// A member acks after this many new messages ...
    #[arg(long, default_value_t = 50)]
    ack_every: u64,

    /// ... or after this many milliseconds with anything unacknowledged.
    #[arg(long, default_value_t = 100)]
    ack_ms: u64,

    /// Senders hold back new messages while some member has read more than this many fewer
    /// messages than were confirmed (the members share this process's CPU; a node disconnects
    /// a member whose outbound queue of 1024 frames overflows). 0: no limit.
    #[arg(long, default_value_t = 500)]
    max_lag: u64,

    /// Room id.
    #[arg(long, default_value = "bench")]
    room: String,

    /// Also write the report as Markdown to this file.
    #[arg(long)]
    markdown: Option<PathBuf>,
}

const IDLE: u8 = 0;
const WARMUP: u8 = 1;
const MEASURE: u8 = 2;
const DRAIN: u8 = 3;
const FINISH: u8 = 4;

/// Counters over all members.
#[derive(Default)]
struct Shared {
    /// Message frames received (new or repeated).
    deliveries: AtomicU64,
    /// Message frames with an id above the member's last one.
    new_deliveries: AtomicU64,
    duplicates: AtomicU64,
    sent: AtomicU64,
    confirmed: AtomicU64,
    inflight: AtomicI64,
    acks_sent: AtomicU64,
    errors: AtomicU64,
    ended: AtomicU64,
    /// Distinct messages read, per member.
    received: Vec<AtomicU64>,
    max_lag: u64,
    /// Messages a sender's window owed but held back because a member lagged.
    held_back: AtomicU64,
    /// Microseconds senders spent with messages held back (summed over senders).
    held_us: AtomicU64,
}

impl Shared {
    /// Whether some member is more than `max_lag` messages behind the confirmed ones.
    fn lagging(&self) -> bool {
        if self.max_lag == 0 {
            return false;
        }
        let confirmed = self.confirmed.load(Ordering::Relaxed);
        let slowest = self
            .received
            .iter()
            .map(|r| r.load(Ordering::Relaxed))
            .min()
            .unwrap_or(0);
        confirmed.saturating_sub(slowest) > self.max_lag
    }
}

/// A sender's window.
struct Window {
    prefix: String,
    next_seq: u64,
    inflight: HashMap<u64, Instant>,
    /// Messages the window is owed (confirmed ones to replace) but not yet sent.
    owed: usize,
    held_since: Option<Instant>,
}

impl Window {
    /// Sends what the window is owed, unless a member lags too far behind.
    fn top_up(&mut self, cfg: &MemberCfg, shared: &Shared, tx: &mpsc::UnboundedSender<Message>) {
        while self.owed > 0 {
            if shared.lagging() {
                self.held_since.get_or_insert_with(Instant::now);
                return;
            }
            if let Some(since) = self.held_since.take() {
                shared
                    .held_us
                    .fetch_add(since.elapsed().as_micros() as u64, Ordering::Relaxed);
            }
            let seq = self.next_seq;
            self.next_seq += 1;
            self.owed -= 1;
            self.inflight.insert(seq, Instant::now());
            let frame = wire::message_raw(
                &cfg.room,
                &cfg.content,
                Some(format_args!("{}{seq}", self.prefix)),
            );
            shared.sent.fetch_add(1, Ordering::Relaxed);
            shared.inflight.fetch_add(1, Ordering::Relaxed);
            let _ = tx.send(Message::text(frame));
        }
    }

    /// Stops sending: forgets what is owed, closes the held-back interval.
    fn stop(&mut self, shared: &Shared) {
        self.owed = 0;
        if let Some(since) = self.held_since.take() {
            shared
                .held_us
                .fetch_add(since.elapsed().as_micros() as u64, Ordering::Relaxed);
        }
    }
}

/// What one member's task reports at the end.
#[derive(Default)]
struct MemberOut {
    user: String,
    received: u64,
    last_id: (u64, u64),
    latencies: Vec<Duration>,
    unconfirmed: usize,
    first_error: Option<String>,
    ended: Option<String>,
}

fn parse_id(text: &str) -> Option<(u64, u64)> {
    let (ms, seq) = text.split_once('-')?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

async fn connect_and_login(url: &str, user: &str, room: &str) -> Result<Ws> {
    let mut ws = wire::connect(url, &wire::Opts::default().nodelay()).await?;
    // A proven user (a token): stored ack positions belong to proven users only.
    let login = wire::Login::new(user, room)
        .name(format!("name {user}"))
        .room_name(format!("room {room}"))
        .ack(true)
        .token(e2e::harness_token(user)?);
    wire::log_in(&mut ws, &login, Duration::from_secs(10)).await?;
    Ok(ws)
}

struct MemberCfg {
    index: usize,
    user: String,
    /// The room id as the inside of a JSON string (`wire::escape`).
    room: String,
    sender: bool,
    window: usize,
    content: String,
    ack_every: u64,
    ack_every_ms: u64,
}

/// One member: reads every frame, acks cumulatively, and (a sender) keeps its window full.
async fn member(
    ws: Ws,
    cfg: MemberCfg,
    mut phase: watch::Receiver<u8>,
    shared: Arc<Shared>,
) -> MemberOut {
    let (sink, mut stream) = ws.split();
    let (tx, rx) = mpsc::unbounded_channel::<Message>();
    let writer = spawn_writer(sink, rx);
    let mut m = Member::new(cfg, shared, tx);
    // While messages are held back, look again every millisecond.
    let mut retry = tokio::time::interval(Duration::from_millis(1));
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut tick = tokio::time::interval(Duration::from_millis(m.cfg.ack_every_ms.max(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            changed = phase.changed() => {
                if changed.is_err() {
                    break;
                }
                let current = *phase.borrow_and_update();
                if m.on_phase(current) {
                    break;
                }
            }
            _ = retry.tick(), if m.window.owed > 0 && m.sending => {
                m.window.top_up(&m.cfg, &m.shared, &m.tx);
            }
            _ = tick.tick() => {
                if m.since_ack > 0 {
                    m.send_ack();
                    m.since_ack = 0;
                }
            }
            next = stream.next() => match next {
                Some(Ok(Message::Text(text))) => m.on_text(&text),
                Some(Ok(Message::Close(frame))) => {
                    m.end(format!("closed by the server: {frame:?}"));
                    break;
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    m.end(format!("websocket error: {e}"));
                    break;
                }
                None => {
                    m.end("connection ended".into());
                    break;
                }
            }
        }
    }
    let Member {
        mut out,
        window,
        tx,
        ..
    } = m;
    out.unconfirmed = window.inflight.len();
    drop(tx);
    let _ = tokio::time::timeout(Duration::from_secs(5), writer).await;
    out
}

/// Writes go through their own task, so reading never waits on a write: sends what `rx`
/// queues (flushing once per batch), closes the socket when `rx` ends.
fn spawn_writer(
    mut sink: futures_util::stream::SplitSink<Ws, Message>,
    mut rx: mpsc::UnboundedReceiver<Message>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            if sink.feed(m).await.is_err() {
                return;
            }
            while let Ok(m) = rx.try_recv() {
                if sink.feed(m).await.is_err() {
                    return;
                }
            }
            if sink.flush().await.is_err() {
                return;
            }
        }
        let _ = sink.close().await;
    })
}

/// One member's state between frames.
struct Member {
    cfg: MemberCfg,
    shared: Arc<Shared>,
    /// Frames for the writer task.
    tx: mpsc::UnboundedSender<Message>,
    out: MemberOut,
    window: Window,
    /// New messages not acked yet.
    since_ack: u64,
    started: bool,
    sending: bool,
    current: u8,
}

impl Member {
    fn new(cfg: MemberCfg, shared: Arc<Shared>, tx: mpsc::UnboundedSender<Message>) -> Member {
        Member {
            out: MemberOut {
                user: cfg.user.clone(),
                ..Default::default()
            },
            window: Window {
                prefix: format!("s{}-", cfg.index),
                next_seq: 0,
                inflight: HashMap::new(),
                owed: 0,
                held_since: None,
            },
            cfg,
            shared,
            tx,
            since_ack: 0,
            started: false,
            sending: false,
            current: IDLE,
        }
    }

    /// Acks the last id received (cumulative).
    fn send_ack(&self) {
        let last = self.out.last_id;
        let frame = wire::ack_raw(&self.cfg.room, format_args!("{}-{}", last.0, last.1));
        self.shared.acks_sent.fetch_add(1, Ordering::Relaxed);
        let _ = self.tx.send(Message::text(frame));
    }

    /// A new benchmark phase: a sender fills its window when sending starts and stops when it
    /// ends; at FINISH the last ack goes out. Returns whether the member is done.
    fn on_phase(&mut self, current: u8) -> bool {
        self.current = current;
        self.sending = current == WARMUP || current == MEASURE;
        if self.sending && self.cfg.sender && !self.started {
            self.started = true;
            self.window.owed = self.cfg.window;
            self.window.top_up(&self.cfg, &self.shared, &self.tx);
        }
        if !self.sending {
            self.window.stop(&self.shared);
        }
        if current == FINISH {
            if self.since_ack > 0 {
                self.send_ack();
            }
            return true;
        }
        false
    }

    /// A text frame: a message (counted, acked, and for a sender perhaps its own copy) or an
    /// error frame.
    fn on_text(&mut self, text: &str) {
        if let Some(rest) = text.strip_prefix(wire::MESSAGE_HEAD) {
            self.on_message(text, rest);
        } else if wire::event(text) == Some("error") {
            self.shared.errors.fetch_add(1, Ordering::Relaxed);
            self.out.first_error.get_or_insert_with(|| text.to_string());
        }
    }

    /// A message frame (`rest` follows its id's opening quote): new or repeated by id, an ack
    /// when enough are new, and for a sender, its own copy confirms one of its window.
    fn on_message(&mut self, text: &str, rest: &str) {
        let shared = &self.shared;
        shared.deliveries.fetch_add(1, Ordering::Relaxed);
        let id = rest.find('"').and_then(|end| parse_id(&rest[..end]));
        let Some(id) = id else {
            self.out
                .first_error
                .get_or_insert_with(|| format!("bad id in {text}"));
            return;
        };
        if id > self.out.last_id {
            self.out.last_id = id;
            self.out.received += 1;
            self.since_ack += 1;
            shared.new_deliveries.fetch_add(1, Ordering::Relaxed);
            shared.received[self.cfg.index].fetch_add(1, Ordering::Relaxed);
        } else {
            shared.duplicates.fetch_add(1, Ordering::Relaxed);
        }
        if self.since_ack >= self.cfg.ack_every {
            self.send_ack();
            self.since_ack = 0;
        }
        if self.cfg.sender {
            self.on_own_copy(text);
        }
    }

    /// A sender's own message came back: it is confirmed (its latency counted while
    /// measuring) and the window sends another.
    fn on_own_copy(&mut self, text: &str) {
        let window = &mut self.window;
        let seq = text.rfind(CLIENT_MSG_ID).and_then(|pos| {
            let cmid = &text[pos + CLIENT_MSG_ID.len()..];
            let cmid = &cmid[..cmid.find('"')?];
            cmid.strip_prefix(&window.prefix)?.parse::<u64>().ok()
        });
        let Some(sent_at) = seq.and_then(|s| window.inflight.remove(&s)) else {
            return;
        };
        let shared = &self.shared;
        if self.current == MEASURE {
            self.out.latencies.push(sent_at.elapsed());
        }
        shared.confirmed.fetch_add(1, Ordering::Relaxed);
        shared.inflight.fetch_sub(1, Ordering::Relaxed);
        if self.sending {
            window.owed += 1;
            window.top_up(&self.cfg, shared, &self.tx);
            if window.owed > 0 {
                shared.held_back.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// The connection ended by itself: why, counted.
    fn end(&mut self, why: String) {
        self.out.ended = Some(why);
        self.shared.ended.fetch_add(1, Ordering::Relaxed);
    }
}

/// Gateway counters from /metrics, summed over label sets; Redis round trips by operation
/// under `rt:<op>`.
async fn gateway_metrics(gw: &Gateway) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    let Ok((_, body)) = http_get(&gw.admin_addr(), "/metrics").await else {
        return out;
    };
    const NAMES: [&str; 7] = [
        "gateway_acks_total",
        "gateway_redeliveries_total",
        "gateway_messages_published_total",
        "gateway_messages_delivered_total",
        "gateway_slow_consumer_disconnects_total",
        "gateway_outbound_dropped_total",
        "gateway_errors_total",
    ];
    for line in body.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let name = series.split('{').next().unwrap_or(series);
        let key = if name == "gateway_redis_command_duration_seconds_count" {
            let Some(op) = series
                .split("op=\"")
                .nth(1)
                .and_then(|rest| rest.split('"').next())
            else {
                continue;
            };
            format!("rt:{op}")
        } else if NAMES.contains(&name) {
            name.to_string()
        } else {
            continue;
        };
        *out.entry(key).or_default() += value;
    }
    out
}

struct Snap {
    at: Instant,
    info: Info,
    gw_cpu: Vec<f64>,
    bench_cpu: f64,
    machine: (u64, u64),
    metrics: BTreeMap<String, f64>,
    deliveries: u64,
    confirmed: u64,
    acks_sent: u64,
}

async fn snapshot(
    con: &mut redis::aio::MultiplexedConnection,
    gateways: &[Gateway],
    pids: &[u32],
    shared: &Shared,
) -> Result<Snap> {
    let mut metrics = BTreeMap::new();
    for gw in gateways {
        for (k, v) in gateway_metrics(gw).await {
            *metrics.entry(k).or_default() += v;
        }
    }
    Ok(Snap {
        at: Instant::now(),
        info: Info::take(con).await?,
        gw_cpu: pids.iter().map(cpu_seconds).collect(),
        bench_cpu: cpu_seconds(std::process::id()),
        machine: machine_jiffies(),
        metrics,
        deliveries: shared.deliveries.load(Ordering::Relaxed),
        confirmed: shared.confirmed.load(Ordering::Relaxed),
        acks_sent: shared.acks_sent.load(Ordering::Relaxed),
    })
}

fn metric_delta(a: &Snap, b: &Snap, key: &str) -> f64 {
    b.metrics.get(key).copied().unwrap_or(0.0) - a.metrics.get(key).copied().unwrap_or(0.0)
}

async fn wait_until(what: &str, timeout: Duration, check: impl Fn() -> bool) -> Result<Duration> {
    let started = Instant::now();
    while !check() {
        if started.elapsed() > timeout {
            bail!("{what} not reached within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(started.elapsed())
}

/// Redis and the gateway nodes of the run.
struct Cluster {
    redis_server: RedisServer,
    con: redis::aio::MultiplexedConnection,
    gateways: Vec<Gateway>,
    pids: Vec<u32>,
}

/// Starts a fresh Redis and `--nodes` gateway nodes and waits until every node is ready.
async fn start_cluster(args: &Args) -> Result<Cluster> {
    let redis_server = RedisServer::start().await?;
    let con = redis_server.connection().await?;
    let mut gateways = Vec::new();
    for i in 0..args.nodes {
        let opts = GatewayOpts::redis(&redis_server.url())
            .with_jwt()
            .node(&format!("bench-{i}"))
            .env("GATEWAY_HEARTBEAT_TIMEOUT_MS", 3_600_000);
        gateways.push(Gateway::start(opts).await?);
    }
    for gw in &gateways {
        gw.wait_ready(200).await?;
    }
    let pids: Vec<u32> = gateways.iter().filter_map(|g| g.proc.pid()).collect();
    Ok(Cluster {
        redis_server,
        con,
        gateways,
        pids,
    })
}

/// Connects and logs in every member (round-robin over the nodes, the first `--senders` ones
/// sending) and spawns its task; then lets the login broadcasts settle.
async fn start_members(
    args: &Args,
    cluster: &Cluster,
    shared: &Arc<Shared>,
    phase_rx: watch::Receiver<u8>,
) -> Result<Vec<tokio::task::JoinHandle<MemberOut>>> {
    let room = wire::escape(&args.room);
    let content = "x".repeat(args.size);
    let mut tasks = Vec::new();
    for i in 0..args.members {
        let node = i % args.nodes;
        let user = format!("m{i:04}");
        let ws = connect_and_login(&cluster.gateways[node].ws_url(), &user, &args.room)
            .await
            .with_context(|| format!("member {user} on node {node}"))?;
        let cfg = MemberCfg {
            index: i,
            user,
            room: room.clone(),
            sender: i < args.senders,
            window: args.window,
            content: content.clone(),
            ack_every: args.ack_every.max(1),
            ack_every_ms: args.ack_ms,
        };
        tasks.push(tokio::spawn(member(
            ws,
            cfg,
            phase_rx.clone(),
            shared.clone(),
        )));
    }
    drop(phase_rx);
    // Let the login broadcasts settle.
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok(tasks)
}

/// Warm-up, then the measured window between two snapshots; sending stops (DRAIN) after it.
async fn measure(
    args: &Args,
    cluster: &mut Cluster,
    shared: &Shared,
    phase_tx: &watch::Sender<u8>,
) -> Result<(Snap, Snap)> {
    eprintln!("warm-up {} s ...", args.warmup_secs);
    phase_tx.send(WARMUP)?;
    tokio::time::sleep(Duration::from_secs(args.warmup_secs)).await;
    let a = snapshot(&mut cluster.con, &cluster.gateways, &cluster.pids, shared).await?;
    phase_tx.send(MEASURE)?;
    eprintln!("measuring {} s ...", args.secs);
    tokio::time::sleep(Duration::from_secs(args.secs)).await;
    phase_tx.send(DRAIN)?;
    let b = snapshot(&mut cluster.con, &cluster.gateways, &cluster.pids, shared).await?;
    Ok((a, b))
}

/// What the drain and the end of the run found.
struct Drained {
    /// Time until every message was confirmed / every member had every message.
    drained: Result<Duration>,
    all_delivered: Result<Duration>,
    /// Messages confirmed in the whole run.
    published: u64,
    outs: Vec<MemberOut>,
    end_metrics: BTreeMap<String, f64>,
    /// `XLEN` of the room's stream.
    xlen: u64,
    /// Members whose stored ack position is their last id received, and the others.
    stored_ok: usize,
    stored_behind: Vec<String>,
}

/// Waits until every message is confirmed and delivered to every member, ends the members
/// (FINISH), then reads the gateways' counters, the stream's length and the stored acks.
async fn drain(
    args: &Args,
    cluster: &mut Cluster,
    shared: &Shared,
    phase_tx: &watch::Sender<u8>,
    tasks: Vec<tokio::task::JoinHandle<MemberOut>>,
) -> Result<Drained> {
    let drained = wait_until("all messages confirmed", Duration::from_secs(30), || {
        shared.inflight.load(Ordering::Relaxed) <= 0
    })
    .await;
    let published = shared.confirmed.load(Ordering::Relaxed);
    let expected = published * args.members as u64;
    let all_delivered = wait_until(
        "every member has every message",
        Duration::from_secs(30),
        || shared.new_deliveries.load(Ordering::Relaxed) >= expected,
    )
    .await;
    phase_tx.send(FINISH)?;
    let mut outs = Vec::new();
    for task in tasks {
        outs.push(tokio::time::timeout(Duration::from_secs(10), task).await??);
    }
    // The ack writer flushes every 100 ms.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut end_metrics = BTreeMap::new();
    for gw in &cluster.gateways {
        for (k, v) in gateway_metrics(gw).await {
            *end_metrics.entry(k).or_default() += v;
        }
    }
    let xlen: u64 = redis::cmd("XLEN")
        .arg(format!("gw:{{r:{}}}:s", args.room))
        .query_async(&mut cluster.con)
        .await?;
    let (stored_ok, stored_behind) = stored_acks(args, &mut cluster.con, &outs).await?;
    Ok(Drained {
        drained,
        all_delivered,
        published,
        outs,
        end_metrics,
        xlen,
        stored_ok,
        stored_behind,
    })
}

/// Compares each member's stored ack position with the last id it received: how many match,
/// and the ones that differ.
async fn stored_acks(
    args: &Args,
    con: &mut redis::aio::MultiplexedConnection,
    outs: &[MemberOut],
) -> Result<(usize, Vec<String>)> {
    let mut stored_ok = 0;
    let mut stored_behind = Vec::new();
    for out in outs {
        let stored: Option<String> = redis::cmd("HGET")
            .arg(format!("gw:{{u:{}}}:acks", out.user))
            .arg(format!("r:{}", args.room))
            .query_async(&mut *con)
            .await?;
        if stored.as_deref().and_then(parse_id) == Some(out.last_id) {
            stored_ok += 1;
        } else {
            stored_behind.push(format!("{}: {:?}", out.user, stored));
        }
    }
    Ok((stored_ok, stored_behind))
}

/// The two snapshots around the measured window, and what they are compared by.
struct Measured<'a> {
    a: &'a Snap,
    b: &'a Snap,
    secs: f64,
    d: InfoDelta<'a>,
    /// Messages appended (XADD calls) in the window.
    xadd: u64,
}

impl<'a> Measured<'a> {
    fn new(a: &'a Snap, b: &'a Snap) -> Measured<'a> {
        let d = InfoDelta {
            a: &a.info,
            b: &b.info,
        };
        Measured {
            a,
            b,
            secs: (b.at - a.at).as_secs_f64(),
            xadd: d.calls("xadd"),
            d,
        }
    }

    /// `v` per appended message.
    fn per_msg(&self, v: f64) -> f64 {
        v / self.xadd.max(1) as f64
    }

    fn deliveries(&self) -> u64 {
        self.b.deliveries - self.a.deliveries
    }
}

/// Messages confirmed and appended, deliveries and acks over the window.
fn throughput_table(args: &Args, w: &Measured) -> Table {
    let secs = w.secs;
    let confirmed = w.b.confirmed - w.a.confirmed;
    let deliveries = w.deliveries();
    let mut t = Table::new(
        &format!("Throughput over the measured {secs:.1} s"),
        &["what", "total", "per second"],
    );
    t.row(vec![
        "messages confirmed to their senders".into(),
        confirmed.to_string(),
        format!("{:.0}", confirmed as f64 / secs),
    ]);
    t.row(vec![
        "messages appended (XADD inside append.lua)".into(),
        w.xadd.to_string(),
        format!("{:.0}", w.xadd as f64 / secs),
    ]);
    t.row(vec![
        format!(
            "deliveries (message frames read by the {} members)",
            args.members
        ),
        deliveries.to_string(),
        format!("{:.0}", deliveries as f64 / secs),
    ]);
    t.row(vec![
        "acks sent by clients".into(),
        (w.b.acks_sent - w.a.acks_sent).to_string(),
        format!("{:.0}", (w.b.acks_sent - w.a.acks_sent) as f64 / secs),
    ]);
    t
}

/// Sent → own copy read, over every sender's measured messages.
fn confirm_latency_table(args: &Args, outs: &[MemberOut]) -> Table {
    let latencies: Vec<Duration> = outs.iter().flat_map(|o| o.latencies.clone()).collect();
    let mut t = Table::new(
        "Confirm latency (ms): message sent → sender reads its own copy",
        &["", "count", "p50", "p90", "p99", "max"],
    );
    let mut cells = vec![format!("window {} per sender", args.window)];
    cells.extend(latency_cells(&latencies));
    t.row(cells);
    t
}

/// Redis round trips by operation as the gateways count them, per message they published.
fn round_trips_table(w: &Measured) -> Table {
    let (a, b, secs) = (w.a, w.b, w.secs);
    // Per message published as the same scrapes count it (gateway_messages_published_total),
    // so the ratio does not depend on when Redis INFO was sampled.
    let published_gw = metric_delta(a, b, "gateway_messages_published_total");
    let mut t = Table::new(
        &format!(
            "Redis round trips by operation, counted by the gateways (all nodes; {published_gw:.0} \
             messages published in the same scrapes)"
        ),
        &["operation", "round trips", "per second", "per message"],
    );
    let ops: Vec<String> = b
        .metrics
        .keys()
        .filter(|k| k.starts_with("rt:"))
        .cloned()
        .collect();
    for op in ops {
        let n = metric_delta(a, b, &op);
        if n <= 0.0 {
            continue;
        }
        t.row(vec![
            op.trim_start_matches("rt:").to_string(),
            format!("{n:.0}"),
            format!("{:.1}", n / secs),
            format!("{:.4}", n / published_gw.max(1.0)),
        ]);
    }
    t
}

/// Every Redis command over the window (where it is issued from), and the line of commands
/// per appended message.
fn report_commandstats(w: &Measured, section: &mut Section) {
    let d = &w.d;
    let mut t = Table::new(
        "Redis INFO commandstats over the window",
        &[
            "command",
            "calls",
            "failed",
            "per second",
            "per message",
            "µs/call",
            "issued",
        ],
    );
    for (cmd, st) in d.changed() {
        let issued = if cmd == "evalsha" || cmd == "eval" {
            "network (script call)"
        } else if SCRIPT_INNER.contains(&cmd.as_str()) {
            "inside a script"
        } else if cmd == "hset" {
            "network (ack pipeline)"
        } else {
            "network"
        };
        t.row(vec![
            cmd.clone(),
            st.calls.to_string(),
            st.failed.to_string(),
            format!("{:.1}", st.calls as f64 / w.secs),
            format!("{:.4}", w.per_msg(st.calls as f64)),
            format!("{:.1}", st.usec as f64 / st.calls.max(1) as f64),
            issued.into(),
        ]);
    }
    section.tables.push(t);
    let network: u64 = d
        .changed()
        .iter()
        .filter(|(c, _)| !SCRIPT_INNER.contains(&c.as_str()))
        .map(|(_, st)| st.calls)
        .sum();
    let evalsha = d.calls("evalsha") + d.calls("eval");
    section.lines.push(format!(
        "EVALSHA per appended message: {:.4} (of {evalsha} EVALSHA, {} are prune calls and the rest \
         append plus the odd presence refresh); commands sent over the network per message \
         (EVALSHA + ack HSETs + other): {:.4}; all commands incl. inner script calls per message: {:.2}",
        w.per_msg(evalsha as f64),
        d.calls("zrangebyscore"),
        w.per_msg(network as f64),
        w.per_msg(d.total_commands() as f64),
    ));
}

/// Acks sent, processed, written to Redis and their pipelines, against the coalescing bound.
fn acks_table(args: &Args, w: &Measured) -> Table {
    let (a, b, secs) = (w.a, w.b, w.secs);
    let hset = w.d.calls("hset");
    let pipelines = metric_delta(a, b, "rt:save_acks");
    let acks_sent = b.acks_sent - a.acks_sent;
    let acks_gw = metric_delta(a, b, "gateway_acks_total");
    let mut t = Table::new(
        "Ack writes (coalesced per node: at most one HSET per user and room per 100 ms)",
        &["what", "total", "per second"],
    );
    t.row(vec![
        "acks sent by clients".into(),
        acks_sent.to_string(),
        format!("{:.0}", acks_sent as f64 / secs),
    ]);
    t.row(vec![
        "acks processed by the gateways (gateway_acks_total)".into(),
        format!("{acks_gw:.0}"),
        format!("{:.0}", acks_gw / secs),
    ]);
    t.row(vec![
        "HSETs of ack positions reaching Redis".into(),
        hset.to_string(),
        format!("{:.1}", hset as f64 / secs),
    ]);
    t.row(vec![
        "ack pipelines (round trips, op save_acks)".into(),
        format!("{pipelines:.0}"),
        format!("{:.1}", pipelines / secs),
    ]);
    t.row(vec![
        "upper bound: members × 10/s, nodes × 10 pipelines/s".into(),
        String::new(),
        format!(
            "{} HSET/s, {} pipelines/s",
            args.members * 10,
            args.nodes * 10
        ),
    ]);
    t.row(vec![
        "Redis round trips per client ack".into(),
        format!("{:.4}", pipelines / acks_sent.max(1) as f64),
        String::new(),
    ]);
    t
}

/// CPU of Redis, each gateway, the benchmark and the machine over the window, per message and
/// per delivery; and the line of Redis's cost per message.
fn report_cpu(args: &Args, w: &Measured, section: &mut Section) {
    let (a, b, secs, xadd) = (w.a, w.b, w.secs, w.xadd);
    let deliveries = w.deliveries();
    let redis_cpu = w.d.cpu();
    let gw_cpu: Vec<f64> = b.gw_cpu.iter().zip(&a.gw_cpu).map(|(b, a)| b - a).collect();
    let gw_total: f64 = gw_cpu.iter().sum();
    let bench_cpu = b.bench_cpu - a.bench_cpu;
    let (busy, total) = (b.machine.0 - a.machine.0, b.machine.1 - a.machine.1);
    let mut t = Table::new(
        "CPU over the window",
        &[
            "process",
            "CPU s",
            "% of one core",
            "µs per message",
            "µs per delivery",
        ],
    );
    let mut cpu_row = |name: String, cpu: f64| {
        t.row(vec![
            name,
            format!("{cpu:.2}"),
            format!("{:.1}", cpu / secs * 100.0),
            format!("{:.1}", cpu * 1e6 / xadd.max(1) as f64),
            format!("{:.2}", cpu * 1e6 / deliveries.max(1) as f64),
        ]);
    };
    cpu_row(
        "redis-server (used_cpu_user + used_cpu_sys)".into(),
        redis_cpu,
    );
    for (i, c) in gw_cpu.iter().enumerate() {
        let members = (0..args.members).filter(|m| m % args.nodes == i).count();
        cpu_row(format!("gateway bench-{i} ({members} members)"), *c);
    }
    cpu_row("gateways, all".into(), gw_total);
    cpu_row("benchmark client (all members)".into(), bench_cpu);
    t.row(vec![
        "whole machine (/proc/stat, busy)".into(),
        String::new(),
        format!(
            "{:.1} of {}",
            busy as f64 / total.max(1) as f64 * 100.0 * num_cpus(),
            100.0 * num_cpus()
        ),
        String::new(),
        String::new(),
    ]);
    section.tables.push(t);
    section.lines.push(format!(
        "Redis: {:.1} µs CPU per message; time inside EVALSHA {:.1} µs per call; network \
         {:.0} B in and {:.0} B out per message (out: replies plus one PUBLISH copy to each \
         subscribed node)",
        redis_cpu * 1e6 / xadd.max(1) as f64,
        w.d.usec("evalsha") as f64 / w.d.calls("evalsha").max(1) as f64,
        w.per_msg(b.info.num("total_net_input_bytes") - a.info.num("total_net_input_bytes")),
        w.per_msg(b.info.num("total_net_output_bytes") - a.info.num("total_net_output_bytes")),
    ));
}

/// Correctness after the drain: everything published was delivered once to everyone, acks
/// stored, nothing dropped or ended; and the first few errors, ends and stored-ack differences.
fn report_checks(args: &Args, shared: &Shared, dr: &Drained, section: &mut Section) {
    let outs = &dr.outs;
    let published = dr.published;
    let min_received = outs.iter().map(|o| o.received).min().unwrap_or(0);
    let max_received = outs.iter().map(|o| o.received).max().unwrap_or(0);
    let unconfirmed: usize = outs.iter().map(|o| o.unconfirmed).sum();
    let ended: Vec<&String> = outs.iter().filter_map(|o| o.ended.as_ref()).collect();
    let errors: Vec<&String> = outs.iter().filter_map(|o| o.first_error.as_ref()).collect();
    let end = |k: &str| dr.end_metrics.get(k).copied().unwrap_or(0.0);
    let waited = |r: &Result<Duration>| match r {
        Ok(d) => format!("yes after {:.2} s", d.as_secs_f64()),
        Err(e) => format!("NO: {e}"),
    };
    let mut t = Table::new("Checks after sending stopped", &["check", "value"]);
    t.row(vec![
        "messages published in the whole run (confirmed)".into(),
        published.to_string(),
    ]);
    t.row(vec![
        "stream length (XLEN, history cap 10000)".into(),
        dr.xlen.to_string(),
    ]);
    t.row(vec![
        "drain: all confirmed / all delivered".into(),
        format!("{} / {}", waited(&dr.drained), waited(&dr.all_delivered)),
    ]);
    t.row(vec![
        "distinct messages per member (min / max)".into(),
        format!("{min_received} / {max_received} (expected {published})"),
    ]);
    t.row(vec![
        "repeated deliveries (ids seen again)".into(),
        shared.duplicates.load(Ordering::Relaxed).to_string(),
    ]);
    t.row(vec![
        "redeliveries (gateway_redeliveries_total)".into(),
        format!("{:.0}", end("gateway_redeliveries_total")),
    ]);
    t.row(vec![
        "stored ack position = last id received".into(),
        format!("{} of {} members", dr.stored_ok, outs.len()),
    ]);
    t.row(vec![
        "slow-consumer disconnects / outbound drops".into(),
        format!(
            "{:.0} / {:.0}",
            end("gateway_slow_consumer_disconnects_total"),
            end("gateway_outbound_dropped_total")
        ),
    ]);
    t.row(vec![
        "error frames / gateway_errors_total".into(),
        format!(
            "{} / {:.0}",
            shared.errors.load(Ordering::Relaxed),
            end("gateway_errors_total")
        ),
    ]);
    t.row(vec![
        "unconfirmed at the end".into(),
        unconfirmed.to_string(),
    ]);
    let sending_secs = (args.warmup_secs + args.secs) as f64 * args.senders as f64;
    t.row(vec![
        format!(
            "sends held back (a member > {} messages behind)",
            args.max_lag
        ),
        format!(
            "{} messages; {:.1} % of the senders' time",
            shared.held_back.load(Ordering::Relaxed),
            shared.held_us.load(Ordering::Relaxed) as f64 / 1e6 / sending_secs * 100.0
        ),
    ]);
    t.row(vec![
        "connections ended by the server".into(),
        ended.len().to_string(),
    ]);
    section.tables.push(t);
    for e in errors.iter().take(3) {
        section.lines.push(format!("first error seen: {e}"));
    }
    for e in ended.iter().take(3) {
        section.lines.push(format!("connection ended: {e}"));
    }
    for s in dr.stored_behind.iter().take(3) {
        section
            .lines
            .push(format!("stored ack position differs: {s}"));
    }
}

/// The whole run: start, members, warm-up and measured window, drain, then the report.
async fn run(args: &Args) -> Result<Section> {
    let mut section = Section {
        title: format!(
            "{} members (ack: true) over {} nodes, {} senders × window {}, {} B content",
            args.members, args.nodes, args.senders, args.window, args.size
        ),
        ..Default::default()
    };
    eprintln!("--- {}", section.title);
    let mut cluster = start_cluster(args).await?;
    let shared = Arc::new(Shared {
        received: (0..args.members).map(|_| AtomicU64::new(0)).collect(),
        max_lag: args.max_lag,
        ..Default::default()
    });
    let (phase_tx, phase_rx) = watch::channel(IDLE);
    let tasks = start_members(args, &cluster, &shared, phase_rx).await?;
    let (a, b) = measure(args, &mut cluster, &shared, &phase_tx).await?;
    let drained = drain(args, &mut cluster, &shared, &phase_tx, tasks).await?;

    // --- figures over the measured window
    let w = Measured::new(&a, &b);
    section.tables.push(throughput_table(args, &w));
    section
        .tables
        .push(confirm_latency_table(args, &drained.outs));
    section.tables.push(round_trips_table(&w));
    report_commandstats(&w, &mut section);
    section.tables.push(acks_table(args, &w));
    report_cpu(args, &w, &mut section);
    // --- correctness after the drain
    report_checks(args, &shared, &drained, &mut section);

    let Cluster {
        redis_server,
        gateways,
        ..
    } = cluster;
    drop(gateways);
    drop(redis_server);
    Ok(section)
}

fn num_cpus() -> f64 {
    std::thread::available_parallelism()
        .map(|n| n.get() as f64)
        .unwrap_or(1.0)
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    if args.nodes == 0 || args.members == 0 || args.senders == 0 || args.window == 0 {
        bail!("--nodes, --members, --senders and --window must be at least 1");
    }
    if args.senders > args.members {
        bail!("--senders must not exceed --members");
    }
    if args.secs == 0 || args.secs > 600 || args.warmup_secs > 600 {
        bail!("--secs must be 1..=600 and --warmup-secs at most 600");
    }
    let bin = gateway_bin();
    if !bin.is_file() {
        bail!(
            "gateway binary {} not found: cargo build --release -p gateway, then set \
             GATEWAY_BIN or E2E_RELEASE=1",
            bin.display()
        );
    }
    ensure_open_files(args.members as u64 + 200)?;
    let header = format!(
        "gateway {} · {} CPU(s) · acks every {} messages or {} ms · warm-up {} s, measured {} s\n",
        bin.display(),
        num_cpus(),
        args.ack_every,
        args.ack_ms,
        args.warmup_secs,
        args.secs
    );
    print!("{header}");
    let section = run(&args).await?;
    println!("\n{}", section.text());
    if let Some(path) = &args.markdown {
        let md = format!("## bench_delivery\n\n{header}\n{}", section.markdown());
        std::fs::write(path, md).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}
