/**
 * The app's API contract: one typed map of operations (payload → result), the events the engine host
 * streams, the error shape, and a runtime validator for every payload.
 *
 * Both transports carry exactly this: Electron (preload bridge → main → MessagePort → utility process)
 * and `chorus serve` (POST /api/<op> with JSON, WebSocket /api/events). The renderer imports this file
 * with `import type` only, so it is self-contained: no imports, no Node APIs. Facts that live in
 * `pipelines/` (strategy names, samplers, defaults) reach the UI at run time through `app.info`, and
 * `handlers.ts` checks at compile time that the wire types here match the pipeline types.
 *
 * Wire values are JSON: seeds are decimal strings (they reach 2^64 − 1), images are data URLs or
 * base64 strings.
 */

// ---- errors ------------------------------------------------------------------------------------

/**
 * Codes the API adds to the `models/` and `pipelines/` codes (which pass through unchanged):
 * - `BAD_PAYLOAD`: a payload failed validation; `details.field` names the field (`job.steps`).
 * - `UNKNOWN_OPERATION`: no such operation.
 * - `NO_MODEL`: the operation needs an open model.
 * - `NOT_FOUND`: a job, gallery image or LoRA preview that does not exist.
 * - `INTERNAL`: a bug; the message says what failed.
 */
export type ApiOwnErrorCode = 'BAD_PAYLOAD' | 'UNKNOWN_OPERATION' | 'NO_MODEL' | 'NOT_FOUND' | 'INTERNAL';

/** How every error crosses a boundary. `code` is stable; the renderer maps it to UI text. */
export interface ApiError {
  readonly code: string;
  readonly message: string;
  readonly details: Readonly<Record<string, unknown>>;
}

export type ApiResponse<T> = { readonly ok: true; readonly result: T } | { readonly ok: false; readonly error: ApiError };

/** Thrown by validators and handlers for API-level failures. */
export class ApiFailure extends Error {
  readonly code: ApiOwnErrorCode;
  readonly details: Readonly<Record<string, unknown>>;
  constructor(code: ApiOwnErrorCode, message: string, details: Record<string, unknown> = {}) {
    super(message);
    this.name = 'ApiFailure';
    this.code = code;
    this.details = details;
  }
}

// ---- wire types --------------------------------------------------------------------------------

export type StrategyNameWire = 'plain' | 'merge' | 'switch' | 'composite' | 'cmlora' | 'regions' | 'clora' | 'lora-composer';
export type LoraModeWire = 'auto' | 'bank' | 'merged';
export type RngWire = 'cpu' | 'nv';
export type EmphasisWire = 'original' | 'no-norm' | 'ignore' | 'none';
export type DeviceWire = 'auto' | 'cpu' | 'cuda' | 'dml' | 'coreml' | 'webgpu';

export interface LoraPayload {
  /** Library name (file stem or alias) or a path. */
  readonly name: string;
  readonly te: number;
  readonly unet: number;
}

export interface StrategyPayload {
  readonly name: StrategyNameWire;
  readonly switchEvery?: number;
  readonly cacheInterval?: number;
  readonly frequencyClasses?: ReadonlyArray<'high' | 'low'>;
  readonly phaseRule?: 'offline' | 'online' | 'online-official';
  readonly official?: boolean;
  /** CLoRA, LoRA-Composer: words of the prompt bound to a LoRA (LoRA-Composer: one per region, words only). */
  readonly concepts?: readonly ConceptPayload[];
  readonly clora?: CloraKnobsPayload;
  readonly loraComposer?: ComposerKnobsPayload;
}

export interface ConceptPayload {
  readonly words: string;
  readonly otherWords?: string;
  readonly lora?: LoraPayload;
  readonly prompt?: string;
}

