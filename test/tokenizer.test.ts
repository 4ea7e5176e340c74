/**
 * CLIP tokenizer against the reference cases of `tiny-sd15-ref/tokenizer.json` (transformers 4.33
 * slow CLIPTokenizer without ftfy, as diffusers 0.24 calls it) and `tokenizer.safetensors`.
 */
import { test, describe, after } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { ClipTokenizer, CLIP_BOS_TOKEN, CLIP_EOS_TOKEN, CLIP_MAX_TOKENS } from '../models/tokenizer/clip.ts';
import type { ClipTokenizerFiles } from '../models/tokenizer/clip.ts';
import { ModelError } from '../models/errors.ts';
import { openSafetensors } from '../models/safetensors.ts';
import { FIXTURES, REF } from './fixtures.ts';

const TOKENIZER_DIR = path.join(FIXTURES, 'tiny-sd15/tokenizer');
const CASES_FILE = path.join(REF, 'tokenizer.json');
const CASES_TENSORS = path.join(REF, 'tokenizer.safetensors');
const REFERENCE_CASE_COUNT = 26;
/** SD 1.5 ids from the fixtures README ("a photo of a cat" → …). */
const SD15_BOS_ID = 49406;
const SD15_EOS_ID = 49407;
const A_PHOTO_OF_A_CAT_CONTENT = [320, 1125, 539, 320, 2368];

interface ReferenceCase {
  prompt: string;
  input_ids: number[];
  attention_mask: number[];
  tokens: string[];
  num_content_tokens: number;
  truncated: boolean;
  untruncated_ids: number[];
}
interface ReferenceFile {
  bos_token_id: number;
  eos_token_id: number;
  pad_token_id: number;
  model_max_length: number;
  cases: ReferenceCase[];
}

function readJson(file: string): unknown {
  return JSON.parse(fs.readFileSync(file, 'utf8')) as unknown;
}

const reference = readJson(CASES_FILE) as ReferenceFile;
const tokenizer = ClipTokenizer.load(TOKENIZER_DIR);

function fixtureFiles(): ClipTokenizerFiles {
  const mergesText = fs.readFileSync(path.join(TOKENIZER_DIR, 'merges.txt'), 'utf8');
  return {
    vocab: readJson(path.join(TOKENIZER_DIR, 'vocab.json')) as Record<string, number>,
    merges: mergesText.trim().split('\n').slice(1),
    config: readJson(path.join(TOKENIZER_DIR, 'tokenizer_config.json')),
    specialTokensMap: readJson(path.join(TOKENIZER_DIR, 'special_tokens_map.json')),
  };
}

