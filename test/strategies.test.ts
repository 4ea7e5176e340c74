/**
 * Strategy schedules and combine maths with a fake denoiser that records every call: which
 * adapters (mix rows), which pass (full, full keeping the deep feature, shallow), over 20 steps,
 * against the official schedules of methods.md; combine results against hand-computed values.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { AdapterStack, type Tensor } from '../models/index.ts';
import { denoise } from '../pipelines/denoise.ts';
import { PipelineError } from '../pipelines/errors.ts';
import type { DenoiseRequest, DenoiserModel } from '../pipelines/models.ts';
import type { Scheduler } from '../pipelines/schedulers/types.ts';
import type { PromptConditioning } from '../pipelines/conditioning.ts';
import { createStrategy, textEncoderMix, type StrategySpec } from '../pipelines/strategies/index.ts';
import { switchActive } from '../pipelines/strategies/switch.ts';
import { refreshSteps } from '../pipelines/strategies/cmlora.ts';
import { FIXTURES, readManifest } from './fixtures.ts';
import * as path from 'node:path';

const ctx = (v: number): Tensor<'float32'> => ({ dtype: 'float32', shape: [1, 77, 1], data: new Float32Array(77).fill(v) });
const conditioning: PromptConditioning = { positive: [{ weight: 1, schedule: [{ endAtStep: 1e9, embedding: ctx(1) }] }], negative: [{ endAtStep: 1e9, embedding: ctx(0) }] };
const TE_STRENGTHS = [0.8, 0.7, 0.6, 0.5, 0.4];
const stackOf = (n: number, strength = 0.8) => new AdapterStack(Array.from({ length: n }, (_, k) => ({ path: `/lora${k}.safetensors`, name: `L${k}`, modules: [], te: TE_STRENGTHS[k]!, unet: strength })));

interface Call {
  step: number;
  /** Per sample: the adapter index with a non-zero mix (−1 for none), cond (1) or uncond (0), pass. */
  samples: Array<{ adapter: number; cond: number; pass: 'full' | 'keep' | 'shallow' }>;
}

/**
 * ε for a sample = 10·(adapter + 1) + cond (so combine maths can be checked by hand); the deep
 * feature is the step number.
 */
function fakeDenoiser(calls: Call[], step: () => number): DenoiserModel {
  return {
    async predict(r: DenoiseRequest) {
      const [b, c, h, w] = r.sample.shape as number[];
      const per = c! * h! * w!;
      const eps = new Float32Array(b! * per);
      const samples: Call['samples'] = [];
      for (let i = 0; i < b!; i++) {
        const mix = r.adapters !== undefined && r.adapters.mode === 'bank' ? r.adapters.mix[i]! : [];
        const adapter = mix.findIndex((m) => m !== 0);
        const cond = r.context.data[i * 77]!;
        samples.push({ adapter, cond, pass: r.deepFeature !== undefined ? 'shallow' : r.wantDeepFeature === true ? 'keep' : 'full' });
        eps.fill(10 * (adapter + 1) + cond, i * per, (i + 1) * per);
      }
      calls.push({ step: step(), samples });
      const out = { noisePred: { dtype: 'float32' as const, shape: r.sample.shape, data: eps } };
      return r.wantDeepFeature === true ? { ...out, deepFeature: { dtype: 'float32' as const, shape: [b!, 2, h!, w!], data: new Float32Array(b! * 2 * h! * w!).fill(step()) } } : out;
    },
  };
}

/** A scheduler that records ε and leaves x alone. */
function recordingScheduler(steps: number, seen: Float32Array[]): Scheduler {
  return {
    kind: 'euler',
    timesteps: Array.from({ length: steps }, (_, i) => 999 - i),
    sigmas: undefined,
    initNoiseSigma: 1,
    needsNoise: false,
    scaleModelInput: (x) => Float32Array.from(x),
    step: (eps, _i, x) => {
      seen.push(Float32Array.from(eps));
      return Float32Array.from(x);
    },
  } as Scheduler;
}

