/**
 * Text to image: a job → images. Stages, in order:
 *   1. resolve the sampler and build the scheduler from the model's scheduler config;
 *   2. encode the prompts (A1111 syntax; `<lora:…>` tags removed from the text the encoder sees);
 *   3. for each batch: seeds → initial noise (one generator per image, seed + k, as A1111 does,
 *      so every image can be reproduced alone), run the denoising loop, decode;
 *   4. hand back images with their seeds and final latents (saving is `images/save.ts`).
 */
import * as os from 'node:os';
import { AdapterStack, KEEP_PROBS_BYTES, type AdapterUse, type CoverageReport, type Tensor } from '../models/index.ts';
import { encodePrompts, type ConditioningOptions } from './conditioning.ts';
import { denoise, type DenoiseProgress } from './denoise.ts';
import { PipelineError } from './errors.ts';
import type { GenerateJob, JobLora } from './job.ts';
import type { DenoiseCotangents, DenoiseRequest, DenoiserModel, SdModels } from './models.ts';
import { extractExtraNetworks, loraWeights, type ExtraNetworkTag } from './prompt/a1111.ts';
import { createGenerator, type NoiseGenerator } from './rng/index.ts';
import { createScheduler, parseSchedulerConfig, resolveSampler, type InfotextSampler } from './schedulers/index.ts';
import { createStrategy, needsAdapterBank, textEncoderMix, type StrategySpec } from './strategies/index.ts';
import { measureFrequencyClasses } from './frequency-probe.ts';
import { levelSizes, pixelStrengths, regionMasks } from './regions.ts';
import { regionsStrategy, type RegionsPlan } from './strategies/regions.ts';
import { cloraDefaults, cloraStrategy, planClora, type CloraEvent } from './strategies/clora.ts';
import { composerDefaults, loraComposerStrategy, planComposer, type ComposerEvent } from './strategies/lora-composer.ts';
import type { Strategy } from './strategies/types.ts';

export interface GeneratedImage {
  /** Index in the run (0…batchSize·batchCount−1). */
  readonly index: number;
  readonly seed: bigint;
  /** (1, 3, H, W) in [0, 1]. */
  readonly image: Tensor<'float32'>;
  /** (1, C, h, w) unscaled initial noise and latents after the last step (before decoding). */
  readonly initLatents: Tensor<'float32'>;
  readonly finalLatents: Tensor<'float32'>;
}

export interface GenerateProgress extends DenoiseProgress {
  readonly batch: number;
  readonly batches: number;
}

export interface GenerateOptions {
  readonly signal?: AbortSignal;
  readonly onProgress?: (p: GenerateProgress) => void;
  /** Called as each image is ready (so a long run saves as it goes), with what the run applied. */
  readonly onImage?: (img: GeneratedImage, run: RunInfo) => void | Promise<void>;
  /** Replaces the seeded initial noise of the first batch: (batchSize, C, h, w). */
  readonly initLatents?: Tensor;
  readonly maxBatch?: number;
  /** Largest batch per VJP call of the gradient-guided strategies (default `defaultGradientBatch`, at most maxBatch). */
  readonly maxGradientBatch?: number;
  /** What the gradient-guided strategies report (updates, masks, re-initialisation), per batch. */
  readonly onStrategyEvent?: (event: CloraEvent | ComposerEvent, batch: number) => void;
  /**
   * The RAM, in bytes, the batch caps and the session plan are sized for (default: the machine's,
   * `os.totalmem()`): less leaves room for other programs.
   */
  readonly memoryBytes?: number;
  /** Called once per batch with the session plan sized for `memoryBytes` (reports and logs). */
  readonly onPlan?: (plan: MemoryPlan, batch: number) => void;
}

