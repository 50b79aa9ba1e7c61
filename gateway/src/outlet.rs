//! A connection's socket, written by two hands: the connection's own task (answers, replays,
//! pongs and the close, through its `WebSocket`) and the hub's dispatcher (deliveries,
//! framed once per node and written straight into the kernel, without waking the task).
//! Frames leave whole and in the order they were handed in; what the kernel does not take yet
//! waits here, bounded.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::sync::{Mutex, MutexGuard};
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use futures_util::task::AtomicWaker;
use tokio::net::TcpStream;

/// Slices per vectored write (the kernel's limit is 1024; a batch of frames is far smaller).
const SLICES_PER_WRITE: usize = 64;

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
            let written = match write_slices(tcp, &slices[..n]) {
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
            let mut written = match write_slices(tcp, &slices[..n]) {
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

/// One `write` for one slice (the common case, a single delivery: the kernel's `writev` first
/// copies and checks the vector, which costs a measurable share of a small write), one
/// `writev` for several.
fn write_slices(tcp: &TcpStream, slices: &[IoSlice<'_>]) -> io::Result<usize> {
    match slices {
        [one] => tcp.try_write(one),
        _ => tcp.try_write_vectored(slices),
    }
}

/// The write side of one connection's socket, shared by its task and the dispatcher.
pub struct Outlet {
    tcp: TcpStream,
    backlog: Mutex<Backlog>,
    /// Most frames that may wait for the kernel (GATEWAY_OUTBOUND_QUEUE).
    max_waiting: usize,
    /// The connection's task, woken when frames start to wait (it writes them out as the
    /// socket becomes writable).
    task: AtomicWaker,
}

impl Outlet {
    pub fn new(tcp: TcpStream, max_waiting: usize) -> Outlet {
        Outlet {
            tcp,
            backlog: Mutex::new(Backlog::default()),
            max_waiting: max_waiting.max(1),
            task: AtomicWaker::new(),
        }
    }

    /// Wakes the connection's task (registered by its waits on the outlet).
    pub fn wake_task(&self) {
        self.task.wake();
    }

    /// Registers the connection's task to be woken by `wake_task` (and by frames starting to
    /// wait).
    pub fn register_task(&self, waker: &std::task::Waker) {
        self.task.register(waker);
    }

    /// The socket, for its reader.
    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::websocket::text_frame;
    use std::sync::Arc;
    use tokio::io::AsyncReadExt;

    async fn pair() -> (Arc<Outlet>, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap());
        let (client, (server, _)) =
            tokio::join!(client, async { listener.accept().await.unwrap() });
        (Arc::new(Outlet::new(server, 4)), client.unwrap())
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
