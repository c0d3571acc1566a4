// The EventEmitter browsers get (Node gets node:events' own, see platform.js): the methods
// people use, with Node's rules. Listeners run in the order added; 'newListener' and
// 'removeListener' are emitted as Node does; an 'error' event nobody listens to is thrown.

export class EventEmitter {
  #events = new Map()

  on (name, listener) { return this.#add(name, listener, false) }
  addListener (name, listener) { return this.#add(name, listener, false) }
  prependListener (name, listener) { return this.#add(name, listener, true) }

  once (name, listener) {
    checkListener(listener)
    const wrapper = (...args) => { this.removeListener(name, wrapper); return listener.apply(this, args) }
    wrapper.listener = listener
    return this.#add(name, wrapper, false)
  }

  off (name, listener) { return this.removeListener(name, listener) }

  removeListener (name, listener) {
    checkListener(listener)
    const list = this.#events.get(name)
    if (!list) return this
    const at = list.findLastIndex((fn) => fn === listener || fn.listener === listener)
    if (at < 0) return this
    const [removed] = list.splice(at, 1)
    if (!list.length) this.#events.delete(name)
    if (this.#events.has('removeListener')) this.emit('removeListener', name, removed.listener || removed)
    return this
  }

  removeAllListeners (name) {
    const names = name === undefined ? [...this.#events.keys()] : [name]
    for (const each of names) {
      for (const fn of [...(this.#events.get(each) || [])].reverse()) this.removeListener(each, fn)
    }
    return this
  }

  emit (name, ...args) {
    const list = this.#events.get(name)
    if (!list) {
      if (name === 'error') throw args[0] instanceof Error ? args[0] : new Error(`Unhandled error: ${args[0]}`)
      return false
    }
    for (const fn of [...list]) fn.apply(this, args)
    return true
  }

  listenerCount (name) { return (this.#events.get(name) || []).length }
  listeners (name) { return (this.#events.get(name) || []).map((fn) => fn.listener || fn) }
  rawListeners (name) { return [...(this.#events.get(name) || [])] }
  eventNames () { return [...this.#events.keys()] }
  setMaxListeners () { return this }
  getMaxListeners () { return Infinity }

  #add (name, listener, prepend) {
    checkListener(listener)
    if (this.#events.has('newListener')) this.emit('newListener', name, listener.listener || listener)
    if (!this.#events.has(name)) this.#events.set(name, [])
    const list = this.#events.get(name)
    if (prepend) list.unshift(listener)
    else list.push(listener)
    return this
  }
}

function checkListener (listener) {
  if (typeof listener !== 'function') throw new TypeError(`The listener must be a function, not ${typeof listener}.`)
}
