/**
 * DDIM: Song, Meng & Ermon, "Denoising Diffusion Implicit Models" (ICLR 2021, arXiv 2010.02502), as
 * diffusers 0.24 `DDIMScheduler.step` computes it.
 *
 * | code             | paper                  | meaning                                                    |
 * |------------------|------------------------|------------------------------------------------------------|
 * | `alphaProdT`     | α_t (the paper's α is ᾱ)| ᾱ at the current timestep t                               |
 * | `alphaProdPrev`  | α_{t−1}                | ᾱ at t − ⌊T/N⌋, or the final ᾱ (1 or ᾱ_0) below 0          |
 * | `predOriginal`   | "predicted x₀", Eq. (12)| the model's x₀ estimate                                    |
 * | `predEpsilon`    | ε_θ(x_t)               | the model's noise estimate                                 |
 * | `stdDev`         | σ_t(η), Eq. (16)       | η·√((1−α_{t−1})/(1−α_t))·√(1 − α_t/α_{t−1})                 |
 * | `eta`            | η                      | 0: deterministic DDIM; 1: DDPM-like ancestral sampling     |
 *
 * Update, Eq. (12): x_{t−1} = √α_{t−1}·x̂₀ + √(1 − α_{t−1} − σ_t²)·ε̂ + σ_t·z, z ~ N(0, I).
 *
 * Prediction types (v: Salimans & Ho, arXiv 2202.00512, §4): ε → x̂₀ = (x − √(1−α_t)ε)/√α_t;
 * v → x̂₀ = √α_t x − √(1−α_t) v, ε̂ = √α_t v + √(1−α_t) x; sample → x̂₀ = output,
 * ε̂ = (x − √α_t x̂₀)/√(1−α_t). `clip_sample` clamps x̂₀ but keeps ε̂ (diffusers'
 * `use_clipped_model_output=False`).
 *
 * Quirk kept from diffusers: the previous timestep is always t − ⌊T/N⌋, even with `linspace` or
 * `trailing` spacing where the next grid point differs.
 */
import type { ResolvedSchedulerConfig } from './config.ts';
import { noiseScheduleFor, spacedTimesteps } from './schedule.ts';
import { StepOrder } from './step-order.ts';
import type { Scheduler } from './types.ts';

export class DdimScheduler implements Scheduler {
  readonly kind = 'ddim';
  readonly timesteps: readonly number[];
  readonly sigmas = undefined;
  readonly initNoiseSigma = 1;
  readonly needsNoise: boolean;
  readonly #config: ResolvedSchedulerConfig;
  readonly #alphasCumprod: Float32Array;
  /** ᾱ "before" t = 0: 1 with `set_alpha_to_one`, else ᾱ_0. */
  readonly #finalAlphaCumprod: number;
  readonly #stepRatio: number;
  readonly #eta: number;
  readonly #order: StepOrder;

  constructor(config: ResolvedSchedulerConfig, numInferenceSteps: number, eta: number) {
    this.#config = config;
    this.#alphasCumprod = noiseScheduleFor(config).alphasCumprod;
    this.#finalAlphaCumprod = config.setAlphaToOne ? 1 : this.#alphasCumprod[0]!;
    this.#stepRatio = Math.floor(config.numTrainTimesteps / numInferenceSteps);
    this.#eta = eta;
    this.needsNoise = eta > 0;
    this.timesteps = spacedTimesteps(config.timestepSpacing, config.numTrainTimesteps, numInferenceSteps, config.stepsOffset, 'round');
    this.#order = new StepOrder(this.kind, this.timesteps.length, this.needsNoise);
  }

  scaleModelInput(sample: Float32Array, stepIndex: number): Float32Array<ArrayBuffer> {
    this.#order.checkScale(stepIndex);
    return sample.slice();
  }

  step(modelOutput: Float32Array, stepIndex: number, sample: Float32Array, noise?: Float32Array): Float32Array<ArrayBuffer> {
    this.#order.advance(stepIndex, modelOutput, sample, noise);
    // 1. t and the previous timestep t − ⌊T/N⌋.
    const t = this.timesteps[stepIndex]!;
    const prevT = t - this.#stepRatio;
    // 2. ᾱ_t, ᾱ_{t−1}.
    const alphaProdT = this.#alphasCumprod[t]!;
    const alphaProdPrev = prevT >= 0 ? this.#alphasCumprod[prevT]! : this.#finalAlphaCumprod;
    const betaProdT = 1 - alphaProdT;
    const sqrtAlphaT = Math.sqrt(alphaProdT);
    const sqrtBetaT = Math.sqrt(betaProdT);
    // 5. σ_t(η), Eq. (16).
    const variance = ((1 - alphaProdPrev) / betaProdT) * (1 - alphaProdT / alphaProdPrev);
    const stdDev = this.#eta * Math.sqrt(variance);
    // 6. coefficients of Eq. (12).
    const sampleCoeff = Math.sqrt(alphaProdPrev);
    const directionCoeff = Math.sqrt(1 - alphaProdPrev - stdDev * stdDev);
    const { predictionType, clipSample, clipSampleRange } = this.#config;

    const out = new Float32Array(sample.length);
    for (let j = 0; j < sample.length; j++) {
      const x = sample[j]!;
      const m = modelOutput[j]!;
      // 3. x̂₀ and ε̂ from the model output.
      let predOriginal: number;
      let predEpsilon: number;
      switch (predictionType) {
        case 'epsilon':
          predOriginal = (x - sqrtBetaT * m) / sqrtAlphaT;
          predEpsilon = m;
          break;
        case 'sample':
          predOriginal = m;
          predEpsilon = (x - sqrtAlphaT * m) / sqrtBetaT;
          break;
        case 'v_prediction':
          predOriginal = sqrtAlphaT * x - sqrtBetaT * m;
          predEpsilon = sqrtAlphaT * m + sqrtBetaT * x;
          break;
      }
      // 4. optional clipping of x̂₀.
      if (clipSample) predOriginal = Math.min(Math.max(predOriginal, -clipSampleRange), clipSampleRange);
      // 7. Eq. (12), plus σ_t·z when η > 0.
      const z = noise === undefined ? 0 : stdDev * noise[j]!;
      out[j] = sampleCoeff * predOriginal + directionCoeff * predEpsilon + z;
    }
    return out;
  }
}
