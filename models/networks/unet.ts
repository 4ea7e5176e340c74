/**
 * The SD 1.x/2.x UNet (`UNet2DConditionModel`), block by block as in diffusers, driven by its config.
 * Scope paths are diffusers checkpoint keys (`down_blocks.1.attentions.0.transformer_blocks.0.attn2`).
 *
 * Reference: diffusers v0.24.0,
 * https://github.com/huggingface/diffusers/blob/v0.24.0/src/diffusers/models/unet_2d_condition.py
 * https://github.com/huggingface/diffusers/blob/v0.24.0/src/diffusers/models/unet_2d_blocks.py
 * https://github.com/huggingface/diffusers/blob/v0.24.0/src/diffusers/models/transformer_2d.py
 * https://github.com/huggingface/diffusers/blob/v0.24.0/src/diffusers/models/attention.py
 * https://github.com/huggingface/diffusers/blob/v0.24.0/src/diffusers/models/embeddings.py
 *
 * Graph inputs: `sample` (B, C_in, h, w) float32, `timestep` (1 or B) float32 (fractional values
 * are fine), `encoder_hidden_states` (B, 77·k, cross_attention_dim). Output: `noise_pred`.
 * Any latent size works: each upsampler takes its output size from the matching skip connection.
 */
import type { Graph, Value } from '../onnx/builder.ts';
import { Ops } from '../onnx/ops.ts';
import { ModelError } from '../errors.ts';
import { attention, resnetBlock2D } from './blocks.ts';
import { attachAdapterBank, enableSpatialMix, withBankMix } from './adapter-bank.ts';
import { conv2d, groupNorm, layerNorm, linear } from './layers.ts';
import type { UnetConfig } from './config.ts';

/** `get_timestep_embedding`'s max_period. */
const TIMESTEP_MAX_PERIOD = 10000;
/** Transformer2DModel's input GroupNorm eps (fixed in diffusers, unlike the resnets' `norm_eps`). */
const TRANSFORMER_NORM_EPS = 1e-6;
/** BasicTransformerBlock LayerNorm eps (diffusers default `norm_eps`). */
const TRANSFORMER_LAYER_NORM_EPS = 1e-5;
/** FeedForward `mult`. */
const FEED_FORWARD_MULT = 4;
/** TimestepEmbedding width = 4 × block_out_channels[0]. */
const TIME_EMBED_MULT = 4;

