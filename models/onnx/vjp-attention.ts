/**
 * A lean backward for attention cores (used by `buildVjpGraph` with `leanAttention`).
 *
 * The per-op rules differentiate `O = softmax(s·Q·Kᵀ [+ bias])·V` node by node: the backward keeps
 * the probabilities P of the forward (B, h, N, M) until it reaches them, and the softmax rule makes
 * four more tensors of that size (dP, dP⊙P, dP − rowsum, dS). For SD 1.5's level-0 self-attention at
 * 512² that is 537 MB per tensor and sample, ≈ 6 GiB per sample at the peak of a VJP pass.
 *
 * This rule, per group of heads:
 *
 *   P  = softmax(s·Q·Kᵀ [+ bias])          kept from the forward, or recomputed
 *   V̄  = Pᵀ·Ō
 *   dP − D = [Ō | −D]·[V | 1]ᵀ   with D = rowsum(Ō ⊙ O) = rowsum(dP ⊙ P)   (O = P·V; FlashAttention's identity)
 *   S̄  = P ⊙ (dP − D)            (s goes to the products below; ONNX Runtime folds it into them)
 *   Q̄  = s·S̄·K,  K̄ᵀ = s·Qᵀ·S̄
 *
 * D costs an N×d product instead of an N×M one, and appending −D and a column of ones to the
 * operands of dP's product subtracts it inside that product: of the softmax rule's N×M passes only
 * S̄'s product with P is left. That matters where the head dimension is small (d = 4, the tiny
 * fixture: −9 % per gradient call); at d = 40 (SD 1.5) the products dominate and it did not show.
 *
 * `keep`: P is read from the forward (which runs in the same head groups, so the backward reads each
 * group's P as the forward made it); the cheapest backward, and the N×M tensors of every such core
 * live until the backward reaches it. `recompute` (groups ≥ 1): only
 * Q, Kᵀ, V and O (N·d-sized) are kept, and the backward recomputes P per head group, so the peak
 * holds one group's N×M transients instead of every layer's P; the cost is one more Q·Kᵀ and
 * softmax per core.
 *
 * Order (recompute): ONNX Runtime may run independent nodes in any order, and a recompute that only
 * depends on forward values could run during the forward and hold its P until the backward. So each
 * group's Q and Ō get a zero-weighted scalar of a backward value added: D for the first group, the
 * previous group's gradients for the next ones. The groups then run one after the other, after Ō
 * exists (the chain on Ō keeps ONNX Runtime from computing every group's dP first and holding them all).
 */
import type { ConstantDecl, Dim, Graph, NodeDecl, Value } from './builder.ts';
import type { Ops } from './ops.ts';

/** One matched core: `MatMul(q, kt) → Mul(·, scale) [→ Add(·, bias)] → Softmax(axis −1) → MatMul(·, v)`. */
export interface AttentionCore {
  /** Index of the output MatMul in the forward graph (where the backward of the core is emitted). */
  readonly outputNode: number;
  /** Indices of all the core's nodes. */
  readonly nodes: readonly number[];
  readonly softmaxName: string;
  /** The forward's probabilities (the Softmax output). */
  readonly probs: string;
  /** The backward reads the forward's probabilities (per head group) instead of recomputing them. */
  readonly keep: boolean;
  readonly q: string;
  readonly kt: string;
  readonly v: string;
  readonly out: string;
  readonly scale: string;
  readonly bias?: string;
  /** Head groups the backward runs in (≥ 1, ≤ heads). */
  readonly groups: number;
  readonly heads: number;
}

/**
 * Decides, per core: the lean backward with the probabilities kept from the forward or recomputed,
 * in `groups` head groups (clamped to 1…heads), or undefined (the per-op rules).
 */
export type LeanAttention = (softmaxNode: string, probsShape: readonly Dim[] | undefined) => { readonly probs: 'keep' | 'recompute'; readonly groups: number } | undefined;

export interface CoreSearch {
  readonly graph: Graph;
  /** Forward nodes present in the VJP graph. */
  readonly kept: ReadonlySet<number>;
  /** Values read by the VJP graph's outputs or probes (never folded into a core). */
  readonly exposed: ReadonlySet<string>;
  readonly active: ReadonlySet<string>;
  readonly shape: (value: string) => readonly Dim[] | undefined;
  readonly constants: ReadonlyMap<string, ConstantDecl>;
  readonly choose: LeanAttention;
}

