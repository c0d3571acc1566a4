// The wsq dashboard: queues, tasks by state, workers, a page per task, live progress, and
// actions. It uses wsq.js like any page would and listens to the server's events; the one
// thing it asks for on a timer is the history of the queue whose charts are on screen
// (once a second, only the seconds since its last answer). Everything shown from the server (task data, queue names, errors, worker names)
// is set as text (textContent, attributes), never parsed as HTML.
//
// Routes (location.hash): #/ the queues, #/queue/<name> one queue's tasks, #/workers the
// workers, #/task/<id> one task.

import { Client } from '/wsq.js'
import { Charts } from '/charts.js'

const PAGE = 50
const BULK_PAGE = 500 // failed tasks listed at a time by a bulk action
const BULK_BATCH = 100 // their retries or removes in flight at a time
const DATA_SHOWN = 100_000 // characters of a task's data shown on its page
const TASK_ID = /^(?:[A-Za-z0-9][A-Za-z0-9_.@:-]{0,99}\/)?[A-Za-z0-9_.:-]{1,64}$/ // docs/protocol.md §3
const $ = (selector) => document.querySelector(selector)
const url = `${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}/`

const view = {
  page: 'overview', // overview | workers | task
  queue: null, // selected queue name
  state: 'waiting', // selected state tab ('' for all)
  cursors: [null], // cursor of each page seen; the last is the current page's
  rows: new Map(), // task id -> {task, tr}
  stats: [],
  task: null, // the id on the task page
  bulk: false, // a bulk action is running
}

const charts = new Charts()
let client = null

function connect (token) {
  if (client) client.close()
  client = new Client(url, token ? { token } : {})
  client.on('connect', () => {
    setStatus('connected')
    // The server may have restarted (its history with it): read the whole hour again.
    charts.clear()
    history.refused.clear()
    refreshHistory()
    refreshStats()
    refreshTasks()
    refreshPage()
  })
  client.on('disconnect', () => setStatus('disconnected'))
  client.on('error', (error) => {
    if (error.code === 'unauthorized') {
      setStatus('token needed')
      $('#token-form').hidden = false
    }
  })
  for (const name of ['task added', 'task queued', 'task started', 'task completed',
    'task failed', 'task deleted', 'worker added', 'worker removed', 'worker started']) {
    client.on(name, (subject) => onChange(name, subject))
  }
  client.on('task progress', (task, progress) => showProgress(task, progress))
  window.wsqClient = client // for the console
}

function setStatus (text) {
  const status = $('#status')
  status.textContent = text
  status.dataset.state = text
  status.className = `status ${text.replace(/\s+/g, '-')}`
}

// -- routes ---------------------------------------------------------------------------------

function route () {
  const [, page = '', ...rest] = location.hash.split('/')
  const arg = rest.length ? safeDecode(rest.join('/')) : null
  view.page = page === 'workers' ? 'workers' : page === 'task' ? 'task' : 'overview'
  for (const main of document.querySelectorAll('main.view')) main.hidden = true
  $(view.page === 'overview' ? '#overview' : `#${view.page}-view`).hidden = false
  for (const link of document.querySelectorAll('#views a')) {
    link.classList.toggle('selected', link.dataset.view === view.page)
  }
  if (view.page === 'task') {
    view.task = arg
    loadTask(arg)
  } else {
    view.task = null
  }
  if (view.page === 'workers') refreshWorkers()
  if (view.page === 'overview' && page === 'queue' && arg !== null && arg !== view.queue) selectQueue(arg)
  if (view.page === 'overview') drawCharts()
}

function safeDecode (text) {
  try {
    return decodeURIComponent(text)
  } catch {
    return text
  }
}

function refreshPage () {
  if (view.page === 'workers') refreshWorkers()
  if (view.page === 'task' && view.task !== null) loadTask(view.task)
}

// -- refreshing, driven by events (batched so a burst costs one request) --------------------

