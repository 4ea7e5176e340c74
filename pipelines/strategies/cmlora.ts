/**
 * CMLoRA — Zou et al., "Cached Multi-LoRA" (ICLR 2025); official code `pipeline_offline.py`,
 * `pipeline_online.py` (see methods.md section 2). Composite with frequency-ordered dominance and
 * DeepCache-style feature caching per LoRA.
 *
 * | code                 | symbol / meaning |
 * |----------------------|------------------|
 * | `order`              | adapters = [high-frequency LoRAs] + [low-frequency LoRAs], input order kept |
 * | `R`                  | number of high-frequency LoRAs |
 * | `N`                  | number of LoRAs |
 * | `kappa`              | κ = N − 0.5 (dominant coefficient) |
 * | `domRaw`, `nondomRaw`| raw weights: nondom = N / (κ + N − 1), dom = κ · nondom |
 * | `cacheInterval`      | c: refresh schedule S and whether features are cached (c > 1) |
 * | `k`                  | the rotation indicator, +1 at every refresh step |
 * | `phase1(i)`          | offline: 220·i ≤ 120·T (the official `i <= 120` at T = 220, scaled) |
 *
 * Per step i: at a refresh step (i ∈ S) the dominant-to-be's cache is emptied and k advances; the
 * dominant is (k − 1) mod R in phase 1 (or without low-frequency LoRAs), else ((k − 1) mod R) + 1;
 * each LoRA alone runs the full UNet (keeping its deep feature when c > 1) or, with a filled cache,
 * the shallow UNet on its own cached feature; outputs are weighted (dom / nondom), averaged over
 * N, then guided: ε = ε_u + w·(ε_c − ε_u).
 *
 * Refresh steps S: c = 0: every 2 steps in the first 37.5 %, every 3 until 87.5 %, every 2 after;
 * c = 1: every step; c ≥ 2: every c steps. Caching only for c ≥ 2 (c = 0 and 1 run the full UNet
 * for every LoRA every step, as the official code does).
 *
 * Deviations from the official code (each can be switched back with `official: true`, which the
 * reference fixtures use):
 * 1. Phase-2 refresh: the official line `prv_features_list[1:][k % R] = None` assigns into a slice
 *    copy, so after the phase boundary no cache is ever refreshed and every LoRA reuses its phase-1
 *    feature to the end. Here the new dominant's cache, (k mod R) + 1, is emptied as intended.
 * 2. Online phase test (`phaseRule: 'online'`): the official score uses radii ≥ 80 of a latent
 *    FFT, empty for any latent up to 113×113, so the score is NaN and phase 1 ends after step 0.
 *    Here the radius threshold is scaled to the latent (80/362 of the largest radius, as on the
 *    512² images the threshold was chosen for); 'online-official' keeps the NaN behaviour.
 * 3. Frequency classes are measured (see `frequency.ts`) or given per LoRA, never taken from a
 *    hard-coded category table; no LoRA is silently dropped. R = 0 is a typed error (the official
 *    code divides by zero).
 * 4. The dead dominant-weight decay (κ decremented after the weights were computed) is not copied.
 */
import { PipelineError } from '../errors.ts';
import { radialHighFrequencyScore } from '../frequency.ts';
import { cfgPair, oneHot, requireLoras, guide, type StrategySetup } from './setup.ts';
import type { Branch, StepContext, Strategy } from './types.ts';

export type FrequencyClass = 'high' | 'low';
export type PhaseRule = 'offline' | 'online' | 'online-official';

export interface CmloraKnobs {
  /** c: 0 = non-uniform refresh schedule, 1 = every step, ≥ 2 = every c steps with feature caching. */
  readonly cacheInterval: number;
  /** One class per LoRA of the stack, in stack order. */
  readonly frequencyClasses: readonly FrequencyClass[];
  readonly phaseRule: PhaseRule;
  /** Reproduce the official code's quirks (phase-2 refresh no-op); for comparing with it. */
  readonly official: boolean;
  /** `pipeline_online.py`'s threshold g on the latent frequency score. */
  readonly onlineThreshold: number;
}

export const CMLORA_DEFAULTS: Omit<CmloraKnobs, 'frequencyClasses'> = { cacheInterval: 3, phaseRule: 'offline', official: false, onlineThreshold: 0.4 };

/** Official offline boundary `i <= 120` at T = 220, scaled to T steps. */
const PHASE_STEP = 120;
const PHASE_TOTAL = 220;
/** Official online score: radii ≥ 80 on 512² images, whose largest radius is ≈ 362. */
const ONLINE_RADIUS_FRACTION = 80 / 362;

/** The refresh steps S for T steps and interval c. */
export function refreshSteps(steps: number, c: number): Set<number> {
  const range = (a: number, b: number, d: number) => Array.from({ length: Math.max(0, Math.ceil((b - a) / d)) }, (_, i) => a + i * d);
  if (c === 0) {
    const a = Math.floor(0.375 * steps);
    const b = Math.floor(0.875 * steps);
    return new Set([...range(0, a, 2), ...range(a, b, 3), ...range(b, steps, 2)]);
  }
  if (c === 1) return new Set(range(0, steps, 1));
  return new Set(range(0, steps, c));
}

interface CmloraState {
  k: number;
  dominant: number;
  step: number;
  phase1: boolean;
  /** Per branch (order position): cached deep features of the uncond and cond halves. */
  cache: Array<[Float32Array | undefined, Float32Array | undefined]>;
  /** Which pass each branch ran at each step (for logs and tests): true = full. */
  readonly passes: boolean[][];
  readonly dominants: number[];
}

