/**
 * A1111 infotext (`pipelines/prompt/infotext.ts`) against `shared/realworld`: the version and
 * back-compat cases of `prompts/a1111_infotext_tests.json`, every A1111-style infotext recorded in
 * `manifest.json` (its exact text and A1111's split of it), exact re-creation of real A1111 infotexts
 * from their parameters, and format → parse round trips.
 */
import { test, describe } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import {
  applyInfotextBackcompat,
  formatInfotext,
  formatInfotextVersion,
  infotextValueText,
  parseInfotext,
  parseInfotextVersion,
  parseLoraHashes,
  quoteInfotextValue,
  splitSamplerName,
  unquoteInfotextValue,
} from '../pipelines/prompt/infotext.ts';
import type { InfotextParams, InfotextValue, ParsedInfotext } from '../pipelines/prompt/infotext.ts';
import { PipelineError } from '../pipelines/errors.ts';
import { REALWORLD, readManifest } from './fixtures.ts';

interface InfotextTable {
  parse_version: Array<{ input: string | null; expected?: null; expected_str?: string }>;
  backcompat: Array<{
    setting_auto_backcompat: boolean;
    input: Record<string, string>;
    expected_after?: Record<string, string>;
    expected_added?: Record<string, boolean>;
  }>;
  infotext_docstring_example: { text: string };
}

interface ManifestInfotext {
  file: string;
  source: string;
  infotext: string;
  textFields: string[];
  parsed: { prompt: string; negative_prompt: string; params: Array<[string, string]> };
}

const table = JSON.parse(fs.readFileSync(path.join(REALWORLD, 'prompts/a1111_infotext_tests.json'), 'utf-8')) as InfotextTable;
const manifest = readManifest(path.join(REALWORLD, 'manifest.json')) as {
  images: Array<{
    file: string;
    text_fields: Array<{ text?: string }>;
    interpretation: { a1111_infotext?: Array<{ source: string; infotext: string; parsed_a1111_rules: ManifestInfotext['parsed'] }> };
  }>;
};
const manifestInfotexts: ManifestInfotext[] = manifest.images.flatMap((im) =>
  (im.interpretation.a1111_infotext ?? []).map((a) => ({
    file: im.file,
    source: a.source,
    infotext: a.infotext,
    textFields: im.text_fields.map((t) => t.text ?? ''),
    parsed: a.parsed_a1111_rules,
  })),
);
/** Images in the manifest with an A1111-style infotext (README table). */
const MANIFEST_INFOTEXT_COUNT = 13;

function infotextOf(file: string): string {
  const found = manifestInfotexts.find((m) => m.file === file);
  assert.ok(found, `${file} is in the manifest`);
  return found.infotext;
}

function assertRejects(fn: () => unknown, code: string, culprit: string): void {
  assert.throws(fn, (e: unknown) => {
    assert.ok(e instanceof PipelineError, `expected a PipelineError, got ${String(e)}`);
    assert.equal(e.code, code);
    assert.ok(e.message.includes(culprit), `message should name ${JSON.stringify(culprit)}: ${e.message}`);
    return true;
  });
}

