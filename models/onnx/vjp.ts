/**
 * Reverse-mode differentiation over the graphs our builder emits (ARCHITECTURE.md section 2.2).
 *
 * `buildVjpGraph(forward, { outputs, wrt })` returns one graph that
 *   1. recomputes the part of the forward that `outputs` need (nothing else: for the UNet's 1/32-grid
 *      maps that is conv_in … up_blocks.1; noise_pred and the output layers are pruned),
 *   2. takes a cotangent input `cot.<output>` per chosen output (∂L/∂output, computed by the caller),
 *   3. runs the vector-Jacobian rule of every node that lies between `wrt` and the outputs, in reverse
 *      topological order, summing the contributions of values used several times,
 *   4. outputs the chosen forward outputs and `grad_<wrt>` = ∂L/∂wrt = Σ_o J_oᵀ·cot_o.
 * Params, constants and inputs other than `wrt` are constants: nothing is differentiated with
 * respect to them, and nodes that depend only on them (the time embedding, the text keys and values)
 * are recomputed but not differentiated.
 *
 * The rules (`vjp-rules.ts`) need static facts about the forward values: ranks for transposes and
 * reductions, shapes to decide broadcast reductions at build time. `inferFacts` infers shapes with
 * symbolic dimensions (the graph inputs' dim names, products such as `height*width`, opaque atoms
 * for strided sizes), so that e.g. `batch` stays `batch` through the whole UNet. Where it cannot tell,
 * the rules fall back to shapes computed at run time.
 *
 * Deterministic: backward nodes are named `grad.<forward node>/<Op>` (sums of several uses
 * `grad.<value>/sum`), constants are deduplicated as the builder does, and no step depends on map
 * iteration order of anything but insertion.
 */
import { ModelError } from '../errors.ts';
import type { DType } from '../tensor.ts';
import type { AttrValue, ConstantDecl, Dim, Graph, IoDecl, NodeDecl, Value } from './builder.ts';
import { ONNX_DTYPE, Ops } from './ops.ts';
import { NON_DIFFERENTIABLE, VJP_RULES, isFloatDtype, type RuleContext } from './vjp-rules.ts';
import { attentionCoreBackward, attentionCoreForward, findAttentionCores, type AttentionCore, type LeanAttention } from './vjp-attention.ts';

/** The cotangent input of forward output `output`. */
export const cotangentInput = (output: string): string => `cot.${output}`;
/** The gradient output for forward input `input` (`grad_sample`, as the reference fixtures name it). */
export const gradientOutput = (input: string): string => `grad_${input}`;

export interface VjpOptions {
  /** Forward outputs the loss depends on; each gets a cotangent input `cot.<name>`. */
  readonly outputs: readonly string[];
  /** The forward input to differentiate with respect to. */
  readonly wrt: string;
  /**
   * Symbolic input dims known to be 1 or equal to another one, as [small, large]: broadcasting them
   * together gives `large`. The UNet's `timestep_batch` is 1 or `batch` (the engine checks it), so
   * adding the time embedding never broadcasts the feature maps and needs no reduction.
   */
  readonly broadcastsInto?: ReadonlyArray<readonly [string, string]>;
  /**
   * Extra outputs for debugging: output name → forward value whose total cotangent (∂L/∂value over
   * all its uses) to output. Zeros when L does not depend on the value.
   */
  readonly probes?: ReadonlyArray<readonly [string, string]>;
  /**
   * Forward outputs the loss does not depend on, kept as outputs of the VJP graph (no cotangent): one
   * pass then computes them and the gradient, sharing the forward values they have in common.
   */
  readonly passThrough?: readonly string[];
  /**
   * Attention cores (`MatMul(q, kᵀ) → Mul(scale) [→ Add(bias)] → Softmax → MatMul(·, v)`) whose
   * probabilities feed only their output product get the lean backward of `vjp-attention.ts`.
   * Called per core with the Softmax node's name and the probabilities' inferred shape; returns
   * whether the backward reads the forward's probabilities (`keep`) or recomputes them (they are then
   * not kept from the forward) and in how many head groups, or undefined to keep the per-op rules
   * for that core. Default: per-op rules everywhere.
   */
  readonly leanAttention?: LeanAttention;
}

/** The node types that have a VJP rule. */
export function vjpOpTypes(): string[] {
  return Object.keys(VJP_RULES).sort();
}

/** Static facts about one value: element type, shape (symbolic dims as strings), known int64 values. */
interface Facts {
  readonly dtype?: DType;
  readonly shape?: readonly Dim[];
  readonly ints?: readonly Dim[];
}

/** The sub-graph that computes `outputs`: needed nodes, used inputs, params and constants. */
export function pruneGraph(graph: Graph, outputs: readonly string[]): Graph {
  const { needed } = analyse(graph, outputs);
  const nodes = graph.nodes.filter((_, i) => needed.has(i));
  return compactConstants(assemble(graph, nodes, graph.outputs.filter((o) => outputs.includes(o.name)), [], graph.constants));
}

