/**
 * Heterogeneous batching: the loop's per-image contexts and mix rows (fake denoiser), and jobs that
 * differ in prompt, LoRA stack, CFG and seed run as one batched UNet call on the tiny model with the
 * same final latents as their one-by-one runs.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { AdapterStack, Sd15Engine, type AdapterUse, type Tensor } from '../models/index.ts';
import { denoise } from '../pipelines/denoise.ts';
import { PipelineError } from '../pipelines/errors.ts';
import { normalizeJob, type JobInput } from '../pipelines/job.ts';
import { batchKey, generateTogether, groupPreparedJobs, prepareBatchJob, type PreparedJob } from '../pipelines/jobs/batched.ts';
import { engineModels, type DenoiserModel, type SdModels } from '../pipelines/models.ts';
import type { Scheduler } from '../pipelines/schedulers/types.ts';
import type { Branch, Strategy } from '../pipelines/strategies/types.ts';
import { generate } from '../pipelines/text-to-image.ts';
import { FIXTURES, assertClose } from './fixtures.ts';

const MODEL = path.join(FIXTURES, 'tiny-sd15');
const LORA_DIR = path.join(FIXTURES, 'tiny-sd15-lora');
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'chorus-batched-'));
/** The bar for batched vs one-by-one final latents (float32; values reach ~50 on the tiny model). */
const BATCHED_ATOL = 1e-4;

const ctx = (rows: number[], seq = 4): Tensor<'float32'> => {
  const data = new Float32Array(rows.length * seq * 2);
  rows.forEach((v, r) => data.fill(v, r * seq * 2, (r + 1) * seq * 2));
  return { dtype: 'float32', shape: [rows.length, seq, 2], data };
};

/** One step of x ← x − ε. */
const oneStep = { kind: 'euler', timesteps: [500], sigmas: undefined, initNoiseSigma: 1, needsNoise: false, scaleModelInput: (x: Float32Array) => x, step: (eps: Float32Array, _i: number, x: Float32Array) => x.map((v, j) => v - eps[j]!) } as unknown as Scheduler;

function fixedStrategy(branches: Branch[]): Strategy<null> {
  return { name: 'fixed', begin: () => null, branches: () => branches, combine: (_s, _c, outputs) => outputs[0]!.eps };
}

describe('the loop with per-image contexts and mixes', () => {
  const stack = new AdapterStack([
    { path: '/nowhere/a.safetensors', name: 'a', modules: [], te: 1, unet: 1 },
    { path: '/nowhere/b.safetensors', name: 'b', modules: [], te: 1, unet: 0.5 },
  ]);
  const record = (calls: Array<{ contexts: number[]; mix: readonly (readonly number[])[] | undefined }>): DenoiserModel => ({
    async predict({ sample, context, adapters }: { sample: Tensor<'float32'>; context: Tensor<'float32'>; adapters?: AdapterUse }) {
      const [b, seq, dim] = context.shape as [number, number, number];
      calls.push({ contexts: Array.from({ length: b }, (_, i) => context.data[i * seq * dim]!), mix: adapters?.mode === 'bank' ? adapters.mix : undefined });
      return { noisePred: { dtype: 'float32', shape: sample.shape, data: new Float32Array(sample.data.length) } };
    },
  });

  test('a (B, S, D) context and per-image mix rows reach the call next to a broadcast branch', async () => {
    const calls: Array<{ contexts: number[]; mix: readonly (readonly number[])[] | undefined }> = [];
    await denoise({
      scheduler: oneStep,
      strategy: fixedStrategy([
        { context: ctx([1, 2, 3]), imageMixes: [[1, 0], [0, 1], [0.5, 0.25]] },
        { context: ctx([9]), mix: [0.2, 0.3] },
        { context: ctx([7]) },
      ]),
      denoiser: record(calls),
      initialNoise: new Float32Array(3 * 4),
      shape: [3, 1, 2, 2],
      steps: 1,
      noise: () => assert.fail('deterministic'),
      adapters: { stack, mode: 'bank' },
    });
    assert.deepEqual(calls, [
      {
        contexts: [1, 2, 3, 9, 9, 9, 7, 7, 7],
        mix: [[1, 0], [0, 1], [0.5, 0.25], [0.2, 0.3], [0.2, 0.3], [0.2, 0.3], [1, 0.5], [1, 0.5], [1, 0.5]],
      },
    ]);
  });

  test('rejects per-image mixes in merged mode and a context with the wrong number of rows', async () => {
    const run = (branches: Branch[], mode: 'bank' | 'merged') =>
      denoise({ scheduler: oneStep, strategy: fixedStrategy(branches), denoiser: record([]), initialNoise: new Float32Array(12), shape: [3, 1, 2, 2], steps: 1, noise: () => new Float32Array(12), adapters: { stack, mode } });
    await assert.rejects(run([{ context: ctx([1, 2, 3]), imageMixes: [[1, 0.5], [1, 0.5], [0, 0.5]] }], 'merged'), (e: unknown) => e instanceof PipelineError && e.code === 'BAD_ARGUMENT' && /merged-weights mode/.test(e.message));
    await run([{ context: ctx([1, 2, 3]), imageMixes: [[1, 0.5], [1, 0.5], [1, 0.5]] }], 'merged');
    await assert.rejects(run([{ context: ctx([1, 2]) }], 'bank'), /a branch context has 2 rows; expected 1 or the batch size 3/);
  });
});

