/**
 * The denoising loop, written once. Strategies decide the branches and how to combine them; the
 * scheduler decides the timesteps and the update; this file only runs them in order:
 *
 *   x ← x_T · σ_init
 *   for each model evaluation i (timestep t_i):
 *     1. x [, outputs] ← strategy.update(i, x, tools)   optional: gradient-guided latent updates
 *     2. branches ← strategy.branches(i)                 (unless the update brought the outputs)
 *     3. run the denoiser on x_in = scheduler.scaleModelInput(x, i) for every branch, batched
 *        (branches with equal context length and pass share calls)
 *     4. ε ← strategy.combine(i, outputs)
 *     5. x ← scheduler.step(ε, i, x [, noise_i])        noise_i drawn only by ancestral schedulers
 *     6. report progress (and honour cancellation)
 */
import type { AdapterStack, AdapterUse, RegionInputs, Tensor } from '../models/index.ts';
import { ntXentFeeds } from '../models/index.ts';
import { PipelineError } from './errors.ts';
import type { DenoiseMaps, DenoiseRequest, DenoiserModel } from './models.ts';
import type { Scheduler } from './schedulers/types.ts';
import type { Branch, BranchMaps, BranchOutput, BranchRegions, LatentTools, MapCotangents, StepContext, Strategy } from './strategies/types.ts';

export interface DenoiseProgress {
  readonly evaluation: number;
  readonly evaluations: number;
  readonly step: number;
  readonly timestep: number;
  /** Latents after this evaluation's scheduler step (B, C, h, w), flat. */
  readonly latents: Float32Array;
}

export interface DenoiseRun<S> {
  readonly scheduler: Scheduler;
  readonly strategy: Strategy<S>;
  readonly denoiser: DenoiserModel;
  /** Initial noise x_T (unscaled N(0, 1)), shape `shape`. */
  readonly initialNoise: Float32Array;
  /** (B, C, h, w) */
  readonly shape: readonly [number, number, number, number];
  /** Sampling steps asked for (prompt schedules count in these, not in model evaluations). */
  readonly steps: number;
  /** Fresh N(0, 1) noise for evaluation i, drawn only when the scheduler needs it. */
  readonly noise: (evaluation: number) => Float32Array;
  /**
   * The LoRA stack of the run: `bank` evaluates each branch with its own mix row (runtime inputs);
   * `merged` uses weights with the stack baked in (every branch must use the stack's strengths).
   */
  readonly adapters?: { readonly stack: AdapterStack; readonly mode: 'bank' | 'merged' };
  /** Largest batch per denoiser call (images × branches); larger groups are split. */
  readonly maxBatch?: number;
  /** Largest batch per VJP call (`LatentTools.vjp` / `ntXentVjp`); default maxBatch. */
  readonly maxGradientBatch?: number;
  /**
   * `LatentTools.maps` through the full forward (the maps are among its outputs) instead of the
   * truncated maps-only graph: twice the compute for those passes, one UNet session less in memory.
   */
  readonly mapsFromFullPass?: boolean;
  /**
   * `LatentTools.ntXentVjp` always through the whole-UNet graph instead of the truncated one for
   * rounds whose ε are not used: one gradient session instead of two (SD 1.5 at 512²: ≈ 12 GiB
   * each). Those rounds ask it to skip ε (`skipNoisePred`): on the CPU the graph then skips the
   * layers after the maps (and the engine serves rounds without ε that way even without this
   * option); elsewhere they cost ≈ 0.45 F more per sample.
   */
  readonly oneGradientGraph?: boolean;
  readonly signal?: AbortSignal;
  readonly onProgress?: (p: DenoiseProgress) => void;
}

/** A branch context for the whole batch: (1, S, D) repeated B times, or (B, S, D) as given (one per image). */
function repeatContext(context: Tensor<'float32'>, times: number): Tensor<'float32'> {
  const [rows, seq, dim] = context.shape as [number, number, number];
  if (rows === times) return context;
  if (rows !== 1) throw new Error(`denoise: a branch context has ${rows} rows; expected 1 or the batch size ${times}`);
  const data = new Float32Array(times * seq * dim);
  for (let i = 0; i < times; i++) data.set(context.data, i * seq * dim);
  return { dtype: 'float32', shape: [times, seq, dim], data };
}

