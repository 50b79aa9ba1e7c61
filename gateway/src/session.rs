//! One WebSocket connection: reads client frames and answers them, writes the deliveries the
//! hub queues for it (batched into few socket writes), enforces the heartbeat timeout, tracks
//! acks and redelivers, replays history on resume, and leaves its rooms when it ends.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures_util::SinkExt;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::broker::keys::{ack_field_room, ACK_FIELD_INBOX};
use crate::broker::{now_ms, now_us, AppendRequest, EnvelopeHeader, Kind, PresenceEntry};
use crate::delivery::{Redelivery, StreamCursor};
use crate::hub::{Delivery, Member};
use crate::node::{ConnectionSlot, Node};
use crate::protocol::{
    self, parse_client_frame, ClientFrame, ErrorCode, FrameError, Login, RoomId, StreamId, Target,
};

/// A write that cannot complete in this time means the client stopped reading.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Frames written per socket flush when a backlog is drained.
const WRITE_BATCH: usize = 64;

/// Why and how a connection ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Close {
    /// Close code sent to the client; `None` when the socket is already gone.
    pub code: Option<u16>,
    pub text: &'static str,
    /// Label of `gateway_connections_closed_total`.
    pub reason: &'static str,
}

impl Close {
    const CLIENT: Close = Close {
        code: None,
        text: "",
        reason: "client_close",
    };
    const BROKEN: Close = Close {
        code: None,
        text: "",
        reason: "error",
    };
    pub const SHUTDOWN: Close = Close {
        code: Some(1012),
        text: "service restart",
        reason: "shutdown",
    };
    const HEARTBEAT: Close = Close {
        code: Some(4000),
        text: "heartbeat timeout",
        reason: "heartbeat_timeout",
    };
    const SLOW: Close = Close {
        code: Some(4008),
        text: "slow consumer",
        reason: "slow_consumer",
    };
    const REDELIVERY_LIMIT: Close = Close {
        code: Some(4009),
        text: "redelivery limit reached",
        reason: "redelivery_limit",
    };
    /// The server API disconnected the user (`POST /v1/users/{userId}/disconnect`).
    const API_DISCONNECT: Close = Close {
        code: Some(4010),
        text: "disconnected by the server",
        reason: "api_disconnect",
    };
    const TOO_BIG: Close = Close {
        code: Some(1009),
        text: "message too big",
        reason: "message_too_big",
    };
}

struct Identity {
    user_id: String,
    user_name: String,
    user_fragment: String,
}

struct JoinedRoom {
    room: RoomId,
    channel: Arc<str>,
    fragment: String,
    cursor: StreamCursor,
}

struct Inbox {
    channel: Arc<str>,
    cursor: StreamCursor,
}

struct Session {
    node: Arc<Node>,
    conn_id: u64,
    conn_key: String,
    member: Member,
    identity: Option<Identity>,
    ack_mode: bool,
    rooms: Vec<JoinedRoom>,
    inbox: Option<Inbox>,
    unacked_limit: usize,
}

/// Serves one upgraded connection until it ends.
pub async fn run(slot: ConnectionSlot, socket: WebSocket) {
    let span = tracing::info_span!("connection", node = %slot.node.node_id, conn = slot.conn_id);
    serve(slot, socket).instrument(span).await
}

