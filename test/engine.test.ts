/**
 * Conformance of the built graphs against the reference tensors in shared/fixtures/tiny-sd15-ref,
 * from both the diffusers folder and the single-file checkpoint: text encoder hidden states, UNet
 * noise predictions (batch 2, non-square, fractional t), attention probabilities at the two
 * recorded layers, the UNet's block-by-block intermediates, VAE decoder and encoder.
 * Tolerances are the manifest's suggested atol (≈ 50× PyTorch's own fp32 error).
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { Sd15Engine, openSafetensors, type Tensor } from '../models/index.ts';
import { FIXTURES, REF, assertClose, refCases, type RefCase } from './fixtures.ts';

const DIFFUSERS = path.join(FIXTURES, 'tiny-sd15');
const SINGLE = path.join(FIXTURES, 'tiny-sd15-single-file', 'tiny-sd15.safetensors');
const TAPS = ['down_blocks.1.attentions.0.transformer_blocks.0.attn2', 'up_blocks.1.attentions.0.transformer_blocks.0.attn2'];
/** Debug intermediates have no suggested atol; use 50× PyTorch's fp32 error, as the manifest does. */
const DEBUG_ATOL_FACTOR = 50;

function readRef(c: RefCase, name: string, io: 'inputs' | 'outputs'): Tensor {
  const f = openSafetensors(path.join(REF, c.file));
  try {
    return f.read(c[io][name]!.key);
  } finally {
    f.close();
  }
}
const refF32 = (c: RefCase, name: string) => {
  const f = openSafetensors(path.join(REF, c.file));
  try {
    return f.readFloat32(c.outputs[name]!.key).data;
  } finally {
    f.close();
  }
};

const cacheDir = fs.mkdtempSync(path.join(os.tmpdir(), 'chorus-engine-'));
const results = new Map<string, Map<string, Float32Array>>();

for (const [format, modelPath] of [
  ['diffusers folder', DIFFUSERS],
  ['single-file checkpoint', SINGLE],
] as const) {
  describe(`engine conformance: ${format}`, () => {
    let engine: Sd15Engine;
    const mine = new Map<string, Float32Array>();
    results.set(format, mine);
    before(() => {
      engine = Sd15Engine.open(modelPath, { device: 'cpu', cacheDir, configDir: DIFFUSERS });
    });
    after(async () => engine.dispose());

    test('model opens with the fixture configs', () => {
      assert.equal(engine.model.format, format === 'diffusers folder' ? 'diffusers' : 'single-file');
      assert.deepEqual(engine.model.unet.blockOutChannels, [32, 32, 64, 64]);
      assert.deepEqual(engine.model.vae.blockOutChannels, [32, 32, 32, 64]);
      assert.equal(engine.model.textEncoder.numAttentionHeads, 4);
      assert.equal(engine.model.vae.scalingFactor, 0.18215);
    });

    test('text encoder: last hidden state and both clip-skip outputs', async () => {
      const [c] = refCases('text_encoder');
      const out = await engine.encodeText(readRef(c!, 'input_ids', 'inputs'));
      const atol = c!.tolerance.atol!;
      assertClose(out.lastHiddenState.data, refF32(c!, 'last_hidden_state'), atol, 'last_hidden_state');
      assertClose(out.penultimateRaw.data, refF32(c!, 'penultimate_raw'), atol, 'penultimate_raw');
      assertClose(out.penultimateFinalLn.data, refF32(c!, 'penultimate_final_ln'), atol, 'penultimate_final_ln');
      mine.set('text', out.lastHiddenState.data);
    });

    for (const c of refCases('unet')) {
      test(`unet ${c.id}`, async () => {
        const taps = TAPS.filter((t) => `attn_probs.${t}` in c.outputs);
        const debug = Object.keys(c.outputs).some((k) => k.startsWith('debug.'));
        const out = await engine.runUnet(
          {
            sample: readRef(c, 'sample', 'inputs'),
            timestep: readRef(c, 'timestep', 'inputs'),
            encoderHiddenStates: readRef(c, 'encoder_hidden_states', 'inputs'),
          },
          { attentionProbs: taps, debugOutputs: debug },
        );
        assertClose(out.noise_pred!.data, refF32(c, 'noise_pred'), c.tolerance.atol!, `${c.id} noise_pred`);
        for (const t of taps) {
          assertClose(out[`attn_probs.${t}`]!.data, refF32(c, `attn_probs.${t}`), c.tolerance.attn_probs_atol!, `${c.id} attn_probs ${t}`);
        }
        for (const k of Object.keys(c.outputs).filter((k) => k.startsWith('debug.'))) {
          const err = c.fp32_vs_fp64?.[k]?.max_abs ?? 0;
          assertClose(out[k]!.data, refF32(c, k), Math.max(c.tolerance.atol!, DEBUG_ATOL_FACTOR * err), `${c.id} ${k}`);
        }
        mine.set(c.id, out.noise_pred!.data);
      });
    }

    for (const c of refCases('vae_decode')) {
      test(`vae decoder ${c.id}`, async () => {
        const out = await engine.decodeLatents(readRef(c, 'latents_scaled', 'inputs'));
        assertClose(out.decoderOutput.data, refF32(c, 'decoder_output'), c.tolerance.atol!, `${c.id} decoder_output`);
        assertClose(out.image01.data, refF32(c, 'image01'), c.tolerance.atol!, `${c.id} image01`);
        mine.set(c.id, out.decoderOutput.data);
      });
    }

    for (const c of refCases('vae_encode')) {
      test(`vae encoder ${c.id}`, async () => {
        const out = await engine.encodeImage(readRef(c, 'image', 'inputs'));
        for (const k of ['mean', 'logvar', 'std', 'moments'] as const) assertClose(out[k].data, refF32(c, k), c.tolerance.atol!, `${c.id} ${k}`);
        mine.set(c.id, out.mean.data);
      });
    }
  });
}