/** Stack per-branch tensors (leading dim 1) into one, each repeated for every image of the batch. */
function stackRepeated(parts: readonly Tensor<'float32'>[], batch: number): Tensor<'float32'> {
  const per = parts[0]!.data.length;
  const data = new Float32Array(parts.length * batch * per);
  parts.forEach((p, k) => {
    for (let i = 0; i < batch; i++) data.set(p.data, (k * batch + i) * per);
  });
  return { dtype: 'float32', shape: [parts.length * batch, ...parts[0]!.shape.slice(1)], data };
}

/** The region inputs of one call: each branch's slots, repeated for every image. */
function stackRegions(parts: readonly BranchRegions[], batch: number): RegionInputs {
  const first = parts[0]!;
  return {
    context: stackRepeated(parts.map((p) => p.context), batch),
    masks: first.masks.map((_, l) => stackRepeated(parts.map((p) => p.masks[l]!), batch)),
    ...(first.mix === undefined ? {} : { mix: stackRepeated(parts.map((p) => p.mix!), batch) }),
    ...(first.mixMaps === undefined ? {} : { mixMaps: first.mixMaps.map((_, l) => stackRepeated(parts.map((p) => p.mixMaps![l]!), batch)) }),
  };
}

/** The adapters of one denoiser call: each branch's mix row repeated for every image, or its per-image rows. */
function callAdapters(adapters: DenoiseRun<unknown>['adapters'], branches: readonly Branch[], batch: number): AdapterUse | undefined {
  if (adapters === undefined || adapters.stack.size === 0) return undefined;
  const { stack, mode } = adapters;
  const defaults = stack.strengths('unet');
  if (mode === 'merged') {
    const rows = branches.flatMap((b) => [...(b.mix === undefined ? [] : [b.mix]), ...(b.imageMixes ?? [])]);
    if (rows.some((row) => row.some((m, k) => m !== defaults[k]))) {
      throw new PipelineError('BAD_ARGUMENT', 'this strategy mixes LoRAs per branch, which needs the adapter bank; the merged-weights mode bakes one fixed stack.', { mode });
    }
    return { mode, stack };
  }
  return { mode, stack, mix: branches.flatMap((b) => Array.from({ length: batch }, (_, i) => b.imageMixes?.[i] ?? b.mix ?? defaults)) };
}

/** One denoiser call: the branches it evaluates (index in the step's list) and its request. */
interface PlannedCall {
  readonly members: readonly number[];
  readonly request: DenoiseRequest;
}

/**
 * Consecutive members in calls of at most `capacity`, keeping runs of members with equal `key`
 * (a CFG pair: one latent, one LoRA mix) in one call where the run fits, since the UNet runs such a
 * run's layers before the first cross-attention once per call (`sharedPrefix`). A run is split only
 * when it alone exceeds the capacity; a call is closed early rather than split a run across two.
 * With every key distinct this is the plain split into calls of `capacity`.
 */
export function packRuns(members: readonly number[], key: (member: number) => string, capacity: number): number[][] {
  const runs: number[][] = [];
  for (const m of members) {
    const last = runs.at(-1);
    if (last !== undefined && key(last[0]!) === key(m)) last.push(m);
    else runs.push([m]);
  }
  const calls: number[][] = [];
  let current: number[] = [];
  for (const run of runs) {
    for (let start = 0; start < run.length; start += capacity) {
      const piece = run.slice(start, start + capacity);
      if (current.length + piece.length > capacity) {
        if (current.length > 0) calls.push(current);
        current = [];
      }
      current.push(...piece);
    }
  }
  if (current.length > 0) calls.push(current);
  return calls;
}

/**
 * Step 3's plan: branches that can share a UNet call (same context length, same pass: full, full
 * keeping its deep feature, shallow, or regions with the same slot length and options) are stacked
 * into one call of up to `maxBatch` samples.
 */
