//! The benchmark suite: starts Redis, the gateway nodes and nginx (from the repo's template),
//! runs the scenarios and the raw ceiling, samples CPU time and RSS of every process, and
//! writes a Markdown report plus JSON.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use e2e::procfs::{clock_ticks, cpu_seconds, machine_jiffies, status_kib};
use e2e::report::Table;
use e2e::{free_port, Proc};
use serde::Serialize;

use crate::stats::Report;

mod peers;

#[derive(Debug, Clone, clap::Args)]
pub struct SuiteArgs {
    /// The gateway binary (default: $GATEWAY_BIN, else <root>/target/release/gateway).
    #[arg(long)]
    pub gateway_bin: Option<PathBuf>,
    #[arg(long, default_value = "/usr/sbin/nginx")]
    pub nginx_bin: PathBuf,
    #[arg(long, default_value = "redis-server")]
    pub redis_bin: PathBuf,
    /// The workspace root (holds deploy/ and docs/); default: the current directory.
    #[arg(long)]
    pub root: Option<PathBuf>,
    /// Gateway nodes.
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// Seconds of each throughput run.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Members of the big room.
    #[arg(long, default_value_t = 1000)]
    pub members: usize,
    /// Closed-loop window per sender in the saturation runs.
    #[arg(long, default_value_t = 16)]
    pub window: u64,
    /// Idle connections per node, directly (gateway RSS per connection).
    #[arg(long, default_value_t = 15_000)]
    pub idle_per_node: usize,
    /// Idle connections through nginx, presence on.
    #[arg(long, default_value_t = 50_000)]
    pub idle_nginx: usize,
    /// Seconds to hold the idle connections.
    #[arg(long, default_value_t = 10.0)]
    pub idle_hold: f64,
    /// Offered connect rate of the idle runs (connections/s).
    #[arg(long, default_value_t = 1000.0)]
    pub connect_rate: f64,
    /// Also try the stretch target: this many idle connections through nginx, with
    /// `--stretch-nodes` nodes (0 = skip).
    #[arg(long, default_value_t = 0)]
    pub stretch: usize,
    #[arg(long, default_value_t = 6)]
    pub stretch_nodes: usize,
    /// Node.js, for the peers (the tutorial's server and Socket.IO).
    #[arg(long, default_value = "node")]
    pub node_bin: PathBuf,
    /// npm, to install a peer's locked dependencies when its node_modules is missing.
    #[arg(long, default_value = "npm")]
    pub npm_bin: PathBuf,
    /// The peers' sources (default: <root>/peers).
    #[arg(long)]
    pub peers_dir: Option<PathBuf>,
    /// Idle logged-in connections per system in the peers phase.
    #[arg(long, default_value_t = 5_000)]
    pub peer_idle: usize,
    /// Connect rate of the peers phase's big-room runs: every login is announced to the whole
    /// room by the tutorial's protocol, so a room of 1000 costs ~500k frames to fill (at 250/s
    /// and 100/s the Node servers let up to 92 of 1000 connections time out on this machine
    /// while it was shared).
    #[arg(long, default_value_t = 50.0)]
    pub peer_connect_rate: f64,
    /// Messages/s into the big room in the peers phase's chat-rate runs.
    #[arg(long, default_value_t = 20.0)]
    pub peer_rate: f64,
    /// Scenarios to run (default all): ceiling,bigroom,latency,rooms,churn,reliable,idle,peers.
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// Profile the gateways with `perf` during the big-room run through nginx.
    #[arg(long)]
    pub perf: bool,
    /// The report (default: docs/benchmarks.md for a whole run; with `--only`, report.md in
    /// the scratch directory, so that a partial run never replaces the committed report).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// The raw figures (default: docs/benchmarks.json for a whole run; with `--only`,
    /// report.json in the scratch directory).
    #[arg(long)]
    pub json_out: Option<PathBuf>,
    /// Scratch directory for configs and logs (default: a fresh one under /tmp).
    #[arg(long)]
    pub workdir: Option<PathBuf>,
}

/// A child process of the suite: SIGTERM when dropped, then SIGKILL (an nginx master takes
/// its workers down on SIGTERM; SIGKILL would leave them running).
fn spawn_graceful(name: &str, cmd: &mut Command) -> Result<Proc> {
    Ok(Proc::spawn(name, cmd)?.graceful())
}

fn wait_for(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) -> Result<()> {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if check() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("timed out waiting for {what}")
}

fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr.parse().ok()?, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut buf = String::new();
    let _ = s.read_to_string(&mut buf);
    let status = buf.split_whitespace().nth(1)?.parse().ok()?;
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((status, body))
}

fn http_status(addr: &str, path: &str) -> Option<u16> {
    http_get(addr, path).map(|(s, _)| s)
}

/// `gateway_connections_open` of one node (from its admin /metrics).
fn open_connections(admin: u16) -> Option<u64> {
    let (_, body) = http_get(&format!("127.0.0.1:{admin}"), "/metrics")?;
    let v: f64 = body
        .lines()
        .filter(|l| l.starts_with("gateway_connections_open"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    Some(v as u64)
}

fn redis_ping(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    if s.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 16];
    matches!(s.read(&mut buf), Ok(n) if buf[..n].starts_with(b"+PONG"))
}

/// The pids of `pid` and its direct children (nginx master + workers).
fn with_children(pid: u32) -> Vec<u32> {
    let mut pids = vec![pid];
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let name = e.file_name();
            let Some(p) = name.to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) {
                let ppid = stat
                    .rfind(')')
                    .and_then(|i| stat[i + 2..].split_whitespace().nth(1))
                    .and_then(|s| s.parse::<u32>().ok());
                if ppid == Some(pid) {
                    pids.push(p);
                }
            }
        }
    }
    pids
}

fn cpu_of(pids: &[u32]) -> f64 {
    pids.iter().map(cpu_seconds).sum()
}

fn rss_of(pids: &[u32]) -> u64 {
    pids.iter().filter_map(|p| status_kib(p, "VmRSS:")).sum()
}

struct Stack {
    root: PathBuf,
    work: PathBuf,
    gateway_bin: PathBuf,
    nginx_bin: PathBuf,
    redis: Option<Proc>,
    redis_port: u16,
    nodes: Vec<(Proc, u16, u16)>,
}

impl Stack {
    fn start_redis(&mut self, redis_bin: &Path) -> Result<()> {
        let port = free_port();
        let log = std::fs::File::create(self.work.join("redis.log"))?;
        let p = spawn_graceful(
            "redis-server",
            Command::new(redis_bin)
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
                .args(["--maxclients", "10000", "--loglevel", "warning"])
                .stdout(log.try_clone()?)
                .stderr(log),
        )?;
        self.redis = Some(p);
        self.redis_port = port;
        wait_for("redis", Duration::from_secs(10), || redis_ping(port))
    }

