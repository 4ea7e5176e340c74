/**
 * The binder: pairs a graph's declared parameters (diffusers names) with tensors from a weight
 * source (a diffusers component file, or a component of a single-file checkpoint through its key
 * map) and checks every shape. The result is a report plus a reader that yields each parameter's
 * bytes in the graph's dtype.
 *
 * Dtype policy (one place): float tensors of any stored precision (F16, BF16, F32, F64, F8) feed a
 * float32 parameter by exact widening (or rounding, for F64); a float16 parameter gets the tensor
 * rounded to half. Integer tensors never feed float parameters. Conversions are counted in the
 * report.
 */
import * as path from 'node:path';
import { ModelError } from './errors.ts';
import type { ParamDecl } from './onnx/builder.ts';
import type { SafetensorsFile } from './safetensors.ts';
import { float32ToHalfBits, numel, toFloat32, type DType } from './tensor.ts';

/** Where one parameter's tensor lives. */
export interface ResolvedTensor {
  readonly file: SafetensorsFile;
  /** The key in `file`. */
  readonly key: string;
}

export interface WeightSource {
  /** Shown in messages (e.g. `unet/diffusion_pytorch_model.safetensors` or `model.safetensors [unet]`). */
  readonly label: string;
  /** Map a diffusers parameter name to its tensor, or undefined when the source lacks it. */
  resolve(name: string): ResolvedTensor | undefined;
  /** Every tensor key of this component in the source (for the unexpected-keys list), as diffusers names where known. */
  componentKeys(): string[];
  /** The key a parameter would have in this source, when it differs from the diffusers name (for messages). */
  sourceKey?(name: string): string | undefined;
}

export interface BindReport {
  readonly source: string;
  readonly bound: number;
  /** Keys in the source the graph does not use (not an error: buffers, EMA copies, extra heads). */
  readonly unexpected: readonly string[];
  /** Stored dtype → graph dtype, with counts. */
  readonly conversions: Readonly<Record<string, number>>;
}

export interface BoundParam {
  readonly decl: ParamDecl;
  readonly tensor: ResolvedTensor;
}

export interface BoundWeights {
  readonly params: readonly BoundParam[];
  readonly report: BindReport;
}

const FLOAT_DTYPES: ReadonlySet<DType> = new Set(['float32', 'float16', 'bfloat16', 'float64', 'float8_e4m3fn', 'float8_e5m2']);

/**
 * Bind every declared parameter. Throws MISSING_TENSOR (listing up to 10 missing keys and how many
 * more), SHAPE_MISMATCH (key, expected and found shape), or UNSUPPORTED_DTYPE.
 * A stored [C, C, 1, 1] tensor binds to a declared [C, C] parameter and vice versa (the VAE
 * attention layout difference between the LDM and diffusers formats); it is a pure reshape.
 */
export function bindWeights(params: readonly ParamDecl[], source: WeightSource): BoundWeights {
  const missing: ParamDecl[] = [];
  const bound: BoundParam[] = [];
  const used = new Set<string>();
  const conversions: Record<string, number> = {};
  for (const decl of params) {
    const tensor = source.resolve(decl.name);
    if (tensor === undefined) {
      missing.push(decl);
      continue;
    }
    const info = tensor.file.info(tensor.key);
    used.add(tensor.key);
    if (!shapesCompatible(decl.storedShape, info.shape)) {
      throw new ModelError(
        'SHAPE_MISMATCH',
        `${source.label}: tensor \`${tensor.key}\` has shape [${info.shape.join(', ')}] but the model config needs [${decl.storedShape.join(', ')}] for ${decl.name}. ` +
          'The weights do not belong to this config (a different model size or architecture); check that config.json and the weights come from the same model.',
        { file: tensor.file.path, key: tensor.key, param: decl.name, expected: decl.storedShape, found: info.shape },
      );
    }
    if (!FLOAT_DTYPES.has(info.dtype)) {
      throw new ModelError('UNSUPPORTED_DTYPE', `${source.label}: tensor \`${tensor.key}\` is ${info.fileDtype}, but ${decl.name} needs floating-point weights.`, {
        file: tensor.file.path,
        key: tensor.key,
        dtype: info.fileDtype,
      });
    }
    if (info.dtype !== decl.dtype) {
      const k = `${info.fileDtype}→${decl.dtype}`;
      conversions[k] = (conversions[k] ?? 0) + 1;
    }
    bound.push({ decl, tensor });
  }
  if (missing.length > 0) {
    const shown = missing.slice(0, 10).map((m) => {
      const key = source.sourceKey?.(m.name);
      return key === undefined || key === m.name ? m.name : `${key} (${m.name})`;
    });
    const more = missing.length > shown.length ? ` and ${missing.length - shown.length} more` : '';
    throw new ModelError(
      'MISSING_TENSOR',
      `${source.label}: ${missing.length} of ${params.length} weights are missing: ${shown.join(', ')}${more}. The file is incomplete or is not this component.`,
      { source: source.label, missing: missing.map((m) => m.name) },
    );
  }
  const unexpected = source.componentKeys().filter((k) => !used.has(k));
  return { params: bound, report: { source: source.label, bound: bound.length, unexpected, conversions } };
}

