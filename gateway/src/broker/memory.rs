//! Embedded broker for a single node: the same semantics as the Redis broker (stream ids,
//! trimming, de-duplication, presence with distinct-user counts, acknowledged positions), kept
//! in process memory. Nothing outlives the process.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::{
    now_ms, Appended, BrokerError, Inbound, InboundSender, JoinOutcome, LeaveOutcome, Limits,
    MemberPage, Page, Position, Post, PresenceEntry, RoomSummary, Topic, WhenFull,
};
use crate::protocol::{json_string, Announcement, StreamId};

#[derive(Default)]
struct Stream {
    /// `(id, frame after the id)`
    entries: VecDeque<(StreamId, String)>,
    last: StreamId,
    max_deleted: StreamId,
    /// Renewed by every append; an idle stream is dropped after it.
    expires: Option<Instant>,
}

/// One connection's presence.
struct Conn {
    user: String,
    /// `"userId":…,"userName":…`
    fragment: String,
    /// Broker time (ms since the epoch) after which a prune removes it.
    expires_at_ms: u64,
}

#[derive(Default)]
struct Room {
    conns: HashMap<String, Conn>,
    /// userId → connections; sorted so member pages have a stable cursor.
    users: BTreeMap<String, u32>,
    /// Announcements made in the current one-second window, and when it started.
    announces: (u64, Option<Instant>),
    /// The room id's JSON as the first joiner wrote it (listed by `rooms`).
    room_json: String,
    /// The name the first joiner gave; kept while anyone is in the room.
    name: String,
}

impl Room {
    fn fragment(&self) -> String {
        format!(
            r#""roomId":{},"roomName":{}"#,
            self.room_json,
            json_string(&self.name)
        )
    }

    /// Adds a connection; true if it is its user's first in the room.
    fn add(&mut self, entry: &PresenceEntry, expires_at_ms: u64) -> bool {
        if self.conns.is_empty() {
            self.room_json = entry.room_json.clone();
            self.name = entry.room_name.clone();
        }
        let conn = Conn {
            user: entry.user_id.clone(),
            fragment: entry.user_fragment.clone(),
            expires_at_ms,
        };
        if self.conns.insert(entry.conn_key.clone(), conn).is_some() {
            return false;
        }
        let count = self.users.entry(entry.user_id.clone()).or_insert(0);
        *count += 1;
        *count == 1
    }

    /// Removes a connection; its user and fragment, and whether it was the user's last.
    fn remove(&mut self, conn_key: &str) -> Option<(Conn, bool)> {
        let conn = self.conns.remove(conn_key)?;
        let mut last = false;
        if let Some(count) = self.users.get_mut(&conn.user) {
            *count -= 1;
            if *count == 0 {
                self.users.remove(&conn.user);
                last = true;
            }
        }
        Some((conn, last))
    }
}

#[derive(Default)]
struct State {
    subscribed: HashSet<Topic>,
    streams: HashMap<Topic, Stream>,
    /// (topic, sender, dedup id) → the id it got
    dedup: HashMap<(Topic, String, String), (StreamId, Instant)>,
    rooms: HashMap<String, Room>,
    /// Positions by (user, topic), each expiring like the history.
    positions: HashMap<(String, Topic), (StreamId, Instant)>,
    /// Users marked by `mark_seen`, until they expire.
    seen: HashMap<String, Instant>,
    /// Appends since the last sweep of expired streams, positions and marks.
    appends_since_sweep: usize,
}

impl State {
    /// Drops what expired. Run every so many appends, so its cost is spread thin.
    fn sweep(&mut self, now: Instant) {
        self.streams
            .retain(|_, s| s.expires.is_none_or(|expires| expires > now));
        self.positions.retain(|_, (_, expires)| *expires > now);
        self.seen.retain(|_, expires| *expires > now);
        self.dedup.retain(|_, (_, expires)| *expires > now);
        self.appends_since_sweep = 0;
    }
}

/// An announcement to render: event, user fragment, envelope header, count.
type Announced<'a> = (Announcement, &'a str, &'a str, u64);

