//! A connection's chat messages on their way into the broker: group-committed, one batch in
//! flight at a time, stored and answered in the order they were sent.
//!
//! Why batches and not one future per message: futures polled together are not first polled in
//! the order they were created (one that returns `Pending` before it has written its command —
//! out of cooperative budget, or waiting for a reconnect — is requeued behind later ones), so
//! independent appends could reach Redis out of order. A batch is one pipelined write, and the
//! next batch — everything read while this one was in flight — is only made once it is
//! answered.

use std::future::Future;
use std::pin::Pin;

use crate::broker::{Appended, Broker, BrokerError, Post};
use crate::protocol::RoomId;

/// A chat message read from the socket, not yet answered.
pub(super) struct Queued {
    pub request: Post,
    pub reply: ReplyTo,
}

/// What the client's answer to a chat message needs.
pub(super) struct ReplyTo {
    /// The message's size, counted in `Session::append_bytes` until it is answered.
    pub bytes: usize,
    pub room: RoomId,
    pub client_msg_id: Option<String>,
    /// The message's `publish` span: open until the broker has answered.
    pub span: tracing::Span,
}

/// The broker's answer to a chat message, with what the client's reply needs.
pub(super) struct AppendDone {
    pub reply: ReplyTo,
    pub result: Result<Appended, BrokerError>,
}

type Batch = Pin<Box<dyn Future<Output = Vec<AppendDone>> + Send>>;

/// The messages of one connection between its socket and the broker.
pub(super) struct Appends {
    broker: Broker,
    in_flight: Option<Batch>,
    in_flight_count: usize,
    waiting: Vec<Queued>,
}

impl Appends {
    pub fn new(broker: Broker) -> Appends {
        Appends {
            broker,
            in_flight: None,
            in_flight_count: 0,
            waiting: Vec::new(),
        }
    }

    /// Messages not answered yet (in flight or waiting for the batch in flight).
    pub fn len(&self) -> usize {
        self.in_flight_count + self.waiting.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Queues a message; it goes out with the next batch (at once if none is in flight).
    pub fn push(&mut self, queued: Queued) {
        self.waiting.push(queued);
        self.launch();
    }

    /// The answers to the batch in flight, in the order sent; the next batch goes out before
    /// this returns. Pending for ever when nothing is queued. Cancel-safe: the batch in
    /// flight is kept, not dropped, when this future is.
    pub async fn next_batch(&mut self) -> Vec<AppendDone> {
        let Some(batch) = self.in_flight.as_mut() else {
            return std::future::pending().await;
        };
        let done = batch.await;
        self.in_flight = None;
        self.in_flight_count = 0;
        self.launch();
        done
    }

    fn launch(&mut self) {
        if self.in_flight.is_some() || self.waiting.is_empty() {
            return;
        }
        let (requests, replies): (Vec<Post>, Vec<ReplyTo>) = std::mem::take(&mut self.waiting)
            .into_iter()
            .map(|q| (q.request, q.reply))
            .unzip();
        self.in_flight_count = requests.len();
        let broker = self.broker.clone();
        self.in_flight = Some(Box::pin(async move {
            let results = broker.append_all(&requests).await;
            replies
                .into_iter()
                .zip(results)
                .map(|(reply, result)| AppendDone { reply, result })
                .collect()
        }));
    }
}
