//! Configuration: every setting is a CLI flag and a `GATEWAY_*` environment variable, validated
//! at start-up (a bad value is reported and the process exits with code 64).

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;

/// Exit code for a configuration error (sysexits' EX_USAGE).
pub const EXIT_CONFIG: i32 = 64;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "gateway",
    version,
    about = "Horizontally scalable WebSocket chat gateway. Without --redis-url it runs as a single \
             node with an embedded in-process broker."
)]
pub struct Config {
    /// Public listener: WebSocket upgrades at / and /ws, the chat page, /api/rooms.
    #[arg(long, env = "GATEWAY_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Admin listener: /healthz, /readyz, /metrics (never served on the public listener).
    #[arg(long, env = "GATEWAY_ADMIN_LISTEN", default_value = "127.0.0.1:9091")]
    pub admin_listen: SocketAddr,

    /// Redis URL (redis://host:port/db). Unset: embedded single-node broker, nothing persisted
    /// beyond the process.
    #[arg(long, env = "GATEWAY_REDIS_URL")]
    pub redis_url: Option<String>,

    /// Redis Cluster seed nodes, comma-separated `redis://host:port` URLs (any of its nodes;
    /// the rest is discovered). Exclusive with GATEWAY_REDIS_URL.
    #[arg(long, env = "GATEWAY_REDIS_CLUSTER_URLS", value_delimiter = ',')]
    pub redis_cluster_urls: Vec<String>,

