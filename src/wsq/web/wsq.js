// wsq.js: the browser client for wsq, a WebSocket task queue whose tasks carry streams.
// An ES module with no dependencies and no build step. It speaks the wire protocol in
// docs/protocol.md (version 1) and nothing else. MIT licensed.
//
//   import { Client } from '/wsq.js'
//   const client = new Client('ws://localhost:4242', { token })
//   const task = await client.queue('video').add({ file: pickedFile }, { timeout: 60000 })
//
// Times in this API are milliseconds, as in the original wsq; the wire uses seconds.

const PROTOCOL = 1
const DEFAULT_LIMITS = {
  max_message: 1 << 20, window: 8 << 20, chunk: 1 << 20, inline: 1 << 16, batch: 1000,
}
const SEND_BUFFER = 4 << 20 // bytes the socket may hold before a stream waits
const BLOB_READ = 8 << 20 // bytes of a Blob or File read at once

/** The seed's backoff: milliseconds before reconnect attempt `tries`. */
export function defaultBackoff (tries) {
  return Math.min((tries * 10) ** 2, 60 * 1000)
}

/** Every error from the server or the connection; `code` is the wire code (§7). */
export class WsqError extends Error {
  constructor (message, code = 'error') {
    super(message)
    this.name = 'WsqError'
    this.code = code
  }
}

// -- events ---------------------------------------------------------------------------------

class Emitter {
  constructor () { this._handlers = new Map() }

  /** Call `fn(...args)` on every `name` event; returns `fn`. */
  on (name, fn) {
    if (!this._handlers.has(name)) this._handlers.set(name, new Set())
    this._handlers.get(name).add(fn)
    this._listening(name)
    return fn
  }

  once (name, fn) {
    const wrapper = (...args) => { this.off(name, wrapper); fn(...args) }
    return this.on(name, wrapper)
  }

  off (name, fn) {
    const handlers = this._handlers.get(name)
    if (handlers) handlers.delete(fn)
  }

  listens (name) {
    const handlers = this._handlers.get(name)
    return Boolean(handlers && handlers.size)
  }

  emit (name, ...args) {
    const handlers = this._handlers.get(name)
    if (!handlers) return
    for (const fn of [...handlers]) {
      try {
        fn(...args)
      } catch (error) {
        if (name !== 'error' && this.listens('error')) this.emit('error', error)
        else setTimeout(() => { throw error })
      }
    }
  }

  _listening (name) {}
}

const SERVER_EVENTS = new Set([
  'task added', 'task queued', 'task started', 'task progress', 'task completed',
  'task failed', 'task deleted', 'worker added', 'worker removed', 'worker started',
])
const TASK_EVENTS = new Set(['added', 'queued', 'started', 'progress', 'completed', 'failed', 'deleted'])

// -- the client -----------------------------------------------------------------------------

/**
 * A connection to a wsq server. It connects at once and reconnects with `backoff` after
 * a loss; requests made meanwhile wait, and requests in flight are sent again.
 * Events: 'connect', 'disconnect', 'error', and the server events (task added, ...).
 */
export class Client extends Emitter {
  constructor (address, options = {}) {
    super()
    this.address = address
    this.backoff = options.backoff || defaultBackoff
    this.token = options.token ?? null
    this.connected = false
    this.closed = false
    this.limits = { ...DEFAULT_LIMITS }
    this.heartbeat = 5
    this._session = randomHex(16)
    this._idPrefix = randomHex(8)
    this._taskCounter = 0
    this._ids = 0
    this._streamIds = 0
    this._ws = null
    this._out = []
    this._flushing = false
    this._requests = new Map() // id -> {message, resolve, reject, resend}
    this._queues = new Map()
    this._workers = new Map()
    this._subscriptions = new Map() // queue name or '' (all) -> count
    this._watched = new Map() // task id -> Set<Task>
    this._uploads = new Map()
    this._downloads = new Map()
    this._eventStreams = new Set()
    this._waiters = []
    this._tries = 0
    this._heartbeatTimer = null
    this._open()
  }

  /** The queue `name` (the same object each time). */
  queue (name) {
    let queue = this._queues.get(name)
    if (!queue) {
      queue = new Queue(this, name)
      this._queues.set(name, queue)
    }
    return queue
  }