export interface CloraKnobsPayload {
  readonly stepSize?: number;
  readonly updateUntil?: number;
  readonly refineSteps?: readonly number[];
  readonly refineRounds?: number;
  readonly maskThreshold?: number;
  readonly maskAfter?: number;
  readonly temperature?: number;
  readonly morphology?: ReadonlyArray<'dilate' | 'erode' | 'opening' | 'closing'>;
  readonly latentUpdate?: boolean;
}

export interface ComposerKnobsPayload {
  readonly stepSize?: number;
  readonly refineUntil?: number;
  readonly earlyStopFrom?: number;
  readonly weights?: { readonly box: number; readonly fill: number; readonly region: number };
  readonly topKRatio?: number;
  readonly isolation?: boolean;
  readonly reinit?: boolean;
  readonly fillLoss?: boolean;
  readonly gaussianBox?: boolean;
  readonly regionLoss?: boolean;
}

export interface RegionPayload {
  /** Pixels from the top-left: x, y, width, height. Exactly one of `box` and `maskPng`. */
  readonly box?: readonly [number, number, number, number];
  /** A painted mask: PNG bytes as base64 (or a `data:image/png;base64,` URL); white/opaque = in the region. */
  readonly maskPng?: string;
  readonly prompt: string;
  readonly negativePrompt?: string;
  readonly lora?: LoraPayload;
}

/** A generation job as the UI sends it. The model is the host's open model. */
export interface JobPayload {
  readonly prompt: string;
  readonly negativePrompt?: string;
  readonly steps?: number;
  readonly cfgScale?: number;
  readonly sampler?: string;
  readonly scheduleType?: string;
  /** Decimal string or number; −1 (or absent) draws a random seed. */
  readonly seed?: string | number;
  readonly width?: number;
  readonly height?: number;
  readonly clipSkip?: number;
  readonly batchSize?: number;
  readonly batchCount?: number;
  readonly rng?: RngWire;
  readonly emphasis?: EmphasisWire;
  readonly loras?: readonly LoraPayload[];
  readonly loraMode?: LoraModeWire;
  readonly strategy?: StrategyPayload;
  readonly regions?: readonly RegionPayload[];
}

export interface StrategyKnob {
  /** A field of the strategy payload; dotted: a field of its knob object (`clora.stepSize` → `strategy.clora.stepSize`). */
  readonly name:
    | 'switchEvery'
    | 'cacheInterval'
    | 'phaseRule'
    | 'official'
    | 'clora.stepSize'
    | 'clora.refineRounds'
    | 'clora.maskThreshold'
    | 'clora.latentUpdate'
    | 'loraComposer.stepSize'
    | 'loraComposer.topKRatio'
    | 'loraComposer.isolation'
    | 'loraComposer.reinit';
  readonly label: string;
  /** int: whole numbers; number: any number from min to max in `step` increments. */
  readonly kind: 'int' | 'number' | 'choice' | 'boolean';
  readonly step?: number;
  readonly default: number | string | boolean;
  readonly min?: number;
  readonly max?: number;
  readonly choices?: readonly string[];
}

export interface StrategyInfo {
  readonly name: StrategyNameWire;
  readonly summary: string;
  readonly knobs: readonly StrategyKnob[];
  /** False when the strategy is reserved but not implemented yet (the job fails with a typed error). */
  readonly available: boolean;
  /** True for methods that bind LoRAs to words of the prompt (the token picker). */
  readonly usesConceptWords: boolean;
}

export interface AppInfo {
  readonly version: string;
  readonly strategies: readonly StrategyInfo[];
  readonly samplers: readonly string[];
  readonly scheduleTypes: readonly string[];
  readonly defaults: {
    readonly steps: number;
    readonly cfgScale: number;
    readonly sampler: string;
    readonly scheduleType: string;
    readonly width: number;
    readonly height: number;
    readonly clipSkip: number;
  };
  readonly limits: { readonly minSidePx: number; readonly maxSidePx: number; readonly sideMultiple: number; readonly maxSteps: number; readonly maxRegions: number };
  /** This machine's RAM: what jobs are planned for when `Settings.memoryBytes` is null. */
  readonly machineMemoryBytes: number;
}

