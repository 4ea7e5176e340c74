/**
 * Heterogeneous batching: 8 jobs with 8 different LoRA stacks (and prompts, seeds, CFG) on the tiny
 * model, rendered one by one (`generate` per job) and batched (`generateBatched`: one denoising
 * loop, one UNet call per step for all 8), in one run, alternating, as a ratio of medians. Both paths
 * do the same work around the loop (LoRA loading, prompt encoding, decoding).
 *
 * Correctness first: each batched job's final latents must match its one-by-one run within 1e-4.
 *
 *   node --import tsx bench/batch.ts [--sizes 64,256] [--steps 4] [--runs 5] [--warmup 1] [--threads n] [--device cpu]
 *
 * JSON lines on stdout, a summary on stderr.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { parseArgs } from 'node:util';
import { Sd15Engine, type Device } from '../models/index.ts';
import { generateBatched } from '../pipelines/jobs/batched.ts';
import { normalizeJob, type GenerateJob, type JobLora } from '../pipelines/job.ts';
import { engineModels, type SdModels } from '../pipelines/models.ts';
import { generate } from '../pipelines/text-to-image.ts';
import { FIXTURES } from '../test/fixtures.ts';
import { loadAvg1m, runConditions } from './run-conditions.ts';
import { timingStats } from './timing-stats.ts';

const MODEL = path.join(FIXTURES, 'tiny-sd15');
const LORA_DIR = path.join(FIXTURES, 'tiny-sd15-lora');
/** The bar for batched vs one-by-one final latents. */
const BATCHED_ATOL = 1e-4;

const { values } = parseArgs({
  options: {
    sizes: { type: 'string', default: '64,256' },
    steps: { type: 'string', default: '4' },
    runs: { type: 'string', default: '5' },
    warmup: { type: 'string', default: '1' },
    threads: { type: 'string' },
    device: { type: 'string', default: 'cpu' },
  },
});
const sizes = values.sizes.split(',').map(Number);
const steps = Number(values.steps);
const runs = Number(values.runs);
const warmup = Number(values.warmup);
const threads = values.threads === undefined ? os.availableParallelism() : Number(values.threads);
const log = (line: string) => process.stderr.write(`[bench:batch] ${line}\n`);
const emit = (record: Record<string, unknown>) => process.stdout.write(`${JSON.stringify({ ...runConditions(threads), ...record })}\n`);

/** 8 different stacks over the 4 fixture LoRAs: singles, pairs (both orders kept consistent), strengths, none, all four. */
const STACKS: readonly (readonly JobLora[])[] = [
  [],
  [{ name: 'lora_kohya_a', te: 1, unet: 1 }],
  [{ name: 'lora_peft', te: 0.6, unet: 0.8 }],
  [{ name: 'lora_diffusers', te: 1, unet: 0.5 }],
  [{ name: 'lora_kohya_b_locon', te: 0.7, unet: 0.7 }],
  [{ name: 'lora_kohya_a', te: 0.5, unet: 0.5 }, { name: 'lora_peft', te: 0.5, unet: 0.5 }],
  [{ name: 'lora_kohya_a', te: 0.8, unet: 0.4 }, { name: 'lora_diffusers', te: 0.6, unet: 0.6 }],
  [{ name: 'lora_kohya_a', te: 0.3, unet: 0.3 }, { name: 'lora_peft', te: 0.3, unet: 0.3 }, { name: 'lora_diffusers', te: 0.3, unet: 0.3 }, { name: 'lora_kohya_b_locon', te: 0.3, unet: 0.3 }],
];
const SUBJECTS = ['a cat', 'a dog', 'a castle', 'a forest', 'a robot', 'a lighthouse', 'a teapot', 'a mountain'];

