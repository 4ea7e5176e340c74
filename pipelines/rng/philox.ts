/**
 * Philox4x32 (Salmon, Moraes, Dror, Shaw 2011, "Parallel random numbers: as easy as 1, 2, 3", SC'11,
 * §4.2) and A1111's "NV" noise source built on it.
 *
 * | name       | meaning                                                                       |
 * | ---------- | ----------------------------------------------------------------------------- |
 * | X0…X3      | the 4×32-bit counter block, transformed in place by each round                 |
 * | K0, K1     | the 2×32-bit key, bumped by the Weyl constants W0, W1 between rounds            |
 * | M0, M1     | the round multipliers; mulhilo(M, X) is the full 64-bit product split in two    |
 *
 * One round: (hi0, lo0) = mulhilo(M0, X0), (hi1, lo1) = mulhilo(M1, X2), then
 * X' = (hi1 ⊕ X1 ⊕ K0, lo1, hi0 ⊕ X3 ⊕ K1, lo0). Philox4x32-10 runs 10 rounds with the key bumped
 * after each of the first 9.
 *
 * A1111's `modules/rng_philox.py` (stable-diffusion-webui, commit ef1698fd6dbd6387341a1eeeded068ff1476ee50,
 * setting "Random number generator source: NV") reproduces `torch.randn(shape, device="cuda")` on any
 * device. Its construction, which `NvGenerator` follows:
 * - key = the 64-bit seed, K0 = its low word, K1 = its high word;
 * - counter for element i (row-major, i < 2^32) of the o-th `randn` call on the generator:
 *   (X0, X1, X2, X3) = (o, 0, i, 0); o starts at 0 and goes up by one per call, whatever the size;
 * - of the four output words only X0 and X1 are used (x, y), one normal per element:
 *   u = x·2^-32 + 2^-33, v = y·c + c/2 with c = float32(2.3283064e-10 · 6.2831855),
 *   value = float32(sqrt(−2·ln u) · sin v).
 *   u and v are float64: numpy promotes uint32 × float32 to float64, and the whole transform runs in
 *   float64 before the final cast (CUDA's curand computes the same formula in float32, so A1111's
 *   values and torch's CUDA values agree to float32 rounding, not always bitwise; we follow A1111).
 *   `Math.log`/`Math.sin` may differ from numpy's in the last bit of the double; that changes the
 *   float32 result only when it straddles a float32 rounding boundary (about 2^-29 per value).
 *
 * The module's docstring prints seed 0, shape (3, 4); those values are the formula with the exact
 * constants 2^-32 and 2π/2^32 (they agree to 5e-9), while the module's code, with 2π/2^32 rounded to
 * float32, returns values up to 2.1e-7 away; `test/rng.test.ts` checks both.
 */

/** Philox4x32 round multipliers and Weyl key increments (golden ratio, √3 − 1), from the paper. */
export const PHILOX_M4X32_0 = 0xd2511f53;
export const PHILOX_M4X32_1 = 0xcd9e8d57;
export const PHILOX_W32_0 = 0x9e3779b9;
export const PHILOX_W32_1 = 0xbb67ae85;
/** The round count the paper recommends (and torch/curand use). */
export const PHILOX_DEFAULT_ROUNDS = 10;

const HALF_WORD = 0x10000;

/** High 32 bits of the 64-bit product of two uint32, from 16-bit halves (every partial is exact). */
function mulHi32(a: number, b: number): number {
  const aLo = a & 0xffff;
  const aHi = a >>> 16;
  const bLo = b & 0xffff;
  const bHi = b >>> 16;
  const loLo = aLo * bLo;
  const hiLo = aHi * bLo;
  const loHi = aLo * bHi;
  // Bits 16…47 of the product, before the carry into the high word: < 2^33, exact in a double.
  const middle = (loLo >>> 16) + (hiLo & 0xffff) + loHi;
  return (aHi * bHi + (hiLo >>> 16) + Math.floor(middle / HALF_WORD)) >>> 0;
}

