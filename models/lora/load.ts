/**
 * Load a LoRA file of any common format and normalise it to `LoraModule`s for THIS model
 * (CONVENTIONS.md 2.5–2.7):
 *
 *   header → `detectLoraScheme` (names, families, factor shapes; no model)
 *          → `matchLoraModules` (which layer each module patches; refuses files for another base model)
 *          → read the factors of the matched modules → one `ModuleDelta` per module (adapters/*.ts).
 *
 * Formats: kohya LoRA/LoCon (incl. CP `lora_mid`), kohya with SGM/compvis names (via `ldmModuleMap`),
 * PEFT (`lora_A`/`lora_B`, alpha from `lora_adapter_metadata` or `adapter_config.json`), diffusers
 * 0.21–0.24 (`lora.down`, `lora_linear_layer`), diffusers attention processors, LyCORIS LoHa, LoKr and
 * full diffs. All float dtypes are read as float32.
 *
 * What is an error and what is a coverage entry:
 * - the file as a whole (not safetensors, truncated, unknown scheme, another base model, DoRA, mostly
 *   unmatched) → `ModelError`;
 * - a corrupt module (one half of a pair missing, ranks that disagree, a zero rank, integer factors,
 *   NaN/Inf values) → `ModelError` naming the key: the file is damaged, and applying the rest of it would
 *   hide that;
 * - a module this model does not have, or has with another shape, or of a kind Chorus does not apply
 *   ((IA)³, OFT, GLoRA, norm, bias diffs), while most of the file applies → an `unmatched` coverage entry
 *   with the reason, for the user to see.
 */
import * as path from 'node:path';
import { SafetensorsFile } from '../safetensors.ts';
import { alphaScale, loraError, type FactorShapes, type FactorValues } from './adapters/common.ts';
import { buildFull } from './adapters/full.ts';
import { buildLoha } from './adapters/loha.ts';
import { buildLokr } from './adapters/lokr.ts';
import { buildLora } from './adapters/lora.ts';
import { matchLoraModules, type LdmModuleMap, type PlannedModule, type UnmatchedModule } from './match.ts';
import { readPeftConfig, type PeftConfig } from './peft-config.ts';
import { detectLoraScheme, type KeyNote, type LoraFormat, type LoraTensorInfo } from './scheme.ts';
import type { LoraComponent, LoraModule, LoraTarget, ModuleDelta } from './types.ts';

export type { LoraFormat } from './scheme.ts';
export { detectLoraScheme, type DetectedScheme, type FileModule, type LoraTensorInfo } from './scheme.ts';
export { matchLoraModules, type LdmModuleMap, type LoraPlan, type UnmatchedCause, type UnmatchedModule } from './match.ts';
export { loraTargetsFromParams } from './targets.ts';

export interface CoverageReport {
  readonly totalModulesInFile: number;
  /** Modules applied. `matched + unmatched.length === totalModulesInFile`. */
  readonly matched: number;
  /** File modules (or unrecognised keys) with no target in this model, each with a reason and its cause. */
  readonly unmatched: readonly UnmatchedModule[];
  /** Keys of applied modules that are not applied themselves (a full module's `diff_b`, …). */
  readonly ignoredKeys: readonly KeyNote[];
  readonly targetedComponents: readonly LoraComponent[];
}

export interface LoadedLora {
  readonly path: string;
  /** The file stem (A1111's LoRA name). */
  readonly name: string;
  readonly format: LoraFormat;
  readonly modules: readonly LoraModule[];
  readonly coverage: CoverageReport;
  readonly metadata: Readonly<Record<string, string>>;
  /** true when some module is `full` (a LoKr that is not low-rank, Tucker LoHa, full diffs): needs the merged-weights graph path. */
  readonly needsMergedWeights: boolean;
}

export interface LoadLoraOptions {
  /** LDM layer path (dots) → diffusers layer, for kohya files with SGM/compvis names; build it with `moduleLayers(unetModuleMap(config))`. */
  readonly ldmModuleMap?: LdmModuleMap;
}

