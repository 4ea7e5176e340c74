/**
 * `chorus batch jobs.jsonl`: render a job file through the durable queue. Running the same command
 * again (after a crash, Ctrl-C or a reboot) resumes the same batch and writes into the same folder.
 */
import * as path from 'node:path';
import { DEFAULT_MAX_BATCH, JobQueue, composeBatchGrids, engineModelSource, openBatch, planBatch, runQueue, type QueuedJob, type RunnerEvent } from '../../pipelines/index.ts';
import { MODEL_OPTIONS, UsageError, engineOptions, parse, parseMemorySize } from '../args.ts';

export const BATCH_HELP = `chorus batch — render a JSONL job file through the durable queue

  chorus batch <jobs.jsonl> [--grid "<field>=a,b; <field>=c,d"] [--out <folder>] [options]

  Each line of the file is one job (job spec v1, see README "Batch rendering"):
    {"model": "path", "prompt": "a cat", "seed": 1, "steps": 4, "width": 64, "height": 64}
  Relative paths in it are relative to the file. Running the same command again resumes the batch
  (same jobs, seeds and file names); finished jobs are not rendered twice.

  --grid <spec>        X/Y/Z grid over every job line: up to 3 axes "field=v1,v2,…" separated by ";"
                       (e.g. "loras[0].unet=0.4,0.8; strategy=plain,composite"); writes grid-NNN.png too
  --out <folder>       output folder (default ./outputs/<file name>-<8 hex of the batch>)
  --output <pattern>   file names of jobs without their own "output": tokens {index} {image} {seed}
                       {job} {model} {x} {y} {z} (default {index}-{seed}.png)
  --max-batch <n>      jobs that differ only in prompt, LoRAs, CFG or seed share one UNet batch, up to n
                       (default ${DEFAULT_MAX_BATCH}; 1 renders one job at a time)
  --memory <size>      the RAM to plan each job's batches and sessions for (e.g. 12G; default: all of it)
  --db <file>          queue database (default: queue.sqlite in CHORUS_DATA_DIR or ~/.local/share/chorus)
  --lora-dir <folder>  where LoRAs are looked up by name (repeatable; also CHORUS_LORA_DIRS)
  --json               progress as JSON lines on stdout (for scripts)
  --device, --config, --tokenizer, --cache, --threads: see chorus --help
`;

function positiveInt(flag: string, value: string | undefined, fallback: number): number {
  if (value === undefined) return fallback;
  const n = Number(value);
  if (!Number.isInteger(n) || n < 1) throw new UsageError(`${flag} must be a whole number ≥ 1, got "${value}"`);
  return n;
}

function clock(seconds: number): string {
  const s = Math.max(0, Math.round(seconds));
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const mm = String(m).padStart(h > 0 ? 2 : 1, '0');
  return `${h > 0 ? `${h}:` : ''}${mm}:${String(s % 60).padStart(2, '0')}`;
}

/** Progress: a bar for the running job(s) and the overall ETA on a TTY; a line per finished job otherwise; JSON lines with --json. */
function progressDisplay(total: number, doneBefore: number, json: boolean): { event(e: RunnerEvent): void; end(): void } {
  const tty = process.stderr.isTTY === true && !json;
  const started = Date.now();
  let finished = 0;
  let current: readonly QueuedJob[] = [];
  const label = (jobs: readonly QueuedJob[]) =>
    jobs.length === 1 ? `job ${jobs[0]!.position}` : `jobs ${jobs.map((j) => j.position).join(',')} (batched ×${jobs.length})`;
  const eta = () => {
    const left = total - doneBefore - finished;
    if (finished === 0) return 'ETA …';
    return `ETA ${clock((((Date.now() - started) / 1000) * left) / finished)}`;
  };
  const status = () => `[${doneBefore + finished}/${total}]`;
  const line = (text: string) => process.stderr.write(tty ? `\r\x1b[K${text}\n` : `${text}\n`);
  return {
    event(e) {
      if (json) {
        const base = { event: e.type, at: Date.now() };
        const record =
          e.type === 'started' ? { ...base, jobs: e.jobs.map((j) => j.id) }
          : e.type === 'progress' ? { ...base, jobs: e.jobIds, evaluation: e.evaluation + 1, evaluations: e.evaluations }
          : e.type === 'done' ? { ...base, job: e.job.id, position: e.job.position, files: e.files, ms: Math.round(e.ms) }
          : e.type === 'failed' ? { ...base, job: e.job.id, position: e.job.position, error: e.error }
          : { ...base, job: e.job.id, position: e.job.position, state: e.state };
        process.stdout.write(`${JSON.stringify(record)}\n`);
      }
      switch (e.type) {
        case 'recovered':
          if (!json) line(`job ${e.job.position}: its runner stopped while running it; ${e.state === 'queued' ? 're-queued' : e.state}`);
          return;
        case 'started':
          current = e.jobs;
          return;
        case 'progress': {
          if (!tty) return;
          const width = 24;
          const fraction = (e.batch + (e.evaluation + 1) / e.evaluations) / e.batches;
          const filled = Math.round(fraction * width);
          process.stderr.write(`\r\x1b[K${status()} ${label(current)} [${'#'.repeat(filled)}${'-'.repeat(width - filled)}] step ${e.evaluation + 1}/${e.evaluations} · ${eta()}`);
          return;
        }
        case 'done':
          finished++;
          if (!json) line(`${status()} job ${e.job.position} done in ${(e.ms / 1000).toFixed(1)} s → ${e.files.map((f) => path.basename(f)).join(', ')} · ${eta()}`);
          return;
        case 'failed':
          finished++;
          if (!json) line(`${status()} job ${e.job.position} failed: [${e.error.code}] ${e.error.message}`);
          return;
        case 'stopped':
          if (!json) line(`job ${e.job.position}: ${e.state === 'queued' ? 'stopped, back in the queue' : e.state}`);
          return;
      }
    },
    end() {
      if (tty) process.stderr.write('\r\x1b[K');
    },
  };
}

