/**
 * Vector-Jacobian rules, one per ONNX op the network definitions emit (opset 17 semantics).
 *
 * Notation: x, a, b are the node's inputs, y its output, ȳ the cotangent of y (∂L/∂y) and x̄ the
 * gradient the rule returns for x (∂L/∂x = ȳ·∂y/∂x, summed over everything x touches). A rule
 * returns one entry per input: the gradient, or undefined when that input needs none (`wants`).
 * Rules emit ONNX nodes through `c.g` inside the scope `grad.<forward node>`.
 *
 * Broadcasting: a binary op's operand may have been broadcast to y's shape; its gradient is ȳ summed
 * over the broadcast axes (`sumToShape`). When the static shapes (inferred with symbolic dims by
 * `vjp.ts`) decide those axes, the reduction is a plain ReduceSum over constant axes, or nothing;
 * otherwise the axes are computed at run time from `Shape` nodes (pad x's shape with leading 1s to
 * y's rank, the axes are where the two differ, ReduceSum with `noop_with_empty_axes`, Reshape back).
 */
import type { DType } from '../tensor.ts';
import type { Dim, NodeDecl, Value } from './builder.ts';
import type { Ops } from './ops.ts';
import { attr } from './builder.ts';

/** What a rule may ask about the forward node and its values. */
export interface RuleContext {
  /** Emits the backward nodes. */
  readonly g: Ops;
  readonly node: NodeDecl;
  /** Forward input i (throws GRAPH_BUILD when it was omitted). */
  x(i: number): Value;
  /** Whether input i is present. */
  has(i: number): boolean;
  /** Forward output i. */
  y(i?: number): Value;
  /** The cotangent ȳ of output i (zeros when nothing downstream used that output). */
  dy(i?: number): Value;
  /** Whether the loss depends on input i through this node (only then is x̄_i needed). */
  wants(i: number): boolean;
  /** The statically inferred shape (symbolic dims are strings), or undefined. */
  shape(v: Value): readonly Dim[] | undefined;
  /** The rank; throws GRAPH_BUILD naming the node when it is not known statically. */
  rank(v: Value): number;
  /** The element type, when known. */
  dtype(v: Value): DType | undefined;
  /** The values of a 1-D int64 tensor known at build time (constants, shapes), or undefined. */
  ints(v: Value): readonly Dim[] | undefined;
  /** The values of a float32 constant, or undefined. */
  floats(v: Value): Float32Array | undefined;
  attrInt(name: string, fallback: number): number;
  attrInts(name: string): readonly number[] | undefined;
  attrFloat(name: string, fallback: number): number;
  attrString(name: string, fallback: string): string;
  /** Throw GRAPH_BUILD naming the node. */
  fail(message: string): never;
}

/** x̄ for each input of the node (undefined: not wanted, or not differentiable). */
export type VjpRule = (c: RuleContext) => ReadonlyArray<Value | undefined>;

/** Ops whose outputs carry no gradient (integer, boolean or piecewise-constant results). */
export const NON_DIFFERENTIABLE: ReadonlySet<string> = new Set([
  'Shape', 'Size', 'ConstantOfShape', 'Range', 'NonZero', 'ArgMax', 'ArgMin',
  'Equal', 'Less', 'Greater', 'LessOrEqual', 'GreaterOrEqual', 'Not', 'And', 'Or', 'Xor',
  'Floor', 'Ceil', 'Round', 'Sign',
]);

const FLOAT_DTYPES: ReadonlySet<DType> = new Set(['float32', 'float16', 'bfloat16', 'float64']);
export const isFloatDtype = (d: DType): boolean => FLOAT_DTYPES.has(d);

const TWO_OVER_SQRT_PI = 2 / Math.sqrt(Math.PI);

// ---- shared helpers ----------------------------------------------------------------------------

const range = (n: number, from = 0): number[] => Array.from({ length: n }, (_, i) => from + i);
const isStatic = (s: readonly Dim[] | undefined): s is readonly number[] => s !== undefined && s.every((d) => typeof d === 'number');
const sameShape = (a: readonly Dim[], b: readonly Dim[]): boolean => a.length === b.length && a.every((d, i) => d === b[i]);

/** v's shape as an int64 value: a constant when static, else a Shape node. */
function shapeOf(c: RuleContext, v: Value): Value {
  const s = c.shape(v);
  return isStatic(s) ? c.g.int64s(s) : c.g.shape(v);
}

/** Swap the last two axes of a rank-r value. */
function transposeLast2(c: RuleContext, v: Value, r: number): Value {
  return c.g.transpose(v, [...range(r - 2), r - 1, r - 2]);
}