describe('infotext versions and back-compat (a1111_infotext_tests.json)', () => {
  for (const c of table.parse_version) {
    test(`parse_version(${JSON.stringify(c.input)})`, () => {
      const v = parseInfotextVersion(c.input);
      assert.equal(v === null ? null : formatInfotextVersion(v), c.expected_str ?? null);
    });
  }

  for (const [i, c] of table.backcompat.entries()) {
    test(`backcompat case ${i + 1}: ${JSON.stringify(c.input)} with auto_backcompat ${c.setting_auto_backcompat}`, () => {
      const fields = new Map<string, InfotextValue>(Object.entries(c.input));
      if (c.setting_auto_backcompat) applyInfotextBackcompat(fields);
      const expected = c.expected_after ?? { ...c.input, ...c.expected_added };
      assert.deepEqual(Object.fromEntries(fields), expected);
    });
  }

  test('the auto_backcompat option of parseInfotext', () => {
    const text = '[old]\nSteps: 20, Sampler: DDIM, CFG scale: 7, Seed: 1, Size: 512x512, Refiner: yes, Version: 1.5.0';
    const on = parseInfotext(text).fields;
    for (const flag of ['Old prompt editing timelines', 'Pad conds v0', 'Downcast alphas_cumprod', 'Refiner switch by sampling steps']) assert.equal(on.get(flag), true, flag);
    const off = parseInfotext(text, { autoBackcompat: false }).fields;
    assert.equal(off.has('Old prompt editing timelines'), false);
    assert.equal(off.get('Refiner switch by sampling steps'), false);
  });

  test('the Version shapes seen in real images', () => {
    const show = (t: string) => {
      const v = parseInfotextVersion(t);
      return v === null ? null : formatInfotextVersion(v);
    };
    assert.equal(show('v1.10.1'), '1.10.1');
    assert.equal(show('v1.6.0-RC-28-gabc'), '1.6.0rc0');
    assert.equal(show('neo'), null);
    assert.equal(show('56a8aea'), null);
    assert.equal(show('f2.0.1v1.10.1-previous-313-g8bd7e055'), null);
  });

  test('the parse_generation_parameters docstring example', () => {
    const r = parseInfotext(table.infotext_docstring_example.text);
    assert.ok(r.prompt.startsWith("girl with an artist's beret") && r.prompt.endsWith('detailed, intricate'));
    assert.ok(r.negativePrompt.startsWith('ugly, fat') && r.negativePrompt.endsWith('messy drawing'));
    assert.deepEqual(r.pairs, [['Steps', '20'], ['Sampler', 'Euler a'], ['CFG scale', '7'], ['Seed', '965400086'], ['Size', '512x512'], ['Model hash', '45dee52b']]);
    assert.deepEqual([r.steps, r.sampler, r.scheduleType, r.cfgScale, r.seed, r.width, r.height, r.modelHash, r.clipSkip, r.rng], [20, 'Euler a', 'Automatic', 7, 965400086, 512, 512, '45dee52b', 1, 'GPU']);
    assert.equal(r.fields.get('Emphasis'), 'Original');
  });
});

