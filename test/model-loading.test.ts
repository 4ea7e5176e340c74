/**
 * Model loading from what users have on disk: every way a model can be broken or be the wrong
 * thing (each refused with a typed error naming the file and the culprit), and what the loader
 * works out from the data itself (architecture from keys and shapes, configs from tensor shapes,
 * legacy key spellings). Broken files are temp copies of the tiny fixtures, edited in one place.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { ModelError } from '../models/errors.ts';
import { openModel } from '../models/model.ts';
import { Sd15Engine } from '../models/engine.ts';
import { encodeSafetensors, openSafetensors, writeSafetensors } from '../models/safetensors.ts';
import { detectCheckpoint, inferUnetConfig, inferVaeConfig, readLdmYaml } from '../models/single-file.ts';
import { parseUnetConfig, parseVaeConfig } from '../models/networks/config.ts';
import type { Tensor } from '../models/tensor.ts';
import { FIXTURES, REALWORLD, REF, assertClose, refCases } from './fixtures.ts';

const DIFFUSERS = path.join(FIXTURES, 'tiny-sd15');
const SINGLE = path.join(FIXTURES, 'tiny-sd15-single-file', 'tiny-sd15.safetensors');
const SINGLE_YAML = path.join(FIXTURES, 'tiny-sd15-single-file', 'tiny-sd15.yaml');
const KEY_MAPPING = path.join(FIXTURES, 'tiny-sd15-single-file', 'key_mapping.json');
const KOHYA_LORA = path.join(FIXTURES, 'tiny-sd15-lora', 'lora_kohya_a.safetensors');

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'chorus-model-loading-'));
const cacheDir = path.join(tmp, 'cache');
after(() => fs.rmSync(tmp, { recursive: true, force: true }));

// ---- helpers ------------------------------------------------------------------------------------

function checkError(e: unknown, code: string, culprits: readonly (string | RegExp)[]): ModelError {
  assert.ok(e instanceof ModelError, `expected ModelError, got ${String(e)}`);
  assert.equal(e.code, code, e.message);
  for (const c of culprits) {
    if (typeof c === 'string') assert.ok(e.message.includes(c), `message should name ${c}: ${e.message}`);
    else assert.match(e.message, c);
  }
  return e;
}

/** `fn` throws a ModelError with `code` whose message contains every culprit; returns it for more checks. */
function rejects(fn: () => unknown, code: string, ...culprits: (string | RegExp)[]): ModelError {
  let error: ModelError | undefined;
  assert.throws(fn, (e: unknown) => {
    error = checkError(e, code, culprits);
    return true;
  });
  return error!;
}

async function rejectsAsync(fn: () => Promise<unknown>, code: string, ...culprits: (string | RegExp)[]): Promise<ModelError> {
  let error: ModelError | undefined;
  await assert.rejects(fn, (e: unknown) => {
    error = checkError(e, code, culprits);
    return true;
  });
  return error!;
}

type RawEntry = { dtype: string; shape: number[]; data_offsets: [number, number] };

/** The header of a safetensors file as JSON, read here without the code under test. */
function rawHeader(file: string): { json: Record<string, RawEntry>; dataStart: number } {
  const fd = fs.openSync(file, 'r');
  try {
    const len = Buffer.alloc(8);
    fs.readSync(fd, len, 0, 8, 0);
    const n = Number(len.readBigUInt64LE(0));
    const text = Buffer.alloc(n);
    fs.readSync(fd, text, 0, n, 8);
    const json = JSON.parse(text.toString('utf-8')) as Record<string, RawEntry>;
    delete json.__metadata__;
    return { json, dataStart: 8 + n };
  } finally {
    fs.closeSync(fd);
  }
}

/** A copy of `src` with an edited header in front of the unchanged data section. */
function withEditedHeader(src: string, name: string, edit: (header: Record<string, RawEntry>) => void): string {
  const bytes = fs.readFileSync(src);
  const { json, dataStart } = rawHeader(src);
  edit(json);
  const headerBytes = Buffer.from(JSON.stringify(json), 'utf-8');
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(headerBytes.length));
  const out = path.join(tmp, name);
  fs.writeFileSync(out, Buffer.concat([len, headerBytes, bytes.subarray(dataStart)]));
  return out;
}

/** Every tensor of a safetensors file, keys passed through `rename` (undefined drops the tensor). */
function reencode(src: string, dest: string, rename: (key: string) => string | undefined): void {
  const f = openSafetensors(src);
  try {
    const tensors: Record<string, Tensor> = {};
    for (const k of f.names()) {
      const to = rename(k);
      if (to !== undefined) tensors[to] = f.read(k);
    }
    writeSafetensors(dest, tensors);
  } finally {
    f.close();
  }
}

