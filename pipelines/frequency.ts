/**
 * Frequency profiling for CMLoRA (methods.md 2.2 A, from the official `fft_analysis.ipynb`):
 * grayscale (mean of RGB) → 2-D FFT → shift the zero frequency to the centre → log magnitude
 * (+1e-8) → radial profile (mean over integer-radius rings around the centre) → divide by the
 * profile's maximum → high-frequency score = mean of the profile over radii ≥ r_min
 * (72 at 512², i.e. ≈ 0.2 of the largest radius). A higher score means a "high-frequency" LoRA.
 */

/** In-place iterative radix-2 FFT of length n (a power of two). */
function fftPow2(re: Float64Array, im: Float64Array): void {
  const n = re.length;
  for (let i = 1, j = 0; i < n; i++) {
    let bit = n >> 1;
    for (; j & bit; bit >>= 1) j ^= bit;
    j ^= bit;
    if (i < j) {
      [re[i], re[j]] = [re[j]!, re[i]!];
      [im[i], im[j]] = [im[j]!, im[i]!];
    }
  }
  for (let len = 2; len <= n; len <<= 1) {
    const ang = (-2 * Math.PI) / len;
    for (let i = 0; i < n; i += len) {
      for (let k = 0; k < len / 2; k++) {
        const wr = Math.cos(ang * k);
        const wi = Math.sin(ang * k);
        const a = i + k;
        const b = a + len / 2;
        const tr = re[b]! * wr - im[b]! * wi;
        const ti = re[b]! * wi + im[b]! * wr;
        re[b] = re[a]! - tr;
        im[b] = im[a]! - ti;
        re[a] = re[a]! + tr;
        im[a] = im[a]! + ti;
      }
    }
  }
}

/** 1-D DFT of any length (radix-2 when possible, else the direct sum). */
function dft1d(re: Float64Array, im: Float64Array): void {
  const n = re.length;
  if ((n & (n - 1)) === 0) return fftPow2(re, im);
  const or = new Float64Array(n);
  const oi = new Float64Array(n);
  for (let k = 0; k < n; k++) {
    let sr = 0;
    let si = 0;
    for (let t = 0; t < n; t++) {
      const a = (-2 * Math.PI * k * t) / n;
      sr += re[t]! * Math.cos(a) - im[t]! * Math.sin(a);
      si += re[t]! * Math.sin(a) + im[t]! * Math.cos(a);
    }
    or[k] = sr;
    oi[k] = si;
  }
  re.set(or);
  im.set(oi);
}

/** |FFT2(plane)|, fft-shifted (zero frequency at (⌊h/2⌋, ⌊w/2⌋)). */
export function shiftedMagnitude(plane: ArrayLike<number>, h: number, w: number): Float64Array {
  const re = Float64Array.from(plane);
  const im = new Float64Array(h * w);
  const rowRe = new Float64Array(w);
  const rowIm = new Float64Array(w);
  for (let y = 0; y < h; y++) {
    rowRe.set(re.subarray(y * w, (y + 1) * w));
    rowIm.set(im.subarray(y * w, (y + 1) * w));
    dft1d(rowRe, rowIm);
    re.set(rowRe, y * w);
    im.set(rowIm, y * w);
  }
  const colRe = new Float64Array(h);
  const colIm = new Float64Array(h);
  for (let x = 0; x < w; x++) {
    for (let y = 0; y < h; y++) {
      colRe[y] = re[y * w + x]!;
      colIm[y] = im[y * w + x]!;
    }
    dft1d(colRe, colIm);
    for (let y = 0; y < h; y++) {
      re[y * w + x] = colRe[y]!;
      im[y * w + x] = colIm[y]!;
    }
  }
  const out = new Float64Array(h * w);
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) {
      const sy = (y + Math.floor(h / 2)) % h;
      const sx = (x + Math.floor(w / 2)) % w;
      out[sy * w + sx] = Math.hypot(re[y * w + x]!, im[y * w + x]!);
    }
  }
  return out;
}

/** Mean over integer-radius rings around the centre, r = ⌊√(dx² + dy²)⌋. */
export function radialProfile(values: ArrayLike<number>, h: number, w: number): Float64Array {
  const cy = Math.floor(h / 2);
  const cx = Math.floor(w / 2);
  const maxR = Math.floor(Math.hypot(Math.max(cy, h - 1 - cy), Math.max(cx, w - 1 - cx)));
  const sum = new Float64Array(maxR + 1);
  const count = new Float64Array(maxR + 1);
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) {
      const r = Math.floor(Math.hypot(y - cy, x - cx));
      sum[r]! += values[y * w + x]!;
      count[r]! += 1;
    }
  }
  return sum.map((s, r) => (count[r]! > 0 ? s / count[r]! : 0));
}

/**
 * The high-frequency score of a plane: mean of the max-normalised radial profile over radii
 * ≥ `radiusFraction` × the largest radius. `logMagnitude` uses log(|F| + 1e-8) as the image
 * profiling does; the online latent test uses |F|. NaN when no ring is that far out.
 */
export function radialHighFrequencyScore(plane: ArrayLike<number>, h: number, w: number, radiusFraction: number, options: { logMagnitude: boolean }): number {
  const mag = shiftedMagnitude(plane, h, w);
  const values = options.logMagnitude ? mag.map((m) => Math.log(m + 1e-8)) : mag;
  const profile = radialProfile(values, h, w);
  let max = -Infinity;
  for (const v of profile) max = Math.max(max, v);
  const from = Math.ceil(radiusFraction * (profile.length - 1));
  let acc = 0;
  let n = 0;
  for (let r = from; r < profile.length; r++) {
    acc += profile[r]! / max;
    n++;
  }
  return n === 0 ? NaN : acc / n;
}

/** The official image threshold: radii ≥ 72 of a 512² image (largest radius ≈ 362). */
export const IMAGE_RADIUS_FRACTION = 72 / 362;

/** High-frequency score of an RGB image (1, 3, H, W) in [0, 1]. */
export function imageFrequencyScore(image: { readonly shape: readonly number[]; readonly data: Float32Array }): number {
  const [, , h, w] = image.shape as [number, number, number, number];
  const plane = new Float32Array(h * w);
  for (let c = 0; c < 3; c++) for (let p = 0; p < h * w; p++) plane[p]! += image.data[c * h * w + p]! / 3;
  return radialHighFrequencyScore(plane, h, w, IMAGE_RADIUS_FRACTION, { logMagnitude: true });
}

/**
 * Classes from scores: a LoRA scoring at least the mean of the stack is high-frequency (so the
 * highest-scoring LoRA always is); the rest are low-frequency.
 */
export function classifyByScore(scores: readonly number[]): Array<'high' | 'low'> {
  const mean = scores.reduce((a, b) => a + b, 0) / scores.length;
  return scores.map((s) => (s >= mean ? 'high' : 'low'));
}
