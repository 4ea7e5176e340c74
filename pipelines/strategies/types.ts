/**
 * The hook surface strategies plug into (ARCHITECTURE.md section 3, STYLE.md section 5): the loop
 * asks the strategy which denoiser branches to run at each step, runs them (batched), and lets the
 * strategy combine the outputs into one noise prediction, guidance included.
 *
 * Gradient-guided strategies (CLoRA, LoRA-Composer) also implement `update`: before a step's
 * branches, it may move the latents (z ← z − η·∂L/∂z from attention maps, latent
 * re-initialisation) with `LatentTools` — the loop's own batched denoiser calls, plus the maps-only
 * pass and the VJP — and may hand back the outputs its last forward already produced
 * (docs/design-notes.md, "Latent updates").
 *
 * State lives in the object `begin` returns, never in module globals or on the loop.
 */
import type { Tensor } from '../../models/index.ts';
import type { NtXentEntry } from '../../models/index.ts';

/** Region slots of a branch (one image; the loop repeats them for every image of the batch). */
export interface BranchRegions {
  /** (1, R, S_r, D) */
  readonly context: Tensor<'float32'>;
  /** Per UNet level: (1, R, h_l, w_l), 0/1. */
  readonly masks: readonly Tensor<'float32'>[];
  /** (1, R, K) slot adapter strengths (with LoRAs). */
  readonly mix?: Tensor<'float32'>;
  /** Per level: (1, K, h_l, w_l) per-pixel adapter strengths (with LoRAs). */
  readonly mixMaps?: readonly Tensor<'float32'>[];
  /** LoRA-Composer's self-attention isolation between the regions. */
  readonly isolation?: boolean;
  /** Each slot's output through its own adapters on to_out.0 (LoRA-Composer's composition after to_out). */
  readonly outputAdapters?: boolean;
}

/** Head- and layer-averaged attention maps of the 1/32 grid (UNet level 2), flat, for the branch's B images. */
export interface BranchMaps {
  /** Cross-attention (B, N, S). */
  readonly xattn: Float32Array;
  /** Self-attention (B, N, N). */
  readonly selfattn: Float32Array;
  /** Region slots over the whole image (B, R, N, S_r), for branches with regions. */
  readonly xattnRegion?: Float32Array;
}

/** ∂L/∂(maps) of one branch, shaped like its `BranchMaps` (absent maps: zero cotangent). */
export interface MapCotangents {
  readonly xattn?: Float32Array;
  readonly selfattn?: Float32Array;
  readonly xattnRegion?: Float32Array;
}

export interface StepContext {
  /** Model evaluation index (0…evaluations−1); schedulers with repeats evaluate more than once per step. */
  readonly evaluation: number;
  /** The sampling step it belongs to (0…steps−1), used for prompt editing schedules. */
  readonly step: number;
  /** The UNet timestep (0–999, may be fractional). */
  readonly timestep: number;
  /** Images in the batch. */
  readonly batch: number;
  /** The latents before this evaluation (B, C, h, w), read-only. */
  readonly latents: Float32Array;
}

/**
 * One denoiser branch: every image of the batch is evaluated with this text context and mix. A batch
 * of different jobs (`jobs/batched.ts`) gives each image its own context and mix row instead.
 */
export interface Branch {
  /** (1, 77·k, D) text conditioning for every image, or (B, 77·k, D): one context per image. */
  readonly context: Tensor<'float32'>;
  /**
   * UNet strength of each adapter of the run's stack for this branch (the adapter-bank mix row).
   * Default: the stack's own strengths (all LoRAs merged, as A1111 applies a stack).
   */
  readonly mix?: readonly number[];
  /** One mix row per image (B rows), for a batch of different jobs; takes precedence over `mix`. */
  readonly imageMixes?: readonly (readonly number[])[];
  /** Run the shallow UNet on this cached deep feature (the batch's B images, flat) — CMLoRA. */
  readonly deepFeature?: Float32Array;
  /** Keep this (full) pass's deep feature: it comes back in the branch's output. */
  readonly keepDeepFeature?: boolean;
  /** Region slots (the regions strategy). */
  readonly regions?: BranchRegions;
  /** Also return this branch's 1/32-grid attention maps. */
  readonly attentionMaps?: boolean;
}

/** What one branch produced for the whole batch. */
export interface BranchOutput {
  /** ε (B, C, h, w), flat. */
  readonly eps: Float32Array;
  /** The deep feature (B, C₁, h, w), flat, when the branch asked to keep it. */
  readonly deepFeature?: Float32Array;
  /** The attention maps, when the branch asked for them. */
  readonly maps?: BranchMaps;
}

/**
 * What `update` may use at one evaluation: the denoiser at this timestep on any latents, batched as
 * the loop batches branches (model-input scaling applied).
 */
export interface LatentTools {
  /** The branches' full passes at these latents (B, C, h, w). */
  run(branches: readonly Branch[], latents: Float32Array): Promise<BranchOutput[]>;
  /** The branches' attention maps only (the UNet up to its last 1/32-grid layer). */
  maps(branches: readonly Branch[], latents: Float32Array): Promise<BranchMaps[]>;
  /**
   * ∂L/∂latents for L = Σ_i ⟨cotangents[i], maps of branch i⟩ (every branch reads the same
   * latents, so their gradients add up), with the maps the VJP pass computed on the way.
   */
  vjp(branches: readonly Branch[], latents: Float32Array, cotangents: readonly MapCotangents[]): Promise<{ grad: Float32Array; maps: BranchMaps[] }>;
  /**
   * CLoRA's one-pass update: ∂L/∂latents for L = Σ_images NT-Xent over `entries` (slot p's maps are
   * the mean of branches 2p and 2p + 1), the per-image losses and each branch's xattn. Undefined
   * when it cannot run as one pass (the branches need several UNet calls, or the denoiser has no
   * such pass): use `maps` + `vjp` then. With `options.outputs`, the pass runs the whole UNet and
   * also returns each branch's full output at these latents (ε, and maps with xattn only).
   */
  ntXentVjp?(
    branches: readonly Branch[],
    latents: Float32Array,
    entries: readonly NtXentEntry[],
    temperature: number,
    options?: { readonly outputs?: boolean },
  ): Promise<{ grad: Float32Array; xattn: Float32Array[]; loss: Float32Array; outputs?: BranchOutput[] } | undefined>;
}

/** A latent update: the new latents, and optionally the step's branch outputs (then not run again). */
export interface LatentUpdate {
  readonly latents: Float32Array;
  readonly outputs?: readonly BranchOutput[];
}

export interface Strategy<State> {
  readonly name: string;
  begin(): State;
  branches(state: State, ctx: StepContext): readonly Branch[];
  /** `outputs[i]` is what branch i produced. Returns ε (B, C, h, w), flat. */
  combine(state: State, ctx: StepContext, outputs: readonly BranchOutput[]): Float32Array;
  /**
   * Optional: move the latents before this evaluation's branches (`ctx.latents` are the current
   * ones). Returning `outputs` (one per branch `branches` would name) skips the loop's own call.
   */
  update?(state: State, ctx: StepContext, tools: LatentTools): Promise<LatentUpdate | undefined>;
}
