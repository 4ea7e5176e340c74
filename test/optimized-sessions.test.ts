/**
 * ONNX Runtime's optimized copies of a session (`SessionCreateOptions.optimizedCache`,
 * `Sd15Engine.expectSessionRebuilds`): written once, loaded afterwards without the source, the same
 * outputs; a broken copy is rebuilt; copies beyond the disk budget are pruned, least recently used
 * first; the engine writes none unless rebuilds are expected; ONNX Runtime's copies of graphs with
 * control-flow branches are repaired so they load.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { OrtSession, optimizedCacheFiles, optimizedCachePath, pruneOptimizedCopies } from '../models/runtime.ts';
import { Ops } from '../models/onnx/ops.ts';
import { repairOptimizedModel, serializeModel } from '../models/onnx/serialize.ts';
import type { Graph, NodeDecl, ParamDecl } from '../models/onnx/builder.ts';
import { Sd15Engine, ntXentFeeds, type Tensor } from '../models/index.ts';
import { FIXTURES, REF, assertClose, refCases } from './fixtures.ts';
import { openSafetensors } from '../models/safetensors.ts';

/** The If nodes of an ONNX model file: their outputs and the `domain:op` of every node of their then branch (a minimal protobuf walk). */
function ifBranches(bytes: Uint8Array): Array<{ outputs: string[]; thenOps: string[] }> {
  const fields = (b: Uint8Array): Array<[number, Uint8Array | number]> => {
    const out: Array<[number, Uint8Array | number]> = [];
    let i = 0;
    const varint = () => {
      let v = 0;
      for (let s = 1; ; s *= 128) {
        const c = b[i++]!;
        v += (c & 127) * s;
        if (c < 128) return v;
      }
    };
    while (i < b.length) {
      const key = varint();
      const wire = key % 8;
      if (wire === 0) out.push([Math.floor(key / 8), varint()]);
      else if (wire === 2) {
        const n = varint();
        out.push([Math.floor(key / 8), b.subarray(i, i + n)]);
        i += n;
      } else i += wire === 5 ? 4 : 8;
    }
    return out;
  };
  const text = (v: Uint8Array | number) => Buffer.from(v as Uint8Array).toString('utf8');
  const nodes = (graph: Uint8Array) => fields(graph).filter(([f]) => f === 1).map(([, v]) => fields(v as Uint8Array));
  const graph = fields(bytes).find(([f]) => f === 7)![1] as Uint8Array;
  return nodes(graph)
    .filter((n) => n.some(([f, v]) => f === 4 && text(v) === 'If'))
    .map((n) => {
      const then = n.filter(([f]) => f === 5).map(([, v]) => fields(v as Uint8Array)).find((a) => a.some(([f, v]) => f === 1 && text(v) === 'then_branch'))!;
      const thenGraph = then.find(([f]) => f === 6)![1] as Uint8Array;
      return {
        outputs: n.filter(([f]) => f === 2).map(([, v]) => text(v)),
        thenOps: nodes(thenGraph).map((m) => `${text(m.find(([f]) => f === 7)?.[1] ?? new Uint8Array())}:${text(m.find(([f]) => f === 4)![1])}`),
      };
    });
}

/** A 3×3 conv with a 16 × 8 × 3 × 3 weight (4.6 kB, above the copy's external-data threshold), then a SiLU. */
function convModel(): Uint8Array {
  const g = new Ops('conv');
  const x = g.input('x', 'float32', [1, 8, 6, 6]);
  const w = g.param('w', [16, 8, 3, 3]);
  const y = g.node('Conv', [x, w], { pads: { kind: 'ints', value: [1, 1, 1, 1] } })[0]!;
  g.output(g.silu(y), 'y', 'float32', undefined);
  const weight = Float32Array.from({ length: 16 * 8 * 9 }, (_, i) => Math.sin(i * 0.37) * 0.2);
  return serializeModel(g.finish(), () => ({ dtype: 'float32', data: { kind: 'raw', bytes: new Uint8Array(weight.buffer) } }));
}

const input = { x: { dtype: 'float32' as const, shape: [1, 8, 6, 6], data: Float32Array.from({ length: 288 }, (_, i) => Math.cos(i * 0.11)) } };

