/**
 * The CLIP byte-level BPE tokenizer that SD 1.5 pipelines feed their text encoder.
 *
 * Reference: Hugging Face transformers' *slow* `CLIPTokenizer` as diffusers 0.24 runs it with
 * transformers 4.33 and **without ftfy** installed (the default `pip install diffusers transformers`).
 * `shared/fixtures/README.md` ("Tokenizer / text encoder") lists the quirks. The steps are:
 *
 * 1. Split out special tokens typed in the text (`<|startoftext|>`, `<|endoftext|>`): they become
 *    their ids directly.
 * 2. Each remaining piece goes through BERT's BasicTokenizer with `strip_accents=False` and no
 *    punctuation split: drop NUL, U+FFFD and every `C*` character (ZWJ, zero-width space, soft
 *    hyphen…), map whitespace to spaces, surround every CJK ideograph with spaces, NFC, split on
 *    whitespace, lowercase each word, join the words with single spaces.
 * 3. CLIP's pre-tokenizer regex cuts that text into words; each word's UTF-8 bytes map to printable
 *    characters (GPT-2's `bytes_to_unicode` table) and go through BPE with a `</w>` end-of-word
 *    marker on the last symbol.
 *
 * Unicode tables come from the JS engine (Node 20: Unicode 15+), the reference from Python 3.11
 * (Unicode 14). Characters assigned after Unicode 14 can therefore be cleaned, cased or classified
 * differently; nothing older is affected.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { ModelError } from '../errors.ts';

export const CLIP_BOS_TOKEN = '<|startoftext|>';
export const CLIP_EOS_TOKEN = '<|endoftext|>';
/** The default `unk_token` and `pad_token` of `CLIPTokenizer` when the config names none. */
export const CLIP_DEFAULT_UNK_TOKEN = CLIP_EOS_TOKEN;
export const CLIP_DEFAULT_PAD_TOKEN = CLIP_EOS_TOKEN;
/** Positions of the CLIP text encoder; used when `tokenizer_config.json` has no `model_max_length`. */
export const CLIP_MAX_TOKENS = 77;
export const CLIP_END_OF_WORD = '</w>';

export const CLIP_VOCAB_FILE = 'vocab.json';
export const CLIP_MERGES_FILE = 'merges.txt';
export const CLIP_CONFIG_FILE = 'tokenizer_config.json';
export const CLIP_SPECIAL_TOKENS_FILE = 'special_tokens_map.json';

/** openai/CLIP's vocabulary size: 256 byte symbols ×2 (with and without `</w>`) + merges + 2 specials. */
const CLIP_BPE_VOCAB_SIZE = 49152;
const BYTE_SYMBOL_COUNT = 256;
const CLIP_SPECIAL_TOKEN_COUNT = 2;
/**
 * The reference reads at most this many merge rules (after the `#version` header) and ignores the
 * rest, so a longer merges.txt tokenizes the same as the first 48 894 lines.
 */
const CLIP_MERGE_LIMIT = CLIP_BPE_VOCAB_SIZE - BYTE_SYMBOL_COUNT - CLIP_SPECIAL_TOKEN_COUNT;
const MERGES_HEADER_PREFIX = '#version';
const MERGES_HEADER_LINES = 1;
/** A sequence is `BOS content EOS`. */
const SPECIAL_TOKENS_PER_SEQUENCE = 2;
/** Bounds the per-word BPE cache in a long-running app; prompts reuse a few thousand words at most. */
const BPE_CACHE_LIMIT = 20_000;

/**
 * CLIP's pre-tokenizer pattern (openai/CLIP `simple_tokenizer.py`, kept by transformers). The
 * reference compiles it with `re.IGNORECASE`, hence the `i` flag. Text reaching it is already
 * lowercased and has only ASCII spaces as whitespace, so JS `\s` and Python's agree here.
 */
const CLIP_WORD_PATTERN = /<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+/giu;

/** BasicTokenizer drops U+0000, U+FFFD and `unicodedata.category(c).startswith('C')` except \t \n \r. */
const NUL_CODE_POINT = 0x0000;
const REPLACEMENT_CODE_POINT = 0xfffd;
const OTHER_CATEGORY = /^\p{C}$/u;
const KEPT_CONTROLS = new Set(['\t', '\n', '\r']);
/** BasicTokenizer's `_is_whitespace`: space, \t, \n, \r and category Zs. */
const BASIC_WHITESPACE = /^[ \t\n\r\p{Zs}]$/u;
/**
 * Python's `str.split()` separators (`str.isspace()` in Python 3.11). After cleaning, only U+2028 and
 * U+2029 are left besides the space, but the whole set is spelled out so the split matches anyway.
 */
