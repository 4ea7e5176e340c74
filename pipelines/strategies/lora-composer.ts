/**
 * LoRA-Composer — Yang et al., "LoRA-Composer: Leveraging Low-Rank Adaptation for Multi-Concept
 * Customization in Training-Free Diffusion Models" (arXiv 2403.11627); official code
 * Young98CN/LoRA_Composer main @ a48a5a5 (`region_lora/multi_lora_sample.py`, `utils/attn_util.py`,
 * `utils/gaussian_smoothing.py`); methods.md section 5.
 *
 * Every UNet call (re-init, refinement, CFG) runs the regions variant with
 * - concept injection: in each cross-attention, region r's keys/values come from its prompt through
 *   its concept LoRA (attn2 to_k/to_v), its output through to_out.0 with its LoRA; outside the boxes
 *   the global (base) output, inside the mean over the covering regions, composed after to_out;
 * - concept isolation: self-attention score (q, k) gets −1e4 per ordered pair of distinct boxes
 *   a ∋ q, b ∋ k (networks/unet.ts `selfAttentionIsolation`).
 * Before step 0, latent re-initialisation: one cond-only pass at t₀; per region, the box-sized window
 * with the largest Σ_j A_r[:, :, j] gives the latent patch copied into the box; then the original mean
 * and std are restored (gradient-region-losses.ts `reinitLatents`).
 * Per step i while refining: a cond-only pass gives A_r and S;
 *   L = Σ_{r,j} L_box + Σ_r L_region + Σ_{r,j} L_fill   (gradient-region-losses.ts, weights 8 / 10 / 2),
 *   if L ≠ 0: z ← z − φ_i ∇_z L,  φ_i = η·√(linspace(1, 0.5, T)[i]);
 *   refining stops after step i when (L > L_prev and i ≥ earlyStopFrom) or i ≥ refineUntil (L_prev
 *   starts at 1000). Then the CFG pass on the updated z: ε = ε_u + w (ε_c − ε_u) and the scheduler step.
 *
 * | code            | symbol / official value |
 * |-----------------|-------------------------|
 * | `stepSize`      | η = 20 |
 * | `refineUntil`   | 25 of 50 steps |
 * | `earlyStopFrom` | 5 of 50 steps |
 * | `weights`       | α = 8 (box), β = 2 (fill), γ = 10 (region) |
 * | `topKRatio`     | 0.2 |
 * | `guidanceScale` | 7.5; sampler DPM-Solver++(2M), 50 steps |
 *
 * Deliberate deviations:
 * - Generic LoRAs instead of ED-LoRAs: plain (B, 77, D) embeddings (= the 16 layer-wise embeddings all
 *   equal) and concept words are ordinary tokens. The job's own LoRAs act on the global path (as a
 *   background ED-LoRA would), region LoRAs only on attn2 k/v/out inside their boxes.
 * - Concept token positions come from the tokenizer. The official code splits the region prompt on
 *   spaces: w = index of the first concept word, tokens [w, w+1] of the map without SOT, which equals
 *   the CLIP positions only when every earlier word is one CLIP token and the concept is two tokens;
 *   and it fills the index list in concept order but reads it in region order. Here each region's
 *   concept words map to their own CLIP tokens (any count).
 * - Isolation bias −1e4 instead of −1e6 (−inf in fp16; identical softmax in fp32).
 * - ∇_z L through Chorus' VJP graph (recomputes the truncated forward, methods.md section 7).
 * - Passes feed `scheduler.scaleModelInput(z)` (the official refinement pass feeds z unscaled, the
 *   same for DPM-Solver and DDIM); the re-init pass runs on x_T·σ_init (official: before ·σ_init).
 * - A box under 5 grid cells (k = 0) gives its box and region terms 0 (official: NaN → `max(0, nan)` = 0).
 * - Boxes only (no painted masks); batch > 1: each image its own windows and loss, L summed.
 */
import type { AdapterStack, Tensor } from '../../models/index.ts';
import { conditioningAt, encodePrompts, type ConditioningOptions, type ScheduledConditioning } from '../conditioning.ts';
import { PipelineError } from '../errors.ts';
import type { JobRegion } from '../job.ts';
import type { TextEncoderModel } from '../models.ts';
import { extractExtraNetworks } from '../prompt/a1111.ts';
import { levelSizes, regionMasks } from '../regions.ts';
import { stackContexts } from './regions.ts';
import { COMPOSER_LOSS_WEIGHTS, gridBox, regionLoss, reinitLatents, type GridBox, type RegionLossWeights, type ReinitWindow } from './gradient-region-losses.ts';
import { requireWordPositions } from './gradient-tokens.ts';
import { guide, type StrategySetup } from './setup.ts';
import type { Branch, BranchRegions, Strategy } from './types.ts';
import { scaleStep } from './gradient-knobs.ts';

