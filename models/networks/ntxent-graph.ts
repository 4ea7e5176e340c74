/**
 * CLoRA's contrastive loss (NT-Xent over min–max normalised attention maps) as graph ops, so that a
 * latent update can run as ONE pass (forward to the maps → loss → VJP) instead of a maps-only pass,
 * the loss and its cotangent in TypeScript, then the VJP pass (methods.md section 3; the loss is
 * defined and derived in `pipelines/strategies/gradient-ntxent.ts`, the float64 reference this graph
 * is tested against). The VJP builder differentiates these ops like any other (ReduceMax / ReduceMin
 * share ties as torch does, so the min–max backward matches the reference's).
 *
 * Layout, as the batched UNet call returns the maps: `xattn` (T, Q, S) with T = branches × images
 * (branch-major; CLoRA's branch 2p is slot p's uncond half, 2p + 1 its cond half), Q the 1/32-grid
 * cells, S the text tokens. Per image b and entry e = (slot p, token j, group label):
 *
 *   v_be = ½ (xattn[(2p)·B + b, :, j] + xattn[(2p+1)·B + b, :, j])       (the slot map A_p[:, j])
 *   e = (v − min v) / (max v − min v),  n = e / max(‖e‖, 1e-12),  s_ab = n_a · n_b
 *   ℓ_ab = −log(e^{s_ab/τ} / (e^{s_ab/τ} + Σ_{k: label k ≠ label a} e^{s_ak/τ}) + tiny)
 *   L_b = Σ_{a≠b, same label} ℓ_ab / #pairs
 *
 * The reference subtracts each row's maximum before exp; |s/τ| ≤ 1/τ = 2 here, so the graph does
 * not (no overflow, same value up to rounding). Inputs (built by `ntXentFeeds`):
 *   ntxent.pick_uncond, ntxent.pick_cond  int64 [B, E]: row t·S + j of xattn viewed as (T·S, Q)
 *   ntxent.positive, ntxent.negative      float [E, E]: same label (a ≠ b) / different label
 * Output: the loss per image, [B]. A flat map (max = min) gives NaN, as in the reference.
 */
import type { Value } from '../onnx/builder.ts';
import type { Ops } from '../onnx/ops.ts';
import type { Tensor } from '../tensor.ts';

export const NTXENT_INPUTS = {
  pickUncond: 'ntxent.pick_uncond',
  pickCond: 'ntxent.pick_cond',
  positive: 'ntxent.positive',
  negative: 'ntxent.negative',
} as const;

/** float32's smallest normal number (pytorch-metric-learning's `small_val`). */
const FLOAT32_TINY = 1.1754943508222875e-38;
const NORMALIZE_EPS = 1e-12;

/** The per-image NT-Xent loss [images] of the maps `xattn` (T, Q, S); declares the four inputs above. */
export function ntXentLossGraph(g: Ops, xattn: Value, options: { temperature: number }): Value {
  const pickU = g.input(NTXENT_INPUTS.pickUncond, 'int64', ['images', 'entries']);
  const pickC = g.input(NTXENT_INPUTS.pickCond, 'int64', ['images', 'entries']);
  const positive = g.input(NTXENT_INPUTS.positive, 'float32', ['entries', 'entries']);
  const negative = g.input(NTXENT_INPUTS.negative, 'float32', ['entries', 'entries']);
  return g.scope('ntxent', () => {
    // (T, Q, S) → (T, S, Q) → (T·S, Q): one row per (batch row, token).
    const rows = g.reshape(g.transpose(xattn, [0, 2, 1]), g.concat([g.int64s([-1]), g.shape(xattn, { start: 1, end: 2 })], { dim: 0 }));
    const v = g.mul(g.add(g.gather(rows, pickU, { dim: 0 }), g.gather(rows, pickC, { dim: 0 })), g.scalar(0.5)); // (B, E, Q)
    const lo = g.reduceMin(v, { dims: [-1], keepdim: true });
    const hi = g.reduceMax(v, { dims: [-1], keepdim: true });
    const e = g.div(g.sub(v, lo), g.sub(hi, lo));
    const length = g.sqrt(g.reduceSum(g.mul(e, e), { dims: [-1], keepdim: true }));
    const n = g.div(e, g.max(length, g.scalar(NORMALIZE_EPS)));
    const sim = g.matmul(n, g.transpose(n, [0, 2, 1])); // (B, E, E)
    const z = g.exp(g.div(sim, g.scalar(options.temperature)));
    const negatives = g.reduceSum(g.mul(z, negative), { dims: [-1], keepdim: true }); // (B, E, 1)
    const loss = g.neg(g.log(g.add(g.div(z, g.add(z, negatives)), g.scalar(FLOAT32_TINY))));
    const pairs = g.max(g.reduceSum(positive, { dims: [0, 1], keepdim: false }), g.scalar(1));
    return g.div(g.reduceSum(g.mul(loss, positive), { dims: [1, 2], keepdim: false }), pairs); // (B)
  });
}

/** One contrastive embedding: slot p's map of token position j, in group `label`. */
export interface NtXentEntry {
  readonly slot: number;
  readonly token: number;
  readonly label: number;
}

/**
 * The inputs of `ntXentLossGraph` for entries over `images` images of maps with `seq` tokens.
 * `memberOf(slot, half)` is the position of slot's uncond (0) / cond (1) branch in the call's batch
 * (default 2·slot + half, CLoRA's branch order).
 */
export function ntXentFeeds(entries: readonly NtXentEntry[], images: number, seq: number, memberOf: (slot: number, half: 0 | 1) => number = (slot, half) => 2 * slot + half): Record<string, Tensor> {
  const count = entries.length;
  const pick = (half: 0 | 1) =>
    BigInt64Array.from({ length: images * count }, (_, k) => {
      const b = Math.floor(k / count);
      const { slot, token } = entries[k % count]!;
      return BigInt((memberOf(slot, half) * images + b) * seq + token);
    });
  const positive = new Float32Array(count * count);
  const negative = new Float32Array(count * count);
  const hasNegatives = entries.some((x) => x.label !== entries[0]!.label);
  for (let a = 0; a < count; a++) {
    for (let b = 0; b < count; b++) {
      // No negative at all: the reference's loss is 0 (no pair counted).
      if (a !== b && entries[a]!.label === entries[b]!.label && hasNegatives) positive[a * count + b] = 1;
      if (entries[a]!.label !== entries[b]!.label) negative[a * count + b] = 1;
    }
  }
  return {
    [NTXENT_INPUTS.pickUncond]: { dtype: 'int64', shape: [images, count], data: pick(0) },
    [NTXENT_INPUTS.pickCond]: { dtype: 'int64', shape: [images, count], data: pick(1) },
    [NTXENT_INPUTS.positive]: { dtype: 'float32', shape: [count, count], data: positive },
    [NTXENT_INPUTS.negative]: { dtype: 'float32', shape: [count, count], data: negative },
  };
}