describe('every A1111 infotext of manifest.json splits as A1111 splits it', () => {
  test(`the manifest has ${MANIFEST_INFOTEXT_COUNT} of them, each one of the image's decoded text fields`, () => {
    assert.equal(manifestInfotexts.length, MANIFEST_INFOTEXT_COUNT);
    for (const m of manifestInfotexts) assert.ok(m.textFields.includes(m.infotext), m.file);
  });

  for (const m of manifestInfotexts) {
    test(`${m.file} (${m.source})`, () => {
      const r = parseInfotext(m.infotext);
      assert.equal(r.prompt, m.parsed.prompt);
      assert.equal(r.negativePrompt, m.parsed.negative_prompt);
      assert.deepEqual(r.pairs, m.parsed.params);
    });
  }

  test('typed fields of the real images', () => {
    const typed = (file: string) => {
      const r = parseInfotext(infotextOf(file));
      return { steps: r.steps, sampler: r.sampler, scheduleType: r.scheduleType, cfgScale: r.cfgScale, seed: r.seed, width: r.width, height: r.height, clipSkip: r.clipSkip, rng: r.rng, loraHashes: r.loraHashes, version: r.version };
    };
    assert.deepEqual(typed('png/a1111_v1.10.1_sd15_lora.png'), {
      steps: 20, sampler: 'DPM++ 2M', scheduleType: 'Karras', cfgScale: 7, seed: 2416316665, width: 512, height: 512, clipSkip: 1, rng: 'GPU',
      loraHashes: [{ name: '1950-lora', hash: '1943b499d497' }], version: 'v1.10.1',
    });
    // Old combined name: A1111 splits the scheduler off the sampler name.
    assert.deepEqual(typed('png/a1111_v1.4_regional_prompter_grid.png'), {
      steps: 20, sampler: 'DPM++ 2M', scheduleType: 'Karras', cfgScale: 7, seed: 3785438397, width: 512, height: 768, clipSkip: 2, rng: 'GPU', loraHashes: [], version: undefined,
    });
    assert.deepEqual(typed('png/forge_neo.jpeg'), {
      steps: 24, sampler: 'Euler a', scheduleType: 'Automatic', cfgScale: 6, seed: 2417156106, width: 1024, height: 1024, clipSkip: 2, rng: 'CPU', loraHashes: [], version: 'neo',
    });
    assert.deepEqual(typed('png/stability_matrix_utf8_in_text.png').sampler, 'Euler Ancestral');
    assert.deepEqual(typed('png/stability_matrix_utf8_in_text.png').scheduleType, 'Karras');
    assert.deepEqual(typed('png/comfyui_saveimagewithmetadata.jpeg').sampler, 'euler_ancestral_karras');
    assert.deepEqual(typed('png/comfyui_saveimagewithmetadata.jpeg').seed, 347382230306562);
  });

  test('A1111 dict view: size split, defaults, back-compat flags', () => {
    const v14 = parseInfotext(infotextOf('png/a1111_v1.4_lora_hashes_no_negative.png')).fields;
    assert.equal(v14.get('Size-1'), '512');
    assert.equal(v14.get('Size-2'), '512');
    assert.equal(v14.has('Size'), false);
    assert.equal(v14.get('Clip skip'), '1');
    assert.equal(v14.get('Schedule type'), 'Automatic');
    assert.equal(v14.get('Hires sampler'), 'Use same sampler');
    assert.equal(v14.get('Downcast alphas_cumprod'), true);
    assert.equal(v14.get('Negative prompt'), '');
    assert.equal(v14.has('Emphasis'), false);
    const civitai = parseInfotext(infotextOf('png/civitai_generator.jpeg'));
    // An unquoted JSON value runs to the first comma, as in A1111.
    assert.equal(civitai.fields.get('Civitai resources'), '[{"type":"checkpoint"');
  });
});