/**
 * Constants renamed `const_0 … const_{n−1}` in their order, as the graph builder names them, when
 * pruning left gaps (a constant only the pruned nodes read, e.g. a shape of the pruned selfattn
 * maps). `buildVjpGraph` and `appendGraph` rebuild constants through the builder and rely on it.
 */
function compactConstants(graph: Graph): Graph {
  const rename = new Map<string, string>();
  graph.constants.forEach((c, i) => {
    if (c.name !== `const_${i}`) rename.set(c.name, `const_${i}`);
  });
  if (rename.size === 0) return graph;
  const r = (v: string) => rename.get(v) ?? v;
  return {
    ...graph,
    nodes: graph.nodes.map((n) => (n.inputs.some((v) => rename.has(v)) ? { ...n, inputs: n.inputs.map(r) } : n)),
    constants: graph.constants.map((c, i) => ({ ...c, name: `const_${i}` })),
  };
}

/**
 * Build the VJP graph of `forward` (see the file header). Throws GRAPH_BUILD when an output or the
 * input does not exist, when an output does not depend on the input, or when a node on the path has
 * no rule (naming the node and its op).
 */
export function buildVjpGraph(forward: Graph, options: VjpOptions): Graph {
  const { wrt } = options;
  const wrtDecl = forward.inputs.find((i) => i.name === wrt);
  if (wrtDecl === undefined) throw new ModelError('GRAPH_BUILD', `VJP of ${forward.name}: ${wrt} is not an input (inputs: ${forward.inputs.map((i) => i.name).join(', ')})`, { input: wrt });
  if (!isFloatDtype(wrtDecl.dtype)) throw new ModelError('GRAPH_BUILD', `VJP of ${forward.name}: input ${wrt} is ${wrtDecl.dtype}, not a float tensor`, { input: wrt });
  if (options.outputs.length === 0) throw new ModelError('GRAPH_BUILD', `VJP of ${forward.name}: no outputs chosen`);
  const { needed, producer } = analyse(forward, options.outputs);
  const passThrough = (options.passThrough ?? []).filter((o) => !options.outputs.includes(o));
  const kept = passThrough.length === 0 ? needed : analyse(forward, [...options.outputs, ...passThrough]).needed;
  const facts = inferFacts(forward, options.broadcastsInto ?? []);

  // Values that depend on wrt through differentiable ops.
  const active = new Set<string>([wrt]);
  forward.nodes.forEach((n) => {
    if (NON_DIFFERENTIABLE.has(n.opType) || !n.inputs.some((i) => active.has(i))) return;
    for (const o of n.outputs) {
      const dtype = facts.get(o)?.dtype;
      if (o !== '' && (dtype === undefined || isFloatDtype(dtype))) active.add(o);
    }
  });
  for (const o of options.outputs) {
    if (!active.has(o)) throw new ModelError('GRAPH_BUILD', `VJP of ${forward.name}: output ${o} does not depend on ${wrt}`, { output: o, input: wrt });
  }
  // Nodes with an active output (non-differentiable ops such as Shape have none).
  const differentiated = [...needed].sort((a, b) => a - b).filter((i) => forward.nodes[i]!.outputs.some((v) => active.has(v)));
  const missing = differentiated.map((i) => forward.nodes[i]!).filter((n) => VJP_RULES[n.opType] === undefined);
  if (missing.length > 0) {
    const firsts = new Map<string, string>();
    for (const n of missing) if (!firsts.has(n.opType)) firsts.set(n.opType, n.name);
    const list = [...firsts].map(([op, name]) => `${op} (e.g. ${name})`).join(', ');
    throw new ModelError('GRAPH_BUILD', `VJP of ${forward.name}: no VJP rule for ${list} on the path from ${wrt} to ${options.outputs.join(', ')}`, { ops: [...firsts.keys()] });
  }

  const cores = options.leanAttention === undefined
    ? new Map()
    : findAttentionCores({
        graph: forward,
        kept,
        exposed: new Set([...options.outputs, ...passThrough, ...(options.probes ?? []).map(([, v]) => v)]),
        active,
        shape: (v) => facts.get(v)?.shape,
        constants: new Map(forward.constants.map((c) => [c.name, c])),
        choose: options.leanAttention,
      });

  const g = new Ops(`${forward.name}.vjp`);
  // Register the forward constants first so they keep their names; new ones follow.
  for (const c of forward.constants) {
    const v = g.constant(c.dtype, c.shape, c.bytes);
    if (v.name !== c.name) throw new Error(`buildVjpGraph: constant ${c.name} of ${forward.name} was not made by GraphBuilder (got ${v.name})`);
  }
  const constants = new Map(forward.constants.map((c) => [c.name, c]));

  // Cores in several head groups also run their forward in those groups (the forward's N×M
  // transients are one group's): the replacement nodes take the place of the core's nodes.
  const coreOf = new Map<number, AttentionCore>();
  const forwardScopes = new Map<AttentionCore, string>();
  const forwardProbs = new Map<AttentionCore, Value[]>();
  for (const core of cores.values()) {
    if (core.groups === 1) continue;
    for (const i of core.nodes) coreOf.set(i, core);
    const scope = `fwd.${core.softmaxName}`;
    forwardScopes.set(core, `${scope}/`);
    forwardProbs.set(core, g.scope(scope, () => attentionCoreForward(g, core)).probs);
  }

  // Contributions to each value's cotangent, in the order they arrive; summed when first read.
  const contributions = new Map<string, Value[]>();
  const totals = new Map<string, Value>();
  for (const o of options.outputs) contributions.set(o, [{ name: cotangentInput(o) }]);
  const total = (v: string): Value | undefined => {
    const hit = totals.get(v);
    if (hit !== undefined) return hit;
    const parts = contributions.get(v);
    if (parts === undefined || parts.length === 0) return undefined;
    let sum = parts[0]!;
    if (parts.length > 1) g.scope(`grad.${v}`, () => parts.slice(1).forEach((p) => (sum = g.node('Add', [sum, p], {}, { name: 'sum' })[0]!)));
    totals.set(v, sum);
    return sum;
  };
  const zerosLike = (v: string): Value => {
    const s = facts.get(v)?.shape;
    const shape = s !== undefined && s.every((d) => typeof d === 'number') ? g.int64s(s as number[]) : g.shape({ name: v });
    return g.expand(g.scalar(0), shape);
  };

  for (const index of [...differentiated].reverse()) {
    const node = forward.nodes[index]!;
    const cots = node.outputs.map((o) => (o === '' ? undefined : total(o)));
    if (cots.every((c) => c === undefined)) continue; // nothing downstream reached the loss
    const core = cores.get(index);
    if (core !== undefined) {
      // The whole core's backward at its output product; its inner values get no cotangent, so
      // their nodes are skipped by the check above.
      const grads = g.scope(`grad.${core.softmaxName}/${core.keep ? 'lean' : 'recompute'}`, () => attentionCoreBackward(g, core, cots[0]!, { q: active.has(core.q), kt: active.has(core.kt), v: active.has(core.v) }, forwardProbs.get(core)));
      for (const [input, grad] of [[core.q, grads.q], [core.kt, grads.kt], [core.v, grads.v]] as const) {
        if (grad === undefined) continue;
        if (totals.has(input)) throw new Error(`buildVjpGraph: ${input} received a gradient after its total was formed (graph not in topological order?)`);
        contributions.set(input, [...(contributions.get(input) ?? []), grad]);
      }
      continue;
    }
    const grads = g.scope(`grad.${node.name}`, () => VJP_RULES[node.opType]!(ruleContext(g, node, cots, active, facts, constants, zerosLike)));
    node.inputs.forEach((input, i) => {
      const grad = grads[i];
      if (grad === undefined || !active.has(input)) return;
      if (totals.has(input)) throw new Error(`buildVjpGraph: ${input} received a gradient after its total was formed (graph not in topological order?)`);
      const list = contributions.get(input) ?? [];
      list.push(grad);
      contributions.set(input, list);
    });
  }

  g.output(total(wrt) ?? zerosLike(wrt), gradientOutput(wrt), wrtDecl.dtype, wrtDecl.shape);
  for (const [name, value] of options.probes ?? []) {
    if (!producer.has(value) && !forward.inputs.some((i) => i.name === value)) {
      throw new ModelError('GRAPH_BUILD', `VJP of ${forward.name}: probe ${name} names ${value}, which is no value of the graph`, { probe: name });
    }
    g.output(total(value) ?? zerosLike(value), name, 'float32', undefined);
  }
  const backward = g.finish();

  const cotangents: IoDecl[] = options.outputs.map((o) => {
    const decl = forward.outputs.find((d) => d.name === o)!;
    return { name: cotangentInput(o), dtype: decl.dtype, shape: decl.shape };
  });
  const forwardOutputs = [...options.outputs, ...passThrough].map((o) => forward.outputs.find((d) => d.name === o)!);
  const forwardNodes: NodeDecl[] = [];
  forward.nodes.forEach((n, i) => {
    if (!kept.has(i)) return;
    const core = coreOf.get(i);
    if (core === undefined) return void forwardNodes.push(n);
    if (i !== core.outputNode) return;
    const prefix = forwardScopes.get(core)!;
    const group = backward.nodes.filter((m) => m.name.startsWith(prefix));
    const last = group[group.length - 1]!; // the Concat of the groups' outputs, renamed to the core's output
    forwardNodes.push(...group.slice(0, -1), { ...last, outputs: [core.out] });
  });
  const backwardNodes = backward.nodes.filter((m) => ![...forwardScopes.values()].some((p) => m.name.startsWith(p)));
  const nodes = [...forwardNodes, ...backwardNodes];
  return assemble({ ...forward, name: backward.name }, nodes, [...forwardOutputs, ...backward.outputs], cotangents, backward.constants);
}

