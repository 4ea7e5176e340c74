/**
 * The one internal adapter type every LoRA file format is normalised to (CONVENTIONS.md 2.5–2.7).
 *
 * A module's delta ΔW has the target weight's layout: linear [out, in], conv [out, in, kh, kw].
 * - `lowrank`: ΔW = scale · up · down (conv: down is [r, in, kh, kw], up is [out, r]); kohya and
 *   PEFT LoRA, LoCon (CP `lora_mid` folded into `down`), LoHa (rewritten exactly as rank r1·r2),
 *   and a LoKr with low-rank factors when that form is smaller (kron(AB, CD) = kron(A, C)·kron(B, D)).
 * - `full`: ΔW given in full (full diffs, Tucker LoHa, a LoKr whose low-rank form would be larger);
 *   needs the merged-weights graph.
 * The user's strength multiplies either form; it is not folded in here.
 */

export type LoraComponent = 'unet' | 'text_encoder';

export type ModuleDelta =
  | {
      readonly kind: 'lowrank';
      /** [r, in] for linear targets, [r, in, kh, kw] for conv targets. */
      readonly down: Float32Array;
      readonly downShape: readonly number[];
      /** [out, r] */
      readonly up: Float32Array;
      readonly upShape: readonly [number, number];
      /** alpha / rank (1 when the file has no alpha). */
      readonly scale: number;
    }
  | {
      readonly kind: 'full';
      /** ΔW in the target weight's shape, scale already applied. */
      readonly diff: Float32Array;
      readonly shape: readonly number[];
    };

export interface LoraModule {
  readonly component: LoraComponent;
  /** Diffusers module path without the component prefix, e.g. `down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`. */
  readonly module: string;
  readonly delta: ModuleDelta;
  /** The file keys this module came from (for reports). */
  readonly sourceKeys: readonly string[];
}

/** Where a LoRA can apply: every weight a LoRA may target, with its shape (from the built graphs). */
export interface LoraTarget {
  readonly component: LoraComponent;
  readonly module: string;
  /** The target weight's shape: [out, in] or [out, in, kh, kw]. */
  readonly weightShape: readonly number[];
}
