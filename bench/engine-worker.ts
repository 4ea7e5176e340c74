/**
 * One benchmark configuration in a fresh process, started by `bench/engine.ts` with the job as JSON
 * in argv[2]. Records go back over the IPC channel; stdout is redirected to the parent's stderr so
 * nothing here can corrupt the parent's JSON lines.
 *
 * Order inside a UNet job (STYLE §11): start the engine, run once and check the output (against
 * the fixture for the tiny model, for finiteness with random weights), then warm up, then time.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { AssertionError } from 'node:assert';
import { Sd15Engine, openSafetensors, type Tensor } from '../models/index.ts';
import { Ops } from '../models/onnx/ops.ts';
import { serializeModel } from '../models/onnx/serialize.ts';
import { OrtSession } from '../models/runtime.ts';
import { REF, assertClose, refCases } from '../test/fixtures.ts';
import { MATMUL_VARIANTS, VAE_SCALE, type CorrectnessRecord, type MatmulJob, type MatmulVariant, type UnetJob, type WorkerJob, type WorkerRecord } from './engine-jobs.ts';
import { loadAvg1m, maxRssMiB, rssMiB, runConditions } from './run-conditions.ts';
import { SeededRandom } from './seeded-random.ts';
import { timeRuns } from './timing-stats.ts';

/** Entries of C checked against float64 dot products. */
const MATMUL_CHECK_SAMPLES = 32;
/** fp32 accumulation error over k = 2048 terms stays far below this (relative to |a_i|·|b_j|). */
const MATMUL_CHECK_RTOL = 1e-4;
/** Mid-schedule: the timestep value does not change the UNet's cost, only its numbers. */
const RANDOM_INPUT_TIMESTEP = 500;

function send(record: WorkerRecord): Promise<void> {
  return new Promise((resolve, reject) => {
    if (process.send === undefined) {
      process.stderr.write(`${JSON.stringify(record)}\n`);
      resolve();
      return;
    }
    process.send(record, undefined, {}, (e) => (e === null ? resolve() : reject(e)));
  });
}

function parseJob(text: string | undefined): WorkerJob {
  if (text === undefined) throw new Error('engine-worker: expected the job as JSON in argv[2]; run bench/engine.ts instead');
  const job = JSON.parse(text) as WorkerJob;
  if (job.kind !== 'matmul' && job.kind !== 'unet') throw new Error(`engine-worker: unknown job kind ${JSON.stringify((job as { kind?: unknown }).kind)}`);
  return job;
}

// ---- MatMul ceiling ---------------------------------------------------------------------------

async function runMatmulVariant(job: MatmulJob, variant: MatmulVariant, aData: Float32Array, bData: Float32Array): Promise<void> {
  const n = job.size;
  const g = new Ops(`matmul_${variant}`);
  const a = g.input('a', 'float32', [n, n]);
  const b = variant === 'b_input' ? g.input('b', 'float32', [n, n]) : g.constant('float32', [n, n], bData);
  g.output(g.matmul(a, b), 'c', 'float32', [n, n]);
  const bytes = serializeModel(g.finish(), (p) => {
    throw new Error(`matmul graph: unexpected parameter ${p.name}`);
  });
  const session = await OrtSession.create(bytes, { device: 'cpu', threads: job.threads });
  try {
    const feeds: Record<string, Tensor> = { a: { dtype: 'float32', shape: [n, n], data: aData } };
    if (variant === 'b_input') feeds.b = { dtype: 'float32', shape: [n, n], data: bData };

    // Correctness first: sampled entries against float64 dot products.
    const c = (await session.run(feeds)).c!.data as Float32Array;
    const pick = new SeededRandom(job.seed, 'matmul.check');
    let maxRelDiff = 0;
    for (let s = 0; s < MATMUL_CHECK_SAMPLES; s++) {
      const i = pick.nextUint32() % n;
      const j = pick.nextUint32() % n;
      let dot = 0;
      let scale = 0;
      for (let t = 0; t < n; t++) {
        dot += aData[i * n + t]! * bData[t * n + j]!;
        scale += Math.abs(aData[i * n + t]! * bData[t * n + j]!);
      }
      maxRelDiff = Math.max(maxRelDiff, Math.abs(c[i * n + j]! - dot) / scale);
    }
    if (!(maxRelDiff <= MATMUL_CHECK_RTOL)) throw new Error(`matmul ${variant} check failed: max relative diff ${maxRelDiff} > ${MATMUL_CHECK_RTOL}`);

    const { timing, cpuTime } = await timeRuns(job.warmup, job.runs, () => session.run(feeds));
    const flops = 2 * n * n * n;
    await send({
      record: 'matmul',
      ...runConditions(job.threads),
      ep: session.choice.device,
      variant,
      m: n,
      n,
      k: n,
      warmup: job.warmup,
      timing,
      cpuTime,
      gflops: Math.round((flops / (timing.medianMs / 1000) / 1e9) * 100) / 100,
      maxRelDiff,
      maxRssMiB: maxRssMiB(),
      loadAvg1m: loadAvg1m(),
    });
  } finally {
    await session.dispose();
  }
}

