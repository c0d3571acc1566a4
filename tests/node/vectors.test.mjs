// wsq.js checked against the protocol conformance vectors (tests/vectors/, docs/protocol.md
// §11), as tests/vectors/test_codecs.py checks the Python client:
//
// - its decoder: every message of every `recv` step (placeholders replaced by sample values)
//   reaches a real Client over a real WebSocket, from a scripted server in this file that
//   plays the vector's server side, one Client per connection of the vector. The first
//   message on a connection is its greeting (welcome or refusal); each later one must be
//   taken without error and show up where the API exposes it: a result resolves the request
//   it answers (made through the API call that sends that op), an error rejects it with the
//   vector's code, events reach listeners, offers reach a worker, aborts the run, credit an
//   upload, stream bytes, ends and stream errors a download;
// - its encoder: a session using the whole API against a real `wsq server`, through a relay
//   that records the text frames wsq.js sends; every message must use an op, fields and
//   JSON types that the vectors' `send` steps use.
//
// Run it against another build with WSQ_JS=/path/to/wsq.js (its lib/ beside it).

import assert from 'node:assert/strict'
import { readFileSync, readdirSync } from 'node:fs'
import { Readable } from 'node:stream'
import { after, before, describe, test } from 'node:test'
import { ServerProcess, budget, eventually } from './server.mjs'

const WSQ_JS = new URL(process.env.WSQ_JS ? `file://${process.env.WSQ_JS}` : '../../src/wsq/web/wsq.js', import.meta.url)
const { Client } = await import(WSQ_JS)
const { Download, Upload } = await import(new URL('lib/streams.js', WSQ_JS))
const { SERVER_EVENTS } = await import(new URL('lib/queue.js', WSQ_JS))
const { WebSocket, WebSocketServer } = await import(new URL('../../src/wsq/web/node_modules/ws/wrapper.mjs', import.meta.url))

const VECTORS_DIR = new URL('../vectors/', import.meta.url)
const VECTORS = readdirSync(VECTORS_DIR).filter((name) => name.endsWith('.jsonl')).sort().map(load)
const quiet = { backoff: () => 60000 } // a refused greeting is not retried during a test

function load (name) {
  const lines = readFileSync(new URL(name, VECTORS_DIR), 'utf8').split('\n')
    .filter((line) => line.trim() && !line.trimStart().startsWith('//')).map((line) => JSON.parse(line))
  return { name: name.replace(/\.jsonl$/, ''), header: lines[0], steps: lines.slice(1) }
}

/** A concrete message for a pattern: each placeholder replaced by a value of its kind (as
 *  test_codecs.py's sample). */
function sample (value) {
  if (typeof value === 'string') {
    const kinds = { $string: 'x', $int: 1, $number: 1.5, $any: null }
    if (value in kinds) return kinds[value]
    return value.replace(/\$\{([A-Za-z_0-9]+)\}/g, (_, name) => name.startsWith('cursor') ? '1' : `${name}-sample`)
  }
  if (Array.isArray(value)) return value.map(sample)
  if (value && typeof value === 'object') return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, sample(v)]))
  return value
}

const connectionOf = (step) => step.c ?? 'a'
const sentIn = (step) => ('send' in step ? (Array.isArray(step.send) ? step.send : [step.send]) : [])
const receivedIn = (step) => ('recv' in step ? [step.recv] : step.recv_unordered ?? [])

/** (connection, id) of every request the vectors answer with bad_message: not shapes to copy. */
function badRequests (vector) {
  const bad = new Set()
  for (const step of vector.steps) {
    for (const message of receivedIn(step)) if (message.code === 'bad_message') bad.add(`${connectionOf(step)} ${message.id}`)
  }
  return bad
}

function withTimeout (promise, what, ms = 10000) {
  let timer
  const timeout = new Promise((resolve, reject) => { timer = setTimeout(() => reject(new Error(`${what}: not within ${budget(ms)} ms`)), budget(ms)) })
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer))
}

// -- the decoder ---------------------------------------------------------------------------

/**
 * A WebSocket server that plays a vector's server side: it answers each connection's hello
 * with the greeting it is given, answers the client's own pings (so its heartbeat stays
 * content), and otherwise sends only what the test tells it to.
 */
class ScriptedServer {
  async listen () {
    this.wss = new WebSocketServer({ host: '127.0.0.1', port: 0 })
    await new Promise((resolve) => this.wss.once('listening', resolve))
    this.url = `ws://127.0.0.1:${this.wss.address().port}`
    return this
  }

