//! The WebSocket upgrade, done here rather than by axum: the session needs the connection's
//! TCP socket itself (its outlet writes into it from the dispatcher), not a stream wrapped
//! beyond reach.

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::{header, request::Parts, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::outlet::Outlet;
use crate::websocket::WebSocket;

/// A request to upgrade to a WebSocket (RFC 6455 over HTTP/1.1).
pub struct WsUpgrade {
    key: HeaderValue,
    on_upgrade: hyper::upgrade::OnUpgrade,
}

/// Why a request is not a WebSocket upgrade.
#[derive(Debug)]
pub struct NotAnUpgrade {
    status: StatusCode,
    reason: &'static str,
}

impl IntoResponse for NotAnUpgrade {
    fn into_response(self) -> Response {
        (self.status, self.reason).into_response()
    }
}

fn header_is(headers: &HeaderMap, name: header::HeaderName, value: &str) -> bool {
    headers
        .get(name)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(value.as_bytes()))
}

fn header_lists(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.to_str().is_ok_and(|v| {
            v.split(',')
                .any(|part| part.trim().eq_ignore_ascii_case(token))
        })
    })
}

impl<S: Send + Sync> FromRequestParts<S> for WsUpgrade {
    type Rejection = NotAnUpgrade;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, NotAnUpgrade> {
        let refuse = |status, reason| Err(NotAnUpgrade { status, reason });
        if parts.method != Method::GET {
            return refuse(
                StatusCode::METHOD_NOT_ALLOWED,
                "a WebSocket upgrade is a GET\n",
            );
        }
        let headers = &parts.headers;
        if !header_lists(headers, header::CONNECTION, "upgrade") {
            return refuse(StatusCode::BAD_REQUEST, "Connection must include upgrade\n");
        }
        if !header_is(headers, header::UPGRADE, "websocket") {
            return refuse(StatusCode::BAD_REQUEST, "Upgrade must be websocket\n");
        }
        if !header_is(headers, header::SEC_WEBSOCKET_VERSION, "13") {
            return refuse(
                StatusCode::BAD_REQUEST,
                "Sec-WebSocket-Version must be 13\n",
            );
        }
        let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY).cloned() else {
            return refuse(StatusCode::BAD_REQUEST, "Sec-WebSocket-Key is missing\n");
        };
        let Some(on_upgrade) = parts.extensions.remove::<hyper::upgrade::OnUpgrade>() else {
            return refuse(
                StatusCode::UPGRADE_REQUIRED,
                "this connection cannot upgrade\n",
            );
        };
        Ok(WsUpgrade { key, on_upgrade })
    }
}

impl WsUpgrade {
    /// Answers 101 and, once the HTTP layer hands the connection over, runs `session` on it.
    /// `max_message`: the largest message read from the client; `max_waiting`: frames its
    /// outlet may hold for a slow reader.
    pub fn on_upgrade<F, Fut>(self, max_message: usize, max_waiting: usize, session: F) -> Response
    where
        F: FnOnce(WebSocket) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let on_upgrade = self.on_upgrade;
        tokio::spawn(async move {
            let upgraded = match on_upgrade.await {
                Ok(upgraded) => upgraded,
                Err(e) => return tracing::debug!("the WebSocket upgrade failed: {e}"),
            };
            // Our listener serves plain TCP streams; anything else is a bug, not a client.
            let Ok(parts) = upgraded.downcast::<TokioIo<TcpStream>>() else {
                return tracing::error!("an upgraded connection that is not a TCP stream");
            };
            let outlet = Arc::new(Outlet::new(parts.io.into_inner(), max_waiting));
            // Bytes the client sent right behind its request are the WebSocket's first.
            let socket = WebSocket::new(outlet, &parts.read_buf, max_message);
            // The session gets a task of its own: this one's state (the upgrade, what the
            // session is made of) would stay in every connection's task for its whole life.
            tokio::spawn(session(socket));
        });
        let accept = tungstenite::handshake::derive_accept_key(self.key.as_bytes());
        (
            StatusCode::SWITCHING_PROTOCOLS,
            [
                (header::CONNECTION, "upgrade".to_string()),
                (header::UPGRADE, "websocket".to_string()),
                (header::SEC_WEBSOCKET_ACCEPT, accept),
            ],
        )
            .into_response()
    }
}