/** Producers, topological-order check and the nodes `outputs` need. */
function analyse(graph: Graph, outputs: readonly string[]): { needed: Set<number>; producer: Map<string, number> } {
  const producer = new Map<string, number>();
  const available = new Set<string>(['', ...graph.inputs.map((i) => i.name), ...graph.params.map((p) => p.name), ...graph.constants.map((c) => c.name)]);
  graph.nodes.forEach((n, i) => {
    for (const input of n.inputs) {
      if (!available.has(input)) throw new ModelError('GRAPH_BUILD', `graph ${graph.name}: node ${n.name} reads ${input} before it is computed (nodes must be in topological order)`, { node: n.name });
    }
    for (const o of n.outputs) {
      producer.set(o, i);
      available.add(o);
    }
  });
  for (const o of outputs) {
    if (!graph.outputs.some((d) => d.name === o)) {
      throw new ModelError('GRAPH_BUILD', `graph ${graph.name} has no output ${o} (outputs: ${graph.outputs.map((d) => d.name).join(', ')})`, { output: o });
    }
  }
  const needed = new Set<number>();
  const stack = [...outputs];
  const seen = new Set<string>();
  while (stack.length > 0) {
    const v = stack.pop()!;
    if (seen.has(v)) continue;
    seen.add(v);
    const p = producer.get(v);
    if (p === undefined || needed.has(p)) continue;
    needed.add(p);
    stack.push(...graph.nodes[p]!.inputs.filter((i) => i !== ''));
  }
  return { needed, producer };
}

