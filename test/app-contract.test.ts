/**
 * The app's API contract at the handler level (no transport): every operation rejects malformed
 * payloads with a typed error naming the field; handlers refuse what they must (no model, paths
 * outside the output folder, non-images); settings load from Chorus, A1111 and ComfyUI images; the
 * latent preview's colours follow its published 4×3 map.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { EngineHost, JobQueue, OPERATIONS, normalizeJob, readImageMetadata, type ApiError, type OpName } from '../pipelines/index.ts';
import type { JobSummary } from '../pipelines/api/contract.ts';
import { SD15_LATENT_RGB, latentToRgb } from '../pipelines/api/latent-preview.ts';
import { settingsFromImage } from '../pipelines/api/settings-from-image.ts';
import { FIXTURES, REALWORLD } from './fixtures.ts';

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'chorus-contract-'));
const MODEL = path.join(FIXTURES, 'tiny-sd15');

function newHost(): EngineHost {
  return new EngineHost({ settingsFile: null, settings: { outputDir: path.join(tmp, 'out'), device: 'cpu' }, cacheDir: path.join(tmp, 'cache'), queueFile: path.join(tmp, 'queue', 'queue.sqlite') });
}

async function failure(host: EngineHost, op: string, payload: unknown): Promise<ApiError> {
  const r = await host.handle(op, payload);
  assert.equal(r.ok, false, `${op} ${JSON.stringify(payload)?.slice(0, 200)} should fail`);
  return (r as { ok: false; error: ApiError }).error;
}

/** Malformed payloads per operation, with the field the error must name. */
const MALFORMED: Readonly<Record<OpName, ReadonlyArray<[payload: unknown, field: string]>>> = {
  'app.info': [[{ extra: 1 }, 'extra']],
  'settings.get': [[{ x: true }, 'x']],
  'settings.set': [
    [{ device: 'gpu' }, 'device'],
    [{ loraDirs: 'folder' }, 'loraDirs'],
    [{ loraDirs: ['ok', 3] }, 'loraDirs[1]'],
    [{ outputDir: 3 }, 'outputDir'],
    [{ outputDir: '' }, 'outputDir'],
    [{ lastModel: false }, 'lastModel'],
    [{ memoryBytes: 512 * 2 ** 20 }, 'memoryBytes'],
    [{ memoryBytes: '12 apples' }, 'memoryBytes'],
    [{ memoryBytes: '0.5G' }, 'memoryBytes'],
    [{ memoryBytes: 2 ** 31 + 0.5 }, 'memoryBytes'],
  ],
  'models.scan': [
    [{}, 'dir'],
    [{ dir: '' }, 'dir'],
    [{ dir: ['a'] }, 'dir'],
  ],
  'models.open': [
    [{}, 'path'],
    [{ path: 5 }, 'path'],
    [{ path: 'x', device: 'cpu' }, 'device'],
  ],
  'models.status': [[{ path: 'x' }, 'path']],
  'loras.list': [[{ refresh: 'yes' }, 'refresh']],
  'loras.preview': [[{}, 'path'], [{ path: null }, 'path']],
  'jobs.generate': [
    [{}, 'job'],
    [{ job: 'a cat' }, 'job'],
    [{ job: {} }, 'job.prompt'],
    [{ job: { prompt: 1 } }, 'job.prompt'],
    [{ job: { prompt: 'a', steps: 2.5 } }, 'job.steps'],
    [{ job: { prompt: 'a', steps: 0 } }, 'job.steps'],
    [{ job: { prompt: 'a', width: '512' } }, 'job.width'],
    [{ job: { prompt: 'a', cfgScale: Number.NaN } }, 'job.cfgScale'],
    [{ job: { prompt: 'a', seed: 'abc' } }, 'job.seed'],
    [{ job: { prompt: 'a', seed: 1.5 } }, 'job.seed'],
    [{ job: { prompt: 'a', rng: 'gpu' } }, 'job.rng'],
    [{ job: { prompt: 'a', loras: [{ name: 'x', te: 1 }] } }, 'job.loras[0].unet'],
    [{ job: { prompt: 'a', loras: [{ name: '', te: 1, unet: 1 }] } }, 'job.loras[0].name'],
    [{ job: { prompt: 'a', loras: [{ name: 'x', te: 11, unet: 1 }] } }, 'job.loras[0].te'],
    [{ job: { prompt: 'a', strategy: { name: 'nope' } } }, 'job.strategy.name'],
    [{ job: { prompt: 'a', strategy: { name: 'switch', switchEvery: 0 } } }, 'job.strategy.switchEvery'],
    [{ job: { prompt: 'a', regions: [{ prompt: 'x' }] } }, 'job.regions[0]'],
    [{ job: { prompt: 'a', regions: [{ prompt: 'x', box: [0, 0, 8], maskPng: 'AA==' }] } }, 'job.regions[0].box'],
    [{ job: { prompt: 'a', regions: [{ prompt: 'x', box: [0, 0, -8, 8] }] } }, 'job.regions[0].box[2]'],
    [{ job: { prompt: 'a', regions: [{ prompt: 'x', box: [0, 0, 8, 8], lora: { name: 'l', te: 'a', unet: 1 } }] } }, 'job.regions[0].lora.te'],
    [{ job: { prompt: 'a', negative: 'typo' } }, 'job.negative'],
  ],
  'jobs.cancel': [[{}, 'id'], [{ id: 3 }, 'id']],
  'jobs.list': [[{ all: true }, 'all']],
  'gallery.list': [[{ limit: 0 }, 'limit'], [{ limit: 'ten' }, 'limit']],
  'gallery.image': [[{}, 'file'], [{ file: 7 }, 'file'], [{ file: 'a.png', thumbnail: 1 }, 'thumbnail']],
  'gallery.readMetadata': [[{}, 'png'], [{ png: 42 }, 'png'], [{ png: 'AA==', name: 5 }, 'name']],
  'queue.list': [[{ limit: -1 }, 'limit']],
  'queue.control': [
    [{ ids: [1] }, 'action'],
    [{ action: 'delete', ids: [1] }, 'action'],
    [{ action: 'cancel', ids: [0] }, 'ids[0]'],
    [{ action: 'cancel', ids: '1' }, 'ids'],
  ],
};

