//! Honest answers under broker faults (a first part of the fault suite of issue 16): a frozen
//! Redis makes nodes unready and sends answer `outcome_unknown` (retry with the same
//! clientMsgId is safe), a node restarted with a fixed id does not collide with its previous
//! life, and logins that failed during an outage leave no subscriptions.

use std::time::Duration;

use e2e::{is, wait_for, Client, Gateway, GatewayOpts, RedisServer, WAIT};
use serde_json::json;

const SIGSTOP: i32 = 19;
const SIGCONT: i32 = 18;

/// Thaws Redis when dropped, so a failing test never leaves it frozen.
struct Thaw<'a>(&'a RedisServer);

impl Drop for Thaw<'_> {
    fn drop(&mut self) {
        self.0.signal(SIGCONT);
    }
}

#[tokio::test]
async fn a_frozen_redis_makes_the_node_unready_and_sends_uncertain() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let gw = Gateway::start(GatewayOpts::redis(&redis.url())).await?;
    gw.wait_ready(200).await?;
    let mut a = Client::connect(&gw.ws_url()).await?;
    a.login("a", json!("frozen")).await?;
    // One message first, so Redis has the append script: a frozen Redis then holds a real
    // write, not a NOSCRIPT answer to come.
    a.send(json!({"roomId":"frozen","content":"warm"})).await?;
    a.recv_until(is("message")).await?;

    redis.signal(SIGSTOP);
    let thaw = Thaw(&redis);
    // The sockets stay open, yet /readyz must say the node cannot serve.
    gw.wait_ready(503).await?;
    a.send(json!({"roomId":"frozen","content":"maybe","clientMsgId":"m1"}))
        .await?;
    // Redis got the script but cannot answer: not "not sent", but "unknown".
    let err = a
        .recv_until_timeout(Duration::from_secs(15), is("error"))
        .await?;
    assert_eq!(err["code"], "outcome_unknown", "{err}");
    assert_eq!(err["clientMsgId"], "m1");
    drop(thaw);
    gw.wait_ready(200).await?;
    // It was stored after all: the retry with the same clientMsgId says so, no duplicate.
    let first = a
        .recv_until(|f| f["event"] == "message" && f["content"] == "maybe")
        .await?;
    a.send(json!({"roomId":"frozen","content":"maybe","clientMsgId":"m1"}))
        .await?;
    let sent = a.recv_until(is("sent")).await?;
    assert_eq!(sent["id"], first["id"]);
    assert_eq!(sent["duplicate"], true);
    let mut con = redis.connection().await?;
    let stored: u64 = redis::cmd("XLEN")
        .arg("gw:{r:frozen}:s")
        .query_async(&mut con)
        .await?;
    assert_eq!(stored, 2, "warm + maybe, once");
    Ok(())
}

#[tokio::test]
async fn a_node_restarted_with_its_old_id_does_not_collide_with_its_past() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let opts = GatewayOpts::redis(&redis.url())
        .node("fixed")
        .env("GATEWAY_PRESENCE_TTL_MS", 1500);
    let watcher_node = Gateway::start(
        GatewayOpts::redis(&redis.url())
            .node("watcher")
            .env("GATEWAY_PRESENCE_TTL_MS", 1500),
    )
    .await?;
    let mut watcher = Client::connect(&watcher_node.ws_url()).await?;
    watcher.login("w", json!("r")).await?;
    let mut first = Gateway::start(opts.clone()).await?;
    let mut old = Vec::new();
    for user in ["old1", "old2"] {
        let mut c = Client::connect(&first.ws_url()).await?;
        c.login(user, json!("r")).await?;
        old.push(c);
    }
    watcher
        .recv_until(|f| f["event"] == "login" && f["num"] == 3)
        .await?;
    first.proc.kill();
    // Same node id, new process: its first connections get the same connection numbers.
    let second = Gateway::start(opts).await?;
    let mut new = Vec::new();
    for user in ["new1", "new2"] {
        let mut c = Client::connect(&second.ws_url()).await?;
        c.login(user, json!("r")).await?;
        new.push(c);
    }
    // The dead users leave (once each); the new ones stay.
    let mut gone = Vec::new();
    while gone.len() < 2 {
        let logout = watcher
            .recv_until_timeout(Duration::from_secs(10), is("logout"))
            .await?;
        gone.push(logout["userId"].as_str().unwrap_or_default().to_string());
    }
    gone.sort();
    assert_eq!(gone, ["old1", "old2"]);
    watcher
        .expect_none(Duration::from_secs(3), is("logout"))
        .await?;
    watcher
        .send(json!({"roomId":"r","content":"count"}))
        .await?;
    let msg = watcher.recv_until(is("message")).await?;
    assert_eq!(msg["num"], 3, "watcher + new1 + new2");
    Ok(())
}

