// Uses of wsq.js's API that its declarations (wsq.d.ts) must accept under tsc --strict;
// tests/node/types.test.mjs compiles it (no output), and checks that misuse.ts fails.
import { Client, Task, WsqError, defaultBackoff, type Attempt, type TaskStream } from '../../../src/wsq/web/wsq.js'

export async function sample (file: Blob, readable: AsyncIterable<Uint8Array> & { readable: boolean, pipe<T> (d: T): T, on (e: string, l: () => void): unknown }): Promise<void> {
  const client = new Client('ws://localhost:4242', { backoff: defaultBackoff, token: 't' })
  client.on('error', (error: WsqError) => console.log(error.code))
  const queue = client.queue('video')
  const pending = queue.add({ file, args: ['-crf', '28'] }, { timeout: 60000, retries: 1 })
  pending.on('queued', (task: Task) => console.log(task.id))
  const task: Task = await pending
  queue.add({ n: 1 }, (error, added) => console.log(error, added && added.state))
  queue.add({ n: 2 }, { autoremove: true }, () => {})
  await queue.add({ bytes: new Uint8Array(3) }).catch(() => null)
  const all = await queue.all({ limit: 10 })
  console.log(all.cursor, all[0]?.options.timeout)
  queue.waiting((error, tasks) => console.log(error, tasks?.length))
  queue.failed({ limit: 1 }, () => {})
  task.remove((error) => console.log(error))
  await task.retry()
  const data = await task.getData()
  const stream: TaskStream = data.file
  console.log(stream.size)
  const worker = queue.process(async (t) => { await t.updateProgress(0.5); await t.touch() }, { concurrency: 2 })
  queue.process((t, done) => { done(t.data ? undefined : new Error('no data')) })
  await worker.stop()
  await queue.add({ readable })
  console.log((await client.listQueues()).map((q) => q.name), (await client.stats()).queues[0]?.waiting)
  for (const worker of await client.workers('video')) console.log(worker.id, worker.node, worker.peer, worker.runs[0]?.started)
  const found = await client.getTask('some-id')
  console.log(found.state, found.data)
  const runs: Attempt[] = await found.attempts()
  for (const run of await client.attempts('some-id')) console.log(run.run, run.outcome ?? 'running', run.ended, run.error, run.client)
  client.attempts('some-id', (error, listed) => console.log(error, listed?.[0]?.started, runs.length))
  const history = await client.history('videos', { since: new Date(Date.now() - 60_000) })
  const added: number = history.added.reduce((a, b) => a + b, 0)
  const depth: number | null = history.waiting[history.waiting.length - 1]
  console.log(history.start, history.end, added, depth, history.latency[0])
  client.history('videos', (error, result) => console.log(error, result?.completed))
  await client.close()
  await client.connect()
}
