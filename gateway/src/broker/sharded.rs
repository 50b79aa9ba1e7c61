//! Sharded pub/sub on a Redis Cluster, owned by the gateway: the set of channels this node
//! wants, the master serving each channel's hash slot, one subscriber connection per master,
//! and the rebuild of a shard's subscriptions after a failover, a slot migration or a dropped
//! connection — each rebuild reported, so the caller repairs the gap from the streams.
//!
//! Why not redis-rs's cluster pub/sub (../shared/DESIGN.md, measured with redis-rs 1.8.1): after a
//! master is SIGKILLed it retries the dead address and never re-reads the topology; it
//! resubscribes all of a node's channels in one `SSUBSCRIBE` (CROSSSLOT, swallowed); and it
//! takes a server's `sunsubscribe` (graceful failover, slot migration) for a reply and drops the
//! channel for good. So this module speaks RESP2 itself on plain sockets: in the subscribed state
//! a connection carries nothing but `SSUBSCRIBE`/`SUNSUBSCRIBE` and their confirmations, the
//! messages, and error replies, so every frame can be told apart without guessing.
//!
//! A connection is given up, and its channels rebuilt on the master the topology names, on: EOF
//! or a socket error (all a SIGKILLed master shows), an unrequested `sunsubscribe` (graceful
//! failover, slot migration), an error reply such as MOVED, and a periodic topology read that
//! puts one of its slots on another master (a frozen or cut-off master shows nothing at all).
//!
//! The shape: one actor task owns all state (no locks); one task per master connection reads
//! and writes its socket, hands messages straight to `inbound` and everything else to the actor;
//! topology reads (`CLUSTER SLOTS`) run in tasks of their own so a slow or dead node never stalls
//! the shards that are fine.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// How long `subscribe` waits for its confirmation: long enough to wait out the rebuild of a
/// shard whose master was just promoted, short enough that a login does not hang on a dead one.
pub const SUBSCRIBE_WAIT: Duration = Duration::from_secs(5);
/// How long `unsubscribe` waits for the `SUNSUBSCRIBE` confirmation.
pub const UNSUBSCRIBE_WAIT: Duration = Duration::from_secs(2);
/// Channels per `SSUBSCRIBE` at most (all of one slot).
pub const BATCH: usize = 512;
/// Hash slots of a Redis Cluster.
pub const SLOTS: u16 = 16384;

/// A master that does not accept a connection within this is treated as gone.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// A subscriber connection PINGs this often; one that has read nothing (no message, no pong)
/// for `SILENCE_LIMIT` is taken for lost. That catches a half-open connection to a master that
/// stays master, which neither EOF nor the topology check would.
const KEEPALIVE_EVERY: Duration = Duration::from_secs(5);
const SILENCE_LIMIT: Duration = Duration::from_secs(12);
/// How long one node may take to answer `CLUSTER SLOTS` before the next one is asked.
const TOPOLOGY_TIMEOUT: Duration = Duration::from_secs(1);
/// Backoff between topology reads that follow each other closely (a master SIGKILLed stays
/// listed until its replica is promoted: the reads repeat until then). Capped low, because
/// recovery after the promotion waits for the next read.
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_millis(300);
/// Topology reads further apart than this start again without backoff.
const BACKOFF_RESET: Duration = Duration::from_secs(1);
/// How often the topology is read even when nothing was noticed: a master that froze or was cut
/// off (no EOF, no `sunsubscribe`) while its replica took over is caught by comparing the map
/// with where the connections are.
const VERIFY_EVERY: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// No confirmation in time: the channel's shard is unreachable or still being rebuilt. The
    /// channel is no longer wanted (it will not be subscribed behind the caller's back) unless
    /// another `subscribe` of it is still waiting.
    #[error(
        "SSUBSCRIBE {channel} not confirmed within {waited:?} (its shard is down or being rebuilt)"
    )]
    Timeout { channel: String, waited: Duration },
    /// `unsubscribe` of the same channel came first.
    #[error("{0} was unsubscribed before its subscription was confirmed")]
    Unsubscribed(String),
    #[error("the sharded subscriber is shut down")]
    Shutdown,
}

/// Reported after a loss, once every lost channel that is still wanted is subscribed again:
/// messages published to them meanwhile were not delivered and are to be read from the streams.
/// Sent after the confirmations, so a stream read that starts now covers the whole gap; messages
/// published after the confirmation may reach `inbound` before this report (the caller
/// de-duplicates by stream id).
#[derive(Debug, Clone)]
pub struct Resubscribed {
    /// The channels subscribed again (those unsubscribed meanwhile are not listed).
    pub channels: Vec<String>,
    /// The master whose connection was lost (`host:port`).
    pub node: String,
    /// What was seen: EOF, an unrequested `sunsubscribe`, an error reply (MOVED), ...
    pub cause: String,
    /// From noticing the loss to the last confirmation.
    pub lost_for: Duration,
}

/// The handle: cheap calls into the actor task, which runs until `shutdown` (or until every
/// handle is dropped).
pub struct ShardedSubscriber {
    requests: mpsc::UnboundedSender<Request>,
}

impl fmt::Debug for ShardedSubscriber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShardedSubscriber").finish_non_exhaustive()
    }
}

