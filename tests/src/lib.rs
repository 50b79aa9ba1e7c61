//! Test harness: real `redis-server` and `gateway` processes on free loopback ports, a small
//! WebSocket client that speaks the gateway protocol, and condition waits with timeouts.
//!
//! Every process is started by the harness and killed by its own pid when its handle drops.

pub mod chaos;
pub mod checker;
pub mod faultproxy;
pub mod netns;
pub mod nginx;
pub mod procfs;
pub mod redis_cluster;
pub mod report;
pub mod wire;

pub use wire::UpgradeRefused;

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

/// Default time a test waits for a condition before failing.
pub const WAIT: Duration = Duration::from_secs(10);

/// A free TCP port on 127.0.0.1 for a server a test starts.
///
/// Picked below the kernel's ephemeral range (32768–60999 here), so the outgoing connections
/// of every other test (whose local ports come from that range) cannot take it between this
/// check and the server's bind; a pseudo-random start spreads concurrent tests apart.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    const LOW: u16 = 12_000;
    const SPAN: u16 = 20_000;
    if NEXT.load(Ordering::Relaxed) == 0 {
        let seed = std::process::id() as u64
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos() as u64)
                .unwrap_or(0);
        let _ = NEXT.compare_exchange(
            0,
            (seed % SPAN as u64) as u16 + 1,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }
    for _ in 0..SPAN {
        let offset = NEXT.fetch_add(1, Ordering::Relaxed) % SPAN;
        let port = LOW + offset;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port on loopback between {LOW} and {}", LOW + SPAN)
}

/// The workspace root (the folder holding the top `Cargo.toml`).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// Path of the built `gateway` binary: `$GATEWAY_BIN`, else `target/{release,debug}/gateway`
/// (release when `E2E_RELEASE=1`). The test command builds it before running the tests.
pub fn gateway_bin() -> PathBuf {
    if let Ok(path) = std::env::var("GATEWAY_BIN") {
        return PathBuf::from(path);
    }
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| workspace_root().join("target"));
    let profile = if std::env::var("E2E_RELEASE").as_deref() == Ok("1") {
        "release"
    } else {
        "debug"
    };
    target.join(profile).join("gateway")
}

/// Polls `check` until it returns `Some`, or fails after `timeout` with `what` in the error.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends `signal` to `pid` through kill(1) (the crate forbids `unsafe`, so no libc call).
fn kill_pid(pid: u32, signal: i32) {
    let _ = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status();
}

/// A child process killed (SIGKILL, by pid) when dropped — or, made `graceful`, sent SIGTERM
/// first (an nginx master stops its workers on SIGTERM; SIGKILL would leave them orphaned).
pub struct Proc {
    pub name: String,
    child: Option<Child>,
    spawned_pid: u32,
    graceful: bool,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command) -> Result<Proc> {
        let child = cmd
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Proc {
            name: name.to_string(),
            spawned_pid: child.id(),
            child: Some(child),
            graceful: false,
        })
    }

    /// When dropped: SIGTERM, up to 1 s to exit, then SIGKILL.
    pub fn graceful(mut self) -> Proc {
        self.graceful = true;
        self
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Blocks until the process exits by itself (for synchronous callers: the suite).
    pub fn wait_blocking(&mut self) -> Result<std::process::ExitStatus> {
        let name = self.name.clone();
        let child = self
            .child
            .as_mut()
            .ok_or_else(|| anyhow!("{name} not running"))?;
        let status = child.wait()?;
        self.child = None;
        Ok(status)
    }

    /// The child's stdout, if it was piped (once).
    pub fn take_stdout(&mut self) -> Option<std::process::ChildStdout> {
        self.child.as_mut()?.stdout.take()
    }

    /// The pid it was started with (also after it exited).
    pub fn spawned_pid(&self) -> u32 {
        self.spawned_pid
    }

    /// SIGTERM, then SIGKILL if it has not exited within `within`.
    pub fn terminate(&mut self, within: Duration) {
        if !self.is_running() {
            self.kill();
            return;
        }
        self.signal(15);
        let deadline = Instant::now() + within;
        while self.is_running() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        self.kill();
    }

    pub fn signal(&self, signal: i32) {
        if let Some(pid) = self.pid() {
            kill_pid(pid, signal);
        }
    }

    /// Sends SIGKILL and reaps the process.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits for the process to exit by itself; returns its exit code.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Result<Option<i32>> {
        let name = self.name.clone();
        let child = self
            .child
            .as_mut()
            .ok_or_else(|| anyhow!("{name} not running"))?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait()? {
                self.child = None;
                return Ok(status.code());
            }
            if Instant::now() >= deadline {
                bail!("{name} did not exit within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.graceful {
            self.terminate(Duration::from_secs(1));
        } else {
            self.kill();
        }
    }
}

