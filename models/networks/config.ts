/**
 * Model configs, parsed from the component's own `config.json` (diffusers / transformers) with the
 * defaults those libraries apply when a key is absent. Nothing here knows SD 1.5's numbers: the
 * networks are driven by whatever the file says, and a config that does not describe an SD 1.x/2.x
 * family component is refused with a message that names the field.
 *
 * Defaults: diffusers v0.24.0 `UNet2DConditionModel.__init__`, `AutoencoderKL.__init__`;
 * transformers v4.33.3 `CLIPTextConfig`.
 */
import { ModelError } from '../errors.ts';

export interface UnetConfig {
  readonly inChannels: number;
  readonly outChannels: number;
  readonly blockOutChannels: readonly number[];
  readonly downBlockTypes: readonly ('CrossAttnDownBlock2D' | 'DownBlock2D')[];
  readonly upBlockTypes: readonly ('CrossAttnUpBlock2D' | 'UpBlock2D')[];
  readonly midBlockType: 'UNetMidBlock2DCrossAttn';
  /** Per down block. Up block i has `layersPerBlock[reversed i] + 1` layers. */
  readonly layersPerBlock: readonly number[];
  /** Per down block: number of attention heads (diffusers' legacy `attention_head_dim` is this). */
  readonly numAttentionHeads: readonly number[];
  readonly crossAttentionDim: readonly number[];
  readonly transformerLayersPerBlock: readonly number[];
  readonly useLinearProjection: boolean;
  readonly onlyCrossAttention: readonly boolean[];
  readonly upcastAttention: boolean;
  readonly normNumGroups: number;
  readonly normEps: number;
  readonly downsamplePadding: number;
  readonly midBlockScaleFactor: number;
  readonly flipSinToCos: boolean;
  readonly freqShift: number;
  readonly sampleSize: number;
}

export interface ClipTextConfig {
  readonly vocabSize: number;
  readonly hiddenSize: number;
  readonly intermediateSize: number;
  readonly numHiddenLayers: number;
  readonly numAttentionHeads: number;
  readonly maxPositionEmbeddings: number;
  readonly hiddenAct: 'quick_gelu' | 'gelu';
  readonly layerNormEps: number;
}

export interface VaeConfig {
  readonly inChannels: number;
  readonly outChannels: number;
  readonly latentChannels: number;
  readonly blockOutChannels: readonly number[];
  readonly layersPerBlock: number;
  readonly normNumGroups: number;
  readonly scalingFactor: number;
  readonly midBlockAddAttention: boolean;
  readonly useQuantConv: boolean;
  readonly usePostQuantConv: boolean;
}

type Json = Record<string, unknown>;

class Fields {
  constructor(
    readonly raw: Json,
    readonly source: string,
  ) {}

  #bad(key: string, expected: string): never {
    throw new ModelError('BAD_CONFIG', `${this.source}: \`${key}\` should be ${expected}, found ${JSON.stringify(this.raw[key])}.`, { file: this.source, key });
  }

  has(key: string): boolean {
    return this.raw[key] !== undefined && this.raw[key] !== null;
  }

  int(key: string, fallback: number, min = 0): number {
    const v = this.has(key) ? this.raw[key] : fallback;
    if (!Number.isInteger(v) || (v as number) < min) this.#bad(key, `an integer ≥ ${min}`);
    return v as number;
  }

  num(key: string, fallback: number): number {
    const v = this.has(key) ? this.raw[key] : fallback;
    if (typeof v !== 'number' || !Number.isFinite(v)) this.#bad(key, 'a number');
    return v;
  }

  bool(key: string, fallback: boolean): boolean {
    const v = this.has(key) ? this.raw[key] : fallback;
    if (typeof v !== 'boolean') this.#bad(key, 'true or false');
    return v;
  }

  str(key: string, fallback: string): string {
    const v = this.has(key) ? this.raw[key] : fallback;
    if (typeof v !== 'string') this.#bad(key, 'a string');
    return v;
  }

  ints(key: string, fallback: readonly number[]): number[] {
    const v = this.has(key) ? this.raw[key] : fallback;
    if (!Array.isArray(v) || v.length === 0 || !v.every((x) => Number.isInteger(x) && x > 0)) this.#bad(key, 'a list of positive integers');
    return v as number[];
  }

  strs(key: string, fallback: readonly string[]): string[] {
    const v = this.has(key) ? this.raw[key] : fallback;
    if (!Array.isArray(v) || !v.every((x) => typeof x === 'string')) this.#bad(key, 'a list of strings');
    return v as string[];
  }

  /** A number or a per-block list of numbers, expanded to `n` entries. */
  perBlock(key: string, fallback: number | readonly number[], n: number): number[] {
    const v = this.has(key) ? this.raw[key] : fallback;
    if (Number.isInteger(v) && (v as number) > 0) return new Array<number>(n).fill(v as number);
    if (Array.isArray(v) && v.length === n && v.every((x) => Number.isInteger(x) && x > 0)) return v as number[];
    this.#bad(key, `a positive integer or a list of ${n} positive integers`);
  }

  perBlockBool(key: string, fallback: boolean, n: number): boolean[] {
    const v = this.has(key) ? this.raw[key] : fallback;
    if (typeof v === 'boolean') return new Array<boolean>(n).fill(v);
    if (Array.isArray(v) && v.length === n && v.every((x) => typeof x === 'boolean')) return v as boolean[];
    this.#bad(key, `true/false or a list of ${n} of them`);
  }

  refuseUnless(key: string, allowed: readonly unknown[], what: string): void {
    const v = this.raw[key] ?? null;
    if (!allowed.includes(v as never)) {
      throw new ModelError(
        'UNSUPPORTED_ARCHITECTURE',
        `${this.source}: \`${key}\` is ${JSON.stringify(v)}; ${what}`,
        { file: this.source, key, value: v },
      );
    }
  }
}

