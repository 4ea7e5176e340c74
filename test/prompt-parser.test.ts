/**
 * A1111 prompt syntax (`pipelines/prompt/a1111.ts`) against A1111's own doctests
 * (`shared/realworld/prompts/a1111_prompt_parser_doctests.json`), its documented examples, and
 * further cases whose expected values were computed by running A1111's v1.10 parsing logic
 * (`prompt_parser.py` with lark 1.1.5, `extra_networks.py`) on them.
 */
import { test, describe } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import {
  BREAK_TEXT,
  BREAK_WEIGHT,
  MAX_EMPHASIS_UPDATES,
  extractExtraNetworks,
  getPromptSchedule,
  isBreak,
  loraWeights,
  parseComposable,
  parsePromptAttention,
} from '../pipelines/prompt/a1111.ts';
import type { ScheduledPrompt, WeightedText } from '../pipelines/prompt/a1111.ts';
import { PipelineError } from '../pipelines/errors.ts';
import { REALWORLD, readManifest } from './fixtures.ts';

/** The doctests print weights rounded in places; A1111's own floats are compared exactly where the doctest gives them in full. */
const WEIGHT_TOLERANCE = 1e-4;

interface ScheduleCase {
  prompt: string;
  base_steps: number;
  hires_steps: number | null;
  expected: Array<[number, string]>;
  upstream_comment?: string;
}
interface Doctests {
  prompt_schedules: {
    cases: ScheduleCase[];
    comment_examples: [
      { prompt: string; base_steps: number; expected: Array<[number, string]> },
      { prompts: string[]; base_steps: number; expected_end_at_steps: number[][] },
    ];
  };
  attention: { cases: Array<{ text: string; expected: Array<[string, number]> }> };
}

const doctests = JSON.parse(fs.readFileSync(path.join(REALWORLD, 'prompts/a1111_prompt_parser_doctests.json'), 'utf-8')) as Doctests;

/**
 * The one doctest A1111 marks "not handling this right now": its printed value needs a parse of
 * `[{b|d{:.5]`, but `|` is not allowed in plain text there, so the grammar has no parse and A1111
 * (lark 1.1.5, as the JSON's reproduction note also found) returns the prompt unchanged.
 */
const STALE_DOCTEST = 'a [{b|d{:.5] c';

function schedule(prompt: string, steps: number, hiresSteps?: number): Array<[number, string]> {
  return getPromptSchedule(prompt, steps, hiresSteps === undefined ? {} : { hiresSteps }).map((s: ScheduledPrompt) => [s.endAtStep, s.prompt]);
}

function pairs(parts: readonly WeightedText[]): Array<[string, number]> {
  return parts.map((p) => [p.text, p.weight]);
}

function assertWeighted(actual: readonly WeightedText[], expected: ReadonlyArray<readonly [string, number]>, label: string): void {
  assert.deepEqual(
    actual.map((p) => p.text),
    expected.map((e) => e[0]),
    `${label}: fragments`,
  );
  actual.forEach((p, i) => {
    const want = expected[i]![1];
    assert.ok(Math.abs(p.weight - want) <= WEIGHT_TOLERANCE, `${label}: weight of ${JSON.stringify(p.text)} is ${p.weight}, expected ${want}`);
  });
}

function assertRejects(fn: () => unknown, code: string, culprit: string): void {
  assert.throws(fn, (e: unknown) => {
    assert.ok(e instanceof PipelineError, `expected a PipelineError, got ${String(e)}`);
    assert.equal(e.code, code);
    assert.ok(e.message.includes(culprit), `message should name ${JSON.stringify(culprit)}: ${e.message}`);
    return true;
  });
}

