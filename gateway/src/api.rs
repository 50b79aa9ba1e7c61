//! The server API for application backends: HTTP+JSON under `/v1/` on the admin listener only,
//! enabled by `GATEWAY_API_KEY` (`Authorization: Bearer <key>`). It publishes into rooms and
//! inboxes through the broker's `append` (the same path as a client's message: id, history,
//! `num`, de-duplication), reads presence and history, lists rooms, and disconnects a user's
//! connections on every node (a control message on the user's channel; the sessions close with
//! 4010). Every bad request gets a 4xx JSON error `{"error": code, "message": text}`. The
//! contract is `gateway/openapi.json`, served at `/v1/openapi.json`.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::broker::{now_ms, now_us, BrokerError, EnvelopeHeader, Kind, Post, Topic};
use crate::node::Node;
use crate::protocol::{self, RoomId, StreamId};

/// Longest id, name or idempotency key, in characters.
const MAX_NAME_CHARS: usize = 128;

/// The committed OpenAPI document, served as is.
pub const OPENAPI: &str = include_str!("../openapi.json");

/// Rooms listed per call: default and most.
const ROOMS_DEFAULT: usize = 100;
const ROOMS_MAX: usize = 1000;
/// Presence members per page: default and most.
const MEMBERS_DEFAULT: usize = 100;
const MEMBERS_MAX: usize = 1000;
/// History messages per page by default (at most `GATEWAY_SYNC_MAX`).
const HISTORY_DEFAULT: usize = 100;
/// Close code of connections disconnected through the API (see `session::Close`).
pub const DISCONNECT_CODE: u16 = 4010;
/// Idempotency keys share the de-duplication store with clients' clientMsgIds under this
/// prefix, so a key never matches a client's id.
const IDEMPOTENCY_PREFIX: &str = "api:";

/// The `/v1` router (state applied), for the admin listener.
pub fn router(node: Arc<Node>) -> Router {
    let authenticated = Router::new()
        .route("/rooms", get(list_rooms))
        .route("/rooms/{room_id}", get(room))
        .route("/rooms/{room_id}/presence", get(presence))
        .route(
            "/rooms/{room_id}/messages",
            get(history).post(publish_to_room),
        )
        .route("/users/{user_id}/messages", post(send_dm))
        .route("/users/{user_id}/disconnect", post(disconnect))
        .route_layer(middleware::from_fn_with_state(node.clone(), authenticate));
    let v1 = authenticated
        .route("/openapi.json", get(openapi))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "not_found", "no such API route") })
        .method_not_allowed_fallback(|| async {
            error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this route does not accept that method",
            )
        })
        .with_state(node);
    Router::new().nest("/v1", v1)
}

/// An API error: the status and a JSON body with a stable code and a readable message.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Json(json!({"error": self.code, "message": self.message}));
        if self.status == StatusCode::UNAUTHORIZED {
            return (self.status, [(header::WWW_AUTHENTICATE, "Bearer")], body).into_response();
        }
        (self.status, body).into_response()
    }
}

fn error(status: StatusCode, code: &'static str, message: impl Into<String>) -> Response {
    ApiError::new(status, code, message).into_response()
}

fn bad_request(code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, code, message)
}

fn unavailable() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        "the message broker is unreachable; try again",
    )
}

type ApiResult = Result<Response, ApiError>;

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

/// Lets a request through with the right bearer key; 404 when the API is disabled.
async fn authenticate(State(node): State<Arc<Node>>, request: Request, next: Next) -> Response {
    let Some(key) = node.config.api_key() else {
        return error(
            StatusCode::NOT_FOUND,
            "api_disabled",
            "the server API is disabled: set GATEWAY_API_KEY to enable it",
        );
    };
    if !bearer_matches(request.headers(), key) {
        return error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "send the API key as `Authorization: Bearer <key>`",
        );
    }
    next.run(request).await
}