/**
 * Read `file` and normalise it against `targets` (every weight a LoRA may change in this model).
 * Throws `ModelError`: the safetensors reader's codes (NOT_SAFETENSORS, TRUNCATED_FILE, …, MODEL_NOT_FOUND),
 * UNKNOWN_LORA_FORMAT, LORA_BASE_MISMATCH, UNSUPPORTED_LORA (DoRA, only unsupported kinds, NaN/Inf values),
 * MISSING_TENSOR, SHAPE_MISMATCH, UNSUPPORTED_DTYPE (corrupt modules), BAD_CONFIG (unreadable PEFT config).
 */
export function loadLora(file: string, targets: readonly LoraTarget[], options: LoadLoraOptions = {}): LoadedLora {
  const st = SafetensorsFile.open(file);
  try {
    const header = new Map<string, LoraTensorInfo>();
    for (const [key, t] of st.tensors) header.set(key, { shape: t.shape, dtype: t.dtype });
    const detected = detectLoraScheme(header, file);
    const plan = matchLoraModules(detected, targets, { ...(options.ldmModuleMap === undefined ? {} : { ldmModuleMap: options.ldmModuleMap }), metadata: st.metadata });

    const shapes: FactorShapes = { source: file, shapeOf: (key) => st.info(key).shape };
    const values: FactorValues = { read: (key) => readFactor(st, key), scalar: (key) => readScalar(st, key) };
    const usesPeftNames = plan.planned.some((p) => p.module.scheme === 'peft' || p.module.scheme === 'diffusers');
    const peft = usesPeftNames ? readPeftConfig(file, st.metadata) : undefined;
    const modules = plan.planned.map((p): LoraModule => ({
      component: p.target.component,
      module: p.target.module,
      delta: buildDelta(p, shapes, values, peft),
      sourceKeys: [...p.module.parts.values()],
    }));

    return {
      path: file,
      name: path.basename(file, path.extname(file)),
      format: plan.format,
      modules,
      coverage: {
        totalModulesInFile: plan.totalModulesInFile,
        matched: plan.planned.length,
        unmatched: plan.unmatched,
        ignoredKeys: plan.ignoredKeys,
        targetedComponents: plan.targetedComponents,
      },
      metadata: st.metadata,
      needsMergedWeights: modules.some((m) => m.delta.kind === 'full'),
    };
  } finally {
    st.close();
  }
}

function buildDelta(p: PlannedModule, shapes: FactorShapes, values: FactorValues, peft: PeftConfig | undefined): ModuleDelta {
  const m = p.module;
  const target = p.target.weightShape;
  const alphaKey = m.parts.get('alpha');
  const alpha = alphaKey === undefined ? undefined : values.scalar(alphaKey);
  switch (m.family) {
    case 'lora': {
      const rank = m.implied!.rank!;
      let scale = alphaScale(alpha, rank);
      if (alphaKey === undefined && peft !== undefined && m.address.kind === 'dotted') {
        scale = peft.scaleFor(m.address.component, m.address.module, rank) ?? scale;
      }
      return buildLora(m, shapes, values, target, scale);
    }
    case 'loha':
      return buildLoha(m, shapes, values, target, alphaScale(alpha, m.implied!.rank!));
    case 'lokr':
      return buildLokr(m, shapes, values, target, alpha);
    case 'full':
      return buildFull(m, shapes, values, target);
    case 'dora':
    case 'ia3':
    case 'norm':
    case 'oft':
    case 'glora':
    case 'bias-diff':
      // matchLoraModules never plans these (DoRA refuses the file, the others are coverage entries).
      throw new Error(`loadLora: ${m.name} (${m.family}) was planned`);
  }
}

/** A factor as float32, refusing NaN and ±Inf (a diverged training run or a broken conversion). */
function readFactor(st: SafetensorsFile, key: string): Float32Array {
  const data = st.readFloat32(key).data;
  for (let i = 0; i < data.length; i++) {
    if (!Number.isFinite(data[i]!)) {
      throw loraError(
        'UNSUPPORTED_LORA',
        st.path,
        `tensor \`${key}\` contains ${data[i]} (at index ${i}). The LoRA is corrupt (its training diverged or a conversion broke it); Chorus will not apply it. Use another epoch or re-export the file.`,
        { key, index: i, reason: 'non-finite' },
      );
    }
  }
  return data;
}

function readScalar(st: SafetensorsFile, key: string): number {
  return readFactor(st, key)[0]!;
}
