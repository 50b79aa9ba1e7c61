//! The broker contract, one set of scenarios run against every backend with the same expected
//! results: presence (counts of users, one announcement per user, expiry and prune), message ids
//! and order, de-duplication, trimming and `truncated`, direct messages and inboxes, stored
//! positions, member paging, room listing, subscriptions.
//!
//! A scenario talks to `gateway::broker::Broker` only, never to a key: adding a backend means
//! adding it to `backends()` and passing this file.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Context, Result};
use bytes::Bytes;
use e2e::redis_cluster::{ClusterOpts, RedisCluster};
use e2e::RedisServer;
use gateway::broker::memory::MemoryBroker;
use gateway::broker::redis::RedisBroker;
use gateway::broker::{
    now_ms, Broker, BrokerError, Envelope, EnvelopeHeader, Inbound, Kind, Limits, Position, Post,
    PresenceEntry, Topic,
};
use gateway::protocol::{self, StreamId};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Messages a scenario waits for at most (a silent backend fails the scenario, not the run).
const PATIENCE: Duration = Duration::from_secs(5);
/// How long "nothing more arrives" is watched for.
const QUIET: Duration = Duration::from_millis(150);

/// One backend under test, as one gateway node sees it.
struct Under {
    name: &'static str,
    broker: Broker,
    inbound: mpsc::UnboundedReceiver<Inbound>,
    shutdown: CancellationToken,
    /// Kept alive for the scenario (stopped on drop).
    _redis: Option<RedisServer>,
    _cluster: Option<RedisCluster>,
}

impl Drop for Under {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn limits() -> Limits {
    Limits {
        history_max_len: 100,
        dedup_ttl_ms: 60_000,
        announce_max: 1000,
        history_ttl_ms: 60_000,
        announces_per_sec: 1000,
        presence_ttl_ms: 60_000,
        wait_replicas: 0,
        wait_timeout_ms: 500,
    }
}

/// Every backend, fresh: embedded, a single Redis and a Redis Cluster (3 masters; its
/// failover is tested elsewhere) of this test's own.
async fn backends() -> Result<Vec<Under>> {
    let (tx, rx) = mpsc::unbounded_channel();
    let embedded = Under {
        name: "embedded",
        broker: Broker::Memory(Arc::new(MemoryBroker::new(limits(), tx))),
        inbound: rx,
        shutdown: CancellationToken::new(),
        _redis: None,
        _cluster: None,
    };
    let redis = RedisServer::start().await?;
    let (tx, rx) = mpsc::unbounded_channel();
    let shutdown = CancellationToken::new();
    let metrics = Arc::new(gateway::metrics::Metrics::new("conformance"));
    let broker = RedisBroker::start(
        &redis.url(),
        limits(),
        metrics,
        tx,
        shutdown.clone(),
        Arc::new(|| {}),
    )?;
    let redis = Under {
        name: "redis",
        broker: Broker::Redis(broker),
        inbound: rx,
        shutdown,
        _redis: Some(redis),
        _cluster: None,
    };
    let cluster = RedisCluster::start(ClusterOpts {
        replicas_per_master: 0,
        ..ClusterOpts::default()
    })
    .await?;
    let (tx, rx) = mpsc::unbounded_channel();
    let shutdown = CancellationToken::new();
    let seeds: Vec<String> = cluster.urls().split(',').map(str::to_string).collect();
    let broker = RedisBroker::start_cluster(
        &seeds,
        limits(),
        Arc::new(gateway::metrics::Metrics::new("conformance")),
        tx,
        shutdown.clone(),
        Arc::new(|| {}),
    )?;
    let cluster = Under {
        name: "redis cluster",
        broker: Broker::Redis(broker),
        inbound: rx,
        shutdown,
        _redis: None,
        _cluster: Some(cluster),
    };
    Ok(vec![embedded, redis, cluster])
}

/// Runs each named scenario (a function of `scenarios`) on every backend.
macro_rules! on_every_backend {
    ($($name:ident),* $(,)?) => { $(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() -> Result<()> {
            for mut under in backends().await? {
                let name = under.name;
                tokio::time::timeout(Duration::from_secs(60), scenarios::$name(&mut under))
                    .await
                    .map_err(|_| anyhow!("timed out"))
                    .and_then(|r| r)
                    .with_context(|| format!("on the {name} backend"))?;
            }
            Ok(())
        }
    )* };
}

on_every_backend!(
    presence_counts_users_and_announces_each_once,
    the_first_joiner_names_the_room,
    expired_entries_are_pruned_once_and_refresh_restores_them,
    a_join_prunes_its_rooms_expired_entries_only_when_asked,
    ids_increase_and_messages_arrive_in_order,
    a_repeated_dedup_id_gets_the_original_id,
    history_is_trimmed_and_a_reader_behind_it_is_told,
    direct_messages_need_a_seen_recipient_and_a_full_inbox_refuses,
    positions_are_kept_per_user_and_topic,
    members_are_paged_and_rooms_listed_by_size,
    only_subscribed_topics_are_received,
);

fn header(kind: Kind) -> EnvelopeHeader {
    EnvelopeHeader {
        kind,
        published_us: 1,
        origin: "n1".into(),
        sender_conn: None,
        traceparent: String::new(),
    }
}

fn announce_header() -> String {
    header(Kind::Presence).without_id()
}

fn room(key: &str) -> Topic {
    Topic::Room(key.into())
}

fn entry(room: &str, conn: u64, user: &str, room_name: &str) -> PresenceEntry {
    PresenceEntry {
        room_key: room.into(),
        conn_key: format!("n1:0:{conn}"),
        user_id: user.into(),
        user_fragment: protocol::user_fragment(user, &user.to_uppercase()),
        room_json: protocol::json_string(room),
        room_name: room_name.into(),
    }
}

/// A chat message from `sender` into `room_key`, keeping `max_len`.
fn chat(room_key: &str, sender: &str, text: &str, dedup: Option<&str>, max_len: u64) -> Post {
    let room = protocol::RoomId::from_key(room_key);
    let template = protocol::message_template(
        &protocol::room_fragment(&room, room_key),
        &protocol::user_fragment(sender, sender),
        text,
        now_ms(),
        dedup,
    );
    Post::room_message(
        room_key,
        sender,
        dedup,
        &header(Kind::Message),
        template,
        max_len,
    )
}

fn dm(to: &str, from: &str, text: &str, max_len: u64, require_seen: bool) -> Post {
    let body = protocol::dm_rest(from, from, to, text, now_ms(), None);
    Post::direct_message(
        to,
        from,
        None,
        &header(Kind::Direct),
        body,
        max_len,
        require_seen,
    )
}

/// A message received on a subscribed topic.
struct Received {
    topic: Topic,
    envelope: Envelope,
}

impl Received {
    fn frame(&self) -> Result<Value> {
        Ok(serde_json::from_slice(&self.envelope.frame)?)
    }

