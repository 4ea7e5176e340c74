/**
 * CLoRA's NT-Xent on min–max normalised maps (pipelines/strategies/gradient-ntxent.ts): the value on
 * maps small enough to compute by hand, the analytic gradient against central finite differences,
 * the degenerate cases, and the loss and embeddings of every update of the reference CLoRA run
 * (tiny-sd15-ref `clora/seed53_256x256`), recomputed from its stored attention maps.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import * as path from 'node:path';
import { openSafetensors } from '../models/index.ts';
import { ntXentLoss } from '../pipelines/strategies/gradient-ntxent.ts';
import { REF, assertClose, readManifest } from './fixtures.ts';

const TAU = 0.5;

/** A seeded N(0, 1) stream (LCG + Box–Muller), for the finite-difference inputs. */
function normals(seed: number): () => number {
  let s = seed >>> 0;
  const u = () => ((s = (Math.imul(s, 1103515245) + 12345) >>> 0) + 0.5) / 4294967296;
  return () => Math.sqrt(-2 * Math.log(u())) * Math.cos(2 * Math.PI * u());
}

describe('NT-Xent on attention maps', () => {
  test('value on hand-computed maps', () => {
    // min–max: [0,1,0] → e1 = [0,1,0]; [0,2,1] → e2 = [0,1,½]; [1,0,0] → e3 = [1,0,0].
    // cos(e1,e2) = 2/√5, cos(e1,e3) = cos(e2,e3) = 0; positive pairs (1,2), (2,1), each with the one
    // negative 3: ℓ = −log(e^{s/τ} / (e^{s/τ} + e^{0})) = log(1 + e^{−s/τ}).
    const r = ntXentLoss([[0, 1, 0], [0, 2, 1], [1, 0, 0]], [0, 0, 1], TAU);
    const s = 2 / Math.sqrt(5);
    assert.equal(r.positivePairs, 2);
    assert.ok(Math.abs(r.loss - Math.log(1 + Math.exp(-s / TAU))) < 1e-12, `loss ${r.loss}`);
    assert.deepEqual([...r.embeddings[1]!], [0, 1, 0.5]);
    // Three groups of one and two: the pair's anchors see both other maps as negatives.
    const r3 = ntXentLoss([[0, 1, 0], [0, 2, 1], [1, 0, 0], [0, 0, 1]], [0, 0, 1, 2], TAU);
    const c = 1 / Math.sqrt(5); // cos(e2, [0,0,1])
    const expected = (Math.log(1 + Math.exp(-s / TAU) * (1 + 1)) + Math.log(1 + Math.exp(-s / TAU) * (1 + Math.exp(c / TAU)))) / 2;
    assert.ok(Math.abs(r3.loss - expected) < 1e-12, `loss ${r3.loss}, expected ${expected}`);
  });

  test('no positive pair or no negative gives 0 and no gradient', () => {
    for (const labels of [[0, 1, 2], [0, 0, 0]]) {
      const r = ntXentLoss([[0, 1, 0], [0, 2, 1], [1, 0, 0]], labels, TAU);
      assert.equal(r.loss, 0);
      assert.ok(r.gradients.every((g) => g.every((v) => v === 0)));
    }
  });

  test('a flat map has no normalisation: NaN, as the official code', () => {
    assert.ok(Number.isNaN(ntXentLoss([[1, 1, 1], [0, 2, 1], [1, 0, 0]], [0, 0, 1], TAU).loss));
  });

  test('the analytic gradient matches central finite differences', (t) => {
    const next = normals(11);
    const maps = Array.from({ length: 6 }, () => Float64Array.from({ length: 16 }, () => 0.05 + 0.02 * next()));
    const labels = [0, 0, 1, 1, 1, 2];
    const { gradients } = ntXentLoss(maps, labels, TAU);
    const h = 1e-7;
    let worst = 0;
    for (let i = 0; i < maps.length; i++) {
      for (let k = 0; k < maps[i]!.length; k++) {
        const plus = maps.map((m) => Float64Array.from(m));
        const minus = maps.map((m) => Float64Array.from(m));
        plus[i]![k] = plus[i]![k]! + h;
        minus[i]![k] = minus[i]![k]! - h;
        const fd = (ntXentLoss(plus, labels, TAU).loss - ntXentLoss(minus, labels, TAU).loss) / (2 * h);
        const an = gradients[i]![k]!;
        worst = Math.max(worst, Math.abs(fd - an) / Math.max(1, Math.abs(an)));
      }
    }
    assert.ok(worst < 1e-5, `max relative error ${worst}`);
    t.diagnostic(`96 partials, max relative error ${worst.toExponential(2)}`);
  });
});

describe('NT-Xent reproduces the reference CLoRA updates (clora/seed53_256x256)', () => {
  const manifest = readManifest(path.join(REF, 'gradient_methods_manifest.json'));
  const c = manifest.cases.find((x: { id: string }) => x.id === 'clora/seed53_256x256');
  const ref = openSafetensors(path.join(REF, 'gradient_methods.safetensors'));
  const read = (k: string) => ref.readFloat32(c.outputs[k].key);

  test('embeddings and loss of all 17 updates from their stored maps', (t) => {
    const maps = read('update.attn_maps'); // (U, P, 8, 8, 77)
    const [U, P, h, w, S] = maps.shape as [number, number, number, number, number];
    const groups: number[][][] = c.important_token_indices;
    const labels = ref.read(c.inputs.labels.key).data as BigInt64Array;
    const embeddings = read('update.embeddings').data;
    const losses = read('update.loss').data;
    let worstE = 0;
    let worstL = 0;
    for (let u = 0; u < U; u++) {
      const vectors: Float32Array[] = [];
      const labelOf: number[] = [];
      groups.forEach((group, g) =>
        group.forEach((tokens, p) =>
          tokens.forEach((j) => {
            vectors.push(Float32Array.from({ length: h * w }, (_, q) => maps.data[((u * P + p) * h * w + q) * S + j]!));
            labelOf.push(g);
          }),
        ),
      );
      assert.deepEqual(labelOf, Array.from(labels, Number));
      const r = ntXentLoss(vectors, labelOf, c.knobs.temperature);
      const flat = Float64Array.from(r.embeddings.flatMap((e) => [...e]));
      worstE = Math.max(worstE, assertClose(flat, embeddings.subarray(u * flat.length, (u + 1) * flat.length), c.tolerance.per_update.embeddings_atol, `update ${u} embeddings`));
      worstL = Math.max(worstL, assertClose([r.loss], [losses[u]!], c.tolerance.per_update.loss_atol, `update ${u} loss`));
    }
    t.diagnostic(`max |diff| over 17 updates: embeddings ${worstE.toExponential(2)}, loss ${worstL.toExponential(2)}`);
    ref.close();
  });
});
