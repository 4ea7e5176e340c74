/**
 * A job file as a queue batch: `chorus batch jobs.jsonl [--grid …] [--out …]`.
 *
 * The batch's identity is the command: the job file (its path and its content), the grid spec, the
 * output pattern and the output folder. Running the same command again finds the batch in the queue
 * and resumes it (same jobs, same seeds, same files) instead of queueing it twice. Without `--out`
 * the folder is `outputs/<file stem>-<8 hex of that identity>`, so it is the same folder again.
 *
 * A NEW batch refuses to overwrite: if a file it would write exists, or another job in the queue
 * will write it, it fails with `OUTPUT_EXISTS` before queueing anything.
 */
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { PipelineError } from '../errors.ts';
import { writeFileAtomic } from '../images/save.ts';
import { batchKey } from '../jobs/batched.ts';
import { composeGridImage, expandGrid, parseGridSpec, type GridImagePlan } from '../jobs/grid.ts';
import { parseJobSpec, readJobLines, type JobEntry } from '../jobs/schema.ts';
import { QueueError } from './errors.ts';
import { DEFAULT_OUTPUT_PATTERN, planOutputs, removeStaleTemps, validateOutputPattern, type PlannedOutput } from './outputs.ts';
import type { BatchRecord, EnqueueJob, JobQueue } from './store.ts';

/** Hex digits of the batch identity in the default output folder name. */
const FOLDER_KEY_CHARS = 8;

export interface BatchOptions {
  /** `--grid` spec (grid.ts). */
  readonly grid?: string;
  /** Output folder (default `outputs/<stem>-<key>` under `cwd`). */
  readonly outDir?: string;
  /** File-name pattern for jobs without their own `output` (default `{index}-{seed}.png`). */
  readonly output?: string;
  /** Folder relative paths resolve against (default `process.cwd()`). */
  readonly cwd?: string;
}

/** What the batch keeps besides its jobs: the grid images to assemble once their jobs finish. */
interface BatchExtra {
  readonly grids: ReadonlyArray<Omit<GridImagePlan, 'cells'> & { readonly positions: readonly number[] }>;
}

export interface BatchPlan {
  readonly key: string;
  /** The job file, absolute. */
  readonly source: string;
  readonly outDir: string;
  readonly jobs: readonly EnqueueJob[];
  readonly extra: BatchExtra;
}

function sha256(text: string): string {
  return createHash('sha256').update(text).digest('hex');
}

/**
 * Read, expand and validate a job file into a batch plan. Throws `PipelineError` with `file:line`
 * and the field path for an invalid job, `BAD_ARGUMENT` naming the field for a bad grid or pattern.
 * Seeds of −1 are drawn here: a plan is queued once, then the queue's copy is the truth.
 */
export function planBatch(file: string, options: BatchOptions = {}): BatchPlan {
  const cwd = options.cwd ?? process.cwd();
  const source = path.resolve(cwd, file);
  const pattern = options.output ?? DEFAULT_OUTPUT_PATTERN;
  validateOutputPattern(pattern);
  const { text, lines } = readJobLines(source);
  const grid = options.grid === undefined ? undefined : parseGridSpec(options.grid);
  const identity = sha256(JSON.stringify([source, sha256(text), options.grid ?? '', pattern]));
  const outDir = path.resolve(cwd, options.outDir ?? path.join('outputs', `${path.basename(source).replace(/\.[^.]*$/, '')}-${identity.slice(0, FOLDER_KEY_CHARS)}`));
  const key = sha256(JSON.stringify([identity, outDir]));
  const baseDir = path.dirname(source);

  const expanded = grid === undefined ? { jobs: lines.map((l) => ({ line: l, spec: l.spec, note: undefined, labels: undefined })), images: [] as GridImagePlan[] } : expandWithLines(lines, grid);
  const seen = new Map<string, number>();
  const jobs = expanded.jobs.map((x, i): EnqueueJob => {
    const position = i + 1;
    const entry: JobEntry = parseJobSpec(x.spec, { baseDir, source: { file, line: x.line.line, ...(x.note === undefined ? {} : { note: x.note }) } });
    let outputs: PlannedOutput[];
    try {
      outputs = planOutputs(entry.job, { pattern: entry.output ?? pattern, outDir, position, ...(entry.name === undefined ? {} : { name: entry.name }), ...(x.labels === undefined ? {} : { grid: x.labels }) });
    } catch (e) {
      if (e instanceof PipelineError && entry.output !== undefined) throw new PipelineError(e.code, `${file}:${x.line.line}: ${e.message}`, { ...e.details, file, line: x.line.line });
      throw e;
    }
    for (const o of outputs) {
      const other = seen.get(o.path);
      if (other !== undefined) {
        throw new PipelineError('BAD_ARGUMENT', `${file}:${x.line.line}: output: job ${position} and job ${other} would both write ${path.relative(outDir, o.path)}; add {index} or {seed} to the pattern.`, { field: 'output', file, line: x.line.line });
      }
      seen.set(o.path, position);
    }
    const key = batchKey(entry.job);
    return { entry, position, outputs, ...(key === undefined ? {} : { batchKey: key }), ...(x.labels === undefined ? {} : { grid: x.labels }) };
  });
  const grids = expanded.images.map(({ cells, ...rest }) => ({ ...rest, positions: cells.map((c) => c + 1) }));
  return { key, source, outDir, jobs, extra: { grids } };
}

