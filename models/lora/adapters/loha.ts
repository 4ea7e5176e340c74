/**
 * LyCORIS LoHa: ΔW = (w1a · w1b) ⊙ (w2a · w2b) · alpha / r1, r1 = w1b.shape[0]
 * (LyCORIS `lycoris/modules/loha.py`, A1111 `network_hada.py`, ComfyUI `weight_adapter/loha.py`).
 *
 * Shapes: w1a [out, r1], w1b [r1, in] (conv: [r1, in·kh·kw], flattened), w2a [out, r2], w2b [r2, in(·kh·kw)].
 * A Hadamard product of two low-rank matrices is itself low-rank, exactly, with rank r1·r2:
 *   ΔW[o, x] = Σ_i Σ_j (w1a[o, i] · w2a[o, j]) · (w1b[i, x] · w2b[j, x]),
 * so up[o, i·r2 + j] = w1a[o, i] · w2a[o, j] and down[i·r2 + j, x] = w1b[i, x] · w2b[j, x] (a row-wise
 * Khatri–Rao product). That keeps LoHa on the low-rank path, scale alpha / r1.
 *
 * Tucker LoHa (`hada_t1`, `hada_t2` [r, r, kh, kw], with w1a [r, out], w1b [r, in]) rebuilds each factor as
 * einsum('i j k l, j r, i p -> p r k l', t, wb, wa) and is kept as a full ΔW.
 */
import type { ModuleDelta } from '../types.ts';
import { agree, loraError, need, product, rebuildTucker, shapeOf, type FactorShapes, type FactorValues, type ImpliedShape, type ModuleFactors } from './common.ts';

const FAMILY = 'LoHa';

function tuckerPair(f: ModuleFactors, shapes: FactorShapes): { t1: string; t2: string } | undefined {
  const t1 = f.parts.get('hada_t1');
  const t2 = f.parts.get('hada_t2');
  if (t1 === undefined && t2 === undefined) return undefined;
  return { t1: need(f, 'hada_t1', shapes, FAMILY), t2: need(f, 'hada_t2', shapes, FAMILY) };
}

export function lohaWeightShape(f: ModuleFactors, shapes: FactorShapes): ImpliedShape {
  const k = {
    w1a: need(f, 'hada_w1_a', shapes, FAMILY),
    w1b: need(f, 'hada_w1_b', shapes, FAMILY),
    w2a: need(f, 'hada_w2_a', shapes, FAMILY),
    w2b: need(f, 'hada_w2_b', shapes, FAMILY),
  };
  const tucker = tuckerPair(f, shapes);
  const w1a = shapeOf(k.w1a, shapes, [2], 'w1a');
  const w2a = shapeOf(k.w2a, shapes, [2], 'w2a');
  if (tucker === undefined) {
    const w1b = shapeOf(k.w1b, shapes, [2, 4], 'w1b');
    const w2b = shapeOf(k.w2b, shapes, [2, 4], 'w2b');
    agree({ key: k.w1a, dim: w1a[1]! }, { key: k.w1b, dim: w1b[0]! }, 'rank', shapes.source);
    agree({ key: k.w2a, dim: w2a[1]! }, { key: k.w2b, dim: w2b[0]! }, 'rank', shapes.source);
    agree({ key: k.w1a, dim: w1a[0]! }, { key: k.w2a, dim: w2a[0]! }, 'output width', shapes.source);
    agree({ key: k.w1b, dim: product(w1b.slice(1)) }, { key: k.w2b, dim: product(w2b.slice(1)) }, 'input width', shapes.source);
    return { shape: [w1a[0]!, ...w1b.slice(1)], rank: w1b[0]! };
  }
  const w1b = shapeOf(k.w1b, shapes, [2], 'w1b');
  const w2b = shapeOf(k.w2b, shapes, [2], 'w2b');
  const t1 = shapeOf(tucker.t1, shapes, [4], 't1');
  const t2 = shapeOf(tucker.t2, shapes, [4], 't2');
  agree({ key: tucker.t1, dim: t1[0]! }, { key: k.w1a, dim: w1a[0]! }, 'rank', shapes.source);
  agree({ key: tucker.t1, dim: t1[1]! }, { key: k.w1b, dim: w1b[0]! }, 'rank', shapes.source);
  agree({ key: tucker.t2, dim: t2[0]! }, { key: k.w2a, dim: w2a[0]! }, 'rank', shapes.source);
  agree({ key: tucker.t2, dim: t2[1]! }, { key: k.w2b, dim: w2b[0]! }, 'rank', shapes.source);
  agree({ key: k.w1a, dim: w1a[1]! }, { key: k.w2a, dim: w2a[1]! }, 'output width', shapes.source);
  agree({ key: k.w1b, dim: w1b[1]! }, { key: k.w2b, dim: w2b[1]! }, 'input width', shapes.source);
  if (t1[2] !== t2[2] || t1[3] !== t2[3]) {
    throw loraError('SHAPE_MISMATCH', shapes.source, `\`${tucker.t1}\` and \`${tucker.t2}\` have different kernels.`, { keys: [tucker.t1, tucker.t2] });
  }
  return { shape: [w1a[1]!, w1b[1]!, t1[2]!, t1[3]!], rank: w1b[0]! };
}

/** Low-rank (rank r1·r2) delta, or a full one for Tucker LoHa. `scale` = alpha / r1. */
export function buildLoha(f: ModuleFactors, shapes: FactorShapes, values: FactorValues, target: readonly number[], scale: number): ModuleDelta {
  const key = (p: 'hada_w1_a' | 'hada_w1_b' | 'hada_w2_a' | 'hada_w2_b') => need(f, p, shapes, FAMILY);
  const w1a = values.read(key('hada_w1_a'));
  const w1b = values.read(key('hada_w1_b'));
  const w2a = values.read(key('hada_w2_a'));
  const w2b = values.read(key('hada_w2_b'));
  const tucker = tuckerPair(f, shapes);
  if (tucker !== undefined) {
    const out = shapes.shapeOf(key('hada_w1_a'))[1]!;
    const inDim = shapes.shapeOf(key('hada_w1_b'))[1]!;
    const m1 = rebuildTucker(values.read(tucker.t1), shapes.shapeOf(tucker.t1), w1a, out, w1b, inDim);
    const m2 = rebuildTucker(values.read(tucker.t2), shapes.shapeOf(tucker.t2), w2a, out, w2b, inDim);
    const diff = new Float32Array(m1.length);
    for (let i = 0; i < diff.length; i++) diff[i] = m1[i]! * m2[i]! * scale;
    return { kind: 'full', diff, shape: [...target] };
  }
  const [out, r1] = shapes.shapeOf(key('hada_w1_a')) as [number, number];
  const r2 = shapes.shapeOf(key('hada_w2_a'))[1]!;
  const cols = w1b.length / r1;
  const rank = r1 * r2;
  const up = new Float32Array(out * rank);
  for (let o = 0; o < out; o++) {
    for (let i = 0; i < r1; i++) {
      const a = w1a[o * r1 + i]!;
      for (let j = 0; j < r2; j++) up[o * rank + i * r2 + j] = a * w2a[o * r2 + j]!;
    }
  }
  const down = new Float32Array(rank * cols);
  for (let i = 0; i < r1; i++) {
    for (let j = 0; j < r2; j++) {
      const row = (i * r2 + j) * cols;
      for (let x = 0; x < cols; x++) down[row + x] = w1b[i * cols + x]! * w2b[j * cols + x]!;
    }
  }
  return { kind: 'lowrank', down, downShape: [rank, ...target.slice(1)], up, upShape: [out, rank], scale };
}
