// app.js: the chat page (served at /). Plain DOM, no framework, no build step.
// The connection logic lives in /client.js (docs/client.md); this file only draws.
//
// Signed-in use (a gateway with a JWT key): open the page as `/?token=<JWT>`, optionally with
// `&tokenUrl=<same-origin URL>` that answers a fresh token (as text, or JSON `{"token": …}`);
// the page then is the token's user (`sub`, `name`), sends the token in its logins and to
// /api/rooms, and renews it from tokenUrl before it expires. Both are moved out of the address
// bar into sessionStorage (this tab only), so a reload keeps them and they do not linger in
// the history. Without a token the page is anonymous, as before.
import { ChatClient, roomKey, decodeJwtPayload } from '/client.js';

const $ = (id) => document.getElementById(id);
const ROOM_POLL_MS = 5000;
const BOTTOM_SLACK_PX = 50;

const STATE_LABELS = {
  idle: '未连接',
  connecting: '连接中…',
  connected: '已连接',
  reconnecting: '重连中…',
  offline: '离线',
  unauthorized: '登录已过期',
  closed: '已断开',
};

const store = {
  get(key) {
    try { return localStorage.getItem(key); } catch { return null; }
  },
  set(key, value) {
    try { localStorage.setItem(key, value); } catch { /* private mode: keep in memory */ }
  },
};

const session = {
  get(key) {
    try { return sessionStorage.getItem(key); } catch { return null; }
  },
  set(key, value) {
    try {
      if (value === null) sessionStorage.removeItem(key);
      else sessionStorage.setItem(key, value);
    } catch { /* storage disabled: the token lives in memory only */ }
  },
};

/**
 * The sign-in of this tab: `?token=` (and `&tokenUrl=`) from the address, moved into
 * sessionStorage; else what an earlier load of this tab stored. Null when anonymous.
 */
function takeAuth() {
  const url = new URL(window.location.href);
  const fromUrl = url.searchParams.get('token');
  if (fromUrl !== null) {
    session.set('chat.token', fromUrl.trim() || null);
    session.set('chat.tokenUrl', url.searchParams.get('tokenUrl'));
    url.searchParams.delete('token');
    url.searchParams.delete('tokenUrl');
    try { history.replaceState(history.state, '', url.pathname + url.search + url.hash); } catch { /* ignore */ }
  }
  const token = session.get('chat.token');
  if (!token) return null;
  const claims = decodeJwtPayload(token);
  if (!claims || typeof claims.sub !== 'string' || !claims.sub) {
    console.warn('chat: the token is not a JWT with a sub claim; staying anonymous');
    session.set('chat.token', null);
    return null;
  }
  let tokenUrl = session.get('chat.tokenUrl');
  if (tokenUrl) {
    try {
      const resolved = new URL(tokenUrl, window.location.href);
      // Only our own origin: the token must never be fetched from (or sent to) elsewhere.
      tokenUrl = resolved.origin === window.location.origin ? resolved.href : null;
    } catch {
      tokenUrl = null;
    }
    if (!tokenUrl) console.warn('chat: tokenUrl is not on this origin; ignored');
  }
  return { token, claims, tokenUrl };
}

/** Fetches a fresh token from the same-origin tokenUrl (text, or JSON {token}). */
async function fetchToken(tokenUrl) {
  const res = await fetch(tokenUrl, { cache: 'no-store', credentials: 'same-origin' });
  if (!res.ok) throw new Error(`tokenUrl: HTTP ${res.status}`);
  const text = (await res.text()).trim();
  let token = text;
  if (text.startsWith('{')) token = JSON.parse(text).token;
  if (typeof token !== 'string' || !token) throw new Error('tokenUrl: no token in the answer');
  session.set('chat.token', token);
  return token;
}

function newUserId() {
  const c = globalThis.crypto;
  const rand = c && c.randomUUID ? c.randomUUID()
    : `${Date.now().toString(36)}${Math.random().toString(36).slice(2)}`;
  return `u-${rand}`;
}

const auth = takeAuth();
const anonymousId = store.get('chat.userId') || newUserId();
const app = {
  auth, // { token, claims, tokenUrl } when signed in with a token
  // Signed in, the token's subject is the user; its `name`, if any, is the nickname.
  userId: auth ? auth.claims.sub : anonymousId,
  nickname: (auth && typeof auth.claims.name === 'string' && auth.claims.name)
    || store.get('chat.nickname') || '',
  client: null,
  rooms: [], // from /api/rooms
  current: null, // { roomId, roomName }
  pinned: true, // the message list follows the newest message
  bubbles: new Map(), // clientMsgId -> <li> of an own message
  shownIds: new Set(), // message ids on screen (second guard against doubles)
  roomTimer: null,
};
store.set('chat.userId', anonymousId);
window.chatApp = app; // for debugging in the console

