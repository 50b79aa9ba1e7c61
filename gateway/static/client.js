// client.js: a small, dependency-free client for the chat gateway's WebSocket protocol
// (docs/protocol.md). Served by the gateway at /client.js; documented in docs/client.md.
//
//   import { ChatClient } from '/client.js';
//   const chat = new ChatClient({ userId: 'u-1', userName: 'Alice' });
//   chat.on('message', (m) => console.log(m.userName, m.content));
//   chat.on('state', (s) => console.log('connection', s));
//   chat.connect();
//   chat.join(1, 'Lobby');
//   chat.send(1, 'hello');  // stays "sending" until the server's copy confirms it
//
// What it does for you:
// - heartbeat every 25 s; no frame within the pong timeout closes the socket and reconnects;
// - reconnects with exponential backoff and jitter, and at once when the browser comes
//   back online;
// - logs in with acks on, resumes every joined room from the last id it has seen (`lastId`),
//   follows `synced` paging (`more: true` → `sync`), and drops any message it already has
//   (de-duplicated by id), so nothing is lost and nothing is shown twice;
// - acknowledges cumulatively (coalesced: the newest id at most every `ackDelayMs`, or at once
//   after `ackEvery` messages);
// - every message sent has a `clientMsgId`; it stays pending until the server's copy of it (or a
//   `sent` frame) confirms it, and is re-sent with the same `clientMsgId` after a reconnect or
//   when no confirmation came within `resendAfterMs`, so it is stored exactly once;
// - exposes the connection state: connecting, connected, reconnecting, offline, closed
//   (and `unauthorized`, see below).
//
// Authentication (gateways started with a JWT key, docs/protocol.md):
//
//   const chat = new ChatClient({
//     token,                                  // a JWT; userId and userName come from its
//                                             // `sub` and `name` claims
//     refreshToken: async () => (await fetch('/my-token')).text(),   // a new token, same sub
//   });
//
// - the token goes in every `login` frame (also the re-joins after a reconnect), never in the
//   URL;
// - with `refreshToken`, a new token is fetched and sent in a `refresh` frame before the
//   current one expires: at 80 % of its remaining lifetime or `refreshBeforeMs` (30 s) before
//   `exp`, whichever is sooner, but not before half of the remaining lifetime has passed (so
//   short-lived tokens are not refreshed in a tight loop); re-armed after every `refreshed`;
// - when the gateway closes the connection because the token expired (close code 4001), or
//   refuses a login with `unauthorized`/`expired`, `refreshToken()` is called and the client
//   reconnects / logs in again with the new token;
// - without `refreshToken` (or when it keeps failing), the state becomes `unauthorized`, an
//   `error` event says why, and the client stops reconnecting until `setToken()` gives it a
//   new token.

/** Connection states, in the order a session usually goes through them. */
export const STATES = Object.freeze({
  IDLE: 'idle',
  CONNECTING: 'connecting',
  CONNECTED: 'connected',
  RECONNECTING: 'reconnecting',
  OFFLINE: 'offline',
  UNAUTHORIZED: 'unauthorized',
  CLOSED: 'closed',
});

/** Close codes of the gateway (docs/protocol.md, "Close codes"). */
export const CLOSE_CODES = Object.freeze({
  NORMAL: 1000,
  TOO_BIG: 1009,
  SERVICE_RESTART: 1012,
  TRY_AGAIN_LATER: 1013,
  HEARTBEAT_TIMEOUT: 4000,
  TOKEN_EXPIRED: 4001,
  SLOW_CONSUMER: 4008,
  REDELIVERY_LIMIT: 4009,
});

// Errors after which re-sending the same frame cannot help.
const PERMANENT_SEND_ERRORS = new Set([
  'bad_json', 'not_object', 'missing_field', 'invalid_field', 'unknown_event',
  // Retrying the same send cannot help: the room or DMs are not allowed, the recipient's inbox
  // is full or the recipient unknown. (`outcome_unknown`, `unavailable`, `rate_limited` are
  // retried with the same clientMsgId.)
  'forbidden', 'inbox_full', 'unknown_user',
]);

/**
 * Parses a message id `"ms-seq"` (a Redis stream id) into `[ms, seq]` numbers.
 * `"0"`, `null` and `undefined` give `[0, 0]`.
 */
export function parseId(id) {
  if (id === null || id === undefined || id === '') return [0, 0];
  const text = String(id);
  const dash = text.indexOf('-');
  const ms = Number(dash < 0 ? text : text.slice(0, dash));
  const seq = dash < 0 ? 0 : Number(text.slice(dash + 1));
  return [Number.isFinite(ms) ? ms : 0, Number.isFinite(seq) ? seq : 0];
}

/**
 * Compares two message ids numerically by (ms, seq): negative when `a` is older than `b`,
 * 0 when equal, positive when newer. `null` sorts before every id.
 */
export function compareIds(a, b) {
  const [am, as] = parseId(a);
  const [bm, bs] = parseId(b);
  if (am !== bm) return am < bm ? -1 : 1;
  if (as !== bs) return as < bs ? -1 : 1;
  return 0;
}