function planCalls(branches: readonly Branch[], modelInput: Float32Array, shape: readonly number[], timestep: number, maxBatch: number, adapters: DenoiseRun<unknown>['adapters']): PlannedCall[] {
  const [batch, ...rest] = shape as [number, number, number, number];
  const groups = new Map<string, number[]>();
  branches.forEach((b, i) => {
    const r = b.regions;
    const pass = r !== undefined ? `regions${r.context.shape[2]}${r.isolation === true ? 'i' : ''}${r.outputAdapters === true ? 'o' : ''}` : b.deepFeature !== undefined ? 'shallow' : b.keepDeepFeature === true ? 'full+feature' : 'full';
    const key = `${b.context.shape[1]}|${pass}|${b.attentionMaps === true ? 'maps' : ''}`;
    groups.set(key, [...(groups.get(key) ?? []), i]);
  });
  const branchesPerCall = Math.max(1, Math.floor(maxBatch / batch));
  const calls: PlannedCall[] = [];
  for (const members of groups.values()) {
    for (const chunk of packRuns(members, (i) => JSON.stringify([branches[i]!.mix ?? null, branches[i]!.imageMixes ?? null]), branchesPerCall)) {
      const call = chunk.map((i) => ({ i, b: branches[i]! }));
      const first = call[0]!.b;
      const sample = new Float32Array(call.length * modelInput.length);
      call.forEach((_, k) => sample.set(modelInput, k * modelInput.length));
      const contexts = call.map(({ b }) => repeatContext(b.context, batch));
      const [, seq, dim] = contexts[0]!.shape as [number, number, number];
      const context = new Float32Array(call.length * batch * seq * dim);
      contexts.forEach((c, k) => context.set(c.data, k * c.data.length));
      let deepFeature: Tensor<'float32'> | undefined;
      if (first.deepFeature !== undefined) {
        const featurePer = first.deepFeature.length / batch;
        const data = new Float32Array(call.length * batch * featurePer);
        call.forEach(({ b }, k) => data.set(b.deepFeature!, k * batch * featurePer));
        deepFeature = { dtype: 'float32', shape: [call.length * batch, featurePer / (rest[1]! * rest[2]!), rest[1]!, rest[2]!], data };
      }
      const regions = first.regions === undefined ? undefined : stackRegions(call.map(({ b }) => b.regions!), batch);
      const use = callAdapters(adapters, call.map(({ b }) => b), batch);
      calls.push({
        members: call.map(({ i }) => i),
        request: {
          sample: { dtype: 'float32', shape: [call.length * batch, ...rest], data: sample },
          timestep,
          context: { dtype: 'float32', shape: [call.length * batch, seq, dim], data: context },
          ...(use === undefined ? {} : { adapters: use }),
          ...(deepFeature === undefined ? {} : { deepFeature }),
          ...(first.keepDeepFeature === true ? { wantDeepFeature: true } : {}),
          ...(regions === undefined ? {} : { regions }),
          ...(first.regions?.isolation === true ? { regionIsolation: true } : {}),
          ...(first.regions?.outputAdapters === true ? { regionOutputAdapters: true } : {}),
          ...(first.attentionMaps === true ? { attentionMaps: true } : {}),
        },
      });
    }
  }
  return calls;
}

/** Member k of a call: its slice of a (call batch, …) tensor. */
const part = (t: Tensor<'float32'>, k: number, members: number): Float32Array => {
  const per = t.data.length / members;
  return t.data.slice(k * per, (k + 1) * per);
};

function branchMaps(maps: DenoiseMaps, k: number, members: number): BranchMaps {
  return { xattn: part(maps.xattn, k, members), selfattn: part(maps.selfattn, k, members), ...(maps.xattnRegion === undefined ? {} : { xattnRegion: part(maps.xattnRegion, k, members) }) };
}

/** Step 3: evaluate the planned calls; outputs come back per branch. */
async function runCalls(denoiser: DenoiserModel, calls: readonly PlannedCall[], count: number): Promise<BranchOutput[]> {
  const outputs = new Array<BranchOutput>(count);
  for (const { members, request } of calls) {
    const result = await denoiser.predict(request);
    members.forEach((i, k) => {
      const f = result.deepFeature;
      const maps = result.maps;
      outputs[i] = { eps: part(result.noisePred, k, members.length), ...(f === undefined ? {} : { deepFeature: part(f, k, members.length) }), ...(maps === undefined ? {} : { maps: branchMaps(maps, k, members.length) }) };
    });
  }
  return outputs;
}