export async function runBatch(argv: readonly string[]): Promise<number> {
  const { values, positionals } = parse(argv, {
    ...MODEL_OPTIONS,
    grid: { type: 'string' },
    out: { type: 'string' },
    output: { type: 'string' },
    db: { type: 'string' },
    'max-batch': { type: 'string' },
    memory: { type: 'string' },
    'lora-dir': { type: 'string', multiple: true },
    json: { type: 'boolean' },
    help: { type: 'boolean' },
  });
  if (values.help === true) {
    process.stdout.write(BATCH_HELP);
    return 0;
  }
  if (values.model !== undefined) throw new UsageError('chorus batch takes the model from each job line ("model"), not --model');
  if (positionals.length !== 1) throw new UsageError(`chorus batch takes one job file, got ${positionals.length === 0 ? 'none' : positionals.join(' ')}`);
  const maxBatch = positiveInt('--max-batch', values['max-batch'], DEFAULT_MAX_BATCH);
  const memoryBytes = values.memory === undefined ? undefined : parseMemorySize('--memory', values.memory);
  const json = values.json === true;
  const engine = engineOptions(values);

  const plan = planBatch(positionals[0]!, {
    ...(values.grid === undefined ? {} : { grid: values.grid }),
    ...(values.out === undefined ? {} : { outDir: values.out }),
    ...(values.output === undefined ? {} : { output: values.output }),
  });
  const queue = JobQueue.open(values.db === undefined ? {} : { file: values.db });
  const source = engineModelSource({ engine, loraDirs: values['lora-dir'] ?? [] });
  const interrupt = new AbortController();
  const onSignal = () => interrupt.abort();
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);
  try {
    const { batch, created } = openBatch(queue, plan);
    const before = queue.counts(batch.id);
    const total = Object.values(before).reduce((a, b) => a + b, 0);
    process.stderr.write(
      `batch ${batch.id} (${created ? 'new' : 'resumed'}): ${total} job${total === 1 ? '' : 's'}, ${before.done} done, ${before.queued + before.running} to run${before.failed > 0 ? `, ${before.failed} failed` : ''} → ${batch.outDir}\n`,
    );
    const display = progressDisplay(total, before.done + before.failed + before.cancelled, json);
    const summary = await runQueue({ queue, source, batchId: batch.id, maxBatch, ...(memoryBytes === undefined ? {} : { memoryBytes }), signal: interrupt.signal, onEvent: (e) => display.event(e) });
    display.end();
    const grids = await composeBatchGrids(queue, batch.id);
    const after = queue.counts(batch.id);
    if (!json) for (const g of grids) process.stdout.write(`${g}\n`);
    process.stderr.write(`batch ${batch.id}: ${after.done}/${total} done${after.failed > 0 ? `, ${after.failed} failed` : ''}${after.cancelled > 0 ? `, ${after.cancelled} cancelled` : ''}${after.paused > 0 ? `, ${after.paused} paused` : ''} → ${batch.outDir}\n`);
    if (summary.reason === 'signal') {
      process.stderr.write('interrupted: run the same command again to resume.\n');
      return 130;
    }
    if (summary.reason === 'paused') process.stderr.write('the queue is paused (chorus queue resume); run the same command again to go on.\n');
    if (after.running > 0) process.stderr.write(`${after.running} job${after.running === 1 ? ' is' : 's are'} running in another process.\n`);
    if (after.failed > 0) {
      for (const j of queue.list({ batchId: batch.id, states: ['failed'] })) process.stderr.write(`  job ${j.position} (id ${j.id}): [${j.error?.code}] ${j.error?.message}\n`);
      process.stderr.write(`retry them with: chorus queue retry --batch ${batch.id}${values.db === undefined ? '' : ` --db ${values.db}`}\n`);
      return 1;
    }
    return 0;
  } finally {
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
    await source.dispose();
    queue.dispose();
  }
}
