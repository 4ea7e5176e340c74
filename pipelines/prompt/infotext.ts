/**
 * A1111's "parameters" text (the infotext), written and read like stable-diffusion-webui v1.10
 * (`create_infotext` in `modules/processing.py`, `parse_generation_parameters` and `quote`/`unquote`
 * in `modules/infotext_utils.py`, `modules/infotext_versions.py`, `get_sampler_and_scheduler` in
 * `modules/sd_samplers.py`, the Lora extension's `Lora hashes`). Layout (CONVENTIONS.md 2.1):
 *
 * ```
 * <prompt, may span lines>
 * Negative prompt: <negative prompt, may span lines>      ← omitted when the negative is empty
 * Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x512, …, Version: v1.10.1
 * ```
 */
import { PipelineError } from '../errors.ts';
import { parsePromptAttention } from './a1111.ts';
import { isPySpace, isPyWordAt, pyFloat, pyInt, pyNumberText, pyStrip } from './python-text.ts';

/** A parameter value: A1111 writes Python `str()` of it (numbers as `int`/`float`, booleans as `True`/`False`). */
export type InfotextValue = string | number | boolean;

export interface LoraHash {
  /** The name as mentioned in the prompt (A1111 drops `:` and `,` from it when writing). */
  readonly name: string;
  /** A1111's short hash: the first 12 hex digits of the sha256 of the bytes after the safetensors header. */
  readonly hash: string;
}

export interface InfotextParams {
  readonly prompt: string;
  /** Written as a `Negative prompt:` line unless empty. */
  readonly negativePrompt: string;
  readonly steps: number;
  /** Sampler name as A1111 spells it (`DPM++ 2M`, `Euler a`). */
  readonly sampler: string;
  /** Scheduler label (`Karras`, `Automatic`); the `Schedule type` field is left out when unset. */
  readonly scheduleType?: string;
  readonly cfgScale: number;
  /** A bigint for seeds beyond 2^53 (written exactly). */
  readonly seed: number | bigint;
  readonly width: number;
  readonly height: number;
  readonly modelHash?: string;
  readonly model?: string;
  /** A1111 clip skip (1 = last layer); written only when > 1. */
  readonly clipSkip?: number;
  /** Noise source (`GPU`, `CPU`, `NV`); written only when not `GPU`. */
  readonly rng?: string;
  readonly loraHashes?: readonly LoraHash[];
  /**
   * Further `key: value` fields (`Denoising strength`, `Hires upscale`, `TI hashes`, `Emphasis`,
   * extension fields), in order. A key that A1111 places at a fixed position (`VAE`, `Denoising
   * strength`, `ENSD`, … see `A1111_FIELD_ORDER`) goes there, like A1111's dict does; the others
   * come after `Lora hashes`. To write an extra field before `Lora hashes`, pass the `Lora hashes`
   * entry yourself (`formatLoraHashes`) here instead of `loraHashes`.
   */
  readonly extra?: ReadonlyArray<readonly [string, InfotextValue]>;
  /** Written last, e.g. `v1.10.1`. */
  readonly version?: string;
}

/**
 * The keys of A1111's `create_infotext` dict in order; `extra_generation_params` go between
 * `Tiling` and `Version` (then `User`).
 */
export const A1111_FIELD_ORDER = [
  'Steps', 'Sampler', 'Schedule type', 'CFG scale', 'Image CFG scale', 'Seed', 'Face restoration', 'Size', 'Model hash', 'Model',
  'FP8 weight', 'Cache FP16 weight for LoRA', 'VAE hash', 'VAE', 'Variation seed', 'Variation seed strength', 'Seed resize from',
  'Denoising strength', 'Conditional mask weight', 'Clip skip', 'ENSD', 'Token merging ratio', 'Token merging ratio hr',
  'Init image hash', 'RNG', 'NGMS', 'Tiling',
] as const;

