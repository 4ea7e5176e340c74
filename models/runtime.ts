/**
 * ONNX Runtime sessions. The only module that imports `onnxruntime-node`.
 *
 * Execution providers are chosen here and nowhere else: the user may force one (`--device`), or
 * `auto` tries, in order, WebGPU (when a hardware adapter exists: see `probeWebGpu`), the
 * platform's GPU provider (DirectML on Windows, CoreML on macOS, CUDA on Linux when its libraries
 * were installed with `npm run install-cuda`), then the CPU. A provider that fails to create a
 * session is recorded with its error and the next one is tried, so a machine without a GPU still
 * runs, and `choice.reason` says why.
 *
 * WebGPU in ONNX Runtime 1.30's Node binding (checked against the binding's source and binary):
 * - no adapter information reaches JavaScript (`ort.env.webgpu` is empty; no adapter info,
 *   features or limits), so the probe finds out by running: a tiny fp32 graph (is there an adapter?)
 *   and a tiny fp16 graph (does it have shader-f16? without it the EP fails with "requires f16 but
 *   the device does not support it"), in a child process so that a driver crash or Dawn's console
 *   warnings stay out of this one;
 * - `preferredOutputLocation: 'gpu-buffer'` works and such outputs can be fed back as inputs of any
 *   WebGPU session of the process (IO binding), but their `download()` is not implemented: it
 *   throws a C++ exception that aborts the process. So results that JavaScript reads must be CPU
 *   outputs; what can stay on the device is an input reused across runs, uploaded once through a
 *   small identity session (`run(…, { resident })`).
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import * as os from 'node:os';
import { createHash } from 'node:crypto';
import { createRequire } from 'node:module';
import { execFile } from 'node:child_process';
import * as ort from 'onnxruntime-node';
import { ModelError } from './errors.ts';
import type { DType, Tensor } from './tensor.ts';
import { softwareVulkanDrivers } from './device.ts';
import { Ops } from './onnx/ops.ts';
import { repairOptimizedModel, serializeModel } from './onnx/serialize.ts';

export type Device = 'auto' | 'cpu' | 'cuda' | 'dml' | 'coreml' | 'webgpu';
export type ConcreteDevice = Exclude<Device, 'auto'>;
export const DEVICES: readonly Device[] = ['auto', 'cpu', 'cuda', 'dml', 'coreml', 'webgpu'];

export interface ProviderChoice {
  readonly device: ConcreteDevice;
  readonly reason: string;
  readonly tried: ReadonlyArray<{ readonly device: ConcreteDevice; readonly error: string }>;
}

const require = createRequire(import.meta.url);

/** True when the CUDA provider library was installed next to the ORT binding (opt-in on Linux). */
function cudaInstalled(): boolean {
  try {
    const pkg = path.dirname(require.resolve('onnxruntime-node/package.json'));
    const dir = path.join(pkg, 'bin', 'napi-v6', process.platform, process.arch);
    return fs.readdirSync(dir).some((f) => f.startsWith('libonnxruntime_providers_cuda'));
  } catch {
    return false;
  }
}

/** What the WebGPU probe found (once per process; see `probeWebGpu`). */
export interface WebGpuStatus {
  /** A WebGPU adapter exists and ran the probe graph correctly. */
  readonly available: boolean;
  /** The adapter is a software renderer (only software Vulkan drivers on Linux: SwiftShader, lavapipe). */
  readonly software: boolean;
  /** The adapter has the `shader-f16` feature. */
  readonly shaderF16: boolean;
  /** One line: what was found, or why there is no adapter. */
  readonly reason: string;
}

/** The providers `device` means on this platform, most preferred first; the CPU is always last. */
export function providerCandidates(device: Device, platform: NodeJS.Platform = process.platform, webgpu?: WebGpuStatus): ConcreteDevice[] {
  if (device === 'cpu') return ['cpu'];
  if (device !== 'auto') return [device, 'cpu'];
  const gpu: ConcreteDevice[] = [];
  // A software adapter is tens of times slower than the CPU provider: auto never picks it.
  if (webgpu !== undefined && webgpu.available && !webgpu.software) gpu.push('webgpu');
  if (platform === 'win32') gpu.push('dml');
  if (platform === 'darwin') gpu.push('coreml');
  if (platform === 'linux' && cudaInstalled()) gpu.push('cuda');
  return [...gpu, 'cpu'];
}