  /** A new Client greeted with `greeting`; resolves with the client and its socket here. */
  accept (greeting) {
    return new Promise((resolve) => {
      this.wss.once('connection', (ws) => {
        let greeted = false
        ws.on('message', (data, isBinary) => {
          if (isBinary) return
          const decoded = JSON.parse(data.toString())
          for (const message of Array.isArray(decoded) ? decoded : [decoded]) {
            if (!greeted) {
              greeted = true
              ws.send(JSON.stringify(greeting))
              resolve({ client, ws })
            } else if (message.op === 'ping') {
              ws.send(JSON.stringify({ op: 'result', id: message.id, result: null }))
            }
          }
        })
      })
      const client = new Client(this.url, quiet)
      client.errors = []
      client.on('error', (error) => client.errors.push(error))
    })
  }

  close () {
    for (const ws of this.wss.clients) ws.terminate()
    return new Promise((resolve) => this.wss.close(resolve))
  }
}

/** One vector connection, as a wsq.js Client fed by the scripted server. */
class Fed {
  constructor (vector, name) {
    this.vector = vector
    this.name = name
    this.sent = new Map() // vector request id -> the last message the vector sent with it
    this.streamOps = new Map() // stream id -> 'upload' or 'download', as the vector last sent it
    this.events = []
    this.runs = new Map() // `${task} ${run}` -> {task, done}
    this.workers = new Map()
    this.uploads = new Map()
    this.downloads = new Map()
    this.fed = 0 // messages and binary frames fed and checked
  }

  where (message) { return `${this.vector.name} (${this.name}): ${JSON.stringify(message)}` }

  async greet (scripted, greeting) {
    const message = sample(greeting)
    this.fed += 1
    const { client, ws } = await scripted.accept(message)
    this.client = client
    this.ws = ws
    if (message.op === 'welcome') {
      await withTimeout(client.ready(), this.where(message))
      assert.deepEqual(client.limits, { ...client.limits, ...message.limits }, this.where(message))
      assert.equal(client.heartbeat, message.heartbeat)
      for (const name of SERVER_EVENTS) client.on(name, (first, ...extra) => this.events.push({ name, first, extra }))
      return
    }
    // A refusal: the client reports it with its code and does not count as connected.
    assert.equal(message.op, 'error', this.where(message))
    await withTimeout(eventually(() => client.errors.some((e) => e.code === message.code && e.message === message.message)), this.where(message))
    assert.equal(client.connected, false)
    client.errors.length = 0
  }

  /** Feed the messages of one step (recv_unordered as one array frame) and check each. */
  async feed (patterns) {
    const checks = []
    const messages = patterns.map((pattern) => {
      const message = sample(pattern)
      checks.push(this.prepare(message))
      return message
    })
    this.ws.send(JSON.stringify(messages.length === 1 ? messages[0] : messages))
    await this.barrier()
    for (const check of checks) await check()
    this.fed += checks.length
    assert.deepEqual(this.client.errors.map(String), [], `${this.vector.name} (${this.name}): errors`)
  }

  /** Resolves once the client has handled everything sent before (frames stay in order). */
  barrier () { return withTimeout(this.client._request({ op: 'ping' }, { resend: false }), 'barrier') }

  /** Set up what `message` will be observed on; rewrite ids; return its check. */
  prepare (message) {
    switch (message.op) {
      case 'result':
      case 'error':
        if (message.id == null) return this.expectClientError(message)
        return this.expectAnswer(message)
      case 'event': return this.expectEvent(message)
      case 'offer': return this.expectOffer(message)
      case 'abort': return this.expectAbort(message)
      case 'credit': return this.expectCredit(message)
      case 'end': return this.expectEnd(message)
      case 'stream_error': return this.expectStreamError(message)
      default: throw new Error(`wsq.js has no check for ${this.where(message)}`)
    }
  }

  expectClientError (message) {
    return () => {
      const found = this.client.errors.findIndex((e) => e.code === message.code && e.message === message.message)
      assert.ok(found >= 0, `${this.where(message)}: no 'error' with that code (${this.client.errors.map(String)})`)
      this.client.errors.splice(found, 1)
    }
  }

