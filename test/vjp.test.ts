/**
 * The UNet VJP (models/networks/unet-vjp.ts through `Sd15Engine.runUnetVjp`) against the reference
 * gradients of tiny-sd15-ref `vjp/*`: L = Σ cot_x·xattn + Σ cot_s·selfattn on the 1/32-grid maps,
 * grad_sample = ∂L/∂sample from torch autograd (batch 1 and a CFG batch of 2, a kohya LoRA active
 * through the adapter bank, the cross-attention term alone, and the per-stage debug gradients).
 * Plus a float32 finite-difference check of the same gradient along random directions, and the
 * VJP graph's structure: what it prunes, its inputs, determinism, op coverage.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { AdapterStack, Sd15Engine, openSafetensors, type AdapterUse, type LoadedLora, type Tensor } from '../models/index.ts';
import { distinctSamples } from '../models/engine.ts';
import { parseUnetConfig } from '../models/networks/config.ts';
import { buildUnetGraph } from '../models/networks/unet.ts';
import { buildUnetMapsGraph, buildUnetNtXentVjpGraph, buildUnetVjpGraph, NTXENT_LOSS_OUTPUT, resolveAttentionBackward } from '../models/networks/unet-vjp.ts';
import { branchCreatedBytes, conditionalOutput } from '../models/onnx/conditional-output.ts';
import { Ops } from '../models/onnx/ops.ts';
import { dumpGraph } from '../models/onnx/dump.ts';
import { serializeModel } from '../models/onnx/serialize.ts';
import { gradientOutput, vjpOpTypes } from '../models/onnx/vjp.ts';
import { NON_DIFFERENTIABLE } from '../models/onnx/vjp-rules.ts';
import type { Graph } from '../models/onnx/builder.ts';
import { FIXTURES, REF, assertClose, refCases } from './fixtures.ts';

const MODEL = path.join(FIXTURES, 'tiny-sd15');
const LORAS = path.join(FIXTURES, 'tiny-sd15-lora');
const tinyUnet = () => parseUnetConfig(JSON.parse(fs.readFileSync(path.join(MODEL, 'unet/config.json'), 'utf-8')), 'unet/config.json');

/**
 * Finite-difference check of the whole tiny UNet: three seeded N(0, 1) directions, ε = 1e-3,
 * L evaluated in float64 from the float32 maps. The float32 noise of L (~1e-6, the fixtures' fp32
 * vs fp64 loss error) over 2ε is ~1e-3 of a directional derivative of order 1, so 1e-2 relative.
 */
const FD_EPS = 1e-3;
const FD_REL_TOL = 1e-2;

const dot = (a: ArrayLike<number>, b: ArrayLike<number>) => {
  let s = 0;
  for (let i = 0; i < a.length; i++) s += a[i]! * b[i]!;
  return s;
};