fn bearer_matches(headers: &HeaderMap, key: &str) -> bool {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return false;
    };
    let Some(given) = value.to_str().ok().and_then(|v| v.strip_prefix("Bearer ")) else {
        return false;
    };
    // Constant time in the key's length: no early exit on the first differing byte.
    given.len() == key.len()
        && given
            .bytes()
            .zip(key.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

// ---------------------------------------------------------------------------------------------
// Input checks

/// A path parameter, or the 400 answer for it.
fn path_param(param: Result<Path<String>, PathRejection>, what: &str) -> Result<String, ApiError> {
    let Path(value) = param.map_err(|e| {
        bad_request(
            "invalid_field",
            format!("{what} in the path: {}", e.body_text()),
        )
    })?;
    check_name(what, &value)?;
    Ok(value)
}

/// Ids and names: 1 to 128 characters (characters, as JSON Schema counts them; the WebSocket
/// protocol's limit is 128 bytes, so a longer non-ASCII id is one no client can log in with).
fn check_name(what: &str, value: &str) -> Result<(), ApiError> {
    if value.is_empty() || value.chars().count() > MAX_NAME_CHARS {
        return Err(bad_request(
            "invalid_field",
            format!("{what} must be 1 to {MAX_NAME_CHARS} characters"),
        ));
    }
    Ok(())
}

fn check_opt_name(what: &str, value: &Option<String>) -> Result<(), ApiError> {
    match value {
        Some(v) => check_name(what, v),
        None => Ok(()),
    }
}

fn query<T>(query: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    query
        .map(|Query(q)| q)
        .map_err(|e| bad_request("invalid_field", format!("query: {}", e.body_text())))
}

/// A JSON object body parsed into `T` (unknown fields are refused).
fn json_body<T: serde::de::DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let bytes = body.map_err(|e| ApiError::new(e.status(), "bad_body", e.body_text()))?;
    let value: Value = serde_json::from_slice(&bytes)
        .map_err(|e| bad_request("bad_json", format!("the body is not JSON: {e}")))?;
    let Some(object) = value.as_object() else {
        return Err(bad_request("not_object", "the body must be a JSON object"));
    };
    // An optional field is left out, never null.
    if let Some((field, _)) = object.iter().find(|(_, v)| v.is_null()) {
        return Err(bad_request(
            "invalid_field",
            format!("{field} must not be null (leave it out instead)"),
        ));
    }
    serde_json::from_value(value).map_err(|e| bad_request("invalid_field", e.to_string()))
}

fn check_content(node: &Node, content: &str) -> Result<(), ApiError> {
    let max = node.config.max_message_bytes as usize;
    if content.is_empty() {
        return Err(bad_request("invalid_field", "content must not be empty"));
    }
    if content.len() > max {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "content_too_large",
            format!("content is longer than GATEWAY_MAX_MESSAGE_BYTES ({max} bytes)"),
        ));
    }
    Ok(())
}

fn limit(value: Option<usize>, default: usize, max: usize) -> Result<usize, ApiError> {
    match value {
        None => Ok(default),
        Some(n) if (1..=max).contains(&n) => Ok(n),
        Some(_) => Err(bad_request(
            "invalid_field",
            format!("limit must be 1 to {max}"),
        )),
    }
}

fn room_json(room: &RoomId) -> Value {
    serde_json::from_str(&room.json).unwrap_or(Value::Null)
}

fn envelope(node: &Node, kind: Kind) -> EnvelopeHeader {
    EnvelopeHeader {
        kind,
        published_us: now_us(),
        origin: node.node_id.clone(),
        sender_conn: None,
        traceparent: crate::telemetry::current_traceparent(),
    }
}

// ---------------------------------------------------------------------------------------------
// Rooms

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitQuery {
    limit: Option<usize>,
}

/// `GET /v1/rooms`: rooms with someone online.
async fn list_rooms(
    State(node): State<Arc<Node>>,
    q: Result<Query<LimitQuery>, QueryRejection>,
) -> ApiResult {
    let q = query(q)?;
    let limit = limit(q.limit, ROOMS_DEFAULT, ROOMS_MAX)?;
    let rooms = node.broker.rooms(limit).await.map_err(|_| unavailable())?;
    let rooms: Vec<Value> = rooms
        .into_iter()
        .filter_map(|room| {
            let mut value: Value =
                serde_json::from_str(&format!("{{{}}}", room.room_fragment)).ok()?;
            value["num"] = json!(room.num);
            Some(value)
        })
        .collect();
    Ok(Json(json!({ "rooms": rooms })).into_response())
}

