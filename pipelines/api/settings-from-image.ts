/**
 * Generation settings recovered from an image's metadata, as a job the UI can load: Chorus's own
 * `chorus` chunk (the whole job), A1111's `parameters` infotext, or a ComfyUI API graph (`prompt`).
 * What cannot be carried over is listed in `notes`, never dropped silently.
 */
import * as path from 'node:path';
import { readImageMetadata, summarizeComfyGraph, type GenerationSource, type ImageMetadata } from '../images/metadata.ts';
import { parseInfotext } from '../prompt/infotext.ts';
import { resolveSampler } from '../schedulers/index.ts';
import { isPipelineError } from '../errors.ts';
import type { JobPayload, LoadedSettings, LoraPayload, RegionPayload, StrategyPayload } from './contract.ts';
import { jobPayload } from './contract.ts';

/** A1111 writes `RNG: CPU` / `NV`; no field means its GPU default, whose seeds Chorus reproduces as `nv`. */
function rngOf(label: string): 'cpu' | 'nv' {
  return label.toUpperCase() === 'CPU' ? 'cpu' : 'nv';
}

function fromChorus(job: unknown, notes: string[]): { job: JobPayload | null; model: string | null } {
  if (typeof job !== 'object' || job === null) return { job: null, model: null };
  const record = (job as { job?: unknown; model?: { path?: unknown } }).job;
  const modelPath = (job as { model?: { path?: unknown } }).model?.path;
  if (typeof record !== 'object' || record === null) return { job: null, model: null };
  const j = record as Record<string, unknown>;
  const regions = Array.isArray(j.regions) ? (j.regions as Array<Record<string, unknown>>) : [];
  const keptRegions: RegionPayload[] = [];
  for (const r of regions) {
    if (Array.isArray(r.box)) keptRegions.push({ box: r.box as [number, number, number, number], prompt: String(r.prompt ?? ''), ...(r.lora === undefined ? {} : { lora: r.lora as LoraPayload }), ...(typeof r.negativePrompt === 'string' ? { negativePrompt: r.negativePrompt } : {}) });
    else notes.push('a painted-mask region was not restored (the mask file is not inside the image); repaint it.');
  }
  const candidate: Record<string, unknown> = {
    prompt: j.prompt,
    negativePrompt: j.negativePrompt,
    steps: j.steps,
    cfgScale: j.cfgScale,
    sampler: j.sampler,
    scheduleType: j.scheduleType,
    seed: j.seed,
    width: j.width,
    height: j.height,
    clipSkip: j.clipSkip,
    batchSize: j.batchSize,
    batchCount: j.batchCount,
    rng: j.rng,
    emphasis: j.emphasis,
    loras: j.loras,
    loraMode: j.loraMode,
    strategy: j.strategy as StrategyPayload | undefined,
    regions: keptRegions,
  };
  for (const k of Object.keys(candidate)) if (candidate[k] === undefined) delete candidate[k];
  // The chunk is untrusted input like any payload: it goes through the same validator.
  return { job: jobPayload(candidate, 'chorus'), model: typeof modelPath === 'string' ? path.basename(modelPath) : null };
}

function fromA1111(text: string, notes: string[]): { job: JobPayload; model: string | null } {
  const info = parseInfotext(text);
  let sampler = info.sampler;
  let scheduleType = info.scheduleType;
  if (sampler !== undefined) {
    try {
      resolveSampler(sampler, scheduleType);
    } catch (e) {
      if (!isPipelineError(e)) throw e;
      notes.push(`sampler "${sampler}" (${scheduleType}) is not one Chorus implements; the default is kept.`);
      sampler = undefined;
      scheduleType = 'Automatic';
    }
  }
  for (const [k] of info.extra) if (/^(Hires|Denoising strength|ADetailer|ControlNet)/.test(k)) notes.push(`"${k}" is not a Chorus setting and was not carried over.`);
  const job: JobPayload = {
    prompt: info.prompt,
    negativePrompt: info.negativePrompt,
    ...(info.steps === undefined ? {} : { steps: info.steps }),
    ...(info.cfgScale === undefined ? {} : { cfgScale: info.cfgScale }),
    ...(sampler === undefined ? {} : { sampler, scheduleType }),
    ...(info.seed === undefined ? {} : { seed: String(info.seed) }),
    ...(info.width === undefined ? {} : { width: info.width }),
    ...(info.height === undefined ? {} : { height: info.height }),
    ...(info.clipSkip === undefined ? {} : { clipSkip: info.clipSkip }),
    rng: rngOf(info.rng),
  };
  return { job, model: info.model ?? null };
}

