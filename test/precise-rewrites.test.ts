/**
 * The WebGPU precision rewrites (models/onnx/precise-rewrites.ts): two-pass norms compute the same
 * function as ONNX Runtime's fused CPU kernels and, on WebGPU, remove the one-pass variance error of
 * the fused WebGPU kernels on inputs with a large mean; range-reduced sin/cos equal the exact sine
 * and cosine of timestep-embedding arguments (up to 1000 rad) on the CPU, and beat the WebGPU
 * kernels there.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { OrtSession, probeWebGpu } from '../models/runtime.ts';
import type { Graph, Value } from '../models/onnx/builder.ts';
import { Ops } from '../models/onnx/ops.ts';
import { serializeModel } from '../models/onnx/serialize.ts';
import { rangeReducedTrig, twoPassNorms } from '../models/onnx/precise-rewrites.ts';
import { SeededRandom } from '../bench/seeded-random.ts';

interface Case {
  readonly label: string;
  readonly shape: number[];
  readonly build: (g: Ops, x: Value) => Value;
}

const affine = (g: Ops, n: number, seed: number) => {
  const w = new Float32Array(n);
  const b = new Float32Array(n);
  new SeededRandom(seed, 'w').fillUniform(w, 1);
  new SeededRandom(seed, 'b').fillUniform(b, 1);
  return { w: g.floats([n], w), b: g.floats([n], b) };
};

const CASES: Case[] = [
  {
    label: 'GroupNorm (InstanceNormalization on (B, G, L)), 64 channels in 32 groups',
    shape: [2, 64, 16, 16],
    build: (g, x) => {
      const { w, b } = affine(g, 64, 1);
      return g.groupNorm(x, w, b, { groups: 32, channels: 64, eps: 1e-5 });
    },
  },
  {
    label: 'LayerNorm over the last axis',
    shape: [2, 256, 64],
    build: (g, x) => {
      const { w, b } = affine(g, 64, 2);
      return g.layerNorm(x, w, b, { eps: 1e-5 });
    },
  },
];

function graphOf(c: Case): Graph {
  const g = new Ops('norm');
  const x = g.input('x', 'float32', c.shape);
  g.output(c.build(g, x), 'y', 'float32', c.shape);
  return g.finish();
}

const bytes = (graph: Graph) => serializeModel(graph, () => assert.fail('no parameters'));

/** Values with mean `mean` and spread ~1: where a one-pass variance cancels. */
function input(c: Case, mean: number) {
  const data = new Float32Array(c.shape.reduce((a, b) => a * b, 1));
  new SeededRandom(7, c.label).fillUniform(data, 1.7);
  for (let i = 0; i < data.length; i++) data[i] = data[i]! + mean;
  return { dtype: 'float32' as const, shape: c.shape, data };
}

async function run(model: Uint8Array, device: 'cpu' | 'webgpu', x: { dtype: 'float32'; shape: number[]; data: Float32Array }): Promise<{ y: Float32Array; device: string }> {
  const s = await OrtSession.create(model, { device });
  try {
    return { y: (await s.run({ x })).y!.data as Float32Array, device: s.choice.device };
  } finally {
    await s.dispose();
  }
}

const maxAbs = (a: Float32Array, b: Float32Array) => a.reduce((m, v, i) => Math.max(m, Math.abs(v - b[i]!)), 0);

const status = await probeWebGpu();

describe('two-pass norms', () => {
  for (const c of CASES) {
    test(`${c.label}: the rewrite equals the fused CPU kernel (mean 50) and replaces every norm node`, async () => {
      const graph = graphOf(c);
      const rewritten = twoPassNorms(graph);
      assert.ok(graph.nodes.some((n) => n.opType === 'InstanceNormalization' || n.opType === 'LayerNormalization'));
      assert.ok(!rewritten.nodes.some((n) => n.opType === 'InstanceNormalization' || n.opType === 'LayerNormalization'));
      const x = input(c, 50);
      const fused = await run(bytes(graph), 'cpu', x);
      const twoPass = await run(bytes(rewritten), 'cpu', x);
      // The normalised values are O(1); float32 rounding of the mean of 512 values near 50 is ~4e-6.
      assert.ok(maxAbs(fused.y, twoPass.y) < 2e-5, `max |Δ| ${maxAbs(fused.y, twoPass.y)}`);
    });
  }

  test(
    'on WebGPU the two-pass form matches the CPU where the fused kernels do not (mean 50)',
    { skip: status.available ? false : 'skipped: no WebGPU adapter' },
    async () => {
      for (const c of CASES) {
        const graph = graphOf(c);
        const x = input(c, 50);
        const reference = (await run(bytes(graph), 'cpu', x)).y;
        const fused = await run(bytes(graph), 'webgpu', x);
        const twoPass = await run(bytes(twoPassNorms(graph)), 'webgpu', x);
        assert.equal(twoPass.device, 'webgpu');
        const before = maxAbs(reference, fused.y);
        const after = maxAbs(reference, twoPass.y);
        assert.ok(after < 2e-5, `${c.label}: two-pass on WebGPU max |Δ| ${after} (fused: ${before})`);
        assert.ok(after * 5 < before, `${c.label}: the rewrite should beat the fused WebGPU kernel (${after} vs ${before})`);
      }
    },
  );
});

/** Arguments like the UNet's timestep embedding: t ∈ [0, 1000) times frequencies in (0, 1]. */
function trigArgs(): Float32Array {
  const x = new Float32Array(4096);
  for (let i = 0; i < x.length; i++) x[i] = Math.fround(((i * 7919) % 1000) * Math.fround(Math.exp(-Math.log(10000) * (i % 160) / 160)) + (i % 3) * 0.37);
  return x;
}

function trigGraph(): Graph {
  const g = new Ops('trig');
  const x = g.input('x', 'float32', [4096]);
  g.output(g.concat([g.sin(x), g.cos(x)], { dim: 0 }), 'y', 'float32', [8192]);
  return g.finish();
}

describe('range-reduced sin and cos', () => {
  const x = trigArgs();
  const exact = Float32Array.from([...x].map(Math.sin).concat([...x].map(Math.cos)));
  const feed = { dtype: 'float32' as const, shape: [4096], data: x };

  test('the reduced form equals the exact sine and cosine of the float32 arguments on the CPU', async () => {
    const rewritten = rangeReducedTrig(trigGraph());
    assert.equal(rewritten.nodes.filter((n) => n.opType === 'Round').length, 2);
    const y = (await run(bytes(rewritten), 'cpu', feed)).y;
    assert.ok(maxAbs(y, exact) < 1e-6, `max |Δ| ${maxAbs(y, exact)}`);
  });

  test('on WebGPU the reduced form is exact where the kernels are not', { skip: status.available ? false : 'skipped: no WebGPU adapter' }, async () => {
    const plain = await run(bytes(trigGraph()), 'webgpu', feed);
    const reduced = await run(bytes(rangeReducedTrig(trigGraph())), 'webgpu', feed);
    assert.equal(reduced.device, 'webgpu');
    assert.ok(maxAbs(reduced.y, exact) < 2e-6, `reduced: max |Δ| ${maxAbs(reduced.y, exact)} (plain kernels: ${maxAbs(plain.y, exact)})`);
    assert.ok(maxAbs(reduced.y, exact) * 5 < maxAbs(plain.y, exact), `the rewrite should beat the plain WebGPU kernels (${maxAbs(reduced.y, exact)} vs ${maxAbs(plain.y, exact)})`);
  });
});