export interface UnetBuildOptions {
  /** Attention modules whose probabilities become outputs `attn_probs.<module>` (B·heads, N, M). */
  readonly attentionProbs?: readonly string[];
  /** Add `debug.<stage>` outputs (time_proj, time_embedding, conv_in, each block, conv_norm_out). */
  readonly debugOutputs?: boolean;
  /** LoRA adapter-bank inputs on every linear/conv of the down, mid and up blocks (see adapter-bank.ts). */
  readonly adapterBank?: boolean;
  /** With `adapterBank`: bank inputs only on the layers of these families (`bankFamily`; default all). */
  readonly bankFamilies?: readonly string[];
  /**
   * Head- and layer-averaged attention maps of one UNet level (level 2 = the 1/32 grid of
   * CLoRA and LoRA-Composer): outputs `xattn` (B, N, S) from the cross-attentions and `selfattn`
   * (B, N, N) from the self-attentions of every transformer block on that level (mean over heads,
   * then over the layers).
   */
  readonly attentionMaps?: { readonly level: number };
  /** Also output `deep_feature`: the input of the last up block (DeepCache / CMLoRA's cached feature). */
  readonly deepFeature?: boolean;
  /**
   * The shallow variant (DeepCache, Ma et al. 2023, arXiv:2312.00858; CMLoRA's cache_layer_id 0,
   * cache_block_id 1): time embedding, conv_in, the (resnet, attention) pairs of `down_blocks.0`
   * without its downsampler, then the last up block on the `deep_feature` input instead of
   * everything deeper, then the output layers. Fed the feature a full pass produced at the same
   * inputs, it reproduces that full pass.
   */
  readonly shallow?: boolean;
  /**
   * Region slots (Mix-of-Show regionally controllable sampling): inputs `region_context`
   * (B, R, S_r, D), `region_mask.<l>` (B, R, h_l, w_l) per level l (level 0 = the latent grid, each
   * deeper level ⌈h/2⌉ × ⌈w/2⌉), and with the adapter bank `region_lora_mix` (B, R, K) for the
   * slots' cross-attention k/v plus per-pixel strengths `lora_mix_map.<l>` (B, K, h_l, w_l) for
   * every layer acting on pixels. Every cross-attention routes its output by the masks.
   */
  readonly regions?: boolean;
  /**
   * With `regions`: concept isolation in every self-attention (LoRA-Composer, Yang et al. 2024,
   * arXiv 2403.11627): the score (q, k) gets `ISOLATION_BIAS` once per ordered pair of distinct
   * regions a ∋ q, b ∋ k, i.e. ISOLATION_BIAS · (n_q·n_k − ⟨m_q, m_k⟩) with m_q the query's 0/1
   * membership vector over the regions and n_q = Σ m_q. Built from the `region_mask.<l>` inputs.
   */
  readonly selfAttentionIsolation?: boolean;
  /**
   * With `regions` and the adapter bank: each slot's output also goes through its own adapters on
   * `to_out.0` (composition after `to_out`, LoRA-Composer's region-aware injection; see
   * `RegionRouting.outputAdapters`).
   */
  readonly regionOutputAdapters?: boolean;
  /**
   * A shared prefix for batch elements that read the same sample (the two halves of a CFG pair, a
   * CLoRA step's slots): `sample` holds the distinct samples only (S, C_in, h, w), input
   * `sample_index` (B) int64 says which one each batch element reads, and with the adapter bank
   * `sample_rows` (S) int64 names, for each sample, a batch element whose `lora_mix` row its prefix
   * uses. Everything before the first layer that reads per-element inputs (the first
   * cross-attention: in SD 1.5 conv_in, `down_blocks.0.resnets.0` and the first self-attention,
   * the costliest layer at 512²) runs once per distinct sample; the batch is gathered there.
   * Outputs are per batch element as without it. The caller guarantees that elements sharing a
   * sample share their LoRA mix and timestep (the timestep input must then hold one value). Not
   * with regions or debug outputs. The shallow variant shares its prefix too (its `deep_feature`
   * input is per batch element).
   */
  readonly sharedPrefix?: boolean;
}

export const SAMPLE_INDEX_INPUT = 'sample_index';
export const SAMPLE_ROWS_INPUT = 'sample_rows';

/**
 * The isolation bias per ordered pair of distinct regions. The official code adds −1e6, which is
 * −inf in fp16 and makes a fully masked row NaN; −1e4 gives the same softmax (exactly 0 after exp
 * in fp32 and fp16) and stays finite.
 */
export const ISOLATION_BIAS = -1e4;

export const REGION_CONTEXT_INPUT = 'region_context';
export const REGION_LORA_MIX_INPUT = 'region_lora_mix';
export const REGION_MASK_INPUT = (level: number): string => `region_mask.${level}`;

/**
 * The UNet level a bank module's output lives on (0 = the latent grid), or undefined for layers
 * that do not act on pixels (cross-attention k/v act on text tokens).
 */
export function unetLevelOf(module: string, levels: number): number | undefined {
  if (/\.attn2\.to_[kv]$/.test(module)) return undefined;
  const down = /^down_blocks\.(\d+)\./.exec(module);
  if (down !== null) return Number(down[1]) + (module.includes('.downsamplers.') ? 1 : 0);
  if (module.startsWith('mid_block.')) return levels - 1;
  const up = /^up_blocks\.(\d+)\./.exec(module);
  if (up !== null) return levels - 1 - Number(up[1]) - (module.includes('.upsamplers.') ? 1 : 0);
  return undefined;
}

/** Where the UNet's bank layers live: everything kohya LoRA/LoCon targets. */
export const UNET_BANK_PREFIXES = ['down_blocks.', 'mid_block.', 'up_blocks.'] as const;

interface Ctx {
  readonly g: Ops;
  readonly c: UnetConfig;
  readonly temb: Value;
  readonly tembChannels: number;
  readonly context: Value;
  readonly taps: Map<string, Value>;
  readonly wanted: ReadonlySet<string>;
  /** Collected head-mean maps of the level: cross (B, N, M), self (B, N, N), region slots (B, R, N, S). */
  readonly maps?: { readonly level: number; readonly cross: Value[]; readonly self: Value[]; readonly regionCross: Value[] };
  readonly regions?: { readonly context: Value; readonly masks: readonly Value[]; readonly mix?: Value; readonly outputAdapters: boolean; readonly isolation?: Map<number, Value> };
  readonly prefix?: SharedPrefix;
}