describe('formatInfotext re-creates real A1111 infotexts exactly', () => {
  test('v1.10.1: Schedule type, Lora hashes, Version', () => {
    const p: InfotextParams = {
      prompt: '<lora:1950-lora:1>A guitar made of ice cream that melts when you play it. On a white background. realistically.',
      negativePrompt: 'Black background. colored background.',
      steps: 20, sampler: 'DPM++ 2M', scheduleType: 'Karras', cfgScale: 7, seed: 2416316665, width: 512, height: 512,
      modelHash: '6ce0161689', model: 'v1-5-pruned-emaonly', loraHashes: [{ name: '1950-lora', hash: '1943b499d497' }], version: 'v1.10.1',
    };
    assert.equal(formatInfotext(p), infotextOf('png/a1111_v1.10.1_sd15_lora.png'));
  });

  test('v1.4.0: no negative prompt line, old sampler field', () => {
    const p: InfotextParams = {
      prompt: '<lora:Pecha_Swords_LORA_V1.2:0.9>, axe, highly detailed, sharp focus', negativePrompt: '',
      steps: 32, sampler: 'DPM++ 2S a', cfgScale: 17, seed: 1176667649, width: 512, height: 512,
      modelHash: 'fc2511737a', model: 'chilloutmix_NiPrunedFp32Fix', loraHashes: [{ name: 'Pecha_Swords_LORA_V1.2', hash: 'f4c3c4a69a0e' }], version: 'v1.4.0',
    };
    assert.equal(formatInfotext(p), infotextOf('png/a1111_v1.4_lora_hashes_no_negative.png'));
  });

  test('multi-line prompt with blank line, Clip skip, ENSD at its fixed place, quoted extension values', () => {
    const p: InfotextParams = {
      prompt: 'girl in street shirt,shortshorts daytime BREAK\n(forest printed:1.3) T-shirt ,shirt\n',
      negativePrompt: '(worst quality, low quality, normal quality:1.4),\u3000(bag,wallet:1.5), (glasses,large breasts,night, dark:1.3)',
      steps: 20, sampler: 'DPM++ 2M Karras', cfgScale: 7, seed: 3785438397, width: 512, height: 768,
      modelHash: '099e07547a', model: 'illust_darkSushiMixMix_brighterPruned', clipSkip: 2,
      extra: [
        ['RP Active', true], ['RP Divide mode', 'Prompt'], ['RP Calc Mode', 'Attention'], ['RP Ratios', '1,1,1,1'], ['RP Base Ratios', 0.2],
        ['RP Use Base', false], ['RP Use Common', false], ['RP Use Ncommon', false], ['RP Change AND', false], ['RP LoRA Neg Te Ratios', 0],
        ['RP LoRA Neg U Ratios', 0], ['RP threshold', 0.7],
        // Passed last, written at A1111's fixed place right after Clip skip.
        ['ENSD', 31337],
      ],
    };
    assert.equal(formatInfotext(p), infotextOf('png/a1111_v1.4_regional_prompter_grid.png'));
  });

  test('v1.5.0: Denoising strength at its fixed place, ControlNet values with commas and colons', () => {
    const p: InfotextParams = {
      prompt: 'a man in a suit and tie standing in front of flags and a flag of the united states in the background, private press, a character portrait, profile picture, Beeple',
      negativePrompt: '(worst quality:1.6, low quality:1.6), (zombie, sketch, interlocked fingers, comic)',
      steps: 30, sampler: 'DPM++ 2M Karras', cfgScale: 7, seed: 707828635, width: 512, height: 512, modelHash: '54ef3e3610', model: 'meinamix_meinaV11',
      extra: [
        ['ControlNet 0', 'Module: canny, Model: control_sd15_canny [fef5e48e], Weight: 1, Resize Mode: Crop and Resize, Low Vram: False, Processor Res: 512, Threshold A: 100, Threshold B: 200, Guidance Start: 0, Guidance End: 1, Pixel Perfect: True, Control Mode: Balanced'],
        ['ControlNet 1', 'Module: lineart_standard (from white bg & black line), Model: control_v11p_sd15_lineart [43d4be0d], Weight: 1, Resize Mode: Crop and Resize, Low Vram: False, Processor Res: 512, Guidance Start: 0, Guidance End: 1, Pixel Perfect: True, Control Mode: My prompt is more important'],
        ['Denoising strength', 0.5],
      ],
      version: 'v1.5.0',
    };
    assert.equal(formatInfotext(p), infotextOf('png/a1111_v1.5_controlnet_img2img.png'));
  });

  test('Forge: Schedule type Automatic, Clip skip, RNG CPU; non-ASCII multi-line prompt (v1.10.1 WebP)', () => {
    assert.equal(
      formatInfotext({
        prompt: 'general, masterpiece, best quality, amazing quality, \n1girl, solo, hatsune miku,\n', negativePrompt: 'bad quality, worst quality, worst detail, sketch, censor, \n',
        steps: 24, sampler: 'Euler a', scheduleType: 'Automatic', cfgScale: 6, seed: 2417156106, width: 1024, height: 1024,
        modelHash: '45a21ea00a', model: 'waiIllustriousSDXL_v160', clipSkip: 2, rng: 'CPU', version: 'neo',
      }),
      infotextOf('png/forge_neo.jpeg'),
    );
    assert.equal(
      formatInfotext({
        prompt: 'general, masterpiece, best quality, amazing quality, \n1girl, solo, hatsune miku, テスト\n', negativePrompt: 'bad quality, worst quality, worst detail, sketch, censor, \n',
        steps: 20, sampler: 'DPM++ 2M', scheduleType: 'Karras', cfgScale: 5.5, seed: 1028435836, width: 1024, height: 1024,
        modelHash: '45a21ea00a', model: 'waiIllustriousSDXL_v160', version: 'v1.10.1',
      }),
      infotextOf('png/a1111_v1.10.1_exif.webp'),
    );
  });

  test('Clip skip 1 and RNG GPU are left out; a value equal to its key is written bare; User comes after Version', () => {
    const text = formatInfotext({
      prompt: 'p', negativePrompt: '', steps: 1, sampler: 'Euler', cfgScale: 1.5, seed: 0, width: 64, height: 64, clipSkip: 1, rng: 'GPU',
      extra: [['User', 'me'], ['Flag', 'Flag']], version: 'v1.10.1',
    });
    assert.equal(text, 'p\nSteps: 1, Sampler: Euler, CFG scale: 1.5, Seed: 0, Size: 64x64, Flag, Version: v1.10.1, User: me');
  });
});

