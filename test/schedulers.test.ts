/**
 * Schedulers against diffusers 0.24 (fixtures `scheduler/*` and the scheduler part of `pipeline/*`),
 * DPM-Solver++ against diffusers 0.26.3's `final_sigmas_type="zero"` (the scheduler part of
 * `strategy/*`), against closed forms for settings the fixtures do not cover (v-prediction, trailing
 * spacing, η > 0, the multistep solvers' last step), the config parser, and the A1111 / ComfyUI name
 * mapping.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { openSafetensors, type SafetensorsFile } from '../models/index.ts';
import { PipelineError } from '../pipelines/errors.ts';
import {
  createScheduler,
  parseSchedulerConfig,
  resolveSampler,
  resolveSchedulerConfig,
  type Scheduler,
  type SchedulerConfig,
  type SchedulerKind,
} from '../pipelines/schedulers/index.ts';
import { alphasCumprodFor, betasFor } from '../pipelines/schedulers/schedule.ts';
import { FIXTURES, REF, assertClose, readManifest, refCases, type RefCase } from './fixtures.ts';

const SD15_CONFIG_FILE = path.join(FIXTURES, 'tiny-sd15/scheduler/scheduler_config.json');
const SD15_CONFIG: SchedulerConfig = parseSchedulerConfig(JSON.parse(fs.readFileSync(SD15_CONFIG_FILE, 'utf-8')), SD15_CONFIG_FILE);
/** Fixture timesteps that are fractional float32 values are compared within this. */
const FRACTIONAL_TIMESTEP_ATOL = 1e-4;
const SIGMA_RTOL = 1e-5;

/** diffusers class (fixture `class`) → our kind; options from `config_overrides`. */
const CLASS_KIND: Readonly<Record<string, SchedulerKind>> = {
  DDIMScheduler: 'ddim',
  PNDMScheduler: 'pndm',
  LMSDiscreteScheduler: 'lms',
  EulerDiscreteScheduler: 'euler',
  EulerAncestralDiscreteScheduler: 'euler_ancestral',
  HeunDiscreteScheduler: 'heun',
  DPMSolverMultistepScheduler: 'dpmpp_2m',
  UniPCMultistepScheduler: 'unipc',
};

interface SchedulerCase extends RefCase {
  class: string;
  num_inference_steps: number;
  effective_config: Record<string, unknown>;
  config_overrides: Record<string, unknown>;
  timesteps: number[];
  sigmas?: number[];
  init_noise_sigma: number;
  num_model_evaluations: number;
  tensors: Record<string, { key: string; shape: number[] }>;
}

function schedulerFor(c: SchedulerCase): Scheduler {
  const kind = CLASS_KIND[c.class];
  assert.ok(kind !== undefined, `${c.id}: unmapped class ${c.class}`);
  return createScheduler(kind, SD15_CONFIG, c.num_inference_steps, { karrasSigmas: c.config_overrides['use_karras_sigmas'] === true ? true : undefined });
}

/** Rows of a [n, …] tensor as views. */
function rows(file: SafetensorsFile, key: string): Float32Array[] {
  const t = file.readFloat32(key);
  const n = t.shape[0]!;
  const per = t.data.length / n;
  return Array.from({ length: n }, (_, i) => t.data.subarray(i * per, (i + 1) * per));
}

function scale(x: Float32Array, s: number): Float32Array {
  return x.map((v) => v * s);
}

describe('schedulers match diffusers 0.24 on the SD 1.5 config', () => {
  const cases = refCases('scheduler') as SchedulerCase[];
  const file = openSafetensors(path.join(REF, 'schedulers.safetensors'));

  test('there are fixture cases for every kind', () => {
    assert.deepEqual(new Set(cases.map((c) => CLASS_KIND[c.class])), new Set(Object.values(CLASS_KIND)));
  });

  for (const c of cases) {
    test(c.id, () => {
      const scheduler = schedulerFor(c);
      // Grid: timesteps, σ, init σ, number of evaluations.
      assert.equal(scheduler.timesteps.length, c.num_model_evaluations, 'model evaluations');
      assert.equal(c.timesteps.length, c.num_model_evaluations);
      const fractional = c.timesteps.some((t) => !Number.isInteger(t));
      if (fractional) assertClose(scheduler.timesteps, c.timesteps, FRACTIONAL_TIMESTEP_ATOL, `${c.id} timesteps`);
      else assert.deepEqual(scheduler.timesteps, c.timesteps, `${c.id} timesteps`);
      if (c.sigmas === undefined) assert.equal(scheduler.sigmas, undefined);
      else {
        assert.ok(scheduler.sigmas !== undefined, `${c.id}: sigmas`);
        assert.equal(scheduler.sigmas.length, c.sigmas.length, `${c.id}: number of sigmas`);
        c.sigmas.forEach((s, i) => assert.ok(Math.abs(scheduler.sigmas![i]! - s) <= SIGMA_RTOL * Math.abs(s), `${c.id} sigma[${i}] = ${scheduler.sigmas![i]}, expected ${s}`));
      }
      assert.ok(Math.abs(scheduler.initNoiseSigma - c.init_noise_sigma) <= 1e-6 * c.init_noise_sigma, `${c.id} init_noise_sigma ${scheduler.initNoiseSigma} vs ${c.init_noise_sigma}`);
      assert.equal(scheduler.needsNoise, c.tensors['noise'] !== undefined, 'needsNoise');

      // The loop, every iteration against the reference.
      const atol = c.tolerance['atol']!;
      const xInit = file.readFloat32(c.tensors['x_init']!.key).data;
      const outputs = rows(file, c.tensors['model_outputs']!.key);
      const scaled = rows(file, c.tensors['scaled_model_inputs']!.key);
      const prev = rows(file, c.tensors['prev_samples']!.key);
      const noise = c.tensors['noise'] === undefined ? undefined : rows(file, c.tensors['noise'].key);
      let x: Float32Array = scale(xInit, scheduler.initNoiseSigma);
      for (let i = 0; i < scheduler.timesteps.length; i++) {
        assertClose(scheduler.scaleModelInput(x, i), scaled[i]!, atol, `${c.id} scaled_model_inputs[${i}]`);
        x = scheduler.step(outputs[i]!, i, x, noise?.[i]);
        assertClose(x, prev[i]!, atol, `${c.id} prev_samples[${i}]`);
      }
    });
  }

  test('resolved configs equal the fixtures\' effective_config', () => {
    for (const c of cases) {
      const r = resolveSchedulerConfig(CLASS_KIND[c.class]!, SD15_CONFIG);
      const e = c.effective_config;
      assert.deepEqual(
        [r.numTrainTimesteps, r.betaStart, r.betaEnd, r.betaSchedule, r.predictionType, r.timestepSpacing, r.stepsOffset],
        [e['num_train_timesteps'], e['beta_start'], e['beta_end'], e['beta_schedule'], e['prediction_type'], e['timestep_spacing'], e['steps_offset']],
        c.id,
      );
    }
  });
});

