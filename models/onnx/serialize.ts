/**
 * The ONNX serializer: the only file that knows protobuf. It writes a `ModelProto` for a `Graph`,
 * with parameters either embedded (`raw_data`) or stored in an external data file (the ONNX external
 * data convention: `data_location = EXTERNAL`, `location`/`offset`/`length` entries), which is what
 * models above protobuf's 2 GB limit need.
 *
 * Field numbers are those of onnx/onnx.proto (ModelProto, GraphProto, NodeProto, AttributeProto,
 * TensorProto, ValueInfoProto, TypeProto, TensorShapeProto, OperatorSetIdProto).
 */
import { IR_VERSION, type AttrValue, type Graph, type IoDecl, type NodeDecl, type ParamDecl, type Subgraph } from './builder.ts';
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
const ATTR_GRAPH = 5;
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

  /** Bytes already encoded (a whole field, tag included). */
  raw(value: Uint8Array): void {
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

function writeAttribute(w: Writer, name: string, a: AttrValue, params: ParamProvider): void {
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
    case 'graph':
      w.message(6, (g) => writeSubgraph(g, a.value, params));
      w.int(20, ATTR_GRAPH);
      break;
  }
}

/** A branch's GraphProto: nodes, name, its own parameters and outputs (no inputs: it reads the outer scope). */
function writeSubgraph(g: Writer, sub: Subgraph, params: ParamProvider): void {
  for (const n of sub.nodes) g.message(1, (nw) => writeNode(nw, n, params));
  g.string(2, sub.name);
  for (const p of sub.params ?? []) {
    const { dtype, data } = params(p);
    g.message(5, (t) => writeTensor(t, p.name, dtype, p.shape, data));
  }
  for (const o of sub.outputs) g.message(12, (v) => writeValueInfo(v, o));
}

