/**
 * Text-to-image speed on the CPU at the real SD 1.5 size (random weights for UNet, CLIP ViT-L and
 * VAE; 512×512; classifier-free guidance, so each step is one batch-2 UNet forward): seconds per
 * denoising step and per image, with where the time goes (prompt encoding + first step, the
 * remaining steps, VAE decode). Goes through the same `generate` the CLI uses.
 *
 *   npm run bench:generate [-- --steps 20 --images 1 --sampler "DPM++ 2M" --size 512]
 *
 * The first image also pays for graph building / weight conversion (cold cache) or loading the
 * converted weights and creating the ONNX Runtime sessions (warm cache); it is reported as
 * `first_image` and not counted in the per-step figures. Prints JSON lines on stdout, a summary on
 * stderr.
 */
import * as os from 'node:os';
import * as path from 'node:path';
import { parseArgs } from 'node:util';
import { Sd15Engine } from '../models/index.ts';
import { engineModels, generate, normalizeJob, type GenerateJob } from '../pipelines/index.ts';
import { defaultBenchWorkDir, prepareRandomSd15FullModel } from './random-weights.ts';
import { loadAvg1m, maxRssMiB, runConditions } from './run-conditions.ts';
import { timingStats } from './timing-stats.ts';

const { values } = parseArgs({
  options: {
    steps: { type: 'string', default: '20' },
    images: { type: 'string', default: '1' },
    sampler: { type: 'string', default: 'DPM++ 2M' },
    size: { type: 'string', default: '512' },
    threads: { type: 'string' },
    help: { type: 'boolean', default: false },
  },
});
if (values.help) {
  process.stderr.write('Usage: npm run bench:generate -- [--steps 20] [--images 1] [--sampler "DPM++ 2M"] [--size 512] [--threads N]\n');
  process.exit(0);
}
const positiveInt = (flag: string, text: string): number => {
  const n = Number(text);
  if (!Number.isSafeInteger(n) || n < 1) {
    process.stderr.write(`${flag} must be a positive integer, got ${text}\n`);
    process.exit(2);
  }
  return n;
};
const steps = positiveInt('--steps', values.steps);
const images = positiveInt('--images', values.images);
const size = positiveInt('--size', values.size);
const threads = values.threads === undefined ? os.availableParallelism() : positiveInt('--threads', values.threads);
const log = (line: string) => process.stderr.write(`[bench:generate] ${line}\n`);
const emit = (record: Record<string, unknown>) => process.stdout.write(`${JSON.stringify({ ...runConditions(threads), ...record })}\n`);

const work = defaultBenchWorkDir();
const model = prepareRandomSd15FullModel(work, 1234, log);
log(`model ${model.dir} (${model.generated ? 'generated' : 'reused'} in ${model.seconds.toFixed(1)} s)`);

interface Timeline {
  readonly totalMs: number;
  /** Start → end of the first evaluation (prompt encoding + noise + first UNet step). */
  readonly firstStepMs: number;
  /** Durations of evaluations 2…n. */
  readonly laterStepsMs: number[];
  /** End of the last evaluation → image ready (VAE decode to [0, 1]). */
  readonly decodeMs: number;
}

const job = (n: number, seed: number): GenerateJob =>
  normalizeJob({ model: model.dir, prompt: 'a photograph of an astronaut riding a horse, (detailed:1.2)', negativePrompt: 'blurry', steps: n, sampler: values.sampler, width: size, height: size, seed, cfgScale: 7 });

async function timedImage(models: ReturnType<typeof engineModels>, n: number, seed: number): Promise<Timeline> {
  const marks: number[] = [];
  let imageAt = 0;
  const t0 = performance.now();
  await generate(job(n, seed), models, {
    onProgress: () => void marks.push(performance.now()),
    onImage: () => {
      imageAt = performance.now();
    },
  });
  const end = performance.now();
  if (marks.length === 0 || imageAt === 0) throw new Error('generate reported no steps or no image');
  return {
    totalMs: end - t0,
    firstStepMs: marks[0]! - t0,
    laterStepsMs: marks.slice(1).map((m, i) => m - marks[i]!),
    decodeMs: imageAt - marks[marks.length - 1]!,
  };
}

const cacheDir = path.join(work, 'cache');
const tOpen = performance.now();
const engine = Sd15Engine.open(model.dir, { device: 'cpu', cacheDir, threads });
try {
  const models = engineModels(engine);
  const openMs = performance.now() - tOpen;
  // First image: two steps, pays for sessions (and, on a cold cache, graph building and conversion).
  const first = await timedImage(models, 2, 1);
  emit({ record: 'first_image', steps: 2, sizePx: size, openMs: Math.round(openMs), totalMs: Math.round(first.totalMs), loadAvg1m: loadAvg1m() });
  log(`first image (2 steps, incl. session creation): ${(first.totalMs / 1000).toFixed(1)} s`);

  const stepSamples: number[] = [];
  const imageSamples: number[] = [];
  const firstSteps: number[] = [];
  const decodes: number[] = [];
  for (let i = 0; i < images; i++) {
    const t = await timedImage(models, steps, 100 + i);
    stepSamples.push(...t.laterStepsMs);
    imageSamples.push(t.totalMs);
    firstSteps.push(t.firstStepMs);
    decodes.push(t.decodeMs);
    emit({ record: 'image', index: i, sampler: values.sampler, steps, sizePx: size, totalMs: Math.round(t.totalMs), firstStepMs: Math.round(t.firstStepMs), decodeMs: Math.round(t.decodeMs), loadAvg1m: loadAvg1m() });
    log(`image ${i + 1}/${images}: ${(t.totalMs / 1000).toFixed(1)} s`);
  }
  const step = timingStats(stepSamples);
  const image = timingStats(imageSamples);
  const firstStep = timingStats(firstSteps);
  const decode = timingStats(decodes);
  emit({
    record: 'summary',
    sampler: values.sampler,
    steps,
    sizePx: size,
    unetBatch: 2,
    secondsPerStep: Math.round(step.medianMs) / 1000,
    secondsPerImage: Math.round(image.medianMs) / 1000,
    encodeAndFirstStepSeconds: Math.round(firstStep.medianMs) / 1000,
    decodeSeconds: Math.round(decode.medianMs) / 1000,
    stepTiming: { ...step, samplesMs: undefined },
    peakRssMiB: maxRssMiB(),
  });
  log(`${steps} steps at ${size}×${size}: ${(step.medianMs / 1000).toFixed(2)} s/step (median of ${step.runs}, ${step.minMs.toFixed(0)}–${step.maxMs.toFixed(0)} ms), ${(image.medianMs / 1000).toFixed(1)} s/image; encode+first step ${(firstStep.medianMs / 1000).toFixed(2)} s, VAE decode ${(decode.medianMs / 1000).toFixed(2)} s; peak RSS ${(maxRssMiB() / 1024).toFixed(1)} GiB`);
} finally {
  await engine.dispose();
}
