/**
 * CLoRA on the tiny model against the reference run `clora/seed53_256x256`
 * (tiny-sd15-ref/gradient_methods.*: the official `pipeline_clora.py` loop, notebook settings scaled
 * to 10 DDIM steps, two kohya LoRAs). Checked stage by stage with teacher forcing, as the fixture's
 * README asks: the plan (token positions from the tokenizer, per-slot text encodings); each of the
 * 17 updates fed its stored latents (maps, loss, ∂L/∂z through the VJP graph, latents after); each
 * step fed its stored forward input (per-slot noise predictions, maps, masks exactly) and its stored
 * scheduler input (fused ε, DDIM step); then the free-running loop through `generate`: the update
 * schedule and losses of the log and the final latents.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { Sd15Engine, openSafetensors } from '../models/index.ts';
import { engineModels, generate, normalizeJob, type GenerateJob, type SdModels } from '../pipelines/index.ts';
import { latentTools } from '../pipelines/denoise.ts';
import { DEFAULT_COMMA_BACKTRACK } from '../pipelines/conditioning.ts';
import { exclusivePasses, loadJobLoras } from '../pipelines/text-to-image.ts';
import { createScheduler, parseSchedulerConfig, type Scheduler } from '../pipelines/schedulers/index.ts';
import { cloraBranches, cloraDefaults, cloraEntries, cloraLoss, cloraMasks, planClora, slotMaps, type CloraEvent, type CloraPlan } from '../pipelines/strategies/clora.ts';
import { maskedMean } from '../pipelines/strategies/gradient-masks.ts';
import { guide } from '../pipelines/strategies/setup.ts';
import type { AdapterStack } from '../models/index.ts';
import { FIXTURES, REF, assertClose, readManifest } from './fixtures.ts';

const MODEL = path.join(FIXTURES, 'tiny-sd15');
const LORAS = path.join(FIXTURES, 'tiny-sd15-lora');
const cacheDir = fs.mkdtempSync(path.join(os.tmpdir(), 'chorus-clora-'));
const manifest = readManifest(path.join(REF, 'gradient_methods_manifest.json'));
const c = manifest.cases.find((x: { id: string }) => x.id === 'clora/seed53_256x256');
const log = JSON.parse(fs.readFileSync(path.join(REF, 'gradient_methods_log.json'), 'utf-8'))['clora/seed53_256x256'];
const tol = c.tolerance;

/** The fixture run as a job: slot 1 = lora_kohya_a ("sks dog"), slot 2 = lora_kohya_b_locon ("sks cat"). */
function fixtureJob(): GenerateJob {
  const slot = (s: number) => c.slots[s] as { prompt: string; lora: string };
  return normalizeJob({
    model: MODEL,
    prompt: slot(0).prompt,
    negativePrompt: c.slots[0].negative_prompt,
    steps: c.knobs.num_inference_steps,
    cfgScale: c.knobs.guidance_scale,
    sampler: 'DDIM',
    width: c.width,
    height: c.height,
    seed: c.seed,
    strategy: {
      name: 'clora',
      concepts: [
        { words: 'sks dog', otherWords: 'dog', prompt: slot(1).prompt, lora: { name: path.join(LORAS, slot(1).lora), te: 1, unet: 1 } },
        { words: 'sks cat', otherWords: 'cat', prompt: slot(2).prompt, lora: { name: path.join(LORAS, slot(2).lora), te: 1, unet: 1 } },
      ],
      clora: { maskThreshold: c.knobs.mask_threshold_alpha, refineRounds: c.knobs.iterative_steps_steps },
    },
  });
}

