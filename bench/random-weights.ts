/**
 * A full-size SD 1.5 diffusers folder with seeded random UNet weights, for benchmarks that need the
 * real shapes but not real images. The UNet config and every parameter name and shape come from
 * `shared/fixtures/sd15-keys/unet_diffusers.json` (the real SD 1.5 listing); the other components
 * (text encoder, VAE, tokenizer, scheduler) are links to the tiny fixture, since only the UNet is
 * timed.
 *
 * The UNet file is 3.4 GB in float32, so it is written streaming: header first, then each tensor
 * in chunks from its own PRNG stream. A marker file, written last, records the seed and the
 * listing's hash; a folder with a matching marker is reused as is.
 *
 * Run on its own: `node --import tsx bench/random-weights.ts [--out DIR] [--seed N]`.
 */
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { openSafetensors } from '../models/index.ts';
import { FIXTURES } from '../test/fixtures.ts';
import { SeededRandom } from './seeded-random.ts';

/** safetensors: 8-byte little-endian header length, JSON header padded with spaces to 8 bytes. */
const HEADER_LENGTH_BYTES = 8;
const HEADER_ALIGNMENT = 8;
const F32_BYTES = 4;
/** Values generated and written per write call (16 MiB of float32). */
const CHUNK_VALUES = 4 * 1024 * 1024;
/** Bump when the generated values or layout change, so old folders are regenerated. */
const GENERATOR_VERSION = 1;
const MARKER_FILE = 'chorus-bench-random.json';
/** Amplitude of non-norm biases: small, so they shift activations without dominating them. */
const BIAS_AMPLITUDE = 0.01;
export const DEFAULT_SEED = 1234;

export const SD15_KEYS_FILE = path.join(FIXTURES, 'sd15-keys', 'unet_diffusers.json');
export const TINY_MODEL_DIR = path.join(FIXTURES, 'tiny-sd15');

export interface ParamSpec {
  readonly name: string;
  readonly shape: readonly number[];
}

/** One float32 tensor to stream: `fill(chunk, start)` writes elements [start, start + chunk.length). */
export interface StreamedTensor extends ParamSpec {
  fill(chunk: Float32Array, start: number): void;
}

const numel = (shape: readonly number[]) => shape.reduce((a, b) => a * b, 1);

/**
 * Write a float32 safetensors file without holding it in memory. Tensors are laid out in the
 * given order, contiguously from data offset 0. The file appears under its name only once complete.
 */
export function writeSafetensorsStreaming(file: string, tensors: readonly StreamedTensor[], metadata?: Readonly<Record<string, string>>): number {
  const header: Record<string, unknown> = {};
  if (metadata !== undefined) header.__metadata__ = metadata;
  let offset = 0;
  for (const t of tensors) {
    const bytes = numel(t.shape) * F32_BYTES;
    header[t.name] = { dtype: 'F32', shape: [...t.shape], data_offsets: [offset, offset + bytes] };
    offset += bytes;
  }
  let json = JSON.stringify(header);
  json += ' '.repeat((HEADER_ALIGNMENT - (Buffer.byteLength(json) % HEADER_ALIGNMENT)) % HEADER_ALIGNMENT);
  const headerBytes = Buffer.from(json, 'utf-8');
  const prefix = Buffer.alloc(HEADER_LENGTH_BYTES);
  prefix.writeBigUInt64LE(BigInt(headerBytes.length), 0);

  const tmp = `${file}.${process.pid}.tmp`;
  const fd = fs.openSync(tmp, 'w');
  try {
    writeAll(fd, prefix);
    writeAll(fd, headerBytes);
    const chunk = new Float32Array(CHUNK_VALUES);
    for (const t of tensors) {
      const n = numel(t.shape);
      for (let start = 0; start < n; start += CHUNK_VALUES) {
        const view = chunk.subarray(0, Math.min(CHUNK_VALUES, n - start));
        t.fill(view, start);
        writeAll(fd, new Uint8Array(view.buffer, view.byteOffset, view.byteLength));
      }
    }
  } finally {
    fs.closeSync(fd);
  }
  const total = HEADER_LENGTH_BYTES + headerBytes.length + offset;
  const written = fs.statSync(tmp).size;
  if (written !== total) throw new Error(`writeSafetensorsStreaming: ${tmp} has ${written} bytes, expected ${total}`);
  fs.renameSync(tmp, file);
  return total;
}