const pending = { stats: null, tasks: null, workers: null, run: null, attempts: null }

function later (what, fn, ms) {
  if (pending[what]) return
  pending[what] = setTimeout(() => { pending[what] = null; fn() }, ms)
}

function onChange (name, subject) {
  const queue = subject && subject.queue
  later('stats', refreshStats, 150)
  if (queue === view.queue) later('tasks', refreshTasks, 150)
  if (view.page === 'workers') later('workers', refreshWorkers, 150)
  if (view.page === 'task' && name.startsWith('task ') && subject.id === view.task) onTaskEvent(name, subject)
}

async function refreshStats () {
  if (!client || !client.connected) return
  const { queues } = await client.stats()
  view.stats = queues
  const body = $('#queues tbody')
  body.replaceChildren(...queues.map(queueRow))
  $('#no-queues').hidden = queues.length > 0
  const current = queues.find((q) => q.name === view.queue)
  for (const button of document.querySelectorAll('#states button')) {
    const count = button.querySelector('span')
    if (count) count.textContent = current ? current[button.dataset.state] : 0
  }
  const workers = current ? current.workers : []
  $('#workers').textContent = workers.length
    ? `${workers.length} worker${workers.length > 1 ? 's' : ''}: ` +
      workers.map((w) => `${w.id.slice(0, 8)} (${w.running}/${w.concurrency})`).join(', ')
    : 'No workers.'
  showBulk(current ? current.failed : 0)
}

function queueRow (queue) {
  const tr = document.createElement('tr')
  tr.dataset.queue = queue.name
  if (queue.name === view.queue) tr.classList.add('selected')
  const name = cell(tr, '')
  const button = document.createElement('button')
  button.className = 'link'
  button.textContent = queue.name
  button.addEventListener('click', () => { location.hash = queueHref(queue.name) })
  name.append(button)
  for (const state of ['waiting', 'active', 'completed', 'failed']) {
    cell(tr, String(queue[state])).dataset.count = state
  }
  const slots = queue.workers.reduce((n, w) => n + w.concurrency, 0)
  const workers = cell(tr, queue.workers.length ? `${queue.workers.length} (${slots})` : '0')
  workers.title = `${queue.workers.length} workers, ${slots} slots`
  return tr
}

function queueHref (name) { return `#/queue/${encodeURIComponent(name)}` }
function taskHref (id) { return `#/task/${encodeURIComponent(id)}` }

function selectQueue (name) {
  view.queue = name
  view.cursors = [null]
  $('#tasks-section').hidden = false
  $('#queue-name').textContent = name
  $('#add-queue').value = name
  $('#task-data').hidden = true
  $('#bulk-result').textContent = ''
  drawCharts()
  refreshHistory()
  refreshStats()
  refreshTasks()
}

function selectState (state) {
  view.state = state
  view.cursors = [null]
  for (const button of document.querySelectorAll('#states button')) {
    button.classList.toggle('selected', button.dataset.state === state)
  }
  refreshTasks()
}

async function refreshTasks () {
  if (!client || !client.connected || view.queue === null) return
  const queue = client.queue(view.queue)
  const cursor = view.cursors[view.cursors.length - 1]
  const list = view.state ? queue[view.state].bind(queue) : queue.all.bind(queue)
  const tasks = await list({ limit: PAGE, cursor })
  const body = $('#tasks tbody')
  view.rows = new Map()
  body.replaceChildren(...tasks.map(taskRow))
  $('#no-tasks').hidden = tasks.length > 0
  $('#next-page').disabled = !tasks.cursor
  $('#next-page').dataset.cursor = tasks.cursor || ''
  $('#first-page').disabled = view.cursors.length === 1
}

