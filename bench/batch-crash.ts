/**
 * The long crash test: `chorus batch` on the tiny model killed with SIGKILL at many seeded random
 * points (default 50 kills, 40-job batches), restarted with the same command each time, then let
 * finish and checked like test/batch-crash.test.ts: every job done exactly once, every PNG whole with
 * its metadata and equal to an uninterrupted run, no duplicates, no temp files. When a batch finishes
 * before the kills are used up, a fresh copy of it takes the remaining kills (a new round).
 *
 *   node --import tsx bench/batch-crash.ts [--jobs 40] [--kills 50] [--seed 7] [--max-batch 4] [--max-events 8]
 *
 * Prints a JSON line per run and a summary line; exits 1 when a check fails.
 */
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { parseArgs } from 'node:util';
import { checkConsistent, checkFinished, crashSetup, killPoint, runAndKill, seededRandom } from '../test/batch-crash-harness.ts';
import { runConditions } from './run-conditions.ts';

const { values } = parseArgs({
  options: {
    jobs: { type: 'string', default: '40' },
    kills: { type: 'string', default: '50' },
    seed: { type: 'string', default: '7' },
    'max-batch': { type: 'string', default: '4' },
    'max-events': { type: 'string', default: '8' },
  },
});
const jobs = Number(values.jobs);
const wantKills = Number(values.kills);
const maxBatch = Number(values['max-batch']);
const maxEvents = Number(values['max-events']);
const log = (line: string) => process.stderr.write(`[bench:batch-crash] ${line}\n`);
const emit = (record: Record<string, unknown>) => process.stdout.write(`${JSON.stringify(record)}\n`);

const root = fs.mkdtempSync(path.join(os.tmpdir(), 'chorus-crash-bench-'));
const random = seededRandom(Number(values.seed));
const started = performance.now();

const reference = crashSetup(root, 'reference', jobs, maxBatch);
const clean = spawnSync(process.execPath, reference.args, { encoding: 'utf-8' });
if (clean.status !== 0) throw new Error(`the uninterrupted run failed:\n${clean.stderr}`);

// Rounds: each round kills a fresh copy of the batch until it finishes on its own, then checks it.
let kills = 0;
let rounds = 0;
let starts = 0;
let recovered = 0;
let run = 0;
while (kills < wantKills) {
  rounds++;
  const s = crashSetup(root, `crashed-${rounds}`, jobs, maxBatch);
  for (; kills < wantKills; run++) {
    const at = killPoint(random, run, maxEvents);
    const result = await runAndKill(s, at);
    const done = await checkConsistent(s);
    emit({ record: 'crash_run', round: rounds, run: run + 1, ...at, killed: result.killed, exitCode: result.code, done, jobs });
    if (!result.killed) {
      if (result.code !== 0) throw new Error(`run ${run + 1} exited ${result.code} without being killed`);
      run++;
      break;
    }
    kills++;
  }
  const last = spawnSync(process.execPath, s.args, { encoding: 'utf-8' });
  if (last.status !== 0) throw new Error(`the final run of round ${rounds} failed:\n${last.stderr}`);
  const checked = await checkFinished(s, reference, jobs);
  starts += checked.starts;
  recovered += checked.recovered;
}
const summary = { record: 'crash_summary', ...runConditions(os.availableParallelism()), jobs, rounds, kills, starts, recovered, seconds: Math.round((performance.now() - started) / 100) / 10 };
emit(summary);
log(`${kills} SIGKILLs over ${rounds} round${rounds === 1 ? '' : 's'} of ${jobs} jobs: every job done once, ${starts} job starts for ${rounds * jobs} jobs, ${recovered} recovered from a killed runner, all PNGs whole and equal to the uninterrupted run (${summary.seconds} s)`);