    fn start_nodes(&mut self, n: usize) -> Result<()> {
        for k in self.nodes.len()..n {
            let port = free_port();
            let admin = free_port();
            let log = std::fs::File::create(self.work.join(format!("gateway-{k}.log")))?;
            let p = spawn_graceful(
                &format!("gateway node-{k}"),
                Command::new(&self.gateway_bin)
                    .env("GATEWAY_LISTEN", format!("127.0.0.1:{port}"))
                    .env("GATEWAY_ADMIN_LISTEN", format!("127.0.0.1:{admin}"))
                    .env(
                        "GATEWAY_REDIS_URL",
                        format!("redis://127.0.0.1:{}/", self.redis_port),
                    )
                    .env("GATEWAY_NODE_ID", format!("node-{k}"))
                    .env("GATEWAY_MAX_CONNECTIONS", "19500")
                    // nginx runs on loopback: believe its X-Forwarded-For, so connections
                    // through it count against their own source address's limit.
                    .env("GATEWAY_TRUSTED_PROXIES", "127.0.0.1")
                    .env("RUST_LOG", "warn")
                    .stdout(log.try_clone()?)
                    .stderr(log),
            )?;
            self.nodes.push((p, port, admin));
            let addr = format!("127.0.0.1:{admin}");
            wait_for(
                &format!("gateway node-{k} /healthz"),
                Duration::from_secs(20),
                || http_status(&addr, "/healthz") == Some(200),
            )?;
        }
        Ok(())
    }

    fn stop_nodes_from(&mut self, n: usize) {
        self.nodes.truncate(n);
    }

    fn node_urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|(_, port, _)| format!("ws://127.0.0.1:{port}/ws"))
            .collect()
    }

    fn node_pids(&self) -> Vec<u32> {
        self.nodes.iter().map(|(p, _, _)| p.spawned_pid()).collect()
    }

    /// nginx from deploy/nginx/nginx.conf.template in front of `upstreams`.
    fn start_nginx(&self, name: &str, upstreams: &[u16], workers: usize) -> Result<(Proc, u16)> {
        let template = std::fs::read_to_string(self.root.join("deploy/nginx/nginx.conf.template"))
            .context("reading deploy/nginx/nginx.conf.template")?;
        let port = free_port();
        let prefix = self.work.join(format!("nginx-{name}"));
        std::fs::create_dir_all(&prefix)?;
        let servers: String = upstreams
            .iter()
            .map(|p| format!("server 127.0.0.1:{p};\n        "))
            .collect();
        // The template's one renderer (the e2e harness's), so a new placeholder reaches
        // every stack that renders it.
        let vars: Vec<(String, String)> = [
            ("NGINX_LISTEN", format!("127.0.0.1:{port}")),
            ("NGINX_UPSTREAM_SERVERS", servers),
            ("NGINX_WORKER_PROCESSES", workers.to_string()),
            ("NGINX_WORKER_CONNECTIONS", "19000".to_string()),
            ("NGINX_WORKER_RLIMIT_NOFILE", "20000".to_string()),
            ("NGINX_PREFIX", prefix.display().to_string()),
            ("NGINX_ACCESS_LOG", "off".to_string()),
            ("NGINX_RESOLVER", e2e::nginx::LOCAL_RESOLVER.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let conf = e2e::nginx::render(&template, &vars)?;
        let path = prefix.join("nginx.conf");
        std::fs::write(&path, conf)?;
        let log = std::fs::File::create(self.work.join(format!("nginx-{name}.log")))?;
        let p = spawn_graceful(
            &format!("nginx {name}"),
            Command::new(&self.nginx_bin)
                .arg("-p")
                .arg(&prefix)
                .arg("-c")
                .arg(&path)
                .stdout(log.try_clone()?)
                .stderr(log),
        )?;
        let addr = format!("127.0.0.1:{port}");
        wait_for("nginx", Duration::from_secs(10), || {
            http_status(&addr, "/nginx-health") == Some(200)
        })?;
        Ok((p, port))
    }
}

/// CPU seconds of each measured process group over one run.
#[derive(Debug, Clone, Default, Serialize)]
struct Cpu {
    gateways: f64,
    nginx: f64,
    redis: f64,
    ceiling_server: f64,
    /// The peers' Node processes (the tutorial's server, Socket.IO).
    peers: f64,
    generator: f64,
}

impl Cpu {
    fn total(&self) -> f64 {
        self.gateways + self.nginx + self.redis + self.ceiling_server + self.peers + self.generator
    }
}

#[derive(Debug, Clone, Serialize)]
struct Run {
    name: String,
    path: String,
    command: String,
    wall_s: f64,
    report: Report,
    cpu: Cpu,
    /// Cores busy on the whole machine during the run (/proc/stat), measured processes or not.
    machine_busy_cores: f64,
}

struct Groups {
    gateways: Vec<u32>,
    nginx: Option<u32>,
    redis: Option<u32>,
    ceiling: Option<u32>,
    peers: Vec<u32>,
}

impl Groups {
    fn sample(&self) -> Cpu {
        Cpu {
            gateways: cpu_of(&self.gateways),
            nginx: self.nginx.map(|p| cpu_of(&with_children(p))).unwrap_or(0.0),
            redis: self.redis.map(|p| cpu_of(&[p])).unwrap_or(0.0),
            ceiling_server: self.ceiling.map(|p| cpu_of(&[p])).unwrap_or(0.0),
            peers: cpu_of(&self.peers),
            generator: 0.0,
        }
    }
}

struct Runner {
    exe: PathBuf,
    work: PathBuf,
    runs: Vec<Run>,
    /// Sample the servers' CPU when the generator's drain ends (`--drained-file`) instead of
    /// when it exits (the peers phase).
    until_drained: bool,
}

impl Runner {
    /// Runs the generator with `args`, sampling the CPU of `groups` around it.
    fn run(
        &mut self,
        name: &str,
        path: &str,
        args: &[String],
        groups: &Groups,
        during: impl FnOnce(&Path, &mut Proc) -> Result<()>,
    ) -> Result<Run> {
        let json = self.work.join(format!("{name}.json"));
        let ready = self.work.join(format!("{name}.ready"));
        let drained = self.work.join(format!("{name}.drained"));
        let _ = std::fs::remove_file(&json);
        let _ = std::fs::remove_file(&ready);
        let _ = std::fs::remove_file(&drained);
        let log = std::fs::File::create(self.work.join(format!("{name}.log")))?;
        let mut full: Vec<String> = args.to_vec();
        full.extend([
            "--json".into(),
            json.display().to_string(),
            "--ready-file".into(),
            ready.display().to_string(),
        ]);
        if self.until_drained {
            full.extend(["--drained-file".into(), drained.display().to_string()]);
        }
        let command = format!("loadgen {}", args.join(" "));
        eprintln!("suite: {name}: {command}");
        let mut p = spawn_graceful(
            name,
            Command::new(&self.exe)
                .args(&full)
                .stdout(log.try_clone()?)
                .stderr(log),
        )?;
        // CPU is measured from the moment every connection is in (the measured phase, the
        // drain and the close), not over the connect phase.
        wait_for(
            &format!("{name} connections"),
            Duration::from_secs(300),
            || ready.exists() || !p.is_running(),
        )?;
        let before = groups.sample();
        let jiffies = machine_jiffies();
        let t = Instant::now();
        during(&ready, &mut p)?;
        if self.until_drained {
            // Up to the end of the drain: not the closes (and the leave broadcasts they cause).
            wait_for(&format!("{name} drained"), Duration::from_secs(900), || {
                drained.exists() || !p.is_running()
            })?;
        }
        let wall_s = t.elapsed().as_secs_f64();
        let after = groups.sample();
        let jiffies_after = machine_jiffies();
        let status = p
            .wait_blocking()
            .with_context(|| format!("waiting for {}", p.name))?;
        let busy = jiffies_after.0.saturating_sub(jiffies.0) as f64;
        let machine_busy_cores = busy / clock_ticks() / wall_s.max(1e-3);
        if !status.success() {
            bail!(
                "{name} failed ({status}); see {}",
                self.work.join(format!("{name}.log")).display()
            );
        }
        let report: Report = serde_json::from_slice(&std::fs::read(&json)?)?;
        let cpu = Cpu {
            gateways: after.gateways - before.gateways,
            nginx: after.nginx - before.nginx,
            redis: after.redis - before.redis,
            ceiling_server: after.ceiling_server - before.ceiling_server,
            peers: after.peers - before.peers,
            generator: report.cpu_s,
        };
        eprintln!(
            "suite: {name}: {:.0} deliveries/s, p50 {:.3} ms, p99 {:.3} ms, lost {}, errors {:?}",
            report.delivered_per_s,
            report.latency.p50_ms,
            report.latency.p99_ms,
            report.lost,
            report.errors
        );
        let run = Run {
            name: name.to_string(),
            path: path.to_string(),
            command,
            wall_s,
            report,
            cpu,
            machine_busy_cores,
        };
        self.runs.push(run.clone());
        Ok(run)
    }
}

fn no_during(_: &Path, _: &mut Proc) -> Result<()> {
    Ok(())
}

fn s(v: impl ToString) -> String {
    v.to_string()
}

#[derive(Debug, Clone, Default, Serialize)]
struct Idle {
    name: String,
    connections: usize,
    held: u64,
    connect_rate: f64,
    gateway_rss_before_kib: Vec<u64>,
    gateway_rss_after_kib: Vec<u64>,
    per_node_connections: f64,
    gateway_kib_per_conn: f64,
    nginx_rss_kib: u64,
    nginx_workers: usize,
    /// `gateway_connections_open` of each node while the connections were held.
    gateway_open: Vec<u64>,
    errors: std::collections::BTreeMap<String, u64>,
    command: String,
}

#[derive(Debug, Clone, Serialize)]
struct Machine {
    cpu: String,
    cores: usize,
    mem_gib: f64,
    kernel: String,
    nofile: u64,
    nginx: String,
    redis: String,
    commit: String,
    date: String,
}

fn cmd_out(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .map(|o| {
            let mut s = String::from_utf8_lossy(&o.stdout).trim().to_string();
            if s.is_empty() {
                s = String::from_utf8_lossy(&o.stderr).trim().to_string();
            }
            s
        })
        .unwrap_or_default()
}

fn machine(root: &Path, a: &SuiteArgs) -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("?")
        .trim()
        .to_string();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let mem_kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))?
                .split_whitespace()
                .nth(1)?
                .parse::<u64>()
                .ok()
        })
        .unwrap_or(0);
    let root_s = root.display().to_string();
    let commit = cmd_out("git", &["-C", &root_s, "rev-parse", "--short=12", "HEAD"]);
    let dirty = !cmd_out(
        "git",
        &[
            "-C",
            &root_s,
            "status",
            "--porcelain",
            "--",
            "gateway",
            "loadgen",
        ],
    )
    .is_empty();
    Machine {
        cpu,
        cores,
        mem_gib: mem_kib as f64 / 1048576.0,
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_string(),
        nofile: crate::workers::nofile_limit(),
        nginx: cmd_out(&a.nginx_bin.display().to_string(), &["-v"]),
        redis: cmd_out(&a.redis_bin.display().to_string(), &["--version"]),
        commit: if dirty {
            format!("{commit} (with uncommitted changes in gateway/ or loadgen/)")
        } else {
            commit
        },
        date: cmd_out("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
    }
}

