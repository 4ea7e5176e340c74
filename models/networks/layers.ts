/**
 * torch.nn layers as scoped parameter declarations plus their forward op: `nn.Linear`,
 * `nn.Conv2d`, `nn.GroupNorm`, `nn.LayerNorm`. Each takes the module's local name (the key
 * segment, e.g. `to_q` or `in_layers.2`) and declares `<name>.weight` / `<name>.bias`.
 */
import type { Value } from '../onnx/builder.ts';
import type { Ops, Padding2d } from '../onnx/ops.ts';
import { convLowRank, linearLowRank } from './adapter-bank.ts';

/**
 * `nn.Linear(inFeatures, outFeatures, bias)`; weight [out, in]. (B, …, in) → (B, …, out).
 * `inputRank` (default 3: tokens (B, N, C)) tells an adapter bank how to broadcast its per-batch mix.
 */
export function linear(g: Ops, name: string, x: Value, inFeatures: number, outFeatures: number, options: { bias: boolean; inputRank?: number; bank?: boolean; mix?: Value }): Value {
  return g.scope(name, () => {
    const wT = g.param('weight', [inFeatures, outFeatures], 'float32', { transposed: true }); // stored [out, in]
    const b = options.bias ? g.param('bias', [outFeatures]) : undefined;
    const low = options.bank === false ? undefined : linearLowRank(g, g.scopePath, x, inFeatures, outFeatures, options.inputRank ?? 3, options.mix);
    if (low === undefined) return g.linear(x, wT, b);
    // y = x·Wᵀ + b + hidden·up as one product over the widened inner axis, [x | hidden]·[Wᵀ ; up]:
    // no separate delta tensor to write and add back (the bank's cost is mostly that memory traffic).
    return g.linear(g.concat([x, low.hidden], { dim: -1 }), g.concat([wT, low.up], { dim: 0 }), b);
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
    const low = convLowRank(g, g.scopePath, x, inChannels, outChannels, options.kernel, stride, padding);
    if (low === undefined) return g.conv2d(x, w, b, { stride, padding });
    // A 1×1 conv takes its delta as extra input channels, [x | hidden] * [W | up] (see `linear`);
    // a wider kernel adds the 1×1 up-projection's output.
    if (options.kernel === 1 && stride === 1 && padding === 0) return g.conv2d(g.concat([x, low.hidden], { dim: 1 }), g.concat([w, low.up], { dim: 1 }), b, { stride, padding });
    return g.add(g.conv2d(x, w, b, { stride, padding }), g.conv2d(low.hidden, low.up, undefined, {}));
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
