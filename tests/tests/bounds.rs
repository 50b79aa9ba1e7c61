//! Bounded under attack: each attack a hostile client tried gets its typed refusal or close,
//! while other users keep working. Limits are set low here so the tests are quick; their
//! defaults (and what they protect, measured) are in docs/security.md and docs/bench-floods.md.

use std::time::{Duration, Instant};

use e2e::{
    is, mint_token, wait_for, Client, Gateway, GatewayOpts, InProcessGateway, RedisServer, WAIT,
};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

fn limited(kind: &'static str) -> impl Fn(&Value) -> bool {
    move |f: &Value| f["event"] == "error" && f["code"] == "rate_limited" && f["reason"] == kind
}

/// A member who keeps chatting in its own room must still get its messages.
async fn bystander_still_chats(url: &str, room: &str) -> anyhow::Result<()> {
    let mut other = Client::connect(url).await?;
    other.login(&format!("by-{room}"), json!(room)).await?;
    other
        .send(json!({"roomId":room,"content":"still here"}))
        .await?;
    let msg = other.recv_until(is("message")).await?;
    assert_eq!(msg["content"], "still here");
    Ok(())
}

#[tokio::test]
async fn a_frame_flood_is_refused_then_closed_with_4029() -> anyhow::Result<()> {
    let gw = InProcessGateway::start(
        GatewayOpts::default()
            .env("GATEWAY_MAX_FRAMES_PER_SEC", 100)
            .env("GATEWAY_FRAME_BURST", 100),
    )
    .await?;
    let mut flooder = Client::connect(&gw.ws_url()).await?;
    flooder.login("flooder", json!("f")).await?;
    let mut sent = 0;
    let started = Instant::now();
    // Keep flooding (as a hostile client would) until the gateway closes the connection.
    let code = loop {
        for i in 0..200 {
            if flooder
                .send(json!({"roomId":"f","content":format!("spam {i}")}))
                .await
                .is_err()
            {
                break;
            }
            sent += 1;
        }
        if let Ok(code) = flooder.expect_close(Duration::from_millis(5)).await {
            break code;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "never closed");
    };
    assert!(sent > 100, "sent {sent}");
    assert_eq!(code, 4029);
    // It was told first.
    flooder
        .recv_until(|f| f["event"] == "error" && f["code"] == "rate_limited")
        .await?;
    assert!(
        gw.metric("gateway_rate_limited_total{kind=\"frames\"")
            .await?
            > 0.0
    );
    bystander_still_chats(&gw.ws_url(), "calm").await
}

#[tokio::test]
async fn websocket_ping_floods_are_closed_too() -> anyhow::Result<()> {
    let gw = InProcessGateway::start(
        GatewayOpts::default()
            .env("GATEWAY_MAX_FRAMES_PER_SEC", 100)
            .env("GATEWAY_FRAME_BURST", 100),
    )
    .await?;
    let mut pinger = Client::connect(&gw.ws_url()).await?;
    let mut code = None;
    for _ in 0..50 {
        for _ in 0..100 {
            if pinger
                .send_message(Message::Ping(vec![1].into()))
                .await
                .is_err()
            {
                break;
            }
        }
        if let Ok(c) = pinger.expect_close(Duration::from_millis(20)).await {
            code = Some(c);
            break;
        }
    }
    assert_eq!(code, Some(4029), "a ping flood is closed");
    Ok(())
}

#[tokio::test]
async fn syncs_joins_and_dms_have_budgets_of_their_own() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let gw = InProcessGateway::start(
        GatewayOpts::redis(&redis.url())
            .with_jwt()
            .env("GATEWAY_MAX_SYNCS_PER_SEC", 2)
            .env("GATEWAY_MAX_JOINS_PER_SEC", 2)
            .env("GATEWAY_MAX_DMS_PER_SEC", 2),
    )
    .await?;
    let url = gw.ws_url();
    let mut target = Client::connect(&url).await?;
    target
        .login_with(
            json!({"event":"login","userId":"t","roomId":"b","token":mint_token("t", &[])?}),
        )
        .await?;
    let mut c = Client::connect(&url).await?;
    c.login_with(json!({"event":"login","userId":"c","roomId":"b","token":mint_token("c", &[])?}))
        .await?;
    // Bursts are 4x the rate: 8 pass at once, then refusals.
    for _ in 0..12 {
        c.send(json!({"event":"sync","roomId":"b"})).await?;
    }
    c.recv_until(limited("sync")).await?;
    for i in 0..12 {
        c.send(json!({"event":"dm","toUserId":"t","content":format!("dm {i}")}))
            .await?;
    }
    c.recv_until(limited("dm")).await?;
    for _ in 0..6 {
        c.send(json!({"event":"logout","roomId":"b"})).await?;
        c.send(json!({"event":"login","roomId":"b"})).await?;
    }
    c.recv_until(limited("join")).await?;
    // Refused requests cost the connection nothing else: it is still open and answers.
    c.send(json!({"event":"heartBeat","content":"ping"}))
        .await?;
    c.recv_until(is("heartBeat")).await?;
    Ok(())
}

