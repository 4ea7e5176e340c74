/**
 * Strategies and regions from the command line: flags parsed into the job, recorded in the PNG's
 * chorus metadata, and bad input refused with typed errors.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseRegionFlag, parseRegionMaskFlag } from '../cli/commands/generate.ts';
import { readImageMetadata } from '../pipelines/index.ts';
import { FIXTURES } from './fixtures.ts';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const MODEL = path.join(FIXTURES, 'tiny-sd15');
const LORAS = path.join(FIXTURES, 'tiny-sd15-lora');
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'chorus-strategy-cli-'));
const chorus = (...args: string[]) =>
  spawnSync(process.execPath, [path.join(ROOT, 'cli/bin/chorus.mjs'), 'generate', '--model', MODEL, '--lora-dir', LORAS, '--steps', '2', '--width', '64', '--height', '64', '--cache', path.join(tmp, 'cache'), '--device', 'cpu', ...args], { encoding: 'utf-8' });
const jobOf = (file: string) => {
  const meta = readImageMetadata(new Uint8Array(fs.readFileSync(file)), file);
  const c = meta.sources.find((s) => s.kind === 'chorus');
  assert.ok(c !== undefined && c.kind === 'chorus', 'chorus metadata');
  return (c.job as { job: Record<string, unknown> }).job;
};

test('--region parses the box, a prompt with colons, and an optional LoRA with one or two weights', () => {
  assert.deepEqual(parseRegionFlag('0,0,32,64:a (red:1.2) coat'), { box: [0, 0, 32, 64], prompt: 'a (red:1.2) coat' });
  assert.deepEqual(parseRegionFlag('8, 0, 24, 64:a cat:lora_kohya_a:0.8'), { box: [8, 0, 24, 64], prompt: 'a cat', lora: { name: 'lora_kohya_a', te: 0.8, unet: 0.8 } });
  assert.deepEqual(parseRegionFlag('0,0,8,8:x:l:1:0.5').lora, { name: 'l', te: 1, unet: 0.5 });
  assert.deepEqual(parseRegionMaskFlag('/masks/a.png:a dog:l:0.7'), { mask: '/masks/a.png', prompt: 'a dog', lora: { name: 'l', te: 0.7, unet: 0.7 } });
  assert.throws(() => parseRegionFlag('0,0,8:x'), /--region must be "x,y,w,h:prompt/);
});

test('composite and regions run from the CLI and are recorded in the image', () => {
  const composite = path.join(tmp, 'composite.png');
  let r = chorus('--prompt', 'a cat', '--strategy', 'composite', '--lora', 'lora_kohya_a:0.8', '--lora', 'lora_kohya_b_locon:0.8', '--out', composite);
  assert.equal(r.status, 0, r.stderr);
  assert.deepEqual(jobOf(composite).strategy, { name: 'composite' });

  const regions = path.join(tmp, 'regions.png');
  r = chorus('--prompt', 'a field', '--region', '0,0,32,64:a red coat:lora_kohya_a:0.9', '--region', '32,0,32,64:a dog', '--out', regions);
  assert.equal(r.status, 0, r.stderr);
  const job = jobOf(regions);
  assert.deepEqual(job.strategy, { name: 'regions' });
  assert.deepEqual(job.regions, [
    { box: [0, 0, 32, 64], prompt: 'a red coat', lora: { name: 'lora_kohya_a', te: 0.9, unet: 0.9 } },
    { box: [32, 0, 32, 64], prompt: 'a dog' },
  ]);
});

test('bad strategy input: typed errors (exit 1) and usage errors (exit 2)', () => {
  let r = chorus('--prompt', 'x', '--region', '40,0,32,64:a dog', '--out', path.join(tmp, 'bad.png'));
  assert.equal(r.status, 1, r.stderr);
  assert.match(r.stderr, /BAD_ARGUMENT.*regions\[0\]\.box .*outside the 64×64 canvas/);
  r = chorus('--prompt', 'x', '--strategy', 'switch', '--out', path.join(tmp, 'bad.png'));
  assert.equal(r.status, 1, r.stderr);
  assert.match(r.stderr, /the switch strategy composes LoRAs: it needs at least 1 LoRA, got 0/);
  r = chorus('--prompt', 'x', '--strategy', 'blend', '--out', path.join(tmp, 'bad.png'));
  assert.equal(r.status, 2);
  assert.match(r.stderr, /--strategy must be one of plain, merge, switch, composite, cmlora, regions/);
  assert.equal(fs.existsSync(path.join(tmp, 'bad.png')), false);
});