export interface CmloraPlan {
  /** Adapter index (stack order) of each branch position. */
  readonly order: readonly number[];
  readonly R: number;
  readonly domRaw: number;
  readonly nondomRaw: number;
}

export function cmloraPlan(classes: readonly FrequencyClass[]): CmloraPlan {
  const high = classes.flatMap((c, i) => (c === 'high' ? [i] : []));
  const low = classes.flatMap((c, i) => (c === 'low' ? [i] : []));
  const n = classes.length;
  const kappa = n - 0.5;
  const nondomRaw = n / (kappa + n - 1);
  return { order: [...high, ...low], R: high.length, domRaw: nondomRaw * kappa, nondomRaw };
}

function channelMeanScore(latents: Float32Array, shape: readonly number[]): number {
  // The first image of the batch decides the phase for the whole run.
  const [, c, h, w] = shape as [number, number, number, number];
  const plane = new Float32Array(h * w);
  for (let ch = 0; ch < c; ch++) for (let p = 0; p < h * w; p++) plane[p]! += latents[ch * h * w + p]! / c;
  return radialHighFrequencyScore(plane, h, w, ONLINE_RADIUS_FRACTION, { logMagnitude: false });
}

export const cmloraStrategy = {
  name: 'cmlora' as const,
  textEncoderMix: (setup: Pick<StrategySetup, 'stack'>): number[] => setup.stack.strengths('text_encoder'),
  create(setup: StrategySetup, knobs: CmloraKnobs, latentShape: readonly number[]): Strategy<CmloraState> & { plan: CmloraPlan } {
    const { stack, steps } = setup;
    requireLoras('cmlora', stack, 1);
    const c = knobs.cacheInterval;
    if (!Number.isInteger(c) || c < 0) throw new PipelineError('BAD_ARGUMENT', `cacheInterval must be a whole number ≥ 0, got ${c}.`, { field: 'cacheInterval' });
    if (knobs.frequencyClasses.length !== stack.size) {
      throw new PipelineError('BAD_ARGUMENT', `CMLoRA needs a frequency class for each of the ${stack.size} LoRAs, got ${knobs.frequencyClasses.length}.`, { field: 'frequencyClasses' });
    }
    const plan = cmloraPlan(knobs.frequencyClasses);
    if (plan.R === 0) {
      throw new PipelineError('BAD_ARGUMENT', 'CMLoRA needs at least one high-frequency LoRA (the dominant rotation runs over them); every LoRA of this stack is low-frequency.', { field: 'frequencyClasses' });
    }
    const n = stack.size;
    const hasLow = plan.R < n;
    const S = refreshSteps(steps, c);
    const caching = c > 1;
    const phase1At = (ctx: StepContext, state: CmloraState): boolean => {
      if (!hasLow) return true;
      switch (knobs.phaseRule) {
        case 'offline':
          return PHASE_TOTAL * ctx.step <= PHASE_STEP * steps;
        case 'online-official':
          // radii ≥ 80 on a latent: empty → NaN score → the ≥ g test fails from step 1 on.
          return ctx.step === 0 ? true : false;
        case 'online':
          return ctx.step === 0 || (state.phase1 && channelMeanScore(ctx.latents, latentShape) >= knobs.onlineThreshold);
      }
    };
    return {
      name: 'cmlora',
      plan,
      begin: () => ({ k: 0, dominant: 0, step: -1, phase1: true, cache: Array.from({ length: n }, () => [undefined, undefined]), passes: [], dominants: [] }),
      branches(state, ctx): Branch[] {
        if (ctx.step !== state.step) {
          state.step = ctx.step;
          state.phase1 = phase1At(ctx, state);
          const inPhase1 = !hasLow || state.phase1;
          if (S.has(ctx.step)) {
            if (inPhase1) state.cache[state.k % plan.R] = [undefined, undefined];
            else if (!knobs.official) state.cache[(state.k % plan.R) + 1] = [undefined, undefined];
            state.k += 1;
          }
          state.dominant = inPhase1 ? (state.k - 1) % plan.R : ((state.k - 1) % plan.R) + 1;
          state.dominants.push(state.dominant);
          state.passes.push(state.cache.map(([u]) => !caching || u === undefined));
        }
        return plan.order.flatMap((adapter, j) => {
          const [u, cnd] = cfgPair(setup, ctx, oneHot(stack, adapter));
          const [fu, fc] = state.cache[j]!;
          if (caching && fu !== undefined && fc !== undefined) return [{ ...u, deepFeature: fu }, { ...cnd, deepFeature: fc }];
          return caching ? [{ ...u, keepDeepFeature: true }, { ...cnd, keepDeepFeature: true }] : [u, cnd];
        });
      },
      combine(state, _ctx, outputs) {
        const us: Float32Array[] = [];
        const cs: Float32Array[] = [];
        for (let j = 0; j < n; j++) {
          const ou = outputs[2 * j]!;
          const oc = outputs[2 * j + 1]!;
          if (ou.deepFeature !== undefined && oc.deepFeature !== undefined) state.cache[j] = [ou.deepFeature, oc.deepFeature];
          const w = Math.fround(j === state.dominant ? plan.domRaw : plan.nondomRaw);
          us.push(Float32Array.from(ou.eps, (v) => Math.fround(v * w)));
          cs.push(Float32Array.from(oc.eps, (v) => Math.fround(v * w)));
        }
        const mean = (parts: Float32Array[]) => {
          const out = new Float32Array(parts[0]!.length);
          for (let i = 0; i < out.length; i++) {
            let acc = 0;
            for (const p of parts) acc += p[i]!;
            out[i] = Math.fround(acc / n);
          }
          return out;
        };
        return guide(mean(us), mean(cs), setup.guidanceScale);
      },
    };
  },
};
