/**
 * The adapter bank: LoRAs as graph inputs (ARCHITECTURE.md section 2.1), so one session serves any
 * LoRA stack, any strengths, a different mix per batch element, and per-step switching.
 *
 * For every bank layer (a linear or conv whose module path starts with one of the bank prefixes)
 * the graph gets three inputs, holding all K resident adapters side by side with their ranks
 * zero-padded to the layer's own R = Σ_k r_k columns:
 *
 *   lora.<module>.down   linear: [in, R] (transposed for MatMul)   conv: [R, in, kh, kw]
 *   lora.<module>.up     linear: [R, out]                          conv: [out, R, 1, 1]
 *   lora.<module>.owner  [R] int64: which adapter each rank column belongs to
 *
 * plus one shared input `lora_mix` [batch, K]: adapter k's strength for batch element b.
 * alpha/rank is folded into `up` by the host. The layer computes
 *
 *   y = base(x) + up( mix[b, owner] ⊙ down(x) )
 *
 * i.e. Δy_b = Σ_k mix[b,k] · scale_k · up_k down_k x_b. K = 0 (R = 0) gives Δy = 0. A conv's
 * `down` uses the base conv's kernel, stride and padding; `up` is a 1×1 conv.
 */
import type { Value } from '../onnx/builder.ts';
import type { Ops, Padding2d } from '../onnx/ops.ts';

export const LORA_MIX_INPUT = 'lora_mix';

export type BankLayerKind = 'linear' | 'conv';

export interface BankLayer {
  /** Diffusers module path, e.g. `down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`. */
  readonly module: string;
  readonly kind: BankLayerKind;
  readonly inFeatures: number;
  readonly outFeatures: number;
  /** Conv kernel size (1 for linear). */
  readonly kernel: number;
}

/** Input names of one bank layer. */
export function bankInputNames(module: string): { down: string; up: string; owner: string } {
  return { down: `lora.${module}.down`, up: `lora.${module}.up`, owner: `lora.${module}.owner` };
}

/**
 * Per-pixel adapter strengths (region LoRAs): each UNet level l gets `lora_mix_map.<l>`
 * [batch, K, h_l, w_l]; layers that act on pixels or pixel tokens at level l use it instead of
 * the per-batch mix, so adapter k's delta at pixel q is scaled by map[b, k, q]. Layers that do not
 * act on pixels (cross-attention k/v on text tokens) keep `lora_mix`; the time-embedding projection,
 * whose output is broadcast over pixels, gets its delta spread over the map (see `timeEmbeddingDelta`).
 */
interface SpatialMix {
  /** The level a module's output lives on, or undefined for non-pixel layers. */
  readonly levelOf: (module: string) => number | undefined;
  readonly maps: Map<number, Value>;
}

interface BankState {
  readonly prefixes: readonly string[];
  /** Only modules of these families (see `bankFamily`) get bank inputs; undefined: all. */
  readonly families: ReadonlySet<string> | undefined;
  /** The per-batch mix the layers read (swapped by `withBankMix`). */
  mix: Value;
  readonly layers: BankLayer[];
  /** Inputs per module, so a layer applied twice (global and region paths) shares them. */
  readonly inputs: Map<string, { down: Value; up: Value; owner: Value }>;
  spatial?: SpatialMix;
}

export const LORA_MIX_MAP_INPUT = (level: number): string => `lora_mix_map.${level}`;

/** Switch the bank to per-pixel strengths (see `SpatialMix`). */
export function enableSpatialMix(g: Ops, levelOf: (module: string) => number | undefined): void {
  const bank = banks.get(g);
  if (bank === undefined) throw new Error('enableSpatialMix: attach the adapter bank first');
  bank.spatial = { levelOf, maps: new Map() };
}

function mixMap(g: Ops, spatial: SpatialMix, level: number): Value {
  let map = spatial.maps.get(level);
  if (map === undefined) {
    map = g.input(LORA_MIX_MAP_INPUT(level), 'float32', ['batch', 'adapters', `level${level}_height`, `level${level}_width`]);
    spatial.maps.set(level, map);
  }
  return map;
}

const banks = new WeakMap<Ops, BankState>();

/**
 * A bank layer's family: its module path without the block and layer indices, e.g.
 * `down_blocks.attentions.transformer_blocks.attn1.to_q` for every `down_blocks.<i>.attentions.<j>.
 * transformer_blocks.<k>.attn1.to_q`. A graph can carry bank inputs for some families only (the ones
 * a LoRA stack covers): the layers of the other families then run as in the plain graph instead of
 * paying for zero-rank adapter paths (a Concat of their weights, a zero-channel conv and its add).
 */
export function bankFamily(module: string): string {
  return module.replace(/\.\d+(?=\.|$)/g, '');
}