/// Appends between two sweeps of expired state.
const SWEEP_EVERY: usize = 4096;

pub struct MemoryBroker {
    state: Mutex<State>,
    inbound: InboundSender,
    dedup_ttl: Duration,
    history_ttl: Duration,
    /// Rooms with more users than this get no login/logout broadcasts.
    announce_max: u64,
    /// Login/logout broadcasts per room and second, at most.
    announces_per_sec: u64,
    /// Tests make unsubscribing take as long as a Redis round trip would.
    #[cfg(test)]
    pub unsubscribe_latency: Option<Duration>,
}

impl MemoryBroker {
    pub fn new(limits: Limits, inbound: InboundSender) -> MemoryBroker {
        MemoryBroker {
            state: Mutex::new(State::default()),
            inbound,
            dedup_ttl: Duration::from_millis(limits.dedup_ttl_ms),
            history_ttl: Duration::from_millis(limits.history_ttl_ms),
            announce_max: limits.announce_max,
            announces_per_sec: limits.announces_per_sec,
            #[cfg(test)]
            unsubscribe_latency: None,
        }
    }

    /// An embedded broker with small limits, for unit tests of what runs on top of it.
    #[cfg(test)]
    pub fn for_tests(inbound: InboundSender) -> MemoryBroker {
        let limits = Limits {
            history_max_len: 100,
            dedup_ttl_ms: 60_000,
            announce_max: 1000,
            history_ttl_ms: 60_000,
            announces_per_sec: 50,
            presence_ttl_ms: 30_000,
            wait_replicas: 0,
            wait_timeout_ms: 500,
        };
        MemoryBroker::new(limits, inbound)
    }

