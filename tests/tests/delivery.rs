//! At-least-once delivery on Redis streams: confirmed messages survive a node's death,
//! redelivery and its limit, offline sync with paging and truncation, idempotent retries,
//! direct messages.

use std::collections::{BTreeSet, HashSet};
use std::time::Duration;

use e2e::{is, mint_token, start_nodes, Client, RedisServer, TEST_JWT_SECRET, WAIT};
use serde_json::{json, Value};

/// Message ids compare as (ms, seq), never as strings.
fn id_key(id: &str) -> (u64, u64) {
    let (ms, seq) = id.split_once('-').expect("ms-seq id");
    (ms.parse().unwrap(), seq.parse().unwrap())
}

/// A receiver that acks, de-duplicates by id, and on losing its node resumes on another one
/// from the last id it saw.
struct Receiver {
    user: String,
    urls: Vec<String>,
    node: usize,
    client: Client,
    /// Ids in first-seen order.
    order: Vec<String>,
    seen: HashSet<String>,
    reconnects: usize,
}

impl Receiver {
    async fn join(
        user: &str,
        urls: Vec<String>,
        node: usize,
        room: &Value,
    ) -> anyhow::Result<Receiver> {
        let mut client = Client::connect(&urls[node]).await?;
        client
            .login_with(
                json!({"event":"login","userId":user,"userName":user,"roomId":room,"ack":true}),
            )
            .await?;
        Ok(Receiver {
            user: user.to_string(),
            urls,
            node,
            client,
            order: Vec::new(),
            seen: HashSet::new(),
            reconnects: 0,
        })
    }

    /// Reads until every id in `want` was seen (reconnecting as needed), or times out.
    async fn collect(
        &mut self,
        room: &Value,
        want: &BTreeSet<(u64, u64)>,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut since_ack = 0;
        loop {
            let have: BTreeSet<(u64, u64)> = self.seen.iter().map(|i| id_key(i)).collect();
            if want.is_subset(&have) {
                return Ok(());
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "{} is missing {} confirmed messages",
                self.user,
                want.difference(&have).count()
            );
            match self.client.recv_timeout(Duration::from_millis(500)).await {
                Ok(frame) if frame["event"] == "message" => {
                    let id = frame["id"].as_str().unwrap().to_string();
                    if self.seen.insert(id.clone()) {
                        self.order.push(id.clone());
                    }
                    since_ack += 1;
                    if since_ack >= 20 {
                        since_ack = 0;
                        let ack =
                            json!({"event":"ack","roomId":room,"id":self.order.last().unwrap()});
                        if self.client.send(ack).await.is_err() {
                            self.reconnect(room).await?;
                        }
                    }
                }
                Ok(frame) if frame["event"] == "synced" && frame["more"] == true => {
                    // A full replay page: fetch the next one (live messages wait for it).
                    let next = json!({"event":"sync","roomId":room,"since":frame["lastId"]});
                    if self.client.send(next).await.is_err() {
                        self.reconnect(room).await?;
                    }
                }
                Ok(_) => {}
                Err(_) if self.client.closed.is_none() && !self.order.is_empty() => {
                    // Quiet: ack what we have so nothing is redelivered needlessly.
                    let last = self.order.last().unwrap().clone();
                    let _ = self
                        .client
                        .send(json!({"event":"ack","roomId":room,"id":last}))
                        .await;
                }
                Err(_) => self.reconnect(room).await?,
            }
        }
    }

    async fn reconnect(&mut self, room: &Value) -> anyhow::Result<()> {
        self.reconnects += 1;
        let last_id = self
            .order
            .iter()
            .max_by_key(|i| id_key(i))
            .cloned()
            .unwrap_or_else(|| "0-0".into());
        for attempt in 0..self.urls.len() * 3 {
            self.node = (self.node + 1) % self.urls.len();
            let Ok(mut client) = Client::connect(&self.urls[self.node]).await else {
                tokio::time::sleep(Duration::from_millis(50 * attempt as u64)).await;
                continue;
            };
            client
                .send(
                    json!({"event":"login","userId":self.user,"userName":self.user,
                    "roomId":room,"ack":true,"lastId":last_id}),
                )
                .await?;
            self.client = client;
            return Ok(());
        }
        anyhow::bail!("{} could not reconnect", self.user)
    }
}

