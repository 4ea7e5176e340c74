/**
 * LoRA-Composer's losses on the 1/32-grid attention maps, their gradients, and its latent
 * re-initialisation (Yang et al., arXiv 2403.11627; official `region_lora/multi_lora_sample.py`
 * `_compute_max_attention_per_index`, `_compute_loss`, `replace_latents`, and
 * `utils/gaussian_smoothing.py`, main @ a48a5a5).
 *
 * | code           | symbol |
 * |----------------|--------|
 * | `regionMap`    | A_r (h·w, S): region r's keys against every query (mean over heads and layers) |
 * | `selfMap`      | S (h·w, h·w): self-attention probabilities, isolation bias included |
 * | `smooth(·)`    | Â: 3×3 Gaussian smoothing, reflect padding |
 * | `box`          | B_r: rows ⌈top·h⌉…⌊bottom·h⌋−1, cols ⌈left·w⌉…⌊right·w⌋−1 |
 * | `bump`         | G_r: exp(−(u²+v²)/2), u, v = linspace(−1, 1) over the box's rows/cols, scaled to max 1 |
 * | `k`            | ⌊ρ·|B_r|⌋ (ρ = top-k ratio 0.2, |B_r| in grid cells) |
 *
 * Per region r and concept token j:
 *   L_box  = α · max(0, 1 − mean(top-k(Â ⊙ G_r)))                              α = 8
 *   L_fill = β · mean_cols |max_rows(Â ⊙ B_r) − 1[col ∈ B_r]| + β · (same, rows and cols swapped)   β = 2
 * per region r:
 *   L_region = max(0, γ · mean(top-k(S[q ∈ B_r, k ∉ B_r])))                     γ = 10
 *   L = Σ L_box + Σ L_region + Σ L_fill_x + Σ L_fill_y.
 * Gradients: top-k and max route to the selected cells (torch's backward of `topk` and `max(dim)`),
 * |·| has sign(·) (0 at 0), the smoothing's transpose folds the reflect padding back. Computed in
 * float64 from the float32 maps.
 *
 * Deviation: with k = 0 (a box under 5 grid cells) the official mean of an empty top-k is NaN and
 * Python's `max(0, nan)` makes the term 0; here the term is 0 directly, with no gradient.
 */

/** The official `GaussianSmoothing(kernel_size=3, sigma=0.5)`: exp(−((x − μ)/(2σ))²) per axis (its quirk), product, normalised. */
export const SMOOTHING_SIGMA = 0.5;

function smoothingKernel(sigma: number): Float64Array {
  const g = [0, 1, 2].map((x) => Math.exp(-(((x - 1) / (2 * sigma)) ** 2)));
  const k = new Float64Array(9);
  let sum = 0;
  for (let a = 0; a < 3; a++) for (let b = 0; b < 3; b++) sum += (k[a * 3 + b] = g[a]! * g[b]!);
  return k.map((v) => v / sum);
}

/** Reflect padding index (`F.pad(mode="reflect")`: the edge is not repeated). */
const reflect = (i: number, n: number): number => (n === 1 ? 0 : i < 0 ? -i : i >= n ? 2 * (n - 1) - i : i);

/** Â = smooth(A), h × w. */
export function smooth(a: ArrayLike<number>, h: number, w: number, sigma = SMOOTHING_SIGMA): Float64Array {
  const k = smoothingKernel(sigma);
  const out = new Float64Array(h * w);
  for (let y = 0; y < h; y++) for (let x = 0; x < w; x++) {
    let acc = 0;
    for (let dy = -1; dy <= 1; dy++) for (let dx = -1; dx <= 1; dx++) acc += k[(dy + 1) * 3 + dx + 1]! * a[reflect(y + dy, h) * w + reflect(x + dx, w)]!;
    out[y * w + x] = acc;
  }
  return out;
}