describe('prompt editing: the get_learned_conditioning_prompt_schedules doctests', () => {
  test('the table holds the 16 upstream cases', () => {
    assert.equal(doctests.prompt_schedules.cases.length, 16);
    assert.equal(doctests.prompt_schedules.cases.filter((c) => c.prompt === STALE_DOCTEST).length, 1);
  });

  for (const c of doctests.prompt_schedules.cases.filter((x) => x.prompt !== STALE_DOCTEST)) {
    test(`${JSON.stringify(c.prompt)} at ${c.base_steps} steps${c.hires_steps === null ? '' : ` + ${c.hires_steps} hires`}`, () => {
      assert.deepEqual(schedule(c.prompt, c.base_steps, c.hires_steps ?? undefined), c.expected);
    });
  }

  test(`${JSON.stringify(STALE_DOCTEST)} ("not handling this right now") has no parse and stays whole`, () => {
    assert.deepEqual(schedule(STALE_DOCTEST, 10), [[10, STALE_DOCTEST]]);
  });

  test('the fantasy-landscape example at the top of prompt_parser.py', () => {
    const example = doctests.prompt_schedules.comment_examples[0];
    assert.deepEqual(schedule(example.prompt, example.base_steps), example.expected);
  });

  test('the get_learned_conditioning docstring example: switch steps', () => {
    const example = doctests.prompt_schedules.comment_examples[1];
    assert.deepEqual(
      example.prompts.map((p) => getPromptSchedule(p, example.base_steps).map((s) => s.endAtStep)),
      example.expected_end_at_steps,
    );
  });
});

describe('prompt editing: more cases, as A1111 computes them', () => {
  const cases: Array<[string, number, { hiresSteps?: number; useOldScheduling?: boolean }, Array<[number, string]>]> = [
    ['[a|[b|c]]', 6, {}, [[1, 'a'], [2, 'c'], [3, 'a'], [4, 'c'], [5, 'a'], [6, 'c']]],
    // int() truncates: 0.25·10 = 2.5 → 2; 0.3·10 = 3.0000000000000004 → 3; 0.7·10 = 7.000000000000001 → 7.
    ['[x:y:0.25]', 10, {}, [[2, 'x'], [10, 'y']]],
    ['[x:y:0.3]', 10, {}, [[3, 'x'], [10, 'y']]],
    ['[x:y:0.7]', 10, {}, [[7, 'x'], [10, 'y']]],
    ['[x:-1]', 10, {}, [[10, 'x']]],
    ['[x:1e1]', 20, {}, [[10, ''], [20, 'x']]],
    ['[a: 3 ]', 10, {}, [[3, ''], [10, 'a']]],
    ['[a:b:+2]', 4, {}, [[2, 'a'], [4, 'b']]],
    // "3." has a dot, so it is a fraction: 3.0·10 → capped at 10.
    ['[a:3.]', 10, {}, [[10, '']]],
    ['[a::3]', 10, {}, [[3, 'a'], [10, '']]],
    ['[:a:3]', 10, {}, [[3, ''], [10, 'a']]],
    ['[|]', 3, {}, [[1, ''], [2, ''], [3, '']]],
    ['[a:[b|c]:2]', 4, {}, [[1, 'a'], [2, 'a'], [3, 'b'], [4, 'c']]],
    ['[a:b:1.5]', 10, { useOldScheduling: true }, [[1, 'a'], [10, 'b']]],
    ['[a:b:0.5]', 10, { useOldScheduling: true }, [[5, 'a'], [10, 'b']]],
    ['[a:b:12]', 10, { hiresSteps: 10 }, [[2, 'a'], [10, 'b']]],
    ['[a:b:0.5]', 10, { hiresSteps: 10, useOldScheduling: true }, [[5, 'a'], [10, 'b']]],
  ];
  for (const [prompt, steps, options, expected] of cases) {
    test(`${JSON.stringify(prompt)} at ${steps} steps ${JSON.stringify(options)}`, () => {
      assert.deepEqual(
        getPromptSchedule(prompt, steps, options).map((s) => [s.endAtStep, s.prompt]),
        expected,
      );
    });
  }

  test('prompts without a parse come back whole, as one entry', () => {
    // With a `[a:2]` beside them, these show that the whole prompt is left unparsed, not just the odd part.
    for (const prompt of ['a | b', 'a\\', '(a|b)', '[a|b:2]', '[(a:b:1)]', '[a:b:1:2]', 'x\\\ny', '[a:2] | b', '[a:2] x\\', '[a:2] (b|c)']) {
      assert.deepEqual(schedule(prompt, 4), [[4, prompt]], prompt);
    }
  });

  test('stray brackets and colons stay as they are (`[[[`, `]x]`, `a:b::c`, escapes)', () => {
    for (const prompt of ['[[[', ']x]', 'a:b::c', '\\[a:3\\]', '((a:3))', '[[a]]']) {
      assert.deepEqual(schedule(prompt, 10), [[10, prompt]], prompt);
    }
  });

  test('a complete construct next to stray brackets is scheduled (where A1111 depends on its hash seed)', () => {
    // A1111 answers [[10, "[a:3]]"]] or this, depending on PYTHONHASHSEED; the module documents the choice.
    assert.deepEqual(schedule('[a:3]]', 10), [[3, ']'], [10, 'a]']]);
    assert.deepEqual(schedule('[[a:3]', 10), [[3, '['], [10, '[a']]);
  });

  test('text is passed through verbatim for the emphasis parser', () => {
    assert.deepEqual(schedule('(a:1.2) [\\(b\\):c:2] BREAK d', 4), [
      [2, '(a:1.2) \\(b\\) BREAK d'],
      [4, '(a:1.2) c BREAK d'],
    ]);
  });
});

