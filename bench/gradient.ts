/**
 * Cost of the gradient-guided strategies relative to a plain run of the same steps (issue 6):
 *
 * 1. tiny fixture model, 256×256, the official configurations run end to end through `generate`:
 *    - CLoRA, notebook: P = 3 slots (base + 2 concept LoRAs), 100 DDIM steps, CFG 10, updates at
 *      i < 50, 20 extra rounds at steps 0, 10, 20 (110 gradient evaluations), vs plain CFG, 100 steps;
 *      also with unbatched slots (one CFG pair per UNet call) for the batching effect;
 *    - LoRA-Composer, official script: 2 concept boxes, 50 DPM++ 2M steps, CFG 7.5, vs plain, 50 steps;
 * 2. per-operation timings, tiny and SD 1.5 size (random weights, 512×512): the plain CFG pass, a
 *    CLoRA slot forward (LoRA bank, maps), the maps-only pass, the VJP; LoRA-Composer's regions CFG
 *    pass, regions maps-only pass and regions VJP. The official schedules' totals follow from them
 *    (the tiny real runs check that model). SD-size operations run one session at a time, CLoRA's
 *    at its 6 slot samples per call (a 6-sample VJP call peaks at ≈ 14 GiB RSS with its weights).
 *
 * 3. `--only sd15-runs` (not in the default set, ≈ 35 min): CLoRA end to end through `generate` at SD 1.5
 *    size (random weights, two random rank-32 LoRAs, P = 3, 512²) with the notebook schedule scaled to
 *    10 DDIM steps (updates at steps 0–4, 6 extra rounds at step 0: 11 gradient evaluations per 10
 *    steps, as the notebook's 110 per 100), vs plain CFG, 10 steps. On a 24 GB machine this runs the
 *    one-pass updates with the gradient session alone (`exclusivePasses`); reports peak RSS too. Each
 *    variant runs one job of two images and the second is timed (the first builds the sessions).
 *
 *   node --import tsx bench/gradient.ts [--only tiny-runs,tiny-ops,sd15,sd15-runs] [--runs 2] [--threads 2]
 *
 * Correctness first: the fixture runs (clora/seed53, lora_composer/seed1174) must reproduce their
 * reference final latents before anything is timed. JSON lines on stdout (each with the run
 * conditions and the 1-minute load average: other processes may share the machine), a summary on stderr.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { parseArgs } from 'node:util';
import { AdapterStack, Sd15Engine, openSafetensors, type AdapterUse, type RegionInputs, type Tensor } from '../models/index.ts';
import { engineModels, generate, normalizeJob, type GenerateJob, type JobInput } from '../pipelines/index.ts';
import type { DenoiseRequest, DenoiserModel } from '../pipelines/models.ts';
import { cloraLoss, type CloraPlan } from '../pipelines/strategies/clora.ts';
import { FIXTURES, REF, readManifest } from '../test/fixtures.ts';
import { defaultBenchWorkDir, prepareRandomSd15FullModel, prepareRandomSd15Model } from './random-weights.ts';
import { writeRandomLora } from './random-lora.ts';
import { loadAvg1m, maxRssMiB, runConditions } from './run-conditions.ts';
import { timeRuns } from './timing-stats.ts';

const { values } = parseArgs({ options: { only: { type: 'string' }, runs: { type: 'string', default: '2' }, threads: { type: 'string' } } });
const only = values.only?.split(',') ?? ['tiny-runs', 'tiny-ops', 'sd15'];
// Not in the default set (≈ 20 min): CLoRA end to end at SD 1.5 size, 512², reduced steps.
// `sd15-runs` runs it.
const runs = Number(values.runs);
const threads = values.threads === undefined ? os.cpus().length : Number(values.threads);
const log = (line: string) => process.stderr.write(`[bench:gradient] ${line}\n`);
const emit = (record: Record<string, unknown>) => process.stdout.write(`${JSON.stringify({ ...runConditions(threads), loadAvg1m: loadAvg1m(), ...record })}\n`);
const MODEL = path.join(FIXTURES, 'tiny-sd15');
const LORAS = path.join(FIXTURES, 'tiny-sd15-lora');
const cacheDir = path.join(defaultBenchWorkDir(), 'cache');
const round3 = (x: number) => Math.round(x * 1000) / 1000;

/** Official schedule counts (methods.md 3.3 and 5.3). */
const CLORA_NOTEBOOK = { steps: 100, slots: 3, updates: 110, extraRounds: 60 };
const COMPOSER_OFFICIAL = { steps: 50, maxRefinements: 26 };

