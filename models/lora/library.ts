/**
 * The LoRA library: find every LoRA under the user's folders and describe it from its header and sidecar files,
 * without loading any weights.
 *
 * Layouts, names and sidecars follow what users already have on disk (CONVENTIONS.md 2.8, 2.9):
 * - folders: A1111 `models/Lora` (+ legacy `models/LyCORIS`), ComfyUI `models/loras`, scanned recursively;
 *   hidden folders are skipped, as A1111's `walk_files` does; symlinked folders are followed once.
 * - name = file stem, alias = `ss_output_name` (A1111 `networks.py list_available_networks`, `network.py`).
 * - `<stem>.json` A1111 user metadata, `<stem>.civitai.info` (Civitai Helper: the Civitai model-version JSON),
 *   previews and descriptions in A1111's lookup order (`modules/ui_extra_networks.py find_preview/find_description`).
 *
 * One bad file never stops a scan: it becomes an entry whose `problems` say what is wrong (a truncated or
 * garbage `.safetensors`, a pickle `.pt`/`.ckpt`, an unreadable or malformed sidecar). Only folder-level
 * failures throw (see `scanLoraFolders`).
 */
import * as fs from 'node:fs';
import * as fsp from 'node:fs/promises';
import * as path from 'node:path';
import { ModelError, isModelError } from '../errors.ts';
import { SafetensorsFile } from '../safetensors.ts';
import {
  baseModelOfA1111SdVersion,
  baseModelOfCivitaiLabel,
  detectBaseModelFromKeys,
  detectBaseModelFromMetadata,
  type BaseModelVerdict,
  type LoraBaseModel,
} from './library-base-model.ts';
import { A1111_SHORT_HASH_HEX, LoraHashCache, sha256FromOffset } from './library-hash.ts';

export { addnetShortHash } from './library-hash.ts';
export { detectBaseModelFromKeys, detectBaseModelFromMetadata, type LoraBaseModel } from './library-base-model.ts';

export interface LoraCivitaiInfo {
  modelName?: string;
  versionName?: string;
  /** Civitai's label, e.g. `SD 1.5`, `SDXL 1.0`. */
  baseModel?: string;
  trainedWords: string[];
}

export interface LoraLibraryEntry {
  /** Absolute path as found under the root (symlinks not resolved). */
  readonly path: string;
  /** File stem: A1111's LoRA name, the NAME in `<lora:NAME:…>`. */
  readonly name: string;
  /** `ss_output_name`, A1111's alias (also accepted as NAME). */
  readonly alias: string | undefined;
  /** Folder under the root, `/`-separated; `''` at the top. */
  readonly relativeDir: string;
  /** The scanned root this file was found under (absolute). */
  readonly root: string;
  readonly sizeBytes: number;
  /** The safetensors `__metadata__` (large values kept, `ssmd_cover_images` dropped); `{}` for unreadable or pickle files. */
  readonly metadata: Readonly<Record<string, string>>;
  readonly baseModel: LoraBaseModel;
  readonly baseModelEvidence: string;
  /** `modelspec.trigger_phrase` / `ss_trigger_words`, then Civitai `trainedWords`, then the top `ss_tag_frequency` tags; deduplicated. */
  readonly triggerWords: readonly string[];
  /** A1111 user metadata `activation text`. */
  readonly activationText: string | undefined;
  /** A1111 user metadata `preferred weight` (A1111 writes 0 for "unset": read as undefined). */
  readonly preferredWeight: number | undefined;
  /** `<stem>.json` `notes` or `description`, else `<stem>.txt`, else `<stem>.description.txt`. */
  readonly notes: string | undefined;
  /** Absolute path of the preview image, in A1111's order (`<stem>.png` first). */
  readonly preview: string | undefined;
  /** From `<stem>.civitai.info`; undefined when absent or empty (`{}`: Civitai Helper found no match). */
  readonly civitai: LoraCivitaiInfo | undefined;
  /** A1111 short hash (12 hex of the sha256 after the header): only with `hashes: true` or a valid cache entry. */
  readonly shortHash: string | undefined;
  /** What could not be read, one sentence each, naming the file. Empty for a healthy entry. */
  readonly problems: readonly string[];
}