/** The transpose of `smooth`: ∂L/∂A from ∂L/∂Â. */
function smoothBackward(dOut: Float64Array, h: number, w: number, sigma = SMOOTHING_SIGMA): Float64Array {
  const k = smoothingKernel(sigma);
  const dA = new Float64Array(h * w);
  for (let y = 0; y < h; y++) for (let x = 0; x < w; x++) {
    const g = dOut[y * w + x]!;
    if (g === 0) continue;
    for (let dy = -1; dy <= 1; dy++) for (let dx = -1; dx <= 1; dx++) {
      const at = reflect(y + dy, h) * w + reflect(x + dx, w);
      dA[at] = dA[at]! + k[(dy + 1) * 3 + dx + 1]! * g;
    }
  }
  return dA;
}

/** A box on the grid: rows [top, bottom), cols [left, right). */
export interface GridBox {
  readonly top: number;
  readonly left: number;
  readonly bottom: number;
  readonly right: number;
}

/** Normalised (top, left, bottom, right) → grid cells, rounded as the official code (ceil start, floor end). */
export function gridBox(norm: readonly [number, number, number, number], h: number, w: number): GridBox {
  const [t, l, b, r] = norm;
  return { top: Math.ceil(t * h), left: Math.ceil(l * w), bottom: Math.floor(b * h), right: Math.floor(r * w) };
}

const inBox = (b: GridBox, y: number, x: number) => y >= b.top && y < b.bottom && x >= b.left && x < b.right;
const cellsOf = (b: GridBox) => Math.max(0, b.bottom - b.top) * Math.max(0, b.right - b.left);

/** `(obj_mask.sum() * top_k_ratio).long()`, in float32 as torch computes it. */
export function topK(box: GridBox, ratio: number): number {
  return Math.floor(Math.fround(cellsOf(box) * Math.fround(ratio)));
}

/** G_r on the grid (0 outside the box). */
export function boxBump(box: GridBox, h: number, w: number): Float64Array {
  const rows = box.bottom - box.top;
  const cols = box.right - box.left;
  const lin = (n: number, i: number) => (n === 1 ? -1 : -1 + (2 * i) / (n - 1));
  const g = new Float64Array(h * w);
  let max = 0;
  for (let i = 0; i < rows; i++) for (let j = 0; j < cols; j++) max = Math.max(max, Math.exp(-(lin(rows, i) ** 2 / 2 + lin(cols, j) ** 2 / 2)));
  for (let i = 0; i < rows; i++) for (let j = 0; j < cols; j++) g[(box.top + i) * w + box.left + j] = Math.exp(-(lin(rows, i) ** 2 / 2 + lin(cols, j) ** 2 / 2)) / max;
  return g;
}

/** Indices of the k largest values (ties: lower index first). */
function topIndices(values: ArrayLike<number>, candidates: readonly number[], k: number): number[] {
  return [...candidates].sort((a, b) => values[b]! - values[a]! || a - b).slice(0, k);
}

export interface RegionLossWeights {
  readonly box: number;
  readonly fill: number;
  readonly region: number;
}

export const COMPOSER_LOSS_WEIGHTS: RegionLossWeights = { box: 8, fill: 2, region: 10 };

export interface RegionLossOptions {
  readonly weights: RegionLossWeights;
  readonly topKRatio: number;
  /** The Gaussian bump on the box term (`gassion_sample`); false: the plain box. */
  readonly gaussianBox: boolean;
  /** `fill_loss` */
  readonly fill: boolean;
  /** `bg_loss` (the region term). */
  readonly region: boolean;
}

export interface RegionLossInput {
  /** Per region r: A_r (h·w, S) flat. */
  readonly regionMaps: readonly ArrayLike<number>[];
  readonly seq: number;
  /** S (h·w, h·w) flat. */
  readonly selfMap: ArrayLike<number>;
  readonly grid: readonly [number, number];
  readonly boxes: readonly GridBox[];
  /** Per region: the concept's token positions (CLIP positions, SOT = 0). */
  readonly tokens: readonly (readonly number[])[];
}

export interface RegionLossResult {
  readonly loss: number;
  /** Weighted terms in the official summation order: box (r, j)…, region r…, fill_x (r, j)…, fill_y (r, j)…. */
  readonly terms: readonly { readonly name: string; readonly value: number }[];
  /** Â per region and token, h × w. */
  readonly smoothed: readonly (readonly Float64Array[])[];
  /** ∂L/∂A_r (h·w, S) per region. */
  readonly dRegionMaps: readonly Float64Array[];
  /** ∂L/∂S (h·w, h·w). */
  readonly dSelfMap: Float64Array;
}

