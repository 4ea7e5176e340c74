/**
 * The durable queue: schema and migrations, order (priority, then age), leases between processes
 * (a live runner's jobs are never taken; a dead one's are re-queued), cancel / pause / retry, and
 * the runner on the tiny model (failures recorded, cancellation mid-run, interruption, the crash
 * window between renaming a PNG and committing its job). Plus `chorus queue` / `chorus batch`
 * argument and error handling.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import Database from 'better-sqlite3';
import sharp from 'sharp';
import { readImageMetadata } from '../pipelines/images/metadata.ts';
import { normalizeJob, type JobInput } from '../pipelines/job.ts';
import { batchKey } from '../pipelines/jobs/batched.ts';
import { composeBatchGrids, openBatch, planBatch } from '../pipelines/queue/batch-file.ts';
import { QueueError } from '../pipelines/queue/errors.ts';
import { engineModelSource, type ModelSource } from '../pipelines/queue/model-source.ts';
import { planOutputs } from '../pipelines/queue/outputs.ts';
import { runQueue, type RunnerEvent } from '../pipelines/queue/runner.ts';
import { DEFAULT_LEASE_MS, JobQueue, SAME_HOST_GRACE_MS, defaultDataDir, type EnqueueJob, type QueueOwner } from '../pipelines/queue/store.ts';
import { FIXTURES } from './fixtures.ts';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const CHORUS = path.join(ROOT, 'cli', 'bin', 'chorus.mjs');
const MODEL = path.join(FIXTURES, 'tiny-sd15');
const LORA_DIR = path.join(FIXTURES, 'tiny-sd15-lora');
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'chorus-queue-'));
const cacheDir = path.join(tmp, 'cache');
let dbCount = 0;
const newDb = () => path.join(tmp, `q${++dbCount}.sqlite`);

/** A pid that no process has: a child that already exited. */
const deadPid = (): number => spawnSync(process.execPath, ['-e', '']).pid!;

function entry(over: Partial<JobInput> & { priority?: number } = {}) {
  const { priority, ...job } = over;
  return { job: normalizeJob({ model: MODEL, prompt: 'a cat', seed: 1, steps: 2, width: 64, height: 64, ...job }), priority: priority ?? 0 };
}

function enqueueJobs(queue: JobQueue, specs: Array<Partial<JobInput> & { priority?: number }>, outDir = path.join(tmp, `out${dbCount}`)): number[] {
  const jobs: EnqueueJob[] = specs.map((s, i) => {
    const e = entry(s);
    const key = batchKey(e.job);
    return { entry: e, position: i + 1, outputs: planOutputs(e.job, { pattern: '{index}-{seed}.png', outDir, position: i + 1 }), ...(key === undefined ? {} : { batchKey: key }) };
  });
  return queue.enqueue(jobs).ids;
}

describe('the queue database', () => {
  test('a new file gets schema migration 1 in WAL mode; reopening keeps the jobs and applies nothing twice', () => {
    const file = newDb();
    const q = JobQueue.open({ file });
    enqueueJobs(q, [{}]);
    q.dispose();
    const again = JobQueue.open({ file });
    assert.equal(again.list().length, 1);
    again.dispose();
    const db = new Database(file, { readonly: true });
    assert.equal(db.pragma('journal_mode', { simple: true }), 'wal');
    assert.deepEqual((db.prepare('SELECT version FROM schema_migrations').all() as Array<{ version: number }>).map((r) => r.version), [1]);
    db.close();
  });

  test('rejects a database from a newer Chorus and a file that is not a database', () => {
    const file = newDb();
    JobQueue.open({ file }).dispose();
    const db = new Database(file);
    db.prepare('INSERT INTO schema_migrations (version, applied_at) VALUES (7, 0)').run();
    db.close();
    assert.throws(() => JobQueue.open({ file }), (e: unknown) => e instanceof QueueError && e.code === 'QUEUE_DB_NEWER' && e.message.includes(file) && /schema 7; this one knows 1/.test(e.message));
    const junk = path.join(tmp, 'junk.sqlite');
    fs.writeFileSync(junk, 'this is not a database, just text that is long enough to be read as a header...');
    assert.throws(() => JobQueue.open({ file: junk }), (e: unknown) => e instanceof QueueError && e.code === 'QUEUE_DB_UNREADABLE' && e.message.includes(junk));
  });

  test('the data folder is CHORUS_DATA_DIR, else XDG_DATA_HOME/chorus, else ~/.local/share/chorus', { skip: process.platform !== 'linux' ? 'XDG layout is the Linux default' : false }, () => {
    const saved = { data: process.env.CHORUS_DATA_DIR, xdg: process.env.XDG_DATA_HOME };
    try {
      process.env.CHORUS_DATA_DIR = '/srv/chorus-data';
      assert.equal(defaultDataDir(), '/srv/chorus-data');
      delete process.env.CHORUS_DATA_DIR;
      process.env.XDG_DATA_HOME = '/xdg';
      assert.equal(defaultDataDir(), '/xdg/chorus');
      delete process.env.XDG_DATA_HOME;
      assert.equal(defaultDataDir(), path.join(os.homedir(), '.local', 'share', 'chorus'));
    } finally {
      if (saved.data === undefined) delete process.env.CHORUS_DATA_DIR;
      else process.env.CHORUS_DATA_DIR = saved.data;
      if (saved.xdg === undefined) delete process.env.XDG_DATA_HOME;
      else process.env.XDG_DATA_HOME = saved.xdg;
    }
  });
});

