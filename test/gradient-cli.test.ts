/**
 * The gradient-guided methods from the command line:
 * - `chorus debug vjp` (the conformance command) against the four `vjp/*` reference cases of
 *   tiny-sd15-ref (batch 1, a CFG batch of 2, a kohya LoRA through `--lora`, cross-attention only);
 * - `chorus generate --strategy clora | lora-composer` end to end on the tiny model, with the image's
 *   metadata recording the concepts and `--debug-masks` writing the masks as PNGs;
 * - bad input refused: usage errors (exit 2) and typed errors naming the field (exit 1).
 */
import { after, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import sharp from 'sharp';
import { openSafetensors } from '../models/index.ts';
import { readImageMetadata } from '../pipelines/index.ts';
import { parseMemorySize } from '../cli/args.ts';
import { FIXTURES, REF, assertClose, refCases } from './fixtures.ts';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const MODEL = path.join(FIXTURES, 'tiny-sd15');
const LORAS = path.join(FIXTURES, 'tiny-sd15-lora');
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'chorus-gradient-cli-'));
const cache = path.join(tmp, 'cache');
const chorus = (...args: string[]) => spawnSync(process.execPath, [path.join(ROOT, 'cli/bin/chorus.mjs'), ...args], { encoding: 'utf-8' });
const generate = (...args: string[]) =>
  chorus('generate', '--model', MODEL, '--lora-dir', LORAS, '--width', '64', '--height', '64', '--seed', '7', '--cache', cache, '--device', 'cpu', ...args);

after(() => fs.rmSync(tmp, { recursive: true, force: true }));

