//! A local cluster for trying the gateway by hand:
//!
//! ```text
//! cargo build -p gateway
//! cargo run -p e2e --bin cluster -- --nodes 3 [--port 18080] [--prometheus]
//! ```
//!
//! Starts redis-server (free port, or `--redis-port`), N gateway nodes on free loopback ports,
//! and nginx from `deploy/nginx/nginx.conf.template` on 127.0.0.1:18080 (not 8080, which the
//! compose stack and a lone gateway use). With `--prometheus`, also a local Prometheus scraping
//! every node's admin port (127.0.0.1:19090 by default). Prints the URLs, then runs until
//! Ctrl-C (SIGINT) or SIGTERM and stops everything it started.

use std::time::Duration;

use anyhow::{bail, Result};
use clap::Parser;
use e2e::nginx::{Cluster, ClusterOpts, NginxOpts, Prometheus};
use tokio::signal::unix::{signal, SignalKind};

#[derive(Parser, Debug)]
#[command(
    name = "cluster",
    about = "Run Redis + N gateway nodes + nginx (and optionally Prometheus) on loopback"
)]
struct Args {
    /// Number of gateway nodes.
    #[arg(long, default_value_t = 3)]
    nodes: usize,

    /// nginx port on 127.0.0.1 (the chat page and WebSocket entry point); 0 = a free one.
    #[arg(long, default_value_t = 18080)]
    port: u16,

    /// For programs driving the runner (the browser tests): once everything is up, print one
    /// line `READY {json}` on stdout with the ports and the nodes' ids, ports and pids.
    #[arg(long)]
    ready_json: bool,

    /// Redis port on 127.0.0.1 (default: a free port; never the machine's 6379 unless asked).
    #[arg(long)]
    redis_port: Option<u16>,

    /// Also run Prometheus scraping every node's /metrics.
    #[arg(long)]
    prometheus: bool,

    /// Prometheus port on 127.0.0.1.
    #[arg(long, default_value_t = 19090)]
    prometheus_port: u16,

    /// Prometheus scrape interval in seconds.
    #[arg(long, default_value_t = 5)]
    scrape_interval: u64,

    /// nginx worker processes (`auto` = one per core).
    #[arg(long, default_value = "auto")]
    nginx_workers: String,

    /// RUST_LOG for the gateways (their logs go to this terminal).
    #[arg(long, default_value = "info")]
    log: String,

    /// Extra gateway settings as NAME=VALUE (repeatable), e.g. --env GATEWAY_LOG_FORMAT=json.
    #[arg(long = "env", value_name = "NAME=VALUE")]
    env: Vec<String>,

    /// Log every request nginx proxies (to this terminal).
    #[arg(long)]
    access_log: bool,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    if args.nodes == 0 {
        bail!("--nodes must be at least 1");
    }
    let mut gateway_env = vec![("RUST_LOG".to_string(), args.log.clone())];
    for item in &args.env {
        let Some((name, value)) = item.split_once('=') else {
            bail!("--env {item:?} is not NAME=VALUE");
        };
        gateway_env.push((name.to_string(), value.to_string()));
    }
    let opts = ClusterOpts {
        nodes: args.nodes,
        redis_port: args.redis_port,
        gateway_env,
        nginx: NginxOpts {
            port: (args.port != 0).then_some(args.port),
            worker_processes: args.nginx_workers.clone(),
            access_log: args.access_log,
            inherit_stderr: true,
            ..NginxOpts::default()
        },
    };
    eprintln!(
        "starting redis, {} gateway node(s) ({}) and nginx ...",
        args.nodes,
        e2e::gateway_bin().display()
    );
    let mut cluster = Cluster::start_with(opts).await?;
    let prometheus = if args.prometheus {
        Some(
            Prometheus::start(
                &cluster.admin_addrs(),
                Duration::from_secs(args.scrape_interval.max(1)),
                Some(args.prometheus_port),
                true,
            )
            .await?,
        )
    } else {
        None
    };

    if args.ready_json {
        let nodes: Vec<_> = cluster
            .nodes
            .iter()
            .map(|n| {
                serde_json::json!({
                    "id": n.node_id, "port": n.port, "adminPort": n.admin_port,
                    "pid": n.proc.pid(),
                })
            })
            .collect();
        let ready = serde_json::json!({
            "url": cluster.nginx.http_url(),
            "redisUrl": cluster.redis.url(),
            "nodes": nodes,
        });
        println!("READY {ready}");
    }
    println!();
    println!("chat page (via nginx):  {}", cluster.nginx.http_url());
    println!("websocket (via nginx):  {}", cluster.ws_url());
    for node in &cluster.nodes {
        println!(
            "{:<8} public http://{}/   ws {}   metrics http://{}/metrics",
            node.node_id,
            node.addr(),
            node.ws_url(),
            node.admin_addr()
        );
    }
    println!("redis:                  {}", cluster.redis.url());
    println!(
        "nginx config:           {}",
        cluster.nginx.conf_path().display()
    );
    if let Some(p) = &prometheus {
        println!("prometheus:             {}", p.url());
        println!("prometheus config:      {}", p.config_path().display());
    }
    println!("Ctrl-C stops everything.");

    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut check = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = check.tick() => {
                if !cluster.nginx.proc.is_running() {
                    eprintln!("nginx exited; stopping");
                    break;
                }
                for node in &mut cluster.nodes {
                    if !node.proc.is_running() {
                        eprintln!("gateway {} exited", node.node_id);
                    }
                }
                cluster.nodes.retain_mut(|n| n.proc.is_running());
                if cluster.nodes.is_empty() {
                    eprintln!("no gateway node left; stopping");
                    break;
                }
            }
        }
    }

    eprintln!("stopping ...");
    drop(prometheus);
    if let Err(e) = cluster.stop(Duration::from_secs(15)).await {
        eprintln!("{e:#}");
    }
    Ok(())
}