describe('UNet VJP matches the reference gradients (tiny-sd15-ref vjp/*)', () => {
  let engine: Sd15Engine;
  let lora: LoadedLora;
  const cacheDir = fs.mkdtempSync(path.join(os.tmpdir(), 'chorus-vjp-'));
  const ref = openSafetensors(path.join(REF, 'vjp.safetensors'));
  const cases = refCases('vjp');

  before(() => {
    engine = Sd15Engine.open(MODEL, { device: 'cpu', cacheDir });
    lora = engine.loadLora(path.join(LORAS, 'lora_kohya_a.safetensors'));
  });
  after(async () => {
    ref.close();
    await engine.dispose();
    fs.rmSync(cacheDir, { recursive: true, force: true });
  });

  const inputsOf = (c: (typeof cases)[number]) => {
    const read = (k: string) => ref.readFloat32(c.inputs[k]!.key);
    return {
      unet: { sample: read('sample'), timestep: read('timestep'), encoderHiddenStates: read('encoder_hidden_states') },
      cotangents: { xattn: read('cot_x'), selfattn: read('cot_s') },
    };
  };
  const expected = (c: (typeof cases)[number], name: string) => ref.readFloat32(c.outputs[name]!.key).data;

  test('the fixture has the four cases', () => {
    assert.deepEqual(cases.map((c) => c.id).sort(), ['vjp/b1_t500', 'vjp/b1_t500_lora_kohya_a@1.0', 'vjp/b1_t500_xattn_only', 'vjp/b2_t800_cfg']);
  });

  for (const c of cases) {
    const loraCase = c.lora !== undefined;
    const modes: readonly ('bank' | 'merged' | undefined)[] = loraCase ? ['bank', 'merged'] : [undefined];
    for (const mode of modes) {
      test(`${c.id}${mode === undefined ? '' : ` (${mode})`}: maps, loss and grad_sample`, async (t) => {
        const { unet, cotangents } = inputsOf(c);
        let adapters: AdapterUse | undefined;
        if (mode !== undefined) {
          const { multiplier } = c.lora as { multiplier: number };
          const stack = new AdapterStack([{ path: lora.path, name: lora.name, modules: lora.modules, te: multiplier, unet: multiplier }]);
          adapters = mode === 'bank' ? { mode, stack, mix: [stack.strengths('unet')] } : { mode, stack };
        }
        const out = await engine.runUnetVjp(unet, cotangents, adapters);
        const tol = c.tolerance;
        const dx = assertClose(out.xattn.data, expected(c, 'xattn'), tol.taps_atol!, `${c.id} xattn`);
        const ds = assertClose(out.selfattn.data, expected(c, 'selfattn'), tol.taps_atol!, `${c.id} selfattn`);
        const loss = dot(cotangents.xattn.data, out.xattn.data) + dot(cotangents.selfattn.data, out.selfattn.data);
        const dl = assertClose([loss], expected(c, 'loss'), tol.loss_atol!, `${c.id} loss`);
        const dg = assertClose(out.gradSample.data, expected(c, 'grad_sample'), tol.atol!, `${c.id} grad_sample`);
        assert.deepEqual(out.gradSample.shape, unet.sample.shape);
        let extra = '';
        if (c.outputs.grad_latent !== undefined) {
          // sample = cat([z, z]): dL/dz = grad_sample[0] + grad_sample[1].
          const n = out.gradSample.data.length / 2;
          const latent = Float32Array.from({ length: n }, (_, i) => out.gradSample.data[i]! + out.gradSample.data[n + i]!);
          extra = `, grad_latent ${assertClose(latent, expected(c, 'grad_latent'), tol.atol!, `${c.id} grad_latent`).toExponential(2)}`;
        }
        t.diagnostic(`max |diff|: xattn ${dx.toExponential(2)}, selfattn ${ds.toExponential(2)}, loss ${dl.toExponential(2)}, grad_sample ${dg.toExponential(2)} (atol ${tol.atol})${extra}`);
      });
    }
  }

  test('vjp/b1_t500: per-stage gradients dL/d(conv_in, down_blocks.0–2, mid_block, up_blocks.0)', async (t) => {
    const c = cases.find((k) => k.id === 'vjp/b1_t500')!;
    const { unet, cotangents } = inputsOf(c);
    const out = await engine.runUnetVjp(unet, cotangents, undefined, { debugGradients: true });
    const stages = Object.keys(c.outputs).filter((k) => k.startsWith('debug.grad.'));
    assert.equal(stages.length, 6);
    const diffs = stages.map((k) => `${k.slice(11)} ${assertClose(out.debugGradients[k]!.data, expected(c, k), c.tolerance.debug_grads_atol!, `${c.id} ${k}`).toExponential(2)}`);
    t.diagnostic(`max |diff|: ${diffs.join(', ')}`);
    // The debug variant's main output is the same gradient.
    assertClose(out.gradSample.data, expected(c, 'grad_sample'), c.tolerance.atol!, `${c.id} grad_sample (debug variant)`);
  });

  test('the gradient agrees with finite differences of L along random directions', async (t) => {
    const c = cases.find((k) => k.id === 'vjp/b1_t500')!;
    const { unet, cotangents } = inputsOf(c);
    const { gradSample } = await engine.runUnetVjp(unet, cotangents);
    const loss = async (sample: Tensor<'float32'>) => {
      const maps = await engine.runUnet({ ...unet, sample }, { attentionMaps: { level: 2 } });
      return dot(cotangents.xattn.data, maps.xattn!.data) + dot(cotangents.selfattn.data, maps.selfattn!.data);
    };
    let seed = 6400;
    const uniform = () => ((seed = (Math.imul(seed, 1103515245) + 12345) >>> 0) / 4294967296);
    const normal = () => Math.sqrt(-2 * Math.log(uniform() + 1e-12)) * Math.cos(2 * Math.PI * uniform());
    const x = unet.sample.data;
    const fd: number[] = [];
    const an: number[] = [];
    for (let k = 0; k < 3; k++) {
      const v = Float32Array.from({ length: x.length }, normal);
      const plus = Float32Array.from(x, (xi, i) => xi + FD_EPS * v[i]!);
      const minus = Float32Array.from(x, (xi, i) => xi - FD_EPS * v[i]!);
      fd.push((await loss({ ...unet.sample, data: plus })) - (await loss({ ...unet.sample, data: minus })));
      an.push(dot(gradSample.data, Float32Array.from(plus, (p, i) => p - minus[i]!)));
    }
    const norm = (a: readonly number[]) => Math.sqrt(dot(a, a));
    const rel = norm(fd.map((d, k) => d - an[k]!)) / Math.max(norm(fd), norm(an));
    const list = (a: readonly number[]) => a.map((d) => d.toExponential(5)).join(', ');
    assert.ok(rel <= FD_REL_TOL, `finite differences [${list(fd)}] vs VJP [${list(an)}]: relative error ${rel.toExponential(2)} > ${FD_REL_TOL}`);
    t.diagnostic(`finite differences [${list(fd)}], VJP [${list(an)}], relative error ${rel.toExponential(2)}`);
  });

  test('releasing the gradient sessions frees them; the next call rebuilds one and gives the same gradient', async () => {
    const { unet, cotangents } = inputsOf(cases[0]!);
    const first = await engine.runUnetVjp(unet, cotangents);
    assert.ok((await engine.releaseGradientSessions()) >= 1, 'a VJP session was released');
    assert.equal(await engine.releaseGradientSessions(), 0, 'none left');
    const again = await engine.runUnetVjp(unet, cotangents);
    assert.deepEqual(again.gradSample.data, first.gradSample.data);
  });

  test('the lean attention backwards (probabilities kept or recomputed per head) equal the per-op rules', async (t) => {
    // The engine's default (`auto`) keeps the probabilities at this size (the reference cases above
    // run that path); here the same cases through engines that recompute them and that use the
    // per-op rules, with a LoRA in the bank and batch 2.
    const others = (['recompute', 'per-op'] as const).map((mode) => [mode, Sd15Engine.open(MODEL, { device: 'cpu', cacheDir, attentionBackward: mode })] as const);
    try {
      const stack = new AdapterStack([{ path: lora.path, name: lora.name, modules: lora.modules, te: 1, unet: 1 }]);
      const diffs: string[] = [];
      for (const c of cases.filter((k) => k.id === 'vjp/b2_t800_cfg' || k.id === 'vjp/b1_t500')) {
        const { unet, cotangents } = inputsOf(c);
        const batch = unet.sample.shape[0]!;
        const adapters: AdapterUse = { mode: 'bank', stack, mix: Array.from({ length: batch }, () => stack.strengths('unet')) };
        const a = await engine.runUnetVjp(unet, cotangents, adapters);
        for (const [mode, other] of others) {
          const b = await other.runUnetVjp(unet, cotangents, adapters);
          const scale = Math.max(...b.gradSample.data.map(Math.abs));
          diffs.push(`${c.id} ${mode} ${assertClose(a.gradSample.data, b.gradSample.data, 1e-5 * scale, `${c.id}: kept vs ${mode}`).toExponential(2)} (max |grad| ${scale.toExponential(2)})`);
          assertClose(a.xattn.data, b.xattn.data, 1e-6, `${c.id}: the forward maps, kept vs ${mode}`);
        }
      }
      t.diagnostic(`max |diff| of grad_sample against the default: ${diffs.join(', ')}`);
    } finally {
      for (const [, other] of others) await other.dispose();
    }
  });

  test('mergeDuplicateSamples: a CFG pair shares its layers before the first cross-attention; the pair\'s gradient is the reference rows\' sum', async (t) => {
    const c = cases.find((k) => k.id === 'vjp/b2_t800_cfg')!;
    const { unet, cotangents } = inputsOf(c);
    const merged = await engine.runUnetVjp(unet, cotangents, undefined, { mergeDuplicateSamples: true });
    const per = unet.sample.data.length / 2;
    const want = expected(c, 'grad_sample');
    const sum = Float32Array.from(want.subarray(0, per), (v, j) => v + want[per + j]!);
    const scale = Math.max(...sum.map(Math.abs));
    const d = assertClose(merged.gradSample.data.subarray(0, per), sum, 2e-4, 'row 0: the pair\'s gradient');
    assert.ok(merged.gradSample.data.subarray(per).every((v) => v === 0), 'row 1 (the same sample) comes back as zeros: its gradient is on row 0');
    assert.deepEqual(merged.gradSample.shape, unet.sample.shape);
    assertClose(merged.xattn.data, expected(c, 'xattn'), 1e-5, 'xattn per batch element');
    assertClose(merged.selfattn.data, expected(c, 'selfattn'), 1e-5, 'selfattn per batch element');
    const separate = await engine.runUnetVjp(unet, cotangents);
    const sepSum = Float32Array.from(separate.gradSample.data.subarray(0, per), (v, j) => v + separate.gradSample.data[per + j]!);
    const e = assertClose(merged.gradSample.data.subarray(0, per), sepSum, 1e-6 * scale, 'merged vs separate rows summed');
    t.diagnostic(`vs reference sum ${d.toExponential(2)}, vs separate rows summed ${e.toExponential(2)} (max |grad| ${scale.toExponential(2)})`);
  });

  test('mergeDuplicateSamples with the adapter bank: elements merge only where sample and LoRA mix agree', async () => {
    const c = cases.find((k) => k.id === 'vjp/b2_t800_cfg')!;
    const { unet, cotangents } = inputsOf(c);
    const twice = (x: Tensor<'float32'>): Tensor<'float32'> => ({ dtype: 'float32', shape: [x.shape[0]! * 2, ...x.shape.slice(1)], data: Float32Array.from([...x.data, ...x.data]) });
    const input = { sample: twice(unet.sample), timestep: unet.timestep, encoderHiddenStates: twice(unet.encoderHiddenStates) };
    const cot = { xattn: twice(cotangents.xattn), selfattn: twice(cotangents.selfattn) };
    const stack = new AdapterStack([{ path: lora.path, name: lora.name, modules: lora.modules, te: 1, unet: 1 }]);
    const adapters: AdapterUse = { mode: 'bank', stack, mix: [[1], [1], [0.5], [0.5]] };
    const merged = await engine.runUnetVjp(input, cot, adapters, { mergeDuplicateSamples: true });
    const separate = await engine.runUnetVjp(input, cot, adapters);
    const per = unet.sample.data.length / 2;
    const row = (g: Float32Array, b: number) => g.subarray(b * per, (b + 1) * per);
    for (const [first, second] of [[0, 1], [2, 3]] as const) {
      const want = Float32Array.from(row(separate.gradSample.data, first), (v, j) => v + row(separate.gradSample.data, second)[j]!);
      const scale = Math.max(...want.map(Math.abs));
      assertClose(row(merged.gradSample.data, first), want, 1e-6 * scale, `elements ${first} and ${second} (mix ${adapters.mix[first]})`);
      assert.ok(row(merged.gradSample.data, second).every((v) => v === 0), `element ${second} merged into ${first}`);
    }
    assert.ok(Math.max(...row(merged.gradSample.data, 0).map((v, j) => Math.abs(v - row(merged.gradSample.data, 2)[j]!))) > 1e-6, 'the two mixes give different gradients (not merged across mixes)');
    assertClose(merged.xattn.data, separate.xattn.data, 1e-6, 'maps');
  });

  test('distinctSamples: equal sample rows with equal LoRA mix rows share one sample', () => {
    const t = (rows: number[][]): Tensor<'float32'> => ({ dtype: 'float32', shape: [rows.length, rows[0]!.length], data: Float32Array.from(rows.flat()) });
    assert.equal(distinctSamples(t([[1, 2], [1, 3]])), undefined, 'all distinct');
    assert.deepEqual(distinctSamples(t([[1, 2], [1, 2], [3, 4], [1, 2]])), { index: [0, 0, 1, 0], rows: [0, 2] });
    assert.deepEqual(distinctSamples(t([[1, 2], [1, 2], [1, 2], [1, 2]]), [[1], [1], [0], [0]]), { index: [0, 0, 1, 1], rows: [0, 2] });
    assert.equal(distinctSamples(t([[1, 2], [1, 2]]), [[1, 0], [0, 1]]), undefined, 'same sample, different mix');
    assert.equal(distinctSamples(t([[0, 2], [-0, 2]])), undefined, '0 and -0 are told apart (bitwise equal rows only)');
  });

  test('attentionBackward auto: kept probabilities up to KEEP_PROBS_BYTES per sample, recomputed above', () => {
    const tiny = tinyUnet();
    const sd = parseUnetConfig(JSON.parse(fs.readFileSync(path.join(FIXTURES, 'sd15-keys', 'unet_diffusers.json'), 'utf-8')).config, 'sd15 unet');
    assert.equal(resolveAttentionBackward(sd, 'auto', { height: 32, width: 32 }), 'keep', 'SD 1.5 at 256²: 8 × 1024² floats = 32 MiB');
    assert.equal(resolveAttentionBackward(sd, 'auto', { height: 40, width: 40 }), 'recompute', 'SD 1.5 at 320²: 8 × 1600² floats = 78 MiB');
    assert.equal(resolveAttentionBackward(sd, 'auto', { height: 64, width: 64 }), 'recompute', '512²: 512 MiB');
    assert.equal(resolveAttentionBackward(tiny, 'auto', { height: 32, width: 32 }), 'keep');
    assert.equal(resolveAttentionBackward(sd, 'per-op', { height: 32, width: 32 }), 'per-op', 'explicit modes are kept');
  });

  test('releasing the UNet forward sessions leaves the gradient sessions; the next forward call rebuilds its session, same output', async () => {
    const { unet, cotangents } = inputsOf(cases[0]!);
    const first = await engine.runUnet(unet, { attentionMaps: { level: 2 } });
    await engine.runUnetVjp(unet, cotangents);
    assert.ok(engine.releaseUnetSessions() >= 1, 'a forward session was released');
    assert.equal(engine.releaseUnetSessions(), 0, 'none left');
    assert.ok((await engine.releaseGradientSessions()) >= 1, 'the VJP session stayed');
    assert.deepEqual((await engine.runUnet(unet, { attentionMaps: { level: 2 } })).noise_pred!.data, first.noise_pred!.data);
  });

  test('rejects cotangents of the wrong shape, naming the input', async () => {
    const { unet, cotangents } = inputsOf(cases[0]!);
    const bad = { ...cotangents, selfattn: { ...cotangents.selfattn, shape: [1, 64, 77] } };
    await assert.rejects(engine.runUnetVjp(unet, bad), (e: Error & { code?: string }) => e.code === 'SHAPE_MISMATCH' && /cot\.selfattn|selfattn must be \[1, 64, 64\]/.test(e.message));
  });
});