const LORA_HASHES_KEY = 'Lora hashes';
/** A1111 writes `User` after `Version`. */
const USER_KEY = 'User';
const NEGATIVE_PREFIX = 'Negative prompt:';
/** Keys `InfotextParams` types itself; an `extra` entry may not repeat them. */
const TYPED_KEYS: ReadonlySet<string> = new Set(['Steps', 'Sampler', 'Schedule type', 'CFG scale', 'Seed', 'Size', 'Model hash', 'Model', 'Clip skip', 'RNG', LORA_HASHES_KEY, 'Version']);
/** What A1111's parser can read back as a key: `\w[\w \-/]+`. */
const KEY_SYNTAX = /^[\p{L}\p{N}_][\p{L}\p{N}_ \-/]+$/u;

/** Python `str(value)` as `create_infotext` formats it. */
export function infotextValueText(value: InfotextValue): string {
  if (typeof value === 'boolean') return value ? 'True' : 'False';
  if (typeof value === 'number') return pyNumberText(value);
  return value;
}

/** A1111 `quote()`: a value with `,`, `:` or a newline is written as a JSON string (`ensure_ascii=False`). */
export function quoteInfotextValue(text: string): string {
  if (!text.includes(',') && !text.includes('\n') && !text.includes(':')) return text;
  return JSON.stringify(text);
}

/** The `Lora hashes` value: `name: hash` pairs joined by `, `, with `:` and `,` removed from names as A1111 does. */
export function formatLoraHashes(hashes: readonly LoraHash[]): string {
  return hashes.map((h) => `${h.name.replaceAll(':', '').replaceAll(',', '')}: ${h.hash}`).join(', ');
}

/**
 * The infotext for `p`, laid out exactly as A1111 `create_infotext` does: the prompt, the
 * `Negative prompt:` line when the negative is not empty, then the fields in A1111's order joined by
 * `, ` (a field whose value equals its key is written as the bare key), each value through
 * `quoteInfotextValue`; the whole text `str.strip()`ped.
 *
 * Throws `PipelineError('BAD_ARGUMENT')` naming the field for a non-integer or non-positive
 * `steps`/`width`/`height`/`clipSkip`, a non-integer `seed`, a non-finite `cfgScale`, an `extra` key
 * that repeats a typed field or another extra key, or a key A1111 could not read back.
 */
export function formatInfotext(p: InfotextParams): string {
  checkWhole('steps', p.steps, 1);
  checkWhole('width', p.width, 1);
  checkWhole('height', p.height, 1);
  if (typeof p.seed !== 'bigint') checkWhole('seed', p.seed, Number.MIN_SAFE_INTEGER);
  if (p.clipSkip !== undefined) checkWhole('clipSkip', p.clipSkip, 1);
  if (!Number.isFinite(p.cfgScale)) badArgument('cfgScale', p.cfgScale, 'a finite number');

  const fields = new Map<string, InfotextValue>();
  fields.set('Steps', p.steps);
  fields.set('Sampler', p.sampler);
  if (p.scheduleType !== undefined) fields.set('Schedule type', p.scheduleType);
  fields.set('CFG scale', p.cfgScale);
  fields.set('Seed', typeof p.seed === 'bigint' ? p.seed.toString() : p.seed);
  fields.set('Size', `${p.width}x${p.height}`);
  if (p.modelHash !== undefined) fields.set('Model hash', p.modelHash);
  if (p.model !== undefined) fields.set('Model', p.model);
  if (p.clipSkip !== undefined && p.clipSkip > 1) fields.set('Clip skip', p.clipSkip);
  if (p.rng !== undefined && p.rng !== 'GPU') fields.set('RNG', p.rng);

  const extra = new Map<string, InfotextValue>();
  for (const [key, value] of p.extra ?? []) {
    if (!KEY_SYNTAX.test(key)) badArgument('extra', key, 'a key of two or more letters, digits, `_`, spaces, `-` or `/`, starting with a letter, digit or `_`');
    if (extra.has(key) || (TYPED_KEYS.has(key) && !(key === LORA_HASHES_KEY && p.loraHashes === undefined))) {
      badArgument('extra', key, 'a key not given twice and not one of the typed fields');
    }
    extra.set(key, value);
  }

  const ordered: Array<[string, InfotextValue]> = [];
  for (const key of A1111_FIELD_ORDER) {
    const value = fields.get(key) ?? extra.get(key);
    if (value !== undefined) ordered.push([key, value]);
    extra.delete(key);
  }
  if (p.loraHashes !== undefined && p.loraHashes.length > 0) ordered.push([LORA_HASHES_KEY, formatLoraHashes(p.loraHashes)]);
  for (const [key, value] of extra) if (key !== USER_KEY) ordered.push([key, value]);
  if (p.version !== undefined) ordered.push(['Version', p.version]);
  const user = extra.get(USER_KEY);
  if (user !== undefined) ordered.push([USER_KEY, user]);

  const line = ordered
    .map(([key, value]) => {
      const text = infotextValueText(value);
      return key === text ? key : `${key}: ${quoteInfotextValue(text)}`;
    })
    .join(', ');
  const negative = p.negativePrompt === '' ? '' : `\n${NEGATIVE_PREFIX} ${p.negativePrompt}`;
  return pyStrip(`${p.prompt}${negative}\n${line}`);
}

