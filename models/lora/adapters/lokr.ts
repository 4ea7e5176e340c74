/**
 * LyCORIS LoKr: ΔW = kron(w1, w2) · scale, reshaped to the weight (LyCORIS `lycoris/modules/lokr.py`,
 * A1111 `network_lokr.py`, ComfyUI `weight_adapter/lokr.py`).
 *
 * Factors: w1 = `lokr_w1` [a, b] or `lokr_w1_a` [a, r1] · `lokr_w1_b` [r1, b];
 *          w2 = `lokr_w2` ([c, d] or [c, d, kh, kw]) or `lokr_w2_a` [c, r2] · `lokr_w2_b` [r2, d·kh·kw],
 *          or Tucker `lokr_t2` [r2, r2, kh, kw] with w2_a [r2, c], w2_b [r2, d]:
 *          einsum('i j k l, j r, i p -> p r k l', t2, w2_b, w2_a).
 * out = a·c, in = b·d. A 4-D w2 takes w1 as [a, b, 1, 1]; a flat [c, d·kh·kw] w2 gives the same values
 * in the same order ((j·d + l)·kh·kw + s), so both are handled as [c, d·kh·kw].
 * Scale: alpha / dim when a factor is low-rank, dim = w2_b.shape[0] (else w1_b.shape[0]); 1 when both
 * factors are stored whole or alpha is missing or 0 (LyCORIS: "use scale = 1" for full w1 and w2, alpha 0 → dim).
 *
 * Kronecker products of low-rank factors are low-rank (mixed-product rule):
 *   kron(U1·D1, U2·D2) = kron(U1, U2) · kron(D1, D2), rank r1·r2,
 * where a factor stored whole is U = itself, D = I (or U = I, D = itself, whichever is smaller). When
 * that low-rank form is smaller than ΔW itself (it is for every module of a usual LoKr: rank 16 for
 * dim 4 against widths of 320…5120), the module stays low-rank; otherwise ΔW is expanded (`full`).
 * Expanding every module of an SD 1.5 LoKr would take about 3 GB of float32.
 */
import type { ModuleDelta } from '../types.ts';
import { agree, fmt, kron, loraError, matmul, need, product, rebuildTucker, shapeOf, type FactorShapes, type FactorValues, type ImpliedShape, type ModuleFactors } from './common.ts';

const FAMILY = 'LoKr';

type Layout =
  | { readonly kind: 'whole'; readonly key: string; readonly rows: number; readonly cols: number }
  | { readonly kind: 'lowrank'; readonly a: string; readonly b: string; readonly rows: number; readonly rank: number; readonly cols: number }
  | { readonly kind: 'tucker'; readonly t: string; readonly a: string; readonly b: string; readonly rows: number; readonly cols: number; readonly kernel: readonly number[] };

function w1Layout(f: ModuleFactors, shapes: FactorShapes): Layout {
  const whole = f.parts.get('lokr_w1');
  if (whole !== undefined) {
    const s = shapeOf(whole, shapes, [2], 'w1');
    return { kind: 'whole', key: whole, rows: s[0]!, cols: s[1]! };
  }
  const a = f.parts.has('lokr_w1_a') || f.parts.has('lokr_w1_b') ? need(f, 'lokr_w1_a', shapes, FAMILY) : need(f, 'lokr_w1', shapes, FAMILY);
  const b = need(f, 'lokr_w1_b', shapes, FAMILY);
  const sa = shapeOf(a, shapes, [2], 'w1_a');
  const sb = shapeOf(b, shapes, [2], 'w1_b');
  agree({ key: a, dim: sa[1]! }, { key: b, dim: sb[0]! }, 'rank', shapes.source);
  return { kind: 'lowrank', a, b, rows: sa[0]!, rank: sb[0]!, cols: sb[1]! };
}

/** w2's layout; `kernel` is [kh, kw] when w2 is a 4-D (conv) factor, [] when flat. */
function w2Layout(f: ModuleFactors, shapes: FactorShapes): { layout: Layout; kernel: readonly number[] } {
  const whole = f.parts.get('lokr_w2');
  if (whole !== undefined) {
    const s = shapeOf(whole, shapes, [2, 4], 'w2');
    return { layout: { kind: 'whole', key: whole, rows: s[0]!, cols: product(s.slice(1)) }, kernel: s.slice(2) };
  }
  const a = f.parts.has('lokr_w2_a') || f.parts.has('lokr_w2_b') ? need(f, 'lokr_w2_a', shapes, FAMILY) : need(f, 'lokr_w2', shapes, FAMILY);
  const b = need(f, 'lokr_w2_b', shapes, FAMILY);
  const sa = shapeOf(a, shapes, [2], 'w2_a');
  const t = f.parts.get('lokr_t2');
  if (t === undefined) {
    const sb = shapeOf(b, shapes, [2, 4], 'w2_b');
    agree({ key: a, dim: sa[1]! }, { key: b, dim: sb[0]! }, 'rank', shapes.source);
    return { layout: { kind: 'lowrank', a, b, rows: sa[0]!, rank: sb[0]!, cols: product(sb.slice(1)) }, kernel: sb.slice(2) };
  }
  const st = shapeOf(t, shapes, [4], 't2');
  const sb = shapeOf(b, shapes, [2], 'w2_b');
  agree({ key: t, dim: st[0]! }, { key: a, dim: sa[0]! }, 'rank', shapes.source);
  agree({ key: t, dim: st[1]! }, { key: b, dim: sb[0]! }, 'rank', shapes.source);
  const kernel = st.slice(2);
  return { layout: { kind: 'tucker', t, a, b, rows: sa[1]!, cols: sb[1]! * product(kernel), kernel }, kernel };
}

