/**
 * The text-to-image job: a plain, serializable spec shared by the CLI, the app and tests, with
 * A1111-like defaults, validated once where it enters (`normalizeJob`). The batch issue turns this
 * into the versioned job-file schema.
 */
import { PipelineError } from './errors.ts';
import type { EmphasisMode } from './conditioning.ts';
import type { RngKind } from './rng/index.ts';
import { resolveSampler } from './schedulers/index.ts';
import { parseSeed, SEED_MAX } from './rng/index.ts';
import { STRATEGY_NAMES, type StrategySpec } from './strategies/index.ts';
import { checkGradientJob } from './strategies/gradient-knobs.ts';

/** A LoRA of the job: a library name (file stem or alias) or a path, with A1111's two strengths. */
export interface JobLora {
  readonly name: string;
  /** Text-encoder strength. */
  readonly te: number;
  /** UNet strength (A1111: defaults to the TE strength). */
  readonly unet: number;
}

/**
 * A region of the image with its own prompt and LoRA (the `regions` strategy). Exactly one of
 * `box` (pixels: x, y, width, height from the top-left) or `mask` (a PNG file: white/opaque = in the
 * region, resized to the image) gives its area.
 */
export interface JobRegion {
  readonly box?: readonly [x: number, y: number, width: number, height: number];
  readonly mask?: string;
  readonly prompt: string;
  /** Default: the job's negative prompt. */
  readonly negativePrompt?: string;
  readonly lora?: JobLora;
}

/** How LoRAs are applied: `bank` (runtime inputs), `merged` (baked into the weights), `auto` (merged only when a LoRA is not low-rank). */
export type LoraMode = 'auto' | 'bank' | 'merged';

export interface GenerateJob {
  /** Diffusers folder or single-file checkpoint. */
  readonly model: string;
  readonly prompt: string;
  readonly negativePrompt: string;
  readonly steps: number;
  readonly cfgScale: number;
  /** A1111 sampler name ("DPM++ 2M", "Euler a", "DDIM", …; also "DPM++ 2M Karras"). */
  readonly sampler: string;
  /** A1111 schedule type ("Automatic", "Karras", "Uniform"). */
  readonly scheduleType: string;
  /** Seed of the first image; image k of the run uses seed + k. −1 draws a random seed. */
  readonly seed: bigint;
  readonly width: number;
  readonly height: number;
  /** A1111 clip skip (1 = last layer). */
  readonly clipSkip: number;
  readonly batchSize: number;
  readonly batchCount: number;
  /** 'cpu' = torch CPU generator (diffusers, ComfyUI); 'nv' = A1111's default GPU seeds. */
  readonly rng: RngKind;
  readonly emphasis: EmphasisMode;
  /** LoRAs besides the prompt's `<lora:…>` tags. */
  readonly loras: readonly JobLora[];
  readonly loraMode: LoraMode;
  /** How several LoRAs are composed (plain: all at once at their weights). */
  readonly strategy: StrategySpec;
  /** Regions for the `regions` strategy (ignored by the others). */
  readonly regions: readonly JobRegion[];
}

export const JOB_DEFAULTS = {
  negativePrompt: '',
  steps: 20,
  cfgScale: 7,
  sampler: 'DPM++ 2M',
  scheduleType: 'Automatic',
  width: 512,
  height: 512,
  clipSkip: 1,
  batchSize: 1,
  batchCount: 1,
  rng: 'cpu',
  emphasis: 'original',
  loraMode: 'auto',
} as const;

/** Regions: a box inside the canvas (or a mask file), a prompt; at most 16 (graph region slots). */
export const MAX_REGIONS = 16;

function normalizeRegions(regions: readonly JobRegion[] | undefined, width: number, height: number): JobRegion[] {
  const list = regions ?? [];
  if (list.length > MAX_REGIONS) throw new PipelineError('BAD_ARGUMENT', `regions: at most ${MAX_REGIONS} regions, got ${list.length}.`, { field: 'regions' });
  return list.map((r, i) => {
    const field = `regions[${i}]`;
    if (typeof r.prompt !== 'string') throw new PipelineError('BAD_PROMPT', `${field}.prompt must be text.`, { field: `${field}.prompt` });
    if ((r.box === undefined) === (r.mask === undefined)) throw new PipelineError('BAD_ARGUMENT', `${field}: give either a box [x, y, width, height] or a mask PNG.`, { field });
    if (r.box !== undefined) {
      const [x, y, w, h] = r.box;
      if (![x, y, w, h].every((v) => Number.isFinite(v)) || w <= 0 || h <= 0) {
        throw new PipelineError('BAD_ARGUMENT', `${field}.box must be [x, y, width, height] with positive width and height, got ${JSON.stringify(r.box)}.`, { field: `${field}.box` });
      }
      if (x < 0 || y < 0 || x + w > width || y + h > height) {
        throw new PipelineError('BAD_ARGUMENT', `${field}.box [${r.box.join(', ')}] reaches outside the ${width}×${height} canvas; keep x + width ≤ ${width} and y + height ≤ ${height}.`, {
          field: `${field}.box`,
          box: r.box,
          canvas: [width, height],
        });
      }
    }
    if (r.mask !== undefined && (typeof r.mask !== 'string' || r.mask === '')) throw new PipelineError('BAD_ARGUMENT', `${field}.mask must be a PNG file path.`, { field: `${field}.mask` });
    const lora = r.lora === undefined ? undefined : normalizeLoras([r.lora], () => `${field}.lora`)[0];
    return { ...r, ...(lora === undefined ? {} : { lora }) };
  });
}

