//! The server API (`/v1/` on the admin listener) against real gateway processes on one Redis:
//! what a backend does with it and what a client sees, its refusals, the committed OpenAPI
//! document, and a schemathesis run (contract fuzzing) that must find no server error.

use std::process::Command;
use std::time::Duration;

use anyhow::{anyhow, ensure, Context, Result};
use e2e::{
    http_get, http_request, is, venv_bin, wait_for, workspace_root, Client, Gateway, GatewayOpts,
    RedisServer, WAIT,
};
use serde_json::{json, Value};

const KEY: &str = "test-api-key-0123456789";

/// A request to the admin listener with an optional bearer key and JSON body.
async fn request(
    addr: &str,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: Option<&str>,
) -> Result<(u16, String)> {
    let mut headers = Vec::new();
    if let Some(key) = key {
        headers.push(format!("Authorization: Bearer {key}"));
    }
    if body.is_some() {
        headers.push("Content-Type: application/json".to_string());
    }
    http_request(addr, method, path, &headers, body).await
}

/// A POST with the key and a JSON body; returns the status and the JSON answer.
async fn post(gw: &Gateway, path: &str, body: &Value) -> Result<(u16, Value)> {
    let (status, text) = request(
        &gw.admin_addr(),
        "POST",
        path,
        Some(KEY),
        Some(&body.to_string()),
    )
    .await?;
    let value = serde_json::from_str(&text).with_context(|| format!("POST {path}: {text:?}"))?;
    Ok((status, value))
}

/// A request with the key whose answer must be `status` and JSON; returns the JSON.
async fn call(gw: &Gateway, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
    let body = body.map(|b| b.to_string());
    let (status, text) =
        request(&gw.admin_addr(), method, path, Some(KEY), body.as_deref()).await?;
    let value: Value =
        serde_json::from_str(&text).with_context(|| format!("{method} {path}: {text:?}"))?;
    ensure!(
        (200..300).contains(&status),
        "{method} {path} answered {status}: {value}"
    );
    Ok(value)
}

/// Asserts a refusal: `status` with a JSON error whose code is `code`.
async fn refused(
    gw: &Gateway,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: Option<&str>,
    status: u16,
    code: &str,
) -> Result<()> {
    let (got, text) = request(&gw.admin_addr(), method, path, key, body).await?;
    let value: Value = serde_json::from_str(&text)
        .with_context(|| format!("{method} {path} {body:?}: the error is not JSON: {text:?}"))?;
    ensure!(
        got == status && value["error"] == code && value["message"].is_string(),
        "{method} {path} {body:?}: expected {status} {code}, got {got} {value}"
    );
    Ok(())
}

async fn nodes(redis: &RedisServer, n: usize) -> Result<Vec<Gateway>> {
    let mut out = Vec::new();
    for i in 0..n {
        // Direct messages reach proven users only.
        let opts = GatewayOpts::redis(&redis.url())
            .node(&format!("api{i}"))
            .with_jwt()
            .env("GATEWAY_API_KEY", KEY);
        out.push(Gateway::start(opts).await?);
    }
    Ok(out)
}

#[tokio::test]
async fn a_backend_publishes_reads_and_disconnects_through_any_node() -> Result<()> {
    let redis = RedisServer::start().await?;
    let gws = nodes(&redis, 2).await?;
    let mut alice = Client::connect(&gws[0].ws_url()).await?;
    alice.login_proven("alice", json!(7)).await?;
    let mut bob = Client::connect(&gws[1].ws_url()).await?;
    bob.login_proven("bob", json!(7)).await?;
    alice
        .recv_until(|f| f["event"] == "login" && f["userId"] == "bob")
        .await?;
    let id = publish_as_the_system(&gws, &mut alice, &mut bob).await?;
    let carol_id = publish_as_a_user(&gws, &mut alice, &mut bob, &id).await?;
    read_history_count_presence_and_rooms(&gws, &id, &carol_id).await?;
    send_a_direct_message(&gws, &mut alice).await?;
    disconnect_everywhere(&gws, &mut alice, &mut bob).await
}

