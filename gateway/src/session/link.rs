//! What the hub's dispatcher needs of a connection to deliver to it without waking its task:
//! the outlet, the connection's stream cursors and delivery rules (ack mode, proven identity,
//! the tutorial's userId echo), and the deliveries held back while the task writes itself.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use bytes::Bytes;

use super::Close;
use crate::broker::{now_us, Kind, Topic};
use crate::delivery::StreamCursor;
use crate::hub::Delivery;
use crate::metrics::Metrics;
use crate::outlet::{Outlet, WriteError};
use crate::websocket::text_frame;
use prometheus::local::LocalHistogram;
use tungstenite::Utf8Bytes;

/// One connection as the hub sees it.
pub struct Link {
    pub conn_id: u64,
    outlet: Arc<Outlet>,
    state: Mutex<LinkState>,
    /// Set when the connection must close (`LinkState::doom` says why); the connection's
    /// task is woken through the outlet.
    doomed: AtomicBool,
    metrics: Arc<Metrics>,
    /// Most deliveries held while the task writes (GATEWAY_OUTBOUND_QUEUE).
    max_held: usize,
}

/// The connection's delivery state, shared by its task and the dispatcher.
#[derive(Default)]
pub struct LinkState {
    /// One cursor per stream-backed topic the connection listens on (rooms, its inbox).
    pub cursors: Vec<(Arc<Topic>, StreamCursor)>,
    /// Identity proven by a token: direct messages are written.
    pub proven: bool,
    pub ack_mode: bool,
    /// The tutorial page's own messages come back with the userId it sent: (what the frame
    /// says, what this connection's copy says instead).
    pub echo: Option<(String, String)>,
    pub unacked_limit: usize,
    pub unacked_bytes_limit: usize,
    /// Deliveries that came while the task was writing (they follow its frames).
    held: Option<Vec<Arc<Delivery>>>,
    /// Why the connection must close, once it must.
    doom: Option<Close>,
}

impl LinkState {
    /// A connection that listens on nothing yet.
    pub fn new(unacked_limit: usize, unacked_bytes_limit: usize) -> LinkState {
        LinkState {
            unacked_limit,
            unacked_bytes_limit,
            ..LinkState::default()
        }
    }

    /// Starts listening on a stream-backed topic, from nothing delivered yet. The cursors grow
    /// one at a time: most connections listen on one room, and a first growth holds four.
    pub fn listen(&mut self, topic: Arc<Topic>) {
        self.cursors.reserve_exact(1);
        self.cursors.push((topic, StreamCursor::default()));
    }

    pub fn cursor(&mut self, topic: &Topic) -> Option<&mut StreamCursor> {
        self.cursors
            .iter_mut()
            .find(|(t, _)| **t == *topic)
            .map(|(_, c)| c)
    }

    /// Unacknowledged messages are kept for redelivery: bounded in number and in bytes, or
    /// the connection is closed as a slow consumer (4008).
    pub fn check_unacked(&self) -> Result<(), Close> {
        let (mut frames, mut bytes) = (0, 0);
        for (_, cursor) in &self.cursors {
            frames += cursor.unacked.len();
            bytes += cursor.unacked_bytes;
        }
        if frames > self.unacked_limit || bytes > self.unacked_bytes_limit {
            return Err(Close::SLOW);
        }
        Ok(())
    }

    /// Decides whether a delivery is written to this connection (and tracks it for acks);
    /// returns the frame's wire bytes.
    pub fn accept(&mut self, conn_id: u64, delivery: &Delivery) -> Result<Option<Bytes>, Close> {
        let topic = &delivery.topic;
        let cursor = match delivery.kind {
            Kind::Presence => return Ok(Some(delivery.wire.clone())),
            Kind::Control => return Err(Close::API_DISCONNECT),
            // Anyone may claim any name in anonymous mode: no direct message for them.
            Kind::Direct if !self.proven => None,
            Kind::Message | Kind::Direct => self
                .cursors
                .iter_mut()
                .find(|(t, _)| Arc::ptr_eq(t, topic) || **t == **topic)
                .map(|(_, c)| c),
        };
        let (Some(cursor), Some(id)) = (cursor, delivery.id) else {
            return Ok(None); // left the room meanwhile
        };
        if !cursor.accept_live(id) {
            return Ok(None);
        }
        let mut wire = delivery.wire.clone();
        let mut frame = delivery.frame.clone();
        if let Some((ours, echoed)) = &self.echo {
            if delivery.sender_conn == Some(conn_id) && delivery.kind == Kind::Message {
                // Only this connection's copy is rewritten.
                frame = Utf8Bytes::from(frame.as_str().replacen(ours, echoed, 1));
                wire = text_frame(frame.as_bytes());
            }
        }
        if self.ack_mode {
            cursor.track(id, frame, std::time::Instant::now());
            self.check_unacked()?;
        }
        Ok(Some(wire))
    }
}

