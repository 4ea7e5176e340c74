/**
 * Match a LoRA file's modules (from `detectLoraScheme`) to the weights of THIS model (`LoraTarget`s), from
 * names and shapes alone, and decide whether the file applies at all.
 *
 * Names: kohya's are the diffusers module path with `.` → `_` behind `lora_unet_` / `lora_te_`, so the
 * lookup is built from the targets (`'lora_unet_' + module.replaceAll('.', '_')`), never by guessing which
 * underscores were dots. SGM/compvis names go through the caller's LDM module map the same way. PEFT and
 * diffusers names are module paths already.
 *
 * Refusals (`ModelError`):
 * - LORA_BASE_MISMATCH: keys of another family (SDXL's second text encoder, FLUX/SD3 blocks); a
 *   cross-attention or text-encoder width that differs from this model's; or most modules not fitting
 *   (a LoRA is never applied half-way without the user seeing it: a few misfits are coverage entries,
 *   a majority refuses the file);
 * - UNKNOWN_LORA_FORMAT: most keys follow no known scheme;
 * - UNSUPPORTED_LORA: DoRA modules (the weight-norm rescale is not implemented), or nothing but kinds
 *   Chorus does not apply ((IA)³, OFT, GLoRA, norm or bias diffs).
 */
import { fitsTarget, fmt, loraError } from './adapters/common.ts';
import type { ForeignFamily } from './keys.ts';
import { LDM_FLAT_NAME } from './keys.ts';
import { FAMILY_LABEL, componentsOf, type DetectedScheme, type FileModule, type KeyNote, type LoraFormat, type WidthEvidence } from './scheme.ts';
import type { LoraComponent, LoraTarget } from './types.ts';

/** LDM (SGM/compvis) layer path with dots, e.g. `input_blocks.1.1.proj_in` → the diffusers layer. */
export type LdmModuleMap = ReadonlyMap<string, { readonly component: LoraComponent; readonly module: string }>;

export interface MatchOptions {
  readonly ldmModuleMap?: LdmModuleMap;
  /** The file's `__metadata__`, only to say more in a base-mismatch message. */
  readonly metadata?: Readonly<Record<string, string>>;
}

export type UnmatchedCause =
  /** The model has no layer by that name. */
  | 'no-such-layer'
  /** An SGM/compvis (LDM) kohya name, and no LDM module map was given to resolve it. */
  | 'unresolved-ldm-name'
  /** The layer exists but ΔW has another shape. */
  | 'shape-differs'
  /** A module kind Chorus recognises but does not apply ((IA)³, OFT, GLoRA, norm, bias diff, embeddings). */
  | 'unsupported-kind'
  /** A key that follows no known scheme. */
  | 'unrecognised-key'
  /** A second module for a layer the file already patches. */
  | 'duplicate';

export interface UnmatchedModule extends KeyNote {
  readonly cause: UnmatchedCause;
}

export interface PlannedModule {
  readonly module: FileModule;
  readonly target: LoraTarget;
}

export interface LoraPlan {
  readonly source: string;
  readonly format: LoraFormat;
  readonly planned: readonly PlannedModule[];
  /** Every file module (or unrecognised key) that will not be applied, with why. */
  readonly unmatched: readonly UnmatchedModule[];
  /** Keys of applied modules that are not applied themselves (`diff_b`, …). */
  readonly ignoredKeys: readonly KeyNote[];
  /** planned.length + unmatched.length. */
  readonly totalModulesInFile: number;
  readonly targetedComponents: readonly LoraComponent[];
}

/** Which base model a file or a model is, as far as names and widths tell. */
type BaseFamily = 'sd1' | 'sd2' | 'sdxl' | ForeignFamily;

const BASE_LABEL: Readonly<Record<BaseFamily, string>> = {
  sd1: 'an SD 1.x LoRA',
  sd2: 'an SD 2.x LoRA',
  sdxl: 'an SDXL LoRA',
  flux: 'a FLUX.1 LoRA',
  sd3: 'an SD3 LoRA',
  dit: 'a LoRA for a transformer (DiT) model such as FLUX.1 or SD3',
};

