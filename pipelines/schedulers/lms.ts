/**
 * Linear multistep (order 4) on the probability-flow ODE in σ, dx/dσ = (x − D(x; σ))/σ (Karras et al.
 * 2022, arXiv 2206.00364, the slope d_i of Algorithm 1), as k-diffusion's `sample_lms` and diffusers
 * 0.24 `LMSDiscreteScheduler` compute it.
 *
 * | code          | symbol        | meaning                                                            |
 * |---------------|---------------|--------------------------------------------------------------------|
 * | `sigmas[i]`   | σ_i           | noise level of evaluation i (σ_N = 0)                              |
 * | `denoised`    | D(x_i; σ_i)   | the model's x₀ estimate                                            |
 * | `derivative`  | d_i           | (x_i − D)/σ_i, the ODE slope                                       |
 * | `coeffs[j]`   | c_{i,j}       | ∫_{σ_i}^{σ_{i+1}} ℓ_j(τ) dτ, ℓ_j the Lagrange basis on σ_i … σ_{i−q+1} |
 * | `q`           | q             | min(i + 1, 4), the order used at step i                            |
 *
 * Update (variable-step Adams–Bashforth): x_{i+1} = x_i + Σ_{j<q} c_{i,j}·d_{i−j}.
 *
 * diffusers integrates each ℓ_j with `scipy.integrate.quad` (epsrel 1e-4). ℓ_j is a polynomial of
 * degree q − 1 ≤ 3, which quad's Gauss–Kronrod rule integrates exactly, so a 4-point Gauss–Legendre
 * rule (exact to degree 7) gives the same number up to rounding.
 *
 * Model input: x_i/√(σ_i² + 1); D from the model output as in `predictions.ts`.
 */
import type { PredictionType, ResolvedSchedulerConfig } from './config.ts';
import { denoisedFromSigma } from './predictions.ts';
import { initNoiseSigmaFor, noiseScheduleFor, sigmaGridFor } from './schedule.ts';
import { scaleBySigma, StepOrder } from './step-order.ts';
import type { Scheduler } from './types.ts';

/** diffusers' `step(order=4)` default. */
const LMS_ORDER = 4;

/** 4-point Gauss–Legendre nodes and weights on [−1, 1]. */
const GAUSS_NODES = [-0.8611363115940526, -0.3399810435848563, 0.3399810435848563, 0.8611363115940526];
const GAUSS_WEIGHTS = [0.3478548451374538, 0.6521451548625461, 0.6521451548625461, 0.3478548451374538];

function integrate(f: (tau: number) => number, a: number, b: number): number {
  const half = (b - a) / 2;
  const mid = (a + b) / 2;
  let sum = 0;
  for (let k = 0; k < GAUSS_NODES.length; k++) sum += GAUSS_WEIGHTS[k]! * f(mid + half * GAUSS_NODES[k]!);
  return sum * half;
}

export class LmsScheduler implements Scheduler {
  readonly kind = 'lms';
  readonly timesteps: readonly number[];
  readonly sigmas: readonly number[];
  readonly initNoiseSigma: number;
  readonly needsNoise = false;
  readonly #predictionType: PredictionType;
  readonly #order: StepOrder;
  /** d_{i−q+1} … d_i (newest last). */
  #derivatives: Float32Array[] = [];

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
    const derivative = new Float32Array(sample.length);
    for (let j = 0; j < sample.length; j++) {
      derivative[j] = (sample[j]! - denoisedFromSigma(this.#predictionType, sigma, sample[j]!, modelOutput[j]!)) / sigma;
    }
    this.#derivatives = [...this.#derivatives.slice(-(LMS_ORDER - 1)), derivative];

    const q = Math.min(stepIndex + 1, LMS_ORDER);
    const coeffs = Array.from({ length: q }, (_, j) => this.#coefficient(q, stepIndex, j));
    const history = this.#derivatives;
    const out = new Float32Array(sample.length);
    for (let k = 0; k < out.length; k++) {
      let increment = 0;
      for (let j = 0; j < q; j++) increment += coeffs[j]! * history[history.length - 1 - j]![k]!;
      out[k] = sample[k]! + increment;
    }
    return out;
  }

  /** c_{i,j} = ∫_{σ_i}^{σ_{i+1}} Π_{k≠j} (τ − σ_{i−k})/(σ_{i−j} − σ_{i−k}) dτ. */
  #coefficient(q: number, i: number, j: number): number {
    const s = this.sigmas;
    const basis = (tau: number): number => {
      let prod = 1;
      for (let k = 0; k < q; k++) {
        if (k === j) continue;
        prod *= (tau - s[i - k]!) / (s[i - j]! - s[i - k]!);
      }
      return prod;
    };
    return integrate(basis, s[i]!, s[i + 1]!);
  }
}