  /** Queues that hold tasks or workers on the server. */
  async listQueues () {
    const result = await this._request({ op: 'queues' })
    return result.queues.map((name) => this.queue(name))
  }

  /** Every queue's task counts by state and its workers (the server keeps the counts). */
  stats () { return this._request({ op: 'stats' }) }

  /** Every server event as `{event, args}`, in a ReadableStream. */
  getEventStream () {
    let controller
    const stream = new ReadableStream({
      start: (c) => { controller = c; this._eventStreams.add(c); this._subscribe('') },
      cancel: () => { this._eventStreams.delete(controller); this._unsubscribe('') },
    })
    return stream
  }

  /** Resolves once connected (at once if connected). */
  ready () {
    if (this.connected) return Promise.resolve()
    if (this.closed) return Promise.reject(new WsqError('The client is closed.'))
    return new Promise((resolve, reject) => this._waiters.push({ resolve, reject }))
  }

  /** Disconnect for good; pending requests fail. */
  close () {
    if (this.closed) return
    this.closed = true
    clearTimeout(this._retryTimer)
    this._stopHeartbeat()
    for (const worker of this._workers.values()) worker._cancel()
    if (this._ws) this._ws.close(1000)
    this._failAll(new WsqError('The client was closed.'))
    for (const waiter of this._waiters.splice(0)) waiter.reject(new WsqError('The client is closed.'))
    for (const c of this._eventStreams) { try { c.close() } catch {} }
  }

  newTaskId () {
    this._taskCounter += 1
    return this._idPrefix + this._taskCounter.toString(16)
  }

  _listening (name) {
    if (SERVER_EVENTS.has(name)) this._subscribe('')
  }

  // -- connection --------------------------------------------------------------------------

  _open () {
    if (this.closed) return
    let ws
    try {
      ws = new WebSocket(this.address)
    } catch (error) {
      this.emit('error', error)
      this._retry()
      return
    }
    ws.binaryType = 'arraybuffer'
    let greeted = false
    ws.onopen = () => {
      const hello = { op: 'hello', protocol: PROTOCOL, client: 'wsq-js', session: this._session }
      if (this.token != null) hello.token = this.token
      ws.send(JSON.stringify(hello))
    }
    ws.onmessage = (event) => {
      if (!greeted) {
        const welcome = JSON.parse(event.data)
        if (welcome.op !== 'welcome') {
          const error = new WsqError(welcome.message || 'The server refused the hello.', welcome.code)
          this.emit('error', error)
          if (welcome.code === 'unauthorized') {
            for (const waiter of this._waiters.splice(0)) waiter.reject(error)
            this._failAll(error)
            this.closed = true
          }
          ws.close()
          return
        }
        greeted = true
        this._session_start(ws, welcome)
        return
      }
      this._receive(event.data)
    }
    ws.onerror = () => {
      if (this.listens('error')) this.emit('error', new WsqError(`Cannot reach ${this.address}.`, 'connection_lost'))
    }
    ws.onclose = () => {
      const wasConnected = greeted
      if (this._ws === ws) this._lost()
      if (wasConnected) this.emit('disconnect')
      this._retry()
    }
  }

  _session_start (ws, welcome) {
    this._ws = ws
    this._tries = 0
    this.limits = { ...DEFAULT_LIMITS, ...(welcome.limits || {}) }
    this.heartbeat = welcome.heartbeat || 5
    this.connected = true
    // Restore what the server forgot: subscriptions, workers, requests in flight.
    for (const queue of this._subscriptions.keys()) {
      this._sendNow({ op: 'subscribe', id: this._nextId(), queue: queue === '' ? null : queue })
    }
    for (const worker of this._workers.values()) worker._register()
    for (const [id, request] of this._requests) {
      if (request.resend) this._sendNow({ ...request.message, id })
    }
    this._startHeartbeat()
    for (const waiter of this._waiters.splice(0)) waiter.resolve()
    this.emit('connect')
  }

  _retry () {
    if (this.closed) return
    this._tries += 1
    this._retryTimer = setTimeout(() => this._open(), this.backoff(this._tries))
  }

  _lost () {
    this._ws = null
    this.connected = false
    this._stopHeartbeat()
    this._out = []
    const lost = new WsqError('The connection to the server was lost.', 'connection_lost')
    for (const [id, request] of this._requests) {
      if (!request.resend) { this._requests.delete(id); request.reject(lost) }
    }
    for (const upload of this._uploads.values()) upload.fail(lost)
    this._uploads.clear()
    for (const download of this._downloads.values()) download.fail(lost)
    this._downloads.clear()
  }

