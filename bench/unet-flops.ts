/**
 * Analytic FLOP count of one UNet forward (`UNet2DConditionModel`), walking the same block structure
 * as `models/networks/unet.ts` (conv_in → down blocks → mid block → up blocks → conv_out, with the
 * same skip stack). One multiply-add counts as 2 FLOPs. Counted:
 *   conv:      2·B·C_out·C_in·k²·H_out·W_out
 *   linear:    2·rows·in·out (rows = B·tokens)
 *   attention: QKᵀ and P·V, 2·B·heads·N·M·d each
 * Ignored (elementwise or reductions, well under 1% of the total): norms, SiLU/GELU, softmax,
 * residual adds, upsampling, the timestep sinusoids.
 *
 * As a structural self-check, the walk also sums the elements of every conv and linear weight it
 * visits; each weight is used exactly once per forward, so that sum must equal the rank ≥ 2
 * parameters the built graph declares.
 */
import type { UnetConfig } from '../models/index.ts';

/** `FeedForward` mult and GEGLU's doubled projection (diffusers defaults, as in unet.ts). */
const FEED_FORWARD_MULT = 4;
const GEGLU_PROJECTIONS = 2;
/** TimestepEmbedding width = 4 × block_out_channels[0]. */
const TIME_EMBED_MULT = 4;
const CONV_KERNEL = 3;
const DOWNSAMPLE_STRIDE = 2;

export interface UnetShape {
  readonly batch: number;
  readonly latentHeight: number;
  readonly latentWidth: number;
  /** encoder_hidden_states tokens (77 for one CLIP chunk). */
  readonly sequence: number;
}

export interface UnetFlops {
  readonly total: number;
  readonly conv: number;
  readonly linear: number;
  readonly attention: number;
  /** Elements of every conv/linear weight the walk visited (see the module comment). */
  readonly weightElements: number;
}

class Counter {
  conv = 0;
  linear = 0;
  attention = 0;
  weightElements = 0;

  conv2d(batch: number, cin: number, cout: number, kernel: number, hOut: number, wOut: number): void {
    this.conv += 2 * batch * cout * cin * kernel * kernel * hOut * wOut;
    this.weightElements += cout * cin * kernel * kernel;
  }

  dense(rows: number, inFeatures: number, outFeatures: number): void {
    this.linear += 2 * rows * inFeatures * outFeatures;
    this.weightElements += inFeatures * outFeatures;
  }

  /** QKᵀ (B, h, N, d)·(B, h, d, M) and P·V (B, h, N, M)·(B, h, M, d). */
  attentionMatmuls(batch: number, heads: number, queries: number, keys: number, dimHead: number): void {
    this.attention += 2 * (2 * batch * heads * queries * keys * dimHead);
  }
}

interface Level {
  readonly channels: number;
  readonly h: number;
  readonly w: number;
}

