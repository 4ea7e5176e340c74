/**
 * Composition strategies, timed in one run (issue 5):
 * - tiny fixture model, 128×128, 10 steps: seconds per image for plain, Merge, Composite batched,
 *   Composite as N separate calls, CMLoRA c = 2, 3, 5 — N = 2, 3, 5 LoRAs;
 * - real SD 1.5 size (random weights, 512×512): seconds per step for the same strategies at
 *   N = 2, 3, 5 (steps 1… of a short run; step 0 includes session start).
 * Ratios: Composite batched / N calls (goal ≤ 1/1.3), CMLoRA c / Composite (goal c = 3 ≤ 0.5),
 * Merge / plain. Then the batching ceiling: the plain UNet as N batch-2 calls against one batch-2N
 * call (`--variants ceiling` runs only that).
 *
 *   npm run bench:composition [-- --only tiny|sd15 --n 2,3,5 --steps 6 --variants composite,cmlora --reps 3]
 *
 * Tiny figures are the median of `--reps` timed images per variant (after an untimed warm-up).
 *
 * Correctness first: Composite batched and as N calls must give the same latents.
 * JSON lines on stdout, a summary on stderr.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { parseArgs } from 'node:util';
import { Sd15Engine } from '../models/index.ts';
import { engineModels, generate, normalizeJob, type JobInput } from '../pipelines/index.ts';
import type { StrategySpec } from '../pipelines/strategies/index.ts';
import { FIXTURES } from '../test/fixtures.ts';
import { defaultBenchWorkDir, prepareRandomSd15FullModel } from './random-weights.ts';
import { writeRandomLora } from './random-lora.ts';
import { runConditions } from './run-conditions.ts';

const { values } = parseArgs({
  options: { only: { type: 'string' }, variants: { type: 'string' }, n: { type: 'string', default: '2,3,5' }, steps: { type: 'string', default: '6' }, threads: { type: 'string' }, reps: { type: 'string', default: '3' } },
});
/** Timed images per variant on the tiny model (the median is reported); one run at SD 1.5 size. */
const tinyReps = Number(values.reps);
const only = values.only?.split(',') ?? ['tiny', 'sd15'];
const counts = values.n.split(',').map(Number);
const sd15Steps = Number(values.steps);
const threads = values.threads === undefined ? os.cpus().length : Number(values.threads);
const log = (line: string) => process.stderr.write(`[bench:composition] ${line}\n`);
const emit = (record: Record<string, unknown>) => process.stdout.write(`${JSON.stringify({ ...runConditions(threads), ...record })}\n`);

interface Variant {
  readonly label: string;
  readonly strategy: StrategySpec;
  /** Composite as N separate calls: at most one CFG pair per UNet call. */
  readonly maxBatch?: number;
  readonly loras: boolean;
}

function variants(n: number): Variant[] {
  const high = Array.from({ length: n }, (_, i) => (i === n - 1 && n > 1 ? 'low' : 'high') as 'high' | 'low');
  return [
    { label: 'plain (no LoRA)', strategy: { name: 'plain' }, loras: false },
    { label: 'merge', strategy: { name: 'merge' }, loras: true },
    { label: 'composite batched', strategy: { name: 'composite' }, loras: true },
    { label: 'composite N calls', strategy: { name: 'composite' }, maxBatch: 2, loras: true },
    ...[2, 3, 5].map((c) => ({ label: `cmlora c=${c}`, strategy: { name: 'cmlora', cacheInterval: c, frequencyClasses: high } as StrategySpec, loras: true })),
  ];
}