/** Cross-attention input width = the text encoder's hidden size (SD 1.x CLIP-L 768, SD 2.x OpenCLIP-H 1024, SDXL 768+1280). */
const FAMILY_OF_CROSS_WIDTH: ReadonlyMap<number, BaseFamily> = new Map([
  [768, 'sd1'],
  [1024, 'sd2'],
  [2048, 'sdxl'],
]);
const FAMILY_OF_TEXT_WIDTH: ReadonlyMap<number, BaseFamily> = new Map([
  [768, 'sd1'],
  [1024, 'sd2'],
]);
/** How a model (not a LoRA) of a family is named in messages; Chorus models are UNet + one CLIP. */
const MODEL_LABEL: ReadonlyMap<BaseFamily, string> = new Map([
  ['sd1', 'SD 1.x'],
  ['sd2', 'SD 2.x'],
]);

function modelLabel(width: number, families: ReadonlyMap<number, BaseFamily>): string | undefined {
  const family = families.get(width);
  return family === undefined ? undefined : MODEL_LABEL.get(family);
}

/** Metadata that names the base model (kohya, SAI ModelSpec); quoted in messages, never decisive. */
const BASE_METADATA_KEYS = ['ss_base_model_version', 'ss_v2', 'modelspec.architecture', 'ss_sd_model_name'] as const;

const MODEL_CROSS_ATTENTION = /(?:^|\.)attn2\.to_k$/;
const MODEL_TEXT_QKV = /(?:^|\.)self_attn\.q_proj$/;

function flatName(component: LoraComponent, module: string): string {
  return `${component === 'unet' ? 'lora_unet' : 'lora_te'}_${module.replaceAll('.', '_')}`;
}

function targetId(component: LoraComponent, module: string): string {
  return `${component}:${module}`;
}

/** Index targets by dotted id and by kohya flat name (diffusers and, with the map, LDM spellings). */
function indexTargets(targets: readonly LoraTarget[], ldm: LdmModuleMap | undefined) {
  const dotted = new Map<string, LoraTarget>();
  const flat = new Map<string, LoraTarget>();
  const claim = (name: string, t: LoraTarget): void => {
    const other = flat.get(name);
    // Two layers flattening to one kohya name would make kohya's own scheme ambiguous: a bug in the targets.
    if (other !== undefined && other !== t) throw new Error(`loraTargets: ${other.module} and ${t.module} both flatten to ${name}`);
    flat.set(name, t);
  };
  for (const t of targets) {
    dotted.set(targetId(t.component, t.module), t);
    claim(flatName(t.component, t.module), t);
  }
  if (ldm !== undefined) {
    for (const [ldmPath, { component, module }] of ldm) {
      const t = dotted.get(targetId(component, module));
      if (t !== undefined) claim(flatName(component, ldmPath), t);
    }
  }
  return { dotted, flat };
}

function commonestTargetWidth(targets: readonly LoraTarget[], pattern: RegExp, component: LoraComponent): number | undefined {
  const counts = new Map<number, number>();
  for (const t of targets) {
    if (t.component === component && pattern.test(t.module) && t.weightShape[1] !== undefined) counts.set(t.weightShape[1], (counts.get(t.weightShape[1]) ?? 0) + 1);
  }
  let best: [number, number] | undefined;
  for (const e of counts) if (best === undefined || e[1] > best[1]) best = e;
  return best?.[0];
}

function metadataNote(metadata: Readonly<Record<string, string>> | undefined): string {
  if (metadata === undefined) return '';
  const said = BASE_METADATA_KEYS.filter((k) => metadata[k] !== undefined).map((k) => `${k} = ${metadata[k]}`);
  return said.length === 0 ? '' : `; its metadata says ${said.join(', ')}`;
}

function modelPhrase(crossWidth: number | undefined, textWidth: number | undefined): string {
  if (crossWidth !== undefined) {
    const label = modelLabel(crossWidth, FAMILY_OF_CROSS_WIDTH);
    return label !== undefined ? `this model is ${label} (${crossWidth}-wide cross-attention)` : `this model's cross-attention takes ${crossWidth}-wide text embeddings`;
  }
  if (textWidth !== undefined) {
    const label = modelLabel(textWidth, FAMILY_OF_TEXT_WIDTH);
    return label !== undefined ? `this model is ${label} (${textWidth}-wide text encoder)` : `this model's text encoder is ${textWidth} wide`;
  }
  return 'this model has no layer of that kind';
}

