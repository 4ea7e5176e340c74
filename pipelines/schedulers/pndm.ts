/**
 * PLMS: the pseudo linear multistep method of Liu, Ren, Lin & Zhao, "Pseudo Numerical Methods for
 * Diffusion Models on Manifolds" (ICLR 2022, arXiv 2202.09778), with the Runge–Kutta warm-up skipped
 * (`skip_prk_steps`), as diffusers 0.24 `PNDMScheduler.step_plms` computes it.
 *
 * | code            | paper                   | meaning                                                    |
 * |-----------------|-------------------------|------------------------------------------------------------|
 * | `alphaProdT`    | ᾱ_t                     | ᾱ at the timestep being stepped from                        |
 * | `alphaProdPrev` | ᾱ_{t−δ}                 | ᾱ at t − δ, or the final ᾱ (1 or ᾱ_0) below 0               |
 * | `stepRatio`     | δ                       | ⌊T/N⌋                                                       |
 * | `ets`           | e_t, e_{t−δ}, …         | the last (up to 4) noise predictions, oldest first          |
 * | `epsPrime`      | e′_t                    | the linear multistep combination of the `ets`              |
 *
 * Transfer part φ(x_t, e′, t, t−δ), Eq. (9) (the DDIM step in the paper's "transfer" form):
 *   x_{t−δ} = √(ᾱ_{t−δ}/ᾱ_t)·x_t − (ᾱ_{t−δ} − ᾱ_t)·e′ / (ᾱ_t√(1−ᾱ_{t−δ}) + √(ᾱ_t(1−ᾱ_t)ᾱ_{t−δ}))
 * Gradient part: Adams–Bashforth weights by history length — 1: e; 2: (3e₁ − e₂)/2;
 * 3: (23e₁ − 16e₂ + 5e₃)/12; 4: (55e₁ − 59e₂ + 37e₃ − 9e₄)/24 (newest first).
 *
 * Warm-up without Runge–Kutta (the "pseudo improved Euler" of diffusers): the timestep list repeats
 * its second entry (951, 901, 901, 851, …: N+1 evaluations). Evaluation 0 takes an Euler step
 * t₀ → t₁ and keeps x_{t₀}; evaluation 1 (at t₁, on that Euler result) redoes the step t₀ → t₁ from
 * the kept x_{t₀} with the mean of both predictions, and is not added to the history.
 *
 * v-prediction: the combined output is turned into ε with ε = √ᾱ_t·v + √(1−ᾱ_t)·x at the transfer's
 * t and x, as diffusers does (after combining, not per prediction).
 */
import type { PredictionType, ResolvedSchedulerConfig } from './config.ts';
import { noiseScheduleFor, spacedTimesteps } from './schedule.ts';
import { StepOrder } from './step-order.ts';
import type { Scheduler } from './types.ts';

export class PndmScheduler implements Scheduler {
  readonly kind = 'pndm';
  readonly timesteps: readonly number[];
  readonly sigmas = undefined;
  readonly initNoiseSigma = 1;
  readonly needsNoise = false;
  readonly #predictionType: PredictionType;
  readonly #alphasCumprod: Float32Array;
  readonly #finalAlphaCumprod: number;
  readonly #stepRatio: number;
  readonly #order: StepOrder;
  /** Noise predictions kept for the multistep formula (newest last), at most 4. */
  #ets: Float32Array[] = [];
  /** x_{t₀} kept by evaluation 0 for the warm-up correction of evaluation 1. */
  #curSample: Float32Array | undefined;
  #counter = 0;

  constructor(config: ResolvedSchedulerConfig, numInferenceSteps: number) {
    this.#predictionType = config.predictionType;
    this.#alphasCumprod = noiseScheduleFor(config).alphasCumprod;
    this.#finalAlphaCumprod = config.setAlphaToOne ? 1 : this.#alphasCumprod[0]!;
    this.#stepRatio = Math.floor(config.numTrainTimesteps / numInferenceSteps);
    const grid = spacedTimesteps(config.timestepSpacing, config.numTrainTimesteps, numInferenceSteps, config.stepsOffset, 'round');
    // [t₀, t₁, t₁, t₂, …]: the second timestep repeats (diffusers' plms_timesteps).
    this.timesteps = grid.length > 1 ? [grid[0]!, grid[1]!, ...grid.slice(1)] : grid;
    this.#order = new StepOrder(this.kind, this.timesteps.length, false);
  }

