//! Presence: which connections are in which rooms, kept alive in the broker by this node.
//! Joins and leaves are one broker call each (which also announces login/logout); a periodic
//! refresh pushes the expiry of all live entries forward in one pipelined batch; a periodic
//! prune removes the entries of dead nodes and announces their users' departure once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::broker::{
    now_ms, now_us, Broker, BrokerError, EnvelopeHeader, JoinOutcome, Kind, LeaveOutcome,
    PresenceEntry,
};
use crate::metrics::Metrics;

/// Failed joins remembered for cleanup at most (see `Presence::orphans`).
const MAX_ORPHANS: usize = 10_000;
/// Prune batches one tick may run (each removes up to the broker's batch size).
const PRUNE_ROUNDS: usize = 50;

pub struct Presence {
    /// When this node last could not keep its entries fresh (see `disturbed`).
    disturbed_at: Mutex<Option<std::time::Instant>>,
    /// Live entries of this node by (connection, room key). Boxed: the table keeps spare
    /// slots, and an entry is six strings.
    entries: Mutex<HashMap<(u64, String), Box<PresenceEntry>>>,
    /// Entries whose join failed: the broker may have stored them all the same (its answer was
    /// lost), so they are left again, at the next refresh, until that succeeds.
    orphans: Mutex<Vec<(u64, PresenceEntry)>>,
    broker: Broker,
    node_id: String,
    ttl: Duration,
    metrics: Arc<Metrics>,
}

