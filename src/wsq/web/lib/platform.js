// The one place where Node and browsers differ. Everything else in wsq.js is written
// against what this module exports:
//
//   EventEmitter          the base class of Client, Queue and Task
//   WebSocket             the WHATWG WebSocket class to connect with
//   isPlatformStream(v)   is v a stream of this platform (beyond Blob, bytes, ReadableStream)?
//   platformChunks(v)     an async iterable of the bytes (or strings) of such a stream
//   toStream(source)      the stream a task's data holds, reading a download `source`
//   eventStream(cancel)   {stream, push(event), close()}: getEventStream()'s stream
//
// Node gets node:events, node:stream Readables and the global WebSocket where there is one,
// else the `ws` package (Node 20); browsers get ReadableStreams and their own WebSocket.

const inNode = typeof process === 'object' && typeof process.versions?.node === 'string' &&
  typeof window === 'undefined'

export const platform = inNode ? await import('./node.js') : await import('./browser.js')
