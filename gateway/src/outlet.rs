//! A connection's socket, written by two hands: the connection's own task (answers, replays,
//! pongs and the close, through the WebSocket layer) and the hub's dispatcher (deliveries,
//! framed once per node and written straight into the kernel, without waking the task).
//! Frames leave whole and in the order they were handed in; what the kernel does not take yet
//! waits here, bounded.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use futures_util::task::AtomicWaker;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tungstenite::protocol::CloseFrame;
use tungstenite::Message;

/// Slices per vectored write (the kernel's limit is 1024; a batch of frames is far smaller).
const SLICES_PER_WRITE: usize = 64;

/// Bytes the connection's own task may leave waiting before its writes wait for the reader (a
/// replay is paced by the client's reading, not buffered whole).
const OWN_WRITES_WAITING: usize = 256 * 1024;

/// The WebSocket frame of a server text message. Server frames are unmasked, so these bytes
/// are the same for every recipient: a delivery is framed once per node.
pub fn text_frame(payload: &[u8]) -> Bytes {
    let mut frame = BytesMut::with_capacity(payload.len() + 10);
    frame.extend_from_slice(&[0x81]); // FIN + text
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

/// Why a frame was not written.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// More frames wait for the kernel than the connection may hold (a slow consumer).
    #[error("the connection's outbound backlog is full")]
    Full,
    #[error("the socket is broken: {0}")]
    Broken(#[from] io::Error),
}

/// What the kernel has not taken yet, in order: whole frames, the first perhaps begun.
#[derive(Default)]
struct Backlog {
    parts: VecDeque<Bytes>,
    bytes: usize,
    /// The socket failed: nothing more is written (the reader sees the error too).
    broken: bool,
}

impl Backlog {
    /// Writes what waits, then `frames`, as far as the kernel takes them; the rest waits.
    fn write(&mut self, tcp: &TcpStream, frames: &[Bytes]) -> io::Result<()> {
        if self.broken {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        if !self.parts.is_empty() {
            // Behind what waits: queued, and the kernel offered all of it at once.
            for frame in frames {
                self.push(frame.clone());
            }
            return self.drain(tcp).map(|_| ());
        }
        let mut rest = frames;
        let mut skip = 0; // bytes of rest[0] already written
        let mut slices = [IoSlice::new(&[]); SLICES_PER_WRITE];
        while !rest.is_empty() {
            let n = rest.len().min(SLICES_PER_WRITE);
            for (i, frame) in rest[..n].iter().enumerate() {
                slices[i] = IoSlice::new(if i == 0 { &frame[skip..] } else { frame });
            }
            let written = match tcp.try_write_vectored(&slices[..n]) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(self.fail(e)),
            };
            let mut left = written;
            while let Some(first) = rest.first() {
                let remaining = first.len() - skip;
                if left < remaining {
                    skip += left;
                    break;
                }
                left -= remaining;
                skip = 0;
                rest = &rest[1..];
            }
        }
        if let Some((first, others)) = rest.split_first() {
            self.push(first.slice(skip..));
            for frame in others {
                self.push(frame.clone());
            }
        }
        Ok(())
    }

    fn push(&mut self, part: Bytes) {
        if !part.is_empty() {
            self.bytes += part.len();
            self.parts.push_back(part);
        }
    }

    fn fail(&mut self, e: io::Error) -> io::Error {
        self.broken = true;
        self.parts.clear();
        self.bytes = 0;
        e
    }

    /// Writes what waits as far as the kernel takes it; `true` once nothing waits.
    fn drain(&mut self, tcp: &TcpStream) -> io::Result<bool> {
        while !self.parts.is_empty() {
            let mut slices = [IoSlice::new(&[]); SLICES_PER_WRITE];
            let n = self.parts.len().min(SLICES_PER_WRITE);
            for (slot, part) in slices.iter_mut().zip(self.parts.iter()) {
                *slot = IoSlice::new(part);
            }
            let mut written = match tcp.try_write_vectored(&slices[..n]) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(self.fail(e)),
            };
            self.bytes -= written;
            while written > 0 {
                let first = self.parts.front_mut().expect("written bytes were waiting");
                if written < first.len() {
                    first.advance(written);
                    break;
                }
                written -= first.len();
                self.parts.pop_front();
            }
        }
        Ok(true)
    }
}

