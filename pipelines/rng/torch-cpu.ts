/**
 * PyTorch's CPU generator, reproduced draw for draw: `torch.Generator("cpu").manual_seed(seed)` followed
 * by `torch.randn` / `torch.rand`, as diffusers and ComfyUI use it for their initial latents and
 * ancestral noise.
 *
 * The behaviour follows PyTorch 1.13 (`aten/src/ATen/CPUGeneratorImpl.cpp`,
 * `aten/src/ATen/core/DistributionsHelper.h`, `aten/src/ATen/native/cpu/DistributionTemplates.h`,
 * `aten/src/ATen/native/cpu/avx_mathfun.h`); the current main branch draws the same way (its < 16
 * path writes log1p(−u2) for log(1 − u2), equal up to libm rounding). The fixtures in
 * `shared/fixtures/rng/` (see its README, section `rng/`) are the reference.
 *
 * | name            | meaning                                                                      |
 * | --------------- | ---------------------------------------------------------------------------- |
 * | mt()            | next 32-bit output of mt19937, seeded with the low 32 bits of the seed         |
 * | u (float32)     | `(mt() & 0xFFFFFF)·2^-24`, in [0, 1)                                         |
 * | u (float64)     | the low 53 bits of `(mt() << 32) \| mt()`, times 2^-53, in [0, 1)              |
 * | r, θ            | Box–Muller radius `sqrt(−2·ln(1 − u_a))` and angle `2π·u_b`                   |
 *
 * `randn` has two paths, picked by element count (all our tensors are contiguous):
 * - n ≥ 16 ("normal_fill"): draw n uniforms, transform each block of 16 as 8 pairs (j, j+8); if n is
 *   not a multiple of 16, draw 16 more uniforms for the last 16 positions and transform them again,
 *   overwriting the overlap.
 * - n < 16: one double-precision Box–Muller pair per two outputs, the sine half cached in the
 *   generator and returned by the next < 16 draw (even one from a later call); `manualSeed` clears it.
 *
 * For float32 with n ≥ 16 x86-64 builds of PyTorch run the AVX2 kernel, whose log/sin/cos are the
 * Cephes float32 polynomials of Pommier's `avx_mathfun`, compiled by GCC with its multiply-adds
 * contracted into FMAs (`-ffp-contract=fast` is GCC's default). That arithmetic is emulated here
 * operation by operation, FMAs included; with it every fixture value is bitwise equal, while plain
 * mul-then-add rounding leaves ~1% of the values 1–2 ulp off. Builds without AVX2 (ARM, e.g. Apple
 * silicon) use libm's float32 functions instead and can differ from these draws in the last bits.
 *
 * The double-precision paths (n < 16, and float64) call glibc's log/sin/cos; `accurate-math.ts`
 * stands in for them, since V8's `Math.log`/`Math.sin`/`Math.cos` miss glibc's result far more often.
 */

import { accurateLog, accurateSinCos } from './accurate-math.ts';

/** mt19937 parameters (Matsumoto & Nishimura 1998, and C++ [rand.predef]). */
const MT_N = 624;
const MT_M = 397;
const MT_MATRIX_A = 0x9908b0df;
const MT_UPPER_MASK = 0x80000000;
const MT_LOWER_MASK = 0x7fffffff;
const MT_INIT_MULTIPLIER = 1812433253;

/** The 32-bit Mersenne Twister, as `at::mt19937` (the standard generator, 32-bit seed). */
export class Mt19937 {
  readonly #state = new Uint32Array(MT_N);
  #index = MT_N;

  constructor(seed32: number) {
    const s = this.#state;
    s[0] = seed32 >>> 0;
    for (let i = 1; i < MT_N; i++) {
      const prev = s[i - 1]!;
      s[i] = (Math.imul(MT_INIT_MULTIPLIER, prev ^ (prev >>> 30)) + i) >>> 0;
    }
  }

  /** The next 32-bit output, as an unsigned number. */
  nextUint32(): number {
    if (this.#index >= MT_N) this.#twist();
    let y = this.#state[this.#index++]!;
    y ^= y >>> 11;
    y ^= (y << 7) & 0x9d2c5680;
    y ^= (y << 15) & 0xefc60000;
    y ^= y >>> 18;
    return y >>> 0;
  }

  #twist(): void {
    const s = this.#state;
    for (let i = 0; i < MT_N; i++) {
      const y = (s[i]! & MT_UPPER_MASK) | (s[(i + 1) % MT_N]! & MT_LOWER_MASK);
      s[i] = s[(i + MT_M) % MT_N]! ^ (y >>> 1) ^ (y & 1 ? MT_MATRIX_A : 0);
    }
    this.#index = 0;
  }
}