/** The newer of two ids (either may be null). */
export function maxId(a, b) {
  if (a === null || a === undefined) return b ?? null;
  if (b === null || b === undefined) return a;
  return compareIds(a, b) >= 0 ? a : b;
}

/** The WebSocket URL of the page's own host: `ws(s)://host/ws`. */
export function defaultUrl(path = '/ws') {
  const loc = globalThis.location;
  if (!loc) throw new Error('ChatClient: no location; pass options.url');
  const scheme = loc.protocol === 'https:' ? 'wss:' : 'ws:';
  return `${scheme}//${loc.host}${path}`;
}

function randomToken() {
  const c = globalThis.crypto;
  if (c && typeof c.randomUUID === 'function') return c.randomUUID();
  if (c && typeof c.getRandomValues === 'function') {
    const b = c.getRandomValues(new Uint8Array(16));
    return Array.from(b, (x) => x.toString(16).padStart(2, '0')).join('');
  }
  return `${Date.now().toString(36)}-${Math.random().toString(36).slice(2)}`;
}

/**
 * The payload (claims) of a JWT, decoded without verifying anything (the gateway verifies):
 * `{sub, name, exp, ...}`, or null when `token` is not a JWT.
 */
export function decodeJwtPayload(token) {
  if (typeof token !== 'string') return null;
  const parts = token.split('.');
  if (parts.length !== 3) return null;
  try {
    let b64 = parts[1].replace(/-/g, '+').replace(/_/g, '/');
    b64 += '='.repeat((4 - (b64.length % 4)) % 4);
    const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
    const claims = JSON.parse(new TextDecoder().decode(bytes));
    return claims && typeof claims === 'object' && !Array.isArray(claims) ? claims : null;
  } catch {
    return null;
  }
}

/** Text form of a room id: the room's identity (`1` and `"1"` are the same room). */
export function roomKey(roomId) {
  return String(roomId);
}

const DEFAULTS = {
  url: null,
  heartbeatMs: 25000,
  pongTimeoutMs: 10000,
  connectTimeoutMs: 10000,
  backoffInitialMs: 500,
  backoffMaxMs: 15000,
  backoffFactor: 2,
  offlineAfterAttempts: 4,
  ackDelayMs: 200,
  ackEvery: 50,
  resendAfterMs: 10000,
  syncLimit: 500,
  seenLimit: 5000,
  maxFrameBytes: 65536,
  token: null,
  refreshToken: null,
  refreshBeforeMs: 30000,
  maxAuthRetries: 3,
  WebSocket: null,
  log: null,
};

/**
 * A chat connection with heartbeat, reconnect, resume, acks and reliable sends.
 *
 * Events (subscribe with `on(name, fn)`, which returns an unsubscribe function):
 * - `state`     (state, info)   connection state changed; info: {attempt, delayMs, code}
 * - `message`   (msg)           a room message seen for the first time (not your own pending
 *                               ones: those come as `confirmed`); msg.own, msg.replayed
 * - `confirmed` (pending)       one of your messages is stored; pending.id is its message id
 * - `pending`   (pending)       one of your messages changed status (sending/failed)
 * - `login`     (frame)         a user joined a room (frame.self: it is this connection;
 *                               frame.rejoin: this connection re-joined after a reconnect)
 * - `logout`    (frame)         a user left a room
 * - `num`       (roomId, num)   a room's online count changed
 * - `synced`    (frame)         a replay of a room finished (frame.truncated: history was lost)
 * - `dm`        (frame)         a direct message
 * - `error`     (frame)         an `error` frame from the server, or a client-side failure
 *                               (`refresh_failed`; `unauthorized` when the token expired and
 *                               could not be replaced)
 * - `refreshed` (frame)         the gateway accepted a new token (frame.exp: its expiry)
 * - `frame`     (frame)         every frame received (for debugging or extensions)
 */
export class ChatClient {
  /**
   * @param {object} options
   * @param {string} options.userId      stable id of this user (e.g. kept in localStorage);
   *                                     with a token: its `sub` (the default)
   * @param {string} options.userName    display name (with a token: its `name` claim, if any)
   * @param {string} [options.url]       WebSocket URL; default: same host, path /ws
   * @param {string} [options.token]     a JWT, sent in every login
   * @param {() => Promise<string>} [options.refreshToken]  returns a new token (same `sub`)
   */
  constructor(options = {}) {
    let claims = null;
    if (options.token) {
      claims = decodeJwtPayload(options.token);
      if (!claims || typeof claims.sub !== 'string' || !claims.sub) {
        throw new Error('ChatClient: token is not a JWT with a "sub" claim');
      }
      if (options.userId && String(options.userId) !== claims.sub) {
        throw new Error(`ChatClient: userId ${options.userId} is not the token's sub ${claims.sub}`);
      }
    }
    const userId = options.userId || claims?.sub;
    if (!userId) throw new Error('ChatClient: userId (or a token) is required');
    this.opts = { ...DEFAULTS, ...options };
    this.userId = String(userId);
    // The gateway names a token's user by its `name` claim when there is one.
    this.userName = String(claims?.name ?? options.userName ?? userId);
    this.token = options.token || null;
    this.tokenExp = typeof claims?.exp === 'number' ? claims.exp : null;
    this.tokenStale = false; // the gateway said the token expired (4001): replace before use
    this.refreshing = null; // the refreshToken() call in flight
    this.refreshTimer = null;
    this.refreshSent = false; // a refresh frame is waiting for its answer
    this.authRetries = 0;
    this.url = this.opts.url || defaultUrl();
    this.state = STATES.IDLE;
    this.ws = null;
    this.attempt = 0;
    this.rooms = new Map(); // roomKey -> room state
    this.outbox = new Map(); // clientMsgId -> pending message (insertion order = send order)
    this.handlers = new Map();
    this.timers = { reconnect: null, heartbeat: null, pong: null, connect: null, resend: null };
    this.connSeq = 0;
    this.clientMsgSeq = 0;
    this.sessionToken = randomToken().slice(0, 8);
    this.wanted = false; // connect() called and not close()d
    this._onOnline = () => this._browserOnline();
    this._onOffline = () => this._browserOffline();
  }

