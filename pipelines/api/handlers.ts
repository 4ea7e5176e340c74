/**
 * The engine host: one state (settings, the open model, the LoRA library, jobs, the output folder)
 * and one handler per contract operation. Transport-free: `chorus serve` calls `handle` from HTTP
 * requests, the Electron utility process from MessagePort messages, tests directly.
 *
 * `handle(op, payload)` validates the payload (the contract's validators), runs the handler and
 * answers `{ ok, result }` or `{ ok: false, error: { code, message, details } }`; it never throws.
 * Jobs run one at a time in submission order; progress, step previews, images and status changes
 * go to `subscribe`rs as `ApiEvent`s.
 */
import { randomUUID } from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import sharp from 'sharp';
import { Sd15Engine, isModelError, loraFoldersOf, scanLoraFolders, type Device, type LoraLibraryEntry } from '../../models/index.ts';
import { PipelineError, isPipelineError } from '../errors.ts';
import { A1111_CHUNK, encodePng, writeFileAtomic } from '../images/save.ts';
import { readImageMetadata } from '../images/metadata.ts';
import { imageMetadataTexts } from '../images/job-metadata.ts';
import { JOB_DEFAULTS, LATENT_SCALE, MAX_REGIONS, MAX_SIDE_PX, MAX_STEPS, MIN_SIDE_PX, normalizeJob, type GenerateJob, type JobInput, type JobRegion } from '../job.ts';
import { engineModels } from '../models.ts';
import { A1111_SAMPLERS, A1111_SCHEDULE_TYPES } from '../schedulers/index.ts';
import { CMLORA_DEFAULTS } from '../strategies/cmlora.ts';
import { cloraDefaults } from '../strategies/clora.ts';
import { composerDefaults } from '../strategies/lora-composer.ts';
import { STRATEGY_NAMES, STRATEGY_SUMMARIES, type StrategyName, type StrategySpec } from '../strategies/index.ts';
import { SWITCH_DEFAULTS } from '../strategies/switch.ts';
import { generate } from '../text-to-image.ts';
import { JobQueue, defaultQueueFile } from '../queue/store.ts';
import {
  ApiFailure,
  DEVICE_WIRE_NAMES,
  memorySizeBytes,
  validatePayload,
  type ApiError,
  type ApiEvent,
  type ApiResponse,
  type AppInfo,
  type BatchQueueControlResult,
  type BatchQueueView,
  type DeviceWire,
  type GalleryItem,
  type JobPayload,
  type JobSummary,
  type LoraCard,
  type ModelStatus,
  type OpName,
  type Payload,
  type Result,
  type Settings,
  type StrategyInfo,
  type StrategyNameWire,
  type StrategyPayload,
} from './contract.ts';
import { latentPreviewDataUrl } from './latent-preview.ts';
import { scanModels } from './model-scan.ts';
import { installLoraFolders, outputNamer } from './output-files.ts';
import { settingsFromImage, settingsFromMetadata } from './settings-from-image.ts';

// The wire types repeat pipeline types so the renderer needs no pipeline code; these fail to compile
// when the two drift apart.
type Same<A, B> = [A] extends [B] ? ([B] extends [A] ? true : false) : false;
const STRATEGY_NAMES_MATCH: Same<StrategyName, StrategyNameWire> = true;
const DEVICES_MATCH: Same<Device, DeviceWire> = true;
const STRATEGY_KNOBS_MATCH: Same<keyof StrategySpec, keyof StrategyPayload> = true;
const JOB_FIELDS_MATCH: Same<Exclude<keyof GenerateJob, 'model'>, Exclude<keyof JobPayload, never>> = true;
void [STRATEGY_NAMES_MATCH, DEVICES_MATCH, STRATEGY_KNOBS_MATCH, JOB_FIELDS_MATCH];

export interface EngineHostOptions {
  /** JSON file the settings persist in; `null` keeps them in memory (tests). */
  readonly settingsFile: string | null;
  /** Overrides on top of the stored settings (command-line flags). */
  readonly settings?: Partial<Settings>;
  /** Converted weights and graphs (default: the engine's, ~/.cache/chorus). */
  readonly cacheDir?: string;
  /** The batch queue database (default: the queue's, `defaultQueueFile()`). */
  readonly queueFile?: string;
}