export interface ScanOptions {
  /** Compute short hashes (reads every `.safetensors` file whole). Cached ones are used without this too. */
  readonly hashes?: boolean;
  /** JSON file caching hashes keyed by real path, size and mtime; created or updated when new hashes are computed. */
  readonly cache?: string;
}

const SAFETENSORS_EXTENSION = '.safetensors';
/** A1111 lists these too (`allowed_extensions`); Chorus describes them but never unpickles them. */
const PICKLE_EXTENSIONS = ['.pt', '.ckpt'];
/** `modules/ui_extra_networks.py`: `default_allowed_preview_extensions`, each tried as `<stem>.ext` then `<stem>.preview.ext`. */
const PREVIEW_EXTENSIONS = ['png', 'jpg', 'jpeg', 'webp', 'gif'];
/** Metadata A1111 drops from the LoRA card: base64 images, often megabytes. */
const DROPPED_METADATA_KEYS = ['ssmd_cover_images'];
/** How many of the most frequent training tags count as trigger words ("a handful"). */
const TRIGGER_TAGS_FROM_FREQUENCY = 5;
/** Key prefixes of full SD checkpoints (LDM layout): such a file is in the LoRA folder by mistake. */
const CHECKPOINT_KEY_PREFIXES = ['model.diffusion_model.', 'first_stage_model.', 'cond_stage_model.', 'conditioner.embedders.'];

/** Where an install keeps LoRAs, relative to its root: A1111/Forge, A1111 legacy LyCORIS, ComfyUI. */
const INSTALL_LORA_FOLDERS = [
  ['models', 'Lora'],
  ['models', 'LyCORIS'],
  ['models', 'loras'],
];

/**
 * The LoRA folders of an install: A1111 (`models/Lora`, `models/LyCORIS`), ComfyUI (`models/loras`), or, when
 * none of those exist, `installRoot` itself as a plain folder. Existing folders only (a missing `installRoot`
 * gives `[]`), absolute, and one path per real folder (a `LyCORIS` symlinked to `Lora` is listed once).
 */
export function loraFoldersOf(installRoot: string): string[] {
  const root = path.resolve(installRoot);
  const found: string[] = [];
  const seen = new Set<string>();
  for (const parts of INSTALL_LORA_FOLDERS) {
    const folder = path.join(root, ...parts);
    const real = realDirectory(folder);
    if (real !== undefined && !seen.has(real)) {
      seen.add(real);
      found.push(folder);
    }
  }
  if (found.length > 0) return found;
  return realDirectory(root) !== undefined ? [root] : [];
}

/** Real path of a directory, undefined when it does not exist or is not a directory. */
function realDirectory(folder: string): string | undefined {
  try {
    return fs.statSync(folder).isDirectory() ? fs.realpathSync(folder) : undefined;
  } catch (e) {
    if (isMissing(e)) return undefined;
    throw e;
  }
}

/**
 * Scan `roots` recursively and describe every `.safetensors`, `.pt` and `.ckpt` file, sorted by relativeDir then
 * name. Reads headers and sidecars only, plus whole files for hashes when `options.hashes` is set.
 * A file found under two overlapping roots is listed once, under the first.
 * Throws `ModelError` MODEL_NOT_FOUND when a root does not exist or is not a folder, or a folder cannot be
 * listed (permissions): a silently missing part of the library would look like missing LoRAs.
 */