describe('emphasis: the parse_prompt_attention doctests', () => {
  test('the table holds the 6 upstream cases', () => {
    assert.equal(doctests.attention.cases.length, 6);
  });

  for (const c of doctests.attention.cases) {
    test(JSON.stringify(c.text), () => {
      assertWeighted(parsePromptAttention(c.text), c.expected, c.text);
    });
  }

  test('a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))). gives house 1.573, on 1, hill 0.55, sky 1.4641, the rest 1.1', () => {
    assertWeighted(parsePromptAttention('a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).'), [
      ['a ', 1.0],
      ['house', 1.573],
      [' ', 1.1],
      ['on', 1.0],
      [' a ', 1.1],
      ['hill', 0.55],
      [', sun, ', 1.1],
      ['sky', 1.4641],
      ['.', 1.1],
    ], 'house');
  });

  test("weights are A1111's exact float products (same order of multiplication)", () => {
    const house = doctests.attention.cases.find((c) => c.text.includes('house'))!;
    assert.deepEqual(pairs(parsePromptAttention(house.text)), house.expected);
    assert.equal(parsePromptAttention('(((a badly (formed +test )prompt')[1]!.weight, 1.4641000000000006);
  });
});

describe('emphasis: more cases, as A1111 computes them', () => {
  const cases: Array<[string, Array<[string, number]>]> = [
    ['a BREAK b', [['a', 1], [BREAK_TEXT, BREAK_WEIGHT], ['b', 1]]],
    ['BREAK', [['', 1], [BREAK_TEXT, BREAK_WEIGHT], ['', 1]]],
    // Inside brackets the marker is multiplied too, and is then no longer a break.
    ['(BREAK)', [['', 1.1], [BREAK_TEXT, -1.1], ['', 1.1]]],
    ['BREAKfast BREAK\nx', [['BREAKfast', 1], [BREAK_TEXT, BREAK_WEIGHT], ['x', 1]]],
    // `\x` drops the backslash.
    ['\\(a\\) \\[b\\] \\\\ \\x', [['(a) [b] \\ x', 1]]],
    ['a) b] c:', [['a) b] c:', 1]]],
    ['(a:1.5)', [['a', 1.5]]],
    ['((a:1.5) b)', [['a', 1.6500000000000001], [' b', 1.1]]],
    ['[[a]] (b)', [['a', 0.8264462809917354], [' ', 1], ['b', 1.1]]],
    ['(a', [['a', 1.1]]],
    ['[a', [['a', 0.9090909090909091]]],
    ['([a)', [['a', 1]]],
    ['(a:1.5]', [['a:1.5]', 1.1]]],
    [':1.5) x', [[':1.5) x', 1]]],
    ['(a::1.5)', [['a:', 1.5]]],
    ['(a: 1.5 )', [['a', 1.5]]],
    ['(a:١.٥)', [['a', 1.5]]],
    ['', [['', 1]]],
    ['[(a)] b', [['a b', 1]]],
    ['((a)', [['a', 1.2100000000000002]]],
    ['[[[', [['', 1]]],
    [']]]', [[']]]', 1]]],
    ['a:b:c', [['a:b:c', 1]]],
    ['(a:-1)', [['a', -1]]],
    ['(a:.5)', [['a', 0.5]]],
    ['(a:5.)', [['a', 5]]],
    // Brackets left open: all round ones first, then the square ones (the other order gives 1.3000000000000003).
    ['[(x(a:1.3)', [['x', 1], ['a', 1.3]]],
    ['[(x(a:0.7)', [['x', 1], ['a', 0.7]]],
  ];
  for (const [text, expected] of cases) {
    test(JSON.stringify(text), () => {
      assert.deepEqual(pairs(parsePromptAttention(text)), expected);
    });
  }

  test('isBreak recognises only the untouched marker', () => {
    assert.deepEqual(parsePromptAttention('a BREAK b').map(isBreak), [false, true, false]);
    assert.deepEqual(parsePromptAttention('(BREAK)').map(isBreak), [false, false, false]);
  });

  test('Compel syntax is literal text here (word+, (words)1.3); A1111-style weights work', () => {
    // From compel_prompt_parser_tests.json; Compel reads these as weights, A1111 does not.
    assert.deepEqual(pairs(parsePromptAttention('flames+')), [['flames+', 1]]);
    assert.deepEqual(pairs(parsePromptAttention('(flames)++')), [['flames', 1.1], ['++', 1]]);
    assert.deepEqual(pairs(parsePromptAttention('(flames)0.5')), [['flames', 1.1], ['0.5', 1]]);
    assert.deepEqual(pairs(parsePromptAttention('a badly (formed +test prompt')), [['a badly ', 1], ['formed +test prompt', 1.1]]);
    // Compel's test_bad_auto1111_syntax: the A1111 form is a weight for A1111.
    assert.deepEqual(pairs(parsePromptAttention('(happy camper:0.3)')), [['happy camper', 0.3]]);
  });
});