test('every operation rejects malformed payloads with BAD_PAYLOAD naming the field', async () => {
  const host = newHost();
  assert.deepEqual(Object.keys(MALFORMED).sort(), [...OPERATIONS].sort(), 'every operation has malformed-payload cases');
  for (const op of OPERATIONS) {
    for (const bad of ['a string', 42, []]) {
      const e = await failure(host, op, bad);
      assert.equal(e.code, 'BAD_PAYLOAD', `${op} with ${JSON.stringify(bad)}`);
      assert.equal(e.details.field, 'payload', `${op}: ${e.message}`);
    }
    for (const [payload, field] of MALFORMED[op]) {
      const e = await failure(host, op, payload);
      assert.equal(e.code, 'BAD_PAYLOAD', `${op} ${JSON.stringify(payload)}: ${e.code} ${e.message}`);
      assert.equal(e.details.field, field, `${op} ${JSON.stringify(payload)}: ${e.message}`);
      assert.ok(e.message.startsWith(`${field}:`), `the message names ${field}: ${e.message}`);
    }
  }
  await host.dispose();
});

test('an unknown operation is a typed error listing the operations', async () => {
  const host = newHost();
  const e = await failure(host, 'models.delete', {});
  assert.equal(e.code, 'UNKNOWN_OPERATION');
  assert.match(e.message, /models\.open/);
  await host.dispose();
});