async fn serve(slot: ConnectionSlot, mut socket: WebSocket) {
    let node = slot.node.clone();
    let conn_id = slot.conn_id;
    let (outbox, mut queue) = mpsc::channel(node.config.outbound_queue as usize);
    let slow = CancellationToken::new();
    let mut session = Session {
        conn_key: format!("{}:{conn_id}", node.node_id),
        member: Member {
            conn_id,
            outbox,
            slow: slow.clone(),
        },
        identity: None,
        ack_mode: false,
        rooms: Vec::new(),
        inbox: None,
        unacked_limit: 2 * node.config.outbound_queue.max(node.config.sync_max) as usize,
        node: node.clone(),
        conn_id,
    };
    let heartbeat = node.config.heartbeat_timeout();
    let idle = tokio::time::sleep(heartbeat);
    tokio::pin!(idle);
    let ack_check_every = (node.config.ack_timeout() / 4).max(Duration::from_millis(10));
    let mut ack_check = tokio::time::interval(ack_check_every);

    let close = loop {
        let check_acks = session.ack_mode && session.has_unacked();
        let step = tokio::select! {
            biased;
            _ = node.shutdown.cancelled() => Err(Close::SHUTDOWN),
            _ = slow.cancelled() => Err(Close::SLOW),
            _ = &mut idle => Err(Close::HEARTBEAT),
            incoming = socket.recv() => {
                idle.as_mut().reset(Instant::now() + heartbeat);
                match incoming {
                    // Boxed: frame handling is the deepest future here, and keeping it out of
                    // the connection's state machine keeps idle connections small.
                    Some(Ok(Message::Text(text))) => {
                        Box::pin(session.handle_text(&mut socket, &text)).await
                    }
                    Some(Ok(Message::Binary(_))) => {
                        let err = FrameError::new(
                            ErrorCode::BinaryFrame,
                            "binary frames are not supported; send JSON text frames",
                        );
                        Box::pin(session.send_error(&mut socket, err)).await
                    }
                    // Pings are answered by the WebSocket layer; both count as signs of life.
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => Ok(()),
                    Some(Ok(Message::Close(_))) | None => Err(Close::CLIENT),
                    Some(Err(e)) => Err(classify_read_error(&e)),
                }
            }
            Some(delivery) = queue.recv() => session.deliver(&mut socket, delivery, &mut queue).await,
            _ = ack_check.tick(), if check_acks => Box::pin(session.redeliver(&mut socket)).await,
        };
        if let Err(close) = step {
            break close;
        }
    };

    if let Some(code) = close.code {
        if close == Close::SLOW {
            node.metrics.slow_consumer_disconnects.inc();
        }
        let frame = CloseFrame {
            code,
            reason: Utf8Bytes::from_static(close.text),
        };
        let _ = tokio::time::timeout(
            Duration::from_secs(1),
            socket.send(Message::Close(Some(frame))),
        )
        .await;
    }
    node.metrics
        .connections_closed
        .with_label_values(&[close.reason])
        .inc();
    drop(socket);
    Box::pin(session.leave_everything()).await;
    drop(slot);
}

fn classify_read_error(e: &axum::Error) -> Close {
    let text = e.to_string();
    if text.contains("too long") || text.contains("too big") || text.contains("Space limit") {
        Close::TOO_BIG
    } else {
        Close::BROKEN
    }
}

async fn write(socket: &mut WebSocket, frame: impl Into<Utf8Bytes>) -> Result<(), Close> {
    match tokio::time::timeout(WRITE_TIMEOUT, socket.send(Message::Text(frame.into()))).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(Close::BROKEN),
        Err(_) => Err(Close::SLOW),
    }
}

async fn feed(socket: &mut WebSocket, frame: Utf8Bytes) -> Result<(), Close> {
    match tokio::time::timeout(WRITE_TIMEOUT, socket.feed(Message::Text(frame))).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(Close::BROKEN),
        Err(_) => Err(Close::SLOW),
    }
}

async fn flush(socket: &mut WebSocket) -> Result<(), Close> {
    match tokio::time::timeout(WRITE_TIMEOUT, socket.flush()).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(Close::BROKEN),
        Err(_) => Err(Close::SLOW),
    }
}

impl Session {
    fn has_unacked(&self) -> bool {
        self.rooms.iter().any(|r| !r.cursor.unacked.is_empty())
            || self
                .inbox
                .as_ref()
                .is_some_and(|i| !i.cursor.unacked.is_empty())
    }

    fn room_index(&self, room: &RoomId) -> Option<usize> {
        self.rooms.iter().position(|r| r.room.key == room.key)
    }

    async fn send_error(&mut self, socket: &mut WebSocket, err: FrameError) -> Result<(), Close> {
        self.node
            .metrics
            .errors
            .with_label_values(&[err.code.as_str()])
            .inc();
        write(socket, err.encode()).await
    }

