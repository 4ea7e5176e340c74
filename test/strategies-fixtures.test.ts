/**
 * The composition strategies on the tiny model against the reference runs (tiny-sd15-ref
 * `strategy/*`): Merge, Switch (τ = 1, 2), Composite (2 LoRAs and 1), CMLoRA (c = 0…3, high/high
 * and high/low, the online phase rule, one LoRA), each replayed from the same initial latents with
 * the same scheduler config: the latents after every step and the final latents, within the
 * manifest's tolerances. CMLoRA runs with `official: true` (the fixtures reproduce the official
 * code, quirks included) and its full/shallow plan is checked against the logged one.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { Sd15Engine, openSafetensors } from '../models/index.ts';
import { engineModels, generate, normalizeJob, type SdModels } from '../pipelines/index.ts';
import type { StrategySpec } from '../pipelines/strategies/index.ts';
import { FIXTURES, REF, assertClose, readManifest } from './fixtures.ts';

const MODEL = path.join(FIXTURES, 'tiny-sd15');
const LORAS = path.join(FIXTURES, 'tiny-sd15-lora');
const cacheDir = fs.mkdtempSync(path.join(os.tmpdir(), 'chorus-strategies-'));
const cases = readManifest(path.join(REF, 'manifest.json')).cases.filter((c: { kind: string }) => c.kind === 'strategy');

interface StrategyCase {
  id: string;
  strategy: 'merge' | 'switch' | 'composite' | 'cmlora';
  knobs: { switch_step?: number; cache_interval?: number; phase_rule?: string };
  loras: Array<{ name: string; file: string; multiplier: number; frequency_class?: 'high' | 'low' }>;
  text_encoder_loras: Array<{ name: string; multiplier: number }>;
  prompt: string;
  negative_prompt: string;
  num_inference_steps: number;
  guidance_scale: number;
  width: number;
  height: number;
  scheduler_config: Record<string, unknown>;
  inputs: { latents_init: { key: string } };
  outputs: { step_latents: { key: string }; final_latents: { key: string } };
  tolerance: { step_latents_atol: number; final_latents_atol: number };
  schedule_summary: { full_pass: number[][] };
}

function specOf(c: StrategyCase): StrategySpec {
  switch (c.strategy) {
    case 'merge':
      return { name: 'merge' };
    case 'switch':
      return { name: 'switch', switchEvery: c.knobs.switch_step! };
    case 'composite':
      return { name: 'composite' };
    case 'cmlora':
      return {
        name: 'cmlora',
        cacheInterval: c.knobs.cache_interval!,
        frequencyClasses: c.loras.map((l) => l.frequency_class!),
        phaseRule: c.knobs.phase_rule === 'online_official_nan' ? 'online-official' : 'offline',
        official: true,
      };
  }
}

describe('strategies reproduce the reference runs', () => {
  let engine: Sd15Engine;
  let models: SdModels;
  const ref = openSafetensors(path.join(REF, 'strategies.safetensors'));
  before(() => {
    engine = Sd15Engine.open(MODEL, { device: 'cpu', cacheDir });
    models = engineModels(engine, { loraDirs: [LORAS] });
  });
  after(async () => {
    ref.close();
    await engine.dispose();
  });

  for (const c of cases as StrategyCase[]) {
    test(c.id, async () => {
      const calls: Array<{ batch: number; shallow: boolean; keep: boolean }> = [];
      const recording: SdModels = {
        ...models,
        schedulerConfig: c.scheduler_config,
        denoiser: {
          predict: (request) => {
            calls.push({ batch: request.sample.shape[0]!, shallow: request.deepFeature !== undefined, keep: request.wantDeepFeature === true });
            return models.denoiser.predict(request);
          },
        },
      };
      const teOf = (name: string) => c.text_encoder_loras.find((l) => l.name === name)?.multiplier ?? 0;
      const job = normalizeJob({
        model: MODEL,
        prompt: c.prompt,
        negativePrompt: c.negative_prompt,
        steps: c.num_inference_steps,
        cfgScale: c.guidance_scale,
        sampler: 'DPM++ 2M',
        scheduleType: 'Uniform',
        width: c.width,
        height: c.height,
        seed: 0,
        // Switch encodes the prompt with LoRA 0 only; the fixtures list that as text_encoder_loras.
        loras: c.loras.map((l) => ({ name: path.join(LORAS, l.file), te: c.strategy === 'switch' ? l.multiplier : teOf(l.name), unet: l.multiplier })),
        strategy: specOf(c),
      });
      const init = ref.readFloat32(c.inputs.latents_init.key);
      const stepLatents = ref.readFloat32(c.outputs.step_latents.key).data;
      const per = init.data.length;
      const result = await generate(job, recording, {
        initLatents: init,
        onProgress: (p) => assertClose(p.latents, stepLatents.subarray(p.evaluation * per, (p.evaluation + 1) * per), c.tolerance.step_latents_atol, `${c.id} step ${p.evaluation}`),
      });
      assertClose(result.images[0]!.finalLatents.data, ref.readFloat32(c.outputs.final_latents.key).data, c.tolerance.final_latents_atol, `${c.id} final latents`);

      // Each step ran every branch once; full passes as logged (two branches, the CFG pair, per LoRA).
      const n = c.loras.length;
      const perStep = c.strategy === 'merge' || c.strategy === 'switch' ? 2 : 2 * n;
      assert.equal(calls.reduce((a, x) => a + x.batch, 0), perStep * c.num_inference_steps, `${c.id}: UNet samples evaluated`);
      if (c.strategy === 'cmlora') {
        const shallowSamples = calls.filter((x) => x.shallow).reduce((a, x) => a + x.batch, 0);
        const loggedShallow = c.schedule_summary.full_pass.flat().filter((f) => f === 0).length * 2;
        assert.equal(shallowSamples, loggedShallow, `${c.id}: shallow passes as logged`);
      }
    });
  }
});