#[tokio::test]
async fn confirmed_messages_survive_a_node_killed_mid_stream() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    // The sender sends as fast as its window allows: the frame budget is not what this tests.
    let mut gws = start_nodes(
        &redis,
        "d",
        3,
        &[
            ("GATEWAY_ACK_TIMEOUT_MS", "1000"),
            ("GATEWAY_MAX_FRAMES_PER_SEC", "100000"),
        ],
    )
    .await?;
    let room = json!("reliable");
    let urls: Vec<String> = gws.iter().map(|g| g.ws_url()).collect();
    let mut receivers = Vec::new();
    for i in 0..6 {
        receivers.push(Receiver::join(&format!("r{i}"), urls.clone(), i % 3, &room).await?);
    }
    // The sender sits on node 1, which survives; node 0 dies halfway.
    let mut sender = Client::connect(&urls[1]).await?;
    sender.login("sender", room.clone()).await?;
    const TOTAL: usize = 2000;
    const WINDOW: usize = 64;
    let mut confirmed = BTreeSet::new();
    let mut confirmed_order = Vec::new();
    let mut sent = 0;
    let mut killed = false;
    while confirmed.len() < TOTAL {
        while sent < TOTAL && sent - confirmed.len() < WINDOW {
            sender
                .send(json!({"roomId":room,"content":format!("m{sent}"),"clientMsgId":format!("c{sent}")}))
                .await?;
            sent += 1;
        }
        let frame = sender
            .recv_until(|f| f["event"] == "message" && f["userId"] == "sender")
            .await?;
        let id = frame["id"].as_str().unwrap();
        confirmed.insert(id_key(id));
        confirmed_order.push(id_key(id));
        if !killed && confirmed.len() >= TOTAL / 2 {
            gws[0].proc.kill();
            killed = true;
        }
    }
    assert!(
        confirmed_order.windows(2).all(|w| w[0] < w[1]),
        "the sender's confirmations arrive in id order"
    );
    for r in receivers.iter_mut() {
        r.collect(&room, &confirmed, WAIT * 3).await?;
        let keys: Vec<(u64, u64)> = r.order.iter().map(|i| id_key(i)).collect();
        assert!(
            keys.windows(2).all(|w| w[0] < w[1]),
            "{}: first deliveries are in id order",
            r.user
        );
        let invented: Vec<_> = keys.iter().filter(|k| !confirmed.contains(k)).collect();
        assert!(
            invented.is_empty(),
            "{}: unconfirmed ids {invented:?}",
            r.user
        );
    }
    let moved = receivers.iter().filter(|r| r.reconnects > 0).count();
    assert!(
        moved >= 2,
        "the killed node's receivers reconnected ({moved})"
    );
    gws.remove(0);
    Ok(())
}

#[tokio::test]
async fn unacked_messages_are_redelivered_then_the_client_is_disconnected() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let gws = start_nodes(
        &redis,
        "d",
        1,
        &[
            ("GATEWAY_ACK_TIMEOUT_MS", "300"),
            ("GATEWAY_MAX_REDELIVERIES", "2"),
        ],
    )
    .await?;
    let url = gws[0].ws_url();
    let mut lazy = Client::connect(&url).await?;
    lazy.login_with(json!({"event":"login","userId":"lazy","roomId":1,"ack":true}))
        .await?;
    let mut diligent = Client::connect(&url).await?;
    diligent
        .login_with(json!({"event":"login","userId":"diligent","roomId":1,"ack":true}))
        .await?;
    let mut sender = Client::connect(&url).await?;
    sender.login("sender", json!(1)).await?;
    sender.send(json!({"roomId":1,"content":"hello"})).await?;
    let id = sender.recv_until(is("message")).await?["id"].clone();

    let first = diligent.recv_until(is("message")).await?;
    assert_eq!(first["id"], id);
    diligent
        .send(json!({"event":"ack","roomId":1,"id":id}))
        .await?;

    // The lazy client gets the message, then the same id twice more, then is closed.
    let mut copies = 0;
    let code = loop {
        match lazy.recv_timeout(WAIT).await {
            Ok(f) if f["event"] == "message" => {
                assert_eq!(f["id"], id);
                copies += 1;
            }
            Ok(_) => {}
            Err(_) => break lazy.closed,
        }
    };
    assert_eq!(copies, 3, "original plus two redeliveries");
    assert_eq!(code, Some(4009));
    diligent
        .expect_none(Duration::from_millis(700), is("message"))
        .await?;
    assert!(gws[0].metric("gateway_redeliveries_total").await? >= 2.0);
    Ok(())
}

