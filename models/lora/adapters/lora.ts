/**
 * LoRA / LoCon (kohya, PEFT, diffusers): ΔW = scale · up · down.
 *
 * Shapes (sd-scripts `networks/lora.py` `LoRAModule`; PEFT `lora_A`/`lora_B` are down/up):
 *   down [r, in] (linear) or [r, in, kh, kw] (conv, the layer's own kernel), up [out, r] or [out, r, 1, 1].
 * CP-decomposed LoCon (LyCORIS `use_cp`/`use_tucker`) adds `lora_mid` [r, r, kh, kw] with a 1×1 down
 * [r, in, 1, 1]: ΔW = einsum('n m k l, i n, m j -> i j k l', mid, up, down) (A1111
 * `lyco_helpers.rebuild_cp_decomposition`). Folding mid into down, down'[n, j, k, l] = Σ_m mid[n, m, k, l] · down[m, j],
 * keeps it exactly low-rank: a 1×1 conv followed by a k×k conv is one k×k conv (no bias, so padding commutes).
 */
import type { ModuleDelta } from '../types.ts';
import { agree, downShapeFor, fmt, loraError, need, shapeOf, type FactorShapes, type FactorValues, type ImpliedShape, type ModuleFactors } from './common.ts';

const FAMILY = 'LoRA';

export function loraWeightShape(f: ModuleFactors, shapes: FactorShapes): ImpliedShape {
  const downKey = need(f, 'lora_down', shapes, FAMILY);
  const upKey = need(f, 'lora_up', shapes, FAMILY);
  const down = shapeOf(downKey, shapes, [2, 4], 'down');
  const up = shapeOf(upKey, shapes, [2, 4], 'up');
  if (up.length === 4 && (up[2] !== 1 || up[3] !== 1)) {
    throw loraError('SHAPE_MISMATCH', shapes.source, `\`${upKey}\` has shape ${fmt(up)}; an up projection is [out, r] or [out, r, 1, 1].`, { key: upKey, shape: up });
  }
  const midKey = f.parts.get('lora_mid');
  if (midKey === undefined) {
    agree({ key: upKey, dim: up[1]! }, { key: downKey, dim: down[0]! }, 'rank', shapes.source);
    return { shape: [up[0]!, ...down.slice(1)], rank: down[0]! };
  }
  const mid = shapeOf(midKey, shapes, [4], 'mid');
  if (down.length !== 4 || down[2] !== 1 || down[3] !== 1) {
    throw loraError('SHAPE_MISMATCH', shapes.source, `\`${downKey}\` has shape ${fmt(down)}; with a \`lora_mid\` the down projection is a 1×1 conv [r, in, 1, 1].`, { key: downKey, shape: down });
  }
  agree({ key: upKey, dim: up[1]! }, { key: midKey, dim: mid[0]! }, 'rank', shapes.source);
  agree({ key: midKey, dim: mid[1]! }, { key: downKey, dim: down[0]! }, 'rank', shapes.source);
  return { shape: [up[0]!, down[1]!, mid[2]!, mid[3]!], rank: down[0]! };
}

/** The module's low-rank delta for a target of shape `target` (already checked to fit). */
export function buildLora(f: ModuleFactors, shapes: FactorShapes, values: FactorValues, target: readonly number[], scale: number): ModuleDelta {
  const upKey = need(f, 'lora_up', shapes, FAMILY);
  const downKey = need(f, 'lora_down', shapes, FAMILY);
  const up = values.read(upKey);
  const [out, rank] = shapes.shapeOf(upKey) as [number, number];
  let down = values.read(downKey);
  const midKey = f.parts.get('lora_mid');
  if (midKey !== undefined) down = foldMid(values.read(midKey), shapes.shapeOf(midKey), down, shapes.shapeOf(downKey)[1]!);
  return { kind: 'lowrank', down, downShape: downShapeFor(rank, target), up, upShape: [out, rank], scale };
}

/** down'[n, j, s] = Σ_m mid[n, m, s] · down[m, j]: mid [r, r', kh, kw], down [r', in, 1, 1] → [r, in, kh, kw]. */
function foldMid(mid: Float32Array, midShape: readonly number[], down: Float32Array, inDim: number): Float32Array {
  const [r, rInner, kh, kw] = midShape as [number, number, number, number];
  const s = kh * kw;
  const folded = new Float64Array(r * inDim * s);
  for (let n = 0; n < r; n++) {
    for (let m = 0; m < rInner; m++) {
      for (let x = 0; x < s; x++) {
        const w = mid[(n * rInner + m) * s + x]!;
        if (w === 0) continue;
        for (let j = 0; j < inDim; j++) folded[(n * inDim + j) * s + x]! += w * down[m * inDim + j]!;
      }
    }
  }
  return Float32Array.from(folded);
}
