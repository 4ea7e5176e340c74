/**
 * End to end on the tiny model against the reference pipeline runs: prompt embeddings, the latents
 * after every step, the final latents and the decoded image for DDIM, Euler and DPM++ 2M (given
 * initial latents), and the seeded runs (Euler a with per-step noise, DPM++ 2M Karras) where the
 * whole run is driven by a torch CPU seed.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { Sd15Engine, openSafetensors } from '../models/index.ts';
import { engineModels, type SdModels } from '../pipelines/models.ts';
import { generate } from '../pipelines/text-to-image.ts';
import { normalizeJob } from '../pipelines/job.ts';
import { encodePrompts, DEFAULT_CONDITIONING } from '../pipelines/conditioning.ts';
import { FIXTURES, REF, assertClose, readManifest } from './fixtures.ts';

const MODEL = path.join(FIXTURES, 'tiny-sd15');
const cacheDir = fs.mkdtempSync(path.join(os.tmpdir(), 'chorus-t2i-'));
const manifest = readManifest(path.join(REF, 'manifest.json'));
const cases = (kind: string) => manifest.cases.filter((c: { kind: string }) => c.kind === kind);
/** The diffusers scheduler class each reference run used → the A1111 name that selects it. */
const SAMPLER_OF: Record<string, { sampler: string; scheduleType?: string }> = {
  DDIMScheduler: { sampler: 'DDIM' },
  EulerDiscreteScheduler: { sampler: 'Euler' },
  DPMSolverMultistepScheduler: { sampler: 'DPM++ 2M', scheduleType: 'Uniform' },
};

describe('text to image matches the reference pipeline', () => {
  let engine: Sd15Engine;
  let models: SdModels;
  before(() => {
    engine = Sd15Engine.open(MODEL, { device: 'cpu', cacheDir });
    models = engineModels(engine);
  });
  after(async () => engine.dispose());

  for (const c of cases('pipeline')) {
    test(`${c.id}: embeddings, every step, final latents, image`, async () => {
      const ref = openSafetensors(path.join(REF, c.file));
      const get = (name: string) => ref.readFloat32(c.outputs[name].key).data;
      const init = ref.readFloat32(c.inputs.latents_init.key);
      const { sampler, scheduleType } = SAMPLER_OF[c.scheduler]!;
      const job = normalizeJob({
        model: MODEL,
        prompt: c.prompt,
        negativePrompt: c.negative_prompt,
        steps: c.num_inference_steps,
        cfgScale: c.guidance_scale,
        sampler,
        ...(scheduleType === undefined ? {} : { scheduleType }),
        seed: 0,
        width: c.width,
        height: c.height,
      });

      const cond = await encodePrompts(job.prompt, job.negativePrompt, job.steps, models.textEncoder, DEFAULT_CONDITIONING);
      assertClose(cond.positive[0]!.schedule[0]!.embedding.data, get('prompt_embeds'), 3e-4, 'prompt_embeds');
      assertClose(cond.negative[0]!.embedding.data, get('negative_prompt_embeds'), 3e-4, 'negative_prompt_embeds');

      const stepLatents = get('step_latents');
      const per = init.data.length;
      const seen: number[] = [];
      const result = await generate(job, models, {
        initLatents: init,
        onProgress: (p) => {
          assertClose(p.latents, stepLatents.subarray(p.evaluation * per, (p.evaluation + 1) * per), c.tolerance.final_latents_atol, `step ${p.evaluation} latents`);
          seen.push(p.evaluation);
        },
      });
      assert.deepEqual(seen, [...Array(c.num_inference_steps).keys()]);
      const [img] = result.images;
      assertClose(img!.finalLatents.data, get('final_latents'), c.tolerance.final_latents_atol, 'final_latents');
      // image01_nhwc (1, H, W, 3) vs our (1, 3, H, W)
      const nhwc = get('image01_nhwc');
      const [, , H, W] = img!.image.shape as number[];
      const nchw = new Float32Array(nhwc.length);
      for (let y = 0; y < H!; y++) for (let x = 0; x < W!; x++) for (let ch = 0; ch < 3; ch++) nchw[ch * H! * W! + y * W! + x] = nhwc[(y * W! + x) * 3 + ch]!;
      assertClose(img!.image.data, nchw, c.tolerance.image01_atol, 'image01');
      ref.close();
    });
  }

  for (const c of cases('pipeline_seeded')) {
    test(`${c.id}: the whole run from seed ${c.seed} (${c.a1111_sampler}${c.a1111_schedule_type ? ', ' + c.a1111_schedule_type : ''})`, async () => {
      const ref = openSafetensors(path.join(REF, c.file));
      const job = normalizeJob({
        model: MODEL,
        prompt: c.prompt,
        negativePrompt: c.negative_prompt,
        steps: c.num_inference_steps,
        cfgScale: c.guidance_scale,
        sampler: c.a1111_sampler,
        ...(c.a1111_schedule_type ? { scheduleType: c.a1111_schedule_type } : {}),
        seed: c.seed,
        width: c.width,
        height: c.height,
      });
      const result = await generate(job, models);
      assertClose(result.images[0]!.finalLatents.data, ref.readFloat32(c.outputs.final_latents.key).data, c.tolerance.atol, 'final_latents');
      ref.close();
    });
  }

  test('a prompt over 75 tokens (and BREAK) reaches the UNet as 77·k tokens, clip skip 2 included', async () => {
    const seen: number[][] = [];
    const recording: SdModels = {
      ...models,
      denoiser: {
        predict: (request) => {
          seen.push([...request.context.shape]);
          return models.denoiser.predict(request);
        },
      },
    };
    const long = `${Array.from({ length: 90 }, () => 'cat').join(' ')} BREAK (red:1.2) sky`;
    const job = normalizeJob({ model: MODEL, prompt: long, negativePrompt: '', steps: 2, sampler: 'Euler', seed: 3, width: 64, height: 64, clipSkip: 2 });
    const result = await generate(job, recording);
    // cond: 90 tokens → 2 chunks, BREAK → a third; uncond: 1 chunk. Different lengths: separate calls.
    assert.deepEqual(seen.slice(0, 2).sort(), [[1, 77, 32], [1, 231, 32]].sort());
    assert.ok(result.images[0]!.finalLatents.data.every(Number.isFinite));
  });
});