/** A graph of `nodes` with only the inputs, params and constants they read; checks names are unique. */
function assemble(base: Graph, nodes: readonly NodeDecl[], outputs: readonly IoDecl[], extraInputs: readonly IoDecl[], constants: readonly ConstantDecl[]): Graph {
  const read = new Set(nodes.flatMap((n) => n.inputs));
  const graph: Graph = {
    name: base.name,
    opset: base.opset,
    inputs: [...base.inputs.filter((i) => read.has(i.name)), ...extraInputs.filter((i) => read.has(i.name))],
    outputs,
    nodes,
    params: base.params.filter((p) => read.has(p.name)),
    constants: constants.filter((c) => read.has(c.name)),
  };
  const names = new Set<string>();
  for (const name of [...graph.inputs.map((i) => i.name), ...graph.params.map((p) => p.name), ...graph.constants.map((c) => c.name), ...nodes.flatMap((n) => n.outputs)]) {
    if (name === '') continue;
    if (names.has(name)) throw new Error(`VJP graph ${graph.name}: value name ${name} is defined twice`);
    names.add(name);
  }
  return graph;
}

function ruleContext(
  g: Ops,
  node: NodeDecl,
  cots: readonly (Value | undefined)[],
  active: ReadonlySet<string>,
  facts: ReadonlyMap<string, Facts>,
  constants: ReadonlyMap<string, ConstantDecl>,
  zerosLike: (v: string) => Value,
): RuleContext {
  const attrs = new Map<string, AttrValue>(node.attributes);
  const fail = (message: string): never => {
    throw new ModelError('GRAPH_BUILD', `VJP of ${node.opType} node ${node.name}: ${message}`, { node: node.name, op: node.opType });
  };
  const attrOf = (name: string, kind: AttrValue['kind']): AttrValue['value'] | undefined => {
    const a = attrs.get(name);
    if (a === undefined) return undefined;
    if (a.kind !== kind) fail(`attribute ${name} is ${a.kind}, expected ${kind}`);
    return a.value;
  };
  const zeros = new Map<number, Value>();
  return {
    g,
    node,
    x: (i) => {
      const name = node.inputs[i];
      if (name === undefined || name === '') return fail(`input ${i} is missing`);
      return { name };
    },
    has: (i) => (node.inputs[i] ?? '') !== '',
    y: (i = 0) => ({ name: node.outputs[i]! }),
    dy: (i = 0) => {
      const c = cots[i];
      if (c !== undefined) return c;
      let z = zeros.get(i);
      if (z === undefined) {
        z = zerosLike(node.outputs[i]!);
        zeros.set(i, z);
      }
      return z;
    },
    wants: (i) => active.has(node.inputs[i] ?? ''),
    shape: (v) => facts.get(v.name)?.shape,
    rank: (v) => facts.get(v.name)?.shape?.length ?? fail(`the rank of ${v.name} is not known statically`),
    dtype: (v) => facts.get(v.name)?.dtype,
    ints: (v) => facts.get(v.name)?.ints,
    floats: (v) => {
      const c = constants.get(v.name);
      if (c === undefined || c.dtype !== 'float32') return undefined;
      return new Float32Array(c.bytes.slice().buffer);
    },
    attrInt: (name, fallback) => (attrOf(name, 'int') as number | undefined) ?? fallback,
    attrInts: (name) => attrOf(name, 'ints') as readonly number[] | undefined,
    attrFloat: (name, fallback) => (attrOf(name, 'float') as number | undefined) ?? fallback,
    attrString: (name, fallback) => (attrOf(name, 'string') as string | undefined) ?? fallback,
    fail,
  };
}

