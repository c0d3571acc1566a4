// BullMQ on the wsq throughput and latency workloads (see bench/wsq_tasks.py).
//
//     node bench/peers/bullmq_bench.mjs [--quick] [--json PATH] [--tasks N] [--runs R]
//
// Throughput: a producer process adds N no-op jobs with Queue.addBulk (chunks of 1,000:
// the documented way to add many jobs, one round trip per chunk); then one worker process
// (concurrency 100) drains them: e2e = N / (time from creating the Worker, connection
// already open, until the processor has run N times; counted in the processor). Median of
// R runs; Redis DB 15 flushed before each run. Latency: an idle worker (after its 'ready'
// event and a 0.5 s settle); a producer adds jobs one at a time, 5 ms apart, each carrying
// process.hrtime.bigint() taken just before add (CLOCK_MONOTONIC, the same clock as
// Python's time.monotonic()); the processor stamps on entry. Jobs are removed on
// completion. Prints ONE JSON object as its last stdout line.

import { spawn } from "node:child_process";
import { createRequire } from "node:module";
import { mkdirSync, writeFileSync } from "node:fs";
import { dirname, resolve } from "node:path";
import { fileURLToPath } from "node:url";

import { Queue, Worker } from "bullmq";
import IORedis from "ioredis";

const require = createRequire(import.meta.url);
const SELF = fileURLToPath(import.meta.url);
const ROOT = resolve(dirname(SELF), "..", "..");
const VERSION = require("bullmq/package.json").version;
const QUEUE = "bench";
const LATENCY_QUEUE = "latency";
const CONCURRENCY = 100;
const CHUNK = 1000;
const SPACING_MS = 5;
const SETTLE_MS = 500;
const JOB_OPTIONS = { removeOnComplete: true, removeOnFail: true };
const REDIS = { host: "127.0.0.1", port: 6379, db: 15, maxRetriesPerRequest: null };
const PRODUCE_TIMEOUT_MS = 180_000;
const DRAIN_TIMEOUT_MS = 180_000;
const BOOT_TIMEOUT_MS = 60_000;

const nowMs = () => Number(process.hrtime.bigint()) / 1e6;
const sleep = (ms) => new Promise((done) => setTimeout(done, Math.max(0, ms)));

function parseArgs(argv) {
  const args = { quick: false, json: null, tasks: null, runs: null, role: null, count: 0 };
  for (let i = 0; i < argv.length; i++) {
    const flag = argv[i];
    const value = () => {
      if (i + 1 >= argv.length) throw new Error(`${flag} needs a value`);
      return argv[++i];
    };
    if (flag === "--quick") args.quick = true;
    else if (flag === "--json") args.json = value();
    else if (flag === "--tasks") args.tasks = Number(value());
    else if (flag === "--runs") args.runs = Number(value());
    else if (flag === "--role") args.role = value();
    else if (flag === "--count") args.count = Number(value());
    else throw new Error(`unknown argument ${flag}`);
  }
  return args;
}

function percentile(values, q) {
  const ordered = [...values].sort((a, b) => a - b);
  const index = Math.min(ordered.length - 1, Math.max(0, Math.round((q / 100) * (ordered.length - 1))));
  return ordered[index];
}

function median(values) {
  const ordered = [...values].sort((a, b) => a - b);
  const mid = Math.floor(ordered.length / 2);
  return ordered.length % 2 ? ordered[mid] : (ordered[mid - 1] + ordered[mid]) / 2;
}

// -- child roles -------------------------------------------------------------------------

function guardChild(timeoutMs) {
  // A child never outlives its deadline nor its parent (the orchestrator).
  const parent = process.ppid;
  const deadline = setTimeout(() => {
    console.error(`role timed out after ${timeoutMs / 1000} s`);
    process.exit(3);
  }, timeoutMs);
  const watch = setInterval(() => {
    if (process.ppid !== parent) process.exit(4);
  }, 500);
  deadline.unref();
  watch.unref();
}

