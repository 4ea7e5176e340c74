/**
 * The ONNX serializer: the only file that knows protobuf. It writes a `ModelProto` for a `Graph`,
 * with parameters either embedded (`raw_data`) or stored in an external data file (the ONNX external
 * data convention: `data_location = EXTERNAL`, `location`/`offset`/`length` entries), which is what
 * models above protobuf's 2 GB limit need.
 *
 * Field numbers are those of onnx/onnx.proto (ModelProto, GraphProto, NodeProto, AttributeProto,
 * TensorProto, ValueInfoProto, TypeProto, TensorShapeProto, OperatorSetIdProto).
 */
import { IR_VERSION, type AttrValue, type Graph, type IoDecl, type NodeDecl, type ParamDecl } from './builder.ts';
import { ONNX_DTYPE } from './ops.ts';
import type { DType } from '../tensor.ts';

export type InitializerData =
  | { readonly kind: 'raw'; readonly bytes: Uint8Array }
  | { readonly kind: 'external'; readonly location: string; readonly offset: number; readonly length: number };

/** Supplies each parameter's stored dtype and bytes (or external location). */
export type ParamProvider = (param: ParamDecl) => { readonly dtype: DType; readonly data: InitializerData };

const WIRE_VARINT = 0;
const WIRE_LEN = 2;
const WIRE_FIXED32 = 5;

// AttributeProto.AttributeType
const ATTR_FLOAT = 1;
const ATTR_INT = 2;
const ATTR_STRING = 3;
const ATTR_FLOATS = 6;
const ATTR_INTS = 7;

// TensorProto.DataLocation
const DATA_LOCATION_EXTERNAL = 1;

/** Append-only protobuf message writer. */
class Writer {
  readonly #chunks: Uint8Array[] = [];
  #scratch: number[] = [];
  length = 0;

  #flush(): void {
    if (this.#scratch.length > 0) {
      this.#chunks.push(Uint8Array.from(this.#scratch));
      this.length += this.#scratch.length;
      this.#scratch = [];
    }
  }

  #varint(v: bigint): void {
    // Negative int64 values are written as their 64-bit two's complement (10 bytes).
    let x = BigInt.asUintN(64, v);
    while (x >= 0x80n) {
      this.#scratch.push(Number(x & 0x7fn) | 0x80);
      x >>= 7n;
    }
    this.#scratch.push(Number(x));
  }

  #tag(field: number, wire: number): void {
    this.#varint(BigInt((field << 3) | wire));
  }

  int(field: number, value: number | bigint): void {
    this.#tag(field, WIRE_VARINT);
    this.#varint(BigInt(value));
  }

  float(field: number, value: number): void {
    this.#tag(field, WIRE_FIXED32);
    const b = new Uint8Array(4);
    new DataView(b.buffer).setFloat32(0, value, true);
    this.#scratch.push(...b);
  }

  bytes(field: number, value: Uint8Array): void {
    this.#tag(field, WIRE_LEN);
    this.#varint(BigInt(value.byteLength));
    this.#flush();
    this.#chunks.push(value);
    this.length += value.byteLength;
  }

  string(field: number, value: string): void {
    this.bytes(field, Buffer.from(value, 'utf-8'));
  }

  message(field: number, fill: (w: Writer) => void): void {
    const sub = new Writer();
    fill(sub);
    this.bytes(field, sub.finish());
  }

  packedInts(field: number, values: readonly number[]): void {
    const sub = new Writer();
    for (const v of values) sub.#varint(BigInt(v));
    this.bytes(field, sub.finish());
  }

  packedFloats(field: number, values: readonly number[]): void {
    const b = new Uint8Array(values.length * 4);
    const dv = new DataView(b.buffer);
    values.forEach((v, i) => dv.setFloat32(i * 4, v, true));
    this.bytes(field, b);
  }

  finish(): Uint8Array {
    this.#flush();
    if (this.#chunks.length === 1) return this.#chunks[0]!;
    const out = new Uint8Array(this.length);
    let pos = 0;
    for (const c of this.#chunks) {
      out.set(c, pos);
      pos += c.byteLength;
    }
    return out;
  }
}

function writeAttribute(w: Writer, name: string, a: AttrValue): void {
  w.string(1, name);
  switch (a.kind) {
    case 'float':
      w.float(2, a.value);
      w.int(20, ATTR_FLOAT);
      break;
    case 'int':
      w.int(3, a.value);
      w.int(20, ATTR_INT);
      break;
    case 'string':
      w.bytes(4, Buffer.from(a.value, 'utf-8'));
      w.int(20, ATTR_STRING);
      break;
    case 'floats':
      w.packedFloats(7, a.value);
      w.int(20, ATTR_FLOATS);
      break;
    case 'ints':
      w.packedInts(8, a.value);
      w.int(20, ATTR_INTS);
      break;
  }
}

function writeNode(w: Writer, n: NodeDecl): void {
  for (const i of n.inputs) w.string(1, i);
  for (const o of n.outputs) w.string(2, o);
  w.string(3, n.name);
  w.string(4, n.opType);
  for (const [name, a] of n.attributes) w.message(5, (aw) => writeAttribute(aw, name, a));
  if (n.domain !== '') w.string(7, n.domain);
}

function writeValueInfo(w: Writer, io: IoDecl): void {
  w.string(1, io.name);
  w.message(2, (type) =>
    type.message(1, (tensorType) => {
      tensorType.int(1, ONNX_DTYPE[io.dtype]);
      const dims = io.shape;
      if (dims === undefined) return;
      tensorType.message(2, (shape) => {
        for (const d of dims) {
          shape.message(1, (dim) => (typeof d === 'number' ? dim.int(1, d) : dim.string(2, d)));
        }
      });
    }),
  );
}

function writeTensor(w: Writer, name: string, dtype: DType, shape: readonly number[], data: InitializerData): void {
  if (shape.length > 0) w.packedInts(1, shape);
  w.int(2, ONNX_DTYPE[dtype]);
  w.string(8, name);
  if (data.kind === 'raw') {
    w.bytes(9, data.bytes);
    return;
  }
  const entry = (key: string, value: string) =>
    w.message(13, (e) => {
      e.string(1, key);
      e.string(2, value);
    });
  entry('location', data.location);
  entry('offset', String(data.offset));
  entry('length', String(data.length));
  w.int(14, DATA_LOCATION_EXTERNAL);
}

/** Serialize `graph` into ONNX `ModelProto` bytes. */
export function serializeModel(graph: Graph, params: ParamProvider, options: { producerVersion?: string; docString?: string } = {}): Uint8Array {
  const w = new Writer();
  w.int(1, IR_VERSION);
  w.string(2, 'chorus');
  w.string(3, options.producerVersion ?? '0');
  if (options.docString !== undefined) w.string(6, options.docString);
  w.message(7, (g) => {
    for (const n of graph.nodes) g.message(1, (nw) => writeNode(nw, n));
    g.string(2, graph.name);
    for (const c of graph.constants) g.message(5, (t) => writeTensor(t, c.name, c.dtype, c.shape, { kind: 'raw', bytes: c.bytes }));
    for (const p of graph.params) {
      const { dtype, data } = params(p);
      g.message(5, (t) => writeTensor(t, p.name, dtype, p.shape, data));
    }
    for (const i of graph.inputs) g.message(11, (v) => writeValueInfo(v, i));
    for (const o of graph.outputs) g.message(12, (v) => writeValueInfo(v, o));
  });
  w.message(8, (o) => {
    o.string(1, '');
    o.int(2, graph.opset);
  });
  return w.finish();
}
