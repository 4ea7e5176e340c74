/**
 * Measuring a LoRA's frequency class for CMLoRA (methods.md 2.2 A): render a probe image with the
 * LoRA alone and score its radial high-frequency content. Scores are cached per (model, LoRA file,
 * probe settings) in the cache folder, so a LoRA is measured once.
 *
 * Probe: the job's prompt without LoRA tags, the job's size and sampler, at most 20 steps, seed 0,
 * the LoRA at its own strengths. Classes: see `classifyByScore`.
 */
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { classifyByScore, imageFrequencyScore } from './frequency.ts';
import type { GenerateJob } from './job.ts';
import type { SdModels } from './models.ts';
import { extractExtraNetworks } from './prompt/a1111.ts';
import { generate, type AppliedLora } from './text-to-image.ts';

const PROBE_MAX_STEPS = 20;
const PROBE_SEED = 0n;

function cacheFileOf(models: SdModels): string | undefined {
  return models.cacheDir === undefined ? undefined : path.join(models.cacheDir, 'cmlora-frequency.json');
}

function readCache(file: string | undefined): Record<string, number> {
  if (file === undefined || !fs.existsSync(file)) return {};
  try {
    return JSON.parse(fs.readFileSync(file, 'utf-8')) as Record<string, number>;
  } catch {
    return {}; // A damaged cache is rebuilt.
  }
}

export async function measureFrequencyClasses(job: GenerateJob, models: SdModels, loras: readonly AppliedLora[]): Promise<Array<'high' | 'low'>> {
  const file = cacheFileOf(models);
  const cache = readCache(file);
  const prompt = extractExtraNetworks(job.prompt).prompt;
  const steps = Math.min(job.steps, PROBE_MAX_STEPS);
  const scores: number[] = [];
  for (const lora of loras) {
    const key = createHash('sha256')
      .update(JSON.stringify([job.model, lora.shortHash, lora.path, lora.te, lora.unet, prompt, job.width, job.height, job.sampler, job.scheduleType, steps]))
      .digest('hex');
    let score = cache[key];
    if (score === undefined) {
      const probe: GenerateJob = {
        ...job,
        prompt,
        seed: PROBE_SEED,
        steps,
        batchSize: 1,
        batchCount: 1,
        loras: [{ name: lora.path, te: lora.te, unet: lora.unet }],
        strategy: { name: 'plain' },
      };
      const result = await generate(probe, models);
      score = imageFrequencyScore(result.images[0]!.image);
      cache[key] = score;
    }
    scores.push(score);
  }
  if (file !== undefined) {
    fs.mkdirSync(path.dirname(file), { recursive: true });
    fs.writeFileSync(file, JSON.stringify(cache));
  }
  return classifyByScore(scores);
}
