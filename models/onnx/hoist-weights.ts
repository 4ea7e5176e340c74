/**
 * Hoisting the adapter bank's widened weights out of the graph (CPU sessions).
 *
 * A bank layer computes `[x | hidden]·[Wᵀ ; up]` (`networks/layers.ts`): a Concat of the constant
 * weight and the runtime `up` input feeds the product. ONNX Runtime cannot fold that Concat (one
 * input is a graph input), so every call copies every covered layer's weight: ≈ 250 ms of a 6.5 s
 * SD 1.5 step at 512², batch 2 (its profile), the largest single part of the bank's overhead. The
 * widened weight only changes when the resident adapters change, so the host can build it once per
 * stack and feed it instead: this rewrite replaces each such Concat by a graph input
 * `<up input>.widened`, drops the weights only the Concat read and the `up` inputs nothing else
 * reads, and lists what it did so the feeder can build the inputs (`widenedWeight`).
 *
 * The host then holds those weights instead of the session (same memory), rebuilt from the session's
 * weights file when the stack changes. Outputs are bit-identical: the product reads the same values.
 */
import type { Graph, IoDecl, ParamDecl } from './builder.ts';

export interface HoistedWeight {
  /** The new graph input, `<up>.widened`. */
  readonly input: string;
  /** The base weight (graph layout: linear [in, out], conv [out, in, kh, kw]). */
  readonly param: ParamDecl;
  /** The bank's `up` input it is widened with (linear [R, out], 1×1 conv [out, R, 1, 1]). */
  readonly up: string;
  /** The Concat axis: 0 (linear: rows appended) or 1 (1×1 conv: input channels appended). */
  readonly axis: 0 | 1;
}

export const WIDENED_SUFFIX = '.widened';

/** Rewrite `graph` (see the file header). Concats that do not match the pattern are left alone. */
export function hoistBankWeights(graph: Graph, isUpInput: (name: string) => boolean): { graph: Graph; hoisted: HoistedWeight[] } {
  const params = new Map(graph.params.map((p) => [p.name, p]));
  const inputs = new Map(graph.inputs.map((i) => [i.name, i]));
  const rename = new Map<string, string>();
  const hoisted: HoistedWeight[] = [];
  const newInputs: IoDecl[] = [];
  const nodes = graph.nodes.filter((n) => {
    if (n.opType !== 'Concat' || n.domain !== '' || n.inputs.length !== 2) return true;
    const [w, up] = n.inputs as [string, string];
    const param = params.get(w);
    const upDecl = inputs.get(up);
    if (param === undefined || upDecl === undefined || !isUpInput(up) || param.dtype !== 'float32') return true;
    const axisAttr = n.attributes.find(([k]) => k === 'axis')?.[1];
    const rank = param.shape.length;
    let axis = axisAttr?.kind === 'int' ? axisAttr.value : NaN;
    if (axis < 0) axis += rank;
    if (!((rank === 2 && axis === 0) || (rank === 4 && axis === 1 && param.shape[2] === 1 && param.shape[3] === 1))) return true;
    const input = `${up}${WIDENED_SUFFIX}`;
    rename.set(n.outputs[0]!, input);
    if (hoisted.some((h) => h.input === input)) return false; // the same layer applied twice (global and region paths)
    const shape = param.shape.map((d, i) => (i === axis ? `${up}.widened_rows` : d));
    newInputs.push({ name: input, dtype: 'float32', shape });
    hoisted.push({ input, param, up, axis: axis as 0 | 1 });
    return false;
  });
  if (hoisted.length === 0) return { graph, hoisted };
  const renamed = nodes.map((n) => (n.inputs.some((i) => rename.has(i)) ? { ...n, inputs: n.inputs.map((i) => rename.get(i) ?? i) } : n));
  const used = new Set(renamed.flatMap((n) => n.inputs));
  const outputs = graph.outputs.map((o) => (rename.has(o.name) ? { ...o, name: rename.get(o.name)! } : o));
  for (const o of outputs) used.add(o.name);
  return {
    graph: {
      ...graph,
      inputs: [...graph.inputs.filter((i) => used.has(i.name) || !isUpInput(i.name)), ...newInputs],
      outputs,
      nodes: renamed,
      params: graph.params.filter((p) => used.has(p.name)),
    },
    hoisted,
  };
}

/** The widened weight `concat([base, up], axis)` for one hoisted layer; `base` in the graph layout. */
export function widenedWeight(h: HoistedWeight, base: Float32Array, up: Float32Array, upShape: readonly number[]): { shape: number[]; data: Float32Array } {
  if (h.axis === 0) {
    const [inF, out] = h.param.shape as [number, number];
    const rows = upShape[0]!;
    if (upShape[1] !== out || base.length !== inF * out) throw new Error(`widenedWeight: ${h.up} is [${upShape.join(', ')}], the weight [${h.param.shape.join(', ')}]`);
    const data = new Float32Array((inF + rows) * out);
    data.set(base, 0);
    data.set(up, inF * out);
    return { shape: [inF + rows, out], data };
  }
  const [out, inC] = h.param.shape as [number, number];
  const rows = upShape[1]!;
  if (upShape[0] !== out || base.length !== out * inC) throw new Error(`widenedWeight: ${h.up} is [${upShape.join(', ')}], the weight [${h.param.shape.join(', ')}]`);
  const width = inC + rows;
  const data = new Float32Array(out * width);
  for (let o = 0; o < out; o++) {
    data.set(base.subarray(o * inC, (o + 1) * inC), o * width);
    data.set(up.subarray(o * rows, (o + 1) * rows), o * width + inC);
  }
  return { shape: [out, width, 1, 1], data };
}