/** A temp diffusers folder whose entries are symlinks to the fixture's, except those in `omit`. */
function linkedFolder(name: string, omit: readonly string[] = []): string {
  const dir = path.join(tmp, name);
  fs.mkdirSync(dir);
  for (const entry of fs.readdirSync(DIFFUSERS)) {
    if (!omit.includes(entry)) fs.symlinkSync(path.join(DIFFUSERS, entry), path.join(dir, entry));
  }
  return dir;
}

/** `dir/<component>/` as a real folder, with the fixture's files symlinked except `omit`. */
function linkedComponent(dir: string, component: string, omit: readonly string[] = []): string {
  const c = path.join(dir, component);
  fs.mkdirSync(c);
  for (const entry of fs.readdirSync(path.join(DIFFUSERS, component))) {
    if (!omit.includes(entry)) fs.symlinkSync(path.join(DIFFUSERS, component, entry), path.join(c, entry));
  }
  return c;
}

function fixtureJson(rel: string): Record<string, unknown> {
  return JSON.parse(fs.readFileSync(path.join(DIFFUSERS, rel), 'utf-8')) as Record<string, unknown>;
}

/** A small single file with the given keys, each a zero tensor of its (real-world) shape. */
function syntheticFile(name: string, shapes: Readonly<Record<string, readonly number[]>>, metadata?: Record<string, string>): string {
  const tensors: Record<string, Tensor> = {};
  for (const [k, shape] of Object.entries(shapes)) {
    tensors[k] = { dtype: 'float16', shape, data: new Uint16Array(shape.reduce((a, b) => a * b, 1)) };
  }
  const p = path.join(tmp, name);
  fs.writeFileSync(p, encodeSafetensors(tensors, metadata));
  return p;
}

/** Key names of a real SDXL base checkpoint (sd_xl_base_1.0), with a 2048-wide cross-attention input. */
const SDXL_SHAPES: Readonly<Record<string, readonly number[]>> = {
  'conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight': [8, 768],
  'conditioner.embedders.1.model.ln_final.weight': [1280],
  'conditioner.embedders.1.model.text_projection': [1280, 1280],
  'model.diffusion_model.label_emb.0.0.weight': [1280, 2816],
  'model.diffusion_model.input_blocks.0.0.weight': [320, 4, 3, 3],
  'model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight': [640, 2048],
  'first_stage_model.decoder.conv_in.weight': [512, 4, 3, 3],
};

/** The tiny single file alone in a temp folder: no YAML beside it, no tokenizer/ beside it. */
let noYaml: string | undefined;
function singleWithoutYaml(): string {
  if (noYaml === undefined) {
    const dir = path.join(tmp, 'no-yaml');
    fs.mkdirSync(dir);
    noYaml = path.join(dir, 'tiny-sd15.safetensors');
    fs.symlinkSync(SINGLE, noYaml);
  }
  return noYaml;
}

/** A config folder with only text_encoder/config.json (no unet/, vae/, tokenizer/). */
let teOnly: string | undefined;
function textEncoderConfigOnly(): string {
  if (teOnly === undefined) {
    teOnly = path.join(tmp, 'te-config-only');
    fs.mkdirSync(path.join(teOnly, 'text_encoder'), { recursive: true });
    fs.symlinkSync(path.join(DIFFUSERS, 'text_encoder', 'config.json'), path.join(teOnly, 'text_encoder', 'config.json'));
  }
  return teOnly;
}

function refInput(kind: string, name: string): Tensor {
  const [c] = refCases(kind);
  const f = openSafetensors(path.join(REF, c!.file));
  try {
    return f.read(c!.inputs[name]!.key);
  } finally {
    f.close();
  }
}

// ---- rejects: broken files ----------------------------------------------------------------------

