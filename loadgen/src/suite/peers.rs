//! The peers (issue 13, item 3): the gateway beside the tutorial's Node `ws` server
//! (`peers/tutorial-ws`) and Socket.IO 4.8 with @socket.io/redis-adapter on several Node
//! processes and one Redis (`peers/socketio`), each on fresh processes, with the same
//! generator and the same three scenarios; then the raw one-write floor (`ceiling-server`) at
//! the same rates. Server CPU is every server process's (Redis included); the report puts each
//! figure beside the gateway's and the floor's.

use std::collections::BTreeMap;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use e2e::report::Table;
use e2e::{free_port, Proc};
use serde::Serialize;

use super::{
    ceiling_run, cmd_out, cpu_of, find, no_during, rss_of, s, spawn_graceful, wait_for, Groups,
    Run, Stack, Suite, SuiteArgs,
};

/// A system under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum System {
    Gateway,
    Tutorial,
    Socketio,
}

impl System {
    pub(super) const ALL: [System; 3] = [System::Gateway, System::Tutorial, System::Socketio];

    fn key(self) -> &'static str {
        match self {
            System::Gateway => "gateway",
            System::Tutorial => "tutorial",
            System::Socketio => "socketio",
        }
    }

    fn label(self, nodes: usize) -> String {
        match self {
            System::Gateway => format!("this gateway, {nodes} nodes + Redis"),
            System::Tutorial => "the tutorial's server (Node `ws`), 1 process".into(),
            System::Socketio => {
                format!("Socket.IO 4.8 + @socket.io/redis-adapter, {nodes} Node processes + Redis")
            }
        }
    }

    fn chat_run(self) -> String {
        format!("peer-{}-chat", self.key())
    }

    fn max_run(self) -> String {
        format!("peer-{}-max", self.key())
    }
}

const RAW_CHAT: &str = "peer-raw-chat";
const RAW_MAX: &str = "peer-raw-max";

/// Idle connections held by one system: RSS of all its server processes before and while held.
#[derive(Debug, Clone, Serialize)]
pub(super) struct PeerIdle {
    pub system: String,
    pub connections: usize,
    pub held: u64,
    pub processes: usize,
    pub rss_before_kib: u64,
    pub rss_after_kib: u64,
    pub kib_per_conn: f64,
    pub errors: BTreeMap<String, u64>,
    pub command: String,
}

/// The running processes of one system, stopped when dropped.
struct Servers {
    /// The gateway's stack (Redis and nodes), or Socket.IO's Redis.
    _stack: Option<Stack>,
    _node: Vec<Proc>,
    urls: String,
    proto: &'static str,
    groups: Groups,
    pids: Vec<u32>,
}

fn port_open(port: u16) -> bool {
    TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(500),
    )
    .is_ok()
}

/// `npm ci` in a peer's directory when its `node_modules` is missing (the lock file pins
/// every version).
fn ensure_installed(npm: &Path, dir: &Path) -> Result<()> {
    if dir.join("node_modules").exists() {
        return Ok(());
    }
    eprintln!("suite: npm ci in {}", dir.display());
    let status = Command::new(npm)
        .args(["ci", "--no-audit", "--no-fund"])
        .current_dir(dir)
        .status()
        .with_context(|| format!("running {} ci", npm.display()))?;
    if !status.success() {
        bail!("npm ci failed in {}", dir.display());
    }
    Ok(())
}

/// One Node server process (`node <dir>/server.js`) on a free port, once it accepts.
fn start_node(
    suite: &Suite,
    name: &str,
    dir: &Path,
    env: &[(&str, String)],
) -> Result<(Proc, u16)> {
    let port = free_port();
    let log = std::fs::File::create(suite.runner.work.join(format!("{name}.log")))?;
    let mut cmd = Command::new(&suite.a.node_bin);
    cmd.arg(dir.join("server.js"))
        .env("PORT", port.to_string())
        .env("HOST", "127.0.0.1")
        .stdout(log.try_clone()?)
        .stderr(log);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let p = spawn_graceful(name, &mut cmd)?;
    wait_for(name, Duration::from_secs(20), || port_open(port))?;
    Ok((p, port))
}

