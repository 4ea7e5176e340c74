/**
 * Typed op helpers on top of `GraphBuilder`, named like their PyTorch functional counterparts.
 * Attributes come as named options, never positional booleans. Opset: `OPSET` (17) — notes below
 * say where an op's signature depends on it.
 */
import { GraphBuilder, attr, type Value } from './builder.ts';
import type { DType } from '../tensor.ts';

/** ONNX TensorProto.DataType codes for `Cast`. */
export const ONNX_DTYPE: Readonly<Record<DType, number>> = {
  float32: 1,
  uint8: 2,
  int8: 3,
  int16: 5,
  int32: 6,
  int64: 7,
  bool: 9,
  float16: 10,
  float64: 11,
  bfloat16: 16,
  float8_e4m3fn: 17,
  float8_e5m2: 19,
};

export type Padding2d = number | readonly [top: number, left: number, bottom: number, right: number];

export class Ops extends GraphBuilder {
  // ---- constants -------------------------------------------------------------------------------

  scalar(value: number): Value {
    return this.constant('float32', [], new Float32Array([value]));
  }

  int64s(values: readonly number[]): Value {
    return this.constant('int64', [values.length], BigInt64Array.from(values.map((v) => BigInt(v))));
  }

  floats(shape: readonly number[], values: Float32Array): Value {
    return this.constant('float32', shape, values);
  }

  // ---- elementwise -----------------------------------------------------------------------------

  add(a: Value, b: Value): Value {
    return this.#one('Add', [a, b]);
  }
  sub(a: Value, b: Value): Value {
    return this.#one('Sub', [a, b]);
  }
  mul(a: Value, b: Value): Value {
    return this.#one('Mul', [a, b]);
  }
  div(a: Value, b: Value): Value {
    return this.#one('Div', [a, b]);
  }
  sqrt(x: Value): Value {
    return this.#one('Sqrt', [x]);
  }
  exp(x: Value): Value {
    return this.#one('Exp', [x]);
  }
  log(x: Value): Value {
    return this.#one('Log', [x]);
  }
  sin(x: Value): Value {
    return this.#one('Sin', [x]);
  }
  cos(x: Value): Value {
    return this.#one('Cos', [x]);
  }
  sigmoid(x: Value): Value {
    return this.#one('Sigmoid', [x]);
  }
  erf(x: Value): Value {
    return this.#one('Erf', [x]);
  }
  /** `torch.clamp(x, min, max)`; Clip takes min/max as inputs since opset 11. */
  clamp(x: Value, options: { min: number; max: number }): Value {
    return this.#one('Clip', [x, this.scalar(options.min), this.scalar(options.max)]);
  }
  max(a: Value, b: Value): Value {
    return this.#one('Max', [a, b]);
  }
  min(a: Value, b: Value): Value {
    return this.#one('Min', [a, b]);
  }
  cast(x: Value, to: DType): Value {
    return this.#one('Cast', [x], { to: attr.int(ONNX_DTYPE[to]) });
  }

  // ---- activations -----------------------------------------------------------------------------

  /** `F.silu`: x·σ(x). */
  silu(x: Value): Value {
    return this.mul(x, this.sigmoid(x));
  }
  /** `F.gelu` (exact, erf form): ½x(1 + erf(x/√2)). ONNX Runtime fuses this pattern. */
  gelu(x: Value): Value {
    const inner = this.erf(this.div(x, this.scalar(Math.SQRT2)));
    return this.mul(this.mul(x, this.scalar(0.5)), this.add(inner, this.scalar(1)));
  }
  /** CLIP's `quick_gelu`: x·σ(1.702x). */
  quickGelu(x: Value): Value {
    return this.mul(x, this.sigmoid(this.mul(x, this.scalar(1.702))));
  }
  softmax(x: Value, options: { dim: number }): Value {
    return this.#one('Softmax', [x], { axis: attr.int(options.dim) });
  }

  // ---- linear algebra --------------------------------------------------------------------------

  matmul(a: Value, b: Value): Value {
    return this.#one('MatMul', [a, b]);
  }

  /** `F.linear(x, weight, bias)` with the weight given transposed, [in, out] (see `ParamDecl.transposed`). */
  linear(x: Value, weightT: Value, bias?: Value): Value {
    const y = this.matmul(x, weightT);
    return bias === undefined ? y : this.add(y, bias);
  }

  /** `F.conv2d(x, weight, bias, stride, padding)`; padding as one number or [top, left, bottom, right]. */
  conv2d(x: Value, weight: Value, bias: Value | undefined, options: { stride?: number; padding?: Padding2d } = {}): Value {
    const stride = options.stride ?? 1;
    const p = options.padding ?? 0;
    // ONNX pads are [x1_begin, x2_begin, x1_end, x2_end] = [top, left, bottom, right].
    const pads = typeof p === 'number' ? [p, p, p, p] : [p[0], p[1], p[2], p[3]];
    return this.#one('Conv', [x, weight, bias], { strides: attr.ints([stride, stride]), pads: attr.ints(pads) });
  }