impl Presence {
    pub fn new(broker: Broker, node_id: String, ttl: Duration, metrics: Arc<Metrics>) -> Presence {
        Presence {
            disturbed_at: Mutex::new(None),
            entries: Mutex::new(HashMap::new()),
            orphans: Mutex::new(Vec::new()),
            broker,
            node_id,
            ttl,
            metrics,
        }
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<(u64, String), Box<PresenceEntry>>> {
        self.entries.lock().expect("presence lock")
    }

    /// The envelope header of a login/logout announcement made by this node now.
    pub fn announce_header(&self) -> String {
        EnvelopeHeader {
            kind: Kind::Presence,
            published_us: now_us(),
            origin: self.node_id.clone(),
            sender_conn: None,
            traceparent: String::new(),
        }
        .without_id()
    }

    fn expires_at(&self) -> u64 {
        now_ms() + self.ttl.as_millis() as u64
    }

    pub async fn join(
        &self,
        conn_id: u64,
        entry: PresenceEntry,
    ) -> Result<JoinOutcome, BrokerError> {
        let mut entry = entry;
        let joined = self
            .broker
            .join(
                &entry,
                &self.announce_header(),
                self.expires_at(),
                self.may_prune(),
            )
            .await;
        let outcome = match joined {
            Ok(outcome) => outcome,
            Err(e) => {
                let mut orphans = self.orphans.lock().expect("presence lock");
                // Bounded (logins keep failing while the broker is down): beyond it, a stored
                // orphan is still pruned once it expires.
                if orphans.len() < MAX_ORPHANS {
                    orphans.push((conn_id, entry));
                }
                return Err(e);
            }
        };
        // Refreshes must re-create the room under the name in effect, not the one proposed.
        entry.room_name = outcome.room_name.clone();
        let key = (conn_id, entry.room_key.clone());
        if self.entries().insert(key, Box::new(entry)).is_none() {
            self.metrics.presence_entries.inc();
        }
        Ok(outcome)
    }

    pub async fn leave(&self, conn_id: u64, room_key: &str) -> Result<LeaveOutcome, BrokerError> {
        let Some(entry) = self.entries().remove(&(conn_id, room_key.to_string())) else {
            return Ok(LeaveOutcome {
                last: false,
                num: 0,
            });
        };
        self.metrics.presence_entries.dec();
        self.broker.leave(&entry, &self.announce_header()).await
    }

    /// Pushes every live entry's expiry forward (re-creating vanished ones).
    pub async fn refresh(&self) -> Result<u64, BrokerError> {
        self.leave_orphans().await;
        let entries: Vec<PresenceEntry> = self.entries().values().map(|e| (**e).clone()).collect();
        let restored = self
            .broker
            .refresh(&entries, self.expires_at(), &self.announce_header())
            .await?;
        if restored > 0 {
            tracing::info!(
                restored,
                "re-created presence entries missing from the broker"
            );
        }
        Ok(restored)
    }

    /// Leaves the entries of failed joins (see `orphans`), unless the connection is in that
    /// room now after all (a later join of it succeeded); those that fail stay for next time.
    async fn leave_orphans(&self) {
        let orphans = std::mem::take(&mut *self.orphans.lock().expect("presence lock"));
        for (conn_id, entry) in orphans {
            if self
                .entries()
                .contains_key(&(conn_id, entry.room_key.clone()))
            {
                continue;
            }
            if self
                .broker
                .leave(&entry, &self.announce_header())
                .await
                .is_err()
            {
                self.orphans
                    .lock()
                    .expect("presence lock")
                    .push((conn_id, entry));
            }
        }
    }

    /// Refreshes well inside the TTL and prunes dead nodes' entries, until `shutdown`.
    pub fn spawn_maintenance(self: Arc<Self>, shutdown: CancellationToken) {
        // The embedded broker runs this too: the same contract (its entries expire only
        // when this process stalls longer than the TTL, and come back with the next refresh).
        let refresh_every = self.ttl / 3;
        let prune_every = self.retry_every();
        let this = self.clone();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            // A failed refresh is tried again soon: once the trouble is over, this node's
            // entries must be fresh again well within the others' pruning pause.
            let mut wait = refresh_every;
            loop {
                let asked = std::time::Instant::now();
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
                if asked.elapsed() > wait + refresh_every {
                    this.disturbed("this node was stalled");
                }
                wait = match this.refresh().await {
                    Ok(_) => refresh_every,
                    Err(e) => {
                        this.disturbed("a presence refresh failed");
                        tracing::debug!("presence refresh failed: {e}");
                        this.retry_every()
                    }
                };
            }
        });
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(prune_every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut last = std::time::Instant::now();
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => {}
                }
                if last.elapsed() > self.ttl / 3 {
                    self.disturbed("this node was stalled");
                }
                last = std::time::Instant::now();
                if !self.may_prune() {
                    continue;
                }
                let now = now_ms();
                let pruned = self.prune_all(now).await;
                if pruned.is_ok() {
                    self.metrics.presence_pruned(now);
                }
                match pruned {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(removed = n, "pruned expired presence entries"),
                    Err(e) => tracing::debug!("presence prune failed: {e}"),
                }
            }
        });
    }

    /// Removes every entry expired at `now`, batch after batch (a large dead node's entries
    /// go in one tick, up to `PRUNE_ROUNDS` batches), and returns how many.
    async fn prune_all(&self, now: u64) -> Result<u64, BrokerError> {
        let mut total = 0;
        for _ in 0..PRUNE_ROUNDS {
            let removed = self.broker.prune(now, &self.announce_header()).await?;
            total += removed;
            if removed == 0 {
                break;
            }
        }
        Ok(total)
    }

    /// How often pruning runs, and how soon a failed refresh is tried again.
    fn retry_every(&self) -> Duration {
        (self.ttl / 10).clamp(Duration::from_millis(50), Duration::from_secs(1))
    }

    /// How long pruning waits after a disturbance. Every live node refreshes within this once
    /// the trouble is over: it re-asserts its entries as soon as its pub/sub connection is back
    /// (reconnect backoff at most 500 ms) and retries a failed refresh every `retry_every`;
    /// twice that plus a second of margin, and never less than half the TTL. (A whole TTL, as
    /// before, left presence wrong for up to 1.7 TTL after a Redis restart.)
    fn prune_pause(&self) -> Duration {
        (self.ttl / 2).max(2 * self.retry_every() + Duration::from_secs(1))
    }

    /// Notes that this node could not keep its entries fresh (stalled, or the broker did not
    /// answer): other nodes may have been unable to refresh theirs as well, so this node prunes
    /// nobody until `prune_pause` has passed without trouble — time for every live node to
    /// refresh. Users of dead nodes are then pruned that much later, but nobody alive is.
    pub fn disturbed(&self, why: &str) {
        let mut since = self.disturbed_at.lock().expect("presence lock");
        if since.is_none_or(|t| t.elapsed() > Duration::from_millis(100)) {
            tracing::info!(pause = ?self.prune_pause(), "{why}: pruning paused");
        }
        *since = Some(std::time::Instant::now());
    }

    fn may_prune(&self) -> bool {
        self.disturbed_at
            .lock()
            .expect("presence lock")
            .is_none_or(|t| t.elapsed() >= self.prune_pause())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::memory::MemoryBroker;
    use crate::broker::{Inbound, Topic};
    use tokio::sync::mpsc;

    fn presence(ttl: Duration) -> (Presence, mpsc::UnboundedReceiver<Inbound>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let broker = Broker::Memory(Arc::new(MemoryBroker::for_tests(tx)));
        let metrics = Arc::new(Metrics::new("n1"));
        (Presence::new(broker, "n1".into(), ttl, metrics), rx)
    }

    fn entry(conn: u64, user: &str, room_name: &str) -> PresenceEntry {
        PresenceEntry {
            room_key: "r".into(),
            conn_key: format!("n1:0:{conn}"),
            user_id: user.into(),
            user_fragment: format!(r#""userId":"{user}","userName":"{user}""#),
            room_json: r#""r""#.into(),
            room_name: room_name.into(),
        }
    }

    /// The announcements published on the room's channel so far, as text.
    fn announcements(rx: &mut mpsc::UnboundedReceiver<Inbound>) -> Vec<String> {
        let mut out = Vec::new();
        while let Ok(Inbound::Message { payload, .. }) = rx.try_recv() {
            out.push(String::from_utf8_lossy(&payload).into_owned());
        }
        out
    }

    #[tokio::test]
    async fn a_user_with_two_connections_is_counted_and_announced_once() {
        let (presence, mut rx) = presence(Duration::from_secs(30));
        presence
            .broker
            .subscribe(&Topic::Room("r".into()))
            .await
            .expect("subscribe");
        let first = presence.join(1, entry(1, "u", "R")).await.unwrap();
        assert!(first.first && first.announced, "{first:?}");
        assert_eq!(first.num, 1);
        let second = presence.join(2, entry(2, "u", "R")).await.unwrap();
        assert!(!second.first && !second.announced, "{second:?}");
        assert_eq!(second.num, 1);
        let logins = announcements(&mut rx);
        assert_eq!(logins.len(), 1, "{logins:?}");
        assert!(logins[0].contains(r#""event":"login""#), "{}", logins[0]);

        let one_left = presence.leave(1, "r").await.unwrap();
        assert!(!one_left.last);
        assert_eq!(one_left.num, 1);
        assert!(
            announcements(&mut rx).is_empty(),
            "a tab closing is no logout"
        );
        let gone = presence.leave(2, "r").await.unwrap();
        assert!(gone.last);
        assert_eq!(gone.num, 0);
        let logouts = announcements(&mut rx);
        assert_eq!(logouts.len(), 1, "{logouts:?}");
        assert!(logouts[0].contains(r#""event":"logout""#), "{}", logouts[0]);
    }

    #[tokio::test]
    async fn the_first_joiner_names_the_room_and_a_later_one_cannot_rename_it() {
        let (presence, _rx) = presence(Duration::from_secs(30));
        let first = presence.join(1, entry(1, "a", "Lobby")).await.unwrap();
        assert_eq!(first.room_name, "Lobby");
        let second = presence.join(2, entry(2, "b", "Hijacked")).await.unwrap();
        assert_eq!(second.room_name, "Lobby");
        assert_eq!(second.num, 2);
    }

    #[tokio::test]
    async fn leaving_a_room_never_joined_changes_nothing() {
        let (presence, mut rx) = presence(Duration::from_secs(30));
        presence
            .broker
            .subscribe(&Topic::Room("r".into()))
            .await
            .expect("subscribe");
        let outcome = presence.leave(7, "r").await.unwrap();
        assert!(!outcome.last);
        assert!(announcements(&mut rx).is_empty());
    }

    #[test]
    fn a_disturbance_pauses_pruning_until_every_live_node_has_refreshed() {
        let ttl = Duration::from_millis(300);
        let (presence, _rx) = presence(ttl);
        assert!(presence.may_prune());
        presence.disturbed("test");
        let paused_at = std::time::Instant::now();
        // Pruning comes back once, and only once, the pause has passed: at least half a TTL,
        // and two refresh retries (50 ms each at this TTL) plus a second.
        let pause = presence.prune_pause();
        assert_eq!(pause, Duration::from_millis(1100));
        while !presence.may_prune() {
            assert!(paused_at.elapsed() < 3 * pause, "pruning never resumed");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(
            paused_at.elapsed() >= pause,
            "resumed after {:?}",
            paused_at.elapsed()
        );
    }
}