// ---- 1. tiny: correctness, then the official configurations end to end -------------------------

const manifest = readManifest(path.join(REF, 'gradient_methods_manifest.json'));
const caseOf = (id: string) => manifest.cases.find((c: { id: string }) => c.id === id);

function cloraJob(steps: number, knobs: Record<string, unknown>): GenerateJob {
  const c = caseOf('clora/seed53_256x256');
  return normalizeJob({
    model: MODEL,
    prompt: c.slots[0].prompt,
    negativePrompt: 'nsfw',
    steps,
    cfgScale: 10,
    sampler: 'DDIM',
    width: 256,
    height: 256,
    seed: 53,
    strategy: {
      name: 'clora',
      concepts: [
        { words: 'sks dog', otherWords: 'dog', prompt: c.slots[1].prompt, lora: { name: path.join(LORAS, c.slots[1].lora), te: 1, unet: 1 } },
        { words: 'sks cat', otherWords: 'cat', prompt: c.slots[2].prompt, lora: { name: path.join(LORAS, c.slots[2].lora), te: 1, unet: 1 } },
      ],
      clora: knobs,
    },
  });
}

function composerJob(steps: number): GenerateJob {
  const c = caseOf('lora_composer/seed1174_256x256');
  return normalizeJob({
    model: MODEL,
    prompt: c.prompt,
    negativePrompt: c.negative_prompt,
    steps,
    cfgScale: 7.5,
    sampler: 'DPM++ 2M',
    scheduleType: 'Uniform',
    width: 256,
    height: 256,
    seed: 1174,
    regions: c.regions.map((r: { box_px_top_left_bottom_right: number[]; prompt: string; lora: string }) => {
      const [top, left, bottom, right] = r.box_px_top_left_bottom_right as [number, number, number, number];
      return { box: [left, top, right - left, bottom - top], prompt: r.prompt, lora: { name: path.join(LORAS, r.lora), te: 1, unet: 1 } };
    }),
    strategy: { name: 'lora-composer', concepts: [{ words: 'sks dog' }, { words: 'ohwx cat' }] },
  });
}

const plainOf = (job: GenerateJob): GenerateJob => normalizeJob({ ...(job as unknown as JobInput), seed: job.seed, regions: [], strategy: { name: 'plain' } });