#[tokio::test]
async fn full_inboxes_refuse_spam_and_unknown_users_get_no_inbox() -> anyhow::Result<()> {
    let env = [
        ("GATEWAY_JWT_SECRET", e2e::TEST_JWT_SECRET),
        ("GATEWAY_INBOX_MAX_LEN", "5"),
    ];
    for (backend, redis, gw) in e2e::both_backends(&env).await? {
        let url = gw.ws_url();
        let victim_token = mint_token("victim", &[])?;
        let mut victim = Client::connect(&url).await?;
        victim
            .login_with(
                json!({"event":"login","userId":"victim","roomId":"v","ack":true,
                               "token":victim_token}),
            )
            .await?;
        victim.close().await?;
        let mut friend = Client::connect(&url).await?;
        friend
            .login_with(json!({"event":"login","userId":"friend","roomId":"v",
                               "token":mint_token("friend", &[])?}))
            .await?;
        friend
            .send(json!({"event":"dm","toUserId":"victim","content":"the real one","clientMsgId":"r1"}))
            .await?;
        let confirmed = friend.recv_until(is("dmSent")).await?;
        let mut spammer = Client::connect(&url).await?;
        spammer
            .login_with(json!({"event":"login","userId":"spam","roomId":"s",
                               "token":mint_token("spam", &[])?}))
            .await?;
        let mut sent = 0;
        let full = loop {
            spammer
                .send(json!({"event":"dm","toUserId":"victim","content":"buy now"}))
                .await?;
            let answer = spammer
                .recv_until(|f| f["event"] == "dmSent" || f["event"] == "error")
                .await?;
            if answer["event"] == "error" {
                break answer;
            }
            sent += 1;
        };
        assert_eq!(full["code"], "inbox_full", "{backend}: {full}");
        assert_eq!(sent, 4, "{backend}: the inbox keeps 5");
        // The confirmed DM is still there when the victim comes back.
        let mut back = Client::connect(&url).await?;
        back.send(json!({"event":"login","roomId":"v","ack":true,"token":victim_token}))
            .await?;
        let first = back.recv_until(is("dm")).await?;
        assert_eq!(first["id"], confirmed["id"], "{backend}");
        assert_eq!(first["content"], "the real one");
        // Reading and acknowledging makes room again (acks are written within ~100 ms).
        let synced = back
            .recv_until(|f| f["event"] == "synced" && f["dm"] == true)
            .await?;
        back.send(json!({"event":"ack","dm":true,"id":synced["lastId"]}))
            .await?;
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            friend
                .send(json!({"event":"dm","toUserId":"victim","content":"again"}))
                .await?;
            let answer = friend
                .recv_until(|f| f["event"] == "dmSent" || f["event"] == "error")
                .await?;
            if answer["event"] == "dmSent" {
                break;
            }
            assert_eq!(answer["code"], "inbox_full", "{backend}: {answer}");
            assert!(
                std::time::Instant::now() < deadline,
                "{backend}: never room again"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Nobody named "ghost-…" ever logged in: no inbox is created for them.
        for i in 0..20 {
            spammer
                .send(json!({"event":"dm","toUserId":format!("ghost-{i}"),"content":"hi"}))
                .await?;
            let err = spammer.recv_until(is("error")).await?;
            assert_eq!(err["code"], "unknown_user", "{backend}: {err}");
        }
        if let Some(redis) = redis {
            let mut con = redis.connection().await?;
            let ghosts: Vec<String> = redis::cmd("KEYS")
                .arg("gw:{u:ghost*")
                .query_async(&mut con)
                .await?;
            assert!(ghosts.is_empty(), "{ghosts:?}");
        }
    }
    Ok(())
}

#[tokio::test]
async fn idle_rooms_and_inboxes_expire() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let ttl = [("GATEWAY_HISTORY_TTL_MS", "1500")];
    for gw in [
        InProcessGateway::start(GatewayOpts::default().env(ttl[0].0, ttl[0].1)).await?,
        InProcessGateway::start(GatewayOpts::redis(&redis.url()).env(ttl[0].0, ttl[0].1)).await?,
    ] {
        let mut c = Client::connect(&gw.ws_url()).await?;
        c.login("writer", json!("old")).await?;
        c.send(json!({"roomId":"old","content":"soon gone"}))
            .await?;
        c.recv_until(is("message")).await?;
        tokio::time::sleep(Duration::from_millis(1800)).await;
        c.send(json!({"event":"sync","roomId":"old","since":"0"}))
            .await?;
        let synced = c.recv_until(is("synced")).await?;
        assert_eq!(
            synced["count"], 0,
            "the idle room's history expired: {synced}"
        );
    }
    // History keys are gone from Redis (presence keys stay while the writer is there).
    let mut con = redis.connection().await?;
    let history: i64 = redis::cmd("EXISTS")
        .arg("gw:{r:old}:s")
        .arg("gw:{r:old}:s:t")
        .query_async(&mut con)
        .await?;
    assert_eq!(history, 0);
    Ok(())
}