  // ---- events -------------------------------------------------------------------------

  /** Subscribes `fn` to `event`; returns a function that unsubscribes it. */
  on(event, fn) {
    if (!this.handlers.has(event)) this.handlers.set(event, new Set());
    this.handlers.get(event).add(fn);
    return () => this.off(event, fn);
  }

  off(event, fn) {
    this.handlers.get(event)?.delete(fn);
  }

  _emit(event, ...args) {
    const set = this.handlers.get(event);
    if (!set) return;
    for (const fn of [...set]) {
      try {
        fn(...args);
      } catch (err) {
        // A failing handler must not break the connection logic.
        (this.opts.log || console.error)('ChatClient handler failed', event, err);
      }
    }
  }

  _log(...args) {
    if (this.opts.log) this.opts.log(...args);
  }

  _setState(state, info = {}) {
    if (this.state === state) return;
    this.state = state;
    this._emit('state', state, info);
  }

  // ---- lifecycle ----------------------------------------------------------------------

  /** Opens the connection (and keeps it open until `close()`). */
  connect() {
    if (this.wanted) return this;
    this.wanted = true;
    if (typeof globalThis.addEventListener === 'function') {
      globalThis.addEventListener('online', this._onOnline);
      globalThis.addEventListener('offline', this._onOffline);
    }
    this._setState(STATES.CONNECTING);
    this._armRefresh();
    this._open();
    return this;
  }

  /** Closes the connection for good (pending messages stay in `pendingMessages()`). */
  close() {
    this.wanted = false;
    if (typeof globalThis.removeEventListener === 'function') {
      globalThis.removeEventListener('online', this._onOnline);
      globalThis.removeEventListener('offline', this._onOffline);
    }
    this._clearTimers();
    clearTimeout(this.refreshTimer);
    this.refreshTimer = null;
    for (const room of this.rooms.values()) this._clearAckTimer(room);
    const ws = this.ws;
    this.ws = null;
    if (ws) {
      this._detach(ws);
      try { ws.close(1000, 'bye'); } catch { /* already closed */ }
    }
    this._setState(STATES.CLOSED);
  }

  /** True when the socket is open and usable. */
  get connected() {
    return this.state === STATES.CONNECTED;
  }

  _open() {
    this._clearTimer('reconnect');
    if (!this.wanted) return;
    if (this.token && this._tokenNeedsRefresh()) {
      if (!this.opts.refreshToken) {
        if (this.tokenStale) {
          this._stopUnauthorized(CLOSE_CODES.TOKEN_EXPIRED, 'expired');
          return;
        }
        // Only our clock says it expired: the gateway (with its leeway) decides.
      } else {
        // Never log in with a token the gateway already called expired.
        this._refresh('reconnect').then((ok) => {
          if (!this.wanted || this.ws || this.state === STATES.UNAUTHORIZED) return;
          if (ok) this._open();
          else this._scheduleReconnect(CLOSE_CODES.TOKEN_EXPIRED);
        });
        return;
      }
    }
    const WS = this.opts.WebSocket || globalThis.WebSocket;
    let ws;
    try {
      ws = new WS(this.url);
    } catch (err) {
      this._log('connect failed', err);
      this._scheduleReconnect(null);
      return;
    }
    const seq = ++this.connSeq;
    ws._chatSeq = seq;
    this.ws = ws;
    this.healthy = false; // set once the server answers a login or a ping
    this.timers.connect = setTimeout(() => {
      // The upgrade hangs (e.g. a half-dead proxy): give up on this socket.
      if (this.ws === ws && ws.readyState !== 1) this._drop(ws, null);
    }, this.opts.connectTimeoutMs);
    ws.onopen = () => this._onOpen(ws);
    ws.onmessage = (ev) => this._onMessage(ws, ev);
    ws.onclose = (ev) => this._drop(ws, ev.code);
    ws.onerror = () => { /* onclose follows */ };
  }

  _detach(ws) {
    ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
  }

