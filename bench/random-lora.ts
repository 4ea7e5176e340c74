/**
 * Random kohya LoRAs at the real SD 1.5 size for benchmarks: rank 32 over the UNet's transformer
 * modules (the sd15-keys listing), seeded; the bench model's text encoder is the tiny one, so no
 * text-encoder modules.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { FIXTURES } from '../test/fixtures.ts';
import { writeSafetensorsStreaming, type StreamedTensor } from './random-weights.ts';
import { SeededRandom } from './seeded-random.ts';

export const RANDOM_LORA_RANK = 32;
/** ΔW scale: up ~ U(±a) with a small so the LoRA changes the output by a few percent, like real ones. */
const UP_AMPLITUDE = 0.01;

interface KohyaModule {
  readonly kohya_name: string;
  readonly 'lora_down.weight': number[];
  readonly 'lora_up.weight': number[];
}

/** A kohya rank-32 LoRA over SD 1.5's UNet transformer modules (sd15-keys listing; the bench model's text encoder is the tiny one). */
export function writeRandomLora(file: string, seed: number): void {
  if (fs.existsSync(file)) return;
  const listing = JSON.parse(fs.readFileSync(path.join(FIXTURES, 'sd15-keys', 'kohya_lora_sd15.json'), 'utf-8')) as { unet_transformer: KohyaModule[]; text_encoder: KohyaModule[] };
  const tensors: StreamedTensor[] = [];
  for (const m of listing.unet_transformer) {
    const rng = new SeededRandom(seed, m.kohya_name);
    const down = m['lora_down.weight'];
    const fanIn = down.slice(1).reduce((a, b) => a * b, 1);
    tensors.push({ name: `${m.kohya_name}.lora_down.weight`, shape: down, fill: (c) => rng.fillUniform(c, Math.sqrt(3 / fanIn)) });
    tensors.push({ name: `${m.kohya_name}.lora_up.weight`, shape: m['lora_up.weight'], fill: (c) => rng.fillUniform(c, UP_AMPLITUDE) });
    tensors.push({ name: `${m.kohya_name}.alpha`, shape: [], fill: (c) => c.fill(RANDOM_LORA_RANK) });
  }
  tensors.sort((a, b) => (a.name < b.name ? -1 : 1));
  writeSafetensorsStreaming(file, tensors, { ss_network_dim: String(RANDOM_LORA_RANK), ss_network_alpha: String(RANDOM_LORA_RANK) });
}