/// Whether the Redis at `url` answers PING now (connecting within a second): the condition
/// `wait_for` polls while a server starts.
pub async fn redis_answers(url: String) -> Option<String> {
    let client = redis::Client::open(url).ok()?;
    let mut con = tokio::time::timeout(
        Duration::from_secs(1),
        client.get_multiplexed_async_connection(),
    )
    .await
    .ok()?
    .ok()?;
    redis::cmd("PING")
        .query_async::<String>(&mut con)
        .await
        .ok()
}

/// A `redis-server` of the test's own, on a free port, keeping nothing on disk.
pub struct RedisServer {
    pub port: u16,
    proc: Option<Proc>,
}

impl RedisServer {
    pub async fn start() -> Result<RedisServer> {
        let mut server = RedisServer {
            port: free_port(),
            proc: None,
        };
        server.restart().await?;
        Ok(server)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Sends `signal` to the server (19 = SIGSTOP freezes it, 18 = SIGCONT thaws it).
    pub fn signal(&self, signal: i32) {
        if let Some(p) = &self.proc {
            p.signal(signal);
        }
    }

    /// Kills the server (SIGKILL): its data is gone.
    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    /// Starts (again) on the same port, empty, and waits until it answers PING.
    pub async fn restart(&mut self) -> Result<()> {
        self.kill();
        let proc = Proc::spawn(
            "redis-server",
            Command::new("redis-server")
                .args(["--port", &self.port.to_string()])
                .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
                .args(["--daemonize", "no", "--loglevel", "warning"])
                .stdout(Stdio::null()),
        )?;
        self.proc = Some(proc);
        let url = self.url();
        wait_for("redis PING", WAIT, || redis_answers(url.clone())).await?;
        Ok(())
    }

    pub async fn connection(&self) -> Result<redis::aio::MultiplexedConnection> {
        Ok(redis::Client::open(self.url())?
            .get_multiplexed_async_connection()
            .await?)
    }

    /// `PUBSUB CHANNELS *`: the channels some client is subscribed to.
    pub async fn pubsub_channels(&self) -> Result<Vec<String>> {
        let mut con = self.connection().await?;
        Ok(redis::cmd("PUBSUB")
            .arg("CHANNELS")
            .arg("*")
            .query_async(&mut con)
            .await?)
    }
}

/// One `gateway` process on free ports.
pub struct Gateway {
    pub node_id: String,
    pub port: u16,
    pub admin_port: u16,
    pub proc: Proc,
}

/// Settings for starting a gateway; `env` adds or overrides `GATEWAY_*` variables.
#[derive(Clone, Default)]
pub struct GatewayOpts {
    pub redis_url: Option<String>,
    pub node_id: Option<String>,
    pub env: Vec<(String, String)>,
}

impl GatewayOpts {
    pub fn redis(url: &str) -> Self {
        GatewayOpts {
            redis_url: Some(url.to_string()),
            ..Default::default()
        }
    }

    pub fn env(mut self, key: &str, value: impl ToString) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    pub fn node(mut self, id: &str) -> Self {
        self.node_id = Some(id.to_string());
        self
    }