function checkWhole(field: string, value: number, min: number): void {
  if (!Number.isSafeInteger(value) || value < min) badArgument(field, value, min === 1 ? 'a positive whole number' : 'a whole number');
}

function badArgument(field: string, value: unknown, expected: string): never {
  const shown = typeof value === 'string' ? JSON.stringify(value) : String(value);
  throw new PipelineError('BAD_ARGUMENT', `infotext field ${field}: expected ${expected}, got ${shown}.`, { field, value });
}

// ---------------------------------------------------------------------------------------------
// Reading
// ---------------------------------------------------------------------------------------------

export interface ParsedInfotext {
  /** A1111's `Prompt`: the lines before `Negative prompt:`, each `strip()`ped, joined with `\n`. */
  readonly prompt: string;
  readonly negativePrompt: string;
  /**
   * Every `key: value` of the parameter line, in order, a quoted value JSON-decoded (A1111's
   * `re_param` matches before any other processing; empty values included). `[]` when the last
   * line has fewer than 3 of them and so belongs to the prompt.
   */
  readonly pairs: ReadonlyArray<readonly [string, string]>;
  /**
   * A1111's `parse_generation_parameters` dict: the pairs (a later key wins but keeps its first
   * place; an empty value is dropped, as A1111's parser skips it; `WxH` values become `<key>-1` and
   * `<key>-2`), then `Prompt`, `Negative prompt`, the defaults (`Clip skip` "1", `RNG` "GPU",
   * `Schedule type` "Automatic", `Hires sampler` "Use same sampler", …), `Emphasis` "Original" when
   * the prompts use emphasis, and the version back-compat flags. Styles are not extracted (Chorus has
   * no style list) and the old-hires-fix width/height option is taken as off (A1111's default).
   */
  readonly fields: ReadonlyMap<string, InfotextValue>;
  readonly steps?: number;
  /** The sampler without a scheduler suffix (`DPM++ 2M Karras` → `DPM++ 2M`), see `splitSamplerName`. */
  readonly sampler?: string;
  /** The scheduler label: from the sampler suffix, else the `Schedule type` field, else `Automatic`. */
  readonly scheduleType: string;
  readonly cfgScale?: number;
  readonly seed?: number;
  readonly width?: number;
  readonly height?: number;
  readonly modelHash?: string;
  readonly model?: string;
  /** 1 when the field is missing (A1111's default). */
  readonly clipSkip?: number;
  /** `GPU` when the field is missing. */
  readonly rng: string;
  readonly loraHashes: readonly LoraHash[];
  /** The pairs other than the typed ones above, in order, values as text (`WxH` values not split). */
  readonly extra: ReadonlyArray<readonly [string, string]>;
  readonly version?: string;
}

export interface ParseInfotextOptions {
  /** A1111's `auto_backcompat` setting (default on): add the compatibility flags an old `Version` implies. */
  readonly autoBackcompat?: boolean;
}

/**
 * Reads an infotext like A1111 `parse_generation_parameters`: the text is stripped and split at
 * `\n`; the last line is the parameter line only if `re_param`
 * (`\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)`) matches at least 3 times in it; the lines
 * before one starting with `Negative prompt:` are the prompt, that line (minus the prefix) and the
 * rest the negative prompt. An unquoted value runs to the next comma, so an unquoted JSON value is
 * cut short exactly as A1111 cuts it. Never throws: what cannot be read as a number is left out of
 * the typed fields and stays in `fields`/`pairs`.
 */