/**
 * The state of `sharedPrefix` while the graph is built: values made before `crossed` have one row per
 * distinct sample; `leave` gathers the batch from them once, at the first per-element layer.
 */
class SharedPrefix {
  crossed = false;
  constructor(
    private readonly g: Ops,
    private readonly index: Value,
    private readonly skips: Value[],
    private readonly restoreMix: () => void,
  ) {}

  /** A prefix value (S, …) → (B, …). */
  lift(v: Value): Value {
    return this.g.gather(v, this.index, { dim: 0 });
  }

  /** Whether a value made now is still a prefix value. */
  get active(): boolean {
    return !this.crossed;
  }

  /** End the prefix: the bank reads `lora_mix` again, the skip connections made so far are gathered. */
  leave(): void {
    if (this.crossed) return;
    this.crossed = true;
    this.restoreMix();
    this.g.scope('shared_prefix', () => {
      for (let i = 0; i < this.skips.length; i++) this.skips[i] = this.lift(this.skips[i]!);
    });
  }
}

/**
 * The self-attention isolation bias of one level (see `selfAttentionIsolation`), (B, 1, N, N),
 * built once per level from the region masks m (B, R, h, w).
 */
function isolationBias(g: Ops, mask: Value): Value {
  const m = g.reshape(mask, [0, 0, -1]); // (B, R, h, w) → (B, R, N)
  const n = g.reduceSum(m, { dims: [1], keepdim: true }); // (B, 1, N): regions covering each pixel
  const pairs = g.matmul(g.transpose(n, [0, 2, 1]), n); // (B, N, 1)·(B, 1, N) → n_q·n_k
  const shared = g.matmul(g.transpose(m, [0, 2, 1]), m); // (B, N, R)·(B, R, N) → ⟨m_q, m_k⟩
  return g.unsqueeze(g.mul(g.sub(pairs, shared), g.scalar(ISOLATION_BIAS)), [1]); // (B, 1, N, N)
}

/** float32 arithmetic as torch does it for the frequency table. */
const f32 = Math.fround;

/**
 * `Timesteps` → `get_timestep_embedding`: f_i = exp(−ln(max_period)·i / (half − shift)),
 * emb = [sin(t·f), cos(t·f)], flipped to [cos, sin] when flip_sin_to_cos. t (B) → (B, dim).
 * The frequency table is computed here in float32 steps, as diffusers computes it.
 */
function timesteps(g: Ops, t: Value, dim: number, flipSinToCos: boolean, shift: number): Value {
  const half = Math.floor(dim / 2);
  const freqs = new Float32Array(half);
  const negLog = f32(-Math.log(TIMESTEP_MAX_PERIOD));
  for (let i = 0; i < half; i++) freqs[i] = f32(Math.exp(f32(f32(negLog * i) / f32(half - shift))));
  const args = g.mul(g.unsqueeze(t, [1]), g.floats([1, half], freqs)); // (B) → (B, half)
  const sin = g.sin(args);
  const cos = g.cos(args);
  let emb = g.concat(flipSinToCos ? [cos, sin] : [sin, cos], { dim: 1 });
  if (dim % 2 === 1) {
    emb = g.concat([emb, g.mul(g.slice(emb, { starts: [0], ends: [1], axes: [1] }), g.scalar(0))], { dim: 1 });
  }
  return emb;
}

/** `TimestepEmbedding`: linear_1 → SiLU → linear_2. (B, C0) → (B, 4·C0) */
function timestepEmbedding(g: Ops, x: Value, inChannels: number, timeEmbedDim: number): Value {
  const h = g.silu(linear(g, 'linear_1', x, inChannels, timeEmbedDim, { bias: true, inputRank: 2 }));
  return linear(g, 'linear_2', h, timeEmbedDim, timeEmbedDim, { bias: true, inputRank: 2 });
}