describe('schedulers inside the 10-step pipeline runs (CFG 7.5)', () => {
  // The pipeline cases store the raw UNet outputs [uncond, cond] per step and the latents after each
  // step, so each scheduler step can be replayed; 10 < 15 steps exercises DPM++'s lower_order_final.
  const file = openSafetensors(path.join(REF, 'pipeline.safetensors'));
  const KINDS: Readonly<Record<string, SchedulerKind>> = { 'pipeline/ddim': 'ddim', 'pipeline/euler': 'euler', 'pipeline/dpmpp_2m': 'dpmpp_2m' };
  for (const c of readManifest(path.join(REF, 'manifest.json')).cases.filter((k: RefCase) => k.kind === 'pipeline') as (RefCase & { scheduler_config: unknown; timesteps: number[]; guidance_scale: number; num_inference_steps: number })[]) {
    test(c.id, () => {
      const kind = KINDS[c.id]!;
      const scheduler = createScheduler(kind, parseSchedulerConfig(c.scheduler_config, c.id), c.num_inference_steps);
      assert.deepEqual(scheduler.timesteps, c.timesteps);
      const unet = rows(file, c.outputs['unet_outputs']!.key);
      const steps = rows(file, c.outputs['step_latents']!.key);
      const atol = c.tolerance['final_latents_atol']!;
      let x: Float32Array = scale(file.readFloat32(c.inputs['latents_init']!.key).data, scheduler.initNoiseSigma);
      const f = Math.fround;
      for (let i = 0; i < unet.length; i++) {
        const both = unet[i]!;
        const half = both.length / 2;
        // torch: u + g·(c − u) in float32.
        const guided = new Float32Array(half).map((_, j) => f(both[j]! + f(c.guidance_scale * f(both[half + j]! - both[j]!))));
        scheduler.scaleModelInput(x, i);
        x = scheduler.step(guided, i, x);
        assertClose(x, steps[i]!, atol, `${c.id} step_latents[${i}]`);
      }
    });
  }
});

describe('DPM-Solver++ 2M with diffusers 0.26.3 final_sigmas_type "zero" (the multi-LoRA strategy runs)', () => {
  // Every strategy/* case ran DPMSolverMultistepScheduler 0.26.3 (σ after the last step is 0, the last
  // step first order) and stores the eps passed to each scheduler.step (`guided_noise_pred`), so the
  // scheduler alone can be replayed from `latents_init` with the case's own scheduler_config.
  interface StrategyCase extends RefCase {
    scheduler: string;
    scheduler_config: unknown;
    num_inference_steps: number;
    timesteps: number[];
    sigmas: number[];
  }
  const cases = refCases('strategy') as StrategyCase[];
  const file = openSafetensors(path.join(REF, 'strategies.safetensors'));

  test('there are strategy cases, all on DPMSolverMultistepScheduler with final_sigmas_type "zero"', () => {
    assert.ok(cases.length >= 10, `${cases.length} strategy cases`);
    for (const c of cases) {
      assert.equal(CLASS_KIND[c.scheduler], 'dpmpp_2m', c.id);
      assert.equal(parseSchedulerConfig(c.scheduler_config, c.id).finalSigmasType, 'zero', c.id);
    }
  });

  for (const c of cases) {
    test(c.id, () => {
      const scheduler = createScheduler(CLASS_KIND[c.scheduler]!, parseSchedulerConfig(c.scheduler_config, c.id), c.num_inference_steps);
      assert.deepEqual(scheduler.timesteps, c.timesteps, `${c.id} timesteps`);
      assert.equal(scheduler.sigmas!.length, c.sigmas.length, `${c.id}: number of sigmas`);
      c.sigmas.forEach((s, i) => assert.ok(Math.abs(scheduler.sigmas![i]! - s) <= SIGMA_RTOL * Math.abs(s), `${c.id} sigma[${i}] = ${scheduler.sigmas![i]}, expected ${s}`));
      assert.equal(scheduler.sigmas![c.num_inference_steps], 0, 'the last step lands on σ = 0');

      const eps = rows(file, c.outputs['guided_noise_pred']!.key);
      const steps = rows(file, c.outputs['step_latents']!.key);
      assert.equal(eps.length, c.num_inference_steps);
      let x: Float32Array = scale(file.readFloat32(c.inputs['latents_init']!.key).data, scheduler.initNoiseSigma);
      for (let i = 0; i < eps.length; i++) {
        scheduler.scaleModelInput(x, i);
        x = scheduler.step(eps[i]!, i, x);
        assertClose(x, steps[i]!, c.tolerance['step_latents_atol']!, `${c.id} step_latents[${i}]`);
      }
      assertClose(x, file.readFloat32(c.outputs['final_latents']!.key).data, c.tolerance['final_latents_atol']!, `${c.id} final_latents`);
    });
  }
});

// ---------------------------------------------------------------------------------------------
// Closed forms for what the fixtures do not cover. ᾱ is recomputed here in float64, independently of
// pipelines/schedulers/schedule.ts (which rounds to float32 like torch), so tolerances are ~1e-5.

const T = 1000;
const CLOSED_FORM_ATOL = 2e-5;

/** SD 1.5 ᾱ_t in float64: β = linspace(√0.00085, √0.012, T)², ᾱ = cumprod(1 − β). */
function alphaBarF64(): number[] {
  const a = Math.sqrt(0.00085);
  const b = Math.sqrt(0.012);
  let p = 1;
  return Array.from({ length: T }, (_, i) => {
    const s = a + ((b - a) * i) / (T - 1);
    p *= 1 - s * s;
    return p;
  });
}

/** Deterministic pseudo-normal values (LCG + Box–Muller), so the tests need no fixture. */
function pseudoNormal(n: number, seed: number): Float32Array {
  let state = seed >>> 0;
  const uniform = (): number => {
    state = (Math.imul(state, 1664525) + 1013904223) >>> 0;
    return (state + 1) / 4294967297;
  };
  return Float32Array.from({ length: n }, () => Math.sqrt(-2 * Math.log(uniform())) * Math.cos(2 * Math.PI * uniform()));
}

function configWith(overrides: Record<string, unknown>): SchedulerConfig {
  return parseSchedulerConfig({ ...JSON.parse(fs.readFileSync(SD15_CONFIG_FILE, 'utf-8')), ...overrides }, 'test config');
}