  _failAll (error) {
    for (const request of this._requests.values()) request.reject(error)
    this._requests.clear()
  }

  _startHeartbeat () {
    this._stopHeartbeat()
    let lastAnswer = Date.now()
    const interval = this.heartbeat * 1000
    this._heartbeatTimer = setInterval(() => {
      if (Date.now() - lastAnswer > 3 * interval) {
        // No answer for three intervals: the path is dead. Drop it and reconnect.
        const ws = this._ws
        if (ws) { this._lost(); this.emit('disconnect'); ws.onclose = null; ws.close(); this._retry() }
        return
      }
      this._request({ op: 'ping' }, { resend: false }).then(() => { lastAnswer = Date.now() }, () => {})
    }, interval)
  }

  _stopHeartbeat () {
    if (this._heartbeatTimer) clearInterval(this._heartbeatTimer)
    this._heartbeatTimer = null
  }

  // -- sending -----------------------------------------------------------------------------

  _nextId () { this._ids += 1; return this._ids }

  /** Send a request; resolves with its result. Waits for the connection if needed. */
  _request (message, { resend = true } = {}) {
    const id = this._nextId()
    return new Promise((resolve, reject) => {
      this._requests.set(id, { message, resolve, reject, resend })
      if (this.connected) this._send({ ...message, id })
      else if (this.closed) { this._requests.delete(id); reject(new WsqError('The client is closed.')) }
    })
  }

  /** Queue a message; messages of one turn leave in one frame (§2). */
  _send (message) {
    if (!this.connected) return
    this._out.push(message)
    if (!this._flushing) {
      this._flushing = true
      queueMicrotask(() => this._flush())
    }
  }

  _sendNow (message) {
    this._ws.send(JSON.stringify(message))
  }

  _flush () {
    this._flushing = false
    const messages = this._out.splice(0)
    if (!messages.length || !this._ws) return
    const batch = this.limits.batch
    for (let i = 0; i < messages.length; i += batch) {
      const part = messages.slice(i, i + batch)
      this._ws.send(JSON.stringify(part.length === 1 ? part[0] : part))
    }
  }

  _sendChunk (stream, bytes) {
    const frame = new Uint8Array(4 + bytes.byteLength)
    new DataView(frame.buffer).setUint32(0, stream)
    frame.set(bytes, 4)
    this._flush() // control messages sent earlier go first
    this._ws.send(frame)
  }

  /** Resolves when the socket's buffer has room (backpressure for streams). */
  async _drained () {
    while (this._ws && this._ws.bufferedAmount > SEND_BUFFER) {
      await sleep(5)
    }
  }

  // -- receiving ---------------------------------------------------------------------------

