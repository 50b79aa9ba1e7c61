//! One gateway with its embedded broker: the tutorial's whole flow, bad input, heartbeat
//! reaping, limits and configuration errors.

use std::process::Command;
use std::time::Duration;

use e2e::{gateway_bin, http_get, is, Client, GatewayOpts, InProcessGateway, WAIT};
use serde_json::json;

#[tokio::test]
async fn tutorial_flow_on_one_node() -> anyhow::Result<()> {
    let gw = InProcessGateway::start(GatewayOpts::default()).await?;
    // The tutorial's client connects to the bare host URL.
    let root_url = format!("ws://{}", gw.addr());

    // The tutorial's login: userId is undefined there, so JSON.stringify drops it.
    let mut alice = Client::connect(&root_url).await?;
    alice
        .send(json!({"userName":"小红","roomId":1,"roomName":"大厅","event":"login"}))
        .await?;
    let login = alice.recv_until(is("login")).await?;
    assert_eq!(login["num"], 1);
    assert_eq!(login["roomId"], 1, "roomId keeps its JSON type");
    assert_eq!(
        login["roomName"], "大厅 Lobby",
        "a default room keeps its configured name"
    );
    assert_eq!(login["userName"], "小红");
    assert!(login["userId"].as_str().unwrap().starts_with("guest-"));

    let mut bob = Client::connect(&gw.ws_url()).await?;
    let bob_login =
        json!({"event":"login","userId":"b","userName":"Bob","roomId":1,"roomName":"大厅"});
    bob.send(bob_login).await?;
    assert_eq!(bob.recv_until(is("login")).await?["num"], 2);
    let seen = alice.recv_until(is("login")).await?;
    assert_eq!(
        (seen["userName"].as_str(), seen["num"].as_u64()),
        (Some("Bob"), Some(2))
    );

    // A tutorial chat frame: no event, userId/userName in the frame (ignored: forged here).
    bob.send(
        json!({"userName":"Mallory","userId":"x","roomId":1,"roomName":"大厅","content":"你好 🎉"}),
    )
    .await?;
    for client in [&mut alice, &mut bob] {
        let msg = client.recv_until(is("message")).await?;
        assert_eq!(msg["content"], "你好 🎉");
        assert_eq!(msg["userId"], "b", "identity comes from the login");
        assert_eq!(msg["userName"], "Bob");
        assert_eq!(msg["num"], 2);
        assert_eq!(msg["roomId"], 1);
        assert!(msg["id"].as_str().unwrap().contains('-'));
        assert!(msg["ts"].as_u64().unwrap() > 1_600_000_000_000);
    }

    alice
        .send(json!({"event":"heartBeat","content":"ping"}))
        .await?;
    assert_eq!(
        alice.recv_until(is("heartBeat")).await?,
        json!({"event":"heartBeat","content":"pong"})
    );

    bob.close().await?;
    let logout = alice.recv_until(is("logout")).await?;
    assert_eq!(logout["userId"], "b");
    assert_eq!(logout["userName"], "Bob");
    assert_eq!(logout["roomId"], 1);
    assert_eq!(logout["roomName"], "大厅 Lobby");
    assert_eq!(logout["num"], 1);
    Ok(())
}

