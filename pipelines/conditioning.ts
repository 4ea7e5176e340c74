/**
 * Prompt → text conditioning, the A1111 way (`modules/sd_hijack_clip.py`, `sd_emphasis.py`,
 * `prompt_parser.py` in AUTOMATIC1111/stable-diffusion-webui, behaviour as of v1.10):
 *
 * 1. Each prompt is split into AND sub-prompts (composable diffusion, with weights), each of those
 *    into a schedule of texts for prompt editing (`[from:to:when]`, `[a|b]`).
 * 2. Each text is parsed for emphasis into (fragment, weight) runs; each fragment is tokenized on
 *    its own; tokens fill 75-token chunks, a `BREAK` starts a new chunk, and when a chunk fills up
 *    within `commaPaddingBacktrack` tokens of a comma, the text after that comma moves to the next
 *    chunk. Each chunk becomes BOS + 75 tokens (EOS-padded) + EOS = 77.
 * 3. Each chunk is encoded on its own (at the clip skip), the token embeddings are multiplied by
 *    their weights and, with "Original" emphasis, the whole chunk tensor is rescaled so its mean
 *    equals the mean before weighting: z ← z·w; z ← z·(mean_before / mean_after).
 * 4. The chunks are concatenated on the sequence axis: (1, 77·k, D).
 *
 * Notation: `chunk` = 77 token ids; `z` = hidden states (B, 77, D); `w` = per-token multipliers.
 */
import type { AdapterUse, Tensor } from '../models/index.ts';
import { PipelineError } from './errors.ts';
import type { TextEncoderModel } from './models.ts';
import { getPromptSchedule, parseComposable, parsePromptAttention } from './prompt/a1111.ts';

/** Prompt tokens per chunk (77 minus BOS and EOS). */
export const CHUNK_TOKENS = 75;
/** A1111's default `comma_padding_backtrack`. */
export const DEFAULT_COMMA_BACKTRACK = 20;
/**
 * Upper bound on chunks per prompt (75 · 100 = 7,500 tokens), so a pasted novel fails with a clear
 * error instead of tying up the encoder for minutes.
 */
export const MAX_PROMPT_CHUNKS = 100;

/** A1111 emphasis modes: "Original" (weights + mean restore), "No norm" (weights only), "Ignore" (parse, no weights), "None" (brackets are literal text). */
export type EmphasisMode = 'original' | 'no-norm' | 'ignore' | 'none';

export interface PromptChunk {
  /** 77 ids: BOS, 75 tokens (EOS-padded), EOS. */
  readonly tokens: number[];
  readonly multipliers: number[];
}

export interface ConditioningOptions {
  /** A1111 clip skip: 1 = last layer. */
  readonly clipSkip: number;
  readonly emphasis: EmphasisMode;
  readonly commaPaddingBacktrack: number;
}

export const DEFAULT_CONDITIONING: ConditioningOptions = { clipSkip: 1, emphasis: 'original', commaPaddingBacktrack: DEFAULT_COMMA_BACKTRACK };

/** A1111 `tokenize_line`: one prompt text → 77-token chunks with per-token multipliers. */
export function tokenizeLine(text: string, tokenizer: TextEncoderModel['tokenizer'], options: Pick<ConditioningOptions, 'emphasis' | 'commaPaddingBacktrack'>): { chunks: PromptChunk[]; tokenCount: number } {
  const parsed = options.emphasis === 'none' ? [{ text, weight: 1 }] : parsePromptAttention(text);
  const { bosId, eosId, commaId } = tokenizer;
  const chunks: PromptChunk[] = [];
  let tokens: number[] = [];
  let mults: number[] = [];
  let tokenCount = 0;
  let lastComma = -1;

  const nextChunk = (isLast: boolean) => {
    tokenCount += isLast ? tokens.length : CHUNK_TOKENS;
    const pad = CHUNK_TOKENS - tokens.length;
    if (pad > 0) {
      tokens.push(...new Array<number>(pad).fill(eosId));
      mults.push(...new Array<number>(pad).fill(1));
    }
    chunks.push({ tokens: [bosId, ...tokens, eosId], multipliers: [1, ...mults, 1] });
    if (chunks.length > MAX_PROMPT_CHUNKS) {
      throw new PipelineError('PROMPT_TOO_LONG', `the prompt needs more than ${MAX_PROMPT_CHUNKS} chunks of ${CHUNK_TOKENS} tokens (over ${MAX_PROMPT_CHUNKS * CHUNK_TOKENS} tokens); shorten it.`, {
        chunks: chunks.length,
      });
    }
    tokens = [];
    mults = [];
    lastComma = -1;
  };

  for (const part of parsed) {
    if (part.text === 'BREAK' && part.weight === -1) {
      nextChunk(false);
      continue;
    }
    const weight = options.emphasis === 'ignore' ? 1 : part.weight;
    for (const token of tokenizer.encode(part.text)) {
      if (token === commaId) {
        lastComma = tokens.length;
      } else if (options.commaPaddingBacktrack !== 0 && tokens.length === CHUNK_TOKENS && lastComma !== -1 && tokens.length - lastComma <= options.commaPaddingBacktrack) {
        const at = lastComma + 1;
        const relocTokens = tokens.slice(at);
        const relocMults = mults.slice(at);
        tokens = tokens.slice(0, at);
        mults = mults.slice(0, at);
        nextChunk(false);
        tokens = relocTokens;
        mults = relocMults;
      }
      if (tokens.length === CHUNK_TOKENS) nextChunk(false);
      tokens.push(token);
      mults.push(weight);
    }
  }
  if (tokens.length > 0 || chunks.length === 0) nextChunk(true);
  return { chunks, tokenCount };
}

