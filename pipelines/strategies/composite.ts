/**
 * LoRA Composite — Zhong et al. 2024, "Multi-LoRA Composition for Image Generation" (arXiv 2402.16843),
 * official code maszhongming/Multi-LoRA-Composition @ cac122a (`pipeline/pipeline_0.26.3.py`).
 *
 * Every step evaluates each LoRA alone on the CFG pair and averages:
 *
 *   ε_u = (1/N) Σ_i ε_u,i     ε_c = (1/N) Σ_i ε_c,i     ε = ε_u + w·(ε_c − ε_u)
 *
 * (by linearity the mean of the per-LoRA guided predictions). The prompt is encoded with all LoRAs'
 * text-encoder deltas, as Merge does.
 *
 * Deviation: the official loop makes N separate UNet calls of batch 2; here the 2N branches go
 * to the denoiser together and are batched into as few calls as `maxBatch` allows, each batch
 * element with its own LoRA (adapter-bank mix). Same numbers, fewer calls.
 */
import { cfgPair, guide, oneHot, requireLoras, type StrategySetup } from './setup.ts';
import type { Strategy } from './types.ts';

/** Mean over branches in float32, summed in order (torch's `mean(0)` over a stacked float32 tensor). */
export function meanOf(parts: readonly Float32Array[]): Float32Array {
  const out = new Float32Array(parts[0]!.length);
  for (let j = 0; j < out.length; j++) {
    let acc = 0;
    for (const p of parts) acc += p[j]!;
    out[j] = Math.fround(acc / parts.length);
  }
  return out;
}

export const compositeStrategy = {
  name: 'composite' as const,
  textEncoderMix: (setup: Pick<StrategySetup, 'stack'>): number[] => setup.stack.strengths('text_encoder'),
  create(setup: StrategySetup): Strategy<null> {
    requireLoras('composite', setup.stack, 1);
    const n = setup.stack.size;
    return {
      name: 'composite',
      begin: () => null,
      branches: (_s, ctx) => Array.from({ length: n }, (_, k) => cfgPair(setup, ctx, oneHot(setup.stack, k))).flat(),
      combine(_s, _ctx, outputs) {
        const u = meanOf(outputs.filter((_, i) => i % 2 === 0).map((o) => o.eps));
        const c = meanOf(outputs.filter((_, i) => i % 2 === 1).map((o) => o.eps));
        return guide(u, c, setup.guidanceScale);
      },
    };
  },
};
