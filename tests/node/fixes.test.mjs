// The wsq.js behaviours issue 9 §1 reported, each observed failing before its fix
// (run them against another build of the client with WSQ_JS=/path/to/wsq.js).

import assert from 'node:assert/strict'
import { after, before, describe, test } from 'node:test'
import { Proxy, ServerProcess, budget, eventually, next, sleep } from './server.mjs'

const { Client } = await import(process.env.WSQ_JS || new URL('../../src/wsq/web/wsq.js', import.meta.url))

const fast = { backoff: () => 50 }
let server
const clients = []
const proxies = []

function client (url = server.url, options = fast) {
  const made = new Client(url, options)
  clients.push(made)
  return made
}

async function proxy () {
  const made = await new Proxy(server.port).listen()
  proxies.push(made)
  return made
}

before(async () => { server = await new ServerProcess().start() })
after(async () => {
  for (const made of clients) await made.close()
  for (const made of proxies) await made.close()
  await server.dispose()
})

/** A 24 MiB stream (three credit windows), so most of it is still on the server. */
const BIG = new Uint8Array(24 << 20).fill(7)

async function readAll (stream) {
  const reader = stream.getReader ? stream : null
  let size = 0
  if (reader) {
    const r = stream.getReader()
    while (true) { const { done, value } = await r.read(); if (done) return size; size += value.byteLength }
  }
  for await (const chunk of stream) size += chunk.byteLength
  return size
}

/** Read one chunk (whatever the platform's stream), keeping the stream open. */
async function readOne (stream) {
  if (stream.getReader) {
    const reader = stream.getReader()
    const { value } = await reader.read()
    reader.releaseLock()
    return value
  }
  return await new Promise((resolve, reject) => {
    stream.once('error', reject)
    stream.once('readable', () => { stream.off('error', reject); resolve(stream.read()) })
  })
}

describe('connection', () => {
  test('connects again after close()', async () => {
    const c = client()
    await c.ready()
    await c.close()
    assert.equal(c.connected, false)
    await c.connect()
    assert.equal(c.connected, true)
    const task = await c.queue('again').add({ n: 1 })
    assert.equal(task.state, 'waiting')
  })

  test('reconnects with backoff when the connection is refused', async () => {
    const p = await proxy()
    const port = p.port
    await p.close() // nothing listens there now: connecting is refused
    const c = client(`ws://127.0.0.1:${port}`)
    let errors = 0
    c.on('error', () => { errors += 1 })
    await eventually(() => errors >= 2)
    await p.listen(port)
    await c.ready()
    assert.equal((await c.queue('refused').add({ n: 1 })).state, 'waiting')
  })
})

describe('streams whose connection is gone fail at once', () => {
  for (const when of ['before', 'after']) {
    test(`in a handler, the read started ${when} the drop`, async () => {
      const producer = client()
      await producer.queue(`lost-${when}`).add({ video: BIG })
      const p = await proxy()
      const worker = client(p.url)
      let failure = null
      worker.on('error', () => {})
      worker.queue(`lost-${when}`).process(async (task) => {
        if (when === 'before') await readOne(task.data.video)
        const started = Date.now()
        p.cut()
        await p.close() // no reconnection can happen: the read must not wait for one
        if (when === 'after') await next(worker, 'disconnect')
        failure = await readAll(task.data.video).then(() => 'read it all', (error) => error)
        failure.ms = Date.now() - started
      })
      await eventually(() => failure)
      assert.equal(failure.message, 'Lost connection.')
      assert.ok(failure.ms < budget(5000), `took ${failure.ms} ms`)
    })
  }

  test('from getData(), the read started after the drop', async () => {
    const producer = client()
    const task = await producer.queue('lost-get').add({ video: BIG })
    const p = await proxy()
    const reader = client(p.url)
    reader.on('error', () => {})
    const [listed] = await reader.queue('lost-get').all()
    assert.equal(listed.id, task.id)
    const data = await listed.getData()
    p.cut()
    await p.close()
    await next(reader, 'disconnect')
    const error = await readAll(data.video).then(() => null, (e) => e)
    assert.equal(error && error.message, 'Lost connection.')
  })
})

