// Tasks: what listings, events, add() and workers hand out. A Task is an EventEmitter of
// its own events; listening to one makes the client watch it until it is final.

import { platform } from './platform.js'
import { WsqError, checkCallback, settle } from './util.js'

const FINAL = new Set(['completed', 'failed'])
export const TASK_EVENTS = new Set(['added', 'queued', 'started', 'progress', 'completed', 'failed', 'deleted'])

/** A task, as listed, added, or handed to a worker (then `data` is resolved). */
export class Task extends platform.EventEmitter {
  constructor (client, json, run = null) {
    super()
    Object.defineProperty(this, 'client', { value: client, enumerable: false })
    this.id = json.id
    this.queue = json.queue
    this.data = undefined
    this.run = run
    this.aborted = false
    this.updated = -Infinity
    Object.defineProperty(this, '_adding', { value: false, writable: true, enumerable: false })
    Object.defineProperty(this, '_retrying', { value: 0, writable: true, enumerable: false })
    Object.defineProperty(this, '_finalSeen', { value: null, writable: true, enumerable: false })
    Object.defineProperty(this, '_watchQuiet', { value: false, writable: true, enumerable: false })
    this._update(json)
    this.on('newListener', (name) => { if (TASK_EVENTS.has(name)) client._watch(this) })
    this.on('removeListener', (name) => {
      if (TASK_EVENTS.has(name) && !this._adding && !this.listensToEvents()) client._unwatch(this)
    })
  }

  /** Take the newer of this and `json`: an event may overtake the answer to an add (the
   *  server sends offers at once, answers once durable), and then the answer is older. */
  _update (json, { answer = false } = {}) {
    const updated = json.updated == null ? this.updated : json.updated * 1000
    if (updated < this.updated || (answer && updated === this.updated)) return
    this.state = json.state
    this.progress = json.progress ?? 0
    this.retries = json.retries ?? 0
    this.error = json.error ?? null
    this.worker = json.worker ?? null
    this.created = json.created == null ? null : json.created * 1000
    this.updated = updated
    const o = json.options || {}
    this.options = { timeout: o.timeout === -1 ? -1 : Math.round((o.timeout ?? 60) * 1000), retries: o.retries ?? 0, autoremove: Boolean(o.autoremove) }
  }

  listensToEvents () {
    for (const name of TASK_EVENTS) if (this.listenerCount(name)) return true
    return false
  }

  /** In a handler: report progress (0..1); resets the timeout. Resolves once the server
   *  has it (or the run already ended). */
  updateProgress (fraction) {
    if (typeof fraction !== 'number' || !(fraction >= 0 && fraction <= 1)) {
      throw new TypeError(`task.updateProgress: the progress must be a number from 0 to 1, not ${fraction}.`)
    }
    this.progress = fraction
    return this._report({ op: 'progress', progress: fraction })
  }

  /** In a handler: reset the timeout. */
  touch () { return this._report({ op: 'touch' }) }

  /** Delete the task (any state) and its streams. */
  remove (callback) {
    checkCallback('task.remove', callback)
    return settle(this.client._removeTask(this.id), callback)
  }

  /** Queue a failed task again. */
  retry (callback) {
    checkCallback('task.retry', callback)
    // Listeners hear what follows: the watch (and its subscription) goes out first, and
    // stays while the retry is on its way, even if a final event comes meanwhile.
    if (this.listensToEvents()) this.client._watch(this)
    this._retrying += 1
    let requeued = null // when the retry took effect
    const retried = this.client._retryTask(this.id).then((json) => {
      requeued = json.updated * 1000
      this._update(json)
    })
    retried.finally(() => {
      this._retrying -= 1
      if (this._retrying) return
      // Let go if the task is final: the retry failed, or the final event that came while
      // the retry was on its way is newer than the retry (an answer may report a state
      // that its events have not told yet: then the watch waits for them).
      const seenFinal = this._finalSeen != null && (requeued == null || this._finalSeen > requeued)
      if (requeued == null ? FINAL.has(this.state) : seenFinal) this.client._unwatch(this)
    }).catch(() => {})
    return settle(retried, callback)
  }

  /** The task's data, each stream a ReadableStream (browsers) or a Readable (Node). */
  getData (callback) {
    checkCallback('task.getData', callback)
    return settle(this.client._getData(this.id), callback)
  }

  /** The task's runs, oldest first (client.attempts()). */
  attempts (callback) {
    checkCallback('task.attempts', callback)
    return settle(this.client.attempts(this.id), callback)
  }

  _report (fields) {
    if (this.run == null) throw new WsqError('Only a task handed to a worker can report.', 'invalid_state')
    return this.client._report({ ...fields, task: this.id, run: this.run })
  }
}

/**
 * The task `queue.add()` returns at once (the seed's `task = queue.add(...)`, then
 * `task.on(...)`), also a thenable: `await queue.add(...)` resolves with this same Task
 * once the server has it. Its `then` is removed at that moment, so a settled Task is an
 * ordinary object again (a promise cannot resolve with a thenable that resolves to itself).
 * The task is watched from the start: its events reach it even before the add's answer.
 */
export function addTask (client, queue, data, options, callback) {
  // With an auth file the server keeps a chosen id as '<principal>/<id>' (§4.1 scope):
  // the task carries that id from the start when the scope is known (else from the
  // first welcome on), and from the answer on, whatever id the server answered.
  const chosen = options.id ?? client.newTaskId()
  const task = new Task(client, {
    id: (client.scope ?? '') + chosen, queue, state: 'unknown', options: wireOptions(options),
  })
  Object.defineProperty(task, '_chosen', { value: chosen, enumerable: false })
  if (client.scope == null) client._unscoped.add(task)
  task._adding = true
  client._watch(task, { quiet: true })
  let awaited = Boolean(callback)
  const added = client._add(queue, data, options, chosen).then((json) => {
    client._unscoped.delete(task)
    client._rekey(task, json.id)
    task._update(json, { answer: true })
    for (const name of ['then', 'catch', 'finally']) delete task[name]
    return task
  }, (error) => {
    client._unscoped.delete(task)
    throw error
  })
  // The watch stays until the caller has acted on the answer (a macrotask later); then
  // only listeners keep it.
  const release = () => setTimeout(() => {
    task._adding = false
    if (!task.listensToEvents()) client._unwatch(task)
  }, 0)
  added.then(release, release)
  const methods = {
    then: (onFulfilled, onRejected) => { awaited = true; return added.then(onFulfilled, onRejected) },
    catch: (onRejected) => { awaited = true; return added.catch(onRejected) },
    finally: (onFinally) => { awaited = true; return added.finally(onFinally) },
  }
  for (const [name, value] of Object.entries(methods)) {
    Object.defineProperty(task, name, { value, configurable: true, writable: true, enumerable: false })
  }
  if (callback) settle(added, callback)
  // Nobody asked for the result: a failure goes to 'error' (thrown if nobody listens).
  added.catch((error) => { if (!awaited) client.emit('error', error) })
  return task
}

/** Add options (ms, as the seed) as the wire has them (seconds). */
export function wireOptions (options) {
  const out = {}
  if (options.timeout != null) out.timeout = options.timeout === -1 ? -1 : options.timeout / 1000
  if (options.retries != null) out.retries = options.retries
  if (options.autoremove != null) out.autoremove = Boolean(options.autoremove)
  return out
}
