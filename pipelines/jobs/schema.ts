/**
 * Job spec v1: the serializable JSON form of a `GenerateJob`, one per line in a JSONL job file,
 * shared by the CLI (`chorus batch`), the queue (it stores jobs in this form) and tests.
 *
 * A line may be as small as
 *   {"model": "path", "prompt": "a cat", "seed": 1, "steps": 4, "width": 64, "height": 64}
 * Every other field has the default of `JOB_DEFAULTS` (pipelines/job.ts). Fields:
 *
 * | field            | JSON type                          | default / meaning                                                  |
 * |------------------|------------------------------------|--------------------------------------------------------------------|
 * | `version`        | 1                                  | absent = 1; a newer version is rejected with a clear error         |
 * | `name`           | string                             | the job's name, the `{job}` output token (default: its number)     |
 * | `model`          | string (required)                  | diffusers folder or .safetensors; relative to the job file's folder|
 * | `prompt`         | string (required)                  | A1111 syntax, `<lora:name:w>` tags included                        |
 * | `negativePrompt` | string                             | ""                                                                 |
 * | `steps`          | integer                            | 20                                                                 |
 * | `cfgScale`       | number                             | 7                                                                  |
 * | `sampler`        | string                             | "DPM++ 2M" (A1111 names)                                           |
 * | `scheduleType`   | string                             | "Automatic"                                                        |
 * | `seed`           | integer, or a decimal string       | -1 = random (drawn once, when the job is queued)                   |
 * | `width`/`height` | integer                            | 512 (multiples of 8)                                               |
 * | `clipSkip`       | integer                            | 1                                                                  |
 * | `batchSize`      | integer                            | 1 (images per denoising run)                                       |
 * | `batchCount`     | integer                            | 1                                                                  |
 * | `rng`            | "cpu" / "nv"                       | "cpu"                                                              |
 * | `emphasis`       | "original" / "no-norm" / "ignore" / "none" | "original"                                                 |
 * | `loras`          | [{name, te?, unet?}]               | []; te default 1, unet default te; a path is relative to the file  |
 * | `loraMode`       | "auto" / "bank" / "merged"         | "auto"                                                             |
 * | `strategy`       | name, or {name, switchEvery?, cacheInterval?, frequencyClasses?, phaseRule?, official?} | "plain" |
 * | `regions`        | [{box?: [x,y,w,h], mask?, prompt, negativePrompt?, lora?}] | [] (the `regions` strategy)                |
 * | `output`         | string                             | file-name pattern (see queue/outputs.ts); default `{index}-{seed}.png` |
 * | `priority`       | integer                            | 0; higher runs first                                               |
 *
 * Unknown fields are rejected (a typo would otherwise be silently ignored), with a suggestion.
 * Every error is a `PipelineError` whose message starts with the field path (`loras[1].te`,
 * `strategy.cacheInterval`), prefixed by `file:line` when read from a file.
 *
 * Compatibility: a file written for v1 stays readable by every later version (test/data/jobs-v1.jsonl
 * is the pinned example). A v2 adds a migration from v1 here, never a reinterpretation.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { PipelineError, isPipelineError } from '../errors.ts';
import { normalizeJob, type GenerateJob, type JobInput, type JobLora, type JobRegion } from '../job.ts';
import type { StrategySpec } from '../strategies/index.ts';

export const JOB_SPEC_VERSION = 1;

/** LoRA strengths when a spec leaves them out: A1111's `<lora:name>` is te = unet = 1. */
const DEFAULT_LORA_STRENGTH = 1;

export interface JobLoraSpecV1 {
  readonly name: string;
  readonly te?: number;
  readonly unet?: number;
}

export interface JobSpecV1 {
  readonly version?: 1;
  readonly name?: string;
  readonly model: string;
  readonly prompt: string;
  readonly negativePrompt?: string;
  readonly steps?: number;
  readonly cfgScale?: number;
  readonly sampler?: string;
  readonly scheduleType?: string;
  readonly seed?: number | string;
  readonly width?: number;
  readonly height?: number;
  readonly clipSkip?: number;
  readonly batchSize?: number;
  readonly batchCount?: number;
  readonly rng?: string;
  readonly emphasis?: string;
  readonly loras?: readonly JobLoraSpecV1[];
  readonly loraMode?: string;
  readonly strategy?: string | (Omit<StrategySpec, 'name'> & { readonly name: string });
  readonly regions?: ReadonlyArray<{
    readonly box?: readonly number[];
    readonly mask?: string;
    readonly prompt: string;
    readonly negativePrompt?: string;
    readonly lora?: JobLoraSpecV1;
  }>;
  readonly output?: string;
  readonly priority?: number;
}

