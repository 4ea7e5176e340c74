/**
 * Key maps diffusers ↔ single-file (LDM), checked against the fixtures' listings both ways:
 * - `sd15-keys/`: the real SD 1.5 names and shapes, and the mapping the reference conversion produced;
 * - `tiny-sd15-single-file/`: the tiny model's mapping and the names and shapes inside its files.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { isDeepStrictEqual } from 'node:util';
import { ModelError } from '../models/errors.ts';
import {
  LDM_PREFIX,
  LdmKeyMap,
  isIgnorableDiffusersKey,
  isIgnorableLdmKey,
  ldmComponentOf,
  moduleLayers,
  unetModuleMap,
  vaeModuleMap,
  type Component,
  type KeyMapping,
} from '../models/keys/ldm.ts';
import { parseClipTextConfig, parseUnetConfig, parseVaeConfig } from '../models/networks/config.ts';
import { openSafetensors } from '../models/safetensors.ts';
import { FIXTURES } from './fixtures.ts';

const COMPONENTS: readonly Component[] = ['unet', 'vae', 'text_encoder'];

// ---- fixture readers (the fixtures are JSON: check the fields we use, then trust them) ----

function readJson(relative: string): unknown {
  return JSON.parse(fs.readFileSync(path.join(FIXTURES, relative), 'utf8'));
}

function field(obj: unknown, key: string): unknown {
  assert.ok(typeof obj === 'object' && obj !== null && key in obj, `fixture has no field "${key}"`);
  return (obj as Record<string, unknown>)[key];
}

function stringRecord(value: unknown): Record<string, string> {
  assert.ok(typeof value === 'object' && value !== null && Object.values(value).every((v) => typeof v === 'string'));
  return value as Record<string, string>;
}

function stringList(value: unknown): string[] {
  assert.ok(Array.isArray(value) && value.every((v) => typeof v === 'string'));
  return value as string[];
}

interface ParamListing {
  readonly name: string;
  readonly shape: readonly number[];
}

function paramListing(value: unknown): ParamListing[] {
  assert.ok(Array.isArray(value));
  return value.map((p) => ({ name: field(p, 'name') as string, shape: field(p, 'shape') as number[] }));
}

function shapesOfFile(file: string): Map<string, readonly number[]> {
  const f = openSafetensors(file);
  try {
    return new Map(f.names().map((name) => [name, f.info(name).shape]));
  } finally {
    f.close();
  }
}

/** Everything a case needs: maps built from its configs and the fixture's view of the keys. */
interface KeyCase {
  readonly name: string;
  readonly maps: Readonly<Record<Component, LdmKeyMap>>;
  /** Fixture mapping diffusers name → single-file key, per component. */
  readonly mapping: Readonly<Record<Component, Record<string, string>>>;
  /** Diffusers names whose weight is Linear in diffusers and a 1×1 conv in the single file. */
  readonly reshaped: ReadonlySet<string>;
  /** Keys the single file carries that the conversion does not produce. */
  readonly extras: readonly string[];
  /** Shapes by name in the diffusers-layout files / listings. */
  readonly diffusersShapes: Readonly<Record<Component, Map<string, readonly number[]>>>;
  /** Shapes by name in the single file / its listing. */
  readonly singleFileShapes: Map<string, readonly number[]>;
}

function sd15Case(): KeyCase {
  const listings = {
    unet: readJson('sd15-keys/unet_diffusers.json'),
    vae: readJson('sd15-keys/vae_diffusers.json'),
    text_encoder: readJson('sd15-keys/text_encoder_diffusers.json'),
  };
  const mapping = readJson('sd15-keys/mapping_diffusers_to_ldm.json');
  const singleFile = readJson('sd15-keys/ldm_single_file.json');
  const toShapes = (listing: unknown): Map<string, readonly number[]> =>
    new Map(paramListing(field(listing, 'params')).map((p) => [p.name, p.shape]));
  return {
    name: 'SD 1.5',
    maps: {
      unet: LdmKeyMap.forUnet(parseUnetConfig(field(listings.unet, 'config'), 'unet_diffusers.json')),
      vae: LdmKeyMap.forVae(parseVaeConfig(field(listings.vae, 'config'), 'vae_diffusers.json')),
      text_encoder: LdmKeyMap.forTextEncoder(parseClipTextConfig(field(listings.text_encoder, 'config'), 'text_encoder_diffusers.json')),
    },
    mapping: {
      unet: stringRecord(field(mapping, 'unet')),
      vae: stringRecord(field(mapping, 'vae')),
      text_encoder: stringRecord(field(mapping, 'text_encoder')),
    },
    reshaped: new Set(stringList(field(mapping, 'reshaped_linear_to_conv1x1'))),
    extras: stringList(field(singleFile, 'extras_not_from_conversion')),
    diffusersShapes: { unet: toShapes(listings.unet), vae: toShapes(listings.vae), text_encoder: toShapes(listings.text_encoder) },
    singleFileShapes: toShapes(singleFile),
  };
}

