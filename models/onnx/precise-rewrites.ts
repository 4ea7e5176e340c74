/**
 * Graph rewrites for execution providers whose kernels lose float32 precision where the CPU kernels
 * do not (ONNX Runtime's WebGPU provider; found on SwiftShader, where the fixture UNet's up_blocks.1
 * attention probabilities were off by 2.9e-4 against the fixture's 2e-4). `preciseForWebGpu` applies
 * both rewrites below; the CPU sessions keep the plain graphs (exact and faster there).
 *
 * 1. Two-pass normalisation (`twoPassNorms`).
 * ONNX Runtime's WebGPU kernels for InstanceNormalization and LayerNormalization compute the
 * variance in one pass, E[x²] − E[x]², which cancels catastrophically when the mean is large against
 * the spread: on SwiftShader, LayerNormalization over values with mean 50 and std 1 is off by 9e-4
 * (CPU kernel: exact to 1e-6), against 1e-5 at mean 5. The UNet's group norms see such inputs, and
 * the error reached the up_blocks.1 attention probabilities (2.9e-4 against the fixture's 2e-4).
 *
 * `twoPassNorms` rewrites both ops into explicit reductions, mean first and then the mean of the
 * centred squares:
 *
 *   μ = mean(x), d = x − μ, σ² = mean(d²), y = d / √(σ² + ε) · scale + bias
 *
 * over the last axis (LayerNormalization with axis −1, as the builder emits it) or over the axes
 * after the channel axis of a rank-3 input (InstanceNormalization on (B, G, L), as `Ops.groupNorm`
 * emits it). Output names are kept, so everything downstream (taps, VJP nodes) is untouched.
 *
 * 2. Sine and cosine from multiplications and additions (`rangeReducedTrig`). Vulkan only promises
 * sin/cos to an absolute 2^-11 on [−π, π] (SPIR-V GLSL.std.450 precision), and SwiftShader is off by
 * 1.9e-4 on the UNet's timestep embedding sin(t·f_i) (t up to 999) whatever the argument range. Each
 * Sin/Cos becomes: reduce the argument to r ∈ [−π, π] by a three-part Cody–Waite subtraction of k·2π,
 * k = round(x / 2π) (2π = C1 + C2 + C3 with C1 = 201/32 exact in 8 bits, so k·C1 is exact for
 * |k| < 2^16 and x − k·C1 loses nothing), then the Taylor polynomial in r² by Horner's rule (terms to
 * r^23 / r^22; truncation < 1e-12 at |r| = π, float32 rounding ~1e-7).
 */
import { ModelError } from '../errors.ts';
import type { AttrValue, ConstantDecl, Graph, NodeDecl } from './builder.ts';

/** Both rewrites, for WebGPU sessions. */
export function preciseForWebGpu(graph: Graph): Graph {
  return rangeReducedTrig(twoPassNorms(graph));
}

/** Unique constant names for a rewrite, appended to the graph's constants. */
function constantPool(graph: Graph): { constants: ConstantDecl[]; add: (base: string, dtype: 'float32' | 'int64', shape: number[], data: Float32Array | BigInt64Array) => string } {
  const constants: ConstantDecl[] = [...graph.constants];
  const taken = new Set<string>([...graph.constants.map((c) => c.name), ...graph.inputs.map((i) => i.name), ...graph.nodes.flatMap((n) => n.outputs)]);
  const add = (base: string, dtype: 'float32' | 'int64', shape: number[], data: Float32Array | BigInt64Array): string => {
    let name = base;
    for (let i = 1; taken.has(name); i++) name = `${base}_${i}`;
    taken.add(name);
    constants.push({ name, dtype, shape, bytes: new Uint8Array(data.buffer.slice(data.byteOffset, data.byteOffset + data.byteLength)) });
    return name;
  };
  return { constants, add };
}

/** 2π = C1 + C2 + C3 (float32 parts; C1 has 8 significant bits). */
const TWO_PI_C1 = 201 / 32;
const TWO_PI_C2 = Math.fround(2 * Math.PI - TWO_PI_C1);
const TWO_PI_C3 = Math.fround(2 * Math.PI - TWO_PI_C1 - TWO_PI_C2);

