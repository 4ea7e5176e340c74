/** Median and spread of repeated timings. */

export interface TimingStats {
  readonly runs: number;
  readonly medianMs: number;
  readonly minMs: number;
  readonly maxMs: number;
  /** Median absolute deviation from the median. */
  readonly madMs: number;
  /** (max − min) / median, in percent. */
  readonly rangePct: number;
  readonly samplesMs: readonly number[];
}

/** CPU time this process spent during the timed runs, per run. */
export interface CpuStats {
  readonly userMsPerRun: number;
  readonly systemMsPerRun: number;
  /**
   * (user + system) / wall time, in cores. Well below the thread count means the threads did not
   * get the cores (other processes competing) or the work was serial.
   */
  readonly coresBusy: number;
}

const round = (x: number, digits: number) => Math.round(x * 10 ** digits) / 10 ** digits;

function median(sorted: readonly number[]): number {
  const mid = sorted.length >> 1;
  return sorted.length % 2 === 1 ? sorted[mid]! : (sorted[mid - 1]! + sorted[mid]!) / 2;
}

/** Summarize timings in milliseconds. Throws on an empty list (a caller bug: runs ≥ 1 is validated). */
export function timingStats(samplesMs: readonly number[]): TimingStats {
  if (samplesMs.length === 0) throw new Error('timingStats: no samples');
  const sorted = [...samplesMs].sort((a, b) => a - b);
  const med = median(sorted);
  const mad = median(sorted.map((x) => Math.abs(x - med)).sort((a, b) => a - b));
  return {
    runs: samplesMs.length,
    medianMs: round(med, 3),
    minMs: round(sorted[0]!, 3),
    maxMs: round(sorted[sorted.length - 1]!, 3),
    madMs: round(mad, 3),
    rangePct: round(((sorted[sorted.length - 1]! - sorted[0]!) / med) * 100, 2),
    samplesMs: samplesMs.map((x) => round(x, 3)),
  };
}

/** Time `runs` calls of `fn` after `warmup` untimed calls; CPU time is taken over the timed calls. */
export async function timeRuns(warmup: number, runs: number, fn: () => Promise<unknown>): Promise<{ timing: TimingStats; cpuTime: CpuStats }> {
  for (let i = 0; i < warmup; i++) await fn();
  const samples: number[] = [];
  const cpu0 = process.cpuUsage();
  for (let i = 0; i < runs; i++) {
    const t0 = performance.now();
    await fn();
    samples.push(performance.now() - t0);
  }
  const cpu = process.cpuUsage(cpu0);
  const wallMs = samples.reduce((a, b) => a + b, 0);
  return {
    timing: timingStats(samples),
    cpuTime: {
      userMsPerRun: round(cpu.user / 1000 / runs, 1),
      systemMsPerRun: round(cpu.system / 1000 / runs, 1),
      coresBusy: round((cpu.user + cpu.system) / 1000 / wallMs, 2),
    },
  };
}