describe('quote rule and values', () => {
  test('quote(): JSON only for values with a comma, colon or newline, non-ASCII kept', () => {
    assert.equal(quoteInfotextValue('plain value'), 'plain value');
    assert.equal(quoteInfotextValue('say "hi"'), 'say "hi"');
    assert.equal(quoteInfotextValue('a: 1, b: 2'), '"a: 1, b: 2"');
    assert.equal(quoteInfotextValue('line\nbreak'), '"line\\nbreak"');
    assert.equal(quoteInfotextValue('テスト: "x"\\'), '"テスト: \\"x\\"\\\\"');
  });

  test('unquote(): JSON strings decoded, anything else kept', () => {
    assert.equal(unquoteInfotextValue('"a: 1, b: 2"'), 'a: 1, b: 2');
    assert.equal(unquoteInfotextValue('"\\u00e9\\n"'), 'é\n');
    assert.equal(unquoteInfotextValue('"bad \\x"'), '"bad \\x"');
    assert.equal(unquoteInfotextValue('"'), '"');
    assert.equal(unquoteInfotextValue('x"'), 'x"');
  });

  test('numbers and booleans are written as Python str() writes them', () => {
    assert.deepEqual([7, 5.5, 0.1 + 0.2, 1e-5, 1.5e-7, 2.5e16, 1e16 + 0.5, true, false].map(infotextValueText), ['7', '5.5', '0.30000000000000004', '1e-05', '1.5e-07', '25000000000000000', '10000000000000000', 'True', 'False']);
  });

  test('Lora hashes: names lose ":" and ","; read back item by item', () => {
    const text = formatInfotext({ prompt: 'p', negativePrompt: '', steps: 1, sampler: 'Euler', cfgScale: 7, seed: 1, width: 64, height: 64, loraHashes: [{ name: 'a:b,c', hash: '0123456789ab' }, { name: 'd', hash: 'ba9876543210' }] });
    assert.ok(text.endsWith('Lora hashes: "abc: 0123456789ab, d: ba9876543210"'), text);
    assert.deepEqual(parseLoraHashes('abc: 0123456789ab, d: ba9876543210, broken'), [{ name: 'abc', hash: '0123456789ab' }, { name: 'd', hash: 'ba9876543210' }]);
  });
});

describe('sampler names: get_sampler_and_scheduler', () => {
  const cases: Array<[string, string | undefined, string, string]> = [
    ['DPM++ 2M Karras', undefined, 'DPM++ 2M', 'Karras'],
    ['DPM++ 2M Karras', 'Automatic', 'DPM++ 2M', 'Karras'],
    ['DPM++ 2M', 'Karras', 'DPM++ 2M', 'Karras'],
    ['DPM++ 2M', 'karras', 'DPM++ 2M', 'Karras'],
    ['Euler a', undefined, 'Euler a', 'Automatic'],
    ['DPM++ 2M SDE Exponential', undefined, 'DPM++ 2M SDE', 'Exponential'],
    ['Euler a SGMUniform', undefined, 'Euler a', 'SGM Uniform'],
    ['Euler sgm_uniform', undefined, 'Euler', 'SGM Uniform'],
    ['DDIM', undefined, 'DDIM', 'Automatic'],
    ['UniPC', 'Align Your Steps', 'UniPC', 'Align Your Steps'],
    ['Euler', 'Some Future Scheduler', 'Euler', 'Some Future Scheduler'],
    // Schedulers are tried in A1111's order, each once: Uniform is cut first, then Karras.
    ['X Karras Uniform', undefined, 'X', 'Karras'],
  ];
  for (const [sampler, scheduleType, name, label] of cases) {
    test(`${sampler} / ${String(scheduleType)}`, () => {
      assert.deepEqual(splitSamplerName(sampler, scheduleType), { sampler: name, scheduleType: label });
    });
  }
});