export interface Settings {
  /** Where generated images are written (and the gallery reads). */
  readonly outputDir: string;
  /** LoRA folders besides those of the install the model sits in. */
  readonly loraDirs: readonly string[];
  /** Last folder scanned for models (an A1111 / ComfyUI install or any folder). */
  readonly modelsDir: string | null;
  readonly device: DeviceWire;
  /** Opened at start when set. */
  readonly lastModel: string | null;
  /**
   * The RAM to plan UNet batches and sessions for (bytes, at least 1 GiB), to leave room for other
   * programs; `null`: all of this machine's (`AppInfo.machineMemoryBytes`). As `chorus generate --memory`.
   */
  readonly memoryBytes: number | null;
}

export interface ModelCandidate {
  readonly path: string;
  readonly name: string;
  readonly format: 'diffusers' | 'single-file' | 'pickle' | 'other';
  /** Whether Chorus can load it (an SD 1.x checkpoint or diffusers folder). */
  readonly loadable: boolean;
  /** What it is and why (detection evidence, or why it is refused). */
  readonly note: string;
  readonly sizeBytes: number;
}

export interface ModelScan {
  readonly dir: string;
  /** `a1111`, `comfyui` or `folder`. */
  readonly layout: 'a1111' | 'comfyui' | 'folder';
  readonly candidates: readonly ModelCandidate[];
  readonly loraFolders: readonly string[];
  /** Set when nothing loadable was found: what to do. */
  readonly hint: string | null;
}

export interface ModelStatus {
  readonly path: string;
  readonly name: string;
  readonly format: 'diffusers' | 'single-file';
  readonly configSources: Readonly<Record<string, string>>;
  readonly unetChannels: number;
  readonly textLayers: number;
  /** LoRA folders in use: the settings' plus the install's. */
  readonly loraFolders: readonly string[];
  readonly device: DeviceWire;
  /**
   * The execution provider the engine uses for this device setting and why (one line, e.g. "cpu: …;
   * webgpu skipped (only a software adapter …)"), plus the weight precision and why. Planned when
   * the model opens; the actual choice once the first session exists.
   */
  readonly provider: { readonly device: string; readonly reason: string; readonly precision: string };
}

export interface LoraCard {
  readonly path: string;
  readonly name: string;
  readonly alias: string | null;
  readonly folder: string;
  readonly baseModel: 'sd1' | 'sd2' | 'sdxl' | 'unknown';
  readonly baseModelEvidence: string;
  readonly triggerWords: readonly string[];
  readonly activationText: string | null;
  readonly preferredWeight: number | null;
  readonly notes: string | null;
  readonly hasPreview: boolean;
  readonly sizeBytes: number;
  /** What is wrong with the file (unreadable, pickle, other base model); empty when fine. */
  readonly problems: readonly string[];
}

export type JobStatus = 'pending' | 'running' | 'done' | 'cancelled' | 'failed';

export interface JobSummary {
  readonly id: string;
  readonly status: JobStatus;
  readonly prompt: string;
  readonly seed: string;
  readonly strategy: StrategyNameWire;
  /** 0…1 over the whole job. */
  readonly fraction: number;
  readonly images: readonly string[];
  readonly error: ApiError | null;
  readonly createdAt: number;
  /** How the job's UNet calls were planned for the memory setting (set when it starts running). */
  readonly plan: JobPlan | null;
}

/** `settings.set`: any settings; the memory as bytes or as people write it ("12G", "16 GiB"). */
export type SettingsUpdate = Partial<Omit<Settings, 'memoryBytes'>> & { readonly memoryBytes?: number | string | null };

/** The smallest memory plan: below 1 GiB not even the tiny models' sessions fit. */
export const MIN_MEMORY_BYTES = 2 ** 30;

