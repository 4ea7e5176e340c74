/**
 * Job spec v1: the pinned v1 file reads into exactly the jobs written here by hand, defaults fill
 * a minimal line, serialization round-trips, and invalid jobs are rejected with the field path (and
 * `file:line`) in the message.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { PipelineError } from '../pipelines/errors.ts';
import type { GenerateJob } from '../pipelines/job.ts';
import { parseJobSpec, parseJsonl, readJobsFile, serializeJobSpec, JOB_SPEC_VERSION } from '../pipelines/jobs/schema.ts';

const DATA = path.join(path.dirname(fileURLToPath(import.meta.url)), 'data');
const V1 = path.join(DATA, 'jobs-v1.jsonl');
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'chorus-schema-'));

/** The A1111 defaults, spelled out (not read from JOB_DEFAULTS, so a changed default shows up here). */
const DEFAULTS = {
  negativePrompt: '',
  steps: 20,
  cfgScale: 7,
  sampler: 'DPM++ 2M',
  scheduleType: 'Automatic',
  width: 512,
  height: 512,
  clipSkip: 1,
  batchSize: 1,
  batchCount: 1,
  rng: 'cpu',
  emphasis: 'original',
  loras: [],
  loraMode: 'auto',
  strategy: { name: 'plain' },
  regions: [],
} as const;

describe('the v1 job file fixture', () => {
  const model = path.join(DATA, 'models', 'tiny-sd15');
  const expected: Array<{ job: GenerateJob; name?: string; output?: string; priority: number }> = [
    { job: { ...DEFAULTS, model, prompt: 'a cat', seed: 1n, steps: 4, width: 64, height: 64 }, priority: 0 },
    {
      job: {
        ...DEFAULTS,
        model,
        prompt: 'a castle <lora:style_a:0.6>',
        negativePrompt: 'blurry',
        steps: 12,
        cfgScale: 6.5,
        sampler: 'Euler a',
        scheduleType: 'Uniform',
        seed: 18446744073709551000n,
        width: 96,
        height: 128,
        clipSkip: 2,
        batchSize: 2,
        batchCount: 3,
        rng: 'nv',
        emphasis: 'no-norm',
        loras: [
          { name: 'style_a', te: 0.6, unet: 0.6 },
          { name: path.join(DATA, 'loras', 'detail.safetensors'), te: 1, unet: 0.4 },
        ],
        loraMode: 'bank',
        strategy: { name: 'cmlora', cacheInterval: 3, frequencyClasses: ['high', 'low'], phaseRule: 'online', official: false },
      },
      name: 'full',
      output: '{job}-{image}.png',
      priority: 5,
    },
    {
      job: {
        ...DEFAULTS,
        model,
        prompt: 'a cat AND a dog',
        seed: 7n,
        strategy: { name: 'switch' },
        loras: [
          { name: 'a', te: 1, unet: 1 },
          { name: 'b', te: 0.5, unet: 0.8 },
        ],
      },
      priority: 0,
    },
    {
      job: {
        ...DEFAULTS,
        model,
        prompt: 'two people',
        seed: 3n,
        strategy: { name: 'regions' },
        regions: [
          { box: [0, 0, 256, 512], prompt: 'a knight', lora: { name: 'knight', te: 0.8, unet: 0.8 } },
          { mask: path.join(DATA, 'masks', 'right.png'), prompt: 'a wizard', negativePrompt: 'hat' },
        ],
      },
      priority: 0,
    },
    { job: { ...DEFAULTS, model: '/opt/models/model.safetensors', prompt: 'x', seed: 0n, sampler: 'DPM++ 2M Karras', strategy: { name: 'switch', switchEvery: 3 } }, priority: 0 },
  ];

  test('reads into the jobs it describes (relative paths against its folder, blank lines skipped)', () => {
    assert.deepEqual(readJobsFile(V1), expected);
  });

  test('every job serializes to v1 JSON that parses back to the same job', () => {
    for (const entry of readJobsFile(V1)) {
      const json = JSON.parse(JSON.stringify(serializeJobSpec(entry)));
      assert.equal(json.version, JOB_SPEC_VERSION);
      assert.deepEqual(parseJobSpec(json), entry);
    }
  });

  test('seeds beyond 2^53 are written as decimal strings, smaller ones as numbers', () => {
    const [small, big] = readJobsFile(V1);
    assert.equal(serializeJobSpec(small!).seed, 1);
    assert.equal(serializeJobSpec(big!).seed, '18446744073709551000');
  });
});