/** The attention cores of the forward graph whose probabilities feed nothing but their output product. */
export function findAttentionCores(s: CoreSearch): Map<number, AttentionCore> {
  const { graph } = s;
  const producer = new Map<string, number>();
  const consumers = new Map<string, number[]>();
  graph.nodes.forEach((n, i) => {
    n.outputs.forEach((o) => producer.set(o, i));
    if (!s.kept.has(i)) return;
    for (const input of new Set(n.inputs)) {
      if (input === '') continue;
      const list = consumers.get(input) ?? [];
      list.push(i);
      consumers.set(input, list);
    }
  });
  const soleUse = (value: string): number | undefined => {
    const users = consumers.get(value);
    if (s.exposed.has(value) || users === undefined || users.length !== 1) return undefined;
    return users[0];
  };
  const node = (i: number | undefined): NodeDecl | undefined => (i === undefined ? undefined : graph.nodes[i]);
  const cores = new Map<number, AttentionCore>();
  graph.nodes.forEach((softmax, si) => {
    if (softmax.opType !== 'Softmax' || !s.kept.has(si)) return;
    const probs = softmax.outputs[0]!;
    const probsShape = s.shape(probs);
    if (probsShape === undefined || probsShape.length !== 4) return;
    const axis = softmax.attributes.find(([name]) => name === 'axis')?.[1].value ?? -1;
    if (axis !== -1 && axis !== 3) return;
    // Output product: MatMul(probs, v).
    const oi = soleUse(probs);
    const outNode = node(oi);
    if (outNode === undefined || outNode.opType !== 'MatMul' || outNode.inputs[0] !== probs) return;
    // Optional bias, then the scale.
    let scoresNode = node(producer.get(softmax.inputs[0]!));
    const nodes = [si, oi!];
    let bias: string | undefined;
    if (scoresNode?.opType === 'Add') {
      const addIndex = producer.get(softmax.inputs[0]!)!;
      if (soleUse(softmax.inputs[0]!) !== si) return;
      const [a, b] = scoresNode.inputs as [string, string];
      const mulFirst = node(producer.get(a))?.opType === 'Mul';
      bias = mulFirst ? b : a;
      if (s.active.has(bias)) return; // a bias that depends on wrt needs its own gradient
      const biasShape = s.shape(bias);
      if (biasShape === undefined) return;
      nodes.push(addIndex);
      const scaled = mulFirst ? a : b;
      if (soleUse(scaled) !== addIndex) return;
      scoresNode = node(producer.get(scaled));
      if (scoresNode?.opType !== 'Mul') return;
      nodes.push(producer.get(scaled)!);
    } else {
      if (scoresNode?.opType !== 'Mul' || soleUse(softmax.inputs[0]!) !== si) return;
      nodes.push(producer.get(softmax.inputs[0]!)!);
    }
    const mulNode = scoresNode;
    const scale = mulNode.inputs.find((i) => isScalarConstant(s.constants.get(i)));
    const product = mulNode.inputs.find((i) => i !== scale);
    if (scale === undefined || product === undefined) return;
    const mi = producer.get(product);
    const mm = node(mi);
    if (mm === undefined || mm.opType !== 'MatMul' || soleUse(product) !== nodes[nodes.length - 1]) return;
    nodes.push(mi!);
    const [q, kt] = mm.inputs as [string, string];
    const v = outNode.inputs[1]!;
    const qShape = s.shape(q);
    const heads = qShape?.[1];
    if (qShape?.length !== 4 || s.shape(kt)?.length !== 4 || s.shape(v)?.length !== 4 || typeof heads !== 'number') return;
    const choice = s.choose(softmax.name, probsShape);
    if (choice === undefined) return;
    const keep = choice.probs === 'keep';
    let groups = Math.max(1, Math.min(heads, Math.floor(choice.groups)));
    if (bias !== undefined && groups > 1) {
      // The bias may be split along the heads only when it does not vary along them.
      const b = s.shape(bias)!;
      const headAxis = b.length - 3;
      if (headAxis >= 0 && b[headAxis] !== 1) groups = 1;
    }
    cores.set(oi!, { outputNode: oi!, nodes, softmaxName: softmax.name, probs, keep, q, kt, v, out: outNode.outputs[0]!, scale, ...(bias === undefined ? {} : { bias }), groups, heads });
  });
  return cores;
}

function isScalarConstant(c: ConstantDecl | undefined): boolean {
  return c !== undefined && c.dtype === 'float32' && c.shape.reduce((a, b) => a * b, 1) === 1;
}

/** Head-group sizes: `heads` split as evenly as possible into `groups`. */
function groupSizes(heads: number, groups: number): number[] {
  return Array.from({ length: groups }, (_, i) => Math.floor(heads / groups) + (i < heads % groups ? 1 : 0));
}

/**
 * The core's forward in head groups (for `groups` > 1): O = concat over groups of
 * softmax(s·Q_g·K_gᵀ [+ bias])·V_g, each group's Q depending on the previous group's O (see the
 * file header on order), so the forward's N×M transients are one group's too. Returns the concat;
 * the caller names it as the core's output.
 */
