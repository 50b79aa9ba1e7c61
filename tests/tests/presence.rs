//! Presence across nodes: distinct-user counts, two tabs of one user, a SIGKILLed node's users
//! dropping out with exactly one logout each, heartbeats, Redis flushed, and the HTTP API.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use e2e::{http_get, is, start_nodes, wait_for, Client, Gateway, GatewayOpts, RedisServer, WAIT};
use serde_json::{json, Value};

const TTL_MS: u64 = 1500;

/// `n` nodes with the short presence TTL of these tests.
async fn presence_nodes(redis: &RedisServer, n: usize) -> anyhow::Result<Vec<Gateway>> {
    start_nodes(
        redis,
        "p",
        n,
        &[("GATEWAY_PRESENCE_TTL_MS", &TTL_MS.to_string())],
    )
    .await
}

async fn members_api(gw: &Gateway, room: &str) -> anyhow::Result<Value> {
    let (status, body) = http_get(&gw.addr(), &format!("/api/rooms/{room}/members")).await?;
    anyhow::ensure!(status == 200, "status {status}: {body}");
    Ok(serde_json::from_str(&body)?)
}

#[tokio::test]
async fn counts_are_right_after_every_join_and_leave_across_three_nodes() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let gws = presence_nodes(&redis, 3).await?;
    let mut watcher = Client::connect(&gws[0].ws_url()).await?;
    assert_eq!(watcher.login("watcher", json!("c")).await?["num"], 1);
    let mut clients = Vec::new();
    for i in 0..6 {
        let mut c = Client::connect(&gws[i % 3].ws_url()).await?;
        assert_eq!(
            c.login(&format!("m{i}"), json!("c")).await?["num"],
            i as u64 + 2
        );
        let seen = watcher.recv_until(is("login")).await?;
        assert_eq!(seen["num"], i as u64 + 2);
        clients.push(c);
    }
    for (left, c) in clients.into_iter().enumerate() {
        c.close().await?;
        let seen = watcher.recv_until(is("logout")).await?;
        assert_eq!(seen["num"], 6 - left as u64);
    }
    Ok(())
}

#[tokio::test]
async fn one_user_on_two_nodes_counts_once() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let gws = presence_nodes(&redis, 2).await?;
    let mut watcher = Client::connect(&gws[0].ws_url()).await?;
    watcher.login("watcher", json!(3)).await?;

    let mut tab1 = Client::connect(&gws[0].ws_url()).await?;
    assert_eq!(tab1.login("dup", json!(3)).await?["num"], 2);
    let mut tab2 = Client::connect(&gws[1].ws_url()).await?;
    let own = tab2.login("dup", json!(3)).await?;
    assert_eq!(
        own["num"], 2,
        "the second tab gets its own login, count unchanged"
    );

    assert_eq!(watcher.recv_until(is("login")).await?["userId"], "dup");
    watcher
        .expect_none(Duration::from_millis(300), is("login"))
        .await?;
    tab1.expect_none(Duration::from_millis(100), is("login"))
        .await?;
    let api = members_api(&gws[1], "3").await?;
    assert_eq!(api["num"], 2);

    tab1.close().await?;
    watcher
        .expect_none(Duration::from_millis(300), is("logout"))
        .await?;
    tab2.close().await?;
    let logout = watcher.recv_until(is("logout")).await?;
    assert_eq!(
        (logout["userId"].as_str(), logout["num"].as_u64()),
        (Some("dup"), Some(1))
    );
    Ok(())
}

