/**
 * Regions: masks rounded to every UNet grid as Mix-of-Show does, painted masks, overlapping
 * regions' LoRA strengths averaged, and end to end on the tiny model: one full-canvas region equals
 * plain generation with that prompt and LoRA; bad regions fail with typed errors.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import sharp from 'sharp';
import { Sd15Engine } from '../models/index.ts';
import { engineModels, generate, normalizeJob, type SdModels } from '../pipelines/index.ts';
import { PipelineError } from '../pipelines/errors.ts';
import { boxMask, levelSizes, pixelStrengths, regionMasks } from '../pipelines/regions.ts';
import { FIXTURES, assertClose } from './fixtures.ts';

const MODEL = path.join(FIXTURES, 'tiny-sd15');
const LORAS = path.join(FIXTURES, 'tiny-sd15-lora');
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'chorus-regions-'));

describe('region masks on the UNet grids', () => {
  test('levels halve with ceiling: 96×64 latent → 96×64, 48×32, 24×16, 12×8; odd sizes round up', () => {
    assert.deepEqual(levelSizes(96, 64, 4), [[96, 64], [48, 32], [24, 16], [12, 8]]);
    assert.deepEqual(levelSizes(9, 5, 3), [[9, 5], [5, 3], [3, 2]]);
  });

  test('boxes: ceil start, floor end, on a non-square grid', () => {
    // Box x 100…300, y 50…150 of a 400×200 image on a 4×8 grid (h 4, w 8):
    // rows ceil(0.25·4)=1 … floor(0.75·4)=3 → 1,2; cols ceil(0.25·8)=2 … floor(0.75·8)=6 → 2…5
    const m = boxMask([100, 50, 200, 100], 400, 200, 4, 8);
    const rows = Array.from({ length: 4 }, (_, i) => [...m.subarray(i * 8, i * 8 + 8)].join(''));
    assert.deepEqual(rows, ['00000000', '00111100', '00111100', '00000000']);
    // A box narrower than a cell vanishes on a coarse grid, as in the official code.
    assert.equal(boxMask([10, 10, 20, 20], 400, 200, 4, 8).reduce((a, b) => a + b, 0), 0);
  });

  test('a painted mask PNG is averaged over each cell (alpha when it varies)', async () => {
    const w = 64;
    const h = 32;
    const rgba = Buffer.alloc(w * h * 4);
    for (let y = 0; y < h; y++) for (let x = 0; x < w; x++) rgba[(y * w + x) * 4 + 3] = x < w / 2 ? 255 : 0; // left half opaque
    const file = path.join(tmp, 'mask.png');
    await sharp(rgba, { raw: { width: w, height: h, channels: 4 } }).png().toFile(file);
    const [m0, m1] = await regionMasks([{ mask: file, prompt: 'x' }], 128, 64, [[8, 16], [4, 8]]);
    assert.deepEqual(m0!.shape, [1, 1, 8, 16]);
    assert.deepEqual([...m0!.data.subarray(0, 16)].join(''), '1111111100000000');
    assert.deepEqual([...m1!.data.subarray(0, 8)].join(''), '11110000');
  });

  test('overlapping regions average their LoRA strengths on top of the global ones', () => {
    const masks = [{ dtype: 'float32' as const, shape: [1, 2, 1, 3], data: Float32Array.from([1, 1, 0, 0, 1, 1]) }];
    const [map] = pixelStrengths(masks, [0.5, 0], [[0, 1], [0, 0.4]]);
    // pixel 0: region 0 only → LoRA 1 at 1; pixel 1: both → (1 + 0.4)/2; pixel 2: region 1 → 0.4; LoRA 0 global 0.5 everywhere
    assert.deepEqual([...map!.data].map((v) => Math.round(v * 1000) / 1000), [0.5, 0.5, 0.5, 1, 0.7, 0.4]);
  });
});

describe('regions end to end', () => {
  let engine: Sd15Engine;
  let models: SdModels;
  before(() => {
    engine = Sd15Engine.open(MODEL, { device: 'cpu', cacheDir: path.join(tmp, 'cache') });
    models = engineModels(engine, { loraDirs: [LORAS] });
  });
  after(async () => engine.dispose());

  const base = { model: MODEL, negativePrompt: 'blurry', steps: 4, sampler: 'Euler', seed: 21, width: 96, height: 64 };

  test('one full-canvas region equals plain generation with its prompt and LoRA', async () => {
    const lora = { name: 'lora_kohya_b_locon', te: 0.9, unet: 0.6 };
    const plain = await generate(normalizeJob({ ...base, prompt: 'a red coat', loras: [lora] }), models);
    const regions = await generate(
      normalizeJob({ ...base, prompt: 'a green field', strategy: { name: 'regions' }, regions: [{ box: [0, 0, 96, 64], prompt: 'a red coat', lora }] }),
      models,
    );
    assertClose(regions.images[0]!.finalLatents.data, plain.images[0]!.finalLatents.data, 1e-3, 'full-canvas region vs plain');
    const other = await generate(normalizeJob({ ...base, prompt: 'a green field', loras: [lora] }), models);
    let d = 0;
    other.images[0]!.finalLatents.data.forEach((v, i) => (d = Math.max(d, Math.abs(v - plain.images[0]!.finalLatents.data[i]!))));
    assert.ok(d > 1e-2, `the prompt matters (${d}), so the equality above is not trivial`);
  });

  test('a half-canvas region changes the image, more inside than outside', async () => {
    const job = { ...base, prompt: 'a green field', steps: 3 };
    const none = await generate(normalizeJob(job), models);
    const half = await generate(normalizeJob({ ...job, strategy: { name: 'regions' }, regions: [{ box: [0, 0, 48, 64], prompt: 'a red coat', lora: { name: 'lora_kohya_a', te: 1, unet: 1 } }] }), models);
    const [, c, h, w] = none.images[0]!.finalLatents.shape as number[];
    let inside = 0;
    let outside = 0;
    for (let ch = 0; ch < c!; ch++) {
      for (let y = 0; y < h!; y++) {
        for (let x = 0; x < w!; x++) {
          const i = (ch * h! + y) * w! + x;
          const d = Math.abs(half.images[0]!.finalLatents.data[i]! - none.images[0]!.finalLatents.data[i]!);
          if (x < w! / 2) inside += d;
          else outside += d;
        }
      }
    }
    assert.ok(inside > 1.5 * outside, `change inside ${inside.toFixed(2)} vs outside ${outside.toFixed(2)}`);
  });

  test('rejects: a region outside the canvas, a region LoRA that is not there, no regions, an unreadable mask', async () => {
    assert.throws(() => normalizeJob({ ...base, prompt: 'x', strategy: { name: 'regions' }, regions: [{ box: [50, 0, 60, 64], prompt: 'y' }] }), (e: unknown) => e instanceof PipelineError && e.code === 'BAD_ARGUMENT' && /regions\[0\]\.box .*outside the 96×64 canvas/.test(e.message));
    await assert.rejects(
      generate(normalizeJob({ ...base, prompt: 'x', strategy: { name: 'regions' }, regions: [{ box: [0, 0, 10, 10], prompt: 'y', lora: { name: 'not_a_lora', te: 1, unet: 1 } }] }), models),
      (e: unknown) => e instanceof PipelineError && e.message.includes('"not_a_lora"'),
    );
    await assert.rejects(generate(normalizeJob({ ...base, prompt: 'x', strategy: { name: 'regions' } }), models), (e: unknown) => e instanceof PipelineError && /at least one region/.test(e.message));
    await assert.rejects(
      generate(normalizeJob({ ...base, prompt: 'x', strategy: { name: 'regions' }, regions: [{ mask: path.join(tmp, 'missing.png'), prompt: 'y' }] }), models),
      (e: unknown) => e instanceof PipelineError && e.code === 'BAD_IMAGE' && e.message.includes('missing.png'),
    );
  });
});
