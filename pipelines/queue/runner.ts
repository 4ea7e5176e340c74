/**
 * The queue runner: takes jobs from a `JobQueue` in order (priority, then age), renders them, writes
 * their PNGs atomically and completes them, until the queue (or one batch of it) is empty.
 *
 * One round:
 *   1. recover jobs of dead runners (their temp files are removed);
 *   2. claim the next job and the queued jobs that can share its denoising loop (`batchKey`), up to
 *      `maxBatch`;
 *   3. while it works, renew the lease every `heartbeatMs` and watch for cancel/pause requests
 *      (from this process at once, from others on the heartbeat) and for the caller's signal;
 *   4. render: one job alone through `generate`; several through `jobs/batched.ts` (each prepared
 *      alone, so a job with an unknown LoRA fails alone; a failing batched loop falls back to one
 *      by one);
 *   5. for each job: every image → PNG with its metadata → temp file → rename to its planned name;
 *      then `complete` records the files and marks it done in one transaction;
 *   6. a stopped job is settled: cancelled or paused on request, back to the queue when the caller
 *      interrupted or a job sharing its loop was stopped; a failure records its error and the queue
 *      moves on.
 */
import { isModelError } from '../../models/index.ts';
import { isPipelineError } from '../errors.ts';
import { imageMetadataTexts } from '../images/job-metadata.ts';
import { encodePng, writeFileAtomic } from '../images/save.ts';
import { batchKey, generateTogether, groupPreparedJobs, prepareBatchJob, type PreparedJob } from '../jobs/batched.ts';
import { generate, type GeneratedImage, type RunInfo } from '../text-to-image.ts';
import { isQueueError } from './errors.ts';
import type { ModelSource, OpenedModelSet } from './model-source.ts';
import { removeStaleTemps } from './outputs.ts';
import type { JobErrorRecord, JobQueue, JobRequest, JobState, QueuedJob } from './store.ts';

export type RunnerEvent =
  | { readonly type: 'recovered'; readonly job: QueuedJob; readonly state: JobState }
  /** A claim starts: one job, or several sharing one denoising loop. */
  | { readonly type: 'started'; readonly jobs: readonly QueuedJob[] }
  | { readonly type: 'progress'; readonly jobIds: readonly number[]; readonly evaluation: number; readonly evaluations: number; readonly batch: number; readonly batches: number }
  | { readonly type: 'done'; readonly job: QueuedJob; readonly files: readonly string[]; readonly ms: number }
  | { readonly type: 'failed'; readonly job: QueuedJob; readonly error: JobErrorRecord }
  /** Stopped before finishing: cancelled, paused, or back in the queue (`queued`). */
  | { readonly type: 'stopped'; readonly job: QueuedJob; readonly state: 'cancelled' | 'paused' | 'queued' };

export interface RunOptions {
  readonly queue: JobQueue;
  readonly source: ModelSource;
  /** Only this batch's jobs (default: the whole queue). */
  readonly batchId?: number;
  /** Jobs per batched denoising loop; 1 runs every job alone. */
  readonly maxBatch?: number;
  /** Lease renewal and request polling period. */
  readonly heartbeatMs?: number;
  /** Abort to stop: the running jobs go back to the queue. */
  readonly signal?: AbortSignal;
  readonly onEvent?: (event: RunnerEvent) => void;
  /** The RAM the jobs' batches and sessions are planned for (`GenerateOptions.memoryBytes`). */
  readonly memoryBytes?: number;
}

export interface RunSummary {
  readonly done: number;
  readonly failed: number;
  readonly stopped: number;
  /** Why the runner returned: nothing left to claim, the queue is paused, or the caller's signal. */
  readonly reason: 'empty' | 'paused' | 'signal';
}

/** Jobs per batched loop by default: enough to amortise a UNet call, small enough for SD 1.5 at 512² on a laptop GPU. */
export const DEFAULT_MAX_BATCH = 8;
/** Well under the lease (store.ts DEFAULT_LEASE_MS), and quick enough that a cancel from another process feels immediate. */
export const DEFAULT_HEARTBEAT_MS = 1000;

/** A job's error as the queue records it: the typed error's code, or INTERNAL for a bug. */
export function errorRecord(e: unknown): JobErrorRecord {
  if (isPipelineError(e) || isModelError(e) || isQueueError(e)) return { code: e.code, message: e.message, details: e.details };
  const err = e instanceof Error ? e : new Error(String(e));
  return { code: 'INTERNAL', message: err.message, details: { stack: err.stack } };
}