describe('openModel rejects a broken single-file checkpoint', () => {
  const { json: header, dataStart } = rawHeader(SINGLE);
  const size = fs.statSync(SINGLE).size;

  test('truncated to 60% of its bytes, naming the first tensor cut off', () => {
    const cut = Math.floor(size * 0.6);
    const p = path.join(tmp, 'truncated.safetensors');
    fs.writeFileSync(p, fs.readFileSync(SINGLE).subarray(0, cut));
    // The first tensor (in file order) whose bytes run past the cut.
    const firstMissing = Object.entries(header)
      .sort(([, a], [, b]) => a.data_offsets[0] - b.data_offsets[0])
      .find(([, t]) => dataStart + t.data_offsets[1] > cut)![0];
    const e = rejects(() => openModel(p), 'TRUNCATED_FILE', 'truncated.safetensors', `\`${firstMissing}\``);
    assert.equal(e.details.firstMissing, firstMissing);
  });

  test('a header longer than the file', () => {
    const p = path.join(tmp, 'header-overrun.safetensors');
    fs.writeFileSync(p, fs.readFileSync(SINGLE).subarray(0, dataStart - 1000));
    rejects(() => openModel(p), 'HEADER_OVERRUN', 'header-overrun.safetensors', `${dataStart - 8} bytes`);
  });

  test('a tensor whose offsets point past the data section', () => {
    const key = 'model.diffusion_model.middle_block.1.proj_in.weight';
    const p = withEditedHeader(SINGLE, 'offsets-range.safetensors', (h) => {
      const [b, e] = h[key]!.data_offsets;
      const dataBytes = size - dataStart;
      h[key]!.data_offsets = [dataBytes + 4096, dataBytes + 4096 + (e - b)];
    });
    rejects(() => openModel(p), 'OFFSETS_OUT_OF_RANGE', 'offsets-range.safetensors', `\`${key}\``);
  });

  test('two tensors sharing bytes', () => {
    const a = 'model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight';
    const b = 'model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_v.weight';
    const p = withEditedHeader(SINGLE, 'offsets-overlap.safetensors', (h) => {
      h[b]!.data_offsets = [...h[a]!.data_offsets];
    });
    rejects(() => openModel(p), 'OFFSETS_OVERLAP', 'offsets-overlap.safetensors', `\`${a}\``, `\`${b}\``);
  });

  test('a tensor with a dtype Chorus cannot read', () => {
    const key = 'first_stage_model.decoder.conv_in.weight';
    const p = withEditedHeader(SINGLE, 'dtype.safetensors', (h) => {
      h[key]!.dtype = 'F8_E8M0';
    });
    const e = rejects(() => openModel(p), 'UNSUPPORTED_DTYPE', 'dtype.safetensors', `\`${key}\``, 'F8_E8M0');
    assert.equal(e.details.key, key);
  });
});

describe('the engine rejects weights that do not fit the config', () => {
  test('a diffusers unet/config.json with another cross_attention_dim: SHAPE_MISMATCH naming key and both shapes', async () => {
    const dir = linkedFolder('shape-mismatch', ['unet']);
    const unet = linkedComponent(dir, 'unet', ['config.json']);
    fs.writeFileSync(path.join(unet, 'config.json'), JSON.stringify({ ...fixtureJson('unet/config.json'), cross_attention_dim: 48 }));
    // Every cross-attention K/V projection takes the 32-wide text embeddings; the config now says 48.
    const weights = path.join(DIFFUSERS, 'unet', 'diffusion_pytorch_model.safetensors');
    const crossKv = Object.entries(rawHeader(weights).json).filter(([k]) => /\.attn2\.to_[kv]\.weight$/.test(k));
    assert.ok(crossKv.length > 0 && crossKv.every(([, t]) => t.shape[1] === 32));
    const engine = Sd15Engine.open(dir, { device: 'cpu', cacheDir });
    try {
      const e = await rejectsAsync(() => engine.session('unet'), 'SHAPE_MISMATCH', 'shape-mismatch/unet');
      const culprit = crossKv.find(([k]) => k === e.details.key);
      assert.ok(culprit !== undefined, `culprit ${String(e.details.key)} is a cross-attention K/V weight`);
      const [key, { shape }] = culprit;
      assert.ok(e.message.includes(`\`${key}\``), e.message);
      assert.ok(e.message.includes(`has shape [${shape.join(', ')}]`), e.message);
      assert.ok(e.message.includes(`needs [${shape[0]}, 48]`), e.message);
      assert.deepEqual(e.details.found, shape);
      assert.deepEqual(e.details.expected, [shape[0], 48]);
      assert.equal(e.details.file, path.join(unet, 'diffusion_pytorch_model.safetensors'));
    } finally {
      await engine.dispose();
    }
  });

  test('a single file without one UNet tensor: MISSING_TENSOR naming its diffusers key', async () => {
    const dropped = 'model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_v.weight';
    const mapping = (JSON.parse(fs.readFileSync(KEY_MAPPING, 'utf-8')) as { unet: Record<string, string> }).unet;
    const diffusersKey = Object.entries(mapping).find(([, ldm]) => ldm === dropped)![0];
    const p = path.join(tmp, 'missing-tensor.safetensors');
    reencode(SINGLE, p, (k) => (k === dropped ? undefined : k));
    const engine = Sd15Engine.open(p, { device: 'cpu', cacheDir, configDir: DIFFUSERS });
    try {
      const e = await rejectsAsync(() => engine.session('unet'), 'MISSING_TENSOR', 'missing-tensor.safetensors', `1 of`, diffusersKey);
      assert.deepEqual(e.details.missing, [diffusersKey]);
    } finally {
      await engine.dispose();
    }
  });
});

