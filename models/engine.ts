/**
 * The SD engine: an opened model plus lazily created ONNX Runtime sessions for its four graphs
 * (text encoder, UNet, VAE decoder, VAE encoder), built from the model's own configs and weights and
 * cached on disk. This is what `pipelines/` receives (as interfaces) and what `chorus debug run` uses.
 *
 * Inputs are checked here, once, against the model's configs (shapes and dtypes), with typed errors
 * naming the input.
 */
import { ModelError } from './errors.ts';
import { defaultCacheDir, prepareModelFiles } from './cache.ts';
import { preciseForWebGpu } from './onnx/precise-rewrites.ts';
import { openModel, type OpenedModel, type OpenModelOptions } from './model.ts';
import { buildClipTextGraph } from './networks/clip-text.ts';
import { buildUnetGraph, SAMPLE_INDEX_INPUT, SAMPLE_ROWS_INPUT } from './networks/unet.ts';
import { buildVaeDecoderGraph, buildVaeEncoderGraph } from './networks/vae.ts';
import type { Graph } from './onnx/builder.ts';
import { OrtSession, optimizedCachePath, pruneOptimizedCopies, resolveProviders, type ConcreteDevice, type Device, type ProviderChoice, type WebGpuStatus } from './runtime.ts';
import { choosePrecision, type Precision, type PrecisionChoice } from './device.ts';
import { floatToHalf, halfToFloat } from './tensor.ts';
import type { Tensor } from './tensor.ts';
import { toFloat32 } from './tensor.ts';
import { bindWeights, type BindReport } from './weights.ts';
import type { Component } from './keys/ldm.ts';
import { bankFamily, bankLayersOf, LORA_MIX_INPUT } from './networks/adapter-bank.ts';
import { bankFeeds, mixTensor } from './lora/bank.ts';
import { mergePatch } from './lora/merge.ts';
import type { LoraComponent, LoraModule, LoraTarget } from './lora/types.ts';
import { loadLora, loraTargetsFromParams, type LoadedLora, type LdmModuleMap } from './lora/load.ts';
import { moduleLayers, unetModuleMap } from './keys/ldm.ts';
import type { ParamPatch } from './weights.ts';
import * as fs from 'node:fs';
import { buildUnetMapsGraph, buildUnetNtXentVjpGraph, buildUnetVjpGraph, NTXENT_LOSS_OUTPUT, UNET_VJP_DEFAULT_LEVEL, resolveAttentionBackward, type AttentionBackward } from './networks/unet-vjp.ts';
import { NTXENT_INPUTS } from './networks/ntxent-graph.ts';
import { cotangentInput, gradientOutput } from './onnx/vjp.ts';
import { hoistBankWeights, widenedWeight, type HoistedWeight } from './onnx/hoist-weights.ts';
import { branchCreatedBytes, conditionalOutput } from './onnx/conditional-output.ts';

/**
 * The bool scalar input of CPU one-pass gradient graphs (`ntxent.noisePred`): false skips the UNet's
 * tail after the maps and returns no ε (`ntxent.skipNoisePred`).
 */
export const NOISE_PRED_WANTED_INPUT = 'noise_pred_wanted';
/** Above this many bytes created inside `If` branches, no optimized copy is written (protobuf's 2 GB limit, with a margin for the rest of the file). */
const BRANCH_COPY_LIMIT_BYTES = 1.5e9;
/**
 * The bool input of the same graph on the CPU that asks for the gradient: false skips the backward
 * (`ntxent.skipGradient`), so the session also serves forward passes (ε and the maps).
 */
export const GRADIENT_WANTED_INPUT = 'gradient_wanted';

/** Bank sessions whose widened weights the host feeds (see `hoistBankWeights`). */
interface Hoist {
  readonly weightsPath: string;
  readonly params: Readonly<Record<string, { readonly offset: number; readonly length: number }>>;
  readonly hoisted: readonly HoistedWeight[];
}

/** Stacks whose bank inputs (and widened weights) the engine keeps, per component: the most recent ones. */
const BANK_FEEDS_KEPT = 2;

export type GraphKind = 'text_encoder' | 'unet' | 'vae_decoder' | 'vae_encoder';

export interface EngineOptions extends OpenModelOptions {
  readonly device?: Device;
  /** Weight precision: `auto` (default) = fp16 where the device supports it (see models/device.ts), else fp32. */
  readonly precision?: 'auto' | Precision;
  /** Keep reused UNet inputs (text conditioning, LoRA bank) on the device between calls (WebGPU; default true). */
  readonly residentInputs?: boolean;
  /** Apply `precision` even where the device would not choose it (numerics checks: fp16 weights on the CPU). */
  readonly forcePrecision?: boolean;
  readonly cacheDir?: string;
  readonly threads?: number;
  /**
   * CPU, fp32: feed the bank layers' widened weights `[Wᵀ ; up]` as inputs built once per stack
   * instead of concatenating them in the graph at every call (`onnx/hoist-weights.ts`; default true).
   */
  readonly hoistBankWeights?: boolean;
  /**
   * The attention backward of the gradient (VJP) graphs (`UnetVjpOptions.attentionBackward`; default
   * `auto`: the lean backward everywhere, the level-0 self-attention probabilities recomputed per head
   * in the backward above 256² instead of kept from the forward).
   */
  readonly attentionBackward?: AttentionBackward;
  /**
   * ONNX Runtime's optimized copies of the UNet sessions (CPU only; `OrtSession`'s
   * `optimizedCache`): `auto` (default) loads a copy when one exists and writes one while rebuilds
   * are expected (`expectSessionRebuilds`, e.g. CLoRA's exclusive gradient passes, which rebuild two
   * UNet sessions per image); `off` never uses them.
   */
  readonly optimizedSessions?: 'auto' | 'off';
  /** Disk budget for the optimized copies under `cacheDir`, least recently used deleted first (default 12 GiB). */
  readonly optimizedSessionBytes?: number;
}

export interface UnetVariant {
  /** Attention modules whose probabilities to output (`attn_probs.<module>`). */
  readonly attentionProbs?: readonly string[];
  readonly debugOutputs?: boolean;
  /** Also output `deep_feature` (the last up block's input) for a later shallow pass. */
  readonly deepFeature?: boolean;
  /** The shallow variant: starts from a cached `deep_feature` (see networks/unet.ts). */
  readonly shallow?: boolean;
  /** Region slots (see networks/unet.ts `regions`). */
  readonly regions?: boolean;
  /**
   * Head- and layer-averaged attention maps of one level: outputs `xattn`, `selfattn` (and
   * `xattn_region` (B, R, N, S) with regions).
   */
  readonly attentionMaps?: { readonly level: number };
  /** With `attentionMaps`: only the part of the UNet the maps need (no `noise_pred`; see `buildUnetMapsGraph`). */
  readonly mapsOnly?: boolean;
  /** With `regions`: LoRA-Composer's self-attention isolation (see networks/unet.ts). */
  readonly selfAttentionIsolation?: boolean;
  /** With `regions` and LoRAs: each slot's output through its own to_out.0 adapters (see networks/unet.ts). */
  readonly regionOutputAdapters?: boolean;
  /**
   * Batch elements that share a sample, a LoRA mix row and the call's one timestep (the two halves
   * of a CFG pair) run the layers before the first cross-attention once (networks/unet.ts
   * `sharedPrefix`; in SD 1.5 conv_in, `down_blocks.0.resnets.0` and the first self-attention).
   * `runUnet` finds the distinct samples of each call; the session is the same whatever it finds,
   * and the outputs are per batch element as without it. Not with regions, debug outputs or the
   * maps-only graph (GRAPH_BUILD).
   */
  readonly sharedPrefix?: boolean;
}