describe('order and claims', () => {
  test('higher priority first, then the order they were queued', () => {
    const q = JobQueue.open({ file: newDb() });
    const ids = enqueueJobs(q, [{ priority: 0, strategy: { name: 'composite' } }, { priority: 5, strategy: { name: 'composite' } }, { priority: 0, strategy: { name: 'composite' } }, { priority: 5, strategy: { name: 'composite' } }]);
    const order: number[] = [];
    for (let c = q.claim(); c.length > 0; c = q.claim()) order.push(...c.map((j) => j.id));
    assert.deepEqual(order, [ids[1], ids[3], ids[0], ids[2]]);
    q.dispose();
  });

  test('a claim takes the next job and the queued jobs that share its batch key and priority, up to maxJobs', () => {
    const q = JobQueue.open({ file: newDb() });
    const ids = enqueueJobs(q, [{ prompt: 'a' }, { prompt: 'b', width: 128 }, { prompt: 'c', seed: 5 }, { prompt: 'd', priority: 1, steps: 3 }, { prompt: 'e', cfgScale: 3 }, { prompt: 'f' }]);
    assert.deepEqual(q.claim({ maxJobs: 3 }).map((j) => j.id), [ids[3]]);
    assert.deepEqual(q.claim({ maxJobs: 3 }).map((j) => j.id), [ids[0], ids[2], ids[4]]);
    assert.deepEqual(q.claim({ maxJobs: 3 }).map((j) => j.id), [ids[1]]);
    assert.deepEqual(q.claim({ maxJobs: 3 }).map((j) => j.entry.job.prompt), ['f']);
    assert.deepEqual(q.claim({ maxJobs: 3 }), []);
    q.dispose();
  });

  test('a paused queue gives out nothing until resumed', () => {
    const q = JobQueue.open({ file: newDb() });
    enqueueJobs(q, [{}]);
    q.pauseAll();
    assert.equal(q.paused, true);
    assert.deepEqual(q.claim(), []);
    q.resumeAll();
    assert.equal(q.claim().length, 1);
    q.dispose();
  });
});