#[derive(Serialize)]
struct SuiteJson<'a> {
    command: String,
    machine: &'a Machine,
    settings: serde_json::Value,
    runs: &'a [Run],
    idle: &'a [Idle],
    peer_idle: &'a [peers::PeerIdle],
    profile: &'a str,
}

pub fn main(a: SuiteArgs) -> Result<()> {
    if a.duration <= 0.0 || a.duration > 120.0 {
        bail!("--duration must be in (0, 120] seconds per run");
    }
    let (root, gateway_bin) = locate(&a)?;
    let work = match &a.workdir {
        Some(w) => w.clone(),
        None => std::env::temp_dir().join(format!("loadgen-suite-{}", std::process::id())),
    };
    std::fs::create_dir_all(&work)?;
    eprintln!("suite: logs and configs in {}", work.display());
    let machine = machine(&root, &a);
    let command = format!(
        "loadgen {}",
        std::env::args().skip(1).collect::<Vec<_>>().join(" ")
    );

    let mut stack = Stack {
        root: root.clone(),
        work: work.clone(),
        gateway_bin: gateway_bin.clone(),
        nginx_bin: a.nginx_bin.clone(),
        redis: None,
        redis_port: 0,
        nodes: Vec::new(),
    };
    // The peers phase starts stacks of its own: alone, it needs neither the main stack nor nginx.
    let peers_only = a.only.iter().all(|o| o == "peers") && !a.only.is_empty();
    let mut nginx = None;
    if !peers_only {
        stack.start_redis(&a.redis_bin)?;
        stack.start_nodes(a.nodes)?;
        let node_ports: Vec<u16> = stack.nodes.iter().map(|n| n.1).collect();
        nginx = Some(stack.start_nginx("main", &node_ports, 2)?);
    }
    let mut suite = Suite::new(&a, stack, nginx.as_ref(), work)?;
    suite.bigroom_max()?;
    suite.ceiling_max()?;
    suite.latency_fractions()?;
    suite.latency_floor()?;
    suite.rooms()?;
    suite.churn()?;
    suite.reliable()?;
    suite.peers()?;
    drop(nginx);
    let idles = suite.idle()?;
    write_reports(&a, &root, &gateway_bin, &command, &machine, &suite, &idles)
}

/// The workspace root and the gateway binary (which must exist).
fn locate(a: &SuiteArgs) -> Result<(PathBuf, PathBuf)> {
    let root = a
        .root
        .clone()
        .unwrap_or(std::env::current_dir()?)
        .canonicalize()?;
    let gateway_bin = a
        .gateway_bin
        .clone()
        .or_else(|| std::env::var_os("GATEWAY_BIN").map(PathBuf::from))
        .unwrap_or_else(|| root.join("target/release/gateway"));
    if !gateway_bin.exists() {
        bail!(
            "gateway binary {} not found (build it with cargo build --release -p gateway)",
            gateway_bin.display()
        );
    }
    Ok((root, gateway_bin))
}

/// The suite while it runs: the stack, the runs so far, and what later scenarios take from
/// earlier ones (the frame size, the maximum rates, the profile).
struct Suite<'a> {
    a: &'a SuiteArgs,
    stack: Stack,
    runner: Runner,
    /// The processes whose CPU every run through the main stack samples.
    groups: Groups,
    /// The nodes' URLs, comma-separated, and the main nginx's.
    direct: String,
    nginx_url: String,
    /// Bytes per delivery in the saturated big room (the raw ceiling sends frames this size).
    frame_bytes: usize,
    /// Deliveries/s of the saturated big room, by path.
    max_rate: std::collections::HashMap<&'static str, f64>,
    /// The gateways' `perf report` during the big room through nginx (`--perf`).
    profile: String,
    /// The peers phase's idle runs.
    peer_idles: Vec<peers::PeerIdle>,
}

