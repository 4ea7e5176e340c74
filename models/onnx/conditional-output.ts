/**
 * An output computed only when asked for: the nodes that feed `output` and nothing else move into
 * the `then` branch of an ONNX `If` on a new boolean scalar input; the `else` branch returns a copy
 * of an input of the same type (for ε: the sample), which the caller then ignores.
 *
 * Why: CLoRA's one-pass gradient graph (the whole UNet, the loss and the backward) also outputs ε.
 * Refinement rounds whose ε is discarded only need the UNet up to the maps (the 1/32 grid); without
 * this, a machine that can hold one gradient session only (SD 1.5 at 512² on 24 GB) runs the
 * UNet's tail (`up_blocks.2`, `up_blocks.3`, `conv_out`) for nothing in every such round. With the
 * `If`, one session serves both kinds of round and the skipped tail costs nothing.
 *
 * The branch reads the outer graph's values by name (ONNX outer-scope references); the parameters
 * only it reads are its own initializers. Applied last, after every rewrite that walks nodes (VJP,
 * hoisting): no other pass looks inside subgraph attributes.
 */
import { ModelError } from '../errors.ts';
import type { Graph, IoDecl, NodeDecl } from './builder.ts';
import { DTYPE_BYTES, numel } from '../tensor.ts';

/**
 * Rewrite `graph` so `output` is computed only when the bool scalar input `condition` is true;
 * otherwise the output is a copy of the graph input `skipped` (same dtype; a runtime value, so the
 * skipped branch holds nothing ONNX Runtime would fold into an initializer).
 */
export function conditionalOutput(graph: Graph, output: string, condition: string, skipped: string): Graph {
  const declared = graph.outputs.find((o) => o.name === output);
  if (declared === undefined) throw new ModelError('GRAPH_BUILD', `conditionalOutput: ${graph.name} has no output ${output}`, { output });
  const passed = graph.inputs.find((i) => i.name === skipped);
  if (passed === undefined || passed.dtype !== declared.dtype) {
    throw new ModelError('GRAPH_BUILD', `conditionalOutput: ${graph.name} has no ${declared.dtype} input ${skipped} to return when ${output} is skipped`, { input: skipped });
  }
  const producer = new Map<string, number>();
  graph.nodes.forEach((n, i) => n.outputs.forEach((o) => producer.set(o, i)));
  const reads = graph.nodes.map(valuesRead);
  /** Indices of the nodes the given values depend on. */
  const ancestors = (roots: readonly string[]): Set<number> => {
    const seen = new Set<number>();
    const stack = [...roots];
    while (stack.length > 0) {
      const i = producer.get(stack.pop()!);
      if (i === undefined || seen.has(i)) continue;
      seen.add(i);
      for (const v of reads[i]!) stack.push(v);
    }
    return seen;
  };
  // Nodes of parameters and constants only that feed the branch alone move with it (a norm's weight
  // reshaped to (1, C, 1, 1), the backward's flipped conv kernels W̃): ONNX Runtime folds them inside
  // the branch, outer-scope weights included, and its NCHWc layout pass rewrites a convolution only
  // when the kernel is an initializer of the graph the node is in (folded outside, the backward's
  // convolutions stayed plain NCHW). It writes each folded value twice into the optimized copy
  // (`repairOptimizedModel` drops the duplicates).
  const shared = ancestors(graph.outputs.filter((o) => o.name !== output).map((o) => o.name));
  const tail = [...ancestors([output])].filter((i) => !shared.has(i)).sort((a, b) => a - b);
  if (tail.length === 0) throw new ModelError('GRAPH_BUILD', `conditionalOutput: ${output} of ${graph.name} needs no node of its own`, { output });
  const names = new Set([...graph.inputs.map((i) => i.name), ...graph.nodes.flatMap((n) => n.outputs), ...graph.constants.map((c) => c.name), ...graph.params.map((p) => p.name)]);
  for (const v of [condition, `${output}.computed`, `${output}.skipped`]) {
    if (names.has(v)) throw new ModelError('GRAPH_BUILD', `conditionalOutput: ${graph.name} already has a value ${v}`, { value: v });
  }
  const moved = new Set(tail);
  const outside = graph.nodes.filter((_, i) => !moved.has(i));
  // Parameters only the branch reads become its own initializers: ONNX Runtime's layout pass (NCHWc
  // convolutions) rewrites only weights that are initializers of the graph the node is in.
  const readOutside = new Set(outside.flatMap(valuesRead));
  const readInside = new Set(tail.flatMap((i) => reads[i]!));
  const local = graph.params.filter((p) => readInside.has(p.name) && !readOutside.has(p.name));
  const localNames = new Set(local.map((p) => p.name));
  // ONNX forbids a subgraph value shadowing an outer one: inside, the output is `<output>.computed`.
  const inBranch = (v: string) => (v === output ? `${output}.computed` : v);
  const thenNodes: NodeDecl[] = tail.map((i) => {
    const n = graph.nodes[i]!;
    return { ...n, inputs: n.inputs.map(inBranch), outputs: n.outputs.map(inBranch) };
  });
  const sameShape = passed.shape !== undefined && declared.shape !== undefined && passed.shape.join(',') === declared.shape.join(',');
  const type = (name: string): IoDecl => ({ name, dtype: declared.dtype, shape: sameShape ? declared.shape : undefined });
  const copy: NodeDecl = { name: `${output}/skipped`, opType: 'Identity', domain: '', inputs: [skipped], outputs: [`${output}.skipped`], attributes: [] };
  const branch: NodeDecl = {
    name: `${output}/if`,
    opType: 'If',
    domain: '',
    inputs: [condition],
    outputs: [output],
    attributes: [
      ['else_branch', { kind: 'graph', value: { name: `${output}.else`, nodes: [copy], outputs: [type(`${output}.skipped`)] } }],
      ['then_branch', { kind: 'graph', value: { name: `${output}.then`, nodes: thenNodes, outputs: [type(`${output}.computed`)], params: local } }],
    ],
  };
  return {
    ...graph,
    inputs: [...graph.inputs, { name: condition, dtype: 'bool', shape: [] }],
    outputs: graph.outputs.map((o) => (o.name === output ? type(output) : o)),
    nodes: [...outside, branch],
    params: graph.params.filter((p) => !localNames.has(p.name)),
  };
}

