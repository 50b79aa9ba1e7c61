//! The scenarios: one process's share of the connections, driven through the phases
//! connect → (ready, go) → run → drain → stop.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use futures_util::{SinkExt, StreamExt};
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tokio::sync::{watch, Notify, Semaphore};
use tokio_tungstenite::tungstenite::Message;

use crate::conn::{self, encode_content, parse_content, SeqKind, SeqTrack, Target, Ws};
use crate::stats::{now_us, Stats};
use e2e::wire::{self, Frame};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Idle,
    Bigroom,
    Rooms,
    Churn,
    Reliable,
    Ceiling,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Idle => "idle",
            Kind::Bigroom => "bigroom",
            Kind::Rooms => "rooms",
            Kind::Churn => "churn",
            Kind::Reliable => "reliable",
            Kind::Ceiling => "ceiling",
        }
    }
}

/// Everything a scenario needs to know (the same in every worker process).
#[derive(Debug, Clone, Serialize)]
pub struct Spec {
    pub kind: Kind,
    /// What the targets speak.
    pub proto: conn::Proto,
    pub connections: usize,
    pub duration_s: f64,
    pub connect_rate: f64,
    pub source_addrs: usize,
    pub size: usize,
    pub heartbeat_s: f64,
    pub drain_s: f64,
    pub seed: u64,
    /// Chat messages per second over all senders; 0 = closed loop (bigroom only).
    pub rate: f64,
    pub senders: usize,
    pub window: u64,
    pub room_min: usize,
    pub room_max: usize,
    pub senders_per_room: usize,
    pub ack: bool,
    pub ack_every: u64,
    pub reconnect_every_s: f64,
    pub churn_rooms: usize,
    pub churn_messages: u64,
    pub pause_ms: u64,
    pub login: bool,
    pub room_size: usize,
    /// Unique per run (shared by its workers): prefixes user ids and clientMsgIds, so that a
    /// run never collides with the gateway's stored ack positions or dedup window of another.
    pub tag: String,
    /// Signs a login token per user when the gateway requires authentication (never written
    /// to results).
    #[serde(skip)]
    pub jwt_secret: Option<String>,
}

/// A process's position among the worker processes.
#[derive(Debug, Clone, Copy)]
pub struct Slice {
    pub index: usize,
    pub count: usize,
}

#[derive(Debug, Clone)]
struct ConnSpec {
    index: usize,
    target: usize,
    room: usize,
    /// Global sender id when this connection sends chat.
    sender: Option<u64>,
    probe: Option<usize>,
}

/// A room of this process, with the counters needed for the expected-delivery count.
struct Room {
    name: String,
    joined: AtomicU64,
    sent: AtomicU64,
    rejected: AtomicU64,
}

const CONNECT: u8 = 0;
const RUN: u8 = 1;
const DRAIN: u8 = 2;
const STOP: u8 = 3;

struct Ctx {
    spec: Spec,
    stats: Stats,
    targets: Vec<Target>,
    sources: Vec<IpAddr>,
    rooms: Vec<Room>,
    phase: watch::Receiver<u8>,
    start: std::sync::OnceLock<Instant>,
    /// Connections that finished their first login (or connect, without login) or failed.
    settled: AtomicUsize,
    joined: AtomicU64,
    /// Per-sender rate (messages/s) in open-loop mode.
    sender_rate: f64,
    /// Closed loop: highest seq seen by each probe, per sender id.
    probe_seen: Vec<Vec<AtomicU64>>,
    notify: Vec<Notify>,
}

/// The room layout of rooms/reliable/idle: sizes in [min, max], deterministic from the seed.
fn room_sizes(spec: &Spec) -> Vec<usize> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(spec.seed);
    let mut sizes = Vec::new();
    let mut left = spec.connections;
    while left > 0 {
        let s = if spec.room_max > spec.room_min {
            rng.random_range(spec.room_min..=spec.room_max)
        } else {
            spec.room_min.max(1)
        };
        let s = s.min(left);
        sizes.push(s);
        left -= s;
    }
    sizes
}