/** Grid jobs come line by line, the same number per line: job i belongs to line ⌊i / perLine⌋. */
function expandWithLines(lines: ReturnType<typeof readJobLines>['lines'], grid: ReturnType<typeof parseGridSpec>) {
  const { jobs, images } = expandGrid(lines.map((l) => l.spec), grid);
  const perLine = jobs.length / lines.length;
  return { jobs: jobs.map((j, i) => ({ line: lines[Math.floor(i / perLine)]!, spec: j.spec, note: j.note, labels: j.labels })), images };
}

/**
 * The plan's batch in the queue: the existing one (same identity: resume) or a new one. A new batch
 * throws `QueueError('OUTPUT_EXISTS')` when a file it would write exists or is planned by another
 * queued job.
 */
export function openBatch(queue: JobQueue, plan: BatchPlan): { batch: BatchRecord; created: boolean } {
  const existing = queue.findBatch(plan.key);
  if (existing !== undefined) return { batch: existing, created: false };
  const files = plan.jobs.flatMap((j) => j.outputs.map((o) => o.path));
  const onDisk = files.find((f) => fs.existsSync(f));
  if (onDisk !== undefined) {
    throw new QueueError('OUTPUT_EXISTS', `${onDisk} exists; this job file (or its grid) changed since the batch that wrote it. Choose another --out folder, or move the old files away.`, { file: onDisk });
  }
  const busy = queue.pathsInFlight(files)[0];
  if (busy !== undefined) throw new QueueError('OUTPUT_EXISTS', `${busy.path} will be written by queued job ${busy.jobId}; choose another --out folder.`, { file: busy.path, job: busy.jobId });
  const { batchId } = queue.enqueue(plan.jobs, { key: plan.key, source: plan.source, outDir: plan.outDir, extra: plan.extra });
  return { batch: queue.getBatch(batchId!), created: true };
}

/**
 * Assemble the batch's grid images whose jobs have all finished (done, failed or cancelled; at least
 * one done) and that do not exist yet. Written atomically; returns the files written.
 */
export async function composeBatchGrids(queue: JobQueue, batchId: number): Promise<string[]> {
  const batch = queue.getBatch(batchId);
  const extra = batch.extra as BatchExtra | undefined;
  if (extra === undefined || extra.grids.length === 0) return [];
  const byPosition = new Map(queue.list({ batchId }).map((j) => [j.position, j]));
  const written: string[] = [];
  for (const grid of extra.grids) {
    const file = path.join(batch.outDir, grid.file);
    removeStaleTemps([file]);
    if (fs.existsSync(file)) continue;
    const cells = grid.positions.map((p) => byPosition.get(p));
    if (cells.some((j) => j === undefined || j.state === 'queued' || j.state === 'running' || j.state === 'paused') || !cells.some((j) => j?.state === 'done')) continue;
    const images = cells.map((j) => {
      const first = j?.state === 'done' ? j.outputs[0] : undefined;
      return first !== undefined && fs.existsSync(first.path) ? new Uint8Array(fs.readFileSync(first.path)) : undefined;
    });
    const { png } = await composeGridImage({ title: grid.title, columns: grid.columns, rows: grid.rows, cells: images });
    writeFileAtomic(file, png);
    written.push(file);
  }
  return written;
}