impl<'a> Suite<'a> {
    fn new(
        a: &'a SuiteArgs,
        stack: Stack,
        nginx: Option<&(Proc, u16)>,
        work: PathBuf,
    ) -> Result<Suite<'a>> {
        let nginx_port = nginx.map(|n| n.1).unwrap_or(0);
        let groups = Groups {
            gateways: stack.node_pids(),
            nginx: nginx.map(|n| n.0.spawned_pid()),
            redis: stack.redis.as_ref().map(|r| r.spawned_pid()),
            ceiling: None,
            peers: vec![],
        };
        Ok(Suite {
            a,
            direct: stack.node_urls().join(","),
            nginx_url: format!("ws://127.0.0.1:{nginx_port}/ws"),
            stack,
            runner: Runner {
                exe: std::env::current_exe()?,
                work,
                runs: Vec::new(),
                until_drained: false,
            },
            groups,
            frame_bytes: 260,
            max_rate: std::collections::HashMap::new(),
            profile: String::new(),
            peer_idles: Vec::new(),
        })
    }

    /// Whether `--only` selects scenario `n` (everything when empty).
    fn want(&self, n: &str) -> bool {
        self.a.only.is_empty() || self.a.only.iter().any(|o| o == n)
    }

    /// The two paths of the main stack, with their URLs: the nodes directly, and nginx.
    fn paths(&self) -> [(&'static str, String); 2] {
        [
            ("direct", self.direct.clone()),
            ("nginx", self.nginx_url.clone()),
        ]
    }

    /// Messages per batch in the batched ceiling runs: as many as the closed loop keeps in
    /// flight.
    fn batched(&self) -> usize {
        (self.a.window * 3) as usize
    }

    /// Phase 1: the big room, saturated (closed loop), direct and through nginx: the maximum rate of
    /// each path (and, with `--perf`, the gateways' profile through nginx).
    fn bigroom_max(&mut self) -> Result<()> {
        if !(self.want("bigroom") || self.want("latency") || self.want("ceiling")) {
            return Ok(());
        }
        let a = self.a;
        for (path, url) in self.paths() {
            let args = vec![
                s("bigroom"),
                s("--url"),
                s(url),
                s("-c"),
                s(a.members),
                s("-d"),
                s(a.duration),
                s("--rate"),
                s(0),
                s("--senders"),
                s(3),
                s("--window"),
                s(a.window),
            ];
            let perf_out = self.runner.work.join("perf.data");
            let do_perf = a.perf && path == "nginx";
            let pids = self.stack.node_pids();
            let run = self.runner.run(
                &format!("bigroom-max-{path}"),
                path,
                &args,
                &self.groups,
                |ready, p| {
                    if do_perf {
                        perf_record(ready, p, &pids, a.duration, &perf_out)?;
                    }
                    Ok(())
                },
            )?;
            if do_perf {
                if let Some(profile) = perf_report(&perf_out) {
                    self.profile = profile;
                }
            }
            if run.report.bytes_per_delivery > 0.0 {
                self.frame_bytes = run.report.bytes_per_delivery.round() as usize;
            }
            self.max_rate.insert(path, run.report.delivered_per_s);
        }
        Ok(())
    }

    /// One raw-ceiling run of this suite's stack and frame size.
    fn ceiling(
        &mut self,
        name: &str,
        path: &str,
        members: usize,
        rate: f64,
        batch: usize,
        duration: f64,
    ) -> Result<Run> {
        let frame_bytes = self.frame_bytes;
        ceiling_run(
            &mut self.runner,
            &self.stack,
            name,
            path,
            members,
            frame_bytes,
            rate,
            batch,
            duration,
        )
    }

    /// Phase 2: the raw ceiling, direct and through the same nginx template: one write per delivery,
    /// and batched (as many messages per write as the closed loop keeps in flight).
    fn ceiling_max(&mut self) -> Result<()> {
        if !self.want("ceiling") {
            return Ok(());
        }
        let batched = self.batched();
        for (path, batch) in [
            ("direct", 1),
            ("nginx", 1),
            ("direct", batched),
            ("nginx", batched),
        ] {
            let name = if batch == 1 {
                format!("ceiling-{path}")
            } else {
                format!("ceiling-batched-{path}")
            };
            self.ceiling(&name, path, self.a.members, 0.0, batch, self.a.duration)?;
        }
        Ok(())
    }

    /// Phase 3: latency at half the maximum rate (the target), and at lower fractions of it (to show
    /// where the latency targets hold); the raw ceiling at half and 3% for reference.
    fn latency_fractions(&mut self) -> Result<()> {
        if !self.want("latency") {
            return Ok(());
        }
        let a = self.a;
        for (path, url) in self.paths() {
            let Some(max) = self.max_rate.get(path).copied() else {
                continue;
            };
            for (fraction, name) in [
                (0.5, format!("bigroom-half-{path}")),
                (0.25, format!("bigroom-25pct-{path}")),
                (0.1, format!("bigroom-10pct-{path}")),
                (0.03, format!("bigroom-3pct-{path}")),
            ] {
                let msgs = (max * fraction / a.members as f64).max(1.0).round();
                let d = if fraction == 0.5 {
                    a.duration
                } else {
                    a.duration.min(6.0)
                };
                let args = vec![
                    s("bigroom"),
                    s("--url"),
                    s(&url),
                    s("-c"),
                    s(a.members),
                    s("-d"),
                    s(d),
                    s("--rate"),
                    s(msgs),
                    s("--senders"),
                    s(3),
                ];
                self.runner
                    .run(&name, path, &args, &self.groups, no_during)?;
            }
            // The raw ceiling at the same rates (half and 3%), for its latency (it writes what
            // fell due since its last round in one write, like a server draining a queue).
            if self.want("ceiling") {
                for (fraction, label) in [(0.5, "half"), (0.03, "3pct")] {
                    let msgs = (max * fraction / a.members as f64).max(1.0).round();
                    let d = if fraction == 0.5 {
                        a.duration
                    } else {
                        a.duration.min(6.0)
                    };
                    let name = format!("ceiling-{label}-{path}");
                    self.ceiling(&name, path, a.members, msgs, self.batched(), d)?;
                }
            }
        }
        Ok(())
    }

    /// Phase 3b: the latency floor: a room of 10 members at 100 messages/s (the fan-out is too small
    /// to queue), gateway and raw ceiling, directly and through nginx.
    fn latency_floor(&mut self) -> Result<()> {
        if !self.want("latency") {
            return Ok(());
        }
        let d = self.a.duration.min(5.0);
        for (path, url) in self.paths() {
            let args = vec![
                s("bigroom"),
                s("--url"),
                s(url),
                s("-c"),
                s(10),
                s("-d"),
                s(d),
                s("--rate"),
                s(100),
                s("--senders"),
                s(3),
            ];
            let name = format!("bigroom-floor-{path}");
            self.runner
                .run(&name, path, &args, &self.groups, no_during)?;
            if self.want("ceiling") {
                let name = format!("ceiling-floor-{path}");
                self.ceiling(&name, path, 10, 100.0, self.batched(), d)?;
            }
        }
        Ok(())
    }

    /// The saturated big room's rate through nginx (or a guess when it did not run): the chat
    /// scenarios offer a fraction of it.
    fn nginx_max(&self) -> f64 {
        self.max_rate.get("nginx").copied().unwrap_or(60_000.0)
    }

    /// Phase 4a: many small rooms through nginx, at 15% of the big room's maximum (rooms average
    /// 30 members).
    fn rooms(&mut self) -> Result<()> {
        if !self.want("rooms") {
            return Ok(());
        }
        let rooms_rate = (self.nginx_max() * 0.15 / 30.0).round().max(10.0);
        let args = vec![
            s("rooms"),
            s("--url"),
            s(&self.nginx_url),
            s("-c"),
            s(5000),
            s("-d"),
            s(self.a.duration),
            s("--rate"),
            s(rooms_rate),
            s("--room-min"),
            s(10),
            s("--room-max"),
            s(50),
            s("--senders-per-room"),
            s(3),
        ];
        self.runner
            .run("rooms", "nginx", &args, &self.groups, no_during)?;
        Ok(())
    }

    /// Phase 4b: connection churn through nginx.
    fn churn(&mut self) -> Result<()> {
        if !self.want("churn") {
            return Ok(());
        }
        let args = vec![
            s("churn"),
            s("--url"),
            s(&self.nginx_url),
            s("-c"),
            s(200),
            s("-d"),
            s(self.a.duration),
            s("--rooms"),
            s(50),
            s("--messages"),
            s(2),
            s("--source-addrs"),
            s(4),
        ];
        self.runner
            .run("churn", "nginx", &args, &self.groups, no_during)?;
        Ok(())
    }

    /// Phase 4c: reliable delivery with reconnects through nginx, at 10% of the big room's maximum
    /// (rooms of 20 on average).
    fn reliable(&mut self) -> Result<()> {
        if !self.want("reliable") {
            return Ok(());
        }
        let reliable_rate = (self.nginx_max() * 0.1 / 20.0).round().max(10.0);
        let args = vec![
            s("reliable"),
            s("--url"),
            s(&self.nginx_url),
            s("-c"),
            s(1000),
            s("-d"),
            s(self.a.duration),
            s("--rate"),
            s(reliable_rate),
            s("--room-min"),
            s(10),
            s("--room-max"),
            s(30),
            s("--senders-per-room"),
            s(2),
            s("--reconnect-every"),
            s(3),
            s("--drain"),
            s(10),
        ];
        self.runner
            .run("reliable", "nginx", &args, &self.groups, no_during)?;
        Ok(())
    }

    /// Phase 5: idle connections: RSS per connection directly, then the big count through an nginx
    /// of its own, then (with `--stretch`) the stretch target on more nodes.
    fn idle(&mut self) -> Result<Vec<Idle>> {
        let mut idles = Vec::new();
        if !self.want("idle") {
            return Ok(idles);
        }
        let a = self.a;
        let n = a.idle_per_node * a.nodes;
        idles.push(idle_run(
            &mut self.runner,
            &self.stack,
            "idle-direct",
            n,
            None,
            a.idle_hold,
            a.nodes,
            a.connect_rate,
            None,
        )?);
        let baseline = idles[0].gateway_rss_before_kib.clone();
        let workers = (a.idle_nginx * 2).div_ceil(15_000) + 1;
        let ports: Vec<u16> = self.stack.nodes.iter().map(|n| n.1).collect();
        let (ng, port) = self.stack.start_nginx("idle", &ports, workers)?;
        idles.push(idle_run(
            &mut self.runner,
            &self.stack,
            "idle-nginx",
            a.idle_nginx,
            Some((&ng, port, workers)),
            a.idle_hold,
            a.nodes,
            a.connect_rate,
            Some(&baseline),
        )?);
        drop(ng);
        if a.stretch > 0 {
            idles.push(self.idle_stretch(&baseline)?);
        }
        Ok(idles)
    }

    /// The stretch target: `--stretch` idle connections through nginx over `--stretch-nodes`
    /// nodes (the extra nodes stop afterwards).
    fn idle_stretch(&mut self, baseline: &[u64]) -> Result<Idle> {
        let a = self.a;
        self.stack.start_nodes(a.stretch_nodes)?;
        let ports: Vec<u16> = self.stack.nodes.iter().map(|n| n.1).collect();
        let workers = (a.stretch * 2).div_ceil(15_000) + 1;
        let (ng, port) = self.stack.start_nginx("stretch", &ports, workers)?;
        let r = idle_run(
            &mut self.runner,
            &self.stack,
            "idle-stretch",
            a.stretch,
            Some((&ng, port, workers)),
            a.idle_hold,
            a.stretch_nodes,
            a.connect_rate,
            Some(baseline),
        );
        drop(ng);
        self.stack.stop_nodes_from(a.nodes);
        r
    }
}