function tinyCase(): KeyCase {
  const config = (component: string): unknown => readJson(`tiny-sd15/${component}/config.json`);
  const mapping = readJson('tiny-sd15-single-file/key_mapping.json');
  return {
    name: 'tiny SD 1.5',
    maps: {
      unet: LdmKeyMap.forUnet(parseUnetConfig(config('unet'), 'tiny-sd15/unet/config.json')),
      vae: LdmKeyMap.forVae(parseVaeConfig(config('vae'), 'tiny-sd15/vae/config.json')),
      text_encoder: LdmKeyMap.forTextEncoder(parseClipTextConfig(config('text_encoder'), 'tiny-sd15/text_encoder/config.json')),
    },
    mapping: {
      unet: stringRecord(field(mapping, 'unet')),
      vae: stringRecord(field(mapping, 'vae')),
      text_encoder: stringRecord(field(mapping, 'text_encoder')),
    },
    reshaped: new Set(stringList(field(mapping, 'reshaped_linear_to_conv1x1'))),
    extras: Object.keys(field(mapping, 'extra_keys_not_from_conversion') as object),
    diffusersShapes: {
      unet: shapesOfFile(path.join(FIXTURES, 'tiny-sd15/unet/diffusion_pytorch_model.safetensors')),
      vae: shapesOfFile(path.join(FIXTURES, 'tiny-sd15/vae/diffusion_pytorch_model.safetensors')),
      text_encoder: shapesOfFile(path.join(FIXTURES, 'tiny-sd15/text_encoder/model.safetensors')),
    },
    singleFileShapes: shapesOfFile(path.join(FIXTURES, 'tiny-sd15-single-file/tiny-sd15.safetensors')),
  };
}

/** The mapping the fixture says a diffusers key has. */
function expectedMapping(c: KeyCase, diffusers: string, ldm: string): KeyMapping {
  return c.reshaped.has(diffusers) ? { diffusers, ldm, reshape: 'linear_to_conv1x1' } : { diffusers, ldm };
}

/** Fails listing every mismatch (first 20) instead of stopping at the first. */
function assertNoMismatches(mismatches: readonly string[], what: string): void {
  assert.equal(mismatches.length, 0, `${mismatches.length} ${what}:\n${mismatches.slice(0, 20).join('\n')}`);
}

