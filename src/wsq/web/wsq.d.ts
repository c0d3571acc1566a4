// Type declarations for wsq.js, the client of wsq for Node and browsers
// (docs/protocol.md, version 1). Times are milliseconds.

export type Json = null | boolean | number | string | Json[] | { [key: string]: Json }

/** Node's Readable, as much of it as these declarations need (no @types/node required). */
export interface NodeReadable {
  readonly readable: boolean
  pipe<T> (destination: T, options?: { end?: boolean }): T
  on (event: string, listener: (...args: any[]) => void): this
  [Symbol.asyncIterator] (): AsyncIterableIterator<any>
}

/** A value in task data that travels as a stream: bytes, a Blob or File, a web
 *  ReadableStream, or (in Node) a Readable such as fs.createReadStream(...). */
export type StreamValue = Blob | ReadableStream<Uint8Array> | Uint8Array | ArrayBuffer | NodeReadable

/** A stream of a task's data as a handler or getData() gets it: a ReadableStream in
 *  browsers, a Readable (of Buffers) in Node; `size` is its length in bytes. */
export type TaskStream = (ReadableStream<Uint8Array> | NodeReadable) & { size: number }

export type Callback<T> = (error: Error | null, result?: T) => void
export type Listener = (...args: any[]) => void

export function defaultBackoff (tries: number): number

export class WsqError extends Error {
  /** The wire error code (docs/protocol.md §7), e.g. 'not_found', 'forbidden';
   *  'connection_lost' with the message 'Lost connection.'. */
  code: string
  constructor (message: string, code?: string)
}

/** Node's EventEmitter in Node, the same methods and rules in browsers. An 'error'
 *  event with no listener is thrown. */
declare class EventEmitter {
  on (name: string | symbol, listener: Listener): this
  addListener (name: string | symbol, listener: Listener): this
  prependListener (name: string | symbol, listener: Listener): this
  once (name: string | symbol, listener: Listener): this
  off (name: string | symbol, listener: Listener): this
  removeListener (name: string | symbol, listener: Listener): this
  removeAllListeners (name?: string | symbol): this
  emit (name: string | symbol, ...args: any[]): boolean
  listenerCount (name: string | symbol): number
  listeners (name: string | symbol): Function[]
  eventNames (): (string | symbol)[]
}

export interface ClientOptions {
  /** Milliseconds to wait before reconnect attempt `tries`. */
  backoff?: (tries: number) => number
  /** The token the server's auth file knows (docs/security.md). */
  token?: string
}

export interface AddOptions {
  /** Milliseconds without a word from the worker before the run fails; -1: none. */
  timeout?: number
  /** Re-queues after a failure while failures <= retries; -1: forever. */
  retries?: number
  /** Delete the task and its streams once completed. */
  autoremove?: boolean
  /** Your task id (1-64 of A-Z a-z 0-9 _ . : -); adding it again returns the existing
   *  task. With an auth file the task's id is '<principal>/<id>' (task.id tells it). */
  id?: string
  /** Called as stream bytes leave: total is null when a stream's size is unknown. */
  onUploadProgress?: (sent: number, total: number | null) => void
}

export interface QueueStats {
  name: string
  waiting: number
  active: number
  completed: number
  failed: number
  workers: { id: string, queue: string, concurrency: number, running: number }[]
}

/** A connected worker as `client.workers()` lists it; times in ms. */
export interface WorkerInfo {
  id: string
  queue: string
  concurrency: number
  /** When it registered. */
  since: number
  /** What its connection's hello said it is, and that connection's remote address. */
  client: string
  peer: string
  /** The server node it is connected to (--node-name; by default host:port). */
  node: string
  /** The runs it holds, oldest first; offered/started are null for a run recovered after
   *  a server restart, started until the worker acknowledged it. */
  runs: { task: string, run: number, offered: number | null, started: number | null, progress: number }[]
}

/** One run of a task as `client.attempts()` lists it; times in ms, null when unknown (a
 *  run recovered after a server restart has no offered or started time). */
export interface Attempt {
  run: number
  /** The worker that held it, its connection's client name, and the server node. */
  worker: string | null
  client: string | null
  node: string | null
  offered: number | null
  /** When the worker acknowledged it; null if it never did. */
  started: number | null
  /** Null, with outcome, for the run in progress. */
  ended: number | null
  outcome: 'completed' | 'failed' | 'timed_out' | 'no_response' | 'released' | null
  /** The failure's text (a worker's error, "Timed out.", "Worker … didn't respond."). */
  error: string | null
  /** The last progress this run reported; null if none. */
  progress: number | null
}

/** The last hour of a queue, second by second (docs/protocol.md §4.6): one list entry
 *  per second from `start` to `end`. */
export interface QueueHistory {
  queue: string
  /** The first second, in ms since the epoch. */
  start: number
  /** The current second (still in progress), in ms since the epoch. */
  end: number
  added: number[]
  completed: number[]
  /** Runs failed with no retry left. */
  failed: number[]
  /** Tasks waiting, sampled once a second; null where no sample was taken. */
  waiting: (number | null)[]
  /** Mean enqueue-to-start wait (ms) of the tasks offered in that second; null if none. */
  latency: (number | null)[]
}

export interface HistoryOptions {
  /** Only the seconds from this time on (ms since the epoch, or a Date). */
  since?: number | Date
}

export interface Page { limit?: number; cursor?: string | null }
export type TaskList = Task[] & { cursor: string | null }

/**
 * A connection to a wsq server; it connects at once and reconnects with backoff.
 * Events: 'connect', 'disconnect', 'error', and the server events ('task added', ...).
 */