function shapesCompatible(declared: readonly number[], stored: readonly number[]): boolean {
  if (declared.length === stored.length) return declared.every((d, i) => d === stored[i]);
  // [C, C] ↔ [C, C, 1, 1]: 1×1 conv vs linear.
  const strip = (s: readonly number[]) => {
    const out = [...s];
    while (out.length > 2 && out[out.length - 1] === 1) out.pop();
    return out;
  };
  const a = strip(declared);
  const b = strip(stored);
  return a.length === b.length && a.every((d, i) => d === b[i]) && numel(declared) === numel(stored);
}

/** [rows, cols] → [cols, rows]. */
function transpose2d(src: Float32Array, rows: number, cols: number): Float32Array {
  const out = new Float32Array(src.length);
  for (let r = 0; r < rows; r++) for (let c = 0; c < cols; c++) out[c * rows + r] = src[r * cols + c]!;
  return out;
}

/**
 * A change to parameter values before they are stored (the merged-weights variant adds LoRA deltas).
 * `apply` gets the values in the stored layout (linear [out, in]) and returns the new values, or
 * undefined to leave the parameter alone; `key` identifies the change for the cache.
 */
export interface ParamPatch {
  readonly key: string;
  apply(name: string, values: Float32Array, storedShape: readonly number[]): Float32Array | undefined;
}

/** One bound parameter's bytes in its declared dtype and layout (little-endian), patched if asked. */
export function readParamBytes(p: BoundParam, patch?: ParamPatch): Uint8Array {
  const info = p.tensor.file.info(p.tensor.key);
  let patched: Float32Array | undefined;
  if (patch !== undefined) patched = patch.apply(p.decl.name, toFloat32(p.tensor.file.read(p.tensor.key)), p.decl.storedShape);
  if (patched === undefined && info.dtype === p.decl.dtype && !p.decl.transposed) return p.tensor.file.readBytes(p.tensor.key);
  let f32 = patched ?? toFloat32(p.tensor.file.read(p.tensor.key));
  if (p.decl.transposed) f32 = transpose2d(f32, p.decl.storedShape[0]!, p.decl.storedShape[1]!);
  switch (p.decl.dtype) {
    case 'float32':
      return new Uint8Array(f32.buffer, f32.byteOffset, f32.byteLength);
    case 'float16': {
      const h = float32ToHalfBits(f32);
      return new Uint8Array(h.buffer, h.byteOffset, h.byteLength);
    }
    default:
      throw new Error(`readParamBytes: graph parameter ${p.decl.name} has dtype ${p.decl.dtype}, which the binder does not produce`);
  }
}

/** A diffusers component file: keys are already diffusers names. `aliases` maps legacy names. */
export function diffusersSource(file: SafetensorsFile, root: string, aliases: (name: string) => readonly string[] = () => []): WeightSource {
  return {
    label: path.relative(root, file.path) || file.path,
    resolve(name) {
      if (file.has(name)) return { file, key: name };
      for (const alt of aliases(name)) if (file.has(alt)) return { file, key: alt };
      return undefined;
    },
    componentKeys: () => file.names(),
  };
}