  _onOpen(ws) {
    if (this.ws !== ws) return;
    this.openedAt = Date.now();
    this._clearTimer('connect');
    this._setState(STATES.CONNECTED, { attempt: this.attempt });
    this._startHeartbeat();
    // Re-join every room (resuming from the last id seen), then re-send what is unconfirmed.
    for (const room of this.rooms.values()) {
      if (room.wanted) this._sendLogin(room);
    }
    for (const pending of this.outbox.values()) this._transmit(pending);
    this._armResend();
  }

  /** The socket is gone (closed, failed, or given up on): clean up and reconnect. */
  _drop(ws, code) {
    if (this.ws !== ws) return;
    this._detach(ws);
    try { ws.close(); } catch { /* ignore */ }
    this.ws = null;
    this._clearTimers();
    for (const room of this.rooms.values()) {
      this._clearAckTimer(room);
      room.joined = false;
      room.replaying = false;
      room.acked = null; // acks are per connection: the next one acks again
    }
    for (const pending of this.outbox.values()) pending.transmittedOn = 0;
    this.refreshSent = false;
    if (!this.wanted) return;
    if (code === CLOSE_CODES.TOKEN_EXPIRED) {
      // The token expired on this connection (no refresh came in time): replace it first.
      this.tokenStale = true;
      if (!this.opts.refreshToken) {
        this._stopUnauthorized(code, 'expired');
        return;
      }
    }
    // A connection that worked starts the backoff anew; one refused at once (e.g. 1013 from a
    // full node) keeps backing off.
    if (this.healthy || (this.openedAt && Date.now() - this.openedAt > 5000)) this.attempt = 0;
    this.openedAt = 0;
    this._scheduleReconnect(code);
  }

  _scheduleReconnect(code) {
    this._clearTimer('reconnect');
    const o = this.opts;
    const ceiling = Math.min(o.backoffMaxMs, o.backoffInitialMs * o.backoffFactor ** this.attempt);
    // Equal jitter (a random wait in [c/2, c]), so a whole cluster's clients do not reconnect
    // in step after a node dies.
    let delayMs = Math.round(ceiling / 2 + Math.random() * (ceiling / 2));
    if (this.attempt === 0 && code !== CLOSE_CODES.TRY_AGAIN_LATER) {
      // First retry after a working connection dropped: soon, but spread over the whole
      // initial window, not all at once.
      delayMs = Math.round(Math.random() * o.backoffInitialMs);
    }
    this.attempt += 1;
    const browserOffline = globalThis.navigator && globalThis.navigator.onLine === false;
    const state = browserOffline || this.attempt > o.offlineAfterAttempts
      ? STATES.OFFLINE : STATES.RECONNECTING;
    this._setState(state, { attempt: this.attempt, delayMs, code });
    this.nextRetryAt = Date.now() + delayMs;
    this.timers.reconnect = setTimeout(() => {
      this._setState(
        this.state === STATES.OFFLINE ? STATES.OFFLINE : STATES.RECONNECTING,
        { attempt: this.attempt },
      );
      this._open();
    }, delayMs);
  }

  /** Reconnects now (skipping the backoff wait), e.g. from a "retry" button. */
  reconnectNow() {
    if (!this.wanted || this.state === STATES.UNAUTHORIZED) return;
    if (this.ws && this.ws.readyState <= 1) return;
    this._open();
  }

  _browserOnline() {
    if (this.wanted && !this.ws && this.state !== STATES.UNAUTHORIZED) {
      this.attempt = 0;
      this._setState(STATES.RECONNECTING, { attempt: 0 });
      this._open();
    }
  }

  _browserOffline() {
    if (this.wanted && !this.ws && this.state !== STATES.UNAUTHORIZED) this._setState(STATES.OFFLINE, { attempt: this.attempt });
  }

  // ---- tokens -------------------------------------------------------------------------

  /** Server time in ms, estimated from the `ts` of messages (our clock until one came). */
  _serverNow() {
    return Date.now() + (this.clockOffset || 0);
  }

  _tokenNeedsRefresh() {
    if (this.tokenStale) return true;
    return this.tokenExp !== null && this.tokenExp * 1000 <= this._serverNow();
  }

  /**
   * Gives up on the connection until a new token comes (`setToken`): the token expired or was
   * refused and there is no way to get another.
   */
  _stopUnauthorized(code, reason) {
    this._clearTimers();
    clearTimeout(this.refreshTimer);
    this.refreshTimer = null;
    const ws = this.ws;
    this.ws = null;
    if (ws) {
      this._detach(ws);
      try { ws.close(1000, 'unauthorized'); } catch { /* ignore */ }
    }
    this._setState(STATES.UNAUTHORIZED, { attempt: this.attempt, code, reason });
    this._emit('error', {
      event: 'error',
      code: 'unauthorized',
      reason,
      message: reason === 'expired'
        ? 'the token expired and no new one could be obtained; call setToken() with a new token'
        : `the gateway refused the token (${reason}); call setToken() with a new token`,
      closeCode: code ?? undefined,
    });
  }

