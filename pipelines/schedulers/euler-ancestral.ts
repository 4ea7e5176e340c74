/**
 * Euler ancestral: an Euler step down to σ_down followed by fresh noise of scale σ_up, so that the
 * marginal at σ_{i+1} is right (ancestral sampling, η = 1). The split is k-diffusion's
 * `get_ancestral_step`; diffusers 0.24 `EulerAncestralDiscreteScheduler` computes the same.
 *
 * | code          | symbol        | meaning                                                         |
 * |---------------|---------------|-----------------------------------------------------------------|
 * | `sigmas[i]`   | σ_i           | noise level of evaluation i (σ_N = 0)                           |
 * | `denoised`    | D(x_i; σ_i)   | the model's x₀ estimate (`predictions.ts`)                      |
 * | `sigmaUp`     | σ_up          | √(σ_{i+1}²·(σ_i² − σ_{i+1}²)/σ_i²), the noise added back         |
 * | `sigmaDown`   | σ_down        | √(σ_{i+1}² − σ_up²), where the deterministic step lands          |
 * | `noise`       | z             | N(0, I), supplied by the caller per step                        |
 *
 * Update: x_{i+1} = x_i + (σ_down − σ_i)·(x_i − D)/σ_i + σ_up·z.
 * Model input: x_i/√(σ_i² + 1).
 *
 * Extension beyond 0.24: that class has no `use_karras_sigmas`; with `karrasSigmas` the σ grid is
 * built exactly as for Euler (A1111's "Euler a" + "Karras").
 */
import type { PredictionType, ResolvedSchedulerConfig } from './config.ts';
import { denoisedFromSigma } from './predictions.ts';
import { initNoiseSigmaFor, noiseScheduleFor, sigmaGridFor } from './schedule.ts';
import { scaleBySigma, StepOrder } from './step-order.ts';
import type { Scheduler } from './types.ts';

export class EulerAncestralScheduler implements Scheduler {
  readonly kind = 'euler_ancestral';
  readonly timesteps: readonly number[];
  readonly sigmas: readonly number[];
  readonly initNoiseSigma: number;
  readonly needsNoise = true;
  readonly #predictionType: PredictionType;
  readonly #order: StepOrder;

  constructor(config: ResolvedSchedulerConfig, numInferenceSteps: number, karras: boolean) {
    this.#predictionType = config.predictionType;
    const grid = sigmaGridFor(config, noiseScheduleFor(config), numInferenceSteps, 'float32', karras);
    this.timesteps = grid.timesteps;
    this.sigmas = grid.sigmas;
    this.initNoiseSigma = initNoiseSigmaFor(config.timestepSpacing, grid.sigmas);
    this.#order = new StepOrder(this.kind, this.timesteps.length, true);
  }

  scaleModelInput(sample: Float32Array, stepIndex: number): Float32Array<ArrayBuffer> {
    this.#order.checkScale(stepIndex);
    return scaleBySigma(sample, this.sigmas[stepIndex]!);
  }

  step(modelOutput: Float32Array, stepIndex: number, sample: Float32Array, noise?: Float32Array): Float32Array<ArrayBuffer> {
    this.#order.advance(stepIndex, modelOutput, sample, noise);
    const z = noise!;
    const sigmaFrom = this.sigmas[stepIndex]!;
    const sigmaTo = this.sigmas[stepIndex + 1]!;
    const sigmaUp = Math.sqrt((sigmaTo * sigmaTo * (sigmaFrom * sigmaFrom - sigmaTo * sigmaTo)) / (sigmaFrom * sigmaFrom));
    const sigmaDown = Math.sqrt(sigmaTo * sigmaTo - sigmaUp * sigmaUp);
    const dt = sigmaDown - sigmaFrom;
    const out = new Float32Array(sample.length);
    for (let j = 0; j < sample.length; j++) {
      const x = sample[j]!;
      const denoised = denoisedFromSigma(this.#predictionType, sigmaFrom, x, modelOutput[j]!);
      const derivative = (x - denoised) / sigmaFrom;
      out[j] = x + derivative * dt + z[j]! * sigmaUp;
    }
    return out;
  }
}