function taskRow (task) {
  const tr = document.createElement('tr')
  tr.dataset.task = task.id
  tr.dataset.state = task.state
  cell(tr, '').append(taskLink(task.id))
  cell(tr, task.state).className = `state ${task.state}`
  const bar = document.createElement('progress')
  bar.max = 1
  bar.value = task.progress
  const progress = cell(tr, '')
  progress.className = 'progress'
  progress.append(bar, ` ${Math.round(task.progress * 100)}%`)
  cell(tr, String(task.retries))
  cell(tr, task.error || '').className = 'error'
  cell(tr, describeOptions(task.options))
  cell(tr, new Date(task.updated).toLocaleTimeString())
  const actions = cell(tr, '')
  actions.className = 'actions'
  actions.append(action('data', () => showData(task)))
  if (task.state === 'failed') actions.append(action('retry', () => task.retry()))
  actions.append(action('remove', () => {
    if (task.state !== 'active' || confirm('Remove an active task? Its run is aborted.')) return task.remove()
  }))
  view.rows.set(task.id, { task, tr, bar, label: progress })
  return tr
}

function taskLink (id) {
  const link = document.createElement('a')
  link.href = taskHref(id)
  link.className = 'task-link'
  const code = document.createElement('code')
  code.textContent = id
  code.title = id
  link.append(code)
  return link
}

function describeOptions (o) {
  return `timeout ${o.timeout === -1 ? 'none' : o.timeout / 1000 + ' s'}, retries ${o.retries === -1 ? 'forever' : o.retries}` +
    (o.autoremove ? ', autoremove' : '')
}

function showProgress (task, value) {
  const row = view.rows.get(task.id)
  if (row) {
    row.bar.value = value
    row.label.lastChild.textContent = ` ${Math.round(value * 100)}%`
  }
  for (const bar of document.querySelectorAll('#worker-list progress[data-task]')) {
    if (bar.dataset.task === task.id) bar.value = value
  }
  if (view.page === 'task' && task.id === view.task) {
    setTaskProgress(value)
    const running = $('#task-attempts tr[data-outcome="running"] td.progress')
    if (running) running.textContent = percent(value)
  }
}

function cell (tr, text) {
  const td = document.createElement('td')
  td.textContent = text
  tr.append(td)
  return td
}

function action (label, fn, text = label) {
  const button = document.createElement('button')
  button.textContent = text
  button.dataset.action = label
  button.addEventListener('click', async () => {
    button.disabled = true
    try {
      await fn()
    } catch (error) {
      alert(`${label} failed: ${error.message}`)
    } finally {
      button.disabled = false
    }
  })
  return button
}

async function showData (task) {
  const data = await task.getData()
  const streams = streamsOf(data)
  $('#data-task').textContent = task.id
  $('#data-json').textContent = dataJson(data, streams)
  $('#data-streams').replaceChildren(...streams.map(({ path, stream }, i) => {
    const li = document.createElement('li')
    li.append(action(`download stream ${i + 1} (${pathText(path)})`, () => download(stream, fileName(task.id, path))))
    return li
  }))
  $('#task-data').hidden = false
}

/** The streams in task data, with the path (keys and indexes) leading to each. */
function streamsOf (data, path = [], out = []) {
  if (data instanceof ReadableStream) out.push({ path, stream: data })
  else if (Array.isArray(data)) data.forEach((value, i) => streamsOf(value, [...path, i], out))
  else if (data !== null && typeof data === 'object') {
    for (const [key, value] of Object.entries(data)) streamsOf(value, [...path, key], out)
  }
  return out
}

function dataJson (data, streams) {
  const names = new Map(streams.map(({ stream }, i) => [stream, `<stream ${i + 1}: ${formatBytes(stream.size)}>`]))
  return JSON.stringify(data, (key, value) => names.get(value) ?? value, 2) ?? 'null'
}

function pathText (path) {
  if (!path.length) return 'the data'
  return path.map((p, i) => typeof p === 'number' ? `[${p}]` : i ? `.${p}` : p).join('')
}

