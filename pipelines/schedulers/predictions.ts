/**
 * The model's x₀ estimate from its raw output, for the three diffusers `prediction_type`s, in the
 * two parameterisations the schedulers use.
 *
 * | code     | symbol | meaning                                                                  |
 * |----------|--------|--------------------------------------------------------------------------|
 * | `sigma`  | σ      | VE noise level √((1−ᾱ)/ᾱ); the Euler family's x is √(1+σ²)·(VP sample)  |
 * | `alphaT` | α_t    | VP signal scale √ᾱ = 1/√(1+σ²)                                           |
 * | `sigmaT` | σ_t    | VP noise scale √(1−ᾱ) = σ·α_t                                            |
 * | `m`      |        | model output: ε (epsilon), v (v_prediction) or x₀ (sample)              |
 *
 * v = α_t ε − σ_t x₀ (Salimans & Ho, arXiv 2202.00512, §4), so x₀ = α_t x − σ_t v for a VP sample x.
 */
import type { PredictionType } from './config.ts';

/**
 * D(x; σ) for a VE sample x (LMS, Euler, Euler a, Heun): ε → x − σε; v → v·(−σ/√(σ²+1)) + x/(σ²+1)
 * (the VP formula applied to x/√(σ²+1)); sample → m.
 */
export function denoisedFromSigma(predictionType: PredictionType, sigma: number, x: number, m: number): number {
  switch (predictionType) {
    case 'epsilon':
      return x - sigma * m;
    case 'v_prediction':
      return m * (-sigma / Math.sqrt(sigma * sigma + 1)) + x / (sigma * sigma + 1);
    case 'sample':
      return m;
  }
}

/** x̂₀ for a VP sample x (DPM-Solver++, UniPC): ε → (x − σ_t ε)/α_t; v → α_t x − σ_t v; sample → m. */
export function denoisedFromAlphaSigma(predictionType: PredictionType, alphaT: number, sigmaT: number, x: number, m: number): number {
  switch (predictionType) {
    case 'epsilon':
      return (x - sigmaT * m) / alphaT;
    case 'v_prediction':
      return alphaT * x - sigmaT * m;
    case 'sample':
      return m;
  }
}

/** (α_t, σ_t) = (1/√(σ²+1), σ/√(σ²+1)): diffusers `_sigma_to_alpha_sigma_t`. */
export function alphaSigmaFromSigma(sigma: number): { alphaT: number; sigmaT: number } {
  const alphaT = 1 / Math.sqrt(sigma * sigma + 1);
  return { alphaT, sigmaT: sigma * alphaT };
}