    /// Authentication on, with the harness's HS256 secret (see `mint_token`).
    pub fn with_jwt(self) -> Self {
        self.env("GATEWAY_JWT_SECRET", TEST_JWT_SECRET)
    }
}

/// The HS256 secret of gateways started `with_jwt`.
pub const TEST_JWT_SECRET: &str = "e2e-harness-secret-e2e-harness-secret";

/// A token for `sub` valid for a day, signed with the harness's secret (`with_jwt`
/// gateways), minted in this process: for benchmarks that log in thousands of users.
pub fn harness_token(sub: &str) -> Result<String> {
    gateway::auth::TokenCommand {
        sub: sub.to_string(),
        name: None,
        ttl: 24 * 3600,
        rooms: None,
        issuer: None,
        audience: None,
        secret: Some(TEST_JWT_SECRET.to_string()),
        private_key_file: None,
    }
    .mint()
    .map_err(|e| anyhow!(e))
}

/// Mints a token for `sub` with `gateway token` (extra flags: `--ttl`, `--rooms`, `--name`,
/// `--secret`, `--private-key-file`, ...), signed with `TEST_JWT_SECRET` unless told otherwise.
pub fn mint_token(sub: &str, extra: &[&str]) -> Result<String> {
    let output = Command::new(gateway_bin())
        .arg("token")
        .args(["--sub", sub])
        .args(extra)
        .env("GATEWAY_JWT_SECRET", TEST_JWT_SECRET)
        .output()
        .context("running gateway token")?;
    if !output.status.success() {
        bail!(
            "gateway token failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8(output.stdout)?.trim().to_string())
}

/// Opens a WebSocket with extra request headers; `Err` carries the HTTP status of a refused
/// upgrade as `UpgradeRefused`.
pub async fn connect_with_headers(url: &str, headers: &[(&str, &str)]) -> Result<Client> {
    let opts = headers.iter().fold(
        wire::Opts::default().timeout(WAIT),
        |opts, (name, value)| opts.header(name, value),
    );
    match wire::connect(url, &opts).await {
        Ok(ws) => Ok(Client::over(ws)),
        Err(e) => Err(wire::refusal(&e).map_or(e, anyhow::Error::new)),
    }
}

/// The status and body of a refused upgrade (fails if the upgrade succeeded).
pub async fn refused_upgrade(url: &str, headers: &[(&str, &str)]) -> Result<UpgradeRefused> {
    match connect_with_headers(url, headers).await {
        Ok(_) => bail!("upgrade to {url} with {headers:?} was accepted"),
        Err(e) => match e.downcast::<UpgradeRefused>() {
            Ok(refused) => Ok(refused),
            Err(e) => Err(e),
        },
    }
}

impl Gateway {
    /// Starts a gateway on free ports and waits for its `/healthz`. A gateway that exits
    /// before it is healthy (a port taken meanwhile) is started again on other ports.
    pub async fn start(opts: GatewayOpts) -> Result<Gateway> {
        let mut last_error = anyhow!("gateway not started");
        for _attempt in 0..3 {
            match Gateway::start_once(&opts).await {
                Ok(gw) => return Ok(gw),
                Err(e) => last_error = e,
            }
        }
        Err(last_error)
    }

    async fn start_once(opts: &GatewayOpts) -> Result<Gateway> {
        let port = free_port();
        let admin_port = free_port();
        let node_id = opts
            .node_id
            .clone()
            .unwrap_or_else(|| format!("node-{port}"));
        let mut cmd = Command::new(gateway_bin());
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("GATEWAY_LISTEN", format!("127.0.0.1:{port}"))
            .env("GATEWAY_ADMIN_LISTEN", format!("127.0.0.1:{admin_port}"))
            .env("GATEWAY_NODE_ID", &node_id)
            .env(
                "RUST_LOG",
                std::env::var("E2E_LOG").unwrap_or_else(|_| "warn".into()),
            );
        if let Some(url) = &opts.redis_url {
            cmd.env("GATEWAY_REDIS_URL", url);
        }
        for (k, v) in &opts.env {
            cmd.env(k, v);
        }
        let proc = Proc::spawn(&format!("gateway {node_id}"), &mut cmd)?;
        let mut gw = Gateway {
            node_id,
            port,
            admin_port,
            proc,
        };
        let deadline = Instant::now() + WAIT;
        loop {
            if !gw.proc.is_running() {
                bail!("gateway {} exited while starting", gw.node_id);
            }
            if let Ok((200, _)) = http_get(&gw.admin_addr(), "/healthz").await {
                return Ok(gw);
            }
            if Instant::now() >= deadline {
                bail!("timed out after {WAIT:?} waiting for gateway /healthz");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn admin_addr(&self) -> String {
        format!("127.0.0.1:{}", self.admin_port)
    }

    pub fn ws_url(&self) -> String {
        format!("ws://127.0.0.1:{}/ws", self.port)
    }

    /// Waits until `/readyz` answers `status`.
    pub async fn wait_ready(&self, status: u16) -> Result<()> {
        let admin = self.admin_addr();
        wait_for(&format!("/readyz {status}"), WAIT * 3, || {
            let admin = admin.clone();
            async move {
                match http_get(&admin, "/readyz").await {
                    Ok((s, _)) if s == status => Some(()),
                    _ => None,
                }
            }
        })
        .await
    }

    /// The value of one metric sample line (`name{labels} value`) whose text starts with
    /// `prefix`, summed over matching lines.
    pub async fn metric(&self, prefix: &str) -> Result<f64> {
        metric_at(&self.admin_addr(), prefix).await
    }
}

/// A gateway node running in this test process on a runtime (and thread) of its own, on
/// listeners bound to port 0: no process start-up, no port races. For tests where the process
/// boundary is not the point (SIGKILL, SIGSTOP, SIGTERM need a `Gateway` process). Dropping it
/// shuts the node down gracefully, as SIGTERM would.
pub struct InProcessGateway {
    pub node_id: String,
    pub port: u16,
    pub admin_port: u16,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl InProcessGateway {
    pub async fn start(opts: GatewayOpts) -> Result<InProcessGateway> {
        let node_id = opts.node_id.clone().unwrap_or_else(|| {
            static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            format!("inproc-{}-{n}", std::process::id())
        });
        let mut settings = vec![("GATEWAY_NODE_ID".to_string(), node_id.clone())];
        if let Some(url) = &opts.redis_url {
            settings.push(("GATEWAY_REDIS_URL".into(), url.clone()));
        }
        settings.extend(opts.env.iter().cloned());
        let config = gateway::config::Config::from_settings(&settings).map_err(|e| anyhow!(e))?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ports_tx, ports_rx) = tokio::sync::oneshot::channel::<Result<(u16, u16)>>();
        let thread = std::thread::Builder::new()
            .name(format!("gateway {node_id}"))
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        let _ = ports_tx.send(Err(e.into()));
                        return;
                    }
                };
                runtime.block_on(async move {
                    let bind = async {
                        let public = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
                        let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
                        anyhow::Ok((public, admin))
                    };
                    let (public, admin) = match bind.await {
                        Ok(listeners) => listeners,
                        Err(e) => {
                            let _ = ports_tx.send(Err(e));
                            return;
                        }
                    };
                    let ports =
                        (|| anyhow::Ok((public.local_addr()?.port(), admin.local_addr()?.port())))(
                        );
                    let _ = ports_tx.send(ports);
                    let shutdown = async {
                        let _ = stopped.await;
                    };
                    if let Err(e) = gateway::serve(public, admin, config, shutdown).await {
                        eprintln!("in-process gateway failed: {e:#}");
                    }
                });
            })?;
        let (port, admin_port) = ports_rx
            .await
            .context("the in-process gateway's thread ended")??;
        let gw = InProcessGateway {
            node_id,
            port,
            admin_port,
            stop: Some(stop),
            thread: Some(thread),
        };
        wait_for("in-process gateway /healthz", WAIT, || {
            let admin = gw.admin_addr();
            async move { matches!(http_get(&admin, "/healthz").await, Ok((200, _))).then_some(()) }
        })
        .await?;
        Ok(gw)
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn admin_addr(&self) -> String {
        format!("127.0.0.1:{}", self.admin_port)
    }

    pub fn ws_url(&self) -> String {
        format!("ws://127.0.0.1:{}/ws", self.port)
    }

    /// The value of one metric (see `Gateway::metric`).
    pub async fn metric(&self, prefix: &str) -> Result<f64> {
        metric_at(&self.admin_addr(), prefix).await
    }
}

impl Drop for InProcessGateway {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The value of one metric sample line (`name{labels} value`) of the admin listener at
/// `admin` whose text starts with `prefix`, summed over matching lines.
async fn metric_at(admin: &str, prefix: &str) -> Result<f64> {
    let (_, body) = http_get(admin, "/metrics").await?;
    Ok(body
        .lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

/// One node of each backend, with the extra settings `env`: the embedded broker, and a node on
/// a Redis of its own (kept alive by the returned handle), both in-process. For scenarios that
/// must behave the same on both.
pub async fn both_backends(
    env: &[(&str, &str)],
) -> Result<Vec<(&'static str, Option<RedisServer>, InProcessGateway)>> {
    let with = |mut opts: GatewayOpts| {
        for (key, value) in env {
            opts = opts.env(key, value);
        }
        opts
    };
    let embedded = InProcessGateway::start(with(GatewayOpts::default())).await?;
    let redis = RedisServer::start().await?;
    let on_redis = InProcessGateway::start(with(GatewayOpts::redis(&redis.url()))).await?;
    Ok(vec![
        ("embedded", None, embedded),
        ("redis", Some(redis), on_redis),
    ])
}

/// Starts `n` gateway nodes on one Redis, named `{prefix}0`, `{prefix}1`, …, each with the
/// extra settings `env`.
pub async fn start_nodes(
    redis: &RedisServer,
    prefix: &str,
    n: usize,
    env: &[(&str, &str)],
) -> Result<Vec<Gateway>> {
    let mut nodes = Vec::new();
    for i in 0..n {
        let mut opts = GatewayOpts::redis(&redis.url()).node(&format!("{prefix}{i}"));
        for (key, value) in env {
            opts = opts.env(key, value);
        }
        nodes.push(Gateway::start(opts).await?);
    }
    Ok(nodes)
}

/// Matches frames whose `event` is `event`.
pub fn is(event: &'static str) -> impl Fn(&Value) -> bool {
    move |frame: &Value| frame["event"] == event
}

/// A minimal HTTP/1.0 GET; returns the status and the body.
pub async fn http_get(addr: &str, path: &str) -> Result<(u16, String)> {
    http_request(addr, "GET", path, &[], None).await
}

/// `http_get` with extra request header lines (`Name: value`).
pub async fn http_get_with(addr: &str, path: &str, headers: &[&str]) -> Result<(u16, String)> {
    let headers: Vec<String> = headers.iter().map(|h| h.to_string()).collect();
    http_request(addr, "GET", path, &headers, None).await
}

/// A minimal HTTP/1.0 request with extra header lines (`Name: value`) and an optional body
/// (sent with its Content-Length); returns the status and the body.
pub async fn http_request(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[String],
    body: Option<&str>,
) -> Result<(u16, String)> {
    let mut stream = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr))
        .await
        .context("connect timeout")??;
    let mut request = format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n");
    for header in headers {
        request.push_str(header);
        request.push_str("\r\n");
    }
    if let Some(body) = body {
        request.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    request.push_str("\r\n");
    request.push_str(body.unwrap_or_default());
    stream.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut raw))
        .await
        .context("read timeout")??;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("no HTTP header in {text:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("bad status line in {head:?}"))?;
    Ok((status, body.to_string()))
}

/// A WebSocket client speaking the gateway protocol; remembers every frame it received.
pub struct Client {
    ws: wire::Ws,
    /// Frames received but not yet taken by a `recv_*` call.
    pending: std::collections::VecDeque<Value>,
    pub closed: Option<u16>,
}

impl Client {
    pub async fn connect(url: &str) -> Result<Client> {
        Ok(Client::over(
            wire::connect(url, &wire::Opts::default().timeout(WAIT)).await?,
        ))
    }

    fn over(ws: wire::Ws) -> Client {
        Client {
            ws,
            pending: Default::default(),
            closed: None,
        }
    }

    pub async fn send(&mut self, frame: Value) -> Result<()> {
        self.ws.send(Message::text(frame.to_string())).await?;
        Ok(())
    }

    pub async fn send_raw(&mut self, text: &str) -> Result<()> {
        self.ws.send(Message::text(text.to_string())).await?;
        Ok(())
    }

    pub async fn send_message(&mut self, message: Message) -> Result<()> {
        self.ws.send(message).await?;
        Ok(())
    }

    /// Sends `login` and waits for this connection's own `login` frame; returns it.
    pub async fn login(&mut self, user: &str, room: Value) -> Result<Value> {
        self.login_with(Client::login_frame(user, room).frame())
            .await
    }

    /// `login` proven by a token for `user` (for gateways started `with_jwt`).
    pub async fn login_proven(&mut self, user: &str, room: Value) -> Result<Value> {
        let login = Client::login_frame(user, room).token(mint_token(user, &[])?);
        self.login_with(login.frame()).await
    }

    /// The harness's login: `userName` `name-<user>`, `roomName` `room <room as JSON>`.
    fn login_frame(user: &str, room: Value) -> wire::Login {
        let room_name = format!("room {room}");
        wire::Login::new(user, room)
            .name(format!("name-{user}"))
            .room_name(room_name)
    }

    /// Sends a login frame and waits for the `login` frame naming this user and room.
    pub async fn login_with(&mut self, frame: Value) -> Result<Value> {
        let user = frame["userId"].clone();
        let room = frame["roomId"].clone();
        self.send(frame).await?;
        self.recv_until(|f| f["event"] == "login" && f["roomId"] == room && f["userId"] == user)
            .await
    }

    /// Next frame (from what was buffered first), or an error after `timeout`.
    pub async fn recv_timeout(&mut self, timeout: Duration) -> Result<Value> {
        if let Some(frame) = self.pending.pop_front() {
            return Ok(frame);
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let next = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .map_err(|_| anyhow!("no frame within {timeout:?}"))?;
            match next {
                Some(Ok(Message::Text(text))) => return Ok(serde_json::from_str(&text)?),
                Some(Ok(Message::Close(frame))) => {
                    let code = wire::close_code(frame.as_ref());
                    self.closed = Some(code);
                    bail!("connection closed with code {code}");
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => bail!("websocket error: {e}"),
                None => bail!("connection ended"),
            }
        }
    }

    pub async fn recv(&mut self) -> Result<Value> {
        self.recv_timeout(WAIT).await
    }

    /// Takes frames until one matches `pred`; the skipped frames are kept for later `recv`s.
    pub async fn recv_until(&mut self, pred: impl Fn(&Value) -> bool) -> Result<Value> {
        self.recv_until_timeout(WAIT, pred).await
    }

    pub async fn recv_until_timeout(
        &mut self,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        if let Some(pos) = self.pending.iter().position(&pred) {
            return Ok(self.pending.remove(pos).expect("position is valid"));
        }
        let deadline = Instant::now() + timeout;
        let mut skipped = Vec::new();
        let result = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.recv_from_socket(left).await {
                Ok(frame) if pred(&frame) => break Ok(frame),
                Ok(frame) => skipped.push(frame),
                Err(e) => break Err(e.context(format!("skipped frames: {skipped:?}"))),
            }
        };
        self.pending.extend(skipped);
        result
    }

    async fn recv_from_socket(&mut self, timeout: Duration) -> Result<Value> {
        let saved = std::mem::take(&mut self.pending);
        let result = self.recv_timeout(timeout).await;
        self.pending = saved;
        result
    }

    /// Asserts that no frame matching `pred` arrives within `quiet`.
    pub async fn expect_none(
        &mut self,
        quiet: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Result<()> {
        match self.recv_until_timeout(quiet, &pred).await {
            Ok(frame) => bail!("unexpected frame {frame}"),
            Err(_) if self.closed.is_none() => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Waits for the server to close the connection; returns the close code.
    pub async fn expect_close(&mut self, timeout: Duration) -> Result<u16> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(code) = self.closed {
                return Ok(code);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("connection not closed within {timeout:?}");
            }
            match self.recv_from_socket(left).await {
                Ok(frame) => self.pending.push_back(frame),
                Err(_) if self.closed.is_some() => {}
                Err(e) if e.to_string().contains("no frame within") => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Closes the connection from the client side.
    pub async fn close(mut self) -> Result<()> {
        self.ws
            .close(Some(tokio_tungstenite::tungstenite::protocol::CloseFrame {
                code: CloseCode::Normal,
                reason: "bye".into(),
            }))
            .await?;
        Ok(())
    }
}

/// A tool of the test suite's Python venv (`tests/.venv`, made by scripts/test from
/// tests/requirements.txt: schemathesis, kubernetes-validate); a missing one fails with the
/// command that installs it.
pub fn venv_bin(tool: &str) -> Result<PathBuf> {
    let bin = workspace_root().join("tests/.venv/bin").join(tool);
    if !bin.is_file() {
        bail!(
            "{} is missing: run scripts/test, or python3 -m venv tests/.venv && \
             tests/.venv/bin/pip install -r tests/requirements.txt",
            bin.display()
        );
    }
    Ok(bin)
}
