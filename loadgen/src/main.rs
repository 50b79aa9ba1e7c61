//! `loadgen`: load generator and benchmark suite for the chat gateway.
//!
//! Safe by construction: it targets loopback addresses (or hosts named with `--allow-host`),
//! holds at most `--connections` connections, runs at most `--duration` seconds (capped at
//! 600) and stops by itself.
#![forbid(unsafe_code)]

mod ceiling;
mod conn;
mod run;
mod socketio;
mod stats;
mod suite;
mod workers;

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::{Args, Parser, Subcommand};

use run::{Kind, Spec};

/// Hard caps that no flag can lift.
pub const MAX_DURATION_S: f64 = 600.0;
pub const MAX_CONNECTIONS: usize = 200_000;

#[derive(Parser)]
#[command(
    name = "loadgen",
    about = "Load generator for the chat gateway",
    version
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Idle connections: connect rate, held connections (log in to rooms: presence on).
    Idle(IdleArgs),
    /// One big room: R members, P messages/s (0 = closed loop, as fast as the window allows).
    Bigroom(BigroomArgs),
    /// Many small chat rooms (10–50 members, a few senders each).
    Rooms(RoomsArgs),
    /// Connect, login, chat, logout, disconnect, in a loop.
    Churn(ChurnArgs),
    /// Acks on, abrupt reconnects with resume; counts loss and duplicates.
    Reliable(ReliableArgs),
    /// Client side of the raw ceiling: read what `ceiling-server` writes.
    Ceiling(CeilingArgs),
    /// The raw ceiling server (plain sockets, pre-built frames, no JSON, no Redis).
    CeilingServer(ceiling::ServerArgs),
    /// The benchmark suite: Redis, gateway nodes, nginx, every scenario, a Markdown report.
    Suite(suite::SuiteArgs),
}

