//! The deployment around gateway nodes, run locally from the same files as the compose stack:
//! nginx configured from `deploy/nginx/nginx.conf.template` ([`Nginx`]), a whole local cluster of
//! Redis + N gateways + nginx ([`Cluster`]), and a local Prometheus scraping the nodes' admin
//! ports ([`Prometheus`]).
//!
//! Every process is a [`Proc`], killed by its pid when its handle drops; every file lives in a
//! temporary directory removed on drop.

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use tempfile::TempDir;

use crate::{free_port, http_get, wait_for, workspace_root, Gateway, GatewayOpts, Proc};
use crate::{RedisServer, WAIT};

/// The nginx template, relative to the workspace root.
pub const TEMPLATE: &str = "deploy/nginx/nginx.conf.template";

/// Every placeholder of the template; [`render`] substitutes exactly these names.
pub const TEMPLATE_VARS: [&str; 8] = [
    "NGINX_LISTEN",
    "NGINX_UPSTREAM_SERVERS",
    "NGINX_RESOLVER",
    "NGINX_WORKER_PROCESSES",
    "NGINX_WORKER_CONNECTIONS",
    "NGINX_WORKER_RLIMIT_NOFILE",
    "NGINX_PREFIX",
    "NGINX_ACCESS_LOG",
];

/// The alerting rules the compose Prometheus loads; the local one loads them too.
pub const ALERT_RULES: &str = "deploy/prometheus/alerts.yml";

/// The local runner's NGINX_RESOLVER: none (its upstreams are fixed loopback addresses, and
/// Debian's nginx may predate `server ... resolve`, which came in 1.27.3).
pub const LOCAL_RESOLVER: &str = "# no resolver: fixed upstream addresses";

/// Open files per process on this machine (hard limit, not raisable).
pub const WORKER_RLIMIT_NOFILE: u32 = 20_000;
/// Per worker: a proxied WebSocket takes two, and ~1,000 descriptors stay spare (see template).
pub const WORKER_CONNECTIONS: u32 = 19_000;

/// The template's absolute path.
pub fn template_path() -> PathBuf {
    workspace_root().join(TEMPLATE)
}

/// `$NGINX_BIN`, else `/usr/sbin/nginx`.
pub fn nginx_bin() -> PathBuf {
    std::env::var_os("NGINX_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/sbin/nginx"))
}

/// `$PROMETHEUS_BIN`, else `/usr/bin/prometheus`.
pub fn prometheus_bin() -> PathBuf {
    std::env::var_os("PROMETHEUS_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/prometheus"))
}

/// Fails with an install hint when `path` is not an existing file.
pub fn require_bin(path: &Path, package: &str) -> Result<PathBuf> {
    if path.is_file() {
        Ok(path.to_path_buf())
    } else {
        bail!(
            "{} not found: install the Debian package `{package}` (apt-get install -y {package}) \
             or point the matching *_BIN variable at the binary",
            path.display()
        )
    }
}

/// The `${NAME}` placeholders of `text`, in order of first appearance.
pub fn placeholders(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        let after = &rest[start + 2..];
        let len = after
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(after.len());
        let name = &after[..len];
        let valid = !name.is_empty() && !name.starts_with(|c: char| c.is_ascii_digit());
        if valid && after[len..].starts_with('}') {
            if !found.iter().any(|f| f == name) {
                found.push(name.to_string());
            }
            rest = &after[len + 1..];
        } else {
            rest = after;
        }
    }
    found
}

/// Substitutes `${NAME}` for each `(NAME, value)` in `vars`, and nothing else: nginx's own
/// variables (`$http_upgrade`, `${host}`, ...) stay as they are. Every name must be one of
/// [`TEMPLATE_VARS`] and used by the template, and no `${NGINX_*}` placeholder may be left.
pub fn render(template: &str, vars: &[(String, String)]) -> Result<String> {
    let used: BTreeSet<String> = placeholders(template).into_iter().collect();
    let mut out = template.to_string();
    for (name, value) in vars {
        if !TEMPLATE_VARS.contains(&name.as_str()) {
            bail!("{name} is not a template variable (known: {TEMPLATE_VARS:?})");
        }
        if !used.contains(name) {
            bail!("{name} is not used by the template");
        }
        out = out.replace(&format!("${{{name}}}"), value);
    }
    let left: Vec<String> = placeholders(&out)
        .into_iter()
        .filter(|p| p.starts_with("NGINX_"))
        .collect();
    if !left.is_empty() {
        bail!("template placeholders without a value: {left:?}");
    }
    Ok(out)
}