export async function scanLoraFolders(roots: readonly string[], options: ScanOptions = {}): Promise<LoraLibraryEntry[]> {
  const cache = options.cache !== undefined ? await LoraHashCache.load(options.cache) : undefined;
  const entries: LoraLibraryEntry[] = [];
  const rootOrder = new Map<string, number>();
  const seenPaths = new Set<string>();
  for (const rootArg of roots) {
    const root = path.resolve(rootArg);
    if (!rootOrder.has(root)) rootOrder.set(root, rootOrder.size);
    for (const found of await walkLoraFolder(root)) {
      if (seenPaths.has(found.path)) continue;
      seenPaths.add(found.path);
      entries.push(await describeLoraFile(found, cache, options.hashes === true));
    }
  }
  await cache?.save();
  return entries.sort(
    (a, b) =>
      compareNames(a.relativeDir, b.relativeDir) ||
      compareNames(a.name, b.name) ||
      (rootOrder.get(a.root) ?? 0) - (rootOrder.get(b.root) ?? 0) ||
      compareNames(a.path, b.path),
  );
}

/** Case-insensitive first (what users expect in a list), then exact, so the order is total and stable across runs. */
function compareNames(a: string, b: string): number {
  const la = a.toLowerCase();
  const lb = b.toLowerCase();
  if (la !== lb) return la < lb ? -1 : 1;
  return a < b ? -1 : a > b ? 1 : 0;
}

/**
 * Find an entry the way A1111 resolves `<lora:NAME:…>`: by path (absolute, or relative to the working folder),
 * then by stem, then by alias (`ss_output_name`). Exact, case-sensitive matches. A stem match wins over another
 * file's alias. Returns undefined when nothing matches.
 * Throws `ModelError` AMBIGUOUS_LORA_NAME when several files share that stem (or, with no stem match, that
 * alias), listing them: A1111 would silently take the last one found.
 */
export function resolveLoraName(entries: readonly LoraLibraryEntry[], nameOrPath: string): LoraLibraryEntry | undefined {
  const asPath = path.resolve(nameOrPath);
  const byPath = entries.find((e) => e.path === asPath);
  if (byPath !== undefined) return byPath;
  for (const [field, matches] of [
    ['file name', entries.filter((e) => e.name === nameOrPath)],
    ['alias (ss_output_name)', entries.filter((e) => e.alias === nameOrPath)],
  ] as const) {
    if (matches.length === 1) return matches[0];
    if (matches.length > 1) {
      const candidates = matches.map((e) => e.path);
      throw new ModelError(
        'AMBIGUOUS_LORA_NAME',
        `\`${nameOrPath}\` is the ${field} of ${matches.length} LoRA files: ${candidates.join(', ')}. A LoRA is named by its file name, so names must be unique: rename or remove all but one, or give the file's path.`,
        { name: nameOrPath, candidates },
      );
    }
  }
  return undefined;
}

interface FoundFile {
  readonly path: string;
  readonly root: string;
  readonly dir: string;
  readonly relativeDir: string;
  readonly fileName: string;
  /** Names of the non-folder entries beside it: sidecar lookups need no extra stat calls. */
  readonly siblings: ReadonlySet<string>;
}

function loraExtension(fileName: string): string | undefined {
  const ext = path.extname(fileName).toLowerCase();
  return ext === SAFETENSORS_EXTENSION || PICKLE_EXTENSIONS.includes(ext) ? ext : undefined;
}