test('the diffusers folder and the single-file checkpoint give identical outputs', () => {
  const a = results.get('diffusers folder')!;
  const b = results.get('single-file checkpoint')!;
  assert.ok(a.size >= 8, `expected the conformance cases to have run, got ${a.size}`);
  assert.deepEqual([...a.keys()].sort(), [...b.keys()].sort());
  for (const [k, v] of a) assert.deepEqual(b.get(k), v, `${k} differs between the two formats`);
});

test('a second load reuses the converted weights from the cache', async () => {
  const before = fs.readdirSync(cacheDir).length;
  const engine = Sd15Engine.open(DIFFUSERS, { device: 'cpu', cacheDir });
  try {
    await engine.session('vae_decoder');
  } finally {
    await engine.dispose();
  }
  assert.equal(fs.readdirSync(cacheDir).length, before, 'no new weights folder for an already converted component');
});

test('the shallow UNet fed the deep feature of a full pass reproduces that pass (CMLoRA / DeepCache cut)', async () => {
  const engine = Sd15Engine.open(DIFFUSERS, { device: 'cpu', cacheDir });
  try {
    const [c] = refCases('unet').filter((x) => x.id === 'unet/t1_b2_cfg');
    const input = { sample: readRef(c!, 'sample', 'inputs'), timestep: readRef(c!, 'timestep', 'inputs'), encoderHiddenStates: readRef(c!, 'encoder_hidden_states', 'inputs') };
    const full = await engine.runUnet(input, { deepFeature: true });
    assert.deepEqual(full.deep_feature!.shape, [2, 32, 32, 32]);
    assertClose(full.noise_pred!.data, refF32(c!, 'noise_pred'), c!.tolerance.atol!, 'full pass with the deep-feature output');
    const shallow = await engine.runUnet({ ...input, deepFeature: full.deep_feature! }, { shallow: true });
    assert.deepEqual(shallow.noise_pred!.data, full.noise_pred!.data);
    // A stale feature (from another timestep) changes the result: the shallow pass really uses it.
    const other = await engine.runUnet({ ...input, timestep: { dtype: 'float32', shape: [1], data: new Float32Array([700]) } }, { deepFeature: true });
    const stale = await engine.runUnet({ ...input, deepFeature: other.deep_feature! }, { shallow: true });
    assert.notDeepEqual(stale.noise_pred!.data, full.noise_pred!.data);
  } finally {
    await engine.dispose();
  }
});
