//! Redis broker, on one Redis or a Redis Cluster: commands and Lua scripts over one multiplexed
//! (pipelining, auto-reconnecting) connection, or a cluster connection routing by slot; pub/sub
//! over a dedicated connection that a supervisor task keeps alive, re-subscribing every channel
//! this node needs after Redis comes back — or, on a cluster, sharded pub/sub through the
//! `ShardedSubscriber`.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, PubSubSink};
use redis::{RedisError, Script, Value};
use tokio_util::sync::CancellationToken;

use super::connection::{Commands, LazyCluster};
use super::keys::{
    decode_part, encode_part, parse_presence_record, position_field, presence_partition,
    presence_record, room_record_fragment, room_record_of, Keys, PRESENCE_PARTITIONS,
};
use super::sharded::{Resubscribed, ShardedSubscriber};
use super::{
    now_ms, Appended, BrokerError, Inbound, InboundSender, JoinOutcome, LeaveOutcome, Limits,
    MemberPage, Page, Position, Post, PresenceEntry, RoomSummary, Topic, WhenFull,
};
use crate::metrics::Metrics;
use crate::protocol::{json_string, Announcement, StreamId};

/// Presence script calls (one per room) in flight at once during a refresh or a prune.
const PRESENCE_CALLS_IN_FLIGHT: usize = 64;
/// Time buckets of the presence index one prune call works through at most.
const PRUNE_BUCKETS_PER_CALL: u64 = 500;
/// How long a subscribe waits for the pub/sub connection to come (back) up.
const SUBSCRIBE_WAIT: Duration = Duration::from_secs(2);
/// How often, and how patiently, Redis is PINGed for `/readyz`.
const PROBE_EVERY: Duration = Duration::from_millis(500);
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// Live rooms `rooms` looks at most (an admin listing of the most populated rooms).
const ROOMS_SCANNED: usize = 10_000;
/// Expired entries removed per prune call.
const PRUNE_BATCH: usize = 1000;

struct Scripts {
    append: Script,
    join: Script,
    leave: Script,
    prune_room: Script,
    refresh_room: Script,
}

impl Scripts {
    /// The scripts; `sharded`: they publish with `SPUBLISH` (Redis Cluster, where a classic
    /// `PUBLISH` goes to every node of the cluster and never reaches a sharded subscriber).
    fn load(sharded: bool) -> Scripts {
        let script = |text: &str| {
            if sharded {
                Script::new(&text.replace("redis.call('PUBLISH'", "redis.call('SPUBLISH'"))
            } else {
                Script::new(text)
            }
        };
        // The presence scripts share their helpers (announcements, pruning) in one prelude.
        let presence =
            |text: &str| script(&format!("{}\n{text}", include_str!("scripts/presence.lua")));
        Scripts {
            append: script(include_str!("scripts/append.lua")),
            join: presence(include_str!("scripts/join.lua")),
            leave: presence(include_str!("scripts/leave.lua")),
            prune_room: presence(include_str!("scripts/prune_room.lua")),
            refresh_room: presence(include_str!("scripts/refresh_room.lua")),
        }
    }
}

/// How this node receives what is published.
enum Receiving {
    /// Classic pub/sub on one connection to a single Redis, kept by `supervise_pubsub`.
    Classic(redis::Client),
    /// Sharded pub/sub on a Redis Cluster: one connection per master, owned by the
    /// `ShardedSubscriber` (redis-rs's own resubscription is not safe under failover).
    Sharded(Arc<ShardedSubscriber>),
}

/// The subscriptions this node wants, and the live pub/sub connection's sink if there is one.
#[derive(Default)]
struct Subscriptions {
    wanted: HashSet<String>,
    sink: Option<PubSubSink>,
}

pub struct RedisBroker {
    keys: Keys,
    receiving: Receiving,
    commands: Commands,
    /// History reads (replays, gap repair) on a connection of their own: their replies can
    /// be megabytes, and a multiplexed connection answers in order — a publish must not wait
    /// behind someone's replay.
    reads: Commands,
    /// History reads (`range`) in flight at once.
    reads_in_flight: tokio::sync::Semaphore,
    scripts: Scripts,
    subscriptions: Mutex<Subscriptions>,
    /// True while the pub/sub connection is up (commands reconnect by themselves); always on a
    /// cluster, whose shards come and go one by one.
    up: AtomicBool,
    /// Follows `up`, for subscribers waiting out a (re)connection.
    connected: tokio::sync::watch::Sender<bool>,
    /// True while Redis answers a PING within `PROBE_TIMEOUT` (a frozen Redis keeps its
    /// sockets open: only an answer tells it is alive).
    responsive: AtomicBool,
    limits: Limits,
    metrics: Arc<Metrics>,
    /// The newest presence index bucket this node has pruned (see `prune`).
    pruned_through: Mutex<Option<u64>>,
}

/// History reads one node has in flight at once (see `range`).
const READS_IN_FLIGHT: usize = 2;

fn unavailable(e: RedisError) -> BrokerError {
    BrokerError::Unavailable(e.to_string())
}