function fileName (id, path) {
  return `${id}-${path.length ? path.join('.') : 'data'}`.replace(/[^A-Za-z0-9_.-]/g, '_')
}

function formatBytes (n) {
  if (n == null) return '? bytes'
  if (n < 1024) return `${n} bytes`
  const units = ['KiB', 'MiB', 'GiB', 'TiB']
  let value = n / 1024
  let unit = 0
  while (value >= 1024 && unit < units.length - 1) { value /= 1024; unit++ }
  return `${value.toFixed(value < 10 ? 1 : 0)} ${units[unit]} (${n.toLocaleString('en')} bytes)`
}

async function download (stream, name) {
  const blob = await new Response(stream).blob()
  const link = document.createElement('a')
  link.href = URL.createObjectURL(blob)
  link.download = name
  document.body.append(link)
  link.click()
  link.remove()
  setTimeout(() => URL.revokeObjectURL(link.href), 60_000)
}

// -- bulk retry / remove of a queue's failed tasks ------------------------------------------

function showBulk (failed) {
  $('#bulk').hidden = !failed && !view.bulk
  $('#bulk-retry').textContent = `retry all failed (${failed})`
  $('#bulk-remove').textContent = `remove all failed (${failed})`
  for (const button of document.querySelectorAll('#bulk button')) button.disabled = view.bulk || !failed
}

async function bulk (kind) {
  const name = view.queue
  const current = view.stats.find((q) => q.name === name)
  const total = current ? current.failed : 0
  if (!total || view.bulk) return
  const verb = kind === 'retry' ? 'Retry' : 'Remove'
  if (!confirm(`${verb} all ${total} failed tasks of queue "${name}"?`)) return
  view.bulk = true
  showBulk(total)
  const out = $('#bulk-result')
  const tally = { done: 0, gone: 0, errors: 0, last: null }
  const show = (end) => {
    out.textContent = `${kind === 'retry' ? 'Retried' : 'Removed'} ${tally.done} of ${total}` +
      (tally.gone ? `, ${tally.gone} no longer failed` : '') +
      (tally.errors ? `, ${tally.errors} refused (${tally.last})` : '') + (end ? '.' : '…')
  }
  show(false)
  try {
    await eachFailed(name, total, kind, tally, () => show(false))
  } catch (error) {
    tally.errors += 1
    tally.last = error.message
  } finally {
    view.bulk = false
    show(true)
    refreshStats()
    refreshTasks()
  }
}

/** Act on the failed tasks of `name`, at most `total` (the count confirmed: tasks that
 *  fail again meanwhile wait for the next bulk action), a page at a time, with at most
 *  BULK_BATCH requests in flight. */
async function eachFailed (name, total, kind, tally, progress) {
  const queue = client.queue(name)
  let cursor = null
  let seen = 0
  while (seen < total) {
    const page = await queue.failed({ limit: Math.min(BULK_PAGE, total - seen), cursor })
    for (let at = 0; at < page.length; at += BULK_BATCH) {
      const batch = page.slice(at, at + BULK_BATCH)
      const results = await Promise.allSettled(batch.map((task) => kind === 'retry' ? task.retry() : task.remove()))
      for (const result of results) {
        if (result.status === 'fulfilled') tally.done += 1
        else if (['not_found', 'invalid_state'].includes(result.reason.code)) tally.gone += 1
        else { tally.errors += 1; tally.last = result.reason.message }
      }
      progress()
    }
    seen += page.length
    if (!page.cursor || !page.length) break
    cursor = page.cursor
  }
}

// -- charts ---------------------------------------------------------------------------------

// Drawn from the server's per-second history (docs/protocol.md §4.6), not from the events
// this page hears: the whole hour when a queue's charts open (and after a reconnection),
// then once a second the seconds since the last answer's `end`, which the answer
// overwrites (docs/decisions.md, "The dashboard's charts").
const history = { asking: false, refused: new Map() } // queue -> why the server refused
const REFUSALS = new Set(['forbidden', 'bad_message'])

