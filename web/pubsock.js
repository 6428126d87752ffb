// pubsock browser client: a dependency-free ES module.
// It keeps the last position per channel and, on every reconnect, resubscribes with `since`,
// so the application sees every message once and in order, or a `gap` event when the server
// cannot prove nothing was missed (recovered: false).

const RESTART = 1012;
const TRY_LATER = 1013;
const TOKEN_EXPIRED = 1008;

export class PubsockClient extends EventTarget {
  /**
   * @param {object} options
   * @param {string} [options.url] websocket URL; default: /ws on this page's origin
   * @param {string} [options.apiBase] publish API base URL; default: this origin
   * @param {() => Promise<string>|string} [options.getToken] returns a client token (optional)
   * @param {number} [options.backoffBaseMs] first reconnect delay cap (full jitter)
   * @param {number} [options.backoffMaxMs] largest reconnect delay cap
   */
  constructor(options = {}) {
    super();
    const loc = globalThis.location;
    const wsOrigin = loc ? loc.origin.replace(/^http/, "ws") : "";
    this.url = options.url ?? `${wsOrigin}/ws`;
    this.apiBase = options.apiBase ?? "";
    this.getToken = options.getToken ?? null;
    this.backoffBaseMs = options.backoffBaseMs ?? 500;
    this.backoffMaxMs = options.backoffMaxMs ?? 15000;
    this.WebSocketImpl = options.WebSocket ?? globalThis.WebSocket;
    this.fetchImpl = options.fetch ?? globalThis.fetch?.bind(globalThis);
    this.random = options.random ?? Math.random;
    this.setTimer = options.setTimeout ?? globalThis.setTimeout.bind(globalThis);
    this.channels = new Map(); // channel -> {handler, position, presence}
    this.ws = null;
    this.token = null;
    this.attempt = 0;
    this.closedByUser = false;
    this.pod = null;
    this.state = "idle";
  }

  /** Opens the connection; reconnects by itself until close(). */
  async connect() {
    this.closedByUser = false;
    await this._open();
  }

  close() {
    this.closedByUser = true;
    if (this.ws) this.ws.close(1000);
  }

  /** Subscribes `handler(message)` to `channel`; resumes after reconnects without gaps. */
  subscribe(channel, handler, { presence = false, since = null } = {}) {
    this.channels.set(channel, { handler, position: since, presence });
    this._sendSubscribe(channel);
  }

  unsubscribe(channel) {
    this.channels.delete(channel);
    this._send({ type: "unsubscribe", channel });
  }

  presence(channel) {
    this._send({ type: "presence", channel });
  }

  /** Publishes through the HTTP API; resolves to {id, channel}. Retries 503s with the same id. */
  async publish(channel, data, { id = randomId(), retries = 3 } = {}) {
    const headers = { "Content-Type": "application/json" };
    const token = this.token ?? (this.getToken ? await this.getToken() : null);
    if (token) headers.Authorization = `Bearer ${token}`;
    const url = `${this.apiBase}/v1/channels/${encodeURIComponent(channel)}/messages`;
    for (let attempt = 0; ; attempt++) {
      const response = await this.fetchImpl(url, {
        method: "POST",
        headers,
        body: JSON.stringify({ data, id }),
      });
      if (response.status === 202) return response.json();
      if (response.status !== 503 || attempt >= retries) {
        const body = await response.json().catch(() => ({}));
        throw new Error(`publish failed: ${response.status} ${JSON.stringify(body.detail ?? "")}`);
      }
      await new Promise((resolve) => this.setTimer(resolve, this._backoff(attempt)));
    }
  }

  // -- internals -------------------------------------------------------------------------
  _emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  _backoff(attempt) {
    const cap = Math.min(this.backoffMaxMs, this.backoffBaseMs * 2 ** attempt);
    return Math.floor(this.random() * cap); // full jitter
  }

  async _open() {
    this.state = "connecting";
    this._emit("state", { state: this.state });
    try {
      // A plain request first, so the load balancer's affinity cookie is set before the upgrade.
      const config = await this.fetchImpl("/config.json", { credentials: "same-origin" });
      this.pod = config.headers.get("X-Pubsock-Pod");
    } catch {
      /* the websocket attempt below reports the failure */
    }
    if (this.getToken) this.token = await this.getToken();
    const url = this.token ? `${this.url}?token=${encodeURIComponent(this.token)}` : this.url;
    const ws = new this.WebSocketImpl(url);
    this.ws = ws;
    ws.onopen = () => {
      this.attempt = 0;
      this.state = "open";
      this._emit("state", { state: this.state });
      this._send({ type: "ping" });
      for (const channel of this.channels.keys()) this._sendSubscribe(channel);
    };
    ws.onmessage = (event) => this._onFrame(JSON.parse(event.data));
    ws.onclose = (event) => this._onClose(event);
  }

  _sendSubscribe(channel) {
    const entry = this.channels.get(channel);
    if (!entry) return;
    const frame = { type: "subscribe", channel };
    if (entry.position) frame.since = entry.position;
    if (entry.presence) frame.presence = true;
    this._send(frame);
  }

  _send(frame) {
    if (this.ws && this.ws.readyState === 1) this.ws.send(JSON.stringify(frame));
  }

  _onFrame(frame) {
    const entry = frame.channel ? this.channels.get(frame.channel) : null;
    switch (frame.type) {
      case "message":
        if (!entry) return;
        entry.position = frame.id;
        entry.handler(frame);
        break;
      case "subscribed":
        if (!entry) return;
        if (frame.recovered === false) this._emit("gap", { channel: frame.channel });
        if (frame.recovered === true) this._emit("recovered", { channel: frame.channel });
        if (!entry.position || frame.recovered === false) entry.position = frame.position;
        this._emit("subscribed", frame);
        break;
      case "pong":
        if (frame.pod) this.pod = frame.pod;
        this._emit("pod", { pod: this.pod });
        break;
      default:
        this._emit(frame.type, frame);
    }
  }

  async _onClose(event) {
    this.ws = null;
    this.state = "closed";
    this._emit("state", { state: this.state, code: event.code });
    if (this.closedByUser) return;
    let delay;
    if (event.code === RESTART) {
      delay = 0; // draining or max age: any other pod, at once
    } else {
      delay = this._backoff(this.attempt++);
    }
    if (event.code === TOKEN_EXPIRED) this.token = null;
    this._emit("reconnecting", { code: event.code, delayMs: delay });
    this.setTimer(() => this._open(), delay);
  }
}

function randomId() {
  return globalThis.crypto?.randomUUID?.() ?? `${Date.now()}-${Math.random().toString(36).slice(2)}`;
}
