/**
 * The on-disk cache of converted weights and built graphs, keyed by (weights identity, graph
 * variant, dtype).
 *
 * Layout: `<cache>/<component>-<weightsKey>/weights.bin` holds every parameter in the graph's dtype
 * (4 KiB-aligned, so the runtime can map it), `layout.json` marks it complete, and each graph variant
 * is `graph-<hash>.onnx` beside it, referencing `weights.bin` as ONNX external data (external data
 * must sit in the model's folder). Graphs are tiny without their weights, so variants are cheap.
 *
 * The weights key is a hash of the parameter list (name, shape, dtype) and, for each parameter,
 * its source file's real path, size and modification time plus the tensor's key, dtype and offset:
 * a changed or replaced checkpoint gets a new key without hashing gigabytes.
 */
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import type { Graph } from './onnx/builder.ts';
import { serializeModel, type InitializerData } from './onnx/serialize.ts';
import { DTYPE_BYTES, numel } from './tensor.ts';
import { readParamBytes, type BoundWeights, type ParamPatch } from './weights.ts';

/** Bump when the weights file layout or graph conventions change. */
const CACHE_FORMAT = 2;
const WEIGHTS_FILE = 'weights.bin';
const LAYOUT_FILE = 'layout.json';
const ALIGNMENT = 4096;

/** `CHORUS_CACHE_DIR`, else `$XDG_CACHE_HOME/chorus`, else `~/.cache/chorus`. */
export function defaultCacheDir(): string {
  if (process.env.CHORUS_CACHE_DIR !== undefined && process.env.CHORUS_CACHE_DIR !== '') return process.env.CHORUS_CACHE_DIR;
  const base = process.env.XDG_CACHE_HOME ?? path.join(os.homedir(), '.cache');
  return path.join(base, 'chorus');
}

interface Layout {
  readonly format: number;
  readonly bytes: number;
  readonly params: Record<string, { offset: number; length: number }>;
}

export interface PreparedModel {
  readonly modelPath: string;
  readonly weightsPath: string;
  /** True when the weights came from the cache (no conversion this time). */
  readonly weightsReused: boolean;
  /** Where each parameter's bytes are in the weights file (graph layout and dtype). */
  readonly params: Readonly<Record<string, { readonly offset: number; readonly length: number }>>;
}

function weightsKey(bound: BoundWeights, patch: ParamPatch | undefined): string {
  const h = createHash('sha256');
  h.update(`chorus-weights-${CACHE_FORMAT}\n`);
  if (patch !== undefined) h.update(`patch ${patch.key}\n`);
  const files = new Map<string, string>();
  for (const p of [...bound.params].sort((a, b) => (a.decl.name < b.decl.name ? -1 : 1))) {
    const file = p.tensor.file;
    let id = files.get(file.path);
    if (id === undefined) {
      const st = fs.statSync(file.path);
      id = `${fs.realpathSync(file.path)}|${st.size}|${st.mtimeMs}`;
      files.set(file.path, id);
    }
    const info = file.info(p.tensor.key);
    h.update(`${p.decl.name}|${p.decl.shape.join(',')}|${p.decl.transposed ? 'T' : ''}|${p.decl.dtype}|${id}|${p.tensor.key}|${info.fileDtype}|${info.begin}\n`);
  }
  return h.digest('hex').slice(0, 20);
}

function writeWeights(dir: string, bound: BoundWeights, patch: ParamPatch | undefined): Layout {
  const params: Record<string, { offset: number; length: number }> = {};
  const tmp = path.join(dir, `${WEIGHTS_FILE}.${process.pid}.tmp`);
  const fd = fs.openSync(tmp, 'w');
  let offset = 0;
  try {
    for (const p of bound.params) {
      const pad = (ALIGNMENT - (offset % ALIGNMENT)) % ALIGNMENT;
      offset += pad;
      const bytes = readParamBytes(p, patch);
      const expected = numel(p.decl.shape) * DTYPE_BYTES[p.decl.dtype];
      if (bytes.byteLength !== expected) throw new Error(`cache: ${p.decl.name} produced ${bytes.byteLength} bytes, expected ${expected}`);
      let done = 0;
      while (done < bytes.byteLength) done += fs.writeSync(fd, bytes, done, bytes.byteLength - done, offset + done);
      params[p.decl.name] = { offset, length: bytes.byteLength };
      offset += bytes.byteLength;
    }
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
  fs.renameSync(tmp, path.join(dir, WEIGHTS_FILE));
  const layout: Layout = { format: CACHE_FORMAT, bytes: offset, params };
  writeAtomic(path.join(dir, LAYOUT_FILE), Buffer.from(JSON.stringify(layout)));
  return layout;
}

function readLayout(dir: string, bound: BoundWeights): Layout | undefined {
  try {
    const layout = JSON.parse(fs.readFileSync(path.join(dir, LAYOUT_FILE), 'utf-8')) as Layout;
    if (layout.format !== CACHE_FORMAT) return undefined;
    if (fs.statSync(path.join(dir, WEIGHTS_FILE)).size !== layout.bytes) return undefined;
    if (!bound.params.every((p) => layout.params[p.decl.name] !== undefined)) return undefined;
    return layout;
  } catch {
    return undefined;
  }
}

function writeAtomic(file: string, bytes: Uint8Array): void {
  const tmp = `${file}.${process.pid}.tmp`;
  fs.writeFileSync(tmp, bytes);
  fs.renameSync(tmp, file);
}

/**
 * Make sure the converted weights and this graph variant exist on disk; return the model path to
 * open. Converting is the slow part and happens once per checkpoint, component and dtype.
 */
export function prepareModelFiles(graph: Graph, bound: BoundWeights, options: { cacheDir: string; component: string; patch?: ParamPatch }): PreparedModel {
  const dir = path.join(options.cacheDir, `${options.component}-${weightsKey(bound, options.patch)}`);
  fs.mkdirSync(dir, { recursive: true });
  let layout = readLayout(dir, bound);
  const weightsReused = layout !== undefined;
  if (layout === undefined) layout = writeWeights(dir, bound, options.patch);
  const bytes = serializeModel(graph, (p) => {
    const entry = layout.params[p.name];
    if (entry === undefined) throw new Error(`cache: parameter ${p.name} is not in ${dir}/${LAYOUT_FILE}`);
    const data: InitializerData = { kind: 'external', location: WEIGHTS_FILE, offset: entry.offset, length: entry.length };
    return { dtype: p.dtype, data };
  });
  const modelPath = path.join(dir, `graph-${createHash('sha256').update(bytes).digest('hex').slice(0, 16)}.onnx`);
  if (!fs.existsSync(modelPath)) writeAtomic(modelPath, bytes);
  return { modelPath, weightsPath: path.join(dir, WEIGHTS_FILE), weightsReused, params: layout.params };
}