    fn text(&self) -> &str {
        std::str::from_utf8(&self.envelope.frame).unwrap_or("<not UTF-8>")
    }
}

impl Under {
    async fn next(&mut self) -> Result<Received> {
        loop {
            let inbound = tokio::time::timeout(PATIENCE, self.inbound.recv())
                .await
                .map_err(|_| anyhow!("no message within {PATIENCE:?}"))?
                .ok_or_else(|| anyhow!("the broker closed its inbound queue"))?;
            match inbound {
                Inbound::Message { topic, payload } => {
                    let envelope = Envelope::parse(&Bytes::from(payload.to_vec()))
                        .ok_or_else(|| anyhow!("not an envelope: {payload:?}"))?;
                    return Ok(Received { topic, envelope });
                }
                Inbound::Resubscribed => continue,
            }
        }
    }

    /// Fails if anything arrives within `QUIET`.
    async fn nothing_more(&mut self) -> Result<()> {
        match tokio::time::timeout(QUIET, self.inbound.recv()).await {
            Err(_) => Ok(()),
            Ok(Some(Inbound::Message { topic, payload })) => {
                bail!("unexpected message on {topic}: {payload:?}")
            }
            Ok(other) => bail!("unexpected {other:?}"),
        }
    }
}

fn id_of(page_entry: &(StreamId, String)) -> StreamId {
    page_entry.0
}

mod scenarios {
    use super::*;