/**
 * Reduce `grad` (shaped `gradShape`, usually y's) to `target`'s shape: the sum over the axes along
 * which `target` was broadcast (leading axes it lacks, and its size-1 axes where y's are not).
 */
function sumToShape(c: RuleContext, grad: Value, gradShape: readonly Dim[] | undefined, target: Value): Value {
  const t = c.shape(target);
  if (gradShape !== undefined && t !== undefined && gradShape.length >= t.length) {
    if (sameShape(gradShape, t)) return grad;
    const lead = gradShape.length - t.length;
    const kept: number[] = [];
    let decided = true;
    t.forEach((td, i) => {
      const gd = gradShape[lead + i]!;
      if (td === gd || gd === 1) return; // same size, or y itself has 1 there
      if (td === 1) kept.push(lead + i); // broadcast 1 → gd
      else if (typeof td === 'number') return; // a fixed size > 1 cannot broadcast; gd equals it at run time
      else decided = false; // a symbolic size that may be 1 at run time
    });
    if (decided) {
      if (kept.length === 0 && lead === 0) return grad;
      if (kept.length === 0) return c.g.reduceSum(grad, { dims: range(lead), keepdim: false });
      const summed = c.g.reduceSum(grad, { dims: [...range(lead), ...kept], keepdim: true });
      return lead === 0 ? summed : c.g.reshape(summed, shapeOf(c, target));
    }
  }
  // Run-time axes: pad target's shape with leading 1s to grad's rank; sum where the two differ.
  const { g } = c;
  const gs = g.shape(grad);
  const ts = g.shape(target);
  const ones = g.expand(g.int64s([1]), g.sub(g.shape(gs), g.shape(ts))); // rank difference × [1]
  const padded = g.concat([ones, ts], { dim: 0 });
  const axes = g.reshape(g.nonZero(g.not(g.equal(padded, gs))), [-1]);
  return g.reshape(g.reduceSumOver(grad, axes, { keepdim: true }), ts);
}

/** The shape y = broadcast(a, b) would have, for rules that form products like ȳ·b. */
function outShape(c: RuleContext): readonly Dim[] | undefined {
  return c.shape(c.y());
}

/** A normalised (non-negative) axis; negative axes need the rank. */
function normAxis(c: RuleContext, axis: number, v: Value): number {
  return axis >= 0 ? axis : axis + c.rank(v);
}

/** Mean over `axes` keeping dims (ReduceMean, axes as an attribute up to opset 17). */
function meanKeep(c: RuleContext, v: Value, axes: readonly number[]): Value {
  return c.g.reduceMean(v, { dims: axes, keepdim: true });
}

/**
 * The backward of a normalisation y = x̂·γ (+ β) with x̂ = (x − μ)/σ over `axes`:
 * x̄ = (1/σ)·(ĝ − mean(ĝ) − x̂·mean(ĝ·x̂)), ĝ = ȳ·γ, σ = √(var + eps). μ and σ are recomputed from x the
 * way the forward op computes them (InstanceNormalization does not output them, and the forward graph
 * stays as built). `scaled` is ĝ.
 */
function normalizationBackward(c: RuleContext, x: Value, scaled: Value, axes: readonly number[], eps: number): Value {
  const { g } = c;
  const centered = g.sub(x, meanKeep(c, x, axes));
  const variance = meanKeep(c, g.mul(centered, centered), axes);
  const invStd = g.div(g.scalar(1), g.sqrt(g.add(variance, g.scalar(eps))));
  const xhat = g.mul(centered, invStd);
  const inner = g.sub(g.sub(scaled, meanKeep(c, scaled, axes)), g.mul(xhat, meanKeep(c, g.mul(scaled, xhat), axes)));
  return g.mul(invStd, inner);
}

/** True when v is a float constant whose every element equals `value` (GroupNorm's unit scale). */
function isFilled(c: RuleContext, v: Value, value: number): boolean {
  const f = c.floats(v);
  return f !== undefined && f.every((e) => e === value);
}

/** The gradient of an elementwise op with one input: x̄ = ȳ·f'(x). */
const unary = (derivative: (c: RuleContext) => Value): VjpRule => (c) => [c.g.mul(c.dy(), derivative(c))];

// ---- the rules ---------------------------------------------------------------------------------

