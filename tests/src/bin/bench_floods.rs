//! Flood benchmark: an unrelated user's latency beside each attack of issue 11, with the
//! gateway's default limits.
//!
//! ```text
//! cargo build --release -p gateway -p e2e
//! E2E_RELEASE=1 nice -n 5 target/release/bench_floods [--secs 5] [--quiet-secs 3] \
//!     [--only 1,3] [--embedded] [--markdown FILE]
//! ```
//!
//! Each flood runs on a fresh gateway node (authentication on, every limit at its default)
//! with its own `redis-server` (or, with `--embedded`, the embedded broker), started through
//! the e2e harness on loopback. An unrelated user U, alone in its own room on the same node,
//! sends a chat message every 10 ms (open loop: it does not wait for the previous one) and
//! measures the round trip to its own copy. For each flood: U's p50/p99/max while quiet
//! (just before the flood) and during it, the gateway's RSS before/peak/after, Redis
//! `used_memory` before/after, the gateway's own counters of closes, refusals and error
//! frames during the flood, and what the attacking clients saw. The attacking clients run on
//! a runtime of their own at nice 19 (see `attack_runtime`), standing in for clients on
//! other machines.
//!
//! Floods (each about `--secs`; an attacker that is closed connects again, as a hostile
//! client would):
//!  0. control: no flood (how much U's latency varies by itself on this machine);
//!  1. one client sending chat messages as fast as it can, never reading;
//!  2. one client sending WebSocket pings as fast as it can, one sending `heartBeat` frames;
//!  3. 20 clients each asking for a 300 × 60 KiB history (`sync`) and never reading, plus 3
//!     clients looping `sync` and reading;
//!  4. 400 half-sent HTTP upgrade requests and 100 silent TCP connections, held until the
//!     gateway drops them; a real client connects meanwhile;
//!  5. one client toggling login/logout in a room of 100 members (frames the members get);
//!  6. DM spam to one user, and DMs to 3000 users who do not exist (Redis keys created);
//!  7. one client (from 127.0.0.2) opening WebSockets until it is refused;
//!  8. one client opening and closing WebSockets as fast as it can for the whole flood,
//!     retrying at once when refused. It connects from U's address, 127.0.0.1, without binding
//!     a source port first: with `bind(127.0.0.3:0)` thousands of connections per second
//!     exhaust that address's free ports and the kernel's search for one (in this process,
//!     whatever its niceness) became what U measured.

#[path = "../bench_util.rs"]
mod bench_util;

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bench_util::{ensure_open_files, percentile, Info, Section, Table};
use clap::Parser;
use e2e::procfs::{cpu_seconds, rss_mib, status_kib};
use e2e::wire::{self, Ws};
use e2e::{gateway_bin, http_get, mint_token, Gateway, GatewayOpts, RedisServer};
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::{sleep, timeout_at, Instant};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "bench_floods",
    about = "An unrelated user's latency beside each flood of issue 11, default limits (loopback only)"
)]
struct Args {
    /// Seconds each flood lasts (floods 4 and 7 last until the gateway drops or refuses).
    #[arg(long, default_value_t = 5.0)]
    secs: f64,

    /// Seconds of quiet measurement before each flood.
    #[arg(long, default_value_t = 3.0)]
    quiet_secs: f64,

    /// Seconds after a flood before the "after" figures are taken.
    #[arg(long, default_value_t = 3.0)]
    settle_secs: f64,

    /// Extra gateway settings, `NAME=VALUE` (repeatable): to compare a limit's values.
    #[arg(long = "gateway-env")]
    gateway_env: Vec<String>,

    /// Only these floods (comma-separated numbers, 0–8).
    #[arg(long, value_delimiter = ',')]
    only: Vec<u32>,

    /// Use the embedded broker instead of Redis.
    #[arg(long)]
    embedded: bool,

    /// Also write the report as Markdown to this file.
    #[arg(long)]
    markdown: Option<PathBuf>,
}

const FLOODS: [&str; 9] = [
    "0 control: no flood",
    "1 chat flood, not reading",
    "2 WS pings + heartBeat flood",
    "3 sync of 300 x 60 KiB: 20 non-readers + 3 loopers",
    "4 400 half-sent upgrades + 100 silent TCP",
    "5 login/logout toggling, room of 100",
    "6 DM spam to one user + DMs to 3000 unknown users",
    "7 one address opening WebSockets until refused",
    "8 one address reconnecting as fast as it can",
];

// Connections

fn login_frame(user: &str, room: &str, token: &str) -> wire::Login {
    wire::Login::new(user, room).token(token)
}

/// Connects and logs in (reading until this user's own `login` frame).
async fn connect_login(url: &str, user: &str, room: &str, token: &str) -> Result<Ws> {
    let mut ws = wire::connect(url, &wire::Opts::default()).await?;
    let login = login_frame(user, room, token);
    wire::log_in(&mut ws, &login, Duration::from_secs(10)).await?;
    Ok(ws)
}

// The unrelated user U

#[derive(Clone, Copy)]
struct Sample {
    sent: Instant,
    rtt: Option<Duration>,
}

struct Probe {
    samples: Arc<Mutex<Vec<Sample>>>,
    stop: Arc<AtomicBool>,
    ended: Arc<Mutex<Option<String>>>,
    sender: tokio::task::AbortHandle,
    receiver: tokio::task::AbortHandle,
}

const PROBE_ROOM: &str = "u-room";

