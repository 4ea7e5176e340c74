/**
 * The knobs of the gradient-guided strategies (CLoRA, LoRA-Composer): their official step
 * thresholds scaled to a run's step count, and the job-level checks `normalizeJob` runs where the
 * job enters (concepts, their LoRAs and regions, the knobs' ranges; PipelineError naming the field).
 */
import { PipelineError } from '../errors.ts';
import type { GenerateJob } from '../job.ts';
import type { CloraKnobs } from './clora.ts';
import type { ComposerKnobs } from './lora-composer.ts';
import type { StrategySpec } from './index.ts';

/** ⌊x·T/T_official + ½⌋: an official step threshold scaled to a run of T steps (how the fixtures scale them). */
export function scaleStep(x: number, steps: number, officialSteps: number): number {
  return Math.floor((x * steps) / officialSteps + 0.5);
}

const MORPHOLOGY = ['dilate', 'erode', 'opening', 'closing'];
/** Step sizes beyond this are almost certainly typos (the official values are 20). */
const MAX_STEP_SIZE = 1e4;

function fail(field: string, message: string): never {
  throw new PipelineError('BAD_ARGUMENT', `${field} ${message}`, { field });
}

function number(field: string, v: unknown, min: number, max: number, whole = false): void {
  if (v === undefined) return;
  if (typeof v !== 'number' || !Number.isFinite(v) || v < min || v > max || (whole && !Number.isInteger(v))) fail(field, `must be ${whole ? 'a whole number' : 'a number'} from ${min} to ${max}, got ${JSON.stringify(v)}.`);
}

function flag(field: string, v: unknown): void {
  if (v !== undefined && typeof v !== 'boolean') fail(field, `must be true or false, got ${JSON.stringify(v)}.`);
}

function checkClora(k: Partial<CloraKnobs>, steps: number): void {
  const f = (name: string) => `strategy.clora.${name}`;
  number(f('stepSize'), k.stepSize, 0, MAX_STEP_SIZE);
  number(f('updateUntil'), k.updateUntil, 0, steps, true);
  number(f('refineRounds'), k.refineRounds, 0, 1000, true);
  number(f('maskThreshold'), k.maskThreshold, 0, 1);
  number(f('maskAfter'), k.maskAfter, 0, steps, true);
  number(f('temperature'), k.temperature, 1e-3, 100);
  flag(f('latentUpdate'), k.latentUpdate);
  if (k.refineSteps !== undefined && (!Array.isArray(k.refineSteps) || !k.refineSteps.every((i) => Number.isInteger(i) && i >= 0 && i < steps))) fail(f('refineSteps'), `must be step indices from 0 to ${steps - 1}, got ${JSON.stringify(k.refineSteps)}.`);
  if (k.morphology !== undefined && (!Array.isArray(k.morphology) || !k.morphology.every((m) => MORPHOLOGY.includes(m)))) fail(f('morphology'), `must list ${MORPHOLOGY.join(', ')}, got ${JSON.stringify(k.morphology)}.`);
}

function checkComposer(k: Partial<ComposerKnobs>, steps: number): void {
  const f = (name: string) => `strategy.loraComposer.${name}`;
  number(f('stepSize'), k.stepSize, 0, MAX_STEP_SIZE);
  number(f('refineUntil'), k.refineUntil, 0, steps, true);
  number(f('earlyStopFrom'), k.earlyStopFrom, 0, steps, true);
  number(f('topKRatio'), k.topKRatio, 0, 1);
  for (const b of ['isolation', 'reinit', 'fillLoss', 'gaussianBox', 'regionLoss'] as const) flag(f(b), k[b]);
  if (k.weights !== undefined) for (const w of ['box', 'fill', 'region'] as const) number(f(`weights.${w}`), k.weights[w] ?? Number.NaN, 0, 1e4);
}

/** The gradient strategies' requirements on a normalised job (other strategies pass untouched). */
export function checkGradientJob(job: GenerateJob): void {
  const s: StrategySpec = job.strategy;
  if (s.name !== 'clora' && s.name !== 'lora-composer') {
    for (const k of ['concepts', 'clora', 'loraComposer'] as const) if (s[k] !== undefined) fail(`strategy.${k}`, `applies to the clora and lora-composer strategies, not ${s.name}.`);
    return;
  }
  const concepts = s.concepts ?? [];
  concepts.forEach((c, i) => {
    if (typeof c.words !== 'string' || c.words.trim() === '') fail(`strategy.concepts[${i}].words`, 'must name the concept\'s words in its prompt (e.g. "sks dog").');
    for (const k of ['otherWords', 'prompt'] as const) if (c[k] !== undefined && typeof c[k] !== 'string') fail(`strategy.concepts[${i}].${k}`, 'must be text.');
  });
  if (s.name === 'clora') {
    if (s.loraComposer !== undefined) fail('strategy.loraComposer', 'applies to lora-composer, not clora.');
    if (concepts.length === 0) fail('strategy.concepts', 'CLoRA needs at least one concept: words of the prompt bound to a LoRA (CLI: --concept "sks dog" with --slot).');
    concepts.forEach((c, i) => {
      if (c.lora === undefined) fail(`strategy.concepts[${i}].lora`, 'CLoRA binds each concept to a LoRA; name one.');
    });
    if (job.regions.length > 0) fail('regions', 'CLoRA finds its regions from attention maps; boxes are for lora-composer and regions.');
    checkClora(s.clora ?? {}, job.steps);
  } else {
    if (s.clora !== undefined) fail('strategy.clora', 'applies to clora, not lora-composer.');
    if (job.regions.length === 0) fail('regions', 'LoRA-Composer needs regions: a box, a prompt and a concept LoRA each (CLI: --region "x,y,w,h:prompt:lora:weight").');
    if (concepts.length !== job.regions.length) fail('strategy.concepts', `LoRA-Composer needs the concept words of every region: ${job.regions.length} regions, ${concepts.length} concepts (CLI: one --concept per --region).`);
    concepts.forEach((c, i) => {
      if (c.lora !== undefined || c.prompt !== undefined || c.otherWords !== undefined) fail(`strategy.concepts[${i}]`, 'LoRA-Composer takes the LoRA and prompt from region ' + i + '; give only its words.');
    });
    job.regions.forEach((r, i) => {
      if (r.box === undefined) fail(`regions[${i}].box`, 'LoRA-Composer places concepts in boxes; painted masks are for the regions strategy.');
    });
    checkComposer(s.loraComposer ?? {}, job.steps);
  }
}
