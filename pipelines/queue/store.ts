/**
 * The durable job queue: one SQLite database file (WAL mode) in the user's data folder, shared by
 * every process that renders or inspects jobs (`chorus batch`, `chorus queue`, the app).
 *
 * Job states (`JobState`):
 *
 *   queued ──claim──▶ running ──complete──▶ done
 *     ▲  │              │ └──fail──────────▶ failed ──retry──▶ queued
 *     │  │              ├──cancel request──▶ cancelled ──retry──▶ queued
 *     │  └─pause──▶ paused ◀─pause request─┤
 *     └──resume──────┘                      └──release / owner died──▶ queued
 *
 * Crash safety rests on three rules:
 * 1. Ownership is a lease. A runner claims jobs in one write transaction, stamping its owner (host,
 *    pid, a random token) and `lease_until`, and renews the lease while it works (`heartbeat`).
 *    `recoverStale` re-queues a running job when its owner is a process of this host that no longer
 *    exists (at once), or when its lease has expired (another host; on this host, a live pid gets
 *    `SAME_HOST_GRACE_MS` more). A live runner's jobs are never taken, even by a second runner
 *    started at the same moment.
 * 2. A job's files are named when it is queued (`outputs.ts`), written to a temp file and renamed
 *    into place first, then `complete` marks the job done and records the files in ONE transaction,
 *    and only if this owner still holds it. A crash between rename and commit leaves a complete file
 *    that the re-run overwrites with the same bytes: never a duplicate, never a half-written PNG.
 * 3. Everything a user asks of a running job from another process (cancel, pause) is a `request`
 *    column the owner reads on its heartbeat; if the owner died, recovery applies the request.
 */
import { randomUUID } from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import Database from 'better-sqlite3';
import { parseJobSpec, serializeJobSpec, type JobEntry } from '../jobs/schema.ts';
import { QueueError } from './errors.ts';
import type { PlannedOutput } from './outputs.ts';

export type JobState = 'queued' | 'running' | 'done' | 'failed' | 'cancelled' | 'paused';
export const JOB_STATES: readonly JobState[] = ['queued', 'running', 'done', 'failed', 'cancelled', 'paused'];
/** What another process asked of a running job. */
export type JobRequest = 'cancel' | 'pause';

/** A job's recorded error (`code` from the typed error that failed it, or `INTERNAL`). */
export interface JobErrorRecord {
  readonly code: string;
  readonly message: string;
  readonly details?: Readonly<Record<string, unknown>>;
}

export interface QueuedJob {
  readonly id: number;
  readonly batchId: number | undefined;
  /** Number of the job in its batch, from 1 (the `{index}` output token). */
  readonly position: number;
  readonly state: JobState;
  readonly priority: number;
  readonly entry: JobEntry;
  /** The files it writes (fixed at queue time); `written` once the job is done. */
  readonly outputs: readonly (PlannedOutput & { readonly written: boolean })[];
  /** Jobs with the same key may run in one batched denoising loop (`jobs/batched.ts`). */
  readonly batchKey: string | undefined;
  /** How many times a runner started it. */
  readonly attempts: number;
  readonly error: JobErrorRecord | undefined;
  readonly request: JobRequest | undefined;
  /** `host/pid` of the runner holding it (running jobs). */
  readonly owner: string | undefined;
  readonly grid: { readonly x: string; readonly y: string; readonly z: string } | undefined;
  readonly createdAt: number;
  readonly startedAt: number | undefined;
  readonly finishedAt: number | undefined;
}

export interface BatchRecord {
  readonly id: number;
  /** Identity of the command that made it (same file, grid and output folder = same batch). */
  readonly key: string;
  readonly source: string;
  readonly outDir: string;
  /** Batch-level data the queue keeps for its creator (the grid images to assemble). */
  readonly extra: unknown;
  readonly createdAt: number;
}

export interface JobLogEntry {
  readonly at: number;
  readonly level: 'info' | 'warn' | 'error';
  readonly message: string;
}

/** What a runner is: the lease owner. */
export interface QueueOwner {
  readonly host: string;
  readonly pid: number;
  readonly token: string;
}