/** The denoiser's gradient methods, or a typed error when it has none (a fake or wrapped denoiser). */
function gradientDenoiser(denoiser: DenoiserModel): Required<Pick<DenoiserModel, 'maps' | 'vjp'>> & DenoiserModel {
  if (denoiser.maps === undefined || denoiser.vjp === undefined) {
    throw new PipelineError('BAD_ARGUMENT', 'this strategy updates the latents with attention-map gradients; the denoiser offers no maps/VJP pass.', {});
  }
  return denoiser as Required<Pick<DenoiserModel, 'maps' | 'vjp'>> & DenoiserModel;
}

/**
 * `LatentTools` at evaluation i: the loop's batching on any latents, with the model-input scaling
 * x_in = c·x (a scalar c per evaluation for every scheduler) and its chain rule ∂L/∂x = c·∂L/∂x_in.
 */
export function latentTools(run: Pick<DenoiseRun<unknown>, 'scheduler' | 'denoiser' | 'shape' | 'maxBatch' | 'maxGradientBatch' | 'mapsFromFullPass' | 'oneGradientGraph' | 'adapters'>, evaluation: number): LatentTools {
  const { scheduler, denoiser, shape } = run;
  const timestep = scheduler.timesteps[evaluation]!;
  const plan = (branches: readonly Branch[], latents: Float32Array, cap = run.maxBatch) =>
    planCalls(branches, scheduler.scaleModelInput(latents, evaluation), shape, timestep, cap ?? Number.MAX_SAFE_INTEGER, run.adapters);
  const gradientCap = run.maxGradientBatch ?? run.maxBatch;
  return {
    run: (branches, latents) => runCalls(denoiser, plan(branches, latents), branches.length),
    async maps(branches, latents) {
      const model = gradientDenoiser(denoiser);
      const out = new Array<BranchMaps>(branches.length);
      for (const { members, request } of plan(branches, latents)) {
        const maps = run.mapsFromFullPass === true ? (await denoiser.predict({ ...request, attentionMaps: true })).maps : await model.maps(request);
        if (maps === undefined) throw new Error('LatentTools.maps: the full pass returned no attention maps');
        members.forEach((i, k) => (out[i] = branchMaps(maps, k, members.length)));
      }
      return out;
    },
    async vjp(branches, latents, cotangents) {
      const model = gradientDenoiser(denoiser);
      const scale = scheduler.scaleModelInput(Float32Array.of(1), evaluation)[0]!;
      const grad = new Float32Array(latents.length);
      const out = new Array<BranchMaps>(branches.length);
      // Queries of the 1/32 grid: two stride-2 levels below the latent grid (⌈h/2⌉ each).
      const q = Math.ceil(shape[2]! / 4) * Math.ceil(shape[3]! / 4);
      for (const { members, request } of plan(branches, latents, gradientCap)) {
        const n = members.length;
        const images = request.sample.shape[0]! / n;
        // Each member's cotangent (images, …map) stacked in call order; absent ones are zeros.
        const stacked = (pick: (c: MapCotangents) => Float32Array | undefined, mapShape: readonly number[]): Tensor<'float32'> => {
          const length = images * mapShape.reduce((a, d) => a * d, 1);
          const data = new Float32Array(n * length);
          members.forEach((i, k) => {
            const c = pick(cotangents[i]!);
            if (c !== undefined) data.set(c, k * length);
          });
          return { dtype: 'float32', shape: [n * images, ...mapShape], data };
        };
        const seq = request.context.shape[1]!;
        const slots = request.regions?.context.shape;
        const result = await model.vjp(request, {
          xattn: stacked((c) => c.xattn, [q, seq]),
          selfattn: stacked((c) => c.selfattn, [q, q]),
          ...(slots === undefined ? {} : { xattnRegion: stacked((c) => c.xattnRegion, [slots[1]!, q, slots[2]!]) }),
        });
        members.forEach((i, k) => {
          out[i] = branchMaps(result.maps, k, n);
          const g = part(result.gradSample, k, n);
          for (let j = 0; j < grad.length; j++) grad[j] = grad[j]! + g[j]!;
        });
      }
      if (scale !== 1) for (let j = 0; j < grad.length; j++) grad[j] = grad[j]! * scale;
      return { grad, maps: out };
    },
    async ntXentVjp(branches, latents, entries, temperature, options) {
      if (denoiser.ntXentVjp === undefined) return undefined;
      const calls = plan(branches, latents, gradientCap);
      // The loss couples every branch of an image: one call must hold them all.
      if (calls.length !== 1) return undefined;
      const { members, request } = calls[0]!;
      const images = request.sample.shape[0]! / members.length;
      const seq = request.context.shape[1]!;
      const position = new Map(members.map((i, k) => [i, k]));
      const feeds = ntXentFeeds(entries, images, seq, (slot, half) => position.get(2 * slot + half)!);
      const withOutputs = options?.outputs === true;
      const wholeGraph = withOutputs || run.oneGradientGraph === true;
      const result = await denoiser.ntXentVjp(request, { temperature, feeds, ...(wholeGraph ? { noisePred: true } : {}), ...(wholeGraph && !withOutputs ? { skipNoisePred: true } : {}) });
      if (withOutputs && result.noisePred === undefined) return undefined;
      const scale = scheduler.scaleModelInput(Float32Array.of(1), evaluation)[0]!;
      const grad = new Float32Array(latents.length);
      members.forEach((_, k) => {
        const g = part(result.gradSample, k, members.length);
        for (let j = 0; j < grad.length; j++) grad[j] = grad[j]! + g[j]!;
      });
      if (scale !== 1) for (let j = 0; j < grad.length; j++) grad[j] = grad[j]! * scale;
      const xattn = new Array<Float32Array>(branches.length);
      members.forEach((i, k) => (xattn[i] = part(result.xattn, k, members.length)));
      if (!withOutputs) return { grad, xattn, loss: result.loss };
      const outputs = new Array<BranchOutput>(branches.length);
      members.forEach((i, k) => (outputs[i] = { eps: part(result.noisePred!, k, members.length), maps: { xattn: xattn[i]!, selfattn: new Float32Array() } }));
      return { grad, xattn, loss: result.loss, outputs };
    },
  };
}