/** float32 uniforms keep `FLOAT_DIGITS` bits of one mt() output; float64 ones keep `DOUBLE_DIGITS` of two. */
const FLOAT_DIGITS = 24;
const DOUBLE_DIGITS = 53;
const FLOAT_MASK = (1 << FLOAT_DIGITS) - 1;
const FLOAT_SCALE = 2 ** -FLOAT_DIGITS;
const DOUBLE_SCALE = 2 ** -DOUBLE_DIGITS;
/** The high word of a 64-bit draw contributes its low 53 − 32 = 21 bits. */
const DOUBLE_HIGH_MASK = (1 << (DOUBLE_DIGITS - 32)) - 1;
const TWO_POW_32 = 2 ** 32;
/** normal_fill transforms blocks of 16 values: 8 radii (first half) × 8 angles (second half). */
const FILL_BLOCK = 16;
const FILL_HALF = FILL_BLOCK / 2;

const f32 = Math.fround;
const TWO_PI = 2 * Math.PI;
/** `_mm256_set1_ps(2.0f * c10::pi<double>)`: 2π computed in double, stored as float32. */
const TWO_PI_F32 = f32(TWO_PI);

/** Seeds span the 64-bit range PyTorch accepts: 0 … 2^64 − 1. */
export const SEED_MAX = (1n << 64n) - 1n;

/**
 * `torch.Generator("cpu")`. The seed is an integer 0 … 2^64 − 1 (pass seeds above 2^53 as bigint);
 * like PyTorch, only its low 32 bits reach mt19937, so 2^32 + s draws what s draws. Validating user
 * input is `parseSeed`'s job (`index.ts`): a seed outside that range here is a programmer error.
 */
export class TorchCpuGenerator {
  #mt: Mt19937;
  /** `next_double_normal_sample_`: the cached sine half of the < 16 path's last Box–Muller pair. */
  #cachedNormal: number | undefined;
  readonly #sinCos = new Float64Array(2);

  constructor(seed: number | bigint) {
    this.#mt = new Mt19937(low32(seed));
    this.#cachedNormal = undefined;
  }

  /** `generator.manual_seed(seed)`: restarts mt19937 and drops the cached normal. */
  manualSeed(seed: number | bigint): void {
    this.#mt = new Mt19937(low32(seed));
    this.#cachedNormal = undefined;
  }

  /** `torch.randn(shape, generator=g)` in float32. */
  randn(shape: readonly number[]): Float32Array {
    const n = elementCount(shape);
    const out = new Float32Array(n);
    if (n >= FILL_BLOCK) {
      this.#normalFill(out, () => this.#uniformFloat32(), transformBlockAvx2);
    } else {
      for (let i = 0; i < n; i++) out[i] = this.#normalDouble();
    }
    return out;
  }

  /** `torch.randn(shape, dtype=torch.float64, generator=g)`. */
  randnFloat64(shape: readonly number[]): Float64Array {
    const n = elementCount(shape);
    const out = new Float64Array(n);
    if (n >= FILL_BLOCK) this.#normalFill(out, () => this.#uniformFloat64(), transformBlockFloat64);
    else for (let i = 0; i < n; i++) out[i] = this.#normalDouble();
    return out;
  }

  /** `torch.rand(shape, generator=g)` in float32: one mt() per element. */
  rand(shape: readonly number[]): Float32Array {
    const out = new Float32Array(elementCount(shape));
    for (let i = 0; i < out.length; i++) out[i] = this.#uniformFloat32();
    return out;
  }

  /** `torch.rand(shape, dtype=torch.float64, generator=g)`: two mt() per element. */
  randFloat64(shape: readonly number[]): Float64Array {
    const out = new Float64Array(elementCount(shape));
    for (let i = 0; i < out.length; i++) out[i] = this.#uniformFloat64();
    return out;
  }

  #uniformFloat32(): number {
    return (this.#mt.nextUint32() & FLOAT_MASK) * FLOAT_SCALE;
  }

  /** `random64()` is `(first << 32) | second`; the mask keeps the first word's low 21 bits. */
  #uniformFloat64(): number {
    const hi = this.#mt.nextUint32() & DOUBLE_HIGH_MASK;
    const lo = this.#mt.nextUint32();
    return (hi * TWO_POW_32 + lo) * DOUBLE_SCALE;
  }

  /** `normal_fill`: uniforms for every element, then Box–Muller per block, then the tail redraw. */
  #normalFill<T extends Float32Array | Float64Array>(out: T, uniform: () => number, transform: (data: T, start: number) => void): void {
    const n = out.length;
    for (let i = 0; i < n; i++) out[i] = uniform();
    for (let i = 0; i + FILL_BLOCK <= n; i += FILL_BLOCK) transform(out, i);
    if (n % FILL_BLOCK !== 0) {
      const start = n - FILL_BLOCK;
      for (let i = start; i < n; i++) out[i] = uniform();
      transform(out, start);
    }
  }

  /** `at::normal_distribution<double>` with its one-value cache (the < 16 path, any dtype). */
  #normalDouble(): number {
    const cached = this.#cachedNormal;
    if (cached !== undefined) {
      this.#cachedNormal = undefined;
      return cached;
    }
    const u1 = this.#uniformFloat64();
    const u2 = this.#uniformFloat64();
    const r = Math.sqrt(-2 * accurateLog(1 - u2));
    accurateSinCos(TWO_PI * u1, this.#sinCos);
    this.#cachedNormal = r * this.#sinCos[0]!;
    return r * this.#sinCos[1]!;
  }
}

