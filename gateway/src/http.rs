//! HTTP: the public router (WebSocket upgrade at `/` and `/ws`, the chat page and client
//! module, the room API) and the admin router (`/healthz`, `/readyz`, `/metrics`, the server API
//! under `/v1/` from `api.rs`), which is never served on the public listener.

use std::net::IpAddr;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Extension;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::auth::{AuthError, Claims};
use crate::limits::CountGuard;
use crate::node::Node;
use crate::protocol::RoomId;
use crate::session::Connection;
use futures_util::future::Either;

mod upgrade;
use upgrade::WsUpgrade;

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

/// The client's TCP peer and what its address's upgrade rate said at accept, put into every
/// request's extensions by `serve_public`.
#[derive(Clone, Copy, Debug)]
pub struct Peer {
    pub addr: std::net::SocketAddr,
    pub rate: RateAtAccept,
}

/// A TCP connection's place in its address's upgrade rate, decided at accept: a direct peer
/// spends one token of `GATEWAY_MAX_UPGRADES_PER_IP_PER_SEC` per connection (a connection
/// carries at most one upgrade); a trusted proxy's clients spend theirs per upgrade request,
/// by their `X-Forwarded-For` address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RateAtAccept {
    Proxy,
    Within,
    /// Over the rate, within the answered refusals: an upgrade gets 429 `upgrade_rate`.
    Over,
}

/// Serves the public listener until `stop`: each TCP connection must finish its HTTP request
/// (or WebSocket upgrade) within GATEWAY_HANDSHAKE_TIMEOUT_MS, and holds one of
/// GATEWAY_MAX_PENDING_HANDSHAKES slots until then — a silent or half-sent socket can
/// neither stay nor crowd out real clients. (`axum::serve` sets no header timeout at all.)
pub async fn serve_public(
    listener: tokio::net::TcpListener,
    router: Router,
    node: Arc<Node>,
    stop: tokio_util::sync::CancellationToken,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::service::TowerToHyperService;
    use tower::ServiceExt;

    let deadline = node.config.handshake_timeout();
    loop {
        let (tcp, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, most likely: let some close before trying again.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Some(rate) = rate_at_accept(&node, &tcp, peer.ip()) else {
            continue;
        };
        let Ok(pending) = node.pending_handshakes.clone().try_acquire_owned() else {
            node.metrics
                .connections_refused
                .with_label_values(&["handshakes"])
                .inc();
            drop(tcp);
            continue;
        };
        // Chat frames are small writes: without TCP_NODELAY, Nagle's algorithm holds a frame
        // back until the previous one is acknowledged (up to the peer's 40 ms delayed ACK).
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!("TCP_NODELAY not set: {e}");
        }
        let service = router.clone().map_request(
            move |mut request: axum::extract::Request<hyper::body::Incoming>| {
                request.extensions_mut().insert(Peer { addr: peer, rate });
                request
            },
        );
        let node = node.clone();
        tokio::spawn(async move {
            // The deadline below covers the whole request (hyper's own header timeout would
            // not cover a socket that sends nothing at all).
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder.timer(TokioTimer::new()).header_read_timeout(None);
            let connection = builder
                .serve_connection(TokioIo::new(tcp), TowerToHyperService::new(service))
                .with_upgrades();
            // An upgraded connection's HTTP part ends with the upgrade; the WebSocket goes on
            // in its own task without this slot.
            if tokio::time::timeout(deadline, connection).await.is_err() {
                node.metrics.handshake_timeouts.inc();
            }
            drop(pending);
        });
    }
}

