/**
 * The renderer builds (Vite + Svelte 5) without compiler or accessibility warnings, its TypeScript
 * type-checks under the DOM tsconfig (strict, noUncheckedIndexedAccess), and the built page loads
 * only its own script (the CSP forbids inline script). Runs without a browser.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { ROOT } from './e2e/harness.ts';

test('the renderer type-checks under its own DOM tsconfig', () => {
  const r = spawnSync(process.execPath, [path.join(ROOT, 'node_modules', 'typescript', 'bin', 'tsc'), '-p', path.join(ROOT, 'renderer', 'tsconfig.json')], { encoding: 'utf-8' });
  assert.equal(r.status, 0, r.stdout + r.stderr);
});

test('the renderer builds without Svelte warnings, into one script and one stylesheet, no inline script', async () => {
  const { build, createLogger } = await import('vite');
  const warnings: string[] = [];
  const logger = createLogger('warn', { allowClearScreen: false });
  logger.warn = (msg) => warnings.push(msg);
  logger.warnOnce = (msg) => warnings.push(msg);
  const out = fs.mkdtempSync(path.join(os.tmpdir(), 'chorus-renderer-build-'));
  await build({ configFile: path.join(ROOT, 'vite.config.ts'), customLogger: logger, logLevel: 'warn', build: { outDir: out, emptyOutDir: true } });
  assert.deepEqual(warnings.filter((w) => !/no Svelte config found/.test(w)), []);
  const html = fs.readFileSync(path.join(out, 'index.html'), 'utf-8');
  const scripts = [...html.matchAll(/<script\b([^>]*)>([^<]*)<\/script>/g)];
  assert.equal(scripts.length, 1);
  assert.match(scripts[0]![1]!, /type="module".*src="\.\/assets\/index-[\w-]+\.js"/);
  assert.equal(scripts[0]![2]!.trim(), '', 'no inline script');
  assert.match(html, /http-equiv="Content-Security-Policy" content="default-src 'self'; script-src 'self';/);
  assert.equal(fs.readdirSync(path.join(out, 'assets')).filter((f) => f.endsWith('.js')).length, 1);
});
