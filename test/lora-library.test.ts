/**
 * The LoRA library against real files laid out the way A1111 and ComfyUI users have them: symlinks to the real
 * LoRAs in shared/realworld/lora and shared/fixtures/tiny-sd15-lora (never copied into the repo), sidecars
 * written here, and a few broken files. Expected hashes and base models come from shared/realworld/manifest.json.
 */
import { after, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { addnetShortHash, loraFoldersOf, resolveLoraName, scanLoraFolders, type LoraLibraryEntry } from '../models/lora/library.ts';
import { detectBaseModelFromKeys, type LoraBaseModel } from '../models/lora/library-base-model.ts';
import { ModelError } from '../models/errors.ts';
import { writeSafetensors } from '../models/safetensors.ts';
import { FIXTURES, REALWORLD, readManifest } from './fixtures.ts';

const TINY = path.join(FIXTURES, 'tiny-sd15-lora');
const REAL_LORAS: { file: string; base_model: string; cross_attention_kv_input_dims: Record<string, number> | null; addnet_hash_sha256_after_header: string; a1111_lora_shorthash: string; metadata: Record<string, string> }[] =
  readManifest(path.join(REALWORLD, 'manifest.json')).loras.filter((l: { file: string }) => l.file.endsWith('.safetensors'));
/** The fixture's kohya hash of its tensor bytes, i.e. the addnet hash (written by kohya's trainer, not by us). */
const KOHYA_A_SSHS_MODEL_HASH = '73fbe909e41e151e0b0bf2d70d3a2713c95b049d75a3ee48e46542787d56defa';

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'chorus-lora-library-'));
after(() => fs.rmSync(tmp, { recursive: true, force: true }));

function write(file: string, content: string | Uint8Array): string {
  fs.mkdirSync(path.dirname(file), { recursive: true });
  fs.writeFileSync(file, content);
  return file;
}
function link(target: string, file: string): string {
  fs.mkdirSync(path.dirname(file), { recursive: true });
  fs.symlinkSync(target, file);
  return file;
}
const realLora = (name: string): string => path.join(REALWORLD, 'lora', name);
const tinyLora = (name: string): string => path.join(TINY, name);