/// The answer to an address that goes on opening connections after its `upgrade_rate` 429s
/// (written without reading the request: it is the same for every request).
static UPGRADE_FLOOD_RESPONSE: std::sync::LazyLock<Vec<u8>> = std::sync::LazyLock::new(|| {
    let body = json!({
        "error": "too_many_connections",
        "reason": "upgrade_flood",
        "message": "this address goes on opening connections after being told to wait; \
                    retry after Retry-After",
    })
    .to_string();
    format!(
        "HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\n\
         retry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
});

/// Spends the connection's token of its address's upgrade rate. An address over its rate gets
/// up to that rate of answered refusals per second (HTTP 429 `upgrade_rate`); a client that
/// goes on connecting regardless (ignoring `Retry-After`) has each further connection answered
/// with a fixed 429 and closed right here (`None`), before any HTTP parsing: such an attempt
/// costs the node an accept, one write and a close instead of an HTTP exchange. Connections
/// from trusted proxies carry other clients and are never refused here (the proxy is expected
/// to limit its clients; the nginx template does).
fn rate_at_accept(node: &Node, tcp: &tokio::net::TcpStream, peer: IpAddr) -> Option<RateAtAccept> {
    if node.trusted_proxies.is_proxy(peer) {
        return Some(RateAtAccept::Proxy);
    }
    if node.upgrade_rate.take(peer) {
        return Some(RateAtAccept::Within);
    }
    if node.upgrade_refusals.take(peer) {
        return Some(RateAtAccept::Over);
    }
    node.metrics
        .connections_refused
        .with_label_values(&["upgrade_flood"])
        .inc();
    // Best effort, never waits: a full send buffer just means a bare close.
    let _ = tcp.try_write(&UPGRADE_FLOOD_RESPONSE);
    None
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
    peer: Option<Extension<Peer>>,
    headers: HeaderMap,
    uri: Uri,
    ws: Result<WsUpgrade, upgrade::NotAnUpgrade>,
) -> Response {
    match ws {
        Ok(ws) => accept(node, peer, &headers, &uri, ws),
        Err(_) => static_file("text/html; charset=utf-8", INDEX_HTML).await,
    }
}

async fn upgrade(
    State(node): State<Arc<Node>>,
    peer: Option<Extension<Peer>>,
    headers: HeaderMap,
    uri: Uri,
    ws: WsUpgrade,
) -> Response {
    accept(node, peer, &headers, &uri, ws)
}

/// The token of an HTTP request: `Authorization: Bearer …`, else `?token=…`.
fn request_token(headers: &HeaderMap, uri: &Uri) -> Option<String> {
    if let Some(value) = headers.get(header::AUTHORIZATION) {
        let value = value.to_str().ok()?;
        let (scheme, token) = value.split_once(' ')?;
        return scheme
            .eq_ignore_ascii_case("bearer")
            .then(|| token.trim().to_string());
    }
    let query = uri.query()?;
    query_token(query)
}

/// `token` from a query string (percent-decoded).
fn query_token(query: &str) -> Option<String> {
    #[derive(Deserialize)]
    struct TokenQuery {
        token: Option<String>,
    }
    Query::<TokenQuery>::try_from_uri(&format!("/?{query}").parse().ok()?)
        .ok()?
        .0
        .token
}

/// A refusal as HTTP: 401 for who the client is, 403 for what it asked; the body names the
/// reason category only.
fn refused(node: &Node, err: AuthError) -> Response {
    node.metrics
        .auth_failures
        .with_label_values(&[err.reason()])
        .inc();
    let (status, error) = if err.is_unauthorized() {
        (StatusCode::UNAUTHORIZED, "unauthorized")
    } else {
        (StatusCode::FORBIDDEN, "forbidden")
    };
    let mut response = (
        status,
        Json(json!({"error": error, "reason": err.reason(), "message": err.to_string()})),
    )
        .into_response();
    if status == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
    }
    response
}

/// Claims of a request's token when authentication is configured: `Ok(None)` in anonymous
/// mode; `Err` for a missing or bad token.
fn request_claims(
    node: &Node,
    headers: &HeaderMap,
    uri: &Uri,
) -> Result<Option<Claims>, AuthError> {
    let Some(auth) = &node.auth else {
        return Ok(None);
    };
    let token = request_token(headers, uri).ok_or(AuthError::Missing)?;
    auth.verify(&token).map(Some)
}

