/**
 * The denoising loop with a fake denoiser that records its calls: branch batching (equal context
 * lengths share a call, `maxBatch` splits), CFG and AND combine maths, scheduler order, ancestral
 * noise only when asked, cancellation.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import type { Tensor } from '../models/index.ts';
import { denoise, packRuns } from '../pipelines/denoise.ts';
import { defaultGradientBatch, defaultMaxBatch, exclusiveGradientBatch, exclusivePasses, gradientMemoryIsShort, unetBytesPerSample, unetVjpBytesPerSample } from '../pipelines/text-to-image.ts';
import { PipelineError } from '../pipelines/errors.ts';
import type { DenoiseRequest, DenoiserModel } from '../pipelines/models.ts';
import type { Scheduler } from '../pipelines/schedulers/types.ts';
import { plainStrategy } from '../pipelines/strategies/plain.ts';
import type { PromptConditioning } from '../pipelines/conditioning.ts';

const ctx = (value: number, seq = 77): Tensor<'float32'> => ({ dtype: 'float32', shape: [1, seq, 2], data: new Float32Array(seq * 2).fill(value) });

/** ε = first context value of the sample's row (so each branch is recognisable). */
function recordingDenoiser(calls: Array<{ batch: number; seq: number; timestep: number }>): DenoiserModel {
  return {
    async predict({ sample, timestep, context }) {
      const [b, c, h, w] = sample.shape as number[];
      const seq = context.shape[1]!;
      calls.push({ batch: b!, seq, timestep });
      const per = c! * h! * w!;
      const out = new Float32Array(sample.data.length);
      for (let i = 0; i < b!; i++) out.fill(context.data[i * seq * 2]!, i * per, (i + 1) * per);
      return { noisePred: { dtype: 'float32', shape: sample.shape, data: out } };
    },
  };
}

/** x ← x − ε, records what it saw. */
function fakeScheduler(evaluations: number, needsNoise = false, seen: number[][] = []): Scheduler {
  let next = 0;
  return {
    kind: 'euler',
    timesteps: Array.from({ length: evaluations }, (_, i) => 900 - i * 100),
    sigmas: undefined,
    initNoiseSigma: 2,
    needsNoise,
    scaleModelInput: (x) => Float32Array.from(x),
    step(eps, i, x, noise) {
      assert.equal(i, next++, 'steps in order');
      assert.equal(noise !== undefined, needsNoise);
      seen.push([...eps]);
      return Float32Array.from(x, (v, j) => v - eps[j]! + (noise?.[j] ?? 0));
    },
  } as Scheduler;
}

const conditioning = (positive: Array<[number, number, number?]>, negative = 0): PromptConditioning => ({
  positive: positive.map(([value, weight, seq]) => ({ weight, schedule: [{ endAtStep: 99, embedding: ctx(value, seq) }] })),
  negative: [{ endAtStep: 99, embedding: ctx(negative) }],
});

test('CFG: ε = u + s(c − u), uncond and cond in one batched call', async () => {
  const calls: Array<{ batch: number; seq: number; timestep: number }> = [];
  const seen: number[][] = [];
  const out = await denoise({
    scheduler: fakeScheduler(2, false, seen),
    strategy: plainStrategy(conditioning([[3, 1]], 1), 7.5),
    denoiser: recordingDenoiser(calls),
    initialNoise: new Float32Array(8).fill(1),
    shape: [2, 1, 2, 2],
    steps: 2,
    noise: () => assert.fail('no noise for a deterministic scheduler'),
  });
  assert.deepEqual(calls, [
    { batch: 4, seq: 77, timestep: 900 },
    { batch: 4, seq: 77, timestep: 800 },
  ]);
  assert.ok(seen.every((eps) => eps.every((v) => v === 1 + 7.5 * 2)));
  assert.ok(out.every((v) => v === 2 - 2 * 16));
});

test('AND: ε = u + s Σ w_i (c_i − u); contexts of another length get their own call', async () => {
  const calls: Array<{ batch: number; seq: number; timestep: number }> = [];
  const seen: number[][] = [];
  await denoise({
    scheduler: fakeScheduler(1, false, seen),
    strategy: plainStrategy(conditioning([[2, 1], [4, 0.5, 154]]), 2),
    denoiser: recordingDenoiser(calls),
    initialNoise: new Float32Array(4),
    shape: [1, 1, 2, 2],
    steps: 1,
    noise: () => new Float32Array(4),
  });
  assert.deepEqual(calls.map((c) => [c.batch, c.seq]), [[2, 77], [1, 154]]);
  assert.ok(seen[0]!.every((v) => v === 0 + 2 * (1 * 2 + 0.5 * 4)));
});