#[tokio::test]
async fn a_killed_nodes_users_leave_with_exactly_one_logout_each() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let mut gws = presence_nodes(&redis, 3).await?;
    // Watchers on the two surviving nodes; victims on node 0.
    let mut watchers = Vec::new();
    for (i, gw) in gws.iter().enumerate().skip(1) {
        let mut w = Client::connect(&gw.ws_url()).await?;
        w.login(&format!("w{i}"), json!("k")).await?;
        watchers.push(w);
    }
    let mut victims = Vec::new();
    for v in 0..4 {
        let mut c = Client::connect(&gws[0].ws_url()).await?;
        c.login(&format!("v{v}"), json!("k")).await?;
        victims.push(c);
    }
    for w in watchers.iter_mut() {
        w.recv_until(|f| f["event"] == "login" && f["userId"] == "v3")
            .await?;
    }
    gws[0].proc.kill();
    let killed_at = Instant::now();

    for w in watchers.iter_mut() {
        let mut logouts: HashMap<String, u64> = HashMap::new();
        while logouts.len() < 4 {
            let f = w
                .recv_until_timeout(Duration::from_millis(TTL_MS * 4), is("logout"))
                .await?;
            *logouts
                .entry(f["userId"].as_str().unwrap().to_string())
                .or_default() += 1;
        }
        assert!(logouts.keys().all(|u| u.starts_with('v')), "{logouts:?}");
    }
    let converged = killed_at.elapsed();
    assert!(
        converged < Duration::from_millis(TTL_MS * 2),
        "took {converged:?} with a TTL of {TTL_MS} ms"
    );
    // No second announcement of any of them, from any node.
    for w in watchers.iter_mut() {
        w.expect_none(Duration::from_millis(TTL_MS), is("logout"))
            .await?;
    }
    assert_eq!(members_api(&gws[1], "k").await?["num"], 2);
    gws.remove(0);
    Ok(())
}

#[tokio::test]
async fn heartbeats_keep_a_quiet_user_present_and_silence_reaps() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let opts = |i: usize| {
        GatewayOpts::redis(&redis.url())
            .node(&format!("h{i}"))
            .env("GATEWAY_PRESENCE_TTL_MS", 400)
            .env("GATEWAY_HEARTBEAT_TIMEOUT_MS", 1200)
    };
    let a = Gateway::start(opts(0)).await?;
    let b = Gateway::start(opts(1)).await?;
    let mut quiet = Client::connect(&a.ws_url()).await?;
    quiet.login("quiet-but-alive", json!("h")).await?;
    let mut silent = Client::connect(&a.ws_url()).await?;
    silent.login("silent", json!("h")).await?;

    // Over several TTLs the quiet user only pings; the node keeps its entry alive.
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(2000) {
        quiet
            .send(json!({"event":"heartBeat","content":"ping"}))
            .await?;
        quiet.recv_until(is("heartBeat")).await?;
        tokio::time::sleep(Duration::from_millis(300)).await; // the client's ping interval
    }
    assert_eq!(silent.expect_close(WAIT).await?, 4000);
    let mut observer = Client::connect(&b.ws_url()).await?;
    let login = observer.login("observer", json!("h")).await?;
    assert_eq!(
        login["num"], 2,
        "quiet user still present after 5 TTLs; silent one gone"
    );
    let api = members_api(&b, "h").await?;
    let ids: Vec<&str> = api["members"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["userId"].as_str())
        .collect();
    assert!(
        ids.contains(&"quiet-but-alive") && !ids.contains(&"silent"),
        "{ids:?}"
    );
    Ok(())
}

#[tokio::test]
async fn counts_come_back_after_redis_is_flushed_without_reconnects() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let gws = presence_nodes(&redis, 2).await?;
    let mut a = Client::connect(&gws[0].ws_url()).await?;
    a.login("a", json!("f")).await?;
    let mut b = Client::connect(&gws[1].ws_url()).await?;
    b.login("b", json!("f")).await?;
    let mut con = redis.connection().await?;
    redis::cmd("FLUSHALL").query_async::<()>(&mut con).await?;
    assert_eq!(members_api(&gws[0], "f").await?["num"], 0);
    wait_for("counts to be re-asserted", WAIT, || async {
        let api = members_api(&gws[0], "f").await.ok()?;
        (api["num"] == 2).then_some(())
    })
    .await?;
    a.send(json!({"roomId":"f","content":"still connected"}))
        .await?;
    let msg = b.recv_until(is("message")).await?;
    assert_eq!(msg["num"], 2);
    Ok(())
}