fn accept(
    node: Arc<Node>,
    peer: Option<Extension<Peer>>,
    headers: &HeaderMap,
    uri: &Uri,
    ws: WsUpgrade,
) -> Response {
    if node.shutdown.is_cancelled() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response();
    }
    let header_text = |name| {
        headers
            .get(name)
            .and_then(|v: &header::HeaderValue| v.to_str().ok())
    };
    if !node
        .origins
        .allows(header_text(header::ORIGIN), header_text(header::HOST))
    {
        return refused(&node, AuthError::Origin);
    }
    // A token on the upgrade is checked before upgrading; without one, the login frame must
    // bring it (when authentication is configured).
    let claims = match (&node.auth, request_token(headers, uri)) {
        (Some(auth), Some(token)) => match auth.verify(&token) {
            Ok(claims) => Some(claims),
            Err(err) => return refused(&node, err),
        },
        _ => None,
    };
    // One client address may open and hold only so many of this node's WebSockets.
    let address = match peer {
        Some(Extension(peer)) => {
            let forwarded = headers.get("x-forwarded-for").and_then(|v| v.to_str().ok());
            let client = node.trusted_proxies.client_ip(peer.addr.ip(), forwarded);
            match admit_address(&node, client, peer.rate) {
                Ok(slots) => Some(slots),
                Err(refusal) => return too_many(&node, refusal),
            }
        }
        None => None,
    };
    let max_message = node.config.max_message_bytes as usize;
    let tracker = node.sessions.clone();
    let max_waiting = node.config.outbound_queue as usize;
    ws.on_upgrade(max_message, max_waiting, move |mut socket| {
        let (client, address_slot, pending_login) = match address {
            Some(a) => (Some(a.client), Some(a.connection), Some(a.pending_login)),
            None => (None, None, None),
        };
        let serve = match node.admit_connection() {
            Some(slot) => {
                let connection =
                    Connection::new(slot, socket, claims, client, address_slot, pending_login);
                Either::Left(connection.run())
            }
            // Boxed: the task of every admitted connection would be as big as this otherwise.
            None => Either::Right(Box::pin(async move {
                node.metrics
                    .connections_closed
                    .with_label_values(&["connection_limit"])
                    .inc();
                let reason = "node at its connection limit; try again later";
                let _ = socket.close(1013, reason).await;
            })),
        };
        tracker.track_future(serve)
    })
}

/// A client address's places on this node, held by its WebSocket.
struct AddressSlots {
    client: IpAddr,
    connection: CountGuard<IpAddr>,
    /// Released by the session when the connection logs in.
    pending_login: CountGuard<IpAddr>,
}

/// Checks a client address's limits before an upgrade: cooldown after abuse, upgrade rate,
/// connections held, connections not logged in yet. Refusals are HTTP 429 with a JSON body
/// naming the reason (label `reason` of `gateway_connections_refused_total`).
fn admit_address(
    node: &Node,
    client: IpAddr,
    rate: RateAtAccept,
) -> Result<AddressSlots, AddressRefusal> {
    let config = &node.config;
    if !node.strikes.allows(client) {
        return Err(AddressRefusal {
            reason: "cooldown",
            message: "connections from this address were closed for abuse; try again later".into(),
            retry_after_secs: Some(config.abuse_cooldown_ms.div_ceil(1000)),
        });
    }
    let within_rate = match rate {
        RateAtAccept::Proxy => node.upgrade_rate.take(client),
        RateAtAccept::Within => true,
        RateAtAccept::Over => false,
    };
    if !within_rate {
        return Err(AddressRefusal {
            reason: "upgrade_rate",
            message: format!(
                "this address opens more than {} WebSockets per second on this node",
                config.max_upgrades_per_ip_per_sec
            ),
            retry_after_secs: Some(1),
        });
    }
    let Some(connection) = node.per_ip.acquire(client) else {
        return Err(AddressRefusal {
            reason: "per_ip",
            message: format!(
                "this address holds {} connections to this node already",
                config.max_connections_per_ip
            ),
            retry_after_secs: None,
        });
    };
    let Some(pending_login) = node.pending_logins.acquire(client) else {
        return Err(AddressRefusal {
            reason: "pending_logins",
            message: format!(
                "this address holds {} connections that have not logged in yet",
                config.max_pending_logins_per_ip
            ),
            retry_after_secs: None,
        });
    };
    Ok(AddressSlots {
        client,
        connection,
        pending_login,
    })
}