async function run(setting: 'tiny' | 'sd15', modelDir: string, loraFiles: readonly string[], job: Omit<JobInput, 'model'>, perStep: boolean): Promise<void> {
  const cacheDir = path.join(defaultBenchWorkDir(), 'cache');
  for (const n of counts) {
    const times: Record<string, number> = {};
    const finals: Record<string, Float32Array> = {};
    // At SD 1.5 size each variant gets its own engine (sessions of several variants at once, plus
    // Composite's 2N-element batches, exceed 24 GB); the tiny model shares one.
    let engine = Sd15Engine.open(modelDir, { device: 'cpu', cacheDir, threads });
    try {
      let models = engineModels(engine);
      const picked = variants(n).filter((v) => values.variants === undefined || values.variants.split(',').some((w) => v.label.includes(w)));
      for (const [vi, v] of picked.entries()) {
        if (setting === 'sd15' && vi > 0) {
          await engine.dispose();
          engine = Sd15Engine.open(modelDir, { device: 'cpu', cacheDir, threads });
          models = engineModels(engine);
        }
        const loras = v.loras ? loraFiles.slice(0, n).map((f) => ({ name: f, te: 0.8, unet: 0.8 })) : [];
        const j = normalizeJob({ ...job, model: modelDir, loras, strategy: v.strategy, loraMode: 'bank' });
        // Warm-up: builds the sessions this variant needs (not timed).
        await generate({ ...j, steps: 2 }, models, v.maxBatch === undefined ? {} : { maxBatch: v.maxBatch });
        const figures: number[] = [];
        let result: Awaited<ReturnType<typeof generate>> | undefined;
        for (let rep = 0; rep < (perStep ? 1 : tinyReps); rep++) {
          const stepTimes: number[] = [];
          let last = performance.now();
          const t0 = last;
          result = await generate(j, models, {
            ...(v.maxBatch === undefined ? {} : { maxBatch: v.maxBatch }),
            onProgress: () => {
              const now = performance.now();
              stepTimes.push(now - last);
              last = now;
            },
          });
          const total = performance.now() - t0;
          figures.push(perStep ? stepTimes.slice(1).reduce((a, b) => a + b, 0) / Math.max(1, stepTimes.length - 1) : total);
        }
        const figure = [...figures].sort((x, y) => x - y)[figures.length >> 1]!;
        times[v.label] = figure;
        finals[v.label] = result!.images[0]!.finalLatents.data;
        emit({ record: 'composition', setting, n, variant: v.label, [perStep ? 'msPerStep' : 'msPerImage']: Math.round(figure), samplesMs: figures.map(Math.round), steps: j.steps, size: `${j.width}x${j.height}` });
        log(`${setting} N=${n} ${v.label}: ${perStep ? `${(figure / 1000).toFixed(2)} s/step` : `${(figure / 1000).toFixed(2)} s/image`}`);
      }
    } finally {
      await engine.dispose();
    }
    // With --variants some figures are missing: no summary (the per-variant lines stand alone).
    if (Object.keys(times).length !== variants(n).length) continue;
    let diff = 0;
    const a = finals['composite batched']!;
    const b = finals['composite N calls']!;
    for (let i = 0; i < a.length; i++) diff = Math.max(diff, Math.abs(a[i]! - b[i]!));
    const ratio = (x: string, y: string) => Math.round((times[x]! / times[y]!) * 1000) / 1000;
    const summary = {
      record: 'composition_summary',
      setting,
      n,
      compositeBatchedVsNCallsMaxAbsDiff: diff,
      speedupBatchedOverNCalls: ratio('composite N calls', 'composite batched'),
      cmloraOverComposite: Object.fromEntries([2, 3, 5].map((c) => [`c=${c}`, ratio(`cmlora c=${c}`, 'composite batched')])),
      mergeOverPlain: ratio('merge', 'plain (no LoRA)'),
    };
    emit(summary);
    log(`${setting} N=${n}: batched composite ${summary.speedupBatchedOverNCalls}× faster than N calls (max |Δ| ${diff.toExponential(1)}); CMLoRA/Composite ${JSON.stringify(summary.cmloraOverComposite)}; Merge/plain ${summary.mergeOverPlain}`);
  }
  if (values.variants === undefined || values.variants.split(',').includes('ceiling')) for (const n of counts) await batchingCeiling(setting, modelDir, n, job.width ?? 512, job.height ?? 512);
}

/**
 * What batching alone can gain on this machine: the plain UNet (no LoRA, nothing shared between
 * elements) as N calls of a CFG-sized batch of 2 against one call of 2N, alternated, medians of
 * the rounds. Composite's branches share nothing beyond the layers before the first LoRA layer, so
 * batched Composite over N calls cannot beat this ratio by more than that prefix's share.
 */