    async fn handle_text(&mut self, socket: &mut WebSocket, text: &str) -> Result<(), Close> {
        let frame = match parse_client_frame(text) {
            Ok(frame) => frame,
            Err(err) => return self.send_error(socket, err).await,
        };
        let result = match frame {
            ClientFrame::Ping => return write(socket, protocol::PONG).await,
            ClientFrame::Login(login) => {
                let span = tracing::info_span!("login", room = %login.room.key);
                self.login(socket, login).instrument(span).await
            }
            ClientFrame::Logout { room } => self.logout(socket, room).await,
            ClientFrame::Chat {
                room,
                content,
                client_msg_id,
            } => {
                let span = tracing::info_span!("publish", room = %room.key);
                self.chat(socket, room, content, client_msg_id)
                    .instrument(span)
                    .await
            }
            ClientFrame::Ack { target, id } => self.ack(target, id),
            ClientFrame::Sync {
                target,
                since,
                limit,
            } => self.sync(socket, target, since, limit).await,
            ClientFrame::Dm {
                to_user_id,
                content,
                client_msg_id,
            } => {
                let span = tracing::info_span!("publish_dm");
                self.dm(socket, to_user_id, content, client_msg_id)
                    .instrument(span)
                    .await
            }
        };
        match result {
            Ok(Ok(())) => Ok(()),
            Ok(Err(err)) => self.send_error(socket, err).await,
            Err(close) => Err(close),
        }
    }

    fn unavailable(&self, what: &str) -> FrameError {
        FrameError::new(
            ErrorCode::Unavailable,
            format!("{what} failed: the message broker is unreachable; try again"),
        )
    }

    /// Joins a room (and, on the first login, establishes identity and the inbox).
    async fn login(
        &mut self,
        socket: &mut WebSocket,
        login: Login,
    ) -> Result<Result<(), FrameError>, Close> {
        let room = login.room.clone();
        if let Some(identity) = &self.identity {
            if login
                .user_id
                .as_deref()
                .is_some_and(|u| u != identity.user_id)
            {
                return Ok(Err(FrameError::new(
                    ErrorCode::IdentityMismatch,
                    format!(
                        "this connection is logged in as {:?}; open another connection for another user",
                        identity.user_id
                    ),
                )
                .in_room(&room)));
            }
        } else if let Err(err) = self.establish_identity(socket, &login).await? {
            return Ok(Err(err.in_room(&room)));
        }
        self.ack_mode |= login.ack;
        let identity = self.identity.as_ref().expect("identity established");

        if let Some(index) = self.room_index(&room) {
            // Already in the room: answer with the current count, change nothing.
            let joined = &self.rooms[index];
            let num = match self.node.broker.room_count(&room.key).await {
                Ok(num) => num,
                Err(_) => return Ok(Err(self.unavailable("login").in_room(&room))),
            };
            let frame = protocol::login_frame(&identity.user_fragment, &joined.fragment, num);
            write(socket, frame).await?;
            return Ok(Ok(()));
        }
        if self.rooms.len() >= self.node.config.max_rooms_per_connection as usize {
            return Ok(Err(FrameError::new(
                ErrorCode::TooManyRooms,
                format!(
                    "a connection may be in at most {} rooms",
                    self.node.config.max_rooms_per_connection
                ),
            )
            .in_room(&room)));
        }

        let room_name = login.room_name.clone().unwrap_or_else(|| room.key.clone());
        let fragment = protocol::room_fragment(&room, &room_name);
        let channel_name = self.node.broker.keys().room_channel(&room.key);
        let channel = match self.node.hub.join(&channel_name, self.member.clone()).await {
            Ok(channel) => channel,
            Err(_) => return Ok(Err(self.unavailable("login").in_room(&room))),
        };
        let entry = PresenceEntry {
            room_key: room.key.clone(),
            conn_key: self.conn_key.clone(),
            user_id: identity.user_id.clone(),
            user_fragment: identity.user_fragment.clone(),
            room_fragment: fragment.clone(),
        };
        let user_fragment = identity.user_fragment.clone();
        let user_id = identity.user_id.clone();
        self.rooms.push(JoinedRoom {
            room: room.clone(),
            channel,
            fragment: fragment.clone(),
            cursor: StreamCursor::default(),
        });
        let outcome = match self
            .node
            .presence
            .join(self.conn_id, entry, &channel_name)
            .await
        {
            Ok(outcome) => outcome,
            Err(_) => {
                self.rooms.pop();
                self.node.hub.leave(&channel_name, self.conn_id).await;
                return Ok(Err(self.unavailable("login").in_room(&room)));
            }
        };
        if !outcome.announced {
            // The user was already present (another tab), or the room is too big for
            // broadcasts: only this connection hears it.
            write(
                socket,
                protocol::login_frame(&user_fragment, &fragment, outcome.num),
            )
            .await?;
        }

        let resume_from = match login.last_id {
            Some(id) => Some(id),
            None if self.ack_mode => self
                .node
                .broker
                .load_ack(
                    &self.node.broker.keys().acks(&user_id),
                    &ack_field_room(&room.key),
                )
                .await
                .unwrap_or(None),
            None => None,
        };
        if let Some(after) = resume_from {
            let limit = self.node.config.sync_max;
            return self
                .replay(socket, Target::Room(room), after, limit as usize)
                .await;
        }
        if self.ack_mode {
            // Nothing to resume: give the client its starting point, so that a reconnect
            // before the first message still resumes without a gap.
            let stream = self.node.broker.keys().room_stream(&room.key);
            let Ok(newest) = self.node.broker.newest_id(&stream).await else {
                return Ok(Err(self.unavailable("login").in_room(&room)));
            };
            let target = Target::Room(room);
            let start = newest.unwrap_or(StreamId::ZERO);
            write(
                socket,
                protocol::synced_frame(&target, start, 0, false, false),
            )
            .await?;
        }
        Ok(Ok(()))
    }