test('worker reports made during a connection blip are sent after it: the task completes', async () => {
  const p = await proxy()
  const worker = client(p.url)
  worker.on('error', () => {})
  const producer = client()
  const queue = producer.queue('blip')
  worker.queue('blip').process(async (task) => {
    p.cut()
    await next(worker, 'disconnect')
    task.updateProgress(0.5) // made while disconnected, and so is the completion
  })
  const task = await queue.add({ n: 1 }, { timeout: 3000 })
  const final = await eventually(async () => {
    const [listed] = (await queue.all()).filter((t) => t.id === task.id)
    return ['completed', 'failed'].includes(listed.state) && listed
  })
  assert.deepEqual([final.state, final.error, final.progress], ['completed', null, 0.5])
})

test('a listener attached right after add() resolves sees every later event', async () => {
  const producer = client()
  const workerClient = client()
  const queue = producer.queue('listen-late')
  const worker = workerClient.queue('listen-late').process(async () => {})
  await eventually(async () => (await producer.stats()).queues.some((q) => q.workers.some((w) => w.id === worker.id)))
  // The worker is quick: a task may have started, or even completed, before the add's
  // answer arrives. The events after that answer are the ones the state does not show yet.
  const later = { waiting: ['started', 'completed'], active: ['completed'], completed: [] }
  const seen = []
  const expected = []
  for (let i = 0; i < 20; i++) {
    const task = await queue.add({ i })
    expected.push(...later[task.state].map((event) => [i, event]))
    task.on('started', () => seen.push([i, 'started']))
    task.on('completed', () => seen.push([i, 'completed']))
  }
  await eventually(() => seen.length >= expected.length)
  await sleep(200)
  assert.deepEqual(seen.sort(), expected.sort())
})

test('a listener on a task nobody keeps fires; the client lets go of final tasks', async () => {
  const producer = client()
  const workerClient = client()
  const queue = producer.queue('let-go')
  let fired = 0
  for (let i = 0; i < 5; i++) {
    // Each with a stream the handler never reads (more than travels inline).
    queue.add({ i, unread: new Uint8Array(100_000) }).on('completed', () => { fired += 1 })
  }
  workerClient.queue('let-go').process(async () => {})
  await eventually(() => fired === 5)
  // Final tasks are released: nothing watched, no subscription left; the worker keeps
  // nothing of the runs it finished (their unread streams included).
  await eventually(() => producer._watched.size === 0 && producer._subscriptions.size === 0)
  assert.deepEqual([workerClient._sources.size, workerClient._downloads.size, workerClient._requests.size], [0, 0, 0])
})

test('Worker.stop() declines an offer already in flight: the task stays waiting, retries untouched', async () => {
  const p = await proxy()
  const workerClient = client(p.url)
  const producer = client()
  const queue = producer.queue('stop-in-flight')
  const worker = workerClient.queue('stop-in-flight').process(async () => { throw new Error('must not run') })
  await eventually(async () => (await producer.stats()).queues.some((q) => q.workers.some((w) => w.id === worker.id)))
  p.hold() // the offer leaves the server but does not reach the worker yet
  const task = await queue.add({ n: 1 })
  await eventually(async () => (await queue.active()).length === 1)
  const stopped = worker.stop()
  await sleep(50)
  p.release()
  await stopped
  await sleep(500) // five worker timeouts: an unanswered offer would have failed by now
  const [listed] = await queue.all()
  assert.equal(listed.id, task.id)
  assert.deepEqual([listed.state, listed.retries, listed.error], ['waiting', 0, null])
})

