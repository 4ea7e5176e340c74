/**
 * Schedulers: pick one by kind, give it the model's scheduler config and a step count.
 *
 *   const config = parseSchedulerConfig(JSON.parse(text), 'scheduler/scheduler_config.json');
 *   const { kind, options } = resolveSampler('DPM++ 2M', 'Karras');
 *   const scheduler = createScheduler(kind, config, 25, options);
 */
import { PipelineError } from '../errors.ts';
import { resolveSchedulerConfig, type SchedulerConfig } from './config.ts';
import { DdimScheduler } from './ddim.ts';
import { DpmSolverPlusPlus2MScheduler } from './dpmpp-2m.ts';
import { EulerAncestralScheduler } from './euler-ancestral.ts';
import { EulerScheduler } from './euler.ts';
import { HeunScheduler } from './heun.ts';
import { LmsScheduler } from './lms.ts';
import { PndmScheduler } from './pndm.ts';
import { checkSteps } from './schedule.ts';
import type { Scheduler, SchedulerKind, SchedulerOptions } from './types.ts';
import { UniPcScheduler } from './unipc.ts';

export type { Scheduler, SchedulerKind, SchedulerOptions } from './types.ts';
export { SCHEDULER_KINDS } from './types.ts';
export {
  parseSchedulerConfig,
  resolveSchedulerConfig,
  type SchedulerConfig,
  type ResolvedSchedulerConfig,
  type BetaSchedule,
  type PredictionType,
  type TimestepSpacing,
  type FinalSigmasType,
} from './config.ts';
export {
  resolveSampler,
  A1111_SAMPLERS,
  A1111_SCHEDULE_TYPES,
  COMFY_SAMPLERS,
  COMFY_SCHEDULERS,
  type SamplerChoice,
  type InfotextSampler,
} from './a1111.ts';

/** Kinds whose σ grid can follow Karras et al. (2022). */
export const KARRAS_KINDS: readonly SchedulerKind[] = ['lms', 'euler', 'euler_ancestral', 'heun', 'dpmpp_2m', 'unipc'];

/**
 * A fresh scheduler for one run of `numInferenceSteps` steps.
 * Throws `PipelineError`: BAD_STEPS (not a whole number in 1…num_train_timesteps),
 * BAD_SCHEDULER_CONFIG (see `resolveSchedulerConfig`), BAD_ARGUMENT (Karras σ for DDIM/PNDM, η for a
 * kind other than DDIM, η negative or not finite).
 */
export function createScheduler(kind: SchedulerKind, config: SchedulerConfig, numInferenceSteps: number, options: SchedulerOptions = {}): Scheduler {
  const resolved = resolveSchedulerConfig(kind, config);
  checkSteps(numInferenceSteps, resolved.numTrainTimesteps);
  const karras = options.karrasSigmas ?? resolved.useKarrasSigmas;
  if (options.karrasSigmas === true && !KARRAS_KINDS.includes(kind)) {
    throw new PipelineError('BAD_ARGUMENT', `karrasSigmas: ${kind} steps on timesteps, not a σ grid; Karras σ spacing is available for ${KARRAS_KINDS.join(', ')}.`, {
      argument: 'karrasSigmas',
      scheduler: kind,
    });
  }
  if (options.eta !== undefined && (kind !== 'ddim' || !Number.isFinite(options.eta) || options.eta < 0)) {
    throw new PipelineError('BAD_ARGUMENT', kind !== 'ddim' ? `eta applies to DDIM only, not ${kind}.` : `eta is ${options.eta}; expected a finite number ≥ 0 (0 = deterministic DDIM).`, {
      argument: 'eta',
      value: options.eta,
      scheduler: kind,
    });
  }
  switch (kind) {
    case 'ddim':
      return new DdimScheduler(resolved, numInferenceSteps, options.eta ?? 0);
    case 'pndm':
      return new PndmScheduler(resolved, numInferenceSteps);
    case 'lms':
      return new LmsScheduler(resolved, numInferenceSteps, karras);
    case 'euler':
      return new EulerScheduler(resolved, numInferenceSteps, karras);
    case 'euler_ancestral':
      return new EulerAncestralScheduler(resolved, numInferenceSteps, karras);
    case 'heun':
      return new HeunScheduler(resolved, numInferenceSteps, karras);
    case 'dpmpp_2m':
      return new DpmSolverPlusPlus2MScheduler(resolved, numInferenceSteps, karras);
    case 'unipc':
      return new UniPcScheduler(resolved, numInferenceSteps, karras);
  }
}