/// `perf record` of the gateways for up to 10 s of the run, once its connections are in.
fn perf_record(
    ready: &Path,
    p: &mut Proc,
    pids: &[u32],
    duration: f64,
    perf_out: &Path,
) -> Result<()> {
    wait_for("bigroom ready", Duration::from_secs(60), || {
        ready.exists() || !p.is_running()
    })?;
    std::thread::sleep(Duration::from_secs(1));
    let pid_list = pids
        .iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let secs = (duration - 2.0).clamp(1.0, 10.0);
    let _ = Command::new("perf")
        .args(["record", "-F", "499", "-g", "-o"])
        .arg(perf_out)
        .args(["-p", &pid_list, "--", "sleep", &s(secs)])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    Ok(())
}

/// The top of `perf report` (symbols over 1.5%, at most 40 lines), if perf ran.
fn perf_report(perf_out: &Path) -> Option<String> {
    let o = Command::new("perf")
        .args([
            "report",
            "--stdio",
            "--no-children",
            "--sort",
            "dso,sym",
            "--percent-limit",
            "1.5",
            "-g",
            "none",
            "-i",
        ])
        .arg(perf_out)
        .output()
        .ok()?;
    Some(
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .take(40)
            .collect::<Vec<_>>()
            .join("\n"),
    )
}

