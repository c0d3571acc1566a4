// The one place where Node and browsers differ. Everything else in wsq.js is written
// against what `platform` holds:
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
// Both halves load in either (node.js reaches Node's modules only when called), so there
// is no top-level await and no bundler: `require('wsq-client')` works too (Node >= 20.19).

import * as browser from './browser.js'
import { nodePlatform } from './node.js'

const inNode = typeof process === 'object' && typeof process.versions?.node === 'string' &&
  typeof window === 'undefined'

export const platform = inNode ? nodePlatform() : browser