function writeAll(fd: number, bytes: Uint8Array): void {
  let done = 0;
  while (done < bytes.byteLength) done += fs.writeSync(fd, bytes, done, bytes.byteLength - done);
}

/**
 * Values for one parameter. Conv and linear weights are uniform with variance 1/fan_in (LeCun
 * scaling, so each layer roughly keeps its input's scale and 30-odd residual blocks stay finite);
 * normalization weights are 1 and their biases 0 (as freshly initialized torch norms); other
 * biases are small.
 */
export function randomParam(seed: number, p: ParamSpec): StreamedTensor {
  // UNet and VAE norms (`norm1`, `norm`, `conv_norm_out`, `group_norm`), CLIP's layer norms.
  const isNorm = /(^|\.)(norm\d*|conv_norm_out|group_norm|layer_norm\d*|final_layer_norm)\.(weight|bias)$/.test(p.name);
  const isBias = p.name.endsWith('.bias');
  let fill: StreamedTensor['fill'];
  if (isNorm) {
    const value = isBias ? 0 : 1;
    fill = (chunk) => chunk.fill(value);
  } else {
    const rng = new SeededRandom(seed, p.name);
    const fanIn = p.shape.length >= 2 ? numel(p.shape.slice(1)) : 0;
    const amplitude = p.shape.length >= 2 ? Math.sqrt(3 / fanIn) : BIAS_AMPLITUDE;
    // Chunks arrive in order, so one stream per tensor covers it.
    fill = (chunk) => rng.fillUniform(chunk, amplitude);
  }
  return { name: p.name, shape: p.shape, fill };
}

interface Sd15Listing {
  readonly config: Record<string, unknown>;
  readonly params: readonly ParamSpec[];
  readonly hash: string;
}

/** Read and check the SD 1.5 UNet listing (config plus every parameter name and shape). */
export function readSd15UnetListing(file = SD15_KEYS_FILE): Sd15Listing {
  const text = fs.readFileSync(file, 'utf-8');
  const raw: unknown = JSON.parse(text);
  const bad = (what: string): never => {
    throw new Error(`${file}: ${what}; expected {config: {...}, params: [{name, shape}, ...]}`);
  };
  if (typeof raw !== 'object' || raw === null) bad('not a JSON object');
  const { config, params } = raw as { config?: unknown; params?: unknown };
  if (typeof config !== 'object' || config === null || Array.isArray(config)) bad('`config` is not an object');
  if (!Array.isArray(params) || params.length === 0) bad('`params` is not a non-empty list');
  const specs: ParamSpec[] = (params as unknown[]).map((p, i) => {
    const { name, shape } = (p ?? {}) as { name?: unknown; shape?: unknown };
    if (typeof name !== 'string' || !Array.isArray(shape) || !shape.every((d) => Number.isInteger(d) && d > 0)) bad(`params[${i}] is not {name, shape}`);
    return { name: name as string, shape: shape as number[] };
  });
  return { config: config as Record<string, unknown>, params: specs, hash: createHash('sha256').update(text).digest('hex').slice(0, 16) };
}

export interface PreparedRandomModel {
  readonly dir: string;
  /** False when an existing folder with the same seed and listing was reused. */
  readonly generated: boolean;
  readonly unetBytes: number;
  readonly seconds: number;
}

interface Marker {
  readonly generatorVersion: number;
  readonly seed: number;
  readonly listingHash: string;
  readonly unetBytes: number;
}