export interface ComposerKnobs {
  readonly stepSize: number;
  readonly refineUntil: number;
  readonly earlyStopFrom: number;
  readonly weights: RegionLossWeights;
  readonly topKRatio: number;
  readonly isolation: boolean;
  readonly reinit: boolean;
  /** `fill_loss`, `gassion_sample`, `bg_loss` */
  readonly fillLoss: boolean;
  readonly gaussianBox: boolean;
  readonly regionLoss: boolean;
}

/** The official script's step count, the reference for the scaled thresholds. */
export const COMPOSER_OFFICIAL_STEPS = 50;
/** L_prev before the first refinement step (official `loss_pre`). */
const INITIAL_PREVIOUS_LOSS = 1e3;

/** The official knobs, thresholds scaled to `steps` as ⌊x·T/50 + ½⌋. */
export function composerDefaults(steps: number): ComposerKnobs {
  return {
    stepSize: 20,
    refineUntil: scaleStep(25, steps, COMPOSER_OFFICIAL_STEPS),
    earlyStopFrom: scaleStep(5, steps, COMPOSER_OFFICIAL_STEPS),
    weights: COMPOSER_LOSS_WEIGHTS,
    topKRatio: 0.2,
    isolation: true,
    reinit: true,
    fillLoss: true,
    gaussianBox: true,
    regionLoss: true,
  };
}

/** φ_i = η·√(linspace(1, 0.5, T)[i]). */
export function composerStepSize(stepSize: number, step: number, steps: number): number {
  const lambda = steps === 1 ? 1 : 1 + ((0.5 - 1) * step) / (steps - 1);
  return stepSize * Math.sqrt(lambda);
}

export interface ComposerRegion {
  readonly positive: readonly ScheduledConditioning[];
  readonly negative: readonly ScheduledConditioning[];
  /** The concept's CLIP positions in the region prompt. */
  readonly tokens: readonly number[];
  /** The box on the 1/32 grid. */
  readonly box: GridBox;
}

export interface ComposerPlan {
  readonly regions: readonly ComposerRegion[];
  /** Per UNet level: (1, R, h_l, w_l). */
  readonly masks: readonly Tensor<'float32'>[];
  /** The empty prompt's 77-token chunk (1, 77, D), padding shorter region prompts. */
  readonly padChunk: Tensor<'float32'>;
  /** With LoRAs: the global mix row, the slots' mix (1, R, K) and the per-pixel strengths (the global ones) per level. */
  readonly adapters?: { readonly global: readonly number[]; readonly slotMix: Tensor<'float32'>; readonly mixMaps: readonly Tensor<'float32'>[] };
  readonly mapGrid: readonly [number, number];
}

export type ComposerEvent =
  /** At step 0: each region's box on the latent grid (h × w, 0/1). */
  | { readonly kind: 'boxes'; readonly masks: readonly Float32Array[] }
  | { readonly kind: 'reinit'; readonly latentsBefore: Float32Array; readonly latentsAfter: Float32Array; readonly regionMaps: Float32Array; readonly windows: readonly ReinitWindow[] }
  | {
      readonly kind: 'update';
      readonly evaluation: number;
      readonly loss: number;
      readonly terms: readonly { readonly name: string; readonly value: number }[];
      readonly lr: number;
      readonly latentsBefore: Float32Array;
      readonly latentsAfter: Float32Array;
      readonly grad: Float32Array;
      /** (B, R, h·w, S_r) and (B, h·w, h·w) of the refinement pass. */
      readonly regionMaps: Float32Array;
      readonly selfMap: Float32Array;
      /** Image 0: Â per region and token, on the 1/32 grid `grid` (h, w). */
      readonly smoothed: readonly (readonly Float64Array[])[];
      readonly grid: readonly [number, number];
      /** Refinement continues after this step. */
      readonly refining: boolean;
    };

interface ComposerState {
  refining: boolean;
  lossPrev: number;
}

/**
 * One branch of a step: the global prompt's half (`negative` = uncond) with the regions' same half,
 * concept injection and (with `isolation`) concept isolation.
 */
export function composerBranch(plan: ComposerPlan, conditioning: StrategySetup['conditioning'], step: number, half: 'positive' | 'negative', options: { isolation: boolean; maps: boolean }): Branch {
  const regions: BranchRegions = {
    context: stackContexts(plan.regions.map((r) => conditioningAt(r[half], step)), plan.padChunk),
    masks: plan.masks,
    ...(plan.adapters === undefined ? {} : { mix: plan.adapters.slotMix, mixMaps: plan.adapters.mixMaps }),
    ...(options.isolation ? { isolation: true } : {}),
    outputAdapters: true,
  };
  const context = half === 'positive' ? conditioningAt(conditioning.positive[0]!.schedule, step) : conditioningAt(conditioning.negative, step);
  return { context, regions, ...(plan.adapters === undefined ? {} : { mix: plan.adapters.global }), ...(options.maps ? { attentionMaps: true } : {}) };
}

