/**
 * diffusers `scheduler_config.json` → validated settings, then → what one scheduler class runs with.
 *
 * Two stages, because diffusers' `Cls.from_config(file)` takes every key the file sets and each
 * class's *own* `__init__` default for the rest (DDIM defaults `set_alpha_to_one=True`, PNDM `False`;
 * DDIM/PNDM default to `leading` spacing, the others to `linspace`; Heun's betas default to
 * 0.00085…0.012). So `parseSchedulerConfig` keeps "absent" as `undefined`, and
 * `resolveSchedulerConfig(kind, …)` applies the defaults of the class that `kind` stands for
 * (diffusers 0.24.0 signatures).
 *
 * Keys that pick the *algorithm* (`algorithm_type`, `solver_order`, `solver_type`, `predict_x0`,
 * `skip_prk_steps`, …) are ignored: the sampler choice decides the algorithm, and a file only carries
 * them when it was saved from that class. Unknown keys are ignored, as diffusers does. Settings
 * diffusers would honour but Chorus does not implement (thresholding, zero-SNR rescaling, …) are
 * rejected when the chosen class would use them.
 *
 * Keys that only change how the multistep solvers *end* are honoured by the classes that have them:
 * - `lower_order_final` (DPM-Solver++ and UniPC, default true);
 * - `euler_at_final` (DPM-Solver++, default false): the last step is first order;
 * - `final_sigmas_type` (DPM-Solver++, added in diffusers 0.26): `"zero"` makes σ after the last step
 *   0 and the last step first order, so the run ends on that step's x̂₀; `"sigma_min"` ends on
 *   σ(t=0). Absent, Chorus keeps 0.24's behaviour (σ(t=0); with Karras σ the last σ repeated), not
 *   0.26's default `"zero"`, so configs without the key give what they gave before. UniPC has no
 *   such key in 0.26.3 (it came in a later release), so `"zero"` is rejected for UniPC; `"sigma_min"`
 *   is what its last step does anyway and is accepted.
 */
import { PipelineError } from '../errors.ts';
import type { SchedulerKind } from './types.ts';

export type BetaSchedule = 'linear' | 'scaled_linear' | 'squaredcos_cap_v2';
export type PredictionType = 'epsilon' | 'v_prediction' | 'sample';
export type TimestepSpacing = 'leading' | 'linspace' | 'trailing';
/** diffusers ≥ 0.26 `final_sigmas_type` of DPMSolverMultistepScheduler: σ after the last step. */
export type FinalSigmasType = 'zero' | 'sigma_min';

const BETA_SCHEDULES: readonly BetaSchedule[] = ['linear', 'scaled_linear', 'squaredcos_cap_v2'];
const PREDICTION_TYPES: readonly PredictionType[] = ['epsilon', 'v_prediction', 'sample'];
const TIMESTEP_SPACINGS: readonly TimestepSpacing[] = ['leading', 'linspace', 'trailing'];
const FINAL_SIGMAS_TYPES: readonly FinalSigmasType[] = ['zero', 'sigma_min'];

/** A setting in the file that Chorus does not implement, and the classes that would use it. */
export interface UnsupportedSetting {
  readonly key: string;
  readonly value: unknown;
  readonly usedBy: readonly SchedulerKind[];
  readonly reason: string;
}

/** The validated file. `undefined` = the key is absent (the class default applies). */
export interface SchedulerConfig {
  readonly source: string;
  /** `_class_name`, informational (any class name is accepted). */
  readonly className: string | undefined;
  readonly numTrainTimesteps: number | undefined;
  readonly betaStart: number | undefined;
  readonly betaEnd: number | undefined;
  readonly betaSchedule: BetaSchedule | undefined;
  /** `null` in the file is the same as absent. */
  readonly trainedBetas: readonly number[] | undefined;
  readonly predictionType: PredictionType | undefined;
  readonly timestepSpacing: TimestepSpacing | undefined;
  readonly stepsOffset: number | undefined;
  readonly setAlphaToOne: boolean | undefined;
  readonly clipSample: boolean | undefined;
  readonly clipSampleRange: number | undefined;
  readonly useKarrasSigmas: boolean | undefined;
  readonly lowerOrderFinal: boolean | undefined;
  readonly eulerAtFinal: boolean | undefined;
  readonly finalSigmasType: FinalSigmasType | undefined;
  readonly unsupported: readonly UnsupportedSetting[];
}