describe('UNet VJP graph', () => {
  const plain = () => buildUnetVjpGraph(tinyUnet(), { level: 2 });

  test('reads the forward inputs and the cotangents, outputs the maps and grad_sample', () => {
    const g = plain();
    assert.deepEqual(g.inputs.map((i) => `${i.name}: [${i.shape?.join(', ')}]`), [
      'sample: [batch, 4, height, width]',
      'timestep: [timestep_batch]',
      'encoder_hidden_states: [batch, sequence, 32]',
      'cot.xattn: [batch, queries, sequence]',
      'cot.selfattn: [batch, queries, queries]',
    ]);
    assert.deepEqual(g.outputs.map((o) => o.name), ['xattn', 'selfattn', 'grad_sample']);
  });

  test('stops after the last map layer and differentiates only what depends on sample', () => {
    const g = plain();
    const names = g.nodes.map((n) => n.name);
    for (const pruned of ['up_blocks.1.upsamplers.', 'up_blocks.2.', 'up_blocks.3.', 'conv_norm_out', 'conv_out', 'up_blocks.1.attentions.2.transformer_blocks.0.ff', 'up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_out', 'up_blocks.1.attentions.2.proj_out']) {
      assert.ok(!names.some((n) => n.startsWith(pruned)), `${pruned} is pruned`);
    }
    assert.ok(names.includes('up_blocks.1.attentions.2.transformer_blocks.0.attn2/Softmax'));
    assert.ok(!g.params.some((p) => p.name.startsWith('conv_out.')), 'conv_out weights are not read');
    // The time embedding and the text keys/values are recomputed, not differentiated.
    assert.ok(names.some((n) => n.startsWith('time_embedding.')));
    assert.ok(!names.some((n) => n.startsWith('grad.time_embedding') || (n.startsWith('grad.') && n.includes('time_emb_proj/'))));
    assert.ok(!names.some((n) => n.startsWith('grad.') && /attn2\.to_[kv]\//.test(n)));
    // Static shapes decide every broadcast reduction (no run-time axes).
    assert.ok(!g.nodes.some((n) => n.opType === 'NonZero'));
  });

  test('the truncated forward (maps only) is the VJP graph\'s forward part', () => {
    const forward = buildUnetMapsGraph(tinyUnet(), { level: 2 });
    const vjp = plain();
    assert.deepEqual(forward.outputs.map((o) => o.name), ['xattn', 'selfattn']);
    assert.deepEqual(vjp.nodes.slice(0, forward.nodes.length), forward.nodes);
    assert.ok(vjp.nodes.slice(forward.nodes.length).every((n) => n.name.startsWith('grad') || n.name.startsWith('output/')), 'then only backward nodes');
  });

  test('CLoRA one-pass variant: truncated after the maps, or with noise_pred the whole UNet passed through', () => {
    const truncated = buildUnetNtXentVjpGraph(tinyUnet(), { level: 2, temperature: 0.5 });
    const full = buildUnetNtXentVjpGraph(tinyUnet(), { level: 2, temperature: 0.5, noisePred: true });
    assert.deepEqual(truncated.outputs.map((o) => o.name), ['xattn', NTXENT_LOSS_OUTPUT, 'grad_sample']);
    assert.deepEqual(full.outputs.map((o) => o.name), ['xattn', NTXENT_LOSS_OUTPUT, 'noise_pred', 'grad_sample']);
    // noise_pred gets no cotangent: the loss does not depend on it.
    assert.deepEqual(full.inputs.map((i) => i.name), truncated.inputs.map((i) => i.name));
    const names = (g: Graph) => g.nodes.map((n) => n.name);
    assert.ok(!names(truncated).some((n) => n.startsWith('conv_out')));
    assert.ok(names(full).some((n) => n.startsWith('up_blocks.3.') || n.startsWith('conv_out')));
    // The same backward: differentiated nodes are identical, the extra nodes are forward only.
    const grads = (g: Graph) => names(g).filter((n) => n.startsWith('grad.'));
    assert.deepEqual(grads(full), grads(truncated));
    assert.ok(!grads(full).some((n) => n.startsWith('grad.up_blocks.2') || n.startsWith('grad.conv_out')));
  });

  test('conditional noise_pred: the layers only ε needs move into an If branch; everything the gradient needs stays outside', () => {
    const full = buildUnetNtXentVjpGraph(tinyUnet(), { level: 2, temperature: 0.5, noisePred: true });
    const g = conditionalOutput(full, 'noise_pred', 'want_eps', 'sample');
    assert.deepEqual(g.inputs.at(-1), { name: 'want_eps', dtype: 'bool', shape: [] });
    assert.deepEqual(g.outputs.map((o) => o.name), full.outputs.map((o) => o.name));
    assert.deepEqual(g.outputs.find((o) => o.name === 'noise_pred')!.shape, full.outputs.find((o) => o.name === 'noise_pred')!.shape, 'skipped, the branch passes sample (same shape) through');
    const branch = g.nodes.at(-1)!;
    assert.equal(branch.opType, 'If');
    assert.deepEqual(branch.inputs, ['want_eps']);
    assert.deepEqual(branch.outputs, ['noise_pred']);
    const attr = new Map(branch.attributes);
    const then = attr.get('then_branch');
    const otherwise = attr.get('else_branch');
    assert.ok(then?.kind === 'graph' && otherwise?.kind === 'graph');
    const inside = then.value.nodes.map((n) => n.name);
    const staticValues = new Set([...full.params.map((p) => p.name), ...full.constants.map((c) => c.name)]);
    const outside = g.nodes.slice(0, -1).map((n) => n.name);
    // The tail: up_blocks.2, up_blocks.3 and conv_out (and up_blocks.1's upsampler), nothing of the backward.
    assert.ok(inside.some((n) => n.startsWith('conv_out')) && inside.some((n) => n.startsWith('up_blocks.3.')) && inside.some((n) => n.startsWith('up_blocks.2.')));
    assert.ok(inside.every((n) => !n.startsWith('grad.')));
    // A partition of the original nodes, the order kept on both sides.
    assert.deepEqual([...outside, ...inside].sort(), full.nodes.map((n) => n.name).sort());
    const order = new Map(full.nodes.map((n, i) => [n.name, i]));
    for (const side of [outside, inside]) assert.ok(side.every((n, i) => i === 0 || order.get(side[i - 1]!)! < order.get(n)!));
    // The branch's output is renamed (no shadowing); the skipped branch copies sample.
    assert.deepEqual(then.value.outputs.map((o) => o.name), ['noise_pred.computed']);
    assert.ok(then.value.nodes.some((n) => n.outputs.includes('noise_pred.computed')));
    assert.deepEqual(otherwise.value.nodes.map((n) => [n.opType, ...n.inputs]), [['Identity', 'sample']]);
    // Parameters only the branch reads are its own (ONNX Runtime's NCHWc pass rewrites only a
    // graph's own initializers); nothing foldable runs inside it.
    const local = new Set((then.value.params ?? []).map((p) => p.name));
    assert.ok(local.has('conv_out.weight') && !g.params.some((p) => local.has(p.name)));
    assert.deepEqual([...g.params.map((p) => p.name), ...local].sort(), full.params.map((p) => p.name).sort());
    const readOutside = new Set(g.nodes.flatMap((n) => n.inputs));
    assert.ok([...local].every((p) => !readOutside.has(p)));
    // Nodes of parameters and constants only go with the branch when it alone reads them (ONNX
    // Runtime folds them there: the folded values are then the branch's own, as NCHWc needs).
    for (const n of full.nodes) if (n.inputs.every((v) => v === '' || staticValues.has(v))) n.outputs.forEach((o) => staticValues.add(o));
    const foldable = then.value.nodes.filter((n) => n.inputs.every((v) => v === '' || staticValues.has(v)));
    assert.ok(foldable.length > 0 && foldable.every((n) => n.outputs.every((o) => !readOutside.has(o))));
    // Outside the branch: exactly the truncated graph's nodes.
    const truncated = new Set(buildUnetNtXentVjpGraph(tinyUnet(), { level: 2, temperature: 0.5 }).nodes.map((n) => n.name));
    const extra = outside.filter((n) => !truncated.has(n) && !n.startsWith('output/'));
    assert.deepEqual(extra, []);
    assert.ok([...truncated].every((n) => n.startsWith('output/') || outside.includes(n)));
    // Serializes (subgraph attributes) deterministically.
    const bytes = () => serializeModel(g, () => ({ dtype: 'float32', data: { kind: 'raw', bytes: new Uint8Array() } }));
    assert.deepEqual(bytes(), bytes());
    assert.throws(() => conditionalOutput(full, 'nope', 'want_eps', 'sample'), /has no output nope/);
    assert.throws(() => conditionalOutput(full, 'noise_pred', 'timestep', 'sample'), /already has a value timestep/);
    assert.throws(() => conditionalOutput(full, 'noise_pred', 'want_eps', 'ntxent.pick_cond'), /no float32 input ntxent.pick_cond/);
    assert.throws(() => conditionalOutput(full, 'xattn', 'want_eps', 'sample'), /needs no node of its own/);
  });

  test('conditional gradient: after ε, the backward moves into a second If; what the ε branch reads stays outside', () => {
    const full = buildUnetNtXentVjpGraph(tinyUnet(), { level: 2, temperature: 0.5, noisePred: true });
    const eps = conditionalOutput(full, 'noise_pred', 'want_eps', 'sample');
    const g = conditionalOutput(eps, gradientOutput('sample'), 'want_grad', 'sample');
    assert.deepEqual(g.inputs.slice(-2).map((i) => i.name), ['want_eps', 'want_grad']);
    const ifs = g.nodes.filter((n) => n.opType === 'If');
    assert.deepEqual(ifs.map((n) => n.outputs), [['noise_pred'], [gradientOutput('sample')]]);
    const branch = (n: (typeof ifs)[number], which: string) => {
      const a = new Map(n.attributes).get(which);
      assert.ok(a?.kind === 'graph');
      return a.value;
    };
    const epsThen = branch(ifs[0]!, 'then_branch');
    const gradThen = branch(ifs[1]!, 'then_branch');
    assert.deepEqual(branch(ifs[1]!, 'else_branch').nodes.map((n) => [n.opType, ...n.inputs]), [['Identity', 'sample']]);
    const outside = g.nodes.filter((n) => n.opType !== 'If');
    // The ε branch is untouched; every backward node is in the gradient branch, none outside.
    assert.deepEqual(epsThen.nodes.map((n) => n.name), branch(eps.nodes.at(-1)!, 'then_branch').nodes.map((n) => n.name));
    assert.ok(outside.every((n) => !n.name.startsWith('grad.')));
    assert.ok(eps.nodes.filter((n) => n.name.startsWith('grad.')).every((n) => gradThen.nodes.some((m) => m.name === n.name)));
    // The up path's values the ε branch reads (outer-scope references) are still computed outside,
    // though the backward reads some of them too.
    const producedOutside = new Set([...g.inputs.map((i) => i.name), ...outside.flatMap((n) => n.outputs), ...g.params.map((p) => p.name), ...g.constants.map((c) => c.name)]);
    const epsOwn = new Set([...epsThen.nodes.flatMap((n) => n.outputs), ...(epsThen.params ?? []).map((p) => p.name)]);
    const epsReads = epsThen.nodes.flatMap((n) => n.inputs).filter((v) => v !== '' && !epsOwn.has(v));
    assert.ok(epsReads.length > 0 && epsReads.every((v) => producedOutside.has(v)), `read by the ε branch but not computed outside: ${epsReads.filter((v) => !producedOutside.has(v)).slice(0, 3).join(', ')}`);
    const gradOwn = new Set([...gradThen.nodes.flatMap((n) => n.outputs), ...(gradThen.params ?? []).map((p) => p.name)]);
    const gradReads = new Set(gradThen.nodes.flatMap((n) => n.inputs).filter((v) => v !== '' && !gradOwn.has(v)));
    assert.ok(epsReads.some((v) => gradReads.has(v)), 'some values are read by both branches');
    // A value read only by an earlier branch and by the new output's nodes stays outside (the walk
    // counts a branch's outer-scope reads as the If node's inputs).
    const small = new Ops('small');
    const x = small.input('x', 'float32', [2]);
    const a = small.node('Relu', [x])[0]!;
    small.output(small.node('Neg', [a])[0]!, 'first', 'float32', [2]);
    small.output(small.node('Exp', [a])[0]!, 'second', 'float32', [2]);
    small.output(small.node('Sigmoid', [x])[0]!, 'third', 'float32', [2]);
    const both = conditionalOutput(conditionalOutput(small.finish(), 'first', 'c1', 'x'), 'second', 'c2', 'x');
    assert.deepEqual(both.nodes.map((n) => n.opType), ['Relu', 'Sigmoid', 'Identity', 'If', 'If']);
    // A partition of the nodes.
    assert.deepEqual([...outside, ...epsThen.nodes, ...gradThen.nodes].map((n) => n.name).sort(), full.nodes.map((n) => n.name).sort());
  });

  test('branchCreatedBytes: what ONNX Runtime creates inside branches (folded parameter chains, blocked conv kernels), each parameter once', () => {
    const g = new Ops('created');
    const x = g.input('x', 'float32', [1, 2, 5, 5]);
    const kernel = g.param('kernel', [4, 2, 3, 3]); // 288 B, a conv kernel in the branch
    const folded = g.param('folded', [3, 5]); // 60 B, transposed in the branch
    const direct = g.param('direct', [5, 5]); // read as is in the branch: stays the file's
    const outer = g.param('outer', [4, 2, 3, 3]); // a conv kernel outside: not counted
    const y = g.node('Conv', [x, kernel], { pads: { kind: 'ints', value: [1, 1, 1, 1] } })[0]!;
    const z = g.node('Conv', [y, g.transpose(kernel, [1, 0, 2, 3])], { pads: { kind: 'ints', value: [1, 1, 1, 1] } })[0]!;
    const w = g.node('MatMul', [g.node('MatMul', [z, direct])[0]!, g.transpose(folded, [1, 0])])[0]!;
    g.output(w, 'wanted', 'float32', undefined);
    g.output(g.node('Conv', [x, outer])[0]!, 'other', 'float32', undefined);
    const graph = g.finish();
    assert.equal(branchCreatedBytes(graph), 0, 'no branch');
    assert.equal(branchCreatedBytes(conditionalOutput(graph, 'wanted', 'c', 'x')), 288 + 60);
  });

  test('attentionBackward recompute: the level-0 self-attention cores recompute their probabilities per head', () => {
    const config = tinyUnet();
    const g = buildUnetVjpGraph(config, { level: 2, attentionBackward: 'recompute' });
    const kept = plain();
    const softmaxes = (graph: Graph) => graph.nodes.filter((n) => n.opType === 'Softmax').map((n) => n.name);
    const level0 = ['down_blocks.0.attentions.0', 'down_blocks.0.attentions.1'].map((b) => `${b}.transformer_blocks.0.attn1/Softmax`);
    const heads = config.numAttentionHeads[0]!;
    // Each level-0 self-attention layer on the path runs its forward and its recompute per head.
    assert.equal(softmaxes(g).length, softmaxes(kept).filter((n) => !n.startsWith('grad.')).length + level0.length * (2 * heads - 1));
    for (const name of level0) {
      assert.equal(softmaxes(g).filter((n) => n.startsWith(`grad.${name}/recompute/`)).length, heads, `${name}: one recomputed softmax per head`);
      assert.equal(softmaxes(g).filter((n) => n.startsWith(`fwd.${name}/`)).length, heads, `${name}: one forward softmax per head`);
      assert.ok(!g.nodes.some((n) => n.name === name), `${name}: the unsplit forward softmax is replaced`);
      assert.ok(!g.nodes.some((n) => n.name.startsWith(`grad.${name}/Mul`)), `${name}: no per-op softmax rule`);
      assert.ok(kept.nodes.some((n) => n.name.startsWith(`grad.${name}/Mul`)), `${name}: the per-op rule without the option`);
    }
    // Order: within a core, every product of head h ≥ 1 (recomputed Q·Kᵀ, dP, V̄, K̄ᵀ, Q̄) depends on
    // every product of head h − 1, so ONNX Runtime cannot hold several heads' N×M tensors at once.
    const producer = new Map<string, (typeof g.nodes)[number]>();
    for (const n of g.nodes) for (const o of n.outputs) producer.set(o, n);
    const ancestorsOf = (n: (typeof g.nodes)[number]): Set<string> => {
      const seen = new Set<string>();
      const stack = [n];
      while (stack.length > 0) {
        for (const i of stack.pop()!.inputs) {
          const p = producer.get(i);
          if (p === undefined || seen.has(p.name)) continue;
          seen.add(p.name);
          stack.push(p);
        }
      }
      return seen;
    };
    for (const name of level0) {
      const products = g.nodes.filter((n) => n.opType === 'MatMul' && n.name.startsWith(`grad.${name}/recompute/`));
      assert.equal(products.length, 5 * heads, `${name}: five products per head`);
      for (let h = 1; h < heads; h++) {
        for (const n of products.slice(5 * h, 5 * h + 5)) {
          const before = ancestorsOf(n);
          for (const m of products.slice(5 * (h - 1), 5 * h)) assert.ok(before.has(m.name), `${name}: ${n.name} (head ${h}) runs after ${m.name}`);
        }
      }
    }
    // The other cores get the lean backward with their probabilities kept (level 1); the tapped
    // level-2 maps keep the per-op rules (their probabilities are outputs).
    assert.ok(g.nodes.some((n) => n.name.startsWith('grad.down_blocks.1.attentions.0.transformer_blocks.0.attn1/Softmax/lean/')));
    assert.ok(!g.nodes.some((n) => n.name.startsWith('grad.down_blocks.1.attentions.0.transformer_blocks.0.attn1/Softmax/Mul')));
    assert.ok(g.nodes.some((n) => n.name.startsWith('grad.down_blocks.2.attentions.0.transformer_blocks.0.attn1/Softmax/Mul')));
  });

  test('attentionBackward keep: the backward reads the forward probabilities of each head, no recompute, no softmax rule', () => {
    const config = tinyUnet();
    const g = buildUnetVjpGraph(config, { level: 2, attentionBackward: 'keep' });
    const softmaxes = g.nodes.filter((n) => n.opType === 'Softmax');
    const heads = config.numAttentionHeads[0]!;
    const level0 = ['down_blocks.0.attentions.0', 'down_blocks.0.attentions.1'].map((b) => `${b}.transformer_blocks.0.attn1/Softmax`);
    assert.ok(!softmaxes.some((n) => n.name.startsWith('grad.')), 'no softmax in the backward');
    for (const name of level0) {
      const forward = softmaxes.filter((n) => n.name.startsWith(`fwd.${name}/`));
      assert.equal(forward.length, heads, `${name}: the forward runs per head`);
      // Each head's probabilities feed its output product and the backward's P ⊙ (dP − D) and Pᵀ·Ō.
      for (const p of forward) {
        const readers = g.nodes.filter((n) => n.inputs.includes(p.outputs[0]!));
        assert.equal(readers.filter((n) => n.name.startsWith(`grad.${name}/lean/`)).length, 2, `${p.name}: read twice by the backward`);
      }
      assert.ok(!g.nodes.some((n) => n.name.startsWith(`grad.${name}/`) && n.opType === 'Sub'), `${name}: dP − D inside the product`);
    }
    // Every other unexposed core too (level 1 keeps one group: its forward is unchanged).
    assert.ok(g.nodes.some((n) => n.name.startsWith('grad.down_blocks.1.attentions.0.transformer_blocks.0.attn1/Softmax/lean/')));
    assert.ok(g.nodes.some((n) => n.name === 'down_blocks.1.attentions.0.transformer_blocks.0.attn1/Softmax'));
  });

  test('SD 1.5 config: the CLoRA one-pass graphs build (pruning leaves no constant-name gap behind)', () => {
    // Pruning the selfattn maps of SD 1.5's graph drops constants only they read; appendGraph and
    // the VJP builder renumber constants as the builder does, which failed on the gap ("unet
    // already has a value const_27") the first time a 512² run took the one-pass update.
    const sd = parseUnetConfig(JSON.parse(fs.readFileSync(path.join(FIXTURES, 'sd15-keys', 'unet_diffusers.json'), 'utf-8')).config, 'sd15 unet');
    // The engine's CLoRA graph shares the CFG pairs' prefix (`sharedPrefix`); the gradient is per distinct sample.
    for (const [noisePred, sharedPrefix] of [[false, false], [true, true]] as const) {
      const g = buildUnetNtXentVjpGraph(sd, { level: 2, temperature: 0.5, noisePred, adapterBank: true, attentionBackward: 'recompute', sharedPrefix });
      assert.deepEqual(g.outputs.map((o) => o.name), ['xattn', NTXENT_LOSS_OUTPUT, ...(noisePred ? ['noise_pred'] : []), 'grad_sample']);
      assert.equal(g.outputs.find((o) => o.name === 'grad_sample')?.shape?.[0], sharedPrefix ? 'samples' : 'batch');
      const defined = new Set([...g.inputs.map((i) => i.name), ...g.params.map((p) => p.name), ...g.constants.map((c) => c.name), ...g.nodes.flatMap((n) => n.outputs)]);
      assert.ok(g.nodes.every((n) => n.inputs.every((v) => v === '' || defined.has(v))), 'every value read is defined');
    }
    const maps = buildUnetMapsGraph(sd, { level: 2, maps: ['xattn'] });
    assert.deepEqual(maps.constants.map((c) => c.name), maps.constants.map((_, i) => `const_${i}`));
  });

  test('sharedPrefix: distinct samples in, the batch gathered once before the first cross-attention; not with regions', () => {
    const graph = buildUnetGraph(tinyUnet(), { sharedPrefix: true, adapterBank: true });
    const dims = (name: string) => graph.inputs.find((i) => i.name === name)?.shape;
    assert.deepEqual(dims('sample'), ['samples', 4, 'height', 'width']);
    assert.deepEqual(dims('sample_index'), ['batch']);
    assert.deepEqual(dims('sample_rows'), ['samples']);
    assert.deepEqual(dims('encoder_hidden_states')?.[0], 'batch');
    // One Gather on sample_index per value crossing: the residual stream, the transformer's input, conv_in's skip.
    const gathers = graph.nodes.filter((n) => n.opType === 'Gather' && n.inputs[1] === 'sample_index');
    assert.equal(gathers.length, 3);
    // The first self-attention runs before the gathers, the first cross-attention after the first ones.
    const where = (pattern: RegExp) => graph.nodes.flatMap((n, i) => (pattern.test(n.name) ? [i] : []));
    const attn1 = where(/^down_blocks\.0\.attentions\.0\.transformer_blocks\.0\.attn1[./]/);
    const attn2 = where(/^down_blocks\.0\.attentions\.0\.transformer_blocks\.0\.attn2[./]/);
    const firstGather = Math.min(...gathers.map((n) => graph.nodes.indexOf(n)));
    assert.ok(attn1.length > 0 && Math.max(...attn1) < firstGather, `the first self-attention (nodes ${attn1[0]}…${attn1.at(-1)}) runs before the gathers (first at ${firstGather})`);
    assert.ok(attn2.length > 0 && Math.min(...attn2) > firstGather, `the first cross-attention (from node ${attn2[0]}) runs after the first gather (${firstGather})`);
    // The prefix's LoRA layers read the mix rows of the distinct samples.
    assert.ok(graph.nodes.some((n) => n.opType === 'Gather' && n.inputs[0] === 'lora_mix' && n.inputs[1] === 'sample_rows'), 'lora_mix gathered by sample_rows');
    assert.throws(() => buildUnetGraph(tinyUnet(), { sharedPrefix: true, regions: true }), /shared prefix does not go with regions/);
  });

  test('with the adapter bank, reads the LoRA inputs of the layers before the cut only', () => {
    const g = buildUnetVjpGraph(tinyUnet(), { level: 2, adapterBank: true });
    const inputs = new Set(g.inputs.map((i) => i.name));
    assert.ok(inputs.has('lora_mix'));
    assert.ok(inputs.has('lora.down_blocks.0.resnets.0.conv1.down'));
    assert.ok(inputs.has('lora.up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_k.down'));
    assert.ok(!inputs.has('lora.up_blocks.1.attentions.2.transformer_blocks.0.ff.net.2.down'));
    assert.ok(![...inputs].some((i) => i.startsWith('lora.up_blocks.2.') || i.startsWith('lora.up_blocks.3.')));
    // The bank path is differentiated: its MatMul/Conv on x have backward nodes.
    assert.ok(g.nodes.some((n) => n.name.startsWith('grad.down_blocks.0.resnets.0.conv1/Conv_1')));
  });

  test('is deterministic (same dump, same bytes) and its dump is reviewable', () => {
    const bytes = (g: Graph) =>
      serializeModel(g, (p) => ({ dtype: p.dtype, data: { kind: 'external', location: 'weights.bin', offset: 0, length: p.shape.reduce((a, b) => a * b, 4) } }));
    const a = plain();
    const b = plain();
    assert.equal(dumpGraph(a), dumpGraph(b));
    assert.deepEqual(bytes(a), bytes(b));
    const dump = dumpGraph(a);
    assert.match(dump, /^grad\.up_blocks\.1\.attentions\.2\.transformer_blocks\.0\.attn2\/Softmax\/Mul = Mul\(/m);
    assert.match(dump, /^grad\.down_blocks\.1\.downsamplers\.0\.conv\/Conv\/ConvTranspose = ConvTranspose\(.*output_padding=\[1, 1\]/m);
    assert.match(dump, /^grad_sample = Identity\(/m);
  });

  test('every op the UNet variants emit has a VJP rule or carries no gradient', () => {
    const covered = new Set([...vjpOpTypes(), ...NON_DIFFERENTIABLE]);
    const variants = [{}, { adapterBank: true }, { adapterBank: true, regions: true }, { attentionMaps: { level: 2 } }, { attentionProbs: ['down_blocks.0.attentions.0.transformer_blocks.0.attn1'] }];
    const ops = new Set(variants.flatMap((v) => buildUnetGraph(tinyUnet(), v).nodes.map((n) => n.opType)));
    assert.deepEqual([...ops].filter((op) => !covered.has(op)), []);
  });
});
