// Per-queue charts of the server's history (docs/protocol.md §4.6): tasks added,
// completed and failed per second, the waiting depth and the enqueue-to-start latency.
// A ring of per-second values per queue and series (the last hour) holds what the server
// answered, drawn as small inline SVGs. No library: SVG elements made with
// createElementNS, labels set with textContent.
//
// The rings hold the server's numbers only, never counts of events the page heard: each
// `history` answer overwrites the seconds it covers (the last one still in progress), so
// asking again `since` the last `end` never counts a second twice
// (docs/decisions.md, "The dashboard's charts").

/** The series drawn per queue, in order: `kind` says how a value reads. */
export const SERIES = [
  { name: 'added', kind: 'rate', label: 'added/s', title: 'Tasks added per second.' },
  { name: 'completed', kind: 'rate', label: 'completed/s', title: 'Runs completed per second.' },
  {
    name: 'failed',
    kind: 'rate',
    label: 'failed/s (final)',
    title: 'Tasks failed with no retry left, per second. A failed attempt that is retried ' +
      'is not counted here: the task goes back to waiting.',
  },
  { name: 'waiting', kind: 'depth', label: 'waiting', title: 'Tasks waiting, sampled once a second.' },
  {
    name: 'latency',
    kind: 'ms',
    label: 'wait to start',
    title: 'Mean time from enqueue to start (the offer to a worker) of the tasks started ' +
      'in each second; a gap where none started.',
  },
]
const SPAN = 3600 // seconds kept
const SHOWN = 600 // seconds drawn: the last ten minutes
const WIDTH = 300
const HEIGHT = 60
const SVG = 'http://www.w3.org/2000/svg'

/** The values of one series over the last `span` seconds; a second not known reads null. */
export class Ring {
  constructor (span = SPAN) {
    this.span = span
    this.values = new Float64Array(span).fill(NaN)
    this.last = null // the latest second (Unix) written
  }

  /** Set the second `second` (an integer, Unix seconds) to `value` (a number or null);
   *  a second older than the span is ignored. */
  put (second, value) {
    this._advance(second)
    if (second <= this.last - this.span) return
    this.values[second % this.span] = value == null ? NaN : value
  }

  /** The values of the `count` seconds that end at `end` (oldest first, null if unknown). */
  window (end, count) {
    this._advance(end)
    const out = new Array(count).fill(null)
    for (let i = 0; i < count; i++) {
      const second = end - count + 1 + i
      const value = this.values[second % this.span]
      if (second > this.last - this.span && !Number.isNaN(value)) out[i] = value
    }
    return out
  }

  _advance (second) {
    if (this.last === null) { this.last = second; return }
    if (second <= this.last) return
    // Forget the seconds skipped since the last write (at most a whole span).
    for (let s = Math.max(this.last + 1, second - this.span + 1); s <= second; s++) this.values[s % this.span] = NaN
    this.last = second
  }
}

/** The rings of every queue, and their drawing. */
export class Charts {
  constructor () {
    this.queues = new Map() // queue name -> {end: ms, rings: {series name: Ring}}
  }

  /** Take in a `client.history(queue, ...)` answer: its seconds replace what was held. */
  apply (history) {
    let held = this.queues.get(history.queue)
    if (!held) {
      held = { end: null, rings: Object.fromEntries(SERIES.map(({ name }) => [name, new Ring()])) }
      this.queues.set(history.queue, held)
    }
    const first = Math.floor(history.start / 1000)
    for (const { name } of SERIES) {
      const ring = held.rings[name]
      history[name].forEach((value, i) => ring.put(first + i, value))
    }
    held.end = Math.max(held.end ?? 0, history.end)
  }

  /** The `end` (ms) of the latest answer applied for `queue`, or null: ask `since` it. */
  end (queue) {
    const held = this.queues.get(queue)
    return held ? held.end : null
  }

  /** Forget every queue (after a reconnection: the server may have restarted). */
  clear () {
    this.queues.clear()
  }

  /** Draw `queue`'s charts into `container` (replacing what it held): the ten minutes up to
   *  the latest second the server answered for. Nothing before the first answer. */
  render (container, queue) {
    const held = this.queues.get(queue)
    if (!held) { container.replaceChildren(); return }
    const second = Math.floor(held.end / 1000)
    container.replaceChildren(...SERIES.map((series) => chart(series, held.rings[series.name].window(second, SHOWN))))
  }
}

