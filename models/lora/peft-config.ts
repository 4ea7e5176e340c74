/**
 * PEFT's LoRA scale, which is not in the tensors: scale = lora_alpha / r (or lora_alpha / √r with
 * `use_rslora`), from the adapter's `LoraConfig`.
 *
 * Where the config is (first found wins):
 * 1. the safetensors `__metadata__` key `lora_adapter_metadata` (diffusers ≥ 0.34 `save_lora_adapter` /
 *    `save_lora_weights`): JSON of `LoraConfig.to_dict()`; pipeline-level files prefix each field with the
 *    component (`unet.lora_alpha`, `text_encoder.r`, diffusers `_pack_dict_with_prefix`);
 * 2. `adapter_config.json` beside the file (`peft.save_pretrained` writes it next to `adapter_model.safetensors`).
 * Without either, alpha = rank (scale 1), as for every file without alphas.
 *
 * `alpha_pattern` maps module-name patterns to alphas; PEFT matches a pattern `p` against a module name
 * with `(.*\.)?(p)$` (peft `utils/other.py get_pattern_key`), and so does this.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { loraError } from './adapters/common.ts';
import type { LoraComponent } from './types.ts';

export const LORA_ADAPTER_METADATA_KEY = 'lora_adapter_metadata';
export const PEFT_CONFIG_FILE = 'adapter_config.json';

interface ComponentConfig {
  readonly loraAlpha: number | undefined;
  readonly useRslora: boolean;
  readonly alphaPattern: ReadonlyArray<readonly [RegExp, number]>;
}

export interface PeftConfig {
  /** Where it was read from, for reports. */
  readonly origin: string;
  /** alpha / r (or / √r) for a module of `rank`; undefined when the config gives no alpha for it. */
  scaleFor(component: LoraComponent, module: string, rank: number): number | undefined;
}

type Json = Record<string, unknown>;

function isObject(v: unknown): v is Json {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function parseComponent(raw: Json, origin: string, source: string): ComponentConfig {
  const bad = (field: string, expected: string): never => {
    throw loraError('BAD_CONFIG', source, `${origin}: \`${field}\` should be ${expected}, found ${JSON.stringify(raw[field])}.`, { config: origin, key: field });
  };
  const alpha = raw.lora_alpha;
  if (alpha !== undefined && alpha !== null && (typeof alpha !== 'number' || !Number.isFinite(alpha))) bad('lora_alpha', 'a number');
  const rslora = raw.use_rslora;
  if (rslora !== undefined && rslora !== null && typeof rslora !== 'boolean') bad('use_rslora', 'true or false');
  const patterns: [RegExp, number][] = [];
  const alphaPattern = raw.alpha_pattern;
  if (alphaPattern !== undefined && alphaPattern !== null) {
    if (!isObject(alphaPattern)) bad('alpha_pattern', 'an object of pattern → alpha');
    for (const [pattern, value] of Object.entries(alphaPattern as Json)) {
      if (typeof value !== 'number' || !Number.isFinite(value)) bad('alpha_pattern', 'an object of pattern → number');
      let re: RegExp;
      try {
        re = new RegExp(`^(?:.*\\.)?(?:${pattern})$`);
      } catch (e) {
        // A pattern PEFT's `re.match` would accept but JavaScript cannot compile: say which.
        throw loraError('BAD_CONFIG', source, `${origin}: alpha_pattern key \`${pattern}\` is not a valid pattern (${(e as Error).message}).`, { config: origin, key: pattern });
      }
      patterns.push([re, value as number]);
    }
  }
  return { loraAlpha: typeof alpha === 'number' ? alpha : undefined, useRslora: rslora === true, alphaPattern: patterns };
}

/** The config split by component: prefixed (`unet.lora_alpha`) or one config for all. */
function fromJson(raw: Json, origin: string, source: string): PeftConfig {
  const prefixes: readonly LoraComponent[] = ['unet', 'text_encoder'];
  const prefixed = Object.keys(raw).some((k) => prefixes.some((p) => k.startsWith(`${p}.`)));
  const perComponent = new Map<LoraComponent, ComponentConfig>();
  for (const component of prefixes) {
    let fields: Json = raw;
    if (prefixed) {
      fields = {};
      for (const [k, v] of Object.entries(raw)) if (k.startsWith(`${component}.`)) fields[k.slice(component.length + 1)] = v;
    }
    perComponent.set(component, parseComponent(fields, origin, source));
  }
  return {
    origin,
    scaleFor(component, module, rank) {
      const c = perComponent.get(component)!;
      const alpha = c.alphaPattern.find(([re]) => re.test(module))?.[1] ?? c.loraAlpha;
      if (alpha === undefined) return undefined;
      return alpha / (c.useRslora ? Math.sqrt(rank) : rank);
    },
  };
}

/**
 * The PEFT config for `file` (metadata first, then `adapter_config.json` beside it), or undefined.
 * Throws BAD_CONFIG when a config exists but cannot be read.
 */
export function readPeftConfig(file: string, metadata: Readonly<Record<string, string>>): PeftConfig | undefined {
  const embedded = metadata[LORA_ADAPTER_METADATA_KEY];
  if (embedded !== undefined) return fromJson(parseJson(embedded, `metadata \`${LORA_ADAPTER_METADATA_KEY}\``, file), `metadata \`${LORA_ADAPTER_METADATA_KEY}\``, file);
  const beside = path.join(path.dirname(file), PEFT_CONFIG_FILE);
  if (!fs.existsSync(beside)) return undefined;
  return fromJson(parseJson(fs.readFileSync(beside, 'utf8'), beside, file), beside, file);
}

function parseJson(text: string, origin: string, source: string): Json {
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch (e) {
    throw loraError('BAD_CONFIG', source, `${origin} is not valid JSON (${(e as Error).message}).`, { config: origin });
  }
  if (!isObject(value)) throw loraError('BAD_CONFIG', source, `${origin} is not a JSON object.`, { config: origin });
  return value;
}