test('maxBatch splits a step into several calls', async () => {
  const calls: Array<{ batch: number; seq: number; timestep: number }> = [];
  await denoise({
    scheduler: fakeScheduler(1),
    strategy: plainStrategy(conditioning([[1, 1], [2, 1], [3, 1]]), 1),
    denoiser: recordingDenoiser(calls),
    initialNoise: new Float32Array(8),
    shape: [2, 1, 2, 2],
    steps: 1,
    maxBatch: 4,
    noise: () => new Float32Array(8),
  });
  assert.deepEqual(calls.map((c) => c.batch), [4, 4]);
});

test('calls keep a CFG pair (one LoRA mix) together where it fits, and split only what does not', () => {
  // Composite's step at N = 3 (u0 c0 u1 c1 u2 c2) with room for 3 samples: three calls of a pair,
  // not [u0 c0 u1] [c1 u2 c2], which would split LoRA 1's pair across two calls.
  const mixOf = (i: number) => String(i >> 1);
  assert.deepEqual(packRuns([0, 1, 2, 3, 4, 5], mixOf, 3), [[0, 1], [2, 3], [4, 5]]);
  assert.deepEqual(packRuns([0, 1, 2, 3, 4, 5], mixOf, 4), [[0, 1, 2, 3], [4, 5]]);
  assert.deepEqual(packRuns([0, 1, 2, 3, 4, 5], mixOf, 6), [[0, 1, 2, 3, 4, 5]]);
  // Every key distinct: the plain split.
  assert.deepEqual(packRuns([0, 1, 2, 3, 4], String, 2), [[0, 1], [2, 3], [4]]);
  // A run longer than a call is split into full calls, the rest packed with what follows.
  assert.deepEqual(packRuns([0, 1, 2, 3, 4, 5], (i) => (i < 5 ? 'a' : 'b'), 2), [[0, 1], [2, 3], [4, 5]]);
  assert.deepEqual(packRuns([0, 1, 2, 3, 4], (i) => (i < 2 ? 'a' : 'b'), 2), [[0, 1], [2, 3], [4]]);
});

test('ancestral schedulers get fresh noise each step; cancellation stops with JOB_CANCELLED', async () => {
  const drawn: number[] = [];
  await denoise({
    scheduler: fakeScheduler(3, true),
    strategy: plainStrategy(conditioning([[1, 1]]), 1),
    denoiser: recordingDenoiser([]),
    initialNoise: new Float32Array(4),
    shape: [1, 1, 2, 2],
    steps: 3,
    noise: (i) => (drawn.push(i), new Float32Array(4)),
  });
  assert.deepEqual(drawn, [0, 1, 2]);

  const abort = new AbortController();
  await assert.rejects(
    denoise({
      scheduler: fakeScheduler(5),
      strategy: plainStrategy(conditioning([[1, 1]]), 1),
      denoiser: recordingDenoiser([]),
      initialNoise: new Float32Array(4),
      shape: [1, 1, 2, 2],
      steps: 5,
      noise: () => new Float32Array(4),
      signal: abort.signal,
      onProgress: (p) => p.evaluation === 1 && abort.abort(),
    }),
    (e: unknown) => e instanceof PipelineError && e.code === 'JOB_CANCELLED' && e.message.includes('step 3 of 5'),
  );
});

test('the default memory cap: SD 1.5 at 512² keeps a CFG batch of 6 in one call, splits CMLoRA\'s two sessions to 3, never below a CFG pair', () => {
  const GiB = 1024 ** 3;
  // SD 1.5 at 512² (64×64 latents): ≈ 1.8 GiB per sample (the level-0 attention scores dominate).
  assert.ok(Math.abs(unetBytesPerSample(64, 64) / GiB - 1.81) < 0.05, `${unetBytesPerSample(64, 64) / GiB} GiB`);
  assert.equal(defaultMaxBatch(64, 64, 1, 24 * GiB), 6);
  assert.equal(defaultMaxBatch(64, 64, 2, 24 * GiB), 3);
  assert.equal(defaultMaxBatch(64, 64, 2, 8 * GiB), 2, 'one CFG pair at least');
  assert.equal(defaultMaxBatch(128, 128, 1, 24 * GiB), 2, '1024² on 24 GB: pairs');
  // The tiny fixture sizes are never split on a machine like CI's.
  assert.ok(defaultMaxBatch(32, 32, 2, 24 * GiB) >= 32);
});

