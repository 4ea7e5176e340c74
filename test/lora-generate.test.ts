/**
 * LoRAs in text to image: prompt tags and the job's list resolve through the LoRA folders, bank and
 * merged modes agree, the infotext records A1111's `Lora hashes`, and bad LoRAs fail with typed
 * errors before any sampling.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { ModelError, Sd15Engine } from '../models/index.ts';
import { engineModels, generate, normalizeJob, readImageMetadata, type SdModels } from '../pipelines/index.ts';
import { PipelineError } from '../pipelines/errors.ts';
import { FIXTURES, REALWORLD, assertClose } from './fixtures.ts';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const MODEL = path.join(FIXTURES, 'tiny-sd15');
const LORA_DIR = path.join(FIXTURES, 'tiny-sd15-lora');
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'chorus-lora-gen-'));
const cacheDir = path.join(tmp, 'cache');

/** A1111's short hash, computed here independently: sha256 of the bytes after the header, 12 hex. */
function a1111ShortHash(file: string): string {
  const bytes = fs.readFileSync(file);
  const headerLength = Number(bytes.readBigUInt64LE(0));
  return createHash('sha256').update(bytes.subarray(8 + headerLength)).digest('hex').slice(0, 12);
}

const base = { model: MODEL, negativePrompt: 'blurry', steps: 3, sampler: 'Euler', seed: 11, width: 64, height: 64 };

describe('LoRAs in text to image', () => {
  let engine: Sd15Engine;
  let models: SdModels;
  before(() => {
    engine = Sd15Engine.open(MODEL, { device: 'cpu', cacheDir });
    models = engineModels(engine, { loraDirs: [LORA_DIR] });
  });
  after(async () => engine.dispose());

  test('a prompt tag and the job list give the same image; without the LoRA it differs', async () => {
    const tagged = await generate(normalizeJob({ ...base, prompt: 'a cat <lora:lora_kohya_a:0.8>' }), models);
    const listed = await generate(normalizeJob({ ...base, prompt: 'a cat', loras: [{ name: path.join(LORA_DIR, 'lora_kohya_a.safetensors'), te: 0.8, unet: 0.8 }] }), models);
    const plain = await generate(normalizeJob({ ...base, prompt: 'a cat' }), models);
    assertClose(tagged.images[0]!.finalLatents.data, listed.images[0]!.finalLatents.data, 1e-6, 'tag vs list');
    assert.equal(tagged.loraMode, 'bank');
    assert.equal(tagged.loras[0]!.coverage.matched, 216);
    let d = 0;
    tagged.images[0]!.finalLatents.data.forEach((v, i) => (d = Math.max(d, Math.abs(v - plain.images[0]!.finalLatents.data[i]!))));
    assert.ok(d > 1e-2, `the LoRA changes the result (max diff ${d})`);
  });

  test('bank and merged modes agree for a two-LoRA stack', async () => {
    const prompt = 'a cat <lora:lora_kohya_a:0.8> <lora:lora_kohya_b_locon:0.6:0.3>';
    const bank = await generate(normalizeJob({ ...base, prompt, loraMode: 'bank' }), models);
    const merged = await generate(normalizeJob({ ...base, prompt, loraMode: 'merged' }), models);
    assert.equal(merged.loraMode, 'merged');
    assert.deepEqual(bank.loras.map((l) => [l.name, l.te, l.unet]), [['lora_kohya_a', 0.8, 0.8], ['lora_kohya_b_locon', 0.6, 0.3]]);
    assertClose(bank.images[0]!.finalLatents.data, merged.images[0]!.finalLatents.data, 2e-3, 'bank vs merged final latents');
  });

  test('rejects an unknown LoRA name, naming the folders searched', async () => {
    await assert.rejects(generate(normalizeJob({ ...base, prompt: 'a cat <lora:nope:1>' }), models), (e: unknown) => e instanceof PipelineError && e.code === 'BAD_ARGUMENT' && e.message.includes('"nope"') && e.message.includes(LORA_DIR));
  });

  test('rejects LoRAs made for another base model (SD 2.x, and LoKr for a 768-wide SD 1.5 on this tiny model)', async () => {
    for (const file of ['diffusers_unet_lora_sd2_bf16.safetensors', 'lycoris_lokr_sd1_smart_falcon_dim4.safetensors']) {
      const p = path.join(REALWORLD, 'lora', file);
      await assert.rejects(
        generate(normalizeJob({ ...base, prompt: 'a cat', loras: [{ name: p, te: 1, unet: 1 }] }), models),
        (e: unknown) => e instanceof ModelError && e.code === 'LORA_BASE_MISMATCH' && e.message.includes(file),
      );
    }
  });
});

test('chorus generate writes A1111 Lora hashes and the LoRAs into the chorus metadata', () => {
  const out = path.join(tmp, 'lora.png');
  const r = spawnSync(
    process.execPath,
    [path.join(ROOT, 'cli/bin/chorus.mjs'), 'generate', '--model', MODEL, '--prompt', 'a cat <lora:lora_kohya_a:0.8>', '--lora-dir', LORA_DIR, '--lora', `${path.join(LORA_DIR, 'lora_peft.safetensors')}:0.5`, '--steps', '2', '--width', '64', '--height', '64', '--out', out, '--cache', cacheDir, '--device', 'cpu'],
    { encoding: 'utf-8' },
  );
  assert.equal(r.status, 0, r.stderr);
  assert.match(r.stderr, /LoRA lora_kohya_a \[[0-9a-f]{12}\] te 0\.8 unet 0\.8: 216\/216 modules applied \(bank\)/);
  const meta = readImageMetadata(new Uint8Array(fs.readFileSync(out)), 'lora.png');
  const a1111 = meta.sources.find((s) => s.kind === 'a1111');
  assert.ok(a1111 !== undefined && a1111.kind === 'a1111', 'an A1111 infotext');
  const expected = `Lora hashes: "lora_peft: ${a1111ShortHash(path.join(LORA_DIR, 'lora_peft.safetensors'))}, lora_kohya_a: ${a1111ShortHash(path.join(LORA_DIR, 'lora_kohya_a.safetensors'))}"`;
  assert.ok(a1111.text.includes(expected), `${a1111.text}\nshould include ${expected}`);
  const chorus = meta.sources.find((s) => s.kind === 'chorus');
  assert.ok(chorus !== undefined && chorus.kind === 'chorus', 'a chorus chunk');
  const job = chorus.job as { loras: Array<{ name: string; te: number }>; loraMode: string };
  assert.deepEqual(job.loras.map((l) => [l.name, l.te]), [['lora_peft', 0.5], ['lora_kohya_a', 0.8]]);
  assert.equal(job.loraMode, 'bank');
});