/// The sequence number in `"clientMsgId":"p<n>"` of U's own copy.
fn probe_seq(text: &str) -> Option<usize> {
    let marker = r#""clientMsgId":"p"#;
    let start = text.find(marker)? + marker.len();
    let digits: String = text[start..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok()
}

impl Probe {
    /// Starts U on a runtime thread of its own, so the attackers' tasks in this process never
    /// delay its reads and writes (they still share the machine's CPUs).
    async fn start(url: &str, token: &str) -> Result<Probe> {
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let (url, token) = (url.to_string(), token.to_string());
        std::thread::spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(anyhow::Error::from(e)));
                    return;
                }
            };
            runtime.block_on(async move {
                match Probe::start_here(&url, &token).await {
                    Ok((probe, done)) => {
                        let _ = ready_tx.send(Ok(probe));
                        let _ = done.await;
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            });
        });
        ready_rx.await.context("U's thread ended")?
    }

    /// Runs on U's thread; `done` resolves when both of U's tasks have ended.
    async fn start_here(
        url: &str,
        token: &str,
    ) -> Result<(Probe, impl std::future::Future<Output = ()>)> {
        let ws = connect_login(url, "u", PROBE_ROOM, token).await?;
        let (mut sink, mut stream) = ws.split();
        let samples = Arc::new(Mutex::new(Vec::<Sample>::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let ended = Arc::new(Mutex::new(None));
        let (s, st) = (samples.clone(), stop.clone());
        let sender = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut seq = 0u64;
            while !st.load(Ordering::Relaxed) {
                tick.tick().await;
                let frame = wire::message_raw(
                    PROBE_ROOM,
                    format_args!("probe {seq}"),
                    Some(format_args!("p{seq}")),
                );
                s.lock().expect("samples").push(Sample {
                    sent: Instant::now(),
                    rtt: None,
                });
                if sink.send(Message::text(frame)).await.is_err() {
                    break;
                }
                seq += 1;
            }
        });
        let (s, e) = (samples.clone(), ended.clone());
        let receiver = tokio::spawn(async move {
            while let Some(message) = stream.next().await {
                match message {
                    Ok(Message::Text(text)) => {
                        let now = Instant::now();
                        if let Some(seq) = probe_seq(&text) {
                            let mut samples = s.lock().expect("samples");
                            if let Some(sample) = samples.get_mut(seq) {
                                if sample.rtt.is_none() {
                                    sample.rtt = Some(now - sample.sent);
                                }
                            }
                        }
                    }
                    Ok(Message::Close(close)) => {
                        *e.lock().expect("ended") =
                            Some(format!("closed {}", wire::close_text(close.as_ref())));
                        return;
                    }
                    Ok(_) => {}
                    Err(err) => {
                        *e.lock().expect("ended") = Some(format!("error {err}"));
                        return;
                    }
                }
            }
            *e.lock().expect("ended") = Some("connection ended".into());
        });
        let (done_sender, done_receiver) = (sender.abort_handle(), receiver.abort_handle());
        let done = async move {
            while !(done_sender.is_finished() && done_receiver.is_finished()) {
                sleep(Duration::from_millis(100)).await;
            }
        };
        Ok((
            Probe {
                samples,
                stop,
                ended,
                sender: sender.abort_handle(),
                receiver: receiver.abort_handle(),
            },
            done,
        ))
    }

    /// Stops sending, gives late copies 2 s, then stops reading.
    async fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        sleep(Duration::from_secs(2)).await;
        self.sender.abort();
        self.receiver.abort();
    }

    fn window(&self, from: Instant, to: Instant) -> Lat {
        let samples = self.samples.lock().expect("samples");
        let mut rtts = Vec::new();
        let mut lost = 0;
        for sample in samples.iter().filter(|s| s.sent >= from && s.sent < to) {
            match sample.rtt {
                Some(rtt) => rtts.push(rtt),
                None => lost += 1,
            }
        }
        rtts.sort();
        Lat {
            n: rtts.len() + lost,
            lost,
            p50: percentile(&rtts, 0.50),
            p99: percentile(&rtts, 0.99),
            max: rtts.last().copied().unwrap_or_default(),
        }
    }
}

#[derive(Clone, Copy, Default)]
struct Lat {
    n: usize,
    lost: usize,
    p50: Duration,
    p99: Duration,
    max: Duration,
}

fn fmt_ms(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1000.0;
    if ms >= 100.0 {
        format!("{ms:.0}")
    } else {
        format!("{ms:.2}")
    }
}

impl Lat {
    fn cell(&self) -> String {
        format!(
            "{} / {} / {}",
            fmt_ms(self.p50),
            fmt_ms(self.p99),
            fmt_ms(self.max)
        )
    }
}

// Memory

/// Samples a process's RSS every 50 ms and keeps the peak since the last reset.
struct RssWatch {
    peak_kib: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
    pid: u32,
}

fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS:").unwrap_or(0)
}

impl RssWatch {
    fn start(pid: u32) -> RssWatch {
        let peak_kib = Arc::new(AtomicU64::new(rss_kib(pid)));
        let peak = peak_kib.clone();
        let task = tokio::spawn(async move {
            loop {
                peak.fetch_max(rss_kib(pid), Ordering::Relaxed);
                sleep(Duration::from_millis(50)).await;
            }
        });
        RssWatch {
            peak_kib,
            task,
            pid,
        }
    }

    fn now_mib(&self) -> f64 {
        rss_mib(self.pid)
    }

    fn reset(&self) {
        self.peak_kib.store(rss_kib(self.pid), Ordering::Relaxed);
    }

    fn peak_mib(&self) -> f64 {
        self.peak_kib.load(Ordering::Relaxed).max(rss_kib(self.pid)) as f64 / 1024.0
    }
}

impl Drop for RssWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// Gateway counters

const COUNTERS: [&str; 6] = [
    "gateway_connections_closed_total",
    "gateway_rate_limited_total",
    "gateway_errors_total",
    "gateway_connections_refused_total",
    "gateway_handshake_timeouts_total",
    "gateway_messages_received_total",
];

async fn counters(gw: &Gateway) -> BTreeMap<String, f64> {
    let Ok((_, body)) = http_get(&gw.admin_addr(), "/metrics").await else {
        return BTreeMap::new();
    };
    let node = format!("node=\"{}\"", gw.node_id);
    body.lines()
        .filter(|l| COUNTERS.iter().any(|c| l.starts_with(c)))
        .filter_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            let key = key
                .replace(&format!(",{node}"), "")
                .replace(&format!("{node},"), "")
                .replace(&format!("{{{node}}}"), "")
                .replace("gateway_", "")
                .replace("_total", "");
            Some((key, value.parse().ok()?))
        })
        .collect()
}

fn counter_deltas(a: &BTreeMap<String, f64>, b: &BTreeMap<String, f64>) -> Vec<String> {
    b.iter()
        .filter_map(|(k, v)| {
            let d = v - a.get(k).copied().unwrap_or(0.0);
            (d > 0.0).then(|| format!("{k} +{d}"))
        })
        .collect()
}

// One flood's run: its own broker and node, U, and the measurements around the flood.

struct Run {
    redis: Option<RedisServer>,
    con: Option<redis::aio::MultiplexedConnection>,
    gw: Gateway,
    probe: Probe,
    rss: RssWatch,
    tokens: HashMap<String, String>,
    quiet: (Instant, Instant),
    flood: (Instant, Instant),
    rss_before: f64,
    redis_before: Option<f64>,
    counters_before: BTreeMap<String, f64>,
    /// CPU seconds (gateway, Redis, this process) at the flood's start, then used during it.
    cpu_start: (f64, f64, f64),
    cpu_used: (f64, f64, f64),
}

struct Outcome {
    name: &'static str,
    quiet: Lat,
    flood: Lat,
    rss: (f64, f64, f64),
    redis_mib: Option<(f64, f64)>,
    lines: Vec<String>,
}

impl Outcome {
    fn ratio(&self) -> f64 {
        self.flood.p99.as_secs_f64() / self.quiet.p99.as_secs_f64().max(1e-6)
    }

    fn holds(&self) -> bool {
        self.ratio() <= 2.0 && self.flood.lost == 0
    }
}