  /**
   * Takes a new token (same user): used for the next logins and, when connected, sent in a
   * `refresh` frame at once. Resumes a client stopped in state `unauthorized`. Returns false
   * (and emits `error`) when the token is unusable.
   */
  setToken(token) {
    if (!this._acceptToken(token)) return false;
    this._sendRefresh();
    this._armRefresh();
    if (this.wanted && this.state === STATES.UNAUTHORIZED) {
      this.attempt = 0;
      this.authRetries = 0;
      this._setState(STATES.RECONNECTING, { attempt: 0 });
      this._open();
    }
    return true;
  }

  /**
   * Fetches a new token with `refreshToken()` now and sends it (when connected). Resolves
   * true when a new token is in place.
   */
  refreshNow() {
    return this._refresh('manual');
  }

  _acceptToken(token) {
    const claims = decodeJwtPayload(token);
    let problem = null;
    if (!claims || typeof claims.sub !== 'string') problem = 'not a JWT with a "sub" claim';
    else if (claims.sub !== this.userId) problem = `the token is for ${claims.sub}, not ${this.userId}`;
    else if (typeof claims.exp === 'number' && this.tokenExp !== null && claims.exp < this.tokenExp) {
      problem = 'the new token expires before the current one';
    }
    if (problem) {
      this._emit('error', { event: 'error', code: 'refresh_failed', message: `new token refused: ${problem}` });
      return false;
    }
    this.token = token;
    this.tokenExp = typeof claims.exp === 'number' ? claims.exp : null;
    this.tokenStale = false;
    return true;
  }

  _sendRefresh() {
    if (this.token && this._raw({ event: 'refresh', token: this.token })) this.refreshSent = true;
  }

  /** Calls refreshToken() (one call at a time); resolves true with a new token in place. */
  _refresh(why) {
    if (this.refreshing) return this.refreshing;
    const fetchToken = this.opts.refreshToken;
    if (!fetchToken || !this.token) return Promise.resolve(false);
    clearTimeout(this.refreshTimer);
    this.refreshTimer = null;
    this._log('refreshing token', why);
    this.refreshing = (async () => {
      let token;
      try {
        token = await fetchToken();
      } catch (err) {
        this._emit('error', {
          event: 'error', code: 'refresh_failed', message: `refreshToken() failed: ${err?.message ?? err}`,
        });
        this._armRefreshRetry();
        return false;
      }
      if (!this._acceptToken(typeof token === 'string' ? token.trim() : token)) {
        this._armRefreshRetry();
        return false;
      }
      this._sendRefresh();
      this._armRefresh();
      return true;
    })().finally(() => {
      this.refreshing = null;
    });
    return this.refreshing;
  }

  /** Schedules the next proactive refresh from the current token's `exp`. */
  _armRefresh() {
    clearTimeout(this.refreshTimer);
    this.refreshTimer = null;
    if (!this.wanted || !this.token || !this.opts.refreshToken || this.tokenExp === null) return;
    const left = this.tokenExp * 1000 - this._serverNow();
    // Already expired: the gateway's 4001 or its `expired` answer leads to a refresh.
    if (left <= 0) return;
    const delay = Math.max(0, Math.min(0.8 * left, left - this.opts.refreshBeforeMs), 0.5 * left);
    this.refreshTimer = setTimeout(() => {
      this.refreshTimer = null;
      this._refresh('timer');
    }, Math.min(delay, 2 ** 31 - 1));
  }

  /** After a failed refresh: try again in a while if the token still has time left. */
  _armRefreshRetry() {
    clearTimeout(this.refreshTimer);
    this.refreshTimer = null;
    if (!this.wanted || this.tokenExp === null) return;
    const left = this.tokenExp * 1000 - this._serverNow();
    if (left <= 0) return;
    const delay = Math.min(30000, Math.max(1000, left / 4));
    this.refreshTimer = setTimeout(() => {
      this.refreshTimer = null;
      this._refresh('retry');
    }, delay);
  }

  _onRefreshed(frame) {
    this.refreshSent = false;
    if (typeof frame.exp === 'number') this.tokenExp = Math.max(this.tokenExp ?? 0, frame.exp);
    this._armRefresh();
    this._emit('refreshed', frame);
  }

  /** An `unauthorized`/`forbidden` error frame: a refused login or refresh. */
  _onAuthError(frame) {
    if (frame.roomId !== undefined) {
      // A refused login (a chat frame to a room not joined is `not_in_room`).
      if (frame.code !== 'unauthorized' || frame.reason !== 'expired' || !this.token) return;
      const room = this._room(frame.roomId);
      if (!room || !room.wanted) return;
      if (!this.opts.refreshToken) {
        this.tokenStale = true;
        this._stopUnauthorized(null, 'expired');
        return;
      }
      this.authRetries += 1;
      if (this.authRetries > this.opts.maxAuthRetries) {
        this._stopUnauthorized(null, 'expired');
        return;
      }
      this.tokenStale = true;
      const ws = this.ws;
      this._refresh('login expired').then((ok) => {
        if (ok && this.ws === ws && room.wanted && !room.joined && this.rooms.get(roomKey(room.roomId)) === room) {
          this._sendLogin(room);
        }
      });
    } else if (this.refreshSent) {
      // Our refresh frame was refused (e.g. an expired or foreign token): try again later.
      this.refreshSent = false;
      this._armRefreshRetry();
    }
  }

