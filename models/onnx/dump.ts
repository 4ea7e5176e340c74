/**
 * A reviewable text dump of a graph: inputs, outputs, parameters and constants with shapes, and one
 * line per node. Tests and `chorus debug` commands use it; diffs of it stay meaningful because the
 * builder is deterministic.
 */
import type { AttrValue, Graph } from './builder.ts';

function formatAttr(a: AttrValue): string {
  switch (a.kind) {
    case 'int':
    case 'float':
      return String(a.value);
    case 'string':
      return JSON.stringify(a.value);
    case 'ints':
    case 'floats':
      return `[${a.value.join(', ')}]`;
    case 'graph':
      return `graph ${a.value.name} (${a.value.nodes.length} nodes → ${a.value.outputs.map((o) => o.name).join(', ')})`;
  }
}

export function dumpGraph(graph: Graph): string {
  const lines: string[] = [`graph ${graph.name} (opset ${graph.opset})`];
  for (const i of graph.inputs) lines.push(`input  ${i.name}: ${i.dtype}[${(i.shape ?? []).join(', ')}]`);
  for (const o of graph.outputs) lines.push(`output ${o.name}: ${o.dtype}${o.shape === undefined ? '' : `[${o.shape.join(', ')}]`}`);
  for (const p of graph.params) lines.push(`param  ${p.name}: ${p.dtype}[${p.shape.join(', ')}]${p.transposed ? ` (stored [${p.storedShape.join(', ')}])` : ''}`);
  for (const c of graph.constants) lines.push(`const  ${c.name}: ${c.dtype}[${c.shape.join(', ')}]`);
  for (const n of graph.nodes) {
    const attrs = n.attributes.map(([k, v]) => `${k}=${formatAttr(v)}`).join(' ');
    const op = n.domain === '' ? n.opType : `${n.domain}.${n.opType}`;
    lines.push(`${n.outputs.join(', ')} = ${op}(${n.inputs.join(', ')})${attrs === '' ? '' : ' {' + attrs + '}'}`);
  }
  return lines.join('\n') + '\n';
}