/** Encode chunks (one prompt) and apply emphasis: (1, 77·k, D). */
export async function encodeChunks(chunks: readonly PromptChunk[], encoder: TextEncoderModel, options: ConditioningOptions, adapters?: AdapterUse): Promise<Tensor<'float32'>> {
  const parts: Float32Array[] = [];
  let width = 0;
  for (const chunk of chunks) {
    const z = await encoder.encode([chunk.tokens], options.clipSkip, adapters);
    const [, seq, dim] = z.shape as [number, number, number];
    width = dim;
    const data = Float32Array.from(z.data);
    if (options.emphasis === 'original' || options.emphasis === 'no-norm') applyEmphasis(data, chunk.multipliers, seq, dim, options.emphasis === 'original');
    parts.push(data);
  }
  const seq = chunks.length * (chunks[0]?.tokens.length ?? 0);
  const out = new Float32Array(seq * width);
  let offset = 0;
  for (const p of parts) {
    out.set(p, offset);
    offset += p.length;
  }
  return { dtype: 'float32', shape: [1, seq, width], data: out };
}

/**
 * z ← z·w per token, then (with mean restore) z ← z·(mean(z_before) / mean(z_after)), computed in
 * float32 steps as torch does on a float32 tensor (means accumulated in float64, then rounded).
 */
export function applyEmphasis(z: Float32Array, multipliers: readonly number[], seq: number, dim: number, restoreMean: boolean): void {
  if (multipliers.every((m) => m === 1)) return;
  let before = 0;
  for (let i = 0; i < z.length; i++) before += z[i]!;
  const meanBefore = Math.fround(before / z.length);
  for (let t = 0; t < seq; t++) {
    const w = Math.fround(multipliers[t]!);
    for (let d = 0; d < dim; d++) z[t * dim + d] = Math.fround(z[t * dim + d]! * w);
  }
  if (!restoreMean) return;
  let after = 0;
  for (let i = 0; i < z.length; i++) after += z[i]!;
  const ratio = Math.fround(meanBefore / Math.fround(after / z.length));
  for (let i = 0; i < z.length; i++) z[i] = Math.fround(z[i]! * ratio);
}

export interface ScheduledConditioning {
  /** Used while the sampling step ≤ endAtStep (A1111 `ScheduledPromptConditioning`). */
  readonly endAtStep: number;
  readonly embedding: Tensor<'float32'>;
}

export interface ComposableConditioning {
  readonly weight: number;
  readonly schedule: readonly ScheduledConditioning[];
}

export interface PromptConditioning {
  /** One entry per AND sub-prompt. */
  readonly positive: readonly ComposableConditioning[];
  readonly negative: readonly ScheduledConditioning[];
}

/** The conditioning of a schedule at a sampling step. */
export function conditioningAt(schedule: readonly ScheduledConditioning[], step: number): Tensor<'float32'> {
  for (const entry of schedule) if (step <= entry.endAtStep) return entry.embedding;
  return schedule[schedule.length - 1]!.embedding;
}

/**
 * Encode a prompt and its negative for `steps` sampling steps: AND sub-prompts (positive only),
 * prompt-editing schedules, chunking and emphasis. Identical texts are encoded once.
 */
/**
 * `adapters` applies LoRAs to the text encoder (one mix row: each chunk is encoded on its own).
 */
export async function encodePrompts(prompt: string, negativePrompt: string, steps: number, encoder: TextEncoderModel, options: ConditioningOptions, adapters?: AdapterUse): Promise<PromptConditioning> {
  if (!Number.isInteger(options.clipSkip) || options.clipSkip < 1 || options.clipSkip > encoder.layers) {
    throw new PipelineError('BAD_ARGUMENT', `clip skip must be an integer from 1 to ${encoder.layers} for this model, got ${options.clipSkip}.`, { field: 'clipSkip', value: options.clipSkip });
  }
  const cache = new Map<string, Promise<Tensor<'float32'>>>();
  const encodeText = (text: string): Promise<Tensor<'float32'>> => {
    let hit = cache.get(text);
    if (hit === undefined) {
      hit = encodeChunks(tokenizeLine(text, encoder.tokenizer, options).chunks, encoder, options, adapters);
      cache.set(text, hit);
    }
    return hit;
  };
  const schedule = async (text: string): Promise<ScheduledConditioning[]> =>
    Promise.all(getPromptSchedule(text, steps).map(async (s) => ({ endAtStep: s.endAtStep, embedding: await encodeText(s.prompt) })));
  const positive = await Promise.all(parseComposable(prompt).map(async (p) => ({ weight: p.weight, schedule: await schedule(p.prompt) })));
  const negative = await schedule(negativePrompt);
  return { positive, negative };
}