async function walkLoraFolder(root: string): Promise<FoundFile[]> {
  const rootStat = await fsp.stat(root).catch((e: unknown) => {
    if (isMissing(e)) throw new ModelError('MODEL_NOT_FOUND', `LoRA folder ${root} does not exist. Check the path, or use an install's folders (models/Lora, models/loras).`, { file: root });
    throw folderError(root, e);
  });
  if (!rootStat.isDirectory()) {
    throw new ModelError('MODEL_NOT_FOUND', `${root} is not a folder; LoRA libraries are folders (e.g. models/Lora).`, { file: root });
  }
  const found: FoundFile[] = [];
  const visited = new Set<string>();
  const pending = [root];
  while (pending.length > 0) {
    const dir = pending.pop()!;
    const real = await fsp.realpath(dir).catch((e: unknown) => {
      throw folderError(dir, e);
    });
    if (visited.has(real)) continue; // a symlink loop, or a folder linked twice: listed once
    visited.add(real);
    let dirents: fs.Dirent[];
    try {
      dirents = await fsp.readdir(dir, { withFileTypes: true });
    } catch (e) {
      throw folderError(dir, e);
    }
    const files: string[] = [];
    for (const d of dirents) {
      const full = path.join(dir, d.name);
      let kind: 'dir' | 'file' | 'other' = d.isDirectory() ? 'dir' : d.isFile() ? 'file' : 'other';
      if (d.isSymbolicLink()) {
        const target = await fsp.stat(full).catch((e: unknown) => {
          if (isMissing(e)) return undefined; // broken link: a LoRA name still becomes an entry with a problem
          throw folderError(full, e);
        });
        kind = target === undefined || target.isFile() ? 'file' : target.isDirectory() ? 'dir' : 'other';
      }
      if (kind === 'dir' && !d.name.startsWith('.')) pending.push(full);
      if (kind === 'file') files.push(d.name);
    }
    const siblings = new Set(files);
    const relativeDir = path.relative(root, dir).split(path.sep).join('/');
    for (const fileName of files) {
      if (loraExtension(fileName) !== undefined) {
        found.push({ path: path.join(dir, fileName), root, dir, relativeDir, fileName, siblings });
      }
    }
  }
  return found;
}

function folderError(folder: string, e: unknown): ModelError {
  const code = (e as NodeJS.ErrnoException).code ?? (e as Error).message;
  return new ModelError('MODEL_NOT_FOUND', `cannot read LoRA folder ${folder} (${code}). Fix its permissions or remove it from the LoRA folders.`, { file: folder, errno: code });
}

function isMissing(e: unknown): boolean {
  const code = (e as NodeJS.ErrnoException | undefined)?.code;
  return code === 'ENOENT' || code === 'ENOTDIR';
}

/** errno-style failures of one file (vanished, unreadable, I/O error) are that entry's problem, not the scan's. */
function fileErrorCode(e: unknown): string | undefined {
  const code = (e as NodeJS.ErrnoException | undefined)?.code;
  return typeof code === 'string' ? code : undefined;
}

interface HeaderFacts {
  readonly metadata: Record<string, string>;
  readonly keyVerdict: BaseModelVerdict;
  readonly dataStart: number;
}

async function describeLoraFile(found: FoundFile, cache: LoraHashCache | undefined, computeHashes: boolean): Promise<LoraLibraryEntry> {
  const problems: string[] = [];
  const ext = loraExtension(found.fileName)!;
  const stem = found.fileName.slice(0, found.fileName.length - ext.length);

  let stat: fs.Stats | undefined;
  try {
    stat = await fsp.stat(found.path);
  } catch (e) {
    const code = fileErrorCode(e);
    if (code === undefined) throw e;
    problems.push(`\`${found.fileName}\` cannot be read (${code}${code === 'ENOENT' ? ': a broken symlink?' : ''}).`);
  }

  let header: HeaderFacts | undefined;
  if (stat !== undefined && PICKLE_EXTENSIONS.includes(ext)) {
    problems.push(
      `\`${found.fileName}\`: pickle file, not loaded. Chorus never unpickles .pt/.ckpt files (they can run code); convert it to .safetensors.`,
    );
  } else if (stat !== undefined) {
    header = readHeaderFacts(found, problems);
  }

  let shortHash: string | undefined;
  if (header !== undefined && stat !== undefined) {
    shortHash = await readShortHash(found, stat, header.dataStart, cache, computeHashes, problems);
  }

  const civitai = await readCivitaiInfo(found, stem, problems);
  const user = await readUserMetadata(found, stem, problems);
  const metadata = header?.metadata ?? {};
  const verdict = decideBaseModel(header?.keyVerdict, metadata, civitai, user.sdVersion);
  const alias = metadata.ss_output_name?.trim();

  return {
    path: found.path,
    name: stem,
    alias: alias === undefined || alias === '' ? undefined : alias,
    relativeDir: found.relativeDir,
    root: found.root,
    sizeBytes: stat?.size ?? 0,
    metadata,
    baseModel: verdict.baseModel,
    baseModelEvidence: verdict.evidence,
    triggerWords: triggerWordsOf(found, metadata, civitai, problems),
    activationText: user.activationText,
    preferredWeight: user.preferredWeight,
    notes: user.notes ?? (await readDescription(found, stem, problems)),
    preview: findPreview(found, stem),
    civitai,
    shortHash,
    problems,
  };
}

