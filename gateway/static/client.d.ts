// TypeScript declarations of client.js (the chat gateway's browser/Node client), served beside
// it at /client.d.ts. Documented in docs/client.md; checked with `tsc --strict` against
// tests/browser/types/*.ts by the browser tests.

/** A room id as the server knows it: an integer or a string (`1` and `"1"` are one room). */
export type RoomId = number | string;

/** A message id: a Redis stream id `"ms-seq"`, ordered numerically. */
export type MessageId = string;

/** Connection states, in the order a session usually goes through them. */
export declare const STATES: Readonly<{
  IDLE: 'idle';
  CONNECTING: 'connecting';
  CONNECTED: 'connected';
  RECONNECTING: 'reconnecting';
  OFFLINE: 'offline';
  UNAUTHORIZED: 'unauthorized';
  CLOSED: 'closed';
}>;
export type ConnectionState = (typeof STATES)[keyof typeof STATES];

/** Close codes of the gateway (docs/protocol.md, "Close codes"). */
export declare const CLOSE_CODES: Readonly<{
  NORMAL: 1000;
  TOO_BIG: 1009;
  SERVICE_RESTART: 1012;
  TRY_AGAIN_LATER: 1013;
  HEARTBEAT_TIMEOUT: 4000;
  TOKEN_EXPIRED: 4001;
  SLOW_CONSUMER: 4008;
  REDELIVERY_LIMIT: 4009;
}>;

/** `[ms, seq]` of a message id; `null`/`undefined`/`""` give `[0, 0]`. */
export declare function parseId(id: MessageId | null | undefined): [number, number];
/** Negative when `a` is older than `b`, 0 when equal, positive when newer. */
export declare function compareIds(
  a: MessageId | null | undefined,
  b: MessageId | null | undefined,
): number;
/** The newer of two ids (either may be null). */
export declare function maxId(
  a: MessageId | null | undefined,
  b: MessageId | null | undefined,
): MessageId | null;
/** `ws(s)://<page host><path>`; throws outside a page (no `location`). */
export declare function defaultUrl(path?: string): string;
/** A JWT's claims (decoded, not verified: the gateway verifies). */
export interface JwtClaims {
  sub?: string;
  name?: string;
  exp?: number;
  [claim: string]: unknown;
}
/** The payload of a JWT, decoded without verification; null when it is not a JWT. */
export declare function decodeJwtPayload(token: unknown): JwtClaims | null;
/** The text form of a room id (its identity). */
export declare function roomKey(roomId: RoomId): string;

/** A WebSocket constructor (the browser's, or e.g. the `ws` package's in Node). */
export interface WebSocketConstructor {
  new (url: string): WebSocket;
}

/** Options of a ChatClient: a `userId`, or a `token` (whose `sub` is the user), or both. */
export type ChatClientOptions = ChatClientBaseOptions &
  ({ userId: string; token?: string } | { userId?: string; token: string });

export interface ChatClientBaseOptions {
  /** Display name; default: the token's `name` claim, else userId. */
  userName?: string;
  /** WebSocket URL; default: the page's host, path /ws. */
  url?: string | null;
  /**
   * Returns a new token (same `sub`): called before the current one expires, and when the
   * gateway refused or expired it (GATEWAY_JWT_SECRET / GATEWAY_JWT_PUBLIC_KEY_FILE).
   */
  refreshToken?: () => Promise<string>;
  /** Refresh this long before expiry at the latest (default 30000 ms). */
  refreshBeforeMs?: number;
  /** Logins refused as expired, each retried with a fresh token, before the state becomes
   * `unauthorized` (default 3). */
  maxAuthRetries?: number;
  /** Heartbeat ping interval (default 25000 ms). */
  heartbeatMs?: number;
  /** No frame this long after a ping closes the socket and reconnects (default 10000 ms). */
  pongTimeoutMs?: number;
  /** An open that takes longer is abandoned and retried (default 10000 ms). */
  connectTimeoutMs?: number;
  /** Reconnect backoff: first ceiling, largest ceiling, growth (defaults 500, 15000, 2). */
  backoffInitialMs?: number;
  backoffMaxMs?: number;
  backoffFactor?: number;
  /** Failed attempts before the state says `offline` rather than `reconnecting` (default 4). */
  offlineAfterAttempts?: number;
  /** Acks are coalesced: at most every ackDelayMs, or at once after ackEvery messages. */
  ackDelayMs?: number;
  ackEvery?: number;
  /** An unconfirmed message is sent again (same clientMsgId) after this long (default 10000 ms). */
  resendAfterMs?: number;
  /** Messages asked for per `sync` page (default 500). */
  syncLimit?: number;
  /** Message ids remembered per room for de-duplication (default 5000). */
  seenLimit?: number;
  /** Largest frame sent; a longer message fails with code `too_big` (default 65536). */
  maxFrameBytes?: number;
  /** WebSocket implementation; default globalThis.WebSocket. */
  WebSocket?: WebSocketConstructor | null;
  /** Debug logger; also receives handler exceptions (default console.error for those). */
  log?: ((...args: unknown[]) => void) | null;
}

/** Fields every room frame carries. */
export interface RoomFrame {
  roomId: RoomId;
  roomName: string;
  [field: string]: unknown;
}

