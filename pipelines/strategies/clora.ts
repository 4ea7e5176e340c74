/**
 * CLoRA — Meral, Simsar, Tombari, Yanardag, "CLoRA: A Contrastive Approach to Compose Multiple LoRA
 * Models" (arXiv 2403.19776, ICCV 2025); official code gemlab-vt/clora @ 76def7c (`pipeline_clora.py`,
 * `utils.py`, `notebook.ipynb`); methods.md section 3.
 *
 * P prompt slots, each with its LoRA (slot 0: the plain prompt, no LoRA); every step evaluates every
 * slot on the CFG pair. Per step i at timestep t:
 *
 *   1. A_p = mean over both CFG halves, the heads and the 1/32-grid cross-attention layers of slot p's
 *      attention probabilities (h·w × S).
 *   2. if i < updateUntil: L = NT-Xent_τ over the min–max normalised maps A_p[:, :, j] of every
 *      (group g, slot p, token j), labelled g (gradient-ntxent.ts);  z ← z − η ∇_z L.
 *      If i ∈ refineSteps: `refineRounds` more rounds (maps at the new z → L → update) at the same t.
 *   3. ε_p come from the LAST forward, which ran before the last update (official: saves a pass).
 *   4. M_p = ∪_j [A_p[:, :, j] > α max A_p[:, :, j]] (mask tokens of slot p), slot 0 fills the rest,
 *      nearest upsampling (gradient-masks.ts); all ones while i < maskAfter.
 *   5. ε_u = Σ_p M_p ε_u,p / Σ_p M_p, ε_c likewise, ε = ε_u + w (ε_c − ε_u); the scheduler steps from
 *      the updated z.
 *
 * | code            | symbol / official name |
 * |-----------------|------------------------|
 * | `stepSize`      | η, `step_size` (20) |
 * | `updateUntil`   | `max_iter_to_alter` (notebook 50 of 100 steps) |
 * | `refineSteps`   | `iterative_steps` (notebook [0, 10, 20]) |
 * | `refineRounds`  | `iterative_steps_steps` (20) |
 * | `maskThreshold` | α, `mask_threshold_alpha` (notebook 0.4; signature default 0.3) |
 * | `maskAfter`     | `apply_mask_after` (0) |
 * | `temperature`   | τ (0.5, hard-coded) |
 * | `guidanceScale` | w (notebook 10) |
 * Official sampler: DDIM (notebook, 100 steps); any Chorus sampler works.
 *
 * Deliberate deviations:
 * - ∇_z L comes from Chorus' VJP graph of the truncated UNet (ONNX Runtime has no autograd): exact up
 *   to float32 rounding, but the VJP recomputes the forward up to `up_blocks.1` (≈ +0.55 F per slot
 *   element and update, methods.md section 7) where autograd keeps the activations.
 * - The P slots run as ONE batched UNet call (2P elements, each with its own LoRA through the adapter
 *   bank) instead of P calls with `set_adapters`. Same numbers.
 * - Every round runs as ONE pass where the slots fit one UNet call: the UNet, the NT-Xent loss and its
 *   VJP in one graph (`buildUnetNtXentVjpGraph`, float32). Rounds whose noise predictions are
 *   discarded (all but the last of a step) run the UNet truncated after the maps; the last round runs
 *   the whole UNet and its ε are used, as officially. Otherwise: the maps-only (truncated) UNet or,
 *   for the last round, the full pass, then the loss in TypeScript (float64) and the VJP pass.
 * - Step thresholds default to the notebook's scaled to the run's step count, ⌊x·T/100 + ½⌋ (exactly
 *   the notebook at T = 100); explicit knobs are step indices.
 * - Token positions come from the tokenizer (concept words → CLIP positions), not hand-written lists;
 *   two entries of the notebook's lists do not match CLIP tokenisation.
 * - `attn_res = (⌈W/32⌉, ⌈H/32⌉)` is used as (rows, cols) officially; here rows = ⌈H/32⌉ (the same for
 *   square images, the only case the official code handles).
 * - A flat map (max = min) has no min–max normalisation: the official code produces NaN latents;
 *   here that round makes no update (reported in the update event with loss NaN).
 * - Batch size > 1: each image has its own loss and masks (official: batch 1). fp32 maps (official fp16).
 */
