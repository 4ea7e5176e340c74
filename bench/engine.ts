/**
 * Engine benchmark: UNet forward time and peak memory for the tiny fixture model and a full-size
 * SD 1.5 UNet (seeded random weights), against the fp32 MatMul throughput of the same ONNX Runtime
 * build as a ceiling. `npm run bench:engine -- --help` lists the options.
 *
 * Output: one JSON object per line on stdout (records `unet_flops`, `matmul`, `unet_start`,
 * `correctness`, `unet_forward`, `summary`, and `error` when a configuration fails); progress and
 * a short human summary on stderr.
 *
 * Every configuration runs in a fresh child process (`bench/engine-worker.ts`), so each reported
 * peak RSS belongs to one configuration. Per UNet config: a cold process starts from an empty
 * weight cache (graph build + weight conversion + first forward, correctness check), then a warm
 * process opens the same model again (cache reused), checks correctness, warms up and times.
 * "Cold" means no converted weights, not a cold OS page cache.
 */
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { parseUnetConfig } from '../models/networks/config.ts';
import { buildUnetGraph } from '../models/networks/unet.ts';
import type { UnetConfig } from '../models/index.ts';
import { VAE_SCALE, type CorrectnessRecord, type MatmulRecord, type UnetConfigName, type UnetForwardRecord, type UnetJob, type UnetStartRecord, type WorkerJob, type WorkerRecord } from './engine-jobs.ts';
import { DEFAULT_SEED, TINY_MODEL_DIR, defaultBenchWorkDir, prepareRandomSd15Model } from './random-weights.ts';
import { runConditions, type RunConditions } from './run-conditions.ts';
import { countUnetFlops } from './unet-flops.ts';

const WORKER = fileURLToPath(new URL('./engine-worker.ts', import.meta.url));
const BENCHES = ['matmul', 'tiny', 'sd15'] as const;
type BenchName = (typeof BENCHES)[number];

/** One CLIP chunk of tokens. */
const CLIP_TOKENS = 77;
/** The fixture case that checks the tiny UNet (batch 2 = [uncond, cond], 256 px, t = 1). */
const TINY_REFERENCE_CASE = 'unet/t1_b2_cfg';

interface UnetBenchSpec {
  readonly name: UnetConfigName;
  readonly label: string;
  readonly resolutionPx: number;
  readonly batch: number;
  readonly referenceCase: string | undefined;
  readonly defaultWarmup: number;
  readonly defaultRuns: number;
}

const UNET_BENCHES: Readonly<Record<UnetConfigName, UnetBenchSpec>> = {
  tiny: { name: 'tiny', label: 'tiny fixture UNet', resolutionPx: 256, batch: 2, referenceCase: TINY_REFERENCE_CASE, defaultWarmup: 3, defaultRuns: 20 },
  // A batch-2 forward is tens of seconds on a small CPU: few runs.
  sd15: { name: 'sd15', label: 'SD 1.5 UNet (random weights)', resolutionPx: 512, batch: 2, referenceCase: undefined, defaultWarmup: 1, defaultRuns: 3 },
};
const MATMUL_DEFAULTS = { size: 2048, warmup: 2, runs: 10 };

const USAGE = `Usage: npm run bench:engine -- [options]
  --only LIST         comma-separated subset of ${BENCHES.join(',')} (env CHORUS_BENCH_ONLY; default all)
  --runs N            timed runs for every selected bench (env CHORUS_BENCH_RUNS)
  --tiny-runs N       timed tiny UNet forwards (default ${UNET_BENCHES.tiny.defaultRuns})
  --sd15-runs N       timed SD 1.5 UNet forwards (default ${UNET_BENCHES.sd15.defaultRuns})
  --matmul-runs N     timed MatMuls (default ${MATMUL_DEFAULTS.runs})
  --warmup N          untimed runs before timing, every bench (defaults: tiny ${UNET_BENCHES.tiny.defaultWarmup}, sd15 ${UNET_BENCHES.sd15.defaultWarmup}, matmul ${MATMUL_DEFAULTS.warmup})
  --matmul-size N     MatMul size N (N×N @ N×N, default ${MATMUL_DEFAULTS.size})
  --threads N         ONNX Runtime intra-op threads (env CHORUS_BENCH_THREADS; default ${os.availableParallelism()}, the CPU count)
  --seed N            seed of the random SD 1.5 weights and inputs (default ${DEFAULT_SEED})
  --work-dir DIR      generated model and weight cache (env CHORUS_BENCH_DIR; default ${defaultBenchWorkDir()})
  --skip-cold         keep the weight cache and skip the cold-start processes
`;