#[tokio::test]
async fn logins_failed_during_an_outage_leave_no_subscriptions() -> anyhow::Result<()> {
    let mut redis = RedisServer::start().await?;
    let gw = Gateway::start(GatewayOpts::redis(&redis.url())).await?;
    redis.kill();
    gw.wait_ready(503).await?;
    for i in 0..5 {
        let mut c = Client::connect(&gw.ws_url()).await?;
        c.send(json!({"event":"login","userId":format!("u{i}"),"roomId":format!("lost{i}")}))
            .await?;
        let err = c.recv_until(is("error")).await?;
        assert_eq!(err["code"], "unavailable", "{err}");
    }
    redis.restart().await?;
    gw.wait_ready(200).await?;
    // After the reconnect, the node subscribed nothing for the failed logins. (Commands may
    // still be reconnecting for a moment after /readyz turned 200: retry the probe's login.)
    let url = gw.ws_url();
    let _probe = wait_for("a login to succeed again", WAIT, || {
        let url = url.clone();
        async move {
            let mut probe = Client::connect(&url).await.ok()?;
            probe
                .send(json!({"event":"login","userId":"probe","roomId":"alive"}))
                .await
                .ok()?;
            let answer = probe
                .recv_until(|f| f["event"] == "login" || f["event"] == "error")
                .await
                .ok()?;
            (answer["event"] == "login").then_some(probe)
        }
    })
    .await?;
    let channels = wait_for("the probe's room to be subscribed", WAIT, || async {
        let channels = redis.pubsub_channels().await.ok()?;
        channels
            .iter()
            .any(|c| c.contains("alive"))
            .then_some(channels)
    })
    .await?;
    // Neither the rooms nor the user channels of the failed logins.
    let leaked: Vec<&String> = channels
        .iter()
        .filter(|c| c.contains("lost") || c.contains("{u:u"))
        .collect();
    assert!(leaked.is_empty(), "{leaked:?}");
    Ok(())
}

#[tokio::test]
async fn members_get_what_was_published_while_pubsub_reconnected() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let sender_node = Gateway::start(GatewayOpts::redis(&redis.url()).node("gap-a")).await?;
    let member_node = Gateway::start(GatewayOpts::redis(&redis.url()).node("gap-b")).await?;
    let mut member = Client::connect(&member_node.ws_url()).await?;
    member.login("m", json!("gap")).await?;
    let mut sender = Client::connect(&sender_node.ws_url()).await?;
    sender.login("s", json!("gap")).await?;

    // Cut every node's pub/sub connection again and again while the sender talks.
    let killer = kill_pubsub_connections(&redis);
    let mut stored = Vec::new();
    for i in 0..120 {
        let cmid = format!("g{i}");
        sender
            .send(json!({"roomId":"gap","content":format!("m{i}"),"clientMsgId":cmid}))
            .await?;
        // The sender's confirmation is its own copy (repaired too) or `sent` on a retry.
        let own = sender
            .recv_until(|f| f["clientMsgId"] == cmid.as_str() && f["id"].is_string())
            .await?;
        stored.push(own["id"].as_str().unwrap_or_default().to_string());
        tokio::time::sleep(Duration::from_millis(8)).await;
    }
    killer.await?;
    assert!(
        member_node
            .metric("gateway_pubsub_reconnects_total")
            .await?
            >= 1.0
    );
    // The member gets every stored message, in order, each once.
    let mut got = Vec::new();
    while got.len() < stored.len() {
        let msg = member
            .recv_until_timeout(Duration::from_secs(10), is("message"))
            .await
            .map_err(|e| e.context(format!("{} of {} received", got.len(), stored.len())))?;
        got.push(msg["id"].as_str().unwrap_or_default().to_string());
    }
    assert_eq!(got, stored);
    member
        .expect_none(Duration::from_millis(300), is("message"))
        .await?;
    Ok(())
}