export const loraComposerStrategy = {
  name: 'lora-composer' as const,
  create(setup: StrategySetup, plan: ComposerPlan, knobs: ComposerKnobs, latentShape: readonly [number, number, number, number], onEvent?: (e: ComposerEvent) => void): Strategy<ComposerState> {
    if (plan.regions.length === 0) throw new PipelineError('BAD_ARGUMENT', 'LoRA-Composer needs at least one region (a box with its prompt and concept LoRA).', { field: 'regions' });
    if (setup.conditioning.positive.length !== 1) throw new PipelineError('BAD_PROMPT', 'LoRA-Composer takes one global prompt; AND sub-prompts are only supported by plain generation.', { field: 'prompt' });
    const f32 = Math.fround;
    const branch = (step: number, half: 'positive' | 'negative', maps: boolean): Branch => composerBranch(plan, setup.conditioning, step, half, { isolation: knobs.isolation, maps });
    const [, , lh, lw] = latentShape;
    const [gh, gw] = plan.mapGrid;
    const cells = gh * gw;
    const boxes = plan.regions.map((r) => r.box);
    const tokens = plan.regions.map((r) => r.tokens);
    const perImage = latentShape[1] * lh * lw;
    return {
      name: 'lora-composer',
      begin: () => ({ refining: true, lossPrev: INITIAL_PREVIOUS_LOSS }),
      branches: (_s, ctx) => [branch(ctx.step, 'negative', false), branch(ctx.step, 'positive', false)],
      combine: (_s, _ctx, [u, c]) => guide(u!.eps, c!.eps, setup.guidanceScale),
      async update(state, ctx, tools) {
        if (ctx.evaluation === 0) onEvent?.({ kind: 'boxes', masks: plan.regions.map((_, r) => plan.masks[0]!.data.slice(r * lh * lw, (r + 1) * lh * lw)) });
        if (!(knobs.reinit && ctx.evaluation === 0) && !state.refining) return undefined;
        const cond = [branch(ctx.step, 'positive', true)];
        let latents = ctx.latents;
        const images = ctx.batch;
        // R slots of S_r keys each: the slot length of the stacked region context.
        const seq = cond[0]!.regions!.context.shape[2]!;
        const R = plan.regions.length;
        const regionMap = (all: Float32Array, b: number, r: number) => all.subarray(((b * R + r) * cells) * seq, ((b * R + r + 1) * cells) * seq);
        if (knobs.reinit && ctx.evaluation === 0) {
          const [maps] = await tools.maps(cond, latents);
          const next = new Float32Array(latents.length);
          const windows: ReinitWindow[] = [];
          for (let b = 0; b < images; b++) {
            const r = reinitLatents(latents.subarray(b * perImage, (b + 1) * perImage), [1, latentShape[1], lh, lw], plan.regions.map((_, k) => regionMap(maps!.xattnRegion!, b, k)), seq, plan.mapGrid, boxes, tokens);
            next.set(r.latents, b * perImage);
            if (b === 0) windows.push(...r.windows);
          }
          onEvent?.({ kind: 'reinit', latentsBefore: latents, latentsAfter: next, regionMaps: maps!.xattnRegion!, windows });
          latents = next;
        }
        if (!state.refining) return { latents };
        const i = ctx.evaluation;
        const lr = composerStepSize(knobs.stepSize, i, setup.steps);
        const [maps] = await tools.maps(cond, latents);
        const dRegion = new Float32Array(maps!.xattnRegion!.length);
        const dSelf = new Float32Array(maps!.selfattn.length);
        let loss = 0;
        let terms: { name: string; value: number }[] = [];
        let smoothed: readonly (readonly Float64Array[])[] = [];
        for (let b = 0; b < images; b++) {
          const result = regionLoss(
            {
              regionMaps: plan.regions.map((_, r) => regionMap(maps!.xattnRegion!, b, r)),
              seq,
              selfMap: maps!.selfattn.subarray(b * cells * cells, (b + 1) * cells * cells),
              grid: plan.mapGrid,
              boxes,
              tokens,
            },
            { weights: knobs.weights, topKRatio: knobs.topKRatio, gaussianBox: knobs.gaussianBox, fill: knobs.fillLoss, region: knobs.regionLoss },
          );
          loss += result.loss;
          if (b === 0) [terms, smoothed] = [[...result.terms], result.smoothed];
          result.dRegionMaps.forEach((d, r) => dRegion.set(d, ((b * R + r) * cells) * seq));
          dSelf.set(result.dSelfMap, b * cells * cells);
        }
        const before = latents;
        let grad: Float32Array = new Float32Array(latents.length);
        if (loss !== 0) {
          grad = (await tools.vjp(cond, latents, [{ xattnRegion: dRegion, selfattn: dSelf }])).grad;
          latents = Float32Array.from(latents, (z, k) => f32(z - f32(f32(lr) * grad[k]!)));
        }
        // The stop test compares this step's loss (before its update) with the previous step's.
        if ((state.lossPrev < loss && i >= knobs.earlyStopFrom) || i >= knobs.refineUntil) state.refining = false;
        else state.lossPrev = loss;
        onEvent?.({ kind: 'update', evaluation: i, loss, terms, lr, latentsBefore: before, latentsAfter: latents, grad, regionMaps: maps!.xattnRegion!, selfMap: maps!.selfattn, smoothed, grid: plan.mapGrid, refining: state.refining });
        return { latents };
      },
    };
  },
};