describe('AND: get_multicond_prompt_list', () => {
  const cases: Array<[string, Array<[string, number]>]> = [
    ['a AND b:0.5', [['a', 1], [' b', 0.5]]],
    ['a:1.5 AND b', [['a', 1.5], [' b', 1]]],
    ['ANDROID AND', [['ANDROID', 1], ['', 1]]],
    ['cat : -0.5', [['cat', -0.5]]],
    ['a :.5', [['a', 0.5]]],
    ['a:1.2.3', [['a:1.2.3', 1]]],
    ['a:5.', [['a', 5]]],
    ['AND', [['', 1], ['', 1]]],
    [' a AND  b :2 ', [[' a', 1], ['  b', 2]]],
    ['x:٣', [['x', 3]]],
    ['a ANDb AND_c AND(d)', [['a ANDb AND_c', 1], ['(d)', 1]]],
    ['no and here', [['no and here', 1]]],
  ];
  for (const [prompt, expected] of cases) {
    test(JSON.stringify(prompt), () => {
      assert.deepEqual(
        parseComposable(prompt).map((p) => [p.prompt, p.weight]),
        expected,
      );
    });
  }
});

describe('extra networks: <type:args>', () => {
  const cases: Array<[string, string, Array<{ type: string; name: string; args: string[]; named: Record<string, string> }>]> = [
    ['<lora:name>', '', [{ type: 'lora', name: 'name', args: [], named: {} }]],
    ['<lora:name:0.8>', '', [{ type: 'lora', name: 'name', args: ['0.8'], named: {} }]],
    ['<lora:name:0.5:0.7>', '', [{ type: 'lora', name: 'name', args: ['0.5', '0.7'], named: {} }]],
    ['<lora:name:te=0.5:unet=0.3:dyn=8>', '', [{ type: 'lora', name: 'name', args: [], named: { te: '0.5', unet: '0.3', dyn: '8' } }]],
    ['<hypernet:foo:0.5>', '', [{ type: 'hypernet', name: 'foo', args: ['0.5'], named: {} }]],
    ['a <lora:x:1>, b', 'a , b', [{ type: 'lora', name: 'x', args: ['1'], named: {} }]],
    ['<lora:a:b>c>', 'c>', [{ type: 'lora', name: 'a', args: ['b'], named: {} }]],
    ['<<lora:x:1>', '<', [{ type: 'lora', name: 'x', args: ['1'], named: {} }]],
    ['<lora:x:>', '', [{ type: 'lora', name: 'x', args: [''], named: {} }]],
    ['<lo ra:x>', '<lo ra:x>', []],
    ['<lora:x', '<lora:x', []],
    ['a <lora:> <lora:x>', 'a <lora:> ', [{ type: 'lora', name: 'x', args: [], named: {} }]],
    ['<lora:a=b=c:1>', '', [{ type: 'lora', name: 'a=b=c', args: ['1'], named: {} }]],
    ['<lyco:x:1>\n<lora:y:2\n>', '\n', [{ type: 'lyco', name: 'x', args: ['1'], named: {} }, { type: 'lora', name: 'y', args: ['2\n'], named: {} }]],
    ['<é:x>', '', [{ type: 'é', name: 'x', args: [], named: {} }]],
  ];
  for (const [prompt, rest, networks] of cases) {
    test(JSON.stringify(prompt), () => {
      const r = extractExtraNetworks(prompt);
      assert.equal(r.prompt, rest);
      assert.deepEqual(
        r.networks.map((n) => ({ type: n.type, name: n.name, args: [...n.args], named: { ...n.named } })),
        networks,
      );
    });
  }

  test('the tags of the real A1111 images in the manifest', () => {
    const manifest = readManifest(path.join(REALWORLD, 'manifest.json')) as {
      images: Array<{ file: string; interpretation: { a1111_infotext?: Array<{ parsed_a1111_rules: { prompt: string }; extra_network_tags?: Array<{ kind: string; name: string; multiplier: string }> }> } }>;
    };
    const tagged = manifest.images.flatMap((im) => (im.interpretation.a1111_infotext ?? []).filter((a) => a.extra_network_tags !== undefined).map((a) => ({ file: im.file, ...a })));
    assert.equal(tagged.length, 2);
    for (const t of tagged) {
      const r = extractExtraNetworks(t.parsed_a1111_rules.prompt);
      assert.deepEqual(
        r.networks.map((n) => ({ kind: n.type, name: n.name, multiplier: n.args[0] })),
        t.extra_network_tags,
        t.file,
      );
      assert.ok(!r.prompt.includes('<lora:'), t.file);
    }
  });

  test('loraWeights: TE defaults to 1, UNet to TE, named values override', () => {
    const weights = (tag: string) => loraWeights(extractExtraNetworks(tag).networks[0]!);
    assert.deepEqual(weights('<lora:x>'), { te: 1, unet: 1, dyn: null });
    assert.deepEqual(weights('<lora:x:0.8>'), { te: 0.8, unet: 0.8, dyn: null });
    assert.deepEqual(weights('<lora:x:0.5:0.7>'), { te: 0.5, unet: 0.7, dyn: null });
    assert.deepEqual(weights('<lora:x:0.5:0.7:16>'), { te: 0.5, unet: 0.7, dyn: 16 });
    assert.deepEqual(weights('<lora:x:te=0.4>'), { te: 0.4, unet: 0.4, dyn: null });
    assert.deepEqual(weights('<lora:x:0.9:unet=0.2:dyn=8>'), { te: 0.9, unet: 0.2, dyn: 8 });
    assert.deepEqual(weights('<lora:x:0.9:0.1:te=0.3>'), { te: 0.3, unet: 0.1, dyn: null });
    // Python float(): spaces, exponents, underscores.
    assert.deepEqual(weights('<lora:x: 1e-1 :1_0>'), { te: 0.1, unet: 10, dyn: null });
    // A key with spaces is not `te`.
    assert.deepEqual(weights('<lora:x:te =0.5>'), { te: 1, unet: 1, dyn: null });
  });
});