function baseMismatch(
  d: DetectedScheme,
  family: BaseFamily | undefined,
  evidence: string,
  model: string,
  options: MatchOptions,
  details: Record<string, unknown>,
): Error {
  const what = family !== undefined ? BASE_LABEL[family] : 'a LoRA for a different base model';
  return loraError(
    'LORA_BASE_MISMATCH',
    d.source,
    `this is ${what} (${evidence}${metadataNote(options.metadata)}); ${model}. A LoRA only applies to the base model family it was trained on: pick one made for this model.`,
    { loraBase: family ?? 'unknown', ...details },
  );
}

function checkWidth(
  d: DetectedScheme,
  file: WidthEvidence | undefined,
  modelWidth: number | undefined,
  families: ReadonlyMap<number, BaseFamily>,
  layer: string,
  model: string,
  options: MatchOptions,
): void {
  if (file === undefined || modelWidth === undefined || file.width === modelWidth) return;
  const more = file.count > 1 ? `, as do ${file.count - 1} more` : '';
  const evidence = `its ${layer} \`${file.module}\` takes ${file.width}-wide inputs${more}`;
  throw baseMismatch(d, families.get(file.width), evidence, model, options, { key: file.module, found: file.width, expected: modelWidth });
}

/** Plan which file modules apply to which targets. Throws as the module comment says. */
export function matchLoraModules(d: DetectedScheme, targets: readonly LoraTarget[], options: MatchOptions = {}): LoraPlan {
  const modelCross = commonestTargetWidth(targets, MODEL_CROSS_ATTENTION, 'unet');
  const modelText = commonestTargetWidth(targets, MODEL_TEXT_QKV, 'text_encoder');
  const model = modelPhrase(modelCross, modelText);

  // 1. Whole-file verdicts: another model family, by key names first, then by widths.
  if (d.foreign !== undefined) {
    throw baseMismatch(d, d.foreign.family, `keys like \`${d.foreign.key}\``, model, options, { key: d.foreign.key });
  }
  checkWidth(d, d.crossAttentionWidth, modelCross, FAMILY_OF_CROSS_WIDTH, 'cross-attention layer', model, options);
  checkWidth(d, d.textEncoderWidth, modelText, FAMILY_OF_TEXT_WIDTH, 'text-encoder attention layer', model, options);
  const dora = d.modules.find((m) => m.family === 'dora');
  if (dora !== undefined) {
    throw loraError(
      'UNSUPPORTED_LORA',
      d.source,
      `this is a DoRA (weight-decomposed LoRA; module \`${dora.name}\` has \`${dora.parts.get('dora_scale')}\`). Chorus does not support DoRA yet: its magnitude rescale needs the base weight's norm at merge time. Use a plain LoRA/LoCon/LyCORIS export of it.`,
      { key: dora.parts.get('dora_scale'), kind: 'dora' },
    );
  }

  // 2. Module by module.
  const { dotted, flat } = indexTargets(targets, options.ldmModuleMap);
  const planned: PlannedModule[] = [];
  const unmatched: UnmatchedModule[] = [];
  const ignoredKeys: KeyNote[] = [];
  const claimedBy = new Map<LoraTarget, string>();
  for (const m of d.modules) {
    if (m.implied === undefined) {
      unmatched.push({ key: m.name, cause: 'unsupported-kind', reason: `${FAMILY_LABEL[m.family]} module: Chorus does not apply this kind` });
      continue;
    }
    const target = m.address.kind === 'dotted' ? dotted.get(targetId(m.address.component, m.address.module)) : flat.get(m.address.stem);
    if (target === undefined) {
      if (m.address.kind === 'flat' && LDM_FLAT_NAME.test(m.address.stem) && options.ldmModuleMap === undefined) {
        unmatched.push({ key: m.name, cause: 'unresolved-ldm-name', reason: 'SGM/compvis (LDM) module name, and no LDM module map was given to resolve it' });
      } else {
        unmatched.push({ key: m.name, cause: 'no-such-layer', reason: `no such layer in this model's ${m.address.component === 'unet' ? 'UNet' : 'text encoder'}` });
      }
      continue;
    }
    if (!fitsTarget(m.implied.shape, target.weightShape)) {
      unmatched.push({ key: m.name, cause: 'shape-differs', reason: `ΔW ${fmt(m.implied.shape)} does not fit \`${target.module}\` ${fmt(target.weightShape)}` });
      continue;
    }
    const first = claimedBy.get(target);
    if (first !== undefined) {
      unmatched.push({ key: m.name, cause: 'duplicate', reason: `\`${first}\` already patches \`${target.module}\`` });
      continue;
    }
    claimedBy.set(target, m.name);
    planned.push({ module: m, target });
    ignoredKeys.push(...m.ignored);
  }
  for (const key of d.unknownKeys) unmatched.push({ key, cause: 'unrecognised-key', reason: 'follows no LoRA naming scheme Chorus knows' });
  for (const key of d.embeddingKeys) unmatched.push({ key, cause: 'unsupported-kind', reason: 'bundled textual-inversion embedding: not loaded' });

  // 3. A LoRA applies only when most of it fits.
  const misfits = unmatched.filter((u) => u.cause === 'no-such-layer' || u.cause === 'shape-differs' || u.cause === 'unresolved-ldm-name');
  const unknown = unmatched.filter((u) => u.cause === 'unrecognised-key');
  if (planned.length === 0 || misfits.length + unknown.length > planned.length) refuse(d, planned.length, unmatched, misfits, unknown, model, options);

  return {
    source: d.source,
    format: d.format,
    planned,
    unmatched,
    ignoredKeys,
    totalModulesInFile: planned.length + unmatched.length,
    targetedComponents: componentsOf(planned.map((p) => p.target)),
  };
}

