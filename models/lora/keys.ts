/**
 * LoRA tensor names: which naming scheme a key follows, which module it belongs to, and which
 * factor of that module it holds (CONVENTIONS.md 2.5–2.7). Pure string work, no shapes.
 *
 * Schemes (module path = the diffusers layer path, e.g. `down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`):
 * - kohya (sd-scripts `networks/lora.py`, LyCORIS' kohya wrapper): `lora_unet_<path with . → _>.<suffix>`,
 *   `lora_te_<…>`; the stem before the first `.` is the module name and never contains a dot. Some files
 *   use SGM/compvis paths instead (`lora_unet_input_blocks_1_1_proj_in`): same keys, resolved later
 *   through the caller's LDM module map.
 * - PEFT (diffusers ≥ 0.25): `unet.<path>.lora_A.weight` / `lora_B.weight` (optionally `lora_A.<adapter>.weight`),
 *   `text_encoder.<path>…`, or `base_model.model.<path>…` as `peft.save_pretrained` writes it.
 * - diffusers 0.21–0.24: `unet.<path>.lora.down.weight` / `.lora.up.weight`,
 *   `text_encoder.<path>.lora_linear_layer.down.weight`.
 * - diffusers attention processors (< 0.21, `save_attn_procs`): `<attn path>.processor.to_q_lora.down.weight`,
 *   to_q/to_k/to_v/to_out (→ `to_out.0`); the text encoder's legacy form `self_attn.to_q_lora.down.weight` (→ `q_proj`).
 *
 * Keys of other model families (SDXL's second text encoder, FLUX/SD3 transformers) are recognised as
 * such so the caller can say what the file is for.
 */
import type { LoraComponent } from './types.ts';

export type NamingScheme = 'kohya' | 'peft' | 'diffusers' | 'diffusers-attnproc';

/** A model family other than SD 1.x/2.x, told by key names alone. */
export type ForeignFamily = 'sdxl' | 'flux' | 'sd3' | 'dit';

/**
 * One factor of a module, by its canonical name. PEFT `lora_A` / diffusers `down` are `lora_down`,
 * `lora_B` / `up` are `lora_up`; PEFT's DoRA `lora_magnitude_vector` is `dora_scale`.
 */
export type PartName =
  | 'lora_down'
  | 'lora_up'
  | 'lora_mid'
  | 'alpha'
  | 'dora_scale'
  | 'hada_w1_a'
  | 'hada_w1_b'
  | 'hada_w2_a'
  | 'hada_w2_b'
  | 'hada_t1'
  | 'hada_t2'
  | 'lokr_w1'
  | 'lokr_w1_a'
  | 'lokr_w1_b'
  | 'lokr_w2'
  | 'lokr_w2_a'
  | 'lokr_w2_b'
  | 'lokr_t1'
  | 'lokr_t2'
  | 'diff'
  | 'diff_b'
  | 'ia3_weight'
  | 'ia3_on_input'
  | 'w_norm'
  | 'b_norm'
  | 'oft_blocks'
  | 'oft_diag'
  | 'glora_a1'
  | 'glora_a2'
  | 'glora_b1'
  | 'glora_b2';

/** kohya suffixes (after the module stem's `.`) → part. LyCORIS writes its factors under the same stems. */
const KOHYA_SUFFIXES: ReadonlyMap<string, PartName> = new Map<string, PartName>([
  ['lora_down.weight', 'lora_down'],
  ['lora_up.weight', 'lora_up'],
  ['lora_mid.weight', 'lora_mid'],
  ['alpha', 'alpha'],
  ['dora_scale', 'dora_scale'],
  ['hada_w1_a', 'hada_w1_a'],
  ['hada_w1_b', 'hada_w1_b'],
  ['hada_w2_a', 'hada_w2_a'],
  ['hada_w2_b', 'hada_w2_b'],
  ['hada_t1', 'hada_t1'],
  ['hada_t2', 'hada_t2'],
  ['lokr_w1', 'lokr_w1'],
  ['lokr_w1_a', 'lokr_w1_a'],
  ['lokr_w1_b', 'lokr_w1_b'],
  ['lokr_w2', 'lokr_w2'],
  ['lokr_w2_a', 'lokr_w2_a'],
  ['lokr_w2_b', 'lokr_w2_b'],
  ['lokr_t1', 'lokr_t1'],
  ['lokr_t2', 'lokr_t2'],
  ['diff', 'diff'],
  ['diff_b', 'diff_b'],
  // (IA)³: the learned vector is stored as `weight`, `on_input` says which side it scales.
  ['weight', 'ia3_weight'],
  ['on_input', 'ia3_on_input'],
  ['w_norm', 'w_norm'],
  ['b_norm', 'b_norm'],
  ['oft_blocks', 'oft_blocks'],
  ['oft_diag', 'oft_diag'],
  ['a1.weight', 'glora_a1'],
  ['a2.weight', 'glora_a2'],
  ['b1.weight', 'glora_b1'],
  ['b2.weight', 'glora_b2'],
]);