/// Writes the Markdown report and the JSON (without the raw histograms, to keep the committed
/// file small).
fn write_reports(
    a: &SuiteArgs,
    root: &Path,
    gateway_bin: &Path,
    command: &str,
    machine: &Machine,
    suite: &Suite,
    idles: &[Idle],
) -> Result<()> {
    let settings = serde_json::json!({
        "nodes": a.nodes, "duration_s": a.duration, "members": a.members, "window": a.window,
        "idle_per_node": a.idle_per_node, "idle_nginx": a.idle_nginx, "frame_bytes": suite.frame_bytes,
        "peer_idle": a.peer_idle, "peer_rate": a.peer_rate, "peer_connect_rate": a.peer_connect_rate,
        "gateway_bin": gateway_bin.display().to_string(),
        "gateway_env": "GATEWAY_MAX_CONNECTIONS=19500, GATEWAY_TRUSTED_PROXIES=127.0.0.1, others default",
        "nginx": "deploy/nginx/nginx.conf.template, worker_connections 19000, worker_rlimit_nofile 20000",
    });
    let runs = &suite.runner.runs;
    let peers_md = if runs.iter().any(|r| r.name.starts_with("peer-")) {
        peers::section(runs, &suite.peer_idles, a)
    } else {
        String::new()
    };
    let doc = markdown(
        command,
        machine,
        &settings,
        runs,
        idles,
        &suite.profile,
        &peers_md,
    );
    let (out, json_out) = report_paths(a, root, &suite.runner.work);
    std::fs::write(&out, doc)?;
    let json = SuiteJson {
        command: command.to_string(),
        machine,
        settings,
        runs,
        idle: idles,
        peer_idle: &suite.peer_idles,
        profile: &suite.profile,
    };
    let mut runs_json = serde_json::to_value(&json)?;
    // Keep the committed JSON small: drop the raw histograms.
    if let Some(runs) = runs_json["runs"].as_array_mut() {
        for r in runs {
            if let Some(rep) = r["report"].as_object_mut() {
                rep.remove("latency_hist");
                rep.remove("connect_hist");
            }
        }
    }
    std::fs::write(&json_out, serde_json::to_vec_pretty(&runs_json)?)?;
    eprintln!("suite: wrote {} and {}", out.display(), json_out.display());
    Ok(())
}

/// Where the report and the raw figures go: as asked, else the committed files for a whole
/// run, else (a partial run, `--only`) the scratch directory.
fn report_paths(a: &SuiteArgs, root: &Path, work: &Path) -> (PathBuf, PathBuf) {
    let (md, json) = if a.only.is_empty() {
        (
            root.join("docs/benchmarks.md"),
            root.join("docs/benchmarks.json"),
        )
    } else {
        (work.join("report.md"), work.join("report.json"))
    };
    (
        a.out.as_ref().map_or(md, |p| root.join(p)),
        a.json_out.as_ref().map_or(json, |p| root.join(p)),
    )
}

#[allow(clippy::too_many_arguments)]
fn idle_run(
    runner: &mut Runner,
    stack: &Stack,
    name: &str,
    n: usize,
    nginx: Option<(&Proc, u16, usize)>,
    hold: f64,
    nodes: usize,
    connect_rate: f64,
    baseline: Option<&[u64]>,
) -> Result<Idle> {
    let url = match nginx {
        Some((_, port, _)) => format!("ws://127.0.0.1:{port}/ws"),
        None => stack.node_urls().join(","),
    };
    let pids = stack.node_pids();
    let admins: Vec<u16> = stack.nodes.iter().map(|n| n.2).collect();
    // Let the previous run's connections go away before the baseline.
    let _ = wait_for(
        "gateways to close earlier connections",
        Duration::from_secs(120),
        || {
            admins
                .iter()
                .map(|a| open_connections(*a).unwrap_or(0))
                .sum::<u64>()
                < 10
        },
    );
    std::thread::sleep(Duration::from_secs(1));
    // Memory freed by an earlier idle run stays with the allocator: measure growth from the
    // baseline taken before the first idle run (an upper bound for the later runs).
    let before: Vec<u64> = pids
        .iter()
        .enumerate()
        .map(|(k, p)| match baseline.and_then(|b| b.get(k)) {
            Some(b) => *b,
            None => rss_of(&[*p]),
        })
        .collect();
    let args = vec![
        s("idle"),
        s("--url"),
        url,
        s("-c"),
        s(n),
        s("-d"),
        s(hold),
        s("--connect-rate"),
        s(connect_rate),
        s("--room-size"),
        s(50),
        s("--drain"),
        s(0),
    ];
    let groups = Groups {
        gateways: pids.clone(),
        nginx: nginx.map(|(p, _, _)| p.spawned_pid()),
        redis: None,
        ceiling: None,
        peers: vec![],
    };
    let mut after = Vec::new();
    let mut nginx_rss = 0;
    let mut open: Vec<u64> = Vec::new();
    let run = runner.run(
        name,
        if nginx.is_some() { "nginx" } else { "direct" },
        &args,
        &groups,
        |ready, p| {
            wait_for("idle connections", Duration::from_secs(180), || {
                ready.exists() || !p.is_running()
            })?;
            std::thread::sleep(Duration::from_secs_f64((hold / 2.0).min(3.0)));
            after = pids.iter().map(|p| rss_of(&[*p])).collect();
            nginx_rss = nginx
                .map(|(p, _, _)| rss_of(&with_children(p.spawned_pid())))
                .unwrap_or(0);
            open = admins
                .iter()
                .map(|a| open_connections(*a).unwrap_or(0))
                .collect();
            Ok(())
        },
    )?;
    let held = run.report.joined;
    let grown: i64 = after
        .iter()
        .zip(&before)
        .map(|(a, b)| *a as i64 - *b as i64)
        .sum();
    Ok(Idle {
        name: name.to_string(),
        connections: n,
        held,
        connect_rate: run.report.connect_rate_per_s,
        gateway_rss_before_kib: before,
        gateway_rss_after_kib: after,
        per_node_connections: held as f64 / nodes.max(1) as f64,
        gateway_kib_per_conn: if held > 0 {
            grown as f64 / held as f64
        } else {
            0.0
        },
        nginx_rss_kib: nginx_rss,
        nginx_workers: nginx.map(|(_, _, w)| w).unwrap_or(0),
        gateway_open: open,
        errors: run.report.errors.clone(),
        command: run.command.clone(),
    })
}

fn us_per(cpu: f64, deliveries: u64) -> String {
    if deliveries == 0 {
        return "–".into();
    }
    format!("{:.2}", cpu * 1e6 / deliveries as f64)
}

/// The Markdown report: how it was measured and on what, the targets, throughput and latency,
/// CPU per delivery, idle connections, the profile, and every run's command.
fn markdown(
    command: &str,
    m: &Machine,
    settings: &serde_json::Value,
    runs: &[Run],
    idles: &[Idle],
    profile: &str,
    peers_md: &str,
) -> String {
    let mut o = String::new();
    o.push_str(&intro(command, m, settings));
    o.push_str("## Against the targets\n\n");
    o.push_str(&targets_table(runs, idles).markdown());
    o.push('\n');
    o.push_str(&throughput_section(runs));
    o.push_str(&cpu_section(runs, m.cores));
    if !idles.is_empty() {
        o.push_str(&idle_section(idles));
    }
    o.push_str(peers_md);
    if !profile.is_empty() {
        o.push_str("## Where the gateways' time goes (perf, big room through nginx)\n\n```\n");
        o.push_str(profile);
        o.push_str("\n```\n\n");
    }
    o.push_str("## Commands of each run\n\n");
    for r in runs {
        o.push_str(&format!("- `{}`: `{}`\n", r.name, r.command));
    }
    o.push('\n');
    o
}