impl Run {
    async fn start(args: &Args) -> Result<Run> {
        let (redis, opts) = if args.embedded {
            (None, GatewayOpts::default())
        } else {
            let redis = RedisServer::start().await?;
            let opts = GatewayOpts::redis(&redis.url());
            (Some(redis), opts)
        };
        let mut opts = opts.with_jwt();
        for setting in &args.gateway_env {
            let (name, value) = setting
                .split_once('=')
                .with_context(|| format!("--gateway-env {setting}: expected NAME=VALUE"))?;
            opts = opts.env(name, value);
        }
        let gw = Gateway::start(opts).await?;
        let con = match &redis {
            Some(r) => Some(r.connection().await?),
            None => None,
        };
        let pid = gw.proc.pid().context("gateway pid")?;
        let mut tokens = HashMap::new();
        let token = mint_token("u", &["--ttl", "3600"])?;
        tokens.insert("u".to_string(), token.clone());
        let probe = Probe::start(&gw.ws_url(), &token).await?;
        let now = Instant::now();
        Ok(Run {
            redis,
            con,
            gw,
            probe,
            rss: RssWatch::start(pid),
            tokens,
            quiet: (now, now),
            flood: (now, now),
            rss_before: 0.0,
            redis_before: None,
            counters_before: BTreeMap::new(),
            cpu_start: (0.0, 0.0, 0.0),
            cpu_used: (0.0, 0.0, 0.0),
        })
    }

    fn url(&self) -> String {
        self.gw.ws_url()
    }

    fn token(&mut self, user: &str) -> Result<String> {
        if let Some(t) = self.tokens.get(user) {
            return Ok(t.clone());
        }
        let token = mint_token(user, &["--ttl", "3600"])?;
        self.tokens.insert(user.to_string(), token.clone());
        Ok(token)
    }

    async fn redis_mib(&mut self) -> Option<f64> {
        let con = self.con.as_mut()?;
        let info = Info::take(con).await.ok()?;
        Some(info.num("used_memory") / (1024.0 * 1024.0))
    }

    async fn redis_query<T: redis::FromRedisValue>(&mut self, cmd: &redis::Cmd) -> Option<T> {
        let con = self.con.as_mut()?;
        cmd.query_async(con).await.ok()
    }

    async fn quiet(&mut self, args: &Args) {
        sleep(Duration::from_millis(500)).await;
        let start = Instant::now();
        sleep(Duration::from_secs_f64(args.quiet_secs)).await;
        self.quiet = (start, Instant::now());
    }

    async fn flood_begin(&mut self) {
        self.rss_before = self.rss.now_mib();
        self.rss.reset();
        self.redis_before = self.redis_mib().await;
        self.counters_before = counters(&self.gw).await;
        self.cpu_start = self.cpu().await;
        self.flood.0 = Instant::now();
    }

    async fn cpu(&mut self) -> (f64, f64, f64) {
        let gateway = self.gw.proc.pid().map_or(0.0, cpu_seconds);
        let own = cpu_seconds(std::process::id());
        let redis = match self.con.as_mut() {
            Some(con) => Info::take(con).await.map_or(0.0, |i| i.cpu()),
            None => 0.0,
        };
        (gateway, redis, own)
    }

    async fn flood_end(&mut self) {
        self.flood.1 = Instant::now();
        let (g, r, o) = self.cpu().await;
        let (g0, r0, o0) = self.cpu_start;
        self.cpu_used = (g - g0, r - r0, o - o0);
    }

    async fn finish(
        mut self,
        name: &'static str,
        args: &Args,
        mut lines: Vec<String>,
    ) -> Result<Outcome> {
        sleep(Duration::from_secs_f64(args.settle_secs)).await;
        let rss_peak = self.rss.peak_mib();
        let rss_after = self.rss.now_mib();
        let redis_after = self.redis_mib().await;
        let after = counters(&self.gw).await;
        self.probe.stop().await;
        if let Some(ended) = self.probe.ended.lock().expect("ended").clone() {
            lines.push(format!("U's connection ended: {ended}"));
        }
        let deltas = counter_deltas(&self.counters_before, &after);
        lines.push(format!(
            "gateway counters during flood + settle: {}",
            if deltas.is_empty() {
                "none".to_string()
            } else {
                deltas.join(", ")
            }
        ));
        let wall = (self.flood.1 - self.flood.0).as_secs_f64();
        let (g, r, o) = self.cpu_used;
        lines.push(format!(
            "CPU during the flood ({wall:.1} s): gateway {g:.1} s ({:.0} %), Redis {r:.1} s, \
             this benchmark (attackers + U) {o:.1} s",
            100.0 * g / wall.max(0.001)
        ));
        if !self.gw.proc.is_running() {
            lines.push("THE GATEWAY PROCESS EXITED".into());
        }
        let quiet = self.probe.window(self.quiet.0, self.quiet.1);
        let flood = self.probe.window(self.flood.0, self.flood.1);
        lines.insert(
            0,
            format!(
                "U: quiet {} samples p50/p99/max {} ms; flood ({:.1} s) {} samples {} ms, {} without an answer",
                quiet.n,
                quiet.cell(),
                (self.flood.1 - self.flood.0).as_secs_f64(),
                flood.n,
                flood.cell(),
                flood.lost
            ),
        );
        let redis_mib = match (self.redis_before, redis_after) {
            (Some(a), Some(b)) => Some((a, b)),
            _ => None,
        };
        // The gateway first, so it does not see its Redis go away.
        let Run { gw, redis, .. } = self;
        drop(gw);
        drop(redis);
        Ok(Outcome {
            name,
            quiet,
            flood,
            rss: (self.rss_before, rss_peak, rss_after),
            redis_mib,
            lines,
        })
    }
}

// A generic hostile client: connects, logs in, sends frames as fast as it can, connects
// again when closed.

#[derive(Default, Debug)]
struct AttackStats {
    connections: u64,
    /// Frames written.
    sent: u64,
    /// How each connection ended: close code, "reset", or "open at end".
    ends: BTreeMap<String, u64>,
    /// Error frames received, by code (clients that read).
    errors: BTreeMap<String, u64>,
    /// Frames received (clients that read).
    received: u64,
    /// Connect or login failures.
    failures: BTreeMap<String, u64>,
}

