/**
 * `chorus queue`: look at and steer the durable queue that `chorus batch` (and the app) render from.
 * Works while a batch is running in another process: cancel and pause reach a running job within
 * about a second.
 */
import { JOB_STATES, JobQueue, type ControlResult, type JobState, type QueuedJob } from '../../pipelines/index.ts';
import { UsageError, parse } from '../args.ts';

export const QUEUE_HELP = `chorus queue — the batch queue

  chorus queue list [--batch <id>] [--state queued,running,…] [--json]
  chorus queue show <job id>             settings, files, error and log of one job
  chorus queue cancel <job id…> | --batch <id>
  chorus queue retry <job id…> | --batch <id>      failed and cancelled jobs run again (same seed, same files)
  chorus queue pause [<job id…> | --batch <id>]    without ids: no runner starts a new job until resume
  chorus queue resume [<job id…> | --batch <id>]

  --db <file>   queue database (default: queue.sqlite in CHORUS_DATA_DIR or ~/.local/share/chorus)
`;

const PROMPT_CHARS = 40;

function ids(values: string[]): number[] {
  return values.map((v) => {
    const n = Number(v);
    if (!Number.isInteger(n) || n < 1) throw new UsageError(`a job id is a whole number, got "${v}"`);
    return n;
  });
}

function batchId(value: string | undefined): number | undefined {
  if (value === undefined) return undefined;
  const n = Number(value);
  if (!Number.isInteger(n) || n < 1) throw new UsageError(`--batch must be a batch id (a whole number), got "${value}"`);
  return n;
}

function states(value: string | undefined): JobState[] | undefined {
  if (value === undefined) return undefined;
  return value.split(',').map((s) => {
    if (!(JOB_STATES as readonly string[]).includes(s)) throw new UsageError(`--state must be among ${JOB_STATES.join(', ')}, got "${s}"`);
    return s as JobState;
  });
}

function row(j: QueuedJob): string {
  const prompt = j.entry.job.prompt.length > PROMPT_CHARS ? `${j.entry.job.prompt.slice(0, PROMPT_CHARS - 1)}…` : j.entry.job.prompt;
  const detail = j.state === 'failed' ? `[${j.error?.code}] ${j.error?.message}` : j.state === 'done' ? (j.outputs[0]?.path ?? '') : j.state === 'running' ? `on ${j.owner}${j.request === undefined ? '' : ` (${j.request} requested)`}` : '';
  return [String(j.id).padStart(5), String(j.batchId ?? '-').padStart(5), String(j.position).padStart(5), j.state.padEnd(9), String(j.priority).padStart(4), String(j.attempts).padStart(5), `${JSON.stringify(prompt)} ${detail}`].join(' ');
}

function report(results: readonly ControlResult[], verb: string): void {
  for (const r of results) {
    const text = r.outcome === 'unchanged' ? `job ${r.id}: ${r.state}, not ${verb}` : r.outcome === 'requested' ? `job ${r.id}: running; ${verb} requested (its runner stops it)` : `job ${r.id}: ${r.outcome}`;
    process.stdout.write(`${text}\n`);
  }
}

export async function runQueueCommand(argv: readonly string[]): Promise<number> {
  const [sub, ...rest] = argv;
  const { values, positionals } = parse(rest, { db: { type: 'string' }, batch: { type: 'string' }, state: { type: 'string' }, json: { type: 'boolean' }, help: { type: 'boolean' } });
  if (sub === undefined || sub === 'help' || sub === '--help' || values.help === true) {
    process.stdout.write(QUEUE_HELP);
    return 0;
  }
  const queue = JobQueue.open(values.db === undefined ? {} : { file: values.db });
  try {
    const batch = batchId(values.batch);
    /** The jobs a control command acts on: the ids given, or the whole batch (in some states). */
    const targets = (from: readonly JobState[]): number[] => {
      if (positionals.length > 0 && batch !== undefined) throw new UsageError(`give job ids or --batch, not both`);
      if (batch !== undefined) {
        queue.getBatch(batch);
        return queue.list({ batchId: batch, states: from }).map((j) => j.id);
      }
      if (positionals.length === 0) throw new UsageError(`chorus queue ${sub} needs job ids or --batch <id>`);
      return ids(positionals);
    };
    switch (sub) {
      case 'list': {
        const jobs = queue.list({ ...(batch === undefined ? {} : { batchId: batch }), ...(values.state === undefined ? {} : { states: states(values.state)! }) });
        if (values.json === true) {
          process.stdout.write(`${JSON.stringify(jobs.map((j) => ({ id: j.id, batch: j.batchId, position: j.position, state: j.state, priority: j.priority, attempts: j.attempts, prompt: j.entry.job.prompt, outputs: j.outputs, error: j.error })))}\n`);
          return 0;
        }
        process.stdout.write(`${['   id', 'batch', '    #', 'state    ', ' pri', 'tries', 'prompt'].join(' ')}\n`);
        for (const j of jobs) process.stdout.write(`${row(j)}\n`);
        const c = queue.counts(batch);
        process.stdout.write(`${JOB_STATES.filter((s) => c[s] > 0).map((s) => `${c[s]} ${s}`).join(', ') || 'no jobs'}${queue.paused ? ' (queue paused)' : ''}\n`);
        return 0;
      }
      case 'show': {
        if (positionals.length !== 1) throw new UsageError('chorus queue show takes one job id');
        const job = queue.get(ids(positionals)[0]!);
        process.stdout.write(`${row(job)}\n`);
        for (const o of job.outputs) process.stdout.write(`  image ${o.image} seed ${o.seed}: ${o.path}${o.written ? '' : ' (not written)'}\n`);
        for (const l of queue.logs(job.id)) process.stdout.write(`  ${new Date(l.at).toISOString()} ${l.level.padEnd(5)} ${l.message}\n`);
        return 0;
      }
      case 'cancel':
        report(queue.cancel(targets(['queued', 'paused', 'running'])), 'cancelled');
        return 0;
      case 'retry':
        report(queue.retry(targets(['failed', 'cancelled'])), 'retried');
        return 0;
      case 'pause':
        if (positionals.length === 0 && batch === undefined) {
          queue.pauseAll();
          process.stdout.write('queue paused: running jobs finish, no new job starts until `chorus queue resume`.\n');
          return 0;
        }
        report(queue.pause(targets(['queued', 'running'])), 'paused');
        return 0;
      case 'resume':
        if (positionals.length === 0 && batch === undefined) {
          queue.resumeAll();
          process.stdout.write('queue resumed.\n');
          return 0;
        }
        report(queue.resume(targets(['paused'])), 'resumed');
        return 0;
      default:
        throw new UsageError(`unknown queue command "${sub}" (list, show, cancel, retry, pause, resume)`);
    }
  } finally {
    queue.dispose();
  }
}