for (const makeCase of [sd15Case, tinyCase]) {
  const c = makeCase();
  describe(`LDM key map: ${c.name}`, () => {
    for (const component of COMPONENTS) {
      const map = c.maps[component];
      const fixture = c.mapping[component];

      test(`${component}: every diffusers key maps to the fixture's single-file key and reshape flag`, () => {
        const mismatches: string[] = [];
        for (const [diffusers, ldm] of Object.entries(fixture)) {
          const got = map.toLdm(diffusers);
          const want = expectedMapping(c, diffusers, ldm);
          if (!isDeepStrictEqual(got, want)) mismatches.push(`${diffusers}: got ${JSON.stringify(got)}, want ${JSON.stringify(want)}`);
        }
        assertNoMismatches(mismatches, 'diffusers keys map wrongly');
      });

      test(`${component}: every single-file key maps back to its diffusers key`, () => {
        const mismatches: string[] = [];
        for (const [diffusers, ldm] of Object.entries(fixture)) {
          const got = map.toDiffusers(ldm);
          const want = expectedMapping(c, diffusers, ldm);
          if (!isDeepStrictEqual(got, want)) mismatches.push(`${ldm}: got ${JSON.stringify(got)}, want ${JSON.stringify(want)}`);
        }
        assertNoMismatches(mismatches, 'single-file keys map back wrongly');
      });

      test(`${component}: the generated keys are exactly the fixture's, one-to-one`, () => {
        const generated = map.entries().map((e) => [e.diffusers, e.ldm] as const);
        assert.deepEqual(
          [...generated].sort(([a], [b]) => (a < b ? -1 : 1)),
          Object.entries(fixture).sort(([a], [b]) => (a < b ? -1 : 1)),
        );
        assert.equal(new Set(generated.map(([d]) => d)).size, map.size, 'two diffusers keys collide');
        assert.equal(new Set(generated.map(([, l]) => l)).size, map.size, 'two single-file keys collide');
        assert.equal(map.size, Object.keys(fixture).length);
      });

      test(`${component}: every tensor of the diffusers-layout listing resolves, shapes agree with the single file`, () => {
        const shapes = c.diffusersShapes[component];
        const mismatches: string[] = [];
        let mapped = 0;
        for (const [name, shape] of shapes) {
          if (isIgnorableDiffusersKey(component, name)) continue;
          const m = map.toLdm(name);
          if (m === undefined) {
            mismatches.push(`${name}: no mapping`);
            continue;
          }
          mapped++;
          const ldmShape = c.singleFileShapes.get(m.ldm);
          const want = m.reshape === 'linear_to_conv1x1' ? [...shape, 1, 1] : shape;
          if (!isDeepStrictEqual(ldmShape, want)) mismatches.push(`${name} → ${m.ldm}: single-file shape ${JSON.stringify(ldmShape)}, want ${JSON.stringify(want)}`);
        }
        assertNoMismatches(mismatches, 'diffusers tensors do not resolve');
        assert.equal(mapped, map.size);
      });
    }

    test('every single-file key maps to one component, except the known extras', () => {
      const inverse = new Map<string, string>();
      for (const component of COMPONENTS) {
        for (const [diffusers, ldm] of Object.entries(c.mapping[component])) inverse.set(ldm, diffusers);
      }
      const ignored: string[] = [];
      const mismatches: string[] = [];
      let mapped = 0;
      for (const key of c.singleFileShapes.keys()) {
        if (isIgnorableLdmKey(key)) {
          ignored.push(key);
          continue;
        }
        const component = ldmComponentOf(key);
        const got = component === undefined ? undefined : c.maps[component].toDiffusers(key)?.diffusers;
        if (got === undefined || got !== inverse.get(key)) mismatches.push(`${key}: got ${String(got)}, want ${String(inverse.get(key))}`);
        else mapped++;
      }
      assertNoMismatches(mismatches, 'single-file keys do not resolve');
      assert.deepEqual(ignored.sort(), [...c.extras].sort());
      const total = COMPONENTS.reduce((n, component) => n + c.maps[component].size, 0);
      assert.equal(mapped, total);
      assert.equal(c.singleFileShapes.size, total + c.extras.length);
    });

    test('legacy VAE attention names (diffusers < 0.14) load as the same single-file keys', () => {
      const legacy = field(readJson('sd15-keys/vae_diffusers.json'), 'legacy_attention_names');
      const modules = stringList(field(legacy, 'applies_to'));
      const renames = ['query', 'key', 'value', 'proj_attn'].map((old) => [old, field(legacy, old) as string] as const);
      let checked = 0;
      for (const module of modules) {
        for (const [old, current] of renames) {
          for (const param of ['weight', 'bias']) {
            const canonical = `${module}.${current}.${param}`;
            const ldm = c.mapping.vae[canonical];
            assert.ok(ldm !== undefined, `fixture maps ${canonical}`);
            assert.deepEqual(c.maps.vae.toLdm(`${module}.${old}.${param}`), expectedMapping(c, canonical, ldm));
            checked++;
          }
        }
      }
      assert.equal(checked, 16);
      assert.ok(c.maps.vae.entries().every((e) => !/\.(query|key|value|proj_attn)\./.test(e.diffusers)), 'entries list canonical names only');
    });

    test('text-encoder keys without the `text_model.` level map to the same diffusers keys', () => {
      const withLevel = `${LDM_PREFIX.text_encoder}text_model.`;
      let checked = 0;
      for (const [diffusers, ldm] of Object.entries(c.mapping.text_encoder)) {
        assert.ok(ldm.startsWith(withLevel), ldm);
        const oldKey = LDM_PREFIX.text_encoder + ldm.slice(withLevel.length);
        assert.deepEqual(c.maps.text_encoder.toDiffusers(oldKey), { diffusers, ldm });
        checked++;
      }
      assert.equal(checked, c.maps.text_encoder.size);
      for (const key of [`${withLevel}embeddings.position_ids`, `${LDM_PREFIX.text_encoder}embeddings.position_ids`]) {
        assert.equal(isIgnorableLdmKey(key), true, key);
        assert.equal(c.maps.text_encoder.toDiffusers(key), undefined, key);
      }
      const optional = Object.keys(field(readJson('sd15-keys/text_encoder_diffusers.json'), 'optional_keys') as object);
      assert.deepEqual(optional, ['text_model.embeddings.position_ids']);
      assert.ok(optional.every((key) => isIgnorableDiffusersKey('text_encoder', key) && c.maps.text_encoder.toLdm(key) === undefined));
    });
  });
}

