/**
 * CLoRA's masks and masked fusion (pipelines/strategies/gradient-masks.ts, clora.ts `cloraMasks`):
 * thresholds, union, morphology, slot 0 filling, nearest upsampling and the fusion on small cases
 * worked out by hand; then every step of the reference CLoRA run (tiny-sd15-ref
 * `clora/seed53_256x256`): masks from its stored maps (exact) and the fused, guided noise prediction
 * from its stored per-slot predictions.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import * as path from 'node:path';
import { openSafetensors } from '../models/index.ts';
import { maskedMean, slotMasks, thresholdMask, upsampleNearest } from '../pipelines/strategies/gradient-masks.ts';
import { cloraMasks, type CloraPlan } from '../pipelines/strategies/clora.ts';
import { guide } from '../pipelines/strategies/setup.ts';
import { REF, assertClose, readManifest } from './fixtures.ts';

/** A (cells, S = 2) map whose token 1 column is `values`. */
const mapOf = (values: readonly number[]) => Float32Array.from(values.flatMap((v) => [0, v]));

describe('masks and fusion on small cases', () => {
  test('threshold is strict and relative to each token map\'s max; tokens are united', () => {
    // max 1 → threshold 0.5: 0.5 is out (strict), 0.6 in.
    assert.deepEqual([...thresholdMask(mapOf([1, 0.5, 0.6, 0.1]), 2, 4, [1], 0.5)], [1, 0, 1, 0]);
    // Two tokens (S = 3, tokens 1 and 2): the union of each token's own threshold.
    const map = Float32Array.from([[0, 1, 0], [0, 0.1, 0.2], [0, 0, 0.3], [0, 0.2, 0.1]].flat());
    assert.deepEqual([...thresholdMask(map, 3, 4, [1], 0.5)], [1, 0, 0, 0]);
    assert.deepEqual([...thresholdMask(map, 3, 4, [2], 0.5)], [0, 1, 1, 0]);
    assert.deepEqual([...thresholdMask(map, 3, 4, [1, 2], 0.5)], [1, 1, 1, 0]);
  });

  test('slot 0 fills what no slot covers; slots without tokens stay empty', () => {
    const masks = slotMasks([mapOf([0, 0, 0, 0]), mapOf([1, 0, 0, 0]), mapOf([0, 0, 0, 1])], [2, 2, 2], [2, 2], [[], [1], [1]], 0.5);
    assert.deepEqual(masks.map((m) => [...m]), [
      [0, 1, 1, 0],
      [1, 0, 0, 0],
      [0, 0, 0, 1],
    ]);
    // Overlap: both slots on at cell 0, slot 0 stays off there.
    const overlap = slotMasks([mapOf([0, 0, 0, 0]), mapOf([1, 0, 0, 0]), mapOf([1, 0, 0, 0])], [2, 2, 2], [2, 2], [[], [1], [1]], 0.5);
    assert.deepEqual([...overlap[0]!], [0, 1, 1, 1]);
  });

  test('3×3 morphology: dilate grows, erode shrinks, at the borders too', () => {
    const centre = mapOf([0, 0, 0, 0, 1, 0, 0, 0, 0]);
    const dilated = slotMasks([mapOf(new Array(9).fill(0)), centre], [2, 2], [3, 3], [[], [1]], 0.5, ['dilate']);
    assert.deepEqual([...dilated[1]!], new Array(9).fill(1));
    const corner = mapOf([1, 1, 0, 1, 1, 0, 0, 0, 0]);
    const eroded = slotMasks([mapOf(new Array(9).fill(0)), corner], [2, 2], [3, 3], [[], [1]], 0.5, ['erode']);
    // Erosion pads with 1 (max-pool of 1 − M ignores the border): the 2×2 corner keeps only its top-left cell.
    assert.deepEqual([...eroded[1]!], [1, 0, 0, 0, 0, 0, 0, 0, 0]);
  });

  test('nearest upsampling copies each cell into its block', () => {
    assert.deepEqual([...upsampleNearest(Float32Array.from([1, 0, 0, 1]), 2, 2, 4, 4)], [1, 1, 0, 0, 1, 1, 0, 0, 0, 0, 1, 1, 0, 0, 1, 1]);
  });

  test('fusion: masked mean per pixel over the slots, overlaps averaged, channels share the mask', () => {
    const masks = [Float32Array.from([1, 0]), Float32Array.from([1, 1])];
    // 2 channels × 2 pixels.
    const eps = [Float32Array.from([2, 10, 4, 20]), Float32Array.from([4, 6, 8, 30])];
    assert.deepEqual([...maskedMean(eps, masks)], [3, 6, 6, 30]);
  });
});