async function produce(count) {
  const queue = new Queue(QUEUE, { connection: new IORedis(REDIS), defaultJobOptions: JOB_OPTIONS });
  await queue.waitUntilReady();
  await queue.add("noop", {}); // connect, load the scripts
  const start = nowMs();
  for (let left = count - 1; left > 0; left -= CHUNK) {
    const size = Math.min(CHUNK, left);
    await queue.addBulk(Array.from({ length: size }, () => ({ name: "noop", data: {} })));
  }
  const elapsed = (nowMs() - start) / 1000;
  await queue.close();
  return { enqueue_per_s: (count - 1) / elapsed };
}

async function drain(count) {
  const connection = new IORedis(REDIS);
  await connection.ping();
  let done = 0;
  let finished;
  const allDone = new Promise((resolveDone) => (finished = resolveDone));
  const start = nowMs();
  const worker = new Worker(
    QUEUE,
    async () => {
      done += 1;
      if (done === count) finished(nowMs());
    },
    { connection, concurrency: CONCURRENCY },
  );
  worker.on("error", (err) => console.error(err));
  const end = await allDone;
  await worker.close();
  return { e2e_per_s: count / ((end - start) / 1000) };
}

async function latencyWorker(count) {
  const delays = [];
  let finished;
  const allDone = new Promise((resolveDone) => (finished = resolveDone));
  const worker = new Worker(
    LATENCY_QUEUE,
    async (job) => {
      delays.push(nowMs() - job.data.t);
      if (delays.length === count) finished();
    },
    { connection: new IORedis(REDIS), concurrency: CONCURRENCY, autorun: false },
  );
  worker.on("error", (err) => console.error(err));
  worker.once("ready", () => console.log("ready"));
  worker.run();
  await allDone;
  await worker.close();
  return { p50_ms: percentile(delays, 50), p99_ms: percentile(delays, 99), max_ms: Math.max(...delays) };
}

async function latencyProducer(count) {
  const queue = new Queue(LATENCY_QUEUE, { connection: new IORedis(REDIS), defaultJobOptions: JOB_OPTIONS });
  await queue.waitUntilReady();
  let nextAt = nowMs();
  for (let n = 0; n < count; n++) {
    await sleep(nextAt - nowMs());
    await queue.add("stamp", { n, t: nowMs() });
    nextAt += SPACING_MS;
  }
  await queue.close();
  return {};
}

const ROLES = {
  produce: [produce, PRODUCE_TIMEOUT_MS],
  drain: [drain, DRAIN_TIMEOUT_MS],
  "latency-worker": [latencyWorker, DRAIN_TIMEOUT_MS],
  "latency-producer": [latencyProducer, PRODUCE_TIMEOUT_MS],
};

// -- orchestration -----------------------------------------------------------------------

const children = new Set();

function killTree(child, signal = "SIGKILL") {
  try {
    process.kill(-child.pid, signal); // detached: the child leads its own process group
  } catch {
    // already gone
  }
}

function startChild(role, count) {
  const child = spawn(process.execPath, [SELF, "--role", role, "--count", String(count)], {
    cwd: ROOT,
    detached: true,
    stdio: ["ignore", "pipe", "pipe"],
  });
  children.add(child);
  child.stdoutText = "";
  child.stderrText = "";
  child.stdout.setEncoding("utf8").on("data", (text) => (child.stdoutText += text));
  child.stderr.setEncoding("utf8").on("data", (text) => (child.stderrText += text));
  child.exited = new Promise((resolveExit) =>
    child.on("close", (code, signal) => {
      children.delete(child);
      resolveExit(code ?? signal);
    }),
  );
  return child;
}