    /// First login: fixes the connection's user and subscribes its inbox.
    async fn establish_identity(
        &mut self,
        socket: &mut WebSocket,
        login: &Login,
    ) -> Result<Result<(), FrameError>, Close> {
        let user_id = login
            .user_id
            .clone()
            .unwrap_or_else(|| format!("guest-{}", self.conn_key.replace(':', "-")));
        let user_name = login.user_name.clone().unwrap_or_else(|| user_id.clone());
        let channel_name = self.node.broker.keys().user_channel(&user_id);
        let channel = match self.node.hub.join(&channel_name, self.member.clone()).await {
            Ok(channel) => channel,
            Err(_) => return Ok(Err(self.unavailable("login"))),
        };
        self.identity = Some(Identity {
            user_fragment: protocol::user_fragment(&user_id, &user_name),
            user_id: user_id.clone(),
            user_name,
        });
        self.inbox = Some(Inbox {
            channel,
            cursor: StreamCursor::default(),
        });
        if login.ack {
            // Everything in the inbox after the stored position is unacknowledged.
            let keys = self.node.broker.keys();
            let after = self
                .node
                .broker
                .load_ack(&keys.acks(&user_id), ACK_FIELD_INBOX)
                .await
                .unwrap_or(None)
                .unwrap_or(StreamId::ZERO);
            self.ack_mode = true;
            let limit = self.node.config.sync_max as usize;
            if let Err(err) = self.replay(socket, Target::Inbox, after, limit).await? {
                tracing::debug!("inbox replay at login failed: {err}");
            }
        }
        Ok(Ok(()))
    }

    async fn logout(
        &mut self,
        socket: &mut WebSocket,
        room: RoomId,
    ) -> Result<Result<(), FrameError>, Close> {
        let Some(index) = self.room_index(&room) else {
            return Ok(Err(not_in_room(&room)));
        };
        let joined = self.rooms.remove(index);
        let num = self.leave_room(&joined).await;
        if let Some(identity) = &self.identity {
            let frame = protocol::logout_frame(&identity.user_fragment, &joined.fragment, num);
            write(socket, frame).await?;
        }
        Ok(Ok(()))
    }

