/**
 * forge-streaming.js: the browser client of the forge-streaming room protocol.
 *
 * One ES module, no build step, served by `forge-streaming serve` at
 * `/forge-streaming.js`:
 *
 *   import { ForgeStreamingClient } from "/forge-streaming.js";
 *   const client = new ForgeStreamingClient({ query: { name: "ada" } });
 *   client.addEventListener("message", (e) => console.log(e.detail.room, e.detail.data));
 *   client.connect();
 *   client.join("lobby");
 *   client.send("lobby", { text: "hello" });
 *   client.send("lobby", new Uint8Array([1, 2, 3]));  // binary (WebSocket, WebTransport)
 *
 * Transports, best first: WebTransport (HTTP/3, when the browser has it and the
 * server serves `/webtransport/certificate-hash`), WebSocket (`/ws`), then SSE
 * (`/sse`, sending with POST). `transport: "websocket"` (or "sse",
 * "webtransport") forces one.
 *
 * Reliability: the client keeps the last `sequence` it saw in each room and,
 * after any reconnect (with exponential backoff and jitter), re-joins each room
 * with `since`, so the server replays what history still holds; when it cannot,
 * the server says `resync` and the client passes it on as a `resync` event.
 * Messages sent while disconnected wait in a bounded queue and go out once
 * their room is joined again.
 *
 * Events (all `CustomEvent`s; read `event.detail`):
 *   state     {state, transport, attempt, delay}   connecting | open | reconnecting | closed
 *   message   {room, id, userId, data, timestamp, sequence, frame, binary}
 *             data is a Uint8Array for a binary message (binary: true), on every
 *             transport: a binary WebSocket/WebTransport frame, or over SSE a
 *             frame with "encoding": "base64" (decoded here); else the JSON value
 *   presence  {room, users, change, userId}        change: snapshot | join | leave
 *   typing    {room, userId, typing}
 *   joined    {room, users, userId, sequence, resumed}
 *   left      {room}
 *   resync    {room, since, reason, sequence}       history could not fill a gap
 *   system    {event, data, frame}                  other system frames (server.shutdown, ...)
 *   error     {code, message, frame}                refused frames, transport failures, queue overflow
 *   disconnected     {transport, code, reason}      an open connection ended (a reconnect follows)
 *   transport-failed {transport, code, message}     one attempt failed; the next transport is tried
 *
 * Delivery: at least once for what this client sends (a message whose
 * connection dies under it is sent again), and this client never sees its own
 * messages live (the server does not echo them; a replay after a reconnect
 * may include them, so an app that shows its own messages at once should tag
 * them, as the demo does with a nonce).
 */

/** Every transport this client speaks, in the order `auto` tries them. */
export const TRANSPORTS = Object.freeze(["webtransport", "websocket", "sse"]);

/** Connection states, as reported by the `state` event and `client.state`. */
export const State = Object.freeze({
  IDLE: "idle",
  CONNECTING: "connecting",
  OPEN: "open",
  RECONNECTING: "reconnecting",
  CLOSED: "closed",
});

const DEFAULTS = Object.freeze({
  url: null, // the server's HTTP origin; defaults to the page's
  transport: "auto", // or one of TRANSPORTS to force it
  offered: null, // transports the server is known to serve (skips probing the others)
  query: {}, // extra query parameters for every transport (e.g. a display name or token)
  paths: { websocket: "/ws", sse: "/sse", webtransportInfo: "/webtransport/certificate-hash" },
  connectTimeout: 5000, // ms an attempt may take before the next transport is tried
  keepAlive: 20000, // ms between WebTransport keepalive datagrams (0: none)
  reconnect: { initialDelay: 250, maxDelay: 8000, factor: 2 },
  maxQueued: 100, // messages kept while disconnected; the oldest is dropped past it
  dedupeWindow: 2000, // message ids remembered to drop a replayed copy of a live message
});

/**
 * A frame a server restart or a network blip may interrupt; surfaced as
 * `error` events, never thrown at the page.
 */
class TransportError extends Error {
  constructor(code, message) {
    super(message);
    this.code = code;
  }
}

const sleep = (ms, signal) =>
  new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal?.addEventListener("abort", () => { clearTimeout(timer); resolve(); }, { once: true });
  });