async function runStrategy(spec: StrategySpec, n: number, steps: number, guidance = 7) {
  const calls: Call[] = [];
  const eps: Float32Array[] = [];
  let step = 0;
  const stack = stackOf(n);
  const strategy = createStrategy(spec, { conditioning, guidanceScale: guidance, stack, steps }, [1, 1, 1, 1]);
  await denoise({
    scheduler: recordingScheduler(steps, eps),
    strategy,
    denoiser: fakeDenoiser(calls, () => step),
    initialNoise: new Float32Array(1),
    shape: [1, 1, 1, 1],
    steps,
    noise: () => new Float32Array(1),
    adapters: { stack, mode: 'bank' },
    onProgress: (p) => (step = p.step + 1),
  });
  return { calls, eps, stack };
}

describe('Switch', () => {
  test('τ = 5, N = 3 over 20 steps: L0 for steps 0–5, L1 6–10, L2 11–15, L0 16–19 (methods.md 1.2)', async () => {
    const { calls, eps } = await runStrategy({ name: 'switch', switchEvery: 5 }, 3, 20);
    const active = calls.map((c) => c.samples[0]!.adapter);
    assert.deepEqual(active, [0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 0, 0, 0, 0]);
    assert.ok(calls.every((c) => c.samples.length === 2 && c.samples[0]!.cond === 0 && c.samples[1]!.cond === 1 && c.samples[0]!.adapter === c.samples[1]!.adapter), 'one CFG pair per step, same LoRA');
    // ε = u + 7·(c − u) with u = 10(k+1), c = 10(k+1) + 1
    assert.deepEqual([...eps[0]!], [10 + 7]);
    assert.deepEqual([...eps[6]!], [20 + 7]);
    assert.equal(switchActive(1, 1, 2), 0);
    assert.deepEqual(Array.from({ length: 10 }, (_, i) => switchActive(i, 2, 2)), [0, 0, 0, 1, 1, 0, 0, 1, 1, 0]);
  });

  test('the prompt is encoded with LoRA 0 only; composite and merge use every LoRA', () => {
    const stack = stackOf(3);
    assert.deepEqual(textEncoderMix({ name: 'switch' }, { stack }), [0.8, 0, 0]);
    assert.deepEqual(textEncoderMix({ name: 'composite' }, { stack }), [0.8, 0.7, 0.6]);
    assert.deepEqual(textEncoderMix({ name: 'merge' }, { stack }), [0.8, 0.7, 0.6]);
  });
});

describe('Composite', () => {
  test('every LoRA alone on the CFG pair, batched into one call per step; ε = mean u + w·(mean c − mean u)', async () => {
    const { calls, eps } = await runStrategy({ name: 'composite' }, 3, 20, 10);
    assert.equal(calls.length, 20);
    for (const c of calls) {
      assert.deepEqual(c.samples.map((s) => [s.adapter, s.cond]), [[0, 0], [0, 1], [1, 0], [1, 1], [2, 0], [2, 1]]);
    }
    // u = mean(10, 20, 30) = 20, c = 21: ε = 20 + 10·1 = 30
    assert.deepEqual([...eps[0]!], [30]);
  });
});