describe('leases between processes', () => {
  test("a live runner's job is not taken by a second runner; the second takes the next job", () => {
    const file = newDb();
    const a = JobQueue.open({ file });
    const b = JobQueue.open({ file });
    const ids = enqueueJobs(a, [{}, { prompt: 'two' }]);
    assert.deepEqual(a.claim().map((j) => j.id), [ids[0]]);
    assert.deepEqual(b.recoverStale(), []);
    assert.deepEqual(b.claim().map((j) => j.id), [ids[1]]);
    assert.equal(a.get(ids[0]!).state, 'running');
    assert.equal(a.complete(ids[0]!, [{ image: 0, bytes: 1 }]), true);
    a.dispose();
    b.dispose();
  });

  test("a dead process's job is re-queued at once (pid gone), its pending cancel applied", () => {
    const file = newDb();
    const dead: QueueOwner = { host: os.hostname(), pid: deadPid(), token: 'dead-runner' };
    const gone = JobQueue.open({ file, owner: dead });
    const ids = enqueueJobs(gone, [{}, { prompt: 'two' }]);
    gone.claim();
    gone.claim();
    const live = JobQueue.open({ file });
    live.cancel([ids[1]!]);
    const recovered = live.recoverStale();
    assert.deepEqual(recovered.map((r) => [r.job.id, r.state]), [[ids[0], 'queued'], [ids[1], 'cancelled']]);
    assert.match(live.logs(ids[0]!).at(-1)!.message, new RegExp(`\\(${os.hostname()} pid ${dead.pid}\\) stopped while running it \\(that process no longer exists\\): re-queued`));
    assert.deepEqual(live.claim().map((j) => j.id), [ids[0]]);
    assert.equal(gone.complete(ids[0]!, []), false, 'the dead owner cannot complete a job it lost');
    assert.equal(gone.fail(ids[0]!, { code: 'X', message: 'late' }), false);
    assert.equal(live.get(ids[0]!).state, 'running');
    assert.equal(live.complete(ids[0]!, []), true);
    gone.dispose();
    live.dispose();
  });

  test('an owner on another host keeps its job while it renews the lease, and loses it after', () => {
    const file = newDb();
    let now = 1_000_000;
    const clock = () => now;
    const remote = JobQueue.open({ file, now: clock, leaseMs: 1000, owner: { host: 'render-2', pid: 1, token: 'remote' } });
    const local = JobQueue.open({ file, now: clock, leaseMs: 1000 });
    const [id] = enqueueJobs(remote, [{}]);
    remote.claim();
    now += 900;
    assert.deepEqual(local.recoverStale(), []);
    assert.deepEqual([...remote.heartbeat([id!])], [[id, 'ok']]);
    now += 900;
    assert.deepEqual(local.recoverStale(), [], 'the heartbeat renewed the lease');
    now += 200;
    assert.deepEqual(local.recoverStale().map((r) => r.job.id), [id]);
    assert.match(local.logs(id!).at(-1)!.message, /\(render-2 pid 1\) stopped while running it \(its lease expired\): re-queued/);
    assert.deepEqual([...remote.heartbeat([id!])], [[id, 'lost']]);
    assert.equal(remote.fail(id!, { code: 'X', message: 'late' }), false);
    assert.equal(local.get(id!).state, 'queued');
    remote.dispose();
    local.dispose();
  });

  test('a live process on this host keeps its job past its lease (it may be blocked), until the grace period ends', () => {
    const file = newDb();
    let now = 1_000_000;
    const clock = () => now;
    const busy = JobQueue.open({ file, now: clock, leaseMs: 1000, owner: { host: os.hostname(), pid: process.pid, token: 'busy' } });
    const other = JobQueue.open({ file, now: clock, leaseMs: 1000, owner: { host: os.hostname(), pid: process.pid + 1_000_000, token: 'other' } });
    const [id] = enqueueJobs(busy, [{}]);
    busy.claim();
    now += 1000 + SAME_HOST_GRACE_MS - 1;
    assert.deepEqual(other.recoverStale(), []);
    now += 2;
    assert.deepEqual(other.recoverStale().map((r) => r.job.id), [id]);
    busy.dispose();
    other.dispose();
  });

  test('the default lease is far longer than the heartbeat', () => {
    assert.ok(DEFAULT_LEASE_MS >= 10 * 1000);
  });
});