import type { AdapterStack } from '../../models/index.ts';
import type { NtXentEntry } from '../../models/index.ts';
import { conditioningAt, encodePrompts, type ConditioningOptions, type ScheduledConditioning } from '../conditioning.ts';
import { PipelineError } from '../errors.ts';
import type { TextEncoderModel } from '../models.ts';
import { extractExtraNetworks } from '../prompt/a1111.ts';
import { maskedMean, slotMasks, upsampleNearest, type Morphology } from './gradient-masks.ts';
import { ntXentLoss } from './gradient-ntxent.ts';
import { scaleStep } from './gradient-knobs.ts';
import { requireWordPositions, wordPositions } from './gradient-tokens.ts';
import { guide, type StrategySetup } from './setup.ts';
import type { Branch, BranchMaps, BranchOutput, LatentTools, MapCotangents, StepContext, Strategy } from './types.ts';

export interface CloraKnobs {
  readonly stepSize: number;
  /** Updates happen at steps i < updateUntil. */
  readonly updateUntil: number;
  readonly refineSteps: readonly number[];
  readonly refineRounds: number;
  readonly maskThreshold: number;
  readonly maskAfter: number;
  readonly temperature: number;
  readonly morphology: readonly Morphology[];
  /** `latent_update`: false gives CLoRA's masked fusion alone. */
  readonly latentUpdate: boolean;
}

/** The official notebook's step count, the reference for the scaled thresholds. */
export const CLORA_NOTEBOOK_STEPS = 100;

/** The notebook's knobs, thresholds scaled to `steps` (methods.md 3.1). */
export function cloraDefaults(steps: number): CloraKnobs {
  return {
    stepSize: 20,
    updateUntil: scaleStep(50, steps, CLORA_NOTEBOOK_STEPS),
    refineSteps: [...new Set([0, 10, 20].map((x) => scaleStep(x, steps, CLORA_NOTEBOOK_STEPS)))],
    refineRounds: 20,
    maskThreshold: 0.4,
    maskAfter: 0,
    temperature: 0.5,
    morphology: [],
    latentUpdate: true,
  };
}

/** One prompt slot: its conditioning (encoded with its LoRA's text-encoder delta) and UNet mix row. */
export interface CloraSlot {
  readonly positive: readonly ScheduledConditioning[];
  readonly negative: readonly ScheduledConditioning[];
  /** UNet strengths of the run's stack for this slot (undefined: no LoRAs in the run). */
  readonly mix?: readonly number[];
}

export interface CloraPlan {
  readonly slots: readonly CloraSlot[];
  /** groups[g][p]: CLIP positions of concept g in slot p's prompt (the contrastive classes). */
  readonly groups: readonly (readonly (readonly number[])[])[];
  /** maskTokens[p]: the positions whose attention defines slot p's mask (empty: none). */
  readonly maskTokens: readonly (readonly number[])[];
  /** (h, w) of the 1/32 grid and of the latents. */
  readonly mapGrid: readonly [number, number];
  readonly latentGrid: readonly [number, number];
}

/** What a run reports, for tests, debugging and `--debug-masks`. */
export type CloraEvent =
  | {
      readonly kind: 'update';
      readonly evaluation: number;
      /** 0: the step's update; 1…: refinement rounds. */
      readonly round: number;
      /** Per image. */
      readonly loss: readonly number[];
      readonly latentsBefore: Float32Array;
      readonly latentsAfter: Float32Array;
      readonly grad: Float32Array;
      /** A_p per slot (B, h·w, S), the maps the loss read. */
      readonly maps: readonly Float32Array[];
      /** The NT-Xent inputs of image 0, in (group, slot, token) order. */
      readonly embeddings: readonly Float64Array[];
    }
  | {
      readonly kind: 'masks';
      readonly evaluation: number;
      /** Per slot (B, h, w) on the 1/32 grid, and on the latent grid. */
      readonly gridMasks: readonly Float32Array[];
      readonly masks: readonly Float32Array[];
    };

/** A_p per slot: the mean of its uncond and cond branches' cross-attention maps (B, N, S). */
export function slotMaps(maps: readonly BranchMaps[]): Float32Array[] {
  return Array.from({ length: maps.length / 2 }, (_, p) => {
    const u = maps[2 * p]!.xattn;
    const c = maps[2 * p + 1]!.xattn;
    return Float32Array.from(u, (v, k) => (v + c[k]!) / 2);
  });
}