#[tokio::test]
async fn connections_that_never_log_in_are_closed_with_4002() -> anyhow::Result<()> {
    let gw = InProcessGateway::start(GatewayOpts::default().env("GATEWAY_LOGIN_TIMEOUT_MS", 600))
        .await?;
    let mut idler = Client::connect(&gw.ws_url()).await?;
    let started = Instant::now();
    // Pinging keeps the heartbeat happy, not the login deadline.
    let code = loop {
        idler
            .send(json!({"event":"heartBeat","content":"ping"}))
            .await
            .ok();
        if let Ok(code) = idler.expect_close(Duration::from_millis(100)).await {
            break code;
        }
        assert!(started.elapsed() < Duration::from_secs(5), "never closed");
    };
    assert_eq!(code, 4002);
    let mut fine = Client::connect(&gw.ws_url()).await?;
    fine.login("quick", json!(1)).await?;
    fine.expect_none(Duration::from_millis(900), |_| false)
        .await?;
    assert!(fine.closed.is_none(), "a logged-in client stays");
    Ok(())
}

#[tokio::test]
async fn half_sent_and_silent_sockets_are_dropped_and_capped() -> anyhow::Result<()> {
    let gw = InProcessGateway::start(
        GatewayOpts::default()
            .env("GATEWAY_HANDSHAKE_TIMEOUT_MS", 700)
            .env("GATEWAY_MAX_PENDING_HANDSHAKES", 40),
    )
    .await?;
    let mut held = Vec::new();
    for i in 0..60 {
        let mut tcp = TcpStream::connect(gw.addr()).await?;
        if i % 2 == 0 {
            // Half a request, never finished.
            tcp.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n")
                .await?;
        }
        held.push(tcp);
    }
    // Past the cap, or past the deadline, the server closes every one of them.
    let started = Instant::now();
    for tcp in &mut held {
        let mut buf = [0u8; 256];
        let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf)).await;
        assert!(
            matches!(n, Ok(Ok(0)) | Ok(Err(_))),
            "a socket was kept: {n:?}"
        );
    }
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(
        gw.metric("gateway_connections_refused_total{reason=\"handshakes\"")
            .await?
            >= 20.0
    );
    assert!(gw.metric("gateway_handshake_timeouts_total").await? >= 1.0);
    // Real clients are served meanwhile and after.
    let mut c = Client::connect(&gw.ws_url()).await?;
    c.login("real", json!(1)).await?;
    Ok(())
}

#[tokio::test]
async fn one_address_or_one_user_cannot_take_every_slot() -> anyhow::Result<()> {
    let gw = InProcessGateway::start(
        GatewayOpts::default()
            .env("GATEWAY_MAX_CONNECTIONS_PER_IP", 3)
            .env("GATEWAY_MAX_CONNECTIONS_PER_USER", 2)
            .env("GATEWAY_TRUSTED_PROXIES", "127.0.0.2"),
    )
    .await?;
    let mut kept = Vec::new();
    for _ in 0..3 {
        kept.push(Client::connect(&gw.ws_url()).await?);
    }
    let refused = e2e::refused_upgrade(&gw.ws_url(), &[]).await?;
    assert_eq!(refused.status, 429, "{refused}");
    // A forged X-Forwarded-For from an untrusted peer changes nothing.
    let refused = e2e::refused_upgrade(&gw.ws_url(), &[("x-forwarded-for", "9.9.9.9")]).await?;
    assert_eq!(refused.status, 429);
    // A closed connection gives its slot back.
    kept.pop().expect("three kept").close().await?;
    let url = gw.ws_url();
    let mut d = wait_for("the address's slot to be free again", WAIT, || {
        let url = url.clone();
        async move { Client::connect(&url).await.ok() }
    })
    .await?;
    // Per user: the third login of one user on this node is refused.
    for c in kept.iter_mut() {
        c.login("same", json!(1)).await?;
    }
    d.send(json!({"event":"login","userId":"same","roomId":1}))
        .await?;
    let err = d.recv_until(is("error")).await?;
    assert_eq!(err["code"], "too_many_connections", "{err}");
    assert_eq!(
        gw.metric("gateway_connections_refused_total{reason=\"per_user\"")
            .await?,
        1.0
    );
    Ok(())
}