function readHeaderFacts(found: FoundFile, problems: string[]): HeaderFacts | undefined {
  let file: SafetensorsFile;
  try {
    file = SafetensorsFile.open(found.path);
  } catch (e) {
    if (isModelError(e)) {
      problems.push(`${e.message} (not loaded)`);
      return undefined;
    }
    const code = fileErrorCode(e);
    if (code === undefined) throw e;
    problems.push(`\`${found.fileName}\` cannot be read (${code}).`);
    return undefined;
  }
  try {
    const metadata: Record<string, string> = {};
    for (const [k, v] of Object.entries(file.metadata)) if (!DROPPED_METADATA_KEYS.includes(k)) metadata[k] = v;
    const checkpointKey = file.names().find((k) => CHECKPOINT_KEY_PREFIXES.some((p) => k.startsWith(p)));
    if (checkpointKey !== undefined) {
      problems.push(`\`${found.fileName}\` looks like a full Stable Diffusion checkpoint (key \`${checkpointKey}\`), not a LoRA: move it to the checkpoints folder.`);
    }
    return { metadata, keyVerdict: detectBaseModelFromKeys(file.tensors), dataStart: file.dataStart };
  } finally {
    file.close();
  }
}

async function readShortHash(
  found: FoundFile,
  stat: fs.Stats,
  dataStart: number,
  cache: LoraHashCache | undefined,
  computeHashes: boolean,
  problems: string[],
): Promise<string | undefined> {
  try {
    const real = await fsp.realpath(found.path);
    const cached = cache?.lookup(real, stat.size, stat.mtimeMs);
    if (cached !== undefined) return cached.slice(0, A1111_SHORT_HASH_HEX);
    if (!computeHashes) return undefined;
    const sha256 = await sha256FromOffset(found.path, dataStart);
    cache?.store(real, stat.size, stat.mtimeMs, sha256);
    return sha256.slice(0, A1111_SHORT_HASH_HEX);
  } catch (e) {
    const code = fileErrorCode(e);
    if (code === undefined) throw e;
    problems.push(`\`${found.fileName}\` could not be hashed (${code}).`);
    return undefined;
  }
}

/** Keys first; then the header's metadata, Civitai's label, the A1111 user's `sd version`, each only if the previous can't tell. */
function decideBaseModel(
  keyVerdict: BaseModelVerdict | undefined,
  metadata: Readonly<Record<string, string>>,
  civitai: LoraCivitaiInfo | undefined,
  userSdVersion: string | undefined,
): BaseModelVerdict {
  if (keyVerdict?.baseModel !== undefined && keyVerdict.baseModel !== 'unknown') return keyVerdict;
  const why = keyVerdict?.evidence ?? 'header not read';
  const fromMetadata = detectBaseModelFromMetadata(metadata);
  if (fromMetadata.baseModel !== 'unknown') return { baseModel: fromMetadata.baseModel, evidence: `${fromMetadata.evidence} (${why})` };
  if (civitai?.baseModel !== undefined) {
    const family = baseModelOfCivitaiLabel(civitai.baseModel);
    if (family !== 'unknown') return { baseModel: family, evidence: `.civitai.info: baseModel = ${civitai.baseModel} (${why})` };
  }
  if (userSdVersion !== undefined) {
    const family = baseModelOfA1111SdVersion(userSdVersion);
    if (family !== 'unknown') return { baseModel: family, evidence: `A1111 user metadata: sd version = ${userSdVersion} (${why})` };
  }
  return { baseModel: 'unknown', evidence: `${why}; no metadata names a base model` };
}