describe('openModel rejects an incomplete diffusers folder', () => {
  test('no vae/ folder: MISSING_COMPONENT naming vae', () => {
    const dir = linkedFolder('no-vae', ['vae']);
    rejects(() => openModel(dir), 'MISSING_COMPONENT', path.join(dir, 'vae'));
  });

  test('unet/ without weights: MISSING_COMPONENT naming the folder and the expected file', () => {
    const dir = linkedFolder('no-unet-weights', ['unet']);
    linkedComponent(dir, 'unet', ['diffusion_pytorch_model.safetensors']);
    rejects(() => openModel(dir), 'MISSING_COMPONENT', path.join(dir, 'unet'), 'diffusion_pytorch_model.safetensors');
  });

  test('unet/ with only a pickle .bin: PICKLE_CHECKPOINT, never executed', () => {
    const dir = linkedFolder('pickle-unet', ['unet']);
    const unet = linkedComponent(dir, 'unet', ['diffusion_pytorch_model.safetensors']);
    fs.writeFileSync(path.join(unet, 'diffusion_pytorch_model.bin'), Buffer.from([0x50, 0x4b, 0x03, 0x04, 0x14, 0, 0, 0, 0, 0]));
    const e = rejects(() => openModel(dir), 'PICKLE_CHECKPOINT', path.join(unet, 'diffusion_pytorch_model.bin'), 'unet', 'safetensors');
    assert.equal(e.details.component, 'unet');
  });
});