    /// Leaves one room: stops local delivery, then removes presence (announcing the logout if
    /// this was the user's last connection there). Returns the room's new count.
    async fn leave_room(&self, joined: &JoinedRoom) -> u64 {
        self.node.hub.leave(&joined.channel, self.conn_id).await;
        match self
            .node
            .presence
            .leave(self.conn_id, &joined.room.key, &joined.channel)
            .await
        {
            Ok(outcome) => outcome.num,
            Err(e) => {
                // The entry is no longer refreshed: it expires and a live node announces it.
                tracing::warn!(room = %joined.room.key, "leave failed, presence will expire: {e}");
                0
            }
        }
    }

    async fn leave_everything(&mut self) {
        for joined in std::mem::take(&mut self.rooms) {
            self.leave_room(&joined).await;
        }
        if let Some(inbox) = self.inbox.take() {
            self.node.hub.leave(&inbox.channel, self.conn_id).await;
        }
    }

    async fn chat(
        &mut self,
        socket: &mut WebSocket,
        room: RoomId,
        content: String,
        client_msg_id: Option<String>,
    ) -> Result<Result<(), FrameError>, Close> {
        self.node.metrics.messages_received.inc();
        let cmid = client_msg_id.as_deref();
        let Some(identity) = &self.identity else {
            return Ok(Err(not_logged_in().in_room(&room).with_client_msg_id(cmid)));
        };
        let Some(index) = self.room_index(&room) else {
            return Ok(Err(not_in_room(&room).with_client_msg_id(cmid)));
        };
        let joined = &self.rooms[index];
        let keys = self.node.broker.keys();
        let (header_before, header_after) = self.header(Kind::Message).split_at_id();
        let template = protocol::message_template(
            &joined.fragment,
            &identity.user_fragment,
            &content,
            now_ms(),
            cmid,
        );
        let request = AppendRequest {
            stream_key: keys.room_stream(&room.key),
            channel: joined.channel.to_string(),
            dedup_key: cmid.map(|c| keys.room_dedup(&room.key, &identity.user_id, c)),
            count_room: Some(room.key.clone()),
            header_before,
            header_after,
            frame_head: protocol::MESSAGE_HEAD,
            body: template.body,
            tail: template.tail,
        };
        match self.node.broker.append(&request).await {
            Ok(appended) if appended.created => {
                self.node.metrics.messages_published.inc();
                Ok(Ok(()))
            }
            Ok(appended) => {
                self.node.metrics.dedup_hits.inc();
                let frame = protocol::sent_frame(&room, appended.id, cmid.unwrap_or_default());
                write(socket, frame).await?;
                Ok(Ok(()))
            }
            Err(_) => Ok(Err(self
                .unavailable("sending")
                .in_room(&room)
                .with_client_msg_id(cmid))),
        }
    }

    async fn dm(
        &mut self,
        socket: &mut WebSocket,
        to_user_id: String,
        content: String,
        client_msg_id: Option<String>,
    ) -> Result<Result<(), FrameError>, Close> {
        self.node.metrics.messages_received.inc();
        let cmid = client_msg_id.as_deref();
        let Some(identity) = &self.identity else {
            return Ok(Err(not_logged_in().with_client_msg_id(cmid)));
        };
        let keys = self.node.broker.keys();
        let (header_before, header_after) = self.header(Kind::Direct).split_at_id();
        let request = AppendRequest {
            stream_key: keys.inbox_stream(&to_user_id),
            channel: keys.user_channel(&to_user_id),
            dedup_key: cmid.map(|c| keys.inbox_dedup(&to_user_id, &identity.user_id, c)),
            count_room: None,
            header_before,
            header_after,
            frame_head: protocol::DM_HEAD,
            body: protocol::dm_rest(
                &identity.user_id,
                &identity.user_name,
                &to_user_id,
                &content,
                now_ms(),
                cmid,
            ),
            tail: String::new(),
        };
        match self.node.broker.append(&request).await {
            Ok(appended) => {
                if appended.created {
                    self.node.metrics.messages_published.inc();
                } else {
                    self.node.metrics.dedup_hits.inc();
                }
                let frame =
                    protocol::dm_sent_frame(appended.id, &to_user_id, cmid, !appended.created);
                write(socket, frame).await?;
                Ok(Ok(()))
            }
            Err(_) => Ok(Err(self.unavailable("sending").with_client_msg_id(cmid))),
        }
    }