function drawCharts () {
  if (view.page !== 'overview' || view.queue === null) return
  const why = history.refused.get(view.queue)
  if (why) {
    const note = document.createElement('p')
    note.className = 'empty'
    note.dataset.chartsRefused = ''
    note.textContent = `No charts: ${why}`
    $('#queue-charts').replaceChildren(note)
    return
  }
  charts.render($('#queue-charts'), view.queue)
}

/** Ask for the history of the queue on screen (at most one request at a time). */
async function refreshHistory () {
  const queue = view.queue
  if (!client || !client.connected || view.page !== 'overview' || queue === null) return
  if (history.asking || document.hidden || history.refused.has(queue)) return
  const since = charts.end(queue)
  history.asking = true
  try {
    charts.apply(await client.history(queue, since === null ? {} : { since }))
  } catch (error) {
    // Not allowed (no observe right on the queue) or not understood (an older server):
    // say so, rather than ask again every second. Anything else (a lost connection, the
    // server too busy): the next second asks again.
    if (REFUSALS.has(error.code)) history.refused.set(queue, error.message)
  } finally {
    history.asking = false
  }
  if (queue === view.queue) drawCharts()
}

// -- workers --------------------------------------------------------------------------------

async function refreshWorkers () {
  if (!client || !client.connected || view.page !== 'workers') return
  const workers = await client.workers()
  $('#worker-list tbody').replaceChildren(...workers.map(workerRow))
  $('#no-workers').hidden = workers.length > 0
}

function workerRow (worker) {
  const tr = document.createElement('tr')
  tr.dataset.worker = worker.id
  tr.dataset.queue = worker.queue
  const id = cell(tr, '')
  const code = document.createElement('code')
  code.textContent = worker.id
  code.title = worker.id
  id.append(code)
  const queue = cell(tr, '')
  const link = document.createElement('a')
  link.href = queueHref(worker.queue)
  link.textContent = worker.queue
  queue.append(link)
  // A server older than node names: the server this page talks to is the node.
  const node = cell(tr, worker.node ?? location.host)
  node.className = 'node'
  const client = cell(tr, worker.client || '—')
  client.className = 'client'
  const peer = document.createElement('small')
  peer.textContent = worker.peer
  client.append(document.createElement('br'), peer)
  cell(tr, '').append(since(worker.since))
  cell(tr, `${worker.runs.length}/${worker.concurrency}`).className = 'slots'
  const runs = cell(tr, '')
  runs.className = 'runs'
  const list = document.createElement('ul')
  list.append(...worker.runs.map(runItem))
  if (worker.runs.length) runs.append(list)
  else runs.textContent = 'idle'
  return tr
}

function runItem (run) {
  const li = document.createElement('li')
  li.dataset.task = run.task
  const bar = document.createElement('progress')
  bar.max = 1
  bar.value = run.progress
  bar.dataset.task = run.task
  const when = run.started ?? run.offered
  li.append(taskLink(run.task), ` run ${run.run} `, bar, ' ')
  if (when == null) li.append('since the server restarted')
  else li.append(run.started == null ? 'offered ' : 'started ', since(when))
  return li
}

/** A time as "12 s ago" (kept current by the clock below), the date in its title. */
function since (ms) {
  const time = document.createElement('time')
  time.dateTime = new Date(ms).toISOString()
  time.title = new Date(ms).toLocaleString()
  time.dataset.since = String(ms)
  time.textContent = ago(ms)
  return time
}

function ago (ms) {
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000))
  if (s < 60) return `${s} s ago`
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s ago`
  if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.floor(s % 3600 / 60)} min ago`
  return `${Math.floor(s / 86400)} d ago`
}

function tick () {
  for (const time of document.querySelectorAll('time[data-since]')) time.textContent = ago(Number(time.dataset.since))
  refreshHistory()
}

// -- the task page --------------------------------------------------------------------------