// ---- small helpers -------------------------------------------------------------------

let toastTimer = null;
function toast(text, ms = 1500) {
  const el = $('toast');
  el.textContent = text;
  el.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => { el.hidden = true; }, ms);
}

function hash(text) {
  let h = 2166136261;
  for (const ch of String(text)) h = Math.imul(h ^ ch.codePointAt(0), 16777619);
  return h >>> 0;
}
const CARD_COLORS = ['#3d8eb9', '#e0795b', '#6aa84f', '#8e6cc2', '#d4a017', '#2f9e9e', '#c75b8e', '#5b6fc7'];
const CARD_PICS = ['💬', '🎮', '🎵', '📚', '☕', '🌏', '🐱', '⚽'];

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

// ---- connection ----------------------------------------------------------------------

function showState(state) {
  const badge = $('conn-state');
  badge.dataset.state = state;
  badge.textContent = STATE_LABELS[state] || state;
  badge.title = `connection: ${state}`;
}

/** The current token (the client's, refreshed) when signed in, else null. */
function currentToken() {
  return app.auth ? (app.client?.token ?? app.auth.token) : null;
}

/** fetch() of an API path, with the token when signed in. */
function apiFetch(path) {
  const token = currentToken();
  const headers = token ? { Authorization: `Bearer ${token}` } : {};
  return fetch(path, { cache: 'no-store', headers });
}

/** A refused API call: a 401 for an expired token asks the client for a new one. */
async function apiError(res) {
  let reason = '';
  try { reason = (await res.json()).reason ?? ''; } catch { /* not JSON */ }
  if (res.status === 401 && reason === 'expired' && app.client && app.auth?.tokenUrl) {
    app.client.refreshNow();
  }
  return new Error(`HTTP ${res.status}${reason ? ` ${reason}` : ''}`);
}

function startClient() {
  if (app.client) app.client.close();
  const options = { userId: app.userId, userName: app.nickname };
  if (app.auth) {
    options.token = currentToken();
    if (app.auth.tokenUrl) options.refreshToken = () => fetchToken(app.auth.tokenUrl);
  }
  const client = new ChatClient(options);
  app.client = client;
  client.on('state', (state) => showState(state));
  client.on('login', (f) => {
    if (!isCurrent(f.roomId)) return;
    if (f.self && f.rejoin) return; // our own re-join after a reconnect: nothing new to say
    addNotice(`欢迎${f.userName}进入${f.roomName ?? app.current.roomName}房间~`);
  });
  client.on('logout', (f) => {
    if (!isCurrent(f.roomId) || f.self) return;
    addNotice(`${f.userName}离开房间`);
  });
  client.on('num', (roomId, num) => {
    if (isCurrent(roomId)) $('online-num').textContent = String(num);
  });
  client.on('message', (m) => {
    if (isCurrent(m.roomId)) addMessage(m);
  });
  client.on('confirmed', (p) => updateBubble(p));
  client.on('pending', (p) => updateBubble(p));
  client.on('synced', (f) => {
    if (f.truncated && isCurrent(f.roomId)) addNotice('部分较早的消息已过期,无法补齐', 'warn');
  });
  client.on('error', (f) => {
    if (f.code === 'too_many_rooms' || f.code === 'identity_mismatch') toast(f.message || f.code, 3000);
    if (f.code === 'unauthorized' || f.code === 'forbidden') {
      const why = f.reason === 'expired' ? '登录已过期' : f.code === 'forbidden' ? '没有权限' : '未登录';
      toast(`${why}(${f.reason ?? f.code})`, 3000);
    }
  });
  client.on('refreshed', () => session.set('chat.token', client.token));
  showState(client.state);
  client.connect();
}

function isCurrent(roomId) {
  return app.current !== null && roomKey(roomId) === roomKey(app.current.roomId);
}

// ---- home: nickname and rooms --------------------------------------------------------

/** The token's `name` is the nickname: it cannot be changed on the page. */
function nameFromToken() {
  return !!(app.auth && typeof app.auth.claims.name === 'string' && app.auth.claims.name);
}

function showNickname() {
  const has = app.nickname.length > 0;
  $('name-form').hidden = has;
  $('nickname-box').hidden = !has;
  $('rename').hidden = nameFromToken();
  $('nickname').textContent = app.nickname;
  $('room-nickname').textContent = app.nickname;
}

function confirmName(event) {
  event.preventDefault();
  const name = $('name-input').value.trim();
  if (!name) {
    toast('用户名不能为空!');
    return;
  }
  app.nickname = name;
  store.set('chat.nickname', name);
  $('home-hint').textContent = '';
  showNickname();
  startClient();
}

function rename() {
  $('name-input').value = app.nickname;
  app.nickname = '';
  showNickname();
  $('name-input').focus();
}