describe('openModel rejects what is not an SD 1.5 model', () => {
  test('an SDXL single file (detected from its keys): UNSUPPORTED_ARCHITECTURE saying SDXL', () => {
    const p = syntheticFile('sdxl-base.safetensors', SDXL_SHAPES);
    const e = rejects(() => openModel(p), 'UNSUPPORTED_ARCHITECTURE', 'sdxl-base.safetensors', 'an SDXL checkpoint', 'conditioner.embedders.1.');
    assert.equal(e.details.detected, 'sdxl');
  });

  test('an SD 2.x single file: UNSUPPORTED_ARCHITECTURE saying SD 2.x and how to load it', () => {
    const p = syntheticFile('sd21.safetensors', {
      'cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight': [3072, 1024],
      'model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight': [320, 1024],
    });
    rejects(() => openModel(p), 'UNSUPPORTED_ARCHITECTURE', 'sd21.safetensors', 'SD 2.x', 'diffusers folder');
  });

  test('an SDXL diffusers folder (model_index.json): UNSUPPORTED_ARCHITECTURE', () => {
    const dir = linkedFolder('sdxl-folder', ['model_index.json']);
    fs.writeFileSync(path.join(dir, 'model_index.json'), JSON.stringify({ ...fixtureJson('model_index.json'), _class_name: 'StableDiffusionXLPipeline' }));
    const e = rejects(() => openModel(dir), 'UNSUPPORTED_ARCHITECTURE', dir, 'SDXL', 'StableDiffusionXLPipeline');
    assert.equal(e.details.detected, 'StableDiffusionXLPipeline');
  });

  test('an SDXL-style unet/config.json (addition_embed_type text_time): UNSUPPORTED_ARCHITECTURE naming the field', () => {
    const dir = linkedFolder('sdxl-unet-config', ['unet']);
    const unet = linkedComponent(dir, 'unet', ['config.json']);
    fs.writeFileSync(
      path.join(unet, 'config.json'),
      JSON.stringify({ ...fixtureJson('unet/config.json'), addition_embed_type: 'text_time', addition_time_embed_dim: 256, projection_class_embeddings_input_dim: 2816 }),
    );
    const e = rejects(() => openModel(dir), 'UNSUPPORTED_ARCHITECTURE', path.join(unet, 'config.json'), '`addition_embed_type`', 'text_time', 'SDXL');
    assert.equal(e.details.key, 'addition_embed_type');
  });

  for (const lora of [
    KOHYA_LORA,
    path.join(REALWORLD, 'lora', 'lycoris_lokr_sd1_smart_falcon_dim4.safetensors'),
    path.join(REALWORLD, 'lora', 'diffusers_unet_lora_sd15_pokemon.safetensors'),
    path.join(REALWORLD, 'lora', 'diffusers_attnproc_lora_sd15.safetensors'),
    path.join(REALWORLD, 'lora', 'cloneofsimo_lora_pti_disney_inpainting.safetensors'),
  ]) {
    test(`a LoRA passed as the model (${path.basename(lora)}): refused as a LoRA`, () => {
      const e = rejects(() => openModel(lora), 'UNSUPPORTED_ARCHITECTURE', `\`${path.basename(lora)}\``, 'is a LoRA', 'LoRA folder');
      assert.equal(e.details.detected, 'lora');
    });
  }

  test('an SDXL kohya LoRA (real key names and shapes) passed as the model: refused as a LoRA', () => {
    const described = JSON.parse(fs.readFileSync(path.join(REALWORLD, 'lora', 'headers', 'invokeai_probe_header_sdxl_kohya_alien_style.json'), 'utf-8')) as Record<string, { shape: number[] }>;
    const keys = Object.keys(described).filter((k) => /^lora_(te1|te2|unet)_/.test(k) && k.endsWith('.alpha'));
    assert.ok(keys.some((k) => k.startsWith('lora_te2_')), 'the header has second-text-encoder (SDXL) modules');
    const p = syntheticFile('alien_style_sdxl.safetensors', Object.fromEntries(keys.map((k) => [k, described[k]!.shape])));
    rejects(() => openModel(p), 'UNSUPPORTED_ARCHITECTURE', '`alien_style_sdxl.safetensors`', 'is a LoRA');
  });

  test('a standalone VAE file passed as the model', () => {
    const e = rejects(() => openModel(path.join(DIFFUSERS, 'vae', 'diffusion_pytorch_model.safetensors')), 'UNSUPPORTED_ARCHITECTURE', 'diffusion_pytorch_model.safetensors', 'standalone VAE');
    assert.equal(e.details.detected, 'vae-only');
  });

  test('a pickle .ckpt: PICKLE_CHECKPOINT telling the user to use .safetensors', () => {
    const p = path.join(tmp, 'model.ckpt');
    fs.writeFileSync(p, Buffer.from([0x50, 0x4b, 0x03, 0x04, 0x14, 0, 0, 0, 0, 0, 0, 0]));
    rejects(() => openModel(p), 'PICKLE_CHECKPOINT', 'model.ckpt', 'pickle', /convert the model as \.safetensors/);
  });

  test('the same pickle bytes named .safetensors: PICKLE_CHECKPOINT from the content', () => {
    const p = path.join(tmp, 'renamed-pickle.safetensors');
    fs.writeFileSync(p, Buffer.from([0x50, 0x4b, 0x03, 0x04, 0x14, 0, 0, 0, 0, 0, 0, 0]));
    rejects(() => openModel(p), 'PICKLE_CHECKPOINT', 'renamed-pickle.safetensors', 'pickle', /Convert it to \.safetensors/);
  });

  test('a path that does not exist: MODEL_NOT_FOUND', () => {
    const p = path.join(tmp, 'no-such-model.safetensors');
    const e = rejects(() => openModel(p), 'MODEL_NOT_FOUND', p);
    assert.equal(e.details.file, p);
  });

  test('a folder that is not a model: UNKNOWN_MODEL_FORMAT', () => {
    const dir = path.join(tmp, 'holiday-photos');
    fs.mkdirSync(dir);
    fs.writeFileSync(path.join(dir, 'notes.txt'), 'not a model');
    rejects(() => openModel(dir), 'UNKNOWN_MODEL_FORMAT', dir, 'model_index.json');
  });

  test('a safetensors file with no SD keys: UNKNOWN_MODEL_FORMAT listing its first keys', () => {
    const p = syntheticFile('embedding.safetensors', { emb_params: [4, 768] });
    rejects(() => openModel(p), 'UNKNOWN_MODEL_FORMAT', '`embedding.safetensors`', 'emb_params');
  });
});

