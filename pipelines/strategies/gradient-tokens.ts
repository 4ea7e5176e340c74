/**
 * Which CLIP positions of a prompt hold some words: what CLoRA's `important_token_indices` /
 * `mask_indices` and LoRA-Composer's concept token indices are, computed with the real tokenizer on
 * the text the encoder sees (A1111 chunking: position = 77·chunk + 1 + index in the chunk, SOT = 0).
 */
import { tokenizeLine, type ConditioningOptions } from '../conditioning.ts';
import { PipelineError } from '../errors.ts';
import type { PromptTokenizer } from '../models.ts';
import { getPromptSchedule } from '../prompt/a1111.ts';

/**
 * The CLIP positions of the first occurrence of `words` in `prompt` (its text at step 0, emphasis
 * syntax parsed away), or undefined when the prompt does not contain them as whole tokens.
 * Throws BAD_PROMPT when `words` has no tokens.
 */
export function wordPositions(tokenizer: PromptTokenizer, prompt: string, words: string, options: Pick<ConditioningOptions, 'emphasis' | 'commaPaddingBacktrack'>, field: string): number[] | undefined {
  const wanted = tokenizer.encode(words);
  if (wanted.length === 0) throw new PipelineError('BAD_PROMPT', `${field}: "${words}" has no tokens; name the concept's words as they appear in the prompt.`, { field });
  const text = getPromptSchedule(prompt, 1)[0]?.prompt ?? prompt;
  const { chunks } = tokenizeLine(text, tokenizer, options);
  for (let c = 0; c < chunks.length; c++) {
    const tokens = chunks[c]!.tokens;
    for (let at = 1; at + wanted.length <= tokens.length - 1; at++) {
      if (wanted.every((id, k) => tokens[at + k] === id)) return wanted.map((_, k) => c * tokens.length + at + k);
    }
  }
  return undefined;
}

/** `wordPositions`, or BAD_PROMPT naming the words, the prompt and the field when they are absent. */
export function requireWordPositions(tokenizer: PromptTokenizer, prompt: string, words: string, options: Pick<ConditioningOptions, 'emphasis' | 'commaPaddingBacktrack'>, field: string): number[] {
  const at = wordPositions(tokenizer, prompt, words, options, field);
  if (at === undefined) throw new PipelineError('BAD_PROMPT', `${field}: "${words}" does not occur in the prompt "${prompt}" (as whole tokens); give words exactly as the prompt spells them.`, { field, words, prompt });
  return at;
}
