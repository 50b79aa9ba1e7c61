//! The wire protocol: parsing client frames (with stable error codes for bad input) and encoding
//! server frames. See `docs/protocol.md`.

use std::cmp::Ordering;
use std::fmt;
use std::str::FromStr;

use serde_json::{Map, Value};

/// Longest `userId`, `userName`, `roomId`, `roomName` or `clientMsgId`, in bytes.
pub const MAX_NAME_BYTES: usize = 128;

/// User ids the gateway gives connections that log in without one; no client may claim one.
pub const GUEST_PREFIX: &str = "guest-";

/// Checks an id or name: 1 to 128 bytes, no control characters (they could break a log line,
/// a terminal or a record; JSON escaping alone protects only JSON).
pub fn check_name(s: &str) -> Result<(), &'static str> {
    if s.is_empty() || s.len() > MAX_NAME_BYTES {
        return Err("must be 1 to 128 bytes");
    }
    if s.chars().any(char::is_control) {
        return Err("must not contain control characters");
    }
    Ok(())
}

/// The pong answer, identical for every connection.
pub const PONG: &str = r#"{"event":"heartBeat","content":"pong"}"#;

/// Machine-readable error codes sent in `error` frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    BadJson,
    NotObject,
    BinaryFrame,
    UnknownEvent,
    MissingField,
    InvalidField,
    NotLoggedIn,
    NotInRoom,
    IdentityMismatch,
    TooManyRooms,
    AcksDisabled,
    Unauthorized,
    Forbidden,
    RateLimited,
    TooManyConnections,
    InboxFull,
    UnknownUser,
    OutcomeUnknown,
    Unavailable,
    Internal,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 20] = [
        ErrorCode::BadJson,
        ErrorCode::NotObject,
        ErrorCode::BinaryFrame,
        ErrorCode::UnknownEvent,
        ErrorCode::MissingField,
        ErrorCode::InvalidField,
        ErrorCode::NotLoggedIn,
        ErrorCode::NotInRoom,
        ErrorCode::IdentityMismatch,
        ErrorCode::TooManyRooms,
        ErrorCode::AcksDisabled,
        ErrorCode::Unauthorized,
        ErrorCode::Forbidden,
        ErrorCode::RateLimited,
        ErrorCode::TooManyConnections,
        ErrorCode::InboxFull,
        ErrorCode::UnknownUser,
        ErrorCode::OutcomeUnknown,
        ErrorCode::Unavailable,
        ErrorCode::Internal,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadJson => "bad_json",
            ErrorCode::NotObject => "not_object",
            ErrorCode::BinaryFrame => "binary_frame",
            ErrorCode::UnknownEvent => "unknown_event",
            ErrorCode::MissingField => "missing_field",
            ErrorCode::InvalidField => "invalid_field",
            ErrorCode::NotLoggedIn => "not_logged_in",
            ErrorCode::NotInRoom => "not_in_room",
            ErrorCode::IdentityMismatch => "identity_mismatch",
            ErrorCode::TooManyRooms => "too_many_rooms",
            ErrorCode::AcksDisabled => "acks_disabled",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::TooManyConnections => "too_many_connections",
            ErrorCode::InboxFull => "inbox_full",
            ErrorCode::UnknownUser => "unknown_user",
            ErrorCode::OutcomeUnknown => "outcome_unknown",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
        }
    }
}

/// A frame the client got wrong (or that the server could not carry out).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct FrameError {
    pub code: ErrorCode,
    pub message: String,
    /// `roomId` of the failing frame, as JSON, when it had a valid one.
    pub room_json: Option<String>,
    pub client_msg_id: Option<String>,
    /// The category of an `unauthorized`/`forbidden` refusal (`expired`, `room`, ...).
    pub reason: Option<&'static str>,
}