impl ShardedSubscriber {
    /// Starts the subscriber. `seed_urls` are `redis://[user:password@]host:port` URLs of any
    /// cluster nodes (the topology is read from whichever answers; its credentials are used for
    /// every node). Messages go to `inbound` as `(channel, payload)`; rebuilds are reported on
    /// `events`.
    pub fn start(
        seed_urls: Vec<String>,
        inbound: mpsc::UnboundedSender<(String, Bytes)>,
        events: mpsc::UnboundedSender<Resubscribed>,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        let mut seeds = Vec::new();
        let mut auth = None;
        for url in &seed_urls {
            match parse_seed(url) {
                Ok((addr, seed_auth)) => {
                    seeds.push(addr);
                    auth = auth.or(seed_auth);
                }
                Err(e) => tracing::error!("sharded pub/sub: ignoring seed {url:?}: {e}"),
            }
        }
        let (requests, requests_rx) = mpsc::unbounded_channel();
        let (internal, internal_rx) = mpsc::unbounded_channel();
        let actor = Actor {
            seeds,
            auth: auth.map(Arc::new),
            inbound,
            events,
            stop: shutdown.child_token(),
            internal,
            wanted: HashMap::new(),
            homeless: HashSet::new(),
            conns: HashMap::new(),
            by_addr: HashMap::new(),
            next_id: 0,
            topology: None,
            last_good: None,
            lost: HashMap::new(),
            episodes: HashMap::new(),
            refresh: Refresh::default(),
        };
        tokio::spawn(actor.run(requests_rx, internal_rx));
        Arc::new(ShardedSubscriber { requests })
    }

    /// Subscribes to `channel` on the master of its slot; returns once Redis confirmed it
    /// (waiting up to `SUBSCRIBE_WAIT` while the shard is rebuilt). Subscriptions are a set:
    /// subscribing twice is one subscription, and one `unsubscribe` ends it.
    pub async fn subscribe(&self, channel: &str) -> Result<(), Error> {
        let (done, confirmed) = oneshot::channel();
        let channel = channel.to_owned();
        self.requests
            .send(Request::Subscribe {
                channel: channel.clone(),
                done,
            })
            .map_err(|_| Error::Shutdown)?;
        match tokio::time::timeout(SUBSCRIBE_WAIT, confirmed).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(Error::Shutdown),
            Err(_) => {
                // The caller gives the channel up: drop it unless another caller still waits
                // for it.
                let _ = self.requests.send(Request::GiveUp {
                    channel: channel.clone(),
                });
                Err(Error::Timeout {
                    channel,
                    waited: SUBSCRIBE_WAIT,
                })
            }
        }
    }

    /// Unsubscribes `channel`; returns once Redis confirmed it (or its connection is gone, or
    /// after `UNSUBSCRIBE_WAIT`). After it returns no message of `channel` reaches `inbound`,
    /// and no rebuild subscribes it again.
    pub async fn unsubscribe(&self, channel: &str) {
        let (done, confirmed) = oneshot::channel();
        let request = Request::Unsubscribe {
            channel: channel.to_owned(),
            done: Some(done),
        };
        if self.requests.send(request).is_ok() {
            let _ = tokio::time::timeout(UNSUBSCRIBE_WAIT, confirmed).await;
        }
    }
}

/// The hash slot of a key or shard channel, as Redis computes it: CRC16 (XMODEM) of the first
/// non-empty `{hashtag}` (else of the whole name), mod 16384.
pub fn slot_of(channel: &str) -> u16 {
    let bytes = channel.as_bytes();
    let hashed = match bytes.iter().position(|&b| b == b'{') {
        Some(open) => match bytes[open + 1..].iter().position(|&b| b == b'}') {
            Some(len) if len > 0 => &bytes[open + 1..open + 1 + len],
            _ => bytes,
        },
        None => bytes,
    };
    crc16_xmodem(hashed) % SLOTS
}

fn crc16_xmodem(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in data {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// A node's address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Addr {
    host: String,
    port: u16,
}

impl fmt::Display for Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

/// A seed URL's address, and the `AUTH` command its credentials call for.
fn parse_seed(url: &str) -> Result<(Addr, Option<Vec<u8>>), String> {
    let info = redis::IntoConnectionInfo::into_connection_info(url).map_err(|e| e.to_string())?;
    let addr = match info.addr() {
        redis::ConnectionAddr::Tcp(host, port) => Addr {
            host: host.clone(),
            port: *port,
        },
        other => return Err(format!("only plain TCP is supported, not {other:?}")),
    };
    let settings = info.redis_settings();
    let auth = settings
        .password()
        .map(|password| match settings.username() {
            Some(user) => encode(&[b"AUTH", user.as_bytes(), password.as_bytes()]),
            None => encode(&[b"AUTH", password.as_bytes()]),
        });
    Ok((addr, auth))
}

// ---------------------------------------------------------------------------------------------
// RESP2: the few frame types a subscriber and `CLUSTER SLOTS` see.

#[derive(Debug, Clone, PartialEq, Eq)]
enum Frame {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Option<Bytes>),
    Array(Option<Vec<Frame>>),
}

impl Frame {
    fn bulk_str(&self) -> Option<&str> {
        match self {
            Frame::Bulk(Some(b)) => std::str::from_utf8(b).ok(),
            Frame::Simple(s) => Some(s),
            _ => None,
        }
    }
}

/// A command in RESP (an array of bulk strings).
fn encode(parts: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + parts.iter().map(|p| p.len() + 16).sum::<usize>());
    out.extend_from_slice(format!("*{}\r\n", parts.len()).as_bytes());
    for part in parts {
        out.extend_from_slice(format!("${}\r\n", part.len()).as_bytes());
        out.extend_from_slice(part);
        out.extend_from_slice(b"\r\n");
    }
    out
}

fn encode_command(command: &str, channels: &[String]) -> Vec<u8> {
    let mut parts: Vec<&[u8]> = Vec::with_capacity(channels.len() + 1);
    parts.push(command.as_bytes());
    parts.extend(channels.iter().map(|c| c.as_bytes()));
    encode(&parts)
}