function low32(seed: number | bigint): number {
  const s = typeof seed === 'bigint' ? seed : BigInt(seed);
  if (s < 0n || s > SEED_MAX) throw new RangeError(`seed ${s} is outside 0 … 2^64 − 1`);
  return Number(s & 0xffffffffn);
}

function elementCount(shape: readonly number[]): number {
  let n = 1;
  for (const d of shape) {
    if (!Number.isSafeInteger(d) || d < 0) throw new RangeError(`shape [${shape.join(', ')}] has a bad dimension ${d}`);
    n *= d;
  }
  return n;
}

/** `normal_fill_16<double>`; glibc's log/sin/cos are approximated by the double-double ones. */
function transformBlockFloat64(data: Float64Array, start: number): void {
  const sinCos = new Float64Array(2);
  for (let j = start; j < start + FILL_HALF; j++) {
    const radius = Math.sqrt(-2 * accurateLog(1 - data[j]!));
    accurateSinCos(TWO_PI * data[j + FILL_HALF]!, sinCos);
    data[j] = radius * sinCos[1]!;
    data[j + FILL_HALF] = radius * sinCos[0]!;
  }
}

/** `normal_fill_16_AVX2`, one lane at a time. */
function transformBlockAvx2(data: Float32Array, start: number): void {
  const sinCos = new Float64Array(2);
  for (let j = start; j < start + FILL_HALF; j++) {
    const u1 = f32(1 - data[j]!);
    const radius = f32(Math.sqrt(f32(-2 * logCephesF32(u1))));
    const theta = f32(TWO_PI_F32 * data[j + FILL_HALF]!);
    sinCosCephesF32(theta, sinCos);
    // The kernel ends with fmadd(n, std, mean); at std 1, mean 0 that is n itself.
    data[j] = f32(radius * sinCos[1]!);
    data[j + FILL_HALF] = f32(radius * sinCos[0]!);
  }
}

/*
 * Cephes single-precision constants (Moshier, Cephes `logf.c` / `sinf.c`), as avx_mathfun stores them:
 * decimal literals rounded to float32.
 */
const CEPHES_SQRTHF = f32(0.707106781186547524);
const CEPHES_LOG_P = [
  7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1, 1.4249322787e-1,
  -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1, 3.3333331174e-1,
].map(f32);
/** ln 2 = Q2 + Q1, Q2 with few significant bits so that e·Q2 is exact. */
const CEPHES_LOG_Q1 = f32(-2.12194440e-4);
const CEPHES_LOG_Q2 = f32(0.693359375);
const CEPHES_FOPI = f32(1.27323954473516); // 4/π
/** −π/4 in three parts for the extended-precision argument reduction (DP1, DP2 with few bits). */
const CEPHES_MINUS_DP1 = f32(-0.78515625);
const CEPHES_MINUS_DP2 = f32(-2.4187564849853515625e-4);
const CEPHES_MINUS_DP3 = f32(-3.77489497744594108e-8);
const CEPHES_SINCOF = [-1.9515295891e-4, 8.3321608736e-3, -1.6666654611e-1].map(f32);
const CEPHES_COSCOF = [2.443315711809948e-5, -1.388731625493765e-3, 4.166664568298827e-2].map(f32);

const FLOAT32_MIN_NORMAL = 2 ** -126;
const FLOAT32_EXPONENT_BIAS = 127;
const FLOAT32_MANTISSA_BITS = 23;
const FLOAT32_EXPONENT_FIELD = 0x7f800000;
/** The exponent field of 0.5f: OR-ed onto a bare mantissa it gives a value in [0.5, 1). */
const FLOAT32_HALF_EXPONENT = 0x3f000000;

const bitsView = new DataView(new ArrayBuffer(4));

