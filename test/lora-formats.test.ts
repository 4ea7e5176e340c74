/**
 * LoRA file formats → `LoraModule`s for a model, checked against:
 * - `tiny-sd15-lora/` (kohya, LoCon, PEFT, diffusers): every module, rank, alpha and scale as
 *   `lora_modules.json` lists them, and ΔW equal to the reference merges in `tiny-sd15-ref/lora.safetensors`;
 * - the real files in `realworld/lora/` (LoKr, diffusers, attention processors, SD 2.x, cloneofsimo) against the
 *   real SD 1.5 layer shapes (graphs built from `sd15-keys/` configs, no weights);
 * - header descriptions without weights (`realworld/lora/headers/`) for scheme and base-model detection;
 * - synthetic LoHa / LoKr / CP-LoCon / full-diff / SGM-named files written here from a seed, compared with
 *   naive float64 formulas of their ΔW.
 */
import { after, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { ModelError } from '../models/errors.ts';
import { moduleLayers, unetModuleMap } from '../models/keys/ldm.ts';
import { parseLoraKey } from '../models/lora/keys.ts';
import { detectLoraScheme, loadLora, loraTargetsFromParams, matchLoraModules, type LdmModuleMap, type LoadedLora, type LoraTensorInfo } from '../models/lora/load.ts';
import type { LoraModule, LoraTarget, ModuleDelta } from '../models/lora/types.ts';
import { parseClipTextConfig, parseUnetConfig } from '../models/networks/config.ts';
import { buildClipTextGraph } from '../models/networks/clip-text.ts';
import { buildUnetGraph } from '../models/networks/unet.ts';
import { openSafetensors, writeSafetensors } from '../models/safetensors.ts';
import type { Tensor } from '../models/tensor.ts';
import { FIXTURES, REALWORLD, REF, assertClose, readManifest, refCases } from './fixtures.ts';

/** ΔW from the loader vs W' − W of the reference merge (float64 merge stored as float32, |W| < 1). */
const LORA_DELTA_ATOL = 1e-6;
/** Our exact rewrites (LoHa/LoKr as low-rank, CP folded) vs the naive float64 formula, values O(0.1). */
const REWRITE_ATOL = 1e-6;

const LORA_DIR = path.join(FIXTURES, 'tiny-sd15-lora');
const REAL_LORA_DIR = path.join(REALWORLD, 'lora');
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'chorus-lora-formats-'));
after(() => fs.rmSync(tmp, { recursive: true, force: true }));

const readJson = (p: string): any => JSON.parse(fs.readFileSync(p, 'utf8'));

// ---- targets from the real graphs ----

function targetsOf(unetConfig: unknown, textConfig: unknown, source: string): LoraTarget[] {
  const unet = buildUnetGraph(parseUnetConfig(unetConfig, `${source} unet`));
  const text = buildClipTextGraph(parseClipTextConfig(textConfig, `${source} text_encoder`));
  return [...loraTargetsFromParams('unet', unet.params), ...loraTargetsFromParams('text_encoder', text.params)];
}

const TINY_UNET_CONFIG = readJson(path.join(FIXTURES, 'tiny-sd15/unet/config.json'));
const TINY_TARGETS = targetsOf(TINY_UNET_CONFIG, readJson(path.join(FIXTURES, 'tiny-sd15/text_encoder/config.json')), 'tiny-sd15');
const SD15_TARGETS = targetsOf(
  readJson(path.join(FIXTURES, 'sd15-keys/unet_diffusers.json')).config,
  readJson(path.join(FIXTURES, 'sd15-keys/text_encoder_diffusers.json')).config,
  'sd15-keys',
);

/** LDM layer path → diffusers layer, from the project's generated UNet key map. */
function ldmMapFor(unetConfig: unknown): LdmModuleMap {
  const layers = moduleLayers(unetModuleMap(parseUnetConfig(unetConfig, 'unet config')));
  return new Map(layers.map((l) => [l.ldm, { component: 'unet' as const, module: l.diffusers }]));
}

// ---- helpers ----

/** ΔW of a module in float64 (naive), scale applied: the form the reference merges add. */
function denseDelta(d: ModuleDelta): Float64Array {
  if (d.kind === 'full') return Float64Array.from(d.diff);
  const [out, r] = d.upShape;
  const cols = d.down.length / r;
  const w = new Float64Array(out * cols);
  for (let o = 0; o < out; o++) for (let j = 0; j < r; j++) for (let x = 0; x < cols; x++) w[o * cols + x]! += d.scale * d.up[o * r + j]! * d.down[j * cols + x]!;
  return w;
}

type LowRank = Extract<ModuleDelta, { kind: 'lowrank' }>;

/** The module's delta, asserted low-rank. (Every assert.ok here carries a message: Node's generated one
 * re-parses the source and can hang under the TS loader.) */
function lowrank(m: LoraModule): LowRank {
  assert.equal(m.delta.kind, 'lowrank', `${m.component}.${m.module} is ${m.delta.kind}`);
  return m.delta as LowRank;
}

function moduleOf(lora: LoadedLora, component: string, module: string): LoraModule {
  const m = lora.modules.find((x) => x.component === component && x.module === module);
  assert.ok(m !== undefined, `${lora.name}: no module ${component}.${module}`);
  return m;
}

