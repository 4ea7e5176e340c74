/**
 * A small, fast, seeded PRNG for benchmark data (random weights and inputs). Not for anything that
 * needs statistical quality beyond "looks like noise": the benchmarks only need finite activations
 * and reproducible bytes.
 *
 * Generator: xoshiro128** (Blackman & Vigna, https://prng.di.unimi.it/xoshiro128starstar.c), state
 * seeded through splitmix32 so nearby seeds give unrelated streams. Streams are keyed by
 * (seed, label), so a tensor's values do not depend on which tensors were generated before it.
 */

const TWO_POW_32 = 4294967296;

/** FNV-1a over the UTF-16 code units of `text`, mixed with `seed`: the stream key. */
function hashLabel(seed: number, text: string): number {
  let h = (0x811c9dc5 ^ seed) >>> 0;
  for (let i = 0; i < text.length; i++) {
    h ^= text.charCodeAt(i);
    h = Math.imul(h, 0x01000193) >>> 0;
  }
  return h;
}

/** splitmix32 step (used only to expand one 32-bit key into the 128-bit state). */
function splitmix32(state: { s: number }): number {
  state.s = (state.s + 0x9e3779b9) | 0;
  let z = state.s;
  z = Math.imul(z ^ (z >>> 16), 0x85ebca6b);
  z = Math.imul(z ^ (z >>> 13), 0xc2b2ae35);
  return (z ^ (z >>> 16)) >>> 0;
}

export class SeededRandom {
  #a: number;
  #b: number;
  #c: number;
  #d: number;

  /** A stream for `label` (e.g. a tensor name) under `seed`. */
  constructor(seed: number, label: string) {
    const st = { s: hashLabel(seed, label) };
    this.#a = splitmix32(st);
    this.#b = splitmix32(st);
    this.#c = splitmix32(st);
    this.#d = splitmix32(st);
    if ((this.#a | this.#b | this.#c | this.#d) === 0) this.#a = 1; // the all-zero state is a fixed point
  }

  /** Next 32 random bits as an unsigned integer. */
  nextUint32(): number {
    const result = Math.imul(rotl(Math.imul(this.#b, 5), 7), 9);
    const t = this.#b << 9;
    this.#c ^= this.#a;
    this.#d ^= this.#b;
    this.#b ^= this.#c;
    this.#a ^= this.#d;
    this.#c ^= t;
    this.#d = rotl(this.#d, 11);
    return result >>> 0;
  }

  /** Uniform in [0, 1). */
  nextFloat(): number {
    return this.nextUint32() / TWO_POW_32;
  }

  /** Fill `out` with values uniform in [−amplitude, amplitude). */
  fillUniform(out: Float32Array, amplitude: number): void {
    const scale = (2 * amplitude) / TWO_POW_32;
    for (let i = 0; i < out.length; i++) out[i] = this.nextUint32() * scale - amplitude;
  }

  /** Fill `out` with standard normal values (Box–Muller, both outputs used). */
  fillNormal(out: Float32Array): void {
    for (let i = 0; i < out.length; i += 2) {
      const u1 = 1 - this.nextFloat(); // (0, 1]: log stays finite
      const u2 = this.nextFloat();
      const r = Math.sqrt(-2 * Math.log(u1));
      out[i] = r * Math.cos(2 * Math.PI * u2);
      if (i + 1 < out.length) out[i + 1] = r * Math.sin(2 * Math.PI * u2);
    }
  }
}

function rotl(x: number, k: number): number {
  return (x << k) | (x >>> (32 - k));
}