class UsageError extends Error {}

interface Options {
  readonly only: ReadonlySet<BenchName>;
  readonly runs: Readonly<Record<BenchName, number>>;
  readonly warmup: Readonly<Record<BenchName, number>>;
  readonly matmulSize: number;
  readonly threads: number;
  readonly seed: number;
  readonly workDir: string;
  readonly skipCold: boolean;
}

function parseOptions(argv: readonly string[]): Options | undefined {
  const { values } = parseArgs({
    args: [...argv],
    options: {
      only: { type: 'string' },
      runs: { type: 'string' },
      'tiny-runs': { type: 'string' },
      'sd15-runs': { type: 'string' },
      'matmul-runs': { type: 'string' },
      warmup: { type: 'string' },
      'matmul-size': { type: 'string' },
      threads: { type: 'string' },
      seed: { type: 'string' },
      'work-dir': { type: 'string' },
      'skip-cold': { type: 'boolean' },
      help: { type: 'boolean', short: 'h' },
    },
  });
  if (values.help === true) return undefined;
  const env = (name: string) => (process.env[name] === '' ? undefined : process.env[name]);
  const int = (flag: string, text: string | undefined, fallback: number, min: number): number => {
    if (text === undefined) return fallback;
    const v = Number(text);
    if (!Number.isSafeInteger(v) || v < min) throw new UsageError(`--${flag} must be an integer ≥ ${min}, got ${JSON.stringify(text)}`);
    return v;
  };
  const onlyText = values.only ?? env('CHORUS_BENCH_ONLY');
  const only = new Set<BenchName>();
  for (const name of onlyText === undefined ? BENCHES : onlyText.split(',').map((s) => s.trim())) {
    if (!(BENCHES as readonly string[]).includes(name)) throw new UsageError(`--only: unknown bench ${JSON.stringify(name)} (choose from ${BENCHES.join(', ')})`);
    only.add(name as BenchName);
  }
  const runsAll = values.runs ?? env('CHORUS_BENCH_RUNS');
  const runsFor = (flag: 'matmul-runs' | 'tiny-runs' | 'sd15-runs', fallback: number) =>
    values[flag] !== undefined ? int(flag, values[flag], fallback, 1) : int('runs', runsAll, fallback, 1);
  const runs = {
    matmul: runsFor('matmul-runs', MATMUL_DEFAULTS.runs),
    tiny: runsFor('tiny-runs', UNET_BENCHES.tiny.defaultRuns),
    sd15: runsFor('sd15-runs', UNET_BENCHES.sd15.defaultRuns),
  };
  const warmup = {
    matmul: int('warmup', values.warmup, MATMUL_DEFAULTS.warmup, 0),
    tiny: int('warmup', values.warmup, UNET_BENCHES.tiny.defaultWarmup, 0),
    sd15: int('warmup', values.warmup, UNET_BENCHES.sd15.defaultWarmup, 0),
  };
  return {
    only,
    runs,
    warmup,
    matmulSize: int('matmul-size', values['matmul-size'], MATMUL_DEFAULTS.size, 1),
    threads: int('threads', values.threads ?? env('CHORUS_BENCH_THREADS'), os.availableParallelism(), 1),
    seed: int('seed', values.seed ?? env('CHORUS_BENCH_SEED'), DEFAULT_SEED, 0),
    workDir: path.resolve(values['work-dir'] ?? defaultBenchWorkDir()),
    skipCold: values['skip-cold'] === true,
  };
}

// ---- output ---------------------------------------------------------------------------------------