const ELEMENTS = 64;

describe('closed forms: DDIM', () => {
  const alphaBar = alphaBarF64();

  test('v-prediction with trailing spacing: every step equals x_{t−Δ} = √ᾱ′·x̂₀ + √(1−ᾱ′)·ε̂', () => {
    const steps = 10;
    const scheduler = createScheduler('ddim', configWith({ prediction_type: 'v_prediction', timestep_spacing: 'trailing' }), steps);
    // trailing: round(T − k·T/N) − 1
    assert.deepEqual(scheduler.timesteps, [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]);
    assert.equal(scheduler.initNoiseSigma, 1);
    let x = pseudoNormal(ELEMENTS, 1);
    for (let i = 0; i < steps; i++) {
      const v = pseudoNormal(ELEMENTS, 100 + i);
      const t = scheduler.timesteps[i]!;
      const a = alphaBar[t]!;
      // prev = t − T/N; below 0 the final ᾱ is ᾱ_0 (set_alpha_to_one = false).
      const aPrev = t - T / steps >= 0 ? alphaBar[t - T / steps]! : alphaBar[0]!;
      const expected = x.map((xj, j) => {
        const x0 = Math.sqrt(a) * xj - Math.sqrt(1 - a) * v[j]!;
        const eps = Math.sqrt(a) * v[j]! + Math.sqrt(1 - a) * xj;
        return Math.sqrt(aPrev) * x0 + Math.sqrt(1 - aPrev) * eps;
      });
      assertClose(scheduler.scaleModelInput(x, i), x, 0, `identity model input ${i}`);
      const got = scheduler.step(v, i, x);
      assertClose(got, expected, CLOSED_FORM_ATOL, `ddim v-pred step ${i}`);
      x = got;
    }
  });

  test('eta > 0 adds σ_t(η)·z with σ_t(η) = η·√((1−ᾱ′)/(1−ᾱ))·√(1 − ᾱ/ᾱ′) and shrinks the direction term', () => {
    const eta = 0.7;
    const scheduler = createScheduler('ddim', SD15_CONFIG, 20, { eta });
    assert.equal(scheduler.needsNoise, true);
    const x = pseudoNormal(ELEMENTS, 2);
    const eps = pseudoNormal(ELEMENTS, 3);
    const z = pseudoNormal(ELEMENTS, 4);
    const t = scheduler.timesteps[0]!;
    assert.equal(t, 951);
    const a = alphaBar[t]!;
    const aPrev = alphaBar[t - 50]!;
    const std = eta * Math.sqrt((1 - aPrev) / (1 - a)) * Math.sqrt(1 - a / aPrev);
    const expected = x.map((xj, j) => {
      const x0 = (xj - Math.sqrt(1 - a) * eps[j]!) / Math.sqrt(a);
      return Math.sqrt(aPrev) * x0 + Math.sqrt(1 - aPrev - std * std) * eps[j]! + std * z[j]!;
    });
    assert.throws(() => scheduler.step(eps, 0, x), /needs a fresh N\(0, 1\) noise/);
    assertClose(createScheduler('ddim', SD15_CONFIG, 20, { eta }).step(eps, 0, x, z), expected, CLOSED_FORM_ATOL, 'ddim eta step');
  });
});

describe('closed forms: Euler', () => {
  const alphaBar = alphaBarF64();
  const sigmaAt = (t: number): number => Math.sqrt((1 - alphaBar[t]!) / alphaBar[t]!);

  test('v-prediction with trailing spacing: σ grid, init σ, input scaling and every step', () => {
    const steps = 10;
    const scheduler = createScheduler('euler', configWith({ prediction_type: 'v_prediction', timestep_spacing: 'trailing' }), steps);
    const timesteps = [999, 899, 799, 699, 599, 499, 399, 299, 199, 99];
    assert.deepEqual(scheduler.timesteps, timesteps);
    const sigmas = [...timesteps.map(sigmaAt), 0];
    assertClose(scheduler.sigmas!, sigmas, 1e-5 * sigmas[0]!, 'euler trailing sigmas');
    // linspace/trailing: init σ is σ_max itself.
    assert.ok(Math.abs(scheduler.initNoiseSigma - sigmas[0]!) < 1e-4, `init sigma ${scheduler.initNoiseSigma}`);
    let x = pseudoNormal(ELEMENTS, 5).map((v) => v * sigmas[0]!);
    for (let i = 0; i < steps; i++) {
      const s = sigmas[i]!;
      const v = pseudoNormal(ELEMENTS, 200 + i);
      assertClose(scheduler.scaleModelInput(x, i), x.map((xj) => xj / Math.sqrt(s * s + 1)), 1e-5, `euler scaled input ${i}`);
      const expected = x.map((xj, j) => {
        const x0 = v[j]! * (-s / Math.sqrt(s * s + 1)) + xj / (s * s + 1);
        return xj + ((xj - x0) / s) * (sigmas[i + 1]! - s);
      });
      const got = scheduler.step(v, i, x);
      assertClose(got, expected, 1e-4, `euler v-pred step ${i}`);
      x = got;
    }
  });

  test('leading spacing: timesteps k·⌊T/N⌋ + offset and init σ = √(σ_max² + 1)', () => {
    const scheduler = createScheduler('euler', configWith({ timestep_spacing: 'leading' }), 10);
    assert.deepEqual(scheduler.timesteps, [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]);
    const sMax = sigmaAt(901);
    assert.ok(Math.abs(scheduler.initNoiseSigma - Math.sqrt(sMax * sMax + 1)) < 1e-4, `init sigma ${scheduler.initNoiseSigma}`);
  });

  test('Karras σ (Karras et al. Eq. 5, ρ = 7) from σ(t=999) to σ(t=0), then 0; Heun and Euler a share the grid', () => {
    const n = 12;
    const euler = createScheduler('euler', SD15_CONFIG, n, { karrasSigmas: true });
    const sMax = sigmaAt(999);
    const sMin = sigmaAt(0);
    const expected = Array.from({ length: n }, (_, i) => (sMax ** (1 / 7) + (i / (n - 1)) * (sMin ** (1 / 7) - sMax ** (1 / 7))) ** 7);
    assertClose(euler.sigmas!, [...expected, 0], 1e-5 * sMax, 'karras sigmas');
    assert.ok(Math.abs(euler.timesteps[0]! - 999) < 1e-3 && Math.abs(euler.timesteps[n - 1]!) < 1e-3, `karras timesteps ends ${euler.timesteps[0]}, ${euler.timesteps[n - 1]}`);
    for (let i = 1; i < n; i++) assert.ok(euler.timesteps[i]! < euler.timesteps[i - 1]!, 'timesteps decrease');
    const heun = createScheduler('heun', SD15_CONFIG, n, { karrasSigmas: true });
    assert.equal(heun.timesteps.length, 2 * n - 1);
    // Heun: [σ_0, σ_1, σ_1, …, σ_{n−1}, σ_{n−1}, 0].
    assert.deepEqual(heun.sigmas!.filter((_, i) => i === 0 || i % 2 === 1), euler.sigmas);
    assert.deepEqual(createScheduler('euler_ancestral', SD15_CONFIG, n, { karrasSigmas: true }).sigmas, euler.sigmas);
    assert.deepEqual(createScheduler('lms', SD15_CONFIG, n, { karrasSigmas: true }).sigmas, euler.sigmas);
  });
});

