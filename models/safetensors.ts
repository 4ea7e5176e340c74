/**
 * safetensors reader and writer.
 *
 * Format (https://github.com/huggingface/safetensors, README "Format"): 8 bytes little-endian u64 N,
 * then N bytes of UTF-8 JSON `{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {..}}`,
 * then the data; offsets are relative to the first data byte.
 *
 * Model files are untrusted input. Everything in the header is checked against the file size before
 * anything is allocated for it, and tensors are read lazily, one at a time, with positioned reads.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { ModelError } from './errors.ts';
import { DTYPE_BYTES, numel, toFloat32, typedArrayFromBytes, type DType, type Tensor } from './tensor.ts';

/** The Rust reference implementation refuses headers above 100 MB; so do we. */
export const MAX_HEADER_BYTES = 100_000_000;
const HEADER_LENGTH_BYTES = 8;

/** safetensors dtype names (as the format spells them) → our dtypes. */
const FILE_DTYPES: Readonly<Record<string, DType>> = {
  F64: 'float64',
  F32: 'float32',
  F16: 'float16',
  BF16: 'bfloat16',
  F8_E4M3: 'float8_e4m3fn',
  F8_E5M2: 'float8_e5m2',
  I64: 'int64',
  I32: 'int32',
  I16: 'int16',
  I8: 'int8',
  U8: 'uint8',
  BOOL: 'bool',
};

const DTYPE_TO_FILE: Readonly<Record<DType, string>> = Object.fromEntries(
  Object.entries(FILE_DTYPES).map(([k, v]) => [v, k]),
) as Record<DType, string>;

export interface TensorInfo {
  readonly name: string;
  readonly dtype: DType;
  /** dtype as spelled in the file (`F16`, `BF16`, …). */
  readonly fileDtype: string;
  readonly shape: readonly number[];
  /** Absolute byte range in the file. */
  readonly begin: number;
  readonly end: number;
}

const PICKLE_HINT =
  'Chorus never executes pickle files (they can run arbitrary code). Convert it to .safetensors ' +
  '(most model pages offer a .safetensors download; A1111 and ComfyUI users can use their converters) and load that.';

/** Zip (torch.save ≥ 1.6) or raw pickle protocol 2+ (older torch.save, kohya .pt). */
function looksLikePickle(head: Uint8Array): boolean {
  const isZip = head[0] === 0x50 && head[1] === 0x4b && head[2] === 0x03 && head[3] === 0x04;
  const isPickle = head[0] === 0x80 && (head[1] ?? 0) >= 2 && (head[1] ?? 0) <= 5;
  return isZip || isPickle;
}

function fail(code: ConstructorParameters<typeof ModelError>[0], file: string, message: string, details: Record<string, unknown> = {}): never {
  throw new ModelError(code, `${path.basename(file)}: ${message}`, { file, ...details });
}

/**
 * Parse and validate a header. `fileSize` is the whole file's size in bytes.
 * Throws `ModelError` with codes NOT_SAFETENSORS, PICKLE_CHECKPOINT, TRUNCATED_FILE,
 * HEADER_OVERRUN, BAD_HEADER, UNSUPPORTED_DTYPE, OFFSETS_OUT_OF_RANGE, OFFSETS_OVERLAP.
 */
