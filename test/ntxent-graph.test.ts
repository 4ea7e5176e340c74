/**
 * CLoRA's NT-Xent loss as graph ops (models/networks/ntxent-graph.ts) and its VJP (from the VJP
 * builder) against the float64 TypeScript reference (`cloraLoss` / `ntXentLoss`): the per-image loss
 * and ∂L/∂xattn for every branch, on random maps with several groups, slots without a group's
 * tokens, two images, and a map with tied maxima.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { Ops } from '../models/onnx/ops.ts';
import { serializeModel } from '../models/onnx/serialize.ts';
import { buildVjpGraph, cotangentInput, gradientOutput } from '../models/onnx/vjp.ts';
import { OrtSession } from '../models/runtime.ts';
import { ntXentFeeds, ntXentLossGraph, type NtXentEntry } from '../models/networks/ntxent-graph.ts';
import { cloraLoss, slotMaps, type CloraPlan } from '../pipelines/strategies/clora.ts';
import { SeededRandom } from '../bench/seeded-random.ts';

const SLOTS = 3;
const IMAGES = 2;
const GRID: [number, number] = [4, 4];
const Q = GRID[0] * GRID[1];
const SEQ = 8;
const TAU = 0.5;

/** groups[g][p]: token positions of concept g in slot p (CLoRA's plan layout). */
const GROUPS = [
  [[1, 2], [3], []],
  [[4], [], [2, 5]],
  [[], [6], [7]],
];

/** Attention-like maps per branch (2P branches, each (images, Q, S)): positive rows summing to 1. */
function branchMaps(seed: number): Float32Array[] {
  return Array.from({ length: 2 * SLOTS }, (_, i) => {
    const raw = new Float32Array(IMAGES * Q * SEQ);
    new SeededRandom(seed, `branch${i}`).fillUniform(raw, 2);
    const out = new Float32Array(raw.length);
    for (let r = 0; r < IMAGES * Q; r++) {
      let sum = 0;
      for (let s = 0; s < SEQ; s++) sum += Math.exp(raw[r * SEQ + s]!);
      for (let s = 0; s < SEQ; s++) out[r * SEQ + s] = Math.exp(raw[r * SEQ + s]!) / sum;
    }
    return out;
  });
}

async function graphLossAndGrad(xattn: Float32Array, entries: readonly NtXentEntry[]): Promise<{ loss: Float32Array; grad: Float32Array }> {
  const g = new Ops('ntxent');
  const x = g.input('xattn', 'float32', ['rows', Q, SEQ]);
  g.output(ntXentLossGraph(g, x, { temperature: TAU }), 'loss', 'float32', ['images']);
  const vjp = buildVjpGraph(g.finish(), { outputs: ['loss'], wrt: 'xattn' });
  const s = await OrtSession.create(serializeModel(vjp, () => assert.fail('no parameters')), { device: 'cpu' });
  try {
    const out = await s.run({
      xattn: { dtype: 'float32', shape: [2 * SLOTS * IMAGES, Q, SEQ], data: xattn },
      ...ntXentFeeds(entries, IMAGES, SEQ),
      [cotangentInput('loss')]: { dtype: 'float32', shape: [IMAGES], data: new Float32Array(IMAGES).fill(1) },
    });
    return { loss: out.loss!.data as Float32Array, grad: out[gradientOutput('xattn')]!.data as Float32Array };
  } finally {
    await s.dispose();
  }
}

function reference(maps: Float32Array[]): { loss: readonly number[]; grad: Float32Array } {
  const plan = { groups: GROUPS, mapGrid: GRID } as unknown as CloraPlan;
  const perSlot = slotMaps(maps.map((xattn) => ({ xattn, selfattn: new Float32Array() })));
  const r = cloraLoss(plan, perSlot, IMAGES, Array(SLOTS).fill(SEQ), TAU);
  const grad = new Float32Array(2 * SLOTS * IMAGES * Q * SEQ);
  r.cotangents.forEach((c, i) => grad.set(c.xattn!, i * IMAGES * Q * SEQ));
  return { loss: r.loss, grad };
}

const entries: NtXentEntry[] = GROUPS.flatMap((group, label) => group.flatMap((tokens, slot) => tokens.map((token) => ({ slot, token, label }))));

describe('NT-Xent as graph ops', () => {
  for (const seed of [1, 2]) {
    test(`loss and ∂L/∂xattn equal the float64 reference (seed ${seed})`, async () => {
      const maps = branchMaps(seed) as Float32Array[];
      if (seed === 2) {
        // Tied maxima in one map: both halves of slot 1, token 3, image 0 peak at two cells.
        for (const half of [2, 3]) for (const cell of [5, 9]) maps[half]![cell * SEQ + 3] = 0.9;
      }
      const ref = reference(maps);
      const xattn = new Float32Array(maps.reduce((n, m) => n + m.length, 0));
      maps.forEach((m, i) => xattn.set(m, i * m.length));
      const got = await graphLossAndGrad(xattn, entries);
      for (let b = 0; b < IMAGES; b++) assert.ok(Math.abs(got.loss[b]! - ref.loss[b]!) <= 1e-5 * Math.abs(ref.loss[b]!), `image ${b}: loss ${got.loss[b]} vs ${ref.loss[b]}`);
      const scale = ref.grad.reduce((m, v) => Math.max(m, Math.abs(v)), 0);
      assert.ok(scale > 0, 'the reference gradient is not zero');
      let worst = 0;
      for (let k = 0; k < ref.grad.length; k++) worst = Math.max(worst, Math.abs(got.grad[k]! - ref.grad[k]!));
      assert.ok(worst <= 2e-4 * scale, `max |Δ| ${worst.toExponential(2)} against max |∂L/∂xattn| ${scale.toExponential(2)}`);
    });
  }

  test('one group only (no negatives) gives L = 0 and a zero gradient, as the reference', async () => {
    const maps = branchMaps(3);
    const one = entries.filter((e) => e.label === 0);
    const xattn = new Float32Array(maps.reduce((n, m) => n + m.length, 0));
    maps.forEach((m, i) => xattn.set(m, i * m.length));
    const got = await graphLossAndGrad(xattn, one);
    assert.ok(got.loss.length === IMAGES && got.loss.every((v) => v === 0), `loss ${[...got.loss]}`);
    assert.ok(got.grad.every((v) => v === 0));
  });
});