function jobsAt(sizePx: number): GenerateJob[] {
  return STACKS.map((loras, i) => normalizeJob({ model: MODEL, prompt: `${SUBJECTS[i]}, detailed`, negativePrompt: 'blurry', seed: 1000 + i, cfgScale: 5 + i * 0.5, steps, width: sizePx, height: sizePx, sampler: 'DPM++ 2M', loras: [...loras] }));
}

async function oneByOne(jobs: readonly GenerateJob[], models: SdModels) {
  const out = [];
  for (const job of jobs) out.push(await generate(job, models));
  return out;
}

const cacheDir = path.join(os.tmpdir(), 'chorus-bench-batch-cache');
fs.mkdirSync(cacheDir, { recursive: true });
const engine = Sd15Engine.open(MODEL, { device: values.device as Device, cacheDir, threads });
try {
  const real = engineModels(engine, { loraDirs: [LORA_DIR] });
  let unetCalls = 0;
  const models: SdModels = { ...real, denoiser: { predict: (r) => (unetCalls++, real.denoiser.predict(r)) } };
  const provider = async () => (await engine.providerChoice())?.device ?? 'unknown';

  for (const sizePx of sizes) {
    const jobs = jobsAt(sizePx);
    // 1. correctness.
    unetCalls = 0;
    const alone = await oneByOne(jobs, models);
    const aloneCalls = unetCalls;
    unetCalls = 0;
    const together = await generateBatched(jobs, models);
    const batchedCalls = unetCalls;
    let maxDiff = 0;
    jobs.forEach((_, i) => {
      const a = alone[i]!.images[0]!.finalLatents.data;
      const b = together[i]!.images[0]!.finalLatents.data;
      for (let k = 0; k < a.length; k++) maxDiff = Math.max(maxDiff, Math.abs(a[k]! - b[k]!));
    });
    if (!(maxDiff <= BATCHED_ATOL)) {
      log(`batched final latents differ from one by one by ${maxDiff} > ${BATCHED_ATOL} at ${sizePx}px: not timing a wrong result`);
      process.exitCode = 1;
      break;
    }
    // 2–3. warm up, then time the two variants alternately (so load from other processes hits both alike).
    for (let i = 0; i < warmup; i++) {
      await oneByOne(jobs, models);
      await generateBatched(jobs, models);
    }
    const samples = { single: [] as number[], batched: [] as number[] };
    const load = [loadAvg1m()];
    for (let i = 0; i < runs; i++) {
      let t0 = performance.now();
      await oneByOne(jobs, models);
      samples.single.push(performance.now() - t0);
      t0 = performance.now();
      await generateBatched(jobs, models);
      samples.batched.push(performance.now() - t0);
    }
    load.push(loadAvg1m());
    const single = timingStats(samples.single);
    const batched = timingStats(samples.batched);
    const ratio = single.medianMs / batched.medianMs;
    const common = { jobs: jobs.length, stacks: STACKS.map((s) => s.map((l) => `${l.name}:${l.te}/${l.unet}`).join('+') || 'none'), sizePx, steps, sampler: 'DPM++ 2M', device: await provider(), load1m: load };
    emit({ record: 'batch_one_by_one', ...common, unetCallsPerRender: aloneCalls, timing: single });
    emit({ record: 'batch_batched', ...common, unetCallsPerRender: batchedCalls, maxAbsDiffFinalLatents: maxDiff, timing: batched });
    emit({ record: 'batch_ratio', ...common, oneByOneOverBatched: Math.round(ratio * 100) / 100 });
    log(`${sizePx}×${sizePx}, ${steps} steps, 8 jobs: one by one ${single.medianMs.toFixed(0)} ms (±${single.madMs.toFixed(0)}, ${aloneCalls} UNet calls), batched ${batched.medianMs.toFixed(0)} ms (±${batched.madMs.toFixed(0)}, ${batchedCalls} calls); ${ratio.toFixed(2)}× faster batched; max |Δ latents| ${maxDiff}; load ${load.join('→')}`);
  }
} finally {
  await engine.dispose();
}
