/**
 * UniPC: Zhao, Bai, Rao, Zhou & Lu, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling
 * of Diffusion Models" (NeurIPS 2023, arXiv 2302.04867), multistep UniP predictor + UniC corrector in
 * the data-prediction form with B(h) = e^h − 1 ("bh2"), order 2, as diffusers 0.24
 * `UniPCMultistepScheduler` computes it (`predict_x0=True`, corrector on every step after the first;
 * `lower_order_final` from the config, default true).
 *
 * | code            | symbol            | meaning                                                        |
 * |-----------------|-------------------|----------------------------------------------------------------|
 * | `sigmas[i]`     | σ_i (VE)          | √((1−ᾱ)/ᾱ) at evaluation i; σ_N = σ(t=0) ≈ 0.0292 in 0.24      |
 * | `alphaT,sigmaT` | α_t, σ_t          | VP scales 1/√(1+σ²), σ/√(1+σ²)                                  |
 * | `lambda`        | λ_t               | log(α_t/σ_t)                                                    |
 * | `h`             | h                 | λ_t − λ_s (s the current, t the target evaluation)             |
 * | `hh`            | h̃ = −h            | the exponent of the data-prediction form                        |
 * | `hPhi1`         | h̃·φ₁(h̃) = e^{h̃} − 1 |                                                                |
 * | `bH`            | B(h)              | e^{h̃} − 1 (bh2)                                                 |
 * | `rk`            | r_k               | (λ_{s_k} − λ_s)/h for the older evaluation s_k                  |
 * | `d1`            | D_k/r_k           | (m_k − m_0)/r_k                                                  |
 * | `rhosP, rhosC`  | a_p, a_c          | predictor / corrector weights (R·a = b, with b from φ_k)        |
 * | `m0`            | x_θ(x_s, s)       | the newest x₀ prediction (`predictions.ts`)                     |
 *
 * Predictor (UniP-p): x_t = (σ_t/σ_s)·x_s − α_t·hPhi1·m0 − α_t·B(h)·Σ a_p,k·D_k/r_k; order 2 uses
 * a_p = ½ (diffusers' simplification), order 1 has no sum.
 * Corrector (UniC-p), applied at step i to the predictor's output x_t with the fresh m_t = x_θ(x_t, t):
 * x_t^c = (σ_t/σ_s)·x_s − α_t·hPhi1·m0 − α_t·B(h)·(Σ_k a_c,k·D_k/r_k + a_c,last·(m_t − m0)),
 * with a_c solving R·a_c = b (order 1: a_c = ½).
 * b_k = k!·h̃φ_{k+1}(h̃)/B(h) via the recurrence φ_{k+1} = (φ_k − 1/k!)/h̃ (diffusers' `h_phi_k`).
 *
 * Orders: warm-up min(2, steps so far + 1); `lower_order_final` caps the order at the number of steps
 * left, so the last step is first order (at any step count, unlike DPM-Solver++); the corrector reuses
 * the order of the predictor it corrects. The last step lands on σ(t=0): diffusers 0.26.3's UniPC has
 * no `final_sigmas_type` (`config.ts` rejects "zero" for it).
 */
import type { PredictionType, ResolvedSchedulerConfig } from './config.ts';
import { alphaSigmaFromSigma, denoisedFromAlphaSigma } from './predictions.ts';
import { multistepGridFor, noiseScheduleFor } from './schedule.ts';
import { StepOrder } from './step-order.ts';
import type { Scheduler } from './types.ts';

const SOLVER_ORDER = 2;

interface Level {
  readonly alphaT: number;
  readonly sigmaT: number;
  readonly lambda: number;
}

function levelOf(sigma: number): Level {
  const { alphaT, sigmaT } = alphaSigmaFromSigma(sigma);
  return { alphaT, sigmaT, lambda: Math.log(alphaT) - Math.log(sigmaT) };
}

/** b_1…b_order (the right-hand side of R·a = b) for hh = −h, B(h) = e^{hh} − 1. */
function rhsB(hh: number, order: number): number[] {
  const hPhi1 = Math.expm1(hh);
  const bH = Math.expm1(hh);
  const b: number[] = [];
  let hPhiK = hPhi1 / hh - 1;
  let factorial = 1;
  for (let k = 1; k <= order; k++) {
    b.push((hPhiK * factorial) / bH);
    factorial *= k + 1;
    hPhiK = hPhiK / hh - 1 / factorial;
  }
  return b;
}

export class UniPcScheduler implements Scheduler {
  readonly kind = 'unipc';
  readonly timesteps: readonly number[];
  readonly sigmas: readonly number[];
  readonly initNoiseSigma = 1;
  readonly needsNoise = false;
  readonly #predictionType: PredictionType;
  readonly #order: StepOrder;
  readonly #lowerOrderFinal: boolean;
  /** x₀ predictions of the last two evaluations, oldest first. */
  #modelOutputs: Float32Array[] = [];
  /** The sample the previous predictor started from (x_s of the corrector). */
  #lastSample: Float32Array | undefined;
  /** The order the previous predictor used. */
  #thisOrder = 1;
  #lowerOrderNums = 0;