/** Reject after `ms`: a WebTransport handshake to a blocked UDP port can hang for a long time. */
function withTimeout(promise, ms, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new TransportError("timeout", `${what} took longer than ${ms} ms`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/**
 * A resume position for a room whose history was empty when we joined it.
 * Sequences are the server's clock in microseconds, so the server time of
 * the acknowledgement (milliseconds, rounded up) is a position that replays
 * everything published after it and is never below the room's history floor.
 */
function positionFromTimestamp(timestamp) {
  const ms = Date.parse(timestamp);
  return Number.isFinite(ms) ? ms * 1000 + 999 : null;
}

function withQuery(url, query) {
  const u = new URL(url);
  for (const [key, value] of Object.entries(query)) {
    if (value !== undefined && value !== null) u.searchParams.set(key, String(value));
  }
  return u.toString();
}

// -- transports -------------------------------------------------------------------
//
// Each adapter opens one connection and hands back
//   { name, send(text) -> Promise, close(), closed: Promise<{code, reason}>, joinedAtOpen }
// where joinedAtOpen holds the rooms the transport already joined while
// opening (SSE does, from its URL); the client joins the others itself.
// The client owns rooms, resume, queueing and reconnects, so the adapters
// stay small and the three transports behave the same way.

async function openWebSocket(client, onFrame) {
  const base = new URL(client.options.paths.websocket, client.baseUrl);
  base.protocol = base.protocol === "https:" ? "wss:" : "ws:";
  const ws = new WebSocket(withQuery(base.toString(), client.options.query));
  let closedResolve;
  const closed = new Promise((resolve) => { closedResolve = resolve; });
  const opened = new Promise((resolve, reject) => {
    ws.addEventListener("open", resolve, { once: true });
    ws.addEventListener("close", (e) => reject(new TransportError("connect_failed",
      `WebSocket closed before opening (${e.code})`)), { once: true });
  });
  ws.binaryType = "arraybuffer";
  ws.addEventListener("message", (e) => {
    // Room frames are JSON text, or binary room messages (JSON header, newline, payload).
    onFrame(typeof e.data === "string" ? e.data : new Uint8Array(e.data));
  });
  ws.addEventListener("close", (e) => closedResolve({ code: e.code, reason: e.reason }));
  try {
    await withTimeout(opened, client.options.connectTimeout, "WebSocket connect");
  } catch (err) {
    ws.close();
    throw err;
  }
  return {
    name: "websocket",
    joinedAtOpen: new Set(),
    async send(text) {
      if (ws.readyState !== WebSocket.OPEN) throw new TransportError("not_connected", "WebSocket is not open");
      ws.send(text);
    },
    close() { ws.close(1000, "client closed"); },
    closed,
  };
}

async function openSSE(client, onFrame, rooms) {
  // The SSE transport resumes with its own cursor: `room:sequence` pairs
  // (room percent-encoded) in Last-Event-ID, or the `last_event_id` query
  // parameter for a fresh EventSource. Rooms without a position go in `rooms=`;
  // the server joins both before the first event, so no POST round trip is
  // needed (and no join can race a message POST).
  const cursor = [];
  const plain = [];
  const later = []; // a room name with a comma cannot go in `rooms=`; join it by POST
  for (const [room, since] of rooms) {
    if (since !== null && since !== undefined) cursor.push(`${encodeURIComponent(room)}:${since}`);
    else if (room.includes(",")) later.push(room);
    else plain.push(room);
  }
  const query = { ...client.options.query };
  if (plain.length) query.rooms = plain.join(",");
  if (cursor.length) query.last_event_id = cursor.join(",");
  const url = withQuery(new URL(client.options.paths.sse, client.baseUrl).toString(), query);
  const es = new EventSource(url);
  let session = null;
  let closedResolve;
  let done = false;
  const closed = new Promise((resolve) => { closedResolve = resolve; });
  const finish = (info) => {
    if (done) return;
    done = true;
    // EventSource would reconnect by itself without our resume positions:
    // close it and let the client reconnect with its own backoff.
    es.close();
    closedResolve(info);
  };
  const opened = new Promise((resolve, reject) => {
    es.addEventListener("session", (e) => {
      session = JSON.parse(e.data);
      resolve();
    }, { once: true });
    es.addEventListener("error", () => {
      if (!session) reject(new TransportError("connect_failed", "SSE stream could not be opened"));
    });
  });
  es.addEventListener("message", (e) => onFrame(e.data));
  es.addEventListener("error", () => {
    if (session) finish({ code: 1006, reason: "stream lost" });
  });
  try {
    await withTimeout(opened, client.options.connectTimeout, "SSE connect");
  } catch (err) {
    finish({ code: 1006, reason: "connect failed" });
    throw err;
  }
  const sendUrl = new URL(session.send_url, client.baseUrl).toString();
  // POSTs are separate requests: chain them so frames reach the server in order.
  let chain = Promise.resolve();
  const post = (text) => {
    const attempt = chain.then(async () => {
      if (done) throw new TransportError("not_connected", "SSE stream is closed");
      let response;
      try {
        response = await fetch(sendUrl, {
          method: "POST",
          headers: { "Content-Type": "application/json", "X-Stream-Token": session.token },
          body: text,
        });
      } catch (err) {
        finish({ code: 1006, reason: "send failed" });
        throw new TransportError("not_connected", `POST failed: ${err.message}`);
      }
      if (response.status === 404) {
        // The server no longer knows this stream (it restarted, or ended it).
        finish({ code: 1006, reason: "stream gone" });
        throw new TransportError("not_connected", "the server no longer knows this stream");
      }
      if (!response.ok) {
        const body = await response.json().catch(() => ({}));
        throw new TransportError(body.error || `http_${response.status}`, body.message || response.statusText);
      }
    });
    chain = attempt.catch(() => {});
    return attempt;
  };
  for (const room of later) post(JSON.stringify({ type: "join", room_id: room })).catch(() => {});
  return {
    name: "sse",
    joinedAtOpen: new Set(rooms.map(([room]) => room)),
    send(text) {
      // POSTs carry JSON text: binary messages are sent on WebSocket or WebTransport only.
      if (typeof text !== "string") {
        return Promise.reject(new TransportError("binary_not_supported", "the SSE transport sends text only"));
      }
      return post(text);
    },
    close() { finish({ code: 1000, reason: "client closed" }); },
    closed,
  };
}

/** WebTransport messages on the one bidirectional stream: 1 byte type, 4 bytes length, payload. */
const WT_TEXT = 0x01;
const WT_BINARY = 0x02;

const textEncoder = new TextEncoder();
const textDecoder = new TextDecoder();

/** A frame for the transport: JSON text, or for bytes a binary frame (compact JSON header, 0x0A, payload). */
function encodeFrame(frame) {
  if (!(frame.data instanceof Uint8Array)) return JSON.stringify(frame);
  const header = textEncoder.encode(JSON.stringify({ type: frame.type, room_id: frame.room_id }));
  const out = new Uint8Array(header.length + 1 + frame.data.length);
  out.set(header);
  out[header.length] = 0x0a;
  out.set(frame.data, header.length + 1);
  return out;
}

function base64ToBytes(text) {
  const raw = atob(text);
  const bytes = new Uint8Array(raw.length);
  for (let i = 0; i < raw.length; i++) bytes[i] = raw.charCodeAt(i);
  return bytes;
}

function hexToBytes(hex) {
  const bytes = new Uint8Array(hex.length / 2);
  for (let i = 0; i < bytes.length; i++) bytes[i] = parseInt(hex.substr(i * 2, 2), 16);
  return bytes;
}

async function openWebTransport(client, onFrame) {
  if (typeof WebTransport !== "function") {
    throw new TransportError("unsupported", "this browser has no WebTransport");
  }
  // The server tells us where its HTTP/3 endpoint is and, for its development
  // certificate, the hash the browser must pin (serverCertificateHashes).
  const infoUrl = new URL(client.options.paths.webtransportInfo, client.baseUrl);
  const response = await withTimeout(fetch(infoUrl, { cache: "no-store" }), client.options.connectTimeout,
    "WebTransport discovery");
  if (!response.ok) throw new TransportError("unavailable", `WebTransport not offered (${response.status})`);
  const info = await response.json();
  const options = {};
  if (info.development !== false && info.sha256_hex) {
    options.serverCertificateHashes = [{ algorithm: "sha-256", value: hexToBytes(info.sha256_hex) }];
  }
  const wt = new WebTransport(withQuery(info.url, client.options.query), options);
  // Both promises reject when the session fails; handle them so nothing
  // reaches the console as an unhandled rejection.
  wt.ready.catch(() => {});
  let closedResolve;
  const closed = new Promise((resolve) => { closedResolve = resolve; });
  wt.closed.then(
    (info) => closedResolve({ code: info?.closeCode ?? 1000, reason: info?.reason ?? "" }),
    (err) => closedResolve({ code: 1006, reason: String(err?.message || err) }),
  );
  let writer;
  try {
    await withTimeout(wt.ready, client.options.connectTimeout, "WebTransport connect");
    const stream = await wt.createBidirectionalStream();
    writer = stream.writable.getWriter();
    writer.closed.catch(() => {});
    readFrames(stream.readable, onFrame).catch(() => {}).finally(() => {
      // The message stream ending means the session is over for the room protocol.
      try { wt.close(); } catch { /* already closed */ }
    });
  } catch (err) {
    try { wt.close(); } catch { /* never opened */ }
    throw err instanceof TransportError ? err : new TransportError("connect_failed", String(err?.message || err));
  }
  // The server closes a WebTransport session its client sent nothing on for
  // `webtransport.idle_timeout` (60 s by default), and a chat reader may stay
  // quiet much longer. The room protocol has no ping, so a one-byte datagram
  // (which the server counts as activity and the room endpoint ignores) keeps
  // the session, and with it the reader's presence, alive.
  const keepAlive = client.options.keepAlive > 0 ? setInterval(() => {
    const datagrams = wt.datagrams.writable.getWriter();
    datagrams.write(new Uint8Array([0])).catch(() => {});
    datagrams.releaseLock();
  }, client.options.keepAlive) : null;
  closed.finally(() => clearInterval(keepAlive));
  const encoder = new TextEncoder();
  return {
    name: "webtransport",
    joinedAtOpen: new Set(),
    async send(text) {
      const binary = typeof text !== "string";
      const payload = binary ? text : encoder.encode(text);
      const message = new Uint8Array(5 + payload.length);
      const view = new DataView(message.buffer);
      view.setUint8(0, binary ? WT_BINARY : WT_TEXT);
      view.setUint32(1, payload.length);
      message.set(payload, 5);
      try {
        await writer.write(message);
      } catch (err) {
        throw new TransportError("not_connected", `WebTransport write failed: ${err?.message || err}`);
      }
    },
    close() { try { wt.close({ closeCode: 1000, reason: "client closed" }); } catch { /* already closed */ } },
    closed,
  };
}

/** Split the message stream into messages; QUIC may cut it anywhere. */
async function readFrames(readable, onFrame) {
  const reader = readable.getReader();
  const decoder = new TextDecoder();
  let buffer = new Uint8Array(0);
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    const joined = new Uint8Array(buffer.length + value.length);
    joined.set(buffer);
    joined.set(value, buffer.length);
    buffer = joined;
    let start = 0;
    while (buffer.length - start >= 5) {
      const view = new DataView(buffer.buffer, buffer.byteOffset + start);
      const kind = view.getUint8(0);
      const size = view.getUint32(1);
      if (buffer.length - start < 5 + size) break;
      const payload = buffer.subarray(start + 5, start + 5 + size);
      if (kind === WT_TEXT) onFrame(decoder.decode(payload));
      else if (kind === WT_BINARY) onFrame(payload.slice());
      start += 5 + size;
    }
    buffer = buffer.slice(start);
  }
}

const OPENERS = { webtransport: openWebTransport, websocket: openWebSocket, sse: openSSE };

// -- the client -----------------------------------------------------------------------

export class ForgeStreamingClient extends EventTarget {
  /**
   * @param {object} [options] see DEFAULTS above; `reconnect` and `paths` merge with theirs.
   */
  constructor(options = {}) {
    super();
    this.options = {
      ...DEFAULTS,
      ...options,
      paths: { ...DEFAULTS.paths, ...(options.paths || {}) },
      reconnect: { ...DEFAULTS.reconnect, ...(options.reconnect || {}) },
      query: { ...(options.query || {}) },
    };
    const forced = this.options.transport;
    if (forced !== "auto" && !TRANSPORTS.includes(forced)) {
      throw new TypeError(`transport must be "auto" or one of ${TRANSPORTS.join(", ")}, got ${forced}`);
    }
    this.baseUrl = this.options.url || globalThis.location?.origin;
    this.state = State.IDLE;
    this.transport = null; // the name of the transport in use while open
    this.userId = null; // who the server says we are (from room.joined)
    this.serverHint = null; // reconnect_after_ms from a server.shutdown notice
    /** room -> {since: last sequence seen (the resume position), acked: joined on this connection, users} */
    this._rooms = new Map();
    /** messages waiting for their room to be (re)joined: {room, frame, resolve, reject} */
    this._queue = [];
    this._seen = new Set();
    this._seenOrder = [];
    this._conn = null;
    this._abort = null;
    this._running = null;
  }

  // -- public API -------------------------------------------------------------------

  /** Start connecting (and keep reconnecting until close()). Returns this. */
  connect() {
    if (this._running) return this;
    if (this.state === State.CLOSED) this.state = State.IDLE; // closed clients may connect again
    this._abort = new AbortController();
    this._running = this._run(this._abort.signal).finally(() => { this._running = null; });
    return this;
  }

  /** Disconnect for good: no more reconnects; queued messages are rejected. */
  close() {
    this._abort?.abort();
    this._conn?.close();
    for (const item of this._queue.splice(0)) item.reject(new TransportError("closed", "client closed"));
    this._setState(State.CLOSED);
  }

  /** Join a room (now, or as soon as connected); it is re-joined after every reconnect. */
  join(room) {
    if (typeof room !== "string" || !room) throw new TypeError("room must be a non-empty string");
    let entry = this._rooms.get(room);
    if (!entry) {
      entry = { since: null, acked: false, users: new Set() };
      this._rooms.set(room, entry);
      this._write({ type: "join", room_id: room });
    }
    return this;
  }

  /** Leave a room; its queued messages are dropped. */
  leave(room) {
    if (!this._rooms.delete(room)) return this;
    this._write({ type: "leave", room_id: room });
    this._queue = this._queue.filter((item) => {
      if (item.room !== room) return true;
      item.reject(new TransportError("left", `left room ${room}`));
      return false;
    });
    return this;
  }

  /**
   * Send `data` (any JSON) to a joined room. Resolves once handed to the
   * transport; while disconnected it waits in the bounded queue. A
   * Uint8Array, ArrayBuffer or other ArrayBuffer view is sent as a binary
   * room message (WebSocket and WebTransport; the SSE transport rejects it).
   */
  send(room, data) {
    if (!this._rooms.has(room)) {
      return Promise.reject(new TypeError(`join room ${room} before sending to it`));
    }
    const frame = { type: "message", room_id: room, data };
    if (data instanceof ArrayBuffer || ArrayBuffer.isView(data)) {
      const bytes = data instanceof ArrayBuffer ? new Uint8Array(data)
        : new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
      frame.data = bytes.slice(); // the caller may reuse its buffer before the send goes out
    }
    return new Promise((resolve, reject) => {
      const item = { room, frame, resolve, reject };
      if (this._ready(room)) {
        this._deliverItem(item);
        return;
      }
      this._queue.push(item);
      if (this._queue.length > this.options.maxQueued) {
        const dropped = this._queue.shift();
        const err = new TransportError("queue_overflow",
          `more than ${this.options.maxQueued} messages waiting for a connection; dropped the oldest`);
        dropped.reject(err);
        this._emit("error", { code: err.code, message: err.message, frame: dropped.frame });
      }
    });
  }

  /** Tell a room we are (or stopped) typing. Dropped while disconnected: it would be stale. */
  typing(room, isTyping = true) {
    if (this._ready(room)) this._write({ type: "typing", room_id: room, data: Boolean(isTyping) });
    return this;
  }

  /** The user ids present in a room, as last told by the server. */
  users(room) {
    return [...(this._rooms.get(room)?.users || [])];
  }

  /** The rooms this client is in (or will be once connected). */
  get rooms() {
    return [...this._rooms.keys()];
  }

  /** How many messages wait for a connection. */
  get queued() {
    return this._queue.length;
  }

  /** Shorthand for addEventListener that hands the listener `event.detail`. */
  on(type, listener) {
    this.addEventListener(type, (e) => listener(e.detail));
    return this;
  }

  // -- connection loop ---------------------------------------------------------------

  _candidates() {
    const forced = this.options.transport;
    if (forced !== "auto") return [forced];
    const offered = this.options.offered;
    return TRANSPORTS.filter((name) => {
      if (offered && !offered.includes(name)) return false;
      return name !== "webtransport" || typeof WebTransport === "function";
    });
  }

  async _run(signal) {
    let attempt = 0;
    while (!signal.aborted) {
      this._setState(attempt === 0 ? State.CONNECTING : State.RECONNECTING, { attempt });
      const conn = await this._open(signal);
      if (signal.aborted) { conn?.close(); break; }
      if (conn) {
        attempt = 0;
        this.serverHint = null;
        const info = await this._serve(conn);
        if (signal.aborted) break;
        this._emit("disconnected", { transport: conn.name, ...info });
      }
      // Back off: the server's hint first (it knows when it will be back), then
      // doubling delays with jitter so a restart is not met by every client at once.
      const { initialDelay, maxDelay, factor } = this.options.reconnect;
      const base = this.serverHint ?? Math.min(maxDelay, initialDelay * factor ** attempt);
      const delay = Math.round(base * (0.5 + Math.random() / 2));
      this.serverHint = null;
      attempt += 1;
      this._setState(State.RECONNECTING, { attempt, delay });
      await sleep(delay, signal);
    }
  }

  /** Try each candidate transport in order; the first that opens wins. */
  async _open(signal) {
    for (const name of this._candidates()) {
      if (signal.aborted) return null;
      try {
        const rooms = [...this._rooms].map(([room, entry]) => [room, entry.since]);
        return await OPENERS[name](this, (raw) => this._onFrame(raw), rooms);
      } catch (err) {
        this._emit("transport-failed", { transport: name, code: err.code || "connect_failed", message: err.message });
      }
    }
    return null;
  }

  /** Use an open connection until it closes: re-join rooms (resuming), then flush the queue as rooms are joined. */
  async _serve(conn) {
    this._conn = conn;
    this.transport = conn.name;
    for (const entry of this._rooms.values()) entry.acked = false;
    this._setState(State.OPEN);
    for (const [room, entry] of this._rooms) {
      if (!conn.joinedAtOpen.has(room)) {
        const frame = { type: "join", room_id: room };
        if (entry.since !== null) frame.since = entry.since;
        this._write(frame);
      }
    }
    const info = await conn.closed;
    this._conn = null;
    this.transport = null;
    for (const entry of this._rooms.values()) entry.acked = false;
    return info;
  }

  _ready(room) {
    return this._conn !== null && this._rooms.get(room)?.acked === true;
  }

  /** Write a frame now if connected; otherwise drop it (joins are redone on reconnect). */
  _write(frame) {
    const conn = this._conn;
    if (!conn) return Promise.resolve(false);
    return conn.send(encodeFrame(frame)).then(() => true, (err) => {
      this._emit("error", { code: err.code || "send_failed", message: err.message, frame });
      return false;
    });
  }

  _deliverItem(item) {
    const conn = this._conn;
    conn.send(encodeFrame(item.frame)).then(item.resolve, (err) => {
      // The connection died under this message: keep it for the next one
      // (at least once; the server may have it already).
      if (err.code === "not_connected") this._queue.unshift(item);
      else item.reject(err);
    });
  }

  /** A room is joined on this connection: send what waited for it, in order. */
  _flush(room) {
    const keep = [];
    for (const item of this._queue) {
      if (item.room === room) this._deliverItem(item);
      else keep.push(item);
    }
    this._queue = keep;
  }

  // -- incoming frames ---------------------------------------------------------------

  _onFrame(raw) {
    if (typeof raw === "string") return this._onText(raw);
    // A binary room message: a JSON header, one newline byte (0x0A), then the payload.
    const end = raw.indexOf(0x0a);
    let header;
    try {
      header = end > 0 ? JSON.parse(textDecoder.decode(raw.subarray(0, end))) : null;
    } catch {
      header = null;
    }
    if (!header || header.type !== "message") {
      this._emit("error", { code: "invalid_frame", message: "the server sent a binary frame that is not a room message" });
      return undefined;
    }
    return this._onMessage(header, raw.slice(end + 1));
  }

  _onText(text) {
    let frame;
    try {
      frame = JSON.parse(text);
    } catch {
      this._emit("error", { code: "invalid_frame", message: "the server sent a frame that is not JSON" });
      return;
    }
    switch (frame.type) {
      case "message": return this._onMessage(frame);
      case "join": return this._onPresence(frame, "join");
      case "leave": return this._onPresence(frame, "leave");
      case "typing":
        return this._emit("typing", { room: frame.room_id, userId: frame.user_id, typing: Boolean(frame.data) });
      case "system": return this._onSystem(frame);
      case "error":
        return this._emit("error", { code: frame.data?.code, message: frame.data?.message, frame });
      default:
        return undefined; // a newer server's frame: ignore rather than fail
    }
  }

  _onMessage(frame, bytes) {
    const room = frame.room_id;
    const entry = this._rooms.get(room);
    if (!entry) return;
    // A message can come twice around a reconnect (live, then replayed): ids are unique.
    if (frame.id) {
      if (this._seen.has(frame.id)) return;
      this._seen.add(frame.id);
      this._seenOrder.push(frame.id);
      if (this._seenOrder.length > this.options.dedupeWindow) this._seen.delete(this._seenOrder.shift());
    }
    if (typeof frame.sequence === "number") entry.since = Math.max(entry.since ?? 0, frame.sequence);
    let data = bytes ?? frame.data;
    if (bytes === undefined && frame.encoding === "base64") data = base64ToBytes(frame.data); // SSE
    this._emit("message", {
      room, id: frame.id, userId: frame.user_id, data,
      timestamp: frame.timestamp, sequence: frame.sequence, frame, binary: frame.binary === true,
    });
  }

  _onPresence(frame, change) {
    const entry = this._rooms.get(frame.room_id);
    if (!entry) return;
    if (change === "join") entry.users.add(frame.user_id);
    else entry.users.delete(frame.user_id);
    this._emit("presence", { room: frame.room_id, users: [...entry.users], change, userId: frame.user_id });
  }

  _onSystem(frame) {
    const data = frame.data || {};
    switch (frame.event) {
      case "room.joined": {
        const entry = this._rooms.get(data.room_id);
        if (!entry) return;
        const resumed = entry.since !== null;
        if (!resumed) entry.since = data.sequence ?? positionFromTimestamp(frame.timestamp);
        entry.acked = true;
        entry.users = new Set(data.users || []);
        this.userId = data.user_id ?? this.userId;
        this._emit("joined", { room: data.room_id, users: [...entry.users], userId: data.user_id,
          sequence: data.sequence, resumed });
        this._emit("presence", { room: data.room_id, users: [...entry.users], change: "snapshot" });
        this._flush(data.room_id);
        return;
      }
      case "room.left":
        this._emit("left", { room: data.room_id });
        return;
      case "resync": {
        // History could not fill the gap: carry on from the server's position
        // (or from now, when the room has no history, e.g. after a restart).
        const entry = this._rooms.get(data.room_id);
        if (entry) {
          const position = data.sequence ?? positionFromTimestamp(frame.timestamp);
          entry.since = Math.max(entry.since ?? 0, position ?? 0);
        }
        this._emit("resync", { room: data.room_id, since: data.since, reason: data.reason, sequence: data.sequence });
        return;
      }
      case "server.shutdown":
        if (typeof data.reconnect_after_ms === "number") this.serverHint = data.reconnect_after_ms;
        break;
      default:
        break;
    }
    this._emit("system", { event: frame.event, data: frame.data, frame });
  }

  // -- helpers -------------------------------------------------------------------------

  _setState(state, extra = {}) {
    if (this.state === State.CLOSED && state !== State.CLOSED) return;
    const changed = this.state !== state;
    this.state = state;
    if (changed || extra.delay !== undefined) {
      this._emit("state", { state, transport: this.transport, ...extra });
    }
  }

  _emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }
}

/** Make a client and start connecting: `const client = connect({ transport: "sse" })`. */
export function connect(options) {
  return new ForgeStreamingClient(options).connect();
}

export default ForgeStreamingClient;