/// The title, how the suite measures, the command, the machine and the settings.
fn intro(command: &str, m: &Machine, settings: &serde_json::Value) -> String {
    let mut o = String::new();
    o.push_str("# Benchmarks\n\n");
    o.push_str("Measured on this project's machine by the benchmark suite (`loadgen suite`), which starts\n");
    o.push_str("its own Redis, gateway nodes and nginx (from `deploy/nginx/nginx.conf.template`), runs every\n");
    o.push_str("scenario with the load generator, and samples each process's CPU time (utime + stime from\n");
    o.push_str(
        "`/proc/<pid>/stat`) and RSS around each run. Every figure below is measured, none is\n",
    );
    o.push_str("estimated.\n\n");
    o.push_str(&format!("Command (from the workspace root, after `cargo build --release -p gateway -p loadgen`):\n\n```\n{command}\n```\n\n"));
    let mut t = Table::plain(&["machine", ""]);
    for (k, v) in [
        ("commit", format!("`{}`", m.commit)),
        ("date", m.date.clone()),
        ("CPU", format!("{} × {}", m.cores, m.cpu)),
        ("memory", format!("{:.1} GiB", m.mem_gib)),
        ("kernel", m.kernel.clone()),
        ("open files per process", m.nofile.to_string()),
        ("nginx", m.nginx.clone()),
        ("Redis", m.redis.clone()),
    ] {
        t.row(vec![k.to_string(), v]);
    }
    o.push_str(&t.markdown());
    o.push('\n');
    o.push_str(&format!("Settings: `{settings}`\n\n"));
    o
}

/// Each target against what was measured: big-room fan-out against the raw ceiling, latency at
/// half the maximum rate (with the references beside it), and the idle connections.
fn targets_table(runs: &[Run], idles: &[Idle]) -> Table {
    let mut t = Table::plain(&["target", "measured", "result"]);
    for path in ["nginx", "direct"] {
        fanout_target_rows(&mut t, runs, path);
    }
    for path in ["nginx", "direct"] {
        latency_target_rows(&mut t, runs, path);
    }
    for i in idles {
        t.row(idle_target_row(i));
    }
    t
}

/// The run called `name`, if it ran.
fn find<'r>(runs: &'r [Run], name: &str) -> Option<&'r Run> {
    runs.iter().find(|r| r.name == name)
}

/// Big-room fan-out on `path` ≥ 70% of the raw ceiling, one write per delivery and batched.
fn fanout_target_rows(t: &mut Table, runs: &[Run], path: &str) {
    let Some(g) = find(runs, &format!("bigroom-max-{path}")) else {
        return;
    };
    for (label, c) in [
        (
            "one write per delivery",
            find(runs, &format!("ceiling-{path}")),
        ),
        (
            "batched writes",
            find(runs, &format!("ceiling-batched-{path}")),
        ),
    ] {
        let Some(c) = c else { continue };
        let ratio = g.report.delivered_per_s / c.report.delivered_per_s.max(1.0);
        t.row(vec![
            format!("big-room fan-out ({path}) ≥ 70% of the raw ceiling {path}, {label}"),
            format!(
                "{:.0} vs {:.0} deliveries/s = {:.0}%",
                g.report.delivered_per_s,
                c.report.delivered_per_s,
                ratio * 100.0
            ),
            if ratio >= 0.7 {
                "met".to_string()
            } else {
                format!("missed by {:.0} points", (0.7 - ratio) * 100.0)
            },
        ]);
    }
}

/// Latency at half the maximum rate on `path` (p50 ≤ 1 ms, p99 ≤ 10 ms), the raw ceiling at
/// the same rate, the latency floor, and the highest measured rate where the targets hold.
fn latency_target_rows(t: &mut Table, runs: &[Run], path: &str) {
    let Some(r) = find(runs, &format!("bigroom-half-{path}")) else {
        return;
    };
    let l = &r.report.latency;
    let ok = l.p50_ms <= 1.0 && l.p99_ms <= 10.0;
    t.row(vec![
        format!("latency at half the max rate ({path}): p50 ≤ 1 ms, p99 ≤ 10 ms"),
        format!(
            "p50 {:.3} ms, p99 {:.3} ms at {:.0} deliveries/s",
            l.p50_ms, l.p99_ms, r.report.delivered_per_s
        ),
        if ok {
            "met".to_string()
        } else {
            format!(
                "missed (p50 {:+.2} ms, p99 {:+.2} ms over)",
                (l.p50_ms - 1.0).max(0.0),
                (l.p99_ms - 10.0).max(0.0)
            )
        },
    ]);
    if let Some(c) = find(runs, &format!("ceiling-half-{path}")) {
        let cl = &c.report.latency;
        t.row(vec![
            format!("(reference) the raw ceiling ({path}) at the same rate"),
            format!(
                "p50 {:.3} ms, p99 {:.3} ms at {:.0} deliveries/s",
                cl.p50_ms, cl.p99_ms, c.report.delivered_per_s
            ),
            "–".into(),
        ]);
    }
    if let (Some(f), Some(c)) = (
        find(runs, &format!("bigroom-floor-{path}")),
        find(runs, &format!("ceiling-floor-{path}")),
    ) {
        let (fl, cl) = (&f.report.latency, &c.report.latency);
        t.row(vec![
            format!(
                "({path}) latency floor: a room of 10 at 100 messages/s, gateway vs raw ceiling"
            ),
            format!(
                "p50 {:.3} / {:.3} ms, p99 {:.3} / {:.3} ms",
                fl.p50_ms, cl.p50_ms, fl.p99_ms, cl.p99_ms
            ),
            if fl.p50_ms <= 1.0 && fl.p99_ms <= 10.0 {
                "within the latency targets"
            } else {
                "above the latency targets"
            }
            .into(),
        ]);
    }
    // The highest measured rate at which both latency targets hold.
    let best = runs
        .iter()
        .filter(|r| {
            r.name.starts_with("bigroom-") && r.name.ends_with(&format!("pct-{path}"))
                || r.name == format!("bigroom-half-{path}")
        })
        .filter(|r| r.report.latency.p50_ms <= 1.0 && r.report.latency.p99_ms <= 10.0)
        .max_by(|a, b| {
            a.report
                .delivered_per_s
                .total_cmp(&b.report.delivered_per_s)
        });
    t.row(vec![
        format!("({path}) highest measured rate where p50 ≤ 1 ms and p99 ≤ 10 ms"),
        match best {
            Some(b) => format!(
                "{:.0} deliveries/s (`{}`: p50 {:.3} ms, p99 {:.3} ms)",
                b.report.delivered_per_s, b.name, b.report.latency.p50_ms, b.report.latency.p99_ms
            ),
            None => "none of the measured rates".to_string(),
        },
        "–".into(),
    ]);
}

/// Gateway RSS per connection (the direct idle run) or connections held (through nginx).
fn idle_target_row(i: &Idle) -> Vec<String> {
    if i.name == "idle-direct" {
        return vec![
            "gateway RSS ≤ 8 KiB per connection at 15k connections per node".into(),
            format!(
                "{:.2} KiB per connection at {:.0} per node",
                i.gateway_kib_per_conn, i.per_node_connections
            ),
            if i.gateway_kib_per_conn <= 8.0 && i.per_node_connections >= 15_000.0 {
                "met".to_string()
            } else {
                format!(
                    "missed ({:.2} KiB over)",
                    (i.gateway_kib_per_conn - 8.0).max(0.0)
                )
            },
        ];
    }
    let target = i.connections as u64;
    vec![
        format!("{target} concurrent connections through nginx, presence on"),
        format!("{} held", i.held),
        if i.held >= target {
            "met".to_string()
        } else {
            format!("missed by {}", target - i.held)
        },
    ]
}

