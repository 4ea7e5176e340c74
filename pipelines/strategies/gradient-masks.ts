/**
 * CLoRA's attention masks and masked fusion of noise predictions (Meral et al., arXiv 2403.19776;
 * official `pipeline_clora.py` `attention_map_to_mask` and the fusion in `__call__`, @ 76def7c).
 *
 * | code            | symbol |
 * |-----------------|--------|
 * | `maps[p]`       | A_p (h·w, S): slot p's 1/32-grid cross-attention map, row-major (y, x) |
 * | `tokens[p]`     | slot p's mask tokens j (CLIP positions) |
 * | `alpha`         | α, `mask_threshold_alpha` |
 * | `masks[p]`      | M_p on the latent grid, 0/1 |
 *
 *   M_p = ∪_j [A_p[:, :, j] > α · max A_p[:, :, j]]      (strict; slots without tokens: 0)
 *   then optional 3×3 morphology (dilate = max-pool, erode = 1 − max-pool(1 − M), in the official order
 *   dilate, erode, opening, closing); then M_0 ← 1 wherever no slot is on; nearest upsampling.
 *   ε_u = Σ_p M_p ε_u,p / Σ_p M_p,  ε_c likewise,  ε = ε_u + w (ε_c − ε_u)   (pixel-wise, over channels)
 */

export type Morphology = 'dilate' | 'erode' | 'opening' | 'closing';

const f32 = Math.fround;

/** 3×3 max-pool, stride 1, padding 1 (padding never wins: it is −∞ in `F.max_pool2d`). */
function maxPool3(m: Float32Array, h: number, w: number): Float32Array {
  const out = new Float32Array(h * w);
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) {
      let best = -Infinity;
      for (let dy = -1; dy <= 1; dy++) for (let dx = -1; dx <= 1; dx++) {
        const yy = y + dy;
        const xx = x + dx;
        if (yy >= 0 && yy < h && xx >= 0 && xx < w) best = Math.max(best, m[yy * w + xx]!);
      }
      out[y * w + x] = best;
    }
  }
  return out;
}

const dilate = (m: Float32Array, h: number, w: number) => maxPool3(m, h, w);
const erode = (m: Float32Array, h: number, w: number) => maxPool3(m.map((v) => 1 - v), h, w).map((v) => 1 - v);

/**
 * One slot's mask on the attention grid from its map (h·w, S) and mask tokens: the union over the
 * tokens of the strict threshold at α times that token map's maximum (float32, as torch compares).
 */
export function thresholdMask(map: ArrayLike<number>, seq: number, cells: number, tokens: readonly number[], alpha: number): Float32Array {
  const mask = new Float32Array(cells);
  for (const j of tokens) {
    let max = -Infinity;
    for (let q = 0; q < cells; q++) max = Math.max(max, map[q * seq + j]!);
    const threshold = f32(max * f32(alpha));
    for (let q = 0; q < cells; q++) if (map[q * seq + j]! > threshold) mask[q] = 1;
  }
  return mask;
}

/** The slots' masks on the attention grid (h × w): thresholds, morphology, slot 0 fills the rest. */
export function slotMasks(maps: readonly ArrayLike<number>[], seqs: readonly number[], grid: readonly [number, number], tokens: readonly (readonly number[])[], alpha: number, morphology: readonly Morphology[] = []): Float32Array[] {
  const [h, w] = grid;
  const masks = maps.map((map, p) => {
    let m = tokens[p]!.length === 0 ? new Float32Array(h * w) : thresholdMask(map, seqs[p]!, h * w, tokens[p]!, alpha);
    if (tokens[p]!.length === 0) return m;
    if (morphology.includes('dilate')) m = dilate(m, h, w);
    if (morphology.includes('erode')) m = erode(m, h, w);
    if (morphology.includes('opening')) m = dilate(erode(m, h, w), h, w);
    if (morphology.includes('closing')) m = erode(dilate(m, h, w), h, w);
    return m;
  });
  for (let q = 0; q < h * w; q++) if (masks.every((m) => m[q] === 0)) masks[0]![q] = 1;
  return masks;
}

/** Nearest upsampling (`F.interpolate(mode="nearest")`: src = ⌊dst · in/out⌋) of an h × w grid to H × W. */
export function upsampleNearest(m: Float32Array, h: number, w: number, H: number, W: number): Float32Array {
  const out = new Float32Array(H * W);
  for (let y = 0; y < H; y++) {
    const sy = Math.min(h - 1, Math.floor((y * h) / H));
    for (let x = 0; x < W; x++) out[y * W + x] = m[sy * w + Math.min(w - 1, Math.floor((x * w) / W))]!;
  }
  return out;
}

/**
 * Masked mean of the slots' predictions: Σ_p M_p ε_p / Σ_p M_p per pixel, for C channels sharing a
 * mask (h·w per mask, C·h·w per ε), in float32 in the official order (products summed over the
 * slots, then divided by the summed masks).
 */
export function maskedMean(eps: readonly Float32Array[], masks: readonly Float32Array[]): Float32Array {
  const cells = masks[0]!.length;
  const out = new Float32Array(eps[0]!.length);
  for (let i = 0; i < out.length; i++) {
    const q = i % cells;
    let num = 0;
    let den = 0;
    for (let p = 0; p < eps.length; p++) {
      num = f32(num + f32(eps[p]![i]! * masks[p]![q]!));
      den = f32(den + masks[p]![q]!);
    }
    out[i] = f32(num / den);
  }
  return out;
}