  /** A result or error answers the request the vector sent with its id: the same request,
   *  made through wsq.js's API for that op, gets the client's id. */
  expectAnswer (message) {
    const sent = this.sent.get(message.id) ?? { op: 'ping' }
    const { promise, check } = request(this.client, sample(sent))
    message.id = this.client._ids
    const settled = promise.then((value) => ({ value }), (error) => ({ error }))
    return async () => {
      const { value, error } = await withTimeout(settled, this.where(message))
      if (message.op === 'error') {
        assert.ok(error, `${this.where(message)}: resolved with ${JSON.stringify(value)}`)
        assert.equal(error.code, message.code, this.where(message))
        assert.equal(error.message, message.message, this.where(message))
        return
      }
      if (error) throw new Error(`${this.where(message)}: rejected with ${error}`)
      check(value, message.result, this.where(message))
    }
  }

  expectEvent (message) {
    const first = message.args[0]
    return () => {
      const heard = this.events.find((e) => e.name === message.event && e.first.id === first.id)
      assert.ok(heard, `${this.where(message)}: no listener heard it`)
      this.events.splice(this.events.indexOf(heard), 1)
      if (message.event.startsWith('task ')) checkTask(heard.first, first, this.where(message))
      else assert.deepEqual({ ...heard.first }, first)
      assert.equal(heard.extra.length, message.args.length - 1, this.where(message))
    }
  }

  worker (id, queue) {
    let worker = this.workers.get(id)
    if (!worker) {
      worker = this.client.queue(queue).process((task) => {
        const run = { task }
        const done = new Promise((resolve) => { run.done = resolve })
        task.on('abort', (reason) => { run.aborted = reason; run.done() })
        this.runs.set(`${task.id} ${task.run}`, run)
        return done
      }, { concurrency: 1000 })
      // The vector names its worker: the client's worker answers to that id.
      this.client._workers.delete(worker.id)
      worker.id = id
      this.client._workers.set(id, worker)
      this.workers.set(id, worker)
    }
    return worker
  }

  expectOffer (message) {
    this.worker(message.worker, message.tasks[0].task.queue)
    return async () => {
      for (const offer of message.tasks) {
        const key = `${offer.task.id} ${offer.run}`
        const run = await withTimeout(eventually(() => this.runs.get(key)), this.where(message))
        checkTask(run.task, offer.task, this.where(message))
        assert.equal(run.task.run, offer.run)
        checkData(run.task.data, offer.data, offer.streams, this.where(message))
      }
    }
  }

  expectAbort (message) {
    return async () => {
      const run = this.runs.get(`${message.task} ${message.run}`)
      assert.ok(run, `${this.where(message)}: no run of that task was offered first`)
      await withTimeout(eventually(() => 'aborted' in run), this.where(message))
      assert.equal(run.aborted, message.reason)
      assert.equal(run.task.aborted, true)
    }
  }

  /** The client's Upload or Download of a stream id (as the client registers its own). */
  upload (stream) {
    let upload = this.uploads.get(stream)
    if (!upload) {
      upload = new Upload(this.client, stream)
      this.client._uploads.set(stream, upload)
      this.uploads.set(stream, upload)
    }
    return upload
  }

  download (stream) {
    let download = this.downloads.get(stream)
    if (!download) {
      download = new Download(this.client, stream)
      this.client._downloads.set(stream, download)
      this.downloads.set(stream, download)
    }
    return download
  }

  expectCredit (message) {
    // Credits of one frame add up: each check sees the total of the frame.
    const upload = this.upload(message.stream)
    upload.wanted = (upload.wanted ?? upload.credit) + message.bytes
    return () => assert.equal(upload.credit, upload.wanted, this.where(message))
  }

  expectEnd (message) {
    const download = this.download(message.stream)
    return async () => {
      assert.equal(await withTimeout(download.next(), this.where(message)), null, this.where(message))
      assert.equal(this.client._downloads.has(message.stream), false)
    }
  }

  expectStreamError (message) {
    // The stream is the client's upload or download, as the vector last sent it.
    const upload = this.streamOps.get(message.stream) === 'upload'
    const stream = upload ? this.upload(message.stream) : this.download(message.stream)
    return async () => {
      const failed = upload ? stream.error : await withTimeout(stream.next().then(() => null, (e) => e), this.where(message))
      assert.ok(failed, `${this.where(message)}: the stream did not fail`)
      assert.equal(failed.code, message.code, this.where(message))
      assert.equal(failed.message, message.message)
    }
  }