/// The write side of one connection's socket, shared by its task and the dispatcher.
pub struct Outlet {
    tcp: Arc<TcpStream>,
    backlog: Mutex<Backlog>,
    /// Most frames that may wait for the kernel (GATEWAY_OUTBOUND_QUEUE).
    max_waiting: usize,
    /// The connection's task, woken when frames start to wait (it writes them out as the
    /// socket becomes writable).
    task: AtomicWaker,
}

impl Outlet {
    pub fn new(tcp: Arc<TcpStream>, max_waiting: usize) -> Outlet {
        Outlet {
            tcp,
            backlog: Mutex::new(Backlog::default()),
            max_waiting: max_waiting.max(1),
            task: AtomicWaker::new(),
        }
    }

    fn backlog(&self) -> MutexGuard<'_, Backlog> {
        // A panic while writing leaves nothing half-done that matters more than the socket.
        self.backlog
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Writes deliveries' frames now, or queues them behind what waits. Refused whole when
    /// the connection already holds its share of waiting frames.
    pub fn deliver(&self, frames: &[Bytes]) -> Result<(), WriteError> {
        let mut backlog = self.backlog();
        if backlog.parts.len() + frames.len() > self.max_waiting && !backlog.parts.is_empty() {
            // Give the kernel a chance first: the reader may have caught up.
            backlog.drain(&self.tcp)?;
            if backlog.parts.len() + frames.len() > self.max_waiting {
                return Err(WriteError::Full);
            }
        }
        self.write(&mut backlog, frames)?;
        Ok(())
    }

    /// Writes the connection task's own frames now, or queues them behind what waits (the
    /// task bounds them by waiting for the reader, see [`WebSocket::flush`]).
    pub fn write_own(&self, frames: &[Bytes]) -> io::Result<()> {
        self.write(&mut self.backlog(), frames)
    }

    /// Writes behind what waits; wakes the connection's task when frames start to wait.
    fn write(&self, backlog: &mut Backlog, frames: &[Bytes]) -> io::Result<()> {
        let was_empty = backlog.parts.is_empty();
        backlog.write(&self.tcp, frames)?;
        if was_empty && !backlog.parts.is_empty() {
            self.task.wake();
        }
        Ok(())
    }

    /// Frames (or parts of one) waiting for the kernel.
    #[cfg(test)]
    fn waiting(&self) -> usize {
        self.backlog().parts.len()
    }