#[tokio::test]
async fn offline_sync_on_another_node_pages_and_reports_truncation() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let gws = start_nodes(
        &redis,
        "d",
        2,
        &[
            ("GATEWAY_SYNC_MAX", "50"),
            ("GATEWAY_HISTORY_MAX_LEN", "100"),
            // Stored positions belong to proven users only.
            ("GATEWAY_JWT_SECRET", TEST_JWT_SECRET),
        ],
    )
    .await?;
    let off_token = mint_token("off", &[])?;
    let mut sender = Client::connect(&gws[0].ws_url()).await?;
    sender
        .login_with(json!({"event":"login","userId":"s","roomId":77,"token":mint_token("s", &[])?}))
        .await?;
    let mut reader = Client::connect(&gws[0].ws_url()).await?;
    reader
        .login_with(
            json!({"event":"login","userId":"off","roomId":77,"ack":true,"token":off_token}),
        )
        .await?;
    sender.send(json!({"roomId":77,"content":"before"})).await?;
    sender.recv_until(is("message")).await?;
    let before = reader.recv_until(is("message")).await?;
    reader
        .send(json!({"event":"ack","roomId":77,"id":before["id"]}))
        .await?;
    // The ack position is written within ~100 ms; a later login reads it from Redis.
    e2e::wait_for("the ack position to be stored", WAIT, || async {
        let mut con = redis.connection().await.ok()?;
        let stored: Option<String> = redis::cmd("HGET")
            .arg("gw:{u:off}:acks")
            .arg("r:77")
            .query_async(&mut con)
            .await
            .ok()?;
        (stored.as_deref() == before["id"].as_str()).then_some(())
    })
    .await?;
    reader.close().await?;

    // 70 messages while offline (the history keeps 100).
    let mut missed = Vec::new();
    for i in 0..70 {
        sender
            .send(json!({"roomId":77,"content":format!("while away {i}")}))
            .await?;
        missed.push(
            sender.recv_until(is("message")).await?["id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    // Back, on the other node, acks on, no lastId: resume from the stored position.
    let mut back = Client::connect(&gws[1].ws_url()).await?;
    back.send(json!({"event":"login","roomId":77,"ack":true,"token":off_token}))
        .await?;
    let mut got = Vec::new();
    let mut pages = 0;
    loop {
        let f = back
            .recv_until(|f| {
                f["event"] == "message" || (f["event"] == "synced" && f["roomId"] == 77)
            })
            .await?;
        if f["event"] == "message" {
            got.push(f["id"].as_str().unwrap().to_string());
            continue;
        }
        pages += 1;
        assert_eq!(f["truncated"], false);
        if f["more"] == true {
            back.send(json!({"event":"sync","roomId":77,"since":f["lastId"]}))
                .await?;
        } else {
            break;
        }
    }
    assert_eq!(got, missed, "every missed message once, in order");
    assert_eq!(pages, 2, "50 + 20");
    // A live message after the replay arrives normally.
    sender.send(json!({"roomId":77,"content":"live"})).await?;
    assert_eq!(back.recv_until(is("message")).await?["content"], "live");

    // Push the stream well past its cap: an old position is reported as truncated.
    for i in 0..250 {
        sender
            .send(json!({"roomId":77,"content":format!("flood {i}")}))
            .await?;
    }
    for _ in 0..250 {
        sender.recv_until(is("message")).await?;
    }
    let mut late = Client::connect(&gws[1].ws_url()).await?;
    late.send(
        json!({"event":"login","roomId":77,"lastId":missed[0],"token":mint_token("late", &[])?}),
    )
    .await?;
    let synced = late.recv_until(is("synced")).await?;
    assert_eq!(synced["truncated"], true);
    Ok(())
}

#[tokio::test]
async fn a_retried_client_msg_id_yields_one_message() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let gws = start_nodes(&redis, "d", 2, &[]).await?;
    let mut a = Client::connect(&gws[0].ws_url()).await?;
    a.login("a", json!("idem")).await?;
    let mut b = Client::connect(&gws[1].ws_url()).await?;
    b.login("b", json!("idem")).await?;
    a.send(json!({"roomId":"idem","content":"once","clientMsgId":"same"}))
        .await?;
    let original = a.recv_until(is("message")).await?;
    assert_eq!(original["clientMsgId"], "same");
    // The retry, as after a lost connection: on another connection of the same user.
    let mut a2 = Client::connect(&gws[1].ws_url()).await?;
    a2.login("a", json!("idem")).await?;
    a2.send(json!({"roomId":"idem","content":"once","clientMsgId":"same"}))
        .await?;
    let sent = a2.recv_until(is("sent")).await?;
    assert_eq!(sent["id"], original["id"]);
    assert_eq!(sent["duplicate"], true);
    b.recv_until(is("message")).await?;
    b.expect_none(Duration::from_millis(400), is("message"))
        .await?;
    assert_eq!(gws[1].metric("gateway_dedup_hits_total").await?, 1.0);
    Ok(())
}

#[tokio::test]
async fn direct_messages_reach_online_users_on_other_nodes_and_offline_users_later(
) -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    // Direct messages need proven identities.
    let gws = start_nodes(&redis, "d", 2, &[("GATEWAY_JWT_SECRET", TEST_JWT_SECRET)]).await?;
    let bob_token = mint_token("bob", &["--name", "Bob"])?;
    let mut alice = Client::connect(&gws[0].ws_url()).await?;
    alice
        .login_with(json!({"event":"login","userId":"alice","roomId":"dm","token":mint_token("alice", &[])?}))
        .await?;
    let mut bob = Client::connect(&gws[1].ws_url()).await?;
    bob.login_with(
        json!({"event":"login","userId":"bob","roomId":"dm","ack":true,"token":bob_token}),
    )
    .await?;
    alice
        .send(json!({"event":"dm","toUserId":"bob","content":"psst","clientMsgId":"d1"}))
        .await?;
    let confirm = alice.recv_until(is("dmSent")).await?;
    assert_eq!(confirm["clientMsgId"], "d1");
    assert_eq!(confirm["duplicate"], false);
    let dm = bob.recv_until(is("dm")).await?;
    assert_eq!(dm["id"], confirm["id"]);
    assert_eq!(dm["fromUserId"], "alice");
    assert_eq!(dm["content"], "psst");
    bob.send(json!({"event":"ack","dm":true,"id":dm["id"]}))
        .await?;
    // Wait for the position to be stored before bob leaves.
    e2e::wait_for("bob's inbox ack to be stored", WAIT, || async {
        let mut con = redis.connection().await.ok()?;
        let stored: Option<String> = redis::cmd("HGET")
            .arg("gw:{u:bob}:acks")
            .arg("dm")
            .query_async(&mut con)
            .await
            .ok()?;
        (stored.as_deref() == dm["id"].as_str()).then_some(())
    })
    .await?;
    bob.close().await?;

    // Bob is offline: two more direct messages wait in his inbox.
    for text in ["are you there?", "call me"] {
        alice
            .send(json!({"event":"dm","toUserId":"bob","content":text}))
            .await?;
        alice.recv_until(is("dmSent")).await?;
    }
    let mut bob = Client::connect(&gws[0].ws_url()).await?;
    bob.send(json!({"event":"login","roomId":"dm","ack":true,"token":bob_token}))
        .await?;
    let first = bob.recv_until(is("dm")).await?;
    let second = bob.recv_until(is("dm")).await?;
    assert_eq!(
        (first["content"].as_str(), second["content"].as_str()),
        (Some("are you there?"), Some("call me")),
        "only the unacknowledged ones, in order"
    );
    let synced = bob
        .recv_until(|f| f["event"] == "synced" && f["dm"] == true)
        .await?;
    assert_eq!(synced["count"], 2);
    bob.expect_none(Duration::from_millis(300), is("dm"))
        .await?;
    Ok(())
}

