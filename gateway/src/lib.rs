//! A horizontally scalable WebSocket chat gateway: stateless nodes speaking the tutorial's
//! chat protocol, fanned out through a broker (Redis pub/sub, or an embedded one for a single
//! node), with presence, persisted history, acks and offline sync.
#![forbid(unsafe_code)]

pub mod api;
pub mod auth;
pub mod broker;
pub mod config;
pub mod delivery;
pub mod http;
pub mod hub;
pub mod limits;
pub mod metrics;
pub mod node;
pub mod outlet;
pub mod presence;
pub mod protocol;
pub mod session;
pub mod telemetry;
pub mod websocket;

use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;

use crate::config::Config;
use crate::node::Node;

/// Runs a node on the configured addresses until SIGTERM/SIGINT (see `serve`).
pub async fn run(config: Config) -> anyhow::Result<()> {
    let public = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding GATEWAY_LISTEN {}", config.listen))?;
    let admin = TcpListener::bind(config.admin_listen)
        .await
        .with_context(|| format!("binding GATEWAY_ADMIN_LISTEN {}", config.admin_listen))?;
    serve(public, admin, config, shutdown_signal()).await
}

/// Serves a node on bound listeners (WebSockets and the page on `public`; health, metrics and
/// the server API on `admin`) until `shutdown` completes, then shuts down gracefully: stop
/// accepting, close every WebSocket with 1012, announce the leaves, and return within the
/// grace period. Tests run nodes in-process this way, on listeners bound to port 0.
pub async fn serve(
    public: TcpListener,
    admin: TcpListener,
    config: Config,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let config = Config {
        listen: public.local_addr()?,
        admin_listen: admin.local_addr()?,
        ..config
    };
    let grace = config.shutdown_grace();
    let node = Node::start(config).context("starting the node")?;
    tracing::info!(
        node = %node.node_id,
        listen = %public.local_addr()?,
        admin = %admin.local_addr()?,
        broker = node.broker.backend(),
        "gateway started"
    );

    let public_server = http::serve_public(
        public,
        http::public_router(node.clone()),
        node.clone(),
        node.shutdown.clone(),
    );
    let admin_stop = node.background_stop.clone();
    let admin_server = axum::serve(admin, http::admin_router(node.clone()))
        .with_graceful_shutdown(async move { admin_stop.cancelled().await });
    let public_task = tokio::spawn(public_server);
    let admin_task = tokio::spawn(async move { admin_server.await });

    shutdown.await;
    tracing::info!(open = node.open_connections(), "shutting down");
    node.shutdown.cancel();
    node.sessions.close();
    if tokio::time::timeout(grace, node.sessions.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            open = node.open_connections(),
            "grace period over with connections still open"
        );
    }
    node.acks.flush().await;
    node.background_stop.cancel();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), public_task).await;
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), admin_task).await;
    drop(Arc::clone(&node));
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("installing the SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
