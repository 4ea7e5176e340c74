/**
 * Where a run's files go and which LoRA folders an install has: shared by `chorus generate` and the
 * app's handlers, so both name files and find LoRAs the same way.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { loraFoldersOf } from '../../models/index.ts';

/** Output names: a `.png` path names the file (suffixed -k for several), else a folder of `NNNNN-<seed>.png` counting on from the highest number there. */
export function outputNamer(out: string, total: number): (img: { index: number; seed: bigint }) => string {
  if (out.toLowerCase().endsWith('.png')) {
    const stem = out.slice(0, -4);
    return (img) => (total === 1 ? out : `${stem}-${img.index}.png`);
  }
  fs.mkdirSync(out, { recursive: true });
  const used = fs
    .readdirSync(out)
    .map((f) => /^(\d{5,})-/.exec(f)?.[1])
    .filter((s): s is string => s !== undefined)
    .map(Number);
  const first = used.length === 0 ? 0 : Math.max(...used) + 1;
  return (img) => path.join(out, `${String(first + img.index).padStart(5, '0')}-${img.seed}.png`);
}

/** How far up from a checkpoint to look for the install's `models/` folder (`models/Stable-diffusion/sub/x.safetensors`). */
const INSTALL_SEARCH_DEPTH = 4;

/**
 * LoRA folders of the install a checkpoint lives in (A1111 `models/Stable-diffusion/x` → `models/Lora`,
 * ComfyUI `models/checkpoints/x` → `models/loras`), then `CHORUS_LORA_DIRS` (path-delimiter separated).
 */
export function installLoraFolders(model: string): string[] {
  const dirs: string[] = [];
  let dir = path.dirname(path.resolve(model));
  for (let i = 0; i < INSTALL_SEARCH_DEPTH; i++) {
    if (path.basename(dir) === 'models') {
      dirs.push(...loraFoldersOf(path.dirname(dir)));
      break;
    }
    dir = path.dirname(dir);
  }
  const env = process.env.CHORUS_LORA_DIRS;
  if (env !== undefined && env !== '') dirs.push(...env.split(path.delimiter).filter((d) => d !== ''));
  return dirs;
}