/** `GEGLU` + `FeedForward`: h, gate = net.0.proj(x).chunk(2); net.2(h · gelu(gate)). (B, N, dim) → (B, N, dim) */
function feedForward(g: Ops, x: Value, dim: number): Value {
  const inner = dim * FEED_FORWARD_MULT;
  const projected = g.scope('net.0', () => linear(g, 'proj', x, dim, inner * 2, { bias: true }));
  const [value, gate] = g.chunk(projected, 2, { dim: -1 });
  // net.1 is Dropout (no parameters).
  return g.scope('net', () => linear(g, '2', g.mul(value!, g.gelu(gate!)), inner, dim, { bias: true }));
}

/**
 * `BasicTransformerBlock` (norm_type "layer_norm"): self-attention, cross-attention, GEGLU
 * feed-forward, each pre-LayerNorm with a residual. (B, N, dim) → (B, N, dim)
 */
function basicTransformerBlock(ctx: Ctx, x: Value, dim: number, heads: number, crossDim: number, onlyCrossAttention: boolean): Value {
  const { g } = ctx;
  const dimHead = dim / heads;
  const blockLevel = unetLevelOf(g.scopePath + '.', ctx.c.blockOutChannels.length);
  const regionTap =
    ctx.maps !== undefined && blockLevel === ctx.maps.level && ctx.regions !== undefined
      ? (probs: Value) => ctx.maps!.regionCross.push(g.reduceMean(probs, { dims: [2], keepdim: false })) // (B, R, h, N, S) → (B, R, N, S)
      : undefined;
  const tapFor = (module: 'attn1' | 'attn2') => {
    const path = `${g.scopePath}.${module}`;
    const wantedHere = ctx.wanted.has(path);
    const mapHere = ctx.maps !== undefined && blockLevel === ctx.maps.level;
    if (!wantedHere && !mapHere) return undefined;
    return (raw: Value) => {
      const probs = ctx.prefix?.active === true ? ctx.prefix.lift(raw) : raw;
      if (wantedHere) ctx.taps.set(path, probs);
      if (mapHere) (module === 'attn2' ? ctx.maps!.cross : ctx.maps!.self).push(g.reduceMean(probs, { dims: [1], keepdim: false })); // (B, h, N, M) → (B, N, M)
    };
  };
  const tap1 = tapFor('attn1');
  const tap2 = tapFor('attn2');
  let h = x;
  // The first layer reading per-element inputs (the text) ends a shared prefix.
  if (onlyCrossAttention && ctx.prefix?.active === true) {
    ctx.prefix.leave();
    h = ctx.prefix.lift(h);
  }
  const n1 = layerNorm(g, 'norm1', h, dim, { eps: TRANSFORMER_LAYER_NORM_EPS });
  let scoreBias: Value | undefined;
  const isolation = ctx.regions?.isolation;
  if (isolation !== undefined && blockLevel !== undefined && !onlyCrossAttention) {
    scoreBias = isolation.get(blockLevel);
    if (scoreBias === undefined) {
      scoreBias = isolationBias(g, ctx.regions!.masks[blockLevel]!);
      isolation.set(blockLevel, scoreBias);
    }
  }
  const a1 = g.scope('attn1', () =>
    onlyCrossAttention
      ? attention(g, n1, ctx.context, { queryDim: dim, kvDim: crossDim, heads, dimHead, qkvBias: false, tap: tap1 })
      : attention(g, n1, undefined, { queryDim: dim, kvDim: dim, heads, dimHead, qkvBias: false, tap: tap1, ...(scoreBias === undefined ? {} : { scoreBias }) }),
  );
  h = g.add(a1, h);
  if (ctx.prefix?.active === true) {
    ctx.prefix.leave();
    h = ctx.prefix.lift(h);
  }
  const n2 = layerNorm(g, 'norm2', h, dim, { eps: TRANSFORMER_LAYER_NORM_EPS });
  const level = unetLevelOf(g.scopePath + '.', ctx.c.blockOutChannels.length);
  const regions =
    ctx.regions === undefined || level === undefined
      ? undefined
      : {
          context: ctx.regions.context,
          mask: ctx.regions.masks[level]!,
          ...(ctx.regions.mix === undefined ? {} : { mix: ctx.regions.mix }),
          ...(ctx.regions.outputAdapters ? { outputAdapters: true } : {}),
          ...(regionTap === undefined ? {} : { tap: regionTap }),
        };
  const a2 = g.scope('attn2', () =>
    attention(g, n2, ctx.context, { queryDim: dim, kvDim: crossDim, heads, dimHead, qkvBias: false, tap: tap2, ...(regions === undefined ? {} : { regions }) }),
  );
  h = g.add(a2, h);
  const n3 = layerNorm(g, 'norm3', h, dim, { eps: TRANSFORMER_LAYER_NORM_EPS });
  return g.add(g.scope('ff', () => feedForward(g, n3, dim)), h);
}

