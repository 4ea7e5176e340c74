/**
 * A1111 prompt conditioning with a fake text encoder: chunking (75 tokens, BREAK, the comma
 * backtrack), emphasis with mean restore, prompt-editing schedules, AND, clip skip bounds.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import * as path from 'node:path';
import { ClipTokenizer, type Tensor } from '../models/index.ts';
import { applyEmphasis, conditioningAt, encodePrompts, tokenizeLine, DEFAULT_CONDITIONING, MAX_PROMPT_CHUNKS } from '../pipelines/conditioning.ts';
import type { TextEncoderModel } from '../pipelines/models.ts';
import { PipelineError } from '../pipelines/errors.ts';
import { FIXTURES } from './fixtures.ts';

const clip = ClipTokenizer.load(path.join(FIXTURES, 'tiny-sd15', 'tokenizer'));
const tokenizer: TextEncoderModel['tokenizer'] = { encode: (t) => clip.encode(t), bosId: clip.bosId, eosId: clip.eosId, padId: clip.padId, commaId: clip.encode(',')[0] };
const DIM = 3;

/** Embeds token t at position p as [t, p + 1, clipSkip] so tests can see what was encoded. */
function fakeEncoder(calls: number[][][] = []): TextEncoderModel {
  return {
    tokenizer,
    layers: 4,
    async encode(ids, clipSkip): Promise<Tensor<'float32'>> {
      calls.push(ids.map((r) => [...r]));
      const data = new Float32Array(ids.length * 77 * DIM);
      ids.forEach((row, b) => row.forEach((t, p) => data.set([t, p + 1, clipSkip], (b * 77 + p) * DIM)));
      return { dtype: 'float32', shape: [ids.length, 77, DIM], data };
    },
  };
}

const opts = { emphasis: 'original' as const, commaPaddingBacktrack: 20 };

describe('A1111 chunking', () => {
  test('a short prompt is one chunk: BOS, tokens, EOS padding, EOS', () => {
    const { chunks, tokenCount } = tokenizeLine('a photo of a cat', tokenizer, opts);
    assert.equal(chunks.length, 1);
    assert.deepEqual(chunks[0]!.tokens.slice(0, 7), [49406, 320, 1125, 539, 320, 2368, 49407]);
    assert.equal(chunks[0]!.tokens.length, 77);
    assert.ok(chunks[0]!.tokens.slice(6).every((t) => t === 49407));
    assert.equal(tokenCount, 5);
  });

  test('weights follow the emphasis parse, per token', () => {
    const { chunks } = tokenizeLine('a (red:1.5) [cat]', tokenizer, opts);
    assert.deepEqual(chunks[0]!.multipliers.slice(0, 5).map((m) => Math.round(m * 1e4) / 1e4), [1, 1, 1.5, 0.9091, 1]);
  });

  test('BREAK starts a new chunk; 80 tokens make two chunks', () => {
    assert.equal(tokenizeLine('a cat BREAK a dog', tokenizer, opts).chunks.length, 2);
    const long = Array.from({ length: 80 }, () => 'cat').join(' ');
    const { chunks, tokenCount } = tokenizeLine(long, tokenizer, opts);
    assert.equal(chunks.length, 2);
    assert.equal(chunks[1]!.tokens.slice(1, 6).filter((t) => t === 2368).length, 5);
    assert.equal(tokenCount, 80);
  });

  test('when a chunk fills up within 20 tokens of a comma, the text after the comma moves to the next chunk', () => {
    const words = [...Array(70).fill('cat'), ',', ...Array(10).fill('dog')].join(' ');
    const { chunks } = tokenizeLine(words, tokenizer, opts);
    const first = chunks[0]!.tokens;
    // 70 cats + the comma stay; the dogs all moved; the rest is EOS padding.
    assert.equal(first[71], tokenizer.commaId);
    assert.ok(first.slice(72).every((t) => t === 49407));
    assert.equal(chunks[1]!.tokens.slice(1, 11).every((t) => t === clip.encode('dog')[0]), true);
    const noBacktrack = tokenizeLine(words, tokenizer, { ...opts, commaPaddingBacktrack: 0 }).chunks;
    assert.equal(noBacktrack[0]!.tokens[75], clip.encode('dog')[0]);
  });

  test('"none" emphasis keeps brackets as text', () => {
    const { chunks } = tokenizeLine('(cat)', tokenizer, { ...opts, emphasis: 'none' });
    assert.deepEqual(chunks[0]!.tokens.slice(1, 4), clip.encode('(cat)'));
  });

  test('rejects a prompt of more than the chunk limit with PROMPT_TOO_LONG', () => {
    const huge = Array.from({ length: 75 * MAX_PROMPT_CHUNKS + 10 }, () => 'cat').join(' ');
    assert.throws(() => tokenizeLine(huge, tokenizer, opts), (e: unknown) => e instanceof PipelineError && e.code === 'PROMPT_TOO_LONG');
  });
});