/**
 * A memory size as people write it: bytes, or a number with K, M, G or T in binary units (16G =
 * 16 GiB; KiB/MiB/GiB/TiB and KB/MB/GB/TB read the same way). Undefined unless at least 1 GiB.
 */
export function memorySizeBytes(value: string): number | undefined {
  const m = /^\s*(\d+(?:\.\d+)?)\s*(?:([KMGT])(?:i?B)?|B)?\s*$/i.exec(value);
  const bytes = m === null ? NaN : Number(m[1]) * 1024 ** (m[2] === undefined ? 0 : 'KMGT'.indexOf(m[2].toUpperCase()) + 1);
  return Number.isFinite(bytes) && bytes >= MIN_MEMORY_BYTES ? Math.floor(bytes) : undefined;
}

/** A job's memory plan (`generate`'s `MemoryPlan`). */
export interface JobPlan {
  readonly memoryBytes: number;
  /** Largest batch per forward UNet call. */
  readonly maxBatch: number;
  /** Largest batch per gradient call (gradient-guided strategies). */
  readonly gradientBatch: number | null;
  /** UNet sessions kept alive together. */
  readonly sessions: number;
  /** The gradient session runs alone in memory. */
  readonly exclusive: boolean;
}

export interface GalleryItem {
  /** File name inside the output folder. */
  readonly file: string;
  readonly createdAt: number;
  readonly seed: string | null;
  readonly width: number | null;
  readonly height: number | null;
  /** The settings that made it, when the PNG carries them. */
  readonly job: JobPayload | null;
  /** A1111 infotext, when present. */
  readonly infotext: string | null;
}

/** A job of the durable batch queue (`chorus batch`, `chorus queue`), as the Queue screen shows it. */
export interface BatchQueueJob {
  readonly id: number;
  readonly batchId: number | null;
  readonly state: 'queued' | 'running' | 'done' | 'failed' | 'cancelled' | 'paused';
  readonly name: string | null;
  readonly prompt: string;
  readonly seed: string;
  readonly strategy: StrategyNameWire;
  readonly attempts: number;
  /** Image files it writes (absolute paths) and whether each is written. */
  readonly outputs: ReadonlyArray<{ readonly path: string; readonly written: boolean }>;
  readonly error: ApiError | null;
  readonly createdAt: number;
}

export interface BatchQueueView {
  /** The queue database, or null when no batch was ever queued on this machine. */
  readonly file: string | null;
  readonly paused: boolean;
  readonly jobs: readonly BatchQueueJob[];
}

export interface BatchQueueControlResult {
  readonly id: number;
  readonly outcome: string;
  readonly state: BatchQueueJob['state'];
}

/** Settings recovered from an image file. */
export interface LoadedSettings {
  /** Which metadata it came from (`chorus`, `a1111`, `comfyui`, …) or `none`. */
  readonly source: string;
  readonly job: JobPayload | null;
  /** Model name the image records, for the user to compare. */
  readonly model: string | null;
  /** What could not be carried over (unknown sampler, regions in ComfyUI graphs, …). */
  readonly notes: readonly string[];
}

// ---- operations --------------------------------------------------------------------------------

type Empty = Readonly<Record<string, never>>;

export interface Operations {
  'app.info': { payload: Empty; result: AppInfo };
  'settings.get': { payload: Empty; result: Settings };
  'settings.set': { payload: SettingsUpdate; result: Settings };
  'models.scan': { payload: { readonly dir: string }; result: ModelScan };
  'models.open': { payload: { readonly path: string }; result: ModelStatus };
  'models.status': { payload: Empty; result: ModelStatus | null };
  'loras.list': { payload: { readonly refresh?: boolean }; result: readonly LoraCard[] };
  'loras.preview': { payload: { readonly path: string }; result: { readonly dataUrl: string | null } };
  'jobs.generate': { payload: { readonly job: JobPayload }; result: { readonly id: string; readonly seed: string } };
  'jobs.cancel': { payload: { readonly id: string }; result: { readonly cancelled: boolean } };
  'jobs.list': { payload: Empty; result: readonly JobSummary[] };
  'gallery.list': { payload: { readonly limit?: number }; result: readonly GalleryItem[] };
  'gallery.image': { payload: { readonly file: string; readonly thumbnail?: boolean }; result: { readonly dataUrl: string } };
  'gallery.readMetadata': { payload: { readonly png: string; readonly name?: string }; result: LoadedSettings };
  'queue.list': { payload: { readonly limit?: number }; result: BatchQueueView };
  'queue.control': { payload: { readonly action: 'cancel' | 'pause' | 'resume' | 'retry'; readonly ids: readonly number[] }; result: readonly BatchQueueControlResult[] };
}