export interface EnqueueJob {
  readonly entry: JobEntry;
  readonly position: number;
  readonly outputs: readonly PlannedOutput[];
  readonly batchKey?: string;
  readonly grid?: { readonly x: string; readonly y: string; readonly z: string };
}

export interface NewBatch {
  readonly key: string;
  readonly source: string;
  readonly outDir: string;
  readonly extra?: unknown;
}

export interface ControlResult {
  readonly id: number;
  /** The state after the call; `requested` when a running job was asked to stop. */
  readonly outcome: JobState | 'requested' | 'unchanged';
  readonly state: JobState;
}

export interface JobQueueOptions {
  /** The database file (default: `defaultQueueFile()`). Its folder is created. */
  readonly file?: string;
  /** How long a claim stays valid without a heartbeat. */
  readonly leaseMs?: number;
  /** Clock (tests move time forward). */
  readonly now?: () => number;
  /** Who this process is as a lease owner (tests pose as another process). */
  readonly owner?: QueueOwner;
}

/**
 * A runner renews its lease about every second (runner.ts); 30 s without one means the process is
 * gone or wedged. Same-host owners are detected at once by their pid, so this only bounds how long a
 * job of a process on another machine (or a recycled pid) waits.
 */
export const DEFAULT_LEASE_MS = 30_000;
/**
 * A same-host owner whose process still exists keeps its jobs this long past its lease: it may be
 * blocked (converting a checkpoint's weights runs synchronously) rather than gone. Only a recycled
 * pid would keep a job that long.
 */
export const SAME_HOST_GRACE_MS = 10 * 60_000;
/** Wait this long for another process's write transaction before failing with SQLITE_BUSY. */
const BUSY_TIMEOUT_MS = 10_000;
const QUEUE_FILE = 'queue.sqlite';

/** `CHORUS_DATA_DIR`, else the platform's user data folder (XDG `~/.local/share/chorus` on Linux). */
export function defaultDataDir(): string {
  const env = process.env.CHORUS_DATA_DIR;
  if (env !== undefined && env !== '') return env;
  if (process.platform === 'win32') return path.join(process.env.LOCALAPPDATA ?? path.join(os.homedir(), 'AppData', 'Local'), 'Chorus');
  if (process.platform === 'darwin') return path.join(os.homedir(), 'Library', 'Application Support', 'Chorus');
  const xdg = process.env.XDG_DATA_HOME;
  return path.join(xdg !== undefined && xdg !== '' ? xdg : path.join(os.homedir(), '.local', 'share'), 'chorus');
}

export function defaultQueueFile(): string {
  return path.join(defaultDataDir(), QUEUE_FILE);
}

/**
 * Schema migrations, applied in order inside a transaction each; `schema_migrations` records which
 * ran. Never edit a shipped entry: append a new one.
 */
const MIGRATIONS: readonly string[] = [
  `CREATE TABLE batches (
     id INTEGER PRIMARY KEY AUTOINCREMENT,
     key TEXT NOT NULL UNIQUE,
     source TEXT NOT NULL,
     out_dir TEXT NOT NULL,
     extra TEXT,
     created_at INTEGER NOT NULL
   );
   CREATE TABLE jobs (
     id INTEGER PRIMARY KEY AUTOINCREMENT,
     batch_id INTEGER REFERENCES batches(id),
     position INTEGER NOT NULL,
     spec TEXT NOT NULL,
     state TEXT NOT NULL CHECK (state IN ('queued', 'running', 'done', 'failed', 'cancelled', 'paused')),
     priority INTEGER NOT NULL DEFAULT 0,
     batch_key TEXT,
     grid TEXT,
     attempts INTEGER NOT NULL DEFAULT 0,
     owner_host TEXT,
     owner_pid INTEGER,
     owner_token TEXT,
     lease_until INTEGER,
     request TEXT CHECK (request IN ('cancel', 'pause')),
     error TEXT,
     created_at INTEGER NOT NULL,
     started_at INTEGER,
     finished_at INTEGER
   );
   CREATE INDEX jobs_next ON jobs (state, priority DESC, id);
   CREATE INDEX jobs_batch ON jobs (batch_id, position);
   CREATE TABLE outputs (
     job_id INTEGER NOT NULL REFERENCES jobs(id),
     image INTEGER NOT NULL,
     seed TEXT NOT NULL,
     path TEXT NOT NULL,
     bytes INTEGER,
     written_at INTEGER,
     PRIMARY KEY (job_id, image)
   );
   CREATE INDEX outputs_path ON outputs (path);
   CREATE TABLE job_logs (
     id INTEGER PRIMARY KEY AUTOINCREMENT,
     job_id INTEGER NOT NULL REFERENCES jobs(id),
     at INTEGER NOT NULL,
     level TEXT NOT NULL,
     message TEXT NOT NULL
   );
   CREATE INDEX job_logs_job ON job_logs (job_id, id);
   CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);`,
];