/// `server ...;` lines for the upstream block, one per gateway public address.
pub fn upstream_servers(addrs: &[String]) -> String {
    addrs
        .iter()
        .map(|a| format!("server {a} max_fails=1 fail_timeout=2s;"))
        .collect::<Vec<_>>()
        .join("\n        ")
}

/// Values for every template variable.
#[derive(Clone, Debug)]
pub struct NginxConfig {
    pub listen: String,
    pub upstream_servers: String,
    /// A `resolver ...;` directive, or a comment when the upstream addresses are fixed.
    pub resolver: String,
    pub worker_processes: String,
    pub worker_connections: u32,
    pub worker_rlimit_nofile: u32,
    pub prefix: PathBuf,
    pub access_log: String,
}

impl NginxConfig {
    /// The local harness's values: `listen` is `host:port`, `prefix` a directory of its own.
    pub fn local(prefix: &Path, listen: &str, upstreams: &[String]) -> NginxConfig {
        NginxConfig {
            listen: listen.to_string(),
            upstream_servers: upstream_servers(upstreams),
            resolver: LOCAL_RESOLVER.into(),
            worker_processes: "1".into(),
            worker_connections: WORKER_CONNECTIONS,
            worker_rlimit_nofile: WORKER_RLIMIT_NOFILE,
            prefix: prefix.to_path_buf(),
            access_log: "off".into(),
        }
    }

    pub fn vars(&self) -> Vec<(String, String)> {
        let pairs = [
            ("NGINX_LISTEN", self.listen.clone()),
            ("NGINX_UPSTREAM_SERVERS", self.upstream_servers.clone()),
            ("NGINX_RESOLVER", self.resolver.clone()),
            ("NGINX_WORKER_PROCESSES", self.worker_processes.clone()),
            (
                "NGINX_WORKER_CONNECTIONS",
                self.worker_connections.to_string(),
            ),
            (
                "NGINX_WORKER_RLIMIT_NOFILE",
                self.worker_rlimit_nofile.to_string(),
            ),
            ("NGINX_PREFIX", self.prefix.display().to_string()),
            ("NGINX_ACCESS_LOG", self.access_log.clone()),
        ];
        pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
    }

    /// The template rendered with these values.
    pub fn render(&self) -> Result<String> {
        let template = std::fs::read_to_string(template_path())
            .with_context(|| format!("reading {}", template_path().display()))?;
        render(&template, &self.vars())
    }
}

/// Runs `nginx -t` on a rendered configuration, with the file's directory as nginx's prefix.
/// Returns nginx's output; fails with it when the test fails.
pub fn check_config(conf: &Path) -> Result<String> {
    let bin = require_bin(&nginx_bin(), "nginx")?;
    let prefix = conf
        .parent()
        .ok_or_else(|| anyhow!("{} has no parent directory", conf.display()))?;
    let output = Command::new(bin)
        .arg("-t")
        .arg("-p")
        .arg(prefix)
        .arg("-c")
        .arg(conf)
        .args(["-e", "stderr"])
        .stdin(Stdio::null())
        .output()
        .context("running nginx -t")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if !output.status.success() {
        bail!("nginx -t failed on {}:\n{text}", conf.display());
    }
    Ok(text)
}

/// A temporary directory that nginx workers (which drop root to `nobody`) can enter.
fn shared_tempdir(prefix: &str) -> Result<TempDir> {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::Builder::new().prefix(prefix).tempdir()?;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
    Ok(dir)
}

/// Fails when something already listens on `host:port` (nginx listens with `reuseport`, which
/// would otherwise share a port with another `reuseport` listener of the same user).
fn ensure_port_free(host: &str, port: u16) -> Result<()> {
    TcpListener::bind((host, port))
        .map(drop)
        .with_context(|| format!("{host}:{port} is already in use"))
}