  // ---- normalisation ---------------------------------------------------------------------------

  /** `F.layer_norm` over the last dimension (LayerNormalization, opset 17). */
  layerNorm(x: Value, weight: Value, bias: Value, options: { eps: number }): Value {
    return this.#one('LayerNormalization', [x, weight, bias], { axis: attr.int(-1), epsilon: attr.float(options.eps) });
  }

  /**
   * `F.group_norm` on (B, C, *): (B, C, …) → (B, G, C/G·…) → instance norm per group → back → affine.
   * ONNX's own GroupNormalization has per-group scale before opset 21, so it is not used.
   */
  groupNorm(x: Value, weight: Value, bias: Value, options: { groups: number; channels: number; eps: number }): Value {
    const { groups, channels, eps } = options;
    this.check(channels % groups === 0, `GroupNorm: ${channels} channels are not divisible into ${groups} groups`);
    const grouped = this.reshape(x, [0, groups, -1]); // (B, C, H, W) → (B, G, C/G·H·W)
    const ones = this.floats([groups], new Float32Array(groups).fill(1));
    const zeros = this.floats([groups], new Float32Array(groups));
    const normed = this.#one('InstanceNormalization', [grouped, ones, zeros], { epsilon: attr.float(eps) });
    const back = this.reshape(normed, this.shape(x)); // → (B, C, H, W)
    const perChannel = this.int64s([channels, 1, 1]);
    return this.add(this.mul(back, this.reshape(weight, perChannel)), this.reshape(bias, perChannel));
  }

  // ---- shapes ----------------------------------------------------------------------------------