describe('robustness: large and pathological prompts return', () => {
  const SIZE = 200_000;

  test('a 10,000-token realistic prompt', () => {
    const unit = 'masterpiece, (best quality:1.2), [red:blue:0.4] hair, ((detailed eyes)), ';
    const prompt = unit.repeat(Math.ceil(40_000 / unit.length));
    const parts = parsePromptAttention(prompt);
    // Six runs per repetition (its trailing ', ' merges with the next 'masterpiece, '), plus the final ', '.
    assert.equal(parts.length, 1 + 6 * Math.ceil(40_000 / unit.length));
    const steps = getPromptSchedule(prompt, 30);
    assert.deepEqual(steps.map((s) => s.endAtStep), [12, 30]);
  });

  test('200 KB of nested round brackets: one fragment, weight 1.1^99999 (= Infinity, as in A1111)', () => {
    const depth = SIZE / 2 - 1;
    const prompt = '('.repeat(depth) + 'x' + ')'.repeat(depth);
    assert.deepEqual(pairs(parsePromptAttention(prompt)), [['x', Infinity]]);
    assert.deepEqual(schedule(prompt, 20), [[20, prompt]]);
  });

  test('200 KB of unclosed or unmatched brackets, colons, escapes', () => {
    for (const prompt of ['['.repeat(SIZE), ']'.repeat(SIZE), '('.repeat(SIZE) + 'x', ':'.repeat(SIZE), '\\('.repeat(SIZE / 2), '[a:'.repeat(SIZE / 3)]) {
      assert.equal(schedule(prompt, 20).length, 1, prompt.slice(0, 8));
      assert.ok(parsePromptAttention(prompt).length >= 1);
    }
  });

  test('200 KB of nested schedules and alternations', () => {
    const depth = SIZE / 8;
    const nestedSchedule = '[a:'.repeat(depth) + 'b' + ':3]'.repeat(depth);
    assert.deepEqual(schedule(nestedSchedule, 20), [[3, 'a'], [20, 'b']]);
    const nestedAlternation = '[a|'.repeat(depth) + 'b' + ']'.repeat(depth);
    const alternating = getPromptSchedule(nestedAlternation, 20);
    assert.equal(alternating.length, 20);
    assert.equal(alternating[0]!.prompt, 'a');
    assert.equal(alternating[1]!.prompt, 'b');
  });

  test('many unclosed brackets in running text (":( " × 28,000)', () => {
    const parts = parsePromptAttention('sad :( '.repeat(28_000));
    assert.deepEqual(pairs(parts.slice(0, 3)), [['sad :', 1], [' sad :', 1.1], [' sad :', 1.2100000000000002]]);
    // 1.1^k overflows after a few thousand brackets; the infinite tail merges into one run.
    assert.equal(parts[parts.length - 1]!.weight, Infinity);
    assert.ok(parts.length < 28_000);
  });

  test('long runs of spaces next to BREAK, AND and <tags>', () => {
    const spaces = ' '.repeat(SIZE);
    assert.deepEqual(pairs(parsePromptAttention(`a${spaces}BREAK${spaces}b`)), [['a', 1], [BREAK_TEXT, BREAK_WEIGHT], ['b', 1]]);
    assert.deepEqual(parseComposable(`a${spaces}AND${spaces}:2`).map((p) => p.weight), [1, 2]);
    assert.equal(extractExtraNetworks('<a:'.repeat(SIZE / 3)).networks.length, 0);
  });
});