describe('openModel rejects invalid configs', () => {
  test('a unet/config.json that is not JSON: BAD_CONFIG naming the file', () => {
    const dir = linkedFolder('bad-json', ['unet']);
    const unet = linkedComponent(dir, 'unet', ['config.json']);
    fs.writeFileSync(path.join(unet, 'config.json'), '{"block_out_channels": [32, 32,');
    rejects(() => openModel(dir), 'BAD_CONFIG', path.join(unet, 'config.json'), 'not valid JSON');
  });

  test('a config field of the wrong type: BAD_CONFIG naming the file and the field', () => {
    const dir = linkedFolder('bad-field', ['vae']);
    const vae = linkedComponent(dir, 'vae', ['config.json']);
    fs.writeFileSync(path.join(vae, 'config.json'), JSON.stringify({ ...fixtureJson('vae/config.json'), layers_per_block: 'two' }));
    const e = rejects(() => openModel(dir), 'BAD_CONFIG', path.join(vae, 'config.json'), '`layers_per_block`', '"two"');
    assert.equal(e.details.key, 'layers_per_block');
  });

  test('a checkpoint YAML without num_heads or num_head_channels: BAD_CONFIG naming the YAML', () => {
    const dir = path.join(tmp, 'bad-yaml');
    fs.mkdirSync(dir);
    const p = path.join(dir, 'tiny.safetensors');
    fs.symlinkSync(SINGLE, p);
    const yaml = path.join(dir, 'tiny.yaml');
    fs.writeFileSync(yaml, fs.readFileSync(SINGLE_YAML, 'utf-8').replace(/^\s*num_heads: 8\n/m, ''));
    assert.ok(!fs.readFileSync(yaml, 'utf-8').includes('num_heads'));
    rejects(() => openModel(p, { configDir: DIFFUSERS }), 'BAD_CONFIG', yaml, 'num_heads');
  });
});

describe('the engine rejects malformed inputs before building or running anything', () => {
  const f32 = (shape: number[]): Tensor => ({ dtype: 'float32', shape, data: new Float32Array(shape.reduce((a, b) => a * b, 1)) });

  /** A fresh engine per case: the input must be refused before the graph's session is built (no bind report). */
  async function refusedInput(kind: 'unet' | 'text_encoder', call: (engine: Sd15Engine) => Promise<unknown>, input: string, ...culprits: string[]): Promise<void> {
    const engine = Sd15Engine.open(DIFFUSERS, { device: 'cpu', cacheDir });
    try {
      const e = await rejectsAsync(() => call(engine), 'SHAPE_MISMATCH', input, ...culprits);
      assert.equal(e.details.input, input);
      assert.equal(engine.bindReport(kind), undefined, `the ${kind} session was built before ${input} was checked`);
    } finally {
      await engine.dispose();
    }
  }

  test('runUnet with a 3-channel sample', async () => {
    await refusedInput('unet', (e) => e.runUnet({ sample: f32([1, 3, 8, 8]), timestep: f32([1]), encoderHiddenStates: f32([1, 77, 32]) }), 'sample', '[1, 3, 8, 8]', '(batch, 4,');
  });

  test('runUnet with text embeddings of the wrong width', async () => {
    await refusedInput('unet', (e) => e.runUnet({ sample: f32([1, 4, 8, 8]), timestep: f32([1]), encoderHiddenStates: f32([1, 77, 768]) }), 'encoder_hidden_states', '[1, 77, 768]', ', 32)');
  });

  test('encodeText with a token id outside the vocabulary', async () => {
    const ids = new BigInt64Array(77).fill(49407n);
    ids[5] = 49408n;
    await refusedInput('text_encoder', (e) => e.encodeText({ dtype: 'int64', shape: [1, 77], data: ids }), 'input_ids', '49408', '0…49407');
  });

  test('encodeText with more than 77 tokens', async () => {
    await refusedInput('text_encoder', (e) => e.encodeText({ dtype: 'int64', shape: [1, 78], data: new BigInt64Array(78) }), 'input_ids', '[1, 78]', '≤77');
  });
});

// ---- detection and inference from data ----------------------------------------------------------

describe('detectCheckpoint decides from keys and shapes, not names or metadata', () => {
  test('the tiny single file is SD 1.x, from its cross-attention width', () => {
    const f = openSafetensors(SINGLE);
    try {
      const d = detectCheckpoint(f);
      assert.equal(d.kind, 'sd1');
      assert.match(d.evidence, /attn2\.to_k\.weight takes 32-wide/);
    } finally {
      f.close();
    }
  });

  test('an SD 1.5 file named and labelled as SDXL is SD 1.x; an SDXL file labelled SD 1.5 is SDXL', () => {
    const sd1 = syntheticFile(
      'sd_xl_base_1.0.safetensors',
      { 'model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight': [320, 768] },
      { 'modelspec.architecture': 'stable-diffusion-xl-v1-base' },
    );
    const xl = syntheticFile('v1-5-pruned-emaonly.safetensors', SDXL_SHAPES, { 'modelspec.architecture': 'stable-diffusion-v1' });
    const sd2 = syntheticFile('v1-5-looking.safetensors', { 'model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight': [320, 1024] });
    const kinds = [sd1, xl, sd2].map((p) => {
      const f = openSafetensors(p);
      try {
        return detectCheckpoint(f).kind;
      } finally {
        f.close();
      }
    });
    assert.deepEqual(kinds, ['sd1', 'sdxl', 'sd2']);
  });
});