impl FrameError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> FrameError {
        FrameError {
            code,
            message: message.into(),
            room_json: None,
            client_msg_id: None,
            reason: None,
        }
    }

    /// The frame for an authentication or authorization refusal.
    pub fn auth(err: crate::auth::AuthError) -> FrameError {
        let code = if err.is_unauthorized() {
            ErrorCode::Unauthorized
        } else {
            ErrorCode::Forbidden
        };
        FrameError {
            reason: Some(err.reason()),
            ..FrameError::new(code, err.to_string())
        }
    }

    pub fn in_room(mut self, room: &RoomId) -> FrameError {
        self.room_json = Some(room.json.clone());
        self
    }

    pub fn with_client_msg_id(mut self, id: Option<&str>) -> FrameError {
        self.client_msg_id = id.map(str::to_string);
        self
    }

    /// The `error` frame for this error.
    pub fn encode(&self) -> String {
        let mut out = format!(
            r#"{{"event":"error","code":"{}","message":{}"#,
            self.code.as_str(),
            json_string(&self.message)
        );
        if let Some(reason) = self.reason {
            out.push_str(r#","reason":""#);
            out.push_str(reason);
            out.push('"');
        }
        if let Some(room) = &self.room_json {
            out.push_str(r#","roomId":"#);
            out.push_str(room);
        }
        if let Some(id) = &self.client_msg_id {
            out.push_str(r#","clientMsgId":"#);
            out.push_str(&json_string(id));
        }
        out.push('}');
        out
    }
}

/// A room as named by a client: its identity (`key`, the text form, so `1` and `"1"` are one
/// room) and the JSON the client used (echoed back in frames it causes).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RoomId {
    pub key: String,
    pub json: String,
}

impl RoomId {
    pub fn parse(value: &Value) -> Result<RoomId, FrameError> {
        match value {
            Value::Number(n) if n.is_i64() || n.is_u64() => Ok(RoomId {
                key: n.to_string(),
                json: n.to_string(),
            }),
            Value::String(s) if check_name(s).is_ok() => Ok(RoomId {
                key: s.clone(),
                json: json_string(s),
            }),
            _ => Err(FrameError::new(
                ErrorCode::InvalidField,
                "roomId must be an integer or a string of 1 to 128 bytes without control characters",
            )),
        }
    }

    /// Builds a room id from its text key (as used in HTTP paths and listings): digits make a
    /// number, anything else a string.
    pub fn from_key(key: &str) -> RoomId {
        // The integers `parse` accepts as numbers (i64 and u64) read back as numbers.
        let canonical_int = key.parse::<i64>().is_ok_and(|n| n.to_string() == key)
            || key.parse::<u64>().is_ok_and(|n| n.to_string() == key);
        let json = if canonical_int {
            key.to_string()
        } else {
            json_string(key)
        };
        RoomId {
            key: key.to_string(),
            json,
        }
    }
}

/// A message id: a Redis stream id `ms-seq`. Ordered numerically.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct StreamId {
    pub ms: u64,
    pub seq: u64,
}

impl StreamId {
    pub const ZERO: StreamId = StreamId { ms: 0, seq: 0 };
    pub const MAX: StreamId = StreamId {
        ms: u64::MAX,
        seq: u64::MAX,
    };

    /// The next possible id after this one (`MAX` stays `MAX`).
    pub fn next(self) -> StreamId {
        match self.seq.checked_add(1) {
            Some(seq) => StreamId { ms: self.ms, seq },
            None => StreamId {
                ms: self.ms.saturating_add(1),
                seq: if self.ms == u64::MAX { u64::MAX } else { 0 },
            },
        }
    }
}

impl Ord for StreamId {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.ms, self.seq).cmp(&(other.ms, other.seq))
    }
}

impl PartialOrd for StreamId {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

impl FromStr for StreamId {
    type Err = ();

    fn from_str(s: &str) -> Result<StreamId, ()> {
        let (ms, seq) = match s.split_once('-') {
            Some((ms, seq)) => (ms, seq),
            None => (s, "0"),
        };
        let digits =
            |t: &str| !t.is_empty() && t.len() <= 20 && t.bytes().all(|b| b.is_ascii_digit());
        if !digits(ms) || !digits(seq) {
            return Err(());
        }
        Ok(StreamId {
            ms: ms.parse().map_err(|_| ())?,
            seq: seq.parse().map_err(|_| ())?,
        })
    }
}

/// What an `ack` or `sync` frame refers to.
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    Room(RoomId),
    Inbox,
}

