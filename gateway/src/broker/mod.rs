//! The broker: pub/sub between nodes, presence storage, message history and inboxes behind one
//! interface with two implementations — embedded (in-process, single node) and Redis.
//!
//! Everything a client can observe as one step is one broker call (one Redis round trip):
//! appending a message also publishes it, joining a room also announces the login.

pub mod envelope;
pub mod keys;
pub mod memory;
pub mod redis;
pub mod sharded;

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::mpsc;

pub use envelope::{Envelope, EnvelopeHeader, Kind};
pub use keys::Keys;

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
}

/// What the broker hands the hub's dispatcher, in order.
#[derive(Debug, Clone)]
pub enum Inbound {
    /// A message received on a subscribed channel.
    Message { channel: Bytes, payload: Bytes },
    /// The subscriptions were re-established after the connection was lost: whatever was
    /// published meanwhile was not received (the hub reads it back from the streams).
    Resubscribed,
}

/// Where the broker delivers subscribed messages (drained by the hub's dispatcher).
pub type InboundSender = mpsc::UnboundedSender<Inbound>;

/// Append a message to a stream (a room's history or a user's inbox) and publish it.
#[derive(Debug, Clone)]
pub struct AppendRequest {
    pub stream_key: String,
    pub channel: String,
    /// Key remembering a clientMsgId; `None` when the client gave none.
    pub dedup_key: Option<String>,
    /// The room whose online count becomes the frame's `num`; `None` for inboxes.
    pub count_room: Option<String>,
    /// Envelope header text around the id the broker assigns: `BEFORE id AFTER`.
    pub header_before: String,
    pub header_after: String,
    /// Frame head up to the id (`{"event":"message","id":"`).
    pub frame_head: &'static str,
    /// The frame after the id; with `count_room`, the count and `tail` follow it.
    pub body: String,
    pub tail: String,
    /// Entries the stream keeps.
    pub max_len: u64,
    /// When the stream holds `max_len` entries: refuse (`BrokerError::Full`) instead of
    /// trimming the oldest.
    pub refuse_when_full: bool,
    /// A key that must exist for the append to happen (`BrokerError::UnknownRecipient`).
    pub require_key: Option<String>,
}

impl AppendRequest {
    /// A chat message into a room's history (trimmed to `max_len`), published on its channel
    /// with the room's count as `num`. `dedup_id`: the sender's clientMsgId (or an API
    /// idempotency key), remembered per room and sender.
    pub fn room_message(
        keys: &Keys,
        room_key: &str,
        sender: &str,
        dedup_id: Option<&str>,
        header: &EnvelopeHeader,
        template: crate::protocol::MessageTemplate,
        max_len: u64,
    ) -> AppendRequest {
        let (header_before, header_after) = header.split_at_id();
        AppendRequest {
            stream_key: keys.room_stream(room_key),
            channel: keys.room_channel(room_key),
            dedup_key: dedup_id.map(|id| keys.room_dedup(room_key, sender, id)),
            count_room: Some(room_key.to_string()),
            header_before,
            header_after,
            frame_head: crate::protocol::MESSAGE_HEAD,
            body: template.body,
            tail: template.tail,
            max_len,
            refuse_when_full: false,
            require_key: None,
        }
    }