    fn header(&self, kind: Kind) -> EnvelopeHeader {
        EnvelopeHeader {
            kind,
            published_us: now_us(),
            origin: self.node.node_id.clone(),
            traceparent: crate::telemetry::current_traceparent(),
        }
    }

    fn ack(&mut self, target: Target, id: StreamId) -> Result<Result<(), FrameError>, Close> {
        let Some(identity) = &self.identity else {
            return Ok(Err(not_logged_in()));
        };
        if !self.ack_mode {
            return Ok(Err(FrameError::new(
                ErrorCode::AcksDisabled,
                "log in with \"ack\": true to acknowledge messages",
            )));
        }
        let keys = self.node.broker.keys();
        let (cursor, field) = match &target {
            Target::Room(room) => match self.room_index(room) {
                Some(i) => (&mut self.rooms[i].cursor, ack_field_room(&room.key)),
                None => return Ok(Err(not_in_room(room))),
            },
            Target::Inbox => match self.inbox.as_mut() {
                Some(inbox) => (&mut inbox.cursor, ACK_FIELD_INBOX.to_string()),
                None => return Ok(Err(not_logged_in())),
            },
        };
        cursor.ack(id);
        self.node.metrics.acks.inc();
        self.node
            .acks
            .record(keys.acks(&identity.user_id), field, id);
        Ok(Ok(()))
    }

    async fn sync(
        &mut self,
        socket: &mut WebSocket,
        target: Target,
        since: Option<StreamId>,
        limit: Option<u32>,
    ) -> Result<Result<(), FrameError>, Close> {
        if self.identity.is_none() {
            return Ok(Err(not_logged_in()));
        }
        if let Target::Room(room) = &target {
            if self.room_index(room).is_none() {
                return Ok(Err(not_in_room(room)));
            }
        }
        let max = self.node.config.sync_max;
        let limit = limit.unwrap_or(max).min(max) as usize;
        self.replay(socket, target, since.unwrap_or(StreamId::ZERO), limit)
            .await
    }

    /// Sends one page of a stream after `after`, then `synced`. While the page is full
    /// (`more`), live messages of that stream are left to the following pages.
    async fn replay(
        &mut self,
        socket: &mut WebSocket,
        target: Target,
        after: StreamId,
        limit: usize,
    ) -> Result<Result<(), FrameError>, Close> {
        let keys = self.node.broker.keys();
        let (stream_key, head) = match &target {
            Target::Room(room) => (keys.room_stream(&room.key), protocol::MESSAGE_HEAD),
            Target::Inbox => {
                let Some(identity) = &self.identity else {
                    return Ok(Err(not_logged_in()));
                };
                (keys.inbox_stream(&identity.user_id), protocol::DM_HEAD)
            }
        };
        // One extra entry tells whether another page follows.
        let mut page = match self
            .node
            .broker
            .range(&stream_key, head, after, limit + 1)
            .await
        {
            Ok(page) => page,
            Err(_) => {
                let err = self.unavailable("sync");
                return Ok(Err(match &target {
                    Target::Room(room) => err.in_room(room),
                    Target::Inbox => err,
                }));
            }
        };
        let more = page.entries.len() > limit;
        page.entries.truncate(limit);
        let ack_mode = self.ack_mode;
        let now = std::time::Instant::now();
        let unacked_limit = self.unacked_limit;
        let cursor = match &target {
            Target::Room(room) => {
                let Some(i) = self.room_index(room) else {
                    return Ok(Err(not_in_room(room)));
                };
                &mut self.rooms[i].cursor
            }
            Target::Inbox => match self.inbox.as_mut() {
                Some(inbox) => &mut inbox.cursor,
                None => return Ok(Err(not_logged_in())),
            },
        };
        let count = page.entries.len();
        let mut last = after;
        for (id, frame) in page.entries {
            let frame = Utf8Bytes::from(frame);
            if ack_mode {
                cursor.track(id, frame.clone(), now);
            }
            cursor.replayed(id);
            last = id;
            feed(socket, frame).await?;
        }
        cursor.paging = more;
        if cursor.unacked.len() > unacked_limit {
            return Err(Close::SLOW);
        }
        let synced = protocol::synced_frame(&target, last, count, page.truncated, more);
        feed(socket, Utf8Bytes::from(synced)).await?;
        flush(socket).await?;
        self.node.metrics.sync_replays.inc();
        self.node.metrics.sync_messages.inc_by(count as u64);
        Ok(Ok(()))
    }