test('handlers refuse what they must: no model, paths outside the output folder, unknown previews, non-images', async () => {
  const host = newHost();
  let e = await failure(host, 'jobs.generate', { job: { prompt: 'a cat' } });
  assert.equal(e.code, 'NO_MODEL');
  for (const file of ['../secret.png', '/etc/passwd.png', '.hidden.png', 'a.jpg', 'sub/a.png']) {
    e = await failure(host, 'gallery.image', { file });
    assert.equal(e.code, 'BAD_PAYLOAD', file);
    assert.equal(e.details.field, 'file');
  }
  e = await failure(host, 'gallery.image', { file: 'missing.png' });
  assert.equal(e.code, 'NOT_FOUND');
  e = await failure(host, 'loras.preview', { path: '/etc/passwd' });
  assert.equal(e.code, 'NOT_FOUND');
  e = await failure(host, 'gallery.readMetadata', { png: 'not base64!' });
  assert.equal(e.code, 'BAD_PAYLOAD');
  assert.equal(e.details.field, 'png');
  e = await failure(host, 'gallery.readMetadata', { png: Buffer.from('hello, not an image').toString('base64'), name: 'note.png' });
  assert.equal(e.code, 'BAD_IMAGE');
  assert.match(e.message, /note\.png: not a PNG, JPEG or WebP/);
  e = await failure(host, 'models.open', { path: path.join(tmp, 'nothing-here') });
  assert.equal(e.code, 'MODEL_NOT_FOUND');
  e = await failure(host, 'models.scan', { dir: path.join(tmp, 'nothing-here') });
  assert.equal(e.code, 'NOT_FOUND');
  e = await failure(host, 'settings.set', { loraDirs: [path.join(tmp, 'no-such-folder')] });
  assert.equal(e.code, 'NOT_FOUND');
  assert.equal(e.details.field, 'loraDirs[0]');
  e = await failure(host, 'jobs.cancel', { id: 'no-such-job' });
  assert.equal(e.code, 'NOT_FOUND');
  await host.dispose();
});

test('job settings the pipeline rejects come back typed, naming job.<field>', async () => {
  const host = newHost();
  await host.call('models.open', { path: MODEL });
  let e = await failure(host, 'jobs.generate', { job: { prompt: 'a', width: 100 } });
  assert.equal(e.code, 'BAD_SIZE');
  assert.equal(e.details.field, 'job.width');
  e = await failure(host, 'jobs.generate', { job: { prompt: 'a', sampler: 'Nope 3000' } });
  assert.equal(e.code, 'UNKNOWN_SAMPLER');
  e = await failure(host, 'jobs.generate', { job: { prompt: 'a', width: 64, height: 64, regions: [{ prompt: 'x', box: [32, 0, 64, 64] }] } });
  assert.equal(e.code, 'BAD_ARGUMENT');
  assert.equal(e.details.field, 'job.regions[0].box');
  e = await failure(host, 'jobs.generate', { job: { prompt: 'a', width: 64, height: 64, regions: [{ prompt: 'x', maskPng: Buffer.from('GIF89a').toString('base64') }] } });
  assert.equal(e.code, 'BAD_PAYLOAD');
  assert.equal(e.details.field, 'job.regions[0].maskPng');
  assert.deepEqual(await host.call('jobs.list', {}), [], 'rejected jobs are not queued');
  await host.dispose();
});