/** The graph with every Sin / Cos node computed by range reduction and a polynomial (see the file header). */
export function rangeReducedTrig(graph: Graph): Graph {
  if (!graph.nodes.some((n) => n.domain === '' && (n.opType === 'Sin' || n.opType === 'Cos'))) return graph;
  const { constants, add: constant } = constantPool(graph);
  const nodes: NodeDecl[] = [];
  for (const node of graph.nodes) {
    if (node.domain !== '' || (node.opType !== 'Sin' && node.opType !== 'Cos')) {
      nodes.push(node);
      continue;
    }
    const n = (suffix: string) => `${node.name}/reduced/${suffix}`;
    const emit = (opType: string, inputs: string[], suffix: string): string => {
      nodes.push({ name: n(suffix), opType, domain: '', inputs, outputs: [n(suffix)], attributes: [] });
      return n(suffix);
    };
    const c = (suffix: string, v: number) => constant(n(suffix), 'float32', [], new Float32Array([v]));
    const x = node.inputs[0]!;
    const k = emit('Round', [emit('Mul', [x, c('inv_two_pi', 1 / (2 * Math.PI))], 'turns')], 'k');
    const r1 = emit('Sub', [x, emit('Mul', [k, c('c1', TWO_PI_C1)], 'k_c1')], 'r1');
    const r2 = emit('Sub', [r1, emit('Mul', [k, c('c2', TWO_PI_C2)], 'k_c2')], 'r2');
    const r = emit('Sub', [r2, emit('Mul', [k, c('c3', TWO_PI_C3)], 'k_c3')], 'r');
    const r2sq = emit('Mul', [r, r], 'r_sq');
    // sin r = r · Σ_j (−1)^j r^{2j} / (2j+1)!,  cos r = Σ_j (−1)^j r^{2j} / (2j)!, j = 0 … 11, by Horner in r².
    const sine = node.opType === 'Sin';
    const coeff = (j: number) => {
      let f = 1;
      for (let i = 2; i <= 2 * j + (sine ? 1 : 0); i++) f *= i;
      return (j % 2 === 0 ? 1 : -1) / f;
    };
    let acc = c('p11', coeff(11));
    for (let j = 10; j >= 0; j--) acc = emit('Add', [emit('Mul', [acc, r2sq], `h${j}_mul`), c(`p${j}`, coeff(j))], `h${j}`);
    nodes.push({ name: n('out'), opType: sine ? 'Mul' : 'Identity', domain: '', inputs: sine ? [acc, r] : [acc], outputs: node.outputs, attributes: [] });
  }
  return { ...graph, nodes, constants };
}

const floatAttr = (node: NodeDecl, name: string, fallback: number): number => {
  const a = node.attributes.find(([n]) => n === name)?.[1];
  return a !== undefined && a.kind === 'float' ? a.value : fallback;
};
const intAttr = (node: NodeDecl, name: string, fallback: number): number => {
  const a = node.attributes.find(([n]) => n === name)?.[1];
  return a !== undefined && a.kind === 'int' ? a.value : fallback;
};

/** The graph with every InstanceNormalization / LayerNormalization node replaced by its two-pass form. */
export function twoPassNorms(graph: Graph): Graph {
  const { constants, add: constant } = constantPool(graph);
  const nodes: NodeDecl[] = [];
  let rewritten = 0;
  for (const node of graph.nodes) {
    if (node.domain !== '' || (node.opType !== 'InstanceNormalization' && node.opType !== 'LayerNormalization')) {
      nodes.push(node);
      continue;
    }
    const layer = node.opType === 'LayerNormalization';
    if (layer && intAttr(node, 'axis', -1) !== -1) throw new ModelError('GRAPH_BUILD', `${node.name}: two-pass LayerNormalization supports axis −1 only`, { node: node.name });
    if (node.outputs.length !== 1) throw new ModelError('GRAPH_BUILD', `${node.name}: two-pass norms rewrite single-output nodes only`, { node: node.name });
    const [x, scale, bias] = node.inputs;
    const eps = floatAttr(node, 'epsilon', 1e-5);
    const n = (suffix: string) => `${node.name}/two_pass/${suffix}`;
    const emit = (opType: string, inputs: string[], suffix: string, attributes: ReadonlyArray<readonly [string, AttrValue]> = [], output?: string): string => {
      const out = output ?? n(suffix);
      nodes.push({ name: n(suffix), opType, domain: '', inputs, outputs: [out], attributes });
      return out;
    };
    // InstanceNormalization on (B, C, L): statistics over axis 2; LayerNormalization: over the last axis.
    const axes: readonly [string, AttrValue] = ['axes', { kind: 'ints', value: layer ? [-1] : [2] }];
    const keep: readonly [string, AttrValue] = ['keepdims', { kind: 'int', value: 1 }];
    const mean = emit('ReduceMean', [x!], 'mean', [axes, keep]);
    const centred = emit('Sub', [x!, mean], 'centred');
    const variance = emit('ReduceMean', [emit('Mul', [centred, centred], 'square')], 'variance', [axes, keep]);
    const std = emit('Sqrt', [emit('Add', [variance, constant(n('eps'), 'float32', [], new Float32Array([eps]))], 'var_eps')], 'std');
    const normed = emit('Div', [centred, std], 'normed');
    // Scale and bias: per channel (C) → (C, 1) for InstanceNormalization, over the last axis for LayerNormalization.
    const perChannel = (v: string, suffix: string) => (layer ? v : emit('Unsqueeze', [v, constant(n('axis1'), 'int64', [1], BigInt64Array.from([1n]))], suffix));
    const scaled = emit('Mul', [normed, perChannel(scale!, 'scale_c')], 'scaled');
    if (bias === undefined || bias === '') {
      emit('Identity', [scaled], 'out', [], node.outputs[0]);
    } else {
      emit('Add', [scaled, perChannel(bias, 'bias_c')], 'out', [], node.outputs[0]);
    }
    rewritten++;
  }
  return rewritten === 0 ? graph : { ...graph, nodes, constants };
}