#[tokio::test]
async fn an_ack_login_without_a_position_gets_its_starting_point() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let gws = start_nodes(&redis, "d", 1, &[]).await?;
    let mut first = Client::connect(&gws[0].ws_url()).await?;
    first
        .send(json!({"event":"login","userId":"first","roomId":"sp","ack":true}))
        .await?;
    let synced = first
        .recv_until(|f| f["event"] == "synced" && f["roomId"] == "sp")
        .await?;
    assert_eq!(
        (synced["lastId"].as_str(), synced["count"].as_u64()),
        (Some("0-0"), Some(0))
    );
    first.send(json!({"roomId":"sp","content":"one"})).await?;
    let one = first.recv_until(is("message")).await?;
    let mut second = Client::connect(&gws[0].ws_url()).await?;
    second
        .send(json!({"event":"login","userId":"second","roomId":"sp","ack":true}))
        .await?;
    let synced = second
        .recv_until(|f| f["event"] == "synced" && f["roomId"] == "sp")
        .await?;
    assert_eq!(
        synced["lastId"], one["id"],
        "starts after the newest message"
    );
    assert_eq!(synced["count"], 0);
    Ok(())
}

/// One connection's chat messages, sent without waiting, are stored and delivered in the
/// order sent on every backend (they reach the broker in batches: `Broker::append_all`).
#[tokio::test]
async fn a_connections_messages_keep_their_order_on_every_backend() -> anyhow::Result<()> {
    for (backend, _redis, gw) in
        e2e::both_backends(&[("GATEWAY_MAX_FRAMES_PER_SEC", "100000")]).await?
    {
        let mut sender = Client::connect(&gw.ws_url()).await?;
        sender.login("sender", json!("order")).await?;
        let mut reader = Client::connect(&gw.ws_url()).await?;
        reader.login("reader", json!("order")).await?;
        let count = 300;
        for i in 0..count {
            sender
                .send(json!({"roomId":"order","content":i.to_string()}))
                .await?;
        }
        for i in 0..count {
            let msg = reader.recv_until(is("message")).await?;
            assert_eq!(msg["content"], i.to_string(), "{backend}: message {i}");
        }
    }
    Ok(())
}