test('jobs run one at a time; a running job can be cancelled and a pending one never starts', { timeout: 120_000 }, async () => {
  const host = newHost();
  await host.call('models.open', { path: MODEL });
  const statuses = new Map<string, string[]>();
  let firstProgress: () => void = () => undefined;
  const progressed = new Promise<void>((resolve) => (firstProgress = resolve));
  host.subscribe((e) => {
    if (e.type === 'job.status') statuses.set(e.id, [...(statuses.get(e.id) ?? []), e.job.status]);
    if (e.type === 'job.progress') firstProgress();
  });
  const long = await host.call('jobs.generate', { job: { prompt: 'a cat', steps: 200, width: 64, height: 64 } });
  const next = await host.call('jobs.generate', { job: { prompt: 'a dog', steps: 2, width: 64, height: 64 } });
  assert.match(long.seed, /^\d+$/, 'a random seed is drawn and reported');
  await progressed;
  assert.deepEqual(await host.call('jobs.cancel', { id: next.id }), { cancelled: true });
  assert.deepEqual(await host.call('jobs.cancel', { id: long.id }), { cancelled: true });
  const deadline = Date.now() + 60_000;
  while (statuses.get(long.id)?.at(-1) !== 'cancelled' && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
  assert.deepEqual(statuses.get(long.id), ['pending', 'running', 'cancelled']);
  assert.deepEqual(statuses.get(next.id), ['pending', 'cancelled'], 'never ran');
  assert.deepEqual(await host.call('jobs.cancel', { id: long.id }), { cancelled: false }, 'already over');
  const list = await host.call('jobs.list', {});
  assert.deepEqual(list.map((j) => [j.prompt, j.status, j.images.length]), [['a dog', 'cancelled', 0], ['a cat', 'cancelled', 0]]);
  await host.dispose();
});

test('the Queue screen lists the durable batch queue and controls its jobs, without creating it', async () => {
  const host = newHost();
  const queueFile = path.join(tmp, 'queue', 'queue.sqlite');
  assert.deepEqual(await host.call('queue.list', {}), { file: null, paused: false, jobs: [] });
  assert.equal(fs.existsSync(queueFile), false, 'looking does not create a database');
  let e = await failure(host, 'queue.control', { action: 'cancel', ids: [1] });
  assert.equal(e.code, 'NOT_FOUND');
  const q = JobQueue.open({ file: queueFile });
  const job = normalizeJob({ model: MODEL, prompt: 'a queued fox', seed: 5, strategy: { name: 'merge' } });
  const { ids } = q.enqueue([{ entry: { job, priority: 0 }, position: 1, outputs: [{ image: 0, seed: '5', path: path.join(tmp, 'q', '00001-5.png') }] }]);
  q.dispose();
  const view = await host.call('queue.list', {});
  assert.equal(view.file, queueFile);
  assert.deepEqual(view.jobs.map((j) => [j.id, j.state, j.prompt, j.seed, j.strategy, j.outputs]), [[ids[0], 'queued', 'a queued fox', '5', 'merge', [{ path: path.join(tmp, 'q', '00001-5.png'), written: false }]]]);
  assert.deepEqual(await host.call('queue.control', { action: 'cancel', ids: [ids[0]!] }), [{ id: ids[0], outcome: 'cancelled', state: 'cancelled' }]);
  assert.deepEqual(await host.call('queue.control', { action: 'retry', ids: [ids[0]!] }), [{ id: ids[0], outcome: 'queued', state: 'queued' }]);
  e = await failure(host, 'queue.control', { action: 'pause', ids: [ids[0]! + 100] });
  assert.equal(e.code, 'NOT_FOUND');
  assert.equal(e.details.id, ids[0]! + 100);
  await host.dispose();
});

test('models.scan lists what a folder holds and says why a file cannot load', async () => {
  const host = newHost();
  const scan = await host.call('models.scan', { dir: FIXTURES });
  const tiny = scan.candidates.find((c) => c.name === 'tiny-sd15');
  assert.ok(tiny !== undefined && tiny.loadable && tiny.format === 'diffusers');
  const lora = scan.candidates.find((c) => c.name === 'lora_kohya_a.safetensors');
  assert.ok(lora !== undefined && !lora.loadable);
  assert.match(lora.note, /a LoRA, not a checkpoint/);
  const empty = fs.mkdtempSync(path.join(tmp, 'empty-'));
  const none = await host.call('models.scan', { dir: empty });
  assert.deepEqual(none.candidates, []);
  assert.match(none.hint ?? '', /No model found in .*empty-/);
  await host.dispose();
});

test('settings persist in their file, and a damaged file is moved aside, not lost', () => {
  const file = path.join(tmp, 'settings', 'settings.json');
  const a = new EngineHost({ settingsFile: file });
  return a.call('settings.set', { outputDir: path.join(tmp, 'pictures'), device: 'cpu' }).then(async (s) => {
    assert.equal(s.device, 'cpu');
    const b = new EngineHost({ settingsFile: file });
    assert.equal((await b.call('settings.get', {})).outputDir, path.join(tmp, 'pictures'));
    fs.writeFileSync(file, '{ not json');
    const c = new EngineHost({ settingsFile: file });
    assert.equal((await c.call('settings.get', {})).device, 'auto');
    const aside = fs.readdirSync(path.dirname(file)).filter((f) => f.startsWith('settings.json.bad-'));
    assert.equal(aside.length, 1);
    assert.equal(fs.readFileSync(path.join(path.dirname(file), aside[0]!), 'utf-8'), '{ not json');
  });
});

test('the memory setting persists and plans the app\'s jobs; null plans for all of this machine\'s RAM', { timeout: 120_000 }, async () => {
  const file = path.join(tmp, 'settings-memory', 'settings.json');
  const settings = { outputDir: path.join(tmp, 'out-memory'), device: 'cpu' as const };
  const first = new EngineHost({ settingsFile: file, settings, cacheDir: path.join(tmp, 'cache') });
  assert.equal((await first.call('settings.get', {})).memoryBytes, null, 'default: all of the machine');
  assert.equal((await first.call('app.info', {})).machineMemoryBytes, os.totalmem());
  assert.equal((await first.call('settings.set', { memoryBytes: '2.5 GiB' })).memoryBytes, 2.5 * 2 ** 30, 'a size as typed is read into bytes');
  assert.equal((await first.call('settings.set', { memoryBytes: 3 * 2 ** 30 })).memoryBytes, 3 * 2 ** 30);
  await first.dispose();

  const host = new EngineHost({ settingsFile: file, settings, cacheDir: path.join(tmp, 'cache') });
  assert.equal((await host.call('settings.get', {})).memoryBytes, 3 * 2 ** 30, 'read back from the settings file');
  await host.call('models.open', { path: MODEL });
  const done = new Map<string, JobSummary>();
  host.subscribe((e) => {
    if (e.type === 'job.status' && (e.job.status === 'done' || e.job.status === 'failed')) done.set(e.id, e.job);
  });
  const job = { prompt: 'a cat', steps: 2, width: 64, height: 64, seed: '1', sampler: 'DDIM' };
  const settle = async (id: string): Promise<JobSummary> => {
    const deadline = Date.now() + 100_000;
    while (!done.has(id) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
    const summary = done.get(id);
    assert.equal(summary?.status, 'done', JSON.stringify(summary?.error));
    return summary;
  };
  const small = await settle((await host.call('jobs.generate', { job })).id);
  assert.equal(small.plan?.memoryBytes, 3 * 2 ** 30, 'the job was planned for the setting');
  assert.ok((small.plan?.maxBatch ?? 0) >= 2, `a CFG pair per call at least (plan ${JSON.stringify(small.plan)})`);
  assert.equal(small.plan?.gradientBatch, null, 'no gradient calls in a plain job');
  await host.call('settings.set', { memoryBytes: null });
  const all = await settle((await host.call('jobs.generate', { job })).id);
  assert.equal(all.plan?.memoryBytes, os.totalmem(), 'null: all of this machine');
  await host.dispose();
});

test('settings load from A1111 and ComfyUI PNGs, with what could not be carried over', () => {
  const a1111 = settingsFromImage(new Uint8Array(fs.readFileSync(path.join(REALWORLD, 'png', 'a1111_v1.10.1_sd15_lora.png'))), 'a1111.png');
  assert.equal(a1111.source, 'a1111');
  assert.ok(a1111.job !== null);
  assert.match(a1111.job.prompt, /<lora:/);
  assert.equal(typeof a1111.job.steps, 'number');
  assert.match(String(a1111.job.seed), /^\d+$/);
  const comfy = settingsFromImage(new Uint8Array(fs.readFileSync(path.join(REALWORLD, 'png', 'comfyui_lora.png'))), 'comfy.png');
  assert.equal(comfy.source, 'comfyui');
  assert.ok(comfy.job !== null && (comfy.job.loras?.length ?? 0) > 0, JSON.stringify(comfy));
  assert.equal(comfy.job.rng, 'cpu');
  const area = settingsFromImage(new Uint8Array(fs.readFileSync(path.join(REALWORLD, 'png', 'comfyui_area_composition.png'))), 'area.png');
  assert.ok(area.notes.some((n) => /area\/mask conditioning/.test(n)), area.notes.join('; '));
});

test('the latent preview maps each latent channel through the published SD 1.x factors', () => {
  // 1×1 latent, one channel at a time: colour = clamp((factor + 1) / 2) · 255.
  for (let k = 0; k < 4; k++) {
    const latent = new Float32Array(4);
    latent[k] = 1;
    const rgb = latentToRgb(latent, 1, 1);
    const want = SD15_LATENT_RGB[k]!.map((f) => Math.round(Math.min(1, Math.max(0, (f + 1) / 2)) * 255));
    assert.deepEqual([...rgb], want, `channel ${k}`);
  }
  // Zero latents are mid-grey; the second pixel of a 1×2 latent reads its own column of each plane.
  assert.deepEqual([...latentToRgb(new Float32Array(4), 1, 1)], [128, 128, 128]);
  const two = new Float32Array([0, 2, 0, 0, 0, 0, 0, 0]); // (C=4, h=1, w=2): channel 0 of pixel 1 is 2
  const rgb = latentToRgb(two, 1, 2);
  assert.deepEqual([...rgb.subarray(0, 3)], [128, 128, 128]);
  assert.deepEqual([...rgb.subarray(3)], SD15_LATENT_RGB[0]!.map((f) => Math.round(((2 * f + 1) / 2) * 255)));
});

test('the app runs CLoRA and LoRA-Composer jobs: concepts bound to LoRAs reach the image metadata; a missing concept is refused naming the field', { timeout: 180_000 }, async () => {
  const host = new EngineHost({ settingsFile: null, settings: { outputDir: path.join(tmp, 'out-gradient'), device: 'cpu', loraDirs: [path.join(FIXTURES, 'tiny-sd15-lora')] }, cacheDir: path.join(tmp, 'cache'), queueFile: path.join(tmp, 'queue', 'queue.sqlite') });
  await host.call('models.open', { path: MODEL });
  const done = new Map<string, JobSummary>();
  host.subscribe((e) => {
    if (e.type === 'job.status' && (e.job.status === 'done' || e.job.status === 'failed')) done.set(e.id, e.job);
  });
  const base = { steps: 2, width: 64, height: 64, seed: '3', cfgScale: 7, sampler: 'DDIM' };
  const clora = await host.call('jobs.generate', {
    job: { ...base, prompt: 'a sks dog and a sks cat', strategy: { name: 'clora', concepts: [{ words: 'sks dog', lora: { name: 'lora_kohya_a', te: 1, unet: 1 } }, { words: 'sks cat', lora: { name: 'lora_kohya_b_locon', te: 0.8, unet: 0.8 } }], clora: { refineRounds: 1 } } },
  });
  const composer = await host.call('jobs.generate', {
    job: {
      ...base,
      prompt: 'a dog and a cat',
      regions: [
        { box: [0, 0, 32, 64], prompt: 'a sks dog', lora: { name: 'lora_kohya_a', te: 1, unet: 1 } },
        { box: [32, 0, 32, 64], prompt: 'a sks cat', lora: { name: 'lora_kohya_b_locon', te: 1, unet: 1 } },
      ],
      strategy: { name: 'lora-composer', concepts: [{ words: 'sks dog' }, { words: 'sks cat' }] },
    },
  });
  const e = await failure(host, 'jobs.generate', { job: { ...base, prompt: 'a dog', regions: [{ box: [0, 0, 32, 64], prompt: 'a dog' }], strategy: { name: 'lora-composer' } } });
  assert.equal(e.code, 'BAD_ARGUMENT');
  assert.equal(e.details.field, 'job.strategy.concepts');
  const deadline = Date.now() + 170_000;
  while ((!done.has(clora.id) || !done.has(composer.id)) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
  for (const [id, name, words] of [[clora.id, 'clora', ['sks dog', 'sks cat']], [composer.id, 'lora-composer', ['sks dog', 'sks cat']]] as const) {
    const job = done.get(id);
    assert.equal(job?.status, 'done', `${name}: ${JSON.stringify(job?.error)}`);
    assert.equal(job.images.length, 1);
    const meta = readImageMetadata(fs.readFileSync(path.resolve(tmp, 'out-gradient', job.images[0]!)));
    const record = meta.sources.find((s) => s.kind === 'chorus')?.job as { job?: unknown } | undefined;
    const stored = record?.job as { strategy?: { name?: string; concepts?: Array<{ words: string }> } } | undefined;
    assert.equal(stored?.strategy?.name, name);
    assert.deepEqual(stored?.strategy?.concepts?.map((c) => c.words), words);
  }
  await host.dispose();
});
