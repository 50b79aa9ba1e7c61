//! The fault-injection runner: a gateway cluster in network namespaces ([`crate::netns`]),
//! clients that behave like `client.js` in ack mode, faults injected on a schedule, recovery
//! times measured, and the [`History`] checked at the end.
//!
//! Topology of a [`ChaosLab`]: Redis (append-only, `appendfsync always`) in a namespace of its
//! own; N gateway nodes, each in its own namespace, each reaching Redis through a
//! [`FaultProxy`] of its own (so the Redis link of one node can be delayed, stalled, cut or made
//! lossy); nginx in front of the nodes; half the clients connect through nginx, the other half
//! through a client-side [`FaultProxy`] per node (to cut or stall client links). Every client
//! is an ack-mode user proven by a JWT, in one of a few rooms.
//!
//! A client ([`run_client`]) does what docs/protocol.md asks of an ack-mode client: it logs in
//! with `ack: true` (and `lastId` when resuming), pages `sync` while `more`, acknowledges
//! cumulatively, pings every second and treats 3 s without any frame as a dead connection,
//! reconnects (to the next address) and resumes, keeps every unconfirmed send and resends it
//! with the same `clientMsgId` (on `outcome_unknown`, `unavailable`, a reconnect, or no answer).
//!
//! Recovery is measured from the moment a fault ends (link up, SIGCONT, Redis answering, the
//! SIGKILL itself, nginx's old worker gone) to: the first send issued after it being confirmed,
//! every client having such a confirmation, the first and every client's first delivery of a
//! message issued after it, and presence (`/v1/rooms/{room}/presence`) equal to the truth.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tempfile::TempDir;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

use crate::checker::{History, MsgId, Received, Stats, Violation};
use crate::faultproxy::{FaultProxy, Loss, Rng};
use crate::netns::{Host, Lab, Side, REDIS_OCTET};
use crate::nginx::Nginx;
use crate::{
    gateway_bin, http_get, http_get_with, mint_token, wait_for, wire, Proc, TEST_JWT_SECRET,
};

/// The server API key of the lab's nodes (presence is read through the API).
pub const API_KEY: &str = "fault-suite-api-key-0123456789";
/// A client pings this often...
const PING_EVERY: Duration = Duration::from_secs(1);
/// ...and drops a connection that sent nothing for this long (pongs included).
const DEAD_AFTER: Duration = Duration::from_secs(3);
/// Unconfirmed sends a client keeps at most; it stops issuing new ones beyond.
const MAX_OUTSTANDING: usize = 20;
/// How long after the last attempt an unanswered send is sent again.
const RESEND_AFTER: Duration = Duration::from_secs(3);

const SIGKILL: i32 = 9;
const SIGHUP: i32 = 1;
const SIGSTOP: i32 = 19;
const SIGCONT: i32 = 18;

/// The size and timing of a lab.
#[derive(Clone, Debug)]
pub struct LabConfig {
    pub nodes: usize,
    pub rooms: usize,
    pub clients_per_room: usize,
    /// Each client issues one message this often (while traffic is on).
    pub send_every: Duration,
    pub presence_ttl: Duration,
    pub heartbeat_timeout: Duration,
    pub ack_timeout: Duration,
    pub seed: u64,
    /// A name for the logs directory and the users (keeps concurrent runs apart).
    pub name: String,
    /// Negative control: clients that never resume (every login without `ack` and `lastId`,
    /// like the tutorial's page) yet are checked as ack-mode clients — the checker must then
    /// report what they missed.
    pub careless: bool,
    /// How long the end of a run waits for every owed delivery and confirmation.
    pub drain: Duration,
}

impl LabConfig {
    /// The ordinary suite's small lab: 2 nodes, 2 rooms of 3 clients, a message per client
    /// every 200 ms, presence TTL 3 s, heartbeat timeout 4 s, ack timeout 2 s.
    pub fn small(name: &str) -> LabConfig {
        LabConfig {
            nodes: 2,
            rooms: 2,
            clients_per_room: 3,
            send_every: Duration::from_millis(200),
            presence_ttl: Duration::from_secs(3),
            heartbeat_timeout: Duration::from_secs(4),
            ack_timeout: Duration::from_secs(2),
            seed: 1,
            name: name.to_string(),
            careless: false,
            drain: Duration::from_secs(60),
        }
    }

    /// How long after a fault heals presence must be right: a connection the node can no
    /// longer hear is closed after the heartbeat timeout, and a dead node's entries expire
    /// after the TTL; plus 2 s for the prune tick and the login round trips.
    pub fn presence_deadline(&self) -> Duration {
        self.presence_ttl.max(self.heartbeat_timeout) + Duration::from_secs(2)
    }
}

/// One fault with its parameters. `node` indexes the lab's nodes.
#[derive(Clone, Debug, PartialEq)]
pub enum Fault {
    /// The node's port on the back LAN down for `secs`: it cannot reach Redis (its clients
    /// still reach it).
    PartitionNodeFromRedis { node: usize, secs: f64 },
    /// The node's port on the front LAN down for `secs`: its clients (and nginx) cannot reach
    /// it (it still reaches Redis).
    PartitionClientsFromNode { node: usize, secs: f64 },
    /// Every chunk on the node's Redis link forwarded `ms` later, for `secs`.
    RedisLinkDelay { node: usize, ms: u64, secs: f64 },
    /// The node's Redis connections cut (closed) at once.
    RedisLinkCut { node: usize },
    /// Nothing forwarded on the node's Redis link for `secs` (connections stay open).
    RedisLinkStall { node: usize, secs: f64 },
    /// Loss-like holds and cuts on the node's Redis link for `secs` (see faultproxy).
    RedisLinkLoss { node: usize, secs: f64 },
    /// Redis frozen (SIGSTOP) for `secs`, then SIGCONT.
    RedisSigstop { secs: f64 },
    /// Redis killed (SIGKILL) and started again after `secs` with its data files removed.
    RedisRestartEmpty { secs: f64 },
    /// Redis killed (SIGKILL) and started again after `secs` from its AOF.
    RedisRestartAof { secs: f64 },
    /// The node killed (SIGKILL); started again (same node id) once clients recovered.
    NodeKill { node: usize },
    /// The node frozen (SIGSTOP) for `secs`, then SIGCONT.
    NodeSigstop { node: usize, secs: f64 },
    /// The client links through the node's client proxy cut.
    ClientLinkCut { node: usize },
    /// The client links through the node's client proxy stalled for `secs`.
    ClientLinkStall { node: usize, secs: f64 },
    /// `nginx -s reload` (SIGHUP to the master) under traffic; over when the old worker exited.
    NginxReload,
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::PartitionNodeFromRedis { node, secs } => {
                write!(f, "partition node {node} from Redis for {secs} s")
            }
            Fault::PartitionClientsFromNode { node, secs } => {
                write!(f, "partition clients from node {node} for {secs} s")
            }
            Fault::RedisLinkDelay { node, ms, secs } => {
                write!(f, "delay node {node}'s Redis link by {ms} ms for {secs} s")
            }
            Fault::RedisLinkCut { node } => write!(f, "cut node {node}'s Redis connections"),
            Fault::RedisLinkStall { node, secs } => {
                write!(f, "stall node {node}'s Redis link for {secs} s")
            }
            Fault::RedisLinkLoss { node, secs } => {
                write!(f, "loss on node {node}'s Redis link for {secs} s")
            }
            Fault::RedisSigstop { secs } => write!(f, "Redis SIGSTOP for {secs} s"),
            Fault::RedisRestartEmpty { secs } => {
                write!(f, "Redis SIGKILL, restarted empty after {secs} s")
            }
            Fault::RedisRestartAof { secs } => {
                write!(f, "Redis SIGKILL, restarted from its AOF after {secs} s")
            }
            Fault::NodeKill { node } => write!(f, "node {node} SIGKILL (restarted afterwards)"),
            Fault::NodeSigstop { node, secs } => write!(f, "node {node} SIGSTOP for {secs} s"),
            Fault::ClientLinkCut { node } => write!(f, "cut client links to node {node}"),
            Fault::ClientLinkStall { node, secs } => {
                write!(f, "stall client links to node {node} for {secs} s")
            }
            Fault::NginxReload => write!(f, "nginx reload (SIGHUP) under traffic"),
        }
    }
}

