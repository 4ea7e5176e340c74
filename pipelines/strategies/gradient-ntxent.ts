/**
 * CLoRA's contrastive loss on attention maps, with its gradient (Meral et al., arXiv 2403.19776;
 * official `pipeline_clora.py` `loss_fn` @ 76def7c, which calls pytorch-metric-learning's
 * `NTXentLoss(temperature=0.5)` — GenericPairLoss + CosineSimilarity + MeanReducer, 2.4.1).
 *
 * | code        | symbol |
 * |-------------|--------|
 * | `maps[i]`   | x_i ∈ R^Q, one flattened 1/32-grid map A_p[:, :, j] |
 * | `e`         | e_i = (x_i − min x_i) / (max x_i − min x_i)      (min–max normalisation) |
 * | `n`         | n_i = e_i / max(‖e_i‖, 1e-12)                    (F.normalize) |
 * | `s`         | s_ab = n_a · n_b                                 (cosine similarity) |
 * | `labels[i]` | the concept group of embedding i |
 * | `tau`       | τ |
 *
 * For every ordered pair (a, b), a ≠ b, with the same label (a positive pair), with N(a) the
 * embeddings of other labels:
 *
 *   ℓ_ab = −log( e^{s_ab/τ} / (e^{s_ab/τ} + Σ_{n∈N(a)} e^{s_an/τ}) + tiny ),   L = mean_{(a,b)} ℓ_ab
 *
 * (tiny = float32's smallest normal, as `c_f.small_val`; the library subtracts the row max before
 * exp, which changes nothing in exact arithmetic). No positive pair or no negative at all: L = 0.
 *
 * Gradient (derived here, checked against finite differences in test/gradient-ntxent.test.ts):
 *   ∂ℓ_ab/∂s_ab = (p_ab − 1)/τ,   ∂ℓ_ab/∂s_an = p_an/τ,   p_· = e^{s_·/τ} / (e^{s_ab/τ} + Σ_n e^{s_an/τ});
 *   ∂L/∂n_a = Σ_b G_ab n_b + Σ_b G_ba n_b  (G = ∂L/∂s, s symmetric in its two arguments);
 *   ∂L/∂e = (∂L/∂n − n (n · ∂L/∂n)) / ‖e‖;
 *   min–max: with d = max − min, ∂L/∂x_k = ē_k / d, plus (Σ_k ē_k e_k − Σ_k ē_k)/d at the argmin and
 *   −(Σ_k ē_k e_k)/d at the argmax; like torch's full `min()`/`max()`, a tie shares that term evenly.
 * Everything is computed in float64 from the float32 maps.
 */

/** float32's smallest normal number: pytorch-metric-learning's `small_val` for float32 inputs. */
const FLOAT32_TINY = 1.1754943508222875e-38;
/** `F.normalize`'s eps. */
const NORMALIZE_EPS = 1e-12;

export interface NtXentResult {
  readonly loss: number;
  /** The min–max normalised embeddings (rows in input order), as the loss saw them. */
  readonly embeddings: readonly Float64Array[];
  /** ∂L/∂maps[i], same layout as the maps. */
  readonly gradients: readonly Float64Array[];
  /** Number of positive pairs the mean ran over. */
  readonly positivePairs: number;
}

/** min–max normalisation of one map, with what its backward needs. */
function minMax(x: ArrayLike<number>): { e: Float64Array; minAt: number[]; maxAt: number[]; range: number } {
  let lo = Infinity;
  let hi = -Infinity;
  for (let k = 0; k < x.length; k++) {
    lo = Math.min(lo, x[k]!);
    hi = Math.max(hi, x[k]!);
  }
  const range = hi - lo;
  const e = Float64Array.from({ length: x.length }, (_, k) => (x[k]! - lo) / range);
  const minAt: number[] = [];
  const maxAt: number[] = [];
  for (let k = 0; k < x.length; k++) {
    if (x[k] === lo) minAt.push(k);
    if (x[k] === hi) maxAt.push(k);
  }
  return { e, minAt, maxAt, range };
}

/**
 * NT-Xent over the min–max normalised maps. `maps[i]` is one flattened map (any length, all equal),
 * `labels[i]` its group. A flat map (max = min) gives NaN, as the official code does; callers that
 * want to avoid it must check the maps first.
 */
export function ntXentLoss(maps: readonly ArrayLike<number>[], labels: readonly number[], tau: number): NtXentResult {
  const count = maps.length;
  const norm = maps.map(minMax);
  const e = norm.map((m) => m.e);
  const lengths = e.map((v) => Math.sqrt(v.reduce((a, x) => a + x * x, 0)));
  const n = e.map((v, i) => v.map((x) => x / Math.max(lengths[i]!, NORMALIZE_EPS)));
  const s: number[][] = n.map((a) => n.map((b) => a.reduce((acc, x, k) => acc + x * b[k]!, 0)));
  const G: number[][] = Array.from({ length: count }, () => new Array<number>(count).fill(0));
  let total = 0;
  let pairs = 0;
  const hasNegatives = labels.some((l) => l !== labels[0]);
  if (hasNegatives) {
    for (let a = 0; a < count; a++) {
      const negatives = labels.flatMap((l, k) => (l !== labels[a] ? [k] : []));
      for (let b = 0; b < count; b++) {
        if (b === a || labels[b] !== labels[a]) continue;
        const top = Math.max(s[a]![b]! / tau, ...negatives.map((k) => s[a]![k]! / tau));
        const num = Math.exp(s[a]![b]! / tau - top);
        const negs = negatives.map((k) => Math.exp(s[a]![k]! / tau - top));
        const den = num + negs.reduce((acc, v) => acc + v, 0);
        total += -Math.log(num / den + FLOAT32_TINY);
        pairs++;
        G[a]![b] = G[a]![b]! + (num / den - 1) / tau;
        negatives.forEach((k, j) => (G[a]![k] = G[a]![k]! + negs[j]! / den / tau));
      }
    }
  }
  const loss = pairs === 0 ? 0 : total / pairs;
  const gradients = maps.map((m) => new Float64Array(m.length));
  if (pairs > 0) {
    for (let a = 0; a < count; a++) {
      // ∂L/∂n_a, then through F.normalize and the min–max normalisation.
      const dn = new Float64Array(n[a]!.length);
      for (let b = 0; b < count; b++) {
        const w = (G[a]![b]! + G[b]![a]!) / pairs;
        if (w === 0) continue;
        for (let k = 0; k < dn.length; k++) dn[k] = dn[k]! + w * n[b]![k]!;
      }
      const r = Math.max(lengths[a]!, NORMALIZE_EPS);
      const along = dn.reduce((acc, v, k) => acc + v * n[a]![k]!, 0);
      const de = lengths[a]! > NORMALIZE_EPS ? dn.map((v, k) => (v - n[a]![k]! * along) / r) : dn.map((v) => v / r);
      const { minAt, maxAt, range } = norm[a]!;
      let sumDe = 0;
      let sumDeE = 0;
      for (let k = 0; k < de.length; k++) {
        sumDe += de[k]!;
        sumDeE += de[k]! * e[a]![k]!;
      }
      const g = gradients[a]!;
      for (let k = 0; k < de.length; k++) g[k] = de[k]! / range;
      for (const k of minAt) g[k] = g[k]! + (sumDeE - sumDe) / range / minAt.length;
      for (const k of maxAt) g[k] = g[k]! - sumDeE / range / maxAt.length;
    }
  }
  return { loss, embeddings: e, gradients, positivePairs: pairs };
}