/** Why a claim's shared signal was aborted, per job. */
type StopReason = JobRequest | 'lost' | 'interrupted' | 'sibling';

/** Run queued jobs until none is left (of the batch), the queue is paused, or `signal` aborts. */
export async function runQueue(options: RunOptions): Promise<RunSummary> {
  const { queue } = options;
  const maxBatch = Math.max(1, options.maxBatch ?? DEFAULT_MAX_BATCH);
  const emit = options.onEvent ?? (() => {});
  const tally = { done: 0, failed: 0, stopped: 0 };

  const recover = () => {
    for (const r of queue.recoverStale()) {
      removeStaleTemps(r.job.outputs.map((o) => o.path));
      emit({ type: 'recovered', job: r.job, state: r.state });
    }
  };

  for (;;) {
    if (options.signal?.aborted === true) return { ...tally, reason: 'signal' };
    recover();
    if (queue.paused) return { ...tally, reason: 'paused' };
    const claimed = queue.claim({ maxJobs: maxBatch, ...(options.batchId === undefined ? {} : { batchId: options.batchId }) });
    if (claimed.length === 0) return { ...tally, reason: queue.paused ? 'paused' : 'empty' };
    await runClaim(claimed, options, emit, tally);
  }
}

async function runClaim(jobs: readonly QueuedJob[], options: RunOptions, emit: (e: RunnerEvent) => void, tally: { done: number; failed: number; stopped: number }): Promise<void> {
  const { queue } = options;
  const controller = new AbortController();
  const reasons = new Map<number, StopReason>();
  const settled = new Set<number>();
  const ids = jobs.map((j) => j.id);
  const stop = (id: number | undefined, reason: StopReason) => {
    if (id === undefined) for (const j of ids) reasons.set(j, reasons.get(j) ?? reason);
    else reasons.set(id, reason);
    controller.abort();
  };

  // Step 3: lease, requests, the caller's signal.
  const beat = setInterval(() => {
    for (const [id, status] of queue.heartbeat(ids.filter((i) => !settled.has(i)))) if (status !== 'ok') stop(id, status);
  }, options.heartbeatMs ?? DEFAULT_HEARTBEAT_MS);
  const unsubscribe = queue.onRequest((id, request) => {
    if (ids.includes(id) && !settled.has(id)) stop(id, request);
  });
  const onAbort = () => stop(undefined, 'interrupted');
  options.signal?.addEventListener('abort', onAbort);
  if (options.signal?.aborted === true) onAbort();

  emit({ type: 'started', jobs });
  const finish = {
    done(job: QueuedJob, written: ReadonlyArray<{ path: string; bytes: number }>, ms: number, run: RunInfo) {
      for (const l of run.loras) queue.log(job.id, 'info', `LoRA ${l.name} [${l.shortHash}] te ${l.te} unet ${l.unet}: ${l.coverage.matched}/${l.coverage.totalModulesInFile} modules applied (${run.loraMode})`);
      const note = `${written.length} image${written.length === 1 ? '' : 's'} in ${(ms / 1000).toFixed(1)} s`;
      if (queue.complete(job.id, written.map((w, image) => ({ image, bytes: w.bytes })), note)) {
        tally.done++;
        emit({ type: 'done', job, files: written.map((w) => w.path), ms });
      }
      settled.add(job.id);
    },
    failed(job: QueuedJob, e: unknown) {
      const error = errorRecord(e);
      if (queue.fail(job.id, error)) {
        tally.failed++;
        emit({ type: 'failed', job, error });
      }
      settled.add(job.id);
    },
  };

  try {
    for (const job of jobs) removeStaleTemps(job.outputs.map((o) => o.path));
    let set: OpenedModelSet;
    try {
      set = await options.source.open(jobs[0]!.entry.job.model);
    } catch (e) {
      for (const job of jobs) finish.failed(job, e);
      return;
    }
    const ctx: RenderContext = { set, signal: controller.signal, memoryBytes: options.memoryBytes, emit, finish };
    if (jobs.length === 1 || batchKey(jobs[0]!.entry.job) === undefined) {
      for (const job of jobs) await renderAlone(job, ctx);
    } else {
      await renderBatched(jobs, ctx, options.maxBatch ?? DEFAULT_MAX_BATCH);
    }
  } catch (e) {
    if (!controller.signal.aborted) throw e;
  } finally {
    clearInterval(beat);
    unsubscribe();
    options.signal?.removeEventListener('abort', onAbort);
    // Step 6: whatever did not finish was stopped.
    for (const job of jobs) {
      if (settled.has(job.id)) continue;
      const reason = reasons.get(job.id) ?? 'sibling';
      let state: 'cancelled' | 'paused' | 'queued' | undefined;
      if (reason === 'cancel' || reason === 'pause') state = queue.settle(job.id, reason) ? (reason === 'cancel' ? 'cancelled' : 'paused') : undefined;
      else if (reason !== 'lost') state = queue.release(job.id, reason === 'interrupted' ? 'the runner was interrupted' : 'a job sharing its batch was stopped') ? 'queued' : undefined;
      if (state !== undefined) {
        tally.stopped++;
        emit({ type: 'stopped', job, state });
      }
    }
  }
}