  _receive (data) {
    if (typeof data !== 'string') { this._receiveChunk(new Uint8Array(data)); return }
    const decoded = JSON.parse(data)
    for (const message of Array.isArray(decoded) ? decoded : [decoded]) {
      try {
        this._handle(message)
      } catch (error) {
        this.emit('error', error)
      }
    }
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
        if (request) { this._requests.delete(message.id); request.reject(error) } else this.emit('error', error)
        break
      }
      case 'event': this._onEvent(message.event, message.args); break
      case 'offer': {
        const worker = this._workers.get(message.worker)
        if (worker) worker._offer(message.tasks)
        break
      }
      case 'abort': {
        const worker = this._workers.get(message.worker)
        if (worker) worker._abort(message.task, message.run, message.reason)
        break
      }
      case 'credit': {
        const upload = this._uploads.get(message.stream)
        if (upload) upload.grant(message.bytes)
        break
      }
      case 'end': {
        const download = this._downloads.get(message.stream)
        if (download) { this._downloads.delete(message.stream); download.end() }
        break
      }
      case 'stream_error': {
        const error = new WsqError(message.message, message.code)
        const download = this._downloads.get(message.stream)
        if (download) { this._downloads.delete(message.stream); download.fail(error) }
        const upload = this._uploads.get(message.stream)
        if (upload) upload.fail(error)
        break
      }
      default: break // unknown ops are ignored (§10)
    }
  }

  _receiveChunk (frame) {
    if (frame.byteLength < 4) return
    const stream = new DataView(frame.buffer, frame.byteOffset).getUint32(0)
    const download = this._downloads.get(stream)
    if (download) download.receive(frame.subarray(4))
  }

  _onEvent (name, args) {
    const isTask = name.startsWith('task ')
    const values = isTask ? [this._taskFrom(args[0]), ...args.slice(1)] : args
    const queueName = isTask ? args[0].queue : args[0] && args[0].queue
    this.emit(name, ...values)
    const queue = this._queues.get(queueName)
    if (queue) queue.emit(name, ...values)
    if (isTask) {
      const short = name.slice(5)
      for (const task of this._watched.get(args[0].id) || []) {
        task._update(args[0])
        task.emit(short, task, ...args.slice(1))
      }
    }
    for (const c of this._eventStreams) {
      try { c.enqueue({ event: name, args }) } catch {}
    }
  }

  _taskFrom (json) { return new Task(this, json) }

  _subscribe (queue) {
    const count = this._subscriptions.get(queue) || 0
    this._subscriptions.set(queue, count + 1)
    if (count === 0) this._request({ op: 'subscribe', queue: queue === '' ? null : queue }).catch((e) => this.emit('error', e))
  }

  _unsubscribe (queue) {
    const count = this._subscriptions.get(queue) || 0
    if (count <= 1) {
      this._subscriptions.delete(queue)
      if (count === 1 && this.connected) this._request({ op: 'unsubscribe', queue: queue === '' ? null : queue }).catch(() => {})
    } else {
      this._subscriptions.set(queue, count - 1)
    }
  }

  _watch (task) {
    if (!this._watched.has(task.id)) this._watched.set(task.id, new Set())
    this._watched.get(task.id).add(task)
    this._subscribe(task.queue)
  }

  // -- tasks and streams -------------------------------------------------------------------

  async _add (queue, data, options) {
    const { plain, found } = extract(data)
    const message = { op: 'add', queue, data: plain, options: wireOptions(options), task: options.id || this.newTaskId() }
    if (!found.length) return this._request(message)
    await this.ready()
    const streams = []
    const uploads = []
    let total = 0
    let knownTotal = true
    for (const { path, value } of found) {
      const size = byteSize(value)
      if (size == null) knownTotal = false
      else total += size
      if (size != null && size <= this.limits.inline && !(value instanceof ReadableStream)) {
        streams.push({ path, inline: base64(await bytesOf(value)) })
        continue
      }
      this._streamIds += 1
      const upload = new Upload(this, this._streamIds)
      this._uploads.set(upload.stream, upload)
      uploads.push({ upload, value })
      streams.push({ path, upload: upload.stream })
    }
    const progress = options.onUploadProgress
    let sent = 0
    const report = progress ? (n) => { sent += n; progress(sent, knownTotal ? total : null) } : null
    const results = await Promise.allSettled(uploads.map(({ upload, value }) => upload.send(value, report)))
    for (const { upload } of uploads) this._uploads.delete(upload.stream)
    const failed = results.find((r) => r.status === 'rejected')
    if (failed) {
      for (const { upload } of uploads) upload.abort(failed.reason)
      throw failed.reason
    }
    message.streams = streams
    return this._request(message, { resend: !uploads.length })
  }

  /** A ReadableStream of one stream of a task, downloaded as it is read. */
  _streamOf (taskId, index, ref) {
    if (ref.inline != null) {
      const bytes = unbase64(ref.inline)
      return new ReadableStream({
        start (controller) { if (bytes.byteLength) controller.enqueue(bytes); controller.close() },
      })
    }
    let download = null
    return new ReadableStream({
      pull: async (controller) => {
        if (!download) download = this._download(taskId, index)
        const chunk = await download.next()
        if (chunk === null) controller.close()
        else controller.enqueue(chunk)
      },
      cancel: () => { if (download) download.cancel() },
    }, { highWaterMark: 0 })
  }

  _download (taskId, index) {
    this._streamIds += 1
    const download = new Download(this, this._streamIds)
    this._downloads.set(download.stream, download)
    this._send({ op: 'download', stream: download.stream, task: taskId, index })
    return download
  }

  async _getData (taskId) {
    const result = await this._request({ op: 'get', task: taskId })
    return resolveStreams(this, taskId, result.data, result.streams)
  }
}

