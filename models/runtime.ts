/**
 * ONNX Runtime sessions. The only module that imports `onnxruntime-node`.
 *
 * Execution providers are chosen here and nowhere else: the user may force one (`--device`), or
 * `auto` tries, in order, the platform's GPU provider (DirectML on Windows, CoreML on macOS, CUDA on
 * Linux when its libraries were installed with `npm run install-cuda`), then the CPU. A provider
 * that fails to create a session is recorded with its error and the next one is tried, so a
 * machine without a GPU still runs, and `choice.reason` says why.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { createRequire } from 'node:module';
import * as ort from 'onnxruntime-node';
import { ModelError } from './errors.ts';
import type { DType, Tensor } from './tensor.ts';

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

/** The providers `device` means on this platform, most preferred first; the CPU is always last. */
export function providerCandidates(device: Device, platform: NodeJS.Platform = process.platform): ConcreteDevice[] {
  if (device === 'cpu') return ['cpu'];
  if (device !== 'auto') return [device, 'cpu'];
  const gpu: ConcreteDevice[] = [];
  if (platform === 'win32') gpu.push('dml');
  if (platform === 'darwin') gpu.push('coreml');
  if (platform === 'linux' && cudaInstalled()) gpu.push('cuda');
  return [...gpu, 'cpu'];
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
}

/** One ONNX Runtime session with typed run(). `dispose()` when done. */
export class OrtSession {
  readonly choice: ProviderChoice;
  readonly inputNames: readonly string[];
  readonly outputNames: readonly string[];
  #session: ort.InferenceSession | undefined;

  private constructor(session: ort.InferenceSession, choice: ProviderChoice) {
    this.#session = session;
    this.choice = choice;
    this.inputNames = session.inputNames;
    this.outputNames = session.outputNames;
  }

  /** Create a session from a model file (external data resolves beside it) or model bytes. */
  static async create(model: string | Uint8Array, options: SessionCreateOptions = {}): Promise<OrtSession> {
    const device = options.device ?? 'auto';
    const tried: { device: ConcreteDevice; error: string }[] = [];
    for (const candidate of providerCandidates(device)) {
      if (candidate === 'cuda' && !cudaInstalled()) {
        tried.push({ device: candidate, error: 'the CUDA provider is not installed (npm run install-cuda)' });
        continue;
      }
      const sessionOptions: ort.InferenceSession.SessionOptions = {
        executionProviders: [candidate],
        graphOptimizationLevel: 'all',
        // A provider that cannot start is reported through `choice.tried`; keep ORT's own log quiet about it.
        ...(candidate === 'cpu' ? {} : { logSeverityLevel: 4 as const }),
        ...(options.threads === undefined ? {} : { intraOpNumThreads: options.threads }),
      };
      try {
        const session = typeof model === 'string' ? await ort.InferenceSession.create(model, sessionOptions) : await ort.InferenceSession.create(model, sessionOptions);
        const reason =
          tried.length === 0
            ? device === 'auto'
              ? `${candidate}: the first provider available on ${process.platform}`
              : `${candidate}: as requested`
            : `${candidate}: ${tried.map((t) => `${t.device} failed (${t.error})`).join('; ')}`;
        return new OrtSession(session, { device: candidate, reason, tried });
      } catch (e) {
        tried.push({ device: candidate, error: (e as Error).message.split('\n')[0] ?? String(e) });
      }
    }
    const where = typeof model === 'string' ? model : 'in-memory model';
    throw new ModelError('RUNTIME', `${where}: no execution provider could create a session: ${tried.map((t) => `${t.device}: ${t.error}`).join('; ')}`, { tried });
  }

  /** Run; `fetch` limits the outputs computed. */
  async run(feeds: Readonly<Record<string, Tensor>>, fetch?: readonly string[]): Promise<Record<string, Tensor>> {
    const session = this.#session;
    if (session === undefined) throw new Error('OrtSession.run after dispose');
    const ortFeeds: Record<string, ort.Tensor> = {};
    for (const [k, v] of Object.entries(feeds)) ortFeeds[k] = toOrt(k, v);
    let results: ort.InferenceSession.ReturnType;
    try {
      results = fetch === undefined ? await session.run(ortFeeds) : await session.run(ortFeeds, [...fetch]);
    } catch (e) {
      throw new ModelError('RUNTIME', `inference failed: ${(e as Error).message}`, { inputs: Object.keys(feeds).length });
    }
    const out: Record<string, Tensor> = {};
    for (const [k, v] of Object.entries(results)) out[k] = fromOrt(v);
    return out;
  }

  async dispose(): Promise<void> {
    const s = this.#session;
    this.#session = undefined;
    if (s !== undefined) await s.release();
  }
}

/** The ONNX Runtime version in use (for benchmarks and reports). */
export function ortVersion(): string {
  return ort.env.versions.node ?? 'unknown';
}