/** The adjacent float32 of the float32 r, in the direction of the sign of `direction`. */
function nextFloat32(r: number, direction: number): number {
  if (r === 0) return direction > 0 ? FLOAT32_MIN_SUBNORMAL : -FLOAT32_MIN_SUBNORMAL;
  bitsView.setFloat32(0, r, true);
  const bits = bitsView.getInt32(0, true);
  // Sign-magnitude: stepping away from zero adds one to the bit pattern, towards zero subtracts one.
  bitsView.setInt32(0, (r > 0) === (direction > 0) ? bits + 1 : bits - 1, true);
  return bitsView.getFloat32(0, true);
}
const FLOAT32_MIN_SUBNORMAL = 2 ** -149;

/**
 * fmaf(a, b, c) for float32 a, b, c: a·b is exact in double, but rounding a·b + c to double and then
 * to float32 can land on a float32 midpoint the exact sum was not on. TwoSum recovers the part the
 * double sum dropped, which decides such ties.
 */
function fmaF32(a: number, b: number, c: number): number {
  const p = a * b;
  const s = p + c;
  const t = s - p;
  const err = (p - (s - t)) + (c - t);
  const r = f32(s);
  if (err === 0 || r === s) return r;
  const d = s - r;
  const neighbour = nextFloat32(r, d);
  if ((r + neighbour) / 2 !== s) return r;
  return (err > 0) === (d > 0) ? neighbour : r;
}

/**
 * avx_mathfun `log256_ps` for one positive float32 x: x = m·2^e with m in [0.5, 1); m below √½ is
 * doubled into [√½, √2); then ln(1 + f) = f − f²/2 + f³·P(f), plus e·ln 2 in two parts. The
 * multiply-adds are FMAs, as GCC contracts them.
 */
function logCephesF32(xIn: number): number {
  bitsView.setFloat32(0, Math.max(xIn, FLOAT32_MIN_NORMAL), true);
  const bits = bitsView.getUint32(0, true);
  let e = (bits >>> FLOAT32_MANTISSA_BITS) - FLOAT32_EXPONENT_BIAS + 1;
  bitsView.setUint32(0, (bits & ~FLOAT32_EXPONENT_FIELD) | FLOAT32_HALF_EXPONENT, true);
  let x = bitsView.getFloat32(0, true);
  if (x < CEPHES_SQRTHF) {
    e -= 1;
    x = f32(f32(x - 1) + x);
  } else {
    x = f32(x - 1);
  }
  const z = f32(x * x);
  let y = CEPHES_LOG_P[0]!;
  for (let k = 1; k < CEPHES_LOG_P.length; k++) y = fmaF32(y, x, CEPHES_LOG_P[k]!);
  y = f32(y * x);
  y = fmaF32(y, z, f32(e * CEPHES_LOG_Q1));
  y = fmaF32(-z, 0.5, y);
  return fmaF32(e, CEPHES_LOG_Q2, f32(x + y));
}

/**
 * avx_mathfun `sincos256_ps` for one float32 x ≥ 0 (θ is never negative here): reduce by j·π/4 with
 * j = (⌊x·4/π⌋ + 1) & ~1, evaluate both polynomials, then pick and sign them by the octant.
 * Writes sin to out[0] and cos to out[1].
 */
function sinCosCephesF32(xIn: number, out: Float64Array): void {
  const j = (Math.trunc(f32(xIn * CEPHES_FOPI)) + 1) & ~1;
  let x = fmaF32(j, CEPHES_MINUS_DP1, xIn);
  x = fmaF32(j, CEPHES_MINUS_DP2, x);
  x = fmaF32(j, CEPHES_MINUS_DP3, x);
  const z = f32(x * x);

  // cos(x) ≈ 1 − z/2 + z²·C(z)
  let cosPoly = fmaF32(CEPHES_COSCOF[0]!, z, CEPHES_COSCOF[1]!);
  cosPoly = fmaF32(cosPoly, z, CEPHES_COSCOF[2]!);
  cosPoly = f32(cosPoly * z);
  cosPoly = fmaF32(cosPoly, z, -f32(z * 0.5));
  cosPoly = f32(cosPoly + 1);

  // sin(x) ≈ x + x·z·S(z)
  let sinPoly = fmaF32(CEPHES_SINCOF[0]!, z, CEPHES_SINCOF[1]!);
  sinPoly = fmaF32(sinPoly, z, CEPHES_SINCOF[2]!);
  sinPoly = f32(sinPoly * z);
  sinPoly = fmaF32(sinPoly, x, x);

  const sinUsesSinPoly = (j & 2) === 0;
  const sinNegative = (j & 4) !== 0;
  const cosNegative = (~(j - 2) & 4) !== 0;
  const s = sinUsesSinPoly ? sinPoly : cosPoly;
  const c = sinUsesSinPoly ? cosPoly : sinPoly;
  out[0] = sinNegative ? -s : s;
  out[1] = cosNegative ? -c : c;
}
