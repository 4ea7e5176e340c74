/**
 * Regions on the host: each region's area on every UNet level's grid, and the per-pixel LoRA
 * strengths those areas imply.
 *
 * Grids: level 0 is the latent grid (H/8 × W/8); each deeper level is ⌈h/2⌉ × ⌈w/2⌉ (a stride-2
 * 3×3 conv with padding 1). Boxes are rounded to each grid as Mix-of-Show does: normalised
 * (top, left, bottom, right) = (y/H, x/W, (y+h)/H, (x+w)/W) → rows ⌈top·h_l⌉ … ⌊bottom·h_l⌋ − 1,
 * columns ⌈left·w_l⌉ … ⌊right·w_l⌋ − 1 (a small box may vanish on coarse grids, as there).
 * Painted masks (PNG: the alpha channel when it varies, else luminance) are stretched to the image
 * and averaged over each grid cell; a cell belongs to the region when the average is ≥ ½.
 *
 * Overlaps are defined: cross-attention averages the regions covering a pixel (Mix-of-Show), and
 * LoRA strengths are averaged the same way: at pixel q,
 *   strength_k(q) = global_k + Σ_r m_r(q) · s_{r,k} / max(count(q), 1).
 */
import * as fs from 'node:fs';
import sharp from 'sharp';
import type { Tensor } from '../models/index.ts';
import { PipelineError } from './errors.ts';
import type { JobRegion } from './job.ts';

/** (h, w) of every UNet level for a latent of h0 × w0. */
export function levelSizes(h0: number, w0: number, levels: number): Array<[number, number]> {
  const sizes: Array<[number, number]> = [];
  let h = h0;
  let w = w0;
  for (let l = 0; l < levels; l++) {
    sizes.push([h, w]);
    h = Math.ceil(h / 2);
    w = Math.ceil(w / 2);
  }
  return sizes;
}

/** A box's 0/1 mask on an h × w grid (Mix-of-Show rounding). */
export function boxMask(box: readonly [number, number, number, number], imageW: number, imageH: number, h: number, w: number): Float32Array {
  const [x, y, bw, bh] = box;
  const top = Math.ceil((y / imageH) * h);
  const left = Math.ceil((x / imageW) * w);
  const bottom = Math.floor(((y + bh) / imageH) * h);
  const right = Math.floor(((x + bw) / imageW) * w);
  const m = new Float32Array(h * w);
  for (let i = Math.max(0, top); i < Math.min(h, bottom); i++) for (let j = Math.max(0, left); j < Math.min(w, right); j++) m[i * w + j] = 1;
  return m;
}

/** A full-resolution mask (imageH × imageW values in [0, 1]) averaged onto an h × w grid, ≥ ½ → 1. */
export function poolMask(full: Float32Array, imageW: number, imageH: number, h: number, w: number): Float32Array {
  const m = new Float32Array(h * w);
  for (let i = 0; i < h; i++) {
    const y0 = Math.floor((i * imageH) / h);
    const y1 = Math.max(y0 + 1, Math.floor(((i + 1) * imageH) / h));
    for (let j = 0; j < w; j++) {
      const x0 = Math.floor((j * imageW) / w);
      const x1 = Math.max(x0 + 1, Math.floor(((j + 1) * imageW) / w));
      let acc = 0;
      for (let y = y0; y < y1; y++) for (let x = x0; x < x1; x++) acc += full[y * imageW + x]!;
      m[i * w + j] = acc / ((y1 - y0) * (x1 - x0)) >= 0.5 ? 1 : 0;
    }
  }
  return m;
}

/** Read a painted mask PNG as image-size values in [0, 1]. Throws BAD_IMAGE naming the file. */
export async function readMaskFile(file: string, imageW: number, imageH: number): Promise<Float32Array> {
  let bytes: Buffer;
  try {
    bytes = fs.readFileSync(file);
  } catch (e) {
    throw new PipelineError('BAD_IMAGE', `region mask ${file}: cannot read it (${(e as NodeJS.ErrnoException).code ?? (e as Error).message}).`, { file });
  }
  try {
    const img = sharp(bytes).resize(imageW, imageH, { fit: 'fill', kernel: 'nearest' });
    const { data, info } = await img.ensureAlpha().raw().toBuffer({ resolveWithObject: true });
    const n = imageW * imageH;
    const alpha = new Float32Array(n);
    const luma = new Float32Array(n);
    let alphaVaries = false;
    for (let p = 0; p < n; p++) {
      const o = p * info.channels;
      alpha[p] = data[o + 3]! / 255;
      luma[p] = (0.299 * data[o]! + 0.587 * data[o + 1]! + 0.114 * data[o + 2]!) / 255;
      if (alpha[p] !== alpha[0]) alphaVaries = true;
    }
    return alphaVaries ? alpha : luma;
  } catch (e) {
    throw new PipelineError('BAD_IMAGE', `region mask ${file}: not a readable image (${(e as Error).message}).`, { file });
  }
}

/** Every region's mask on every level: masks[l] is (1, R, h_l, w_l). */
export async function regionMasks(regions: readonly JobRegion[], imageW: number, imageH: number, sizes: ReadonlyArray<[number, number]>): Promise<Tensor<'float32'>[]> {
  const full = await Promise.all(regions.map((r) => (r.mask === undefined ? undefined : readMaskFile(r.mask, imageW, imageH))));
  return sizes.map(([h, w]) => {
    const data = new Float32Array(regions.length * h * w);
    regions.forEach((r, i) => data.set(r.box !== undefined ? boxMask(r.box, imageW, imageH, h, w) : poolMask(full[i]!, imageW, imageH, h, w), i * h * w));
    return { dtype: 'float32', shape: [1, regions.length, h, w], data };
  });
}

/**
 * Per-pixel adapter strengths on each level: (1, K, h_l, w_l) with
 * strength_k(q) = global_k + Σ_r m_r(q) s_{r,k} / max(count(q), 1).
 */
export function pixelStrengths(masks: readonly Tensor<'float32'>[], global: readonly number[], perRegion: readonly (readonly number[])[]): Tensor<'float32'>[] {
  const K = global.length;
  return masks.map((m) => {
    const [, R, h, w] = m.shape as [number, number, number, number];
    const n = h * w;
    const data = new Float32Array(K * n);
    for (let q = 0; q < n; q++) {
      let count = 0;
      for (let r = 0; r < R; r++) count += m.data[r * n + q]!;
      for (let k = 0; k < K; k++) {
        let acc = 0;
        for (let r = 0; r < R; r++) acc += m.data[r * n + q]! * perRegion[r]![k]!;
        data[k * n + q] = global[k]! + acc / Math.max(count, 1);
      }
    }
    return { dtype: 'float32', shape: [1, K, h, w], data };
  });
}