/** What one class runs with, every default applied. */
export interface ResolvedSchedulerConfig {
  readonly numTrainTimesteps: number;
  readonly betaStart: number;
  readonly betaEnd: number;
  readonly betaSchedule: BetaSchedule;
  readonly trainedBetas: readonly number[] | null;
  readonly predictionType: PredictionType;
  readonly timestepSpacing: TimestepSpacing;
  readonly stepsOffset: number;
  /** DDIM and PNDM: the "previous" ᾱ after the last step is 1 (true) or ᾱ_0 (false). Others: unused. */
  readonly setAlphaToOne: boolean;
  /** DDIM and Heun: clamp the x̂₀ prediction to ±clipSampleRange. Others: false. */
  readonly clipSample: boolean;
  readonly clipSampleRange: number;
  /** Only the classes that have `use_karras_sigmas` in 0.24 (LMS, Euler, Heun, DPM, UniPC) read it. */
  readonly useKarrasSigmas: boolean;
  /**
   * DPM-Solver++ and UniPC: the last step is first order (DPM-Solver++: only below 15 steps, as in
   * diffusers). Others: true (unused).
   */
  readonly lowerOrderFinal: boolean;
  /** DPM-Solver++: the last step is first order whatever the step count. Others: false. */
  readonly eulerAtFinal: boolean;
  /**
   * DPM-Solver++: σ after the last step, with diffusers 0.26 semantics (`'zero'` also makes the last
   * step first order). `null`: the key is absent; diffusers 0.24's grid (σ(t=0), or with Karras σ the
   * last σ repeated). Others: null.
   */
  readonly finalSigmasType: FinalSigmasType | null;
}

interface ClassDefaults {
  readonly className: string;
  readonly betaStart: number;
  readonly betaEnd: number;
  readonly betaSchedule: BetaSchedule;
  readonly timestepSpacing: TimestepSpacing;
  readonly setAlphaToOne: boolean;
  readonly clipSample: boolean;
  /** Does the class read `clip_sample` / `set_alpha_to_one` / `use_karras_sigmas` at all? */
  readonly readsClipSample: boolean;
  readonly readsSetAlphaToOne: boolean;
  readonly readsKarras: boolean;
  /** Does the class read `lower_order_final` / `euler_at_final` / `final_sigmas_type`? */
  readonly readsLowerOrderFinal: boolean;
  readonly readsEulerAtFinal: boolean;
  readonly readsFinalSigmasType: boolean;
  readonly predictionTypes: readonly PredictionType[];
}

const DDPM_BETAS = { betaStart: 0.0001, betaEnd: 0.02, betaSchedule: 'linear' } as const;
const NO_FLAGS = {
  setAlphaToOne: false,
  clipSample: false,
  readsClipSample: false,
  readsSetAlphaToOne: false,
  readsLowerOrderFinal: false,
  readsEulerAtFinal: false,
  readsFinalSigmasType: false,
} as const;