/** L and its gradients with respect to the region maps and the self-attention map. */
export function regionLoss(input: RegionLossInput, options: RegionLossOptions): RegionLossResult {
  const [h, w] = input.grid;
  const cells = h * w;
  const { seq } = input;
  const { weights } = options;
  const boxTerms: { name: string; value: number }[] = [];
  const fillX: { name: string; value: number }[] = [];
  const fillY: { name: string; value: number }[] = [];
  const regionTerms: { name: string; value: number }[] = [];
  const dRegionMaps = input.regionMaps.map(() => new Float64Array(cells * seq));
  const dSelfMap = new Float64Array(cells * cells);
  const smoothed: Float64Array[][] = [];
  input.regionMaps.forEach((map, r) => {
    const box = input.boxes[r]!;
    const k = topK(box, options.topKRatio);
    const bump = options.gaussianBox ? boxBump(box, h, w) : Float64Array.from({ length: cells }, (_, q) => (inBox(box, Math.floor(q / w), q % w) ? 1 : 0));
    const all = Array.from({ length: cells }, (_, q) => q);
    smoothed.push([]);
    input.tokens[r]!.forEach((j, t) => {
      const image = Float64Array.from({ length: cells }, (_, q) => map[q * seq + j]!);
      const hat = smooth(image, h, w);
      smoothed[r]!.push(hat);
      const dHat = new Float64Array(cells);
      // Box term: the k largest of Â ⊙ G over the whole grid (zero outside the box).
      const fg = hat.map((v, q) => v * bump[q]!);
      let box8 = 0;
      if (k > 0) {
        const top = topIndices(fg, all, k);
        const mean = top.reduce((a, q) => a + fg[q]!, 0) / k;
        box8 = weights.box * Math.max(0, 1 - mean);
        if (1 - mean > 0) for (const q of top) dHat[q] = dHat[q]! - (weights.box / k) * bump[q]!;
      }
      boxTerms.push({ name: `box_r${r}_tok${t}`, value: box8 });
      if (options.fill) {
        // fill_x: per column, the max over rows of Â ⊙ B against 1[col ∈ box]; fill_y: rows/cols swapped.
        let sx = 0;
        for (let x = 0; x < w; x++) {
          let best = -Infinity;
          let at = -1;
          for (let y = 0; y < h; y++) {
            const v = inBox(box, y, x) ? hat[y * w + x]! : 0;
            if (v > best) [best, at] = [v, y * w + x];
          }
          const target = x >= box.left && x < box.right && box.bottom > box.top ? 1 : 0;
          sx += Math.abs(best - target);
          if (inBox(box, Math.floor(at / w), at % w)) dHat[at] = dHat[at]! + (weights.fill / w) * Math.sign(best - target);
        }
        fillX.push({ name: `fill_x_r${r}_tok${t}`, value: (weights.fill * sx) / w });
        let sy = 0;
        for (let y = 0; y < h; y++) {
          let best = -Infinity;
          let at = -1;
          for (let x = 0; x < w; x++) {
            const v = inBox(box, y, x) ? hat[y * w + x]! : 0;
            if (v > best) [best, at] = [v, y * w + x];
          }
          const target = y >= box.top && y < box.bottom && box.right > box.left ? 1 : 0;
          sy += Math.abs(best - target);
          if (inBox(box, Math.floor(at / w), at % w)) dHat[at] = dHat[at]! + (weights.fill / h) * Math.sign(best - target);
        }
        fillY.push({ name: `fill_y_r${r}_tok${t}`, value: (weights.fill * sy) / h });
      }
      const dImage = smoothBackward(dHat, h, w);
      const d = dRegionMaps[r]!;
      for (let q = 0; q < cells; q++) d[q * seq + j] = d[q * seq + j]! + dImage[q]!;
    });
    if (options.region) {
      // Region term: queries in the box attending keys outside it.
      const pairs: number[] = [];
      for (let q = 0; q < cells; q++) {
        if (!inBox(box, Math.floor(q / w), q % w)) continue;
        for (let c = 0; c < cells; c++) if (!inBox(box, Math.floor(c / w), c % w)) pairs.push(q * cells + c);
      }
      let value = 0;
      const kk = Math.min(k, pairs.length);
      if (kk > 0) {
        const top = topIndices(input.selfMap, pairs, kk);
        const mean = top.reduce((a, i) => a + input.selfMap[i]!, 0) / kk;
        value = Math.max(0, weights.region * mean);
        if (weights.region * mean > 0) for (const i of top) dSelfMap[i] = dSelfMap[i]! + weights.region / kk;
      }
      regionTerms.push({ name: `region_r${r}`, value });
    }
  });
  const terms = [...boxTerms, ...regionTerms, ...fillX, ...fillY];
  return { loss: terms.reduce((a, t) => a + t.value, 0), terms, smoothed, dRegionMaps, dSelfMap };
}