describe('LDM key map: LoRA module names', () => {
  test('module + layer paths match every kohya SD 1.5 module (diffusers ↔ single-file prefix)', () => {
    const c = sd15Case();
    const kohya = readJson('sd15-keys/kohya_lora_sd15.json');
    const layersOf = (component: Component): Map<string, string> =>
      new Map(moduleLayers(c.maps[component].modules).map((l) => [l.diffusers, l.ldm]));
    const layers = { unet: layersOf('unet'), text_encoder: layersOf('text_encoder') };
    const mismatches: string[] = [];
    let checked = 0;
    for (const list of ['unet_transformer', 'unet_conv_locon_extra', 'text_encoder']) {
      for (const entry of field(kohya, list) as unknown[]) {
        const diffusersModule = field(entry, 'diffusers_module') as string;
        const ldmModule = field(entry, 'ldm_module') as string;
        const component = diffusersModule.startsWith('unet.') ? 'unet' : 'text_encoder';
        const diffusers = diffusersModule.slice(component.length + 1);
        const want = ldmModule.slice(LDM_PREFIX[component].length);
        const got = layers[component].get(diffusers);
        if (got !== want) mismatches.push(`${diffusersModule}: got ${String(got)}, want ${want}`);
        checked++;
      }
    }
    assertNoMismatches(mismatches, 'LoRA modules map wrongly');
    assert.equal(checked, 192 + 86 + 72);
  });
});