/** A validated job with what the queue needs besides the generation settings. */
export interface JobEntry {
  readonly job: GenerateJob;
  readonly name?: string;
  /** File-name pattern of this job's images (the batch default when absent). */
  readonly output?: string;
  readonly priority: number;
}

/** Where a spec came from, for messages: `jobs.jsonl:3` or `jobs.jsonl:3 (grid x=2 y=1)`. */
export interface SpecSource {
  readonly file: string;
  readonly line: number;
  readonly note?: string;
}

export interface ParseSpecOptions {
  /** Relative model, LoRA and mask paths resolve against this folder (the job file's). */
  readonly baseDir?: string;
  readonly source?: SpecSource;
}

// ---------------------------------------------------------------------------------------------
// Structural checks: JSON types and unknown fields, with the field path. Ranges and enumerations
// are `normalizeJob`'s, so a job typed in the app and a job read from a file fail the same way.

type Check = (value: unknown, field: string) => void;

function fail(field: string, message: string, details: Record<string, unknown> = {}): never {
  throw new PipelineError('BAD_ARGUMENT', `${field}: ${message}`, { field, ...details });
}

function describe(value: unknown): string {
  if (value === null) return 'null';
  if (Array.isArray(value)) return 'an array';
  if (typeof value === 'object') return 'an object';
  if (typeof value === 'string') return `the text ${JSON.stringify(value.length > 40 ? `${value.slice(0, 40)}…` : value)}`;
  return `${typeof value} ${String(value)}`;
}

const isString: Check = (v, f) => {
  if (typeof v !== 'string') fail(f, `must be text, got ${describe(v)}.`);
};
const isNumber: Check = (v, f) => {
  if (typeof v !== 'number' || !Number.isFinite(v)) fail(f, `must be a number, got ${describe(v)}.`);
};
const isInteger: Check = (v, f) => {
  if (typeof v !== 'number' || !Number.isInteger(v)) fail(f, `must be a whole number, got ${describe(v)}.`);
};
const isBoolean: Check = (v, f) => {
  if (typeof v !== 'boolean') fail(f, `must be true or false, got ${describe(v)}.`);
};
const isSeed: Check = (v, f) => {
  if (typeof v !== 'number' && typeof v !== 'string') fail(f, `must be a whole number or a decimal string, got ${describe(v)}.`);
};
const arrayOf =
  (item: Check): Check =>
  (v, f) => {
    if (!Array.isArray(v)) fail(f, `must be an array, got ${describe(v)}.`);
    v.forEach((x, i) => item(x, `${f}[${i}]`));
  };

/** Edit distance, for "did you mean" on unknown fields. */
function editDistance(a: string, b: string): number {
  const row = Array.from({ length: b.length + 1 }, (_, j) => j);
  for (let i = 1; i <= a.length; i++) {
    let diagonal = row[0]!;
    row[0] = i;
    for (let j = 1; j <= b.length; j++) {
      const above = row[j]!;
      row[j] = Math.min(row[j]! + 1, row[j - 1]! + 1, diagonal + (a[i - 1] === b[j - 1] ? 0 : 1));
      diagonal = above;
    }
  }
  return row[b.length]!;
}

/** Suggest a field for a typo: same letters in another case, or at most 2 edits away. */
const MAX_SUGGESTION_EDITS = 2;