export function parseInfotext(text: string, options: ParseInfotextOptions = {}): ParsedInfotext {
  const lines = pyStrip(text).split('\n');
  let lastLine = lines.pop()!;
  let pairs = findParams(lastLine);
  if (pairs.length < 3) {
    lines.push(lastLine);
    lastLine = '';
    pairs = [];
  }

  let prompt = '';
  let negativePrompt = '';
  let inNegative = false;
  for (const raw of lines) {
    let line = pyStrip(raw);
    if (line.startsWith(NEGATIVE_PREFIX)) {
      inNegative = true;
      line = pyStrip(line.slice(NEGATIVE_PREFIX.length));
    }
    if (inNegative) negativePrompt += (negativePrompt === '' ? '' : '\n') + line;
    else prompt += (prompt === '' ? '' : '\n') + line;
  }

  const fields = new Map<string, InfotextValue>();
  const unquoted = pairs.map(([key, value]): [string, string] => [key, unquoteInfotextValue(value)]);
  for (const [key, value] of unquoted) {
    if (value === '') continue;
    const size = IMAGE_SIZE.exec(value);
    if (size === null) {
      fields.set(key, value);
    } else {
      fields.set(`${key}-1`, size[1]!);
      fields.set(`${key}-2`, size[2]!);
    }
  }
  fields.set('Prompt', prompt);
  fields.set('Negative prompt', negativePrompt);
  fillDefaults(fields, prompt, negativePrompt);
  if (options.autoBackcompat ?? true) applyInfotextBackcompat(fields);

  const stringField = (key: string): string | undefined => {
    const v = fields.get(key);
    return typeof v === 'string' ? v : undefined;
  };
  const samplerText = stringField('Sampler');
  const split = samplerText === undefined ? undefined : splitSamplerName(samplerText, stringField('Schedule type'));

  const extraMap = new Map<string, string>();
  for (const [key, value] of unquoted) if (value !== '' && !TYPED_KEYS.has(key)) extraMap.set(key, value);

  return {
    prompt: stringField('Prompt') ?? prompt,
    negativePrompt,
    pairs: unquoted,
    fields,
    steps: wholeNumber(stringField('Steps')),
    sampler: split?.sampler,
    scheduleType: split?.scheduleType ?? stringField('Schedule type') ?? AUTOMATIC_LABEL,
    cfgScale: finiteNumber(stringField('CFG scale')),
    seed: wholeNumber(stringField('Seed')),
    width: wholeNumber(stringField('Size-1')),
    height: wholeNumber(stringField('Size-2')),
    modelHash: stringField('Model hash'),
    model: stringField('Model'),
    clipSkip: wholeNumber(stringField('Clip skip')),
    rng: stringField('RNG') ?? 'GPU',
    loraHashes: parseLoraHashes(stringField(LORA_HASHES_KEY) ?? ''),
    extra: [...extraMap],
    version: stringField('Version'),
  };
}

/** A1111 `unquote()`: a value that starts and ends with `"` is JSON-decoded; one that does not decode stays as is. */
export function unquoteInfotextValue(text: string): string {
  if (text.length === 0 || !text.startsWith('"') || !text.endsWith('"')) return text;
  try {
    const decoded: unknown = JSON.parse(text);
    return typeof decoded === 'string' ? decoded : text;
  } catch (e) {
    if (e instanceof SyntaxError) return text;
    throw e;
  }
}

/** A1111's `Lora hashes` reading: split at `,`, each item at its first `:`, both sides stripped; an item without `:` is skipped (A1111 fails on it). */
export function parseLoraHashes(value: string): LoraHash[] {
  const out: LoraHash[] = [];
  if (value === '') return out;
  for (const item of value.split(',')) {
    const trimmed = pyStrip(item);
    const colon = trimmed.indexOf(':');
    if (colon === -1) continue;
    out.push({ name: pyStrip(trimmed.slice(0, colon)), hash: pyStrip(trimmed.slice(colon + 1)) });
  }
  return out;
}

/** `re_imagesize`: `^(\d+)x(\d+)$` (Python `$` also matches before a final newline). */
const IMAGE_SIZE = /^(\p{Nd}+)x(\p{Nd}+)\n?$/u;

