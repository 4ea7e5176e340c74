/**
 * The strategy registry: a job names a strategy and its knobs; this builds it. Each strategy file
 * documents its paper, equations, official defaults and deviations.
 */
import { PipelineError } from '../errors.ts';
import { cmloraStrategy, CMLORA_DEFAULTS, type CmloraKnobs, type FrequencyClass, type PhaseRule } from './cmlora.ts';
import { compositeStrategy } from './composite.ts';
import { plainStrategy } from './plain.ts';
import type { StrategySetup } from './setup.ts';
import { switchStrategy, SWITCH_DEFAULTS } from './switch.ts';
import type { Strategy } from './types.ts';
import type { CloraKnobs } from './clora.ts';
import type { ComposerKnobs } from './lora-composer.ts';
import type { JobLora } from '../job.ts';

export type StrategyName = 'plain' | 'merge' | 'switch' | 'composite' | 'cmlora' | 'regions' | 'clora' | 'lora-composer';
export const STRATEGY_NAMES: readonly StrategyName[] = ['plain', 'merge', 'switch', 'composite', 'cmlora', 'regions', 'clora', 'lora-composer'];

/**
 * A concept of CLoRA or LoRA-Composer: words of a prompt bound to a LoRA.
 * - CLoRA: concept k is prompt slot k + 1 (slot 0 is the job's prompt without concept LoRAs): its
 *   `prompt` (default: the job's) with its `lora`; `words` name it in that prompt, `otherWords`
 *   (default `words`) in the other slots' prompts.
 * - LoRA-Composer: concept k is region k (its box, prompt and LoRA); `words` name it in the region's prompt.
 */
export interface ConceptSpec {
  readonly words: string;
  readonly otherWords?: string;
  /** CLoRA: the concept's LoRA (LoRA-Composer: the region's). */
  readonly lora?: JobLora;
  /** CLoRA: the slot's prompt (default: the job's prompt). */
  readonly prompt?: string;
}

/** A job's strategy: its name and knobs (every knob has a default). */
export interface StrategySpec {
  readonly name: StrategyName;
  /** Switch: τ, steps per LoRA. */
  readonly switchEvery?: number;
  /** CMLoRA: c. */
  readonly cacheInterval?: number;
  /** CMLoRA: one per LoRA in stack order; measured when absent. */
  readonly frequencyClasses?: readonly FrequencyClass[];
  readonly phaseRule?: PhaseRule;
  /** CMLoRA: reproduce the official code's quirks. */
  readonly official?: boolean;
  /** CLoRA, LoRA-Composer: the concepts (see `ConceptSpec`). */
  readonly concepts?: readonly ConceptSpec[];
  /** CLoRA's knobs (default: the official notebook's, step thresholds scaled to the step count). */
  readonly clora?: Partial<CloraKnobs>;
  /** LoRA-Composer's knobs (default: the official script's, step thresholds scaled to the step count). */
  readonly loraComposer?: Partial<ComposerKnobs>;
}

/** One line each, for help texts and the app's strategy picker. */
export const STRATEGY_SUMMARIES: Readonly<Record<StrategyName, string>> = {
  plain: 'every LoRA applied at once at its weight (A1111 behaviour); AND sub-prompts allowed',
  merge: 'LoRA Merge (Zhong et al. 2024): all LoRAs summed into one model, one CFG pass per step',
  switch: 'LoRA Switch (Zhong et al. 2024): one LoRA per step, rotating every τ steps',
  composite: 'LoRA Composite (Zhong et al. 2024): every LoRA alone each step, predictions averaged',
  cmlora: 'CMLoRA (Zou et al. 2025): Composite with frequency-ordered dominance and cached deep features',
  regions: 'Regions (Mix-of-Show sampling): a prompt and a LoRA per box or painted mask, one UNet pass per step',
  clora: 'CLoRA (Meral et al. 2025): a prompt slot per LoRA, latents steered by a contrastive loss on attention maps, masked fusion',
  'lora-composer': 'LoRA-Composer (Yang et al. 2024): concept LoRAs in boxes, isolation, latents steered by box/fill/region losses',
};

/** Whether a strategy needs per-branch adapter mixes (the adapter bank, not merged weights). */
export function needsAdapterBank(name: StrategyName): boolean {
  return name === 'switch' || name === 'composite' || name === 'cmlora' || name === 'regions' || name === 'clora' || name === 'lora-composer';
}

/** Text-encoder strengths the prompt is encoded with, per LoRA in stack order. */
export function textEncoderMix(spec: StrategySpec, setup: Pick<StrategySetup, 'stack'>): number[] {
  switch (spec.name) {
    case 'switch':
      return switchStrategy.textEncoderMix(setup);
    case 'composite':
      return compositeStrategy.textEncoderMix(setup);
    case 'cmlora':
      return cmloraStrategy.textEncoderMix(setup);
    case 'plain':
    case 'merge':
    case 'regions':
    case 'clora':
    case 'lora-composer':
      return setup.stack.strengths('text_encoder');
  }
}

export function createStrategy(spec: StrategySpec, setup: StrategySetup, latentShape: readonly number[]): Strategy<unknown> {
  switch (spec.name) {
    case 'plain':
      return plainStrategy(setup.conditioning, setup.guidanceScale);
    case 'merge':
      if (setup.stack.size === 0) {
        throw new PipelineError('BAD_ARGUMENT', 'the merge strategy composes LoRAs: it needs at least 1 LoRA, got 0. Add LoRAs with <lora:name:weight> or --lora.', { field: 'strategy' });
      }
      return plainStrategy(setup.conditioning, setup.guidanceScale);
    case 'switch':
      return switchStrategy.create(setup, { switchEvery: spec.switchEvery ?? SWITCH_DEFAULTS.switchEvery });
    case 'composite':
      return compositeStrategy.create(setup);
    case 'cmlora': {
      if (spec.frequencyClasses === undefined) throw new Error('createStrategy: CMLoRA frequency classes must be resolved first');
      const knobs: CmloraKnobs = {
        cacheInterval: spec.cacheInterval ?? CMLORA_DEFAULTS.cacheInterval,
        frequencyClasses: spec.frequencyClasses,
        phaseRule: spec.phaseRule ?? CMLORA_DEFAULTS.phaseRule,
        official: spec.official ?? CMLORA_DEFAULTS.official,
        onlineThreshold: CMLORA_DEFAULTS.onlineThreshold,
      };
      return cmloraStrategy.create(setup, knobs, latentShape) as Strategy<unknown>;
    }
    case 'regions':
    case 'clora':
    case 'lora-composer':
      throw new Error(`createStrategy: the ${spec.name} strategy is built by text-to-image with its plan`);
  }
}

export type { FrequencyClass, PhaseRule };