impl RedisBroker {
    /// Creates the broker (lazily connected) and starts the pub/sub supervisor, which delivers
    /// subscribed messages to `inbound` until `shutdown`. `on_reconnect` runs after every
    /// re-established pub/sub connection (to re-assert presence).
    pub fn start(
        url: &str,
        limits: Limits,
        metrics: Arc<Metrics>,
        inbound: InboundSender,
        shutdown: CancellationToken,
        on_reconnect: Arc<dyn Fn() + Send + Sync>,
    ) -> Result<Arc<RedisBroker>, BrokerError> {
        // Commands are small and pipelined: without TCP_NODELAY a command written while
        // another is in flight waits for its acknowledgement.
        let info = redis::IntoConnectionInfo::into_connection_info(url)
            .map_err(unavailable)?
            .set_tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true));
        let client = redis::Client::open(info).map_err(unavailable)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            // Generous: under a connect storm on a saturated machine Redis answers late, and a
            // timed-out login is worse than a slow one. A dead connection fails at once anyway.
            .set_response_timeout(Some(Duration::from_secs(5)))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500));
        let commands = ConnectionManager::new_lazy_with_config(client.clone(), config.clone())
            .map_err(unavailable)?;
        let reads =
            ConnectionManager::new_lazy_with_config(client.clone(), config).map_err(unavailable)?;
        let broker = Arc::new(RedisBroker::new(
            Receiving::Classic(client),
            Commands::Single(commands),
            Commands::Single(reads),
            limits,
            metrics,
        ));
        tokio::spawn(Arc::clone(&broker).probe(shutdown.clone()));
        tokio::spawn(Arc::clone(&broker).supervise_pubsub(inbound, shutdown, on_reconnect));
        Ok(broker)
    }

    fn new(
        receiving: Receiving,
        commands: Commands,
        reads: Commands,
        limits: Limits,
        metrics: Arc<Metrics>,
    ) -> RedisBroker {
        let sharded = matches!(receiving, Receiving::Sharded(_));
        RedisBroker {
            keys: Keys::default(),
            receiving,
            commands,
            reads,
            reads_in_flight: tokio::sync::Semaphore::new(READS_IN_FLIGHT),
            scripts: Scripts::load(sharded),
            subscriptions: Mutex::new(Subscriptions::default()),
            up: AtomicBool::new(sharded),
            connected: tokio::sync::watch::Sender::new(sharded),
            responsive: AtomicBool::new(true),
            limits,
            metrics,
            pruned_through: Mutex::new(None),
        }
    }

    /// The broker on a Redis Cluster reached through `seed_urls` (any of its nodes): commands
    /// routed to the master of their key's slot, sharded pub/sub, scripts that `SPUBLISH`.
    /// Connected lazily, like `start`; `on_reconnect` runs after every rebuilt shard.
    pub fn start_cluster(
        seed_urls: &[String],
        limits: Limits,
        metrics: Arc<Metrics>,
        inbound: InboundSender,
        shutdown: CancellationToken,
        on_reconnect: Arc<dyn Fn() + Send + Sync>,
    ) -> Result<Arc<RedisBroker>, BrokerError> {
        let connect = || {
            redis::cluster::ClusterClient::builder(seed_urls.to_vec())
                .tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true))
                .connection_timeout(Duration::from_secs(2))
                .response_timeout(Duration::from_secs(5))
                .retries(3)
                .build()
                .map(|client| Commands::Cluster(Arc::new(LazyCluster::new(client))))
                .map_err(unavailable)
        };
        let (commands, reads) = (connect()?, connect()?);
        let (messages_tx, messages) = tokio::sync::mpsc::unbounded_channel();
        let (events_tx, events) = tokio::sync::mpsc::unbounded_channel();
        let subscriber =
            ShardedSubscriber::start(seed_urls.to_vec(), messages_tx, events_tx, shutdown.clone());
        let broker = Arc::new(RedisBroker::new(
            Receiving::Sharded(subscriber),
            commands,
            reads,
            limits,
            metrics,
        ));
        broker.metrics.broker_up.set(1);
        tokio::spawn(Arc::clone(&broker).probe(shutdown.clone()));
        tokio::spawn(forward_sharded(
            Arc::clone(&broker),
            messages,
            events,
            inbound,
            shutdown,
            on_reconnect,
        ));
        Ok(broker)
    }

    pub fn name(&self) -> &'static str {
        match self.receiving {
            Receiving::Classic(_) => "redis",
            Receiving::Sharded(_) => "redis-cluster",
        }
    }

    /// Up: pub/sub connected and Redis answering in time.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed) && self.responsive.load(Ordering::Relaxed)
    }

    /// PINGs Redis every `PROBE_EVERY` until `shutdown`, recording whether it answers within
    /// `PROBE_TIMEOUT` (drives `/readyz`).
    async fn probe(self: Arc<Self>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(PROBE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let mut con = self.commands.clone();
            let cmd = redis::cmd("PING");
            let ping = cmd.query_async::<String>(&mut con);
            let answered = matches!(tokio::time::timeout(PROBE_TIMEOUT, ping).await, Ok(Ok(_)));
            if answered != self.responsive.swap(answered, Ordering::Relaxed) {
                if answered {
                    tracing::info!("redis answers again");
                } else {
                    tracing::warn!("redis does not answer within {PROBE_TIMEOUT:?}: not ready");
                }
            }
        }
    }

    /// Keeps one pub/sub connection alive: connect, subscribe to every wanted channel, forward
    /// messages (the client library drains the socket into an unbounded queue, so Redis never
    /// waits on a slow WebSocket), and start again with backoff when it drops.
    async fn supervise_pubsub(
        self: Arc<Self>,
        inbound: InboundSender,
        shutdown: CancellationToken,
        on_reconnect: Arc<dyn Fn() + Send + Sync>,
    ) {
        let Receiving::Classic(client) = &self.receiving else {
            return; // sharded: the ShardedSubscriber keeps its own connections
        };
        let mut backoff = Duration::from_millis(50);
        let mut connected_before = false;
        loop {
            let attempt = async {
                let pubsub = client.get_async_pubsub().await?;
                let (mut sink, stream) = pubsub.split();
                let wanted: Vec<String> = {
                    let mut subs = self.subscriptions.lock().expect("subscriptions lock");
                    subs.sink = Some(sink.clone());
                    subs.wanted.iter().cloned().collect()
                };
                for chunk in wanted.chunks(256) {
                    sink.subscribe(chunk).await?;
                }
                Ok::<_, RedisError>(stream)
            };
            let stream = tokio::select! {
                _ = shutdown.cancelled() => return,
                result = attempt => result,
            };
            match stream {
                Ok(mut stream) => {
                    // A new connection may mean a Redis that lost its script cache: load the
                    // scripts now, so appends in flight rarely meet a NOSCRIPT.
                    self.load_scripts().await;
                    self.up.store(true, Ordering::Relaxed);
                    self.connected.send_replace(true);
                    self.metrics.broker_up.set(1);
                    backoff = Duration::from_millis(50);
                    if connected_before {
                        self.metrics.pubsub_reconnects.inc();
                        tracing::info!("redis pub/sub reconnected; subscriptions restored");
                        // Before any message of the new connection: the hub repairs the gap
                        // first, so members get the missed messages in order.
                        if inbound.send(Inbound::Resubscribed).is_err() {
                            return;
                        }
                        on_reconnect();
                    }
                    connected_before = true;
                    loop {
                        let msg = tokio::select! {
                            _ = shutdown.cancelled() => return,
                            msg = stream.next() => msg,
                        };
                        let Some(msg) = msg else { break };
                        let Some(topic) = self.keys.topic_of_channel(msg.get_channel_name()) else {
                            tracing::warn!(
                                channel = msg.get_channel_name(),
                                "message on a channel this node never subscribed to"
                            );
                            continue;
                        };
                        let inbound_msg = Inbound::Message {
                            topic,
                            payload: Bytes::copy_from_slice(msg.get_payload_bytes()),
                        };
                        if inbound.send(inbound_msg).is_err() {
                            return;
                        }
                    }
                    if shutdown.is_cancelled() {
                        return;
                    }
                    tracing::warn!("redis pub/sub connection lost");
                }
                Err(e) => tracing::debug!("redis pub/sub connect failed: {e}"),
            }
            self.up.store(false, Ordering::Relaxed);
            self.metrics.broker_up.set(0);
            self.subscriptions.lock().expect("subscriptions lock").sink = None;
            self.connected.send_replace(false);
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    pub async fn subscribe(&self, topic: &Topic) -> Result<(), BrokerError> {
        let channel = self.keys.channel(topic);
        let channel = channel.as_str();
        if let Receiving::Sharded(subscriber) = &self.receiving {
            return self
                .timed_broker("subscribe", async {
                    subscriber
                        .subscribe(channel)
                        .await
                        .map_err(|e| BrokerError::Unavailable(e.to_string()))
                })
                .await;
        }
        let mut sink = {
            let mut subs = self.subscriptions.lock().expect("subscriptions lock");
            subs.wanted.insert(channel.to_string());
            subs.sink.clone()
        };
        if sink.is_none() {
            // Starting, or reconnecting: a login now waits a moment rather than failing.
            let mut connected = self.connected.subscribe();
            let up = tokio::time::timeout(SUBSCRIBE_WAIT, async {
                connected.wait_for(|up| *up).await.is_ok()
            })
            .await;
            if up == Ok(true) {
                sink = self
                    .subscriptions
                    .lock()
                    .expect("subscriptions lock")
                    .sink
                    .clone();
            }
        }
        let result = match sink {
            Some(mut sink) => self.timed("subscribe", sink.subscribe(channel)).await,
            None => Err(BrokerError::Unavailable(
                "redis pub/sub is reconnecting".into(),
            )),
        };
        if result.is_err() {
            // The caller gives the channel up: it must not be re-subscribed after a
            // reconnect (a failed login would leave a subscription nobody listens to).
            let sink = {
                let mut subs = self.subscriptions.lock().expect("subscriptions lock");
                subs.wanted.remove(channel);
                subs.sink.clone()
            };
            if let Some(mut sink) = sink {
                let _ = sink.unsubscribe(channel).await;
            }
        }
        result
    }

    pub async fn unsubscribe(&self, topic: &Topic) -> Result<(), BrokerError> {
        let channel = self.keys.channel(topic);
        let channel = channel.as_str();
        if let Receiving::Sharded(subscriber) = &self.receiving {
            subscriber.unsubscribe(channel).await;
            return Ok(());
        }
        let sink = {
            let mut subs = self.subscriptions.lock().expect("subscriptions lock");
            subs.wanted.remove(channel);
            subs.sink.clone()
        };
        match sink {
            Some(mut sink) => self.timed("unsubscribe", sink.unsubscribe(channel)).await,
            // Not connected: the channel is no longer wanted, so it won't be re-subscribed.
            None => Ok(()),
        }
    }

    /// Runs a broker future, recording its latency and errors under `op`.
    async fn timed_broker<T>(
        &self,
        op: &'static str,
        fut: impl std::future::Future<Output = Result<T, BrokerError>>,
    ) -> Result<T, BrokerError> {
        let started = Instant::now();
        let result = fut.await;
        self.metrics
            .redis_command_duration
            .with_label_values(&[op])
            .observe(started.elapsed().as_secs_f64());
        if result.is_err() {
            self.metrics.redis_errors.with_label_values(&[op]).inc();
        }
        result
    }

    /// Runs a Redis future, recording its latency and errors under `op`.
    async fn timed<T>(
        &self,
        op: &'static str,
        fut: impl std::future::Future<Output = Result<T, RedisError>>,
    ) -> Result<T, BrokerError> {
        self.timed_broker(op, async { fut.await.map_err(unavailable) })
            .await
    }

    /// The append script's call for `post`: EVALSHA by hand rather than `invoke_async`, which
    /// answers a NOSCRIPT (Redis restarted empty, or its script cache flushed) by loading the
    /// script and calling again — by then a later append of the same connection may have run
    /// before this one.
    fn append_call(&self, post: &Post) -> redis::Cmd {
        let stream = self.keys.stream(&post.topic);
        let marker = trim_marker(&stream);
        // Unused optional keys are the stream's own name: one hash slot for the whole call.
        let mut used = String::new();
        let mut optional = |key: Option<String>, flag: char| match key {
            Some(key) => {
                used.push(flag);
                key
            }
            None => stream.clone(),
        };
        let dedup = optional(
            post.dedup_id
                .as_deref()
                .map(|id| self.keys.dedup(&post.topic, &post.sender, id)),
            'd',
        );
        let (count_key, seen_key) = match &post.topic {
            Topic::Room(room) => (Some(self.keys.room_users(room)), None),
            Topic::User(user) => (
                None,
                post.recipient_must_exist.then(|| self.keys.user_seen(user)),
            ),
        };
        let count_key = optional(count_key, 'c');
        let seen_key = optional(seen_key, 'r');
        let mut call = redis::cmd("EVALSHA");
        call.arg(self.scripts.append.get_hash())
            .arg(5)
            .arg(&stream)
            .arg(dedup)
            .arg(count_key)
            .arg(marker)
            .arg(seen_key)
            .arg(post.max_len)
            .arg(self.limits.dedup_ttl_ms)
            .arg(self.keys.channel(&post.topic))
            .arg(&post.header_before)
            .arg(&post.header_after)
            .arg(post.topic.frame_head())
            .arg(&post.body)
            .arg(&post.tail)
            .arg(match post.when_full {
                WhenFull::Refuse => "refuse",
                WhenFull::Trim => "trim",
            })
            .arg(self.limits.history_ttl_ms)
            .arg(used);
        call
    }

    /// The broker error for a failed append call, counted.
    fn append_error(&self, e: RedisError) -> BrokerError {
        self.metrics
            .redis_errors
            .with_label_values(&["append"])
            .inc();
        // A write that timed out or lost its connection after being sent may have been
        // stored: say so, so the client retries with the same clientMsgId instead of
        // believing it was not sent.
        if e.is_timeout() || e.is_connection_dropped() {
            BrokerError::OutcomeUnknown(e.to_string())
        } else {
            unavailable(e)
        }
    }

    fn observe_append(&self, started: Instant) {
        self.metrics
            .redis_command_duration
            .with_label_values(&["append"])
            .observe(started.elapsed().as_secs_f64());
    }

    /// One append; on a NOSCRIPT the script is loaded and the call made again (nothing of
    /// the caller's is in flight behind it).
    pub async fn append(&self, post: &Post) -> Result<Appended, BrokerError> {
        let call = self.append_call(post);
        let mut con = self.commands.clone();
        let started = Instant::now();
        let result: Result<(String, i64), RedisError> = match call.query_async(&mut con).await {
            Err(e) if is_noscript(&e) => match self.load_append_script().await {
                Ok(()) => call.query_async(&mut con).await,
                Err(_) => Err(e),
            },
            other => other,
        };
        self.observe_append(started);
        let appended = appended(result.map_err(|e| self.append_error(e))?)?;
        self.confirm_replicated(&self.keys.stream(&post.topic))
            .await?;
        Ok(appended)
    }

    /// With `wait_replicas`: waits until that many replicas have the writes this node sent to
    /// `slot_key`'s master (`WAIT` on the connection that carried them). Fewer in time: the
    /// message is stored on the master but could vanish in a failover — `OutcomeUnknown`, so
    /// the sender retries with the same clientMsgId and gets the same id.
    async fn confirm_replicated(&self, slot_key: &str) -> Result<(), BrokerError> {
        let wanted = self.limits.wait_replicas;
        if wanted == 0 {
            return Ok(());
        }
        let mut wait = redis::cmd("WAIT");
        wait.arg(wanted).arg(self.limits.wait_timeout_ms);
        let mut con = self.commands.clone();
        let reply = match self.timed("wait", con.on_master_of(slot_key, wait)).await {
            Ok(reply) => reply,
            Err(e) => return Err(BrokerError::OutcomeUnknown(e.to_string())),
        };
        let confirmed: u64 = redis::from_redis_value(reply)
            .map_err(|e| BrokerError::Protocol(format!("WAIT answered {e}")))?;
        if confirmed < u64::from(wanted) {
            self.metrics.redis_errors.with_label_values(&["wait"]).inc();
            return Err(BrokerError::OutcomeUnknown(format!(
                "stored, but {confirmed} of {wanted} replicas confirmed it within {} ms",
                self.limits.wait_timeout_ms
            )));
        }
        Ok(())
    }

    /// A connection's chat messages, stored in the order given: one pipeline per topic (one
    /// hash slot), all in flight together — one round trip. Each is stored or refused on its
    /// own. One that meets a NOSCRIPT is refused (`Unavailable`, certainly not stored) rather
    /// than retried behind the later ones; the script is loaded again for the next call.
    pub async fn append_all(&self, posts: &[Post]) -> Vec<Result<Appended, BrokerError>> {
        let mut by_topic: Vec<(&Topic, Vec<usize>)> = Vec::new();
        for (i, post) in posts.iter().enumerate() {
            match by_topic.iter_mut().find(|(topic, _)| **topic == post.topic) {
                Some((_, indices)) => indices.push(i),
                None => by_topic.push((&post.topic, vec![i])),
            }
        }
        let started = Instant::now();
        let batches: Vec<_> = by_topic
            .iter()
            .map(|(_, indices)| {
                let group: Vec<&Post> = indices.iter().map(|&i| &posts[i]).collect();
                self.append_one_slot(group)
            })
            .collect();
        let answered = futures_util::future::join_all(batches).await;
        self.observe_append(started);
        let mut results: Vec<Option<Result<Appended, BrokerError>>> = vec![None; posts.len()];
        let mut noscript = false;
        let mut stored_in = Vec::new();
        for ((topic, indices), replies) in by_topic.iter().zip(answered) {
            for (&i, reply) in indices.iter().zip(replies) {
                noscript |= reply.as_ref().is_err_and(is_noscript);
                let result = reply.map_err(|e| self.append_error(e)).and_then(appended);
                if result.is_ok() && !stored_in.contains(topic) {
                    stored_in.push(*topic);
                }
                results[i] = Some(result);
            }
        }
        // Replicas asked for: one WAIT per topic written, all in flight together.
        if self.limits.wait_replicas > 0 {
            let waits: Vec<_> = stored_in
                .iter()
                .map(|topic| async move {
                    (
                        *topic,
                        self.confirm_replicated(&self.keys.stream(topic)).await,
                    )
                })
                .collect();
            for (topic, waited) in futures_util::future::join_all(waits).await {
                let Err(e) = waited else { continue };
                for (i, post) in posts.iter().enumerate() {
                    if &post.topic == topic && results[i].as_ref().is_some_and(Result::is_ok) {
                        results[i] = Some(Err(e.clone()));
                    }
                }
            }
        }
        if noscript {
            let _ = self.load_append_script().await;
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(BrokerError::Protocol("no reply".into()))))
            .collect()
    }

    /// One pipeline of appends to one topic; one reply per post.
    async fn append_one_slot(&self, posts: Vec<&Post>) -> Vec<Result<AppendReply, RedisError>> {
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for post in &posts {
            pipe.add_command(self.append_call(post));
        }
        let mut con = self.commands.clone();
        let replies: Result<Vec<Result<AppendReply, RedisError>>, RedisError> =
            pipe.query_async(&mut con).await;
        match replies {
            Ok(replies) if replies.len() == posts.len() => replies,
            Ok(replies) => {
                let e = RedisError::from((
                    redis::ErrorKind::UnexpectedReturnType,
                    "replies do not match the appends",
                    format!("{} replies to {} appends", replies.len(), posts.len()),
                ));
                posts.iter().map(|_| Err(e.clone())).collect()
            }
            Err(e) => posts.iter().map(|_| Err(e.clone())).collect(),
        }
    }

    async fn load_append_script(&self) -> Result<(), RedisError> {
        let mut con = self.commands.clone();
        self.scripts
            .append
            .prepare_invoke()
            .load_async(&mut con)
            .await
            .map(drop)
    }

    /// Loads every script into Redis's script cache (errors are left to the calls: each one
    /// loads its script again when it meets a NOSCRIPT).
    async fn load_scripts(&self) -> bool {
        let mut con = self.commands.clone();
        let scripts = &self.scripts;
        for script in [
            &scripts.append,
            &scripts.join,
            &scripts.leave,
            &scripts.prune_room,
            &scripts.refresh_room,
        ] {
            // On a cluster, SCRIPT LOAD goes to every node.
            if let Err(e) = script.prepare_invoke().load_async(&mut con).await {
                tracing::debug!("loading a script failed: {e}");
                return false;
            }
        }
        true
    }

    /// A presence script call on a room's keys (every presence script takes the same five).
    fn presence_invocation<'a>(
        &self,
        script: &'a Script,
        room: &str,
    ) -> redis::ScriptInvocation<'a> {
        let mut invocation = script.prepare_invoke();
        for key in self.keys.room_presence(room) {
            invocation.key(key);
        }
        invocation
    }

    /// The width of a presence index time bucket: the prune interval (`Presence::retry_every`
    /// — every node derives it from the same TTL).
    fn bucket_ms(&self) -> u64 {
        (self.limits.presence_ttl_ms / 10).clamp(50, 1000)
    }

    /// Lists `rooms` in the presence index under the bucket of `expires_at_ms`: a prune after
    /// that bucket has passed looks at them. One command pair per index partition.
    async fn index_rooms<'a>(
        &self,
        rooms: impl IntoIterator<Item = &'a str>,
        expires_at_ms: u64,
    ) -> Result<(), BrokerError> {
        let bucket_ms = self.bucket_ms();
        let bucket = expires_at_ms / bucket_ms;
        let mut by_partition: HashMap<u32, Vec<String>> = HashMap::new();
        for room in rooms {
            by_partition
                .entry(presence_partition(room))
                .or_default()
                .push(encode_part(room).into_owned());
        }
        // Kept for three TTLs after the bucket ends: time for a paused pruner to catch up.
        let keep_ms =
            ((bucket + 1) * bucket_ms).saturating_sub(now_ms()) + 3 * self.limits.presence_ttl_ms;
        let writes = by_partition.into_iter().map(|(partition, rooms)| {
            let key = self.keys.presence_index(partition, bucket);
            let mut pipe = redis::pipe();
            pipe.sadd(&key, rooms).ignore();
            pipe.pexpire(&key, keep_ms as i64).ignore();
            let mut con = self.commands.clone();
            async move { pipe.query_async::<()>(&mut con).await }
        });
        self.timed("presence_index", async {
            for result in futures_util::future::join_all(writes).await {
                result?;
            }
            Ok(())
        })
        .await
    }

    pub async fn join(
        &self,
        entry: &PresenceEntry,
        announce_header: &str,
        expires_at_ms: u64,
        prune_expired: bool,
    ) -> Result<JoinOutcome, BrokerError> {
        let mut invocation = self.presence_invocation(&self.scripts.join, &entry.room_key);
        invocation
            .arg(&entry.conn_key)
            .arg(&entry.user_id)
            .arg(&entry.user_fragment)
            .arg(expires_at_ms)
            .arg(room_record_of(entry))
            .arg(self.keys.room_channel(&entry.room_key))
            .arg(announce_header)
            .arg(self.limits.announce_max)
            .arg(&entry.room_json)
            .arg(self.limits.announces_per_sec)
            .arg(Announcement::Login.template())
            // Nothing expired before 0: no pruning.
            .arg(if prune_expired { now_ms() } else { 0 })
            .arg(Announcement::Logout.template());
        let mut con = self.commands.clone();
        // Indexed first (both are sent at once): an entry is never stored where no prune
        // would look for it.
        let (indexed, joined) = tokio::join!(
            self.index_rooms([entry.room_key.as_str()], expires_at_ms),
            self.timed("join", invocation.invoke_async(&mut con))
        );
        let (first, num, announced, name_json): (i64, u64, i64, String) = joined?;
        indexed?;
        let room_name = serde_json::from_str(&name_json)
            .map_err(|_| BrokerError::Protocol(format!("bad room name record {name_json:?}")))?;
        Ok(JoinOutcome {
            first: first == 1,
            num,
            announced: announced == 1,
            room_name,
        })
    }

    pub async fn leave(
        &self,
        entry: &PresenceEntry,
        announce_header: &str,
    ) -> Result<LeaveOutcome, BrokerError> {
        let mut invocation = self.presence_invocation(&self.scripts.leave, &entry.room_key);
        invocation
            .arg(&entry.conn_key)
            .arg(&entry.room_json)
            .arg(json_string(&entry.room_name))
            .arg(self.keys.room_channel(&entry.room_key))
            .arg(announce_header)
            .arg(self.limits.announce_max)
            .arg(self.limits.announces_per_sec)
            .arg(Announcement::Logout.template());
        let mut con = self.commands.clone();
        let (last, num): (i64, u64) = self
            .timed("leave", invocation.invoke_async(&mut con))
            .await?;
        Ok(LeaveOutcome {
            last: last == 1,
            num,
        })
    }

    /// One script call per room (each on its room's slot, all in flight together), and the
    /// rooms listed in the index under the new expiry.
    pub async fn refresh(
        &self,
        entries: &[PresenceEntry],
        expires_at_ms: u64,
        announce_header: &str,
    ) -> Result<u64, BrokerError> {
        if entries.is_empty() {
            return Ok(0);
        }
        let mut by_room: HashMap<&str, Vec<&PresenceEntry>> = HashMap::new();
        for e in entries {
            by_room.entry(e.room_key.as_str()).or_default().push(e);
        }
        self.index_rooms(by_room.keys().copied(), expires_at_ms)
            .await?;
        let calls = by_room.into_iter().map(|(room, entries)| {
            let mut invocation = self.presence_invocation(&self.scripts.refresh_room, room);
            invocation
                .arg(expires_at_ms)
                .arg(self.keys.room_channel(room))
                .arg(announce_header)
                .arg(self.limits.announce_max)
                .arg(self.limits.announces_per_sec)
                .arg(Announcement::Login.template())
                .arg(room_record_of(entries[0]));
            for e in entries {
                invocation
                    .arg(&e.conn_key)
                    .arg(&e.user_id)
                    .arg(presence_record(&e.user_id, &e.user_fragment));
            }
            let mut con = self.commands.clone();
            async move { invocation.invoke_async::<u64>(&mut con).await }
        });
        let calls: Vec<_> = calls.collect();
        let results: Vec<Result<u64, RedisError>> = futures_util::stream::iter(calls)
            .buffer_unordered(PRESENCE_CALLS_IN_FLIGHT)
            .collect()
            .await;
        self.timed("refresh", async {
            let mut restored = 0;
            for result in results {
                restored += result?;
            }
            Ok(restored)
        })
        .await
    }

    /// Works through the presence index's time buckets that ended since the last call (from
    /// three TTLs back on this node's first call), pruning each listed room's expired entries.
    /// A bucket gets no new rooms once it has passed (entries expire in the future), so no
    /// room can slip in behind the pruner.
    pub async fn prune(&self, now_ms: u64, announce_header: &str) -> Result<u64, BrokerError> {
        let bucket_ms = self.bucket_ms();
        let newest_ended = (now_ms / bucket_ms).saturating_sub(1);
        let from = {
            let done = *self.pruned_through.lock().expect("prune lock");
            let lookback = 3 * self.limits.presence_ttl_ms / bucket_ms + 1;
            done.map_or(newest_ended.saturating_sub(lookback), |d| d + 1)
        };
        let mut removed = 0;
        for bucket in (from..=newest_ended).take(PRUNE_BUCKETS_PER_CALL as usize) {
            removed += self.prune_bucket(bucket, now_ms, announce_header).await?;
            *self.pruned_through.lock().expect("prune lock") = Some(bucket);
        }
        Ok(removed)
    }

    /// Prunes every room the index lists under `bucket`.
    async fn prune_bucket(
        &self,
        bucket: u64,
        now_ms: u64,
        announce_header: &str,
    ) -> Result<u64, BrokerError> {
        let reads = (0..PRESENCE_PARTITIONS).map(|partition| {
            let key = self.keys.presence_index(partition, bucket);
            let mut con = self.commands.clone();
            async move {
                redis::cmd("SMEMBERS")
                    .arg(key)
                    .query_async::<Vec<String>>(&mut con)
                    .await
            }
        });
        let mut rooms = HashSet::new();
        for listed in futures_util::future::join_all(reads).await {
            let listed = listed.map_err(unavailable)?;
            rooms.extend(listed.iter().filter_map(|r| decode_part(r)));
        }
        let calls = rooms
            .iter()
            .map(|room| self.prune_room(room, now_ms, announce_header));
        let calls: Vec<_> = calls.collect();
        let results: Vec<Result<u64, BrokerError>> = futures_util::stream::iter(calls)
            .buffer_unordered(PRESENCE_CALLS_IN_FLIGHT)
            .collect()
            .await;
        results.into_iter().sum()
    }

    /// Removes a room's expired entries, a batch per call, until none is left.
    async fn prune_room(
        &self,
        room: &str,
        now_ms: u64,
        announce_header: &str,
    ) -> Result<u64, BrokerError> {
        let mut removed = 0;
        loop {
            let mut invocation = self.presence_invocation(&self.scripts.prune_room, room);
            invocation
                .arg(now_ms)
                .arg(PRUNE_BATCH)
                .arg(self.keys.room_channel(room))
                .arg(announce_header)
                .arg(self.limits.announce_max)
                .arg(self.limits.announces_per_sec)
                .arg(Announcement::Logout.template());
            let mut con = self.commands.clone();
            let batch: u64 = self
                .timed("prune", invocation.invoke_async(&mut con))
                .await?;
            removed += batch;
            if batch < PRUNE_BATCH as u64 {
                return Ok(removed);
            }
        }
    }

    /// Every room with someone present: the index's buckets from now until a TTL ahead hold
    /// each live entry's room (refreshes move them forward).
    async fn live_rooms(&self) -> Result<Vec<String>, BrokerError> {
        let bucket_ms = self.bucket_ms();
        let now = now_ms();
        let first = now / bucket_ms;
        let last = (now + self.limits.presence_ttl_ms) / bucket_ms + 1;
        let reads = (first..=last).flat_map(|bucket| {
            (0..PRESENCE_PARTITIONS).map(move |partition| {
                let key = self.keys.presence_index(partition, bucket);
                let mut con = self.commands.clone();
                async move {
                    redis::cmd("SMEMBERS")
                        .arg(key)
                        .query_async::<Vec<String>>(&mut con)
                        .await
                }
            })
        });
        let reads: Vec<_> = reads.collect();
        let results: Vec<Result<Vec<String>, RedisError>> = futures_util::stream::iter(reads)
            .buffer_unordered(PRESENCE_CALLS_IN_FLIGHT)
            .collect()
            .await;
        let mut rooms = HashSet::new();
        for listed in results {
            let listed = listed.map_err(unavailable)?;
            rooms.extend(listed.iter().filter_map(|r| decode_part(r)));
            if rooms.len() >= ROOMS_SCANNED {
                break;
            }
        }
        Ok(rooms.into_iter().collect())
    }

    /// Counts every live room's users and keeps the `limit` most populated (the same listing
    /// as the embedded broker's).
    pub async fn rooms(&self, limit: usize) -> Result<Vec<RoomSummary>, BrokerError> {
        let rooms = self.live_rooms().await?;
        let reads = rooms.into_iter().map(|room| {
            let mut pipe = redis::pipe();
            pipe.hlen(self.keys.room_users(&room));
            pipe.get(self.keys.room_record(&room));
            let mut con = self.commands.clone();
            async move {
                let read: Result<RoomRead, RedisError> = pipe.query_async(&mut con).await;
                (room, read)
            }
        });
        let reads: Vec<_> = reads.collect();
        let results: Vec<(String, Result<RoomRead, RedisError>)> =
            futures_util::stream::iter(reads)
                .buffer_unordered(PRESENCE_CALLS_IN_FLIGHT)
                .collect()
                .await;
        let mut listed = Vec::new();
        for (room_key, read) in results {
            let (num, record) = read.map_err(unavailable)?;
            // A record that is not ours is skipped rather than failing the listing.
            let Some(room_fragment) = record.as_deref().and_then(room_record_fragment) else {
                continue;
            };
            if num > 0 {
                listed.push(RoomSummary {
                    room_key,
                    room_fragment,
                    num,
                });
            }
        }
        listed.sort_by(|a, b| b.num.cmp(&a.num).then(a.room_key.cmp(&b.room_key)));
        listed.truncate(limit);
        Ok(listed)
    }

    pub async fn range(
        &self,
        topic: &Topic,
        after: StreamId,
        limit: usize,
    ) -> Result<Page, BrokerError> {
        let stream_key = self.keys.stream(topic);
        let stream_key = stream_key.as_str();
        let frame_head = topic.frame_head();
        // A pipeline, not a script: a script copies every entry into Lua and back, which keeps
        // single-threaded Redis busy for milliseconds on big pages. The marker is read first:
        // if a trim happens in between, the page says less about truncation, never more.
        let mut pipe = redis::pipe();
        pipe.get(trim_marker(stream_key));
        pipe.cmd("XRANGE")
            .arg(stream_key)
            .arg(format!("({after}"))
            .arg("+")
            .arg("COUNT")
            .arg(limit);
        let mut con = self.reads.clone();
        // Few history reads at a time per node: Redis runs a client's pipelined commands in one
        // go, and twenty replays of 256 KiB each queued at once would hold it (and every
        // user's message behind it) for milliseconds.
        let _permit = self
            .reads_in_flight
            .acquire()
            .await
            .map_err(|_| BrokerError::Unavailable("the broker is shutting down".into()))?;
        let (newest_trimmed, raw): (Option<String>, Vec<StreamEntry>) =
            self.timed("range", pipe.query_async(&mut con)).await?;
        let newest_trimmed = match newest_trimmed {
            Some(id) => parse_id(&id)?,
            None => StreamId::ZERO,
        };
        let mut entries = Vec::with_capacity(raw.len());
        for (id, fields) in raw {
            let rest = fields
                .into_iter()
                .find(|(name, _)| name == "f")
                .map(|(_, value)| value)
                .ok_or_else(|| BrokerError::Protocol(format!("stream entry {id} has no frame")))?;
            entries.push((parse_id(&id)?, format!("{frame_head}{id}{rest}")));
        }
        Ok(Page {
            entries,
            truncated: after < newest_trimmed,
        })
    }

    pub async fn newest_id(&self, topic: &Topic) -> Result<Option<StreamId>, BrokerError> {
        let stream_key = self.keys.stream(topic);
        let mut con = self.commands.clone();
        let newest: Vec<StreamEntry> = self
            .timed(
                "range",
                redis::cmd("XREVRANGE")
                    .arg(stream_key)
                    .arg("+")
                    .arg("-")
                    .arg("COUNT")
                    .arg(1)
                    .query_async(&mut con),
            )
            .await?;
        newest.first().map(|(id, _)| parse_id(id)).transpose()
    }

    pub async fn save_positions(&self, positions: &[Position]) -> Result<(), BrokerError> {
        if positions.is_empty() {
            return Ok(());
        }
        // One pipeline per user (one hash slot), all in flight together.
        let mut by_user: HashMap<&str, Vec<&Position>> = HashMap::new();
        for position in positions {
            by_user.entry(&position.user).or_default().push(position);
        }
        let writes: Vec<_> = by_user
            .into_iter()
            .map(|(user, positions)| {
                let key = self.keys.acks(user);
                let mut pipe = redis::pipe();
                for position in positions {
                    pipe.hset(
                        &key,
                        position_field(&position.topic),
                        position.id.to_string(),
                    )
                    .ignore();
                }
                // Positions of users who stay away expire with their history.
                pipe.pexpire(&key, self.limits.history_ttl_ms as i64)
                    .ignore();
                let mut con = self.commands.clone();
                async move { pipe.query_async::<()>(&mut con).await }
            })
            .collect();
        self.timed("save_acks", all_ok(writes)).await
    }

    pub async fn mark_seen(&self, user: &str, ttl_ms: u64) -> Result<(), BrokerError> {
        let mut con = self.commands.clone();
        self.timed(
            "touch",
            redis::cmd("SET")
                .arg(self.keys.user_seen(user))
                .arg(1)
                .arg("PX")
                .arg(ttl_ms)
                .query_async::<()>(&mut con),
        )
        .await
    }

    pub async fn trim_inboxes(&self, read: &[(String, StreamId)]) -> Result<(), BrokerError> {
        if read.is_empty() {
            return Ok(());
        }
        // One command per inbox (one hash slot each), all in flight together.
        let trims: Vec<_> = read
            .iter()
            .map(|(user, id)| {
                // MINID removes the entries below it: everything up to and including `id`.
                let mut cmd = redis::cmd("XTRIM");
                cmd.arg(self.keys.inbox_stream(user))
                    .arg("MINID")
                    .arg(id.next().to_string());
                let mut con = self.commands.clone();
                async move { cmd.query_async::<()>(&mut con).await }
            })
            .collect();
        self.timed("trim_read", all_ok(trims)).await
    }

    pub async fn load_position(
        &self,
        user: &str,
        topic: &Topic,
    ) -> Result<Option<StreamId>, BrokerError> {
        let mut con = self.commands.clone();
        let key = self.keys.acks(user);
        let field = position_field(topic);
        let value: Option<String> = self
            .timed(
                "load_ack",
                redis::cmd("HGET")
                    .arg(&key)
                    .arg(&field)
                    .query_async(&mut con),
            )
            .await?;
        // A value that is no id (written by hand, or by another program) must not lock the
        // user out: it counts as no position.
        Ok(value.and_then(|v| match parse_id(&v) {
            Ok(id) => Some(id),
            Err(_) => {
                tracing::warn!(
                    key,
                    field,
                    "ignoring a stored position that is no message id"
                );
                None
            }
        }))
    }

    pub async fn room_count(&self, room_key: &str) -> Result<u64, BrokerError> {
        let mut con = self.commands.clone();
        self.timed(
            "room_count",
            redis::cmd("HLEN")
                .arg(self.keys.room_users(room_key))
                .query_async(&mut con),
        )
        .await
    }

    pub async fn members(
        &self,
        room_key: &str,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<MemberPage, BrokerError> {
        // Our cursors are HSCAN's: decimal numbers.
        if cursor
            .is_some_and(|c| c.is_empty() || c.len() > 20 || !c.bytes().all(|b| b.is_ascii_digit()))
        {
            return Err(BrokerError::BadCursor);
        }
        let mut con = self.commands.clone();
        let mut pipe = redis::pipe();
        pipe.hlen(self.keys.room_users(room_key));
        pipe.cmd("HSCAN")
            .arg(self.keys.room_conns(room_key))
            .arg(cursor.unwrap_or("0"))
            .arg("COUNT")
            .arg(limit);
        let (num, (next, flat)): (u64, (String, Vec<Value>)) =
            self.timed("members", pipe.query_async(&mut con)).await?;
        let mut seen = HashSet::new();
        let mut members = Vec::new();
        for value in flat.iter().skip(1).step_by(2) {
            let entry: String = redis::from_redis_value_ref(value)
                .map_err(|e| BrokerError::Protocol(e.to_string()))?;
            if let Some((user, fragment)) = parse_presence_record(&entry) {
                if seen.insert(user.to_string()) {
                    members.push((user.to_string(), fragment.to_string()));
                }
            }
        }
        Ok(MemberPage {
            num,
            members,
            next_cursor: (next != "0").then_some(next),
        })
    }

    pub async fn publish_control(&self, topic: &Topic, payload: &str) -> Result<(), BrokerError> {
        let mut con = self.commands.clone();
        self.timed(
            "publish",
            redis::cmd(match self.receiving {
                Receiving::Classic(_) => "PUBLISH",
                Receiving::Sharded(_) => "SPUBLISH",
            })
            .arg(self.keys.channel(topic))
            .arg(payload)
            .query_async::<u64>(&mut con),
        )
        .await
        .map(drop)
    }
}

