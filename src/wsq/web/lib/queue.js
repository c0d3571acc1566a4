// Queues and workers: add, list and listen on a queue; process its tasks.

import { platform } from './platform.js'
import { resolveStreams } from './streams.js'
import { Task, addTask } from './tasks.js'
import { checkType, describe, errorText, optionsAndCallback, randomHex, settle } from './util.js'

export const SERVER_EVENTS = new Set([
  'task added', 'task queued', 'task started', 'task progress', 'task completed',
  'task failed', 'task deleted', 'worker added', 'worker removed', 'worker started',
])
const ADD_OPTIONS = ['timeout', 'retries', 'autoremove', 'id', 'onUploadProgress']
const LIST_OPTIONS = ['limit', 'cursor']
const PROCESS_OPTIONS = ['concurrency']

/** One queue: add tasks, process them, list them, listen to its events. */
export class Queue extends platform.EventEmitter {
  constructor (client, name) {
    super()
    Object.defineProperty(this, 'client', { value: client, enumerable: false })
    this.name = name
    this.on('newListener', (event) => { if (SERVER_EVENTS.has(event)) client._subscribe(name) })
    this.on('removeListener', (event) => { if (SERVER_EVENTS.has(event)) client._unsubscribe(name) })
  }

  /**
   * Add a task. Returns the Task at once; it is also a thenable that resolves with itself
   * once it (and its streams) are stored durably, and `callback(error, task)` is called
   * then when given. Options: timeout (ms, -1 none, default 60000), retries (default 0,
   * -1 forever), autoremove (default false), id (your task id), onUploadProgress(sent, total).
   */
  add (data, options, callback) {
    ;[options, callback] = optionsAndCallback('queue.add', options, callback, ADD_OPTIONS)
    checkAddOptions(options)
    return addTask(this.client, this.name, data, options, callback)
  }

  /**
   * Process tasks with `handler(task)` returning a promise, or `handler(task, callback)`
   * calling `callback(error)` when done (the seed's form). Returns the Worker.
   */
  process (handler, options) {
    checkType('queue.process: the handler', handler, 'function')
    ;[options] = optionsAndCallback('queue.process', options, undefined, PROCESS_OPTIONS)
    const concurrency = options.concurrency ?? 1
    if (!Number.isInteger(concurrency) || concurrency < 1) throw new TypeError(`queue.process: concurrency must be an integer >= 1, not ${describe(concurrency)}.`)
    const worker = new Worker(this.client, this.name, handler, concurrency)
    this.client._workers.set(worker.id, worker)
    if (this.client.connected) worker._register()
    return worker
  }

  all (options, callback) { return this._list(null, 'all', options, callback) }
  waiting (options, callback) { return this._list('waiting', 'waiting', options, callback) }
  active (options, callback) { return this._list('active', 'active', options, callback) }
  completed (options, callback) { return this._list('completed', 'completed', options, callback) }
  failed (options, callback) { return this._list('failed', 'failed', options, callback) }

  /** Tasks in queue order. `{limit, cursor}` pages; the array has `.cursor` (or null). */
  _list (state, what, options, callback) {
    ;[options, callback] = optionsAndCallback(`queue.${what}`, options, callback, LIST_OPTIONS)
    const message = { op: 'list', queue: this.name, limit: options.limit ?? 1000 }
    if (state) message.state = state
    if (options.cursor) message.cursor = options.cursor
    const listed = this.client._request(message).then((result) => {
      const tasks = result.tasks.map((json) => new Task(this.client, json))
      tasks.cursor = result.cursor
      return tasks
    })
    return settle(listed, callback)
  }
}

function checkAddOptions (options) {
  const { timeout, retries, autoremove, id, onUploadProgress } = options
  if (timeout != null && (typeof timeout !== 'number' || !(timeout >= 0 || timeout === -1))) throw new TypeError(`queue.add: timeout must be milliseconds >= 0 or -1, not ${describe(timeout)}.`)
  if (retries != null && (!Number.isInteger(retries) || retries < -1)) throw new TypeError(`queue.add: retries must be an integer >= -1, not ${describe(retries)}.`)
  if (autoremove != null && typeof autoremove !== 'boolean') throw new TypeError(`queue.add: autoremove must be a boolean, not ${describe(autoremove)}.`)
  if (id != null && typeof id !== 'string') throw new TypeError(`queue.add: id must be a string, not ${describe(id)}.`)
  if (onUploadProgress != null && typeof onUploadProgress !== 'function') throw new TypeError('queue.add: onUploadProgress must be a function.')
}

/** A queue's worker: runs the handler for each offered task, `concurrency` at once. */
export class Worker {
  constructor (client, queue, handler, concurrency) {
    Object.defineProperty(this, 'client', { value: client, enumerable: false })
    this.queue = queue
    this.id = randomHex(16)
    this.concurrency = concurrency
    this.running = new Map() // `${task id} ${run}` -> Task: runs, not tasks (§4.5)
    this.stopped = false
    this._handler = handler
    this._done = []
  }

  /** No new tasks (offers already on their way are released, §4.5); resolves when the
   *  running ones are done. */
  stop (callback) {
    return settle(this._stop(), callback)
  }

  async _stop () {
    if (!this.stopped) {
      this.stopped = true
      if (this.client.connected) await this.client._request({ op: 'stop', worker: this.id }, { resend: false }).catch(() => {})
    }
    while (this.running.size) await new Promise((resolve) => this._done.push(resolve))
    if (this.client._workers.get(this.id) === this) this.client._workers.delete(this.id)
  }

  _register () {
    this.client._request({ op: 'work', queue: this.queue, concurrency: this.concurrency, worker: this.id }, { resend: false })
      .catch((error) => { if (error.code !== 'connection_lost') this.client.emit('error', error) })
  }

  _offer (offers) {
    this.client._send({ op: 'ack', runs: offers.map((o) => [o.task.id, o.run]) })
    for (const offer of offers) {
      // A server that lost the run's start (a crash, a full disk) may offer it again: it
      // is running here, or its report is on its way, which ends it. Not run twice.
      const key = `${offer.task.id} ${offer.run}`
      if (this.running.has(key) || this.client._reporting.has(key)) continue
      this._run(offer)
    }
  }

  async _run (offer) {
    const client = this.client
    const task = new Task(client, offer.task, offer.run)
    const sources = []
    const key = `${task.id} ${task.run}`
    this.running.set(key, task)
    let error = null
    try {
      task.data = resolveStreams(client, task.id, offer.data, offer.streams, sources)
      await callHandler(this._handler, task)
    } catch (e) {
      error = e ?? new Error('The handler failed.')
    }
    this.running.delete(key)
    for (const source of sources) source.release()
    if (!task.aborted) {
      if (error) client._reportFail(task, errorText(error, 65536))
      else client._reportComplete(task)
    }
    for (const resolve of this._done.splice(0)) resolve()
  }

  _abort (taskId, run, reason) {
    const task = this.running.get(`${taskId} ${run}`)
    if (task) {
      task.aborted = true
      task.emit('abort', reason)
    }
  }
}

/** Run a handler in either form: promise-returning, or the seed's (task, callback). */
function callHandler (handler, task) {
  if (handler.length < 2) return Promise.resolve().then(() => handler(task))
  return new Promise((resolve, reject) => {
    let called = false
    const callback = (error) => {
      if (called) throw new Error('The worker callback was called more than once.')
      called = true
      if (error) reject(error)
      else resolve()
    }
    const result = handler(task, callback)
    if (result && typeof result.then === 'function') result.then(null, reject)
  })
}
