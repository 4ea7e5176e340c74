/**
 * The metadata a generated image carries: A1111's `parameters` infotext (so A1111, Civitai and every
 * tool that reads it shows the settings) and a `chorus` JSON chunk with the whole job, so "reuse
 * settings" and `chorus inspect` can restore it exactly.
 */
import * as path from 'node:path';
import type { OpenedModel } from '../../models/index.ts';
import type { GenerateJob } from '../job.ts';
import { formatInfotext } from '../prompt/infotext.ts';
import { resolveSampler } from '../schedulers/index.ts';
import type { GeneratedImage, RunInfo } from '../text-to-image.ts';
import { A1111_CHUNK, CHORUS_CHUNK } from './save.ts';

/** Version of the `chorus` JSON chunk layout. */
export const CHORUS_METADATA_VERSION = 1;

export interface ChorusImageMetadata {
  readonly chorus: number;
  /** The job as given (seed = the run's first seed, as a decimal string). */
  readonly job: Omit<GenerateJob, 'seed'> & { seed: string };
  readonly image: { readonly index: number; readonly seed: string };
  readonly model: { readonly path: string; readonly format: string };
  readonly loras: ReadonlyArray<{ readonly name: string; readonly path: string; readonly shortHash: string; readonly te: number; readonly unet: number }>;
  readonly loraMode: RunInfo['loraMode'];
}

/** The RNG label A1111 writes (`RNG: CPU`; NV is A1111's "NV" option). */
const RNG_LABEL = { cpu: 'CPU', nv: 'NV' } as const;

export function chorusMetadata(job: GenerateJob, img: GeneratedImage, model: Pick<OpenedModel, 'path' | 'format'>, run: RunInfo): ChorusImageMetadata {
  return {
    chorus: CHORUS_METADATA_VERSION,
    job: { ...job, seed: job.seed.toString() },
    image: { index: img.index, seed: img.seed.toString() },
    model: { path: model.path, format: model.format },
    loras: run.loras.map(({ name, path, shortHash, te, unet }) => ({ name, path, shortHash, te, unet })),
    loraMode: run.loraMode,
  };
}

export function imageInfotext(job: GenerateJob, img: GeneratedImage, model: Pick<OpenedModel, 'path'>, run: RunInfo): string {
  const sampler = resolveSampler(job.sampler, job.scheduleType).infotext;
  // Write the schedule type as chosen, as A1111 does ("Automatic" stays "Automatic"), unless it came
  // from an old combined sampler name ("DPM++ 2M Karras" → DPM++ 2M + Karras).
  const scheduleType = job.scheduleType === 'Automatic' && sampler.sampler.toLowerCase() === job.sampler.trim().toLowerCase() ? 'Automatic' : sampler.scheduleType;
  const seed = img.seed <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(img.seed) : img.seed;
  return formatInfotext({
    prompt: job.prompt,
    negativePrompt: job.negativePrompt,
    steps: job.steps,
    sampler: sampler.sampler,
    scheduleType,
    cfgScale: job.cfgScale,
    seed,
    width: job.width,
    height: job.height,
    model: path.basename(model.path).replace(/\.safetensors$/i, ''),
    clipSkip: job.clipSkip,
    rng: RNG_LABEL[job.rng],
    ...(run.loras.length === 0 ? {} : { loraHashes: run.loras.map((l) => ({ name: l.name, hash: l.shortHash })) }),
    version: 'chorus',
  });
}

/** The PNG text chunks for one image. */
export function imageMetadataTexts(job: GenerateJob, img: GeneratedImage, model: Pick<OpenedModel, 'path' | 'format'>, run: RunInfo): Array<{ keyword: string; text: string }> {
  return [
    { keyword: A1111_CHUNK, text: imageInfotext(job, img, model, run) },
    { keyword: CHORUS_CHUNK, text: JSON.stringify(chorusMetadata(job, img, model, run)) },
  ];
}