/** Run the loop; returns the final latents (B, C, h, w), before decoding. */
export async function denoise<S>(run: DenoiseRun<S>): Promise<Float32Array> {
  const { scheduler, strategy } = run;
  const evaluations = scheduler.timesteps.length;
  const state = strategy.begin();
  let latents: Float32Array = new Float32Array(run.initialNoise.length);
  for (let j = 0; j < latents.length; j++) latents[j] = Math.fround(run.initialNoise[j]! * scheduler.initNoiseSigma);

  for (let i = 0; i < evaluations; i++) {
    if (run.signal?.aborted === true) throw new PipelineError('JOB_CANCELLED', `cancelled at step ${i + 1} of ${evaluations}.`, { evaluation: i });
    const timestep = scheduler.timesteps[i]!;
    const step = Math.min(run.steps - 1, Math.floor((i * run.steps) / evaluations));
    let ctx: StepContext = { evaluation: i, step, timestep, batch: run.shape[0], latents };
    // 1. optional latent update (gradient-guided strategies); it may bring this step's outputs.
    const updated = strategy.update === undefined ? undefined : await strategy.update(state, ctx, latentTools(run, i));
    if (updated !== undefined) ctx = { ...ctx, latents: (latents = updated.latents) };
    // 2–3. branches, model input, batched denoiser calls.
    let outputs = updated?.outputs;
    if (outputs === undefined) {
      const branches = strategy.branches(state, ctx);
      outputs = await runCalls(run.denoiser, planCalls(branches, scheduler.scaleModelInput(latents, i), run.shape, timestep, run.maxBatch ?? Number.MAX_SAFE_INTEGER, run.adapters), branches.length);
    }
    // 4–6. combine (guidance included), scheduler step, progress.
    const noisePred = strategy.combine(state, ctx, outputs);
    latents = scheduler.step(noisePred, i, latents, scheduler.needsNoise ? run.noise(i) : undefined);
    run.onProgress?.({ evaluation: i, evaluations, step: ctx.step, timestep, latents });
  }
  return latents;
}
