//! The history checker of the fault suite: records every send, confirmation and delivery of
//! every client, then verifies the delivery guarantees of docs/protocol.md against it.
//!
//! What is recorded (by [`crate::chaos`]'s clients, as they happen):
//! - a **send**: client, room, `clientMsgId`, content, when it was first issued;
//! - a **confirmation**: the sender's own copy of its message or a `sent` frame, with the id;
//! - a **delivery**: every `message` frame a client received (id, `clientMsgId`, content, `num`),
//!   first deliveries and redeliveries alike;
//! - a client's **start**: the `lastId` of the `synced` that ended its first login (everything
//!   after it must reach the client);
//! - `resync` frames, and the moments Redis lost its data (restarted empty).
//!
//! What is verified ([`History::check`]), each failure a [`Violation`]:
//! - **no confirmed message lost**: every confirmed id after a client's start reached that
//!   (ack-mode) client — after it resumed, as a real client does. A message confirmed before
//!   Redis lost its data and not delivered to someone by then is exempt (the protocol promises
//!   nothing for data Redis lost) and counted in [`Stats::lost_with_redis_data`];
//! - **order**: per client and room, the first deliveries of ids come in increasing id order;
//! - **duplicates only as redeliveries**: one `clientMsgId` is one message (one id), and a
//!   delivered message matches what was sent under its `clientMsgId` (no phantom messages);
//! - **every send confirmed** in the end (the system healed: a client that keeps retrying gets
//!   its answer);
//! - presence and subscription checks are made against the live system by the runner and added
//!   with [`History::violation`].

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A stream id `ms-seq`, ordered numerically.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MsgId(pub u64, pub u64);

impl MsgId {
    pub fn parse(text: &str) -> Option<MsgId> {
        let (ms, seq) = text.split_once('-').unwrap_or((text, "0"));
        Some(MsgId(ms.parse().ok()?, seq.parse().ok()?))
    }
}

impl fmt::Display for MsgId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.0, self.1)
    }
}

/// One guarantee broken, with what shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Violation {
    /// A confirmed message never reached an ack-mode member of its room.
    Lost {
        client: String,
        room: String,
        id: MsgId,
        client_msg_id: String,
    },
    /// A first delivery came after a later id (per client and room).
    OutOfOrder {
        client: String,
        room: String,
        id: MsgId,
        after: MsgId,
    },
    /// One `clientMsgId` was stored as more than one message.
    Duplicated {
        client_msg_id: String,
        ids: Vec<MsgId>,
    },
    /// A delivered message that no client sent, or whose content differs from the send.
    Phantom {
        client: String,
        id: MsgId,
        detail: String,
    },
    /// A send never confirmed, although the system healed.
    NeverConfirmed {
        client: String,
        client_msg_id: String,
    },
    /// Presence differs from the truth after the fault healed (more than the TTL later).
    Presence { room: String, detail: String },
    /// A channel subscribed (or a room held) with nobody in it.
    LeakedSubscription { detail: String },
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Violation::Lost {
                client,
                room,
                id,
                client_msg_id,
            } => write!(
                f,
                "lost: {client} never got {id} ({client_msg_id}) of room {room}"
            ),
            Violation::OutOfOrder {
                client,
                room,
                id,
                after,
            } => write!(f, "order: {client} got {id} after {after} in room {room}"),
            Violation::Duplicated { client_msg_id, ids } => {
                write!(f, "duplicate: {client_msg_id} stored as {ids:?}")
            }
            Violation::Phantom { client, id, detail } => {
                write!(f, "phantom: {client} got {id}: {detail}")
            }
            Violation::NeverConfirmed {
                client,
                client_msg_id,
            } => write!(f, "unconfirmed: {client}'s {client_msg_id} never confirmed"),
            Violation::Presence { room, detail } => write!(f, "presence in {room}: {detail}"),
            Violation::LeakedSubscription { detail } => write!(f, "leak: {detail}"),
        }
    }
}

/// Counts for the report.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub sends: usize,
    pub confirmed: usize,
    /// Distinct message ids confirmed.
    pub messages: usize,
    pub deliveries: usize,
    pub redeliveries: usize,
    /// (message, member) pairs checked for loss.
    pub expected_deliveries: usize,
    pub lost_with_redis_data: usize,
    pub resyncs: usize,
}

#[derive(Debug)]
struct Send {
    client: usize,
    room: String,
    content: String,
    issued: Instant,
    /// Every id the send was confirmed with, and when (more than one id only if the message
    /// was stored twice).
    confirmations: Vec<(MsgId, Instant)>,
}

