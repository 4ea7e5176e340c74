/**
 * The latent-update hook of the denoising loop (pipelines/denoise.ts, strategies/types.ts `update`,
 * `LatentTools`) with a fake denoiser that records its calls: where the hook runs, that returned
 * outputs replace the step's own call, how the VJP tool stacks cotangents per branch and sums the
 * gradients (chain rule through the model-input scaling included); then the update schedules of the
 * official configurations: CLoRA's notebook (P = 3, 100 steps: updates at i < 50, 20 extra rounds at
 * steps 0, 10, 20 — 110 gradient evaluations, methods.md 3.3) and LoRA-Composer's script (50 steps:
 * refinement up to step 25, early stop from step 5 when the loss rises, methods.md 5.2).
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import type { Tensor } from '../models/index.ts';
import { denoise, latentTools } from '../pipelines/denoise.ts';
import type { DenoiseMaps, DenoiseRequest, DenoiserModel } from '../pipelines/models.ts';
import type { Scheduler } from '../pipelines/schedulers/types.ts';
import type { PromptConditioning, ScheduledConditioning } from '../pipelines/conditioning.ts';
import type { Strategy } from '../pipelines/strategies/types.ts';
import { cloraDefaults, cloraStrategy, type CloraEvent, type CloraPlan } from '../pipelines/strategies/clora.ts';
import { composerDefaults, loraComposerStrategy, type ComposerEvent, type ComposerPlan } from '../pipelines/strategies/lora-composer.ts';
import { AdapterStack } from '../models/index.ts';

const D = 2;
const ctx = (value: number, seq = 77): Tensor<'float32'> => ({ dtype: 'float32', shape: [1, seq, D], data: new Float32Array(seq * D).fill(value) });
const schedule = (value: number): ScheduledConditioning[] => [{ endAtStep: 999, embedding: ctx(value) }];

/** x ← x − ε; model input = `scale`·x. */
function fakeScheduler(evaluations: number, scale = 1): Scheduler {
  return {
    kind: 'ddim',
    timesteps: Array.from({ length: evaluations }, (_, i) => 1000 - i),
    sigmas: undefined,
    initNoiseSigma: 1,
    needsNoise: false,
    scaleModelInput: (x: Float32Array) => Float32Array.from(x, (v) => v * scale),
    step: (eps: Float32Array, _i: number, x: Float32Array) => Float32Array.from(x, (v, j) => v - eps[j]!),
  } as unknown as Scheduler;
}

interface Calls {
  predict: number[];
  maps: number[];
  vjp: number[];
}

/**
 * A denoiser whose maps are seeded random (or `mapValue(timestep)`), ε = 0, and whose gradient for
 * batch element b is filled with Σ(its xattn cotangent) + Σ(its region cotangent) + b.
 */
function fakeDenoiser(calls: Calls, mapValue?: (timestep: number) => number): Required<Pick<DenoiserModel, 'predict' | 'maps' | 'vjp'>> {
  let seed = 99;
  const rnd = () => ((seed = (Math.imul(seed, 1103515245) + 12345) >>> 0) + 0.5) / 4294967296;
  const mapsOf = (r: DenoiseRequest): DenoiseMaps => {
    const [B, , h, w] = r.sample.shape as [number, number, number, number];
    const N = Math.ceil(h / 4) * Math.ceil(w / 4);
    const S = r.context.shape[1]!;
    const v = () => (mapValue === undefined ? rnd() : mapValue(r.timestep));
    const t = (shape: number[], f: () => number): Tensor<'float32'> => ({ dtype: 'float32', shape, data: Float32Array.from({ length: shape.reduce((a, b) => a * b, 1) }, f) });
    const regions = r.regions?.context.shape;
    return {
      xattn: t([B, N, S], v),
      selfattn: t([B, N, N], () => 1 / N),
      ...(regions === undefined ? {} : { xattnRegion: t([B, regions[1]!, N, regions[2]!], v) }),
    };
  };
  return {
    async predict(r) {
      calls.predict.push(r.sample.shape[0]!);
      return { noisePred: { dtype: 'float32', shape: r.sample.shape, data: new Float32Array(r.sample.data.length) }, ...(r.attentionMaps === true ? { maps: mapsOf(r) } : {}) };
    },
    async maps(r) {
      calls.maps.push(r.sample.shape[0]!);
      return mapsOf(r);
    },
    async vjp(r, cot) {
      calls.vjp.push(r.sample.shape[0]!);
      const B = r.sample.shape[0]!;
      const per = r.sample.data.length / B;
      const grad = new Float32Array(r.sample.data.length);
      const sum = (t: Tensor<'float32'> | undefined, b: number) => (t === undefined ? 0 : t.data.subarray((b * t.data.length) / B, ((b + 1) * t.data.length) / B).reduce((a, x) => a + x, 0));
      for (let b = 0; b < B; b++) grad.fill(sum(cot.xattn, b) + sum(cot.xattnRegion, b) + b, b * per, (b + 1) * per);
      return { maps: mapsOf(r), gradSample: { dtype: 'float32', shape: r.sample.shape, data: grad } };
    },
  };
}