/**
 * What parseInfotext should give back for params written by formatInfotext. `extra` is compared as a
 * key → value record: keys with a fixed A1111 place move there (the exact-layout tests check order).
 */
function expectedTyped(p: InfotextParams): Record<string, unknown> {
  return {
    prompt: p.prompt,
    negativePrompt: p.negativePrompt,
    steps: p.steps,
    sampler: p.sampler,
    scheduleType: p.scheduleType ?? 'Automatic',
    cfgScale: p.cfgScale,
    seed: p.seed,
    width: p.width,
    height: p.height,
    modelHash: p.modelHash,
    model: p.model,
    clipSkip: p.clipSkip ?? 1,
    rng: p.rng ?? 'GPU',
    loraHashes: p.loraHashes ?? [],
    extra: Object.fromEntries((p.extra ?? []).map(([k, v]) => [k, infotextValueText(v)])),
    version: p.version,
  };
}

function typedOf(r: ParsedInfotext): Record<string, unknown> {
  const { prompt, negativePrompt, steps, sampler, scheduleType, cfgScale, seed, width, height, modelHash, model, clipSkip, rng, loraHashes, extra, version } = r;
  return { prompt, negativePrompt, steps, sampler, scheduleType, cfgScale, seed, width, height, modelHash, model, clipSkip, rng, loraHashes, extra: Object.fromEntries(extra), version };
}

describe('round trips: formatInfotext → parseInfotext gives the same typed params', () => {
  const base: InfotextParams = { prompt: 'a cat', negativePrompt: '', steps: 20, sampler: 'Euler a', cfgScale: 7, seed: 1234, width: 512, height: 512 };
  const sets: Array<[string, InfotextParams]> = [
    ['minimal', base],
    ['everything typed', {
      ...base, negativePrompt: 'blurry', scheduleType: 'Karras', sampler: 'DPM++ 2M', cfgScale: 6.5, seed: 4294967295, width: 768, height: 512,
      modelHash: '6ce0161689', model: 'v1-5-pruned-emaonly', clipSkip: 2, rng: 'CPU', loraHashes: [{ name: 'style', hash: '1943b499d497' }, { name: 'detail-tweaker', hash: 'ee2ac3e8a6ea' }], version: 'v1.10.1',
    }],
    ['multi-line prompts', { ...base, prompt: 'line one,\nline two (x:1.2)\n[a:b:0.5]', negativePrompt: 'bad,\nworse' }],
    ['non-ASCII', { ...base, prompt: '初音ミク, テスト, Dalí, 🎨', negativePrompt: 'ぼやけた', model: 'モデル', extra: [['Comment', 'ça va, très bien']] }],
    ['quotes, commas, colons and newlines in values', {
      ...base,
      extra: [
        ['TI hashes', 'easynegative: c74b4e810b03, bad-hands-5: aa7651be154c'],
        ['Note', 'she said "hi", then: left\nand a \\ backslash'],
        ['Plain quote', 'a "b" c'],
        ['Denoising strength', 0.45],
        ['Hires upscale', 2],
        ['Tiling', true],
        ['Schedule rho', 0.0001],
      ],
      loraHashes: [{ name: 'x', hash: '0123456789ab' }],
    }],
    ['a prompt with an infotext-looking line', { ...base, prompt: 'a: b, c: d\ne: f', negativePrompt: 'Negative-ish: yes, no: maybe' }],
  ];
  for (const [name, p] of sets) {
    test(name, () => {
      assert.deepEqual(typedOf(parseInfotext(formatInfotext(p))), expectedTyped(p));
    });
  }

  test('a value A1111 would not read back as written (documented): a value in quotes without , : or newline', () => {
    const r = parseInfotext(formatInfotext({ ...base, extra: [['Quote', '"quoted"']] }));
    assert.deepEqual(r.extra, [['Quote', 'quoted']]);
  });
});

