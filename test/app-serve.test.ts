/**
 * `chorus serve` security and transport: the printed line, the per-launch token on every request
 * and WebSocket (missing or wrong → 401), loopback-only Host and Origin (DNS rebinding, cross-site
 * pages → 403), JSON-only API calls, no path escapes, a CSP on the page, loopback-only binding.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as http from 'node:http';
import * as os from 'node:os';
import * as path from 'node:path';
import { WebSocket } from 'ws';
import { runningLine, startServer, type RunningServer } from '../cli/commands/serve.ts';
import { EngineHost } from '../pipelines/index.ts';
import { ROOT, RUNNING_LINE, startServe } from './e2e/harness.ts';

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'chorus-serve-'));
const renderer = path.join(tmp, 'renderer');
let server: RunningServer;
let host: EngineHost;

interface Reply {
  status: number;
  headers: http.IncomingHttpHeaders;
  body: string;
}

function request(options: { method?: string; path: string; headers?: Record<string, string>; body?: string }): Promise<Reply> {
  return new Promise((resolve, reject) => {
    const req = http.request({ host: '127.0.0.1', port: server.port, method: options.method ?? 'GET', path: options.path, headers: options.headers ?? {} }, (res) => {
      let body = '';
      res.on('data', (c: Buffer) => (body += c.toString()));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, headers: res.headers, body }));
    });
    req.on('error', reject);
    req.end(options.body);
  });
}

const origin = () => `http://127.0.0.1:${server.port}`;
const api = (op: string, headers: Record<string, string>, body = '{}') => request({ method: 'POST', path: `/api/${op}`, headers: { 'Content-Type': 'application/json', ...headers }, body });

function wsStatus(headers: Record<string, string>, query = ''): Promise<number> {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(`ws://127.0.0.1:${server.port}/api/events${query}`, { headers });
    ws.on('open', () => {
      ws.close();
      resolve(101);
    });
    ws.on('unexpected-response', (_req, res) => resolve(res.statusCode ?? 0));
    ws.on('error', (e) => (e.message.includes('Unexpected server response') ? undefined : reject(e)));
  });
}

before(async () => {
  fs.mkdirSync(path.join(renderer, 'assets'), { recursive: true });
  fs.writeFileSync(path.join(renderer, 'index.html'), '<!doctype html><title>Chorus</title><script type="module" src="./assets/app.js"></script>');
  fs.writeFileSync(path.join(renderer, 'assets', 'app.js'), 'console.log(1)');
  host = new EngineHost({ settingsFile: null, settings: { outputDir: path.join(tmp, 'out') } });
  server = await startServer({ host, rendererDir: renderer, port: 0 });
});

after(async () => {
  await server.close();
  await host.dispose();
});

test('the printed line has the exact form, with a long random token', () => {
  assert.match(runningLine(server.url), RUNNING_LINE);
  assert.ok(server.token.length >= 32, server.token);
  assert.equal(server.url, `http://127.0.0.1:${server.port}/?token=${server.token}`);
});

test('requests without the token are refused', async () => {
  assert.equal((await request({ path: '/' })).status, 401);
  assert.equal((await request({ path: '/assets/app.js' })).status, 401);
  const r = await api('app.info', {});
  assert.equal(r.status, 401);
  assert.equal(JSON.parse(r.body).error.code, 'UNAUTHORIZED');
  assert.equal(await wsStatus({ Origin: origin() }), 401);
});

test('a wrong token is refused wherever it is given', async () => {
  const wrong = `${server.token.slice(0, -1)}${server.token.endsWith('A') ? 'B' : 'A'}`;
  assert.equal((await request({ path: `/?token=${wrong}` })).status, 401);
  assert.equal((await request({ path: '/', headers: { Cookie: `chorus_token=${wrong}` } })).status, 401);
  assert.equal((await api('app.info', { 'X-Chorus-Token': wrong })).status, 401);
  assert.equal((await api('app.info', { 'X-Chorus-Token': '' })).status, 401);
  assert.equal(await wsStatus({ Origin: origin(), Cookie: `chorus_token=${wrong}` }), 401);
  // A new launch's ?token= wins over an old launch's cookie.
  assert.equal((await request({ path: `/?token=${server.token}`, headers: { Cookie: `chorus_token=${wrong}` } })).status, 303);
});

test('the token in the URL becomes an HttpOnly SameSite cookie and leaves the address bar', async () => {
  const r = await request({ path: `/?token=${server.token}` });
  assert.equal(r.status, 303);
  assert.equal(r.headers.location, '/');
  assert.match(String(r.headers['set-cookie']), new RegExp(`^chorus_token=${server.token}; HttpOnly; SameSite=Strict; Path=/$`));
  const page = await request({ path: '/', headers: { Cookie: `chorus_token=${server.token}` } });
  assert.equal(page.status, 200);
  assert.match(page.body, /<title>Chorus<\/title>/);
  assert.match(String(page.headers['content-security-policy']), /default-src 'self'; script-src 'self'/);
  assert.equal(page.headers['x-frame-options'], 'DENY');
  assert.equal(page.headers['referrer-policy'], 'no-referrer');
  const info = await api('app.info', { 'X-Chorus-Token': server.token, Origin: origin() });
  assert.equal(info.status, 200);
  assert.ok(JSON.parse(info.body).result.strategies.length > 0);
  assert.equal(await wsStatus({ Origin: origin(), Cookie: `chorus_token=${server.token}` }), 101);
});

test('non-loopback Origins and Hosts are refused even with the token (cross-site pages, DNS rebinding)', async () => {
  const t = { 'X-Chorus-Token': server.token };
  for (const bad of ['http://evil.example', `http://evil.example:${server.port}`, `http://127.0.0.1:${server.port + 1}`, `https://127.0.0.1:${server.port}`, 'null']) {
    assert.equal((await api('app.info', { ...t, Origin: bad })).status, 403, bad);
    assert.equal(await wsStatus({ Origin: bad, Cookie: `chorus_token=${server.token}` }), 403, bad);
  }
  for (const badHost of [`evil.example:${server.port}`, `127.0.0.1:${server.port + 1}`, '127.0.0.1', `192.168.1.5:${server.port}`]) {
    assert.equal((await api('app.info', { ...t, Host: badHost })).status, 403, badHost);
    assert.equal((await request({ path: '/', headers: { Host: badHost, Cookie: `chorus_token=${server.token}` } })).status, 403, badHost);
  }
  assert.equal((await api('app.info', { ...t, 'Sec-Fetch-Site': 'cross-site' })).status, 403);
  // A WebSocket must say where it comes from.
  assert.equal(await wsStatus({ Cookie: `chorus_token=${server.token}` }), 403);
  // localhost is the same machine.
  assert.equal((await api('app.info', { ...t, Host: `localhost:${server.port}`, Origin: `http://localhost:${server.port}` })).status, 200);
});

test('API calls are JSON POSTs; bad bodies get typed errors; files never leave the UI folder', async () => {
  const t = { 'X-Chorus-Token': server.token };
  const plain = await request({ method: 'POST', path: '/api/app.info', headers: { ...t, 'Content-Type': 'text/plain' }, body: '{}' });
  assert.equal(plain.status, 415);
  assert.equal((await request({ path: '/api/app.info', headers: t })).status, 405);
  const broken = await api('app.info', t, '{"x":');
  assert.equal(broken.status, 400);
  assert.equal(JSON.parse(broken.body).error.code, 'BAD_PAYLOAD');
  const bad = JSON.parse((await api('jobs.generate', t, '{"job":{"prompt":3}}')).body);
  assert.deepEqual([bad.ok, bad.error.code, bad.error.details.field], [false, 'BAD_PAYLOAD', 'job.prompt']);
  for (const p of ['/..%2f..%2fpackage.json', '/%2e%2e/%2e%2e/package.json', '/assets/..%2f..%2f..%2fpackage.json']) {
    const r = await request({ path: p, headers: { Cookie: `chorus_token=${server.token}` } });
    assert.equal(r.status, 404, p);
    assert.doesNotMatch(r.body, /"name": "chorus"/);
  }
});

test('chorus serve prints exactly its one line and keeps running; a public --host is refused', async () => {
  const config = path.join(tmp, 'config');
  const p = await startServe(['--renderer', renderer, '--out', path.join(tmp, 'out2')], { CHORUS_CONFIG_DIR: config });
  try {
    assert.match(p.line, RUNNING_LINE);
    let more = '';
    p.child.stdout.on('data', (d: Buffer) => (more += d.toString()));
    await new Promise((r) => setTimeout(r, 300));
    assert.equal(p.child.exitCode, null, 'still running');
    assert.equal(more, '', 'nothing else on stdout');
  } finally {
    await p.stop();
  }
  const r = spawnSync(process.execPath, [path.join(ROOT, 'cli', 'bin', 'chorus.mjs'), 'serve', '--host', '0.0.0.0', '--renderer', renderer], { encoding: 'utf-8', env: { ...process.env, CHORUS_CONFIG_DIR: config } });
  assert.equal(r.status, 2);
  assert.match(r.stderr, /--host must be a loopback address/);
  assert.equal(r.stdout, '');
});