#[tokio::test]
async fn a_node_joins_at_most_its_rooms() -> anyhow::Result<()> {
    // Four channels: the connection's user channel and three rooms.
    let gw = InProcessGateway::start(GatewayOpts::default().env("GATEWAY_MAX_ROOMS_PER_NODE", 4))
        .await?;
    let mut c = Client::connect(&gw.ws_url()).await?;
    for room in ["a", "b", "c"] {
        c.login("many", json!(room)).await?;
    }
    c.send(json!({"event":"login","userId":"many","roomId":"d"}))
        .await?;
    let err = c.recv_until(is("error")).await?;
    assert_eq!(err["code"], "too_many_rooms", "{err}");
    Ok(())
}

/// A WebSocket handshake done by hand, so the test can send frames no client library would.
async fn raw_websocket(addr: &str) -> anyhow::Result<TcpStream> {
    let mut tcp = TcpStream::connect(addr).await?;
    tcp.write_all(
        format!(
            "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        .as_bytes(),
    )
    .await?;
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        tcp.read_exact(&mut byte).await?;
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{:?}",
        String::from_utf8_lossy(&head)
    );
    Ok(tcp)
}

/// A masked client frame with `first` as its first byte (FIN, RSV bits, opcode).
fn masked(first: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [1u8, 2, 3, 4];
    let mut frame = vec![first, 0x80 | payload.len() as u8];
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

/// The close code of the server's close frame (`None` if the socket just ended).
async fn close_code(tcp: &mut TcpStream) -> anyhow::Result<Option<u16>> {
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut buf)).await;
    // Server frames are unmasked: 0x88, length, code (2 bytes), reason.
    let close = buf.windows(2).position(|w| w[0] == 0x88 && w[1] >= 2);
    Ok(close.map(|i| u16::from_be_bytes([buf[i + 2], buf[i + 3]])))
}

#[tokio::test]
async fn protocol_errors_close_with_1002_and_bad_utf8_with_1007() -> anyhow::Result<()> {
    let gw = InProcessGateway::start(GatewayOpts::default()).await?;
    let cases: [(&str, Vec<u8>, u16); 3] = [
        (
            "invalid UTF-8 text",
            masked(0x81, &[0xff, 0xfe, 0x41]),
            1007,
        ),
        ("RSV1 set", masked(0xc1, b"{}"), 1002),
        ("unmasked client frame", vec![0x81, 2, b'{', b'}'], 1002),
    ];
    for (what, frame, expected) in cases {
        let mut tcp = raw_websocket(&gw.addr()).await?;
        tcp.write_all(&frame).await?;
        assert_eq!(close_code(&mut tcp).await?, Some(expected), "{what}");
    }
    bystander_still_chats(&gw.ws_url(), "after").await
}

#[tokio::test]
async fn replays_are_read_in_parts_as_the_client_reads() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let gw = InProcessGateway::start(
        GatewayOpts::redis(&redis.url())
            .env("GATEWAY_REPLAY_BUFFER_BYTES", 65536)
            .env("GATEWAY_SYNC_MAX", 500),
    )
    .await?;
    let mut writer = Client::connect(&gw.ws_url()).await?;
    writer.login("w", json!("big")).await?;
    let content = "x".repeat(30_000);
    for _ in 0..120 {
        writer
            .send(json!({"roomId":"big","content":content}))
            .await?;
    }
    for _ in 0..120 {
        writer.recv_until(is("message")).await?;
    }
    let before = gw
        .metric("gateway_redis_command_duration_seconds_count{op=\"range\"")
        .await?;
    let mut reader = Client::connect(&gw.ws_url()).await?;
    reader.login("r", json!("big")).await?;
    reader
        .send(json!({"event":"sync","roomId":"big","since":"0"}))
        .await?;
    let mut got = 0;
    loop {
        let f = reader.recv().await?;
        if f["event"] == "message" {
            got += 1;
        }
        if f["event"] == "synced" {
            assert_eq!(f["count"], 120);
            break;
        }
    }
    assert_eq!(got, 120);
    let reads = gw
        .metric("gateway_redis_command_duration_seconds_count{op=\"range\"")
        .await?
        - before;
    // 64 KiB parts of at most one 64 KiB message each: one read per message, never one read
    // holding the whole 3.6 MB page.
    assert!(reads >= 60.0, "{reads} reads");
    Ok(())
}

