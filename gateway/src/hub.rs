//! The hub: which local connections listen on which broker topic (a room or a user), subscribing
//! a topic on its first local member and unsubscribing after its last, and the
//! dispatcher that fans each broker message out to the local members — parsed and framed once
//! per node, the frame bytes shared by every recipient and written straight into each socket.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::mpsc;
use tungstenite::Utf8Bytes;

use crate::broker::{Broker, BrokerError, Envelope, Inbound, Kind, Topic};
use crate::metrics::Metrics;
use crate::protocol::StreamId;
use crate::session::Link;
use crate::websocket::text_frame;

/// One message on its way to local sockets, shared by all its recipients on this node.
#[derive(Debug)]
pub struct Delivery {
    pub topic: Arc<Topic>,
    pub kind: Kind,
    pub id: Option<StreamId>,
    /// The frame's text (kept for redelivery and rewrites).
    pub frame: Utf8Bytes,
    /// The frame as WebSocket bytes, written as they are to every recipient.
    pub wire: Bytes,
    pub published_us: u64,
    /// The local connection that published it, if one did.
    pub sender_conn: Option<u64>,
}

impl Delivery {
    pub fn new(
        topic: Arc<Topic>,
        kind: Kind,
        id: Option<StreamId>,
        frame: Utf8Bytes,
        published_us: u64,
        sender_conn: Option<u64>,
    ) -> Delivery {
        Delivery {
            wire: text_frame(frame.as_bytes()),
            topic,
            kind,
            id,
            frame,
            published_us,
            sender_conn,
        }
    }
}

/// A local connection listening on a topic.
#[derive(Clone)]
pub struct Member {
    pub conn_id: u64,
    pub link: Arc<Link>,
}

/// Broker messages dispatched together: a run of one topic's messages goes to each member in
/// one write.
const DISPATCH_BATCH: usize = 64;

struct Channel {
    topic: Arc<Topic>,
    /// Copied on write: the dispatcher takes the list and writes without the hub's lock.
    members: Arc<Vec<Member>>,
    /// Serialises subscribe/unsubscribe of this topic; holds whether it is subscribed.
    gate: Arc<tokio::sync::Mutex<bool>>,
    /// Set when the topic's messages are kept and members want gaps repaired (rooms, and
    /// proven users' inboxes).
    stream: Option<ChannelStream>,
    /// The newest message id dispatched here (or the stream's newest when it was subscribed):
    /// after a broker reconnect, everything after it is read back from the stream.
    last_id: Option<StreamId>,
}

impl Channel {
    /// A frame this node makes itself (a repaired gap, a resync), for the channel's members.
    fn local_delivery(
        &self,
        kind: Kind,
        id: Option<StreamId>,
        frame: String,
    ) -> (Arc<Vec<Member>>, Arc<Delivery>) {
        let delivery = Delivery::new(
            self.topic.clone(),
            kind,
            id,
            Utf8Bytes::from(frame),
            crate::broker::now_us(),
            None,
        );
        (self.members.clone(), Arc::new(delivery))
    }
}

/// A topic whose messages are kept: a gap after a broker reconnect is read back from it.
#[derive(Debug, Clone)]
pub struct ChannelStream {
    pub kind: Kind,
    /// `"roomId":…` or `"dm":true`: what a `resync` frame names.
    pub target_json: String,
}

/// Messages read back per stream read when repairing a gap, and reads per channel at most
/// (beyond: members are told to resync).
const REPAIR_PAGE: usize = 500;
const REPAIR_PAGES: usize = 20;