/** Where settings live: `CHORUS_CONFIG_DIR`, else the platform's config folder. */
export function defaultSettingsFile(): string {
  const dir =
    process.env.CHORUS_CONFIG_DIR ??
    (process.platform === 'win32'
      ? path.join(process.env.APPDATA ?? path.join(os.homedir(), 'AppData', 'Roaming'), 'Chorus')
      : process.platform === 'darwin'
        ? path.join(os.homedir(), 'Library', 'Application Support', 'Chorus')
        : path.join(process.env.XDG_CONFIG_HOME ?? path.join(os.homedir(), '.config'), 'chorus'));
  return path.join(dir, 'settings.json');
}

/** The provider line of a model status: the actual choice once a session exists, else the plan. */
async function providerStatus(engine: Sd15Engine): Promise<ModelStatus['provider']> {
  const plan = await engine.plan();
  const choice = await engine.providerChoice();
  const planned = plan.webgpu === undefined ? `${plan.device}: planned` : `${plan.device}: planned; webgpu: ${plan.webgpu.reason}`;
  return { device: choice?.device ?? plan.device, reason: choice?.reason ?? planned, precision: plan.precision.reason };
}

/** A validated memory setting as bytes (the validator already turned a size as typed, "12G", into bytes). */
function bytesOf(memory: number | string | null): number | null {
  return typeof memory === 'string' ? (memorySizeBytes(memory) ?? null) : memory;
}

const DEFAULT_SETTINGS: Settings = { outputDir: path.resolve('outputs'), loraDirs: [], modelsDir: null, device: 'auto', lastModel: null, memoryBytes: null };

/** Thumbnails in the gallery: longest side in pixels. */
const THUMBNAIL_SIDE_PX = 256;
/** Step previews are throttled to this interval (the last step of each batch always gets one). */
const PREVIEW_INTERVAL_MS = 150;
const GALLERY_DEFAULT_LIMIT = 200;
/** Finished jobs kept in `jobs.list`. */
const FINISHED_JOBS_KEPT = 100;
const PNG_MAGIC = [0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a];
/** Batch-queue jobs listed on the Queue screen (the newest). */
const QUEUE_DEFAULT_LIMIT = 200;
/** A gallery file name: a plain `.png` name, no folders, not hidden. */
const GALLERY_FILE = /^[^/\\.][^/\\]*\.png$/i;
/** Step-count-free knob defaults (the step thresholds scale with the steps; the engine fills them). */
const CLORA_KNOB_DEFAULTS = cloraDefaults(50);
const COMPOSER_KNOB_DEFAULTS = composerDefaults(50);
const STRATEGIES_WITH_CONCEPT_WORDS: readonly string[] = ['clora', 'lora-composer'];

function version(): string {
  try {
    const pkg = JSON.parse(fs.readFileSync(new URL('../../package.json', import.meta.url), 'utf-8')) as { version?: unknown };
    return typeof pkg.version === 'string' ? pkg.version : '0.0.0';
  } catch {
    return '0.0.0';
  }
}

/** Any thrown value → the error shape that crosses the boundary. */
export function toApiError(e: unknown): ApiError {
  if (e instanceof ApiFailure || isModelError(e) || isPipelineError(e)) return { code: e.code, message: e.message, details: { ...e.details } };
  const err = e instanceof Error ? e : new Error(String(e));
  return { code: 'INTERNAL', message: `internal error: ${err.message}`, details: { name: err.name } };
}

