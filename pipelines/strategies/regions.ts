/**
 * Regions — Mix-of-Show's regionally controllable sampling (Gu et al., NeurIPS 2023,
 * arXiv 2305.18292; methods.md section 4), with a prompt and a LoRA per region.
 *
 * One CFG pass per step. In every cross-attention layer each query q attends the global prompt
 * (O_g) and every region's prompt (O_r, the region's LoRA on its k/v); the layer output before
 * `to_out` is O_g where no region covers q, else Σ_{r∋q} O_r / count(q). The region's LoRA also
 * acts on every pixel layer inside the region (per-pixel strengths, see `regions.ts`). The uncond
 * half uses the global negative and each region's negative prompt (default: the global one).
 *
 * | code               | symbol |
 * |--------------------|--------|
 * | `masks[l]`         | m_r on level l's grid (ceil start, floor end, as the official code rounds) |
 * | `global`           | LoRA strengths everywhere (the job's LoRAs) |
 * | `perRegion[r]`     | s_{r,·}: region r's LoRA strengths |
 *
 * Deviations from the official code: any aspect ratio (the official code assumes square latents);
 * painted masks besides boxes; a LoRA per region applied as per-pixel adapter strengths instead of
 * a pre-fused model (Mix-of-Show fuses ED-LoRAs offline by gradient fusion); no ED-LoRA layer-wise
 * tokens (plain prompts); no T2I-Adapter conditions.
 */
import type { Tensor } from '../../models/index.ts';
import { conditioningAt, type ScheduledConditioning } from '../conditioning.ts';
import { PipelineError } from '../errors.ts';
import { guide, type StrategySetup } from './setup.ts';
import type { Branch, BranchRegions, Strategy } from './types.ts';

export interface RegionPrompt {
  readonly positive: readonly ScheduledConditioning[];
  readonly negative: readonly ScheduledConditioning[];
}

export interface RegionsPlan {
  readonly regions: readonly RegionPrompt[];
  /** Per UNet level: (1, R, h_l, w_l). */
  readonly masks: readonly Tensor<'float32'>[];
  /** The empty prompt's 77-token chunk (1, 77, D), padding shorter region prompts. */
  readonly padChunk: Tensor<'float32'>;
  /** With LoRAs: the slots' k/v strengths (1, R, K) and the per-pixel strengths per level (1, K, h, w). */
  readonly adapters?: { readonly slotMix: Tensor<'float32'>; readonly mixMaps: readonly Tensor<'float32'>[]; readonly global: readonly number[] };
}

/** Stack the regions' contexts (1, S_r, D) into (1, R, S, D), padding with empty chunks to the longest. */
export function stackContexts(contexts: readonly Tensor<'float32'>[], pad: Tensor<'float32'>): Tensor<'float32'> {
  const dim = contexts[0]!.shape[2]!;
  const seq = Math.max(...contexts.map((c) => c.shape[1]!));
  const data = new Float32Array(contexts.length * seq * dim);
  contexts.forEach((c, r) => {
    data.set(c.data, r * seq * dim);
    for (let s = c.shape[1]!; s < seq; s += pad.shape[1]!) data.set(pad.data.subarray(0, Math.min(pad.data.length, (seq - s) * dim)), (r * seq + s) * dim);
  });
  return { dtype: 'float32', shape: [1, contexts.length, seq, dim], data };
}

export const regionsStrategy = {
  name: 'regions' as const,
  create(setup: StrategySetup, plan: RegionsPlan): Strategy<null> {
    if (plan.regions.length === 0) {
      throw new PipelineError('BAD_ARGUMENT', 'the regions strategy needs at least one region (a box or a painted mask with a prompt).', { field: 'regions' });
    }
    if (setup.conditioning.positive.length !== 1) {
      throw new PipelineError('BAD_PROMPT', 'the regions strategy takes one global prompt; AND sub-prompts are only supported by plain generation.', { field: 'prompt' });
    }
    const regionsAt = (step: number, half: 'positive' | 'negative'): BranchRegions => ({
      context: stackContexts(
        plan.regions.map((r) => conditioningAt(r[half], step)),
        plan.padChunk,
      ),
      masks: plan.masks,
      ...(plan.adapters === undefined ? {} : { mix: plan.adapters.slotMix, mixMaps: plan.adapters.mixMaps }),
    });
    const mix = plan.adapters === undefined ? {} : { mix: plan.adapters.global };
    return {
      name: 'regions',
      begin: () => null,
      branches(_s, ctx): Branch[] {
        return [
          { context: conditioningAt(setup.conditioning.negative, ctx.step), regions: regionsAt(ctx.step, 'negative'), ...mix },
          { context: conditioningAt(setup.conditioning.positive[0]!.schedule, ctx.step), regions: regionsAt(ctx.step, 'positive'), ...mix },
        ];
      },
      combine: (_s, _ctx, [u, c]) => guide(u!.eps, c!.eps, setup.guidanceScale),
    };
  },
};