test('the VJP caps: SD 1.5 at 512² on 24 GB (≈ 1.3 GiB per sample) runs CLoRA\'s six slot samples in one call only with the gradient session alone; the tiny fixture always does', () => {
  const GiB = 1024 ** 3;
  assert.ok(Math.abs(unetVjpBytesPerSample(64, 64) / GiB - 1.31) < 0.02, `${unetVjpBytesPerSample(64, 64) / GiB} GiB`);
  assert.equal(defaultGradientBatch(64, 64, 24 * GiB), 4);
  assert.equal(defaultGradientBatch(64, 64, 4 * GiB), 1, 'never below one sample');
  assert.equal(defaultGradientBatch(64, 64, 64 * GiB), 12);
  assert.equal(exclusiveGradientBatch(64, 64, 24 * GiB), 9);
  assert.equal(exclusiveGradientBatch(64, 64, 16 * GiB), 6, 'P = 3 one-pass still fits alone on 16 GB');
  assert.equal(exclusiveGradientBatch(64, 64, 12 * GiB), 4);
  assert.ok(defaultGradientBatch(32, 32, 24 * GiB) >= 6, 'the tiny fixture (256²) keeps the one-pass CLoRA update');
  // Short of memory (no room for a forward and a gradient session side by side).
  assert.equal(gradientMemoryIsShort(64, 64, 24 * GiB), true);
  assert.equal(gradientMemoryIsShort(64, 64, 32 * GiB), false);
  assert.equal(gradientMemoryIsShort(32, 32, 24 * GiB), false);
  assert.equal(defaultMaxBatch(64, 64, 3, 24 * GiB), 2);
});

test('exclusivePasses: announces rebuilds; a gradient pass releases the forward sessions first, a forward pass the gradient sessions, once per switch', async () => {
  const log: string[] = [];
  const eps = { dtype: 'float32' as const, shape: [1], data: new Float32Array(1) };
  const inner: DenoiserModel = {
    predict: async () => (log.push('predict'), { noisePred: eps }),
    maps: async () => (log.push('maps'), { xattn: eps, selfattn: eps }),
    vjp: async () => (log.push('vjp'), { maps: { xattn: eps, selfattn: eps }, gradSample: eps }),
    ntXentVjp: async () => (log.push('ntxent'), { xattn: eps, loss: new Float32Array(1), gradSample: eps }),
    releaseForwardPasses: async () => void log.push('release forward'),
    releaseGradientPasses: async () => void log.push('release gradient'),
    expectRebuilds: (on) => void log.push(`expect rebuilds: ${on}`),
  };
  const d = exclusivePasses(inner);
  const request = { sample: eps, timestep: 1, context: eps } as unknown as DenoiseRequest;
  const loss = { temperature: 0.5, feeds: {} };
  await d.ntXentVjp!(request, loss);
  await d.ntXentVjp!(request, loss);
  await d.vjp!(request, { xattn: eps, selfattn: eps });
  await d.predict(request);
  await d.maps!(request);
  await d.ntXentVjp!(request, loss);
  assert.deepEqual(log, ['expect rebuilds: true', 'release forward', 'ntxent', 'ntxent', 'vjp', 'release gradient', 'predict', 'maps', 'release forward', 'ntxent']);
});

test('exclusivePasses with ntXentForward: after the first gradient pass, forward passes run through the gradient session (nothing released); a denoiser that cannot falls back once for good', async () => {
  const eps = { dtype: 'float32' as const, shape: [1], data: new Float32Array(1) };
  const make = (can: boolean) => {
    const log: string[] = [];
    const inner: DenoiserModel = {
      predict: async () => (log.push('predict'), { noisePred: eps }),
      ntXentVjp: async (_r, loss) => (log.push(`ntxent ${loss.temperature}`), { xattn: eps, loss: new Float32Array(1), gradSample: eps }),
      ntXentForward: async (_r, loss) => (log.push(`forward through gradient ${loss.temperature}${can ? '' : ': cannot'}`), can ? { noisePred: eps } : undefined),
      releaseForwardPasses: async () => void log.push('release forward'),
      releaseGradientPasses: async () => void log.push('release gradient'),
      expectRebuilds: () => undefined,
    };
    return { log, d: exclusivePasses(inner) };
  };
  const request = { sample: eps, timestep: 1, context: eps } as unknown as DenoiseRequest;
  const loss = { temperature: 0.25, feeds: {} };
  {
    const { log, d } = make(true);
    await d.predict(request);
    assert.equal(d.holdsGradientSession(), false);
    await d.ntXentVjp!(request, loss);
    await d.predict(request);
    await d.predict(request);
    await d.ntXentVjp!(request, loss);
    assert.equal(d.holdsGradientSession(), true);
    assert.deepEqual(log, ['release gradient', 'predict', 'release forward', 'ntxent 0.25', 'forward through gradient 0.25', 'forward through gradient 0.25', 'ntxent 0.25']);
  }
  {
    const { log, d } = make(false);
    await d.ntXentVjp!(request, loss);
    await d.predict(request);
    await d.ntXentVjp!(request, loss);
    await d.predict(request);
    assert.equal(d.holdsGradientSession(), false);
    assert.deepEqual(log, ['release forward', 'ntxent 0.25', 'forward through gradient 0.25: cannot', 'release gradient', 'predict', 'release forward', 'ntxent 0.25', 'release gradient', 'predict']);
  }
});
