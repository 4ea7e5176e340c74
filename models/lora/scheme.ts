/**
 * What a LoRA file is, from its tensor names and shapes alone (no values, no model): the naming scheme,
 * the modules with their adapter family (LoRA, LoHa, LoKr, full diff, or a kind Chorus does not apply),
 * the ΔW shape each module implies, and the evidence for which base model it was trained on.
 *
 * Runs on a safetensors header or on a header description (InvokeAI's stripped-model JSON), so the
 * same code decides for a file on disk and for test data without weights.
 *
 * Rejects (`ModelError`): UNKNOWN_LORA_FORMAT (cloneofsimo positional keys, no known scheme, factors of two
 * families in one module, a factor stored twice), MISSING_TENSOR (one half of a pair), SHAPE_MISMATCH
 * (factors that disagree, zero rank), UNSUPPORTED_DTYPE (integer or bool factors).
 */
import type { DType } from '../tensor.ts';
import { fmt, loraError, type FactorShapes, type ImpliedShape, type ModuleFactors } from './adapters/common.ts';
import { fullWeightShape } from './adapters/full.ts';
import { lohaWeightShape } from './adapters/loha.ts';
import { lokrWeightShape } from './adapters/lokr.ts';
import { loraWeightShape } from './adapters/lora.ts';
import {
  LDM_FLAT_NAME,
  POSITIONAL_KEY,
  TOKEN_EMBEDDING_KEY,
  parseLoraKey,
  type ForeignFamily,
  type ModuleAddress,
  type NamingScheme,
  type PartName,
} from './keys.ts';
import type { LoraComponent } from './types.ts';

export type LoraFormat =
  | 'kohya'
  /** kohya keys with SGM/compvis module names (`lora_unet_input_blocks_1_1_proj_in`). */
  | 'kohya-ldm'
  | 'peft'
  /** diffusers 0.21–0.24: `unet.X.lora.down.weight`. */
  | 'diffusers'
  | 'diffusers-attnproc'
  | 'lycoris-loha'
  | 'lycoris-lokr'
  | 'lycoris-full'
  | 'mixed';

/** A module's naming scheme, with kohya's LDM-named modules told apart. */
export type ModuleScheme = NamingScheme | 'kohya-ldm';

/** Families Chorus turns into a `ModuleDelta`. */
export type AdapterFamily = 'lora' | 'loha' | 'lokr' | 'full';
/** Families it recognises but does not apply (a coverage entry each; DoRA refuses the file). */
export type UnsupportedFamily = 'dora' | 'ia3' | 'norm' | 'oft' | 'glora' | 'bias-diff';

/** The part of a tensor header detection reads. `dtype` is checked when given. */
export interface LoraTensorInfo {
  readonly shape: readonly number[];
  readonly dtype?: DType;
}

export interface KeyNote {
  readonly key: string;
  readonly reason: string;
}

export interface FileModule extends ModuleFactors {
  readonly address: ModuleAddress;
  readonly scheme: ModuleScheme;
  readonly family: AdapterFamily | UnsupportedFamily;
  /** For applicable families: the ΔW shape the factors make and the rank alpha divides by. */
  readonly implied: ImpliedShape | undefined;
  /** Keys of this module that are read but not applied (`diff_b`, …), with why. */
  readonly ignored: readonly KeyNote[];
}

/** Widths that tell the base model: cross-attention input (attn2 to_k/to_v) and text-encoder hidden size. */
export interface WidthEvidence {
  readonly width: number;
  /** One module that shows it (file naming). */
  readonly module: string;
  readonly count: number;
}

export interface DetectedScheme {
  /** The file (or a label), for messages. */
  readonly source: string;
  readonly format: LoraFormat;
  readonly modules: readonly FileModule[];
  /** Keys that follow no scheme Chorus knows. */
  readonly unknownKeys: readonly string[];
  /** Bundled textual-inversion embeddings (`bundle_emb.*`): recognised, not loaded. */
  readonly embeddingKeys: readonly string[];
  /** Set when key names belong to another model family (SDXL, FLUX, SD3): the first such key. */
  readonly foreign: { readonly family: ForeignFamily; readonly key: string } | undefined;
  readonly crossAttentionWidth: WidthEvidence | undefined;
  readonly textEncoderWidth: WidthEvidence | undefined;
}

