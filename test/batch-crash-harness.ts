/**
 * The kill -9 harness shared by test/batch-crash.test.ts (short) and bench/batch-crash.ts (long):
 * a job file on the tiny model, `chorus batch` run as a child and SIGKILLed at seeded random points,
 * the consistency check after each kill, and the final check that every job was done exactly once
 * with a whole PNG carrying its metadata.
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import sharp from 'sharp';
import { readImageMetadata } from '../pipelines/images/metadata.ts';
import { JobQueue } from '../pipelines/queue/store.ts';
import { FIXTURES } from './fixtures.ts';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const CHORUS = path.join(ROOT, 'cli', 'bin', 'chorus.mjs');
const MODEL = path.join(FIXTURES, 'tiny-sd15');
const LORA_DIR = path.join(FIXTURES, 'tiny-sd15-lora');
/** Pixel values of a resumed run against an uninterrupted one (8-bit): batch companions may differ between runs, which moves float rounding only. */
export const PIXEL_TOLERANCE = 1;

/** mulberry32: a small seeded PRNG, so the kill points are the same on every run. */
export function seededRandom(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 2 ** 32;
  };
}

/** `count` 64×64 2-step jobs: most share a batch key (different LoRA stacks), every ninth is a composite job that runs alone. */
function jobLines(count: number): string {
  const loras = [[], [{ name: 'lora_kohya_a', te: 0.8 }], [{ name: 'lora_peft', te: 0.5, unet: 1 }], [{ name: 'lora_diffusers' }, { name: 'lora_kohya_b_locon', te: 0.6 }]];
  return Array.from({ length: count }, (_, i) =>
    JSON.stringify({
      model: MODEL,
      prompt: `a ${['cat', 'dog', 'bird', 'fox', 'owl'][i % 5]} number ${i}`,
      seed: 100 + i,
      steps: 2,
      width: 64,
      height: 64,
      loras: loras[i % loras.length],
      ...(i % 9 === 4 ? { strategy: 'composite', loras: [{ name: 'lora_peft' }, { name: 'lora_kohya_a' }] } : {}),
    }),
  ).join('\n');
}

export interface CrashSetup {
  readonly db: string;
  readonly out: string;
  /** `chorus batch …` arguments after `node`. */
  readonly args: readonly string[];
}

/** A batch folder with its job file, database and output folder; the graph cache is shared under `root`. */
export function crashSetup(root: string, name: string, jobs: number, maxBatch: number): CrashSetup {
  const dir = path.join(root, name);
  fs.mkdirSync(dir, { recursive: true });
  fs.writeFileSync(path.join(dir, 'jobs.jsonl'), jobLines(jobs));
  const db = path.join(dir, 'queue.sqlite');
  const out = path.join(dir, 'out');
  const args = [CHORUS, 'batch', path.join(dir, 'jobs.jsonl'), '--out', out, '--db', db, '--lora-dir', LORA_DIR, '--cache', path.join(root, 'cache'), '--device', 'cpu', '--max-batch', String(maxBatch), '--json'];
  return { db, out, args };
}

/** Where to kill a run: `delayMs` after its `afterEvents`-th denoising-step or job-done line, or (0) after spawn. */
export interface KillPoint {
  readonly afterEvents: number;
  readonly delayMs: number;
}

/**
 * Kill points: every fourth blind (start-up, opening the model: 300–3300 ms after spawn), the others
 * 0–40 ms after the 1st–`maxEvents`th denoising step or finished job. With groups of 4 jobs (2 steps,
 * then 4 dones) they land in the loop, in decoding, and between renaming a PNG and committing it.
 */
export function killPoint(random: () => number, run: number, maxEvents: number): KillPoint {
  if (run % 4 === 0) return { afterEvents: 0, delayMs: 300 + Math.floor(random() * 3000) };
  return { afterEvents: 1 + Math.floor(random() * maxEvents), delayMs: Math.floor(random() * 40) };
}