describe('cancel, pause, resume, retry', () => {
  test('each moves only the states it names, and a running job gets a request', () => {
    const q = JobQueue.open({ file: newDb() });
    const seen: Array<[number, string]> = [];
    q.onRequest((id, r) => seen.push([id, r]));
    const [a, b, c, d] = enqueueJobs(q, [{}, { prompt: 'b' }, { prompt: 'c' }, { prompt: 'd' }]);
    assert.deepEqual(q.cancel([a!]).map((r) => r.outcome), ['cancelled']);
    assert.deepEqual(q.pause([b!]).map((r) => r.outcome), ['paused']);
    assert.deepEqual(q.claim().map((j) => j.id), [c], 'paused and cancelled jobs are skipped');
    assert.deepEqual(q.cancel([c!]), [{ id: c, outcome: 'requested', state: 'running' }]);
    assert.deepEqual(seen, [[c, 'cancel']]);
    assert.deepEqual([...q.heartbeat([c!])], [[c, 'cancel']]);
    assert.equal(q.settle(c!, 'cancel'), true);
    assert.equal(q.get(c!).state, 'cancelled');
    assert.deepEqual(q.resume([b!, a!]).map((r) => r.outcome), ['queued', 'unchanged']);
    assert.deepEqual(q.retry([a!, c!, d!]).map((r) => r.outcome), ['queued', 'queued', 'unchanged']);
    const claimed = q.claim();
    assert.equal(q.fail(claimed[0]!.id, { code: 'BAD_ARGUMENT', message: 'broken' }), true);
    assert.deepEqual(q.get(claimed[0]!.id).error, { code: 'BAD_ARGUMENT', message: 'broken' });
    assert.deepEqual(q.retry([claimed[0]!.id]).map((r) => r.outcome), ['queued']);
    assert.equal(q.get(claimed[0]!.id).error, undefined);
    assert.deepEqual(q.counts(), { queued: 4, running: 0, done: 0, failed: 0, cancelled: 0, paused: 0 });
    assert.deepEqual(q.logs(c!).map((l) => l.message.replace(/ by .*/, '')), ['queued', 'started (attempt 1)', 'cancel requested', 'cancelled while running', 'retry: queued again']);
    q.dispose();
  });

  test('rejects an unknown job id', () => {
    const q = JobQueue.open({ file: newDb() });
    assert.throws(() => q.cancel([42]), (e: unknown) => e instanceof QueueError && e.code === 'JOB_NOT_FOUND' && e.message.includes('no job 42'));
    q.dispose();
  });
});

