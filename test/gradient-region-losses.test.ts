/**
 * LoRA-Composer's losses and re-initialisation on the host (pipelines/strategies/
 * gradient-region-losses.ts): the smoothing kernel and its reflect padding, the box bump, top-k
 * counts, the loss terms on maps worked out by hand, the gradients against central finite
 * differences; then the reference LoRA-Composer run (tiny-sd15-ref `lora_composer/seed1174_256x256`):
 * every update's loss terms and smoothed maps from its stored maps, and the re-initialisation
 * (window scores, chosen windows, latents) from its stored re-init maps.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import * as path from 'node:path';
import { openSafetensors } from '../models/index.ts';
import { COMPOSER_LOSS_WEIGHTS, boxBump, gridBox, regionLoss, reinitLatents, smooth, topK, windowScores, type GridBox, type RegionLossOptions } from '../pipelines/strategies/gradient-region-losses.ts';
import { REF, assertClose, readManifest } from './fixtures.ts';

const OFFICIAL: RegionLossOptions = { weights: COMPOSER_LOSS_WEIGHTS, topKRatio: 0.2, gaussianBox: true, fill: true, region: true };
const close = (a: number, b: number, tol = 1e-4) => assert.ok(Math.abs(a - b) <= tol, `${a} vs ${b}`);

describe('LoRA-Composer losses on small cases', () => {
  test('smoothing: the official kernel (corners 0.0449, edges 0.1221, centre 0.3319), reflect padding', () => {
    const delta = new Float64Array(25);
    delta[12] = 1;
    const out = smooth(delta, 5, 5);
    close(out[12]!, 0.3319);
    close(out[7]!, 0.1221);
    close(out[6]!, 0.0449);
    close(out.reduce((a, v) => a + v, 0), 1, 1e-12);
    // A corner delta: reflect padding mirrors without repeating the edge, so (0, 0) sees it once.
    const corner = new Float64Array(9);
    corner[0] = 1;
    const c = smooth(corner, 3, 3);
    close(c[0]!, 0.3319);
    close(c[1]!, 0.1221);
    close(c[4]!, 0.0449);
  });

  test('box bump: 1 at the centre, e^{−1} at the corners of a 3 × 3 box, 0 outside', () => {
    const box: GridBox = { top: 1, left: 1, bottom: 4, right: 4 };
    const g = boxBump(box, 5, 5);
    close(g[2 * 5 + 2]!, 1, 1e-12);
    close(g[1 * 5 + 1]!, Math.exp(-1), 1e-12);
    assert.equal(g[0], 0);
  });

  test('grid boxes round like the official code; k = ⌊0.2·cells⌋ in float32', () => {
    assert.deepEqual(gridBox([0.125, 0, 1, 0.46875], 8, 8), { top: 1, left: 0, bottom: 8, right: 3 });
    assert.deepEqual(gridBox([0, 0.53125, 0.875, 1], 8, 8), { top: 0, left: 5, bottom: 7, right: 8 });
    assert.equal(topK({ top: 1, left: 0, bottom: 8, right: 3 }, 0.2), 4);
    assert.equal(topK({ top: 0, left: 0, bottom: 2, right: 5 }, 0.2), 2);
    assert.equal(topK({ top: 0, left: 0, bottom: 2, right: 2 }, 0.2), 0);
  });

  test('loss terms on uniform maps: box 8·(1 − ¼), fill 2·⅜ per axis, region 10·1/16', () => {
    // 4 × 4 grid, box = the top-left 2 × 2, uniform maps: A = ¼ (smoothing keeps it), S = 1/16.
    const cells = 16;
    const seq = 3;
    const region = new Float64Array(cells * seq).map((_, i) => (i % seq === 1 ? 0.25 : 0));
    const r = regionLoss(
      { regionMaps: [region], seq, selfMap: new Float64Array(cells * cells).fill(1 / 16), grid: [4, 4], boxes: [{ top: 0, left: 0, bottom: 2, right: 2 }], tokens: [[1]] },
      { ...OFFICIAL, gaussianBox: false, topKRatio: 0.5 },
    );
    assert.deepEqual(r.terms.map((x) => x.name), ['box_r0_tok0', 'region_r0', 'fill_x_r0_tok0', 'fill_y_r0_tok0']);
    const [box, reg, fx, fy] = r.terms.map((x) => x.value);
    close(box!, 6, 1e-12);
    close(reg!, 0.625, 1e-12);
    close(fx!, 0.75, 1e-12);
    close(fy!, 0.75, 1e-12);
    close(r.loss, 8.125, 1e-12);
  });

  test('the gradients match central finite differences', (t) => {
    let s = 5;
    const u = () => ((s = (Math.imul(s, 1103515245) + 12345) >>> 0) + 0.5) / 4294967296;
    const [h, w, seq] = [6, 5, 4];
    const cells = h * w;
    const maps = [Float64Array.from({ length: cells * seq }, () => 0.3 * u()), Float64Array.from({ length: cells * seq }, () => 0.3 * u())];
    const selfMap = Float64Array.from({ length: cells * cells }, () => 0.1 * u());
    const boxes: GridBox[] = [
      { top: 0, left: 0, bottom: 4, right: 3 },
      { top: 2, left: 2, bottom: 6, right: 5 },
    ];
    const input = { regionMaps: maps, seq, selfMap, grid: [h, w] as [number, number], boxes, tokens: [[1, 2], [2]] };
    const base = regionLoss(input, OFFICIAL);
    const step = 1e-7;
    let worst = 0;
    const check = (an: number, plus: number, minus: number) => (worst = Math.max(worst, Math.abs((plus - minus) / (2 * step) - an)));
    for (let r = 0; r < 2; r++) {
      for (let i = 0; i < cells * seq; i++) {
        const at = (d: number) => regionLoss({ ...input, regionMaps: maps.map((m, k) => (k === r ? m.map((v, j) => (j === i ? v + d : v)) : m)) }, OFFICIAL).loss;
        check(base.dRegionMaps[r]![i]!, at(step), at(-step));
      }
    }
    for (let i = 0; i < cells * cells; i += 7) {
      const at = (d: number) => regionLoss({ ...input, selfMap: selfMap.map((v, j) => (j === i ? v + d : v)) }, OFFICIAL).loss;
      check(base.dSelfMap[i]!, at(step), at(-step));
    }
    assert.ok(worst < 1e-5, `max |finite difference − gradient| ${worst}`);
    assert.ok(base.dRegionMaps[0]!.some((v) => v !== 0) && base.dSelfMap.some((v) => v !== 0), 'both maps get a gradient');
    t.diagnostic(`max |finite difference − gradient| ${worst.toExponential(2)}`);
  });

  test('window scores sum the tokens over each valid box-sized window', () => {
    const seq = 2;
    const map = Float64Array.from({ length: 9 * seq }, (_, i) => (i % seq === 1 ? Math.floor(i / seq) : 0)); // token 1 = cell index
    const { scores, rows, cols } = windowScores(map, seq, [3, 3], { top: 0, left: 0, bottom: 2, right: 2 }, [1]);
    assert.deepEqual([rows, cols], [2, 2]);
    assert.deepEqual([...scores], [0 + 1 + 3 + 4, 1 + 2 + 4 + 5, 3 + 4 + 6 + 7, 4 + 5 + 7 + 8]);
  });
});

describe('LoRA-Composer losses and re-initialisation of the reference run (lora_composer/seed1174_256x256)', () => {
  const manifest = readManifest(path.join(REF, 'gradient_methods_manifest.json'));
  const c = manifest.cases.find((x: { id: string }) => x.id === 'lora_composer/seed1174_256x256');
  const ref = openSafetensors(path.join(REF, 'gradient_methods.safetensors'));
  const read = (k: string) => ref.readFloat32(c.outputs[k].key);
  const grid: [number, number] = c.attn_res;
  const boxes: GridBox[] = c.regions.map((r: { box_at_grid: Record<string, number[]> }) => {
    const [top, left, bottom, right] = r.box_at_grid[`${grid[0]}x${grid[1]}`]!;
    return { top, left, bottom, right } as GridBox;
  });
  // Official indices skip SOT: CLIP position = index + 1.
  const tokens: number[][] = c.regions.map((r: { token_idx: number[] }) => r.token_idx.map((j) => j + 1));

  test('loss, terms and smoothed maps of every update from its stored maps', (t) => {
    const maps = read('update.region_maps'); // (U, R, 8, 8, 77)
    const self = read('update.self_attn'); // (U, Q, Q)
    const [U, R, h, w, S] = maps.shape as [number, number, number, number, number];
    const q = h * w;
    const names: string[] = c.loss_term_names;
    const terms = read('update.loss_terms').data;
    const losses = read('update.loss').data;
    const smoothed = read('update.smoothed_maps').data; // (U, R, 2, 8, 8)
    let worst = { loss: 0, terms: 0, smooth: 0 };
    for (let u = 0; u < U; u++) {
      const r = regionLoss(
        {
          regionMaps: Array.from({ length: R }, (_, k) => maps.data.subarray((u * R + k) * q * S, (u * R + k + 1) * q * S)),
          seq: S,
          selfMap: self.data.subarray(u * q * q, (u + 1) * q * q),
          grid,
          boxes,
          tokens,
        },
        OFFICIAL,
      );
      assert.deepEqual(r.terms.map((x) => x.name), names);
      worst.terms = Math.max(worst.terms, assertClose(r.terms.map((x) => x.value), terms.subarray(u * names.length, (u + 1) * names.length), c.tolerance.per_update.loss_terms_atol, `update ${u} terms`));
      worst.loss = Math.max(worst.loss, assertClose([r.loss], [losses[u]!], c.tolerance.per_update.loss_atol, `update ${u} loss`));
      const flat = Float64Array.from(r.smoothed.flatMap((tok) => tok.flatMap((m) => [...m])));
      worst.smooth = Math.max(worst.smooth, assertClose(flat, smoothed.subarray(u * flat.length, (u + 1) * flat.length), c.tolerance.per_update.region_maps_atol, `update ${u} smoothed maps`));
    }
    t.diagnostic(`max |diff|: loss ${worst.loss.toExponential(2)}, terms ${worst.terms.toExponential(2)}, smoothed ${worst.smooth.toExponential(2)}`);
  });

  test('re-initialisation from the stored re-init maps: window scores, windows (exact), latents', (t) => {
    const maps = read('reinit.attn_maps'); // (R, 8, 8, 77)
    const [R, h, w, S] = maps.shape as [number, number, number, number];
    const perRegion = Array.from({ length: R }, (_, r) => maps.data.subarray(r * h * w * S, (r + 1) * h * w * S));
    let worstScores = 0;
    perRegion.forEach((m, r) => {
      const { scores } = windowScores(m, S, grid, boxes[r]!, tokens[r]!);
      worstScores = Math.max(worstScores, assertClose(scores, read(`reinit.window_scores.r${r}`).data, c.tolerance.reinit.attn_maps_atol, `region ${r} window scores`));
    });
    const before = read('reinit.latents_before');
    const out = reinitLatents(before.data, before.shape as [number, number, number, number], perRegion, S, grid, boxes, tokens);
    assert.deepEqual(out.windows.map((x) => [...x.at]), c.reinit.map((x: { best_window_top_left_grid: number[] }) => x.best_window_top_left_grid));
    const d = assertClose(out.latents, read('reinit.latents').data, c.tolerance.reinit.latents_atol, 're-init latents');
    t.diagnostic(`max |diff|: window scores ${worstScores.toExponential(2)}, latents ${d.toExponential(2)}`);
    ref.close();
  });
});
