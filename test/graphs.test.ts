/**
 * The graph builder and the network definitions, without running the fixtures' numbers:
 * determinism, parameter names = checkpoint keys (for the real SD 1.5 configs too), build-time
 * checks that name the scope, and other SD-family configs (SD 2.x style) building valid graphs.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { ModelError, openSafetensors } from '../models/index.ts';
import { Ops } from '../models/onnx/ops.ts';
import { dumpGraph } from '../models/onnx/dump.ts';
import { serializeModel } from '../models/onnx/serialize.ts';
import type { Graph } from '../models/onnx/builder.ts';
import { parseClipTextConfig, parseUnetConfig, parseVaeConfig } from '../models/networks/config.ts';
import { buildUnetGraph } from '../models/networks/unet.ts';
import { buildClipTextGraph } from '../models/networks/clip-text.ts';
import { buildVaeDecoderGraph, buildVaeEncoderGraph } from '../models/networks/vae.ts';
import { OrtSession } from '../models/runtime.ts';
import { FIXTURES } from './fixtures.ts';

const readJson = (p: string) => JSON.parse(fs.readFileSync(p, 'utf-8'));
const TINY = path.join(FIXTURES, 'tiny-sd15');
const tinyUnet = () => parseUnetConfig(readJson(path.join(TINY, 'unet/config.json')), 'unet/config.json');

/** Serialize with every parameter as an external reference, so bytes depend only on the graph. */
function graphBytes(g: Graph): Uint8Array {
  let offset = 0;
  return serializeModel(g, (p) => {
    const length = p.shape.reduce((a, b) => a * b, 4);
    const data = { kind: 'external' as const, location: 'weights.bin', offset, length };
    offset += length;
    return { dtype: p.dtype, data };
  });
}

const paramMap = (g: Graph) => new Map(g.params.map((p) => [p.name, p.storedShape.join(',')]));