describe('LDM key map: configs other than SD 1.5', () => {
  test("an empty UNet config takes diffusers' defaults, which are the SD 1.5 layout", () => {
    const c = sd15Case();
    const map = LdmKeyMap.forUnet(parseUnetConfig({}, 'empty'));
    assert.deepEqual(
      map.entries().map((e) => [e.diffusers, e.ldm]).sort(([a], [b]) => (a! < b! ? -1 : 1)),
      Object.entries(c.mapping.unet).sort(([a], [b]) => (a < b ? -1 : 1)),
    );
  });

  // Expected paths written out from openaimodel's numbering: conv_in is input_blocks.0; each resnet
  // (+ transformer) one entry; a downsampler one entry except at the last level; output blocks have
  // one resnet more per level and the upsampler joins the level's last entry.
  test('a 3-level UNet with mixed blocks, 1 resnet per level and 2-deep transformers', () => {
    const config = parseUnetConfig(
      {
        block_out_channels: [32, 64, 64],
        down_block_types: ['CrossAttnDownBlock2D', 'DownBlock2D', 'DownBlock2D'],
        up_block_types: ['UpBlock2D', 'UpBlock2D', 'CrossAttnUpBlock2D'],
        layers_per_block: 1,
        transformer_layers_per_block: 2,
      },
      'variant',
    );
    assert.deepEqual(
      unetModuleMap(config).map((m) => [m.diffusers, m.ldm, m.kind]),
      [
        ['conv_in', 'input_blocks.0.0', 'conv'],
        ['time_embedding', 'time_embed', 'timestep_embedding'],
        ['down_blocks.0.resnets.0', 'input_blocks.1.0', 'resnet'],
        ['down_blocks.0.attentions.0', 'input_blocks.1.1', 'transformer'],
        ['down_blocks.0.downsamplers.0', 'input_blocks.2.0', 'downsample'],
        ['down_blocks.1.resnets.0', 'input_blocks.3.0', 'resnet'],
        ['down_blocks.1.downsamplers.0', 'input_blocks.4.0', 'downsample'],
        ['down_blocks.2.resnets.0', 'input_blocks.5.0', 'resnet'],
        ['mid_block.resnets.0', 'middle_block.0', 'resnet'],
        ['mid_block.attentions.0', 'middle_block.1', 'transformer'],
        ['mid_block.resnets.1', 'middle_block.2', 'resnet'],
        ['up_blocks.0.resnets.0', 'output_blocks.0.0', 'resnet'],
        ['up_blocks.0.resnets.1', 'output_blocks.1.0', 'resnet'],
        ['up_blocks.0.upsamplers.0', 'output_blocks.1.1', 'upsample'],
        ['up_blocks.1.resnets.0', 'output_blocks.2.0', 'resnet'],
        ['up_blocks.1.resnets.1', 'output_blocks.3.0', 'resnet'],
        ['up_blocks.1.upsamplers.0', 'output_blocks.3.1', 'upsample'],
        ['up_blocks.2.resnets.0', 'output_blocks.4.0', 'resnet'],
        ['up_blocks.2.attentions.0', 'output_blocks.4.1', 'transformer'],
        ['up_blocks.2.resnets.1', 'output_blocks.5.0', 'resnet'],
        ['up_blocks.2.attentions.1', 'output_blocks.5.1', 'transformer'],
        ['conv_norm_out', 'out.0', 'group_norm'],
        ['conv_out', 'out.2', 'conv'],
      ],
    );
    const map = LdmKeyMap.forUnet(config);
    const ldm = (key: string): string | undefined => map.toLdm(key)?.ldm.slice(LDM_PREFIX.unet.length);
    assert.equal(ldm('down_blocks.0.attentions.0.transformer_blocks.1.attn2.to_k.weight'), 'input_blocks.1.1.transformer_blocks.1.attn2.to_k.weight');
    assert.equal(ldm('mid_block.attentions.0.transformer_blocks.1.norm3.bias'), 'middle_block.1.transformer_blocks.1.norm3.bias');
    assert.equal(ldm('down_blocks.0.downsamplers.0.conv.weight'), 'input_blocks.2.0.op.weight');
    // 32 → 64 needs a shortcut conv; 64 → 64 does not; every up resnet sees a concatenated skip.
    assert.equal(ldm('down_blocks.1.resnets.0.conv_shortcut.weight'), 'input_blocks.3.0.skip_connection.weight');
    assert.equal(ldm('down_blocks.2.resnets.0.conv_shortcut.weight'), undefined);
    assert.equal(ldm('up_blocks.1.resnets.1.conv_shortcut.bias'), 'output_blocks.3.0.skip_connection.bias');
    assert.equal(ldm('down_blocks.0.attentions.0.transformer_blocks.2.norm1.weight'), undefined);
  });

  test('a 2-level VAE without mid-block attention or quant_conv', () => {
    const config = parseVaeConfig(
      {
        block_out_channels: [32, 64],
        down_block_types: ['DownEncoderBlock2D', 'DownEncoderBlock2D'],
        up_block_types: ['UpDecoderBlock2D', 'UpDecoderBlock2D'],
        layers_per_block: 1,
        mid_block_add_attention: false,
        use_quant_conv: false,
      },
      'variant',
    );
    assert.deepEqual(
      vaeModuleMap(config).map((m) => [m.diffusers, m.ldm, m.kind]),
      [
        ['encoder.conv_in', 'encoder.conv_in', 'conv'],
        ['encoder.down_blocks.0.resnets.0', 'encoder.down.0.block.0', 'vae_resnet'],
        ['encoder.down_blocks.0.downsamplers.0', 'encoder.down.0.downsample', 'vae_downsample'],
        ['encoder.down_blocks.1.resnets.0', 'encoder.down.1.block.0', 'vae_resnet'],
        ['encoder.mid_block.resnets.0', 'encoder.mid.block_1', 'vae_resnet'],
        ['encoder.mid_block.resnets.1', 'encoder.mid.block_2', 'vae_resnet'],
        ['encoder.conv_norm_out', 'encoder.norm_out', 'group_norm'],
        ['encoder.conv_out', 'encoder.conv_out', 'conv'],
        ['post_quant_conv', 'post_quant_conv', 'conv'],
        ['decoder.conv_in', 'decoder.conv_in', 'conv'],
        ['decoder.mid_block.resnets.0', 'decoder.mid.block_1', 'vae_resnet'],
        ['decoder.mid_block.resnets.1', 'decoder.mid.block_2', 'vae_resnet'],
        ['decoder.up_blocks.0.resnets.0', 'decoder.up.1.block.0', 'vae_resnet'],
        ['decoder.up_blocks.0.resnets.1', 'decoder.up.1.block.1', 'vae_resnet'],
        ['decoder.up_blocks.0.upsamplers.0', 'decoder.up.1.upsample', 'upsample'],
        ['decoder.up_blocks.1.resnets.0', 'decoder.up.0.block.0', 'vae_resnet'],
        ['decoder.up_blocks.1.resnets.1', 'decoder.up.0.block.1', 'vae_resnet'],
        ['decoder.conv_norm_out', 'decoder.norm_out', 'group_norm'],
        ['decoder.conv_out', 'decoder.conv_out', 'conv'],
      ],
    );
    const map = LdmKeyMap.forVae(config);
    assert.equal(map.toLdm('encoder.down_blocks.1.resnets.0.conv_shortcut.weight')?.ldm, 'first_stage_model.encoder.down.1.block.0.nin_shortcut.weight');
    assert.equal(map.toLdm('decoder.up_blocks.1.resnets.0.conv_shortcut.weight')?.ldm, 'first_stage_model.decoder.up.0.block.0.nin_shortcut.weight');
    assert.equal(map.toLdm('decoder.up_blocks.0.resnets.0.conv_shortcut.weight'), undefined);
  });

  test('keys outside the model, of another component or without the prefix resolve to nothing', () => {
    const c = tinyCase();
    assert.equal(c.maps.unet.toLdm('down_blocks.0.resnets.0.foo.weight'), undefined);
    assert.equal(c.maps.unet.toLdm('down_blocks.9.resnets.0.conv1.weight'), undefined);
    assert.equal(c.maps.unet.toLdm('encoder.conv_in.weight'), undefined);
    assert.equal(c.maps.unet.toDiffusers('input_blocks.1.0.in_layers.0.weight'), undefined);
    assert.equal(c.maps.unet.toDiffusers('first_stage_model.encoder.conv_in.weight'), undefined);
    assert.equal(c.maps.vae.toDiffusers('model.diffusion_model.out.2.weight'), undefined);
    assert.equal(c.maps.unet.toLdm('down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.bias'), undefined);
    assert.equal(ldmComponentOf('model_ema.decay'), undefined);
    assert.equal(isIgnorableLdmKey('model_ema.diffusion_modelinput_blocks00weight'), true);
    assert.equal(isIgnorableLdmKey('model.diffusion_model.out.2.weight'), false);
  });
});

