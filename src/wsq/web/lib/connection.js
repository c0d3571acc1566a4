// The connection: one WebSocket to the server, greeted (§4.1), kept alive with pings (§9),
// and opened again with backoff whenever it is lost or refused. Requests carry ids and may
// be many in flight; messages queued in one turn leave in one frame (§2). The Client
// (client.js) builds the API on top and handles what the server sends.

import { platform } from './platform.js'
import { WsqError, defaultBackoff, lostConnection, randomHex, sleep } from './util.js'

const PROTOCOL = 1
const DEFAULT_LIMITS = {
  max_message: 1 << 20, window: 8 << 20, chunk: 1 << 20, inline: 1 << 16, batch: 1000,
}
const SEND_BUFFER = 4 << 20 // bytes the socket may hold before a stream waits
const CLOSE_WAIT = 2000 // ms close() waits for the closing handshake
const DEAD_FLOOR = 1000 // ms of silence before a connection counts as dead, at least

export class Connection extends platform.EventEmitter {
  constructor (addresses, { backoff = defaultBackoff, token = null } = {}) {
    super()
    // A cluster's nodes: each reconnection moves to the next address (a dead node is left
    // at once); backoff is waited once every address failed in a row, with tries counting
    // such rounds.
    this.addresses = Array.isArray(addresses) ? [...addresses] : [addresses]
    this.address = this.addresses[0] // the one in use, or tried next
    this._addressIndex = 0
    this.node = null // the name of the node last greeted (welcome.node)
    this.scope = null // what the server puts before the task ids we choose (welcome.scope); null until greeted
    this.backoff = backoff
    this.token = token
    this.connected = false
    this.closed = false
    this.limits = { ...DEFAULT_LIMITS }
    this.heartbeat = 5
    this._session = randomHex(16) // lets a reconnection take its workers back (§4.5)
    this._generation = 0 // counts greetings: what was made on one connection dies with it
    this._socket = null // the WebSocket being opened or open
    this._fatal = null // why connecting cannot succeed (a refused token) until connect()
    this._ids = 0
    this._out = []
    this._flushing = false
    this._requests = new Map() // id -> {message, resolve, reject, resend, keep, sent}
    this._waiters = []
    this._tries = 0
    this._retryTimer = null
    this._heartbeatTimer = null
  }

  /** Connect (again after close()); resolves once connected. */
  connect () {
    this.closed = false
    this._fatal = null
    this._open()
    return this.ready()
  }

  /** Resolves once connected (at once if connected). */
  ready () {
    if (this.connected) return Promise.resolve()
    if (this._fatal) return Promise.reject(this._fatal)
    return new Promise((resolve, reject) => this._waiters.push({ resolve, reject }))
  }

  /**
   * Disconnect and stop reconnecting; resolves once the socket is closed. Requests in
   * flight fail (worker reports are kept); calls made while closed wait for connect().
   */
  close () {
    this.closed = true
    clearTimeout(this._retryTimer)
    const error = new WsqError('The client was closed.', 'closed')
    for (const [id, request] of this._requests) {
      if (!request.keep) { this._requests.delete(id); request.reject(error) }
    }
    const ws = this._socket
    if (!ws) return Promise.resolve()
    const closed = new Promise((resolve) => {
      const timer = setTimeout(resolve, CLOSE_WAIT)
      ws.addEventListener('close', () => { clearTimeout(timer); resolve() })
    })
    this._dropped(ws)
    try { ws.close(1000) } catch {}
    return closed
  }

  // -- opening, greeting, losing -------------------------------------------------------------

  _open () {
    if (this.closed || this._socket || this._fatal) return
    clearTimeout(this._retryTimer)
    let ws
    try {
      ws = new platform.WebSocket(this.address)
    } catch (error) {
      this._connectError(error)
      this._retry()
      return
    }
    this._socket = ws
    ws.binaryType = 'arraybuffer'
    let greeted = false
    ws.onopen = () => { if (this._socket === ws) ws.send(JSON.stringify(this._hello())) }
    ws.onmessage = (event) => {
      if (this._socket !== ws) return
      this._heard = Date.now()
      if (greeted) this._receive(event.data)
      else greeted = this._greet(ws, event.data)
    }
    // A refused connection may report only 'error' (Node's WebSocket), or 'error' then
    // 'close' (browsers, ws): whichever comes first ends this socket.
    ws.onerror = (event) => {
      if (this._socket !== ws) return
      this._connectError(event && event.error)
      this._dropped(ws)
    }
    ws.onclose = () => { if (this._socket === ws) this._dropped(ws) }
  }

