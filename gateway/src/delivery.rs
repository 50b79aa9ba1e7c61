//! At-least-once delivery: each connection's position in each stream it reads (a room or its
//! inbox) — what was delivered, what awaits an ack, when to send again — and the node's
//! coalescing writer of acknowledged positions (at most one write per user and stream per
//! flush interval, all in one pipelined round trip).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tungstenite::Utf8Bytes;

use crate::broker::{Broker, Position, Topic};
use crate::protocol::StreamId;

/// A message sent but not yet acknowledged.
#[derive(Debug, Clone)]
pub struct Pending {
    pub id: StreamId,
    pub frame: Utf8Bytes,
    pub sent_at: Instant,
    pub redeliveries: u32,
}

/// Redelivery verdict for one stream.
#[derive(Debug, PartialEq)]
pub enum Redelivery {
    /// Frames to send again now (possibly none).
    Resend(Vec<Utf8Bytes>),
    /// A message went unacknowledged more than the allowed number of redeliveries.
    LimitReached,
}

/// One connection's reading position in one stream.
#[derive(Debug, Default)]
pub struct StreamCursor {
    /// Highest id written to the client (live or replayed).
    pub last_delivered: StreamId,
    /// A replay is being paged: live messages are left to the next pages.
    pub paging: bool,
    /// Sent, awaiting an ack (ack mode only), in id order.
    pub unacked: VecDeque<Pending>,
    /// Bytes of the frames in `unacked`.
    pub unacked_bytes: usize,
}

impl StreamCursor {
    /// Whether a live message should be written: not while paging, and not if a replay
    /// already delivered it. Advances the position when it should.
    pub fn accept_live(&mut self, id: StreamId) -> bool {
        if self.paging || id <= self.last_delivered {
            return false;
        }
        self.last_delivered = id;
        true
    }

    /// Records a replayed message as delivered.
    pub fn replayed(&mut self, id: StreamId) {
        self.last_delivered = self.last_delivered.max(id);
    }

    pub fn track(&mut self, id: StreamId, frame: Utf8Bytes, now: Instant) {
        self.unacked_bytes += frame.len();
        self.unacked.push_back(Pending {
            id,
            frame,
            sent_at: now,
            redeliveries: 0,
        });
    }

    /// Cumulative ack: forgets every pending message up to `id`. Returns how many.
    pub fn ack(&mut self, id: StreamId) -> usize {
        let before = self.unacked.len();
        let mut freed = 0;
        self.unacked.retain(|p| {
            let keep = p.id > id;
            if !keep {
                freed += p.frame.len();
            }
            keep
        });
        self.unacked_bytes -= freed;
        before - self.unacked.len()
    }

    /// Collects the messages due again at `now`.
    pub fn due(&mut self, now: Instant, timeout: Duration, max_redeliveries: u32) -> Redelivery {
        let mut frames = Vec::new();
        for pending in self.unacked.iter_mut() {
            if pending.sent_at + timeout > now {
                continue;
            }
            if pending.redeliveries >= max_redeliveries {
                return Redelivery::LimitReached;
            }
            pending.redeliveries += 1;
            pending.sent_at = now;
            frames.push(pending.frame.clone());
        }
        Redelivery::Resend(frames)
    }
}

/// Coalesces acknowledged positions and writes them to the broker periodically.
pub struct AckStore {
    /// Positions by (user, topic).
    dirty: Mutex<HashMap<(String, Topic), StreamId>>,
    /// Users whose inbox was read and acknowledged up to an id: trimmed at the flush.
    read: Mutex<HashMap<String, StreamId>>,
    broker: Broker,
}

/// How often acknowledged positions are written (at most one write per user and stream).
pub const ACK_FLUSH_INTERVAL: Duration = Duration::from_millis(100);

impl AckStore {
    pub fn new(broker: Broker) -> AckStore {
        AckStore {
            dirty: Mutex::new(HashMap::new()),
            read: Mutex::new(HashMap::new()),
            broker,
        }
    }

    /// Notes that `user` acknowledged `topic` up to `id`.
    pub fn record(&self, user: String, topic: Topic, id: StreamId) {
        let mut dirty = self.dirty.lock().expect("ack store lock");
        let slot = dirty.entry((user, topic)).or_insert(id);
        *slot = (*slot).max(id);
    }

    /// Notes that `user` read and acknowledged its inbox up to `id`.
    pub fn record_read(&self, user: String, id: StreamId) {
        let mut read = self.read.lock().expect("ack store lock");
        let slot = read.entry(user).or_insert(id);
        *slot = (*slot).max(id);
    }

    /// Writes everything recorded since the last flush in one round trip (plus one for
    /// trimming read inboxes, when there are any).
    pub async fn flush(&self) {
        let read: Vec<(String, StreamId)> =
            self.read.lock().expect("ack store lock").drain().collect();
        if let Err(e) = self.broker.trim_inboxes(&read).await {
            // Not retried: the next acknowledgement trims as far.
            tracing::debug!("trimming read inboxes failed: {e}");
        }
        let batch: Vec<Position> = {
            let mut dirty = self.dirty.lock().expect("ack store lock");
            dirty
                .drain()
                .map(|((user, topic), id)| Position { user, topic, id })
                .collect()
        };
        if batch.is_empty() {
            return;
        }
        if let Err(e) = self.broker.save_positions(&batch).await {
            tracing::debug!("saving acknowledged positions failed, will retry: {e}");
            for p in batch {
                self.record(p.user, p.topic, p.id);
            }
        }
    }

    /// Flushes every interval until `shutdown`, then once more.
    pub fn spawn_flusher(
        self: Arc<Self>,
        shutdown: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(ACK_FLUSH_INTERVAL);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tick.tick() => self.flush().await,
                }
            }
            self.flush().await;
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(ms: u64) -> StreamId {
        StreamId { ms, seq: 0 }
    }

    #[test]
    fn live_messages_after_a_replay_are_not_repeated() {
        let mut cursor = StreamCursor::default();
        cursor.replayed(id(5));
        assert!(!cursor.accept_live(id(4)));
        assert!(!cursor.accept_live(id(5)));
        assert!(cursor.accept_live(id(6)));
        cursor.paging = true;
        assert!(!cursor.accept_live(id(7)), "paging defers live messages");
    }

    #[test]
    fn acks_are_cumulative_and_redelivery_is_bounded() {
        let start = Instant::now();
        let timeout = Duration::from_millis(100);
        let mut cursor = StreamCursor::default();
        for ms in 1..=3 {
            cursor.track(id(ms), Utf8Bytes::from(format!("m{ms}")), start);
        }
        assert_eq!(cursor.ack(id(2)), 2);
        assert_eq!(
            cursor.due(start + Duration::from_millis(50), timeout, 2),
            Redelivery::Resend(vec![])
        );
        let t1 = start + timeout;
        assert_eq!(
            cursor.due(t1, timeout, 2),
            Redelivery::Resend(vec!["m3".into()])
        );
        let t2 = t1 + timeout;
        assert_eq!(
            cursor.due(t2, timeout, 2),
            Redelivery::Resend(vec!["m3".into()])
        );
        assert_eq!(
            cursor.due(t2 + timeout, timeout, 2),
            Redelivery::LimitReached
        );
        assert_eq!(cursor.ack(id(3)), 1);
        assert!(cursor.unacked.is_empty());
    }
}