/**
 * `Transformer2DModel` (continuous input): GroupNorm → proj_in (1×1 conv, or linear when
 * use_linear_projection) → transformer blocks on (B, H·W, C) tokens → proj_out → + input.
 * (B, C, H, W) → (B, C, H, W)
 */
function transformer2DModel(ctx: Ctx, input: Value, channels: number, heads: number, layers: number, crossDim: number, onlyCrossAttention: boolean): Value {
  const { g, c } = ctx;
  const inner = channels; // heads · (channels / heads)
  const inPrefix = ctx.prefix?.active === true;
  let x = input;
  const normed = groupNorm(g, 'norm', x, channels, { groups: c.normNumGroups, eps: TRANSFORMER_NORM_EPS });
  let tokens: Value;
  if (c.useLinearProjection) {
    const flat = g.reshape(g.transpose(normed, [0, 2, 3, 1]), [0, -1, channels]); // (B, C, H, W) → (B, H·W, C)
    tokens = linear(g, 'proj_in', flat, channels, inner, { bias: true });
  } else {
    const projected = conv2d(g, 'proj_in', normed, channels, inner, { kernel: 1 });
    tokens = g.reshape(g.transpose(projected, [0, 2, 3, 1]), [0, -1, inner]); // (B, C, H, W) → (B, H·W, C)
  }
  for (let i = 0; i < layers; i++) {
    tokens = g.scope(`transformer_blocks.${i}`, () => basicTransformerBlock(ctx, tokens, inner, heads, crossDim, onlyCrossAttention));
  }
  // The prefix ended inside: the residual input is gathered to the batch too.
  if (inPrefix && ctx.prefix !== undefined && ctx.prefix.crossed) x = ctx.prefix.lift(x);
  let out: Value;
  if (c.useLinearProjection) {
    const projected = linear(g, 'proj_out', tokens, inner, channels, { bias: true });
    out = g.reshape(g.transpose(projected, [0, 2, 1]), g.shape(x)); // (B, H·W, C) → (B, C, H, W)
  } else {
    const grid = g.reshape(g.transpose(tokens, [0, 2, 1]), g.shape(x)); // (B, H·W, C) → (B, C, H, W)
    out = conv2d(g, 'proj_out', grid, inner, channels, { kernel: 1 });
  }
  return g.add(out, x);
}

function resnet(ctx: Ctx, x: Value, inChannels: number, outChannels: number, outputScaleFactor = 1): Value {
  const { c } = ctx;
  return resnetBlock2D(ctx.g, x, ctx.temb, {
    inChannels,
    outChannels,
    tembChannels: ctx.tembChannels,
    groups: c.normNumGroups,
    eps: c.normEps,
    outputScaleFactor,
  });
}

/** `Downsample2D` (use_conv): 3×3 conv, stride 2; padding 0 means F.pad(0, 1, 0, 1) first. */
function downsample2D(ctx: Ctx, x: Value, channels: number): Value {
  const p = ctx.c.downsamplePadding;
  const padding = p === 0 ? ([0, 0, 1, 1] as const) : p;
  return conv2d(ctx.g, 'conv', x, channels, channels, { kernel: 3, stride: 2, padding });
}

/** `Upsample2D` (use_conv): nearest to the skip's size (×2 when even), then 3×3 conv. */
function upsample2D(ctx: Ctx, x: Value, channels: number, sizeOf: Value | undefined): Value {
  const up = sizeOf === undefined ? ctx.g.interpolateNearest2x(x) : ctx.g.interpolateNearestLike(x, sizeOf);
  return conv2d(ctx.g, 'conv', up, channels, channels, { kernel: 3, padding: 1 });
}