export const VJP_RULES: Readonly<Record<string, VjpRule>> = {
  // y = x
  Identity: (c) => [c.dy()],

  // y = a + b: ā = sum_to_a(ȳ), b̄ = sum_to_b(ȳ)
  Add: (c) => [
    c.wants(0) ? sumToShape(c, c.dy(), outShape(c), c.x(0)) : undefined,
    c.wants(1) ? sumToShape(c, c.dy(), outShape(c), c.x(1)) : undefined,
  ],

  // y = a − b: ā = sum_to_a(ȳ), b̄ = −sum_to_b(ȳ)
  Sub: (c) => [
    c.wants(0) ? sumToShape(c, c.dy(), outShape(c), c.x(0)) : undefined,
    c.wants(1) ? c.g.neg(sumToShape(c, c.dy(), outShape(c), c.x(1))) : undefined,
  ],

  // y = a·b: ā = sum_to_a(ȳ·b), b̄ = sum_to_b(ȳ·a)
  Mul: (c) => [
    c.wants(0) ? sumToShape(c, c.g.mul(c.dy(), c.x(1)), outShape(c), c.x(0)) : undefined,
    c.wants(1) ? sumToShape(c, c.g.mul(c.dy(), c.x(0)), outShape(c), c.x(1)) : undefined,
  ],

  // y = a/b: ā = sum_to_a(ȳ/b), b̄ = −sum_to_b(ȳ·y/b)
  Div: (c) => [
    c.wants(0) ? sumToShape(c, c.g.div(c.dy(), c.x(1)), outShape(c), c.x(0)) : undefined,
    c.wants(1) ? c.g.neg(sumToShape(c, c.g.div(c.g.mul(c.dy(), c.y()), c.x(1)), outShape(c), c.x(1))) : undefined,
  ],

  // y = −x: x̄ = −ȳ
  Neg: (c) => [c.g.neg(c.dy())],

  // y = √x: x̄ = ȳ/(2y)
  Sqrt: (c) => [c.g.div(c.dy(), c.g.mul(c.y(), c.g.scalar(2)))],

  // y = eˣ: x̄ = ȳ·y
  Exp: unary((c) => c.y()),

  // y = ln x: x̄ = ȳ / x
  Log: (c) => [c.g.div(c.dy(), c.x(0))],

  // y = sin x: x̄ = ȳ·cos x
  Sin: unary((c) => c.g.cos(c.x(0))),

  // y = cos x: x̄ = −ȳ·sin x
  Cos: unary((c) => c.g.neg(c.g.sin(c.x(0)))),

  // y = σ(x): x̄ = ȳ·y·(1 − y)
  Sigmoid: unary((c) => c.g.mul(c.y(), c.g.sub(c.g.scalar(1), c.y()))),

  // y = erf x: x̄ = ȳ·(2/√π)·exp(−x²)
  Erf: unary((c) => c.g.mul(c.g.exp(c.g.neg(c.g.mul(c.x(0), c.x(0)))), c.g.scalar(TWO_OVER_SQRT_PI))),

  // y = max(a, b): the larger operand gets ȳ; a tie splits it in halves (as torch.maximum does).
  Max: (c) => minMax(c, 'max'),
  // y = min(a, b): the smaller operand gets ȳ; ties split.
  Min: (c) => minMax(c, 'min'),

  // y = clamp(x, lo, hi): x̄ = ȳ where lo ≤ x ≤ hi, else 0 (torch.clamp's convention at the bounds).
  Clip: (c) => {
    if (c.wants(1) || c.wants(2)) c.fail('the gradient with respect to the clip bounds is not implemented');
    const { g } = c;
    const x = c.x(0);
    let inside: Value | undefined;
    if (c.has(1)) inside = g.greaterOrEqual(x, c.x(1));
    if (c.has(2)) inside = inside === undefined ? g.lessOrEqual(x, c.x(2)) : g.and(inside, g.lessOrEqual(x, c.x(2)));
    return [inside === undefined ? c.dy() : g.mul(c.dy(), g.cast(inside, 'float32'))];
  },

  // y = cast(x): x̄ = cast(ȳ) back to x's type.
  Cast: (c) => {
    const from = c.dtype(c.x(0));
    if (from === undefined || !isFloatDtype(from)) return c.fail(`cannot differentiate a Cast from ${from ?? 'an unknown type'}`);
    return [from === c.dtype(c.y()) ? c.dy() : c.g.cast(c.dy(), from)];
  },

  // Y = A·B (numpy matmul, batch axes broadcast): Ā = sum_to_A(Ȳ·Bᵀ), B̄ = sum_to_B(Aᵀ·Ȳ)
  MatMul: (c) => {
    const [a, b] = [c.x(0), c.x(1)];
    const ra = c.rank(a);
    const rb = c.rank(b);
    if (ra < 2 || rb < 2) c.fail('MatMul with a 1-D operand is not supported');
    const ys = outShape(c);
    const as = c.shape(a);
    const bs = c.shape(b);
    const yBatch = ys?.slice(0, -2);
    const gradA = () => {
      const shape = ys !== undefined && as !== undefined ? [...ys.slice(0, -1), as[as.length - 1]!] : undefined;
      return sumToShape(c, c.g.matmul(c.dy(), transposeLast2(c, b, rb)), shape, a);
    };
    const gradB = () => {
      const shape = yBatch !== undefined && bs !== undefined && ys !== undefined ? [...yBatch, bs[bs.length - 2]!, ys[ys.length - 1]!] : undefined;
      return sumToShape(c, c.g.matmul(transposeLast2(c, a, ra), c.dy()), shape, b);
    };
    return [c.wants(0) ? gradA() : undefined, c.wants(1) ? gradB() : undefined];
  },

  // Y = α·op(A)·op(B) + β·C with op = transpose when transA/transB:
  // op(A)‾ = α·Ȳ·op(B)ᵀ, op(B)‾ = α·op(A)ᵀ·Ȳ, C̄ = β·sum_to_C(Ȳ)
  Gemm: (c) => {
    const { g } = c;
    const alpha = c.attrFloat('alpha', 1);
    const beta = c.attrFloat('beta', 1);
    const transA = c.attrInt('transA', 0) === 1;
    const transB = c.attrInt('transB', 0) === 1;
    const scale = (v: Value, s: number) => (s === 1 ? v : g.mul(v, g.scalar(s)));
    const t = (v: Value) => g.transpose(v, [1, 0]);
    const gradA = () => {
      const opBT = transB ? c.x(1) : t(c.x(1)); // op(B)ᵀ
      const gOpA = scale(g.matmul(c.dy(), opBT), alpha);
      return transA ? t(gOpA) : gOpA;
    };
    const gradB = () => {
      const opAT = transA ? c.x(0) : t(c.x(0)); // op(A)ᵀ
      const gOpB = scale(g.matmul(opAT, c.dy()), alpha);
      return transB ? t(gOpB) : gOpB;
    };
    return [
      c.wants(0) ? gradA() : undefined,
      c.wants(1) ? gradB() : undefined,
      c.wants(2) ? sumToShape(c, scale(c.dy(), beta), outShape(c), c.x(2)) : undefined,
    ];
  },

  // y = conv(x, W) + b, strides s, pads p, dilations d: x̄ = conv_transpose(ȳ, W) with the same s, p, d,
  // sized back to x. ConvTranspose gives s·(H_out − 1) + (k − 1)·d + 1 − p_begin − p_end + output_padding
  // rows; the rows of x the forward never read (stride remainder) are the output padding, where the
  // gradient is 0. With static sizes that padding is exact; otherwise use the largest (s − 1) and
  // slice back to x's size (the extra rows hold no contributions either way).
  Conv: (c) => {
    if (c.wants(1) || c.wants(2)) c.fail('only the gradient with respect to the input is implemented (weight and bias are constants here)');
    if (c.attrInt('group', 1) !== 1) c.fail('grouped convolutions are not supported');
    if (c.attrString('auto_pad', 'NOTSET') !== 'NOTSET') c.fail('auto_pad is not supported; give explicit pads');
    const { g } = c;
    const x = c.x(0);
    const w = c.x(1);
    const spatial = c.rank(w) - 2;
    const kernel = c.shape(w)?.slice(2);
    const strides = c.attrInts('strides') ?? Array(spatial).fill(1);
    const dilations = c.attrInts('dilations') ?? Array(spatial).fill(1);
    const pads = c.attrInts('pads') ?? Array(spatial * 2).fill(0);
    const xs = c.shape(x)?.slice(2);
    // Stride 1: x̄ = conv(ȳ, W̃) with W̃[i, o] = W[o, i] flipped in space and pads d·(k − 1) − p, the
    // same numbers as conv_transpose but as a Conv, which ONNX Runtime's CPU provider runs in its
    // blocked NCHWc layout: 1.5–1.7× faster than its ConvTranspose at SD 1.5 sizes. W̃ of a constant
    // W is folded once when the session is created. Only when W's output channels are static: ONNX
    // Runtime 1.30's CPU Conv never returns on an input with 0 channels (an adapter bank's down conv
    // fed rank 0), where its ConvTranspose gives the zeros.
    const outChannels = c.shape(w)?.[0];
    if (strides.every((s) => s === 1) && kernel !== undefined && isStatic(kernel) && typeof outChannels === 'number' && outChannels > 0) {
      const flipPads = pads.map((p, i) => dilations[i % spatial]! * (kernel[i % spatial]! - 1) - p);
      if (flipPads.every((p) => p >= 0)) {
        const swapped = g.transpose(w, [1, 0, ...range(spatial, 2)]);
        const flipped = kernel.every((k) => k === 1)
          ? swapped
          : g.node('Slice', [swapped, g.int64s(Array(spatial).fill(-1)), g.int64s(kernel.map((k) => -k - 1)), g.int64s(range(spatial, 2)), g.int64s(Array(spatial).fill(-1))])[0]!;
        return [g.node('Conv', [c.dy(), flipped], { dilations: attr.ints(dilations), pads: attr.ints(flipPads), strides: attr.ints(strides) })[0]!];
      }
    }
    let outputPadding: number[];
    let slice = false;
    if (strides.every((s) => s === 1)) outputPadding = Array(spatial).fill(0);
    else if (xs !== undefined && isStatic(xs) && kernel !== undefined && isStatic(kernel)) {
      outputPadding = xs.map((h, i) => (h + pads[i]! + pads[i + spatial]! - (kernel[i]! - 1) * dilations[i]! - 1) % strides[i]!);
    } else {
      outputPadding = strides.map((s) => s - 1);
      slice = true;
    }
    let gx = g.convTranspose2d(c.dy(), w, { strides, pads, dilations, outputPadding });
    if (slice) gx = g.slice(gx, { starts: Array(spatial).fill(0), ends: g.shape(x, { start: 2 }), axes: range(spatial, 2) });
    return [gx];
  },

  // y = softmax(x) along axis: x̄ = y·(ȳ − Σ_axis ȳ·y)
  Softmax: (c) => {
    const { g } = c;
    const axis = c.attrInt('axis', -1);
    const y = c.y();
    const dot = g.reduceSum(g.mul(c.dy(), y), { dims: [axis], keepdim: true });
    return [g.mul(y, g.sub(c.dy(), dot))];
  },

  // Shape-only ops: x̄ = reshape(ȳ, shape(x)).
  Reshape: (c) => [reshapeBack(c)],
  Unsqueeze: (c) => [reshapeBack(c)],
  Squeeze: (c) => [reshapeBack(c)],
  Flatten: (c) => [reshapeBack(c)],

  // y = expand(x, shape): x̄ = sum_to_x(ȳ)
  Expand: (c) => [sumToShape(c, c.dy(), outShape(c), c.x(0))],

  // y = transpose(x, perm): x̄ = transpose(ȳ, perm⁻¹)
  Transpose: (c) => {
    const perm = c.attrInts('perm') ?? range(c.rank(c.x(0))).reverse();
    const inverse = Array<number>(perm.length);
    perm.forEach((p, i) => (inverse[p] = i));
    return [c.g.transpose(c.dy(), inverse)];
  },

  // y = concat(x₀ … x_n, axis): x̄_i = the slice of ȳ at x_i's place (one Split with x_i's sizes).
  Concat: (c) => {
    const n = c.node.inputs.length;
    if (n === 1) return [c.dy()];
    const axis = c.attrInt('axis', 0);
    const { g } = c;
    const xs = range(n).map((i) => c.x(i));
    const sizes = xs.map((x) => {
      const s = c.shape(x);
      return s === undefined ? undefined : s[axis < 0 ? s.length + axis : axis];
    });
    let sizesValue: Value;
    if (sizes.every((d): d is number => typeof d === 'number')) sizesValue = g.int64s(sizes);
    else {
      const a = normAxis(c, axis, xs[0]!);
      sizesValue = g.concat(xs.map((x) => g.shape(x, { start: a, end: a + 1 })), { dim: 0 });
    }
    return g.split(c.dy(), sizesValue, n, { dim: axis });
  },

  // (y₀ … y_n) = split(x, axis): x̄ = concat(ȳ₀ … ȳ_n, axis), zeros for unused parts.
  Split: (c) => [c.g.concat(c.node.outputs.map((_, i) => c.dy(i)), { dim: c.attrInt('axis', 0) })],

  // y = x[starts:ends] (step 1) along axes: x̄ = zero-pad ȳ back to x's shape.
  Slice: (c) => [sliceBackward(c)],

  // y = gather(x, idx, axis): x̄ = zeros(x) with ȳ scattered (added) at idx; repeated indices accumulate.
  Gather: (c) => [gatherBackward(c), undefined],

  // y = resize_nearest(x): each x pixel receives the sum of ȳ over the output pixels that copied it.
  Resize: (c) => [resizeBackward(c)],

  // y = x̂·s + b per (n, c) over the spatial axes (ops.groupNorm's decomposition feeds (B, G, ·)):
  // x̄ by the normalisation backward with ĝ = ȳ·s.
  InstanceNormalization: (c) => {
    if (c.wants(1) || c.wants(2)) c.fail('the gradient with respect to scale/bias is not implemented (they are constants here)');
    const x = c.x(0);
    const r = c.rank(x);
    if (r < 3) c.fail('InstanceNormalization needs (N, C, D…)');
    const s = c.x(1);
    const scaled = isFilled(c, s, 1) ? c.dy() : c.g.mul(c.dy(), c.g.reshape(s, [-1, ...Array<number>(r - 2).fill(1)])); // (C) → (C, 1…)
    return [normalizationBackward(c, x, scaled, range(r - 2, 2), c.attrFloat('epsilon', 1e-5))];
  },

  // y = x̂·γ + β over the axes from `axis` to the last: x̄ by the normalisation backward with ĝ = ȳ·γ.
  LayerNormalization: (c) => {
    if (c.wants(1) || c.wants(2)) c.fail('the gradient with respect to scale/bias is not implemented (they are constants here)');
    if (c.node.outputs.length > 1 && c.node.outputs.slice(1).some((o) => o !== '')) c.fail('the Mean/InvStdDev outputs are not supported');
    const x = c.x(0);
    const axis = c.attrInt('axis', -1);
    const axes = axis < 0 ? range(-axis, axis) : range(c.rank(x) - axis, axis);
    return [normalizationBackward(c, x, c.g.mul(c.dy(), c.x(1)), axes, c.attrFloat('epsilon', 1e-5))];
  },

  // y = mean(x, axes): x̄ = expand(ȳ, shape(x))·(|y|/|x|)
  ReduceMean: (c) => {
    const { g } = c;
    const x = c.x(0);
    const axes = c.attrInts('axes');
    const expanded = g.expand(keepReducedAxes(c, axes), shapeOf(c, x));
    const xs = c.shape(x);
    let count: Value;
    if (xs !== undefined && axes !== undefined && axes.every((a) => typeof xs[a < 0 ? a + xs.length : a] === 'number')) {
      count = g.scalar(axes.reduce((n, a) => n * (xs[a < 0 ? a + xs.length : a] as number), 1));
    } else if (xs !== undefined && axes === undefined && isStatic(xs)) {
      count = g.scalar(xs.reduce((n, d) => n * d, 1));
    } else count = g.div(g.cast(g.size(x), 'float32'), g.cast(g.size(c.y()), 'float32'));
    return [g.div(expanded, count)];
  },

  // y = max(x, axes): ȳ goes to the maximal elements; ties share it evenly (torch's amax convention).
  ReduceMax: (c) => [reduceExtremum(c)],
  // y = min(x, axes): likewise for the minimal elements.
  ReduceMin: (c) => [reduceExtremum(c)],

  // y = sum(x, axes): x̄ = expand(ȳ, shape(x))
  ReduceSum: (c) => {
    const x = c.x(0);
    let axes: readonly number[] | undefined;
    if (c.has(1)) {
      const known = c.ints(c.x(1));
      if (known === undefined || !known.every((a): a is number => typeof a === 'number')) return c.fail('ReduceSum axes must be known when building the VJP');
      axes = known;
      if (axes.length === 0 && c.attrInt('noop_with_empty_axes', 0) === 1) return [c.dy(), undefined];
      if (axes.length === 0) axes = undefined;
    }
    return [c.g.expand(keepReducedAxes(c, axes), shapeOf(c, x)), undefined];
  },
};