    /// Writes out what waits as the socket takes it; ready once nothing waits (or the socket
    /// broke). The connection's task polls this whenever it waits for anything else.
    pub fn poll_drained(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.task.register(cx.waker());
        loop {
            if self.backlog().drain(&self.tcp)? {
                return Poll::Ready(Ok(()));
            }
            // Not writable now: wait until it is (readiness was cleared by the failed write).
            match self.tcp.poll_write_ready(cx) {
                Poll::Ready(Ok(())) => continue,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    /// Waits until frames wait, then until they are written out.
    pub async fn drained_backlog(&self) -> io::Result<()> {
        std::future::poll_fn(|cx| {
            self.task.register(cx.waker());
            if self.backlog().parts.is_empty() {
                return Poll::Pending; // woken by `deliver` when frames start to wait
            }
            self.poll_drained(cx)
        })
        .await
    }
}

/// The socket as the WebSocket layer sees it: reads (after whatever the HTTP layer read ahead)
/// from the socket, writes into the outlet. A write is taken whole or not at all, so the
/// dispatcher's frames never land inside one of the task's.
pub struct SharedSocket {
    outlet: Arc<Outlet>,
    read_ahead: Bytes,
}

impl SharedSocket {
    pub fn new(outlet: Arc<Outlet>, read_ahead: Bytes) -> SharedSocket {
        // Copied out: the HTTP layer's bytes share its whole read buffer (kilobytes), which
        // would otherwise stay allocated for the connection's life.
        let read_ahead = Bytes::copy_from_slice(&read_ahead);
        SharedSocket { outlet, read_ahead }
    }
}

impl AsyncRead for SharedSocket {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.read_ahead.is_empty() {
            let n = self.read_ahead.len().min(buf.remaining());
            buf.put_slice(&self.read_ahead[..n]);
            self.read_ahead.advance(n);
            if self.read_ahead.is_empty() {
                self.read_ahead = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        let tcp = &self.outlet.tcp;
        loop {
            std::task::ready!(tcp.poll_read_ready(cx))?;
            match tcp.try_read(buf.initialize_unfilled()) {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for SharedSocket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let outlet = &self.outlet;
        if outlet.backlog().bytes > OWN_WRITES_WAITING {
            std::task::ready!(outlet.poll_drained(cx))?;
        }
        outlet.write_own(&[Bytes::copy_from_slice(buf)])?;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.outlet.poll_drained(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The socket closes when the connection's last handle on it is dropped.
        self.outlet.poll_drained(cx)
    }
}

/// One connection's WebSocket as its task uses it. The WebSocket layer reads frames (and
/// answers pings, and writes the close); the task's own text frames are framed here and go
/// through the outlet like deliveries, so the layer's write buffer never grows past a control
/// frame. Small to move: the stream itself is boxed.
pub struct WebSocket {
    stream: Box<tokio_tungstenite::WebSocketStream<SharedSocket>>,
    outlet: Arc<Outlet>,
    /// Frames fed and not yet flushed.
    batch: Vec<Bytes>,
}

impl WebSocket {
    pub fn new(
        stream: tokio_tungstenite::WebSocketStream<SharedSocket>,
        outlet: Arc<Outlet>,
    ) -> WebSocket {
        WebSocket {
            stream: Box::new(stream),
            outlet,
            batch: Vec::new(),
        }
    }

    pub fn outlet(&self) -> &Arc<Outlet> {
        &self.outlet
    }

    /// The next message from the client (`None` once the connection is over).
    pub async fn next(&mut self) -> Option<Result<Message, tungstenite::Error>> {
        self.stream.next().await
    }

    /// Adds a text frame to the next flush.
    pub fn feed(&mut self, text: &[u8]) {
        self.batch.push(text_frame(text));
    }

    /// Writes what was fed (and any pong the layer owes), then waits until the kernel took
    /// everything waiting for this connection: a client that does not read holds the task
    /// here, not memory.
    pub async fn flush(&mut self) -> Result<(), tungstenite::Error> {
        if !self.batch.is_empty() {
            // Taken, not cleared: a replay's long list is not kept for the connection's life.
            let batch = std::mem::take(&mut self.batch);
            self.outlet.write_own(&batch)?;
        }
        self.stream.flush().await
    }

    /// Writes the close frame after everything else.
    pub async fn close(&mut self, frame: CloseFrame) -> Result<(), tungstenite::Error> {
        self.flush().await?;
        self.stream.send(Message::Close(Some(frame))).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

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

    async fn pair() -> (Arc<Outlet>, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap());
        let (client, (server, _)) =
            tokio::join!(client, async { listener.accept().await.unwrap() });
        (Arc::new(Outlet::new(Arc::new(server), 4)), client.unwrap())
    }

    #[tokio::test]
    async fn frames_arrive_whole_and_in_order_and_a_full_backlog_refuses_more() {
        let (outlet, mut reader) = pair().await;
        let frame = text_frame(&[b'x'; 60_000]);
        // Fill the kernel's buffers until frames wait, then the backlog's four places.
        let mut sent = 0;
        let refused = loop {
            match outlet.deliver(std::slice::from_ref(&frame)) {
                Ok(()) => sent += 1,
                Err(WriteError::Full) => break true,
                Err(e) => panic!("{e}"),
            }
            assert!(sent < 10_000, "the backlog never filled");
        };
        assert!(refused && outlet.waiting() == 4);
        // The reader takes everything; the connection's task writes the backlog out.
        let drain = {
            let outlet = outlet.clone();
            tokio::spawn(async move { outlet.drained_backlog().await })
        };
        let mut got = vec![0u8; frame.len() * sent];
        reader.read_exact(&mut got).await.unwrap();
        drain.await.unwrap().unwrap();
        assert!(got.chunks(frame.len()).all(|c| c == &frame[..]));
        assert_eq!(outlet.waiting(), 0);
    }
}
