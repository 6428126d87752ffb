// Types of the pubsock browser client (web/pubsock.js), served as /pubsock.d.ts.

/** A position in a channel: a message id, or `@<ms>` (a `subscribed` frame's mark). */
export type Position = string;

export interface MessageFrame<T = unknown> {
  type: "message";
  channel: string;
  id: string;
  data: T;
  /** Publish time, ms since the epoch. */
  ts: number;
  /** The verified sender, when the message was published with a client token. */
  sub?: string;
}

export interface SubscribedFrame {
  type: "subscribed";
  channel: string;
  position: Position;
  /** Present when the subscribe carried `since`. */
  recovered?: boolean;
  /** Present when a rewind was served: `count` messages follow this frame, before live ones;
   * `complete`: they are provably every message of the asked window. */
  rewound?: { count: number; complete: boolean };
}

/** Recent history on subscribe: the last `count` messages, those of the last `seconds`, or the
 * last `count` within `seconds` (positive integers, at most the server's REWIND_MAX_COUNT and
 * REWIND_MAX_S). */
export interface Rewind {
  count?: number;
  seconds?: number;
}

export interface PresenceFrame {
  type: "presence";
  channel: string;
  /** Connections subscribed to the channel, on every pod. */
  count: number;
  /** Distinct subjects; omitted when there are more than the server's PRESENCE_MEMBERS_MAX. */
  members?: { sub: string }[];
}

export interface JoinLeaveFrame {
  type: "join" | "leave";
  channel: string;
  sub: string;
}

export interface ErrorFrame {
  type: "error";
  /** Server codes: bad_request, bad_channel, forbidden, limit. */
  code: string;
  message: string;
  channel?: string;
}

/** Errors the client reports itself: getToken failures, handler exceptions, bad frames. */
export interface ClientErrorDetail {
  code: "token" | "handler" | "client" | "bad_frame";
  message: string;
  channel?: string;
  error?: unknown;
}

export type ConnectionState = "connecting" | "open" | "closed";

/** What carries the client's channels: a websocket, or one Server-Sent Events stream. */
export type Transport = "websocket" | "sse";

export interface PubsockEvents {
  /** The connection changed state; `code` and `reason` come with "closed". */
  state: { state: ConnectionState; code?: number; reason?: string };
  /** The pod serving this client: from the warm-up response header ("http"), a pong ("ws") or the
   * event stream's first event ("sse"). */
  pod: { pod: string; via: "http" | "ws" | "sse" };
  /** Websockets could not connect `sseFallbackAfter` times in a row: the client uses SSE now. */
  transport: { transport: Transport; reason: string };
  /** A resubscribe with `since` was answered `recovered: true`: nothing was missed. */
  recovered: { channel: string; since: Position | null; position: Position };
  /** `recovered: false`: messages may be missing; reload the channel's state. */
  gap: { channel: string; since: Position | null; position: Position };
  /** The connection is gone; a new one starts after `delay` ms. */
  reconnecting: { code: number; reason?: string; delay: number; attempt: number };
  error: ErrorFrame | ClientErrorDetail;
  presence: PresenceFrame;
  join: JoinLeaveFrame;
  leave: JoinLeaveFrame;
  /** The server accepted a refreshed token. */
  refreshed: { expires_at: number };
  subscribed: SubscribedFrame;
  /** The server dropped a subscription (a refreshed token no longer allows it). */
  unsubscribed: { channel: string; byServer: true };
}

export interface PubsockOptions {
  /** Websocket URL. Default: `ws(s)://<this page's host>/ws`. */
  url?: string;
  /** "auto" (default): websockets, falling back to SSE after `sseFallbackAfter` failed
   * handshakes in a row; "websocket": never SSE; "sse": SSE from the start. */
  transport?: "auto" | Transport;
  /** Server-Sent Events URL. Default: `http(s)://<the websocket's host>/sse`. */
  sseUrl?: string;
  /** Failed websocket handshakes in a row before "auto" falls back to SSE. Default 2. */
  sseFallbackAfter?: number;
  /** Client token (a JWT), sent as `?token=`. */
  token?: string | null;
  /** Returns a fresh token: used before expiry (`refresh` frame), after 1008, and for reconnects. */
  getToken?: (() => Promise<string> | string) | null;
  /** Base URL of the publish API; "" (default) = same origin. */
  apiBase?: string;
  /**
   * A plain GET before every websocket so a load balancer sets its affinity cookie.
   * Default: /config.json on the websocket's origin; null turns it off.
   */
  configUrl?: string | null;
  /** First backoff cap (ms); doubles per failed attempt. Default 500. */
  backoffBaseMs?: number;
  /** Largest backoff cap (ms). Default 30000. */
  backoffMaxMs?: number;
  /** Refresh (and replace before a reconnect) a token this long before its `exp`. Default 60000. */
  refreshMarginMs?: number;
  /** Application ping interval (ms); a connection without any frame for pongTimeoutMs after a ping is dropped. Default 25000. */
  pingIntervalMs?: number;
  pongTimeoutMs?: number;
  /** A handshake that does not complete in this time is abandoned. Default 10000. */
  connectTimeoutMs?: number;
  /** The warm-up request is given up after this. Default 5000. */
  warmupTimeoutMs?: number;
  /** A connection open this long resets the backoff. Default 5000. */
  stableAfterMs?: number;
  /** Message ids remembered per channel to drop duplicates. Default 1000. */
  dedupeSize?: number;
  /** Retries of a publish that got a 5xx or a network error (same id). Default 5. */
  publishRetries?: number;
  presenceTimeoutMs?: number;
  /** Failed handshakes in a row after which a new token is fetched anyway. Default 3. */
  tokenRefetchAfterFailures?: number;
  // Injectable for tests.
  WebSocket?: { new (url: string): WebSocket };
  /** null turns SSE off. */
  EventSource?: { new (url: string, init?: EventSourceInit): EventSource } | null;
  fetch?: typeof fetch;
  setTimeout?: (fn: () => void, ms: number) => unknown;
  clearTimeout?: (id: unknown) => void;
  now?: () => number;
  random?: () => number;
}