/** FLOPs of one forward at `shape`. Mirrors buildUnetGraph's channel and resolution arithmetic. */
export function countUnetFlops(c: UnetConfig, shape: UnetShape): UnetFlops {
  const k = new Counter();
  const B = shape.batch;
  const M = shape.sequence;
  const c0 = c.blockOutChannels[0]!;
  const tembChannels = c0 * TIME_EMBED_MULT;
  const n = c.blockOutChannels.length;

  const resnet = (inCh: number, outCh: number, h: number, w: number) => {
    k.conv2d(B, inCh, outCh, CONV_KERNEL, h, w); // conv1
    k.dense(B, tembChannels, outCh); // time_emb_proj
    k.conv2d(B, outCh, outCh, CONV_KERNEL, h, w); // conv2
    if (inCh !== outCh) k.conv2d(B, inCh, outCh, 1, h, w); // conv_shortcut
  };

  const attention = (N: number, C: number, heads: number, kvTokens: number, kvDim: number) => {
    k.dense(B * N, C, C); // to_q
    k.dense(B * kvTokens, kvDim, C); // to_k
    k.dense(B * kvTokens, kvDim, C); // to_v
    k.attentionMatmuls(B, heads, N, kvTokens, C / heads);
    k.dense(B * N, C, C); // to_out.0
  };

  const transformer = (C: number, heads: number, layers: number, crossDim: number, onlyCross: boolean, h: number, w: number) => {
    const N = h * w;
    // proj_in / proj_out: linear or 1×1 conv, the same multiply-adds either way.
    if (c.useLinearProjection) k.dense(B * N, C, C);
    else k.conv2d(B, C, C, 1, h, w);
    for (let l = 0; l < layers; l++) {
      if (onlyCross) attention(N, C, heads, M, crossDim); // attn1
      else attention(N, C, heads, N, C); // attn1
      attention(N, C, heads, M, crossDim); // attn2
      const inner = C * FEED_FORWARD_MULT;
      k.dense(B * N, C, inner * GEGLU_PROJECTIONS); // ff.net.0.proj
      k.dense(B * N, inner, C); // ff.net.2
    }
    if (c.useLinearProjection) k.dense(B * N, C, C);
    else k.conv2d(B, C, C, 1, h, w);
  };

  // time_embedding: linear_1, linear_2
  k.dense(B, c0, tembChannels);
  k.dense(B, tembChannels, tembChannels);

  // conv_in
  let h = shape.latentHeight;
  let w = shape.latentWidth;
  k.conv2d(B, c.inChannels, c0, CONV_KERNEL, h, w);
  const skips: Level[] = [{ channels: c0, h, w }];

  // down blocks
  let channels = c0;
  for (let i = 0; i < n; i++) {
    const out = c.blockOutChannels[i]!;
    for (let j = 0; j < c.layersPerBlock[i]!; j++) {
      resnet(j === 0 ? channels : out, out, h, w);
      if (c.downBlockTypes[i] === 'CrossAttnDownBlock2D') {
        transformer(out, c.numAttentionHeads[i]!, c.transformerLayersPerBlock[i]!, c.crossAttentionDim[i]!, c.onlyCrossAttention[i]!, h, w);
      }
      skips.push({ channels: out, h, w });
    }
    if (i < n - 1) {
      // Downsample2D: 3×3 stride 2; padding 0 means F.pad(0, 1, 0, 1), i.e. one pixel in total.
      const padTotal = c.downsamplePadding === 0 ? 1 : 2 * c.downsamplePadding;
      h = Math.floor((h + padTotal - CONV_KERNEL) / DOWNSAMPLE_STRIDE) + 1;
      w = Math.floor((w + padTotal - CONV_KERNEL) / DOWNSAMPLE_STRIDE) + 1;
      k.conv2d(B, out, out, CONV_KERNEL, h, w);
      skips.push({ channels: out, h, w });
    }
    channels = out;
  }

  // mid block: resnet, transformer, resnet
  const last = n - 1;
  resnet(channels, channels, h, w);
  transformer(channels, c.numAttentionHeads[last]!, c.transformerLayersPerBlock[last]!, c.crossAttentionDim[last]!, false, h, w);
  resnet(channels, channels, h, w);

  // up blocks: each layer concatenates the latest skip on channels
  for (let i = 0; i < n; i++) {
    const rev = n - 1 - i;
    const out = c.blockOutChannels[rev]!;
    for (let j = 0; j < c.layersPerBlock[rev]! + 1; j++) {
      const skip = skips.pop();
      if (skip === undefined) throw new Error(`countUnetFlops: up_blocks.${i} ran out of skip connections`);
      resnet((j === 0 ? channels : out) + skip.channels, out, h, w);
      if (c.upBlockTypes[i] === 'CrossAttnUpBlock2D') {
        transformer(out, c.numAttentionHeads[rev]!, c.transformerLayersPerBlock[rev]!, c.crossAttentionDim[rev]!, c.onlyCrossAttention[rev]!, h, w);
      }
    }
    if (i < n - 1) {
      // Upsample2D: nearest to the next skip's size, then a 3×3 conv there.
      const next = skips[skips.length - 1]!;
      h = next.h;
      w = next.w;
      k.conv2d(B, out, out, CONV_KERNEL, h, w);
    }
    channels = out;
  }
  if (skips.length !== 0) throw new Error(`countUnetFlops: ${skips.length} skip connections left unused`);

  // conv_out
  k.conv2d(B, c0, c.outChannels, CONV_KERNEL, h, w);

  return { total: k.conv + k.linear + k.attention, conv: k.conv, linear: k.linear, attention: k.attention, weightElements: k.weightElements };
}