/** ReduceMax / ReduceMin backward: x̄ = ȳ·[x = y] / #{x = y} over each reduced group. */
function reduceExtremum(c: RuleContext): Value {
  const { g } = c;
  const x = c.x(0);
  const axes = c.attrInts('axes');
  const keep = (v: Value) => (c.attrInt('keepdims', 1) === 1 || axes === undefined ? v : g.unsqueeze(v, axes.map((a) => normAxis(c, a, x))));
  const hit = g.cast(g.equal(x, keep(c.y())), 'float32'); // 1 at the extremal elements
  const ties = g.reduceSum(hit, { dims: axes === undefined ? Array.from({ length: c.rank(x) }, (_, i) => i) : axes.map((a) => normAxis(c, a, x)), keepdim: true });
  return g.mul(g.expand(keepReducedAxes(c, axes), shapeOf(c, x)), g.div(hit, ties));
}

/** ȳ with the reduced axes restored as size-1 axes (nothing to do with keepdims = 1 or all axes). */
function keepReducedAxes(c: RuleContext, axes: readonly number[] | undefined): Value {
  if (c.attrInt('keepdims', 1) === 1 || axes === undefined) return c.dy();
  return c.g.unsqueeze(c.dy(), axes.map((a) => normAxis(c, a, c.x(0))));
}

