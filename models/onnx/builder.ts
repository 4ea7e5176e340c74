/**
 * A small scoped ONNX graph builder.
 *
 * - Scopes join into parameter names, so a parameter declared as `to_q.weight` inside the scopes
 *   `down_blocks.0` → `attentions.0` → … is named by its full checkpoint key.
 * - Deterministic: node and value names come from the scope path and a per-scope counter; constants
 *   are deduplicated by dtype, shape and bytes; nothing depends on time or randomness. The same
 *   definition and options give byte-identical models.
 * - Parameters are declarations (name, shape, dtype). The builder never touches files; a binder pairs
 *   declarations with tensors later (see `models/weights.ts`).
 *
 * Style: explicit `op.x(...)` calls (see `ops.ts`), named like their PyTorch counterparts.
 */
import { ModelError } from '../errors.ts';
import type { DType } from '../tensor.ts';

/** One constant in the opset we emit. Op helpers that changed across opsets assume this one. */
export const OPSET = 17;
/** IR version 8 is the one that goes with opset 17. */
export const IR_VERSION = 8;

/** A symbolic value in the graph: just a name. */
export interface Value {
  readonly name: string;
}

/** A dimension: a fixed size or a symbolic name (`batch`, `height`). */
export type Dim = number | string;

export interface IoDecl {
  readonly name: string;
  readonly dtype: DType;
  /** undefined: rank and shape unknown (debug outputs). */
  readonly shape: readonly Dim[] | undefined;
}

export interface ParamDecl {
  /** Full checkpoint key (diffusers layout), e.g. `down_blocks.0.resnets.0.conv1.weight`. */
  readonly name: string;
  /** The tensor's shape in the graph. */
  readonly shape: readonly number[];
  /** The shape as checkpoints store it (differs from `shape` when `transposed`). */
  readonly storedShape: readonly number[];
  /**
   * The graph uses the 2-D transpose of the stored tensor: linear weights are stored [out, in] and
   * used as [in, out] by MatMul, transposed once when the weights are converted (not by ONNX
   * Runtime at every session start).
   */
  readonly transposed: boolean;
  readonly dtype: DType;
}

export interface ConstantDecl {
  readonly name: string;
  readonly dtype: DType;
  readonly shape: readonly number[];
  readonly bytes: Uint8Array;
}

export type AttrValue =
  | { readonly kind: 'int'; readonly value: number }
  | { readonly kind: 'float'; readonly value: number }
  | { readonly kind: 'string'; readonly value: string }
  | { readonly kind: 'ints'; readonly value: readonly number[] }
  | { readonly kind: 'floats'; readonly value: readonly number[] }
  | { readonly kind: 'graph'; readonly value: Subgraph };

/**
 * A control-flow branch (`If`'s `then_branch`/`else_branch`): nodes that may read any value of the
 * enclosing graph by name, and the outputs it returns. Only `conditional-output.ts` makes these, as
 * the last rewrite of a graph.
 */
export interface Subgraph {
  readonly name: string;
  readonly nodes: readonly NodeDecl[];
  readonly outputs: readonly IoDecl[];
  /** Parameters only this branch reads, stored as its own initializers. */
  readonly params?: readonly ParamDecl[];
}

export interface NodeDecl {
  readonly name: string;
  readonly opType: string;
  readonly domain: string;
  /** '' marks an omitted optional input. */
  readonly inputs: readonly string[];
  readonly outputs: readonly string[];
  readonly attributes: ReadonlyArray<readonly [string, AttrValue]>;
}

/** The finished graph: plain data, ready for the serializer and the text dump. */
export interface Graph {
  readonly name: string;
  readonly opset: number;
  readonly inputs: readonly IoDecl[];
  readonly outputs: readonly IoDecl[];
  readonly nodes: readonly NodeDecl[];
  readonly params: readonly ParamDecl[];
  readonly constants: readonly ConstantDecl[];
}

export class GraphBuilder {
  readonly name: string;
  readonly #scopes: string[] = [];
  readonly #counters = new Map<string, number>();
  readonly #inputs: IoDecl[] = [];
  readonly #outputs: IoDecl[] = [];
  readonly #nodes: NodeDecl[] = [];
  readonly #params = new Map<string, ParamDecl>();
  readonly #constants = new Map<string, ConstantDecl>();
  readonly #valueNames = new Set<string>();

  constructor(name: string) {
    this.name = name;
  }

  /** The current scope path, e.g. `down_blocks.0.attentions.0`. */
  get scopePath(): string {
    return this.#scopes.join('.');
  }

  /** Run `fn` inside a named scope (a module path segment such as `resnets.0`). */
  scope<T>(name: string, fn: () => T): T {
    this.#scopes.push(name);
    try {
      return fn();
    } finally {
      this.#scopes.pop();
    }
  }

  /** A graph input. */
  input(name: string, dtype: DType, shape: readonly Dim[]): Value {
    this.#claim(name);
    this.#inputs.push({ name, dtype, shape: [...shape] });
    return { name };
  }