impl Suite<'_> {
    fn peers_dir(&self) -> PathBuf {
        self.a
            .peers_dir
            .clone()
            .unwrap_or_else(|| self.stack.root.join("peers"))
    }

    /// A fresh stack of Redis and `nodes` processes (gateway nodes, or only Redis for Socket.IO).
    fn fresh_stack(&self, name: &str, nodes: usize) -> Result<Stack> {
        let work = self.runner.work.join(name);
        std::fs::create_dir_all(&work)?;
        let mut stack = Stack {
            root: self.stack.root.clone(),
            work,
            gateway_bin: self.stack.gateway_bin.clone(),
            nginx_bin: self.stack.nginx_bin.clone(),
            redis: None,
            redis_port: 0,
            nodes: Vec::new(),
        };
        stack.start_redis(&self.a.redis_bin)?;
        stack.start_nodes(nodes)?;
        Ok(stack)
    }

    fn start_system(&self, system: System) -> Result<Servers> {
        let nodes = self.a.nodes;
        let servers = match system {
            System::Gateway => {
                let stack = self.fresh_stack("peer-gateway", nodes)?;
                let redis = stack.redis.as_ref().map(|r| r.spawned_pid());
                let gateways = stack.node_pids();
                Servers {
                    urls: stack.node_urls().join(","),
                    proto: "json",
                    pids: gateways.iter().copied().chain(redis).collect(),
                    groups: Groups {
                        gateways,
                        nginx: None,
                        redis,
                        ceiling: None,
                        peers: vec![],
                    },
                    _stack: Some(stack),
                    _node: vec![],
                }
            }
            System::Tutorial => {
                let dir = self.peers_dir().join("tutorial-ws");
                ensure_installed(&self.a.npm_bin, &dir)?;
                let (p, port) = start_node(self, "peer-tutorial", &dir, &[])?;
                let pid = p.spawned_pid();
                Servers {
                    _stack: None,
                    _node: vec![p],
                    urls: format!("ws://127.0.0.1:{port}/"),
                    proto: "json",
                    pids: vec![pid],
                    groups: Groups {
                        gateways: vec![],
                        nginx: None,
                        redis: None,
                        ceiling: None,
                        peers: vec![pid],
                    },
                }
            }
            System::Socketio => self.start_socketio(nodes)?,
        };
        // Let the processes settle before the memory baseline.
        std::thread::sleep(Duration::from_secs(1));
        Ok(servers)
    }

    fn start_socketio(&self, nodes: usize) -> Result<Servers> {
        let dir = self.peers_dir().join("socketio");
        ensure_installed(&self.a.npm_bin, &dir)?;
        let stack = self.fresh_stack("peer-socketio", 0)?;
        let redis_url = format!("redis://127.0.0.1:{}", stack.redis_port);
        let mut procs = Vec::new();
        let mut urls = Vec::new();
        for k in 0..nodes {
            let (p, port) = start_node(
                self,
                &format!("peer-socketio-{k}"),
                &dir,
                &[("REDIS_URL", redis_url.clone())],
            )?;
            procs.push(p);
            urls.push(format!(
                "ws://127.0.0.1:{port}/socket.io/?EIO=4&transport=websocket"
            ));
        }
        let node_pids: Vec<u32> = procs.iter().map(Proc::spawned_pid).collect();
        let redis = stack.redis.as_ref().map(|r| r.spawned_pid());
        Ok(Servers {
            _stack: Some(stack),
            _node: procs,
            urls: urls.join(","),
            proto: "socketio",
            pids: node_pids.iter().copied().chain(redis).collect(),
            groups: Groups {
                gateways: vec![],
                nginx: None,
                redis,
                ceiling: None,
                peers: node_pids,
            },
        })
    }

    /// The peers phase: every system on fresh processes (idle connections first, then the big
    /// room at the chat rate, then saturated), and the raw floor at the same rates.
    pub(super) fn peers(&mut self) -> Result<()> {
        if !self.want("peers") {
            return Ok(());
        }
        eprintln!(
            "suite: peers with {}",
            cmd_out(&self.a.node_bin.display().to_string(), &["--version"])
        );
        self.runner.until_drained = true;
        let r = self.peer_runs();
        self.runner.until_drained = false;
        r
    }

    fn peer_runs(&mut self) -> Result<()> {
        for system in System::ALL {
            let servers = self.start_system(system)?;
            self.peer_idle(system, &servers)?;
            let a = self.a;
            let chat = bigroom_args(a, &servers, a.peer_rate, None);
            settle(&servers.pids);
            self.runner.run(
                &system.chat_run(),
                "direct",
                &chat,
                &servers.groups,
                no_during,
            )?;
            let max = bigroom_args(a, &servers, 0.0, Some(a.window));
            settle(&servers.pids);
            let run = self.runner.run(
                &system.max_run(),
                "direct",
                &max,
                &servers.groups,
                no_during,
            )?;
            if system == System::Gateway && run.report.bytes_per_delivery > 0.0 {
                self.frame_bytes = run.report.bytes_per_delivery.round() as usize;
            }
        }
        let (members, duration, rate) = (self.a.members, self.a.duration, self.a.peer_rate);
        let frame = self.frame_bytes;
        for (name, rate) in [(RAW_CHAT, rate), (RAW_MAX, 0.0)] {
            ceiling_run(
                &mut self.runner,
                &self.stack,
                name,
                "direct",
                members,
                frame,
                rate,
                1,
                duration,
            )?;
        }
        Ok(())
    }

    /// Idle logged-in connections (rooms of 50) on a system's fresh processes: the RSS of all
    /// its server processes before and while they are held.
    fn peer_idle(&mut self, system: System, servers: &Servers) -> Result<()> {
        let a = self.a;
        let n = a.peer_idle;
        let before = rss_of(&servers.pids);
        let args = vec![
            s("idle"),
            s("--url"),
            s(&servers.urls),
            s("--proto"),
            s(servers.proto),
            s("-c"),
            s(n),
            s("-d"),
            s(a.idle_hold),
            s("--connect-rate"),
            s(a.connect_rate),
            s("--room-size"),
            s(50),
            s("--drain"),
            s(0),
        ];
        let mut after = 0;
        let pids = servers.pids.clone();
        let hold = a.idle_hold;
        let run = self.runner.run(
            &format!("idle-peer-{}", system.key()),
            "direct",
            &args,
            &servers.groups,
            |ready, p| {
                wait_for("idle connections", Duration::from_secs(180), || {
                    ready.exists() || !p.is_running()
                })?;
                std::thread::sleep(Duration::from_secs_f64((hold / 2.0).min(3.0)));
                after = rss_of(&pids);
                Ok(())
            },
        )?;
        let held = run.report.joined;
        self.peer_idles.push(PeerIdle {
            system: system.key().into(),
            connections: n,
            held,
            processes: servers.pids.len(),
            rss_before_kib: before,
            rss_after_kib: after,
            kib_per_conn: if held > 0 {
                (after as f64 - before as f64) / held as f64
            } else {
                0.0
            },
            errors: run.report.errors.clone(),
            command: run.command.clone(),
        });
        Ok(())
    }
}

