/**
 * `chorus generate` as users run it: the seeded reference run reproduced through the CLI
 * (--save-latents), the reference PNG reproduced from given initial latents (--init-latents), the
 * metadata the PNGs carry, and bad input failing with typed errors and exit code 1 or 2.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import sharp from 'sharp';
import { openSafetensors, writeSafetensors } from '../models/index.ts';
import { parseInfotext, readImageMetadata } from '../pipelines/index.ts';
import { FIXTURES, REF, assertClose, readManifest } from './fixtures.ts';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const CHORUS = path.join(ROOT, 'cli', 'bin', 'chorus.mjs');
const MODEL = path.join(FIXTURES, 'tiny-sd15');
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'chorus-gen-'));
const cache = path.join(tmp, 'cache');
const manifest = readManifest(path.join(REF, 'manifest.json'));
const caseById = (id: string) => manifest.cases.find((c: { id: string }) => c.id === id);

function chorus(...args: string[]) {
  return spawnSync(process.execPath, [CHORUS, 'generate', '--cache', cache, '--device', 'cpu', ...args], { encoding: 'utf-8', cwd: ROOT });
}

test('chorus generate reproduces the seeded Euler a reference run and writes its metadata', () => {
  const c = caseById('seeded/euler_a_seed42');
  const out = path.join(tmp, 'seeded.png');
  const latents = path.join(tmp, 'seeded-latents.safetensors');
  const r = chorus('--model', MODEL, '--prompt', c.prompt, '--negative', c.negative_prompt, '--steps', String(c.num_inference_steps), '--cfg', String(c.guidance_scale),
    '--sampler', c.a1111_sampler, '--seed', String(c.seed), '--width', String(c.width), '--height', String(c.height), '--out', out, '--save-latents', latents);
  assert.equal(r.status, 0, r.stderr);
  assert.equal(r.stdout.trim(), out);
  const f = openSafetensors(latents);
  const ref = openSafetensors(path.join(REF, c.file));
  assertClose(f.readFloat32('final_latents').data, ref.readFloat32(c.outputs.final_latents.key).data, c.tolerance.atol, 'final_latents via the CLI');
  assert.deepEqual(f.info('init_latents').shape, [1, 4, 32, 32]);
  f.close();
  ref.close();

  const meta = readImageMetadata(new Uint8Array(fs.readFileSync(out)), 'seeded.png');
  const a1111 = meta.sources.find((s) => s.kind === 'a1111');
  assert.ok(a1111 !== undefined && a1111.kind === 'a1111');
  const info = parseInfotext(a1111.text);
  assert.equal(info.prompt, c.prompt);
  assert.equal(info.negativePrompt, c.negative_prompt);
  assert.match(a1111.text, /^Steps: 10, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7\.5, Seed: 42, Size: 256x256, Model: tiny-sd15, RNG: CPU, Version: chorus$/m);
  const chorusMeta = meta.sources.find((s) => s.kind === 'chorus');
  assert.ok(chorusMeta !== undefined && chorusMeta.kind === 'chorus');
  const job = (chorusMeta.job as { job: Record<string, unknown> }).job;
  assert.equal(job.seed, '42');
  assert.equal(job.sampler, 'Euler a');
});

test('chorus generate --init-latents reproduces the reference DPM++ 2M PNG within ±1', async () => {
  const c = caseById('pipeline/dpmpp_2m');
  const ref = openSafetensors(path.join(REF, c.file));
  const init = path.join(tmp, 'init.safetensors');
  writeSafetensors(init, { init_latents: ref.readFloat32(c.inputs.latents_init.key) });
  ref.close();
  const out = path.join(tmp, 'dpm.png');
  const r = chorus('--model', MODEL, '--prompt', c.prompt, '--negative', c.negative_prompt, '--steps', '10', '--cfg', '7.5', '--sampler', 'DPM++ 2M', '--schedule', 'Uniform',
    '--width', '256', '--height', '256', '--init-latents', init, '--out', out, '--seed', '1');
  assert.equal(r.status, 0, r.stderr);
  const ours = await sharp(out).raw().toBuffer();
  const theirs = await sharp(path.join(REF, c.png)).removeAlpha().raw().toBuffer();
  assert.equal(ours.length, theirs.length);
  let maxDiff = 0;
  for (let i = 0; i < ours.length; i++) maxDiff = Math.max(maxDiff, Math.abs(ours[i]! - theirs[i]!));
  assert.ok(maxDiff <= 1, `max |diff| on 8-bit values is ${maxDiff}`);
});

test('chorus generate names several images in a folder NNNNN-seed.png, seeds counting up', () => {
  const dir = path.join(tmp, 'batch');
  const r = chorus('--model', MODEL, '--prompt', 'a cat', '--steps', '2', '--width', '64', '--height', '64', '--seed', '100', '--batch-size', '2', '--batch-count', '2', '--out', dir);
  assert.equal(r.status, 0, r.stderr);
  assert.deepEqual(fs.readdirSync(dir).sort(), ['00000-100.png', '00001-101.png', '00002-102.png', '00003-103.png']);
});

test('chorus generate rejects bad settings with typed errors (exit 1) and bad flags (exit 2)', () => {
  const base = ['--model', MODEL, '--prompt', 'a cat', '--steps', '2', '--width', '64', '--height', '64'];
  const cases: Array<[string[], number, RegExp]> = [
    [['--sampler', 'Euler z'], 1, /UNKNOWN_SAMPLER.*Euler z.*DPM\+\+ 2M/],
    [['--steps', '0'], 1, /BAD_STEPS.*steps must be an integer from 1/],
    [['--width', '100'], 1, /BAD_SIZE.*width must be a multiple of 8.*got 100 \(try 96\)/],
    [['--seed', '-5'], 1, /BAD_SEED.*-5/],
    [['--clip-skip', '13'], 1, /BAD_ARGUMENT.*clip skip must be an integer from 1 to 4/],
    [['--steps', 'many'], 2, /--steps must be a number/],
    [['--rng', 'gpu'], 2, /--rng must be cpu or nv/],
  ];
  for (const [extra, status, message] of cases) {
    const r = chorus(...base, ...extra, '--out', path.join(tmp, 'bad.png'));
    assert.equal(r.status, status, `${extra.join(' ')}: ${r.stderr}`);
    assert.match(r.stderr.replace(/\n/g, ' '), message, extra.join(' '));
  }
  assert.equal(fs.existsSync(path.join(tmp, 'bad.png')), false);
});

test('a 10,000-token prompt fails fast and clearly instead of hanging', () => {
  const prompt = Array.from({ length: 10_000 }, (_, i) => `word${i % 50}`).join(' ');
  const r = chorus('--model', MODEL, '--prompt', prompt, '--steps', '1', '--width', '64', '--height', '64', '--out', path.join(tmp, 'long.png'));
  assert.equal(r.status, 1, r.stderr);
  assert.match(r.stderr, /PROMPT_TOO_LONG.*more than 100 chunks/);
});

test('a model path that is not valid UTF-8 gets a typed error naming the path', () => {
  const r = spawnSync('bash', ['-c', `"${process.execPath}" "${CHORUS}" generate --model $'${tmp}/mod\\xffel' --prompt cat --cache "${cache}"`], { encoding: 'utf-8' });
  assert.equal(r.status, 1, r.stderr);
  assert.match(r.stderr, /MODEL_NOT_FOUND.*mod.*el: no such file or folder/);
});