async function finish(child, role, timeoutMs) {
  let timer;
  const timeout = new Promise((resolveTimeout) => (timer = setTimeout(() => resolveTimeout("timeout"), timeoutMs)));
  const code = await Promise.race([child.exited, timeout]);
  clearTimeout(timer);
  if (code === "timeout") {
    killTree(child);
    throw new Error(`${role} timed out after ${timeoutMs / 1000} s:\n${child.stderrText.slice(-3000)}`);
  }
  if (code !== 0) throw new Error(`${role} failed (${code}):\n${child.stderrText.slice(-3000)}`);
  const lines = child.stdoutText.trim().split("\n");
  return JSON.parse(lines[lines.length - 1]);
}

async function runRole(role, count, timeoutMs) {
  return finish(startChild(role, count), role, timeoutMs);
}

async function flush() {
  const client = new IORedis({ ...REDIS, maxRetriesPerRequest: 1, connectTimeout: 5000 });
  try {
    await client.flushdb();
  } finally {
    client.disconnect();
  }
}

async function throughputRun(count) {
  await flush();
  const produced = await runRole("produce", count, PRODUCE_TIMEOUT_MS + 10_000);
  const drained = await runRole("drain", count, DRAIN_TIMEOUT_MS + 10_000);
  return { ...produced, ...drained };
}

async function latencyRun(count) {
  await flush();
  const worker = startChild("latency-worker", count);
  try {
    const deadline = Date.now() + BOOT_TIMEOUT_MS;
    while (!worker.stdoutText.startsWith("ready")) {
      if (worker.exitCode !== null) throw new Error(`latency worker exited:\n${worker.stderrText.slice(-3000)}`);
      if (Date.now() > deadline) throw new Error("timed out waiting for the latency worker to be ready");
      await sleep(10);
    }
    await sleep(SETTLE_MS);
    await runRole("latency-producer", count, PRODUCE_TIMEOUT_MS + 10_000);
    return await finish(worker, "latency-worker", 60_000);
  } finally {
    killTree(worker);
  }
}

async function orchestrate(args) {
  const tasks = args.tasks ?? (args.quick ? 300 : 20_000);
  const runs = args.runs ?? (args.quick ? 1 : 3);
  const latencyTasks = args.quick ? 50 : 1000;
  const rounds = [];
  for (let i = 0; i < runs; i++) rounds.push(await throughputRun(tasks));
  console.error(`bullmq throughput rounds: ${JSON.stringify(rounds)}`);
  const results = {
    peer: "bullmq",
    version: VERSION,
    tasks,
    runs,
    enqueue_per_s: median(rounds.map((r) => r.enqueue_per_s)),
    e2e_per_s: median(rounds.map((r) => r.e2e_per_s)),
    latency: { tasks: latencyTasks, ...(await latencyRun(latencyTasks)) },
    config:
      `one Worker process, concurrency ${CONCURRENCY}, ioredis connection (maxRetriesPerRequest null), ` +
      "removeOnComplete/removeOnFail on every job; enqueue: Queue.addBulk in chunks of " +
      `${CHUNK}; completion: counted in the processor`,
  };
  if (args.json) {
    mkdirSync(dirname(resolve(args.json)), { recursive: true });
    writeFileSync(args.json, JSON.stringify(results, null, 2) + "\n");
  }
  console.log(JSON.stringify(results));
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  if (args.role) {
    const [role, timeoutMs] = ROLES[args.role] ?? [];
    if (!role) throw new Error(`unknown role ${args.role}`);
    guardChild(timeoutMs);
    console.log(JSON.stringify(await role(args.count)));
    process.exit(0);
  }
  for (const signal of ["SIGINT", "SIGTERM"]) {
    process.on(signal, () => {
      for (const child of children) killTree(child);
      process.exit(1);
    });
  }
  try {
    await orchestrate(args);
  } finally {
    for (const child of children) killTree(child);
  }
  process.exit(0);
}

main().catch((err) => {
  for (const child of children) killTree(child);
  console.error(err.stack ?? String(err));
  process.exit(1);
});