/// Waits (at most 60 s) until the servers are quiet (under 5% of a core for half a second):
/// a closed run's leave broadcasts (~500k frames for a room of 1000 in the tutorial's protocol)
/// must not fall into the next run's connect phase.
fn settle(pids: &[u32]) {
    let end = std::time::Instant::now() + Duration::from_secs(60);
    let mut last = cpu_of(pids);
    while std::time::Instant::now() < end {
        std::thread::sleep(Duration::from_millis(500));
        let now = cpu_of(pids);
        if now - last < 0.025 {
            return;
        }
        last = now;
    }
    eprintln!("suite: the servers did not go quiet within 60 s");
}

/// `bigroom` against a system: `rate` messages/s (0 = closed loop with `window`).
fn bigroom_args(a: &SuiteArgs, servers: &Servers, rate: f64, window: Option<u64>) -> Vec<String> {
    let mut args = vec![
        s("bigroom"),
        s("--url"),
        s(&servers.urls),
        s("--proto"),
        s(servers.proto),
        s("-c"),
        s(a.members),
        s("-d"),
        s(a.duration),
        s("--connect-rate"),
        s(a.peer_connect_rate),
        s("--rate"),
        s(rate),
        s("--senders"),
        s(3),
    ];
    if let Some(w) = window {
        args.extend([s("--window"), s(w)]);
    }
    args
}

/// Server CPU (every server process: gateways or Node processes, Redis, the raw server; not
/// the generator) in µs per delivery.
fn server_us(r: &Run) -> f64 {
    let c = &r.cpu;
    let cpu = c.gateways + c.redis + c.peers + c.ceiling_server + c.nginx;
    cpu * 1e6 / (r.report.delivered.max(1) as f64)
}

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 && a > 0.0 {
        format!("{:.2}×", a / b)
    } else {
        "–".into()
    }
}

fn thousands(v: f64) -> String {
    if v >= 10_000.0 {
        format!("{:.0}k", v / 1000.0)
    } else {
        format!("{v:.0}")
    }
}

