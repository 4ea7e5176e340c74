/**
 * The Electron side without the Electron binary (it cannot be downloaded here): window options and
 * navigation rules asserted from the code that main applies, the window-state file, the engine
 * host's entry serving the API over a MessagePort in plain Node (events included), the preload
 * bundle (one file whose only import is `electron`, one function per operation, subscriptions that
 * unsubscribe), and the main bundle that never loads inference code.
 */
import { after, test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import * as vm from 'node:vm';
import { MessageChannel, type MessagePort } from 'node:worker_threads';
import { OPERATIONS, type ApiEvent } from '../pipelines/index.ts';
import { buildElectron } from '../electron/build.ts';
import { startEngineHost } from '../electron/engine-host.ts';
import { PortClient, type PortLike } from '../electron/port-protocol.ts';
import { APP_ENTRY, CONTENT_SECURITY_POLICY, isAllowedNavigation, isTrustedSender, mainWindowOptions, windowOpenDecision } from '../electron/window-options.ts';
import { loadWindowState, saveWindowState } from '../electron/window-state.ts';
import { findElectron } from '../electron/launch.ts';
import { FIXTURES } from './fixtures.ts';
import { ROOT, RUNNING_LINE, startServe } from './e2e/harness.ts';

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'chorus-electron-'));
const ports: MessagePort[] = [];
after(() => ports.forEach((p) => p.close()));