export function parseHeader(
  file: string,
  fileSize: number,
  readAt: (position: number, length: number) => Uint8Array,
): { tensors: Map<string, TensorInfo>; metadata: Record<string, string>; dataStart: number } {
  if (fileSize < HEADER_LENGTH_BYTES) {
    fail('TRUNCATED_FILE', file, `the file is ${fileSize} bytes, too short to be a safetensors file (at least 8 bytes of header length). It is truncated or empty; download it again.`, { fileSize });
  }
  const head = readAt(0, HEADER_LENGTH_BYTES);
  if (looksLikePickle(head)) {
    fail('PICKLE_CHECKPOINT', file, `this is a PyTorch pickle checkpoint (.ckpt/.pt/.bin), not safetensors. ${PICKLE_HINT}`);
  }
  const view = new DataView(head.buffer, head.byteOffset, head.byteLength);
  const headerLen = view.getBigUint64(0, true);
  if (headerLen > BigInt(fileSize - HEADER_LENGTH_BYTES)) {
    // A huge value here is also what a non-safetensors file produces (its first 8 bytes read as a number).
    const kind = headerLen > BigInt(MAX_HEADER_BYTES) ? 'NOT_SAFETENSORS' : 'HEADER_OVERRUN';
    const msg =
      kind === 'NOT_SAFETENSORS'
        ? `not a safetensors file: its first 8 bytes give a header length of ${headerLen} bytes, larger than the file (${fileSize} bytes).`
        : `the header claims ${headerLen} bytes but only ${fileSize - HEADER_LENGTH_BYTES} bytes follow the length field. The file is truncated or corrupt; download it again.`;
    fail(kind, file, msg, { headerLength: Number(headerLen), fileSize });
  }
  if (headerLen > BigInt(MAX_HEADER_BYTES)) {
    fail('BAD_HEADER', file, `header of ${headerLen} bytes exceeds the ${MAX_HEADER_BYTES}-byte limit of the format.`, { headerLength: Number(headerLen) });
  }
  const n = Number(headerLen);
  const dataStart = HEADER_LENGTH_BYTES + n;
  const dataSize = fileSize - dataStart;
  let json: unknown;
  try {
    json = JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(readAt(HEADER_LENGTH_BYTES, n)));
  } catch (e) {
    fail('NOT_SAFETENSORS', file, `not a safetensors file: the ${n}-byte header is not UTF-8 JSON (${(e as Error).message}).`);
  }
  if (typeof json !== 'object' || json === null || Array.isArray(json)) {
    fail('BAD_HEADER', file, 'the header is not a JSON object.');
  }

  const metadata: Record<string, string> = {};
  const tensors = new Map<string, TensorInfo>();
  for (const [name, entry] of Object.entries(json as Record<string, unknown>)) {
    if (name === '__metadata__') {
      if (typeof entry !== 'object' || entry === null || Array.isArray(entry)) {
        fail('BAD_HEADER', file, '`__metadata__` must be an object of strings.');
      }
      for (const [k, v] of Object.entries(entry as Record<string, unknown>)) {
        // The Rust writer only accepts strings; some tools write numbers. Keep them as text.
        metadata[k] = typeof v === 'string' ? v : JSON.stringify(v);
      }
      continue;
    }
    if (typeof entry !== 'object' || entry === null) fail('BAD_HEADER', file, `tensor \`${name}\`: entry is not an object.`, { key: name });
    const { dtype, shape, data_offsets: offsets } = entry as { dtype?: unknown; shape?: unknown; data_offsets?: unknown };
    if (typeof dtype !== 'string') fail('BAD_HEADER', file, `tensor \`${name}\`: missing dtype.`, { key: name });
    const ours = FILE_DTYPES[dtype];
    if (ours === undefined) {
      fail('UNSUPPORTED_DTYPE', file, `tensor \`${name}\` has dtype \`${dtype}\`, which Chorus cannot read (supported: ${Object.keys(FILE_DTYPES).join(', ')}).`, { key: name, dtype });
    }
    if (!Array.isArray(shape) || !shape.every((d) => Number.isSafeInteger(d) && d >= 0)) {
      fail('BAD_HEADER', file, `tensor \`${name}\`: shape ${JSON.stringify(shape)} is not a list of non-negative integers.`, { key: name });
    }
    if (!Array.isArray(offsets) || offsets.length !== 2 || !offsets.every((d) => Number.isSafeInteger(d) && d >= 0)) {
      fail('BAD_HEADER', file, `tensor \`${name}\`: data_offsets ${JSON.stringify(offsets)} is not [begin, end].`, { key: name });
    }
    const [begin, end] = offsets as [number, number];
    const expectedBytes = numel(shape as number[]) * DTYPE_BYTES[ours];
    if (end < begin || end - begin !== expectedBytes) {
      fail('OFFSETS_OUT_OF_RANGE', file, `tensor \`${name}\` (${dtype} [${(shape as number[]).join(', ')}]) needs ${expectedBytes} bytes but its offsets [${begin}, ${end}] span ${end - begin}.`, { key: name, begin, end, expectedBytes });
    }
    tensors.set(name, { name, dtype: ours, fileDtype: dtype, shape: shape as number[], begin: dataStart + begin, end: dataStart + end });
  }

  // Overlaps and range. Sorted by begin, each range must start at or after the previous end.
  const sorted = [...tensors.values()].sort((a, b) => a.begin - b.begin || a.end - b.end);
  let prev: TensorInfo | undefined;
  let contiguous = true;
  for (const t of sorted) {
    if (prev !== undefined && t.begin < prev.end) {
      fail('OFFSETS_OVERLAP', file, `tensors \`${prev.name}\` and \`${t.name}\` overlap in the data section; the file is corrupt.`, { keys: [prev.name, t.name] });
    }
    if (t.begin !== (prev?.end ?? dataStart)) contiguous = false;
    prev = t;
  }
  const lastEnd = prev?.end ?? dataStart;
  if (lastEnd > fileSize) {
    const beyond = sorted.filter((t) => t.end > fileSize);
    if (contiguous) {
      fail('TRUNCATED_FILE', file, `the file is truncated: its header describes ${lastEnd - dataStart} bytes of tensor data but only ${dataSize} are present (${beyond.length} tensors cut off, first \`${beyond[0]!.name}\`). Download it again.`, { expectedBytes: lastEnd, fileSize, firstMissing: beyond[0]!.name });
    }
    fail('OFFSETS_OUT_OF_RANGE', file, `tensor \`${beyond[0]!.name}\` points at bytes [${beyond[0]!.begin - dataStart}, ${beyond[0]!.end - dataStart}] but the data section has ${dataSize} bytes.`, { key: beyond[0]!.name, dataSize });
  }
  return { tensors, metadata, dataStart };
}