const objectOf =
  (fields: Readonly<Record<string, Check>>): Check =>
  (v, f) => {
    if (typeof v !== 'object' || v === null || Array.isArray(v)) {
      if (f === '') throw new PipelineError('BAD_ARGUMENT', `a job must be a JSON object ({"model": …, "prompt": …}), got ${describe(v)}.`, {});
      fail(f, `must be an object, got ${describe(v)}.`);
    }
    const known = Object.keys(fields);
    for (const [key, value] of Object.entries(v)) {
      const field = f === '' ? key : `${f}.${key}`;
      const check = fields[key];
      if (check === undefined) {
        const near = known.map((k) => ({ k, d: k.toLowerCase() === key.toLowerCase() ? 0 : editDistance(k, key) })).sort((a, b) => a.d - b.d)[0];
        const hint = near !== undefined && near.d <= MAX_SUGGESTION_EDITS ? ` Did you mean "${near.k}"?` : ` Known fields: ${known.join(', ')}.`;
        fail(field, `unknown field.${hint}`);
      }
      if (value !== undefined) check(value, field);
    }
  };

const LORA_FIELDS = { name: isString, te: isNumber, unet: isNumber };
const isLora = objectOf(LORA_FIELDS);
/** A JSON object whose contents the strategy's own validation (in `normalizeJob`) checks. */
const isObject: Check = (v, f) => {
  if (typeof v !== 'object' || v === null || Array.isArray(v)) fail(f, `must be an object, got ${describe(v)}.`);
};
const STRATEGY_FIELDS = {
  name: isString,
  switchEvery: isNumber,
  cacheInterval: isNumber,
  frequencyClasses: arrayOf(isString),
  phaseRule: isString,
  official: isBoolean,
  concepts: arrayOf(isObject),
  clora: isObject,
  loraComposer: isObject,
} as const;
// Every StrategySpec knob must be readable from a job file: a knob added there without a check here
// fails to compile, naming it.
const EVERY_STRATEGY_KNOB_CHECKED: Exclude<keyof StrategySpec, keyof typeof STRATEGY_FIELDS> extends never ? true : Exclude<keyof StrategySpec, keyof typeof STRATEGY_FIELDS> = true;
void EVERY_STRATEGY_KNOB_CHECKED;
const isStrategy: Check = (v, f) => (typeof v === 'string' ? undefined : objectOf(STRATEGY_FIELDS)(v, f));
const isBox: Check = (v, f) => {
  arrayOf(isNumber)(v, f);
  if ((v as unknown[]).length !== 4) fail(f, `must be [x, y, width, height], got ${(v as unknown[]).length} numbers.`);
};
const isRegion = objectOf({ box: isBox, mask: isString, prompt: isString, negativePrompt: isString, lora: isLora });

/** The v1 fields and their JSON types. */
export const JOB_SPEC_FIELDS: Readonly<Record<keyof JobSpecV1, Check>> = {
  version: isInteger,
  name: isString,
  model: isString,
  prompt: isString,
  negativePrompt: isString,
  steps: isNumber,
  cfgScale: isNumber,
  sampler: isString,
  scheduleType: isString,
  seed: isSeed,
  width: isNumber,
  height: isNumber,
  clipSkip: isNumber,
  batchSize: isNumber,
  batchCount: isNumber,
  rng: isString,
  emphasis: isString,
  loras: arrayOf(isLora),
  loraMode: isString,
  strategy: isStrategy,
  regions: arrayOf(isRegion),
  output: isString,
  priority: isInteger,
};

// ---------------------------------------------------------------------------------------------

/** The field a `normalizeJob` / sampler / seed error is about. */
function fieldOf(e: PipelineError): string | undefined {
  if (typeof e.details.field === 'string') return e.details.field;
  if (e.code === 'BAD_SEED') return 'seed';
  if (e.code === 'UNKNOWN_SAMPLER') return 'sampler' in e.details ? 'sampler' : 'scheduleType';
  return undefined;
}

/** A pipeline error with the field path leading its message and the source in front. */
function located(e: PipelineError, source: SpecSource | undefined): PipelineError {
  const field = fieldOf(e);
  const withField = field === undefined || e.message.startsWith(field) ? e.message : `${field}: ${e.message}`;
  const where = source === undefined ? '' : `${source.file}:${source.line}${source.note === undefined ? '' : ` (${source.note})`}: `;
  return new PipelineError(e.code, `${where}${withField}`, { ...e.details, ...(field === undefined ? {} : { field }), ...(source === undefined ? {} : { file: source.file, line: source.line }) });
}

function looksLikePath(name: string): boolean {
  return name.includes('/') || name.includes('\\') || name.toLowerCase().endsWith('.safetensors');
}