async function tiny(): Promise<void> {
  const engine = Sd15Engine.open(MODEL, { device: 'cpu', cacheDir, threads });
  const models = engineModels(engine, { loraDirs: [LORAS] });
  const ref = openSafetensors(path.join(REF, 'gradient_methods.safetensors'));
  try {
    // Correctness first: the fixture configurations reproduce their reference runs.
    for (const [id, job, atol] of [
      ['clora/seed53_256x256', cloraJob(10, { maskThreshold: 0.6, refineRounds: 4 }), 2e-2],
      ['lora_composer/seed1174_256x256', composerJob(10), 7e-3],
    ] as const) {
      const key = `${id.replace('/', '.')}`;
      const result = await generate(job, models, { initLatents: ref.readFloat32(`${key}.latents_init`) });
      const expected = ref.readFloat32(`${key}.final_latents`).data;
      let diff = 0;
      result.images[0]!.finalLatents.data.forEach((v, i) => (diff = Math.max(diff, Math.abs(v - expected[i]!))));
      if (!(diff <= atol)) throw new Error(`${id}: final latents differ from the reference by ${diff} > ${atol}; not timing a wrong result`);
      emit({ record: 'gradient_correctness', setting: 'tiny', case: id, finalLatentsMaxAbsDiff: diff, atol });
      log(`correctness: ${id} final latents max |Δ| ${diff.toExponential(2)} (atol ${atol})`);
    }
    const variants: Array<{ label: string; job: GenerateJob; maxBatch?: number; against: string }> = [
      { label: 'plain, 100 DDIM steps', job: plainOf(cloraJob(100, {})), against: '' },
      { label: 'clora notebook (P = 3)', job: cloraJob(100, {}), against: 'plain, 100 DDIM steps' },
      { label: 'clora notebook, unbatched slots', job: cloraJob(100, {}), maxBatch: 2, against: 'plain, 100 DDIM steps' },
      { label: 'plain, 50 DPM++ 2M steps', job: plainOf(composerJob(50)), against: '' },
      { label: 'lora-composer official', job: composerJob(50), against: 'plain, 50 DPM++ 2M steps' },
    ];
    const times: Record<string, number> = {};
    for (const v of variants) {
      const options = v.maxBatch === undefined ? {} : { maxBatch: v.maxBatch };
      const counts = { updates: 0 };
      const { timing, cpuTime } = await timeRuns(1, runs, async () => {
        counts.updates = 0;
        await generate(v.job, models, { ...options, onStrategyEvent: (e) => void (e.kind === 'update' && counts.updates++) });
      });
      times[v.label] = timing.medianMs;
      const ratio = v.against === '' ? undefined : round3(timing.medianMs / times[v.against]!);
      emit({ record: 'gradient_run', setting: 'tiny', variant: v.label, steps: v.job.steps, size: '256x256', gradientUpdates: counts.updates, timing, cpuTime, ...(ratio === undefined ? {} : { overPlain: ratio }) });
      log(`tiny ${v.label}: ${(timing.medianMs / 1000).toFixed(2)} s/image${counts.updates > 0 ? `, ${counts.updates} gradient updates` : ''}${ratio === undefined ? '' : `, ${ratio}× plain`} (load ${loadAvg1m()})`);
    }
  } finally {
    ref.close();
    await engine.dispose();
  }
}

// ---- 2. per-operation timings and the official schedules' totals ---------------------------------

interface OpShapes {
  readonly latent: number;
  readonly dim: number;
  readonly levels: readonly number[];
}

function noise(shape: number[], seed: number, scale = 1): Tensor<'float32'> {
  let s = seed >>> 0;
  return { dtype: 'float32', shape, data: Float32Array.from({ length: shape.reduce((a, b) => a * b, 1) }, () => ((s = (Math.imul(s, 1103515245) + 12345) >>> 0) / 4294967296 - 0.5) * 2 * scale) };
}

/** Two half-image boxes (left, right) on every level. */
function halves(levels: readonly number[]): Tensor<'float32'>[] {
  return levels.map((s) => {
    const data = new Float32Array(2 * s * s);
    for (let i = 0; i < s; i++) for (let j = 0; j < s; j++) data[(j < s / 2 ? 0 : s * s) + i * s + j] = 1;
    return { dtype: 'float32', shape: [1, 2, s, s], data };
  });
}

function requestOf(shapes: OpShapes, batch: number, adapters: AdapterUse | undefined, regions: RegionInputs | undefined, extra: Partial<DenoiseRequest> = {}): DenoiseRequest {
  const s = shapes.latent;
  return {
    sample: noise([batch, 4, s, s], 1),
    timestep: 500,
    context: noise([batch, 77, shapes.dim], 2),
    ...(adapters === undefined ? {} : { adapters }),
    ...(regions === undefined ? {} : { regions, regionIsolation: true, regionOutputAdapters: true }),
    ...extra,
  };
}

/**
 * One operation in its own engine (one session alive at a time): warm-up calls (the session build,
 * then ONNX Runtime's first runs, several times slower than the steady state), then the median of
 * the timed calls. Returns ms per sample.
 */