function refuse(
  d: DetectedScheme,
  matched: number,
  unmatched: readonly UnmatchedModule[],
  misfits: readonly UnmatchedModule[],
  unknown: readonly UnmatchedModule[],
  model: string,
  options: MatchOptions,
): never {
  const total = matched + unmatched.length;
  if (misfits.length + unknown.length === 0) {
    const kinds = [...new Set(d.modules.filter((m) => m.implied === undefined).map((m) => FAMILY_LABEL[m.family]))];
    const first = unmatched[0]!;
    throw loraError('UNSUPPORTED_LORA', d.source, `it holds only module kinds Chorus does not apply (${kinds.join(', ') || 'embeddings'}; e.g. \`${first.key}\`).`, { key: first.key, kinds });
  }
  if (unknown.length > misfits.length) {
    const sample = unknown.slice(0, 3).map((u) => `\`${u.key}\``).join(', ');
    throw loraError(
      'UNKNOWN_LORA_FORMAT',
      d.source,
      `${unknown.length} of its ${total} entries follow no LoRA naming scheme Chorus knows (e.g. ${sample}); only ${matched} modules could be matched. Chorus does not apply part of a LoRA it cannot read.`,
      { key: unknown[0]!.key, unknown: unknown.length, matched },
    );
  }
  const unresolved = misfits.filter((u) => u.cause === 'unresolved-ldm-name');
  if (unresolved.length * 2 > misfits.length) {
    throw loraError(
      'UNKNOWN_LORA_FORMAT',
      d.source,
      `${unresolved.length} of its ${total} modules use SGM/compvis (LDM) UNet names (e.g. \`${unresolved[0]!.key}\`) and no LDM module map was given to resolve them, so only ${matched} could be matched. Load it with the model's LDM module map (\`ldmModuleMap\`).`,
      { key: unresolved[0]!.key, unresolved: unresolved.length, matched },
    );
  }
  const first = misfits[0]!;
  const family = d.crossAttentionWidth !== undefined ? FAMILY_OF_CROSS_WIDTH.get(d.crossAttentionWidth.width) : undefined;
  const what = family !== undefined ? BASE_LABEL[family] : 'a LoRA for a different base model';
  throw loraError(
    'LORA_BASE_MISMATCH',
    d.source,
    `${misfits.length} of its ${total} modules do not fit this model (e.g. \`${first.key}\`: ${first.reason}) and only ${matched} do: it looks like ${what}${metadataNote(options.metadata)}; ${model}. Chorus does not apply a LoRA half-way; pick one made for this model.`,
    { key: first.key, misfits: misfits.length, matched, loraBase: family ?? 'unknown' },
  );
}
