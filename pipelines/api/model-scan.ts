/**
 * What a folder holds, for the Models screen: point Chorus at an A1111 or ComfyUI install (read
 * only: nothing is written there) or any folder, and list the checkpoints in it with what each one
 * is and whether Chorus can load it. Reads safetensors headers only.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { SafetensorsFile, detectCheckpoint, isModelError, loraFoldersOf } from '../../models/index.ts';
import { ApiFailure, type ModelCandidate, type ModelScan } from './contract.ts';

/** Checkpoint folders of the installs users have, relative to the install root. */
const INSTALL_MODEL_FOLDERS: ReadonlyArray<{ layout: 'a1111' | 'comfyui'; parts: readonly string[] }> = [
  { layout: 'a1111', parts: ['models', 'Stable-diffusion'] },
  { layout: 'comfyui', parts: ['models', 'checkpoints'] },
  { layout: 'comfyui', parts: ['models', 'diffusers'] },
];
const PICKLE_EXTENSIONS = ['.ckpt', '.pt', '.pth', '.bin'];
/** Checkpoint folders are shallow; a deep walk of a home folder would take long and find nothing. */
const MAX_DEPTH = 3;
const MAX_CANDIDATES = 500;

const KIND_NOTES: Readonly<Record<string, string>> = {
  sd1: 'SD 1.x checkpoint',
  sd2: 'SD 2.x checkpoint: Chorus loads SD 1.5 models',
  sdxl: 'SDXL checkpoint: Chorus loads SD 1.5 models',
  'sdxl-refiner': 'SDXL refiner: Chorus loads SD 1.5 models',
  sd3: 'Stable Diffusion 3 checkpoint: Chorus loads SD 1.5 models',
  flux: 'FLUX checkpoint: Chorus loads SD 1.5 models',
  lora: 'a LoRA, not a checkpoint: put it in a LoRA folder',
  'vae-only': 'a VAE alone, not a full checkpoint',
  unknown: 'not a Stable Diffusion checkpoint',
};

function isDiffusersFolder(dir: string): boolean {
  return fs.existsSync(path.join(dir, 'model_index.json'));
}

function describeFile(file: string, sizeBytes: number): ModelCandidate {
  const name = path.basename(file);
  const ext = path.extname(file).toLowerCase();
  if (PICKLE_EXTENSIONS.includes(ext)) {
    return { path: file, name, format: 'pickle', loadable: false, note: `a PyTorch pickle (${ext}): never executed; use the .safetensors version`, sizeBytes };
  }
  let st: SafetensorsFile | undefined;
  try {
    st = SafetensorsFile.open(file);
    const d = detectCheckpoint(st);
    return { path: file, name, format: 'single-file', loadable: d.kind === 'sd1', note: `${KIND_NOTES[d.kind] ?? d.kind} (${d.evidence})`, sizeBytes };
  } catch (e) {
    if (!isModelError(e)) throw e;
    return { path: file, name, format: 'other', loadable: false, note: `${e.code}: ${e.message}`, sizeBytes };
  } finally {
    st?.close();
  }
}

function walk(dir: string, depth: number, out: ModelCandidate[]): void {
  if (out.length >= MAX_CANDIDATES) return;
  if (isDiffusersFolder(dir)) {
    out.push({ path: dir, name: path.basename(dir), format: 'diffusers', loadable: true, note: 'diffusers folder (model_index.json)', sizeBytes: 0 });
    return;
  }
  let entries: fs.Dirent[];
  try {
    entries = fs.readdirSync(dir, { withFileTypes: true });
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (code === 'EACCES' || code === 'EPERM') return;
    throw e;
  }
  for (const entry of entries.sort((a, b) => a.name.localeCompare(b.name))) {
    if (entry.name.startsWith('.')) continue;
    const p = path.join(dir, entry.name);
    if (entry.isDirectory()) {
      if (depth < MAX_DEPTH) walk(p, depth + 1, out);
    } else if (entry.isFile()) {
      const ext = path.extname(entry.name).toLowerCase();
      if (ext === '.safetensors' || PICKLE_EXTENSIONS.includes(ext)) out.push(describeFile(p, fs.statSync(p).size));
    }
  }
}

/**
 * Scan `dir`: an install root (its checkpoint folders), a folder of checkpoints, a diffusers folder
 * or a single file. Throws `ApiFailure` NOT_FOUND when `dir` does not exist.
 */
export function scanModels(dir: string): ModelScan {
  const root = path.resolve(dir);
  let stat: fs.Stats;
  try {
    stat = fs.statSync(root);
  } catch {
    throw new ApiFailure('NOT_FOUND', `${root}: no such file or folder.`, { field: 'dir', path: root });
  }
  const candidates: ModelCandidate[] = [];
  let layout: ModelScan['layout'] = 'folder';
  if (stat.isFile()) {
    candidates.push(describeFile(root, stat.size));
  } else {
    const installFolders = INSTALL_MODEL_FOLDERS.filter((f) => fs.existsSync(path.join(root, ...f.parts)));
    if (installFolders.length > 0) {
      layout = installFolders[0]!.layout;
      for (const f of installFolders) walk(path.join(root, ...f.parts), 0, candidates);
    } else {
      walk(root, 0, candidates);
    }
  }
  const loraFolders = stat.isDirectory() && layout !== 'folder' ? loraFoldersOf(root) : [];
  const loadable = candidates.filter((c) => c.loadable).length;
  const hint =
    loadable > 0
      ? null
      : candidates.length === 0
        ? `No model found in ${root}. Chorus loads a diffusers folder (with model_index.json) or a single-file SD 1.5 .safetensors checkpoint; for an A1111 or ComfyUI install, choose the install folder.`
        : `Nothing in ${root} can be loaded: ${candidates.length} file(s) found, none an SD 1.5 checkpoint (see each note).`;
  return { dir: root, layout, candidates, loraFolders, hint };
}
