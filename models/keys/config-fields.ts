/**
 * Readers for the few fields of a diffusers/transformers `config.json` that the key maps need.
 *
 * Configs are untrusted input: each reader validates one field and throws a `ModelError` naming the
 * config and the field. A missing field takes the default the reference implementation has, as the
 * real SD 1.5 files rely on (they omit `transformer_layers_per_block`, `mid_block_type`, …).
 *
 * - `BAD_CONFIG`: the value has the wrong type or range (not a diffusers config we can read).
 * - `UNSUPPORTED_ARCHITECTURE`: a valid diffusers value for a model the LDM layout here does not cover
 *   (another block type, class embeddings, …).
 */
import { ModelError } from '../errors.ts';

/** A config object with the name used in messages (a file path or e.g. `UNet config`). */
export interface ConfigFields {
  readonly source: string;
  readonly fields: Readonly<Record<string, unknown>>;
}

const FOUND_PREVIEW_CHARS = 80;

function describeValue(value: unknown): string {
  if (value === undefined) return 'nothing';
  const json = JSON.stringify(value) ?? String(value);
  return json.length > FOUND_PREVIEW_CHARS ? `${json.slice(0, FOUND_PREVIEW_CHARS)}…` : json;
}

/** Throws BAD_CONFIG unless `raw` is a plain JSON object. */
export function configFields(raw: unknown, source: string): ConfigFields {
  if (typeof raw !== 'object' || raw === null || Array.isArray(raw)) {
    throw new ModelError(
      'BAD_CONFIG',
      `${source}: expected a JSON object (the parsed config.json); found ${Array.isArray(raw) ? 'an array' : describeValue(raw)}.`,
      { source, field: '(root)', expected: 'object', found: raw },
    );
  }
  return { source, fields: raw as Record<string, unknown> };
}

/** Throws BAD_CONFIG for `field`, saying what was expected and what was found. */
export function badConfig(config: ConfigFields, field: string, expected: string, found: unknown): never {
  throw new ModelError(
    'BAD_CONFIG',
    `${config.source}: "${field}" must be ${expected}; found ${describeValue(found)}. Fix the config file or re-download the model.`,
    { source: config.source, field, expected, found },
  );
}

/** Throws UNSUPPORTED_ARCHITECTURE for `field`. */
export function unsupported(config: ConfigFields, field: string, found: unknown, supported: string): never {
  throw new ModelError(
    'UNSUPPORTED_ARCHITECTURE',
    `${config.source}: "${field}" is ${describeValue(found)}; Chorus supports ${supported}.`,
    { source: config.source, field, found, supported },
  );
}

function isPositiveInt(value: unknown): value is number {
  return typeof value === 'number' && Number.isInteger(value) && value > 0;
}

export function readPositiveInt(config: ConfigFields, field: string, fallback: number): number {
  const value = config.fields[field];
  if (value === undefined) return fallback;
  if (!isPositiveInt(value)) badConfig(config, field, 'a positive integer', value);
  return value;
}

export function readPositiveIntList(config: ConfigFields, field: string, fallback: readonly number[]): readonly number[] {
  const value = config.fields[field];
  if (value === undefined) return fallback;
  if (!Array.isArray(value) || value.length === 0 || !value.every(isPositiveInt)) {
    badConfig(config, field, 'a non-empty list of positive integers', value);
  }
  return value;
}

/**
 * A field diffusers accepts as one integer for every block or as a list with one integer per block
 * (`layers_per_block`, `transformer_layers_per_block`). Returns the per-block list.
 */
export function readPerBlockInt(config: ConfigFields, field: string, fallback: number, blockCount: number): readonly number[] {
  const value = config.fields[field];
  if (value === undefined) return Array.from({ length: blockCount }, () => fallback);
  if (isPositiveInt(value)) return Array.from({ length: blockCount }, () => value);
  if (Array.isArray(value) && value.length === blockCount && value.every(isPositiveInt)) return value;
  return badConfig(config, field, `a positive integer or a list of ${blockCount} positive integers (one per block)`, value);
}

export function readBoolean(config: ConfigFields, field: string, fallback: boolean): boolean {
  const value = config.fields[field];
  if (value === undefined) return fallback;
  if (typeof value !== 'boolean') badConfig(config, field, 'true or false', value);
  return value;
}

/**
 * A list of class names (`down_block_types`) with `expectedLength` entries. A non-string entry is
 * BAD_CONFIG; a string (or null) outside `supported` is UNSUPPORTED_ARCHITECTURE.
 */
export function readBlockTypes<T extends string>(
  config: ConfigFields,
  field: string,
  fallback: readonly T[],
  supported: readonly T[],
  expectedLength: { readonly count: number; readonly of: string },
): readonly T[] {
  const value = config.fields[field] ?? fallback;
  if (!Array.isArray(value)) badConfig(config, field, `a list of block class names`, value);
  if (value.length !== expectedLength.count) {
    badConfig(config, field, `a list with one entry per "${expectedLength.of}" entry (${expectedLength.count})`, value);
  }
  return value.map((entry: unknown, i): T => {
    if (entry !== null && typeof entry !== 'string') badConfig(config, `${field}[${i}]`, 'a block class name', entry);
    if (!supported.includes(entry as T)) unsupported(config, `${field}[${i}]`, entry, `only ${supported.join(' and ')} here`);
    return entry as T;
  });
}

/** A single class name (`mid_block_type`); outside `supported` (including null) is UNSUPPORTED_ARCHITECTURE. */
export function readClassName<T extends string>(config: ConfigFields, field: string, fallback: T, supported: readonly T[]): T {
  const value = config.fields[field];
  if (value === undefined) return fallback;
  if (value !== null && typeof value !== 'string') badConfig(config, field, 'a class name', value);
  if (!supported.includes(value as T)) unsupported(config, field, value, `only ${supported.join(' and ')} here`);
  return value as T;
}

/**
 * A diffusers option that adds modules the LDM map does not cover (`class_embed_type`, …): it must
 * be absent or null.
 */
export function requireAbsent(config: ConfigFields, field: string, supported: string): void {
  const value = config.fields[field];
  if (value !== undefined && value !== null) unsupported(config, field, value, supported);
}