impl Fault {
    /// A random fault for a lab of `nodes` nodes (durations 1–6 s).
    pub fn random(rng: &mut Rng, nodes: usize) -> Fault {
        let node = rng.below(nodes as u64) as usize;
        let secs = |rng: &mut Rng| (10 + rng.below(51)) as f64 / 10.0;
        match rng.below(14) {
            0 => Fault::PartitionNodeFromRedis {
                node,
                secs: secs(rng),
            },
            1 => Fault::PartitionClientsFromNode {
                node,
                secs: secs(rng),
            },
            2 => Fault::RedisLinkDelay {
                node,
                ms: 50 + rng.below(951),
                secs: secs(rng),
            },
            3 => Fault::RedisLinkCut { node },
            4 => Fault::RedisLinkStall {
                node,
                secs: secs(rng),
            },
            5 => Fault::RedisLinkLoss {
                node,
                secs: secs(rng),
            },
            6 => Fault::RedisSigstop { secs: secs(rng) },
            7 => Fault::RedisRestartEmpty { secs: secs(rng) },
            8 => Fault::RedisRestartAof { secs: secs(rng) },
            9 => Fault::NodeKill { node },
            10 => Fault::NodeSigstop {
                node,
                secs: secs(rng),
            },
            11 => Fault::ClientLinkCut { node },
            12 => Fault::ClientLinkStall {
                node,
                secs: secs(rng),
            },
            _ => Fault::NginxReload,
        }
    }

    /// Whether the fault may cut one node off from Redis for about the presence TTL, while the
    /// other nodes work on: the others then cannot tell it from a dead node and prune its users
    /// (logged out, then in again when it is back), whose connections are still open. After
    /// every other fault, no member may see a connected user logged out.
    pub fn may_log_out_connected_users(&self) -> bool {
        matches!(
            self,
            Fault::PartitionNodeFromRedis { .. }
                | Fault::RedisLinkStall { .. }
                | Fault::RedisLinkLoss { .. }
                | Fault::RedisLinkDelay { .. }
                | Fault::NodeSigstop { .. }
        )
    }

    /// A short name for tables.
    pub fn kind(&self) -> &'static str {
        match self {
            Fault::PartitionNodeFromRedis { .. } => "partition node/Redis",
            Fault::PartitionClientsFromNode { .. } => "partition clients/node",
            Fault::RedisLinkDelay { .. } => "Redis link delay",
            Fault::RedisLinkCut { .. } => "Redis link cut",
            Fault::RedisLinkStall { .. } => "Redis link stall",
            Fault::RedisLinkLoss { .. } => "Redis link loss",
            Fault::RedisSigstop { .. } => "Redis SIGSTOP",
            Fault::RedisRestartEmpty { .. } => "Redis restart empty",
            Fault::RedisRestartAof { .. } => "Redis restart AOF",
            Fault::NodeKill { .. } => "node SIGKILL",
            Fault::NodeSigstop { .. } => "node SIGSTOP",
            Fault::ClientLinkCut { .. } => "client link cut",
            Fault::ClientLinkStall { .. } => "client link stall",
            Fault::NginxReload => "nginx reload",
        }
    }
}

/// Recovery measured after one fault (None: not reached before the measurement ended).
#[derive(Clone, Debug)]
pub struct Recovery {
    pub fault: Fault,
    /// How long the fault lasted (from injection to heal).
    pub lasted: Duration,
    pub first_confirm: Option<Duration>,
    pub all_confirm: Option<Duration>,
    pub first_delivery: Option<Duration>,
    pub all_delivery: Option<Duration>,
    pub presence: Option<Duration>,
    /// How often presence was right after the heal and then wrong again.
    pub presence_flaps: u32,
    /// `logout` frames members received, from the fault's start until recovery, naming a user
    /// whose connection was open and logged in at that moment: a member list showing someone
    /// gone who is there. (A logout while the user is between connections is honest.)
    pub logouts_of_connected: usize,
    /// The longest time a client (one present throughout) had no send confirmed, from the
    /// fault's start until every client recovered: how long "my messages hang" lasted.
    pub worst_send_gap: Duration,
    /// What clients saw from the fault's start until they all recovered (reconnects, error
    /// codes, close codes, connections declared dead).
    pub client_events: BTreeMap<String, u64>,
}

fn secs(d: Option<Duration>) -> String {
    d.map(|d| format!("{:.2}", d.as_secs_f64()))
        .unwrap_or_else(|| "-".into())
}

impl fmt::Display for Recovery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: after heal, send confirmed {} s (all clients {} s), delivered {} s (all \
             clients {} s), presence right {} s (wrong again {} times, {} logout frames for connected users); longest wait for a confirmation {:.2} s; \
             clients saw {:?}",
            self.fault,
            secs(self.first_confirm),
            secs(self.all_confirm),
            secs(self.first_delivery),
            secs(self.all_delivery),
            secs(self.presence),
            self.presence_flaps,
            self.logouts_of_connected,
            self.worst_send_gap.as_secs_f64(),
            self.client_events,
        )
    }
}

/// What a run found.
#[derive(Debug)]
pub struct RunReport {
    pub recoveries: Vec<Recovery>,
    pub stats: Stats,
    pub violations: Vec<Violation>,
    /// What clients saw: reconnects, error codes, close codes, dead connections.
    pub client_events: BTreeMap<String, u64>,
    /// The lab's presence TTL: faults after which presence took longer than this to come
    /// right are listed (the issue asks for "within the TTL"; the checker's deadline is longer,
    /// see `LabConfig::presence_deadline`).
    pub presence_ttl: Duration,
}