test('window: context isolation, sandbox, no Node, no webview, web security on, the preload given', () => {
  const o = mainWindowOptions('/app/preload.cjs');
  const w = o.webPreferences;
  assert.equal(w.contextIsolation, true);
  assert.equal(w.sandbox, true);
  assert.equal(w.nodeIntegration, false);
  assert.equal(w.nodeIntegrationInWorker, false);
  assert.equal(w.nodeIntegrationInSubFrames, false);
  assert.equal(w.webviewTag, false);
  assert.equal(w.webSecurity, true);
  assert.equal(w.allowRunningInsecureContent, false);
  assert.equal(w.experimentalFeatures, false);
  assert.equal(w.navigateOnDragDrop, false, 'a dropped PNG must not replace the app');
  assert.equal(w.preload, '/app/preload.cjs');
  assert.deepEqual([o.width, o.height], [1280, 800]);
  // main.ts and window-manager.ts build the window from exactly these options.
  assert.match(fs.readFileSync(path.join(ROOT, 'electron', 'window-manager.ts'), 'utf-8'), /new BrowserWindow\(mainWindowOptions\(/);
  assert.doesNotMatch(fs.readFileSync(path.join(ROOT, 'electron', 'window-manager.ts'), 'utf-8'), /webPreferences/);
});

test('navigation: only the app origin; window.open is always denied, allowlisted https links go to the browser', () => {
  assert.equal(isAllowedNavigation(APP_ENTRY), true);
  assert.equal(isAllowedNavigation('app://chorus/index.html#gallery'), true);
  for (const url of ['https://evil.example/', 'file:///etc/passwd', 'app://other/index.html', 'http://127.0.0.1:5173/', 'javascript:alert(1)', 'not a url']) assert.equal(isAllowedNavigation(url), false, url);
  assert.deepEqual(windowOpenDecision('https://civitai.com/models/1'), { action: 'deny', openExternally: true });
  assert.deepEqual(windowOpenDecision('http://civitai.com/models/1'), { action: 'deny', openExternally: false });
  assert.deepEqual(windowOpenDecision('https://civitai.com.evil.example/'), { action: 'deny', openExternally: false });
  assert.deepEqual(windowOpenDecision('app://chorus/index.html'), { action: 'deny', openExternally: false });
  assert.equal(isTrustedSender('app://chorus/index.html'), true);
  assert.equal(isTrustedSender('https://evil.example/'), false);
  assert.equal(isTrustedSender(undefined), false);
  assert.match(CONTENT_SECURITY_POLICY, /script-src 'self'(;|$)/);
  assert.doesNotMatch(CONTENT_SECURITY_POLICY, /unsafe-eval|script-src[^;]*unsafe-inline/);
});

test('window state is remembered, and a window saved on a display that is gone comes back visible', () => {
  const file = path.join(tmp, 'state', 'window-state.json');
  const displays = [{ x: 0, y: 0, width: 1920, height: 1080 }];
  assert.deepEqual(loadWindowState(file, displays), { bounds: { width: 1280, height: 800 }, maximized: false });
  saveWindowState(file, { bounds: { x: 100, y: 50, width: 1400, height: 900 }, maximized: true });
  assert.deepEqual(loadWindowState(file, displays), { bounds: { x: 100, y: 50, width: 1400, height: 900 }, maximized: true });
  saveWindowState(file, { bounds: { x: 3000, y: 50, width: 1400, height: 900 }, maximized: false });
  assert.deepEqual(loadWindowState(file, displays), { bounds: { width: 1400, height: 900 }, maximized: false }, 'off-screen: centred');
  saveWindowState(file, { bounds: { x: 10, y: 10, width: 200, height: 100 }, maximized: false });
  assert.deepEqual(loadWindowState(file, displays).bounds, { x: 10, y: 10, width: 1024, height: 680 }, 'never below the minimum');
  fs.writeFileSync(file, '{broken');
  assert.deepEqual(loadWindowState(file, displays).bounds, { width: 1280, height: 800 });
});

function portLike(port: MessagePort): PortLike {
  ports.push(port);
  return { onMessage: (l) => port.on('message', l), postMessage: (d) => port.postMessage(d) };
}

test('the engine host entry serves the API over a MessagePort in plain Node, events included', { timeout: 120_000 }, async () => {
  const { port1, port2 } = new MessageChannel();
  const host = await startEngineHost(portLike(port1), { kind: 'init', settingsFile: path.join(tmp, 'engine', 'settings.json'), cacheDir: path.join(tmp, 'cache') });
  const client = new PortClient(portLike(port2));
  const events: ApiEvent[] = [];
  client.onEvent((e) => events.push(e));
  try {
    const info = await client.call('app.info', {});
    assert.ok(info.ok && (info.result as { strategies: unknown[] }).strategies.length > 0);
    const bad = await client.call('jobs.generate', { job: { prompt: 'a', steps: 'many' } });
    assert.deepEqual(bad.ok ? null : [bad.error.code, bad.error.details.field], ['BAD_PAYLOAD', 'job.steps']);
    const unknown = await client.call('shell.exec', { cmd: 'rm -rf /' });
    assert.equal(unknown.ok ? null : unknown.error.code, 'UNKNOWN_OPERATION');
    await client.call('settings.set', { outputDir: path.join(tmp, 'out'), device: 'cpu', loraDirs: [] });
    const opened = await client.call('models.open', { path: path.join(FIXTURES, 'tiny-sd15') });
    assert.ok(opened.ok, JSON.stringify(opened));
    const started = await client.call('jobs.generate', { job: { prompt: 'a cat', steps: 2, width: 64, height: 64, seed: 7 } });
    assert.ok(started.ok, JSON.stringify(started));
    const id = (started.result as { id: string }).id;
    const deadline = Date.now() + 100_000;
    while (!events.some((e) => e.type === 'job.status' && e.id === id && ['done', 'failed'].includes(e.job.status)) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
    const final = events.filter((e) => e.type === 'job.status' && e.id === id).at(-1);
    assert.equal(final?.type === 'job.status' ? final.job.status : undefined, 'done', JSON.stringify(final));
    const progress = events.filter((e): e is Extract<ApiEvent, { type: 'job.progress' }> => e.type === 'job.progress' && e.id === id);
    assert.deepEqual(progress.map((p) => p.step).sort(), [1, 2]);
    assert.ok(progress.some((p) => p.fraction === 1 && p.preview?.startsWith('data:image/png;base64,')), 'the last step carries a preview');
    const image = events.find((e) => e.type === 'job.image' && e.id === id);
    assert.ok(image?.type === 'job.image' && /^\d{5}-7\.png$/.test(image.item.file));
    assert.ok(fs.existsSync(path.join(tmp, 'out', image.item.file)));
  } finally {
    await host.dispose();
  }
});

test('the preload bundles to one CommonJS file importing only electron, one function per operation', async () => {
  const out = path.join(tmp, 'bundle');
  await buildElectron(['preload', 'main'], out);
  const preload = fs.readFileSync(path.join(out, 'preload.cjs'), 'utf-8');
  assert.deepEqual([...new Set(preload.match(/require\(["'][^"']+["']\)/g))], ['require("electron")']);
  assert.doesNotMatch(preload, /\bimport\s*\(|\bimport\s+[\w{*]/);

  // Run it against a stand-in `electron` and see what it exposes.
  const exposed: Record<string, unknown> = {};
  const invoked: Array<[string, unknown]> = [];
  const listeners = new Map<string, Set<(...a: unknown[]) => void>>();
  const fakeElectron = {
    contextBridge: { exposeInMainWorld: (key: string, api: unknown) => (exposed[key] = api) },
    ipcRenderer: {
      invoke: (channel: string, payload: unknown) => {
        invoked.push([channel, payload]);
        return Promise.resolve({ ok: true, result: channel });
      },
      on: (ch: string, l: (...a: unknown[]) => void) => listeners.set(ch, (listeners.get(ch) ?? new Set()).add(l)),
      removeListener: (ch: string, l: (...a: unknown[]) => void) => listeners.get(ch)?.delete(l),
    },
  };
  const module = { exports: {} };
  vm.runInNewContext(preload, { require: (id: string) => (id === 'electron' ? fakeElectron : assert.fail(`preload required ${id}`)), module, exports: module.exports });
  const bridge = exposed.chorus as Record<string, unknown>;
  assert.deepEqual(Object.keys(bridge).sort(), [...OPERATIONS, 'onEvent'].sort());
  assert.ok(!('invoke' in bridge) && !('send' in bridge), 'no generic channel access');
  const call = bridge['models.open'] as (p: unknown) => Promise<unknown>;
  assert.deepEqual(await call({ path: '/m' }), { ok: true, result: 'chorus:models.open' });
  assert.deepEqual(invoked, [['chorus:models.open', { path: '/m' }]]);
  const seen: unknown[] = [];
  const unsubscribe = (bridge.onEvent as (l: (e: unknown) => void) => () => void)((e) => seen.push(e));
  for (const l of listeners.get('chorus:event') ?? []) l({}, { type: 'job.status' });
  unsubscribe();
  assert.equal(listeners.get('chorus:event')?.size, 0, 'unsubscribed');
  assert.deepEqual(seen, [{ type: 'job.status' }]);

  // Main only wires: it never loads inference, image or model code.
  const main = fs.readFileSync(path.join(out, 'main.js'), 'utf-8');
  const imports = [...main.matchAll(/^import .* from ["']([^"']+)["']/gm)].map((m) => m[1]!);
  assert.ok(imports.includes('electron'));
  for (const spec of imports) assert.ok(spec === 'electron' || spec.startsWith('node:'), `main imports ${spec}`);
  assert.doesNotMatch(main, /onnxruntime|sharp|safetensors/i);
});

const ELECTRON_INSTALLED = 'binary' in findElectron();

test('npm start without the Electron binary says so and starts serve mode instead', { skip: ELECTRON_INSTALLED ? 'the Electron binary is installed here: npm start opens the desktop app' : undefined }, async () => {
  const renderer = path.join(tmp, 'renderer');
  fs.mkdirSync(renderer, { recursive: true });
  fs.writeFileSync(path.join(renderer, 'index.html'), '<!doctype html><title>Chorus</title>');
  const p = await startServe(['--renderer', renderer, '--out', path.join(tmp, 'start-out')], { CHORUS_CONFIG_DIR: path.join(tmp, 'start-config') }, ['--import', 'tsx', path.join(ROOT, 'electron', 'launch.ts')]);
  try {
    assert.match(p.line, RUNNING_LINE);
    assert.match(p.stderr(), /no desktop window here: the electron package is not installed .*Starting the app in your browser instead/);
  } finally {
    await p.stop();
  }
});

test('electron/ only wires: electron, Node builtins, its own files and the API contract (the engine host: the pipelines surface)', () => {
  const dir = path.join(ROOT, 'electron');
  const found: string[] = [];
  for (const file of fs.readdirSync(dir).filter((f) => f.endsWith('.ts'))) {
    const text = fs.readFileSync(path.join(dir, file), 'utf-8');
    for (const m of text.matchAll(/^\s*import\s+(?:type\s+)?[^;'"]*?\sfrom\s+['"]([^'"]+)['"]/gm)) {
      const spec = m[1]!;
      const ok =
        spec === 'electron' ||
        spec.startsWith('node:') ||
        (spec.startsWith('./') && !spec.includes('/..')) ||
        spec === '../pipelines/api/contract.ts' ||
        (file === 'engine-host.ts' && spec === '../pipelines/index.ts') ||
        (file === 'build.ts' && spec === 'vite');
      if (!ok) found.push(`electron/${file} imports ${spec}`);
    }
  }
  assert.deepEqual(found, []);
});

test('the bundled engine host (what the packaged app runs) loads its native modules and creates a real session', { timeout: 120_000 }, async () => {
  // Inside the repository, so the bundle's external imports (onnxruntime-node, sharp) resolve as in the app.
  const out = path.join(ROOT, 'dist', `test-electron-${process.pid}`);
  try {
    await buildElectron(['engine-host'], out);
    const bundle = (await import(path.join(out, 'engine-host.js'))) as typeof import('../electron/engine-host.ts');
    const { port1, port2 } = new MessageChannel();
    const host = await bundle.startEngineHost(portLike(port1), { kind: 'init', settingsFile: path.join(tmp, 'bundle-settings.json'), cacheDir: path.join(tmp, 'cache') });
    const client = new PortClient(portLike(port2));
    const done = new Promise<ApiEvent>((resolve) => client.onEvent((e) => e.type === 'job.status' && ['done', 'failed'].includes(e.job.status) && resolve(e)));
    try {
      await client.call('settings.set', { outputDir: path.join(tmp, 'bundle-out'), device: 'cpu' });
      const opened = await client.call('models.open', { path: path.join(FIXTURES, 'tiny-sd15') });
      assert.ok(opened.ok, JSON.stringify(opened));
      assert.ok((await client.call('jobs.generate', { job: { prompt: 'a cat', steps: 1, width: 64, height: 64, seed: 3 } })).ok);
      const final = await done;
      assert.equal(final.type === 'job.status' ? final.job.status : '', 'done', JSON.stringify(final));
      assert.deepEqual(fs.readdirSync(path.join(tmp, 'bundle-out')).filter((f) => f.endsWith('.png')), ['00000-3.png']);
    } finally {
      await host.dispose();
    }
  } finally {
    fs.rmSync(out, { recursive: true, force: true });
  }
});