/** Region inputs of one UNet call (the regions variant). */
export interface RegionInputs {
  /** (B, R, S_r, D) */
  readonly context: Tensor<'float32'>;
  /** Per UNet level l: (B, R, h_l, w_l), 0/1. */
  readonly masks: readonly Tensor<'float32'>[];
  /** (B, R, K): each slot's adapter strengths for its cross-attention k/v (with LoRAs). */
  readonly mix?: Tensor<'float32'>;
  /** Per level l: (B, K, h_l, w_l) per-pixel adapter strengths (with LoRAs). */
  readonly mixMaps?: readonly Tensor<'float32'>[];
}

export interface TextEncoderVariant {
  /** An A1111 clip skip ≥ 3 to output as `clip_skip_<k>` (1 and 2 are always there). */
  readonly clipSkip?: number;
}

export interface LoraVariant {
  /** Build with adapter-bank inputs (LoRAs as runtime inputs). */
  readonly adapterBank?: boolean;
  /**
   * With `adapterBank`: bank inputs only on the layers of these families (`bankFamily`), the ones the
   * stack covers; default all. The engine picks them per stack (`bankFamiliesOf`).
   */
  readonly bankFamilies?: readonly string[];
}

export type GraphVariant = UnetVariant & TextEncoderVariant & LoraVariant;

/** A LoRA as the engine applies it: its normalised modules and the strengths for each component. */
export interface StackEntry {
  readonly path: string;
  readonly name: string;
  readonly modules: readonly LoraModule[];
  /** Text-encoder strength (A1111's te multiplier). */
  readonly te: number;
  /** UNet strength. */
  readonly unet: number;
}

/**
 * An ordered LoRA stack: adapter k of the bank is `entries[k]`. A value: the same files in the same
 * order give the same `id`, which keys the bank inputs and the merged weights in the caches.
 */
export class AdapterStack {
  readonly entries: readonly StackEntry[];
  readonly id: string;

  constructor(entries: readonly StackEntry[]) {
    this.entries = entries;
    this.id = entries.map((e) => fileIdentity(e.path)).join('\n');
  }

  get size(): number {
    return this.entries.length;
  }

  /** Strengths of every adapter for one component, in stack order (the "merge" mix row). */
  strengths(component: LoraComponent): number[] {
    return this.entries.map((e) => (component === 'unet' ? e.unet : e.te));
  }
}

export function fileIdentity(file: string): string {
  try {
    const st = fs.statSync(file);
    return `${fs.realpathSync(file)}|${st.size}|${st.mtimeMs}`;
  } catch {
    return file;
  }
}

/**
 * How a call applies LoRAs:
 * - `bank`: the stack's adapters are bank inputs and `mix[b][k]` is adapter k's strength for batch
 *   element b (so each element may use different LoRAs; switching needs no rebuild);
 * - `merged`: the stack is baked into the weights at its strengths (fixed stack; required for LoKr
 *   and full diffs). Same outputs as a bank call with every row of the mix = the strengths.
 */
export type AdapterUse =
  | { readonly mode: 'bank'; readonly stack: AdapterStack; readonly mix: readonly (readonly number[])[] }
  | { readonly mode: 'merged'; readonly stack: AdapterStack };

export interface TextEncoderOutput {
  readonly lastHiddenState: Tensor<'float32'>;
  readonly penultimateRaw: Tensor<'float32'>;
  readonly penultimateFinalLn: Tensor<'float32'>;
}

export interface UnetInput {
  /** (B, C_in, h, w) */
  readonly sample: Tensor;
  /** (), (1) or (B); integer or fractional values. */
  readonly timestep: Tensor;
  /** (B, 77·k, cross_attention_dim) */
  readonly encoderHiddenStates: Tensor;
  /** The cached deep feature, for the shallow variant (B, C₁, h, w). */
  readonly deepFeature?: Tensor;
  /** Region slots, for the regions variant. */
  readonly regions?: RegionInputs;
}

/**
 * Cotangents of the attention maps for `runUnetVjp`: ∂L/∂xattn (B, N, S), ∂L/∂selfattn (B, N, N),
 * and with the regions variant ∂L/∂xattn_region (B, R, N, S_r).
 */
export interface UnetCotangents {
  readonly xattn: Tensor;
  readonly selfattn: Tensor;
  readonly xattnRegion?: Tensor;
}

export interface UnetVjpVariant {
  /** The UNet level of the maps (default 2, the 1/32 grid of CLoRA and LoRA-Composer). */
  readonly level?: number;
  /** Also return ∂L/∂(stage output) per UNet stage (see `networks/unet-vjp.ts`). */
  readonly debugGradients?: boolean;
  /** The regions variant (`input.regions` required), with its build options. */
  readonly regions?: boolean;
  readonly selfAttentionIsolation?: boolean;
  readonly regionOutputAdapters?: boolean;
  /**
   * The caller adds up `gradSample` over batch elements that read the same sample (CLoRA and
   * LoRA-Composer sum over the branches of an image): elements with the same sample, timestep and
   * LoRA mix then share the UNet's layers before the first cross-attention (`sharedPrefix`; SD 1.5:
   * the first self-attention runs once per CFG pair), and each group's gradient comes back on its
   * first element, zeros on the others. Same sums as without. Not with regions or debug gradients.
   */
  readonly mergeDuplicateSamples?: boolean;
  /**
   * CLoRA's one-pass update (`buildUnetNtXentVjpGraph`): the loss is the NT-Xent of the xattn maps,
   * computed in the graph from these `ntxent.*` feeds (`ntXentFeeds`); the cotangents argument is
   * then ignored. No regions, no debug gradients.
   */
  readonly ntxent?: {
    readonly temperature: number;
    readonly feeds: Readonly<Record<string, Tensor>>;
    /** Run the whole UNet and also return `noisePred` (one pass for ε and the gradient). */
    readonly noisePred?: boolean;
    /**
     * With `noisePred`: this call's ε is not needed, no `noisePred` is returned. The same session
     * runs; on the CPU it skips the UNet's layers after the maps (an ONNX `If`, see
     * `onnx/conditional-output.ts`). On the CPU a call without `noisePred` runs that way too, so
     * both kinds of round share one session there; elsewhere it runs the truncated graph.
     */
    readonly skipNoisePred?: boolean;
    /**
     * This call needs ε and the maps only: the backward is skipped (an ONNX `If`) and no gradient
     * is returned. CPU only (elsewhere a SHAPE_MISMATCH error); `skipNoisePred` must be off.
     */
    readonly skipGradient?: boolean;
  };
}

export interface UnetVjpOutput {
  /** The maps at the given inputs (B, N, S) and (B, N, N). */
  readonly xattn: Tensor<'float32'>;
  readonly selfattn: Tensor<'float32'>;
  /** The region slots' maps (B, R, N, S_r), with the regions variant. */
  readonly xattnRegion?: Tensor<'float32'>;
  /** ∂L/∂sample, L = Σ cot.xattn·xattn + Σ cot.selfattn·selfattn; shaped like sample (empty, shape [0], with `ntxent.skipGradient`). */
  readonly gradSample: Tensor<'float32'>;
  /** `debug.grad.<stage>` when asked for. */
  readonly debugGradients: Readonly<Record<string, Tensor<'float32'>>>;
  /** With `variant.ntxent`: the loss per image (selfattn is then empty, shape [0]). */
  readonly ntxentLoss?: Tensor<'float32'>;
  /** With `variant.ntxent.noisePred`: the UNet's output at the same inputs. */
  readonly noisePred?: Tensor<'float32'>;
}

const COMPONENT_OF: Readonly<Record<GraphKind, Component>> = { text_encoder: 'text_encoder', unet: 'unet', vae_decoder: 'vae', vae_encoder: 'vae' };