/**
 * Philox4x32-R on one counter block; `rounds` defaults to 10. Writes the four output words to `out`
 * (which may be `counter` itself) and returns it.
 */
export function philox4x32(
  counter: ArrayLike<number>,
  key: ArrayLike<number>,
  out: Uint32Array = new Uint32Array(4),
  rounds: number = PHILOX_DEFAULT_ROUNDS,
): Uint32Array {
  let x0 = counter[0]! >>> 0;
  let x1 = counter[1]! >>> 0;
  let x2 = counter[2]! >>> 0;
  let x3 = counter[3]! >>> 0;
  let k0 = key[0]! >>> 0;
  let k1 = key[1]! >>> 0;
  for (let r = 0; r < rounds; r++) {
    if (r > 0) {
      k0 = (k0 + PHILOX_W32_0) >>> 0;
      k1 = (k1 + PHILOX_W32_1) >>> 0;
    }
    const hi0 = mulHi32(PHILOX_M4X32_0, x0);
    const lo0 = Math.imul(PHILOX_M4X32_0, x0) >>> 0;
    const hi1 = mulHi32(PHILOX_M4X32_1, x2);
    const lo1 = Math.imul(PHILOX_M4X32_1, x2) >>> 0;
    x0 = (hi1 ^ x1 ^ k0) >>> 0;
    x1 = lo1;
    x2 = (hi0 ^ x3 ^ k1) >>> 0;
    x3 = lo0;
  }
  out[0] = x0;
  out[1] = x1;
  out[2] = x2;
  out[3] = x3;
  return out;
}

/** A1111's constants: 2^-32 written as a float32 literal (it rounds to exactly 2^-32) and 2π/2^32. */
const TWO_POW32_INV = Math.fround(2.3283064e-10);
const TWO_POW32_INV_2PI = Math.fround(2.3283064e-10 * 6.2831855);
/** Counter word X2 holds the element index, so one call yields at most 2^32 values. */
const MAX_ELEMENTS_PER_CALL = 2 ** 32;
const UINT32_MASK = 0xffffffffn;

/**
 * A1111's "NV" generator (`rng_philox.Generator`): the same draws as `torch.randn(..., device="cuda")`
 * for a seed, computed on the CPU. Each `randn` call moves to the next counter offset.
 */
export class NvGenerator {
  readonly #key: Uint32Array;
  #offset = 0;

  /** `seed` is an integer 0 … 2^64 − 1 (validated input; a seed out of range throws RangeError). */
  constructor(seed: number | bigint) {
    const s = typeof seed === 'bigint' ? seed : BigInt(seed);
    if (s < 0n || s > (1n << 64n) - 1n) throw new RangeError(`seed ${s} is outside 0 … 2^64 − 1`);
    this.#key = new Uint32Array([Number(s & UINT32_MASK), Number((s >> 32n) & UINT32_MASK)]);
  }

  /** The next `randn(shape)`, float32, row-major. */
  randn(shape: readonly number[]): Float32Array {
    let n = 1;
    for (const d of shape) {
      if (!Number.isSafeInteger(d) || d < 0) throw new RangeError(`shape [${shape.join(', ')}] has a bad dimension ${d}`);
      n *= d;
    }
    if (n > MAX_ELEMENTS_PER_CALL) throw new RangeError(`shape [${shape.join(', ')}] has ${n} elements; one NV draw holds at most 2^32`);
    const out = new Float32Array(n);
    const counter = new Uint32Array([this.#offset, 0, 0, 0]);
    const block = new Uint32Array(4);
    for (let i = 0; i < n; i++) {
      counter[2] = i;
      philox4x32(counter, this.#key, block);
      const u = block[0]! * TWO_POW32_INV + TWO_POW32_INV / 2;
      const v = block[1]! * TWO_POW32_INV_2PI + TWO_POW32_INV_2PI / 2;
      out[i] = Math.sqrt(-2 * Math.log(u)) * Math.sin(v);
    }
    this.#offset = (this.#offset + 1) >>> 0;
    return out;
  }
}