async function runMatmul(job: MatmulJob): Promise<void> {
  const aData = new Float32Array(job.size * job.size);
  const bData = new Float32Array(job.size * job.size);
  new SeededRandom(job.seed, 'matmul.a').fillUniform(aData, 1);
  new SeededRandom(job.seed, 'matmul.b').fillUniform(bData, 1);
  for (const variant of MATMUL_VARIANTS) await runMatmulVariant(job, variant, aData, bData);
}

// ---- UNet ---------------------------------------------------------------------------------------

/** weights.bin modification times per cache folder: equal snapshots mean nothing was converted. */
function snapshotCache(cacheDir: string): Map<string, number> {
  const out = new Map<string, number>();
  if (!fs.existsSync(cacheDir)) return out;
  for (const entry of fs.readdirSync(cacheDir)) {
    const weights = path.join(cacheDir, entry, 'weights.bin');
    if (fs.existsSync(weights)) out.set(entry, fs.statSync(weights).mtimeMs);
  }
  return out;
}

interface UnetInputs {
  readonly sample: Tensor;
  readonly timestep: Tensor;
  readonly encoderHiddenStates: Tensor;
}

function referenceInputs(job: UnetJob, caseId: string): { inputs: UnetInputs; expected: Float32Array; atol: number } {
  const c = refCases('unet').find((r) => r.id === caseId);
  if (c === undefined) throw new Error(`reference case ${caseId} is not in ${REF}/manifest.json`);
  const f = openSafetensors(path.join(REF, c.file));
  try {
    const read = (name: string) => {
      const io = c.inputs[name];
      if (io === undefined) throw new Error(`reference case ${caseId} has no input ${name}`);
      return f.read(io.key);
    };
    const inputs = { sample: read('sample'), timestep: read('timestep'), encoderHiddenStates: read('encoder_hidden_states') };
    const want = [job.batch, 4, job.latentHeight, job.latentWidth].join(',');
    if (inputs.sample.shape.join(',') !== want) throw new Error(`reference case ${caseId}: sample is [${inputs.sample.shape.join(', ')}], the job wants [${want}]`);
    const atol = c.tolerance.atol;
    if (atol === undefined) throw new Error(`reference case ${caseId} has no tolerance.atol`);
    return { inputs, expected: f.readFloat32(c.outputs.noise_pred!.key).data, atol };
  } finally {
    f.close();
  }
}

function randomInputs(job: UnetJob, inChannels: number, crossDim: number): UnetInputs {
  const sample = new Float32Array(job.batch * inChannels * job.latentHeight * job.latentWidth);
  const context = new Float32Array(job.batch * job.sequence * crossDim);
  new SeededRandom(job.seed, 'input.sample').fillNormal(sample);
  new SeededRandom(job.seed, 'input.encoder_hidden_states').fillNormal(context);
  return {
    sample: { dtype: 'float32', shape: [job.batch, inChannels, job.latentHeight, job.latentWidth], data: sample },
    timestep: { dtype: 'float32', shape: [1], data: Float32Array.of(RANDOM_INPUT_TIMESTEP) },
    encoderHiddenStates: { dtype: 'float32', shape: [job.batch, job.sequence, crossDim], data: context },
  };
}

function maxAbsDifference(a: Float32Array, b: Float32Array): number {
  if (a.length !== b.length) return Infinity;
  let max = 0;
  for (let i = 0; i < a.length; i++) {
    const d = Math.abs(a[i]! - b[i]!);
    if (!(d <= max)) max = Number.isNaN(d) ? Infinity : d;
  }
  return max;
}

function meanStd(x: Float32Array): { mean: number; std: number; finite: boolean } {
  let sum = 0;
  let sumSq = 0;
  let finite = true;
  for (const v of x) {
    if (!Number.isFinite(v)) finite = false;
    sum += v;
    sumSq += v * v;
  }
  const mean = sum / x.length;
  return { mean, std: Math.sqrt(Math.max(sumSq / x.length - mean * mean, 0)), finite };
}