/** How a batch's UNet calls were planned for the memory (`GenerateOptions.memoryBytes`). */
export interface MemoryPlan {
  readonly memoryBytes: number;
  /** Largest batch per forward UNet call. */
  readonly maxBatch: number;
  /** Largest batch per gradient (VJP) call; gradient-guided strategies only. */
  readonly gradientBatch?: number;
  /** UNet sessions kept alive together. */
  readonly sessions: number;
  /** CLoRA's passes all run through its gradient session, alone in memory (`exclusivePasses`). */
  readonly exclusive: boolean;
}

/**
 * UNet activation memory per sample in one call, estimated from the latent grid: ONNX Runtime keeps
 * the level-0 self-attention scores and probabilities (8 heads × N² floats each, N = h·w; 3 such
 * tensors live at once) plus the feature maps (≈ 64 tensors of 320 × N floats). SD 1.5 at 512²
 * (N = 4096): ≈ 1.8 GiB, a little above what its CFG batches measure (≈ 1.2–1.6 GB per sample).
 */
export function unetBytesPerSample(latentH: number, latentW: number): number {
  const n = latentH * latentW;
  return 3 * 8 * n * n * 4 + 64 * 320 * n * 4;
}

/**
 * The default cap on samples per UNet call: each session keeps an arena as large as its largest
 * call, and a strategy may hold two UNet sessions (CMLoRA: the full pass and the shallow one), so
 * the calls are split to keep their activations within half the machine's memory (never below 2,
 * one CFG pair). Without it CMLoRA with 3 LoRAs at 512² (batches of 6) exceeded 24 GB and the
 * process was killed.
 */
export function defaultMaxBatch(latentH: number, latentW: number, sessions: number, totalBytes: number = os.totalmem()): number {
  return Math.max(2, Math.floor((0.5 * totalBytes) / (sessions * unetBytesPerSample(latentH, latentW))));
}

/**
 * Activation memory of one sample in a VJP call (the truncated UNet and its backward, CLoRA and
 * LoRA-Composer), from the latent grid N = h·w. The gradient graphs recompute the level-0
 * self-attention probabilities one head at a time (`models/onnx/vjp-attention.ts`), so what grows
 * with N² is a few one-head N×N tensors; the rest is feature maps and their gradients. Fitted to SD
 * 1.5 at 512² (N = 4096) with random weights: a VJP session's RSS is ≈ 6.3 GiB with its weights,
 * and a 6-sample call grew it to 14.0 GiB (≈ 1.28 GiB per sample; 5.9 GiB per sample when the
 * probabilities were kept). Here: 11·N² + 128·320·N floats, 1.31 GiB at 512², plus the kept
 * probabilities at sizes where the engine keeps them (≤ 256²: 64 MiB).
 */
export function unetVjpBytesPerSample(latentH: number, latentW: number): number {
  const n = latentH * latentW;
  // Up to KEEP_PROBS_BYTES per layer the two level-0 self-attention layers on the path keep their
  // probabilities from the forward instead (`attentionBackward` auto; 8 heads as in SD 1.5).
  const kept = 8 * n * n * 4 <= KEEP_PROBS_BYTES ? 2 * 8 * n * n * 4 : 0;
  return 11 * n * n * 4 + 128 * 320 * n * 4 + kept;
}

/**
 * The default cap on samples per VJP call of the gradient-guided strategies: a quarter of the
 * machine's memory for its arena (the forward UNet, maps and VJP sessions' weights and the forward
 * calls take the rest); at least one sample. SD 1.5 at 512² on 24 GB: 4.
 */
export function defaultGradientBatch(latentH: number, latentW: number, totalBytes: number = os.totalmem()): number {
  return Math.max(1, Math.floor((0.25 * totalBytes) / unetVjpBytesPerSample(latentH, latentW)));
}

/**
 * Samples per VJP call when the gradient session is the only UNet session alive (`exclusivePasses`):
 * half the memory for its arena, the rest for its weights (≈ 2× the UNet's), the text encoder and
 * the VAE. SD 1.5 at 512² on 24 GB: 8, so CLoRA's one-pass update (2P = 6 samples for P = 3) runs
 * there: measured 14.0 GiB RSS for the VJP session of a 6-sample call.
 */
