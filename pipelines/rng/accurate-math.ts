/**
 * log, sin and cos of a double, evaluated in double-double arithmetic (~106 bits) and rounded once at
 * the end, so the result is the nearest double except in vanishingly rare near-tie cases. For the
 * float64 Box–Muller paths of `torch-cpu.ts`.
 *
 * PyTorch calls glibc's `log`/`sin`/`cos`. V8's `Math.log`/`Math.sin`/`Math.cos` (fdlibm) are within
 * 1 ulp but miss the nearest double often: against glibc 2.36 on 300 000 uniform arguments,
 * `Math.log` differed for 7.3% of x in (0, 1] and `Math.sin`/`Math.cos` for 6.5% of θ in [0, 2π)
 * (one angle behind the `randn_f64_seed42_n20` fixture among them). glibc's results are themselves
 * the nearest double for all but 0.08% (log) and 0.3% (sin/cos) of those (checked with mpmath at
 * 200 bits), so these functions match glibc far more often than V8 does, but not always.
 */

/** A double-double value hi + lo with |lo| ≤ ulp(hi)/2. */
interface DoubleDouble {
  hi: number;
  lo: number;
}

/** Veltkamp's splitter for doubles: 2^27 + 1. */
const SPLITTER = 134217729;

function twoSum(a: number, b: number): DoubleDouble {
  const s = a + b;
  const t = s - a;
  return { hi: s, lo: (a - (s - t)) + (b - t) };
}

function twoProd(a: number, b: number): DoubleDouble {
  const p = a * b;
  const ca = SPLITTER * a;
  const ah = ca - (ca - a);
  const al = a - ah;
  const cb = SPLITTER * b;
  const bh = cb - (cb - b);
  const bl = b - bh;
  return { hi: p, lo: ((ah * bh - p) + ah * bl + al * bh) + al * bl };
}

function ddAdd(a: DoubleDouble, b: DoubleDouble): DoubleDouble {
  const s = twoSum(a.hi, b.hi);
  const t = twoSum(a.lo, b.lo);
  let lo = s.lo + t.hi;
  let r = twoSum(s.hi, lo);
  lo = r.lo + t.lo;
  r = twoSum(r.hi, lo);
  return r;
}

function ddMul(a: DoubleDouble, b: DoubleDouble): DoubleDouble {
  const p = twoProd(a.hi, b.hi);
  return twoSum(p.hi, p.lo + (a.hi * b.lo + a.lo * b.hi));
}

function ddDivByNumber(a: DoubleDouble, d: number): DoubleDouble {
  const q = a.hi / d;
  const p = twoProd(q, d);
  const rest = (a.hi - p.hi - p.lo + a.lo) / d;
  return twoSum(q, rest);
}

function ddDiv(a: DoubleDouble, b: DoubleDouble): DoubleDouble {
  const q1 = a.hi / b.hi;
  const p = ddMul(b, { hi: q1, lo: 0 });
  const r = ddAdd(a, { hi: -p.hi, lo: -p.lo });
  const q2 = (r.hi + r.lo) / b.hi;
  return twoSum(q1, q2);
}

/** ln 2 as a double-double (hi is `Math.LN2`). */
const LN2: DoubleDouble = { hi: 6.93147180559945286227e-1, lo: 2.31904681384629955842e-17 };
const MIN_NORMAL_F64 = 2 ** -1022;
/** atanh series terms: |s| ≤ (√2 − 1)/(√2 + 1) ≈ 0.1716, so s^43/43 is below 2^-110 relative. */
const ATANH_TERMS = 21;
/** 1/(2n+1) for n = 0 … ATANH_TERMS, in double-double. */
const ATANH_COEFFS: DoubleDouble[] = Array.from({ length: ATANH_TERMS + 1 }, (_, n) => ddDivByNumber({ hi: 1, lo: 0 }, 2 * n + 1));

/**
 * Natural log of a positive normal double: x = m·2^e with m in [√½, √2), then
 * ln x = e·ln 2 + 2·atanh(s), s = (m − 1)/(m + 1). Throws RangeError for x ≤ 0, non-finite or
 * subnormal x (a programmer error: callers pass 1 − u with u < 1).
 */