#[tokio::test]
async fn a_non_reading_client_does_not_pin_the_history_in_memory() -> anyhow::Result<()> {
    // Writer and readers through the harness; the hostile readers use raw sockets that never
    // read after the handshake.
    let redis = RedisServer::start().await?;
    let gw = Gateway::start(GatewayOpts::redis(&redis.url())).await?;
    let mut writer = Client::connect(&gw.ws_url()).await?;
    writer.login("w", json!("fat")).await?;
    let content = "y".repeat(60_000);
    for _ in 0..150 {
        writer
            .send(json!({"roomId":"fat","content":content}))
            .await?;
        writer.recv_until(is("message")).await?;
    }
    let rss = |pid: u32| -> u64 {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmRSS:"))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            })
            .unwrap_or(0)
    };
    let pid = gw.proc.pid().expect("running");
    let before_kib = rss(pid);
    let reads_before = gw
        .metric("gateway_redis_command_duration_seconds_count{op=\"range\"")
        .await?;
    let mut hostile = Vec::new();
    for i in 0..20 {
        let mut tcp = raw_websocket(&gw.addr()).await?;
        let login = format!(r#"{{"event":"login","userId":"h{i}","roomId":"fat"}}"#);
        tcp.write_all(&masked(0x81, login.as_bytes())).await?;
        tcp.write_all(&masked(
            0x81,
            br#"{"event":"sync","roomId":"fat","since":"0"}"#,
        ))
        .await?;
        hostile.push(tcp);
    }
    // Each wants 9 MB; unbounded that would be 180 MB held. Measure once every one of them
    // has started its replay (one history read each at least).
    wait_for("the 20 replays to start", WAIT, || async {
        let reads = gw
            .metric("gateway_redis_command_duration_seconds_count{op=\"range\"")
            .await
            .ok()?;
        (reads >= reads_before + 20.0).then_some(())
    })
    .await?;
    let during_kib = rss(pid);
    let grown_mib = during_kib.saturating_sub(before_kib) / 1024;
    assert!(
        grown_mib < 100,
        "20 stalled syncs grew the gateway by {grown_mib} MiB"
    );
    drop(hostile);
    bystander_still_chats(&gw.ws_url(), "lean").await?;
    Ok(())
}

#[tokio::test]
async fn defaults_are_documented_and_sane() -> anyhow::Result<()> {
    let help = std::process::Command::new(e2e::gateway_bin())
        .arg("--help")
        .output()?;
    let help = String::from_utf8_lossy(&help.stdout);
    for setting in [
        "GATEWAY_MAX_FRAMES_PER_SEC",
        "GATEWAY_FRAME_BURST",
        "GATEWAY_MAX_SYNCS_PER_SEC",
        "GATEWAY_MAX_JOINS_PER_SEC",
        "GATEWAY_MAX_DMS_PER_SEC",
        "GATEWAY_LOGIN_TIMEOUT_MS",
        "GATEWAY_HANDSHAKE_TIMEOUT_MS",
        "GATEWAY_MAX_PENDING_HANDSHAKES",
        "GATEWAY_MAX_CONNECTIONS_PER_IP",
        "GATEWAY_TRUSTED_PROXIES",
        "GATEWAY_MAX_CONNECTIONS_PER_USER",
        "GATEWAY_REPLAY_BUFFER_BYTES",
        "GATEWAY_INBOX_MAX_LEN",
        "GATEWAY_HISTORY_TTL_MS",
        "GATEWAY_MAX_ROOMS_PER_NODE",
        "GATEWAY_MAX_REPLAY_BYTES_PER_SEC",
        "GATEWAY_MAX_ANNOUNCES_PER_ROOM_PER_SEC",
        "GATEWAY_ABUSE_STRIKES",
        "GATEWAY_ABUSE_COOLDOWN_MS",
        "GATEWAY_MAX_PENDING_LOGINS_PER_IP",
        "GATEWAY_MAX_UPGRADES_PER_IP_PER_SEC",
    ] {
        assert!(help.contains(setting), "{setting} missing from --help");
        let doc = std::fs::read_to_string(e2e::workspace_root().join("docs/security.md"))?;
        assert!(
            doc.contains(setting),
            "{setting} missing from docs/security.md"
        );
    }
    Ok(())
}

#[tokio::test]
async fn presence_broadcasts_per_room_are_capped_whoever_toggles() -> anyhow::Result<()> {
    for (backend, _redis, gw) in e2e::both_backends(&[
        ("GATEWAY_MAX_ANNOUNCES_PER_ROOM_PER_SEC", "5"),
        ("GATEWAY_MAX_JOINS_PER_SEC", "1000"),
    ])
    .await?
    {
        let mut member = Client::connect(&gw.ws_url()).await?;
        member.login("member", json!("toggle")).await?;
        // Fresh connections each round: per-connection budgets would start anew.
        let started = Instant::now();
        for round in 0..10 {
            let mut t = Client::connect(&gw.ws_url()).await?;
            for _ in 0..5 {
                t.send(json!({"event":"login","userId":format!("t{round}"),"roomId":"toggle"}))
                    .await?;
                t.send(json!({"event":"logout","roomId":"toggle"})).await?;
            }
            t.send(json!({"event":"heartBeat","content":"ping"}))
                .await?;
            t.recv_until(is("heartBeat")).await?;
        }
        let elapsed = started.elapsed().as_secs_f64();
        let mut announced = 0;
        while member
            .recv_until_timeout(Duration::from_millis(300), |f| {
                f["event"] == "login" || f["event"] == "logout"
            })
            .await
            .is_ok()
        {
            announced += 1;
        }
        // 100 toggles; at most 5 a second (+1 window) reach the member.
        let cap = (5.0 * (elapsed + 1.5)).ceil() as usize;
        assert!(
            announced <= cap,
            "{backend}: {announced} broadcasts in {elapsed:.1} s (cap {cap})"
        );
        assert!(announced > 0, "{backend}: some are announced");
    }
    Ok(())
}

#[tokio::test]
async fn big_replays_are_slowed_to_their_byte_budget_not_refused() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let gw = InProcessGateway::start(
        GatewayOpts::redis(&redis.url()).env("GATEWAY_MAX_REPLAY_BYTES_PER_SEC", 200_000),
    )
    .await?;
    let mut writer = Client::connect(&gw.ws_url()).await?;
    writer.login("w", json!("heavy")).await?;
    let content = "z".repeat(30_000);
    for _ in 0..30 {
        writer
            .send(json!({"roomId":"heavy","content":content}))
            .await?;
        writer.recv_until(is("message")).await?;
    }
    let mut reader = Client::connect(&gw.ws_url()).await?;
    reader.login("r", json!("heavy")).await?;
    // 900 KB against 200 KB/s with a 400 KB burst: throttled, yet all of it arrives.
    for _ in 0..2 {
        reader
            .send(json!({"event":"sync","roomId":"heavy","since":"0"}))
            .await?;
        let synced = reader
            .recv_until_timeout(Duration::from_secs(20), is("synced"))
            .await?;
        assert_eq!(synced["count"], 30);
    }
    assert!(
        gw.metric("gateway_rate_limited_total{kind=\"sync\"")
            .await?
            > 0.0
    );
    Ok(())
}