/// Why a connection could not join a channel.
#[derive(Debug, Clone, thiserror::Error)]
pub enum JoinError {
    /// The node listens on as many channels as it may (GATEWAY_MAX_ROOMS_PER_NODE).
    #[error("this node is at its limit of rooms")]
    NodeFull,
    #[error(transparent)]
    Broker(#[from] BrokerError),
}

/// Whether `channel` is still the entry behind `gate` and has no members.
fn is_empty_with_gate(
    channels: &HashMap<Topic, Box<Channel>>,
    channel: &Topic,
    gate: &Arc<tokio::sync::Mutex<bool>>,
) -> bool {
    matches!(channels.get(channel), Some(entry) if entry.members.is_empty() && Arc::ptr_eq(&entry.gate, gate))
}

pub struct Hub {
    node_id: String,
    /// Most channels this node listens on at once.
    max_channels: usize,
    /// Boxed: every connection has a channel of its own (its user's), and the table keeps
    /// spare slots.
    channels: Mutex<HashMap<Topic, Box<Channel>>>,
    broker: Broker,
    metrics: Arc<Metrics>,
}

impl Hub {
    pub fn new(node_id: String, broker: Broker, metrics: Arc<Metrics>, max_channels: usize) -> Hub {
        Hub {
            node_id,
            max_channels,
            channels: Mutex::new(HashMap::new()),
            broker,
            metrics,
        }
    }

    fn channels(&self) -> std::sync::MutexGuard<'_, HashMap<Topic, Box<Channel>>> {
        self.channels.lock().expect("hub lock")
    }

    /// Adds a member to a channel and returns once the node is subscribed to it. On error the
    /// member is removed again. `stream`: where the channel's messages are kept, if anywhere.
    pub async fn join(
        &self,
        channel: &Topic,
        member: Member,
        stream: Option<ChannelStream>,
    ) -> Result<Arc<Topic>, JoinError> {
        let conn_id = member.conn_id;
        let (name, gate) = {
            let mut channels = self.channels();
            if channels.len() >= self.max_channels && !channels.contains_key(channel) {
                return Err(JoinError::NodeFull);
            }
            let entry = channels.entry(channel.clone()).or_insert_with(|| {
                Box::new(Channel {
                    topic: Arc::new(channel.clone()),
                    // Most channels have one member (a user's), a first growth holds four.
                    members: Arc::new(Vec::with_capacity(1)),
                    gate: Arc::new(tokio::sync::Mutex::new(false)),
                    stream: None,
                    last_id: None,
                })
            });
            Arc::make_mut(&mut entry.members).push(member);
            if entry.stream.is_none() {
                entry.stream = stream.clone();
            }
            (entry.topic.clone(), entry.gate.clone())
        };
        let mut subscribed = gate.lock().await;
        if !*subscribed {
            // The stream's newest id *before* subscribing is where a gap would start: every
            // message received live is newer.
            if stream.is_some() {
                match self.broker.newest_id(channel).await {
                    Ok(newest) => self.advance(channel, newest.unwrap_or(StreamId::ZERO)),
                    Err(e) => {
                        drop(subscribed);
                        self.leave(channel, conn_id).await;
                        return Err(e.into());
                    }
                }
            }
            if let Err(e) = self.broker.subscribe(channel).await {
                drop(subscribed);
                self.leave(channel, conn_id).await;
                return Err(e.into());
            }
            *subscribed = true;
            self.metrics.rooms_local.inc();
        }
        Ok(name)
    }

    /// Removes a member; unsubscribes the channel if it was the last local one.
    ///
    /// The channel's entry (and so its gate) stays in the table until the unsubscribe is done:
    /// a join arriving meanwhile finds the same gate, waits for it, sees "not subscribed" and
    /// subscribes again. Removing the entry first would let such a join create a second gate
    /// and subscribe *before* this unsubscribe lands, leaving members on an unsubscribed
    /// channel that nothing would ever resubscribe.
    pub async fn leave(&self, channel: &Topic, conn_id: u64) {
        let gate = {
            let mut channels = self.channels();
            let Some(entry) = channels.get_mut(channel) else {
                return;
            };
            Arc::make_mut(&mut entry.members).retain(|m| m.conn_id != conn_id);
            if !entry.members.is_empty() {
                return;
            }
            entry.gate.clone()
        };
        let mut subscribed = gate.lock().await;
        if !is_empty_with_gate(&self.channels(), channel, &gate) {
            return; // someone joined while we waited for the gate: they keep it subscribed
        }
        if *subscribed {
            *subscribed = false;
            self.metrics.rooms_local.dec();
            if let Err(e) = self.broker.unsubscribe(channel).await {
                tracing::warn!(%channel, "unsubscribe failed: {e}");
            }
        }
        // Still under the gate: a join that came during the unsubscribe is in the entry and
        // waits for the gate to subscribe again, so the entry stays for it.
        let mut channels = self.channels();
        if is_empty_with_gate(&channels, channel, &gate) {
            channels.remove(channel);
        }
    }

