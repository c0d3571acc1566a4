// wsq.js against a server on PostgreSQL (tests/node/test_node.py gives this file a schema
// of its own): what a worker does when PostgreSQL goes away under the server.

import assert from 'node:assert/strict'
import { after, before, test } from 'node:test'
import { CALM, Proxy, ServerProcess, eventually, sleep } from './server.mjs'

const { Client } = await import(process.env.WSQ_JS || new URL('../../src/wsq/web/wsq.js', import.meta.url))

let server
let database
const clients = []

before(async () => {
  database = await new Proxy(Number(process.env.WSQ_TEST_PG_PORT)).listen()
  const dsn = process.env.WSQ_TEST_PG_DSN.replace('{port}', String(database.port))
  server = await new ServerProcess({ args: [...CALM, '--database', dsn, '--lease', '1'] }).start()
})
after(async () => {
  for (const made of clients) await made.close()
  await server.dispose()
  await database.close()
})

for (const outcome of ['completed', 'failed']) {
  test(`a report PostgreSQL could not store is sent again: the task ends ${outcome}, in its first run`, async () => {
    const worker = new Client(server.url, { backoff: () => 50 })
    const observer = new Client(server.url, { backoff: () => 50 })
    clients.push(worker, observer)
    const queue = `pg-${outcome}`
    const ends = []
    observer.queue(queue).on('task completed', (task) => ends.push(['completed', task.id]))
    observer.queue(queue).on('task failed', (task) => ends.push(['failed', task.id]))
    await observer.stats()
    const runs = []
    let go
    const going = new Promise((resolve) => { go = resolve })
    worker.queue(queue).process(async (task) => {
      runs.push(task.run)
      await going
      if (outcome === 'failed') throw new Error('no luck')
      return 'ok'
    })
    const task = await worker.queue(queue).add(null, { timeout: 30000, retries: 0 })
    await eventually(() => runs.length === 1)
    database.refuse()
    go()
    await sleep(500) // the report is refused as unavailable, and sent again meanwhile
    assert.deepEqual(ends, [])
    database.restore()
    await eventually(() => ends.length === 1, 15000)
    const [ended] = await observer.queue(queue)[outcome]()
    assert.equal(ended.id, task.id)
    await sleep(500)
    assert.deepEqual(runs, [1])
    assert.deepEqual(ends, [[outcome, task.id]])
  })
}