/**
 * Give the graph being built an adapter bank on the layers under `prefixes`; with `families`, only
 * on the layers of those families (see `bankFamily`).
 */
export function attachAdapterBank(g: Ops, prefixes: readonly string[], families?: readonly string[]): void {
  const mix = g.input(LORA_MIX_INPUT, 'float32', ['batch', 'adapters']);
  banks.set(g, { prefixes, families: families === undefined ? undefined : new Set(families), mix, layers: [], inputs: new Map() });
}

/**
 * Make the bank layers declared from now on read `mix` (rows, K) instead of the `lora_mix` input,
 * e.g. the rows of a shared prefix (see `UnetBuildOptions.sharedPrefix`). Returns the function that
 * switches back. A no-op without a bank.
 */
export function withBankMix(g: Ops, mix: (lora: Value) => Value): () => void {
  const bank = banks.get(g);
  if (bank === undefined) return () => undefined;
  const before = bank.mix;
  bank.mix = mix(before);
  return () => {
    bank.mix = before;
  };
}

/** The bank layers declared so far (all of them once the graph is built). */
export function adapterBankLayers(g: Ops): readonly BankLayer[] {
  return banks.get(g)?.layers ?? [];
}

function bankFor(g: Ops, module: string): BankState | undefined {
  const bank = banks.get(g);
  return bank !== undefined && bank.prefixes.some((p) => module.startsWith(p)) && (bank.families === undefined || bank.families.has(bankFamily(module))) ? bank : undefined;
}

function layerInputs(g: Ops, bank: BankState, layer: BankLayer): { down: Value; up: Value; owner: Value } {
  const hit = bank.inputs.get(layer.module);
  if (hit !== undefined) return hit;
  const names = bankInputNames(layer.module);
  const r = `${layer.module}.rank`;
  const made =
    layer.kind === 'linear'
      ? {
          down: g.input(names.down, 'float32', [layer.inFeatures, r]),
          up: g.input(names.up, 'float32', [r, layer.outFeatures]),
          owner: g.input(names.owner, 'int64', [r]),
        }
      : {
          down: g.input(names.down, 'float32', [r, layer.inFeatures, layer.kernel, layer.kernel]),
          up: g.input(names.up, 'float32', [layer.outFeatures, r, 1, 1]),
          owner: g.input(names.owner, 'int64', [r]),
        };
  bank.inputs.set(layer.module, made);
  bank.layers.push(layer);
  return made;
}

/** The rank-expanded mix (B, R): mix[b, owner[j]]. */
function expandedMix(g: Ops, bank: BankState, owner: Value): Value {
  return g.gather(bank.mix, owner, { dim: 1 });
}

/**
 * The low-rank half of a linear bank layer on x (B, …, in) of rank `inputRank`: the mixed
 * activation `hidden` = mix[b, owner] ⊙ (x · down), (B, …, R), and the `up` input [R, out], so that
 * Δy = hidden · up. Undefined when the module is not a bank layer. `mixOverride` replaces the
 * per-batch mix (the region path's per-slot mix).
 */
export function linearLowRank(g: Ops, module: string, x: Value, inFeatures: number, outFeatures: number, inputRank: number, mixOverride?: Value): { hidden: Value; up: Value } | undefined {
  const bank = bankFor(g, module);
  if (bank === undefined) return undefined;
  const { down, up, owner } = layerInputs(g, bank, { module, kind: 'linear', inFeatures, outFeatures, kernel: 1 });
  const h = g.matmul(x, down); // (B, …, in) → (B, …, R)
  const level = bank.spatial?.levelOf(module);
  let weighted: Value;
  if (mixOverride !== undefined) {
    const middle = Array.from({ length: inputRank - 2 }, (_, i) => i + 1);
    const mix = g.gather(mixOverride, owner, { dim: 1 });
    weighted = g.mul(h, middle.length === 0 ? mix : g.unsqueeze(mix, middle));
  } else if (bank.spatial !== undefined && level !== undefined && inputRank === 3) {
    // Pixel tokens (B, N, ·) with N = h·w of this level: per-token strengths.
    const perToken = g.gather(g.reshape(mixMap(g, bank.spatial, level), [0, 0, -1]), owner, { dim: 1 }); // (B, K, h·w) → (B, R, N)
    weighted = g.mul(h, g.transpose(perToken, [0, 2, 1])); // × (B, N, R)
  } else {
    const middle = Array.from({ length: inputRank - 2 }, (_, i) => i + 1);
    const mix = expandedMix(g, bank, owner); // (B, R)
    weighted = g.mul(h, middle.length === 0 ? mix : g.unsqueeze(mix, middle)); // × (B, 1…, R)
  }
  return { hidden: weighted, up };
}