fn plan(spec: &Spec, slice: Slice, targets: usize) -> (Vec<ConnSpec>, Vec<String>) {
    let n = spec.connections;
    let lo = n * slice.index / slice.count;
    let hi = n * (slice.index + 1) / slice.count;
    let mut conns = Vec::new();
    let mut rooms = Vec::new();
    match spec.kind {
        Kind::Bigroom | Kind::Ceiling => {
            rooms.push("big".to_string());
            for i in lo..hi {
                let sender = (spec.kind == Kind::Bigroom && i < spec.senders).then_some(i as u64);
                conns.push(ConnSpec {
                    index: i,
                    target: i % targets,
                    room: 0,
                    sender,
                    probe: None,
                });
            }
            if spec.kind == Kind::Bigroom && spec.rate <= 0.0 {
                // Probes for the closed loop: the last non-sender member on each target.
                let mut next = 0;
                for t in 0..targets {
                    if let Some(c) = conns
                        .iter_mut()
                        .rev()
                        .find(|c| c.target == t && c.sender.is_none() && c.probe.is_none())
                    {
                        c.probe = Some(next);
                        next += 1;
                    }
                }
            }
        }
        Kind::Churn => {
            for i in lo..hi {
                conns.push(ConnSpec {
                    index: i,
                    target: i % targets,
                    room: 0,
                    sender: Some(i as u64),
                    probe: None,
                });
            }
        }
        Kind::Idle | Kind::Rooms | Kind::Reliable => {
            let sizes = if spec.kind == Kind::Idle {
                vec![spec.room_size.max(1); n.div_ceil(spec.room_size.max(1))]
            } else {
                room_sizes(spec)
            };
            let mut first = 0;
            for (k, size) in sizes.iter().enumerate() {
                let size = (*size).min(n - first);
                let owner = first * slice.count / n.max(1);
                if owner == slice.index {
                    let local = rooms.len();
                    rooms.push(format!("r{k}"));
                    for m in 0..size {
                        let i = first + m;
                        let sender = (spec.kind != Kind::Idle && m < spec.senders_per_room)
                            .then_some(i as u64);
                        conns.push(ConnSpec {
                            index: i,
                            target: i % targets,
                            room: local,
                            sender,
                            probe: None,
                        });
                    }
                }
                first += size;
                if first >= n {
                    break;
                }
            }
        }
    }
    (conns, rooms)
}

/// How the process reports progress and waits for the start signal.
pub trait Control: Send + Sync {
    fn progress(&self, stats: &Stats, elapsed: f64);
    /// Called when every connection is in (or failed); returns when the run may start.
    fn ready(&self) -> impl std::future::Future<Output = ()> + Send;
    /// Called when the drain is over, before the connections close.
    fn drained(&self) {}
}

/// Runs this process's share; returns its report.
pub async fn run(
    spec: Spec,
    targets: Vec<Target>,
    slice: Slice,
    control: &impl Control,
) -> Result<crate::stats::Report> {
    let (conns, room_names) = plan(&spec, slice, targets.len());
    let (phase_tx, phase_rx) = watch::channel(CONNECT);
    let ctx = new_ctx(&spec, slice, targets, room_names, &conns, phase_rx);
    let started_us = now_us();
    let t0 = Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    ticker.tick().await;
    let mut check = tokio::time::interval(Duration::from_millis(10));
    let mut clock = Clock {
        t0,
        ticker: &mut ticker,
        check: &mut check,
    };
    let mut tasks = connect_phase(&ctx, conns, slice, control, &mut clock).await;
    let connect_phase_s = t0.elapsed().as_secs_f64();
    control.ready().await;
    let cpu_at_run = e2e::procfs::cpu_seconds("self");
    let phase_s = run_phase(&ctx, &phase_tx, control, &mut clock).await;
    drain_phase(&ctx, &phase_tx).await;
    control.drained();
    control.progress(&ctx.stats, t0.elapsed().as_secs_f64());
    stop(&phase_tx, &mut tasks).await;

    let mut report = ctx.stats.report(spec.kind.name());
    report.workers = 1;
    report.started_us = started_us;
    report.finished_us = now_us();
    report.phase_s = phase_s;
    report.connect_phase_s = connect_phase_s;
    report.joined = ctx.joined.load(Relaxed);
    report.expected = local_expected(&ctx);
    let cpu_now = e2e::procfs::cpu_seconds("self");
    report.cpu_s = cpu_now - cpu_at_run;
    report.cpu_total_s = cpu_now;
    report.rss_kib = e2e::procfs::status_kib("self", "VmHWM:").unwrap_or(0);
    report.settings = serde_json::to_value(&spec)?;
    Ok(report)
}

/// The run's clock: its start, the progress ticker (every second) and the check interval
/// (every 10 ms) the phases wake up on.
struct Clock<'a> {
    t0: Instant,
    ticker: &'a mut tokio::time::Interval,
    check: &'a mut tokio::time::Interval,
}

/// The shared context of this process's connections: rooms, the per-sender rate of the open
/// loop, and the closed loop's probe counters and notifications.
fn new_ctx(
    spec: &Spec,
    slice: Slice,
    targets: Vec<Target>,
    room_names: Vec<String>,
    conns: &[ConnSpec],
    phase_rx: watch::Receiver<u8>,
) -> Arc<Ctx> {
    let senders_total = match spec.kind {
        Kind::Bigroom => spec.senders.min(spec.connections),
        Kind::Rooms | Kind::Reliable => {
            let sizes = room_sizes(spec);
            sizes.iter().map(|s| (*s).min(spec.senders_per_room)).sum()
        }
        _ => 0,
    };
    let sender_rate = if senders_total > 0 {
        spec.rate / senders_total as f64
    } else {
        0.0
    };
    let probes = conns.iter().filter(|c| c.probe.is_some()).count();
    let closed_senders = if spec.kind == Kind::Bigroom && spec.rate <= 0.0 {
        spec.senders
    } else {
        0
    };
    Arc::new(Ctx {
        stats: Stats::default(),
        sources: conn::source_addrs(slice.index * spec.source_addrs, spec.source_addrs),
        targets,
        rooms: room_names
            .into_iter()
            .map(|name| Room {
                name,
                joined: AtomicU64::new(0),
                sent: AtomicU64::new(0),
                rejected: AtomicU64::new(0),
            })
            .collect(),
        phase: phase_rx,
        start: std::sync::OnceLock::new(),
        settled: AtomicUsize::new(0),
        joined: AtomicU64::new(0),
        sender_rate,
        probe_seen: (0..probes)
            .map(|_| (0..closed_senders).map(|_| AtomicU64::new(0)).collect())
            .collect(),
        notify: (0..closed_senders).map(|_| Notify::new()).collect(),
        spec: spec.clone(),
    })
}