function strategyInfos(): StrategyInfo[] {
  return STRATEGY_NAMES.map((name) => {
    const knobs: StrategyInfo['knobs'] =
      name === 'switch'
        ? [{ name: 'switchEvery', label: 'steps per LoRA (τ)', kind: 'int', default: SWITCH_DEFAULTS.switchEvery, min: 1, max: 100 }]
        : name === 'cmlora'
          ? [
              { name: 'cacheInterval', label: 'cache interval (c)', kind: 'int', default: CMLORA_DEFAULTS.cacheInterval, min: 0, max: 50 },
              { name: 'phaseRule', label: 'phase rule', kind: 'choice', default: CMLORA_DEFAULTS.phaseRule, choices: ['offline', 'online', 'online-official'] },
              { name: 'official', label: "reproduce the official code's quirks", kind: 'boolean', default: CMLORA_DEFAULTS.official },
            ]
          : name === 'clora'
            ? [
                { name: 'clora.stepSize', label: 'latent step size (η)', kind: 'number', default: CLORA_KNOB_DEFAULTS.stepSize, min: 0, max: 200, step: 1 },
                { name: 'clora.refineRounds', label: 'extra rounds at refinement steps', kind: 'int', default: CLORA_KNOB_DEFAULTS.refineRounds, min: 0, max: 100 },
                { name: 'clora.maskThreshold', label: 'mask threshold (of each map’s max)', kind: 'number', default: CLORA_KNOB_DEFAULTS.maskThreshold, min: 0, max: 1, step: 0.05 },
                { name: 'clora.latentUpdate', label: 'contrastive latent updates (off: masked fusion only)', kind: 'boolean', default: CLORA_KNOB_DEFAULTS.latentUpdate },
              ]
            : name === 'lora-composer'
              ? [
                  { name: 'loraComposer.stepSize', label: 'latent step size (η)', kind: 'number', default: COMPOSER_KNOB_DEFAULTS.stepSize, min: 0, max: 200, step: 1 },
                  { name: 'loraComposer.topKRatio', label: 'top-k ratio of each box', kind: 'number', default: COMPOSER_KNOB_DEFAULTS.topKRatio, min: 0, max: 1, step: 0.05 },
                  { name: 'loraComposer.isolation', label: 'isolate the concepts in self-attention', kind: 'boolean', default: COMPOSER_KNOB_DEFAULTS.isolation },
                  { name: 'loraComposer.reinit', label: 're-initialise the latents in the boxes', kind: 'boolean', default: COMPOSER_KNOB_DEFAULTS.reinit },
                ]
              : [];
    // Every registered strategy runs; `available: false` is for names a job schema reserves ahead of their code.
    return { name, summary: STRATEGY_SUMMARIES[name], knobs, available: true, usesConceptWords: STRATEGIES_WITH_CONCEPT_WORDS.includes(name) };
  });
}

interface JobRecord {
  summary: JobSummary;
  readonly job: GenerateJob;
  readonly abort: AbortController;
}

export class EngineHost {
  #settings: Settings;
  readonly #settingsFile: string | null;
  readonly #cacheDir: string | undefined;
  #engine: Sd15Engine | undefined;
  #status: ModelStatus | null = null;
  #library: Promise<LoraLibraryEntry[]> | undefined;
  readonly #jobs = new Map<string, JobRecord>();
  #queue: Promise<void> = Promise.resolve();
  readonly #listeners = new Set<(e: ApiEvent) => void>();
  readonly #galleryCache = new Map<string, { key: string; item: GalleryItem }>();
  readonly #queueFileOption: string | undefined;

  constructor(options: EngineHostOptions) {
    this.#settingsFile = options.settingsFile;
    this.#queueFileOption = options.queueFile;
    this.#cacheDir = options.cacheDir;
    this.#settings = { ...DEFAULT_SETTINGS, ...this.#readSettings(), ...options.settings };
  }