export interface CloraLossResult {
  /** Per image. */
  readonly loss: readonly number[];
  /** Per branch (slot p: 2p uncond, 2p + 1 cond): ∂L/∂xattn. */
  readonly cotangents: readonly MapCotangents[];
  /** Image 0's NT-Xent inputs. */
  readonly embeddings: readonly Float64Array[];
  /** False when a map was flat (NaN loss): no update. */
  readonly finite: boolean;
}

/** L = Σ_images NT-Xent over the plan's groups, and its cotangents per branch (½ ∂L/∂A_p to each CFG half). */
export function cloraLoss(plan: CloraPlan, maps: readonly Float32Array[], images: number, seqs: readonly number[], temperature: number): CloraLossResult {
  const cells = plan.mapGrid[0] * plan.mapGrid[1];
  const cot = maps.map((m) => new Float32Array(m.length));
  const losses: number[] = [];
  let embeddings: readonly Float64Array[] = [];
  let finite = true;
  for (let b = 0; b < images; b++) {
    const entries: { p: number; j: number; label: number }[] = [];
    plan.groups.forEach((group, g) => group.forEach((tokens, p) => tokens.forEach((j) => entries.push({ p, j, label: g }))));
    const vectors = entries.map(({ p, j }) => Float32Array.from({ length: cells }, (_, q) => maps[p]![(b * cells + q) * seqs[p]! + j]!));
    const r = ntXentLoss(vectors, entries.map((e) => e.label), temperature);
    losses.push(r.loss);
    if (b === 0) embeddings = r.embeddings;
    if (!Number.isFinite(r.loss)) {
      finite = false;
      continue;
    }
    entries.forEach(({ p, j }, k) => {
      const g = r.gradients[k]!;
      for (let q = 0; q < cells; q++) cot[p]![(b * cells + q) * seqs[p]! + j] = cot[p]![(b * cells + q) * seqs[p]! + j]! + g[q]!;
    });
  }
  // A_p = (u + c)/2, so each CFG half receives half of ∂L/∂A_p.
  const cotangents = cot.flatMap((c) => {
    const half = c.map((v) => v / 2);
    return [{ xattn: half }, { xattn: half }];
  });
  return { loss: losses, cotangents, embeddings, finite };
}

/** The per-slot masks of every image at one step: on the 1/32 grid and on the latent grid (B, h, w) each. */
export function cloraMasks(plan: CloraPlan, maps: readonly Float32Array[], images: number, seqs: readonly number[], knobs: Pick<CloraKnobs, 'maskThreshold' | 'morphology'>): { gridMasks: Float32Array[]; masks: Float32Array[] } {
  const [gh, gw] = plan.mapGrid;
  const [lh, lw] = plan.latentGrid;
  const cells = gh * gw;
  const gridMasks = maps.map(() => new Float32Array(images * cells));
  const masks = maps.map(() => new Float32Array(images * lh * lw));
  for (let b = 0; b < images; b++) {
    const perImage = maps.map((m, p) => m.subarray(b * cells * seqs[p]!, (b + 1) * cells * seqs[p]!));
    const grid = slotMasks(perImage, seqs, plan.mapGrid, plan.maskTokens, knobs.maskThreshold, knobs.morphology);
    grid.forEach((m, p) => {
      gridMasks[p]!.set(m, b * cells);
      masks[p]!.set(upsampleNearest(m, gh, gw, lh, lw), b * lh * lw);
    });
  }
  return { gridMasks, masks };
}

/** The branches of a step: every slot's CFG pair [uncond, cond], each with its mix, maps requested. */
export function cloraBranches(plan: CloraPlan, step: number): Branch[] {
  return plan.slots.flatMap((s) =>
    (['negative', 'positive'] as const).map((half) => ({ context: conditioningAt(s[half], step), attentionMaps: true, ...(s.mix === undefined ? {} : { mix: s.mix }) })),
  );
}

/** The contrastive embeddings of a plan in cloraLoss's order (group, slot, token), labelled by group. */
export function cloraEntries(plan: Pick<CloraPlan, 'groups'>): NtXentEntry[] {
  return plan.groups.flatMap((group, label) => group.flatMap((tokens, slot) => tokens.map((token) => ({ slot, token, label }))));
}