export type OpName = keyof Operations;
export type Payload<K extends OpName> = Operations[K]['payload'];
export type Result<K extends OpName> = Operations[K]['result'];

export const OPERATIONS: readonly OpName[] = [
  'app.info',
  'settings.get',
  'settings.set',
  'models.scan',
  'models.open',
  'models.status',
  'loras.list',
  'loras.preview',
  'jobs.generate',
  'jobs.cancel',
  'jobs.list',
  'gallery.list',
  'gallery.image',
  'gallery.readMetadata',
  'queue.list',
  'queue.control',
];

export function isOpName(op: unknown): op is OpName {
  return typeof op === 'string' && (OPERATIONS as readonly string[]).includes(op);
}

// ---- events ------------------------------------------------------------------------------------

export type ApiEvent =
  | {
      readonly type: 'job.progress';
      readonly id: string;
      /** Sampling step of the current batch, 1-based. */
      readonly step: number;
      readonly steps: number;
      readonly batch: number;
      readonly batches: number;
      /** 0…1 over the whole job. */
      readonly fraction: number;
      /** A cheap latent→RGB preview (PNG data URL), not on every event. */
      readonly preview: string | null;
    }
  | { readonly type: 'job.image'; readonly id: string; readonly item: GalleryItem }
  | { readonly type: 'job.status'; readonly id: string; readonly job: JobSummary };

// ---- validators --------------------------------------------------------------------------------

/** A runtime check: returns the value typed, or throws `BAD_PAYLOAD` naming `field`. */
export type Check<T> = (value: unknown, field: string) => T;
export type Optional<T> = Check<T> & { readonly optional: true };
type Checked<C> = C extends Check<infer T> ? T : never;
/** The object type a shape of checks describes: `optional` checks become optional fields. */
export type Shaped<S extends Record<string, Check<unknown>>> = { -readonly [K in keyof S as S[K] extends { optional: true } ? never : K]: Checked<S[K]> } & {
  -readonly [K in keyof S as S[K] extends { optional: true } ? K : never]?: Checked<S[K]>;
};

function bad(field: string, expected: string, value: unknown): never {
  const shown = value === undefined ? 'nothing' : typeof value === 'string' ? JSON.stringify(value.length > 60 ? `${value.slice(0, 60)}…` : value) : Array.isArray(value) ? 'a list' : value === null ? 'null' : typeof value === 'object' ? 'an object' : String(value);
  throw new ApiFailure('BAD_PAYLOAD', `${field}: expected ${expected}, got ${shown}.`, { field, expected });
}

/** Long texts (prompts) are bounded so a hostile payload cannot make the host chew on megabytes. */
export const MAX_TEXT_CHARS = 20_000;
/** Base64 image payloads (a 4096² PNG mask is well below this). */
export const MAX_BASE64_CHARS = 64 * 1024 * 1024;

