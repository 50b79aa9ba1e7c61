//! A connection's WebSocket as its session sees it (RFC 6455, server side, no extensions): the
//! client's messages, parsed here straight from the socket, and our frames, framed here and
//! written through the connection's outlet.
//!
//! Parsed here rather than by a WebSocket library because an idle connection must stay small:
//! between messages this holds no read buffer at all. A read goes into a buffer on the stack;
//! only the bytes of a message not complete yet are kept (`Reader`, which knows no socket),
//! and released once it is.

use std::io;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use tungstenite::Utf8Bytes;

use crate::outlet::{Outlet, WriteError};

/// Bytes read from the socket at once (on the stack: an idle connection holds none of them).
const READ_CHUNK: usize = 4096;

const OP_CONTINUATION: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

/// The WebSocket frame of a server text message. Server frames are unmasked, so these bytes
/// are the same for every recipient: a delivery is framed once per node.
pub fn text_frame(payload: &[u8]) -> Bytes {
    frame(OP_TEXT, payload)
}

/// A final, unmasked frame with the shortest length encoding.
fn frame(opcode: u8, payload: &[u8]) -> Bytes {
    let mut frame = BytesMut::with_capacity(payload.len() + 10);
    frame.extend_from_slice(&[0x80 | opcode]); // FIN + opcode
    match payload.len() {
        len @ 0..=125 => frame.extend_from_slice(&[len as u8]),
        len @ 126..=0xFFFF => {
            frame.extend_from_slice(&[126]);
            frame.extend_from_slice(&(len as u16).to_be_bytes());
        }
        len => {
            frame.extend_from_slice(&[127]);
            frame.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(payload);
    frame.freeze()
}

/// A close frame: the code, then a reason (at most 123 bytes, as control frames carry 125).
fn close_frame(code: u16, reason: &str) -> Bytes {
    let mut payload = code.to_be_bytes().to_vec();
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    payload.extend_from_slice(&reason.as_bytes()[..end]);
    frame(OP_CLOSE, &payload)
}

/// A message from the client. Pings are answered here; both pings and pongs are signs of life.
#[derive(Debug)]
pub enum Message {
    Text(Utf8Bytes),
    Binary(Bytes),
    Ping,
    Pong,
    /// The client closed (its close frame is answered; nothing follows).
    Close,
}

/// Why the client's bytes cannot be read on; each maps to a close code.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("a message over the limit of {0} bytes")]
    TooBig(usize),
    #[error("a text message or close reason that is not UTF-8")]
    BadUtf8,
    #[error("a WebSocket protocol error: {0}")]
    Protocol(&'static str),
    #[error("the connection ended without a close frame")]
    Reset,
    #[error("reading the socket failed: {0}")]
    Io(#[from] io::Error),
}

/// A frame's header, parsed.
struct Header {
    fin: bool,
    opcode: u8,
    mask: [u8; 4],
    /// Bytes of the header itself.
    len: usize,
    payload: u64,
}

impl Header {
    /// The header at the start of `bytes`; `None` until all of it is there.
    fn parse(bytes: &[u8]) -> Result<Option<Header>, ReadError> {
        let [first, second, ..] = *bytes else {
            return Ok(None);
        };
        if first & 0x70 != 0 {
            return Err(ReadError::Protocol(
                "reserved bits set (no extension was agreed)",
            ));
        }
        if second & 0x80 == 0 {
            return Err(ReadError::Protocol("a client frame must be masked"));
        }
        let (payload, at) = match second & 0x7F {
            126 => match bytes.get(2..4) {
                Some(b) => (u64::from(u16::from_be_bytes([b[0], b[1]])), 4),
                None => return Ok(None),
            },
            127 => match bytes.get(2..10) {
                Some(b) => (u64::from_be_bytes(b.try_into().expect("8 bytes")), 10),
                None => return Ok(None),
            },
            len => (u64::from(len), 2),
        };
        let Some(mask) = bytes.get(at..at + 4) else {
            return Ok(None);
        };
        let header = Header {
            fin: first & 0x80 != 0,
            opcode: first & 0x0F,
            mask: mask.try_into().expect("4 bytes"),
            len: at + 4,
            payload,
        };
        if header.opcode >= OP_CLOSE && (!header.fin || header.payload > 125) {
            return Err(ReadError::Protocol(
                "a control frame must be whole and at most 125 bytes",
            ));
        }
        Ok(Some(header))
    }
}

/// A frame or message the client sent, as the reader parsed it.
#[derive(Debug)]
pub enum Incoming {
    Text(Utf8Bytes),
    Binary(Bytes),
    Ping(Bytes),
    Pong,
    /// A close frame, with its code if it had one (its reason was checked to be UTF-8).
    Close(Option<u16>),
}

/// The client's bytes, parsed into messages: no socket here (so it can be fuzzed, see
/// `fuzz/`). Holds only the bytes of a message not complete yet.
pub struct Reader {
    /// Bytes read and not parsed yet; unallocated between messages.
    unread: BytesMut,
    /// A message that came in several frames, so far: (is text, payload). Boxed: rare.
    fragments: Option<Box<(bool, BytesMut)>>,
    max_message: usize,
}

impl Reader {
    /// A reader of messages up to `max_message` bytes, starting with the bytes `first`.
    pub fn new(first: &[u8], max_message: usize) -> Reader {
        Reader {
            unread: BytesMut::from(first),
            fragments: None,
            max_message,
        }
    }

    /// Takes bytes read from the socket.
    pub fn extend(&mut self, bytes: &[u8]) {
        self.unread.extend_from_slice(bytes);
    }

    /// Bytes held for messages not complete yet (capacity included).
    pub fn held(&self) -> usize {
        self.unread.capacity() + self.fragments.as_ref().map_or(0, |f| f.1.capacity())
    }

    /// The next whole message or control frame in what was read; `None` until one is
    /// complete. After an error the reader must not be used again.
    pub fn parse(&mut self) -> Result<Option<Incoming>, ReadError> {
        loop {
            let Some(header) = Header::parse(&self.unread)? else {
                return Ok(None);
            };
            // Refused by its declared length, before any of it is held.
            let so_far = self.fragments.as_ref().map_or(0, |f| f.1.len());
            let size = usize::try_from(header.payload).unwrap_or(usize::MAX);
            if size.saturating_add(so_far) > self.max_message {
                return Err(ReadError::TooBig(self.max_message));
            }
            if self.unread.len() < header.len + size {
                self.unread.reserve(header.len + size - self.unread.len());
                return Ok(None);
            }
            let mut payload = self.unread.split_to(header.len + size);
            payload.advance(header.len);
            if self.unread.is_empty() {
                self.unread = BytesMut::new(); // an idle connection holds no buffer
            }
            for (i, byte) in payload.iter_mut().enumerate() {
                *byte ^= header.mask[i % 4];
            }
            let incoming = match (header.opcode, self.fragments.take()) {
                (OP_TEXT | OP_BINARY, Some(_)) => {
                    return Err(ReadError::Protocol("a new message inside a fragmented one"))
                }
                (OP_TEXT | OP_BINARY, None) if !header.fin => {
                    self.fragments = Some(Box::new((header.opcode == OP_TEXT, payload)));
                    continue;
                }
                (OP_TEXT | OP_BINARY, None) => whole(header.opcode == OP_TEXT, payload)?,
                (OP_CONTINUATION, None) => {
                    return Err(ReadError::Protocol(
                        "a continuation frame without a message",
                    ))
                }
                (OP_CONTINUATION, Some(mut fragments)) => {
                    fragments.1.unsplit(payload);
                    if !header.fin {
                        self.fragments = Some(fragments);
                        continue;
                    }
                    let (text, so_far) = *fragments;
                    whole(text, so_far)?
                }
                (control, fragments) => {
                    self.fragments = fragments; // control frames may come between fragments
                    control_frame(control, payload.freeze())?
                }
            };
            return Ok(Some(incoming));
        }
    }
}

/// A control frame, checked.
fn control_frame(opcode: u8, payload: Bytes) -> Result<Incoming, ReadError> {
    match opcode {
        OP_PING => Ok(Incoming::Ping(payload)),
        OP_PONG => Ok(Incoming::Pong),
        OP_CLOSE => match payload.len() {
            0 => Ok(Incoming::Close(None)),
            1 => Err(ReadError::Protocol("a close frame of one byte")),
            _ => {
                let code = u16::from_be_bytes([payload[0], payload[1]]);
                if !valid_close_code(code) {
                    return Err(ReadError::Protocol("an invalid close code"));
                }
                if std::str::from_utf8(&payload[2..]).is_err() {
                    return Err(ReadError::BadUtf8);
                }
                Ok(Incoming::Close(Some(code)))
            }
        },
        _ => Err(ReadError::Protocol("an unknown opcode")),
    }
}

/// What the session reads and writes: the client's messages in, our frames out.
pub struct WebSocket {
    outlet: Arc<Outlet>,
    reader: Reader,
    /// The session's own frames, written together at the next flush.
    batch: Vec<Bytes>,
    /// The client's close frame came (and was answered), or reading failed: nothing more is
    /// read.
    closed: bool,
}

impl WebSocket {
    /// The WebSocket on the outlet's socket; `read_ahead`: bytes the client sent behind its
    /// upgrade request; `max_message`: the largest message read (larger closes with 1009).
    pub fn new(outlet: Arc<Outlet>, read_ahead: &[u8], max_message: usize) -> WebSocket {
        WebSocket {
            outlet,
            // Copied: the HTTP layer's buffer holding them would stay allocated otherwise.
            reader: Reader::new(read_ahead, max_message),
            batch: Vec::new(),
            closed: false,
        }
    }

    pub fn outlet(&self) -> &Arc<Outlet> {
        &self.outlet
    }

    /// The client's next message; `None` once it closed, or after an error.
    pub async fn next(&mut self) -> Option<Result<Message, ReadError>> {
        std::future::poll_fn(|cx| self.poll_next(cx)).await
    }

    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Message, ReadError>>> {
        if self.closed {
            return Poll::Ready(None);
        }
        let error = loop {
            match self.reader.parse() {
                Ok(Some(incoming)) => match self.answer(incoming) {
                    Ok(message) => return Poll::Ready(Some(Ok(message))),
                    Err(e) => break e,
                },
                Ok(None) => {}
                Err(e) => break e,
            }
            let tcp = self.outlet.tcp();
            if let Err(e) = std::task::ready!(tcp.poll_read_ready(cx)) {
                break e.into();
            }
            let mut chunk = [0u8; READ_CHUNK];
            match tcp.try_read(&mut chunk) {
                Ok(0) => break ReadError::Reset,
                Ok(n) => self.reader.extend(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => break e.into(),
            }
        };
        // After any error nothing more is read (the reader's state is not to be trusted).
        self.closed = true;
        Poll::Ready(Some(Err(error)))
    }

    /// Answers a control frame (a ping with its pong, a close with a close) and says what
    /// came.
    fn answer(&mut self, incoming: Incoming) -> Result<Message, ReadError> {
        Ok(match incoming {
            Incoming::Text(text) => Message::Text(text),
            Incoming::Binary(bytes) => Message::Binary(bytes),
            Incoming::Ping(payload) => {
                // Through the bounded backlog: the pongs of a client that pings without reading
                // wait up to GATEWAY_OUTBOUND_QUEUE frames; beyond, they are skipped (RFC 6455
                // lets a server answer only the latest ping).
                match self.outlet.deliver(&[frame(OP_PONG, &payload)]) {
                    Ok(()) | Err(WriteError::Full) => {}
                    Err(WriteError::Broken(e)) => return Err(e.into()),
                }
                Message::Ping
            }
            Incoming::Pong => Message::Pong,
            Incoming::Close(code) => {
                self.closed = true;
                let answer = match code {
                    Some(code) => close_frame(code, ""),
                    None => frame(OP_CLOSE, &[]),
                };
                let _ = self.outlet.write_own(&[answer]); // the socket may be gone already
                Message::Close
            }
        })
    }

    /// Queues a text frame; it is written at the next `flush`.
    pub fn feed(&mut self, text: &[u8]) {
        self.batch.push(text_frame(text));
    }

    /// Writes the queued frames and waits until the kernel took all that waits for the client.
    pub async fn flush(&mut self) -> io::Result<()> {
        if !self.batch.is_empty() {
            let batch = std::mem::take(&mut self.batch);
            self.outlet.write_own(&batch)?;
        }
        std::future::poll_fn(|cx| self.outlet.poll_drained(cx)).await
    }

    /// Writes what is queued, then the close frame with `code` and `reason`.
    pub async fn close(&mut self, code: u16, reason: &str) -> io::Result<()> {
        self.batch.push(close_frame(code, reason));
        self.flush().await
    }
}

/// A whole data message.
fn whole(text: bool, payload: BytesMut) -> Result<Incoming, ReadError> {
    let payload = payload.freeze();
    if !text {
        return Ok(Incoming::Binary(payload));
    }
    Utf8Bytes::try_from(payload)
        .map(Incoming::Text)
        .map_err(|_| ReadError::BadUtf8)
}

/// Close codes a client may send (RFC 6455 7.4, and the registered 1012–1014).
fn valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    /// A client frame: masked, as a browser sends it.
    fn client_frame(first: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x12, 0x34, 0x56, 0x78];
        let mut out = vec![first];
        match payload.len() {
            len @ 0..=125 => out.push(0x80 | len as u8),
            len @ 126..=0xFFFF => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(len as u16).to_be_bytes());
            }
            len => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(len as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    async fn pair(read_ahead: &[u8]) -> (WebSocket, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap());
        let (client, (server, _)) =
            tokio::join!(client, async { listener.accept().await.unwrap() });
        let outlet = Arc::new(Outlet::new(server, 16));
        (WebSocket::new(outlet, read_ahead, 1000), client.unwrap())
    }

    #[test]
    fn a_text_frame_carries_its_length_in_the_shortest_form() {
        assert_eq!(&text_frame(b"hi")[..], b"\x81\x02hi");
        let medium = text_frame(&[b'a'; 300]);
        assert_eq!(&medium[..4], &[0x81, 126, 1, 44]);
        assert_eq!(medium.len(), 304);
        let big = text_frame(&vec![b'a'; 70_000]);
        assert_eq!(&big[..2], &[0x81, 127]);
        assert_eq!(u64::from_be_bytes(big[2..10].try_into().unwrap()), 70_000);
    }

    #[tokio::test]
    async fn messages_are_read_whole_across_reads_fragments_and_the_read_ahead() {
        let first = client_frame(0x81, b"ahead");
        let (mut ws, mut client) = pair(&first).await;
        let mut bytes = client_frame(0x01, "fragm".as_bytes()); // text, not final
        bytes.extend(client_frame(0x89, b"p")); // a ping between the fragments
        bytes.extend(client_frame(0x80, "ented ✓".as_bytes()));
        bytes.extend(client_frame(0x82, &[1, 2, 3]));
        let medium = vec![b'm'; 300];
        bytes.extend(client_frame(0x81, &medium));
        // Byte by byte: every partial header and payload is waited for.
        let writer = tokio::spawn(async move {
            for b in bytes {
                client.write_all(&[b]).await.unwrap();
            }
            client
        });
        let text = |m: Option<Result<Message, ReadError>>| match m {
            Some(Ok(Message::Text(t))) => t.as_str().to_owned(),
            other => panic!("{other:?}"),
        };
        assert_eq!(text(ws.next().await), "ahead");
        assert!(matches!(ws.next().await, Some(Ok(Message::Ping))));
        assert_eq!(text(ws.next().await), "fragmented ✓");
        assert!(matches!(ws.next().await, Some(Ok(Message::Binary(b))) if b[..] == [1, 2, 3]));
        assert_eq!(text(ws.next().await).len(), 300);
        assert_eq!(ws.reader.held(), 0, "no buffer is held between messages");
        let mut client = writer.await.unwrap();
        let mut pong = [0u8; 3];
        client.read_exact(&mut pong).await.unwrap();
        assert_eq!(pong, [0x8A, 1, b'p']);
        // A close is answered with the same code, and nothing is read after it.
        client
            .write_all(&client_frame(0x88, &[0x03, 0xE8, b'b', b'y', b'e']))
            .await
            .unwrap();
        assert!(matches!(ws.next().await, Some(Ok(Message::Close))));
        assert!(ws.next().await.is_none());
        let mut close = [0u8; 4];
        client.read_exact(&mut close).await.unwrap();
        assert_eq!(close, [0x88, 2, 0x03, 0xE8]);
    }

    #[tokio::test]
    async fn broken_frames_are_refused_with_the_error_their_close_code_needs() {
        type Expected = fn(&ReadError) -> bool;
        let cases: Vec<(Vec<u8>, Expected)> = vec![
            (vec![0x81, 0x02, b'h', b'i'], |e| {
                matches!(e, ReadError::Protocol(_)) // unmasked
            }),
            (client_frame(0xC1, b"x"), |e| {
                matches!(e, ReadError::Protocol(_))
            }),
            (client_frame(0x83, b"x"), |e| {
                matches!(e, ReadError::Protocol(_))
            }),
            (client_frame(0x80, b"x"), |e| {
                matches!(e, ReadError::Protocol(_))
            }),
            (client_frame(0x09, b"x"), |e| {
                matches!(e, ReadError::Protocol(_))
            }),
            (client_frame(0x81, &[0xFF, 0xFE]), |e| {
                matches!(e, ReadError::BadUtf8)
            }),
            (client_frame(0x88, &[0x03, 0xEC]), |e| {
                matches!(e, ReadError::Protocol(_)) // 1004 is reserved
            }),
            // Refused by its declared length: the payload is never sent.
            (client_frame(0x81, &[b'a'; 1001])[..14].to_vec(), |e| {
                matches!(e, ReadError::TooBig(1000))
            }),
        ];
        for (bytes, expected) in cases {
            let (mut ws, mut client) = pair(&[]).await;
            client.write_all(&bytes).await.unwrap();
            match ws.next().await {
                Some(Err(e)) if expected(&e) => {}
                other => panic!("{bytes:?}: {other:?}"),
            }
        }
        // Fragments count together against the limit.
        let (mut ws, mut client) = pair(&[]).await;
        let mut bytes = client_frame(0x01, &[b'a'; 600]);
        bytes.extend(client_frame(0x80, &[b'a'; 600]));
        client.write_all(&bytes).await.unwrap();
        assert!(matches!(ws.next().await, Some(Err(ReadError::TooBig(_)))));
        // A client that just goes away broke nothing, and said nothing; nothing is read after.
        let (mut ws, client) = pair(&[]).await;
        drop(client);
        assert!(matches!(ws.next().await, Some(Err(ReadError::Reset))));
        assert!(ws.next().await.is_none());
        // A connection reset is a read error, and nothing is read after it either.
        let (mut ws, client) = pair(&[]).await;
        client.set_zero_linger().unwrap();
        drop(client); // RST instead of FIN
        assert!(matches!(ws.next().await, Some(Err(ReadError::Io(_)))));
        assert!(ws.next().await.is_none());
    }
}
