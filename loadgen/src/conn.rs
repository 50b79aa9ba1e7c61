//! Targets (with the loopback safety check), connecting with a chosen source address (the
//! upgrade is `e2e::wire`'s), the connection in the protocol it speaks (the gateway's JSON
//! frames, or those frames as Socket.IO events), the message `content` codec and per-sender
//! sequence tracking.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use e2e::wire;
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use serde::Serialize;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

use crate::socketio::{self, Packet};

/// What the target speaks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    /// The gateway's JSON text frames (the tutorial's server speaks them too).
    #[default]
    Json,
    /// Socket.IO v5 over Engine.IO v4, websocket transport only: every frame is the payload
    /// of an event (`socketio.rs`); the URL is the server's `/socket.io/?EIO=4&transport=websocket`.
    Socketio,
}

/// A connection: a WebSocket, read and written as gateway frames whatever the protocol.
/// Over Socket.IO, a frame sent goes out as an event, an event received comes in as its
/// payload, the server's pings are answered while reading, and its disconnect reads as a
/// close.
pub struct Ws {
    inner: WebSocketStream<TcpStream>,
    proto: Proto,
    /// Pongs owed to the server (Socket.IO), and whether one is written but not flushed.
    pongs_due: u32,
    unflushed: bool,
}

impl Ws {
    fn new(inner: WebSocketStream<TcpStream>, proto: Proto) -> Ws {
        Ws {
            inner,
            proto,
            pongs_due: 0,
            unflushed: false,
        }
    }

    /// Sends a close frame and flushes (the WebSocket close handshake's first half).
    pub async fn close(&mut self, frame: Option<CloseFrame>) -> Result<(), WsError> {
        self.inner.close(frame).await
    }

    /// Writes the pongs owed and flushes them, as far as the socket takes them now.
    fn poll_pongs(&mut self, cx: &mut TaskContext<'_>) -> Result<(), WsError> {
        while self.pongs_due > 0 {
            match self.inner.poll_ready_unpin(cx) {
                Poll::Ready(Ok(())) => {
                    self.inner.start_send_unpin(Message::text(socketio::PONG))?;
                    self.pongs_due -= 1;
                    self.unflushed = true;
                }
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Pending => break,
            }
        }
        if self.unflushed {
            if let Poll::Ready(r) = self.inner.poll_flush_unpin(cx) {
                self.unflushed = false;
                r?;
            }
        }
        Ok(())
    }

    /// Socket.IO's handshake after the upgrade: the server's open packet, our namespace
    /// connect (`40`), its answer.
    async fn socketio_handshake(&mut self) -> Result<()> {
        let mut opened = false;
        loop {
            let text = match self.inner.next().await {
                Some(Ok(Message::Text(t))) => t,
                Some(Ok(Message::Close(c))) => {
                    bail!("closed in the handshake: {}", wire::close_text(c.as_ref()))
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(e.into()),
                None => bail!("connection ended in the handshake"),
            };
            match socketio::parse(&text)? {
                Packet::Open(_) if !opened => {
                    opened = true;
                    self.inner.send(Message::text(socketio::CONNECT)).await?;
                }
                Packet::Ping => self.inner.send(Message::text(socketio::PONG)).await?,
                Packet::Connect(_) if opened => return Ok(()),
                Packet::ConnectError(e) => bail!("namespace refused: {e}"),
                Packet::Close | Packet::Disconnect => bail!("disconnected in the handshake"),
                other => bail!("unexpected packet in the handshake: {other:?}"),
            }
        }
    }
}

impl Stream for Ws {
    type Item = Result<Message, WsError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.proto == Proto::Json {
            return this.inner.poll_next_unpin(cx);
        }
        loop {
            if let Err(e) = this.poll_pongs(cx) {
                return Poll::Ready(Some(Err(e)));
            }
            let text = match this.inner.poll_next_unpin(cx) {
                Poll::Ready(Some(Ok(Message::Text(t)))) => t,
                other => return other,
            };
            match socketio::parse(&text) {
                Ok(Packet::Event { payload, .. }) => {
                    return Poll::Ready(Some(Ok(Message::text(payload))))
                }
                Ok(Packet::Ping) => this.pongs_due += 1,
                Ok(Packet::Close | Packet::Disconnect | Packet::ConnectError(_)) => {
                    return Poll::Ready(Some(Ok(Message::Close(None))))
                }
                // Not a frame of the protocol: handed on for the reader to count.
                Err(_) => return Poll::Ready(Some(Ok(Message::Text(text)))),
                Ok(_) => {}
            }
        }
    }
}