    pub fn name(&self) -> &'static str {
        "embedded"
    }

    /// In process: always reachable.
    pub fn is_up(&self) -> bool {
        true
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("memory broker lock")
    }

    /// Delivers to this node if it is subscribed (called under the state lock, so publishes
    /// reach the dispatcher in the order they happened).
    fn publish(&self, state: &State, topic: &Topic, payload: String) {
        if state.subscribed.contains(topic) {
            let _ = self.inbound.send(Inbound::Message {
                topic: topic.clone(),
                payload: Bytes::from(payload),
            });
        }
    }

    pub async fn subscribe(&self, topic: &Topic) -> Result<(), BrokerError> {
        self.state().subscribed.insert(topic.clone());
        Ok(())
    }

    /// Whether this node listens on `topic` (for tests).
    #[cfg(test)]
    pub fn is_subscribed(&self, topic: &Topic) -> bool {
        self.state().subscribed.contains(topic)
    }

    pub async fn unsubscribe(&self, topic: &Topic) -> Result<(), BrokerError> {
        #[cfg(test)]
        if let Some(latency) = self.unsubscribe_latency {
            tokio::time::sleep(latency).await;
        }
        self.state().subscribed.remove(topic);
        Ok(())
    }

    pub async fn append_all(&self, posts: &[Post]) -> Vec<Result<Appended, BrokerError>> {
        let mut results = Vec::with_capacity(posts.len());
        for post in posts {
            results.push(self.append(post).await);
        }
        results
    }

    pub async fn append(&self, post: &Post) -> Result<Appended, BrokerError> {
        let mut state = self.state();
        let now = Instant::now();
        let dedup_key = post
            .dedup_id
            .as_ref()
            .map(|id| (post.topic.clone(), post.sender.clone(), id.clone()));
        if let Some(key) = &dedup_key {
            if let Some((id, expires)) = state.dedup.get(key) {
                if *expires > now {
                    return Ok(Appended {
                        id: *id,
                        created: false,
                    });
                }
            }
        }
        if let (Topic::User(user), true) = (&post.topic, post.recipient_must_exist) {
            if state.seen.get(user).is_none_or(|expires| *expires <= now) {
                return Err(BrokerError::UnknownRecipient);
            }
        }
        let max_len = post.max_len.clamp(1, usize::MAX as u64) as usize;
        if post.when_full == WhenFull::Refuse
            && state
                .streams
                .get(&post.topic)
                .is_some_and(|s| s.entries.len() >= max_len && s.expires.is_none_or(|e| e > now))
        {
            return Err(BrokerError::Full);
        }
        state.appends_since_sweep += 1;
        if state.appends_since_sweep >= SWEEP_EVERY {
            state.sweep(now);
        }
        let num = match &post.topic {
            Topic::Room(room) => state.rooms.get(room).map_or(0, |r| r.users.len() as u64),
            Topic::User(_) => 0,
        };
        let rest = post.stored(num);
        let history_ttl = self.history_ttl;
        let stream = state.streams.entry(post.topic.clone()).or_default();
        if stream.expires.is_some_and(|expires| expires <= now) {
            *stream = Stream::default(); // expired: gone, as in Redis
        }
        stream.expires = Some(now + history_ttl);
        let ms = now_ms();
        let id = if ms > stream.last.ms {
            StreamId { ms, seq: 0 }
        } else {
            stream.last.next()
        };
        stream.last = id;
        stream.entries.push_back((id, rest.clone()));
        while stream.entries.len() > max_len {
            if let Some((trimmed, _)) = stream.entries.pop_front() {
                stream.max_deleted = trimmed;
            }
        }
        if let Some(key) = dedup_key {
            if state.dedup.len() > 100_000 {
                state.dedup.retain(|_, (_, expires)| *expires > now);
            }
            state.dedup.insert(key, (id, now + self.dedup_ttl));
        }
        self.publish(&state, &post.topic, post.payload(id, &rest));
        Ok(Appended { id, created: true })
    }

    /// Counts an announcement in `room`; false beyond the per-second cap (as the scripts).
    fn may_announce(&self, room: &mut Room, now: Instant) -> bool {
        let (count, since) = &mut room.announces;
        if since.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1)) {
            *since = Some(now);
            *count = 0;
        }
        *count += 1;
        *count <= self.announces_per_sec
    }

    /// Publishes a login/logout in `room_key`: `room` is (roomId JSON, room name).
    fn announce(&self, state: &State, room_key: &str, room: (&str, &str), frame: Announced) {
        let (event, user_fragment, header, num) = frame;
        let name_json = json_string(room.1);
        let frame = event.render(user_fragment, room.0, &name_json, num);
        let topic = Topic::Room(room_key.to_string());
        self.publish(state, &topic, format!("{header}{frame}"));
    }

    pub async fn join(
        &self,
        entry: &PresenceEntry,
        announce_header: &str,
        expires_at_ms: u64,
        prune_expired: bool,
    ) -> Result<JoinOutcome, BrokerError> {
        if prune_expired {
            self.prune_rooms(Some(&entry.room_key), now_ms(), announce_header);
        }
        let mut state = self.state();
        let room = state.rooms.entry(entry.room_key.clone()).or_default();
        let first = room.add(entry, expires_at_ms);
        let room_name = room.name.clone();
        let num = room.users.len() as u64;
        let announced =
            first && num <= self.announce_max && self.may_announce(room, Instant::now());
        if announced {
            let room = (entry.room_json.as_str(), room_name.as_str());
            self.announce(
                &state,
                &entry.room_key,
                room,
                (
                    Announcement::Login,
                    &entry.user_fragment,
                    announce_header,
                    num,
                ),
            );
        }
        Ok(JoinOutcome {
            first,
            num,
            announced,
            room_name,
        })
    }

    pub async fn leave(
        &self,
        entry: &PresenceEntry,
        announce_header: &str,
    ) -> Result<LeaveOutcome, BrokerError> {
        let mut state = self.state();
        let Some(room) = state.rooms.get_mut(&entry.room_key) else {
            return Ok(LeaveOutcome {
                last: false,
                num: 0,
            });
        };
        let Some((conn, last)) = room.remove(&entry.conn_key) else {
            return Ok(LeaveOutcome {
                last: false,
                num: room.users.len() as u64,
            });
        };
        let num = room.users.len() as u64;
        // Announced if the room was within the limit before this user left (as leave.lua).
        let announce = last && num < self.announce_max && self.may_announce(room, Instant::now());
        if room.conns.is_empty() {
            state.rooms.remove(&entry.room_key);
        }
        if announce {
            let room = (entry.room_json.as_str(), entry.room_name.as_str());
            self.announce(
                &state,
                &entry.room_key,
                room,
                (Announcement::Logout, &conn.fragment, announce_header, num),
            );
        }
        Ok(LeaveOutcome { last, num })
    }

    /// Pushes the entries' expiry forward, re-creating those that are gone (as refresh.lua).
    pub async fn refresh(
        &self,
        entries: &[PresenceEntry],
        expires_at_ms: u64,
        announce_header: &str,
    ) -> Result<u64, BrokerError> {
        let mut state = self.state();
        let mut restored = 0;
        for entry in entries {
            let room = state.rooms.entry(entry.room_key.clone()).or_default();
            if let Some(conn) = room.conns.get_mut(&entry.conn_key) {
                conn.expires_at_ms = expires_at_ms;
                continue;
            }
            restored += 1;
            let first = room.add(entry, expires_at_ms);
            let num = room.users.len() as u64;
            if first && num <= self.announce_max && self.may_announce(room, Instant::now()) {
                let (room_json, name) = (room.room_json.clone(), room.name.clone());
                self.announce(
                    &state,
                    &entry.room_key,
                    (&room_json, &name),
                    (
                        Announcement::Login,
                        &entry.user_fragment,
                        announce_header,
                        num,
                    ),
                );
            }
        }
        Ok(restored)
    }

    /// Removes the entries whose expiry passed and announces each departed user's logout
    /// once (as prune.lua).
    pub async fn prune(&self, now_ms: u64, announce_header: &str) -> Result<u64, BrokerError> {
        Ok(self.prune_rooms(None, now_ms, announce_header))
    }

    /// Prunes one room, or every room.
    fn prune_rooms(&self, only: Option<&str>, now_ms: u64, announce_header: &str) -> u64 {
        let mut state = self.state();
        let mut removed = 0;
        let mut departures = Vec::new();
        let room_keys: Vec<String> = match only {
            Some(room) => vec![room.to_string()],
            None => state.rooms.keys().cloned().collect(),
        };
        for room_key in room_keys {
            let Some(room) = state.rooms.get_mut(&room_key) else {
                continue;
            };
            let expired: Vec<String> = room
                .conns
                .iter()
                .filter(|(_, c)| c.expires_at_ms <= now_ms)
                .map(|(k, _)| k.clone())
                .collect();
            for conn_key in expired {
                let Some((conn, last)) = room.remove(&conn_key) else {
                    continue;
                };
                removed += 1;
                let num = room.users.len() as u64;
                if last && num < self.announce_max && self.may_announce(room, Instant::now()) {
                    let room_info = (room.room_json.clone(), room.name.clone());
                    departures.push((room_key.clone(), conn.fragment, room_info, num));
                }
            }
            if room.conns.is_empty() {
                state.rooms.remove(&room_key);
            }
        }
        for (room_key, fragment, (room_json, name), num) in departures {
            self.announce(
                &state,
                &room_key,
                (&room_json, &name),
                (Announcement::Logout, &fragment, announce_header, num),
            );
        }
        removed
    }

    pub async fn range(
        &self,
        topic: &Topic,
        after: StreamId,
        limit: usize,
    ) -> Result<Page, BrokerError> {
        let state = self.state();
        let now = Instant::now();
        let Some(stream) = state
            .streams
            .get(topic)
            .filter(|s| s.expires.is_none_or(|e| e > now))
        else {
            return Ok(Page::default());
        };
        let head = topic.frame_head();
        let start = stream.entries.partition_point(|(id, _)| *id <= after);
        let entries = stream
            .entries
            .iter()
            .skip(start)
            .take(limit)
            .map(|(id, rest)| (*id, format!("{head}{id}{rest}")))
            .collect();
        Ok(Page {
            entries,
            truncated: after < stream.max_deleted,
        })
    }

    pub async fn newest_id(&self, topic: &Topic) -> Result<Option<StreamId>, BrokerError> {
        Ok(self
            .state()
            .streams
            .get(topic)
            .filter(|s| s.expires.is_none_or(|e| e > Instant::now()))
            .and_then(|s| s.entries.back())
            .map(|(id, _)| *id))
    }

    pub async fn save_positions(&self, positions: &[Position]) -> Result<(), BrokerError> {
        let mut state = self.state();
        let expires = Instant::now() + self.history_ttl;
        for p in positions {
            state
                .positions
                .insert((p.user.clone(), p.topic.clone()), (p.id, expires));
        }
        Ok(())
    }

    pub async fn load_position(
        &self,
        user: &str,
        topic: &Topic,
    ) -> Result<Option<StreamId>, BrokerError> {
        let now = Instant::now();
        Ok(self
            .state()
            .positions
            .get(&(user.to_string(), topic.clone()))
            .filter(|(_, expires)| *expires > now)
            .map(|(id, _)| *id))
    }

    pub async fn mark_seen(&self, user: &str, ttl_ms: u64) -> Result<(), BrokerError> {
        let expires = Instant::now() + Duration::from_millis(ttl_ms);
        self.state().seen.insert(user.to_string(), expires);
        Ok(())
    }

    pub async fn trim_inboxes(&self, read: &[(String, StreamId)]) -> Result<(), BrokerError> {
        let mut state = self.state();
        for (user, id) in read {
            if let Some(stream) = state.streams.get_mut(&Topic::User(user.clone())) {
                while stream.entries.front().is_some_and(|(first, _)| first <= id) {
                    stream.entries.pop_front();
                }
            }
        }
        Ok(())
    }

    pub async fn rooms(&self, limit: usize) -> Result<Vec<RoomSummary>, BrokerError> {
        let state = self.state();
        let mut rooms: Vec<RoomSummary> = state
            .rooms
            .iter()
            .map(|(key, room)| RoomSummary {
                room_key: key.clone(),
                room_fragment: room.fragment(),
                num: room.users.len() as u64,
            })
            .collect();
        rooms.sort_by(|a, b| b.num.cmp(&a.num).then(a.room_key.cmp(&b.room_key)));
        rooms.truncate(limit);
        Ok(rooms)
    }

    pub async fn room_count(&self, room_key: &str) -> Result<u64, BrokerError> {
        Ok(self
            .state()
            .rooms
            .get(room_key)
            .map_or(0, |r| r.users.len() as u64))
    }

    pub async fn members(
        &self,
        room_key: &str,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<MemberPage, BrokerError> {
        // Our cursors are the last user id listed.
        if cursor.is_some_and(|after| crate::protocol::check_name(after).is_err()) {
            return Err(BrokerError::BadCursor);
        }
        let state = self.state();
        let Some(room) = state.rooms.get(room_key) else {
            return Ok(MemberPage::default());
        };
        let fragments: HashMap<&str, &str> = room
            .conns
            .values()
            .map(|c| (c.user.as_str(), c.fragment.as_str()))
            .collect();
        let start = match cursor {
            Some(after) => std::ops::Bound::Excluded(after.to_string()),
            None => std::ops::Bound::Unbounded,
        };
        let mut members: Vec<(String, String)> = room
            .users
            .range((start, std::ops::Bound::Unbounded))
            .take(limit + 1)
            .map(|(user, _)| {
                let fragment = fragments.get(user.as_str()).copied().unwrap_or_default();
                (user.clone(), fragment.to_string())
            })
            .collect();
        let next_cursor = if members.len() > limit {
            members.truncate(limit);
            members.last().map(|(user, _)| user.clone())
        } else {
            None
        };
        Ok(MemberPage {
            num: room.users.len() as u64,
            members,
            next_cursor,
        })
    }

    pub async fn publish_control(&self, topic: &Topic, payload: &str) -> Result<(), BrokerError> {
        let state = self.state();
        self.publish(&state, topic, payload.to_string());
        Ok(())
    }
}