/// Connect phase: opens the connections at the process's share of the connect rate (at most
/// 512 handshakes at once) until every one is in or failed, or the deadline passes; churn only
/// starts its slots (they connect in the run phase). Returns the connections' tasks.
async fn connect_phase(
    ctx: &Arc<Ctx>,
    conns: Vec<ConnSpec>,
    slice: Slice,
    control: &impl Control,
    clock: &mut Clock<'_>,
) -> tokio::task::JoinSet<()> {
    let total = conns.len();
    let handshake = Arc::new(Semaphore::new(512));
    let per_process_rate = (ctx.spec.connect_rate / slice.count as f64).max(1.0);
    let spawner = {
        let ctx = ctx.clone();
        async move {
            let mut tasks = tokio::task::JoinSet::new();
            let begin = Instant::now();
            for (k, c) in conns.into_iter().enumerate() {
                let due = begin + Duration::from_secs_f64(k as f64 / per_process_rate);
                tokio::time::sleep_until(due.into()).await;
                let ctx = ctx.clone();
                if ctx.spec.kind == Kind::Churn {
                    tasks.spawn(churn_slot(ctx, c));
                } else {
                    let permit = handshake.clone().acquire_owned().await.expect("semaphore");
                    tasks.spawn(conn_task(ctx, c, Some(permit)));
                }
            }
            tasks
        }
    };
    let mut spawn_fut = Box::pin(spawner);
    let connect_deadline =
        Instant::now() + Duration::from_secs_f64(30.0 + total as f64 / per_process_rate);
    let mut tasks = None;
    loop {
        tokio::select! {
            joined = &mut spawn_fut, if tasks.is_none() => {
                tasks = Some(joined);
            }
            _ = clock.ticker.tick() => {
                control.progress(&ctx.stats, clock.t0.elapsed().as_secs_f64());
            }
            _ = clock.check.tick() => {}
        }
        if tasks.is_some() && (ctx.settled.load(Relaxed) >= total || ctx.spec.kind == Kind::Churn) {
            break;
        }
        if Instant::now() > connect_deadline {
            eprintln!("loadgen: connect phase timed out; going on with what is connected");
            break;
        }
    }
    match tasks {
        Some(tasks) => tasks,
        None => spawn_fut.await,
    }
}

/// Run phase: starts every connection's part and waits for the duration (the raw ceiling
/// ends early once its server closed every connection). Returns its length in seconds.
async fn run_phase(
    ctx: &Ctx,
    phase_tx: &watch::Sender<u8>,
    control: &impl Control,
    clock: &mut Clock<'_>,
) -> f64 {
    let run_start = Instant::now();
    let _ = ctx.start.set(run_start);
    let _ = phase_tx.send(RUN);
    let end = run_start + Duration::from_secs_f64(ctx.spec.duration_s);
    while Instant::now() < end {
        if ctx.spec.kind == Kind::Ceiling
            && ctx.stats.open.load(Relaxed) == 0
            && ctx.stats.delivered.load(Relaxed) > 0
        {
            break;
        }
        tokio::select! {
            _ = clock.check.tick() => {}
            _ = clock.ticker.tick() => control.progress(&ctx.stats, clock.t0.elapsed().as_secs_f64()),
            _ = tokio::time::sleep_until(end.into()) => {}
        }
    }
    run_start.elapsed().as_secs_f64()
}

/// Drain: no new sends; waits (at most `drain_s`) until deliveries stop for a second or reach
/// what is expected, and churn's connections are closed.
async fn drain_phase(ctx: &Ctx, phase_tx: &watch::Sender<u8>) {
    let _ = phase_tx.send(DRAIN);
    let drain_end = Instant::now() + Duration::from_secs_f64(ctx.spec.drain_s);
    let mut quiet_since = Instant::now();
    let mut seen = ctx.stats.delivered.load(Relaxed);
    while Instant::now() < drain_end {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = ctx.stats.delivered.load(Relaxed);
        if now != seen {
            seen = now;
            quiet_since = Instant::now();
        }
        let expected = local_expected(ctx);
        let done_expected = expected > 0 && ctx.stats.distinct.load(Relaxed) >= expected;
        let churn_busy = ctx.spec.kind == Kind::Churn && ctx.stats.open.load(Relaxed) > 0;
        if !churn_busy && (done_expected || quiet_since.elapsed() > Duration::from_millis(1000)) {
            break;
        }
    }
}

/// Stop: every connection closes; the tasks get 10 s to end, then are aborted.
async fn stop(phase_tx: &watch::Sender<u8>, tasks: &mut tokio::task::JoinSet<()>) {
    let _ = phase_tx.send(STOP);
    let close_deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while tokio::time::timeout_at(close_deadline, tasks.join_next())
        .await
        .ok()
        .flatten()
        .is_some()
    {}
    tasks.abort_all();
}