const page = { task: null, loading: 0 }

async function loadTask (id) {
  $('#task-id').textContent = id ?? ''
  if (!client || !client.connected) return
  const loading = ++page.loading
  page.task = null
  if (!id || !TASK_ID.test(id)) {
    return missing(`"${id ?? ''}" is not a task id: 1 to 64 letters, digits, or _ . : -, after "principal/" if the task's principal chose it`)
  }
  let task
  try {
    task = await client.getTask(id)
  } catch (error) {
    if (loading !== page.loading) return
    return missing(error.code === 'not_found' ? `No task with id ${id}.` : `Could not read task ${id}: ${error.message}`)
  }
  if (loading !== page.loading) return
  page.task = task
  $('#task-missing').hidden = true
  $('#task-body').hidden = false
  showRecord(task)
  const streams = streamsOf(task.data)
  showTaskData(task.data, streams)
  showStreams(id, streams)
  if (task.state === 'active') later('run', showRun, 0)
  await showAttempts(task, loading)
}

function missing (text) {
  $('#task-missing').textContent = text
  $('#task-missing').hidden = false
  $('#task-body').hidden = true
}

function showRecord (task) {
  const state = $('#task-state')
  state.textContent = task.state
  state.className = `state ${task.state}`
  setTaskProgress(task.progress)
  const fields = [
    ['queue', queueLink(task.queue)],
    ['state', task.state],
    ['failed attempts', `${task.retries} (retries allowed: ${task.options.retries === -1 ? 'forever' : task.options.retries})`],
    ['worker', task.worker ?? '—'],
    ['created', dateAndAgo(task.created)],
    ['updated', dateAndAgo(task.updated)],
    ['options', describeOptions(task.options)],
  ]
  $('#task-fields').replaceChildren(...fields.flatMap(([name, value]) => {
    const dt = document.createElement('dt')
    dt.textContent = name
    const dd = document.createElement('dd')
    dd.dataset.field = name
    dd.append(value)
    return [dt, dd]
  }))
  $('#task-error').textContent = task.error ?? ''
  $('#task-error-box').hidden = task.error == null
  // Tasks carry no result yet: shown once the record has one.
  $('#task-result').textContent = task.result === undefined ? '' : JSON.stringify(task.result, null, 2)
  $('#task-result-box').hidden = task.result === undefined
  $('#task-retry').disabled = task.state !== 'failed'
  $('#task-remove').disabled = false
}

function queueLink (name) {
  const link = document.createElement('a')
  link.href = queueHref(name)
  link.textContent = name
  return link
}

function dateAndAgo (ms) {
  const span = document.createElement('span')
  if (ms == null || !Number.isFinite(ms)) { span.textContent = '—'; return span }
  span.append(`${new Date(ms).toLocaleString()} (`, since(ms), ')')
  return span
}

function setTaskProgress (value) {
  $('#task-progress').value = value
  $('#task-percent').textContent = `${Math.round(value * 100)}%`
}

function showTaskData (data, streams) {
  const json = dataJson(data, streams)
  const cut = json.length > DATA_SHOWN
  $('#task-data-json').textContent = cut ? json.slice(0, DATA_SHOWN) + '\n…' : json
  $('#task-data-cut').textContent = cut ? `Cut: the first ${DATA_SHOWN.toLocaleString('en')} of ${json.length.toLocaleString('en')} characters.` : ''
  $('#task-data-cut').hidden = !cut
}

function showStreams (id, streams) {
  $('#task-streams tbody').replaceChildren(...streams.map(({ path, stream }, i) => {
    const tr = document.createElement('tr')
    tr.dataset.stream = String(i)
    cell(tr, pathText(path)).className = 'path'
    cell(tr, formatBytes(stream.size))
    // Read again when asked: the streams of an earlier answer end with their connection.
    cell(tr, '').append(action('download', async () => {
      const fresh = await client.getTask(id)
      const found = streamsOf(fresh.data).find((s) => pathText(s.path) === pathText(path))
      if (!found) throw new Error('the stream is gone')
      await download(found.stream, fileName(id, path))
    }))
    return tr
  }))
  $('#task-streams').hidden = !streams.length
  $('#task-no-streams').hidden = streams.length > 0
}

