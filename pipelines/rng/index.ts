/**
 * Seeded noise for the denoising loop: the initial latents and the per-step noise of ancestral
 * samplers, reproducing the seeds of the tools users compare against.
 *
 * - `'cpu'`: PyTorch's CPU generator, `torch.Generator("cpu").manual_seed(seed)` + `torch.randn`, as
 *   diffusers and ComfyUI draw (and A1111 with "Random number generator source: CPU").
 * - `'nv'`: A1111's "NV" source, which reproduces on any hardware what A1111's default "GPU" source
 *   draws on an NVIDIA card (torch CUDA's Philox), up to float32 rounding.
 *
 * Successive `randn` calls on one generator continue its stream, as successive torch calls do.
 */
import { PipelineError } from '../errors.ts';
import { NvGenerator } from './philox.ts';
import { SEED_MAX, TorchCpuGenerator } from './torch-cpu.ts';

export { SEED_MAX } from './torch-cpu.ts';

export type RngKind = 'cpu' | 'nv';

export interface NoiseGenerator {
  readonly kind: RngKind;
  /** The next standard-normal draw of `shape`, float32, row-major (PyTorch's layout). */
  randn(shape: readonly number[]): Float32Array;
}

/**
 * A generator of the given kind, seeded. `seed` is an integer 0 … 2^64 − 1; numbers must be safe
 * integers (pass larger seeds as bigint). Throws `PipelineError('BAD_SEED')` otherwise; parse user
 * text with `parseSeed` first.
 */
export function createGenerator(kind: RngKind, seed: number | bigint): NoiseGenerator {
  const s = parseSeed(seed);
  switch (kind) {
    case 'cpu': {
      const g = new TorchCpuGenerator(s);
      return { kind, randn: (shape) => g.randn(shape) };
    }
    case 'nv': {
      const g = new NvGenerator(s);
      return { kind, randn: (shape) => g.randn(shape) };
    }
    default: {
      const unknown: never = kind;
      throw new PipelineError('BAD_ARGUMENT', `unknown noise generator kind ${JSON.stringify(unknown)}: expected 'cpu' or 'nv'.`, { kind: unknown });
    }
  }
}

const DECIMAL_INTEGER = /^\d+$/;
const NEGATIVE_DECIMAL_INTEGER = /^-\d+$/;
/** Longer rejected text is cut in the message (the full value stays in `details.value`). */
const SHOWN_TEXT_MAX = 40;

/**
 * A seed as a bigint in 0 … 2^64 − 1, from decimal text (surrounding whitespace allowed), a number
 * or a bigint. `-1` ("random seed" in the UIs) is not special here: resolve it before calling.
 * Throws `PipelineError('BAD_SEED')`, whose message and `details.value` name the rejected value, for
 * negative, too large, fractional or non-numeric input, and for numbers above 2^53 − 1 (a JavaScript
 * number cannot hold them exactly).
 */
export function parseSeed(value: string | number | bigint): bigint {
  const shown = typeof value === 'string'
    ? JSON.stringify(value.length > SHOWN_TEXT_MAX ? `${value.slice(0, SHOWN_TEXT_MAX)}…` : value)
    : String(value);
  const reject = (why: string): never => {
    throw new PipelineError(
      'BAD_SEED',
      `seed ${shown} ${why}. Enter a whole number from 0 to ${SEED_MAX}.`,
      { value: typeof value === 'bigint' ? value.toString() : value, min: '0', max: SEED_MAX.toString() },
    );
  };
  let seed: bigint;
  if (typeof value === 'bigint') {
    seed = value;
  } else if (typeof value === 'number') {
    if (!Number.isInteger(value)) reject(Number.isFinite(value) ? 'is not a whole number' : 'is not a finite number');
    if (!Number.isSafeInteger(value)) reject('is beyond 2^53 − 1, where a JavaScript number is no longer exact: pass it as a string or bigint');
    seed = BigInt(value);
  } else {
    const text = value.trim();
    if (!DECIMAL_INTEGER.test(text)) {
      reject(NEGATIVE_DECIMAL_INTEGER.test(text) ? 'is negative' : 'is not a decimal whole number');
    }
    seed = BigInt(text);
  }
  if (seed < 0n) reject('is negative');
  if (seed > SEED_MAX) reject(`is larger than 2^64 − 1`);
  return seed;
}