#[tokio::test]
async fn members_are_told_to_resync_when_redis_lost_the_history() -> anyhow::Result<()> {
    let mut redis = RedisServer::start().await?;
    let gw = Gateway::start(GatewayOpts::redis(&redis.url())).await?;
    let mut member = Client::connect(&gw.ws_url()).await?;
    member.login("m", json!("lost")).await?;
    member
        .send(json!({"roomId":"lost","content":"before"}))
        .await?;
    let before = member.recv_until(is("message")).await?;
    // Redis comes back empty: the room's history is gone.
    redis.kill();
    redis.restart().await?;
    let resync = member
        .recv_until_timeout(Duration::from_secs(15), is("resync"))
        .await?;
    assert_eq!(resync["roomId"], "lost");
    assert_eq!(resync["lastId"], before["id"]);
    assert!(gw.metric("gateway_resyncs_total").await? >= 1.0);
    Ok(())
}

#[tokio::test]
async fn a_redis_stall_longer_than_the_ttl_logs_nobody_out() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let mut nodes = Vec::new();
    for i in 0..2 {
        nodes.push(
            Gateway::start(
                GatewayOpts::redis(&redis.url())
                    .node(&format!("st{i}"))
                    .env("GATEWAY_PRESENCE_TTL_MS", 1500),
            )
            .await?,
        );
    }
    let mut a = Client::connect(&nodes[0].ws_url()).await?;
    a.login("a", json!("stall")).await?;
    let mut b = Client::connect(&nodes[1].ws_url()).await?;
    b.login("b", json!("stall")).await?;
    a.recv_until(|f| f["event"] == "login" && f["num"] == 2)
        .await?;
    redis.signal(SIGSTOP);
    let thaw = Thaw(&redis);
    tokio::time::sleep(Duration::from_millis(3500)).await;
    drop(thaw);
    // Everyone's entry looks expired to Redis now, yet both users are connected.
    for client in [&mut a, &mut b] {
        client
            .expect_none(Duration::from_secs(4), is("logout"))
            .await?;
    }
    a.send(json!({"roomId":"stall","content":"still two"}))
        .await?;
    let msg = b
        .recv_until(|f| f["event"] == "message" && f["content"] == "still two")
        .await?;
    assert_eq!(msg["num"], 2);
    Ok(())
}

#[tokio::test]
async fn a_node_back_from_a_stall_announces_its_users_again() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let opts = |id: &str| {
        GatewayOpts::redis(&redis.url())
            .node(id)
            .env("GATEWAY_PRESENCE_TTL_MS", 1500)
    };
    let watcher_node = Gateway::start(opts("w")).await?;
    let sleeper = Gateway::start(opts("s")).await?;
    let mut watcher = Client::connect(&watcher_node.ws_url()).await?;
    watcher.login("w", json!("nap")).await?;
    let mut napper = Client::connect(&sleeper.ws_url()).await?;
    napper.login("n", json!("nap")).await?;
    watcher
        .recv_until(|f| f["event"] == "login" && f["num"] == 2)
        .await?;
    sleeper.proc.signal(SIGSTOP);
    // Indistinguishable from a dead node: its user is logged out once...
    let logout = watcher
        .recv_until_timeout(Duration::from_secs(10), is("logout"))
        .await;
    sleeper.proc.signal(SIGCONT);
    assert_eq!(logout?["userId"], "n");
    // ...and announced again when the node wakes up with the connection still open.
    let login = watcher
        .recv_until_timeout(Duration::from_secs(10), is("login"))
        .await?;
    assert_eq!(
        (login["userId"].as_str(), login["num"].as_u64()),
        (Some("n"), Some(2))
    );
    watcher
        .expect_none(Duration::from_secs(3), is("logout"))
        .await?;
    Ok(())
}