/// Publishes as the system identity through the node alice is not on (both members get it),
/// then retries with the same idempotency key (nothing published, the first id answered).
/// Returns the message's id.
async fn publish_as_the_system(
    gws: &[Gateway],
    alice: &mut Client,
    bob: &mut Client,
) -> Result<String> {
    let body = json!({"content": "maintenance at 18:00", "idempotencyKey": "notice-1"});
    let (status, published) = post(&gws[1], "/v1/rooms/7/messages", &body).await?;
    ensure!(status == 201, "publish answered {status}: {published}");
    ensure!(
        published["duplicate"] == false && published["roomId"] == json!(7),
        "{published}"
    );
    let id = published["id"].as_str().context("no id")?.to_string();
    for client in [alice, bob] {
        let frame = client.recv_until(is("message")).await?;
        ensure!(frame["id"] == id.as_str(), "{frame}");
        ensure!(
            frame["userId"] == "system" && frame["userName"] == "System",
            "{frame}"
        );
        ensure!(
            frame["content"] == "maintenance at 18:00" && frame["num"] == 2,
            "{frame}"
        );
        ensure!(frame["roomId"] == json!(7), "{frame}");
    }

    // A retry with the same key publishes nothing and answers the original id.
    let (status, retry) = post(&gws[0], "/v1/rooms/7/messages", &body).await?;
    ensure!(status == 200, "retry answered {status}: {retry}");
    ensure!(
        retry["duplicate"] == true && retry["id"] == id.as_str(),
        "{retry}"
    );
    Ok(id)
}

/// Publishes as a given user (carol); bob gets it, and alice gets no repeat of the system's
/// message. Returns carol's message id.
async fn publish_as_a_user(
    gws: &[Gateway],
    alice: &mut Client,
    bob: &mut Client,
    id: &str,
) -> Result<Value> {
    let as_carol = call(
        &gws[0],
        "POST",
        "/v1/rooms/7/messages",
        Some(json!({"content": "hi from the backend", "userId": "carol", "userName": "Carol"})),
    )
    .await?;
    let frame = bob.recv_until(is("message")).await?;
    ensure!(
        frame["id"] == as_carol["id"] && frame["userId"] == "carol" && frame["userName"] == "Carol",
        "{frame}"
    );
    alice
        .expect_none(Duration::from_millis(300), |f| f["id"] == id)
        .await?;
    Ok(as_carol["id"].clone())
}

/// History (whole and paged), the room's count, its presence and the room list, from either
/// node.
async fn read_history_count_presence_and_rooms(
    gws: &[Gateway],
    id: &str,
    carol_id: &Value,
) -> Result<()> {
    let history = call(&gws[0], "GET", "/v1/rooms/7/messages", None).await?;
    let ids: Vec<&str> = history["messages"]
        .as_array()
        .context("no messages")?
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    ensure!(ids == [id, carol_id.as_str().unwrap()], "{history}");
    ensure!(
        history["more"] == false && history["lastId"] == *carol_id,
        "{history}"
    );
    let page = call(
        &gws[1],
        "GET",
        &format!("/v1/rooms/7/messages?after={id}&limit=1"),
        None,
    )
    .await?;
    ensure!(
        page["messages"][0]["id"] == *carol_id && page["more"] == false,
        "{page}"
    );
    let room = call(&gws[1], "GET", "/v1/rooms/7", None).await?;
    ensure!(room == json!({"roomId": 7, "num": 2}), "{room}");
    let presence = call(&gws[1], "GET", "/v1/rooms/7/presence", None).await?;
    let mut users: Vec<&str> = presence["members"]
        .as_array()
        .context("no members")?
        .iter()
        .filter_map(|m| m["userId"].as_str())
        .collect();
    users.sort();
    ensure!(
        users == ["alice", "bob"] && presence["num"] == 2,
        "{presence}"
    );
    let rooms = call(&gws[0], "GET", "/v1/rooms", None).await?;
    ensure!(
        rooms["rooms"]
            .as_array()
            .context("no rooms")?
            .iter()
            .any(|r| r["roomId"] == json!(7) && r["num"] == 2),
        "{rooms}"
    );
    Ok(())
}