async function runUnetJob(job: UnetJob): Promise<boolean> {
  const peakRssAtStartMiB = maxRssMiB();
  const before = snapshotCache(job.cacheDir);
  const t0 = performance.now();
  const engine = Sd15Engine.open(job.modelDir, { device: 'cpu', cacheDir: job.cacheDir, threads: job.threads });
  try {
    await engine.session('unet');
    const startMs = performance.now() - t0;
    const peakRssAfterSessionMiB = maxRssMiB();
    const after = snapshotCache(job.cacheDir);
    const cacheReused = before.size > 0 && [...after].every(([k, v]) => before.get(k) === v);
    const ep = (await engine.providerChoice())?.device ?? 'unknown';

    const reference = job.referenceCase === undefined ? undefined : referenceInputs(job, job.referenceCase);
    const inputs = reference?.inputs ?? randomInputs(job, engine.model.unet.inChannels, engine.model.unet.crossAttentionDim[0]!);
    const t1 = performance.now();
    const first = (await engine.runUnet(inputs)).noise_pred!;
    const firstForwardMs = performance.now() - t1;

    const common = {
      ...runConditions(job.threads),
      ep,
      config: job.config,
      phase: job.phase,
      resolutionPx: `${job.latentWidth * VAE_SCALE}x${job.latentHeight * VAE_SCALE}`,
      latent: `${job.latentWidth}x${job.latentHeight}`,
      batch: job.batch,
    } as const;
    await send({
      record: 'unet_start',
      ...common,
      startMs: Math.round(startMs),
      firstForwardMs: Math.round(firstForwardMs),
      timeToFirstOutputMs: Math.round(startMs + firstForwardMs),
      cacheReused,
      peakRssAtStartMiB,
      peakRssAfterSessionMiB,
      maxRssMiB: maxRssMiB(),
      loadAvg1m: loadAvg1m(),
    });

    // Correctness before any timing.
    const stats = meanStd(first.data);
    let correctness: CorrectnessRecord;
    if (reference !== undefined) {
      // Reported even when the check fails (assertClose only returns it on success).
      const maxAbsDiff = maxAbsDifference(first.data, reference.expected);
      let ok = true;
      let message = 'matches the fixture';
      try {
        assertClose(first.data, reference.expected, reference.atol, `${job.referenceCase} noise_pred`);
      } catch (e) {
        if (!(e instanceof AssertionError)) throw e;
        ok = false;
        message = e.message;
      }
      correctness = {
        record: 'correctness',
        ...common,
        check: job.referenceCase!,
        ok,
        maxAbsDiff,
        atol: reference.atol,
        outputMean: stats.mean,
        outputStd: stats.std,
        message,
        maxRssMiB: maxRssMiB(),
        loadAvg1m: loadAvg1m(),
      };
    } else {
      const ok = stats.finite && stats.std > 0;
      correctness = {
        record: 'correctness',
        ...common,
        check: 'finite',
        ok,
        maxAbsDiff: null,
        atol: null,
        outputMean: stats.mean,
        outputStd: stats.std,
        message: ok ? 'output finite and not constant (random weights: no reference)' : 'output has NaN/Inf or is constant',
        maxRssMiB: maxRssMiB(),
        loadAvg1m: loadAvg1m(),
      };
    }
    await send(correctness);
    if (!correctness.ok) return false;

    if (job.runs > 0) {
      for (let i = 0; i < job.warmup; i++) await engine.runUnet(inputs);
      const rssBeforeTimedMiB = rssMiB();
      const { timing, cpuTime } = await timeRuns(0, job.runs, () => engine.runUnet(inputs));
      await send({ record: 'unet_forward', ...common, warmup: job.warmup, timing, cpuTime, rssBeforeTimedMiB, maxRssMiB: maxRssMiB(), loadAvg1m: loadAvg1m() });
    }
    return true;
  } finally {
    await engine.dispose();
  }
}

async function main(): Promise<void> {
  let ok = false;
  try {
    const job = parseJob(process.argv[2]);
    if (job.kind === 'matmul') {
      await runMatmul(job);
      ok = true;
    } else {
      ok = await runUnetJob(job);
    }
  } catch (e) {
    // The parent reports it and moves on to the next configuration.
    await send({ record: 'worker_error', message: e instanceof Error ? (e.stack ?? e.message) : String(e) });
  }
  // Exit explicitly: every record has been flushed, and ORT's thread pools need not linger.
  process.exit(ok ? 0 : 1);
}

await main();
