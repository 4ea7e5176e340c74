/**
 * What every adapter family (one file each: `lora.ts`, `loha.ts`, `lokr.ts`, `full.ts`) works with:
 * a module's factors by part name, their shapes (from the header) and, when building, their values.
 *
 * Each family has two steps:
 * - `…WeightShape`: from shapes alone, check the factors agree with each other and give the shape of the
 *   ΔW they make (`[out, in]`, `[out, in, kh, kw]`, or `[out, in·kh·kw]` when a conv is stored flattened);
 * - `build…`: from the values, the module's `ModuleDelta` laid out for its target.
 * A file whose factors disagree (a missing half, ranks that differ, a zero rank) is corrupt or from a writer
 * we do not know: that is a typed error naming the file and key, never a guess.
 */
import * as path from 'node:path';
import { ModelError, type ModelErrorCode } from '../../errors.ts';
import type { PartName } from '../keys.ts';

/** One module's tensors, by part. */
export interface ModuleFactors {
  /** How the file names the module (key stem), for messages. */
  readonly name: string;
  readonly parts: ReadonlyMap<PartName, string>;
}

/** The file the factors come from (path, for messages) and their header shapes. */
export interface FactorShapes {
  readonly source: string;
  shapeOf(key: string): readonly number[];
}

/** Values of float tensors (already checked: float dtype, finite) and scalars. */
export interface FactorValues {
  read(key: string): Float32Array;
  /** A one-element tensor (`alpha`) as a number. */
  scalar(key: string): number;
}

/** ΔW's shape as the factors make it, and the rank that divides alpha. */
export interface ImpliedShape {
  readonly shape: readonly number[];
  /** The rank alpha is divided by (kohya `lora_down.shape[0]`, LoHa `w1b.shape[0]`); undefined when alpha does not apply. */
  readonly rank: number | undefined;
}

export function loraError(code: ModelErrorCode, source: string, message: string, details: Record<string, unknown> = {}): ModelError {
  return new ModelError(code, `${path.basename(source)}: ${message}`, { file: source, ...details });
}

export const fmt = (shape: readonly number[]): string => `[${shape.join(', ')}]`;

export const product = (dims: readonly number[]): number => dims.reduce((a, b) => a * b, 1);

/** The key of a part that must be there; a missing one is MISSING_TENSOR naming the module and the key. */
export function need(f: ModuleFactors, part: PartName, shapes: FactorShapes, family: string): string {
  const key = f.parts.get(part);
  if (key === undefined) {
    const have = [...f.parts.values()].map((k) => `\`${k}\``).join(', ');
    throw loraError(
      'MISSING_TENSOR',
      shapes.source,
      `${family} module \`${f.name}\` has no \`${part}\` tensor (it has ${have}). The file is incomplete or was written by a tool Chorus does not know; re-export it.`,
      { key: f.name, missing: part },
    );
  }
  return key;
}

/** Shape of `key`, checked to have one of `ranks` dimensions and no zero dimension. */
export function shapeOf(key: string, shapes: FactorShapes, ranks: readonly number[], role: string): readonly number[] {
  const shape = shapes.shapeOf(key);
  if (!ranks.includes(shape.length)) {
    throw loraError('SHAPE_MISMATCH', shapes.source, `\`${key}\` (${role}) has shape ${fmt(shape)}; expected ${ranks.join(' or ')} dimensions.`, { key, shape });
  }
  if (shape.some((d) => d === 0)) {
    throw loraError('SHAPE_MISMATCH', shapes.source, `\`${key}\` (${role}) has shape ${fmt(shape)}: a zero rank or width, so it holds no update. The file is corrupt; re-export it.`, { key, shape });
  }
  return shape;
}

/** Two factors that must agree on a dimension (the rank they share, or the width they both produce). */
export function agree(a: { key: string; dim: number }, b: { key: string; dim: number }, what: string, source: string): void {
  if (a.dim !== b.dim) {
    throw loraError('SHAPE_MISMATCH', source, `\`${a.key}\` and \`${b.key}\` disagree on the ${what}: ${a.dim} vs ${b.dim}. The file is corrupt; re-export it.`, { keys: [a.key, b.key], what, found: [a.dim, b.dim] });
  }
}

