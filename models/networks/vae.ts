/**
 * The SD VAE (`AutoencoderKL`): decoder and encoder graphs, driven by the VAE config.
 * Scope paths are diffusers checkpoint keys (`decoder.up_blocks.0.resnets.2.conv1`).
 *
 * Reference: diffusers v0.24.0,
 * https://github.com/huggingface/diffusers/blob/v0.24.0/src/diffusers/models/autoencoder_kl.py
 * https://github.com/huggingface/diffusers/blob/v0.24.0/src/diffusers/models/vae.py (Encoder, Decoder)
 * https://github.com/huggingface/diffusers/blob/v0.24.0/src/diffusers/models/unet_2d_blocks.py
 * (DownEncoderBlock2D, UpDecoderBlock2D, UNetMidBlock2D)
 *
 * Decoder graph: `latents_scaled` (B, 4, h, w) in the UNet's latent space → `decoder_output`
 * = decoder(post_quant_conv(latents / scaling_factor)) (B, 3, 8h, 8w), and `image01` =
 * clamp(decoder_output / 2 + 0.5, 0, 1).
 * Encoder graph: `image` (B, 3, H, W) in [-1, 1] → `moments` = quant_conv(encoder(x)),
 * `mean`, `logvar` (clamped to [−30, 20]) and `std` = exp(logvar / 2).
 */
import type { Graph, Value } from '../onnx/builder.ts';
import { Ops } from '../onnx/ops.ts';
import { attention, resnetBlock2D } from './blocks.ts';
import { conv2d, groupNorm } from './layers.ts';
import type { VaeConfig } from './config.ts';

/** Every GroupNorm in the SD VAE uses eps 1e-6 (`resnet_eps` / norm layers in vae.py). */
const VAE_NORM_EPS = 1e-6;
/** DiagonalGaussianDistribution clamps logvar to this range. */
const LOGVAR_MIN = -30;
const LOGVAR_MAX = 20;

function vaeResnet(g: Ops, x: Value, inChannels: number, outChannels: number, c: VaeConfig): Value {
  return resnetBlock2D(g, x, undefined, { inChannels, outChannels, tembChannels: undefined, groups: c.normNumGroups, eps: VAE_NORM_EPS, outputScaleFactor: 1 });
}

/**
 * The mid-block `Attention` of the VAE: single head of width C, GroupNorm on the input, linear
 * q/k/v/out with bias, residual. (B, C, H, W) → (B, C, H, W)
 */
function vaeAttention(g: Ops, x: Value, channels: number, c: VaeConfig): Value {
  const normed = groupNorm(g, 'group_norm', x, channels, { groups: c.normNumGroups, eps: VAE_NORM_EPS });
  const tokens = g.transpose(g.reshape(normed, [0, channels, -1]), [0, 2, 1]); // (B, C, H, W) → (B, H·W, C)
  const attended = attention(g, tokens, undefined, { queryDim: channels, kvDim: channels, heads: 1, dimHead: channels, qkvBias: true });
  const grid = g.reshape(g.transpose(attended, [0, 2, 1]), g.shape(x)); // (B, H·W, C) → (B, C, H, W)
  return g.add(grid, x);
}

/** `UNetMidBlock2D` without time embedding: resnet, attention, resnet. */
function vaeMidBlock(g: Ops, x: Value, channels: number, c: VaeConfig): Value {
  let h = g.scope('resnets.0', () => vaeResnet(g, x, channels, channels, c));
  if (c.midBlockAddAttention) h = g.scope('attentions.0', () => vaeAttention(g, h, channels, c));
  return g.scope('resnets.1', () => vaeResnet(g, h, channels, channels, c));
}