function normalizeStrategy(spec: StrategySpec | undefined): StrategySpec {
  const s = spec ?? { name: 'plain' };
  if (!STRATEGY_NAMES.includes(s.name)) throw new PipelineError('BAD_ARGUMENT', `strategy.name must be one of ${STRATEGY_NAMES.join(', ')}, got ${JSON.stringify(s.name)}.`, { field: 'strategy.name' });
  const whole = (field: 'switchEvery' | 'cacheInterval', min: number) => {
    const v = s[field];
    if (v !== undefined && (!Number.isInteger(v) || v < min)) throw new PipelineError('BAD_ARGUMENT', `strategy.${field} must be a whole number ≥ ${min}, got ${v}.`, { field: `strategy.${field}` });
  };
  whole('switchEvery', 1);
  whole('cacheInterval', 0);
  if (s.frequencyClasses !== undefined && !s.frequencyClasses.every((c) => c === 'high' || c === 'low')) {
    throw new PipelineError('BAD_ARGUMENT', `strategy.frequencyClasses must be "high" or "low" per LoRA, got ${JSON.stringify(s.frequencyClasses)}.`, { field: 'strategy.frequencyClasses' });
  }
  if (s.phaseRule !== undefined && !['offline', 'online', 'online-official'].includes(s.phaseRule)) {
    throw new PipelineError('BAD_ARGUMENT', `strategy.phaseRule must be offline, online or online-official, got ${JSON.stringify(s.phaseRule)}.`, { field: 'strategy.phaseRule' });
  }
  if (s.concepts !== undefined && !Array.isArray(s.concepts)) throw new PipelineError('BAD_ARGUMENT', 'strategy.concepts must be a list.', { field: 'strategy.concepts' });
  const concepts = s.concepts?.map((c, i) => ({ ...c, ...(c.lora === undefined ? {} : { lora: normalizeLoras([c.lora], () => `strategy.concepts[${i}].lora`)[0]! }) }));
  return { ...s, ...(concepts === undefined ? {} : { concepts }) };
}

/** Image side limits in pixels: a multiple of 8, from 64 to 4096 (a 4096² latent is 512², far beyond SD 1.5's use). */
export const MIN_SIDE_PX = 64;
export const MAX_SIDE_PX = 4096;
export const LATENT_SCALE = 8;
export const MAX_STEPS = 1000;
export const MAX_BATCH = 64;
/** The model's own layer count is checked when encoding; this only bounds the input. */
export const MAX_CLIP_SKIP = 24;
const EMPHASIS_MODES: readonly EmphasisMode[] = ['original', 'no-norm', 'ignore', 'none'];

export type JobInput = Partial<Omit<GenerateJob, 'seed'>> & { model: string; prompt: string; seed?: bigint | number | string };

/** LoRA strengths beyond ±10 are almost certainly typos; A1111's UI slider spans −1…2. */
const MAX_LORA_STRENGTH = 10;

/** `fieldOf(i)` names entry i in messages (`loras[1]`, `regions[0].lora`). */
function normalizeLoras(loras: readonly JobLora[] | undefined, fieldOf = (i: number) => `loras[${i}]`): JobLora[] {
  return (loras ?? []).map((l, i) => {
    const field = fieldOf(i);
    if (typeof l.name !== 'string' || l.name.trim() === '') throw new PipelineError('BAD_ARGUMENT', `${field}.name: a LoRA needs a name or a path.`, { field: `${field}.name` });
    for (const k of ['te', 'unet'] as const) {
      if (!Number.isFinite(l[k]) || Math.abs(l[k]) > MAX_LORA_STRENGTH) {
        throw new PipelineError('BAD_ARGUMENT', `${field}.${k} (${l.name}): strength must be a number from −${MAX_LORA_STRENGTH} to ${MAX_LORA_STRENGTH}, got ${l[k]}.`, { field: `${field}.${k}` });
      }
    }
    return { name: l.name, te: l.te, unet: l.unet };
  });
}

function int(field: string, value: number, min: number, max: number, hint = ''): number {
  if (!Number.isInteger(value) || value < min || value > max) {
    throw new PipelineError(field === 'steps' ? 'BAD_STEPS' : 'BAD_ARGUMENT', `${field} must be an integer from ${min} to ${max}${hint}, got ${value}.`, { field, value });
  }
  return value;
}