// A1111 install: models/Lora (with subfolders) and the legacy models/LyCORIS.
const A1111 = path.join(tmp, 'a1111');
const LORA = path.join(A1111, 'models/Lora');
const LYCORIS = path.join(A1111, 'models/LyCORIS');
link(tinyLora('lora_kohya_a.safetensors'), path.join(LORA, 'lora_kohya_a.safetensors'));
write(
  path.join(LORA, 'lora_kohya_a.civitai.info'),
  JSON.stringify({ id: 11, modelId: 22, name: 'v1.0', baseModel: 'SD 1.5', trainedWords: ['tinychar', 'red coat'], model: { name: 'Tiny Character', type: 'LORA' }, files: [], images: [] }),
);
write(path.join(LORA, 'lora_kohya_a.json'), JSON.stringify({ description: '', 'sd version': 'Unknown', 'activation text': 'tinychar, red coat', 'preferred weight': 0.7, notes: 'Use with a low CFG.' }));
write(path.join(LORA, 'lora_kohya_a.preview.png'), 'preview');
write(path.join(LORA, 'lora_kohya_a.jpg'), 'jpg');
write(path.join(LORA, 'lora_kohya_a.png'), 'png');
const TRUNCATED = write(path.join(LORA, 'broken_truncated.safetensors'), fs.readFileSync(tinyLora('lora_kohya_a.safetensors')).subarray(0, 300_000));
write(path.join(LORA, 'garbage.safetensors'), 'this is not a safetensors file at all\n');
const PICKLE = write(path.join(LORA, 'old_style.pt'), new Uint8Array([0x80, 0x02, 0x7d, 0x71, 0x00, 0x2e, 0, 0, 0, 0]));
write(path.join(LORA, 'README.md'), 'not a LoRA');
link(realLora('lycoris_lokr_sd1_smart_falcon_dim4.safetensors'), path.join(LORA, 'sub/lycoris_lokr_sd1_smart_falcon_dim4.safetensors'));
write(path.join(LORA, 'sub/lycoris_lokr_sd1_smart_falcon_dim4.description.txt'), 'Smart Falcon, LoKr dim 4\n');
write(path.join(LORA, 'sub/lycoris_lokr_sd1_smart_falcon_dim4.preview.webp'), 'webp');
write(path.join(LORA, 'sub/lycoris_lokr_sd1_smart_falcon_dim4.json'), JSON.stringify({ 'activation text': '', 'preferred weight': 0 }));
link(realLora('diffusers_unet_lora_sd15_pokemon.safetensors'), path.join(LORA, 'sub/diffusers_unet_lora_sd15_pokemon.safetensors'));
write(path.join(LORA, 'sub/diffusers_unet_lora_sd15_pokemon.txt'), 'Pokemon style (from .txt)');
write(path.join(LORA, 'sub/diffusers_unet_lora_sd15_pokemon.description.txt'), 'loses to .txt');
link(realLora('diffusers_attnproc_lora_sd15.safetensors'), path.join(LORA, 'sub/diffusers_attnproc_lora_sd15.safetensors'));
write(path.join(LORA, 'sub/diffusers_attnproc_lora_sd15.json'), JSON.stringify({ 'preferred weight': 'strong', 'activation text': 'attnproc' }));
link(tinyLora('lora_kohya_b_locon.safetensors'), path.join(LORA, 'sub/deeper/lora_kohya_b_locon.safetensors'));
write(path.join(LORA, 'sub/deeper/lora_kohya_b_locon.civitai.info'), '{"model": {"name": "cut off');
link(tinyLora('lora_peft.safetensors'), path.join(LORA, '.hidden/lora_peft.safetensors'));
link(realLora('diffusers_unet_lora_sd2_bf16.safetensors'), path.join(LYCORIS, 'diffusers_unet_lora_sd2_bf16.safetensors'));
link(realLora('cloneofsimo_lora_pti_disney_inpainting.safetensors'), path.join(LYCORIS, 'cloneofsimo_lora_pti_disney_inpainting.safetensors'));
link(tinyLora('lora_diffusers.safetensors'), path.join(A1111, 'models/Stable-diffusion/not_a_lora_folder.safetensors'));

// ComfyUI install: models/loras. `tiny_copy` is a real copy (its mtime is changed by the cache test).
const COMFY = path.join(tmp, 'comfy');
const LORAS = path.join(COMFY, 'models/loras');
const TINY_COPY = path.join(LORAS, 'tiny_copy.safetensors');
fs.mkdirSync(LORAS, { recursive: true });
fs.copyFileSync(tinyLora('lora_kohya_a.safetensors'), TINY_COPY);
link(tinyLora('lora_diffusers.safetensors'), path.join(LORAS, 'lora_diffusers.safetensors'));
link(tinyLora('lora_peft.safetensors'), path.join(LORAS, 'style/lora_peft.safetensors'));
fs.mkdirSync(path.join(COMFY, 'models/checkpoints'), { recursive: true });

// A plain folder: a second `lora_peft` (stem clash with ComfyUI's), an SDXL-keyed file whose alias clashes with
// lora_kohya_a's, a symlink back to itself and a dangling symlink.
const PLAIN = path.join(tmp, 'plain');
link(tinyLora('lora_peft.safetensors'), path.join(PLAIN, 'lora_peft.safetensors'));
fs.mkdirSync(PLAIN, { recursive: true });
writeSafetensors(
  path.join(PLAIN, 'spec_trigger.safetensors'),
  { 'lora_te1_text_model_encoder_layers_0_self_attn_k_proj.lora_down.weight': { dtype: 'float32', shape: [1, 4], data: new Float32Array(4) } },
  {
    ss_output_name: 'tiny_lora_a',
    'modelspec.trigger_phrase': 'spec phrase',
    ss_tag_frequency: JSON.stringify({ a: { other: 1, 'spec phrase': 3 } }),
    ssmd_cover_images: '["data:image/png;base64,AAAA"]',
  },
);
fs.symlinkSync('.', path.join(PLAIN, 'loop'));
fs.symlinkSync(path.join(tmp, 'moved-away.safetensors'), path.join(PLAIN, 'dangling.safetensors'));