    pub async fn presence_counts_users_and_announces_each_once(u: &mut Under) -> Result<()> {
        let b = u.broker.clone();
        let h = announce_header();
        let expires = now_ms() + 60_000;
        b.subscribe(&room("r")).await?;
        let first = b
            .join(&entry("r", 1, "ann", "R"), &h, expires, true)
            .await?;
        ensure!(
            first.first && first.announced && first.num == 1,
            "{first:?}"
        );
        let login = u.next().await?;
        ensure!(login.topic == room("r"), "{}", login.topic);
        ensure!(login.envelope.kind == Kind::Presence);
        ensure!(
            login.text()
                == r#"{"event":"login","userId":"ann","userName":"ANN","roomId":"r","roomName":"R","num":1}"#,
            "{}",
            login.text()
        );
        // A second tab of the same user: counted once, not announced.
        let tab = b
            .join(&entry("r", 2, "ann", "R"), &h, expires, true)
            .await?;
        ensure!(!tab.first && !tab.announced && tab.num == 1, "{tab:?}");
        let bob = b
            .join(&entry("r", 3, "bob", "R"), &h, expires, true)
            .await?;
        ensure!(bob.first && bob.announced && bob.num == 2, "{bob:?}");
        ensure!(u.next().await?.frame()?["num"] == 2);
        ensure!(b.room_count("r").await? == 2);
        ensure!(b.room_count("elsewhere").await? == 0);
        u.nothing_more().await?;

        let closed_tab = b.leave(&entry("r", 1, "ann", "R"), &h).await?;
        ensure!(!closed_tab.last && closed_tab.num == 2, "{closed_tab:?}");
        u.nothing_more()
            .await
            .context("a closed tab is no logout")?;
        let gone = b.leave(&entry("r", 2, "ann", "R"), &h).await?;
        ensure!(gone.last && gone.num == 1, "{gone:?}");
        let logout = u.next().await?;
        ensure!(
            logout.text()
                == r#"{"event":"logout","userId":"ann","userName":"ANN","roomId":"r","roomName":"R","num":1}"#,
            "{}",
            logout.text()
        );
        let again = b.leave(&entry("r", 2, "ann", "R"), &h).await?;
        ensure!(!again.last && again.num == 1, "{again:?}");
        u.nothing_more().await
    }

    pub async fn the_first_joiner_names_the_room(u: &mut Under) -> Result<()> {
        let b = u.broker.clone();
        let h = announce_header();
        let expires = now_ms() + 60_000;
        let first = b
            .join(&entry("n", 1, "a", "Lobby"), &h, expires, true)
            .await?;
        ensure!(first.room_name == "Lobby");
        let later = b
            .join(&entry("n", 2, "b", "Hijacked"), &h, expires, true)
            .await?;
        ensure!(later.room_name == "Lobby", "renamed to {}", later.room_name);
        // Once everyone left, the next first joiner names it again.
        b.leave(&entry("n", 1, "a", "Lobby"), &h).await?;
        b.leave(&entry("n", 2, "b", "Lobby"), &h).await?;
        let next = b
            .join(&entry("n", 3, "c", "Fresh"), &h, expires, true)
            .await?;
        ensure!(next.room_name == "Fresh" && next.num == 1, "{next:?}");
        Ok(())
    }

    pub async fn expired_entries_are_pruned_once_and_refresh_restores_them(
        u: &mut Under,
    ) -> Result<()> {
        let b = u.broker.clone();
        let h = announce_header();
        let now = now_ms();
        b.subscribe(&room("p")).await?;
        // ann's node stops refreshing (it died); bob's keeps going.
        b.join(&entry("p", 1, "ann", "P"), &h, now + 100, true)
            .await?;
        b.join(&entry("p", 2, "bob", "P"), &h, now + 60_000, true)
            .await?;
        u.next().await?;
        u.next().await?;
        // (Prune times are in the future: a backend may look at expiries in buckets of up to
        // a second, and prunes a bucket once it has passed.)
        let removed = b.prune(now + 2_500, &h).await?;
        ensure!(removed == 1, "pruned {removed}");
        let logout = u.next().await?;
        ensure!(
            logout.text()
                == r#"{"event":"logout","userId":"ann","userName":"ANN","roomId":"p","roomName":"P","num":1}"#,
            "{}",
            logout.text()
        );
        ensure!(b.room_count("p").await? == 1);
        // Another node pruning later finds nothing: one logout per departed user.
        ensure!(b.prune(now + 3_500, &h).await? == 0);
        u.nothing_more().await?;
        // ann's node was only stalled: its refresh re-creates the entry and announces it.
        let restored = b
            .refresh(&[entry("p", 1, "ann", "P")], now + 60_000, &h)
            .await?;
        ensure!(restored == 1, "restored {restored}");
        let login = u.next().await?;
        ensure!(login.frame()?["event"] == "login" && login.frame()?["num"] == 2);
        // A refresh of a live entry re-creates nothing and announces nothing.
        let live = b
            .refresh(&[entry("p", 2, "bob", "P")], now + 60_000, &h)
            .await?;
        ensure!(live == 0);
        ensure!(b.room_count("p").await? == 2);
        u.nothing_more().await
    }

