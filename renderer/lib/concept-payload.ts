/**
 * Which LoRAs a job applies where, from the stack, the regions and the concept words the user
 * clicked (token picker). Pure, tested in Node.
 *
 * - plain / merge / switch / composite / cmlora: every enabled stack LoRA is a job LoRA.
 * - regions, lora-composer: a LoRA assigned to a region acts inside its region only, so it is not
 *   also a job LoRA (that would apply it everywhere and blend the concepts); the others stay global.
 *   LoRA-Composer also needs each region's concept words: the words its LoRA owns, as the region's
 *   prompt spells them.
 * - clora: each enabled LoRA that owns concept words becomes concept k (prompt slot k + 1, the job's
 *   prompt, its words), in stack order; LoRAs without words (a style LoRA) apply to every slot.
 */
import type { ConceptPayload, LoraPayload, StrategyNameWire } from '../../pipelines/api/contract.ts';
import { promptWords, type ConceptMap } from './prompt-tokens.ts';
import type { StackEntry } from './stack-model.ts';

export interface CompositionInput {
  readonly strategy: StrategyNameWire;
  readonly prompt: string;
  readonly stack: readonly StackEntry[];
  /** Stack key of each region's LoRA (null: none), in region order. */
  readonly regionLoras: readonly (string | null)[];
  /** The prompt of each region, in region order. */
  readonly regionPrompts: readonly string[];
  readonly concepts: ConceptMap;
}

export interface CompositionPayload {
  readonly loras: LoraPayload[];
  readonly concepts?: ConceptPayload[];
}

/** `owned` words (lower case) as `text` spells them, in its order, each once; joined by spaces. */
export function spelledWords(text: string, owned: readonly string[]): string {
  const seen = new Set<string>();
  const out: string[] = [];
  for (const w of promptWords(text)) {
    const lower = w.text.toLowerCase();
    if (!owned.includes(lower) || seen.has(lower)) continue;
    seen.add(lower);
    out.push(w.text);
  }
  return out.join(' ');
}

const lora = (e: StackEntry): LoraPayload => ({ name: e.name, te: e.te, unet: e.unet });

export function compositionPayload(input: CompositionInput): CompositionPayload {
  const enabled = input.stack.filter((e) => e.enabled);
  if (input.strategy === 'clora') {
    const owners = enabled.filter((e) => (input.concepts[e.key] ?? []).length > 0);
    return {
      loras: enabled.filter((e) => !owners.includes(e)).map(lora),
      concepts: owners.map((e) => ({ words: spelledWords(input.prompt, input.concepts[e.key]!) || input.concepts[e.key]!.join(' '), lora: lora(e) })),
    };
  }
  if (input.strategy === 'regions' || input.strategy === 'lora-composer') {
    const inRegions = new Set(input.regionLoras.filter((k): k is string => k !== null));
    const loras = enabled.filter((e) => !inRegions.has(e.key)).map(lora);
    if (input.strategy === 'regions') return { loras };
    const concepts = input.regionLoras.map((key, r) => {
      const owned = key === null ? [] : (input.concepts[key] ?? []);
      return { words: spelledWords(input.regionPrompts[r] ?? '', owned) || owned.join(' ') };
    });
    return { loras, concepts };
  }
  return { loras: enabled.map(lora) };
}

/**
 * A loaded job's concepts back into the token picker's map, given the stack keys its LoRAs got:
 * CLoRA concept k → the key of its LoRA, LoRA-Composer concept r → region r's LoRA key.
 */
export function conceptsFromJob(strategy: StrategyNameWire, concepts: readonly ConceptPayload[], keyOfConcept: (index: number) => string | null): ConceptMap {
  if (strategy !== 'clora' && strategy !== 'lora-composer') return {};
  const out: Record<string, string[]> = {};
  concepts.forEach((c, i) => {
    const key = keyOfConcept(i);
    if (key === null) return;
    const words = c.words.toLowerCase().split(/\s+/).filter((w) => w !== '');
    out[key] = [...new Set([...(out[key] ?? []), ...words])];
  });
  return out;
}