describe('graph builder', () => {
  test('is deterministic: same config and options give identical dumps and bytes', () => {
    const options = { attentionProbs: ['up_blocks.1.attentions.0.transformer_blocks.0.attn2'], debugOutputs: true };
    const a = buildUnetGraph(tinyUnet(), options);
    const b = buildUnetGraph(tinyUnet(), options);
    assert.equal(dumpGraph(a), dumpGraph(b));
    assert.deepEqual(graphBytes(a), graphBytes(b));
    assert.notEqual(dumpGraph(a), dumpGraph(buildUnetGraph(tinyUnet())), 'options change the graph');
  });

  test('the text dump names nodes by scope and lists parameters with shapes', () => {
    const dump = dumpGraph(buildUnetGraph(tinyUnet()));
    assert.match(dump, /^param {2}down_blocks\.0\.attentions\.0\.transformer_blocks\.0\.attn2\.to_k\.weight: float32\[32, 32\] \(stored \[32, 32\]\)$/m);
    assert.match(dump, /^param {2}down_blocks\.0\.attentions\.0\.transformer_blocks\.0\.ff\.net\.2\.weight: float32\[128, 32\] \(stored \[32, 128\]\)$/m);
    assert.match(dump, /^input {2}encoder_hidden_states: float32\[batch, sequence, 32\]$/m);
    assert.match(dump, /^down_blocks\.1\.attentions\.0\.transformer_blocks\.0\.attn2\/Softmax = Softmax\(/m);
    assert.match(dump, /^output noise_pred: float32\[batch, 4, height, width\]$/m);
  });

  test('constants are deduplicated by value', () => {
    const g = new Ops('t');
    const x = g.input('x', 'float32', [1]);
    const y = g.add(g.mul(x, g.scalar(2)), g.scalar(2));
    g.output(g.mul(y, g.scalar(3)), 'y', 'float32', [1]);
    assert.equal(g.finish().constants.length, 2);
  });

  test('build-time checks name the scope', () => {
    const g = new Ops('t');
    const x = g.input('x', 'float32', [1, 40, 4, 4]);
    assert.throws(
      () => g.scope('down_blocks.0', () => g.scope('resnets.1', () => g.groupNorm(x, g.param('w', [40]), g.param('b', [40]), { groups: 32, channels: 40, eps: 1e-5 }))),
      (e: unknown) => e instanceof ModelError && e.code === 'GRAPH_BUILD' && e.message.startsWith('down_blocks.0.resnets.1: ') && e.message.includes('40 channels'),
    );
  });

  test('an attention tap on a module that does not exist is refused', () => {
    assert.throws(
      () => buildUnetGraph(tinyUnet(), { attentionProbs: ['down_blocks.3.attentions.0.transformer_blocks.0.attn2'] }),
      (e: unknown) => e instanceof ModelError && e.code === 'GRAPH_BUILD' && e.message.includes('down_blocks.3.attentions.0'),
    );
  });
});

describe('parameter names are the checkpoint keys', () => {
  test('tiny UNet, text encoder and VAE: graph parameters = the diffusers files, names and shapes', () => {
    const check = (graphs: Graph[], file: string, ignore: (k: string) => boolean = () => false) => {
      const f = openSafetensors(path.join(TINY, file));
      const keys = new Map(f.names().filter((k) => !ignore(k)).map((k) => [k, f.info(k).shape.join(',')]));
      f.close();
      const params = new Map(graphs.flatMap((g) => [...paramMap(g)]));
      assert.deepEqual(params, keys, file);
    };
    const vae = parseVaeConfig(readJson(path.join(TINY, 'vae/config.json')), 'vae');
    check([buildUnetGraph(tinyUnet())], 'unet/diffusion_pytorch_model.safetensors');
    check([buildClipTextGraph(parseClipTextConfig(readJson(path.join(TINY, 'text_encoder/config.json')), 'te'))], 'text_encoder/model.safetensors');
    check([buildVaeDecoderGraph(vae), buildVaeEncoderGraph(vae)], 'vae/diffusion_pytorch_model.safetensors');
  });

  test('real SD 1.5 configs: every parameter name and shape of sd15-keys, nothing more', () => {
    const keys = (file: string, ignore: (k: string) => boolean = () => false) => {
      const j = readJson(path.join(FIXTURES, 'sd15-keys', file));
      return { config: j.config, params: new Map<string, string>(j.params.filter((p: { name: string }) => !ignore(p.name)).map((p: { name: string; shape: number[] }) => [p.name, p.shape.join(',')])) };
    };
    const u = keys('unet_diffusers.json');
    assert.deepEqual(paramMap(buildUnetGraph(parseUnetConfig(u.config, 'sd15 unet'))), u.params);
    const t = keys('text_encoder_diffusers.json', (k) => k.endsWith('position_ids'));
    assert.deepEqual(paramMap(buildClipTextGraph(parseClipTextConfig(t.config, 'sd15 te'))), t.params);
    const v = keys('vae_diffusers.json');
    const vc = parseVaeConfig(v.config, 'sd15 vae');
    assert.deepEqual(new Map([...paramMap(buildVaeDecoderGraph(vc)), ...paramMap(buildVaeEncoderGraph(vc))]), v.params);
    assert.equal(u.params.size, 686);
  });
});

describe('other SD-family configs', () => {
  // An SD 2.x-style UNet at tiny size: linear proj_in/proj_out, per-block head counts, 1024-wide context.
  const sd2Like = {
    block_out_channels: [32, 64],
    down_block_types: ['CrossAttnDownBlock2D', 'DownBlock2D'],
    up_block_types: ['UpBlock2D', 'CrossAttnUpBlock2D'],
    attention_head_dim: [2, 4],
    cross_attention_dim: 1024,
    use_linear_projection: true,
    upcast_attention: true,
    layers_per_block: 1,
    norm_num_groups: 8,
  };

  test('SD 2.x-style UNet: linear projections and per-block heads from the config', () => {
    const g = buildUnetGraph(parseUnetConfig(sd2Like, 'sd2-like'));
    const params = paramMap(g);
    assert.equal(params.get('down_blocks.0.attentions.0.proj_in.weight'), '32,32');
    assert.equal(params.get('up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight'), '32,1024');
    assert.equal(params.get('mid_block.attentions.0.proj_out.weight'), '64,64');
  });

  test('SD 2.x-style UNet runs at an odd latent size, with per-block head counts in its attention maps', async () => {
    const taps = ['down_blocks.0.attentions.0.transformer_blocks.0.attn2', 'mid_block.attentions.0.transformer_blocks.0.attn1'];
    const g = buildUnetGraph(parseUnetConfig(sd2Like, 'sd2-like'), { attentionProbs: taps });
    let seed = 1;
    const rand = () => ((seed = (seed * 1103515245 + 12345) % 2147483648) / 2147483648 - 0.5) * 0.2;
    const bytes = serializeModel(g, (p) => {
      const n = p.shape.reduce((a, b) => a * b, 1);
      const v = Float32Array.from({ length: n }, rand);
      return { dtype: 'float32', data: { kind: 'raw', bytes: new Uint8Array(v.buffer) } };
    });
    const s = await OrtSession.create(bytes, { device: 'cpu' });
    try {
      const out = await s.run({
        sample: { dtype: 'float32', shape: [1, 4, 5, 7], data: new Float32Array(140).fill(0.5) },
        timestep: { dtype: 'float32', shape: [1], data: new Float32Array([500]) },
        encoder_hidden_states: { dtype: 'float32', shape: [1, 154, 1024], data: new Float32Array(154 * 1024).fill(0.1) },
      });
      assert.deepEqual(out.noise_pred!.shape, [1, 4, 5, 7]);
      // Level 0: 2 heads over 5·7 queries and 2·77 text tokens; mid block (3×4 after one stride-2 conv): 4 heads.
      assert.deepEqual(out[`attn_probs.${taps[0]}`]!.shape, [2, 35, 154]);
      assert.deepEqual(out[`attn_probs.${taps[1]}`]!.shape, [4, 12, 12]);
      assert.ok((out.noise_pred!.data as Float32Array).every(Number.isFinite));
    } finally {
      await s.dispose();
    }
  });

  test('a GELU text encoder (SD 2.x OpenCLIP) uses exact erf GELU, quick_gelu uses σ(1.702x)', () => {
    const base = readJson(path.join(TINY, 'text_encoder/config.json'));
    const gelu = dumpGraph(buildClipTextGraph(parseClipTextConfig({ ...base, hidden_act: 'gelu' }, 'te')));
    const quick = dumpGraph(buildClipTextGraph(parseClipTextConfig(base, 'te')));
    assert.match(gelu, /mlp\/Erf = Erf/);
    assert.doesNotMatch(quick, /Erf/);
  });
});