describe('CLIP tokenizer matches transformers (slow, no ftfy)', () => {
  test('the reference file has the 26 cases and SD 1.5 special ids', () => {
    assert.equal(reference.cases.length, REFERENCE_CASE_COUNT);
    assert.equal(tokenizer.bosId, reference.bos_token_id);
    assert.equal(tokenizer.eosId, reference.eos_token_id);
    assert.equal(tokenizer.padId, reference.pad_token_id);
    assert.equal(tokenizer.maxLength, reference.model_max_length);
    assert.deepEqual([tokenizer.bosId, tokenizer.eosId, tokenizer.padId, tokenizer.maxLength], [SD15_BOS_ID, SD15_EOS_ID, SD15_EOS_ID, CLIP_MAX_TOKENS]);
  });

  for (const [index, c] of reference.cases.entries()) {
    test(`case ${index}: ${JSON.stringify(c.prompt.length > 60 ? `${c.prompt.slice(0, 60)}…` : c.prompt)}`, () => {
      const encoded = tokenizer.encodePadded(c.prompt);
      assert.deepEqual(tokenizer.tokenize(c.prompt), c.tokens, 'tokens');
      assert.deepEqual(encoded.inputIds, c.input_ids, 'input_ids');
      assert.deepEqual(encoded.attentionMask, c.attention_mask, 'attention_mask');
      assert.deepEqual(encoded.untruncatedIds, c.untruncated_ids, 'untruncated_ids');
      assert.equal(encoded.truncated, c.truncated, 'truncated');
      assert.deepEqual(tokenizer.encode(c.prompt), c.untruncated_ids.slice(1, -1), 'encode = content ids');
      assert.equal(tokenizer.encode(c.prompt).length, c.num_content_tokens, 'num_content_tokens');
    });
  }

  test('tokenizer.safetensors holds the same input_ids and attention_mask as the JSON and as ours', () => {
    const f = openSafetensors(CASES_TENSORS);
    try {
      const ids = f.read('input_ids');
      const mask = f.read('attention_mask');
      assert.deepEqual(ids.shape, [REFERENCE_CASE_COUNT, CLIP_MAX_TOKENS]);
      assert.deepEqual(mask.shape, [REFERENCE_CASE_COUNT, CLIP_MAX_TOKENS]);
      assert.ok(ids.data instanceof BigInt64Array && mask.data instanceof BigInt64Array, 'I64 tensors');
      for (const [row, c] of reference.cases.entries()) {
        const start = row * CLIP_MAX_TOKENS;
        const idsRow: number[] = Array.from(ids.data.subarray(start, start + CLIP_MAX_TOKENS), (v) => Number(v));
        const maskRow: number[] = Array.from(mask.data.subarray(start, start + CLIP_MAX_TOKENS), (v) => Number(v));
        assert.deepEqual(idsRow, c.input_ids, `row ${row}: safetensors vs JSON input_ids`);
        assert.deepEqual(maskRow, c.attention_mask, `row ${row}: safetensors vs JSON attention_mask`);
        const encoded = tokenizer.encodePadded(c.prompt);
        assert.deepEqual(encoded.inputIds, idsRow, `row ${row}: ours vs safetensors input_ids`);
        assert.deepEqual(encoded.attentionMask, maskRow, `row ${row}: ours vs safetensors attention_mask`);
      }
    } finally {
      f.close();
    }
  });

  test('"a photo of a cat" is BOS, 5 content ids, EOS, then EOS padding to 77', () => {
    const encoded = tokenizer.encodePadded('a photo of a cat');
    const padding = CLIP_MAX_TOKENS - A_PHOTO_OF_A_CAT_CONTENT.length - 2;
    assert.deepEqual(encoded.inputIds, [SD15_BOS_ID, ...A_PHOTO_OF_A_CAT_CONTENT, SD15_EOS_ID, ...new Array<number>(padding).fill(SD15_EOS_ID)]);
    assert.deepEqual(encoded.attentionMask, [...new Array<number>(A_PHOTO_OF_A_CAT_CONTENT.length + 2).fill(1), ...new Array<number>(padding).fill(0)]);
    assert.equal(encoded.truncated, false);
    assert.deepEqual(tokenizer.encode('a photo of a cat'), A_PHOTO_OF_A_CAT_CONTENT);
  });

  test('fromFiles on the parsed folder behaves like load', () => {
    const fromFiles = ClipTokenizer.fromFiles(fixtureFiles());
    for (const c of reference.cases) assert.deepEqual(fromFiles.encodePadded(c.prompt).inputIds, c.input_ids, JSON.stringify(c.prompt));
  });

  test('the pad id comes from the config pad_token, not from EOS', () => {
    const files = fixtureFiles();
    const custom = ClipTokenizer.fromFiles({ ...files, config: { ...(files.config as object), pad_token: '!' }, specialTokensMap: undefined });
    const bang = files.vocab['!'];
    assert.ok(bang !== undefined && bang !== SD15_EOS_ID);
    assert.equal(custom.padId, bang);
    const encoded = custom.encodePadded('a photo of a cat');
    assert.deepEqual(encoded.inputIds.slice(A_PHOTO_OF_A_CAT_CONTENT.length + 2), new Array<number>(CLIP_MAX_TOKENS - A_PHOTO_OF_A_CAT_CONTENT.length - 2).fill(bang));
    assert.equal(encoded.inputIds[A_PHOTO_OF_A_CAT_CONTENT.length + 1], SD15_EOS_ID, 'EOS stays EOS');
  });

  test('special_tokens_map.json overrides tokenizer_config.json, as from_pretrained does', () => {
    const files = fixtureFiles();
    const custom = ClipTokenizer.fromFiles({ ...files, config: { ...(files.config as object), pad_token: '!' }, specialTokensMap: { pad_token: '"' } });
    assert.equal(custom.padId, files.vocab['"']);
  });

  test('an explicit maxLength truncates to maxLength - 2 content tokens and ends with EOS', () => {
    const encoded = tokenizer.encodePadded('a photo of a cat', 5);
    assert.deepEqual(encoded.inputIds, [SD15_BOS_ID, ...A_PHOTO_OF_A_CAT_CONTENT.slice(0, 3), SD15_EOS_ID]);
    assert.deepEqual(encoded.attentionMask, [1, 1, 1, 1, 1]);
    assert.equal(encoded.truncated, true);
    assert.deepEqual(encoded.untruncatedIds, [SD15_BOS_ID, ...A_PHOTO_OF_A_CAT_CONTENT, SD15_EOS_ID]);
  });

  // Behaviour read off the reference code paths (no reference output covers these inputs).
  test('special tokens typed in another case become special ids (the reference seeds its BPE cache with them)', () => {
    assert.deepEqual(tokenizer.encode(`x ${CLIP_BOS_TOKEN.toUpperCase()} ${CLIP_EOS_TOKEN.toUpperCase()}`), [...tokenizer.encode('x'), SD15_BOS_ID, SD15_EOS_ID]);
  });

  test('vertical tab and form feed are dropped as controls; U+2028 and nbsp separate words', () => {
    assert.deepEqual(tokenizer.tokenize('soft\vhy\fphen'), tokenizer.tokenize('softhyphen'));
    assert.deepEqual(tokenizer.tokenize('photo\u2028cat\u00a0dog'), tokenizer.tokenize('photo cat dog'));
  });

  test('decode inverts byte-level BPE and writes special tokens out', () => {
    assert.equal(tokenizer.decode(tokenizer.encode('a photo of a cat')), 'a photo of a cat');
    assert.equal(tokenizer.decode(tokenizer.encode('café crème brûlée')), 'café crème brûlée');
    assert.equal(tokenizer.decode(tokenizer.encodePadded('a cat').untruncatedIds), `${CLIP_BOS_TOKEN} a cat ${CLIP_EOS_TOKEN}`);
  });
});