// ---- static shape inference with symbolic dims -------------------------------------------------
//
// A dim is a number or a string. Strings are products: an optional integer coefficient and sorted
// atoms joined by `*` (`2*height`, `height*width`). Atoms are input dim names or opaque expressions
// for sizes we do not simplify (`conv(height,-1,2)` for a stride-2 conv, `max{a|b}` for the result of
// broadcasting two sizes that may each be 1, `?<value>#<axis>` for an unknown size that equals only
// itself). Equal strings mean equal sizes at run time.

interface Monomial {
  readonly coef: number;
  readonly atoms: readonly string[];
}

function parseDim(d: Dim): Monomial {
  if (typeof d === 'number') return { coef: d, atoms: [] };
  let coef = 1;
  const atoms: string[] = [];
  for (const part of d.split('*')) {
    if (/^\d+$/.test(part)) coef *= Number(part);
    else atoms.push(part);
  }
  return { coef, atoms: atoms.sort() };
}

function formatDim(m: Monomial): Dim {
  if (m.atoms.length === 0) return m.coef;
  return [...(m.coef === 1 ? [] : [String(m.coef)]), ...[...m.atoms].sort()].join('*');
}

/** An opaque atom for an expression (`*` inside would read as a product). */
const atom = (expression: string): string => expression.replace(/\*/g, '·');

function mulDim(a: Dim, b: Dim): Dim {
  const x = parseDim(a);
  const y = parseDim(b);
  return formatDim({ coef: x.coef * y.coef, atoms: [...x.atoms, ...y.atoms] });
}

function divDim(a: Dim, b: Dim): Dim | undefined {
  const x = parseDim(a);
  const y = parseDim(b);
  if (y.coef === 0 || x.coef % y.coef !== 0) return undefined;
  const atoms = [...x.atoms];
  for (const t of y.atoms) {
    const i = atoms.indexOf(t);
    if (i < 0) return undefined;
    atoms.splice(i, 1);
  }
  return formatDim({ coef: x.coef / y.coef, atoms });
}

function addDim(a: Dim, b: Dim): Dim {
  if (typeof a === 'number' && typeof b === 'number') return a + b;
  const x = parseDim(a);
  const y = parseDim(b);
  if (x.atoms.join('*') === y.atoms.join('*')) return formatDim({ coef: x.coef + y.coef, atoms: x.atoms });
  return atom(`(${a}+${b})`);
}

const product = (dims: readonly Dim[]): Dim => dims.reduce<Dim>((p, d) => mulDim(p, d), 1);

const DTYPE_OF_ONNX = new Map<number, DType>(Object.entries(ONNX_DTYPE).map(([k, v]) => [v, k as DType]));

const ELEMENTWISE_UNARY = new Set(['Identity', 'Neg', 'Sqrt', 'Exp', 'Log', 'Sin', 'Cos', 'Sigmoid', 'Erf', 'Tanh', 'Relu', 'Abs', 'Reciprocal', 'Floor', 'Ceil', 'Round', 'Sign', 'Not', 'Softmax', 'InstanceNormalization', 'Clip']);
const BROADCASTING = new Set(['Add', 'Sub', 'Mul', 'Div', 'Pow', 'Max', 'Min', 'Where', 'Equal', 'Less', 'Greater', 'LessOrEqual', 'GreaterOrEqual', 'And', 'Or', 'Xor']);
const BOOLEAN_RESULT = new Set(['Equal', 'Less', 'Greater', 'LessOrEqual', 'GreaterOrEqual', 'And', 'Or', 'Xor', 'Not']);