const byName = (entries: readonly LoraLibraryEntry[], name: string): LoraLibraryEntry => {
  const e = entries.find((x) => x.name === name);
  assert.ok(e !== undefined, `no entry named ${name}; have ${entries.map((x) => x.name).join(', ')}`);
  return e;
};
const stemOf = (file: string): string => path.basename(file, '.safetensors');
function familyOf(manifestBaseModel: string): LoraBaseModel {
  if (manifestBaseModel.startsWith('SDXL')) return 'sdxl';
  if (manifestBaseModel.startsWith('SD 2')) return 'sd2';
  if (manifestBaseModel.startsWith('SD 1')) return 'sd1';
  throw new Error(`unexpected manifest base model ${manifestBaseModel}`);
}
/** manifest README: 768 = SD1.x, 1024 = SD2.x, 2048 = SDXL. */
const CROSS_ATTENTION_WIDTH: Record<LoraBaseModel, number | undefined> = { sd1: 768, sd2: 1024, sdxl: 2048, unknown: undefined };
function headerDescription(name: string): Map<string, { shape: number[] }> {
  const json = JSON.parse(fs.readFileSync(path.join(REALWORLD, 'lora/headers', name), 'utf-8')) as Record<string, { shape: number[] }>;
  return new Map(Object.entries(json));
}

describe('LoRA folders of an install', () => {
  test('A1111: models/Lora then models/LyCORIS; ComfyUI: models/loras; otherwise the folder itself', () => {
    assert.deepEqual(loraFoldersOf(A1111), [LORA, LYCORIS]);
    assert.deepEqual(loraFoldersOf(COMFY), [LORAS]);
    assert.deepEqual(loraFoldersOf(PLAIN), [PLAIN]);
    assert.deepEqual(loraFoldersOf(LORA), [LORA]);
    assert.deepEqual(loraFoldersOf(path.join(tmp, 'does-not-exist')), []);
  });

  test('lists a LyCORIS folder symlinked to Lora once', () => {
    const install = path.join(tmp, 'a1111-linked');
    fs.mkdirSync(path.join(install, 'models/Lora'), { recursive: true });
    fs.symlinkSync('Lora', path.join(install, 'models/LyCORIS'));
    assert.deepEqual(loraFoldersOf(install), [path.join(install, 'models/Lora')]);
  });
});