function wholeNumber(text: string | undefined): number | undefined {
  if (text === undefined) return undefined;
  const n = pyInt(text);
  if (n !== undefined) return n;
  const f = pyFloat(text);
  return f !== undefined && Number.isSafeInteger(f) ? f : undefined;
}

function finiteNumber(text: string | undefined): number | undefined {
  const f = text === undefined ? undefined : pyFloat(text);
  return f !== undefined && Number.isFinite(f) ? f : undefined;
}

/**
 * A1111's `re_param.findall(line)`, in linear time (the regex backtracks quadratically over a long
 * line without colons): at each position, optional spaces, a key `\w[\w \-/]+` directly followed
 * by `:`, optional spaces, then a quoted value `"…"` (backslash escapes) if a `,` or the line end
 * follows its closing quote, else everything up to the next `,`; the search goes on after the comma.
 * Values are returned as written (quotes included).
 */
function findParams(line: string): Array<[string, string]> {
  const n = line.length;
  // keyRunEnd[i]: end of the run of key characters [\w \-/] starting at i.
  const keyRunEnd = new Int32Array(n + 1);
  keyRunEnd[n] = n;
  for (let i = n - 1; i >= 0; i--) {
    const ch = line[i]!;
    keyRunEnd[i] = ch === ' ' || ch === '-' || ch === '/' || isPyWordAt(line, i) ? keyRunEnd[i + 1]! : i;
  }
  const pairs: Array<[string, string]> = [];
  let pos = 0;
  while (pos < n) {
    let keyStart = pos;
    while (keyStart < n && isPySpace(line[keyStart]!)) keyStart++;
    const firstEnd = keyStart + codePointLength(line, keyStart);
    const keyEnd = keyRunEnd[firstEnd] ?? n;
    if (keyStart < n && isPyWordAt(line, keyStart) && keyEnd > firstEnd && line[keyEnd] === ':') {
      let valueStart = keyEnd + 1;
      while (valueStart < n && isPySpace(line[valueStart]!)) valueStart++;
      const quotedEnd = quotedValueEnd(line, valueStart);
      let valueEnd: number;
      let matchEnd: number;
      if (quotedEnd !== undefined) {
        valueEnd = quotedEnd;
        matchEnd = quotedEnd === n ? n : quotedEnd + 1;
      } else {
        const comma = line.indexOf(',', valueStart);
        valueEnd = comma === -1 ? n : comma;
        matchEnd = comma === -1 ? n : comma + 1;
      }
      pairs.push([line.slice(keyStart, keyEnd), line.slice(valueStart, valueEnd)]);
      pos = matchEnd;
      continue;
    }
    pos += codePointLength(line, pos);
  }
  return pairs;
}

/** End (after the closing quote) of a `"(?:\\.|[^\\"])+"` value at `start` that a `,` or the end follows, else `undefined`. */
function quotedValueEnd(line: string, start: number): number | undefined {
  if (line[start] !== '"') return undefined;
  let i = start + 1;
  while (i < line.length) {
    const ch = line[i];
    if (ch === '"') break;
    if (ch === '\\') {
      if (i + 1 >= line.length) return undefined;
      i += 1 + codePointLength(line, i + 1);
    } else {
      i += codePointLength(line, i);
    }
  }
  if (i >= line.length || i === start + 1) return undefined;
  const end = i + 1;
  return end === line.length || line[end] === ',' ? end : undefined;
}

function codePointLength(text: string, index: number): number {
  const cp = text.codePointAt(index);
  return cp !== undefined && cp > 0xffff ? 2 : 1;
}

