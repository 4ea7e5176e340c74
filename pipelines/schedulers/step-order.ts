/**
 * Call-order bookkeeping shared by the schedulers. Multistep state (previous model outputs, Heun's
 * half step, PLMS's ε history) is only meaningful if evaluations arrive as 0, 1, 2, …; a loop that
 * skips or repeats one is a programmer error, so it throws a plain `Error`.
 */
import type { SchedulerKind } from './types.ts';

export class StepOrder {
  readonly #kind: SchedulerKind;
  readonly #evaluations: number;
  readonly #needsNoise: boolean;
  #next = 0;

  constructor(kind: SchedulerKind, evaluations: number, needsNoise: boolean) {
    this.#kind = kind;
    this.#evaluations = evaluations;
    this.#needsNoise = needsNoise;
  }

  /** scaleModelInput(i) is for the evaluation the next step() consumes. */
  checkScale(stepIndex: number): void {
    this.#checkIndex('scaleModelInput', stepIndex);
  }

  /** Validates step(i)'s arguments and moves on to i + 1. */
  advance(stepIndex: number, modelOutput: Float32Array, sample: Float32Array, noise: Float32Array | undefined): void {
    this.#checkIndex('step', stepIndex);
    if (modelOutput.length !== sample.length) {
      throw new Error(`${this.#kind} step ${stepIndex}: model output has ${modelOutput.length} values, sample has ${sample.length}`);
    }
    if (this.#needsNoise && noise === undefined) throw new Error(`${this.#kind} step ${stepIndex}: this scheduler needs a fresh N(0, 1) noise tensor`);
    if (!this.#needsNoise && noise !== undefined) throw new Error(`${this.#kind} step ${stepIndex}: this scheduler is deterministic; pass no noise (check needsNoise)`);
    if (noise !== undefined && noise.length !== sample.length) {
      throw new Error(`${this.#kind} step ${stepIndex}: noise has ${noise.length} values, sample has ${sample.length}`);
    }
    this.#next++;
  }

  #checkIndex(what: string, stepIndex: number): void {
    if (stepIndex !== this.#next || this.#next >= this.#evaluations) {
      const expected = this.#next < this.#evaluations ? `${this.#next}` : `none (all ${this.#evaluations} evaluations are done)`;
      throw new Error(`${this.#kind} ${what}(${stepIndex}) out of order: expected step index ${expected}; create a new scheduler per run`);
    }
  }
}

/** x / √(σ² + 1) with the divisor in float32, as diffusers' `scale_model_input` computes it. */
export function scaleBySigma(sample: Float32Array, sigma: number): Float32Array<ArrayBuffer> {
  const f32 = Math.fround;
  const divisor = f32(Math.sqrt(f32(f32(sigma * sigma) + 1)));
  return sample.map((x) => x / divisor);
}