function writeNode(w: Writer, n: NodeDecl, params: ParamProvider): void {
  for (const i of n.inputs) w.string(1, i);
  for (const o of n.outputs) w.string(2, o);
  w.string(3, n.name);
  w.string(4, n.opType);
  for (const [name, a] of n.attributes) w.message(5, (aw) => writeAttribute(aw, name, a, params));
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
    for (const n of graph.nodes) g.message(1, (nw) => writeNode(nw, n, params));
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

/** One field of a protobuf message: its number, wire type, whole span and (length-delimited) payload. */
interface RawField {
  readonly field: number;
  readonly wire: number;
  readonly start: number;
  readonly end: number;
  readonly payload?: Uint8Array;
}

function readVarint(b: Uint8Array, at: number): [number, number] {
  let value = 0;
  let scale = 1;
  let i = at;
  for (;;) {
    if (i >= b.length) throw new Error('protobuf: truncated varint');
    const c = b[i++]!;
    value += (c & 0x7f) * scale;
    if (c < 0x80) return [value, i];
    scale *= 128;
  }
}

function rawFields(b: Uint8Array): RawField[] {
  const out: RawField[] = [];
  let i = 0;
  while (i < b.length) {
    const start = i;
    const [key, next] = readVarint(b, i);
    i = next;
    const field = Math.floor(key / 8);
    const wire = key % 8;
    if (wire === WIRE_VARINT) i = readVarint(b, i)[1];
    else if (wire === WIRE_FIXED32) i += 4;
    else if (wire === 1) i += 8;
    else if (wire === WIRE_LEN) {
      const [n, at] = readVarint(b, i);
      if (at + n > b.length) throw new Error('protobuf: truncated field');
      out.push({ field, wire, start, end: at + n, payload: b.subarray(at, at + n) });
      i = at + n;
      continue;
    } else throw new Error(`protobuf: unsupported wire type ${wire}`);
    out.push({ field, wire, start, end: i });
  }
  return out;
}

/** `fields` re-emitted, the length-delimited ones `edit` returns bytes for replaced, those it returns null for dropped. */
function rewriteFields(b: Uint8Array, edit: (f: RawField) => Uint8Array | null | undefined): Uint8Array | undefined {
  let changed = false;
  const w = new Writer();
  for (const f of rawFields(b)) {
    const replaced = f.payload === undefined ? undefined : edit(f);
    if (replaced === undefined) {
      w.raw(b.subarray(f.start, f.end));
      continue;
    }
    changed = true;
    if (replaced !== null) w.bytes(f.field, replaced);
  }
  return changed ? w.finish() : undefined;
}

const utf8 = (b: Uint8Array) => Buffer.from(b).toString('utf-8');
const encode = (v: string) => new Uint8Array(Buffer.from(v, 'utf-8'));

/** The value names a GraphProto defines itself: node outputs (NodeProto.output = 2), initializers (TensorProto.name = 8), inputs (ValueInfoProto.name = 1). */
function definedNames(g: Uint8Array): string[] {
  const names: string[] = [];
  for (const f of rawFields(g)) {
    if (f.payload === undefined) continue;
    if (f.field === 1) for (const o of rawFields(f.payload)) if (o.field === 2 && o.payload !== undefined) names.push(utf8(o.payload));
    if (f.field === 5 || f.field === 11) {
      const name = rawFields(f.payload).find((t) => t.field === (f.field === 5 ? 8 : 1))?.payload;
      if (name !== undefined) names.push(utf8(name));
    }
  }
  return names;
}

/**
 * Repair an optimized model ONNX Runtime wrote (`optimizedModelFilePath`) that has control-flow
 * branches (`If`'s then/else graphs). ONNX Runtime 1.30 writes such a file and then refuses to load
 * it, for two reasons this fixes in every subgraph at any depth (the main graph is left as it is):
 * - every initializer of a branch is written twice ("initializer name is not unique"): the first of
 *   each name is kept;
 * - names its optimizer generates (`reorder_token_<n>` of the NCHWc layout pass) restart in each
 *   graph, so a branch can define a name the enclosing graph defines too (not SSA): the branch's
 *   own value is renamed (`<name>.<branch>`), with every use inside the branch (ONNX Runtime resolves
 *   a name inside the branch to the branch's own value first, so the meaning is unchanged).
 * Returns undefined when nothing changed.
 */
export function repairOptimizedModel(model: Uint8Array): Uint8Array | undefined {
  // GraphProto: node 1, name 2, initializer 5, input 11, output 12, value_info 13.
  const graph = (g: Uint8Array, outer: ReadonlySet<string> | undefined, inherited: ReadonlyMap<string, string>): Uint8Array | undefined => {
    const own = definedNames(g);
    const label = utf8(rawFields(g).find((f) => f.field === 2)?.payload ?? encode('branch'));
    const rename = new Map(inherited);
    if (outer !== undefined) for (const n of own) if (outer.has(n)) rename.set(n, `${n}.${label}`);
    const visible = new Set([...(outer ?? []), ...own.map((n) => rename.get(n) ?? n)]);
    const renamed = (b: Uint8Array) => {
      const to = rename.get(utf8(b));
      return to === undefined ? undefined : encode(to);
    };
    const seen = new Set<string>();
    return rewriteFields(g, (f) => {
      if (f.field === 1) return node(f.payload!, visible, rename, renamed);
      if (f.field === 5 && outer !== undefined) {
        const name = rawFields(f.payload!).find((t) => t.field === 8)?.payload;
        if (name !== undefined) {
          if (seen.has(utf8(name))) return null;
          seen.add(utf8(name));
        }
        return rewriteFields(f.payload!, (t) => (t.field === 8 ? renamed(t.payload!) : undefined));
      }
      if (f.field === 11 || f.field === 12 || f.field === 13) return rewriteFields(f.payload!, (v) => (v.field === 1 ? renamed(v.payload!) : undefined));
      return undefined;
    });
  };
  // NodeProto: input 1, output 2, attribute 5 (AttributeProto: g 6, graphs 11).
  const node = (n: Uint8Array, visible: ReadonlySet<string>, rename: ReadonlyMap<string, string>, renamed: (b: Uint8Array) => Uint8Array | undefined) =>
    rewriteFields(n, (f) => {
      if (f.field === 1 || f.field === 2) return renamed(f.payload!);
      if (f.field === 5) return rewriteFields(f.payload!, (a) => (a.field === 6 || a.field === 11 ? graph(a.payload!, visible, rename) : undefined));
      return undefined;
    });
  return rewriteFields(model, (f) => (f.field === 7 ? graph(f.payload!, undefined, new Map()) : undefined)); // ModelProto.graph
}