/** Run the batch once and SIGKILL it at `at`. Resolves with whether the kill landed (else the exit code). */
export function runAndKill(s: CrashSetup, at: KillPoint): Promise<{ killed: boolean; code: number | null }> {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, s.args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let events = 0;
    let armed = false;
    let killed = false;
    const arm = () => {
      armed = true;
      setTimeout(() => {
        killed = child.kill('SIGKILL');
      }, at.delayMs);
    };
    child.stdout.setEncoding('utf-8');
    let buffered = '';
    child.stdout.on('data', (chunk: string) => {
      buffered += chunk;
      const lines = buffered.split('\n');
      buffered = lines.pop()!;
      events += lines.filter((l) => /"event":"(progress|done)"/.test(l)).length;
      if (!armed && at.afterEvents > 0 && events >= at.afterEvents) arm();
    });
    child.stderr.resume();
    if (at.afterEvents === 0) arm();
    child.on('exit', (code) => resolve({ killed: killed && code === null, code }));
  });
}

/** What must hold after any crash: a done job has its complete PNG; any other planned file present is whole. Returns the jobs done. */
export async function checkConsistent(s: CrashSetup): Promise<number> {
  const q = JobQueue.open({ file: s.db });
  try {
    for (const job of q.list()) {
      for (const o of job.outputs) {
        if (job.state === 'done') assert.ok(o.written && fs.existsSync(o.path), `job ${job.position} is done, so ${o.path} exists`);
        if (fs.existsSync(o.path)) await sharp(o.path).raw().toBuffer();
      }
    }
    return q.counts().done;
  } finally {
    q.dispose();
  }
}

/**
 * After the last run: `jobs` jobs, each done exactly once (one `done` log line), exactly the planned
 * files in the folder (no duplicates, no temp files), each a whole 64×64 PNG with its `chorus` and
 * A1111 metadata, within `PIXEL_TOLERANCE` of the uninterrupted `reference` run's image. Returns the
 * total number of job starts (more than `jobs` when kills interrupted jobs).
 */
export async function checkFinished(s: CrashSetup, reference: CrashSetup, jobs: number): Promise<{ starts: number; recovered: number }> {
  const q = JobQueue.open({ file: s.db });
  try {
    const list = q.list();
    assert.equal(list.length, jobs, 'one batch, queued once');
    assert.deepEqual(list.map((j) => j.state), Array(jobs).fill('done'));
    let recovered = 0;
    for (const job of list) {
      const logs = q.logs(job.id);
      assert.equal(logs.filter((l) => l.message.startsWith('done')).length, 1, `job ${job.position} completed exactly once`);
      if (logs.some((l) => l.message.includes('stopped while running it'))) recovered++;
    }
    const expected = list.map((j) => path.basename(j.outputs[0]!.path)).sort();
    assert.deepEqual(fs.readdirSync(s.out).sort(), expected, 'exactly the planned files: no duplicates, no temp files');
    assert.deepEqual(expected, fs.readdirSync(reference.out).sort());
    for (const job of list) {
      const file = job.outputs[0]!.path;
      const bytes = fs.readFileSync(file);
      const { data, info } = await sharp(bytes).raw().toBuffer({ resolveWithObject: true });
      assert.deepEqual([info.width, info.height, info.channels], [64, 64, 3]);
      const meta = readImageMetadata(new Uint8Array(bytes), file);
      const chorus = meta.sources.find((x) => x.kind === 'chorus');
      const a1111 = meta.sources.find((x) => x.kind === 'a1111');
      assert.ok(chorus?.kind === 'chorus' && a1111?.kind === 'a1111', `${file} carries its metadata`);
      const recorded = (chorus.job as { job: { prompt: string; seed: string } }).job;
      assert.deepEqual([recorded.prompt, recorded.seed], [job.entry.job.prompt, String(job.entry.job.seed)]);
      assert.match(a1111.text, new RegExp(`Seed: ${job.entry.job.seed},`));
      const ref = await sharp(path.join(reference.out, path.basename(file))).raw().toBuffer();
      let maxDiff = 0;
      for (let i = 0; i < data.length; i++) maxDiff = Math.max(maxDiff, Math.abs(data[i]! - ref[i]!));
      assert.ok(maxDiff <= PIXEL_TOLERANCE, `${path.basename(file)} matches the uninterrupted run (max pixel diff ${maxDiff})`);
    }
    return { starts: list.reduce((n, j) => n + j.attempts, 0), recovered };
  } finally {
    q.dispose();
  }
}
