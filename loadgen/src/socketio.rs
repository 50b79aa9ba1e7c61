//! The few Engine.IO v4 / Socket.IO v5 packets a websocket-only client needs, as text:
//! the server's open (`0{...}`), its pings (`2`, answered with `3`), the namespace connect
//! (`40` sent, `40{...}` received), events (`42["name",payload]`) and the ends (`1`, `41`,
//! `44{...}`). The load generator speaks the gateway's JSON frames; over Socket.IO a frame
//! travels as the payload of an event named after its `event` field (`message` when it has
//! none), and an event's payload is handed back as the frame (`conn::Ws` does both).

use anyhow::{anyhow, bail, Result};
use serde_json::Value;

/// The namespace connect a client sends after the server's open packet.
pub const CONNECT: &str = "40";
/// The answer to the server's ping.
pub const PONG: &str = "3";

/// One received packet (a WebSocket text message is exactly one Engine.IO packet).
#[derive(Debug, PartialEq, Eq)]
pub enum Packet {
    /// `0{"sid":..,"pingInterval":..}`: the Engine.IO handshake.
    Open(String),
    /// `1`: the server closes the Engine.IO session.
    Close,
    /// `2`: must be answered with `3`.
    Ping,
    /// `3`, `5` (upgrade), `6` (noop) and anything of no use to this client.
    Ignored,
    /// `40{"sid":..}`: connected to the namespace.
    Connect(String),
    /// `41`: disconnected from the namespace.
    Disconnect,
    /// `42["name",payload]` (namespace and ack id, when present, skipped): the event's name
    /// and its first argument as JSON text (`null` when it has none).
    Event { name: String, payload: String },
    /// `44{"message":..}`: the namespace refused the connection.
    ConnectError(String),
}

/// Parses one text message from the server.
pub fn parse(text: &str) -> Result<Packet> {
    let mut chars = text.chars();
    let kind = chars
        .next()
        .ok_or_else(|| anyhow!("empty Engine.IO packet"))?;
    let rest = chars.as_str();
    Ok(match kind {
        '0' => Packet::Open(rest.to_string()),
        '1' => Packet::Close,
        '2' => Packet::Ping,
        '3' | '5' | '6' => Packet::Ignored,
        '4' => parse_socketio(rest)?,
        _ => bail!("unknown Engine.IO packet type {kind:?}"),
    })
}

/// A Socket.IO packet (the Engine.IO message's data): `<type>[/nsp,][id][json]`.
fn parse_socketio(data: &str) -> Result<Packet> {
    let mut chars = data.chars();
    let kind = chars
        .next()
        .ok_or_else(|| anyhow!("empty Socket.IO packet"))?;
    let mut rest = chars.as_str();
    // A namespace other than "/" comes first, up to a comma.
    if rest.starts_with('/') {
        rest = rest.split_once(',').map(|(_, r)| r).unwrap_or("");
    }
    // Then an ack id (digits), for events that want an acknowledgement.
    rest = rest.trim_start_matches(|c: char| c.is_ascii_digit());
    Ok(match kind {
        '0' => Packet::Connect(rest.to_string()),
        '1' => Packet::Disconnect,
        '2' => {
            let (name, payload) = event_parts(rest)?;
            Packet::Event { name, payload }
        }
        '4' => Packet::ConnectError(rest.to_string()),
        // 3 ack, 5 binary event, 6 binary ack: never sent to this client.
        '3' | '5' | '6' => Packet::Ignored,
        _ => bail!("unknown Socket.IO packet type {kind:?}"),
    })
}

/// `["name",payload]` → (name, payload as JSON text). The usual shape (a plain name, one
/// object argument) is cut out of the text without parsing the payload, so that the
/// generator parses each delivery once, like over the gateway; anything else goes through
/// serde_json. The cut assumes what the suite's servers send (one argument per event): an
/// event of several arguments whose separators the check below does not see would hand on
/// more than the first.
fn event_parts(array: &str) -> Result<(String, String)> {
    if let Some(fast) = event_parts_fast(array) {
        return Ok(fast);
    }
    let v: Value = serde_json::from_str(array)?;
    let items = v
        .as_array()
        .ok_or_else(|| anyhow!("Socket.IO event is not an array"))?;
    let name = items
        .first()
        .and_then(Value::as_str)
        .ok_or_else(|| anyhow!("Socket.IO event without a name"))?
        .to_string();
    let payload = items.get(1).cloned().unwrap_or(Value::Null).to_string();
    Ok((name, payload))
}

fn event_parts_fast(array: &str) -> Option<(String, String)> {
    let inner = array.strip_prefix("[\"")?.strip_suffix(']')?;
    let (name, payload) = inner.split_once("\",")?;
    if name.contains('\\') || name.contains('"') {
        return None;
    }
    let payload = payload.trim();
    // One argument only: an object or array whose closing bracket ends the text.
    let closes = match payload.as_bytes().first()? {
        b'{' => b'}',
        b'[' => b']',
        _ => return None,
    };
    let several = payload.contains("},{") || payload.contains("],[");
    (payload.as_bytes().last() == Some(&closes) && !several)
        .then(|| (name.to_string(), payload.to_string()))
}