export function attentionCoreForward(g: Ops, core: AttentionCore): { out: Value; probs: Value[] } {
  const sizes = g.int64s(groupSizes(core.heads, core.groups));
  const qs = g.split({ name: core.q }, sizes, core.groups, { dim: 1 });
  const kts = g.split({ name: core.kt }, sizes, core.groups, { dim: 1 });
  const vs = g.split({ name: core.v }, sizes, core.groups, { dim: 1 });
  const outs: Value[] = [];
  const probs: Value[] = [];
  for (let i = 0; i < core.groups; i++) {
    const q = i === 0 ? qs[0]! : g.add(qs[i]!, g.mul(g.reduceSum(outs[i - 1]!, { dims: [0, 1, 2, 3], keepdim: false }), g.scalar(0)));
    const scaled = g.mul(g.matmul(q, kts[i]!), { name: core.scale });
    probs.push(g.softmax(core.bias === undefined ? scaled : g.add(scaled, { name: core.bias }), { dim: -1 }));
    outs.push(g.matmul(probs[i]!, vs[i]!));
  }
  return { out: g.concat(outs, { dim: 1 }), probs };
}

/**
 * Emit the core's backward (see the file header) for the output cotangent `dOut`; returns the
 * gradients of q, kt and v (undefined where `wants` says no). `forwardProbs`: with `keep` and
 * several groups, each group's probabilities from `attentionCoreForward`.
 */
export function attentionCoreBackward(g: Ops, core: AttentionCore, dOut: Value, wants: { q: boolean; kt: boolean; v: boolean }, forwardProbs?: readonly Value[]): { q?: Value; kt?: Value; v?: Value } {
  const out: Value = { name: core.out };
  const scale: Value = { name: core.scale };
  const d = g.reduceSum(g.mul(dOut, out), { dims: [-1], keepdim: true }); // (B, h, N, 1)
  const split = (v: Value): Value[] => (core.groups === 1 ? [v] : g.split(v, g.int64s(groupSizes(core.heads, core.groups)), core.groups, { dim: 1 }));
  const qs = split({ name: core.q });
  const kts = split({ name: core.kt });
  // [V | 1]: V with a column of ones appended (Pad's constant value), for dP − D in one product.
  const vOnes = split(g.node('Pad', [{ name: core.v }, g.int64s([0, 0, 0, 0, 0, 0, 0, 1]), g.scalar(1)], {})[0]!);
  const dOuts = split(dOut);
  const negDs = split(g.neg(d));
  const all4 = [0, 1, 2, 3];
  const swap = [0, 1, 3, 2];
  const gq: Value[] = [];
  const gkt: Value[] = [];
  const gv: Value[] = [];
  let previous: Value[] = [d];
  for (let i = 0; i < core.groups; i++) {
    let p: Value;
    let dOutI = dOuts[i]!;
    if (core.keep) {
      p = core.groups === 1 ? { name: core.probs } : forwardProbs![i]!;
    } else {
      const sums = previous.map((v) => g.reduceSum(v, { dims: all4, keepdim: false }));
      const after = g.mul(sums.reduce((a, b) => g.add(a, b)), g.scalar(0));
      const q = g.add(qs[i]!, after);
      const scaled = g.mul(g.matmul(q, kts[i]!), scale);
      p = g.softmax(core.bias === undefined ? scaled : g.add(scaled, { name: core.bias }), { dim: -1 });
      // dP waits for the previous group too: it depends on backward values only, and without this
      // ONNX Runtime computed every group's dP − D first and held them all (8 N×M tensors at level 0).
      dOutI = g.add(dOutI, after);
    }
    const dPMinusD = g.matmul(g.concat([dOutI, negDs[i]!], { dim: -1 }), g.transpose(vOnes[i]!, swap));
    const dS = g.mul(g.mul(p, dPMinusD), scale);
    previous = [];
    if (wants.v) previous.push(g.matmul(g.transpose(p, swap), dOuts[i]!));
    if (wants.kt) previous.push(g.matmul(g.transpose(qs[i]!, swap), dS));
    if (wants.q) previous.push(g.matmul(dS, g.transpose(kts[i]!, swap)));
    if (wants.v) gv.push(previous[0]!);
    if (wants.kt) gkt.push(previous[wants.v ? 1 : 0]!);
    if (wants.q) gq.push(previous[previous.length - 1]!);
  }
  const join = (parts: Value[]): Value => (parts.length === 1 ? parts[0]! : g.concat(parts, { dim: 1 }));
  return {
    ...(wants.q ? { q: join(gq) } : {}),
    ...(wants.kt ? { kt: join(gkt) } : {}),
    ...(wants.v ? { v: join(gv) } : {}),
  };
}