/// A direct message to alice from the backend, through bob's node.
async fn send_a_direct_message(gws: &[Gateway], alice: &mut Client) -> Result<()> {
    let dm = call(
        &gws[1],
        "POST",
        "/v1/users/alice/messages",
        Some(json!({"content": "your order shipped", "idempotencyKey": "order-9"})),
    )
    .await?;
    let frame = alice.recv_until(is("dm")).await?;
    ensure!(
        frame["id"] == dm["id"] && frame["fromUserId"] == "system" && frame["toUserId"] == "alice",
        "{frame}"
    );
    ensure!(frame["content"] == "your order shipped", "{frame}");
    Ok(())
}

/// Disconnects alice everywhere (she is on node 0 and, in a second tab, node 1; the call goes
/// to node 1): both tabs closed with 4010, bob told and still served, the close counted.
async fn disconnect_everywhere(
    gws: &[Gateway],
    alice: &mut Client,
    bob: &mut Client,
) -> Result<()> {
    let mut alice_tab2 = Client::connect(&gws[1].ws_url()).await?;
    alice_tab2.login_proven("alice", json!(8)).await?;
    let answer = call(&gws[1], "POST", "/v1/users/alice/disconnect", None).await?;
    ensure!(
        answer == json!({"userId": "alice", "closeCode": 4010}),
        "{answer}"
    );
    ensure!(alice.expect_close(WAIT).await? == 4010, "alice's first tab");
    ensure!(
        alice_tab2.expect_close(WAIT).await? == 4010,
        "alice's second tab"
    );
    let frame = bob
        .recv_until(|f| f["event"] == "logout" && f["userId"] == "alice")
        .await?;
    ensure!(frame["num"] == 1, "{frame}");
    bob.send(json!({"event": "heartBeat", "content": "ping"}))
        .await?;
    bob.recv_until(|f| f["content"] == "pong").await?;
    // Counted once the session has ended (just after its close frame went out).
    let closed = r#"gateway_connections_closed_total{reason="api_disconnect""#;
    wait_for("api_disconnect counted on node 0", WAIT, || async {
        (gws[0].metric(closed).await.ok()? == 1.0).then_some(())
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn the_api_refuses_bad_requests_with_json_errors_and_is_off_without_a_key() -> Result<()> {
    let off = Gateway::start(GatewayOpts::default()).await?;
    refused(
        &off,
        "GET",
        "/v1/rooms",
        Some(KEY),
        None,
        404,
        "api_disabled",
    )
    .await?;
    let on = Gateway::start(GatewayOpts::default().env("GATEWAY_API_KEY", KEY)).await?;
    refused(&on, "GET", "/v1/rooms", None, None, 401, "unauthorized").await?;
    refused(
        &on,
        "GET",
        "/v1/rooms",
        Some("wrong-key-0123456789"),
        None,
        401,
        "unauthorized",
    )
    .await?;
    let long_content = format!(r#"{{"content": "{}"}}"#, "x".repeat(70_000));
    let long_room = format!("/v1/rooms/{}", "r".repeat(129));
    let messages = "/v1/rooms/1/messages";
    let cases: [(&str, &str, Option<&str>, u16, &str); 16] = [
        ("POST", messages, Some("not json"), 400, "bad_json"),
        ("POST", messages, Some("[1]"), 400, "not_object"),
        ("POST", messages, Some("{}"), 400, "invalid_field"),
        (
            "POST",
            messages,
            Some(r#"{"content": ""}"#),
            400,
            "invalid_field",
        ),
        (
            "POST",
            messages,
            Some(r#"{"content": 5}"#),
            400,
            "invalid_field",
        ),
        (
            "POST",
            messages,
            Some(r#"{"content": "x", "extra": 1}"#),
            400,
            "invalid_field",
        ),
        (
            "POST",
            messages,
            Some(r#"{"content": "x", "userId": ""}"#),
            400,
            "invalid_field",
        ),
        (
            "POST",
            messages,
            Some(r#"{"content": "x", "userId": null}"#),
            400,
            "invalid_field",
        ),
        (
            "POST",
            messages,
            Some(&long_content),
            413,
            "content_too_large",
        ),
        ("GET", &long_room, None, 400, "invalid_field"),
        (
            "GET",
            "/v1/rooms/1/messages?after=x",
            None,
            400,
            "invalid_field",
        ),
        ("GET", "/v1/rooms?limit=0", None, 400, "invalid_field"),
        ("GET", "/v1/rooms?limit=abc", None, 400, "invalid_field"),
        ("GET", "/v1/rooms/%FF", None, 400, "invalid_field"),
        ("GET", "/v1/nothing", None, 404, "not_found"),
        ("DELETE", messages, None, 405, "method_not_allowed"),
    ];
    for (method, path, body, status, code) in cases {
        refused(&on, method, path, Some(KEY), body, status, code).await?;
    }

    // The public listener has no /v1 at all.
    let (status, _) = http_get(&on.addr(), "/v1/rooms").await?;
    ensure!(
        status == 404,
        "public listener answered {status} for /v1/rooms"
    );

    // The served document is the committed one.
    let (status, served) = http_get(&on.admin_addr(), "/v1/openapi.json").await?;
    ensure!(status == 200);
    let committed = std::fs::read_to_string(workspace_root().join("gateway/openapi.json"))?;
    ensure!(
        served == committed,
        "/v1/openapi.json differs from gateway/openapi.json"
    );
    Ok(())
}

#[tokio::test]
async fn schemathesis_contract_fuzzing_finds_no_server_error() -> Result<()> {
    let st = venv_bin("schemathesis")?;
    let redis = RedisServer::start().await?;
    let mut gws = nodes(&redis, 1).await?;
    let gw = &gws[0];
    // Something to read: a user online and history in room 1.
    let mut client = Client::connect(&gw.ws_url()).await?;
    client.login_proven("fuzz-watcher", json!(1)).await?;
    call(
        gw,
        "POST",
        "/v1/rooms/1/messages",
        Some(json!({"content": "seed"})),
    )
    .await?;

    let base = format!("http://{}", gw.admin_addr());
    let output = tokio::task::spawn_blocking({
        let base = base.clone();
        move || {
            // Every check schemathesis has (server errors, status codes, content types and
            // response schemas as documented, schema-valid input accepted, schema-violating
            // input refused, auth enforced), in every phase including stateful sequences.
            Command::new(&st)
                .arg("--no-color")
                .arg("--config-file")
                .arg(workspace_root().join("tests/schemathesis.toml"))
                .arg("run")
                .arg(format!("{base}/v1/openapi.json"))
                .args(["--url", &base])
                .args(["--header", &format!("Authorization: Bearer {KEY}")])
                .args(["--max-examples", "40", "--seed", "14"])
                .output()
        }
    })
    .await??;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    ensure!(output.status.success(), "schemathesis failed:\n{text}");
    let generated: u64 = text
        .lines()
        .find_map(|l| {
            l.trim()
                .split_once(" generated")
                .map(|(n, _)| n.trim().parse().ok())
        })
        .flatten()
        .ok_or_else(|| anyhow!("no test case count in:\n{text}"))?;
    ensure!(generated >= 500, "only {generated} test cases:\n{text}");
    // The fuzzer did reach the node: its API calls show up as messages received.
    let received = gw.metric("gateway_messages_received_total").await?;
    ensure!(
        received > 10.0,
        "schemathesis published only {received} messages:\n{text}"
    );
    println!("{text}");
    ensure!(gws[0].proc.is_running(), "the gateway died under fuzzing");
    Ok(())
}

/// Not the server API, but its sibling for application code: the client module's TypeScript
/// declarations are served beside it on the public listener (docs/client.md).
#[tokio::test]
async fn client_typings_are_served_beside_client_js() -> Result<()> {
    let node = Gateway::start(GatewayOpts::default()).await?;
    let (status, served) = http_get(&node.addr(), "/client.d.ts").await?;
    ensure!(status == 200, "/client.d.ts answered {status}");
    let committed = std::fs::read_to_string(workspace_root().join("gateway/static/client.d.ts"))?;
    ensure!(
        served == committed,
        "/client.d.ts differs from gateway/static/client.d.ts"
    );
    let (status, _) = http_get(&node.addr(), "/client.js").await?;
    ensure!(status == 200);
    Ok(())
}