/// The key holding the id of the newest entry trimmed from `stream_key`.
fn trim_marker(stream_key: &str) -> String {
    format!("{stream_key}:t")
}

/// Hands the sharded subscriber's messages to the hub as topics, and each rebuilt shard as a
/// `Resubscribed` (the hub reads the gap back from the streams; presence is re-asserted).
async fn forward_sharded(
    broker: Arc<RedisBroker>,
    mut messages: tokio::sync::mpsc::UnboundedReceiver<(String, Bytes)>,
    mut events: tokio::sync::mpsc::UnboundedReceiver<Resubscribed>,
    inbound: InboundSender,
    shutdown: CancellationToken,
    on_reconnect: Arc<dyn Fn() + Send + Sync>,
) {
    // Scripts in every node's cache before the first append: a group commit refuses (rather
    // than retries) an append that meets a NOSCRIPT. Tried until the cluster answers.
    let mut delay = Duration::from_millis(50);
    while !broker.load_scripts().await {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(2));
    }
    let keys = &broker.keys;
    loop {
        let forwarded = tokio::select! {
            _ = shutdown.cancelled() => return,
            message = messages.recv() => match message {
                None => return,
                Some((channel, payload)) => match keys.topic_of_channel(&channel) {
                    Some(topic) => inbound.send(Inbound::Message { topic, payload }),
                    None => {
                        tracing::warn!(channel, "message on a channel this node never subscribed to");
                        Ok(())
                    }
                },
            },
            event = events.recv() => match event {
                None => return,
                Some(event) => {
                    tracing::info!(
                        node = event.node,
                        cause = event.cause,
                        channels = event.channels.len(),
                        lost_for = ?event.lost_for,
                        "redis cluster shard resubscribed"
                    );
                    broker.metrics.pubsub_reconnects.inc();
                    // A promoted replica may not have the scripts cached.
                    broker.load_scripts().await;
                    let sent = inbound.send(Inbound::Resubscribed);
                    on_reconnect();
                    sent
                }
            },
        };
        if forwarded.is_err() {
            return; // the hub is gone: shutting down
        }
    }
}