/** The active run's times, from the workers listing (the task record has none). */
async function showRun () {
  const task = page.task
  if (!task || task.state !== 'active') return
  const workers = await client.workers(task.queue).catch(() => [])
  for (const worker of workers) {
    const run = worker.runs.find((r) => r.task === task.id)
    if (!run || page.task !== task) continue
    const dd = $('#task-fields dd[data-field="worker"]')
    dd.replaceChildren(`${worker.id} · run ${run.run} `)
    const when = run.started ?? run.offered
    if (when != null) dd.append(run.started == null ? 'offered ' : 'started ', since(when))
  }
}

// -- a task's attempts ----------------------------------------------------------------------

const OUTCOMES = {
  completed: 'completed',
  failed: 'failed',
  timed_out: 'timed out',
  no_response: "worker didn't respond",
  released: 'released',
}

/** The task's runs, one row each, oldest first; read again whenever the task's events
 *  say a run began or ended (onTaskEvent). */
async function showAttempts (task, loading = page.loading) {
  let attempts
  try {
    attempts = await client.attempts(task.id)
  } catch {
    return // the task is gone (its 'deleted' event says so) or the connection dropped
  }
  if (loading !== page.loading || page.task !== task) return
  $('#task-attempts tbody').replaceChildren(...attempts.map(attemptRow))
  $('#task-attempts').hidden = !attempts.length
  $('#task-no-attempts').hidden = attempts.length > 0
  $('#task-attempts-kept').hidden = attempts.length < 100
}

function attemptRow (attempt) {
  const tr = document.createElement('tr')
  const outcome = attempt.outcome ?? 'running'
  tr.dataset.run = String(attempt.run)
  tr.dataset.outcome = outcome
  cell(tr, String(attempt.run))
  const worker = cell(tr, attempt.worker ?? '—')
  if (attempt.client) worker.append(labelled('client', attempt.client))
  cell(tr, attempt.node ?? '—')
  cell(tr, '').append(timeOf(attempt.offered))
  cell(tr, '').append(timeOf(attempt.started, attempt.offered, (d) => `${d} after the offer`))
  const ended = cell(tr, '')
  if (attempt.ended != null) ended.append(timeOf(attempt.ended, attempt.started ?? attempt.offered, (d) => `took ${d}`))
  else if (attempt.started != null) ended.append('running for ', since(attempt.started))
  else ended.textContent = '—'
  const shown = cell(tr, OUTCOMES[outcome] ?? outcome)
  shown.className = `outcome ${outcome}`
  if (attempt.error) shown.append(labelled('error', attempt.error))
  cell(tr, attempt.progress == null ? '—' : percent(attempt.progress)).className = 'progress'
  return tr
}

/** A time as local time, and how long after `from` it was (`said` words it) if both are
 *  known. */
function timeOf (ms, from = null, said = null) {
  const span = document.createElement('span')
  if (ms == null) { span.textContent = '—'; return span }
  span.textContent = new Date(ms).toLocaleString()
  span.title = new Date(ms).toISOString()
  if (from != null && said) span.append(labelled('took', said(duration(ms - from))))
  return span
}

function labelled (className, text) {
  const span = document.createElement('span')
  span.className = className
  span.textContent = text
  return span
}

