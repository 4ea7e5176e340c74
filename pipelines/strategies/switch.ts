/**
 * LoRA Switch — Zhong et al. 2024, "Multi-LoRA Composition for Image Generation" (arXiv 2402.16843),
 * official code maszhongming/Multi-LoRA-Composition @ cac122a (`callbacks.py`).
 *
 * Exactly one LoRA is active in the UNet at each step, rotating every τ steps:
 *
 *   k(i) = (max(i − 1, 0) div τ) mod N        (i = step index, 0-based)
 *   ε_i  = ε_u + w·(ε_c − ε_u)   with LoRA k(i) alone, at its strength
 *
 * | code          | symbol |
 * |---------------|--------|
 * | `switchEvery` | τ (official default 5) |
 * | `stack.size`  | N |
 *
 * The official callback advances k after step i when i > 0 and i mod τ = 0, so LoRA 0's first
 * block is τ + 1 steps long; this is kept (the fixtures and published numbers depend on it).
 * The prompt is encoded once with only LoRA 0's text-encoder delta active, as in the official code.
 */
import { PipelineError } from '../errors.ts';
import { cfgPair, guide, oneHot, requireLoras, type StrategySetup } from './setup.ts';
import type { Strategy } from './types.ts';

export interface SwitchKnobs {
  /** τ: steps per LoRA (official default 5). */
  readonly switchEvery: number;
}

export const SWITCH_DEFAULTS: SwitchKnobs = { switchEvery: 5 };

/** The LoRA active at step i. */
export function switchActive(step: number, switchEvery: number, n: number): number {
  return Math.floor(Math.max(step - 1, 0) / switchEvery) % n;
}

export const switchStrategy = {
  name: 'switch' as const,
  /** Only LoRA 0's text-encoder delta conditions the prompt. */
  textEncoderMix: (setup: Pick<StrategySetup, 'stack'>): number[] => setup.stack.strengths('text_encoder').map((s, k) => (k === 0 ? s : 0)),
  create(setup: StrategySetup, knobs: SwitchKnobs = SWITCH_DEFAULTS): Strategy<null> {
    requireLoras('switch', setup.stack, 1);
    if (!Number.isInteger(knobs.switchEvery) || knobs.switchEvery < 1) {
      throw new PipelineError('BAD_ARGUMENT', `switchEvery must be a whole number of steps ≥ 1, got ${knobs.switchEvery}.`, { field: 'switchEvery' });
    }
    return {
      name: 'switch',
      begin: () => null,
      branches: (_s, ctx) => cfgPair(setup, ctx, oneHot(setup.stack, switchActive(ctx.step, knobs.switchEvery, setup.stack.size))),
      combine: (_s, _ctx, [u, c]) => guide(u!.eps, c!.eps, setup.guidanceScale),
    };
  },
};
