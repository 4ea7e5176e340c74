/**
 * The LoRA stack as plain data with pure operations (tested in Node; `app-state.svelte.ts` holds it
 * in `$state`). Unlimited entries; the same LoRA may appear twice (the engine adds the strengths),
 * but its trigger words go into the prompt once.
 */
import type { LoraCard, LoraPayload } from '../../pipelines/api/contract.ts';
import { addTriggerWords, removeTriggerWords } from './prompt-tokens.ts';

export interface StackEntry {
  /** Unique within the stack (drag-and-drop and region assignments refer to it). */
  readonly key: string;
  /** Library name (the `<lora:NAME>` name) or path. */
  readonly name: string;
  readonly path: string | null;
  /** Text-encoder and UNet strengths; equal unless split. */
  readonly te: number;
  readonly unet: number;
  readonly split: boolean;
  readonly enabled: boolean;
  readonly triggerWords: readonly string[];
}

/** The slider's range: A1111's −1…2, typed values up to the engine's ±10 limit. */
export const WEIGHT_MIN = -1;
export const WEIGHT_MAX = 2;
export const WEIGHT_LIMIT = 10;

let counter = 0;
export function newKey(): string {
  counter += 1;
  return `l${Date.now().toString(36)}${counter}`;
}

export function entryFromCard(card: LoraCard, key = newKey()): StackEntry {
  const w = card.preferredWeight ?? 1;
  const words = card.activationText !== null && card.activationText.trim() !== '' ? [card.activationText.trim()] : card.triggerWords.slice(0, 3);
  return { key, name: card.name, path: card.path, te: w, unet: w, split: false, enabled: true, triggerWords: words };
}

function wordsOfOthers(stack: readonly StackEntry[], except: string): string[] {
  return stack.filter((e) => e.key !== except && e.enabled).flatMap((e) => e.triggerWords);
}

export interface StackAndPrompt {
  readonly stack: readonly StackEntry[];
  readonly prompt: string;
}

/** Add an entry (at `index`, default the end) and its trigger words. */
export function addEntry(state: StackAndPrompt, entry: StackEntry, index = state.stack.length): StackAndPrompt {
  const stack = [...state.stack];
  stack.splice(Math.max(0, Math.min(index, stack.length)), 0, entry);
  return { stack, prompt: entry.enabled ? addTriggerWords(state.prompt, entry.triggerWords) : state.prompt };
}

/** Remove an entry and those of its trigger words no other enabled entry needs. */
export function removeEntry(state: StackAndPrompt, key: string): StackAndPrompt {
  const entry = state.stack.find((e) => e.key === key);
  if (entry === undefined) return state;
  return { stack: state.stack.filter((e) => e.key !== key), prompt: removeTriggerWords(state.prompt, entry.triggerWords, wordsOfOthers(state.stack, key)) };
}

/** Enable or disable an entry; its trigger words follow. */
export function setEnabled(state: StackAndPrompt, key: string, enabled: boolean): StackAndPrompt {
  const entry = state.stack.find((e) => e.key === key);
  if (entry === undefined || entry.enabled === enabled) return state;
  const stack = state.stack.map((e) => (e.key === key ? { ...e, enabled } : e));
  const prompt = enabled ? addTriggerWords(state.prompt, entry.triggerWords) : removeTriggerWords(state.prompt, entry.triggerWords, wordsOfOthers(state.stack, key));
  return { stack, prompt };
}

/** Move the entry `key` to position `to` (0-based, in the list without it). */
export function moveEntry(stack: readonly StackEntry[], key: string, to: number): StackEntry[] {
  const from = stack.findIndex((e) => e.key === key);
  if (from < 0) return [...stack];
  const out = stack.filter((e) => e.key !== key);
  out.splice(Math.max(0, Math.min(to, out.length)), 0, stack[from]!);
  return out;
}

/** Move `key` to just before `beforeKey` (or to the end when `beforeKey` is null): what a drop on a row does. */
export function moveBefore(stack: readonly StackEntry[], key: string, beforeKey: string | null): StackEntry[] {
  if (key === beforeKey) return [...stack];
  const rest = stack.filter((e) => e.key !== key);
  const at = beforeKey === null ? rest.length : rest.findIndex((e) => e.key === beforeKey);
  return moveEntry(stack, key, at < 0 ? rest.length : at);
}

function clampWeight(w: number): number {
  if (!Number.isFinite(w)) return 0;
  return Math.max(-WEIGHT_LIMIT, Math.min(WEIGHT_LIMIT, Math.round(w * 100) / 100));
}

/** Set the weight: both strengths when not split, else the named one. */
export function setWeight(stack: readonly StackEntry[], key: string, weight: number, which: 'both' | 'te' | 'unet' = 'both'): StackEntry[] {
  const w = clampWeight(weight);
  return stack.map((e) => {
    if (e.key !== key) return e;
    if (which === 'te') return { ...e, te: w };
    if (which === 'unet') return { ...e, unet: w };
    return { ...e, te: w, unet: w };
  });
}

/** Split the weight into TE/UNet, or join them again (UNet takes the TE value, as A1111's default). */
export function setSplit(stack: readonly StackEntry[], key: string, split: boolean): StackEntry[] {
  return stack.map((e) => (e.key !== key ? e : split ? { ...e, split } : { ...e, split, unet: e.te }));
}

/** The job's LoRA list: enabled entries in stack order. */
export function stackLoras(stack: readonly StackEntry[]): LoraPayload[] {
  return stack.filter((e) => e.enabled).map((e) => ({ name: e.name, te: e.te, unet: e.unet }));
}