/// A message frame as received.
#[derive(Clone, Debug)]
pub struct Received {
    pub id: MsgId,
    pub client_msg_id: String,
    pub content: String,
    pub user: String,
    pub num: Option<u64>,
    pub at: Instant,
}

#[derive(Debug)]
struct ClientLog {
    name: String,
    room: String,
    ack: bool,
    start: Option<MsgId>,
    received: Vec<Received>,
    resyncs: usize,
    /// Left for good (closed its connection): owed nothing from then on.
    departed: bool,
    /// Logged in (a client without acks gets no `synced` to start from).
    joined: bool,
    /// When each of its connections was logged in: (login, end of the connection).
    online: Vec<(Instant, Option<Instant>)>,
}

#[derive(Debug, Default)]
struct Log {
    clients: Vec<ClientLog>,
    sends: BTreeMap<String, Send>,
    data_lost: Vec<Instant>,
    external: Vec<Violation>,
    /// Every `logout` frame a client received: whom it named, and when.
    logouts: Vec<(String, Instant)>,
}

/// The recorded history of a run (shared by every client; see the module docs).
#[derive(Debug, Default)]
pub struct History {
    log: Mutex<Log>,
}

impl History {
    pub fn new() -> History {
        History::default()
    }

    fn log(&self) -> std::sync::MutexGuard<'_, Log> {
        self.log.lock().expect("history lock")
    }

    /// Registers a client (user `name` in `room`); returns its index.
    pub fn add_client(&self, name: &str, room: &str, ack: bool) -> usize {
        let mut log = self.log();
        log.clients.push(ClientLog {
            name: name.to_string(),
            room: room.to_string(),
            ack,
            start: None,
            received: Vec::new(),
            resyncs: 0,
            departed: false,
            joined: false,
            online: Vec::new(),
        });
        log.clients.len() - 1
    }

    /// The client's first `synced` (its starting point); later ones are ignored.
    pub fn started(&self, client: usize, last_id: MsgId) {
        let mut log = self.log();
        log.clients[client].start.get_or_insert(last_id);
    }

    /// Whether the client has a starting point (from which everything is owed to it).
    pub fn has_start(&self, client: usize) -> bool {
        self.log().clients[client].start.is_some()
    }

    /// The client logged in (whether or not it has a starting point yet).
    pub fn joined(&self, client: usize) {
        self.log().clients[client].joined = true;
    }

    pub fn is_started(&self, client: usize) -> bool {
        let log = self.log();
        log.clients[client].start.is_some() || log.clients[client].joined
    }

    pub fn send(&self, client: usize, client_msg_id: &str, content: &str) {
        let mut log = self.log();
        let room = log.clients[client].room.clone();
        log.sends.insert(
            client_msg_id.to_string(),
            Send {
                client,
                room,
                content: content.to_string(),
                issued: Instant::now(),
                confirmations: Vec::new(),
            },
        );
    }

    pub fn confirm(&self, client_msg_id: &str, id: MsgId) {
        let mut log = self.log();
        if let Some(send) = log.sends.get_mut(client_msg_id) {
            if !send.confirmations.iter().any(|(c, _)| *c == id) {
                send.confirmations.push((id, Instant::now()));
            }
        }
    }

    pub fn deliver(&self, client: usize, received: Received) {
        self.log().clients[client].received.push(received);
    }

    /// The client left for good: a user who closed the app is owed no more deliveries.
    pub fn depart(&self, client: usize) {
        self.log().clients[client].departed = true;
    }

    /// A client received a `logout` frame naming `user`.
    pub fn saw_logout(&self, user: &str) {
        self.log().logouts.push((user.to_string(), Instant::now()));
    }

    /// The client's connection is logged in from now on.
    pub fn online(&self, client: usize) {
        self.log().clients[client]
            .online
            .push((Instant::now(), None));
    }

    /// The client's connection ended (it will reconnect, or it left).
    pub fn offline(&self, client: usize) {
        let mut log = self.log();
        if let Some(last) = log.clients[client].online.last_mut() {
            last.1.get_or_insert_with(Instant::now);
        }
    }

    /// `logout` frames received at or after `since` that named a user whose client was logged
    /// in on an open connection when the frame arrived (the member list says gone, the user is
    /// there): one entry per frame. A logout while the user was between connections is honest
    /// and not counted.
    pub fn logouts_of_online_users_since(&self, since: Instant) -> Vec<String> {
        let log = self.log();
        log.logouts
            .iter()
            .filter(|(_, at)| *at >= since)
            .filter(|(user, at)| {
                log.clients.iter().filter(|c| c.name == *user).any(|c| {
                    c.online
                        .iter()
                        .any(|(from, to)| from <= at && to.is_none_or(|to| to >= *at))
                })
            })
            .map(|(user, _)| user.clone())
            .collect()
    }

    pub fn resync(&self, client: usize) {
        self.log().clients[client].resyncs += 1;
    }

    /// Redis lost its data now (restarted without persistence).
    pub fn data_lost(&self) {
        self.log().data_lost.push(Instant::now());
    }

    /// A violation found by a check of the live system (presence, subscriptions).
    pub fn violation(&self, violation: Violation) {
        self.log().external.push(violation);
    }

    /// Sends issued at or after `since`: (client, first confirmation time).
    pub fn sends_since(&self, since: Instant) -> Vec<(usize, Option<Instant>)> {
        self.log()
            .sends
            .values()
            .filter(|s| s.issued >= since)
            .map(|s| (s.client, s.confirmations.first().map(|c| c.1)))
            .collect()
    }

    /// The longest time one of `clients` went without a confirmation of its sends between
    /// `from` and `to` (what a user sees as "my messages hang"): gaps between consecutive
    /// first confirmations, counting from `from` and up to `to`.
    pub fn longest_confirm_gap(&self, clients: &[usize], from: Instant, to: Instant) -> Duration {
        let log = self.log();
        let mut worst = Duration::ZERO;
        for client in clients {
            let mut times: Vec<Instant> = log
                .sends
                .values()
                .filter(|s| s.client == *client)
                .filter_map(|s| s.confirmations.first().map(|c| c.1))
                .filter(|t| *t >= from && *t <= to)
                .collect();
            times.sort();
            let mut previous = from;
            for t in times.into_iter().chain(std::iter::once(to)) {
                worst = worst.max(t - previous);
                previous = t;
            }
        }
        worst
    }

    /// For each client, when it first received a message issued at or after `since`.
    pub fn first_fresh_delivery(&self, since: Instant) -> Vec<Option<Instant>> {
        let log = self.log();
        log.clients
            .iter()
            .map(|c| {
                c.received
                    .iter()
                    .filter(|r| {
                        log.sends
                            .get(&r.client_msg_id)
                            .is_some_and(|s| s.issued >= since)
                    })
                    .map(|r| r.at)
                    .min()
            })
            .collect()
    }

    /// For each client: the `num` of the newest message it received that was issued at or
    /// after `since` (None: no such message yet).
    pub fn latest_num_since(&self, since: Instant) -> Vec<(String, String, Option<u64>)> {
        let log = self.log();
        log.clients
            .iter()
            .map(|c| {
                let num = c
                    .received
                    .iter()
                    .rev()
                    .find(|r| {
                        log.sends
                            .get(&r.client_msg_id)
                            .is_some_and(|s| s.issued >= since)
                    })
                    .and_then(|r| r.num);
                (c.name.clone(), c.room.clone(), num)
            })
            .collect()
    }

    /// (message, member) deliveries still owed: what [`check`](Self::check) would report as
    /// lost, were the run to end now, plus sends not confirmed yet.
    pub fn outstanding(&self) -> usize {
        let log = self.log();
        let (lost, _, _) = missing(&log);
        lost.len()
            + log
                .sends
                .values()
                .filter(|s| s.confirmations.is_empty() && !log.clients[s.client].departed)
                .count()
    }

    pub fn stats(&self) -> Stats {
        let log = self.log();
        stats(&log)
    }

    /// Every violation of the recorded history (see the module docs).
    pub fn check(&self) -> Vec<Violation> {
        let log = self.log();
        let mut violations = Vec::new();
        let (lost, _, _) = missing(&log);
        violations.extend(lost);

        // Order of first deliveries, and every delivery matching a send.
        for c in &log.clients {
            let mut seen = HashSet::new();
            let mut newest: Option<MsgId> = None;
            for r in &c.received {
                match log.sends.get(&r.client_msg_id) {
                    None => violations.push(Violation::Phantom {
                        client: c.name.clone(),
                        id: r.id,
                        detail: format!("clientMsgId {:?} was never sent", r.client_msg_id),
                    }),
                    Some(send) if send.content != r.content || send.room != c.room => violations
                        .push(Violation::Phantom {
                            client: c.name.clone(),
                            id: r.id,
                            detail: format!(
                                "sent {:?} in {}, received {:?} in {}",
                                send.content, send.room, r.content, c.room
                            ),
                        }),
                    Some(_) => {}
                }
                if !seen.insert(r.id) {
                    continue; // a redelivery
                }
                if let Some(after) = newest.filter(|n| r.id < *n) {
                    violations.push(Violation::OutOfOrder {
                        client: c.name.clone(),
                        room: c.room.clone(),
                        id: r.id,
                        after,
                    });
                }
                newest = newest.max(Some(r.id));
            }
        }

        // One clientMsgId, one message: every id it was confirmed or delivered under.
        let mut ids_of: HashMap<&str, Vec<(MsgId, Instant)>> = HashMap::new();
        for (cmid, send) in &log.sends {
            ids_of.entry(cmid).or_default().extend(&send.confirmations);
        }
        for c in &log.clients {
            for r in &c.received {
                ids_of
                    .entry(r.client_msg_id.as_str())
                    .or_default()
                    .push((r.id, r.at));
            }
        }
        for (cmid, mut ids) in ids_of {
            ids.sort();
            ids.dedup_by_key(|(id, _)| *id);
            if ids.len() < 2 {
                continue;
            }
            // Legitimate only when Redis lost the first copy (and with it the dedup key).
            let first_seen = ids.iter().map(|(_, at)| *at).min().expect("two ids");
            let lost_between = log.data_lost.iter().any(|t| *t >= first_seen);
            if !lost_between {
                violations.push(Violation::Duplicated {
                    client_msg_id: cmid.to_string(),
                    ids: ids.into_iter().map(|(id, _)| id).collect(),
                });
            }
        }

        for (cmid, send) in &log.sends {
            // A user who left gave up on what was still unconfirmed.
            if send.confirmations.is_empty() && !log.clients[send.client].departed {
                violations.push(Violation::NeverConfirmed {
                    client: log.clients[send.client].name.clone(),
                    client_msg_id: cmid.clone(),
                });
            }
        }
        violations.extend(log.external.iter().cloned());
        violations
    }
}