/// Settings for [`Nginx::start_with`].
#[derive(Clone, Debug)]
pub struct NginxOpts {
    /// Address to listen on (loopback by default).
    pub host: String,
    /// Port; a free one when `None`.
    pub port: Option<u16>,
    pub worker_processes: String,
    pub worker_connections: u32,
    /// Log requests (to nginx's stderr) instead of `access_log off`.
    pub access_log: bool,
    /// nginx's stderr goes to the terminal instead of `error.log` in its directory.
    pub inherit_stderr: bool,
}

impl Default for NginxOpts {
    fn default() -> Self {
        NginxOpts {
            host: "127.0.0.1".into(),
            port: None,
            worker_processes: "1".into(),
            worker_connections: WORKER_CONNECTIONS,
            access_log: false,
            inherit_stderr: false,
        }
    }
}

/// A real nginx (`nginx -p <dir> -c <dir>/nginx.conf`, `daemon off`) in front of gateways.
pub struct Nginx {
    pub host: String,
    pub port: u16,
    pub proc: Proc,
    conf: PathBuf,
    error_log: Option<PathBuf>,
    // Last: removed after the process is killed.
    dir: TempDir,
}

impl Nginx {
    /// nginx on a free loopback port, proxying to the gateways' public `host:port` addresses.
    pub async fn start(upstreams: &[String]) -> Result<Nginx> {
        Nginx::start_with(upstreams, NginxOpts::default()).await
    }

    pub async fn start_with(upstreams: &[String], opts: NginxOpts) -> Result<Nginx> {
        let bin = require_bin(&nginx_bin(), "nginx")?;
        if upstreams.is_empty() {
            bail!("nginx needs at least one upstream gateway");
        }
        let port = match opts.port {
            Some(port) => {
                ensure_port_free(&opts.host, port)?;
                port
            }
            None => free_port(),
        };
        let dir = shared_tempdir("e2e-nginx-")?;
        let mut config =
            NginxConfig::local(dir.path(), &format!("{}:{port}", opts.host), upstreams);
        config.worker_processes = opts.worker_processes.clone();
        config.worker_connections = opts.worker_connections;
        if opts.access_log {
            config.access_log = "/dev/stderr".into();
        }
        let conf = dir.path().join("nginx.conf");
        std::fs::write(&conf, config.render()?)?;
        check_config(&conf)?;

        let error_log = (!opts.inherit_stderr).then(|| dir.path().join("error.log"));
        let mut cmd = Command::new(bin);
        cmd.arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(&conf)
            .args(["-e", "stderr"])
            .stdout(Stdio::null());
        if let Some(path) = &error_log {
            cmd.stderr(std::fs::File::create(path)?);
        }
        let proc = Proc::spawn("nginx", &mut cmd)?;
        let mut nginx = Nginx {
            host: opts.host,
            port,
            proc,
            conf,
            error_log,
            dir,
        };
        nginx.wait_accepting().await?;
        Ok(nginx)
    }