/// Runs requests together; the first error, if any.
async fn all_ok<F>(requests: Vec<F>) -> Result<(), RedisError>
where
    F: std::future::Future<Output = Result<(), RedisError>>,
{
    for result in futures_util::future::join_all(requests).await {
        result?;
    }
    Ok(())
}

/// A room's user count and record.
type RoomRead = (u64, Option<String>);

/// A raw stream entry: id and field/value pairs.
type StreamEntry = (String, Vec<(String, String)>);

fn is_noscript(e: &RedisError) -> bool {
    e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript)
}

/// The append script's reply: the new (or original) id and what happened.
type AppendReply = (String, i64);

/// The append script's reply: the id, and 1 (created), 0 (a duplicate: the original's id),
/// -1 (the required key is missing) or -2 (the stream is full).
fn appended((id, created): AppendReply) -> Result<Appended, BrokerError> {
    match created {
        -1 => Err(BrokerError::UnknownRecipient),
        -2 => Err(BrokerError::Full),
        _ => Ok(Appended {
            id: parse_id(&id)?,
            created: created == 1,
        }),
    }
}

fn parse_id(text: &str) -> Result<StreamId, BrokerError> {
    text.parse()
        .map_err(|_| BrokerError::Protocol(format!("bad stream id {text:?}")))
}