/** A seeded uniform generator in [-scale, scale) (mulberry32). */
function random(seed: number, scale: number): (n: number) => Float32Array {
  let s = seed >>> 0;
  const next = (): number => {
    s = (s + 0x6d2b79f5) >>> 0;
    let t = s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  return (n) => Float32Array.from({ length: n }, () => (next() * 2 - 1) * scale);
}

const f32 = (shape: number[], data: Float32Array | number[]): Tensor => ({ dtype: 'float32', shape, data: data instanceof Float32Array ? data : Float32Array.from(data) });

function writeLora(name: string, tensors: Record<string, Tensor>, metadata?: Record<string, string>): string {
  const file = path.join(tmp, name);
  writeSafetensors(file, tensors, metadata);
  return file;
}

/** All tensors of a fixture file, as written. */
function readAll(file: string): Record<string, Tensor> {
  const st = openSafetensors(file);
  try {
    return Object.fromEntries(st.names().map((k) => [k, st.read(k)]));
  } finally {
    st.close();
  }
}

/** C = A·B in float64, row-major. */
function matmul64(a: ArrayLike<number>, b: ArrayLike<number>, m: number, k: number, n: number): Float64Array {
  const c = new Float64Array(m * n);
  for (let i = 0; i < m; i++) for (let p = 0; p < k; p++) for (let j = 0; j < n; j++) c[i * n + j]! += a[i * k + p]! * b[p * n + j]!;
  return c;
}

/** kron(A [m, n], B [p, q]) in float64, the textbook definition. */
function kron64(a: ArrayLike<number>, m: number, n: number, b: ArrayLike<number>, p: number, q: number): Float64Array {
  const out = new Float64Array(m * p * n * q);
  for (let i = 0; i < m * p; i++) for (let j = 0; j < n * q; j++) out[i * n * q + j] = a[Math.floor(i / p) * n + Math.floor(j / q)]! * b[(i % p) * q + (j % q)]!;
  return out;
}

function rejects(fn: () => unknown, code: string, file: string, culprit: string): ModelError {
  let caught: unknown;
  assert.throws(fn, (e: unknown) => {
    caught = e;
    return true;
  });
  assert.ok(caught instanceof ModelError, `expected ModelError, got ${String(caught)}`);
  assert.equal(caught.code, code, caught.message);
  assert.ok(caught.message.includes(path.basename(file)), `message names the file: ${caught.message}`);
  assert.ok(caught.message.includes(culprit), `message names ${culprit}: ${caught.message}`);
  return caught;
}

/** A header description (InvokeAI stripped-model JSON): tensor name → shape, no weights. */
function headerKeys(file: string): Map<string, LoraTensorInfo> {
  const raw = readJson(file) as Record<string, { shape?: unknown }>;
  const keys = new Map<string, LoraTensorInfo>();
  for (const [k, v] of Object.entries(raw)) if (Array.isArray(v.shape)) keys.set(k, { shape: v.shape as number[] });
  return keys;
}

const MODULES_JSON = readJson(path.join(LORA_DIR, 'lora_modules.json'));
const REAL_MANIFEST = readManifest(path.join(REALWORLD, 'manifest.json'));
const realEntry = (file: string): any => REAL_MANIFEST.loras.find((l: { file: string }) => l.file === `lora/${file}`);

const component = (dotted: string) => (dotted.startsWith('unet.') ? 'unet' : 'text_encoder');
const withoutComponent = (dotted: string) => dotted.slice(dotted.indexOf('.') + 1);

// ---- tests ----

describe('LoRA key names', () => {
  const ATTN = 'down_blocks.1.attentions.0.transformer_blocks.0.attn1';
  const TE_ATTN = 'text_model.encoder.layers.3.self_attn';
  /** key → scheme, component, module (dotted) or stem (kohya), part. */
  const factors: ReadonlyArray<readonly [string, string | undefined, string, string, string]> = [
    ['lora_unet_down_blocks_1_attentions_0_proj_in.lora_down.weight', 'kohya', 'unet', 'lora_unet_down_blocks_1_attentions_0_proj_in', 'lora_down'],
    ['lora_te_text_model_encoder_layers_0_mlp_fc1.alpha', 'kohya', 'text_encoder', 'lora_te_text_model_encoder_layers_0_mlp_fc1', 'alpha'],
    ['lora_unet_input_blocks_4_1_proj_in.hada_w1_a', 'kohya', 'unet', 'lora_unet_input_blocks_4_1_proj_in', 'hada_w1_a'],
    ['lora_unet_down_blocks_0_resnets_0_conv1.lokr_t2', 'kohya', 'unet', 'lora_unet_down_blocks_0_resnets_0_conv1', 'lokr_t2'],
    [`unet.${ATTN}.to_q.lora_A.weight`, 'peft', 'unet', `${ATTN}.to_q`, 'lora_down'],
    [`unet.${ATTN}.to_q.lora_B.default_0.weight`, 'peft', 'unet', `${ATTN}.to_q`, 'lora_up'],
    [`base_model.model.${TE_ATTN}.k_proj.lora_A.weight`, 'peft', 'text_encoder', `${TE_ATTN}.k_proj`, 'lora_down'],
    [`base_model.model.${ATTN}.to_v.lora_magnitude_vector`, 'peft', 'unet', `${ATTN}.to_v`, 'dora_scale'],
    [`unet.${ATTN}.to_out.0.lora.up.weight`, 'diffusers', 'unet', `${ATTN}.to_out.0`, 'lora_up'],
    [`text_encoder.${TE_ATTN}.out_proj.lora_linear_layer.down.weight`, 'diffusers', 'text_encoder', `${TE_ATTN}.out_proj`, 'lora_down'],
    [`${ATTN}.processor.to_out_lora.down.weight`, 'diffusers-attnproc', 'unet', `${ATTN}.to_out.0`, 'lora_down'],
    [`unet.${ATTN}.processor.to_k_lora.up.weight`, 'diffusers-attnproc', 'unet', `${ATTN}.to_k`, 'lora_up'],
    [`text_encoder.${TE_ATTN}.to_q_lora.down.weight`, 'diffusers-attnproc', 'text_encoder', `${TE_ATTN}.q_proj`, 'lora_down'],
    [`unet.${ATTN}.to_q.alpha`, undefined, 'unet', `${ATTN}.to_q`, 'alpha'],
  ];
  for (const [key, scheme, comp, where, part] of factors) {
    test(key, () => {
      const parsed = parseLoraKey(key);
      const described =
        parsed.kind === 'factor'
          ? [parsed.scheme, parsed.address.component, parsed.address.kind === 'flat' ? parsed.address.stem : parsed.address.module, parsed.part]
          : parsed;
      assert.deepEqual(described, [scheme, comp, where, part]);
    });
  }

  const foreign: ReadonlyArray<readonly [string, string]> = [
    ['lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight', 'sdxl'],
    ['text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight', 'sdxl'],
    ['unet.add_embedding.linear_1.lora_A.weight', 'sdxl'],
    ['transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight', 'flux'],
    ['lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight', 'flux'],
    ['transformer.transformer_blocks.0.attn.add_q_proj.lora_A.weight', 'dit'],
    ['lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight', 'sd3'],
  ];
  for (const [key, family] of foreign) test(`${key} (${family})`, () => assert.deepEqual(parseLoraKey(key), { kind: 'foreign', family }));

  for (const key of ['lora_unet_down_blocks_0_attentions_0_proj_in.lora_sideways.weight', 'model.diffusion_model.input_blocks.1.1.proj_in.weight']) {
    test(`${key} (unknown)`, () => assert.deepEqual(parseLoraKey(key), { kind: 'unknown' }));
  }
});

describe('LoRA formats: tiny fixtures', () => {
  const loaded = new Map<string, LoadedLora>();
  const load = (file: string): LoadedLora => {
    let l = loaded.get(file);
    if (l === undefined) {
      l = loadLora(path.join(LORA_DIR, file), TINY_TARGETS);
      loaded.set(file, l);
    }
    return l;
  };

  for (const [file, format, total] of [
    ['lora_kohya_a.safetensors', 'kohya', 216],
    ['lora_kohya_b_locon.safetensors', 'kohya', 301],
    ['lora_peft.safetensors', 'peft', 144],
    ['lora_diffusers.safetensors', 'diffusers', 144],
  ] as const) {
    test(`${file}: ${format}, all ${total} modules matched with the ranks, alphas and scales of lora_modules.json`, () => {
      const lora = load(file);
      const listed: any[] = MODULES_JSON[file].modules;
      assert.equal(lora.format, format);
      assert.equal(listed.length, total);
      assert.equal(lora.coverage.totalModulesInFile, total);
      assert.equal(lora.coverage.matched, total);
      assert.deepEqual(lora.coverage.unmatched, []);
      assert.deepEqual([...lora.coverage.targetedComponents].sort(), ['text_encoder', 'unet']);
      assert.equal(lora.needsMergedWeights, false);
      assert.equal(lora.name, file.replace('.safetensors', ''));
      assert.deepEqual(
        lora.modules.map((m) => `${m.component}.${m.module}`).sort(),
        listed.map((m) => m.module).sort(),
      );
      for (const entry of listed) {
        const d = lowrank(moduleOf(lora, component(entry.module), withoutComponent(entry.module)));
        assert.equal(d.upShape[1], entry.rank, `${entry.module} rank`);
        assert.equal(d.scale, entry.alpha / entry.rank, `${entry.module} scale`);
        assert.deepEqual(d.upShape, [entry.weight_shape[0], entry.rank]);
        assert.deepEqual(d.downShape, [entry.rank, ...entry.weight_shape.slice(1)], `${entry.module} down shape (${entry.kind})`);
      }
    });
  }

  test('kohya metadata is passed through; a file without metadata gives an empty record', () => {
    assert.equal(MODULES_JSON['lora_kohya_a.safetensors'].has_metadata, true);
    assert.ok(Object.keys(load('lora_kohya_a.safetensors').metadata).some((k) => k.startsWith('ss_')), 'kohya_a has ss_* metadata');
    assert.deepEqual(load('lora_kohya_b_locon.safetensors').metadata, {});
  });

  test('lora_peft and lora_diffusers give identical modules', () => {
    const strip = (l: LoadedLora) => l.modules.map(({ component, module, delta }) => ({ component, module, delta })).sort((a, b) => (a.module < b.module ? -1 : 1));
    assert.deepStrictEqual(strip(load('lora_peft.safetensors')), strip(load('lora_diffusers.safetensors')));
  });

  test('ΔW · multiplier equals W′ − W of every reference merge (incl. 3×3 conv and two stacked LoRAs)', () => {
    const ref = openSafetensors(path.join(REF, 'lora.safetensors'));
    const bases = {
      unet: openSafetensors(path.join(FIXTURES, 'tiny-sd15/unet/diffusion_pytorch_model.safetensors')),
      text_encoder: openSafetensors(path.join(FIXTURES, 'tiny-sd15/text_encoder/model.safetensors')),
    };
    try {
      const cases = refCases('lora');
      assert.ok(cases.length >= 5, `${cases.length} lora cases`);
      let checked = 0;
      let conv3x3 = 0;
      for (const c of cases) {
        const stack = (c.loras as { file: string; multiplier: number }[]).map((l) => ({ lora: load(l.file), multiplier: l.multiplier }));
        const debug = c.outputs.merged_weights_debug as unknown as Record<string, { key: string; shape: number[] }>;
        for (const [weightKey, { key, shape }] of Object.entries(debug)) {
          const comp = component(weightKey);
          const module = withoutComponent(weightKey).replace(/\.weight$/, '');
          const base = bases[comp].readFloat32(`${module}.weight`).data;
          const merged = ref.readFloat32(key).data;
          const expected = merged.map((v, i) => v - base[i]!);
          const actual = new Float64Array(expected.length);
          for (const { lora, multiplier } of stack) {
            const m = lora.modules.find((x) => x.component === comp && x.module === module);
            if (m === undefined) continue;
            denseDelta(m.delta).forEach((v, i) => (actual[i]! += multiplier * v));
          }
          assertClose(actual, expected, LORA_DELTA_ATOL, `${c.id} ${weightKey}`);
          checked++;
          if (shape.length === 4 && shape[2] === 3) conv3x3++;
        }
      }
      assert.ok(checked >= 20 && conv3x3 >= 3, `${checked} weights, ${conv3x3} 3×3 convs`);
    } finally {
      ref.close();
      bases.unet.close();
      bases.text_encoder.close();
    }
  });

  test('a file with SGM/compvis UNet names loads to the same modules through the LDM key map', () => {
    const original = readAll(path.join(LORA_DIR, 'lora_kohya_a.safetensors'));
    const ldmMap = ldmMapFor(TINY_UNET_CONFIG);
    const toLdm = new Map([...ldmMap].map(([ldm, { module }]) => [`lora_unet_${module.replaceAll('.', '_')}`, `lora_unet_${ldm.replaceAll('.', '_')}`]));
    const renamed: Record<string, Tensor> = {};
    let ldmNames = 0;
    for (const [key, t] of Object.entries(original)) {
      const dot = key.indexOf('.');
      const stem = key.slice(0, dot);
      const ldm = toLdm.get(stem);
      if (stem.startsWith('lora_unet_')) assert.ok(ldm !== undefined, `no LDM name for ${stem}`);
      if (ldm !== undefined) ldmNames++;
      renamed[(ldm ?? stem) + key.slice(dot)] = t;
    }
    assert.ok(ldmNames > 400, `${ldmNames} keys renamed`);
    assert.ok('lora_unet_input_blocks_1_1_proj_in.lora_down.weight' in renamed, 'input_blocks.1.1.proj_in renamed');
    assert.ok('lora_unet_middle_block_1_transformer_blocks_0_attn2_to_k.alpha' in renamed, 'middle_block.1 attn2.to_k renamed');
    const file = writeLora('lora_kohya_a_ldm.safetensors', renamed);

    const viaLdm = loadLora(file, TINY_TARGETS, { ldmModuleMap: ldmMap });
    assert.equal(viaLdm.format, 'kohya-ldm');
    assert.equal(viaLdm.coverage.matched, 216);
    const strip = (l: LoadedLora) => l.modules.map(({ component, module, delta }) => ({ component, module, delta })).sort((a, b) => (`${a.component}.${a.module}` < `${b.component}.${b.module}` ? -1 : 1));
    assert.deepStrictEqual(strip(viaLdm), strip(load('lora_kohya_a.safetensors')));

    // Without the map the UNet half cannot be placed, and a LoRA is not applied half-way.
    const e = rejects(() => loadLora(file, TINY_TARGETS), 'UNKNOWN_LORA_FORMAT', file, '`lora_unet_input_blocks_1_1_proj_in`');
    assert.match(e.message, /192 of its 216 modules use SGM\/compvis.*no LDM module map.*only 24/);
  });

  test('a few modules this model lacks are coverage entries, not errors', () => {
    const tensors = readAll(path.join(LORA_DIR, 'lora_kohya_a.safetensors'));
    const rnd = random(7, 0.1);
    tensors['lora_unet_mid_block_attentions_0_transformer_blocks_1_attn1_to_q.lora_down.weight'] = f32([4, 64], rnd(256));
    tensors['lora_unet_mid_block_attentions_0_transformer_blocks_1_attn1_to_q.lora_up.weight'] = f32([64, 4], rnd(256));
    tensors['lora_unet_down_blocks_3_attentions_0_proj_out.lora_down.weight'] = f32([4, 32], rnd(128));
    tensors['lora_unet_down_blocks_3_attentions_0_proj_out.lora_up.weight'] = f32([32, 4], rnd(128));
    tensors['lora_unet_conv_in.lora_down.weight'] = f32([4, 9, 3, 3], rnd(4 * 81));
    tensors['lora_unet_conv_in.lora_up.weight'] = f32([32, 4, 1, 1], rnd(128));
    const file = writeLora('kohya_a_plus_extra.safetensors', tensors);
    const lora = loadLora(file, TINY_TARGETS);
    assert.equal(lora.coverage.totalModulesInFile, 219);
    assert.equal(lora.coverage.matched, 216);
    assert.deepEqual(
      lora.coverage.unmatched.map((u) => [u.key, u.cause]),
      [
        ['lora_unet_conv_in', 'shape-differs'],
        ['lora_unet_down_blocks_3_attentions_0_proj_out', 'no-such-layer'],
        ['lora_unet_mid_block_attentions_0_transformer_blocks_1_attn1_to_q', 'no-such-layer'],
      ],
    );
    assert.match(lora.coverage.unmatched[0]!.reason, /\[32, 9, 3, 3\].*\[32, 4, 3, 3\]/);
  });
});

describe('LoRA formats: PEFT alpha', () => {
  const peftTensors = () => readAll(path.join(LORA_DIR, 'lora_peft.safetensors'));
  const scales = (l: LoadedLora, comp: string) => new Set(l.modules.filter((m) => m.component === comp).map((m) => (m.delta.kind === 'lowrank' ? m.delta.scale : NaN)));

  test('from diffusers `lora_adapter_metadata` (per component, alpha_pattern, rsLoRA)', () => {
    const metadata = {
      format: 'pt',
      lora_adapter_metadata: JSON.stringify({
        'unet.r': 4,
        'unet.lora_alpha': 8,
        'unet.alpha_pattern': { 'attn2.to_k': 2 },
        'text_encoder.r': 4,
        'text_encoder.lora_alpha': 6,
        'text_encoder.use_rslora': true,
      }),
    };
    const lora = loadLora(writeLora('peft_meta.safetensors', peftTensors(), metadata), TINY_TARGETS);
    assert.equal(lora.format, 'peft');
    const toK = lora.modules.filter((m) => m.module.endsWith('attn2.to_k'));
    assert.ok(toK.length > 0, 'attn2.to_k modules');
    for (const m of toK) assert.equal(lowrank(m).scale, 0.5, m.module);
    assert.deepEqual(scales({ ...lora, modules: lora.modules.filter((m) => !m.module.endsWith('attn2.to_k')) }, 'unet'), new Set([2]));
    assert.deepEqual(scales(lora, 'text_encoder'), new Set([6 / Math.sqrt(4)]));
  });

  test('from adapter_config.json beside the file', () => {
    const dir = fs.mkdtempSync(path.join(tmp, 'peft-'));
    const file = path.join(dir, 'adapter_model.safetensors');
    writeSafetensors(file, peftTensors());
    fs.writeFileSync(path.join(dir, 'adapter_config.json'), JSON.stringify({ peft_type: 'LORA', r: 4, lora_alpha: 16, target_modules: ['to_q'] }));
    const lora = loadLora(file, TINY_TARGETS);
    assert.deepEqual(scales(lora, 'unet'), new Set([4]));
    assert.deepEqual(scales(lora, 'text_encoder'), new Set([4]));
  });
});

describe('LoRA formats: LyCORIS and other synthetic files', () => {
  const TO_Q = 'down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q'; // [32, 32]
  const CONV = 'down_blocks.1.resnets.0.conv1'; // [32, 32, 3, 3]
  const FF = 'up_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj'; // [512, 64]
  const kohya = (module: string) => `lora_unet_${module.replaceAll('.', '_')}`;

  test('LoHa: rank r1·r2 low-rank form reproduces (w1a·w1b)⊙(w2a·w2b)·alpha/r1, linear and 3×3 conv (flat and 4-D w1b)', () => {
    const rnd = random(11, 0.3);
    const [r1, r2, alpha] = [3, 2, 5];
    const cases = [
      { module: TO_Q, out: 32, cols: 32, bShape: [32] },
      { module: CONV, out: 32, cols: 288, bShape: [288] },
      { module: FF, out: 512, cols: 64, bShape: [64] },
      { module: 'up_blocks.1.resnets.0.conv1', out: 64, cols: 128 * 9, bShape: [128, 3, 3] },
    ];
    const tensors: Record<string, Tensor> = {};
    const factors = new Map<string, { w1a: Float32Array; w1b: Float32Array; w2a: Float32Array; w2b: Float32Array }>();
    for (const c of cases) {
      const f = { w1a: rnd(c.out * r1), w1b: rnd(r1 * c.cols), w2a: rnd(c.out * r2), w2b: rnd(r2 * c.cols) };
      factors.set(c.module, f);
      const k = kohya(c.module);
      tensors[`${k}.hada_w1_a`] = f32([c.out, r1], f.w1a);
      tensors[`${k}.hada_w1_b`] = f32([r1, ...c.bShape], f.w1b);
      tensors[`${k}.hada_w2_a`] = f32([c.out, r2], f.w2a);
      tensors[`${k}.hada_w2_b`] = f32([r2, ...c.bShape], f.w2b);
      tensors[`${k}.alpha`] = f32([], [alpha]);
    }
    const lora = loadLora(writeLora('loha.safetensors', tensors), TINY_TARGETS);
    assert.equal(lora.format, 'lycoris-loha');
    assert.equal(lora.coverage.matched, cases.length);
    assert.equal(lora.needsMergedWeights, false);
    for (const c of cases) {
      const m = moduleOf(lora, 'unet', c.module);
      const d = lowrank(m);
      assert.equal(d.upShape[1], r1 * r2);
      assert.equal(d.scale, alpha / r1);
      const target = TINY_TARGETS.find((t) => t.module === c.module)!.weightShape;
      assert.deepEqual(d.downShape, [r1 * r2, ...target.slice(1)]);
      const f = factors.get(c.module)!;
      const a = matmul64(f.w1a, f.w1b, c.out, r1, c.cols);
      const b = matmul64(f.w2a, f.w2b, c.out, r2, c.cols);
      const expected = a.map((v, i) => v * b[i]! * (alpha / r1));
      assertClose(denseDelta(m.delta), expected, REWRITE_ATOL, `LoHa ${c.module}`);
    }
  });

  test('LoKr: kron(w1, w2) with alpha/dim when a factor is low-rank, scale 1 when both are whole; low-rank when smaller, full otherwise', () => {
    const rnd = random(23, 0.4);
    const alpha = 3;
    const tensors: Record<string, Tensor> = {};
    // to_q [32, 32]: both factors whole (w1 [4, 4], w2 [8, 8]) → full, scale 1 (alpha ignored).
    const q = { w1: rnd(16), w2: rnd(64) };
    tensors[`${kohya(TO_Q)}.lokr_w1`] = f32([4, 4], q.w1);
    tensors[`${kohya(TO_Q)}.lokr_w2`] = f32([8, 8], q.w2);
    tensors[`${kohya(TO_Q)}.alpha`] = f32([], [alpha]);
    // ff [512, 64]: both low-rank (w1 = [16, 2]·[2, 8], w2 = [32, 2]·[2, 8]) → low-rank rank 4, scale alpha/2.
    const ff = { w1a: rnd(32), w1b: rnd(16), w2a: rnd(64), w2b: rnd(16) };
    tensors[`${kohya(FF)}.lokr_w1_a`] = f32([16, 2], ff.w1a);
    tensors[`${kohya(FF)}.lokr_w1_b`] = f32([2, 8], ff.w1b);
    tensors[`${kohya(FF)}.lokr_w2_a`] = f32([32, 2], ff.w2a);
    tensors[`${kohya(FF)}.lokr_w2_b`] = f32([2, 8], ff.w2b);
    tensors[`${kohya(FF)}.alpha`] = f32([], [alpha]);
    // 3×3 conv [32, 32, 3, 3]: w1 whole [4, 4], w2 = [8, 2]·[2, 8·9] (flat) → scale alpha/2.
    const cv = { w1: rnd(16), w2a: rnd(16), w2b: rnd(2 * 72) };
    tensors[`${kohya(CONV)}.lokr_w1`] = f32([4, 4], cv.w1);
    tensors[`${kohya(CONV)}.lokr_w2_a`] = f32([8, 2], cv.w2a);
    tensors[`${kohya(CONV)}.lokr_w2_b`] = f32([2, 72], cv.w2b);
    tensors[`${kohya(CONV)}.alpha`] = f32([], [alpha]);
    const lora = loadLora(writeLora('lokr.safetensors', tensors), TINY_TARGETS);
    assert.equal(lora.format, 'lycoris-lokr');
    assert.equal(lora.needsMergedWeights, true);

    const mq = moduleOf(lora, 'unet', TO_Q);
    assert.equal(mq.delta.kind, 'full');
    assertClose(denseDelta(mq.delta), kron64(q.w1, 4, 4, q.w2, 8, 8), REWRITE_ATOL, 'LoKr whole factors');

    const mf = moduleOf(lora, 'unet', FF);
    assert.equal(lowrank(mf).upShape[1], 4);
    assert.equal(lowrank(mf).scale, alpha / 2);
    const ffExpected = kron64(matmul64(ff.w1a, ff.w1b, 16, 2, 8), 16, 8, matmul64(ff.w2a, ff.w2b, 32, 2, 8), 32, 8).map((v) => (v * alpha) / 2);
    assertClose(denseDelta(mf.delta), ffExpected, REWRITE_ATOL, 'LoKr low-rank factors');

    const mc = moduleOf(lora, 'unet', CONV);
    assert.equal(lowrank(mc).scale, alpha / 2);
    assert.deepEqual(lowrank(mc).downShape, [8, 32, 3, 3]);
    const convExpected = kron64(cv.w1, 4, 4, matmul64(cv.w2a, cv.w2b, 8, 2, 72), 8, 72).map((v) => (v * alpha) / 2);
    assertClose(denseDelta(mc.delta), convExpected, REWRITE_ATOL, 'LoKr 3×3 conv');
  });

  test('CP LoCon: lora_mid folded into down equals einsum(mid, up, down)', () => {
    const rnd = random(31, 0.3);
    const r = 3;
    const k = kohya(CONV);
    const up = rnd(32 * r);
    const mid = rnd(r * r * 9);
    const down = rnd(r * 32);
    const tensors = {
      [`${k}.lora_up.weight`]: f32([32, r, 1, 1], up),
      [`${k}.lora_mid.weight`]: f32([r, r, 3, 3], mid),
      [`${k}.lora_down.weight`]: f32([r, 32, 1, 1], down),
      [`${k}.alpha`]: f32([], [1.5]),
    };
    const m = moduleOf(loadLora(writeLora('locon_cp.safetensors', tensors), TINY_TARGETS), 'unet', CONV);
    assert.deepEqual(lowrank(m).downShape, [r, 32, 3, 3]);
    // ΔW[i, j, s] = Σ_n Σ_m up[i, n] · mid[n, m, s] · down[m, j] · alpha / r
    const expected = new Float64Array(32 * 32 * 9);
    for (let i = 0; i < 32; i++) for (let j = 0; j < 32; j++) for (let s = 0; s < 9; s++) {
      let acc = 0;
      for (let n = 0; n < r; n++) for (let mm = 0; mm < r; mm++) acc += up[i * r + n]! * mid[(n * r + mm) * 9 + s]! * down[mm * 32 + j]!;
      expected[(i * 32 + j) * 9 + s] = (acc * 1.5) / r;
    }
    assertClose(denseDelta(m.delta), expected, REWRITE_ATOL, 'CP LoCon');
  });

  test('full diffs: `diff` is a full module, `diff_b` is reported as not applied', () => {
    const rnd = random(41, 0.05);
    const diff = rnd(32 * 32);
    const tensors = { [`${kohya(TO_Q)}.diff`]: f32([32, 32], diff), [`${kohya(CONV)}.diff`]: f32([32, 32, 3, 3], rnd(32 * 288)), [`${kohya(CONV)}.diff_b`]: f32([32], rnd(32)) };
    const lora = loadLora(writeLora('full.safetensors', tensors), TINY_TARGETS);
    assert.equal(lora.format, 'lycoris-full');
    assert.equal(lora.needsMergedWeights, true);
    assert.equal(lora.coverage.matched, 2);
    assert.deepEqual(lora.coverage.ignoredKeys.map((k) => k.key), [`${kohya(CONV)}.diff_b`]);
    assertClose(denseDelta(moduleOf(lora, 'unet', TO_Q).delta), diff, 0, 'diff');
  });
});

describe('LoRA formats: real files on SD 1.5 shapes', () => {
  test('LyCORIS LoKr (F16, 3×3 convs) loads every module; one conv module equals kron of its factors', () => {
    const file = path.join(REAL_LORA_DIR, 'lycoris_lokr_sd1_smart_falcon_dim4.safetensors');
    const entry = realEntry(path.basename(file));
    assert.match(entry.expected_app_behaviour, /^load/);
    const lora = loadLora(file, SD15_TARGETS);
    assert.equal(lora.format, 'lycoris-lokr');
    assert.equal(lora.coverage.totalModulesInFile, entry.module_count);
    assert.equal(lora.coverage.matched, entry.module_count);
    assert.equal(lora.metadata.ss_network_module, 'lycoris.kohya');
    const conv3 = lora.modules.filter((m) => m.delta.kind === 'lowrank' && m.delta.downShape.length === 4 && m.delta.downShape[2] === 3);
    assert.ok(conv3.length >= 40, `${conv3.length} 3×3 conv modules`);

    const [name, flatShape] = entry.lokr_kron_full_shape_examples.conv_example as [string, number[]];
    const st = openSafetensors(file);
    try {
      const read = (s: string) => st.readFloat32(`${name}.${s}`);
      const [w1a, w1b, w2a, w2b] = ['lokr_w1_a', 'lokr_w1_b', 'lokr_w2_a', 'lokr_w2_b'].map(read) as [Tensor<'float32'>, Tensor<'float32'>, Tensor<'float32'>, Tensor<'float32'>];
      const [a, r1] = w1a.shape as [number, number];
      const b = w1b.shape[1]!;
      const [c, r2] = w2a.shape as [number, number];
      const d = w2b.shape[1]!;
      const alpha = read('alpha').data[0]!;
      const expected = kron64(matmul64(w1a.data, w1b.data, a, r1, b), a, b, matmul64(w2a.data, w2b.data, c, r2, d), c, d).map((v) => (v * alpha) / r2);
      assert.equal(expected.length, flatShape[0]! * flatShape[1]!);
      const m = moduleOf(lora, 'unet', 'down_blocks.0.downsamplers.0.conv');
      assertClose(denseDelta(m.delta), expected, REWRITE_ATOL, name);
    } finally {
      st.close();
    }
  });

  test('diffusers UNet LoRA (pokemon): UNet only, scale 1, every module on the real shapes', () => {
    const file = path.join(REAL_LORA_DIR, 'diffusers_unet_lora_sd15_pokemon.safetensors');
    const entry = realEntry(path.basename(file));
    const lora = loadLora(file, SD15_TARGETS);
    assert.equal(lora.format, 'diffusers');
    assert.equal(lora.coverage.matched, entry.module_count);
    assert.equal(lora.coverage.totalModulesInFile, entry.module_count);
    assert.deepEqual(lora.coverage.targetedComponents, ['unet']);
    assert.deepEqual(new Set(lora.modules.map((m) => `scale ${lowrank(m).scale}, rank ${lowrank(m).upShape[1]}`)), new Set(['scale 1, rank 4']));
    const toK = lowrank(moduleOf(lora, 'unet', 'down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k'));
    assert.deepEqual(toK.downShape, [4, 768]);
    assert.deepEqual(toK.upShape, [320, 4]);
  });

  test('diffusers attention-processor LoRA: to_out_lora → to_out.0, every module', () => {
    const file = path.join(REAL_LORA_DIR, 'diffusers_attnproc_lora_sd15.safetensors');
    const lora = loadLora(file, SD15_TARGETS);
    assert.equal(lora.format, 'diffusers-attnproc');
    assert.equal(lora.coverage.matched, realEntry(path.basename(file)).module_count);
    const out = moduleOf(lora, 'unet', 'mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0');
    assert.deepEqual(out.sourceKeys.slice().sort(), [
      'mid_block.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.down.weight',
      'mid_block.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.up.weight',
    ]);
  });
});

describe('LoRA key-scheme detection on header descriptions (no weights)', () => {
  const HEADERS = path.join(REAL_LORA_DIR, 'headers');

  test('the SD 1.5 kohya header matches SD 1.5 targets fully: the 264 modules of sd-scripts’ module list', () => {
    const file = path.join(HEADERS, 'invokeai_probe_header_sd15_kohya_shinkai_makoto_offset.json');
    const detected = detectLoraScheme(headerKeys(file), file);
    assert.equal(detected.format, 'kohya');
    assert.equal(detected.crossAttentionWidth?.width, 768);
    const plan = matchLoraModules(detected, SD15_TARGETS);
    const kohyaList = readJson(path.join(FIXTURES, 'sd15-keys/kohya_lora_sd15.json'));
    const expected = [...kohyaList.unet_transformer, ...kohyaList.text_encoder].map((m: { diffusers_module: string }) => m.diffusers_module).sort();
    assert.equal(plan.totalModulesInFile, 264);
    assert.deepEqual(plan.unmatched, []);
    assert.deepEqual(plan.planned.map((p) => `${p.target.component}.${p.target.module}`).sort(), expected);
  });

  test('the same header under SGM/compvis names resolves to the same layers through the LDM key map', () => {
    const kohyaList = readJson(path.join(FIXTURES, 'sd15-keys/kohya_lora_sd15.json'));
    const ldmName = new Map<string, string>(kohyaList.unet_transformer.map((m: { kohya_name: string; ldm_module: string }) => [m.kohya_name, `lora_unet_${m.ldm_module.replace('model.diffusion_model.', '').replaceAll('.', '_')}`]));
    const renamed = new Map<string, LoraTensorInfo>();
    for (const [key, info] of headerKeys(path.join(HEADERS, 'invokeai_probe_header_sd15_kohya_shinkai_makoto_offset.json'))) {
      const dot = key.indexOf('.');
      renamed.set((ldmName.get(key.slice(0, dot)) ?? key.slice(0, dot)) + key.slice(dot), info);
    }
    const detected = detectLoraScheme(renamed, 'sgm-named.json');
    assert.equal(detected.format, 'kohya-ldm');
    const plan = matchLoraModules(detected, SD15_TARGETS, { ldmModuleMap: ldmMapFor(readJson(path.join(FIXTURES, 'sd15-keys/unet_diffusers.json')).config) });
    assert.equal(plan.planned.length, 264);
    const expected = [...kohyaList.unet_transformer, ...kohyaList.text_encoder].map((m: { diffusers_module: string }) => m.diffusers_module).sort();
    assert.deepEqual(plan.planned.map((p) => `${p.target.component}.${p.target.module}`).sort(), expected);
  });

  test('the SDXL kohya header is refused as SDXL', () => {
    const file = path.join(HEADERS, 'invokeai_probe_header_sdxl_kohya_alien_style.json');
    const detected = detectLoraScheme(headerKeys(file), file);
    assert.equal(detected.foreign?.family, 'sdxl');
    assert.equal(detected.crossAttentionWidth?.width, 2048);
    const e = rejects(() => matchLoraModules(detected, SD15_TARGETS), 'LORA_BASE_MISMATCH', file, 'an SDXL LoRA');
    assert.match(e.message, /`lora_te1_text_model_encoder_layers_0_mlp_fc1\.alpha`.*this model is SD 1\.x/);
  });

  test('the FLUX PEFT header is refused as FLUX', () => {
    const file = path.join(HEADERS, 'invokeai_probe_header_flux_peft_adapter.json');
    const detected = detectLoraScheme(headerKeys(file), file);
    rejects(() => matchLoraModules(detected, SD15_TARGETS), 'LORA_BASE_MISMATCH', file, 'a FLUX.1 LoRA (keys like `base_model.model.single_transformer_blocks');
  });
});

describe('LoRA loader rejects', () => {
  const kohyaA = () => readAll(path.join(LORA_DIR, 'lora_kohya_a.safetensors'));
  const Q = 'lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q';

  test('a LoRA for another model size (tiny LoRA on SD 1.5 shapes)', () => {
    const file = path.join(LORA_DIR, 'lora_kohya_a.safetensors');
    const e = rejects(() => loadLora(file, SD15_TARGETS), 'LORA_BASE_MISMATCH', file, 'attn2_to_k');
    assert.match(e.message, /32-wide.*this model is SD 1\.x/);
  });

  test('an SD 2.x LoRA (bf16, cross-attention 1024) on SD 1.5', () => {
    const file = path.join(REAL_LORA_DIR, 'diffusers_unet_lora_sd2_bf16.safetensors');
    assert.match(realEntry(path.basename(file)).expected_app_behaviour, /^refuse/);
    const e = rejects(() => loadLora(file, SD15_TARGETS), 'LORA_BASE_MISMATCH', file, 'an SD 2.x LoRA');
    assert.match(e.message, /attn2\.to_k` takes 1024-wide/);
  });

  test('an SDXL LoRA (second text encoder)', () => {
    const rnd = random(3, 0.1);
    const file = writeLora('sdxl_te.safetensors', {
      'lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight': f32([4, 32], rnd(128)),
      'lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight': f32([32, 4], rnd(128)),
      'lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight': f32([4, 32], rnd(128)),
      'lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight': f32([32, 4], rnd(128)),
    }, { ss_base_model_version: 'sdxl_base_v1-0' });
    const e = rejects(() => loadLora(file, TINY_TARGETS), 'LORA_BASE_MISMATCH', file, 'an SDXL LoRA (keys like `lora_te1_');
    assert.match(e.message, /ss_base_model_version = sdxl_base_v1-0/);
  });

  test('a LoRA where most modules do not fit is refused, not half-applied', () => {
    const rnd = random(5, 0.1);
    const file = writeLora('mostly_wrong.safetensors', {
      [`${Q}.lora_down.weight`]: f32([4, 32], rnd(128)),
      [`${Q}.lora_up.weight`]: f32([32, 4], rnd(128)),
      'lora_unet_down_blocks_2_attentions_0_proj_in.lora_down.weight': f32([4, 80, 1, 1], rnd(320)),
      'lora_unet_down_blocks_2_attentions_0_proj_in.lora_up.weight': f32([80, 4, 1, 1], rnd(320)),
      'lora_unet_down_blocks_2_attentions_0_proj_out.lora_down.weight': f32([4, 80, 1, 1], rnd(320)),
      'lora_unet_down_blocks_2_attentions_0_proj_out.lora_up.weight': f32([80, 4, 1, 1], rnd(320)),
    });
    rejects(() => loadLora(file, TINY_TARGETS), 'LORA_BASE_MISMATCH', file, '2 of its 3 modules do not fit this model (e.g. `lora_unet_down_blocks_2_attentions_0_proj_in`');
  });

  test('a truncated file (the safetensors reader’s error, unchanged)', () => {
    const bytes = fs.readFileSync(path.join(LORA_DIR, 'lora_kohya_a.safetensors'));
    const file = path.join(tmp, 'truncated.safetensors');
    fs.writeFileSync(file, bytes.subarray(0, bytes.length - 100));
    rejects(() => loadLora(file, TINY_TARGETS), 'TRUNCATED_FILE', file, 'truncated');
  });

  test('keys in no known scheme', () => {
    const file = writeLora('random_names.safetensors', { 'foo.bar': f32([2, 2], [1, 2, 3, 4]), 'model.layer1.weight': f32([2], [1, 2]) });
    rejects(() => loadLora(file, TINY_TARGETS), 'UNKNOWN_LORA_FORMAT', file, '`foo.bar`');
  });

  test('a cloneofsimo positional file', () => {
    const file = path.join(REAL_LORA_DIR, 'cloneofsimo_lora_pti_disney_inpainting.safetensors');
    const e = rejects(() => loadLora(file, SD15_TARGETS), 'UNKNOWN_LORA_FORMAT', file, 'text_encoder:0:down');
    assert.match(e.message, /position/);
    assert.match(e.message, /`<s1>`/);
  });

  test('a zero-rank module', () => {
    const tensors = kohyaA();
    tensors[`${Q}.lora_down.weight`] = f32([0, 32], []);
    tensors[`${Q}.lora_up.weight`] = f32([32, 0], []);
    const file = writeLora('zero_rank.safetensors', tensors);
    rejects(() => loadLora(file, TINY_TARGETS), 'SHAPE_MISMATCH', file, `${Q}.lora_down.weight`);
  });

  test('up and down that disagree on the rank', () => {
    const tensors = kohyaA();
    tensors[`${Q}.lora_up.weight`] = f32([32, 3], random(1, 0.1)(96));
    const file = writeLora('rank_mismatch.safetensors', tensors);
    rejects(() => loadLora(file, TINY_TARGETS), 'SHAPE_MISMATCH', file, `\`${Q}.lora_up.weight\` and \`${Q}.lora_down.weight\` disagree on the rank: 3 vs 4`);
  });

  test('a module with only one half', () => {
    const tensors = kohyaA();
    delete tensors[`${Q}.lora_up.weight`];
    const file = writeLora('half.safetensors', tensors);
    rejects(() => loadLora(file, TINY_TARGETS), 'MISSING_TENSOR', file, `\`${Q}\` has no \`lora_up\``);
  });

  test('NaN values', () => {
    const tensors = kohyaA();
    const up = Float32Array.from(tensors[`${Q}.lora_up.weight`]!.data as Float32Array);
    up[17] = NaN;
    tensors[`${Q}.lora_up.weight`] = f32([32, 4], up);
    const file = writeLora('nan.safetensors', tensors);
    rejects(() => loadLora(file, TINY_TARGETS), 'UNSUPPORTED_LORA', file, `\`${Q}.lora_up.weight\` contains NaN (at index 17)`);
  });

  test('integer factors', () => {
    const tensors = kohyaA();
    tensors[`${Q}.lora_down.weight`] = { dtype: 'int32', shape: [4, 32], data: new Int32Array(128) };
    const file = writeLora('int.safetensors', tensors);
    rejects(() => loadLora(file, TINY_TARGETS), 'UNSUPPORTED_DTYPE', file, `${Q}.lora_down.weight\` has dtype int32`);
  });

  test('DoRA (`dora_scale`), not supported yet', () => {
    const tensors = kohyaA();
    tensors[`${Q}.dora_scale`] = f32([1, 32], random(2, 1)(32));
    const file = writeLora('dora.safetensors', tensors);
    const e = rejects(() => loadLora(file, TINY_TARGETS), 'UNSUPPORTED_LORA', file, `\`${Q}.dora_scale\``);
    assert.match(e.message, /DoRA/);
  });

  test('an unreadable PEFT config beside the file', () => {
    const dir = fs.mkdtempSync(path.join(tmp, 'badcfg-'));
    const file = path.join(dir, 'adapter_model.safetensors');
    writeSafetensors(file, readAll(path.join(LORA_DIR, 'lora_peft.safetensors')));
    fs.writeFileSync(path.join(dir, 'adapter_config.json'), '{"lora_alpha": "eight"}');
    rejects(() => loadLora(file, TINY_TARGETS), 'BAD_CONFIG', file, 'lora_alpha');
  });
});