    /// Replicas that must have a message before it is confirmed (Redis `WAIT` after the
    /// append, on the master that stored it). 0: confirmed once the master has it — a failover
    /// right after can lose it (replication is asynchronous). When fewer replicas confirm in
    /// time, the sender gets `outcome_unknown` and retries with the same clientMsgId.
    #[arg(long, env = "GATEWAY_REDIS_WAIT_REPLICAS", default_value_t = 0,
          value_parser = clap::value_parser!(u32).range(0..=16))]
    pub redis_wait_replicas: u32,

    /// How long a confirmation waits for GATEWAY_REDIS_WAIT_REPLICAS replicas.
    #[arg(long, env = "GATEWAY_REDIS_WAIT_TIMEOUT_MS", default_value_t = 500,
          value_parser = clap::value_parser!(u64).range(1..=60_000))]
    pub redis_wait_timeout_ms: u64,

    /// This node's id in logs, metrics and presence. Default: host name plus a random suffix.
    #[arg(long, env = "GATEWAY_NODE_ID")]
    pub node_id: Option<String>,

    /// A connection that sends nothing for this long is closed (code 4000) and leaves its rooms.
    #[arg(long, env = "GATEWAY_HEARTBEAT_TIMEOUT_MS", default_value_t = 60_000,
          value_parser = clap::value_parser!(u64).range(100..=3_600_000))]
    pub heartbeat_timeout_ms: u64,

    /// Presence entries of a node that stops refreshing them expire after this long.
    #[arg(long, env = "GATEWAY_PRESENCE_TTL_MS", default_value_t = 30_000,
          value_parser = clap::value_parser!(u64).range(300..=3_600_000))]
    pub presence_ttl_ms: u64,

    /// Messages kept per room and per inbox (trimmed exactly, in batches of a tenth).
    #[arg(long, env = "GATEWAY_HISTORY_MAX_LEN", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    pub history_max_len: u64,

    /// How long a clientMsgId is remembered for de-duplicating retries.
    #[arg(long, env = "GATEWAY_DEDUP_TTL_MS", default_value_t = 600_000,
          value_parser = clap::value_parser!(u64).range(1..=86_400_000))]
    pub dedup_ttl_ms: u64,

    /// An unacknowledged message (ack mode) is sent again after this long.
    #[arg(long, env = "GATEWAY_ACK_TIMEOUT_MS", default_value_t = 5_000,
          value_parser = clap::value_parser!(u64).range(10..=3_600_000))]
    pub ack_timeout_ms: u64,

    /// Redeliveries of one message before the connection is closed with code 4009.
    #[arg(long, env = "GATEWAY_MAX_REDELIVERIES", default_value_t = 5,
          value_parser = clap::value_parser!(u32).range(0..=1000))]
    pub max_redeliveries: u32,

    /// Most messages replayed by one login or sync request.
    #[arg(long, env = "GATEWAY_SYNC_MAX", default_value_t = 1000,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub sync_max: u32,

    /// Login/logout broadcasts are sent only in rooms with at most this many users (in bigger
    /// rooms every join would be sent to every member; `num` still rides on every message).
    #[arg(long, env = "GATEWAY_ANNOUNCE_MAX_ROOM_SIZE", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(0..=10_000_000))]
    pub announce_max_room_size: u64,

    /// Largest incoming WebSocket message in bytes (a larger one closes with 1009).
    #[arg(long, env = "GATEWAY_MAX_MESSAGE_BYTES", default_value_t = 65_536,
          value_parser = clap::value_parser!(u32).range(256..=16_777_216))]
    pub max_message_bytes: u32,

    /// Most concurrent WebSocket connections on this node (more are closed with 1013).
    #[arg(long, env = "GATEWAY_MAX_CONNECTIONS", default_value_t = 20_000,
          value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub max_connections: u32,

    /// Frames waiting for one connection's socket (not yet taken by the kernel, or held while
    /// the connection answers a frame) before it is disconnected as a slow consumer (4008).
    #[arg(long, env = "GATEWAY_OUTBOUND_QUEUE", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(8..=1_000_000))]
    pub outbound_queue: u32,

    /// Rooms one connection may be logged into at once.
    #[arg(long, env = "GATEWAY_MAX_ROOMS_PER_CONNECTION", default_value_t = 32,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub max_rooms_per_connection: u32,

    /// How long shutdown waits for connections to close and leaves to be announced.
    #[arg(long, env = "GATEWAY_SHUTDOWN_GRACE_MS", default_value_t = 5_000,
          value_parser = clap::value_parser!(u64).range(0..=600_000))]
    pub shutdown_grace_ms: u64,

    /// Rooms always listed by GET /api/rooms, as `id:name` pairs separated by commas
    /// (an id made of digits is a number, anything else a string).
    #[arg(
        long,
        env = "GATEWAY_DEFAULT_ROOMS",
        default_value = "1:大厅 Lobby,2:技术 Tech,3:闲聊 Random"
    )]
    pub default_rooms: String,

    /// Log format: `text` (human-readable) or `json`.
    #[arg(long, env = "GATEWAY_LOG_FORMAT", default_value = "text",
          value_parser = ["text", "json"])]
    pub log_format: String,

    /// HS256 secret for JWT logins (at least 32 bytes). With no JWT key configured the
    /// gateway runs anonymous: identities are self-asserted and DMs/inboxes are refused.
    #[arg(long, env = "GATEWAY_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,

    /// PEM public key for JWT logins: RSA (RS256) or EC P-256 (ES256).
    #[arg(long, env = "GATEWAY_JWT_PUBLIC_KEY_FILE")]
    pub jwt_public_key_file: Option<std::path::PathBuf>,

    /// Required `iss` of tokens (unset: not checked).
    #[arg(long, env = "GATEWAY_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,

    /// Required `aud` of tokens (unset: not checked).
    #[arg(long, env = "GATEWAY_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,

    /// Clock skew allowed when checking `exp` and `nbf`, in seconds; a connection is closed
    /// (4001) this long after its token's `exp` unless a `refresh` frame renewed it.
    #[arg(long, env = "GATEWAY_JWT_LEEWAY_SECS", default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(0..=3600))]
    pub jwt_leeway_secs: u64,

    /// Origins allowed to open WebSockets from a browser, comma-separated
    /// (`https://chat.example.com`), or `*`. Unset: only the request's own host. Clients that
    /// send no Origin (not browsers) are always allowed.
    #[arg(long, env = "GATEWAY_ALLOWED_ORIGINS")]
    pub allowed_origins: Option<String>,

    /// Frames one connection may send per second (every frame counts: chat, DM, sync, acks,
    /// login/logout, heartBeat and WebSocket pings). Beyond it frames are refused with
    /// `rate_limited`; a client that keeps going past a whole burst is closed (4029).
    #[arg(long, env = "GATEWAY_MAX_FRAMES_PER_SEC", default_value_t = 2000,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_frames_per_sec: u32,

    /// Frames a connection may send at once above the rate. Chat messages are pipelined into
    /// the broker, so a burst reaches Redis at once: 1000 kept an unrelated user's latency
    /// within 2x beside a flooding client where 4000 did not (docs/bench-floods.md).
    #[arg(long, env = "GATEWAY_FRAME_BURST", default_value_t = 1000,
          value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub frame_burst: u32,

    /// `sync` requests per second per connection (burst: 4 times as many).
    #[arg(long, env = "GATEWAY_MAX_SYNCS_PER_SEC", default_value_t = 5,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_syncs_per_sec: u32,

    /// `login`/`logout`/`refresh` frames per second per connection (burst: 4 times as many).
    #[arg(long, env = "GATEWAY_MAX_JOINS_PER_SEC", default_value_t = 10,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_joins_per_sec: u32,

    /// Direct messages per second per connection (burst: 4 times as many).
    #[arg(long, env = "GATEWAY_MAX_DMS_PER_SEC", default_value_t = 20,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_dms_per_sec: u32,

    /// A connection that has not logged in this long after the upgrade is closed (4002).
    #[arg(long, env = "GATEWAY_LOGIN_TIMEOUT_MS", default_value_t = 30_000,
          value_parser = clap::value_parser!(u64).range(100..=3_600_000))]
    pub login_timeout_ms: u64,

    /// A TCP connection must complete its HTTP request (and WebSocket upgrade) within this
    /// long; silent and half-sent connections are dropped. Until then it holds a slot of
    /// GATEWAY_MAX_CONNECTIONS.
    #[arg(long, env = "GATEWAY_HANDSHAKE_TIMEOUT_MS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(100..=600_000))]
    pub handshake_timeout_ms: u64,

    /// TCP connections that have not finished their HTTP request or upgrade yet; more are
    /// closed at once (counted in gateway_connections_refused_total{reason="handshakes"}).
    #[arg(long, env = "GATEWAY_MAX_PENDING_HANDSHAKES", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_pending_handshakes: u32,

    /// WebSocket connections one client address may hold on this node (HTTP 429 beyond).
    #[arg(long, env = "GATEWAY_MAX_CONNECTIONS_PER_IP", default_value_t = 10_000,
          value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub max_connections_per_ip: u32,

    /// WebSockets of one client address that have not logged in yet (HTTP 429 beyond): a
    /// connection that never logs in is worth nothing to anyone but holds a slot and memory.
    #[arg(long, env = "GATEWAY_MAX_PENDING_LOGINS_PER_IP", default_value_t = 1_000,
          value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub max_pending_logins_per_ip: u32,

    /// WebSocket upgrades one client address may make on this node per second, on average
    /// (bursts of twice as many pass); HTTP 429 with Retry-After beyond. Each upgrade costs the
    /// node CPU whether or not the connection stays.
    #[arg(long, env = "GATEWAY_MAX_UPGRADES_PER_IP_PER_SEC", default_value_t = 2_000,
          value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub max_upgrades_per_ip_per_sec: u32,

    /// Proxies (addresses or networks, comma-separated) whose `X-Forwarded-For` names the
    /// client's address. Unset: the peer's address is the client's.
    #[arg(long, env = "GATEWAY_TRUSTED_PROXIES")]
    pub trusted_proxies: Option<String>,

    /// Connections of one client address closed for abuse (4029 rate limit, 4008 slow consumer)
    /// before it must pause: then its new WebSockets get HTTP 429 until a strike grows back.
    #[arg(long, env = "GATEWAY_ABUSE_STRIKES", default_value_t = 3,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub abuse_strikes: u32,

    /// How long one strike takes to grow back.
    #[arg(long, env = "GATEWAY_ABUSE_COOLDOWN_MS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    pub abuse_cooldown_ms: u64,

    /// Connections one user may have logged in on this node (`too_many_connections` beyond).
    #[arg(long, env = "GATEWAY_MAX_CONNECTIONS_PER_USER", default_value_t = 100,
          value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub max_connections_per_user: u32,

    /// Bytes of history a replay reads from the broker at a time; the next part is read only
    /// once the client took the previous one (with GATEWAY_MAX_MESSAGE_BYTES, at least one
    /// message).
    #[arg(long, env = "GATEWAY_REPLAY_BUFFER_BYTES", default_value_t = 64 << 10,
          value_parser = clap::value_parser!(u32).range(1024..=1 << 30))]
    pub replay_buffer_bytes: u32,

    /// Bytes of history one connection may be replayed per second (login resumes and `sync`);
    /// a bigger replay is slowed down to it, never refused. Burst: twice as many.
    #[arg(long, env = "GATEWAY_MAX_REPLAY_BYTES_PER_SEC", default_value_t = 1 << 20,
          value_parser = clap::value_parser!(u32).range(1024..=1 << 30))]
    pub max_replay_bytes_per_sec: u32,

    /// Login/logout broadcasts per room and second, whatever their users and connections; more
    /// are not broadcast (as in big rooms: `num` still rides on every message).
    #[arg(long, env = "GATEWAY_MAX_ANNOUNCES_PER_ROOM_PER_SEC", default_value_t = 50,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_announces_per_room_per_sec: u32,

    /// Direct messages kept in one user's inbox. A full inbox refuses new DMs (`inbox_full`)
    /// rather than evicting older ones: spam cannot push out what a real sender was confirmed.
    #[arg(long, env = "GATEWAY_INBOX_MAX_LEN", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub inbox_max_len: u64,

    /// Rooms and inboxes nobody wrote to for this long expire (history, positions, markers).
    #[arg(long, env = "GATEWAY_HISTORY_TTL_MS", default_value_t = 7 * 24 * 3_600_000,
          value_parser = clap::value_parser!(u64).range(1_000..=3_650 * 24 * 3_600_000))]
    pub history_ttl_ms: u64,

    /// Rooms (and inboxes) this node may be subscribed to at once (`too_many_rooms` beyond).
    #[arg(long, env = "GATEWAY_MAX_ROOMS_PER_NODE", default_value_t = 100_000,
          value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub max_rooms_per_node: u32,

    /// Enables the server API (/v1/ on the admin listener) for requests carrying
    /// `Authorization: Bearer <key>`; at least 16 characters. Unset or empty: /v1/ answers 404.
    #[arg(long, env = "GATEWAY_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,

    /// userId shown on messages the server API publishes without a userId of their own.
    #[arg(long, env = "GATEWAY_API_USER_ID", default_value = "system")]
    pub api_user_id: String,

    /// userName shown on messages the server API publishes without a userName of their own.
    #[arg(long, env = "GATEWAY_API_USER_NAME", default_value = "System")]
    pub api_user_name: String,
}