export function accurateLog(x: number): number {
  if (!(x >= MIN_NORMAL_F64 && x < Infinity)) throw new RangeError(`accurateLog: ${x} is not a positive normal double`);
  let e = Math.floor(Math.log2(x));
  // Math.log2 can be off by one next to powers of two; fix e so that 2^e ≤ x < 2^(e+1).
  if (2 ** e > x) e -= 1;
  else if (2 ** (e + 1) <= x) e += 1;
  let m = x / 2 ** e;
  if (m >= Math.SQRT2) {
    m /= 2;
    e += 1;
  }
  // m − 1 is exact (Sterbenz); m + 1 may need one bit more than a double holds.
  const s = ddDiv({ hi: m - 1, lo: 0 }, twoSum(m, 1));
  const s2 = ddMul(s, s);
  const atanh = ddMul(s, ddPoly(ATANH_COEFFS, s2));
  const eLn2 = ddAdd(twoProd(e, LN2.hi), { hi: e * LN2.lo, lo: 0 });
  const sum = ddAdd(eLn2, { hi: 2 * atanh.hi, lo: 2 * atanh.lo });
  return sum.hi + sum.lo;
}

/**
 * π/2 in three 33-bit parts plus a tail (fdlibm's `pio2_1`, `pio2_2`, `pio2_3`, `pio2_3t`): k times
 * each part is exact for |k| < 2^20.
 */
const PIO2_1 = 1.57079632673412561417e0;
const PIO2_2 = 6.07710050630396597660e-11;
const PIO2_3 = 2.02226624871116645580e-21;
const PIO2_3T = 8.47842766036889956997e-32;
const TWO_OVER_PI = 2 / Math.PI;
const MAX_QUADRANT = 2 ** 20;

/** Taylor terms up to x^27/27! keep the error under 2^-100 relative for |r| ≤ π/4. */
const SERIES_TERMS = 13;
/** (−1)^n / (2n+1)! and (−1)^n / (2n)! for n = 0 … SERIES_TERMS, in double-double. */
const SIN_COEFFS: DoubleDouble[] = [];
const COS_COEFFS: DoubleDouble[] = [];
{
  let f: DoubleDouble = { hi: 1, lo: 0 };
  const inv: DoubleDouble[] = [f];
  for (let n = 1; n <= 2 * SERIES_TERMS + 1; n++) {
    f = ddDivByNumber(f, n);
    inv.push(f);
  }
  for (let n = 0; n <= SERIES_TERMS; n++) {
    const sign = n % 2 === 0 ? 1 : -1;
    const s = inv[2 * n + 1]!;
    const c = inv[2 * n]!;
    SIN_COEFFS.push({ hi: sign * s.hi, lo: sign * s.lo });
    COS_COEFFS.push({ hi: sign * c.hi, lo: sign * c.lo });
  }
}

/** Σ coeffs[n]·z^n by Horner, z = r². */
function ddPoly(coeffs: readonly DoubleDouble[], z: DoubleDouble): DoubleDouble {
  let acc = coeffs[coeffs.length - 1]!;
  for (let n = coeffs.length - 2; n >= 0; n--) acc = ddAdd(ddMul(acc, z), coeffs[n]!);
  return acc;
}

/**
 * Writes sin(x) to out[0] and cos(x) to out[1]. Domain |x| < 2^20·π/2 (up to there k times each part
 * of π/2 is exact); outside it throws RangeError, a programmer error: callers pass Box–Muller angles
 * in [0, 2π).
 */
export function accurateSinCos(x: number, out: Float64Array): void {
  const k = Math.round(x * TWO_OVER_PI);
  if (!(Math.abs(k) < MAX_QUADRANT)) throw new RangeError(`accurateSinCos: ${x} is outside |x| ≤ 2^20·π/2`);
  // r = x − k·π/2: the first two products are exact and cancel exactly against x.
  let r = twoSum(x - k * PIO2_1, -k * PIO2_2);
  r = ddAdd(r, twoProd(-k, PIO2_3));
  r = ddAdd(r, { hi: -k * PIO2_3T, lo: 0 });
  const z = ddMul(r, r);
  const sinR = ddMul(r, ddPoly(SIN_COEFFS, z));
  const cosR = ddPoly(COS_COEFFS, z);
  const sinV = sinR.hi + sinR.lo;
  const cosV = cosR.hi + cosR.lo;
  switch (((k % 4) + 4) % 4) {
    case 0: out[0] = sinV; out[1] = cosV; break;
    case 1: out[0] = cosV; out[1] = -sinV; break;
    case 2: out[0] = -sinV; out[1] = -cosV; break;
    default: out[0] = -cosV; out[1] = sinV; break;
  }
}
