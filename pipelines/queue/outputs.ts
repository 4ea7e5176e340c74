/**
 * Output file names of queued jobs and the clean-up of interrupted writes.
 *
 * A job's file names are fixed when it is queued (its seed is drawn by then), so a job re-run after
 * a crash writes the very same files: a PNG renamed into place just before the crash is overwritten
 * with the same image instead of being duplicated under a new number.
 *
 * Pattern tokens (the job's `output` field or `chorus batch --output`):
 *
 * | token     | value                                                        |
 * |-----------|--------------------------------------------------------------|
 * | `{index}` | the job's number in its batch, from 1, 5 digits (`00007`)    |
 * | `{image}` | the image's number within the job, from 0                    |
 * | `{seed}`  | the image's seed                                             |
 * | `{job}`   | the job's `name`, or its number when it has none             |
 * | `{model}` | the model's file or folder name                              |
 * | `{x}` `{y}` `{z}` | the grid cell's value labels (empty outside a grid)  |
 *
 * `.png` is added when missing. A job with several images whose pattern has neither `{image}` nor
 * `{seed}` gets `-{image}` before the extension. Token values are made file-name safe; the pattern
 * may name sub-folders but never leaves the output folder.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { PipelineError } from '../errors.ts';
import type { GenerateJob } from '../job.ts';

export const DEFAULT_OUTPUT_PATTERN = '{index}-{seed}.png';
const TOKENS = ['index', 'image', 'seed', 'job', 'model', 'x', 'y', 'z'] as const;
type Token = (typeof TOKENS)[number];
/** `{index}` digits: A1111's and `chorus generate`'s NNNNN numbering. */
const INDEX_DIGITS = 5;
/** Longest token value kept in a file name (a prompt used as a grid label can be long). */
const MAX_TOKEN_CHARS = 60;

/** One output file of a job, fixed at queue time. */
export interface PlannedOutput {
  /** Index of the image in the job's run (0…batchSize·batchCount−1). */
  readonly image: number;
  readonly seed: string;
  /** Absolute path. */
  readonly path: string;
}

function patternError(message: string): never {
  throw new PipelineError('BAD_ARGUMENT', `output: ${message}`, { field: 'output' });
}

/** Check a pattern: known tokens only, relative, no `..`. Throws `PipelineError` naming the `output` field. */
export function validateOutputPattern(pattern: string): void {
  if (pattern.trim() === '') patternError('the file-name pattern is empty.');
  for (const m of pattern.matchAll(/\{([^}]*)\}/g)) {
    if (!(TOKENS as readonly string[]).includes(m[1]!)) patternError(`unknown token {${m[1]}} in "${pattern}"; tokens: ${TOKENS.map((t) => `{${t}}`).join(' ')}.`);
  }
  if (path.isAbsolute(pattern) || pattern.split(/[\\/]/).includes('..')) patternError(`"${pattern}" must stay inside the output folder (no absolute path, no "..").`);
}

function safe(value: string): string {
  // Characters Windows or POSIX file systems refuse, and control characters.
  return value.replace(/[\\/:*?"<>|\u0000-\u001f]/g, '_').trim().slice(0, MAX_TOKEN_CHARS);
}

export interface OutputNaming {
  readonly pattern: string;
  /** Absolute output folder. */
  readonly outDir: string;
  /** The job's number in its batch, from 1. */
  readonly position: number;
  readonly name?: string;
  readonly grid?: { readonly x: string; readonly y: string; readonly z: string };
}

/** The files a job will write, one per image. */
export function planOutputs(job: GenerateJob, naming: OutputNaming): PlannedOutput[] {
  validateOutputPattern(naming.pattern);
  const images = job.batchSize * job.batchCount;
  let pattern = naming.pattern.toLowerCase().endsWith('.png') ? naming.pattern : `${naming.pattern}.png`;
  if (images > 1 && !pattern.includes('{image}') && !pattern.includes('{seed}')) pattern = `${pattern.slice(0, -4)}-{image}.png`;
  const index = String(naming.position).padStart(INDEX_DIGITS, '0');
  return Array.from({ length: images }, (_, image) => {
    const seed = (job.seed + BigInt(image)).toString();
    const values: Record<Token, string> = {
      index,
      image: String(image),
      seed,
      job: naming.name ?? index,
      model: path.basename(job.model).replace(/\.safetensors$/i, ''),
      x: naming.grid?.x ?? '',
      y: naming.grid?.y ?? '',
      z: naming.grid?.z ?? '',
    };
    const relative = pattern.replace(/\{([a-z]+)\}/g, (_, t: Token) => safe(values[t]));
    return { image, seed, path: path.resolve(naming.outDir, relative) };
  });
}

/**
 * Temp files `writeFileAtomic` leaves beside `file` when the writing process dies
 * (`.<name>.<pid>.tmp`); removes them and returns their paths.
 */
export function removeStaleTemps(files: readonly string[]): string[] {
  const removed: string[] = [];
  const byDir = new Map<string, string[]>();
  for (const f of files) byDir.set(path.dirname(f), [...(byDir.get(path.dirname(f)) ?? []), path.basename(f)]);
  for (const [dir, names] of byDir) {
    let entries: string[];
    try {
      entries = fs.readdirSync(dir);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'ENOENT') continue; // nothing written there yet
      throw e;
    }
    for (const entry of entries) {
      if (names.some((n) => entry.startsWith(`.${n}.`) && /^\.\d+\.tmp$/.test(entry.slice(n.length + 1)))) {
        fs.rmSync(path.join(dir, entry), { force: true });
        removed.push(path.join(dir, entry));
      }
    }
  }
  return removed;
}