describe('CLIP tokenizer rejects bad input', () => {
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'chorus-tok-'));
  after(() => fs.rmSync(tmp, { recursive: true, force: true }));
  let dirCount = 0;

  /** A copy of the fixture folder with `edit` applied: a file's new content, or null to delete it. */
  function brokenFolder(edit: Record<string, string | null>): string {
    const dir = path.join(tmp, `tok-${dirCount++}`);
    fs.cpSync(TOKENIZER_DIR, dir, { recursive: true });
    for (const [name, content] of Object.entries(edit)) {
      const file = path.join(dir, name);
      if (content === null) fs.rmSync(file);
      else fs.writeFileSync(file, content);
    }
    return dir;
  }

  function rejects(build: () => unknown, culprits: readonly string[]): void {
    assert.throws(build, (e: unknown) => {
      assert.ok(e instanceof ModelError, `expected ModelError, got ${String(e)}`);
      assert.equal(e.code, 'BAD_TOKENIZER', e.message);
      for (const culprit of culprits) assert.ok(e.message.includes(culprit), `message names ${culprit}: ${e.message}`);
      return true;
    });
  }

  const mergesText = (): string => fs.readFileSync(path.join(TOKENIZER_DIR, 'merges.txt'), 'utf8');

  test('a folder without vocab.json', () => {
    const dir = brokenFolder({ 'vocab.json': null });
    rejects(() => ClipTokenizer.load(dir), [path.join(dir, 'vocab.json'), 'not found']);
  });

  test('a folder that does not exist', () => {
    rejects(() => ClipTokenizer.load(path.join(tmp, 'nowhere')), ['vocab.json']);
  });

  test('a folder without merges.txt', () => {
    const dir = brokenFolder({ 'merges.txt': null });
    rejects(() => ClipTokenizer.load(dir), [path.join(dir, 'merges.txt'), 'not found']);
  });

  test('vocab.json that is not JSON', () => {
    const dir = brokenFolder({ 'vocab.json': '{"a": 1,' });
    rejects(() => ClipTokenizer.load(dir), [path.join(dir, 'vocab.json'), 'JSON']);
  });

  test('vocab.json that is a list, or has a non-integer id', () => {
    rejects(() => ClipTokenizer.load(brokenFolder({ 'vocab.json': '["a", "b"]' })), ['vocab.json', 'an array']);
    const files = fixtureFiles();
    rejects(() => ClipTokenizer.fromFiles({ ...files, vocab: { ...files.vocab, 'cat</w>': 1.5 } }), ['vocab.json', 'cat</w>']);
  });

  test('vocab.json without the special tokens', () => {
    const files = fixtureFiles();
    const vocab: Record<string, number> = { ...files.vocab };
    delete vocab[CLIP_EOS_TOKEN];
    rejects(() => ClipTokenizer.fromFiles({ ...files, vocab }), ['vocab.json', CLIP_EOS_TOKEN]);
  });

  test('merges.txt without its #version header', () => {
    const dir = brokenFolder({ 'merges.txt': mergesText().split('\n').slice(1).join('\n') });
    rejects(() => ClipTokenizer.load(dir), [path.join(dir, 'merges.txt'), 'line 1', '#version']);
  });

  test('merges.txt with a rule that is not two symbols', () => {
    const lines = mergesText().split('\n');
    lines[3] = 'a n d';
    const dir = brokenFolder({ 'merges.txt': lines.join('\n') });
    rejects(() => ClipTokenizer.load(dir), [path.join(dir, 'merges.txt'), 'line 4', '"a n d"']);
    const blank = mergesText().split('\n');
    blank[2] = '';
    rejects(() => ClipTokenizer.load(brokenFolder({ 'merges.txt': blank.join('\n') })), ['merges.txt', 'line 3']);
  });

  test('merges passed to fromFiles with the header still on', () => {
    const files = fixtureFiles();
    rejects(() => ClipTokenizer.fromFiles({ ...files, merges: ['#version: 0.2', ...files.merges] }), ['merges.txt', '#version']);
  });

  test('tokenizer_config.json that is not JSON or has a bad model_max_length', () => {
    rejects(() => ClipTokenizer.load(brokenFolder({ 'tokenizer_config.json': '{' })), ['tokenizer_config.json', 'JSON']);
    const files = fixtureFiles();
    rejects(() => ClipTokenizer.fromFiles({ ...files, config: { model_max_length: 'long' } }), ['tokenizer_config.json', 'model_max_length']);
    rejects(() => ClipTokenizer.fromFiles({ ...files, config: { model_max_length: 1 } }), ['tokenizer_config.json', 'model_max_length']);
    rejects(() => ClipTokenizer.fromFiles({ ...files, config: [] }), ['tokenizer_config.json', 'an array']);
  });

  test('a pad_token that is not in the vocabulary, or not a token', () => {
    const files = fixtureFiles();
    rejects(() => ClipTokenizer.fromFiles({ ...files, config: { pad_token: '<pad>' }, specialTokensMap: undefined }), ['tokenizer_config.json', 'pad_token', '<pad>']);
    rejects(() => ClipTokenizer.fromFiles({ ...files, specialTokensMap: { pad_token: 7 } }), ['special_tokens_map.json', 'pad_token']);
    const dir = brokenFolder({ 'special_tokens_map.json': JSON.stringify({ pad_token: { content: '<pad>' } }) });
    rejects(() => ClipTokenizer.load(dir), [path.join(dir, 'special_tokens_map.json'), 'pad_token', '<pad>']);
  });

  test('encodePadded with no room for BOS and EOS, decode of an unknown id', () => {
    assert.throws(() => tokenizer.encodePadded('a cat', 1), (e: unknown) => e instanceof RangeError && e.message.includes('maxLength'));
    assert.throws(() => tokenizer.decode([320, 123456789]), (e: unknown) => e instanceof RangeError && e.message.includes('123456789'));
  });
});
