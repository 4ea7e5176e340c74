/**
 * The VJP rules (models/onnx/vjp-rules.ts) against central finite differences, one small graph per
 * op (broadcasting and shape-changing cases included) plus a few multi-op graphs, all run in ONNX
 * Runtime.
 *
 * The check, per graph f and seeded random x, cotangent c and directions v_k (k = 1…3):
 *   fd_k = ⟨c, f(x⁺) − f(x⁻)⟩,  an_k = ⟨ḡ, x⁺ − x⁻⟩,  x± = fp32(x ± ε·v_k),  ḡ = the VJP graph's grad at x,
 * accumulated in float64 from ORT's float32 outputs (using the rounded x± keeps the input rounding
 * out of the comparison). Pass: ‖fd − an‖ ≤ REL_TOL · max(‖fd‖, ‖an‖) over the three directions (one
 * direction alone can give ⟨c, J·v⟩ ≈ 0 by chance, where a relative test means nothing). At ε = 1e-3
 * the float32 rounding of f(x±) costs up to ~1e-4 relative and the truncation error (ε²·|f'''|) less;
 * over ten different seed sets the worst case (the attention graph) stays below 5e-4. REL_TOL = 2e-3
 * keeps that margin, while a wrong rule is off by O(1) (a zero gradient gives 1).
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { ModelError } from '../models/index.ts';
import { attr, type Dim, type Graph, type Value } from '../models/onnx/builder.ts';
import { Ops } from '../models/onnx/ops.ts';
import { serializeModel } from '../models/onnx/serialize.ts';
import { buildVjpGraph, cotangentInput, gradientOutput } from '../models/onnx/vjp.ts';
import { dumpGraph } from '../models/onnx/dump.ts';
import { OrtSession } from '../models/runtime.ts';
import { attachAdapterBank, LORA_MIX_INPUT } from '../models/networks/adapter-bank.ts';
import { conv2d, groupNorm, linear } from '../models/networks/layers.ts';
import type { Tensor } from '../models/tensor.ts';
import { assertClose } from './fixtures.ts';

const EPS = 1e-3;
const REL_TOL = 2e-3;
const DIRECTIONS = 3;

/** mulberry32 + Box–Muller: seeded N(0, 1) samples. */
function normalSource(seed: number): () => number {
  let s = seed >>> 0;
  const uniform = () => {
    s = (s + 0x6d2b79f5) >>> 0;
    let t = s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  return () => Math.sqrt(-2 * Math.log(uniform() + 1e-12)) * Math.cos(2 * Math.PI * uniform());
}

/**
 * How values are drawn: N(0, 1); 0.5 + |N(0, 1)| (away from 0); or, for the non-smooth ops
 * (Max, Min, Clip), on the lattice k/4 (constants) and k/4 + 1/8 (inputs), so that no input is
 * within 1/8 of a kink and ±ε·v never crosses one.
 */
type Init = 'normal' | 'positive' | 'lattice' | 'offLattice';

function draw(init: Init, normal: () => number): number {
  switch (init) {
    case 'normal':
      return normal();
    case 'positive':
      return 0.5 + Math.abs(normal());
    case 'lattice':
      return Math.round(4 * normal()) / 4;
    case 'offLattice':
      return Math.round(4 * normal()) / 4 + 1 / 8;
  }
}

interface InputSpec {
  readonly shape: readonly number[];
  /** Declared dims (symbolic names exercise the run-time shape paths); default `shape`. */
  readonly dims?: readonly Dim[];
  readonly init?: Init;
  /** int64 inputs (adapter owners): fixed values. */
  readonly int64?: readonly number[];
}

interface RuleCase {
  readonly name: string;
  /** Inputs by name; the first one is differentiated. */
  readonly inputs: Readonly<Record<string, InputSpec>>;
  /** Inputs the network code declares itself (the adapter bank's), fed like `inputs`. */
  readonly feeds?: Readonly<Record<string, InputSpec>>;
  readonly build: (g: Ops, x: Readonly<Record<string, Value>>) => Value;
  /** Adapter-bank graphs are built with these module prefixes. */
  readonly bank?: readonly string[];
  /** Attention cores get the lean backward in this many head groups (`VjpOptions.leanAttention`). */
  readonly recomputeGroups?: number;
  /** …reading the forward's probabilities instead of recomputing them. */
  readonly keepProbs?: boolean;
}

const numel = (shape: readonly number[]) => shape.reduce((a, b) => a * b, 1);

function sample(spec: InputSpec, normal: () => number): Tensor {
  if (spec.int64 !== undefined) return { dtype: 'int64', shape: spec.shape, data: BigInt64Array.from(spec.int64.map((v) => BigInt(v))) };
  const data = new Float32Array(numel(spec.shape));
  for (let i = 0; i < data.length; i++) data[i] = draw(spec.init ?? 'normal', normal);
  return { dtype: 'float32', shape: spec.shape, data };
}

/** Graph bytes with parameters filled by seeded N(0, 0.5²) values. */
function modelBytes(graph: Graph): Uint8Array {
  const normal = normalSource(99);
  return serializeModel(graph, (p) => {
    const values = Float32Array.from({ length: numel(p.shape) }, () => 0.5 * normal());
    return { dtype: 'float32', data: { kind: 'raw', bytes: new Uint8Array(values.buffer) } };
  });
}

function buildForward(c: RuleCase): Graph {
  const g = new Ops(c.name.replace(/[^a-z0-9]+/gi, '_'));
  if (c.bank !== undefined) attachAdapterBank(g, c.bank);
  const values: Record<string, Value> = {};
  for (const [name, spec] of Object.entries(c.inputs)) values[name] = g.input(name, spec.int64 === undefined ? 'float32' : 'int64', spec.dims ?? spec.shape);
  g.output(c.build(g, values), 'y', 'float32', undefined);
  return g.finish();
}

const dot = (a: ArrayLike<number>, b: ArrayLike<number>) => {
  let s = 0;
  for (let i = 0; i < a.length; i++) s += a[i]! * b[i]!;
  return s;
};

/** Runs the finite-difference check; returns the worst relative error over the directions. */
async function checkRule(c: RuleCase, seed: number): Promise<number> {
  const forward = buildForward(c);
  const wrt = Object.keys(c.inputs)[0]!;
  const vjp = buildVjpGraph(forward, { outputs: ['y'], wrt, ...(c.recomputeGroups === undefined ? {} : { leanAttention: () => ({ probs: c.keepProbs === true ? ('keep' as const) : ('recompute' as const), groups: c.recomputeGroups! }) }) });
  if (c.recomputeGroups !== undefined) {
    // The core was matched: one recomputed softmax per head group (none when the probabilities are
    // kept), none of the per-op softmax rule; in several groups, the forward runs in those groups too.
    const softmaxes = vjp.nodes.filter((n) => n.opType === 'Softmax');
    const scope = c.keepProbs === true ? '/lean' : '/recompute';
    assert.equal(softmaxes.length, c.recomputeGroups + (c.keepProbs === true ? 0 : c.recomputeGroups), `${c.name}: forward softmax per head group + recomputed ones`);
    assert.ok(vjp.nodes.some((n) => n.name.includes(`Softmax${scope}/`)), `${c.name}: the lean backward`);
    assert.ok(!vjp.nodes.some((n) => n.name.startsWith('grad.') && n.name.includes('Softmax/') && !n.name.includes(`${scope}/`)), `${c.name}: no per-op softmax rule`);
    assert.ok(!vjp.nodes.some((n) => n.name.includes(`Softmax${scope}/`) && n.opType === 'Sub'), `${c.name}: dP − D inside the product`);
  }
  const normal = normalSource(seed);
  const feeds: Record<string, Tensor> = {};
  for (const [name, spec] of Object.entries({ ...c.inputs, ...c.feeds })) feeds[name] = sample(spec, normal);
  if (c.bank !== undefined) feeds[LORA_MIX_INPUT] = { dtype: 'float32', shape: [c.inputs[wrt]!.shape[0]!, 2], data: Float32Array.from([0.8, -0.6, 0.3, 1.1].slice(0, 2 * c.inputs[wrt]!.shape[0]!)) };
  const f = await OrtSession.create(modelBytes(forward), { device: 'cpu' });
  const b = await OrtSession.create(modelBytes(vjp), { device: 'cpu' });
  try {
    const y0 = (await f.run(feeds)).y!;
    const cot: Tensor<'float32'> = { dtype: 'float32', shape: y0.shape, data: Float32Array.from({ length: numel(y0.shape) }, normal) };
    const out = await b.run({ ...feeds, [cotangentInput('y')]: cot });
    const grad = out[gradientOutput(wrt)]!;
    assert.deepEqual(grad.shape, feeds[wrt]!.shape, `${c.name}: the gradient has the input's shape`);
    assertClose(out.y!.data as Float32Array, y0.data as Float32Array, 1e-5, `${c.name}: the VJP graph recomputes the forward`);
    const x = feeds[wrt]!.data as Float32Array;
    const fd: number[] = [];
    const an: number[] = [];
    for (let k = 0; k < DIRECTIONS; k++) {
      const v = Float32Array.from({ length: x.length }, normal);
      const plus = Float32Array.from(x, (xi, i) => xi + EPS * v[i]!);
      const minus = Float32Array.from(x, (xi, i) => xi - EPS * v[i]!);
      const yp = (await f.run({ ...feeds, [wrt]: { dtype: 'float32', shape: feeds[wrt]!.shape, data: plus } })).y!.data as Float32Array;
      const ym = (await f.run({ ...feeds, [wrt]: { dtype: 'float32', shape: feeds[wrt]!.shape, data: minus } })).y!.data as Float32Array;
      fd.push(dot(cot.data, yp) - dot(cot.data, ym));
      an.push(dot(grad.data as Float32Array, Float32Array.from(plus, (p, i) => p - minus[i]!)));
    }
    const norm = (a: readonly number[]) => Math.sqrt(dot(a, a));
    const rel = norm(fd.map((d, k) => d - an[k]!)) / Math.max(norm(fd), norm(an), 1e-30);
    const list = (a: readonly number[]) => a.map((d) => d.toExponential(6)).join(', ');
    assert.ok(rel <= REL_TOL, `${c.name}: finite differences [${list(fd)}] vs VJP [${list(an)}] (relative error ${rel.toExponential(2)} > ${REL_TOL})`);
    const worst = rel;
    return worst;
  } finally {
    await f.dispose();
    await b.dispose();
  }
}

const c = (shape: readonly number[], seed: number, init: Init = 'normal'): ((g: Ops) => Value) => (g) => {
  const normal = normalSource(seed);
  return g.floats(shape, Float32Array.from({ length: numel(shape) }, () => draw(init, normal)));
};

const INT64_MAX = Number.MAX_SAFE_INTEGER; // read as "to the end" by Slice

const CASES: RuleCase[] = [
  // ---- elementwise with broadcasting
  { name: 'Add (2,3,4) + const (3,1)', inputs: { x: { shape: [2, 3, 4] } }, build: (g, { x }) => g.add(x!, c([3, 1], 1)(g)) },
  { name: 'Add: broadcast operand (3,1) + const (2,3,4)', inputs: { x: { shape: [3, 1] } }, build: (g, { x }) => g.add(x!, c([2, 3, 4], 2)(g)) },
  { name: 'Add: broadcast operand, symbolic dims', inputs: { x: { shape: [3, 1], dims: ['r', 'one'] } }, build: (g, { x }) => g.add(c([2, 3, 4], 2)(g), x!) },
  { name: 'Sub: const (2,1,4) − x (3,1)', inputs: { x: { shape: [3, 1] } }, build: (g, { x }) => g.sub(c([2, 1, 4], 3)(g), x!) },
  { name: 'Sub: x − other input', inputs: { x: { shape: [2, 3] }, other: { shape: [3] } }, build: (g, { x, other }) => g.sub(x!, other!) },
  { name: 'Mul: x (4) · const (2,3,4)', inputs: { x: { shape: [4] } }, build: (g, { x }) => g.mul(x!, c([2, 3, 4], 4)(g)) },
  { name: 'Mul: x · x (a value used twice)', inputs: { x: { shape: [2, 5] } }, build: (g, { x }) => g.mul(x!, x!) },
  { name: 'Div: x / const', inputs: { x: { shape: [2, 3] } }, build: (g, { x }) => g.div(x!, c([3], 5, 'positive')(g)) },
  { name: 'Div: const (2,3) / x (3)', inputs: { x: { shape: [3], init: 'positive' } }, build: (g, { x }) => g.div(c([2, 3], 6)(g), x!) },
  { name: 'Div: x / x²', inputs: { x: { shape: [6], init: 'positive' } }, build: (g, { x }) => g.div(x!, g.mul(x!, x!)) },
  { name: 'Neg', inputs: { x: { shape: [2, 3] } }, build: (g, { x }) => g.neg(x!) },
  { name: 'Sqrt', inputs: { x: { shape: [2, 3], init: 'positive' } }, build: (g, { x }) => g.sqrt(x!) },
  { name: 'Exp', inputs: { x: { shape: [2, 3] } }, build: (g, { x }) => g.exp(x!) },
  { name: 'Log', inputs: { x: { shape: [2, 3], init: 'positive' } }, build: (g, { x }) => g.log(x!) },
  { name: 'ReduceMax over the last axis, keepdim', inputs: { x: { shape: [2, 3, 5] } }, build: (g, { x }) => g.mul(g.reduceMax(x!, { dims: [-1], keepdim: true }), c([2, 3, 1], 61)(g)) },
  { name: 'ReduceMax over axis 1', inputs: { x: { shape: [2, 4, 3] } }, build: (g, { x }) => g.reduceMax(x!, { dims: [1], keepdim: false }) },
  { name: 'ReduceMin over the last axis', inputs: { x: { shape: [3, 6] } }, build: (g, { x }) => g.reduceMin(x!, { dims: [-1], keepdim: false }) },
  { name: 'Sin', inputs: { x: { shape: [2, 3] } }, build: (g, { x }) => g.sin(x!) },
  { name: 'Cos', inputs: { x: { shape: [2, 3] } }, build: (g, { x }) => g.cos(x!) },
  { name: 'Sigmoid', inputs: { x: { shape: [2, 3] } }, build: (g, { x }) => g.sigmoid(x!) },
  { name: 'Erf', inputs: { x: { shape: [2, 3] } }, build: (g, { x }) => g.erf(x!) },
  { name: 'Identity', inputs: { x: { shape: [2, 3] } }, build: (g, { x }) => g.mul(g.identity(x!), c([2, 3], 7)(g)) },
  { name: 'Cast float32 → float64 → float32', inputs: { x: { shape: [2, 3] } }, build: (g, { x }) => g.cast(g.mul(g.cast(x!, 'float64'), g.cast(c([3], 8)(g), 'float64')), 'float32') },
  { name: 'Max: x (2,3) vs const (3)', inputs: { x: { shape: [2, 3], init: 'offLattice' } }, build: (g, { x }) => g.max(x!, c([3], 9, 'lattice')(g)) },
  { name: 'Max: broadcast operand x (3) vs const (4,3)', inputs: { x: { shape: [3], init: 'offLattice' } }, build: (g, { x }) => g.max(c([4, 3], 10, 'lattice')(g), x!) },
  { name: 'Min: x vs const', inputs: { x: { shape: [2, 4], init: 'offLattice' } }, build: (g, { x }) => g.min(c([2, 4], 11, 'lattice')(g), x!) },
  { name: 'Clip to [−0.5, 0.75]', inputs: { x: { shape: [3, 4], init: 'offLattice' } }, build: (g, { x }) => g.clamp(x!, { min: -0.5, max: 0.75 }) },
  // ---- linear algebra
  { name: 'MatMul: x (2,3,4,5) · const (5,6)', inputs: { x: { shape: [2, 3, 4, 5] } }, build: (g, { x }) => g.matmul(x!, c([5, 6], 12)(g)) },
  { name: 'MatMul: const (2,3,4,5) · x (5,6) (weight reduced over the batch)', inputs: { x: { shape: [5, 6] } }, build: (g, { x }) => g.matmul(c([2, 3, 4, 5], 13)(g), x!) },
  { name: 'MatMul: batch broadcast x (3,1,4,5) · const (2,5,6)', inputs: { x: { shape: [3, 1, 4, 5] } }, build: (g, { x }) => g.matmul(x!, c([2, 5, 6], 14)(g)) },
  { name: 'MatMul: batch broadcast const (3,1,4,5) · x (2,5,6)', inputs: { x: { shape: [2, 5, 6] } }, build: (g, { x }) => g.matmul(c([3, 1, 4, 5], 15)(g), x!) },
  { name: 'MatMul: x · xᵀ, symbolic dims', inputs: { x: { shape: [2, 4, 3], dims: ['b', 'n', 3] } }, build: (g, { x }) => g.matmul(x!, g.transpose(x!, [0, 2, 1])) },
  {
    name: 'Gemm: transA, transB, α, β, C broadcast (w.r.t. A)',
    inputs: { x: { shape: [5, 3] } },
    build: (g, { x }) => g.node('Gemm', [x!, c([4, 5], 16)(g), c([1, 4], 17)(g)], { transA: attr.int(1), transB: attr.int(1), alpha: attr.float(0.7), beta: attr.float(1.3) })[0]!,
  },
  {
    name: 'Gemm (w.r.t. B)',
    inputs: { x: { shape: [4, 5] } },
    build: (g, { x }) => g.node('Gemm', [c([5, 3], 18)(g), x!, c([1, 4], 17)(g)], { transA: attr.int(1), transB: attr.int(1), alpha: attr.float(0.7) })[0]!,
  },
  {
    name: 'Gemm (w.r.t. C)',
    inputs: { x: { shape: [4] } },
    build: (g, { x }) => g.node('Gemm', [c([3, 5], 19)(g), c([5, 4], 20)(g), x!], { beta: attr.float(1.3) })[0]!,
  },
  // ---- convolution
  { name: 'Conv 3×3, stride 1, pad 1', inputs: { x: { shape: [2, 3, 6, 5] } }, build: (g, { x }) => g.conv2d(x!, c([4, 3, 3, 3], 21)(g), c([4], 22)(g), { padding: 1 }) },
  { name: 'Conv 3×3, stride 2, pad 1, even size', inputs: { x: { shape: [1, 3, 8, 8] } }, build: (g, { x }) => g.conv2d(x!, c([4, 3, 3, 3], 23)(g), undefined, { stride: 2, padding: 1 }) },
  { name: 'Conv 3×3, stride 2, pad 1, odd size', inputs: { x: { shape: [1, 3, 7, 9] } }, build: (g, { x }) => g.conv2d(x!, c([4, 3, 3, 3], 24)(g), undefined, { stride: 2, padding: 1 }) },
  { name: 'Conv 3×3, stride 2, pads (0,0,1,1)', inputs: { x: { shape: [1, 2, 8, 7] } }, build: (g, { x }) => g.conv2d(x!, c([3, 2, 3, 3], 25)(g), undefined, { stride: 2, padding: [0, 0, 1, 1] }) },
  { name: 'Conv stride 2, symbolic sizes (odd at run time)', inputs: { x: { shape: [1, 3, 7, 8], dims: ['b', 3, 'h', 'w'] } }, build: (g, { x }) => g.conv2d(x!, c([4, 3, 3, 3], 26)(g), undefined, { stride: 2, padding: 1 }) },
  // Stride 1 runs as a Conv over the flipped kernel (pads d·(k − 1) − p); over-padding keeps ConvTranspose.
  { name: 'Conv 3×3, stride 1, dilation 2, pads (2,1,0,2)', inputs: { x: { shape: [1, 3, 9, 8] } }, build: (g, { x }) => g.node('Conv', [x!, c([4, 3, 3, 3], 29)(g)], { dilations: attr.ints([2, 2]), pads: attr.ints([2, 1, 0, 2]) })[0]! },
  { name: 'Conv 3×2, stride 1, pad 3 (over-padded)', inputs: { x: { shape: [1, 2, 5, 6] } }, build: (g, { x }) => g.node('Conv', [x!, c([3, 2, 3, 2], 30)(g)], { pads: attr.ints([3, 1, 3, 0]) })[0]! },
  { name: 'Conv 1×1', inputs: { x: { shape: [2, 3, 4, 4] } }, build: (g, { x }) => g.conv2d(x!, c([5, 3, 1, 1], 27)(g), c([5], 28)(g)) },
  {
    name: 'Conv 3×3, dilation 2, pad 2',
    inputs: { x: { shape: [1, 2, 7, 7] } },
    build: (g, { x }) => g.node('Conv', [x!, c([3, 2, 3, 3], 29)(g)], { dilations: attr.ints([2, 2]), pads: attr.ints([2, 2, 2, 2]), strides: attr.ints([1, 1]) })[0]!,
  },
  // ---- softmax and normalisations
  { name: 'Softmax over the last axis', inputs: { x: { shape: [2, 3, 5] } }, build: (g, { x }) => g.softmax(x!, { dim: -1 }) },
  { name: 'Softmax over axis 1', inputs: { x: { shape: [2, 4, 3] } }, build: (g, { x }) => g.softmax(x!, { dim: 1 }) },
  {
    name: 'InstanceNormalization with scale and bias',
    inputs: { x: { shape: [2, 3, 4, 5] } },
    build: (g, { x }) => g.node('InstanceNormalization', [x!, c([3], 30)(g), c([3], 31)(g)], { epsilon: attr.float(1e-5) })[0]!,
  },
  { name: 'GroupNorm decomposition (Reshape → InstanceNormalization → Reshape → affine)', inputs: { x: { shape: [2, 6, 3, 4] } }, build: (g, { x }) => g.groupNorm(x!, c([6], 32)(g), c([6], 33)(g), { groups: 3, channels: 6, eps: 1e-5 }) },
  { name: 'GroupNorm, symbolic dims', inputs: { x: { shape: [1, 4, 3, 5], dims: ['b', 4, 'h', 'w'] } }, build: (g, { x }) => g.groupNorm(x!, c([4], 34)(g), c([4], 35)(g), { groups: 2, channels: 4, eps: 1e-6 }) },
  { name: 'LayerNormalization', inputs: { x: { shape: [2, 3, 6] } }, build: (g, { x }) => g.layerNorm(x!, c([6], 36)(g), c([6], 37)(g), { eps: 1e-5 }) },
  // ---- reductions
  { name: 'ReduceMean over axis 1', inputs: { x: { shape: [2, 3, 4] } }, build: (g, { x }) => g.reduceMean(x!, { dims: [1], keepdim: false }) },
  { name: 'ReduceMean over the last axis, keepdim', inputs: { x: { shape: [2, 3, 4] } }, build: (g, { x }) => g.mul(g.reduceMean(x!, { dims: [-1], keepdim: true }), c([2, 3, 4], 38)(g)) },
  { name: 'ReduceMean, symbolic dims', inputs: { x: { shape: [2, 3, 4], dims: ['a', 'b', 4] } }, build: (g, { x }) => g.reduceMean(x!, { dims: [0, 1], keepdim: false }) },
  { name: 'ReduceSum over axes 0 and 2', inputs: { x: { shape: [2, 3, 4] } }, build: (g, { x }) => g.reduceSum(x!, { dims: [0, 2], keepdim: false }) },
  // ---- shapes
  { name: 'Reshape', inputs: { x: { shape: [2, 3, 4] } }, build: (g, { x }) => g.mul(g.reshape(x!, [0, -1]), c([2, 12], 39)(g)) },
  { name: 'Transpose', inputs: { x: { shape: [2, 3, 4] } }, build: (g, { x }) => g.mul(g.transpose(x!, [2, 0, 1]), c([4, 2, 3], 40)(g)) },
  { name: 'Unsqueeze', inputs: { x: { shape: [2, 3] } }, build: (g, { x }) => g.mul(g.unsqueeze(x!, [1, -1]), c([2, 4, 3, 1], 41)(g)) },
  { name: 'Squeeze', inputs: { x: { shape: [2, 1, 3] } }, build: (g, { x }) => g.mul(g.node('Squeeze', [x!, g.int64s([1])])[0]!, c([2, 3], 42)(g)) },
  { name: 'Expand', inputs: { x: { shape: [3, 1] } }, build: (g, { x }) => g.mul(g.expand(x!, g.int64s([2, 3, 4])), c([2, 3, 4], 43)(g)) },
  { name: 'Concat [x, const, x] on axis 1', inputs: { x: { shape: [2, 3, 2] } }, build: (g, { x }) => g.mul(g.concat([x!, c([2, 1, 2], 44)(g), x!], { dim: 1 }), c([2, 7, 2], 45)(g)) },
  { name: 'Concat on the last axis, symbolic dims', inputs: { x: { shape: [2, 3], dims: ['a', 'b'] } }, build: (g, { x }) => g.concat([g.sin(x!), x!], { dim: -1 }) },
  { name: 'Split into 3, middle part unused', inputs: { x: { shape: [2, 6] } }, build: (g, { x }) => { const [a, , b] = g.chunk(x!, 3, { dim: -1 }); return g.mul(a!, g.exp(b!)); } },
  { name: 'Slice with a negative start and an open end', inputs: { x: { shape: [2, 5, 6] } }, build: (g, { x }) => g.mul(g.slice(x!, { starts: [1, -4], ends: [INT64_MAX, -1], axes: [1, 2] }), c([2, 4, 3], 46)(g)) },
  { name: 'Slice, symbolic dims', inputs: { x: { shape: [2, 5, 6], dims: ['a', 'b', 'c'] } }, build: (g, { x }) => g.sin(g.slice(x!, { starts: [1, -4], ends: [INT64_MAX, -1], axes: [1, -1] })) },
  { name: 'Gather on axis 0, 2-D indices with repeats', inputs: { x: { shape: [4, 3] } }, build: (g, { x }) => g.mul(g.gather(x!, g.constant('int64', [2, 3], BigInt64Array.from([0n, 2n, 2n, 3n, 0n, 0n])), { dim: 0 }), c([2, 3, 3], 47)(g)) },
  { name: 'Gather on axis 1 with a negative index', inputs: { x: { shape: [2, 4, 3] } }, build: (g, { x }) => g.mul(g.gather(x!, g.constant('int64', [3], BigInt64Array.from([-1n, 1n, 1n])), { dim: 1 }), c([2, 3, 3], 48)(g)) },
  { name: 'Resize nearest ×2 (scales)', inputs: { x: { shape: [1, 2, 3, 4] } }, build: (g, { x }) => g.mul(g.interpolateNearest2x(x!), c([1, 2, 6, 8], 49)(g)) },
  { name: 'Resize nearest to a size (3×4 → 5×9)', inputs: { x: { shape: [1, 2, 3, 4] }, like: { shape: [1, 1, 5, 9] } }, build: (g, { x, like }) => g.mul(g.interpolateNearestLike(x!, like!), c([1, 2, 5, 9], 50)(g)) },
  { name: 'Resize nearest to a size, symbolic dims', inputs: { x: { shape: [1, 2, 3, 4], dims: ['b', 2, 'h', 'w'] }, like: { shape: [1, 1, 6, 7], dims: ['b', 1, 'H', 'W'] } }, build: (g, { x, like }) => g.sin(g.interpolateNearestLike(x!, like!)) },
  // ---- small multi-op graphs
  {
    name: 'attention: softmax(q·kᵀ/√d)·v with heads',
    inputs: { x: { shape: [2, 5, 8] } },
    build: (g, { x }) => {
      const split = (v: Value, perm: number[]) => g.transpose(g.reshape(v, [0, 0, 2, 4]), perm);
      const q = split(g.matmul(x!, c([8, 8], 51)(g)), [0, 2, 1, 3]);
      const k = split(g.matmul(x!, c([8, 8], 52)(g)), [0, 2, 3, 1]);
      const v = split(g.matmul(x!, c([8, 8], 53)(g)), [0, 2, 1, 3]);
      const p = g.softmax(g.mul(g.matmul(q, k), g.scalar(0.5)), { dim: -1 });
      return g.reshape(g.transpose(g.matmul(p, v), [0, 2, 1, 3]), [0, 0, 8]);
    },
  },
  ...[1, 2, 3].flatMap((groups) => [false, true].map((keep): RuleCase => ({
    name: `attention core ${keep ? 'with its probabilities kept' : 'recomputed'} in the backward, ${groups} head group(s) of 3 heads, with a score bias`,
    inputs: { x: { shape: [2, 5, 6], dims: ['b', 'n', 6] } },
    recomputeGroups: groups,
    keepProbs: keep,
    build: (g, { x }) => {
      const split = (v: Value, perm: number[]) => g.transpose(g.reshape(v, [0, 0, 3, 2]), perm);
      const q = split(g.matmul(x!, c([6, 6], 62)(g)), [0, 2, 1, 3]);
      const k = split(g.matmul(x!, c([6, 6], 63)(g)), [0, 2, 3, 1]);
      const v = split(g.matmul(x!, c([6, 6], 64)(g)), [0, 2, 1, 3]);
      const scores = g.add(g.mul(g.matmul(q, k), g.scalar(0.7)), c([1, 1, 5, 5], 65)(g)); // bias shared by the heads
      const p = g.softmax(scores, { dim: -1 });
      return g.mul(g.reshape(g.transpose(g.matmul(p, v), [0, 2, 1, 3]), [0, 0, 6]), c([6], 66)(g));
    },
  }))),
  ...[false, true].map((keep): RuleCase => ({
    name: `attention core ${keep ? 'with its probabilities kept' : 'recomputed'}, 2 of 4 heads per group, no bias (cross-attention: keys and values constant)`,
    inputs: { x: { shape: [2, 5, 8] } },
    recomputeGroups: 2,
    keepProbs: keep,
    build: (g, { x }) => {
      const split = (v: Value, perm: number[]) => g.transpose(g.reshape(v, [0, 0, 4, 2]), perm);
      const ctx = c([2, 3, 8], 67)(g);
      const q = split(g.matmul(x!, c([8, 8], 68)(g)), [0, 2, 1, 3]);
      const k = split(g.matmul(ctx, c([8, 8], 69)(g)), [0, 2, 3, 1]);
      const v = split(g.matmul(ctx, c([8, 8], 70)(g)), [0, 2, 1, 3]);
      const p = g.softmax(g.mul(g.matmul(q, k), g.scalar(0.5)), { dim: -1 });
      return g.reshape(g.transpose(g.matmul(p, v), [0, 2, 1, 3]), [0, 0, 8]);
    },
  })),
  { name: 'SiLU and GELU (erf form)', inputs: { x: { shape: [3, 4] } }, build: (g, { x }) => g.add(g.silu(x!), g.gelu(g.mul(x!, g.scalar(1.5)))) },
  {
    name: 'GroupNorm → SiLU → strided conv → upsample to size → concat skip',
    inputs: { x: { shape: [1, 4, 5, 6], dims: ['b', 4, 'h', 'w'] } },
    build: (g, { x }) => {
      const h = g.silu(g.groupNorm(x!, c([4], 54)(g), c([4], 55)(g), { groups: 2, channels: 4, eps: 1e-5 }));
      const down = g.conv2d(h, c([4, 4, 3, 3], 56)(g), c([4], 57)(g), { stride: 2, padding: 1 });
      return g.concat([g.interpolateNearestLike(down, x!), x!], { dim: 1 });
    },
  },
  {
    name: 'adapter bank: LoRA linear and conv layers (MatMul/Conv with input tensors, Gather of the mix)',
    bank: ['blk.'],
    inputs: { x: { shape: [2, 3, 4, 4] } },
    feeds: {
      'lora.blk.conv.down': { shape: [3, 3, 3, 3] },
      'lora.blk.conv.up': { shape: [5, 3, 1, 1] },
      'lora.blk.conv.owner': { shape: [3], int64: [0, 1, 1] },
      'lora.blk.proj.down': { shape: [5, 2] },
      'lora.blk.proj.up': { shape: [2, 6] },
      'lora.blk.proj.owner': { shape: [2], int64: [1, 0] },
    },
    build: (g, { x }) =>
      g.scope('blk', () => {
        const h = conv2d(g, 'conv', x!, 3, 5, { kernel: 3, padding: 1 });
        const tokens = g.reshape(g.transpose(groupNorm(g, 'norm', h, 5, { groups: 5, eps: 1e-5 }), [0, 2, 3, 1]), [0, -1, 5]);
        return linear(g, 'proj', tokens, 5, 6, { bias: true });
      }),
  },
];

describe('VJP rules agree with central finite differences', () => {
  CASES.forEach((rule, i) => {
    test(rule.name, async (t) => {
      const worst = await checkRule(rule, 1000 + i);
      t.diagnostic(`max relative error ${worst.toExponential(2)}`);
    });
  });
});

describe('VJP graphs', () => {
  test('are deterministic and name backward nodes after the forward node', () => {
    const build = () => buildVjpGraph(buildForward(CASES.find((r) => r.name.startsWith('attention'))!), { outputs: ['y'], wrt: 'x' });
    const a = build();
    const b = build();
    assert.equal(dumpGraph(a), dumpGraph(b));
    assert.deepEqual(modelBytes(a), modelBytes(b));
    const dump = dumpGraph(a);
    assert.match(dump, /^input {2}cot\.y: float32\[\]$/m);
    assert.match(dump, /^output grad_x: float32\[2, 5, 8\]$/m);
    assert.match(dump, /^grad\.Softmax\/Mul(_\d+)? = Mul\(/m);
    // x feeds q, k and v: its three contributions are summed.
    assert.match(dump, /^grad\.x\/sum_1 = Add\(grad\.x\/sum, /m);
  });

  test('ReduceMax / ReduceMin share ȳ evenly among tied extrema (torch.amax / amin)', async () => {
    for (const [op, want] of [['max', [0, 0.5, 0.5, 0, 1, 0, 0, 0]], ['min', [1, 0, 0, 0, 0, 1 / 3, 1 / 3, 1 / 3]]] as const) {
      const g = new Ops('ties');
      const x = g.input('x', 'float32', [2, 4]);
      g.output(op === 'max' ? g.reduceMax(x, { dims: [-1], keepdim: false }) : g.reduceMin(x, { dims: [-1], keepdim: false }), 'y', 'float32', [2]);
      const s = await OrtSession.create(modelBytes(buildVjpGraph(g.finish(), { outputs: ['y'], wrt: 'x' })), { device: 'cpu' });
      try {
        const out = await s.run({ x: { dtype: 'float32', shape: [2, 4], data: Float32Array.from([1, 3, 3, 2, 5, 1, 1, 1]) }, [cotangentInput('y')]: { dtype: 'float32', shape: [2], data: Float32Array.from([1, 1]) } });
        assert.deepEqual([...(out[gradientOutput('x')]!.data as Float32Array)].map((v) => Math.round(v * 1e6) / 1e6), want.map((v) => Math.round(v * 1e6) / 1e6), op);
      } finally {
        await s.dispose();
      }
    }
  });

  test('prune what the chosen output does not need', () => {
    const g = new Ops('two');
    const x = g.input('x', 'float32', [2]);
    const unrelated = g.input('unrelated', 'float32', [2]);
    g.output(g.sin(x), 'y', 'float32', [2]);
    g.output(g.exp(g.add(x, unrelated)), 'z', 'float32', [2]);
    const vjp = buildVjpGraph(g.finish(), { outputs: ['y'], wrt: 'x' });
    assert.deepEqual(vjp.inputs.map((i) => i.name), ['x', 'cot.y']);
    assert.deepEqual(vjp.outputs.map((o) => o.name), ['y', 'grad_x']);
    assert.ok(!vjp.nodes.some((n) => n.opType === 'Exp'), 'z is not computed');
  });
});

describe('VJP builder rejects', () => {
  const forward = () => {
    const g = new Ops('f');
    const x = g.input('x', 'float32', [2, 3]);
    const w = g.input('w', 'float32', [4, 3, 1, 1]);
    const other = g.input('other', 'float32', [2]);
    g.output(g.node('Tanh', [x])[0]!, 'tanh', 'float32', [2, 3]);
    g.output(g.conv2d(g.reshape(x, [1, 3, 2, 1]), w, undefined), 'conv', 'float32', undefined);
    g.output(g.sin(other), 'other_out', 'float32', [2]);
    g.output(g.exp(x), 'exp', 'float32', [2, 3]);
    return g.finish();
  };
  const rejects = (fn: () => unknown, pattern: RegExp) =>
    assert.throws(fn, (e: unknown) => e instanceof ModelError && e.code === 'GRAPH_BUILD' && pattern.test(e.message));

  test('an output the graph does not have', () => rejects(() => buildVjpGraph(forward(), { outputs: ['nope'], wrt: 'x' }), /no output nope/));
  test('a wrt that is not an input', () => rejects(() => buildVjpGraph(forward(), { outputs: ['exp'], wrt: 'exp' }), /exp is not an input/));
  test('an output that does not depend on wrt', () => rejects(() => buildVjpGraph(forward(), { outputs: ['other_out'], wrt: 'x' }), /other_out does not depend on x/));
  test('an op without a rule, naming op and node', () => rejects(() => buildVjpGraph(forward(), { outputs: ['tanh'], wrt: 'x' }), /no VJP rule for Tanh \(e\.g\. Tanh\)/));
  test('a conv weight as the differentiated input', () => rejects(() => buildVjpGraph(forward(), { outputs: ['conv'], wrt: 'w' }), /Conv node Conv: only the gradient with respect to the input/));
});
