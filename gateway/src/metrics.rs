//! Prometheus metrics of one node, every series labelled with `node`, served in text format on
//! the admin listener.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::protocol::ErrorCode;

/// Why a connection closed (label of `gateway_connections_closed_total`).
pub const CLOSE_REASONS: [&str; 14] = [
    "client_close",
    "token_expired",
    "login_timeout",
    "rate_limited",
    "protocol_error",
    "invalid_utf8",
    "heartbeat_timeout",
    "slow_consumer",
    "redelivery_limit",
    "shutdown",
    "connection_limit",
    "message_too_big",
    "error",
    "api_disconnect",
];

/// Why a connection or login was refused (label of `gateway_connections_refused_total`).
pub const REFUSAL_REASONS: [&str; 7] = [
    "handshakes",
    "per_ip",
    "per_user",
    "cooldown",
    "upgrade_rate",
    "upgrade_flood",
    "pending_logins",
];

/// Redis operations (label `op` of the Redis latency and error series).
pub const REDIS_OPS: [&str; 17] = [
    "touch",
    "trim_read",
    "subscribe",
    "unsubscribe",
    "append",
    "join",
    "leave",
    "refresh",
    "prune",
    "range",
    "save_acks",
    "load_ack",
    "rooms",
    "room_count",
    "members",
    "script_load",
    "publish",
];

pub struct Metrics {
    registry: Registry,
    pub connections_open: IntGauge,
    pub connections_accepted: IntCounter,
    pub connections_closed: IntCounterVec,
    pub rooms_local: IntGauge,
    pub messages_received: IntCounter,
    pub messages_published: IntCounter,
    pub messages_delivered: IntCounter,
    pub fanout_latency: Histogram,
    pub redis_command_duration: HistogramVec,
    pub redis_errors: IntCounterVec,
    pub pubsub_reconnects: IntCounter,
    pub presence_entries: IntGauge,
    pub redeliveries: IntCounter,
    pub acks: IntCounter,
    pub sync_replays: IntCounter,
    pub sync_messages: IntCounter,
    pub dedup_hits: IntCounter,
    pub slow_consumer_disconnects: IntCounter,
    pub outbound_dropped: IntCounter,
    pub errors: IntCounterVec,
    pub auth_failures: IntCounterVec,
    pub rate_limited: IntCounterVec,
    pub connections_refused: IntCounterVec,
    pub handshake_timeouts: IntCounter,
    pub gap_repairs: IntCounter,
    pub resyncs: IntCounter,
    pub broker_up: IntGauge,
    /// 1 while `/readyz` answers 200 (set when metrics are rendered).
    pub ready: IntGauge,
    /// Seconds since presence was last pruned successfully (set when metrics are rendered).
    pub presence_prune_lag: prometheus::Gauge,
    /// When presence was last pruned (ms since the epoch).
    pub presence_last_prune_ms: std::sync::atomic::AtomicU64,
}

