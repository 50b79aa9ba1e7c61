//! The envelope around a frame on its way between nodes: one header line the receiving node
//! reads (kind, id, publish time, origin, trace context), then the client frame, forwarded to
//! sockets byte for byte (never re-encoded).
//!
//! `kind|id|publish_us|origin|sender|traceparent\n{frame}` — `sender` is the publishing
//! connection's id on the origin node (empty for announcements), so that connection can tell
//! its own messages apart.

use bytes::Bytes;

use crate::protocol::StreamId;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A room chat message (has an id).
    Message,
    /// A login/logout announcement (no id).
    Presence,
    /// A direct message to a user (has an id).
    Direct,
    /// A command for the nodes holding a user's connections (no id, never stored), sent on
    /// the user's channel; the frame says what to do (see `crate::api`).
    Control,
}

impl Kind {
    fn tag(self) -> char {
        match self {
            Kind::Message => 'm',
            Kind::Presence => 'p',
            Kind::Direct => 'd',
            Kind::Control => 'c',
        }
    }
}

/// The header as written by the publishing node.
#[derive(Debug, Clone, PartialEq)]
pub struct EnvelopeHeader {
    pub kind: Kind,
    pub published_us: u64,
    pub origin: String,
    /// The publishing connection on `origin`, if a connection published it.
    pub sender_conn: Option<u64>,
    /// W3C traceparent of the publishing span ("" when tracing is off).
    pub traceparent: String,
}

impl EnvelopeHeader {
    /// The header text around the id: `(before, after)`; for kinds without an id the whole
    /// header is `before + after`.
    pub fn split_at_id(&self) -> (String, String) {
        (
            format!("{}|", self.kind.tag()),
            format!(
                "|{}|{}|{}|{}\n",
                self.published_us,
                self.origin,
                self.sender_conn.map(|c| c.to_string()).unwrap_or_default(),
                self.traceparent
            ),
        )
    }

    /// The complete header for a frame without an id.
    pub fn without_id(&self) -> String {
        let (before, after) = self.split_at_id();
        before + &after
    }
}

/// A parsed envelope; `frame` shares the received buffer.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    pub kind: Kind,
    pub id: Option<StreamId>,
    pub published_us: u64,
    pub origin: String,
    pub sender_conn: Option<u64>,
    pub traceparent: String,
    pub frame: Bytes,
}

impl Envelope {
    pub fn parse(payload: &Bytes) -> Option<Envelope> {
        let newline = payload.iter().position(|&b| b == b'\n')?;
        let header = std::str::from_utf8(&payload[..newline]).ok()?;
        let mut parts = header.splitn(6, '|');
        let kind = match parts.next()? {
            "m" => Kind::Message,
            "p" => Kind::Presence,
            "d" => Kind::Direct,
            "c" => Kind::Control,
            _ => return None,
        };
        let id = match parts.next()? {
            "" => None,
            text => Some(text.parse().ok()?),
        };
        let published_us = parts.next()?.parse().ok()?;
        let origin = parts.next()?.to_string();
        let sender_conn = match parts.next()? {
            "" => None,
            text => Some(text.parse().ok()?),
        };
        let traceparent = parts.next().unwrap_or("").to_string();
        Some(Envelope {
            kind,
            id,
            published_us,
            origin,
            sender_conn,
            traceparent,
            frame: payload.slice(newline + 1..),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_around_an_id() {
        let header = EnvelopeHeader {
            kind: Kind::Message,
            published_us: 123,
            origin: "n1".into(),
            sender_conn: Some(42),
            traceparent: "00-ab-cd-01".into(),
        };
        let (before, after) = header.split_at_id();
        let payload = Bytes::from(format!("{before}7-1{after}{{\"x\":1}}"));
        let env = Envelope::parse(&payload).unwrap();
        assert_eq!(env.kind, Kind::Message);
        assert_eq!(env.id, Some(StreamId { ms: 7, seq: 1 }));
        assert_eq!(env.published_us, 123);
        assert_eq!(env.traceparent, "00-ab-cd-01");
        assert_eq!(env.origin, "n1");
        assert_eq!(env.sender_conn, Some(42));
        assert_eq!(&env.frame[..], b"{\"x\":1}");
    }

    #[test]
    fn presence_header_has_no_id_and_garbage_is_rejected() {
        let header = EnvelopeHeader {
            kind: Kind::Presence,
            published_us: 5,
            origin: "n".into(),
            sender_conn: None,
            traceparent: String::new(),
        };
        let payload = Bytes::from(format!("{}{{}}", header.without_id()));
        let env = Envelope::parse(&payload).unwrap();
        assert_eq!(env.id, None);
        assert_eq!(env.kind, Kind::Presence);
        assert!(Envelope::parse(&Bytes::from_static(b"no newline")).is_none());
        assert!(Envelope::parse(&Bytes::from_static(b"z|||\n{}")).is_none());
    }
}