impl Sink<Message> for Ws {
    type Error = WsError;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Result<(), WsError>> {
        self.get_mut().inner.poll_ready_unpin(cx)
    }

    fn start_send(self: Pin<&mut Self>, item: Message) -> Result<(), WsError> {
        let this = self.get_mut();
        let item = match (this.proto, item) {
            (Proto::Socketio, Message::Text(t)) => Message::text(socketio::frame_as_event(&t)),
            (_, item) => item,
        };
        this.inner.start_send_unpin(item)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Result<(), WsError>> {
        self.get_mut().inner.poll_flush_unpin(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Result<(), WsError>> {
        self.get_mut().inner.poll_close_unpin(cx)
    }
}

/// One `ws://host:port/path` target, resolved.
#[derive(Debug, Clone)]
pub struct Target {
    pub url: String,
    pub addr: SocketAddr,
}

/// Parses and checks the targets: `ws://` only; the host must be a loopback address (or
/// `localhost`) unless it is named by `--allow-host`.
pub fn parse_targets(urls: &[String], allow: &[String]) -> Result<Vec<Target>> {
    let mut out = Vec::new();
    for url in urls.iter().flat_map(|u| u.split(',')).map(str::trim) {
        if url.is_empty() {
            continue;
        }
        let rest = url
            .strip_prefix("ws://")
            .ok_or_else(|| anyhow!("{url}: only ws:// URLs are supported"))?;
        let hostport = rest.split('/').next().unwrap_or(rest);
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (
                h.trim_start_matches('[').trim_end_matches(']'),
                p.parse::<u16>()
                    .with_context(|| format!("{url}: bad port"))?,
            ),
            _ => (hostport, 80),
        };
        let allowed = allow.iter().any(|a| a == host);
        let addrs: Vec<SocketAddr> = (host, port)
            .to_socket_addrs()
            .with_context(|| format!("{url}: cannot resolve {host}"))?
            .collect();
        let addr = addrs
            .iter()
            .find(|a| a.is_ipv4())
            .or(addrs.first())
            .copied()
            .ok_or_else(|| anyhow!("{url}: {host} has no address"))?;
        if !addr.ip().is_loopback() && !allowed {
            bail!(
                "{url}: {host} is not a loopback address; name it with --allow-host {host} \
                 if you really mean to load it"
            );
        }
        out.push(Target {
            url: url.to_string(),
            addr,
        });
    }
    if out.is_empty() {
        bail!("no --url given");
    }
    Ok(out)
}

/// Source addresses 127.0.0.(2 + first) .. for `count` addresses (IPv4 loopback targets only).
pub fn source_addrs(first: usize, count: usize) -> Vec<IpAddr> {
    (0..count)
        .map(|i| {
            let n = 2 + first + i;
            IpAddr::V4(Ipv4Addr::new(
                127,
                (n / 65536 % 256) as u8,
                (n / 256 % 256) as u8,
                (n % 256) as u8,
            ))
        })
        .collect()
}

/// Opens a TCP connection (from `source` when the target is IPv4 loopback), does the
/// WebSocket handshake, and Socket.IO's when the target speaks it.
pub async fn connect(
    target: &Target,
    proto: Proto,
    source: Option<IpAddr>,
    timeout: Duration,
) -> Result<Ws> {
    let fut = async {
        let socket = if target.addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        if let (Some(src), true) = (
            source,
            target.addr.ip().is_loopback() && target.addr.is_ipv4(),
        ) {
            // Pick the port at connect time (per 4-tuple), not at bind time: a port bound
            // with port 0 is taken from the machine's shared ephemeral range for every
            // destination, which nginx's own upstream connections would then run out of.
            nix::sys::socket::setsockopt(
                &socket,
                nix::sys::socket::sockopt::IpBindAddressNoPort,
                &true,
            )?;
            socket.bind(SocketAddr::new(src, 0))?;
        }
        let stream = socket.connect(target.addr).await?;
        stream.set_nodelay(true)?;
        let ws =
            wire::connect_over(&target.url, stream, &wire::Opts::default().small_buffers()).await?;
        let mut ws = Ws::new(ws, proto);
        if proto == Proto::Socketio {
            ws.socketio_handshake().await?;
        }
        Ok(ws)
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| anyhow!("connect timeout"))?
}

/// A chat `content`: `t=<send µs>;s=<sender>;q=<seq>;` padded with `x` to `size` bytes.
pub fn encode_content(t_us: u64, sender: u64, seq: u64, size: usize) -> String {
    let mut s = format!("t={t_us};s={sender};q={seq};");
    while s.len() < size {
        s.push('x');
    }
    s
}

/// Parses what `encode_content` wrote: (send µs, sender, seq).
pub fn parse_content(content: &str) -> Option<(u64, u64, u64)> {
    let mut t = None;
    let mut s = None;
    let mut q = None;
    for part in content.split(';').take(3) {
        let (k, v) = part.split_once('=')?;
        let v: u64 = v.parse().ok()?;
        match k {
            "t" => t = Some(v),
            "s" => s = Some(v),
            "q" => q = Some(v),
            _ => return None,
        }
    }
    Some((t?, s?, q?))
}

/// What a received sequence number was.
#[derive(Debug, PartialEq, Eq)]
pub enum SeqKind {
    New,
    OutOfOrder,
    Duplicate,
}

/// Sequence numbers (from 1) received from one sender: the highest, plus the gaps below it.
#[derive(Default, Debug)]
pub struct SeqTrack {
    max: u64,
    /// Missing ranges below `max`, inclusive.
    gaps: Vec<(u64, u64)>,
}

impl SeqTrack {
    pub fn record(&mut self, q: u64) -> SeqKind {
        if q == self.max + 1 {
            self.max = q;
            return SeqKind::New;
        }
        if q > self.max {
            self.gaps.push((self.max + 1, q - 1));
            self.max = q;
            return SeqKind::New;
        }
        if let Some(i) = self.gaps.iter().position(|&(lo, hi)| lo <= q && q <= hi) {
            let (lo, hi) = self.gaps[i];
            self.gaps.remove(i);
            if lo < q {
                self.gaps.push((lo, q - 1));
            }
            if q < hi {
                self.gaps.push((q + 1, hi));
            }
            return SeqKind::OutOfOrder;
        }
        SeqKind::Duplicate
    }

    #[cfg(test)]
    pub fn max(&self) -> u64 {
        self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_roundtrip() {
        let c = encode_content(1_732_550_000_123_456, 7, 42, 100);
        assert_eq!(c.len(), 100);
        assert_eq!(parse_content(&c), Some((1_732_550_000_123_456, 7, 42)));
        assert_eq!(parse_content("hello"), None);
    }

    #[test]
    fn seq_tracking() {
        let mut t = SeqTrack::default();
        assert_eq!(t.record(1), SeqKind::New);
        assert_eq!(t.record(2), SeqKind::New);
        assert_eq!(t.record(5), SeqKind::New);
        assert_eq!(t.record(2), SeqKind::Duplicate);
        assert_eq!(t.record(4), SeqKind::OutOfOrder);
        assert_eq!(t.record(4), SeqKind::Duplicate);
        assert_eq!(t.record(3), SeqKind::OutOfOrder);
        assert_eq!(t.record(6), SeqKind::New);
        assert_eq!(t.max(), 6);
    }

    #[test]
    fn refuses_non_loopback() {
        assert!(parse_targets(&["ws://127.0.0.1:9000/ws".into()], &[]).is_ok());
        assert!(parse_targets(&["ws://localhost:9000/ws,ws://127.0.0.3:1/".into()], &[]).is_ok());
        assert!(parse_targets(&["http://127.0.0.1:9000/".into()], &[]).is_err());
        assert!(parse_targets(&["ws://10.1.2.3:9000/ws".into()], &[]).is_err());
        assert!(parse_targets(&["ws://10.1.2.3:9000/ws".into()], &["10.1.2.3".into()]).is_ok());
    }
}