impl Link {
    pub fn new(
        conn_id: u64,
        outlet: Arc<Outlet>,
        metrics: Arc<Metrics>,
        max_held: usize,
        state: LinkState,
    ) -> Link {
        Link {
            conn_id,
            outlet,
            state: Mutex::new(state),
            doomed: AtomicBool::new(false),
            metrics,
            max_held: max_held.max(1),
        }
    }

    pub fn outlet(&self) -> &Arc<Outlet> {
        &self.outlet
    }

    pub fn state(&self) -> MutexGuard<'_, LinkState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Ready, with the reason, once the connection must close.
    pub fn poll_doomed(&self, cx: &mut Context<'_>) -> Poll<Close> {
        self.outlet.register_task(cx.waker());
        if !self.doomed.load(Ordering::Acquire) {
            return Poll::Pending;
        }
        Poll::Ready(self.state().doom.unwrap_or(Close::BROKEN))
    }

    fn doom(&self, state: &mut LinkState, close: Close) {
        if state.doom.is_none() {
            state.doom = Some(close);
            state.held = None;
        }
        self.doomed.store(true, Ordering::Release);
        self.outlet.wake_task();
    }

    /// Called by the dispatcher: writes the deliveries this connection takes, straight into
    /// the socket, or holds them while the connection's task is writing. Returns how many
    /// were written; their latencies go into `latency` (flushed by the caller).
    pub fn offer(&self, deliveries: &[Arc<Delivery>], latency: &LocalHistogram) -> u64 {
        let mut state = self.state();
        if state.doom.is_some() {
            return 0;
        }
        if let Some(held) = &mut state.held {
            if held.len() + deliveries.len() > self.max_held {
                self.metrics.outbound_dropped.inc();
                self.doom(&mut state, Close::SLOW);
            } else {
                held.extend(deliveries.iter().cloned());
            }
            return 0;
        }
        self.write(&mut state, deliveries, latency)
    }

    fn write(
        &self,
        state: &mut LinkState,
        deliveries: &[Arc<Delivery>],
        latency: &LocalHistogram,
    ) -> u64 {
        let now_us = now_us();
        let mut accepted = |delivery: &Delivery| match state.accept(self.conn_id, delivery) {
            Ok(Some(wire)) => {
                latency.observe(now_us.saturating_sub(delivery.published_us) as f64 / 1e6);
                Ok(Some(wire))
            }
            other => other,
        };
        // One delivery (chat rates): no list to gather.
        let written = if let [delivery] = deliveries {
            match accepted(delivery) {
                Ok(Some(wire)) => self.outlet.deliver(std::slice::from_ref(&wire)).map(|_| 1),
                Ok(None) => return 0,
                Err(close) => return self.doom_with(state, close),
            }
        } else {
            let mut frames = Vec::with_capacity(deliveries.len());
            for delivery in deliveries {
                match accepted(delivery) {
                    Ok(Some(wire)) => frames.push(wire),
                    Ok(None) => {}
                    Err(close) => return self.doom_with(state, close),
                }
            }
            if frames.is_empty() {
                return 0;
            }
            self.outlet.deliver(&frames).map(|_| frames.len() as u64)
        };
        match written {
            Ok(n) => n,
            Err(WriteError::Full) => {
                self.metrics.outbound_dropped.inc();
                self.doom_with(state, Close::SLOW)
            }
            Err(WriteError::Broken(_)) => self.doom_with(state, Close::BROKEN),
        }
    }

    fn doom_with(&self, state: &mut LinkState, close: Close) -> u64 {
        self.doom(state, close);
        0
    }

    /// The connection's task is about to write: deliveries wait until `release`.
    pub fn hold(&self) {
        let mut state = self.state();
        if state.held.is_none() && state.doom.is_none() {
            state.held = Some(Vec::new());
        }
    }

    /// The task's frames are all in the outlet: what was held goes out after them.
    pub fn release(&self) -> Result<(), Close> {
        let mut state = self.state();
        if let Some(held) = state.held.take() {
            let latency = self.metrics.fanout_latency.local();
            let written = self.write(&mut state, &held, &latency);
            latency.flush();
            self.metrics.messages_delivered.inc_by(written);
        }
        match state.doom {
            Some(close) => Err(close),
            None => Ok(()),
        }
    }

    /// Called by the task on its way out: nothing more is delivered.
    pub fn end(&self, close: Close) {
        let mut state = self.state();
        self.doom(&mut state, close);
    }
}

