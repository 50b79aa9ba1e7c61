//! One WebSocket connection: reads client frames and answers them, enforces the heartbeat
//! timeout, tracks acks and redelivers, replays history on resume, and leaves its rooms when it
//! ends. Live deliveries do not pass through it: the hub's dispatcher writes them into the
//! socket through the connection's [`Link`], held back only while the session writes itself.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tracing::Instrument;
use tungstenite::Utf8Bytes;

pub use crate::websocket::WebSocket;
use crate::websocket::{Message, ReadError};

mod appends;
mod link;

use appends::{AppendDone, Appends, Queued, ReplyTo};
pub use link::{Link, LinkState};

use crate::auth::{AuthError, Claims};
use crate::broker::{
    now_ms, now_us, BrokerError, EnvelopeHeader, Kind, Post, PresenceEntry, Topic,
};
use crate::delivery::Redelivery;
use crate::hub::{ChannelStream, JoinError, Member};
use crate::limits::{CountGuard, Limited, TokenBucket};
use crate::node::{ConnectionSlot, Node};
use crate::outlet::Outlet;
use crate::protocol::{
    self, parse_client_frame, ClientFrame, ErrorCode, FrameError, Login, RoomId, StreamId, Target,
    GUEST_PREFIX,
};

/// A write that cannot complete in this time means the client stopped reading.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

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
    const TOKEN_EXPIRED: Close = Close {
        code: Some(4001),
        text: "token expired",
        reason: "token_expired",
    };
    const LOGIN_TIMEOUT: Close = Close {
        code: Some(4002),
        text: "no login in time",
        reason: "login_timeout",
    };
    const RATE_LIMITED: Close = Close {
        code: Some(4029),
        text: "rate limit exceeded",
        reason: "rate_limited",
    };
    const PROTOCOL: Close = Close {
        code: Some(1002),
        text: "protocol error",
        reason: "protocol_error",
    };
    const BAD_UTF8: Close = Close {
        code: Some(1007),
        text: "invalid UTF-8",
        reason: "invalid_utf8",
    };
}

/// What one connection may ask for per second, and how it has been doing.
struct Budgets {
    frames: TokenBucket,
    syncs: TokenBucket,
    joins: TokenBucket,
    dms: TokenBucket,
    /// Bytes of history replayed (spent as they are read; a replay waits when in debt).
    replay_bytes: TokenBucket,
    /// Frames refused in the current one-second window, and when it started.
    refused: u32,
    window_start: std::time::Instant,
    /// Frames refused per window before the connection is closed.
    close_after: u32,
}

/// The verdict on one incoming frame.
enum Admission {
    Accept,
    /// Refused; `warn`: the first refusal of its window, answered with an error frame.
    Refuse {
        warn: bool,
    },
    Close,
}

impl Budgets {
    fn new(config: &crate::config::Config) -> Budgets {
        let per_sec = |rate: u32| TokenBucket::new(rate as f64, 4.0 * rate as f64);
        Budgets {
            frames: TokenBucket::new(config.max_frames_per_sec as f64, config.frame_burst as f64),
            syncs: per_sec(config.max_syncs_per_sec),
            joins: per_sec(config.max_joins_per_sec),
            dms: per_sec(config.max_dms_per_sec),
            replay_bytes: TokenBucket::new(
                config.max_replay_bytes_per_sec as f64,
                2.0 * config.max_replay_bytes_per_sec as f64,
            ),
            refused: 0,
            window_start: std::time::Instant::now(),
            close_after: config.max_frames_per_sec,
        }
    }

    /// A client over its rate has its frames refused (one error frame per second); one that
    /// keeps sending as many refused frames in a second as its whole rate is closed.
    fn admit_frame(&mut self) -> Admission {
        let now = std::time::Instant::now();
        if self.frames.take(now) {
            return Admission::Accept;
        }
        if now.duration_since(self.window_start) >= Duration::from_secs(1) {
            self.window_start = now;
            self.refused = 0;
        }
        self.refused += 1;
        if self.refused >= self.close_after {
            Admission::Close
        } else {
            Admission::Refuse {
                warn: self.refused == 1,
            }
        }
    }
}

struct Identity {
    user_id: String,
    user_name: String,
    user_fragment: String,
    /// Proven by a token (private data allowed), as opposed to self-asserted.
    proven: bool,
    /// The gateway named this connection (it logged in without a userId).
    guest: bool,
}

/// A room the connection is in (its stream cursor is in the link, where the dispatcher
/// reads it).
struct JoinedRoom {
    room: RoomId,
    channel: Arc<Topic>,
    fragment: String,
}

struct Inbox {
    channel: Arc<Topic>,
}

/// Why handling a frame stopped before it was done.
#[derive(Debug)]
enum Stop {
    /// Refused: the client gets this `error` frame and the connection goes on.
    Refused(FrameError),
    /// The connection closes with this code.
    Close(Close),
}

impl From<FrameError> for Stop {
    fn from(err: FrameError) -> Stop {
        Stop::Refused(err)
    }
}

impl From<Close> for Stop {
    fn from(close: Close) -> Stop {
        Stop::Close(close)
    }
}

impl Stop {
    /// Names the room in a refusal (a close is about the connection, not a room).
    fn in_room(self, room: &RoomId) -> Stop {
        match self {
            Stop::Refused(err) => Stop::Refused(err.in_room(room)),
            close => close,
        }
    }
}

/// What handling one frame came to.
type Handled = Result<(), Stop>;

/// Chat messages one connection may have on their way into the broker at once. They go in
/// batches (see `appends`) and are answered in the order they were sent; with this many
/// unanswered the session stops reading the socket until a batch is answered.
const APPENDS_IN_FLIGHT: usize = 32;

/// Bytes of chat messages one connection may have on their way into the broker (the socket is
/// read again once fewer are): with a frozen broker, every connection's in-flight messages are
/// held in memory, so they are bounded in bytes as well as in number.
const APPEND_BYTES_IN_FLIGHT: usize = 128 * 1024;

/// How long a closing connection waits for its chat messages in flight to be stored.
const DRAIN_APPENDS: Duration = Duration::from_secs(5);

