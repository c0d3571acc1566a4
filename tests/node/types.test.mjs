// wsq.d.ts against a sample use (tsc --strict accepts it) and against misuses (each is an
// error), with the TypeScript that src/wsq/web/package.json pins for development.

import assert from 'node:assert/strict'
import { spawnSync } from 'node:child_process'
import { fileURLToPath } from 'node:url'
import { test } from 'node:test'

const TSC = fileURLToPath(new URL('../../src/wsq/web/node_modules/typescript/bin/tsc', import.meta.url))
const FLAGS = ['--strict', '--noEmit', '--target', 'es2022', '--module', 'nodenext', '--moduleResolution', 'nodenext', '--lib', 'es2022,dom']

function tsc (name) {
  const file = fileURLToPath(new URL(`./types/${name}`, import.meta.url))
  return spawnSync(process.execPath, [TSC, ...FLAGS, file], { encoding: 'utf8' })
}

test('the sample use type-checks under --strict', () => {
  const run = tsc('sample.ts')
  assert.equal(run.status, 0, run.stdout + run.stderr)
})

test('each misuse is a type error', () => {
  const run = tsc('misuse.ts')
  const lines = [...run.stdout.matchAll(/misuse\.ts\((\d+),\d+\): error/g)].map((m) => Number(m[1]))
  assert.deepEqual([...new Set(lines)], [4, 5, 6, 7, 8], run.stdout)
})