function fromComfy(prompt: unknown, notes: string[]): { job: JobPayload | null; model: string | null } {
  if (prompt === undefined) {
    notes.push('the ComfyUI workflow has no API graph (`prompt` chunk); settings cannot be read from the UI layout alone.');
    return { job: null, model: null };
  }
  const g = summarizeComfyGraph(prompt);
  const s = g.samplers[0];
  if (g.samplers.length > 1) notes.push(`the graph has ${g.samplers.length} samplers; the first one's settings were loaded.`);
  if (g.regionNodes.length > 0) notes.push(`${g.regionNodes.length} area/mask conditioning node(s) were not converted to regions; draw them on the region canvas.`);
  let sampler: { sampler: string; scheduleType: string } | undefined;
  if (s?.sampler_name !== undefined) {
    try {
      sampler = resolveSampler(s.sampler_name, s.scheduler).infotext;
    } catch (e) {
      if (!isPipelineError(e)) throw e;
      notes.push(`ComfyUI sampler ${s.sampler_name} / ${s.scheduler ?? 'normal'} is not one Chorus implements; the default is kept.`);
    }
  }
  const loras: LoraPayload[] = g.loras.map((l) => {
    const unet = l.strength_model ?? 1;
    return { name: path.basename(l.lora_name).replace(/\.safetensors$/i, ''), te: l.strength_clip ?? unet, unet };
  });
  const job: JobPayload = {
    prompt: (s?.positive ?? g.positive).join(', '),
    negativePrompt: (s?.negative ?? g.negative).join(', '),
    ...(s?.steps === undefined ? {} : { steps: s.steps }),
    ...(s?.cfg === undefined ? {} : { cfgScale: s.cfg }),
    ...(sampler === undefined ? {} : { sampler: sampler.sampler, scheduleType: sampler.scheduleType }),
    ...(s?.seed === undefined ? {} : { seed: String(s.seed) }),
    ...(g.width === undefined ? {} : { width: g.width }),
    ...(g.height === undefined ? {} : { height: g.height }),
    // ComfyUI draws its noise with torch's CPU generator.
    rng: 'cpu',
    ...(loras.length === 0 ? {} : { loras }),
  };
  return { job, model: g.checkpoints[0] ?? null };
}

/** The order sources are preferred in: our own record is exact; A1111's text is next best. */
const PREFERRED: ReadonlyArray<GenerationSource['kind']> = ['chorus', 'a1111', 'comfyui'];

/**
 * Settings from image bytes (PNG, JPEG, WebP). Throws `PipelineError` BAD_IMAGE / BAD_METADATA for
 * a broken file; an image without generation metadata gives `source: 'none'`.
 */
export function settingsFromImage(bytes: Uint8Array, name = 'image.png'): LoadedSettings {
  return settingsFromMetadata(readImageMetadata(bytes, name), name);
}

/** Settings from metadata already read (see `settingsFromImage`). */
export function settingsFromMetadata(meta: ImageMetadata, name: string): LoadedSettings {
  const notes: string[] = meta.warnings.map((w) => w.message);
  for (const kind of PREFERRED) {
    const src = meta.sources.find((s) => s.kind === kind);
    if (src === undefined) continue;
    const got = src.kind === 'chorus' ? fromChorus(src.job, notes) : src.kind === 'a1111' ? fromA1111(src.text, notes) : src.kind === 'comfyui' ? fromComfy(src.prompt, notes) : { job: null, model: null };
    if (got.job !== null) return { source: kind, job: got.job, model: got.model, notes };
  }
  const other = meta.sources[0];
  if (other !== undefined) notes.push(`${other.kind} metadata is recognised but cannot be loaded as settings yet.`);
  else notes.push(`${path.basename(name)} carries no generation settings.`);
  return { source: other?.kind ?? 'none', job: null, model: null, notes };
}