describe('closed forms: Heun and DPM-Solver++ with v-prediction', () => {
  const vConfig = (): SchedulerConfig => configWith({ prediction_type: 'v_prediction' });
  /** D(x; σ) for a v-prediction on the VE sample x. */
  const denoisedV = (x: number, v: number, s: number): number => v * (-s / Math.sqrt(s * s + 1)) + x / (s * s + 1);

  test('Heun: Euler predictor at σ_i, then the mean slope with D evaluated at σ_{i+1} (Karras Algorithm 1)', () => {
    const scheduler = createScheduler('heun', vConfig(), 5);
    const [s0, s1] = [scheduler.sigmas![0]!, scheduler.sigmas![1]!];
    assert.equal(scheduler.sigmas![2], s1);
    const x = pseudoNormal(ELEMENTS, 10).map((v) => v * s0);
    const [v0, v1] = [pseudoNormal(ELEMENTS, 11), pseudoNormal(ELEMENTS, 12)];
    const d0 = x.map((xj, j) => (xj - denoisedV(xj, v0[j]!, s0)) / s0);
    const xTilde = x.map((xj, j) => xj + d0[j]! * (s1 - s0));
    const got0 = scheduler.step(v0, 0, x);
    assertClose(got0, xTilde, 1e-4, 'heun first evaluation');
    assertClose(scheduler.scaleModelInput(got0, 1), got0.map((v) => v / Math.sqrt(s1 * s1 + 1)), 1e-5, 'heun second model input');
    const expected = x.map((xj, j) => {
      const d1 = (got0[j]! - denoisedV(got0[j]!, v1[j]!, s1)) / s1;
      return xj + ((d0[j]! + d1) / 2) * (s1 - s0);
    });
    assertClose(scheduler.step(v1, 1, got0), expected, 1e-4, 'heun second evaluation');
  });

  test('DPM-Solver++: first step x_t = (σ_t/σ_s)·x − α_t(e^{−h} − 1)·(α_s x − σ_s v), second uses D1 = (m0 − m1)/r', () => {
    const scheduler = createScheduler('dpmpp_2m', vConfig(), 10);
    const vp = (sigma: number): { a: number; s: number; lambda: number } => {
      const a = 1 / Math.sqrt(sigma * sigma + 1);
      return { a, s: sigma * a, lambda: Math.log(a / (sigma * a)) };
    };
    const [p0, p1, p2] = [0, 1, 2].map((i) => vp(scheduler.sigmas![i]!)) as [ReturnType<typeof vp>, ReturnType<typeof vp>, ReturnType<typeof vp>];
    const x = pseudoNormal(ELEMENTS, 13);
    const [v0, v1] = [pseudoNormal(ELEMENTS, 14), pseudoNormal(ELEMENTS, 15)];
    const m0 = x.map((xj, j) => p0.a * xj - p0.s * v0[j]!);
    const h1 = p1.lambda - p0.lambda;
    const x1 = x.map((xj, j) => (p1.s / p0.s) * xj - p1.a * (Math.exp(-h1) - 1) * m0[j]!);
    const got1 = scheduler.step(v0, 0, x);
    assertClose(got1, x1, CLOSED_FORM_ATOL, 'dpm++ first step');
    const m1 = got1.map((xj, j) => p1.a * xj - p1.s * v1[j]!);
    const h2 = p2.lambda - p1.lambda;
    const r = h1 / h2;
    const x2 = got1.map((xj, j) => (p2.s / p1.s) * xj - p2.a * (Math.exp(-h2) - 1) * (m1[j]! + (m1[j]! - m0[j]!) / (2 * r)));
    assertClose(scheduler.step(v1, 1, got1), x2, CLOSED_FORM_ATOL, 'dpm++ second step');
  });
});

