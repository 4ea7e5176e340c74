/**
 * The merged-weights (fused) variant: a fixed LoRA stack baked into the base weights,
 *
 *   W' = W + Σ_k m_k · ΔW_k,   ΔW = scale · up · down (low-rank) or the full ΔW (LoKr, diffs),
 *
 * accumulated in float64 and rounded to float32 once, which is how the reference fixtures merge
 * (`tiny-sd15-lora` README: "computed in float64 and stored as float32"). Used for stacks that
 * do not change within a batch, and required for LoRAs that are not low-rank.
 */
import { createHash } from 'node:crypto';
import { ModelError } from '../errors.ts';
import type { ParamPatch } from '../weights.ts';
import type { LoraComponent, LoraModule } from './types.ts';

export interface StackEntry {
  /** Identifies the LoRA file for the cache (path + size + mtime, or a content hash). */
  readonly identity: string;
  readonly name: string;
  readonly modules: readonly LoraModule[];
  /** Strength for this component (A1111's te / unet multipliers). */
  readonly strength: number;
}

/** ΔW of one module, in float64, in the target's stored layout ([out, in] or [out, in, kh, kw] flattened). */
function deltaOf(m: LoraModule, size: number): Float64Array {
  const d = m.delta;
  if (d.kind === 'full') {
    if (d.diff.length !== size) throw new ModelError('SHAPE_MISMATCH', `LoRA module ${m.module}: ΔW has ${d.diff.length} values, the weight ${size}.`, { module: m.module });
    return Float64Array.from(d.diff);
  }
  const [out, r] = d.upShape;
  const cols = d.down.length / r;
  if (out * cols !== size) throw new ModelError('SHAPE_MISMATCH', `LoRA module ${m.module}: up [${d.upShape.join(', ')}] · down [${d.downShape.join(', ')}] does not fit a weight of ${size} values.`, { module: m.module });
  const delta = new Float64Array(size);
  for (let o = 0; o < out; o++) {
    const row = o * cols;
    for (let j = 0; j < r; j++) {
      const u = d.up[o * r + j]! * d.scale;
      if (u === 0) continue;
      const dj = j * cols;
      for (let i = 0; i < cols; i++) delta[row + i]! += u * d.down[dj + i]!;
    }
  }
  return delta;
}

/** A parameter patch that adds the stack's deltas to `<module>.weight` of `component`. */
export function mergePatch(component: LoraComponent, stack: readonly StackEntry[]): ParamPatch {
  const byWeight = new Map<string, { m: LoraModule; strength: number }[]>();
  for (const entry of stack) {
    if (entry.strength === 0) continue;
    for (const m of entry.modules) {
      if (m.component !== component) continue;
      const key = `${m.module}.weight`;
      byWeight.set(key, [...(byWeight.get(key) ?? []), { m, strength: entry.strength }]);
    }
  }
  const key = createHash('sha256')
    .update(JSON.stringify(stack.filter((e) => e.strength !== 0).map((e) => [e.identity, e.strength])))
    .digest('hex')
    .slice(0, 16);
  return {
    key: `merge:${component}:${key}`,
    apply(name, values) {
      const parts = byWeight.get(name);
      if (parts === undefined) return undefined;
      const acc = Float64Array.from(values);
      for (const { m, strength } of parts) {
        const delta = deltaOf(m, values.length);
        for (let i = 0; i < acc.length; i++) acc[i]! += strength * delta[i]!;
      }
      return Float32Array.from(acc);
    },
  };
}