/// The peers' section of the report: the table regenerated, the ratios, the checks.
pub(super) fn section(runs: &[Run], idles: &[PeerIdle], a: &SuiteArgs) -> String {
    let (nodes, window, rate) = (a.nodes, a.window, a.peer_rate);
    let mut o = String::from("## Peers: the tutorial's server and Socket.IO, same generator\n\n");
    let mut t = Table::plain(&[
        "",
        "chat rate: server CPU µs/delivery, p50/p99 ms",
        "saturation: deliveries/s at server CPU µs/delivery",
        "idle logged-in connections: RSS per connection, all server processes",
    ]);
    let idle_of = |k: &str| idles.iter().find(|i| i.system == k);
    for system in System::ALL {
        let chat = find(runs, &system.chat_run());
        let max = find(runs, &system.max_run());
        if chat.is_none() && max.is_none() {
            continue;
        }
        t.row(vec![
            system.label(nodes),
            chat.map(|r| {
                format!(
                    "{:.1}, {:.1}/{:.1}",
                    server_us(r),
                    r.report.latency.p50_ms,
                    r.report.latency.p99_ms
                )
            })
            .unwrap_or("–".into()),
            max.map(|r| {
                format!(
                    "{} at {:.1}",
                    thousands(r.report.delivered_per_s),
                    server_us(r)
                )
            })
            .unwrap_or("–".into()),
            idle_of(system.key())
                .map(|i| {
                    format!(
                        "{:.1} KiB ({} of {} held)",
                        i.kib_per_conn, i.held, i.connections
                    )
                })
                .unwrap_or("–".into()),
        ]);
    }
    let raw_chat = find(runs, RAW_CHAT);
    let raw_max = find(runs, RAW_MAX);
    if raw_chat.is_some() || raw_max.is_some() {
        t.row(vec![
            "raw floor: `ceiling-server`, one write per delivery".into(),
            raw_chat
                .map(|r| {
                    format!(
                        "{:.1}, {:.1}/{:.1}",
                        server_us(r),
                        r.report.latency.p50_ms,
                        r.report.latency.p99_ms
                    )
                })
                .unwrap_or("–".into()),
            raw_max
                .map(|r| {
                    format!(
                        "{} at {:.1}",
                        thousands(r.report.delivered_per_s),
                        server_us(r)
                    )
                })
                .unwrap_or("–".into()),
            "–".into(),
        ]);
    }
    o.push_str(&format!(
        "A room of the suite's members spread over the nodes; chat rate {rate:.0} messages/s (3 senders); \
         saturation: 3 closed-loop senders, {window} messages in flight each. Server CPU = utime + stime \
         of every server process (Redis included; not the generator) from the moment every \
         connection is in to the end of the drain (not the connects, not the closes and the \
         leave broadcasts they cause), per delivery. Idle: RSS of all server processes while \
         the connections are held minus before they connected (fresh processes), per connection. \
         Node.js {}.\n\n",
        cmd_out(&a.node_bin.display().to_string(), &["--version"])
    ));
    o.push_str(&t.markdown());
    o.push('\n');
    o.push_str(&ratios(runs, idles).markdown());
    o.push('\n');
    o
}

/// Each peer against the gateway and the raw floor.
fn ratios(runs: &[Run], idles: &[PeerIdle]) -> Table {
    let mut t = Table::plain(&[
        "ratio",
        "chat rate CPU/delivery vs raw floor",
        "chat rate CPU/delivery vs gateway",
        "chat rate p99 vs gateway",
        "saturation deliveries/s vs gateway",
        "saturation deliveries/s vs raw floor",
        "saturation CPU/delivery vs gateway",
        "idle RSS/connection vs gateway",
    ]);
    let cpu = |name: &str| find(runs, name).map(server_us).unwrap_or(0.0);
    let rate = |name: &str| {
        find(runs, name)
            .map(|r| r.report.delivered_per_s)
            .unwrap_or(0.0)
    };
    let p99 = |name: &str| {
        find(runs, name)
            .map(|r| r.report.latency.p99_ms)
            .unwrap_or(0.0)
    };
    let rss = |k: &str| {
        idles
            .iter()
            .find(|i| i.system == k)
            .map(|i| i.kib_per_conn)
            .unwrap_or(0.0)
    };
    let g = System::Gateway;
    for system in System::ALL {
        t.row(vec![
            system.key().to_string(),
            ratio(cpu(&system.chat_run()), cpu(RAW_CHAT)),
            ratio(cpu(&system.chat_run()), cpu(&g.chat_run())),
            ratio(p99(&system.chat_run()), p99(&g.chat_run())),
            ratio(rate(&system.max_run()), rate(&g.max_run())),
            ratio(rate(&system.max_run()), rate(RAW_MAX)),
            ratio(cpu(&system.max_run()), cpu(&g.max_run())),
            ratio(rss(system.key()), rss(g.key())),
        ]);
    }
    t
}