/** The rank alpha is divided by: w2_b's when w2 is low-rank, else w1_b's; undefined when both are whole. */
function lokrDim(w1: Layout, w2: Layout, shapes: FactorShapes): number | undefined {
  if (w2.kind !== 'whole') return shapes.shapeOf(w2.b)[0]!;
  if (w1.kind !== 'whole') return shapes.shapeOf(w1.b)[0]!;
  return undefined;
}

export function lokrWeightShape(f: ModuleFactors, shapes: FactorShapes): ImpliedShape {
  const w1 = w1Layout(f, shapes);
  const { layout: w2, kernel } = w2Layout(f, shapes);
  const out = w1.rows * w2.rows;
  const shape = kernel.length === 0 ? [out, w1.cols * w2.cols] : [out, (w1.cols * w2.cols) / product(kernel), ...kernel];
  if (shape.some((d) => !Number.isInteger(d))) {
    throw loraError('SHAPE_MISMATCH', shapes.source, `LoKr module \`${f.name}\`: factors give ΔW ${fmt(shape)}, not a weight shape.`, { key: f.name });
  }
  return { shape, rank: lokrDim(w1, w2, shapes) };
}

/** A factor as U [rows, r] · D [r, cols]; a whole factor is paired with an identity on its smaller side. */
interface Factored {
  readonly u: Float32Array;
  readonly d: Float32Array;
  readonly rows: number;
  readonly rank: number;
  readonly cols: number;
}

function identity(n: number): Float32Array {
  const eye = new Float32Array(n * n);
  for (let i = 0; i < n; i++) eye[i * n + i] = 1;
  return eye;
}

function wholeValues(l: Layout, values: FactorValues, shapes: FactorShapes): Float32Array {
  switch (l.kind) {
    case 'whole':
      return values.read(l.key);
    case 'lowrank':
      return Float32Array.from(matmul(values.read(l.a), values.read(l.b), l.rows, l.rank, l.cols));
    case 'tucker': {
      const inDim = shapes.shapeOf(l.b)[1]!;
      return Float32Array.from(rebuildTucker(values.read(l.t), shapes.shapeOf(l.t), values.read(l.a), l.rows, values.read(l.b), inDim));
    }
  }
}

function factored(l: Layout, values: FactorValues, shapes: FactorShapes): Factored {
  if (l.kind === 'lowrank') return { u: values.read(l.a), d: values.read(l.b), rows: l.rows, rank: l.rank, cols: l.cols };
  const w = wholeValues(l, values, shapes);
  return l.rows <= l.cols
    ? { u: identity(l.rows), d: w, rows: l.rows, rank: l.rows, cols: l.cols }
    : { u: w, d: identity(l.cols), rows: l.rows, rank: l.cols, cols: l.cols };
}

/** The module's delta for a target of shape `target` (already checked to fit); `alpha` from the file, if any. */
export function buildLokr(f: ModuleFactors, shapes: FactorShapes, values: FactorValues, target: readonly number[], alpha: number | undefined): ModuleDelta {
  const w1 = w1Layout(f, shapes);
  const { layout: w2 } = w2Layout(f, shapes);
  const dim = lokrDim(w1, w2, shapes);
  const scale = dim === undefined || alpha === undefined || alpha === 0 ? 1 : alpha / dim;
  const out = w1.rows * w2.rows;
  const inFlat = w1.cols * w2.cols;
  const f1 = factored(w1, values, shapes);
  const f2 = factored(w2, values, shapes);
  const rank = f1.rank * f2.rank;
  if (rank * (out + inFlat) < out * inFlat) {
    const up = Float32Array.from(kron(f1.u, f1.rows, f1.rank, f2.u, f2.rows, f2.rank)); // [a·c, r1·r2]
    const down = Float32Array.from(kron(f1.d, f1.rank, f1.cols, f2.d, f2.rank, f2.cols)); // [r1·r2, b·d·kh·kw]
    return { kind: 'lowrank', down, downShape: [rank, ...target.slice(1)], up, upShape: [out, rank], scale };
  }
  const k = kron(wholeValues(w1, values, shapes), w1.rows, w1.cols, wholeValues(w2, values, shapes), w2.rows, w2.cols);
  const diff = new Float32Array(k.length);
  for (let i = 0; i < diff.length; i++) diff[i] = k[i]! * scale;
  return { kind: 'full', diff, shape: [...target] };
}