export const v = {
  string(options: { nonEmpty?: boolean; max?: number } = {}): Check<string> {
    return (value, field) => {
      if (typeof value !== 'string') return bad(field, 'text', value);
      if (options.nonEmpty === true && value.trim() === '') return bad(field, 'non-empty text', value);
      const max = options.max ?? MAX_TEXT_CHARS;
      if (value.length > max) return bad(field, `at most ${max} characters`, `${value.length} characters`);
      return value;
    };
  },
  number(options: { integer?: boolean; min?: number; max?: number } = {}): Check<number> {
    return (value, field) => {
      if (typeof value !== 'number' || !Number.isFinite(value)) return bad(field, options.integer === true ? 'a whole number' : 'a number', value);
      if (options.integer === true && !Number.isInteger(value)) return bad(field, 'a whole number', value);
      if (options.min !== undefined && value < options.min) return bad(field, `a number ≥ ${options.min}`, value);
      if (options.max !== undefined && value > options.max) return bad(field, `a number ≤ ${options.max}`, value);
      return value;
    };
  },
  boolean(): Check<boolean> {
    return (value, field) => (typeof value === 'boolean' ? value : bad(field, 'true or false', value));
  },
  oneOf<const T extends string>(choices: readonly T[]): Check<T> {
    return (value, field) => (typeof value === 'string' && (choices as readonly string[]).includes(value) ? (value as T) : bad(field, `one of ${choices.join(', ')}`, value));
  },
  /** A decimal seed string or a safe integer. */
  seed(): Check<string | number> {
    return (value, field) => {
      if (typeof value === 'number' && Number.isSafeInteger(value)) return value;
      if (typeof value === 'string' && /^-?\d{1,20}$/.test(value.trim())) return value.trim();
      return bad(field, 'a whole-number seed (decimal text or number)', value);
    };
  },
  nullable<T>(check: Check<T>): Check<T | null> {
    return (value, field) => (value === null ? null : check(value, field));
  },
  array<T>(check: Check<T>, max = 1000): Check<T[]> {
    return (value, field) => {
      if (!Array.isArray(value)) return bad(field, 'a list', value);
      if (value.length > max) return bad(field, `at most ${max} items`, `${value.length} items`);
      return value.map((item, i) => check(item, `${field}[${i}]`));
    };
  },
  box(): Check<readonly [number, number, number, number]> {
    return (value, field) => {
      if (!Array.isArray(value) || value.length !== 4) return bad(field, '[x, y, width, height]', value);
      const n = v.number({ min: 0, max: 1e5 });
      return [n(value[0], `${field}[0]`), n(value[1], `${field}[1]`), n(value[2], `${field}[2]`), n(value[3], `${field}[3]`)] as const;
    };
  },
  /** Marks a field of `object` as optional (absent or `undefined`). */
  optional<T>(check: Check<T>): Optional<T> {
    return Object.assign((value: unknown, field: string) => check(value, field), { optional: true as const });
  },
  /**
   * An object with exactly these fields (an unknown field is refused, naming it: a typo must not be
   * silently ignored).
   */
  object<S extends Record<string, Check<unknown>>>(shape: S): Check<Shaped<S>> {
    return (value, field) => {
      if (typeof value !== 'object' || value === null || Array.isArray(value)) return bad(field === '' ? 'payload' : field, 'an object', value);
      const at = (k: string) => (field === '' ? k : `${field}.${k}`);
      const record = value as Record<string, unknown>;
      const out: Record<string, unknown> = {};
      for (const k of Object.keys(record)) {
        if (!Object.hasOwn(shape, k)) throw new ApiFailure('BAD_PAYLOAD', `${at(k)}: unknown field.`, { field: at(k) });
      }
      for (const [k, check] of Object.entries(shape)) {
        if (record[k] === undefined && (check as Partial<Optional<unknown>>).optional === true) continue;
        out[k] = check(record[k], at(k));
      }
      return out as Shaped<S>;
    };
  },
};

const STRATEGY_WIRE_NAMES: readonly StrategyNameWire[] = ['plain', 'merge', 'switch', 'composite', 'cmlora', 'regions', 'clora', 'lora-composer'];
export const DEVICE_WIRE_NAMES: readonly DeviceWire[] = ['auto', 'cpu', 'cuda', 'dml', 'coreml', 'webgpu'];