    /// Moves a channel's last dispatched id forward to `id` (never back).
    fn advance(&self, channel: &Topic, id: StreamId) {
        if let Some(entry) = self.channels().get_mut(channel) {
            entry.last_id = Some(entry.last_id.map_or(id, |last| last.max(id)));
        }
    }

    /// Fans broker messages out to local members until the broker side closes; after a
    /// broker reconnect, first reads back what was published meanwhile.
    ///
    /// Whatever arrived meanwhile is taken at once (up to a batch): a run of one topic's
    /// messages reaches each member in one write, so a busy node makes fewer, fuller writes.
    pub async fn dispatch(self: Arc<Self>, mut inbound: mpsc::UnboundedReceiver<Inbound>) {
        let mut batch = Vec::with_capacity(DISPATCH_BATCH);
        let mut run: Vec<Arc<Delivery>> = Vec::new();
        while inbound.recv_many(&mut batch, DISPATCH_BATCH).await > 0 {
            let mut members = None;
            for msg in batch.drain(..) {
                match msg {
                    Inbound::Message { topic, payload } => {
                        if run.first().is_some_and(|d| *d.topic != topic) {
                            self.hand_out(members.take(), &mut run);
                        }
                        if let Some((entry_members, delivery)) = self.prepare(&topic, &payload) {
                            members = Some(entry_members);
                            run.push(delivery);
                        }
                    }
                    Inbound::Resubscribed => {
                        self.hand_out(members.take(), &mut run);
                        self.repair_gaps().await;
                    }
                }
            }
            self.hand_out(members.take(), &mut run);
        }
    }

    /// Reads every stream-backed channel's stream after its last dispatched id and hands the
    /// members what they missed, in order. Where the history no longer holds the gap (trimmed,
    /// or Redis lost it), members get a `resync` frame first.
    async fn repair_gaps(&self) {
        let wanted: Vec<(Arc<Topic>, ChannelStream, StreamId)> = self
            .channels()
            .values()
            .filter_map(|c| Some((c.topic.clone(), c.stream.clone()?, c.last_id?)))
            .collect();
        for (channel, stream, last) in wanted {
            let mut after = last;
            let mut lost = false;
            let mut complete = false;
            for _ in 0..REPAIR_PAGES {
                let page = match self.read_back(&channel, after).await {
                    Ok(page) => page,
                    Err(e) => {
                        tracing::warn!(%channel, "gap repair failed: {e}");
                        self.resync(&channel, &stream, after);
                        lost = true;
                        break;
                    }
                };
                if page.truncated && after == last {
                    lost = true;
                    self.resync(&channel, &stream, last);
                }
                let got = page.entries.len();
                for (id, frame) in page.entries {
                    after = id;
                    self.redeliver(&channel, &stream, id, frame);
                }
                if got < REPAIR_PAGE {
                    complete = true;
                    break;
                }
            }
            if lost {
                continue; // told already
            }
            if !complete {
                self.resync(&channel, &stream, after);
                continue;
            }
            // Nothing newer, but was the history itself lost (Redis restarted empty)?
            if after == last && last > StreamId::ZERO {
                match self.broker.newest_id(&channel).await {
                    Ok(newest) if newest.unwrap_or(StreamId::ZERO) >= last => {}
                    _ => self.resync(&channel, &stream, last),
                }
            }
        }
    }

    /// One read of a gap, retried for a few seconds: right after a reconnect the command
    /// connection may still be reconnecting too.
    async fn read_back(
        &self,
        topic: &Topic,
        after: StreamId,
    ) -> Result<crate::broker::Page, BrokerError> {
        let mut delay = std::time::Duration::from_millis(50);
        let mut attempts = 0;
        loop {
            match self.broker.range(topic, after, REPAIR_PAGE).await {
                Ok(page) => return Ok(page),
                Err(e) if attempts >= 8 => return Err(e),
                Err(_) => {
                    attempts += 1;
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(std::time::Duration::from_secs(1));
                }
            }
        }
    }

