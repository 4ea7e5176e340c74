/**
 * The A1111 LoRA hash and a small on-disk cache of it.
 *
 * A1111 (`modules/hashes.py addnet_hash_safetensors`, `extensions-builtin/Lora/network.py`) names a LoRA in
 * `Lora hashes:` by the first 12 hex digits of the sha256 of the bytes *after* the safetensors header (the
 * "addnet" hash, also what kohya writes as `sshs_model_hash`). Editing the metadata does not change it.
 */
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as fsp from 'node:fs/promises';
import * as path from 'node:path';
import { SafetensorsFile } from '../safetensors.ts';

/** Length of A1111's `shorthash` (`network.py set_hash`). */
export const A1111_SHORT_HASH_HEX = 12;
const HASH_READ_CHUNK_BYTES = 1 << 20;

/** sha256 (hex) of a file's bytes from `offset` to the end, streamed. */
export async function sha256FromOffset(file: string, offset: number): Promise<string> {
  const hash = createHash('sha256');
  for await (const chunk of fs.createReadStream(file, { start: offset, highWaterMark: HASH_READ_CHUNK_BYTES })) {
    hash.update(chunk as Buffer);
  }
  return hash.digest('hex');
}

/**
 * A1111's short LoRA hash: the first 12 hex digits of the sha256 over the bytes after the safetensors header.
 * The header is validated first (`SafetensorsFile.open`), so a truncated, pickle or non-safetensors file throws
 * that `ModelError` (TRUNCATED_FILE, HEADER_OVERRUN, NOT_SAFETENSORS, PICKLE_CHECKPOINT, …, MODEL_NOT_FOUND)
 * instead of hashing garbage.
 */
export async function addnetShortHash(file: string): Promise<string> {
  const st = SafetensorsFile.open(file);
  const dataStart = st.dataStart;
  st.close();
  return (await sha256FromOffset(file, dataStart)).slice(0, A1111_SHORT_HASH_HEX);
}

interface CachedHash {
  readonly size: number;
  readonly mtimeMs: number;
  /** Full addnet sha256, hex. */
  readonly sha256: string;
}

const CACHE_FORMAT = 'chorus-lora-hashes';
const CACHE_VERSION = 1;
const SHA256_HEX = /^[0-9a-f]{64}$/;

/**
 * Addnet hashes keyed by real path, valid while the file's size and mtime are unchanged.
 * File: `{"format": "chorus-lora-hashes", "version": 1, "files": {"<realpath>": {"size", "mtimeMs", "sha256"}}}`.
 */
export class LoraHashCache {
  readonly file: string;
  #entries: Map<string, CachedHash>;
  #dirty = false;

  private constructor(file: string, entries: Map<string, CachedHash>) {
    this.file = file;
    this.#entries = entries;
  }

  /**
   * Read the cache. A missing file is an empty cache; so is one that is not a cache of this format and version
   * (corrupt, foreign or older): it is rebuilt and overwritten on `save()`. Other read errors propagate.
   */
  static async load(file: string): Promise<LoraHashCache> {
    let text: string;
    try {
      text = await fsp.readFile(file, 'utf-8');
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'ENOENT') return new LoraHashCache(file, new Map());
      throw e;
    }
    return new LoraHashCache(file, parseCache(text));
  }

  /** The cached full hash if the file still has the recorded size and mtime. */
  lookup(realPath: string, size: number, mtimeMs: number): string | undefined {
    const hit = this.#entries.get(realPath);
    return hit !== undefined && hit.size === size && hit.mtimeMs === mtimeMs ? hit.sha256 : undefined;
  }

  store(realPath: string, size: number, mtimeMs: number, sha256: string): void {
    this.#entries.set(realPath, { size, mtimeMs, sha256 });
    this.#dirty = true;
  }

  /** Write the file (via a temporary file and rename) if anything was stored since `load`. */
  async save(): Promise<void> {
    if (!this.#dirty) return;
    const files = Object.fromEntries([...this.#entries].sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0)));
    const text = JSON.stringify({ format: CACHE_FORMAT, version: CACHE_VERSION, files }, null, 1);
    await fsp.mkdir(path.dirname(this.file), { recursive: true });
    const tmp = `${this.file}.${process.pid}.tmp`;
    await fsp.writeFile(tmp, text);
    await fsp.rename(tmp, this.file);
    this.#dirty = false;
  }
}

function parseCache(text: string): Map<string, CachedHash> {
  const entries = new Map<string, CachedHash>();
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch {
    return entries; // corrupt cache: rebuilt (see `load`)
  }
  if (typeof json !== 'object' || json === null) return entries;
  const { format, version, files } = json as { format?: unknown; version?: unknown; files?: unknown };
  if (format !== CACHE_FORMAT || version !== CACHE_VERSION || typeof files !== 'object' || files === null) return entries;
  for (const [realPath, value] of Object.entries(files as Record<string, unknown>)) {
    if (typeof value !== 'object' || value === null) continue;
    const { size, mtimeMs, sha256 } = value as { size?: unknown; mtimeMs?: unknown; sha256?: unknown };
    if (typeof size === 'number' && typeof mtimeMs === 'number' && typeof sha256 === 'string' && SHA256_HEX.test(sha256)) {
      entries.set(realPath, { size, mtimeMs, sha256 });
    }
  }
  return entries;
}