/** Why `auto` left WebGPU out (undefined when it did not). */
export function webgpuSkipReason(webgpu: WebGpuStatus | undefined): string | undefined {
  if (webgpu === undefined || (webgpu.available && !webgpu.software)) return undefined;
  if (!webgpu.available) return `webgpu unavailable (${webgpu.reason})`;
  return `webgpu skipped (${webgpu.reason}; far slower than the CPU provider, --device webgpu forces it)`;
}

// The probe graphs: y = 2x + 1 in fp32, and the same through fp16 casts (needs shader-f16).
function probeModel(half: boolean): Uint8Array {
  const g = new Ops('webgpu_probe');
  const x = g.input('x', 'float32', [4]);
  const y = half ? g.cast(g.add(g.cast(x, 'float16'), g.cast(x, 'float16')), 'float32') : g.add(g.mul(x, g.scalar(2)), g.scalar(1));
  g.output(half ? g.add(y, g.scalar(1)) : y, 'y', 'float32', [4]);
  return serializeModel(g.finish(), () => {
    throw new Error('the probe graph has no parameters');
  });
}

const PROBE_SCRIPT = `
const ort = require(process.argv[1]);
const [f32, f16] = JSON.parse(process.argv[2]).map((b) => Buffer.from(b, 'base64'));
const opts = { executionProviders: ['webgpu'], logSeverityLevel: 4, extra: { session: { disable_cpu_ep_fallback: '1' } } };
const x = () => ({ x: new ort.Tensor('float32', new Float32Array([0, 1, 2, 3]), [4]) });
const line = (e) => String((e && e.message) || e).split('\\n')[0];
(async () => {
  const out = {};
  try {
    const s = await ort.InferenceSession.create(f32, opts);
    out.y = Array.from((await s.run(x())).y.data);
  } catch (e) { out.error = line(e); }
  if (out.error === undefined) {
    try {
      const s = await ort.InferenceSession.create(f16, opts);
      out.y16 = Array.from((await s.run(x())).y.data);
    } catch (e) { out.f16error = line(e); }
  }
  process.stdout.write(JSON.stringify(out));
  process.exit(0);
})();
`;

let webgpuProbe: Promise<WebGpuStatus> | undefined;

/**
 * Is there a WebGPU adapter, is it a software renderer, has it shader-f16? Probed once per process
 * (the result, failure reason included, is cached), in a child process with this environment.
 */
export function probeWebGpu(): Promise<WebGpuStatus> {
  webgpuProbe ??= new Promise<WebGpuStatus>((resolve) => {
    const software = process.platform === 'linux' ? softwareVulkanDrivers() : undefined;
    const models = JSON.stringify([probeModel(false), probeModel(true)].map((b) => Buffer.from(b).toString('base64')));
    const ortPath = require.resolve('onnxruntime-node');
    // Inside Electron (the engine's utility process) execPath is the Electron binary: run it as Node.
    execFile(process.execPath, ['-e', PROBE_SCRIPT, ortPath, models], { timeout: 120_000, maxBuffer: 1 << 20, env: { ...process.env, ELECTRON_RUN_AS_NODE: '1' } }, (err, stdout) => {
      let out: { y?: number[]; y16?: number[]; error?: string; f16error?: string } = {};
      try {
        out = JSON.parse(stdout) as typeof out;
      } catch {
        out = { error: err === null ? 'the probe printed nothing' : `the probe process failed (${err.signal ?? `exit ${String(err.code)}`})` };
      }
      const expected = [1, 3, 5, 7];
      if (out.y === undefined || out.y.some((v, i) => v !== expected[i])) {
        const why = (out.error ?? `wrong probe result [${String(out.y)}]`).replace(/^.*?(Failed to get a WebGPU adapter)/, '$1');
        resolve({ available: false, software: false, shaderF16: false, reason: why });
        return;
      }
      const shaderF16 = out.f16error === undefined && out.y16 !== undefined && out.y16.every((v, k) => v === expected[k]);
      const parts = [software === undefined ? 'a WebGPU adapter' : `only a software adapter (${software} Vulkan driver)`, shaderF16 ? 'with shader-f16' : 'no shader-f16'];
      resolve({ available: true, software: software !== undefined, shaderF16, reason: parts.join(', ') });
    });
  });
  return webgpuProbe;
}