    /// Waits until nginx answers its own health location; fails early if it exits.
    async fn wait_accepting(&mut self) -> Result<()> {
        let deadline = Instant::now() + WAIT;
        let addr = self.addr();
        loop {
            if let Ok((200, _)) = http_get(&addr, "/nginx-health").await {
                return Ok(());
            }
            if !self.proc.is_running() {
                bail!("nginx exited at start:\n{}", self.error_log());
            }
            if Instant::now() >= deadline {
                bail!(
                    "nginx did not accept on {addr} within {WAIT:?}:\n{}",
                    self.error_log()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `host:port` of the listener.
    pub fn addr(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// The WebSocket URL through nginx.
    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr())
    }

    /// The chat page through nginx.
    pub fn http_url(&self) -> String {
        format!("http://{}/", self.addr())
    }

    /// The rendered configuration file.
    pub fn conf_path(&self) -> &Path {
        &self.conf
    }

    /// nginx's own directory (prefix, pid file, temp paths).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Stops nginx with its workers. (SIGKILL to the master alone, as `proc.kill()` does, would
    /// leave the workers running and listening.) Sends SIGTERM, a fast shutdown in which the
    /// master stops its workers and then exits, waits up to 3 s, then kills what is left.
    pub fn stop(&mut self) {
        self.proc.terminate(Duration::from_secs(3));
    }

    /// What nginx wrote to its error log so far (empty when stderr is inherited).
    pub fn error_log(&self) -> String {
        self.error_log
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Redis for a cluster: the harness's own server (free port), or one on a chosen port.
pub async fn redis_on(port: Option<u16>) -> Result<RedisServer> {
    match port {
        None => RedisServer::start().await,
        Some(port) => {
            ensure_port_free("127.0.0.1", port)?;
            let mut server = RedisServer { port, proc: None };
            server.restart().await?;
            Ok(server)
        }
    }
}

/// Settings for [`Cluster::start_with`].
#[derive(Clone, Default)]
pub struct ClusterOpts {
    /// Gateway nodes (at least one).
    pub nodes: usize,
    /// Redis port; a free one when `None`.
    pub redis_port: Option<u16>,
    /// Extra environment for every gateway (`GATEWAY_*`, `RUST_LOG`, ...).
    pub gateway_env: Vec<(String, String)>,
    pub nginx: NginxOpts,
}

impl ClusterOpts {
    pub fn nodes(nodes: usize) -> ClusterOpts {
        ClusterOpts {
            nodes,
            ..Default::default()
        }
    }
}

/// Redis + N gateway nodes sharing it + nginx in front of them, all on loopback.
pub struct Cluster {
    // Dropped in field order: nginx first, then the nodes, Redis last.
    pub nginx: Nginx,
    pub nodes: Vec<Gateway>,
    pub redis: RedisServer,
}

impl Cluster {
    pub async fn start(nodes: usize) -> Result<Cluster> {
        Cluster::start_with(ClusterOpts::nodes(nodes)).await
    }

    /// Starts Redis, then the nodes (`node-1` ... `node-N`, each ready), then nginx.
    pub async fn start_with(opts: ClusterOpts) -> Result<Cluster> {
        if opts.nodes == 0 {
            bail!("a cluster needs at least one gateway node");
        }
        let gateway = crate::gateway_bin();
        if !gateway.is_file() {
            bail!(
                "gateway binary {} not found: build it first (cargo build -p gateway) or set \
                 GATEWAY_BIN",
                gateway.display()
            );
        }
        let redis = redis_on(opts.redis_port).await?;
        let mut nodes = Vec::with_capacity(opts.nodes);
        for i in 1..=opts.nodes {
            // nginx connects from loopback: its X-Forwarded-For names the client.
            let mut node_opts = GatewayOpts::redis(&redis.url())
                .node(&format!("node-{i}"))
                .env("GATEWAY_TRUSTED_PROXIES", "127.0.0.1");
            node_opts.env.extend(opts.gateway_env.iter().cloned());
            let node = Gateway::start(node_opts)
                .await
                .with_context(|| format!("starting gateway node-{i}"))?;
            node.wait_ready(200)
                .await
                .with_context(|| format!("gateway node-{i} never became ready"))?;
            nodes.push(node);
        }
        let upstreams: Vec<String> = nodes.iter().map(|n| n.addr()).collect();
        let nginx = Nginx::start_with(&upstreams, opts.nginx.clone()).await?;
        Ok(Cluster {
            nginx,
            nodes,
            redis,
        })
    }

    /// The WebSocket URL through nginx.
    pub fn ws_url(&self) -> String {
        self.nginx.ws_url()
    }

    /// The nodes' admin addresses (`/metrics`, `/healthz`, `/readyz`).
    pub fn admin_addrs(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.admin_addr()).collect()
    }

    /// Graceful stop: SIGTERM to every node, waits for them to exit (up to `grace`), then kills
    /// whatever is left (nginx, Redis, any node still running) by dropping.
    pub async fn stop(mut self, grace: Duration) -> Result<()> {
        for node in &self.nodes {
            node.proc.signal(15);
        }
        let mut result = Ok(());
        for node in &mut self.nodes {
            if let Err(e) = node.proc.wait_exit(grace).await {
                result = Err(e);
            }
        }
        result
    }
}

/// Percent-encodes a query-string value.
pub fn url_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len() * 3);
    for byte in value.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(byte as char)
            }
            _ => out.push_str(&format!("%{byte:02X}")),
        }
    }
    out
}

