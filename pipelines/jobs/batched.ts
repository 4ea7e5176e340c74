/**
 * Heterogeneous batching: jobs that share the model, image size, sampler and step count and use the
 * plain (or merge) strategy, but differ in prompt, LoRA stack, CFG scale or seed, run as ONE
 * denoising loop with one batch element per job, so each UNet call evaluates every job at once.
 *
 * How the jobs become one run:
 *   1. each job is prepared alone, exactly as `generate` does: its LoRAs (list and prompt tags) are
 *      loaded into its own stack, its prompts encoded with that stack's text-encoder strengths, and
 *      its own strategy built;
 *   2. the UNet gets the union of the stacks, ordered so that every job's LoRAs keep their order
 *      (their deltas are then summed in the same order as alone: reordering a stack alone moves the
 *      final latents by ~1e-4 at float32), and batch element j gets job j's UNet strengths scattered
 *      into a union-wide mix row (0 for the LoRAs it does not use): the bank's per-element mix;
 *   3. a zipped strategy asks every job's strategy for its branches, stacks branch k's contexts into
 *      one (B, S, D) context and its mixes into per-image rows (`Branch.imageMixes`), and hands each
 *      job's slice of the outputs back to that job's `combine`;
 *   4. every job keeps its own noise generator (seed), so its initial and ancestral noise are what a
 *      run of that job alone draws.
 * A job's result therefore matches its one-by-one run up to float rounding in the batched UNet call
 * (test/batched.test.ts checks 1e-4 on the final latents).
 *
 * Left to one-by-one runs (`generate`): other strategies (their per-step branch plans differ per
 * LoRA count), regions, batch size or count above 1, LoRAs that can only be merged (LoKr, full
 * diffs), `loraMode: "merged"`. Jobs whose prompts encode to different lengths (75-token chunk or
 * AND sub-prompt counts differ at some step) or whose LoRA orders disagree go into separate groups.
 */
import { AdapterStack, type StackEntry, type Tensor } from '../../models/index.ts';
import { DEFAULT_COMMA_BACKTRACK, conditioningAt, encodePrompts, type ConditioningOptions, type PromptConditioning } from '../conditioning.ts';
import { denoise, type DenoiseProgress } from '../denoise.ts';
import { PipelineError } from '../errors.ts';
import type { GenerateJob } from '../job.ts';
import type { SdModels } from '../models.ts';
import { extractExtraNetworks } from '../prompt/a1111.ts';
import { createGenerator } from '../rng/index.ts';
import { createScheduler, parseSchedulerConfig, resolveSampler } from '../schedulers/index.ts';
import { createStrategy, textEncoderMix } from '../strategies/index.ts';
import type { Branch, BranchOutput, StepContext, Strategy } from '../strategies/types.ts';
import { loadJobLoras, lorasFromTags, type AppliedLora, type GeneratedImage, type GenerateResult, type RunInfo } from '../text-to-image.ts';

/**
 * What jobs must share to run in one denoising loop, as a string key; `undefined` when the job
 * always runs alone. (The LoRA side is checked after loading: see `prepareBatchJob`.)
 */
export function batchKey(job: GenerateJob): string | undefined {
  const batchable = (job.strategy.name === 'plain' || job.strategy.name === 'merge') && job.loraMode !== 'merged' && job.batchSize === 1 && job.batchCount === 1 && job.regions.length === 0;
  if (!batchable) return undefined;
  const sampler = resolveSampler(job.sampler, job.scheduleType);
  return JSON.stringify([job.model, job.width, job.height, sampler.kind, sampler.options, job.steps]);
}

/** A job ready to join a batch (its LoRAs loaded, its prompts encoded, its strategy built). */
export interface PreparedJob {
  readonly job: GenerateJob;
  readonly stack: AdapterStack;
  readonly applied: readonly AppliedLora[];
  readonly conditioning: PromptConditioning;
  readonly strategy: Strategy<unknown>;
  /** Context lengths of the plain strategy's branches ([negative, …AND sub-prompts]) at every step. */
  readonly signature: string;
}

