//! Proven identity, tried as a hostile client would: forged, expired, wrongly signed, missing
//! and foreign tokens on the login frame and on the upgrade; token expiry and refresh; room
//! claims; anonymous mode without private data; Origin checks; client strings that must not
//! break Redis records or keys (one scenario against both backends); the tutorial page's own
//! echo; room names that later joiners cannot change.

use std::time::Duration;

use e2e::{
    http_get, http_get_with, is, mint_token, refused_upgrade, start_nodes, wait_for,
    workspace_root, Client, Gateway, GatewayOpts, RedisServer, WAIT,
};
use serde_json::{json, Value};

fn key_file(name: &str) -> String {
    workspace_root()
        .join("tests/keys")
        .join(name)
        .display()
        .to_string()
}

/// Sends a login and returns the first error or login frame answering it.
async fn login_answer(client: &mut Client, frame: Value) -> anyhow::Result<Value> {
    client.send(frame).await?;
    client
        .recv_until(|f| f["event"] == "error" || f["event"] == "login")
        .await
}

async fn assert_refused(client: &mut Client, frame: Value, code: &str, reason: &str) {
    let answer = login_answer(client, frame.clone()).await.unwrap();
    assert_eq!(
        (
            answer["event"].as_str(),
            answer["code"].as_str(),
            answer["reason"].as_str()
        ),
        (Some("error"), Some(code), Some(reason)),
        "{frame} → {answer}"
    );
}