async function timeOp(setting: string, label: string, open: () => Sd15Engine, loraFiles: readonly string[], shapes: OpShapes, op: { batch: number; kind: 'predict' | 'maps' | 'vjp'; loras: boolean; regions: boolean }): Promise<number> {
  const engine = open();
  try {
    const denoiser: Required<DenoiserModel> = engineModels(engine).denoiser as Required<DenoiserModel>;
    const loras = loraFiles.map((f) => engine.loadLora(f));
    const stack = new AdapterStack(loras.map((l) => ({ path: l.path, name: l.name, modules: l.modules, te: 1, unet: 1 })));
    const K = stack.size;
    // CLoRA's mix rows: element b belongs to slot ⌊b/2⌋ (slot 0 = no LoRA, slot k = LoRA k − 1); regions: no global LoRA.
    const oneHot = (b: number) => Array.from({ length: K }, (_, k) => (!op.regions && k === (Math.floor(b / 2) % (K + 1)) - 1 ? 1 : 0));
    const adapters: AdapterUse | undefined = op.loras ? { mode: 'bank', stack, mix: Array.from({ length: op.batch }, (_, b) => oneHot(b)) } : undefined;
    const levels = shapes.levels;
    const regions: RegionInputs | undefined = op.regions
      ? {
          context: noise([op.batch, 2, 77, shapes.dim], 3),
          masks: halves(levels).map((m) => ({ ...m, shape: [op.batch, 2, ...m.shape.slice(2)], data: Float32Array.from({ length: op.batch * m.data.length }, (_, i) => m.data[i % m.data.length]!) })),
          mix: { dtype: 'float32', shape: [op.batch, 2, K], data: Float32Array.from({ length: op.batch * 2 * K }, (_, i) => (Math.floor(i / K) % 2 === i % K ? 1 : 0)) },
          mixMaps: levels.map((s) => noise([op.batch, K, s, s], 4, 0)),
        }
      : undefined;
    const q = (shapes.latent / 4) ** 2;
    const request = requestOf(shapes, op.batch, adapters, regions, op.kind === 'predict' && op.loras ? { attentionMaps: true } : {});
    const fn =
      op.kind === 'predict'
        ? () => denoiser.predict(request)
        : op.kind === 'maps'
          ? () => denoiser.maps(request)
          : () => denoiser.vjp(request, { xattn: noise([op.batch, q, 77], 5), selfattn: noise([op.batch, q, q], 6), ...(op.regions ? { xattnRegion: noise([op.batch, 2, q, 77], 7) } : {}) });
    const { timing, cpuTime } = await timeRuns(setting === 'tiny' ? 4 : 2, setting === 'tiny' ? 5 * runs : runs, fn);
    emit({ record: 'gradient_op', setting, op: label, batch: op.batch, timing, cpuTime, maxRssMiB: maxRssMiB() });
    log(`${setting} ${label} (batch ${op.batch}): ${(timing.medianMs / 1000).toFixed(3)} s, peak RSS ${(maxRssMiB() / 1024).toFixed(1)} GiB (load ${loadAvg1m()})`);
    return timing.medianMs / op.batch;
  } finally {
    await engine.dispose();
  }
}

/** The host side of one CLoRA update (NT-Xent and its cotangents for P = 3 slots), per update. */
async function timeCloraLoss(setting: string, q: number): Promise<number> {
  const side = Math.sqrt(q);
  const plan: CloraPlan = { slots: [], groups: [[[2], [6], [2, 3]], [[5], [2, 3], [6]]], maskTokens: [[], [2, 3], [2, 3]], mapGrid: [side, side], latentGrid: [4 * side, 4 * side] };
  const maps = [0, 1, 2].map((p) => Float32Array.from(noise([q * 77], 10 + p).data, (v) => Math.abs(v)));
  const { timing } = await timeRuns(2, 20, async () => cloraLoss(plan, maps, 1, [77, 77, 77], 0.5));
  emit({ record: 'gradient_op', setting, op: 'clora loss + cotangents (host)', timing });
  return timing.medianMs;
}