impl fmt::Display for RunReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for r in &self.recoveries {
            writeln!(f, "  {r}")?;
        }
        let s = &self.stats;
        writeln!(
            f,
            "  sends {}, confirmed {}, messages {}, deliveries {} ({} redeliveries), \
             (message, member) pairs checked {}, lost with Redis's data {}, resyncs {}",
            s.sends,
            s.confirmed,
            s.messages,
            s.deliveries,
            s.redeliveries,
            s.expected_deliveries,
            s.lost_with_redis_data,
            s.resyncs
        )?;
        writeln!(f, "  client events: {:?}", self.client_events)?;
        let late: Vec<String> = self
            .recoveries
            .iter()
            .filter(|r| r.presence.is_none_or(|p| p > self.presence_ttl))
            .map(|r| format!("{} ({})", r.fault, secs(r.presence)))
            .collect();
        writeln!(
            f,
            "  presence right later than the TTL ({:.1} s) after the heal: {} of {} faults {late:?}",
            self.presence_ttl.as_secs_f64(),
            late.len(),
            self.recoveries.len()
        )?;
        writeln!(f, "  violations: {}", self.violations.len())?;
        for v in self.violations.iter().take(50) {
            writeln!(f, "    {v}")?;
        }
        Ok(())
    }
}

/// Redis in its namespace, append-only with `appendfsync always`, data in a directory of its
/// own.
pub struct LabRedis {
    pub host: Host,
    proc: Option<Proc>,
    dir: TempDir,
    log: PathBuf,
}