/** Where the file puts a module. */
export type ModuleAddress =
  /** kohya: `prefix` + `_` + `name` is the stem; the name is a module path with `.` → `_` (diffusers or LDM). */
  | { readonly kind: 'flat'; readonly component: LoraComponent; readonly stem: string }
  /** PEFT / diffusers: the module path itself. */
  | { readonly kind: 'dotted'; readonly component: LoraComponent; readonly module: string };

export type ParsedKey =
  | {
      readonly kind: 'factor';
      readonly address: ModuleAddress;
      readonly part: PartName;
      /** Undefined for keys every dotted scheme shares (`<module>.alpha`). */
      readonly scheme: NamingScheme | undefined;
    }
  | { readonly kind: 'foreign'; readonly family: ForeignFamily }
  /** sd-scripts' bundled textual-inversion embeddings (`bundle_emb.<token>.…`). */
  | { readonly kind: 'embedding' }
  | { readonly kind: 'unknown' };

const KOHYA_PREFIXES: ReadonlyArray<readonly [string, LoraComponent | ForeignFamily]> = [
  ['lora_unet_', 'unet'],
  ['lora_te_', 'text_encoder'],
  // sd-scripts' SDXL (te1 = CLIP-L, te2 = OpenCLIP bigG) and SD3 (te3 = T5) text encoders.
  ['lora_te1_', 'sdxl'],
  ['lora_te2_', 'sdxl'],
  ['lora_te3_', 'sd3'],
];

/** First path segment of transformer (DiT) models, in diffusers and in BFL/SAI naming (`.` or `_` separated). */
const FLUX_MODULES = /^(?:double_blocks|single_blocks|single_transformer_blocks|x_embedder|img_in|txt_in|guidance_in|time_text_embed|final_layer)(?:[._]|$)/;
const SD3_MODULES = /^(?:joint_blocks|context_embedder|pos_embed)(?:[._]|$)/;
/** MMDiT blocks (both FLUX and SD3) at top level; SD UNets only have `transformer_blocks` inside attentions. */
const DIT_MODULES = /^transformer_blocks[._]\d+[._](?:attn|ff_context|norm1_context)/;
/** SDXL-only UNet layers: the added time/text-embedding projection (diffusers / LDM names). */
const SDXL_MODULES = /^(?:add_embedding|label_emb)(?:[._]|$)/;

function foreignFamilyOfModule(path: string): ForeignFamily | undefined {
  if (FLUX_MODULES.test(path)) return 'flux';
  if (SD3_MODULES.test(path)) return 'sd3';
  if (DIT_MODULES.test(path)) return 'dit';
  if (SDXL_MODULES.test(path)) return 'sdxl';
  return undefined;
}

/** Dotted-key prefixes → component. `transformer.` (FLUX/SD3 pipelines) and `text_encoder_2.` (SDXL) are foreign. */
function dottedComponent(key: string): { component: LoraComponent; rest: string } | ForeignFamily {
  if (key.startsWith('text_encoder_2.')) return 'sdxl';
  if (key.startsWith('transformer.')) return foreignFamilyOfModule(key.slice('transformer.'.length)) ?? 'dit';
  if (key.startsWith('unet.')) return { component: 'unet', rest: key.slice('unet.'.length) };
  if (key.startsWith('text_encoder.')) return { component: 'text_encoder', rest: key.slice('text_encoder.'.length) };
  // `peft.save_pretrained` on the bare model; attention-processor files have no prefix at all.
  const rest = key.startsWith('base_model.model.') ? key.slice('base_model.model.'.length) : key;
  if (rest.startsWith('text_model.')) return { component: 'text_encoder', rest };
  return { component: 'unet', rest };
}

const PEFT_FACTOR = /^(.+)\.lora_([AB])(?:\.[A-Za-z0-9_-]+)?\.weight$/;
const PEFT_DORA = /^(.+)\.lora_magnitude_vector(?:\.[A-Za-z0-9_-]+)?(?:\.weight)?$/;
const DIFFUSERS_FACTOR = /^(.+)\.(?:lora|lora_linear_layer)\.(down|up)\.weight$/;
const ATTNPROC_FACTOR = /^(.+)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$/;
/** diffusers ≤ 0.16 text-encoder LoRA: the attention-processor names on CLIP's `self_attn`. */
const TE_ATTNPROC_FACTOR = /^(.+)\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$/;
const DOTTED_ALPHA = /^(.+)\.alpha$/;