  async feedBinary (spec) {
    const bytes = Buffer.from(spec.base64, 'base64')
    const download = this.download(spec.stream)
    const frame = Buffer.alloc(4 + bytes.length)
    frame.writeUInt32BE(spec.stream)
    bytes.copy(frame, 4)
    this.ws.send(frame)
    const chunk = await withTimeout(download.next(), `${this.vector.name}: binary frame ${spec.stream}`)
    assert.deepEqual(Buffer.from(chunk), bytes)
    this.fed += 1
  }

  close () { return this.client ? this.client.close() : undefined }
}

/** Make the request `sent` (a vector's message) through the wsq.js API that sends its op;
 *  `check(value, result)` compares what the API returns with the vector's result. */
function request (client, sent) {
  try {
    const made = apiRequest(client, sent)
    if (made) return made
  } catch (error) {
    if (!(error instanceof TypeError)) throw error // the API refuses what the vector sends badly
  }
  const { id, ...message } = sent
  return { promise: client._request(message, { resend: false }), check: (value, result, where) => assert.deepEqual(value, result, where) }
}

function apiRequest (client, sent) {
  const exact = (value, result, where) => assert.deepEqual(value, result, where)
  const { op } = sent
  if (op === 'add' && !sent.streams && typeof sent.task === 'string') {
    const options = { id: sent.task }
    if (sent.options) Object.assign(options, wireToOptions(sent.options))
    const task = client.queue(sent.queue).add(sent.data, options)
    return { promise: task.then((t) => t), check: (value, result, where) => checkTask(value, result, where) }
  }
  if (op === 'list' && sent.queue != null) {
    const method = { waiting: 'waiting', active: 'active', completed: 'completed', failed: 'failed' }[sent.state] ?? 'all'
    const options = sent.limit ? { limit: sent.limit } : {}
    if (sent.cursor) options.cursor = String(sent.cursor)
    return {
      promise: client.queue(sent.queue)[method](options),
      check: (tasks, result, where) => {
        assert.equal(tasks.length, result.tasks.length, where)
        tasks.forEach((task, i) => checkTask(task, result.tasks[i], where))
        assert.equal(tasks.cursor, result.cursor, where)
      },
    }
  }
  // A page asked for with limit or cursor goes as sent: the API follows every page.
  const whole = (result, where) => assert.equal(result.cursor, null, where)
  if (op === 'queues' && sent.limit == null && sent.cursor == null) {
    return {
      promise: client.listQueues(),
      check: (queues, result, where) => { whole(result, where); assert.deepEqual(queues.map((q) => q.name), result.queues, where) },
    }
  }
  if (op === 'stats' && sent.limit == null && sent.cursor == null) {
    return {
      promise: client.stats(),
      check: (stats, result, where) => { whole(result, where); assert.deepEqual(stats, { queues: result.queues }, where) },
    }
  }
  if (op === 'workers' && sent.limit == null && sent.cursor == null) {
    return {
      promise: client.workers(sent.queue ?? null),
      check: (workers, result, where) => {
        whole(result, where)
        assert.deepEqual(workers.map((w) => [w.id, w.queue, w.since / 1000, w.runs.map((r) => [r.task, r.started == null])]),
          result.workers.map((w) => [w.id, w.queue, w.since, w.runs.map((r) => [r.task, r.started == null])]), where)
      },
    }
  }
  if (op === 'history' && typeof sent.queue === 'string' && (sent.since == null || typeof sent.since === 'number')) {
    const options = sent.since == null ? undefined : { since: sent.since * 1000 }
    return {
      promise: client.history(sent.queue, options),
      check: (value, result, where) => {
        assert.deepEqual({ ...value, start: value.start / 1000, end: value.end / 1000, latency: result.latency }, result, where)
        if (Array.isArray(result.latency)) assert.deepEqual(value.latency, result.latency.map((s) => (s == null ? null : s * 1000)), where)
      },
    }
  }
  if (op === 'get' && typeof sent.task === 'string') {
    return {
      promise: client._getData(sent.task),
      check: (data, result, where) => checkData(data, result.data, result.streams, where),
    }
  }
  if (op === 'attempts' && typeof sent.task === 'string') {
    const ms = (seconds) => seconds == null ? null : seconds * 1000
    return {
      promise: client.attempts(sent.task),
      check: (attempts, result, where) => assert.deepEqual(attempts, result.attempts.map((a) =>
        ({ ...a, offered: ms(a.offered), started: ms(a.started), ended: ms(a.ended) })), where),
    }
  }
  if (op === 'remove' && typeof sent.task === 'string') {
    return { promise: client._removeTask(sent.task), check: (value, result, where) => assert.equal(value ?? null, result, where) }
  }
  if (op === 'retry' && typeof sent.task === 'string') return { promise: client._retryTask(sent.task), check: exact }
  return null
}

