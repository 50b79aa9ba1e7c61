//! Embedded broker for a single node: the same semantics as the Redis broker (stream ids,
//! trimming, de-duplication, presence with distinct-user counts, acknowledged positions), kept
//! in process memory. Nothing outlives the process.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::{
    now_ms, AppendRequest, Appended, BrokerError, Inbound, InboundSender, JoinOutcome, Keys,
    LeaveOutcome, Limits, MemberPage, Page, PresenceEntry, RoomSummary,
};
use crate::protocol::{logout_frame, StreamId};

#[derive(Default)]
struct Stream {
    /// `(id, frame after the id)`
    entries: VecDeque<(StreamId, String)>,
    last: StreamId,
    max_deleted: StreamId,
    /// Renewed by every append; an idle stream is dropped after it.
    expires: Option<Instant>,
}

#[derive(Default)]
struct Room {
    /// conn key → (userId, user fragment)
    conns: HashMap<String, (String, String)>,
    /// userId → connections; sorted so member pages have a stable cursor.
    users: BTreeMap<String, u32>,
    /// Announcements made in the current one-second window, and when it started.
    announces: (u64, Option<Instant>),
    /// `"roomId":…,"roomName":…` of the first joiner (listed by `rooms`).
    fragment: String,
    /// The name the first joiner gave; kept while anyone is in the room.
    name: String,
}

#[derive(Default)]
struct State {
    subscribed: HashSet<String>,
    streams: HashMap<String, Stream>,
    dedup: HashMap<String, (StreamId, Instant)>,
    rooms: HashMap<String, Room>,
    /// Positions, each expiring like the history.
    acks: HashMap<(String, String), (StreamId, Instant)>,
    /// Keys marked by `touch`, until they expire.
    touched: HashMap<String, Instant>,
    /// Appends since the last sweep of expired streams, positions and marks.
    appends_since_sweep: usize,
}

impl State {
    /// Drops what expired. Run every so many appends, so its cost is spread thin.
    fn sweep(&mut self, now: Instant) {
        self.streams
            .retain(|_, s| s.expires.is_none_or(|expires| expires > now));
        self.acks.retain(|_, (_, expires)| *expires > now);
        self.touched.retain(|_, expires| *expires > now);
        self.dedup.retain(|_, (_, expires)| *expires > now);
        self.appends_since_sweep = 0;
    }
}

/// Appends between two sweeps of expired state.
const SWEEP_EVERY: usize = 4096;

