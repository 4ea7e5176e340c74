/**
 * Device capability decisions, as pure functions of what was detected (no ONNX Runtime here; the
 * detection itself is in `runtime.ts`):
 *
 * - `choosePrecision`: fp16 weights where the device has WebGPU's `shader-f16` feature (or is a
 *   CUDA / DirectML / CoreML GPU), fp32 everywhere else, with the reason.
 * - `checkAdapterLimits`: the model's largest tensor against the adapter's buffer limits, with a
 *   ModelError that says what does not fit and what happens instead.
 * - `softwareVulkanDrivers`: whether the Vulkan drivers a process would load are all software
 *   renderers (SwiftShader, lavapipe/llvmpipe), so `auto` does not pick a renderer that is far
 *   slower than the CPU provider.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { ModelError } from './errors.ts';
import type { ConcreteDevice } from './runtime.ts';

export type Precision = 'fp32' | 'fp16';

/** What is known of a WebGPU adapter (features and limits as WebGPU names them). */
export interface AdapterCapabilities {
  readonly features: readonly string[];
  /** Absent when the runtime cannot report them (ONNX Runtime's Node binding does not). */
  readonly limits?: { readonly maxBufferSize?: number; readonly maxStorageBufferBindingSize?: number };
}

export interface PrecisionChoice {
  readonly precision: Precision;
  readonly reason: string;
}

/**
 * The weight precision for a device. `requested` is the user's wish (`auto` by default). fp16 is
 * only ever chosen for weights; softmax, norms and attention maps stay fp32 (see the engine).
 */
export function choosePrecision(device: ConcreteDevice, adapter: AdapterCapabilities | undefined, requested: 'auto' | Precision = 'auto'): PrecisionChoice {
  if (requested === 'fp32') return { precision: 'fp32', reason: 'fp32: as requested' };
  if (device === 'cpu') return { precision: 'fp32', reason: requested === 'fp16' ? 'fp32: the CPU provider computes in fp32 (fp16 weights would only lose accuracy)' : 'fp32: the CPU provider' };
  if (device === 'webgpu') {
    if (adapter === undefined) return { precision: 'fp32', reason: 'fp32: the WebGPU adapter was not probed' };
    if (!adapter.features.includes('shader-f16')) return { precision: 'fp32', reason: 'fp32: the WebGPU adapter has no shader-f16' };
    return { precision: 'fp16', reason: requested === 'fp16' ? 'fp16: as requested (the adapter has shader-f16)' : 'fp16: the WebGPU adapter has shader-f16' };
  }
  // CUDA, DirectML and CoreML GPUs all run fp16.
  return { precision: 'fp16', reason: `fp16: ${device} runs fp16 natively` };
}

const MIB = 1024 * 1024;
const fmt = (bytes: number) => (bytes >= 1024 * MIB ? `${(bytes / (1024 * MIB)).toFixed(2)} GiB` : `${(bytes / MIB).toFixed(1)} MiB`);

/** One tensor a graph needs on the device: an initializer or an intermediate, by name and size. */
export interface TensorSize {
  readonly name: string;
  readonly bytes: number;
}

/**
 * Check the largest tensor against the adapter's limits (a storage buffer binding holds one tensor).
 * Returns undefined when it fits or the limits are unknown; else the ModelError (code
 * `DEVICE_LIMITS`) to report, whose message names the tensor, its size, the limit and the fallback.
 */
export function checkAdapterLimits(what: string, tensors: readonly TensorSize[], adapter: AdapterCapabilities | undefined, fallback: ConcreteDevice = 'cpu'): ModelError | undefined {
  const limits = adapter?.limits;
  if (limits === undefined || tensors.length === 0) return undefined;
  const largest = tensors.reduce((a, b) => (b.bytes > a.bytes ? b : a));
  const checks: [string, number | undefined][] = [
    ['maxStorageBufferBindingSize', limits.maxStorageBufferBindingSize],
    ['maxBufferSize', limits.maxBufferSize],
  ];
  for (const [limit, value] of checks) {
    if (value !== undefined && largest.bytes > value) {
      return new ModelError(
        'DEVICE_LIMITS',
        `${what} does not fit this WebGPU adapter: ${largest.name} needs ${fmt(largest.bytes)} in one buffer, over the adapter's ${limit} of ${fmt(value)}; running on ${fallback} instead.`,
        { tensor: largest.name, bytes: largest.bytes, limit, value, fallback },
      );
    }
  }
  return undefined;
}

const SOFTWARE_VULKAN = /swiftshader|lvp|lavapipe|llvmpipe/i;
const ICD_DIRS = ['/etc/vulkan/icd.d', '/usr/share/vulkan/icd.d', '/usr/local/share/vulkan/icd.d'];

/**
 * On Linux, Dawn reaches the GPU through the Vulkan loader, which loads the drivers listed by
 * `VK_ICD_FILENAMES` / `VK_DRIVER_FILES` or else every ICD manifest in the standard folders. When
 * every one of them is a software renderer, a WebGPU adapter is a CPU emulation. Returns the
 * software drivers' names then, else undefined (no ICD, or at least one hardware driver).
 */
export function softwareVulkanDrivers(env: NodeJS.ProcessEnv = process.env, dirs: readonly string[] = ICD_DIRS): string | undefined {
  const listed = env.VK_DRIVER_FILES ?? env.VK_ICD_FILENAMES;
  let manifests: string[];
  if (listed !== undefined && listed !== '') manifests = listed.split(path.delimiter).filter((f) => f !== '');
  else {
    manifests = [];
    for (const dir of dirs) {
      try {
        for (const f of fs.readdirSync(dir)) if (f.endsWith('.json')) manifests.push(path.join(dir, f));
      } catch {
        // A missing folder lists nothing.
      }
    }
  }
  if (manifests.length === 0) return undefined;
  const names: string[] = [];
  for (const m of manifests) {
    let library = m;
    try {
      library = String((JSON.parse(fs.readFileSync(m, 'utf-8')) as { ICD?: { library_path?: string } }).ICD?.library_path ?? m);
    } catch {
      // Unreadable: judge by the manifest's own name.
    }
    const hit = SOFTWARE_VULKAN.exec(`${path.basename(m)} ${path.basename(library)}`);
    if (hit === null) return undefined;
    names.push(/swiftshader/i.test(hit[0]) ? 'SwiftShader' : 'lavapipe');
  }
  return [...new Set(names)].join(', ');
}
