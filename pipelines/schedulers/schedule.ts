/**
 * The training noise schedule and the inference grids built on it, shared by every scheduler.
 *
 * | code              | symbol     | meaning                                                        |
 * |-------------------|------------|----------------------------------------------------------------|
 * | `betas[t]`        | β_t        | per-step noise variance of the forward process, t = 0…T−1      |
 * | `alphasCumprod[t]`| ᾱ_t        | ∏_{s≤t} (1 − β_s); x_t = √ᾱ_t x₀ + √(1−ᾱ_t) ε                  |
 * | `sigmaTable[t]`   | σ_t        | √((1 − ᾱ_t)/ᾱ_t), the VE noise level of x_t/√ᾱ_t (Karras 2022) |
 * | `T`               | T          | `num_train_timesteps` (1000)                                   |
 * | `n`               | N          | inference steps                                                |
 *
 * Numerics follow diffusers 0.24 on torch 1.13 / numpy 1.24 (the fixtures' reference), because the
 * schedulers' outputs are only as close as these tables:
 * - β and ᾱ are float32 tensors. `torch.linspace(…, dtype=float32)` is reproduced bit for bit
 *   (`torchLinspaceFloat32`), and `torch.cumprod` on CPU accumulates in double and rounds each
 *   output to float32. With both, σ_t matches every integer-t σ in the fixtures exactly; a float64
 *   linspace or a float32 running product does not (up to 3e-6 relative off).
 * - Timestep grids use numpy's float64 `linspace`/`arange` and round half to even (`np.round`).
 * - σ at fractional t is `np.interp` over the float32 σ table.
 */
import { PipelineError } from '../errors.ts';
import type { ResolvedSchedulerConfig, TimestepSpacing } from './config.ts';

const f32 = Math.fround;

/** ρ of Karras et al. (2022), Eq. (5); diffusers hard-codes 7. */
export const KARRAS_RHO = 7;