/// Not a timed test: prints how long pruning 40,000 expired entries of a dead node took, and
/// checks it finished.
#[tokio::test]
async fn a_large_dead_node_is_pruned_in_one_go() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let mut con = redis.connection().await?;
    // 40,000 entries of a node that died two seconds ago, in 40 rooms, listed in the presence
    // expiry index as that node listed them; written 5,000 per script so that no call
    // outlasts the client's response timeout on a busy machine.
    let keys = gateway::broker::keys::Keys::default();
    let expired_at = gateway::broker::now_ms() - 2_000;
    let bucket = expired_at / 1_000; // the index's bucket at the default 30-second TTL
    for chunk in 0..8 {
        let _: () = redis::cmd("EVAL")
            .arg(
                r#"for i = ARGV[1] + 1, ARGV[1] + 5000 do
                 local room = 'dead' .. (i % 40)
                 local conn = 'ghost:0:' .. i
                 local user = 'g' .. i
                 redis.call('HSET', 'gw:{r:' .. room .. '}:pc', conn,
                   string.len(user) .. ':' .. user .. '"userId":"' .. user .. '","userName":"x"')
                 redis.call('HINCRBY', 'gw:{r:' .. room .. '}:pu', user, 1)
                 redis.call('ZADD', 'gw:{r:' .. room .. '}:px', ARGV[2], conn)
               end"#,
            )
            .arg(0)
            .arg(chunk * 5000)
            .arg(expired_at)
            .query_async(&mut con)
            .await?;
    }
    let rooms: Vec<String> = (0..40).map(|i| format!("dead{i}")).collect();
    for room in &rooms {
        let partition = gateway::broker::keys::presence_partition(room);
        let _: () = redis::cmd("SADD")
            .arg(keys.presence_index(partition, bucket))
            .arg(room)
            .query_async(&mut con)
            .await?;
    }
    let started = std::time::Instant::now();
    let _gw = Gateway::start(GatewayOpts::redis(&redis.url())).await?;
    wait_for(
        "every expired entry to be pruned",
        Duration::from_secs(60),
        || {
            let (mut con, keys, rooms) = (con.clone(), keys.clone(), rooms.clone());
            async move {
                let mut left = 0;
                for room in &rooms {
                    let n: u64 = redis::cmd("ZCARD")
                        .arg(keys.room_expiry(room))
                        .query_async(&mut con)
                        .await
                        .ok()?;
                    left += n;
                }
                (left == 0).then_some(())
            }
        },
    )
    .await?;
    println!(
        "pruned 40,000 entries of a dead node in {:?} (from node start)",
        started.elapsed()
    );
    Ok(())
}

/// A client's chat message waits for a frozen Redis; its `heartBeat` ping is answered at once
/// all the same (a client that pings to check its connection must not think it dead), and the
/// message is answered once Redis is back.
#[tokio::test]
async fn a_ping_is_answered_while_a_message_waits_for_a_frozen_redis() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let gw = e2e::InProcessGateway::start(GatewayOpts::redis(&redis.url())).await?;
    let mut c = Client::connect(&gw.ws_url()).await?;
    c.login("pinger", json!("frozen")).await?;
    redis.signal(19);
    let thaw = scopeguard_thaw(&redis);
    c.send(json!({"roomId":"frozen","content":"waits","clientMsgId":"w1"}))
        .await?;
    c.send(json!({"event":"heartBeat","content":"ping"}))
        .await?;
    let first = c.recv_timeout(Duration::from_secs(2)).await?;
    assert_eq!(first["event"], "heartBeat", "{first}");
    assert_eq!(first["content"], "pong", "{first}");
    drop(thaw);
    let answer = c.recv_until(|f| f["clientMsgId"] == "w1").await?;
    assert_eq!(answer["event"], "message", "{answer}");
    Ok(())
}

/// Thaws Redis when dropped (also when the test fails), so it is never left frozen.
fn scopeguard_thaw(redis: &RedisServer) -> impl Drop + '_ {
    struct Thaw<'a>(&'a RedisServer);
    impl Drop for Thaw<'_> {
        fn drop(&mut self) {
            self.0.signal(18);
        }
    }
    Thaw(redis)
}