  /** Make `value` a graph output called `name` (an Identity node is added when names differ). */
  output(value: Value, name: string, dtype: DType, shape: readonly Dim[] | undefined): void {
    let v = value;
    if (v.name !== name) {
      this.#claim(name);
      this.#nodes.push({ name: `output/${name}`, opType: 'Identity', domain: '', inputs: [v.name], outputs: [name], attributes: [] });
      v = { name };
    }
    this.#outputs.push({ name: v.name, dtype, shape: shape === undefined ? undefined : [...shape] });
  }

  /** Declare a parameter by its local name; its full name is the scope path plus `local`. */
  param(local: string, shape: readonly number[], dtype: DType = 'float32', options: { transposed?: boolean } = {}): Value {
    const transposed = options.transposed ?? false;
    if (transposed && shape.length !== 2) throw new ModelError('GRAPH_BUILD', `${this.scopePath}: only 2-D parameters can be stored transposed (${local})`);
    const name = this.scopePath === '' ? local : `${this.scopePath}.${local}`;
    const existing = this.#params.get(name);
    if (existing !== undefined) {
      if (existing.shape.join(',') !== shape.join(',')) {
        throw new ModelError('GRAPH_BUILD', `parameter ${name} declared twice with shapes [${existing.shape.join(', ')}] and [${shape.join(', ')}]`);
      }
      return { name };
    }
    for (const d of shape) {
      if (!Number.isSafeInteger(d) || d <= 0) {
        throw new ModelError('GRAPH_BUILD', `${this.scopePath}: parameter ${local} has invalid shape [${shape.join(', ')}]`, { scope: this.scopePath, param: local });
      }
    }
    this.#claim(name);
    this.#params.set(name, { name, shape: [...shape], storedShape: transposed ? [shape[1]!, shape[0]!] : [...shape], transposed, dtype });
    return { name };
  }

  /** A constant tensor, deduplicated by dtype, shape and bytes. */
  constant(dtype: DType, shape: readonly number[], data: ArrayBufferView): Value {
    const bytes = new Uint8Array(data.buffer, data.byteOffset, data.byteLength).slice();
    const key = `${dtype}|${shape.join(',')}|${Buffer.from(bytes).toString('base64')}`;
    const hit = this.#constants.get(key);
    if (hit !== undefined) return { name: hit.name };
    const name = `const_${this.#constants.size}`;
    this.#claim(name);
    this.#constants.set(key, { name, dtype, shape: [...shape], bytes });
    return { name };
  }

  /** Emit a node; returns its outputs. `inputs` entries may be `undefined` for omitted optionals. */
  node(
    opType: string,
    inputs: ReadonlyArray<Value | undefined>,
    attributes: Record<string, AttrValue | undefined> = {},
    options: { outputs?: number; domain?: string; name?: string } = {},
  ): Value[] {
    const scope = this.scopePath;
    const base = `${scope === '' ? '' : scope + '/'}${options.name ?? opType}`;
    const count = this.#counters.get(base) ?? 0;
    this.#counters.set(base, count + 1);
    const nodeName = count === 0 ? base : `${base}_${count}`;
    const nOut = options.outputs ?? 1;
    const outputs: string[] = [];
    for (let i = 0; i < nOut; i++) {
      const out = nOut === 1 ? nodeName : `${nodeName}:${i}`;
      this.#claim(out);
      outputs.push(out);
    }
    // Trailing omitted optional inputs are dropped; interior ones become ''.
    const names = inputs.map((v) => v?.name ?? '');
    while (names.length > 0 && names[names.length - 1] === '') names.pop();
    const attrs = Object.entries(attributes)
      .filter((e): e is [string, AttrValue] => e[1] !== undefined)
      .sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));
    this.#nodes.push({ name: nodeName, opType, domain: options.domain ?? '', inputs: names, outputs, attributes: attrs });
    return outputs.map((name) => ({ name }));
  }

  /** Build-time check that names the scope in its message. */
  check(condition: boolean, message: string): void {
    if (!condition) throw new ModelError('GRAPH_BUILD', `${this.scopePath || this.name}: ${message}`, { scope: this.scopePath });
  }

  finish(): Graph {
    if (this.#outputs.length === 0) throw new ModelError('GRAPH_BUILD', `graph ${this.name} has no outputs`);
    return {
      name: this.name,
      opset: OPSET,
      inputs: [...this.#inputs],
      outputs: [...this.#outputs],
      nodes: [...this.#nodes],
      params: [...this.#params.values()],
      constants: [...this.#constants.values()],
    };
  }

  #claim(name: string): void {
    if (this.#valueNames.has(name)) throw new ModelError('GRAPH_BUILD', `duplicate value name ${name} in graph ${this.name}`);
    this.#valueNames.add(name);
  }
}

export const attr = {
  int: (value: number): AttrValue => ({ kind: 'int', value }),
  float: (value: number): AttrValue => ({ kind: 'float', value }),
  string: (value: string): AttrValue => ({ kind: 'string', value }),
  ints: (value: readonly number[]): AttrValue => ({ kind: 'ints', value }),
  floats: (value: readonly number[]): AttrValue => ({ kind: 'floats', value }),
};