/// A stored position that cannot be read (here: Redis answers the read with an error) fails
/// the login as `unavailable`; it is never taken for "no position", which would start the
/// user after messages it has not read.
#[tokio::test]
async fn an_unreadable_stored_position_fails_the_login_instead_of_skipping_messages(
) -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let gw = e2e::InProcessGateway::start(e2e::GatewayOpts::redis(&redis.url()).with_jwt()).await?;
    let mut con = redis.connection().await?;
    // The user's positions are a hash; a string in its place makes every read of it fail.
    let _: () = redis::cmd("SET")
        .arg("gw:{u:carol}:acks")
        .arg("not a hash")
        .query_async(&mut con)
        .await?;
    let mut carol = Client::connect(&gw.ws_url()).await?;
    carol
        .send(
            json!({"event":"login","userId":"carol","roomId":"pos","ack":true,
                     "token":e2e::harness_token("carol")?}),
        )
        .await?;
    let refused = carol
        .recv_until(|f| f["event"] == "error" || f["event"] == "synced")
        .await?;
    assert_eq!(refused["event"], "error", "{refused}");
    assert_eq!(refused["code"], "unavailable", "{refused}");
    // With the position readable again, the same login resumes.
    let _: () = redis::cmd("DEL")
        .arg("gw:{u:carol}:acks")
        .query_async(&mut con)
        .await?;
    carol
        .send(
            json!({"event":"login","userId":"carol","roomId":"pos","ack":true,
                     "token":e2e::harness_token("carol")?}),
        )
        .await?;
    carol
        .recv_until(|f| f["event"] == "synced" && f["roomId"] == "pos")
        .await?;
    Ok(())
}

