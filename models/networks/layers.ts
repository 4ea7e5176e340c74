/**
 * torch.nn layers as scoped parameter declarations plus their forward op: `nn.Linear`,
 * `nn.Conv2d`, `nn.GroupNorm`, `nn.LayerNorm`. Each takes the module's local name (the key
 * segment, e.g. `to_q` or `in_layers.2`) and declares `<name>.weight` / `<name>.bias`.
 */
import type { Value } from '../onnx/builder.ts';
import type { Ops, Padding2d } from '../onnx/ops.ts';
import { convDelta, linearDelta } from './adapter-bank.ts';

/**
 * `nn.Linear(inFeatures, outFeatures, bias)`; weight [out, in]. (B, …, in) → (B, …, out).
 * `inputRank` (default 3: tokens (B, N, C)) tells an adapter bank how to broadcast its per-batch mix.
 */
export function linear(g: Ops, name: string, x: Value, inFeatures: number, outFeatures: number, options: { bias: boolean; inputRank?: number; bank?: boolean; mix?: Value }): Value {
  return g.scope(name, () => {
    const wT = g.param('weight', [inFeatures, outFeatures], 'float32', { transposed: true }); // stored [out, in]
    const b = options.bias ? g.param('bias', [outFeatures]) : undefined;
    const y = g.linear(x, wT, b);
    const delta = options.bank === false ? undefined : linearDelta(g, g.scopePath, x, inFeatures, outFeatures, options.inputRank ?? 3, options.mix);
    return delta === undefined ? y : g.add(y, delta);
  });
}

/** `nn.Conv2d(in, out, kernel, stride, padding)` with bias; weight [out, in, k, k]. */
export function conv2d(
  g: Ops,
  name: string,
  x: Value,
  inChannels: number,
  outChannels: number,
  options: { kernel: number; stride?: number; padding?: Padding2d },
): Value {
  return g.scope(name, () => {
    const w = g.param('weight', [outChannels, inChannels, options.kernel, options.kernel]);
    const b = g.param('bias', [outChannels]);
    const stride = options.stride ?? 1;
    const padding = options.padding ?? 0;
    const y = g.conv2d(x, w, b, { stride, padding });
    const delta = convDelta(g, g.scopePath, x, inChannels, outChannels, options.kernel, stride, padding);
    return delta === undefined ? y : g.add(y, delta);
  });
}

/** `nn.GroupNorm(groups, channels, eps, affine=True)` on (B, C, H, W). */
export function groupNorm(g: Ops, name: string, x: Value, channels: number, options: { groups: number; eps: number }): Value {
  return g.scope(name, () => {
    const w = g.param('weight', [channels]);
    const b = g.param('bias', [channels]);
    return g.groupNorm(x, w, b, { groups: options.groups, channels, eps: options.eps });
  });
}

/** `nn.LayerNorm(dim, eps)` over the last axis. */
export function layerNorm(g: Ops, name: string, x: Value, dim: number, options: { eps: number }): Value {
  return g.scope(name, () => {
    const w = g.param('weight', [dim]);
    const b = g.param('bias', [dim]);
    return g.layerNorm(x, w, b, { eps: options.eps });
  });
}