/// What a connection may have on its way into a frozen Redis is bounded in bytes: after
/// 128 KiB of messages the gateway stops reading its socket (so its ping waits too), and reads
/// on once Redis answers; every message is then stored.
#[tokio::test]
async fn a_connection_holds_only_so_many_bytes_of_messages_for_a_frozen_redis() -> anyhow::Result<()>
{
    let redis = RedisServer::start().await?;
    let gw = e2e::InProcessGateway::start(GatewayOpts::redis(&redis.url())).await?;
    let mut c = Client::connect(&gw.ws_url()).await?;
    c.login("big", json!("frozen")).await?;
    redis.signal(19);
    let thaw = scopeguard_thaw(&redis);
    let content = "x".repeat(60 * 1024);
    for i in 0..4 {
        c.send(json!({"roomId":"frozen","content":content,"clientMsgId":format!("b{i}")}))
            .await?;
    }
    c.send(json!({"event":"heartBeat","content":"ping"}))
        .await?;
    // 180 KiB are in flight after three: the fourth message and the ping are not read.
    let early = c.recv_timeout(Duration::from_secs(1)).await;
    assert!(early.is_err(), "answered while over the bound: {early:?}");
    drop(thaw);
    let pong = c.recv_until(|f| f["event"] == "heartBeat").await?;
    assert_eq!(pong["content"], "pong");
    let mut stored = std::collections::BTreeSet::new();
    while stored.len() < 4 {
        let frame = c.recv_until(is("message")).await?;
        stored.insert(
            frame["clientMsgId"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        );
    }
    Ok(())
}

/// The same for direct messages: a recipient connected to another node gets every DM stored
/// while that node's pub/sub connection was cut again and again (read back from its inbox),
/// in order, each once.
#[tokio::test]
async fn recipients_get_the_direct_messages_sent_while_pubsub_reconnected() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let sender_node = Gateway::start(
        GatewayOpts::redis(&redis.url())
            .node("dgap-a")
            .with_jwt()
            // 120 DMs as fast as they are confirmed: above the default 20/s.
            .env("GATEWAY_MAX_DMS_PER_SEC", 1000),
    )
    .await?;
    let member_node =
        Gateway::start(GatewayOpts::redis(&redis.url()).node("dgap-b").with_jwt()).await?;
    let mut bob = Client::connect(&member_node.ws_url()).await?;
    bob.login_proven("bob", json!("lobby")).await?;
    let mut alice = Client::connect(&sender_node.ws_url()).await?;
    alice.login_proven("alice", json!("lobby")).await?;

    let killer = kill_pubsub_connections(&redis);
    let mut stored = Vec::new();
    for i in 0..120 {
        let cmid = format!("d{i}");
        alice
            .send(json!({"event":"dm","toUserId":"bob","content":format!("dm{i}"),"clientMsgId":cmid}))
            .await?;
        let confirm = alice
            .recv_until(|f| f["event"] == "dmSent" && f["clientMsgId"] == cmid.as_str())
            .await?;
        stored.push(confirm["id"].as_str().unwrap_or_default().to_string());
        tokio::time::sleep(Duration::from_millis(8)).await;
    }
    killer.await?;
    assert!(
        member_node
            .metric("gateway_pubsub_reconnects_total")
            .await?
            >= 1.0
    );
    let mut got = Vec::new();
    while got.len() < stored.len() {
        let dm = bob
            .recv_until_timeout(Duration::from_secs(10), is("dm"))
            .await
            .map_err(|e| e.context(format!("{} of {} received", got.len(), stored.len())))?;
        got.push(dm["id"].as_str().unwrap_or_default().to_string());
    }
    assert_eq!(got, stored);
    bob.expect_none(Duration::from_millis(300), is("dm"))
        .await?;
    Ok(())
}

/// Kills every pub/sub connection of `redis` 6 times, 150 ms apart, in the background.
fn kill_pubsub_connections(redis: &RedisServer) -> tokio::task::JoinHandle<()> {
    let url = redis.url();
    tokio::spawn(async move {
        let client = redis::Client::open(url).expect("redis url");
        let mut con = client
            .get_multiplexed_async_connection()
            .await
            .expect("connect");
        for _ in 0..6 {
            tokio::time::sleep(Duration::from_millis(150)).await;
            let _: Result<i64, _> = redis::cmd("CLIENT")
                .arg("KILL")
                .arg("TYPE")
                .arg("pubsub")
                .query_async(&mut con)
                .await;
        }
    })
}
