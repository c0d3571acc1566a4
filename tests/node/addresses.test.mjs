// A client given a cluster's addresses: it moves to the next one on each reconnection,
// waits its backoff only once every address failed in a row, and names the node it greeted.
import assert from 'node:assert/strict'
import { createServer } from 'node:net'
import { after, test } from 'node:test'
import { CALM, ServerProcess, eventually } from './server.mjs'

const { Client } = await import(process.env.WSQ_JS || new URL('../../src/wsq/web/wsq.js', import.meta.url))

const servers = []
const clients = []
after(async () => {
  for (const made of clients) await made.close()
  for (const made of servers) await made.dispose()
})

async function server (name) {
  const made = await new ServerProcess({ args: [...CALM, '--node-name', name] }).start()
  servers.push(made)
  return made
}

function client (addresses, options = { backoff: () => 50 }) {
  const made = new Client(addresses, options)
  clients.push(made)
  return made
}

/** A TCP port that accepts and at once closes every connection, counting them. */
async function slammer () {
  const made = { accepts: 0 }
  made.server = createServer((socket) => { made.accepts += 1; socket.destroy() })
  await new Promise((resolve) => made.server.listen(0, '127.0.0.1', resolve))
  made.url = `ws://127.0.0.1:${made.server.address().port}`
  return made
}

test('a list of addresses: a dead node is skipped, and a lost node is left for the next', async () => {
  const a = await server('node-a')
  const b = await server('node-b')
  const dead = await slammer()
  const c = client([dead.url, a.url, b.url])
  await c.ready()
  assert.equal(c.address, a.url)
  assert.equal(c.node, 'node-a')
  await a.stop()
  await eventually(() => c.connected && c.node === 'node-b')
  assert.equal(c.address, b.url)
  const task = await c.queue('moved').add({ n: 1 })
  assert.equal(task.state, 'waiting')
  dead.server.close()
})

test('backoff is waited once per round of failed addresses, with tries counting rounds', async () => {
  const one = await slammer()
  const two = await slammer()
  const waits = []
  const c = client([one.url, two.url], {
    backoff: (tries) => { waits.push([tries, one.accepts, two.accepts]); return 20 }
  })
  c.on('error', () => {})
  await eventually(() => waits.length >= 3)
  await c.close()
  assert.deepEqual(waits.slice(0, 3), [[1, 1, 1], [2, 2, 2], [3, 3, 3]])
  one.server.close()
  two.server.close()
})

test('the address must be a URL or a non-empty list of them', () => {
  assert.throws(() => new Client([]), /address list is empty/)
  assert.throws(() => new Client(['ws://a:1', 42]), TypeError)
  assert.throws(() => new Client(['http://a:1']), /ws:\/\/ or wss:\/\//)
})