/// Every run but the idle ones: rates, latency percentiles and delivery checks.
fn throughput_section(runs: &[Run]) -> String {
    let mut t = Table::plain(&[
        "run",
        "path",
        "conns",
        "msgs/s sent",
        "deliveries/s",
        "B/delivery",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "max ms",
        "expected",
        "lost",
        "dup",
        "out of order",
        "errors",
    ]);
    for r in runs.iter().filter(|r| !r.name.starts_with("idle")) {
        let p = &r.report;
        let errs: u64 = p.errors.values().sum::<u64>() + p.unexpected_closes;
        t.row(vec![
            r.name.clone(),
            r.path.clone(),
            p.joined.max(p.max_open).to_string(),
            format!("{:.0}", p.sent_per_s),
            format!("{:.0}", p.delivered_per_s),
            format!("{:.0}", p.bytes_per_delivery),
            format!("{:.3}", p.latency.p50_ms),
            format!("{:.3}", p.latency.p90_ms),
            format!("{:.3}", p.latency.p99_ms),
            format!("{:.3}", p.latency.max_ms),
            p.expected.to_string(),
            p.lost.to_string(),
            p.duplicates.to_string(),
            p.out_of_order.to_string(),
            errs.to_string(),
        ]);
    }
    let mut o = String::from("## Throughput and latency\n\n");
    o.push_str(&t.markdown());
    o.push_str("\nLatency is end to end: from the sender's timestamp in the message to its receipt by each member\n");
    o.push_str("(one clock: every process runs on this machine). In the closed-loop `max` runs the senders keep a\n");
    o.push_str("window of messages in flight, so their latency is queueing at saturation, not a target figure.\n");
    o.push_str("The ceiling runs write as fast as the sockets take the bytes, so their latency is socket-buffer\n");
    o.push_str("queueing too.\n\n");
    o
}

/// CPU time per delivery of each process group, and cores busy, for every non-idle run.
fn cpu_section(runs: &[Run], cores: usize) -> String {
    let mut t = Table::plain(&[
        "run",
        "deliveries",
        "gateways",
        "nginx",
        "Redis",
        "ceiling server",
        "peer servers",
        "generator",
        "total",
        "cores busy: measured / whole machine",
    ]);
    for r in runs.iter().filter(|r| !r.name.starts_with("idle")) {
        let d = r.report.delivered;
        let c = &r.cpu;
        t.row(vec![
            r.name.clone(),
            d.to_string(),
            us_per(c.gateways, d),
            us_per(c.nginx, d),
            us_per(c.redis, d),
            us_per(c.ceiling_server, d),
            us_per(c.peers, d),
            us_per(c.generator, d),
            us_per(c.total(), d),
            format!(
                "{:.2} / {:.2}",
                c.total() / r.wall_s.max(1e-3),
                r.machine_busy_cores
            ),
        ]);
    }
    let mut o = String::from("## CPU time per delivery (µs)\n\n");
    o.push_str(&t.markdown());
    o.push_str("\nCPU time is sampled from the moment every connection is in until the generator exits (the\n");
    o.push_str("measured phase, the drain and the close; not the connect phase) and divided by the run's\n");
    o.push_str("deliveries. Cores busy: the measured processes' CPU seconds over that interval, and the whole\n");
    o.push_str("machine's busy time from /proc/stat over the same interval; the difference is other work on\n");
    o.push_str(
        "the machine (this machine is shared with other engineers' builds and tests). It has ",
    );
    o.push_str(&format!("{cores} cores.\n\n"));
    o
}

/// The idle runs: connections held, gateway RSS per connection, nginx's share.
fn idle_section(idles: &[Idle]) -> String {
    let mut t = Table::plain(&[
        "run",
        "connections",
        "held",
        "connects/s",
        "per node",
        "nodes' open connections",
        "gateway RSS per connection",
        "nginx workers",
        "nginx RSS",
        "errors",
    ]);
    for i in idles {
        t.row(vec![
            i.name.clone(),
            i.connections.to_string(),
            i.held.to_string(),
            format!("{:.0}", i.connect_rate),
            format!("{:.0}", i.per_node_connections),
            format!("{:?}", i.gateway_open),
            format!("{:.2} KiB", i.gateway_kib_per_conn),
            i.nginx_workers.to_string(),
            if i.nginx_rss_kib > 0 {
                format!("{:.1} MiB", i.nginx_rss_kib as f64 / 1024.0)
            } else {
                "–".into()
            },
            if i.errors.is_empty() {
                "none".to_string()
            } else {
                format!("{:?}", i.errors)
            },
        ]);
    }
    let mut o = String::from("## Idle connections\n\n");
    o.push_str(&t.markdown());
    o.push_str("\nGateway RSS per connection = (sum of the nodes' VmRSS while the connections are held − before the\n");
    o.push_str("first idle run) / connections held; for the run through nginx this is an upper bound, since the\n");
    o.push_str("nodes reuse memory that the direct run left with their allocator.\n");
    o.push_str(
        "Every idle connection logs in to a room of 50 (presence on) and pings every 25 s.\n\n",
    );
    o
}

/// One run of the raw ceiling: `ceiling-server` (directly, or behind an nginx from the same
/// template) and the generator's `ceiling` client.
#[allow(clippy::too_many_arguments)]
fn ceiling_run(
    runner: &mut Runner,
    stack: &Stack,
    name: &str,
    path: &str,
    members: usize,
    frame_bytes: usize,
    rate: f64,
    batch: usize,
    duration: f64,
) -> Result<Run> {
    let port = free_port();
    let log = std::fs::File::create(runner.work.join(format!("{name}-server.log")))?;
    let mut server = spawn_graceful(
        "ceiling-server",
        Command::new(&runner.exe)
            .args(["ceiling-server", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--members", &s(members), "--frame-bytes", &s(frame_bytes)])
            .args(["--duration", &s(duration), "--rate", &s(rate)])
            .args(["--batch", &s(batch)])
            .stdout(Stdio::piped())
            .stderr(log),
    )?;
    let stdout = server.take_stdout().context("ceiling stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let first = lines.next().transpose()?.unwrap_or_default();
    if !first.starts_with("listening") {
        bail!("ceiling-server did not start: {first}");
    }
    let (ng, url) = if path == "nginx" {
        let (ng, p) = stack.start_nginx("ceiling", &[port], 2)?;
        (Some(ng), format!("ws://127.0.0.1:{p}/ws"))
    } else {
        (None, format!("ws://127.0.0.1:{port}/ws"))
    };
    let g = Groups {
        gateways: vec![],
        nginx: ng.as_ref().map(|n| n.spawned_pid()),
        redis: None,
        ceiling: Some(server.spawned_pid()),
        peers: vec![],
    };
    let args = vec![
        s("ceiling"),
        s("--url"),
        url,
        s("-c"),
        s(members),
        s("-d"),
        s(duration + 5.0),
        s("--drain"),
        s(2),
    ];
    let run = runner.run(name, path, &args, &g, no_during);
    drop(lines);
    drop(ng);
    drop(server);
    run
}