describe('the runner on the tiny model', () => {
  let source: ModelSource;
  before(() => {
    source = engineModelSource({ engine: { device: 'cpu', cacheDir }, loraDirs: [LORA_DIR] });
  });
  after(async () => source.dispose());

  function writeJobs(name: string, lines: object[]): string {
    const file = path.join(tmp, `${name}.jsonl`);
    fs.writeFileSync(file, lines.map((l) => JSON.stringify({ model: MODEL, steps: 2, width: 64, height: 64, ...l })).join('\n'));
    return file;
  }

  const tempsIn = (dir: string) => fs.readdirSync(dir).filter((f) => f.endsWith('.tmp'));

  test('a bad job fails with its error and the queue moves on; the others are done once, batched, with their PNGs and metadata', async () => {
    const file = writeJobs('mixed', [
      { prompt: 'a cat', seed: 1 },
      { prompt: 'a dog <lora:lora_kohya_a:0.7>', seed: 2 },
      { prompt: 'x <lora:nope:1>', seed: 3 },
      { prompt: 'a fish', seed: 4, strategy: 'composite', loras: [{ name: 'lora_peft' }, { name: 'lora_kohya_a' }] },
      { prompt: 'a bird', seed: 5, loras: [{ name: 'lora_diffusers', te: 0.5 }], priority: -1 },
    ]);
    const q = JobQueue.open({ file: newDb() });
    const plan = planBatch(file, { outDir: path.join(tmp, 'mixed-out') });
    const { batch } = openBatch(q, plan);
    const events: RunnerEvent[] = [];
    const summary = await runQueue({ queue: q, source, batchId: batch.id, onEvent: (e) => events.push(e) });
    assert.deepEqual(summary, { done: 4, failed: 1, stopped: 0, reason: 'empty' });
    const jobs = q.list({ batchId: batch.id });
    assert.deepEqual(jobs.map((j) => j.state), ['done', 'done', 'failed', 'done', 'done']);
    assert.equal(jobs[2]!.error?.code, 'BAD_ARGUMENT');
    assert.match(jobs[2]!.error!.message, /LoRA "nope"/);
    const started = events.filter((e): e is Extract<RunnerEvent, { type: 'started' }> => e.type === 'started').map((e) => e.jobs.map((j) => j.position));
    assert.deepEqual(started, [[1, 2, 3], [4], [5]], 'priority 0 jobs sharing a key in one claim; the composite alone; priority -1 last');
    assert.deepEqual(fs.readdirSync(plan.outDir).sort(), ['00001-1.png', '00002-2.png', '00004-4.png', '00005-5.png']);
    for (const job of jobs.filter((j) => j.state === 'done')) {
      const out = job.outputs[0]!;
      assert.equal(out.written, true);
      const bytes = fs.readFileSync(out.path);
      const { info } = await sharp(bytes).raw().toBuffer({ resolveWithObject: true });
      assert.deepEqual([info.width, info.height], [64, 64]);
      const chorus = readImageMetadata(new Uint8Array(bytes), out.path).sources.find((s) => s.kind === 'chorus');
      assert.ok(chorus !== undefined && chorus.kind === 'chorus');
      const meta = chorus.job as { job: { prompt: string; seed: string } };
      assert.deepEqual([meta.job.prompt, meta.job.seed], [job.entry.job.prompt, String(job.entry.job.seed)]);
      assert.equal(q.logs(job.id).filter((l) => l.message.startsWith('done')).length, 1);
    }
    assert.ok(q.logs(jobs[1]!.id).some((l) => /^LoRA lora_kohya_a \[[0-9a-f]{12}\] te 0\.7 unet 0\.7: 216\/216 modules applied \(bank\)$/.test(l.message)));
    assert.deepEqual(tempsIn(plan.outDir), []);
    q.dispose();
  });

  test('cancel from another process while running: the job stops within a heartbeat and writes nothing; the next job runs', async () => {
    const file = writeJobs('cancel', [{ prompt: 'slow', seed: 1, steps: 200, strategy: 'composite', loras: [{ name: 'lora_peft' }] }, { prompt: 'next', seed: 2 }]);
    const db = newDb();
    const q = JobQueue.open({ file: db });
    const other = JobQueue.open({ file: db });
    const plan = planBatch(file, { outDir: path.join(tmp, 'cancel-out') });
    const { batch } = openBatch(q, plan);
    let progressAfterCancel = 0;
    let cancelled = false;
    const summary = await runQueue({
      queue: q,
      source,
      batchId: batch.id,
      heartbeatMs: 20,
      onEvent: (e) => {
        if (e.type !== 'progress' || e.jobIds[0] !== q.list({ batchId: batch.id })[0]!.id) return;
        if (cancelled) progressAfterCancel++;
        else if (e.evaluation === 2) {
          cancelled = true;
          assert.equal(other.cancel([e.jobIds[0]!])[0]!.outcome, 'requested');
        }
      },
    });
    assert.deepEqual(summary, { done: 1, failed: 0, stopped: 1, reason: 'empty' });
    const [slow, next] = q.list({ batchId: batch.id });
    assert.equal(slow!.state, 'cancelled');
    assert.ok(progressAfterCancel < 190, `stopped early (${progressAfterCancel} evaluations after the request)`);
    assert.equal(fs.existsSync(slow!.outputs[0]!.path), false);
    assert.equal(next!.state, 'done');
    assert.deepEqual(tempsIn(plan.outDir), []);
    other.dispose();
    q.dispose();
  });

  test('cancel from this process stops the job at once, without waiting for a heartbeat', async () => {
    const file = writeJobs('cancel-here', [{ prompt: 'slow', seed: 1, steps: 200, strategy: 'composite', loras: [{ name: 'lora_peft' }] }]);
    const q = JobQueue.open({ file: newDb() });
    const { batch } = openBatch(q, planBatch(file, { outDir: path.join(tmp, 'cancel-here-out') }));
    let after = -1;
    const summary = await runQueue({
      queue: q,
      source,
      batchId: batch.id,
      heartbeatMs: 600_000,
      onEvent: (e) => {
        if (e.type !== 'progress') return;
        if (after >= 0) after++;
        else if (e.evaluation === 2) {
          after = 0;
          q.cancel([e.jobIds[0]!]);
        }
      },
    });
    assert.deepEqual(summary, { done: 0, failed: 0, stopped: 1, reason: 'empty' });
    assert.equal(q.list()[0]!.state, 'cancelled');
    assert.ok(after <= 1, `stopped at the next step (${after} steps after the request)`);
    q.dispose();
  });

  test('an interrupted runner gives its job back; the next run finishes it (attempt 2)', async () => {
    const file = writeJobs('interrupt', [{ prompt: 'a cat', seed: 1, steps: 30 }]);
    const q = JobQueue.open({ file: newDb() });
    const { batch } = openBatch(q, planBatch(file, { outDir: path.join(tmp, 'interrupt-out') }));
    const stop = new AbortController();
    const first = await runQueue({ queue: q, source, batchId: batch.id, signal: stop.signal, onEvent: (e) => e.type === 'progress' && e.evaluation === 1 && stop.abort() });
    assert.deepEqual(first, { done: 0, failed: 0, stopped: 1, reason: 'signal' });
    assert.equal(q.list()[0]!.state, 'queued');
    const second = await runQueue({ queue: q, source, batchId: batch.id });
    assert.deepEqual(second, { done: 1, failed: 0, stopped: 0, reason: 'empty' });
    assert.deepEqual([q.list()[0]!.state, q.list()[0]!.attempts], ['done', 2]);
    q.dispose();
  });

  test('a crash after the PNG was renamed but before its job was committed: the re-run writes the same file once, temp files go', async () => {
    const file = writeJobs('window', [{ prompt: 'a cat', seed: 11 }, { prompt: 'a dog', seed: 12 }]);
    const db = newDb();
    const plan = planBatch(file, { outDir: path.join(tmp, 'window-out') });
    const crashed = JobQueue.open({ file: db, owner: { host: os.hostname(), pid: deadPid(), token: 'crashed' } });
    const { batch } = openBatch(crashed, plan);
    const [job] = crashed.claim({ maxJobs: 1 });
    const target = job!.outputs[0]!.path;
    fs.mkdirSync(path.dirname(target), { recursive: true });
    fs.writeFileSync(target, 'bytes of an earlier attempt');
    const temp = path.join(path.dirname(target), `.${path.basename(target)}.${crashed.owner.pid}.tmp`);
    fs.writeFileSync(temp, 'half a png');
    crashed.dispose();

    const q = JobQueue.open({ file: db });
    const events: RunnerEvent[] = [];
    await runQueue({ queue: q, source, batchId: batch.id, onEvent: (e) => events.push(e) });
    assert.deepEqual(events.filter((e) => e.type === 'recovered').map((e) => (e as { job: { id: number } }).job.id), [job!.id]);
    assert.deepEqual(q.list().map((j) => [j.state, j.attempts]), [['done', 2], ['done', 1]]);
    assert.deepEqual(fs.readdirSync(plan.outDir).sort(), ['00001-11.png', '00002-12.png']);
    const meta = readImageMetadata(new Uint8Array(fs.readFileSync(target)), target);
    assert.ok(meta.sources.some((s) => s.kind === 'chorus'), 'the file was rewritten as a complete PNG with metadata');
    q.dispose();
  });

  test('a grid batch assembles its image once every cell finished, and only once', async () => {
    const file = writeJobs('grid', [{ prompt: 'a cat', seed: 3 }]);
    const q = JobQueue.open({ file: newDb() });
    const plan = planBatch(file, { outDir: path.join(tmp, 'grid-out'), grid: 'cfgScale=4,8' });
    const { batch } = openBatch(q, plan);
    assert.deepEqual(await composeBatchGrids(q, batch.id), [], 'nothing before the jobs ran');
    await runQueue({ queue: q, source, batchId: batch.id });
    assert.deepEqual(await composeBatchGrids(q, batch.id), [path.join(plan.outDir, 'grid-001.png')]);
    assert.deepEqual(await composeBatchGrids(q, batch.id), []);
    q.dispose();
  });
});