interface RenderContext {
  readonly set: OpenedModelSet;
  readonly signal: AbortSignal;
  readonly memoryBytes: number | undefined;
  readonly emit: (e: RunnerEvent) => void;
  readonly finish: {
    done(job: QueuedJob, written: ReadonlyArray<{ path: string; bytes: number }>, ms: number, run: RunInfo): void;
    failed(job: QueuedJob, e: unknown): void;
  };
}

/** Step 5 for one image: PNG with metadata, written to its planned name through a temp file. Returns the byte count. */
async function saveImage(job: QueuedJob, img: GeneratedImage, run: RunInfo, set: OpenedModelSet): Promise<{ path: string; bytes: number }> {
  const planned = job.outputs[img.index];
  if (planned === undefined || planned.seed !== img.seed.toString()) {
    throw new Error(`runner: job ${job.id} image ${img.index} (seed ${img.seed}) does not match its planned outputs`);
  }
  const png = await encodePng(img.image, imageMetadataTexts(job.entry.job, img, set.model, run));
  writeFileAtomic(planned.path, png);
  return { path: planned.path, bytes: png.byteLength };
}

async function renderAlone(job: QueuedJob, ctx: RenderContext): Promise<void> {
  if (ctx.signal.aborted) return;
  const started = performance.now();
  const written: Array<{ path: string; bytes: number }> = [];
  let info: RunInfo | undefined;
  try {
    await generate(job.entry.job, ctx.set.models, {
      signal: ctx.signal,
      ...(ctx.memoryBytes === undefined ? {} : { memoryBytes: ctx.memoryBytes }),
      onProgress: (p) => ctx.emit({ type: 'progress', jobIds: [job.id], evaluation: p.evaluation, evaluations: p.evaluations, batch: p.batch, batches: p.batches }),
      onImage: async (img, run) => {
        info = run;
        written.push(await saveImage(job, img, run, ctx.set));
      },
    });
  } catch (e) {
    if (ctx.signal.aborted) throw e;
    ctx.finish.failed(job, e);
    return;
  }
  ctx.finish.done(job, written, performance.now() - started, info!);
}

async function renderBatched(jobs: readonly QueuedJob[], ctx: RenderContext, maxBatch: number): Promise<void> {
  const started = performance.now();
  const prepared: PreparedJob[] = [];
  const jobOf = new Map<PreparedJob, QueuedJob>();
  const alone: QueuedJob[] = [];
  for (const job of jobs) {
    if (ctx.signal.aborted) return;
    try {
      const p = await prepareBatchJob(job.entry.job, ctx.set.models);
      if (p === undefined) alone.push(job);
      else {
        prepared.push(p);
        jobOf.set(p, job);
      }
    } catch (e) {
      ctx.finish.failed(job, e);
    }
  }
  for (const group of groupPreparedJobs(prepared, maxBatch)) {
    if (ctx.signal.aborted) return;
    const members = group.map((p) => jobOf.get(p)!);
    const finished = new Set<number>();
    try {
      await generateTogether(group, ctx.set.models, {
        signal: ctx.signal,
        onProgress: (p) => ctx.emit({ type: 'progress', jobIds: members.map((m) => m.id), evaluation: p.evaluation, evaluations: p.evaluations, batch: 0, batches: 1 }),
        onImage: async (j, img, run) => {
          const job = members[j]!;
          const file = await saveImage(job, img, run, ctx.set);
          finished.add(job.id);
          ctx.finish.done(job, [file], performance.now() - started, run);
        },
      });
    } catch (e) {
      if (ctx.signal.aborted) throw e;
      // The shared loop failed (not one job's input: those failed in preparation): try each alone.
      for (const job of members) if (!finished.has(job.id)) await renderAlone(job, ctx);
    }
  }
  for (const job of alone) await renderAlone(job, ctx);
}