export class Client extends EventEmitter {
  /** One address, or a cluster's nodes: each reconnection moves to the next one. */
  constructor (address: string | string[], options?: ClientOptions)
  /** The address in use (or tried next). */
  readonly address: string
  readonly addresses: string[]
  /** The name of the node last connected to (the server's --node-name), or null. */
  readonly node: string | null
  /** What the server puts before the task ids this client chooses: '<principal>/' with
   *  an auth file, '' without; null until first connected. */
  readonly scope: string | null
  readonly connected: boolean
  readonly closed: boolean
  queue (name: string): Queue
  listQueues (): Promise<Queue[]>
  listQueues (callback: Callback<Queue[]>): void
  stats (): Promise<{ queues: QueueStats[] }>
  stats (callback: Callback<{ queues: QueueStats[] }>): void
  /** The workers connected now, of `queue` or of every queue the token may observe. */
  workers (queue?: string | null): Promise<WorkerInfo[]>
  workers (callback: Callback<WorkerInfo[]>): void
  workers (queue: string | null, callback: Callback<WorkerInfo[]>): void
  /** The task as the server has it now, with its data (streams read lazily); rejects with
   *  code 'not_found' if there is none. */
  getTask (id: string): Promise<Task>
  getTask (id: string, callback: Callback<Task>): void
  /** The task's runs, oldest first, the one in progress last; at most the last 100.
   *  Rejects with code 'not_found' if there is no such task (or it may not be read). */
  attempts (id: string): Promise<Attempt[]>
  attempts (id: string, callback: Callback<Attempt[]>): void
  /** The last hour of a queue, second by second, for charts (needs observe on it). */
  history (queue: string, options?: HistoryOptions): Promise<QueueHistory>
  history (queue: string, callback: Callback<QueueHistory>): void
  history (queue: string, options: HistoryOptions | undefined, callback: Callback<QueueHistory>): void
  /** Every server event as {event, args}: a ReadableStream in browsers, an object-mode
   *  Readable in Node. */
  getEventStream (): ReadableStream<{ event: string, args: Json[] }> | NodeReadable
  /** Resolves once connected. */
  ready (): Promise<void>
  /** Connect again after close(); resolves once connected. */
  connect (): Promise<void>
  /** Disconnect and stop reconnecting; resolves once the socket is closed. */
  close (): Promise<void>
  newTaskId (): string
}

export class Queue extends EventEmitter {
  readonly client: Client
  readonly name: string
  /** The Task at once (thenable: it resolves with itself once stored durably). */
  add (data: any, options?: AddOptions, callback?: Callback<Task>): PendingTask
  add (data: any, callback: Callback<Task>): PendingTask
  /** The handler returns a promise, or (the seed's form, when it takes two parameters)
   *  calls `callback(error?)`. */
  process (handler: (task: Task, callback: (error?: unknown) => void) => unknown,
    options?: { concurrency?: number }): Worker
  all (page?: Page): Promise<TaskList>
  all (callback: Callback<TaskList>): void
  all (page: Page, callback: Callback<TaskList>): void
  waiting (page?: Page): Promise<TaskList>
  waiting (callback: Callback<TaskList>): void
  waiting (page: Page, callback: Callback<TaskList>): void
  active (page?: Page): Promise<TaskList>
  active (callback: Callback<TaskList>): void
  active (page: Page, callback: Callback<TaskList>): void
  completed (page?: Page): Promise<TaskList>
  completed (callback: Callback<TaskList>): void
  completed (page: Page, callback: Callback<TaskList>): void
  failed (page?: Page): Promise<TaskList>
  failed (callback: Callback<TaskList>): void
  failed (page: Page, callback: Callback<TaskList>): void
}

/**
 * A task. Events: 'added', 'queued', 'started', 'progress' (task, fraction),
 * 'completed', 'failed' (task, willRetry), 'deleted'; in a handler also 'abort' (reason).
 */
export class Task extends EventEmitter {
  /** The id the server knows the task by (for an add: the one its answer carries). */
  readonly id: string
  readonly queue: string
  /** 'unknown' until the server answered an add. */
  state: 'unknown' | 'waiting' | 'active' | 'completed' | 'failed'
  progress: number
  retries: number
  error: string | null
  worker: string | null
  /** Milliseconds since the epoch. */
  created: number | null
  updated: number
  options: { timeout: number, retries: number, autoremove: boolean }
  /** In a handler and from client.getTask(): the data, each stream a TaskStream. */
  data: any
  /** In a handler: the run number of this attempt. */
  run: number | null
  /** True once the server aborted this run (timeout, removal). */
  aborted: boolean
  updateProgress (fraction: number): Promise<void>
  touch (): Promise<void>
  remove (): Promise<void>
  remove (callback: Callback<void>): void
  retry (): Promise<void>
  retry (callback: Callback<void>): void
  getData (): Promise<any>
  getData (callback: Callback<any>): void
  /** Its runs, oldest first (client.attempts()). */
  attempts (): Promise<Attempt[]>
  attempts (callback: Callback<Attempt[]>): void
}

/** What add() returns: the Task, thenable until the server has it. */
export type PendingTask = Task & PromiseLike<Task> & {
  catch<T = never> (onRejected: (error: any) => T | PromiseLike<T>): Promise<Task | T>
  finally (onFinally: () => void): Promise<Task>
}

export class Worker {
  readonly id: string
  readonly queue: string
  readonly concurrency: number
  /** Runs being handled, by "<task id> <run>". */
  readonly running: Map<string, Task>
  readonly stopped: boolean
  /** No new tasks (offers already on their way are released); resolves when the running
   *  ones are done. */
  stop (): Promise<void>
  stop (callback: Callback<void>): void
}