/**
 * ȳ reshaped to x's shape. The target is a constant when x's shape can be spelled with Reshape's
 * own conventions (numbers, 0 = keep ȳ's dim at that index, one −1), which also lets ONNX Runtime
 * infer the result's shape; otherwise it is Shape(x).
 */
function reshapeBack(c: RuleContext): Value {
  const xs = c.shape(c.x(0));
  const ys = c.shape(c.y());
  if (xs !== undefined && ys !== undefined) {
    const target = xs.map((d, i) => (typeof d === 'number' ? d : d === ys[i] ? 0 : -1));
    // 0 copies ȳ's dim, so a literal 0-sized dim cannot be written; more than one −1 is ambiguous.
    if (target.filter((d) => d === -1).length <= 1 && !xs.some((d) => d === 0)) return c.g.reshape(c.dy(), target);
  }
  return c.g.reshape(c.dy(), shapeOf(c, c.x(0)));
}

/** Max/Min of two operands: the mask m_a = [a wins] + ½[a = b], ā = sum_to_a(ȳ·m_a), b̄ = sum_to_b(ȳ·(1 − m_a)). */
function minMax(c: RuleContext, which: 'max' | 'min'): ReadonlyArray<Value | undefined> {
  const n = c.node.inputs.length;
  if (n === 1) return [c.dy()];
  if (n !== 2) c.fail(`${c.node.opType} with ${n} operands is not supported (two expected)`);
  const { g } = c;
  const [a, b] = [c.x(0), c.x(1)];
  const wins = which === 'max' ? g.greater(a, b) : g.less(a, b);
  const maskA = g.add(g.cast(wins, 'float32'), g.mul(g.cast(g.equal(a, b), 'float32'), g.scalar(0.5)));
  return [
    c.wants(0) ? sumToShape(c, g.mul(c.dy(), maskA), outShape(c), a) : undefined,
    c.wants(1) ? sumToShape(c, g.mul(c.dy(), g.sub(g.scalar(1), maskA)), outShape(c), b) : undefined,
  ];
}