export function exclusiveGradientBatch(latentH: number, latentW: number, totalBytes: number = os.totalmem()): number {
  return Math.max(1, Math.floor((0.5 * totalBytes) / unetVjpBytesPerSample(latentH, latentW)));
}

/**
 * True when a VJP call of a few samples and the forward sessions do not fit together: one VJP
 * sample takes more than 1/24 of the machine's memory (SD 1.5 at 512² on 24 GB: 1.31 of 23.5 GiB).
 * Measured there before the probabilities were recomputed: the bank forward (3 samples), the
 * maps-only and the VJP (1 sample) sessions together reached 23.3 GiB RSS and the next round was
 * killed by the kernel. Then CLoRA's one-pass update runs with the gradient session alone
 * (`exclusivePasses`) when it fits `exclusiveGradientBatch`; otherwise (and for LoRA-Composer) the
 * loss's maps come from the forward session (no maps-only session) and the forward calls are capped
 * as for three sessions (2 samples at 512² on 24 GB).
 */
export function gradientMemoryIsShort(latentH: number, latentW: number, totalBytes: number = os.totalmem()): boolean {
  return unetVjpBytesPerSample(latentH, latentW) > totalBytes / 24;
}

/** A LoRA as it was applied: where it came from, its strengths, hash and coverage. */
export interface AppliedLora {
  readonly name: string;
  readonly path: string;
  readonly shortHash: string;
  readonly te: number;
  readonly unet: number;
  readonly coverage: CoverageReport;
}

/** What a run applied, for the image metadata. */
export interface RunInfo {
  readonly sampler: InfotextSampler;
  readonly loras: readonly AppliedLora[];
  readonly loraMode: 'bank' | 'merged' | 'none';
}

export interface GenerateResult extends RunInfo {
  readonly images: readonly GeneratedImage[];
}

/** `<lora:…>` / `<lyco:…>` tags → job LoRAs (A1111: UNet strength defaults to the TE strength). */
export function lorasFromTags(networks: readonly ExtraNetworkTag[]): JobLora[] {
  return networks
    .filter((n) => n.type === 'lora' || n.type === 'lyco')
    .map((n) => {
      const w = loraWeights(n);
      return { name: n.name, te: w.te, unet: w.unet };
    });
}

/**
 * Resolve and load the job's LoRAs (job list first, then prompt tags). The same file named twice
 * is applied once with the strengths added, which is what applying it twice does to the weights.
 */
export async function loadJobLoras(
  refs: readonly JobLora[],
  models: SdModels,
  regionRefs: readonly (JobLora | undefined)[] = [],
): Promise<{ stack: AdapterStack; applied: AppliedLora[]; needsMerged: boolean; regionStrengths: Array<{ te: number[]; unet: number[] }> }> {
  const byPath = new Map<string, AppliedLora & { modules: ReturnType<SdModels['loras']['load']>['modules']; merged: boolean }>();
  const indexOf = async (ref: JobLora): Promise<string> => {
    const file = await models.loras.resolve(ref.name);
    if (!byPath.has(file.path)) {
      const lora = models.loras.load(file.path);
      byPath.set(file.path, { name: file.name, path: file.path, shortHash: file.shortHash, te: 0, unet: 0, coverage: lora.coverage, modules: lora.modules, merged: lora.needsMergedWeights });
    }
    return file.path;
  };
  for (const ref of refs) {
    const key = await indexOf(ref);
    const seen = byPath.get(key)!;
    byPath.set(key, { ...seen, te: seen.te + ref.te, unet: seen.unet + ref.unet });
  }
  const regionPaths: Array<{ path: string; ref: JobLora } | undefined> = [];
  for (const ref of regionRefs) regionPaths.push(ref === undefined ? undefined : { path: await indexOf(ref), ref });
  const entries = [...byPath.values()];
  const keys = [...byPath.keys()];
  const stack = new AdapterStack(entries.map((e) => ({ path: e.path, name: e.name, modules: e.modules, te: e.te, unet: e.unet })));
  const applied = entries.map(({ name, path, shortHash, te, unet, coverage }) => ({ name, path, shortHash, te, unet, coverage }));
  const regionStrengths = regionPaths.map((rp) => ({
    te: keys.map((k) => (rp !== undefined && rp.path === k ? rp.ref.te : 0)),
    unet: keys.map((k) => (rp !== undefined && rp.path === k ? rp.ref.unet : 0)),
  }));
  return { stack, applied, needsMerged: entries.some((e) => e.merged), regionStrengths };
}

