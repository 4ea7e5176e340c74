/**
 * Euler's method on the probability-flow ODE in σ (Karras et al. 2022, arXiv 2206.00364, Algorithm 1
 * without its second-order correction, lines 6–8), as diffusers 0.24 `EulerDiscreteScheduler` computes
 * it with its defaults (no churn: γ = 0, so σ̂ = σ).
 *
 * | code          | symbol        | meaning                                                  |
 * |---------------|---------------|----------------------------------------------------------|
 * | `sigmas[i]`   | t_i = σ_i     | noise level of evaluation i (σ_N = 0)                    |
 * | `denoised`    | D(x_i; σ_i)   | the model's x₀ estimate (`predictions.ts`)               |
 * | `derivative`  | d_i           | (x_i − D)/σ_i                                            |
 *
 * Update (Algorithm 1, lines 4–5): x_{i+1} = x_i + (σ_{i+1} − σ_i)·d_i.
 * Model input: x_i/√(σ_i² + 1) (the VP sample the UNet was trained on).
 */
import type { PredictionType, ResolvedSchedulerConfig } from './config.ts';
import { denoisedFromSigma } from './predictions.ts';
import { initNoiseSigmaFor, noiseScheduleFor, sigmaGridFor } from './schedule.ts';
import { scaleBySigma, StepOrder } from './step-order.ts';
import type { Scheduler } from './types.ts';

export class EulerScheduler implements Scheduler {
  readonly kind = 'euler';
  readonly timesteps: readonly number[];
  readonly sigmas: readonly number[];
  readonly initNoiseSigma: number;
  readonly needsNoise = false;
  readonly #predictionType: PredictionType;
  readonly #order: StepOrder;

  constructor(config: ResolvedSchedulerConfig, numInferenceSteps: number, karras: boolean) {
    this.#predictionType = config.predictionType;
    const grid = sigmaGridFor(config, noiseScheduleFor(config), numInferenceSteps, 'float32', karras);
    this.timesteps = grid.timesteps;
    this.sigmas = grid.sigmas;
    this.initNoiseSigma = initNoiseSigmaFor(config.timestepSpacing, grid.sigmas);
    this.#order = new StepOrder(this.kind, this.timesteps.length, false);
  }

  scaleModelInput(sample: Float32Array, stepIndex: number): Float32Array<ArrayBuffer> {
    this.#order.checkScale(stepIndex);
    return scaleBySigma(sample, this.sigmas[stepIndex]!);
  }

  step(modelOutput: Float32Array, stepIndex: number, sample: Float32Array, noise?: Float32Array): Float32Array<ArrayBuffer> {
    this.#order.advance(stepIndex, modelOutput, sample, noise);
    const sigma = this.sigmas[stepIndex]!;
    const dt = this.sigmas[stepIndex + 1]! - sigma;
    const out = new Float32Array(sample.length);
    for (let j = 0; j < sample.length; j++) {
      const x = sample[j]!;
      const denoised = denoisedFromSigma(this.#predictionType, sigma, x, modelOutput[j]!);
      const derivative = (x - denoised) / sigma;
      out[j] = x + derivative * dt;
    }
    return out;
  }
}