#[tokio::test]
async fn an_address_closed_for_abuse_must_pause_before_reconnecting() -> anyhow::Result<()> {
    let gw = InProcessGateway::start(
        GatewayOpts::default()
            .env("GATEWAY_MAX_FRAMES_PER_SEC", 50)
            .env("GATEWAY_FRAME_BURST", 50)
            .env("GATEWAY_ABUSE_STRIKES", 1)
            .env("GATEWAY_ABUSE_COOLDOWN_MS", 1500),
    )
    .await?;
    let mut bystander = Client::connect(&gw.ws_url()).await?;
    bystander.login("calm", json!("calm")).await?;
    let mut pinger = Client::connect(&gw.ws_url()).await?;
    let code = loop {
        for _ in 0..100 {
            let _ = pinger.send_message(Message::Ping(vec![1].into())).await;
        }
        if let Ok(code) = pinger.expect_close(Duration::from_millis(20)).await {
            break code;
        }
    };
    assert_eq!(code, 4029);
    // Reconnecting at once would start every budget anew: the address pauses instead.
    let refused = e2e::refused_upgrade(&gw.ws_url(), &[]).await?;
    assert_eq!(refused.status, 429, "{refused}");
    assert!(refused.body.contains("cooldown"), "{}", refused.body);
    // Connections already open are not touched.
    still_served(&mut bystander, "fine").await?;
    // Once the strike grew back, the address may connect again.
    connects_again(&gw.ws_url(), "the cooldown to pass").await?;
    assert!(
        gw.metric("gateway_connections_refused_total{reason=\"cooldown\"")
            .await?
            >= 1.0
    );
    Ok(())
}