describe('closed forms: how the multistep solvers end (lower_order_final, euler_at_final, final_sigmas_type)', () => {
  const alphaBar = alphaBarF64();
  /** VP scales at integer timestep t, from the float64 ᾱ (independent of schedule.ts). */
  const vpAt = (t: number): { a: number; s: number } => ({ a: Math.sqrt(alphaBar[t]!), s: Math.sqrt(1 - alphaBar[t]!) });
  /** Runs every step on fixed pseudo-random model outputs; returns the sample after each step. */
  const run = (scheduler: Scheduler, seed: number): Float32Array[] => {
    let x: Float32Array = pseudoNormal(ELEMENTS, seed);
    const out: Float32Array[] = [];
    for (let i = 0; i < scheduler.timesteps.length; i++) {
      scheduler.scaleModelInput(x, i);
      x = scheduler.step(pseudoNormal(ELEMENTS, seed * 100 + i), i, x);
      out.push(x);
    }
    return out;
  };
  /** First-order DPM-Solver++ step from σ_s to σ_t (Lu et al. 2022, DPM-Solver++(1)). */
  const firstOrder = (sigmaS: number, sigmaT: number, x: Float32Array, m0: Float32Array): Float32Array => {
    const [aS, sS] = [1 / Math.sqrt(sigmaS * sigmaS + 1), sigmaS / Math.sqrt(sigmaS * sigmaS + 1)];
    const [aT, sT] = [1 / Math.sqrt(sigmaT * sigmaT + 1), sigmaT / Math.sqrt(sigmaT * sigmaT + 1)];
    const h = Math.log(aT / sT) - Math.log(aS / sS);
    return x.map((xj, j) => (sT / sS) * xj - aT * (Math.exp(-h) - 1) * m0[j]!);
  };

  for (const [steps, karras, prediction] of [
    [10, false, 'epsilon'],
    [20, false, 'epsilon'],
    [20, true, 'epsilon'],
    [10, false, 'v_prediction'],
  ] as const) {
    test(`final_sigmas_type "zero", ${steps} steps${karras ? ', Karras σ' : ''}, ${prediction}: the run ends on the last step's x̂₀`, () => {
      const zero = createScheduler('dpmpp_2m', configWith({ final_sigmas_type: 'zero', prediction_type: prediction }), steps, { karrasSigmas: karras });
      const legacy = createScheduler('dpmpp_2m', configWith({ prediction_type: prediction }), steps, { karrasSigmas: karras });
      assert.equal(zero.sigmas![steps], 0);
      assert.deepEqual(zero.sigmas!.slice(0, steps), legacy.sigmas!.slice(0, steps), 'only the last σ changes');
      assert.deepEqual(zero.timesteps, legacy.timesteps);
      const seed = 30 + steps + (karras ? 1 : 0);
      const got = run(zero, seed);
      // Every step but the last is the 0.24 step.
      assert.deepEqual(got.slice(0, -1), run(legacy, seed).slice(0, -1));
      // The last: x̂₀ at the last timestep, ε: (x − σ_t ε)/α_t; v: α_t x − σ_t v.
      const x = got[steps - 2]!;
      const m = pseudoNormal(ELEMENTS, seed * 100 + steps - 1);
      const t = zero.timesteps[steps - 1]!;
      const { a, s } = karras
        ? { a: 1 / Math.sqrt(zero.sigmas![steps - 1]! ** 2 + 1), s: zero.sigmas![steps - 1]! / Math.sqrt(zero.sigmas![steps - 1]! ** 2 + 1) }
        : vpAt(t);
      const x0 = x.map((xj, j) => (prediction === 'epsilon' ? (xj - s * m[j]!) / a : a * xj - s * m[j]!));
      assertClose(got[steps - 1]!, x0, CLOSED_FORM_ATOL, 'final = x̂₀ of the last step');
    });
  }

  test('final_sigmas_type "sigma_min" ends on σ(t=0), also with Karras σ; without Karras it is the 0.24 grid', () => {
    const sigma0 = Math.sqrt((1 - alphaBar[0]!) / alphaBar[0]!);
    const plain = createScheduler('dpmpp_2m', configWith({ final_sigmas_type: 'sigma_min' }), 10);
    assert.deepEqual(plain.sigmas, createScheduler('dpmpp_2m', SD15_CONFIG, 10).sigmas);
    assert.ok(Math.abs(plain.sigmas![10]! - sigma0) < 1e-6, `σ_N = ${plain.sigmas![10]}`);
    const karras = createScheduler('dpmpp_2m', configWith({ final_sigmas_type: 'sigma_min' }), 20, { karrasSigmas: true });
    const legacyKarras = createScheduler('dpmpp_2m', SD15_CONFIG, 20, { karrasSigmas: true });
    assert.deepEqual(karras.sigmas!.slice(0, 20), legacyKarras.sigmas!.slice(0, 20));
    assert.equal(karras.sigmas![20], plain.sigmas![10], 'σ(t=0) appended');
    // 0.24's Karras grid repeats σ_min (Karras Eq. 5 at i = N−1, which is σ(t=0) up to rounding).
    assert.equal(legacyKarras.sigmas![20], legacyKarras.sigmas![19]);
  });

  test('euler_at_final: the last step is first order at any step count (20 steps)', () => {
    const euler = createScheduler('dpmpp_2m', configWith({ euler_at_final: true }), 20);
    const seed = 40;
    const got = run(euler, seed);
    const legacy = run(createScheduler('dpmpp_2m', SD15_CONFIG, 20), seed);
    assert.deepEqual(got.slice(0, -1), legacy.slice(0, -1));
    const [sS, sT] = [euler.sigmas![19]!, euler.sigmas![20]!];
    const x = got[18]!;
    const { a, s } = vpAt(euler.timesteps[19]!);
    const m0 = x.map((xj, j) => (xj - s * pseudoNormal(ELEMENTS, seed * 100 + 19)[j]!) / a);
    assertClose(got[19]!, firstOrder(sS, sT, x, m0), CLOSED_FORM_ATOL, 'first-order last step');
    assert.ok(Math.abs(got[19]![0]! - legacy[19]![0]!) > 1e-6, '0.24 default (20 ≥ 15 steps) uses second order there');
  });

  test('lower_order_final = false: below 15 steps the last step stays second order; "zero" still makes it first order', () => {
    const seed = 50;
    const second = createScheduler('dpmpp_2m', configWith({ lower_order_final: false }), 10);
    const got = run(second, seed);
    const legacy = run(createScheduler('dpmpp_2m', SD15_CONFIG, 10), seed);
    assert.deepEqual(got.slice(0, -1), legacy.slice(0, -1));
    // Second order (midpoint): x_t = (σ_t/σ_s)x − α_t(e^{−h} − 1)(m0 + (m0 − m1)/(2r)).
    const sig = second.sigmas!;
    const vp = (sigma: number): { a: number; s: number; lambda: number } => {
      const a = 1 / Math.sqrt(sigma * sigma + 1);
      return { a, s: sigma * a, lambda: Math.log(1 / sigma) };
    };
    const [p0, p1, p2] = [vp(sig[8]!), vp(sig[9]!), vp(sig[10]!)];
    const [x8, x9] = [got[7]!, got[8]!];
    const m1 = x8.map((xj, j) => (xj - p0.s * pseudoNormal(ELEMENTS, seed * 100 + 8)[j]!) / p0.a);
    const m0 = x9.map((xj, j) => (xj - p1.s * pseudoNormal(ELEMENTS, seed * 100 + 9)[j]!) / p1.a);
    const h = p2.lambda - p1.lambda;
    const r = (p1.lambda - p0.lambda) / h;
    const expected = x9.map((xj, j) => (p2.s / p1.s) * xj - p2.a * (Math.exp(-h) - 1) * (m0[j]! + (m0[j]! - m1[j]!) / (2 * r)));
    assertClose(got[9]!, expected, CLOSED_FORM_ATOL, 'second-order last step');
    // With "zero" the last step is first order whatever lower_order_final says (diffusers 0.26.3).
    const zero = run(createScheduler('dpmpp_2m', configWith({ lower_order_final: false, final_sigmas_type: 'zero' }), 10), seed);
    assertClose(zero[9]!, m0, CLOSED_FORM_ATOL, '"zero" ends on x̂₀');
  });

  test('the keys a DPMSolverMultistepScheduler config carries at their defaults change nothing', () => {
    const saved = configWith({
      _class_name: 'DPMSolverMultistepScheduler',
      algorithm_type: 'dpmsolver++',
      solver_order: 2,
      solver_type: 'midpoint',
      lower_order_final: true,
      euler_at_final: false,
      use_lu_lambdas: false,
      lambda_min_clipped: '-inf',
      variance_type: null,
      thresholding: false,
      dynamic_thresholding_ratio: 0.995,
      sample_max_value: 1,
    });
    for (const steps of [10, 20]) {
      const a = createScheduler('dpmpp_2m', saved, steps);
      const b = createScheduler('dpmpp_2m', SD15_CONFIG, steps);
      assert.deepEqual([a.timesteps, a.sigmas], [b.timesteps, b.sigmas]);
      assert.deepEqual(run(a, 60 + steps), run(b, 60 + steps), `${steps} steps`);
    }
  });

  test('UniPC: lower_order_final = false changes only the last step; final_sigmas_type "sigma_min" changes nothing', () => {
    const seed = 70;
    const legacy = run(createScheduler('unipc', SD15_CONFIG, 10), seed);
    const second = run(createScheduler('unipc', configWith({ lower_order_final: false }), 10), seed);
    assert.deepEqual(second.slice(0, -1), legacy.slice(0, -1));
    assert.ok(Math.abs(second[9]![0]! - legacy[9]![0]!) > 1e-6, 'the last step is second order');
    assert.deepEqual(run(createScheduler('unipc', configWith({ final_sigmas_type: 'sigma_min' }), 10), seed), legacy);
    assert.deepEqual(run(createScheduler('unipc', configWith({ lower_order_final: true }), 10), seed), legacy);
  });
});

