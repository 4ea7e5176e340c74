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

interface BankState {
  readonly prefixes: readonly string[];
  readonly mix: Value;
  readonly layers: BankLayer[];
}

const banks = new WeakMap<Ops, BankState>();

/** Give the graph being built an adapter bank on the layers under `prefixes`. */
export function attachAdapterBank(g: Ops, prefixes: readonly string[]): void {
  const mix = g.input(LORA_MIX_INPUT, 'float32', ['batch', 'adapters']);
  banks.set(g, { prefixes, mix, layers: [] });
}

/** The bank layers declared so far (all of them once the graph is built). */
export function adapterBankLayers(g: Ops): readonly BankLayer[] {
  return banks.get(g)?.layers ?? [];
}

function bankFor(g: Ops, module: string): BankState | undefined {
  const bank = banks.get(g);
  return bank !== undefined && bank.prefixes.some((p) => module.startsWith(p)) ? bank : undefined;
}

/** The rank-expanded mix (B, R): mix[b, owner[j]]. */
function expandedMix(g: Ops, bank: BankState, owner: Value): Value {
  return g.gather(bank.mix, owner, { dim: 1 });
}

/** Δy for a linear bank layer on x (B, …, in) of rank `inputRank` → (B, …, out), or undefined when not a bank layer. */
export function linearDelta(g: Ops, module: string, x: Value, inFeatures: number, outFeatures: number, inputRank: number): Value | undefined {
  const bank = bankFor(g, module);
  if (bank === undefined) return undefined;
  const names = bankInputNames(module);
  const r = `${module}.rank`;
  const down = g.input(names.down, 'float32', [inFeatures, r]);
  const up = g.input(names.up, 'float32', [r, outFeatures]);
  const owner = g.input(names.owner, 'int64', [r]);
  bank.layers.push({ module, kind: 'linear', inFeatures, outFeatures, kernel: 1 });
  const h = g.matmul(x, down); // (B, …, in) → (B, …, R)
  const middle = Array.from({ length: inputRank - 2 }, (_, i) => i + 1);
  const mix = expandedMix(g, bank, owner); // (B, R)
  const weighted = g.mul(h, middle.length === 0 ? mix : g.unsqueeze(mix, middle)); // × (B, 1…, R)
  return g.matmul(weighted, up); // (B, …, R) → (B, …, out)
}

/** Δy for a conv bank layer on x (B, in, H, W) → (B, out, H', W'), or undefined when not a bank layer. */
export function convDelta(g: Ops, module: string, x: Value, inChannels: number, outChannels: number, kernel: number, stride: number, padding: Padding2d): Value | undefined {
  const bank = bankFor(g, module);
  if (bank === undefined) return undefined;
  const names = bankInputNames(module);
  const r = `${module}.rank`;
  const down = g.input(names.down, 'float32', [r, inChannels, kernel, kernel]);
  const up = g.input(names.up, 'float32', [outChannels, r, 1, 1]);
  const owner = g.input(names.owner, 'int64', [r]);
  bank.layers.push({ module, kind: 'conv', inFeatures: inChannels, outFeatures: outChannels, kernel });
  const h = g.conv2d(x, down, undefined, { stride, padding }); // (B, R, H', W')
  const weighted = g.mul(h, g.unsqueeze(expandedMix(g, bank, owner), [2, 3])); // × (B, R, 1, 1)
  return g.conv2d(weighted, up, undefined, {}); // (B, out, H', W')
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