  _hello () {
    const hello = { op: 'hello', protocol: PROTOCOL, client: 'wsq-js', session: this._session }
    if (this.token != null) hello.token = this.token
    return hello
  }

  /** The first message: welcome (start the session) or a refusal. Returns greeted. */
  _greet (ws, data) {
    const welcome = JSON.parse(data)
    if (welcome.op === 'welcome') {
      this._start(welcome)
      return true
    }
    const error = new WsqError(welcome.message || 'The server refused the hello.', welcome.code)
    // Callers waiting on the connection learn of a refused token from their rejection;
    // 'error' listeners always do, and nobody's error is dropped unheard.
    const fatal = welcome.code === 'unauthorized' || welcome.code === 'unsupported_protocol'
    const told = fatal && (this._waiters.length || this._requests.size)
    if (fatal) this._refused(error)
    this._dropped(ws)
    try { ws.close() } catch {}
    if (this.listenerCount('error') || !told) this.emit('error', error)
    return false
  }

  /** Retrying cannot help: fail what waits, and stay down until connect(). */
  _refused (error) {
    this._fatal = error
    for (const waiter of this._waiters.splice(0)) waiter.reject(error)
    for (const request of this._requests.values()) request.reject(error)
    this._requests.clear()
  }

  _start (welcome) {
    this._tries = 0
    this.node = typeof welcome.node === 'string' ? welcome.node : null
    // §4.1: with an auth file, ids we choose are scoped to our principal ('alice/').
    this.scope = typeof welcome.scope === 'string' ? welcome.scope : ''
    this.limits = { ...DEFAULT_LIMITS, ...(welcome.limits || {}) }
    this.heartbeat = welcome.heartbeat ?? 5
    this.connected = true
    this._generation += 1
    this._restore()
    for (const [id, request] of this._requests) {
      if (request.resend || !request.sent) {
        request.resent = request.sent
        request.sent = true
        this._send({ ...request.message, id })
      }
    }
    this._startHeartbeat()
    for (const waiter of this._waiters.splice(0)) waiter.resolve()
    this.emit('connect')
  }

  /** The socket is gone (lost, refused, or closed by us): clean up, then reconnect. */
  _dropped (ws) {
    if (this._socket !== ws) return
    const wasConnected = this.connected
    this._socket = null
    this.connected = false
    this._stopHeartbeat()
    this._out = []
    const lost = lostConnection()
    for (const [id, request] of this._requests) {
      if (request.sent && !request.resend) { this._requests.delete(id); request.reject(lost) }
    }
    this._lost(lost)
    if (wasConnected) this.emit('disconnect')
    this._retry()
  }

  _retry () {
    if (this.closed || this._fatal) return
    this._tries += 1
    this._addressIndex = (this._addressIndex + 1) % this.addresses.length
    this.address = this.addresses[this._addressIndex]
    const rest = this._tries % this.addresses.length
    const delay = rest ? 0 : this.backoff(this._tries / this.addresses.length)
    clearTimeout(this._retryTimer)
    this._retryTimer = setTimeout(() => this._open(), delay)
  }

  /** A socket error: expected while the server is down, so reported only to listeners. */
  _connectError (cause) {
    if (!this.listenerCount('error')) return
    const error = new WsqError(`Cannot reach ${this.address}${cause && cause.message ? `: ${cause.message}` : '.'}`, 'connection_lost')
    if (cause && cause.code) error.cause = cause
    this.emit('error', error)
  }