describe('single-file configs from tensor shapes and from the YAML', () => {
  const diffusersUnet = parseUnetConfig(fixtureJson('unet/config.json'), 'unet/config.json');
  const diffusersVae = parseVaeConfig(fixtureJson('vae/config.json'), 'vae/config.json');

  test('inferUnetConfig gives the diffusers UNet config (sample_size is not in the shapes: SD default 64)', () => {
    const f = openSafetensors(SINGLE);
    try {
      const inferred = parseUnetConfig(inferUnetConfig(f), 'inferred');
      assert.equal(diffusersUnet.sampleSize, 32);
      assert.deepEqual(inferred, { ...diffusersUnet, sampleSize: 64 });
    } finally {
      f.close();
    }
  });

  test('inferVaeConfig gives the diffusers VAE config', () => {
    const f = openSafetensors(SINGLE);
    try {
      assert.deepEqual(parseVaeConfig(inferVaeConfig(f), 'inferred'), diffusersVae);
    } finally {
      f.close();
    }
  });

  test('readLdmYaml of tiny-sd15.yaml gives the diffusers UNet and VAE configs', () => {
    const y = readLdmYaml(SINGLE_YAML);
    assert.deepEqual(parseUnetConfig(y.unet, SINGLE_YAML), diffusersUnet);
    assert.deepEqual(parseVaeConfig(y.vae, SINGLE_YAML), diffusersVae);
    assert.equal(y.scaleFactor, 0.18215);
    assert.equal(y.scheduler.beta_end, 0.012);
  });

  test('a YAML beside the checkpoint gives the UNet and VAE configs and wins over the config folder', () => {
    const m = openModel(SINGLE, { configDir: DIFFUSERS });
    try {
      assert.equal(m.configSources.unet, SINGLE_YAML);
      assert.equal(m.configSources.vae, SINGLE_YAML);
      assert.equal(m.configSources.text_encoder, path.join(DIFFUSERS, 'text_encoder', 'config.json'));
      assert.deepEqual(m.unet, diffusersUnet);
      assert.deepEqual(m.vae, diffusersVae);
    } finally {
      m.close();
    }
  });

  test('without YAML or config folder the 32-wide text encoder cannot be inferred: BAD_CONFIG asking for a config folder', () => {
    rejects(() => openModel(singleWithoutYaml()), 'BAD_CONFIG', 'tiny-sd15.safetensors', '32-wide text encoder', 'text_encoder/config.json', '--config');
  });

  test('with a config folder holding only text_encoder/config.json, the UNet and VAE configs come from the shapes', () => {
    const configDir = textEncoderConfigOnly();
    const m = openModel(singleWithoutYaml(), { configDir });
    try {
      assert.equal(m.configSources.unet, 'inferred from the tensor shapes of tiny-sd15.safetensors');
      assert.equal(m.configSources.vae, 'inferred from the tensor shapes of tiny-sd15.safetensors');
      assert.equal(m.configSources.text_encoder, path.join(configDir, 'text_encoder', 'config.json'));
      assert.deepEqual(m.unet, { ...diffusersUnet, sampleSize: 64 });
      assert.deepEqual(m.vae, diffusersVae);
      assert.equal(m.textEncoder.numAttentionHeads, 4);
      assert.equal(m.textEncoder.hiddenSize, 32);
    } finally {
      m.close();
    }
  });
});