/// What a client is owed: every confirmed message of its room after its start — up to the
/// newest id it had received when it left, for a client that left (no gaps: ids come in order,
/// so having id N means having every earlier one).
struct Owed<'a> {
    client: &'a ClientLog,
    received: HashSet<MsgId>,
    upto: Option<MsgId>,
}

fn owed_to(log: &Log) -> Vec<Owed<'_>> {
    log.clients
        .iter()
        .filter(|c| c.ack && c.start.is_some())
        .map(|c| Owed {
            client: c,
            received: c.received.iter().map(|r| r.id).collect(),
            upto: if c.departed {
                Some(c.received.iter().map(|r| r.id).max().unwrap_or(MsgId(0, 0)))
            } else {
                None
            },
        })
        .collect()
}

/// The (message, member) deliveries missing from the history: violations, how many are
/// exempt because Redis lost the data before they were delivered, and how many were owed.
fn missing(log: &Log) -> (Vec<Violation>, usize, usize) {
    let mut lost = Vec::new();
    let mut exempt = 0;
    let mut owed_pairs = 0;
    let owed = owed_to(log);
    for (cmid, send) in &log.sends {
        // Only the newest copy is owed; older ones (stored before Redis lost them) are covered
        // by the duplicate rule.
        let Some(&(id, confirmed_at)) = send.confirmations.last() else {
            continue;
        };
        for o in owed.iter().filter(|o| o.client.room == send.room) {
            let start = o.client.start.expect("filtered on start");
            if id <= start || o.upto.is_some_and(|upto| id > upto) {
                continue;
            }
            owed_pairs += 1;
            if o.received.contains(&id) {
                continue;
            }
            if log.data_lost.iter().any(|t| *t >= confirmed_at) {
                exempt += 1;
                continue;
            }
            lost.push(Violation::Lost {
                client: o.client.name.clone(),
                room: o.client.room.clone(),
                id,
                client_msg_id: cmid.clone(),
            });
        }
    }
    (lost, exempt, owed_pairs)
}