const ORT_TYPES: Partial<Record<DType, ort.Tensor.Type>> = { float32: 'float32', float16: 'float16', int64: 'int64', int32: 'int32', uint8: 'uint8', bool: 'bool' };

/**
 * ORT tensors for our tensors, kept as long as the tensor lives: inputs fed on every call (the
 * adapter bank's hundreds of LoRA tensors) are wrapped once.
 */
const ortTensors = new WeakMap<Tensor, ort.Tensor>();

function toOrt(name: string, t: Tensor): ort.Tensor {
  const hit = ortTensors.get(t);
  if (hit !== undefined) return hit;
  const type = ORT_TYPES[t.dtype];
  if (type === undefined) throw new ModelError('RUNTIME', `input ${name}: dtype ${t.dtype} cannot be fed to ONNX Runtime`, { input: name });
  const made = new ort.Tensor(type, t.data as never, [...t.shape]);
  ortTensors.set(t, made);
  return made;
}

function fromOrt(t: ort.Tensor): Tensor {
  const dims = [...t.dims];
  switch (t.type) {
    case 'float32':
      return { dtype: 'float32', shape: dims, data: t.data as Float32Array };
    case 'float16':
      return { dtype: 'float16', shape: dims, data: t.data as Uint16Array };
    case 'int64':
      return { dtype: 'int64', shape: dims, data: t.data as BigInt64Array };
    case 'int32':
      return { dtype: 'int32', shape: dims, data: t.data as Int32Array };
    default:
      throw new ModelError('RUNTIME', `output of type ${t.type} is not supported`, { type: t.type });
  }
}

export interface SessionCreateOptions {
  readonly device?: Device;
  /** Intra-op threads (default: ONNX Runtime's choice, one per core). */
  readonly threads?: number;
  /**
   * ONNX Runtime's memory pattern (default: off on the CPU, ONNX Runtime's default elsewhere).
   * With it, after the first run of a shape ONNX Runtime plans every tensor into one block and
   * allocates that block on later runs while the arena keeps what the first run took. For graphs
   * whose activations are large that nearly doubles the peak: SD 1.5 at 512², a 6-sample VJP call,
   * 13.5 → 21.3 GiB RSS on the second run (without: 14.0 GiB, 40.4 s per call instead of 46.6 s); a
   * CFG pass (batch 2) 7.75 GiB with it, 5.55 GiB without, at the same speed.
   */
  readonly memoryPattern?: boolean;
  /**
   * CPU sessions only: the path of ONNX Runtime's optimized copy of this model (`<name>.onnx`, its
   * initializers in `<name>.onnx.bin` beside it). When the file exists the session is created from
   * it with graph optimizations off; otherwise the session is created from `model` as usual and ONNX
   * Runtime writes the copy (under a temporary name, renamed when complete). At SD 1.5 size most of
   * a session build is ONNX Runtime's optimizer (VJP graph: 100 s of which the NCHWc layout pass
   * takes 60 s and constant folding 32 s); loading the optimized copy takes ≈ 8 s. The copy holds
   * the folded and reordered weights: about the model's size on disk per graph. A copy that fails to
   * load is deleted and rebuilt. The copy is specific to this machine's CPU and ONNX Runtime
   * version; callers put both in the name.
   */
  readonly optimizedCache?: string;
}

export interface RunOptions {
  /**
   * Inputs that are the same tensor object over many runs (text embeddings, adapter-bank inputs):
   * on WebGPU each is uploaded once and fed from the device afterwards (ignored on other providers).
   * The tensor must not be changed in place afterwards.
   */
  readonly resident?: readonly string[];
}

/**
 * The order in which `device` tries providers, probing WebGPU first when it may be used, and the
 * note `auto` adds to its reason when it left WebGPU out.
 */