function lora(spec: JobLoraSpecV1, resolve: (p: string) => string): JobLora {
  const te = spec.te ?? DEFAULT_LORA_STRENGTH;
  return { name: looksLikePath(spec.name) ? resolve(spec.name) : spec.name, te, unet: spec.unet ?? te };
}

/** Concept LoRAs (CLoRA, LoRA-Composer) get the same strength defaults and path resolution as the job's. */
function withConceptLoras(strategy: Exclude<JobSpecV1['strategy'], string | undefined>, resolve: (p: string) => string): object {
  const concepts = (strategy as { concepts?: unknown }).concepts;
  if (!Array.isArray(concepts)) return strategy;
  return {
    ...strategy,
    concepts: concepts.map((c: Record<string, unknown>) => {
      const l = c.lora as JobLoraSpecV1 | undefined;
      return typeof l === 'object' && l !== null && typeof l.name === 'string' ? { ...c, lora: lora(l, resolve) } : c;
    }),
  };
}

/**
 * Validate one spec (parsed JSON) and build its job. Throws `PipelineError` whose message starts
 * with `file:line: ` (when `source` is given) and the field path. A seed of −1 (or none) is drawn
 * here, so store the result, not the spec, to reproduce the job.
 */
export function parseJobSpec(value: unknown, options: ParseSpecOptions = {}): JobEntry {
  try {
    objectOf(JOB_SPEC_FIELDS)(value, '');
    const spec = value as JobSpecV1;
    if (spec.version !== undefined && spec.version !== JOB_SPEC_VERSION) {
      fail('version', `this Chorus reads job spec version ${JOB_SPEC_VERSION}, the job says ${spec.version}${spec.version > JOB_SPEC_VERSION ? ' (written by a newer Chorus: update Chorus)' : ''}.`);
    }
    const resolve = (p: string) => (options.baseDir === undefined ? p : path.resolve(options.baseDir, p));
    const strategy = spec.strategy === undefined ? undefined : typeof spec.strategy === 'string' ? { name: spec.strategy } : withConceptLoras(spec.strategy, resolve);
    const input: JobInput = {
      model: typeof spec.model === 'string' && spec.model !== '' ? resolve(spec.model) : spec.model,
      prompt: spec.prompt,
      ...(spec.negativePrompt === undefined ? {} : { negativePrompt: spec.negativePrompt }),
      ...(spec.steps === undefined ? {} : { steps: spec.steps }),
      ...(spec.cfgScale === undefined ? {} : { cfgScale: spec.cfgScale }),
      ...(spec.sampler === undefined ? {} : { sampler: spec.sampler }),
      ...(spec.scheduleType === undefined ? {} : { scheduleType: spec.scheduleType }),
      ...(spec.seed === undefined ? {} : { seed: spec.seed }),
      ...(spec.width === undefined ? {} : { width: spec.width }),
      ...(spec.height === undefined ? {} : { height: spec.height }),
      ...(spec.clipSkip === undefined ? {} : { clipSkip: spec.clipSkip }),
      ...(spec.batchSize === undefined ? {} : { batchSize: spec.batchSize }),
      ...(spec.batchCount === undefined ? {} : { batchCount: spec.batchCount }),
      // Enumerations are checked by normalizeJob; the casts only name the type it checks against.
      ...(spec.rng === undefined ? {} : { rng: spec.rng as GenerateJob['rng'] }),
      ...(spec.emphasis === undefined ? {} : { emphasis: spec.emphasis as GenerateJob['emphasis'] }),
      ...(spec.loras === undefined ? {} : { loras: spec.loras.map((l) => lora(l, resolve)) }),
      ...(spec.loraMode === undefined ? {} : { loraMode: spec.loraMode as GenerateJob['loraMode'] }),
      ...(strategy === undefined ? {} : { strategy: strategy as StrategySpec }),
      ...(spec.regions === undefined
        ? {}
        : {
            regions: spec.regions.map(
              (r): JobRegion => ({
                prompt: r.prompt,
                ...(r.box === undefined ? {} : { box: r.box as unknown as JobRegion['box'] }),
                ...(r.mask === undefined ? {} : { mask: resolve(r.mask) }),
                ...(r.negativePrompt === undefined ? {} : { negativePrompt: r.negativePrompt }),
                ...(r.lora === undefined ? {} : { lora: lora(r.lora, resolve) }),
              }),
            ),
          }),
    };
    if (spec.output !== undefined && spec.output.trim() === '') fail('output', 'must be a file-name pattern such as "{index}-{seed}.png", got empty text.');
    return {
      job: normalizeJob(input),
      ...(spec.name === undefined ? {} : { name: spec.name }),
      ...(spec.output === undefined ? {} : { output: spec.output }),
      priority: spec.priority ?? 0,
    };
  } catch (e) {
    if (isPipelineError(e)) throw located(e, options.source);
    throw e;
  }
}

