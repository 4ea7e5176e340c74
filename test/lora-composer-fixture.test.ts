/**
 * LoRA-Composer on the tiny model against the reference run `lora_composer/seed1174_256x256`
 * (tiny-sd15-ref/gradient_methods.*: the official `multi_lora_sample.py` loop with generic kohya
 * LoRAs, 10 DPM-Solver++(2M) steps). Teacher-forced stage by stage, as the fixture's README asks:
 * the plan (concept tokens, region encodings, boxes); the re-initialisation fed the initial latents;
 * each of the 4 updates fed its stored latents (region and self-attention maps through the regions
 * UNet with concept injection and isolation, loss terms, ∂L/∂z through the regions VJP, latents
 * after); each step's CFG pass fed its stored scheduler input (batch output, guided ε, the
 * DPM-Solver++(2M) step); then the free-running loop through `generate`: the logged schedule
 * (refinement steps, early stop, step sizes) and the final latents.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { Sd15Engine, openSafetensors, type AdapterStack } from '../models/index.ts';
import { engineModels, generate, normalizeJob, type GenerateJob, type SdModels } from '../pipelines/index.ts';
import { latentTools } from '../pipelines/denoise.ts';
import { DEFAULT_COMMA_BACKTRACK, encodePrompts, type PromptConditioning } from '../pipelines/conditioning.ts';
import { loadJobLoras } from '../pipelines/text-to-image.ts';
import { createScheduler, parseSchedulerConfig, resolveSampler, type Scheduler } from '../pipelines/schedulers/index.ts';
import { COMPOSER_LOSS_WEIGHTS, regionLoss, reinitLatents } from '../pipelines/strategies/gradient-region-losses.ts';
import { composerBranch, composerDefaults, composerStepSize, planComposer, type ComposerEvent, type ComposerPlan } from '../pipelines/strategies/lora-composer.ts';
import { guide } from '../pipelines/strategies/setup.ts';
import { FIXTURES, REF, assertClose, readManifest } from './fixtures.ts';

const MODEL = path.join(FIXTURES, 'tiny-sd15');
const LORAS = path.join(FIXTURES, 'tiny-sd15-lora');
const cacheDir = fs.mkdtempSync(path.join(os.tmpdir(), 'chorus-lora-composer-'));
const manifest = readManifest(path.join(REF, 'gradient_methods_manifest.json'));
const c = manifest.cases.find((x: { id: string }) => x.id === 'lora_composer/seed1174_256x256');
const log = JSON.parse(fs.readFileSync(path.join(REF, 'gradient_methods_log.json'), 'utf-8'))['lora_composer/seed1174_256x256'];
const tol = c.tolerance;
const OPTIONS = { clipSkip: 1, emphasis: 'original' as const, commaPaddingBacktrack: DEFAULT_COMMA_BACKTRACK };

/** The fixture run as a job: boxes [top, left, bottom, right] px → [x, y, width, height]. */
function fixtureJob(): GenerateJob {
  return normalizeJob({
    model: MODEL,
    prompt: c.prompt,
    negativePrompt: c.negative_prompt,
    steps: c.knobs.num_inference_steps,
    cfgScale: c.knobs.guidance_scale,
    sampler: 'DPM++ 2M',
    scheduleType: 'Uniform',
    width: c.width,
    height: c.height,
    seed: c.seed,
    regions: c.regions.map((r: { box_px_top_left_bottom_right: number[]; prompt: string; negative_prompt: string; lora: string }) => {
      const [top, left, bottom, right] = r.box_px_top_left_bottom_right as [number, number, number, number];
      return { box: [left, top, right - left, bottom - top], prompt: r.prompt, negativePrompt: r.negative_prompt, lora: { name: path.join(LORAS, r.lora), te: 1, unet: 1 } };
    }),
    strategy: { name: 'lora-composer', concepts: c.regions.map((r: { concept_words: string[] }) => ({ words: r.concept_words.join(' ') })) },
  });
}

