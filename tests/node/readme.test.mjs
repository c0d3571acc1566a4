// The seed README's add.js and worker.js (tests/node/readme/), run as they are written
// but for their import line (and the seed's typo `client.quueu`, fixed to `client.queue`),
// against a real `wsq server` on the README's address, ws://localhost:4242. They use the
// package as `npm pack` makes it, installed in a scratch project. A gzip encoder stands in
// for VideoEncoder (readme/video-encoder.js); the result task's stream must gunzip to the
// video that was added.

import assert from 'node:assert/strict'
import { execFileSync, spawn } from 'node:child_process'
import { createHash, randomBytes } from 'node:crypto'
import { copyFileSync, mkdtempSync, readdirSync, rmSync, writeFileSync } from 'node:fs'
import { createConnection } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { gunzipSync } from 'node:zlib'
import { after, before, test } from 'node:test'
import { ServerProcess, budget, eventually, sleep } from './server.mjs'

const { Client } = await import(new URL('../../src/wsq/web/wsq.js', import.meta.url))
const WEB = fileURLToPath(new URL('../../src/wsq/web/', import.meta.url))
const SCRIPTS = fileURLToPath(new URL('./readme/', import.meta.url))
const PORT = 4242 // the README's address

const scratch = mkdtempSync(join(tmpdir(), 'wsq-readme-'))
let server = null
let client = null
let worker = null

function portInUse (port) {
  return new Promise((resolve) => {
    const socket = createConnection(port, '127.0.0.1')
    socket.once('connect', () => { socket.destroy(); resolve(true) })
    socket.once('error', () => resolve(false))
  })
}

before(async () => {
  // The package as npm would publish it, installed as a user would (ws from npm's cache).
  execFileSync('npm', ['pack', '--pack-destination', scratch, '--loglevel=error'], { cwd: WEB })
  const [tarball] = readdirSync(scratch).filter((name) => name.endsWith('.tgz'))
  writeFileSync(join(scratch, 'package.json'), '{"private": true, "type": "commonjs"}\n')
  execFileSync('npm', ['install', '--prefer-offline', '--no-audit', '--no-fund', '--loglevel=error', `./${tarball}`], { cwd: scratch })
  for (const name of ['add.js', 'worker.js', 'video-encoder.js']) copyFileSync(join(SCRIPTS, name), join(scratch, name))
  // Another wsq (a demo) may hold the README's port for a while: wait for it.
  const deadline = Date.now() + budget(60000)
  while (await portInUse(PORT)) {
    if (Date.now() > deadline) throw new Error(`port ${PORT} stays in use`)
    await sleep(500)
  }
  server = await new ServerProcess({ port: PORT, args: [] }).start()
  client = new Client(server.url)
})

after(async () => {
  if (worker) worker.kill()
  if (client) await client.close()
  if (server) await server.dispose()
  rmSync(scratch, { recursive: true, force: true })
})

test('the README\'s add.js and worker.js run unchanged but for the import line', async () => {
  // A "video": 3 MiB, compressible in part, so gzip has work to do.
  const video = Buffer.concat([randomBytes(1 << 20), Buffer.alloc(2 << 20, 'frame ')])
  writeFileSync(join(scratch, 'video.bin'), video)
  worker = spawn(process.execPath, ['worker.js'], { cwd: scratch, stdio: ['ignore', 'pipe', 'pipe'] })
  let workerOutput = ''
  worker.stdout.on('data', (data) => { workerOutput += data })
  worker.stderr.on('data', (data) => { workerOutput += data })

  const added = execFileSync(process.execPath, ['add.js', 'video.bin', '9'], { cwd: scratch, encoding: 'utf8', timeout: budget(60000) })
  assert.equal(added.trim(), 'Video queued for processing.')

  const [result] = await eventually(async () => {
    const results = await client.queue('ffmpeg-results').all()
    return results.length && results
  }, 60000)
  const [original] = await eventually(async () => {
    const done = await client.queue('ffmpeg').completed()
    return done.length && done
  }, 60000)
  assert.equal(original.progress, 1, workerOutput)
  const data = await result.getData()
  const parts = []
  for await (const chunk of data.video) parts.push(chunk)
  const encoded = Buffer.concat(parts)
  assert.ok(encoded.length < video.length, 'gzip shrank it')
  const hash = (bytes) => createHash('sha256').update(bytes).digest('hex')
  assert.equal(hash(gunzipSync(encoded)), hash(video))
})