impl Metrics {
    /// Registers every metric of a node. Long on purpose (over 120 lines): one flat list of
    /// registrations, one per series, is easier to read and to extend than any split of it.
    #[allow(clippy::too_many_lines)]
    pub fn new(node_id: &str) -> Metrics {
        let registry = Registry::new_custom(
            None,
            Some([("node".to_string(), node_id.to_string())].into()),
        )
        .expect("valid registry labels");
        macro_rules! register {
            ($metric:expr) => {{
                let metric = $metric.expect("valid metric definition");
                registry
                    .register(Box::new(metric.clone()))
                    .expect("metric registered once");
                metric
            }};
        }
        let latency_buckets = vec![
            0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
            2.5,
        ];
        let build_info = register!(IntGaugeVec::new(
            Opts::new(
                "gateway_build_info",
                "Build information (value is always 1)"
            ),
            &["version"]
        ));
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        let metrics = Metrics {
            connections_open: register!(IntGauge::new(
                "gateway_connections_open",
                "WebSocket connections open now"
            )),
            connections_accepted: register!(IntCounter::new(
                "gateway_connections_accepted_total",
                "WebSocket connections accepted"
            )),
            connections_closed: register!(IntCounterVec::new(
                Opts::new(
                    "gateway_connections_closed_total",
                    "WebSocket connections closed, by reason"
                ),
                &["reason"]
            )),
            rooms_local: register!(IntGauge::new(
                "gateway_rooms_local",
                "Rooms and inboxes with members on this node (subscribed channels)"
            )),
            messages_received: register!(IntCounter::new(
                "gateway_messages_received_total",
                "Chat and direct messages received from clients"
            )),
            messages_published: register!(IntCounter::new(
                "gateway_messages_published_total",
                "Messages stored and published by this node"
            )),
            messages_delivered: register!(IntCounter::new(
                "gateway_messages_delivered_total",
                "Frames from the broker written to client sockets"
            )),
            fanout_latency: register!(Histogram::with_opts(
                HistogramOpts::new(
                    "gateway_fanout_latency_seconds",
                    "From publish on the sending node to the write on a recipient's socket"
                )
                .buckets(latency_buckets.clone())
            )),
            redis_command_duration: register!(HistogramVec::new(
                HistogramOpts::new(
                    "gateway_redis_command_duration_seconds",
                    "Redis round trips, by operation"
                )
                .buckets(latency_buckets),
                &["op"]
            )),
            redis_errors: register!(IntCounterVec::new(
                Opts::new("gateway_redis_errors_total", "Failed Redis operations"),
                &["op"]
            )),
            pubsub_reconnects: register!(IntCounter::new(
                "gateway_pubsub_reconnects_total",
                "Pub/sub connections re-established after a loss"
            )),
            presence_entries: register!(IntGauge::new(
                "gateway_presence_entries",
                "Presence entries (connection in room) this node keeps alive"
            )),
            redeliveries: register!(IntCounter::new(
                "gateway_redeliveries_total",
                "Messages sent again because they were not acknowledged in time"
            )),
            acks: register!(IntCounter::new(
                "gateway_acks_total",
                "Acknowledgements received from clients"
            )),
            sync_replays: register!(IntCounter::new(
                "gateway_sync_replays_total",
                "Replay pages served (login resume and sync requests)"
            )),
            sync_messages: register!(IntCounter::new(
                "gateway_sync_messages_total",
                "Messages sent in replay pages"
            )),
            dedup_hits: register!(IntCounter::new(
                "gateway_dedup_hits_total",
                "Messages not stored again because their clientMsgId was already used"
            )),
            slow_consumer_disconnects: register!(IntCounter::new(
                "gateway_slow_consumer_disconnects_total",
                "Connections closed because their outbound queue overflowed"
            )),
            outbound_dropped: register!(IntCounter::new(
                "gateway_outbound_dropped_total",
                "Deliveries refused because too many frames already waited for a connection's reader (it is closed with 4008)"
            )),
            errors: register!(IntCounterVec::new(
                Opts::new(
                    "gateway_errors_total",
                    "Error frames sent to clients, by code"
                ),
                &["code"]
            )),
            auth_failures: register!(IntCounterVec::new(
                Opts::new(
                    "gateway_auth_failures_total",
                    "Refused tokens, origins and private requests, by reason category"
                ),
                &["reason"]
            )),
            rate_limited: register!(IntCounterVec::new(
                Opts::new(
                    "gateway_rate_limited_total",
                    "Client frames refused by a per-connection rate limit, by kind"
                ),
                &["kind"]
            )),
            connections_refused: register!(IntCounterVec::new(
                Opts::new(
                    "gateway_connections_refused_total",
                    "Connections or logins refused by a connection limit, by reason"
                ),
                &["reason"]
            )),
            gap_repairs: register!(IntCounter::new(
                "gateway_gap_repairs_total",
                "Messages read back from the streams after a broker reconnect and delivered"
            )),
            resyncs: register!(IntCounter::new(
                "gateway_resyncs_total",
                "Channels whose members were told to resync: the history no longer held a gap"
            )),
            handshake_timeouts: register!(IntCounter::new(
                "gateway_handshake_timeouts_total",
                "TCP connections dropped for not finishing their HTTP request or upgrade in time"
            )),
            broker_up: register!(IntGauge::new(
                "gateway_broker_up",
                "1 while the broker (Redis pub/sub) is connected"
            )),
            ready: register!(IntGauge::new(
                "gateway_ready",
                "1 while this node is ready (/readyz answers 200: broker up, not shutting down)"
            )),
            presence_prune_lag: register!(prometheus::Gauge::new(
                "gateway_presence_prune_lag_seconds",
                "Seconds since this node last pruned expired presence entries"
            )),
            presence_last_prune_ms: std::sync::atomic::AtomicU64::new(crate::broker::now_ms()),
            registry,
        };
        // Pre-create labelled series so dashboards see zeros, not gaps.
        for reason in CLOSE_REASONS {
            metrics.connections_closed.with_label_values(&[reason]);
        }
        for op in REDIS_OPS {
            metrics.redis_errors.with_label_values(&[op]);
        }
        for code in ErrorCode::ALL {
            metrics.errors.with_label_values(&[code.as_str()]);
        }
        for err in crate::auth::AuthError::ALL {
            metrics.auth_failures.with_label_values(&[err.reason()]);
        }
        for kind in crate::limits::Limited::ALL {
            metrics.rate_limited.with_label_values(&[kind.as_str()]);
        }
        for reason in REFUSAL_REASONS {
            metrics.connections_refused.with_label_values(&[reason]);
        }
        metrics
    }

    /// Records a successful presence prune.
    pub fn presence_pruned(&self, at_ms: u64) {
        self.presence_last_prune_ms
            .store(at_ms, std::sync::atomic::Ordering::Relaxed);
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let last = self
            .presence_last_prune_ms
            .load(std::sync::atomic::Ordering::Relaxed);
        let lag_ms = crate::broker::now_ms().saturating_sub(last);
        self.presence_prune_lag.set(lag_ms as f64 / 1000.0);
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding into a Vec does not fail");
        String::from_utf8(out).expect("prometheus text is UTF-8")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_family_with_the_node_label() {
        let metrics = Metrics::new("n1");
        metrics.fanout_latency.observe(0.001);
        metrics
            .redis_command_duration
            .with_label_values(&["append"])
            .observe(0.001);
        metrics.redis_errors.with_label_values(&["append"]).inc();
        let text = metrics.render();
        for name in [
            "gateway_connections_open{node=\"n1\"}",
            "gateway_connections_closed_total{reason=\"slow_consumer\",node=\"n1\"}",
            "gateway_fanout_latency_seconds_bucket",
            "gateway_build_info{version=",
            "gateway_errors_total{code=\"bad_json\",node=\"n1\"}",
            "gateway_broker_up",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
    }
}