interface JobRow {
  id: number;
  batch_id: number | null;
  position: number;
  spec: string;
  state: JobState;
  priority: number;
  batch_key: string | null;
  grid: string | null;
  attempts: number;
  owner_host: string | null;
  owner_pid: number | null;
  owner_token: string | null;
  lease_until: number | null;
  request: JobRequest | null;
  error: string | null;
  created_at: number;
  started_at: number | null;
  finished_at: number | null;
}

interface OutputRow {
  job_id: number;
  image: number;
  seed: string;
  path: string;
  written_at: number | null;
}

interface BatchRow {
  id: number;
  key: string;
  source: string;
  out_dir: string;
  extra: string | null;
  created_at: number;
}

/** Whether a process with this pid exists on this host (EPERM: it exists, owned by someone else). */
function processExists(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM';
  }
}

export class JobQueue {
  readonly file: string;
  readonly owner: QueueOwner;
  readonly leaseMs: number;
  readonly #db: Database.Database;
  readonly #now: () => number;
  readonly #requestListeners = new Set<(id: number, request: JobRequest) => void>();

  private constructor(file: string, db: Database.Database, options: JobQueueOptions) {
    this.file = file;
    this.#db = db;
    this.#now = options.now ?? Date.now;
    this.leaseMs = options.leaseMs ?? DEFAULT_LEASE_MS;
    this.owner = options.owner ?? { host: os.hostname(), pid: process.pid, token: randomUUID() };
  }

  /**
   * Open (creating if needed) a queue database and bring its schema up to date. Throws
   * `QueueError('QUEUE_DB_NEWER')` for a database from a newer Chorus, `QUEUE_DB_UNREADABLE` for a
   * file that is not one.
   */
  static open(options: JobQueueOptions = {}): JobQueue {
    const file = path.resolve(options.file ?? defaultQueueFile());
    fs.mkdirSync(path.dirname(file), { recursive: true });
    let db: Database.Database | undefined;
    try {
      db = new Database(file, { timeout: BUSY_TIMEOUT_MS });
      db.pragma('journal_mode = WAL');
      // FULL: a commit survives power loss too, not only a killed process; commits are per job.
      db.pragma('synchronous = FULL');
      db.pragma('foreign_keys = ON');
      migrate(db, file);
    } catch (e) {
      db?.close();
      if (e instanceof QueueError) throw e;
      throw new QueueError('QUEUE_DB_UNREADABLE', `${file} cannot be used as the job queue (${(e as Error).message}). Pass another file with --db, or move this one away.`, { file });
    }
    return new JobQueue(file, db, options);
  }