/**
 * The regions strategy's inputs: each region's prompt and negative encoded with its own LoRA's
 * text-encoder delta (on top of the global LoRAs), masks on every UNet level, and with LoRAs the
 * slots' k/v strengths and the per-pixel strengths.
 */
async function planRegions(
  job: GenerateJob,
  models: SdModels,
  options: ConditioningOptions,
  stack: AdapterStack,
  strengths: { global: { te: number[]; unet: number[] }; regions: Array<{ te: number[]; unet: number[] }> } | undefined,
): Promise<RegionsPlan> {
  if (job.regions.length === 0) {
    throw new PipelineError('BAD_ARGUMENT', 'the regions strategy needs at least one region (a box or a painted mask with a prompt).', { field: 'regions' });
  }
  const te = (row: number[] | undefined): AdapterUse | undefined => (strengths === undefined || row === undefined ? undefined : { mode: 'bank', stack, mix: [row] });
  const add = (a: readonly number[], b: readonly number[]) => a.map((v, k) => v + b[k]!);
  const regions = await Promise.all(
    job.regions.map(async (r, i) => {
      const row = strengths === undefined ? undefined : add(strengths.global.te, strengths.regions[i]!.te);
      const enc = await encodePrompts(extractExtraNetworks(r.prompt).prompt, extractExtraNetworks(r.negativePrompt ?? job.negativePrompt).prompt, job.steps, models.textEncoder, options, te(row));
      if (enc.positive.length !== 1) throw new PipelineError('BAD_PROMPT', `regions[${i}].prompt: AND sub-prompts are not supported in a region.`, { field: `regions[${i}].prompt` });
      return { positive: enc.positive[0]!.schedule, negative: enc.negative };
    }),
  );
  const padChunk = (await encodePrompts('', '', job.steps, models.textEncoder, options, te(strengths?.global.te))).negative[0]!.embedding;
  const sizes = levelSizes(job.height / models.vaeScale, job.width / models.vaeScale, models.unetLevels);
  const masks = await regionMasks(job.regions, job.width, job.height, sizes);
  if (strengths === undefined) return { regions, masks, padChunk };
  const K = stack.size;
  const perRegion = strengths.regions.map((r) => r.unet);
  const slotMix: Tensor<'float32'> = { dtype: 'float32', shape: [1, job.regions.length, K], data: Float32Array.from(perRegion.flatMap((row) => add(strengths.global.unet, row))) };
  return { regions, masks, padChunk, adapters: { slotMix, mixMaps: pixelStrengths(masks, strengths.global.unet, perRegion), global: strengths.global.unet } };
}

/**
 * CLoRA's slots or LoRA-Composer's regions, planned once per job (prompts encoded with each
 * concept's text-encoder strengths on top of the job's, token positions from the tokenizer); the
 * strategy itself is made per batch.
 */
