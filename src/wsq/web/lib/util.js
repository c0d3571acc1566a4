// Small helpers shared by the modules of wsq.js: errors, callbacks, argument checks, bytes.

/** Every error from the server or the connection; `code` is the wire code (docs/protocol.md §7). */
export class WsqError extends Error {
  constructor (message, code = 'error') {
    super(message)
    this.name = 'WsqError'
    this.code = code
  }
}

/** The error of every call and stream cut by a lost connection (the seed's message). */
export function lostConnection () {
  return new WsqError('Lost connection.', 'connection_lost')
}

/** The seed's backoff: milliseconds before reconnect attempt `tries`. */
export function defaultBackoff (tries) {
  return Math.min((tries * 10) ** 2, 60 * 1000)
}

/**
 * The seed's calling convention: with a callback, call it with (error, result) and return
 * nothing; without one, return the promise. The callback runs in its own microtask, so an
 * exception it throws is an uncaught exception (as in Node's callbacks), not a rejection.
 */
export function settle (promise, callback) {
  if (callback === undefined) return promise
  promise.then(
    (result) => queueMicrotask(() => callback(null, result)),
    (error) => queueMicrotask(() => callback(error)),
  )
  return undefined
}

/** `(options?, callback?)` as the seed takes them; a wrong kind of argument is a TypeError. */
export function optionsAndCallback (what, options, callback, allowed) {
  if (typeof options === 'function' && callback === undefined) return [{}, options]
  checkCallback(what, callback)
  if (options == null) return [{}, callback]
  if (typeof options !== 'object' || Array.isArray(options)) {
    throw new TypeError(`${what}: options must be an object, not ${describe(options)}.`)
  }
  for (const key of Object.keys(options)) {
    if (!allowed.includes(key)) throw new TypeError(`${what}: unknown option '${key}' (known: ${allowed.join(', ')}).`)
  }
  return [options, callback]
}

export function checkCallback (what, callback) {
  if (callback !== undefined && typeof callback !== 'function') {
    throw new TypeError(`${what}: the callback must be a function, not ${describe(callback)}.`)
  }
}

export function checkType (what, value, type) {
  if (typeof value !== type) throw new TypeError(`${what} must be a ${type}, not ${describe(value)}.`)
}

export function describe (value) {
  if (value === null) return 'null'
  if (Array.isArray(value)) return 'an array'
  return typeof value === 'object' ? `an object (${value.constructor?.name || 'Object'})` : `${typeof value} ${String(value).slice(0, 40)}`
}

export function randomHex (bytes) {
  const values = new Uint8Array(bytes)
  globalThis.crypto.getRandomValues(values)
  return Array.from(values, (b) => b.toString(16).padStart(2, '0')).join('')
}

export function base64 (bytes) {
  let text = ''
  for (let i = 0; i < bytes.length; i += 0x8000) text += String.fromCharCode(...bytes.subarray(i, i + 0x8000))
  return btoa(text)
}

export function unbase64 (text) {
  const raw = atob(text)
  const bytes = new Uint8Array(raw.length)
  for (let i = 0; i < raw.length; i++) bytes[i] = raw.charCodeAt(i)
  return bytes
}

export function sleep (ms) { return new Promise((resolve) => setTimeout(resolve, ms)) }

/** The text a failed handler or upload sends as its error. */
export function errorText (error, limit) {
  return String((error && error.message) || error).slice(0, limit)
}