/**
 * `CrossAttnDownBlock2D` / `DownBlock2D`: (resnet [+ transformer]) × layers, then the downsampler.
 * Every layer output and the downsampler output are skip connections.
 */
function downBlock(ctx: Ctx, i: number, x: Value, inChannels: number, skips: Value[], withDownsampler = true): Value {
  const { g, c } = ctx;
  const out = c.blockOutChannels[i]!;
  const withAttention = c.downBlockTypes[i] === 'CrossAttnDownBlock2D';
  let h = x;
  for (let j = 0; j < c.layersPerBlock[i]!; j++) {
    h = g.scope(`resnets.${j}`, () => resnet(ctx, h, j === 0 ? inChannels : out, out));
    if (withAttention) {
      h = g.scope(`attentions.${j}`, () =>
        transformer2DModel(ctx, h, out, c.numAttentionHeads[i]!, c.transformerLayersPerBlock[i]!, c.crossAttentionDim[i]!, c.onlyCrossAttention[i]!),
      );
    }
    skips.push(h);
  }
  if (withDownsampler && i < c.blockOutChannels.length - 1) {
    h = g.scope('downsamplers.0', () => downsample2D(ctx, h, out));
    skips.push(h);
  }
  return h;
}

/** `UNetMidBlock2DCrossAttn`: resnet, then (transformer, resnet) × transformer layers. */
function midBlock(ctx: Ctx, x: Value): Value {
  const { g, c } = ctx;
  const last = c.blockOutChannels.length - 1;
  const ch = c.blockOutChannels[last]!;
  let h = g.scope('resnets.0', () => resnet(ctx, x, ch, ch, c.midBlockScaleFactor));
  h = g.scope('attentions.0', () =>
    transformer2DModel(ctx, h, ch, c.numAttentionHeads[last]!, c.transformerLayersPerBlock[last]!, c.crossAttentionDim[last]!, false),
  );
  return g.scope('resnets.1', () => resnet(ctx, h, ch, ch, c.midBlockScaleFactor));
}

/**
 * `CrossAttnUpBlock2D` / `UpBlock2D` i (counted from the bottom): each layer concatenates the
 * latest skip ([hidden, skip] on channels), runs resnet [+ transformer]; then the upsampler, sized
 * like the next skip on the stack.
 */
function upBlock(ctx: Ctx, i: number, x: Value, prevOutputChannels: number, skips: Value[]): Value {
  const { g, c } = ctx;
  const n = c.blockOutChannels.length;
  const rev = n - 1 - i; // the down block this up block mirrors
  const out = c.blockOutChannels[rev]!;
  const input = c.blockOutChannels[Math.max(rev - 1, 0)]!;
  const layers = c.layersPerBlock[rev]! + 1;
  const withAttention = c.upBlockTypes[i] === 'CrossAttnUpBlock2D';
  let h = x;
  for (let j = 0; j < layers; j++) {
    const skip = skips.pop();
    if (skip === undefined) throw new ModelError('GRAPH_BUILD', `${g.scopePath}: ran out of skip connections (down and up block layer counts disagree)`);
    const skipChannels = j === layers - 1 ? input : out;
    const resnetIn = j === 0 ? prevOutputChannels : out;
    h = g.concat([h, skip], { dim: 1 }); // (B, resnetIn + skip, H, W)
    h = g.scope(`resnets.${j}`, () => resnet(ctx, h, resnetIn + skipChannels, out));
    if (withAttention) {
      h = g.scope(`attentions.${j}`, () =>
        transformer2DModel(ctx, h, out, c.numAttentionHeads[rev]!, c.transformerLayersPerBlock[rev]!, c.crossAttentionDim[rev]!, c.onlyCrossAttention[rev]!),
      );
    }
  }
  if (i < n - 1) {
    const next = skips[skips.length - 1];
    h = g.scope('upsamplers.0', () => upsample2D(ctx, h, out, next));
  }
  return h;
}