  /** Open the last model when the settings name one; a failure is left for `models.open` to report again. */
  async restore(): Promise<void> {
    if (this.#settings.lastModel !== null && this.#engine === undefined) {
      const r = await this.handle('models.open', { path: this.#settings.lastModel });
      if (!r.ok) process.stderr.write(`chorus: could not reopen ${this.#settings.lastModel}: ${r.error.message}\n`);
    }
  }

  subscribe(listener: (e: ApiEvent) => void): () => void {
    this.#listeners.add(listener);
    return () => this.#listeners.delete(listener);
  }

  /** Run an operation. Never throws: failures come back as `{ ok: false, error }`. */
  async handle(op: string, payload: unknown): Promise<ApiResponse<unknown>> {
    try {
      const valid = validatePayload(op as OpName, payload);
      return { ok: true, result: await this.#dispatch(op as OpName, valid) };
    } catch (e) {
      return { ok: false, error: toApiError(e) };
    }
  }

  /** Typed call for in-process users (tests, CLI): throws the `ApiError` on failure. */
  async call<K extends OpName>(op: K, payload: Payload<K>): Promise<Result<K>> {
    const r = await this.handle(op, payload);
    if (!r.ok) throw Object.assign(new Error(r.error.message), r.error);
    return r.result as Result<K>;
  }

  async dispose(): Promise<void> {
    for (const j of this.#jobs.values()) j.abort.abort();
    await this.#queue;
    await this.#engine?.dispose();
    this.#engine = undefined;
  }

  #dispatch(op: OpName, p: unknown): Promise<unknown> {
    switch (op) {
      case 'app.info':
        return Promise.resolve(this.#appInfo());
      case 'settings.get':
        return Promise.resolve(this.#settings);
      case 'settings.set':
        return Promise.resolve(this.#setSettings(p as Payload<'settings.set'>));
      case 'models.scan':
        return Promise.resolve(scanModels((p as Payload<'models.scan'>).dir));
      case 'models.open':
        return this.#openModel((p as Payload<'models.open'>).path);
      case 'models.status':
        return this.#refreshProvider();
      case 'loras.list':
        return this.#listLoras((p as Payload<'loras.list'>).refresh === true);
      case 'loras.preview':
        return this.#loraPreview((p as Payload<'loras.preview'>).path);
      case 'jobs.generate':
        return this.#submit((p as Payload<'jobs.generate'>).job);
      case 'jobs.cancel':
        return Promise.resolve(this.#cancel((p as Payload<'jobs.cancel'>).id));
      case 'jobs.list':
        return Promise.resolve([...this.#jobs.values()].map((j) => j.summary).reverse());
      case 'gallery.list':
        return Promise.resolve(this.#galleryList((p as Payload<'gallery.list'>).limit ?? GALLERY_DEFAULT_LIMIT));
      case 'gallery.image':
        return this.#galleryImage(p as Payload<'gallery.image'>);
      case 'queue.list':
        return Promise.resolve(this.#queueList((p as Payload<'queue.list'>).limit ?? QUEUE_DEFAULT_LIMIT));
      case 'queue.control':
        return Promise.resolve(this.#queueControl(p as Payload<'queue.control'>));
      case 'gallery.readMetadata': {
        const q = p as Payload<'gallery.readMetadata'>;
        return Promise.resolve(settingsFromImage(decodeBase64(q.png, 'png'), q.name ?? 'image.png'));
      }
    }
  }

  #emit(e: ApiEvent): void {
    for (const l of this.#listeners) l(e);
  }

  // ---- settings ----

  #readSettings(): Partial<Settings> {
    if (this.#settingsFile === null || !fs.existsSync(this.#settingsFile)) return {};
    try {
      const raw = JSON.parse(fs.readFileSync(this.#settingsFile, 'utf-8')) as unknown;
      const { memoryBytes, ...rest } = validatePayload('settings.set', raw);
      return { ...rest, ...(memoryBytes === undefined ? {} : { memoryBytes: bytesOf(memoryBytes) }) };
    } catch (e) {
      // A damaged settings file must not stop the app; it is kept aside, not overwritten unseen.
      const aside = `${this.#settingsFile}.bad-${Date.now()}`;
      fs.renameSync(this.#settingsFile, aside);
      process.stderr.write(`chorus: ${this.#settingsFile} could not be read (${(e as Error).message}); moved to ${aside}, using defaults.\n`);
      return {};
    }
  }

  #setSettings(p: Payload<'settings.set'>): Settings {
    const next: Settings = {
      ...this.#settings,
      ...(p.outputDir === undefined ? {} : { outputDir: path.resolve(p.outputDir) }),
      ...(p.loraDirs === undefined ? {} : { loraDirs: p.loraDirs.map((d) => path.resolve(d)) }),
      ...(p.modelsDir === undefined ? {} : { modelsDir: p.modelsDir === null ? null : path.resolve(p.modelsDir) }),
      ...(p.device === undefined ? {} : { device: p.device }),
      ...(p.lastModel === undefined ? {} : { lastModel: p.lastModel }),
      ...(p.memoryBytes === undefined ? {} : { memoryBytes: bytesOf(p.memoryBytes) }),
    };
    if (p.loraDirs !== undefined) {
      for (const [i, d] of next.loraDirs.entries()) {
        if (!fs.existsSync(d)) throw new ApiFailure('NOT_FOUND', `loraDirs[${i}]: ${d} does not exist.`, { field: `loraDirs[${i}]`, path: d });
      }
      this.#library = undefined;
    }
    this.#settings = next;
    if (this.#settingsFile !== null) {
      fs.mkdirSync(path.dirname(this.#settingsFile), { recursive: true });
      writeFileAtomic(this.#settingsFile, new TextEncoder().encode(`${JSON.stringify(next, null, 2)}\n`));
    }
    return next;
  }

  #appInfo(): AppInfo {
    return {
      version: version(),
      strategies: strategyInfos(),
      samplers: A1111_SAMPLERS,
      scheduleTypes: A1111_SCHEDULE_TYPES,
      defaults: {
        steps: JOB_DEFAULTS.steps,
        cfgScale: JOB_DEFAULTS.cfgScale,
        sampler: JOB_DEFAULTS.sampler,
        scheduleType: JOB_DEFAULTS.scheduleType,
        width: JOB_DEFAULTS.width,
        height: JOB_DEFAULTS.height,
        clipSkip: JOB_DEFAULTS.clipSkip,
      },
      limits: { minSidePx: MIN_SIDE_PX, maxSidePx: MAX_SIDE_PX, sideMultiple: LATENT_SCALE, maxSteps: MAX_STEPS, maxRegions: MAX_REGIONS },
      machineMemoryBytes: os.totalmem(),
    };
  }

  // ---- models ----

  #loraFolders(): string[] {
    const dirs = [...this.#settings.loraDirs.flatMap((d) => loraFoldersOf(d)), ...(this.#status === null ? [] : installLoraFolders(this.#status.path))];
    return [...new Set(dirs.map((d) => path.resolve(d)))];
  }

  /** The status with the provider the sessions actually got (once one exists). */
  async #refreshProvider(): Promise<ModelStatus | null> {
    if (this.#status !== null && this.#engine !== undefined) this.#status = { ...this.#status, provider: await providerStatus(this.#engine) };
    return this.#status;
  }

  async #openModel(modelPath: string): Promise<ModelStatus> {
    if ([...this.#jobs.values()].some((j) => j.summary.status === 'running' || j.summary.status === 'pending')) {
      throw new ApiFailure('BAD_PAYLOAD', 'a job is running; cancel it or wait before switching models.', { field: 'path' });
    }
    const engine = Sd15Engine.open(path.resolve(modelPath), { device: this.#settings.device, ...(this.#cacheDir === undefined ? {} : { cacheDir: this.#cacheDir }) });
    try {
      // Single files carry no tokenizer: find out now, not at the first generate.
      engine.model.loadTokenizer();
    } catch (e) {
      await engine.dispose();
      throw e;
    }
    await this.#engine?.dispose();
    this.#engine = engine;
    const m = engine.model;
    this.#status = {
      path: m.path,
      name: path.basename(m.path).replace(/\.safetensors$/i, ''),
      format: m.format,
      configSources: { ...m.configSources },
      unetChannels: m.unet.blockOutChannels[0] ?? 0,
      textLayers: m.textEncoder.numHiddenLayers,
      loraFolders: [],
      device: this.#settings.device,
      provider: await providerStatus(engine),
    };
    this.#status = { ...this.#status, loraFolders: this.#loraFolders() };
    this.#library = undefined;
    this.#setSettings({ lastModel: m.path });
    return this.#status;
  }

  // ---- LoRA library ----

  #scanLibrary(refresh: boolean): Promise<LoraLibraryEntry[]> {
    if (refresh || this.#library === undefined) {
      const folders = this.#loraFolders();
      const scan = folders.length === 0 ? Promise.resolve([]) : scanLoraFolders(folders, this.#cacheDir === undefined ? {} : { cache: path.join(this.#cacheDir, 'lora-hashes.json') });
      scan.catch(() => (this.#library = undefined));
      this.#library = scan;
    }
    return this.#library;
  }

  async #listLoras(refresh: boolean): Promise<LoraCard[]> {
    const entries = await this.#scanLibrary(refresh);
    return entries.map((e) => {
      const problems = [...e.problems];
      if (e.baseModel === 'sdxl' || e.baseModel === 'sd2') problems.push(`${path.basename(e.path)} is an ${e.baseModel === 'sdxl' ? 'SDXL' : 'SD 2.x'} LoRA (${e.baseModelEvidence}); Chorus loads SD 1.5 LoRAs.`);
      return {
        path: e.path,
        name: e.name,
        alias: e.alias ?? null,
        folder: e.relativeDir,
        baseModel: e.baseModel,
        baseModelEvidence: e.baseModelEvidence,
        triggerWords: e.triggerWords,
        activationText: e.activationText ?? null,
        preferredWeight: e.preferredWeight ?? null,
        notes: e.notes ?? null,
        hasPreview: e.preview !== undefined,
        sizeBytes: e.sizeBytes,
        problems,
      };
    });
  }

  async #loraPreview(file: string): Promise<{ dataUrl: string | null }> {
    const entry = (await this.#scanLibrary(false)).find((e) => e.path === file);
    // Only files of the scanned library: the API never reads arbitrary paths for the renderer.
    if (entry === undefined) throw new ApiFailure('NOT_FOUND', `${file} is not a LoRA of the library.`, { field: 'path' });
    if (entry.preview === undefined) return { dataUrl: null };
    const jpeg = await sharp(entry.preview).resize(THUMBNAIL_SIDE_PX, THUMBNAIL_SIDE_PX, { fit: 'inside' }).jpeg({ quality: 82 }).toBuffer();
    return { dataUrl: `data:image/jpeg;base64,${jpeg.toString('base64')}` };
  }

  // ---- jobs ----

  async #submit(payload: JobPayload): Promise<{ id: string; seed: string }> {
    if (this.#engine === undefined || this.#status === null) throw new ApiFailure('NO_MODEL', 'open a model first (Models screen).', { field: 'model' });
    const id = randomUUID();
    const regions: JobRegion[] = (payload.regions ?? []).map((r, i) => {
      const { maskPng, ...rest } = r;
      if (maskPng === undefined) return rest as JobRegion;
      return { ...rest, mask: this.#writeMask(id, i, maskPng) } as JobRegion;
    });
    const input: JobInput = { ...(payload as Omit<JobPayload, 'regions'>), regions, model: this.#status.path };
    let job: GenerateJob;
    try {
      job = normalizeJob(input);
    } catch (e) {
      // normalizeJob names job fields; say they are fields of `job`.
      if (isPipelineError(e) && typeof e.details.field === 'string') throw new PipelineError(e.code, e.message, { ...e.details, field: `job.${e.details.field}` });
      throw e;
    }
    const record: JobRecord = {
      job,
      abort: new AbortController(),
      summary: { id, status: 'pending', prompt: job.prompt, seed: job.seed.toString(), strategy: job.strategy.name, fraction: 0, images: [], error: null, createdAt: Date.now(), plan: null },
    };
    this.#jobs.set(id, record);
    this.#trimJobs();
    this.#emit({ type: 'job.status', id, job: record.summary });
    const engine = this.#engine;
    this.#queue = this.#queue.then(() => this.#run(record, engine));
    return { id, seed: record.summary.seed };
  }

  #writeMask(jobId: string, index: number, maskPng: string): string {
    const bytes = decodeBase64(maskPng, `job.regions[${index}].maskPng`);
    if (!PNG_MAGIC.every((b, i) => bytes[i] === b)) throw new ApiFailure('BAD_PAYLOAD', `job.regions[${index}].maskPng: not a PNG image.`, { field: `job.regions[${index}].maskPng` });
    const dir = path.join(this.#settings.outputDir, 'masks');
    fs.mkdirSync(dir, { recursive: true });
    const file = path.join(dir, `${jobId}-${index}.png`);
    writeFileAtomic(file, bytes);
    return file;
  }

  #update(record: JobRecord, change: Partial<JobSummary>): void {
    record.summary = { ...record.summary, ...change };
    this.#emit({ type: 'job.status', id: record.summary.id, job: record.summary });
  }

  async #run(record: JobRecord, engine: Sd15Engine): Promise<void> {
    const { job, abort } = record;
    const id = record.summary.id;
    if (abort.signal.aborted) return;
    this.#update(record, { status: 'running' });
    const total = job.batchSize * job.batchCount;
    const outputDir = this.#settings.outputDir;
    let lastPreview = 0;
    try {
      const models = engineModels(engine, { loraDirs: this.#loraFolders() });
      const nameOf = outputNamer(outputDir, total);
      const latentH = job.height / models.vaeScale;
      const latentW = job.width / models.vaeScale;
      const memoryBytes = this.#settings.memoryBytes;
      await generate(job, models, {
        signal: abort.signal,
        ...(memoryBytes === null ? {} : { memoryBytes }),
        onPlan: (plan, batch) => {
          if (batch === 0) record.summary = { ...record.summary, plan: { memoryBytes: plan.memoryBytes, maxBatch: plan.maxBatch, gradientBatch: plan.gradientBatch ?? null, sessions: plan.sessions, exclusive: plan.exclusive } };
        },
        onProgress: (p) => {
          const fraction = (p.batch + (p.evaluation + 1) / p.evaluations) / p.batches;
          record.summary = { ...record.summary, fraction };
          const base = { type: 'job.progress' as const, id, step: p.evaluation + 1, steps: p.evaluations, batch: p.batch + 1, batches: p.batches, fraction };
          const now = Date.now();
          const last = p.evaluation + 1 === p.evaluations;
          if (!last && now - lastPreview < PREVIEW_INTERVAL_MS) {
            this.#emit({ ...base, preview: null });
            return;
          }
          lastPreview = now;
          const latents = p.latents.slice(0, models.latentChannels * latentH * latentW);
          latentPreviewDataUrl(latents, latentH, latentW).then(
            (preview) => this.#emit({ ...base, preview }),
            () => this.#emit({ ...base, preview: null }),
          );
        },
        onImage: async (img, run) => {
          const file = nameOf(img);
          writeFileAtomic(file, await encodePng(img.image, imageMetadataTexts(job, img, engine.model, run)));
          const item = this.#galleryItem(path.basename(file));
          record.summary = { ...record.summary, images: [...record.summary.images, path.basename(file)] };
          if (item !== null) this.#emit({ type: 'job.image', id, item });
        },
      });
      this.#update(record, { status: 'done', fraction: 1 });
    } catch (e) {
      const cancelled = abort.signal.aborted || (isPipelineError(e) && e.code === 'JOB_CANCELLED');
      this.#update(record, cancelled ? { status: 'cancelled' } : { status: 'failed', error: toApiError(e) });
    }
  }

  #cancel(id: string): { cancelled: boolean } {
    const record = this.#jobs.get(id);
    if (record === undefined) throw new ApiFailure('NOT_FOUND', `no job ${id}.`, { field: 'id' });
    if (record.summary.status !== 'pending' && record.summary.status !== 'running') return { cancelled: false };
    record.abort.abort();
    if (record.summary.status === 'pending') this.#update(record, { status: 'cancelled' });
    return { cancelled: true };
  }

  #trimJobs(): void {
    const finished = [...this.#jobs.values()].filter((j) => !['pending', 'running'].includes(j.summary.status));
    for (const j of finished.slice(0, Math.max(0, finished.length - FINISHED_JOBS_KEPT))) this.#jobs.delete(j.summary.id);
  }

  // ---- the durable batch queue (pipelines/queue) ----

  /** The queue file when it exists: looking at the Queue screen never creates a database. */
  #queueFile(): string | null {
    const file = this.#queueFileOption ?? defaultQueueFile();
    return fs.existsSync(file) ? file : null;
  }

  #withQueue<T>(use: (q: JobQueue) => T, none: () => T): T {
    const file = this.#queueFile();
    if (file === null) return none();
    const q = JobQueue.open({ file });
    try {
      return use(q);
    } finally {
      q.dispose();
    }
  }

  #queueList(limit: number): BatchQueueView {
    const file = this.#queueFile();
    return this.#withQueue(
      (q) => ({
        file,
        paused: q.paused,
        jobs: q
          .list()
          .slice(-limit)
          .reverse()
          .map((j) => ({
            id: j.id,
            batchId: j.batchId ?? null,
            state: j.state,
            name: j.entry.name ?? null,
            prompt: j.entry.job.prompt,
            seed: j.entry.job.seed.toString(),
            strategy: j.entry.job.strategy.name,
            attempts: j.attempts,
            outputs: j.outputs.map((o) => ({ path: o.path, written: o.written })),
            error: j.error === undefined ? null : { code: j.error.code, message: j.error.message, details: { ...(j.error.details ?? {}) } },
            createdAt: j.createdAt,
          })),
      }),
      () => ({ file: null, paused: false, jobs: [] }),
    );
  }

  #queueControl(p: Payload<'queue.control'>): BatchQueueControlResult[] {
    return this.#withQueue(
      (q) => {
        const known = new Set(q.list().map((j) => j.id));
        const missing = p.ids.find((id) => !known.has(id));
        if (missing !== undefined) throw new ApiFailure('NOT_FOUND', `no batch-queue job ${missing}.`, { field: 'ids', id: missing });
        const results = p.action === 'cancel' ? q.cancel(p.ids) : p.action === 'pause' ? q.pause(p.ids) : p.action === 'resume' ? q.resume(p.ids) : q.retry(p.ids);
        return results.map((r) => ({ id: r.id, outcome: r.outcome, state: r.state }));
      },
      () => {
        throw new ApiFailure('NOT_FOUND', 'there is no batch queue on this machine yet (chorus batch creates it).', { field: 'ids' });
      },
    );
  }

  // ---- gallery ----

  #galleryPath(file: string): string {
    if (!GALLERY_FILE.test(file)) throw new ApiFailure('BAD_PAYLOAD', `file: expected a .png file name in the output folder, got ${JSON.stringify(file)}.`, { field: 'file' });
    return path.join(this.#settings.outputDir, file);
  }

  #galleryItem(file: string): GalleryItem | null {
    const full = this.#galleryPath(file);
    let stat: fs.Stats;
    try {
      stat = fs.statSync(full);
    } catch {
      return null;
    }
    const key = `${stat.size}:${stat.mtimeMs}`;
    const cached = this.#galleryCache.get(file);
    if (cached?.key === key) return cached.item;
    let job: JobPayload | null = null;
    let infotext: string | null = null;
    try {
      const meta = readImageMetadata(new Uint8Array(fs.readFileSync(full)), file);
      job = settingsFromMetadata(meta, file).job;
      infotext = meta.texts[A1111_CHUNK] ?? null;
    } catch (e) {
      // A damaged PNG in the output folder is still listed, without settings.
      if (!isPipelineError(e)) throw e;
    }
    const seed = job?.seed === undefined ? (/^\d{5,}-(\d+)\.png$/i.exec(file)?.[1] ?? null) : String(job.seed);
    const item: GalleryItem = { file, createdAt: stat.mtimeMs, seed, width: job?.width ?? null, height: job?.height ?? null, job, infotext };
    this.#galleryCache.set(file, { key, item });
    return item;
  }

  #galleryList(limit: number): GalleryItem[] {
    const dir = this.#settings.outputDir;
    if (!fs.existsSync(dir)) return [];
    const files = fs
      .readdirSync(dir)
      .filter((f) => GALLERY_FILE.test(f))
      .map((f) => ({ f, t: fs.statSync(path.join(dir, f)).mtimeMs }))
      .sort((a, b) => b.t - a.t || b.f.localeCompare(a.f))
      .slice(0, limit);
    return files.map(({ f }) => this.#galleryItem(f)).filter((x): x is GalleryItem => x !== null);
  }

  async #galleryImage(p: Payload<'gallery.image'>): Promise<{ dataUrl: string }> {
    const full = this.#galleryPath(p.file);
    if (!fs.existsSync(full)) throw new ApiFailure('NOT_FOUND', `${p.file} is not in the output folder ${this.#settings.outputDir}.`, { field: 'file' });
    if (p.thumbnail === true) {
      const jpeg = await sharp(full).resize(THUMBNAIL_SIDE_PX, THUMBNAIL_SIDE_PX, { fit: 'inside' }).jpeg({ quality: 85 }).toBuffer();
      return { dataUrl: `data:image/jpeg;base64,${jpeg.toString('base64')}` };
    }
    return { dataUrl: `data:image/png;base64,${fs.readFileSync(full).toString('base64')}` };
  }
}

/** Base64 or a data URL → bytes; BAD_PAYLOAD naming `field` when it is not base64. */
function decodeBase64(text: string, field: string): Uint8Array {
  const body = text.startsWith('data:') ? text.slice(text.indexOf(',') + 1) : text;
  if (!/^[A-Za-z0-9+/]*={0,2}$/.test(body)) throw new ApiFailure('BAD_PAYLOAD', `${field}: expected base64 image bytes.`, { field });
  return new Uint8Array(Buffer.from(body, 'base64'));
}

export { DEVICE_WIRE_NAMES };