/**
 * Δy for a linear bank layer on x (B, …, in) of rank `inputRank` → (B, …, out), or undefined when
 * not a bank layer. `mix` overrides the per-batch mix (the region path's per-slot mix).
 */
export function linearDelta(g: Ops, module: string, x: Value, inFeatures: number, outFeatures: number, inputRank: number, mixOverride?: Value): Value | undefined {
  const low = linearLowRank(g, module, x, inFeatures, outFeatures, inputRank, mixOverride);
  return low === undefined ? undefined : g.matmul(low.hidden, low.up); // (B, …, R) → (B, …, out)
}

/**
 * The bank delta of a time-embedding projection (x: (B, T) → (B, out)), as a value to add to the
 * resnet's feature map: (B, out, 1, 1) with the per-batch mix, or (B, out, h, w) spread over the
 * level's per-pixel map. Undefined when the module is not a bank layer.
 */
export function timeEmbeddingDelta(g: Ops, module: string, x: Value, inFeatures: number, outFeatures: number): Value | undefined {
  const bank = bankFor(g, module);
  if (bank === undefined) return undefined;
  const level = bank.spatial?.levelOf(module);
  if (bank.spatial === undefined || level === undefined) {
    const flat = linearDelta(g, module, x, inFeatures, outFeatures, 2);
    return flat === undefined ? undefined : g.unsqueeze(flat, [2, 3]);
  }
  const { down, up, owner } = layerInputs(g, bank, { module, kind: 'linear', inFeatures, outFeatures, kernel: 1 });
  const map = mixMap(g, bank.spatial, level); // (B, K, h, w)
  const h = g.unsqueeze(g.matmul(x, down), [1]); // (B, T)·(T, R) → (B, 1, R)
  const perToken = g.transpose(g.gather(g.reshape(map, [0, 0, -1]), owner, { dim: 1 }), [0, 2, 1]); // (B, N, R)
  const delta = g.matmul(g.mul(perToken, h), up); // (B, N, out)
  // (B, N, out) → (B, out, N) → (B, out, h, w)
  const spatialShape = g.concat([g.shape(delta, { end: 1 }), g.int64s([outFeatures]), g.shape(map, { start: 2 })], { dim: 0 });
  return g.reshape(g.transpose(delta, [0, 2, 1]), spatialShape);
}

/**
 * The low-rank half of a conv bank layer on x (B, in, H, W): the mixed activation `hidden`
 * (B, R, H', W') (the base conv's kernel, stride and padding) and the 1×1 `up` [out, R, 1, 1], so
 * that Δy = conv1×1(hidden, up). Undefined when the module is not a bank layer.
 */
export function convLowRank(g: Ops, module: string, x: Value, inChannels: number, outChannels: number, kernel: number, stride: number, padding: Padding2d): { hidden: Value; up: Value } | undefined {
  const bank = bankFor(g, module);
  if (bank === undefined) return undefined;
  const { down, up, owner } = layerInputs(g, bank, { module, kind: 'conv', inFeatures: inChannels, outFeatures: outChannels, kernel });
  const h = g.conv2d(x, down, undefined, { stride, padding }); // (B, R, H', W')
  const level = bank.spatial?.levelOf(module);
  const scale =
    bank.spatial !== undefined && level !== undefined
      ? g.gather(mixMap(g, bank.spatial, level), owner, { dim: 1 }) // (B, K, H', W') → (B, R, H', W')
      : g.unsqueeze(expandedMix(g, bank, owner), [2, 3]); // (B, R, 1, 1)
  return { hidden: g.mul(h, scale), up };
}

/** The bank layers of a built graph, read back from its `lora.<module>.down/up` inputs. */
export function bankLayersOf(graph: { readonly inputs: ReadonlyArray<{ readonly name: string; readonly shape: ReadonlyArray<number | string> | undefined }> }): BankLayer[] {
  const ups = new Map(graph.inputs.filter((i) => i.name.startsWith('lora.') && i.name.endsWith('.up')).map((i) => [i.name.slice(5, -3), i.shape ?? []]));
  const layers: BankLayer[] = [];
  for (const input of graph.inputs) {
    if (!input.name.startsWith('lora.') || !input.name.endsWith('.down')) continue;
    const module = input.name.slice(5, -5);
    const down = input.shape ?? [];
    const up = ups.get(module) ?? [];
    if (down.length === 2) layers.push({ module, kind: 'linear', inFeatures: down[0] as number, outFeatures: up[1] as number, kernel: 1 });
    else layers.push({ module, kind: 'conv', inFeatures: down[1] as number, outFeatures: up[0] as number, kernel: down[2] as number });
  }
  return layers;
}