    /// Dispatches a message read back from a stream (unless it was dispatched live already).
    fn redeliver(&self, channel: &Topic, stream: &ChannelStream, id: StreamId, frame: String) {
        let mut channels = self.channels();
        let Some(entry) = channels.get_mut(channel) else {
            return;
        };
        if entry.last_id.is_some_and(|last| id <= last) {
            return;
        }
        entry.last_id = Some(id);
        self.metrics.gap_repairs.inc();
        let local = entry.local_delivery(stream.kind, Some(id), frame);
        drop(channels);
        self.hand_out(Some(local.0), &mut vec![local.1]);
    }

    /// Tells a channel's members that messages after `last_id` are lost to them.
    fn resync(&self, channel: &Topic, stream: &ChannelStream, last_id: StreamId) {
        let channels = self.channels();
        let Some(entry) = channels.get(channel) else {
            return;
        };
        self.metrics.resyncs.inc();
        tracing::warn!(%channel, %last_id, "history does not hold the gap: members told to resync");
        let frame = format!(
            r#"{{"event":"resync",{},"lastId":"{last_id}"}}"#,
            stream.target_json
        );
        let local = entry.local_delivery(Kind::Presence, None, frame);
        drop(channels);
        self.hand_out(Some(local.0), &mut vec![local.1]);
    }

    /// Parses and frames one broker message for its channel's members (once per node);
    /// `None` when it is malformed, a duplicate, or nobody here listens any more.
    fn prepare(
        &self,
        channel: &Topic,
        payload: &bytes::Bytes,
    ) -> Option<(Arc<Vec<Member>>, Arc<Delivery>)> {
        let Some(envelope) = Envelope::parse(payload) else {
            tracing::warn!("dropping a malformed broker message");
            return None;
        };
        let Ok(frame) = Utf8Bytes::try_from(envelope.frame) else {
            tracing::warn!("dropping a broker message that is not UTF-8");
            return None;
        };
        let mut channels = self.channels();
        let entry = channels.get_mut(channel)?; // unsubscribed meanwhile
        if let Some(id) = envelope.id {
            // Read back by a gap repair already: the live copy is a duplicate.
            if entry.last_id.is_some_and(|last| id <= last) {
                return None;
            }
            entry.last_id = Some(id);
        }
        let span =
            crate::telemetry::delivery_span(&envelope.traceparent, channel, entry.members.len());
        let _entered = span.enter();
        let delivery = Arc::new(Delivery::new(
            entry.topic.clone(),
            envelope.kind,
            envelope.id,
            frame,
            envelope.published_us,
            envelope
                .sender_conn
                .filter(|_| envelope.origin == self.node_id),
        ));
        Some((entry.members.clone(), delivery))
    }
}

impl Hub {
    /// Offers a run of one channel's deliveries to each of its members (outside the hub's
    /// lock: the writes are syscalls).
    fn hand_out(&self, members: Option<Arc<Vec<Member>>>, run: &mut Vec<Arc<Delivery>>) {
        if let Some(members) = members {
            if !run.is_empty() {
                let latency = self.metrics.fanout_latency.local();
                let mut written = 0;
                for member in members.iter() {
                    written += member.link.offer(run, &latency);
                }
                latency.flush();
                self.metrics.messages_delivered.inc_by(written);
            }
        }
        run.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::memory::MemoryBroker;
    use crate::broker::EnvelopeHeader;
    use crate::outlet::Outlet;
    use crate::session::LinkState;
    use std::time::Duration;

    fn room() -> Topic {
        Topic::Room("room".into())
    }

    fn hub() -> Arc<Hub> {
        hub_with(None)
    }

    /// A hub on the embedded broker, unsubscribing with `latency` (as over a network).
    fn hub_with(unsubscribe_latency: Option<Duration>) -> Arc<Hub> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut memory = MemoryBroker::for_tests(tx);
        memory.unsubscribe_latency = unsubscribe_latency;
        let broker = Broker::Memory(Arc::new(memory));
        let hub = Arc::new(Hub::new(
            "n1".into(),
            broker,
            Arc::new(Metrics::new("n1")),
            1000,
        ));
        tokio::spawn(hub.clone().dispatch(rx));
        hub
    }

