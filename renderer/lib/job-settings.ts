/**
 * The generation form as plain data, and its conversions: form → job payload, and a job payload
 * (from a gallery image or a dropped PNG) → form. Pure, tested in Node.
 */
import type { JobPayload, StrategyNameWire, StrategyPayload } from '../../pipelines/api/contract.ts';

export type SeedMode = 'random' | 'fixed';

export interface GenerationForm {
  prompt: string;
  negativePrompt: string;
  steps: number;
  cfgScale: number;
  sampler: string;
  scheduleType: string;
  width: number;
  height: number;
  clipSkip: number;
  seedMode: SeedMode;
  /** Decimal text; used when seedMode is fixed. */
  seed: string;
  strategy: StrategyNameWire;
  knobs: Record<string, number | string | boolean>;
}

export function defaultForm(): GenerationForm {
  return {
    prompt: '',
    negativePrompt: '',
    steps: 20,
    cfgScale: 7,
    sampler: 'DPM++ 2M',
    scheduleType: 'Automatic',
    width: 512,
    height: 512,
    clipSkip: 1,
    seedMode: 'random',
    seed: '-1',
    strategy: 'plain',
    knobs: {},
  };
}

/**
 * Knobs are flat in the form; a dotted name (`clora.stepSize`) is a field of a nested knob object
 * of the payload (`strategy.clora.stepSize`).
 */
export function strategyPayload(form: Pick<GenerationForm, 'strategy' | 'knobs'>): StrategyPayload {
  const out: Record<string, unknown> = { name: form.strategy };
  for (const [k, v] of Object.entries(form.knobs)) {
    const dot = k.indexOf('.');
    if (dot < 0) {
      out[k] = v;
      continue;
    }
    const group = k.slice(0, dot);
    out[group] = { ...(out[group] as Record<string, unknown> | undefined), [k.slice(dot + 1)]: v };
  }
  return out as unknown as StrategyPayload;
}

/** The payload's knobs flattened back into the form's (`clora.stepSize`); concepts are not knobs. */
function flatKnobs(strategy: Omit<StrategyPayload, 'name'>): Record<string, number | string | boolean> {
  const out: Record<string, number | string | boolean> = {};
  const scalar = (v: unknown): v is number | string | boolean => typeof v === 'number' || typeof v === 'string' || typeof v === 'boolean';
  for (const [k, v] of Object.entries(strategy)) {
    if (scalar(v)) out[k] = v;
    else if ((k === 'clora' || k === 'loraComposer') && typeof v === 'object' && v !== null) {
      for (const [kk, vv] of Object.entries(v as Record<string, unknown>)) if (scalar(vv)) out[`${k}.${kk}`] = vv;
    }
  }
  return out;
}

/** The job for the form (LoRAs and regions are added by the caller). */
export function formPayload(form: GenerationForm): JobPayload {
  return {
    prompt: form.prompt,
    negativePrompt: form.negativePrompt,
    steps: form.steps,
    cfgScale: form.cfgScale,
    sampler: form.sampler,
    scheduleType: form.scheduleType,
    width: form.width,
    height: form.height,
    clipSkip: form.clipSkip,
    seed: form.seedMode === 'fixed' && /^\d+$/.test(form.seed.trim()) ? form.seed.trim() : '-1',
    strategy: strategyPayload(form),
  };
}

/** A loaded job → the form: every field the job has; the seed becomes fixed (reuse). */
export function formFromPayload(job: JobPayload, base: GenerationForm): GenerationForm {
  const { name, ...knobs } = job.strategy ?? { name: base.strategy };
  return {
    ...base,
    prompt: job.prompt,
    negativePrompt: job.negativePrompt ?? '',
    steps: job.steps ?? base.steps,
    cfgScale: job.cfgScale ?? base.cfgScale,
    sampler: job.sampler ?? base.sampler,
    scheduleType: job.scheduleType ?? base.scheduleType,
    width: job.width ?? base.width,
    height: job.height ?? base.height,
    clipSkip: job.clipSkip ?? base.clipSkip,
    seedMode: job.seed === undefined || String(job.seed) === '-1' ? base.seedMode : 'fixed',
    seed: job.seed === undefined ? base.seed : String(job.seed),
    strategy: name,
    knobs: flatKnobs(knobs),
  };
}

/** A random seed in 0…2^32−1 (what "random" draws, shown so the user can fix it). */
export function randomSeed(): string {
  return String(Math.floor(Math.random() * 2 ** 32));
}
