/**
 * Argument parsing shared by the CLI commands: `node:util` parseArgs with the common model options,
 * and a usage error type. CLI arguments are user input: every value is checked here.
 */
import { parseArgs, type ParseArgsConfig } from 'node:util';
import { DEVICES, type Device, type EngineOptions } from '../models/index.ts';
import { memorySizeBytes } from '../pipelines/index.ts';

export class UsageError extends Error {}

export const MODEL_OPTIONS = {
  model: { type: 'string' },
  device: { type: 'string' },
  config: { type: 'string' },
  tokenizer: { type: 'string' },
  cache: { type: 'string' },
  threads: { type: 'string' },
} as const satisfies ParseArgsConfig['options'];

/**
 * `--seed -1` is how people write a negative value; parseArgs reads `-1` as an option, so such a
 * pair is joined into `--seed=-1` first.
 */
function joinNegativeValues(argv: readonly string[], options: NonNullable<ParseArgsConfig['options']>): string[] {
  const out: string[] = [];
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i]!;
    const next = argv[i + 1];
    const name = arg.startsWith('--') && !arg.includes('=') ? arg.slice(2) : undefined;
    if (name !== undefined && options[name]?.type === 'string' && next !== undefined && /^-\d/.test(next)) {
      out.push(`${arg}=${next}`);
      i++;
    } else {
      out.push(arg);
    }
  }
  return out;
}

export function parse<O extends NonNullable<ParseArgsConfig['options']>>(argv: readonly string[], options: O) {
  try {
    return parseArgs({ args: joinNegativeValues(argv, options), options, allowPositionals: true, strict: true });
  } catch (e) {
    throw new UsageError((e as Error).message);
  }
}

export function parseDevice(value: string | undefined): Device {
  if (value === undefined) return 'auto';
  if (!(DEVICES as readonly string[]).includes(value)) throw new UsageError(`--device must be one of ${DEVICES.join(', ')}, got "${value}"`);
  return value as Device;
}

export function engineOptions(values: { device?: string; config?: string; tokenizer?: string; cache?: string; threads?: string }): EngineOptions {
  const threads = values.threads === undefined ? undefined : Number(values.threads);
  if (threads !== undefined && (!Number.isInteger(threads) || threads < 1)) throw new UsageError(`--threads must be a positive integer, got "${values.threads}"`);
  return {
    device: parseDevice(values.device),
    ...(values.config === undefined ? {} : { configDir: values.config }),
    ...(values.tokenizer === undefined ? {} : { tokenizerDir: values.tokenizer }),
    ...(values.cache === undefined ? {} : { cacheDir: values.cache }),
    ...(threads === undefined ? {} : { threads }),
  };
}

/** A memory size as people write it (`memorySizeBytes`), or a UsageError naming the flag. */
export function parseMemorySize(flag: string, value: string): number {
  const bytes = memorySizeBytes(value);
  if (bytes === undefined) throw new UsageError(`${flag} must be a memory size of at least 1G, such as 16G, 12GiB or 12000M; got "${value}"`);
  return bytes;
}

export function requireValue(value: string | undefined, flag: string): string {
  if (value === undefined || value === '') throw new UsageError(`${flag} is required`);
  return value;
}