/** A sidecar's text, or undefined when it is absent or unreadable (then a problem names it). */
async function readSidecar(found: FoundFile, name: string, problems: string[]): Promise<string | undefined> {
  if (!found.siblings.has(name)) return undefined;
  try {
    return await fsp.readFile(path.join(found.dir, name), 'utf-8');
  } catch (e) {
    const code = fileErrorCode(e);
    if (code === undefined) throw e;
    problems.push(`\`${name}\` cannot be read (${code}); ignored.`);
    return undefined;
  }
}

/** JSON object from a sidecar; a syntax error or a non-object is recorded as a problem. Editors on Windows may add a BOM. */
function parseSidecarObject(name: string, text: string, problems: string[], consequence: string): Record<string, unknown> | undefined {
  let json: unknown;
  try {
    json = JSON.parse(text.replace(/^\uFEFF/, ''));
  } catch (e) {
    problems.push(`\`${name}\` is not valid JSON (${(e as Error).message}); ${consequence}`);
    return undefined;
  }
  if (typeof json !== 'object' || json === null || Array.isArray(json)) {
    problems.push(`\`${name}\` is not a JSON object; ${consequence}`);
    return undefined;
  }
  return json as Record<string, unknown>;
}

function nonEmptyString(v: unknown): string | undefined {
  return typeof v === 'string' && v.trim() !== '' ? v.trim() : undefined;
}

/** Civitai Helper's `<stem>.civitai.info`: the Civitai model-version API object (`name`, `baseModel`, `trainedWords`, `model.name`). */
async function readCivitaiInfo(found: FoundFile, stem: string, problems: string[]): Promise<LoraCivitaiInfo | undefined> {
  const name = `${stem}.civitai.info`;
  const text = await readSidecar(found, name, problems);
  if (text === undefined || text.trim() === '') return undefined;
  const json = parseSidecarObject(name, text, problems, 'its names and trigger words are ignored. Fetch it again with Civitai Helper, or delete it.');
  if (json === undefined || Object.keys(json).length === 0) return undefined;
  const model = json.model;
  const info: LoraCivitaiInfo = { trainedWords: [] };
  const modelName = typeof model === 'object' && model !== null ? nonEmptyString((model as Record<string, unknown>).name) : undefined;
  const versionName = nonEmptyString(json.name);
  const baseModel = nonEmptyString(json.baseModel);
  if (modelName !== undefined) info.modelName = modelName;
  if (versionName !== undefined) info.versionName = versionName;
  if (baseModel !== undefined) info.baseModel = baseModel;
  if (Array.isArray(json.trainedWords)) {
    for (const w of json.trainedWords) {
      const word = nonEmptyString(w);
      if (word !== undefined) info.trainedWords.push(word);
    }
  } else if (json.trainedWords !== undefined) {
    problems.push(`\`${name}\`: trainedWords is not a list; ignored.`);
  }
  return info;
}

interface UserMetadata {
  readonly activationText: string | undefined;
  readonly preferredWeight: number | undefined;
  readonly notes: string | undefined;
  readonly sdVersion: string | undefined;
}

/** A1111's `<stem>.json` (written by the card's edit dialog: `LoraUserMetadataEditor`). */
async function readUserMetadata(found: FoundFile, stem: string, problems: string[]): Promise<UserMetadata> {
  const none: UserMetadata = { activationText: undefined, preferredWeight: undefined, notes: undefined, sdVersion: undefined };
  const name = `${stem}.json`;
  const text = await readSidecar(found, name, problems);
  if (text === undefined) return none;
  const json = parseSidecarObject(name, text, problems, 'its activation text, weight and notes are ignored. Fix or delete it.');
  if (json === undefined) return none;

  const field = (key: string): string | undefined => {
    const v = json[key];
    if (v === undefined || v === null || typeof v === 'string') return nonEmptyString(v);
    problems.push(`\`${name}\`: "${key}" should be text, found ${JSON.stringify(v)}; ignored.`);
    return undefined;
  };
  let preferredWeight: number | undefined;
  const weight = json['preferred weight'];
  if (typeof weight === 'number' && Number.isFinite(weight)) {
    preferredWeight = weight === 0 ? undefined : weight; // A1111: 0 means "use the default multiplier"
  } else if (weight !== undefined && weight !== null) {
    problems.push(`\`${name}\`: "preferred weight" should be a number, found ${JSON.stringify(weight)}; ignored.`);
  }
  return {
    activationText: field('activation text'),
    preferredWeight,
    notes: field('notes') ?? field('description'),
    sdVersion: field('sd version'),
  };
}