export const cloraStrategy = {
  name: 'clora' as const,
  create(setup: StrategySetup, plan: CloraPlan, knobs: CloraKnobs, onEvent?: (e: CloraEvent) => void): Strategy<null> {
    if (plan.slots.length < 2) throw new PipelineError('BAD_ARGUMENT', `CLoRA needs at least one concept besides the base prompt (slots: ${plan.slots.length}).`, { field: 'strategy.concepts' });
    const branchesAt = (step: number): Branch[] => cloraBranches(plan, step);
    const seqsOf = (branches: readonly Branch[]) => plan.slots.map((_, p) => branches[2 * p]!.context.shape[1]!);
    const entries = cloraEntries(plan);
    const f32 = Math.fround;
    return {
      name: 'clora',
      begin: () => null,
      branches: (_s, ctx) => branchesAt(ctx.step),
      async update(_s, ctx: StepContext, tools: LatentTools) {
        if (!knobs.latentUpdate || ctx.evaluation >= knobs.updateUntil) return undefined;
        const branches = branchesAt(ctx.step);
        const seqs = seqsOf(branches);
        const rounds = 1 + (knobs.refineSteps.includes(ctx.evaluation) ? knobs.refineRounds : 0);
        let latents = ctx.latents;
        let outputs: BranchOutput[] | undefined;
        for (let round = 0; round < rounds; round++) {
          // Where the branches fit one UNet call, every round is one pass: forward → NT-Xent → VJP in
          // one graph; the last round's pass runs the whole UNet and also gives the step's ε.
          const last = round === rounds - 1;
          if (tools.ntXentVjp !== undefined) {
            const one = await tools.ntXentVjp(branches, latents, entries, knobs.temperature, last ? { outputs: true } : undefined);
            if (one !== undefined) {
              if (last) outputs = one.outputs;
              const before = latents;
              const finite = [...one.loss].every(Number.isFinite);
              if (finite) latents = Float32Array.from(latents, (z, k) => f32(z - f32(knobs.stepSize * one.grad[k]!)));
              if (onEvent !== undefined) {
                const perSlot = slotMaps(one.xattn.map((xattn) => ({ xattn, selfattn: new Float32Array() })));
                const report = cloraLoss(plan, perSlot, ctx.batch, seqs, knobs.temperature);
                onEvent({ kind: 'update', evaluation: ctx.evaluation, round, loss: [...one.loss], latentsBefore: before, latentsAfter: latents, grad: finite ? one.grad : new Float32Array(latents.length), maps: perSlot, embeddings: report.embeddings });
              }
              continue;
            }
          }
          // The last round's forward is the step's: a full pass (its ε are used); earlier rounds need the maps only.
          let maps: BranchMaps[];
          if (last) {
            outputs = await tools.run(branches, latents);
            maps = outputs.map((o) => o.maps!);
          } else {
            maps = await tools.maps(branches, latents);
          }
          const perSlot = slotMaps(maps);
          const loss = cloraLoss(plan, perSlot, ctx.batch, seqs, knobs.temperature);
          const before = latents;
          let grad: Float32Array = new Float32Array(latents.length);
          if (loss.finite) {
            grad = (await tools.vjp(branches, latents, loss.cotangents)).grad;
            latents = Float32Array.from(latents, (z, k) => f32(z - f32(knobs.stepSize * grad[k]!)));
          }
          onEvent?.({ kind: 'update', evaluation: ctx.evaluation, round, loss: loss.loss, latentsBefore: before, latentsAfter: latents, grad, maps: perSlot, embeddings: loss.embeddings });
        }
        if (outputs === undefined) throw new Error('CLoRA update: the last round returned no outputs');
        return { latents, outputs };
      },
      combine(_s, ctx, outputs) {
        const maps = slotMaps(outputs.map((o) => {
          if (o.maps === undefined) throw new Error('CLoRA combine: a branch came back without its attention maps');
          return o.maps;
        }));
        const seqs = plan.slots.map((_, p) => maps[p]!.length / (ctx.batch * plan.mapGrid[0] * plan.mapGrid[1]));
        const [lh, lw] = plan.latentGrid;
        const { gridMasks, masks } =
          ctx.evaluation >= knobs.maskAfter
            ? cloraMasks(plan, maps, ctx.batch, seqs, knobs)
            : { gridMasks: maps.map(() => new Float32Array(ctx.batch * plan.mapGrid[0] * plan.mapGrid[1]).fill(1)), masks: maps.map(() => new Float32Array(ctx.batch * lh * lw).fill(1)) };
        onEvent?.({ kind: 'masks', evaluation: ctx.evaluation, gridMasks, masks });
        const per = outputs[0]!.eps.length / ctx.batch;
        const out = new Float32Array(outputs[0]!.eps.length);
        for (let b = 0; b < ctx.batch; b++) {
          const image = (t: Float32Array) => t.subarray(b * per, (b + 1) * per);
          const m = masks.map((x) => x.subarray(b * lh * lw, (b + 1) * lh * lw));
          const u = maskedMean(outputs.filter((_, i) => i % 2 === 0).map((o) => image(o.eps)), m);
          const c = maskedMean(outputs.filter((_, i) => i % 2 === 1).map((o) => image(o.eps)), m);
          out.set(guide(u, c, setup.guidanceScale), b * per);
        }
        return out;
      },
    };
  },
};

