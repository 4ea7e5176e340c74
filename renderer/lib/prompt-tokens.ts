/**
 * Prompt text operations the UI needs, pure so they are tested in Node:
 * - trigger words follow their LoRA: added when it joins the stack, removed when it leaves, never
 *   twice, and a word another LoRA of the stack still needs stays;
 * - the token picker: the words of a prompt a user can click to bind to a LoRA (CLoRA / LoRA-Composer
 *   concept words).
 * Prompts are A1111 comma-separated parts; trigger words are compared as whole parts, ignoring case
 * and surrounding emphasis brackets, so `(red hair:1.2)` counts as `red hair`.
 */

/** The text of a comma part without emphasis wrapping: `((red hair:1.2))` → `red hair`. */
export function bareText(part: string): string {
  let t = part.trim();
  for (;;) {
    const m = /^[([](.*)[)\]]$/.exec(t);
    if (m === null) break;
    t = m[1]!.trim();
  }
  return t.replace(/:\s*-?\d*\.?\d+$/, '').trim().toLowerCase();
}

function parts(prompt: string): string[] {
  return prompt.split(',').map((p) => p.trim()).filter((p) => p !== '');
}

/** Whether the prompt already has `word` as a part (see `bareText`). */
export function hasPart(prompt: string, word: string): boolean {
  const w = bareText(word);
  return parts(prompt).some((p) => bareText(p) === w);
}

/** Append each word that the prompt does not already have, comma-separated. */
export function addTriggerWords(prompt: string, words: readonly string[]): string {
  let out = prompt.trim();
  for (const word of words) {
    const w = word.trim();
    if (w === '' || hasPart(out, w)) continue;
    out = out === '' ? w : `${out.replace(/,\s*$/, '')}, ${w}`;
  }
  return out;
}

/** Remove the parts equal to these words, except words in `keep` (still needed by another LoRA). */
export function removeTriggerWords(prompt: string, words: readonly string[], keep: readonly string[] = []): string {
  const drop = new Set(words.map(bareText).filter((w) => !keep.map(bareText).includes(w)));
  if (drop.size === 0) return prompt;
  const kept = prompt.split(',').filter((p) => !drop.has(bareText(p)));
  return kept
    .map((p) => p.trim())
    .filter((p, i, all) => p !== '' || (i > 0 && i < all.length - 1))
    .join(', ');
}

/** A clickable word of the prompt: its text and where it is. `<lora:…>` tags and weights are not words. */
export interface PromptWord {
  readonly text: string;
  readonly start: number;
  readonly end: number;
  /** Index among the prompt's words (stable while the text before it is unchanged). */
  readonly index: number;
}

export function promptWords(prompt: string): PromptWord[] {
  const words: PromptWord[] = [];
  const tags: Array<[number, number]> = [];
  for (const m of prompt.matchAll(/<[^<>]*>/g)) tags.push([m.index, m.index + m[0].length]);
  for (const m of prompt.matchAll(/[\p{L}\p{N}_'-]+/gu)) {
    const start = m.index;
    const end = start + m[0].length;
    if (tags.some(([a, b]) => start >= a && end <= b)) continue;
    // `:1.2` weights and bare numbers are syntax, not concepts.
    if (/^[\d.]+$/.test(m[0])) continue;
    if (m[0] === 'AND' || m[0] === 'BREAK') continue;
    words.push({ text: m[0], start, end, index: words.length });
  }
  return words;
}

/** Concept words per stack entry (by stack key): which words of the prompt stand for which LoRA. */
export type ConceptMap = Readonly<Record<string, readonly string[]>>;

/**
 * Click on `word` with `owner` selected: assign it to `owner`, or take it back when `owner` already has
 * it. A word belongs to one LoRA at most (the methods bind each concept to one LoRA).
 */
export function toggleConceptWord(concepts: ConceptMap, owner: string, word: string): ConceptMap {
  const w = word.toLowerCase();
  const had = (concepts[owner] ?? []).includes(w);
  const out: Record<string, string[]> = {};
  for (const [k, list] of Object.entries(concepts)) {
    const rest = list.filter((x) => x !== w);
    if (rest.length > 0) out[k] = rest;
  }
  if (!had) out[owner] = [...(out[owner] ?? []), w];
  return out;
}

/** Who owns a word, if anyone. */
export function conceptOwner(concepts: ConceptMap, word: string): string | undefined {
  const w = word.toLowerCase();
  return Object.keys(concepts).find((k) => concepts[k]!.includes(w));
}

/** Drop words that are no longer in the prompt and owners no longer in the stack. */
export function pruneConcepts(concepts: ConceptMap, prompt: string, owners: readonly string[]): ConceptMap {
  const present = new Set(promptWords(prompt).map((w) => w.text.toLowerCase()));
  const out: Record<string, string[]> = {};
  for (const [k, list] of Object.entries(concepts)) {
    if (!owners.includes(k)) continue;
    const kept = list.filter((w) => present.has(w));
    if (kept.length > 0) out[k] = kept;
  }
  return out;
}