describe('noise schedule', () => {
  test('trained_betas equal to the scaled_linear betas give the same grid', () => {
    const betas = betasFor(resolveSchedulerConfig('euler', SD15_CONFIG));
    const viaTrained = createScheduler('euler', configWith({ trained_betas: Array.from(betas) }), 20);
    assert.deepEqual(viaTrained.sigmas, createScheduler('euler', SD15_CONFIG, 20).sigmas);
  });

  test('squaredcos_cap_v2: ᾱ_t = f((t+1)/T)/f(0), f(u) = cos²((u + s)/(1 + s)·π/2) (Nichol & Dhariwal Eq. 17)', () => {
    const ac = alphasCumprodFor(betasFor(resolveSchedulerConfig('ddim', parseSchedulerConfig({ beta_schedule: 'squaredcos_cap_v2' }))));
    const f = (u: number): number => Math.cos(((u + 0.008) / 1.008) * (Math.PI / 2)) ** 2;
    // β is capped at 0.999 near t = T − 1 only; check below that.
    for (const t of [0, 100, 500, 900, 980]) assert.ok(Math.abs(ac[t]! - f((t + 1) / T) / f(0)) < 1e-5, `ᾱ_${t} = ${ac[t]}`);
  });

  test('σ at integer timesteps equals the fixtures bit for bit (torch float32 linspace, double-accumulated cumprod)', () => {
    for (const c of refCases('scheduler') as SchedulerCase[]) {
      if (c.class !== 'DPMSolverMultistepScheduler' || c.config_overrides['use_karras_sigmas'] === true) continue;
      const scheduler = schedulerFor(c);
      assert.deepEqual(scheduler.sigmas, c.sigmas, c.id);
    }
  });
});

describe('call order', () => {
  test('steps must come as 0, 1, 2, … and stop at the last evaluation', () => {
    const x = pseudoNormal(ELEMENTS, 6);
    const scheduler = createScheduler('dpmpp_2m', SD15_CONFIG, 2);
    assert.throws(() => scheduler.step(x, 1, x), /out of order: expected step index 0/);
    assert.throws(() => scheduler.scaleModelInput(x, 1), /out of order/);
    scheduler.scaleModelInput(x, 0);
    scheduler.step(x, 0, x);
    assert.throws(() => scheduler.step(x, 0, x), /out of order: expected step index 1/);
    scheduler.step(x, 1, x);
    assert.throws(() => scheduler.step(x, 2, x), /all 2 evaluations are done/);
  });

  test('noise is required exactly when needsNoise, with the sample\'s length', () => {
    const x = pseudoNormal(ELEMENTS, 7);
    assert.throws(() => createScheduler('euler_ancestral', SD15_CONFIG, 5).step(x, 0, x), /needs a fresh N\(0, 1\) noise/);
    assert.throws(() => createScheduler('euler_ancestral', SD15_CONFIG, 5).step(x, 0, x, x.subarray(1)), /noise has 63 values/);
    assert.throws(() => createScheduler('euler', SD15_CONFIG, 5).step(x, 0, x, x), /deterministic/);
    assert.throws(() => createScheduler('euler', SD15_CONFIG, 5).step(x.subarray(2), 0, x), /model output has 62 values/);
  });

  test('step returns a new array and leaves its inputs alone', () => {
    for (const kind of ['ddim', 'pndm', 'lms', 'euler', 'heun', 'dpmpp_2m', 'unipc'] as const) {
      const x = pseudoNormal(ELEMENTS, 8);
      const m = pseudoNormal(ELEMENTS, 9);
      const [xCopy, mCopy] = [x.slice(), m.slice()];
      const scheduler = createScheduler(kind, SD15_CONFIG, 5);
      const scaled = scheduler.scaleModelInput(x, 0);
      const out = scheduler.step(m, 0, x);
      assert.ok(out !== x && scaled !== x, kind);
      assert.deepEqual([x, m], [xCopy, mCopy], kind);
    }
  });
});