describe('batch keys', () => {
  const job = (over: Partial<JobInput> = {}) => normalizeJob({ model: MODEL, prompt: 'a cat', seed: 1, steps: 2, width: 64, height: 64, ...over });
  test('jobs differing in prompt, LoRAs, CFG, seed, clip skip share a key; model, size, sampler, steps do not', () => {
    const k = batchKey(job());
    assert.notEqual(k, undefined);
    for (const over of [{ prompt: 'a dog' }, { loras: [{ name: 'x', te: 1, unet: 1 }] }, { cfgScale: 3 }, { seed: 9 }, { clipSkip: 2 }, { negativePrompt: 'ugly' }, { strategy: { name: 'merge' as const } }]) assert.equal(batchKey(job(over)), k, JSON.stringify(over));
    for (const over of [{ model: '/other' }, { width: 128 }, { sampler: 'Euler' }, { steps: 3 }]) assert.notEqual(batchKey(job(over)), k, JSON.stringify(over));
  });

  test('jobs that always run alone have none', () => {
    for (const over of [{ strategy: { name: 'composite' as const } }, { batchSize: 2 }, { batchCount: 2 }, { loraMode: 'merged' as const }, { strategy: { name: 'regions' as const }, regions: [{ box: [0, 0, 32, 32] as const, prompt: 'x' }] }]) {
      assert.equal(batchKey(job(over)), undefined, JSON.stringify(over));
    }
  });
});