/** A room message (`message` frame) as delivered to `message` handlers. */
export interface ChatMessage extends RoomFrame {
  event: 'message';
  id: MessageId;
  userId: string;
  userName: string;
  content: string;
  /** Publish time, ms since the epoch (server clock). */
  ts: number;
  /** Users online in the room when it was published. */
  num: number;
  clientMsgId?: string;
  /** Sent by this user (from another tab or device; this tab's own come as `confirmed`). */
  own: boolean;
  /** Replayed from history after a (re)connect, not live. */
  replayed: boolean;
}

export interface PresenceFrame extends RoomFrame {
  event: 'login' | 'logout';
  userId: string;
  userName: string;
  num: number;
  /** It is this user (this or another of its connections). */
  self: boolean;
}

export interface LoginFrame extends PresenceFrame {
  event: 'login';
  /** This connection joined again after a reconnect. */
  rejoin: boolean;
}

export interface SyncedFrame {
  event: 'synced';
  roomId?: RoomId;
  dm?: boolean;
  lastId: MessageId;
  count: number;
  /** Messages after the resume position were trimmed away (history is incomplete). */
  truncated: boolean;
  more: boolean;
}

export interface DirectMessage {
  event: 'dm';
  id: MessageId;
  fromUserId: string;
  fromUserName: string;
  toUserId: string;
  content: string;
  ts: number;
  clientMsgId?: string;
}

export interface ErrorFrame {
  event: 'error';
  code: string;
  message: string;
  roomId?: RoomId;
  clientMsgId?: string;
}

/** Any frame the server sends (see docs/protocol.md). */
export interface ServerFrame {
  event?: string;
  [field: string]: unknown;
}

export type PendingStatus = 'sending' | 'sent' | 'failed';

/** A message this client sent, until the server confirms it. */
export interface PendingMessage {
  clientMsgId: string;
  roomId: RoomId;
  content: string;
  userId: string;
  userName: string;
  status: PendingStatus;
  /** The message id once confirmed. */
  id: MessageId | null;
  error: { code: string; message?: string } | null;
  createdAt: number;
  tries: number;
  /** Resolves with the message id when stored; rejects (with `.code`) when refused for good. */
  promise: Promise<MessageId>;
}

export interface StateInfo {
  attempt?: number;
  delayMs?: number;
  /** Close code of the connection that dropped. */
  code?: number;
}

/** Event names and their handler signatures. */
export interface ChatClientEvents {
  state: (state: ConnectionState, info: StateInfo) => void;
  message: (msg: ChatMessage) => void;
  confirmed: (pending: PendingMessage) => void;
  pending: (pending: PendingMessage) => void;
  login: (frame: LoginFrame) => void;
  logout: (frame: PresenceFrame) => void;
  num: (roomId: RoomId, num: number) => void;
  synced: (frame: SyncedFrame) => void;
  dm: (frame: DirectMessage) => void;
  error: (frame: ErrorFrame) => void;
  /** The gateway accepted a new token. */
  refreshed: (frame: ServerFrame & { exp?: number }) => void;
  /** Messages after `lastId` of a room (or the inbox, `dm: true`) are lost for good. */
  resync: (frame: ServerFrame & { lastId?: string; dm?: boolean }) => void;
  frame: (frame: ServerFrame) => void;
}

/** What `join` returns: the client's bookkeeping of the room (read-only for applications). */
export interface RoomState {
  readonly roomId: RoomId;
  readonly roomName: string;
  readonly lastId: MessageId | null;
  readonly num: number | null;
  readonly joined: boolean;
}

/** A chat connection with heartbeat, reconnect, resume, acks and reliable sends. */
export declare class ChatClient {
  constructor(options: ChatClientOptions);
  readonly userId: string;
  readonly userName: string;
  readonly url: string;
  readonly state: ConnectionState;
  /** True when the socket is open and usable. */
  readonly connected: boolean;

  /** Subscribes `fn` to `event`; returns a function that unsubscribes it. */
  on<E extends keyof ChatClientEvents>(event: E, fn: ChatClientEvents[E]): () => void;
  off<E extends keyof ChatClientEvents>(event: E, fn: ChatClientEvents[E]): void;

  /** Opens the connection and keeps it open (reconnecting) until `close()`. */
  connect(): this;
  /** Closes for good; pending messages stay in `pendingMessages()`. */
  close(): void;
  /** Reconnects now, skipping the backoff wait. */
  reconnectNow(): void;
  /** Takes a new token (same user); false (and an `error` event) when it is unusable. */
  setToken(token: string): boolean;
  /** Fetches a new token with `refreshToken()` now; true when one is in place. */
  refreshNow(): Promise<boolean>;

  /** Joins a room (now, or after the next connect); `lastId` resumes after that id. */
  join(roomId: RoomId, roomName?: string, options?: { lastId?: MessageId | null }): RoomState;
  /** Leaves a room and forgets its position and pending messages. */
  leave(roomId: RoomId): void;
  /** The last message id seen in a room (null before any). */
  lastId(roomId: RoomId): MessageId | null;
  /** A room's online count as last reported (null when unknown). */
  num(roomId: RoomId): number | null;

  /** Sends a chat message to a joined room (throws if the room was not joined). */
  send(roomId: RoomId, content: string, options?: { clientMsgId?: string }): PendingMessage;
  /** Unconfirmed messages, oldest first. */
  pendingMessages(): PendingMessage[];
  /** Re-sends a failed message with the same clientMsgId. */
  retry(clientMsgId: string): void;
  /** Sends a direct message; false when not connected. */
  sendDm(toUserId: string, content: string, options?: { clientMsgId?: string }): boolean;
}

export default ChatClient;