function side(field: 'width' | 'height', value: number): number {
  if (!Number.isInteger(value) || value % LATENT_SCALE !== 0 || value < MIN_SIDE_PX || value > MAX_SIDE_PX) {
    const lower = Math.max(MIN_SIDE_PX, Math.floor(value / LATENT_SCALE) * LATENT_SCALE);
    throw new PipelineError('BAD_SIZE', `${field} must be a multiple of ${LATENT_SCALE} from ${MIN_SIDE_PX} to ${MAX_SIDE_PX} pixels, got ${value}${Number.isFinite(value) ? ` (try ${lower})` : ''}.`, { field, value });
  }
  return value;
}

/** A random seed in 0…2^32−1, as the UIs draw for −1. */
export function randomSeed(): bigint {
  return BigInt(Math.floor(Math.random() * 2 ** 32));
}

/** Fill defaults and validate; throws PipelineError naming the field. */
export function normalizeJob(input: JobInput): GenerateJob {
  if (typeof input.model !== 'string' || input.model === '') throw new PipelineError('BAD_ARGUMENT', 'model is required (a diffusers folder or a .safetensors checkpoint).', { field: 'model' });
  if (typeof input.prompt !== 'string') throw new PipelineError('BAD_PROMPT', 'prompt must be text.', { field: 'prompt' });
  const seedIn = input.seed ?? -1;
  const seed = seedIn === -1 || seedIn === -1n || seedIn === '-1' ? randomSeed() : parseSeed(seedIn);
  const job: GenerateJob = {
    model: input.model,
    prompt: input.prompt,
    negativePrompt: input.negativePrompt ?? JOB_DEFAULTS.negativePrompt,
    steps: int('steps', input.steps ?? JOB_DEFAULTS.steps, 1, MAX_STEPS),
    cfgScale: input.cfgScale ?? JOB_DEFAULTS.cfgScale,
    sampler: input.sampler ?? JOB_DEFAULTS.sampler,
    scheduleType: input.scheduleType ?? JOB_DEFAULTS.scheduleType,
    seed,
    width: side('width', input.width ?? JOB_DEFAULTS.width),
    height: side('height', input.height ?? JOB_DEFAULTS.height),
    clipSkip: int('clipSkip', input.clipSkip ?? JOB_DEFAULTS.clipSkip, 1, MAX_CLIP_SKIP),
    batchSize: int('batchSize', input.batchSize ?? JOB_DEFAULTS.batchSize, 1, MAX_BATCH),
    batchCount: int('batchCount', input.batchCount ?? JOB_DEFAULTS.batchCount, 1, 10_000),
    rng: input.rng ?? JOB_DEFAULTS.rng,
    emphasis: input.emphasis ?? JOB_DEFAULTS.emphasis,
    loras: normalizeLoras(input.loras),
    loraMode: input.loraMode ?? JOB_DEFAULTS.loraMode,
    strategy: normalizeStrategy(input.strategy),
    regions: normalizeRegions(input.regions, input.width ?? JOB_DEFAULTS.width, input.height ?? JOB_DEFAULTS.height),
  };
  if (!['auto', 'bank', 'merged'].includes(job.loraMode)) throw new PipelineError('BAD_ARGUMENT', `loraMode must be auto, bank or merged, got ${JSON.stringify(job.loraMode)}.`, { field: 'loraMode' });
  if (typeof job.negativePrompt !== 'string') throw new PipelineError('BAD_PROMPT', 'negativePrompt must be text.', { field: 'negativePrompt' });
  if (!Number.isFinite(job.cfgScale) || job.cfgScale < 0 || job.cfgScale > 100) {
    throw new PipelineError('BAD_ARGUMENT', `cfgScale must be a number from 0 to 100, got ${job.cfgScale}.`, { field: 'cfgScale', value: job.cfgScale });
  }
  if (job.rng !== 'cpu' && job.rng !== 'nv') throw new PipelineError('BAD_ARGUMENT', `rng must be "cpu" or "nv", got ${JSON.stringify(job.rng)}.`, { field: 'rng', value: job.rng });
  if (!EMPHASIS_MODES.includes(job.emphasis)) {
    throw new PipelineError('BAD_ARGUMENT', `emphasis must be one of ${EMPHASIS_MODES.join(', ')}, got ${JSON.stringify(job.emphasis)}.`, { field: 'emphasis', value: job.emphasis });
  }
  const lastSeed = job.seed + BigInt(job.batchSize * job.batchCount - 1);
  if (lastSeed > SEED_MAX) throw new PipelineError('BAD_SEED', `seed ${job.seed} + ${job.batchSize * job.batchCount - 1} images exceeds the largest seed ${SEED_MAX}.`, { field: 'seed' });
  resolveSampler(job.sampler, job.scheduleType);
  checkGradientJob(job);
  return job;
}