/** `<stem>.txt`, then `<stem>.description.txt` (A1111 `find_description`). */
async function readDescription(found: FoundFile, stem: string, problems: string[]): Promise<string | undefined> {
  for (const name of [`${stem}.txt`, `${stem}.description.txt`]) {
    const text = nonEmptyString(await readSidecar(found, name, problems));
    if (text !== undefined) return text;
  }
  return undefined;
}

/** A1111 `find_preview`: for each extension, `<stem>.ext` then `<stem>.preview.ext`. */
function findPreview(found: FoundFile, stem: string): string | undefined {
  for (const ext of PREVIEW_EXTENSIONS) {
    for (const name of [`${stem}.${ext}`, `${stem}.preview.${ext}`]) {
      if (found.siblings.has(name)) return path.join(found.dir, name);
    }
  }
  return undefined;
}

/**
 * The order most tools use: the trainer's own trigger fields, then Civitai's `trainedWords`, then the most
 * frequent captions tags. Each phrase is kept as written (Civitai entries such as `"a, b"` are one phrase to
 * paste); duplicates are dropped case-insensitively, keeping the first.
 */
function triggerWordsOf(found: FoundFile, metadata: Readonly<Record<string, string>>, civitai: LoraCivitaiInfo | undefined, problems: string[]): string[] {
  const words: string[] = [];
  const seen = new Set<string>();
  const add = (w: string): void => {
    const word = w.trim();
    if (word !== '' && !seen.has(word.toLowerCase())) {
      seen.add(word.toLowerCase());
      words.push(word);
    }
  };
  for (const key of ['modelspec.trigger_phrase', 'ss_trigger_words']) {
    const value = metadata[key];
    if (value !== undefined) for (const w of phrasesOfMetadataValue(value)) add(w);
  }
  for (const w of civitai?.trainedWords ?? []) add(w);
  for (const w of topTags(found, metadata.ss_tag_frequency, problems)) add(w);
  return words;
}

/** A metadata trigger field is a plain phrase, or (some trainers) a JSON list of phrases. */
function phrasesOfMetadataValue(value: string): string[] {
  if (value.trim().startsWith('[')) {
    try {
      const list: unknown = JSON.parse(value);
      if (Array.isArray(list)) return list.filter((w): w is string => typeof w === 'string');
    } catch {
      // not JSON after all: a phrase that starts with "[" (plain text)
    }
  }
  return [value];
}

/** kohya `ss_tag_frequency`: JSON `{dataset: {tag: count}}`. Counts are summed over datasets; ties keep first-seen order. */
function topTags(found: FoundFile, tagFrequency: string | undefined, problems: string[]): string[] {
  if (tagFrequency === undefined) return [];
  let json: unknown;
  try {
    json = JSON.parse(tagFrequency);
  } catch (e) {
    problems.push(`\`${found.fileName}\`: metadata ss_tag_frequency is not JSON (${(e as Error).message}); no trigger words taken from it.`);
    return [];
  }
  if (typeof json !== 'object' || json === null) return [];
  const counts = new Map<string, number>();
  for (const dataset of Object.values(json as Record<string, unknown>)) {
    if (typeof dataset !== 'object' || dataset === null) continue;
    for (const [tag, count] of Object.entries(dataset as Record<string, unknown>)) {
      const t = tag.trim();
      if (t !== '' && typeof count === 'number') counts.set(t, (counts.get(t) ?? 0) + count);
    }
  }
  return [...counts]
    .sort((a, b) => b[1] - a[1])
    .slice(0, TRIGGER_TAGS_FROM_FREQUENCY)
    .map(([tag]) => tag);
}