describe('the latent-update hook', () => {
  test('runs before the branches; its latents go to the scheduler; its outputs replace the step\'s call', async () => {
    const calls: Calls = { predict: [], maps: [], vjp: [] };
    const seen: number[][] = [];
    const strategy: Strategy<null> = {
      name: 'probe',
      begin: () => null,
      branches: (_s, c) => {
        seen.push([c.evaluation, c.latents[0]!]);
        return [{ context: ctx(0) }];
      },
      combine: (_s, _c, outputs) => Float32Array.from(outputs[0]!.eps, () => 1),
      async update(_s, c) {
        seen.push([c.evaluation, c.latents[0]!]);
        const latents = Float32Array.from(c.latents, (v) => v + 10);
        // Even evaluations bring their outputs (no denoiser call), odd ones let the loop run the branches.
        return c.evaluation % 2 === 0 ? { latents, outputs: [{ eps: new Float32Array(latents.length) }] } : { latents };
      },
    };
    const out = await denoise({ scheduler: fakeScheduler(3), strategy, denoiser: fakeDenoiser(calls), initialNoise: new Float32Array(4), shape: [1, 1, 2, 2], steps: 3, noise: () => new Float32Array(4) });
    // update sees 0, then branches see 0 + 10 (only on evaluation 1); each step: +10 then −1.
    assert.deepEqual(seen, [[0, 0], [1, 9], [1, 19], [2, 18]]);
    assert.deepEqual([...out], [27, 27, 27, 27]);
    assert.deepEqual(calls.predict, [1], 'only evaluation 1 called the denoiser');
  });

  test('VJP tool: cotangents go to their branch\'s batch elements, gradients of all branches add, the input scaling\'s chain rule applies', async () => {
    const calls: Calls = { predict: [], maps: [], vjp: [] };
    const stack = new AdapterStack([]);
    const tools = latentTools({ scheduler: fakeScheduler(1, 0.5), denoiser: fakeDenoiser(calls), shape: [2, 1, 4, 4], maxBatch: 4, adapters: { stack, mode: 'bank' } }, 0);
    const branches = [{ context: ctx(1) }, { context: ctx(2) }, { context: ctx(3) }];
    // Maps: N = 1 query (4×4 latents → 1×1 grid), S = 77; one cotangent per branch, both images.
    const cot = (k: number) => ({ xattn: Float32Array.from({ length: 2 * 77 }, (_, i) => (i === 0 ? k : i === 77 ? 10 * k : 0)) });
    const { grad, maps } = await tools.vjp(branches, new Float32Array(2 * 16), [cot(1), cot(2), cot(3)]);
    // maxBatch 4 = 2 branches per call: calls of 4 and 2 samples.
    assert.deepEqual(calls.vjp, [4, 2]);
    // Image 0: Σ_k k + element indices (0, 2 | 0) = 6 + 2; image 1: Σ_k 10k + (1, 3 | 1) = 60 + 5; ×0.5.
    assert.deepEqual([grad[0], grad[16]], [(6 + 2) * 0.5, (60 + 5) * 0.5]);
    assert.equal(maps.length, 3);
    assert.equal(maps[2]!.xattn.length, 2 * 77);
  });

  test('VJP calls take the gradient cap (their memory), maps calls the forward cap; no one-pass update when it splits the slots', async () => {
    const calls: Calls = { predict: [], maps: [], vjp: [] };
    let onePass = 0;
    const denoiser = { ...fakeDenoiser(calls), ntXentVjp: async () => (onePass++, assert.fail('the one-pass update must not run when the slots need several VJP calls')) };
    const tools = latentTools({ scheduler: fakeScheduler(1), denoiser, shape: [1, 1, 4, 4], maxBatch: 6, maxGradientBatch: 2 }, 0);
    const branches = [1, 2, 3, 4, 5, 6].map((k) => ({ context: ctx(k) }));
    await tools.maps(branches, new Float32Array(16));
    await tools.vjp(branches, new Float32Array(16), branches.map(() => ({ xattn: new Float32Array(77) })));
    assert.deepEqual(calls.maps, [6]);
    assert.deepEqual(calls.vjp, [2, 2, 2]);
    assert.equal(await tools.ntXentVjp!(branches, new Float32Array(16), [], 0.5), undefined);
    assert.equal(onePass, 0);
  });

  test('oneGradientGraph: every one-pass round runs the whole-UNet graph; only a round that asks for outputs returns them', async () => {
    const asked: boolean[] = [];
    const eps = (n: number): Tensor<'float32'> => ({ dtype: 'float32', shape: [n, 1, 4, 4], data: new Float32Array(n * 16).fill(0.25) });
    const denoiser: DenoiserModel = {
      predict: async () => assert.fail('no forward pass'),
      ntXentVjp: async (request, loss) => {
        asked.push(loss.noisePred === true);
        const n = request.sample.shape[0]!;
        return { xattn: { dtype: 'float32', shape: [n, 1, 77], data: new Float32Array(n * 77) }, loss: new Float32Array(1), gradSample: eps(n), ...(loss.noisePred === true ? { noisePred: eps(n) } : {}) };
      },
    };
    const branches = [1, 2].map((k) => ({ context: ctx(k) }));
    for (const oneGradientGraph of [false, true]) {
      asked.length = 0;
      const tools = latentTools({ scheduler: fakeScheduler(1), denoiser, shape: [1, 1, 4, 4], maxBatch: 6, oneGradientGraph }, 0);
      const discarded = await tools.ntXentVjp!(branches, new Float32Array(16), [], 0.5);
      const last = await tools.ntXentVjp!(branches, new Float32Array(16), [], 0.5, { outputs: true });
      assert.deepEqual(asked, [oneGradientGraph, true], `oneGradientGraph ${oneGradientGraph}: whole UNet asked for`);
      assert.equal(discarded!.outputs, undefined, 'a round that did not ask gets no outputs');
      assert.equal(last!.outputs!.length, 2);
      assert.deepEqual([...discarded!.grad], [...last!.grad], 'the same gradient either way');
    }
  });

  test('mapsFromFullPass: the maps come from full passes that ask for them (no maps-only session)', async () => {
    const calls: Calls = { predict: [], maps: [], vjp: [] };
    const base = fakeDenoiser(calls);
    const asked: boolean[] = [];
    const denoiser = { ...base, predict: (r: DenoiseRequest) => (asked.push(r.attentionMaps === true), base.predict(r)) };
    const tools = latentTools({ scheduler: fakeScheduler(1), denoiser, shape: [1, 1, 4, 4], maxBatch: 2, mapsFromFullPass: true }, 0);
    const maps = await tools.maps([1, 2, 3].map((k) => ({ context: ctx(k) })), new Float32Array(16));
    assert.deepEqual(calls.maps, []);
    assert.deepEqual(calls.predict, [2, 1]);
    assert.deepEqual(asked, [true, true]);
    assert.equal(maps.length, 3);
    assert.equal(maps[2]!.xattn.length, 77);
  });

  test('a denoiser without maps/VJP is refused with a typed error', async () => {
    const tools = latentTools({ scheduler: fakeScheduler(1), denoiser: { predict: fakeDenoiser({ predict: [], maps: [], vjp: [] }).predict }, shape: [1, 1, 4, 4] }, 0);
    await assert.rejects(tools.maps([{ context: ctx(0) }], new Float32Array(16)), (e: Error & { code?: string }) => e.code === 'BAD_ARGUMENT' && /maps\/VJP/.test(e.message));
  });
});