describe('chorus queue and chorus batch on the command line', () => {
  const run = (...args: string[]) => spawnSync(process.execPath, [CHORUS, ...args], { encoding: 'utf-8', cwd: tmp, env: { ...process.env, CHORUS_DATA_DIR: path.join(tmp, 'data') } });

  test('queue list/cancel/retry against a --db file', () => {
    const db = newDb();
    const q = JobQueue.open({ file: db });
    const [a, b] = enqueueJobs(q, [{ prompt: 'first' }, { prompt: 'second' }]);
    q.dispose();
    const list = run('queue', 'list', '--db', db);
    assert.equal(list.status, 0, list.stderr);
    assert.match(list.stdout, new RegExp(`^ +${a} +- +1 queued +0 +0 "first"`, 'm'));
    assert.match(list.stdout, /^2 queued$/m);
    const cancel = run('queue', 'cancel', String(b), '--db', db);
    assert.equal(cancel.stdout, `job ${b}: cancelled\n`);
    assert.equal(run('queue', 'retry', String(a), '--db', db).stdout, `job ${a}: queued, not retried\n`);
    assert.equal(run('queue', 'retry', String(b), '--db', db).stdout, `job ${b}: queued\n`);
    const json = JSON.parse(run('queue', 'list', '--json', '--state', 'queued', '--db', db).stdout) as Array<{ id: number }>;
    assert.deepEqual(json.map((j) => j.id), [a, b]);
  });

  test('the default database is queue.sqlite in CHORUS_DATA_DIR', () => {
    const r = run('queue', 'list');
    assert.equal(r.status, 0, r.stderr);
    assert.ok(fs.existsSync(path.join(tmp, 'data', 'queue.sqlite')));
  });

  test('rejects bad arguments (exit 2) and unknown jobs (exit 1, typed error)', () => {
    const db = newDb();
    const usage = run('queue', 'cancel', '--db', db);
    assert.equal(usage.status, 2);
    assert.match(usage.stderr, /^error: chorus queue cancel needs job ids or --batch <id>/);
    assert.equal(run('queue', 'frobnicate', '--db', db).status, 2);
    assert.equal(run('queue', 'list', '--state', 'sleeping', '--db', db).status, 2);
    const missing = run('queue', 'cancel', '99', '--db', db);
    assert.equal(missing.status, 1);
    assert.match(missing.stderr, /^error \[JOB_NOT_FOUND\]: no job 99 in /);
    assert.equal(run('batch', '--db', db).status, 2);
    assert.equal(run('batch', 'a.jsonl', 'b.jsonl', '--db', db).status, 2);
    const memory = run('batch', 'a.jsonl', '--memory', 'lots', '--db', db);
    assert.equal(memory.status, 2);
    assert.match(memory.stderr, /--memory must be a memory size of at least 1G, such as 16G, 12GiB or 12000M; got "lots"/);
  });

  test('chorus batch rejects an invalid job file before queueing anything, naming line and field', () => {
    const db = newDb();
    const file = path.join(tmp, 'invalid.jsonl');
    fs.writeFileSync(file, `${JSON.stringify({ model: MODEL, prompt: 'ok' })}\n${JSON.stringify({ model: MODEL, prompt: 'x', loras: [{ name: 'a', te: 'strong' }] })}\n`);
    const r = run('batch', file, '--db', db);
    assert.equal(r.status, 1);
    assert.equal(r.stderr, `error [BAD_ARGUMENT]: ${file}:2: loras[0].te: must be a number, got the text "strong".\n`);
    const bad = run('batch', file, '--db', db, '--grid', 'colour=1,2');
    assert.equal(bad.status, 1);
    assert.match(bad.stderr, /^error \[BAD_ARGUMENT\]: --grid: "colour" is not a job field/);
    const q = JobQueue.open({ file: db });
    assert.deepEqual(q.list(), []);
    q.dispose();
  });

  test('a changed job file pointed at a folder with its outputs is refused (OUTPUT_EXISTS)', () => {
    const db = newDb();
    const out = path.join(tmp, 'exists-out');
    fs.mkdirSync(out, { recursive: true });
    fs.writeFileSync(path.join(out, '00001-1.png'), 'an earlier image');
    const file = path.join(tmp, 'exists.jsonl');
    fs.writeFileSync(file, JSON.stringify({ model: MODEL, prompt: 'a cat', seed: 1 }));
    const r = run('batch', file, '--db', db, '--out', out);
    assert.equal(r.status, 1);
    assert.match(r.stderr, new RegExp(`^error \\[OUTPUT_EXISTS\\]: ${path.join(out, '00001-1.png').replace(/[.*+?^${}()|[\]\\]/g, '\\$&')} exists`));
  });
});
