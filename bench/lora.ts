/**
 * LoRA adapter-bank overhead at the real SD 1.5 size (random weights, 512×512, batch 2):
 * UNet forward time at K = 0 (no LoRA: the engine runs the plain graph), the bank graph with K = 1
 * and K = 4 resident rank-32 LoRAs, and the fused variant (K = 1 baked into the weights), in one run,
 * as ratios to K = 0. Goal (issue 4): bank overhead ≤ 5 % at K = 1. `--diagnose-k0` adds the bank
 * graph fed zero-sized adapter inputs (ONNX Runtime runs it slower than K = 1, which is why the
 * engine does not).
 *
 * The variants are measured interleaved (one forward each per round, the order rotating) in one engine
 * that holds their sessions side by side, so drift of the machine over the minutes a run takes
 * (other processes, memory state) falls on every variant alike; measured one after the other,
 * that drift alone moved ratios by ±10 %. Phase 1: plain, bank K = 1, 4 (two sessions); phase 2:
 * plain and fused (the fused variant needs its own weights copy, so it gets a fresh engine).
 *
 * Correctness first: the bank (K = 1) and the fused variant must agree (same LoRA, same strength).
 *
 *   npm run bench:lora [-- --runs 5 --warmup 2]
 *
 * Prints JSON lines on stdout and a summary on stderr.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { parseArgs } from 'node:util';
import { AdapterStack, Sd15Engine, type AdapterUse, type LoadedLora, type Tensor } from '../models/index.ts';
import { bankFeeds, mixTensor } from '../models/lora/bank.ts';
import { LORA_MIX_INPUT, bankLayersOf } from '../models/networks/adapter-bank.ts';
import { defaultBenchWorkDir, prepareRandomSd15Model } from './random-weights.ts';
import { writeRandomLora, RANDOM_LORA_RANK as RANK } from './random-lora.ts';
import { runConditions } from './run-conditions.ts';
import { SeededRandom } from './seeded-random.ts';
import { timingStats } from './timing-stats.ts';

const BATCH = 2;
const LATENT = 64;
const CONTEXT = [BATCH, 77, 768];

const { values } = parseArgs({ options: { runs: { type: 'string', default: '5' }, warmup: { type: 'string', default: '2' }, threads: { type: 'string' }, 'diagnose-k0': { type: 'boolean', default: false } } });
const diagnoseK0 = values['diagnose-k0'];
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

type Forward = () => Promise<Float32Array>;

function median(xs: readonly number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 === 1 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
}

/** `warmup` forwards each, then `runs` rounds of one forward per variant; records per variant. */
interface Measured {
  readonly medianMs: number;
  readonly out: Float32Array;
  /** Per round: this variant's time over the first variant's (its neighbour in time), then the median. */
  readonly pairedRatio: number;
}