/** `np.round`: half to even. */
export function roundHalfEven(x: number): number {
  const r = Math.round(x);
  return Math.abs(x - Math.trunc(x)) === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

/** `np.linspace(start, stop, num)` in float64: y_i = i·step + start, the last one set to `stop`. */
export function npLinspace(start: number, stop: number, num: number): number[] {
  if (num === 1) return [start];
  const step = (stop - start) / (num - 1);
  const y = Array.from({ length: num }, (_, i) => i * step + start);
  y[num - 1] = stop;
  return y;
}

/**
 * `np.arange(start, stop, step)` for floats: length ⌈(stop − start)/step⌉, y_i = start + i·δ where
 * numpy's fill uses δ = (start + step) − start rather than `step` itself.
 */
export function npArange(start: number, stop: number, step: number): number[] {
  const length = Math.max(0, Math.ceil((stop - start) / step));
  const delta = start + step - start;
  return Array.from({ length }, (_, i) => (i === 0 ? start : start + i * delta));
}

/**
 * `torch.linspace(start, end, steps, dtype=torch.float32)` as torch 1.13's CPU kernel computes it
 * (aten/src/ATen/native/cpu/RangeFactoriesKernel.cpp, AVX2 build): step = (end − start)/(steps − 1) in
 * float; the first half counts up from `start`, the second half down from `end`; blocks of 16 go
 * through the vectorized path (lanes `base + k·step` from a per-8-lane base), the tail through the
 * scalar one; the compiler contracts `a + b·c` into one FMA. `Math.fround(a + b·c)` is that FMA:
 * b·c of two floats is exact in double.
 */
export function torchLinspaceFloat32(start: number, end: number, steps: number): Float32Array {
  const out = new Float32Array(steps);
  const s = f32(start);
  const e = f32(end);
  if (steps === 1) {
    out[0] = s;
    return out;
  }
  const step = f32(f32(e - s) / (steps - 1));
  const halfway = Math.floor(steps / 2);
  const VEC = 8;
  const at = (idx: number): number => (idx < halfway ? f32(s + step * idx) : f32(e - step * (steps - idx - 1)));
  let i = 0;
  for (; i + 2 * VEC <= steps; i += 2 * VEC) {
    for (const lane0 of [i, i + VEC]) {
      const base = at(lane0);
      for (let k = 0; k < VEC; k++) out[lane0 + k] = k === 0 ? base : f32(base + k * step);
    }
  }
  for (; i < steps; i++) out[i] = at(i);
  return out;
}

/** Cosine ᾱ(t) of Nichol & Dhariwal (2021), Eq. (17), with their s = 0.008 and β capped at 0.999. */
function squaredCosineBetas(T: number): Float32Array {
  const MAX_BETA = 0.999;
  const S = 0.008;
  const alphaBar = (t: number): number => Math.cos(((t + S) / (1 + S)) * (Math.PI / 2)) ** 2;
  return Float32Array.from({ length: T }, (_, i) => Math.min(1 - alphaBar((i + 1) / T) / alphaBar(i / T), MAX_BETA));
}

/** β_t as diffusers builds them (float32). */
export function betasFor(config: ResolvedSchedulerConfig): Float32Array {
  const T = config.numTrainTimesteps;
  if (config.trainedBetas !== null) return Float32Array.from(config.trainedBetas);
  switch (config.betaSchedule) {
    case 'linear':
      return torchLinspaceFloat32(config.betaStart, config.betaEnd, T);
    case 'scaled_linear':
      // linspace(√β_start, √β_end)², the schedule Stable Diffusion was trained with.
      return torchLinspaceFloat32(Math.sqrt(config.betaStart), Math.sqrt(config.betaEnd), T).map((b) => f32(b * b));
    case 'squaredcos_cap_v2':
      return squaredCosineBetas(T);
  }
}

/** ᾱ_t = ∏(1 − β_s): float32 factors, double running product, each output rounded (torch CPU cumprod). */
export function alphasCumprodFor(betas: Float32Array): Float32Array {
  const out = new Float32Array(betas.length);
  let product = 1;
  for (let t = 0; t < betas.length; t++) {
    product *= f32(1 - betas[t]!);
    out[t] = product;
  }
  return out;
}

/** σ_t = √((1 − ᾱ_t)/ᾱ_t), each operation in float32 as torch does it. */
export function sigmaTableFor(alphasCumprod: Float32Array): Float32Array {
  return alphasCumprod.map((a) => f32(Math.sqrt(f32(f32(1 - a) / a))));
}

/** `np.log` of the float32 σ table (float32 result). */
export function logSigmaTableFor(sigmaTable: Float32Array): Float32Array {
  return sigmaTable.map((s) => f32(Math.log(s)));
}

/** `np.interp(t, arange(len), table)`: σ at a fractional timestep, linear between neighbours. */
export function interpSigma(t: number, table: Float32Array): number {
  const last = table.length - 1;
  if (t <= 0) return table[0]!;
  if (t >= last) return table[last]!;
  const j = Math.floor(t);
  if (t === j) return table[j]!;
  const slope = table[j + 1]! - table[j]!;
  return slope * (t - j) + table[j]!;
}

/** Karras et al. (2022), Eq. (5): σ_i = (σ_max^{1/ρ} + i/(N−1)·(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ, i = 0…N−1. */
export function karrasSigmas(sigmaMin: number, sigmaMax: number, n: number): number[] {
  const minInvRho = sigmaMin ** (1 / KARRAS_RHO);
  const maxInvRho = sigmaMax ** (1 / KARRAS_RHO);
  return npLinspace(0, 1, n).map((ramp) => (maxInvRho + ramp * (minInvRho - maxInvRho)) ** KARRAS_RHO);
}

/**
 * The fractional timestep whose σ is `sigma`: linear interpolation of log σ between the two
 * neighbouring table entries (diffusers `_sigma_to_t`), clipped to the table.
 */
export function sigmaToTimestep(sigma: number, logSigmaTable: Float32Array): number {
  const logSigma = Math.log(Math.max(sigma, 1e-10));
  // low = the last index with log σ_t ≤ log σ (0 when there is none), at most T − 2.
  let low = 0;
  for (let t = 0; t < logSigmaTable.length; t++) if (logSigma - logSigmaTable[t]! >= 0) low = t;
  low = Math.min(low, logSigmaTable.length - 2);
  const lo = logSigmaTable[low]!;
  const hi = logSigmaTable[low + 1]!;
  const w = Math.min(Math.max((lo - logSigma) / (lo - hi), 0), 1);
  return (1 - w) * low + w * (low + 1);
}

/** Rejects step counts diffusers cannot schedule: `PipelineError('BAD_STEPS')`. */
export function checkSteps(numInferenceSteps: number, numTrainTimesteps: number): void {
  if (!Number.isInteger(numInferenceSteps) || numInferenceSteps < 1 || numInferenceSteps > numTrainTimesteps) {
    throw new PipelineError('BAD_STEPS', `steps is ${numInferenceSteps}; expected a whole number from 1 to ${numTrainTimesteps} (the model's training timesteps).`, {
      steps: numInferenceSteps,
      min: 1,
      max: numTrainTimesteps,
    });
  }
}

/**
 * Descending timesteps for the DDIM/PNDM/Euler-family `set_timesteps` (arXiv 2305.08891, Table 2):
 * - leading: k·⌊T/N⌋ + steps_offset, k = N−1…0;
 * - trailing: round(T − k·T/N) − 1, k = 0…N−1;
 * - linspace: linspace(0, T−1, N) reversed; `roundToInt` rounds it (DDIM, PNDM), otherwise the
 *   fractional values stay (Euler family: float32 or float64 as the class computes them).
 */
export function spacedTimesteps(spacing: TimestepSpacing, T: number, n: number, stepsOffset: number, linspace: 'round' | 'float32' | 'float64'): number[] {
  switch (spacing) {
    case 'leading': {
      const ratio = Math.floor(T / n);
      return Array.from({ length: n }, (_, k) => (n - 1 - k) * ratio + stepsOffset);
    }
    case 'trailing':
      return npArange(T, 0, -T / n).map((t) => roundHalfEven(t) - 1);
    case 'linspace': {
      const grid = npLinspace(0, T - 1, n).reverse();
      if (linspace === 'round') return grid.map(roundHalfEven);
      return linspace === 'float32' ? grid.map(f32) : grid;
    }
  }
}

/**
 * Integer timesteps of the multistep solvers (DPMSolverMultistep, UniPC `set_timesteps`): the same
 * spacings over N+1 points with the last (t = 0 end) dropped; leading uses ⌊T/(N+1)⌋.
 */
export function multistepTimesteps(spacing: TimestepSpacing, T: number, n: number, stepsOffset: number): number[] {
  switch (spacing) {
    case 'leading': {
      const ratio = Math.floor(T / (n + 1));
      return Array.from({ length: n }, (_, k) => (n - k) * ratio + stepsOffset);
    }
    case 'trailing':
      return npArange(T, 0, -T / n).map((t) => roundHalfEven(t) - 1);
    case 'linspace':
      return npLinspace(0, T - 1, n + 1).map(roundHalfEven).reverse().slice(0, n);
  }
}

/** The per-run tables every scheduler starts from. */
export interface NoiseSchedule {
  readonly alphasCumprod: Float32Array;
  readonly sigmaTable: Float32Array;
}

export function noiseScheduleFor(config: ResolvedSchedulerConfig): NoiseSchedule {
  const alphasCumprod = alphasCumprodFor(betasFor(config));
  return { alphasCumprod, sigmaTable: sigmaTableFor(alphasCumprod) };
}

/** Timesteps and σ of one run; `sigmas` has one more entry than `timesteps` (where the last step lands). */
export interface SigmaGrid {
  readonly timesteps: readonly number[];
  /** float32 values, as diffusers stores `self.sigmas`. */
  readonly sigmas: readonly number[];
}

/**
 * LMS, Euler, Euler a and Heun (`set_timesteps` of those classes): σ interpolated at the spaced,
 * possibly fractional timesteps, then 0. With Karras spacing, N σ from σ(t_first) down to σ(t_last)
 * by Eq. (5) of Karras et al. (2022), each mapped back to a fractional timestep, then 0.
 */
export function sigmaGridFor(config: ResolvedSchedulerConfig, schedule: NoiseSchedule, n: number, linspace: 'float32' | 'float64', karras: boolean): SigmaGrid {
  let timesteps = spacedTimesteps(config.timestepSpacing, config.numTrainTimesteps, n, config.stepsOffset, linspace);
  let sigmas = timesteps.map((t) => interpSigma(t, schedule.sigmaTable));
  if (karras) {
    sigmas = karrasSigmas(sigmas[sigmas.length - 1]!, sigmas[0]!, n);
    const logSigmas = logSigmaTableFor(schedule.sigmaTable);
    timesteps = sigmas.map((s) => sigmaToTimestep(s, logSigmas));
  }
  return { timesteps: timesteps.map(f32), sigmas: [...sigmas, 0].map(f32) };
}

/**
 * DPM-Solver++ and UniPC (`set_timesteps` of those classes): integer timesteps and σ at each, then the
 * σ the last step lands on. With Karras spacing, N σ from σ(T−1) down to σ(0) and
 * timesteps = round(t(σ)). The last σ follows `config.finalSigmasType`:
 * - `null` (diffusers 0.24, and UniPC): σ(t = 0); with Karras σ the last σ repeated;
 * - `'sigma_min'` (diffusers 0.26): σ(t = 0), with or without Karras σ;
 * - `'zero'` (diffusers 0.26's default): 0, with or without Karras σ.
 */
export function multistepGridFor(config: ResolvedSchedulerConfig, schedule: NoiseSchedule, n: number, karras: boolean): SigmaGrid {
  const table = schedule.sigmaTable;
  let timesteps: number[];
  let sigmas: number[];
  if (karras) {
    sigmas = karrasSigmas(table[0]!, table[table.length - 1]!, n);
    const logSigmas = logSigmaTableFor(table);
    timesteps = sigmas.map((s) => roundHalfEven(sigmaToTimestep(s, logSigmas)));
  } else {
    timesteps = multistepTimesteps(config.timestepSpacing, config.numTrainTimesteps, n, config.stepsOffset);
    sigmas = timesteps.map((t) => interpSigma(t, table));
  }
  let last: number;
  switch (config.finalSigmasType) {
    case null:
      last = karras ? sigmas[n - 1]! : table[0]!;
      break;
    case 'sigma_min':
      last = table[0]!;
      break;
    case 'zero':
      last = 0;
      break;
  }
  return { timesteps, sigmas: [...sigmas, last].map(f32) };
}

/** Euler-family `init_noise_sigma`: σ_max for linspace/trailing spacing, else √(σ_max² + 1) (float32). */
export function initNoiseSigmaFor(spacing: TimestepSpacing, sigmas: readonly number[]): number {
  const max = Math.max(...sigmas);
  return spacing === 'leading' ? f32(Math.sqrt(f32(f32(max * max) + 1))) : max;
}
