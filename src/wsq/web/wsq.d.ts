// Type declarations for wsq.js, the browser client of wsq (docs/protocol.md, version 1).

export type Json = null | boolean | number | string | Json[] | { [key: string]: Json }
/** A value in task data that travels as a stream. */
export type StreamValue = Blob | File | ReadableStream<Uint8Array> | Uint8Array | ArrayBuffer
export type Listener = (...args: any[]) => void

export function defaultBackoff (tries: number): number

export class WsqError extends Error {
  /** The wire error code (docs/protocol.md §7), e.g. 'not_found', 'forbidden'. */
  code: string
  constructor (message: string, code?: string)
}

declare class Emitter {
  on (name: string, fn: Listener): Listener
  once (name: string, fn: Listener): Listener
  off (name: string, fn: Listener): void
  listens (name: string): boolean
  emit (name: string, ...args: any[]): void
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
  /** Your task id; adding it again returns the existing task. */
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

export interface Page { limit?: number; cursor?: string | null }
export type TaskList = Task[] & { cursor: string | null }

export class Client extends Emitter {
  constructor (address: string, options?: ClientOptions)
  readonly address: string
  readonly connected: boolean
  readonly closed: boolean
  queue (name: string): Queue
  listQueues (): Promise<Queue[]>
  stats (): Promise<{ queues: QueueStats[] }>
  getEventStream (): ReadableStream<{ event: string, args: Json[] }>
  /** Resolves once connected. */
  ready (): Promise<void>
  close (): void
  newTaskId (): string
}

export class Queue extends Emitter {
  readonly client: Client
  readonly name: string
  add (data: any, options?: AddOptions): Promise<Task>
  process (handler: (task: Task) => unknown | Promise<unknown>, options?: { concurrency?: number }): Worker
  all (page?: Page): Promise<TaskList>
  waiting (page?: Page): Promise<TaskList>
  active (page?: Page): Promise<TaskList>
  completed (page?: Page): Promise<TaskList>
  failed (page?: Page): Promise<TaskList>
}

export class Task extends Emitter {
  readonly id: string
  readonly queue: string
  state: 'waiting' | 'active' | 'completed' | 'failed'
  progress: number
  retries: number
  error: string | null
  worker: string | null
  created: number
  updated: number
  options: { timeout: number, retries: number, autoremove: boolean }
  /** In a handler: the data, each stream a ReadableStream<Uint8Array>. */
  data: any
  /** In a handler: the run number of this attempt. */
  run: number | null
  /** True once the server aborted this run (timeout, removal). */
  aborted: boolean
  updateProgress (fraction: number): Promise<void>
  touch (): Promise<void>
  remove (): Promise<void>
  retry (): Promise<void>
  getData (): Promise<any>
}

export class Worker {
  readonly id: string
  readonly queue: string
  readonly concurrency: number
  readonly running: Map<string, Task>
  stop (): Promise<void>
}
