// Per-queue charts of tasks added, completed and failed per second: a ring of per-second
// counters per queue and series (the last hour), drawn as small inline SVGs. No library:
// SVG elements made with createElementNS, labels set with textContent.
//
// The dashboard counts the events it hears (so a chart starts when the page opens);
// `seed` takes a run of per-second values from elsewhere (the server's history, once it
// keeps one) and adds them under what was counted.

export const SERIES = ['added', 'completed', 'failed']
const SPAN = 3600 // seconds kept
const SHOWN = 600 // seconds drawn: the last ten minutes
const WIDTH = 300
const HEIGHT = 60
const SVG = 'http://www.w3.org/2000/svg'

/** Per-second counts of one series over the last `span` seconds. */
export class Ring {
  constructor (span = SPAN) {
    this.span = span
    this.counts = new Float64Array(span)
    this.last = null // the latest second (Unix) written
  }

  /** Add `n` to the second `second` (an integer, Unix seconds); older than the span: ignored. */
  add (second, n = 1) {
    this._advance(second)
    if (second <= this.last - this.span) return
    this.counts[second % this.span] += n
  }

  /** The counts of the `count` seconds that end at `now` (oldest first). */
  window (now, count) {
    this._advance(now)
    const out = new Array(count).fill(0)
    for (let i = 0; i < count; i++) {
      const second = now - count + 1 + i
      if (second > this.last - this.span) out[i] = this.counts[second % this.span]
    }
    return out
  }

  _advance (second) {
    if (this.last === null) { this.last = second; return }
    if (second <= this.last) return
    // Clear the slots of the seconds skipped since the last write (at most a whole span).
    for (let s = Math.max(this.last + 1, second - this.span + 1); s <= second; s++) this.counts[s % this.span] = 0
    this.last = second
  }
}

/** The rings of every queue, and their drawing. */
export class Charts {
  constructor () {
    this.queues = new Map() // queue name -> {added: Ring, completed: Ring, failed: Ring}
  }

  _rings (queue) {
    let rings = this.queues.get(queue)
    if (!rings) {
      rings = Object.fromEntries(SERIES.map((name) => [name, new Ring()]))
      this.queues.set(queue, rings)
    }
    return rings
  }

  /** One event of `series` on `queue`, at `at` (ms, default now). */
  count (queue, series, at = Date.now()) {
    this._rings(queue)[series].add(Math.floor(at / 1000))
  }

  /** Per-second `values` of `series` on `queue`, the first at `start` (ms). */
  seed (queue, series, start, values) {
    const ring = this._rings(queue)[series]
    const first = Math.floor(start / 1000)
    values.forEach((value, i) => { if (value) ring.add(first + i, value) })
  }

  /** Draw `queue`'s charts into `container` (replacing what it held), up to `now` (ms). */
  render (container, queue, now = Date.now()) {
    const rings = this._rings(queue)
    const second = Math.floor(now / 1000)
    container.replaceChildren(...SERIES.map((name) => chart(name, rings[name].window(second, SHOWN))))
  }
}

function chart (name, values) {
  const figure = document.createElement('figure')
  figure.className = `chart ${name}`
  figure.dataset.series = name
  const peak = Math.max(1, ...values)
  const recent = values.slice(-10).reduce((a, b) => a + b, 0) / 10
  const total = values.reduce((a, b) => a + b, 0)
  const caption = document.createElement('figcaption')
  const title = document.createElement('span')
  title.textContent = `${name}/s`
  const rate = document.createElement('span')
  rate.className = 'rate'
  rate.dataset.total = String(total)
  rate.textContent = `${formatRate(recent)} now · ${total} in 10 min`
  caption.append(title, rate)
  const svg = element('svg', { viewBox: `0 0 ${WIDTH} ${HEIGHT}`, preserveAspectRatio: 'none', role: 'img' })
  svg.setAttribute('aria-label', `${name} per second, last 10 minutes, peak ${peak}`)
  const step = WIDTH / (values.length - 1)
  const y = (v) => (HEIGHT - 2 - (v / peak) * (HEIGHT - 4)).toFixed(1)
  const line = values.map((v, i) => `${(i * step).toFixed(1)},${y(v)}`).join(' ')
  svg.append(
    element('polygon', { points: `0,${HEIGHT} ${line} ${WIDTH},${HEIGHT}`, class: 'area' }),
    element('polyline', { points: line, class: 'line' }),
  )
  const scale = document.createElement('span')
  scale.className = 'scale'
  scale.textContent = `peak ${peak}/s`
  figure.append(caption, svg, scale)
  return figure
}

function element (tag, attributes) {
  const node = document.createElementNS(SVG, tag)
  for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, value)
  return node
}

function formatRate (value) {
  return value >= 10 ? String(Math.round(value)) : value.toFixed(1)
}
