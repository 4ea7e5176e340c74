/**
 * The denoising loop, written once. Strategies decide the branches and how to combine them; the
 * scheduler decides the timesteps and the update; this file only runs them in order:
 *
 *   x ← x_T · σ_init
 *   for each model evaluation i (timestep t_i):
 *     1. branches ← strategy.branches(i)
 *     2. x_in ← scheduler.scaleModelInput(x, i)
 *     3. run the denoiser on every branch, batched (branches with equal context length share calls)
 *     4. ε ← strategy.combine(i, outputs)
 *     5. x ← scheduler.step(ε, i, x [, noise_i])        noise_i drawn only by ancestral schedulers
 *     6. report progress (and honour cancellation)
 */
import type { AdapterStack, AdapterUse, RegionInputs, Tensor } from '../models/index.ts';
import { PipelineError } from './errors.ts';
import type { DenoiserModel } from './models.ts';
import type { Scheduler } from './schedulers/types.ts';
import type { Branch, BranchOutput, BranchRegions, StepContext, Strategy } from './strategies/types.ts';

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

/**
 * Step 3: evaluate every branch on the whole batch. Branches that can share a UNet call (same
 * context length, same pass: full, full keeping its deep feature, or shallow) are stacked into one
 * call of up to `maxBatch` samples; outputs come back per branch.
 */
async function runBranches(
  denoiser: DenoiserModel,
  branches: readonly Branch[],
  modelInput: Float32Array,
  shape: readonly number[],
  timestep: number,
  maxBatch: number,
  adapters: DenoiseRun<unknown>['adapters'],
): Promise<BranchOutput[]> {
  const [batch, ...rest] = shape as [number, number, number, number];
  const per = modelInput.length / batch;
  const outputs = new Array<BranchOutput>(branches.length);
  const groups = new Map<string, number[]>();
  branches.forEach((b, i) => {
    const pass = b.regions !== undefined ? `regions${b.regions.context.shape[2]}` : b.deepFeature !== undefined ? 'shallow' : b.keepDeepFeature === true ? 'full+feature' : 'full';
    const key = `${b.context.shape[1]}|${pass}`;
    groups.set(key, [...(groups.get(key) ?? []), i]);
  });
  const branchesPerCall = Math.max(1, Math.floor(maxBatch / batch));
  for (const members of groups.values()) {
    for (let start = 0; start < members.length; start += branchesPerCall) {
      const call = members.slice(start, start + branchesPerCall).map((i) => ({ i, b: branches[i]! }));
      const sample = new Float32Array(call.length * modelInput.length);
      call.forEach((_, k) => sample.set(modelInput, k * modelInput.length));
      const contexts = call.map(({ b }) => repeatContext(b.context, batch));
      const [, seq, dim] = contexts[0]!.shape as [number, number, number];
      const context = new Float32Array(call.length * batch * seq * dim);
      contexts.forEach((c, k) => context.set(c.data, k * c.data.length));
      const shallow = call[0]!.b.deepFeature !== undefined;
      let deepFeature: Tensor<'float32'> | undefined;
      if (shallow) {
        const featurePer = call[0]!.b.deepFeature!.length / batch;
        const data = new Float32Array(call.length * batch * featurePer);
        call.forEach(({ b }, k) => data.set(b.deepFeature!, k * batch * featurePer));
        deepFeature = { dtype: 'float32', shape: [call.length * batch, featurePer / (rest[1]! * rest[2]!), rest[1]!, rest[2]!], data };
      }
      const regions = call[0]!.b.regions === undefined ? undefined : stackRegions(call.map(({ b }) => b.regions!), batch);
      const result = await denoiser.predict({
        sample: { dtype: 'float32', shape: [call.length * batch, ...rest], data: sample },
        timestep,
        context: { dtype: 'float32', shape: [call.length * batch, seq, dim], data: context },
        ...(() => {
          const use = callAdapters(adapters, call.map(({ b }) => b), batch);
          return use === undefined ? {} : { adapters: use };
        })(),
        ...(deepFeature === undefined ? {} : { deepFeature }),
        ...(call[0]!.b.keepDeepFeature === true ? { wantDeepFeature: true } : {}),
        ...(regions === undefined ? {} : { regions }),
      });
      call.forEach(({ i }, k) => {
        const eps = result.noisePred.data.slice(k * batch * per, (k + 1) * batch * per);
        const f = result.deepFeature;
        const featurePer = f === undefined ? 0 : f.data.length / (call.length * batch);
        outputs[i] = f === undefined ? { eps } : { eps, deepFeature: f.data.slice(k * batch * featurePer, (k + 1) * batch * featurePer) };
      });
    }
  }
  return outputs;
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
    const ctx: StepContext = { evaluation: i, step: Math.min(run.steps - 1, Math.floor((i * run.steps) / evaluations)), timestep, batch: run.shape[0], latents };
    const branches = strategy.branches(state, ctx);
    const modelInput = scheduler.scaleModelInput(latents, i);
    const outputs = await runBranches(run.denoiser, branches, modelInput, run.shape, timestep, run.maxBatch ?? Number.MAX_SAFE_INTEGER, run.adapters);
    const noisePred = strategy.combine(state, ctx, outputs);
    latents = scheduler.step(noisePred, i, latents, scheduler.needsNoise ? run.noise(i) : undefined);
    run.onProgress?.({ evaluation: i, evaluations, step: ctx.step, timestep, latents });
  }
  return latents;
}