struct Session {
    node: Arc<Node>,
    conn_id: u64,
    conn_key: String,
    member: Member,
    identity: Option<Identity>,
    rooms: Vec<JoinedRoom>,
    inbox: Option<Inbox>,
    /// What the connection's token proves (authentication configured). Boxed: anonymous
    /// connections, the many, never have one.
    claims: Option<Box<Claims>>,
    /// When the connection must close unless its token is refreshed.
    expires_at: Option<Instant>,
    /// The `userId` JSON of a guest's latest chat frame, put back on its own copies.
    echo_user_id: Option<String>,
    budgets: Budgets,
    /// Its place in a per-node connection limit.
    place: Place,
    /// Bytes of its chat messages on their way into the broker.
    append_bytes: usize,
}

/// A connection's place in a per-node connection limit (held, released when dropped): one at
/// a time.
enum Place {
    /// Among its address's connections not logged in yet (none when the address is unknown).
    PendingLogin {
        _address: Option<CountGuard<IpAddr>>,
    },
    /// Logged in: among its user's connections.
    User { _user: CountGuard<String> },
}

/// One connection while it lives: its session, its WebSocket, its chat messages on their way
/// into the broker. Boxed, so the connection's task holds little more than a pointer: an async
/// fn keeps its arguments apart from its locals, so state passed down by value through the
/// task's layers would be held once per layer, for the connection's whole life.
pub struct Connection {
    session: Session,
    socket: WebSocket,
    appends: Appends,
    clock: Clock,
    /// The connection's span: its events are handled in it.
    span: tracing::Span,
    /// The client's address, for its strikes when closed for abuse.
    client: Option<IpAddr>,
    /// Its place among its address's connections on this node.
    _address_slot: Option<CountGuard<IpAddr>>,
    /// Its place among the node's connections (released last).
    _slot: ConnectionSlot,
}

impl Connection {
    /// An upgraded connection; `claims` come from a token on the upgrade request;
    /// `pending_login`: its place among the address's connections not logged in yet.
    pub fn new(
        slot: ConnectionSlot,
        socket: WebSocket,
        claims: Option<Claims>,
        client: Option<IpAddr>,
        address_slot: Option<CountGuard<IpAddr>>,
        pending_login: Option<CountGuard<IpAddr>>,
    ) -> Box<Connection> {
        let outlet = socket.outlet().clone();
        let mut session = Session::new(slot.node.clone(), slot.conn_id, pending_login, outlet);
        if let Some(claims) = claims {
            session.set_claims(claims);
        }
        let appends = Appends::new(slot.node.broker.clone());
        let mut clock = Clock::new(&slot.node.config);
        clock.follow(&session);
        let span =
            tracing::info_span!("connection", node = %slot.node.node_id, conn = slot.conn_id);
        Box::new(Connection {
            session,
            socket,
            appends,
            clock,
            span,
            client,
            _address_slot: address_slot,
            _slot: slot,
        })
    }

    /// Serves the connection until it ends.
    pub async fn run(mut self: Box<Self>) {
        let close = serve(&mut self).await;
        if let (Some(ip), true) = (
            self.client,
            close == Close::RATE_LIMITED || close == Close::SLOW,
        ) {
            self.session.node.strikes.strike(ip);
        }
    }
}

async fn serve(connection: &mut Connection) -> Close {
    let Connection {
        session,
        socket,
        appends,
        clock,
        span,
        ..
    } = connection;
    let node = session.node.clone();
    let link = session.member.link.clone();
    let outlet = socket.outlet().clone();
    // One timer for the heartbeat, the login and the token's expiry. Moved later lazily: when
    // it fires early, it is set again.
    let timer = tokio::time::sleep_until(clock.next_due());
    tokio::pin!(timer);

    // Everything the loop does besides waiting is in `handle`, boxed: inline, the handlers'
    // futures would be part of every connection's task for its whole life.
    //
    // The connection's chat messages in flight are answered in order; the socket is read on
    // while they wait. Deliveries never wait for this loop: the dispatcher writes them.
    let close = loop {
        // In ack mode the timer runs whether or not anything is unacknowledged now: the
        // dispatcher tracks deliveries without waking this loop.
        if clock.ack_check.is_none() && session.ack_mode() {
            let every = (node.config.ack_timeout() / 4).max(Duration::from_millis(10));
            clock.ack_check = Some(tokio::time::interval(every));
        }
        let reading =
            appends.len() < APPENDS_IN_FLIGHT && session.append_bytes < APPEND_BYTES_IN_FLIGHT;
        let event = tokio::select! {
            biased;
            _ = node.shutdown.cancelled() => break Close::SHUTDOWN,
            close = std::future::poll_fn(|cx| link.poll_doomed(cx)) => break close,
            _ = &mut timer => match clock.expired() {
                Some(close) => break close,
                None => {
                    timer.as_mut().reset(clock.next_due());
                    continue;
                }
            },
            // Before reading on: polling the appends is what sends them to the broker.
            done = appends.next_batch(), if !appends.is_empty() => Event::Appended(done),
            incoming = socket.next(), if reading => {
                clock.idle_due = Instant::now() + node.config.heartbeat_timeout();
                Event::Incoming(incoming)
            }
            // Deliveries the kernel did not take at once go out as the client reads.
            written = outlet.drained_backlog() => match written {
                Ok(()) => continue,
                Err(_) => break Close::BROKEN,
            },
            _ = tick(clock.ack_check.as_mut()) => Event::AckDue,
        };
        let step = Box::pin(handle(session, &link, socket, appends, event));
        if let Err(close) = step.instrument(span.clone()).await {
            break close;
        }
        // A token may have moved the deadline earlier; later ones wait for the timer.
        clock.follow(session);
        let due = clock.next_due();
        if due < timer.deadline() {
            timer.as_mut().reset(due);
        }
    };
    // Boxed: the close's work (draining appends, leaving every room through the broker) is the
    // biggest future of all.
    let finish = Box::pin(session.finish(socket, close, appends));
    finish.instrument(span.clone()).await
}

/// When a connection must close unless something happens: kept with the connection rather
/// than in its task (a task's size is rounded up to 128 bytes).
struct Clock {
    /// Without a frame from the client until then, it is gone (heartbeat timeout).
    idle_due: Instant,
    /// Not logged in by then, it is closed (`None` once logged in).
    login_due: Option<Instant>,
    /// The token's expiry, once a token sets one.
    expires_at: Option<Instant>,
    /// Started when ack mode is: most connections never need it.
    ack_check: Option<tokio::time::Interval>,
}

impl Clock {
    fn new(config: &crate::config::Config) -> Clock {
        let now = Instant::now();
        Clock {
            idle_due: now + config.heartbeat_timeout(),
            login_due: Some(now + config.login_timeout()),
            expires_at: None,
            ack_check: None,
        }
    }