pub struct MemoryBroker {
    pub keys: Keys,
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
            keys: Keys::default(),
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
        };
        MemoryBroker::new(limits, inbound)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("memory broker lock")
    }

    /// Delivers to this node if it is subscribed (called under the state lock, so publishes
    /// reach the dispatcher in the order they happened).
    fn publish(&self, state: &State, channel: &str, payload: String) {
        if state.subscribed.contains(channel) {
            let _ = self.inbound.send(Inbound::Message {
                channel: Bytes::copy_from_slice(channel.as_bytes()),
                payload: Bytes::from(payload),
            });
        }
    }

    pub async fn subscribe(&self, channel: &str) -> Result<(), BrokerError> {
        self.state().subscribed.insert(channel.to_string());
        Ok(())
    }

    /// Whether this node listens on `channel` (for tests).
    #[cfg(test)]
    pub fn is_subscribed(&self, channel: &str) -> bool {
        self.state().subscribed.contains(channel)
    }

    pub async fn unsubscribe(&self, channel: &str) -> Result<(), BrokerError> {
        #[cfg(test)]
        if let Some(latency) = self.unsubscribe_latency {
            tokio::time::sleep(latency).await;
        }
        self.state().subscribed.remove(channel);
        Ok(())
    }

    pub async fn append_all(&self, reqs: &[AppendRequest]) -> Vec<Result<Appended, BrokerError>> {
        let mut results = Vec::with_capacity(reqs.len());
        for req in reqs {
            results.push(self.append(req).await);
        }
        results
    }

    pub async fn append(&self, req: &AppendRequest) -> Result<Appended, BrokerError> {
        let mut state = self.state();
        let now = Instant::now();
        if let Some(key) = &req.dedup_key {
            if let Some((id, expires)) = state.dedup.get(key) {
                if *expires > now {
                    return Ok(Appended {
                        id: *id,
                        created: false,
                    });
                }
            }
        }
        if let Some(key) = &req.require_key {
            if state.touched.get(key).is_none_or(|expires| *expires <= now) {
                return Err(BrokerError::UnknownRecipient);
            }
        }
        let max_len = req.max_len.clamp(1, usize::MAX as u64) as usize;
        if req.refuse_when_full
            && state
                .streams
                .get(&req.stream_key)
                .is_some_and(|s| s.entries.len() >= max_len && s.expires.is_none_or(|e| e > now))
        {
            return Err(BrokerError::Full);
        }
        state.appends_since_sweep += 1;
        if state.appends_since_sweep >= SWEEP_EVERY {
            state.sweep(now);
        }
        let mut rest = req.body.clone();
        if let Some(room) = &req.count_room {
            let num = state.rooms.get(room).map_or(0, |r| r.users.len());
            rest.push_str(&num.to_string());
            rest.push_str(&req.tail);
        }
        let history_ttl = self.history_ttl;
        let stream = state.streams.entry(req.stream_key.clone()).or_default();
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
        if let Some(key) = &req.dedup_key {
            if state.dedup.len() > 100_000 {
                state.dedup.retain(|_, (_, expires)| *expires > now);
            }
            state.dedup.insert(key.clone(), (id, now + self.dedup_ttl));
        }
        let payload = format!(
            "{}{id}{}{}{id}{rest}",
            req.header_before, req.header_after, req.frame_head
        );
        self.publish(&state, &req.channel, payload);
        Ok(Appended { id, created: true })
    }

    /// Counts an announcement in `room`; false beyond the per-second cap (as announce.lua).
    fn may_announce(&self, room: &mut Room, now: Instant) -> bool {
        let (count, since) = &mut room.announces;
        if since.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1)) {
            *since = Some(now);
            *count = 0;
        }
        *count += 1;
        *count <= self.announces_per_sec
    }

    pub async fn join(
        &self,
        entry: &PresenceEntry,
        channel: &str,
        announce_header: &str,
        _expires_at_ms: u64,
    ) -> Result<JoinOutcome, BrokerError> {
        let mut state = self.state();
        let room = state.rooms.entry(entry.room_key.clone()).or_default();
        if room.conns.is_empty() {
            room.fragment = entry.room_fragment();
            room.name = entry.room_name.clone();
        }
        let room_name = room.name.clone();
        let room_fragment = format!(
            r#""roomId":{},"roomName":{}"#,
            entry.room_json,
            crate::protocol::json_string(&room_name)
        );
        let added = room
            .conns
            .insert(
                entry.conn_key.clone(),
                (entry.user_id.clone(), entry.user_fragment.clone()),
            )
            .is_none();
        let mut first = false;
        if added {
            let count = room.users.entry(entry.user_id.clone()).or_insert(0);
            *count += 1;
            first = *count == 1;
        }
        let num = room.users.len() as u64;
        let announced =
            first && num <= self.announce_max && self.may_announce(room, Instant::now());
        if announced {
            let frame = crate::protocol::login_frame(&entry.user_fragment, &room_fragment, num);
            self.publish(&state, channel, format!("{announce_header}{frame}"));
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
        channel: &str,
        announce_header: &str,
    ) -> Result<LeaveOutcome, BrokerError> {
        let mut state = self.state();
        let Some(room) = state.rooms.get_mut(&entry.room_key) else {
            return Ok(LeaveOutcome {
                last: false,
                num: 0,
            });
        };
        let Some((user, fragment)) = room.conns.remove(&entry.conn_key) else {
            return Ok(LeaveOutcome {
                last: false,
                num: room.users.len() as u64,
            });
        };
        let mut last = false;
        if let Some(count) = room.users.get_mut(&user) {
            *count -= 1;
            if *count == 0 {
                room.users.remove(&user);
                last = true;
            }
        }
        let num = room.users.len() as u64;
        // Announced if the room was within the limit before this user left (as in leave.lua).
        let announce = last && num < self.announce_max && self.may_announce(room, Instant::now());
        if room.conns.is_empty() {
            state.rooms.remove(&entry.room_key);
        }
        if announce {
            let frame = logout_frame(&fragment, &entry.room_fragment(), num);
            self.publish(&state, channel, format!("{announce_header}{frame}"));
        }
        Ok(LeaveOutcome { last, num })
    }

    /// One process holds every entry, and it is alive: nothing expires.
    pub async fn refresh(&self, _: &[PresenceEntry], _: u64, _: &str) -> Result<u64, BrokerError> {
        Ok(0)
    }

    pub async fn prune(&self, _: u64, _: &str) -> Result<u64, BrokerError> {
        Ok(0)
    }

    pub async fn range(
        &self,
        stream_key: &str,
        frame_head: &str,
        after: StreamId,
        limit: usize,
    ) -> Result<Page, BrokerError> {
        let state = self.state();
        let now = Instant::now();
        let Some(stream) = state
            .streams
            .get(stream_key)
            .filter(|s| s.expires.is_none_or(|e| e > now))
        else {
            return Ok(Page::default());
        };
        let start = stream.entries.partition_point(|(id, _)| *id <= after);
        let entries = stream
            .entries
            .iter()
            .skip(start)
            .take(limit)
            .map(|(id, rest)| (*id, format!("{frame_head}{id}{rest}")))
            .collect();
        Ok(Page {
            entries,
            truncated: after < stream.max_deleted,
        })
    }

    pub async fn newest_id(&self, stream_key: &str) -> Result<Option<StreamId>, BrokerError> {
        Ok(self
            .state()
            .streams
            .get(stream_key)
            .filter(|s| s.expires.is_none_or(|e| e > Instant::now()))
            .and_then(|s| s.entries.back())
            .map(|(id, _)| *id))
    }

    pub async fn save_acks(&self, acks: &[(String, String, StreamId)]) -> Result<(), BrokerError> {
        let mut state = self.state();
        let expires = Instant::now() + self.history_ttl;
        for (key, field, id) in acks {
            state
                .acks
                .insert((key.clone(), field.clone()), (*id, expires));
        }
        Ok(())
    }

    pub async fn load_ack(&self, key: &str, field: &str) -> Result<Option<StreamId>, BrokerError> {
        let now = Instant::now();
        Ok(self
            .state()
            .acks
            .get(&(key.to_string(), field.to_string()))
            .filter(|(_, expires)| *expires > now)
            .map(|(id, _)| *id))
    }

    pub async fn touch(&self, key: &str, ttl_ms: u64) -> Result<(), BrokerError> {
        let expires = Instant::now() + Duration::from_millis(ttl_ms);
        self.state().touched.insert(key.to_string(), expires);
        Ok(())
    }

    pub async fn trim_read(&self, streams: &[(String, StreamId)]) -> Result<(), BrokerError> {
        let mut state = self.state();
        for (key, id) in streams {
            if let Some(stream) = state.streams.get_mut(key) {
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
                room_fragment: room.fragment.clone(),
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
        let state = self.state();
        let Some(room) = state.rooms.get(room_key) else {
            return Ok(MemberPage::default());
        };
        let fragments: HashMap<&str, &str> = room
            .conns
            .values()
            .map(|(user, fragment)| (user.as_str(), fragment.as_str()))
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

    pub async fn publish_control(&self, channel: &str, payload: &str) -> Result<(), BrokerError> {
        let state = self.state();
        self.publish(&state, channel, payload.to_string());
        Ok(())
    }
}