export async function resolveProviders(device: Device): Promise<{ candidates: ConcreteDevice[]; webgpu?: WebGpuStatus; note?: string }> {
  if (device !== 'auto' && device !== 'webgpu') return { candidates: providerCandidates(device) };
  const webgpu = await probeWebGpu();
  const note = device === 'auto' ? webgpuSkipReason(webgpu) : undefined;
  return { candidates: providerCandidates(device, process.platform, webgpu), webgpu, ...(note === undefined ? {} : { note }) };
}

/**
 * What an optimized copy depends on besides the model: ONNX Runtime's version and the CPU (the NCHWc
 * layout's block size follows the vector width). A short hash of both.
 */
function machineStamp(): string {
  let flags = '';
  try {
    flags = /^flags\s*:(.*)$/m.exec(fs.readFileSync('/proc/cpuinfo', 'utf8'))?.[1]?.trim() ?? '';
  } catch {
    // Not Linux: the model name has to do.
  }
  return createHash('sha256').update(`${ortVersion()}|${process.arch}|${os.cpus()[0]?.model ?? ''}|${flags}`).digest('hex').slice(0, 12);
}

let stamp: string | undefined;

/** Where the optimized copy of the model file `modelPath` lives (beside it, named for this machine). */
export function optimizedCachePath(modelPath: string): string {
  stamp ??= machineStamp();
  return path.join(path.dirname(modelPath), `${path.basename(modelPath, '.onnx')}.opt-${stamp}.onnx`);
}

/**
 * Delete the least recently used optimized copies under `cacheDir` (one level of component folders)
 * until they take at most `budgetBytes`, never `keep`, and the leftovers of writes that never
 * completed (older than an hour). Returns the deleted copies and leftovers.
 */
export function pruneOptimizedCopies(cacheDir: string, budgetBytes: number, keep: readonly string[] = []): string[] {
  const copies: { file: string; bytes: number; used: number }[] = [];
  let dirs: string[] = [];
  try {
    dirs = fs.readdirSync(cacheDir, { withFileTypes: true }).filter((d) => d.isDirectory()).map((d) => path.join(cacheDir, d.name));
  } catch {
    return [];
  }
  const deleted: string[] = [];
  for (const dir of dirs) {
    for (const name of fs.readdirSync(dir)) {
      // A write that never completed (the process died): its partial model and data file, once stale.
      if (/\.opt-[0-9a-f]+\.onnx\.partial$/.test(name)) {
        const partial = path.join(dir, name);
        const cache = partial.slice(0, -'.partial'.length);
        try {
          if (Date.now() - fs.statSync(partial).mtimeMs > 3_600_000) {
            fs.rmSync(partial, { force: true });
            if (!fs.existsSync(cache)) fs.rmSync(`${cache}.bin`, { force: true });
            deleted.push(partial);
          }
        } catch {
          // Gone meanwhile.
        }
        continue;
      }
      if (!/\.opt-[0-9a-f]+\.onnx$/.test(name)) continue;
      const file = path.join(dir, name);
      let bytes = 0;
      let used = 0;
      for (const f of optimizedCacheFiles(file)) {
        try {
          const st = fs.statSync(f);
          bytes += st.size;
          used = Math.max(used, st.mtimeMs);
        } catch {
          // A missing .bin: the copy is broken and goes first.
        }
      }
      copies.push({ file, bytes, used });
    }
  }
  copies.sort((a, b) => b.used - a.used);
  let total = 0;
  for (const c of copies) {
    total += c.bytes;
    if (total <= budgetBytes || keep.includes(c.file)) continue;
    for (const f of optimizedCacheFiles(c.file)) fs.rmSync(f, { force: true });
    deleted.push(c.file);
    total -= c.bytes;
  }
  return deleted;
}

/** Housekeeping on the copies' files must never fail a session build. */
function quietly(f: () => unknown): void {
  try {
    f();
  } catch {
    // Ignored: see above.
  }
}

/** The files of an optimized copy (see `SessionCreateOptions.optimizedCache`). */
export function optimizedCacheFiles(cache: string): string[] {
  return [cache, `${cache}.bin`];
}