    pub async fn a_join_prunes_its_rooms_expired_entries_only_when_asked(
        u: &mut Under,
    ) -> Result<()> {
        let b = u.broker.clone();
        let h = announce_header();
        let now = now_ms();
        b.subscribe(&room("j")).await?;
        // ann's entry expired already (its node died, or could not refresh during an outage).
        b.join(&entry("j", 1, "ann", "J"), &h, now - 1, false)
            .await?;
        u.next().await?;
        // A node that pauses pruning leaves it in place...
        let bob = b
            .join(&entry("j", 2, "bob", "J"), &h, now + 60_000, false)
            .await?;
        ensure!(bob.num == 2, "{bob:?}");
        ensure!(u.next().await?.frame()?["userId"] == "bob");
        // ...one that does not removes it first, with ann's logout.
        let cat = b
            .join(&entry("j", 3, "cat", "J"), &h, now + 60_000, true)
            .await?;
        ensure!(cat.num == 2, "{cat:?}");
        let logout = u.next().await?;
        ensure!(logout.frame()?["event"] == "logout" && logout.frame()?["userId"] == "ann");
        let login = u.next().await?;
        ensure!(login.frame()?["userId"] == "cat" && login.frame()?["num"] == 2);
        u.nothing_more().await
    }

    pub async fn ids_increase_and_messages_arrive_in_order(u: &mut Under) -> Result<()> {
        let b = u.broker.clone();
        let h = announce_header();
        b.join(&entry("o", 1, "ann", "O"), &h, now_ms() + 60_000, true)
            .await?;
        b.subscribe(&room("o")).await?;
        ensure!(b.newest_id(&room("o")).await?.is_none());
        let mut ids = Vec::new();
        for i in 0..30 {
            let appended = b
                .append(&chat("o", "ann", &format!("m{i}"), None, 100))
                .await?;
            ensure!(appended.created);
            ids.push(appended.id);
        }
        let posts: Vec<Post> = (30..50)
            .map(|i| chat("o", "ann", &format!("m{i}"), None, 100))
            .collect();
        for result in b.append_all(&posts).await {
            ids.push(result?.id);
        }
        ensure!(ids.windows(2).all(|w| w[0] < w[1]), "ids not increasing");
        for (i, id) in ids.iter().enumerate() {
            let got = u.next().await?;
            ensure!(got.topic == room("o"));
            ensure!(got.envelope.kind == Kind::Message);
            ensure!(
                got.envelope.id == Some(*id),
                "message {i}: {:?}",
                got.envelope.id
            );
            let frame = got.frame()?;
            ensure!(frame["id"] == id.to_string() && frame["content"] == format!("m{i}"));
            ensure!(frame["num"] == 1, "the room's count: {frame}");
        }
        let page = b.range(&room("o"), StreamId::ZERO, 100).await?;
        ensure!(!page.truncated);
        ensure!(page.entries.iter().map(id_of).eq(ids.iter().copied()));
        let replayed: Value = serde_json::from_str(&page.entries[7].1)?;
        ensure!(replayed["id"] == ids[7].to_string() && replayed["content"] == "m7");
        let after = b.range(&room("o"), ids[44], 3).await?;
        ensure!(after
            .entries
            .iter()
            .map(id_of)
            .eq(ids[45..48].iter().copied()));
        ensure!(b.newest_id(&room("o")).await? == ids.last().copied());
        ensure!(b.newest_id(&room("never")).await?.is_none());
        ensure!(b
            .range(&room("never"), StreamId::ZERO, 10)
            .await?
            .entries
            .is_empty());
        ensure!(b
            .range(&room("o"), StreamId::MAX, 10)
            .await?
            .entries
            .is_empty());
        Ok(())
    }