const log = (line: string) => process.stderr.write(`[bench:engine] ${line}\n`);
const emit = (record: Record<string, unknown>) => process.stdout.write(`${JSON.stringify(record)}\n`);
const gflop = (flops: number) => Math.round((flops / 1e9) * 100) / 100;

/** Run one job in a fresh process; returns the records it sent and whether it succeeded. */
function runWorker(job: WorkerJob): Promise<{ records: WorkerRecord[]; ok: boolean }> {
  const tsx = import.meta.resolve('tsx');
  return new Promise((resolve, reject) => {
    // Child stdout → our stderr: only this process writes JSON lines to stdout.
    const child = spawn(process.execPath, ['--import', tsx, WORKER, JSON.stringify(job)], { stdio: ['ignore', 2, 'inherit', 'ipc'] });
    const records: WorkerRecord[] = [];
    child.on('message', (m) => records.push(m as WorkerRecord));
    child.on('error', reject);
    // 'close' comes after the IPC channel has delivered every message, unlike 'exit'.
    child.on('close', (code, signal) => {
      if (signal !== null) records.push({ record: 'worker_error', message: `worker killed by ${signal} (out of memory?)` });
      resolve({ records, ok: code === 0 && signal === null });
    });
  });
}

// ---- benches --------------------------------------------------------------------------------------

interface UnetSummary {
  readonly config: UnetConfigName;
  readonly gflopPerForward: number;
  readonly forward?: UnetForwardRecord;
  readonly cold?: UnetStartRecord;
  readonly warm?: UnetStartRecord;
  readonly correctness: CorrectnessRecord[];
  /** Each process's peak RSS: the largest value any of its records reported. */
  readonly peakRssMiB: Partial<Record<'cold' | 'warm', number>>;
}

function readUnetConfig(modelDir: string): UnetConfig {
  const file = path.join(modelDir, 'unet', 'config.json');
  return parseUnetConfig(JSON.parse(fs.readFileSync(file, 'utf-8')), file);
}

/** Analytic FLOPs, checked against the built graph's conv/linear weights (see unet-flops.ts). */
function flopsRecord(name: UnetConfigName, config: UnetConfig, spec: UnetBenchSpec, conditions: RunConditions): { record: Record<string, unknown>; flops: number } {
  const latent = spec.resolutionPx / VAE_SCALE;
  const shape = { batch: spec.batch, latentHeight: latent, latentWidth: latent, sequence: CLIP_TOKENS };
  const f = countUnetFlops(config, shape);
  const perSample = countUnetFlops(config, { ...shape, batch: 1 });
  const graphWeightElements = buildUnetGraph(config)
    .params.filter((p) => p.shape.length >= 2)
    .reduce((sum, p) => sum + p.shape.reduce((a, b) => a * b, 1), 0);
  if (graphWeightElements !== f.weightElements) {
    throw new Error(`unet-flops: the walk visited ${f.weightElements} conv/linear weight elements, the ${name} graph declares ${graphWeightElements}; the FLOP walk no longer mirrors unet.ts`);
  }
  return {
    flops: f.total,
    record: {
      record: 'unet_flops',
      ...conditions,
      config: name,
      resolutionPx: `${spec.resolutionPx}x${spec.resolutionPx}`,
      latent: `${latent}x${latent}`,
      batch: spec.batch,
      sequence: CLIP_TOKENS,
      gflopPerForward: gflop(f.total),
      gflopPerForwardBatch1: gflop(perSample.total),
      gflopConv: gflop(f.conv),
      gflopLinear: gflop(f.linear),
      gflopAttention: gflop(f.attention),
      weightElementsChecked: f.weightElements,
    },
  };
}