async function createCached(model: string | Uint8Array, options: ort.InferenceSession.SessionOptions, cache: string): Promise<ort.InferenceSession> {
  if (fs.existsSync(cache)) {
    try {
      const session = await ort.InferenceSession.create(cache, { ...options, graphOptimizationLevel: 'disabled' });
      const now = new Date();
      for (const f of optimizedCacheFiles(cache)) quietly(() => fs.utimesSync(f, now, now)); // recency, for pruning
      return session;
    } catch {
      for (const f of optimizedCacheFiles(cache)) quietly(() => fs.rmSync(f, { force: true }));
    }
  }
  const temporary = `${cache}.partial`;
  const saving: ort.InferenceSession.SessionOptions = {
    ...options,
    optimizedModelFilePath: temporary,
    // ONNX Runtime warns that an NCHWc copy is specific to this machine: the cache name says so.
    logSeverityLevel: 3,
    extra: { ...(options.extra ?? {}), session: { optimized_model_external_initializers_file_name: `${path.basename(cache)}.bin`, optimized_model_external_initializers_min_size_in_bytes: '1024' } },
  };
  let session: ort.InferenceSession;
  try {
    session = typeof model === 'string' ? await ort.InferenceSession.create(model, saving) : await ort.InferenceSession.create(model, saving);
  } catch {
    // The copy could not be written (a full disk, an unwritable folder) or the model does not load:
    // build without the copy; a model that does not load fails there with its own error.
    quietly(() => fs.rmSync(temporary, { force: true }));
    quietly(() => fs.rmSync(`${cache}.bin`, { force: true }));
    return typeof model === 'string' ? await ort.InferenceSession.create(model, options) : await ort.InferenceSession.create(model, options);
  }
  quietly(() => {
    if (!fs.existsSync(temporary)) return;
    // ONNX Runtime cannot load back what it writes for control-flow branches (see the repair).
    const repaired = repairOptimizedModel(fs.readFileSync(temporary));
    if (repaired !== undefined) fs.writeFileSync(temporary, repaired);
    fs.renameSync(temporary, cache);
  });
  return session;
}

/** Run errors that mean the GPU provider cannot run the graph (not bad inputs): retried on the CPU. */
const GPU_RUN_FAILURE = /WebGPU|Allocation size|device (?:lost|limit)|out of memory|CUDA|DirectML|\bDML\b|CoreML/i;

/** One ONNX Runtime session with typed run(). `dispose()` when done. */
export class OrtSession {
  readonly inputNames: readonly string[];
  readonly outputNames: readonly string[];
  #session: ort.InferenceSession | undefined;
  #choice: ProviderChoice;
  /** What the session was made from and how, for the CPU fallback of a failed GPU run. */
  readonly #source: { model: string | Uint8Array; threads?: number; memoryPattern?: boolean };

  private constructor(session: ort.InferenceSession, choice: ProviderChoice, source: { model: string | Uint8Array; threads?: number; memoryPattern?: boolean }) {
    this.#session = session;
    this.#choice = choice;
    this.#source = source;
    this.inputNames = session.inputNames;
    this.outputNames = session.outputNames;
  }

  /** The provider running this session and why (changes once if a GPU run fails and the CPU takes over). */
  get choice(): ProviderChoice {
    return this.#choice;
  }