/** diffusers 0.24.0 `__init__` defaults of each class. */
export const CLASS_DEFAULTS: Readonly<Record<SchedulerKind, ClassDefaults>> = {
  ddim: { className: 'DDIMScheduler', ...DDPM_BETAS, timestepSpacing: 'leading', ...NO_FLAGS, setAlphaToOne: true, clipSample: true, readsClipSample: true, readsSetAlphaToOne: true, readsKarras: false, predictionTypes: PREDICTION_TYPES },
  pndm: { className: 'PNDMScheduler', ...DDPM_BETAS, timestepSpacing: 'leading', ...NO_FLAGS, readsSetAlphaToOne: true, readsKarras: false, predictionTypes: ['epsilon', 'v_prediction'] },
  lms: { className: 'LMSDiscreteScheduler', ...DDPM_BETAS, timestepSpacing: 'linspace', ...NO_FLAGS, readsKarras: true, predictionTypes: PREDICTION_TYPES },
  euler: { className: 'EulerDiscreteScheduler', ...DDPM_BETAS, timestepSpacing: 'linspace', ...NO_FLAGS, readsKarras: true, predictionTypes: PREDICTION_TYPES },
  euler_ancestral: { className: 'EulerAncestralDiscreteScheduler', ...DDPM_BETAS, timestepSpacing: 'linspace', ...NO_FLAGS, readsKarras: false, predictionTypes: ['epsilon', 'v_prediction'] },
  heun: { className: 'HeunDiscreteScheduler', betaStart: 0.00085, betaEnd: 0.012, betaSchedule: 'linear', timestepSpacing: 'linspace', ...NO_FLAGS, readsClipSample: true, readsKarras: true, predictionTypes: PREDICTION_TYPES },
  dpmpp_2m: {
    className: 'DPMSolverMultistepScheduler',
    ...DDPM_BETAS,
    timestepSpacing: 'linspace',
    ...NO_FLAGS,
    readsKarras: true,
    readsLowerOrderFinal: true,
    readsEulerAtFinal: true,
    readsFinalSigmasType: true,
    predictionTypes: PREDICTION_TYPES,
  },
  unipc: { className: 'UniPCMultistepScheduler', ...DDPM_BETAS, timestepSpacing: 'linspace', ...NO_FLAGS, readsKarras: true, readsLowerOrderFinal: true, predictionTypes: PREDICTION_TYPES },
};

const DEFAULT_NUM_TRAIN_TIMESTEPS = 1000;

/** Non-default values of these keys change what the named classes compute; Chorus implements the default only. */
const UNSUPPORTED_KEYS: readonly { key: string; isDefault: (v: unknown) => boolean; usedBy: readonly SchedulerKind[]; reason: string }[] = [
  { key: 'thresholding', isDefault: (v) => v === false || v === null, usedBy: ['ddim', 'dpmpp_2m', 'unipc'], reason: 'dynamic thresholding (Imagen) is for pixel-space models' },
  { key: 'rescale_betas_zero_snr', isDefault: (v) => v === false || v === null, usedBy: ['ddim'], reason: 'zero-terminal-SNR rescaling is not implemented' },
  { key: 'interpolation_type', isDefault: (v) => v === 'linear' || v === null, usedBy: ['euler'], reason: 'only linear σ interpolation is implemented' },
  { key: 'timestep_type', isDefault: (v) => v === 'discrete' || v === null, usedBy: ['euler'], reason: 'only discrete timesteps are implemented' },
  { key: 'sigma_min', isDefault: (v) => v === null, usedBy: ['euler'], reason: 'σ bounds come from the training schedule' },
  { key: 'sigma_max', isDefault: (v) => v === null, usedBy: ['euler'], reason: 'σ bounds come from the training schedule' },
  { key: 'use_lu_lambdas', isDefault: (v) => v === false || v === null, usedBy: ['dpmpp_2m'], reason: 'Lu et al. λ spacing is not implemented' },
  {
    key: 'final_sigmas_type',
    isDefault: (v) => v === 'sigma_min',
    usedBy: ['unipc'],
    reason: 'UniPC in diffusers 0.24/0.26 has no `final_sigmas_type`: its last step lands on σ(t=0) ("sigma_min"); the σ = 0 end of later releases is not implemented',
  },
  { key: 'variance_type', isDefault: (v) => v === null, usedBy: ['dpmpp_2m'], reason: 'learned-variance models are not SD 1.x/2.x' },
  // Python's json writes -Infinity, which JSON.parse rejects; readers map it to null (see test/fixtures.ts).
  // Some writers store Python's str(float('-inf')) instead: "-inf".
  { key: 'lambda_min_clipped', isDefault: (v) => v === null || v === -Infinity || isMinusInfinityString(v), usedBy: ['dpmpp_2m'], reason: 'λ clipping (for cosine schedules) is not implemented' },
];

