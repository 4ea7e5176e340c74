/**
 * Which Stable Diffusion family a LoRA file was trained for, read from its header only.
 *
 * Keys first: tensor shapes do not lie, metadata sometimes does (old kohya scripts write `ss_v2: False` into
 * SDXL files, A1111 calls anything with metadata "SD1"). The width of the UNet's cross-attention input
 * (`attn2.to_k` / `attn2.to_v` take the text encoder's hidden states) names the family:
 * 768 = CLIP ViT-L/14 (SD 1.x), 1024 = OpenCLIP ViT-H/14 (SD 2.x), 2048 = CLIP-L + OpenCLIP bigG concatenated
 * (SDXL). No other UNet linear or conv input in these three families has one of those widths, which is what
 * makes the positional cloneofsimo format (`unet:N:down`) decidable too.
 */

export type LoraBaseModel = 'sd1' | 'sd2' | 'sdxl' | 'unknown';

export interface BaseModelVerdict {
  readonly baseModel: LoraBaseModel;
  /** Human-readable: what decided it, or why nothing could. */
  readonly evidence: string;
}

/** The part of a tensor header this module reads. */
export interface TensorShape {
  readonly shape: readonly number[];
}

const CROSS_ATTENTION_WIDTHS: ReadonlyMap<number, Exclude<LoraBaseModel, 'unknown'>> = new Map([
  [768, 'sd1'],
  [1024, 'sd2'],
  [2048, 'sdxl'],
]);

/** Text encoder hidden size: CLIP ViT-L/14 (SD 1.x) and OpenCLIP ViT-H/14 (SD 2.x). SDXL is told apart by te1/te2 names. */
const TEXT_ENCODER_WIDTHS: ReadonlyMap<number, Exclude<LoraBaseModel, 'unknown'>> = new Map([
  [768, 'sd1'],
  [1024, 'sd2'],
]);

/**
 * Low-rank "down" factors, shape [rank, in, …]: kohya `lora_down.weight`, diffusers `lora.down.weight`,
 * the attention-processor `to_k_lora.down.weight`, `lora_linear_layer.down.weight`, PEFT `lora_A.weight`,
 * LoHa `hada_w1_b`/`hada_w2_b`. A full LyCORIS `diff` is [out, in]: its input width is also shape[1].
 */
const INPUT_FACTOR = /(?:\.lora_down\.weight|[._]lora\.down\.weight|\.lora_linear_layer\.down\.weight|\.lora_A\.weight|\.hada_w[12]_b|\.diff)$/;
/** LoKr: ΔW = kron(w1, w2), so in = cols(w1) · cols(w2); each factor is stored whole or as a low-rank pair (…_a @ …_b). */
const LOKR_FACTOR = /\.lokr_(w[12])(?:_b)?$/;
const SDXL_TEXT_ENCODER_PREFIXES = ['lora_te1_', 'lora_te2_', 'text_encoder_2.'];
/** The module path once the factor suffix is cut off; `.processor.` appears in diffusers' legacy attention-processor LoRAs. */
const CROSS_ATTENTION_KV = /attn2[._](?:processor[._])?to_[kv]$/;
const TEXT_ENCODER_K_PROJ = /^(?:lora_te_|text_encoder\.).*self_attn[._]k_proj$/;
const CLONEOFSIMO_UNET_DOWN = /^unet:\d+:down$/;

/** Input width of every module whose path matches `modulePattern`, from its input factor(s). */
function inputWidths(tensors: ReadonlyMap<string, TensorShape>, modulePattern: RegExp): number[] {
  const widths: number[] = [];
  const lokr = new Map<string, { w1?: number; w2?: number }>();
  for (const [key, info] of tensors) {
    const factor = INPUT_FACTOR.exec(key);
    if (factor !== null) {
      if (modulePattern.test(key.slice(0, factor.index)) && info.shape[1] !== undefined) widths.push(info.shape[1]);
      continue;
    }
    const lokrFactor = LOKR_FACTOR.exec(key);
    if (lokrFactor !== null && modulePattern.test(key.slice(0, lokrFactor.index)) && info.shape[1] !== undefined) {
      const module = key.slice(0, lokrFactor.index);
      const parts = lokr.get(module) ?? {};
      parts[lokrFactor[1] as 'w1' | 'w2'] = info.shape[1];
      lokr.set(module, parts);
    }
  }
  for (const { w1, w2 } of lokr.values()) {
    if (w1 !== undefined && w2 !== undefined) widths.push(w1 * w2);
  }
  return widths;
}

/** The most frequent width (ties: the first seen), with its count. */
function commonest(widths: readonly number[]): { width: number; count: number } | undefined {
  const counts = new Map<number, number>();
  for (const w of widths) counts.set(w, (counts.get(w) ?? 0) + 1);
  let best: { width: number; count: number } | undefined;
  for (const [width, count] of counts) if (best === undefined || count > best.count) best = { width, count };
  return best;
}