#[cfg(test)]
mod tests {
    //! The link's decisions about deliveries: which a connection is written, which it is
    //! spared, and when it is closed.
    use super::*;
    use crate::hub::Delivery;
    use crate::protocol::StreamId;

    fn state() -> LinkState {
        LinkState::new(16, 1 << 20)
    }

    fn join(state: &mut LinkState, topic: Topic) -> Arc<Topic> {
        let topic = Arc::new(topic);
        state.cursors.push((topic.clone(), StreamCursor::default()));
        topic
    }

    fn delivery(topic: &Arc<Topic>, kind: Kind, id: Option<u64>) -> Delivery {
        Delivery::new(
            topic.clone(),
            kind,
            id.map(|ms| StreamId { ms, seq: 0 }),
            Utf8Bytes::from(format!(r#"{{"event":"message","id":"{id:?}"}}"#)),
            0,
            None,
        )
    }

    #[test]
    fn a_room_message_is_written_once_and_only_to_members() {
        let mut state = state();
        let other = Arc::new(Topic::Room("elsewhere".into()));
        let in_other = delivery(&other, Kind::Message, Some(5));
        assert_eq!(
            state.accept(1, &in_other).unwrap(),
            None,
            "a room it is not in"
        );
        let lobby = join(&mut state, Topic::Room("lobby".into()));
        let first = delivery(&lobby, Kind::Message, Some(5));
        assert_eq!(state.accept(1, &first).unwrap(), Some(first.wire.clone()));
        // The same id again (a live copy after a replay, say) and an older one: not again.
        assert_eq!(state.accept(1, &first).unwrap(), None);
        let older = delivery(&lobby, Kind::Message, Some(4));
        assert_eq!(state.accept(1, &older).unwrap(), None);
        let newer = delivery(&lobby, Kind::Message, Some(6));
        assert!(state.accept(1, &newer).unwrap().is_some());
    }

    #[test]
    fn direct_messages_reach_proven_users_only_and_control_closes() {
        let mut anonymous = state();
        let user = join(&mut anonymous, Topic::User("ann".into()));
        let dm = delivery(&user, Kind::Direct, Some(9));
        assert_eq!(anonymous.accept(1, &dm).unwrap(), None, "a claimed name");
        let mut proven = LinkState {
            proven: true,
            ..state()
        };
        let user = join(&mut proven, Topic::User("ann".into()));
        let dm = delivery(&user, Kind::Direct, Some(9));
        assert!(proven.accept(1, &dm).unwrap().is_some());
        // Presence frames have no id and go to everyone; the API's disconnect closes.
        let presence = delivery(&user, Kind::Presence, None);
        assert!(proven.accept(1, &presence).unwrap().is_some());
        let control = delivery(&user, Kind::Control, None);
        assert_eq!(proven.accept(1, &control), Err(Close::API_DISCONNECT));
    }

    #[test]
    fn an_ack_mode_reader_that_never_acks_is_closed_as_slow() {
        let mut state = LinkState {
            ack_mode: true,
            proven: true,
            ..state()
        };
        let lobby = join(&mut state, Topic::Room("lobby".into()));
        // 16 unacknowledged messages are kept; the 17th closes.
        for ms in 1..=16 {
            let d = delivery(&lobby, Kind::Message, Some(ms));
            assert!(state.accept(1, &d).unwrap().is_some());
        }
        assert_eq!(state.cursors[0].1.unacked.len(), 16);
        let d = delivery(&lobby, Kind::Message, Some(17));
        assert_eq!(state.accept(1, &d), Err(Close::SLOW));
    }

    #[test]
    fn a_guest_gets_its_own_messages_back_with_the_user_id_it_sent() {
        let mut state = LinkState {
            echo: Some((
                r#","userId":"guest-1","#.into(),
                r#","userId":1700000000000,"#.into(),
            )),
            ..state()
        };
        let lobby = join(&mut state, Topic::Room("lobby".into()));
        let frame = r#"{"event":"message","id":"1-0","userId":"guest-1","content":"hi"}"#;
        let message = |id, sender| {
            Delivery::new(
                lobby.clone(),
                Kind::Message,
                Some(StreamId { ms: id, seq: 0 }),
                Utf8Bytes::from(frame),
                0,
                Some(sender),
            )
        };
        let written = state.accept(7, &message(1, 7)).unwrap().expect("written");
        let echoed = r#"{"event":"message","id":"1-0","userId":1700000000000,"content":"hi"}"#;
        assert_eq!(written, text_frame(echoed.as_bytes()));
        // Someone else's message (another connection) is written as it is.
        let written = state.accept(7, &message(2, 8)).unwrap().expect("written");
        assert_eq!(written, text_frame(frame.as_bytes()));
    }
}
