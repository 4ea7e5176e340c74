/**
 * The jobs `bench/engine.ts` hands to `bench/engine-worker.ts` (one fresh process per job, so each
 * process's peak RSS belongs to one configuration), and the records workers send back.
 */
import type { RunConditions } from './run-conditions.ts';
import type { CpuStats, TimingStats } from './timing-stats.ts';

export type UnetConfigName = 'tiny' | 'sd15';

/** SD's VAE downsamples by 8: latent size = pixels / 8. */
export const VAE_SCALE = 8;

export interface MatmulJob {
  readonly kind: 'matmul';
  /** C = A·B with A, B square n×n float32. */
  readonly size: number;
  readonly warmup: number;
  readonly runs: number;
  readonly threads: number;
  readonly seed: number;
}

export interface UnetJob {
  readonly kind: 'unet';
  readonly config: UnetConfigName;
  /** cold: empty cache (graph build + weight conversion); warm: cache filled by an earlier process. */
  readonly phase: 'cold' | 'warm';
  readonly modelDir: string;
  readonly cacheDir: string;
  readonly threads: number;
  readonly batch: number;
  readonly latentHeight: number;
  readonly latentWidth: number;
  readonly sequence: number;
  /** Timed forwards after warm-up (0 in the cold phase: it only measures the start). */
  readonly warmup: number;
  readonly runs: number;
  readonly seed: number;
  /** A `tiny-sd15-ref` UNet case whose inputs are used and whose output is checked. */
  readonly referenceCase: string | undefined;
}

export type WorkerJob = MatmulJob | UnetJob;

interface Measured extends RunConditions {
  readonly ep: string;
  /** Peak RSS of the worker process when the record was sent (MiB). */
  readonly maxRssMiB: number;
  /** 1-minute load average when the record was sent (this process's threads count too). */
  readonly loadAvg1m: number;
}

/**
 * How B reaches the MatMul: a graph input (packed on every run), or an initializer (packed once
 * when the session is created, like every UNet weight).
 */
export type MatmulVariant = 'b_input' | 'b_initializer';
export const MATMUL_VARIANTS: readonly MatmulVariant[] = ['b_input', 'b_initializer'];

export interface MatmulRecord extends Measured {
  readonly record: 'matmul';
  readonly variant: MatmulVariant;
  readonly m: number;
  readonly n: number;
  readonly k: number;
  readonly warmup: number;
  readonly timing: TimingStats;
  readonly cpuTime: CpuStats;
  readonly gflops: number;
  /** Sampled entries of C against float64 dot products, relative to the row/column norms. */
  readonly maxRelDiff: number;
}

interface UnetCommon extends Measured {
  readonly config: UnetConfigName;
  readonly phase: 'cold' | 'warm';
  readonly resolutionPx: string;
  readonly latent: string;
  readonly batch: number;
}

export interface UnetStartRecord extends UnetCommon {
  readonly record: 'unet_start';
  /** Sd15Engine.open → UNet session ready (graph build, weight binding/conversion, ORT session). */
  readonly startMs: number;
  /** The first runUnet after the session exists. */
  readonly firstForwardMs: number;
  readonly timeToFirstOutputMs: number;
  /** True when the converted weights already in the cache were used unchanged. */
  readonly cacheReused: boolean;
  /** Peak RSS before opening the model (Node, tsx and the ORT library). */
  readonly peakRssAtStartMiB: number;
  /** Peak RSS once the session exists, before the first forward. */
  readonly peakRssAfterSessionMiB: number;
}

export interface CorrectnessRecord extends UnetCommon {
  readonly record: 'correctness';
  /** Fixture case compared against, or `finite` when no reference exists (random weights). */
  readonly check: string;
  readonly ok: boolean;
  readonly maxAbsDiff: number | null;
  readonly atol: number | null;
  readonly outputMean: number;
  readonly outputStd: number;
  readonly message: string;
}

export interface UnetForwardRecord extends UnetCommon {
  readonly record: 'unet_forward';
  readonly warmup: number;
  readonly timing: TimingStats;
  readonly cpuTime: CpuStats;
  /** Resident set size right before the timed runs, after warm-up (MiB). */
  readonly rssBeforeTimedMiB: number;
}

export interface WorkerErrorRecord {
  readonly record: 'worker_error';
  readonly message: string;
}

export type WorkerRecord = MatmulRecord | UnetStartRecord | CorrectnessRecord | UnetForwardRecord | WorkerErrorRecord;