async function loadRooms() {
  try {
    const res = await apiFetch('/api/rooms');
    if (!res.ok) throw await apiError(res);
    const body = await res.json();
    app.rooms = Array.isArray(body.rooms) ? body.rooms : [];
    $('rooms-status').textContent = app.rooms.length ? '' : '还没有房间,输入名字创建一个吧';
  } catch (err) {
    $('rooms-status').textContent = `房间列表加载失败(${err.message}),稍后重试…`;
  }
  renderRooms();
}

function renderRooms() {
  const list = $('room-list');
  const cards = app.rooms.map((room) => {
    const key = roomKey(room.roomId);
    const name = room.roomName ?? key;
    const li = el('li', 'itemCard');
    li.tabIndex = 0;
    li.setAttribute('role', 'button');
    li.dataset.roomId = key;
    li.style.background = CARD_COLORS[hash(key) % CARD_COLORS.length];
    li.append(
      el('span', 'pic', CARD_PICS[hash(`${key}.`) % CARD_PICS.length]),
      el('span', 'text', name),
      el('span', 'count', `在线 ${room.num ?? 0} 人`),
    );
    li.querySelector('.count').dataset.num = String(room.num ?? 0);
    li.addEventListener('click', () => enterRoom(room.roomId, name));
    li.addEventListener('keydown', (e) => {
      if (e.key === 'Enter' || e.key === ' ') {
        e.preventDefault();
        enterRoom(room.roomId, name);
      }
    });
    return li;
  });
  list.replaceChildren(...cards);
}

function pollRooms(on) {
  clearInterval(app.roomTimer);
  app.roomTimer = null;
  if (on) {
    loadRooms();
    app.roomTimer = setInterval(() => {
      if (document.visibilityState !== 'hidden') loadRooms();
    }, ROOM_POLL_MS);
  }
}

function joinByName(event) {
  event.preventDefault();
  const text = $('join-input').value.trim();
  if (!text) return;
  // Digits name the same room as the numeric id (the room's identity is its text form).
  const roomId = /^\d{1,15}$/.test(text) ? Number(text) : text;
  const known = app.rooms.find((r) => roomKey(r.roomId) === roomKey(roomId));
  enterRoom(known ? known.roomId : roomId, known ? (known.roomName ?? text) : text);
  $('join-input').value = '';
}

// ---- room view -----------------------------------------------------------------------

function enterRoom(roomId, roomName) {
  if (!app.nickname || !app.client) {
    $('home-hint').textContent = '先起个好听的名字吧~';
    toast('先起个好听的名字吧~');
    $('name-input').focus();
    return;
  }
  app.current = { roomId, roomName };
  app.bubbles.clear();
  app.shownIds.clear();
  app.pinned = true;
  $('msg-list').replaceChildren();
  $('new-msg-tip').hidden = true;
  $('title').textContent = roomName;
  $('room-nickname').textContent = app.nickname;
  const known = app.rooms.find((r) => roomKey(r.roomId) === roomKey(roomId));
  $('online-num').textContent = known ? String(known.num ?? 0) : '…';
  $('home').hidden = true;
  $('room').hidden = false;
  $('back').hidden = false;
  document.title = `${roomName} · 聊天室`;
  pollRooms(false);
  app.client.join(roomId, roomName);
  $('msg-input').focus();
}

function leaveRoom() {
  if (!app.current) return;
  toggleMembers(false);
  app.client.leave(app.current.roomId);
  app.current = null;
  $('room').hidden = true;
  $('home').hidden = false;
  $('back').hidden = true;
  $('title').textContent = '首页';
  document.title = '聊天室 · Chat';
  pollRooms(true);
  toast('您已退出房间', 1000);
}

async function toggleMembers(show = $('members').hidden) {
  const btn = $('online-btn');
  $('members').hidden = !show;
  btn.setAttribute('aria-expanded', String(show));
  if (!show || !app.current) return;
  const roomId = app.current.roomId;
  const list = $('member-list');
  list.replaceChildren(el('li', '', '…'));
  try {
    const res = await apiFetch(`/api/rooms/${encodeURIComponent(roomKey(roomId))}/members?limit=100`);
    if (!res.ok) throw await apiError(res);
    const body = await res.json();
    if (!isCurrent(roomId)) return;
    const members = Array.isArray(body.members) ? body.members : [];
    list.replaceChildren(...members.map((m) => {
      const me = m.userId === app.userId;
      const li = el('li', me ? 'me' : '', me ? `${m.userName}(我)` : m.userName);
      li.dataset.userId = m.userId;
      return li;
    }));
    $('member-more').hidden = !body.nextCursor;
  } catch (err) {
    list.replaceChildren(el('li', '', `成员列表加载失败(${err.message})`));
  }
}