test('a remove or retry that took effect before a drop does not fail when sent again', async () => {
  const p = await proxy()
  const c = client(p.url)
  c.on('error', () => {})
  const producer = client()
  const queue = producer.queue('resent')
  const gone = await queue.add({ n: 1 })
  const failing = await queue.add({ n: 2 })
  const failed = next(failing, 'failed')
  const worker = producer.queue('resent').process(async () => { throw new Error('no') })
  await failed
  await worker.stop()
  const mine = await c.queue('resent').all()
  const byId = Object.fromEntries(mine.map((t) => [t.id, t]))
  for (const [task, call] of [[byId[gone.id], (t) => t.remove()], [byId[failing.id], (t) => t.retry()]]) {
    p.hold() // the server acts, but its answer is held back ...
    const answered = call(task)
    await eventually(async () => {
      const listed = (await queue.all()).find((t) => t.id === task.id)
      return !listed || listed.state === 'waiting'
    })
    p.cut() // ... and lost with the connection; the request is sent again
    p.held = null
    await answered
  }
  assert.deepEqual((await queue.all()).map((t) => [t.id, t.state]), [[failing.id, 'waiting']])
})

test('a worker keys its runs by run: an old run ending does not hide a newer run of the task', async () => {
  const producer = client()
  const queue = producer.queue('runs')
  const aborted = []
  let finishFirst
  queue.process(async (task) => {
    if (task.run === 1) {
      await new Promise((resolve) => { finishFirst = resolve }) // outlives its timeout
      return
    }
    finishFirst() // run 1 ends while run 2 is running
    await new Promise((resolve) => task.on('abort', (reason) => { aborted.push([task.run, reason]); resolve() }))
  }, { concurrency: 2 })
  const task = await queue.add({ n: 1 }, { timeout: 300, retries: 1 })
  await next(task, 'failed')
  await next(task, 'failed')
  await eventually(() => aborted.length === 1)
  assert.deepEqual(aborted, [[2, 'Timed out.']])
})

test('an add whose connection dropped after its uploads is lost, not sent naming streams the server dropped', async () => {
  const p = await proxy()
  const c = client(p.url)
  c.on('error', () => {})
  await c.ready()
  const prepare = c._prepareStreams.bind(c)
  let drop = true
  c._prepareStreams = async (found) => {
    const prepared = await prepare(found)
    for (const entry of prepared.uploads) {
      const send = entry.upload.send.bind(entry.upload)
      entry.upload.send = async (value, report) => {
        await send(value, report)
        if (!drop) return
        const generation = c._generation
        p.cut() // the upload is on the server, and lost with the connection
        await eventually(() => c._generation > generation && c.connected)
      }
    }
    return prepared
  }
  const queue = c.queue('lost-after-upload')
  const blob = new Uint8Array(200 << 10).fill(1)
  await assert.rejects(queue.add({ blob }), (error) => error.code === 'connection_lost')
  drop = false
  const task = await queue.add({ blob })
  assert.equal(task.state, 'waiting')
  assert.equal((await queue.all()).length, 1)
})

test('an offer of a run the worker is running, or still reporting, is acknowledged and not run twice', async () => {
  // A server that lost a run's start (a crash, a full disk) may offer the run again.
  const producer = client()
  const queue = producer.queue('offered-twice')
  const runs = []
  let finish
  const worker = queue.process(async (task) => {
    runs.push(task.run)
    await new Promise((resolve) => { finish = resolve })
  })
  const offers = []
  const offer = worker._offer
  worker._offer = function (tasks) { offers.push(tasks); return offer.call(this, tasks) }
  const report = producer._reportComplete
  producer._reportComplete = function (task) {
    report.call(this, task)
    worker._offer(offers[0]) // while its report is on its way
  }
  const task = await queue.add({ n: 1 })
  await eventually(() => runs.length === 1)
  worker._offer(offers[0]) // while it runs
  await sleep(100)
  assert.deepEqual(runs, [1])
  finish()
  await next(task, 'completed')
  await sleep(100)
  assert.deepEqual(runs, [1])
})