impl AttackStats {
    fn summary(&self) -> String {
        let fmt = |m: &BTreeMap<String, u64>| {
            m.iter()
                .map(|(k, v)| format!("{k}×{v}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut out = format!(
            "{} connection(s), {} frames sent; ends: {}",
            self.connections,
            self.sent,
            fmt(&self.ends)
        );
        if self.received > 0 || !self.errors.is_empty() {
            out.push_str(&format!(
                "; {} frames received, error frames: {}",
                self.received,
                if self.errors.is_empty() {
                    "none".into()
                } else {
                    fmt(&self.errors)
                }
            ));
        }
        if !self.failures.is_empty() {
            out.push_str(&format!("; failures: {}", fmt(&self.failures)));
        }
        out
    }
}

#[derive(Clone)]
struct Attacker {
    url: String,
    user: String,
    room: String,
    token: String,
    /// Read (and count) what the gateway sends; otherwise never read while flooding.
    read: bool,
}

type FrameFn = Arc<dyn Fn(u64) -> Option<Message> + Send + Sync>;

fn bump(map: &mut BTreeMap<String, u64>, key: impl Into<String>) {
    *map.entry(key.into()).or_default() += 1;
}

/// Floods until `until` (or until `frame` returns `None`), reconnecting after each close; on
/// the attackers' runtime (see `attack_runtime`).
async fn flood(att: Attacker, frame: FrameFn, until: Instant) -> AttackStats {
    attack_runtime()
        .spawn(flood_here(att, frame, until))
        .await
        .unwrap_or_default()
}

async fn flood_here(att: Attacker, frame: FrameFn, until: Instant) -> AttackStats {
    let mut stats = AttackStats::default();
    let mut seq = 0u64;
    let mut done = false;
    while !done && Instant::now() < until {
        let mut ws = match timeout_at(
            until,
            connect_login(&att.url, &att.user, &att.room, &att.token),
        )
        .await
        {
            Ok(Ok(ws)) => ws,
            Ok(Err(e)) => {
                bump(&mut stats.failures, first_words(&e.to_string()));
                sleep(Duration::from_millis(100)).await;
                continue;
            }
            Err(_) => break,
        };
        stats.connections += 1;
        if att.read {
            let (mut sink, mut stream) = ws.split();
            let reader = tokio::spawn(async move {
                let mut received = 0u64;
                let mut errors = BTreeMap::new();
                let end = loop {
                    match stream.next().await {
                        Some(Ok(Message::Text(text))) => {
                            received += 1;
                            if let Some(code) = wire::error_code(&text) {
                                bump(&mut errors, code);
                            }
                        }
                        Some(Ok(Message::Close(close))) => break wire::close_text(close.as_ref()),
                        Some(Ok(_)) => received += 1,
                        Some(Err(e)) => break end_label(&e.to_string()),
                        None => break "eof".to_string(),
                    }
                };
                (received, errors, end)
            });
            let sending = async {
                loop {
                    for _ in 0..32 {
                        let Some(message) = frame(seq) else {
                            return true;
                        };
                        seq += 1;
                        if sink.feed(message).await.is_err() {
                            return false;
                        }
                        stats.sent += 1;
                    }
                    if sink.flush().await.is_err() {
                        return false;
                    }
                }
            };
            let sent_all = timeout_at(until, sending).await;
            if let Ok(true) = sent_all {
                // Everything sent: read the answers for a moment.
                done = true;
                let _ = sink.flush().await;
                sleep(Duration::from_millis(500)).await;
            }
            let mut reader = reader;
            let read = timeout_at(
                Instant::now().max(until) + Duration::from_millis(300),
                &mut reader,
            )
            .await;
            let end = match read {
                Ok(Ok((received, errors, end))) => {
                    stats.received += received;
                    for (k, v) in errors {
                        *stats.errors.entry(k).or_default() += v;
                    }
                    end
                }
                _ => {
                    reader.abort();
                    "open at end".to_string()
                }
            };
            bump(&mut stats.ends, end);
        } else {
            let sending = async {
                loop {
                    for _ in 0..32 {
                        let Some(message) = frame(seq) else {
                            return true;
                        };
                        seq += 1;
                        if ws.feed(message).await.is_err() {
                            return false;
                        }
                        stats.sent += 1;
                    }
                    if ws.flush().await.is_err() {
                        return false;
                    }
                }
            };
            let sent_all = timeout_at(until, sending).await;
            let end = match sent_all {
                Ok(true) => {
                    done = true;
                    "open at end (all sent)".to_string()
                }
                // The send failed: look for the gateway's close frame in what was received.
                Ok(false) => read_close(&mut ws, Duration::from_secs(1)).await,
                Err(_) => "open at end".to_string(),
            };
            bump(&mut stats.ends, end);
        }
    }
    stats
}

/// How a connection ended, from the error that ended it.
fn end_label(text: &str) -> String {
    if text.contains("reset") || text.contains("Broken pipe") {
        "TCP reset before a close frame was read".into()
    } else {
        first_words(text)
    }
}

fn first_words(text: &str) -> String {
    text.split_whitespace()
        .take(6)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Reads (discarding frames) until a close frame or an error; names how the connection ended.
async fn read_close(ws: &mut Ws, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        match timeout_at(deadline, ws.next()).await {
            Ok(Some(Ok(Message::Close(close)))) => return wire::close_text(close.as_ref()),
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(e))) => return end_label(&e.to_string()),
            Ok(None) => return "eof".into(),
            Err(_) => return "no close within 1 s".into(),
        }
    }
}

fn text_frames(make: impl Fn(u64) -> String + Send + Sync + 'static) -> FrameFn {
    Arc::new(move |seq| Some(Message::text(make(seq))))
}

// The floods

async fn control(args: &Args, run: &mut Run) -> Result<Vec<String>> {
    run.flood_begin().await;
    sleep(Duration::from_secs_f64(args.secs)).await;
    run.flood_end().await;
    Ok(vec!["nothing but U".into()])
}

async fn chat_flood(args: &Args, run: &mut Run) -> Result<Vec<String>> {
    let att = Attacker {
        url: run.url(),
        user: "a1".into(),
        room: "flood1".into(),
        token: run.token("a1")?,
        read: false,
    };
    let body = "x".repeat(100);
    let frame =
        text_frames(move |seq| wire::message_raw("flood1", format_args!("{body} {seq}"), None));
    run.flood_begin().await;
    let stats = flood(att, frame, Instant::now() + secs(args.secs)).await;
    run.flood_end().await;
    let len: Option<u64> = run
        .redis_query(redis::cmd("XLEN").arg("gw:{r:flood1}:s"))
        .await;
    Ok(vec![
        format!("attacker: {}", stats.summary()),
        format!(
            "room history after: {} messages",
            len.map_or("n/a (embedded)".into(), |l| l.to_string())
        ),
    ])
}

async fn ping_flood(args: &Args, run: &mut Run) -> Result<Vec<String>> {
    let pinger = Attacker {
        url: run.url(),
        user: "a2p".into(),
        room: "flood2".into(),
        token: run.token("a2p")?,
        read: false,
    };
    let beater = Attacker {
        user: "a2h".into(),
        token: run.token("a2h")?,
        ..pinger.clone()
    };
    let pings: FrameFn = Arc::new(|_| Some(Message::Ping(Vec::new().into())));
    let beats = text_frames(|_| wire::HEARTBEAT.to_string());
    run.flood_begin().await;
    let until = Instant::now() + secs(args.secs);
    let (p, h) = tokio::join!(flood(pinger, pings, until), flood(beater, beats, until));
    run.flood_end().await;
    Ok(vec![
        format!("WS pinger: {}", p.summary()),
        format!("heartBeat sender: {}", h.summary()),
    ])
}

