// The browser half of platform.js: ReadableStreams, the page's WebSocket, our EventEmitter.

export { EventEmitter } from './emitter.js'

export const WebSocket = globalThis.WebSocket

export function isPlatformStream () { return false }

export function platformChunks (value) {
  throw new TypeError(`Not a stream: ${value}`)
}

/** A ReadableStream of Uint8Array, each chunk fetched as it is read; errors at once when
 *  its `source` fails (a lost connection), read or not. */
export function toStream (source) {
  return new ReadableStream({
    start (controller) {
      source.onError = (error) => { try { controller.error(error) } catch {} }
    },
    async pull (controller) {
      const chunk = await source.next()
      if (chunk === null) controller.close()
      else controller.enqueue(chunk)
    },
    cancel () { source.cancel() },
  }, { highWaterMark: 0 })
}

export function eventStream (cancel) {
  let controller
  const stream = new ReadableStream({
    start (c) { controller = c },
    cancel () { cancel() },
  })
  return {
    stream,
    push (event) { try { controller.enqueue(event) } catch {} },
    close () { try { controller.close() } catch {} },
  }
}
