//! The gateway's wire protocol from a client's side, for every Rust client of the workspace
//! (the harness's `Client`, the benchmark binaries, `loadgen`): opening a WebSocket (to a URL,
//! or over a TCP stream the caller connected from an address of its choice), the typed refusal
//! of an upgrade, the client frames, and reading the server's frames.
//!
//! Two ways to build a frame: as a `serde_json::Value` (`login`, `message`, `ack`, ...: every
//! string escaped, keys in serde_json's order), and preformatted (`message_raw`, `ack_raw`) for
//! hot paths, which write their arguments as they are (one allocation, no JSON encoding).

use std::borrow::Cow;
use std::fmt::{self, Display};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::client::Request;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// A WebSocket opened by `connect`.
pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

// ---------------------------------------------------------------------------------------------
// Connecting

/// How to open a WebSocket: extra request headers, the WebSocket settings, `TCP_NODELAY`, and
/// how long `connect` waits for TCP and the upgrade together.
#[derive(Clone, Debug)]
pub struct Opts {
    pub headers: Vec<(String, String)>,
    /// `None`: tungstenite's defaults.
    pub config: Option<WebSocketConfig>,
    /// Sets `TCP_NODELAY` on the socket `connect` opens (`connect_over`: the caller's stream).
    pub nodelay: bool,
    /// `connect` only: `connect_over` leaves the timeout to its caller.
    pub timeout: Duration,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            headers: Vec::new(),
            config: None,
            nodelay: false,
            timeout: Duration::from_secs(10),
        }
    }
}

impl Opts {
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    /// `small_buffers()`: for processes that hold thousands of connections.
    pub fn small_buffers(mut self) -> Self {
        self.config = Some(small_buffers());
        self
    }

    pub fn config(mut self, config: WebSocketConfig) -> Self {
        self.config = Some(config);
        self
    }

    pub fn nodelay(mut self) -> Self {
        self.nodelay = true;
        self
    }

    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    fn request(&self, url: &str) -> Result<Request> {
        let mut request = url.into_client_request()?;
        for (name, value) in &self.headers {
            request.headers_mut().insert(
                tungstenite::http::HeaderName::from_bytes(name.as_bytes())?,
                value.parse()?,
            );
        }
        Ok(request)
    }
}

/// Small buffers, for a process holding tens of thousands of connections: an 8 KiB read
/// buffer, writes sent at once, and messages and frames of at most 1 MiB (the gateway's
/// frames are far smaller).
pub fn small_buffers() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(8 * 1024)
        .write_buffer_size(0)
        .max_message_size(Some(1 << 20))
        .max_frame_size(Some(1 << 20))
}

/// Opens a WebSocket to `url` (TCP and upgrade within `opts.timeout`). A refused upgrade is
/// an error that `refusal` reads.
pub async fn connect(url: &str, opts: &Opts) -> Result<Ws> {
    let request = opts.request(url)?;
    let (ws, _) = tokio::time::timeout(
        opts.timeout,
        tokio_tungstenite::connect_async_with_config(request, opts.config, opts.nodelay),
    )
    .await
    .context("websocket connect timeout")??;
    Ok(ws)
}

/// The upgrade over a stream the caller opened (from a source address of its choice, say),
/// without a timeout of its own. A refused upgrade is an error that `refusal` reads.
pub async fn connect_over<S>(url: &str, stream: S, opts: &Opts) -> Result<WebSocketStream<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let request = opts.request(url)?;
    let (ws, _) = tokio_tungstenite::client_async_with_config(request, stream, opts.config).await?;
    Ok(ws)
}

/// An upgrade answered with an HTTP status instead of a WebSocket.
#[derive(Debug, Clone)]
pub struct UpgradeRefused {
    pub status: u16,
    pub body: String,
    /// The `Retry-After` header, if the refusal had one.
    pub retry_after: Option<String>,
}

impl Display for UpgradeRefused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "upgrade refused with {}: {}", self.status, self.body)
    }
}

impl std::error::Error for UpgradeRefused {}

impl UpgradeRefused {
    /// The `reason` of a JSON body (`{"error":…,"reason":…}`), if it has one.
    pub fn reason(&self) -> Option<String> {
        let body: Value = serde_json::from_str(&self.body).ok()?;
        body["reason"].as_str().map(str::to_string)
    }
}

/// The refusal in an error of `connect` or `connect_over`, if the upgrade was refused (the
/// error itself is left as it is: its text is tungstenite's `HTTP error: <status>`).
pub fn refusal(error: &anyhow::Error) -> Option<UpgradeRefused> {
    let Some(tungstenite::Error::Http(response)) = error.downcast_ref::<tungstenite::Error>()
    else {
        return None;
    };
    Some(UpgradeRefused {
        status: response.status().as_u16(),
        body: response
            .body()
            .as_ref()
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .unwrap_or_default(),
        retry_after: response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
    })
}

// ---------------------------------------------------------------------------------------------
// Client frames