/// An event packet to send: `42["name",payload]`; `payload` is JSON text.
pub fn event(name: &str, payload: &str) -> String {
    let mut s = String::with_capacity(payload.len() + name.len() + 8);
    s.push_str("42[");
    s.push_str(&Value::from(name).to_string());
    s.push(',');
    s.push_str(payload);
    s.push(']');
    s
}

/// A gateway frame as a Socket.IO event: named after its `event` field (`message` when it
/// has none), with the frame as the payload.
pub fn frame_as_event(frame: &str) -> String {
    let name = e2e::wire::event(frame).unwrap_or_else(|| frame_event_slow(frame));
    event(name, frame)
}

/// The `event` field of a frame whose text does not start with it (`message` when absent).
fn frame_event_slow(frame: &str) -> &'static str {
    match serde_json::from_str::<Value>(frame)
        .ok()
        .and_then(|v| v.get("event").and_then(Value::as_str).map(str::to_string))
        .as_deref()
    {
        Some("login") => "login",
        Some("logout") => "logout",
        Some("heartBeat") => "heartBeat",
        Some("ack") => "ack",
        Some("sync") => "sync",
        _ => "message",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_io_packets() {
        let open = r#"0{"sid":"abc","upgrades":[],"pingInterval":25000,"pingTimeout":20000,"maxPayload":1000000}"#;
        assert_eq!(parse(open).unwrap(), Packet::Open(open[1..].to_string()));
        assert_eq!(parse("2").unwrap(), Packet::Ping);
        assert_eq!(parse("3").unwrap(), Packet::Ignored);
        assert_eq!(parse("6").unwrap(), Packet::Ignored);
        assert_eq!(parse("1").unwrap(), Packet::Close);
        assert!(parse("").is_err());
        assert!(parse("9").is_err());
    }

    #[test]
    fn socket_io_connect_and_disconnect() {
        assert_eq!(
            parse(r#"40{"sid":"xyz"}"#).unwrap(),
            Packet::Connect(r#"{"sid":"xyz"}"#.into())
        );
        assert_eq!(
            parse(r#"40/chat,{"sid":"xyz"}"#).unwrap(),
            Packet::Connect(r#"{"sid":"xyz"}"#.into())
        );
        assert_eq!(parse("41").unwrap(), Packet::Disconnect);
        assert_eq!(
            parse(r#"44{"message":"Not authorized"}"#).unwrap(),
            Packet::ConnectError(r#"{"message":"Not authorized"}"#.into())
        );
    }

    #[test]
    fn events() {
        let frame = r#"{"roomId":"big","content":"t=1;s=2;q=3;xx","num":1000}"#;
        assert_eq!(
            parse(&format!(r#"42["message",{frame}]"#)).unwrap(),
            Packet::Event {
                name: "message".into(),
                payload: frame.into()
            }
        );
        // Namespace and ack id are skipped.
        assert_eq!(
            parse(r#"42/chat,17["login",{"event":"login","num":2}]"#).unwrap(),
            Packet::Event {
                name: "login".into(),
                payload: r#"{"event":"login","num":2}"#.into()
            }
        );
        // Shapes off the fast path: two arguments, no argument, a string, an escaped name.
        assert_eq!(
            parse(r#"42["message",{"a":1},{"b":2}]"#).unwrap(),
            Packet::Event {
                name: "message".into(),
                payload: r#"{"a":1}"#.into()
            }
        );
        assert_eq!(
            parse(r#"42["ping"]"#).unwrap(),
            Packet::Event {
                name: "ping".into(),
                payload: "null".into()
            }
        );
        assert_eq!(
            parse(r#"42["say","hi"]"#).unwrap(),
            Packet::Event {
                name: "say".into(),
                payload: r#""hi""#.into()
            }
        );
        assert_eq!(
            parse(r#"42["a\"b",{}]"#).unwrap(),
            Packet::Event {
                name: "a\"b".into(),
                payload: "{}".into()
            }
        );
        assert!(parse("42not json").is_err());
        assert!(parse(r#"42{"a":1}"#).is_err());
    }

    #[test]
    fn outgoing_events() {
        assert_eq!(event("message", r#"{"a":1}"#), r#"42["message",{"a":1}]"#);
        let login = e2e::wire::Login::new("u1", "big").text();
        assert_eq!(frame_as_event(&login), format!(r#"42["login",{login}]"#));
        let chat = e2e::wire::message_raw("big", "hi", None);
        assert_eq!(frame_as_event(&chat), format!(r#"42["message",{chat}]"#));
        assert_eq!(
            frame_as_event(e2e::wire::HEARTBEAT),
            format!(r#"42["heartBeat",{}]"#, e2e::wire::HEARTBEAT)
        );
        let ack = r#"{"roomId":"r","event":"ack","id":"5"}"#;
        assert_eq!(frame_as_event(ack), format!(r#"42["ack",{ack}]"#));
        // What goes out comes back as the same frame.
        match parse(&frame_as_event(&chat)).unwrap() {
            Packet::Event { name, payload } => {
                assert_eq!(name, "message");
                assert_eq!(payload, chat);
            }
            other => panic!("{other:?}"),
        }
    }
}