/** A1111's defaults for missing keys, in its order. */
function fillDefaults(fields: Map<string, InfotextValue>, prompt: string, negativePrompt: string): void {
  const setDefault = (key: string, value: InfotextValue): void => {
    if (!fields.has(key)) fields.set(key, value);
  };
  setDefault('Clip skip', '1');
  const hypernet = fields.get('Hypernet');
  if (hypernet !== undefined) {
    fields.set('Prompt', `${String(fields.get('Prompt'))}<hypernet:${infotextValueText(hypernet)}:${infotextValueText(fields.get('Hypernet strength') ?? '1.0')}>`);
  }
  if (!fields.has('Hires resize-1')) {
    fields.set('Hires resize-1', 0);
    fields.set('Hires resize-2', 0);
  }
  setDefault('Hires sampler', 'Use same sampler');
  setDefault('Hires schedule type', 'Use same scheduler');
  setDefault('Hires checkpoint', 'Use same checkpoint');
  setDefault('Hires prompt', '');
  setDefault('Hires negative prompt', '');
  setDefault('Mask mode', 'Inpaint masked');
  setDefault('Masked content', 'original');
  setDefault('Inpaint area', 'Whole picture');
  setDefault('Masked area padding', 32);
  restoreOldHiresFixSize(fields);
  setDefault('RNG', 'GPU');
  setDefault('Schedule type', AUTOMATIC_LABEL);
  setDefault('Schedule max sigma', 0);
  setDefault('Schedule min sigma', 0);
  setDefault('Schedule rho', 0);
  setDefault('VAE Encoder', 'Full');
  setDefault('VAE Decoder', 'Full');
  setDefault('FP8 weight', 'Disable');
  if (!fields.has('Cache FP16 weight for LoRA') && fields.get('FP8 weight') !== 'Disable') fields.set('Cache FP16 weight for LoRA', false);
  if (!fields.has('Emphasis') && usesEmphasis(prompt, negativePrompt)) fields.set('Emphasis', 'Original');
  setDefault('Refiner switch by sampling steps', false);
}

/** Whether any run of either prompt has a weight other than 1 (A1111 then records `Emphasis: Original`). */
function usesEmphasis(prompt: string, negativePrompt: string): boolean {
  try {
    return [...parsePromptAttention(prompt), ...parsePromptAttention(negativePrompt)].some((p) => p.weight !== 1 && p.text !== 'BREAK');
  } catch (e) {
    // A weight that is not a number: A1111's parser raises here; for reading metadata the prompt
    // simply does not count as using emphasis.
    if (e instanceof PipelineError && e.code === 'BAD_PROMPT') return false;
    throw e;
  }
}

/** A1111 `restore_old_hires_fix_params` with `use_old_hires_fix_width_height` off: `First pass size` (pre-1.0 images) becomes the size, the size the hires size. */
function restoreOldHiresFixSize(fields: Map<string, InfotextValue>): void {
  const firstWidth = fields.get('First pass size-1');
  const firstHeight = fields.get('First pass size-2');
  if (firstWidth === undefined || firstHeight === undefined) return;
  let fw = pyInt(String(firstWidth));
  let fh = pyInt(String(firstHeight));
  const width = pyInt(String(fields.get('Size-1') ?? '512'));
  const height = pyInt(String(fields.get('Size-2') ?? '512'));
  if (fw === undefined || fh === undefined || width === undefined || height === undefined || width <= 0 || height <= 0) return;
  if (fw === 0 || fh === 0) {
    // `old_hires_fix_first_pass_dimensions`: scale to about 512·512 pixels, rounded up to multiples of 64.
    const scale = Math.sqrt((512 * 512) / (width * height));
    fw = Math.ceil((scale * width) / 64) * 64;
    fh = Math.ceil((scale * height) / 64) * 64;
  }
  fields.set('Size-1', fw);
  fields.set('Size-2', fh);
  fields.set('Hires resize-1', width);
  fields.set('Hires resize-2', height);
}

// ---------------------------------------------------------------------------------------------
// Sampler names (get_sampler_and_scheduler)
// ---------------------------------------------------------------------------------------------

const AUTOMATIC_LABEL = 'Automatic';

/** A1111 v1.10 `sd_schedulers.schedulers`: name, label, aliases, in its order. */
export const A1111_SCHEDULERS: ReadonlyArray<{ readonly name: string; readonly label: string; readonly aliases: readonly string[] }> = [
  { name: 'automatic', label: AUTOMATIC_LABEL, aliases: [] },
  { name: 'uniform', label: 'Uniform', aliases: [] },
  { name: 'karras', label: 'Karras', aliases: [] },
  { name: 'exponential', label: 'Exponential', aliases: [] },
  { name: 'polyexponential', label: 'Polyexponential', aliases: [] },
  { name: 'sgm_uniform', label: 'SGM Uniform', aliases: ['SGMUniform'] },
  { name: 'kl_optimal', label: 'KL Optimal', aliases: [] },
  { name: 'align_your_steps', label: 'Align Your Steps', aliases: [] },
  { name: 'simple', label: 'Simple', aliases: [] },
  { name: 'normal', label: 'Normal', aliases: [] },
  { name: 'ddim', label: 'DDIM', aliases: [] },
  { name: 'beta', label: 'Beta', aliases: [] },
];