async function runUnetBench(spec: UnetBenchSpec, modelDir: string, options: Options, conditions: RunConditions, ceiling: Ceiling | undefined): Promise<UnetSummary | undefined> {
  const config = readUnetConfig(modelDir);
  const { record: flopsLine, flops } = flopsRecord(spec.name, config, spec, conditions);
  emit(flopsLine);
  log(`${spec.label}: ${flopsLine.gflopPerForward} GFLOP per forward at batch ${spec.batch} (${flopsLine.gflopPerForwardBatch1} at batch 1)`);

  const cacheDir = path.join(options.workDir, 'cache', spec.name);
  const latent = spec.resolutionPx / VAE_SCALE;
  const base: Omit<UnetJob, 'phase' | 'warmup' | 'runs'> = {
    kind: 'unet',
    config: spec.name,
    modelDir,
    cacheDir,
    threads: options.threads,
    batch: spec.batch,
    latentHeight: latent,
    latentWidth: latent,
    sequence: CLIP_TOKENS,
    seed: options.seed,
    referenceCase: spec.referenceCase,
  };
  const summary: Omit<UnetSummary, 'config' | 'gflopPerForward'> & { cold?: UnetStartRecord; warm?: UnetStartRecord; forward?: UnetForwardRecord } = { correctness: [], peakRssMiB: {} };
  const phases: UnetJob[] = [];
  if (!options.skipCold) phases.push({ ...base, phase: 'cold', warmup: 0, runs: 0 });
  phases.push({ ...base, phase: 'warm', warmup: options.warmup[spec.name], runs: options.runs[spec.name] });

  for (const job of phases) {
    if (job.phase === 'cold') fs.rmSync(cacheDir, { recursive: true, force: true });
    log(`${spec.label}: ${job.phase} process${job.runs > 0 ? `, warm-up ${job.warmup}, ${job.runs} timed forwards` : ''}`);
    const { records, ok } = await runWorker(job);
    for (const r of records) {
      if (r.record !== 'worker_error') summary.peakRssMiB[job.phase] = Math.max(summary.peakRssMiB[job.phase] ?? 0, r.maxRssMiB);
      switch (r.record) {
        case 'unet_start':
          emit({ ...r });
          if (r.phase === 'cold') summary.cold = r;
          else summary.warm = r;
          log(`  start ${r.startMs} ms (cache ${r.cacheReused ? 'reused' : 'converted'}), first forward ${r.firstForwardMs} ms, peak RSS so far ${r.maxRssMiB} MiB`);
          break;
        case 'correctness':
          emit({ ...r });
          summary.correctness.push(r);
          log(
            `  correctness (${r.check}): ${r.ok ? 'ok' : `FAILED: ${r.message}`}${r.maxAbsDiff === null ? '' : `, max |diff| ${r.maxAbsDiff.toExponential(2)} (atol ${r.atol})`}, ` +
              `output mean ${r.outputMean.toFixed(4)} std ${r.outputStd.toFixed(4)}`,
          );
          break;
        case 'unet_forward': {
          const seconds = r.timing.medianMs / 1000;
          const achieved = flops / seconds / 1e9;
          emit({
            ...r,
            gflopPerForward: gflop(flops),
            achievedGflops: Math.round(achieved * 100) / 100,
            ceilingGflops: ceiling?.gflops ?? null,
            ceilingVariant: ceiling?.variant ?? null,
            ratioToCeiling: ceiling === undefined ? null : Math.round((achieved / ceiling.gflops) * 1000) / 1000,
          });
          summary.forward = r;
          log(
            `  forward median ${r.timing.medianMs.toFixed(1)} ms (min ${r.timing.minMs.toFixed(1)}, max ${r.timing.maxMs.toFixed(1)}, n=${r.timing.runs}), ${achieved.toFixed(1)} GFLOP/s, ` +
              `CPU per forward user ${r.cpuTime.userMsPerRun} ms + system ${r.cpuTime.systemMsPerRun} ms (${r.cpuTime.coresBusy} cores busy), RSS ${r.rssBeforeTimedMiB} MiB before timing, peak ${r.maxRssMiB} MiB`,
          );
          break;
        }
        case 'worker_error':
          emit({ record: 'error', ...conditions, config: spec.name, phase: job.phase, message: r.message });
          log(`  ${job.phase} process failed: ${r.message}`);
          break;
        case 'matmul':
          throw new Error(`UNet worker sent a matmul record`);
      }
    }
    if (!ok) {
      if (!records.some((r) => r.record === 'worker_error' || (r.record === 'correctness' && !r.ok))) {
        emit({ record: 'error', ...conditions, config: spec.name, phase: job.phase, message: 'worker exited with an error' });
      }
      process.exitCode = 1;
      return undefined; // correctness first: no timing for a configuration that failed
    }
  }
  return { config: spec.name, gflopPerForward: gflop(flops), ...summary };
}

