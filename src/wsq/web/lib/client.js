// The Client: the API on top of the connection, and what the server sends it
// (results, events, offers, aborts, stream data).

import { Connection } from './connection.js'
import { platform } from './platform.js'
import { Queue, SERVER_EVENTS } from './queue.js'
import { Download, StreamSource, Upload, extract, inlineOf, byteSize, resolveStreams } from './streams.js'
import { Task, wireOptions } from './tasks.js'
import { WsqError, checkCallback, checkType, describe, lostConnection, optionsAndCallback, randomHex, settle } from './util.js'

// How often a worker sends again a report the server could not store (unavailable): after
// 0.25 s, doubling up to 5 s, about 33 s in all; then the run times out and runs again.
const REPORT_RETRIES = 10
const CLIENT_OPTIONS = ['backoff', 'token']

/**
 * A connection to a wsq server. It connects at once and reconnects with `backoff` after
 * a loss; requests made meanwhile wait, and requests in flight are sent again.
 * Events: 'connect', 'disconnect', 'error', and the server events (task added, ...).
 */
export class Client extends Connection {
  constructor (address, options = {}) {
    const addresses = Array.isArray(address) ? address : [address]
    if (addresses.length === 0) throw new TypeError('new Client: the address list is empty.')
    for (const one of addresses) {
      checkType('new Client: the address', one, 'string')
      if (!/^wss?:\/\/[^/?#\s]+/i.test(one)) throw new TypeError(`new Client: the address must be a ws:// or wss:// URL, not '${one}'.`)
    }
    if (options == null || typeof options !== 'object') throw new TypeError(`new Client: options must be an object, not ${describe(options)}.`)
    for (const key of Object.keys(options)) {
      if (!CLIENT_OPTIONS.includes(key)) throw new TypeError(`new Client: unknown option '${key}' (known: ${CLIENT_OPTIONS.join(', ')}).`)
    }
    if (options.backoff != null) checkType('new Client: backoff', options.backoff, 'function')
    if (options.token != null) checkType('new Client: token', options.token, 'string')
    super(addresses, { backoff: options.backoff ?? undefined, token: options.token ?? null })
    this._idPrefix = randomHex(8)
    this._taskCounter = 0
    this._streamIds = 0
    this._queues = new Map()
    this._workers = new Map()
    this._subscriptions = new Map() // queue name or '' (all) -> {count, loud, error}
    this._watched = new Map() // task id -> Set<Task>
    this._unscoped = new Set() // tasks added before the first welcome told the scope
    this._uploads = new Map()
    this._downloads = new Map()
    this._sources = new Set() // task streams of this connection not yet finished
    this._eventStreams = new Set()
    this._completing = []
    this._reporting = new Set() // `${task id} ${run}` of the runs whose report is on its way
    this.on('newListener', (name) => { if (SERVER_EVENTS.has(name)) this._subscribe('') })
    this.on('removeListener', (name) => { if (SERVER_EVENTS.has(name)) this._unsubscribe('') })
    this._open()
  }

  /** The queue `name` (the same object each time). */
  queue (name) {
    checkType('client.queue: the name', name, 'string')
    let queue = this._queues.get(name)
    if (!queue) {
      queue = new Queue(this, name)
      this._queues.set(name, queue)
    }
    return queue
  }

  /** Queues that hold tasks or workers on the server, in name order. */
  listQueues (callback) {
    checkCallback('client.listQueues', callback)
    const listed = this._pages({ op: 'queues' }).then((names) => names.map((name) => this.queue(name)))
    return settle(listed, callback)
  }

  /** Every queue's task counts by state and its workers (the server keeps the counts),
   *  in name order. */
  stats (callback) {
    checkCallback('client.stats', callback)
    return settle(this._pages({ op: 'stats' }).then((queues) => ({ queues })), callback)
  }

  /** Every page of a listing (`queues`, `stats`, `workers`), cursor to cursor (the first
   *  asked for as before pages, so that a server without them answers it whole); `field`
   *  holds a page's items. */
  async _pages (message, field = 'queues') {
    const found = []
    for (;;) {
      const result = await this._request({ ...message })
      found.push(...result[field])
      if (result.cursor == null) return found
      message = { ...message, cursor: result.cursor }
    }
  }

  /** The workers connected now (of `queue`, or of every queue), each with the runs it
   *  holds; times in ms (docs/protocol.md, `workers`). */
  workers (queue = null, callback = undefined) {
    if (typeof queue === 'function') { callback = queue; queue = null }
    if (queue != null) checkType('client.workers: the queue', queue, 'string')
    checkCallback('client.workers', callback)
    const message = queue == null ? { op: 'workers' } : { op: 'workers', queue }
    const listed = this._pages(message, 'workers').then((workers) => workers.map(workerInfo))
    return settle(listed, callback)
  }

  /** The task `id` as the server has it now, its `data` fetched (streams read lazily).
   *  Rejects with code 'not_found' if there is none. */
  getTask (id, callback) {
    checkType('client.getTask: the id', id, 'string')
    checkCallback('client.getTask', callback)
    const got = this._request({ op: 'get', task: id }).then((result) => {
      const task = new Task(this, result.task)
      task.data = resolveStreams(this, id, result.data, result.streams)
      return task
    })
    return settle(got, callback)
  }

  /** The runs of task `id`, oldest first (docs/protocol.md, `attempts`): each `{run,
   *  worker, client, node, offered, started, ended, outcome, error, progress}`, times in
   *  ms (null when unknown); the run in progress, if any, comes last with `ended` and
   *  `outcome` null. Rejects with code 'not_found' if there is no such task (or the token
   *  may not read it). */
  attempts (id, callback) {
    checkType('client.attempts: the id', id, 'string')
    checkCallback('client.attempts', callback)
    const listed = this._request({ op: 'attempts', task: id }).then((result) => result.attempts.map(attemptInfo))
    return settle(listed, callback)
  }

  /** The last hour of queue `name`, second by second (docs/protocol.md §4.6), for charts:
   *  `{queue, start, end, added, completed, failed, waiting, latency}`, one list entry
   *  per second from `start` to `end` (milliseconds since the epoch, each a second's
   *  start; the last second is still in progress). `latency` entries are milliseconds,
   *  `waiting` and `latency` entries null when not measured. `options.since` (ms, or a
   *  Date) asks for the seconds from then on only. */
  history (name, options, callback) {
    checkType('client.history: the queue name', name, 'string')
    const [opts, done] = optionsAndCallback('client.history', options, callback, ['since'])
    const message = { op: 'history', queue: name }
    if (opts.since != null) {
      const since = opts.since instanceof Date ? opts.since.getTime() : opts.since
      if (typeof since !== 'number' || !Number.isFinite(since) || since < 0) {
        throw new TypeError(`client.history: since must be a time in ms or a Date, not ${describe(opts.since)}.`)
      }
      message.since = Math.floor(since / 1000)
    }
    return settle(this._request(message).then(historyFromWire), done)
  }

  /** Every server event as `{event, args}`: a ReadableStream (browsers) or an object-mode
   *  Readable (Node). */
  getEventStream () {
    const events = platform.eventStream(() => {
      if (this._eventStreams.delete(events)) this._unsubscribe('')
    })
    this._eventStreams.add(events)
    this._subscribe('')
    return events.stream
  }

  close () {
    for (const events of this._eventStreams) events.close()
    return super.close()
  }

  newTaskId () {
    this._taskCounter += 1
    return this._idPrefix + this._taskCounter.toString(16)
  }

  // -- after (re)connecting, after a loss --------------------------------------------------

  /** Restore what the server forgot: subscriptions and workers (requests follow). */
  _restore () {
    // Adds made before the first welcome: their ids get the scope before the adds go out,
    // so that their events (sent before the answers) find them.
    for (const task of this._unscoped) this._rekey(task, this.scope + task._chosen)
    this._unscoped.clear()
    for (const queue of this._subscriptions.keys()) this._sendSubscribe('subscribe', queue)
    for (const worker of this._workers.values()) if (!worker.stopped) worker._register()
  }

  _lost (lost) {
    for (const upload of this._uploads.values()) upload.fail(lost)
    this._uploads.clear()
    for (const download of this._downloads.values()) download.fail(lost)
    this._downloads.clear()
    for (const source of [...this._sources]) source.lost(lost)
    this._sources.clear()
  }

  // -- subscriptions and watched tasks -----------------------------------------------------

  /** One more reason to receive `queue`'s events ('' = all queues). A `quiet` one (a task
   *  being added) does not report a refused subscription: only listeners need it. */
  _subscribe (queue, { quiet = false } = {}) {
    let entry = this._subscriptions.get(queue)
    if (!entry) {
      entry = { count: 0, loud: 0, error: null }
      this._subscriptions.set(queue, entry)
      this._sendSubscribe('subscribe', queue)
    }
    entry.count += 1
    if (!quiet) {
      entry.loud += 1
      if (entry.error) { const error = entry.error; entry.error = null; queueMicrotask(() => this.emit('error', error)) }
    }
  }

  _unsubscribe (queue, { quiet = false } = {}) {
    const entry = this._subscriptions.get(queue)
    if (!entry) return
    entry.count -= 1
    if (!quiet) entry.loud -= 1
    if (entry.count > 0) return
    this._subscriptions.delete(queue)
    this._sendSubscribe('unsubscribe', queue)
  }

  _sendSubscribe (op, queue) {
    if (!this.connected) return
    this._request({ op, queue: queue === '' ? null : queue }, { resend: false }).catch((error) => {
      const entry = this._subscriptions.get(queue)
      if (op !== 'subscribe' || !entry || error.code === 'connection_lost' || error.code === 'closed') return
      if (entry.loud) this.emit('error', error)
      else entry.error = error
    })
  }

  /** Deliver `task`'s events to it until it is final (or unwatched). */
  _watch (task, { quiet = false } = {}) {
    let tasks = this._watched.get(task.id)
    if (!tasks) { tasks = new Set(); this._watched.set(task.id, tasks) }
    if (tasks.has(task)) return
    tasks.add(task)
    task._watchQuiet = quiet
    this._subscribe(task.queue, { quiet })
  }

  /** The task's id becomes `id` (the server's), its watch with it; subscriptions stay. */
  _rekey (task, id) {
    if (task.id === id) return
    const tasks = this._watched.get(task.id)
    const watched = Boolean(tasks && tasks.delete(task))
    if (tasks && !tasks.size) this._watched.delete(task.id)
    task.id = id
    if (!watched) return
    let now = this._watched.get(id)
    if (!now) { now = new Set(); this._watched.set(id, now) }
    now.add(task)
  }

  _unwatch (task) {
    const tasks = this._watched.get(task.id)
    if (!tasks || !tasks.delete(task)) return
    if (!tasks.size) this._watched.delete(task.id)
    this._unsubscribe(task.queue, { quiet: task._watchQuiet })
  }

  // -- what the server sends ---------------------------------------------------------------

  _onEvent ({ event: name, args }) {
    const isTask = name.startsWith('task ')
    const first = args[0] || {}
    const queue = this._queues.get(first.queue)
    const wanted = this.listenerCount(name) || (queue && queue.listenerCount(name))
    if (wanted) {
      const values = isTask ? [new Task(this, first), ...args.slice(1)] : [first, ...args.slice(1).map((a) => taskOrValue(this, a))]
      this.emit(name, ...values)
      if (queue) queue.emit(name, ...values)
    }
    if (isTask) this._toWatchers(name.slice(5), first, args.slice(1))
    for (const events of this._eventStreams) events.push({ event: name, args })
  }

  _toWatchers (short, json, extra) {
    const tasks = this._watched.get(json.id)
    if (!tasks) return
    const final = short === 'deleted' || (short === 'completed' && !(json.options && json.options.autoremove)) ||
      (short === 'failed' && extra[0] === false)
    for (const task of [...tasks]) {
      task._update(json)
      // Final: the client lets go of the task (its own listeners stay on it), unless a
      // retry of it is on its way.
      if (final && task._retrying) task._finalSeen = json.updated * 1000
      else if (final) this._unwatch(task)
      task.emit(short, task, ...extra)
    }
  }

  _onOffer (message) {
    const worker = this._workers.get(message.worker)
    if (worker && !worker.stopped) { worker._offer(message.tasks); return }
    // A stopped (or unknown) worker declines: the runs go back to waiting untouched.
    const runs = message.tasks.map((offer) => [offer.task.id, offer.run])
    for (let at = 0; at < runs.length; at += 1000) {
      this._request({ op: 'release', runs: runs.slice(at, at + 1000) }, { resend: false }).catch((error) => {
        if (error.code !== 'connection_lost' && error.code !== 'closed') this.emit('error', error)
      })
    }
  }

  _onAbort (message) {
    const worker = this._workers.get(message.worker)
    if (worker) worker._abort(message.task, message.run, message.reason)
  }

  _onCredit (message) {
    const upload = this._uploads.get(message.stream)
    if (upload) upload.grant(message.bytes)
  }

  _onEnd (message) {
    const download = this._downloads.get(message.stream)
    if (download) { this._downloads.delete(message.stream); download.end() }
  }

  _onStreamError (message) {
    const error = new WsqError(message.message, message.code)
    const download = this._downloads.get(message.stream)
    if (download) { this._downloads.delete(message.stream); download.fail(error) }
    const upload = this._uploads.get(message.stream)
    if (upload) upload.fail(error)
  }

  // -- worker reports: kept while disconnected, sent once connected again -----------------

  _report (message, tries = 0) {
    return this._request(message, { resend: true, keep: true }).then(() => this._reported(message), async (error) => {
      const final = message.op === 'fail' || message.op === 'complete_many'
      if (final && error.code === 'unavailable' && tries < REPORT_RETRIES && !this.closed) {
        // The server could not store it (its database was away): it holds the run again
        // once the database is back, so the report is sent again until then.
        await new Promise((resolve) => setTimeout(resolve, Math.min(250 * 2 ** tries, 5000)))
        return this._report(message, tries + 1)
      }
      this._reported(message)
      if (error.code !== 'stale_run') this.emit('error', error)
    })
  }

  /** A report answered for good: its runs are no longer on their way. */
  _reported (message) {
    if (message.op !== 'fail' && message.op !== 'complete_many') return
    const runs = message.op === 'complete_many' ? message.runs : [[message.task, message.run]]
    for (const [taskId, run] of runs) this._reporting.delete(`${taskId} ${run}`)
  }

  _reportFail (task, text) {
    this._reporting.add(`${task.id} ${task.run}`)
    this._report({ op: 'fail', task: task.id, run: task.run, error: text })
  }

  /** Runs that finish in one turn are reported in one complete_many (§4.5). */
  _reportComplete (task) {
    this._reporting.add(`${task.id} ${task.run}`)
    this._completing.push([task.id, task.run])
    if (this._completing.length > 1) return
    queueMicrotask(() => {
      const runs = this._completing.splice(0)
      this._report({ op: 'complete_many', runs })
    })
  }

  // -- tasks and streams -------------------------------------------------------------------

  _removeTask (taskId) {
    // Sent again after a reconnect, not_found means the first one took effect.
    return this._request({ op: 'remove', task: taskId }).then(() => undefined, (error) => {
      if (error.resent && error.code === 'not_found') return undefined
      throw error
    })
  }

  _retryTask (taskId) {
    return this._request({ op: 'retry', task: taskId }).catch(async (error) => {
      if (!(error.resent && error.code === 'invalid_state')) throw error
      // Sent again after a reconnect: the first one may have taken effect.
      const { task } = await this._request({ op: 'get', task: taskId })
      if (task.state === 'failed') throw error
      return task
    })
  }

  async _add (queue, data, options, taskId) {
    const { plain, found } = extract(data)
    const message = { op: 'add', queue, data: plain, options: wireOptions(options), task: taskId }
    if (!found.length) return this._request(message)
    await this.ready()
    const generation = this._generation
    const { streams, uploads, total } = await this._prepareStreams(found)
    const progress = options.onUploadProgress
    let sent = 0
    const report = progress ? (n) => { sent += n; progress(sent, total) } : null
    const results = await Promise.allSettled(uploads.map(({ upload, value }) => upload.send(value, report)))
    for (const { upload } of uploads) this._uploads.delete(upload.stream)
    const failed = results.find((r) => r.status === 'rejected')
    if (failed) {
      for (const { upload } of uploads) upload.abort(failed.reason)
      throw failed.reason
    }
    message.streams = streams
    // The uploads went to a connection that is gone, and their streams with it on the
    // server: the add cannot name them on another.
    if (uploads.length && (!this.connected || generation !== this._generation)) throw lostConnection()
    // An add naming uploads cannot be sent again: the uploads died with the connection.
    return this._request(message, { resend: !uploads.length })
  }

  async _prepareStreams (found) {
    const streams = []
    const uploads = []
    let total = 0
    for (const { path, value } of found) {
      const size = byteSize(value)
      total = size == null || total == null ? null : total + size
      const inline = await inlineOf(value, this.limits.inline)
      if (inline != null) { streams.push({ path, inline }); continue }
      this._streamIds += 1
      const upload = new Upload(this, this._streamIds)
      this._uploads.set(upload.stream, upload)
      uploads.push({ upload, value })
      streams.push({ path, upload: upload.stream })
    }
    return { streams, uploads, total }
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

Client.prototype._receivers = {
  event: Client.prototype._onEvent,
  offer: Client.prototype._onOffer,
  abort: Client.prototype._onAbort,
  credit: Client.prototype._onCredit,
  end: Client.prototype._onEnd,
  stream_error: Client.prototype._onStreamError,
}

/** A worker of the `workers` answer, its times in ms as the rest of this API has them. */
function workerInfo (json) {
  const ms = (seconds) => seconds == null ? null : seconds * 1000
  return {
    ...json,
    since: ms(json.since),
    runs: json.runs.map((run) => ({ ...run, offered: ms(run.offered), started: ms(run.started) })),
  }
}

/** An attempt of the `attempts` answer, its times in ms. */
function attemptInfo (json) {
  const ms = (seconds) => seconds == null ? null : seconds * 1000
  return { ...json, offered: ms(json.offered), started: ms(json.started), ended: ms(json.ended) }
}

function taskOrValue (client, value) {
  return value && typeof value === 'object' && 'state' in value && 'queue' in value ? new Task(client, value) : value
}

export { StreamSource }

/** A history result with the API's milliseconds for the wire's seconds. */
function historyFromWire (result) {
  const latency = Array.isArray(result.latency)
    ? result.latency.map((seconds) => (seconds == null ? null : seconds * 1000))
    : result.latency
  return { ...result, start: result.start * 1000, end: result.end * 1000, latency }
}