/** The folder a given seed lives in under `workDir`. */
export function randomSd15Dir(workDir: string, seed: number): string {
  return path.join(workDir, `sd15-random-seed${seed}`);
}

/** Create (or reuse) the random SD 1.5 diffusers folder for `seed` under `workDir`. */
export function prepareRandomSd15Model(workDir: string, seed: number, log: (line: string) => void = () => {}): PreparedRandomModel {
  const t0 = performance.now();
  const dir = randomSd15Dir(workDir, seed);
  const listing = readSd15UnetListing();
  const unetFile = path.join(dir, 'unet', 'diffusion_pytorch_model.safetensors');
  const markerFile = path.join(dir, MARKER_FILE);
  const wanted: Omit<Marker, 'unetBytes'> = { generatorVersion: GENERATOR_VERSION, seed, listingHash: listing.hash };
  const existing = readMarker(markerFile);
  if (
    existing !== undefined &&
    existing.generatorVersion === wanted.generatorVersion &&
    existing.seed === seed &&
    existing.listingHash === wanted.listingHash &&
    fs.existsSync(unetFile) &&
    fs.statSync(unetFile).size === existing.unetBytes
  ) {
    return { dir, generated: false, unetBytes: existing.unetBytes, seconds: (performance.now() - t0) / 1000 };
  }

  fs.rmSync(dir, { recursive: true, force: true });
  fs.mkdirSync(path.join(dir, 'unet'), { recursive: true });
  fs.copyFileSync(path.join(TINY_MODEL_DIR, 'model_index.json'), path.join(dir, 'model_index.json'));
  fs.writeFileSync(path.join(dir, 'unet', 'config.json'), `${JSON.stringify(listing.config, null, 2)}\n`);
  for (const component of ['text_encoder', 'vae', 'tokenizer', 'scheduler']) {
    fs.symlinkSync(path.join(TINY_MODEL_DIR, component), path.join(dir, component), 'dir');
  }
  log(`writing random SD 1.5 UNet weights (seed ${seed}, ${listing.params.length} tensors) to ${unetFile}`);
  const ordered = [...listing.params].sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  const unetBytes = writeSafetensorsStreaming(
    unetFile,
    ordered.map((p) => randomParam(seed, p)),
    { format: 'pt', generator: `chorus bench/random-weights.ts v${GENERATOR_VERSION}`, seed: String(seed) },
  );
  // The project's own reader checks the header, offsets and size before the folder is marked complete.
  const check = openSafetensors(unetFile);
  try {
    if (check.tensors.size !== listing.params.length) throw new Error(`${unetFile}: ${check.tensors.size} tensors, expected ${listing.params.length}`);
  } finally {
    check.close();
  }
  const marker: Marker = { ...wanted, unetBytes };
  fs.writeFileSync(markerFile, `${JSON.stringify(marker, null, 2)}\n`);
  return { dir, generated: true, unetBytes, seconds: (performance.now() - t0) / 1000 };
}

function readMarker(file: string): Marker | undefined {
  if (!fs.existsSync(file)) return undefined;
  const raw: unknown = JSON.parse(fs.readFileSync(file, 'utf-8'));
  if (typeof raw !== 'object' || raw === null) return undefined;
  const m = raw as Partial<Marker>;
  if (typeof m.generatorVersion !== 'number' || typeof m.seed !== 'number' || typeof m.listingHash !== 'string' || typeof m.unetBytes !== 'number') return undefined;
  return m as Marker;
}

/**
 * A complete random SD 1.5 diffusers folder (UNet, CLIP ViT-L text encoder and VAE at their real
 * sizes, from the `sd15-keys` listings; tokenizer and scheduler from the fixture, which carry the
 * real vocabulary and SD 1.5 scheduler config), for benchmarks of the whole pipeline. The UNet is
 * linked from the UNet-only folder so its 3.4 GB are written once.
 */