/**
 * Slice backward: pad ȳ with begin = the effective start and end = dim − start − len on each sliced
 * axis. The effective start follows ONNX: negative starts count from the end, then clamp to [0, dim].
 * Computed from constants when starts and x's sizes are static, else with int64 nodes.
 */
function sliceBackward(c: RuleContext): Value {
  const { g } = c;
  const x = c.x(0);
  const r = c.rank(x);
  const starts = c.x(1);
  const count = c.shape(starts)?.[0];
  const axesKnown = c.has(3) ? c.ints(c.x(3)) : typeof count === 'number' ? range(count) : undefined;
  if (axesKnown === undefined || !axesKnown.every((a): a is number => typeof a === 'number')) return c.fail('Slice axes must be known when building the VJP');
  const axes = axesKnown.map((a) => (a < 0 ? a + r : a));
  if (c.has(4)) {
    const steps = c.ints(c.x(4));
    if (steps === undefined || steps.some((s) => s !== 1)) c.fail('only Slice with steps of 1 is supported');
  }
  const xs = c.shape(x);
  const ys = c.shape(c.y());
  const startsKnown = c.ints(starts);
  const begin: (number | Value)[] = Array(r).fill(0);
  const end: (number | Value)[] = Array(r).fill(0);
  axes.forEach((a, p) => {
    const dim = xs?.[a];
    const len = ys?.[a];
    const s = startsKnown?.[p];
    if (typeof dim === 'number' && typeof len === 'number' && typeof s === 'number') {
      const eff = Math.min(Math.max(s < 0 ? s + dim : s, 0), dim);
      begin[a] = eff;
      end[a] = dim - eff - len;
      return;
    }
    const dimV = g.shape(x, { start: a, end: a + 1 });
    const sV = g.slice(starts, { starts: [p], ends: [p + 1], axes: [0] });
    const zero = g.int64s([0]);
    const eff = g.min(g.max(g.where(g.less(sV, zero), g.add(sV, dimV), sV), zero), dimV);
    begin[a] = eff;
    end[a] = g.sub(g.sub(dimV, eff), g.shape(c.y(), { start: a, end: a + 1 }));
  });
  const all = [...begin, ...end];
  const pads = all.every((v): v is number => typeof v === 'number')
    ? g.int64s(all)
    : g.concat(all.map((v) => (typeof v === 'number' ? g.int64s([v]) : v)), { dim: 0 });
  return g.pad(c.dy(), pads);
}