fn stats(log: &Log) -> Stats {
    let (_, exempt, expected) = missing(log);
    let mut ids = HashSet::new();
    for send in log.sends.values() {
        if let Some(&(id, _)) = send.confirmations.last() {
            ids.insert((send.room.as_str(), id));
        }
    }
    let deliveries: usize = log.clients.iter().map(|c| c.received.len()).sum();
    let distinct: usize = log
        .clients
        .iter()
        .map(|c| {
            c.received
                .iter()
                .map(|r| r.id)
                .collect::<HashSet<_>>()
                .len()
        })
        .sum();
    Stats {
        sends: log.sends.len(),
        confirmed: log
            .sends
            .values()
            .filter(|s| !s.confirmations.is_empty())
            .count(),
        messages: ids.len(),
        deliveries,
        redeliveries: deliveries - distinct,
        expected_deliveries: expected,
        lost_with_redis_data: exempt,
        resyncs: log.clients.iter().map(|c| c.resyncs).sum(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn got(h: &History, client: usize, id: MsgId, cmid: &str, content: &str) {
        h.deliver(
            client,
            Received {
                id,
                client_msg_id: cmid.into(),
                content: content.into(),
                user: "u".into(),
                num: Some(2),
                at: Instant::now(),
            },
        );
    }

    fn two_members() -> History {
        let h = History::new();
        let a = h.add_client("a", "r", true);
        let b = h.add_client("b", "r", true);
        h.started(a, MsgId(0, 0));
        h.started(b, MsgId(0, 0));
        h
    }

    #[test]
    fn a_clean_history_has_no_violations() {
        let h = two_members();
        h.send(0, "c1", "x");
        h.confirm("c1", MsgId(1, 0));
        got(&h, 0, MsgId(1, 0), "c1", "x");
        got(&h, 1, MsgId(1, 0), "c1", "x");
        got(&h, 1, MsgId(1, 0), "c1", "x"); // a redelivery is fine
        assert_eq!(h.check(), vec![]);
        assert_eq!(h.stats().redeliveries, 1);
        assert_eq!(h.stats().expected_deliveries, 2);
    }

    #[test]
    fn each_broken_guarantee_is_reported() {
        let h = two_members();
        h.send(0, "c1", "x");
        h.confirm("c1", MsgId(1, 0));
        h.send(0, "c2", "y");
        h.confirm("c2", MsgId(2, 0));
        h.confirm("c2", MsgId(3, 0)); // stored twice
        h.send(0, "c3", "z"); // never confirmed
        got(&h, 0, MsgId(2, 0), "c2", "y");
        got(&h, 0, MsgId(1, 0), "c1", "x"); // out of order
        got(&h, 0, MsgId(3, 0), "c2", "y");
        got(&h, 0, MsgId(4, 0), "ghost", "boo"); // nobody sent it
        let v = h.check();
        let has = |pred: &dyn Fn(&Violation) -> bool| v.iter().any(pred);
        assert!(has(
            &|v| matches!(v, Violation::Lost { client, .. } if client == "b")
        ));
        assert!(has(&|v| matches!(v, Violation::OutOfOrder { .. })));
        assert!(has(&|v| matches!(v, Violation::Duplicated { .. })));
        assert!(has(&|v| matches!(v, Violation::Phantom { .. })));
        assert!(has(&|v| matches!(v, Violation::NeverConfirmed { .. })));
    }

    #[test]
    fn a_client_that_left_is_owed_no_more_than_its_newest_id_but_no_gap_before_it() {
        let h = two_members();
        for (cmid, id) in [("c1", 1), ("c2", 2), ("c3", 3)] {
            h.send(0, cmid, "x");
            h.confirm(cmid, MsgId(id, 0));
            got(&h, 0, MsgId(id, 0), cmid, "x");
        }
        got(&h, 1, MsgId(1, 0), "c1", "x");
        got(&h, 1, MsgId(3, 0), "c3", "x"); // 2 skipped: a gap
        h.depart(1);
        h.send(0, "c4", "x");
        h.confirm("c4", MsgId(4, 0)); // after b left: not owed to b
        got(&h, 0, MsgId(4, 0), "c4", "x");
        let v = h.check();
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(
            matches!(&v[0], Violation::Lost { client, id, .. } if client == "b" && *id == MsgId(2, 0))
        );
    }

    #[test]
    fn what_redis_lost_is_exempt_but_counted() {
        let h = two_members();
        h.send(0, "c1", "x");
        h.confirm("c1", MsgId(1, 0));
        got(&h, 0, MsgId(1, 0), "c1", "x");
        h.data_lost();
        assert_eq!(h.check(), vec![]);
        assert_eq!(h.stats().lost_with_redis_data, 1);
        // A message confirmed after the loss is owed again.
        h.send(0, "c2", "y");
        h.confirm("c2", MsgId(5, 0));
        assert_eq!(h.check().len(), 2, "{:?}", h.check());
    }
}
