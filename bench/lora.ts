/**
 * LoRA adapter-bank overhead at the real SD 1.5 size (random weights, 512×512, batch 2):
 * UNet forward time for the plain graph (no bank inputs), the bank graph with K = 0, K = 1 and K = 4
 * resident rank-32 LoRAs, and the fused variant (K = 1 baked into the weights), in one run, as
 * ratios to the plain graph. Goal (issue 4): bank overhead ≤ 5 % at K = 1.
 *
 * Correctness first: the bank (K = 1) and the fused variant must agree (same LoRA, same strength).
 *
 *   npm run bench:lora [-- --runs 3 --warmup 1]
 *
 * Prints JSON lines on stdout and a summary on stderr.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { parseArgs } from 'node:util';
import { AdapterStack, Sd15Engine, type AdapterUse, type LoadedLora, type Tensor } from '../models/index.ts';
import { defaultBenchWorkDir, prepareRandomSd15Model } from './random-weights.ts';
import { writeRandomLora, RANDOM_LORA_RANK as RANK } from './random-lora.ts';
import { runConditions } from './run-conditions.ts';
import { SeededRandom } from './seeded-random.ts';
import { timingStats } from './timing-stats.ts';

const BATCH = 2;
const LATENT = 64;
const CONTEXT = [BATCH, 77, 768];

const { values } = parseArgs({ options: { runs: { type: 'string', default: '3' }, warmup: { type: 'string', default: '1' }, threads: { type: 'string' } } });
const runs = Number(values.runs);
const warmup = Number(values.warmup);
const threads = values.threads === undefined ? os.cpus().length : Number(values.threads);
const log = (line: string) => process.stderr.write(`[bench:lora] ${line}\n`);
const emit = (record: Record<string, unknown>) => process.stdout.write(`${JSON.stringify({ ...runConditions(threads), ...record })}\n`);

function randomTensor(seed: number, label: string, shape: number[]): Tensor<'float32'> {
  const data = new Float32Array(shape.reduce((a, b) => a * b, 1));
  new SeededRandom(seed, label).fillUniform(data, 1);
  return { dtype: 'float32', shape, data };
}

async function time(label: string, fn: () => Promise<Float32Array>): Promise<{ medianMs: number; out: Float32Array }> {
  let out: Float32Array = new Float32Array();
  for (let i = 0; i < warmup; i++) out = await fn();
  const samples: number[] = [];
  for (let i = 0; i < runs; i++) {
    const t0 = performance.now();
    out = await fn();
    samples.push(performance.now() - t0);
  }
  const stats = timingStats(samples);
  emit({ record: 'lora_forward', variant: label, batch: BATCH, resolutionPx: LATENT * 8, rank: RANK, timing: stats });
  log(`${label}: median ${stats.medianMs.toFixed(0)} ms (${stats.minMs.toFixed(0)}–${stats.maxMs.toFixed(0)}, n=${stats.runs})`);
  return { medianMs: stats.medianMs, out };
}

const work = defaultBenchWorkDir();
const model = prepareRandomSd15Model(work, 1234, log);
const loraDir = path.join(work, 'loras');
fs.mkdirSync(loraDir, { recursive: true });
const loraFiles = [0, 1, 2, 3].map((k) => path.join(loraDir, `random-unet-r${RANK}-${k}.safetensors`));
loraFiles.forEach((f, k) => writeRandomLora(f, 100 + k));
const cacheDir = path.join(work, 'cache');

const sample = randomTensor(1, 'sample', [BATCH, 4, LATENT, LATENT]);
const context = randomTensor(2, 'context', CONTEXT);
const timestep: Tensor = { dtype: 'float32', shape: [1], data: new Float32Array([500]) };

const medians: Record<string, number> = {};
const outputs: Record<string, Float32Array> = {};
const variants: Array<[string, (loras: LoadedLora[]) => AdapterUse | undefined]> = [
  ['plain', () => undefined],
  ['bank K=0', () => ({ mode: 'bank', stack: new AdapterStack([]), mix: [[], []] })],
  ['bank K=1', (l) => bankUse(l.slice(0, 1))],
  ['bank K=4', (l) => bankUse(l)],
  ['fused K=1', (l) => ({ mode: 'merged', stack: stackOf(l.slice(0, 1)) })],
];

function stackOf(loras: readonly LoadedLora[]): AdapterStack {
  return new AdapterStack(loras.map((l) => ({ path: l.path, name: l.name, modules: l.modules, te: 1, unet: 1 })));
}
function bankUse(loras: readonly LoadedLora[]): AdapterUse {
  const stack = stackOf(loras);
  return { mode: 'bank', stack, mix: Array.from({ length: BATCH }, () => stack.strengths('unet')) };
}

for (const [label, use] of variants) {
  // A fresh engine per variant: one session (~4–8 GB at this size) in memory at a time.
  const engine = Sd15Engine.open(model.dir, { device: 'cpu', cacheDir, threads });
  try {
    const loras = label === 'plain' || label === 'bank K=0' ? [] : loraFiles.map((f) => engine.loadLora(f));
    const adapters = use(loras);
    const t0 = performance.now();
    await engine.runUnet({ sample, timestep, encoderHiddenStates: context }, {}, adapters);
    log(`${label}: session + first forward ${((performance.now() - t0) / 1000).toFixed(1)} s`);
    const r = await time(label, async () => (await engine.runUnet({ sample, timestep, encoderHiddenStates: context }, {}, adapters)).noise_pred!.data);
    medians[label] = r.medianMs;
    outputs[label] = r.out;
  } finally {
    await engine.dispose();
  }
}

// Correctness: the bank and the fused variant apply the same LoRA.
const a = outputs['bank K=1']!;
const b = outputs['fused K=1']!;
const base = outputs.plain!;
let maxDiff = 0;
let change = 0;
for (let i = 0; i < a.length; i++) {
  maxDiff = Math.max(maxDiff, Math.abs(a[i]! - b[i]!));
  change = Math.max(change, Math.abs(a[i]! - base[i]!));
}
const ratios = Object.fromEntries(Object.entries(medians).map(([k, v]) => [k, Math.round((v / medians.plain!) * 1000) / 1000]));
emit({ record: 'lora_summary', bankVsFusedMaxAbsDiff: maxDiff, loraMaxAbsChange: change, ratioToPlain: ratios, medianMs: medians });
log(`bank K=1 vs fused K=1: max |diff| ${maxDiff.toExponential(2)} (the LoRA changes the output by up to ${change.toExponential(2)})`);
log(`ratios to the plain graph: ${Object.entries(ratios).map(([k, v]) => `${k} ${v}`).join(', ')}`);