const lora = v.object({ name: v.string({ nonEmpty: true, max: 4096 }), te: v.number({ min: -10, max: 10 }), unet: v.number({ min: -10, max: 10 }) });

const o = v.optional;

const strategy = v.object({
  name: v.oneOf(STRATEGY_WIRE_NAMES),
  switchEvery: o(v.number({ integer: true, min: 1, max: 1000 })),
  cacheInterval: o(v.number({ integer: true, min: 0, max: 1000 })),
  frequencyClasses: o(v.array(v.oneOf(['high', 'low'] as const), 256)),
  phaseRule: o(v.oneOf(['offline', 'online', 'online-official'] as const)),
  official: o(v.boolean()),
  concepts: o(
    v.array(
      v.object({ words: v.string({ nonEmpty: true, max: 1000 }), otherWords: o(v.string({ max: 1000 })), lora: o(lora), prompt: o(v.string()) }),
      64,
    ),
  ),
  clora: o(
    v.object({
      stepSize: o(v.number({ min: 0, max: 1e4 })),
      updateUntil: o(v.number({ integer: true, min: 0, max: 1000 })),
      refineSteps: o(v.array(v.number({ integer: true, min: 0, max: 1000 }), 1000)),
      refineRounds: o(v.number({ integer: true, min: 0, max: 1000 })),
      maskThreshold: o(v.number({ min: 0, max: 1 })),
      maskAfter: o(v.number({ integer: true, min: 0, max: 1000 })),
      temperature: o(v.number({ min: 1e-3, max: 100 })),
      morphology: o(v.array(v.oneOf(['dilate', 'erode', 'opening', 'closing'] as const), 16)),
      latentUpdate: o(v.boolean()),
    }),
  ),
  loraComposer: o(
    v.object({
      stepSize: o(v.number({ min: 0, max: 1e4 })),
      refineUntil: o(v.number({ integer: true, min: 0, max: 1000 })),
      earlyStopFrom: o(v.number({ integer: true, min: 0, max: 1000 })),
      weights: o(v.object({ box: v.number({ min: 0, max: 1e4 }), fill: v.number({ min: 0, max: 1e4 }), region: v.number({ min: 0, max: 1e4 }) })),
      topKRatio: o(v.number({ min: 0, max: 1 })),
      isolation: o(v.boolean()),
      reinit: o(v.boolean()),
      fillLoss: o(v.boolean()),
      gaussianBox: o(v.boolean()),
      regionLoss: o(v.boolean()),
    }),
  ),
});

const regionFields = v.object({ prompt: v.string(), box: o(v.box()), maskPng: o(v.string({ max: MAX_BASE64_CHARS })), negativePrompt: o(v.string()), lora: o(lora) });
const region: Check<RegionPayload> = (value, field) => {
  const r = regionFields(value, field);
  if ((r.box === undefined) === (r.maskPng === undefined)) throw new ApiFailure('BAD_PAYLOAD', `${field}: give either box [x, y, width, height] or maskPng.`, { field });
  return r;
};

export const jobPayload: Check<JobPayload> = v.object({
  prompt: v.string(),
  negativePrompt: o(v.string()),
  steps: o(v.number({ integer: true, min: 1, max: 1000 })),
  cfgScale: o(v.number({ min: 0, max: 100 })),
  sampler: o(v.string({ nonEmpty: true, max: 100 })),
  scheduleType: o(v.string({ nonEmpty: true, max: 100 })),
  seed: o(v.seed()),
  width: o(v.number({ integer: true, min: 64, max: 4096 })),
  height: o(v.number({ integer: true, min: 64, max: 4096 })),
  clipSkip: o(v.number({ integer: true, min: 1, max: 24 })),
  batchSize: o(v.number({ integer: true, min: 1, max: 64 })),
  batchCount: o(v.number({ integer: true, min: 1, max: 10_000 })),
  rng: o(v.oneOf(['cpu', 'nv'] as const)),
  emphasis: o(v.oneOf(['original', 'no-norm', 'ignore', 'none'] as const)),
  loras: o(v.array(lora, 256)),
  loraMode: o(v.oneOf(['auto', 'bank', 'merged'] as const)),
  strategy: o(strategy),
  regions: o(v.array(region, 64)),
});

