/**
 * The logic behind the stack, the region canvas and the prompt token picker, tested in Node (the
 * components call these pure modules; the browser test drives the components themselves).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { VALIDATORS, type LoraCard } from '../pipelines/api/contract.ts';
import { compositionPayload, conceptsFromJob } from '../renderer/lib/concept-payload.ts';
import { defaultForm, formFromPayload, formPayload } from '../renderer/lib/job-settings.ts';
import { addTriggerWords, bareText, conceptOwner, promptWords, pruneConcepts, removeTriggerWords, toggleConceptWord } from '../renderer/lib/prompt-tokens.ts';
import { MIN_BOX_PX, boxFromDrag, moveBox, refitRegions, regionAt, regionWarnings, regionsPayload, resizeBox, type Region } from '../renderer/lib/region-geometry.ts';
import { addEntry, entryFromCard, moveBefore, moveEntry, removeEntry, setEnabled, setSplit, setWeight, stackLoras, type StackEntry } from '../renderer/lib/stack-model.ts';

function card(name: string, triggerWords: string[] = [], extra: Partial<LoraCard> = {}): LoraCard {
  return {
    path: `/loras/${name}.safetensors`,
    name,
    alias: null,
    folder: '',
    baseModel: 'sd1',
    baseModelEvidence: '',
    triggerWords,
    activationText: null,
    preferredWeight: null,
    notes: null,
    hasPreview: false,
    sizeBytes: 1,
    problems: [],
    ...extra,
  };
}

const names = (stack: readonly StackEntry[]) => stack.map((e) => e.name);

// ---- stack ----

test('stack: adding LoRAs appends their trigger words once; removing takes back only words no other LoRA needs', () => {
  const a = entryFromCard(card('a', ['red hair', 'girl']), 'ka');
  const b = entryFromCard(card('b', ['girl', 'hat']), 'kb');
  let s = addEntry({ stack: [], prompt: 'a portrait' }, a);
  assert.equal(s.prompt, 'a portrait, red hair, girl');
  s = addEntry(s, b);
  assert.equal(s.prompt, 'a portrait, red hair, girl, hat');
  // Adding the same LoRA again (allowed: strengths add up) adds no words.
  s = addEntry(s, entryFromCard(card('a', ['red hair', 'girl']), 'ka2'));
  assert.deepEqual(names(s.stack), ['a', 'b', 'a']);
  assert.equal(s.prompt, 'a portrait, red hair, girl, hat');
  s = removeEntry(s, 'ka2');
  assert.equal(s.prompt, 'a portrait, red hair, girl, hat', 'the other "a" still needs its words');
  s = removeEntry(s, 'ka');
  assert.equal(s.prompt, 'a portrait, girl, hat', '"girl" stays for b');
  s = removeEntry(s, 'kb');
  assert.equal(s.prompt, 'a portrait');
  assert.deepEqual(s.stack, []);
});

test('stack: a trigger word already typed (even with emphasis) is not added again, and user text is kept', () => {
  const s = addEntry({ stack: [], prompt: '(red hair:1.2), sitting' }, entryFromCard(card('a', ['red hair', 'smile']), 'k'));
  assert.equal(s.prompt, '(red hair:1.2), sitting, smile');
  assert.equal(bareText('((Red Hair:1.2))'), 'red hair');
  const back = removeEntry(s, 'k');
  assert.equal(back.prompt, 'sitting', 'the word goes with its LoRA, whoever typed it');
});

test('stack: disabling takes the words out, enabling puts them back; disabled LoRAs stay out of the job', () => {
  let s = addEntry({ stack: [], prompt: 'x' }, entryFromCard(card('a', ['w1']), 'k'));
  s = setEnabled(s, 'k', false);
  assert.equal(s.prompt, 'x');
  assert.deepEqual(stackLoras(s.stack), []);
  s = setEnabled(s, 'k', true);
  assert.equal(s.prompt, 'x, w1');
  assert.deepEqual(stackLoras(s.stack), [{ name: 'a', te: 1, unet: 1 }]);
});

test('stack: reorder by index and by dropping before a row; weights clamp and split into TE/UNet', () => {
  let stack: StackEntry[] = ['a', 'b', 'c', 'd'].map((n) => entryFromCard(card(n), n));
  assert.deepEqual(names(moveEntry(stack, 'a', 2)), ['b', 'c', 'a', 'd']);
  assert.deepEqual(names(moveBefore(stack, 'd', 'a')), ['d', 'a', 'b', 'c']);
  assert.deepEqual(names(moveBefore(stack, 'a', null)), ['b', 'c', 'd', 'a']);
  assert.deepEqual(names(moveBefore(stack, 'b', 'b')), ['a', 'b', 'c', 'd']);
  stack = setWeight(stack, 'b', 0.733333);
  assert.deepEqual([stack[1]!.te, stack[1]!.unet], [0.73, 0.73]);
  stack = setSplit(stack, 'b', true);
  stack = setWeight(stack, 'b', 0.2, 'unet');
  assert.deepEqual([stack[1]!.te, stack[1]!.unet], [0.73, 0.2]);
  assert.deepEqual(stackLoras(stack)[1], { name: 'b', te: 0.73, unet: 0.2 });
  stack = setSplit(stack, 'b', false);
  assert.deepEqual([stack[1]!.te, stack[1]!.unet], [0.73, 0.73], 'joining takes the TE weight, as A1111 defaults UNet to TE');
  assert.equal(setWeight(stack, 'c', 99)[2]!.te, 10);
  assert.equal(setWeight(stack, 'c', Number.NaN)[2]!.te, 0);
});

test('stack: a card with an activation text or preferred weight starts with them', () => {
  const e = entryFromCard(card('a', ['t1', 't2', 't3', 't4'], { activationText: 'shiny armor', preferredWeight: 0.6 }));
  assert.deepEqual([e.te, e.unet, e.triggerWords], [0.6, 0.6, ['shiny armor']]);
  assert.deepEqual(entryFromCard(card('b', ['t1', 't2', 't3', 't4'])).triggerWords, ['t1', 't2', 't3'], 'at most three frequency tags');
});

// ---- region canvas ----

const region = (id: string, box: [number, number, number, number], extra: Partial<Region> = {}): Region => ({ id, kind: 'box', box, prompt: 'p', loraKey: 'k', color: '#fff', ...extra });

test('regions: a drag draws a box snapped to the 8-px latent grid inside the canvas, in any direction', () => {
  assert.deepEqual(boxFromDrag(10, 12, 100, 61, 512, 768), [8, 16, 96, 48]);
  assert.deepEqual(boxFromDrag(100, 61, 10, 12, 512, 768), [8, 16, 96, 48], 'dragging up-left gives the same box');
  assert.deepEqual(boxFromDrag(-50, -50, 9000, 9000, 640, 384), [0, 0, 640, 384], 'clamped to a wide canvas');
  assert.equal(boxFromDrag(10, 10, 12, 200, 512, 512), null, 'too thin');
  assert.equal(boxFromDrag(0, 0, MIN_BOX_PX - 5, 100, 512, 512), null, 'snaps below the minimum');
});

test('regions: move and resize keep boxes inside the canvas and above the minimum size', () => {
  const box = [64, 64, 128, 64] as const;
  assert.deepEqual(moveBox(box, 30, -10, 512, 512), [96, 56, 128, 64]);
  assert.deepEqual(moveBox(box, 1000, 1000, 512, 512), [384, 448, 128, 64], 'stopped at the edge');
  assert.deepEqual(moveBox(box, -1000, 0, 512, 512), [0, 64, 128, 64]);
  assert.deepEqual(resizeBox(box, 'se', 40, 40, 512, 512), [64, 64, 168, 104]);
  assert.deepEqual(resizeBox(box, 'nw', -16, -16, 512, 512), [48, 48, 144, 80], 'the opposite corner stays');
  assert.deepEqual(resizeBox(box, 'e', -1000, 0, 512, 512), [64, 64, MIN_BOX_PX, 64], 'never below the minimum');
  assert.deepEqual(resizeBox(box, 'n', 0, -1000, 512, 512), [64, 0, 128, 128], 'never past the top');
  assert.deepEqual(resizeBox(box, 's', 0, 1000, 512, 200), [64, 64, 128, 136], 'never past the bottom');
});

test('regions: hit testing picks the topmost box; a size change refits boxes to the new canvas', () => {
  const regions = [region('a', [0, 0, 256, 256]), region('b', [128, 128, 256, 256]), region('m', [0, 0, 512, 512], { kind: 'mask' })];
  assert.equal(regionAt(regions, 200, 200)?.id, 'b');
  assert.equal(regionAt(regions, 10, 10)?.id, 'a');
  assert.equal(regionAt(regions, 500, 20), undefined, 'masks are not picked by boxes');
  const wide = refitRegions(regions, 512, 512, 768, 512);
  assert.deepEqual(wide[1]!.box, [192, 128, 384, 256]);
  assert.deepEqual(wide[2]!.box, [0, 0, 768, 512]);
  for (const r of refitRegions(regions, 512, 512, 64, 64)) {
    const [x, y, w, h] = r.box;
    assert.ok(x >= 0 && y >= 0 && x + w <= 64 && y + h <= 64 && w >= MIN_BOX_PX && h >= MIN_BOX_PX, JSON.stringify(r.box));
  }
});

test('regions: a region with no LoRA or a removed LoRA is flagged; the job gets boxes, masks and LoRAs', () => {
  const regions = [region('a', [0, 0, 64, 64]), region('b', [64, 0, 64, 64], { loraKey: null, prompt: ' ' }), region('c', [0, 64, 64, 64], { loraKey: 'gone' }), region('m', [0, 0, 128, 128], { kind: 'mask', loraKey: null })];
  const warnings = regionWarnings(regions, ['k']);
  assert.deepEqual(warnings, [
    'Region 2 has no prompt: it will use the main prompt\'s look only.',
    'Region 2 has no LoRA: assign one from the stack, or it uses only its prompt.',
    "Region 3's LoRA was removed from the stack: assign another.",
    'Region 4 has no LoRA: assign one from the stack, or it uses only its prompt.',
  ]);
  const payload = regionsPayload(regions, (key) => (key === 'k' ? { name: 'lora_a', te: 0.5, unet: 0.7 } : undefined), { m: 'iVBORw0K' });
  assert.deepEqual(payload, [
    { box: [0, 0, 64, 64], prompt: 'p', lora: { name: 'lora_a', te: 0.5, unet: 0.7 } },
    { box: [64, 0, 64, 64], prompt: ' ' },
    { box: [0, 64, 64, 64], prompt: 'p' },
    { maskPng: 'iVBORw0K', prompt: 'p' },
  ]);
});

// ---- prompt token picker ----

test('token picker: the words of a prompt, without <lora:…> tags, weights or AND/BREAK', () => {
  const words = promptWords('a (red:1.2) cat AND <lora:cute_style:0.8> dog, BREAK blue-eyed hat');
  assert.deepEqual(words.map((w) => w.text), ['a', 'red', 'cat', 'dog', 'blue-eyed', 'hat']);
  const prompt = 'a (red:1.2) cat';
  const red = words[1]!;
  assert.equal(prompt.slice(red.start, red.end), 'red');
});

test('token picker: a click binds a word to the selected LoRA, a second click frees it, a word has one owner', () => {
  let c = toggleConceptWord({}, 'l1', 'Cat');
  assert.deepEqual(c, { l1: ['cat'] });
  c = toggleConceptWord(c, 'l2', 'dog');
  c = toggleConceptWord(c, 'l2', 'cat');
  assert.deepEqual(c, { l2: ['dog', 'cat'] }, 'cat moved from l1 to l2');
  assert.equal(conceptOwner(c, 'CAT'), 'l2');
  c = toggleConceptWord(c, 'l2', 'cat');
  assert.deepEqual(c, { l2: ['dog'] });
  assert.equal(conceptOwner(c, 'cat'), undefined);
  const pruned = pruneConcepts({ l1: ['cat', 'ghost'], gone: ['dog'] }, 'a cat and a dog', ['l1']);
  assert.deepEqual(pruned, { l1: ['cat'] }, 'words no longer in the prompt and removed LoRAs are dropped');
});

test('trigger words: add and remove by whole comma parts only', () => {
  assert.equal(addTriggerWords('', ['a', 'b']), 'a, b');
  assert.equal(addTriggerWords('cat,', ['hat']), 'cat, hat');
  assert.equal(removeTriggerWords('red hat, hat, a hat', ['hat']), 'red hat, a hat', 'only the exact part goes');
});

// ---- form ↔ job ----

test('form and job: random seeds are sent as -1, fixed ones as typed; a loaded job comes back into the form whole', () => {
  const form = { ...defaultForm(), prompt: 'x', seedMode: 'random' as const, seed: '77' };
  assert.equal(formPayload(form).seed, '-1');
  assert.equal(formPayload({ ...form, seedMode: 'fixed' }).seed, '77');
  const back = formFromPayload({ prompt: 'y', steps: 4, width: 64, height: 128, seed: '1234', sampler: 'Euler a', strategy: { name: 'switch', switchEvery: 3 } }, form);
  assert.deepEqual([back.prompt, back.steps, back.width, back.height, back.seedMode, back.seed, back.sampler, back.strategy, back.knobs], ['y', 4, 64, 128, 'fixed', '1234', 'Euler a', 'switch', { switchEvery: 3 }]);
  assert.deepEqual(formPayload(back).strategy, { name: 'switch', switchEvery: 3 });
});

// ---- concept words → the job (CLoRA, LoRA-Composer), where each LoRA acts ----

test('concepts: CLoRA makes each LoRA owning words a concept slot, in stack order, words as the prompt spells them; the others stay job LoRAs', () => {
  const cat = { ...entryFromCard(card('cat_lora'), 'kc'), te: 0.8, unet: 0.9 };
  const dog = entryFromCard(card('dog_lora'), 'kd');
  const style = entryFromCard(card('ink_style'), 'ks');
  const prompt = 'a Sks cat and a xyz DOG, ink';
  const concepts = toggleConceptWord(toggleConceptWord(toggleConceptWord(toggleConceptWord({}, 'kd', 'DOG'), 'kc', 'cat'), 'kc', 'Sks'), 'kd', 'xyz');
  const out = compositionPayload({ strategy: 'clora', prompt, stack: [style, cat, dog], regionLoras: [], regionPrompts: [], concepts });
  assert.deepEqual(out.loras, [{ name: 'ink_style', te: 1, unet: 1 }]);
  assert.deepEqual(out.concepts, [
    { words: 'Sks cat', lora: { name: 'cat_lora', te: 0.8, unet: 0.9 } },
    { words: 'xyz DOG', lora: { name: 'dog_lora', te: 1, unet: 1 } },
  ]);
  // a disabled LoRA is neither a concept nor a job LoRA
  const off = compositionPayload({ strategy: 'clora', prompt, stack: [style, cat, { ...dog, enabled: false }], regionLoras: [], regionPrompts: [], concepts });
  assert.deepEqual(off.concepts?.map((c) => c.lora?.name), ['cat_lora']);
  // the payload passes the API validator
  const job = VALIDATORS['jobs.generate']({ job: { prompt, loras: out.loras, strategy: { name: 'clora', concepts: out.concepts, clora: { stepSize: 10 } } } }, '');
  assert.equal(job.job.strategy?.concepts?.length, 2);
});

test('concepts: regions and LoRA-Composer keep region LoRAs out of the job LoRAs; Composer takes each region\'s words from its prompt', () => {
  const cat = entryFromCard(card('cat_lora'), 'kc');
  const dog = entryFromCard(card('dog_lora'), 'kd');
  const bg = entryFromCard(card('park'), 'kb');
  const concepts = toggleConceptWord(toggleConceptWord(toggleConceptWord({}, 'kc', 'cat'), 'kc', 'sks'), 'kd', 'dog');
  const input = { prompt: 'a sks cat and a dog in a park', stack: [bg, cat, dog], regionLoras: ['kc', 'kd', null], regionPrompts: ['a Sks Cat', 'a brown dog', 'grass'], concepts };
  const regions = compositionPayload({ ...input, strategy: 'regions' });
  assert.deepEqual(regions.loras.map((l) => l.name), ['park']);
  assert.equal(regions.concepts, undefined);
  const composer = compositionPayload({ ...input, strategy: 'lora-composer' });
  assert.deepEqual(composer.loras.map((l) => l.name), ['park']);
  assert.deepEqual(composer.concepts, [{ words: 'Sks Cat' }, { words: 'dog' }, { words: '' }]);
  // a region without concept words is refused by the validator, naming the field
  assert.throws(() => VALIDATORS['jobs.generate']({ job: { prompt: 'x', strategy: { name: 'lora-composer', concepts: composer.concepts } } }, ''), /strategy\.concepts\[2\]\.words/);
  // other strategies: every enabled stack LoRA applies to the whole image
  assert.deepEqual(compositionPayload({ ...input, strategy: 'merge' }).loras.map((l) => l.name), ['park', 'cat_lora', 'dog_lora']);
});

test('concepts: a loaded job gives the token picker its words back; dotted knobs nest in the payload and flatten back', () => {
  const map = conceptsFromJob('clora', [{ words: 'Sks cat' }, { words: 'xyz dog' }], (i) => ['k1', null][i] ?? null);
  assert.deepEqual(map, { k1: ['sks', 'cat'] });
  assert.deepEqual(conceptsFromJob('merge', [{ words: 'a' }], () => 'k'), {});
  const form = { ...defaultForm(), strategy: 'clora' as const, knobs: { 'clora.stepSize': 12, 'clora.latentUpdate': false } };
  const payload = formPayload(form);
  assert.deepEqual(payload.strategy, { name: 'clora', clora: { stepSize: 12, latentUpdate: false } });
  assert.deepEqual(formFromPayload(payload, defaultForm()).knobs, { 'clora.stepSize': 12, 'clora.latentUpdate': false });
});
