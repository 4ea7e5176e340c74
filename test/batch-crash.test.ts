/**
 * Crash safety of `chorus batch`, as users meet it: a 20-job batch on the tiny model, the process
 * killed with SIGKILL at seeded random points (at least 10 times: during start-up, mid-denoise,
 * while PNGs are written and committed), restarted with the same command each time, then let
 * finish. Afterwards every job is done exactly once, every PNG is complete and carries its metadata,
 * there are no duplicates and no temp files, and the images match an uninterrupted run.
 *
 * The longer version with more kill points is `bench/batch-crash.ts`.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { checkConsistent, checkFinished, crashSetup, killPoint, runAndKill, seededRandom } from './batch-crash-harness.ts';

const JOBS = 20;
const KILLS = 10;
const SEED = 20240608;
/** Groups of 4: a run finishes at most a few jobs before its kill, so 10 kills land before the batch is done. */
const MAX_BATCH = 4;
/** Kill after the 1st–6th step or job-done line: within the first group and a half. */
const MAX_EVENTS = 6;

test(`chorus batch survives ${KILLS} SIGKILLs at seeded random points: every job done once, every PNG whole`, { timeout: 600_000 }, async (t) => {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'chorus-crash-'));
  const random = seededRandom(SEED);

  // The reference: the same batch, uninterrupted (it also builds the graph cache for the runs below).
  const reference = crashSetup(root, 'reference', JOBS, MAX_BATCH);
  const clean = spawnSync(process.execPath, reference.args, { encoding: 'utf-8' });
  assert.equal(clean.status, 0, clean.stderr);

  const s = crashSetup(root, 'crashed', JOBS, MAX_BATCH);
  let kills = 0;
  for (let run = 0; kills < KILLS; run++) {
    const at = killPoint(random, run, MAX_EVENTS);
    const result = await runAndKill(s, at);
    assert.ok(result.killed, `run ${run + 1} finished the batch (exit ${result.code}) before its kill; only ${kills} kills landed`);
    kills++;
    const done = await checkConsistent(s);
    t.diagnostic(`run ${run + 1}: SIGKILL ${at.afterEvents === 0 ? 'blind' : `after ${at.afterEvents} events`} + ${at.delayMs} ms; ${done}/${JOBS} done`);
  }

  const last = spawnSync(process.execPath, s.args, { encoding: 'utf-8' });
  assert.equal(last.status, 0, last.stderr);
  const { starts, recovered } = await checkFinished(s, reference, JOBS);
  t.diagnostic(`${starts} job starts for ${JOBS} jobs; ${recovered} jobs recovered from a killed runner`);
  assert.ok(starts > JOBS, 'some jobs were interrupted and run again');
  assert.ok(recovered > 0, "a killed runner's jobs were recovered");
});