describe('scheduler config', () => {
  test('class defaults apply to absent keys (diffusers 0.24 signatures)', () => {
    const empty = parseSchedulerConfig({});
    const ddim = resolveSchedulerConfig('ddim', empty);
    assert.deepEqual(
      [ddim.betaStart, ddim.betaEnd, ddim.betaSchedule, ddim.timestepSpacing, ddim.setAlphaToOne, ddim.clipSample, ddim.stepsOffset, ddim.predictionType],
      [0.0001, 0.02, 'linear', 'leading', true, true, 0, 'epsilon'],
    );
    assert.equal(resolveSchedulerConfig('pndm', empty).setAlphaToOne, false);
    const heun = resolveSchedulerConfig('heun', empty);
    assert.deepEqual([heun.betaStart, heun.betaEnd, heun.betaSchedule, heun.timestepSpacing], [0.00085, 0.012, 'linear', 'linspace']);
    for (const kind of ['lms', 'euler', 'euler_ancestral', 'dpmpp_2m', 'unipc'] as const) assert.equal(resolveSchedulerConfig(kind, empty).timestepSpacing, 'linspace', kind);
    // A key in the file overrides every class's default, as from_config does.
    assert.equal(resolveSchedulerConfig('euler', configWith({ timestep_spacing: 'leading' })).timestepSpacing, 'leading');
    // use_karras_sigmas in the file is the default when the caller does not choose.
    const karrasConfig = configWith({ use_karras_sigmas: true });
    assert.deepEqual(createScheduler('dpmpp_2m', karrasConfig, 20).sigmas, createScheduler('dpmpp_2m', SD15_CONFIG, 20, { karrasSigmas: true }).sigmas);
    assert.deepEqual(createScheduler('dpmpp_2m', karrasConfig, 20, { karrasSigmas: false }).sigmas, createScheduler('dpmpp_2m', SD15_CONFIG, 20).sigmas);
    // How the multistep solvers end: 0.24 defaults (no final_sigmas_type → 0.24's final σ).
    const dpm = resolveSchedulerConfig('dpmpp_2m', empty);
    assert.deepEqual([dpm.lowerOrderFinal, dpm.eulerAtFinal, dpm.finalSigmasType], [true, false, null]);
    const saved = configWith({ lower_order_final: false, euler_at_final: true, final_sigmas_type: 'zero' });
    const dpmSaved = resolveSchedulerConfig('dpmpp_2m', saved);
    assert.deepEqual([dpmSaved.lowerOrderFinal, dpmSaved.eulerAtFinal, dpmSaved.finalSigmasType], [false, true, 'zero']);
    // UniPC reads lower_order_final only; the other classes read none of the three.
    const unipc = resolveSchedulerConfig('unipc', configWith({ lower_order_final: false, euler_at_final: true }));
    assert.deepEqual([unipc.lowerOrderFinal, unipc.eulerAtFinal, unipc.finalSigmasType], [false, false, null]);
    const euler = resolveSchedulerConfig('euler', saved);
    assert.deepEqual([euler.lowerOrderFinal, euler.eulerAtFinal, euler.finalSigmasType], [true, false, null]);
  });

  test('an SD 2.1 (v-prediction DDIM) config loads', () => {
    const sd21 = parseSchedulerConfig({
      _class_name: 'DDIMScheduler',
      _diffusers_version: '0.8.0',
      beta_end: 0.012,
      beta_schedule: 'scaled_linear',
      beta_start: 0.00085,
      clip_sample: false,
      num_train_timesteps: 1000,
      prediction_type: 'v_prediction',
      set_alpha_to_one: false,
      skip_prk_steps: true,
      steps_offset: 1,
      trained_betas: null,
    });
    assert.equal(resolveSchedulerConfig('euler', sd21).predictionType, 'v_prediction');
    assert.equal(createScheduler('unipc', sd21, 25).timesteps.length, 25);
  });

  describe('rejects …', () => {
    const cases: [string, unknown, string, SchedulerKind?][] = [
      ['an unknown prediction_type', { prediction_type: 'x0' }, 'prediction_type'],
      ['an unknown beta_schedule', { beta_schedule: 'cosine' }, 'beta_schedule'],
      ['an unknown timestep_spacing', { timestep_spacing: 'middle' }, 'timestep_spacing'],
      ['a negative steps_offset', { steps_offset: -1 }, 'steps_offset'],
      ['a fractional num_train_timesteps', { num_train_timesteps: 999.5 }, 'num_train_timesteps'],
      ['a string for set_alpha_to_one', { set_alpha_to_one: 'no' }, 'set_alpha_to_one'],
      ['beta_start outside (0, 1)', { beta_start: 0 }, 'beta_start'],
      ['trained_betas of the wrong length', { trained_betas: [0.1, 0.2, 0.3] }, 'trained_betas', 'euler'],
      ['thresholding for DDIM', { thresholding: true }, 'thresholding', 'ddim'],
      ['zero-SNR rescaling for DDIM', { rescale_betas_zero_snr: true }, 'rescale_betas_zero_snr', 'ddim'],
      ['sample prediction for PNDM', { prediction_type: 'sample' }, 'prediction_type', 'pndm'],
      ['sample prediction for Euler a', { prediction_type: 'sample' }, 'prediction_type', 'euler_ancestral'],
      ['an unknown final_sigmas_type', { final_sigmas_type: 'denoise_to_zero' }, 'final_sigmas_type', 'dpmpp_2m'],
      ['a null final_sigmas_type (diffusers raises on it)', { final_sigmas_type: null }, 'final_sigmas_type', 'dpmpp_2m'],
      ['final_sigmas_type "zero" for UniPC (not in diffusers 0.26.3\'s UniPC)', { final_sigmas_type: 'zero' }, 'final_sigmas_type', 'unipc'],
      ['a string for lower_order_final', { lower_order_final: 'true' }, 'lower_order_final', 'dpmpp_2m'],
      ['a number for euler_at_final', { euler_at_final: 1 }, 'euler_at_final', 'dpmpp_2m'],
      ['λ clipping for DPM-Solver++', { lambda_min_clipped: -5.1 }, 'lambda_min_clipped', 'dpmpp_2m'],
      ['a non-numeric lambda_min_clipped string for DPM-Solver++', { lambda_min_clipped: 'inf' }, 'lambda_min_clipped', 'dpmpp_2m'],
    ];
    for (const [what, overrides, key, kind] of cases) {
      test(what, () => {
        assert.throws(
          () => createScheduler(kind ?? 'euler', configWith(overrides as Record<string, unknown>), 20),
          (e: unknown) => e instanceof PipelineError && e.code === 'BAD_SCHEDULER_CONFIG' && e.message.includes(`\`${key}\``) && e.details['key'] === key,
        );
      });
    }

    test('a config that is not an object', () => {
      assert.throws(() => parseSchedulerConfig([1, 2], 'x.json'), (e: unknown) => e instanceof PipelineError && e.code === 'BAD_SCHEDULER_CONFIG' && e.message.startsWith('x.json'));
    });

    test('a setting only another class would use is ignored (thresholding for Euler, final_sigmas_type for Euler and DDIM)', () => {
      assert.equal(createScheduler('euler', configWith({ thresholding: true }), 20).timesteps.length, 20);
      assert.deepEqual(createScheduler('euler', configWith({ final_sigmas_type: 'zero' }), 20).sigmas, createScheduler('euler', SD15_CONFIG, 20).sigmas);
      assert.equal(createScheduler('ddim', configWith({ final_sigmas_type: 'zero', euler_at_final: true }), 20).timesteps.length, 20);
    });

    for (const steps of [0, -3, 2.5, Number.NaN, 1001]) {
      test(`steps = ${steps}`, () => {
        assert.throws(() => createScheduler('dpmpp_2m', SD15_CONFIG, steps), (e: unknown) => e instanceof PipelineError && e.code === 'BAD_STEPS' && e.message.includes(`steps is ${steps}`));
      });
    }

    test('Karras σ for DDIM and η for Euler', () => {
      assert.throws(() => createScheduler('ddim', SD15_CONFIG, 20, { karrasSigmas: true }), (e: unknown) => e instanceof PipelineError && e.code === 'BAD_ARGUMENT' && e.message.includes('karrasSigmas'));
      assert.throws(() => createScheduler('euler', SD15_CONFIG, 20, { eta: 0.5 }), (e: unknown) => e instanceof PipelineError && e.code === 'BAD_ARGUMENT' && e.message.includes('eta'));
      assert.throws(() => createScheduler('ddim', SD15_CONFIG, 20, { eta: -1 }), (e: unknown) => e instanceof PipelineError && e.code === 'BAD_ARGUMENT');
    });
  });
});