#[tokio::test]
async fn one_address_holds_only_so_many_connections_that_never_log_in() -> anyhow::Result<()> {
    let gw =
        InProcessGateway::start(GatewayOpts::default().env("GATEWAY_MAX_PENDING_LOGINS_PER_IP", 2))
            .await?;
    let mut first = Client::connect(&gw.ws_url()).await?;
    let _second = Client::connect(&gw.ws_url()).await?;
    let refused = e2e::refused_upgrade(&gw.ws_url(), &[]).await?;
    assert_eq!(refused.status, 429, "{refused}");
    assert!(refused.body.contains("pending_logins"), "{}", refused.body);
    // A connection that logs in is no longer pending: the address may open another.
    first.login("alice", json!("room")).await?;
    let mut third = Client::connect(&gw.ws_url()).await?;
    third.login("bob", json!("room")).await?;
    let _fourth = Client::connect(&gw.ws_url()).await?;
    assert_eq!(
        gw.metric("gateway_connections_refused_total{reason=\"pending_logins\"")
            .await?,
        1.0
    );
    Ok(())
}

/// A client that ignores its 429s and goes on connecting: after as many answered refusals per
/// second as the upgrade rate, its connections get a fixed 429 (`upgrade_flood`) written at
/// accept, before the gateway reads any HTTP; after a pause it may connect again.
#[tokio::test]
async fn one_address_ignoring_its_refusals_is_refused_at_accept() -> anyhow::Result<()> {
    let gw = InProcessGateway::start(
        GatewayOpts::default().env("GATEWAY_MAX_UPGRADES_PER_IP_PER_SEC", 3),
    )
    .await?;
    let mut bystander = Client::connect(&gw.ws_url()).await?;
    bystander.login("calm", json!("calm")).await?;
    let mut reasons = Vec::new();
    let flood = loop {
        match e2e::connect_with_headers(&gw.ws_url(), &[]).await {
            Ok(client) => client.close().await?,
            Err(e) => {
                let refused = e.downcast::<e2e::UpgradeRefused>()?;
                assert_eq!(refused.status, 429, "{refused}");
                assert_eq!(refused.retry_after.as_deref(), Some("1"), "{refused}");
                if refused.body.contains("upgrade_flood") {
                    break refused;
                }
                assert!(refused.body.contains("upgrade_rate"), "{refused}");
                reasons.push("upgrade_rate");
            }
        }
        assert!(
            reasons.len() <= 20,
            "no upgrade_flood after {} refusals",
            reasons.len()
        );
    };
    // The answered refusals came first: a burst of one second's rate.
    assert!(
        reasons.len() >= 3,
        "refused at accept after {reasons:?}: {flood}"
    );
    assert!(
        gw.metric("gateway_connections_refused_total{reason=\"upgrade_flood\"")
            .await?
            >= 1.0
    );
    still_served(&mut bystander, "still here").await?;
    connects_again(&gw.ws_url(), "the upgrade budget to refill").await?;
    Ok(())
}

#[tokio::test]
async fn one_address_upgrading_too_fast_is_told_when_to_retry() -> anyhow::Result<()> {
    let gw = InProcessGateway::start(
        GatewayOpts::default().env("GATEWAY_MAX_UPGRADES_PER_IP_PER_SEC", 3),
    )
    .await?;
    let mut bystander = Client::connect(&gw.ws_url()).await?;
    bystander.login("calm", json!("calm")).await?;
    // Connect and close as fast as a client can: the burst (2 s worth, 6) passes, then 429.
    let mut accepted = 1;
    let refused = loop {
        match e2e::connect_with_headers(&gw.ws_url(), &[]).await {
            Ok(client) => {
                accepted += 1;
                client.close().await?;
                assert!(accepted <= 20, "{accepted} upgrades accepted at 3/s");
            }
            Err(e) => break e.downcast::<e2e::UpgradeRefused>()?,
        }
    };
    assert!(accepted >= 6, "refused after {accepted}: {refused}");
    assert_eq!(refused.status, 429, "{refused}");
    assert!(refused.body.contains("upgrade_rate"), "{}", refused.body);
    assert_eq!(refused.retry_after.as_deref(), Some("1"));
    // Connections already open are not touched, and after the pause upgrades pass again.
    still_served(&mut bystander, "fine").await?;
    connects_again(&gw.ws_url(), "the upgrade budget to refill").await?;
    assert!(
        gw.metric("gateway_connections_refused_total{reason=\"upgrade_rate\"")
            .await?
            >= 1.0
    );
    Ok(())
}

/// A client already logged in to room "calm" still has its messages answered.
async fn still_served(bystander: &mut Client, content: &str) -> anyhow::Result<()> {
    bystander
        .send(json!({"roomId":"calm","content":content}))
        .await?;
    bystander.recv_until(is("message")).await?;
    Ok(())
}

/// Waits until a new WebSocket to `url` is accepted again (a refusal's pause is over).
async fn connects_again(url: &str, what: &str) -> anyhow::Result<()> {
    wait_for(
        what,
        WAIT,
        || async move { Client::connect(url).await.ok() },
    )
    .await?;
    Ok(())
}