/// A connection's chat messages are pipelined into Redis; after Redis lost its script cache
/// (restarted empty, `SCRIPT FLUSH`) the first ones meet a NOSCRIPT. Each message is then
/// either stored — and everyone gets the stored ones in the order they were sent — or
/// answered `unavailable` (not stored); never stored out of order, neither by a retry nor by
/// the runtime polling later appends first (it failed so, now and then, while other tests ran
/// beside it, when each message was its own future).
#[tokio::test]
async fn pipelined_messages_keep_their_order_when_redis_lost_its_scripts() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let gw = e2e::InProcessGateway::start(
        e2e::GatewayOpts::redis(&redis.url()).env("GATEWAY_MAX_FRAMES_PER_SEC", 100_000),
    )
    .await?;
    let mut sender = Client::connect(&gw.ws_url()).await?;
    sender.login("sender", json!("order")).await?;
    let mut reader = Client::connect(&gw.ws_url()).await?;
    reader.login("reader", json!("order")).await?;
    let con = redis.connection().await?;
    let mut refused_in_all = 0;
    for round in 0..10 {
        // The cache is flushed now and again while the messages stream in.
        let flusher = {
            let mut con = con.clone();
            tokio::spawn(async move {
                for _ in 0..20 {
                    let _: Result<(), _> = redis::cmd("SCRIPT")
                        .arg("FLUSH")
                        .query_async(&mut con)
                        .await;
                    tokio::time::sleep(Duration::from_micros(500)).await;
                }
            })
        };
        let count = 500;
        for i in 0..count {
            sender
                .send(json!({"roomId":"order","content":format!("{round}:{i}"),
                             "clientMsgId":format!("{round}-{i}")}))
                .await?;
        }
        flusher.await?;
        // Every message is answered: stored (its copy comes back) or refused.
        let mut answered = BTreeSet::new();
        let mut refused = 0;
        while answered.len() < count {
            let frame = sender.recv().await?;
            let Some(cmid) = frame["clientMsgId"].as_str() else {
                continue;
            };
            match frame["event"].as_str() {
                Some("message") => {}
                Some("error") => {
                    assert_eq!(frame["code"], "unavailable", "{frame}");
                    refused += 1;
                }
                _ => continue,
            }
            answered.insert(cmid.to_string());
        }
        refused_in_all += refused;
        // The reader gets the stored ones in the order they were sent.
        let stored = count - refused;
        let mut last = None;
        for _ in 0..stored {
            let msg = reader.recv_until(is("message")).await?;
            let content = msg["content"].as_str().expect("content");
            let (r, i) = content.split_once(':').expect("round:index");
            assert_eq!(r, round.to_string());
            let i: u32 = i.parse()?;
            assert!(
                last.is_none_or(|l| l < i),
                "round {round}: message {i} after {last:?} ({refused} refused)"
            );
            last = Some(i);
        }
    }
    // Some did meet an empty cache (else this test proved nothing).
    assert!(refused_in_all > 0, "no message met a flushed script cache");
    Ok(())
}

/// A connection's reading and writing do not wait on each other: while Redis answers its own
/// message slowly, what others say in its room reaches it at once. Node A reaches Redis through
/// a proxy that delays every byte by 500 ms (each way); its member M re-sends a message Redis
/// already holds, which is answered with `sent` only when Redis has answered (≥ 1 s). Meanwhile
/// P on node B (no delay) speaks: its message reaches A's pub/sub after 500 ms, and M must get
/// it before its own `sent`.
#[tokio::test]
async fn deliveries_reach_a_member_while_redis_is_slow_with_its_own_message() -> anyhow::Result<()>
{
    let redis = RedisServer::start().await?;
    let redis_addr: std::net::SocketAddr = format!("127.0.0.1:{}", redis.port).parse()?;
    let proxy = e2e::faultproxy::FaultProxy::start("127.0.0.1".parse()?, redis_addr, 1).await?;
    let slow_node = e2e::InProcessGateway::start(e2e::GatewayOpts::redis(&format!(
        "redis://{}/",
        proxy.listen
    )))
    .await?;
    let fast_node = e2e::InProcessGateway::start(e2e::GatewayOpts::redis(&redis.url())).await?;
    let mut m = Client::connect(&slow_node.ws_url()).await?;
    m.login("m", json!("busy")).await?;
    let mut p = Client::connect(&fast_node.ws_url()).await?;
    p.login("p", json!("busy")).await?;
    m.send(json!({"roomId":"busy","content":"first","clientMsgId":"m-1"}))
        .await?;
    m.recv_until(|f| f["event"] == "message" && f["clientMsgId"] == "m-1")
        .await?;
    p.recv_until(|f| f["event"] == "message" && f["clientMsgId"] == "m-1")
        .await?;

    proxy.set_delay(Duration::from_millis(500));
    // The same clientMsgId again: Redis answers "already stored", and M gets `sent`.
    m.send(json!({"roomId":"busy","content":"first","clientMsgId":"m-1"}))
        .await?;
    p.send(json!({"roomId":"busy","content":"meanwhile","clientMsgId":"p-1"}))
        .await?;
    let mut got_meanwhile = false;
    loop {
        let frame = m.recv().await?;
        if frame["event"] == "message" && frame["clientMsgId"] == "p-1" {
            got_meanwhile = true;
        }
        if frame["event"] == "sent" {
            assert_eq!(frame["clientMsgId"], "m-1", "{frame}");
            break;
        }
        assert_ne!(frame["event"], "error", "{frame}");
    }
    assert!(
        got_meanwhile,
        "P's message reached M only after Redis answered M's own message"
    );
    proxy.heal();
    Ok(())
}
