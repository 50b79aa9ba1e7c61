//! The node: everything sessions and HTTP handlers share, built once at start-up, and the
//! background tasks that run beside the connections (fan-out dispatcher, presence upkeep,
//! ack writer).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{Authenticator, OriginPolicy};
use crate::broker::memory::MemoryBroker;
use crate::broker::redis::RedisBroker;
use crate::broker::{Broker, Limits};
use crate::config::{Config, DefaultRoom};
use crate::delivery::AckStore;
use crate::hub::Hub;
use crate::limits::{AddressBuckets, ConnectionCounts, Strikes, TrustedProxies};
use crate::metrics::Metrics;
use crate::presence::Presence;
use std::net::IpAddr;

pub struct Node {
    pub config: Config,
    /// Random per process start: connection keys of a restarted node (same node id) never
    /// collide with its previous life's presence entries.
    pub incarnation: String,
    /// `None`: anonymous mode (identities are self-asserted; nothing private is served).
    pub auth: Option<Authenticator>,
    pub origins: OriginPolicy,
    pub trusted_proxies: TrustedProxies,
    /// TCP connections still in their HTTP request or upgrade.
    pub pending_handshakes: Arc<tokio::sync::Semaphore>,
    /// WebSocket connections per client address.
    pub per_ip: Arc<ConnectionCounts<IpAddr>>,
    /// WebSockets per client address that have not logged in yet.
    pub pending_logins: Arc<ConnectionCounts<IpAddr>>,
    /// WebSocket upgrades per client address and second.
    pub upgrade_rate: AddressBuckets,
    /// `upgrade_rate` refusals answered with an HTTP 429 per address and second; beyond them
    /// the address's connections are closed at accept (see `refuse_at_accept`).
    pub upgrade_refusals: AddressBuckets,
    /// Logged-in connections per user.
    pub per_user: Arc<ConnectionCounts<String>>,
    /// Client addresses whose connections were closed for abuse.
    pub strikes: Strikes,
    pub node_id: String,
    pub default_rooms: Vec<DefaultRoom>,
    pub broker: Broker,
    pub hub: Arc<Hub>,
    pub presence: Arc<Presence>,
    pub acks: Arc<AckStore>,
    pub metrics: Arc<Metrics>,
    /// Cancelled when the node starts shutting down: sessions close with 1012.
    pub shutdown: CancellationToken,
    /// Cancelled after sessions are done: background tasks stop.
    pub background_stop: CancellationToken,
    /// Every session task, so shutdown can wait for them.
    pub sessions: TaskTracker,
    next_conn_id: AtomicU64,
    open_connections: AtomicUsize,
}

