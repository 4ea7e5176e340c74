/**
 * LyCORIS full / diff modules: ΔW stored whole as `diff` (LyCORIS `lycoris/modules/full.py`, A1111
 * `network_full.py`), no alpha. The bias diff `diff_b` has no place in `ModuleDelta` (weights only) and is
 * reported by the loader as a key it did not apply.
 */
import type { ModuleDelta } from '../types.ts';
import { need, shapeOf, type FactorShapes, type FactorValues, type ImpliedShape, type ModuleFactors } from './common.ts';

const FAMILY = 'full-diff';

export function fullWeightShape(f: ModuleFactors, shapes: FactorShapes): ImpliedShape {
  return { shape: shapeOf(need(f, 'diff', shapes, FAMILY), shapes, [2, 4], 'diff'), rank: undefined };
}

export function buildFull(f: ModuleFactors, shapes: FactorShapes, values: FactorValues, target: readonly number[]): ModuleDelta {
  return { kind: 'full', diff: values.read(need(f, 'diff', shapes, FAMILY)), shape: [...target] };
}