async function runOnce(model: string, options: Parameters<typeof OrtSession.create>[1]): Promise<Float32Array> {
  const s = await OrtSession.create(model, options);
  try {
    return (await s.run(input)).y!.data as Float32Array;
  } finally {
    await s.dispose();
  }
}

/** A temporary folder holding `name` (the conv model) and its output built without a copy; removed afterwards. */
async function withSource(name: string, body: (s: { dir: string; source: string; copy: string; reference: Float32Array }) => Promise<void>): Promise<void> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'chorus-opt-'));
  try {
    const source = path.join(dir, name);
    fs.writeFileSync(source, convModel());
    const reference = await runOnce(source, { device: 'cpu' });
    await body({ dir, source, copy: optimizedCachePath(source), reference });
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

describe('optimized copies of a session', () => {
  test('the first build writes the copy, later builds load it without the source, same outputs', async () => {
    await withSource('graph-abc.onnx', async ({ dir, source, copy, reference }) => {
      assert.match(path.basename(copy), /^graph-abc\.opt-[0-9a-f]{12}\.onnx$/);
      assert.ok(!fs.existsSync(copy));

      assert.deepEqual(await runOnce(source, { device: 'cpu', optimizedCache: copy }), reference);
      for (const f of optimizedCacheFiles(copy)) assert.ok(fs.existsSync(f), `${path.basename(f)} written`);
      assert.ok(fs.statSync(`${copy}.bin`).size >= 16 * 8 * 9 * 4, 'the weight went to the copy\'s data file');
      assert.deepEqual(fs.readdirSync(dir).filter((f) => f.endsWith('.partial')), [], 'no partial file left');

      // The source is gone: only the copy can serve this build.
      fs.rmSync(source);
      assert.deepEqual(await runOnce(source, { device: 'cpu', optimizedCache: copy }), reference);
    });
  });

  test('a copy that does not load is deleted and written again from the source', async () => {
    await withSource('graph-def.onnx', async ({ source, copy, reference }) => {
      await runOnce(source, { device: 'cpu', optimizedCache: copy });
      const good = fs.readFileSync(copy);
      fs.writeFileSync(copy, good.subarray(0, Math.floor(good.length / 3))); // truncated, as by a crash
      assert.deepEqual(await runOnce(source, { device: 'cpu', optimizedCache: copy }), reference);
      assert.deepEqual(fs.readFileSync(copy), good, 'rewritten whole');
    });
  });

  test('a copy that cannot be written does not fail the build', async () => {
    await withSource('graph-fed.onnx', async ({ dir, source, copy, reference }) => {
      fs.mkdirSync(`${copy}.bin`); // ONNX Runtime cannot write its data file there
      assert.deepEqual(await runOnce(source, { device: 'cpu', optimizedCache: copy }), reference);
      assert.ok(!fs.existsSync(copy), 'no copy');
      assert.deepEqual(fs.readdirSync(dir).filter((f) => f.endsWith('.partial')), [], 'no partial file left');
    });
  });

  test('pruning keeps the most recently used copies within the budget and never the one in use', () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'chorus-opt-'));
    try {
      const component = path.join(dir, 'unet-1234');
      fs.mkdirSync(component);
      fs.writeFileSync(path.join(component, 'weights.bin'), Buffer.alloc(5000)); // not a copy: never touched
      const make = (name: string, bytes: number, ageSeconds: number) => {
        const file = path.join(component, `${name}.opt-0123456789ab.onnx`);
        fs.writeFileSync(file, Buffer.alloc(100));
        fs.writeFileSync(`${file}.bin`, Buffer.alloc(bytes));
        const t = new Date(Date.now() - ageSeconds * 1000);
        for (const f of optimizedCacheFiles(file)) fs.utimesSync(f, t, t);
        return file;
      };
      const newest = make('graph-a', 1000, 10);
      const middle = make('graph-b', 1000, 20);
      const oldest = make('graph-c', 1000, 30);
      const inUse = make('graph-d', 1000, 40);
      assert.deepEqual(pruneOptimizedCopies(dir, 2300, [inUse]), [oldest]);
      assert.deepEqual(fs.readdirSync(component).sort(), ['graph-a.opt-0123456789ab.onnx', 'graph-a.opt-0123456789ab.onnx.bin', 'graph-b.opt-0123456789ab.onnx', 'graph-b.opt-0123456789ab.onnx.bin', 'graph-d.opt-0123456789ab.onnx', 'graph-d.opt-0123456789ab.onnx.bin', 'weights.bin']);
      // The leftovers of a write that never completed go once they are an hour old.
      const stale = path.join(component, 'graph-e.opt-0123456789ab.onnx');
      const recent = path.join(component, 'graph-f.opt-0123456789ab.onnx');
      for (const [file, age] of [[stale, 7200], [recent, 60]] as const) {
        fs.writeFileSync(`${file}.partial`, Buffer.alloc(10));
        fs.writeFileSync(`${file}.bin`, Buffer.alloc(10));
        const t = new Date(Date.now() - age * 1000);
        fs.utimesSync(`${file}.partial`, t, t);
      }
      assert.deepEqual(pruneOptimizedCopies(dir, 1100), [`${stale}.partial`, middle, inUse]);
      assert.ok(!fs.existsSync(`${stale}.bin`) && fs.existsSync(`${recent}.partial`) && fs.existsSync(`${recent}.bin`));
      assert.ok(fs.existsSync(newest));
      assert.deepEqual(pruneOptimizedCopies(path.join(dir, 'missing'), 0), []);
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe('repairing what ONNX Runtime writes for control-flow branches', () => {
  /**
   * The two defects of ONNX Runtime 1.30's optimized copies, built by hand: an `If` whose then-branch
   * lists its initializer `w` twice and defines `dup`, a name the main graph defines too. The
   * branch computes dup = x·w, r = dup + dup (6x with w = 3; 4x if `dup` were the main graph's x + x).
   */
  function brokenModel(): Uint8Array {
    const w: ParamDecl = { name: 'w', shape: [1], storedShape: [1], transposed: false, dtype: 'float32' };
    const node = (name: string, opType: string, inputs: string[], outputs: string[], attributes: NodeDecl['attributes'] = []): NodeDecl => ({ name, opType, domain: '', inputs, outputs, attributes });
    const graph: Graph = {
      name: 'broken',
      opset: 17,
      inputs: [
        { name: 'x', dtype: 'float32', shape: [2] },
        { name: 'cond', dtype: 'bool', shape: [] },
      ],
      outputs: [
        { name: 'r', dtype: 'float32', shape: undefined },
        { name: 'dup', dtype: 'float32', shape: [2] },
      ],
      nodes: [
        node('outer', 'Add', ['x', 'x'], ['dup']),
        node('if', 'If', ['cond'], ['r'], [
          ['else_branch', { kind: 'graph', value: { name: 'else', nodes: [node('copy', 'Identity', ['x'], ['r.else'])], outputs: [{ name: 'r.else', dtype: 'float32', shape: undefined }] } }],
          ['then_branch', { kind: 'graph', value: { name: 'then', nodes: [node('scale', 'Mul', ['x', 'w'], ['dup']), node('twice', 'Add', ['dup', 'dup'], ['r.then'])], outputs: [{ name: 'r.then', dtype: 'float32', shape: undefined }], params: [w, w] } }],
        ]),
      ],
      params: [],
      constants: [],
    };
    return serializeModel(graph, () => ({ dtype: 'float32', data: { kind: 'raw', bytes: new Uint8Array(Float32Array.of(3).buffer) } }));
  }

  test('duplicate branch initializers are dropped and a branch value shadowing an outer one is renamed, meaning kept', async () => {
    const broken = brokenModel();
    await assert.rejects(OrtSession.create(broken, { device: 'cpu' }), /not unique|SSA|Duplicate/i);
    const repaired = repairOptimizedModel(broken);
    assert.ok(repaired !== undefined);
    assert.equal(repairOptimizedModel(repaired), undefined, 'a repaired model needs no repair');
    const session = await OrtSession.create(repaired, { device: 'cpu' });
    try {
      const x: Tensor<'float32'> = { dtype: 'float32', shape: [2], data: Float32Array.of(1, -2) };
      const run = async (cond: boolean) => session.run({ x, cond: { dtype: 'bool', shape: [], data: Uint8Array.of(cond ? 1 : 0) } });
      const yes = await run(true);
      assert.deepEqual([...yes.r!.data], [6, -12], 'the branch reads its own dup (x·w), not the main graph\'s (x + x)');
      assert.deepEqual([...yes.dup!.data], [2, -4]);
      assert.deepEqual([...(await run(false)).r!.data], [1, -2]);
    } finally {
      await session.dispose();
    }
    // A model without branches is left alone.
    assert.equal(repairOptimizedModel(convModel()), undefined);
  });
});

describe('engine: optimized copies of the UNet sessions (tiny fixture model)', () => {
  const copiesIn = (dir: string) => fs.readdirSync(dir, { recursive: true, encoding: 'utf8' }).filter((f) => /\.opt-[0-9a-f]+\.onnx$/.test(f));
  const c = refCases('vjp').find((k) => k.id === 'vjp/b1_t500')!;
  const ref = openSafetensors(path.join(REF, 'vjp.safetensors'));
  const read = (k: string) => ref.readFloat32(c.inputs[k]!.key);
  const unet = { sample: read('sample'), timestep: read('timestep'), encoderHiddenStates: read('encoder_hidden_states') };
  const cot = { xattn: read('cot_x'), selfattn: read('cot_s') };
  ref.close();

  test('none written unless rebuilds are expected; then each UNet session build writes one, and a rebuild loads it with the same outputs', async () => {
    const cacheDir = fs.mkdtempSync(path.join(os.tmpdir(), 'chorus-opt-engine-'));
    const engine = Sd15Engine.open(path.join(FIXTURES, 'tiny-sd15'), { device: 'cpu', cacheDir });
    try {
      const forward = await engine.runUnet(unet);
      const gradient = await engine.runUnetVjp(unet, cot);
      assert.deepEqual(copiesIn(cacheDir), [], 'no copy without expected rebuilds');

      engine.expectSessionRebuilds();
      engine.releaseUnetSessions();
      await engine.releaseGradientSessions();
      assert.deepEqual((await engine.runUnet(unet)).noise_pred!.data, forward.noise_pred!.data);
      assert.deepEqual((await engine.runUnetVjp(unet, cot)).gradSample.data, gradient.gradSample.data);
      const written = copiesIn(cacheDir);
      assert.equal(written.length, 2, `one copy per UNet graph: ${written.join(', ')}`);

      // Rebuilt from the copies, whether or not rebuilds are still expected: remove the source graphs to prove it.
      engine.expectSessionRebuilds(false);
      engine.releaseUnetSessions();
      await engine.releaseGradientSessions();
      for (const f of fs.readdirSync(cacheDir, { recursive: true, encoding: 'utf8' })) if (/graph-[0-9a-f]+\.onnx$/.test(f)) fs.rmSync(path.join(cacheDir, f));
      assert.deepEqual((await engine.runUnet(unet)).noise_pred!.data, forward.noise_pred!.data);
      assert.deepEqual((await engine.runUnetVjp(unet, cot)).gradSample.data, gradient.gradSample.data);
      // Rebuilds no longer expected: a new graph gets no copy.
      await engine.runUnet(unet, { attentionMaps: { level: 2 } });
      assert.equal(copiesIn(cacheDir).length, 2);
    } finally {
      await engine.dispose();
      fs.rmSync(cacheDir, { recursive: true, force: true });
    }
  });

  test('the one-pass gradient graph (ε in an If branch): its copy loads, with the same loss, gradient and ε, skipped or not', async () => {
    const cacheDir = fs.mkdtempSync(path.join(os.tmpdir(), 'chorus-opt-engine-'));
    const engine = Sd15Engine.open(path.join(FIXTURES, 'tiny-sd15'), { device: 'cpu', cacheDir });
    // Two "slots" (a CFG pair each) of the same sample; the loss contrasts tokens 1, 2 (group 0) with 3 (group 1).
    const twice = (t: Tensor<'float32'>): Tensor<'float32'> => ({ dtype: 'float32', shape: [4, ...t.shape.slice(1)], data: Float32Array.from({ length: 4 * t.data.length }, (_, i) => t.data[i % t.data.length]! * (1 + 0.01 * Math.floor(i / t.data.length))) });
    const input = { sample: twice(unet.sample), timestep: unet.timestep, encoderHiddenStates: twice(unet.encoderHiddenStates) };
    const entries = [{ slot: 0, token: 1, label: 0 }, { slot: 1, token: 2, label: 0 }, { slot: 0, token: 3, label: 1 }, { slot: 1, token: 3, label: 1 }];
    const feeds = ntXentFeeds(entries, 1, unet.encoderHiddenStates.shape[1]!);
    const empty: Tensor<'float32'> = { dtype: 'float32', shape: [0], data: new Float32Array() };
    const call = (skip: boolean, skipGradient = false) =>
      engine.runUnetVjp(input, { xattn: empty, selfattn: empty }, undefined, { ntxent: { temperature: 0.5, feeds, noisePred: true, ...(skip ? { skipNoisePred: true } : {}), ...(skipGradient ? { skipGradient: true } : {}) } });
    try {
      engine.expectSessionRebuilds();
      const [whole, skipped, forwardOnly] = [await call(false), await call(true), await call(false, true)];
      // The backward skipped: the same ε and maps, no gradient.
      assert.deepEqual(forwardOnly.noisePred!.data, whole.noisePred!.data);
      assert.deepEqual(forwardOnly.xattn.data, whole.xattn.data);
      assert.deepEqual(forwardOnly.gradSample.shape, [0]);
      await assert.rejects(call(true, true), /neither ε nor the gradient/);
      assert.equal(whole.noisePred?.shape.join(','), input.sample.shape.join(','));
      assert.equal(skipped.noisePred, undefined, 'no ε when skipped');
      assert.deepEqual(skipped.gradSample.data, whole.gradSample.data);
      assert.ok(Number.isFinite(whole.ntxentLoss!.data[0]!) && whole.gradSample.data.some((v) => v !== 0));
      const written = copiesIn(cacheDir);
      assert.equal(written.length, 1);
      // ONNX Runtime's own file has each branch initializer twice and reuses generated names: it
      // does not load without the repair (`repairOptimizedModel`); the repaired copy does.
      const copy = path.join(cacheDir, written[0]!);
      const inode = fs.statSync(copy).ino;
      // Two branches: ε, and the backward, whose convolutions (flipped kernels folded inside the
      // branch) ONNX Runtime runs in its blocked NCHWc layout, as it does outside a branch.
      const branches = ifBranches(fs.readFileSync(copy));
      assert.deepEqual(branches.map((b) => b.outputs).sort(), [['grad_sample'], ['noise_pred']]);
      for (const b of branches) {
        const convs = b.thenOps.filter((op) => op.endsWith(':Conv'));
        assert.ok(convs.length > 0 && convs.every((op) => op === 'com.microsoft.nchwc:Conv'), `${b.outputs[0]}: ${convs.filter((op) => op !== 'com.microsoft.nchwc:Conv').length} of ${convs.length} convolutions not NCHWc`);
      }
      await (await OrtSession.create(copy, { device: 'cpu' })).dispose();
      await engine.releaseGradientSessions();
      const [again, againSkipped] = [await call(false), await call(true)];
      assert.equal(fs.statSync(copy).ino, inode, 'the rebuild loaded the copy (a copy that fails to load is replaced)');
      assert.deepEqual(again.noisePred!.data, whole.noisePred!.data);
      assert.deepEqual(again.gradSample.data, whole.gradSample.data);
      assert.deepEqual(again.ntxentLoss!.data, whole.ntxentLoss!.data);
      assert.deepEqual(againSkipped.gradSample.data, whole.gradSample.data);
      assert.deepEqual((await call(false, true)).noisePred!.data, whole.noisePred!.data);
      // ε equals the forward pass's.
      const forward = await engine.runUnet(input);
      assertClose(whole.noisePred!.data, forward.noise_pred!.data, 1e-5, 'one-pass ε vs forward');
    } finally {
      await engine.dispose();
      fs.rmSync(cacheDir, { recursive: true, force: true });
    }
  });
});