/// `GET /v1/rooms/{roomId}`: the online count.
async fn room(State(node): State<Arc<Node>>, id: Result<Path<String>, PathRejection>) -> ApiResult {
    let room = path_param(id, "roomId").map(|key| RoomId::from_key(&key))?;
    let num = node
        .broker
        .room_count(&room.key)
        .await
        .map_err(|_| unavailable())?;
    Ok(Json(json!({"roomId": room_json(&room), "num": num})).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PresenceQuery {
    limit: Option<usize>,
    cursor: Option<String>,
}

/// `GET /v1/rooms/{roomId}/presence?limit=&cursor=`: online users, a page at a time.
async fn presence(
    State(node): State<Arc<Node>>,
    id: Result<Path<String>, PathRejection>,
    q: Result<Query<PresenceQuery>, QueryRejection>,
) -> ApiResult {
    let room = RoomId::from_key(&path_param(id, "roomId")?);
    let q = query(q)?;
    let limit = limit(q.limit, MEMBERS_DEFAULT, MEMBERS_MAX)?;
    // The cursor is the broker's own: one it never handed out is a bad request, not a
    // broker failure.
    let bad_cursor = || bad_request("invalid_field", "cursor must be a nextCursor of this API");
    if q.cursor
        .as_ref()
        .is_some_and(|c| c.chars().count() > MAX_NAME_CHARS)
    {
        return Err(bad_cursor());
    }
    let page = node
        .broker
        .members(&room.key, q.cursor.as_deref(), limit)
        .await
        .map_err(|e| match e {
            BrokerError::BadCursor => bad_cursor(),
            _ => unavailable(),
        })?;
    let members: Vec<Value> = page
        .members
        .iter()
        .filter_map(|(_, fragment)| serde_json::from_str(&format!("{{{fragment}}}")).ok())
        .collect();
    Ok(Json(json!({
        "roomId": room_json(&room),
        "num": page.num,
        "members": members,
        "nextCursor": page.next_cursor,
    }))
    .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HistoryQuery {
    after: Option<String>,
    limit: Option<usize>,
}

/// `GET /v1/rooms/{roomId}/messages?after=&limit=`: stored messages after an id, oldest first.
async fn history(
    State(node): State<Arc<Node>>,
    id: Result<Path<String>, PathRejection>,
    q: Result<Query<HistoryQuery>, QueryRejection>,
) -> ApiResult {
    let room = RoomId::from_key(&path_param(id, "roomId")?);
    let q = query(q)?;
    let max = node.config.sync_max as usize;
    let limit = limit(q.limit, HISTORY_DEFAULT.min(max), max)?;
    let after = match q.after.as_deref().map(str::parse::<StreamId>) {
        None => StreamId::ZERO,
        Some(Ok(id)) => id,
        Some(Err(())) => {
            return Err(bad_request(
                "invalid_field",
                "after must be a message id like 1700000000000-0",
            ))
        }
    };
    let mut page = if after.ms == u64::MAX && after.seq == u64::MAX {
        // Nothing can follow the largest id (and Redis refuses the range).
        crate::broker::Page::default()
    } else {
        node.broker
            .range(&Topic::Room(room.key.clone()), after, limit + 1)
            .await
            .map_err(|_| unavailable())?
    };
    let more = page.entries.len() > limit;
    page.entries.truncate(limit);
    let last = page.entries.last().map(|(id, _)| id.to_string());
    let messages: Vec<Value> = page
        .entries
        .iter()
        .filter_map(|(_, frame)| serde_json::from_str(frame).ok())
        .collect();
    Ok(Json(json!({
        "roomId": room_json(&room),
        "messages": messages,
        "lastId": last,
        "more": more,
        "truncated": page.truncated,
    }))
    .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RoomMessage {
    content: String,
    user_id: Option<String>,
    user_name: Option<String>,
    room_name: Option<String>,
    idempotency_key: Option<String>,
}

/// `POST /v1/rooms/{roomId}/messages`: publishes like a client's chat message.
async fn publish_to_room(
    State(node): State<Arc<Node>>,
    id: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let room = RoomId::from_key(&path_param(id, "roomId")?);
    let msg: RoomMessage = json_body(body)?;
    check_content(&node, &msg.content)?;
    check_opt_name("userId", &msg.user_id)?;
    check_opt_name("userName", &msg.user_name)?;
    check_opt_name("roomName", &msg.room_name)?;
    check_opt_name("idempotencyKey", &msg.idempotency_key)?;
    node.metrics.messages_received.inc();
    let user_id = msg
        .user_id
        .clone()
        .unwrap_or_else(|| node.config.api_user_id.clone());
    let user_name = msg.user_name.clone().unwrap_or_else(|| match &msg.user_id {
        Some(id) => id.clone(),
        None => node.config.api_user_name.clone(),
    });
    let room_name = msg.room_name.clone().unwrap_or_else(|| {
        let configured = node
            .default_rooms
            .iter()
            .find(|d| RoomId::parse(&d.room_id).is_ok_and(|r| r.key == room.key));
        configured.map_or_else(|| room.key.clone(), |d| d.room_name.clone())
    });
    let template = protocol::message_template(
        &protocol::room_fragment(&room, &room_name),
        &protocol::user_fragment(&user_id, &user_name),
        &msg.content,
        now_ms(),
        None,
    );
    let idempotency = msg
        .idempotency_key
        .as_ref()
        .map(|k| format!("{IDEMPOTENCY_PREFIX}{k}"));
    let request = Post::room_message(
        &room.key,
        &user_id,
        idempotency.as_deref(),
        &envelope(&node, Kind::Message),
        template,
        node.config.history_max_len,
    );
    append(&node, &request, ("roomId", room_json(&room))).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct DirectMessage {
    content: String,
    from_user_id: Option<String>,
    from_user_name: Option<String>,
    idempotency_key: Option<String>,
}

/// `POST /v1/users/{userId}/messages`: a direct message into the user's inbox.
async fn send_dm(
    State(node): State<Arc<Node>>,
    id: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let to = path_param(id, "userId")?;
    let msg: DirectMessage = json_body(body)?;
    check_content(&node, &msg.content)?;
    check_opt_name("fromUserId", &msg.from_user_id)?;
    check_opt_name("fromUserName", &msg.from_user_name)?;
    check_opt_name("idempotencyKey", &msg.idempotency_key)?;
    node.metrics.messages_received.inc();
    let from = msg
        .from_user_id
        .clone()
        .unwrap_or_else(|| node.config.api_user_id.clone());
    let from_name = msg
        .from_user_name
        .clone()
        .unwrap_or_else(|| match &msg.from_user_id {
            Some(id) => id.clone(),
            None => node.config.api_user_name.clone(),
        });
    let idempotency = msg
        .idempotency_key
        .as_ref()
        .map(|k| format!("{IDEMPOTENCY_PREFIX}{k}"));
    // The backend may write to users who never logged in (it knows its users): no "seen"
    // check; a full inbox still refuses (409) rather than evicting confirmed DMs.
    let request = Post::direct_message(
        &to,
        &from,
        idempotency.as_deref(),
        &envelope(&node, Kind::Direct),
        protocol::dm_rest(&from, &from_name, &to, &msg.content, now_ms(), None),
        node.config.inbox_max_len,
        false,
    );
    append(&node, &request, ("toUserId", json!(to))).await
}

/// Appends (stores and publishes) a message; answers 201 with its id, or 200 with the
/// original id for a repeated idempotency key. `target` names where it went.
async fn append(node: &Node, request: &Post, target: (&str, Value)) -> ApiResult {
    let appended = node.broker.append(request).await.map_err(|e| match e {
        BrokerError::Full => ApiError::new(
            StatusCode::CONFLICT,
            "inbox_full",
            "the user's inbox is full; nothing was sent",
        ),
        BrokerError::OutcomeUnknown(_) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "outcome_unknown",
            "the broker did not answer in time: the message may have been stored; retry with \
             the same idempotencyKey",
        ),
        _ => unavailable(),
    })?;
    let status = if appended.created {
        node.metrics.messages_published.inc();
        StatusCode::CREATED
    } else {
        node.metrics.dedup_hits.inc();
        StatusCode::OK
    };
    let mut body = json!({"id": appended.id.to_string(), "duplicate": !appended.created});
    body[target.0] = target.1;
    Ok((status, Json(body)).into_response())
}

/// `POST /v1/users/{userId}/disconnect`: closes the user's connections on every node (code
/// 4010). Fire and forget: nodes holding none of them ignore it.
async fn disconnect(
    State(node): State<Arc<Node>>,
    id: Result<Path<String>, PathRejection>,
) -> ApiResult {
    let user = path_param(id, "userId")?;
    let payload = format!(
        "{}{}",
        envelope(&node, Kind::Control).without_id(),
        r#"{"event":"disconnect"}"#
    );
    node.broker
        .publish(&Topic::User(user.clone()), &payload)
        .await
        .map_err(|_| unavailable())?;
    let body = json!({"userId": user, "closeCode": DISCONNECT_CODE});
    Ok((StatusCode::ACCEPTED, Json(body)).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_key_must_match_exactly() {
        let mut headers = HeaderMap::new();
        assert!(!bearer_matches(&headers, "0123456789abcdef"));
        headers.insert(
            header::AUTHORIZATION,
            "Bearer 0123456789abcdef".parse().unwrap(),
        );
        assert!(bearer_matches(&headers, "0123456789abcdef"));
        assert!(!bearer_matches(&headers, "0123456789abcdeg"));
        assert!(!bearer_matches(&headers, "0123456789abcdef0"));
        headers.insert(
            header::AUTHORIZATION,
            "Basic 0123456789abcdef".parse().unwrap(),
        );
        assert!(!bearer_matches(&headers, "0123456789abcdef"));
    }

    #[test]
    fn the_served_document_is_openapi_3_with_every_route() {
        let doc: Value = serde_json::from_str(OPENAPI).expect("openapi.json is JSON");
        assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
        for path in [
            "/v1/rooms",
            "/v1/rooms/{roomId}",
            "/v1/rooms/{roomId}/presence",
            "/v1/rooms/{roomId}/messages",
            "/v1/users/{userId}/messages",
            "/v1/users/{userId}/disconnect",
        ] {
            assert!(doc["paths"][path].is_object(), "{path} is not documented");
        }
    }
}
