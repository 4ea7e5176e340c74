/**
 * What every strategy is built from, and how strategies are declared: the run's conditioning, CFG
 * scale, LoRA stack and step count; a strategy definition says how the prompt is encoded (which
 * LoRAs' text-encoder deltas) and builds the per-run strategy object.
 */
import type { AdapterStack } from '../../models/index.ts';
import { conditioningAt, type PromptConditioning } from '../conditioning.ts';
import { PipelineError } from '../errors.ts';
import type { Branch, StepContext } from './types.ts';

export interface StrategySetup {
  readonly conditioning: PromptConditioning;
  readonly guidanceScale: number;
  /** The run's LoRAs in stack order (adapter k of the bank is entry k). */
  readonly stack: AdapterStack;
  readonly steps: number;
}

/** The CFG pair [uncond, cond] of the first (only) sub-prompt at a step, with one adapter mix. */
export function cfgPair(setup: StrategySetup, ctx: StepContext, mix?: readonly number[]): [Branch, Branch] {
  const { conditioning } = setup;
  if (conditioning.positive.length !== 1) {
    throw new PipelineError('BAD_PROMPT', 'multi-LoRA strategies take one prompt; AND sub-prompts are only supported by plain generation.', { field: 'prompt' });
  }
  const u = conditioningAt(conditioning.negative, ctx.step);
  const c = conditioningAt(conditioning.positive[0]!.schedule, ctx.step);
  return mix === undefined ? [{ context: u }, { context: c }] : [{ context: u, mix }, { context: c, mix }];
}

/** Adapter k alone at its UNet strength: the one-hot mix row. */
export function oneHot(stack: AdapterStack, k: number): number[] {
  return stack.strengths('unet').map((s, j) => (j === k ? s : 0));
}

/** ε = u + s·(c − u), element by element in float32 (diffusers' order). */
export function guide(u: Float32Array, c: Float32Array, scale: number): Float32Array {
  const f = Math.fround;
  const out = new Float32Array(u.length);
  for (let i = 0; i < u.length; i++) out[i] = f(u[i]! + f(scale * f(c[i]! - u[i]!)));
  return out;
}

/** Refuse a multi-LoRA strategy without enough LoRAs. */
export function requireLoras(name: string, stack: AdapterStack, min: number): void {
  if (stack.size < min) {
    throw new PipelineError('BAD_ARGUMENT', `the ${name} strategy composes LoRAs: it needs at least ${min} LoRA${min === 1 ? '' : 's'}, got ${stack.size}. Add LoRAs with <lora:name:weight> or --lora.`, {
      field: 'strategy',
      loras: stack.size,
    });
  }
}