describe('LoRA-Composer reproduces the reference run (lora_composer/seed1174_256x256)', () => {
  let engine: Sd15Engine;
  let models: SdModels;
  let stack: AdapterStack;
  let plan: ComposerPlan;
  let conditioning: PromptConditioning;
  const ref = openSafetensors(path.join(REF, 'gradient_methods.safetensors'));
  const read = (k: string) => ref.readFloat32(c.outputs[k].key);
  const timesteps = Array.from(ref.readFloat32(c.inputs.timesteps.key).data);
  const job = fixtureJob();
  const [lh, lw] = c.latent_hw as [number, number];
  const shape: [number, number, number, number] = [1, 4, lh, lw];
  const per = 4 * lh * lw;
  const R = c.regions.length as number;
  const Q = c.Q as number;
  const toolsAt = (i: number) => {
    const scheduler = { timesteps, scaleModelInput: (x: Float32Array) => Float32Array.from(x) } as unknown as Scheduler;
    return latentTools({ scheduler, denoiser: models.denoiser, shape, adapters: { stack, mode: 'bank' } }, i);
  };
  const cond = (i: number) => [composerBranch(plan, conditioning, i, 'positive', { isolation: true, maps: true })];
  const boxes = () => plan.regions.map((r) => r.box);
  const tokens = () => plan.regions.map((r) => r.tokens);
  const seq = 77;

  before(async () => {
    engine = Sd15Engine.open(MODEL, { device: 'cpu', cacheDir });
    models = engineModels(engine, { loraDirs: [LORAS] });
    const loaded = await loadJobLoras([], models, job.regions.map((r) => r.lora));
    stack = loaded.stack;
    const global = { te: stack.strengths('text_encoder'), unet: stack.strengths('unet') };
    conditioning = await encodePrompts(job.prompt, job.negativePrompt, job.steps, models.textEncoder, OPTIONS, { mode: 'bank', stack, mix: [global.te] });
    plan = await planComposer(
      { width: job.width, height: job.height, steps: job.steps, negativePrompt: job.negativePrompt, regions: job.regions.map((region, r) => ({ region, words: job.strategy.concepts![r]!.words, ...loaded.regionStrengths[r]! })), global },
      models.textEncoder,
      OPTIONS,
      stack,
      { vaeScale: models.vaeScale, unetLevels: models.unetLevels },
    );
  });
  after(async () => {
    ref.close();
    await engine.dispose();
    fs.rmSync(cacheDir, { recursive: true, force: true });
  });

  test('plan: concept tokens, boxes on every grid, prompts encoded with base and concept encoders', (t) => {
    assert.deepEqual(tokens(), c.regions.map((r: { token_idx: number[] }) => r.token_idx.map((j) => j + 1)));
    const grids = ['32x32', '16x16', '8x8', '4x4'];
    grids.forEach((g, l) => assertClose(plan.masks[l]!.data, ref.readFloat32(c.inputs[`box_masks.${g}`].key).data, 0, `box masks ${g}`));
    assert.deepEqual(boxes().map((b) => [b.top, b.left, b.bottom, b.right]), c.regions.map((r: { box_at_grid: Record<string, number[]> }) => r.box_at_grid['8x8']));
    const n = 77 * 32;
    const global = ref.readFloat32(c.inputs.prompt_embeds.key).data;
    let worst = assertClose(conditioning.negative[0]!.embedding.data, global.subarray(0, n), 1e-5, 'global negative');
    worst = Math.max(worst, assertClose(conditioning.positive[0]!.schedule[0]!.embedding.data, global.subarray(n, 2 * n), 1e-5, 'global positive'));
    const regional = ref.readFloat32(c.inputs.region_embeds.key).data;
    plan.regions.forEach((r, k) => {
      worst = Math.max(worst, assertClose(r.negative[0]!.embedding.data, regional.subarray(2 * k * n, (2 * k + 1) * n), 1e-5, `region ${k} negative`));
      worst = Math.max(worst, assertClose(r.positive[0]!.embedding.data, regional.subarray((2 * k + 1) * n, (2 * k + 2) * n), 1e-5, `region ${k} positive`));
    });
    assert.deepEqual(Array.from(plan.adapters!.slotMix.data), [1, 0, 0, 1]);
    t.diagnostic(`text encodings max |diff| ${worst.toExponential(2)}`);
  });

  test('re-initialisation, teacher-forced: region maps, windows (exact), latents', async (t) => {
    const z = ref.readFloat32(c.inputs.latents_init.key).data;
    const [maps] = await toolsAt(0).maps(cond(0), z);
    const dm = assertClose(maps!.xattnRegion!, read('reinit.attn_maps').data, tol.reinit.attn_maps_atol, 're-init region maps');
    const region = (r: number) => maps!.xattnRegion!.subarray(r * Q * seq, (r + 1) * Q * seq);
    const out = reinitLatents(z, shape, [0, 1].map(region), seq, plan.mapGrid, boxes(), tokens());
    assert.deepEqual(out.windows.map((w) => [...w.at]), c.reinit.map((x: { best_window_top_left_grid: number[] }) => x.best_window_top_left_grid));
    const dl = assertClose(out.latents, read('reinit.latents').data, tol.reinit.latents_atol, 're-init latents');
    t.diagnostic(`max |diff|: region maps ${dm.toExponential(2)}, latents ${dl.toExponential(2)}`);
  });

  test('the 4 updates, teacher-forced: maps with isolation, loss terms, ∂L/∂z, latents after', async (t) => {
    const steps = ref.read(c.outputs['update.step_index'].key).data as BigInt64Array;
    const before = read('update.latents_before').data;
    const regionMaps = read('update.region_maps').data;
    const self = read('update.self_attn').data;
    const terms = read('update.loss_terms').data;
    const losses = read('update.loss').data;
    const grads = read('update.grad').data;
    const lrs = read('update.lr').data;
    const after = read('update.latents_after').data;
    const names: string[] = c.loss_term_names;
    const worst = { region: 0, self: 0, terms: 0, loss: 0, grad: 0, after: 0 };
    for (let u = 0; u < steps.length; u++) {
      const i = Number(steps[u]);
      const tools = toolsAt(i);
      const z = before.slice(u * per, (u + 1) * per);
      const [maps] = await tools.maps(cond(i), z);
      worst.region = Math.max(worst.region, assertClose(maps!.xattnRegion!, regionMaps.subarray(u * R * Q * seq, (u + 1) * R * Q * seq), tol.per_update.region_maps_atol, `update ${u} region maps`));
      worst.self = Math.max(worst.self, assertClose(maps!.selfattn, self.subarray(u * Q * Q, (u + 1) * Q * Q), tol.per_update.self_attn_atol, `update ${u} self-attention`));
      const loss = regionLoss(
        { regionMaps: [0, 1].map((r) => maps!.xattnRegion!.subarray(r * Q * seq, (r + 1) * Q * seq)), seq, selfMap: maps!.selfattn, grid: plan.mapGrid, boxes: boxes(), tokens: tokens() },
        { weights: COMPOSER_LOSS_WEIGHTS, topKRatio: c.knobs.top_k_ratio, gaussianBox: true, fill: true, region: true },
      );
      worst.terms = Math.max(worst.terms, assertClose(loss.terms.map((x) => x.value), terms.subarray(u * names.length, (u + 1) * names.length), tol.per_update.loss_terms_atol, `update ${u} loss terms`));
      worst.loss = Math.max(worst.loss, assertClose([loss.loss], [losses[u]!], tol.per_update.loss_atol, `update ${u} loss`));
      const dRegion = new Float32Array(R * Q * seq);
      loss.dRegionMaps.forEach((d, r) => dRegion.set(d, r * Q * seq));
      const { grad } = await tools.vjp(cond(i), z, [{ xattnRegion: dRegion, selfattn: Float32Array.from(loss.dSelfMap) }]);
      worst.grad = Math.max(worst.grad, assertClose(grad, grads.subarray(u * per, (u + 1) * per), tol.per_update.grad_atol, `update ${u} ∂L/∂z`));
      const lr = composerStepSize(20, i, job.steps);
      assertClose([lr], [lrs[u]!], 1e-5, `update ${u} step size`);
      const next = Float32Array.from(z, (v, k) => Math.fround(v - Math.fround(Math.fround(lr) * grad[k]!)));
      worst.after = Math.max(worst.after, assertClose(next, after.subarray(u * per, (u + 1) * per), tol.per_update.latents_after_atol, `update ${u} latents after`));
    }
    t.diagnostic(
      `max |diff|: region maps ${worst.region.toExponential(2)}, self ${worst.self.toExponential(2)}, terms ${worst.terms.toExponential(2)}, loss ${worst.loss.toExponential(2)}, grad ${worst.grad.toExponential(2)} (abs max 0.055), latents after ${worst.after.toExponential(2)}`,
    );
  });

  test('the 10 CFG passes, teacher-forced: batch output, guided ε, DPM-Solver++(2M) step', async (t) => {
    const schedIn = read('step.latents_sched_in').data;
    const batch = read('step.noise_pred_cfg_batch').data;
    const guided = read('step.noise_pred').data;
    const out = read('step.latents_out').data;
    const choice = resolveSampler(job.sampler, job.scheduleType);
    const scheduler = createScheduler(choice.kind, parseSchedulerConfig(models.schedulerConfig, 'scheduler'), job.steps, choice.options);
    assert.deepEqual(scheduler.timesteps, timesteps);
    const worst = { batch: 0, eps: 0, out: 0 };
    for (let i = 0; i < job.steps; i++) {
      const z = schedIn.slice(i * per, (i + 1) * per);
      const [u, cnd] = await toolsAt(i).run([composerBranch(plan, conditioning, i, 'negative', { isolation: true, maps: false }), composerBranch(plan, conditioning, i, 'positive', { isolation: true, maps: false })], z);
      worst.batch = Math.max(worst.batch, assertClose(Float32Array.from([...u!.eps, ...cnd!.eps]), batch.subarray(i * 2 * per, (i + 1) * 2 * per), tol.per_step.noise_pred_cfg_batch_atol, `step ${i} CFG batch`));
      const eps = guide(u!.eps, cnd!.eps, job.cfgScale);
      worst.eps = Math.max(worst.eps, assertClose(eps, guided.subarray(i * per, (i + 1) * per), tol.per_step.noise_pred_atol, `step ${i} ε`));
      worst.out = Math.max(worst.out, assertClose(scheduler.step(eps, i, z), out.subarray(i * per, (i + 1) * per), tol.per_step.latents_out_atol, `step ${i} latents out`));
    }
    t.diagnostic(`max |diff|: CFG batch ${worst.batch.toExponential(2)}, ε ${worst.eps.toExponential(2)}, latents out ${worst.out.toExponential(2)}`);
  });

  test('free-running through generate: re-init windows, refinement schedule and early stop as logged, final latents', async (t) => {
    const events: ComposerEvent[] = [];
    const result = await generate(job, models, { initLatents: ref.readFloat32(c.inputs.latents_init.key), onStrategyEvent: (e) => events.push(e as (typeof events)[number]) });
    const reinit = events.find((e) => e.kind === 'reinit');
    assert.deepEqual(reinit?.windows.map((w) => [...w.at]), c.reinit.map((x: { best_window_top_left_grid: number[] }) => x.best_window_top_left_grid));
    const updates = events.filter((e): e is Extract<ComposerEvent, { kind: 'update' }> => e.kind === 'update');
    const logged: Array<{ i: number; refined: boolean; loss?: number; lr?: number; refine_flag_after: boolean }> = log.steps;
    assert.deepEqual(updates.map((u) => u.evaluation), logged.filter((s) => s.refined).map((s) => s.i), 'refined steps');
    assert.deepEqual(updates.map((u) => u.refining), logged.filter((s) => s.refined).map((s) => s.refine_flag_after), 'refinement flag after each step (early stop)');
    assertClose(updates.map((u) => u.lr), logged.filter((s) => s.refined).map((s) => s.lr!), 1e-9, 'step sizes');
    const dl = assertClose(updates.map((u) => u.loss), logged.filter((s) => s.refined).map((s) => s.loss!), tol.per_update.loss_atol, 'free-running losses');
    const df = assertClose(result.images[0]!.finalLatents.data, read('final_latents').data, tol.end_to_end.final_latents_atol, 'final latents');
    t.diagnostic(`max |diff|: losses ${dl.toExponential(2)}, final latents ${df.toExponential(2)} (atol ${tol.end_to_end.final_latents_atol}; fp32 vs fp64 ${c.fp32_vs_fp64.free_running.final_latents.max_abs.toExponential(2)})`);
  });

  test('the default knobs are the official ones, thresholds scaled as the fixture scales them', () => {
    const d = composerDefaults(50);
    assert.deepEqual([d.stepSize, d.refineUntil, d.earlyStopFrom, d.topKRatio], [20, 25, 5, 0.2]);
    assert.deepEqual(d.weights, { box: 8, fill: 2, region: 10 });
    const scaled = composerDefaults(c.knobs.num_inference_steps);
    assert.deepEqual([scaled.refineUntil, scaled.earlyStopFrom], [c.knobs.refine_stop_at, c.knobs.early_stop_min_step]);
    // φ_i = 20·√(linspace(1, 0.5, 50)[i]): 20 … 14.14.
    assert.equal(composerStepSize(20, 0, 50), 20);
    assert.ok(Math.abs(composerStepSize(20, 49, 50) - 20 * Math.sqrt(0.5)) < 1e-12);
  });
});