describe('batched jobs on the tiny model', () => {
  let engine: Sd15Engine;
  let models: SdModels;
  const unetBatches: number[] = [];
  before(() => {
    engine = Sd15Engine.open(MODEL, { device: 'cpu', cacheDir: path.join(tmp, 'cache') });
    const real = engineModels(engine, { loraDirs: [LORA_DIR] });
    models = { ...real, denoiser: { predict: (r) => (unetBatches.push(r.sample.shape[0]!), real.denoiser.predict(r)) } };
  });
  after(async () => engine.dispose());

  const base = { model: MODEL, steps: 3, width: 64, height: 64, sampler: 'Euler a' };
  const jobs = [
    normalizeJob({ ...base, prompt: 'a cat', seed: 1 }),
    normalizeJob({ ...base, prompt: 'a dog <lora:lora_kohya_a:0.7>', seed: 2, cfgScale: 5 }),
    normalizeJob({ ...base, prompt: 'a bird', seed: 3, loras: [{ name: 'lora_peft', te: 0.5, unet: 1 }, { name: 'lora_kohya_a', te: 1, unet: 0.3 }] }),
    normalizeJob({ ...base, prompt: 'a fish', negativePrompt: 'blurry', seed: 4, loras: [{ name: 'lora_diffusers', te: 1, unet: 1 }] }),
    // kohya_a before peft: the opposite of job 2's order, so it needs a loop of its own.
    normalizeJob({ ...base, prompt: 'a fox', seed: 5, loras: [{ name: 'lora_kohya_a', te: 0.5, unet: 0.5 }, { name: 'lora_peft', te: 0.5, unet: 0.5 }] }),
  ];

  test('group by LoRA order and prompt length, then each job matches its one-by-one run', async () => {
    const prepared: PreparedJob[] = [];
    for (const j of jobs) prepared.push((await prepareBatchJob(j, models))!);
    const groups = groupPreparedJobs(prepared, 8);
    assert.deepEqual(groups.map((g) => g.map((p) => jobs.indexOf(p.job))), [[0, 1, 2, 3], [4]]);

    unetBatches.length = 0;
    const batched = [...(await generateTogether(groups[0]!, models)), ...(await generateTogether(groups[1]!, models))];
    // One call per evaluation for all four jobs (uncond + cond each): 8, then 2 for the lone job.
    assert.deepEqual(unetBatches, [8, 8, 8, 2, 2, 2]);

    for (const [i, job] of jobs.entries()) {
      const alone = (await generate(job, models)).images[0]!;
      const together = batched[i]!.images[0]!;
      assert.equal(together.seed, job.seed);
      assertClose(together.finalLatents.data, alone.finalLatents.data, BATCHED_ATOL, `job ${i} final latents`);
      assertClose(together.image.data, alone.image.data, BATCHED_ATOL, `job ${i} image`);
      assert.deepEqual(batched[i]!.loras.map((l) => [l.name, l.te, l.unet]), (await generate(job, models)).loras.map((l) => [l.name, l.te, l.unet]));
    }
  });

  test('stacks whose orders agree share one group, whatever order their LoRAs first appear in', async () => {
    const stack = (...names: string[]) => names.map((name) => ({ name, te: 1, unet: 1 }));
    const stacks = [stack('lora_kohya_a'), stack('lora_peft'), stack('lora_diffusers'), stack('lora_kohya_a', 'lora_peft'), stack('lora_kohya_a', 'lora_diffusers'), stack('lora_kohya_a', 'lora_peft', 'lora_diffusers'), stack('lora_peft', 'lora_kohya_a')];
    const prepared: PreparedJob[] = [];
    for (const [i, loras] of stacks.entries()) prepared.push((await prepareBatchJob(normalizeJob({ ...base, prompt: 'a cat', seed: i, loras }), models))!);
    assert.deepEqual(groupPreparedJobs(prepared, 8).map((g) => g.map((p) => Number(p.job.seed))), [[0, 1, 2, 3, 4, 5], [6]]);
  });

  test('prompts of different lengths and maxJobs split groups', async () => {
    const long = normalizeJob({ ...base, prompt: Array.from({ length: 90 }, () => 'cat').join(' '), seed: 6 });
    const prepared: PreparedJob[] = [];
    for (const j of [jobs[0]!, long, jobs[1]!, jobs[3]!]) prepared.push((await prepareBatchJob(j, models))!);
    assert.deepEqual(groupPreparedJobs(prepared, 8).map((g) => g.length), [3, 1]);
    assert.deepEqual(groupPreparedJobs(prepared, 2).map((g) => g.map((p) => p.job.seed)), [[1n, 2n], [6n], [4n]]);
  });

  test('rejects jobs that cannot share a loop, and a job error stays with its job', async () => {
    const a = (await prepareBatchJob(jobs[0]!, models))!;
    const other = (await prepareBatchJob(normalizeJob({ ...base, prompt: 'a cat', seed: 1, steps: 2 }), models))!;
    await assert.rejects(generateTogether([a, other], models), (e: unknown) => e instanceof PipelineError && e.code === 'BAD_ARGUMENT' && /cannot share a batch/.test(e.message));
    await assert.rejects(prepareBatchJob(normalizeJob({ ...base, prompt: 'x <lora:nope:1>', seed: 1 }), models), (e: unknown) => e instanceof PipelineError && e.message.includes('"nope"'));
    await assert.rejects(prepareBatchJob(normalizeJob({ ...base, prompt: 'x', seed: 1, strategy: { name: 'merge' } }), models), (e: unknown) => e instanceof PipelineError && /needs at least 1 LoRA/.test(e.message));
  });
});
