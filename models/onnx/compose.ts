/**
 * Graph composition: append a second graph that reads values of the first (by name), e.g. a loss
 * built on the UNet's map outputs, so the VJP builder can differentiate both as one forward graph.
 */
import { ModelError } from '../errors.ts';
import type { ConstantDecl, Graph } from './builder.ts';

/**
 * `base` followed by `extra`. Inputs of `extra` that name a value of `base` (an input, a node output
 * or a constant) read that value; its other inputs become inputs of the result. `extra`'s nodes and
 * intermediate values get `prefix` so nothing collides, its constants are renumbered after base's
 * (or share an equal one); its outputs keep their names and are appended to `base`'s. `extra` may
 * not declare parameters.
 */
export function appendGraph(base: Graph, extra: Graph, prefix: string): Graph {
  if (extra.params.length > 0) throw new ModelError('GRAPH_BUILD', `appendGraph: ${extra.name} declares parameters`, { graph: extra.name });
  const values = new Set([...base.inputs.map((i) => i.name), ...base.nodes.flatMap((n) => n.outputs), ...base.constants.map((c) => c.name)]);
  const outputs = new Set(extra.outputs.map((o) => o.name));
  for (const o of outputs) if (values.has(o)) throw new ModelError('GRAPH_BUILD', `appendGraph: output ${o} of ${extra.name} already names a value of ${base.name}`, { output: o });
  const rename = new Map<string, string>();
  // Constants as the graph builder names them (const_<index>, one per distinct content), so the
  // result can be rebuilt by the VJP builder: equal contents share base's constant.
  const key = (c: ConstantDecl) => `${c.dtype}|${c.shape.join(',')}|${Buffer.from(c.bytes).toString('base64')}`;
  const existing = new Map(base.constants.map((c) => [key(c), c.name]));
  const added: ConstantDecl[] = [];
  for (const c of extra.constants) {
    const hit = existing.get(key(c));
    if (hit !== undefined) {
      rename.set(c.name, hit);
      continue;
    }
    const name = `const_${base.constants.length + added.length}`;
    if (values.has(name)) throw new ModelError('GRAPH_BUILD', `appendGraph: ${base.name} already has a value ${name}`, { value: name });
    added.push({ ...c, name });
    existing.set(key(c), name);
    rename.set(c.name, name);
  }
  for (const n of extra.nodes) for (const o of n.outputs) if (!outputs.has(o)) rename.set(o, `${prefix}${o}`);
  const r = (v: string) => (v === '' ? v : (rename.get(v) ?? v));
  return {
    ...base,
    inputs: [...base.inputs, ...extra.inputs.filter((i) => !values.has(i.name))],
    outputs: [...base.outputs, ...extra.outputs],
    nodes: [...base.nodes, ...extra.nodes.map((n) => ({ ...n, name: `${prefix}${n.name}`, inputs: n.inputs.map(r), outputs: n.outputs.map(r) }))],
    constants: [...base.constants, ...added],
  };
}
