//! The benchmark suite: starts Redis, the gateway nodes and nginx (from the repo's template),
//! runs the scenarios and the raw ceiling, samples CPU time and RSS of every process, and
//! writes a Markdown report plus JSON.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::stats::{proc_cpu_s, proc_status_kib, Report};

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
    /// Scenarios to run (default all): ceiling,bigroom,latency,rooms,churn,reliable,idle.
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// Profile the gateways with `perf` during the big-room run through nginx.
    #[arg(long)]
    pub perf: bool,
    #[arg(long, default_value = "docs/benchmarks.md")]
    pub out: PathBuf,
    #[arg(long, default_value = "docs/benchmarks.json")]
    pub json_out: PathBuf,
    /// Scratch directory for configs and logs (default: a fresh one under /tmp).
    #[arg(long)]
    pub workdir: Option<PathBuf>,
}

/// A child process, killed by its own pid when dropped.
struct Proc {
    name: String,
    child: Child,
}

impl Proc {
    fn spawn(name: &str, cmd: &mut Command) -> Result<Proc> {
        let child = cmd
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Proc {
            name: name.to_string(),
            child,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Proc {
    /// SIGTERM first, so that an nginx master takes its workers down with it (SIGKILL would
    /// leave them running, orphaned); SIGKILL if it is still there after a second.
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + Duration::from_secs(1);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
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
    pids.iter().filter_map(|p| proc_cpu_s(&p.to_string())).sum()
}

fn rss_of(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|p| proc_status_kib(&p.to_string(), "VmRSS:"))
        .sum()
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
        let port = free_port()?;
        let log = std::fs::File::create(self.work.join("redis.log"))?;
        let p = Proc::spawn(
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
            let port = free_port()?;
            let admin = free_port()?;
            let log = std::fs::File::create(self.work.join(format!("gateway-{k}.log")))?;
            let p = Proc::spawn(
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
        self.nodes.iter().map(|(p, _, _)| p.pid()).collect()
    }

    /// nginx from deploy/nginx/nginx.conf.template in front of `upstreams`.
    fn start_nginx(&self, name: &str, upstreams: &[u16], workers: usize) -> Result<(Proc, u16)> {
        let template = std::fs::read_to_string(self.root.join("deploy/nginx/nginx.conf.template"))
            .context("reading deploy/nginx/nginx.conf.template")?;
        let port = free_port()?;
        let prefix = self.work.join(format!("nginx-{name}"));
        std::fs::create_dir_all(&prefix)?;
        let servers: String = upstreams
            .iter()
            .map(|p| format!("server 127.0.0.1:{p};\n        "))
            .collect();
        let vars = [
            ("NGINX_LISTEN", format!("127.0.0.1:{port}")),
            ("NGINX_UPSTREAM_SERVERS", servers),
            ("NGINX_WORKER_PROCESSES", workers.to_string()),
            ("NGINX_WORKER_CONNECTIONS", "19000".to_string()),
            ("NGINX_WORKER_RLIMIT_NOFILE", "20000".to_string()),
            ("NGINX_PREFIX", prefix.display().to_string()),
            ("NGINX_ACCESS_LOG", "off".to_string()),
        ];
        let mut conf = template;
        for (k, v) in &vars {
            conf = conf.replace(&format!("${{{k}}}"), v);
        }
        if let Some(i) = conf.find("${NGINX_") {
            bail!(
                "unknown placeholder left in the nginx template: {}",
                &conf[i..i + 30]
            );
        }
        let path = prefix.join("nginx.conf");
        std::fs::write(&path, conf)?;
        let log = std::fs::File::create(self.work.join(format!("nginx-{name}.log")))?;
        let p = Proc::spawn(
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
    generator: f64,
}

impl Cpu {
    fn total(&self) -> f64 {
        self.gateways + self.nginx + self.redis + self.ceiling_server + self.generator
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

/// (busy, total) jiffies of all CPUs from /proc/stat.
fn machine_jiffies() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().next() else {
        return (0.0, 0.0);
    };
    let v: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: f64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0.0) + v.get(4).copied().unwrap_or(0.0);
    (total - idle, total)
}

struct Groups {
    gateways: Vec<u32>,
    nginx: Option<u32>,
    redis: Option<u32>,
    ceiling: Option<u32>,
}

impl Groups {
    fn sample(&self) -> Cpu {
        Cpu {
            gateways: cpu_of(&self.gateways),
            nginx: self.nginx.map(|p| cpu_of(&with_children(p))).unwrap_or(0.0),
            redis: self.redis.map(|p| cpu_of(&[p])).unwrap_or(0.0),
            ceiling_server: self.ceiling.map(|p| cpu_of(&[p])).unwrap_or(0.0),
            generator: 0.0,
        }
    }
}

struct Runner {
    exe: PathBuf,
    work: PathBuf,
    runs: Vec<Run>,
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
        let _ = std::fs::remove_file(&json);
        let _ = std::fs::remove_file(&ready);
        let log = std::fs::File::create(self.work.join(format!("{name}.log")))?;
        let mut full: Vec<String> = args.to_vec();
        full.extend([
            "--json".into(),
            json.display().to_string(),
            "--ready-file".into(),
            ready.display().to_string(),
        ]);
        let command = format!("loadgen {}", args.join(" "));
        eprintln!("suite: {name}: {command}");
        let mut p = Proc::spawn(
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
            || ready.exists() || !p.alive(),
        )?;
        let before = groups.sample();
        let jiffies = machine_jiffies();
        let t = Instant::now();
        during(&ready, &mut p)?;
        let status = p
            .child
            .wait()
            .with_context(|| format!("waiting for {}", p.name))?;
        let wall_s = t.elapsed().as_secs_f64();
        let after = groups.sample();
        let jiffies_after = machine_jiffies();
        let machine_busy_cores = (jiffies_after.0 - jiffies.0) / 100.0 / wall_s.max(1e-3);
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
    profile: &'a str,
}

pub fn main(a: SuiteArgs) -> Result<()> {
    if a.duration <= 0.0 || a.duration > 120.0 {
        bail!("--duration must be in (0, 120] seconds per run");
    }
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
    let work = match &a.workdir {
        Some(w) => w.clone(),
        None => std::env::temp_dir().join(format!("loadgen-suite-{}", std::process::id())),
    };
    std::fs::create_dir_all(&work)?;
    eprintln!("suite: logs and configs in {}", work.display());
    let want = |n: &str| a.only.is_empty() || a.only.iter().any(|o| o == n);
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
    stack.start_redis(&a.redis_bin)?;
    stack.start_nodes(a.nodes)?;
    let node_ports: Vec<u16> = stack.nodes.iter().map(|n| n.1).collect();
    let (nginx, nginx_port) = stack.start_nginx("main", &node_ports, 2)?;
    let nginx_url = format!("ws://127.0.0.1:{nginx_port}/ws");
    let direct = stack.node_urls().join(",");
    let groups = Groups {
        gateways: stack.node_pids(),
        nginx: Some(nginx.pid()),
        redis: stack.redis.as_ref().map(|r| r.pid()),
        ceiling: None,
    };
    let mut runner = Runner {
        exe: std::env::current_exe()?,
        work: work.clone(),
        runs: Vec::new(),
    };
    let dur = s(a.duration);
    let members = s(a.members);
    let mut profile = String::new();
    let mut frame_bytes = 260usize;
    let mut max_rate = std::collections::HashMap::new();

    // 1. Big room, saturated (closed loop), direct and through nginx.
    if want("bigroom") || want("latency") || want("ceiling") {
        for (path, url) in [("direct", direct.as_str()), ("nginx", nginx_url.as_str())] {
            let args = vec![
                s("bigroom"),
                s("--url"),
                s(url),
                s("-c"),
                members.clone(),
                s("-d"),
                dur.clone(),
                s("--rate"),
                s(0),
                s("--senders"),
                s(3),
                s("--window"),
                s(a.window),
            ];
            let perf_out = work.join("perf.data");
            let do_perf = a.perf && path == "nginx";
            let pids = stack.node_pids();
            let run = runner.run(
                &format!("bigroom-max-{path}"),
                path,
                &args,
                &groups,
                |ready, p| {
                    if do_perf {
                        wait_for("bigroom ready", Duration::from_secs(60), || {
                            ready.exists() || !p.alive()
                        })?;
                        std::thread::sleep(Duration::from_secs(1));
                        let pid_list = pids
                            .iter()
                            .map(|p| p.to_string())
                            .collect::<Vec<_>>()
                            .join(",");
                        let secs = (a.duration - 2.0).clamp(1.0, 10.0);
                        let _ = Command::new("perf")
                            .args(["record", "-F", "499", "-g", "-o"])
                            .arg(&perf_out)
                            .args(["-p", &pid_list, "--", "sleep", &s(secs)])
                            .stdout(Stdio::null())
                            .stderr(Stdio::null())
                            .status();
                    }
                    Ok(())
                },
            )?;
            if do_perf {
                let out = Command::new("perf")
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
                    .arg(&perf_out)
                    .output();
                if let Ok(o) = out {
                    profile = String::from_utf8_lossy(&o.stdout)
                        .lines()
                        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
                        .take(40)
                        .collect::<Vec<_>>()
                        .join("\n");
                }
            }
            if run.report.bytes_per_delivery > 0.0 {
                frame_bytes = run.report.bytes_per_delivery.round() as usize;
            }
            max_rate.insert(path, run.report.delivered_per_s);
        }
    }

    // 2. The raw ceiling, direct and through the same nginx template: one write per delivery,
    //    and batched (as many messages per write as the closed loop keeps in flight).
    let batched = (a.window * 3) as usize;
    if want("ceiling") {
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
            ceiling_run(
                &mut runner,
                &stack,
                &name,
                path,
                a.members,
                frame_bytes,
                0.0,
                batch,
                a.duration,
            )?;
        }
    }

    // 3. Latency at half the maximum rate (the target), and at lower fractions of it (to show
    //    where the latency targets hold).
    if want("latency") {
        for (path, url) in [("direct", direct.as_str()), ("nginx", nginx_url.as_str())] {
            let Some(max) = max_rate.get(path).copied() else {
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
                    s(url),
                    s("-c"),
                    members.clone(),
                    s("-d"),
                    s(d),
                    s("--rate"),
                    s(msgs),
                    s("--senders"),
                    s(3),
                ];
                runner.run(&name, path, &args, &groups, no_during)?;
            }
            // The raw ceiling at the same rates (half and 3%), for its latency (it writes what
            // fell due since its last round in one write, like a server draining a queue).
            if want("ceiling") {
                for (fraction, label) in [(0.5, "half"), (0.03, "3pct")] {
                    let msgs = (max * fraction / a.members as f64).max(1.0).round();
                    ceiling_run(
                        &mut runner,
                        &stack,
                        &format!("ceiling-{label}-{path}"),
                        path,
                        a.members,
                        frame_bytes,
                        msgs,
                        batched,
                        if fraction == 0.5 {
                            a.duration
                        } else {
                            a.duration.min(6.0)
                        },
                    )?;
                }
            }
        }
    }

    // 3b. The latency floor: a room of 10 members at 100 messages/s (the fan-out is too small
    //     to queue), gateway and raw ceiling, directly and through nginx.
    if want("latency") {
        for (path, url) in [("direct", direct.as_str()), ("nginx", nginx_url.as_str())] {
            let args = vec![
                s("bigroom"),
                s("--url"),
                s(url),
                s("-c"),
                s(10),
                s("-d"),
                s(a.duration.min(5.0)),
                s("--rate"),
                s(100),
                s("--senders"),
                s(3),
            ];
            runner.run(
                &format!("bigroom-floor-{path}"),
                path,
                &args,
                &groups,
                no_during,
            )?;
            if want("ceiling") {
                ceiling_run(
                    &mut runner,
                    &stack,
                    &format!("ceiling-floor-{path}"),
                    path,
                    10,
                    frame_bytes,
                    100.0,
                    batched,
                    a.duration.min(5.0),
                )?;
            }
        }
    }

    // 4. Many small rooms, churn, reliable: through nginx.
    // Chat-like load at a fraction of the measured big-room maximum through nginx (15% for
    // rooms, which average 30 members; 10% for reliable, rooms of 20 on average).
    let nginx_max = max_rate.get("nginx").copied().unwrap_or(60_000.0);
    let rooms_rate = (nginx_max * 0.15 / 30.0).round().max(10.0);
    let reliable_rate = (nginx_max * 0.1 / 20.0).round().max(10.0);
    if want("rooms") {
        let args = vec![
            s("rooms"),
            s("--url"),
            nginx_url.clone(),
            s("-c"),
            s(5000),
            s("-d"),
            dur.clone(),
            s("--rate"),
            s(rooms_rate),
            s("--room-min"),
            s(10),
            s("--room-max"),
            s(50),
            s("--senders-per-room"),
            s(3),
        ];
        runner.run("rooms", "nginx", &args, &groups, no_during)?;
    }
    if want("churn") {
        let args = vec![
            s("churn"),
            s("--url"),
            nginx_url.clone(),
            s("-c"),
            s(200),
            s("-d"),
            dur.clone(),
            s("--rooms"),
            s(50),
            s("--messages"),
            s(2),
            s("--source-addrs"),
            s(4),
        ];
        runner.run("churn", "nginx", &args, &groups, no_during)?;
    }
    if want("reliable") {
        let args = vec![
            s("reliable"),
            s("--url"),
            nginx_url.clone(),
            s("-c"),
            s(1000),
            s("-d"),
            dur.clone(),
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
        runner.run("reliable", "nginx", &args, &groups, no_during)?;
    }
    drop(nginx);

    // 5. Idle connections: RSS per connection directly, then the big count through nginx.
    let mut idles = Vec::new();
    if want("idle") {
        let n = a.idle_per_node * a.nodes;
        idles.push(idle_run(
            &mut runner,
            &stack,
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
        let ports: Vec<u16> = stack.nodes.iter().map(|n| n.1).collect();
        let (ng, port) = stack.start_nginx("idle", &ports, workers)?;
        idles.push(idle_run(
            &mut runner,
            &stack,
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
            stack.start_nodes(a.stretch_nodes)?;
            let ports: Vec<u16> = stack.nodes.iter().map(|n| n.1).collect();
            let workers = (a.stretch * 2).div_ceil(15_000) + 1;
            let (ng, port) = stack.start_nginx("stretch", &ports, workers)?;
            let r = idle_run(
                &mut runner,
                &stack,
                "idle-stretch",
                a.stretch,
                Some((&ng, port, workers)),
                a.idle_hold,
                a.stretch_nodes,
                a.connect_rate,
                Some(&baseline),
            );
            drop(ng);
            stack.stop_nodes_from(a.nodes);
            idles.push(r?);
        }
    }

    let settings = serde_json::json!({
        "nodes": a.nodes, "duration_s": a.duration, "members": a.members, "window": a.window,
        "idle_per_node": a.idle_per_node, "idle_nginx": a.idle_nginx, "frame_bytes": frame_bytes,
        "gateway_bin": gateway_bin.display().to_string(),
        "gateway_env": "GATEWAY_MAX_CONNECTIONS=19500, GATEWAY_TRUSTED_PROXIES=127.0.0.1, others default",
        "nginx": "deploy/nginx/nginx.conf.template, worker_connections 19000, worker_rlimit_nofile 20000",
    });
    let doc = markdown(
        &command,
        &machine,
        &settings,
        &runner.runs,
        &idles,
        &profile,
    );
    let out = root.join(&a.out);
    std::fs::write(&out, doc)?;
    let json = SuiteJson {
        command,
        machine: &machine,
        settings,
        runs: &runner.runs,
        idle: &idles,
        profile: &profile,
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
    std::fs::write(
        root.join(&a.json_out),
        serde_json::to_vec_pretty(&runs_json)?,
    )?;
    eprintln!(
        "suite: wrote {} and {}",
        a.out.display(),
        a.json_out.display()
    );
    Ok(())
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
        nginx: nginx.map(|(p, _, _)| p.pid()),
        redis: None,
        ceiling: None,
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
                ready.exists() || !p.alive()
            })?;
            std::thread::sleep(Duration::from_secs_f64((hold / 2.0).min(3.0)));
            after = pids.iter().map(|p| rss_of(&[*p])).collect();
            nginx_rss = nginx
                .map(|(p, _, _)| rss_of(&with_children(p.pid())))
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

fn markdown(
    command: &str,
    m: &Machine,
    settings: &serde_json::Value,
    runs: &[Run],
    idles: &[Idle],
    profile: &str,
) -> String {
    let mut o = String::new();
    let find = |n: &str| runs.iter().find(|r| r.name == n);
    o.push_str("# Benchmarks\n\n");
    o.push_str("Measured on this project's machine by the benchmark suite (`loadgen suite`), which starts\n");
    o.push_str("its own Redis, gateway nodes and nginx (from `deploy/nginx/nginx.conf.template`), runs every\n");
    o.push_str("scenario with the load generator, and samples each process's CPU time (utime + stime from\n");
    o.push_str(
        "`/proc/<pid>/stat`) and RSS around each run. Every figure below is measured, none is\n",
    );
    o.push_str("estimated.\n\n");
    o.push_str(&format!("Command (from the workspace root, after `cargo build --release -p gateway -p loadgen`):\n\n```\n{command}\n```\n\n"));
    o.push_str("| machine | |\n|---|---|\n");
    o.push_str(&format!("| commit | `{}` |\n| date | {} |\n| CPU | {} × {} |\n| memory | {:.1} GiB |\n| kernel | {} |\n| open files per process | {} |\n| nginx | {} |\n| Redis | {} |\n\n",
        m.commit, m.date, m.cores, m.cpu, m.mem_gib, m.kernel, m.nofile, m.nginx, m.redis));
    o.push_str(&format!("Settings: `{settings}`\n\n"));

    // Targets.
    o.push_str("## Against the targets\n\n| target | measured | result |\n|---|---|---|\n");
    for path in ["nginx", "direct"] {
        let Some(g) = find(&format!("bigroom-max-{path}")) else {
            continue;
        };
        for (label, c) in [
            ("one write per delivery", find(&format!("ceiling-{path}"))),
            ("batched writes", find(&format!("ceiling-batched-{path}"))),
        ] {
            let Some(c) = c else { continue };
            let ratio = g.report.delivered_per_s / c.report.delivered_per_s.max(1.0);
            o.push_str(&format!(
                "| big-room fan-out ({path}) ≥ 70% of the raw ceiling {path}, {label} | {:.0} vs {:.0} deliveries/s = {:.0}% | {} |\n",
                g.report.delivered_per_s, c.report.delivered_per_s, ratio * 100.0,
                if ratio >= 0.7 { "met".to_string() } else { format!("missed by {:.0} points", (0.7 - ratio) * 100.0) }
            ));
        }
    }
    for path in ["nginx", "direct"] {
        if let Some(r) = find(&format!("bigroom-half-{path}")) {
            let l = &r.report.latency;
            let ok = l.p50_ms <= 1.0 && l.p99_ms <= 10.0;
            o.push_str(&format!(
                "| latency at half the max rate ({path}): p50 ≤ 1 ms, p99 ≤ 10 ms | p50 {:.3} ms, p99 {:.3} ms at {:.0} deliveries/s | {} |\n",
                l.p50_ms, l.p99_ms, r.report.delivered_per_s,
                if ok { "met".to_string() } else { format!("missed (p50 {:+.2} ms, p99 {:+.2} ms over)", (l.p50_ms - 1.0).max(0.0), (l.p99_ms - 10.0).max(0.0)) }
            ));
            if let Some(c) = find(&format!("ceiling-half-{path}")) {
                let cl = &c.report.latency;
                o.push_str(&format!(
                    "| (reference) the raw ceiling ({path}) at the same rate | p50 {:.3} ms, p99 {:.3} ms at {:.0} deliveries/s | – |\n",
                    cl.p50_ms, cl.p99_ms, c.report.delivered_per_s
                ));
            }
            if let (Some(f), Some(c)) = (
                find(&format!("bigroom-floor-{path}")),
                find(&format!("ceiling-floor-{path}")),
            ) {
                o.push_str(&format!(
                    "| ({path}) latency floor: a room of 10 at 100 messages/s, gateway vs raw ceiling | p50 {:.3} / {:.3} ms, p99 {:.3} / {:.3} ms | {} |\n",
                    f.report.latency.p50_ms, c.report.latency.p50_ms,
                    f.report.latency.p99_ms, c.report.latency.p99_ms,
                    if f.report.latency.p50_ms <= 1.0 && f.report.latency.p99_ms <= 10.0 { "within the latency targets" } else { "above the latency targets" }
                ));
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
            o.push_str(&format!(
                "| ({path}) highest measured rate where p50 ≤ 1 ms and p99 ≤ 10 ms | {} | – |\n",
                match best {
                    Some(b) => format!(
                        "{:.0} deliveries/s (`{}`: p50 {:.3} ms, p99 {:.3} ms)",
                        b.report.delivered_per_s,
                        b.name,
                        b.report.latency.p50_ms,
                        b.report.latency.p99_ms
                    ),
                    None => "none of the measured rates".to_string(),
                }
            ));
        }
    }
    for i in idles {
        if i.name == "idle-direct" {
            o.push_str(&format!(
                "| gateway RSS ≤ 8 KiB per connection at 15k connections per node | {:.2} KiB per connection at {:.0} per node | {} |\n",
                i.gateway_kib_per_conn, i.per_node_connections,
                if i.gateway_kib_per_conn <= 8.0 && i.per_node_connections >= 15_000.0 { "met".to_string() } else { format!("missed ({:.2} KiB over)", (i.gateway_kib_per_conn - 8.0).max(0.0)) }
            ));
        } else {
            let target = i.connections as u64;
            o.push_str(&format!(
                "| {} concurrent connections through nginx, presence on | {} held | {} |\n",
                target,
                i.held,
                if i.held >= target {
                    "met".to_string()
                } else {
                    format!("missed by {}", target - i.held)
                }
            ));
        }
    }
    o.push('\n');

    // Throughput and latency.
    o.push_str("## Throughput and latency\n\n");
    o.push_str("| run | path | conns | msgs/s sent | deliveries/s | B/delivery | p50 ms | p90 ms | p99 ms | max ms | expected | lost | dup | out of order | errors |\n");
    o.push_str("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for r in runs.iter().filter(|r| !r.name.starts_with("idle")) {
        let p = &r.report;
        let errs: u64 = p.errors.values().sum::<u64>() + p.unexpected_closes;
        o.push_str(&format!(
            "| {} | {} | {} | {:.0} | {:.0} | {:.0} | {:.3} | {:.3} | {:.3} | {:.3} | {} | {} | {} | {} | {} |\n",
            r.name, r.path, p.joined.max(p.max_open), p.sent_per_s, p.delivered_per_s, p.bytes_per_delivery,
            p.latency.p50_ms, p.latency.p90_ms, p.latency.p99_ms, p.latency.max_ms,
            p.expected, p.lost, p.duplicates, p.out_of_order, errs
        ));
    }
    o.push_str("\nLatency is end to end: from the sender's timestamp in the message to its receipt by each member\n");
    o.push_str("(one clock: every process runs on this machine). In the closed-loop `max` runs the senders keep a\n");
    o.push_str("window of messages in flight, so their latency is queueing at saturation, not a target figure.\n");
    o.push_str("The ceiling runs write as fast as the sockets take the bytes, so their latency is socket-buffer\n");
    o.push_str("queueing too.\n\n");

    // CPU.
    o.push_str("## CPU time per delivery (µs)\n\n");
    o.push_str("| run | deliveries | gateways | nginx | Redis | ceiling server | generator | total | cores busy: measured / whole machine |\n");
    o.push_str("|---|---|---|---|---|---|---|---|---|\n");
    for r in runs.iter().filter(|r| !r.name.starts_with("idle")) {
        let d = r.report.delivered;
        let c = &r.cpu;
        o.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {:.2} / {:.2} |\n",
            r.name,
            d,
            us_per(c.gateways, d),
            us_per(c.nginx, d),
            us_per(c.redis, d),
            us_per(c.ceiling_server, d),
            us_per(c.generator, d),
            us_per(c.total(), d),
            c.total() / r.wall_s.max(1e-3),
            r.machine_busy_cores
        ));
    }
    o.push_str("\nCPU time is sampled from the moment every connection is in until the generator exits (the\n");
    o.push_str("measured phase, the drain and the close; not the connect phase) and divided by the run's\n");
    o.push_str("deliveries. Cores busy: the measured processes' CPU seconds over that interval, and the whole\n");
    o.push_str("machine's busy time from /proc/stat over the same interval; the difference is other work on\n");
    o.push_str(
        "the machine (this machine is shared with other engineers' builds and tests). It has ",
    );
    o.push_str(&format!("{} cores.\n\n", m.cores));

    if !idles.is_empty() {
        o.push_str("## Idle connections\n\n");
        o.push_str("| run | connections | held | connects/s | per node | nodes' open connections | gateway RSS per connection | nginx workers | nginx RSS | errors |\n");
        o.push_str("|---|---|---|---|---|---|---|---|---|---|\n");
        for i in idles {
            o.push_str(&format!(
                "| {} | {} | {} | {:.0} | {:.0} | {:?} | {:.2} KiB | {} | {} | {} |\n",
                i.name,
                i.connections,
                i.held,
                i.connect_rate,
                i.per_node_connections,
                i.gateway_open,
                i.gateway_kib_per_conn,
                i.nginx_workers,
                if i.nginx_rss_kib > 0 {
                    format!("{:.1} MiB", i.nginx_rss_kib as f64 / 1024.0)
                } else {
                    "–".into()
                },
                if i.errors.is_empty() {
                    "none".to_string()
                } else {
                    format!("{:?}", i.errors)
                }
            ));
        }
        o.push_str("\nGateway RSS per connection = (sum of the nodes' VmRSS while the connections are held − before the\n");
        o.push_str("first idle run) / connections held; for the run through nginx this is an upper bound, since the\n");
        o.push_str("nodes reuse memory that the direct run left with their allocator.\n");
        o.push_str(
            "Every idle connection logs in to a room of 50 (presence on) and pings every 25 s.\n\n",
        );
    }

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
    let port = free_port()?;
    let log = std::fs::File::create(runner.work.join(format!("{name}-server.log")))?;
    let mut server = Proc::spawn(
        "ceiling-server",
        Command::new(&runner.exe)
            .args(["ceiling-server", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--members", &s(members), "--frame-bytes", &s(frame_bytes)])
            .args(["--duration", &s(duration), "--rate", &s(rate)])
            .args(["--batch", &s(batch)])
            .stdout(Stdio::piped())
            .stderr(log),
    )?;
    let stdout = server.child.stdout.take().context("ceiling stdout")?;
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
        nginx: ng.as_ref().map(|n| n.pid()),
        redis: None,
        ceiling: Some(server.pid()),
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