  _startHeartbeat () {
    this._stopHeartbeat()
    if (!(this.heartbeat > 0)) return
    this._heard = Date.now()
    const interval = this.heartbeat * 1000
    // Anything received shows the path is alive (credit during a long upload, too). Dead
    // after three silent intervals (§9), but never sooner than DEAD_FLOOR: a loaded
    // machine can be silent for longer than three of the test suite's 50 ms intervals.
    const dead = Math.max(3 * interval, DEAD_FLOOR)
    this._heartbeatTimer = setInterval(() => {
      if (Date.now() - this._heard > dead) {
        // No answer for three intervals: the path is dead. Drop it and reconnect.
        const ws = this._socket
        this._dropped(ws)
        try { ws.close() } catch {}
        return
      }
      this._request({ op: 'ping' }, { resend: false }).catch(() => {})
    }, interval)
    // In Node, pings alone do not keep a process alive.
    if (typeof this._heartbeatTimer.unref === 'function') this._heartbeatTimer.unref()
  }

  _stopHeartbeat () {
    if (this._heartbeatTimer) clearInterval(this._heartbeatTimer)
    this._heartbeatTimer = null
  }

  // -- sending ------------------------------------------------------------------------------

  _nextId () { this._ids += 1; return this._ids }

  /**
   * Send a request; resolves with its result. Made while disconnected, it waits for the
   * connection. `resend`: sent again if the connection drops before the answer (else it
   * fails with 'Lost connection.'). `keep`: close() does not fail it either.
   */
  _request (message, { resend = true, keep = false } = {}) {
    const id = this._nextId()
    return new Promise((resolve, reject) => {
      if (this._fatal) { reject(this._fatal); return }
      const request = { message, resolve, reject, resend, keep, sent: this.connected, resent: false }
      this._requests.set(id, request)
      if (this.connected) this._send({ ...message, id })
    })
  }

  /** Queue a message; messages of one turn leave in one frame (§2). Dropped while
   *  disconnected (requests are kept and sent again). */
  _send (message) {
    if (!this.connected) return
    this._out.push(message)
    if (!this._flushing) {
      this._flushing = true
      queueMicrotask(() => this._flush())
    }
  }

  _flush () {
    this._flushing = false
    const messages = this._out.splice(0)
    if (!messages.length || !this._socket) return
    const limit = this.limits.max_message - 2
    let part = []
    let size = 0
    for (const message of messages) {
      const text = JSON.stringify(message)
      if (part.length && (part.length >= this.limits.batch || size + text.length + 1 > limit)) {
        this._sendFrame(part)
        part = []
        size = 0
      }
      part.push(text)
      size += text.length + 1
    }
    this._sendFrame(part)
  }

  _sendFrame (texts) {
this._socket.send(texts.length === 1 ? texts[0] : `[${texts.join(',')}]`)
  }

  _sendChunk (stream, bytes) {
    const frame = new Uint8Array(4 + bytes.byteLength)
    new DataView(frame.buffer).setUint32(0, stream)
    frame.set(bytes, 4)
    this._flush() // control messages sent earlier go first
    this._socket.send(frame)
  }

  /** Resolves when the socket's buffer has room (backpressure for streams). */
  async _drained () {
    while (this._socket && this._socket.bufferedAmount > SEND_BUFFER) await sleep(5)
  }

  // -- receiving ----------------------------------------------------------------------------

  _receive (data) {
    if (typeof data !== 'string') { this._receiveChunk(new Uint8Array(data)); return }
    const decoded = JSON.parse(data)
    const errors = []
    for (const message of Array.isArray(decoded) ? decoded : [decoded]) {
      try {
        this._handle(message)
      } catch (error) {
        errors.push(error)
      }
    }
    // After the whole frame, so one throwing listener does not lose the messages after it.
    for (const error of errors) this.emit('error', error)
  }

  _handle (message) {
    switch (message.op) {
      case 'result': {
        const request = this._requests.get(message.id)
        if (request) { this._requests.delete(message.id); request.resolve(message.result) }
        break
      }
      case 'error': {
        const request = message.id == null ? null : this._requests.get(message.id)
        const error = new WsqError(message.message, message.code)
        if (!request) { this.emit('error', error); break }
        this._requests.delete(message.id)
        error.resent = request.resent
        request.reject(error)
        break
      }
      default: {
        const handler = this._receivers[message.op]
        if (handler) handler.call(this, message) // unknown ops are ignored (§10)
      }
    }
  }

  _receiveChunk (frame) {
    if (frame.byteLength < 4) return
    const stream = new DataView(frame.buffer, frame.byteOffset).getUint32(0)
    const download = this._downloads.get(stream)
    if (download) download.receive(frame.subarray(4))
  }
}