function atBottom() {
  const box = $('msg-box');
  return box.scrollHeight - box.scrollTop - box.clientHeight <= BOTTOM_SLACK_PX;
}

function scrollToBottom() {
  const box = $('msg-box');
  box.scrollTop = box.scrollHeight;
  app.pinned = true;
  $('new-msg-tip').hidden = true;
}

/** Appends a list item; follows it unless the user scrolled up (then shows a hint). */
function append(li, { force = false } = {}) {
  const follow = force || app.pinned;
  $('msg-list').append(li);
  if (follow) scrollToBottom();
  else $('new-msg-tip').hidden = false;
}

function addNotice(text, kind = '') {
  const li = el('li', `notice ${kind}`.trim());
  li.append(el('span', '', text));
  append(li);
}

function messageItem({ own, userName, content, userId }) {
  const li = el('li', own ? 'msgItem selfItem' : 'msgItem');
  li.dataset.userId = userId;
  li.append(
    el('span', 'who', own ? '我' : userName),
    el('span', 'bubble', content),
    el('span', 'status', ''),
  );
  return li;
}

function addMessage(m) {
  if (app.shownIds.has(m.id)) return;
  app.shownIds.add(m.id);
  const li = messageItem({ own: m.own, userName: m.userName, content: m.content, userId: m.userId });
  li.dataset.id = m.id;
  li.dataset.status = 'sent';
  if (m.clientMsgId) li.dataset.clientMsgId = m.clientMsgId;
  li.title = new Date(m.ts || Date.now()).toLocaleString();
  append(li);
}

function updateBubble(p) {
  const li = app.bubbles.get(p.clientMsgId);
  if (!li) return;
  li.dataset.status = p.status;
  const status = li.querySelector('.status');
  if (p.status === 'sent') {
    if (p.id) {
      li.dataset.id = p.id;
      app.shownIds.add(p.id);
    }
    status.textContent = '';
    li.title = new Date().toLocaleString();
    app.bubbles.delete(p.clientMsgId);
  } else if (p.status === 'failed') {
    status.textContent = '发送失败';
    status.title = p.error ? `${p.error.code}: ${p.error.message ?? ''}` : '';
  } else {
    status.textContent = '发送中…';
  }
}

function sendMessage(event) {
  event.preventDefault();
  const input = $('msg-input');
  const text = input.value.trim();
  if (!text) {
    toast('发言不能为空~');
    return;
  }
  if (!app.current) return;
  const pending = app.client.send(app.current.roomId, text);
  const li = messageItem({ own: true, userName: app.nickname, content: text, userId: app.userId });
  li.dataset.clientMsgId = pending.clientMsgId;
  if (pending.status !== 'failed') app.bubbles.set(pending.clientMsgId, li);
  li.dataset.status = pending.status;
  li.querySelector('.status').textContent = pending.status === 'failed' ? '发送失败' : '发送中…';
  input.value = '';
  append(li, { force: true });
}

// ---- wiring --------------------------------------------------------------------------

$('name-form').addEventListener('submit', confirmName);
$('rename').addEventListener('click', rename);
$('join-form').addEventListener('submit', joinByName);
$('msg-form').addEventListener('submit', sendMessage);
$('back').addEventListener('click', leaveRoom);
$('new-msg-tip').addEventListener('click', scrollToBottom);
$('online-btn').addEventListener('click', () => toggleMembers());
document.addEventListener('click', (e) => {
  if (!$('members').hidden && !e.target.closest('#members, #online-btn')) toggleMembers(false);
});
$('msg-box').addEventListener('scroll', () => {
  app.pinned = atBottom();
  if (app.pinned) $('new-msg-tip').hidden = true;
}, { passive: true });
// Enter that confirms an IME composition (Chinese input) must not send the message.
for (const id of ['msg-input', 'name-input', 'join-input']) {
  $(id).addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && (e.isComposing || e.keyCode === 229)) e.preventDefault();
  });
}
$('msg-list').addEventListener('click', (e) => {
  const status = e.target.closest('.msgItem[data-status="failed"] .status');
  if (!status) return;
  const li = status.closest('.msgItem');
  if (!app.client.outbox.has(li.dataset.clientMsgId)) return;
  app.client.retry(li.dataset.clientMsgId);
  app.bubbles.set(li.dataset.clientMsgId, li);
  li.dataset.status = 'sending';
  status.textContent = '发送中…';
});
// Keep the newest message in view when the viewport shrinks (e.g. a phone keyboard opens).
window.addEventListener('resize', () => { if (app.pinned) scrollToBottom(); });
window.addEventListener('pagehide', () => app.client?.close());
// Back from the back/forward cache: the socket was closed on pagehide; start over.
window.addEventListener('pageshow', (e) => { if (e.persisted) window.location.reload(); });

showNickname();
showState('idle');
if (app.nickname) startClient();
pollRooms(true);
