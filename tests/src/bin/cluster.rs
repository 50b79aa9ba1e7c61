//! A local cluster for trying the gateway by hand:
//!
//! ```text
//! cargo build -p gateway
//! cargo run -p e2e --bin cluster -- --nodes 3 [--port 18080] [--prometheus] [--redis-cluster]
//! ```
//!
//! Starts redis-server (free port, or `--redis-port`) — or with `--redis-cluster` a Redis
//! Cluster of 3 masters and 3 replicas on free ports, the gateways on
//! `GATEWAY_REDIS_CLUSTER_URLS` —, N gateway nodes on free loopback ports,
//! and nginx from `deploy/nginx/nginx.conf.template` on 127.0.0.1:18080 (not 8080, which the
//! compose stack and a lone gateway use). With `--prometheus`, also a local Prometheus scraping
//! every node's admin port (127.0.0.1:19090 by default). Prints the URLs, then runs until
//! Ctrl-C (SIGINT) or SIGTERM and stops everything it started.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use e2e::nginx::{Cluster, ClusterOpts, Nginx, NginxOpts, Prometheus};
use e2e::redis_cluster::{self, RedisCluster};
use e2e::{Gateway, GatewayOpts, RedisServer};
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

    /// A local Redis Cluster (3 masters + 3 replicas, free ports) instead of one Redis; the
    /// gateways get every node in GATEWAY_REDIS_CLUSTER_URLS.
    #[arg(long, conflicts_with = "redis_port")]
    redis_cluster: bool,

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
        "starting {}, {} gateway node(s) ({}) and nginx ...",
        if args.redis_cluster {
            "a redis cluster (3 masters + 3 replicas)"
        } else {
            "redis"
        },
        args.nodes,
        e2e::gateway_bin().display()
    );
    let mut cluster = if args.redis_cluster {
        Local::start_on_redis_cluster(opts).await?
    } else {
        Local::start(opts).await?
    };
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
            "redisUrl": cluster.broker.url(),
            "redisCluster": matches!(cluster.broker, Broker::Cluster(_)),
            "nodes": nodes,
        });
        println!("READY {ready}");
    }
    print_urls(&cluster, prometheus.as_ref());
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

/// What runs where.
fn print_urls(cluster: &Local, prometheus: Option<&Prometheus>) {
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
    match &cluster.broker {
        Broker::Single(redis) => println!("redis:                  {}", redis.url()),
        Broker::Cluster(rc) => {
            println!(
                "redis cluster:          GATEWAY_REDIS_CLUSTER_URLS={}",
                rc.urls()
            );
            for node in &rc.nodes {
                println!("  redis node            {}", node.url());
            }
        }
    }
    println!(
        "nginx config:           {}",
        cluster.nginx.conf_path().display()
    );
    if let Some(p) = prometheus {
        println!("prometheus:             {}", p.url());
        println!("prometheus config:      {}", p.config_path().display());
    }
}

/// The broker the nodes share.
enum Broker {
    Single(RedisServer),
    Cluster(RedisCluster),
}

impl Broker {
    /// The single Redis's URL, or the cluster's seed URLs (comma-separated).
    fn url(&self) -> String {
        match self {
            Broker::Single(redis) => redis.url(),
            Broker::Cluster(rc) => rc.urls(),
        }
    }
}

/// What the runner started. Dropped in field order: nginx, the nodes, the broker last.
struct Local {
    nginx: Nginx,
    nodes: Vec<Gateway>,
    broker: Broker,
}

impl Local {
    /// One Redis: the harness's cluster.
    async fn start(opts: ClusterOpts) -> Result<Local> {
        let Cluster {
            nginx,
            nodes,
            redis,
        } = Cluster::start_with(opts).await?;
        Ok(Local {
            nginx,
            nodes,
            broker: Broker::Single(redis),
        })
    }

    /// A local Redis Cluster (3 masters + 3 replicas), then the nodes on it (`node-1` ...
    /// `node-N`, each ready, with the same settings as on one Redis), then nginx.
    async fn start_on_redis_cluster(opts: ClusterOpts) -> Result<Local> {
        let gateway = e2e::gateway_bin();
        if !gateway.is_file() {
            bail!(
                "gateway binary {} not found: build it first (cargo build -p gateway) or set \
                 GATEWAY_BIN",
                gateway.display()
            );
        }
        let rc = RedisCluster::start(redis_cluster::ClusterOpts::default())
            .await
            .context("starting the redis cluster")?;
        let mut nodes = Vec::with_capacity(opts.nodes);
        for i in 1..=opts.nodes {
            let mut node_opts = GatewayOpts::default()
                .node(&format!("node-{i}"))
                .env("GATEWAY_REDIS_CLUSTER_URLS", rc.urls())
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
        let upstreams: Vec<String> = nodes.iter().map(Gateway::addr).collect();
        let nginx = Nginx::start_with(&upstreams, opts.nginx.clone()).await?;
        Ok(Local {
            nginx,
            nodes,
            broker: Broker::Cluster(rc),
        })
    }

    fn ws_url(&self) -> String {
        self.nginx.ws_url()
    }

    fn admin_addrs(&self) -> Vec<String> {
        self.nodes.iter().map(Gateway::admin_addr).collect()
    }

    /// Graceful stop: SIGTERM to every node, waits for them (up to `grace`), then drops the
    /// rest (nginx, the broker, any node still running: killed).
    async fn stop(mut self, grace: Duration) -> Result<()> {
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