/** Add options as the API takes them (ms) from the wire's (seconds). */
function wireToOptions (wire) {
  const out = {}
  if (typeof wire.timeout === 'number') out.timeout = wire.timeout === -1 ? -1 : wire.timeout * 1000
  if (Number.isInteger(wire.retries)) out.retries = wire.retries
  if (typeof wire.autoremove === 'boolean') out.autoremove = wire.autoremove
  return out
}

/** A wsq.js Task shows what the task JSON carries (times in ms, as the API has them). */
function checkTask (task, json, where) {
  assert.equal(task.id, json.id, where)
  assert.equal(task.queue, json.queue, where)
  assert.equal(task.state, json.state, where)
  if ('progress' in json) assert.equal(task.progress, json.progress, where)
  if ('retries' in json) assert.equal(task.retries, json.retries, where)
  if ('error' in json) assert.equal(task.error, json.error, where)
  if ('worker' in json) assert.equal(task.worker, json.worker, where)
  if (typeof json.updated === 'number') assert.equal(task.updated, json.updated * 1000, where)
  if (json.options) {
    const timeout = json.options.timeout === -1 ? -1 : Math.round(json.options.timeout * 1000)
    assert.deepEqual(task.options, { timeout, retries: json.options.retries, autoremove: json.options.autoremove }, where)
  }
}

/** Task data as wsq.js hands it out: the JSON, with each stream in its place as a stream
 *  of the platform (a Node Readable here) of the stored size. */
function checkData (data, json, streams, where) {
  if (!streams || !streams.length) { assert.deepEqual(data, json, where); return }
  for (const ref of streams) {
    let value = data
    for (const key of ref.path) value = value[key]
    assert.equal(typeof value.pipe, 'function', `${where}: no stream at ${JSON.stringify(ref.path)}`)
    if (ref.size != null) assert.equal(value.size, ref.size, where)
    value.destroy()
  }
}

async function decodeVector (scripted, vector) {
  const connections = new Map()
  const expected = vector.steps.reduce((n, step) => n + receivedIn(step).length + (step.recv_binary ? 1 : 0), 0)
  try {
    for (const step of vector.steps) {
      const name = connectionOf(step)
      let fed = connections.get(name)
      if (!fed) { fed = new Fed(vector, name); connections.set(name, fed) }
      for (const message of sentIn(step)) {
        if (message && message.id != null) fed.sent.set(message.id, message)
        if (message && (message.op === 'upload' || message.op === 'download')) fed.streamOps.set(message.stream, message.op)
      }
      const received = receivedIn(step)
      if (received.length && !fed.client) {
        await fed.greet(scripted, received[0])
        if (received.length > 1) await fed.feed(received.slice(1))
      } else if (received.length) {
        await fed.feed(received)
      } else if (step.recv_binary) {
        await fed.feedBinary(step.recv_binary)
      }
    }
    const counted = [...connections.values()].reduce((n, each) => n + each.fed, 0)
    assert.equal(counted, expected, `${vector.name}: ${counted} of ${expected} messages fed`)
  } finally {
    for (const fed of connections.values()) {
      for (const run of fed.runs.values()) run.done()
      await fed.close()
    }
  }
}

describe('the decoder: wsq.js takes every message the vectors receive', () => {
  let scripted
  before(async () => { scripted = await new ScriptedServer().listen() })
  after(() => scripted.close())

  for (const vector of VECTORS) {
    test(vector.name, () => decodeVector(scripted, vector))
  }
})

// -- the encoder ---------------------------------------------------------------------------

/** A WebSocket relay in front of a server that records the text frames clients send. */
class RecordingRelay {
  constructor (target) { this.target = target; this.frames = [] }