/// A room listed even when empty.
#[derive(Debug, Clone, PartialEq)]
pub struct DefaultRoom {
    pub room_id: serde_json::Value,
    pub room_name: String,
}

impl Config {
    /// Parses and validates the command line and environment. On error, prints the message and
    /// exits with code 64 (help and version exit 0).
    pub fn from_args() -> Config {
        let config = match Config::try_parse() {
            Ok(config) => config,
            Err(err) => {
                use clap::error::ErrorKind;
                let code = match err.kind() {
                    ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => 0,
                    _ => EXIT_CONFIG,
                };
                let _ = err.print();
                std::process::exit(code);
            }
        };
        if let Err(message) = config.validate() {
            eprintln!("error: {message}");
            std::process::exit(EXIT_CONFIG);
        }
        config
    }

    /// Parses settings given as `(GATEWAY_NAME, value)` pairs, as if they were the environment
    /// (the process's own environment is not read for the named ones; others keep their
    /// defaults), and validates them. For nodes started in-process.
    pub fn from_settings(settings: &[(String, String)]) -> Result<Config, String> {
        use clap::CommandFactory;
        let command = Config::command();
        let mut argv = vec!["gateway".to_string()];
        for (name, value) in settings {
            let flag = command
                .get_arguments()
                .find(|arg| arg.get_env().is_some_and(|env| env == name.as_str()))
                .and_then(|arg| arg.get_long())
                .ok_or_else(|| format!("{name} is not a gateway setting"))?;
            argv.push(format!("--{flag}={value}"));
        }
        let config = Config::try_parse_from(argv).map_err(|e| e.to_string())?;
        config.validate()?;
        Ok(config)
    }

