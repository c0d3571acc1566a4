// With a global WebSocket (Node's own, undici's: here Node 20 with --experimental-websocket,
// as Node 22 has by default), wsq.js uses it rather than `ws`. Node's WebSocket reports a
// refused connection with 'error' and no 'close': the client must still retry.

import assert from 'node:assert/strict'
import { spawn } from 'node:child_process'
import { after, before, test } from 'node:test'
import { Proxy, ServerProcess, budget, eventually } from './server.mjs'

let server
let proxy

before(async () => {
  server = await new ServerProcess().start()
  proxy = await new Proxy(server.port).listen()
})
after(async () => {
  await proxy.close()
  await server.dispose()
})

const SCRIPT = `
const { Client } = await import(process.argv[1])
if (globalThis.WebSocket === undefined) throw new Error('no global WebSocket')
const client = new Client(process.argv[2], { backoff: () => 100 })
let errors = 0
client.on('error', () => { errors += 1; console.log('refused') })
await client.ready()
const task = await client.queue('global-ws').add({ n: 1, bytes: new Uint8Array(100000) })
const data = await task.getData()
let size = 0
for await (const chunk of data.bytes) size += chunk.length
console.log(JSON.stringify({ errors, state: task.state, size, global: client._socket instanceof globalThis.WebSocket }))
await client.close()
`

test('the global WebSocket connects after refusals and moves streams', async () => {
  const port = proxy.port
  await proxy.close() // refused until it listens again
  const child = spawn(process.execPath, ['--experimental-websocket', '--no-warnings', '--input-type=module', '-e', SCRIPT,
    new URL('../../src/wsq/web/wsq.js', import.meta.url).href, `ws://127.0.0.1:${port}`], { stdio: ['ignore', 'pipe', 'pipe'] })
  let output = ''
  child.stdout.on('data', (data) => { output += data })
  child.stderr.on('data', (data) => { output += data })
  // Listen again only once the client has been refused twice (a loaded machine may take
  // a while to start it).
  await eventually(() => output.split('\n').filter((line) => line === 'refused').length >= 2, 30000)
  await proxy.listen(port)
  const code = await new Promise((resolve) => {
    const timer = setTimeout(() => child.kill(), budget(30000))
    child.once('exit', (code) => { clearTimeout(timer); resolve(code) })
  })
  assert.equal(code, 0, output)
  const result = JSON.parse(output.trim().split('\n').at(-1))
  assert.ok(result.errors >= 2, output)
  assert.deepEqual([result.state, result.size, result.global], ['waiting', 100000, true])
})
