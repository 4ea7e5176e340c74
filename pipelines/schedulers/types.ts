/**
 * The surface every scheduler offers the denoising loop (STYLE.md §5): timesteps for n steps, scale
 * the model input, step. One instance per run; it keeps its multistep state privately.
 */

export type SchedulerKind = 'ddim' | 'pndm' | 'lms' | 'euler' | 'euler_ancestral' | 'heun' | 'dpmpp_2m' | 'unipc';

export const SCHEDULER_KINDS: readonly SchedulerKind[] = ['ddim', 'pndm', 'lms', 'euler', 'euler_ancestral', 'heun', 'dpmpp_2m', 'unipc'];

export interface SchedulerOptions {
  /**
   * Karras et al. (2022) σ spacing (ρ = 7). Allowed for the σ-based kinds (lms, euler, euler_ancestral,
   * heun, dpmpp_2m, unipc); undefined → the config's `use_karras_sigmas` (default false).
   */
  karrasSigmas?: boolean;
  /** DDIM η ≥ 0 (only for `ddim`): 0 is deterministic, 1 is DDPM-like. Default 0. */
  eta?: number;
}

export interface Scheduler {
  readonly kind: SchedulerKind;
  /** One entry per model evaluation (PNDM: N+1, Heun: 2N−1): the value fed to the UNet as `timestep`. */
  readonly timesteps: readonly number[];
  /** sigmas when the scheduler has them (for reports/tests), else undefined. */
  readonly sigmas: readonly number[] | undefined;
  readonly initNoiseSigma: number;
  /** True when step() needs a fresh N(0,1) noise tensor (Euler a, DDIM with eta > 0). */
  readonly needsNoise: boolean;
  /**
   * Model input for evaluation i (Euler-type: x / sqrt(σ²+1)). Returns a new array (always backed by a
   * plain ArrayBuffer, hence the type argument, so callers can keep `Float32Array<ArrayBuffer>` variables).
   */
  scaleModelInput(sample: Float32Array, stepIndex: number): Float32Array<ArrayBuffer>;
  /** One step: model output of evaluation i at sample x_i → x_{i+1}. `noise` (same length) iff needsNoise. Returns a new array. */
  step(modelOutput: Float32Array, stepIndex: number, sample: Float32Array, noise?: Float32Array): Float32Array<ArrayBuffer>;
}