/// A client may send its first frame in the same packet as its upgrade request: the bytes the
/// HTTP layer read past the request are the WebSocket's first, not lost. A request that is not
/// a valid upgrade gets an HTTP error, not a WebSocket.
#[tokio::test]
async fn a_frame_sent_with_the_upgrade_request_is_read_and_bad_upgrades_are_refused(
) -> anyhow::Result<()> {
    let gw = InProcessGateway::start(GatewayOpts::default()).await?;
    let addr = gw.addr();
    let mut tcp = TcpStream::connect(&addr).await?;
    let mut request = format!(
        "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .into_bytes();
    let login = json!({"event":"login","userId":"eager","roomId":"r"}).to_string();
    request.extend(masked(0x81, login.as_bytes()));
    tcp.write_all(&request).await?;
    // The 101, then the login answer (an unmasked text frame naming the user).
    let mut got = Vec::new();
    let answered = tokio::time::timeout(WAIT, async {
        let mut buf = [0u8; 4096];
        loop {
            let n = tcp.read(&mut buf).await?;
            anyhow::ensure!(n > 0, "closed: {:?}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&got);
            if text.contains(r#""event":"login""#) && text.contains("eager") {
                return Ok(());
            }
        }
    })
    .await;
    let text = String::from_utf8_lossy(&got).to_string();
    assert!(matches!(answered, Ok(Ok(()))), "no login answer: {text:?}");
    assert!(text.starts_with("HTTP/1.1 101"), "{text:?}");
    // RFC 6455's own example key and answer.
    let head = text.to_ascii_lowercase();
    assert!(
        head.contains(&"sec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=".to_ascii_lowercase()),
        "{text:?}"
    );

    // Not an upgrade: a wrong version and a missing key are 400s, a POST is 405.
    for (method, extra, status) in [
        ("GET", "Sec-WebSocket-Version: 8\r\nSec-WebSocket-Key: a2V5a2V5a2V5a2V5a2V5aw==\r\n", "400"),
        ("GET", "Sec-WebSocket-Version: 13\r\n", "400"),
        ("POST", "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: a2V5a2V5a2V5a2V5a2V5aw==\r\nContent-Length: 0\r\n", "405"),
    ] {
        let mut tcp = TcpStream::connect(&addr).await?;
        let request = format!(
            "{method} /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n{extra}\r\n"
        );
        tcp.write_all(request.as_bytes()).await?;
        let mut answer = [0u8; 12];
        tokio::time::timeout(WAIT, tcp.read_exact(&mut answer)).await??;
        let answer = String::from_utf8_lossy(&answer).to_string();
        assert_eq!(answer, format!("HTTP/1.1 {status}"), "{method} {extra:?}");
    }
    Ok(())
}

/// A member that stops reading is closed as a slow consumer (4008) once
/// `GATEWAY_OUTBOUND_QUEUE` frames wait for it beyond what the kernel's buffers took — the
/// dispatcher never blocks on it and never holds more for it — and the room goes on for
/// everyone else.
#[tokio::test]
async fn a_member_that_stops_reading_is_closed_as_a_slow_consumer() -> anyhow::Result<()> {
    let gw =
        InProcessGateway::start(GatewayOpts::default().env("GATEWAY_OUTBOUND_QUEUE", 8)).await?;
    let mut stuck = raw_websocket(&gw.addr()).await?;
    let login = json!({"event":"login","userId":"stuck","roomId":"big"}).to_string();
    stuck.write_all(&masked(0x81, login.as_bytes())).await?;
    let mut sender = Client::connect(&gw.ws_url()).await?;
    sender.login("sender", json!("big")).await?;
    // 60 KB messages fill the stuck member's socket buffers (a few MB on loopback) quickly;
    // the sender reads each of its own before sending the next, so it never falls behind.
    let content = "x".repeat(60_000);
    let mut sent = 0;
    while gw.metric("gateway_slow_consumer_disconnects_total").await? < 1.0 {
        anyhow::ensure!(
            sent < 2_000,
            "2000 messages of 60 KB and the reader is still open"
        );
        sender
            .send(json!({"roomId":"big","content":content}))
            .await?;
        sender.recv_until(is("message")).await?;
        sent += 1;
    }
    assert!(gw.metric("gateway_outbound_dropped_total").await? >= 1.0);
    // The room goes on for the member who reads.
    sender
        .send(json!({"roomId":"big","content":"still here"}))
        .await?;
    let got = sender.recv_until(is("message")).await?;
    assert_eq!(got["content"], "still here");
    drop(stuck);
    Ok(())
}