const filePath = v.string({ nonEmpty: true, max: 4096 });
const noFields = v.object({});
const empty: Check<Empty> = (value, field) => {
  noFields(value, field);
  return {};
};

/** Bytes (a whole number ≥ 1 GiB) or a size as people write it (`memorySizeBytes`) → bytes. */
const memorySize: Check<number> = (value, field) => {
  const bytes = typeof value === 'number' ? (Number.isSafeInteger(value) && value >= MIN_MEMORY_BYTES ? value : undefined) : typeof value === 'string' && value.length <= 40 ? memorySizeBytes(value) : undefined;
  return bytes ?? bad(field, 'a memory size of at least 1G, such as 12G, 16 GiB or 12000M (or null for all of this machine\'s)', value);
};

/** One validator per operation: `VALIDATORS[op](payload, '')` returns the typed payload or throws BAD_PAYLOAD. */
export const VALIDATORS: { readonly [K in OpName]: Check<Payload<K>> } = {
  'app.info': empty,
  'settings.get': empty,
  'settings.set': v.object({
    outputDir: o(filePath),
    loraDirs: o(v.array(filePath, 64)),
    modelsDir: o(v.nullable(filePath)),
    device: o(v.oneOf(DEVICE_WIRE_NAMES)),
    lastModel: o(v.nullable(filePath)),
    memoryBytes: o(v.nullable(memorySize)),
  }),
  'models.scan': v.object({ dir: filePath }),
  'models.open': v.object({ path: filePath }),
  'models.status': empty,
  'loras.list': v.object({ refresh: o(v.boolean()) }),
  'loras.preview': v.object({ path: filePath }),
  'jobs.generate': v.object({ job: jobPayload }),
  'jobs.cancel': v.object({ id: v.string({ nonEmpty: true, max: 100 }) }),
  'jobs.list': empty,
  'gallery.list': v.object({ limit: o(v.number({ integer: true, min: 1, max: 10_000 })) }),
  'gallery.image': v.object({ file: v.string({ nonEmpty: true, max: 255 }), thumbnail: o(v.boolean()) }),
  'gallery.readMetadata': v.object({ png: v.string({ nonEmpty: true, max: MAX_BASE64_CHARS }), name: o(v.string({ max: 255 })) }),
  'queue.list': v.object({ limit: o(v.number({ integer: true, min: 1, max: 10_000 })) }),
  'queue.control': v.object({ action: v.oneOf(['cancel', 'pause', 'resume', 'retry'] as const), ids: v.array(v.number({ integer: true, min: 1 }), 10_000) }),
};

/** Validate an operation's payload; throws `ApiFailure` (UNKNOWN_OPERATION or BAD_PAYLOAD naming the field). */
export function validatePayload<K extends OpName>(op: K, payload: unknown): Payload<K> {
  if (!isOpName(op)) throw new ApiFailure('UNKNOWN_OPERATION', `unknown operation ${JSON.stringify(op)}; operations: ${OPERATIONS.join(', ')}.`, { operation: op });
  return (VALIDATORS[op] as Check<Payload<K>>)(payload ?? {}, '');
}

// ---- the Electron bridge -------------------------------------------------------------------------

/**
 * What the preload exposes as `window.chorus`: one function per operation (never a generic
 * `invoke(channel, …)`), each answering the response envelope, and an event subscription that
 * returns its unsubscribe function.
 */
export type ChorusBridge = { readonly [K in OpName]: (payload: Payload<K>) => Promise<ApiResponse<Result<K>>> } & {
  readonly onEvent: (listener: (event: ApiEvent) => void) => () => void;
};