  // ---- timers -------------------------------------------------------------------------

  _clearTimer(name) {
    if (this.timers[name]) {
      clearTimeout(this.timers[name]);
      clearInterval(this.timers[name]);
      this.timers[name] = null;
    }
  }

  _clearTimers() {
    for (const name of Object.keys(this.timers)) this._clearTimer(name);
  }

  _startHeartbeat() {
    this._clearTimer('heartbeat');
    this._clearTimer('pong');
    this.timers.heartbeat = setInterval(() => {
      const ws = this.ws;
      if (!ws || ws.readyState !== 1) return;
      this._raw({ event: 'heartBeat', content: 'ping' });
      if (!this.timers.pong) {
        this.timers.pong = setTimeout(() => {
          this._log('heartbeat timeout');
          this._drop(ws, CLOSE_CODES.HEARTBEAT_TIMEOUT);
        }, this.opts.pongTimeoutMs);
      }
    }, this.opts.heartbeatMs);
  }

  // ---- sending ------------------------------------------------------------------------

  _raw(frame) {
    const ws = this.ws;
    if (!ws || ws.readyState !== 1) return false;
    try {
      ws.send(JSON.stringify(frame));
      return true;
    } catch (err) {
      this._log('send failed', err);
      return false;
    }
  }

  _room(roomId) {
    return this.rooms.get(roomKey(roomId));
  }

  /**
   * Joins a room (sends `login` now or after the next connect). Optional `lastId` resumes
   * from that id (e.g. one kept from an earlier visit); otherwise the server uses the user's
   * stored acknowledged position, if any.
   */
  join(roomId, roomName, { lastId = null } = {}) {
    const key = roomKey(roomId);
    let room = this.rooms.get(key);
    if (!room) {
      room = {
        roomId,
        roomName: roomName ?? key,
        lastId: null,
        acked: null,
        ackTimer: null,
        pendingAck: null,
        forceAck: false,
        unacked: 0,
        seen: new Set(),
        seenOrder: [],
        floor: null,
        num: null,
        joined: false,
        wanted: true,
        replaying: false,
        everJoined: false,
        joinedAt: Date.now(),
      };
      this.rooms.set(key, room);
    }
    room.wanted = true;
    if (roomName !== undefined) room.roomName = roomName;
    if (lastId) {
      room.lastId = maxId(room.lastId, lastId);
      room.floor = maxId(room.floor, lastId);
    }
    if (this.ws && this.ws.readyState === 1) this._sendLogin(room);
    return room;
  }

  /** Leaves a room (sends `logout`) and forgets its position and its pending messages. */
  leave(roomId) {
    const key = roomKey(roomId);
    const room = this.rooms.get(key);
    if (!room) return;
    this._flushAck(room);
    this._clearAckTimer(room);
    this.rooms.delete(key);
    for (const [id, pending] of this.outbox) {
      if (roomKey(pending.roomId) === key) this.outbox.delete(id);
    }
    this._raw({ event: 'logout', roomId: room.roomId });
  }

  /** The last message id seen in a room (null before any), for keeping across page loads. */
  lastId(roomId) {
    return this._room(roomId)?.lastId ?? null;
  }

  /** A room's online count as last reported by the server (null when unknown). */
  num(roomId) {
    return this._room(roomId)?.num ?? null;
  }

  _sendLogin(room) {
    const frame = {
      event: 'login',
      userId: this.userId,
      userName: this.userName,
      roomId: room.roomId,
      roomName: room.roomName,
      ack: true,
    };
    if (this.token) frame.token = this.token;
    let since = room.lastId;
    if (!since && room.everJoined && room.baseline) {
      // Joined before but saw no message: resume from when we joined, so messages sent while
      // the connection was down are not lost.
      since = room.baseline;
    }
    if (since) {
      frame.lastId = since;
      room.replaying = true;
    }
    room.rejoin = room.everJoined;
    this._raw(frame);
  }

  _nextClientMsgId() {
    this.clientMsgSeq += 1;
    return `${this.userId.slice(0, 40)}.${this.sessionToken}.${Date.now().toString(36)}.${this.clientMsgSeq}`;
  }

  /**
   * Sends a chat message to a joined room. Returns the pending message:
   * `{clientMsgId, roomId, content, status: 'sending'|'sent'|'failed', id, error, promise}`;
   * `promise` resolves with the message id once the server confirms it, or rejects when the
   * server refuses it for good (e.g. `invalid_field`). Messages sent while disconnected are
   * queued and sent after the reconnect.
   */
  send(roomId, content, { clientMsgId } = {}) {
    const room = this._room(roomId);
    if (!room) throw new Error(`ChatClient.send: join room ${roomKey(roomId)} first`);
    const text = String(content);
    const pending = {
      clientMsgId: clientMsgId || this._nextClientMsgId(),
      roomId: room.roomId,
      content: text,
      userId: this.userId,
      userName: this.userName,
      status: 'sending',
      id: null,
      error: null,
      createdAt: Date.now(),
      transmittedOn: 0,
      transmittedAt: 0,
      tries: 0,
    };
    pending.promise = new Promise((resolve, reject) => {
      pending._resolve = resolve;
      pending._reject = reject;
    });
    pending.promise.catch(() => {}); // no unhandled rejection if nobody awaits it
    const bytes = new TextEncoder().encode(JSON.stringify(this._chatFrame(pending))).length;
    if (bytes > this.opts.maxFrameBytes) {
      this._fail(pending, { code: 'too_big', message: `message too long (${bytes} bytes)` });
      return pending;
    }
    this.outbox.set(pending.clientMsgId, pending);
    this._emit('pending', pending);
    this._transmit(pending);
    this._armResend();
    return pending;
  }