/// Why a client address may not open a WebSocket now.
struct AddressRefusal {
    /// Label of `gateway_connections_refused_total` and the body's `reason`.
    reason: &'static str,
    message: String,
    retry_after_secs: Option<u64>,
}

/// HTTP 429 `too_many_connections` for a refusal, counted.
fn too_many(node: &Node, refusal: AddressRefusal) -> Response {
    node.metrics
        .connections_refused
        .with_label_values(&[refusal.reason])
        .inc();
    let body = Json(json!({
        "error": "too_many_connections",
        "reason": refusal.reason,
        "message": refusal.message,
    }));
    match refusal.retry_after_secs {
        Some(secs) => (
            StatusCode::TOO_MANY_REQUESTS,
            [(header::RETRY_AFTER, secs.to_string())],
            body,
        )
            .into_response(),
        None => (StatusCode::TOO_MANY_REQUESTS, body).into_response(),
    }
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

/// `GET /api/rooms`: rooms with someone online, plus the configured default rooms. With
/// authentication configured it needs a token and lists only the rooms the token may join.
async fn list_rooms(State(node): State<Arc<Node>>, headers: HeaderMap, uri: Uri) -> Response {
    let claims = match request_claims(&node, &headers, &uri) {
        Ok(claims) => claims,
        Err(err) => return refused(&node, err),
    };
    let allowed = |key: &str| claims.as_ref().is_none_or(|c| c.allows_room(key));
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
        if !allowed(&key) {
            continue;
        }
        seen.insert(key);
        rooms.push(json!({"roomId": default.room_id, "roomName": default.room_name, "num": num}));
    }
    for room in live {
        if seen.contains(&room.room_key) || !allowed(&room.room_key) {
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
    /// Read by `request_token`; named here so the query still parses.
    #[allow(dead_code)]
    token: Option<String>,
}

/// `GET /api/rooms/{roomId}/members?limit=&cursor=`: online users, paginated. With
/// authentication configured, only for a token that may join the room (members are what its
/// login broadcasts would show anyway); in anonymous mode anyone may join any room, so the
/// list is public.
async fn room_members(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
    uri: Uri,
    Path(room_key): Path<String>,
    Query(query): Query<MembersQuery>,
) -> Response {
    if crate::protocol::check_name(&room_key).is_err() {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "invalid_field", "message": "bad room id"})),
        )
            .into_response();
    }
    match request_claims(&node, &headers, &uri) {
        Ok(Some(claims)) if !claims.allows_room(&room_key) => {
            return refused(&node, AuthError::Room)
        }
        Ok(_) => {}
        Err(err) => return refused(&node, err),
    }
    let limit = query
        .limit
        .unwrap_or(MEMBERS_PAGE_DEFAULT)
        .clamp(1, MEMBERS_PAGE_MAX);
    let bad_cursor = || {
        (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "invalid_field", "message": "cursor must be a nextCursor of this API"})),
        )
            .into_response()
    };
    if query
        .cursor
        .as_ref()
        .is_some_and(|c| crate::protocol::check_name(c).is_err())
    {
        return bad_cursor();
    }
    // The cursor is the broker's own: one it never handed out is a bad request.
    let page = match node
        .broker
        .members(&room_key, query.cursor.as_deref(), limit)
        .await
    {
        Ok(page) => page,
        Err(crate::broker::BrokerError::BadCursor) => return bad_cursor(),
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