/// Takes one whole frame off the front of `buf`; `Ok(None)` if it has not fully arrived yet.
fn parse_frame(buf: &mut BytesMut) -> Result<Option<Frame>, String> {
    match scan(buf, 0)? {
        Some((frame, end)) => {
            buf.advance(end);
            Ok(Some(frame))
        }
        None => Ok(None),
    }
}

/// The frame starting at `pos` and where it ends, if `buf` holds all of it.
fn scan(buf: &[u8], pos: usize) -> Result<Option<(Frame, usize)>, String> {
    let Some(kind) = buf.get(pos) else {
        return Ok(None);
    };
    let Some(line_len) = buf[pos + 1..].windows(2).position(|w| w == b"\r\n") else {
        return Ok(None);
    };
    let line = std::str::from_utf8(&buf[pos + 1..pos + 1 + line_len])
        .map_err(|_| "a frame header is not UTF-8".to_string())?;
    let after = pos + 1 + line_len + 2;
    let number = || -> Result<i64, String> {
        line.parse()
            .map_err(|_| format!("bad length or integer {line:?}"))
    };
    match kind {
        b'+' => Ok(Some((Frame::Simple(line.to_owned()), after))),
        b'-' => Ok(Some((Frame::Error(line.to_owned()), after))),
        b':' => Ok(Some((Frame::Int(number()?), after))),
        b'$' => {
            let len = number()?;
            if len < 0 {
                return Ok(Some((Frame::Bulk(None), after)));
            }
            let end = after + usize::try_from(len).map_err(|e| e.to_string())?;
            if buf.len() < end + 2 {
                return Ok(None);
            }
            if &buf[end..end + 2] != b"\r\n" {
                return Err(format!("a bulk string of {len} bytes does not end in CRLF"));
            }
            let bytes = Bytes::copy_from_slice(&buf[after..end]);
            Ok(Some((Frame::Bulk(Some(bytes)), end + 2)))
        }
        b'*' => {
            let len = number()?;
            if len < 0 {
                return Ok(Some((Frame::Array(None), after)));
            }
            let mut items = Vec::with_capacity(usize::try_from(len.min(1024)).unwrap_or(0));
            let mut at = after;
            for _ in 0..len {
                match scan(buf, at)? {
                    Some((item, end)) => {
                        items.push(item);
                        at = end;
                    }
                    None => return Ok(None),
                }
            }
            Ok(Some((Frame::Array(Some(items)), at)))
        }
        other => Err(format!("unexpected RESP type byte {other:#04x}")),
    }
}

// ---------------------------------------------------------------------------------------------
// The cluster's slot map.

#[derive(Debug, Clone, Default)]
struct Topology {
    /// `(first slot, last slot, master)`.
    ranges: Vec<(u16, u16, Addr)>,
    /// Every node listed (masters and replicas): where the next topology read may ask.
    nodes: Vec<Addr>,
}

impl Topology {
    fn master_of(&self, slot: u16) -> Option<&Addr> {
        self.ranges
            .iter()
            .find(|(first, last, _)| (*first..=*last).contains(&slot))
            .map(|(_, _, addr)| addr)
    }

    /// Reads a `CLUSTER SLOTS` reply given by `asked` (an empty or `?` host means that node's).
    fn parse(reply: &Frame, asked: &Addr) -> Result<Topology, String> {
        let Frame::Array(Some(entries)) = reply else {
            return Err(format!("CLUSTER SLOTS answered {reply:?}"));
        };
        let mut topology = Topology::default();
        for entry in entries {
            let Frame::Array(Some(fields)) = entry else {
                return Err(format!("bad CLUSTER SLOTS entry {entry:?}"));
            };
            let (Some(Frame::Int(first)), Some(Frame::Int(last))) = (fields.first(), fields.get(1))
            else {
                return Err(format!("bad CLUSTER SLOTS range {entry:?}"));
            };
            let mut nodes = fields[2..].iter().filter_map(|node| node_addr(node, asked));
            let Some(master) = nodes.next() else {
                continue; // a range without a master: its slots stay unmapped
            };
            let slot = |n: i64| u16::try_from(n).map_err(|e| format!("slot {n}: {e}"));
            topology
                .ranges
                .push((slot(*first)?, slot(*last)?, master.clone()));
            for addr in std::iter::once(master).chain(nodes) {
                if !topology.nodes.contains(&addr) {
                    topology.nodes.push(addr);
                }
            }
        }
        Ok(topology)
    }
}

/// `[host, port, id, ...]` of a `CLUSTER SLOTS` entry.
fn node_addr(node: &Frame, asked: &Addr) -> Option<Addr> {
    let Frame::Array(Some(fields)) = node else {
        return None;
    };
    let host = fields.first()?.bulk_str()?;
    let Some(Frame::Int(port)) = fields.get(1) else {
        return None;
    };
    let host = if host.is_empty() || host == "?" {
        asked.host.clone()
    } else {
        host.to_owned()
    };
    Some(Addr {
        host,
        port: u16::try_from(*port).ok()?,
    })
}

/// Asks `nodes` in turn for `CLUSTER SLOTS`; the first usable answer and who gave it.
async fn read_topology(
    nodes: Vec<Addr>,
    auth: Option<Arc<Vec<u8>>>,
) -> Result<(Topology, Addr), String> {
    let mut errors = Vec::new();
    for node in nodes {
        let asked = tokio::time::timeout(TOPOLOGY_TIMEOUT, ask(&node, auth.as_deref())).await;
        match asked.unwrap_or_else(|_| Err("timed out".into())) {
            Ok(reply) => match Topology::parse(&reply, &node) {
                Ok(topology) if !topology.ranges.is_empty() => return Ok((topology, node)),
                Ok(_) => errors.push(format!("{node}: no slot has a master")),
                Err(e) => errors.push(format!("{node}: {e}")),
            },
            Err(e) => errors.push(format!("{node}: {e}")),
        }
    }
    Err(errors.join("; "))
}