/** The provider a session will most likely get, decided before graphs are built (see `Sd15Engine.plan`). */
export interface DevicePlan {
  readonly device: ConcreteDevice;
  readonly webgpu?: WebGpuStatus;
  readonly precision: PrecisionChoice;
}

/** fp16 weights, fp32 compute: every weight rounded to the nearest float16 (after any LoRA merge). */
function fp16WeightsPatch(inner: ParamPatch | undefined): ParamPatch {
  return {
    key: `fp16-weights${inner === undefined ? '' : `|${inner.key}`}`,
    apply(name, values, storedShape) {
      const v = inner?.apply(name, values, storedShape) ?? values;
      const out = new Float32Array(v.length);
      for (let i = 0; i < v.length; i++) out[i] = halfToFloat(floatToHalf(v[i]!));
      return out;
    },
  };
}

/** A gradient per distinct sample (S, …) → per batch element (B, …): on each sample's first element, zeros elsewhere. */
function spreadRows(grad: Tensor<'float32'>, distinct: { rows: number[] } | undefined, batch: number): Tensor<'float32'> {
  if (distinct === undefined) return grad;
  const per = grad.data.length / distinct.rows.length;
  const data = new Float32Array(batch * per);
  distinct.rows.forEach((b, u) => data.set(grad.data.subarray(u * per, (u + 1) * per), b * per));
  return { dtype: 'float32', shape: [batch, ...grad.shape.slice(1)], data };
}

/**
 * The distinct samples of a batch (`sharedPrefix`): elements with equal sample rows and LoRA mix
 * rows share one. Undefined when every element is distinct.
 */
export function distinctSamples(sample: Tensor<'float32'>, mix?: readonly (readonly number[])[]): { index: number[]; rows: number[] } | undefined {
  const batch = sample.shape[0]!;
  const per = sample.data.length / batch;
  const row = (b: number) => sample.data.subarray(b * per, (b + 1) * per);
  const same = (a: number, b: number): boolean => {
    const ma = mix?.[a];
    const mb = mix?.[b];
    if (ma !== undefined && mb !== undefined && (ma.length !== mb.length || ma.some((v, k) => !Object.is(v, mb[k])))) return false;
    const ra = row(a);
    const rb = row(b);
    for (let j = 0; j < per; j++) if (!Object.is(ra[j], rb[j])) return false;
    return true;
  };
  const rows: number[] = [];
  const index = Array.from({ length: batch }, (_, b) => {
    const found = rows.findIndex((r) => same(r, b));
    if (found >= 0) return found;
    rows.push(b);
    return rows.length - 1;
  });
  return rows.length === batch ? undefined : { index, rows };
}

/**
 * The feeds of a shared-prefix graph (`sharedPrefix`): the distinct sample rows, their index per
 * batch element, the batch element whose LoRA mix each distinct sample's prefix uses, and the
 * timestep (one value when samples are shared).
 */
function sharedPrefixFeeds(sample: Tensor<'float32'>, timestep: Tensor<'float32'>, distinct: { index: readonly number[]; rows: readonly number[] }): Record<string, Tensor> {
  const per = sample.shape.slice(1).reduce((a, d) => a * d, 1);
  const data = new Float32Array(distinct.rows.length * per);
  distinct.rows.forEach((b, u) => data.set(sample.data.subarray(b * per, (b + 1) * per), u * per));
  const shared = distinct.rows.length < distinct.index.length;
  return {
    sample: { dtype: 'float32', shape: [distinct.rows.length, ...sample.shape.slice(1)], data },
    timestep: shared ? { dtype: 'float32', shape: [1], data: timestep.data.slice(0, 1) } : { dtype: 'float32', shape: [timestep.data.length], data: timestep.data },
    [SAMPLE_INDEX_INPUT]: { dtype: 'int64', shape: [distinct.index.length], data: BigInt64Array.from(distinct.index, BigInt) },
    [SAMPLE_ROWS_INPUT]: { dtype: 'int64', shape: [distinct.rows.length], data: BigInt64Array.from(distinct.rows, BigInt) },
  };
}

function f32(t: Tensor): Tensor<'float32'> {
  return t.dtype === 'float32' ? (t as Tensor<'float32'>) : { dtype: 'float32', shape: t.shape, data: toFloat32(t) };
}

export class Sd15Engine {
  readonly model: OpenedModel;
  readonly device: Device;
  readonly cacheDir: string;
  readonly #threads: number | undefined;
  readonly #sessions = new Map<string, Promise<OrtSession>>();
  readonly #reports = new Map<GraphKind, BindReport>();
  readonly #bankFeeds = new Map<string, Record<string, Tensor>>();
  readonly #precision: 'auto' | Precision;
  readonly #forcePrecision: boolean;
  readonly #resident: boolean;
  #plan: Promise<DevicePlan> | undefined;
  /** The last text conditioning fed to the UNet: an equal one is fed as this same object (kept on the device). */
  #lastContext: Tensor<'float32'> | undefined;

  private constructor(model: OpenedModel, options: EngineOptions) {
    this.model = model;
    this.device = options.device ?? 'auto';
    this.#precision = options.precision ?? 'auto';
    this.#forcePrecision = options.forcePrecision === true;
    this.#resident = options.residentInputs !== false;
    this.cacheDir = options.cacheDir ?? defaultCacheDir();
    this.#threads = options.threads;
    this.#hoistWeights = options.hoistBankWeights !== false;
    this.#attentionBackward = options.attentionBackward ?? 'auto';
    this.#optimizedSessions = options.optimizedSessions ?? 'auto';
    this.#optimizedBytes = options.optimizedSessionBytes ?? 12 * 2 ** 30;
  }

  readonly #optimizedSessions: 'auto' | 'off';
  readonly #optimizedBytes: number;
  #rebuildsExpected = false;

  /**
   * Say that UNet sessions will be released and built again in this process (see
   * `releaseUnetSessions`, `releaseGradientSessions`), or no longer (`false`): while on, each UNet
   * session build also writes ONNX Runtime's optimized copy, so the next build of the same graph
   * loads in seconds instead of re-running the optimizer (≈ 100 s for an SD 1.5 gradient graph, 36 s
   * for a forward one). Copies that exist are loaded either way.
   */
  expectSessionRebuilds(on = true): void {
    this.#rebuildsExpected = on;
  }

  /**
   * The session options that load or write a UNet graph's optimized copy, when that applies. Not for
   * a graph whose `If` branches would make ONNX Runtime's copy exceed protobuf's 2 GB limit
   * (`branchCreatedBytes`; SD 1.5's one-pass gradient graph with its backward in a branch): the
   * write would fail after the optimization, and the session be built a second time.
   */
  #optimizedCacheFor(modelPath: string, device: ConcreteDevice, graph?: Graph): { optimizedCache?: string } {
    if (this.#optimizedSessions === 'off' || device !== 'cpu') return {};
    if (graph !== undefined && branchCreatedBytes(graph) > BRANCH_COPY_LIMIT_BYTES) return {};
    const copy = optimizedCachePath(modelPath);
    return this.#rebuildsExpected || fs.existsSync(copy) ? { optimizedCache: copy } : {};
  }

  /** After a session build that may have written a copy: keep the copies within the disk budget. */
  #pruneCopies(written: { optimizedCache?: string }): void {
    if (written.optimizedCache === undefined) return;
    try {
      pruneOptimizedCopies(this.cacheDir, this.#optimizedBytes, [written.optimizedCache]);
    } catch {
      // Pruning is housekeeping; a failure here must not fail the run.
    }
  }

  readonly #hoistWeights: boolean;
  readonly #attentionBackward: AttentionBackward;
  readonly #hoists = new WeakMap<OrtSession, Hoist>();
  /** Widened weights per `up` feed (the `up` tensors live as long as their stack's bank feeds). */
  readonly #widened = new WeakMap<Tensor, Tensor<'float32'>>();