impl Node {
    /// Builds the node and starts its background tasks. Must run inside the tokio runtime.
    pub fn start(config: Config) -> anyhow::Result<Arc<Node>> {
        let node_id = config.node_id();
        let default_rooms = config.parse_default_rooms().map_err(anyhow::Error::msg)?;
        let auth = Authenticator::from_config(&config).map_err(anyhow::Error::msg)?;
        let origins =
            OriginPolicy::parse(config.allowed_origins.as_deref()).map_err(anyhow::Error::msg)?;
        let trusted_proxies =
            TrustedProxies::parse(config.trusted_proxies.as_deref()).map_err(anyhow::Error::msg)?;
        if auth.is_none() {
            tracing::warn!(
                "no JWT key configured: anonymous mode — identities are self-asserted, direct \
                 messages, inboxes and stored positions are refused"
            );
        }
        let metrics = Arc::new(Metrics::new(&node_id));
        let shutdown = CancellationToken::new();
        let background_stop = CancellationToken::new();
        let (inbound_tx, inbound_rx) = mpsc::unbounded_channel();
        let limits = Limits {
            history_max_len: config.history_max_len,
            dedup_ttl_ms: config.dedup_ttl_ms,
            announce_max: config.announce_max_room_size,
            history_ttl_ms: config.history_ttl_ms,
            announces_per_sec: config.max_announces_per_room_per_sec as u64,
            presence_ttl_ms: config.presence_ttl_ms,
            wait_replicas: config.redis_wait_replicas,
            wait_timeout_ms: config.redis_wait_timeout_ms,
        };

        // The Redis broker calls back after a pub/sub reconnect so presence is re-asserted.
        let presence_slot: Arc<std::sync::OnceLock<Arc<Presence>>> = Arc::default();
        let broker = if let Some(url) = &config.redis_url {
            Broker::Redis(RedisBroker::start(
                url,
                limits,
                metrics.clone(),
                inbound_tx,
                background_stop.clone(),
                reassert_presence(presence_slot.clone()),
            )?)
        } else if !config.redis_cluster_urls.is_empty() {
            Broker::Redis(RedisBroker::start_cluster(
                &config.redis_cluster_urls,
                limits,
                metrics.clone(),
                inbound_tx,
                background_stop.clone(),
                reassert_presence(presence_slot.clone()),
            )?)
        } else {
            metrics.broker_up.set(1);
            Broker::Memory(Arc::new(MemoryBroker::new(limits, inbound_tx)))
        };
        let hub = Arc::new(Hub::new(
            node_id.clone(),
            broker.clone(),
            metrics.clone(),
            config.max_rooms_per_node as usize,
        ));
        tokio::spawn(hub.clone().dispatch(inbound_rx));
        let presence = Arc::new(Presence::new(
            broker.clone(),
            node_id.clone(),
            config.presence_ttl(),
            metrics.clone(),
        ));
        let _ = presence_slot.set(presence.clone());
        presence.clone().spawn_maintenance(background_stop.clone());
        let acks = Arc::new(AckStore::new(broker.clone()));
        acks.clone().spawn_flusher(background_stop.clone());

        Ok(Arc::new(Node {
            incarnation: format!("{:08x}", rand::random::<u32>()),
            pending_handshakes: Arc::new(tokio::sync::Semaphore::new(
                config.max_pending_handshakes as usize,
            )),
            per_ip: ConnectionCounts::new(config.max_connections_per_ip),
            per_user: ConnectionCounts::new(config.max_connections_per_user),
            pending_logins: ConnectionCounts::new(config.max_pending_logins_per_ip),
            upgrade_rate: AddressBuckets::new(
                config.max_upgrades_per_ip_per_sec as f64,
                2.0 * config.max_upgrades_per_ip_per_sec as f64,
            ),
            upgrade_refusals: AddressBuckets::new(
                config.max_upgrades_per_ip_per_sec as f64,
                config.max_upgrades_per_ip_per_sec as f64,
            ),
            strikes: Strikes::new(
                config.abuse_strikes,
                std::time::Duration::from_millis(config.abuse_cooldown_ms),
            ),
            config,
            auth,
            origins,
            trusted_proxies,
            node_id,
            default_rooms,
            broker,
            hub,
            presence,
            acks,
            metrics,
            shutdown,
            background_stop,
            sessions: TaskTracker::new(),
            next_conn_id: AtomicU64::new(1),
            open_connections: AtomicUsize::new(0),
        }))
    }

    /// Reserves a connection slot; `None` when the node is at its connection limit.
    pub fn admit_connection(self: &Arc<Self>) -> Option<ConnectionSlot> {
        let limit = self.config.max_connections as usize;
        let previous = self.open_connections.fetch_add(1, Ordering::AcqRel);
        if previous >= limit {
            self.open_connections.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        self.metrics.connections_open.inc();
        self.metrics.connections_accepted.inc();
        Some(ConnectionSlot {
            node: self.clone(),
            conn_id: self.next_conn_id.fetch_add(1, Ordering::Relaxed),
        })
    }

    pub fn open_connections(&self) -> usize {
        self.open_connections.load(Ordering::Acquire)
    }

    /// Ready to serve: broker reachable and not shutting down.
    pub fn is_ready(&self) -> bool {
        self.broker.is_up() && !self.shutdown.is_cancelled()
    }
}

/// A connection's place in the node's limit; released on drop.
pub struct ConnectionSlot {
    pub node: Arc<Node>,
    pub conn_id: u64,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.node.open_connections.fetch_sub(1, Ordering::AcqRel);
        self.node.metrics.connections_open.dec();
    }
}

/// What the Redis broker calls after its pub/sub connection (or a cluster shard's) came back:
/// refresh presence at once, retrying a while — the command connection may still be
/// reconnecting. The presence object does not exist yet when the broker is made, so the
/// callback looks it up in `slot`.
fn reassert_presence(slot: Arc<std::sync::OnceLock<Arc<Presence>>>) -> Arc<dyn Fn() + Send + Sync> {
    Arc::new(move || {
        let Some(presence) = slot.get().cloned() else {
            return;
        };
        // Others could not refresh through the outage either.
        presence.disturbed("the broker connection was lost");
        tokio::spawn(async move {
            let mut delay = std::time::Duration::from_millis(50);
            for attempt in 1..=10 {
                match presence.refresh().await {
                    Ok(_) => return,
                    Err(e) if attempt == 10 => {
                        tracing::warn!("re-asserting presence failed: {e}")
                    }
                    Err(_) => {}
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(std::time::Duration::from_secs(1));
            }
        });
    })
}