    /// A direct message into `to`'s inbox, published on its user channel. A full inbox
    /// refuses rather than evicting confirmed DMs; `require_seen`: only for a user who logged
    /// in (with proof) within the history TTL.
    #[allow(clippy::too_many_arguments)]
    pub fn direct_message(
        keys: &Keys,
        to: &str,
        sender: &str,
        dedup_id: Option<&str>,
        header: &EnvelopeHeader,
        body: String,
        max_len: u64,
        require_seen: bool,
    ) -> AppendRequest {
        let (header_before, header_after) = header.split_at_id();
        AppendRequest {
            stream_key: keys.inbox_stream(to),
            channel: keys.user_channel(to),
            dedup_key: dedup_id.map(|id| keys.inbox_dedup(to, sender, id)),
            count_room: None,
            header_before,
            header_after,
            frame_head: crate::protocol::DM_HEAD,
            body,
            tail: String::new(),
            max_len,
            refuse_when_full: true,
            require_key: require_seen.then(|| keys.user_seen(to)),
        }
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

    /// The rooms-hash record: `<roomId JSON>\n<roomName JSON>` (JSON text never holds a raw
    /// newline, so the first one separates the two).
    pub fn room_record(&self) -> String {
        format!(
            "{}\n{}",
            self.room_json,
            crate::protocol::json_string(&self.room_name)
        )
    }
}

/// Splits a rooms-hash record into the room fragment `"roomId":…,"roomName":…`.
pub fn room_record_fragment(record: &str) -> Option<String> {
    let (room_json, name_json) = record.split_once('\n')?;
    Some(format!(r#""roomId":{room_json},"roomName":{name_json}"#))
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
    pub fn keys(&self) -> &Keys {
        match self {
            Broker::Memory(b) => &b.keys,
            Broker::Redis(b) => &b.keys,
        }
    }

    /// True while the broker is reachable (drives `/readyz`).
    pub fn is_up(&self) -> bool {
        match self {
            Broker::Memory(_) => true,
            Broker::Redis(b) => b.is_up(),
        }
    }

    pub fn is_embedded(&self) -> bool {
        matches!(self, Broker::Memory(_))
    }

    /// Subscribes this node to `channel`; returns once messages on it will be received.
    pub async fn subscribe(&self, channel: &str) -> Result<(), BrokerError> {
        dispatch!(self.subscribe(channel))
    }

    pub async fn unsubscribe(&self, channel: &str) -> Result<(), BrokerError> {
        dispatch!(self.unsubscribe(channel))
    }

    pub async fn append(&self, req: &AppendRequest) -> Result<Appended, BrokerError> {
        dispatch!(self.append(req))
    }

    /// Appends in one round trip, stored in the order given (a connection's chat messages):
    /// each is stored or refused on its own, and none is retried behind a later one.
    pub async fn append_all(&self, reqs: &[AppendRequest]) -> Vec<Result<Appended, BrokerError>> {
        dispatch!(self.append_all(reqs))
    }

    /// Records the entry and, if it is the user's first connection in the room (and the room
    /// is no bigger than the announce limit), publishes `announce_header` + the login frame.
    pub async fn join(
        &self,
        entry: &PresenceEntry,
        channel: &str,
        announce_header: &str,
        expires_at_ms: u64,
    ) -> Result<JoinOutcome, BrokerError> {
        dispatch!(self.join(entry, channel, announce_header, expires_at_ms))
    }

    pub async fn leave(
        &self,
        entry: &PresenceEntry,
        channel: &str,
        announce_header: &str,
    ) -> Result<LeaveOutcome, BrokerError> {
        dispatch!(self.leave(entry, channel, announce_header))
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
    /// user's logout once. Returns how many entries were removed.
    pub async fn prune(&self, now_ms: u64, announce_header: &str) -> Result<u64, BrokerError> {
        dispatch!(self.prune(now_ms, announce_header))
    }

    /// Up to `limit` entries after `after` (exclusive) of a stream.
    pub async fn range(
        &self,
        stream_key: &str,
        frame_head: &str,
        after: StreamId,
        limit: usize,
    ) -> Result<Page, BrokerError> {
        dispatch!(self.range(stream_key, frame_head, after, limit))
    }

    /// The id of the newest entry of a stream (`None` when it is empty or absent).
    pub async fn newest_id(&self, stream_key: &str) -> Result<Option<StreamId>, BrokerError> {
        dispatch!(self.newest_id(stream_key))
    }

    /// Marks `key` as existing for `ttl_ms` (a user seen at a login).
    pub async fn touch(&self, key: &str, ttl_ms: u64) -> Result<(), BrokerError> {
        dispatch!(self.touch(key, ttl_ms))
    }

    /// Removes the entries up to and including each id from each stream (inboxes read and
    /// acknowledged by their owner).
    pub async fn trim_read(&self, streams: &[(String, StreamId)]) -> Result<(), BrokerError> {
        dispatch!(self.trim_read(streams))
    }

    /// Stores acknowledged positions: `(acks key, field, id)`.
    pub async fn save_acks(&self, acks: &[(String, String, StreamId)]) -> Result<(), BrokerError> {
        dispatch!(self.save_acks(acks))
    }

    pub async fn load_ack(&self, key: &str, field: &str) -> Result<Option<StreamId>, BrokerError> {
        dispatch!(self.load_ack(key, field))
    }

    pub async fn rooms(&self, limit: usize) -> Result<Vec<RoomSummary>, BrokerError> {
        dispatch!(self.rooms(limit))
    }

    pub async fn room_count(&self, room_key: &str) -> Result<u64, BrokerError> {
        dispatch!(self.room_count(room_key))
    }

    pub async fn members(
        &self,
        room_key: &str,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<MemberPage, BrokerError> {
        dispatch!(self.members(room_key, cursor, limit))
    }

    /// Publishes `payload` (an envelope) on `channel` without storing anything: control
    /// messages such as the server API's disconnect.
    pub async fn publish(&self, channel: &str, payload: &str) -> Result<(), BrokerError> {
        dispatch!(self.publish_control(channel, payload))
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
