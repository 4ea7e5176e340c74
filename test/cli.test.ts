/**
 * The CLI as users run it: `chorus debug run` reproduces the fixture tensors through files, and bad
 * invocations fail with the right exit code and a message naming the problem.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { openSafetensors } from '../models/index.ts';
import { FIXTURES, REF, assertClose, refCases } from './fixtures.ts';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const CHORUS = path.join(ROOT, 'cli', 'bin', 'chorus.mjs');
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'chorus-cli-'));
const cache = path.join(tmp, 'cache');

function chorus(...args: string[]) {
  return spawnSync(process.execPath, [CHORUS, ...args], { encoding: 'utf-8', cwd: ROOT });
}

test('chorus debug run unet reproduces the batch-2 CFG fixture from a file', () => {
  const [c] = refCases('unet').filter((x) => x.id === 'unet/t1_b2_cfg');
  const out = path.join(tmp, 'unet-out.safetensors');
  const r = chorus('debug', 'run', 'unet', '--model', path.join(FIXTURES, 'tiny-sd15'), '--inputs', path.join(REF, 'unet.safetensors'), '--prefix', 't1_b2_cfg.', '--out', out, '--device', 'cpu', '--cache', cache);
  assert.equal(r.status, 0, r.stderr);
  assert.match(r.stdout, /noise_pred \[2, 4, 32, 32\]/);
  const got = openSafetensors(out);
  const ref = openSafetensors(path.join(REF, c!.file));
  assertClose(got.readFloat32('noise_pred').data, ref.readFloat32(c!.outputs.noise_pred!.key).data, c!.tolerance.atol!, 'noise_pred via CLI');
  assert.equal(got.metadata.chorus_graph, 'unet');
  got.close();
  ref.close();
});

test('chorus debug run text-encoder on the single-file checkpoint', () => {
  const [c] = refCases('text_encoder');
  const out = path.join(tmp, 'te-out.safetensors');
  const r = chorus(
    'debug', 'run', 'text-encoder',
    '--model', path.join(FIXTURES, 'tiny-sd15-single-file', 'tiny-sd15.safetensors'),
    '--config', path.join(FIXTURES, 'tiny-sd15'),
    '--inputs', path.join(REF, 'text_encoder.safetensors'), '--out', out, '--device', 'cpu', '--cache', cache,
  );
  assert.equal(r.status, 0, r.stderr);
  const got = openSafetensors(out);
  const ref = openSafetensors(path.join(REF, c!.file));
  for (const k of ['last_hidden_state', 'penultimate_raw', 'penultimate_final_ln']) {
    assertClose(got.readFloat32(k).data, ref.readFloat32(c!.outputs[k]!.key).data, c!.tolerance.atol!, k);
  }
  got.close();
  ref.close();
});

test('chorus rejects a missing input tensor, naming it (exit 1)', () => {
  const r = chorus('debug', 'run', 'vae-decoder', '--model', path.join(FIXTURES, 'tiny-sd15'), '--inputs', path.join(REF, 'unet.safetensors'), '--out', path.join(tmp, 'x.safetensors'), '--cache', cache);
  assert.equal(r.status, 1);
  assert.match(r.stderr, /error \[MISSING_TENSOR\]: unet\.safetensors: no tensor `latents_scaled`/);
});

test('chorus rejects bad usage with exit 2', () => {
  const r1 = chorus('debug', 'run', 'decoder', '--model', 'x');
  assert.equal(r1.status, 2);
  assert.match(r1.stderr, /graph must be one of text-encoder, unet, vae-decoder, vae-encoder/);
  const r2 = chorus('debug', 'run', 'unet', '--model', path.join(FIXTURES, 'tiny-sd15'), '--device', 'tpu', '--inputs', 'a', '--out', 'b');
  assert.equal(r2.status, 2);
  assert.match(r2.stderr, /--device must be one of/);
  const r3 = chorus('frobnicate');
  assert.equal(r3.status, 2);
});

test('chorus inspect refuses a pickle checkpoint and says to use .safetensors (exit 1)', () => {
  const f = path.join(tmp, 'model.ckpt');
  fs.writeFileSync(f, Buffer.from([0x50, 0x4b, 0x03, 0x04, 0, 0, 0, 0]));
  const r = chorus('inspect', f);
  assert.equal(r.status, 1);
  assert.match(r.stderr, /PICKLE_CHECKPOINT.*\.safetensors/);
});