function duration (ms) {
  const s = Math.max(0, ms) / 1000
  if (s < 1) return `${Math.round(s * 1000)} ms`
  if (s < 60) return `${s.toFixed(1)} s`
  if (s < 3600) return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`
  return `${Math.floor(s / 3600)} h ${Math.floor(s % 3600 / 60)} min`
}

function percent (value) { return `${Math.round(value * 100)}%` }

function onTaskEvent (name, task) {
  if (name === 'task deleted') {
    page.task = null
    return missing(`Task ${task.id} was removed.`)
  }
  if (!page.task) return loadTask(task.id)
  const shown = page.task
  for (const key of ['state', 'progress', 'retries', 'error', 'worker', 'updated', 'created']) shown[key] = task[key]
  showRecord(shown)
  if (name === 'task started') later('run', showRun, 0)
  // A run began or ended: its row appears or gets its end (progress is shown as it comes).
  if (name !== 'task progress') later('attempts', () => showAttempts(shown), 100)
}

async function taskAction (kind) {
  const task = page.task
  if (!task) return
  if (kind === 'retry') return task.retry()
  if (task.state === 'active' && !confirm('Remove an active task? Its run is aborted.')) return
  await task.remove()
}

// -- adding ---------------------------------------------------------------------------------

async function addTask (event) {
  event.preventDefault()
  const result = $('#add-result')
  const bar = $('#add-progress')
  let data
  try {
    data = JSON.parse($('#add-data').value || 'null')
  } catch (error) {
    result.textContent = `Data is not JSON: ${error.message}`
    return
  }
  const files = [...$('#add-files').files]
  if (files.length) {
    if (data === null || typeof data !== 'object' || Array.isArray(data)) data = { data }
    data.files = files
  }
  const total = files.reduce((n, f) => n + f.size, 0)
  bar.hidden = !files.length
  bar.value = 0
  result.textContent = files.length ? 'uploading…' : ''
  try {
    const task = await client.queue($('#add-queue').value).add(data, {
      timeout: Number($('#add-timeout').value) === -1 ? -1 : Number($('#add-timeout').value) * 1000,
      retries: Number($('#add-retries').value),
      autoremove: $('#add-autoremove').checked,
      onUploadProgress: (sent) => { bar.value = total ? sent / total : 1 },
    })
    result.textContent = `Added ${task.id}.`
    if (view.queue === null) location.hash = queueHref(task.queue)
  } catch (error) {
    result.textContent = `Not added: ${error.message}`
  } finally {
    bar.hidden = true
  }
}

// -- wiring ---------------------------------------------------------------------------------

for (const button of document.querySelectorAll('#states button')) {
  button.addEventListener('click', () => selectState(button.dataset.state))
}
$('#next-page').addEventListener('click', () => {
  view.cursors.push($('#next-page').dataset.cursor)
  refreshTasks()
})
$('#first-page').addEventListener('click', () => { view.cursors = [null]; refreshTasks() })
$('#add-form').addEventListener('submit', addTask)
$('#bulk-retry').addEventListener('click', () => bulk('retry'))
$('#bulk-remove').addEventListener('click', () => bulk('remove'))
for (const kind of ['retry', 'remove']) {
  const button = $(`#task-${kind}`)
  button.addEventListener('click', async () => {
    button.disabled = true
    try {
      await taskAction(kind)
    } catch (error) {
      alert(`${kind} failed: ${error.message}`)
    } finally {
      button.disabled = kind === 'retry' && (!page.task || page.task.state !== 'failed')
    }
  })
}
$('#search').addEventListener('submit', (event) => {
  event.preventDefault()
  const id = $('#search-id').value.trim()
  const target = taskHref(id)
  if (location.hash === target) loadTask(id)
  else location.hash = target
})
$('#token-form').addEventListener('submit', (event) => {
  event.preventDefault()
  const token = $('#token').value
  sessionStorage.setItem('wsq-token', token)
  $('#token-form').hidden = true
  setStatus('connecting')
  connect(token)
})
window.addEventListener('hashchange', route)
document.addEventListener('visibilitychange', () => refreshHistory())
setInterval(tick, 1000)
selectState('waiting')
connect(sessionStorage.getItem('wsq-token'))
route()