const FAMILY_OF_PART: Readonly<Partial<Record<PartName, AdapterFamily | UnsupportedFamily>>> = {
  lora_down: 'lora',
  lora_up: 'lora',
  lora_mid: 'lora',
  hada_w1_a: 'loha',
  hada_w1_b: 'loha',
  hada_w2_a: 'loha',
  hada_w2_b: 'loha',
  hada_t1: 'loha',
  hada_t2: 'loha',
  lokr_w1: 'lokr',
  lokr_w1_a: 'lokr',
  lokr_w1_b: 'lokr',
  lokr_w2: 'lokr',
  lokr_w2_a: 'lokr',
  lokr_w2_b: 'lokr',
  lokr_t2: 'lokr',
  diff: 'full',
  dora_scale: 'dora',
  ia3_weight: 'ia3',
  ia3_on_input: 'ia3',
  w_norm: 'norm',
  b_norm: 'norm',
  oft_blocks: 'oft',
  oft_diag: 'oft',
  glora_a1: 'glora',
  glora_a2: 'glora',
  glora_b1: 'glora',
  glora_b2: 'glora',
};

/** Parts read with the module but never applied, and why. */
const IGNORED_PARTS: Readonly<Partial<Record<PartName, string>>> = {
  diff_b: 'bias diff: Chorus applies weight deltas only',
  lokr_t1: 'lokr_t1 is not part of LyCORIS LoKr (only lokr_t2 is used)',
};

export const FAMILY_LABEL: Readonly<Record<AdapterFamily | UnsupportedFamily, string>> = {
  lora: 'LoRA',
  loha: 'LoHa',
  lokr: 'LoKr',
  full: 'full diff',
  dora: 'DoRA',
  ia3: '(IA)³',
  norm: 'LyCORIS norm',
  oft: 'OFT',
  glora: 'GLoRA',
  'bias-diff': 'bias-only diff',
};

const FLOAT_DTYPES: ReadonlySet<DType> = new Set(['float32', 'float16', 'bfloat16', 'float64', 'float8_e4m3fn', 'float8_e5m2']);
const SCALAR_DTYPES: ReadonlySet<DType> = new Set([...FLOAT_DTYPES, 'int64', 'int32', 'int16', 'int8', 'uint8']);

const CROSS_ATTENTION_KV = /attn2[._]to_[kv]$/;
const TEXT_ENCODER_QKV = /self_attn[._][qkv]_proj$/;

interface Group {
  address: ModuleAddress;
  name: string;
  scheme: NamingScheme | undefined;
  parts: Map<PartName, string>;
}

function groupId(a: ModuleAddress): string {
  return a.kind === 'flat' ? a.stem : `${a.component}:${a.module}`;
}

function displayName(a: ModuleAddress): string {
  return a.kind === 'flat' ? a.stem : `${a.component}.${a.module}`;
}

/**
 * Name, group and check the modules of a LoRA file from its header (`keys`: tensor name → shape and,
 * optionally, dtype). `source` names the file in messages. Throws as the module comment says.
 */