describe('robustness', () => {
  test('a 200 KB single-line prompt without colons, and one full of key-like text', () => {
    const words = 'masterpiece best quality '.repeat(8_000);
    const r = parseInfotext(`${words}\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 512x512`);
    assert.equal(r.prompt, words.trim());
    assert.equal(r.steps, 20);
    const keyish = 'a b c d e f g'.repeat(16_000);
    assert.deepEqual(parseInfotext(keyish).pairs, []);
    const manyPairs = 'key: v, '.repeat(30_000);
    assert.equal(parseInfotext(manyPairs).pairs.length, 30_000);
  });

  test('text that is not an infotext still parses: everything is prompt', () => {
    const r = parseInfotext('just a prompt\nover two lines');
    assert.equal(r.prompt, 'just a prompt\nover two lines');
    assert.deepEqual(r.pairs, []);
    assert.equal(r.steps, undefined);
    assert.equal(r.clipSkip, 1);
    // Two `key: value` pairs are not enough for a parameter line.
    const two = parseInfotext('a cat\nSteps: 20, Sampler: Euler');
    assert.equal(two.prompt, 'a cat\nSteps: 20, Sampler: Euler');
    assert.deepEqual(two.pairs, []);
    const three = parseInfotext('a cat\nSteps: 20, Sampler: Euler, Seed: 3');
    assert.equal(three.prompt, 'a cat');
    assert.equal(three.pairs.length, 3);
    const empty = parseInfotext('');
    assert.equal(empty.prompt, '');
    assert.equal(empty.negativePrompt, '');
  });

  test('a prompt whose emphasis weight is not a number does not stop the read', () => {
    const r = parseInfotext('(a:1.2.3)\nSteps: 20, Sampler: Euler, CFG scale: 7');
    assert.equal(r.prompt, '(a:1.2.3)');
    assert.equal(r.fields.has('Emphasis'), false);
  });
});

describe('rejects', () => {
  const base: InfotextParams = { prompt: 'p', negativePrompt: '', steps: 20, sampler: 'Euler', cfgScale: 7, seed: 1, width: 512, height: 512 };

  test('steps, size, seed, clip skip and CFG that are not valid numbers', () => {
    assertRejects(() => formatInfotext({ ...base, steps: 0 }), 'BAD_ARGUMENT', 'steps');
    assertRejects(() => formatInfotext({ ...base, steps: 2.5 }), 'BAD_ARGUMENT', 'steps');
    assertRejects(() => formatInfotext({ ...base, width: -512 }), 'BAD_ARGUMENT', 'width');
    assertRejects(() => formatInfotext({ ...base, height: Number.NaN }), 'BAD_ARGUMENT', 'height');
    assertRejects(() => formatInfotext({ ...base, seed: 1.5 }), 'BAD_ARGUMENT', 'seed');
    assertRejects(() => formatInfotext({ ...base, clipSkip: 0 }), 'BAD_ARGUMENT', 'clipSkip');
    assertRejects(() => formatInfotext({ ...base, cfgScale: Infinity }), 'BAD_ARGUMENT', 'cfgScale');
  });

  test('extra keys A1111 could not read back, or that repeat a field', () => {
    assertRejects(() => formatInfotext({ ...base, extra: [['Bad: key', 1]] }), 'BAD_ARGUMENT', 'Bad: key');
    assertRejects(() => formatInfotext({ ...base, extra: [['X', 1]] }), 'BAD_ARGUMENT', '"X"');
    assertRejects(() => formatInfotext({ ...base, extra: [['Steps', 30]] }), 'BAD_ARGUMENT', 'Steps');
    assertRejects(() => formatInfotext({ ...base, extra: [['Note', 'a'], ['Note', 'b']] }), 'BAD_ARGUMENT', 'Note');
    assertRejects(() => formatInfotext({ ...base, loraHashes: [{ name: 'a', hash: 'b' }], extra: [['Lora hashes', 'x: y']] }), 'BAD_ARGUMENT', 'Lora hashes');
  });
});