/** The MatMul ceiling: the faster of the two variants (B as input, B as initializer). */
interface Ceiling {
  readonly gflops: number;
  readonly variant: string;
  readonly records: readonly MatmulRecord[];
}

async function runMatmulBench(options: Options, conditions: RunConditions): Promise<Ceiling | undefined> {
  const n = options.matmulSize;
  log(`MatMul ${n}x${n} @ ${n}x${n} fp32 (B as input, then as initializer): warm-up ${options.warmup.matmul}, ${options.runs.matmul} timed runs each`);
  const { records, ok } = await runWorker({ kind: 'matmul', size: n, warmup: options.warmup.matmul, runs: options.runs.matmul, threads: options.threads, seed: options.seed });
  const results: MatmulRecord[] = [];
  for (const r of records) {
    if (r.record === 'matmul') {
      emit({ ...r });
      results.push(r);
      log(`  ${r.variant}: median ${r.timing.medianMs.toFixed(1)} ms → ${r.gflops} GFLOP/s (min ${r.timing.minMs.toFixed(1)}, max ${r.timing.maxMs.toFixed(1)} ms; ${r.cpuTime.coresBusy} cores busy), check max rel diff ${r.maxRelDiff.toExponential(2)}`);
    } else if (r.record === 'worker_error') {
      emit({ record: 'error', ...conditions, config: 'matmul', message: r.message });
      log(`  MatMul process failed: ${r.message}`);
    }
  }
  if (!ok || results.length === 0) {
    process.exitCode = 1;
    return undefined;
  }
  const best = results.reduce((a, b) => (b.gflops > a.gflops ? b : a));
  return { gflops: best.gflops, variant: best.variant, records: results };
}

/** Below this share of the requested threads kept busy, other processes were likely competing. */
const CONTENTION_BUSY_SHARE = 0.85;

