// hub-client.js: a dependency-free client for the hub's control channel (docs/control.md, "JavaScript client").
//
//   import { connect, HubError, AuthError } from "./hub-client.js";
//   const hub = await connect("ws://127.0.0.1:8765/v1/control", token);
//   const devices = await hub.request("devices", { state: "online" });
//   const sub = await hub.subscribe("presence", (summary) => console.log(summary.name, summary.state));
//
// One connection authenticates with the first message (browsers cannot set headers), numbers its requests and
// resolves each one's promise with the `result` (or rejects it with a HubError carrying the hub's error code),
// routes pushed events to their subscription's callback, and after a lost connection reconnects with exponential
// backoff and subscribes again. It never reconnects after the hub refused the token or revoked it.

/** Error codes of this client; the hub's own codes (docs/control.md, "Error codes") come as they are. */
export const ERR_CANNOT_CONNECT = "cannot_connect"; // no WebSocket session (refused, unreachable, closed early)
export const ERR_AUTH_INVALID = "auth_invalid"; // the hub refused the token (an AuthError)
export const ERR_CONNECTION_LOST = "connection_lost"; // the connection dropped before the reply came
export const ERR_NOT_CONNECTED = "not_connected"; // a request while reconnecting, or after close()
export const ERR_REVOKED = "revoked"; // the operator's token was revoked while connected (close 4003)
export const ERR_TIMEOUT = "timeout"; // no auth answer within `openTimeout`

/** An error of the control channel: `code` is stable (the hub's error code, or one of the ERR_* above). */
export class HubError extends Error {
  constructor(code, message, closeCode = null) {
    super(message || code);
    this.name = "HubError";
    this.code = code;
    this.closeCode = closeCode; // the WebSocket close code, when the connection ended
  }
}

/** The hub refused the token (first-message `auth_invalid`): retrying with the same token cannot help. */
export class AuthError extends HubError {
  constructor(message, closeCode = null) {
    super(ERR_AUTH_INVALID, message, closeCode);
    this.name = "AuthError";
  }
}

const CLOSE_NORMAL = 1000;
const CLOSE_REVOKED = 4003;

const DEFAULTS = {
  reconnect: true, // reconnect after a lost connection
  minDelay: 500, // ms before the first reconnect attempt ...
  maxDelay: 30000, // ... doubling up to this (each delay is jittered down by up to a half)
  openTimeout: 10000, // ms for the socket to open and the hub to answer the token
  heartbeat: 20000, // ms between pings; no pong within as long again: the connection is taken for lost. 0: none
  WebSocket: globalThis.WebSocket, // another implementation (e.g. the `ws` package in Node)
};

/**
 * Open an authenticated WebSocket: resolves to `{ ws, operator, role }`, rejects with an AuthError or a HubError.
 * While open, the hub's frames go to `onFrame`, and its close (or a network drop) to `onClose(event)`.
 */
function openSession(url, token, opts, onFrame, onClose) {
  return new Promise((resolve, reject) => {
    let ws;
    try {
      ws = new opts.WebSocket(url);
    } catch (err) {
      reject(new HubError(ERR_CANNOT_CONNECT, `cannot open ${url}: ${err.message}`));
      return;
    }
    let settled = false;
    let refused = null; // the AuthError of an auth_invalid frame, reported when the hub closes
    const fail = (error) => {
      if (!settled) {
        settled = true;
        clearTimeout(timer);
        reject(error);
      }
    };
    const timer = setTimeout(() => {
      fail(new HubError(ERR_TIMEOUT, `no answer from ${url} within ${opts.openTimeout} ms`));
      ws.close();
    }, opts.openTimeout);

    ws.onmessage = (message) => {
      let frame;
      try {
        frame = JSON.parse(message.data);
      } catch {
        return; // the hub sends only JSON text; anything else is not ours to answer
      }
      if (settled) {
        onFrame(frame);
      } else if (frame.type === "auth_required") {
        ws.send(JSON.stringify({ type: "auth", token }));
      } else if (frame.type === "auth_ok") {
        settled = true;
        clearTimeout(timer);
        ws.onclose = onClose;
        resolve({ ws, operator: frame.operator, role: frame.role });
      } else if (frame.type === "auth_invalid") {
        refused = new AuthError(frame.message || "token refused");
      }
    };
    ws.onclose = (event) => {
      if (refused) {
        refused.closeCode = event.code;
        fail(refused);
      } else if (event.code === 1008) {
        fail(new AuthError("the hub closed the connection during authentication", event.code));
      } else if (event.code === 1013) {
        fail(new HubError("unavailable", "the hub cannot reach its state store; try again later", event.code));
      } else {
        // A handshake refused with an HTTP status (403 for an Origin not allowed, 401, 429, 503) shows in a
        // browser only as a close with 1006: scripts are not told why.
        fail(new HubError(ERR_CANNOT_CONNECT, `cannot open the control channel at ${url} (close ${event.code})`,
          event.code));
      }
    };
  });
}