#[tokio::test]
async fn bad_tokens_are_refused_on_the_login_frame_and_the_upgrade() -> anyhow::Result<()> {
    let gw = Gateway::start(GatewayOpts::default().with_jwt()).await?;
    let forged_none = {
        // `alg: none`, claiming alice without any signature.
        use std::fmt::Write;
        let b64 = |s: &str| {
            let mut out = String::new();
            let table = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
            for chunk in s.as_bytes().chunks(3) {
                let n = chunk
                    .iter()
                    .enumerate()
                    .fold(0u32, |acc, (i, b)| acc | (*b as u32) << (16 - 8 * i));
                for i in 0..=chunk.len() {
                    let _ = write!(out, "{}", table[(n >> (18 - 6 * i) & 63) as usize] as char);
                }
            }
            out
        };
        format!(
            "{}.{}.",
            b64(r#"{"alg":"none","typ":"JWT"}"#),
            b64(r#"{"sub":"alice","exp":99999999999}"#)
        )
    };
    let expired = mint_token("alice", &["--ttl", "-60"])?;
    let wrong_key = mint_token(
        "alice",
        &["--secret", "somebody-elses-secret-0123456789abcdef"],
    )?;
    let bob = mint_token("bob", &[])?;
    let cases: [(&str, Option<&str>, &str, &str); 5] = [
        ("forged", Some(&forged_none), "unauthorized", "malformed"),
        ("expired", Some(&expired), "unauthorized", "expired"),
        ("wrong key", Some(&wrong_key), "unauthorized", "signature"),
        ("missing", None, "unauthorized", "missing"),
        (
            "another user's",
            Some(&bob),
            "unauthorized",
            "user_mismatch",
        ),
    ];
    let mut client = Client::connect(&gw.ws_url()).await?;
    for (what, token, code, reason) in cases {
        let mut frame = json!({"event":"login","userId":"alice","roomId":1});
        if let Some(token) = token {
            frame["token"] = json!(token);
        }
        let answer = login_answer(&mut client, frame).await?;
        assert_eq!(
            (answer["code"].as_str(), answer["reason"].as_str()),
            (Some(code), Some(reason)),
            "{what} token on the login frame: {answer}"
        );
        // The same token on the upgrade: refused before upgrading.
        if let Some(token) = token.filter(|_| reason != "user_mismatch") {
            let url = format!("{}?token={token}", gw.ws_url());
            let refused = refused_upgrade(&url, &[]).await?;
            assert_eq!(refused.status, 401, "{what} token on the upgrade");
            let body: Value = serde_json::from_str(&refused.body)?;
            assert_eq!(body["reason"], reason, "{what}: {body}");
        }
    }
    // Nothing above logged anyone in, and each refusal was counted by reason.
    assert_eq!(
        gw.metric("gateway_auth_failures_total{reason=\"expired\"")
            .await?,
        2.0
    );
    // The right token works on the frame, in the query and in the Authorization header, and
    // the user is the token's subject.
    let alice = mint_token("alice", &["--name", "Alice"])?;
    let login = login_answer(
        &mut client,
        json!({"event":"login","roomId":1,"token":alice}),
    )
    .await?;
    assert_eq!(
        (login["userId"].as_str(), login["userName"].as_str()),
        (Some("alice"), Some("Alice"))
    );
    let mut by_query = Client::connect(&format!("{}?token={alice}", gw.ws_url())).await?;
    let login = login_answer(&mut by_query, json!({"event":"login","roomId":2})).await?;
    assert_eq!(login["userId"], "alice");
    let bearer = format!("Bearer {alice}");
    let mut by_header =
        e2e::connect_with_headers(&gw.ws_url(), &[("authorization", bearer.as_str())]).await?;
    assert_refused(
        &mut by_header,
        json!({"event":"login","userId":"mallory","roomId":3}),
        "unauthorized",
        "user_mismatch",
    )
    .await;
    // A login frame cannot switch the connection to another user's token either.
    assert_refused(
        &mut by_header,
        json!({"event":"login","roomId":3,"token":bob}),
        "unauthorized",
        "user_mismatch",
    )
    .await;
    Ok(())
}

#[tokio::test]
async fn rs256_and_es256_tokens_verify_with_a_public_key() -> anyhow::Result<()> {
    for (public, private) in [
        ("rs256-public.pem", "rs256-private.pem"),
        ("es256-public.pem", "es256-private.pem"),
    ] {
        let gw = Gateway::start(
            GatewayOpts::default().env("GATEWAY_JWT_PUBLIC_KEY_FILE", key_file(public)),
        )
        .await?;
        let token = mint_token("carol", &["--private-key-file", &key_file(private)])?;
        let mut client = Client::connect(&gw.ws_url()).await?;
        let login = login_answer(
            &mut client,
            json!({"event":"login","roomId":1,"token":token}),
        )
        .await?;
        assert_eq!(login["userId"], "carol", "{public}");
        // An HS256 token (signed with some secret) is not accepted by a public-key gateway.
        let hs = mint_token("carol", &[])?;
        assert_refused(
            &mut client,
            json!({"event":"login","roomId":2,"token":hs}),
            "unauthorized",
            "signature",
        )
        .await;
    }
    Ok(())
}

#[tokio::test]
async fn tokens_expire_with_4001_unless_refreshed() -> anyhow::Result<()> {
    let gw = Gateway::start(
        GatewayOpts::default()
            .with_jwt()
            .env("GATEWAY_JWT_LEEWAY_SECS", 0),
    )
    .await?;
    let short = mint_token("dave", &["--ttl", "2"])?;
    let mut lapsing = Client::connect(&gw.ws_url()).await?;
    login_answer(
        &mut lapsing,
        json!({"event":"login","roomId":1,"token":short}),
    )
    .await?;
    let mut renewing = Client::connect(&gw.ws_url()).await?;
    login_answer(
        &mut renewing,
        json!({"event":"login","roomId":1,"token":short}),
    )
    .await?;

    // A refresh for another user is refused and changes nothing.
    renewing
        .send(json!({"event":"refresh","token":mint_token("erin", &[])?}))
        .await?;
    let refused = renewing.recv_until(is("error")).await?;
    assert_eq!(
        (refused["code"].as_str(), refused["reason"].as_str()),
        (Some("unauthorized"), Some("user_mismatch"))
    );
    renewing
        .send(json!({"event":"refresh","token":mint_token("dave", &["--ttl", "60"])?}))
        .await?;
    let refreshed = renewing.recv_until(is("refreshed")).await?;
    assert!(refreshed["exp"].as_u64().unwrap() > 0);

    assert_eq!(lapsing.expect_close(Duration::from_secs(6)).await?, 4001);
    // Past the first token's expiry the renewed connection still works.
    renewing
        .send(json!({"event":"heartBeat","content":"ping"}))
        .await?;
    renewing.recv_until(is("heartBeat")).await?;
    assert_eq!(
        gw.metric("gateway_connections_closed_total{reason=\"token_expired\"")
            .await?,
        1.0
    );
    Ok(())
}

#[tokio::test]
async fn room_claims_limit_joins_and_the_room_api() -> anyhow::Result<()> {
    let gw = Gateway::start(GatewayOpts::default().with_jwt()).await?;
    let token = mint_token("frank", &["--rooms", "team-*,lobby"])?;
    let mut client = Client::connect(&gw.ws_url()).await?;
    for allowed in ["team-1", "lobby"] {
        let login = login_answer(
            &mut client,
            json!({"event":"login","roomId":allowed,"token":token}),
        )
        .await?;
        assert_eq!(login["event"], "login", "{allowed}");
    }
    for refused in ["team", "lobby2", "1"] {
        assert_refused(
            &mut client,
            json!({"event":"login","roomId":refused}),
            "forbidden",
            "room",
        )
        .await;
    }
    // The room API: a token is needed, and it shows only what the token may join.
    let (status, _) = http_get(&gw.addr(), "/api/rooms").await?;
    assert_eq!(status, 401);
    let bearer = format!("Authorization: Bearer {token}");
    let (status, body) = http_get_with(&gw.addr(), "/api/rooms", &[&bearer]).await?;
    assert_eq!(status, 200, "{body}");
    let rooms: Value = serde_json::from_str(&body)?;
    let mut ids: Vec<String> = rooms["rooms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["roomId"].to_string())
        .collect();
    ids.sort();
    assert_eq!(ids, [r#""lobby""#, r#""team-1""#]);
    let (status, body) = http_get_with(&gw.addr(), "/api/rooms/team-1/members", &[&bearer]).await?;
    assert_eq!(status, 200);
    assert!(body.contains("frank"), "{body}");
    let (status, _) = http_get_with(&gw.addr(), "/api/rooms/1/members", &[&bearer]).await?;
    assert_eq!(status, 403);
    let (status, _) = http_get(
        &gw.addr(),
        &format!("/api/rooms/team-1/members?token={token}"),
    )
    .await?;
    assert_eq!(status, 200);
    Ok(())
}

#[tokio::test]
async fn anonymous_mode_serves_no_private_data() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let nodes = start_nodes(&redis, "anon", 1, &[]).await?;
    let url = nodes[0].ws_url();
    let mut alice = Client::connect(&url).await?;
    alice
        .login_with(json!({"event":"login","userId":"alice","roomId":1,"ack":true}))
        .await?;
    // Somebody stored a DM for alice earlier (an authenticated deployment, say).
    let mut con = redis.connection().await?;
    let _: String = redis::cmd("XADD")
        .arg("gw:{u:alice}:in")
        .arg("*")
        .arg("f")
        .arg(r#"","fromUserId":"x","content":"secret"}"#)
        .query_async(&mut con)
        .await?;
    let mut mallory = Client::connect(&url).await?;
    mallory
        .login_with(json!({"event":"login","userId":"alice","roomId":2,"ack":true}))
        .await?;
    for frame in [
        json!({"event":"dm","toUserId":"alice","content":"hi"}),
        json!({"event":"sync","dm":true}),
        json!({"event":"ack","dm":true,"id":"1-0"}),
        json!({"event":"refresh","token":"x"}),
    ] {
        mallory.send(frame.clone()).await?;
        let err = mallory.recv_until(is("error")).await?;
        assert_eq!(
            (err["code"].as_str(), err["reason"].as_str()),
            (Some("forbidden"), Some("anonymous")),
            "{frame}"
        );
    }
    mallory
        .expect_none(Duration::from_millis(300), is("dm"))
        .await?;
    alice
        .expect_none(Duration::from_millis(100), is("dm"))
        .await?;
    // No stored positions either: nothing was written for "alice".
    let exists: i64 = redis::cmd("EXISTS")
        .arg("gw:{u:alice}:acks")
        .query_async(&mut con)
        .await?;
    assert_eq!(exists, 0);
    Ok(())
}

#[tokio::test]
async fn acks_cannot_move_a_position_past_what_was_sent() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let nodes = start_nodes(
        &redis,
        "pos",
        1,
        &[("GATEWAY_JWT_SECRET", e2e::TEST_JWT_SECRET)],
    )
    .await?;
    let url = nodes[0].ws_url();
    let token = mint_token("gina", &[])?;
    let mut sender = Client::connect(&url).await?;
    sender
        .login_with(
            json!({"event":"login","userId":"s","roomId":"p","token":mint_token("s", &[])?}),
        )
        .await?;
    let mut gina = Client::connect(&url).await?;
    gina.send(json!({"event":"login","roomId":"p","ack":true,"token":token}))
        .await?;
    gina.recv_until(|f| f["event"] == "synced" && f["roomId"] == "p")
        .await?;
    sender.send(json!({"roomId":"p","content":"one"})).await?;
    let one = gina.recv_until(is("message")).await?;
    // Hostile acks far past the newest message.
    for id in [
        "99999999999999-0",
        "18446744073709551615-18446744073709551615",
    ] {
        gina.send(json!({"event":"ack","roomId":"p","id":id}))
            .await?;
    }
    // Frames are handled in order: the pong means both acks were (else a late one could be
    // clamped to a message sent after this point).
    gina.send(json!({"event":"heartBeat","content":"ping"}))
        .await?;
    gina.recv_until(is("heartBeat")).await?;
    wait_for("the position to be stored", WAIT, || async {
        let mut con = redis.connection().await.ok()?;
        let stored: Option<String> = redis::cmd("HGET")
            .arg("gw:{u:gina}:acks")
            .arg("r:p")
            .query_async(&mut con)
            .await
            .ok()?;
        stored.filter(|s| s == one["id"].as_str().unwrap())
    })
    .await?;
    gina.close().await?;
    sender.send(json!({"roomId":"p","content":"two"})).await?;
    sender.recv_until(|f| f["content"] == "two").await?;
    // Even a position stored by an older version past every id cannot break a login.
    let mut back = Client::connect(&url).await?;
    back.send(json!({"event":"login","roomId":"p","ack":true,"token":token}))
        .await?;
    let two = back
        .recv_until(is("message"))
        .await
        .map_err(|e| e.context(format!("one = {}", one["id"])))?;
    assert_eq!(two["content"], "two", "the unread message is not skipped");
    let mut con = redis.connection().await?;
    let _: () = redis::cmd("HSET")
        .arg("gw:{u:gina}:acks")
        .arg("r:p")
        .arg("18446744073709551615-18446744073709551615")
        .query_async(&mut con)
        .await?;
    let mut again = Client::connect(&url).await?;
    again
        .send(json!({"event":"login","roomId":"p","ack":true,"token":token}))
        .await?;
    let synced = again.recv_until(is("synced")).await?;
    assert_eq!(synced["count"], 0, "{synced}");
    let _: () = redis::cmd("HSET")
        .arg("gw:{u:gina}:acks")
        .arg("r:p")
        .arg("not-an-id")
        .query_async(&mut con)
        .await?;
    let mut once_more = Client::connect(&url).await?;
    once_more
        .send(json!({"event":"login","roomId":"p","ack":true,"token":token}))
        .await?;
    let synced = once_more.recv_until(is("synced")).await?;
    assert_eq!(
        synced["count"], 0,
        "a garbled position counts as none: {synced}"
    );
    Ok(())
}

#[tokio::test]
async fn foreign_origins_get_403() -> anyhow::Result<()> {
    let gw = Gateway::start(GatewayOpts::default()).await?;
    let own = format!("http://{}", gw.addr());
    for origin in ["http://evil.example", "null", "http://127.0.0.1:1"] {
        let refused = refused_upgrade(&gw.ws_url(), &[("origin", origin)]).await?;
        assert_eq!(refused.status, 403, "{origin}");
    }
    Client::connect(&gw.ws_url()).await?; // no Origin: not a browser
    e2e::connect_with_headers(&gw.ws_url(), &[("origin", own.as_str())]).await?;
    assert_eq!(
        gw.metric("gateway_auth_failures_total{reason=\"origin\"")
            .await?,
        3.0
    );
    let listed = Gateway::start(
        GatewayOpts::default().env("GATEWAY_ALLOWED_ORIGINS", "https://chat.example"),
    )
    .await?;
    e2e::connect_with_headers(&listed.ws_url(), &[("origin", "https://chat.example")]).await?;
    let refused = refused_upgrade(&listed.ws_url(), &[("origin", own.as_str())]).await?;
    assert_eq!(refused.status, 403);
    Ok(())
}

/// `num` of a room in `/api/rooms` of the node at `addr`.
async fn room_num(addr: &str, room: &str) -> anyhow::Result<u64> {
    let (_, body) = http_get(addr, "/api/rooms").await?;
    let rooms: Value = serde_json::from_str(&body)?;
    Ok(rooms["rooms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["roomId"] == room)
        .map_or(0, |r| r["num"].as_u64().unwrap()))
}

#[tokio::test]
async fn client_strings_cannot_break_records_or_share_keys_on_either_backend() -> anyhow::Result<()>
{
    for (backend, _redis, gw) in e2e::both_backends(&[]).await? {
        let url = gw.ws_url();
        // Control characters are refused wherever a client names something.
        let mut probe = Client::connect(&url).await?;
        for frame in [
            json!({"event":"login","userId":"a\nb","roomId":"r"}),
            json!({"event":"login","userId":"a","userName":"x\u{7}","roomId":"r"}),
            json!({"event":"login","userId":"a","roomId":"r\nx"}),
            json!({"event":"login","userId":"a","roomId":"r","roomName":"n\u{85}"}),
            json!({"event":"login","userId":"guest-0123","roomId":"r"}),
        ] {
            probe.send(frame.clone()).await?;
            let err = probe.recv_until(is("error")).await?;
            assert_eq!(err["code"], "invalid_field", "{backend}: {frame}");
        }
        // Under the old key scheme these two made one Redis key (the first room's dedup key
        // was the second room's stream), and the second room answered `unavailable`.
        let mut u = Client::connect(&url).await?;
        u.login("u", json!("x")).await?;
        u.send(json!({"roomId":"x","content":"first","clientMsgId":"c}:s"}))
            .await?;
        assert_eq!(u.recv_until(is("message")).await?["content"], "first");
        let mut v = Client::connect(&url).await?;
        v.login("v", json!("x}:d:1:u:c")).await?;
        v.send(json!({"roomId":"x}:d:1:u:c","content":"second"}))
            .await?;
        let second = v
            .recv_until(|f| f["event"] == "message" || f["event"] == "error")
            .await?;
        assert_eq!(second["content"], "second", "{backend}: {second}");
        // A user id with separators and braces joins, counts once, and leaves no ghost.
        let odd = "w}:1:{x";
        let mut w = Client::connect(&url).await?;
        w.login(odd, json!("x")).await?;
        assert_eq!(room_num(&gw.addr(), "x").await?, 2, "{backend}");
        let logout_seen = u.recv_until(|f| f["event"] == "login" && f["userId"] == odd);
        logout_seen.await?;
        w.close().await?;
        let logout = u.recv_until(is("logout")).await?;
        assert_eq!(logout["userId"], odd, "{backend}");
        assert_eq!(logout["num"], 1, "{backend}");
        u.close().await?;
        v.close().await?;
        wait_for("every room to empty", WAIT, || async {
            let x = room_num(&gw.addr(), "x").await.ok()?;
            let other = room_num(&gw.addr(), "x}:d:1:u:c").await.ok()?;
            (x == 0 && other == 0).then_some(())
        })
        .await?;
    }
    Ok(())
}

#[tokio::test]
async fn a_dead_nodes_odd_room_and_user_names_are_pruned_once() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let mut nodes = start_nodes(&redis, "odd", 2, &[("GATEWAY_PRESENCE_TTL_MS", "1500")]).await?;
    let room = "房间 }:pc{r:1}";
    let mut watcher = Client::connect(&nodes[0].ws_url()).await?;
    watcher.login("watcher", json!(room)).await?;
    let mut doomed = Client::connect(&nodes[1].ws_url()).await?;
    doomed.login("user:with}{braces", json!(room)).await?;
    watcher
        .recv_until(|f| f["event"] == "login" && f["num"] == 2)
        .await?;
    nodes[1].proc.kill();
    let logout = watcher
        .recv_until_timeout(Duration::from_secs(10), is("logout"))
        .await?;
    assert_eq!(
        (logout["userId"].as_str(), logout["num"].as_u64()),
        (Some("user:with}{braces"), Some(1))
    );
    watcher
        .expect_none(Duration::from_millis(2000), is("logout"))
        .await?;
    assert_eq!(room_num(&nodes[0].addr(), room).await?, 1);
    nodes.truncate(1);
    Ok(())
}

#[tokio::test]
async fn the_tutorial_page_recognises_its_own_messages() -> anyhow::Result<()> {
    for (backend, _redis, gw) in e2e::both_backends(&[]).await? {
        let mut page = Client::connect(&format!("ws://{}", gw.addr())).await?;
        page.send(json!({"userName":"小明","roomId":1,"roomName":"大厅","event":"login"}))
            .await?;
        let login = page.recv_until(is("login")).await?;
        let guest = login["userId"].as_str().unwrap().to_string();
        let suffix = guest.strip_prefix("guest-").expect("a guest id");
        assert!(
            suffix.len() == 32 && suffix.bytes().all(|b| b.is_ascii_hexdigit()),
            "unguessable: 128 random bits, got {guest}"
        );
        let mut other = Client::connect(&gw.ws_url()).await?;
        other.login("other", json!(1)).await?;
        // The page's chat frame carries its own userId: a millisecond timestamp.
        page.send(json!({"userId":1732550000000u64,"userName":"小明","roomId":1,"roomName":"大厅","content":"我的消息"}))
            .await?;
        let own = page.recv_until(is("message")).await?;
        assert_eq!(own["userId"], 1732550000000u64, "{backend}: {own}");
        let seen = other.recv_until(is("message")).await?;
        assert_eq!(
            seen["userId"],
            guest.as_str(),
            "{backend}: others see the guest id"
        );
        // A second guest gets another id.
        let mut page2 = Client::connect(&gw.ws_url()).await?;
        page2
            .send(json!({"userName":"小明","roomId":1,"event":"login"}))
            .await?;
        let login2 = page2
            .recv_until(|f| f["event"] == "login" && f["userId"] != "other")
            .await?;
        assert_ne!(login2["userId"], guest.as_str());
    }
    Ok(())
}

#[tokio::test]
async fn later_joiners_cannot_rename_a_room() -> anyhow::Result<()> {
    for (backend, _redis, gw) in e2e::both_backends(&[]).await? {
        let mut first = Client::connect(&gw.ws_url()).await?;
        first
            .login_with(
                json!({"event":"login","userId":"a","roomId":"named","roomName":"Original"}),
            )
            .await?;
        let mut second = Client::connect(&gw.ws_url()).await?;
        let login = second
            .login_with(
                json!({"event":"login","userId":"b","roomId":"named","roomName":"Hijacked"}),
            )
            .await?;
        assert_eq!(login["roomName"], "Original", "{backend}");
        second
            .send(json!({"roomId":"named","content":"hi"}))
            .await?;
        let msg = first.recv_until(is("message")).await?;
        assert_eq!(msg["roomName"], "Original", "{backend}");
        let (_, body) = http_get(&gw.addr(), "/api/rooms").await?;
        assert!(
            body.contains("Original") && !body.contains("Hijacked"),
            "{backend}: {body}"
        );
        // Default rooms keep their configured names.
        let mut third = Client::connect(&gw.ws_url()).await?;
        let login = third
            .login_with(json!({"event":"login","userId":"c","roomId":2,"roomName":"Evil"}))
            .await?;
        assert_eq!(login["roomName"], "技术 Tech", "{backend}");
    }
    Ok(())
}