/**
 * Can ΔW of `implied` shape be added to a weight of `target` shape? Linear ↔ 1×1 conv is the same map,
 * and a flattened `[out, in·kh·kw]` ΔW (LoHa/LoKr conv factors, some diffs) has the conv's layout.
 */
export function fitsTarget(implied: readonly number[], target: readonly number[]): boolean {
  if (implied[0] !== target[0]) return false;
  if (implied.length === 2) return implied[1] === product(target.slice(1));
  if (implied.length !== 4) return false;
  if (target.length === 4) return implied.every((d, i) => d === target[i]);
  return target.length === 2 && implied[1] === target[1] && implied[2] === 1 && implied[3] === 1;
}

/** The low-rank `down` shape for a target: [r, in] for linear, [r, in, kh, kw] for conv. */
export function downShapeFor(rank: number, target: readonly number[]): number[] {
  return [rank, ...target.slice(1)];
}

/** C = A·B for row-major A [m, k], B [k, n]; accumulated in float64. */
export function matmul(a: Float32Array, b: Float32Array, m: number, k: number, n: number): Float64Array {
  const c = new Float64Array(m * n);
  for (let i = 0; i < m; i++) {
    for (let p = 0; p < k; p++) {
      const aip = a[i * k + p]!;
      if (aip === 0) continue;
      const row = p * n;
      const out = i * n;
      for (let j = 0; j < n; j++) c[out + j]! += aip * b[row + j]!;
    }
  }
  return c;
}

/** kron(A, B) for row-major A [m, n], B [p, q] → [m·p, n·q]: out[(i·p + k), (j·q + l)] = A[i, j]·B[k, l]. */
export function kron(a: ArrayLike<number>, m: number, n: number, b: ArrayLike<number>, p: number, q: number): Float64Array {
  const out = new Float64Array(m * p * n * q);
  const cols = n * q;
  for (let i = 0; i < m; i++) {
    for (let j = 0; j < n; j++) {
      const aij = a[i * n + j]!;
      if (aij === 0) continue;
      for (let k = 0; k < p; k++) {
        const row = (i * p + k) * cols + j * q;
        for (let l = 0; l < q; l++) out[row + l] = aij * b[k * q + l]!;
      }
    }
  }
  return out;
}

/**
 * Tucker rebuild, `einsum('i j k l, j r, i p -> p r k l', t, wb, wa)` (LyCORIS `rebuild_tucker`):
 * t [R, R, kh, kw], wa [R, out], wb [R, in] → [out, in, kh, kw].
 */
export function rebuildTucker(t: Float32Array, tShape: readonly number[], wa: Float32Array, out: number, wb: Float32Array, inDim: number): Float64Array {
  const [ri, rj, kh, kw] = tShape as [number, number, number, number];
  const s = kh * kw;
  // First contract over j: u[i, r, s] = Σ_j t[i, j, s] · wb[j, r]
  const u = new Float64Array(ri * inDim * s);
  for (let i = 0; i < ri; i++) {
    for (let j = 0; j < rj; j++) {
      for (let r = 0; r < inDim; r++) {
        const w = wb[j * inDim + r]!;
        if (w === 0) continue;
        const dst = (i * inDim + r) * s;
        const src = (i * rj + j) * s;
        for (let x = 0; x < s; x++) u[dst + x]! += t[src + x]! * w;
      }
    }
  }
  // Then over i: result[p, r, s] = Σ_i wa[i, p] · u[i, r, s]
  const result = new Float64Array(out * inDim * s);
  const plane = inDim * s;
  for (let i = 0; i < ri; i++) {
    for (let p = 0; p < out; p++) {
      const w = wa[i * out + p]!;
      if (w === 0) continue;
      for (let x = 0; x < plane; x++) result[p * plane + x]! += w * u[i * plane + x]!;
    }
  }
  return result;
}

/** The scale alpha / rank, where a missing or zero alpha means alpha = rank (sd-scripts, LyCORIS, A1111). */
export function alphaScale(alpha: number | undefined, rank: number): number {
  return alpha === undefined || alpha === 0 ? 1 : alpha / rank;
}