/** One subscription: `id` is the hub's number for it, which changes when the client subscribes again. */
export class Subscription {
  constructor(connection, topic, devices, onEvent, onDropped, selector = null) {
    this.connection = connection;
    this.topic = topic;
    this.devices = devices;
    this.selector = selector;
    this.onEvent = onEvent;
    this.onDropped = onDropped;
    this.id = null;
    this.active = true;
  }

  /** End it: no callback runs after this is called. */
  async unsubscribe() {
    if (!this.active) return;
    this.active = false;
    this.connection._forget(this);
    if (this.id !== null && this.connection.connected) {
      const id = this.id;
      this.id = null;
      try {
        await this.connection.request("unsubscribe", { subscription: id });
      } catch (err) {
        // Gone with the connection (the hub ends a session's subscriptions with it): nothing left to undo.
        if (!(err instanceof HubError) || ![ERR_CONNECTION_LOST, ERR_NOT_CONNECTED].includes(err.code)) throw err;
      }
    }
  }
}

/**
 * An authenticated control-channel connection that reconnects by itself. Events (it is an EventTarget):
 * `disconnected` (detail: { code }), `reconnecting` (detail: { attempt, delay }), `ready` (connected again, every
 * subscription renewed), `subscription-failed` (detail: { subscription, error }: the hub refused to renew one after a
 * reconnect; it has ended) and `closed` (for good; detail: { error }, a HubError or null after close()).
 */
export class Connection extends EventTarget {
  constructor(url, token, opts) {
    super();
    this.url = url;
    this.operator = null;
    this.role = null;
    this.connected = false;
    this.closed = false;
    this._token = token;
    this._opts = opts;
    this._ws = null;
    this._nextId = 1;
    this._pending = new Map(); // request id -> { resolve, reject, onResult }
    this._subscriptions = new Set();
    this._byHubId = new Map(); // hub subscription id -> Subscription
    this._retryTimer = null;
    this._heartbeatTimer = null;
    this._announced = false;
  }

  async _open() {
    const session = await openSession(this.url, this._token, this._opts, (f) => this._dispatch(f),
      (e) => this._lost(e));
    this._ws = session.ws;
    this.operator = session.operator;
    this.role = session.role;
    this.connected = true;
    if (this._opts.heartbeat > 0) {
      this._heartbeatTimer = setInterval(() => this._beat(session.ws), this._opts.heartbeat);
    }
  }

  // A network that vanished (a phone changing networks, a suspended laptop) may leave the socket open for minutes
  // before the browser notices: a ping unanswered for a whole heartbeat ends it, and reconnecting begins.
  _beat(ws) {
    const deadline = setTimeout(() => {
      if (this._ws !== ws) return;
      ws.onclose = null;
      ws.onmessage = null;
      ws.close();
      this._lost({ code: 1006 });
    }, this._opts.heartbeat);
    this.request("ping").then(() => clearTimeout(deadline), () => clearTimeout(deadline));
  }

  /**
   * Send request `type` with `args`; resolves to its `result` (undefined for `ping`), rejects with a HubError
   * (`code` as the hub sent it: `forbidden`, `not_found`, ...).
   */
  request(type, args = {}) {
    if (!this.connected) {
      return Promise.reject(new HubError(ERR_NOT_CONNECTED, "not connected to the hub"));
    }
    return this._send(type, args, null);
  }

  _send(type, args, onResult) {
    const id = this._nextId++;
    return new Promise((resolve, reject) => {
      this._pending.set(id, { resolve, reject, onResult });
      this._ws.send(JSON.stringify({ ...args, id, type }));
    });
  }

  /**
   * Subscribe to `topic` (telemetry, presence, commands), for `devices` (a list of names; all when omitted) whose
   * labels match `selector` (e.g. "site=berlin,model=th-100"; resolved by the hub at each (re)subscription).
   * `onEvent(event)` gets each pushed event, `onDropped({ dropped, coalesced })` each notice of lost events.
   * Resolves to a Subscription, renewed after each reconnect until its `unsubscribe()`.
   */
  async subscribe(topic, onEvent, { devices = null, onDropped = null, selector = null } = {}) {
    if (!this.connected) throw new HubError(ERR_NOT_CONNECTED, "not connected to the hub");
    const sub = new Subscription(this, topic, devices, onEvent, onDropped, selector);
    await this._subscribe(sub);
    this._subscriptions.add(sub);
    return sub;
  }

  _subscribe(sub) {
    const args = { topic: sub.topic };
    if (sub.devices) args.devices = sub.devices;
    if (sub.selector) args.selector = sub.selector;
    // Bind the hub's id as the reply is read, before any later frame (an event of it) is dispatched.
    return this._send("subscribe", args, (result) => {
      if (sub.active) {
        sub.id = result.subscription;
        this._byHubId.set(sub.id, sub);
      } else {
        // unsubscribe() was called while this request was on its way: end it at the hub too.
        this._send("unsubscribe", { subscription: result.subscription }, null).catch(() => {});
      }
    });
  }

  _forget(sub) {
    this._subscriptions.delete(sub);
    if (sub.id !== null) this._byHubId.delete(sub.id);
  }