describe('single-file tokenizer lookup', () => {
  const saved = { CHORUS_TOKENIZER: process.env.CHORUS_TOKENIZER, HF_HOME: process.env.HF_HOME };
  before(() => {
    process.env.CHORUS_TOKENIZER = fs.mkdtempSync(path.join(tmp, 'empty-tokenizer-'));
    process.env.HF_HOME = fs.mkdtempSync(path.join(tmp, 'empty-hf-home-'));
  });
  after(() => {
    for (const [k, v] of Object.entries(saved)) {
      if (v === undefined) delete process.env[k];
      else process.env[k] = v;
    }
  });

  test('no tokenizer anywhere (CHORUS_TOKENIZER has vocab.json but no merges.txt): MISSING_COMPONENT naming both files', () => {
    fs.symlinkSync(path.join(DIFFUSERS, 'tokenizer', 'vocab.json'), path.join(process.env.CHORUS_TOKENIZER!, 'vocab.json'));
    const m = openModel(singleWithoutYaml(), { configDir: textEncoderConfigOnly() });
    try {
      const e = rejects(() => m.loadTokenizer(), 'MISSING_COMPONENT', 'tiny-sd15.safetensors', 'vocab.json', 'merges.txt', '--tokenizer');
      assert.equal(e.details.component, 'tokenizer');
    } finally {
      m.close();
    }
  });

  test('with tokenizerDir the tokenizer loads and gives the reference ids', () => {
    const m = openModel(singleWithoutYaml(), { configDir: textEncoderConfigOnly(), tokenizerDir: path.join(DIFFUSERS, 'tokenizer') });
    try {
      const expected = Array.from(refInput('text_encoder', 'input_ids').data as BigInt64Array, Number).slice(0, 77);
      assert.deepEqual(m.loadTokenizer().encodePadded('a photo of a cat').inputIds, expected);
    } finally {
      m.close();
    }
  });
});

describe('legacy key spellings load and compute the same', () => {
  test('diffusers VAE with pre-0.14 attention names (query/key/value/proj_attn) decodes identically', async () => {
    const legacy: Record<string, string> = { to_q: 'query', to_k: 'key', to_v: 'value', 'to_out.0': 'proj_attn' };
    const dir = linkedFolder('legacy-vae', ['vae']);
    const vae = linkedComponent(dir, 'vae', ['diffusion_pytorch_model.safetensors']);
    const file = path.join(vae, 'diffusion_pytorch_model.safetensors');
    reencode(path.join(DIFFUSERS, 'vae', 'diffusion_pytorch_model.safetensors'), file, (k) =>
      k.replace(/^((?:en|de)coder\.mid_block\.attentions\.0)\.(to_q|to_k|to_v|to_out\.0)\./, (_, m: string, n: string) => `${m}.${legacy[n]}.`),
    );
    const names = Object.keys(rawHeader(file).json);
    assert.ok(names.includes('decoder.mid_block.attentions.0.proj_attn.weight') && !names.some((k) => /mid_block\.attentions\.0\.to_/.test(k)));

    const [c] = refCases('vae_decode');
    const latents = refInput('vae_decode', 'latents_scaled');
    const a = Sd15Engine.open(DIFFUSERS, { device: 'cpu', cacheDir });
    const b = Sd15Engine.open(dir, { device: 'cpu', cacheDir });
    try {
      const ref = openSafetensors(path.join(REF, c!.file));
      const expected = ref.readFloat32(c!.outputs.decoder_output!.key).data;
      ref.close();
      const fromFixture = (await a.decodeLatents(latents)).decoderOutput.data;
      const fromLegacy = (await b.decodeLatents(latents)).decoderOutput.data;
      assertClose(fromFixture, expected, c!.tolerance.atol!, 'fixture decoder_output');
      assert.deepEqual(fromLegacy, fromFixture);
    } finally {
      await a.dispose();
      await b.dispose();
    }
  });

  test('a single file whose text encoder lacks the text_model. level encodes identically', async () => {
    const p = path.join(tmp, 'old-merge.safetensors');
    reencode(SINGLE, p, (k) => k.replace(/^cond_stage_model\.transformer\.text_model\./, 'cond_stage_model.transformer.'));
    const names = Object.keys(rawHeader(p).json);
    assert.ok(names.includes('cond_stage_model.transformer.embeddings.token_embedding.weight') && !names.some((k) => k.includes('text_model.')));

    const ids = refInput('text_encoder', 'input_ids');
    const a = Sd15Engine.open(SINGLE, { device: 'cpu', cacheDir, configDir: DIFFUSERS });
    const b = Sd15Engine.open(p, { device: 'cpu', cacheDir, configDir: DIFFUSERS });
    try {
      const x = await a.encodeText(ids);
      const y = await b.encodeText(ids);
      assert.ok(x.lastHiddenState.data.some((v) => v !== 0));
      assert.deepEqual(y.lastHiddenState.data, x.lastHiddenState.data);
      assert.deepEqual(y.penultimateRaw.data, x.penultimateRaw.data);
      assert.deepEqual(y.penultimateFinalLn.data, x.penultimateFinalLn.data);
    } finally {
      await a.dispose();
      await b.dispose();
    }
  });
});