describe('a minimal job', () => {
  test('gets every default', () => {
    const { job, priority } = parseJobSpec({ model: 'm', prompt: 'a cat', seed: 1, steps: 4, width: 64, height: 64 });
    assert.deepEqual(job, { ...DEFAULTS, model: 'm', prompt: 'a cat', seed: 1n, steps: 4, width: 64, height: 64 });
    assert.equal(priority, 0);
  });

  test('seed -1 (or none) draws a seed once; the serialized job keeps the drawn seed', () => {
    const entry = parseJobSpec({ model: 'm', prompt: 'a cat', seed: -1 });
    const again = parseJobSpec(serializeJobSpec(entry));
    assert.equal(again.job.seed, entry.job.seed);
    assert.ok(entry.job.seed >= 0n && entry.job.seed < 2n ** 32n);
  });
});

describe('rejects invalid jobs with the field path in the message', () => {
  const base = { model: 'm', prompt: 'a cat', seed: 1, steps: 4, width: 64, height: 64 };
  const cases: Array<{ what: string; spec: unknown; code: string; field: string; says: RegExp }> = [
    { what: 'a LoRA strength given as text', spec: { ...base, loras: [{ name: 'a' }, { name: 'b', te: '0.5' }] }, code: 'BAD_ARGUMENT', field: 'loras[1].te', says: /^loras\[1\]\.te: must be a number, got the text "0\.5"/ },
    { what: 'a LoRA strength out of range', spec: { ...base, loras: [{ name: 'a' }, { name: 'b', te: 1, unet: 40 }] }, code: 'BAD_ARGUMENT', field: 'loras[1].unet', says: /^loras\[1\]\.unet \(b\): strength must be a number from −10 to 10, got 40/ },
    { what: 'a LoRA without a name', spec: { ...base, loras: [{ name: ' ' }] }, code: 'BAD_ARGUMENT', field: 'loras[0].name', says: /^loras\[0\]\.name: a LoRA needs a name/ },
    { what: 'an unknown field inside a LoRA', spec: { ...base, loras: [{ name: 'a', weight: 1 }] }, code: 'BAD_ARGUMENT', field: 'loras[0].weight', says: /^loras\[0\]\.weight: unknown field\. Known fields: name, te, unet/ },
    { what: 'a fractional cache interval', spec: { ...base, strategy: { name: 'cmlora', cacheInterval: 1.5 } }, code: 'BAD_ARGUMENT', field: 'strategy.cacheInterval', says: /^strategy\.cacheInterval must be a whole number ≥ 0, got 1\.5/ },
    { what: 'an unknown strategy', spec: { ...base, strategy: 'mixture' }, code: 'BAD_ARGUMENT', field: 'strategy.name', says: /^strategy\.name must be one of plain, merge, switch, composite, cmlora, regions\b.*, got "mixture"/ },
    { what: 'a bad frequency class', spec: { ...base, strategy: { name: 'cmlora', frequencyClasses: ['high', 'mid'] } }, code: 'BAD_ARGUMENT', field: 'strategy.frequencyClasses', says: /^strategy\.frequencyClasses must be "high" or "low"/ },
    { what: 'a region box outside the canvas', spec: { ...base, strategy: 'regions', regions: [{ box: [0, 0, 32, 32], prompt: 'a' }, { box: [40, 0, 32, 64], prompt: 'b' }] }, code: 'BAD_ARGUMENT', field: 'regions[1].box', says: /^regions\[1\]\.box \[40, 0, 32, 64\] reaches outside the 64×64 canvas/ },
    { what: 'a region box with three numbers', spec: { ...base, regions: [{ box: [0, 0, 32], prompt: 'a' }] }, code: 'BAD_ARGUMENT', field: 'regions[0].box', says: /^regions\[0\]\.box: must be \[x, y, width, height\], got 3 numbers/ },
    { what: "a region LoRA's strength", spec: { ...base, regions: [{ box: [0, 0, 32, 32], prompt: 'a', lora: { name: 'k', te: 99 } }] }, code: 'BAD_ARGUMENT', field: 'regions[0].lora.te', says: /^regions\[0\]\.lora\.te \(k\): strength must be/ },
    { what: 'zero steps', spec: { ...base, steps: 0 }, code: 'BAD_STEPS', field: 'steps', says: /^steps must be an integer from 1 to 1000, got 0/ },
    { what: 'a width that is not a multiple of 8', spec: { ...base, width: 65 }, code: 'BAD_SIZE', field: 'width', says: /^width must be a multiple of 8 .* got 65 \(try 64\)/ },
    { what: 'a typo in a field name', spec: { ...base, promt: 'x' }, code: 'BAD_ARGUMENT', field: 'promt', says: /^promt: unknown field\. Did you mean "prompt"\?/ },
    { what: 'a newer spec version', spec: { ...base, version: 2 }, code: 'BAD_ARGUMENT', field: 'version', says: /^version: this Chorus reads job spec version 1, the job says 2 \(written by a newer Chorus/ },
    { what: 'a seed that is not a number', spec: { ...base, seed: 'abc' }, code: 'BAD_SEED', field: 'seed', says: /^seed "abc" is not a decimal whole number/ },
    { what: 'a seed that is an object', spec: { ...base, seed: { value: 1 } }, code: 'BAD_ARGUMENT', field: 'seed', says: /^seed: must be a whole number or a decimal string, got an object/ },
    { what: 'an unknown sampler', spec: { ...base, sampler: 'Foo' }, code: 'UNKNOWN_SAMPLER', field: 'sampler', says: /^sampler: Sampler "Foo" is not one Chorus implements/ },
    { what: 'an unknown schedule type', spec: { ...base, scheduleType: 'Bar' }, code: 'UNKNOWN_SAMPLER', field: 'scheduleType', says: /^scheduleType: Schedule type "Bar"/ },
    { what: 'no model', spec: { prompt: 'a cat' }, code: 'BAD_ARGUMENT', field: 'model', says: /^model is required/ },
    { what: 'a prompt that is a number', spec: { ...base, prompt: 3 }, code: 'BAD_ARGUMENT', field: 'prompt', says: /^prompt: must be text, got number 3/ },
    { what: 'an unknown rng', spec: { ...base, rng: 'gpu' }, code: 'BAD_ARGUMENT', field: 'rng', says: /^rng must be "cpu" or "nv", got "gpu"/ },
    { what: 'an empty output pattern', spec: { ...base, output: ' ' }, code: 'BAD_ARGUMENT', field: 'output', says: /^output: must be a file-name pattern/ },
    { what: 'a fractional priority', spec: { ...base, priority: 0.5 }, code: 'BAD_ARGUMENT', field: 'priority', says: /^priority: must be a whole number, got number 0\.5/ },
  ];
  for (const c of cases) {
    test(c.what, () => {
      assert.throws(
        () => parseJobSpec(c.spec),
        (e: unknown) => {
          assert.ok(e instanceof PipelineError, `a PipelineError, got ${String(e)}`);
          assert.equal(e.code, c.code);
          assert.equal(e.details.field, c.field);
          assert.match(e.message, c.says);
          return true;
        },
      );
    });
  }

  test('strategy knobs of another type than their JSON type', () => {
    assert.throws(() => parseJobSpec({ ...base, strategy: { name: 'clora', concepts: 'cat' } }), (e: unknown) => e instanceof PipelineError && e.details.field === 'strategy.concepts' && /^strategy\.concepts: must be an array, got the text "cat"/.test(e.message));
    assert.throws(() => parseJobSpec({ ...base, strategy: { name: 'switch', swichEvery: 2 } }), (e: unknown) => e instanceof PipelineError && /^strategy\.swichEvery: unknown field\. Did you mean "switchEvery"\?/.test(e.message));
  });

  test('a job that is not an object', () => {
    assert.throws(() => parseJobSpec([1, 2]), (e: unknown) => e instanceof PipelineError && /^a job must be a JSON object .* got an array/.test(e.message));
  });

  test('in a file: the message starts with file:line, then the field path', () => {
    const file = path.join(tmp, 'bad.jsonl');
    fs.writeFileSync(file, `${JSON.stringify({ model: 'm', prompt: 'ok', seed: 1 })}\n\n${JSON.stringify({ model: 'm', prompt: 'x', loras: [{ name: 'a' }, { name: 'b', te: 'high' }] })}\n`);
    assert.throws(
      () => readJobsFile(file),
      (e: unknown) => e instanceof PipelineError && e.message.startsWith(`${file}:3: loras[1].te: must be a number`) && e.details.line === 3 && e.details.file === file,
    );
  });

  test('in a file: a line that is not JSON names its line', () => {
    assert.throws(() => parseJsonl('{"model": "m", "prompt": "a"}\n{"model": "m",\n', 'jobs.jsonl'), (e: unknown) => e instanceof PipelineError && e.code === 'BAD_ARGUMENT' && e.message.startsWith('jobs.jsonl:2: not valid JSON'));
  });

  test('an empty file and a missing file', () => {
    assert.throws(() => parseJsonl('\n  \n', 'empty.jsonl'), (e: unknown) => e instanceof PipelineError && e.message === 'empty.jsonl: no jobs (the file is empty).');
    const missing = path.join(tmp, 'missing.jsonl');
    assert.throws(() => readJobsFile(missing), (e: unknown) => e instanceof PipelineError && e.message.includes(missing) && e.message.includes('ENOENT'));
  });
});