describe('scanning an A1111 tree', async () => {
  const entries = await scanLoraFolders(loraFoldersOf(A1111), { hashes: true });

  test('finds every LoRA file (recursively, .pt included, hidden folders and checkpoints folder not), sorted by relativeDir then name', () => {
    assert.deepEqual(
      entries.map((e) => [e.relativeDir, e.name, path.relative(A1111, e.root)]),
      [
        ['', 'broken_truncated', 'models/Lora'],
        ['', 'cloneofsimo_lora_pti_disney_inpainting', 'models/LyCORIS'],
        ['', 'diffusers_unet_lora_sd2_bf16', 'models/LyCORIS'],
        ['', 'garbage', 'models/Lora'],
        ['', 'lora_kohya_a', 'models/Lora'],
        ['', 'old_style', 'models/Lora'],
        ['sub', 'diffusers_attnproc_lora_sd15', 'models/Lora'],
        ['sub', 'diffusers_unet_lora_sd15_pokemon', 'models/Lora'],
        ['sub', 'lycoris_lokr_sd1_smart_falcon_dim4', 'models/Lora'],
        ['sub/deeper', 'lora_kohya_b_locon', 'models/Lora'],
      ],
    );
    for (const e of entries) {
      assert.equal(e.path, path.join(e.root, e.relativeDir, path.basename(e.path)));
      assert.equal(e.sizeBytes, fs.statSync(e.path).size, e.name);
    }
  });

  test('alias is ss_output_name, metadata is the header __metadata__', () => {
    assert.equal(byName(entries, 'lora_kohya_a').alias, 'tiny_lora_a');
    const lokr = byName(entries, 'lycoris_lokr_sd1_smart_falcon_dim4');
    assert.equal(lokr.alias, 'smart_falcon_lokr_3.0e-4');
    const manifestLokr = REAL_LORAS.find((l) => l.file.includes('lokr'))!;
    assert.equal(lokr.metadata.ss_sd_model_name, manifestLokr.metadata.ss_sd_model_name);
    assert.ok(lokr.metadata.ss_tag_frequency!.length > 1000, 'large values are kept');
    const pokemon = byName(entries, 'diffusers_unet_lora_sd15_pokemon');
    assert.equal(pokemon.alias, undefined);
    assert.deepEqual(pokemon.metadata, REAL_LORAS.find((l) => l.file.includes('pokemon'))!.metadata);
  });

  test('base model of every real LoRA comes from its keys and matches the manifest', () => {
    assert.equal(REAL_LORAS.length, 5);
    for (const l of REAL_LORAS) {
      const e = byName(entries, stemOf(l.file));
      assert.equal(e.baseModel, familyOf(l.base_model), `${e.name}: ${e.baseModelEvidence}`);
      assert.match(e.baseModelEvidence, /^keys: /, e.name);
      assert.ok(e.baseModelEvidence.includes(`width ${CROSS_ATTENTION_WIDTH[e.baseModel]}`), `${e.name}: ${e.baseModelEvidence}`);
    }
  });

  test('falls back to metadata only when the keys cannot tell (tiny 32-wide fixtures)', () => {
    const a = byName(entries, 'lora_kohya_a');
    assert.equal(a.baseModel, 'sd1');
    assert.match(a.baseModelEvidence, /^metadata: ss_base_model_version = sd_v1 \(keys cannot tell: cross-attention input width 32/);
    const locon = byName(entries, 'lora_kohya_b_locon'); // no metadata, broken .civitai.info
    assert.equal(locon.baseModel, 'unknown');
  });

  test('short hash of every real LoRA equals the manifest addnet hash (A1111 shorthash)', async () => {
    for (const l of REAL_LORAS) {
      const e = byName(entries, stemOf(l.file));
      assert.equal(e.shortHash, l.addnet_hash_sha256_after_header.slice(0, 12), e.name);
      assert.equal(e.shortHash, l.a1111_lora_shorthash, e.name);
      assert.equal(await addnetShortHash(e.path), l.a1111_lora_shorthash, e.name);
    }
    assert.equal(byName(entries, 'lora_kohya_a').shortHash, KOHYA_A_SSHS_MODEL_HASH.slice(0, 12));
  });

  test('trigger words: Civitai trainedWords, then the top ss_tag_frequency tags by count, deduplicated', () => {
    // ss_tag_frequency: tinychar 12, 1girl 9, solo 7, smile 5, blue sky 3, café 2 (the top 5 are taken).
    assert.deepEqual(byName(entries, 'lora_kohya_a').triggerWords, ['tinychar', 'red coat', '1girl', 'solo', 'smile', 'blue sky']);
    assert.deepEqual(byName(entries, 'lycoris_lokr_sd1_smart_falcon_dim4').triggerWords.slice(0, 2), ['smart falcon \\(umamusume\\)', 'hair bow']);
    assert.deepEqual(byName(entries, 'diffusers_unet_lora_sd15_pokemon').triggerWords, []);
  });

  test('reads Civitai info and A1111 user metadata', () => {
    const a = byName(entries, 'lora_kohya_a');
    assert.deepEqual(a.civitai, { modelName: 'Tiny Character', versionName: 'v1.0', baseModel: 'SD 1.5', trainedWords: ['tinychar', 'red coat'] });
    assert.equal(a.activationText, 'tinychar, red coat');
    assert.equal(a.preferredWeight, 0.7);
    assert.equal(a.notes, 'Use with a low CFG.');
    const lokr = byName(entries, 'lycoris_lokr_sd1_smart_falcon_dim4');
    assert.equal(lokr.preferredWeight, undefined, 'A1111 writes 0 for an unset weight');
    assert.equal(lokr.activationText, undefined);
    assert.equal(lokr.civitai, undefined);
  });

  test('preview and description in A1111 order', () => {
    assert.equal(byName(entries, 'lora_kohya_a').preview, path.join(LORA, 'lora_kohya_a.png'));
    assert.equal(byName(entries, 'lycoris_lokr_sd1_smart_falcon_dim4').preview, path.join(LORA, 'sub/lycoris_lokr_sd1_smart_falcon_dim4.preview.webp'));
    assert.equal(byName(entries, 'diffusers_unet_lora_sd15_pokemon').preview, undefined);
    assert.equal(byName(entries, 'diffusers_unet_lora_sd15_pokemon').notes, 'Pokemon style (from .txt)');
    assert.equal(byName(entries, 'lycoris_lokr_sd1_smart_falcon_dim4').notes, 'Smart Falcon, LoKr dim 4');
  });

  test('broken files and sidecars become problems on their entry; healthy entries have none', () => {
    const problems = (name: string): readonly string[] => byName(entries, name).problems;
    const one = (name: string, ...parts: string[]): void => {
      const p = problems(name);
      assert.equal(p.length, 1, `${name}: ${p.join(' | ')}`);
      for (const part of parts) assert.ok(p[0]!.includes(part), `${name}: "${p[0]}" should mention ${part}`);
    };
    one('broken_truncated', 'broken_truncated.safetensors', 'truncated');
    one('garbage', 'garbage.safetensors', 'not a safetensors file');
    one('old_style', 'old_style.pt', 'pickle file, not loaded');
    one('lora_kohya_b_locon', 'lora_kohya_b_locon.civitai.info', 'not valid JSON');
    one('diffusers_attnproc_lora_sd15', 'diffusers_attnproc_lora_sd15.json', 'preferred weight');
    for (const name of ['broken_truncated', 'garbage', 'old_style']) {
      const e = byName(entries, name);
      assert.deepEqual([e.baseModel, e.metadata, e.shortHash], ['unknown', {}, undefined], name);
    }
    const locon = byName(entries, 'lora_kohya_b_locon');
    assert.equal(locon.civitai, undefined);
    assert.match(locon.shortHash ?? '', /^[0-9a-f]{12}$/, 'a bad sidecar does not stop hashing');
    assert.equal(byName(entries, 'diffusers_attnproc_lora_sd15').activationText, 'attnproc', 'the valid fields of a partly bad .json are kept');
    for (const name of ['lora_kohya_a', 'lycoris_lokr_sd1_smart_falcon_dim4', 'diffusers_unet_lora_sd15_pokemon', 'diffusers_unet_lora_sd2_bf16', 'cloneofsimo_lora_pti_disney_inpainting']) {
      assert.deepEqual(problems(name), [], name);
    }
  });
});

describe('scanning ComfyUI and plain folders', async () => {
  const comfy = await scanLoraFolders(loraFoldersOf(COMFY));
  const plain = await scanLoraFolders(loraFoldersOf(PLAIN));

  test('finds the files with their subfolders; hashes only when asked', () => {
    assert.deepEqual(comfy.map((e) => [e.relativeDir, e.name]), [['', 'lora_diffusers'], ['', 'tiny_copy'], ['style', 'lora_peft']]);
    assert.ok(comfy.every((e) => e.shortHash === undefined));
  });

  test('trigger words from ss_tag_frequency alone, in count order', () => {
    assert.deepEqual(byName(comfy, 'tiny_copy').triggerWords, ['tinychar', '1girl', 'solo', 'smile', 'blue sky']);
  });

  test('a folder symlinked into itself is walked once; a dangling symlink is an entry with a problem', () => {
    assert.deepEqual(plain.map((e) => e.name), ['dangling', 'lora_peft', 'spec_trigger']);
    const dangling = byName(plain, 'dangling');
    assert.equal(dangling.problems.length, 1);
    assert.match(dangling.problems[0]!, /`dangling\.safetensors` cannot be read \(ENOENT/);
    assert.deepEqual([dangling.sizeBytes, dangling.baseModel], [0, 'unknown']);
  });

  test('modelspec.trigger_phrase comes first; SDXL told by te1/te2 keys; cover images dropped', () => {
    const spec = byName(plain, 'spec_trigger');
    assert.deepEqual(spec.triggerWords, ['spec phrase', 'other']);
    assert.equal(spec.baseModel, 'sdxl');
    assert.match(spec.baseModelEvidence, /lora_te1_/);
    assert.equal(spec.metadata.ssmd_cover_images, undefined, 'cover images are dropped');
    assert.equal(spec.metadata['modelspec.trigger_phrase'], 'spec phrase');
  });
});

describe('base model from keys (real header descriptions)', () => {
  test('SD 1.5 kohya → sd1 (768), SDXL kohya → sdxl (te1/te2, and 2048 without them), FLUX → unknown', () => {
    assert.equal(detectBaseModelFromKeys(headerDescription('invokeai_probe_header_sd15_kohya_shinkai_makoto_offset.json')).baseModel, 'sd1');
    const sdxl = headerDescription('invokeai_probe_header_sdxl_kohya_alien_style.json');
    assert.equal(detectBaseModelFromKeys(sdxl).baseModel, 'sdxl');
    const unetOnly = new Map([...sdxl].filter(([k]) => !k.startsWith('lora_te')));
    const verdict = detectBaseModelFromKeys(unetOnly);
    assert.deepEqual([verdict.baseModel, verdict.evidence.includes('width 2048')], ['sdxl', true], verdict.evidence);
    assert.equal(detectBaseModelFromKeys(headerDescription('invokeai_probe_header_flux_peft_adapter.json')).baseModel, 'unknown');
  });
});

describe('resolving <lora:NAME> names', async () => {
  const a1111 = await scanLoraFolders(loraFoldersOf(A1111));
  const all = await scanLoraFolders([...loraFoldersOf(A1111), ...loraFoldersOf(COMFY), PLAIN]);

  test('by stem, by alias, by path', () => {
    assert.equal(resolveLoraName(a1111, 'lora_kohya_a')?.path, path.join(LORA, 'lora_kohya_a.safetensors'));
    assert.equal(resolveLoraName(a1111, 'tiny_lora_a')?.name, 'lora_kohya_a');
    assert.equal(resolveLoraName(a1111, 'smart_falcon_lokr_3.0e-4')?.name, 'lycoris_lokr_sd1_smart_falcon_dim4');
    const sub = path.join(LORA, 'sub/diffusers_unet_lora_sd15_pokemon.safetensors');
    assert.equal(resolveLoraName(a1111, sub)?.name, 'diffusers_unet_lora_sd15_pokemon');
    assert.equal(resolveLoraName(all, path.join(PLAIN, 'lora_peft.safetensors'))?.root, PLAIN, 'a path picks one of two same-named files');
    assert.equal(resolveLoraName(all, 'lora_kohya_a')?.name, 'lora_kohya_a', 'a unique stem wins over a clashing alias');
    assert.equal(resolveLoraName(a1111, 'nothing_like_this'), undefined);
  });

  test('rejects a stem or alias shared by several files, listing them', () => {
    const ambiguous = (name: string, expected: string[]): void => {
      assert.throws(
        () => resolveLoraName(all, name),
        (e: unknown) => {
          assert.ok(e instanceof ModelError, `expected ModelError, got ${String(e)}`);
          assert.equal(e.code, 'AMBIGUOUS_LORA_NAME');
          assert.ok(e.message.includes(`\`${name}\``), e.message);
          for (const p of expected) assert.ok(e.message.includes(p), `message lists ${p}: ${e.message}`);
          assert.deepEqual([...(e.details.candidates as string[])].sort(), [...expected].sort());
          return true;
        },
      );
    };
    ambiguous('lora_peft', [path.join(LORAS, 'style/lora_peft.safetensors'), path.join(PLAIN, 'lora_peft.safetensors')]);
    ambiguous('tiny_lora_a', [path.join(LORA, 'lora_kohya_a.safetensors'), TINY_COPY, path.join(PLAIN, 'spec_trigger.safetensors')]);
  });
});

describe('hash cache', () => {
  const cacheFile = path.join(tmp, 'cache/lora-hashes.json');
  const readCache = (): { files: Record<string, { size: number; mtimeMs: number; sha256: string }> } => JSON.parse(fs.readFileSync(cacheFile, 'utf-8'));
  const scan = (hashes: boolean): Promise<LoraLibraryEntry[]> => scanLoraFolders([LORAS], { hashes, cache: cacheFile });

  test('is written keyed by real path, size and mtime, reused without re-reading, and refreshed when the file changes', async () => {
    const first = await scan(true);
    const cache = readCache();
    const st = fs.statSync(TINY_COPY);
    assert.deepEqual(cache.files[fs.realpathSync(TINY_COPY)], { size: st.size, mtimeMs: st.mtimeMs, sha256: KOHYA_A_SSHS_MODEL_HASH });
    assert.ok(cache.files[fs.realpathSync(path.join(LORAS, 'style/lora_peft.safetensors'))] !== undefined, 'symlinks are keyed by their target');
    assert.equal(byName(first, 'tiny_copy').shortHash, KOHYA_A_SSHS_MODEL_HASH.slice(0, 12));

    // Nothing new to hash: the cache file is not rewritten.
    const old = new Date('2001-01-01T00:00:00Z');
    fs.utimesSync(cacheFile, old, old);
    await scan(true);
    assert.equal(fs.statSync(cacheFile).mtimeMs, old.getTime());

    // A planted hash is returned as is: the file was not read again. Without `hashes`, cached values still show.
    const planted = 'ab'.repeat(32);
    cache.files[fs.realpathSync(TINY_COPY)]!.sha256 = planted;
    fs.writeFileSync(cacheFile, JSON.stringify(cache));
    assert.equal(byName(await scan(true), 'tiny_copy').shortHash, planted.slice(0, 12));
    assert.equal(byName(await scan(false), 'tiny_copy').shortHash, planted.slice(0, 12));

    // A new mtime invalidates the entry: hashed again and the cache updated.
    const touched = new Date('2020-02-02T00:00:00Z');
    fs.utimesSync(TINY_COPY, touched, touched);
    assert.equal(byName(await scan(false), 'tiny_copy').shortHash, undefined, 'stale cache entries are not used');
    assert.equal(byName(await scan(true), 'tiny_copy').shortHash, KOHYA_A_SSHS_MODEL_HASH.slice(0, 12));
    assert.deepEqual(readCache().files[fs.realpathSync(TINY_COPY)], { size: st.size, mtimeMs: touched.getTime(), sha256: KOHYA_A_SSHS_MODEL_HASH });
  });

  test('a corrupt cache file is rebuilt', async () => {
    fs.writeFileSync(cacheFile, '{ not json');
    assert.equal(byName(await scan(true), 'tiny_copy').shortHash, KOHYA_A_SSHS_MODEL_HASH.slice(0, 12));
    assert.equal(readCache().files[fs.realpathSync(TINY_COPY)]?.sha256, KOHYA_A_SSHS_MODEL_HASH);
  });
});

describe('rejects', () => {
  const rejectsWith = async (run: () => Promise<unknown>, code: string, culprit: string): Promise<void> => {
    await assert.rejects(run, (e: unknown) => {
      assert.ok(e instanceof ModelError, `expected ModelError, got ${String(e)}`);
      assert.equal(e.code, code, e.message);
      assert.ok(e.message.includes(culprit), `message names ${culprit}: ${e.message}`);
      return true;
    });
  };

  test('a missing root or a root that is a file', async () => {
    await rejectsWith(() => scanLoraFolders([path.join(tmp, 'nope')]), 'MODEL_NOT_FOUND', path.join(tmp, 'nope'));
    await rejectsWith(() => scanLoraFolders([TINY_COPY]), 'MODEL_NOT_FOUND', TINY_COPY);
  });

  test('hashing a truncated or pickle file', async () => {
    await rejectsWith(() => addnetShortHash(TRUNCATED), 'TRUNCATED_FILE', 'broken_truncated.safetensors');
    await rejectsWith(() => addnetShortHash(PICKLE), 'PICKLE_CHECKPOINT', 'old_style.pt');
  });
});