/// What this process can compute of the expected deliveries (bigroom is completed after the
/// worker reports are merged).
fn local_expected(ctx: &Ctx) -> u64 {
    match ctx.spec.kind {
        Kind::Bigroom => {
            let s = &ctx.stats;
            if ctx.spec.senders <= ctx.spec.connections && ctx.rooms.len() == 1 {
                let sent = ctx.rooms[0].sent.load(Relaxed);
                let rej = ctx.rooms[0].rejected.load(Relaxed);
                // Only exact when the senders live in this process (single process runs).
                if sent > 0 {
                    return ctx.joined.load(Relaxed) * sent.saturating_sub(rej);
                }
            }
            let _ = s;
            0
        }
        Kind::Rooms | Kind::Reliable => ctx
            .rooms
            .iter()
            .map(|r| {
                r.joined.load(Relaxed)
                    * r.sent
                        .load(Relaxed)
                        .saturating_sub(r.rejected.load(Relaxed))
            })
            .sum(),
        Kind::Churn => ctx
            .stats
            .sent
            .load(Relaxed)
            .saturating_sub(ctx.stats.rejected.load(Relaxed)),
        Kind::Idle | Kind::Ceiling => 0,
    }
}

/// Per-connection state that survives reconnects.
#[derive(Default)]
struct ConnState {
    tracks: HashMap<u64, SeqTrack>,
    last_id: Option<String>,
    acked_id: Option<String>,
    unacked: u64,
    seq: u64,
    echo_max: u64,
    joined_once: bool,
    in_replay: bool,
}

enum Outcome {
    Done,
    Reconnect,
    Failed,
}

fn user_id(tag: &str, i: usize) -> String {
    format!("{tag}-u{i}")
}

async fn conn_task(
    ctx: Arc<Ctx>,
    spec: ConnSpec,
    mut permit: Option<tokio::sync::OwnedSemaphorePermit>,
) {
    let mut st = ConnState::default();
    let mut target = spec.target;
    let mut resume = false;
    let mut failures = 0u32;
    loop {
        let t = Instant::now();
        let source = (!ctx.sources.is_empty()).then(|| ctx.sources[spec.index % ctx.sources.len()]);
        let ws = match conn::connect(
            &ctx.targets[target],
            ctx.spec.proto,
            source,
            Duration::from_secs(15),
        )
        .await
        {
            Ok(ws) => ws,
            Err(e) => {
                Stats::add(&ctx.stats.connect_errors, 1);
                ctx.stats.error(&format!("connect: {}", short_err(&e)));
                failures += 1;
                let retry = ctx.spec.kind == Kind::Reliable
                    && st.joined_once
                    && *ctx.phase.borrow() < STOP
                    && failures < 50;
                if retry {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    target = (target + 1) % ctx.targets.len();
                    continue;
                }
                if !st.joined_once {
                    ctx.settled.fetch_add(1, Relaxed);
                }
                return;
            }
        };
        ctx.stats.opened(t.elapsed().as_micros() as u64);
        let outcome = session(&ctx, &spec, &mut st, ws, resume, &mut permit).await;
        ctx.stats.closed();
        match outcome {
            Outcome::Done => return,
            Outcome::Failed => {
                if !st.joined_once {
                    ctx.settled.fetch_add(1, Relaxed);
                }
                return;
            }
            Outcome::Reconnect => {
                if *ctx.phase.borrow() >= STOP {
                    return;
                }
                Stats::add(&ctx.stats.reconnects, 1);
                resume = true;
                target = (target + 1) % ctx.targets.len();
            }
        }
    }
}

fn short_err(e: &anyhow::Error) -> String {
    let s = e.to_string();
    let s = s.split(" (os error").next().unwrap_or(&s).to_string();
    s.chars().take(60).collect()
}

enum Step {
    Continue,
    Closed,
}