#[tokio::test]
async fn http_endpoints_agree_with_the_frames() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let gws = presence_nodes(&redis, 2).await?;
    let mut clients = Vec::new();
    let mut last_num = 0;
    for i in 0..5 {
        let mut c = Client::connect(&gws[i % 2].ws_url()).await?;
        let login = c
            .login_with(json!({"event":"login","userId":format!("h{i}"),
                "userName":format!("名字{i}"),"roomId":42,"roomName":"答案"}))
            .await?;
        last_num = login["num"].as_u64().unwrap();
        clients.push(c);
    }
    let (status, body) = http_get(&gws[1].addr(), "/api/rooms").await?;
    assert_eq!(status, 200);
    let rooms: Value = serde_json::from_str(&body)?;
    let room = rooms["rooms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["roomId"] == 42)
        .expect("room 42 listed")
        .clone();
    assert_eq!(room["num"], last_num);
    assert_eq!(room["roomName"], "答案");
    // Default rooms are listed even when empty.
    assert!(rooms["rooms"]
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["roomId"] == 1));

    // Paginate the members two at a time.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..10 {
        let path = match &cursor {
            Some(c) => format!("/api/rooms/42/members?limit=2&cursor={c}"),
            None => "/api/rooms/42/members?limit=2".to_string(),
        };
        let (_, body) = http_get(&gws[0].addr(), &path).await?;
        let page: Value = serde_json::from_str(&body)?;
        assert_eq!(page["num"], last_num);
        for m in page["members"].as_array().unwrap() {
            seen.push((
                m["userId"].as_str().unwrap().to_string(),
                m["userName"].as_str().unwrap().to_string(),
            ));
        }
        match page["nextCursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 5, "{seen:?}");
    assert!(seen.contains(&("h3".to_string(), "名字3".to_string())));
    let (status, _) = http_get(
        &gws[0].addr(),
        &format!("/api/rooms/{}/members", "x".repeat(200)),
    )
    .await?;
    assert_eq!(status, 400);
    // A cursor this API never gave is a bad request, not a broker failure.
    let (status, _) = http_get(&gws[0].addr(), "/api/rooms/42/members?cursor=garbage").await?;
    assert_eq!(status, 400);
    Ok(())
}

#[tokio::test]
async fn big_rooms_skip_login_and_logout_broadcasts() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let opts = |i: usize| {
        GatewayOpts::redis(&redis.url())
            .node(&format!("b{i}"))
            .env("GATEWAY_ANNOUNCE_MAX_ROOM_SIZE", 2)
    };
    let (n0, n1) = (
        Gateway::start(opts(0)).await?,
        Gateway::start(opts(1)).await?,
    );
    let mut a = Client::connect(&n0.ws_url()).await?;
    a.login("a", json!("big")).await?;
    let mut b = Client::connect(&n1.ws_url()).await?;
    b.login("b", json!("big")).await?;
    assert_eq!(
        a.recv_until(is("login")).await?["num"],
        2,
        "small room: announced"
    );
    let mut c = Client::connect(&n1.ws_url()).await?;
    assert_eq!(
        c.login("c", json!("big")).await?["num"],
        3,
        "the joiner still gets its count"
    );
    c.close().await?;
    a.expect_none(Duration::from_millis(400), |f| {
        f["event"] == "login" || f["event"] == "logout"
    })
    .await?;
    // Messages still carry the count.
    b.send(json!({"roomId":"big","content":"count?"})).await?;
    assert_eq!(a.recv_until(is("message")).await?["num"], 2);
    b.close().await?;
    assert_eq!(
        a.recv_until(is("logout")).await?["num"],
        1,
        "small again: announced"
    );
    Ok(())
}

#[tokio::test]
async fn room_list_works_on_an_empty_redis() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let gw = Gateway::start(GatewayOpts::redis(&redis.url())).await?;
    let (status, body) = http_get(&gw.addr(), "/api/rooms").await?;
    assert_eq!(status, 200, "{body}");
    let rooms: Value = serde_json::from_str(&body)?;
    let listed = rooms["rooms"].as_array().unwrap();
    assert_eq!(listed.len(), 3, "the default rooms, empty: {listed:?}");
    assert!(listed.iter().all(|r| r["num"] == 0));
    Ok(())
}
