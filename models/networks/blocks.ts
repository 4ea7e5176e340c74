/**
 * Blocks shared by the UNet and the VAE: diffusers' `Attention` (with the classic `AttnProcessor`)
 * and `ResnetBlock2D`. Parameter names are the checkpoint's local names.
 *
 * Reference: diffusers v0.24.0,
 * https://github.com/huggingface/diffusers/blob/v0.24.0/src/diffusers/models/attention_processor.py
 * https://github.com/huggingface/diffusers/blob/v0.24.0/src/diffusers/models/resnet.py
 */
import type { Value } from '../onnx/builder.ts';
import type { Ops } from '../onnx/ops.ts';
import { conv2d, groupNorm, linear } from './layers.ts';
import { linearDelta, timeEmbeddingDelta } from './adapter-bank.ts';

/** Receives the attention probabilities (B, heads, N, M) of a module that was asked for. */
export type AttentionProbsTap = (probs: Value) => void;

export interface AttentionOptions {
  readonly queryDim: number;
  /** Width of the key/value source: `cross_attention_dim` for attn2, `queryDim` for self-attention. */
  readonly kvDim: number;
  readonly heads: number;
  readonly dimHead: number;
  /** Bias on to_q/to_k/to_v (`bias=` in diffusers; false in the UNet, true in the VAE). */
  readonly qkvBias: boolean;
  readonly tap?: AttentionProbsTap;
  /** Region routing of a cross-attention (Mix-of-Show regionally controllable sampling). */
  readonly regions?: RegionRouting;
  /**
   * Additive score bias, broadcast onto the scaled scores (B, heads, N, M): LoRA-Composer's
   * self-attention isolation (a large negative value where a query may not see a key).
   */
  readonly scoreBias?: Value;
}

/**
 * Region slots for a cross-attention layer: R extra text contexts, each attended by every query,
 * and a 0/1 mask per slot on this layer's grid. The layer's output before `to_out` becomes, per
 * pixel q with count(q) = Σ_r m_r(q): the global output where count(q) = 0, else
 * Σ_r m_r(q)·O_r(q) / count(q) (Gu et al. 2023, Mix-of-Show; methods.md 4.2).
 */
export interface RegionRouting {
  /** (B, R, S_r, kvDim) */
  readonly context: Value;
  /** (B, R, h, w) on this layer's grid. */
  readonly mask: Value;
  /** (B·R, K) adapter mix of each slot's k/v projections, when an adapter bank is present. */
  readonly mix?: Value;
  /**
   * Each slot's output also goes through its own adapters on `to_out.0` (with `mix`): composing
   * after `to_out` as LoRA-Composer does. Since `to_out` is affine, the mean of the slots'
   * `to_out_r(O_r)` over the covering regions is `to_out(mean O_r) + mean Δ_r(O_r)`, so the slots
   * share the base projection and add their mean adapter delta.
   */
  readonly outputAdapters?: boolean;
  /** Receives each slot's probabilities over the whole image (B, R, heads, N, S). */
  readonly tap?: AttentionProbsTap;
}

/**
 * `Attention` + `AttnProcessor`: softmax(q·kᵀ·dimHead^-½)·v per head, then `to_out.0`.
 * x (B, N, queryDim), context (B, M, kvDim) or undefined for self-attention → (B, N, queryDim).
 * The tap, when set, receives the probabilities (B, heads, N, M).
 */
export function attention(g: Ops, x: Value, context: Value | undefined, o: AttentionOptions): Value {
  const inner = o.heads * o.dimHead;
  const kvSource = context ?? x;
  const q = linear(g, 'to_q', x, o.queryDim, inner, { bias: o.qkvBias });
  const k = linear(g, 'to_k', kvSource, o.kvDim, inner, { bias: o.qkvBias });
  const v = linear(g, 'to_v', kvSource, o.kvDim, inner, { bias: o.qkvBias });
  const splitHeads = [0, 0, o.heads, o.dimHead];
  const qh = g.transpose(g.reshape(q, splitHeads), [0, 2, 1, 3]); // (B, N, h·d) → (B, h, N, d)
  const kt = g.transpose(g.reshape(k, splitHeads), [0, 2, 3, 1]); // (B, M, h·d) → (B, h, d, M)
  const vh = g.transpose(g.reshape(v, splitHeads), [0, 2, 1, 3]); // (B, M, h·d) → (B, h, M, d)
  // diffusers scales after the product (baddbmm with alpha = scale).
  const scaled = g.mul(g.matmul(qh, kt), g.scalar(o.dimHead ** -0.5)); // (B, h, N, M)
  const scores = o.scoreBias === undefined ? scaled : g.add(scaled, o.scoreBias);
  const probs = g.softmax(scores, { dim: -1 });
  o.tap?.(probs); // (B, h, N, M)
  let out = g.reshape(g.transpose(g.matmul(probs, vh), [0, 2, 1, 3]), [0, 0, inner]); // (B, h, N, d) → (B, N, h·d)
  if (o.regions === undefined) return g.scope('to_out', () => linear(g, '0', out, inner, o.queryDim, { bias: true }));
  const routed = routeRegions(g, out, qh, o, inner);
  out = routed.output;
  const projected = g.scope('to_out', () => linear(g, '0', out, inner, o.queryDim, { bias: true }));
  if (o.regions.outputAdapters !== true || o.regions.mix === undefined) return projected;
  // Each slot's own adapter delta on to_out.0, averaged over the covering regions (see RegionRouting).
  const flat = g.reshape(routed.perSlot, g.concat([g.int64s([-1]), g.shape(routed.perSlot, { start: 2 })], { dim: 0 })); // (B, R, N, h·d) → (B·R, N, h·d)
  const delta = linearDelta(g, `${g.scopePath}.to_out.0`, flat, inner, o.queryDim, 3, o.regions.mix);
  if (delta === undefined) return projected;
  const perSlot = g.reshape(delta, g.concat([g.shape(routed.perSlot, { end: 3 }), g.int64s([o.queryDim])], { dim: 0 })); // (B·R, N, out) → (B, R, N, out)
  const summed = g.reduceSum(g.mul(perSlot, routed.mask), { dims: [1], keepdim: false }); // (B, N, out)
  return g.add(projected, g.div(summed, g.max(routed.count, g.scalar(1))));
}

