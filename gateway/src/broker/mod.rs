//! The broker: pub/sub between nodes, presence storage, message history and inboxes behind one
//! contract in the domain's words (topics, posts, presence entries, positions) with two
//! implementations — embedded (in-process, single node) and Redis (one Redis or a Redis
//! Cluster). `tests/tests/conformance.rs` holds every backend to the same results.
//!
//! Everything a client can observe as one step is one broker call (one Redis round trip):
//! appending a message also publishes it, joining a room also announces the login.

pub mod connection;
pub mod envelope;
pub mod keys;
pub mod memory;
pub mod redis;
pub mod sharded;

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::mpsc;

pub use envelope::{Envelope, EnvelopeHeader, Kind};

use crate::protocol::StreamId;

#[derive(Debug, Clone, thiserror::Error)]
pub enum BrokerError {
    /// The broker cannot be reached; nothing was done (or it is unknown whether it was).
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    /// The broker answered something this code does not understand.
    #[error("unexpected broker reply: {0}")]
    Protocol(String),
    /// The request was sent but no answer came (a timeout, or the connection dropped after
    /// it was written): it may or may not have been carried out.
    #[error("broker outcome unknown: {0}")]
    OutcomeUnknown(String),
    /// The stream holds as many entries as it may and refuses more (inboxes).
    #[error("the stream is full")]
    Full,
    /// The append required a key that does not exist (a DM to a user never seen).
    #[error("the recipient is unknown")]
    UnknownRecipient,
    /// A paging cursor this broker never handed out.
    #[error("not a cursor of this listing")]
    BadCursor,
}

/// Limits both broker implementations apply.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Messages kept per stream.
    pub history_max_len: u64,
    /// How long a clientMsgId is remembered.
    pub dedup_ttl_ms: u64,
    /// Rooms with more users than this get no login/logout broadcasts.
    pub announce_max: u64,
    /// Streams (and their markers) nobody appended to for this long expire.
    pub history_ttl_ms: u64,
    /// Login/logout broadcasts per room and second, at most.
    pub announces_per_sec: u64,
    /// How long a presence entry lives without a refresh (the same on every node).
    pub presence_ttl_ms: u64,
    /// Replicas that must have an appended message before it is confirmed (0: none), and how
    /// long to wait for them (Redis backends).
    pub wait_replicas: u32,
    pub wait_timeout_ms: u64,
}

/// What the broker keeps messages for and publishes on: a room, or one user (its inbox of
/// direct messages, and the control commands for its connections). The broker alone decides
/// how a topic maps onto keys and channels.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Topic {
    /// A room, by its key (`RoomId::key`).
    Room(String),
    /// A user, by its id.
    User(String),
}

impl std::fmt::Display for Topic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Topic::Room(room) => write!(f, "room {room:?}"),
            Topic::User(user) => write!(f, "user {user:?}"),
        }
    }
}

impl Topic {
    /// The client frame's head up to the id of a message kept under this topic.
    pub fn frame_head(&self) -> &'static str {
        match self {
            Topic::Room(_) => crate::protocol::MESSAGE_HEAD,
            Topic::User(_) => crate::protocol::DM_HEAD,
        }
    }
}

/// What the broker hands the hub's dispatcher, in order.
#[derive(Debug, Clone)]
pub enum Inbound {
    /// A message published on a topic this node subscribed to.
    Message { topic: Topic, payload: Bytes },
    /// The subscriptions were re-established after the connection was lost: whatever was
    /// published meanwhile was not received (the hub reads it back from the streams).
    Resubscribed,
}

/// Where the broker delivers subscribed messages (drained by the hub's dispatcher).
pub type InboundSender = mpsc::UnboundedSender<Inbound>;

/// What to do when a stream already holds as many messages as it may.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenFull {
    /// Drop the oldest (room history).
    Trim,
    /// Refuse the new one with `BrokerError::Full` (inboxes: confirmed DMs are never evicted).
    Refuse,
}