    /// A member on a real socket, and the client's end of it.
    async fn member(conn_id: u64) -> (Member, tokio::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap());
        let (client, accepted) = tokio::join!(client, listener.accept());
        let outlet = Arc::new(Outlet::new(accepted.unwrap().0, 16));
        let metrics = Arc::new(Metrics::new("n1"));
        let link = Link::new(conn_id, outlet, metrics, 16, LinkState::new(16, 1 << 20));
        let member = Member {
            conn_id,
            link: Arc::new(link),
        };
        (member, client.unwrap())
    }

    /// The text of the next (unmasked, short) server frame on a client's socket.
    async fn next_text(client: &mut tokio::net::TcpStream) -> String {
        use tokio::io::AsyncReadExt;
        let mut head = [0u8; 2];
        client.read_exact(&mut head).await.expect("a frame");
        assert_eq!(head[0], 0x81, "a final text frame");
        let len = match head[1] {
            126 => client.read_u16().await.unwrap() as usize,
            127 => client.read_u64().await.unwrap() as usize,
            n => n as usize,
        };
        let mut text = vec![0u8; len];
        client.read_exact(&mut text).await.unwrap();
        String::from_utf8(text).unwrap()
    }

    fn announcement(text: &str) -> String {
        let header = EnvelopeHeader {
            kind: Kind::Presence,
            published_us: 0,
            origin: "n2".into(),
            sender_conn: None,
            traceparent: String::new(),
        };
        format!("{}{{\"event\":\"{text}\"}}", header.without_id())
    }

    /// A member joining while the channel's last member leaves must end up on a subscribed
    /// channel: the leave's unsubscribe may not land after the join's subscribe.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_join_racing_the_last_leave_still_receives() {
        let hub = hub_with(Some(Duration::from_millis(2)));
        for round in 0..200u64 {
            let (leaver, _leaver_client) = member(round * 2).await;
            let (stayer, mut stayer_client) = member(round * 2 + 1).await;
            hub.join(&room(), leaver, None).await.expect("join");
            let leaving = {
                let hub = hub.clone();
                tokio::spawn(async move { hub.leave(&room(), round * 2).await })
            };
            let joining = {
                let hub = hub.clone();
                tokio::spawn(async move { hub.join(&room(), stayer, None).await })
            };
            leaving.await.expect("leave task");
            joining.await.expect("join task").expect("join");
            let text = format!("r{round}");
            hub.broker
                .publish(&room(), &announcement(&text))
                .await
                .expect("publish");
            let got = tokio::time::timeout(Duration::from_secs(2), next_text(&mut stayer_client))
                .await
                .unwrap_or_else(|_| panic!("round {round}: the member on the room got nothing"));
            assert!(got.contains(&text), "{got}");
            hub.leave(&room(), round * 2 + 1).await;
        }
    }

    /// The last member leaving unsubscribes the node and forgets the channel.
    #[tokio::test]
    async fn the_last_leave_unsubscribes() {
        let hub = hub();
        let (a, _a_client) = member(1).await;
        let (b, mut b_client) = member(2).await;
        hub.join(&room(), a, None).await.expect("join a");
        hub.join(&room(), b, None).await.expect("join b");
        hub.leave(&room(), 1).await;
        hub.broker
            .publish(&room(), &announcement("x"))
            .await
            .expect("publish");
        let got = tokio::time::timeout(Duration::from_secs(2), next_text(&mut b_client)).await;
        assert!(got.expect("b still receives").contains('x'));
        hub.leave(&room(), 2).await;
        assert!(hub.channels().is_empty());
        let Broker::Memory(memory) = &hub.broker else {
            unreachable!()
        };
        assert!(!memory.is_subscribed(&room()));
    }
}