/** A seed as JSON: a number while exact, else a decimal string. */
function seedJson(seed: bigint): number | string {
  return seed <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(seed) : seed.toString();
}

/**
 * The v1 JSON of a job with every field written out (what the queue stores). Parsing it gives the
 * same job back: `parseJobSpec(serializeJobSpec(e)).job` deep-equals `e.job`.
 */
export function serializeJobSpec(entry: JobEntry): JobSpecV1 {
  const { job } = entry;
  return {
    version: JOB_SPEC_VERSION,
    ...(entry.name === undefined ? {} : { name: entry.name }),
    model: job.model,
    prompt: job.prompt,
    negativePrompt: job.negativePrompt,
    steps: job.steps,
    cfgScale: job.cfgScale,
    sampler: job.sampler,
    scheduleType: job.scheduleType,
    seed: seedJson(job.seed),
    width: job.width,
    height: job.height,
    clipSkip: job.clipSkip,
    batchSize: job.batchSize,
    batchCount: job.batchCount,
    rng: job.rng,
    emphasis: job.emphasis,
    loras: job.loras.map((l) => ({ name: l.name, te: l.te, unet: l.unet })),
    loraMode: job.loraMode,
    strategy: { ...job.strategy },
    regions: job.regions.map((r) => ({
      prompt: r.prompt,
      ...(r.box === undefined ? {} : { box: [...r.box] }),
      ...(r.mask === undefined ? {} : { mask: r.mask }),
      ...(r.negativePrompt === undefined ? {} : { negativePrompt: r.negativePrompt }),
      ...(r.lora === undefined ? {} : { lora: { ...r.lora } }),
    })),
    ...(entry.output === undefined ? {} : { output: entry.output }),
    priority: entry.priority,
  };
}

/** One non-blank line of a JSONL job file, parsed but not yet validated. */
export interface JobLine {
  /** 1-based line number. */
  readonly line: number;
  readonly spec: unknown;
}

/** Split JSONL text into parsed lines (blank lines skipped). Throws `file:line: not valid JSON`. */
export function parseJsonl(text: string, file: string): JobLine[] {
  const out: JobLine[] = [];
  text.replace(/^\uFEFF/, '').split(/\r?\n/).forEach((raw, i) => {
    if (raw.trim() === '') return;
    try {
      out.push({ line: i + 1, spec: JSON.parse(raw) });
    } catch (e) {
      throw new PipelineError('BAD_ARGUMENT', `${file}:${i + 1}: not valid JSON (${(e as Error).message}). Each line of a job file is one JSON object.`, { file, line: i + 1 });
    }
  });
  if (out.length === 0) throw new PipelineError('BAD_ARGUMENT', `${file}: no jobs (the file is empty).`, { file });
  return out;
}

/** Read a JSONL job file as text and lines. Throws `PipelineError` for a missing file or bad JSON. */
export function readJobLines(file: string): { text: string; lines: JobLine[] } {
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf-8');
  } catch (e) {
    throw new PipelineError('BAD_ARGUMENT', `job file ${file} cannot be read (${(e as NodeJS.ErrnoException).code ?? (e as Error).message}).`, { file });
  }
  return { text, lines: parseJsonl(text, file) };
}

/** Read and validate a JSONL job file; relative paths in it resolve against its folder. */
export function readJobsFile(file: string): JobEntry[] {
  const { lines } = readJobLines(file);
  const baseDir = path.dirname(path.resolve(file));
  return lines.map((l) => parseJobSpec(l.spec, { baseDir, source: { file, line: l.line } }));
}