describe('CMLoRA', () => {
  test('c = 2, two high-frequency LoRAs, 20 steps: rotating refresh, every other step shallow (methods.md 2.2)', async () => {
    const { calls, eps } = await runStrategy({ name: 'cmlora', cacheInterval: 2, frequencyClasses: ['high', 'high'] }, 2, 20, 8.5);
    const plan = calls.reduce<string[]>((acc, c) => {
      acc[c.step] = (acc[c.step] ?? '') + c.samples.filter((s) => s.cond === 0).map((s) => (s.pass === 'shallow' ? 's' : 'F')).join('');
      return acc;
    }, []);
    // Written out from the rules: S = {0, 2, …}; at a refresh, cache[k mod R] is emptied, then k += 1.
    assert.deepEqual(plan.join(' '), 'FF ss sF ss Fs ss sF ss Fs ss sF ss Fs ss sF ss Fs ss sF ss');
    // Step 0: dominant 0 (raw 1.2), the other 0.8; mean over N = 2: u = (1.2·10 + 0.8·20)/2 = 14, c = (1.2·11 + 0.8·21)/2 = 15.
    assert.ok(Math.abs(eps[0]![0]! - (14 + 8.5 * 1)) < 1e-5, `step 0 ε ${eps[0]![0]}`);
    // Step 2: dominant 1: u = (0.8·10 + 1.2·20)/2 = 16, c = 17
    assert.ok(Math.abs(eps[2]![0]! - (16 + 8.5)) < 1e-5, `step 2 ε ${eps[2]![0]}`);
  });

  test('the fixed variant refreshes the phase-2 dominant; the official one never does (fixture plans)', async () => {
    const manifest = readManifest(path.join(FIXTURES, 'tiny-sd15-ref', 'manifest.json'));
    for (const id of ['strategy/cmlora_c2_hl', 'strategy/cmlora_c3_hl']) {
      const c = manifest.cases.find((x: { id: string }) => x.id === id);
      for (const official of [true, false]) {
        const { calls } = await runStrategy({ name: 'cmlora', cacheInterval: c.knobs.cache_interval, frequencyClasses: ['high', 'low'], official }, 2, 10);
        const full: number[][] = [];
        for (const call of calls) for (const s of call.samples.filter((x) => x.cond === 0)) (full[call.step] ??= []).push(s.pass === 'shallow' ? 0 : 1);
        // Calls group full and shallow branches separately; order them by branch position.
        const expected = official ? c.schedule_summary.full_pass : c.fixed_variant.full_pass_fixed;
        assert.deepEqual(full.map((f) => [...f].sort().reverse().join('')), expected.map((f: number[]) => [...f].sort().reverse().join('')), `${id} official=${official}`);
        assert.equal(full.flat().reduce((a, b) => a + b, 0), expected.flat().reduce((a: number, b: number) => a + b, 0));
      }
    }
  });

  test('refresh schedules: c = 0 non-uniform, c = 1 every step, c ≥ 2 every c steps', () => {
    assert.deepEqual([...refreshSteps(10, 0)].sort((a, b) => a - b), [0, 2, 3, 6, 8]);
    assert.deepEqual([...refreshSteps(220, 0)].length, 92);
    assert.deepEqual([...refreshSteps(220, 3)].length, 74);
    assert.deepEqual([...refreshSteps(10, 1)].length, 10);
  });
});

describe('rejects', () => {
  test('a multi-LoRA strategy without LoRAs', async () => {
    for (const name of ['switch', 'composite', 'cmlora', 'merge'] as const) {
      await assert.rejects(runStrategy(name === 'cmlora' ? { name, frequencyClasses: [] } : { name }, 0, 2), (e: unknown) => e instanceof PipelineError && e.code === 'BAD_ARGUMENT' && e.message.includes(`the ${name} strategy composes LoRAs`), name);
    }
  });

  test('CMLoRA with only low-frequency LoRAs, or a class missing', async () => {
    await assert.rejects(runStrategy({ name: 'cmlora', frequencyClasses: ['low', 'low'] }, 2, 2), (e: unknown) => e instanceof PipelineError && /at least one high-frequency LoRA/.test(e.message));
    await assert.rejects(runStrategy({ name: 'cmlora', frequencyClasses: ['high'] }, 2, 2), (e: unknown) => e instanceof PipelineError && /frequency class for each of the 2 LoRAs/.test(e.message));
  });

  test('AND sub-prompts with a multi-LoRA strategy', () => {
    const two: PromptConditioning = { ...conditioning, positive: [...conditioning.positive, ...conditioning.positive] };
    const s = createStrategy({ name: 'composite' }, { conditioning: two, guidanceScale: 7, stack: stackOf(2), steps: 2 }, [1, 1, 1, 1]);
    assert.throws(() => s.branches(s.begin(), { evaluation: 0, step: 0, timestep: 999, batch: 1, latents: new Float32Array(1) }), (e: unknown) => e instanceof PipelineError && e.code === 'BAD_PROMPT');
  });
});
