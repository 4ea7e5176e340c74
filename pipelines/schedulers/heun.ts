/**
 * Heun's second-order method on the probability-flow ODE in σ: Karras et al. 2022 (arXiv 2206.00364),
 * Algorithm 1, as diffusers 0.24 `HeunDiscreteScheduler` computes it. Each step costs two model
 * evaluations except the last (σ_{N} = 0, lines 6–8 skipped): 2N − 1 evaluations, so the timestep
 * list repeats every timestep after the first.
 *
 * | code              | symbol          | meaning                                                     |
 * |-------------------|-----------------|-------------------------------------------------------------|
 * | `sigmas[k]`       | t_i, t_{i+1}    | per evaluation: [σ_0, σ_1, σ_1, σ_2, σ_2, …, σ_{N−1}, σ_{N−1}, 0] |
 * | `denoised`        | D(x; t)         | the model's x₀ estimate (`predictions.ts`)                  |
 * | `prevDerivative`  | d_i             | (x_i − D(x_i; t_i))/t_i from the first evaluation            |
 * | `dt`              | t_{i+1} − t_i   |                                                             |
 * | `savedSample`     | x_i             | kept between the two evaluations of a step                  |
 *
 * First evaluation (lines 4–5): x̃ = x_i + (t_{i+1} − t_i)·d_i.
 * Second evaluation at x̃, t_{i+1} (lines 7–8): d′ = (x̃ − D(x̃; t_{i+1}))/t_{i+1};
 * x_{i+1} = x_i + (t_{i+1} − t_i)·(d_i + d′)/2.
 * Model input: x/√(σ² + 1) with the σ of that evaluation. `clip_sample` clamps D.
 */
import type { ResolvedSchedulerConfig } from './config.ts';
import { denoisedFromSigma } from './predictions.ts';
import { initNoiseSigmaFor, noiseScheduleFor, sigmaGridFor } from './schedule.ts';
import { scaleBySigma, StepOrder } from './step-order.ts';
import type { Scheduler } from './types.ts';

interface FirstHalf {
  readonly prevDerivative: Float64Array;
  readonly dt: number;
  readonly savedSample: Float32Array;
}

export class HeunScheduler implements Scheduler {
  readonly kind = 'heun';
  readonly timesteps: readonly number[];
  readonly sigmas: readonly number[];
  readonly initNoiseSigma: number;
  readonly needsNoise = false;
  readonly #config: ResolvedSchedulerConfig;
  readonly #order: StepOrder;
  /** Set after a first-order evaluation, cleared by the second: the state machine of Algorithm 1. */
  #firstHalf: FirstHalf | undefined;

  constructor(config: ResolvedSchedulerConfig, numInferenceSteps: number, karras: boolean) {
    this.#config = config;
    const grid = sigmaGridFor(config, noiseScheduleFor(config), numInferenceSteps, 'float32', karras);
    const [t0, ...rest] = grid.timesteps;
    const [s0, ...middle] = grid.sigmas.slice(0, -1);
    this.timesteps = [t0!, ...rest.flatMap((t) => [t, t])];
    this.sigmas = [s0!, ...middle.flatMap((s) => [s, s]), grid.sigmas[grid.sigmas.length - 1]!];
    this.initNoiseSigma = initNoiseSigmaFor(config.timestepSpacing, grid.sigmas);
    this.#order = new StepOrder(this.kind, this.timesteps.length, false);
  }

  scaleModelInput(sample: Float32Array, stepIndex: number): Float32Array<ArrayBuffer> {
    this.#order.checkScale(stepIndex);
    return scaleBySigma(sample, this.sigmas[stepIndex]!);
  }

  step(modelOutput: Float32Array, stepIndex: number, sample: Float32Array, noise?: Float32Array): Float32Array<ArrayBuffer> {
    this.#order.advance(stepIndex, modelOutput, sample, noise);
    const firstHalf = this.#firstHalf;
    // First evaluation: from σ_k to σ_{k+1}. Second: the pair (σ_{k−1}, σ_k) of the first one.
    const sigma = firstHalf === undefined ? this.sigmas[stepIndex]! : this.sigmas[stepIndex - 1]!;
    const sigmaNext = firstHalf === undefined ? this.sigmas[stepIndex + 1]! : this.sigmas[stepIndex]!;
    // The model saw this evaluation's σ: σ itself for the first, σ_next for the second.
    const sigmaInput = firstHalf === undefined ? sigma : sigmaNext;
    const { predictionType, clipSample, clipSampleRange } = this.#config;
    const n = sample.length;
    const derivative = new Float64Array(n);
    for (let j = 0; j < n; j++) {
      let denoised = denoisedFromSigma(predictionType, sigmaInput, sample[j]!, modelOutput[j]!);
      if (clipSample) denoised = Math.min(Math.max(denoised, -clipSampleRange), clipSampleRange);
      derivative[j] = (sample[j]! - denoised) / sigmaInput;
    }

    const out = new Float32Array(n);
    if (firstHalf === undefined) {
      const dt = sigmaNext - sigma;
      for (let j = 0; j < n; j++) out[j] = sample[j]! + derivative[j]! * dt;
      this.#firstHalf = { prevDerivative: derivative, dt, savedSample: sample.slice() };
    } else {
      const { prevDerivative, dt, savedSample } = firstHalf;
      for (let j = 0; j < n; j++) out[j] = savedSample[j]! + ((prevDerivative[j]! + derivative[j]!) / 2) * dt;
      this.#firstHalf = undefined;
    }
    return out;
  }
}