describe('emphasis', () => {
  test('weights multiply token embeddings, then the mean is restored', () => {
    const z = Float32Array.from([1, 2, 3, 4, 5, 6]); // 2 tokens × 3
    applyEmphasis(z, [1, 2], 2, 3, true);
    const mean = z.reduce((a, b) => a + b, 0) / z.length;
    assert.ok(Math.abs(mean - 3.5) < 1e-6, `mean restored: ${mean}`);
    // ratio between tokens follows the weights: token 1 was doubled relative to token 0
    assert.ok(Math.abs(z[3]! / z[0]! - 8) < 1e-5);
    const noNorm = Float32Array.from([1, 2, 3, 4, 5, 6]);
    applyEmphasis(noNorm, [1, 2], 2, 3, false);
    assert.deepEqual([...noNorm], [1, 2, 3, 8, 10, 12]);
  });

  test('all-ones weights leave the embedding bit-identical (diffusers parity)', () => {
    const z = Float32Array.from([0.1, -0.2, 0.3]);
    applyEmphasis(z, [1], 1, 3, true);
    assert.deepEqual([...z], [...Float32Array.from([0.1, -0.2, 0.3])]);
  });
});

describe('encodePrompts', () => {
  test('chunks are encoded separately and concatenated on the sequence axis', async () => {
    const calls: number[][][] = [];
    const long = Array.from({ length: 80 }, () => 'cat').join(' ');
    const c = await encodePrompts(long, '', 10, fakeEncoder(calls), DEFAULT_CONDITIONING);
    const e = c.positive[0]!.schedule[0]!.embedding;
    assert.deepEqual(e.shape, [1, 154, DIM]);
    assert.equal(e.data[77 * DIM + 1], 1, 'second chunk starts at its own position 0');
    assert.deepEqual(c.negative[0]!.embedding.shape, [1, 77, DIM]);
  });

  test('prompt editing gives one conditioning per schedule entry, looked up by step like A1111', async () => {
    const c = await encodePrompts('a [cat:dog:0.5]', '', 10, fakeEncoder(), DEFAULT_CONDITIONING);
    const schedule = c.positive[0]!.schedule;
    assert.deepEqual(schedule.map((s) => s.endAtStep), [5, 10]);
    const catId = clip.encode('cat')[0]!;
    const dogId = clip.encode('dog')[0]!;
    assert.equal(conditioningAt(schedule, 0).data[2 * DIM], catId);
    assert.equal(conditioningAt(schedule, 5).data[2 * DIM], catId);
    assert.equal(conditioningAt(schedule, 6).data[2 * DIM], dogId);
  });

  test('AND gives weighted sub-prompts; the negative has none', async () => {
    const c = await encodePrompts('a cat AND a dog :0.5', 'blurry', 4, fakeEncoder(), DEFAULT_CONDITIONING);
    assert.deepEqual(c.positive.map((p) => p.weight), [1, 0.5]);
    assert.equal(c.negative.length, 1);
  });

  test('clip skip is passed to the encoder and checked against its layer count', async () => {
    const c = await encodePrompts('cat', '', 1, fakeEncoder(), { ...DEFAULT_CONDITIONING, clipSkip: 2 });
    assert.equal(c.positive[0]!.schedule[0]!.embedding.data[2], 2);
    await assert.rejects(encodePrompts('cat', '', 1, fakeEncoder(), { ...DEFAULT_CONDITIONING, clipSkip: 5 }), (e: unknown) => e instanceof PipelineError && e.code === 'BAD_ARGUMENT' && /1 to 4/.test(e.message));
  });

  test('identical texts are encoded once', async () => {
    const calls: number[][][] = [];
    await encodePrompts('a cat', 'a cat', 10, fakeEncoder(calls), DEFAULT_CONDITIONING);
    assert.equal(calls.length, 1);
  });
});