/** `Decoder`: conv_in → mid → up blocks (reversed channels, layers+1 resnets, ×2 upsample) → norm, SiLU, conv_out. */
function decoder(g: Ops, z: Value, c: VaeConfig): Value {
  const ch = c.blockOutChannels;
  const n = ch.length;
  const top = ch[n - 1]!;
  let h = conv2d(g, 'conv_in', z, c.latentChannels, top, { kernel: 3, padding: 1 });
  h = g.scope('mid_block', () => vaeMidBlock(g, h, top, c));
  let prev = top;
  for (let i = 0; i < n; i++) {
    const out = ch[n - 1 - i]!;
    const inCh = prev;
    h = g.scope(`up_blocks.${i}`, () => {
      let x = h;
      for (let j = 0; j <= c.layersPerBlock; j++) {
        const from = j === 0 ? inCh : out;
        x = g.scope(`resnets.${j}`, () => vaeResnet(g, x, from, out, c));
      }
      if (i < n - 1) {
        // Upsample2D: nearest ×2, then 3×3 conv.
        x = g.scope('upsamplers.0', () => conv2d(g, 'conv', g.interpolateNearest2x(x), out, out, { kernel: 3, padding: 1 }));
      }
      return x;
    });
    prev = out;
  }
  const normed = groupNorm(g, 'conv_norm_out', h, ch[0]!, { groups: c.normNumGroups, eps: VAE_NORM_EPS });
  return conv2d(g, 'conv_out', g.silu(normed), ch[0]!, c.outChannels, { kernel: 3, padding: 1 });
}

/**
 * `Encoder` (double_z): conv_in → down blocks (resnets, then a stride-2 conv whose input is padded
 * (0, 1, 0, 1), i.e. right and bottom only) → mid → norm, SiLU, conv_out to 2·latent channels.
 */
function encoder(g: Ops, x: Value, c: VaeConfig): Value {
  const ch = c.blockOutChannels;
  const n = ch.length;
  let h = conv2d(g, 'conv_in', x, c.inChannels, ch[0]!, { kernel: 3, padding: 1 });
  let prev = ch[0]!;
  for (let i = 0; i < n; i++) {
    const out = ch[i]!;
    const inCh = prev;
    h = g.scope(`down_blocks.${i}`, () => {
      let y = h;
      for (let j = 0; j < c.layersPerBlock; j++) {
        const from = j === 0 ? inCh : out;
        y = g.scope(`resnets.${j}`, () => vaeResnet(g, y, from, out, c));
      }
      if (i < n - 1) {
        y = g.scope('downsamplers.0', () => conv2d(g, 'conv', y, out, out, { kernel: 3, stride: 2, padding: [0, 0, 1, 1] }));
      }
      return y;
    });
    prev = out;
  }
  const top = ch[n - 1]!;
  h = g.scope('mid_block', () => vaeMidBlock(g, h, top, c));
  const normed = groupNorm(g, 'conv_norm_out', h, top, { groups: c.normNumGroups, eps: VAE_NORM_EPS });
  return conv2d(g, 'conv_out', g.silu(normed), top, 2 * c.latentChannels, { kernel: 3, padding: 1 });
}

export function buildVaeDecoderGraph(config: VaeConfig): Graph {
  const c = config;
  const g = new Ops('vae_decoder');
  const latents = g.input('latents_scaled', 'float32', ['batch', c.latentChannels, 'latent_height', 'latent_width']);
  let z = g.div(latents, g.scalar(c.scalingFactor));
  if (c.usePostQuantConv) z = conv2d(g, 'post_quant_conv', z, c.latentChannels, c.latentChannels, { kernel: 1 });
  const out = g.scope('decoder', () => decoder(g, z, c));
  const shape = ['batch', c.outChannels, 'height', 'width'];
  g.output(out, 'decoder_output', 'float32', shape);
  g.output(g.clamp(g.add(g.mul(out, g.scalar(0.5)), g.scalar(0.5)), { min: 0, max: 1 }), 'image01', 'float32', shape);
  return g.finish();
}

export function buildVaeEncoderGraph(config: VaeConfig): Graph {
  const c = config;
  const g = new Ops('vae_encoder');
  const image = g.input('image', 'float32', ['batch', c.inChannels, 'height', 'width']);
  let moments = g.scope('encoder', () => encoder(g, image, c));
  if (c.useQuantConv) moments = conv2d(g, 'quant_conv', moments, 2 * c.latentChannels, 2 * c.latentChannels, { kernel: 1 });
  const [mean, rawLogvar] = g.chunk(moments, 2, { dim: 1 });
  const logvar = g.clamp(rawLogvar!, { min: LOGVAR_MIN, max: LOGVAR_MAX });
  const shape = ['batch', c.latentChannels, 'latent_height', 'latent_width'];
  g.output(moments, 'moments', 'float32', ['batch', 2 * c.latentChannels, 'latent_height', 'latent_width']);
  g.output(mean!, 'mean', 'float32', shape);
  g.output(logvar, 'logvar', 'float32', shape);
  g.output(g.exp(g.mul(logvar, g.scalar(0.5))), 'std', 'float32', shape);
  return g.finish();
}