/**
 * Gather backward (w.r.t. data). With a the gather axis, ȳ is (x[:a], idx…, x[a+1:]); move idx's
 * axes to the front, scatter-add into zeros shaped (x[a], x[:a], x[a+1:]) at idx, move axis a back.
 */
function gatherBackward(c: RuleContext): Value | undefined {
  if (!c.wants(0)) return undefined;
  const { g } = c;
  const x = c.x(0);
  const r = c.rank(x);
  const q = c.rank(c.x(1));
  const a = normAxis(c, c.attrInt('axis', 0), x);
  let idx = c.x(1);
  const known = c.ints(idx);
  if (known === undefined || known.some((i) => typeof i !== 'number' || i < 0)) {
    // Negative indices count from the end of axis a.
    idx = g.where(g.less(idx, g.int64s([0])), g.add(idx, g.shape(x, { start: a, end: a + 1 })), idx);
  }
  const front = [a, ...range(a), ...range(r - a - 1, a + 1)]; // x → (x[a], x[:a], x[a+1:])
  const dyFront = a === 0 ? c.dy() : g.transpose(c.dy(), [...range(q, a), ...range(a), ...range(r - a - 1, a + q)]);
  const zeros = g.expand(g.scalar(0), g.gather(g.shape(x), g.int64s(front), { dim: 0 }));
  const scattered = g.scatterNdAdd(zeros, g.unsqueeze(idx, [-1]), dyFront);
  if (a === 0) return scattered;
  const back = Array<number>(r);
  front.forEach((p, i) => (back[p] = i));
  return g.transpose(scattered, back);
}