export interface SubscribeOptions {
  /** Resume after this position (a message id or a `subscribed` position). */
  since?: Position | null;
  /** Receive join/leave events for this channel. */
  presence?: boolean;
  /** Hand the handler the channel's recent messages first; asked again on every resubscribe,
   * served only where `since` does not recover (the first subscribe, after a gap). */
  rewind?: Rewind | null;
}

export interface PublishOptions {
  /** Idempotency key and message id (1-128 of [A-Za-z0-9_-]). Default: a random UUID. */
  id?: string;
  retries?: number;
  signal?: AbortSignal;
}

export declare const CLOSE_NORMAL: 1000;
export declare const CLOSE_ABNORMAL: 1006;
export declare const CLOSE_TOKEN_EXPIRED: 1008;
export declare const CLOSE_RESTART: 1012;
export declare const CLOSE_TRY_AGAIN_LATER: 1013;

export declare function decodeJwtPayload(token: string): Record<string, unknown> | null;
export declare function tokenExpiryMs(token: string | null): number | null;
/** The positions in an SSE event id (`<channel>=<position>,...`), or null. */
export declare function parseEventId(id: string): Map<string, Position> | null;
export declare function formatEventId(pairs: [string, Position][]): string;
export declare function fullJitter(
  attempt: number,
  baseMs: number,
  maxMs: number,
  random?: () => number,
): number;

export declare class PublishError extends Error {
  /** HTTP status; 0 for a network failure. */
  status: number;
  detail: unknown;
  /** The message id: retrying with it later still delivers the message once. */
  id: string | null;
  retryAfterMs: number | null;
}

export declare class PubsockError extends Error {
  code: string;
  channel: string | null;
}

export declare class PubsockClient extends EventTarget {
  constructor(options?: PubsockOptions);
  readonly url: string;
  readonly sseUrl: string;
  readonly apiBase: string;
  /** The transport in use (or tried next). */
  readonly transport: Transport;
  readonly state: ConnectionState;
  readonly pod: string | null;
  readonly token: string | null;

  /** Listens to an event; the listener gets its detail. Returns a function that removes it. */
  on<K extends keyof PubsockEvents>(type: K, listener: (detail: PubsockEvents[K]) => void): () => void;
  addEventListener<K extends keyof PubsockEvents>(
    type: K,
    listener: (event: CustomEvent<PubsockEvents[K]>) => void,
    options?: boolean | AddEventListenerOptions,
  ): void;
  addEventListener(
    type: string,
    listener: EventListenerOrEventListenerObject | null,
    options?: boolean | AddEventListenerOptions,
  ): void;

  /** Connects, and reconnects until close(); resolves when the socket is first open. */
  connect(): Promise<void>;
  close(): void;

  /** One handler per channel (a second call replaces it). Rejects if the server refuses. */
  subscribe<T = unknown>(
    channel: string,
    handler: (message: MessageFrame<T>) => void,
    options?: SubscribeOptions,
  ): Promise<SubscribedFrame>;
  unsubscribe(channel: string): void;
  channels(): string[];
  /** The last position seen on the channel: what the next resubscribe sends as `since`. */
  position(channel: string): Position | null;
  /** Over the websocket, or `GET /sse/presence` in SSE mode. */
  presence(channel: string, options?: { timeoutMs?: number }): Promise<PresenceFrame>;
  setToken(token: string | null): void;
  publish(channel: string, data: unknown, options?: PublishOptions): Promise<{ id: string; channel: string }>;
}

export default PubsockClient;