/** The sums of S_r = Σ_j A_r[:, :, j] over every valid window of the box's size (h − bh + 1, w − bw + 1), row-major. */
export function windowScores(map: ArrayLike<number>, seq: number, grid: readonly [number, number], box: GridBox, tokens: readonly number[]): { scores: Float64Array; rows: number; cols: number } {
  const [h, w] = grid;
  const bh = box.bottom - box.top;
  const bw = box.right - box.left;
  const rows = h - bh + 1;
  const cols = w - bw + 1;
  const scores = new Float64Array(Math.max(0, rows * cols));
  for (let y = 0; y < rows; y++) for (let x = 0; x < cols; x++) {
    let acc = 0;
    for (const j of tokens) for (let i = 0; i < bh; i++) for (let c = 0; c < bw; c++) acc += map[((y + i) * w + x + c) * seq + j]!;
    scores[y * cols + x] = acc;
  }
  return { scores, rows, cols };
}

export interface ReinitWindow {
  /** Top-left grid cell of the best window. */
  readonly at: readonly [number, number];
  readonly scores: Float64Array;
}

/**
 * Latent re-initialisation: for each region, copy the latent patch under its best-scoring window
 * (from the ORIGINAL latents) into its box, then give the result the original's mean and unbiased
 * std. `latents` is (B=1, C, H, W); grid cells are `scale` latent pixels wide (latent W / grid w).
 */
export function reinitLatents(
  latents: Float32Array,
  shape: readonly [number, number, number, number],
  regionMaps: readonly ArrayLike<number>[],
  seq: number,
  grid: readonly [number, number],
  boxes: readonly GridBox[],
  tokens: readonly (readonly number[])[],
): { latents: Float32Array; windows: ReinitWindow[] } {
  const [, C, H, W] = shape;
  const scale = Math.floor(W / grid[1]);
  const out = Float32Array.from(latents);
  const windows: ReinitWindow[] = [];
  regionMaps.forEach((map, r) => {
    const box = boxes[r]!;
    const { scores, cols } = windowScores(map, seq, grid, box, tokens[r]!);
    let best = 0;
    for (let i = 1; i < scores.length; i++) if (scores[i]! > scores[best]!) best = i;
    const [ty, tx] = [Math.floor(best / cols), best % cols];
    windows.push({ at: [ty, tx], scores });
    const bh = (box.bottom - box.top) * scale;
    const bw = (box.right - box.left) * scale;
    for (let c = 0; c < C; c++) for (let i = 0; i < bh; i++) for (let j = 0; j < bw; j++) {
      out[(c * H + box.top * scale + i) * W + box.left * scale + j] = latents[(c * H + ty * scale + i) * W + tx * scale + j]!;
    }
  });
  const stats = (x: Float32Array) => {
    let m = 0;
    for (const v of x) m += v;
    m /= x.length;
    let v2 = 0;
    for (const v of x) v2 += (v - m) ** 2;
    return { mean: m, std: Math.sqrt(v2 / (x.length - 1)) };
  };
  const a = stats(out);
  const b = stats(latents);
  for (let i = 0; i < out.length; i++) out[i] = Math.fround(((out[i]! - a.mean) / a.std) * b.std + b.mean);
  return { latents: out, windows };
}
