// wsq.js: the JavaScript client for wsq, a WebSocket task queue whose tasks carry streams.
// One client for Node (>= 20) and browsers: ES modules with no build step, in ./lib/
// (connection, streams, tasks, queues and workers, and platform.js, the one place where
// Node and browsers differ). It speaks the wire protocol in docs/protocol.md (version 1).
// MIT licensed.
//
//   import { Client } from 'wsq-client'          // in a page served by wsq: '/wsq.js'
//   const client = new Client('ws://localhost:4242', { token })
//   const task = await client.queue('video').add({ file }, { timeout: 60000 })
//   client.queue('video').add({ file }, (error, task) => { ... })   // the seed's callbacks
//
// Times in this API are milliseconds, as in the original wsq; the wire uses seconds.

export { Client } from './lib/client.js'
export { Queue, Worker } from './lib/queue.js'
export { Task } from './lib/tasks.js'
export { WsqError, defaultBackoff } from './lib/util.js'