/** From tensor names and shapes alone. `unknown` with the reason when the keys cannot tell. */
export function detectBaseModelFromKeys(tensors: ReadonlyMap<string, TensorShape>): BaseModelVerdict {
  const names = [...tensors.keys()];
  const sdxlKey = names.find((k) => SDXL_TEXT_ENCODER_PREFIXES.some((p) => k.startsWith(p)));
  if (sdxlKey !== undefined) {
    return { baseModel: 'sdxl', evidence: `keys: two text encoders (\`${sdxlKey}\`)` };
  }

  const crossAttention = commonest(inputWidths(tensors, CROSS_ATTENTION_KV));
  const reasons: string[] = [];
  if (crossAttention !== undefined) {
    const family = CROSS_ATTENTION_WIDTHS.get(crossAttention.width);
    if (family !== undefined) {
      return { baseModel: family, evidence: `keys: cross-attention (attn2 to_k/to_v) input width ${crossAttention.width} in ${crossAttention.count} modules` };
    }
    reasons.push(`cross-attention input width ${crossAttention.width} matches no SD base model`);
  }

  const positional = new Set(names.filter((k) => CLONEOFSIMO_UNET_DOWN.test(k)).map((k) => tensors.get(k)?.shape[1]));
  const positionalFamilies = [...CROSS_ATTENTION_WIDTHS].filter(([width]) => positional.has(width));
  if (positionalFamilies.length === 1) {
    const [width, family] = positionalFamilies[0]!;
    return { baseModel: family, evidence: `keys: cloneofsimo \`unet:N:down\` factors include input width ${width} (cross-attention)` };
  }

  const textEncoder = commonest(inputWidths(tensors, TEXT_ENCODER_K_PROJ));
  if (textEncoder !== undefined) {
    const family = TEXT_ENCODER_WIDTHS.get(textEncoder.width);
    if (family !== undefined) {
      return { baseModel: family, evidence: `keys: text encoder k_proj input width ${textEncoder.width} (no UNet cross-attention keys)` };
    }
    reasons.push(`text encoder width ${textEncoder.width} matches no SD base model`);
  }
  if (reasons.length === 0) reasons.push('no cross-attention or text-encoder keys with a readable width');
  return { baseModel: 'unknown', evidence: `keys cannot tell: ${reasons.join('; ')}` };
}

/**
 * From the header's `__metadata__`: kohya `ss_base_model_version` (`sd_v1`, `sd_v2…`, `sdxl_base_v1-0`),
 * SAI ModelSpec `modelspec.architecture` (`stable-diffusion-v1/lora`, `stable-diffusion-xl-v1-base/lora`),
 * then kohya `ss_v2` (older scripts, before SDXL existed). Unlike A1111 (`network.py detect_version`),
 * "some metadata is present" is not taken to mean SD1.
 */
export function detectBaseModelFromMetadata(metadata: Readonly<Record<string, string>>): BaseModelVerdict {
  const version = metadata.ss_base_model_version;
  if (version !== undefined) {
    const family = version.startsWith('sdxl_') ? 'sdxl' : version.startsWith('sd_v2') ? 'sd2' : version.startsWith('sd_v1') ? 'sd1' : undefined;
    if (family !== undefined) return { baseModel: family, evidence: `metadata: ss_base_model_version = ${version}` };
  }
  const architecture = metadata['modelspec.architecture'];
  if (architecture !== undefined) {
    const family = architecture.startsWith('stable-diffusion-xl-')
      ? 'sdxl'
      : architecture.startsWith('stable-diffusion-v2')
        ? 'sd2'
        : architecture.startsWith('stable-diffusion-v1')
          ? 'sd1'
          : undefined;
    if (family !== undefined) return { baseModel: family, evidence: `metadata: modelspec.architecture = ${architecture}` };
  }
  const v2 = metadata.ss_v2;
  if (v2 === 'True') return { baseModel: 'sd2', evidence: 'metadata: ss_v2 = True' };
  if (v2 === 'False' && version === undefined) return { baseModel: 'sd1', evidence: 'metadata: ss_v2 = False (kohya, before SDXL support)' };
  return { baseModel: 'unknown', evidence: 'metadata cannot tell' };
}

/** Civitai's `baseModel` labels (`SD 1.5`, `SD 2.1 768`, `SDXL 1.0`, `Pony`, `Illustrious`, …); Flux, SD3 and others → unknown. */
export function baseModelOfCivitaiLabel(label: string): LoraBaseModel {
  if (/^SD ?1/i.test(label)) return 'sd1';
  if (/^SD ?2/i.test(label)) return 'sd2';
  if (/^(?:SDXL|Pony|Illustrious|NoobAI)/i.test(label)) return 'sdxl';
  return 'unknown';
}

/** A1111 user metadata `sd version` (`SD1`, `SD2`, `SDXL`, `Unknown`: the `SdVersion` enum names). */
export function baseModelOfA1111SdVersion(name: string): LoraBaseModel {
  switch (name) {
    case 'SD1':
      return 'sd1';
    case 'SD2':
      return 'sd2';
    case 'SDXL':
      return 'sdxl';
    default:
      return 'unknown';
  }
}