    /// Cross-field checks that clap cannot express.
    pub fn validate(&self) -> Result<(), String> {
        if self.redis_url.is_some() && !self.redis_cluster_urls.is_empty() {
            return Err(
                "set GATEWAY_REDIS_URL (one Redis) or GATEWAY_REDIS_CLUSTER_URLS (a Redis \
                 Cluster), not both"
                    .into(),
            );
        }
        for url in &self.redis_cluster_urls {
            let valid = url.starts_with("redis://") || url.starts_with("rediss://");
            if !valid || redis::Client::open(url.as_str()).is_err() {
                return Err(format!(
                    "GATEWAY_REDIS_CLUSTER_URLS holds {url:?}, not a redis://host:port URL"
                ));
            }
        }
        if let Some(url) = &self.redis_url {
            if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
                return Err(format!(
                    "GATEWAY_REDIS_URL must start with redis:// or rediss://, got {url:?}"
                ));
            }
            redis::Client::open(url.as_str())
                .map_err(|e| format!("GATEWAY_REDIS_URL {url:?} is not valid: {e}"))?;
        }
        if self.listen == self.admin_listen {
            return Err("GATEWAY_LISTEN and GATEWAY_ADMIN_LISTEN must differ".into());
        }
        if let Some(id) = &self.node_id {
            if id.is_empty() || id.len() > 64 || id.contains(['\n', '|', ' ']) {
                return Err(format!(
                    "GATEWAY_NODE_ID must be 1-64 characters without spaces, '|' or newlines, got {id:?}"
                ));
            }
        }
        self.parse_default_rooms()?;
        crate::auth::Authenticator::from_config(self)?;
        crate::auth::OriginPolicy::parse(self.allowed_origins.as_deref())?;
        crate::limits::TrustedProxies::parse(self.trusted_proxies.as_deref())?;
        self.validate_api()?;
        Ok(())
    }

    fn validate_api(&self) -> Result<(), String> {
        if let Some(key) = self.api_key() {
            if key.len() < 16 || key.len() > 4096 || !key.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(
                    "GATEWAY_API_KEY must be 16 to 4096 printable ASCII characters \
                            without spaces"
                        .into(),
                );
            }
        }
        for (name, value) in [
            ("GATEWAY_API_USER_ID", &self.api_user_id),
            ("GATEWAY_API_USER_NAME", &self.api_user_name),
        ] {
            if value.is_empty() || value.len() > crate::protocol::MAX_NAME_BYTES {
                return Err(format!("{name} must be 1 to 128 bytes, got {value:?}"));
            }
        }
        Ok(())
    }

    pub fn parse_default_rooms(&self) -> Result<Vec<DefaultRoom>, String> {
        let mut rooms = Vec::new();
        for item in self
            .default_rooms
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
        {
            let (id, name) = item.split_once(':').ok_or_else(|| {
                format!("GATEWAY_DEFAULT_ROOMS entry {item:?} is not of the form id:name")
            })?;
            let id = id.trim();
            if id.is_empty() || id.len() > 128 {
                return Err(format!("GATEWAY_DEFAULT_ROOMS entry {item:?} has a bad id"));
            }
            let room_id = match id.parse::<i64>() {
                Ok(n) if n.to_string() == id => serde_json::Value::from(n),
                _ => serde_json::Value::from(id),
            };
            rooms.push(DefaultRoom {
                room_id,
                room_name: name.trim().to_string(),
            });
        }
        Ok(rooms)
    }

    pub fn node_id(&self) -> String {
        self.node_id.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_else(|_| "gateway".into());
            let suffix: u32 = rand::random::<u32>() % 0x10000;
            format!("{host}-{suffix:04x}")
        })
    }

    /// The server API key; `None` (API disabled) when unset or empty.
    pub fn api_key(&self) -> Option<&str> {
        self.api_key.as_deref().filter(|k| !k.is_empty())
    }

    pub fn heartbeat_timeout(&self) -> Duration {
        Duration::from_millis(self.heartbeat_timeout_ms)
    }

    pub fn presence_ttl(&self) -> Duration {
        Duration::from_millis(self.presence_ttl_ms)
    }

    pub fn ack_timeout(&self) -> Duration {
        Duration::from_millis(self.ack_timeout_ms)
    }

    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_millis(self.shutdown_grace_ms)
    }

    pub fn login_timeout(&self) -> Duration {
        Duration::from_millis(self.login_timeout_ms)
    }

    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.handshake_timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, String> {
        let mut argv = vec!["gateway"];
        argv.extend_from_slice(args);
        let config = Config::try_parse_from(argv).map_err(|e| e.to_string())?;
        config.validate()?;
        Ok(config)
    }

    #[test]
    fn defaults_are_valid() {
        let config = parse(&[]).unwrap();
        assert_eq!(config.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(config.admin_listen.to_string(), "127.0.0.1:9091");
        assert_eq!(config.heartbeat_timeout_ms, 60_000);
        assert!(config.redis_url.is_none());
        assert_eq!(config.parse_default_rooms().unwrap().len(), 3);
    }

    #[test]
    fn bad_values_are_rejected_with_a_reason() {
        assert!(parse(&["--listen", "nope"]).is_err());
        assert!(parse(&["--redis-url", "http://x"])
            .unwrap_err()
            .contains("redis://"));
        assert!(parse(&["--heartbeat-timeout-ms", "5"]).is_err());
        assert!(parse(&["--listen", "127.0.0.1:1", "--admin-listen", "127.0.0.1:1"]).is_err());
        assert!(parse(&["--default-rooms", "nocolon"]).is_err());
        assert!(parse(&["--node-id", "a b"]).is_err());
        assert!(parse(&["--api-key", "short"])
            .unwrap_err()
            .contains("GATEWAY_API_KEY"));
        assert!(parse(&["--api-key", "sixteen chars ok"]).is_err());
        assert!(parse(&["--api-key", "0123456789abcdef"]).is_ok());
        assert_eq!(parse(&["--api-key", ""]).unwrap().api_key(), None);
        assert!(parse(&["--api-user-id", ""]).is_err());
        let both = [
            "--redis-url",
            "redis://a:1",
            "--redis-cluster-urls",
            "redis://b:1",
        ];
        assert!(parse(&both).unwrap_err().contains("not both"));
        assert!(parse(&["--redis-cluster-urls", "redis://b:1,http://c:1"])
            .unwrap_err()
            .contains("GATEWAY_REDIS_CLUSTER_URLS"));
        let cluster = parse(&["--redis-cluster-urls", "redis://b:1,redis://c:2"]).unwrap();
        assert_eq!(cluster.redis_cluster_urls, ["redis://b:1", "redis://c:2"]);
    }

    #[test]
    fn default_rooms_keep_number_and_string_ids() {
        let config = parse(&["--default-rooms", "7:Seven, ab:Letters"]).unwrap();
        let rooms = config.parse_default_rooms().unwrap();
        assert_eq!(rooms[0].room_id, serde_json::json!(7));
        assert_eq!(rooms[1].room_id, serde_json::json!("ab"));
        assert_eq!(rooms[1].room_name, "Letters");
    }
}