// -- queues, tasks, workers -----------------------------------------------------------------

/** One queue: add tasks, process them, list them, listen to its events. */
export class Queue extends Emitter {
  constructor (client, name) {
    super()
    this.client = client
    this.name = name
  }

  /**
   * Add a task; resolves with the Task once it (and its streams) are stored durably.
   * Options: timeout (ms, -1 none, default 60000), retries (default 0, -1 forever),
   * autoremove (default false), id (your task id), onUploadProgress(sent, total).
   */
  async add (data, options = {}) {
    const json = await this.client._add(this.name, data, options)
    return new Task(this.client, json)
  }

  /** Process tasks with `handler(task)`, which may return a promise; returns the Worker. */
  process (handler, { concurrency = 1 } = {}) {
    const worker = new Worker(this.client, this.name, handler, concurrency)
    this.client._workers.set(worker.id, worker)
    if (this.client.connected) worker._register()
    return worker
  }

  all (options) { return this._list(null, options) }
  waiting (options) { return this._list('waiting', options) }
  active (options) { return this._list('active', options) }
  completed (options) { return this._list('completed', options) }
  failed (options) { return this._list('failed', options) }

  /** Tasks in queue order. `{limit, cursor}` pages; the array has `.cursor` (or null). */
  async _list (state, { limit = 1000, cursor = null } = {}) {
    const message = { op: 'list', queue: this.name, limit }
    if (state) message.state = state
    if (cursor) message.cursor = cursor
    const result = await this.client._request(message)
    const tasks = result.tasks.map((json) => new Task(this.client, json))
    tasks.cursor = result.cursor
    return tasks
  }

  _listening (name) {
    if (SERVER_EVENTS.has(name)) this.client._subscribe(this.name)
  }
}

/** A task, as listed, added, or handed to a worker (then `data` is resolved). */
export class Task extends Emitter {
  constructor (client, json, run = null) {
    super()
    this.client = client
    this.id = json.id
    this.queue = json.queue
    this.data = undefined
    this.run = run
    this.aborted = false
    this._update(json)
  }

  _update (json) {
    this.state = json.state
    this.progress = json.progress
    this.retries = json.retries
    this.error = json.error
    this.worker = json.worker
    this.created = json.created
    this.updated = json.updated
    const o = json.options || {}
    this.options = { timeout: o.timeout === -1 ? -1 : Math.round((o.timeout ?? 60) * 1000), retries: o.retries ?? 0, autoremove: Boolean(o.autoremove) }
  }

  /** In a handler: report progress (0..1); resets the timeout. */
  updateProgress (fraction) { return this._report({ op: 'progress', progress: fraction }) }

  /** In a handler: reset the timeout. */
  touch () { return this._report({ op: 'touch' }) }

  /** Delete the task (any state) and its streams. */
  async remove () { await this.client._request({ op: 'remove', task: this.id }) }

  /** Queue a failed task again. */
  async retry () {
    const json = await this.client._request({ op: 'retry', task: this.id })
    this._update(json)
  }

  /** The task's data, each stream a ReadableStream of Uint8Array. */
  getData () { return this.client._getData(this.id) }

  async _report (fields) {
    if (this.run == null) throw new WsqError('Only a task handed to a worker can report.', 'invalid_state')
    await this.client._request({ ...fields, task: this.id, run: this.run }, { resend: true })
  }

  _listening (name) {
    if (TASK_EVENTS.has(name) || name === 'abort') this.client._watch(this)
  }
}

/** A queue's worker: runs the handler for each offered task, `concurrency` at once. */
export class Worker {
  constructor (client, queue, handler, concurrency) {
    this.client = client
    this.queue = queue
    this.id = randomHex(16)
    this.concurrency = concurrency
    this.running = new Map() // task id -> Task
    this._handler = handler
    this._stopped = false
    this._done = []
    this._completing = []
  }

  /** No new tasks; resolves when the running ones are done. */
  async stop () {
    this._stopped = true
    this.client._workers.delete(this.id)
    if (this.client.connected) await this.client._request({ op: 'stop', worker: this.id }).catch(() => {})
    while (this.running.size) await new Promise((resolve) => this._done.push(resolve))
  }

  _cancel () { this._stopped = true }