  scaleModelInput(sample: Float32Array, stepIndex: number): Float32Array<ArrayBuffer> {
    this.#order.checkScale(stepIndex);
    return sample.slice();
  }

  step(modelOutput: Float32Array, stepIndex: number, sample: Float32Array, noise?: Float32Array): Float32Array<ArrayBuffer> {
    this.#order.advance(stepIndex, modelOutput, sample, noise);
    let t = this.timesteps[stepIndex]!;
    let prevT = t - this.#stepRatio;
    if (this.#counter !== 1) {
      this.#ets = [...this.#ets.slice(-3), modelOutput.slice()];
    } else {
      // Warm-up correction: redo t₀ → t₁.
      prevT = t;
      t = t + this.#stepRatio;
    }

    const ets = this.#ets;
    const n = sample.length;
    const epsPrime = new Float32Array(n);
    let x = sample;
    const e1 = ets[ets.length - 1]!;
    if (ets.length === 1 && this.#counter === 0) {
      epsPrime.set(modelOutput);
      this.#curSample = sample.slice();
    } else if (ets.length === 1 && this.#counter === 1) {
      for (let j = 0; j < n; j++) epsPrime[j] = (modelOutput[j]! + e1[j]!) / 2;
      x = this.#curSample!;
      this.#curSample = undefined;
    } else if (ets.length === 2) {
      const e2 = ets[0]!;
      for (let j = 0; j < n; j++) epsPrime[j] = (3 * e1[j]! - e2[j]!) / 2;
    } else if (ets.length === 3) {
      const [e3, e2] = ets as [Float32Array, Float32Array, Float32Array];
      for (let j = 0; j < n; j++) epsPrime[j] = (23 * e1[j]! - 16 * e2[j]! + 5 * e3[j]!) / 12;
    } else {
      const [e4, e3, e2] = ets as [Float32Array, Float32Array, Float32Array, Float32Array];
      for (let j = 0; j < n; j++) epsPrime[j] = (55 * e1[j]! - 59 * e2[j]! + 37 * e3[j]! - 9 * e4[j]!) / 24;
    }
    this.#counter++;
    return this.#transfer(x, t, prevT, epsPrime);
  }

  /** φ(x_t, e′, t, t−δ). */
  #transfer(x: Float32Array, t: number, prevT: number, modelOutput: Float32Array): Float32Array<ArrayBuffer> {
    const alphaProdT = this.#alphasCumprod[t]!;
    const alphaProdPrev = prevT >= 0 ? this.#alphasCumprod[prevT]! : this.#finalAlphaCumprod;
    const betaProdT = 1 - alphaProdT;
    const betaProdPrev = 1 - alphaProdPrev;
    const sampleCoeff = Math.sqrt(alphaProdPrev / alphaProdT);
    const outputDenomCoeff = alphaProdT * Math.sqrt(betaProdPrev) + Math.sqrt(alphaProdT * betaProdT * alphaProdPrev);
    const outputCoeff = (alphaProdPrev - alphaProdT) / outputDenomCoeff;
    const sqrtAlphaT = Math.sqrt(alphaProdT);
    const sqrtBetaT = Math.sqrt(betaProdT);
    const out = new Float32Array(x.length);
    for (let j = 0; j < x.length; j++) {
      const e = this.#predictionType === 'v_prediction' ? sqrtAlphaT * modelOutput[j]! + sqrtBetaT * x[j]! : modelOutput[j]!;
      out[j] = sampleCoeff * x[j]! - outputCoeff * e;
    }
    return out;
  }
}