function printSummary(conditions: RunConditions, ceiling: Ceiling | undefined, unets: readonly UnetSummary[]): void {
  const ep = ceiling?.records[0]?.ep ?? unets.find((u) => u.forward !== undefined)?.forward?.ep ?? 'n/a';
  const lines = [
    '',
    `Chorus engine bench: ORT ${conditions.ortVersion}, ${ep} EP, ${conditions.threads} threads, ${conditions.dtype}, ${conditions.cpu} (${conditions.cpuCores} cores, ${conditions.cpuFlags.join(' ')}), Node ${conditions.node}`,
  ];
  const record: Record<string, unknown> = { record: 'summary', ...conditions, ep, ceilingGflops: ceiling?.gflops ?? null, ceilingVariant: ceiling?.variant ?? null };
  const contended: string[] = [];
  if (ceiling !== undefined) {
    for (const r of ceiling.records) {
      lines.push(`  MatMul ${r.m}³ fp32, ${r.variant}: ${r.gflops} GFLOP/s (median ${r.timing.medianMs.toFixed(1)} ms, range ${r.timing.rangePct}%, n=${r.timing.runs})${r.variant === ceiling.variant ? '  ← ceiling' : ''}`);
      if (r.cpuTime.coresBusy < CONTENTION_BUSY_SHARE * conditions.threads) contended.push(`matmul ${r.variant}`);
    }
  }
  for (const u of unets) {
    const spec = UNET_BENCHES[u.config];
    const check = u.correctness.map((c) => `${c.phase}: ${c.maxAbsDiff === null ? `${c.check} ${c.ok ? 'ok' : 'FAILED'}` : `max|diff| ${c.maxAbsDiff.toExponential(2)} vs ${c.check}`}`).join(', ');
    const achieved = u.forward === undefined ? undefined : u.gflopPerForward / (u.forward.timing.medianMs / 1000);
    const ratio = achieved === undefined || ceiling === undefined ? undefined : achieved / ceiling.gflops;
    if (u.forward !== undefined && u.forward.cpuTime.coresBusy < CONTENTION_BUSY_SHARE * conditions.threads) contended.push(`unet ${u.config}`);
    record[u.config] = {
      resolutionPx: spec.resolutionPx,
      batch: spec.batch,
      medianMs: u.forward?.timing.medianMs ?? null,
      rangePct: u.forward?.timing.rangePct ?? null,
      gflopPerForward: u.gflopPerForward,
      achievedGflops: achieved === undefined ? null : Math.round(achieved * 100) / 100,
      ratioToCeiling: ratio === undefined ? null : Math.round(ratio * 1000) / 1000,
      coldStartMs: u.cold?.startMs ?? null,
      warmStartMs: u.warm?.startMs ?? null,
      peakRssMiB: u.peakRssMiB.warm ?? null,
      coldPeakRssMiB: u.peakRssMiB.cold ?? null,
      correct: u.correctness.length > 0 && u.correctness.every((c) => c.ok),
    };
    lines.push(
      `  UNet ${u.config} ${spec.resolutionPx}px batch ${spec.batch}: ` +
        (u.forward === undefined
          ? 'not timed'
          : `median ${u.forward.timing.medianMs.toFixed(1)} ms (${u.forward.timing.minMs.toFixed(1)}–${u.forward.timing.maxMs.toFixed(1)}, n=${u.forward.timing.runs}), ` +
            `${u.gflopPerForward} GFLOP → ${achieved!.toFixed(1)} GFLOP/s${ratio === undefined ? '' : ` = ${(ratio * 100).toFixed(1)}% of the MatMul ceiling`}`),
      `      start: cold ${u.cold?.startMs ?? '–'} ms, warm ${u.warm?.startMs ?? '–'} ms; peak RSS ${u.peakRssMiB.warm ?? '–'} MiB (cold process ${u.peakRssMiB.cold ?? '–'} MiB); ${check}`,
    );
  }
  const tiny = unets.find((u) => u.config === 'tiny')?.forward;
  const sd15 = unets.find((u) => u.config === 'sd15')?.forward;
  if (tiny !== undefined && sd15 !== undefined) {
    record.sd15OverTinyTime = Math.round((sd15.timing.medianMs / tiny.timing.medianMs) * 10) / 10;
    lines.push(`  SD 1.5 / tiny forward time: ${record.sd15OverTinyTime}×`);
  }
  record.contended = contended;
  if (contended.length > 0) {
    lines.push(`  note: the threads were not kept busy (< ${CONTENTION_BUSY_SHARE * 100}% of ${conditions.threads} cores) in ${contended.join(', ')}: other processes were probably competing, so those figures are noisy.`);
  }
  emit(record);
  process.stderr.write(`${lines.join('\n')}\n`);
}

async function main(): Promise<void> {
  let options: Options | undefined;
  try {
    options = parseOptions(process.argv.slice(2));
  } catch (e) {
    if (!(e instanceof UsageError) && !(e instanceof TypeError)) throw e; // parseArgs throws TypeError for unknown flags
    process.stderr.write(`${e.message}\n\n${USAGE}`);
    process.exitCode = 2;
    return;
  }
  if (options === undefined) {
    process.stdout.write(USAGE);
    return;
  }
  fs.mkdirSync(options.workDir, { recursive: true });
  const conditions = runConditions(options.threads);

  const ceiling = options.only.has('matmul') ? await runMatmulBench(options, conditions) : undefined;
  const unets: UnetSummary[] = [];
  if (options.only.has('tiny')) {
    const s = await runUnetBench(UNET_BENCHES.tiny, TINY_MODEL_DIR, options, conditions, ceiling);
    if (s !== undefined) unets.push(s);
  }
  if (options.only.has('sd15')) {
    const model = prepareRandomSd15Model(options.workDir, options.seed, log);
    log(`SD 1.5 random model ${model.generated ? `generated in ${model.seconds.toFixed(1)} s` : 'reused'}: ${model.dir} (${(model.unetBytes / 2 ** 30).toFixed(2)} GiB UNet)`);
    const s = await runUnetBench(UNET_BENCHES.sd15, model.dir, options, conditions, ceiling);
    if (s !== undefined) unets.push(s);
  }
  printSummary(conditions, ceiling, unets);
}

await main();