    /// Writes a delivery and whatever else is queued (up to a batch) with one flush.
    async fn deliver(
        &mut self,
        socket: &mut WebSocket,
        first: Arc<Delivery>,
        queue: &mut mpsc::Receiver<Arc<Delivery>>,
    ) -> Result<(), Close> {
        let mut next = Some(first);
        let mut taken = 0;
        let mut written = 0u64;
        let now_us = now_us();
        while let Some(delivery) = next {
            taken += 1;
            if let Some(frame) = self.accept(&delivery)? {
                feed(socket, frame).await?;
                written += 1;
                let latency_us = now_us.saturating_sub(delivery.published_us);
                self.node
                    .metrics
                    .fanout_latency
                    .observe(latency_us as f64 / 1e6);
            }
            next = if taken < WRITE_BATCH {
                queue.try_recv().ok()
            } else {
                None
            };
        }
        if written > 0 {
            flush(socket).await?;
            self.node.metrics.messages_delivered.inc_by(written);
        }
        Ok(())
    }

    /// Decides whether a delivery is written to this client (and tracks it for acks).
    fn accept(&mut self, delivery: &Delivery) -> Result<Option<Utf8Bytes>, Close> {
        let cursor = match delivery.kind {
            Kind::Presence => return Ok(Some(delivery.frame.clone())),
            Kind::Control => return Err(Close::API_DISCONNECT),
            Kind::Message => self
                .rooms
                .iter_mut()
                .find(|r| {
                    Arc::ptr_eq(&r.channel, &delivery.channel) || *r.channel == *delivery.channel
                })
                .map(|r| &mut r.cursor),
            Kind::Direct => self.inbox.as_mut().map(|i| &mut i.cursor),
        };
        let (Some(cursor), Some(id)) = (cursor, delivery.id) else {
            return Ok(None); // left the room meanwhile
        };
        if !cursor.accept_live(id) {
            return Ok(None);
        }
        if self.ack_mode {
            cursor.track(id, delivery.frame.clone(), std::time::Instant::now());
            if cursor.unacked.len() > self.unacked_limit {
                return Err(Close::SLOW);
            }
        }
        Ok(Some(delivery.frame.clone()))
    }

    /// Sends again every message whose ack is overdue.
    async fn redeliver(&mut self, socket: &mut WebSocket) -> Result<(), Close> {
        let now = std::time::Instant::now();
        let timeout = self.node.config.ack_timeout();
        let max = self.node.config.max_redeliveries;
        let mut frames = Vec::new();
        let cursors = self
            .rooms
            .iter_mut()
            .map(|r| &mut r.cursor)
            .chain(self.inbox.as_mut().map(|i| &mut i.cursor));
        for cursor in cursors {
            match cursor.due(now, timeout, max) {
                Redelivery::Resend(mut due) => frames.append(&mut due),
                Redelivery::LimitReached => return Err(Close::REDELIVERY_LIMIT),
            }
        }
        if frames.is_empty() {
            return Ok(());
        }
        self.node.metrics.redeliveries.inc_by(frames.len() as u64);
        for frame in frames {
            feed(socket, frame).await?;
        }
        flush(socket).await
    }
}

fn not_logged_in() -> FrameError {
    FrameError::new(ErrorCode::NotLoggedIn, "send a login frame first")
}

fn not_in_room(room: &RoomId) -> FrameError {
    FrameError::new(
        ErrorCode::NotInRoom,
        format!("join room {} with a login first", room.key),
    )
    .in_room(room)
}