  /** The graph a bank session runs: on the CPU in fp32, with its weight Concats hoisted (see `hoistBankWeights`). */
  #hoisting(graph: Graph, plan: DevicePlan): { graph: Graph; hoisted: readonly HoistedWeight[] } {
    if (!this.#hoistWeights || plan.device !== 'cpu' || plan.precision.precision !== 'fp32') return { graph, hoisted: [] };
    return hoistBankWeights(graph, (name) => name.startsWith('lora.') && name.endsWith('.up'));
  }

  /**
   * For callers that run a bank session from `session()` themselves: `feeds` plus the widened
   * weights the session reads instead of its weight Concats (CPU; see `hoistBankWeights`).
   */
  widenedFeeds(session: OrtSession, feeds: Readonly<Record<string, Tensor>>): Record<string, Tensor> {
    const all = { ...feeds };
    this.#widen(session, all);
    return all;
  }

  /** Add the widened-weight feeds a hoisted session reads (built once per `up` tensor, from the session's weights file). */
  #widen(session: OrtSession, feeds: Record<string, Tensor>): void {
    const hoist = this.#hoists.get(session);
    if (hoist === undefined) return;
    let fd: number | undefined;
    try {
      for (const h of hoist.hoisted) {
        const up = feeds[h.up];
        if (up === undefined || up.dtype !== 'float32') throw new ModelError('SHAPE_MISMATCH', `the bank input ${h.up} is missing.`, { input: h.up });
        let widened = this.#widened.get(up);
        if (widened === undefined) {
          const where = hoist.params[h.param.name];
          if (where === undefined) throw new Error(`engine: ${h.param.name} is not in the weights file`);
          fd ??= fs.openSync(hoist.weightsPath, 'r');
          const base = new Float32Array(where.length / 4);
          const bytes = new Uint8Array(base.buffer);
          let done = 0;
          while (done < bytes.length) {
            const n = fs.readSync(fd, bytes, done, bytes.length - done, where.offset + done);
            if (n === 0) throw new ModelError('RUNTIME', `${hoist.weightsPath} is shorter than its layout says; delete the cache folder to rebuild it.`, { file: hoist.weightsPath });
            done += n;
          }
          const w = widenedWeight(h, base, up.data as Float32Array, up.shape);
          widened = { dtype: 'float32', shape: w.shape, data: w.data };
          this.#widened.set(up, widened);
        }
        feeds[h.input] = widened;
      }
    } finally {
      if (fd !== undefined) fs.closeSync(fd);
    }
  }

  /** The bank inputs of a stack for a component, built once and kept for the most recent stacks. */
  #bankFeedsOf(kind: 'text_encoder' | 'unet', stack: AdapterStack): Record<string, Tensor> {
    const cacheKey = `${kind}|${stack.id}`;
    let feeds = this.#bankFeeds.get(cacheKey);
    if (feeds === undefined) {
      // Every bank layer of the full graph: variants that read fewer (families, shallow, maps-only) get a subset at run time.
      feeds = bankFeeds(bankLayersOf(this.buildGraph(kind, { adapterBank: true })), kind, stack.entries);
      const sameKind = [...this.#bankFeeds.keys()].filter((k) => k.startsWith(`${kind}|`));
      if (sameKind.length >= BANK_FEEDS_KEPT) this.#bankFeeds.delete(sameKind[0]!);
    } else {
      this.#bankFeeds.delete(cacheKey);
    }
    this.#bankFeeds.set(cacheKey, feeds); // most recent last
    return feeds;
  }

  /** Open a model (diffusers folder or single file). Sessions are created on first use. */
  static open(modelPath: string, options: EngineOptions = {}): Sd15Engine {
    return new Sd15Engine(openModel(modelPath, options), options);
  }

  #loraTargets: LoraTarget[] | undefined;

  /** Every weight a LoRA may change in this model (from the UNet and text-encoder graphs). */
  loraTargets(): readonly LoraTarget[] {
    this.#loraTargets ??= [
      ...loraTargetsFromParams('unet', this.buildGraph('unet').params),
      ...loraTargetsFromParams('text_encoder', this.buildGraph('text_encoder').params),
    ];
    return this.#loraTargets;
  }

  /**
   * Read a LoRA file and match it against this model: normalised modules plus a coverage report.
   * Throws ModelError (UNKNOWN_LORA_FORMAT, LORA_BASE_MISMATCH, UNSUPPORTED_LORA, the safetensors codes, …).
   */
  loadLora(file: string): LoadedLora {
    const ldm: LdmModuleMap = new Map(moduleLayers(unetModuleMap(this.model.unet)).map((l) => [l.ldm, { component: 'unet' as const, module: l.diffusers }]));
    return loadLora(file, this.loraTargets(), { ldmModuleMap: ldm });
  }

  /** The binder's report for a graph that has been loaded (unexpected keys, dtype conversions). */
  bindReport(kind: GraphKind): BindReport | undefined {
    return this.#reports.get(kind);
  }

  buildGraph(kind: GraphKind, variant: GraphVariant = {}): Graph {
    const adapterBank = variant.adapterBank === true;
    switch (kind) {
      case 'text_encoder':
        return buildClipTextGraph(this.model.textEncoder, {
          adapterBank,
          ...(adapterBank && variant.bankFamilies !== undefined ? { bankFamilies: variant.bankFamilies } : {}),
          ...(variant.clipSkip !== undefined && variant.clipSkip >= 3 ? { extraClipSkips: [variant.clipSkip] } : {}),
        });
      case 'unet':
        if (variant.mapsOnly === true) {
          if (variant.attentionMaps === undefined) throw new ModelError('GRAPH_BUILD', 'the maps-only UNet needs attentionMaps (which level)', {});
          if (variant.sharedPrefix === true) throw new ModelError('GRAPH_BUILD', 'the maps-only UNet has no shared prefix', {});
          return buildUnetMapsGraph(this.model.unet, {
            level: variant.attentionMaps.level,
            adapterBank,
            ...(adapterBank && variant.bankFamilies !== undefined ? { bankFamilies: variant.bankFamilies } : {}),
            ...(variant.regions === true ? { regions: true } : {}),
            ...(variant.selfAttentionIsolation === true ? { selfAttentionIsolation: true } : {}),
            ...(variant.regionOutputAdapters === true ? { regionOutputAdapters: true } : {}),
          });
        }
        return buildUnetGraph(this.model.unet, { ...variant, adapterBank });
      case 'vae_decoder':
        return buildVaeDecoderGraph(this.model.vae);
      case 'vae_encoder':
        return buildVaeEncoderGraph(this.model.vae);
    }
  }

  /**
   * The session for a graph variant, building and caching it on first use. With `patch`, the
   * weights are patched before they are stored (merged LoRAs).
   */
  session(kind: GraphKind, variant: GraphVariant = {}, patch?: ParamPatch): Promise<OrtSession> {
    const base = `${kind}|${JSON.stringify(variant)}|`;
    const key = `${base}${patch?.key ?? ''}`;
    let s = this.#sessions.get(key);
    if (s === undefined) {
      if (patch !== undefined) this.#retireMerged(base);
      s = this.#createSession(kind, variant, patch);
      this.#sessions.set(key, s);
      s.catch(() => this.#sessions.delete(key));
    }
    return s;
  }

  /**
   * A merged-weights session is built per stack (its weights are the stack's); a new stack's session
   * supersedes the other merged sessions of the same graph variant, which are disposed once idle.
   * Without this, a queue of jobs with different merged stacks held one full copy of the weights per
   * stack (3.4 GB each for SD 1.5) until the process ran out of memory.
   */
  #retireMerged(prefix: string): void {
    for (const [key, pending] of [...this.#sessions]) {
      if (!key.startsWith(prefix) || key === prefix) continue;
      this.#sessions.delete(key);
      pending.then((s) => s.retire()).catch(() => undefined);
    }
  }

  /**
   * The provider the sessions will try first (probing WebGPU when `auto` or `webgpu`) and the weight
   * precision for it; decided once, before the first graph is built for a session.
   */
  plan(): Promise<DevicePlan> {
    this.#plan ??= (async () => {
      const { candidates, webgpu } = await resolveProviders(this.device);
      const device = candidates[0]!;
      const caps = webgpu?.available === true ? { features: webgpu.shaderF16 ? ['shader-f16'] : [] } : undefined;
      const precision: PrecisionChoice =
        this.#forcePrecision && this.#precision !== 'auto' ? { precision: this.#precision, reason: `${this.#precision}: forced` } : choosePrecision(device, caps, this.#precision);
      return { device, ...(webgpu === undefined ? {} : { webgpu }), precision };
    })();
    return this.#plan;
  }

  /** Which execution provider the sessions use and why (after the first session exists). */
  async providerChoice(): Promise<ProviderChoice | undefined> {
    const first = this.#sessions.values().next();
    return first.done === true ? undefined : (await first.value).choice;
  }

  async #createSession(kind: GraphKind, variant: GraphVariant, patchIn: ParamPatch | undefined): Promise<OrtSession> {
    const plan = await this.plan();
    const patch = plan.precision.precision === 'fp16' ? fp16WeightsPatch(patchIn) : patchIn;
    const built = forDevice(this.buildGraph(kind, variant), plan.device);
    const { graph, hoisted } = variant.adapterBank === true ? this.#hoisting(built, plan) : { graph: built, hoisted: [] };
    // Variants that use a subset of the weights (the shallow UNet, the maps-only UNet) share the full graph's weights file.
    const weightsGraph =
      kind === 'unet' && variant.shallow === true ? this.buildGraph(kind, { ...variant, shallow: false }) : kind === 'unet' && variant.mapsOnly === true ? this.buildGraph('unet') : built;
    const bound = bindWeights(weightsGraph.params, this.model.weights(COMPONENT_OF[kind]));
    this.#reports.set(kind, bound.report);
    const prepared = prepareModelFiles(graph, bound, { cacheDir: this.cacheDir, component: kind, ...(patch === undefined ? {} : { patch }) });
    const cached = kind === 'unet' ? this.#optimizedCacheFor(prepared.modelPath, plan.device) : {};
    const session = await OrtSession.create(prepared.modelPath, { device: this.device, ...(this.#threads === undefined ? {} : { threads: this.#threads }), ...cached });
    this.#pruneCopies(cached);
    if (hoisted.length > 0) this.#hoists.set(session, { weightsPath: prepared.weightsPath, params: prepared.params, hoisted });
    return session;
  }

  /**
   * The session and extra feeds that apply `adapters` to a graph (`kind` is the text encoder or the
   * UNet). Bank inputs are built once per stack and component and reused.
   */
  async #withAdapters(kind: 'text_encoder' | 'unet', variant: GraphVariant, adapters: AdapterUse | undefined, batch: number): Promise<{ session: OrtSession; feeds: Record<string, Tensor> }> {
    const component: LoraComponent = kind;
    // No LoRAs (K = 0, either mode): the plain graph, whose outputs the bank graph with K = 0 equals. ONNX
    // Runtime runs the bank graph's zero-sized adapter tensors slower than K = 1 (bench/lora.ts), so K = 0
    // never takes that path.
    if (adapters === undefined || adapters.stack.size === 0) {
      if (adapters?.mode === 'bank' && adapters.mix.length !== batch) {
        throw new ModelError('SHAPE_MISMATCH', `the LoRA mix must have one row per batch element (${batch}); got ${adapters.mix.length} rows.`, { input: LORA_MIX_INPUT });
      }
      return { session: await this.session(kind, variant), feeds: {} };
    }
    if (adapters.mode === 'merged') {
      const patch = mergePatch(
        component,
        adapters.stack.entries.map((e) => ({ identity: fileIdentity(e.path), name: e.name, modules: e.modules, strength: component === 'unet' ? e.unet : e.te })),
      );
      return { session: await this.session(kind, variant, patch), feeds: {} };
    }
    const K = adapters.stack.size;
    if (adapters.mix.length !== batch || adapters.mix.some((row) => row.length !== K)) {
      throw new ModelError('SHAPE_MISMATCH', `the LoRA mix must have one row of ${K} strengths per batch element (${batch}); got ${adapters.mix.length} rows.`, { input: LORA_MIX_INPUT });
    }
    const families = this.bankFamiliesOf(kind, adapters.stack);
    const bankVariant = { ...variant, adapterBank: true, ...(families === undefined ? {} : { bankFamilies: families }) };
    const session = await this.session(kind, bankVariant);
    const feeds: Record<string, Tensor> = { ...this.#bankFeedsOf(component, adapters.stack), [LORA_MIX_INPUT]: mixTensor(adapters.mix, K) };
    this.#widen(session, feeds);
    return { session, feeds };
  }

  readonly #bankModules = new Map<string, ReadonlySet<string>>();

  /**
   * The bank-layer families (`bankFamily`) a stack covers in a component, sorted; undefined when it
   * covers every family (the full bank graph). Bank sessions are built with these families only, so a
   * stack pays no zero-rank adapter path for the layers none of its LoRAs touches (a kohya LoRA on
   * the transformer blocks: no bank path on any resnet conv). Stacks that cover the same families
   * share a session; the outputs do not depend on the families (an uncovered layer's delta is 0).
   */
  bankFamiliesOf(kind: 'text_encoder' | 'unet', stack: AdapterStack): readonly string[] | undefined {
    let all = this.#bankModules.get(kind);
    if (all === undefined) {
      all = new Set(bankLayersOf(this.buildGraph(kind, { adapterBank: true })).map((l) => l.module));
      this.#bankModules.set(kind, all);
    }
    const covered = new Set<string>();
    for (const entry of stack.entries) for (const m of entry.modules) if (m.component === kind && all.has(m.module)) covered.add(bankFamily(m.module));
    const everyFamily = new Set([...all].map(bankFamily));
    return covered.size === everyFamily.size ? undefined : [...covered].sort();
  }

  /** CLIP text encoder on token ids (B, S), S ≤ max_position_embeddings. */
  async encodeText(inputIds: Tensor, adapters?: AdapterUse): Promise<TextEncoderOutput> {
    const ids = this.#checkIds(inputIds);
    const { session, feeds } = await this.#withAdapters('text_encoder', {}, adapters, ids.shape[0]!);
    const out = await session.run({ ...feeds, input_ids: ids }, ['last_hidden_state', 'penultimate_raw', 'penultimate_final_ln']);
    return {
      lastHiddenState: f32(out.last_hidden_state!),
      penultimateRaw: f32(out.penultimate_raw!),
      penultimateFinalLn: f32(out.penultimate_final_ln!),
    };
  }

  /**
   * The text conditioning at an A1111 clip skip: 1 = the last layer, N ≥ 2 = final_layer_norm of
   * hidden_states[−N]. Throws SHAPE_MISMATCH (input `clip_skip`) for N outside 1…layers.
   */
  async encodeTextAtClipSkip(inputIds: Tensor, clipSkip: number, adapters?: AdapterUse): Promise<Tensor<'float32'>> {
    const layers = this.model.textEncoder.numHiddenLayers;
    if (!Number.isInteger(clipSkip) || clipSkip < 1 || clipSkip > layers) {
      throw new ModelError('SHAPE_MISMATCH', `clip skip ${clipSkip} is outside 1…${layers} for this ${layers}-layer text encoder.`, { input: 'clip_skip', clipSkip });
    }
    const ids = this.#checkIds(inputIds);
    const output = clipSkip === 1 ? 'last_hidden_state' : clipSkip === 2 ? 'penultimate_final_ln' : `clip_skip_${clipSkip}`;
    const variant = clipSkip >= 3 ? { clipSkip } : {};
    const { session, feeds } = await this.#withAdapters('text_encoder', variant, adapters, ids.shape[0]!);
    const out = await session.run({ ...feeds, input_ids: ids }, [output]);
    return f32(out[output]!);
  }

  #checkIds(inputIds: Tensor): Tensor<'int64'> {
    const c = this.model.textEncoder;
    if (inputIds.shape.length !== 2 || inputIds.shape[1]! > c.maxPositionEmbeddings || inputIds.shape[1]! < 1) {
      throw new ModelError('SHAPE_MISMATCH', `input_ids must be (batch, ≤${c.maxPositionEmbeddings}) token ids, got [${inputIds.shape.join(', ')}].`, { input: 'input_ids', shape: inputIds.shape });
    }
    const ids: Tensor<'int64'> =
      inputIds.dtype === 'int64' ? (inputIds as Tensor<'int64'>) : { dtype: 'int64', shape: inputIds.shape, data: BigInt64Array.from(toFloat32(inputIds), (v) => BigInt(Math.round(v))) };
    for (const id of ids.data) {
      if (id < 0n || id >= BigInt(c.vocabSize)) throw new ModelError('SHAPE_MISMATCH', `input_ids holds token id ${id}, outside the vocabulary (0…${c.vocabSize - 1}).`, { input: 'input_ids' });
    }
    return ids;
  }

  /** One UNet evaluation. Returns `noise_pred` and any requested taps / debug outputs by name. */
  async runUnet(input: UnetInput, variant: UnetVariant = {}, adapters?: AdapterUse): Promise<Record<string, Tensor<'float32'>>> {
    const c = this.model.unet;
    const { sample, encoderHiddenStates: ctx } = input;
    if (sample.shape.length !== 4 || sample.shape[1] !== c.inChannels) {
      throw new ModelError('SHAPE_MISMATCH', `sample must be (batch, ${c.inChannels}, height/8, width/8), got [${sample.shape.join(', ')}].`, { input: 'sample', shape: sample.shape });
    }
    const batch = sample.shape[0]!;
    if (ctx.shape.length !== 3 || ctx.shape[0] !== batch || ctx.shape[2] !== c.crossAttentionDim[0]) {
      throw new ModelError('SHAPE_MISMATCH', `encoder_hidden_states must be (${batch}, tokens, ${c.crossAttentionDim[0]}), got [${ctx.shape.join(', ')}].`, {
        input: 'encoder_hidden_states',
        shape: ctx.shape,
      });
    }
    const t = f32(input.timestep);
    if (t.data.length !== 1 && t.data.length !== batch) {
      throw new ModelError('SHAPE_MISMATCH', `timestep must hold 1 or ${batch} values, got ${t.data.length}.`, { input: 'timestep', shape: t.shape });
    }
    const { session, feeds } = await this.#withAdapters('unet', variant, adapters, batch);
    const regionFeeds = this.#regionFeeds(input, variant.regions === true, adapters);
    if ((variant.shallow === true) !== (input.deepFeature !== undefined)) {
      throw new ModelError('SHAPE_MISMATCH', variant.shallow === true ? 'the shallow UNet needs the cached deep_feature input.' : 'deep_feature is only an input of the shallow UNet variant.', { input: 'deep_feature' });
    }
    let context = f32(ctx);
    const last = this.#lastContext;
    if (last !== undefined && last !== context && last.shape.join() === context.shape.join() && last.data.every((v, i) => v === context.data[i])) context = last;
    this.#lastContext = context;
    const all: Record<string, Tensor> = {
      ...feeds,
      sample: f32(sample),
      timestep: { dtype: 'float32', shape: [t.data.length], data: t.data },
      encoder_hidden_states: context,
      ...(input.deepFeature === undefined ? {} : { deep_feature: f32(input.deepFeature) }),
      ...regionFeeds,
    };
    if (variant.sharedPrefix === true) {
      // Elements share a prefix only under one timestep; otherwise each element is its own sample.
      const identity = { index: Array.from({ length: batch }, (_, b) => b), rows: Array.from({ length: batch }, (_, b) => b) };
      const oneTimestep = t.data.every((v) => Object.is(v, t.data[0]));
      const distinct = (oneTimestep ? distinctSamples(f32(sample), adapters?.mode === 'bank' ? adapters.mix : undefined) : undefined) ?? identity;
      Object.assign(all, sharedPrefixFeeds(f32(sample), t, distinct));
    }
    // Variants that drop layers (shallow, maps-only) read only their own layers' inputs.
    const wanted = new Set(session.inputNames);
    for (const name of Object.keys(all)) if (!wanted.has(name)) delete all[name];
    // On WebGPU the text conditioning and the bank's LoRA tensors stay on the device between steps.
    const resident = this.#resident ? ['encoder_hidden_states', ...Object.keys(feeds).filter((k) => k !== LORA_MIX_INPUT)] : [];
    const out = await session.run(all, undefined, { resident });
    const result: Record<string, Tensor<'float32'>> = {};
    for (const [k, v] of Object.entries(out)) result[k] = f32(v);
    return result;
  }

  /** The region-slot feeds of a call (the regions variant); throws SHAPE_MISMATCH when inputs and variant disagree. */
  #regionFeeds(input: UnetInput, regionsVariant: boolean, adapters: AdapterUse | undefined): Record<string, Tensor> {
    if (regionsVariant !== (input.regions !== undefined)) {
      throw new ModelError('SHAPE_MISMATCH', regionsVariant ? 'the regions UNet needs region inputs.' : 'region inputs need the regions UNet variant.', { input: 'region_context' });
    }
    const regionFeeds: Record<string, Tensor> = {};
    if (input.regions !== undefined) {
      const r = input.regions;
      const levels = this.model.unet.blockOutChannels.length;
      if (r.masks.length !== levels || (r.mixMaps !== undefined && r.mixMaps.length !== levels)) {
        throw new ModelError('SHAPE_MISMATCH', `region masks (and LoRA maps) are needed for each of the ${levels} UNet levels, got ${r.masks.length}.`, { input: 'region_mask' });
      }
      regionFeeds.region_context = r.context;
      r.masks.forEach((m, l) => (regionFeeds[`region_mask.${l}`] = m));
      if (adapters !== undefined && adapters.mode === 'bank') {
        if (r.mix === undefined || r.mixMaps === undefined) throw new ModelError('SHAPE_MISMATCH', 'regions with LoRAs need the slots\' mix and the per-pixel LoRA maps.', { input: 'region_lora_mix' });
        regionFeeds.region_lora_mix = r.mix;
        r.mixMaps.forEach((m, l) => (regionFeeds[`lora_mix_map.${l}`] = m));
      }
    }
    return regionFeeds;
  }

  /**
   * The gradient of an attention-map loss with respect to the UNet input: one run of the VJP graph
   * of the truncated UNet (`networks/unet-vjp.ts`), which also returns the maps. The caller computes
   * L from the maps and passes its cotangents. LoRAs apply as in `runUnet` (bank or merged) and are
   * active in the backward pass. With `variant.regions` the graph is the regions variant (region
   * inputs required, `cotangents.xattnRegion` too). Throws SHAPE_MISMATCH for inputs or cotangents of
   * the wrong shape, for region inputs without the regions variant, and for deep-feature inputs.
   */
  async runUnetVjp(input: UnetInput, cotangents: UnetCotangents, adapters?: AdapterUse, variant: UnetVjpVariant = {}): Promise<UnetVjpOutput> {
    const c = this.model.unet;
    const { sample, encoderHiddenStates: ctx } = input;
    if (input.deepFeature !== undefined) throw new ModelError('SHAPE_MISMATCH', 'the UNet VJP takes no deep_feature input.', { input: 'deep_feature' });
    const regionFeeds = this.#regionFeeds(input, variant.regions === true, adapters);
    if (sample.shape.length !== 4 || sample.shape[1] !== c.inChannels) {
      throw new ModelError('SHAPE_MISMATCH', `sample must be (batch, ${c.inChannels}, height/8, width/8), got [${sample.shape.join(', ')}].`, { input: 'sample', shape: sample.shape });
    }
    const [batch, , height, width] = sample.shape as [number, number, number, number];
    if (ctx.shape.length !== 3 || ctx.shape[0] !== batch || ctx.shape[2] !== c.crossAttentionDim[0]) {
      throw new ModelError('SHAPE_MISMATCH', `encoder_hidden_states must be (${batch}, tokens, ${c.crossAttentionDim[0]}), got [${ctx.shape.join(', ')}].`, { input: 'encoder_hidden_states', shape: ctx.shape });
    }
    const t = f32(input.timestep);
    if (t.data.length !== 1 && t.data.length !== batch) {
      throw new ModelError('SHAPE_MISMATCH', `timestep must hold 1 or ${batch} values, got ${t.data.length}.`, { input: 'timestep', shape: t.shape });
    }
    const level = variant.level ?? UNET_VJP_DEFAULT_LEVEL;
    if (!Number.isInteger(level) || level < 0 || level >= c.blockOutChannels.length) {
      throw new ModelError('SHAPE_MISMATCH', `the map level must be 0…${c.blockOutChannels.length - 1}, got ${level}.`, { input: 'level', level });
    }
    // The level's grid: each downsampler is a 3×3, stride-2 conv.
    const down = (n: number) => (c.downsamplePadding === 0 ? Math.floor((n - 2) / 2) + 1 : Math.floor((n + 2 * c.downsamplePadding - 3) / 2) + 1);
    let [h, w] = [height, width];
    for (let l = 0; l < level; l++) [h, w] = [down(h), down(w)];
    const queries = h * w;
    const expected: Record<string, number[]> = { xattn: [batch, queries, ctx.shape[1]!], selfattn: [batch, queries, queries] };
    const given: Record<string, Tensor | undefined> = { xattn: cotangents.xattn, selfattn: cotangents.selfattn };
    if (input.regions !== undefined) {
      const [, regions, regionSeq] = input.regions.context.shape as [number, number, number];
      expected.xattn_region = [batch, regions, queries, regionSeq];
      given.xattn_region = cotangents.xattnRegion;
    }
    if (variant.ntxent !== undefined && (variant.regions === true || variant.debugGradients === true)) {
      throw new ModelError('SHAPE_MISMATCH', 'the NT-Xent VJP variant has no regions or debug gradients.', { input: 'ntxent' });
    }
    for (const [map, shape] of variant.ntxent !== undefined ? [] : Object.entries(expected)) {
      const got = given[map]?.shape;
      if (got === undefined || got.join(',') !== shape.join(',')) {
        throw new ModelError('SHAPE_MISMATCH', `the cotangent of ${map} must be [${shape.join(', ')}] (batch, ${map === 'xattn_region' ? 'regions, ' : ''}queries of level ${level}, keys), got ${got === undefined ? 'none' : `[${got.join(', ')}]`}.`, {
          input: cotangentInput(map),
          shape: got,
        });
      }
    }

    const bank = adapters !== undefined && adapters.mode === 'bank';
    let patch: ParamPatch | undefined;
    if (adapters !== undefined && adapters.mode === 'merged' && adapters.stack.size > 0) {
      patch = mergePatch('unet', adapters.stack.entries.map((e) => ({ identity: fileIdentity(e.path), name: e.name, modules: e.modules, strength: e.unet })));
    }
    const families = bank ? this.bankFamiliesOf('unet', adapters.stack) : undefined;
    // Elements sharing a sample share the layers before the first cross-attention (one timestep only).
    const distinct =
      variant.mergeDuplicateSamples === true && variant.regions !== true && variant.debugGradients !== true && t.data.every((v) => Object.is(v, t.data[0]))
        ? distinctSamples(f32(sample), bank ? adapters.mix : undefined)
        : undefined;
    const options = {
      level,
      adapterBank: bank,
      ...(families === undefined ? {} : { bankFamilies: families }),
      debugGradients: variant.debugGradients === true,
      attentionBackward: resolveAttentionBackward(c, this.#attentionBackward, { height, width }),
      ...(variant.regions === true ? { regions: true, selfAttentionIsolation: variant.selfAttentionIsolation === true, regionOutputAdapters: variant.regionOutputAdapters === true } : {}),
      ...(distinct === undefined ? {} : { sharedPrefix: true }),
    };
    // On the CPU one graph serves every CLoRA round: the whole UNet with ε in an If branch, skipped
    // when not wanted, which runs the same nodes as the truncated graph (one session instead of two).
    const cpu = (await this.plan()).device === 'cpu';
    if (variant.ntxent?.skipGradient === true && (!cpu || variant.ntxent.skipNoisePred === true)) {
      throw new ModelError(
        'SHAPE_MISMATCH',
        !cpu ? `the one-pass gradient graph skips its backward on the CPU only (this engine runs on ${(await this.plan()).device}); run the forward UNet instead.` : 'skipGradient with skipNoisePred asks for neither ε nor the gradient.',
        { input: GRADIENT_WANTED_INPUT },
      );
    }
    const ntxent = variant.ntxent !== undefined && cpu && variant.ntxent.noisePred !== true ? { ...variant.ntxent, noisePred: true, skipNoisePred: true } : variant.ntxent;
    const key = `unet_vjp|${JSON.stringify(options)}|${patch?.key ?? ''}${ntxent === undefined ? '' : `|ntxent ${ntxent.temperature}${ntxent.noisePred === true ? ' noise_pred' : ''}`}`;
    let pending = this.#sessions.get(key);
    if (pending === undefined) {
      pending = (async () => {
        const built = ntxent === undefined ? buildUnetVjpGraph(c, options) : buildUnetNtXentVjpGraph(c, { ...options, temperature: ntxent.temperature, noisePred: ntxent.noisePred === true });
        const plan = await this.plan();
        const rewritten = bank ? this.#hoisting(forDevice(built, plan.device), plan) : { graph: forDevice(built, plan.device), hoisted: [] };
        const { hoisted } = rewritten;
        // On the CPU, ε is computed only when wanted (ONNX Runtime's WebGPU provider is not asked to run `If`).
        const graph =
          ntxent?.noisePred === true && cpu
            ? conditionalOutput(conditionalOutput(rewritten.graph, 'noise_pred', NOISE_PRED_WANTED_INPUT, 'sample'), gradientOutput('sample'), GRADIENT_WANTED_INPUT, 'sample')
            : rewritten.graph;
        // Bound against the plain UNet's parameters, so the VJP graph shares its weights file.
        const bound = bindWeights(this.buildGraph('unet').params, this.model.weights('unet'));
        const prepared = prepareModelFiles(graph, bound, { cacheDir: this.cacheDir, component: 'unet', ...(patch === undefined ? {} : { patch }) });
        const cached = this.#optimizedCacheFor(prepared.modelPath, plan.device, graph);
        const session = await OrtSession.create(prepared.modelPath, { device: this.device, ...(this.#threads === undefined ? {} : { threads: this.#threads }), ...cached });
        this.#pruneCopies(cached);
        if (hoisted.length > 0) this.#hoists.set(session, { weightsPath: prepared.weightsPath, params: prepared.params, hoisted });
        return session;
      })();
      this.#sessions.set(key, pending);
      pending.catch(() => this.#sessions.delete(key));
    }
    const session = await pending;

    const lossImages = ntxent === undefined ? 0 : (ntxent.feeds[NTXENT_INPUTS.pickUncond]?.shape[0] ?? 0);
    const feeds: Record<string, Tensor> =
      ntxent === undefined
        ? {
            sample: f32(sample),
            timestep: { dtype: 'float32', shape: [t.data.length], data: t.data },
            encoder_hidden_states: f32(ctx),
            [cotangentInput('xattn')]: f32(cotangents.xattn),
            [cotangentInput('selfattn')]: f32(cotangents.selfattn),
            ...(cotangents.xattnRegion === undefined || input.regions === undefined ? {} : { [cotangentInput('xattn_region')]: f32(cotangents.xattnRegion) }),
          }
        : {
            sample: f32(sample),
            timestep: { dtype: 'float32', shape: [t.data.length], data: t.data },
            encoder_hidden_states: f32(ctx),
            ...ntxent.feeds,
            [cotangentInput('xattn')]: { dtype: 'float32', shape: expected.xattn!, data: new Float32Array(expected.xattn!.reduce((a, d) => a * d, 1)) },
            [cotangentInput(NTXENT_LOSS_OUTPUT)]: { dtype: 'float32', shape: [lossImages], data: new Float32Array(lossImages).fill(1) },
            [NOISE_PRED_WANTED_INPUT]: { dtype: 'bool', shape: [], data: Uint8Array.of(ntxent.skipNoisePred === true ? 0 : 1) },
            [GRADIENT_WANTED_INPUT]: { dtype: 'bool', shape: [], data: Uint8Array.of(ntxent.skipGradient === true ? 0 : 1) },
          };
    if (adapters !== undefined && adapters.mode === 'bank') {
      const K = adapters.stack.size;
      if (adapters.mix.length !== batch || adapters.mix.some((row) => row.length !== K)) {
        throw new ModelError('SHAPE_MISMATCH', `the LoRA mix must have one row of ${K} strengths per batch element (${batch}); got ${adapters.mix.length} rows.`, { input: LORA_MIX_INPUT });
      }
      for (const [name, value] of Object.entries(this.#bankFeedsOf('unet', adapters.stack))) feeds[name] = value;
      feeds[LORA_MIX_INPUT] = mixTensor(adapters.mix, K);
      this.#widen(session, feeds);
    }
    Object.assign(feeds, regionFeeds);
    if (distinct !== undefined) Object.assign(feeds, sharedPrefixFeeds(f32(sample), t, distinct));
    // The VJP graph reads only the inputs of the layers before the cut.
    const wanted = new Set(session.inputNames);
    for (const name of Object.keys(feeds)) if (!wanted.has(name)) delete feeds[name];
    const out = await session.run(feeds);
    const debugGradients: Record<string, Tensor<'float32'>> = {};
    for (const [name, value] of Object.entries(out)) if (name.startsWith('debug.grad.')) debugGradients[name] = f32(value);
    return {
      xattn: f32(out.xattn!),
      selfattn: out.selfattn === undefined ? { dtype: 'float32', shape: [0], data: new Float32Array() } : f32(out.selfattn),
      ...(out.xattn_region === undefined ? {} : { xattnRegion: f32(out.xattn_region) }),
      gradSample: ntxent?.skipGradient === true ? { dtype: 'float32', shape: [0], data: new Float32Array() } : spreadRows(f32(out[gradientOutput('sample')]!), distinct, batch),
      debugGradients,
      ...(out[NTXENT_LOSS_OUTPUT] === undefined ? {} : { ntxentLoss: f32(out[NTXENT_LOSS_OUTPUT]) }),
      ...(out.noise_pred === undefined || ntxent?.skipNoisePred === true ? {} : { noisePred: f32(out.noise_pred) }),
    };
  }

  /** VAE decoder on UNet-space latents (B, 4, h, w) → `decoder_output` and `image01` (B, 3, 8h, 8w). */
  async decodeLatents(latents: Tensor): Promise<{ decoderOutput: Tensor<'float32'>; image01: Tensor<'float32'> }> {
    const c = this.model.vae;
    if (latents.shape.length !== 4 || latents.shape[1] !== c.latentChannels) {
      throw new ModelError('SHAPE_MISMATCH', `latents must be (batch, ${c.latentChannels}, h, w), got [${latents.shape.join(', ')}].`, { input: 'latents_scaled', shape: latents.shape });
    }
    const out = await (await this.session('vae_decoder')).run({ latents_scaled: f32(latents) });
    return { decoderOutput: f32(out.decoder_output!), image01: f32(out.image01!) };
  }

  /** VAE encoder on images (B, 3, H, W) in [-1, 1]. */
  async encodeImage(image: Tensor): Promise<{ mean: Tensor<'float32'>; logvar: Tensor<'float32'>; std: Tensor<'float32'>; moments: Tensor<'float32'> }> {
    const c = this.model.vae;
    if (image.shape.length !== 4 || image.shape[1] !== c.inChannels) {
      throw new ModelError('SHAPE_MISMATCH', `image must be (batch, ${c.inChannels}, H, W), got [${image.shape.join(', ')}].`, { input: 'image', shape: image.shape });
    }
    const out = await (await this.session('vae_encoder')).run({ image: f32(image) });
    return { mean: f32(out.mean!), logvar: f32(out.logvar!), std: f32(out.std!), moments: f32(out.moments!) };
  }

  /** Whether CLoRA's one-pass gradient graph can also serve forward passes (`ntxent.skipGradient`): on the CPU. */
  async gradientGraphSkipsBackward(): Promise<boolean> {
    return (await this.plan()).device === 'cpu';
  }

  /**
   * Dispose the gradient sessions (the UNet VJP variants), freeing their weights and arenas (≈ 14 GiB
   * for SD 1.5 at 512²); the next VJP call builds them again. Returns how many were released.
   */
  async releaseGradientSessions(): Promise<number> {
    const keys = [...this.#sessions.keys()].filter((k) => k.startsWith('unet_vjp|'));
    for (const key of keys) {
      const pending = this.#sessions.get(key)!;
      this.#sessions.delete(key);
      try {
        await (await pending).dispose();
      } catch {
        // A session that failed to build has nothing to release.
      }
    }
    return keys.length;
  }

  /**
   * Retire the UNet forward sessions (every `unet` graph variant: plain, adapter bank, merged,
   * maps-only), each disposed once no run is in flight; the next forward call builds its session
   * again. For a phase of gradient passes that needs no forward pass (CLoRA's one-pass updates) on a
   * machine without memory for both. Returns how many were retired.
   */
  releaseUnetSessions(): number {
    const keys = [...this.#sessions.keys()].filter((k) => k.startsWith('unet|'));
    for (const key of keys) {
      const pending = this.#sessions.get(key)!;
      this.#sessions.delete(key);
      pending.then((s) => s.retire()).catch(() => undefined);
    }
    return keys.length;
  }

  async dispose(): Promise<void> {
    const sessions = [...this.#sessions.values()];
    this.#sessions.clear();
    for (const s of sessions) {
      try {
        await (await s).dispose();
      } catch {
        // A session that failed to build has nothing to release.
      }
    }
    this.model.close();
  }
}

/** Provider-specific rewrites of a graph before its session: on WebGPU, two-pass norms and range-reduced sin/cos (see `preciseForWebGpu`). */
function forDevice(graph: Graph, device: string): Graph {
  return device === 'webgpu' ? preciseForWebGpu(graph) : graph;
}