/** Shapes, dtypes and int64 values of every value of `graph`, as far as they can be told statically. */
function inferFacts(graph: Graph, broadcastsInto: ReadonlyArray<readonly [string, string]>): Map<string, Facts> {
  const facts = new Map<string, Facts>();
  for (const i of graph.inputs) facts.set(i.name, { dtype: i.dtype, ...(i.shape === undefined ? {} : { shape: i.shape }) });
  for (const p of graph.params) facts.set(p.name, { dtype: p.dtype, shape: p.shape });
  for (const c of graph.constants) {
    let ints: Dim[] | undefined;
    if (c.dtype === 'int64' && c.shape.length <= 1) ints = [...new BigInt64Array(c.bytes.slice().buffer)].map(Number);
    facts.set(c.name, { dtype: c.dtype, shape: c.shape, ...(ints === undefined ? {} : { ints }) });
  }
  const floatsOf = (name: string): Float32Array | undefined => {
    const c = graph.constants.find((k) => k.name === name);
    return c !== undefined && c.dtype === 'float32' ? new Float32Array(c.bytes.slice().buffer) : undefined;
  };
  const larger = new Map<string, Set<string>>();
  for (const [small, large] of broadcastsInto) larger.set(small, (larger.get(small) ?? new Set()).add(large));
  const broadcastDim = (a: Dim, b: Dim): Dim => {
    if (a === b || b === 1) return a;
    if (a === 1) return b;
    if (typeof a === 'string' && typeof b === 'string' && larger.get(a)?.has(b) === true) return b;
    if (typeof b === 'string' && typeof a === 'string' && larger.get(b)?.has(a) === true) return a;
    // Sizes that broadcast at run time: the larger of the two, as one flat set `max{a|b|…}`.
    const members = (d: Dim) => (typeof d === 'string' && d.startsWith('max{') ? d.slice(4, -1).split('|') : [atom(String(d))]);
    return `max{${[...new Set([...members(a), ...members(b)])].sort().join('|')}}`;
  };
  const broadcast = (shapes: (readonly Dim[] | undefined)[]): readonly Dim[] | undefined => {
    if (shapes.some((s) => s === undefined)) return undefined;
    const rank = Math.max(...shapes.map((s) => s!.length));
    return Array.from({ length: rank }, (_, i) =>
      shapes.map((s) => s![s!.length - rank + i] ?? 1).reduce<Dim>((acc, d) => broadcastDim(acc, d), 1),
    );
  };

  for (const node of graph.nodes) {
    const get = (i: number): Facts => facts.get(node.inputs[i] ?? '') ?? {};
    const attrs = new Map(node.attributes);
    const int = (name: string, fallback: number): number => {
      const a = attrs.get(name);
      return a?.kind === 'int' ? a.value : fallback;
    };
    const ints = (name: string): readonly number[] | undefined => {
      const a = attrs.get(name);
      return a?.kind === 'ints' ? a.value : undefined;
    };
    const unknown = (axis: number): Dim => atom(`?${node.outputs[0]}#${axis}`);
    const x = get(0);
    const xs = x.shape;
    let out: Facts[] = [];
    const op = node.opType;
    if (ELEMENTWISE_UNARY.has(op) || op === 'LayerNormalization') {
      out = [{ ...(x.dtype === undefined ? {} : { dtype: BOOLEAN_RESULT.has(op) ? 'bool' : x.dtype }), ...(xs === undefined ? {} : { shape: xs }) }];
    } else if (BROADCASTING.has(op)) {
      const shape = broadcast(node.inputs.map((_, i) => get(i).shape));
      const dtype = BOOLEAN_RESULT.has(op) ? 'bool' : op === 'Where' ? get(1).dtype : x.dtype;
      out = [{ ...(dtype === undefined ? {} : { dtype }), ...(shape === undefined ? {} : { shape }) }];
    } else if (op === 'Cast') {
      const to = DTYPE_OF_ONNX.get(int('to', 0));
      out = [{ ...(to === undefined ? {} : { dtype: to }), ...(xs === undefined ? {} : { shape: xs }), ...(x.ints !== undefined && to === 'int64' ? { ints: x.ints } : {}) }];
    } else if (op === 'Shape') {
      if (xs !== undefined) {
        const r = xs.length;
        const norm = (v: number) => Math.min(Math.max(v < 0 ? v + r : v, 0), r);
        const dims = xs.slice(norm(int('start', 0)), norm(int('end', r)));
        out = [{ dtype: 'int64', shape: [dims.length], ints: dims }];
      } else out = [{ dtype: 'int64' }];
    } else if (op === 'Size') {
      out = [{ dtype: 'int64', shape: [] }];
    } else if (op === 'MatMul') {
      const bs = get(1).shape;
      let shape: readonly Dim[] | undefined;
      if (xs !== undefined && bs !== undefined && xs.length >= 2 && bs.length >= 2) {
        const batch = broadcast([xs.slice(0, -2), bs.slice(0, -2)])!;
        shape = [...batch, xs[xs.length - 2]!, bs[bs.length - 1]!];
      }
      out = [{ ...(x.dtype === undefined ? {} : { dtype: x.dtype }), ...(shape === undefined ? {} : { shape }) }];
    } else if (op === 'Gemm') {
      const bs = get(1).shape;
      const shape = xs !== undefined && bs !== undefined ? [int('transA', 0) === 1 ? xs[1]! : xs[0]!, int('transB', 0) === 1 ? bs[0]! : bs[1]!] : undefined;
      out = [{ ...(x.dtype === undefined ? {} : { dtype: x.dtype }), ...(shape === undefined ? {} : { shape }) }];
    } else if (op === 'Conv') {
      const ws = get(1).shape;
      let shape: Dim[] | undefined;
      if (xs !== undefined && ws !== undefined && int('group', 1) === 1) {
        const n = ws.length - 2;
        const strides = ints('strides') ?? Array(n).fill(1);
        const dilations = ints('dilations') ?? Array(n).fill(1);
        const pads = ints('pads') ?? Array(2 * n).fill(0);
        shape = [xs[0]!, ws[0]!];
        for (let i = 0; i < n; i++) {
          const d = xs[i + 2]!;
          const k = ws[i + 2]!;
          if (typeof k !== 'number') {
            shape.push(unknown(i + 2));
            continue;
          }
          const offset = pads[i]! + pads[i + n]! - dilations[i]! * (k - 1); // out = ⌊(d + offset − 1)/s⌋ + 1
          const s = strides[i]!;
          if (typeof d === 'number') shape.push(Math.floor((d + offset - 1) / s) + 1);
          else if (s === 1) shape.push(offset === 0 ? d : atom(`(${d}+${offset})`));
          else shape.push(atom(`conv(${d},${offset},${s})`));
        }
      }
      out = [{ ...(x.dtype === undefined ? {} : { dtype: x.dtype }), ...(shape === undefined ? {} : { shape }) }];
    } else if (op === 'Reshape') {
      const target = get(1).ints;
      let shape: Dim[] | undefined;
      if (target !== undefined) {
        shape = target.map((t, i) => (t === 0 && int('allowzero', 0) === 0 ? (xs?.[i] ?? unknown(i)) : t));
        const inferred = shape.indexOf(-1);
        if (inferred >= 0) {
          const rest = shape.filter((_, i) => i !== inferred);
          const q = xs === undefined ? undefined : divDim(product(xs), product(rest));
          shape[inferred] = q ?? unknown(inferred);
        }
      }
      out = [{ ...(x.dtype === undefined ? {} : { dtype: x.dtype }), ...(shape === undefined ? {} : { shape }), ...(x.ints !== undefined ? { ints: x.ints } : {}) }];
    } else if (op === 'Transpose') {
      const perm = ints('perm') ?? (xs === undefined ? undefined : xs.map((_, i) => xs.length - 1 - i));
      out = [{ ...(x.dtype === undefined ? {} : { dtype: x.dtype }), ...(xs === undefined || perm === undefined ? {} : { shape: perm.map((p) => xs[p]!) }) }];
    } else if (op === 'Concat') {
      const shapes = node.inputs.map((_, i) => get(i).shape);
      let shape: Dim[] | undefined;
      if (shapes.every((s) => s !== undefined)) {
        const r = shapes[0]!.length;
        const a = int('axis', 0) < 0 ? int('axis', 0) + r : int('axis', 0);
        shape = shapes[0]!.map((d, i) => (i === a ? shapes.map((s) => s![a]!).reduce((p, q) => addDim(p, q)) : d));
      }
      const parts = node.inputs.map((_, i) => get(i).ints);
      const concatenated = parts.every((p) => p !== undefined) ? parts.flatMap((p) => p!) : undefined;
      out = [{ ...(x.dtype === undefined ? {} : { dtype: x.dtype }), ...(shape === undefined ? {} : { shape }), ...(concatenated === undefined ? {} : { ints: concatenated }) }];
    } else if (op === 'Split') {
      const n = node.outputs.length;
      const sizes = node.inputs[1] !== undefined && node.inputs[1] !== '' ? get(1).ints : undefined;
      out = node.outputs.map((_, k) => {
        if (xs === undefined) return x.dtype === undefined ? {} : { dtype: x.dtype };
        const a = int('axis', 0) < 0 ? int('axis', 0) + xs.length : int('axis', 0);
        const part = sizes !== undefined ? sizes[k]! : (divDim(xs[a]!, n) ?? atom(`?${node.outputs[k]}#${a}`));
        return { ...(x.dtype === undefined ? {} : { dtype: x.dtype }), shape: xs.map((d, i) => (i === a ? part : d)) };
      });
    } else if (op === 'Unsqueeze' || op === 'Squeeze') {
      const axes = get(1).ints;
      let shape: Dim[] | undefined;
      if (xs !== undefined && axes !== undefined && axes.every((a): a is number => typeof a === 'number')) {
        if (op === 'Unsqueeze') {
          const r = xs.length + axes.length;
          const at = new Set(axes.map((a) => (a < 0 ? a + r : a)));
          const rest = [...xs];
          shape = Array.from({ length: r }, (_, i) => (at.has(i) ? 1 : rest.shift()!));
        } else {
          const at = new Set(axes.map((a) => (a < 0 ? a + xs.length : a)));
          shape = xs.filter((_, i) => !at.has(i));
        }
      }
      out = [{ ...(x.dtype === undefined ? {} : { dtype: x.dtype }), ...(shape === undefined ? {} : { shape }) }];
    } else if (op === 'Gather') {
      const is = get(1).shape;
      let shape: Dim[] | undefined;
      if (xs !== undefined && is !== undefined) {
        const a = int('axis', 0) < 0 ? int('axis', 0) + xs.length : int('axis', 0);
        shape = [...xs.slice(0, a), ...is, ...xs.slice(a + 1)];
      }
      out = [{ ...(x.dtype === undefined ? {} : { dtype: x.dtype }), ...(shape === undefined ? {} : { shape }) }];
    } else if (op === 'Slice') {
      let shape: Dim[] | undefined;
      if (xs !== undefined) {
        const starts = get(1).ints;
        const ends = get(2).ints;
        const axes = node.inputs[3] ? get(3).ints : starts?.map((_, i) => i);
        const steps = node.inputs[4] ? get(4).ints : undefined;
        shape = [...xs];
        axes?.forEach((a, p) => {
          if (typeof a !== 'number') return;
          const axis = a < 0 ? a + xs.length : a;
          const d = xs[axis]!;
          const s = starts?.[p];
          const e = ends?.[p];
          const step = steps?.[p] ?? 1;
          if (typeof d === 'number' && typeof s === 'number' && typeof e === 'number' && step === 1) {
            const clamp = (v: number) => Math.min(Math.max(v < 0 ? v + d : v, 0), d);
            shape![axis] = Math.max(0, clamp(e) - clamp(s));
          } else shape![axis] = unknown(axis);
        });
        if (axes === undefined) shape = undefined;
      }
      out = [{ ...(x.dtype === undefined ? {} : { dtype: x.dtype }), ...(shape === undefined ? {} : { shape }) }];
    } else if (op === 'Expand') {
      const target = get(1).ints;
      const shape = target === undefined ? undefined : broadcast([xs, target]);
      out = [{ ...(x.dtype === undefined ? {} : { dtype: x.dtype }), ...(shape === undefined ? {} : { shape }) }];
    } else if (op === 'ReduceMean' || op === 'ReduceSum' || op === 'ReduceMax' || op === 'ReduceMin') {
      // Opset 17: ReduceSum takes its axes as an input, the others as an attribute.
      const keep = int('keepdims', 1) === 1;
      const axesKnown = op !== 'ReduceSum' ? ints('axes') : node.inputs[1] ? get(1).ints : undefined;
      const allAxes = op !== 'ReduceSum' ? ints('axes') === undefined : !node.inputs[1];
      let shape: Dim[] | undefined;
      if (xs !== undefined) {
        if (allAxes) shape = keep ? xs.map(() => 1) : [];
        else if (axesKnown !== undefined && axesKnown.every((a): a is number => typeof a === 'number')) {
          if (axesKnown.length === 0 && int('noop_with_empty_axes', 0) === 1) shape = [...xs];
          else {
            const at = new Set(axesKnown.length === 0 ? xs.map((_, i) => i) : axesKnown.map((a) => (a < 0 ? a + xs.length : a)));
            shape = keep ? xs.map((d, i) => (at.has(i) ? 1 : d)) : xs.filter((_, i) => !at.has(i));
          }
        }
      }
      out = [{ ...(x.dtype === undefined ? {} : { dtype: x.dtype }), ...(shape === undefined ? {} : { shape }) }];
    } else if (op === 'Resize') {
      let shape: Dim[] | undefined;
      const sizes = node.inputs[3] ? get(3).ints : undefined;
      const scales = node.inputs[2] ? floatsOf(node.inputs[2]) : undefined;
      if (sizes !== undefined) shape = [...sizes];
      else if (xs !== undefined && scales !== undefined) {
        shape = xs.map((d, i) => {
          const s = scales[i]!;
          if (typeof d === 'number') return Math.floor(d * s);
          return Number.isInteger(s) ? mulDim(d, s) : unknown(i);
        });
      }
      out = [{ ...(x.dtype === undefined ? {} : { dtype: x.dtype }), ...(shape === undefined ? {} : { shape }) }];
    } else {
      out = node.outputs.map(() => ({}));
    }
    node.outputs.forEach((o, i) => {
      if (o !== '') facts.set(o, out[i] ?? {});
    });
  }
  return facts;
}