/** "-inf" / "-infinity" (any case): −∞ as a string. */
function isMinusInfinityString(v: unknown): boolean {
  return typeof v === 'string' && /^-inf(inity)?$/i.test(v.trim());
}

function bad(source: string, key: string, value: unknown, expected: string): never {
  throw new PipelineError(
    'BAD_SCHEDULER_CONFIG',
    `${source}: \`${key}\` is ${JSON.stringify(value) ?? String(value)}; expected ${expected}. Fix the scheduler config or pick a model whose scheduler_config.json diffusers can load.`,
    { source, key, value, expected },
  );
}

function oneOf<T extends string>(source: string, raw: Record<string, unknown>, key: string, allowed: readonly T[]): T | undefined {
  const v = raw[key];
  if (v === undefined) return undefined;
  if (typeof v !== 'string' || !(allowed as readonly string[]).includes(v)) bad(source, key, v, `one of ${allowed.map((a) => `"${a}"`).join(', ')}`);
  return v as T;
}

function bool(source: string, raw: Record<string, unknown>, key: string): boolean | undefined {
  const v = raw[key];
  if (v === undefined) return undefined;
  if (typeof v !== 'boolean') bad(source, key, v, 'true or false');
  return v;
}

function integer(source: string, raw: Record<string, unknown>, key: string, min: number): number | undefined {
  const v = raw[key];
  if (v === undefined) return undefined;
  if (typeof v !== 'number' || !Number.isInteger(v) || v < min) bad(source, key, v, `an integer ≥ ${min}`);
  return v;
}

/** A number strictly between `lo` and `hi`. */
function between(source: string, raw: Record<string, unknown>, key: string, lo: number, hi: number): number | undefined {
  const v = raw[key];
  if (v === undefined) return undefined;
  if (typeof v !== 'number' || !(v > lo && v < hi)) bad(source, key, v, `a number in (${lo}, ${hi})`);
  return v;
}

function betaList(source: string, raw: Record<string, unknown>): readonly number[] | undefined {
  const v = raw['trained_betas'];
  if (v === undefined || v === null) return undefined;
  if (!Array.isArray(v) || v.length < 2 || !v.every((b) => typeof b === 'number' && b > 0 && b < 1)) {
    bad(source, 'trained_betas', Array.isArray(v) ? `[${v.length} values]` : v, 'null or a list of betas in (0, 1)');
  }
  return v as number[];
}

/**
 * Validate a parsed `scheduler_config.json` object (any SD 1.x/2.x one).
 * Throws `PipelineError('BAD_SCHEDULER_CONFIG')` naming the key when a value has the wrong type or
 * is not one diffusers accepts.
 */