/// One `CLUSTER SLOTS` on a connection of its own.
async fn ask(node: &Addr, auth: Option<&Vec<u8>>) -> Result<Frame, String> {
    let mut stream = TcpStream::connect((node.host.as_str(), node.port))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let mut request = auth.cloned().unwrap_or_default();
    request.extend(encode(&[b"CLUSTER", b"SLOTS"]));
    stream
        .write_all(&request)
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut buf = BytesMut::with_capacity(4096);
    let mut skip = usize::from(auth.is_some()); // AUTH's +OK
    loop {
        while let Some(frame) = parse_frame(&mut buf)? {
            match frame {
                Frame::Error(e) => return Err(e),
                _ if skip > 0 => skip -= 1,
                reply => return Ok(reply),
            }
        }
        let read = stream
            .read_buf(&mut buf)
            .await
            .map_err(|e| format!("read: {e}"))?;
        if read == 0 {
            return Err("EOF".into());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// One subscriber connection per master.

enum Internal {
    /// A frame of connection `conn` other than a message (those go straight to `inbound`).
    Reply { conn: u64, frame: Frame },
    /// Connection `conn` is gone (never connected, EOF, socket error, protocol error).
    Closed { conn: u64, reason: String },
    /// A topology read finished.
    Topology(Result<(Topology, Addr), String>),
}

/// Runs one connection until it fails or is cancelled; reports its end to the actor.
async fn run_connection(
    id: u64,
    addr: Addr,
    auth: Option<Arc<Vec<u8>>>,
    writes: mpsc::UnboundedReceiver<Vec<u8>>,
    internal: mpsc::UnboundedSender<Internal>,
    inbound: mpsc::UnboundedSender<(String, Bytes)>,
    cancel: CancellationToken,
) {
    let reason = tokio::select! {
        _ = cancel.cancelled() => return,
        reason = connection(id, &addr, auth, writes, &internal, &inbound) => reason,
    };
    let _ = internal.send(Internal::Closed { conn: id, reason });
}

async fn connection(
    id: u64,
    addr: &Addr,
    auth: Option<Arc<Vec<u8>>>,
    mut writes: mpsc::UnboundedReceiver<Vec<u8>>,
    internal: &mpsc::UnboundedSender<Internal>,
    inbound: &mpsc::UnboundedSender<(String, Bytes)>,
) -> String {
    let connect = TcpStream::connect((addr.host.as_str(), addr.port));
    let stream = match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => return format!("connect: {e}"),
        Err(_) => return format!("connect: no answer within {CONNECT_TIMEOUT:?}"),
    };
    let _ = stream.set_nodelay(true);
    let (mut read, mut write) = stream.into_split();
    if let Some(auth) = auth {
        if let Err(e) = write.write_all(&auth).await {
            return format!("write: {e}");
        }
    }
    let mut buf = BytesMut::with_capacity(16 * 1024);
    let mut keepalive = tokio::time::interval(KEEPALIVE_EVERY);
    keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_read = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = keepalive.tick() => {
                if last_read.elapsed() > SILENCE_LIMIT {
                    return format!("no answer to PING for {SILENCE_LIMIT:?}");
                }
                if let Err(e) = write.write_all(&encode(&[b"PING"])).await {
                    return format!("write: {e}");
                }
            }
            bytes = writes.recv() => {
                let Some(bytes) = bytes else { return "dropped by the subscriber".into() };
                if let Err(e) = write.write_all(&bytes).await {
                    return format!("write: {e}");
                }
            }
            got = read.read_buf(&mut buf) => {
                match got {
                    Ok(0) => return "EOF".into(),
                    Ok(_) => last_read = tokio::time::Instant::now(),
                    Err(e) => return format!("read: {e}"),
                }
                loop {
                    let frame = match parse_frame(&mut buf) {
                        Ok(Some(frame)) => frame,
                        Ok(None) => break,
                        Err(e) => return format!("protocol error: {e}"),
                    };
                    if is_pong(&frame) {
                        continue; // the keepalive's answer: reading it was the point
                    }
                    if let Some(message) = as_message(&frame) {
                        // Straight to the caller, in the connection's order: a confirmation
                        // that follows (of an unsubscribe) reaches the actor after it.
                        if inbound.send(message).is_err() {
                            return "inbound closed".into();
                        }
                    } else if internal.send(Internal::Reply { conn: id, frame }).is_err() {
                        return "subscriber stopped".into();
                    }
                }
            }
        }
    }
}

/// A `PING`'s answer on a subscribed RESP2 connection: `pong` and an empty payload.
fn is_pong(frame: &Frame) -> bool {
    matches!(frame, Frame::Array(Some(items)) if items.first().and_then(Frame::bulk_str) == Some("pong"))
}

/// `smessage <channel> <payload>` as `(channel, payload)`.
fn as_message(frame: &Frame) -> Option<(String, Bytes)> {
    let Frame::Array(Some(items)) = frame else {
        return None;
    };
    match items.as_slice() {
        [kind, channel, Frame::Bulk(Some(payload))] if kind.bulk_str() == Some("smessage") => {
            Some((channel.bulk_str()?.to_owned(), payload.clone()))
        }
        _ => None,
    }
}