    /// Takes in what the session changed: its login, its token's expiry.
    fn follow(&mut self, session: &Session) {
        if session.identity.is_some() {
            self.login_due = None;
        }
        self.expires_at = session.expires_at;
    }

    /// The earliest moment something may have expired.
    fn next_due(&self) -> Instant {
        [self.login_due, self.expires_at]
            .into_iter()
            .flatten()
            .fold(self.idle_due, Instant::min)
    }

    /// What expired by now, if anything.
    fn expired(&self) -> Option<Close> {
        let now = Instant::now();
        if now >= self.idle_due {
            Some(Close::HEARTBEAT)
        } else if self.login_due.is_some_and(|due| now >= due) {
            Some(Close::LOGIN_TIMEOUT)
        } else if self.expires_at.is_some_and(|expiry| now >= expiry) {
            Some(Close::TOKEN_EXPIRED)
        } else {
            None
        }
    }
}

/// What woke a connection's task, besides the ends of the connection.
enum Event {
    Appended(Vec<AppendDone>),
    Incoming(Option<Result<Message, ReadError>>),
    AckDue,
}

/// Handles one event with the link held (deliveries wait behind the session's own frames),
/// then flushes those frames into the outlet and lets the held deliveries follow them.
async fn handle(
    session: &mut Session,
    link: &Link,
    socket: &mut WebSocket,
    appends: &mut Appends,
    event: Event,
) -> Result<(), Close> {
    link.hold();
    let step = match event {
        Event::Appended(done) => session.answer_appends(socket, done).await,
        Event::Incoming(incoming) => session.on_incoming(socket, incoming, appends).await,
        Event::AckDue => session.redeliver(socket).await,
    };
    let flushed = match step {
        Ok(()) => flush(socket).await,
        Err(close) => Err(close),
    };
    let released = link.release();
    flushed.and(released)
}