/// Flags shared by every scenario.
#[derive(Args, Clone, Debug)]
pub struct Common {
    /// Target URL(s), ws:// only; repeat the flag or give a comma list. Connections are spread
    /// over them round-robin.
    #[arg(long = "url", required = true)]
    pub urls: Vec<String>,
    /// What the targets speak: the gateway's JSON frames (also the tutorial's server), or
    /// Socket.IO (URLs `ws://host:port/socket.io/?EIO=4&transport=websocket`).
    #[arg(long, value_enum, default_value_t = conn::Proto::Json)]
    pub proto: conn::Proto,
    /// Allow a non-loopback host (by exact name); nothing else is ever loaded.
    #[arg(long)]
    pub allow_host: Vec<String>,
    /// Connections (members, or churn slots).
    #[arg(short = 'c', long, default_value_t = 100)]
    pub connections: usize,
    /// Seconds of the measured phase (hard cap 600).
    #[arg(short = 'd', long, default_value_t = 10.0)]
    pub duration: f64,
    /// New connections per second in the connect phase (over all workers).
    #[arg(long, default_value_t = 2000.0)]
    pub connect_rate: f64,
    /// Worker processes (default: as many as the open-file limit requires).
    #[arg(long)]
    pub workers: Option<usize>,
    /// Source addresses (127.0.0.2, .3, ...) per process, for loopback targets.
    #[arg(long, default_value_t = 1)]
    pub source_addrs: usize,
    /// Bytes of each chat message's content.
    #[arg(long, default_value_t = 100)]
    pub size: usize,
    /// Seconds between heartbeat pings per connection (0 = none).
    #[arg(long, default_value_t = 25.0)]
    pub heartbeat: f64,
    /// Seconds to wait for outstanding deliveries after the last send.
    #[arg(long, default_value_t = 5.0)]
    pub drain: f64,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Write the result as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Create this file once every connection is in (for the suite's memory sampling).
    #[arg(long)]
    pub ready_file: Option<PathBuf>,
    /// Create this file once the drain is over, before the connections close (one process
    /// only: a run of several worker processes creates it when they have all exited).
    #[arg(long)]
    pub drained_file: Option<PathBuf>,
    /// No progress lines.
    #[arg(long)]
    pub quiet: bool,
    /// Log in with HS256 tokens signed with this secret (the gateway's GATEWAY_JWT_SECRET),
    /// one per user, valid for the run plus an hour.
    #[arg(long, env = "GATEWAY_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    #[arg(long, hide = true)]
    pub tag: Option<String>,
    #[arg(long, hide = true)]
    pub worker_index: Option<usize>,
    #[arg(long, hide = true)]
    pub worker_count: Option<usize>,
    #[arg(long, hide = true)]
    pub worker_json: Option<PathBuf>,
}

#[derive(Args)]
struct IdleArgs {
    #[command(flatten)]
    common: Common,
    /// Members per room (each connection logs in to one room).
    #[arg(long, default_value_t = 50)]
    room_size: usize,
    /// Connect only (no login, no presence).
    #[arg(long)]
    no_login: bool,
}

#[derive(Args)]
struct BigroomArgs {
    #[command(flatten)]
    common: Common,
    /// Messages per second over all senders; 0 = closed loop (see --window).
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    /// Members that send (the first ones, spread over the targets).
    #[arg(long, default_value_t = 3)]
    senders: usize,
    /// Closed loop: messages each sender may have in flight (not yet seen by its own
    /// connection and by one probe member per target).
    #[arg(long, default_value_t = 8)]
    window: u64,
}

#[derive(Args)]
struct RoomsArgs {
    #[command(flatten)]
    common: Common,
    /// Messages per second over all rooms.
    #[arg(long, default_value_t = 500.0)]
    rate: f64,
    #[arg(long, default_value_t = 10)]
    room_min: usize,
    #[arg(long, default_value_t = 50)]
    room_max: usize,
    #[arg(long, default_value_t = 3)]
    senders_per_room: usize,
}

#[derive(Args)]
struct ChurnArgs {
    #[command(flatten)]
    common: Common,
    /// Rooms the churning clients pick from.
    #[arg(long, default_value_t = 20)]
    rooms: usize,
    /// Chat messages per cycle.
    #[arg(long, default_value_t = 2)]
    messages: u64,
    /// Pause between cycles of one slot, milliseconds.
    #[arg(long, default_value_t = 0)]
    pause_ms: u64,
}

#[derive(Args)]
struct ReliableArgs {
    #[command(flatten)]
    common: Common,
    #[arg(long, default_value_t = 200.0)]
    rate: f64,
    #[arg(long, default_value_t = 10)]
    room_min: usize,
    #[arg(long, default_value_t = 30)]
    room_max: usize,
    #[arg(long, default_value_t = 2)]
    senders_per_room: usize,
    /// Ack after this many messages (and at least every 100 ms).
    #[arg(long, default_value_t = 20)]
    ack_every: u64,
    /// Mean seconds between abrupt disconnects of each receiving member (0 = none).
    #[arg(long, default_value_t = 3.0)]
    reconnect_every: f64,
}

#[derive(Args)]
struct CeilingArgs {
    #[command(flatten)]
    common: Common,
}

fn base_spec(kind: Kind, c: &Common) -> Spec {
    Spec {
        kind,
        proto: c.proto,
        connections: c.connections,
        duration_s: c.duration,
        connect_rate: c.connect_rate,
        source_addrs: c.source_addrs.max(1),
        size: c.size,
        heartbeat_s: c.heartbeat,
        drain_s: c.drain,
        seed: c.seed,
        rate: 0.0,
        senders: 0,
        window: 8,
        room_min: 1,
        room_max: 1,
        senders_per_room: 0,
        ack: false,
        ack_every: 20,
        reconnect_every_s: 0.0,
        churn_rooms: 1,
        churn_messages: 0,
        pause_ms: 0,
        login: true,
        room_size: 50,
        jwt_secret: c.jwt_secret.clone(),
        tag: c
            .tag
            .clone()
            .unwrap_or_else(|| format!("{:x}", stats::now_us() % (1 << 40))),
    }
}

fn check(c: &Common) -> Result<()> {
    if !(c.duration > 0.0 && c.duration <= MAX_DURATION_S) {
        bail!("--duration must be in (0, {MAX_DURATION_S}] seconds");
    }
    if c.connections == 0 || c.connections > MAX_CONNECTIONS {
        bail!("--connections must be in 1..={MAX_CONNECTIONS}");
    }
    if c.drain < 0.0 || c.drain > 60.0 {
        bail!("--drain must be in [0, 60] seconds");
    }
    if c.source_addrs > 200 {
        bail!("--source-addrs is at most 200");
    }
    Ok(())
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let (common, spec) = match cli.cmd {
        Cmd::CeilingServer(a) => return ceiling::serve(a),
        Cmd::Suite(a) => return suite::main(a),
        Cmd::Idle(a) => {
            let mut s = base_spec(Kind::Idle, &a.common);
            s.room_size = a.room_size.max(1);
            s.login = !a.no_login;
            (a.common, s)
        }
        Cmd::Bigroom(a) => {
            let mut s = base_spec(Kind::Bigroom, &a.common);
            s.rate = a.rate.max(0.0);
            s.senders = a.senders.clamp(1, a.common.connections.max(1));
            s.window = a.window.max(1);
            (a.common, s)
        }
        Cmd::Rooms(a) => {
            let mut s = base_spec(Kind::Rooms, &a.common);
            s.rate = a.rate.max(0.001);
            s.room_min = a.room_min.max(1);
            s.room_max = a.room_max.max(a.room_min.max(1));
            s.senders_per_room = a.senders_per_room;
            (a.common, s)
        }
        Cmd::Churn(a) => {
            let mut s = base_spec(Kind::Churn, &a.common);
            s.churn_rooms = a.rooms.max(1);
            s.churn_messages = a.messages;
            s.pause_ms = a.pause_ms;
            (a.common, s)
        }
        Cmd::Reliable(a) => {
            let mut s = base_spec(Kind::Reliable, &a.common);
            s.rate = a.rate.max(0.001);
            s.room_min = a.room_min.max(1);
            s.room_max = a.room_max.max(a.room_min.max(1));
            s.senders_per_room = a.senders_per_room;
            s.ack = true;
            s.ack_every = a.ack_every.max(1);
            s.reconnect_every_s = a.reconnect_every.max(0.0);
            (a.common, s)
        }
        Cmd::Ceiling(a) => {
            let mut s = base_spec(Kind::Ceiling, &a.common);
            s.login = false;
            s.heartbeat_s = 0.0;
            (a.common, s)
        }
    };
    check(&common)?;
    let targets = conn::parse_targets(&common.urls, &common.allow_host)?;
    workers::main(common, spec, targets)
}