/// A message to keep under a topic and publish to its subscribers. Made by `room_message`
/// or `direct_message`; the backends render it with `Post::payload` / `Post::stored`.
#[derive(Debug, Clone)]
pub struct Post {
    pub topic: Topic,
    /// The sender's user id: a dedup id is remembered per topic and sender.
    pub sender: String,
    /// The sender's clientMsgId (or an API idempotency key); `None` when it gave none.
    pub dedup_id: Option<String>,
    /// Messages the topic's stream keeps.
    pub max_len: u64,
    pub when_full: WhenFull,
    /// Only for a user who logged in (with proof) within the history TTL
    /// (`BrokerError::UnknownRecipient`).
    pub recipient_must_exist: bool,
    /// Envelope header text around the id the broker assigns: `BEFORE id AFTER`.
    header_before: String,
    header_after: String,
    /// The frame after the id; rooms' frames carry the room's count and `tail` after it.
    body: String,
    tail: String,
}

impl Post {
    /// A chat message into a room's history (trimmed to `max_len`), published with the room's
    /// count as `num`.
    pub fn room_message(
        room_key: &str,
        sender: &str,
        dedup_id: Option<&str>,
        header: &EnvelopeHeader,
        template: crate::protocol::MessageTemplate,
        max_len: u64,
    ) -> Post {
        let (header_before, header_after) = header.split_at_id();
        Post {
            topic: Topic::Room(room_key.to_string()),
            sender: sender.to_string(),
            dedup_id: dedup_id.map(str::to_string),
            max_len,
            when_full: WhenFull::Trim,
            recipient_must_exist: false,
            header_before,
            header_after,
            body: template.body,
            tail: template.tail,
        }
    }

    /// A direct message into `to`'s inbox. `body`: the frame after the id
    /// (`protocol::dm_rest`). A full inbox refuses rather than evicting confirmed DMs;
    /// `require_seen`: only for a user who logged in (with proof) within the history TTL.
    #[allow(clippy::too_many_arguments)]
    pub fn direct_message(
        to: &str,
        sender: &str,
        dedup_id: Option<&str>,
        header: &EnvelopeHeader,
        body: String,
        max_len: u64,
        require_seen: bool,
    ) -> Post {
        let (header_before, header_after) = header.split_at_id();
        Post {
            topic: Topic::User(to.to_string()),
            sender: sender.to_string(),
            dedup_id: dedup_id.map(str::to_string),
            max_len,
            when_full: WhenFull::Refuse,
            recipient_must_exist: require_seen,
            header_before,
            header_after,
            body,
            tail: String::new(),
        }
    }

    /// Bytes of client text this post holds (what a sender's pending posts are bounded by).
    pub fn len(&self) -> usize {
        self.body.len()
    }

    pub fn is_empty(&self) -> bool {
        self.body.is_empty()
    }

    /// Whether the stored frame ends with the room's count (then `tail`).
    fn counted(&self) -> bool {
        matches!(self.topic, Topic::Room(_))
    }

    /// What the stream keeps after the id: the frame's rest, with `num` for a room.
    fn stored(&self, num: u64) -> String {
        if self.counted() {
            format!("{}{num}{}", self.body, self.tail)
        } else {
            self.body.clone()
        }
    }

    /// The envelope published for the stored entry `id` with rest `stored`.
    fn payload(&self, id: StreamId, stored: &str) -> String {
        format!(
            "{}{id}{}{}{id}{stored}",
            self.header_before,
            self.header_after,
            self.topic.frame_head()
        )
    }
}

/// What an append did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    pub id: StreamId,
    /// False when the clientMsgId was seen before: `id` is the original message's.
    pub created: bool,
}

/// One connection's presence in one room.
#[derive(Debug, Clone, PartialEq)]
pub struct PresenceEntry {
    pub room_key: String,
    /// `node:incarnation:connection`, unique in the cluster and across restarts.
    pub conn_key: String,
    pub user_id: String,
    /// `"userId":…,"userName":…`
    pub user_fragment: String,
    /// The room id as JSON, as this connection wrote it.
    pub room_json: String,
    /// The room's name (the first joiner's while anyone is in the room; configured for
    /// default rooms).
    pub room_name: String,
}

