/**
 * Plain generation: classifier-free guidance (Ho & Salimans 2022, arXiv:2207.12598) with A1111's
 * composable-diffusion extension for `AND` sub-prompts (Liu et al. 2022, arXiv:2206.01714):
 *
 *   ε = ε_u + s · Σ_i w_i (ε_c,i − ε_u)
 *
 * | code            | symbol |
 * |-----------------|--------|
 * | `uncond`        | ε_u (negative prompt) |
 * | `conds[i]`      | ε_c,i (AND sub-prompt i) |
 * | `weights[i]`    | w_i (1 for a prompt without AND) |
 * | `guidanceScale` | s (CFG scale) |
 *
 * With one sub-prompt of weight 1 this is diffusers' `u + s·(c − u)`, computed in the same float32
 * order. Branch order is [uncond, cond…], as diffusers batches them.
 */
import type { Branch, StepContext, Strategy } from './types.ts';
import { conditioningAt, type PromptConditioning } from '../conditioning.ts';

const f32 = Math.fround;

export function plainStrategy(conditioning: PromptConditioning, guidanceScale: number): Strategy<null> {
  return {
    name: 'plain',
    begin: () => null,
    branches(_state, ctx): Branch[] {
      return [{ context: conditioningAt(conditioning.negative, ctx.step) }, ...conditioning.positive.map((p) => ({ context: conditioningAt(p.schedule, ctx.step) }))];
    },
    combine(_state, _ctx, outputs): Float32Array {
      const [uncond, ...conds] = outputs.map((o) => o.eps);
      const out = Float32Array.from(uncond!);
      conditioning.positive.forEach((p, i) => {
        const c = conds[i]!;
        const scale = f32(guidanceScale * p.weight);
        for (let j = 0; j < out.length; j++) out[j] = f32(out[j]! + f32(scale * f32(c[j]! - uncond![j]!)));
      });
      return out;
    },
  };
}