  dispose(): void {
    this.#requestListeners.clear();
    if (this.#db.open) this.#db.close();
  }

  // ---- batches and enqueueing ----

  findBatch(key: string): BatchRecord | undefined {
    const row = this.#db.prepare('SELECT * FROM batches WHERE key = ?').get(key) as BatchRow | undefined;
    return row === undefined ? undefined : batchOf(row);
  }

  getBatch(id: number): BatchRecord {
    const row = this.#db.prepare('SELECT * FROM batches WHERE id = ?').get(id) as BatchRow | undefined;
    if (row === undefined) throw new QueueError('JOB_NOT_FOUND', `no batch ${id} in ${this.file}; \`chorus queue list\` shows the batches.`, { batch: id });
    return batchOf(row);
  }

  /** Paths among `paths` that a queued, running or paused job will write. */
  pathsInFlight(paths: readonly string[]): Array<{ path: string; jobId: number }> {
    const stmt = this.#db.prepare(`SELECT o.path, o.job_id FROM outputs o JOIN jobs j ON j.id = o.job_id WHERE o.path = ? AND j.state IN ('queued', 'running', 'paused')`);
    return paths.flatMap((p) => (stmt.all(p) as Array<{ path: string; job_id: number }>).map((r) => ({ path: r.path, jobId: r.job_id })));
  }

  /**
   * Queue jobs, with their batch if given, in one transaction: all of them or none. The batch key is
   * unique: queueing the same batch twice throws (look it up with `findBatch` first).
   */
  enqueue(jobs: readonly EnqueueJob[], batch?: NewBatch): { batchId: number | undefined; ids: number[] } {
    const now = this.#now();
    const insertJob = this.#db.prepare(
      `INSERT INTO jobs (batch_id, position, spec, state, priority, batch_key, grid, created_at) VALUES (?, ?, ?, 'queued', ?, ?, ?, ?)`,
    );
    const insertOutput = this.#db.prepare('INSERT INTO outputs (job_id, image, seed, path) VALUES (?, ?, ?, ?)');
    return this.#db.transaction(() => {
      const batchId =
        batch === undefined
          ? undefined
          : Number(
              this.#db
                .prepare('INSERT INTO batches (key, source, out_dir, extra, created_at) VALUES (?, ?, ?, ?, ?)')
                .run(batch.key, batch.source, batch.outDir, batch.extra === undefined ? null : JSON.stringify(batch.extra), now).lastInsertRowid,
            );
      const ids = jobs.map((j) => {
        const spec = JSON.stringify(serializeJobSpec(j.entry));
        const id = Number(insertJob.run(batchId ?? null, j.position, spec, j.entry.priority, j.batchKey ?? null, j.grid === undefined ? null : JSON.stringify(j.grid), now).lastInsertRowid);
        for (const o of j.outputs) insertOutput.run(id, o.image, o.seed, o.path);
        this.#log(id, 'info', 'queued');
        return id;
      });
      return { batchId, ids };
    }).immediate();
  }

  // ---- reading ----

  get(id: number): QueuedJob {
    const row = this.#db.prepare('SELECT * FROM jobs WHERE id = ?').get(id) as JobRow | undefined;
    if (row === undefined) throw new QueueError('JOB_NOT_FOUND', `no job ${id} in ${this.file}; \`chorus queue list\` shows the jobs.`, { job: id });
    return this.#jobOf(row);
  }

  /** Jobs in id order, optionally of one batch and in some states. */
  list(filter: { batchId?: number; states?: readonly JobState[] } = {}): QueuedJob[] {
    const where: string[] = [];
    const args: unknown[] = [];
    if (filter.batchId !== undefined) {
      where.push('batch_id = ?');
      args.push(filter.batchId);
    }
    if (filter.states !== undefined) {
      where.push(`state IN (${filter.states.map(() => '?').join(', ')})`);
      args.push(...filter.states);
    }
    const rows = this.#db.prepare(`SELECT * FROM jobs ${where.length === 0 ? '' : `WHERE ${where.join(' AND ')}`} ORDER BY id`).all(...args) as JobRow[];
    return rows.map((r) => this.#jobOf(r));
  }

  /** Jobs per state (every state present, 0 when none). */
  counts(batchId?: number): Record<JobState, number> {
    const rows = this.#db.prepare(`SELECT state, COUNT(*) AS n FROM jobs ${batchId === undefined ? '' : 'WHERE batch_id = ?'} GROUP BY state`).all(...(batchId === undefined ? [] : [batchId])) as Array<{ state: JobState; n: number }>;
    const out = Object.fromEntries(JOB_STATES.map((s) => [s, 0])) as Record<JobState, number>;
    for (const r of rows) out[r.state] = r.n;
    return out;
  }

  logs(id: number): JobLogEntry[] {
    this.get(id);
    return this.#db.prepare('SELECT at, level, message FROM job_logs WHERE job_id = ? ORDER BY id').all(id) as JobLogEntry[];
  }

  /** Add a line to a job's log. */
  log(id: number, level: JobLogEntry['level'], message: string): void {
    this.#log(id, level, message);
  }

  // ---- control (any process) ----

  /** Queued or paused jobs become cancelled; running ones get a cancel request their runner acts on. */
  cancel(ids: readonly number[]): ControlResult[] {
    return ids.map((id) => this.#control(id, 'cancel'));
  }

  /** Queued jobs become paused (skipped until resumed); running ones get a pause request (they restart from the beginning when resumed). */
  pause(ids: readonly number[]): ControlResult[] {
    return ids.map((id) => this.#control(id, 'pause'));
  }

  /** Paused jobs go back to the queue. */
  resume(ids: readonly number[]): ControlResult[] {
    return ids.map((id) => this.#transition(id, ['paused'], 'queued', 'resumed'));
  }

  /** Failed and cancelled jobs go back to the queue (same files, same seed). */
  retry(ids: readonly number[]): ControlResult[] {
    return ids.map((id) => this.#transition(id, ['failed', 'cancelled'], 'queued', 'retry: queued again'));
  }

  /** Stop every runner from starting new jobs (running ones finish). */
  pauseAll(): void {
    this.#db.prepare(`INSERT INTO settings (key, value) VALUES ('paused', '1') ON CONFLICT (key) DO UPDATE SET value = '1'`).run();
  }

  resumeAll(): void {
    this.#db.prepare(`DELETE FROM settings WHERE key = 'paused'`).run();
  }

  get paused(): boolean {
    return this.#db.prepare(`SELECT 1 FROM settings WHERE key = 'paused'`).get() !== undefined;
  }

  /** Be told at once when this process asks one of its own running jobs to stop (other processes are seen on the heartbeat). */
  onRequest(listener: (id: number, request: JobRequest) => void): () => void {
    this.#requestListeners.add(listener);
    return () => this.#requestListeners.delete(listener);
  }

  // ---- the runner's side ----

  /**
   * Re-queue running jobs whose owner is gone: lease expired, or a process of this host that no
   * longer exists. A pending cancel or pause request is applied instead. Returns what it changed.
   */
  recoverStale(): Array<{ job: QueuedJob; state: JobState }> {
    const now = this.#now();
    return this.#db.transaction(() => {
      const rows = this.#db.prepare(`SELECT * FROM jobs WHERE state = 'running' AND (owner_token IS NULL OR owner_token != ?)`).all(this.owner.token) as JobRow[];
      const stale = rows.filter((r) => {
        const lease = r.lease_until ?? 0;
        const sameHost = r.owner_host === this.owner.host && r.owner_pid !== null;
        if (sameHost && r.owner_pid !== this.owner.pid && !processExists(r.owner_pid!)) return true;
        return sameHost ? lease + SAME_HOST_GRACE_MS < now : lease < now;
      });
      return stale.map((r) => {
        const state: JobState = r.request === 'cancel' ? 'cancelled' : r.request === 'pause' ? 'paused' : 'queued';
        this.#db.prepare(`UPDATE jobs SET state = ?, request = NULL, owner_host = NULL, owner_pid = NULL, owner_token = NULL, lease_until = NULL, finished_at = ? WHERE id = ?`).run(state, state === 'cancelled' ? now : null, r.id);
        const who = `${r.owner_host ?? '?'} pid ${r.owner_pid ?? '?'}`;
        const why = r.owner_host === this.owner.host && r.owner_pid !== null && r.owner_pid !== this.owner.pid && !processExists(r.owner_pid) ? 'that process no longer exists' : 'its lease expired';
        this.#log(r.id, 'warn', `the runner (${who}) stopped while running it (${why}): ${state === 'queued' ? 're-queued' : state}`);
        return { job: this.get(r.id), state };
      });
    }).immediate();
  }

  /**
   * Take the next queued job (highest priority, then oldest) and, when it has a batch key, up to
   * `maxJobs − 1` more queued jobs with the same key and priority. Empty when nothing is queued or
   * the queue is paused. One write transaction, so two runners never take the same job.
   */
  claim(options: { batchId?: number; maxJobs?: number } = {}): QueuedJob[] {
    const now = this.#now();
    const inBatch = options.batchId === undefined ? '' : 'AND batch_id = ?';
    const batchArgs = options.batchId === undefined ? [] : [options.batchId];
    return this.#db.transaction(() => {
      if (this.paused) return [];
      const first = this.#db.prepare(`SELECT * FROM jobs WHERE state = 'queued' ${inBatch} ORDER BY priority DESC, id LIMIT 1`).get(...batchArgs) as JobRow | undefined;
      if (first === undefined) return [];
      const more =
        first.batch_key === null || (options.maxJobs ?? 1) <= 1
          ? []
          : (this.#db
              .prepare(`SELECT * FROM jobs WHERE state = 'queued' AND batch_key = ? AND priority = ? AND id != ? ${inBatch} ORDER BY id LIMIT ?`)
              .all(first.batch_key, first.priority, first.id, ...batchArgs, (options.maxJobs ?? 1) - 1) as JobRow[]);
      const take = this.#db.prepare(
        `UPDATE jobs SET state = 'running', owner_host = ?, owner_pid = ?, owner_token = ?, lease_until = ?, attempts = attempts + 1, started_at = ?, finished_at = NULL, request = NULL, error = NULL WHERE id = ? AND state = 'queued'`,
      );
      return [first, ...more].map((r) => {
        take.run(this.owner.host, this.owner.pid, this.owner.token, now + this.leaseMs, now, r.id);
        this.#log(r.id, 'info', `started (attempt ${r.attempts + 1}) by ${this.owner.host} pid ${this.owner.pid}`);
        return this.get(r.id);
      });
    }).immediate();
  }

  /**
   * Renew the lease on jobs this owner runs. Per job: `ok`, a pending request (`cancel`/`pause`), or
   * `lost` when the job is no longer this owner's (recovered by another process after a stall).
   */
  heartbeat(ids: readonly number[]): Map<number, 'ok' | JobRequest | 'lost'> {
    const until = this.#now() + this.leaseMs;
    const renew = this.#db.prepare(`UPDATE jobs SET lease_until = ? WHERE id = ? AND owner_token = ? AND state = 'running' RETURNING request`);
    return this.#db.transaction(() => new Map(ids.map((id) => {
      const row = renew.get(until, id, this.owner.token) as { request: JobRequest | null } | undefined;
      return [id, row === undefined ? 'lost' : row.request ?? 'ok'] as const;
    }))).immediate();
  }

  /**
   * Mark a job done and record its written files, in one transaction, if this owner still holds it.
   * Returns false (and changes nothing) when it does not.
   */
  complete(id: number, written: ReadonlyArray<{ image: number; bytes: number }>, note?: string): boolean {
    const now = this.#now();
    return this.#db.transaction(() => {
      const r = this.#db.prepare(`UPDATE jobs SET state = 'done', finished_at = ?, owner_host = NULL, owner_pid = NULL, owner_token = NULL, lease_until = NULL, request = NULL WHERE id = ? AND owner_token = ? AND state = 'running'`).run(now, id, this.owner.token);
      if (r.changes === 0) return false;
      const record = this.#db.prepare('UPDATE outputs SET bytes = ?, written_at = ? WHERE job_id = ? AND image = ?');
      for (const w of written) record.run(w.bytes, now, id, w.image);
      this.#log(id, 'info', `done${note === undefined ? '' : `: ${note}`}`);
      return true;
    }).immediate();
  }

  /** Record a failure (state `failed`), if this owner holds the job. */
  fail(id: number, error: JobErrorRecord): boolean {
    return this.#finish(id, 'failed', `failed: [${error.code}] ${error.message}`, JSON.stringify(error));
  }

  /** A running job stopped on request becomes cancelled or paused. */
  settle(id: number, request: JobRequest): boolean {
    return this.#finish(id, request === 'cancel' ? 'cancelled' : 'paused', request === 'cancel' ? 'cancelled while running' : 'paused while running');
  }

  /** Give a running job back to the queue (interrupted: it starts again from the beginning). */
  release(id: number, reason: string): boolean {
    return this.#finish(id, 'queued', `re-queued: ${reason}`);
  }

  #finish(id: number, state: JobState, message: string, error?: string): boolean {
    const now = this.#now();
    return this.#db.transaction(() => {
      const r = this.#db
        .prepare(`UPDATE jobs SET state = ?, error = ?, finished_at = ?, owner_host = NULL, owner_pid = NULL, owner_token = NULL, lease_until = NULL, request = NULL WHERE id = ? AND owner_token = ? AND state = 'running'`)
        .run(state, error ?? null, state === 'queued' ? null : now, id, this.owner.token);
      if (r.changes === 0) return false;
      this.#log(id, state === 'failed' ? 'error' : 'info', message);
      return true;
    }).immediate();
  }

  #control(id: number, request: JobRequest): ControlResult {
    const target: JobState = request === 'cancel' ? 'cancelled' : 'paused';
    const result = this.#db.transaction((): ControlResult => {
      const job = this.get(id);
      if (job.state === 'queued' || (request === 'cancel' && job.state === 'paused')) {
        this.#db.prepare(`UPDATE jobs SET state = ?, finished_at = ? WHERE id = ?`).run(target, target === 'cancelled' ? this.#now() : null, id);
        this.#log(id, 'info', target);
        return { id, outcome: target, state: target };
      }
      if (job.state === 'running') {
        this.#db.prepare('UPDATE jobs SET request = ? WHERE id = ?').run(request, id);
        this.#log(id, 'info', `${request} requested`);
        return { id, outcome: 'requested', state: 'running' };
      }
      return { id, outcome: 'unchanged', state: job.state };
    }).immediate();
    if (result.outcome === 'requested') for (const l of this.#requestListeners) l(id, request);
    return result;
  }

  #transition(id: number, from: readonly JobState[], to: JobState, message: string): ControlResult {
    return this.#db.transaction((): ControlResult => {
      const job = this.get(id);
      if (!from.includes(job.state)) return { id, outcome: 'unchanged', state: job.state };
      this.#db.prepare('UPDATE jobs SET state = ?, error = NULL, finished_at = NULL WHERE id = ?').run(to, id);
      this.#log(id, 'info', message);
      return { id, outcome: to, state: to };
    }).immediate();
  }

  #log(id: number, level: JobLogEntry['level'], message: string): void {
    this.#db.prepare('INSERT INTO job_logs (job_id, at, level, message) VALUES (?, ?, ?, ?)').run(id, this.#now(), level, message);
  }

  #jobOf(row: JobRow): QueuedJob {
    const outputs = this.#db.prepare('SELECT * FROM outputs WHERE job_id = ? ORDER BY image').all(row.id) as OutputRow[];
    return {
      id: row.id,
      batchId: row.batch_id ?? undefined,
      position: row.position,
      state: row.state,
      priority: row.priority,
      // Stored by `enqueue` from a validated job: parsing again cannot fail unless the file was edited by hand.
      entry: parseJobSpec(JSON.parse(row.spec)),
      outputs: outputs.map((o) => ({ image: o.image, seed: o.seed, path: o.path, written: o.written_at !== null })),
      batchKey: row.batch_key ?? undefined,
      attempts: row.attempts,
      error: row.error === null ? undefined : (JSON.parse(row.error) as JobErrorRecord),
      request: row.request ?? undefined,
      owner: row.owner_host === null ? undefined : `${row.owner_host}/${row.owner_pid}`,
      grid: row.grid === null ? undefined : (JSON.parse(row.grid) as QueuedJob['grid']),
      createdAt: row.created_at,
      startedAt: row.started_at ?? undefined,
      finishedAt: row.finished_at ?? undefined,
    };
  }
}

function batchOf(row: BatchRow): BatchRecord {
  return { id: row.id, key: row.key, source: row.source, outDir: row.out_dir, extra: row.extra === null ? undefined : JSON.parse(row.extra), createdAt: row.created_at };
}

/** Apply missing migrations. One write transaction, so two processes opening a new file do not both create it. */
function migrate(db: Database.Database, file: string): void {
  db.transaction(() => {
    db.exec('CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at INTEGER NOT NULL)');
    const current = (db.prepare('SELECT MAX(version) AS v FROM schema_migrations').get() as { v: number | null }).v ?? 0;
    if (current > MIGRATIONS.length) {
      throw new QueueError('QUEUE_DB_NEWER', `${file} was written by a newer Chorus (queue schema ${current}; this one knows ${MIGRATIONS.length}). Update Chorus, or use another file with --db.`, {
        file,
        found: current,
        known: MIGRATIONS.length,
      });
    }
    MIGRATIONS.forEach((sql, i) => {
      const version = i + 1;
      if (version <= current) return;
      db.exec(sql);
      db.prepare('INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)').run(version, Date.now());
    });
  }).immediate();
}