impl PresenceEntry {
    /// `"roomId":…,"roomName":…`
    pub fn room_fragment(&self) -> String {
        format!(
            r#""roomId":{},"roomName":{}"#,
            self.room_json,
            crate::protocol::json_string(&self.room_name)
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinOutcome {
    /// This was the user's first connection in the room.
    pub first: bool,
    pub num: u64,
    /// The login was broadcast to the room (first connection, and the room is small enough).
    pub announced: bool,
    /// The room's name in effect (the first joiner's while the room is live).
    pub room_name: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaveOutcome {
    /// This was the user's last connection in the room: its logout was broadcast.
    pub last: bool,
    pub num: u64,
}

/// A page of a stream.
#[derive(Debug, Clone, Default)]
pub struct Page {
    /// `(id, frame)` in id order; frames are complete client frames.
    pub entries: Vec<(StreamId, String)>,
    /// Entries after the requested position were trimmed away before they could be read
    /// (the history is incomplete for this reader).
    pub truncated: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RoomSummary {
    pub room_key: String,
    /// `"roomId":…,"roomName":…` as last announced.
    pub room_fragment: String,
    pub num: u64,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct MemberPage {
    pub num: u64,
    /// `(userId, user fragment)`
    pub members: Vec<(String, String)>,
    pub next_cursor: Option<String>,
}

/// A user's acknowledged position in a topic's stream (a room's history, or its own inbox).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    pub user: String,
    pub topic: Topic,
    pub id: StreamId,
}

/// The broker in use.
#[derive(Clone)]
pub enum Broker {
    Memory(Arc<memory::MemoryBroker>),
    Redis(Arc<redis::RedisBroker>),
}

macro_rules! dispatch {
    ($self:ident . $method:ident ( $($arg:expr),* )) => {
        match $self {
            Broker::Memory(b) => b.$method($($arg),*).await,
            Broker::Redis(b) => b.$method($($arg),*).await,
        }
    };
}

impl Broker {
    /// The backend's name, for logs and metrics.
    pub fn backend(&self) -> &'static str {
        match self {
            Broker::Memory(b) => b.name(),
            Broker::Redis(b) => b.name(),
        }
    }

    /// True while the broker is reachable (drives `/readyz`).
    pub fn is_up(&self) -> bool {
        match self {
            Broker::Memory(b) => b.is_up(),
            Broker::Redis(b) => b.is_up(),
        }
    }

    /// Subscribes this node to `topic`; returns once messages on it will be received.
    pub async fn subscribe(&self, topic: &Topic) -> Result<(), BrokerError> {
        dispatch!(self.subscribe(topic))
    }

    pub async fn unsubscribe(&self, topic: &Topic) -> Result<(), BrokerError> {
        dispatch!(self.unsubscribe(topic))
    }

    /// Keeps `post` under its topic (with a new id, or the original's for a repeated dedup
    /// id) and publishes it, in one step.
    pub async fn append(&self, post: &Post) -> Result<Appended, BrokerError> {
        dispatch!(self.append(post))
    }

    /// Appends in one round trip, stored in the order given (a connection's chat messages):
    /// each is stored or refused on its own, and none is retried behind a later one.
    pub async fn append_all(&self, posts: &[Post]) -> Vec<Result<Appended, BrokerError>> {
        dispatch!(self.append_all(posts))
    }

    /// Records the entry and, if it is the user's first connection in the room (and the room
    /// is no bigger than the announce limit), publishes `announce_header` + the login frame
    /// on the room. `prune_expired`: first remove the room's entries whose expiry passed (and
    /// announce those logouts) — false while the caller pauses pruning (after a broker outage
    /// every node's entries may have expired without their nodes being dead).
    pub async fn join(
        &self,
        entry: &PresenceEntry,
        announce_header: &str,
        expires_at_ms: u64,
        prune_expired: bool,
    ) -> Result<JoinOutcome, BrokerError> {
        dispatch!(self.join(entry, announce_header, expires_at_ms, prune_expired))
    }

    /// Removes the entry and, if it was the user's last connection in the room, publishes
    /// the logout on the room.
    pub async fn leave(
        &self,
        entry: &PresenceEntry,
        announce_header: &str,
    ) -> Result<LeaveOutcome, BrokerError> {
        dispatch!(self.leave(entry, announce_header))
    }

    /// Pushes the expiry of live entries forward, re-creating any that vanished (a flushed or
    /// restarted Redis, or pruned while this node was stalled) and announcing the login of
    /// each user who was absent. Returns how many were re-created.
    pub async fn refresh(
        &self,
        entries: &[PresenceEntry],
        expires_at_ms: u64,
        announce_header: &str,
    ) -> Result<u64, BrokerError> {
        dispatch!(self.refresh(entries, expires_at_ms, announce_header))
    }

    /// Removes entries whose expiry passed (their node died) and announces each departed
    /// user's logout once, whichever node prunes. Returns how many entries were removed.
    pub async fn prune(&self, now_ms: u64, announce_header: &str) -> Result<u64, BrokerError> {
        dispatch!(self.prune(now_ms, announce_header))
    }

    /// Up to `limit` messages of a topic after `after` (exclusive), as client frames.
    pub async fn range(
        &self,
        topic: &Topic,
        after: StreamId,
        limit: usize,
    ) -> Result<Page, BrokerError> {
        if after == StreamId::MAX {
            return Ok(Page::default()); // nothing can follow the largest id
        }
        dispatch!(self.range(topic, after, limit))
    }

    /// The id of a topic's newest message (`None` when it has none).
    pub async fn newest_id(&self, topic: &Topic) -> Result<Option<StreamId>, BrokerError> {
        dispatch!(self.newest_id(topic))
    }

    /// Marks `user` as seen for `ttl_ms` (a proven login): direct messages that require a
    /// known recipient are accepted for it until then.
    pub async fn mark_seen(&self, user: &str, ttl_ms: u64) -> Result<(), BrokerError> {
        dispatch!(self.mark_seen(user, ttl_ms))
    }

    /// Removes each user's inbox messages up to and including the id (read and acknowledged
    /// by their owner).
    pub async fn trim_inboxes(&self, read: &[(String, StreamId)]) -> Result<(), BrokerError> {
        dispatch!(self.trim_inboxes(read))
    }

    /// Stores acknowledged positions (they expire with the history).
    pub async fn save_positions(&self, positions: &[Position]) -> Result<(), BrokerError> {
        dispatch!(self.save_positions(positions))
    }

    /// A user's stored position in a topic: `None` when none is stored, an error when the
    /// broker could not tell.
    pub async fn load_position(
        &self,
        user: &str,
        topic: &Topic,
    ) -> Result<Option<StreamId>, BrokerError> {
        dispatch!(self.load_position(user, topic))
    }

    /// Up to `limit` rooms with someone present, the most populated first (ties by room key).
    pub async fn rooms(&self, limit: usize) -> Result<Vec<RoomSummary>, BrokerError> {
        dispatch!(self.rooms(limit))
    }

    pub async fn room_count(&self, room_key: &str) -> Result<u64, BrokerError> {
        dispatch!(self.room_count(room_key))
    }

    /// A page of a room's users. `cursor`: a previous page's `next_cursor`; anything else is
    /// `BrokerError::BadCursor`. Every user present throughout a listing is on at least one
    /// of its pages, each user at most once per page.
    pub async fn members(
        &self,
        room_key: &str,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<MemberPage, BrokerError> {
        dispatch!(self.members(room_key, cursor, limit))
    }

    /// Publishes `payload` (an envelope) on a topic without storing anything: control
    /// messages such as the server API's disconnect.
    pub async fn publish(&self, topic: &Topic, payload: &str) -> Result<(), BrokerError> {
        dispatch!(self.publish_control(topic, payload))
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Microseconds since the Unix epoch.
pub fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}
