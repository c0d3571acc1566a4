// Streams in task data (docs/protocol.md §8): finding them in data to add, uploading them
// within the server's credit, and downloading them as they are read.

import { platform } from './platform.js'
import { WsqError, base64, lostConnection, unbase64 } from './util.js'

const BLOB_READ = 8 << 20 // bytes of a Blob or File read at once

/** Is `value` a stream in task data: bytes, a Blob or File, a ReadableStream, a Node stream? */
export function isStream (value) {
  return value instanceof Uint8Array || value instanceof ArrayBuffer ||
    (typeof Blob !== 'undefined' && value instanceof Blob) ||
    (typeof ReadableStream !== 'undefined' && value instanceof ReadableStream) ||
    platform.isPlatformStream(value)
}

/** Split data into JSON with nulls where streams were, and the streams with their paths. */
export function extract (data) {
  const found = []
  const walk = (value, path) => {
    if (isStream(value)) { found.push({ path, value }); return null }
    if (Array.isArray(value)) return value.map((v, i) => walk(v, [...path, i]))
    if (value && typeof value === 'object' && Object.getPrototypeOf(value) === Object.prototype) {
      const out = {}
      for (const [key, v] of Object.entries(value)) out[key] = walk(v, [...path, key])
      return out
    }
    return value === undefined ? null : value
  }
  return { plain: walk(data, []), found }
}

/** Bytes small enough to travel inline, as base64; else null (the value is uploaded). */
export async function inlineOf (value, limit) {
  const size = byteSize(value)
  if (size == null || size > limit) return null
  if (value instanceof Uint8Array) return base64(value)
  if (value instanceof ArrayBuffer) return base64(new Uint8Array(value))
  return base64(new Uint8Array(await value.arrayBuffer()))
}

/** The size of a stream value when it is known before reading it. */
export function byteSize (value) {
  if (value instanceof Uint8Array || value instanceof ArrayBuffer) return value.byteLength
  if (typeof Blob !== 'undefined' && value instanceof Blob) return value.size
  return null
}

/** Pieces of at most `size` bytes; a Blob is read a slice at a time (bounded memory). */
export async function * chunks (value, size) {
  if (value instanceof ArrayBuffer) value = new Uint8Array(value)
  if (value instanceof Uint8Array) {
    for (let at = 0; at < value.byteLength; at += size) yield value.subarray(at, at + size)
    return
  }
  if (typeof Blob !== 'undefined' && value instanceof Blob) { yield * blobChunks(value, size); return }
  if (typeof ReadableStream !== 'undefined' && value instanceof ReadableStream) { yield * readerChunks(value, size); return }
  for await (const part of platform.platformChunks(value)) yield * split(part, size)
}

async function * blobChunks (blob, size) {
  // Each read of a File crosses to the browser's file thread: read several chunks at
  // once (BLOB_READ bytes), and read the next while this one is sent.
  const step = Math.max(size, BLOB_READ - (BLOB_READ % size))
  let next = blob.slice(0, step).arrayBuffer()
  for (let at = 0; at < blob.size; at += step) {
    const bytes = new Uint8Array(await next)
    if (at + step < blob.size) next = blob.slice(at + step, at + 2 * step).arrayBuffer()
    for (let i = 0; i < bytes.byteLength; i += size) yield bytes.subarray(i, i + size)
  }
}

async function * readerChunks (stream, size) {
  const reader = stream.getReader()
  try {
    while (true) {
      const { done, value } = await reader.read()
      if (done) return
      yield * split(value, size)
    }
  } finally {
    reader.releaseLock()
  }
}

const encoder = new TextEncoder()

function * split (part, size) {
  let bytes = part
  if (typeof bytes === 'string') bytes = encoder.encode(bytes)
  if (bytes instanceof ArrayBuffer) bytes = new Uint8Array(bytes)
  if (!(bytes instanceof Uint8Array)) throw new TypeError('A stream yielded something other than bytes or text.')
  for (let at = 0; at < bytes.byteLength; at += size) yield bytes.subarray(at, at + size)
}

/** One stream the client is sending, within the credit the server grants (§8.3). */
export class Upload {
  constructor (client, stream) {
    this.client = client
    this.stream = stream
    this.credit = client.limits.window
    this.error = null
    this._wake = null
  }

  grant (count) { this.credit += count; this._notify() }
  fail (error) { this.error = error; this._notify(); if (this._abandon) this._abandon(error) }
  _notify () { if (this._wake) { const wake = this._wake; this._wake = null; wake() } }

  async _waitFor (need) {
    while (this.credit < need && !this.error) await new Promise((resolve) => { this._wake = resolve })
    if (this.error) throw this.error
  }

