/**
 * What every benchmark line carries so figures can be compared across machines and versions
 * (STYLE §11): runtime version, dtype, threads, CPU, Node. The execution provider is added by the
 * process that created the session, since only it knows what ONNX Runtime actually chose.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import { ortVersion } from '../models/index.ts';

/** CPU feature flags that decide which MLAS kernels ONNX Runtime uses on x86. */
const SIMD_FLAGS = ['avx', 'avx2', 'fma', 'f16c', 'avx512f', 'avx512bw', 'avx512_vnni', 'avx512_bf16', 'amx_tile', 'asimd', 'sve'];

export interface RunConditions {
  readonly ortVersion: string;
  readonly dtype: 'float32';
  readonly threads: number;
  readonly cpu: string;
  readonly cpuCores: number;
  readonly cpuFlags: readonly string[];
  readonly memGiB: number;
  readonly node: string;
  readonly platform: string;
}

function readCpuInfo(): { model: string | undefined; flags: string[] } {
  try {
    const text = fs.readFileSync('/proc/cpuinfo', 'utf-8');
    const model = /^model name\s*:\s*(.+)$/m.exec(text)?.[1]?.trim();
    const flagLine = /^(?:flags|Features)\s*:\s*(.+)$/m.exec(text)?.[1] ?? '';
    const present = new Set(flagLine.split(/\s+/));
    return { model, flags: SIMD_FLAGS.filter((f) => present.has(f)) };
  } catch {
    // Not Linux: os.cpus() still names the model; flags are unknown.
    return { model: undefined, flags: [] };
  }
}

export function runConditions(threads: number): RunConditions {
  const info = readCpuInfo();
  return {
    ortVersion: ortVersion(),
    dtype: 'float32',
    threads,
    cpu: info.model ?? os.cpus()[0]?.model ?? 'unknown',
    cpuCores: os.availableParallelism(),
    cpuFlags: info.flags,
    memGiB: Math.round((os.totalmem() / 2 ** 30) * 10) / 10,
    node: process.version,
    platform: `${process.platform}-${process.arch}`,
  };
}

/** The machine's 1-minute load average (2 decimals). */
export function loadAvg1m(): number {
  return Math.round((os.loadavg()[0] ?? 0) * 100) / 100;
}

/** Current resident set size in MiB. */
export function rssMiB(): number {
  return Math.round((process.memoryUsage.rss() / 2 ** 20) * 10) / 10;
}

/** Peak resident set size of this process so far, in MiB (getrusage ru_maxrss). */
export function maxRssMiB(): number {
  return Math.round((process.resourceUsage().maxRSS / 1024) * 10) / 10;
}