/// Handles one text frame.
fn on_frame(ctx: &Ctx, spec: &ConnSpec, st: &mut ConnState, text: &str, now: u64) -> FrameInfo {
    let mut info = FrameInfo::default();
    let frame = match Frame::parse(text) {
        Ok(f) => f,
        Err(_) => {
            ctx.stats.error("unparsable_frame");
            return info;
        }
    };
    match frame.event.as_deref() {
        Some("message") | None => {
            let Some((t, s, q)) = frame.content.as_deref().and_then(parse_content) else {
                return info;
            };
            if let Some(id) = frame.id {
                if ctx.spec.ack {
                    st.unacked += 1;
                }
                st.last_id = Some(id.into_owned());
            }
            if st.in_replay {
                Stats::add(&ctx.stats.replayed, 1);
                ctx.stats.delivered.fetch_add(1, Relaxed);
            } else {
                ctx.stats.delivery(spec.index, t, now, text.len());
            }
            let kind = st.tracks.entry(s).or_default().record(q);
            let counted = ctx.spec.kind != Kind::Churn || Some(s) == spec.sender;
            match kind {
                SeqKind::New if counted => Stats::add(&ctx.stats.distinct, 1),
                SeqKind::OutOfOrder => {
                    Stats::add(&ctx.stats.out_of_order, 1);
                    if counted {
                        Stats::add(&ctx.stats.distinct, 1);
                    }
                }
                SeqKind::Duplicate => Stats::add(&ctx.stats.duplicates, 1),
                _ => {}
            }
            if Some(s) == spec.sender {
                Stats::add(&ctx.stats.own_echoes, 1);
                st.echo_max = st.echo_max.max(q);
            }
            if let Some(p) = spec.probe {
                if let Some(cell) = ctx.probe_seen.get(p).and_then(|v| v.get(s as usize)) {
                    cell.fetch_max(q, Relaxed);
                    ctx.notify[s as usize].notify_one();
                }
            }
        }
        Some("login") | Some("logout") => {
            Stats::add(&ctx.stats.presence_frames, 1);
            if frame.event.as_deref() == Some("login")
                && frame.user_id.as_deref() == Some(user_id(&ctx.spec.tag, spec.index).as_str())
            {
                info.own_login = true;
            }
        }
        Some("error") => {
            let code = frame.code.as_deref().unwrap_or("?");
            ctx.stats.error(code);
            if let Some(cid) = frame.client_msg_id.as_deref() {
                if cid.starts_with("c-") {
                    Stats::add(&ctx.stats.rejected, 1);
                    if let Some(room) = ctx.rooms.get(spec.room) {
                        Stats::add(&room.rejected, 1);
                    }
                    // A refused message will never echo: do not wait for it.
                    if let Some(q) = cid.rsplit('-').next().and_then(|q| q.parse::<u64>().ok()) {
                        st.echo_max = st.echo_max.max(q);
                    }
                }
            }
        }
        Some("sent") if frame.duplicate == Some(true) => ctx.stats.error("sent_duplicate"),
        Some("synced") if frame.dm == Some(true) => {}
        Some("synced") => {
            st.in_replay = false;
            if frame.truncated == Some(true) {
                Stats::add(&ctx.stats.truncated, 1);
            }
            if frame.more == Some(true) {
                info.sync_more = frame.last_id.map(|s| s.into_owned());
                st.in_replay = true;
            }
        }
        _ => {}
    }
    info
}

#[derive(Default)]
struct FrameInfo {
    own_login: bool,
    sync_more: Option<String>,
}

/// Reads one message from the socket and handles it.
fn on_message(
    ctx: &Ctx,
    spec: &ConnSpec,
    st: &mut ConnState,
    msg: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>,
    stopping: bool,
) -> (Step, FrameInfo) {
    match msg {
        Some(Ok(Message::Text(text))) => (Step::Continue, on_frame(ctx, spec, st, &text, now_us())),
        Some(Ok(Message::Close(frame))) => {
            let code = wire::close_code(frame.as_ref());
            ctx.stats.close_code(&code.to_string());
            if !stopping {
                Stats::add(&ctx.stats.unexpected_closes, 1);
            }
            (Step::Closed, FrameInfo::default())
        }
        Some(Ok(_)) => (Step::Continue, FrameInfo::default()),
        Some(Err(e)) => {
            if !stopping {
                ctx.stats.close_code("error");
                ctx.stats.error(&format!("ws: {}", short_err(&e.into())));
                Stats::add(&ctx.stats.unexpected_closes, 1);
            }
            (Step::Closed, FrameInfo::default())
        }
        None => {
            if !stopping {
                ctx.stats.close_code("eof");
                Stats::add(&ctx.stats.unexpected_closes, 1);
            }
            (Step::Closed, FrameInfo::default())
        }
    }
}

fn login_frame(ctx: &Ctx, spec: &ConnSpec, room: &str, resume_from: Option<&str>) -> String {
    let user = user_id(&ctx.spec.tag, spec.index);
    let mut login = wire::Login::new(&user, room)
        .name(format!("user {}", spec.index))
        .ack(ctx.spec.ack)
        .last_id(resume_from);
    if let Some(secret) = &ctx.spec.jwt_secret {
        login = login.token(login_token(secret, &user, ctx.spec.duration_s));
    }
    login.text()
}

/// An HS256 token for `user`, valid for the run plus an hour.
fn login_token(secret: &str, user: &str, duration_s: f64) -> String {
    let exp = now_us() / 1_000_000 + duration_s as u64 + 3600;
    let claims = serde_json::json!({"sub": user, "exp": exp});
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("HS256 signing cannot fail")
}

fn chat_frame(ctx: &Ctx, room: &str, sender: u64, seq: u64) -> String {
    let content = encode_content(now_us(), sender, seq, ctx.spec.size);
    let tag = &ctx.spec.tag;
    wire::message_raw(room, content, Some(format_args!("c-{tag}-{sender}-{seq}")))
}

async fn send_text(ctx: &Ctx, ws: &mut Ws, text: String) -> bool {
    match ws.send(Message::text(text)).await {
        Ok(()) => true,
        Err(_) => {
            Stats::add(&ctx.stats.send_errors, 1);
            false
        }
    }
}

fn jitter(base: f64) -> Duration {
    Duration::from_secs_f64(base * rand::rng().random_range(0.5..1.5))
}