describe('rejects', () => {
  test('an emphasis weight Python cannot read (A1111 fails with ValueError)', () => {
    assertRejects(() => parsePromptAttention('a (b:1.2.3) c'), 'BAD_PROMPT', ':1.2.3)');
    assertRejects(() => parsePromptAttention('(b:.)'), 'BAD_PROMPT', ':.)');
  });

  test('brackets that would need more than MAX_EMPHASIS_UPDATES multiplications', () => {
    const depth = Math.ceil(Math.sqrt(2 * MAX_EMPHASIS_UPDATES)) + 10;
    assertRejects(() => parsePromptAttention('(a'.repeat(depth) + ')'.repeat(depth)), 'BAD_PROMPT', 'brackets');
  });

  test('a switch point that overflows (A1111 crashes in int())', () => {
    assertRejects(() => getPromptSchedule('x [a:b:1e999] y', 20), 'BAD_PROMPT', '[a:b:1e999]');
  });

  test('steps that are not a positive whole number', () => {
    assertRejects(() => getPromptSchedule('x', 0), 'BAD_STEPS', 'steps');
    assertRejects(() => getPromptSchedule('x', 2.5), 'BAD_STEPS', 'steps');
    assertRejects(() => getPromptSchedule('x', 20, { hiresSteps: -1 }), 'BAD_STEPS', 'hiresSteps');
  });

  test('LoRA weights that are not numbers, name the tag', () => {
    const weights = (tag: string) => () => loraWeights(extractExtraNetworks(tag).networks[0]!);
    assertRejects(weights('<lora:x:abc>'), 'BAD_PROMPT', '<lora:x:abc>');
    assertRejects(weights('<lora:x:0.5:1,2>'), 'BAD_PROMPT', '<lora:x:0.5:1,2>');
    assertRejects(weights('<lora:x:unet=high>'), 'BAD_PROMPT', 'high');
    // A1111 reads the positional value even when te= is given.
    assertRejects(weights('<lora:x:bad:te=1>'), 'BAD_PROMPT', 'bad');
    assertRejects(weights('<lora:x:>'), 'BAD_PROMPT', '<lora:x:>');
    assertRejects(weights('<lora:x:nan>'), 'BAD_PROMPT', 'nan');
    assertRejects(weights('<lora:x:1:1:1.5>'), 'BAD_PROMPT', 'dyn');
  });

  test('a LoRA tag without a name', () => {
    assertRejects(() => loraWeights(extractExtraNetworks('<lora:te=1>').networks[0]!), 'BAD_PROMPT', '<lora:te=1>');
    assertRejects(() => loraWeights(extractExtraNetworks('<lora::1>').networks[0]!), 'BAD_PROMPT', '<lora::1>');
  });
});