/**
 * Step 1: prepare a job alone. Returns `undefined` when a LoRA of the job can only be merged (the
 * job then runs alone through `generate`, which also reports a `loraMode: "bank"` conflict). Throws
 * the job's own errors (unknown LoRA, bad prompt, merge without LoRAs), so one bad job fails alone.
 */
export async function prepareBatchJob(job: GenerateJob, models: SdModels): Promise<PreparedJob | undefined> {
  if (batchKey(job) === undefined) throw new PipelineError('BAD_ARGUMENT', `this job cannot share a batch (strategy ${job.strategy.name}, batch ${job.batchSize}×${job.batchCount}, ${job.regions.length} regions, loraMode ${job.loraMode}).`, {});
  const positive = extractExtraNetworks(job.prompt);
  const negative = extractExtraNetworks(job.negativePrompt);
  const { stack, applied, needsMerged } = await loadJobLoras([...job.loras, ...lorasFromTags(positive.networks)], models);
  if (needsMerged) return undefined;
  const options: ConditioningOptions = { clipSkip: job.clipSkip, emphasis: job.emphasis, commaPaddingBacktrack: DEFAULT_COMMA_BACKTRACK };
  const teAdapters = stack.size === 0 ? undefined : { mode: 'bank' as const, stack, mix: [textEncoderMix(job.strategy, { stack })] };
  const conditioning = await encodePrompts(positive.prompt, negative.prompt, job.steps, models.textEncoder, options, teAdapters);
  const c = models.latentChannels;
  const strategy = createStrategy(job.strategy, { conditioning, guidanceScale: job.cfgScale, stack, steps: job.steps }, [1, c, job.height / models.vaeScale, job.width / models.vaeScale]);
  const seqAt = (step: number) => [conditioningAt(conditioning.negative, step), ...conditioning.positive.map((p) => conditioningAt(p.schedule, step))].map((t) => t.shape[1]);
  const signature = JSON.stringify(Array.from({ length: job.steps }, (_, s) => seqAt(s)));
  return { job, stack, applied, conditioning, strategy, signature };
}

/**
 * The LoRA files of `union` and `stack` (paths) in one order that keeps the order of each, or
 * `undefined` when they disagree (a before b in one, b before a in the other). Keeping each job's
 * order keeps its adapters' deltas summed in the same order as in its run alone.
 */
function mergeStackOrder(union: readonly string[], stack: readonly string[]): string[] | undefined {
  const out: string[] = [];
  let next = 0;
  let pending: string[] = [];
  for (const p of stack) {
    const at = union.indexOf(p);
    if (at < 0) pending.push(p);
    else if (at < next) return undefined;
    else {
      // New files go as late as their order allows (just before this shared one), which keeps
      // first-seen order and leaves later jobs the most freedom.
      out.push(...union.slice(next, at), ...pending, p);
      pending = [];
      next = at + 1;
    }
  }
  return [...out, ...union.slice(next), ...pending];
}

/**
 * Split prepared jobs (of one `batchKey`) into groups that can share a loop: equal prompt lengths
 * at every step, LoRA orders that agree, at most `maxJobs` each. Jobs keep their order in a group.
 */
export function groupPreparedJobs(prepared: readonly PreparedJob[], maxJobs: number): PreparedJob[][] {
  const open: Array<{ signature: string; order: string[]; jobs: PreparedJob[] }> = [];
  for (const p of prepared) {
    const paths = p.stack.entries.map((e) => e.path);
    const fit = open
      .filter((g) => g.signature === p.signature && g.jobs.length < maxJobs)
      .map((g) => ({ g, order: mergeStackOrder(g.order, paths) }))
      .find((c) => c.order !== undefined);
    if (fit === undefined) open.push({ signature: p.signature, order: paths, jobs: [p] });
    else {
      fit.g.jobs.push(p);
      fit.g.order = fit.order!;
    }
  }
  return open.map((g) => g.jobs);
}