/// The next tick of the ack timer, if it runs.
async fn tick(timer: Option<&mut tokio::time::Interval>) {
    match timer {
        Some(timer) => {
            timer.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// The close for a failed read: what the client broke.
fn classify_read_error(e: ReadError) -> Close {
    match e {
        ReadError::TooBig(_) => Close::TOO_BIG,
        ReadError::BadUtf8 => Close::BAD_UTF8,
        ReadError::Protocol(_) => Close::PROTOCOL,
        // A client that just went away (no closing handshake) broke nothing.
        ReadError::Reset | ReadError::Io(_) => Close::BROKEN,
    }
}

async fn write(socket: &mut WebSocket, frame: impl AsRef<[u8]>) -> Result<(), Close> {
    socket.feed(frame.as_ref());
    flush(socket).await
}

async fn feed(socket: &mut WebSocket, frame: Utf8Bytes) -> Result<(), Close> {
    socket.feed(frame.as_bytes());
    Ok(())
}

async fn flush(socket: &mut WebSocket) -> Result<(), Close> {
    match tokio::time::timeout(WRITE_TIMEOUT, socket.flush()).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(Close::BROKEN),
        Err(_) => Err(Close::SLOW),
    }
}

impl Session {
    /// A session for a new connection, writing through `outlet`.
    fn new(
        node: Arc<Node>,
        conn_id: u64,
        pending_login: Option<CountGuard<std::net::IpAddr>>,
        outlet: Arc<Outlet>,
    ) -> Session {
        let config = &node.config;
        let state = LinkState::new(
            2 * config.outbound_queue.max(config.sync_max) as usize,
            // Room for a replay page of ordinary messages and a burst of live traffic.
            8 * (1 << 20).max(config.max_message_bytes) as usize,
        );
        let link = Link::new(
            conn_id,
            outlet,
            node.metrics.clone(),
            config.outbound_queue as usize,
            state,
        );
        Session {
            conn_key: format!("{}:{}:{conn_id}", node.node_id, node.incarnation),
            member: Member {
                conn_id,
                link: Arc::new(link),
            },
            identity: None,
            rooms: Vec::new(),
            inbox: None,
            budgets: Budgets::new(&node.config),
            node,
            conn_id,
            claims: None,
            expires_at: None,
            echo_user_id: None,
            place: Place::PendingLogin {
                _address: pending_login,
            },
            append_bytes: 0,
        }
    }

    fn link(&self) -> &Link {
        &self.member.link
    }

    /// Whether deliveries are tracked until acknowledged (the link holds the switch: the
    /// dispatcher reads it).
    fn ack_mode(&self) -> bool {
        self.link().state().ack_mode
    }

    fn enable_ack_mode(&self) {
        self.link().state().ack_mode = true;
    }

    /// Tells the link how this connection's deliveries are written: which identity may read
    /// direct messages, what a guest's own messages say.
    fn update_link_rules(&self) {
        let mut state = self.link().state();
        state.proven = self.identity.as_ref().is_some_and(|i| i.proven);
        state.echo = match (&self.echo_user_id, &self.identity) {
            (Some(echo), Some(identity)) => Some((
                format!(r#","userId":{},"#, protocol::json_string(&identity.user_id)),
                format!(r#","userId":{echo},"#),
            )),
            _ => None,
        };
    }

    /// One read from the socket: a frame within the frame budget is handled, beyond it
    /// refused; a close, a read error or the end of the stream ends the connection.
    async fn on_incoming(
        &mut self,
        socket: &mut WebSocket,
        incoming: Option<Result<Message, ReadError>>,
        appends: &mut Appends,
    ) -> Result<(), Close> {
        let admission = match &incoming {
            Some(Ok(Message::Close)) | Some(Err(_)) | None => Admission::Accept,
            Some(Ok(_)) => self.budgets.admit_frame(),
        };
        match incoming {
            Some(Ok(_)) if !matches!(admission, Admission::Accept) => {
                self.refuse_frame(socket, admission).await
            }
            Some(Ok(Message::Text(text))) => self.handle_text(socket, &text, appends).await,
            Some(Ok(Message::Binary(_))) => {
                let err = FrameError::new(
                    ErrorCode::BinaryFrame,
                    "binary frames are not supported; send JSON text frames",
                );
                self.send_error(socket, err).await
            }
            // Pings are answered by the WebSocket; both count as signs of life.
            Some(Ok(Message::Ping | Message::Pong)) => Ok(()),
            Some(Ok(Message::Close)) | None => Err(Close::CLIENT),
            Some(Err(e)) => Err(classify_read_error(e)),
        }
    }

    /// Ends the connection: stores the chat messages still in flight, sends the close frame,
    /// counts the close, then leaves every room (announcing the logouts). Returns the close.
    async fn finish(
        &mut self,
        socket: &mut WebSocket,
        close: Close,
        appends: &mut Appends,
    ) -> Close {
        // Chat messages read before the close still go into the broker: their rooms are owed
        // them even if their sender is gone (it cannot be answered any more).
        let drained = tokio::time::timeout(DRAIN_APPENDS, async {
            while !appends.is_empty() {
                for done in appends.next_batch().await {
                    self.append_bytes -= done.reply.bytes;
                    self.count_append(&done.result);
                }
            }
        });
        if drained.await.is_err() {
            tracing::warn!("chat messages still in flight at the close were given up");
        }
        // Nothing is delivered after the close frame.
        self.link().end(close);
        let metrics = &self.node.metrics;
        if let Some(code) = close.code {
            if close == Close::SLOW {
                metrics.slow_consumer_disconnects.inc();
            }
            let closing = socket.close(code, close.text);
            let _ = tokio::time::timeout(Duration::from_secs(1), closing).await;
        }
        metrics
            .connections_closed
            .with_label_values(&[close.reason])
            .inc();
        Box::pin(self.leave_everything()).await;
        close
    }

    fn room_index(&self, room: &RoomId) -> Option<usize> {
        self.rooms.iter().position(|r| r.room.key == room.key)
    }

    /// Answers a frame refused by the rate limit (or closes a client that keeps flooding).
    async fn refuse_frame(
        &mut self,
        socket: &mut WebSocket,
        admission: Admission,
    ) -> Result<(), Close> {
        self.count_limited(Limited::Frames);
        match admission {
            Admission::Close => Err(Close::RATE_LIMITED),
            Admission::Refuse { warn: true } => {
                let err = self.rate_limited(Limited::Frames);
                self.send_error(socket, err).await
            }
            _ => Ok(()),
        }
    }

    fn count_limited(&self, what: Limited) {
        self.node
            .metrics
            .rate_limited
            .with_label_values(&[what.as_str()])
            .inc();
    }

    /// Takes a token for `what`; `Err` with the error frame when the budget is spent.
    fn budget(&mut self, what: Limited) -> Result<(), FrameError> {
        let now = std::time::Instant::now();
        let bucket = match what {
            Limited::Frames => &mut self.budgets.frames,
            Limited::Sync => &mut self.budgets.syncs,
            Limited::Join => &mut self.budgets.joins,
            Limited::Dm => &mut self.budgets.dms,
        };
        if bucket.take(now) {
            return Ok(());
        }
        self.count_limited(what);
        Err(self.rate_limited(what))
    }

    fn rate_limited(&self, what: Limited) -> FrameError {
        let config = &self.node.config;
        let rate = match what {
            Limited::Frames => config.max_frames_per_sec,
            Limited::Sync => config.max_syncs_per_sec,
            Limited::Join => config.max_joins_per_sec,
            Limited::Dm => config.max_dms_per_sec,
        };
        FrameError {
            reason: Some(what.as_str()),
            ..FrameError::new(
                ErrorCode::RateLimited,
                format!(
                    "too many {} frames: at most {rate} per second; this one was not processed",
                    what.as_str()
                ),
            )
        }
    }

    async fn send_error(&mut self, socket: &mut WebSocket, err: FrameError) -> Result<(), Close> {
        self.node
            .metrics
            .errors
            .with_label_values(&[err.code.as_str()])
            .inc();
        write(socket, err.encode()).await
    }

    async fn handle_text(
        &mut self,
        socket: &mut WebSocket,
        text: &str,
        appends: &mut Appends,
    ) -> Result<(), Close> {
        let frame = match parse_client_frame(text) {
            Ok(frame) => frame,
            Err(err) => return self.send_error(socket, err).await,
        };
        // Chat messages are pipelined; anything else but a ping waits for them, so that every
        // answer keeps the order of the frames it answers. A ping is answered at once: its
        // `pong` refers to nothing, and a client must not think the connection dead because
        // the broker is slow with its messages.
        if !matches!(frame, ClientFrame::Chat { .. } | ClientFrame::Ping) {
            while !appends.is_empty() {
                let done = appends.next_batch().await;
                self.answer_appends(socket, done).await?;
            }
        }
        // Requests that cost the broker or other clients more than a frame have budgets of
        // their own.
        let budget = match &frame {
            ClientFrame::Login(login) => self
                .budget(Limited::Join)
                .map_err(|e| e.in_room(&login.room)),
            ClientFrame::Logout { room } => self.budget(Limited::Join).map_err(|e| e.in_room(room)),
            // A refresh costs a signature check: it shares the login budget.
            ClientFrame::Refresh { .. } => self.budget(Limited::Join),
            ClientFrame::Sync { .. } => self.budget(Limited::Sync),
            ClientFrame::Dm { client_msg_id, .. } => self
                .budget(Limited::Dm)
                .map_err(|e| e.with_client_msg_id(client_msg_id.as_deref())),
            _ => Ok(()),
        };
        if let Err(err) = budget {
            return self.send_error(socket, err).await;
        }
        let result = match frame {
            ClientFrame::Ping => return write(socket, protocol::PONG).await,
            ClientFrame::Login(login) => {
                let span = tracing::info_span!("login", room = %login.room.key);
                self.login(socket, login).instrument(span).await
            }
            ClientFrame::Logout { room } => self.logout(socket, room).await,
            ClientFrame::Refresh { token } => self.refresh(socket, &token).await,
            ClientFrame::Chat {
                room,
                content,
                client_msg_id,
                echo_user_id,
            } => {
                if self.identity.as_ref().is_some_and(|i| i.guest)
                    && self.echo_user_id != echo_user_id
                {
                    self.echo_user_id = echo_user_id;
                    self.update_link_rules();
                }
                let span = tracing::info_span!("publish", room = %room.key);
                let queued = {
                    let _entered = span.enter();
                    self.start_chat(room, content, client_msg_id)
                };
                queued.map(|mut queued| {
                    queued.reply.span = span;
                    appends.push(queued)
                })
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
            Ok(()) => Ok(()),
            Err(Stop::Refused(err)) => self.send_error(socket, err).await,
            Err(Stop::Close(close)) => Err(close),
        }
    }

    fn unavailable(&self, what: &str) -> FrameError {
        FrameError::new(
            ErrorCode::Unavailable,
            format!("{what} failed: the message broker is unreachable; try again"),
        )
    }

    /// Decides who a login proves: with authentication configured, the token's subject (from
    /// this frame's token, or the connection's); without, whoever the frame says.
    fn authenticate(&mut self, login: &Login) -> Result<Option<Claims>, AuthError> {
        let Some(auth) = &self.node.auth else {
            return Ok(None);
        };
        let claims = match &login.token {
            Some(token) => auth.verify(token)?,
            None => self.claims.as_deref().cloned().ok_or(AuthError::Missing)?,
        };
        if self.current_user().is_some_and(|u| u != claims.user_id)
            || login.user_id.as_ref().is_some_and(|u| *u != claims.user_id)
        {
            return Err(AuthError::UserMismatch);
        }
        if !claims.allows_room(&login.room.key) {
            return Err(AuthError::Room);
        }
        Ok(Some(claims))
    }

    /// The user this connection is (logged in as, or proven by its token so far).
    fn current_user(&self) -> Option<&str> {
        self.identity
            .as_ref()
            .map(|i| i.user_id.as_str())
            .or(self.claims.as_ref().map(|c| c.user_id.as_str()))
    }

    /// Counts a refusal and turns it into its error frame.
    fn refuse(&self, err: AuthError) -> FrameError {
        self.node
            .metrics
            .auth_failures
            .with_label_values(&[err.reason()])
            .inc();
        FrameError::auth(err)
    }

    /// Adopts a verified token: the connection now closes at its expiry.
    fn set_claims(&mut self, claims: Claims) {
        let leeway = self.node.auth.as_ref().map_or(0, |a| a.leeway_secs);
        self.expires_at = Some(Instant::now() + claims.time_left(leeway));
        self.claims = Some(Box::new(claims));
    }

    /// `refresh`: a new token for the same user pushes the connection's expiry forward.
    async fn refresh(&mut self, socket: &mut WebSocket, token: &str) -> Handled {
        let Some(auth) = &self.node.auth else {
            return Err(Stop::Refused(self.refuse(AuthError::Anonymous)));
        };
        let claims = match auth.verify(token) {
            Ok(claims) => claims,
            Err(err) => return Err(Stop::Refused(self.refuse(err))),
        };
        if self.current_user().is_some_and(|u| u != claims.user_id) {
            return Err(Stop::Refused(self.refuse(AuthError::UserMismatch)));
        }
        let expires_at = claims.expires_at;
        self.set_claims(claims);
        write(socket, protocol::refreshed_frame(expires_at)).await?;
        Ok(())
    }

    /// Joins a room (and, on the first login, establishes identity and the inbox), then
    /// resumes it where the client (or its stored position) left off.
    async fn login(&mut self, socket: &mut WebSocket, login: Login) -> Handled {
        let room = login.room.clone();
        self.identify(socket, &login)
            .await
            .map_err(|stop| stop.in_room(&room))?;
        if let Some(index) = self.room_index(&room) {
            // Already in the room: answer with the current count, change nothing.
            return self.answer_count(socket, index).await;
        }
        let max_rooms = self.node.config.max_rooms_per_connection;
        if self.rooms.len() >= max_rooms as usize {
            return Err(Stop::Refused(
                FrameError::new(
                    ErrorCode::TooManyRooms,
                    format!("a connection may be in at most {max_rooms} rooms"),
                )
                .in_room(&room),
            ));
        }
        self.join_room(socket, &login).await?;
        self.resume_room(socket, room, login.last_id).await
    }

    /// Who this login is: checks its credential against the connection's identity, fixes the
    /// identity on the first login, adopts a new token, switches ack mode on if asked.
    async fn identify(&mut self, socket: &mut WebSocket, login: &Login) -> Handled {
        let claims = self.authenticate(login).map_err(|err| self.refuse(err))?;
        match &self.identity {
            Some(identity)
                if login
                    .user_id
                    .as_ref()
                    .is_some_and(|u| *u != identity.user_id) =>
            {
                return Err(Stop::Refused(FrameError::new(
                    ErrorCode::IdentityMismatch,
                    format!(
                        "this connection is logged in as {:?}; open another connection for another user",
                        identity.user_id
                    ),
                )));
            }
            Some(_) => {}
            None => {
                self.establish_identity(socket, login, claims.as_ref())
                    .await?
            }
        }
        if let Some(claims) = claims {
            if login.token.is_some() {
                self.set_claims(claims);
            }
        }
        if login.ack {
            self.enable_ack_mode();
        }
        Ok(())
    }

    /// The `login` answer for a room this connection is in already.
    async fn answer_count(&mut self, socket: &mut WebSocket, index: usize) -> Handled {
        let joined = &self.rooms[index];
        let identity = self.identity.as_ref().expect("identity established");
        let Ok(num) = self.node.broker.room_count(&joined.room.key).await else {
            return Err(Stop::Refused(
                self.unavailable("login").in_room(&joined.room),
            ));
        };
        let frame = protocol::login_frame(&identity.user_fragment, &joined.fragment, num);
        write(socket, frame).await?;
        Ok(())
    }

    /// Listens on the room's channel on this node and enters the room's presence (announced
    /// to the room, or told to this connection alone); undone if presence fails.
    async fn join_room(&mut self, socket: &mut WebSocket, login: &Login) -> Handled {
        let room = &login.room;
        let identity = self.identity.as_ref().expect("identity established");
        // A default room keeps its configured name; any other keeps its first joiner's while
        // anyone is in it (the broker decides): a later joiner cannot rename it.
        let proposed_name = self
            .node
            .default_rooms
            .iter()
            .find(|d| RoomId::parse(&d.room_id).is_ok_and(|r| r.key == room.key))
            .map(|d| d.room_name.clone())
            .or_else(|| login.room_name.clone())
            .unwrap_or_else(|| room.key.clone());
        let channel_name = Topic::Room(room.key.clone());
        let stream = ChannelStream {
            kind: Kind::Message,
            target_json: format!(r#""roomId":{}"#, room.json),
        };
        let joined = self
            .node
            .hub
            .join(&channel_name, self.member.clone(), Some(stream));
        let channel = match joined.await {
            Ok(channel) => channel,
            Err(JoinError::NodeFull) => return Err(Stop::Refused(node_full().in_room(room))),
            Err(JoinError::Broker(_)) => {
                return Err(Stop::Refused(self.unavailable("login").in_room(room)))
            }
        };
        let entry = PresenceEntry {
            room_key: room.key.clone(),
            conn_key: self.conn_key.clone(),
            user_id: identity.user_id.clone(),
            user_fragment: identity.user_fragment.clone(),
            room_json: room.json.clone(),
            room_name: proposed_name,
        };
        let user_fragment = identity.user_fragment.clone();
        let joined = self.node.presence.join(self.conn_id, entry).await;
        let Ok(outcome) = joined else {
            self.node.hub.leave(&channel_name, self.conn_id).await;
            return Err(Stop::Refused(self.unavailable("login").in_room(room)));
        };
        let fragment = protocol::room_fragment(room, &outcome.room_name);
        self.link().state().listen(channel.clone());
        // One at a time: most connections are in one room, and a first growth holds four.
        self.rooms.reserve_exact(1);
        self.rooms.push(JoinedRoom {
            room: room.clone(),
            channel,
            fragment: fragment.clone(),
        });
        if !outcome.announced {
            // The user was already present (another tab), or the room is too big for
            // broadcasts: only this connection hears it.
            write(
                socket,
                protocol::login_frame(&user_fragment, &fragment, outcome.num),
            )
            .await?;
        }
        Ok(())
    }

    /// After a join: replays from the client's `lastId` or, in ack mode, from the user's stored
    /// position; an ack-mode client with nothing to resume gets its starting point.
    async fn resume_room(
        &mut self,
        socket: &mut WebSocket,
        room: RoomId,
        last_id: Option<StreamId>,
    ) -> Handled {
        let identity = self.identity.as_ref().expect("identity established");
        let unavailable =
            |session: &Session| Stop::Refused(session.unavailable("login").in_room(&room));
        // Stored positions belong to proven users only: in anonymous mode anyone could claim
        // a name and move its position.
        let resume_from = match last_id {
            Some(id) => Some(id),
            None if self.ack_mode() && identity.proven => {
                let stored = self
                    .node
                    .broker
                    .load_position(&identity.user_id, &Topic::Room(room.key.clone()))
                    .await;
                stored.map_err(|_| unavailable(self))?
            }
            None => None,
        };
        if let Some(after) = resume_from {
            let limit = self.node.config.sync_max;
            return self
                .replay(socket, Target::Room(room), after, limit as usize)
                .await;
        }
        if self.ack_mode() {
            // Nothing to resume: give the client its starting point, so that a reconnect
            // before the first message still resumes without a gap.
            let topic = Topic::Room(room.key.clone());
            let newest = self.node.broker.newest_id(&topic).await;
            let start = newest
                .map_err(|_| unavailable(self))?
                .unwrap_or(StreamId::ZERO);
            write(
                socket,
                protocol::synced_frame(&Target::Room(room), start, 0, false, false),
            )
            .await?;
        }
        Ok(())
    }

    /// First login: fixes the connection's user and, for a proven user, subscribes its inbox.
    async fn establish_identity(
        &mut self,
        socket: &mut WebSocket,
        login: &Login,
        claims: Option<&Claims>,
    ) -> Handled {
        let (user_id, guest) = match (claims, &login.user_id) {
            (Some(claims), _) => (claims.user_id.clone(), false),
            (None, Some(user_id)) => (user_id.clone(), false),
            // Unguessable and never reused, so nobody can take over a guest's name.
            (None, None) => (
                format!("{GUEST_PREFIX}{:032x}", rand::random::<u128>()),
                true,
            ),
        };
        let user_name = claims
            .and_then(|c| c.user_name.clone())
            .or_else(|| login.user_name.clone())
            .unwrap_or_else(|| user_id.clone());
        let Some(user_slot) = self.node.per_user.acquire(user_id.clone()) else {
            self.node
                .metrics
                .connections_refused
                .with_label_values(&["per_user"])
                .inc();
            return Err(Stop::Refused(FrameError::new(
                ErrorCode::TooManyConnections,
                format!(
                    "this user has {} connections on this node already",
                    self.node.config.max_connections_per_user
                ),
            )));
        };
        let proven = claims.is_some();
        let mut inbox_after = None;
        // Every connection listens on its user's channel (the server API's disconnect comes
        // that way); direct messages on it reach proven users only (see `accept`).
        let channel_name = Topic::User(user_id.clone());
        // A proven user's inbox is read back after a broker reconnect like a room.
        let stream = proven.then(|| ChannelStream {
            kind: Kind::Direct,
            target_json: r#""dm":true"#.to_string(),
        });
        let joined = self
            .node
            .hub
            .join(&channel_name, self.member.clone(), stream);
        let channel = match joined.await {
            Ok(channel) => channel,
            Err(JoinError::NodeFull) => return Err(Stop::Refused(node_full())),
            Err(JoinError::Broker(_)) => return Err(Stop::Refused(self.unavailable("login"))),
        };
        if proven {
            // The user now exists for DMs (for the history TTL after its last login).
            if self
                .node
                .broker
                .mark_seen(&user_id, self.node.config.history_ttl_ms)
                .await
                .is_err()
            {
                self.node.hub.leave(&channel, self.conn_id).await;
                return Err(Stop::Refused(self.unavailable("login")));
            }
            if login.ack {
                // Everything in the inbox after the stored position is unacknowledged.
                match self
                    .node
                    .broker
                    .load_position(&user_id, &channel_name)
                    .await
                {
                    Ok(position) => inbox_after = Some(position.unwrap_or(StreamId::ZERO)),
                    Err(_) => {
                        self.node.hub.leave(&channel, self.conn_id).await;
                        return Err(Stop::Refused(self.unavailable("login")));
                    }
                }
            }
        }
        self.link().state().listen(channel.clone());
        self.inbox = Some(Inbox { channel });
        // Logged in: no longer one of its address's connections waiting for a login.
        self.place = Place::User { _user: user_slot };
        self.identity = Some(Identity {
            user_fragment: protocol::user_fragment(&user_id, &user_name),
            user_id: user_id.clone(),
            user_name,
            proven,
            guest,
        });
        self.update_link_rules();
        if let Some(after) = inbox_after {
            self.enable_ack_mode();
            let limit = self.node.config.sync_max as usize;
            match self.replay(socket, Target::Inbox, after, limit).await {
                Ok(()) => {}
                // The login itself succeeded: the client can sync its inbox later.
                Err(Stop::Refused(err)) => tracing::debug!("inbox replay at login failed: {err}"),
                Err(close) => return Err(close),
            }
        }
        Ok(())
    }

    async fn logout(&mut self, socket: &mut WebSocket, room: RoomId) -> Handled {
        let Some(index) = self.room_index(&room) else {
            return Err(Stop::Refused(not_in_room(&room)));
        };
        let joined = self.rooms.remove(index);
        self.link()
            .state()
            .cursors
            .retain(|(topic, _)| !Arc::ptr_eq(topic, &joined.channel));
        let num = self.leave_room(&joined).await;
        if let Some(identity) = &self.identity {
            let frame = protocol::logout_frame(&identity.user_fragment, &joined.fragment, num);
            write(socket, frame).await?;
        }
        Ok(())
    }

    /// Leaves one room: stops local delivery, then removes presence (announcing the logout if
    /// this was the user's last connection there). Returns the room's new count.
    async fn leave_room(&self, joined: &JoinedRoom) -> u64 {
        self.node.hub.leave(&joined.channel, self.conn_id).await;
        match self
            .node
            .presence
            .leave(self.conn_id, &joined.room.key)
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

    /// Checks a chat message and starts its append; the answer comes from `answer_append`.
    fn start_chat(
        &mut self,
        room: RoomId,
        content: String,
        client_msg_id: Option<String>,
    ) -> Result<Queued, Stop> {
        self.node.metrics.messages_received.inc();
        let cmid = client_msg_id.as_deref();
        let Some(identity) = &self.identity else {
            return Err(Stop::Refused(
                not_logged_in().in_room(&room).with_client_msg_id(cmid),
            ));
        };
        let Some(index) = self.room_index(&room) else {
            return Err(Stop::Refused(not_in_room(&room).with_client_msg_id(cmid)));
        };
        let joined = &self.rooms[index];
        let template = protocol::message_template(
            &joined.fragment,
            &identity.user_fragment,
            &content,
            now_ms(),
            cmid,
        );
        let request = Post::room_message(
            &room.key,
            &identity.user_id,
            cmid,
            &self.header(Kind::Message),
            template,
            self.node.config.history_max_len,
        );
        let bytes = request.len();
        self.append_bytes += bytes;
        Ok(Queued {
            request,
            reply: ReplyTo {
                bytes,
                room,
                client_msg_id,
                span: tracing::Span::none(),
            },
        })
    }

    fn count_append(&self, result: &Result<crate::broker::Appended, BrokerError>) {
        match result {
            Ok(appended) if appended.created => self.node.metrics.messages_published.inc(),
            Ok(_) => self.node.metrics.dedup_hits.inc(),
            Err(_) => {}
        }
    }

    /// Answers a batch of chat messages, in the order they were sent.
    async fn answer_appends(
        &mut self,
        socket: &mut WebSocket,
        batch: Vec<AppendDone>,
    ) -> Result<(), Close> {
        for done in batch {
            self.answer_append(socket, done).await?;
        }
        Ok(())
    }

    /// Answers a chat message once the broker has: nothing when it was stored (the sender gets
    /// its copy like everyone), `sent` when it was a duplicate, an `error` when it failed.
    async fn answer_append(
        &mut self,
        socket: &mut WebSocket,
        done: AppendDone,
    ) -> Result<(), Close> {
        let AppendDone {
            reply:
                ReplyTo {
                    bytes,
                    room,
                    client_msg_id,
                    span: _span,
                },
            result,
        } = done;
        self.append_bytes -= bytes;
        let cmid = client_msg_id.as_deref();
        self.count_append(&result);
        let err = match result {
            Ok(appended) if appended.created => return Ok(()),
            Ok(appended) => {
                let frame = protocol::sent_frame(&room, appended.id, cmid.unwrap_or_default());
                return write(socket, frame).await;
            }
            Err(BrokerError::OutcomeUnknown(_)) => outcome_unknown(),
            Err(_) => self.unavailable("sending"),
        };
        self.send_error(socket, err.in_room(&room).with_client_msg_id(cmid))
            .await
    }

    async fn dm(
        &mut self,
        socket: &mut WebSocket,
        to_user_id: String,
        content: String,
        client_msg_id: Option<String>,
    ) -> Handled {
        self.node.metrics.messages_received.inc();
        let cmid = client_msg_id.as_deref();
        let Some(identity) = &self.identity else {
            return Err(Stop::Refused(not_logged_in().with_client_msg_id(cmid)));
        };
        if !identity.proven {
            return Err(Stop::Refused(
                self.refuse(AuthError::Anonymous).with_client_msg_id(cmid),
            ));
        }
        // A full inbox refuses new DMs rather than evicting confirmed ones (what its owner
        // acknowledged is removed, which makes room again); no inbox for a user who never
        // logged in within the history TTL.
        let body = protocol::dm_rest(
            &identity.user_id,
            &identity.user_name,
            &to_user_id,
            &content,
            now_ms(),
            cmid,
        );
        let request = Post::direct_message(
            &to_user_id,
            &identity.user_id,
            cmid,
            &self.header(Kind::Direct),
            body,
            self.node.config.inbox_max_len,
            true,
        );
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
                Ok(())
            }
            Err(BrokerError::Full) => Err(Stop::Refused(
                FrameError::new(
                    ErrorCode::InboxFull,
                    format!("{to_user_id}'s inbox is full; the message was not sent"),
                )
                .with_client_msg_id(cmid),
            )),
            Err(BrokerError::UnknownRecipient) => Err(Stop::Refused(
                FrameError::new(
                    ErrorCode::UnknownUser,
                    format!("{to_user_id} has not logged in recently; the message was not sent"),
                )
                .with_client_msg_id(cmid),
            )),
            Err(BrokerError::OutcomeUnknown(_)) => {
                Err(Stop::Refused(outcome_unknown().with_client_msg_id(cmid)))
            }
            Err(_) => Err(Stop::Refused(
                self.unavailable("sending").with_client_msg_id(cmid),
            )),
        }
    }

    fn header(&self, kind: Kind) -> EnvelopeHeader {
        EnvelopeHeader {
            kind,
            published_us: now_us(),
            origin: self.node.node_id.clone(),
            sender_conn: Some(self.conn_id),
            traceparent: crate::telemetry::current_traceparent(),
        }
    }

    fn ack(&mut self, target: Target, id: StreamId) -> Handled {
        let Some(identity) = &self.identity else {
            return Err(Stop::Refused(not_logged_in()));
        };
        if !self.ack_mode() {
            return Err(Stop::Refused(FrameError::new(
                ErrorCode::AcksDisabled,
                "log in with \"ack\": true to acknowledge messages",
            )));
        }
        if !identity.proven && target == Target::Inbox {
            return Err(Stop::Refused(self.refuse(AuthError::Anonymous)));
        }
        let user = identity.user_id.clone();
        let proven = identity.proven;
        let topic = match &target {
            Target::Room(room) => match self.room_index(room) {
                Some(_) => Topic::Room(room.key.clone()),
                None => return Err(Stop::Refused(not_in_room(room))),
            },
            Target::Inbox => match self.inbox {
                Some(_) => Topic::User(user.clone()),
                None => return Err(Stop::Refused(not_logged_in())),
            },
        };
        let mut state = self.link().state();
        let Some(cursor) = state.cursor(&topic) else {
            return Err(Stop::Refused(not_logged_in()));
        };
        cursor.ack(id);
        self.node.metrics.acks.inc();
        // A stored position never passes what this connection was sent (so never the stream's
        // newest id), whatever id the client names; anonymous users store none.
        let stored = id.min(cursor.last_delivered);
        drop(state);
        if proven && stored > StreamId::ZERO {
            self.node.acks.record(user.clone(), topic, stored);
            if target == Target::Inbox {
                // Read and acknowledged: the inbox need not keep it (room for new DMs).
                self.node.acks.record_read(user, stored);
            }
        }
        Ok(())
    }

    async fn sync(
        &mut self,
        socket: &mut WebSocket,
        target: Target,
        since: Option<StreamId>,
        limit: Option<u32>,
    ) -> Handled {
        let Some(identity) = &self.identity else {
            return Err(Stop::Refused(not_logged_in()));
        };
        if !identity.proven && target == Target::Inbox {
            return Err(Stop::Refused(self.refuse(AuthError::Anonymous)));
        }
        if let Target::Room(room) = &target {
            if self.room_index(room).is_none() {
                return Err(Stop::Refused(not_in_room(room)));
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
    ) -> Handled {
        let topic = match &target {
            Target::Room(room) => Topic::Room(room.key.clone()),
            Target::Inbox => {
                let Some(identity) = &self.identity else {
                    return Err(Stop::Refused(not_logged_in()));
                };
                Topic::User(identity.user_id.clone())
            }
        };
        let unavailable = |session: &Session| {
            let err = session.unavailable("sync");
            Err(Stop::Refused(match &target {
                Target::Room(room) => err.in_room(room),
                Target::Inbox => err,
            }))
        };
        match &target {
            Target::Room(room) if self.room_index(room).is_none() => {
                return Err(Stop::Refused(not_in_room(room)))
            }
            Target::Inbox if self.inbox.is_none() => return Err(Stop::Refused(not_logged_in())),
            _ => {}
        }
        // The page is read in parts of about GATEWAY_REPLAY_BUFFER_BYTES, each written (and
        // taken by the client) before the next is read: a client that does not read holds at
        // most one part here, never the whole page.
        let config = &self.node.config;
        let buffer = config.replay_buffer_bytes as usize;
        // Sized for the largest messages first, then for the sizes actually read: small chat
        // messages come many per read, big ones few.
        let mut per_read = (buffer / config.max_message_bytes as usize).clamp(1, 1000);
        let mut count = 0;
        let mut last = after;
        let mut truncated = None;
        let more = loop {
            let want = (limit - count).min(per_read);
            if want == 0 {
                // The page is full: one more entry tells whether another page follows.
                match self.node.broker.range(&topic, last, 1).await {
                    Ok(probe) => break !probe.entries.is_empty(),
                    Err(_) => return unavailable(self),
                }
            }
            let part = match self.node.broker.range(&topic, last, want).await {
                Ok(part) => part,
                Err(_) => return unavailable(self),
            };
            truncated.get_or_insert(part.truncated);
            let got = part.entries.len();
            // Replays are the most expensive thing a client can ask of the broker: each
            // connection gets so many bytes per second, whatever number of syncs it sends.
            let bytes: usize = part.entries.iter().map(|(_, f)| f.len()).sum();
            if let Some(average) = bytes.checked_div(got) {
                per_read = (buffer / average.max(1)).clamp(1, 1000);
            }
            let wait = self
                .budgets
                .replay_bytes
                .spend(bytes as f64, std::time::Instant::now());
            if !wait.is_zero() {
                self.count_limited(Limited::Sync);
                tokio::time::sleep(wait).await;
            }
            let now = std::time::Instant::now();
            let ack_mode = self.ack_mode();
            let mut frames = Vec::with_capacity(got);
            {
                let mut state = self.link().state();
                let cursor = state.cursor(&topic).ok_or(Stop::Close(Close::BROKEN))?;
                for (id, frame) in part.entries {
                    let frame = Utf8Bytes::from(frame);
                    if ack_mode {
                        cursor.track(id, frame.clone(), now);
                    }
                    cursor.replayed(id);
                    last = id;
                    frames.push(frame);
                }
                state.check_unacked()?;
            }
            for frame in frames {
                feed(socket, frame).await?;
            }
            count += got;
            flush(socket).await?;
            if got < want {
                break false; // the end of the stream
            }
        };
        if let Some(cursor) = self.link().state().cursor(&topic) {
            cursor.paging = more;
        }
        let synced = protocol::synced_frame(&target, last, count, truncated.unwrap_or(false), more);
        feed(socket, Utf8Bytes::from(synced)).await?;
        flush(socket).await?;
        self.node.metrics.sync_replays.inc();
        self.node.metrics.sync_messages.inc_by(count as u64);
        Ok(())
    }

    /// Sends again every message whose ack is overdue.
    async fn redeliver(&mut self, socket: &mut WebSocket) -> Result<(), Close> {
        let now = std::time::Instant::now();
        let timeout = self.node.config.ack_timeout();
        let max = self.node.config.max_redeliveries;
        let mut frames = Vec::new();
        for (_, cursor) in self.link().state().cursors.iter_mut() {
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

fn outcome_unknown() -> FrameError {
    FrameError::new(
        ErrorCode::OutcomeUnknown,
        "the broker did not answer in time: the message may or may not have been stored; \
         send it again with the same clientMsgId (a retry never duplicates it)",
    )
}

fn node_full() -> FrameError {
    FrameError::new(
        ErrorCode::TooManyRooms,
        "this node is at its limit of rooms; try again later or on another node",
    )
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
