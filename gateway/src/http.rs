//! HTTP: the public router (WebSocket upgrade at `/` and `/ws`, the chat page and client
//! module, the room API) and the admin router (`/healthz`, `/readyz`, `/metrics`, the server API
//! under `/v1/` from `api.rs`), which is never served on the public listener.

use std::sync::Arc;

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::node::Node;
use crate::protocol::RoomId;
use crate::session;

/// Rooms listed by `GET /api/rooms` at most.
const MAX_ROOMS_LISTED: usize = 1000;
/// Members per page of `GET /api/rooms/{id}/members`: default and most.
const MEMBERS_PAGE_DEFAULT: usize = 100;
const MEMBERS_PAGE_MAX: usize = 1000;

pub fn public_router(node: Arc<Node>) -> Router {
    Router::new()
        .route("/", get(root))
        .route("/ws", get(upgrade))
        .route(
            "/client.js",
            get(|| static_file("text/javascript; charset=utf-8", CLIENT_JS)),
        )
        .route(
            "/client.d.ts",
            get(|| static_file("application/typescript; charset=utf-8", CLIENT_D_TS)),
        )
        .route(
            "/app.js",
            get(|| static_file("text/javascript; charset=utf-8", APP_JS)),
        )
        .route(
            "/app.css",
            get(|| static_file("text/css; charset=utf-8", APP_CSS)),
        )
        .route("/api/rooms", get(list_rooms))
        .route("/api/rooms/{room_id}/members", get(room_members))
        .with_state(node)
}

pub fn admin_router(node: Arc<Node>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(node.clone())
        .merge(crate::api::router(node))
}

const INDEX_HTML: &str = include_str!("../static/index.html");
const CLIENT_JS: &str = include_str!("../static/client.js");
const CLIENT_D_TS: &str = include_str!("../static/client.d.ts");
const APP_JS: &str = include_str!("../static/app.js");
const APP_CSS: &str = include_str!("../static/app.css");

async fn static_file(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

/// `/`: a WebSocket upgrade (the tutorial's client connects to the bare URL) or the page.
async fn root(
    State(node): State<Arc<Node>>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    match ws {
        Ok(ws) => accept(node, ws),
        Err(_) => static_file("text/html; charset=utf-8", INDEX_HTML).await,
    }
}

async fn upgrade(State(node): State<Arc<Node>>, ws: WebSocketUpgrade) -> Response {
    accept(node, ws)
}

fn accept(node: Arc<Node>, ws: WebSocketUpgrade) -> Response {
    if node.shutdown.is_cancelled() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response();
    }
    let max_message = node.config.max_message_bytes as usize;
    let ws = ws
        // Small buffers: an idle connection must stay cheap (axum's default read buffer alone
        // is 128 KiB). The read buffer grows for a bigger frame; the write buffer is flushed
        // once it holds 2 KiB (about 15 chat frames per write) and at the end of each batch.
        .read_buffer_size(1024)
        .write_buffer_size(2 * 1024)
        .max_write_buffer_size(1024 * 1024)
        .max_message_size(max_message)
        .max_frame_size(max_message);
    let tracker = node.sessions.clone();
    ws.on_upgrade(move |mut socket| {
        tracker.track_future(async move {
            match node.admit_connection() {
                Some(slot) => session::run(slot, socket).await,
                None => {
                    node.metrics
                        .connections_closed
                        .with_label_values(&["connection_limit"])
                        .inc();
                    let frame = CloseFrame {
                        code: 1013,
                        reason: "node at its connection limit; try again later".into(),
                    };
                    let _ = socket.send(Message::Close(Some(frame))).await;
                }
            }
        })
    })
}

async fn readyz(State(node): State<Arc<Node>>) -> Response {
    if node.is_ready() {
        (StatusCode::OK, "ready\n").into_response()
    } else if node.shutdown.is_cancelled() {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "broker unreachable\n").into_response()
    }
}

async fn metrics(State(node): State<Arc<Node>>) -> Response {
    node.metrics.ready.set(i64::from(node.is_ready()));
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        node.metrics.render(),
    )
        .into_response()
}

fn unavailable() -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({"error": "unavailable", "message": "the message broker is unreachable"})),
    )
        .into_response()
}

/// Parses a `"roomId":…,"roomName":…` fragment back into JSON values.
fn room_from_fragment(fragment: &str) -> Option<(Value, Value)> {
    let value: Value = serde_json::from_str(&format!("{{{fragment}}}")).ok()?;
    Some((value.get("roomId")?.clone(), value.get("roomName")?.clone()))
}

/// `GET /api/rooms`: rooms with someone online, plus the configured default rooms.
async fn list_rooms(State(node): State<Arc<Node>>) -> Response {
    let live = match node.broker.rooms(MAX_ROOMS_LISTED).await {
        Ok(rooms) => rooms,
        Err(_) => return unavailable(),
    };
    let mut rooms = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for default in &node.default_rooms {
        let key = RoomId::parse(&default.room_id)
            .map(|r| r.key)
            .unwrap_or_default();
        let num = live.iter().find(|r| r.room_key == key).map_or(0, |r| r.num);
        seen.insert(key);
        rooms.push(json!({"roomId": default.room_id, "roomName": default.room_name, "num": num}));
    }
    for room in live {
        if seen.contains(&room.room_key) {
            continue;
        }
        if let Some((room_id, room_name)) = room_from_fragment(&room.room_fragment) {
            rooms.push(json!({"roomId": room_id, "roomName": room_name, "num": room.num}));
        }
    }
    Json(json!({ "rooms": rooms })).into_response()
}

#[derive(Deserialize)]
struct MembersQuery {
    limit: Option<usize>,
    cursor: Option<String>,
}

/// `GET /api/rooms/{roomId}/members?limit=&cursor=`: online users, paginated.
async fn room_members(
    State(node): State<Arc<Node>>,
    Path(room_key): Path<String>,
    Query(query): Query<MembersQuery>,
) -> Response {
    if room_key.is_empty() || room_key.len() > crate::protocol::MAX_NAME_BYTES {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "invalid_field", "message": "bad room id"})),
        )
            .into_response();
    }
    let limit = query
        .limit
        .unwrap_or(MEMBERS_PAGE_DEFAULT)
        .clamp(1, MEMBERS_PAGE_MAX);
    let page = match node
        .broker
        .members(&room_key, query.cursor.as_deref(), limit)
        .await
    {
        Ok(page) => page,
        Err(_) => return unavailable(),
    };
    let members: Vec<Value> = page
        .members
        .iter()
        .filter_map(|(_, fragment)| serde_json::from_str(&format!("{{{fragment}}}")).ok())
        .collect();
    let room_id: Value =
        serde_json::from_str(&RoomId::from_key(&room_key).json).unwrap_or(Value::Null);
    Json(json!({
        "roomId": room_id,
        "num": page.num,
        "members": members,
        "nextCursor": page.next_cursor,
    }))
    .into_response()
}