    pub async fn a_repeated_dedup_id_gets_the_original_id(u: &mut Under) -> Result<()> {
        let b = u.broker.clone();
        b.subscribe(&room("d")).await?;
        let original = b.append(&chat("d", "ann", "hi", Some("c1"), 100)).await?;
        ensure!(original.created);
        let retry = b.append(&chat("d", "ann", "hi", Some("c1"), 100)).await?;
        ensure!(!retry.created && retry.id == original.id, "{retry:?}");
        // The same clientMsgId from someone else, or a hostile one, is another message.
        let other = b.append(&chat("d", "bob", "hi", Some("c1"), 100)).await?;
        ensure!(other.created && other.id > original.id);
        let odd = b
            .append(&chat("d", "ann}:d:x", "hi", Some("c1"), 100))
            .await?;
        ensure!(
            odd.created,
            "a sender name broke into another's dedup record"
        );
        for expected in [original.id, other.id, odd.id] {
            ensure!(u.next().await?.envelope.id == Some(expected));
        }
        u.nothing_more().await?;
        ensure!(b.range(&room("d"), StreamId::ZERO, 10).await?.entries.len() == 3);
        Ok(())
    }

    pub async fn history_is_trimmed_and_a_reader_behind_it_is_told(u: &mut Under) -> Result<()> {
        let b = u.broker.clone();
        let mut ids = Vec::new();
        for i in 0..40 {
            ids.push(
                b.append(&chat("t", "ann", &format!("m{i}"), None, 10))
                    .await?
                    .id,
            );
        }
        let page = b.range(&room("t"), StreamId::ZERO, 100).await?;
        ensure!(
            page.truncated,
            "a reader from the start missed trimmed messages"
        );
        let kept: Vec<StreamId> = page.entries.iter().map(id_of).collect();
        ensure!(
            kept.len() >= 10 && kept.ends_with(&ids[30..]),
            "kept {} messages, not the newest 10",
            kept.len()
        );
        // A reader at the oldest kept message missed nothing.
        let from_oldest = b.range(&room("t"), kept[0], 100).await?;
        ensure!(!from_oldest.truncated);
        ensure!(from_oldest.entries.len() == kept.len() - 1);
        Ok(())
    }

    pub async fn direct_messages_need_a_seen_recipient_and_a_full_inbox_refuses(
        u: &mut Under,
    ) -> Result<()> {
        let b = u.broker.clone();
        let inbox = Topic::User("carol".into());
        b.subscribe(&inbox).await?;
        match b.append(&dm("carol", "ann", "hello?", 3, true)).await {
            Err(BrokerError::UnknownRecipient) => {}
            other => bail!("a DM to a user never seen: {other:?}"),
        }
        b.mark_seen("carol", 60_000).await?;
        let mut ids = Vec::new();
        for i in 0..3 {
            let appended = b
                .append(&dm("carol", "ann", &format!("d{i}"), 3, true))
                .await?;
            ids.push(appended.id);
            let got = u.next().await?;
            ensure!(got.topic == inbox && got.envelope.kind == Kind::Direct);
            let frame = got.frame()?;
            ensure!(
                frame["event"] == "dm" && frame["content"] == format!("d{i}"),
                "{frame}"
            );
        }
        match b.append(&dm("carol", "ann", "one too many", 3, true)).await {
            Err(BrokerError::Full) => {}
            other => bail!("a DM to a full inbox: {other:?}"),
        }
        // The owner read and acknowledged two: room for new ones, and they are gone.
        b.trim_inboxes(&[("carol".to_string(), ids[1])]).await?;
        let left = b.range(&inbox, StreamId::ZERO, 10).await?;
        ensure!(
            left.entries.iter().map(id_of).eq([ids[2]]),
            "{:?}",
            left.entries
        );
        b.append(&dm("carol", "ann", "now it fits", 3, true))
            .await?;
        // The server API may write to users who never logged in.
        b.append(&dm("dave", "api", "welcome", 3, false)).await?;
        ensure!(b.newest_id(&Topic::User("dave".into())).await?.is_some());
        Ok(())
    }