async function planGradient(
  job: GenerateJob,
  models: SdModels,
  options: ConditioningOptions,
  stack: AdapterStack,
  global: { te: number[]; unet: number[] },
  conceptStrengths: Array<{ te: number[]; unet: number[] }>,
): Promise<GradientPlan> {
  const concepts = job.strategy.concepts ?? [];
  const latentGrid: [number, number] = [job.height / models.vaeScale, job.width / models.vaeScale];
  const sizes = levelSizes(latentGrid[0], latentGrid[1], models.unetLevels);
  if (job.strategy.name === 'clora') {
    const knobs = { ...cloraDefaults(job.steps), ...job.strategy.clora };
    const plan = await planClora(
      {
        prompt: job.prompt,
        negativePrompt: job.negativePrompt,
        steps: job.steps,
        concepts: concepts.map((c, k) => ({ prompt: c.prompt ?? job.prompt, words: c.words, otherWords: c.otherWords ?? c.words, ...conceptStrengths[k]! })),
        global,
      },
      models.textEncoder,
      options,
      stack,
      { mapGrid: sizes[Math.min(2, sizes.length - 1)]!, latentGrid },
    );
    return { create: (setup, _shape, onEvent) => cloraStrategy.create(setup, plan, knobs, onEvent) as Strategy<unknown>, onePassSamples: 2 * plan.slots.length };
  }
  const knobs = { ...composerDefaults(job.steps), ...job.strategy.loraComposer };
  const plan = await planComposer(
    {
      width: job.width,
      height: job.height,
      steps: job.steps,
      negativePrompt: job.negativePrompt,
      regions: job.regions.map((region, r) => ({ region, words: concepts[r]!.words, ...conceptStrengths[r]! })),
      global,
    },
    models.textEncoder,
    options,
    stack,
    { vaeScale: models.vaeScale, unetLevels: models.unetLevels },
  );
  return { create: (setup, shape, onEvent) => loraComposerStrategy.create(setup, plan, knobs, shape, onEvent) as Strategy<unknown> };
}

interface GradientPlan {
  readonly create: (setup: Parameters<typeof cloraStrategy.create>[0], shape: [number, number, number, number], onEvent?: (e: CloraEvent | ComposerEvent) => void) => Strategy<unknown>;
  /** CLoRA: the samples per image of its one-pass update (the 2P slot samples, one UNet call). */
  readonly onePassSamples?: number;
}

/**
 * A denoiser that keeps only one kind of UNet pass in memory: before a gradient pass it releases
 * the forward sessions, before a forward pass the gradient sessions. For CLoRA's one-pass updates
 * on a machine without memory for both (see `exclusiveGradientBatch`): its update steps make
 * gradient passes only and its later steps forward passes only. The denoiser is told so
 * (`expectRebuilds`), which makes each rebuild a load of ONNX Runtime's optimized copy (SD 1.5 at
 * 512²: ≈ 30 s instead of ≈ 170 s for the gradient session).
 *
 * Where the denoiser can run a forward pass through the gradient session with its backward skipped
 * (`ntXentForward`, the CPU), forward passes after the first gradient pass go there instead, so no
 * session is released or rebuilt at all: `holdsGradientSession` then tells the caller the gradient
 * session is still alive (release it when the job ends).
 */