async function batchingCeiling(setting: string, modelDir: string, n: number, width: number, height: number): Promise<void> {
  const rounds = setting === 'sd15' ? 2 : tinyReps * 3;
  const engine = Sd15Engine.open(modelDir, { device: 'cpu', cacheDir: path.join(defaultBenchWorkDir(), 'cache'), threads });
  try {
    const c = engine.model.unet;
    const [h, w] = [height / 8, width / 8];
    let seed = 11;
    const random = (length: number) =>
      Float32Array.from({ length }, () => {
        seed = (seed * 16807) % 2147483647;
        return seed / 2147483647 - 0.5;
      });
    const input = (batch: number) => ({
      sample: { dtype: 'float32' as const, shape: [batch, c.inChannels, h, w], data: random(batch * c.inChannels * h * w) },
      timestep: { dtype: 'float32' as const, shape: [1], data: Float32Array.of(500) },
      encoderHiddenStates: { dtype: 'float32' as const, shape: [batch, 77, c.crossAttentionDim[0]!], data: random(batch * 77 * c.crossAttentionDim[0]!) },
    });
    const pair = input(2);
    const all = input(2 * n);
    await engine.runUnet(pair);
    await engine.runUnet(all);
    const separate: number[] = [];
    const batched: number[] = [];
    for (let r = 0; r < rounds; r++) {
      let t0 = performance.now();
      for (let k = 0; k < n; k++) await engine.runUnet(pair);
      separate.push(performance.now() - t0);
      t0 = performance.now();
      await engine.runUnet(all);
      batched.push(performance.now() - t0);
    }
    const median = (x: number[]) => [...x].sort((a, b) => a - b)[x.length >> 1]!;
    const ratio = Math.round((median(separate) / median(batched)) * 1000) / 1000;
    emit({ record: 'batching_ceiling', setting, n, size: `${width}x${height}`, msNCallsOfBatch2: Math.round(median(separate)), msOneCallOfBatch2N: Math.round(median(batched)), speedupBatchedOverNCalls: ratio, rounds });
    log(`${setting} N=${n} plain UNet, no LoRA: ${n} calls of batch 2 ${(median(separate) / 1000).toFixed(2)} s, one call of batch ${2 * n} ${(median(batched) / 1000).toFixed(2)} s: batching alone gains ${ratio}×`);
  } finally {
    await engine.dispose();
  }
}

const work = defaultBenchWorkDir();
fs.mkdirSync(work, { recursive: true });
if (only.includes('tiny')) {
  // Five distinct files (copies of the fixture LoRAs under other names: a stack never holds one file twice).
  const dir = path.join(work, 'tiny-loras');
  fs.mkdirSync(dir, { recursive: true });
  const sources = ['lora_kohya_a', 'lora_kohya_b_locon', 'lora_peft', 'lora_kohya_a', 'lora_kohya_b_locon'];
  const files = sources.map((s, i) => {
    const f = path.join(dir, `${s}-${i}.safetensors`);
    if (!fs.existsSync(f)) fs.copyFileSync(path.join(FIXTURES, 'tiny-sd15-lora', `${s}.safetensors`), f);
    return f;
  });
  await run('tiny', path.join(FIXTURES, 'tiny-sd15'), files, { prompt: 'tinychar, red coat, flower garden', negativePrompt: 'blurry', steps: 10, width: 128, height: 128, sampler: 'DPM++ 2M', seed: 1 }, false);
}
if (only.includes('sd15')) {
  // generate() encodes the prompt: the text encoder must be SD 1.5-sized too (768-wide context).
  const model = prepareRandomSd15FullModel(work, 1234, log);
  const dir = path.join(work, 'loras');
  fs.mkdirSync(dir, { recursive: true });
  const files = [0, 1, 2, 3, 4].map((k) => {
    const f = path.join(dir, `random-unet-r32-${k}.safetensors`);
    writeRandomLora(f, 100 + k);
    return f;
  });
  await run('sd15', model.dir, files, { prompt: 'a photo', negativePrompt: '', steps: sd15Steps, width: 512, height: 512, sampler: 'DPM++ 2M', seed: 1 }, true);
}