/// One connection from its login to its end (or to a reconnect): logs in (every scenario but
/// the raw ceiling), counts the join, then drives the scenario's part (`drive`).
async fn session(
    ctx: &Arc<Ctx>,
    spec: &ConnSpec,
    st: &mut ConnState,
    mut ws: Ws,
    resume: bool,
    permit: &mut Option<tokio::sync::OwnedSemaphorePermit>,
) -> Outcome {
    let room = ctx
        .rooms
        .get(spec.room)
        .map(|r| r.name.clone())
        .unwrap_or_default();
    let login = ctx.spec.login && ctx.spec.kind != Kind::Ceiling;
    if login {
        if let Err(outcome) = log_in(ctx, spec, st, &mut ws, &room, resume).await {
            return outcome;
        }
    }
    count_join(ctx, spec, st);
    permit.take();
    drive(ctx, spec, st, ws, &room).await
}

/// Sends the login (resuming from the last id seen after a reconnect) and reads until the
/// connection's own login frame, asking for more of the replay as the gateway offers it.
/// A failure is a reconnect when resuming, else the connection's end.
async fn log_in(
    ctx: &Ctx,
    spec: &ConnSpec,
    st: &mut ConnState,
    ws: &mut Ws,
    room: &str,
    resume: bool,
) -> Result<(), Outcome> {
    let failed = || {
        if resume {
            Outcome::Reconnect
        } else {
            Outcome::Failed
        }
    };
    let from = if resume { st.last_id.clone() } else { None };
    st.in_replay = from.is_some();
    if !send_text(ctx, ws, login_frame(ctx, spec, room, from.as_deref())).await {
        return Err(Outcome::Failed);
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let msg = match tokio::time::timeout_at(deadline, ws.next()).await {
            Ok(m) => m,
            Err(_) => {
                ctx.stats.error("login_timeout");
                return Err(failed());
            }
        };
        let (step, info) = on_message(ctx, spec, st, msg, false);
        if let Step::Closed = step {
            return Err(failed());
        }
        if let Some(since) = info.sync_more {
            let _ = send_text(ctx, ws, wire::sync(room, &since, None).to_string()).await;
        }
        if info.own_login {
            return Ok(());
        }
    }
}

/// The first time a connection is in, it counts as joined (in its room too) and settled.
fn count_join(ctx: &Ctx, spec: &ConnSpec, st: &mut ConnState) {
    if !st.joined_once {
        st.joined_once = true;
        ctx.joined.fetch_add(1, Relaxed);
        if let Some(r) = ctx.rooms.get(spec.room) {
            Stats::add(&r.joined, 1);
        }
        ctx.settled.fetch_add(1, Relaxed);
    }
}

/// How a logged-in connection takes part in its scenario.
struct Part {
    /// A sender of the saturated big room (bigroom at rate 0): keeps `window` messages in
    /// flight (`send_window`).
    closed_loop: bool,
    /// A sender of rooms, reliable, or bigroom at a rate: sends what falls due at the
    /// sender rate (`send_due`).
    open_loop: bool,
    /// A receiving member of reliable: drops its connection at this time (then reconnects).
    reconnect_at: Option<tokio::time::Instant>,
    /// The closed-loop sender's index into `Ctx::notify` and the probes' `probe_seen`.
    notify_idx: Option<usize>,
}

/// Which part of its scenario the connection plays.
fn part(ctx: &Ctx, spec: &ConnSpec) -> Part {
    let closed_loop =
        spec.sender.is_some() && ctx.spec.kind == Kind::Bigroom && ctx.spec.rate <= 0.0;
    let open_loop = spec.sender.is_some() && !closed_loop && ctx.sender_rate > 0.0;
    Part {
        closed_loop,
        open_loop,
        reconnect_at: None,
        notify_idx: spec
            .sender
            .map(|s| s as usize)
            .filter(|s| *s < ctx.notify.len()),
    }
}