export function prepareRandomSd15FullModel(workDir: string, seed: number, log: (line: string) => void = () => {}): PreparedRandomModel {
  const t0 = performance.now();
  const unetOnly = prepareRandomSd15Model(workDir, seed, log);
  const dir = path.join(workDir, `sd15-full-random-seed${seed}`);
  const listings = {
    text_encoder: readSd15UnetListing(path.join(FIXTURES, 'sd15-keys', 'text_encoder_diffusers.json')),
    vae: readSd15UnetListing(path.join(FIXTURES, 'sd15-keys', 'vae_diffusers.json')),
  };
  const files = {
    text_encoder: path.join(dir, 'text_encoder', 'model.safetensors'),
    vae: path.join(dir, 'vae', 'diffusion_pytorch_model.safetensors'),
  };
  const markerFile = path.join(dir, MARKER_FILE);
  const listingHash = `${listings.text_encoder.hash}-${listings.vae.hash}`;
  const existing = readMarker(markerFile);
  const complete = (m: Marker | undefined) =>
    m !== undefined && m.generatorVersion === GENERATOR_VERSION && m.seed === seed && m.listingHash === listingHash && Object.values(files).every((f) => fs.existsSync(f));
  if (complete(existing) && !unetOnly.generated) return { dir, generated: false, unetBytes: unetOnly.unetBytes, seconds: (performance.now() - t0) / 1000 };

  fs.rmSync(dir, { recursive: true, force: true });
  fs.mkdirSync(dir, { recursive: true });
  fs.copyFileSync(path.join(TINY_MODEL_DIR, 'model_index.json'), path.join(dir, 'model_index.json'));
  fs.symlinkSync(path.join(unetOnly.dir, 'unet'), path.join(dir, 'unet'), 'dir');
  for (const component of ['tokenizer', 'scheduler']) fs.symlinkSync(path.join(TINY_MODEL_DIR, component), path.join(dir, component), 'dir');
  for (const component of ['text_encoder', 'vae'] as const) {
    const listing = listings[component];
    fs.mkdirSync(path.join(dir, component));
    fs.writeFileSync(path.join(dir, component, 'config.json'), `${JSON.stringify(listing.config, null, 2)}\n`);
    log(`writing random SD 1.5 ${component} weights (seed ${seed}, ${listing.params.length} tensors)`);
    const ordered = [...listing.params].sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
    writeSafetensorsStreaming(files[component], ordered.map((p) => randomParam(seed, p)), { format: 'pt', generator: `chorus bench/random-weights.ts v${GENERATOR_VERSION}`, seed: String(seed) });
  }
  const marker: Marker = { generatorVersion: GENERATOR_VERSION, seed, listingHash, unetBytes: unetOnly.unetBytes };
  fs.writeFileSync(markerFile, `${JSON.stringify(marker, null, 2)}\n`);
  return { dir, generated: true, unetBytes: unetOnly.unetBytes, seconds: (performance.now() - t0) / 1000 };
}

/** Default place for generated models and the bench's weight cache (never inside the repo). */
export function defaultBenchWorkDir(): string {
  const env = process.env.CHORUS_BENCH_DIR;
  return env !== undefined && env !== '' ? env : path.join(os.tmpdir(), 'chorus-bench');
}

if (process.argv[1] !== undefined && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  const { values } = parseArgs({ options: { out: { type: 'string' }, seed: { type: 'string' } } });
  const seed = values.seed === undefined ? DEFAULT_SEED : Number(values.seed);
  if (!Number.isSafeInteger(seed) || seed < 0) {
    process.stderr.write(`--seed must be a non-negative integer, got ${values.seed}\n`);
    process.exit(2);
  }
  const result = prepareRandomSd15Model(values.out ?? defaultBenchWorkDir(), seed, (l) => process.stderr.write(`${l}\n`));
  process.stdout.write(`${JSON.stringify(result)}\n`);
}