  async listen () {
    this.wss = new WebSocketServer({ host: '127.0.0.1', port: 0, perMessageDeflate: false })
    this.wss.on('connection', (down) => {
      const up = new WebSocket(this.target, { perMessageDeflate: false })
      const pending = []
      up.on('open', () => { for (const [data, isBinary] of pending.splice(0)) up.send(data, { binary: isBinary }) })
      down.on('message', (data, isBinary) => {
        if (!isBinary) this.frames.push(data.toString())
        if (up.readyState === WebSocket.OPEN) up.send(data, { binary: isBinary })
        else pending.push([data, isBinary])
      })
      up.on('message', (data, isBinary) => {
        if (this.held) { this.held.push([down, data, isBinary]); if (this.onHeld) this.onHeld() }
        else if (down.readyState === WebSocket.OPEN) down.send(data, { binary: isBinary })
      })
      const end = () => { down.terminate(); up.terminate() }
      down.on('close', end).on('error', end)
      up.on('close', end).on('error', end)
    })
    await new Promise((resolve) => this.wss.once('listening', resolve))
    this.url = `ws://127.0.0.1:${this.wss.address().port}`
    return this
  }

  /** Keep what the server sends back, until release() delivers it in order. */
  hold () { this.held = [] }

  /** Resolves once a held frame holds `text`. */
  holding (text) {
    const found = () => (this.held ?? []).some(([, data, isBinary]) => !isBinary && data.toString().includes(text))
    return new Promise((resolve) => {
      this.onHeld = () => { if (found()) { this.onHeld = null; resolve() } }
      this.onHeld()
    })
  }

  release () {
    const held = this.held ?? []
    this.held = null
    for (const [down, data, isBinary] of held) if (down.readyState === WebSocket.OPEN) down.send(data, { binary: isBinary })
  }

  messages () {
    return this.frames.flatMap((frame) => { const decoded = JSON.parse(frame); return Array.isArray(decoded) ? decoded : [decoded] })
  }

  close () {
    for (const ws of this.wss.clients) ws.terminate()
    return new Promise((resolve) => this.wss.close(resolve))
  }
}

function kind (value) {
  if (typeof value === 'string' && value.startsWith('$')) return 'any'
  if (value === null) return 'null'
  if (Array.isArray(value)) return 'array'
  return typeof value
}

/** op -> field -> JSON kinds, over every message the vectors send (but those refused). */
function shapes () {
  const out = new Map()
  for (const vector of VECTORS) {
    const bad = badRequests(vector)
    for (const step of vector.steps) {
      for (const message of sentIn(step)) {
        if (!message || typeof message !== 'object' || bad.has(`${connectionOf(step)} ${message.id}`)) continue
        if (!out.has(message.op)) out.set(message.op, new Map())
        const fields = out.get(message.op)
        for (const [key, value] of Object.entries(message)) {
          if (!fields.has(key)) fields.set(key, new Set())
          fields.get(key).add(kind(value))
        }
      }
    }
  }
  return out
}

