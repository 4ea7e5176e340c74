/**
 * The UNet graphs of the gradient-guided methods (CLoRA, LoRA-Composer; methods.md section 7):
 * the head- and layer-averaged attention maps of one UNet level and their vector-Jacobian product.
 *
 * Both losses read only `xattn` / `selfattn` of level 2 (the 1/32 grid), so the forward is truncated
 * after the last transformer block of that level (`up_blocks.1.attentions.2` in SD 1.5): noise_pred
 * and everything that only feeds it are pruned (`pruneGraph`). The VJP graph recomputes that
 * truncated forward and differentiates it with respect to `sample` (`buildVjpGraph`):
 *
 *   inputs   sample, timestep, encoder_hidden_states [, lora_mix, lora.<module>.* of the layers
 *            before the cut], cot.xattn (B, N, S), cot.selfattn (B, N, N)
 *   outputs  xattn, selfattn, grad_sample = ∂L/∂sample for L = Σ cot.xattn·xattn + Σ cot.selfattn·selfattn
 *
 * The loss and its cotangents are computed by the caller. timestep and encoder_hidden_states are
 * constants of the derivative; with an adapter bank the LoRAs are active in the forward and the
 * backward alike.
 */
import type { Graph } from '../onnx/builder.ts';
import { appendGraph } from '../onnx/compose.ts';
import { Ops } from '../onnx/ops.ts';
import { buildVjpGraph, pruneGraph } from '../onnx/vjp.ts';
import type { LeanAttention } from '../onnx/vjp-attention.ts';
import { ntXentLossGraph } from './ntxent-graph.ts';
import { buildUnetGraph } from './unet.ts';
import type { UnetConfig } from './config.ts';

/** The level of CLoRA's and LoRA-Composer's maps: the 1/32 grid (16×16 at 512²). */
export const UNET_VJP_DEFAULT_LEVEL = 2;

export type UnetMap = 'xattn' | 'selfattn' | 'xattn_region';

export interface UnetVjpOptions {
  /** The UNet level whose maps the loss reads (0 = the latent grid). */
  readonly level: number;
  /** Adapter-bank inputs (LoRAs active during the update). */
  readonly adapterBank?: boolean;
  /** With `adapterBank`: bank inputs only on the layers of these families (`bankFamily`; default all). */
  readonly bankFamilies?: readonly string[];
  /** The maps the loss depends on (default xattn and selfattn, plus xattn_region with regions). */
  readonly maps?: readonly UnetMap[];
  /**
   * The regions variant (region slots, see `networks/unet.ts`): the maps then include the slots'
   * full-image maps `xattn_region` (B, R, N, S), and the gradient flows through the region paths
   * (their queries depend on sample; their keys, values and the isolation bias do not).
   */
  readonly regions?: boolean;
  readonly selfAttentionIsolation?: boolean;
  readonly regionOutputAdapters?: boolean;
  /**
   * Also output `debug.grad.<stage>` = ∂L/∂(output of stage) for conv_in, every down block, the mid
   * block and the up blocks below `level` (after their upsampler), as the reference fixtures store them.
   */
  readonly debugGradients?: boolean;
  /**
   * The backward of the attention cores (`onnx/vjp-attention.ts`):
   * - `per-op`: the per-op rules (default);
   * - `keep`: every core gets the lean backward, reading the forward's probabilities;
   * - `recompute`: the same, except that the level-0 self-attention cores recompute their
   *   probabilities one head at a time: SD 1.5 at 512² keeps 8 × 4096² floats per layer and sample
   *   less from the forward, and the backward's transients are one head's;
   * - `auto`: `keep` when the level-0 self-attention probabilities of one sample (every head) take at
   *   most `KEEP_PROBS_BYTES`, else `recompute`. The graph's spatial size must be known for this;
   *   the engine resolves `auto` from the request's latent size.
   */
  readonly attentionBackward?: AttentionBackward;
  /**
   * The shared prefix of `UnetBuildOptions.sharedPrefix`: `sample` holds the distinct samples, and
   * the gradient is with respect to them (each the sum over the batch elements that read it).
   */
  readonly sharedPrefix?: boolean;
}