async function perOperation(setting: 'tiny' | 'sd15', modelDir: string, loraFiles: readonly string[], shapes: OpShapes, perCallBatch: { slots: number; single: number }): Promise<void> {
  const open = () => Sd15Engine.open(modelDir, { device: 'cpu', cacheDir, threads });
  const b = perCallBatch.slots;
  // Per-sample times (ms).
  const plain = await timeOp(setting, 'plain CFG pass', open, loraFiles, shapes, { batch: 2, kind: 'predict', loras: false, regions: false });
  const slotForward = await timeOp(setting, 'clora slot forward (bank, maps)', open, loraFiles, shapes, { batch: b, kind: 'predict', loras: true, regions: false });
  const mapsOnly = await timeOp(setting, 'clora maps-only pass', open, loraFiles, shapes, { batch: b, kind: 'maps', loras: true, regions: false });
  const vjp = await timeOp(setting, 'clora VJP', open, loraFiles, shapes, { batch: b, kind: 'vjp', loras: true, regions: false });
  const regionsCfg = await timeOp(setting, 'lora-composer regions CFG pass', open, loraFiles, shapes, { batch: 2, kind: 'predict', loras: true, regions: true });
  const regionsMaps = await timeOp(setting, 'lora-composer regions maps-only pass', open, loraFiles, shapes, { batch: perCallBatch.single, kind: 'maps', loras: true, regions: true });
  const regionsVjp = await timeOp(setting, 'lora-composer regions VJP', open, loraFiles, shapes, { batch: perCallBatch.single, kind: 'vjp', loras: true, regions: true });
  const loss = await timeCloraLoss(setting, (shapes.latent / 4) ** 2);

  // CLoRA notebook: every step all P slots × 2 (2P samples); 110 updates at 50 update steps (60 of
  // them extra rounds whose ε are discarded).
  // - `clora`, all 2P samples of an image in one UNet call: every update is one pass (UNet, loss and
  //   VJP in one graph; the loss ops are a few small tensors). Extra rounds: the truncated pass, timed
  //   as the VJP. The last round of an update step: the whole UNet plus the same backward, i.e. the
  //   slot forward plus the VJP less the truncated forward it shares (vjp − mapsOnly).
  // - `cloraTwoPass`, when the slots need several calls (memory): full or maps-only forward, the loss
  //   on the host, then the VJP pass, which recomputes the truncated forward.
  const { steps, slots, updates, extraRounds } = CLORA_NOTEBOOK;
  const samples = 2 * slots;
  const updateSteps = updates - extraRounds;
  const clora = (steps - updateSteps) * samples * slotForward + updateSteps * samples * (slotForward + vjp - mapsOnly) + extraRounds * samples * vjp;
  const cloraTwoPass = steps * samples * slotForward + updates * (samples * vjp + loss) + extraRounds * samples * mapsOnly;
  const plainClora = steps * 2 * plain;
  // LoRA-Composer: every step a regions CFG pass (2 samples); re-init and each refinement a maps-only pass (1 sample), each refinement a VJP.
  const composer = (refinements: number) => COMPOSER_OFFICIAL.steps * 2 * regionsCfg + (1 + refinements) * regionsMaps + refinements * regionsVjp;
  const plainComposer = COMPOSER_OFFICIAL.steps * 2 * plain;
  const summary = {
    record: 'gradient_model',
    setting,
    perSampleMs: { plain: round3(plain), slotForward: round3(slotForward), mapsOnly: round3(mapsOnly), vjp: round3(vjp), regionsCfg: round3(regionsCfg), regionsMaps: round3(regionsMaps), regionsVjp: round3(regionsVjp), cloraLossPerUpdate: round3(loss) },
    vjpOverForward: round3(vjp / slotForward),
    cloraNotebookOverPlain: round3(clora / plainClora),
    cloraNotebookTwoPassOverPlain: round3(cloraTwoPass / plainClora),
    cloraNotebookMinutes: round3(clora / 60000),
    composerOverPlainWorstCase: round3(composer(COMPOSER_OFFICIAL.maxRefinements) / plainComposer),
    composerOverPlainEarlyStopAt5: round3(composer(6) / plainComposer),
  };
  emit(summary);
  log(`${setting}: VJP/forward ${summary.vjpOverForward}; CLoRA notebook ≈ ${summary.cloraNotebookOverPlain}× plain with one-pass updates (two-pass updates: ${summary.cloraNotebookTwoPassOverPlain}×); LoRA-Composer ≈ ${summary.composerOverPlainWorstCase}× plain (26 refinements), ${summary.composerOverPlainEarlyStopAt5}× (6)`);
}

