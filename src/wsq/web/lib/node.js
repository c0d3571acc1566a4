// The Node half of platform.js: node:events, node:stream Readables, and the global
// WebSocket where Node has one (22 and later), else the `ws` package (Node 20). Node's
// modules are reached through process.getBuiltinModule (Node >= 20.16), so this file has
// no import a browser could trip on.

export function nodePlatform () {
  const builtin = globalThis.process.getBuiltinModule
  if (typeof builtin !== 'function') throw new Error('wsq-client needs Node 20.16 or later.')
  const { EventEmitter } = builtin('node:events')
  const { Readable, Stream } = builtin('node:stream')
  const WebSocket = globalThis.WebSocket ?? builtin('node:module').createRequire(import.meta.url)('ws').WebSocket

  /** A task's stream, read as it is consumed (task.data.video.pipe(encoder) works). */
  class TaskStream extends Readable {
    constructor (source) {
      super()
      this._source = source
      this._failed = null
      // A lost connection errors the stream at once if it flows (piped, 'data') or someone
      // listens for 'error'; otherwise at its next read, so a stream nobody is reading
      // never crashes the process with an unhandled 'error'.
      source.onError = (error) => {
        if (this.readableFlowing === true || this.listenerCount('error')) this.destroy(error)
        else this._failed = error
      }
    }

    _read () {
      if (this._failed) { this.destroy(this._failed); return }
      this._source.next().then(
        (chunk) => { this.push(chunk === null ? null : Buffer.from(chunk.buffer, chunk.byteOffset, chunk.byteLength)) },
        (error) => { this.destroy(error) },
      )
    }

    _destroy (error, callback) {
      this._source.cancel()
      callback(error)
    }
  }

  return {
    EventEmitter,
    WebSocket,

    /** A Node stream: a Readable (fs.createReadStream, a Transform, ...) or an old-style
     *  readable Stream (the seed's test streams). */
    isPlatformStream (value) {
      return value instanceof Stream && value.readable !== false && typeof value.pipe === 'function'
    },

    /** Its chunks, read with flow control (the async iterator pulls a chunk at a time). */
    platformChunks (value) {
      return value instanceof Readable ? value : new Readable().wrap(value)
    },

    toStream (source) { return new TaskStream(source) },

    eventStream (cancel) {
      const stream = new Readable({ objectMode: true, read () {} })
      stream.once('close', cancel)
      return {
        stream,
        push (event) { if (!stream.destroyed) stream.push(event) },
        close () { if (!stream.destroyed) stream.push(null) },
      }
    },
  }
}