  _register () {
    this.client._request({ op: 'work', queue: this.queue, concurrency: this.concurrency, worker: this.id }, { resend: false })
      .catch((error) => this.client.emit('error', error))
  }

  _offer (offers) {
    this.client._send({ op: 'ack', runs: offers.map((o) => [o.task.id, o.run]) })
    for (const offer of offers) this._run(offer)
  }

  async _run (offer) {
    const task = new Task(this.client, offer.task, offer.run)
    task.data = resolveStreams(this.client, task.id, offer.data, offer.streams)
    this.running.set(task.id, task)
    let error = null
    try {
      if (this._handler.length >= 2) {
        await new Promise((resolve, reject) => {
          const result = this._handler(task, (e) => (e ? reject(e) : resolve()))
          if (result && typeof result.then === 'function') result.then(resolve, reject)
        })
      } else {
        await this._handler(task)
      }
    } catch (e) {
      error = e
    }
    this.running.delete(task.id)
    if (!task.aborted) {
      if (error) {
        const text = String((error && error.message) || error).slice(0, 65536)
        this.client._send({ op: 'fail', task: task.id, run: task.run, error: text })
      } else {
        this._complete(task)
      }
    }
    for (const resolve of this._done.splice(0)) resolve()
  }

  _complete (task) {
    this._completing.push([task.id, task.run])
    if (this._completing.length === 1) {
      queueMicrotask(() => {
        const runs = this._completing.splice(0)
        this.client._send({ op: 'complete_many', runs })
      })
    }
  }

  _abort (taskId, run, reason) {
    const task = this.running.get(taskId)
    if (task && task.run === run) {
      task.aborted = true
      task.emit('abort', reason)
    }
  }
}

// -- streams --------------------------------------------------------------------------------

/** One stream the client is sending, within the credit the server grants (§8.3). */
class Upload {
  constructor (client, stream) {
    this.client = client
    this.stream = stream
    this.credit = client.limits.window
    this.error = null
    this._wake = null
  }

  grant (count) { this.credit += count; this._notify() }
  fail (error) { this.error = error; this._notify() }
  _notify () { if (this._wake) { const wake = this._wake; this._wake = null; wake() } }

  async _waitFor (need) {
    while (this.credit < need && !this.error) await new Promise((resolve) => { this._wake = resolve })
    if (this.error) throw this.error
  }

  async send (value, report) {
    const client = this.client
    client._send({ op: 'upload', stream: this.stream })
    const chunk = client.limits.chunk
    for await (const piece of chunks(value, chunk)) {
      await this._waitFor(piece.byteLength)
      await client._drained()
      if (this.error) throw this.error
      if (!client.connected) throw new WsqError('The connection dropped during an upload.', 'connection_lost')
      this.credit -= piece.byteLength
      client._sendChunk(this.stream, piece)
      if (report) report(piece.byteLength)
    }
    if (this.error) throw this.error
    client._send({ op: 'upload_end', stream: this.stream })
  }

  abort (reason) {
    if (this.client.connected) {
      const error = String((reason && reason.message) || reason).slice(0, 1000)
      this.client._send({ op: 'upload_abort', stream: this.stream, error })
    }
  }
}

/** One stream the server is sending; credit goes back as chunks are read. */
class Download {
  constructor (client, stream) {
    this.client = client
    this.stream = stream
    this.chunks = []
    this.ended = false
    this.error = null
    this._wake = null
  }

  receive (bytes) { this.chunks.push(bytes); this._notify() }
  end () { this.ended = true; this._notify() }
  fail (error) { this.error = error; this._notify() }
  _notify () { if (this._wake) { const wake = this._wake; this._wake = null; wake() } }

  async next () {
    while (!this.chunks.length && !this.ended && !this.error) {
      await new Promise((resolve) => { this._wake = resolve })
    }
    if (this.chunks.length) {
      const chunk = this.chunks.shift()
      if (this.client.connected) this.client._send({ op: 'credit', stream: this.stream, bytes: chunk.byteLength })
      return chunk
    }
    if (this.error) throw this.error
    return null
  }

  cancel () {
    this.client._downloads.delete(this.stream)
    if (this.client.connected && !this.ended) this.client._send({ op: 'cancel', stream: this.stream })
  }
}