/** Every kind of call wsq.js makes, once (the API, as a program uses it). */
async function session (relay) {
  const client = new Client(relay.url, { backoff: () => 50 })
  const errors = []
  client.on('error', (error) => errors.push(error))
  try {
    const queue = client.queue('js-vectors')
    const heard = []
    const onAdded = (task) => heard.push(task.id)
    queue.on('task added', onAdded) // subscribe
    const big = new Uint8Array(3 << 20).fill(5) // uploaded in chunks, downloaded with credit
    const first = await queue.add({ big, small: new Uint8Array([1, 2, 3]), n: 1 }, { timeout: 5000, retries: 1, autoremove: false })
    const own = await queue.add({ n: 2 }, { id: 'js-vectors-own-id' })
    assert.equal(own.id, 'js-vectors-own-id')
    await eventually(() => heard.length === 2)
    queue.off('task added', onAdded) // unsubscribe
    await queue.all()
    await queue.all({ limit: 1 }).then((page) => queue.all({ limit: 1, cursor: page.cursor }))
    await queue.waiting()
    await queue.active()
    await queue.completed()
    await queue.failed()
    await client.listQueues()
    await client.stats()
    await client.workers()
    await client.workers(queue.name)
    assert.equal((await client.getTask(first.id)).data.big.size, big.length)
    await client.history(queue.name)
    await client.history(queue.name, { since: Date.now() - 60000 })
    const data = await first.getData()
    let size = 0
    for await (const chunk of data.big) size += chunk.length
    assert.equal(size, big.length)
    // A download cancelled before its end.
    const again = await first.getData()
    await new Promise((resolve) => { again.big.once('data', () => { again.big.destroy(); resolve() }) })

    const worker = queue.process(async (task) => {
      await task.updateProgress(0.5)
      await task.touch()
    }, { concurrency: 2 })
    await eventually(async () => (await queue.completed()).length === 2)
    await worker.stop()

    const failing = await queue.add({ n: 3 })
    const stubborn = queue.process((task, callback) => callback(new Error('no')))
    await eventually(async () => (await queue.failed()).length === 1)
    await stubborn.stop()
    assert.deepEqual((await failing.attempts()).map((a) => [a.run, a.outcome, a.error]), [[1, 'failed', 'no']])
    await failing.retry()
    await failing.remove()
    // A stream whose source fails while uploading: the upload is aborted, the add fails.
    const broken = new Readable({ read () { this.push(new Uint8Array(100)); this.destroy(new Error('the source broke')) } })
    await assert.rejects(queue.add({ broken }), /the source broke/)
    // A stopped worker releases an offer already on its way: the relay holds the offer
    // back until the worker has stopped.
    const waiting = await queue.add({ n: 4 })
    relay.hold()
    const stopped = queue.process(async () => {})
    await withTimeout(relay.holding('"op":"offer"'), 'the offer to the worker')
    const stopping = stopped.stop()
    relay.release()
    await stopping
    await eventually(async () => (await queue.waiting()).some((task) => task.id === waiting.id))
    // The heartbeat (§9): a ping within an interval, however short the session was.
    await eventually(() => relay.messages().some((message) => message.op === 'ping'))
    assert.deepEqual(errors.map(String), [])
  } finally {
    await client.close()
  }
}

describe('the encoder: wsq.js sends what the vectors send', () => {
  let server
  let relay
  before(async () => {
    // Pings every 250 ms (so the session sends some, and a loaded machine does not pass
    // for a dead peer); a worker may take 5 s to answer an offer (the relay holds one back
    // for a moment).
    server = await new ServerProcess({ args: ['--heartbeat-interval', '0.25', '--worker-timeout', '5'] }).start()
    relay = await new RecordingRelay(server.url).listen()
  })
  after(async () => {
    await relay.close()
    await server.dispose()
  })

  test('every message of a session has an op, fields and JSON types of the vectors', async () => {
    // The shapes are checked even when the session failed (a server refusing a renamed
    // field), so the failure names the field; then the session's failure, if any.
    const failed = await session(relay).then(() => null, (error) => error)
    const known = shapes()
    const sent = relay.messages()
    const ops = new Set()
    for (const message of sent) {
      const op = message.op
      ops.add(op)
      assert.ok(known.has(op), `wsq.js sends ${op}, which no vector sends: ${JSON.stringify(message)}`)
      for (const [key, value] of Object.entries(message)) {
        const kinds = known.get(op).get(key)
        assert.ok(kinds, `wsq.js sends ${op}.${key}, which no vector sends: ${JSON.stringify(message)}`)
        assert.ok(kinds.has('any') || kinds.has(kind(value)), `${op}.${key} is ${kind(value)} from wsq.js, ${[...kinds]} in the vectors: ${JSON.stringify(message)}`)
      }
    }
    // What the API above must have sent.
    const expected = ['hello', 'add', 'list', 'queues', 'stats', 'workers', 'history', 'get', 'attempts', 'remove', 'retry', 'subscribe',
      'unsubscribe', 'work', 'stop', 'ack', 'progress', 'touch', 'complete_many', 'fail', 'upload',
      'upload_end', 'upload_abort', 'download', 'credit', 'cancel', 'release', 'ping']
    // Ops of the vectors this session did not send: reported, not a failure. wsq.js has no
    // API that sends them today: no add_many (add() sends one add each), and a worker's
    // runs are reported with complete_many, never complete.
    const unsent = [...known.keys()].filter((op) => !ops.has(op)).sort()
    console.log(`wsq.js sent ${sent.length} messages, ops: ${[...ops].sort().join(' ')}`)
    console.log(`vector ops this session did not send: ${unsent.join(' ') || 'none'}`)
    if (failed) throw failed
    assert.ok(sent.length > 20, `only ${sent.length} messages recorded`)
    const missing = expected.filter((op) => !ops.has(op))
    assert.deepEqual(missing, [], `wsq.js did not send ${missing}`)
  })
})