async function interleaved(phase: string, forwards: ReadonlyArray<[string, Forward]>): Promise<Record<string, Measured>> {
  const samples = new Map<string, number[]>(forwards.map(([label]) => [label, []]));
  const outs = new Map<string, Float32Array>();
  for (const [label, fn] of forwards) {
    const t0 = performance.now();
    for (let i = 0; i < Math.max(1, warmup); i++) outs.set(label, await fn());
    log(`${phase} ${label}: session + warm-up ${((performance.now() - t0) / 1000).toFixed(1)} s`);
  }
  // One untimed interleaved round: the first round after the warm-ups ran 2.5× slower for some
  // variants (their sessions' memory paged back in after the others were built and run).
  for (const [label, fn] of forwards) outs.set(label, await fn());
  for (let round = 0; round < runs; round++) {
    // The order rotates every round, so a drift within a round favours no variant.
    for (let i = 0; i < forwards.length; i++) {
      const [label, fn] = forwards[(i + round) % forwards.length]!;
      const t0 = performance.now();
      outs.set(label, await fn());
      samples.get(label)!.push(performance.now() - t0);
    }
  }
  const result: Record<string, Measured> = {};
  const first = samples.get(forwards[0]![0])!;
  for (const [label] of forwards) {
    const stats = timingStats(samples.get(label)!);
    const pairedRatio = Math.round(median(samples.get(label)!.map((t, i) => t / first[i]!)) * 1000) / 1000;
    emit({ record: 'lora_forward', phase, variant: label, batch: BATCH, resolutionPx: LATENT * 8, rank: RANK, timing: stats, pairedRatio });
    log(`${phase} ${label}: median ${stats.medianMs.toFixed(0)} ms (${stats.minMs.toFixed(0)}–${stats.maxMs.toFixed(0)}, n=${stats.runs}); per-round ratio to ${forwards[0]![0]}, median ${pairedRatio}`);
    result[label] = { medianMs: stats.medianMs, out: outs.get(label)!, pairedRatio };
  }
  return result;
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

function stackOf(loras: readonly LoadedLora[]): AdapterStack {
  return new AdapterStack(loras.map((l) => ({ path: l.path, name: l.name, modules: l.modules, te: 1, unet: 1 })));
}
function bankUse(loras: readonly LoadedLora[]): AdapterUse {
  const stack = stackOf(loras);
  return { mode: 'bank', stack, mix: Array.from({ length: BATCH }, () => stack.strengths('unet')) };
}

/** The bank graph fed zero-sized adapter inputs: a diagnostic (the engine runs K = 0 on the plain graph). */
const BANK_GRAPH_K0 = 'bank graph fed K=0';

async function phase(name: string, variants: ReadonlyArray<[string, (loras: LoadedLora[]) => AdapterUse | undefined]>): Promise<Record<string, Measured>> {
  const engine = Sd15Engine.open(model.dir, { device: 'cpu', cacheDir, threads });
  try {
    const loras = loraFiles.map((f) => engine.loadLora(f));
    const forwards = variants.map(([label, use]): [string, Forward] => {
      if (label === BANK_GRAPH_K0) {
        const feeds = { ...bankFeeds(bankLayersOf(engine.buildGraph('unet', { adapterBank: true })), 'unet', []), [LORA_MIX_INPUT]: mixTensor([[], []], 0) };
        return [
          label,
          async () => {
            const session = await engine.session('unet', { adapterBank: true });
            return (await session.run(engine.widenedFeeds(session, { ...feeds, sample, timestep, encoder_hidden_states: context }), ['noise_pred'])).noise_pred!.data as Float32Array;
          },
        ];
      }
      const adapters = use(loras);
      return [label, async () => (await engine.runUnet({ sample, timestep, encoderHiddenStates: context }, {}, adapters)).noise_pred!.data];
    });
    return await interleaved(name, forwards);
  } finally {
    await engine.dispose();
  }
}

const phase1 = await phase('phase 1', [
  ['plain', () => undefined],
  ['bank K=1', (l) => bankUse(l.slice(0, 1))],
  ['bank K=4', (l) => bankUse(l)],
  ...(diagnoseK0 ? [[BANK_GRAPH_K0, () => undefined] as [string, () => undefined]] : []),
]);
const phase2 = await phase('phase 2', [
  ['plain', () => undefined],
  ['fused K=1', (l) => ({ mode: 'merged', stack: stackOf(l.slice(0, 1)) })],
]);
const medians: Record<string, number> = Object.fromEntries(Object.entries(phase1).map(([k, v]) => [k, v.medianMs]));
medians['fused K=1'] = (phase2['fused K=1']!.medianMs / phase2.plain!.medianMs) * medians.plain!; // phase 2's ratio, on phase 1's scale
const outputs: Record<string, Float32Array> = { plain: phase1.plain!.out, 'bank K=1': phase1['bank K=1']!.out, 'fused K=1': phase2['fused K=1']!.out };

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
const paired: Record<string, number> = { ...Object.fromEntries(Object.entries(phase1).map(([k, v]) => [k, v.pairedRatio])), 'fused K=1': phase2['fused K=1']!.pairedRatio };
emit({ record: 'lora_summary', bankVsFusedMaxAbsDiff: maxDiff, loraMaxAbsChange: change, ratioToK0: ratios, pairedRatioToK0: paired, medianMs: medians });
log(`bank K=1 vs fused K=1: max |diff| ${maxDiff.toExponential(2)} (the LoRA changes the output by up to ${change.toExponential(2)})`);
log(`ratios of medians to K = 0 (the plain graph, which the engine runs when no LoRA is active): ${Object.entries(ratios).map(([k, v]) => `${k} ${v}`).join(', ')}`);
log(`median per-round ratios to K = 0 (each forward over the plain forward of its round): ${Object.entries(paired).map(([k, v]) => `${k} ${v}`).join(', ')}`);