export function detectLoraScheme(keys: ReadonlyMap<string, LoraTensorInfo>, source = 'LoRA'): DetectedScheme {
  rejectPositional(keys, source);

  const groups = new Map<string, Group>();
  const unknownKeys: string[] = [];
  const embeddingKeys: string[] = [];
  let foreign: DetectedScheme['foreign'];
  for (const key of keys.keys()) {
    const parsed = parseLoraKey(key);
    switch (parsed.kind) {
      case 'unknown':
        unknownKeys.push(key);
        continue;
      case 'embedding':
        embeddingKeys.push(key);
        continue;
      case 'foreign':
        foreign ??= { family: parsed.family, key };
        continue;
      case 'factor': {
        const id = groupId(parsed.address);
        let g = groups.get(id);
        if (g === undefined) {
          g = { address: parsed.address, name: displayName(parsed.address), scheme: undefined, parts: new Map() };
          groups.set(id, g);
        }
        const existing = g.parts.get(parsed.part);
        if (existing !== undefined) {
          throw loraError('UNKNOWN_LORA_FORMAT', source, `\`${existing}\` and \`${key}\` both hold the ${parsed.part} factor of module \`${g.name}\`; Chorus cannot tell which one applies.`, { keys: [existing, key] });
        }
        g.parts.set(parsed.part, key);
        if (parsed.scheme !== undefined) g.scheme ??= parsed.scheme;
        continue;
      }
    }
  }

  if (groups.size === 0 && foreign === undefined) {
    const sample = [...keys.keys()].slice(0, 3).map((k) => `\`${k}\``).join(', ');
    throw loraError(
      'UNKNOWN_LORA_FORMAT',
      source,
      `none of its ${keys.size} tensors follows a LoRA naming scheme Chorus knows (kohya \`lora_unet_…\`/\`lora_te_…\`, PEFT \`….lora_A.weight\`, diffusers \`….lora.down.weight\`, LyCORIS). First keys: ${sample || '(none)'}. It may not be a LoRA at all (a textual-inversion embedding, a hypernetwork or a checkpoint).`,
      { firstKeys: [...keys.keys()].slice(0, 5) },
    );
  }

  const shapes: FactorShapes = {
    source,
    shapeOf: (key) => {
      const info = keys.get(key);
      if (info === undefined) throw new Error(`detectLoraScheme: ${key} is not in the header`);
      return info.shape;
    },
  };
  const modules = [...groups.values()].map((g) => checkedModule(g, keys, shapes));
  return {
    source,
    format: formatOf(modules),
    modules,
    unknownKeys,
    embeddingKeys,
    foreign,
    crossAttentionWidth: commonestWidth(modules.filter((m) => CROSS_ATTENTION_KV.test(moduleTail(m)))),
    textEncoderWidth: commonestWidth(modules.filter((m) => m.address.component === 'text_encoder' && TEXT_ENCODER_QKV.test(moduleTail(m)))),
  };
}

function rejectPositional(keys: ReadonlyMap<string, LoraTensorInfo>, source: string): void {
  const names = [...keys.keys()];
  const positional = names.find((k) => POSITIONAL_KEY.test(k));
  const tokens = names.filter((k) => TOKEN_EMBEDDING_KEY.test(k));
  if (positional === undefined && tokens.length === 0) return;
  const tokenNote = tokens.length > 0 ? ` It also carries pivotal-tuning token embeddings (${tokens.map((t) => `\`${t}\``).join(', ')}), which Chorus does not load.` : '';
  if (positional !== undefined) {
    throw loraError(
      'UNKNOWN_LORA_FORMAT',
      source,
      `this is a cloneofsimo \`lora_diffusion\` file (keys like \`${positional}\`): its modules are numbered by their position in that tool's module walk, not named, so they cannot be matched to this model's layers with certainty.${tokenNote} Convert it to the kohya or diffusers format (for example with the conversion scripts of cloneofsimo/lora or kohya sd-scripts) and load that.`,
      { key: positional, tokens },
    );
  }
  throw loraError('UNKNOWN_LORA_FORMAT', source, `it holds token embeddings (${tokens.map((t) => `\`${t}\``).join(', ')}) in the cloneofsimo format and no LoRA modules. Load it as a textual-inversion embedding instead.`, { tokens });
}

function checkedModule(g: Group, keys: ReadonlyMap<string, LoraTensorInfo>, shapes: FactorShapes): FileModule {
  const families = new Set<AdapterFamily | UnsupportedFamily>();
  const ignored: KeyNote[] = [];
  for (const [part, key] of g.parts) {
    const family = FAMILY_OF_PART[part];
    if (family !== undefined) families.add(family);
    const why = IGNORED_PARTS[part];
    if (why !== undefined) ignored.push({ key, reason: why });
    checkDtype(part, key, keys.get(key)!, shapes.source);
  }
  // DoRA rides on a LoRA/LoHa/LoKr: the magnitude vector decides the family.
  if (families.has('dora')) {
    families.clear();
    families.add('dora');
  }
  if (families.size > 1) {
    const labels = [...families].map((f) => FAMILY_LABEL[f]).join(' and ');
    throw loraError('UNKNOWN_LORA_FORMAT', shapes.source, `module \`${g.name}\` mixes ${labels} factors (${[...g.parts.values()].map((k) => `\`${k}\``).join(', ')}); Chorus cannot tell how to combine them.`, { key: g.name });
  }
  let family = [...families][0];
  if (family === undefined) {
    if (g.parts.has('diff_b')) {
      family = 'bias-diff';
      ignored.length = 0;
    } else {
      const have = [...g.parts.values()].map((k) => `\`${k}\``).join(', ');
      throw loraError('MISSING_TENSOR', shapes.source, `module \`${g.name}\` has no factors, only ${have}. The file is incomplete; re-export it.`, { key: g.name });
    }
  }
  if (family === 'full' && g.parts.has('alpha')) ignored.push({ key: g.parts.get('alpha')!, reason: 'full diffs take no alpha' });
  const factors: ModuleFactors = { name: g.name, parts: g.parts };
  const implied = impliedShape(family, factors, shapes);
  const scheme: ModuleScheme =
    g.address.kind === 'flat' ? (LDM_FLAT_NAME.test(g.address.stem) ? 'kohya-ldm' : 'kohya') : (g.scheme ?? 'peft');
  return { ...factors, address: g.address, scheme, family, implied, ignored };
}