describe('LDM key map rejects', () => {
  /** Builds the three maps the way a loader does: parse the config where it enters, then generate. */
  const build = {
    unet: (raw: unknown): LdmKeyMap => LdmKeyMap.forUnet(parseUnetConfig(raw, 'unet/config.json')),
    vae: (raw: unknown): LdmKeyMap => LdmKeyMap.forVae(parseVaeConfig(raw, 'vae/config.json')),
    text_encoder: (raw: unknown): LdmKeyMap => LdmKeyMap.forTextEncoder(parseClipTextConfig(raw, 'text_encoder/config.json')),
  };
  const tinyUnet = readJson('tiny-sd15/unet/config.json') as Record<string, unknown>;
  const tinyVae = readJson('tiny-sd15/vae/config.json') as Record<string, unknown>;
  const tinyText = readJson('tiny-sd15/text_encoder/config.json') as Record<string, unknown>;

  function rejects(make: () => unknown, code: ModelError['code'], source: string, culprit: string): void {
    assert.throws(make, (e: unknown) => {
      assert.ok(e instanceof ModelError, `expected ModelError, got ${String(e)}`);
      assert.equal(e.code, code, e.message);
      assert.ok(e.message.includes(source), `message names ${source}: ${e.message}`);
      assert.ok(e.message.includes(culprit), `message names ${culprit}: ${e.message}`);
      return true;
    });
  }

  test('a config that is not a JSON object', () => {
    rejects(() => build.unet([]), 'BAD_CONFIG', 'unet/config.json', 'object');
    rejects(() => build.vae(null), 'BAD_CONFIG', 'vae/config.json', 'object');
  });

  test('UNet fields the map walks, with the wrong type or length', () => {
    rejects(() => build.unet({ ...tinyUnet, block_out_channels: [] }), 'BAD_CONFIG', 'unet/config.json', 'block_out_channels');
    rejects(() => build.unet({ ...tinyUnet, block_out_channels: [32, -32, 64, 64] }), 'BAD_CONFIG', 'unet/config.json', 'block_out_channels');
    rejects(() => build.unet({ ...tinyUnet, layers_per_block: 0 }), 'BAD_CONFIG', 'unet/config.json', 'layers_per_block');
    rejects(() => build.unet({ ...tinyUnet, layers_per_block: [2, 2] }), 'BAD_CONFIG', 'unet/config.json', 'layers_per_block');
    rejects(() => build.unet({ ...tinyUnet, transformer_layers_per_block: 'one' }), 'BAD_CONFIG', 'unet/config.json', 'transformer_layers_per_block');
    rejects(() => build.unet({ ...tinyUnet, down_block_types: ['DownBlock2D', 'DownBlock2D', 'DownBlock2D'] }), 'BAD_CONFIG', 'unet/config.json', 'down_block_types');
    rejects(() => build.unet({ ...tinyUnet, up_block_types: 4 }), 'BAD_CONFIG', 'unet/config.json', 'up_block_types');
  });

  test('UNet blocks and options outside SD 1.x/2.x', () => {
    const down = ['CrossAttnDownBlock2D', 'SimpleCrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'DownBlock2D'];
    rejects(() => build.unet({ ...tinyUnet, down_block_types: down }), 'UNSUPPORTED_ARCHITECTURE', 'unet/config.json', 'down_block_types');
    const up = ['UpBlock2D', 'AttnUpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D'];
    rejects(() => build.unet({ ...tinyUnet, up_block_types: up }), 'UNSUPPORTED_ARCHITECTURE', 'unet/config.json', 'up_block_types');
    rejects(() => build.unet({ ...tinyUnet, mid_block_type: 'UNetMidBlock2DSimpleCrossAttn' }), 'UNSUPPORTED_ARCHITECTURE', 'unet/config.json', 'mid_block_type');
    rejects(() => build.unet({ ...tinyUnet, class_embed_type: 'timestep' }), 'UNSUPPORTED_ARCHITECTURE', 'unet/config.json', 'class_embed_type');
    rejects(() => build.unet({ ...tinyUnet, addition_embed_type: 'text_time' }), 'UNSUPPORTED_ARCHITECTURE', 'unet/config.json', 'addition_embed_type');
  });

  test('VAE and text-encoder fields the map walks', () => {
    rejects(() => build.vae({ ...tinyVae, layers_per_block: -1 }), 'BAD_CONFIG', 'vae/config.json', 'layers_per_block');
    rejects(() => build.vae({ ...tinyVae, block_out_channels: [32, 64] }), 'BAD_CONFIG', 'vae/config.json', 'block_out_channels');
    rejects(() => build.vae({ ...tinyVae, mid_block_add_attention: 'yes' }), 'BAD_CONFIG', 'vae/config.json', 'mid_block_add_attention');
    rejects(() => build.text_encoder({ ...tinyText, num_hidden_layers: 0 }), 'BAD_CONFIG', 'text_encoder/config.json', 'num_hidden_layers');
  });

  test('a generator that produced colliding keys (programmer error)', () => {
    const conv = { diffusers: 'conv_in', ldm: 'input_blocks.0.0', kind: 'conv' as const, layers: [{ diffusers: '', ldm: '', params: ['weight' as const] }] };
    assert.throws(() => new LdmKeyMap('unet', [conv, { ...conv, diffusers: 'conv_out' }]), /model\.diffusion_model\.input_blocks\.0\.0\.weight/);
  });
});