function isStream (value) {
  return value instanceof Uint8Array || value instanceof ArrayBuffer ||
    (typeof Blob !== 'undefined' && value instanceof Blob) ||
    (typeof ReadableStream !== 'undefined' && value instanceof ReadableStream)
}

/** Split data into JSON with nulls where streams were, and the streams with their paths. */
function extract (data) {
  const found = []
  const walk = (value, path) => {
    if (isStream(value)) { found.push({ path, value }); return null }
    if (Array.isArray(value)) return value.map((v, i) => walk(v, [...path, i]))
    if (value && typeof value === 'object' && Object.getPrototypeOf(value) === Object.prototype) {
      const out = {}
      for (const [key, v] of Object.entries(value)) out[key] = walk(v, [...path, key])
      return out
    }
    return value === undefined ? null : value
  }
  const plain = walk(data, [])
  return { plain, found }
}

/** Data as the server sent it, each stream in place as a ReadableStream. */
function resolveStreams (client, taskId, data, streams) {
  let root = data
  ;(streams || []).forEach((ref, index) => {
    const stream = client._streamOf(taskId, index, ref)
    if (!ref.path.length) { root = stream; return }
    let parent = root
    for (const key of ref.path.slice(0, -1)) parent = parent[key]
    parent[ref.path[ref.path.length - 1]] = stream
  })
  return root
}

function byteSize (value) {
  if (value instanceof Uint8Array || value instanceof ArrayBuffer) return value.byteLength
  if (typeof Blob !== 'undefined' && value instanceof Blob) return value.size
  return null
}

async function bytesOf (value) {
  if (value instanceof Uint8Array) return value
  if (value instanceof ArrayBuffer) return new Uint8Array(value)
  return new Uint8Array(await value.arrayBuffer())
}

/** Pieces of at most `size` bytes; a Blob is read a slice at a time (bounded memory). */
async function * chunks (value, size) {
  if (value instanceof ArrayBuffer) value = new Uint8Array(value)
  if (value instanceof Uint8Array) {
    for (let at = 0; at < value.byteLength; at += size) yield value.subarray(at, at + size)
    return
  }
  if (typeof Blob !== 'undefined' && value instanceof Blob) {
    // Each read of a File crosses to the browser's file thread: read several chunks at
    // once (BLOB_READ bytes), and read the next while this one is sent.
    const step = Math.max(size, BLOB_READ - (BLOB_READ % size))
    let next = value.slice(0, step).arrayBuffer()
    for (let at = 0; at < value.size; at += step) {
      const bytes = new Uint8Array(await next)
      if (at + step < value.size) next = value.slice(at + step, at + 2 * step).arrayBuffer()
      for (let i = 0; i < bytes.byteLength; i += size) yield bytes.subarray(i, i + size)
    }
    return
  }
  const reader = value.getReader()
  try {
    while (true) {
      const { done, value: part } = await reader.read()
      if (done) return
      let bytes = part
      if (bytes instanceof ArrayBuffer) bytes = new Uint8Array(bytes)
      if (!(bytes instanceof Uint8Array)) throw new TypeError('A stream yielded something other than bytes.')
      for (let at = 0; at < bytes.byteLength; at += size) yield bytes.subarray(at, at + size)
    }
  } finally {
    reader.releaseLock()
  }
}

// -- helpers --------------------------------------------------------------------------------

function wireOptions (options) {
  const out = {}
  if (options.timeout != null) out.timeout = options.timeout === -1 ? -1 : options.timeout / 1000
  if (options.retries != null) out.retries = options.retries
  if (options.autoremove != null) out.autoremove = Boolean(options.autoremove)
  return out
}

function randomHex (bytes) {
  const values = new Uint8Array(bytes)
  crypto.getRandomValues(values)
  return Array.from(values, (b) => b.toString(16).padStart(2, '0')).join('')
}

function base64 (bytes) {
  let text = ''
  for (let i = 0; i < bytes.length; i += 0x8000) text += String.fromCharCode(...bytes.subarray(i, i + 0x8000))
  return btoa(text)
}

function unbase64 (text) {
  const raw = atob(text)
  const bytes = new Uint8Array(raw.length)
  for (let i = 0; i < raw.length; i++) bytes[i] = raw.charCodeAt(i)
  return bytes
}

function sleep (ms) { return new Promise((resolve) => setTimeout(resolve, ms)) }
