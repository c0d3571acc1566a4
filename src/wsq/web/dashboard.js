// The wsq dashboard: queues, tasks by state, live progress, and actions. It uses wsq.js
// like any page would, listens to the server's events and never polls.

import { Client } from '/wsq.js'

const PAGE = 50
const $ = (selector) => document.querySelector(selector)
const url = `${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}/`

const view = {
  queue: null, // selected queue name
  state: 'waiting', // selected state tab ('' for all)
  cursors: [null], // cursor of each page seen; the last is the current page's
  rows: new Map(), // task id -> {task, tr}
  stats: [],
}

let client = null

function connect (token) {
  if (client) client.close()
  client = new Client(url, token ? { token } : {})
  client.on('connect', () => {
    setStatus('connected')
    refreshStats()
    refreshTasks()
  })
  client.on('disconnect', () => setStatus('disconnected'))
  client.on('error', (error) => {
    if (error.code === 'unauthorized') {
      setStatus('token needed')
      $('#token-form').hidden = false
    }
  })
  for (const name of ['task added', 'task queued', 'task started', 'task completed',
    'task failed', 'task deleted', 'worker added', 'worker removed']) {
    client.on(name, (subject) => onChange(subject && subject.queue))
  }
  client.on('task progress', (task, progress) => showProgress(task.id, progress))
  window.wsqClient = client // for the console
}

function setStatus (text) {
  const status = $('#status')
  status.textContent = text
  status.dataset.state = text
  status.className = `status ${text.replace(/\s+/g, '-')}`
}

// -- refreshing, driven by events (batched so a burst costs one request) --------------------

const pending = { stats: null, tasks: null }

function later (what, fn, ms) {
  if (pending[what]) return
  pending[what] = setTimeout(() => { pending[what] = null; fn() }, ms)
}

function onChange (queue) {
  later('stats', refreshStats, 150)
  if (queue === view.queue) later('tasks', refreshTasks, 150)
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
}

function queueRow (queue) {
  const tr = document.createElement('tr')
  tr.dataset.queue = queue.name
  if (queue.name === view.queue) tr.classList.add('selected')
  const name = cell(tr, '')
  const button = document.createElement('button')
  button.className = 'link'
  button.textContent = queue.name
  button.addEventListener('click', () => selectQueue(queue.name))
  name.append(button)
  for (const state of ['waiting', 'active', 'completed', 'failed']) {
    cell(tr, String(queue[state])).dataset.count = state
  }
  const slots = queue.workers.reduce((n, w) => n + w.concurrency, 0)
  const workers = cell(tr, queue.workers.length ? `${queue.workers.length} (${slots})` : '0')
  workers.title = `${queue.workers.length} workers, ${slots} slots`
  return tr
}

function selectQueue (name) {
  view.queue = name
  view.cursors = [null]
  $('#tasks-section').hidden = false
  $('#queue-name').textContent = name
  $('#add-queue').value = name
  $('#task-data').hidden = true
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
  const id = cell(tr, '')
  const code = document.createElement('code')
  code.textContent = task.id
  code.title = task.id
  id.append(code)
  cell(tr, task.state).className = `state ${task.state}`
  const bar = document.createElement('progress')
  bar.max = 1
  bar.value = task.progress
  const progress = cell(tr, '')
  progress.className = 'progress'
  progress.append(bar, ` ${Math.round(task.progress * 100)}%`)
  cell(tr, String(task.retries))
  cell(tr, task.error || '').className = 'error'
  const o = task.options
  cell(tr, `timeout ${o.timeout === -1 ? 'none' : o.timeout / 1000 + ' s'}, retries ${o.retries}` +
    (o.autoremove ? ', autoremove' : ''))
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

function showProgress (id, value) {
  const row = view.rows.get(id)
  if (!row) return
  row.bar.value = value
  row.label.lastChild.textContent = ` ${Math.round(value * 100)}%`
}

function cell (tr, text) {
  const td = document.createElement('td')
  td.textContent = text
  tr.append(td)
  return td
}

function action (label, fn) {
  const button = document.createElement('button')
  button.textContent = label
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
  const streams = []
  const json = JSON.stringify(data, (key, value) => {
    if (value instanceof ReadableStream) {
      streams.push({ path: key, stream: value })
      return `<stream ${streams.length}>`
    }
    return value
  }, 2)
  $('#data-task').textContent = task.id
  $('#data-json').textContent = json
  $('#data-streams').replaceChildren(...streams.map(({ path, stream }, i) => {
    const li = document.createElement('li')
    li.append(action(`download stream ${i + 1} (${path})`, () => download(stream, `${task.id}-${path || i + 1}`)))
    return li
  }))
  $('#task-data').hidden = false
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
    if (view.queue === null) selectQueue(task.queue)
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
$('#token-form').addEventListener('submit', (event) => {
  event.preventDefault()
  const token = $('#token').value
  sessionStorage.setItem('wsq-token', token)
  $('#token-form').hidden = true
  setStatus('connecting')
  connect(token)
})
selectState('waiting')
connect(sessionStorage.getItem('wsq-token'))