/**
 * Splits an old combined sampler name the way A1111 `get_sampler_and_scheduler` does: for each
 * scheduler in A1111's order, a name ending in ` <label>`, ` <name>` or ` <alias>` loses that
 * suffix and the scheduler becomes that one (`DPM++ 2M Karras` → `DPM++ 2M` + `Karras`,
 * `Euler a SGMUniform` → `Euler a` + `SGM Uniform`). Without a suffix the scheduler is
 * `scheduleType` (a scheduler name is turned into its label), else `Automatic`.
 *
 * Unlike A1111 this does not replace a sampler name it does not know with its default sampler,
 * does not turn an unknown `scheduleType` into `Automatic`, and does not turn a scheduler that is
 * the sampler's own default into `Automatic` (A1111 shows `DPM++ 2M Karras` as DPM++ 2M +
 * Automatic, which means Karras for that sampler); resolving `Automatic` is the sampler's job.
 */
export function splitSamplerName(sampler: string, scheduleType?: string): { sampler: string; scheduleType: string } {
  const given = scheduleType === undefined ? undefined : A1111_SCHEDULERS.find((s) => s.name === scheduleType || s.label === scheduleType);
  let label = given?.label ?? scheduleType ?? AUTOMATIC_LABEL;
  let name = sampler;
  for (const scheduler of A1111_SCHEDULERS) {
    for (const option of [scheduler.label, scheduler.name, ...scheduler.aliases]) {
      if (name.endsWith(` ${option}`)) {
        label = scheduler.label;
        name = name.slice(0, name.length - option.length - 1);
        break;
      }
    }
  }
  return { sampler: name, scheduleType: label };
}

// ---------------------------------------------------------------------------------------------
// Versions and back-compat (modules/infotext_versions.py)
// ---------------------------------------------------------------------------------------------

/** A PEP 440 version, as Python's `packaging.version.Version` parses it. */
export interface InfotextVersion {
  readonly epoch: number;
  readonly release: readonly number[];
  /** `['a' | 'b' | 'rc', n]` */
  readonly pre: readonly [string, number] | null;
  readonly post: number | null;
  readonly dev: number | null;
  readonly local: string | null;
}

const PEP440 = new RegExp(
  String.raw`^\s*v?(?:(?:(\d+)!)?(\d+(?:\.\d+)*)` +
    String.raw`(?:[-_.]?(a|b|c|rc|alpha|beta|pre|preview)[-_.]?(\d+)?)?` +
    String.raw`(?:-(\d+)|[-_.]?(post|rev|r)[-_.]?(\d+)?)?` +
    String.raw`(?:[-_.]?(dev)[-_.]?(\d+)?)?)` +
    String.raw`(?:\+([a-z0-9]+(?:[-_.][a-z0-9]+)*))?\s*$`,
  'i',
);

/**
 * A1111 `parse_version`: a `Version` field such as `v1.7.0-225-gabc123` is cut to its first two
 * `-` parts (`v1.7.0-225`, a post-release) and read as PEP 440; `null` for no text or one that is not
 * a version (`neo`, a git hash).
 */
export function parseInfotextVersion(text: string | null | undefined): InfotextVersion | null {
  if (text === null || text === undefined) return null;
  const cut = /^([^-]+-[^-]+)-/.exec(text);
  const m = PEP440.exec(cut === null ? text : cut[1]!);
  if (m === null) return null;
  const preLetter = m[3]?.toLowerCase();
  const pre: [string, number] | null =
    preLetter === undefined ? null : [preLetter === 'alpha' ? 'a' : preLetter === 'beta' ? 'b' : ['c', 'pre', 'preview'].includes(preLetter) ? 'rc' : preLetter, Number(m[4] ?? 0)];
  const post = m[5] !== undefined ? Number(m[5]) : m[6] !== undefined ? Number(m[7] ?? 0) : null;
  return {
    epoch: Number(m[1] ?? 0),
    release: m[2]!.split('.').map(Number),
    pre,
    post,
    dev: m[8] !== undefined ? Number(m[9] ?? 0) : null,
    local: m[10] === undefined ? null : m[10].toLowerCase().replace(/[-_]/g, '.'),
  };
}

