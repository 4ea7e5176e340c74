/**
 * LoRAs through the engine against the reference LoRA cases (tiny-sd15-ref `lora/*`): each kohya
 * LoRA alone at two strengths, both together, the PEFT one — UNet noise_pred and text-encoder
 * last_hidden_state — through the adapter bank (LoRAs as runtime inputs) and through the fused
 * (merged-weights) variant. Plus: K = 0 on the bank graph equals the plain graph; a batch whose two
 * elements use different LoRAs equals the two single calls.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { AdapterStack, Sd15Engine, openSafetensors, type AdapterUse, type LoadedLora, type Tensor } from '../models/index.ts';
import { bankFeeds, mixTensor } from '../models/lora/bank.ts';
import { mergePatch } from '../models/lora/merge.ts';
import { fileIdentity } from '../models/engine.ts';
import { LORA_MIX_INPUT, bankFamily, bankLayersOf } from '../models/networks/adapter-bank.ts';
import { FIXTURES, REF, assertClose, refCases } from './fixtures.ts';

const MODEL = path.join(FIXTURES, 'tiny-sd15');
const LORAS = path.join(FIXTURES, 'tiny-sd15-lora');
const cacheDir = fs.mkdtempSync(path.join(os.tmpdir(), 'chorus-lora-'));

describe('LoRAs through the engine match the reference', () => {
  let engine: Sd15Engine;
  const loaded = new Map<string, LoadedLora>();
  const ref = openSafetensors(path.join(REF, 'lora.safetensors'));
  const cases = refCases('lora');
  const c0 = cases[0]!;
  const unetIn = c0.inputs.unet as unknown as { sample: { key: string }; timestep: number; encoder_hidden_states: { key: string } };
  const teIn = c0.inputs.text_encoder as unknown as { input_ids: { key: string } };
  const sample = ref.readFloat32(unetIn.sample.key);
  const ctx = ref.readFloat32(unetIn.encoder_hidden_states.key);
  const ids = ref.read(teIn.input_ids.key);
  const timestep: Tensor = { dtype: 'float32', shape: [1], data: new Float32Array([unetIn.timestep]) };

  before(() => {
    engine = Sd15Engine.open(MODEL, { device: 'cpu', cacheDir });
    for (const f of fs.readdirSync(LORAS).filter((f) => f.endsWith('.safetensors'))) loaded.set(f, engine.loadLora(path.join(LORAS, f)));
  });
  after(async () => {
    ref.close();
    await engine.dispose();
  });

  /** A loaded fixture LoRA as a stack entry at one strength for both components. */
  const entryOf = (file: string, strength = 1) => {
    const l = loaded.get(file)!;
    return { path: l.path, name: l.name, modules: l.modules, te: strength, unet: strength };
  };

  const stackOf = (c: (typeof cases)[number]) =>
    new AdapterStack(
      (c.loras as Array<{ file: string; multiplier: number }>).map((l) => {
        const lora = loaded.get(l.file)!;
        return { path: lora.path, name: lora.name, modules: lora.modules, te: l.multiplier, unet: l.multiplier };
      }),
    );

  for (const c of cases) {
    for (const mode of ['bank', 'merged'] as const) {
      test(`${c.id} (${mode})`, async () => {
        const stack = stackOf(c);
        const use = (batch: number, component: 'unet' | 'text_encoder'): AdapterUse =>
          mode === 'merged' ? { mode, stack } : { mode, stack, mix: Array.from({ length: batch }, () => stack.strengths(component)) };
        const unet = await engine.runUnet({ sample, timestep, encoderHiddenStates: ctx }, {}, use(1, 'unet'));
        assertClose(unet.noise_pred!.data, ref.readFloat32(c.outputs.noise_pred!.key).data, c.tolerance.atol!, `${c.id} noise_pred`);
        const te = await engine.encodeText(ids, use(2, 'text_encoder'));
        assertClose(te.lastHiddenState.data, ref.readFloat32(c.outputs.te_last_hidden_state!.key).data, c.tolerance.atol!, `${c.id} te_last_hidden_state`);
      });
    }
  }

  test('the fixture LoRAs load with full coverage', () => {
    for (const [file, count] of [['lora_kohya_a.safetensors', 216], ['lora_kohya_b_locon.safetensors', 301], ['lora_peft.safetensors', 144], ['lora_diffusers.safetensors', 144]] as const) {
      const l = loaded.get(file)!;
      assert.equal(l.coverage.matched, count, file);
      assert.deepEqual(l.coverage.unmatched, [], file);
    }
  });

  test('K = 0 on the bank graph gives the plain graph\'s output', async () => {
    const plain = await engine.runUnet({ sample, timestep, encoderHiddenStates: ctx });
    // The engine runs an empty bank stack on the plain graph; the bank graph itself, fed K = 0
    // (zero-sized adapter inputs), must give the same output.
    const empty = await engine.runUnet({ sample, timestep, encoderHiddenStates: ctx }, {}, { mode: 'bank', stack: new AdapterStack([]), mix: [[]] });
    assert.deepEqual(empty.noise_pred!.data, plain.noise_pred!.data);
    const bankSession = await engine.session('unet', { adapterBank: true });
    const zeroFeeds = bankFeeds(bankLayersOf(engine.buildGraph('unet', { adapterBank: true })), 'unet', []);
    assert.ok(Object.keys(zeroFeeds).length > 100, 'the bank graph has adapter inputs');
    const onBank = await bankSession.run(engine.widenedFeeds(bankSession, { ...zeroFeeds, [LORA_MIX_INPUT]: mixTensor([[]], 0), sample, timestep, encoder_hidden_states: ctx }), ['noise_pred']);
    assertClose(onBank.noise_pred!.data as Float32Array, plain.noise_pred!.data, 1e-6, 'bank graph with K = 0');
    const bankZero = await engine.runUnet(
      { sample, timestep, encoderHiddenStates: ctx },
      {},
      { mode: 'bank', stack: stackOf(cases[0]!), mix: [[0]] },
    );
    assertClose(bankZero.noise_pred!.data, plain.noise_pred!.data, 1e-6, 'bank with strength 0');
  });

  test('a bank session carries adapter inputs only for the layer families its stack covers', async () => {
    assert.equal(bankFamily('down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0'), 'down_blocks.attentions.transformer_blocks.attn1.to_out');
    assert.equal(bankFamily('text_model.encoder.layers.11.mlp.fc2'), 'text_model.encoder.layers.mlp.fc2');
    const a = loaded.get('lora_kohya_a.safetensors')!;
    const b = loaded.get('lora_kohya_b_locon.safetensors')!;
    const entry = (l: LoadedLora) => ({ path: l.path, name: l.name, modules: l.modules, te: 1, unet: 1 });
    const onlyA = new AdapterStack([entry(a)]);
    const both = new AdapterStack([entry(a), entry(b)]);
    const familiesA = engine.bankFamiliesOf('unet', onlyA);
    assert.ok(familiesA !== undefined && familiesA.length > 0, 'kohya_a covers some UNet families, not all');
    assert.ok(familiesA.every((f) => f.includes('.attentions.')), `kohya_a covers transformer layers only: ${familiesA.join(', ')}`);
    const familiesBoth = engine.bankFamiliesOf('unet', both);
    assert.ok(familiesBoth === undefined || familiesBoth.some((f) => f.includes('.resnets.')), 'the LoCon LoRA brings the resnet convs');
    const inputsA = (await engine.session('unet', { adapterBank: true, bankFamilies: familiesA })).inputNames.filter((n) => n.startsWith('lora.'));
    const inputsFull = bankLayersOf(engine.buildGraph('unet', { adapterBank: true })).length;
    assert.ok(inputsA.length > 0 && inputsA.length < 3 * inputsFull, `${inputsA.length} adapter inputs of ${3 * inputsFull}`);
    assert.ok(!inputsA.some((n) => n.includes('.resnets.')), 'no zero-rank resnet paths');
    // The output does not depend on the families: the full bank graph fed the same stack agrees.
    const viaEngine = await engine.runUnet({ sample, timestep, encoderHiddenStates: ctx }, {}, { mode: 'bank', stack: onlyA, mix: [[0.8]] });
    const full = await engine.session('unet', { adapterBank: true });
    const feeds = bankFeeds(bankLayersOf(engine.buildGraph('unet', { adapterBank: true })), 'unet', onlyA.entries);
    const onFull = await full.run(engine.widenedFeeds(full, { ...feeds, [LORA_MIX_INPUT]: mixTensor([[0.8]], 1), sample, timestep, encoder_hidden_states: ctx }), ['noise_pred']);
    assertClose(viaEngine.noise_pred!.data, onFull.noise_pred!.data as Float32Array, 1e-6, 'family-restricted vs full bank graph');
    // A stack with no text-encoder module gets a text-encoder bank graph without adapter layers.
    const unetOnly = new AdapterStack([{ ...entry(a), modules: a.modules.filter((m) => m.component === 'unet') }]);
    assert.deepEqual(engine.bankFamiliesOf('text_encoder', unetOnly), []);
    const te = await engine.encodeText(ids, { mode: 'bank', stack: unetOnly, mix: [[1], [1]] });
    const tePlain = await engine.encodeText(ids);
    assert.deepEqual(te.lastHiddenState.data, tePlain.lastHiddenState.data);
  });

  test('CPU bank sessions read widened weights fed by the host instead of concatenating them at every call', async () => {
    const stack = new AdapterStack([entryOf('lora_kohya_a.safetensors', 0.8), entryOf('lora_kohya_b_locon.safetensors', 0.6)]);
    const families = engine.bankFamiliesOf('unet', stack);
    const session = await engine.session('unet', { adapterBank: true, ...(families === undefined ? {} : { bankFamilies: families }) });
    const widened = session.inputNames.filter((n) => n.endsWith('.up.widened'));
    assert.ok(widened.some((n) => n.includes('.to_q.')), 'linear layers (rows appended)');
    assert.ok(widened.some((n) => n.includes('conv_shortcut') || n.includes('proj_in')), '1×1 convs (input channels appended)');
    const concatInGraph = Sd15Engine.open(MODEL, { device: 'cpu', cacheDir, hoistBankWeights: false });
    try {
      const plainSession = await concatInGraph.session('unet', { adapterBank: true, ...(families === undefined ? {} : { bankFamilies: families }) });
      assert.equal(plainSession.inputNames.filter((n) => n.endsWith('.widened')).length, 0);
      const use: AdapterUse = { mode: 'bank', stack, mix: [[0.8, 0.6]] };
      const hoisted = await engine.runUnet({ sample, timestep, encoderHiddenStates: ctx }, {}, use);
      const inGraph = await concatInGraph.runUnet({ sample, timestep, encoderHiddenStates: ctx }, {}, use);
      assertClose(hoisted.noise_pred!.data, inGraph.noise_pred!.data, 1e-6, 'hoisted vs in-graph Concat');
      const teHoisted = await engine.encodeText(ids, { mode: 'bank', stack, mix: [[0.8, 0.6], [0.8, 0.6]] });
      const teInGraph = await concatInGraph.encodeText(ids, { mode: 'bank', stack, mix: [[0.8, 0.6], [0.8, 0.6]] });
      assertClose(teHoisted.lastHiddenState.data, teInGraph.lastHiddenState.data, 1e-6, 'text encoder, hoisted vs in-graph Concat');
    } finally {
      await concatInGraph.dispose();
    }
  });

  test('a merged stack supersedes the previous merged session (disposed once its runs end), not the plain one', async () => {
    const a = loaded.get('lora_kohya_a.safetensors')!;
    const p = loaded.get('lora_peft.safetensors')!;
    const stackA = new AdapterStack([{ path: a.path, name: a.name, modules: a.modules, te: 1, unet: 1 }]);
    const stackP = new AdapterStack([{ path: p.path, name: p.name, modules: p.modules, te: 1, unet: 1 }]);
    const input = { sample, timestep, encoderHiddenStates: ctx };
    const plainSession = await engine.session('unet');
    const first = await engine.runUnet(input, {}, { mode: 'merged', stack: stackA });
    const sessionA = await engine.session('unet', {}, mergePatch('unet', [{ identity: fileIdentity(a.path), name: a.name, modules: a.modules, strength: 1 }]));
    assert.ok(sessionA.alive);
    // A run in flight on A when P's session is requested: it completes, then A is disposed.
    const running = sessionA.run({ sample, timestep, encoder_hidden_states: ctx }, ['noise_pred']);
    const other = await engine.runUnet(input, {}, { mode: 'merged', stack: stackP });
    assertClose((await running).noise_pred!.data as Float32Array, first.noise_pred!.data, 0, 'the run in flight on the superseded session');
    assert.equal(sessionA.alive, false, 'the superseded merged session is disposed');
    assert.ok(plainSession.alive, 'the plain session stays');
    const peftCase = cases.find((c) => c.id.includes('peft'))!;
    assertClose(other.noise_pred!.data, ref.readFloat32(peftCase.outputs.noise_pred!.key).data, peftCase.tolerance.atol!, 'the new merged session');
    // Back to A: rebuilt (its weights file is cached), same output.
    const again = await engine.runUnet(input, {}, { mode: 'merged', stack: stackA });
    assertClose(again.noise_pred!.data, first.noise_pred!.data, 0, 'A rebuilt');
  });

  test('a heterogeneous batch (a different LoRA per element) equals the single calls', async () => {
    const stack = new AdapterStack([entryOf('lora_kohya_a.safetensors'), entryOf('lora_kohya_b_locon.safetensors')]);
    const two = (t: Tensor<'float32'>): Tensor<'float32'> => ({ dtype: 'float32', shape: [2, ...t.shape.slice(1)], data: Float32Array.from([...t.data, ...t.data]) });
    const batched = await engine.runUnet({ sample: two(sample), timestep, encoderHiddenStates: two(ctx) }, {}, { mode: 'bank', stack, mix: [[0.9, 0], [0, 0.7]] });
    const onlyA = await engine.runUnet({ sample, timestep, encoderHiddenStates: ctx }, {}, { mode: 'bank', stack, mix: [[0.9, 0]] });
    const onlyB = await engine.runUnet({ sample, timestep, encoderHiddenStates: ctx }, {}, { mode: 'bank', stack, mix: [[0, 0.7]] });
    const n = sample.data.length;
    assertClose(batched.noise_pred!.data.subarray(0, n), onlyA.noise_pred!.data, 1e-5, 'element 0 = A alone');
    assertClose(batched.noise_pred!.data.subarray(n), onlyB.noise_pred!.data, 1e-5, 'element 1 = B alone');
    let diff = 0;
    for (let i = 0; i < n; i++) diff = Math.max(diff, Math.abs(onlyA.noise_pred!.data[i]! - onlyB.noise_pred!.data[i]!));
    assert.ok(diff > 0.01, 'the two LoRAs really differ');
  });

  describe('a shared prefix (sharedPrefix: a CFG pair runs the layers before the first cross-attention once)', () => {
    const two = (a: Tensor<'float32'>, b: Tensor<'float32'>): Tensor<'float32'> => ({ dtype: 'float32', shape: [2, ...a.shape.slice(1)], data: Float32Array.from([...a.data, ...b.data]) });
    // The second half of the pair reads other text (the negative prompt's role).
    const other: Tensor<'float32'> = { dtype: 'float32', shape: ctx.shape, data: ctx.data.map((v, i) => (i % 7 === 0 ? -v : 0.5 * v)) };

    /** Records the sample rows each call of the shared-prefix sessions is fed. */
    const fedRows: number[][] = [];
    const spy = async (variant: Record<string, unknown>) => {
      const session = await engine.session('unet', variant);
      const run = session.run.bind(session);
      if ((session as { spied?: boolean }).spied !== true) {
        Object.assign(session, {
          spied: true,
          run: (feeds: Record<string, Tensor>, ...rest: unknown[]) => {
            fedRows.push([feeds.sample!.shape[0]!, (feeds.sample_index?.shape[0] as number | undefined) ?? -1]);
            return (run as (...a: unknown[]) => unknown)(feeds, ...rest);
          },
        });
      }
    };

    for (const c of cases) {
      test(`${c.id}: a CFG pair through the shared prefix (bank) equals the reference and the unshared pair`, async () => {
        const stack = stackOf(c);
        const mix = [stack.strengths('unet'), stack.strengths('unet')];
        const families = engine.bankFamiliesOf('unet', stack);
        await spy({ sharedPrefix: true, adapterBank: true, ...(families === undefined ? {} : { bankFamilies: families }) });
        fedRows.length = 0;
        const input = { sample: two(sample, sample), timestep, encoderHiddenStates: two(ctx, other) };
        const shared = await engine.runUnet(input, { sharedPrefix: true }, { mode: 'bank', stack, mix });
        assert.deepEqual(fedRows, [[1, 2]], 'one distinct sample row, gathered to two batch elements');
        const unshared = await engine.runUnet(input, {}, { mode: 'bank', stack, mix });
        const n = sample.data.length;
        assertClose(shared.noise_pred!.data.subarray(0, n), ref.readFloat32(c.outputs.noise_pred!.key).data, c.tolerance.atol!, `${c.id} element 0 against the reference`);
        assertClose(shared.noise_pred!.data, unshared.noise_pred!.data, 1e-5, `${c.id} shared against unshared`);
      });
    }

    test('elements with one sample but different LoRA mixes, or different timesteps, are not merged', async () => {
      const stack = new AdapterStack([entryOf('lora_kohya_a.safetensors'), entryOf('lora_kohya_b_locon.safetensors')]);
      const families = engine.bankFamiliesOf('unet', stack);
      await spy({ sharedPrefix: true, adapterBank: true, ...(families === undefined ? {} : { bankFamilies: families }) });
      const four = (t: Tensor<'float32'>, u: Tensor<'float32'>): Tensor<'float32'> => ({ dtype: 'float32', shape: [4, ...t.shape.slice(1)], data: Float32Array.from([...t.data, ...u.data, ...t.data, ...u.data]) });
      // Composite's batch: LoRA A's CFG pair, then LoRA B's.
      const mix = [[0.8, 0], [0.8, 0], [0, 0.8], [0, 0.8]];
      const input = { sample: four(sample, sample), timestep, encoderHiddenStates: four(ctx, other) };
      fedRows.length = 0;
      const shared = await engine.runUnet(input, { sharedPrefix: true }, { mode: 'bank', stack, mix });
      assert.deepEqual(fedRows, [[2, 4]], 'two distinct (sample, mix) rows for four elements');
      const unshared = await engine.runUnet(input, {}, { mode: 'bank', stack, mix });
      assertClose(shared.noise_pred!.data, unshared.noise_pred!.data, 1e-5, 'Composite batch, shared against unshared');
      const n = sample.data.length;
      let diff = 0;
      for (let i = 0; i < n; i++) diff = Math.max(diff, Math.abs(shared.noise_pred!.data[i]! - shared.noise_pred!.data[2 * n + i]!));
      assert.ok(diff > 0.01, `LoRA A's and LoRA B's conditional predictions differ (max |Δ| ${diff})`);

      // Per-element timesteps: every element is its own sample.
      const times: Tensor = { dtype: 'float32', shape: [4], data: Float32Array.from([unetIn.timestep, unetIn.timestep, 300, 300]) };
      fedRows.length = 0;
      const sharedT = await engine.runUnet({ ...input, timestep: times }, { sharedPrefix: true }, { mode: 'bank', stack, mix });
      assert.deepEqual(fedRows, [[4, 4]], 'no sharing across per-element timesteps');
      const unsharedT = await engine.runUnet({ ...input, timestep: times }, {}, { mode: 'bank', stack, mix });
      assertClose(sharedT.noise_pred!.data, unsharedT.noise_pred!.data, 1e-5, 'per-element timesteps, shared against unshared');
    });

    test('CMLoRA\'s passes: the full pass keeping its deep feature and the shallow pass from it share the prefix too', async () => {
      const stack = new AdapterStack([entryOf('lora_kohya_a.safetensors'), entryOf('lora_kohya_b_locon.safetensors')]);
      const families = engine.bankFamiliesOf('unet', stack);
      const bank = (v: Record<string, unknown>) => ({ ...v, adapterBank: true, ...(families === undefined ? {} : { bankFamilies: families }) });
      await spy(bank({ deepFeature: true, sharedPrefix: true }));
      await spy(bank({ shallow: true, sharedPrefix: true }));
      const use = { mode: 'bank' as const, stack, mix: [[0.8, 0], [0.8, 0]] };
      const input = { sample: two(sample, sample), timestep, encoderHiddenStates: two(ctx, other) };
      fedRows.length = 0;
      const full = await engine.runUnet(input, { deepFeature: true, sharedPrefix: true }, use);
      const withFeature = { ...input, deepFeature: full.deep_feature! };
      const shallow = await engine.runUnet(withFeature, { shallow: true, sharedPrefix: true }, use);
      assert.deepEqual(fedRows, [[1, 2], [1, 2]], 'both passes read one distinct sample row');
      const fullPlain = await engine.runUnet(input, { deepFeature: true }, use);
      assertClose(full.deep_feature!.data, fullPlain.deep_feature!.data, 1e-5, 'deep feature, shared against unshared');
      assertClose(shallow.noise_pred!.data, (await engine.runUnet(withFeature, { shallow: true }, use)).noise_pred!.data, 1e-5, 'shallow pass, shared against unshared');
      assertClose(shallow.noise_pred!.data, full.noise_pred!.data, 1e-5, 'a shallow pass on a fresh feature equals the full pass');
      await assert.rejects(() => engine.session('unet', { attentionMaps: { level: 1 }, mapsOnly: true, sharedPrefix: true }), (e: Error & { code?: string }) => e.code === 'GRAPH_BUILD');
    });

    test('without LoRAs, a CFG pair shares its prefix; the shared prefix is refused with regions', async () => {
      await spy({ sharedPrefix: true });
      fedRows.length = 0;
      const input = { sample: two(sample, sample), timestep, encoderHiddenStates: two(ctx, other) };
      const shared = await engine.runUnet(input, { sharedPrefix: true });
      assert.deepEqual(fedRows, [[1, 2]], 'one distinct sample row');
      assertClose(shared.noise_pred!.data, (await engine.runUnet(input)).noise_pred!.data, 1e-5, 'plain pair, shared against unshared');
      await assert.rejects(() => engine.session('unet', { sharedPrefix: true, regions: true }), (e: Error & { code?: string }) => e.code === 'GRAPH_BUILD' && /shared prefix/.test(e.message));
    });
  });
});
