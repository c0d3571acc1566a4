// A real `wsq server` in a subprocess for the Node tests: port 0 (or a given port, to
// restart on), its own data dir; the seed suite's fast heartbeat and worker timeout where a
// test asks for them (FAST), else a heartbeat that a loaded machine cannot miss (CALM).

import { spawn } from 'node:child_process'
import { existsSync, mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { dirname, join, resolve } from 'node:path'
import { fileURLToPath } from 'node:url'

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..')
const VENV_PYTHON = join(ROOT, '.venv', 'bin', 'python')
const PYTHON = process.env.WSQ_PYTHON || (existsSync(VENV_PYTHON) ? VENV_PYTHON : 'python3')

/** How much longer than nominal the machine may take (WSQ_TIME_FACTOR, as tests/conftest.py). */
export const FACTOR = Number(process.env.WSQ_TIME_FACTOR || 1)
export const budget = (ms) => ms * FACTOR

export const FAST = ['--heartbeat-interval', '0.05', '--worker-timeout', '0.1']
// With FAST, a peer silent for 150 ms is dropped: a Node client busy uploading 24 MiB on a
// loaded machine can be, and its add then fails with 'Lost connection.'. Tests that do not
// time heartbeats or acks use this instead.
export const CALM = ['--heartbeat-interval', '1', '--worker-timeout', '1']

export class ServerProcess {
  constructor ({ args = CALM, dataDir = null, port = 0 } = {}) {
    this.args = args
    this.dataDir = dataDir || mkdtempSync(join(tmpdir(), 'wsq-node-'))
    this.ownDir = !dataDir
    this.port = port
    this.proc = null
    this.log = ''
  }

  get url () { return `ws://127.0.0.1:${this.port}` }
  get address () { return this.url }

  /** Start it and wait until it listens (the port it picked is read from its log). */
  start () {
    const argv = ['-m', 'wsq', 'server', '--port', String(this.port), '--data-dir', this.dataDir,
      '--log-level', 'info', ...this.args]
    const proc = spawn(PYTHON, argv, { cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'] })
    this.proc = proc
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`server did not start:\n${this.log}`)), budget(30000))
      const read = (chunk) => {
        this.log += chunk
        const match = /listening on wss?:\/\/[^\s:]+:(\d+)/.exec(this.log)
        if (match && this.proc === proc && !this._listening) {
          this._listening = true
          this.port = Number(match[1])
          clearTimeout(timer)
          resolve(this)
        }
      }
      proc.stdout.setEncoding('utf8').on('data', read)
      proc.stderr.setEncoding('utf8').on('data', read)
      proc.once('exit', (code) => { clearTimeout(timer); if (!this._listening) reject(new Error(`server exited ${code}:\n${this.log}`)) })
      this._listening = false
    })
  }

  /** SIGTERM (or `signal`) and wait for the exit. */
  stop (signal = 'SIGTERM') {
    const proc = this.proc
    if (!proc || proc.exitCode !== null || proc.signalCode !== null) return Promise.resolve()
    return new Promise((resolve) => { proc.once('exit', resolve); proc.kill(signal) })
  }

  kill () { return this.stop('SIGKILL') }

  /** Start again on the same port and data dir. */
  async restart () {
    await this.stop()
    return this.start()
  }

  async dispose () {
    await this.kill()
    if (this.ownDir) rmSync(this.dataDir, { recursive: true, force: true })
  }
}

export async function startServer (options) {
  return new ServerProcess(options).start()
}

/** Resolve with the event's arguments the next time `emitter` emits `name`. */
export function next (emitter, name) {
  return new Promise((resolve) => emitter.once(name, (...args) => resolve(args)))
}

/** Wait until `check()` is truthy (returns it); fail after `ms` (scaled). */
export async function eventually (check, ms = 10000) {
  const deadline = Date.now() + budget(ms)
  while (true) {
    const value = await check()
    if (value) return value
    if (Date.now() > deadline) throw new Error(`not true within ${budget(ms)} ms: ${check}`)
    await new Promise((resolve) => setTimeout(resolve, 20))
  }
}

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))

/**
 * A TCP proxy in front of a server: `cut()` drops every connection through it (a network
 * blip), `close()` also refuses new ones until `listen()` again on the same port, and
 * `hold()` / `release()` keep server-to-client bytes back and then deliver them in order.
 */
export class Proxy {
  constructor (targetPort) {
    this.targetPort = targetPort
    this.port = 0
    this.pairs = new Set()
    this.server = null
    this.held = null
    this.refusing = false
  }

  get url () { return `ws://127.0.0.1:${this.port}` }

  async listen (port = this.port) {
    const net = await import('node:net')
    this.server = net.createServer((client) => this._pair(net, client))
    await new Promise((resolve, reject) => {
      this.server.once('error', reject)
      this.server.listen(port, '127.0.0.1', resolve)
    })
    this.port = this.server.address().port
    return this
  }

  _pair (net, client) {
    if (this.refusing) { client.destroy(); return }
    const upstream = net.connect(this.targetPort, '127.0.0.1')
    const pair = { client, upstream }
    this.pairs.add(pair)
    client.on('data', (data) => upstream.write(data))
    upstream.on('data', (data) => { if (this.held) this.held.push([client, data]); else client.write(data) })
    const end = () => { this.pairs.delete(pair); client.destroy(); upstream.destroy() }
    client.on('close', end).on('error', end)
    upstream.on('close', end).on('error', end)
  }

  cut () { for (const { client, upstream } of this.pairs) { client.destroy(); upstream.destroy() } this.pairs.clear() }

  /** Cut every connection and refuse new ones (the target is out of reach)... */
  refuse () { this.refusing = true; this.cut() }

  /** ...until this. */
  restore () { this.refusing = false }

  hold () { this.held = [] }

  release () {
    const held = this.held || []
    this.held = null
    for (const [client, data] of held) if (!client.destroyed) client.write(data)
  }

  async close () {
    this.cut()
    if (this.server) await new Promise((resolve) => this.server.close(resolve))
    this.server = null
  }
}

/** A raw protocol connection (the `ws` package, as wsq.js uses it in Node), greeted:
 *  for what the client API cannot do on purpose (not answer pings, never ack). */
export async function rawConnection (url, options = {}) {
  const { WebSocket } = await import(new URL('../../src/wsq/web/node_modules/ws/wrapper.mjs', import.meta.url))
  const ws = new WebSocket(url, options)
  const inbox = []
  const waiting = []
  ws.on('message', (data, isBinary) => {
    if (isBinary) return
    const decoded = JSON.parse(data.toString())
    for (const message of Array.isArray(decoded) ? decoded : [decoded]) {
      inbox.push(message)
      for (const waiter of [...waiting]) if (waiter.check(message)) { waiting.splice(waiting.indexOf(waiter), 1); waiter.resolve(message) }
    }
  })
  await new Promise((resolve, reject) => { ws.once('open', resolve); ws.once('error', reject) })
  const raw = {
    ws,
    inbox,
    send (message) { ws.send(JSON.stringify(message)) },
    /** The first message (received or to come) for which check(message) is true. */
    receive (check) {
      const found = inbox.find(check)
      if (found) return Promise.resolve(found)
      return new Promise((resolve) => waiting.push({ check, resolve }))
    },
  }
  raw.send({ op: 'hello', protocol: 1, client: 'wsq-node-test' })
  await raw.receive((m) => m.op === 'welcome')
  return raw
}