/// A Prometheus configuration scraping `targets` (admin `host:port`s) as job `gateway`, with
/// the repository's alerting rules loaded.
pub fn prometheus_config(targets: &[String], scrape_interval: Duration) -> String {
    let interval = format!("{}ms", scrape_interval.as_millis().max(1));
    let targets = targets
        .iter()
        .map(|t| format!("\"{t}\""))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "# Generated by e2e::nginx::Prometheus for a local cluster.\n\
         global:\n  scrape_interval: {interval}\n  scrape_timeout: {interval}\n  \
         evaluation_interval: {interval}\n\
         rule_files:\n  - \"{rules}\"\n\
         scrape_configs:\n  - job_name: gateway\n    metrics_path: /metrics\n    \
         static_configs:\n      - targets: [{targets}]\n",
        rules = workspace_root().join(ALERT_RULES).display()
    )
}

/// A real Prometheus scraping gateway admin ports, with its data in a temporary directory.
pub struct Prometheus {
    pub port: u16,
    pub proc: Proc,
    log: Option<PathBuf>,
    // Last: removed after the process is killed.
    dir: TempDir,
}

impl Prometheus {
    /// Prometheus on `port` (a free one when `None`) scraping `targets` every `scrape_interval`;
    /// returns once it reports ready. Its log goes to a file unless `inherit_stderr`.
    pub async fn start(
        targets: &[String],
        scrape_interval: Duration,
        port: Option<u16>,
        inherit_stderr: bool,
    ) -> Result<Prometheus> {
        let bin = require_bin(&prometheus_bin(), "prometheus")?;
        let port = match port {
            Some(port) => {
                ensure_port_free("127.0.0.1", port)?;
                port
            }
            None => free_port(),
        };
        let dir = tempfile::Builder::new()
            .prefix("e2e-prometheus-")
            .tempdir()?;
        let config = dir.path().join("prometheus.yml");
        std::fs::write(&config, prometheus_config(targets, scrape_interval))?;
        let log = (!inherit_stderr).then(|| dir.path().join("prometheus.log"));
        let mut cmd = Command::new(bin);
        cmd.arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null());
        if let Some(path) = &log {
            cmd.stderr(std::fs::File::create(path)?);
        }
        let proc = Proc::spawn("prometheus", &mut cmd)?;
        let mut prometheus = Prometheus {
            port,
            proc,
            log,
            dir,
        };
        let deadline = Instant::now() + WAIT * 3;
        let addr = prometheus.addr();
        loop {
            if let Ok((200, _)) = http_get(&addr, "/-/ready").await {
                break;
            }
            if !prometheus.proc.is_running() {
                bail!("prometheus exited at start:\n{}", prometheus.log());
            }
            if Instant::now() >= deadline {
                bail!("prometheus not ready on {addr}:\n{}", prometheus.log());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(prometheus)
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn url(&self) -> String {
        format!("http://{}/", self.addr())
    }

    /// The generated configuration file.
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("prometheus.yml")
    }

    /// What Prometheus logged so far (empty when stderr is inherited).
    pub fn log(&self) -> String {
        self.log
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default()
    }

    /// An instant query through the HTTP API; returns `data.result` (a vector's samples).
    pub async fn query(&self, expr: &str) -> Result<Vec<Value>> {
        let path = format!("/api/v1/query?query={}", url_encode(expr));
        let (status, body) = http_get(&self.addr(), &path).await?;
        let reply: Value = serde_json::from_str(&body)
            .with_context(|| format!("prometheus answered {status} with {body:?}"))?;
        if reply["status"] != "success" {
            bail!("query {expr:?} failed ({status}): {reply}");
        }
        match &reply["data"]["result"] {
            Value::Array(samples) => Ok(samples.clone()),
            other => Ok(vec![other.clone()]),
        }
    }

    /// Waits until every target of job `gateway` has been scraped successfully.
    pub async fn wait_targets_up(&self, count: usize, timeout: Duration) -> Result<()> {
        wait_for(
            &format!("{count} gateway targets up in prometheus"),
            timeout,
            || async {
                let up = self.query("up{job=\"gateway\"} == 1").await.ok()?;
                (up.len() == count).then_some(())
            },
        )
        .await
    }
}

/// The numeric values of an instant vector's samples (NaN included).
pub fn sample_values(samples: &[Value]) -> Vec<f64> {
    samples
        .iter()
        .filter_map(|s| s["value"][1].as_str()?.parse::<f64>().ok())
        .collect()
}