export function exclusivePasses(d: DenoiserModel): DenoiserModel & { readonly holdsGradientSession: () => boolean } {
  d.expectRebuilds?.(true);
  let current: 'forward' | 'gradient' | undefined;
  // The temperature of the gradient passes (it selects their session); unset before the first.
  let temperature: number | undefined;
  // Off once the denoiser said it cannot (its device has no skippable backward).
  let throughGradient = d.ntXentForward !== undefined;
  const use = async (kind: 'forward' | 'gradient') => {
    if (current === kind) return;
    if (kind === 'gradient') await d.releaseForwardPasses?.();
    else await d.releaseGradientPasses?.();
    current = kind;
  };
  return {
    ...d,
    holdsGradientSession: () => current === 'gradient',
    predict: async (request) => {
      if (throughGradient && current === 'gradient' && temperature !== undefined) {
        const out = await d.ntXentForward!(request, { temperature });
        if (out !== undefined) return out;
        throughGradient = false;
      }
      await use('forward');
      return d.predict(request);
    },
    ...(d.maps === undefined ? {} : { maps: async (request: DenoiseRequest) => (await use('forward'), d.maps!(request)) }),
    ...(d.vjp === undefined ? {} : { vjp: async (request: DenoiseRequest, cot: DenoiseCotangents) => (await use('gradient'), d.vjp!(request, cot)) }),
    ...(d.ntXentVjp === undefined
      ? {}
      : {
          ntXentVjp: async (request: DenoiseRequest, loss: Parameters<NonNullable<DenoiserModel['ntXentVjp']>>[1]) => {
            await use('gradient');
            temperature = loss.temperature;
            return d.ntXentVjp!(request, loss);
          },
        }),
  };
}