/**
 * Resize (mode nearest) backward on the last two axes: y = M_h · x · M_wᵀ with one-hot selection
 * matrices M (out × in), so x̄ = M_hᵀ · ȳ · M_w. M is read off ONNX Runtime itself: the same Resize
 * (same attributes, same size or scale on that axis) applied to the ramp 0…in−1 gives, for every
 * output row, the input row it copies, bit for bit as the forward chose it. Axes other than the last
 * two must keep their size.
 */
function resizeBackward(c: RuleContext): Value {
  const { g } = c;
  if (c.attrString('mode', 'nearest') !== 'nearest') c.fail('only nearest Resize is supported');
  if (c.attrString('coordinate_transformation_mode', 'half_pixel') === 'tf_crop_and_resize') c.fail('tf_crop_and_resize is not supported');
  const x = c.x(0);
  const r = c.rank(x);
  const xs = c.shape(x);
  const ys = c.shape(c.y());
  if (r < 2 || xs === undefined || ys === undefined || !xs.slice(0, -2).every((d, i) => d === ys[i])) {
    c.fail('Resize must keep every axis but the last two (could not verify that statically)');
  }
  const useScales = c.has(2) && !c.has(3);
  const scales = useScales ? c.floats(c.x(2)) : undefined;
  if (useScales && scales === undefined) c.fail('Resize scales must be constants');
  const attributes = Object.fromEntries(c.node.attributes);
  let gx = c.dy();
  for (const axis of [r - 2, r - 1]) {
    const inDim = xs[axis]!;
    const outDim = ys[axis]!;
    if (inDim === outDim) continue; // same size: nearest is the identity on this axis
    const unit = (len: number | Value): readonly number[] => Array.from({ length: r }, (_, i) => (i === axis ? (typeof len === 'number' ? len : -1) : 1));
    // The ramp 0 … in−1 along `axis` (1 elsewhere).
    let ramp: Value;
    if (typeof inDim === 'number') ramp = g.floats(unit(inDim), Float32Array.from(range(inDim)));
    else {
      const n = g.reshape(g.cast(g.shape(x, { start: axis, end: axis + 1 }), 'float32'), []);
      ramp = g.reshape(g.range(g.scalar(0), n, g.scalar(1)), unit(-1));
    }
    let sizeInputs: (Value | undefined)[];
    if (useScales) sizeInputs = [undefined, g.floats([r], Float32Array.from(unit(scales![axis]!)))];
    else if (typeof outDim === 'number') sizeInputs = [undefined, undefined, g.int64s(unit(outDim))];
    else {
      const sizes = c.x(3);
      const one = (k: number) => g.int64s(Array(k).fill(1));
      const parts = [...(axis > 0 ? [one(axis)] : []), g.slice(sizes, { starts: [axis], ends: [axis + 1], axes: [0] }), ...(axis < r - 1 ? [one(r - 1 - axis)] : [])];
      sizeInputs = [undefined, undefined, g.concat(parts, { dim: 0 })];
    }
    const source = g.reshape(g.node('Resize', [ramp, ...sizeInputs], attributes)[0]!, [-1, 1]); // (out, 1): the input row each output row copies
    const select = g.cast(g.equal(source, g.reshape(ramp, [1, -1])), 'float32'); // M (out, in)
    gx = axis === r - 1 ? g.matmul(gx, select) : g.matmul(g.transpose(select, [1, 0]), gx);
  }
  return gx;
}