function chart (series, values) {
  const figure = document.createElement('figure')
  figure.className = `chart ${series.name}`
  figure.dataset.series = series.name
  figure.title = series.title
  const known = values.filter((v) => v !== null)
  const peak = Math.max(0, ...known)
  const caption = document.createElement('figcaption')
  const title = document.createElement('span')
  title.textContent = series.label
  const summary = document.createElement('span')
  summary.className = 'rate'
  describe(series.kind, values, known, peak, summary)
  caption.append(title, summary)
  const svg = element('svg', { viewBox: `0 0 ${WIDTH} ${HEIGHT}`, preserveAspectRatio: 'none', role: 'img' })
  svg.setAttribute('aria-label', `${series.label}, last 10 minutes, peak ${format(series.kind, peak)}`)
  svg.append(...shapes(values, peak || 1))
  const scale = document.createElement('span')
  scale.className = 'scale'
  scale.textContent = `peak ${format(series.kind, peak)}`
  figure.append(caption, svg, scale)
  return figure
}

/** The summary of a chart, as text and as data attributes (for tests and tools). */
function describe (kind, values, known, peak, out) {
  const last = lastKnown(values)
  out.dataset.peak = String(peak)
  out.dataset.last = last === null ? '' : String(last)
  if (kind === 'rate') {
    // The last ten whole seconds: the last second is still in progress.
    const recent = values.slice(-11, -1).reduce((a, b) => a + (b ?? 0), 0) / 10
    const total = known.reduce((a, b) => a + b, 0)
    out.dataset.total = String(total)
    out.textContent = `${formatRate(recent)} now · ${total} in 10 min`
  } else {
    out.textContent = last === null ? 'no data' : `${format(kind, last)} ${kind === 'depth' ? 'now' : 'last'}`
  }
}

/** The SVG shapes of `values`: an area and a line per run of known seconds (an unknown
 *  second is a gap), a lone known second a short dash
 *  (a few pixels wide). */
function shapes (values, peak) {
  const step = WIDTH / (values.length - 1)
  const y = (v) => (HEIGHT - 2 - (v / peak) * (HEIGHT - 4)).toFixed(1)
  const out = []
  let run = []
  const flush = () => {
    if (run.length === 1) {
      const [x, v] = run[0]
      const half = Math.max(step / 2, 2) // a few pixels: one second of 600 would be invisible
      run = [[Math.max(0, x - half), v], [Math.min(WIDTH, x + half), v]]
    }
    if (run.length) {
      const line = run.map(([x, v]) => `${x.toFixed(1)},${y(v)}`).join(' ')
      const [left, right] = [run[0][0].toFixed(1), run[run.length - 1][0].toFixed(1)]
      out.push(
        element('polygon', { points: `${left},${HEIGHT} ${line} ${right},${HEIGHT}`, class: 'area' }),
        element('polyline', { points: line, class: 'line' }),
      )
    }
    run = []
  }
  values.forEach((v, i) => { if (v === null) flush(); else run.push([i * step, v]) })
  flush()
  return out
}

function lastKnown (values) {
  for (let i = values.length - 1; i >= 0; i--) if (values[i] !== null) return values[i]
  return null
}

function element (tag, attributes) {
  const node = document.createElementNS(SVG, tag)
  for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, value)
  return node
}

function format (kind, value) {
  if (kind === 'rate') return `${formatRate(value)}/s`
  if (kind === 'ms') return formatMs(value)
  return String(value)
}

function formatRate (value) {
  return value >= 10 || Number.isInteger(value) ? String(Math.round(value)) : value.toFixed(1)
}

/** Milliseconds as "0.4 ms", "12 ms", "1.5 s" or "2.0 min". */
export function formatMs (ms) {
  if (ms < 10) return `${Number(ms.toFixed(1))} ms`
  if (ms < 1000) return `${Math.round(ms)} ms`
  if (ms < 60_000) return `${(ms / 1000).toFixed(1)} s`
  return `${(ms / 60_000).toFixed(1)} min`
}
