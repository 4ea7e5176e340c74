/**
 * Host side of the adapter bank (see `networks/adapter-bank.ts`): K resident LoRAs laid out as the
 * bank inputs of one graph, and the per-call mix.
 *
 * Layout per bank layer, adapters in stack order, each contributing its own rank r_k columns
 * (a layer an adapter does not touch gets no columns from it):
 *   linear: down [in, R] (column j = row j of that adapter's down), up [R, out] (row j = scale · column j of up)
 *   conv:   down [R, in, kh, kw], up [out, R, 1, 1] (× scale)
 *   owner:  [R] adapter index of each column
 * Strength is not folded in: it is the mix, `lora_mix[b, k]`, so changing weights or switching
 * adapters per step or per batch element never rebuilds these tensors.
 */
import { ModelError } from '../errors.ts';
import { bankInputNames, LORA_MIX_INPUT, type BankLayer } from '../networks/adapter-bank.ts';
import type { Tensor } from '../tensor.ts';
import type { LoraComponent, LoraModule } from './types.ts';

/** What the bank needs from a loaded LoRA. */
export interface BankAdapter {
  readonly name: string;
  readonly modules: readonly LoraModule[];
}

/** Build the bank inputs of one graph for `adapters` (K = adapters.length; K = 0 gives empty tensors). */
export function bankFeeds(layers: readonly BankLayer[], component: LoraComponent, adapters: readonly BankAdapter[]): Record<string, Tensor> {
  const feeds: Record<string, Tensor> = {};
  const byModule = adapters.map((a) => new Map(a.modules.filter((m) => m.component === component).map((m) => [m.module, m])));
  for (const layer of layers) {
    const parts: { k: number; m: LoraModule }[] = [];
    byModule.forEach((map, k) => {
      const m = map.get(layer.module);
      if (m !== undefined) parts.push({ k, m });
    });
    const names = bankInputNames(layer.module);
    let R = 0;
    for (const { m } of parts) {
      if (m.delta.kind !== 'lowrank') {
        throw new ModelError('UNSUPPORTED_LORA', `${adapters[parts[0]!.k]!.name}: ${layer.module} is not low-rank (LoKr or a full diff); it needs the merged-weights path.`, { module: layer.module });
      }
      R += m.delta.upShape[1];
    }
    const kk = layer.kernel * layer.kernel;
    const owner = new BigInt64Array(R);
    if (layer.kind === 'linear') {
      const down = new Float32Array(layer.inFeatures * R);
      const up = new Float32Array(R * layer.outFeatures);
      let col = 0;
      for (const { k, m } of parts) {
        if (m.delta.kind !== 'lowrank') continue;
        const { down: d, up: u, scale } = m.delta;
        const r = m.delta.upShape[1];
        checkShape(m, layer, r);
        for (let j = 0; j < r; j++, col++) {
          owner[col] = BigInt(k);
          for (let i = 0; i < layer.inFeatures; i++) down[i * R + col] = d[j * layer.inFeatures + i]!;
          for (let o = 0; o < layer.outFeatures; o++) up[col * layer.outFeatures + o] = Math.fround(u[o * r + j]! * scale);
        }
      }
      feeds[names.down] = { dtype: 'float32', shape: [layer.inFeatures, R], data: down };
      feeds[names.up] = { dtype: 'float32', shape: [R, layer.outFeatures], data: up };
    } else {
      const per = layer.inFeatures * kk;
      const down = new Float32Array(R * per);
      const up = new Float32Array(layer.outFeatures * R);
      let col = 0;
      for (const { k, m } of parts) {
        if (m.delta.kind !== 'lowrank') continue;
        const { down: d, up: u, scale } = m.delta;
        const r = m.delta.upShape[1];
        checkShape(m, layer, r);
        for (let j = 0; j < r; j++, col++) {
          owner[col] = BigInt(k);
          down.set(d.subarray(j * per, (j + 1) * per), col * per);
          for (let o = 0; o < layer.outFeatures; o++) up[o * R + col] = Math.fround(u[o * r + j]! * scale);
        }
      }
      feeds[names.down] = { dtype: 'float32', shape: [R, layer.inFeatures, layer.kernel, layer.kernel], data: down };
      feeds[names.up] = { dtype: 'float32', shape: [layer.outFeatures, R, 1, 1], data: up };
    }
    feeds[names.owner] = { dtype: 'int64', shape: [R], data: owner };
  }
  return feeds;
}

function checkShape(m: LoraModule, layer: BankLayer, r: number): void {
  if (m.delta.kind !== 'lowrank') return;
  const expectedDown = layer.inFeatures * layer.kernel * layer.kernel * r;
  if (m.delta.down.length !== expectedDown || m.delta.up.length !== layer.outFeatures * r) {
    throw new ModelError('SHAPE_MISMATCH', `LoRA module ${m.module}: down [${m.delta.downShape.join(', ')}] / up [${m.delta.upShape.join(', ')}] do not fit the layer (${layer.kind} ${layer.inFeatures}→${layer.outFeatures}, kernel ${layer.kernel}).`, {
      module: m.module,
    });
  }
}

/** `lora_mix` [batch, K] from per-batch-element strengths. */
export function mixTensor(rows: readonly (readonly number[])[], k: number): Tensor<'float32'> {
  const data = new Float32Array(rows.length * k);
  rows.forEach((row, b) => {
    if (row.length !== k) throw new Error(`mix row ${b} has ${row.length} strengths for ${k} adapters`);
    data.set(row, b * k);
  });
  return { dtype: 'float32', shape: [rows.length, k], data };
}

export { LORA_MIX_INPUT };