/** `str(Version)`: `1.7.0.post225`, `1.6.0rc1`, `2!1.0.dev3+local`. */
export function formatInfotextVersion(v: InfotextVersion): string {
  let s = v.epoch === 0 ? '' : `${v.epoch}!`;
  s += v.release.join('.');
  if (v.pre !== null) s += `${v.pre[0]}${v.pre[1]}`;
  if (v.post !== null) s += `.post${v.post}`;
  if (v.dev !== null) s += `.dev${v.dev}`;
  if (v.local !== null) s += `+${v.local}`;
  return s;
}

/** Negative, zero or positive as `a` sorts before, with or after `b` (packaging's ordering; local versions compared as text). */
export function compareInfotextVersions(a: InfotextVersion, b: InfotextVersion): number {
  const byRelease = compareArrays([a.epoch, ...trimZeros(a.release)], [b.epoch, ...trimZeros(b.release)]);
  if (byRelease !== 0) return byRelease;
  const bySuffix = compareArrays(suffixKey(a), suffixKey(b));
  if (bySuffix !== 0 || a.local === b.local) return bySuffix;
  if (a.local === null) return -1;
  if (b.local === null) return 1;
  return a.local < b.local ? -1 : 1;
}

const PRE_RANK: Readonly<Record<string, number>> = { a: 0, b: 1, rc: 2 };

/** packaging's `_cmpkey` after the release: a dev release without pre/post sorts before any pre-release; no pre-release sorts after all of them. */
function suffixKey(v: InfotextVersion): number[] {
  const pre = v.pre === null ? [v.post === null && v.dev !== null ? -Infinity : Infinity, 0] : [PRE_RANK[v.pre[0]]!, v.pre[1]];
  return [...pre, v.post ?? -Infinity, v.dev ?? Infinity];
}

function trimZeros(release: readonly number[]): number[] {
  const r = [...release];
  while (r.length > 1 && r[r.length - 1] === 0) r.pop();
  return r;
}

function compareArrays(a: readonly number[], b: readonly number[]): number {
  for (let i = 0; i < Math.min(a.length, b.length); i++) if (a[i] !== b[i]) return a[i]! < b[i]! ? -1 : 1;
  return a.length - b.length;
}

const V160 = parseInfotextVersion('1.6.0')!;
const V170_TSNR = parseInfotextVersion('v1.7.0-225')!;
const V180 = parseInfotextVersion('1.8.0')!;

/**
 * A1111 `infotext_versions.backcompat` (its `auto_backcompat` setting on): for an infotext whose
 * `Version` is older than the change, adds `Old prompt editing timelines` (before 1.6.0, prompt
 * with `[`), `Pad conds v0` (before 1.6.0, DDIM/PLMS), `Downcast alphas_cumprod` (before
 * 1.7.0-225) and `Refiner switch by sampling steps` (before 1.8.0, with a refiner), all `true`.
 * Nothing happens without a readable `Version`.
 */
export function applyInfotextBackcompat(fields: Map<string, InfotextValue>): void {
  const versionText = fields.get('Version');
  const version = parseInfotextVersion(versionText === undefined ? null : String(versionText));
  if (version === null) return;
  const before = (v: InfotextVersion): boolean => compareInfotextVersions(version, v) < 0;
  const truthy = (v: InfotextValue | undefined): boolean => v !== undefined && v !== '' && v !== 0 && v !== false;
  if (before(V160) && String(fields.get('Prompt') ?? '').includes('[')) fields.set('Old prompt editing timelines', true);
  if (before(V160) && ['DDIM', 'PLMS'].includes(String(fields.get('Sampler') ?? ''))) fields.set('Pad conds v0', true);
  if (before(V170_TSNR)) fields.set('Downcast alphas_cumprod', true);
  if (before(V180) && truthy(fields.get('Refiner'))) fields.set('Refiner switch by sampling steps', true);
}