/// `ssubscribe`/`sunsubscribe <channel> <count>` as `(is_subscribe, channel)`.
fn as_confirmation(frame: &Frame) -> Option<(bool, &str)> {
    let Frame::Array(Some(items)) = frame else {
        return None;
    };
    match items.as_slice() {
        [kind, channel, Frame::Int(_)] => match kind.bulk_str()? {
            "ssubscribe" => Some((true, channel.bulk_str()?)),
            "sunsubscribe" => Some((false, channel.bulk_str()?)),
            _ => None,
        },
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// The actor: every decision about subscriptions is made here, one event at a time.

enum Request {
    Subscribe {
        channel: String,
        done: oneshot::Sender<Result<(), Error>>,
    },
    Unsubscribe {
        channel: String,
        done: Option<oneshot::Sender<()>>,
    },
    /// A `subscribe` timed out.
    GiveUp { channel: String },
}

/// A channel this node wants.
struct Want {
    slot: u16,
    /// The connection its `SSUBSCRIBE` went (or goes) to; `None` while homeless.
    conn: Option<u64>,
    confirmed: bool,
    waiters: Vec<oneshot::Sender<Result<(), Error>>>,
}

struct Conn {
    addr: Addr,
    writes: mpsc::UnboundedSender<Vec<u8>>,
    cancel: CancellationToken,
    /// Channels placed here whose `SSUBSCRIBE` is not written yet, by slot.
    unsent: BTreeMap<u16, Vec<String>>,
    /// `SUNSUBSCRIBE`s written and not yet confirmed, per channel, in order: a `sunsubscribe`
    /// for a channel not in here is the server's own (failover, migration).
    unsubscribing: HashMap<String, VecDeque<Option<oneshot::Sender<()>>>>,
}

/// One loss: its channels, until each is confirmed again or unsubscribed.
struct Episode {
    pending: usize,
    recovered: Vec<String>,
    node: String,
    cause: String,
    started: Instant,
}

#[derive(Default)]
struct Refresh {
    in_flight: bool,
    /// Something was lost while a read was in flight: read again after it.
    again: bool,
    due: Option<Instant>,
    last: Option<Instant>,
    backoff: Duration,
}

struct Actor {
    seeds: Vec<Addr>,
    auth: Option<Arc<Vec<u8>>>,
    inbound: mpsc::UnboundedSender<(String, Bytes)>,
    events: mpsc::UnboundedSender<Resubscribed>,
    stop: CancellationToken,
    internal: mpsc::UnboundedSender<Internal>,
    wanted: HashMap<String, Want>,
    /// Wanted channels with no connection: placed after the next topology read.
    homeless: HashSet<String>,
    conns: HashMap<u64, Conn>,
    by_addr: HashMap<Addr, u64>,
    next_id: u64,
    topology: Option<Topology>,
    last_good: Option<Addr>,
    /// Channels lost while confirmed, by the episode that lost them.
    lost: HashMap<String, u64>,
    episodes: HashMap<u64, Episode>,
    refresh: Refresh,
}

impl Actor {
    async fn run(
        mut self,
        mut requests: mpsc::UnboundedReceiver<Request>,
        mut internal: mpsc::UnboundedReceiver<Internal>,
    ) {
        self.request_refresh();
        let mut verify = tokio::time::interval(VERIFY_EVERY);
        verify.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let due = self.refresh.due;
            let refresh_at = due.map_or_else(tokio::time::Instant::now, Into::into);
            tokio::select! {
                _ = self.stop.cancelled() => break,
                request = requests.recv() => match request {
                    Some(request) => self.on_request(request),
                    None => break, // every handle dropped
                },
                event = internal.recv() => {
                    // The actor holds a sender itself: this never ends.
                    let Some(event) = event else { break };
                    self.on_internal(event);
                    if self.inbound.is_closed() {
                        break;
                    }
                }
                _ = tokio::time::sleep_until(refresh_at), if due.is_some() => self.start_refresh(),
                _ = verify.tick() => self.request_refresh(),
            }
            self.flush();
        }
        self.stop.cancel();
    }

    fn on_request(&mut self, request: Request) {
        match request {
            Request::Subscribe { channel, done } => self.subscribe(channel, done),
            Request::Unsubscribe { channel, done } => self.unsubscribe(&channel, done),
            Request::GiveUp { channel } => {
                let Some(want) = self.wanted.get_mut(&channel) else {
                    return;
                };
                // Dropped even if the confirmation raced the timeout: the caller was told it
                // failed and will not unsubscribe. Kept while another `subscribe` still waits.
                want.waiters.retain(|w| !w.is_closed());
                if want.waiters.is_empty() {
                    tracing::debug!(channel, "sharded pub/sub: subscribe given up");
                    self.unsubscribe(&channel, None);
                }
            }
        }
    }

    fn subscribe(&mut self, channel: String, done: oneshot::Sender<Result<(), Error>>) {
        if let Some(want) = self.wanted.get_mut(&channel) {
            if want.confirmed {
                let _ = done.send(Ok(()));
            } else {
                want.waiters.push(done);
            }
            return;
        }
        let want = Want {
            slot: slot_of(&channel),
            conn: None,
            confirmed: false,
            waiters: vec![done],
        };
        self.wanted.insert(channel.clone(), want);
        if !self.place(&channel) {
            self.homeless.insert(channel);
            self.request_refresh();
        }
    }

    fn unsubscribe(&mut self, channel: &str, done: Option<oneshot::Sender<()>>) {
        let Some(want) = self.wanted.remove(channel) else {
            if let Some(done) = done {
                let _ = done.send(());
            }
            return;
        };
        for waiter in want.waiters {
            let _ = waiter.send(Err(Error::Unsubscribed(channel.to_owned())));
        }
        self.homeless.remove(channel);
        if let Some(episode) = self.lost.remove(channel) {
            self.settle(episode, None);
        }
        let Some(conn) = want.conn.and_then(|id| self.conns.get_mut(&id)) else {
            if let Some(done) = done {
                let _ = done.send(());
            }
            return;
        };
        let unsent = conn.unsent.get_mut(&want.slot);
        if let Some(pos) = unsent
            .as_ref()
            .and_then(|u| u.iter().position(|c| c == channel))
        {
            // Never written: nothing to undo on the server.
            unsent.expect("found above").swap_remove(pos);
            if let Some(done) = done {
                let _ = done.send(());
            }
            return;
        }
        let _ = conn
            .writes
            .send(encode_command("SUNSUBSCRIBE", &[channel.to_owned()]));
        conn.unsubscribing
            .entry(channel.to_owned())
            .or_default()
            .push_back(done);
    }

    /// Assigns a wanted channel to the connection of its slot's master (opened if needed); its
    /// `SSUBSCRIBE` goes out at the next `flush`. False if no master is known for the slot.
    fn place(&mut self, channel: &str) -> bool {
        let Some(want) = self.wanted.get(channel) else {
            return true; // not wanted any more: nothing to place
        };
        let slot = want.slot;
        let Some(addr) = self.topology.as_ref().and_then(|t| t.master_of(slot)) else {
            return false;
        };
        let addr = addr.clone();
        let id = match self.by_addr.get(&addr) {
            Some(id) => *id,
            None => self.open(addr),
        };
        let conn = self
            .conns
            .get_mut(&id)
            .expect("by_addr points at a live conn");
        conn.unsent
            .entry(slot)
            .or_default()
            .push(channel.to_owned());
        if let Some(want) = self.wanted.get_mut(channel) {
            want.conn = Some(id);
        }
        true
    }

    fn open(&mut self, addr: Addr) -> u64 {
        self.next_id += 1;
        let id = self.next_id;
        let (writes, writes_rx) = mpsc::unbounded_channel();
        let cancel = self.stop.child_token();
        tokio::spawn(run_connection(
            id,
            addr.clone(),
            self.auth.clone(),
            writes_rx,
            self.internal.clone(),
            self.inbound.clone(),
            cancel.clone(),
        ));
        tracing::debug!(%addr, conn = id, "sharded pub/sub: connecting");
        self.by_addr.insert(addr.clone(), id);
        self.conns.insert(
            id,
            Conn {
                addr,
                writes,
                cancel,
                unsent: BTreeMap::new(),
                unsubscribing: HashMap::new(),
            },
        );
        id
    }

    /// Writes the `SSUBSCRIBE`s placed since the last flush: one per slot and up to `BATCH`
    /// channels, so no command crosses slots (CROSSSLOT) whatever the connection holds.
    fn flush(&mut self) {
        for conn in self.conns.values_mut() {
            for (_, channels) in std::mem::take(&mut conn.unsent) {
                for batch in channels.chunks(BATCH) {
                    // A closed writer means the connection is ending: its `Closed` follows.
                    let _ = conn.writes.send(encode_command("SSUBSCRIBE", batch));
                }
            }
        }
    }

    fn on_internal(&mut self, event: Internal) {
        match event {
            Internal::Reply { conn, frame } => self.on_reply(conn, &frame),
            Internal::Closed { conn, reason } => self.lose(conn, &format!("connection: {reason}")),
            Internal::Topology(result) => self.on_topology(result),
        }
    }

    fn on_reply(&mut self, id: u64, frame: &Frame) {
        if !self.conns.contains_key(&id) {
            return; // a connection already given up: its last words do not count
        }
        match as_confirmation(frame) {
            Some((true, channel)) => self.confirm(id, channel),
            Some((false, channel)) => {
                let conn = self.conns.get_mut(&id).expect("checked above");
                let requested = conn
                    .unsubscribing
                    .get_mut(channel)
                    .and_then(VecDeque::pop_front);
                match requested {
                    Some(done) => {
                        if conn
                            .unsubscribing
                            .get(channel)
                            .is_some_and(VecDeque::is_empty)
                        {
                            conn.unsubscribing.remove(channel);
                        }
                        if let Some(done) = done {
                            let _ = done.send(());
                        }
                    }
                    // The server dropped the subscription (failover, slot migration): every
                    // channel of the connection is rebuilt, since others of it likely follow.
                    None => self.lose(id, &format!("unrequested sunsubscribe of {channel}")),
                }
            }
            None => match frame {
                // MOVED (stale slot map), CLUSTERDOWN, ...: RESP2 gives no way to pin an error
                // on one of several commands in flight, and the map is stale anyway.
                Frame::Error(e) => self.lose(id, &format!("error reply: {e}")),
                // AUTH's +OK.
                Frame::Simple(_) => {}
                other => tracing::debug!(conn = id, "sharded pub/sub: unexpected {other:?}"),
            },
        }
    }

    fn confirm(&mut self, id: u64, channel: &str) {
        let Some(want) = self.wanted.get_mut(channel) else {
            return; // unsubscribed meanwhile: its SUNSUBSCRIBE is already on the way
        };
        if want.conn != Some(id) {
            return;
        }
        want.confirmed = true;
        for waiter in want.waiters.drain(..) {
            let _ = waiter.send(Ok(()));
        }
        if let Some(episode) = self.lost.remove(channel) {
            self.settle(episode, Some(channel));
        }
    }

    /// A lost channel of `episode` is back (`recovered`) or no longer wanted (`None`); the
    /// episode is reported when none is left.
    fn settle(&mut self, episode: u64, recovered: Option<&str>) {
        let Some(ep) = self.episodes.get_mut(&episode) else {
            return;
        };
        ep.pending -= 1;
        if let Some(channel) = recovered {
            ep.recovered.push(channel.to_owned());
        }
        if ep.pending > 0 {
            return;
        }
        let ep = self.episodes.remove(&episode).expect("present above");
        if self.episodes.is_empty() && self.homeless.is_empty() {
            // Every rebuild is done: the next loss (another shard's failover) starts without
            // the backoff this one built up.
            self.refresh.last = None;
        }
        if ep.recovered.is_empty() {
            return;
        }
        let lost_for = ep.started.elapsed();
        tracing::info!(
            node = ep.node,
            cause = ep.cause,
            channels = ep.recovered.len(),
            ?lost_for,
            "sharded pub/sub: resubscribed after a loss"
        );
        let _ = self.events.send(Resubscribed {
            channels: ep.recovered,
            node: ep.node,
            cause: ep.cause,
            lost_for,
        });
    }

    /// Gives connection `id` up: its channels become homeless until the next topology read
    /// places them again.
    fn lose(&mut self, id: u64, cause: &str) {
        let Some(conn) = self.conns.remove(&id) else {
            return;
        };
        if self.by_addr.get(&conn.addr) == Some(&id) {
            self.by_addr.remove(&conn.addr);
        }
        conn.cancel.cancel();
        // The connection took its subscriptions with it.
        for done in conn.unsubscribing.into_values().flatten().flatten() {
            let _ = done.send(());
        }
        self.next_id += 1;
        let episode = self.next_id;
        let mut lost = 0;
        for (channel, want) in &mut self.wanted {
            if want.conn != Some(id) {
                continue;
            }
            want.conn = None;
            self.homeless.insert(channel.clone());
            if std::mem::take(&mut want.confirmed) && !self.lost.contains_key(channel) {
                self.lost.insert(channel.clone(), episode);
                lost += 1;
            }
        }
        let node = conn.addr.to_string();
        if lost > 0 {
            tracing::warn!(
                node,
                cause,
                channels = lost,
                "sharded pub/sub: shard lost, rebuilding"
            );
            self.episodes.insert(
                episode,
                Episode {
                    pending: lost,
                    recovered: Vec::new(),
                    node,
                    cause: cause.to_owned(),
                    started: Instant::now(),
                },
            );
        } else {
            tracing::debug!(node, cause, "sharded pub/sub: connection lost");
        }
        if !self.homeless.is_empty() {
            self.request_refresh();
        }
    }

    /// Schedules a topology read: at once after a quiet spell, else after a growing backoff.
    fn request_refresh(&mut self) {
        if self.refresh.in_flight {
            self.refresh.again = true;
            return;
        }
        if self.refresh.due.is_some() {
            return;
        }
        let now = Instant::now();
        let delay = match self.refresh.last {
            Some(last) if now.duration_since(last) < BACKOFF_RESET => {
                let delay = self.refresh.backoff.max(BACKOFF_MIN);
                self.refresh.backoff = (delay * 2).min(BACKOFF_MAX);
                delay
            }
            _ => {
                self.refresh.backoff = BACKOFF_MIN;
                Duration::ZERO
            }
        };
        self.refresh.due = Some(now + delay);
    }

    fn start_refresh(&mut self) {
        self.refresh.due = None;
        self.refresh.in_flight = true;
        self.refresh.last = Some(Instant::now());
        // The node that answered last first, then the masters and replicas it listed, then the
        // seeds (which may all have moved on, or died).
        let mut nodes: Vec<Addr> = self.last_good.iter().cloned().collect();
        let listed = self.topology.iter().flat_map(|t| t.nodes.iter());
        for addr in listed.chain(self.seeds.iter()) {
            if !nodes.contains(addr) {
                nodes.push(addr.clone());
            }
        }
        let internal = self.internal.clone();
        let auth = self.auth.clone();
        let stop = self.stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                result = read_topology(nodes, auth) => {
                    let _ = internal.send(Internal::Topology(result));
                }
            }
        });
    }

    fn on_topology(&mut self, result: Result<(Topology, Addr), String>) {
        self.refresh.in_flight = false;
        match result {
            Ok((topology, from)) => {
                self.topology = Some(topology);
                self.last_good = Some(from);
                self.drop_stale_connections();
                let homeless: Vec<String> = self.homeless.drain().collect();
                for channel in homeless {
                    if !self.place(&channel) {
                        self.homeless.insert(channel);
                    }
                }
            }
            Err(e) => tracing::warn!("sharded pub/sub: no node gave the cluster's topology: {e}"),
        }
        if std::mem::take(&mut self.refresh.again) || !self.homeless.is_empty() {
            self.request_refresh();
        }
    }

    /// Against a fresh topology: a connection holding a channel whose slot another master
    /// serves now is lost (its channels are rebuilt where they belong); one holding nothing
    /// is closed.
    fn drop_stale_connections(&mut self) {
        let Some(topology) = &self.topology else {
            return;
        };
        let mut busy = HashSet::new();
        let mut stale: HashMap<u64, String> = HashMap::new();
        for want in self.wanted.values() {
            let Some(id) = want.conn else { continue };
            busy.insert(id);
            let Some(conn) = self.conns.get(&id) else {
                continue;
            };
            match topology.master_of(want.slot) {
                Some(master) if *master == conn.addr => {}
                master => {
                    let now = master.map_or_else(|| "no master".to_string(), Addr::to_string);
                    stale
                        .entry(id)
                        .or_insert_with(|| format!("topology: slot {} is on {now}", want.slot));
                }
            }
        }
        for (id, cause) in stale {
            self.lose(id, &cause);
        }
        let idle: Vec<u64> = self
            .conns
            .iter()
            .filter(|(id, c)| {
                !busy.contains(*id) && c.unsent.is_empty() && c.unsubscribing.is_empty()
            })
            .map(|(id, _)| *id)
            .collect();
        for id in idle {
            if let Some(conn) = self.conns.remove(&id) {
                tracing::debug!(node = %conn.addr, "sharded pub/sub: closing an idle connection");
                if self.by_addr.get(&conn.addr) == Some(&id) {
                    self.by_addr.remove(&conn.addr);
                }
                conn.cancel.cancel();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_redis_s() {
        // `CLUSTER KEYSLOT` of redis 7.0.15.
        let known = [
            ("foo", 12182),
            ("bar", 5061),
            ("hello", 866),
            ("123456789", 12739),
            ("{user1000}.following", 3443),
            ("gw:{r:lobby}:s", 9530),
            ("x{}y", 16116),
            ("a{b}c{d}", 3300),
            ("{}", 15257),
            ("é{ü}", 9552),
            ("gw:{room7}", 6305),
        ];
        for (key, slot) in known {
            assert_eq!(slot_of(key), slot, "{key}");
        }
    }

    #[test]
    fn a_pong_is_no_message_and_no_confirmation() {
        let mut buf = BytesMut::from(&b"*2\r\n$4\r\npong\r\n$0\r\n\r\n"[..]);
        let frame = parse_frame(&mut buf).unwrap().unwrap();
        assert!(is_pong(&frame));
        assert!(as_message(&frame).is_none() && as_confirmation(&frame).is_none());
        let mut buf = BytesMut::from(&b"*3\r\n$8\r\nsmessage\r\n$2\r\nch\r\n$1\r\nx\r\n"[..]);
        assert!(!is_pong(&parse_frame(&mut buf).unwrap().unwrap()));
    }

    #[test]
    fn frames_parse_only_when_whole() {
        let whole = b"*3\r\n$8\r\nsmessage\r\n$5\r\nr:{a}\r\n$5\r\nhello\r\n:1\r\n";
        for cut in 0..whole.len() - 4 {
            let mut buf = BytesMut::from(&whole[..cut]);
            assert_eq!(parse_frame(&mut buf), Ok(None), "cut at {cut}");
            assert_eq!(buf.len(), cut, "nothing consumed");
        }
        let mut buf = BytesMut::from(&whole[..]);
        let frame = parse_frame(&mut buf).unwrap().unwrap();
        assert_eq!(
            as_message(&frame),
            Some(("r:{a}".to_string(), Bytes::from_static(b"hello")))
        );
        assert_eq!(parse_frame(&mut buf), Ok(Some(Frame::Int(1))));
        assert!(buf.is_empty());

        let mut buf = BytesMut::from(&b"-MOVED 866 127.0.0.1:7001\r\n$-1\r\n*-1\r\n+OK\r\n"[..]);
        assert_eq!(
            parse_frame(&mut buf),
            Ok(Some(Frame::Error("MOVED 866 127.0.0.1:7001".into())))
        );
        assert_eq!(parse_frame(&mut buf), Ok(Some(Frame::Bulk(None))));
        assert_eq!(parse_frame(&mut buf), Ok(Some(Frame::Array(None))));
        assert_eq!(parse_frame(&mut buf), Ok(Some(Frame::Simple("OK".into()))));
        assert!(parse_frame(&mut BytesMut::from(&b"?x\r\n"[..])).is_err());
    }

    #[test]
    fn confirmations_are_told_from_messages() {
        let mut buf =
            BytesMut::from(&b"*3\r\n$12\r\nsunsubscribe\r\n$1\r\nc\r\n:0\r\n*3\r\n$10\r\nssubscribe\r\n$1\r\nd\r\n:2\r\n"[..]);
        let unsub = parse_frame(&mut buf).unwrap().unwrap();
        let sub = parse_frame(&mut buf).unwrap().unwrap();
        assert_eq!(as_confirmation(&unsub), Some((false, "c")));
        assert_eq!(as_confirmation(&sub), Some((true, "d")));
        assert_eq!(as_message(&sub), None);
    }

    #[test]
    fn commands_are_resp_arrays() {
        assert_eq!(
            encode_command("SSUBSCRIBE", &["a".into(), "{b}c".into()]),
            b"*3\r\n$10\r\nSSUBSCRIBE\r\n$1\r\na\r\n$4\r\n{b}c\r\n".to_vec()
        );
    }

    #[test]
    fn cluster_slots_map_slots_to_masters() {
        let node = |host: &str, port: i64| {
            Frame::Array(Some(vec![
                Frame::Bulk(Some(Bytes::from(host.to_string()))),
                Frame::Int(port),
                Frame::Bulk(Some(Bytes::from_static(b"id"))),
                Frame::Array(Some(vec![])),
            ]))
        };
        let reply = Frame::Array(Some(vec![
            Frame::Array(Some(vec![
                Frame::Int(0),
                Frame::Int(5460),
                node("127.0.0.1", 7000),
                node("127.0.0.1", 7003),
            ])),
            Frame::Array(Some(vec![
                Frame::Int(5461),
                Frame::Int(16383),
                node("", 7001),
            ])),
        ]));
        let asked = Addr {
            host: "10.0.0.9".into(),
            port: 7005,
        };
        let topology = Topology::parse(&reply, &asked).unwrap();
        assert_eq!(topology.master_of(0).map(|a| a.port), Some(7000));
        assert_eq!(topology.master_of(5460).map(|a| a.port), Some(7000));
        let other = topology.master_of(5461).unwrap();
        assert_eq!((other.host.as_str(), other.port), ("10.0.0.9", 7001));
        assert_eq!(topology.nodes.len(), 3);
    }

    #[test]
    fn seeds_carry_their_credentials() {
        let (addr, auth) = parse_seed("redis://127.0.0.1:7000/").unwrap();
        assert_eq!(addr.to_string(), "127.0.0.1:7000");
        assert_eq!(auth, None);
        let (_, auth) = parse_seed("redis://gw:secret@redis-0:6379").unwrap();
        assert_eq!(
            auth,
            Some(b"*3\r\n$4\r\nAUTH\r\n$2\r\ngw\r\n$6\r\nsecret\r\n".to_vec())
        );
        assert!(parse_seed("not a url").is_err());
    }
}
