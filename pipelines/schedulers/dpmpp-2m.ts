/**
 * DPM-Solver++(2M): Lu, Zhou, Bao, Chen, Li & Zhu, "DPM-Solver++: Fast Solver for Guided Sampling of
 * Diffusion Probabilistic Models" (arXiv 2211.01095), Algorithm 2, as diffusers
 * `DPMSolverMultistepScheduler` computes it with `algorithm_type="dpmsolver++"`,
 * `solver_type="midpoint"`, `solver_order=2`: diffusers 0.24 by default, diffusers 0.26's ending when
 * the config sets `final_sigmas_type`.
 *
 * | code            | symbol          | meaning                                                        |
 * |-----------------|-----------------|----------------------------------------------------------------|
 * | `sigmas[i]`     | σ_i (VE)        | √((1−ᾱ)/ᾱ) at evaluation i; σ_N is where the last step lands    |
 * | `alphaT,sigmaT` | α_t, σ_t        | VP scales 1/√(1+σ²), σ/√(1+σ²)                                 |
 * | `lambda`        | λ_t             | log(α_t/σ_t), the half log-SNR                                  |
 * | `h`             | h_i             | λ_{t_i} − λ_{t_{i−1}}                                           |
 * | `r0`            | r_i             | h_{i−1}/h_i                                                     |
 * | `m0`, `m1`      | x_θ(t_{i−1}), x_θ(t_{i−2}) | current and previous x₀ predictions (`predictions.ts`) |
 *
 * First order (DPM-Solver++(1), the DDIM step; Eq. (5) of the paper with x_θ held constant):
 * x_t = (σ_t/σ_s)·x − α_t(e^{−h} − 1)·m0.
 * Second order, diffusers' "midpoint" form of Algorithm 2: D0 = m0, D1 = (m0 − m1)/r0,
 * x_t = (σ_t/σ_s)·x − α_t(e^{−h} − 1)·D0 − ½·α_t(e^{−h} − 1)·D1.
 * The first step is first order (no history). The last step is first order when any of:
 * - `lower_order_final` and fewer than 15 steps (diffusers' stability rule for < 15 steps);
 * - `euler_at_final`;
 * - `final_sigmas_type = "zero"` (diffusers ≥ 0.26).
 *
 * Where the last step lands (σ_N, `schedule.ts` `multistepGridFor`):
 * - key absent (diffusers 0.24): σ(t=0) ≈ 0.0292; with Karras σ (Karras et al. 2022, Eq. (5);
 *   timesteps round(t(σ))) the last σ is repeated, so the last step has h = 0 and returns x unchanged;
 * - `"sigma_min"`: σ(t=0), also with Karras σ;
 * - `"zero"`: σ_N = 0, so α_t = 1, σ_t = 0, λ_t = +∞, e^{−h} = 0, and the first-order step gives
 *   x_N = 0·x + m0: the run ends on the last step's x₀ prediction.
 */
import type { PredictionType, ResolvedSchedulerConfig } from './config.ts';
import { alphaSigmaFromSigma, denoisedFromAlphaSigma } from './predictions.ts';
import { multistepGridFor, noiseScheduleFor } from './schedule.ts';
import { StepOrder } from './step-order.ts';
import type { Scheduler } from './types.ts';

/** diffusers: `lower_order_final` only applies below this many steps (stability for < 15). */
const LOWER_ORDER_FINAL_BELOW_STEPS = 15;

function lambdaOf(alphaT: number, sigmaT: number): number {
  return Math.log(alphaT) - Math.log(sigmaT);
}

export class DpmSolverPlusPlus2MScheduler implements Scheduler {
  readonly kind = 'dpmpp_2m';
  readonly timesteps: readonly number[];
  readonly sigmas: readonly number[];
  readonly initNoiseSigma = 1;
  readonly needsNoise = false;
  readonly #predictionType: PredictionType;
  readonly #order: StepOrder;
  /** Is the last step first order (see the header)? */
  readonly #firstOrderFinal: boolean;
  /** x₀ prediction of the previous evaluation (m1), once there is one. */
  #previousDenoised: Float32Array | undefined;

  constructor(config: ResolvedSchedulerConfig, numInferenceSteps: number, karras: boolean) {
    this.#predictionType = config.predictionType;
    const grid = multistepGridFor(config, noiseScheduleFor(config), numInferenceSteps, karras);
    this.timesteps = grid.timesteps;
    this.sigmas = grid.sigmas;
    this.#order = new StepOrder(this.kind, this.timesteps.length, false);
    const n = this.timesteps.length;
    this.#firstOrderFinal = config.eulerAtFinal || (config.lowerOrderFinal && n < LOWER_ORDER_FINAL_BELOW_STEPS) || config.finalSigmasType === 'zero';
  }

  scaleModelInput(sample: Float32Array, stepIndex: number): Float32Array<ArrayBuffer> {
    this.#order.checkScale(stepIndex);
    return sample.slice();
  }

  step(modelOutput: Float32Array, stepIndex: number, sample: Float32Array, noise?: Float32Array): Float32Array<ArrayBuffer> {
    this.#order.advance(stepIndex, modelOutput, sample, noise);
    const i = stepIndex;
    const lowerOrderHere = this.#firstOrderFinal && i === this.timesteps.length - 1;

    // convert_model_output: x₀ prediction at σ_i.
    const s0 = alphaSigmaFromSigma(this.sigmas[i]!);
    const m0 = new Float32Array(sample.length);
    for (let j = 0; j < m0.length; j++) m0[j] = denoisedFromAlphaSigma(this.#predictionType, s0.alphaT, s0.sigmaT, sample[j]!, modelOutput[j]!);
    const m1 = this.#previousDenoised;
    this.#previousDenoised = m0;

    // σ_{i+1} = 0 ("zero"): σ_t = 0, λ_t = +∞, h = +∞, e^{−h} = 0, so the first-order step is m0.
    const t = alphaSigmaFromSigma(this.sigmas[i + 1]!);
    const h = lambdaOf(t.alphaT, t.sigmaT) - lambdaOf(s0.alphaT, s0.sigmaT);
    const sampleCoeff = t.sigmaT / s0.sigmaT;
    const outputCoeff = t.alphaT * (Math.exp(-h) - 1);
    const out = new Float32Array(sample.length);

    if (m1 === undefined || lowerOrderHere) {
      for (let j = 0; j < out.length; j++) out[j] = sampleCoeff * sample[j]! - outputCoeff * m0[j]!;
      return out;
    }
    const s1 = alphaSigmaFromSigma(this.sigmas[i - 1]!);
    const h0 = lambdaOf(s0.alphaT, s0.sigmaT) - lambdaOf(s1.alphaT, s1.sigmaT);
    const r0 = h0 / h;
    for (let j = 0; j < out.length; j++) {
      const d0 = m0[j]!;
      const d1 = (1 / r0) * (m0[j]! - m1[j]!);
      out[j] = sampleCoeff * sample[j]! - outputCoeff * d0 - 0.5 * outputCoeff * d1;
    }
    return out;
  }
}