/** Build the UNet graph for `config`. Throws GRAPH_BUILD for unknown tap names. */
export function buildUnetGraph(config: UnetConfig, options: UnetBuildOptions = {}): Graph {
  const g = new Ops('unet');
  const c = config;
  if (options.adapterBank === true) attachAdapterBank(g, UNET_BANK_PREFIXES, options.bankFamilies);
  if (options.regions === true && options.adapterBank === true) enableSpatialMix(g, (module) => unetLevelOf(module, c.blockOutChannels.length));
  const crossDim = c.crossAttentionDim[0]!;
  if (!c.crossAttentionDim.every((d) => d === crossDim)) {
    throw new ModelError('UNSUPPORTED_ARCHITECTURE', `per-block cross_attention_dim ${JSON.stringify(c.crossAttentionDim)} is not supported (one text-embedding width expected)`);
  }
  const shared = options.sharedPrefix === true;
  if (shared && (options.regions === true || options.debugOutputs === true)) {
    throw new ModelError('GRAPH_BUILD', 'a shared prefix does not go with regions or debug outputs', {});
  }
  const sample = g.input('sample', 'float32', [shared ? 'samples' : 'batch', c.inChannels, 'height', 'width']);
  const timestep = g.input('timestep', 'float32', ['timestep_batch']);
  const context = g.input('encoder_hidden_states', 'float32', ['batch', 'sequence', crossDim]);
  const debug = (name: string, v: Value) => {
    if (options.debugOutputs === true) g.output(g.identity(v), `debug.${name}`, 'float32', undefined);
  };

  // 1. time: sinusoidal projection, then the MLP.
  const c0 = c.blockOutChannels[0]!;
  const tembChannels = c0 * TIME_EMBED_MULT;
  const tProj = timesteps(g, timestep, c0, c.flipSinToCos, c.freqShift);
  const temb = g.scope('time_embedding', () => timestepEmbedding(g, tProj, c0, tembChannels));
  debug('time_proj', tProj);
  debug('time_embedding', temb);

  const wanted = new Set(options.attentionProbs ?? []);
  let regions: Ctx['regions'];
  if (options.regions === true) {
    const regionContext = g.input(REGION_CONTEXT_INPUT, 'float32', ['batch', 'regions', 'region_sequence', crossDim]);
    const masks = c.blockOutChannels.map((_, l) => g.input(REGION_MASK_INPUT(l), 'float32', ['batch', 'regions', `level${l}_height`, `level${l}_width`]));
    let mix: Value | undefined;
    if (options.adapterBank === true) {
      const slotMix = g.input(REGION_LORA_MIX_INPUT, 'float32', ['batch', 'regions', 'adapters']);
      mix = g.reshape(slotMix, g.concat([g.int64s([-1]), g.shape(slotMix, { start: 2 })], { dim: 0 })); // (B, R, K) → (B·R, K)
    }
    regions = {
      context: regionContext,
      masks,
      ...(mix === undefined ? {} : { mix }),
      outputAdapters: options.regionOutputAdapters === true,
      ...(options.selfAttentionIsolation === true ? { isolation: new Map<number, Value>() } : {}),
    };
  } else if (options.selfAttentionIsolation === true || options.regionOutputAdapters === true) {
    throw new ModelError('GRAPH_BUILD', 'self-attention isolation and region output adapters need the regions variant', {});
  }
  const maps = options.attentionMaps === undefined ? undefined : { level: options.attentionMaps.level, cross: [] as Value[], self: [] as Value[], regionCross: [] as Value[] };
  const skips: Value[] = [];
  let prefix: SharedPrefix | undefined;
  if (shared) {
    const index = g.input(SAMPLE_INDEX_INPUT, 'int64', ['batch']);
    const rows = options.adapterBank === true ? g.input(SAMPLE_ROWS_INPUT, 'int64', ['samples']) : undefined;
    const restore = rows === undefined ? () => undefined : withBankMix(g, (mix) => g.gather(mix, rows, { dim: 0 }));
    prefix = new SharedPrefix(g, index, skips, restore);
  }
  const ctx: Ctx = { g, c, temb, tembChannels, context, taps: new Map(), wanted, ...(maps === undefined ? {} : { maps }), ...(regions === undefined ? {} : { regions }), ...(prefix === undefined ? {} : { prefix }) };

  // 2. conv_in; its output is the first skip.
  let h = conv2d(g, 'conv_in', sample, c.inChannels, c0, { kernel: 3, padding: 1 });
  debug('conv_in', h);
  skips.push(h);

  const n = c.blockOutChannels.length;
  if (options.shallow === true) {
    // 3–5 (shallow). down_blocks.0 pairs only; the last up block starts from the cached feature.
    h = g.scope('down_blocks.0', () => downBlock(ctx, 0, h, c0, skips, false));
    // The cached feature is per batch element: a prefix still running (no cross-attention in
    // down_blocks.0) ends here, its skips gathered.
    if (prefix?.active === true) prefix.leave();
    const featureChannels = c.blockOutChannels[Math.min(1, n - 1)]!;
    const feature = g.input('deep_feature', 'float32', ['batch', featureChannels, 'height', 'width']);
    h = g.scope(`up_blocks.${n - 1}`, () => upBlock(ctx, n - 1, feature, featureChannels, skips));
  } else {
    // 3. down path.
    let channels = c0;
    for (let i = 0; i < n; i++) {
      const inCh = channels;
      h = g.scope(`down_blocks.${i}`, () => downBlock(ctx, i, h, inCh, skips));
      channels = c.blockOutChannels[i]!;
      debug(`down_blocks.${i}`, h);
    }

    // 4. mid.
    h = g.scope('mid_block', () => midBlock(ctx, h));
    debug('mid_block', h);

    // 5. up path, popping skips. The last up block's input is the deep feature.
    for (let i = 0; i < c.upBlockTypes.length; i++) {
      const prev = channels;
      if (i === n - 1 && options.deepFeature === true) g.output(g.identity(prefix?.active === true ? prefix.lift(h) : h), 'deep_feature', 'float32', ['batch', prev, 'height', 'width']);
      h = g.scope(`up_blocks.${i}`, () => upBlock(ctx, i, h, prev, skips));
      channels = c.blockOutChannels[n - 1 - i]!;
      debug(`up_blocks.${i}`, h);
    }
  }
  g.check(skips.length === 0, `${skips.length} skip connections left unused`);
  // A UNet without cross-attention: the prefix is the whole network.
  if (prefix?.active === true) {
    prefix.leave();
    h = prefix.lift(h);
  }

  // 6. out: GroupNorm → SiLU → conv.
  const normed = groupNorm(g, 'conv_norm_out', h, c0, { groups: c.normNumGroups, eps: c.normEps });
  debug('conv_norm_out', normed);
  const noisePred = conv2d(g, 'conv_out', g.silu(normed), c0, c.outChannels, { kernel: 3, padding: 1 });
  g.output(noisePred, 'noise_pred', 'float32', ['batch', c.outChannels, 'height', 'width']);

  for (const module of wanted) {
    const probs = ctx.taps.get(module);
    if (probs === undefined) {
      throw new ModelError('GRAPH_BUILD', `attention tap ${module}: no such attention module in this UNet`, { module });
    }
    // (B, h, N, M) → (B·h, N, M), row b·heads + h, as diffusers' get_attention_scores returns them.
    g.output(g.reshape(probs, g.concat([g.int64s([-1]), g.shape(probs, { start: 2 })], { dim: 0 })), `attn_probs.${module}`, 'float32', ['batch_heads', 'queries', 'keys']);
  }
  if (ctx.maps !== undefined) {
    const { cross, self, regionCross, level } = ctx.maps;
    if (cross.length === 0) throw new ModelError('GRAPH_BUILD', `attention maps: no transformer block on level ${level} of this UNet`, { level });
    const average = (parts: Value[]) => g.div(parts.slice(1).reduce((acc, p) => g.add(acc, p), parts[0]!), g.scalar(parts.length));
    g.output(average(cross), 'xattn', 'float32', ['batch', 'queries', 'sequence']);
    g.output(average(self), 'selfattn', 'float32', ['batch', 'queries', 'queries']);
    // Region slots: each slot's probabilities over the whole image (full query against the slot's keys).
    if (regionCross.length > 0) g.output(average(regionCross), 'xattn_region', 'float32', ['batch', 'regions', 'queries', 'region_sequence']);
  }
  return g.finish();
}

/** Every attention module path of a UNet config, in graph order (for callers choosing taps). */
export function listAttentionModules(config: UnetConfig): string[] {
  const g = buildUnetGraph(config);
  const out = new Set<string>();
  for (const p of g.params) {
    const m = /^(.*\.attn[12])\.to_q\.weight$/.exec(p.name);
    if (m !== null) out.add(m[1]!);
  }
  return [...out];
}