  /** Unconfirmed messages, oldest first. */
  pendingMessages() {
    return [...this.outbox.values()];
  }

  /** Re-sends a failed message with the same clientMsgId. */
  retry(clientMsgId) {
    const pending = this.outbox.get(clientMsgId);
    if (!pending) return;
    pending.status = 'sending';
    pending.error = null;
    this._emit('pending', pending);
    this._transmit(pending);
  }

  _chatFrame(p) {
    return { roomId: p.roomId, content: p.content, clientMsgId: p.clientMsgId };
  }

  _transmit(pending) {
    if (pending.status === 'failed') return;
    const room = this._room(pending.roomId);
    if (!room || !room.wanted) return;
    if (this._raw(this._chatFrame(pending))) {
      pending.transmittedOn = this.ws._chatSeq;
      pending.transmittedAt = Date.now();
      pending.tries += 1;
    }
  }

  _armResend() {
    if (this.timers.resend || this.outbox.size === 0) return;
    const every = Math.max(500, Math.floor(this.opts.resendAfterMs / 4));
    this.timers.resend = setInterval(() => {
      if (this.outbox.size === 0) {
        this._clearTimer('resend');
        return;
      }
      const now = Date.now();
      for (const p of this.outbox.values()) {
        // Same clientMsgId: the server stores it at most once.
        if (p.status === 'sending' && now - p.transmittedAt >= this.opts.resendAfterMs) {
          this._transmit(p);
        }
      }
    }, every);
  }

  _confirm(pending, id) {
    if (pending.status === 'sent') return;
    pending.status = 'sent';
    pending.id = id;
    this.outbox.delete(pending.clientMsgId);
    this._emit('confirmed', pending);
    pending._resolve(id);
  }

  _fail(pending, err) {
    pending.status = 'failed';
    pending.error = err;
    this._emit('pending', pending);
    pending._reject(Object.assign(new Error(err.message || err.code), { code: err.code }));
  }

  /** Sends a direct message (no retry bookkeeping: `dmSent` arrives as a `frame` event). */
  sendDm(toUserId, content, { clientMsgId } = {}) {
    return this._raw({
      event: 'dm', toUserId, content, clientMsgId: clientMsgId || this._nextClientMsgId(),
    });
  }

  // ---- receiving ----------------------------------------------------------------------

  _onMessage(ws, ev) {
    if (this.ws !== ws) return;
    // Any frame is a sign of life.
    this._clearTimer('pong');
    let frame;
    try {
      frame = JSON.parse(ev.data);
    } catch {
      return;
    }
    if (!frame || typeof frame !== 'object') return;
    this._emit('frame', frame);
    const event = frame.event ?? 'message';
    switch (event) {
      case 'heartBeat':
        this.healthy = true;
        return;
      case 'message':
        return this._onChat(frame);
      case 'login':
        return this._onLogin(frame);
      case 'logout':
        return this._onLogout(frame);
      case 'sent':
        return this._onSent(frame);
      case 'synced':
        return this._onSynced(frame);
      case 'error':
        return this._onError(frame);
      case 'refreshed':
        return this._onRefreshed(frame);
      case 'dm':
        if (frame.id) this._raw({ event: 'ack', dm: true, id: frame.id });
        return this._emit('dm', frame);
      case 'resync':
        // The gateway lost messages of this room (or the inbox) for good, after lastId: the
        // application may reload what it shows. Nothing to do for delivery itself.
        return this._emit('resync', frame);
      default:
    }
  }

  _setNum(room, num) {
    if (typeof num !== 'number' || room.num === num) return;
    room.num = num;
    this._emit('num', room.roomId, num);
  }

  _markSeen(room, id) {
    room.seen.add(id);
    room.seenOrder.push(id);
    if (room.seenOrder.length > this.opts.seenLimit) {
      const old = room.seenOrder.splice(0, room.seenOrder.length - this.opts.seenLimit);
      for (const o of old) {
        room.seen.delete(o);
        room.floor = maxId(room.floor, o);
      }
    }
  }

  _isDuplicate(room, id) {
    if (room.seen.has(id)) return true;
    return room.floor !== null && compareIds(id, room.floor) <= 0;
  }