export function parseSchedulerConfig(json: unknown, source = 'scheduler_config.json'): SchedulerConfig {
  if (typeof json !== 'object' || json === null || Array.isArray(json)) {
    throw new PipelineError('BAD_SCHEDULER_CONFIG', `${source}: expected a JSON object, found ${Array.isArray(json) ? 'an array' : json === null ? 'null' : typeof json}.`, { source });
  }
  const raw = json as Record<string, unknown>;
  const className = raw['_class_name'];
  if (className !== undefined && typeof className !== 'string') bad(source, '_class_name', className, 'a class name string');
  const unsupported: UnsupportedSetting[] = [];
  for (const u of UNSUPPORTED_KEYS) {
    const v = raw[u.key];
    if (v !== undefined && !u.isDefault(v)) unsupported.push({ key: u.key, value: v, usedBy: u.usedBy, reason: u.reason });
  }
  return {
    source,
    className,
    numTrainTimesteps: integer(source, raw, 'num_train_timesteps', 2),
    betaStart: between(source, raw, 'beta_start', 0, 1),
    betaEnd: between(source, raw, 'beta_end', 0, 1),
    betaSchedule: oneOf(source, raw, 'beta_schedule', BETA_SCHEDULES),
    trainedBetas: betaList(source, raw),
    predictionType: oneOf(source, raw, 'prediction_type', PREDICTION_TYPES),
    timestepSpacing: oneOf(source, raw, 'timestep_spacing', TIMESTEP_SPACINGS),
    stepsOffset: integer(source, raw, 'steps_offset', 0),
    setAlphaToOne: bool(source, raw, 'set_alpha_to_one'),
    clipSample: bool(source, raw, 'clip_sample'),
    clipSampleRange: between(source, raw, 'clip_sample_range', 0, Infinity),
    useKarrasSigmas: bool(source, raw, 'use_karras_sigmas'),
    lowerOrderFinal: bool(source, raw, 'lower_order_final'),
    eulerAtFinal: bool(source, raw, 'euler_at_final'),
    finalSigmasType: oneOf(source, raw, 'final_sigmas_type', FINAL_SIGMAS_TYPES),
    unsupported,
  };
}

/**
 * The settings the class behind `kind` runs with: the file's values, else that class's 0.24 defaults.
 * Throws `BAD_SCHEDULER_CONFIG` naming the key for settings this class would use but Chorus does not
 * implement, for a prediction type the class rejects, and for `trained_betas` of the wrong length.
 */
export function resolveSchedulerConfig(kind: SchedulerKind, config: SchedulerConfig): ResolvedSchedulerConfig {
  const d = CLASS_DEFAULTS[kind];
  const source = config.source;
  for (const u of config.unsupported) {
    if (u.usedBy.includes(kind)) {
      throw new PipelineError(
        'BAD_SCHEDULER_CONFIG',
        `${source}: \`${u.key}\` is ${JSON.stringify(u.value)}, which ${d.className} would use, but Chorus does not implement it (${u.reason}). Remove the key or choose another sampler.`,
        { source, key: u.key, value: u.value, scheduler: kind },
      );
    }
  }
  const numTrainTimesteps = config.numTrainTimesteps ?? DEFAULT_NUM_TRAIN_TIMESTEPS;
  const trainedBetas = config.trainedBetas ?? null;
  if (trainedBetas !== null && trainedBetas.length !== numTrainTimesteps) {
    bad(source, 'trained_betas', `[${trainedBetas.length} values]`, `num_train_timesteps = ${numTrainTimesteps} values`);
  }
  const predictionType = config.predictionType ?? 'epsilon';
  if (!d.predictionTypes.includes(predictionType)) {
    bad(source, 'prediction_type', predictionType, `one of ${d.predictionTypes.map((p) => `"${p}"`).join(', ')} for ${d.className}`);
  }
  return {
    numTrainTimesteps,
    betaStart: config.betaStart ?? d.betaStart,
    betaEnd: config.betaEnd ?? d.betaEnd,
    betaSchedule: config.betaSchedule ?? d.betaSchedule,
    trainedBetas,
    predictionType,
    timestepSpacing: config.timestepSpacing ?? d.timestepSpacing,
    stepsOffset: config.stepsOffset ?? 0,
    setAlphaToOne: d.readsSetAlphaToOne ? (config.setAlphaToOne ?? d.setAlphaToOne) : false,
    clipSample: d.readsClipSample ? (config.clipSample ?? d.clipSample) : false,
    clipSampleRange: config.clipSampleRange ?? 1,
    useKarrasSigmas: d.readsKarras ? (config.useKarrasSigmas ?? false) : false,
    lowerOrderFinal: d.readsLowerOrderFinal ? (config.lowerOrderFinal ?? true) : true,
    eulerAtFinal: d.readsEulerAtFinal ? (config.eulerAtFinal ?? false) : false,
    finalSigmasType: d.readsFinalSigmasType ? (config.finalSigmasType ?? null) : null,
  };
}