/** The union of the jobs' stacks in an order that keeps each job's, and each job's column map. */
function unionStack(group: readonly PreparedJob[]): { stack: AdapterStack; columns: number[][] } {
  let order: string[] = [];
  const entryOf = new Map<string, StackEntry>();
  for (const p of group) {
    for (const e of p.stack.entries) if (!entryOf.has(e.path)) entryOf.set(e.path, e);
    const merged = mergeStackOrder(order, p.stack.entries.map((e) => e.path));
    if (merged === undefined) throw new Error('batched: jobs with conflicting LoRA orders in one group (groupPreparedJobs keeps them apart)');
    order = merged;
  }
  const columns = group.map((p) => p.stack.entries.map((e) => order.indexOf(e.path)));
  return { stack: new AdapterStack(order.map((path) => entryOf.get(path)!)), columns };
}

/**
 * Step 3: one strategy over the batch, built from each job's own strategy. Each job sees a batch of
 * one (its latents, its outputs); the zipped branches carry per-image contexts and mix rows.
 */
function zipStrategies(group: readonly PreparedJob[], union: { stack: AdapterStack; columns: number[][] }, perImage: number): Strategy<unknown[]> {
  const scatter = (j: number, row: readonly number[]): number[] => {
    const out = new Array<number>(union.stack.size).fill(0);
    union.columns[j]!.forEach((k, i) => (out[k] = row[i]!));
    return out;
  };
  const jobCtx = (ctx: StepContext, j: number): StepContext => ({ ...ctx, batch: 1, latents: ctx.latents.subarray(j * perImage, (j + 1) * perImage) });
  return {
    name: `batched(${group.map((p) => p.strategy.name).join(',')})`,
    begin: () => group.map((p) => p.strategy.begin()),
    branches(states, ctx): Branch[] {
      const perJob = group.map((p, j) => p.strategy.branches(states[j], jobCtx(ctx, j)));
      const count = perJob[0]!.length;
      return Array.from({ length: count }, (_, k) => {
        const branches = perJob.map((b) => b[k]);
        if (branches.some((b) => b === undefined || b.context.shape[1] !== branches[0]!.context.shape[1] || b.deepFeature !== undefined || b.keepDeepFeature === true)) {
          throw new Error(`batched strategy: the jobs' branch ${k} differ in layout at evaluation ${ctx.evaluation} (grouping should have kept them apart)`);
        }
        const [, seq, dim] = branches[0]!.context.shape as [number, number, number];
        const data = new Float32Array(group.length * seq * dim);
        branches.forEach((b, j) => data.set(b!.context.data, j * seq * dim));
        const context: Tensor<'float32'> = { dtype: 'float32', shape: [group.length, seq, dim], data };
        return { context, imageMixes: branches.map((b, j) => scatter(j, b!.mix ?? group[j]!.stack.strengths('unet'))) };
      });
    },
    combine(states, ctx, outputs: readonly BranchOutput[]): Float32Array {
      const noisePred = new Float32Array(group.length * perImage);
      group.forEach((p, j) => {
        const own = outputs.map((o) => ({ eps: o.eps.subarray(j * perImage, (j + 1) * perImage) }));
        noisePred.set(p.strategy.combine(states[j], jobCtx(ctx, j), own), j * perImage);
      });
      return noisePred;
    },
  };
}

export interface BatchedRunOptions {
  readonly signal?: AbortSignal;
  readonly onProgress?: (p: DenoiseProgress) => void;
  /** Called as each job's image is ready (`job` indexes the group). */
  readonly onImage?: (job: number, img: GeneratedImage, run: RunInfo) => void | Promise<void>;
  /** Largest batch per UNet call (images × branches), passed to the loop. */
  readonly maxBatch?: number;
}