  constructor(config: ResolvedSchedulerConfig, numInferenceSteps: number, karras: boolean) {
    this.#predictionType = config.predictionType;
    this.#lowerOrderFinal = config.lowerOrderFinal;
    const grid = multistepGridFor(config, noiseScheduleFor(config), numInferenceSteps, karras);
    this.timesteps = grid.timesteps;
    this.sigmas = grid.sigmas;
    this.#order = new StepOrder(this.kind, this.timesteps.length, false);
  }

  scaleModelInput(sample: Float32Array, stepIndex: number): Float32Array<ArrayBuffer> {
    this.#order.checkScale(stepIndex);
    return sample.slice();
  }

  step(modelOutput: Float32Array, stepIndex: number, sample: Float32Array, noise?: Float32Array): Float32Array<ArrayBuffer> {
    this.#order.advance(stepIndex, modelOutput, sample, noise);
    const i = stepIndex;
    const here = alphaSigmaFromSigma(this.sigmas[i]!);
    const mT = new Float32Array(sample.length);
    for (let j = 0; j < mT.length; j++) mT[j] = denoisedFromAlphaSigma(this.#predictionType, here.alphaT, here.sigmaT, sample[j]!, modelOutput[j]!);

    // 1. UniC: correct the previous predictor's output with the fresh prediction.
    const corrected = i > 0 && this.#lastSample !== undefined ? this.#correct(mT, this.#lastSample, sample, i, this.#thisOrder) : sample;

    this.#modelOutputs = [...this.#modelOutputs.slice(-(SOLVER_ORDER - 1)), mT];
    const orderCap = this.#lowerOrderFinal ? Math.min(SOLVER_ORDER, this.timesteps.length - i) : SOLVER_ORDER;
    this.#thisOrder = Math.min(orderCap, this.#lowerOrderNums + 1);
    this.#lastSample = corrected;
    // 2. UniP: predict the next sample.
    const out = this.#predict(corrected, i, this.#thisOrder);
    if (this.#lowerOrderNums < SOLVER_ORDER) this.#lowerOrderNums++;
    return out;
  }

  /** UniP-p from evaluation i (level s) to i + 1 (level t). */
  #predict(x: Float32Array, i: number, order: number): Float32Array<ArrayBuffer> {
    const outputs = this.#modelOutputs;
    const m0 = outputs[outputs.length - 1]!;
    const s = levelOf(this.sigmas[i]!);
    const t = levelOf(this.sigmas[i + 1]!);
    const h = t.lambda - s.lambda;
    const hh = -h;
    const hPhi1 = Math.expm1(hh);
    const bH = Math.expm1(hh);
    const sampleCoeff = t.sigmaT / s.sigmaT;
    const out = new Float32Array(x.length);
    if (order === 1) {
      for (let j = 0; j < out.length; j++) out[j] = sampleCoeff * x[j]! - t.alphaT * hPhi1 * m0[j]!;
      return out;
    }
    const m1 = outputs[outputs.length - 2]!;
    const rk = (levelOf(this.sigmas[i - 1]!).lambda - s.lambda) / h;
    const rhoP = 0.5;
    for (let j = 0; j < out.length; j++) {
      const d1 = (m1[j]! - m0[j]!) / rk;
      out[j] = sampleCoeff * x[j]! - t.alphaT * hPhi1 * m0[j]! - t.alphaT * bH * (rhoP * d1);
    }
    return out;
  }

  /** UniC-p at evaluation i: x_s = the previous start (level i − 1), x_t = its prediction (level i). */
  #correct(mT: Float32Array, lastSample: Float32Array, thisSample: Float32Array, i: number, order: number): Float32Array {
    const outputs = this.#modelOutputs;
    const m0 = outputs[outputs.length - 1]!;
    const s = levelOf(this.sigmas[i - 1]!);
    const t = levelOf(this.sigmas[i]!);
    const h = t.lambda - s.lambda;
    const hh = -h;
    const hPhi1 = Math.expm1(hh);
    const bH = Math.expm1(hh);
    const sampleCoeff = t.sigmaT / s.sigmaT;

    let rhoLast = 0.5;
    let rhoD1 = 0;
    let m1: Float32Array | undefined;
    let rk = 1;
    if (order === 2) {
      m1 = outputs[outputs.length - 2]!;
      rk = (levelOf(this.sigmas[i - 2]!).lambda - s.lambda) / h;
      // R = [[1, 1], [r_k, 1]], R·a = b.
      const [b1, b2] = rhsB(hh, 2) as [number, number];
      rhoD1 = (b1 - b2) / (1 - rk);
      rhoLast = b1 - rhoD1;
    }
    const out = new Float32Array(thisSample.length);
    for (let j = 0; j < out.length; j++) {
      const base = sampleCoeff * lastSample[j]! - t.alphaT * hPhi1 * m0[j]!;
      const corrRes = m1 === undefined ? 0 : rhoD1 * ((m1[j]! - m0[j]!) / rk);
      const d1t = mT[j]! - m0[j]!;
      out[j] = base - t.alphaT * bH * (corrRes + rhoLast * d1t);
    }
    return out;
  }
}