export type AttentionBackward = 'per-op' | 'recompute' | 'keep' | 'auto';

/**
 * `auto`: the largest probabilities (bytes per sample, every head) a level-0 self-attention core
 * keeps from the forward for its backward. 256² images (32 × 32 latents, 1024 tokens, 8 heads:
 * 32 MiB) keep them; SD 1.5 at 512² (512 MiB per layer and sample) recomputes.
 */
export const KEEP_PROBS_BYTES = 64 * 2 ** 20;

/** What `auto` means for a latent of `height` × `width` (the level-0 grid). */
export function resolveAttentionBackward(config: UnetConfig, mode: AttentionBackward, latent: { height: number; width: number }): AttentionBackward {
  if (mode !== 'auto') return mode;
  const tokens = latent.height * latent.width;
  return config.numAttentionHeads[0]! * tokens * tokens * 4 <= KEEP_PROBS_BYTES ? 'keep' : 'recompute';
}

/** The per-core choice of `UnetVjpOptions.attentionBackward`. */
function attentionPolicy(config: UnetConfig, mode: AttentionBackward | undefined): LeanAttention | undefined {
  if (mode === undefined || mode === 'per-op') return undefined;
  const levels = config.blockOutChannels.length;
  return (softmaxNode, probsShape) => {
    const m = /^(down|up)_blocks\.(\d+)\..*\.attn1\//.exec(softmaxNode);
    const level = m === null ? undefined : m[1] === 'down' ? Number(m[2]) : levels - 1 - Number(m[2]);
    // Level-0 self-attention runs one head at a time (clamped to the head count); its N×M passes
    // then stay in the processor's caches better (tiny fixture, 6 samples, one A/B run: every core
    // per head 386 ms per gradient call, every core with every head at once 419 ms). The other
    // cores run every head at once.
    const perHead = Number.MAX_SAFE_INTEGER;
    if (level !== 0) return { probs: 'keep', groups: 1 };
    if (mode === 'keep') return { probs: 'keep', groups: perHead };
    const perSample = probsShape?.slice(1).reduce<number | undefined>((a, d) => (a === undefined || typeof d !== 'number' ? undefined : a * d), 4);
    return { probs: mode === 'auto' && perSample !== undefined && perSample <= KEEP_PROBS_BYTES ? 'keep' : 'recompute', groups: perHead };
  };
}

function forwardGraph(config: UnetConfig, options: UnetVjpOptions): Graph {
  return buildUnetGraph(config, {
    attentionMaps: { level: options.level },
    ...(options.adapterBank === true ? { adapterBank: true, ...(options.bankFamilies === undefined ? {} : { bankFamilies: options.bankFamilies }) } : {}),
    ...(options.debugGradients === true ? { debugOutputs: true } : {}),
    ...(options.regions === true ? { regions: true } : {}),
    ...(options.selfAttentionIsolation === true ? { selfAttentionIsolation: true } : {}),
    ...(options.regionOutputAdapters === true ? { regionOutputAdapters: true } : {}),
    ...(options.sharedPrefix === true ? { sharedPrefix: true } : {}),
  });
}

/** Dims the time embedding may broadcast into (the engine feeds 1 or B timesteps; one with a shared prefix). */
const TIMESTEP_BROADCASTS: [string, string][] = [
  ['timestep_batch', 'batch'],
  ['timestep_batch', 'samples'],
];

/** The maps a VJP or truncated forward of these options differentiates / outputs. */
export function unetMapsOf(options: Pick<UnetVjpOptions, 'maps' | 'regions'>): readonly UnetMap[] {
  return options.maps ?? (options.regions === true ? ['xattn', 'selfattn', 'xattn_region'] : ['xattn', 'selfattn']);
}