  _dispatch(frame) {
    const handler = FRAME_HANDLERS[frame.type];
    if (handler) handler(this, frame);
  }

  _lost(event) {
    clearInterval(this._heartbeatTimer);
    this._heartbeatTimer = null;
    this.connected = false;
    this._ws = null;
    this._byHubId.clear();
    for (const sub of this._subscriptions) sub.id = null;
    const pending = [...this._pending.values()];
    this._pending.clear();
    for (const p of pending) {
      p.reject(new HubError(ERR_CONNECTION_LOST, `connection lost (close ${event.code})`, event.code));
    }
    if (this.closed) {
      this._announceClosed(null);
      return;
    }
    this.dispatchEvent(new CustomEvent("disconnected", { detail: { code: event.code } }));
    if (event.code === CLOSE_REVOKED) {
      this._end(new HubError(ERR_REVOKED, "the operator's token was revoked", event.code));
    } else if (!this._opts.reconnect || event.code === CLOSE_NORMAL) {
      this._end(new HubError(ERR_CONNECTION_LOST, `connection closed (close ${event.code})`, event.code));
    } else {
      this._retry(0);
    }
  }

  _retry(attempt) {
    const ceiling = Math.min(this._opts.maxDelay, this._opts.minDelay * 2 ** attempt);
    const delay = Math.round(ceiling * (0.5 + Math.random() / 2));
    this.dispatchEvent(new CustomEvent("reconnecting", { detail: { attempt: attempt + 1, delay } }));
    this._retryTimer = setTimeout(async () => {
      this._retryTimer = null;
      if (this.closed) return;
      try {
        await this._open();
      } catch (err) {
        if (this.closed) return;
        if (err instanceof AuthError) this._end(err);
        else this._retry(attempt + 1);
        return;
      }
      if (this.closed) {
        this._ws.close(CLOSE_NORMAL);
        return;
      }
      const subs = [...this._subscriptions];
      const outcomes = await Promise.allSettled(subs.map((sub) => this._subscribe(sub)));
      if (!this.connected) return; // lost again: _lost has scheduled the next attempt
      outcomes.forEach((outcome, i) => {
        if (outcome.status === "rejected") {
          // The hub refused it this time (too_many_subscriptions, say): it ends, and the page is told.
          subs[i].active = false;
          this._forget(subs[i]);
          this.dispatchEvent(new CustomEvent("subscription-failed",
            { detail: { subscription: subs[i], error: outcome.reason } }));
        }
      });
      this.dispatchEvent(new CustomEvent("ready"));
    }, delay);
  }

  _end(error) {
    this.closed = true;
    this._announceClosed(error);
  }

  _announceClosed(error) {
    if (this._announced) return;
    this._announced = true;
    this.dispatchEvent(new CustomEvent("closed", { detail: { error } }));
  }

  /** Close for good: pending requests fail with `connection_lost`, subscriptions end, no reconnect. */
  close() {
    if (this.closed) return;
    this.closed = true;
    clearTimeout(this._retryTimer);
    clearInterval(this._heartbeatTimer);
    for (const sub of this._subscriptions) sub.active = false;
    this._subscriptions.clear();
    if (this._ws) {
      this._ws.close(CLOSE_NORMAL);
    } else {
      this._announceClosed(null);
    }
  }
}

/** What to do with each frame the hub sends after authentication, by its `type`. */
const FRAME_HANDLERS = {
  result(conn, frame) {
    const pending = conn._pending.get(frame.id);
    if (!pending) return; // `"id": null`: the hub could not read a frame of ours
    conn._pending.delete(frame.id);
    if (frame.success) {
      if (pending.onResult) pending.onResult(frame.result);
      pending.resolve(frame.result);
    } else {
      const error = frame.error || {};
      pending.reject(new HubError(error.code || "internal", error.message));
    }
  },
  pong(conn, frame) {
    const pending = conn._pending.get(frame.id);
    if (!pending) return;
    conn._pending.delete(frame.id);
    pending.resolve(undefined);
  },
  event(conn, frame) {
    const sub = conn._byHubId.get(frame.subscription);
    if (sub && sub.active) sub.onEvent(frame.event);
  },
  dropped(conn, frame) {
    const sub = conn._byHubId.get(frame.subscription);
    if (sub && sub.active && sub.onDropped) sub.onDropped({ dropped: frame.dropped, coalesced: frame.coalesced });
  },
};

/**
 * Connect and authenticate with an operator `token`; resolves to a Connection. Rejects with an AuthError when the
 * hub refuses the token, or a HubError (`cannot_connect`, `timeout`, `unavailable`) when no session opens: the first
 * connection is not retried, so a caller learns at once that the URL or token is wrong.
 * `options`: { reconnect, minDelay, maxDelay, openTimeout, heartbeat, WebSocket } (see DEFAULTS).
 */
export async function connect(url, token, options = {}) {
  const opts = { ...DEFAULTS, ...options };
  if (!opts.WebSocket) throw new HubError(ERR_CANNOT_CONNECT, "no WebSocket implementation");
  const connection = new Connection(url, token, opts);
  await connection._open();
  return connection;
}