/// A parsed client frame.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientFrame {
    Login(Login),
    Logout {
        room: RoomId,
    },
    Ping,
    Chat {
        room: RoomId,
        content: String,
        client_msg_id: Option<String>,
        /// The frame's own `userId` as JSON (the tutorial's page sends one with every message
        /// and recognises its own copy by it); echoed only to a guest sender's own copy.
        echo_user_id: Option<String>,
    },
    /// A renewed token for the connection's user.
    Refresh {
        token: String,
    },
    Ack {
        target: Target,
        id: StreamId,
    },
    Sync {
        target: Target,
        since: Option<StreamId>,
        limit: Option<u32>,
    },
    Dm {
        to_user_id: String,
        content: String,
        client_msg_id: Option<String>,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Login {
    pub user_id: Option<String>,
    pub user_name: Option<String>,
    pub room: RoomId,
    pub room_name: Option<String>,
    pub ack: bool,
    pub last_id: Option<StreamId>,
    /// A JWT proving the user (required when authentication is configured, unless the
    /// upgrade request carried one).
    pub token: Option<String>,
}

/// Parses one text frame.
pub fn parse_client_frame(text: &str) -> Result<ClientFrame, FrameError> {
    let value: Value = serde_json::from_str(text)
        .map_err(|e| FrameError::new(ErrorCode::BadJson, format!("frame is not JSON: {e}")))?;
    let Value::Object(obj) = value else {
        return Err(FrameError::new(
            ErrorCode::NotObject,
            "frame must be a JSON object",
        ));
    };
    let fields = Fields(&obj);
    let event = fields.opt_str("event")?;
    match event.as_deref() {
        Some("login") => {
            let room = fields.room()?;
            let in_room = |e: FrameError| e.in_room(&room);
            let user_id = fields.opt_name("userId").map_err(in_room)?;
            if user_id
                .as_deref()
                .is_some_and(|u| u.starts_with(GUEST_PREFIX))
            {
                return Err(in_room(FrameError::new(
                    ErrorCode::InvalidField,
                    format!("userId must not start with {GUEST_PREFIX:?} (ids the gateway gives guests)"),
                )));
            }
            Ok(ClientFrame::Login(Login {
                user_id,
                token: fields.opt_token().map_err(in_room)?,
                user_name: fields.opt_name("userName").map_err(in_room)?,
                room_name: fields.opt_name("roomName").map_err(in_room)?,
                ack: fields.opt_bool("ack").map_err(in_room)?.unwrap_or(false),
                last_id: fields.opt_stream_id("lastId").map_err(in_room)?,
                room,
            }))
        }
        Some("logout") => Ok(ClientFrame::Logout {
            room: fields.room()?,
        }),
        Some("heartBeat") => match fields.opt_str("content")?.as_deref() {
            Some("ping") | None => Ok(ClientFrame::Ping),
            Some(_) => Err(FrameError::new(
                ErrorCode::InvalidField,
                r#"heartBeat content must be "ping""#,
            )),
        },
        None | Some("message") => {
            let client_msg_id = fields.opt_name("clientMsgId")?;
            let cmid = client_msg_id.as_deref();
            let room = fields.room().map_err(|e| e.with_client_msg_id(cmid))?;
            let content = fields
                .req_str("content")
                .map_err(|e| e.in_room(&room).with_client_msg_id(cmid))?;
            let echo_user_id = match obj.get("userId") {
                Some(Value::String(s)) if check_name(s).is_ok() => Some(json_string(s)),
                Some(Value::Number(n)) => Some(n.to_string()),
                _ => None,
            };
            Ok(ClientFrame::Chat {
                room,
                content,
                client_msg_id,
                echo_user_id,
            })
        }
        Some("ack") => {
            let target = fields.target()?;
            let id = fields.opt_stream_id("id")?.ok_or_else(|| missing("id"))?;
            Ok(ClientFrame::Ack { target, id })
        }
        Some("sync") => {
            let target = fields.target()?;
            let since = fields.opt_stream_id("since")?;
            let limit = match obj.get("limit") {
                None | Some(Value::Null) => None,
                Some(v) => match v.as_u64() {
                    Some(n) if n >= 1 => Some(n.min(u32::MAX as u64) as u32),
                    _ => {
                        return Err(FrameError::new(
                            ErrorCode::InvalidField,
                            "limit must be a positive integer",
                        ))
                    }
                },
            };
            Ok(ClientFrame::Sync {
                target,
                since,
                limit,
            })
        }
        Some("refresh") => Ok(ClientFrame::Refresh {
            token: fields.opt_token()?.ok_or_else(|| missing("token"))?,
        }),
        Some("dm") => {
            let client_msg_id = fields.opt_name("clientMsgId")?;
            let cmid = client_msg_id.as_deref();
            let to_user_id = fields
                .opt_name("toUserId")
                .and_then(|v| v.ok_or_else(|| missing("toUserId")))
                .map_err(|e| e.with_client_msg_id(cmid))?;
            let content = fields
                .req_str("content")
                .map_err(|e| e.with_client_msg_id(cmid))?;
            Ok(ClientFrame::Dm {
                to_user_id,
                content,
                client_msg_id,
            })
        }
        Some(other) => Err(FrameError::new(
            ErrorCode::UnknownEvent,
            format!("unknown event {:?}", truncate(other, 64)),
        )),
    }
}

fn missing(field: &str) -> FrameError {
    FrameError::new(ErrorCode::MissingField, format!("{field} is required"))
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// Typed access to a frame's fields with protocol errors.
struct Fields<'a>(&'a Map<String, Value>);

impl Fields<'_> {
    fn opt_str(&self, field: &str) -> Result<Option<String>, FrameError> {
        match self.0.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(FrameError::new(
                ErrorCode::InvalidField,
                format!("{field} must be a string"),
            )),
        }
    }

    fn req_str(&self, field: &str) -> Result<String, FrameError> {
        let value = self.opt_str(field)?.ok_or_else(|| missing(field))?;
        if value.is_empty() {
            return Err(FrameError::new(
                ErrorCode::InvalidField,
                format!("{field} must not be empty"),
            ));
        }
        Ok(value)
    }

    /// A short identifier-like string (ids and names): see `check_name`.
    fn opt_name(&self, field: &str) -> Result<Option<String>, FrameError> {
        let value = self.opt_str(field)?;
        if let Some(s) = &value {
            check_name(s).map_err(|problem| {
                FrameError::new(ErrorCode::InvalidField, format!("{field} {problem}"))
            })?;
        }
        Ok(value)
    }

    fn opt_token(&self) -> Result<Option<String>, FrameError> {
        match self.opt_str("token")? {
            Some(t) if t.is_empty() || t.len() > crate::auth::MAX_TOKEN_BYTES => Err(
                FrameError::new(ErrorCode::InvalidField, "token must be 1 to 8192 bytes"),
            ),
            other => Ok(other),
        }
    }

    fn opt_bool(&self, field: &str) -> Result<Option<bool>, FrameError> {
        match self.0.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(FrameError::new(
                ErrorCode::InvalidField,
                format!("{field} must be true or false"),
            )),
        }
    }

    fn opt_stream_id(&self, field: &str) -> Result<Option<StreamId>, FrameError> {
        match self.0.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => s.parse().map(Some).map_err(|_| {
                FrameError::new(
                    ErrorCode::InvalidField,
                    format!("{field} must be a message id like \"1732550000000-0\""),
                )
            }),
            Some(_) => Err(FrameError::new(
                ErrorCode::InvalidField,
                format!("{field} must be a message id string"),
            )),
        }
    }

    fn room(&self) -> Result<RoomId, FrameError> {
        RoomId::parse(self.0.get("roomId").ok_or_else(|| missing("roomId"))?)
    }

    fn target(&self) -> Result<Target, FrameError> {
        if self.opt_bool("dm")?.unwrap_or(false) {
            Ok(Target::Inbox)
        } else {
            Ok(Target::Room(self.room()?))
        }
    }
}

