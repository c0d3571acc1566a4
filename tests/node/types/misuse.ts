// Misuses that wsq.d.ts must refuse (tests/node/types.test.mjs expects each to fail).
import { Client } from '../../../src/wsq/web/wsq.js'

const client = new Client('ws://localhost:4242', { backof: () => 1 })
client.queue(5)
client.queue('q').add({}, { timeout: '1s' })
client.queue('q').process('handler')
client.attempts(7)