  _onChat(frame) {
    const room = this._room(frame.roomId);
    if (!room || frame.id === undefined || frame.id === null) return;
    const id = String(frame.id);
    if (typeof frame.ts === 'number') this.clockOffset = frame.ts - Date.now();
    if (this._isDuplicate(room, id)) {
      // A redelivery: the server did not get (or not yet) our ack; ack again.
      room.forceAck = true;
      this._scheduleAck(room, id, false);
      return;
    }
    this._markSeen(room, id);
    room.lastId = maxId(room.lastId, id);
    if (!room.replaying) this._setNum(room, frame.num);
    const own = frame.userId === this.userId;
    const pending = own && frame.clientMsgId ? this.outbox.get(frame.clientMsgId) : null;
    const msg = { ...frame, id, own, replayed: room.replaying };
    if (pending) {
      this._confirm(pending, id);
    } else if (!(own && frame.clientMsgId && this._confirmedIds?.has(frame.clientMsgId))) {
      this._emit('message', msg);
    }
    if (own && frame.clientMsgId) this._rememberConfirmed(frame.clientMsgId);
    this._scheduleAck(room, id, true);
  }

  _rememberConfirmed(clientMsgId) {
    if (!this._confirmedIds) this._confirmedIds = new Set();
    this._confirmedIds.add(clientMsgId);
    if (this._confirmedIds.size > 2000) {
      const first = this._confirmedIds.values().next().value;
      this._confirmedIds.delete(first);
    }
  }

  _onSent(frame) {
    const pending = frame.clientMsgId ? this.outbox.get(frame.clientMsgId) : null;
    if (!pending) return;
    // A duplicate: the message was stored earlier (its copy may come in the replay; it is
    // recognised by clientMsgId and not shown again).
    this._rememberConfirmed(frame.clientMsgId);
    this._confirm(pending, frame.id ? String(frame.id) : null);
  }

  _onLogin(frame) {
    const room = this._room(frame.roomId);
    if (!room) return;
    this._setNum(room, frame.num);
    const self = frame.userId === this.userId;
    let rejoin = false;
    if (self) this.healthy = true;
    if (self && !room.joined) {
      room.joined = true;
      this.authRetries = 0;
      rejoin = !!room.rejoin;
      if (room.pendingAck) this._scheduleAck(room, room.pendingAck, false);
      if (!room.everJoined) {
        room.everJoined = true;
        // Server time of the join (estimated): a resume point if no message is ever seen.
        const now = Date.now() + (this.clockOffset || 0) - 2000;
        room.baseline = room.baseline || `${Math.max(0, now)}-0`;
      }
    }
    this._emit('login', { ...frame, self, rejoin });
  }

  _onLogout(frame) {
    const room = this._room(frame.roomId);
    if (!room) return;
    this._setNum(room, frame.num);
    this._emit('logout', { ...frame, self: frame.userId === this.userId });
  }

  _onSynced(frame) {
    if (frame.dm) return this._emit('synced', frame);
    const room = this._room(frame.roomId);
    if (!room) return;
    if (frame.lastId) {
      room.lastId = maxId(room.lastId, String(frame.lastId));
      room.baseline = room.baseline || String(frame.lastId);
    }
    if (frame.more) {
      room.replaying = true;
      this._raw({
        event: 'sync', roomId: room.roomId, since: room.lastId ?? frame.lastId,
        limit: this.opts.syncLimit,
      });
    } else {
      room.replaying = false;
      this._flushAck(room);
    }
    this._emit('synced', frame);
  }

  _onError(frame) {
    const pending = frame.clientMsgId ? this.outbox.get(frame.clientMsgId) : null;
    if (pending) {
      if (PERMANENT_SEND_ERRORS.has(frame.code)) {
        this.outbox.delete(pending.clientMsgId);
        this._fail(pending, frame);
      } else {
        // `unavailable`, `internal`, `not_in_room` (e.g. a re-login still in flight): the
        // resend timer tries again with the same clientMsgId.
        pending.transmittedAt = Date.now() - this.opts.resendAfterMs + 1000;
      }
    }
    if (frame.code === 'unauthorized' || frame.code === 'forbidden') this._onAuthError(frame);
    this._emit('error', frame);
  }

  // ---- acks ---------------------------------------------------------------------------

  _scheduleAck(room, id, counted) {
    room.pendingAck = maxId(room.pendingAck, id);
    if (counted) room.unacked += 1;
    if (room.unacked >= this.opts.ackEvery) {
      this._flushAck(room);
      return;
    }
    if (!room.ackTimer) {
      room.ackTimer = setTimeout(() => {
        room.ackTimer = null;
        this._flushAck(room);
      }, this.opts.ackDelayMs);
    }
  }

  _clearAckTimer(room) {
    if (room.ackTimer) clearTimeout(room.ackTimer);
    room.ackTimer = null;
  }

  _flushAck(room) {
    this._clearAckTimer(room);
    const id = room.pendingAck;
    if (!id) return;
    if (!room.forceAck && room.acked && compareIds(id, room.acked) <= 0) return;
    if (this._raw({ event: 'ack', roomId: room.roomId, id })) {
      room.acked = id;
      room.unacked = 0;
      room.forceAck = false;
    }
  }
}

export default ChatClient;