describe('CLoRA reproduces the reference run (clora/seed53_256x256)', () => {
  let engine: Sd15Engine;
  let models: SdModels;
  let stack: AdapterStack;
  let plan: CloraPlan;
  const ref = openSafetensors(path.join(REF, 'gradient_methods.safetensors'));
  const read = (k: string) => ref.readFloat32(c.outputs[k].key);
  const timesteps = Array.from(ref.readFloat32(c.inputs.timesteps.key).data);
  const job = fixtureJob();
  const [lh, lw] = c.latent_hw as [number, number];
  const shape: [number, number, number, number] = [1, 4, lh, lw];
  const per = 4 * lh * lw;
  /** The tools at evaluation i: DDIM's model input is the latents themselves. */
  const toolsAt = (i: number) => {
    const scheduler = { timesteps, scaleModelInput: (x: Float32Array) => Float32Array.from(x) } as unknown as Scheduler;
    return latentTools({ scheduler, denoiser: models.denoiser, shape, adapters: { stack, mode: 'bank' } }, i);
  };
  const seqs = () => [77, 77, 77];

  before(async () => {
    engine = Sd15Engine.open(MODEL, { device: 'cpu', cacheDir });
    models = engineModels(engine, { loraDirs: [LORAS] });
    const concepts = job.strategy.concepts!;
    const loaded = await loadJobLoras([], models, concepts.map((k) => k.lora));
    stack = loaded.stack;
    plan = await planClora(
      {
        prompt: job.prompt,
        negativePrompt: job.negativePrompt,
        steps: job.steps,
        concepts: concepts.map((k, i) => ({ prompt: k.prompt!, words: k.words, otherWords: k.otherWords!, ...loaded.regionStrengths[i]! })),
        global: { te: stack.strengths('text_encoder'), unet: stack.strengths('unet') },
      },
      models.textEncoder,
      { clipSkip: 1, emphasis: 'original', commaPaddingBacktrack: DEFAULT_COMMA_BACKTRACK },
      stack,
      { mapGrid: c.attn_res, latentGrid: c.latent_hw },
    );
  });
  after(async () => {
    ref.close();
    await engine.dispose();
    fs.rmSync(cacheDir, { recursive: true, force: true });
  });

  test('plan: token groups and masks from the tokenizer, slots encoded with their LoRAs', (t) => {
    // The manifest lists the groups cat, dog; the job's concepts are dog (slot 1), cat (slot 2).
    const [cat, dog] = c.important_token_indices;
    assert.deepEqual(plan.groups, [dog, cat]);
    assert.deepEqual(plan.maskTokens, c.mask_indices);
    const embeds = ref.readFloat32(c.inputs.prompt_embeds.key).data; // (P, 2, 77, 32)
    const n = 77 * 32;
    let worst = 0;
    plan.slots.forEach((s, p) => {
      worst = Math.max(worst, assertClose(s.negative[0]!.embedding.data, embeds.subarray((2 * p) * n, (2 * p + 1) * n), 1e-5, `slot ${p} negative`));
      worst = Math.max(worst, assertClose(s.positive[0]!.embedding.data, embeds.subarray((2 * p + 1) * n, (2 * p + 2) * n), 1e-5, `slot ${p} positive`));
    });
    assert.deepEqual(plan.slots.map((s) => s.mix), [[0, 0], [1, 0], [0, 1]]);
    t.diagnostic(`text encodings max |diff| ${worst.toExponential(2)}`);
  });

  test('the 17 updates, teacher-forced: maps, loss, ∂L/∂z and the latents after', async (t) => {
    const steps = ref.read(c.outputs['update.step_index'].key).data as BigInt64Array;
    const before = read('update.latents_before').data;
    const maps = read('update.attn_maps').data;
    const losses = read('update.loss').data;
    const grads = read('update.grad').data;
    const after = read('update.latents_after').data;
    const worst = { maps: 0, loss: 0, grad: 0, after: 0 };
    const mapSize = 3 * 64 * 77;
    for (let u = 0; u < steps.length; u++) {
      const i = Number(steps[u]);
      const tools = toolsAt(i);
      const z = before.slice(u * per, (u + 1) * per);
      const branches = cloraBranches(plan, i);
      const perSlot = slotMaps(await tools.maps(branches, z));
      worst.maps = Math.max(worst.maps, assertClose(Float32Array.from(perSlot.flatMap((m) => [...m])), maps.subarray(u * mapSize, (u + 1) * mapSize), tol.per_update.attn_maps_atol, `update ${u} maps`));
      const loss = cloraLoss(plan, perSlot, 1, seqs(), c.knobs.temperature);
      worst.loss = Math.max(worst.loss, assertClose(loss.loss, [losses[u]!], tol.per_update.loss_atol, `update ${u} loss`));
      const { grad } = await tools.vjp(branches, z, loss.cotangents);
      worst.grad = Math.max(worst.grad, assertClose(grad, grads.subarray(u * per, (u + 1) * per), tol.per_update.grad_atol, `update ${u} ∂L/∂z`));
      const next = Float32Array.from(z, (v, k) => Math.fround(v - Math.fround(c.knobs.step_size * grad[k]!)));
      worst.after = Math.max(worst.after, assertClose(next, after.subarray(u * per, (u + 1) * per), tol.per_update.latents_after_atol, `update ${u} latents after`));
    }
    t.diagnostic(`max |diff|: maps ${worst.maps.toExponential(2)}, loss ${worst.loss.toExponential(2)}, grad ${worst.grad.toExponential(2)} (abs max 0.015), latents after ${worst.after.toExponential(2)}`);
  });

  test('one gradient graph (the exclusive mode): a discarded round asks to skip ε and gets the default path\'s gradient; the last round gets ε', async (t) => {
    const steps = ref.read(c.outputs['update.step_index'].key).data as BigInt64Array;
    const before = read('update.latents_before').data;
    const grads = read('update.grad').data;
    const losses = read('update.loss').data;
    const asked: Array<{ noisePred?: boolean; skipNoisePred?: boolean }> = [];
    const returned: boolean[] = [];
    const d = models.denoiser;
    const denoiser = {
      ...d,
      ntXentVjp: async (r: never, l: { noisePred?: boolean; skipNoisePred?: boolean }) => {
        asked.push({ noisePred: l.noisePred, skipNoisePred: l.skipNoisePred });
        const out = await d.ntXentVjp!(r, l as never);
        returned.push(out.noisePred !== undefined);
        return out;
      },
    };
    const u = 0;
    const i = Number(steps[u]);
    const z = before.slice(u * per, (u + 1) * per);
    const branches = cloraBranches(plan, i);
    const scheduler = { timesteps, scaleModelInput: (x: Float32Array) => Float32Array.from(x) } as unknown as Scheduler;
    const tools = (oneGradientGraph: boolean) => latentTools({ scheduler, denoiser, shape, adapters: { stack, mode: 'bank' }, oneGradientGraph }, i);
    const byDefault = await tools(false).ntXentVjp!(branches, z, cloraEntries(plan), c.knobs.temperature);
    const skipped = await tools(true).ntXentVjp!(branches, z, cloraEntries(plan), c.knobs.temperature);
    const last = await tools(true).ntXentVjp!(branches, z, cloraEntries(plan), c.knobs.temperature, { outputs: true });
    assert.deepEqual(asked, [{ noisePred: undefined, skipNoisePred: undefined }, { noisePred: true, skipNoisePred: true }, { noisePred: true, skipNoisePred: undefined }]);
    assert.deepEqual(returned, [false, false, true], 'ε only from the round that asked for it');
    // The same nodes up to the maps and the same backward (on the CPU the default path runs the same
    // session, ε skipped too): the same gradient and loss.
    const dg = assertClose(skipped!.grad, byDefault!.grad, 1e-6, 'skipped-tail ∂L/∂z vs default');
    assertClose(last!.grad, byDefault!.grad, 1e-6, 'whole-UNet ∂L/∂z vs default');
    assertClose(skipped!.loss, byDefault!.loss, 1e-6, 'loss');
    assertClose(skipped!.grad, grads.subarray(u * per, (u + 1) * per), tol.per_update.grad_atol, 'reference ∂L/∂z');
    assertClose(skipped!.loss, [losses[u]!], tol.per_update.loss_atol, 'reference loss');
    // The last round's ε are the forward's at the same latents.
    const forward = await toolsAt(i).run(branches, z);
    const de = assertClose(Float32Array.from(last!.outputs!.flatMap((o) => [...o.eps])), Float32Array.from(forward.flatMap((o) => [...o.eps])), 1e-5, 'one-pass ε vs forward ε');
    t.diagnostic(`max |diff|: ∂L/∂z skipped vs default ${dg.toExponential(2)}, ε one pass vs forward ${de.toExponential(2)}`);
  });

  test('the 10 steps, teacher-forced: slot predictions, maps, masks (exact), fused ε, DDIM step', async (t) => {
    const fwd = read('step.latents_fwd').data;
    const schedIn = read('step.latents_sched_in').data;
    const slots = read('step.noise_pred_slots').data;
    const maps = read('step.attn_maps').data;
    const gridMasks = read('step.masks_grid').data;
    const fused = read('step.noise_pred').data;
    const out = read('step.latents_out').data;
    const scheduler = createScheduler('ddim', parseSchedulerConfig(models.schedulerConfig, 'scheduler'), job.steps);
    assert.deepEqual(scheduler.timesteps, timesteps);
    const worst = { slots: 0, maps: 0, eps: 0, out: 0, onePass: 0, onePassMaps: 0 };
    let onePassSteps = 0;
    for (let i = 0; i < job.steps; i++) {
      const z = fwd.slice(i * per, (i + 1) * per);
      const outputs = await toolsAt(i).run(cloraBranches(plan, i), z);
      worst.slots = Math.max(worst.slots, assertClose(Float32Array.from(outputs.flatMap((o) => [...o.eps])), slots.subarray(i * 6 * per, (i + 1) * 6 * per), tol.per_step.noise_pred_slots_atol, `step ${i} slot predictions`));
      if (i < c.knobs.max_iter_to_alter) {
        // An update step's last round: ε and maps from the one pass (whole UNet + NT-Xent + VJP).
        const one = await toolsAt(i).ntXentVjp!(cloraBranches(plan, i), z, cloraEntries(plan), c.knobs.temperature, { outputs: true });
        assert.ok(one?.outputs !== undefined, `step ${i}: the one pass returned the branch outputs`);
        worst.onePass = Math.max(worst.onePass, assertClose(Float32Array.from(one.outputs.flatMap((o) => [...o.eps])), slots.subarray(i * 6 * per, (i + 1) * 6 * per), tol.per_step.noise_pred_slots_atol, `step ${i} one-pass slot predictions`));
        const onePassMaps = slotMaps(one.outputs.map((o) => o.maps!));
        worst.onePassMaps = Math.max(worst.onePassMaps, assertClose(Float32Array.from(onePassMaps.flatMap((m) => [...m])), maps.subarray(i * 3 * 64 * 77, (i + 1) * 3 * 64 * 77), tol.per_step.attn_maps_atol, `step ${i} one-pass maps`));
        onePassSteps++;
      }
      const perSlot = slotMaps(outputs.map((o) => o.maps!));
      worst.maps = Math.max(worst.maps, assertClose(Float32Array.from(perSlot.flatMap((m) => [...m])), maps.subarray(i * 3 * 64 * 77, (i + 1) * 3 * 64 * 77), tol.per_step.attn_maps_atol, `step ${i} maps`));
      const { gridMasks: ours, masks } = cloraMasks(plan, perSlot, 1, seqs(), { maskThreshold: c.knobs.mask_threshold_alpha, morphology: [] });
      assert.deepEqual(ours.map((m) => [...m]), [0, 1, 2].map((p) => [...gridMasks.subarray((i * 3 + p) * 64, (i * 3 + p + 1) * 64)]), `step ${i} masks`);
      const eps = guide(maskedMean(outputs.filter((_, k) => k % 2 === 0).map((o) => o.eps), masks), maskedMean(outputs.filter((_, k) => k % 2 === 1).map((o) => o.eps), masks), job.cfgScale);
      worst.eps = Math.max(worst.eps, assertClose(eps, fused.subarray(i * per, (i + 1) * per), tol.per_step.noise_pred_atol, `step ${i} fused ε`));
      const next = scheduler.step(eps, i, schedIn.slice(i * per, (i + 1) * per));
      worst.out = Math.max(worst.out, assertClose(next, out.subarray(i * per, (i + 1) * per), tol.per_step.latents_out_atol, `step ${i} DDIM output`));
    }
    assert.ok(onePassSteps > 0, 'the reference run has update steps');
    t.diagnostic(`max |diff|: slot predictions ${worst.slots.toExponential(2)} (one pass ${worst.onePass.toExponential(2)}), maps ${worst.maps.toExponential(2)} (one pass ${worst.onePassMaps.toExponential(2)}), fused ε ${worst.eps.toExponential(2)}, latents out ${worst.out.toExponential(2)}`);
  });

  test('the exclusive mode on the CPU: after a gradient pass, the forward-only steps run through the gradient session (backward skipped) and match the reference', async (t) => {
    const fwd = read('step.latents_fwd').data;
    const slots = read('step.noise_pred_slots').data;
    const maps = read('step.attn_maps').data;
    const calls: string[] = [];
    const d = models.denoiser;
    const spied = {
      ...d,
      predict: async (r: Parameters<typeof d.predict>[0]) => (calls.push('forward session'), d.predict(r)),
      ntXentForward: async (r: Parameters<NonNullable<typeof d.ntXentForward>>[0], l: { temperature: number }) => (calls.push(`through gradient ${l.temperature}`), d.ntXentForward!(r, l)),
      releaseForwardPasses: async () => (calls.push('release forward'), d.releaseForwardPasses!()),
      releaseGradientPasses: async () => (calls.push('release gradient'), d.releaseGradientPasses!()),
    };
    const ex = exclusivePasses(spied);
    const scheduler = { timesteps, scaleModelInput: (x: Float32Array) => Float32Array.from(x) } as unknown as Scheduler;
    const exTools = (i: number) => latentTools({ scheduler, denoiser: ex, shape, adapters: { stack, mode: 'bank' }, oneGradientGraph: true }, i);
    try {
      await exTools(0).ntXentVjp!(cloraBranches(plan, 0), fwd.slice(0, per), cloraEntries(plan), c.knobs.temperature, { outputs: true });
      const worst = { slots: 0, maps: 0 };
      let forwardSteps = 0;
      for (let i = c.knobs.max_iter_to_alter; i < job.steps; i++) {
        const outputs = await exTools(i).run(cloraBranches(plan, i), fwd.slice(i * per, (i + 1) * per));
        worst.slots = Math.max(worst.slots, assertClose(Float32Array.from(outputs.flatMap((o) => [...o.eps])), slots.subarray(i * 6 * per, (i + 1) * 6 * per), tol.per_step.noise_pred_slots_atol, `step ${i} slot predictions`));
        const perSlot = slotMaps(outputs.map((o) => o.maps!));
        worst.maps = Math.max(worst.maps, assertClose(Float32Array.from(perSlot.flatMap((m) => [...m])), maps.subarray(i * 3 * 64 * 77, (i + 1) * 3 * 64 * 77), tol.per_step.attn_maps_atol, `step ${i} maps`));
        forwardSteps++;
      }
      assert.ok(forwardSteps > 0, 'the reference run has forward-only steps');
      assert.deepEqual(calls, ['release forward', ...Array<string>(forwardSteps).fill(`through gradient ${c.knobs.temperature}`)], 'no session released or rebuilt after the gradient pass');
      assert.equal(ex.holdsGradientSession(), true);
      t.diagnostic(`${forwardSteps} forward-only steps through the gradient session, max |diff|: slot predictions ${worst.slots.toExponential(2)}, maps ${worst.maps.toExponential(2)}`);
    } finally {
      d.expectRebuilds!(false);
    }
  });

  test('free-running through generate: the logged update schedule and losses, the final latents; every update in one pass', async (t) => {
    const events: CloraEvent[] = [];
    let onePass = 0;
    let withNoisePred = 0;
    let mapsOnly = 0;
    let predicts = 0;
    let vjps = 0;
    const d = models.denoiser;
    const counted = {
      ...models,
      denoiser: {
        ...d,
        predict: (r: never) => (predicts++, d.predict(r)),
        vjp: (r: never, cot: never) => (vjps++, d.vjp!(r, cot)),
        ntXentVjp: (r: never, l: { noisePred?: boolean }) => (onePass++, l.noisePred === true && withNoisePred++, d.ntXentVjp!(r, l as never)),
        maps: (r: never) => (mapsOnly++, d.maps!(r)),
      },
    };
    const result = await generate(job, counted, { initLatents: ref.readFloat32(c.inputs.latents_init.key), onStrategyEvent: (e) => events.push(e as (typeof events)[number]) });
    // Every update is one pass (UNet, NT-Xent and VJP in one graph); the last of each update step runs
    // the whole UNet and its ε are the step's, so update steps make no other UNet call.
    const perStep = new Map<number, number>();
    for (const e of events) if (e.kind === 'update') perStep.set(e.evaluation, (perStep.get(e.evaluation) ?? 0) + 1);
    const updateCount = [...perStep.values()].reduce((n, u) => n + u, 0);
    assert.ok(updateCount > perStep.size, 'the reference run has refinement rounds');
    assert.equal(onePass, updateCount, 'one pass per update');
    assert.equal(withNoisePred, perStep.size, 'the last round of each update step also gives ε');
    assert.equal(predicts, job.steps - perStep.size, 'full passes only at steps without updates');
    assert.equal(mapsOnly + vjps, 0, 'no maps-only or separate VJP pass');
    const updates = events.filter((e): e is Extract<CloraEvent, { kind: 'update' }> => e.kind === 'update');
    const logged: Array<{ i: number; updates: number; losses: number[] }> = log.steps;
    assert.deepEqual(logged.map((s) => updates.filter((u) => u.evaluation === s.i).length), logged.map((s) => s.updates), 'updates per step');
    assert.deepEqual(updates.map((u) => u.round), logged.flatMap((s) => s.losses.map((_, r) => r)), 'rounds');
    const dl = assertClose(updates.map((u) => u.loss[0]!), logged.flatMap((s) => s.losses), tol.per_update.loss_atol, 'free-running losses');
    assert.equal(events.filter((e) => e.kind === 'masks').length, job.steps);
    const df = assertClose(result.images[0]!.finalLatents.data, read('final_latents').data, tol.end_to_end.final_latents_atol, 'final latents');
    t.diagnostic(`max |diff|: losses ${dl.toExponential(2)}, final latents ${df.toExponential(2)} (atol ${tol.end_to_end.final_latents_atol}; fp32 vs fp64 ${c.fp32_vs_fp64.free_running.final_latents.max_abs.toExponential(2)})`);
  });

  test('exclusive mode through generate (a 4 GiB memory plan), two images: the gradient session serves every pass, is never rebuilt between images, and is released when the job ends', async (t) => {
    const calls: string[] = [];
    const d = models.denoiser;
    const spied = {
      ...models,
      denoiser: {
        ...d,
        predict: (r: never) => (calls.push('forward session'), d.predict(r)),
        maps: (r: never) => (calls.push('maps session'), d.maps!(r)),
        ntXentVjp: (r: never, l: never) => (calls.push('gradient'), d.ntXentVjp!(r, l)),
        ntXentForward: (r: never, l: never) => (calls.push('forward through gradient'), d.ntXentForward!(r, l)),
        releaseForwardPasses: async () => (calls.push('release forward'), d.releaseForwardPasses!()),
        releaseGradientPasses: async () => (calls.push('release gradient'), d.releaseGradientPasses!()),
      },
    };
    const finished: number[] = [];
    const result = await generate({ ...job, batchCount: 2 }, spied, { memoryBytes: 4 * 1024 ** 3, initLatents: ref.readFloat32(c.inputs.latents_init.key), onImage: () => void finished.push(calls.length) });
    const [first, last] = finished as [number, number];
    const kinds = (from: number, to: number) => new Set(calls.slice(from, to));
    assert.equal(calls[0], 'release forward', 'the first pass is a gradient pass, alone');
    assert.deepEqual(kinds(1, first), new Set(['gradient', 'forward through gradient']), 'image 1: every pass through the one gradient session');
    assert.deepEqual(kinds(first, last), new Set(['gradient', 'forward through gradient']), 'image 2: the same session, nothing released or rebuilt');
    assert.deepEqual(calls.slice(last), ['release gradient'], 'released once, when the job ends');
    const df = assertClose(result.images[0]!.finalLatents.data, read('final_latents').data, tol.end_to_end.final_latents_atol, 'final latents');
    const second = result.images[1]!.finalLatents.data;
    assert.ok(second.every(Number.isFinite) && second.some((v, i) => Math.abs(v - result.images[0]!.finalLatents.data[i]!) > 1e-3), 'the second image (its own seed) is another image');
    t.diagnostic(`final latents max |diff| ${df.toExponential(2)} (atol ${tol.end_to_end.final_latents_atol})`);
  });

  test('the default knobs are the notebook\'s, thresholds scaled as the fixture scales them', () => {
    assert.deepEqual(cloraDefaults(100), { stepSize: 20, updateUntil: 50, refineSteps: [0, 10, 20], refineRounds: 20, maskThreshold: 0.4, maskAfter: 0, temperature: 0.5, morphology: [], latentUpdate: true });
    const scaled = cloraDefaults(c.knobs.num_inference_steps);
    assert.equal(scaled.updateUntil, c.knobs.max_iter_to_alter);
    assert.deepEqual(scaled.refineSteps, c.knobs.iterative_steps);
  });
});