function impliedShape(family: AdapterFamily | UnsupportedFamily, f: ModuleFactors, shapes: FactorShapes): ImpliedShape | undefined {
  switch (family) {
    case 'lora':
      return loraWeightShape(f, shapes);
    case 'loha':
      return lohaWeightShape(f, shapes);
    case 'lokr':
      return lokrWeightShape(f, shapes);
    case 'full':
      return fullWeightShape(f, shapes);
    case 'dora':
    case 'ia3':
    case 'norm':
    case 'oft':
    case 'glora':
    case 'bias-diff':
      return undefined;
  }
}

function checkDtype(part: PartName, key: string, info: LoraTensorInfo, source: string): void {
  if (info.dtype === undefined) return;
  if (part === 'alpha') {
    if (!SCALAR_DTYPES.has(info.dtype)) {
      throw loraError('UNSUPPORTED_DTYPE', source, `\`${key}\` (alpha) has dtype ${info.dtype}; alpha is a number.`, { key, dtype: info.dtype });
    }
    if (info.shape.reduce((a, b) => a * b, 1) !== 1) {
      throw loraError('SHAPE_MISMATCH', source, `\`${key}\` (alpha) has shape ${fmt(info.shape)}; alpha is a single number.`, { key, shape: info.shape });
    }
    return;
  }
  if (part === 'ia3_on_input') return;
  if (!FLOAT_DTYPES.has(info.dtype)) {
    throw loraError('UNSUPPORTED_DTYPE', source, `\`${key}\` has dtype ${info.dtype}; LoRA factors are floating point (F32, F16, BF16). The file is corrupt or not a LoRA.`, { key, dtype: info.dtype });
  }
}

/** The module path's last part as the file spells it (flat or dotted), for width evidence. */
function moduleTail(m: FileModule): string {
  return m.address.kind === 'flat' ? m.address.stem : m.address.module;
}

function commonestWidth(modules: readonly FileModule[]): WidthEvidence | undefined {
  const counts = new Map<number, { module: string; count: number }>();
  for (const m of modules) {
    const width = m.implied?.shape[1];
    if (width === undefined) continue;
    const c = counts.get(width);
    if (c === undefined) counts.set(width, { module: m.name, count: 1 });
    else c.count++;
  }
  let best: WidthEvidence | undefined;
  for (const [width, { module, count }] of counts) if (best === undefined || count > best.count) best = { width, module, count };
  return best;
}

/** The file's format: one scheme and one applicable family, else `mixed`. */
export function formatOf(modules: readonly Pick<FileModule, 'scheme' | 'family'>[]): LoraFormat {
  const families = new Set(modules.map((m) => m.family).filter((f): f is AdapterFamily => f === 'lora' || f === 'loha' || f === 'lokr' || f === 'full'));
  const schemes = new Set(modules.map((m) => m.scheme));
  if (families.size > 1) return 'mixed';
  switch ([...families][0]) {
    case 'loha':
      return 'lycoris-loha';
    case 'lokr':
      return 'lycoris-lokr';
    case 'full':
      return 'lycoris-full';
    case 'lora':
    case undefined:
      break;
  }
  // A kohya file with LDM UNet names keeps its text encoder under kohya's (transformers) names.
  if (schemes.has('kohya-ldm') && [...schemes].every((s) => s === 'kohya' || s === 'kohya-ldm')) return 'kohya-ldm';
  if (schemes.size === 1) return [...schemes][0]!;
  return 'mixed';
}

/** Every component a set of modules addresses. */
export function componentsOf(modules: readonly { readonly component: LoraComponent }[]): LoraComponent[] {
  const order: readonly LoraComponent[] = ['unet', 'text_encoder'];
  return order.filter((c) => modules.some((m) => m.component === c));
}