/** An open safetensors file. Tensors are read on demand; call `close()` when done. */
export class SafetensorsFile {
  readonly path: string;
  readonly size: number;
  readonly metadata: Readonly<Record<string, string>>;
  readonly tensors: ReadonlyMap<string, TensorInfo>;
  /** Byte offset of the data section (8 + header length). */
  readonly dataStart: number;
  #fd: number | undefined;

  private constructor(file: string, fd: number, size: number) {
    this.path = file;
    this.#fd = fd;
    this.size = size;
    const parsed = parseHeader(file, size, (pos, len) => this.#readAt(pos, len));
    this.tensors = parsed.tensors;
    this.metadata = parsed.metadata;
    this.dataStart = parsed.dataStart;
  }

  /** Open and validate. Throws `ModelError` (see `parseHeader`), or MODEL_NOT_FOUND. */
  static open(file: string): SafetensorsFile {
    let fd: number;
    try {
      fd = fs.openSync(file, 'r');
    } catch (e) {
      throw new ModelError('MODEL_NOT_FOUND', `${file}: cannot open (${(e as NodeJS.ErrnoException).code ?? (e as Error).message}).`, { file });
    }
    try {
      return new SafetensorsFile(file, fd, fs.fstatSync(fd).size);
    } catch (e) {
      fs.closeSync(fd);
      throw e;
    }
  }

  names(): string[] {
    return [...this.tensors.keys()];
  }

  has(name: string): boolean {
    return this.tensors.has(name);
  }

  info(name: string): TensorInfo {
    const t = this.tensors.get(name);
    if (t === undefined) fail('MISSING_TENSOR', this.path, `no tensor named \`${name}\`.`, { key: name });
    return t;
  }

  /** Raw little-endian bytes of one tensor. */
  readBytes(name: string): Uint8Array {
    const t = this.info(name);
    return this.#readAt(t.begin, t.end - t.begin);
  }

  /** One tensor in its stored dtype. */
  read(name: string): Tensor {
    const t = this.info(name);
    return { dtype: t.dtype, shape: t.shape, data: typedArrayFromBytes(t.dtype, this.readBytes(name)) };
  }

  /** One tensor converted to float32 (the fp32 graph policy; integer tensors are cast). */
  readFloat32(name: string): Tensor<'float32'> {
    const t = this.read(name);
    return { dtype: 'float32', shape: t.shape, data: toFloat32(t) };
  }

  close(): void {
    if (this.#fd !== undefined) fs.closeSync(this.#fd);
    this.#fd = undefined;
  }

  #readAt(position: number, length: number): Uint8Array {
    if (this.#fd === undefined) throw new Error(`SafetensorsFile ${this.path} is closed`);
    const out = Buffer.allocUnsafe(length);
    let done = 0;
    while (done < length) {
      const n = fs.readSync(this.#fd, out, done, length - done, position + done);
      if (n === 0) fail('TRUNCATED_FILE', this.path, `unexpected end of file at byte ${position + done}.`);
      done += n;
    }
    return out;
  }
}

/** Open a safetensors file (convenience for `SafetensorsFile.open`). */
export function openSafetensors(file: string): SafetensorsFile {
  return SafetensorsFile.open(file);
}

/**
 * Serialize tensors the way the Rust writer lays them out: tensors sorted by (dtype size
 * descending, name), `__metadata__` first, header padded with spaces to a multiple of 8.
 */
export function encodeSafetensors(tensors: Readonly<Record<string, Tensor>>, metadata?: Readonly<Record<string, string>>): Uint8Array {
  const names = Object.keys(tensors).sort((a, b) => {
    const da = DTYPE_BYTES[tensors[a]!.dtype];
    const db = DTYPE_BYTES[tensors[b]!.dtype];
    return db - da || (a < b ? -1 : a > b ? 1 : 0);
  });
  const header: Record<string, unknown> = {};
  if (metadata !== undefined && Object.keys(metadata).length > 0) header.__metadata__ = metadata;
  let offset = 0;
  for (const name of names) {
    const t = tensors[name]!;
    const bytes = t.data.byteLength;
    header[name] = { dtype: DTYPE_TO_FILE[t.dtype], shape: [...t.shape], data_offsets: [offset, offset + bytes] };
    offset += bytes;
  }
  let json = JSON.stringify(header);
  const pad = (8 - (Buffer.byteLength(json) % 8)) % 8;
  json += ' '.repeat(pad);
  const headerBytes = Buffer.from(json, 'utf-8');
  const out = new Uint8Array(HEADER_LENGTH_BYTES + headerBytes.length + offset);
  new DataView(out.buffer).setBigUint64(0, BigInt(headerBytes.length), true);
  out.set(headerBytes, HEADER_LENGTH_BYTES);
  let pos = HEADER_LENGTH_BYTES + headerBytes.length;
  for (const name of names) {
    const d = tensors[name]!.data;
    out.set(new Uint8Array(d.buffer, d.byteOffset, d.byteLength), pos);
    pos += d.byteLength;
  }
  return out;
}

export function writeSafetensors(file: string, tensors: Readonly<Record<string, Tensor>>, metadata?: Readonly<Record<string, string>>): void {
  fs.writeFileSync(file, encodeSafetensors(tensors, metadata));
}