async fn sync_flood(args: &Args, run: &mut Run) -> Result<Vec<String>> {
    let url = run.url();
    // Fill the history: 300 messages of 60 KiB, each confirmed by its own copy.
    let token = run.token("filler")?;
    let mut filler = connect_login(&url, "filler", "hist", &token).await?;
    let content = "x".repeat(60 * 1024);
    for i in 0..300 {
        let frame = wire::message("hist", &content, Some(&format!("f{i}")));
        filler.send(Message::text(frame.to_string())).await?;
        let marker = format!(r#""clientMsgId":"f{i}""#);
        loop {
            match tokio::time::timeout(Duration::from_secs(10), filler.next()).await {
                Ok(Some(Ok(Message::Text(t)))) if t.contains(&marker) => break,
                Ok(Some(Ok(_))) => {}
                other => bail!("filling the history: {other:?}"),
            }
        }
    }
    drop(filler);
    let mut sinks = Vec::new();
    for i in 0..20 {
        let user = format!("s{i}");
        let token = run.token(&user)?;
        sinks.push(connect_login(&url, &user, "hist", &token).await?);
    }
    let mut looper_tokens = Vec::new();
    for i in 0..3 {
        looper_tokens.push(run.token(&format!("l{i}"))?);
    }
    run.quiet(args).await;
    run.flood_begin().await;
    let until = Instant::now() + secs(args.secs);
    let sync = wire::sync("hist", "0", Some(1000)).to_string();
    for ws in sinks.iter_mut() {
        ws.send(Message::text(sync.clone())).await?;
    }
    let mut loopers = Vec::new();
    for (i, token) in looper_tokens.into_iter().enumerate() {
        let url = url.clone();
        let sync = sync.clone();
        loopers.push(
            attack_runtime().spawn(async move {
                sync_looper(&url, &format!("l{i}"), &token, &sync, until).await
            }),
        );
    }
    let mut lines = Vec::new();
    for (i, looper) in loopers.into_iter().enumerate() {
        lines.push(format!("sync looper {i}: {}", looper.await?));
    }
    run.flood_end().await;
    // How the non-readers' connections stand: closed by the gateway, or still open.
    let mut ends = BTreeMap::new();
    for ws in sinks.iter_mut() {
        let end = read_close(ws, Duration::from_millis(50)).await;
        bump(
            &mut ends,
            if end.starts_with("no close") {
                "still open".to_string()
            } else {
                end
            },
        );
    }
    lines.insert(
        0,
        format!("20 non-reading syncers at the end of the flood (a 50 ms read each): {ends:?}"),
    );
    drop(sinks);
    Ok(lines)
}

/// Loops `sync` over the whole history, reading every page; returns what it got.
async fn sync_looper(url: &str, user: &str, token: &str, sync: &str, until: Instant) -> String {
    let (mut replays, mut messages, mut bytes, mut connections) = (0u64, 0u64, 0u64, 0u64);
    let mut errors = BTreeMap::new();
    let mut ends = BTreeMap::new();
    while Instant::now() < until {
        let Ok(Ok(mut ws)) = timeout_at(until, connect_login(url, user, "hist", token)).await
        else {
            break;
        };
        connections += 1;
        let end = loop {
            if ws.send(Message::text(sync.to_string())).await.is_err() {
                break read_close(&mut ws, Duration::from_secs(1)).await;
            }
            // Read until this sync's answer: `synced` or an error frame.
            let answer = loop {
                match timeout_at(until, ws.next()).await {
                    Ok(Some(Ok(Message::Text(t)))) => {
                        bytes += t.len() as u64;
                        if wire::event(&t) == Some("message") {
                            messages += 1;
                        } else if wire::event(&t) == Some("synced") {
                            replays += 1;
                            break Ok(());
                        } else if let Some(code) = wire::error_code(&t) {
                            bump(&mut errors, code);
                            break Ok(());
                        }
                    }
                    Ok(Some(Ok(Message::Close(close)))) => {
                        break Err(wire::close_text(close.as_ref()))
                    }
                    Ok(Some(Ok(_))) => {}
                    Ok(Some(Err(e))) => break Err(first_words(&e.to_string())),
                    Ok(None) => break Err("eof".into()),
                    Err(_) => break Err("open at end".into()),
                }
            };
            if let Err(end) = answer {
                break end;
            }
        };
        bump(&mut ends, end);
    }
    format!(
        "{connections} connection(s), {replays} complete replays, {messages} messages \
         ({:.0} MiB) read, error frames {errors:?}, ends {ends:?}",
        bytes as f64 / (1024.0 * 1024.0)
    )
}

async fn slowloris(_args: &Args, run: &mut Run) -> Result<Vec<String>> {
    let addr: SocketAddr = run.gw.addr().parse()?;
    let partial = format!(
        "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\n"
    );
    run.flood_begin().await;
    let start = Instant::now();
    let hard_end = start + Duration::from_secs(30);
    let mut tasks = Vec::new();
    for i in 0..500 {
        let partial = partial.clone();
        tasks.push(attack_runtime().spawn(async move {
            let mut tcp = TcpStream::connect(addr).await.ok()?;
            if i < 400 {
                tcp.write_all(partial.as_bytes()).await.ok()?;
            }
            let opened = Instant::now();
            let mut buf = [0u8; 4096];
            loop {
                match timeout_at(hard_end, tcp.read(&mut buf)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => return Some((i < 400, Some(opened.elapsed()))),
                    Ok(Ok(_)) => continue,
                    Err(_) => return Some((i < 400, None)),
                }
            }
        }));
    }
    // A real client meanwhile.
    sleep(Duration::from_secs(1)).await;
    let token = run.token("real")?;
    let real_start = Instant::now();
    let real = async {
        let mut ws = connect_login(&run.url(), "real", "real-room", &token).await?;
        ws.send(Message::text(
            wire::message("real-room", "hi", Some("r1")).to_string(),
        ))
        .await?;
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) if t.contains(r#""clientMsgId":"r1""#) => {
                    return anyhow::Ok(real_start.elapsed())
                }
                Some(Ok(_)) => {}
                other => bail!("real client: {other:?}"),
            }
        }
    };
    let real = match tokio::time::timeout(Duration::from_secs(15), real).await {
        Ok(Ok(took)) => format!(
            "connected, logged in and got its message back in {} ms",
            fmt_ms(took)
        ),
        Ok(Err(e)) => format!("FAILED: {e}"),
        Err(_) => "FAILED: nothing within 15 s".into(),
    };
    let mut half = Vec::new();
    let mut silent = Vec::new();
    let mut failed_to_open = 0;
    let mut held = (0, 0);
    for task in tasks {
        match task.await? {
            Some((true, Some(d))) => half.push(d),
            Some((false, Some(d))) => silent.push(d),
            Some((true, None)) => held.0 += 1,
            Some((false, None)) => held.1 += 1,
            None => failed_to_open += 1,
        }
    }
    run.flood_end().await;
    let spread = |v: &mut Vec<Duration>| {
        v.sort();
        if v.is_empty() {
            "none".to_string()
        } else {
            format!(
                "{} dropped after {:.2}–{:.2} s (median {:.2} s)",
                v.len(),
                v[0].as_secs_f64(),
                v[v.len() - 1].as_secs_f64(),
                percentile(v, 0.5).as_secs_f64()
            )
        }
    };
    Ok(vec![
        format!(
            "half-sent upgrades: {}; still held after 30 s: {}",
            spread(&mut half),
            held.0
        ),
        format!(
            "silent TCP: {}; still held after 30 s: {}",
            spread(&mut silent),
            held.1
        ),
        format!("connections that could not be opened: {failed_to_open}"),
        format!("a real client 1 s into the flood: {real}"),
    ])
}