/** The truncated forward: only what the maps of `level` need (for the loss evaluation before a VJP call). */
export function buildUnetMapsGraph(config: UnetConfig, options: UnetVjpOptions): Graph {
  return pruneGraph(forwardGraph(config, { ...options, debugGradients: false }), unetMapsOf(options));
}

/** The output of the NT-Xent variant: the per-image loss (see `buildUnetNtXentVjpGraph`). */
export const NTXENT_LOSS_OUTPUT = 'ntxent_loss';

/**
 * CLoRA's whole latent-update pass as one graph: the truncated forward to the `xattn` maps, the
 * NT-Xent loss on them (`ntxent-graph.ts`, its inputs `ntxent.*`), and ∂loss/∂sample. Inputs as the
 * VJP graph's plus `ntxent.*`, `cot.ntxent_loss` (ones: the images' losses add up) and `cot.xattn`
 * (zeros; xattn is output for the caller's masks and reports). Outputs `xattn`, `ntxent_loss`
 * [images], `grad_sample`. One pass replaces the maps-only pass, the loss in TypeScript and the VJP
 * pass of the two-pass update.
 *
 * With `noisePred`, the forward is the whole UNet and `noise_pred` is an output too (the last round
 * of a CLoRA step, whose ε are used): one pass instead of the full forward and a VJP pass that
 * recomputes the truncated forward (≈ 0.55 F less per element).
 */
export function buildUnetNtXentVjpGraph(config: UnetConfig, options: UnetVjpOptions & { readonly temperature: number; readonly noisePred?: boolean }): Graph {
  const full = options.noisePred === true;
  const forward = pruneGraph(forwardGraph(config, { ...options, debugGradients: false, maps: ['xattn'] }), full ? ['noise_pred', 'xattn'] : ['xattn']);
  const g = new Ops('ntxent');
  const xattn = g.input('xattn', 'float32', ['batch', 'queries', 'tokens']);
  g.output(ntXentLossGraph(g, xattn, { temperature: options.temperature }), NTXENT_LOSS_OUTPUT, 'float32', ['images']);
  return buildVjpGraph(appendGraph(forward, g.finish(), 'loss.'), {
    outputs: ['xattn', NTXENT_LOSS_OUTPUT],
    wrt: 'sample',
    broadcastsInto: TIMESTEP_BROADCASTS,
    ...(full ? { passThrough: ['noise_pred'] } : {}),
    ...leanOption(config, options),
  });
}

function leanOption(config: UnetConfig, options: UnetVjpOptions): { leanAttention?: LeanAttention } {
  const policy = attentionPolicy(config, options.attentionBackward);
  return policy === undefined ? {} : { leanAttention: policy };
}

/** The VJP graph of the maps with respect to `sample` (see the file header). */
export function buildUnetVjpGraph(config: UnetConfig, options: UnetVjpOptions): Graph {
  const forward = forwardGraph(config, options);
  const probes: [string, string][] = [];
  if (options.debugGradients === true) {
    const n = config.blockOutChannels.length;
    const stages = ['conv_in', ...config.blockOutChannels.map((_, i) => `down_blocks.${i}`), 'mid_block', ...Array.from({ length: n - 1 - options.level }, (_, i) => `up_blocks.${i}`)];
    for (const stage of stages) probes.push([`debug.grad.${stage}`, debugSource(forward, `debug.${stage}`)]);
  }
  return buildVjpGraph(forward, {
    outputs: unetMapsOf(options),
    wrt: 'sample',
    // The engine accepts 1 or B timesteps, so the time embedding never broadcasts the feature maps.
    broadcastsInto: TIMESTEP_BROADCASTS,
    probes,
    ...leanOption(config, options),
  });
}

/** The value a `debug.<stage>` output copies (through the Identity nodes the debug taps add). */
function debugSource(graph: Graph, output: string): string {
  let name = output;
  for (;;) {
    const node = graph.nodes.find((n) => n.outputs[0] === name);
    if (node === undefined || node.opType !== 'Identity') return name;
    name = node.inputs[0]!;
  }
}