const ATTNPROC_UNET: Readonly<Record<string, string>> = { to_q: 'to_q', to_k: 'to_k', to_v: 'to_v', to_out: 'to_out.0' };
const ATTNPROC_TEXT_ENCODER: Readonly<Record<string, string>> = { to_q: 'q_proj', to_k: 'k_proj', to_v: 'v_proj', to_out: 'out_proj' };

const upOrDown = (s: string): PartName => (s === 'down' ? 'lora_down' : 'lora_up');

/** sd-scripts `train_network.py` with `--embedding`-style pivotal tuning stores TI vectors under this prefix. */
const BUNDLED_EMBEDDING_PREFIX = 'bundle_emb.';

/** What one key is. Never throws: unrecognised keys are `unknown`. */
export function parseLoraKey(key: string): ParsedKey {
  if (key.startsWith(BUNDLED_EMBEDDING_PREFIX)) return { kind: 'embedding' };

  for (const [prefix, owner] of KOHYA_PREFIXES) {
    if (!key.startsWith(prefix)) continue;
    const dot = key.indexOf('.');
    if (dot < 0) return { kind: 'unknown' };
    const name = key.slice(prefix.length, dot);
    if (owner !== 'unet' && owner !== 'text_encoder') return { kind: 'foreign', family: owner };
    const foreign = owner === 'unet' ? foreignFamilyOfModule(name) : undefined;
    if (foreign !== undefined) return { kind: 'foreign', family: foreign };
    const part = KOHYA_SUFFIXES.get(key.slice(dot + 1));
    if (part === undefined || name === '') return { kind: 'unknown' };
    return { kind: 'factor', address: { kind: 'flat', component: owner, stem: key.slice(0, dot) }, part, scheme: 'kohya' };
  }

  const owner = dottedComponent(key);
  if (typeof owner === 'string') return { kind: 'foreign', family: owner };
  const { component, rest } = owner;
  const foreign = component === 'unet' ? foreignFamilyOfModule(rest) : undefined;
  if (foreign !== undefined) return { kind: 'foreign', family: foreign };
  const dotted = (module: string, part: PartName, scheme: NamingScheme | undefined): ParsedKey => ({
    kind: 'factor',
    address: { kind: 'dotted', component, module },
    part,
    scheme,
  });

  let m = PEFT_FACTOR.exec(rest);
  if (m !== null) return dotted(m[1]!, m[2] === 'A' ? 'lora_down' : 'lora_up', 'peft');
  m = PEFT_DORA.exec(rest);
  if (m !== null) return dotted(m[1]!, 'dora_scale', 'peft');
  m = ATTNPROC_FACTOR.exec(rest);
  if (m !== null) {
    const table = component === 'unet' ? ATTNPROC_UNET : ATTNPROC_TEXT_ENCODER;
    return dotted(`${m[1]!}.${table[m[2]!]!}`, upOrDown(m[3]!), 'diffusers-attnproc');
  }
  m = DIFFUSERS_FACTOR.exec(rest);
  if (m !== null) return dotted(m[1]!, upOrDown(m[2]!), 'diffusers');
  m = TE_ATTNPROC_FACTOR.exec(rest);
  if (m !== null && component === 'text_encoder') return dotted(`${m[1]!}.${ATTNPROC_TEXT_ENCODER[m[2]!]!}`, upOrDown(m[3]!), 'diffusers-attnproc');
  m = DOTTED_ALPHA.exec(rest);
  if (m !== null && (key.startsWith('unet.') || key.startsWith('text_encoder.') || key.startsWith('base_model.model.'))) {
    return dotted(m[1]!, 'alpha', undefined);
  }
  return { kind: 'unknown' };
}

/** cloneofsimo `lora_diffusion` keys: `unet:<i>:up`, `text_encoder:<i>:down` (module identity is a position). */
export const POSITIONAL_KEY = /^(?:unet|text_encoder):\d+:(?:up|down)$/;
/** cloneofsimo pivotal-tuning token embeddings stored beside the factors (`<s1>`, `<s2>`). */
export const TOKEN_EMBEDDING_KEY = /^<[^<>]+>$/;

/** Module names that are SGM/compvis (LDM) paths in kohya flat form (`input_blocks_1_1_proj_in`). */
export const LDM_FLAT_NAME = /^lora_unet_(?:input_blocks|middle_block|output_blocks|time_embed|out)_\d/;