/** A region of a LoRA-Composer job, resolved: its concept words and its LoRA's strengths (stack order). */
export interface ComposerRegionInput {
  readonly region: JobRegion;
  readonly words: string;
  readonly te: readonly number[];
  readonly unet: readonly number[];
}

/**
 * A LoRA-Composer run's inputs: region prompts encoded with their concept's text-encoder strengths
 * (on top of the job's), box masks on every UNet level, the concept tokens, and with LoRAs the slot
 * mix (global + concept) and the per-pixel strengths (global only: concepts act on attn2 k/v/out).
 * Throws BAD_ARGUMENT for a region without a box, BAD_PROMPT when its words are not in its prompt.
 */
export async function planComposer(
  input: { width: number; height: number; steps: number; negativePrompt: string; regions: readonly ComposerRegionInput[]; global: { te: readonly number[]; unet: readonly number[] } },
  encoder: TextEncoderModel,
  options: ConditioningOptions,
  stack: AdapterStack,
  grid: { vaeScale: number; unetLevels: number },
): Promise<ComposerPlan> {
  const add = (a: readonly number[], b: readonly number[]) => a.map((v, k) => v + b[k]!);
  const te = (row: readonly number[]) => (stack.size === 0 ? undefined : { mode: 'bank' as const, stack, mix: [row] });
  const regions: ComposerRegion[] = [];
  const sizes = levelSizes(input.height / grid.vaeScale, input.width / grid.vaeScale, grid.unetLevels);
  const mapGrid = sizes[Math.min(2, sizes.length - 1)]!;
  for (const [r, { region, words, te: regionTe }] of input.regions.entries()) {
    if (region.box === undefined) throw new PipelineError('BAD_ARGUMENT', `regions[${r}]: LoRA-Composer places concepts in boxes; give a box [x, y, width, height] (painted masks are for the regions strategy).`, { field: `regions[${r}].box` });
    const prompt = extractExtraNetworks(region.prompt).prompt;
    const enc = await encodePrompts(prompt, extractExtraNetworks(region.negativePrompt ?? input.negativePrompt).prompt, input.steps, encoder, options, te(add(input.global.te, regionTe)));
    if (enc.positive.length !== 1) throw new PipelineError('BAD_PROMPT', `regions[${r}].prompt: AND sub-prompts are not supported in a region.`, { field: `regions[${r}].prompt` });
    const [x, y, w, h] = region.box;
    regions.push({
      positive: enc.positive[0]!.schedule,
      negative: enc.negative,
      tokens: requireWordPositions(encoder.tokenizer, prompt, words, options, `strategy.concepts[${r}].words`),
      box: gridBox([y / input.height, x / input.width, (y + h) / input.height, (x + w) / input.width], mapGrid[0], mapGrid[1]),
    });
  }
  const padChunk = (await encodePrompts('', '', input.steps, encoder, options, te(input.global.te))).negative[0]!.embedding;
  const masks = await regionMasks(input.regions.map((r) => r.region), input.width, input.height, sizes);
  const plan = { regions, masks, padChunk, mapGrid };
  if (stack.size === 0) return plan;
  const K = stack.size;
  const slotMix: Tensor<'float32'> = { dtype: 'float32', shape: [1, regions.length, K], data: Float32Array.from(input.regions.flatMap((r) => add(input.global.unet, r.unet))) };
  const mixMaps = sizes.map(([h, w]): Tensor<'float32'> => {
    const data = new Float32Array(K * h * w);
    for (let k = 0; k < K; k++) data.fill(input.global.unet[k]!, k * h * w, (k + 1) * h * w);
    return { dtype: 'float32', shape: [1, K, h, w], data };
  });
  return { ...plan, adapters: { global: input.global.unet, slotMix, mixMaps } };
}