describe('chorus debug vjp reproduces the reference gradients (vjp/*)', () => {
  const ref = openSafetensors(path.join(REF, 'vjp.safetensors'));
  after(() => ref.close());
  for (const c of refCases('vjp')) {
    test(c.id, (t) => {
      const prefix = c.inputs.sample!.key.replace(/sample$/, '');
      const out = path.join(tmp, `${c.id.replace(/[/@]/g, '_')}.safetensors`);
      const lora = c.lora as { file: string; multiplier: number } | undefined;
      const r = chorus('debug', 'vjp', '--model', MODEL, '--inputs', path.join(REF, 'vjp.safetensors'), '--prefix', prefix, '--out', out, '--cache', cache, '--device', 'cpu', ...(lora === undefined ? [] : ['--lora', `${path.join(LORAS, lora.file)}:${lora.multiplier}`]));
      assert.equal(r.status, 0, r.stderr);
      assert.match(r.stdout, /wrote xattn \[.*\], selfattn \[.*\], grad_sample \[/);
      const got = openSafetensors(out);
      try {
        const expected = (k: string) => ref.readFloat32(c.outputs[k]!.key).data;
        const dx = assertClose(got.readFloat32('xattn').data, expected('xattn'), c.tolerance.taps_atol!, `${c.id} xattn`);
        const ds = assertClose(got.readFloat32('selfattn').data, expected('selfattn'), c.tolerance.taps_atol!, `${c.id} selfattn`);
        const dg = assertClose(got.readFloat32('grad_sample').data, expected('grad_sample'), c.tolerance.atol!, `${c.id} grad_sample`);
        t.diagnostic(`max |diff|: xattn ${dx.toExponential(2)}, selfattn ${ds.toExponential(2)}, grad_sample ${dg.toExponential(2)} (atol ${c.tolerance.atol})`);
      } finally {
        got.close();
      }
    });
  }

  test('rejects missing inputs (naming the tensor) and bad flags', () => {
    let r = chorus('debug', 'vjp', '--model', MODEL, '--inputs', path.join(REF, 'vjp.safetensors'), '--prefix', 'nope.', '--out', path.join(tmp, 'x.safetensors'), '--cache', cache, '--device', 'cpu');
    assert.equal(r.status, 1, r.stderr);
    assert.match(r.stderr, /MISSING_TENSOR.*nope\.sample.*needs nope\.sample, nope\.timestep, nope\.encoder_hidden_states, nope\.cot_x, nope\.cot_s/);
    r = chorus('debug', 'vjp', '--model', MODEL, '--inputs', path.join(REF, 'vjp.safetensors'));
    assert.equal(r.status, 2);
    assert.match(r.stderr, /--out is required/);
  });
});

/** The values of a grayscale PNG's first channel. */
async function grays(file: string): Promise<Set<number>> {
  const { data, info } = await sharp(file).raw().toBuffer({ resolveWithObject: true });
  return new Set(Array.from({ length: info.width * info.height }, (_, p) => data[p * info.channels]!));
}

describe('chorus generate with the gradient-guided strategies', () => {
  test('clora: two concept slots, images and per-step masks', async () => {
    const out = path.join(tmp, 'clora.png');
    const masks = path.join(tmp, 'clora-masks');
    const r = generate(
      '--prompt', 'A cat and a dog', '--negative', 'nsfw', '--steps', '3', '--sampler', 'DDIM', '--cfg', '10', '--strategy', 'clora',
      '--slot', 'A sks dog and a cat:lora_kohya_a:1', '--concept', 'sks dog|dog',
      '--slot', 'A sks cat and a dog:lora_kohya_b_locon:0.8', '--concept', 'sks cat|cat',
      '--clora-refine-rounds', '1', '--clora-mask-threshold', '0.6', '--debug-masks', masks, '--out', out,
    );
    assert.equal(r.status, 0, r.stderr);
    const meta = readImageMetadata(new Uint8Array(fs.readFileSync(out)), out).sources.find((s) => s.kind === 'chorus');
    assert.ok(meta !== undefined && meta.kind === 'chorus');
    const strategy = (meta.job as { job: { strategy: Record<string, unknown> } }).job.strategy;
    assert.deepEqual(strategy, {
      name: 'clora',
      concepts: [
        { words: 'sks dog', otherWords: 'dog', lora: { name: 'lora_kohya_a', te: 1, unet: 1 }, prompt: 'A sks dog and a cat' },
        { words: 'sks cat', otherWords: 'cat', lora: { name: 'lora_kohya_b_locon', te: 0.8, unet: 0.8 }, prompt: 'A sks cat and a dog' },
      ],
      clora: { refineRounds: 1, maskThreshold: 0.6 },
    });
    const files = fs.readdirSync(masks).sort();
    assert.deepEqual(files, [0, 1, 2].flatMap((i) => [0, 1, 2].map((p) => `b0-step00${i}-slot${p}.png`)));
    const { width, height } = await sharp(path.join(masks, files[0]!)).metadata();
    assert.deepEqual([width, height], [64, 64]);
    for (const f of files) for (const v of await grays(path.join(masks, f))) assert.ok(v === 0 || v === 255, `${f}: binary mask`);
  });

  test('clora with --memory 4G: the gradient session runs alone (as on a machine that small), same latents', () => {
    // At 256² (32 × 32 latents) a VJP sample is planned at ≈ 280 MB: on 4 GiB, CLoRA's 6 slot samples
    // do not fit a gradient call beside the forward sessions but do with the gradient session alone.
    const run = (name: string, ...extra: string[]) => {
      const latents = path.join(tmp, `${name}.safetensors`);
      const r = generate(
        '--prompt', 'A cat and a dog', '--negative', 'nsfw', '--steps', '2', '--sampler', 'DDIM', '--cfg', '10', '--strategy', 'clora', '--width', '256', '--height', '256',
        '--slot', 'A sks dog and a cat:lora_kohya_a:1', '--concept', 'sks dog|dog',
        '--slot', 'A sks cat and a dog:lora_kohya_b_locon:0.8', '--concept', 'sks cat|cat',
        '--clora-refine-rounds', '1', '--out', path.join(tmp, `${name}.png`), '--save-latents', latents, ...extra,
      );
      assert.equal(r.status, 0, r.stderr);
      const file = openSafetensors(latents);
      try {
        return { stderr: r.stderr, final: file.readFloat32('final_latents').data };
      } finally {
        file.close();
      }
    };
    const whole = run('clora-256');
    assert.doesNotMatch(whole.stderr, /memory plan/, 'no plan line without --memory');
    const small = run('clora-256-4g', '--memory', '4G');
    assert.match(small.stderr, /memory plan for 4\.0 GiB: \d+ samples per UNet call, 6 per gradient call, 1 UNet session\(s\) at a time \(the gradient session alone\)/);
    assertClose(small.final, whole.final, 1e-3, 'final latents, 4G plan vs the whole machine');
    assert.equal(parseMemorySize('--memory', '16G'), 16 * 2 ** 30);
    assert.equal(parseMemorySize('--memory', '12GiB'), 12 * 2 ** 30);
    assert.equal(parseMemorySize('--memory', '1.5 gb'), 1.5 * 2 ** 30);
    assert.equal(parseMemorySize('--memory', '12000M'), 12000 * 2 ** 20);
    assert.equal(parseMemorySize('--memory', '8589934592'), 8 * 2 ** 30);
    assert.throws(() => parseMemorySize('--memory', '512M'), /at least 1G/);
    const bad = generate('--prompt', 'a cat', '--memory', '12X', '--out', path.join(tmp, 'bad-memory.png'));
    assert.equal(bad.status, 2);
    assert.match(bad.stderr, /--memory must be a memory size of at least 1G, such as 16G, 12GiB or 12000M; got "12X"/);
  });

  test('lora-composer: two concept boxes, images, box masks and refinement attention maps', async () => {
    const out = path.join(tmp, 'composer.png');
    const masks = path.join(tmp, 'composer-masks');
    const r = generate(
      '--prompt', 'a dog and a cat in a garden', '--steps', '3', '--sampler', 'DPM++ 2M', '--schedule', 'Uniform', '--strategy', 'lora-composer',
      '--region', '0,8,30,56:sks dog, sitting on grass:lora_kohya_a:1', '--concept', 'sks dog',
      '--region', '34,0,30,56:ohwx cat, sleeping on a sofa:lora_kohya_b_locon:1', '--concept', 'ohwx cat',
      '--debug-masks', masks, '--out', out,
    );
    assert.equal(r.status, 0, r.stderr);
    const meta = readImageMetadata(new Uint8Array(fs.readFileSync(out)), out).sources.find((s) => s.kind === 'chorus');
    assert.ok(meta !== undefined && meta.kind === 'chorus');
    assert.deepEqual((meta.job as { job: { strategy: unknown } }).job.strategy, { name: 'lora-composer', concepts: [{ words: 'sks dog' }, { words: 'ohwx cat' }] });
    const files = fs.readdirSync(masks).sort();
    assert.ok(files.includes('b0-box0.png') && files.includes('b0-box1.png'), files.join(', '));
    assert.ok(files.some((f) => /^b0-step000-attention1\.png$/.test(f)), files.join(', '));
    assert.deepEqual([...(await grays(path.join(masks, 'b0-box0.png')))].sort((a, b) => a - b), [0, 255]);
  });

  test('bad input: usage errors (exit 2) and typed errors naming the field (exit 1)', () => {
    const bad = path.join(tmp, 'bad.png');
    let r = generate('--prompt', 'a cat', '--strategy', 'clora', '--slot', 'a sks cat:lora_kohya_a:1', '--out', bad);
    assert.equal(r.status, 2);
    assert.match(r.stderr, /give one --concept per --slot \(got 0 --concept, 1 --slot\)/);
    r = generate('--prompt', 'a cat', '--strategy', 'clora', '--out', bad);
    assert.equal(r.status, 1, r.stderr);
    assert.match(r.stderr, /BAD_ARGUMENT.*strategy\.concepts CLoRA needs at least one concept/);
    r = generate('--prompt', 'a cat', '--strategy', 'clora', '--slot', 'a sks cat:lora_kohya_a:1', '--concept', 'sks dog', '--out', bad);
    assert.equal(r.status, 1, r.stderr);
    assert.match(r.stderr, /BAD_PROMPT.*strategy\.concepts\[0\]\.words: "sks dog" does not occur in the prompt "a sks cat"/);
    r = generate('--prompt', 'x', '--strategy', 'lora-composer', '--region', '0,0,32,64:sks dog:lora_kohya_a:1', '--out', bad);
    assert.equal(r.status, 1, r.stderr);
    assert.match(r.stderr, /BAD_ARGUMENT.*strategy\.concepts LoRA-Composer needs the concept words of every region: 1 regions, 0 concepts/);
    r = generate('--prompt', 'x', '--strategy', 'composite', '--concept', 'x', '--lora', 'lora_kohya_a', '--out', bad);
    assert.equal(r.status, 2);
    assert.match(r.stderr, /--concept is for --strategy clora or lora-composer/);
    assert.equal(fs.existsSync(bad), false);
  });
});
