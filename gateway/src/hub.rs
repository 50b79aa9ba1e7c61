//! The hub: which local connections listen on which broker channel (a room or a user's inbox),
//! subscribing a channel on its first local member and unsubscribing after its last, and the
//! dispatcher that fans each broker message out to the local members — parsed once per node,
//! the frame bytes shared by every recipient.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::extract::ws::Utf8Bytes;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::broker::{Broker, BrokerError, Envelope, Inbound, Kind};
use crate::metrics::Metrics;
use crate::protocol::StreamId;

/// One message on its way to local sockets, shared by all its recipients on this node.
#[derive(Debug)]
pub struct Delivery {
    pub channel: Arc<str>,
    pub kind: Kind,
    pub id: Option<StreamId>,
    pub frame: Utf8Bytes,
    pub published_us: u64,
    /// The local connection that published it, if one did.
    pub sender_conn: Option<u64>,
}

/// A connection's queue of deliveries (bounded: a full queue means a slow consumer).
pub type Outbox = mpsc::Sender<Arc<Delivery>>;

/// A local connection listening on a channel.
#[derive(Clone)]
pub struct Member {
    pub conn_id: u64,
    pub outbox: Outbox,
    /// Cancelled when the connection's queue overflows: the session closes it (code 4008).
    pub slow: CancellationToken,
}

struct Channel {
    name: Arc<str>,
    members: Vec<Member>,
    /// Serialises subscribe/unsubscribe of this channel; holds whether it is subscribed.
    gate: Arc<tokio::sync::Mutex<bool>>,
}

/// Why a connection could not join a channel.
#[derive(Debug, Clone, thiserror::Error)]
pub enum JoinError {
    /// The node listens on as many channels as it may (GATEWAY_MAX_ROOMS_PER_NODE).
    #[error("this node is at its limit of rooms")]
    NodeFull,
    #[error(transparent)]
    Broker(#[from] BrokerError),
}

pub struct Hub {
    node_id: String,
    /// Most channels this node listens on at once.
    max_channels: usize,
    channels: Mutex<HashMap<String, Channel>>,
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

    fn channels(&self) -> std::sync::MutexGuard<'_, HashMap<String, Channel>> {
        self.channels.lock().expect("hub lock")
    }

    /// Adds a member to a channel and returns once the node is subscribed to it. On error the
    /// member is removed again.
    pub async fn join(&self, channel: &str, member: Member) -> Result<Arc<str>, JoinError> {
        let conn_id = member.conn_id;
        let (name, gate) = {
            let mut channels = self.channels();
            if channels.len() >= self.max_channels && !channels.contains_key(channel) {
                return Err(JoinError::NodeFull);
            }
            let entry = channels
                .entry(channel.to_string())
                .or_insert_with(|| Channel {
                    name: Arc::from(channel),
                    members: Vec::new(),
                    gate: Arc::new(tokio::sync::Mutex::new(false)),
                });
            entry.members.push(member);
            (entry.name.clone(), entry.gate.clone())
        };
        let mut subscribed = gate.lock().await;
        if !*subscribed {
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
    pub async fn leave(&self, channel: &str, conn_id: u64) {
        let gate = {
            let mut channels = self.channels();
            let Some(entry) = channels.get_mut(channel) else {
                return;
            };
            entry.members.retain(|m| m.conn_id != conn_id);
            if !entry.members.is_empty() {
                return;
            }
            entry.gate.clone()
        };
        let mut subscribed = gate.lock().await;
        // Someone may have joined while we waited for the gate.
        let still_empty = {
            let mut channels = self.channels();
            match channels.get(channel) {
                Some(entry) if entry.members.is_empty() && Arc::ptr_eq(&entry.gate, &gate) => {
                    channels.remove(channel);
                    true
                }
                _ => false,
            }
        };
        if still_empty && *subscribed {
            *subscribed = false;
            self.metrics.rooms_local.dec();
            if let Err(e) = self.broker.unsubscribe(channel).await {
                tracing::warn!(channel, "unsubscribe failed: {e}");
            }
        }
    }

    /// Fans broker messages out to local members until the broker side closes.
    pub async fn dispatch(self: Arc<Self>, mut inbound: mpsc::UnboundedReceiver<Inbound>) {
        while let Some(msg) = inbound.recv().await {
            self.dispatch_one(msg);
        }
    }

    fn dispatch_one(&self, msg: Inbound) {
        let Some(envelope) = Envelope::parse(&msg.payload) else {
            tracing::warn!("dropping a malformed broker message");
            return;
        };
        let Ok(frame) = Utf8Bytes::try_from(envelope.frame) else {
            tracing::warn!("dropping a broker message that is not UTF-8");
            return;
        };
        let Ok(channel) = std::str::from_utf8(&msg.channel) else {
            return;
        };
        let channels = self.channels();
        let Some(entry) = channels.get(channel) else {
            return; // unsubscribed meanwhile
        };
        let span =
            crate::telemetry::delivery_span(&envelope.traceparent, channel, entry.members.len());
        let _entered = span.enter();
        let delivery = Arc::new(Delivery {
            channel: entry.name.clone(),
            kind: envelope.kind,
            id: envelope.id,
            frame,
            published_us: envelope.published_us,
            sender_conn: envelope
                .sender_conn
                .filter(|_| envelope.origin == self.node_id),
        });
        for member in &entry.members {
            match member.outbox.try_send(delivery.clone()) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => {
                    self.metrics.outbound_dropped.inc();
                    member.slow.cancel();
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
    }
}
