/**
 * The plain tensor type shared by `models/`: a dtype, a shape and a typed array. No device state,
 * no views with strides: a tensor is always contiguous, row-major (PyTorch's layout).
 */

export type DType =
  | 'float32' | 'float16' | 'bfloat16' | 'float64' | 'float8_e4m3fn' | 'float8_e5m2'
  | 'int64' | 'int32' | 'int16' | 'int8' | 'uint8' | 'bool';

/** dtype → storage. Half types are stored as raw bits; convert with `toFloat32`. */
export interface DTypeStorage {
  float32: Float32Array;
  float16: Uint16Array;
  bfloat16: Uint16Array;
  float8_e4m3fn: Uint8Array;
  float8_e5m2: Uint8Array;
  float64: Float64Array;
  int64: BigInt64Array;
  int32: Int32Array;
  int16: Int16Array;
  int8: Int8Array;
  uint8: Uint8Array;
  bool: Uint8Array;
}

export const DTYPE_BYTES: Readonly<Record<DType, number>> = {
  float32: 4, float16: 2, bfloat16: 2, float8_e4m3fn: 1, float8_e5m2: 1, float64: 8, int64: 8, int32: 4, int16: 2, int8: 1, uint8: 1, bool: 1,
};

export interface Tensor<D extends DType = DType> {
  readonly dtype: D;
  readonly shape: readonly number[];
  readonly data: DTypeStorage[D];
}

export function numel(shape: readonly number[]): number {
  let n = 1;
  for (const d of shape) n *= d;
  return n;
}

export function tensor<D extends DType>(dtype: D, shape: readonly number[], data: DTypeStorage[D]): Tensor<D> {
  if (data.length !== numel(shape)) {
    throw new Error(`tensor: shape [${shape.join(', ')}] needs ${numel(shape)} elements, data has ${data.length}`);
  }
  return { dtype, shape: [...shape], data };
}

/** A typed array of the given dtype over (a copy of) little-endian bytes. */
export function typedArrayFromBytes<D extends DType>(dtype: D, bytes: Uint8Array): DTypeStorage[D] {
  const size = DTYPE_BYTES[dtype];
  // Copy into a fresh, aligned buffer: the source may sit at any offset of a file buffer.
  const buf = new ArrayBuffer(bytes.byteLength);
  new Uint8Array(buf).set(bytes);
  const n = bytes.byteLength / size;
  const arrays: { [K in DType]: () => DTypeStorage[K] } = {
    float32: () => new Float32Array(buf, 0, n),
    float16: () => new Uint16Array(buf, 0, n),
    bfloat16: () => new Uint16Array(buf, 0, n),
    float8_e4m3fn: () => new Uint8Array(buf, 0, n),
    float8_e5m2: () => new Uint8Array(buf, 0, n),
    float64: () => new Float64Array(buf, 0, n),
    int64: () => new BigInt64Array(buf, 0, n),
    int32: () => new Int32Array(buf, 0, n),
    int16: () => new Int16Array(buf, 0, n),
    int8: () => new Int8Array(buf, 0, n),
    uint8: () => new Uint8Array(buf, 0, n),
    bool: () => new Uint8Array(buf, 0, n),
  };
  return arrays[dtype]();
}

const f32Scratch = new Float32Array(1);
const u32Scratch = new Uint32Array(f32Scratch.buffer);

/** IEEE 754 half → float. Exact (every half is representable in float32). */
export function halfToFloat(h: number): number {
  const sign = h & 0x8000 ? -1 : 1;
  const exp = (h >> 10) & 0x1f;
  const frac = h & 0x3ff;
  if (exp === 0) return sign * frac * 2 ** -24;
  if (exp === 0x1f) return frac ? NaN : sign * Infinity;
  return sign * (1 + frac / 1024) * 2 ** (exp - 15);
}

/** float → IEEE 754 half, round to nearest even (as torch's `.half()`). */
export function floatToHalf(x: number): number {
  f32Scratch[0] = x;
  const bits = u32Scratch[0]!;
  const sign = (bits >>> 16) & 0x8000;
  const exp = (bits >>> 23) & 0xff;
  let mant = bits & 0x7fffff;
  if (exp === 0xff) return sign | 0x7c00 | (mant ? 0x200 : 0);
  let e = exp - 127 + 15;
  if (e >= 0x1f) return sign | 0x7c00;
  if (e <= 0) {
    if (e < -10) return sign;
    mant |= 0x800000;
    const shift = 14 - e;
    const half = 1 << (shift - 1);
    let r = mant >> shift;
    const rem = mant & ((1 << shift) - 1);
    if (rem > half || (rem === half && r & 1)) r++;
    return sign | r;
  }
  let r = mant >> 13;
  const rem = mant & 0x1fff;
  if (rem > 0x1000 || (rem === 0x1000 && r & 1)) {
    r++;
    if (r === 0x400) { r = 0; e++; if (e >= 0x1f) return sign | 0x7c00; }
  }
  return sign | (e << 10) | r;
}

/** bfloat16 bits → float (exact: bf16 is the top half of a float32). */
export function bfloat16ToFloat(b: number): number {
  u32Scratch[0] = b << 16;
  return f32Scratch[0]!;
}

/** float8 e4m3fn (no infinities, 0x7f/0xff = NaN, bias 7) → float. */
export function float8e4m3fnToFloat(b: number): number {
  const sign = b & 0x80 ? -1 : 1;
  const exp = (b >> 3) & 0xf;
  const frac = b & 0x7;
  if (exp === 0xf && frac === 0x7) return NaN;
  if (exp === 0) return sign * frac * 2 ** -9;
  return sign * (1 + frac / 8) * 2 ** (exp - 7);
}

/** Any numeric tensor as float32 values (the policy for feeding fp32 graphs). */
export function toFloat32(t: Tensor): Float32Array {
  const n = t.data.length;
  switch (t.dtype) {
    case 'float32':
      return t.data as Float32Array;
    case 'float16': {
      const src = t.data as Uint16Array;
      const out = new Float32Array(n);
      for (let i = 0; i < n; i++) out[i] = halfToFloat(src[i]!);
      return out;
    }
    case 'bfloat16': {
      const src = t.data as Uint16Array;
      const out = new Float32Array(n);
      const outBits = new Uint32Array(out.buffer);
      for (let i = 0; i < n; i++) outBits[i] = src[i]! << 16;
      return out;
    }
    case 'float8_e4m3fn': {
      const src = t.data as Uint8Array;
      const out = new Float32Array(n);
      for (let i = 0; i < n; i++) out[i] = float8e4m3fnToFloat(src[i]!);
      return out;
    }
    case 'float8_e5m2': {
      const src = t.data as Uint8Array;
      const out = new Float32Array(n);
      // e5m2 is the top byte of an IEEE half.
      for (let i = 0; i < n; i++) out[i] = halfToFloat(src[i]! << 8);
      return out;
    }
    case 'int64': {
      const src = t.data as BigInt64Array;
      const out = new Float32Array(n);
      for (let i = 0; i < n; i++) out[i] = Number(src[i]!);
      return out;
    }
    case 'float64':
    case 'int32':
    case 'int16':
    case 'int8':
    case 'uint8':
    case 'bool':
      return Float32Array.from(t.data as ArrayLike<number>);
  }
}

/** float32 values → float16 bits. */
export function float32ToHalfBits(src: Float32Array): Uint16Array {
  const out = new Uint16Array(src.length);
  for (let i = 0; i < src.length; i++) out[i] = floatToHalf(src[i]!);
  return out;
}