function asObject(raw: unknown, source: string): Json {
  if (typeof raw !== 'object' || raw === null || Array.isArray(raw)) {
    throw new ModelError('BAD_CONFIG', `${source}: not a JSON object.`, { file: source });
  }
  return raw as Json;
}

const SD_FAMILY = 'Chorus runs Stable Diffusion 1.x/2.x-family UNets (SDXL and other architectures are not supported).';

/** Parse a diffusers `unet/config.json`. Throws BAD_CONFIG or UNSUPPORTED_ARCHITECTURE. */
export function parseUnetConfig(raw: unknown, source: string): UnetConfig {
  const f = new Fields(asObject(raw, source), source);
  // SDXL and friends: extra conditioning this network does not have.
  f.refuseUnless('addition_embed_type', [null], `that is SDXL-style extra conditioning. ${SD_FAMILY}`);
  f.refuseUnless('class_embed_type', [null], `class-conditioned UNets are not supported. ${SD_FAMILY}`);
  f.refuseUnless('encoder_hid_dim', [null], `an encoder projection is not supported. ${SD_FAMILY}`);
  f.refuseUnless('encoder_hid_dim_type', [null], `an encoder projection is not supported. ${SD_FAMILY}`);
  f.refuseUnless('num_class_embeds', [null], `class-conditioned UNets are not supported. ${SD_FAMILY}`);
  f.refuseUnless('time_cond_proj_dim', [null], `timestep-conditioned (LCM-distilled) UNets are not supported. ${SD_FAMILY}`);
  f.refuseUnless('attention_type', [null, 'default'], `gated (GLIGEN) attention is not supported. ${SD_FAMILY}`);
  f.refuseUnless('reverse_transformer_layers_per_block', [null], SD_FAMILY);
  f.refuseUnless('time_embedding_type', [null, 'positional'], SD_FAMILY);
  f.refuseUnless('resnet_time_scale_shift', [null, 'default'], SD_FAMILY);
  f.refuseUnless('act_fn', [null, 'silu'], SD_FAMILY);
  f.refuseUnless('mid_block_type', [null, 'UNetMidBlock2DCrossAttn'], SD_FAMILY);
  f.refuseUnless('conv_in_kernel', [null, 3], SD_FAMILY);
  f.refuseUnless('conv_out_kernel', [null, 3], SD_FAMILY);
  f.refuseUnless('dual_cross_attention', [null, false], SD_FAMILY);
  f.refuseUnless('center_input_sample', [null, false], SD_FAMILY);

  const blockOutChannels = f.ints('block_out_channels', [320, 640, 1280, 1280]);
  const n = blockOutChannels.length;
  const downBlockTypes = f.strs('down_block_types', ['CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'DownBlock2D']);
  const upBlockTypes = f.strs('up_block_types', ['UpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D']);
  if (downBlockTypes.length !== n || upBlockTypes.length !== n) {
    throw new ModelError('BAD_CONFIG', `${source}: down_block_types (${downBlockTypes.length}), up_block_types (${upBlockTypes.length}) and block_out_channels (${n}) must have the same length.`, { file: source });
  }
  for (const t of downBlockTypes) {
    if (t !== 'CrossAttnDownBlock2D' && t !== 'DownBlock2D') f.refuseUnless('down_block_types', [], `block type ${t} is not supported. ${SD_FAMILY}`);
  }
  for (const t of upBlockTypes) {
    if (t !== 'CrossAttnUpBlock2D' && t !== 'UpBlock2D') f.refuseUnless('up_block_types', [], `block type ${t} is not supported. ${SD_FAMILY}`);
  }
  // diffusers: `num_attention_heads = num_attention_heads or attention_head_dim` (legacy naming).
  const headsKey = f.has('num_attention_heads') ? 'num_attention_heads' : 'attention_head_dim';
  const numAttentionHeads = f.perBlock(headsKey, 8, n);
  const normNumGroups = f.int('norm_num_groups', 32, 1);
  for (const c of blockOutChannels) {
    if (c % normNumGroups !== 0) {
      throw new ModelError('BAD_CONFIG', `${source}: block_out_channels ${c} is not divisible by norm_num_groups ${normNumGroups}.`, { file: source, key: 'block_out_channels' });
    }
  }
  blockOutChannels.forEach((c, i) => {
    if (c % numAttentionHeads[i]! !== 0) {
      throw new ModelError('BAD_CONFIG', `${source}: block ${i} has ${c} channels, not divisible by ${numAttentionHeads[i]} attention heads (${headsKey}).`, { file: source, key: headsKey });
    }
  });
  return {
    inChannels: f.int('in_channels', 4, 1),
    outChannels: f.int('out_channels', 4, 1),
    blockOutChannels,
    downBlockTypes: downBlockTypes as UnetConfig['downBlockTypes'],
    upBlockTypes: upBlockTypes as UnetConfig['upBlockTypes'],
    midBlockType: 'UNetMidBlock2DCrossAttn',
    layersPerBlock: f.perBlock('layers_per_block', 2, n),
    numAttentionHeads,
    crossAttentionDim: f.perBlock('cross_attention_dim', 1280, n),
    transformerLayersPerBlock: f.perBlock('transformer_layers_per_block', 1, n),
    useLinearProjection: f.bool('use_linear_projection', false),
    onlyCrossAttention: f.perBlockBool('only_cross_attention', false, n),
    upcastAttention: f.bool('upcast_attention', false),
    normNumGroups,
    normEps: f.num('norm_eps', 1e-5),
    downsamplePadding: f.int('downsample_padding', 1),
    midBlockScaleFactor: f.num('mid_block_scale_factor', 1),
    flipSinToCos: f.bool('flip_sin_to_cos', true),
    freqShift: f.num('freq_shift', 0),
    sampleSize: f.int('sample_size', 64, 1),
  };
}

/** Parse a transformers `text_encoder/config.json` (CLIPTextModel). */
export function parseClipTextConfig(raw: unknown, source: string): ClipTextConfig {
  const json = asObject(raw, source);
  const f = new Fields(json, source);
  const arch = json.architectures;
  if (Array.isArray(arch) && arch.some((a) => typeof a === 'string' && a !== 'CLIPTextModel' && a !== 'CLIPTextModelWithProjection')) {
    f.refuseUnless('architectures', [], 'Chorus runs CLIP text encoders (CLIPTextModel).');
  }
  const act = f.str('hidden_act', 'quick_gelu');
  if (act !== 'quick_gelu' && act !== 'gelu') f.refuseUnless('hidden_act', [], 'supported activations are quick_gelu and gelu.');
  const hiddenAct: ClipTextConfig['hiddenAct'] = act === 'gelu' ? 'gelu' : 'quick_gelu';
  const hiddenSize = f.int('hidden_size', 512, 1);
  const numAttentionHeads = f.int('num_attention_heads', 8, 1);
  if (hiddenSize % numAttentionHeads !== 0) {
    throw new ModelError('BAD_CONFIG', `${source}: hidden_size ${hiddenSize} is not divisible by num_attention_heads ${numAttentionHeads}.`, { file: source, key: 'num_attention_heads' });
  }
  return {
    vocabSize: f.int('vocab_size', 49408, 1),
    hiddenSize,
    intermediateSize: f.int('intermediate_size', 2048, 1),
    numHiddenLayers: f.int('num_hidden_layers', 12, 2),
    numAttentionHeads,
    maxPositionEmbeddings: f.int('max_position_embeddings', 77, 1),
    hiddenAct,
    layerNormEps: f.num('layer_norm_eps', 1e-5),
  };
}

/** The default latent scale of SD 1.x/2.x VAEs (diffusers `AutoencoderKL` default). */
export const DEFAULT_VAE_SCALING_FACTOR = 0.18215;

/** Parse a diffusers `vae/config.json` (AutoencoderKL). */
export function parseVaeConfig(raw: unknown, source: string): VaeConfig {
  const f = new Fields(asObject(raw, source), source);
  f.refuseUnless('act_fn', [null, 'silu'], 'Chorus runs AutoencoderKL VAEs with SiLU.');
  const blockOutChannels = f.ints('block_out_channels', [64]);
  const down = f.strs('down_block_types', ['DownEncoderBlock2D']);
  const up = f.strs('up_block_types', ['UpDecoderBlock2D']);
  if (down.length !== blockOutChannels.length || up.length !== blockOutChannels.length || !down.every((t) => t === 'DownEncoderBlock2D') || !up.every((t) => t === 'UpDecoderBlock2D')) {
    throw new ModelError('BAD_CONFIG', `${source}: expected ${blockOutChannels.length} DownEncoderBlock2D and UpDecoderBlock2D blocks (one per block_out_channels entry).`, { file: source, key: 'down_block_types' });
  }
  const normNumGroups = f.int('norm_num_groups', 32, 1);
  return {
    inChannels: f.int('in_channels', 3, 1),
    outChannels: f.int('out_channels', 3, 1),
    latentChannels: f.int('latent_channels', 4, 1),
    blockOutChannels,
    layersPerBlock: f.int('layers_per_block', 1, 1),
    normNumGroups,
    scalingFactor: f.num('scaling_factor', DEFAULT_VAE_SCALING_FACTOR),
    midBlockAddAttention: f.bool('mid_block_add_attention', true),
    useQuantConv: f.bool('use_quant_conv', true),
    usePostQuantConv: f.bool('use_post_quant_conv', true),
  };
}