/// The logged-in connection until the end of the run: reads every frame (acking as the
/// scenario asks), heartbeats, sends its part (closed or open loop), and for reliable's
/// receivers, drops the connection at a random time to reconnect.
async fn drive(
    ctx: &Arc<Ctx>,
    spec: &ConnSpec,
    st: &mut ConnState,
    mut ws: Ws,
    room: &str,
) -> Outcome {
    let mut phase = ctx.phase.clone();
    let mut heartbeat = (ctx.spec.heartbeat_s > 0.0).then(|| {
        let first = tokio::time::Instant::now() + jitter(ctx.spec.heartbeat_s);
        tokio::time::interval_at(first, Duration::from_secs_f64(ctx.spec.heartbeat_s))
    });
    let mut part = part(ctx, spec);
    let tick_period = if part.open_loop {
        Duration::from_secs_f64((1.0 / ctx.sender_rate).clamp(0.001, 0.1))
    } else {
        Duration::from_secs(3600)
    };
    let mut send_tick = tokio::time::interval(tick_period);
    send_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // A random phase so that senders do not fire together.
    let offset = rand::rng().random_range(0.0..1.0) / ctx.sender_rate.max(1e-9);
    let mut ack_tick = tokio::time::interval(Duration::from_millis(100));
    // Only receiving members drop their connections; senders stay (their messages are the
    // reference for what every member must get).
    part.reconnect_at = (ctx.spec.kind == Kind::Reliable
        && ctx.spec.reconnect_every_s > 0.0
        && spec.sender.is_none())
    .then(|| tokio::time::Instant::now() + jitter(ctx.spec.reconnect_every_s));

    loop {
        let ph = *phase.borrow_and_update();
        if ph >= STOP {
            let _ = tokio::time::timeout(Duration::from_millis(500), ws.close(None)).await;
            return Outcome::Done;
        }
        let running = ph == RUN;
        if part.closed_loop && running && !send_window(ctx, spec, st, &mut ws, room, &part).await {
            return Outcome::Failed;
        }
        let notified = async {
            match part.notify_idx {
                Some(i) if part.closed_loop && running => ctx.notify[i].notified().await,
                _ => std::future::pending().await,
            }
        };
        let heartbeat_tick = async {
            match heartbeat.as_mut() {
                Some(h) => {
                    h.tick().await;
                }
                None => std::future::pending().await,
            }
        };
        let reconnect = async {
            match part.reconnect_at {
                Some(at) if running => tokio::time::sleep_until(at).await,
                _ => std::future::pending().await,
            }
        };
        tokio::select! {
            msg = ws.next() => {
                if let Some(outcome) = on_read(ctx, spec, st, &mut ws, room, msg, ph).await {
                    return outcome;
                }
            }
            _ = phase.changed() => {}
            _ = notified => {}
            _ = send_tick.tick(), if part.open_loop && running => {
                if let Some(outcome) = send_due(ctx, spec, st, &mut ws, room, offset).await {
                    return outcome;
                }
            }
            _ = ack_tick.tick(), if ctx.spec.ack => {
                if st.unacked > 0 && !send_ack(ctx, &mut ws, st, room).await {
                    return Outcome::Reconnect;
                }
            }
            _ = heartbeat_tick => {
                if !send_text(ctx, &mut ws, wire::HEARTBEAT.into()).await {
                    return Outcome::Failed;
                }
            }
            _ = reconnect => {
                // Abrupt: drop the socket without a close frame, like a lost network.
                return Outcome::Reconnect;
            }
        }
    }
}

/// A frame (or the end) read in the run: handled, then the sync the gateway offers and the
/// ack the scenario asks for. Returns how the session ends, if it does.
async fn on_read(
    ctx: &Ctx,
    spec: &ConnSpec,
    st: &mut ConnState,
    ws: &mut Ws,
    room: &str,
    msg: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>,
    ph: u8,
) -> Option<Outcome> {
    let stopping = ph >= DRAIN || ctx.spec.kind == Kind::Ceiling;
    let (step, info) = on_message(ctx, spec, st, msg, stopping);
    if let Step::Closed = step {
        return Some(if ctx.spec.kind == Kind::Reliable && ph < STOP {
            Outcome::Reconnect
        } else {
            Outcome::Done
        });
    }
    if let Some(since) = info.sync_more {
        if !send_text(ctx, ws, wire::sync(room, &since, None).to_string()).await {
            return Some(Outcome::Reconnect);
        }
    }
    if ctx.spec.ack && st.unacked >= ctx.spec.ack_every && !send_ack(ctx, ws, st, room).await {
        return Some(Outcome::Reconnect);
    }
    None
}

/// The saturated big room's sender: sends (at most 64 at a time) while fewer than `window`
/// of its messages are unseen by its own echo or by the slowest probe. False when a send
/// fails.
async fn send_window(
    ctx: &Ctx,
    spec: &ConnSpec,
    st: &mut ConnState,
    ws: &mut Ws,
    room: &str,
    part: &Part,
) -> bool {
    let window = ctx.spec.window.max(1);
    let mut min_seen = st.echo_max;
    if let Some(s) = part.notify_idx {
        for p in &ctx.probe_seen {
            min_seen = min_seen.min(p[s].load(Relaxed));
        }
    }
    let mut burst = 0;
    while st.seq - min_seen.min(st.seq) < window && burst < 64 {
        st.seq += 1;
        burst += 1;
        let f = chat_frame(ctx, room, spec.sender.unwrap_or(0), st.seq);
        if !send_text(ctx, ws, f).await {
            return false;
        }
        Stats::add(&ctx.stats.sent, 1);
        if let Some(r) = ctx.rooms.get(spec.room) {
            Stats::add(&r.sent, 1);
        }
    }
    true
}

/// An open-loop sender (rooms, reliable, bigroom at a rate): sends every message due at the
/// sender rate since the run started (at most 1000 at a time), `offset` seconds late. Returns
/// how the session ends when a send fails (reliable reconnects).
async fn send_due(
    ctx: &Ctx,
    spec: &ConnSpec,
    st: &mut ConnState,
    ws: &mut Ws,
    room: &str,
    offset: f64,
) -> Option<Outcome> {
    let start = ctx.start.get()?;
    let elapsed = start.elapsed().as_secs_f64() - offset;
    if elapsed < 0.0 {
        return None;
    }
    let due = (elapsed * ctx.sender_rate) as u64 + 1;
    let mut burst = 0;
    while st.seq < due && burst < 1000 {
        st.seq += 1;
        burst += 1;
        let f = chat_frame(ctx, room, spec.sender.unwrap_or(0), st.seq);
        if !send_text(ctx, ws, f).await {
            return Some(if ctx.spec.kind == Kind::Reliable {
                Outcome::Reconnect
            } else {
                Outcome::Failed
            });
        }
        Stats::add(&ctx.stats.sent, 1);
        if let Some(r) = ctx.rooms.get(spec.room) {
            Stats::add(&r.sent, 1);
        }
    }
    None
}