/** Run a normalized job on the given models. */
export async function generate(job: GenerateJob, models: SdModels, options: GenerateOptions = {}): Promise<GenerateResult> {
  if (options.memoryBytes !== undefined && !(Number.isFinite(options.memoryBytes) && options.memoryBytes > 0)) {
    throw new PipelineError('BAD_ARGUMENT', `memoryBytes must be a positive number of bytes, got ${options.memoryBytes}.`, { field: 'memoryBytes' });
  }
  // 1. sampler and scheduler.
  const choice = resolveSampler(job.sampler, job.scheduleType);
  const schedulerConfig = parseSchedulerConfig(models.schedulerConfig, 'scheduler config');

  // 2. LoRAs (job list and prompt tags), then the prompts, encoded with the LoRAs' text-encoder part.
  const positive = extractExtraNetworks(job.prompt);
  const negative = extractExtraNetworks(job.negativePrompt);
  const regionJob = job.strategy.name === 'regions';
  const gradientJob = job.strategy.name === 'clora' || job.strategy.name === 'lora-composer';
  // LoRAs bound to a region or concept (their strengths apply there only).
  const regionLoras = job.strategy.name === 'clora' ? (job.strategy.concepts ?? []).map((c) => c.lora) : regionJob || job.strategy.name === 'lora-composer' ? job.regions.map((r) => r.lora) : [];
  const { stack, applied, needsMerged, regionStrengths } = await loadJobLoras([...job.loras, ...lorasFromTags(positive.networks)], models, regionLoras);
  if (needsMerged && job.loraMode === 'bank') {
    throw new PipelineError('BAD_ARGUMENT', `${applied.map((a) => a.name).join(', ')}: a LoRA in this stack is not low-rank (LoKr or a full diff) and cannot run as bank inputs; use loraMode "merged" or "auto".`, { field: 'loraMode' });
  }
  if (needsAdapterBank(job.strategy.name) && (needsMerged || job.loraMode === 'merged')) {
    throw new PipelineError(
      'BAD_ARGUMENT',
      `the ${job.strategy.name} strategy switches LoRAs per step or per branch, which needs them as adapter-bank inputs; ${needsMerged ? 'a LoRA in this stack is not low-rank (LoKr or a full diff) and can only be merged' : 'loraMode "merged" bakes one fixed stack'}.`,
      { field: 'strategy' },
    );
  }
  const mode = stack.size === 0 ? 'none' : job.loraMode === 'merged' || (job.loraMode === 'auto' && needsMerged) ? 'merged' : 'bank';
  const strategy: StrategySpec =
    job.strategy.name === 'cmlora' && job.strategy.frequencyClasses === undefined && stack.size > 0
      ? { ...job.strategy, frequencyClasses: await measureFrequencyClasses(job, models, applied) }
      : job.strategy;
  const teMix = textEncoderMix(strategy, { stack });
  const teAdapters: AdapterUse | undefined = mode === 'none' ? undefined : mode === 'merged' ? { mode, stack } : { mode, stack, mix: [teMix] };
  const conditioningOptions: ConditioningOptions = { clipSkip: job.clipSkip, emphasis: job.emphasis, commaPaddingBacktrack: 20 };
  const conditioning = await encodePrompts(positive.prompt, negative.prompt, job.steps, models.textEncoder, conditioningOptions, teAdapters);
  const regionsPlan = regionJob
    ? await planRegions(job, models, conditioningOptions, stack, mode === 'bank' ? { global: { te: teMix, unet: stack.strengths('unet') }, regions: regionStrengths } : undefined)
    : undefined;
  const gradientPlan = gradientJob ? await planGradient(job, models, conditioningOptions, stack, { te: teMix, unet: stack.strengths('unet') }, regionStrengths) : undefined;

  // 3. batches.
  const c = models.latentChannels;
  const h = job.height / models.vaeScale;
  const w = job.width / models.vaeScale;
  const perImage = c * h * w;
  if (options.initLatents !== undefined) {
    const s = options.initLatents.shape;
    if (s.length !== 4 || s[0] !== job.batchSize || s[1] !== c || s[2] !== h || s[3] !== w) {
      throw new PipelineError('BAD_LATENTS', `init latents have shape [${s.join(', ')}]; this job needs [${job.batchSize}, ${c}, ${h}, ${w}] (batch size, channels, height/8, width/8).`, {
        found: s,
        expected: [job.batchSize, c, h, w],
      });
    }
  }
  const images: GeneratedImage[] = [];
  let rebuildsExpected = false;
  // CLoRA's exclusive passes: one wrapper for the whole job, so a gradient session that also serves
  // the forward passes stays alive from one batch to the next.
  let exclusiveDenoiser: ReturnType<typeof exclusivePasses> | undefined;
  try {
    for (let b = 0; b < job.batchCount; b++) {
      const seeds = Array.from({ length: job.batchSize }, (_, i) => job.seed + BigInt(b * job.batchSize + i));
      const generators: NoiseGenerator[] = seeds.map((s) => createGenerator(job.rng, s));
      const draw = () => {
        const out = new Float32Array(job.batchSize * perImage);
        generators.forEach((g, i) => out.set(g.randn([1, c, h, w]), i * perImage));
        return out;
      };
      const initialNoise = b === 0 && options.initLatents !== undefined ? Float32Array.from(options.initLatents.data as ArrayLike<number>) : draw();
      const scheduler = createScheduler(choice.kind, schedulerConfig, job.steps, choice.options);
      const setup = { conditioning, guidanceScale: job.cfgScale, stack, steps: job.steps };
      const onEvent = options.onStrategyEvent === undefined ? undefined : (e: CloraEvent | ComposerEvent) => options.onStrategyEvent!(e, b);
      // Gradient strategies keep a forward and a VJP session (and a maps-only one unless memory is
      // short: then the maps come from the forward session, see `gradientMemoryIsShort`).
      const memory = options.memoryBytes ?? os.totalmem();
      const shortOfMemory = gradientPlan !== undefined && gradientMemoryIsShort(h, w, memory);
      const sharedSessions = shortOfMemory ? 3 : (strategy.name === 'cmlora' && strategy.cacheInterval !== 1) || gradientPlan !== undefined ? 2 : 1;
      const sharedGradientBatch = options.maxGradientBatch ?? Math.min(options.maxBatch ?? defaultMaxBatch(h, w, sharedSessions, memory), defaultGradientBatch(h, w, memory));
      // CLoRA's one-pass update, when its 2P slot samples do not fit a gradient call beside the forward
      // sessions but do with the gradient session alone (SD 1.5 at 512² on 24 or 32 GB). Caps the caller
      // set are kept as they are.
      const onePassSamples = (gradientPlan?.onePassSamples ?? 0) * job.batchSize;
      const exclusive =
        onePassSamples > sharedGradientBatch && options.maxBatch === undefined && options.maxGradientBatch === undefined && exclusiveGradientBatch(h, w, memory) >= onePassSamples;
      const sessions = exclusive ? 1 : sharedSessions;
      const maxBatch = options.maxBatch ?? defaultMaxBatch(h, w, sessions, memory);
      const gradientBatch = exclusive ? onePassSamples : sharedGradientBatch;
      options.onPlan?.({ memoryBytes: memory, maxBatch, ...(gradientPlan === undefined ? {} : { gradientBatch }), sessions, exclusive }, b);
      // Sessions released during or after this batch are built again: have their builds keep
      // ONNX Runtime's optimized copies (until the job ends).
      if (shortOfMemory || exclusive) {
        models.denoiser.expectRebuilds?.(true);
        rebuildsExpected = true;
      }
      const finalLatents = await denoise({
        scheduler,
        strategy:
          gradientPlan !== undefined
            ? gradientPlan.create(setup, [job.batchSize, c, h, w], onEvent)
            : regionsPlan === undefined
              ? createStrategy(strategy, setup, [job.batchSize, c, h, w])
              : regionsStrategy.create(setup, regionsPlan),
        denoiser: exclusive ? (exclusiveDenoiser ??= exclusivePasses(models.denoiser)) : models.denoiser,
        initialNoise,
        shape: [job.batchSize, c, h, w],
        steps: job.steps,
        noise: draw,
        ...(mode === 'none' ? {} : { adapters: { stack, mode } }),
        // CMLoRA keeps two UNet sessions (full and shallow); the gradient-guided strategies' forward
        // calls share the budget with their VJP calls.
        maxBatch,
        ...(gradientPlan === undefined ? {} : { maxGradientBatch: gradientBatch }),
        ...(shortOfMemory && !exclusive ? { mapsFromFullPass: true } : {}),
        // Alone or not, two one-pass sessions (truncated and whole UNet) do not fit beside each other
        // (on the CPU the engine keeps one anyway: ε in an If branch, skipped in discarded rounds).
        ...(exclusive ? { oneGradientGraph: true } : {}),
        ...(options.signal === undefined ? {} : { signal: options.signal }),
        onProgress: (p) => options.onProgress?.({ ...p, batch: b, batches: job.batchCount }),
      });
      // Short of memory, the VAE decode (and the next batch's forward passes) must not sit beside the
      // VJP session's ≈ 14 GiB (SD 1.5 at 512²): release it; the next batch's updates rebuild it.
      // Unless the forward passes ran through it (`exclusivePasses` on the CPU): it is then the only
      // UNet session, kept for the next batch (the VAE decoder's ≈ 1 GiB fits beside it).
      if ((shortOfMemory || exclusive) && !(exclusive && exclusiveDenoiser?.holdsGradientSession() === true)) await models.denoiser.releaseGradientPasses?.();
      for (let i = 0; i < job.batchSize; i++) {
        const latents: Tensor<'float32'> = { dtype: 'float32', shape: [1, c, h, w], data: finalLatents.slice(i * perImage, (i + 1) * perImage) };
        const image = await models.decoder.decode(latents);
        const img: GeneratedImage = {
          index: b * job.batchSize + i,
          seed: seeds[i]!,
          image,
          initLatents: { dtype: 'float32', shape: [1, c, h, w], data: initialNoise.slice(i * perImage, (i + 1) * perImage) },
          finalLatents: latents,
        };
        images.push(img);
        await options.onImage?.(img, { sampler: choice.infotext, loras: applied, loraMode: mode });
      }
    }
  } finally {
    // The next job may need the memory for other sessions.
    if (exclusiveDenoiser?.holdsGradientSession() === true) await models.denoiser.releaseGradientPasses?.();
    if (rebuildsExpected) models.denoiser.expectRebuilds?.(false);
  }
  return { images, sampler: choice.infotext, loras: applied, loraMode: mode };
}
