/**
 * Where the shared fixtures live (`../shared` beside the clone, in place; never copied), and helpers
 * to compare tensors against them with a stated tolerance.
 */
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
export const SHARED = process.env.CHORUS_SHARED ?? path.resolve(ROOT, '../shared');
export const FIXTURES = path.join(SHARED, 'fixtures');
export const REALWORLD = path.join(SHARED, 'realworld');
export const REF = path.join(FIXTURES, 'tiny-sd15-ref');

/** manifest.json files use Python's json, which writes -Infinity/NaN; read those as null. */
export function readManifest(file: string): any {
  return JSON.parse(fs.readFileSync(file, 'utf-8').replace(/-?Infinity|NaN/g, 'null'));
}

export interface RefCase {
  id: string;
  kind: string;
  file: string;
  inputs: Record<string, { key: string; shape: number[]; dtype: string }>;
  outputs: Record<string, { key: string; shape: number[]; dtype: string }>;
  tolerance: Record<string, number>;
  fp32_vs_fp64?: Record<string, { max_abs: number }>;
  [k: string]: unknown;
}

export function refCases(kind: string): RefCase[] {
  return readManifest(path.join(REF, 'manifest.json')).cases.filter((c: RefCase) => c.kind === kind);
}

/** Compare element-wise; on failure report max abs diff, max rel diff and the first index over atol. */
export function assertClose(actual: ArrayLike<number>, expected: ArrayLike<number>, atol: number, label: string): number {
  assert.equal(actual.length, expected.length, `${label}: ${actual.length} values, expected ${expected.length}`);
  let maxAbs = 0;
  let maxRel = 0;
  let first = -1;
  for (let i = 0; i < expected.length; i++) {
    const d = Math.abs(actual[i]! - expected[i]!);
    if (!(d <= atol) && first < 0) first = i;
    if (d > maxAbs || Number.isNaN(d)) maxAbs = Number.isNaN(d) ? Infinity : d;
    const r = d / Math.max(Math.abs(expected[i]!), 1e-12);
    if (r > maxRel) maxRel = r;
  }
  assert.ok(
    first < 0,
    `${label}: max |diff| ${maxAbs.toExponential(3)} > atol ${atol} (max rel ${maxRel.toExponential(3)}); first mismatch at index ${first}: got ${actual[first]}, expected ${expected[first]}`,
  );
  return maxAbs;
}