async fn send_ack(ctx: &Ctx, ws: &mut Ws, st: &mut ConnState, room: &str) -> bool {
    let Some(id) = st.last_id.clone() else {
        return true;
    };
    if st.acked_id.as_deref() == Some(id.as_str()) {
        st.unacked = 0;
        return true;
    }
    if !send_text(ctx, ws, wire::ack(room, &id).to_string()).await {
        return false;
    }
    Stats::add(&ctx.stats.acks_sent, 1);
    st.acked_id = Some(id);
    st.unacked = 0;
    true
}

/// Churn: connect, login, chat, wait for the own echoes, logout, close; again until the end.
async fn churn_slot(ctx: Arc<Ctx>, spec: ConnSpec) {
    let mut phase = ctx.phase.clone();
    // Wait for the run phase.
    while *phase.borrow_and_update() < RUN {
        if phase.changed().await.is_err() {
            return;
        }
    }
    let mut st = ConnState::default();
    let sender = spec.sender.unwrap_or(spec.index as u64);
    let mut target = spec.target;
    let mut cycle = 0usize;
    while *ctx.phase.borrow() == RUN {
        let t = Instant::now();
        let source = (!ctx.sources.is_empty())
            .then(|| ctx.sources[(spec.index + cycle) % ctx.sources.len()]);
        cycle += 1;
        let mut ws = match conn::connect(
            &ctx.targets[target],
            ctx.spec.proto,
            source,
            Duration::from_secs(15),
        )
        .await
        {
            Ok(ws) => ws,
            Err(e) => {
                Stats::add(&ctx.stats.connect_errors, 1);
                ctx.stats.error(&format!("connect: {}", short_err(&e)));
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        target = (target + 1) % ctx.targets.len();
        ctx.stats.opened(t.elapsed().as_micros() as u64);
        let room = format!(
            "c{}",
            rand::rng().random_range(0..ctx.spec.churn_rooms.max(1))
        );
        let ok = churn_cycle(&ctx, &spec, &mut st, &mut ws, &room, sender).await;
        let _ = tokio::time::timeout(Duration::from_millis(1000), ws.close(None)).await;
        // Read until the server's close (or EOF) so that the close handshake completes.
        let _ = tokio::time::timeout(Duration::from_millis(1000), async {
            while let Some(Ok(m)) = ws.next().await {
                if let Message::Close(_) = m {
                    break;
                }
            }
        })
        .await;
        ctx.stats.closed();
        if ok {
            Stats::add(&ctx.stats.cycles, 1);
        }
        if ctx.spec.pause_ms > 0 {
            tokio::time::sleep(Duration::from_millis(ctx.spec.pause_ms)).await;
        }
    }
}

async fn churn_cycle(
    ctx: &Ctx,
    spec: &ConnSpec,
    st: &mut ConnState,
    ws: &mut Ws,
    room: &str,
    sender: u64,
) -> bool {
    st.tracks.clear();
    if !send_text(ctx, ws, login_frame(ctx, spec, room, None)).await {
        return false;
    }
    match wait_until(ctx, spec, st, ws, |_, i| i.own_login).await {
        Ok(true) => {}
        Ok(false) => return false,
        Err(_) => {
            ctx.stats.error("login_timeout");
            return false;
        }
    }
    for _ in 0..ctx.spec.churn_messages {
        st.seq += 1;
        if !send_text(ctx, ws, chat_frame(ctx, room, sender, st.seq)).await {
            return false;
        }
        Stats::add(&ctx.stats.sent, 1);
    }
    let target = st.seq;
    if ctx.spec.churn_messages > 0 && st.echo_max < target {
        match wait_until(ctx, spec, st, ws, |s, _| s.echo_max >= target).await {
            Ok(true) => {}
            Ok(false) => return false,
            Err(_) => {
                ctx.stats.error("echo_timeout");
                return false;
            }
        }
    }
    send_text(ctx, ws, wire::logout(room).to_string()).await
}

/// Reads frames until `until` holds (true), the connection closes (false) or 10 s pass (Err).
async fn wait_until(
    ctx: &Ctx,
    spec: &ConnSpec,
    st: &mut ConnState,
    ws: &mut Ws,
    until: impl Fn(&ConnState, &FrameInfo) -> bool,
) -> Result<bool, tokio::time::error::Elapsed> {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let msg = ws.next().await;
            let (step, info) = on_message(ctx, spec, st, msg, false);
            if let Step::Closed = step {
                return false;
            }
            if until(st, &info) {
                return true;
            }
        }
    })
    .await
}