  /** Create a session from a model file (external data resolves beside it) or model bytes. */
  static async create(model: string | Uint8Array, options: SessionCreateOptions = {}): Promise<OrtSession> {
    const device = options.device ?? 'auto';
    const tried: { device: ConcreteDevice; error: string }[] = [];
    const { candidates, webgpu, note } = await resolveProviders(device);
    for (const candidate of candidates) {
      if (candidate === 'cuda' && !cudaInstalled()) {
        tried.push({ device: candidate, error: 'the CUDA provider is not installed (npm run install-cuda)' });
        continue;
      }
      if (candidate === 'webgpu' && webgpu !== undefined && !webgpu.available) {
        tried.push({ device: candidate, error: webgpu.reason });
        continue;
      }
      const sessionOptions: ort.InferenceSession.SessionOptions = {
        executionProviders: [candidate],
        graphOptimizationLevel: 'all',
        // A provider that cannot start is reported through `choice.tried`; keep ORT's own log quiet about it.
        ...(candidate === 'cpu' ? {} : { logSeverityLevel: 4 as const }),
        ...(options.threads === undefined ? {} : { intraOpNumThreads: options.threads }),
        ...((options.memoryPattern ?? candidate !== 'cpu') ? {} : { enableMemPattern: false }),
        // Developer aid: CHORUS_ORT_PROFILE=<prefix> writes ONNX Runtime's per-node timing JSON on dispose.
        ...(process.env.CHORUS_ORT_PROFILE ? { enableProfiling: true, profileFilePrefix: process.env.CHORUS_ORT_PROFILE } : {}),
      };
      try {
        const session = candidate === 'cpu' && options.optimizedCache !== undefined ? await createCached(model, sessionOptions, options.optimizedCache) : typeof model === 'string' ? await ort.InferenceSession.create(model, sessionOptions) : await ort.InferenceSession.create(model, sessionOptions);
        const what = candidate === 'webgpu' && webgpu !== undefined ? `webgpu (${webgpu.reason})` : candidate;
        const reason =
          tried.length === 0
            ? device === 'auto'
              ? `${what}: the first provider available on ${process.platform}${note === undefined ? '' : `; ${note}`}`
              : `${what}: as requested`
            : `${what}: ${tried.map((t) => `${t.device} failed (${t.error})`).join('; ')}${note === undefined ? '' : `; ${note}`}`;
        return new OrtSession(session, { device: candidate, reason, tried }, { model, ...(options.threads === undefined ? {} : { threads: options.threads }), ...(options.memoryPattern === undefined ? {} : { memoryPattern: options.memoryPattern }) });
      } catch (e) {
        tried.push({ device: candidate, error: (e as Error).message.split('\n')[0] ?? String(e) });
      }
    }
    const where = typeof model === 'string' ? model : 'in-memory model';
    throw new ModelError('RUNTIME', `${where}: no execution provider could create a session: ${tried.map((t) => `${t.device}: ${t.error}`).join('; ')}`, { tried });
  }

  #inFlight = 0;
  #retired = false;

  /** False once disposed (directly, or after `retire` when its last run ended). */
  get alive(): boolean {
    return this.#session !== undefined;
  }