const conditioning = (value: number): PromptConditioning => ({ positive: [{ weight: 1, schedule: schedule(value) }], negative: schedule(-value) });

describe('update schedules of the official configurations', () => {
  test('CLoRA, notebook (P = 3, 100 steps): updates at i < 50, +20 rounds at 0, 10, 20 → 110 gradient evaluations', async () => {
    const calls: Calls = { predict: [], maps: [], vjp: [] };
    const plan: CloraPlan = {
      slots: [0, 1, 2].map((p) => ({ positive: schedule(p + 1), negative: schedule(-p - 1) })),
      groups: [
        [[1], [1, 2], [3]],
        [[2], [3], [1, 2]],
      ],
      maskTokens: [[], [1, 2], [1, 2]],
      mapGrid: [2, 2],
      latentGrid: [8, 8],
    };
    const events: CloraEvent[] = [];
    const strategy = cloraStrategy.create({ conditioning: conditioning(1), guidanceScale: 10, stack: new AdapterStack([]), steps: 100 }, plan, cloraDefaults(100), (e) => events.push(e));
    await denoise({ scheduler: fakeScheduler(100), strategy, denoiser: fakeDenoiser(calls), initialNoise: new Float32Array(4 * 64), shape: [1, 4, 8, 8], steps: 100, noise: () => new Float32Array(0) });
    const rounds = Array.from({ length: 100 }, (_, i) => events.filter((e) => e.kind === 'update' && e.evaluation === i).length);
    assert.deepEqual(rounds, Array.from({ length: 100 }, (_, i) => (i >= 50 ? 0 : [0, 10, 20].includes(i) ? 21 : 1)));
    assert.equal(calls.vjp.length, 110, 'gradient evaluations');
    assert.ok(calls.vjp.every((b) => b === 6), 'each over all P slots × 2 CFG halves in one batch');
    assert.deepEqual([calls.predict.length, calls.maps.length], [100, 60], 'one full pass per step; maps-only passes for the discarded rounds');
    assert.equal(events.filter((e) => e.kind === 'masks').length, 100);
  });

  test('LoRA-Composer, official script (50 steps): refinement at steps 0…25 while the loss does not rise', async () => {
    const plan: ComposerPlan = {
      regions: [{ positive: schedule(5), negative: schedule(-5), tokens: [1], box: { top: 0, left: 0, bottom: 2, right: 2 } }],
      masks: [16, 8, 4, 2].map((s) => ({ dtype: 'float32' as const, shape: [1, 1, s, s], data: Float32Array.from({ length: s * s }, (_, q) => (Math.floor(q / s) < s / 2 && q % s < s / 2 ? 1 : 0)) })),
      padChunk: ctx(0),
      mapGrid: [4, 4],
    };
    const run = async (mapValue: (timestep: number) => number) => {
      const calls: Calls = { predict: [], maps: [], vjp: [] };
      const events: ComposerEvent[] = [];
      const knobs = { ...composerDefaults(50), topKRatio: 0.5 };
      const strategy = loraComposerStrategy.create({ conditioning: conditioning(1), guidanceScale: 7.5, stack: new AdapterStack([]), steps: 50 }, plan, knobs, [1, 4, 16, 16], (e) => events.push(e));
      await denoise({ scheduler: fakeScheduler(50), strategy, denoiser: fakeDenoiser(calls, mapValue), initialNoise: Float32Array.from({ length: 4 * 256 }, (_, i) => Math.sin(i)), shape: [1, 4, 16, 16], steps: 50, noise: () => new Float32Array(0) });
      return { calls, updates: events.filter((e): e is Extract<ComposerEvent, { kind: 'update' }> => e.kind === 'update') };
    };
    // Maps growing every step: the loss keeps falling, refinement runs through step 25 (26 updates).
    const growing = await run((t) => 0.01 * (1001 - t));
    assert.deepEqual(growing.updates.map((u) => u.evaluation), Array.from({ length: 26 }, (_, i) => i));
    assert.equal(growing.calls.vjp.length, 26);
    assert.equal(growing.calls.predict.length, 50, 'one CFG pass per step');
    // A dip at step 3 (loss rises, but before step 5) is tolerated; the one at step 8 stops refining after step 8.
    const dips = await run((t) => (1000 - t === 3 || 1000 - t === 8 ? 0.001 : 0.01 * (1001 - t)));
    assert.deepEqual(dips.updates.map((u) => u.evaluation), Array.from({ length: 9 }, (_, i) => i));
    assert.ok(dips.updates[3]!.loss > dips.updates[2]!.loss && dips.updates[8]!.loss > dips.updates[7]!.loss);
    assert.deepEqual(dips.updates.map((u) => u.refining), [...new Array(8).fill(true), false]);
  });
});