/** A concept of a CLoRA job, resolved: its slot prompt, its words there and elsewhere, its LoRA's strengths. */
export interface CloraConceptInput {
  readonly prompt: string;
  readonly words: string;
  readonly otherWords: string;
  /** Strengths of the run's stack for this concept's LoRA (text encoder, UNet), stack order. */
  readonly te: readonly number[];
  readonly unet: readonly number[];
}

/**
 * The slots of a CLoRA run: slot 0 = the job's prompt with the job's LoRAs only (style LoRAs), slot
 * k = concept k's prompt with its LoRA added; each encoded with its own text-encoder strengths.
 * Token groups: concept g's own words in its slot, its `otherWords` in the others (a slot without
 * them contributes no embedding to that group); mask tokens: each concept's own words.
 * Throws BAD_PROMPT when a concept's words are not in its own prompt.
 */
export async function planClora(
  input: { prompt: string; negativePrompt: string; steps: number; concepts: readonly CloraConceptInput[]; global: { te: readonly number[]; unet: readonly number[] } },
  encoder: TextEncoderModel,
  options: ConditioningOptions,
  stack: AdapterStack,
  grids: { mapGrid: readonly [number, number]; latentGrid: readonly [number, number] },
): Promise<CloraPlan> {
  const add = (a: readonly number[], b: readonly number[]) => a.map((v, k) => v + b[k]!);
  const prompts = [input.prompt, ...input.concepts.map((c) => c.prompt)].map((p) => extractExtraNetworks(p).prompt);
  const negative = extractExtraNetworks(input.negativePrompt).prompt;
  const te = [input.global.te, ...input.concepts.map((c) => add(input.global.te, c.te))];
  const unet = [input.global.unet, ...input.concepts.map((c) => add(input.global.unet, c.unet))];
  const slots: CloraSlot[] = [];
  for (let p = 0; p < prompts.length; p++) {
    const adapters = stack.size === 0 ? undefined : { mode: 'bank' as const, stack, mix: [te[p]!] };
    const enc = await encodePrompts(prompts[p]!, negative, input.steps, encoder, options, adapters);
    if (enc.positive.length !== 1) throw new PipelineError('BAD_PROMPT', `CLoRA slot ${p}: AND sub-prompts are not supported.`, { field: p === 0 ? 'prompt' : `strategy.concepts[${p - 1}].prompt` });
    slots.push({ positive: enc.positive[0]!.schedule, negative: enc.negative, ...(stack.size === 0 ? {} : { mix: unet[p]! }) });
  }
  const groups = input.concepts.map((c, g) =>
    prompts.map((prompt, p) =>
      p === g + 1
        ? requireWordPositions(encoder.tokenizer, prompt, c.words, options, `strategy.concepts[${g}].words`)
        : (wordPositions(encoder.tokenizer, prompt, c.otherWords, options, `strategy.concepts[${g}].otherWords`) ?? []),
    ),
  );
  const maskTokens = [[], ...groups.map((group, g) => group[g + 1]!)];
  return { slots, groups, maskTokens, ...grids };
}