/**
 * Steps 2–4: run a group from `groupPreparedJobs` as one denoising loop; one result per job, in
 * order. Each result equals that job's `generate` result (same seed, image index 0).
 */
export async function generateTogether(group: readonly PreparedJob[], models: SdModels, options: BatchedRunOptions = {}): Promise<GenerateResult[]> {
  const first = group[0];
  if (first === undefined) return [];
  const key = batchKey(first.job);
  if (group.some((p) => batchKey(p.job) !== key || p.signature !== first.signature)) {
    throw new PipelineError('BAD_ARGUMENT', 'these jobs cannot share a batch: model, size, sampler, steps or prompt lengths differ.', {});
  }
  const { job } = first;
  const choice = resolveSampler(job.sampler, job.scheduleType);
  const schedulerConfig = parseSchedulerConfig(models.schedulerConfig, 'scheduler config');
  const c = models.latentChannels;
  const h = job.height / models.vaeScale;
  const w = job.width / models.vaeScale;
  const perImage = c * h * w;
  const B = group.length;

  const union = unionStack(group);
  const generators = group.map((p) => createGenerator(p.job.rng, p.job.seed));
  const draw = () => {
    const out = new Float32Array(B * perImage);
    generators.forEach((g, j) => out.set(g.randn([1, c, h, w]), j * perImage));
    return out;
  };
  const initialNoise = draw();
  const finalLatents = await denoise({
    scheduler: createScheduler(choice.kind, schedulerConfig, job.steps, choice.options),
    strategy: zipStrategies(group, union, perImage),
    denoiser: models.denoiser,
    initialNoise,
    shape: [B, c, h, w],
    steps: job.steps,
    noise: draw,
    ...(union.stack.size === 0 ? {} : { adapters: { stack: union.stack, mode: 'bank' as const } }),
    ...(options.maxBatch === undefined ? {} : { maxBatch: options.maxBatch }),
    ...(options.signal === undefined ? {} : { signal: options.signal }),
    ...(options.onProgress === undefined ? {} : { onProgress: options.onProgress }),
  });

  const results: GenerateResult[] = [];
  for (const [j, p] of group.entries()) {
    const slice = (data: Float32Array): Tensor<'float32'> => ({ dtype: 'float32', shape: [1, c, h, w], data: data.slice(j * perImage, (j + 1) * perImage) });
    const latents = slice(finalLatents);
    const img: GeneratedImage = { index: 0, seed: p.job.seed, image: await models.decoder.decode(latents), initLatents: slice(initialNoise), finalLatents: latents };
    const run: RunInfo = { sampler: choice.infotext, loras: p.applied, loraMode: p.stack.size === 0 ? 'none' : 'bank' };
    await options.onImage?.(j, img, run);
    results.push({ images: [img], ...run });
  }
  return results;
}

/**
 * Convenience for tests and benchmarks: prepare, group and run jobs sharing one `batchKey`, up to
 * `maxJobs` per loop. Results in job order. Throws on the first job error; a job with a LoRA that
 * can only be merged throws `BAD_ARGUMENT` (run it with `generate`).
 */
export async function generateBatched(jobs: readonly GenerateJob[], models: SdModels, options: BatchedRunOptions & { maxJobs?: number } = {}): Promise<GenerateResult[]> {
  const prepared: PreparedJob[] = [];
  for (const job of jobs) {
    const p = await prepareBatchJob(job, models);
    if (p === undefined) throw new PipelineError('BAD_ARGUMENT', `a LoRA of the job "${job.prompt}" can only be merged; run it alone.`, { field: 'loras' });
    prepared.push(p);
  }
  const results = new Map<PreparedJob, GenerateResult>();
  for (const group of groupPreparedJobs(prepared, options.maxJobs ?? prepared.length)) {
    (await generateTogether(group, models, options)).forEach((r, j) => results.set(group[j]!, r));
  }
  return prepared.map((p) => results.get(p)!);
}