/// The `heartBeat` a client sends; the gateway answers `{"event":"heartBeat","content":"pong"}`.
pub const HEARTBEAT: &str = r#"{"event":"heartBeat","content":"ping"}"#;

/// A `login` frame: `Login::new(user, room)` names the user and the room by their ids; the
/// other fields are set by its methods.
#[derive(Clone, Debug)]
pub struct Login {
    pub user: String,
    pub user_name: String,
    pub room: Value,
    pub room_name: String,
    pub token: Option<String>,
    pub ack: bool,
    pub last_id: Option<String>,
}

impl Login {
    /// `userName` is the user id and `roomName` the room id until told otherwise.
    pub fn new(user: &str, room: impl Into<Value>) -> Login {
        let room = room.into();
        let room_name = match &room {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        Login {
            user: user.to_string(),
            user_name: user.to_string(),
            room,
            room_name,
            token: None,
            ack: false,
            last_id: None,
        }
    }

    pub fn name(mut self, user_name: impl Into<String>) -> Self {
        self.user_name = user_name.into();
        self
    }

    pub fn room_name(mut self, room_name: impl Into<String>) -> Self {
        self.room_name = room_name.into();
        self
    }

    /// Proves the user with a token (gateways with authentication on).
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// `"ack": true` (stored ack positions) when `ack`.
    pub fn ack(mut self, ack: bool) -> Self {
        self.ack = ack;
        self
    }

    /// Resumes after `lastId` (the replay of what was missed).
    pub fn last_id(mut self, last_id: Option<&str>) -> Self {
        self.last_id = last_id.map(str::to_string);
        self
    }

    pub fn frame(&self) -> Value {
        let mut v = json!({
            "event": "login", "userId": self.user, "userName": self.user_name,
            "roomId": self.room, "roomName": self.room_name,
        });
        if self.ack {
            v["ack"] = true.into();
        }
        if let Some(id) = &self.last_id {
            v["lastId"] = id.as_str().into();
        }
        if let Some(token) = &self.token {
            v["token"] = token.as_str().into();
        }
        v
    }

    pub fn text(&self) -> String {
        self.frame().to_string()
    }
}

/// A chat message to `room`, with its `clientMsgId` when given (the gateway's de-duplication
/// key, echoed in the message and in refusals).
pub fn message(room: impl Into<Value>, content: &str, client_msg_id: Option<&str>) -> Value {
    let mut v = json!({"roomId": room.into(), "content": content});
    if let Some(id) = client_msg_id {
        v["clientMsgId"] = id.into();
    }
    v
}

/// `message` preformatted, for hot paths: `{"roomId":"<room>","content":"<content>"}` with
/// `"clientMsgId":"<id>"` when given. The arguments are written as they are, so they must
/// need no JSON escaping (see `escape`).
pub fn message_raw(
    room: impl Display,
    content: impl Display,
    client_msg_id: Option<fmt::Arguments<'_>>,
) -> String {
    match client_msg_id {
        Some(id) => {
            format!(r#"{{"roomId":"{room}","content":"{content}","clientMsgId":"{id}"}}"#)
        }
        None => format!(r#"{{"roomId":"{room}","content":"{content}"}}"#),
    }
}

/// Acknowledges everything of `room` up to `id` (cumulative).
pub fn ack(room: impl Into<Value>, id: &str) -> Value {
    json!({"event": "ack", "roomId": room.into(), "id": id})
}

/// `ack` preformatted, for hot paths: `{"event":"ack","roomId":"<room>","id":"<id>"}`, the
/// arguments written as they are (see `message_raw`).
pub fn ack_raw(room: impl Display, id: impl Display) -> String {
    format!(r#"{{"event":"ack","roomId":"{room}","id":"{id}"}}"#)
}

/// Asks for `room`'s messages after `since` (at most `limit` of them when given).
pub fn sync(room: impl Into<Value>, since: &str, limit: Option<u32>) -> Value {
    let mut v = json!({"event": "sync", "roomId": room.into(), "since": since});
    if let Some(limit) = limit {
        v["limit"] = limit.into();
    }
    v
}

/// A direct message to `to`.
pub fn dm(to: &str, content: &str, client_msg_id: Option<&str>) -> Value {
    let mut v = json!({"event": "dm", "toUserId": to, "content": content});
    if let Some(id) = client_msg_id {
        v["clientMsgId"] = id.into();
    }
    v
}

pub fn logout(room: impl Into<Value>) -> Value {
    json!({"event": "logout", "roomId": room.into()})
}

/// `text` as the inside of a JSON string (without the quotes), for the preformatted frames.
pub fn escape(text: &str) -> String {
    let quoted = Value::from(text).to_string();
    quoted[1..quoted.len() - 1].to_string()
}

// ---------------------------------------------------------------------------------------------
// Server frames

/// Start of every chat message frame (gateway/src/protocol.rs `MESSAGE_HEAD`).
pub const MESSAGE_HEAD: &str = r#"{"event":"message","id":""#;

/// The event of a server frame, read without parsing it: the gateway writes `event` first.
pub fn event(text: &str) -> Option<&str> {
    let rest = text.strip_prefix(r#"{"event":""#)?;
    Some(&rest[..rest.find('"')?])
}

/// The `code` of an `error` frame (`?` if it has none); `None` for other frames.
pub fn error_code(text: &str) -> Option<String> {
    if event(text)? != "error" {
        return None;
    }
    let value: Value = serde_json::from_str(text).ok()?;
    Some(value["code"].as_str().unwrap_or("?").to_string())
}

/// The close code of a close frame; 1005 (no status received) without one.
pub fn close_code(close: Option<&CloseFrame>) -> u16 {
    close.map(|c| u16::from(c.code)).unwrap_or(1005)
}

/// The close code of a close frame as text, or `close without code`.
pub fn close_text(close: Option<&CloseFrame>) -> String {
    close
        .map(|c| u16::from(c.code).to_string())
        .unwrap_or_else(|| "close without code".into())
}

/// The fields of a server frame a client looks at, borrowed from its text where it can
/// (`Frame::parse`): for readers of many frames.
#[derive(Deserialize, Default, Debug)]
pub struct Frame<'a> {
    #[serde(borrow)]
    pub event: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub content: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub code: Option<Cow<'a, str>>,
    #[serde(borrow, rename = "userId")]
    pub user_id: Option<Cow<'a, str>>,
    #[serde(borrow, rename = "clientMsgId")]
    pub client_msg_id: Option<Cow<'a, str>>,
    #[serde(borrow, rename = "lastId")]
    pub last_id: Option<Cow<'a, str>>,
    pub more: Option<bool>,
    pub truncated: Option<bool>,
    pub dm: Option<bool>,
    pub duplicate: Option<bool>,
}

impl<'a> Frame<'a> {
    pub fn parse(text: &'a str) -> serde_json::Result<Frame<'a>> {
        serde_json::from_str(text)
    }
}

/// Sends `login` and reads until the user's own `login` frame (returned), within `within`.
/// An `error` frame, a close or the end of the connection first is an error.
pub async fn log_in<S>(
    ws: &mut WebSocketStream<S>,
    login: &Login,
    within: Duration,
) -> Result<String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    ws.send(Message::text(login.text())).await?;
    let own = format!(r#""userId":{}"#, Value::from(login.user.as_str()));
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let next = tokio::time::timeout_at(deadline, ws.next())
            .await
            .with_context(|| format!("no own login frame within {within:?}"))?;
        match next {
            Some(Ok(Message::Text(text))) => match event(&text) {
                Some("login") if text.contains(&own) => return Ok(text.to_string()),
                Some("error") => bail!("error frame at login: {text}"),
                _ => {}
            },
            Some(Ok(Message::Close(close))) => {
                bail!("closed at login: {}", close_text(close.as_ref()))
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => bail!("websocket error at login: {e}"),
            None => bail!("connection ended at login"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames() {
        assert_eq!(
            Login::new("u", "r")
                .token("t")
                .ack(true)
                .last_id(Some("5-2"))
                .text(),
            r#"{"ack":true,"event":"login","lastId":"5-2","roomId":"r","roomName":"r","token":"t","userId":"u","userName":"u"}"#
        );
        assert_eq!(Login::new("u", 7).frame()["roomName"], "7");
        assert_eq!(
            message_raw("r", "hi", Some(format_args!("c-{}", 1))),
            r#"{"roomId":"r","content":"hi","clientMsgId":"c-1"}"#
        );
        assert_eq!(
            serde_json::from_str::<Value>(&message_raw("r", "hi", None)).unwrap(),
            message("r", "hi", None)
        );
        assert_eq!(
            serde_json::from_str::<Value>(&ack_raw("r", "1-2")).unwrap(),
            ack("r", "1-2")
        );
        assert_eq!(escape("a\"b"), r#"a\"b"#);
        assert_eq!(sync("r", "0", Some(5))["limit"], 5);
    }

    #[test]
    fn server_frames() {
        assert_eq!(event(r#"{"event":"login","userId":"u"}"#), Some("login"));
        assert_eq!(event(r#"{"userId":"u"}"#), None);
        assert_eq!(
            error_code(r#"{"event":"error","code":"rate_limited","message":"x"}"#).as_deref(),
            Some("rate_limited")
        );
        assert_eq!(error_code(r#"{"event":"login"}"#), None);
        assert_eq!(close_code(None), 1005);
        assert_eq!(close_text(None), "close without code");
        let f = Frame::parse(r#"{"event":"synced","more":true,"lastId":"3-1"}"#).unwrap();
        assert_eq!(f.event.as_deref(), Some("synced"));
        assert_eq!(f.last_id.as_deref(), Some("3-1"));
    }
}