describe('masks and fusion of the reference CLoRA run (clora/seed53_256x256)', () => {
  const manifest = readManifest(path.join(REF, 'gradient_methods_manifest.json'));
  const c = manifest.cases.find((x: { id: string }) => x.id === 'clora/seed53_256x256');
  const ref = openSafetensors(path.join(REF, 'gradient_methods.safetensors'));
  const read = (k: string) => ref.readFloat32(c.outputs[k].key);
  const plan: CloraPlan = { slots: [], groups: c.important_token_indices, maskTokens: c.mask_indices, mapGrid: c.attn_res, latentGrid: c.latent_hw };

  test('masks of every step from its stored maps: exact', () => {
    const maps = read('step.attn_maps'); // (T, P, 8, 8, 77)
    const [T, P, h, w, S] = maps.shape as [number, number, number, number, number];
    const grid = read('step.masks_grid').data;
    const latent = read('step.masks').data;
    let onCells = 0;
    for (let i = 0; i < T; i++) {
      const perSlot = Array.from({ length: P }, (_, p) => maps.data.subarray((i * P + p) * h * w * S, (i * P + p + 1) * h * w * S));
      const m = cloraMasks(plan, perSlot, 1, new Array(P).fill(S), { maskThreshold: c.knobs.mask_threshold_alpha, morphology: [] });
      m.gridMasks.forEach((g, p) => assert.deepEqual([...g], [...grid.subarray((i * P + p) * h * w, (i * P + p + 1) * h * w)], `step ${i} slot ${p} grid mask`));
      const [lh, lw] = c.latent_hw;
      m.masks.forEach((g, p) => assert.deepEqual([...g], [...latent.subarray((i * P + p) * lh * lw, (i * P + p + 1) * lh * lw)], `step ${i} slot ${p} mask`));
      onCells += m.gridMasks[1]!.reduce((a, v) => a + v, 0);
    }
    assert.ok(onCells > 0 && onCells < T * h * w, 'slot 1 masks are neither empty nor full');
  });

  test('fused, guided noise prediction of every step from its stored slot predictions and masks', (t) => {
    const slots = read('step.noise_pred_slots'); // (T, P, 2, 4, h, w)
    const masks = read('step.masks'); // (T, P, h, w)
    const fused = read('step.noise_pred');
    const [T, P, , C, lh, lw] = slots.shape as number[] as [number, number, number, number, number, number];
    const per = C * lh * lw;
    let worst = 0;
    for (let i = 0; i < T; i++) {
      const m = Array.from({ length: P }, (_, p) => masks.data.subarray((i * P + p) * lh * lw, (i * P + p + 1) * lh * lw));
      const half = (k: number) => Array.from({ length: P }, (_, p) => slots.data.subarray(((i * P + p) * 2 + k) * per, ((i * P + p) * 2 + k + 1) * per));
      const eps = guide(maskedMean(half(0), m), maskedMean(half(1), m), c.knobs.guidance_scale ?? 10);
      worst = Math.max(worst, assertClose(eps, fused.data.subarray(i * per, (i + 1) * per), c.tolerance.per_step.noise_pred_atol, `step ${i} fused ε`));
    }
    t.diagnostic(`max |diff| ${worst.toExponential(2)} (atol ${c.tolerance.per_step.noise_pred_atol})`);
    ref.close();
  });
});