  /**
   * Dispose as soon as no run is in flight: now when idle, else when the last running call returns.
   * For an owner dropping a session others may still be running on (a superseded merged variant).
   */
  async retire(): Promise<void> {
    this.#retired = true;
    if (this.#inFlight === 0) await this.dispose();
  }

  /** Run; `fetch` limits the outputs computed. */
  async run(feeds: Readonly<Record<string, Tensor>>, fetch?: readonly string[], options: RunOptions = {}): Promise<Record<string, Tensor>> {
    if (this.#session === undefined) throw new Error('OrtSession.run after dispose');
    this.#inFlight++;
    try {
      return await this.#run(feeds, fetch, options);
    } finally {
      this.#inFlight--;
      if (this.#retired && this.#inFlight === 0) await this.dispose();
    }
  }

  async #run(feeds: Readonly<Record<string, Tensor>>, fetch: readonly string[] | undefined, options: RunOptions): Promise<Record<string, Tensor>> {
    const session = this.#session;
    if (session === undefined) throw new Error('OrtSession.run after dispose');
    const ortFeeds: Record<string, ort.Tensor> = {};
    const resident = this.choice.device === 'webgpu' && options.resident !== undefined ? new Set(options.resident) : undefined;
    for (const [k, v] of Object.entries(feeds)) ortFeeds[k] = resident?.has(k) === true ? await onDevice(k, v) : toOrt(k, v);
    let results: ort.InferenceSession.ReturnType;
    try {
      results = fetch === undefined ? await session.run(ortFeeds) : await session.run(ortFeeds, [...fetch]);
    } catch (e) {
      const message = (e as Error).message;
      if (this.#choice.device === 'cpu' || !GPU_RUN_FAILURE.test(message)) throw new ModelError('RUNTIME', `inference failed: ${message}`, { inputs: Object.keys(feeds).length });
      await this.#fallBackToCpu(message);
      return this.#run(feeds, fetch, options);
    }
    const out: Record<string, Tensor> = {};
    for (const [k, v] of Object.entries(results)) out[k] = fromOrt(v);
    return out;
  }

  /**
   * A GPU provider that cannot run the graph (WebGPU: a buffer over the adapter's limits, device
   * lost; onnxruntime-node does not expose the adapter's limits to check them beforehand) hands the
   * session to the CPU for good, and the choice says so.
   */
  async #fallBackToCpu(error: string): Promise<void> {
    const from = this.#choice.device;
    const first = error.split('\n')[0] ?? error;
    const options: ort.InferenceSession.SessionOptions = {
      executionProviders: ['cpu'],
      graphOptimizationLevel: 'all',
      ...(this.#source.threads === undefined ? {} : { intraOpNumThreads: this.#source.threads }),
      ...(this.#source.memoryPattern === true ? {} : { enableMemPattern: false }),
    };
    const model = this.#source.model;
    const cpu = typeof model === 'string' ? await ort.InferenceSession.create(model, options) : await ort.InferenceSession.create(model, options);
    const old = this.#session;
    this.#session = cpu;
    if (old !== undefined) await old.release().catch(() => undefined);
    this.#choice = { device: 'cpu', reason: `cpu: ${from} could not run this graph (${first}); running on the CPU instead`, tried: [...this.#choice.tried, { device: from, error: first }] };
  }

  async dispose(): Promise<void> {
    const s = this.#session;
    this.#session = undefined;
    if (s !== undefined && process.env.CHORUS_ORT_PROFILE) s.endProfiling();
    if (s !== undefined) await s.release();
  }
}

// ---- device-resident inputs (WebGPU) ---------------------------------------------------------------

/** Device copies of tensors, kept as long as the tensor lives; released when it is collected. */
const deviceCopies = new WeakMap<Tensor, Promise<ort.Tensor>>();
const releaseCopy = new FinalizationRegistry<Promise<ort.Tensor>>((copy) => {
  void copy.then((t) => t.dispose()).catch(() => undefined);
});
/** Identity sessions by dtype and rank, whose `gpu-buffer` outputs are the uploads. */
const uploaders = new Map<string, Promise<ort.InferenceSession>>();

function uploader(dtype: DType, rank: number): Promise<ort.InferenceSession> {
  const key = `${dtype}/${rank}`;
  let s = uploaders.get(key);
  if (s === undefined) {
    const g = new Ops('upload');
    const dims = Array.from({ length: rank }, (_, i) => `d${i}`);
    const x = g.input('x', dtype, dims);
    g.output(g.identity(x), 'y', dtype, dims);
    const bytes = serializeModel(g.finish(), () => {
      throw new Error('the upload graph has no parameters');
    });
    s = ort.InferenceSession.create(bytes, { executionProviders: ['webgpu'], preferredOutputLocation: 'gpu-buffer', logSeverityLevel: 4 });
    uploaders.set(key, s);
    s.catch(() => uploaders.delete(key));
  }
  return s;
}

/** `t` on the WebGPU device (uploaded on first use, then reused). */
function onDevice(name: string, t: Tensor): Promise<ort.Tensor> {
  let copy = deviceCopies.get(t);
  if (copy === undefined) {
    copy = (async () => {
      const s = await uploader(t.dtype, t.shape.length);
      const out = (await s.run({ x: toOrt(name, t) })).y as ort.Tensor;
      if (out.location !== 'gpu-buffer') throw new ModelError('RUNTIME', `input ${name}: the upload did not stay on the device (${out.location})`, { input: name });
      return out;
    })();
    deviceCopies.set(t, copy);
    releaseCopy.register(t, copy);
  }
  return copy;
}

/** Upload tensors to the WebGPU device ahead of their first run (for timing; `run` does it itself). */
export async function uploadToDevice(tensors: Readonly<Record<string, Tensor>>): Promise<void> {
  await Promise.all(Object.entries(tensors).map(([k, v]) => onDevice(k, v)));
}

/** The ONNX Runtime version in use (for benchmarks and reports). */
export function ortVersion(): string {
  return ort.env.versions.node ?? 'unknown';
}
