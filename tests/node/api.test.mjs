// wsq.js's API in Node: the seed's callbacks and promises on every call, TypeErrors for
// arguments of the wrong kind, EventEmitters, Node streams both ways, milliseconds.

import assert from 'node:assert/strict'
import { createHash, randomBytes } from 'node:crypto'
import { EventEmitter } from 'node:events'
import { createReadStream, mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { PassThrough, Readable, Transform } from 'node:stream'
import { pipeline } from 'node:stream/promises'
import { after, before, describe, test } from 'node:test'
import { createGunzip, createGzip } from 'node:zlib'
import { FAST, ServerProcess, eventually, next } from './server.mjs'

const wsq = await import(new URL('../../src/wsq/web/wsq.js', import.meta.url))
const { Client, Queue, Task, WsqError } = wsq
const { EventEmitter: BrowserEmitter } = await import(new URL('../../src/wsq/web/lib/emitter.js', import.meta.url))

let server
let client
const scratch = mkdtempSync(join(tmpdir(), 'wsq-api-'))
let queues = 0
const fresh = () => client.queue(`api-${++queues}`)
const sha = (bytes) => createHash('sha256').update(bytes).digest('hex')

before(async () => {
  server = await new ServerProcess({ args: FAST }).start()
  client = new Client(server.url, { backoff: () => 50 })
  await client.ready()
})
after(async () => {
  await client.close()
  await server.dispose()
  rmSync(scratch, { recursive: true, force: true })
})

/** Call `fn(callback)` and resolve with the callback's (error, result). */
const viaCallback = (fn) => new Promise((resolve) => fn((error, result) => resolve([error, result])))

describe('callbacks and promises', () => {
  test('add returns the Task at once; it is thenable, and calls back with (error, task)', async () => {
    const queue = fresh()
    const task = queue.add({ n: 1 })
    assert.ok(task instanceof Task)
    assert.equal(typeof task.id, 'string')
    assert.equal(task.state, 'unknown')
    assert.equal(await task, task)
    assert.equal(task.state, 'waiting')
    assert.equal(task.then, undefined) // settled: an ordinary object again
    const [error, called] = await viaCallback((cb) => queue.add({ n: 2 }, { retries: 1 }, cb))
    assert.equal(error, null)
    assert.ok(called instanceof Task)
    assert.equal(called.options.retries, 1)
    const [noOptions] = await viaCallback((cb) => queue.add({ n: 3 }, cb))
    assert.equal(noOptions, null)
  })

  test('listings, listQueues, stats: a callback gets (error, result); without one, a promise', async () => {
    const queue = fresh()
    await queue.add({ n: 1 })
    for (const what of ['all', 'waiting', 'active', 'completed', 'failed']) {
      const promised = await queue[what]()
      const [error, called] = await viaCallback((cb) => queue[what](cb))
      assert.equal(error, null)
      assert.deepEqual(called.map((t) => t.id), promised.map((t) => t.id), what)
      const [, paged] = await viaCallback((cb) => queue[what]({ limit: 1 }, cb))
      assert.ok(paged.length <= 1)
      assert.equal(queue[what](() => {}), undefined)
    }
    const [error, names] = await viaCallback((cb) => client.listQueues(cb))
    assert.equal(error, null)
    assert.ok(names.every((q) => q instanceof Queue))
    assert.ok(names.some((q) => q.name === queue.name))
    const [, stats] = await viaCallback((cb) => client.stats(cb))
    assert.equal(stats.queues.find((q) => q.name === queue.name).waiting, 1)
  })

  test('history: the last hour per second, in milliseconds; a callback or a promise', async () => {
    const queue = fresh()
    const before = Math.floor(Date.now() / 1000) * 1000
    await queue.add({ n: 1 })
    await queue.add({ n: 2 })
    const history = await client.history(queue.name)
    assert.equal(history.queue, queue.name)
    assert.equal(history.end - history.start, 3599 * 1000)
    assert.ok(history.end >= before)
    assert.equal(history.added.length, 3600)
    assert.equal(history.added.reduce((a, b) => a + b, 0), 2)
    const [error, recent] = await viaCallback((cb) => client.history(queue.name, { since: new Date(before) }, cb))
    assert.equal(error, null)
    assert.ok(recent.start >= before)
    assert.equal(recent.added.reduce((a, b) => a + b, 0), 2)
    const [, viaShort] = await viaCallback((cb) => client.history(queue.name, cb))
    assert.equal(viaShort.added.length, 3600)
    assert.throws(() => client.history(5), TypeError)
    assert.throws(() => client.history(queue.name, { since: 'yesterday' }), TypeError)
    assert.throws(() => client.history(queue.name, { until: 1 }), TypeError)
  })

  test('remove, retry and getData: callbacks and promises, errors both ways', async () => {
    const queue = fresh()
    const task = await queue.add({ n: 1, blob: new Uint8Array([1, 2, 3]) })
    const [error, data] = await viaCallback((cb) => task.getData(cb))
    assert.equal(error, null)
    assert.equal(data.n, 1)
    const [retryError] = await viaCallback((cb) => task.retry(cb))
    assert.equal(retryError.code, 'invalid_state')
    await assert.rejects(task.retry(), (e) => e instanceof WsqError && e.code === 'invalid_state')
    const [removed, result] = await viaCallback((cb) => task.remove(cb))
    assert.deepEqual([removed, result], [null, undefined])
    const [missing] = await viaCallback((cb) => task.getData(cb))
    assert.equal(missing.code, 'not_found')
    await assert.rejects(task.remove(), (e) => e.code === 'not_found')
  })

  test('process((task, callback) => ...): callback(error) fails the attempt; returning a promise works too', async () => {
    const queue = fresh()
    const failing = await queue.add({ n: 1 })
    const failed = next(failing, 'failed')
    const worker = queue.process((task, callback) => { setImmediate(() => callback(new Error('no codec'))) })
    const [task] = await failed
    assert.equal(task.error, 'no codec')
    await worker.stop()
    const ok = await queue.add({ n: 2 })
    const completed = next(ok, 'completed')
    queue.process(async (task) => { await task.updateProgress(1) })
    await completed
  })

  test('a failed add nobody asked about goes to the client\'s error event', async () => {
    const queue = fresh()
    await queue.add({ n: 1 }, { id: 'taken-id' })
    const errored = next(client, 'error')
    client.queue(`${queue.name}-other`).add({ n: 2 }, { id: 'taken-id' }) // another queue's id
    const [error] = await errored
    assert.equal(error.code, 'invalid_argument')
  })
})

describe('arguments of the wrong kind are TypeErrors', () => {
  const cases = {
    'new Client(5)': () => new Client(5),
    'new Client("localhost:4242")': () => new Client('localhost:4242'),
    'new Client(url, {backof})': () => new Client('ws://x', { backof: () => 1 }),
    'client.queue(5)': () => client.queue(5),
    'client.listQueues(1)': () => client.listQueues(1),
    'queue.add(data, "x")': () => fresh().add({}, 'x'),
    'queue.add(data, {timeout: "1s"})': () => fresh().add({}, { timeout: '1s' }),
    'queue.add(data, {retries: 1.5})': () => fresh().add({}, { retries: 1.5 }),
    'queue.add(data, {autoremove: 1})': () => fresh().add({}, { autoremove: 1 }),
    'queue.add(data, {bogus: 1})': () => fresh().add({}, { bogus: 1 }),
    'queue.add(data, {}, "cb")': () => fresh().add({}, {}, 'cb'),
    'queue.all(5)': () => fresh().all(5),
    'queue.waiting({page: 1})': () => fresh().waiting({ page: 1 }),
    'queue.process("fn")': () => fresh().process('fn'),
    'queue.process(fn, {concurrency: 0})': () => fresh().process(() => {}, { concurrency: 0 }),
    'task.on("queued", "fn")': () => fresh().add({}).on('queued', 'fn'),
  }
  for (const [name, call] of Object.entries(cases)) {
    test(name, () => assert.throws(call, TypeError))
  }

  test('task.remove("x"), task.updateProgress(2)', async () => {
    const task = await fresh().add({})
    assert.throws(() => task.remove('x'), TypeError)
    assert.throws(() => task.updateProgress(2), TypeError) // checked before anything is sent
  })
})

describe('EventEmitters', () => {
  test('Client, Queue and Task are node:events EventEmitters with the usual methods', async () => {
    const queue = fresh()
    const task = await queue.add({})
    for (const emitter of [client, queue, task]) {
      assert.ok(emitter instanceof EventEmitter)
      let calls = 0
      const listener = () => { calls += 1 }
      emitter.on('custom', listener)
      emitter.once('custom', listener)
      assert.equal(emitter.listenerCount('custom'), 2)
      emitter.emit('custom')
      emitter.emit('custom')
      emitter.off('custom', listener)
      emitter.emit('custom')
      assert.equal(calls, 3)
      assert.equal(emitter.listenerCount('custom'), 0)
      emitter.on('custom', listener)
      emitter.removeListener('custom', listener)
      assert.equal(emitter.listenerCount('custom'), 0)
    }
  })

  test('an error event with no listener is thrown, as Node does', () => {
    const lonely = new Client(server.url)
    assert.throws(() => lonely.emit('error', new Error('boom')), /boom/)
    return lonely.close()
  })

  test('the browsers\' EventEmitter keeps Node\'s rules', () => {
    const emitter = new BrowserEmitter()
    const order = []
    const added = []
    emitter.on('newListener', (name) => added.push(name))
    emitter.on('x', (v) => order.push(['on', v]))
    emitter.prependListener('x', (v) => order.push(['first', v]))
    const once = (v) => order.push(['once', v])
    emitter.once('x', once)
    assert.equal(emitter.emit('x', 1), true)
    emitter.emit('x', 2)
    assert.deepEqual(order, [['first', 1], ['on', 1], ['once', 1], ['first', 2], ['on', 2]])
    assert.deepEqual(added, ['x', 'x', 'x'])
    emitter.once('y', once)
    emitter.off('y', once) // a once listener is removed by the function it wraps
    assert.equal(emitter.listenerCount('y'), 0)
    assert.equal(emitter.emit('nobody'), false)
    assert.throws(() => emitter.emit('error', new Error('unheard')), /unheard/)
    emitter.removeAllListeners('x')
    assert.equal(emitter.listenerCount('x'), 0)
    assert.throws(() => emitter.on('x', 'nope'), TypeError)
  })
})

describe('Node streams both ways', () => {
  test('fs.createReadStream and a Transform upload; a worker gets Readables to pipe', async () => {
    const file = join(scratch, 'video.bin')
    const video = randomBytes(3 << 20)
    writeFileSync(file, video)
    const source = Buffer.alloc(5 << 20, 'abc')
    const gzip = createGzip()
    Readable.from([source.subarray(0, 1 << 20), source.subarray(1 << 20)]).pipe(gzip)
    const queue = fresh()
    const task = await queue.add({ video: createReadStream(file), packed: gzip, small: Buffer.from('hi') })
    const seen = {}
    queue.process(async (task) => {
      const { video, packed, small } = task.data
      assert.ok(video instanceof Readable && packed instanceof Readable && small instanceof Readable)
      seen.size = video.size
      const hash = createHash('sha256')
      await pipeline(video, hash)
      seen.video = hash.digest('hex')
      const parts = []
      await pipeline(packed, createGunzip(), new Transform({ transform (chunk, _, done) { parts.push(chunk); done() } }))
      seen.packed = sha(Buffer.concat(parts))
      seen.small = (await small.toArray()).join('')
    })
    await next(task, 'completed')
    assert.deepEqual(seen, { size: 3 << 20, video: sha(video), packed: sha(source), small: 'hi' })
  })

  test('getData() streams are Readables; the event stream is an object-mode Readable', async () => {
    const queue = fresh()
    const events = client.getEventStream()
    assert.ok(events instanceof Readable && events.readableObjectMode)
    const seen = []
    events.on('data', (event) => { if (event.args[0].queue === queue.name) seen.push(event.event) })
    const bytes = randomBytes(200_000)
    const task = await queue.add({ blob: bytes })
    await eventually(() => seen.includes('task added'))
    events.destroy()
    const data = await task.getData()
    assert.ok(data.blob instanceof Readable)
    assert.equal(sha(Buffer.concat(await data.blob.toArray())), sha(bytes))
  })

  test('a stream that errors fails the add, and no task is made', async () => {
    const queue = fresh()
    const stream = new PassThrough()
    stream.write('some')
    setTimeout(() => stream.destroy(new Error('disk gone')), 20)
    await assert.rejects(queue.add({ stream }), /disk gone/)
    assert.equal((await queue.all()).length, 0)
  })
})

test('times are milliseconds in the API (seconds on the wire)', async () => {
  const before = Date.now()
  const task = await fresh().add({}, { timeout: 1500 })
  assert.equal(task.options.timeout, 1500)
  assert.ok(Math.abs(task.created - before) < 60000, `created ${task.created} vs ${before}`)
  const [listed] = await client.queue(task.queue).all()
  assert.equal(listed.options.timeout, 1500)
})

test('with an auth file, a chosen id is the server\'s <principal>/<id> from the add on', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'wsq-scope-'))
  writeFileSync(join(dir, 'auth.toml'), [
    '[tokens.alice]', 'token = "node-alice-token-0123"', 'admin = ["*"]',
    '[tokens.bob]', 'token = "node-bob-token-012345"', 'produce = ["q"]', ''].join('\n'))
  const guarded = await new ServerProcess({ args: ['--auth-file', join(dir, 'auth.toml')] }).start()
  const alice = new Client(guarded.url, { token: 'node-alice-token-0123' })
  const bob = new Client(guarded.url, { token: 'node-bob-token-012345' })
  try {
    // Added before the first welcome tells the scope: the id gets it before the add goes
    // out, so the events the server sends ahead of the answer find the task.
    assert.equal(alice.scope, null)
    const bytes = randomBytes(200_000)
    const early = alice.queue('q').add({ blob: bytes }, { id: 'job-1' })
    const heard = []
    for (const name of ['added', 'started', 'completed']) early.on(name, (task) => heard.push([name, task.id]))
    await early
    assert.equal(alice.scope, 'alice/')
    assert.equal(early.id, 'alice/job-1')
    // Once the scope is known, the Task has its id at once.
    const later = alice.queue('q').add({ n: 2 }, { id: 'job-2' })
    assert.equal(later.id, 'alice/job-2')
    await later
    const seen = []
    alice.queue('q').process(async (task) => {
      seen.push([task.id, task.data.blob ? sha(Buffer.concat(await task.data.blob.toArray())) : null])
    })
    await eventually(() => heard.some(([name]) => name === 'completed') && seen.length === 2)
    assert.deepEqual(heard, [['added', 'alice/job-1'], ['started', 'alice/job-1'], ['completed', 'alice/job-1']])
    assert.deepEqual(seen, [['alice/job-1', sha(bytes)], ['alice/job-2', null]])
    const data = await early.getData()
    assert.equal(sha(Buffer.concat(await data.blob.toArray())), sha(bytes))
    // Bob's "job-1" is a task of his own; Alice's is, to him, a task that is not there.
    const his = await bob.queue('q').add({ n: 3 }, { id: 'job-1' })
    assert.equal(his.id, 'bob/job-1')
    for (const id of ['alice/job-1', 'alice/no-such-job', 'job-1']) {
      await assert.rejects(bob.getTask(id), (e) => e.code === 'not_found' && e.message === `No task with id ${id}.`)
    }
    assert.equal((await his.getData()).n, 3)
    await early.remove()
    await assert.rejects(alice.getTask('alice/job-1'), (e) => e.code === 'not_found')
  } finally {
    await alice.close()
    await bob.close()
    await guarded.dispose()
    rmSync(dir, { recursive: true, force: true })
  }
})

test('a refused token rejects ready() and calls; no unheard error event', async () => {
  const { mkdtempSync: mkdtemp, writeFileSync: write } = await import('node:fs')
  const dir = mkdtemp(join(tmpdir(), 'wsq-auth-'))
  write(join(dir, 'auth.toml'), '[tokens.me]\ntoken = "node-token-0123456789"\nproduce = ["*"]\n')
  const guarded = await new ServerProcess({ args: ['--auth-file', join(dir, 'auth.toml')] }).start()
  try {
    const bad = new Client(guarded.url, { token: 'wrong-token-0123456789' })
    await assert.rejects(bad.ready(), (e) => e.code === 'unauthorized')
    await assert.rejects(bad.queue('q').all(), (e) => e.code === 'unauthorized')
    await bad.close()
    const good = new Client(guarded.url, { token: 'node-token-0123456789' })
    const task = await good.queue('q').add({ n: 1 }) // its quiet subscription is forbidden: no error
    assert.equal(task.state, 'waiting')
    await assert.rejects(good.queue('q').all(), (e) => e.code === 'forbidden')
    await good.close()
  } finally {
    await guarded.dispose()
    rmSync(dir, { recursive: true, force: true })
  }
})