/** The region slots' attention outputs composed into the global one (see `RegionRouting`). */
function routeRegions(g: Ops, global: Value, qh: Value, o: AttentionOptions, inner: number): { output: Value; perSlot: Value; mask: Value; count: Value } {
  const r = o.regions!;
  const lead = g.shape(r.context, { end: 2 }); // [B, R]
  const flat = g.reshape(r.context, g.concat([g.int64s([-1]), g.shape(r.context, { start: 2 })], { dim: 0 })); // (B·R, S, D)
  const mixOption = r.mix === undefined ? {} : { mix: r.mix };
  const k = linear(g, 'to_k', flat, o.kvDim, inner, { bias: o.qkvBias, ...mixOption });
  const v = linear(g, 'to_v', flat, o.kvDim, inner, { bias: o.qkvBias, ...mixOption });
  const split = g.concat([lead, g.int64s([-1, o.heads, o.dimHead])], { dim: 0 });
  const kt = g.transpose(g.reshape(k, split), [0, 1, 3, 4, 2]); // (B·R, S, h·d) → (B, R, h, d, S)
  const vh = g.transpose(g.reshape(v, split), [0, 1, 3, 2, 4]); // → (B, R, h, S, d)
  const scores = g.mul(g.matmul(g.unsqueeze(qh, [1]), kt), g.scalar(o.dimHead ** -0.5)); // (B, 1, h, N, d)·(B, R, h, d, S) → (B, R, h, N, S)
  const probs = g.softmax(scores, { dim: -1 }); // (B, R, h, N, S)
  r.tap?.(probs);
  const slots = g.matmul(probs, vh); // (B, R, h, N, d)
  const perSlot = g.reshape(g.transpose(slots, [0, 1, 3, 2, 4]), [0, 0, 0, inner]); // (B, R, N, h·d)
  const mask = g.unsqueeze(g.reshape(r.mask, [0, 0, -1]), [3]); // (B, R, h, w) → (B, R, N, 1)
  const summed = g.reduceSum(g.mul(perSlot, mask), { dims: [1], keepdim: false }); // (B, N, h·d)
  const count = g.reduceSum(mask, { dims: [1], keepdim: false }); // (B, N, 1)
  const outside = g.sub(g.scalar(1), g.min(count, g.scalar(1)));
  return { output: g.add(g.mul(global, outside), g.div(summed, g.max(count, g.scalar(1)))), perSlot, mask, count };
}

export interface ResnetOptions {
  readonly inChannels: number;
  readonly outChannels: number;
  /** Width of the time embedding, or undefined for the VAE's resnets (no `time_emb_proj`). */
  readonly tembChannels: number | undefined;
  readonly groups: number;
  readonly eps: number;
  readonly outputScaleFactor: number;
}

/**
 * `ResnetBlock2D` (time_embedding_norm "default"):
 * h = conv1(silu(norm1(x))) + time_emb_proj(silu(temb))[:, :, None, None];
 * h = conv2(silu(norm2(h))); out = (shortcut(x) + h) / output_scale_factor.
 * x (B, in, H, W), temb (B, T) → (B, out, H, W). `conv_shortcut` (1×1) exists iff in ≠ out.
 */
export function resnetBlock2D(g: Ops, x: Value, temb: Value | undefined, o: ResnetOptions): Value {
  let h = g.silu(groupNorm(g, 'norm1', x, o.inChannels, { groups: o.groups, eps: o.eps }));
  h = conv2d(g, 'conv1', h, o.inChannels, o.outChannels, { kernel: 3, padding: 1 });
  if (temb !== undefined && o.tembChannels !== undefined) {
    const act = g.silu(temb);
    const t = linear(g, 'time_emb_proj', act, o.tembChannels, o.outChannels, { bias: true, inputRank: 2, bank: false });
    h = g.add(h, g.unsqueeze(t, [2, 3])); // (B, out) → (B, out, 1, 1)
    // A LoRA on time_emb_proj: (B, out, 1, 1), or (B, out, h, w) with per-pixel strengths.
    const delta = g.scope('time_emb_proj', () => timeEmbeddingDelta(g, g.scopePath, act, o.tembChannels!, o.outChannels));
    if (delta !== undefined) h = g.add(h, delta);
  }
  h = g.silu(groupNorm(g, 'norm2', h, o.outChannels, { groups: o.groups, eps: o.eps }));
  h = conv2d(g, 'conv2', h, o.outChannels, o.outChannels, { kernel: 3, padding: 1 });
  const shortcut = o.inChannels !== o.outChannels ? conv2d(g, 'conv_shortcut', x, o.inChannels, o.outChannels, { kernel: 1 }) : x;
  const out = g.add(shortcut, h);
  return o.outputScaleFactor === 1 ? out : g.div(out, g.scalar(o.outputScaleFactor));
}