  /** Reshape; in a literal shape, 0 copies the input dimension and -1 is inferred. */
  reshape(x: Value, shape: readonly number[] | Value): Value {
    const s = Array.isArray(shape) ? this.int64s(shape as readonly number[]) : (shape as Value);
    return this.#one('Reshape', [x, s]);
  }
  transpose(x: Value, perm: readonly number[]): Value {
    return this.#one('Transpose', [x], { perm: attr.ints(perm) });
  }
  concat(xs: readonly Value[], options: { dim: number }): Value {
    return this.#one('Concat', xs, { axis: attr.int(options.dim) });
  }
  /** `x.chunk(n, dim)` into equal parts (Split without sizes, opset 13–17 semantics). */
  chunk(x: Value, n: number, options: { dim: number }): Value[] {
    return this.node('Split', [x], { axis: attr.int(options.dim) }, { outputs: n });
  }
  /** Unsqueeze; axes are an input since opset 13. */
  unsqueeze(x: Value, axes: readonly number[]): Value {
    return this.#one('Unsqueeze', [x, this.int64s(axes)]);
  }
  /** The shape as an int64 tensor; `start`/`end` attributes exist since opset 15. */
  shape(x: Value, options: { start?: number; end?: number } = {}): Value {
    return this.#one('Shape', [x], {
      start: options.start === undefined ? undefined : attr.int(options.start),
      end: options.end === undefined ? undefined : attr.int(options.end),
    });
  }
  /** Slice along `axes`; `starts`/`ends` are literal numbers or int64 values. */
  slice(x: Value, options: { starts: readonly number[] | Value; ends: readonly number[] | Value; axes: readonly number[] }): Value {
    const v = (s: readonly number[] | Value): Value => (Array.isArray(s) ? this.int64s(s as readonly number[]) : (s as Value));
    return this.#one('Slice', [x, v(options.starts), v(options.ends), this.int64s(options.axes)]);
  }
  gather(x: Value, indices: Value, options: { dim: number }): Value {
    return this.#one('Gather', [x, indices], { axis: attr.int(options.dim) });
  }
  /** `x.sum(dims, keepdim)`; ReduceSum takes axes as an input since opset 13. */
  reduceSum(x: Value, options: { dims: readonly number[]; keepdim: boolean }): Value {
    return this.#one('ReduceSum', [x, this.int64s(options.dims)], { keepdims: attr.int(options.keepdim ? 1 : 0) });
  }
  /** `x.amax(dims, keepdim)`; ReduceMax takes axes as an attribute up to opset 17. */
  reduceMax(x: Value, options: { dims: readonly number[]; keepdim: boolean }): Value {
    return this.#one('ReduceMax', [x], { axes: attr.ints(options.dims), keepdims: attr.int(options.keepdim ? 1 : 0) });
  }
  reduceMin(x: Value, options: { dims: readonly number[]; keepdim: boolean }): Value {
    return this.#one('ReduceMin', [x], { axes: attr.ints(options.dims), keepdims: attr.int(options.keepdim ? 1 : 0) });
  }
  reduceMean(x: Value, options: { dims: readonly number[]; keepdim: boolean }): Value {
    // ReduceMean takes axes as an attribute up to opset 17 (an input from 18).
    return this.#one('ReduceMean', [x], { axes: attr.ints(options.dims), keepdims: attr.int(options.keepdim ? 1 : 0) });
  }

  /**
   * `F.interpolate(x, size=…, mode="nearest")` with the output spatial size taken from `sizeOf`'s
   * (H, W). PyTorch's nearest picks src = floor(dst · in/out), which is ONNX's `asymmetric` +
   * `floor`.
   */
  interpolateNearestLike(x: Value, sizeOf: Value): Value {
    const sizes = this.concat([this.shape(x, { end: 2 }), this.shape(sizeOf, { start: 2 })], { dim: 0 });
    return this.#one('Resize', [x, undefined, undefined, sizes], {
      mode: attr.string('nearest'),
      coordinate_transformation_mode: attr.string('asymmetric'),
      nearest_mode: attr.string('floor'),
    });
  }

  /** `F.interpolate(x, scale_factor=2, mode="nearest")`. */
  interpolateNearest2x(x: Value): Value {
    return this.#one('Resize', [x, undefined, this.floats([4], new Float32Array([1, 1, 2, 2]))], {
      mode: attr.string('nearest'),
      coordinate_transformation_mode: attr.string('asymmetric'),
      nearest_mode: attr.string('floor'),
    });
  }

  identity(x: Value): Value {
    return this.#one('Identity', [x]);
  }

  // ---- used by the VJP graphs (models/onnx/vjp.ts) ---------------------------------------------

  neg(x: Value): Value {
    return this.#one('Neg', [x]);
  }
  /** `torch.where(cond, a, b)`. */
  where(cond: Value, a: Value, b: Value): Value {
    return this.#one('Where', [cond, a, b]);
  }
  equal(a: Value, b: Value): Value {
    return this.#one('Equal', [a, b]);
  }
  greater(a: Value, b: Value): Value {
    return this.#one('Greater', [a, b]);
  }
  less(a: Value, b: Value): Value {
    return this.#one('Less', [a, b]);
  }
  /** GreaterOrEqual / LessOrEqual exist since opset 12. */
  greaterOrEqual(a: Value, b: Value): Value {
    return this.#one('GreaterOrEqual', [a, b]);
  }
  lessOrEqual(a: Value, b: Value): Value {
    return this.#one('LessOrEqual', [a, b]);
  }
  and(a: Value, b: Value): Value {
    return this.#one('And', [a, b]);
  }
  not(x: Value): Value {
    return this.#one('Not', [x]);
  }
  /** The element count as an int64 scalar. */
  size(x: Value): Value {
    return this.#one('Size', [x]);
  }
  /** Indices of the non-zero elements, (rank, count) int64. */
  nonZero(x: Value): Value {
    return this.#one('NonZero', [x]);
  }
  /** `x.expand(shape)` with numpy broadcasting; `shape` is an int64 value. */
  expand(x: Value, shape: Value): Value {
    return this.#one('Expand', [x, shape]);
  }
  /** `torch.arange(start, limit, delta)` on scalar values. */
  range(start: Value, limit: Value, delta: Value): Value {
    return this.#one('Range', [start, limit, delta]);
  }
  /** Split into parts of the given sizes (an int64 value) along `dim`; the sizes are an input since opset 13. */
  split(x: Value, sizes: Value, parts: number, options: { dim: number }): Value[] {
    return this.node('Split', [x, sizes], { axis: attr.int(options.dim) }, { outputs: parts });
  }
  /** Zero padding; `pads` is an int64 value [begin_0 … begin_{r−1}, end_0 … end_{r−1}] (an input since opset 11). */
  pad(x: Value, pads: Value): Value {
    return this.#one('Pad', [x, pads]);
  }
  /** ReduceSum over axes given as an int64 value; empty axes leave x unchanged (`noop_with_empty_axes`). */
  reduceSumOver(x: Value, axes: Value, options: { keepdim: boolean }): Value {
    return this.#one('ReduceSum', [x, axes], { keepdims: attr.int(options.keepdim ? 1 : 0), noop_with_empty_axes: attr.int(1) });
  }
  /** ScatterND adding `updates` into a copy of `data` (reduction since opset 16); repeated indices accumulate. */
  scatterNdAdd(data: Value, indices: Value, updates: Value): Value {
    return this.#one('ScatterND', [data, indices, updates], { reduction: attr.string('add') });
  }
  /**
   * `F.conv_transpose2d` without bias; weight (C_in, C_out, kh, kw). Pads as ONNX orders them
   * ([top, left, bottom, right]); `outputPadding` adds rows/columns at the bottom/right.
   */
  convTranspose2d(x: Value, weight: Value, options: { strides: readonly number[]; pads: readonly number[]; dilations: readonly number[]; outputPadding: readonly number[] }): Value {
    return this.#one('ConvTranspose', [x, weight], {
      strides: attr.ints(options.strides),
      pads: attr.ints(options.pads),
      dilations: attr.ints(options.dilations),
      output_padding: attr.ints(options.outputPadding),
    });
  }

  #one(opType: string, inputs: ReadonlyArray<Value | undefined>, attributes: Parameters<GraphBuilder['node']>[2] = {}): Value {
    return this.node(opType, inputs, attributes)[0]!;
  }
}