impl LabRedis {
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::new(
            IpAddr::V4(self.host.back_ip.expect("redis has a back port")),
            6379,
        )
    }

    pub fn url(&self) -> String {
        format!("redis://{}/", self.addr())
    }

    /// Starts the server (again), keeping its data files unless `empty`, and waits for PING.
    pub async fn start(&mut self, empty: bool) -> Result<()> {
        self.kill();
        if empty {
            for entry in std::fs::read_dir(self.dir.path())? {
                let path = entry?.path();
                if path.is_dir() {
                    std::fs::remove_dir_all(&path)?;
                } else {
                    std::fs::remove_file(&path)?;
                }
            }
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let ip = self.host.back_ip.expect("back ip").to_string();
        let proc = Proc::spawn(
            "redis-server (lab)",
            self.host
                .command("redis-server")
                .args(["--bind", &ip, "--port", "6379", "--protected-mode", "no"])
                .args([
                    "--save",
                    "",
                    "--appendonly",
                    "yes",
                    "--appendfsync",
                    "always",
                ])
                .arg("--dir")
                .arg(self.dir.path())
                .args(["--daemonize", "no", "--loglevel", "warning"])
                .stdout(Stdio::null())
                .stderr(log),
        )?;
        self.proc = Some(proc);
        let url = self.url();
        wait_for("lab redis PING", Duration::from_secs(20), || {
            crate::redis_answers(url.clone())
        })
        .await?;
        Ok(())
    }

    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    pub fn signal(&self, signal: i32) {
        if let Some(p) = &self.proc {
            p.signal(signal);
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().and_then(|p| p.pid())
    }

    /// A connection for checks (from the root namespace, on the back LAN).
    pub async fn connection(&self) -> Result<redis::aio::MultiplexedConnection> {
        let client = redis::Client::open(self.url())?;
        Ok(tokio::time::timeout(
            Duration::from_secs(2),
            client.get_multiplexed_async_connection(),
        )
        .await
        .context("connecting to lab redis")??)
    }
}

impl Drop for LabRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A gateway node in its namespace.
pub struct LabNode {
    pub id: String,
    pub host: Host,
    pub proc: Option<Proc>,
    env: Vec<(String, String)>,
    log: PathBuf,
}

impl LabNode {
    pub fn front_ip(&self) -> IpAddr {
        IpAddr::V4(self.host.front_ip.expect("node has a front port"))
    }

    /// `ip:8080`, the public listener.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::new(self.front_ip(), 8080)
    }

    /// `ip:9091`, the admin listener.
    pub fn admin_addr(&self) -> String {
        format!("{}:9091", self.front_ip())
    }

    /// Starts (again) and waits for `/readyz` 200.
    pub async fn start(&mut self) -> Result<()> {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut cmd = self.host.command(gateway_bin());
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("GATEWAY_LISTEN", self.addr().to_string())
            .env("GATEWAY_ADMIN_LISTEN", self.admin_addr())
            .env("GATEWAY_NODE_ID", &self.id)
            .env(
                "RUST_LOG",
                std::env::var("E2E_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::null())
            .stderr(log);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        self.proc = Some(Proc::spawn(&format!("gateway {}", self.id), &mut cmd)?);
        let admin = self.admin_addr();
        wait_for(
            &format!("gateway {} /readyz 200", self.id),
            Duration::from_secs(30),
            || {
                let admin = admin.clone();
                async move { matches!(http_get(&admin, "/readyz").await, Ok((200, _))).then_some(()) }
            },
        )
        .await
    }

    pub fn signal(&self, signal: i32) {
        if let Some(p) = &self.proc {
            p.signal(signal);
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().and_then(|p| p.pid())
    }

    /// One metric's value (summed over label sets), if the node answers.
    pub async fn metric(&self, name: &str) -> Option<f64> {
        let (status, body) = http_get(&self.admin_addr(), "/metrics").await.ok()?;
        (status == 200).then(|| {
            body.lines()
                .filter(|l| l.starts_with(name))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum()
        })
    }
}

/// Shared between the runner and one client task.
struct ClientCtl {
    index: usize,
    user: String,
    room: String,
    urls: Vec<String>,
    token: String,
    history: Arc<History>,
    traffic: Arc<AtomicBool>,
    send_every: Duration,
    events: Arc<Mutex<BTreeMap<String, u64>>>,
    seed: u64,
    careless: bool,
}

/// A running client task.
pub struct ClientHandle {
    pub index: usize,
    pub user: String,
    pub room: String,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    pub departed: bool,
}

fn count(events: &Mutex<BTreeMap<String, u64>>, what: String) {
    *events.lock().expect("events lock").entry(what).or_default() += 1;
}

/// One unconfirmed send.
struct Pending {
    content: String,
    next_try: tokio::time::Instant,
}

/// The client loop (see the module docs): connect, log in or resume, run the session, and
/// again, until told to stop.
async fn run_client(ctl: ClientCtl, mut stop: watch::Receiver<bool>) {
    let mut last_id: Option<String> = None;
    let mut pending: BTreeMap<String, Pending> = BTreeMap::new();
    let mut rng = Rng::new(ctl.seed);
    let mut sent_count = 0u64;
    // Clients alternate between nginx and the proxies: spread each half over the nodes.
    let mut url_index = ctl.index / 2;
    let mut first = true;
    while !*stop.borrow() {
        let url = &ctl.urls[url_index % ctl.urls.len()];
        if !first {
            count(&ctl.events, "reconnects".into());
        }
        first = false;
        let opts = wire::Opts::default().timeout(Duration::from_secs(3));
        let ws = match wire::connect(url, &opts).await {
            Ok(ws) => ws,
            Err(_) => {
                count(&ctl.events, "connect failed".into());
                url_index += 1;
                tokio::time::sleep(Duration::from_millis(100 + rng.below(200))).await;
                continue;
            }
        };
        let end = session(
            &ctl,
            ws,
            &mut stop,
            &mut last_id,
            &mut pending,
            &mut sent_count,
        )
        .await;
        ctl.history.offline(ctl.index);
        count(&ctl.events, end);
        // A real client spreads its reconnects: the next address, after a short random pause.
        url_index += 1;
        tokio::time::sleep(Duration::from_millis(50 + rng.below(250))).await;
    }
}

fn newer(current: &Option<String>, candidate: &str) -> bool {
    match (
        current.as_deref().and_then(MsgId::parse),
        MsgId::parse(candidate),
    ) {
        (Some(c), Some(n)) => n > c,
        (None, Some(_)) => true,
        _ => false,
    }
}

/// One connection's life; returns why it ended (counted as a client event).
async fn session(
    ctl: &ClientCtl,
    ws: wire::Ws,
    stop: &mut watch::Receiver<bool>,
    last_id: &mut Option<String>,
    pending: &mut BTreeMap<String, Pending>,
    sent_count: &mut u64,
) -> String {
    let (mut sink, mut stream) = ws.split();
    let room = ctl.room.as_str();
    let login = |last_id: &Option<String>| {
        let login = wire::Login::new(&ctl.user, room)
            .name(format!("name-{}", ctl.user))
            .room_name(format!("room {room}"))
            .token(ctl.token.as_str())
            .ack(!ctl.careless)
            .last_id(last_id.as_deref().filter(|_| !ctl.careless));
        Message::text(login.text())
    };
    if sink.send(login(last_id)).await.is_err() {
        return "login send failed".into();
    }
    let mut login_sent = tokio::time::Instant::now();
    let mut logged_in = false;
    let mut acked: Option<String> = None;
    let mut last_rx = tokio::time::Instant::now();
    let mut ping = tokio::time::interval(PING_EVERY);
    let mut ack_tick = tokio::time::interval(Duration::from_millis(250));
    let mut traffic = tokio::time::interval(ctl.send_every);
    let mut retry = tokio::time::interval(Duration::from_millis(100));
    traffic.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let mut out: Vec<Message> = Vec::new();
        tokio::select! {
            _ = stop.changed() => {
                let _ = sink.send(Message::Close(None)).await;
                return "stopped".into();
            }
            next = stream.next() => {
                let text = match next {
                    Some(Ok(Message::Text(text))) => text,
                    Some(Ok(Message::Close(frame))) => {
                        let code = frame.map(|f| u16::from(f.code)).unwrap_or(1005);
                        return format!("closed {code}");
                    }
                    Some(Ok(_)) => { last_rx = tokio::time::Instant::now(); continue; }
                    Some(Err(_)) | None => return "connection lost".into(),
                };
                last_rx = tokio::time::Instant::now();
                let Ok(frame) = serde_json::from_str::<Value>(&text) else { continue };
                on_frame(ctl, &frame, &mut logged_in, &mut login_sent, last_id, pending, &mut out);
            }
            _ = ping.tick() => {
                if last_rx.elapsed() > DEAD_AFTER {
                    return "dead (no pong)".into();
                }
                out.push(Message::text(wire::HEARTBEAT));
            }
            _ = ack_tick.tick() => {
                if logged_in && !ctl.careless && *last_id != acked {
                    if let Some(id) = last_id.clone() {
                        out.push(Message::text(wire::ack(room, &id).to_string()));
                        acked = Some(id);
                    }
                }
            }
            _ = traffic.tick() => {
                if ctl.traffic.load(Ordering::Relaxed) && pending.len() < MAX_OUTSTANDING {
                    *sent_count += 1;
                    let cmid = format!("{}-{}", ctl.user, sent_count);
                    let content = format!("m{} from {}", sent_count, ctl.user);
                    ctl.history.send(ctl.index, &cmid, &content);
                    pending.insert(cmid, Pending { content, next_try: tokio::time::Instant::now() });
                }
            }
            _ = retry.tick() => {
                let now = tokio::time::Instant::now();
                if !logged_in {
                    if now.duration_since(login_sent) > Duration::from_secs(2) {
                        login_sent = now;
                        out.push(login(last_id));
                    }
                } else {
                    for (cmid, p) in pending.iter_mut().filter(|(_, p)| p.next_try <= now) {
                        p.next_try = now + RESEND_AFTER;
                        out.push(Message::text(
                            wire::message(room, &p.content, Some(cmid)).to_string(),
                        ));
                    }
                }
            }
        }
        for message in out {
            if sink.send(message).await.is_err() {
                return "connection lost".into();
            }
        }
    }
}

/// Handles one frame the server sent a lab client: the checker's history learns what was
/// delivered and confirmed; answers (a `sync` for more) go into `out`.
fn on_frame(
    ctl: &ClientCtl,
    frame: &Value,
    logged_in: &mut bool,
    login_sent: &mut tokio::time::Instant,
    last_id: &mut Option<String>,
    pending: &mut BTreeMap<String, Pending>,
    out: &mut Vec<Message>,
) {
    let room = ctl.room.as_str();
    let event = frame["event"].as_str().unwrap_or_default();
    let in_room = frame["roomId"] == room;
    match event {
        "login" if in_room && frame["userId"] == ctl.user.as_str() && !*logged_in => {
            *logged_in = true;
            ctl.history.online(ctl.index);
            if ctl.careless {
                // Without acks no `synced` comes: logged in is as started as it gets.
                ctl.history.joined(ctl.index);
            }
            // Everything unconfirmed goes again, same clientMsgId.
            let now = tokio::time::Instant::now();
            for p in pending.values_mut() {
                p.next_try = now;
            }
        }
        "synced" if in_room => {
            let synced_id = frame["lastId"].as_str().unwrap_or("0-0");
            if let Some(id) = MsgId::parse(synced_id) {
                ctl.history.started(ctl.index, id);
            }
            if newer(last_id, synced_id) {
                *last_id = Some(synced_id.to_string());
            }
            if frame["more"] == true {
                out.push(Message::text(wire::sync(room, synced_id, None).to_string()));
            }
        }
        "message" if in_room => {
            let id_text = frame["id"].as_str().unwrap_or_default();
            let cmid = frame["clientMsgId"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            if let Some(id) = MsgId::parse(id_text) {
                if ctl.careless && !ctl.history.has_start(ctl.index) {
                    // No `synced` without ack: owed is what follows the first
                    // message received.
                    let before = match id {
                        MsgId(ms, 0) => MsgId(ms.saturating_sub(1), u64::MAX),
                        MsgId(ms, seq) => MsgId(ms, seq - 1),
                    };
                    ctl.history.started(ctl.index, before);
                }
                ctl.history.deliver(
                    ctl.index,
                    Received {
                        id,
                        client_msg_id: cmid.clone(),
                        content: frame["content"].as_str().unwrap_or_default().into(),
                        user: frame["userId"].as_str().unwrap_or_default().into(),
                        num: frame["num"].as_u64(),
                        at: Instant::now(),
                    },
                );
                if frame["userId"] == ctl.user.as_str() && pending.remove(&cmid).is_some() {
                    ctl.history.confirm(&cmid, id);
                }
            }
            if newer(last_id, id_text) {
                *last_id = Some(id_text.to_string());
            }
        }
        "sent" if in_room => {
            let cmid = frame["clientMsgId"].as_str().unwrap_or_default();
            if let Some(id) = frame["id"].as_str().and_then(MsgId::parse) {
                if pending.remove(cmid).is_some() {
                    ctl.history.confirm(cmid, id);
                }
            }
        }
        // Logouts and logins of others, as a member list would show them.
        "logout" | "login" if in_room && frame["userId"] != ctl.user.as_str() => {
            count(&ctl.events, format!("{event} frames"));
            if event == "logout" {
                if let Some(user) = frame["userId"].as_str() {
                    ctl.history.saw_logout(user);
                }
            }
        }
        "resync" if in_room => {
            count(&ctl.events, "resync".into());
            ctl.history.resync(ctl.index);
        }
        "error" => {
            let code = frame["code"].as_str().unwrap_or("?");
            count(&ctl.events, format!("error {code}"));
            let retry_at = tokio::time::Instant::now() + Duration::from_millis(300);
            match frame["clientMsgId"]
                .as_str()
                .and_then(|c| pending.get_mut(c))
            {
                Some(p) => p.next_try = retry_at,
                // A failed login: try it again shortly.
                None if !*logged_in => *login_sent = retry_at - Duration::from_secs(2),
                None => {}
            }
        }
        _ => {}
    }
}

/// The whole lab (see the module docs). Dropping it stops everything: clients, nginx,
/// proxies, nodes and Redis by pid, then the namespaces.
pub struct ChaosLab {
    pub config: LabConfig,
    pub clients: Vec<ClientHandle>,
    pub nginx: Nginx,
    pub client_proxies: Vec<FaultProxy>,
    pub redis_proxies: Vec<FaultProxy>,
    pub nodes: Vec<LabNode>,
    pub redis: LabRedis,
    pub history: Arc<History>,
    pub recoveries: Vec<Recovery>,
    traffic: Arc<AtomicBool>,
    events: Arc<Mutex<BTreeMap<String, u64>>>,
    rng: Rng,
    next_user: usize,
    /// Node logs, Redis's log and data (kept on failure: see `keep_logs`).
    logs: TempDir,
    // Last: the namespaces go after every process in them.
    pub lab: Lab,
}

impl ChaosLab {
    /// Builds the namespaces and starts Redis, the nodes, the proxies and nginx (no clients).
    pub async fn start(config: LabConfig) -> Result<ChaosLab> {
        let mut lab = Lab::create()?;
        let logs = tempfile::Builder::new()
            .prefix(&format!("e2e-chaos-{}-", config.name))
            .tempdir()?;
        let redis_host = lab.add_host("redis", REDIS_OCTET, false, true)?;
        let mut redis = LabRedis {
            host: redis_host,
            proc: None,
            dir: tempfile::Builder::new()
                .prefix("e2e-chaos-redis-")
                .tempdir_in(logs.path())?,
            log: logs.path().join("redis.log"),
        };
        redis.start(true).await?;
        let mut rng = Rng::new(config.seed);
        let mut redis_proxies = Vec::new();
        let mut nodes = Vec::new();
        for i in 0..config.nodes {
            let host = lab.add_host(&format!("node{i}"), (i + 1) as u8, true, true)?;
            let proxy =
                FaultProxy::start(IpAddr::V4(lab.root_back_ip()), redis.addr(), rng.next_u64())
                    .await?;
            let env = vec![
                (
                    "GATEWAY_REDIS_URL".to_string(),
                    format!("redis://{}/", proxy.listen),
                ),
                ("GATEWAY_JWT_SECRET".into(), TEST_JWT_SECRET.into()),
                ("GATEWAY_API_KEY".into(), API_KEY.into()),
                (
                    "GATEWAY_PRESENCE_TTL_MS".into(),
                    config.presence_ttl.as_millis().to_string(),
                ),
                (
                    "GATEWAY_HEARTBEAT_TIMEOUT_MS".into(),
                    config.heartbeat_timeout.as_millis().to_string(),
                ),
                (
                    "GATEWAY_ACK_TIMEOUT_MS".into(),
                    config.ack_timeout.as_millis().to_string(),
                ),
                (
                    "GATEWAY_TRUSTED_PROXIES".into(),
                    lab.root_front_ip().to_string(),
                ),
            ];
            let mut node = LabNode {
                id: format!("{}-n{i}", config.name),
                host,
                proc: None,
                env,
                log: logs.path().join(format!("node{i}.log")),
            };
            node.start().await?;
            nodes.push(node);
            redis_proxies.push(proxy);
        }
        let mut client_proxies = Vec::new();
        for node in &nodes {
            client_proxies.push(
                FaultProxy::start(IpAddr::from([127, 0, 0, 1]), node.addr(), rng.next_u64())
                    .await?,
            );
        }
        let upstreams: Vec<String> = nodes.iter().map(|n| n.addr().to_string()).collect();
        let nginx = Nginx::start(&upstreams).await?;
        Ok(ChaosLab {
            config,
            clients: Vec::new(),
            nginx,
            client_proxies,
            redis_proxies,
            nodes,
            redis,
            history: Arc::new(History::new()),
            recoveries: Vec::new(),
            traffic: Arc::new(AtomicBool::new(false)),
            events: Arc::default(),
            rng,
            next_user: 0,
            logs,
            lab,
        })
    }

    /// Keeps the logs directory (node logs, Redis log) after the lab is dropped; returns it.
    pub fn keep_logs(&mut self) -> PathBuf {
        let fresh = tempfile::tempdir().expect("a temporary directory");
        std::mem::replace(&mut self.logs, fresh).keep()
    }

    /// Starts one client (the next user) in `room`; alternates nginx and the client proxies.
    async fn add_client(&mut self, room: &str) -> Result<()> {
        let n = self.next_user;
        self.next_user += 1;
        let user = format!("{}-u{n}", self.config.name);
        let urls = if n.is_multiple_of(2) {
            vec![self.nginx.ws_url()]
        } else {
            self.client_proxies
                .iter()
                .map(|p| format!("ws://{}/ws", p.listen))
                .collect()
        };
        let index = self.history.add_client(&user, room, true);
        let (stop, stop_rx) = watch::channel(false);
        let ctl = ClientCtl {
            index,
            user: user.clone(),
            room: room.to_string(),
            urls,
            token: mint_token(&user, &["--ttl", "7200"])?,
            history: self.history.clone(),
            traffic: self.traffic.clone(),
            send_every: self.config.send_every,
            events: self.events.clone(),
            seed: self.rng.next_u64(),
            careless: self.config.careless,
        };
        let task = tokio::spawn(run_client(ctl, stop_rx));
        self.clients.push(ClientHandle {
            index,
            user,
            room: room.to_string(),
            stop,
            task,
            departed: false,
        });
        Ok(())
    }

    /// Starts every room's clients and waits until each has logged in (its first `synced`).
    pub async fn start_clients(&mut self) -> Result<()> {
        for r in 0..self.config.rooms {
            for _ in 0..self.config.clients_per_room {
                self.add_client(&format!("room{r}")).await?;
            }
        }
        self.wait_clients_started().await
    }

    async fn wait_clients_started(&self) -> Result<()> {
        let history = self.history.clone();
        let indexes: Vec<usize> = self.clients.iter().map(|c| c.index).collect();
        wait_for("every client logged in", Duration::from_secs(30), || {
            let ok = indexes.iter().all(|i| history.is_started(*i));
            async move { ok.then_some(()) }
        })
        .await
    }

    /// Turns traffic (every client sending) on or off.
    pub fn traffic(&self, on: bool) {
        self.traffic.store(on, Ordering::Relaxed);
    }

    /// The users each room should have online: every client that has not left.
    pub fn truth(&self) -> BTreeMap<String, BTreeSet<String>> {
        let mut truth: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for r in 0..self.config.rooms {
            truth.insert(format!("room{r}"), BTreeSet::new());
        }
        for c in self.clients.iter().filter(|c| !c.departed) {
            truth
                .entry(c.room.clone())
                .or_default()
                .insert(c.user.clone());
        }
        truth
    }

    /// The admin address of a node that answers `/readyz` 200 now.
    async fn ready_admin(&self) -> Option<String> {
        for node in &self.nodes {
            if node.proc.is_none() {
                continue;
            }
            if let Ok((200, _)) = http_get(&node.admin_addr(), "/readyz").await {
                return Some(node.admin_addr());
            }
        }
        None
    }

    /// Presence as the server API reports it: room → (num, users).
    pub async fn presence(&self) -> Option<BTreeMap<String, (u64, BTreeSet<String>)>> {
        let admin = self.ready_admin().await?;
        let auth = format!("Authorization: Bearer {API_KEY}");
        let mut out = BTreeMap::new();
        for room in self.truth().keys() {
            let mut users = BTreeSet::new();
            let mut num;
            let mut cursor: Option<String> = None;
            loop {
                let path = match &cursor {
                    None => format!("/v1/rooms/{room}/presence?limit=100"),
                    Some(c) => format!("/v1/rooms/{room}/presence?limit=100&cursor={c}"),
                };
                let (status, body) = http_get_with(&admin, &path, &[&auth]).await.ok()?;
                if status != 200 {
                    return None;
                }
                let page: Value = serde_json::from_str(&body).ok()?;
                num = page["num"].as_u64()?;
                for m in page["members"].as_array()? {
                    users.insert(m["userId"].as_str()?.to_string());
                }
                match page["nextCursor"].as_str() {
                    Some(c) if c != "0" => cursor = Some(c.to_string()),
                    _ => break,
                }
            }
            out.insert(room.clone(), (num, users));
        }
        Some(out)
    }

    /// Differences between presence and the truth (empty: right).
    pub async fn presence_diff(&self) -> Vec<(String, String)> {
        let Some(seen) = self.presence().await else {
            return vec![("*".into(), "no ready node answered the presence API".into())];
        };
        let mut diff = Vec::new();
        for (room, users) in self.truth() {
            let (num, seen_users) = seen.get(&room).cloned().unwrap_or_default();
            if num != users.len() as u64 || seen_users != users {
                let phantoms: Vec<_> = seen_users.difference(&users).collect();
                let missing: Vec<_> = users.difference(&seen_users).collect();
                diff.push((
                    room,
                    format!(
                        "num {num}, truth {}; phantom users {phantoms:?}, missing {missing:?}",
                        users.len()
                    ),
                ));
            }
        }
        diff
    }

    /// One client leaves for good (closes its connection), as users do, during faults too.
    pub async fn depart(&mut self, which: usize) {
        let live: Vec<usize> = (0..self.clients.len())
            .filter(|i| !self.clients[*i].departed)
            .collect();
        if live.is_empty() {
            return;
        }
        let i = live[which % live.len()];
        let client = &mut self.clients[i];
        client.departed = true;
        client.stop.send_replace(true);
        self.history.depart(client.index);
    }

    /// Client churn without a fault: one user leaves, a new one arrives in a random room and
    /// logs in (for the soak: subscriptions and presence come and go).
    pub async fn churn(&mut self, which: usize) -> Result<()> {
        self.depart(which).await;
        let room = format!("room{}", self.rng.below(self.config.rooms as u64));
        self.add_client(&room).await?;
        self.wait_clients_started().await
    }

    /// Applies `fault`, heals it, and measures recovery (see the module docs). One client
    /// leaves while the fault is on and a new one arrives after it healed, so presence is
    /// checked for phantom users too.
    pub async fn inject(&mut self, fault: &Fault) -> Result<Recovery> {
        let pick = self.rng.below(1 << 16) as usize;
        let events_before = self.events.lock().expect("events").clone();
        let injected = Instant::now();
        self.apply_and_heal(fault, pick).await?;
        let healed = Instant::now();
        let lasted = healed - injected;
        let present_throughout: Vec<usize> = self
            .clients
            .iter()
            .filter(|c| !c.departed && self.history.is_started(c.index))
            .map(|c| c.index)
            .collect();
        // A new user arrives once the fault is over.
        let room = format!("room{}", self.rng.below(self.config.rooms as u64));
        self.add_client(&room).await?;
        let mut recovery = self.measure(fault.clone(), lasted, healed).await;
        recovery.worst_send_gap =
            self.history
                .longest_confirm_gap(&present_throughout, injected, Instant::now());
        recovery.logouts_of_connected = self.history.logouts_of_online_users_since(injected).len();
        for (event, n) in self.events.lock().expect("events").iter() {
            let delta = n - events_before.get(event).copied().unwrap_or(0);
            // "stopped" is the departing client closing, not something the fault did.
            if delta > 0 && event != "stopped" {
                recovery.client_events.insert(event.clone(), delta);
            }
        }
        if let Fault::NodeKill { node } = fault {
            // Back to full strength for what follows, under the same node id.
            self.nodes[*node].start().await?;
        }
        self.recoveries.push(recovery.clone());
        Ok(recovery)
    }

    /// Applies `fault` and, where it lasts, heals it after its time; the client `pick` leaves
    /// while it is on.
    async fn apply_and_heal(&mut self, fault: &Fault, pick: usize) -> Result<()> {
        let wait = |secs: f64| tokio::time::sleep(Duration::from_secs_f64(secs));
        match fault.clone() {
            Fault::PartitionNodeFromRedis { node, secs } => {
                let host = self.nodes[node].host.clone();
                self.lab.set_link(&host, Side::Back, false)?;
                self.depart(pick).await;
                wait(secs).await;
                self.lab.set_link(&host, Side::Back, true)?;
            }
            Fault::PartitionClientsFromNode { node, secs } => {
                let host = self.nodes[node].host.clone();
                self.lab.set_link(&host, Side::Front, false)?;
                self.depart(pick).await;
                wait(secs).await;
                self.lab.set_link(&host, Side::Front, true)?;
            }
            Fault::RedisLinkDelay { node, ms, secs } => {
                self.redis_proxies[node].set_delay(Duration::from_millis(ms));
                self.depart(pick).await;
                wait(secs).await;
                self.redis_proxies[node].heal();
            }
            Fault::RedisLinkCut { node } => {
                self.redis_proxies[node].cut();
                self.depart(pick).await;
            }
            Fault::RedisLinkStall { node, secs } => {
                self.redis_proxies[node].set_stalled(true);
                self.depart(pick).await;
                wait(secs).await;
                self.redis_proxies[node].heal();
            }
            Fault::RedisLinkLoss { node, secs } => {
                self.redis_proxies[node].set_loss(Some(Loss {
                    stall_chance: 0.05,
                    max_stall: Duration::from_millis(600),
                    cut_chance: 0.005,
                }));
                self.depart(pick).await;
                wait(secs).await;
                self.redis_proxies[node].heal();
            }
            Fault::RedisSigstop { secs } => {
                self.redis.signal(SIGSTOP);
                self.depart(pick).await;
                wait(secs).await;
                self.redis.signal(SIGCONT);
            }
            Fault::RedisRestartEmpty { secs } => {
                self.redis.kill();
                self.history.data_lost();
                self.depart(pick).await;
                wait(secs).await;
                self.redis.start(true).await?;
            }
            Fault::RedisRestartAof { secs } => {
                self.redis.kill();
                self.depart(pick).await;
                wait(secs).await;
                self.redis.start(false).await?;
            }
            Fault::NodeKill { node } => {
                self.nodes[node].signal(SIGKILL);
                self.depart(pick).await;
            }
            Fault::NodeSigstop { node, secs } => {
                self.nodes[node].signal(SIGSTOP);
                self.depart(pick).await;
                wait(secs).await;
                self.nodes[node].signal(SIGCONT);
            }
            Fault::ClientLinkCut { node } => {
                self.client_proxies[node].cut();
                self.depart(pick).await;
            }
            Fault::ClientLinkStall { node, secs } => {
                self.client_proxies[node].set_stalled(true);
                self.depart(pick).await;
                wait(secs).await;
                self.client_proxies[node].heal();
            }
            Fault::NginxReload => {
                let old_workers = nginx_workers(self.nginx.proc.pid().unwrap_or(0));
                self.nginx.proc.signal(SIGHUP);
                self.depart(pick).await;
                // Over when every old worker exited (worker_shutdown_timeout closes the
                // WebSockets they still held).
                wait_for(
                    "nginx's old workers to exit",
                    Duration::from_secs(30),
                    || {
                        let now = nginx_workers(self.nginx.proc.pid().unwrap_or(0));
                        let gone = old_workers.iter().all(|w| !now.contains(w));
                        async move { gone.then_some(()) }
                    },
                )
                .await?;
            }
        }
        Ok(())
    }

    /// Waits (up to the presence deadline, and up to 60 s for traffic) for recovery after a
    /// fault healed at `healed`; records a violation for what did not recover.
    async fn measure(&mut self, fault: Fault, lasted: Duration, healed: Instant) -> Recovery {
        let mut recovery = Recovery {
            fault,
            lasted,
            first_confirm: None,
            all_confirm: None,
            first_delivery: None,
            all_delivery: None,
            presence: None,
            presence_flaps: 0,
            logouts_of_connected: 0,
            worst_send_gap: Duration::ZERO,
            client_events: BTreeMap::new(),
        };
        let presence_deadline = healed + self.config.presence_deadline();
        let traffic_deadline = healed + Duration::from_secs(60);
        let mut presence_diff = Vec::new();
        let mut presence_right_since: Option<Instant> = None;
        let mut presence_done = false;
        let mut nums_since: Option<Instant> = None;
        let mut nums_checked = false;
        loop {
            let live: Vec<usize> = self
                .clients
                .iter()
                .filter(|c| !c.departed)
                .map(|c| c.index)
                .collect();
            self.measure_traffic(&mut recovery, &live, healed);
            // Presence is polled up to the deadline even when it is right earlier: it can be
            // right, then wrong again (a node cut off from Redis longer than the TTL has its
            // users pruned by the others, and re-creates them once its own refresh gets
            // through). `presence` is when it last became right; it must be right at the
            // deadline.
            if !presence_done && self.clients_started() {
                let diff = self.presence_diff().await;
                if diff.is_empty() {
                    presence_right_since.get_or_insert_with(Instant::now);
                } else {
                    if presence_right_since.take().is_some() {
                        recovery.presence_flaps += 1;
                    }
                    presence_diff = diff;
                }
                if Instant::now() >= presence_deadline {
                    presence_done = true;
                    nums_since = Some(Instant::now());
                    match presence_right_since {
                        Some(since) => recovery.presence = Some(since - healed),
                        None => {
                            for (room, detail) in presence_diff.drain(..) {
                                self.history.violation(Violation::Presence {
                                    room,
                                    detail: format!(
                                        "{detail} ({:.1} s after `{}` healed)",
                                        self.config.presence_deadline().as_secs_f64(),
                                        recovery.fault
                                    ),
                                });
                            }
                        }
                    }
                }
            }
            // What clients see: from the deadline on, every message carries the right `num`
            // to every member.
            if let (Some(since), false) = (nums_since, nums_checked) {
                let truth = self.truth();
                let latest = self.history.latest_num_since(since);
                let live_latest: Vec<_> = live.iter().map(|c| latest[*c].clone()).collect();
                if live_latest.iter().all(|(_, _, num)| num.is_some()) {
                    nums_checked = true;
                    for (user, room, num) in live_latest {
                        let want = truth.get(&room).map(|u| u.len() as u64);
                        if num != want {
                            self.history.violation(Violation::Presence {
                                room,
                                detail: format!(
                                    "{user} saw num {num:?} after the presence deadline, truth \
                                     {want:?} (after `{}`)",
                                    recovery.fault
                                ),
                            });
                        }
                    }
                }
            }
            let traffic_done = recovery.all_confirm.is_some() && recovery.all_delivery.is_some();
            if traffic_done && presence_done && nums_checked {
                break;
            }
            let now = Instant::now();
            if now > traffic_deadline {
                self.history.violation(Violation::Presence {
                    room: "*".into(),
                    detail: format!(
                        "traffic did not recover within 60 s after `{}`: {recovery}",
                        recovery.fault
                    ),
                });
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        recovery
    }

    /// When the first and the last client got a send confirmed and a fresh message delivered
    /// after `healed` (each set once every live client has).
    fn measure_traffic(&self, recovery: &mut Recovery, live: &[usize], healed: Instant) {
        if recovery.all_confirm.is_none() {
            let sends = self.history.sends_since(healed);
            let confirmed = |client: usize| {
                sends
                    .iter()
                    .filter(|(c, _)| *c == client)
                    .filter_map(|(_, t)| *t)
                    .min()
            };
            recovery.first_confirm = sends
                .iter()
                .filter_map(|(_, t)| *t)
                .min()
                .map(|t| t - healed);
            let per_client: Vec<Option<Instant>> = live.iter().map(|c| confirmed(*c)).collect();
            if per_client.iter().all(Option::is_some) {
                recovery.all_confirm = per_client.into_iter().flatten().max().map(|t| t - healed);
            }
        }
        if recovery.all_delivery.is_none() {
            let fresh = self.history.first_fresh_delivery(healed);
            recovery.first_delivery = fresh.iter().flatten().min().map(|t| *t - healed);
            let per_client: Vec<Option<Instant>> = live.iter().map(|c| fresh[*c]).collect();
            if per_client.iter().all(Option::is_some) {
                recovery.all_delivery = per_client.into_iter().flatten().max().map(|t| t - healed);
            }
        }
    }

    fn clients_started(&self) -> bool {
        self.clients
            .iter()
            .filter(|c| !c.departed)
            .all(|c| self.history.is_started(c.index))
    }

    /// Ends the run: traffic off, every owed delivery and confirmation awaited (60 s), the
    /// `num` clients see checked, clients closed, then presence must empty and every node and
    /// Redis must hold no subscription (within the presence deadline). Returns the report.
    pub async fn finish(mut self) -> Result<RunReport> {
        self.traffic(false);
        let history = self.history.clone();
        let drained = wait_for(
            "every confirmation and owed delivery",
            self.config.drain,
            || {
                let left = history.outstanding();
                async move { (left == 0).then_some(()) }
            },
        )
        .await;
        if let Err(e) = drained {
            eprintln!("{e} ({} outstanding)", self.history.outstanding());
        }
        // Close every client, as users do at the end of the day.
        for client in &mut self.clients {
            client.stop.send_replace(true);
        }
        for client in &mut self.clients {
            let _ = tokio::time::timeout(Duration::from_secs(5), &mut client.task).await;
            client.departed = true;
        }
        // Nobody left: presence empty, no room held, no channel subscribed.
        let deadline = self.config.presence_deadline() + Duration::from_secs(3);
        let mut last_problem = String::new();
        let started = Instant::now();
        let clean = loop {
            match self.leftovers().await {
                Ok(problems) if problems.is_empty() => break true,
                Ok(problems) => last_problem = problems.join("; "),
                Err(e) => last_problem = e.to_string(),
            }
            if started.elapsed() > deadline {
                break false;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        if !clean {
            self.history.violation(Violation::LeakedSubscription {
                detail: format!(
                    "{:.1} s after every client left: {last_problem}",
                    deadline.as_secs_f64()
                ),
            });
        }
        let mut violations = self.history.check();
        violations.sort_by_key(|v| v.to_string());
        let report = RunReport {
            recoveries: self.recoveries.clone(),
            stats: self.history.stats(),
            violations,
            client_events: self.events.lock().expect("events").clone(),
            presence_ttl: self.config.presence_ttl,
        };
        // (The negative control expects violations: no logs to keep.)
        if !report.violations.is_empty() && !self.config.careless {
            let kept = self.keep_logs();
            eprintln!("violations found: logs kept in {}", kept.display());
        }
        Ok(report)
    }

    /// What is left once every client is gone: presence entries, rooms held by nodes
    /// (`gateway_rooms_local`), `gw:` channels subscribed in Redis.
    async fn leftovers(&self) -> Result<Vec<String>> {
        let mut problems = Vec::new();
        for (room, detail) in self.presence_diff().await {
            problems.push(format!("presence {room}: {detail}"));
        }
        for node in self.nodes.iter().filter(|n| n.proc.is_some()) {
            match node.metric("gateway_rooms_local").await {
                Some(rooms) if rooms > 0.0 => {
                    problems.push(format!("{} holds {rooms} rooms", node.id))
                }
                Some(_) => {}
                None => problems.push(format!("{} /metrics did not answer", node.id)),
            }
        }
        let mut con = self.redis.connection().await?;
        let channels: Vec<String> = redis::cmd("PUBSUB")
            .arg("CHANNELS")
            .arg("gw:*")
            .query_async(&mut con)
            .await?;
        if !channels.is_empty() {
            problems.push(format!("channels still subscribed: {channels:?}"));
        }
        Ok(problems)
    }

    /// Gateway RSS (KiB, per node) and Redis `used_memory` (bytes), for the soak.
    pub async fn memory(&self) -> Result<(Vec<u64>, u64)> {
        let mut rss = Vec::new();
        for node in &self.nodes {
            let kib = node
                .pid()
                .and_then(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
                .and_then(|s| {
                    s.lines()
                        .find(|l| l.starts_with("VmRSS:"))
                        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
                })
                .unwrap_or(0);
            rss.push(kib);
        }
        let mut con = self.redis.connection().await?;
        let info: String = redis::cmd("INFO")
            .arg("memory")
            .query_async(&mut con)
            .await?;
        let used = info
            .lines()
            .find_map(|l| l.strip_prefix("used_memory:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        Ok((rss, used))
    }
}

/// The pids of the worker processes of the nginx master `master` (from /proc).
fn nginx_workers(master: u32) -> Vec<u32> {
    let mut workers = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return workers;
    };
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // Fields after the command name (which may hold spaces) in parentheses.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let ppid = rest.split_whitespace().nth(1).and_then(|p| p.parse().ok());
        if ppid == Some(master) {
            workers.push(pid);
        }
    }
    workers
}

/// Runs `schedule` on a fresh lab: clients in, traffic on, a short calm, each fault in turn
/// (with its recovery measured), then the end checks. Prints the schedule and the report.
pub async fn run_schedule(config: LabConfig, schedule: &[Fault]) -> Result<RunReport> {
    let mut lab = ChaosLab::start(config).await?;
    lab.start_clients().await?;
    lab.traffic(true);
    let history = lab.history.clone();
    wait_for("traffic to flow", Duration::from_secs(20), || {
        let ok = history.stats().confirmed >= 20;
        async move { ok.then_some(()) }
    })
    .await?;
    for fault in schedule {
        println!("fault: {fault}");
        lab.inject(fault).await?;
    }
    let report = lab.finish().await?;
    println!("{report}");
    Ok(report)
}

/// Fails with the report when it holds violations.
pub fn assert_clean(report: &RunReport) -> Result<()> {
    if !report.violations.is_empty() {
        bail!("{} violations:\n{report}", report.violations.len());
    }
    Ok(())
}