  async send (value, report) {
    const client = this.client
    client._send({ op: 'upload', stream: this.stream })
    // A failure (a lost connection) ends the upload at once, even while the source is
    // silent: the next chunk is raced against it.
    const abandoned = new Promise((resolve, reject) => { this._abandon = reject })
    abandoned.catch(() => {})
    const pieces = chunks(value, client.limits.chunk)
    try {
      while (true) {
        const { done, value: piece } = await Promise.race([pieces.next(), abandoned])
        if (done) break
        await this._waitFor(piece.byteLength)
        await client._drained()
        if (this.error) throw this.error
        this.credit -= piece.byteLength
        client._sendChunk(this.stream, piece)
        if (report) report(piece.byteLength)
      }
    } catch (error) {
      pieces.return().catch(() => {})
      throw error
    }
    if (this.error) throw this.error
    client._send({ op: 'upload_end', stream: this.stream })
  }

  abort (reason) {
    if (this.client.connected && !this.error) {
      const error = String((reason && reason.message) || reason).slice(0, 1000)
      this.client._send({ op: 'upload_abort', stream: this.stream, error })
    }
  }
}

/** One download the server is sending; credit goes back as chunks are read. */
export class Download {
  constructor (client, stream) {
    this.client = client
    this.stream = stream
    this.chunks = []
    this.ended = false
    this.error = null
    this._wake = null
  }

  receive (bytes) { this.chunks.push(bytes); this._notify() }
  end () { this.ended = true; this._notify() }
  fail (error) { this.error = error; this._notify() }
  _notify () { if (this._wake) { const wake = this._wake; this._wake = null; wake() } }

  async next () {
    while (!this.chunks.length && !this.ended && !this.error) {
      await new Promise((resolve) => { this._wake = resolve })
    }
    if (this.error) throw this.error
    if (this.chunks.length) {
      const chunk = this.chunks.shift()
      this.client._send({ op: 'credit', stream: this.stream, bytes: chunk.byteLength })
      return chunk
    }
    return null
  }

  cancel () {
    if (this.client._downloads.get(this.stream) !== this) return
    this.client._downloads.delete(this.stream)
    if (!this.ended && !this.error) this.client._send({ op: 'cancel', stream: this.stream })
  }
}

/**
 * One stream of a task as its data holds it, tied to the connection it was obtained on:
 * it downloads when first read, and once that connection is lost it fails with
 * 'Lost connection.' at once, whether its read started or not; it never waits for a
 * reconnection. `onError` is set by the platform's stream (platform.js toStream).
 */
export class StreamSource {
  constructor (client, taskId, index, size) {
    this.client = client
    this.taskId = taskId
    this.index = index
    this.size = size
    this.generation = client._generation
    this.download = null
    this.finished = false
    this.onError = null
    client._sources.add(this)
  }

  async next () {
    if (this.finished) return null
    if (!this.download) {
      if (!this.client.connected || this.client._generation !== this.generation) throw this._fail(lostConnection())
      this.download = this.client._download(this.taskId, this.index)
    }
    try {
      const chunk = await this.download.next()
      if (chunk === null) this._finish()
      return chunk
    } catch (error) {
      throw this._fail(error)
    }
  }

  /** The connection is gone: fail now (the platform stream errors at once). */
  lost (error) {
    if (this.download) this.download.fail(error)
    if (this.onError) this.onError(this._fail(error))
    else this._fail(error)
  }

  cancel () {
    if (this.download) this.download.cancel()
    this._finish()
  }

  /** Stop tracking a stream nobody started reading (its task's run ended); a later read
   *  still checks the connection. */
  release () { if (!this.download) this.client._sources.delete(this) }

  _finish () { this.finished = true; this.client._sources.delete(this) }
  _fail (error) { this._finish(); return error }
}

/** An inline stream: its bytes came with the data. */
class InlineSource {
  constructor (bytes) { this.bytes = bytes; this.size = bytes.byteLength; this.onError = null }
  async next () { const bytes = this.bytes; this.bytes = null; return bytes && bytes.byteLength ? bytes : null }
  cancel () { this.bytes = null }
  release () {}
}

/** Data as the server sent it, each stream in its place as the platform's stream (with
 *  its `size` in bytes). The sources made are pushed to `sources` (when given). */
export function resolveStreams (client, taskId, data, streams, sources = []) {
  let root = data
  ;(streams || []).forEach((ref, index) => {
    const source = ref.inline != null ? new InlineSource(unbase64(ref.inline)) : new StreamSource(client, taskId, index, ref.size)
    sources.push(source)
    const stream = platform.toStream(source)
    stream.size = source.size // bytes, as the server stored them
    if (!ref.path.length) { root = stream; return }
    let parent = root
    for (const key of ref.path.slice(0, -1)) parent = parent[key]
    if (parent == null || typeof parent !== 'object') throw new WsqError('A stream path does not fit the data.', 'protocol')
    parent[ref.path[ref.path.length - 1]] = stream
  })
  return root
}