describe('A1111 / ComfyUI sampler names', () => {
  const table: [string, string | undefined, SchedulerKind, boolean | undefined, string, string][] = [
    // sampler, schedule type → kind, karrasSigmas, infotext sampler, infotext schedule type
    ['Euler a', undefined, 'euler_ancestral', false, 'Euler a', 'Uniform'],
    ['euler A', 'Karras', 'euler_ancestral', true, 'Euler a', 'Karras'],
    ['Euler', 'Automatic', 'euler', false, 'Euler', 'Uniform'],
    ['LMS', 'Uniform', 'lms', false, 'LMS', 'Uniform'],
    ['LMS Karras', undefined, 'lms', true, 'LMS', 'Karras'],
    ['Heun', 'karras', 'heun', true, 'Heun', 'Karras'],
    ['DPM++ 2M', 'Karras', 'dpmpp_2m', true, 'DPM++ 2M', 'Karras'],
    ['DPM++ 2M Karras', undefined, 'dpmpp_2m', true, 'DPM++ 2M', 'Karras'],
    ['dpm++  2m karras', 'Automatic', 'dpmpp_2m', true, 'DPM++ 2M', 'Karras'],
    // A1111 ≥ 1.9: "Automatic" (or no schedule type) is Karras for DPM++ 2M.
    ['DPM++ 2M', undefined, 'dpmpp_2m', true, 'DPM++ 2M', 'Karras'],
    ['DPM++ 2M', 'Uniform', 'dpmpp_2m', false, 'DPM++ 2M', 'Uniform'],
    ['k_dpmpp_2m', undefined, 'dpmpp_2m', true, 'DPM++ 2M', 'Karras'],
    ['DDIM', undefined, 'ddim', undefined, 'DDIM', 'Automatic'],
    ['PLMS', 'Automatic', 'pndm', undefined, 'PLMS', 'Automatic'],
    ['UniPC', undefined, 'unipc', undefined, 'UniPC', 'Automatic'],
    // ComfyUI sampler_name + scheduler.
    ['euler', 'normal', 'euler', false, 'Euler', 'Uniform'],
    ['euler_ancestral', 'karras', 'euler_ancestral', true, 'Euler a', 'Karras'],
    ['dpmpp_2m', 'karras', 'dpmpp_2m', true, 'DPM++ 2M', 'Karras'],
    ['dpmpp_2m', undefined, 'dpmpp_2m', false, 'DPM++ 2M', 'Uniform'],
    ['ddim', 'ddim_uniform', 'ddim', undefined, 'DDIM', 'Automatic'],
    ['uni_pc', 'normal', 'unipc', undefined, 'UniPC', 'Automatic'],
    ['heun', 'normal', 'heun', false, 'Heun', 'Uniform'],
    ['lms', 'karras', 'lms', true, 'LMS', 'Karras'],
  ];
  for (const [sampler, schedule, kind, karras, infoSampler, infoSchedule] of table) {
    test(`"${sampler}" + ${schedule === undefined ? '(none)' : `"${schedule}"`} → ${kind}${karras === true ? ' Karras' : ''}`, () => {
      const choice = resolveSampler(sampler, schedule);
      assert.equal(choice.kind, kind);
      assert.equal(choice.options.karrasSigmas, karras);
      assert.deepEqual(choice.infotext, { sampler: infoSampler, scheduleType: infoSchedule });
      // Every choice is a combination createScheduler implements.
      assert.equal(createScheduler(choice.kind, SD15_CONFIG, 20, choice.options).kind, kind);
    });
  }

  test('the old and new A1111 forms of DPM++ 2M Karras build the same scheduler', () => {
    const oldForm = resolveSampler('DPM++ 2M Karras');
    const newForm = resolveSampler('DPM++ 2M', 'Karras');
    assert.deepEqual(oldForm, newForm);
    assert.deepEqual(createScheduler(oldForm.kind, SD15_CONFIG, 20, oldForm.options).timesteps, (refCases('scheduler') as SchedulerCase[]).find((c) => c.id === 'scheduler/dpmpp_2m_karras/20')!.timesteps);
  });

  describe('rejects …', () => {
    test('an unknown sampler, listing the valid names', () => {
      assert.throws(
        () => resolveSampler('DPM++ SDE'),
        (e: unknown) =>
          e instanceof PipelineError &&
          e.code === 'UNKNOWN_SAMPLER' &&
          e.message.includes('"DPM++ SDE"') &&
          ['Euler a', 'DPM++ 2M', 'UniPC', 'dpmpp_2m', 'uni_pc'].every((n) => e.message.includes(n)) &&
          (e.details['valid'] as string[]).includes('Euler a'),
      );
    });
    test('an unknown schedule type', () => {
      assert.throws(() => resolveSampler('Euler', 'Exponential'), (e: unknown) => e instanceof PipelineError && e.code === 'UNKNOWN_SAMPLER' && e.message.includes('"Exponential"') && e.message.includes('Karras'));
    });
    test('Karras with a timestep sampler (DDIM, PLMS, UniPC)', () => {
      for (const s of ['DDIM', 'PLMS', 'UniPC', 'DDIM Karras']) {
        assert.throws(() => resolveSampler(s, s.endsWith('Karras') ? undefined : 'Karras'), (e: unknown) => e instanceof PipelineError && e.code === 'UNKNOWN_SAMPLER' && e.message.includes('no Karras schedule'), s);
      }
    });
    test('ComfyUI ddim_uniform with another sampler', () => {
      assert.throws(() => resolveSampler('euler', 'ddim_uniform'), (e: unknown) => e instanceof PipelineError && e.code === 'UNKNOWN_SAMPLER' && e.message.includes('ddim_uniform'));
    });
  });
});