async fn toggle_flood(args: &Args, run: &mut Run) -> Result<Vec<String>> {
    let url = run.url();
    let frames = Arc::new(AtomicU64::new(0));
    let announcements = Arc::new(AtomicU64::new(0));
    let mut members = Vec::new();
    for i in 0..100 {
        let user = format!("m{i}");
        let token = run.token(&user)?;
        let ws = connect_login(&url, &user, "big", &token).await?;
        let (f, a) = (frames.clone(), announcements.clone());
        members.push(attack_runtime().spawn(async move {
            let (_sink, mut stream) = ws.split();
            while let Some(Ok(message)) = stream.next().await {
                if let Message::Text(t) = message {
                    f.fetch_add(1, Ordering::Relaxed);
                    if matches!(wire::event(&t), Some("login" | "logout")) {
                        a.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    let token = run.token("t")?;
    let fq0 = frames.load(Ordering::Relaxed);
    run.quiet(args).await;
    let fq1 = frames.load(Ordering::Relaxed);
    let att = Attacker {
        url,
        user: "t".into(),
        room: "big".into(),
        token: token.clone(),
        read: true,
    };
    let login = login_frame("t", "big", &token).text();
    let logout = wire::logout("big").to_string();
    let frame = text_frames(move |seq| {
        if seq % 2 == 0 {
            logout.clone()
        } else {
            login.clone()
        }
    });
    let quiet_secs = (run.quiet.1 - run.quiet.0).as_secs_f64();
    run.flood_begin().await;
    let (f0, a0) = (
        frames.load(Ordering::Relaxed),
        announcements.load(Ordering::Relaxed),
    );
    let stats = flood(att, frame, Instant::now() + secs(args.secs)).await;
    run.flood_end().await;
    let took = (run.flood.1 - run.flood.0).as_secs_f64();
    let (f1, a1) = (
        frames.load(Ordering::Relaxed),
        announcements.load(Ordering::Relaxed),
    );
    // Let the last broadcasts arrive before counting what the close caused.
    sleep(Duration::from_millis(500)).await;
    let (f2, a2) = (
        frames.load(Ordering::Relaxed),
        announcements.load(Ordering::Relaxed),
    );
    for m in members {
        m.abort();
    }
    Ok(vec![
        format!("attacker: {}", stats.summary()),
        format!(
            "the 100 members received {} frames in {took:.1} s = {:.0} frames/s in all \
             ({:.0} per member per s); login/logout announcements {}; quiet before: {:.0} frames/s \
             over {quiet_secs:.1} s",
            f1 - f0,
            (f1 - f0) as f64 / took,
            (f1 - f0) as f64 / took / 100.0,
            a1 - a0,
            (fq1 - fq0) as f64 / quiet_secs,
        ),
        format!(
            "in the 0.5 s after the flood: {} more frames ({} announcements)",
            f2 - f1,
            a2 - a1
        ),
    ])
}

async fn dm_flood(args: &Args, run: &mut Run) -> Result<Vec<String>> {
    let url = run.url();
    // The target, reading; a real sender's DM it has not read yet.
    let token_v = run.token("v")?;
    let ws_v = connect_login(&url, "v", "v-room", &token_v).await?;
    let dms = Arc::new(AtomicU64::new(0));
    let d = dms.clone();
    let target = attack_runtime().spawn(async move {
        let (_sink, mut stream) = ws_v.split();
        while let Some(Ok(message)) = stream.next().await {
            if let Message::Text(t) = message {
                if wire::event(&t) == Some("dm") {
                    d.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    });
    let token_f = run.token("friend")?;
    let mut friend = connect_login(&url, "friend", "f-room", &token_f).await?;
    friend
        .send(Message::text(
            wire::dm("v", "the real one", Some("real")).to_string(),
        ))
        .await?;
    let real_id = loop {
        match tokio::time::timeout(Duration::from_secs(10), friend.next()).await {
            Ok(Some(Ok(Message::Text(t)))) if wire::event(&t) == Some("dmSent") => {
                let v: Value = serde_json::from_str(&t)?;
                break v["id"].as_str().unwrap_or_default().to_string();
            }
            Ok(Some(Ok(_))) => {}
            other => bail!("friend's DM: {other:?}"),
        }
    };
    let spam = Attacker {
        url: url.clone(),
        user: "spam".into(),
        room: "s-room".into(),
        token: run.token("spam")?,
        read: true,
    };
    let ghost_token = run.token("spam2")?;
    run.quiet(args).await;
    let keys_before: Option<u64> = run.redis_query(&redis::cmd("DBSIZE")).await;
    let key_set_before: Vec<String> = run
        .redis_query(redis::cmd("KEYS").arg("*"))
        .await
        .unwrap_or_default();
    run.flood_begin().await;
    let until = Instant::now() + secs(args.secs);
    let spam_frames = text_frames(|seq| wire::dm("v", &format!("buy now {seq}"), None).to_string());
    let (s, g) = tokio::join!(
        flood(spam, spam_frames, until),
        ghost_dms(&url, &ghost_token, until)
    );
    run.flood_end().await;
    let inbox: Option<u64> = run.redis_query(redis::cmd("XLEN").arg("gw:{u:v}:in")).await;
    let real_kept: Option<Vec<redis::Value>> = run
        .redis_query(
            redis::cmd("XRANGE")
                .arg("gw:{u:v}:in")
                .arg(&real_id)
                .arg(&real_id),
        )
        .await;
    let keys_after: Option<u64> = run.redis_query(&redis::cmd("DBSIZE")).await;
    let ghost_keys: Option<Vec<String>> = run.redis_query(redis::cmd("KEYS").arg("*ghost*")).await;
    let key_set_after: Vec<String> = run
        .redis_query(redis::cmd("KEYS").arg("*"))
        .await
        .unwrap_or_default();
    let before: std::collections::HashSet<&String> = key_set_before.iter().collect();
    let mut new_keys: BTreeMap<String, u64> = BTreeMap::new();
    for key in key_set_after.iter().filter(|k| !before.contains(k)) {
        bump(&mut new_keys, key_shape(key));
    }
    sleep(Duration::from_millis(300)).await;
    target.abort();
    let na = || "n/a (embedded)".to_string();
    Ok(vec![
        format!("DM spammer → v: {}", s.summary()),
        format!("DMs to ghost-0..2999 (80 per connection, the DM burst): {g}"),
        format!(
            "v received {} DMs live; v's inbox length after: {}; the real DM sent before \
             the flood still stored: {}",
            dms.load(Ordering::Relaxed),
            inbox.map_or_else(na, |l| l.to_string()),
            real_kept.map_or_else(na, |v| (!v.is_empty()).to_string())
        ),
        format!(
            "Redis keys: {} before the flood, {} after; keys naming a ghost user: {}",
            keys_before.map_or_else(na, |k| k.to_string()),
            keys_after.map_or_else(na, |k| k.to_string()),
            ghost_keys.map_or_else(na, |k| k.len().to_string())
        ),
        format!("new Redis keys by shape: {new_keys:?}"),
    ])
}

/// DMs to 3000 users who never logged in, 80 per connection (a connection's DM burst), each
/// answer read; returns the answers by kind.
async fn ghost_dms(url: &str, token: &str, until: Instant) -> String {
    let mut answers: BTreeMap<String, u64> = BTreeMap::new();
    let (mut next, mut connections) = (0u32, 0u32);
    while next < 3000 && Instant::now() < until {
        let Ok(Ok(mut ws)) = timeout_at(until, connect_login(url, "spam2", "s2-room", token)).await
        else {
            bump(&mut answers, "connect/login failed");
            continue;
        };
        connections += 1;
        let chunk = (3000 - next).min(80);
        for i in next..next + chunk {
            let dm = wire::dm(&format!("ghost-{i}"), "hi", None);
            if ws.feed(Message::text(dm.to_string())).await.is_err() {
                break;
            }
        }
        let _ = ws.flush().await;
        next += chunk;
        let mut got = 0;
        let deadline = Instant::now() + Duration::from_secs(2);
        while got < chunk {
            match timeout_at(deadline, ws.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => {
                    if wire::event(&t) == Some("dmSent") {
                        bump(&mut answers, "dmSent");
                        got += 1;
                    } else if let Some(code) = wire::error_code(&t) {
                        bump(&mut answers, code);
                        got += 1;
                    }
                }
                Ok(Some(Ok(_))) => {}
                _ => {
                    bump(&mut answers, "unanswered");
                    break;
                }
            }
        }
    }
    format!("{next} sent on {connections} connection(s); answers {answers:?}")
}

/// A key with the ids in its hash tag and after it replaced by `*`: `gw:{u:*}:in`.
fn key_shape(key: &str) -> String {
    let mut out = String::new();
    let mut rest = key;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..=open]);
        let after = &rest[open + 1..];
        let Some(close) = after.find('}') else {
            rest = after;
            break;
        };
        let tag = &after[..close];
        out.push_str(&tag[..tag.find(':').map_or(0, |c| c + 1)]);
        out.push('*');
        out.push('}');
        rest = &after[close + 1..];
    }
    // Ids after the tag (`:d:<user>:<clientMsgId>`): the kind only.
    let segments: Vec<&str> = rest.split(':').collect();
    if segments.len() > 2 {
        out.push_str(&segments[..2].join(":"));
        out.push_str(":*");
    } else {
        out.push_str(rest);
    }
    out
}

/// Opens a WebSocket from `src` (a loopback address of its own).
async fn connect_from(
    src: IpAddr,
    addr: SocketAddr,
    url: &str,
) -> Result<WebSocketStream<TcpStream>> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(src, 0))?;
    let tcp = socket.connect(addr).await?;
    tokio::time::timeout(
        Duration::from_secs(10),
        wire::connect_over(url, tcp, &wire::Opts::default()),
    )
    .await
    .context("upgrade timeout")?
}

async fn connection_flood(args: &Args, run: &mut Run) -> Result<Vec<String>> {
    let addr: SocketAddr = run.gw.addr().parse()?;
    let url = run.url();
    let src: IpAddr = "127.0.0.2".parse()?;
    run.flood_begin().await;
    let start = Instant::now();
    let give_up = start + Duration::from_secs(60);
    let held = Arc::new(Mutex::new(Vec::<WebSocketStream<TcpStream>>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let refusal = Arc::new(Mutex::new(None::<(Duration, String)>));
    let mut workers = Vec::new();
    for _ in 0..32 {
        let (held, stop, refusal, url) = (held.clone(), stop.clone(), refusal.clone(), url.clone());
        workers.push(attack_runtime().spawn(async move {
            while !stop.load(Ordering::Relaxed) && Instant::now() < give_up {
                match connect_from(src, addr, &url).await {
                    Ok(ws) => held.lock().expect("held").push(ws),
                    Err(e) => {
                        let text = match wire::refusal(&e) {
                            Some(refused) => format!("HTTP {} {}", refused.status, refused.body),
                            None => first_words(&e.to_string()),
                        };
                        let mut r = refusal.lock().expect("refusal");
                        if r.is_none() {
                            *r = Some((start.elapsed(), text));
                        }
                        stop.store(true, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    for w in workers {
        w.await?;
    }
    let opened = held.lock().expect("held").len();
    let open_time = start.elapsed();
    // Hold them for the flood's length; a real client from U's address meanwhile.
    let token = run.token("real")?;
    let real_start = Instant::now();
    let real = match connect_login(&url, "real", "real-room", &token).await {
        Ok(_) => format!(
            "connected and logged in in {} ms",
            fmt_ms(real_start.elapsed())
        ),
        Err(e) => format!("FAILED: {e}"),
    };
    let again = match connect_from(src, addr, &url).await {
        Ok(_) => "accepted".to_string(),
        Err(e) => first_words(&e.to_string()),
    };
    sleep(secs(args.secs)).await;
    let open_now = held.lock().expect("held").len();
    run.flood_end().await;
    held.lock().expect("held").clear();
    let refusal = refusal.lock().expect("refusal").clone();
    Ok(vec![
        format!(
            "the attacker (127.0.0.2) opened {opened} WebSockets in {:.1} s; first refusal: {}",
            open_time.as_secs_f64(),
            refusal.map_or("none".into(), |(t, r)| format!(
                "after {:.1} s: {}",
                t.as_secs_f64(),
                r.chars().take(200).collect::<String>()
            ))
        ),
        format!("one more from 127.0.0.2 after that: {again}"),
        format!("a real client from 127.0.0.1 meanwhile: {real}"),
        format!(
            "held {open_now} for {:.0} s more, then closed them all",
            args.secs
        ),
    ])
}

/// Flood 8: connect, close, again, from 32 tasks for the flood's length;
/// a refusal is retried at once (a hostile client does not honour Retry-After).
async fn reconnect_flood(args: &Args, run: &mut Run) -> Result<Vec<String>> {
    let url = run.url();
    run.flood_begin().await;
    let end = Instant::now() + secs(args.secs);
    let outcomes = Arc::new(Mutex::new(BTreeMap::<String, u64>::new()));
    let mut workers = Vec::new();
    for _ in 0..32 {
        let (outcomes, url) = (outcomes.clone(), url.clone());
        workers.push(attack_runtime().spawn(async move {
            while Instant::now() < end {
                let outcome = match wire::connect(&url, &wire::Opts::default()).await {
                    Ok(mut ws) => {
                        let _ = ws.close(None).await;
                        "opened and closed".to_string()
                    }
                    Err(e) => match wire::refusal(&e) {
                        Some(refused) => format!(
                            "HTTP {} {}",
                            refused.status,
                            refused.reason().unwrap_or_default()
                        ),
                        None => first_words(&e.to_string()),
                    },
                };
                *outcomes
                    .lock()
                    .expect("outcomes")
                    .entry(outcome)
                    .or_default() += 1;
            }
        }));
    }
    for w in workers {
        w.await?;
    }
    run.flood_end().await;
    let outcomes = outcomes.lock().expect("outcomes").clone();
    let total: u64 = outcomes.values().sum();
    let mut lines = vec![format!(
        "the attacker (from U's address, 127.0.0.1) made {total} attempts in {:.0} s ({:.0}/s):",
        args.secs,
        total as f64 / args.secs
    )];
    for (outcome, n) in outcomes {
        lines.push(format!("  {outcome}: {n}"));
    }
    Ok(lines)
}

/// The runtime every flood's attacking clients (and the clients that only receive what an
/// attack makes: flood 5's members, flood 6's target) run on: its threads run at the lowest
/// CPU priority (nice 19), standing in for clients on machines of their own. On this 2-vCPU
/// box a tungstenite client's work costs about as much CPU as the gateway's side of it; on
/// U's own runtime, or at equal priority, U would partly measure the attackers' CPU use and
/// scheduling, which real attackers spend elsewhere. The gateway, Redis and U keep their
/// priority. (Until 2026-11-30 evening only floods 7 and 8 ran here.)
fn attack_runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .on_thread_start(|| {
                // Linux niceness is per thread: renice this one (its id from /proc).
                if let Ok(me) = std::fs::read_link("/proc/thread-self") {
                    if let Some(tid) = me.file_name().and_then(|t| t.to_str()) {
                        let _ = std::process::Command::new("renice")
                            .args(["-n", "19", "-p", tid])
                            .stdout(std::process::Stdio::null())
                            .status();
                    }
                }
            })
            .build()
            .expect("attack runtime")
    })
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

async fn run_flood(args: &Args, id: usize) -> Result<Outcome> {
    let mut run = Run::start(args).await?;
    // Floods with a setup of their own take their quiet window after it.
    let lines = match id {
        0 => {
            run.quiet(args).await;
            control(args, &mut run).await?
        }
        1 => {
            run.quiet(args).await;
            chat_flood(args, &mut run).await?
        }
        2 => {
            run.quiet(args).await;
            ping_flood(args, &mut run).await?
        }
        3 => sync_flood(args, &mut run).await?,
        4 => {
            run.quiet(args).await;
            slowloris(args, &mut run).await?
        }
        5 => toggle_flood(args, &mut run).await?,
        6 => dm_flood(args, &mut run).await?,
        7 => {
            run.quiet(args).await;
            connection_flood(args, &mut run).await?
        }
        8 => {
            run.quiet(args).await;
            reconnect_flood(args, &mut run).await?
        }
        _ => bail!("no flood {id}"),
    };
    run.finish(FLOODS[id], args, lines).await
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    if !(0.5..=120.0).contains(&args.secs) || !(0.5..=60.0).contains(&args.quiet_secs) {
        bail!("--secs must be 0.5..=120 and --quiet-secs 0.5..=60");
    }
    let bin = gateway_bin();
    if !bin.is_file() {
        bail!(
            "gateway binary {} not found: cargo build --release -p gateway, then set \
             E2E_RELEASE=1 (or GATEWAY_BIN)",
            bin.display()
        );
    }
    // Flood 7 holds up to 10,000 WebSockets in this process.
    ensure_open_files(15_000)?;
    let ids: Vec<usize> = (0..FLOODS.len())
        .filter(|i| args.only.is_empty() || args.only.contains(&(*i as u32)))
        .collect();
    let header = format!(
        "gateway {} · {} CPU(s) · broker: {} · default limits, authentication on · \
         U sends every 10 ms · quiet {} s, flood {} s, settle {} s",
        bin.display(),
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        if args.embedded {
            "embedded"
        } else {
            "redis-server"
        },
        args.quiet_secs,
        args.secs,
        args.settle_secs
    );
    println!("{header}");
    let mut outcomes = Vec::new();
    for id in ids {
        eprintln!("-- {}", FLOODS[id]);
        match run_flood(&args, id).await {
            Ok(outcome) => {
                for line in &outcome.lines {
                    eprintln!("   {line}");
                }
                outcomes.push(outcome);
            }
            Err(e) => eprintln!("   FAILED: {e:#}"),
        }
    }
    let mut table = Table::new(
        "U's round trip (ms, p50 / p99 / max) quiet vs beside each flood; gateway RSS and Redis used_memory (MiB)",
        &[
            "flood",
            "U quiet",
            "U flood",
            "unanswered",
            "p99 ×",
            "≤ 2×",
            "RSS before/peak/after",
            "Redis before/after",
        ],
    );
    for o in &outcomes {
        table.row(vec![
            o.name.to_string(),
            o.quiet.cell(),
            o.flood.cell(),
            o.flood.lost.to_string(),
            format!("{:.2}", o.ratio()),
            if o.holds() { "yes" } else { "NO" }.to_string(),
            format!("{:.0} / {:.0} / {:.0}", o.rss.0, o.rss.1, o.rss.2),
            o.redis_mib
                .map_or("n/a".into(), |(a, b)| format!("{a:.1} / {b:.1}")),
        ]);
    }
    let section = Section {
        title: "bench_floods".into(),
        lines: vec![header.clone()],
        tables: vec![table],
    };
    println!("\n{}", section.text());
    for o in &outcomes {
        println!("{}", o.name);
        for line in &o.lines {
            println!("  - {line}");
        }
    }
    if let Some(path) = &args.markdown {
        let mut md = section.markdown();
        for o in &outcomes {
            md.push_str(&format!("\n**{}**\n\n", o.name));
            for line in &o.lines {
                md.push_str(&format!("- {line}\n"));
            }
        }
        std::fs::write(path, md).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}