const work = defaultBenchWorkDir();
fs.mkdirSync(work, { recursive: true });
if (only.includes('tiny-runs')) await tiny();
if (only.includes('tiny-ops')) {
  await perOperation('tiny', MODEL, [path.join(LORAS, 'lora_kohya_a.safetensors'), path.join(LORAS, 'lora_kohya_b_locon.safetensors')], { latent: 32, dim: 32, levels: [32, 16, 8, 4] }, { slots: 6, single: 1 });
}
const sd15Loras = (): string[] => {
  const dir = path.join(work, 'loras');
  fs.mkdirSync(dir, { recursive: true });
  return [0, 1].map((k) => {
    const f = path.join(dir, `random-unet-r32-${k}.safetensors`);
    writeRandomLora(f, 100 + k);
    return f;
  });
};
if (only.includes('sd15-runs')) {
  const model = prepareRandomSd15FullModel(work, 1234, log);
  const [dogLora, catLora] = sd15Loras() as [string, string];
  const engine = Sd15Engine.open(model.dir, { device: 'cpu', cacheDir, threads });
  const models = engineModels(engine);
  const steps = 10;
  const base = { model: model.dir, negativePrompt: 'blurry', steps, cfgScale: 10, sampler: 'DDIM', width: 512, height: 512, seed: 53 };
  const clora = normalizeJob({
    ...base,
    prompt: 'a photo of a dog and a cat',
    strategy: {
      name: 'clora',
      concepts: [
        { words: 'sks dog', otherWords: 'dog', prompt: 'a photo of a sks dog and a cat', lora: { name: dogLora, te: 1, unet: 1 } },
        { words: 'sks cat', otherWords: 'cat', prompt: 'a photo of a dog and a sks cat', lora: { name: catLora, te: 1, unet: 1 } },
      ],
      clora: { updateUntil: 5, refineSteps: [0], refineRounds: 6 },
    },
  });
  const plain = plainOf(clora);
  try {
    const times: Record<string, number> = {};
    for (const [label, job] of [['plain', plain], ['clora', clora]] as const) {
      let updates = 0;
      // One job of two images (batch count 2): the first builds the sessions (minutes at this size)
      // and, for CLoRA, writes ONNX Runtime's optimized copies; the second is what each further
      // image of a batch costs. CLoRA on a machine short of memory runs its gradient session alone
      // (`exclusivePasses`): on the CPU its forward passes run through that session too, so it is
      // built once per job; elsewhere both sessions are rebuilt (from the copies) for every image.
      const stamps: number[] = [performance.now()];
      await generate({ ...job, batchCount: 2 }, models, {
        onStrategyEvent: (e, batch) => void (e.kind === 'update' && batch === 1 && updates++),
        onImage: () => void stamps.push(performance.now()),
      });
      const [t0, t1, t2] = stamps as [number, number, number];
      times[label] = t2 - t1;
      const ratio = label === 'clora' ? round3(times.clora! / times.plain!) : undefined;
      emit({ record: 'gradient_run', setting: 'sd15', variant: label, steps, size: '512x512', gradientUpdates: updates, firstImageMs: Math.round(t1 - t0), ms: Math.round(times[label]!), maxRssMiB: maxRssMiB(), ...(ratio === undefined ? {} : { overPlain: ratio }) });
      log(`sd15 ${label}, 10 DDIM steps at 512²: ${(times[label]! / 1000).toFixed(1)} s/image (first image ${((t1 - t0) / 1000).toFixed(1)} s)${updates > 0 ? `, ${updates} gradient updates` : ''}${ratio === undefined ? '' : `, ${ratio}× plain`}, peak RSS ${(maxRssMiB() / 1024).toFixed(1)} GiB (load ${loadAvg1m()})`);
    }
  } finally {
    await engine.dispose();
  }
}
if (only.includes('sd15')) {
  const model = prepareRandomSd15Model(work, 1234, log);
  const files = sd15Loras();
  // CLoRA's 2P = 6 slot samples per call, one session alive at a time (as `exclusivePasses` runs them).
  await perOperation('sd15', model.dir, files, { latent: 64, dim: 768, levels: [64, 32, 16, 8] }, { slots: 6, single: 1 });
}