/**
 * The values a node reads: its inputs and, for a node with subgraphs (an earlier `If`), every value
 * a subgraph reads from outside itself (ONNX outer-scope references).
 */
function valuesRead(n: NodeDecl): string[] {
  const out = n.inputs.filter((v) => v !== '');
  for (const [, a] of n.attributes) {
    if (a.kind !== 'graph') continue;
    const own = new Set([...(a.value.params ?? []).map((p) => p.name), ...a.value.nodes.flatMap((m) => m.outputs)]);
    for (const m of a.value.nodes) for (const v of valuesRead(m)) if (!own.has(v)) out.push(v);
  }
  return out;
}

/**
 * Bytes of the values ONNX Runtime will create inside the graph's `If` branches when it optimizes
 * the session: each parameter a branch folds (through nodes of parameters and constants only, the
 * backward's flipped kernels) or hands to a convolution (the NCHWc pass writes a blocked copy of
 * every kernel) counts once. ONNX Runtime 1.30 writes every such value inline into its optimized
 * copy of the model besides the external copy (microsoft/onnxruntime#32474), and protobuf refuses a
 * model above 2 GB: SD 1.5's one-pass gradient graph with ε and the backward in branches comes to
 * 2.18 GB, which ONNX Runtime fails to write after optimizing, and then the session is built again
 * without the copy. Callers skip the copy above a margin instead.
 */
export function branchCreatedBytes(graph: Graph): number {
  const params = new Map(graph.params.map((p) => [p.name, p]));
  const constants = new Set(graph.constants.map((c) => c.name));
  // The parameters each value of parameters and constants only is made of.
  const madeOf = new Map<string, readonly string[]>();
  const sourcesOf = (v: string): readonly string[] | undefined => (params.has(v) ? [v] : (madeOf.get(v) ?? (constants.has(v) ? [] : undefined)));
  const counted = new Set<string>();
  let total = 0;
  const count = (name: string) => {
    if (counted.has(name)) return;
    counted.add(name);
    const p = params.get(name)!;
    total += numel(p.shape) * DTYPE_BYTES[p.dtype];
  };
  const walk = (nodes: readonly NodeDecl[], inBranch: boolean) => {
    for (const n of nodes) {
      const branches = n.attributes.flatMap(([, a]) => (a.kind === 'graph' ? [a.value] : []));
      if (branches.length > 0) {
        for (const b of branches) {
          for (const p of b.params ?? []) params.set(p.name, p);
          walk(b.nodes, true);
        }
        continue;
      }
      const sources = n.inputs.filter((v) => v !== '').map(sourcesOf);
      if (sources.every((x) => x !== undefined)) {
        const made = sources.flat();
        for (const o of n.outputs) madeOf.set(o, made);
        if (inBranch) made.forEach(count);
      } else if (inBranch && n.opType === 'Conv' && n.inputs[1] !== undefined) {
        sourcesOf(n.inputs[1])?.forEach(count);
      }
    }
  };
  walk(graph.nodes, false);
  return total;
}