#[tokio::test]
async fn bad_input_gets_error_frames_and_the_connection_stays_open() -> anyhow::Result<()> {
    let gw = InProcessGateway::start(GatewayOpts::default()).await?;
    let mut c = Client::connect(&gw.ws_url()).await?;
    let cases: Vec<(&str, &str)> = vec![
        ("not json at all", "bad_json"),
        ("[1,2,3]", "not_object"),
        (r#"{"event":"dance"}"#, "unknown_event"),
        (r#"{"event":"login"}"#, "missing_field"),
        (r#"{"event":"login","roomId":{"a":1}}"#, "invalid_field"),
        (r#"{"roomId":1,"content":"too early"}"#, "not_logged_in"),
        (r#"{"event":"ack","roomId":1,"id":"1-0"}"#, "not_logged_in"),
        (
            r#"{"event":"dm","toUserId":"x","content":"hi"}"#,
            "not_logged_in",
        ),
    ];
    for (frame, code) in &cases {
        c.send_raw(frame).await?;
        let err = c.recv_until(is("error")).await?;
        assert_eq!(err["code"], *code, "for {frame}");
        assert!(err["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    c.login("u1", json!("r1")).await?;
    let after_login: Vec<(&str, &str)> = vec![
        (r#"{"roomId":"other","content":"x"}"#, "not_in_room"),
        (r#"{"event":"logout","roomId":"other"}"#, "not_in_room"),
        (
            r#"{"event":"ack","roomId":"r1","id":"1-0"}"#,
            "acks_disabled",
        ),
        (
            r#"{"event":"login","userId":"someone-else","roomId":"r2"}"#,
            "identity_mismatch",
        ),
        (r#"{"roomId":"r1","content":""}"#, "invalid_field"),
    ];
    for (frame, code) in &after_login {
        c.send_raw(frame).await?;
        let err = c.recv_until(is("error")).await?;
        assert_eq!(err["code"], *code, "for {frame}");
    }
    c.send_message(tokio_tungstenite::tungstenite::Message::binary(vec![
        1u8, 2, 3,
    ]))
    .await?;
    assert_eq!(c.recv_until(is("error")).await?["code"], "binary_frame");
    // Still open and working.
    c.send(json!({"roomId":"r1","content":"still here"}))
        .await?;
    assert_eq!(c.recv_until(is("message")).await?["content"], "still here");
    assert!(gw.metric("gateway_errors_total{code=\"bad_json\"").await? >= 1.0);
    Ok(())
}

#[tokio::test]
async fn silent_connections_are_reaped_and_leave_their_rooms() -> anyhow::Result<()> {
    let gw =
        InProcessGateway::start(GatewayOpts::default().env("GATEWAY_HEARTBEAT_TIMEOUT_MS", 600))
            .await?;
    let mut silent = Client::connect(&gw.ws_url()).await?;
    silent.login("quiet", json!(5)).await?;
    let mut chatty = Client::connect(&gw.ws_url()).await?;
    chatty.login("chatty", json!(5)).await?;
    // The chatty one keeps pinging; the silent one sends nothing.
    let reaped = async {
        loop {
            chatty
                .send(json!({"event":"heartBeat","content":"ping"}))
                .await?;
            if let Ok(f) = chatty
                .recv_until_timeout(Duration::from_millis(200), is("logout"))
                .await
            {
                return anyhow::Ok(f);
            }
        }
    };
    let logout = tokio::time::timeout(WAIT, reaped).await??;
    assert_eq!(logout["userId"], "quiet");
    assert_eq!(logout["num"], 1);
    assert_eq!(silent.expect_close(WAIT).await?, 4000);
    Ok(())
}

#[tokio::test]
async fn oversized_messages_close_with_1009_and_the_page_is_served() -> anyhow::Result<()> {
    let gw = InProcessGateway::start(GatewayOpts::default().env("GATEWAY_MAX_MESSAGE_BYTES", 1024))
        .await?;
    let mut c = Client::connect(&gw.ws_url()).await?;
    c.login("big", json!(1)).await?;
    let big = "x".repeat(2000);
    c.send(json!({"roomId":1,"content":big})).await?;
    assert_eq!(c.expect_close(WAIT).await?, 1009);

    let (status, body) = http_get(&gw.addr(), "/").await?;
    assert_eq!(status, 200);
    assert!(body.contains("<html") || body.contains("<!DOCTYPE") || body.contains("<!doctype"));
    let (status, _) = http_get(&gw.addr(), "/client.js").await?;
    assert_eq!(status, 200);
    // The admin endpoints are not on the public listener.
    let (status, _) = http_get(&gw.addr(), "/metrics").await?;
    assert_eq!(status, 404);
    Ok(())
}

#[tokio::test]
async fn connection_limit_closes_with_1013() -> anyhow::Result<()> {
    let gw =
        InProcessGateway::start(GatewayOpts::default().env("GATEWAY_MAX_CONNECTIONS", 2)).await?;
    let _a = Client::connect(&gw.ws_url()).await?;
    let _b = Client::connect(&gw.ws_url()).await?;
    let mut c = Client::connect(&gw.ws_url()).await?;
    assert_eq!(c.expect_close(WAIT).await?, 1013);
    Ok(())
}

#[tokio::test]
async fn bad_configuration_exits_with_64_and_a_reason() -> anyhow::Result<()> {
    for (key, value, mention) in [
        ("GATEWAY_LISTEN", "not-an-address", "listen"),
        ("GATEWAY_REDIS_URL", "http://localhost", "redis://"),
        ("GATEWAY_HEARTBEAT_TIMEOUT_MS", "abc", "heartbeat"),
        ("GATEWAY_DEFAULT_ROOMS", "no-colon", "GATEWAY_DEFAULT_ROOMS"),
    ] {
        let out = Command::new(gateway_bin()).env(key, value).output()?;
        assert_eq!(out.status.code(), Some(64), "{key}={value}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.to_lowercase().contains(&mention.to_lowercase()),
            "{key}: {stderr}"
        );
    }
    let help = Command::new(gateway_bin()).arg("--help").output()?;
    assert_eq!(help.status.code(), Some(0));
    let text = String::from_utf8_lossy(&help.stdout);
    for var in [
        "GATEWAY_LISTEN",
        "GATEWAY_ADMIN_LISTEN",
        "GATEWAY_REDIS_URL",
        "GATEWAY_NODE_ID",
        "GATEWAY_HEARTBEAT_TIMEOUT_MS",
    ] {
        assert!(text.contains(var), "--help lists {var}");
    }
    Ok(())
}

#[tokio::test]
async fn a_client_sending_fast_while_reading_is_not_cut_as_slow() -> anyhow::Result<()> {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    // A small queue makes starvation show at once: the sender's own copies must be written
    // between its frames, not after it stops sending.
    let redis = e2e::RedisServer::start().await?;
    let gw =
        InProcessGateway::start(GatewayOpts::redis(&redis.url()).env("GATEWAY_OUTBOUND_QUEUE", 64))
            .await?;
    let (ws, _) = tokio_tungstenite::connect_async(gw.ws_url()).await?;
    let (mut tx, mut rx) = ws.split();
    tx.send(Message::text(
        json!({"event":"login","userId":"fast","roomId":"fair"}).to_string(),
    ))
    .await?;
    let total = 500;
    let reader = tokio::spawn(async move {
        let mut copies = 0;
        while let Some(msg) = rx.next().await {
            match msg? {
                Message::Text(text) => {
                    let frame: serde_json::Value = serde_json::from_str(&text)?;
                    if frame["event"] == "message" {
                        copies += 1;
                        if copies == total {
                            return Ok::<_, anyhow::Error>(None);
                        }
                    }
                }
                Message::Close(frame) => return Ok(frame.map(|f| u16::from(f.code))),
                _ => {}
            }
        }
        Ok(Some(0))
    });
    for i in 0..total {
        tx.feed(Message::text(
            json!({"roomId":"fair","content":format!("m{i}")}).to_string(),
        ))
        .await?;
    }
    tx.flush().await?;
    let closed = tokio::time::timeout(Duration::from_secs(20), reader).await???;
    assert_eq!(
        closed, None,
        "cut with close code {closed:?} before all copies arrived"
    );
    Ok(())
}