/// JSON string literal for `s`, quotes included.
pub fn json_string(s: &str) -> String {
    serde_json::to_string(s).expect("a string always serializes")
}

/// `"userId":"…","userName":"…"`: a user's part of login/logout frames.
pub fn user_fragment(user_id: &str, user_name: &str) -> String {
    format!(
        r#""userId":{},"userName":{}"#,
        json_string(user_id),
        json_string(user_name)
    )
}

/// `"roomId":…,"roomName":"…"`: a room's part of frames.
pub fn room_fragment(room: &RoomId, room_name: &str) -> String {
    format!(
        r#""roomId":{},"roomName":{}"#,
        room.json,
        json_string(room_name)
    )
}

/// The parts of a `message` frame around the two values only the broker knows (the id it
/// assigns and the online count at that moment): `HEAD id BODY num TAIL`.
#[derive(Debug, Clone, PartialEq)]
pub struct MessageTemplate {
    /// From after the id's closing quote up to `"num":`.
    pub body: String,
    /// After the count: `}` or `,"clientMsgId":"…"}`.
    pub tail: String,
}

pub const MESSAGE_HEAD: &str = r#"{"event":"message","id":""#;
pub const DM_HEAD: &str = r#"{"event":"dm","id":""#;

/// Builds the template of a chat message.
pub fn message_template(
    room_fragment: &str,
    user_fragment: &str,
    content: &str,
    ts_ms: u64,
    client_msg_id: Option<&str>,
) -> MessageTemplate {
    let body = format!(
        r#"",{room_fragment},{user_fragment},"content":{},"ts":{ts_ms},"num":"#,
        json_string(content)
    );
    let tail = match client_msg_id {
        Some(id) => format!(r#","clientMsgId":{}}}"#, json_string(id)),
        None => "}".to_string(),
    };
    MessageTemplate { body, tail }
}

/// The part of a `dm` frame after its id: `","fromUserId":…}`.
pub fn dm_rest(
    from_user_id: &str,
    from_user_name: &str,
    to_user_id: &str,
    content: &str,
    ts_ms: u64,
    client_msg_id: Option<&str>,
) -> String {
    let mut out = format!(
        r#"","fromUserId":{},"fromUserName":{},"toUserId":{},"content":{},"ts":{ts_ms}"#,
        json_string(from_user_id),
        json_string(from_user_name),
        json_string(to_user_id),
        json_string(content)
    );
    if let Some(id) = client_msg_id {
        out.push_str(r#","clientMsgId":"#);
        out.push_str(&json_string(id));
    }
    out.push('}');
    out
}

/// `login` frame sent to one connection only (a second tab of a user already present).
pub fn login_frame(user_fragment: &str, room_fragment: &str, num: u64) -> String {
    format!(r#"{{"event":"login",{user_fragment},{room_fragment},"num":{num}}}"#)
}

pub fn logout_frame(user_fragment: &str, room_fragment: &str, num: u64) -> String {
    format!(r#"{{"event":"logout",{user_fragment},{room_fragment},"num":{num}}}"#)
}

/// A login or logout announcement with slots for what only the broker knows when it
/// announces (the room's name in effect, the count, a departed user's record): the backends
/// fill it, so every announcement's JSON is written here, never in a script. The slots are
/// control bytes 1–4, which JSON text never holds raw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Announcement {
    Login,
    Logout,
}

impl Announcement {
    /// Slot bytes: user fragment, room id JSON, room name JSON, count.
    pub const SLOTS: [char; 4] = ['\u{1}', '\u{2}', '\u{3}', '\u{4}'];

    /// The template: `{"event":"login",\u1,"roomId":\u2,"roomName":\u3,"num":\u4}`.
    pub fn template(self) -> &'static str {
        match self {
            Announcement::Login => {
                "{\"event\":\"login\",\u{1},\"roomId\":\u{2},\"roomName\":\u{3},\"num\":\u{4}}"
            }
            Announcement::Logout => {
                "{\"event\":\"logout\",\u{1},\"roomId\":\u{2},\"roomName\":\u{3},\"num\":\u{4}}"
            }
        }
    }

    /// The template filled (as the scripts fill it).
    pub fn render(self, user_fragment: &str, room_json: &str, name_json: &str, num: u64) -> String {
        let mut out = String::with_capacity(64 + user_fragment.len() + room_json.len());
        for c in self.template().chars() {
            match c {
                '\u{1}' => out.push_str(user_fragment),
                '\u{2}' => out.push_str(room_json),
                '\u{3}' => out.push_str(name_json),
                '\u{4}' => out.push_str(&num.to_string()),
                c => out.push(c),
            }
        }
        out
    }
}

/// `sent`: a retried clientMsgId matched an earlier message.
pub fn sent_frame(room: &RoomId, id: StreamId, client_msg_id: &str) -> String {
    format!(
        r#"{{"event":"sent","roomId":{},"id":"{id}","clientMsgId":{},"duplicate":true}}"#,
        room.json,
        json_string(client_msg_id)
    )
}

pub fn dm_sent_frame(
    id: StreamId,
    to_user_id: &str,
    client_msg_id: Option<&str>,
    duplicate: bool,
) -> String {
    let mut out = format!(
        r#"{{"event":"dmSent","id":"{id}","toUserId":{}"#,
        json_string(to_user_id)
    );
    if let Some(cmid) = client_msg_id {
        out.push_str(r#","clientMsgId":"#);
        out.push_str(&json_string(cmid));
    }
    out.push_str(&format!(r#","duplicate":{duplicate}}}"#));
    out
}

/// `refreshed`: the connection's token was renewed; `exp` is its new expiry (Unix seconds).
pub fn refreshed_frame(expires_at: u64) -> String {
    format!(r#"{{"event":"refreshed","exp":{expires_at}}}"#)
}

/// `synced`: the end of a replay page.
pub fn synced_frame(
    target: &Target,
    last_id: StreamId,
    count: usize,
    truncated: bool,
    more: bool,
) -> String {
    let what = match target {
        Target::Room(room) => format!(r#""roomId":{}"#, room.json),
        Target::Inbox => r#""dm":true"#.to_string(),
    };
    format!(
        r#"{{"event":"synced",{what},"lastId":"{last_id}","count":{count},"truncated":{truncated},"more":{more}}}"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn code(text: &str) -> ErrorCode {
        parse_client_frame(text).unwrap_err().code
    }

    #[test]
    fn tutorial_login_without_user_id_parses() {
        let frame = parse_client_frame(
            r#"{"userName":"小明","roomId":1,"roomName":"大厅","event":"login"}"#,
        )
        .unwrap();
        let ClientFrame::Login(login) = frame else {
            panic!("not a login")
        };
        assert_eq!(login.user_id, None);
        assert_eq!(login.user_name.as_deref(), Some("小明"));
        assert_eq!(login.room, RoomId::parse(&json!(1)).unwrap());
        assert!(!login.ack);
    }

    #[test]
    fn login_with_ack_and_last_id() {
        let frame = parse_client_frame(
            r#"{"event":"login","userId":"u","roomId":"r","ack":true,"lastId":"5-2"}"#,
        )
        .unwrap();
        let ClientFrame::Login(login) = frame else {
            panic!("not a login")
        };
        assert!(login.ack);
        assert_eq!(login.last_id, Some(StreamId { ms: 5, seq: 2 }));
        assert_eq!(login.room.json, r#""r""#);
    }

    #[test]
    fn every_frame_kind_parses() {
        assert_eq!(
            parse_client_frame(r#"{"event":"heartBeat","content":"ping"}"#).unwrap(),
            ClientFrame::Ping
        );
        assert!(matches!(
            parse_client_frame(r#"{"event":"logout","roomId":3}"#).unwrap(),
            ClientFrame::Logout { .. }
        ));
        let chat = parse_client_frame(
            r#"{"userId":"x","userName":"y","roomId":1,"roomName":"r","content":"hi"}"#,
        )
        .unwrap();
        assert!(matches!(chat, ClientFrame::Chat { ref content, .. } if content == "hi"));
        let chat = parse_client_frame(
            r#"{"event":"message","roomId":"a","content":"hi","clientMsgId":"c1"}"#,
        )
        .unwrap();
        assert!(matches!(chat, ClientFrame::Chat { client_msg_id: Some(ref c), .. } if c == "c1"));
        assert_eq!(
            parse_client_frame(r#"{"event":"ack","roomId":1,"id":"10-1"}"#).unwrap(),
            ClientFrame::Ack {
                target: Target::Room(RoomId::from_key("1")),
                id: StreamId { ms: 10, seq: 1 }
            }
        );
        assert_eq!(
            parse_client_frame(r#"{"event":"ack","dm":true,"id":"10"}"#).unwrap(),
            ClientFrame::Ack {
                target: Target::Inbox,
                id: StreamId { ms: 10, seq: 0 }
            }
        );
        assert_eq!(
            parse_client_frame(r#"{"event":"sync","roomId":1,"since":"0","limit":5}"#).unwrap(),
            ClientFrame::Sync {
                target: Target::Room(RoomId::from_key("1")),
                since: Some(StreamId::ZERO),
                limit: Some(5)
            }
        );
        assert!(matches!(
            parse_client_frame(r#"{"event":"dm","toUserId":"b","content":"yo"}"#).unwrap(),
            ClientFrame::Dm { .. }
        ));
    }

    #[test]
    fn every_bad_input_kind_has_its_code() {
        assert_eq!(code("not json"), ErrorCode::BadJson);
        assert_eq!(code("[1,2]"), ErrorCode::NotObject);
        assert_eq!(code("\"s\""), ErrorCode::NotObject);
        assert_eq!(code(r#"{"event":"dance"}"#), ErrorCode::UnknownEvent);
        assert_eq!(code(r#"{"event":7}"#), ErrorCode::InvalidField);
        assert_eq!(code(r#"{"event":"login"}"#), ErrorCode::MissingField);
        assert_eq!(
            code(r#"{"event":"login","roomId":true}"#),
            ErrorCode::InvalidField
        );
        assert_eq!(
            code(r#"{"event":"login","roomId":""}"#),
            ErrorCode::InvalidField
        );
        assert_eq!(
            code(r#"{"event":"login","roomId":1.5}"#),
            ErrorCode::InvalidField
        );
        let long = "x".repeat(129);
        assert_eq!(
            code(&format!(
                r#"{{"event":"login","roomId":1,"userId":"{long}"}}"#
            )),
            ErrorCode::InvalidField
        );
        assert_eq!(
            code(r#"{"event":"login","roomId":1,"ack":"yes"}"#),
            ErrorCode::InvalidField
        );
        assert_eq!(
            code(r#"{"event":"login","roomId":1,"lastId":"x-1"}"#),
            ErrorCode::InvalidField
        );
        assert_eq!(code(r#"{"content":"hi"}"#), ErrorCode::MissingField);
        assert_eq!(code(r#"{"roomId":1}"#), ErrorCode::MissingField);
        assert_eq!(
            code(r#"{"roomId":1,"content":""}"#),
            ErrorCode::InvalidField
        );
        assert_eq!(code(r#"{"roomId":1,"content":5}"#), ErrorCode::InvalidField);
        assert_eq!(
            code(r#"{"event":"heartBeat","content":"pang"}"#),
            ErrorCode::InvalidField
        );
        assert_eq!(
            code(r#"{"event":"ack","roomId":1}"#),
            ErrorCode::MissingField
        );
        assert_eq!(
            code(r#"{"event":"sync","roomId":1,"limit":0}"#),
            ErrorCode::InvalidField
        );
        assert_eq!(
            code(r#"{"event":"dm","content":"x"}"#),
            ErrorCode::MissingField
        );
    }

    #[test]
    fn control_characters_and_guest_ids_are_refused_tokens_and_refresh_parse() {
        for frame in [
            r#"{"event":"login","roomId":"a\nb"}"#,
            r#"{"event":"login","roomId":1,"userId":"a\u0000"}"#,
            r#"{"event":"login","roomId":1,"userName":"\u001b[2J"}"#,
            r#"{"event":"login","roomId":1,"roomName":"x\u0085"}"#,
            r#"{"event":"login","roomId":1,"userId":"guest-1"}"#,
            r#"{"roomId":1,"content":"hi","clientMsgId":"c\r"}"#,
            r#"{"event":"dm","toUserId":"b\t","content":"x"}"#,
            r#"{"event":"login","roomId":1,"token":""}"#,
        ] {
            assert_eq!(code(frame), ErrorCode::InvalidField, "{frame}");
        }
        // Chat content may hold newlines.
        assert!(parse_client_frame(r#"{"roomId":1,"content":"a\nb"}"#).is_ok());
        let ClientFrame::Login(login) =
            parse_client_frame(r#"{"event":"login","roomId":1,"token":"t.k.n"}"#).unwrap()
        else {
            panic!("not a login")
        };
        assert_eq!(login.token.as_deref(), Some("t.k.n"));
        assert_eq!(
            parse_client_frame(r#"{"event":"refresh","token":"abc"}"#).unwrap(),
            ClientFrame::Refresh {
                token: "abc".into()
            }
        );
        assert_eq!(code(r#"{"event":"refresh"}"#), ErrorCode::MissingField);
    }

    #[test]
    fn a_chat_frames_own_user_id_is_kept_for_the_echo() {
        let echo = |text: &str| match parse_client_frame(text).unwrap() {
            ClientFrame::Chat { echo_user_id, .. } => echo_user_id,
            other => panic!("not a chat frame: {other:?}"),
        };
        assert_eq!(
            echo(r#"{"userId":"1732550000000","roomId":1,"content":"x"}"#).as_deref(),
            Some(r#""1732550000000""#)
        );
        assert_eq!(
            echo(r#"{"userId":17,"roomId":1,"content":"x"}"#).as_deref(),
            Some("17")
        );
        assert_eq!(echo(r#"{"userId":{"a":1},"roomId":1,"content":"x"}"#), None);
        assert_eq!(echo(r#"{"userId":"a\nb","roomId":1,"content":"x"}"#), None);
    }

    #[test]
    fn auth_errors_carry_their_reason() {
        let frame: Value =
            serde_json::from_str(&FrameError::auth(crate::auth::AuthError::Expired).encode())
                .unwrap();
        assert_eq!(frame["code"], "unauthorized");
        assert_eq!(frame["reason"], "expired");
        let frame: Value =
            serde_json::from_str(&FrameError::auth(crate::auth::AuthError::Room).encode()).unwrap();
        assert_eq!(frame["code"], "forbidden");
        assert_eq!(frame["reason"], "room");
    }

    #[test]
    fn errors_echo_room_and_client_msg_id() {
        let err = parse_client_frame(r#"{"roomId":4,"clientMsgId":"c9"}"#).unwrap_err();
        let frame: Value = serde_json::from_str(&err.encode()).unwrap();
        assert_eq!(frame["event"], "error");
        assert_eq!(frame["code"], "missing_field");
        assert_eq!(frame["roomId"], 4);
        assert_eq!(frame["clientMsgId"], "c9");
    }

    #[test]
    fn room_ids_read_back_from_their_keys_keep_their_type() {
        for value in [
            json!(1),
            json!(-7),
            json!(u64::MAX),
            json!("lobby"),
            json!("007"),
        ] {
            let room = RoomId::parse(&value).unwrap();
            assert_eq!(RoomId::from_key(&room.key), room, "{value}");
        }
    }

    #[test]
    fn stream_ids_order_numerically() {
        let a: StreamId = "9-5".parse().unwrap();
        let b: StreamId = "10-0".parse().unwrap();
        assert!(a < b, "string order would say otherwise");
        assert_eq!(a.next(), StreamId { ms: 9, seq: 6 });
        assert_eq!(a.to_string(), "9-5");
        assert!("".parse::<StreamId>().is_err());
        assert!("1-2-3".parse::<StreamId>().is_err());
    }

    #[test]
    fn announcements_render_as_the_login_and_logout_frames() {
        let user = user_fragment("u\u{1}", "N \"x\"");
        let room = RoomId::from_key("r\u{2}");
        let fragment = room_fragment(&room, "name\u{3}");
        let name = json_string("name\u{3}");
        assert_eq!(
            Announcement::Login.render(&user, &room.json, &name, 7),
            login_frame(&user, &fragment, 7)
        );
        assert_eq!(
            Announcement::Logout.render(&user, &room.json, &name, 0),
            logout_frame(&user, &fragment, 0)
        );
        for slot in Announcement::SLOTS {
            assert!(!user.contains(slot) && !fragment.contains(slot));
        }
    }

    #[test]
    fn encoded_frames_are_valid_json_with_escaping() {
        let room = RoomId::parse(&json!("房间\"1\"")).unwrap();
        let rf = room_fragment(&room, "名字 🎉");
        let uf = user_fragment("u\n1", "A\\B");
        let t = message_template(&rf, &uf, "hi \"there\" 😀", 42, Some("c"));
        let frame = format!("{MESSAGE_HEAD}5-1{}7{}", t.body, t.tail);
        let v: Value = serde_json::from_str(&frame).unwrap();
        assert_eq!(
            v,
            json!({"event":"message","id":"5-1","roomId":"房间\"1\"","roomName":"名字 🎉",
                   "userId":"u\n1","userName":"A\\B","content":"hi \"there\" 😀","ts":42,
                   "num":7,"clientMsgId":"c"})
        );
        let v: Value = serde_json::from_str(&login_frame(&uf, &rf, 3)).unwrap();
        assert_eq!(v["event"], "login");
        assert_eq!(v["num"], 3);
        let dm = format!("{DM_HEAD}1-0{}", dm_rest("a", "A", "b", "x", 1, None));
        let v: Value = serde_json::from_str(&dm).unwrap();
        assert_eq!(v["toUserId"], "b");
        for frame in [
            sent_frame(&room, StreamId { ms: 1, seq: 2 }, "c"),
            dm_sent_frame(StreamId::ZERO, "b", Some("d"), false),
            synced_frame(&Target::Inbox, StreamId::ZERO, 0, true, false),
            synced_frame(&Target::Room(room.clone()), StreamId::ZERO, 3, false, true),
            FrameError::new(ErrorCode::Internal, "\"quoted\"").encode(),
            PONG.to_string(),
        ] {
            serde_json::from_str::<Value>(&frame).unwrap();
        }
    }
}