const PYTHON_WHITESPACE_RUN = /[\t\n\v\f\r\x1c-\x1f \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+/u;

/**
 * Code point ranges BasicTokenizer treats as "Chinese characters" (CJK Unified Ideographs, their
 * extensions A–E and the compatibility ideograph blocks), as `[first, last]` inclusive.
 */
const CJK_IDEOGRAPH_RANGES: readonly (readonly [number, number])[] = [
  [0x4e00, 0x9fff],
  [0x3400, 0x4dbf],
  [0x20000, 0x2a6df],
  [0x2a700, 0x2b73f],
  [0x2b740, 0x2b81f],
  [0x2b820, 0x2ceaf],
  [0xf900, 0xfaff],
  [0x2f800, 0x2fa1f],
];

/**
 * GPT-2's `bytes_to_unicode`: printable Latin-1 bytes (`!`–`~`, `¡`–`¬`, `®`–`ÿ`) stand for
 * themselves; the other 68 bytes map, in byte order, to U+0100 onwards.
 */
const PRINTABLE_BYTE_RANGES: readonly (readonly [number, number])[] = [
  [0x21, 0x7e],
  [0xa1, 0xac],
  [0xae, 0xff],
];

function buildByteSymbols(): readonly string[] {
  const symbols: string[] = [];
  let nextRemapped = BYTE_SYMBOL_COUNT;
  for (let byte = 0; byte < BYTE_SYMBOL_COUNT; byte++) {
    const printable = PRINTABLE_BYTE_RANGES.some(([lo, hi]) => byte >= lo && byte <= hi);
    symbols.push(String.fromCodePoint(printable ? byte : nextRemapped++));
  }
  return symbols;
}

const BYTE_TO_SYMBOL = buildByteSymbols();
const UTF8_ENCODER = new TextEncoder();
const UTF8_DECODER = new TextDecoder('utf-8');
const SYMBOL_TO_BYTE: ReadonlyMap<string, number> = new Map(BYTE_TO_SYMBOL.map((s, b) => [s, b]));

function isCjkIdeograph(codePoint: number): boolean {
  return CJK_IDEOGRAPH_RANGES.some(([lo, hi]) => codePoint >= lo && codePoint <= hi);
}

/**
 * BERT's BasicTokenizer as CLIPTokenizer configures it without ftfy; returns the lowercased words.
 * Lowercasing is per word, as in the reference, so Final_Sigma sees the same context.
 */
function basicTokenize(text: string): string[] {
  let cleaned = '';
  for (const ch of text) {
    const codePoint = ch.codePointAt(0) ?? NUL_CODE_POINT;
    if (codePoint === NUL_CODE_POINT || codePoint === REPLACEMENT_CODE_POINT) continue;
    if (!KEPT_CONTROLS.has(ch) && OTHER_CATEGORY.test(ch)) continue;
    if (BASIC_WHITESPACE.test(ch)) cleaned += ' ';
    else if (isCjkIdeograph(codePoint)) cleaned += ` ${ch} `;
    else cleaned += ch;
  }
  return cleaned
    .normalize('NFC')
    .split(PYTHON_WHITESPACE_RUN)
    .filter((word) => word.length > 0)
    .map((word) => word.toLowerCase());
}

export interface ClipTokenizerFiles {
  /** Parsed `vocab.json`: token string → id. */
  vocab: Record<string, number>;
  /** The merge rules of `merges.txt` ("a b", highest priority first) without the `#version` header. */
  merges: string[];
  /** Parsed `tokenizer_config.json`, if any. */
  config?: unknown;
  /** Parsed `special_tokens_map.json`, if any; it overrides the config's special tokens. */
  specialTokensMap?: unknown;
}

export interface ClipEncoding {
  /** `BOS content EOS` padded with the pad id to `maxLength`; content cut to `maxLength - 2`. */
  inputIds: number[];
  /** 1 for BOS, content and EOS, 0 for padding. */
  attentionMask: number[];
  /** True when content tokens were cut (diffusers then warns and drops them). */
  truncated: boolean;
  /** `BOS content EOS` with nothing cut and no padding. */
  untruncatedIds: number[];
}

/** Names the source of each table in error messages: file paths for `load`, file names otherwise. */
interface SourceNames {
  vocab: string;
  merges: string;
  config: string;
  specialTokensMap: string;
}

const DEFAULT_SOURCE_NAMES: SourceNames = {
  vocab: CLIP_VOCAB_FILE,
  merges: CLIP_MERGES_FILE,
  config: CLIP_CONFIG_FILE,
  specialTokensMap: CLIP_SPECIAL_TOKENS_FILE,
};

type SpecialTokenKey = 'bos_token' | 'eos_token' | 'unk_token' | 'pad_token';

const SPECIAL_TOKEN_DEFAULTS: Readonly<Record<SpecialTokenKey, string>> = {
  bos_token: CLIP_BOS_TOKEN,
  eos_token: CLIP_EOS_TOKEN,
  unk_token: CLIP_DEFAULT_UNK_TOKEN,
  pad_token: CLIP_DEFAULT_PAD_TOKEN,
};

function badTokenizer(file: string, message: string, details: Record<string, unknown> = {}): ModelError {
  return new ModelError('BAD_TOKENIZER', `${file}: ${message}`, { file, ...details });
}

function isPlainObject(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

function describeValue(value: unknown): string {
  if (value === null) return 'null';
  if (Array.isArray(value)) return 'an array';
  if (typeof value === 'string') return JSON.stringify(value.length > 40 ? `${value.slice(0, 40)}…` : value);
  return typeof value === 'object' ? 'an object' : `${typeof value} ${String(value)}`;
}

function parseVocab(vocab: unknown, source: string): Map<string, number> {
  if (!isPlainObject(vocab)) {
    throw badTokenizer(source, `expected a JSON object mapping token strings to ids, found ${describeValue(vocab)}. Re-download the tokenizer folder.`);
  }
  const encoder = new Map<string, number>();
  for (const [token, id] of Object.entries(vocab)) {
    if (typeof id !== 'number' || !Number.isSafeInteger(id) || id < 0) {
      throw badTokenizer(source, `token ${JSON.stringify(token)} has id ${describeValue(id)}; ids must be non-negative integers. Re-download the tokenizer folder.`, { key: token });
    }
    encoder.set(token, id);
  }
  if (encoder.size === 0) {
    throw badTokenizer(source, 'the vocabulary is empty. Re-download the tokenizer folder.');
  }
  return encoder;
}

/**
 * Merge rules → rank (0 = merged first). A repeated rule keeps its later rank, as the reference's
 * dict does. `headerLines` shifts the line numbers in messages to match the file.
 */
function parseMerges(merges: unknown, source: string, headerLines: number): Map<string, number> {
  if (!Array.isArray(merges)) {
    throw badTokenizer(source, `expected a list of merge rules, found ${describeValue(merges)}.`);
  }
  const first: unknown = merges[0];
  if (typeof first === 'string' && first.startsWith(MERGES_HEADER_PREFIX)) {
    throw badTokenizer(source, `line 1 is the "${MERGES_HEADER_PREFIX}" header; pass the merge rules without it.`, { line: 1 });
  }
  const ranks = new Map<string, number>();
  const count = Math.min(merges.length, CLIP_MERGE_LIMIT);
  for (let i = 0; i < count; i++) {
    const line: unknown = merges[i];
    const parts = typeof line === 'string' ? line.trim().split(/\s+/) : [];
    if (parts.length !== 2 || parts[0] === '' || parts[1] === '') {
      throw badTokenizer(source, `line ${i + 1 + headerLines} is ${describeValue(line)}; expected a merge rule: two symbols separated by a space, like "i n". Re-download the tokenizer folder.`, { line: i + 1 + headerLines });
    }
    ranks.set(parts.join(' '), i);
  }
  return ranks;
}

/** A special token is written as a string or as a serialized `AddedToken` (`{ "content": … }`). */
function specialTokenContent(value: unknown, source: string, key: SpecialTokenKey): string | undefined {
  if (value === undefined) return undefined;
  if (typeof value === 'string' && value.length > 0) return value;
  if (isPlainObject(value) && typeof value.content === 'string' && value.content.length > 0) return value.content;
  throw badTokenizer(source, `"${key}" is ${describeValue(value)}; expected a token string or an object with a "content" string.`, { key });
}

function optionalObject(value: unknown, source: string): Record<string, unknown> {
  if (value === undefined) return {};
  if (!isPlainObject(value)) throw badTokenizer(source, `expected a JSON object, found ${describeValue(value)}.`);
  return value;
}

function parseMaxLength(config: Record<string, unknown>, source: string): number {
  const value = config.model_max_length;
  if (value === undefined) return CLIP_MAX_TOKENS;
  if (typeof value !== 'number' || !Number.isSafeInteger(value) || value < SPECIAL_TOKENS_PER_SEQUENCE) {
    throw badTokenizer(source, `"model_max_length" is ${describeValue(value)}; expected an integer ≥ ${SPECIAL_TOKENS_PER_SEQUENCE} (SD 1.5 uses ${CLIP_MAX_TOKENS}).`, { key: 'model_max_length' });
  }
  return value;
}

function readTextFile(file: string): string {
  try {
    return fs.readFileSync(file, 'utf8');
  } catch (e) {
    const reason = (e as NodeJS.ErrnoException).code === 'ENOENT' ? 'file not found' : `cannot read it (${String(e)})`;
    throw badTokenizer(file, `${reason}. A tokenizer folder needs ${CLIP_VOCAB_FILE} and ${CLIP_MERGES_FILE}.`);
  }
}

function readJsonFile(file: string): unknown {
  const text = readTextFile(file);
  try {
    return JSON.parse(text) as unknown;
  } catch (e) {
    throw badTokenizer(file, `not valid JSON (${e instanceof Error ? e.message : String(e)}). Re-download the tokenizer folder.`);
  }
}

/**
 * merges.txt as the reference reads it: universal newlines, whole file stripped, first line (the
 * `#version` header) skipped.
 */
function splitMergesFile(text: string, source: string): string[] {
  const lines = text.replace(/\r\n?/g, '\n').trim().split('\n');
  const header = lines[0] ?? '';
  if (!header.startsWith(MERGES_HEADER_PREFIX)) {
    throw badTokenizer(source, `line 1 is ${describeValue(header)}; expected the "${MERGES_HEADER_PREFIX}: …" header of a BPE merges file.`, { line: 1 });
  }
  return lines.slice(MERGES_HEADER_LINES);
}

export class ClipTokenizer {
  readonly bosId: number;
  readonly eosId: number;
  readonly padId: number;
  readonly unkId: number;
  readonly maxLength: number;

  private readonly encoder: ReadonlyMap<string, number>;
  private readonly decoder: ReadonlyMap<number, string>;
  private readonly bpeRanks: ReadonlyMap<string, number>;
  /** Special token strings, longest first, split out of the raw text before anything else. */
  private readonly specialTokens: readonly string[];
  private readonly bpeCache = new Map<string, readonly string[]>();

  private constructor(files: ClipTokenizerFiles, sources: SourceNames, mergesHeaderLines: number) {
    this.encoder = parseVocab(files.vocab, sources.vocab);
    this.bpeRanks = parseMerges(files.merges, sources.merges, mergesHeaderLines);
    const decoder = new Map<number, string>();
    for (const [token, id] of this.encoder) decoder.set(id, token);
    this.decoder = decoder;

    const config = optionalObject(files.config, sources.config);
    const specialTokensMap = optionalObject(files.specialTokensMap, sources.specialTokensMap);
    const tokenId = (key: SpecialTokenKey): { content: string; id: number } => {
      const fromMap = specialTokenContent(specialTokensMap[key], sources.specialTokensMap, key);
      const fromConfig = specialTokenContent(config[key], sources.config, key);
      const content = fromMap ?? fromConfig ?? SPECIAL_TOKEN_DEFAULTS[key];
      const id = this.encoder.get(content);
      if (id === undefined) {
        const source = fromMap !== undefined ? sources.specialTokensMap : fromConfig !== undefined ? sources.config : sources.vocab;
        throw badTokenizer(source, `${key} ${JSON.stringify(content)} is not in ${sources.vocab}. Use a tokenizer folder whose special tokens are in its vocabulary.`, { key, token: content });
      }
      return { content, id };
    };
    const bos = tokenId('bos_token');
    const eos = tokenId('eos_token');
    const unk = tokenId('unk_token');
    const pad = tokenId('pad_token');
    this.bosId = bos.id;
    this.eosId = eos.id;
    this.unkId = unk.id;
    this.padId = pad.id;
    this.specialTokens = [...new Set([bos.content, eos.content, unk.content, pad.content])].sort((a, b) => b.length - a.length);
    this.maxLength = parseMaxLength(config, sources.config);
    this.seedBpeCache();
  }

  /**
   * Reads a diffusers `tokenizer/` folder: `vocab.json` and `merges.txt` are required,
   * `tokenizer_config.json` and `special_tokens_map.json` optional.
   * @throws ModelError `BAD_TOKENIZER` naming the file for a missing or malformed file.
   */
  static load(dir: string): ClipTokenizer {
    const sources: SourceNames = {
      vocab: path.join(dir, CLIP_VOCAB_FILE),
      merges: path.join(dir, CLIP_MERGES_FILE),
      config: path.join(dir, CLIP_CONFIG_FILE),
      specialTokensMap: path.join(dir, CLIP_SPECIAL_TOKENS_FILE),
    };
    const vocab = readJsonFile(sources.vocab);
    const merges = splitMergesFile(readTextFile(sources.merges), sources.merges);
    const config = fs.existsSync(sources.config) ? readJsonFile(sources.config) : undefined;
    const specialTokensMap = fs.existsSync(sources.specialTokensMap) ? readJsonFile(sources.specialTokensMap) : undefined;
    return new ClipTokenizer({ vocab: vocab as Record<string, number>, merges, config, specialTokensMap }, sources, MERGES_HEADER_LINES);
  }

  /**
   * Builds a tokenizer from already parsed tables (validated here).
   * @throws ModelError `BAD_TOKENIZER` naming the table's usual file name when a table is malformed.
   */
  static fromFiles(files: ClipTokenizerFiles): ClipTokenizer {
    return new ClipTokenizer(files, DEFAULT_SOURCE_NAMES, 0);
  }

  /** BPE token strings of the text, without BOS/EOS. Special tokens typed in the text stay whole. */
  tokenize(text: string): string[] {
    const tokens: string[] = [];
    for (const piece of this.splitOnSpecialTokens(text)) {
      if (piece.special) {
        tokens.push(piece.text);
        continue;
      }
      const words = basicTokenize(piece.text).join(' ');
      for (const match of words.matchAll(CLIP_WORD_PATTERN)) {
        tokens.push(...this.bpe(this.toByteSymbols(match[0])));
      }
    }
    return tokens;
  }

  /** Content ids of the text: no BOS/EOS, no truncation. Tokens missing from the vocabulary map to the unk id. */
  encode(text: string): number[] {
    return this.tokenize(text).map((token) => this.encoder.get(token) ?? this.unkId);
  }

  /**
   * What diffusers' `encode_prompt` feeds the text encoder: `tokenizer(text, padding="max_length",
   * max_length=maxLength, truncation=True)`, plus the untruncated ids it compares against.
   * @throws RangeError if `maxLength` is not an integer ≥ 2 (room for BOS and EOS).
   */
  encodePadded(text: string, maxLength: number = this.maxLength): ClipEncoding {
    if (!Number.isSafeInteger(maxLength) || maxLength < SPECIAL_TOKENS_PER_SEQUENCE) {
      throw new RangeError(`maxLength must be an integer ≥ ${SPECIAL_TOKENS_PER_SEQUENCE} (BOS and EOS), got ${maxLength}`);
    }
    const content = this.encode(text);
    const room = maxLength - SPECIAL_TOKENS_PER_SEQUENCE;
    const truncated = content.length > room;
    const kept = truncated ? content.slice(0, room) : content;
    const inputIds = [this.bosId, ...kept, this.eosId];
    const attentionMask = inputIds.map(() => 1);
    while (inputIds.length < maxLength) {
      inputIds.push(this.padId);
      attentionMask.push(0);
    }
    return { inputIds, attentionMask, truncated, untruncatedIds: [this.bosId, ...content, this.eosId] };
  }

  /**
   * Best-effort inverse: byte-level decode, `</w>` → space, invalid UTF-8 → U+FFFD, special tokens
   * written out and separated by spaces. Not byte-identical to the input: the tokenizer lowercased,
   * dropped control characters and collapsed whitespace.
   * @throws RangeError for an id that is not in the vocabulary.
   */
  decode(ids: readonly number[]): string {
    const specials = new Set(this.specialTokens);
    const segments: string[] = [];
    let run: string[] = [];
    const flushRun = (): void => {
      if (run.length > 0) segments.push(this.symbolsToText(run.join('')));
      run = [];
    };
    for (const id of ids) {
      const token = this.decoder.get(id);
      if (token === undefined) throw new RangeError(`token id ${id} is not in the vocabulary (${this.decoder.size} entries)`);
      if (specials.has(token)) {
        flushRun();
        segments.push(token);
      } else {
        run.push(token);
      }
    }
    flushRun();
    return segments.filter((s) => s.length > 0).join(' ');
  }

  private symbolsToText(symbols: string): string {
    const bytes: number[] = [];
    for (const ch of symbols) {
      const byte = SYMBOL_TO_BYTE.get(ch);
      if (byte !== undefined) bytes.push(byte);
    }
    return UTF8_DECODER.decode(new Uint8Array(bytes)).replaceAll(CLIP_END_OF_WORD, ' ').trim();
  }

  /** Splits out the special tokens as the reference's added-token trie does (leftmost, then longest). */
  private splitOnSpecialTokens(text: string): { text: string; special: boolean }[] {
    const pieces: { text: string; special: boolean }[] = [];
    let start = 0;
    let i = 0;
    while (i < text.length) {
      const special = this.specialTokens.find((token) => text.startsWith(token, i));
      if (special === undefined) {
        i++;
        continue;
      }
      if (i > start) pieces.push({ text: text.slice(start, i), special: false });
      pieces.push({ text: special, special: true });
      i += special.length;
      start = i;
    }
    if (start < text.length) pieces.push({ text: text.slice(start), special: false });
    return pieces;
  }

  private toByteSymbols(word: string): string {
    let symbols = '';
    for (const byte of UTF8_ENCODER.encode(word)) symbols += BYTE_TO_SYMBOL[byte] ?? '';
    return symbols;
  }

  /**
   * The reference seeds its BPE cache with CLIP's two special strings, so the regex alternatives
   * `<|startoftext|>` / `<|endoftext|>` (e.g. from `<|StartOfText|>` after lowercasing) come out
   * whole and map to the special ids.
   */
  private seedBpeCache(): void {
    this.bpeCache.clear();
    this.bpeCache.set(CLIP_BOS_TOKEN, [CLIP_BOS_TOKEN]);
    this.bpeCache.set(CLIP_EOS_TOKEN, [CLIP_EOS_TOKEN]);
  }

  /**
   * Byte-pair merges of one word of byte symbols: repeatedly merge every occurrence of the
   * lowest-ranked adjacent pair until no pair has a rank.
   */
  private bpe(word: string): readonly string[] {
    const cached = this.bpeCache.get(word);
    if (cached !== undefined) return cached;

    const chars = Array.from(word);
    let symbols = chars.slice(0, -1);
    symbols.push(`${chars[chars.length - 1] ?? ''}${CLIP_END_OF_WORD}`);
    while (symbols.length > 1) {
      let bestRank = Infinity;
      let bestFirst = '';
      let bestSecond = '';
      for (let i = 0; i + 1 < symbols.length; i++) {
        const first = symbols[i] ?? '';
        const second = symbols[i + 1] ?? '';
        const rank = this.bpeRanks.get(`${first} ${second}`);
        if (rank !== undefined && rank < bestRank) {
          bestRank = rank;
          bestFirst = first;
          bestSecond = second;
        }
      }
      if (bestRank === Infinity) break;
      const merged: string[] = [];
      for (let i = 0; i < symbols.length; i++) {
        const symbol = symbols[i] ?? '';
        if (symbol === bestFirst && i + 1 < symbols.length && symbols[i + 1] === bestSecond) {
          merged.push(bestFirst + bestSecond);
          i++;
        } else {
          merged.push(symbol);
        }
      }
      symbols = merged;
    }

    if (this.bpeCache.size >= BPE_CACHE_LIMIT) this.seedBpeCache();
    this.bpeCache.set(word, symbols);
    return symbols;
  }
}