    pub async fn positions_are_kept_per_user_and_topic(u: &mut Under) -> Result<()> {
        let b = u.broker.clone();
        let at = |ms| StreamId { ms, seq: 1 };
        ensure!(b.load_position("ann", &room("a")).await?.is_none());
        b.save_positions(&[
            Position {
                user: "ann".into(),
                topic: room("a"),
                id: at(5),
            },
            Position {
                user: "ann".into(),
                topic: Topic::User("ann".into()),
                id: at(7),
            },
            Position {
                user: "bob".into(),
                topic: room("a"),
                id: at(9),
            },
            // A room named like the inbox field must not overwrite it.
            Position {
                user: "ann".into(),
                topic: room("dm"),
                id: at(11),
            },
        ])
        .await?;
        ensure!(b.load_position("ann", &room("a")).await? == Some(at(5)));
        ensure!(b.load_position("ann", &Topic::User("ann".into())).await? == Some(at(7)));
        ensure!(b.load_position("bob", &room("a")).await? == Some(at(9)));
        ensure!(b.load_position("ann", &room("dm")).await? == Some(at(11)));
        ensure!(b.load_position("bob", &room("b")).await?.is_none());
        b.save_positions(&[Position {
            user: "ann".into(),
            topic: room("a"),
            id: at(6),
        }])
        .await?;
        ensure!(b.load_position("ann", &room("a")).await? == Some(at(6)));
        Ok(())
    }

    pub async fn members_are_paged_and_rooms_listed_by_size(u: &mut Under) -> Result<()> {
        let b = u.broker.clone();
        let h = announce_header();
        let expires = now_ms() + 60_000;
        let mut conn = 0;
        for (room_key, users) in [("big", 25), ("mid", 3), ("one", 1)] {
            for i in 0..users {
                for _tab in 0..2 {
                    conn += 1;
                    let user = format!("{room_key}-u{i:02}");
                    b.join(&entry(room_key, conn, &user, room_key), &h, expires, true)
                        .await?;
                }
            }
        }
        let mut listed = std::collections::BTreeSet::new();
        let mut cursor: Option<String> = None;
        for page_no in 0.. {
            ensure!(page_no < 30, "paging never ended");
            let page = b.members("big", cursor.as_deref(), 10).await?;
            ensure!(page.num == 25, "num {}", page.num);
            let mut on_page = std::collections::HashSet::new();
            for (user, fragment) in &page.members {
                ensure!(on_page.insert(user.clone()), "{user} twice on one page");
                let fields: Value = serde_json::from_str(&format!("{{{fragment}}}"))?;
                ensure!(fields["userId"] == user.as_str(), "{fragment}");
                listed.insert(user.clone());
            }
            match page.next_cursor {
                Some(next) => cursor = Some(next),
                None => break,
            }
        }
        let expected: std::collections::BTreeSet<String> =
            (0..25).map(|i| format!("big-u{i:02}")).collect();
        ensure!(listed == expected, "listed {listed:?}");
        for bad in ["", "\u{1}x"] {
            match b.members("big", Some(bad), 10).await {
                Err(BrokerError::BadCursor) => {}
                other => bail!("cursor {bad:?}: {other:?}"),
            }
        }
        let empty = b.members("nobody-here", None, 10).await?;
        ensure!(empty.num == 0 && empty.members.is_empty() && empty.next_cursor.is_none());

        let rooms = b.rooms(10).await?;
        let summary: Vec<(&str, u64)> =
            rooms.iter().map(|r| (r.room_key.as_str(), r.num)).collect();
        ensure!(
            summary == [("big", 25), ("mid", 3), ("one", 1)],
            "{summary:?}"
        );
        ensure!(rooms[1].room_fragment == r#""roomId":"mid","roomName":"mid""#);
        let top: Vec<String> = b.rooms(2).await?.into_iter().map(|r| r.room_key).collect();
        ensure!(top == ["big", "mid"], "{top:?}");
        Ok(())
    }

    pub async fn only_subscribed_topics_are_received(u: &mut Under) -> Result<()> {
        let b = u.broker.clone();
        let ann = Topic::User("ann".into());
        let payload = format!(
            "{}{}",
            header(Kind::Control).without_id(),
            "{\"event\":\"disconnect\"}"
        );
        b.publish(&ann, &payload).await?;
        u.nothing_more().await.context("not subscribed yet")?;
        b.subscribe(&ann).await?;
        b.publish(&ann, &payload).await?;
        let got = u.next().await?;
        ensure!(got.topic == ann && got.envelope.kind == Kind::Control);
        ensure!(got.text() == "{\"event\":\"disconnect\"}");
        // A user named like a room is still a user.
        b.publish(&room("ann"), &payload).await?;
        u.nothing_more().await?;
        b.unsubscribe(&ann).await?;
        b.publish(&ann, &payload).await?;
        u.nothing_more().await.context("unsubscribed")
    }
}
