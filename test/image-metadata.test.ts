/**
 * Image metadata (pipelines/images/): PNG chunks, EXIF, and the recognised generation metadata,
 * against the real-world files in shared/realworld (every decoded field of manifest.json), a
 * round trip through sharp, and a group of damaged inputs.
 */
import { test, describe, before } from 'node:test';
import assert from 'node:assert/strict';
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import * as zlib from 'node:zlib';
import sharp from 'sharp';
import { PipelineError } from '../pipelines/errors.ts';
import { addPngTextChunks, crc32, decodePngTextChunk, parsePngChunks, readPngTextChunks } from '../pipelines/images/png-chunks.ts';
import { decodeUserComment, findJpegExif, parseExif } from '../pipelines/images/exif.ts';
import { readImageMetadata, summarizeComfyGraph, type GenerationSource, type ImageMetadata, type SourceKind } from '../pipelines/images/metadata.ts';
import { readManifest, REALWORLD } from './fixtures.ts';

const manifest = readManifest(path.join(REALWORLD, 'manifest.json'));
const images: any[] = manifest.images;
const readImage = (file: string): Uint8Array => new Uint8Array(fs.readFileSync(path.join(REALWORLD, file)));

/** manifest `interpretation` keys → the source kind that carries them. An unknown key fails the test. */
const KIND_OF_INTERPRETATION: Readonly<Record<string, SourceKind>> = {
  a1111_infotext: 'a1111',
  comfyui_prompt: 'comfyui',
  comfyui_workflow: 'comfyui',
  parameters_json: 'fooocus',
  novelai_comment: 'novelai',
  invokeai_dream: 'invokeai',
  sd_metadata: 'invokeai',
  invokeai_metadata: 'invokeai',
  invokeai_graph: 'invokeai',
  swarmui: 'swarmui',
  stability_matrix_parameters_json: 'stabilitymatrix',
};

/** README.md, Images table: the only image whose graph has region nodes. */
const REGION_CLASS_TYPES: Readonly<Record<string, string[]>> = { 'png/comfyui_area_composition.png': ['ConditioningSetArea'] };

function expectedEncodings(decodedAs: unknown): string[] {
  if (decodedAs === 'ascii') return ['ascii'];
  if (decodedAs === 'utf-8 (iTXt)' || decodedAs === 'UTF-8 bytes in a latin-1 chunk (spec violation)') return ['utf-8'];
  const d = decodedAs as { encoding?: string; type?: string };
  if (d.encoding === 'utf-16-be') return ['utf-16be'];
  if (d.encoding === 'utf-16-le') return ['utf-16le'];
  // ASCII-typed EXIF values and `ASCII\0\0\0` UserComments that hold UTF-8 (GIMP, NovelAI).
  if (d.encoding === 'utf-8/ascii' || d.type === 'ASCII') return ['ascii', 'utf-8'];
  assert.fail(`manifest decoded_as ${JSON.stringify(decodedAs)} not mapped in this test`);
}

function sourcesOf<K extends SourceKind>(md: ImageMetadata, kind: K): Array<Extract<GenerationSource, { kind: K }>> {
  return md.sources.filter((s): s is Extract<GenerationSource, { kind: K }> => s.kind === kind);
}

function only<T>(items: T[], what: string): T {
  assert.equal(items.length, 1, `expected exactly one ${what}, found ${items.length}`);
  return items[0]!;
}

describe('image metadata: every image of shared/realworld/manifest.json', () => {
  for (const im of images) {
    test(im.file, () => {
      const bytes = readImage(im.file);
      assert.equal(crypto.createHash('sha256').update(bytes).digest('hex'), im.sha256, 'fixture file changed');
      const md = readImageMetadata(bytes, im.file);
      assert.equal(md.format, im.container);
      assert.deepEqual(md.warnings, []);

      // Every decoded text field, exactly; and no field the manifest does not list.
      assert.deepEqual(Object.keys(md.texts).sort(), im.text_fields.map((t: any) => t.key).sort(), 'text keys');
      for (const tf of im.text_fields) {
        const field = only(md.fields.filter((f) => f.key === tf.key), `field ${tf.key}`);
        assert.equal(field.where, tf.where, `${tf.key}: where`);
        assert.ok(expectedEncodings(tf.decoded_as).includes(field.encoding), `${tf.key}: decoded as ${field.encoding}, manifest ${JSON.stringify(tf.decoded_as)}`);
        if (tf.text !== undefined) {
          assert.equal(field.text, tf.text, `${tf.key}: text`);
        } else {
          assert.ok(field.text.startsWith(tf.text_head), `${tf.key}: text_head`);
        }
        assert.equal([...field.text].length, tf.length_chars, `${tf.key}: length in code points`);
        assert.equal(crypto.createHash('sha256').update(field.text, 'utf-8').digest('hex'), tf.sha256_utf8, `${tf.key}: sha256 of the text`);
        assert.equal(md.texts[tf.key], field.text);
      }

      // PNG chunk list: type, offset, length, position relative to IDAT, text-chunk header fields.
      if (im.png_chunks !== undefined) {
        // The manifest lists IHDR, the text chunks and IEND.
        const listed = new Set(['IHDR', 'tEXt', 'zTXt', 'iTXt', 'IEND']);
        assert.ok(im.png_chunks.every((c: any) => listed.has(c.type)));
        const chunks = parsePngChunks(bytes, im.file).filter((c) => listed.has(c.type));
        assert.deepEqual(
          chunks.map((c) => [c.type, c.offset, c.length, c.afterIdat]),
          im.png_chunks.map((c: any) => [c.type, c.offset, c.length, c.after_idat]),
        );
        const texts = readPngTextChunks(bytes, im.file);
        const expectedTexts = im.png_chunks.filter((c: any) => ['tEXt', 'zTXt', 'iTXt'].includes(c.type));
        assert.deepEqual(texts.map((t) => [t.chunkType, t.offset, t.keyword]), expectedTexts.map((c: any) => [c.type, c.offset, c.keyword]));
        for (const [i, c] of expectedTexts.entries()) {
          if (c.type !== 'iTXt') continue;
          assert.deepEqual([texts[i]!.compressed, texts[i]!.languageTag, texts[i]!.translatedKeyword], [c.compressed, c.language_tag, c.translated_keyword]);
        }
      }

      // Recognised sources: the kinds the manifest says the image carries, nothing for the GIMP re-save.
      const interpretation: Record<string, any> = im.interpretation;
      const expectedKinds = [...new Set(Object.keys(interpretation).map((k) => KIND_OF_INTERPRETATION[k] ?? assert.fail(`interpretation "${k}" not mapped in this test`)))].sort();
      assert.deepEqual(md.sources.map((s) => s.kind).sort(), expectedKinds, 'source kinds');

      for (const a of interpretation.a1111_infotext ?? []) {
        const s = only(sourcesOf(md, 'a1111'), 'a1111 source');
        assert.equal(s.text, a.infotext);
        assert.ok(a.source.startsWith(`${s.key} / `), `a1111 key ${s.key}, manifest source ${a.source}`);
      }
      if (interpretation.parameters_json !== undefined) {
        assert.deepEqual(only(sourcesOf(md, 'fooocus'), 'fooocus source').data, interpretation.parameters_json);
      }
      if (interpretation.novelai_comment !== undefined) {
        // `v4_negative_prompt_base` is the manifest's shorthand for v4_negative_prompt.caption.base_caption.
        const { all_keys: allKeys, v4_negative_prompt_base: negativeBase, ...facts } = interpretation.novelai_comment;
        const data = only(sourcesOf(md, 'novelai'), 'novelai source').data as Record<string, any>;
        assert.deepEqual(Object.keys(data).sort(), [...allKeys].sort(), 'NovelAI Comment keys');
        for (const [k, v] of Object.entries(facts)) assert.deepEqual(data[k], v, `NovelAI ${k}`);
        assert.equal(data.v4_negative_prompt?.caption?.base_caption, negativeBase);
      }
      if (Object.keys(interpretation).some((k) => KIND_OF_INTERPRETATION[k] === 'invokeai')) {
        const s = only(sourcesOf(md, 'invokeai'), 'invokeai source');
        assert.deepEqual(s.metadata, interpretation.invokeai_metadata ?? interpretation.sd_metadata);
        assert.equal(s.dream, interpretation.invokeai_dream);
        if (interpretation.invokeai_graph !== undefined) {
          const graph = s.graph as { nodes: Record<string, { type: string }>; edges: unknown[] };
          assert.equal(Object.keys(graph.nodes).length, interpretation.invokeai_graph.node_count);
          assert.equal(graph.edges.length, interpretation.invokeai_graph.edge_count);
          assert.deepEqual([...new Set(Object.values(graph.nodes).map((n) => n.type))].sort(), interpretation.invokeai_graph.node_types);
        } else {
          assert.equal(s.graph, undefined);
        }
      }
      if (interpretation.swarmui !== undefined) {
        const s = only(sourcesOf(md, 'swarmui'), 'swarmui source');
        assert.deepEqual(s.data, interpretation.swarmui);
        assert.ok(Array.isArray((s.document as { sui_models?: unknown }).sui_models));
      }
      if (interpretation.stability_matrix_parameters_json !== undefined) {
        const s = only(sourcesOf(md, 'stabilitymatrix'), 'stabilitymatrix source');
        assert.deepEqual(s.data, interpretation.stability_matrix_parameters_json);
        assert.equal((s.project as { ProjectType?: unknown }).ProjectType, 'TextToImage');
      }
    });
  }
});

describe('ComfyUI graphs: facts of the manifest', () => {
  for (const im of images.filter((i) => i.interpretation.comfyui_prompt !== undefined || i.interpretation.comfyui_workflow !== undefined)) {
    test(im.file, () => {
      const facts = im.interpretation.comfyui_prompt;
      const wf = im.interpretation.comfyui_workflow;
      const s = only(sourcesOf(readImageMetadata(readImage(im.file), im.file), 'comfyui'), 'comfyui source');
      if (wf !== undefined) {
        const workflow = s.workflow as { nodes: unknown[]; links: unknown[]; last_node_id: number; last_link_id: number; version: number };
        assert.deepEqual([workflow.nodes.length, workflow.links.length, workflow.last_node_id, workflow.last_link_id, workflow.version], [wf.node_count, wf.link_count, wf.last_node_id, wf.last_link_id, wf.version]);
      } else {
        assert.equal(s.workflow, undefined);
      }
      const g = summarizeComfyGraph(s.prompt);
      assert.equal(g.nodeCount, facts.node_count);
      assert.deepEqual(g.classTypes, facts.class_types);
      assert.deepEqual(
        g.loras.map((l) => [l.node, l.class_type, l.lora_name, l.strength_model, l.strength_clip]),
        (facts.lora_nodes ?? []).map((l: any) => [l.node, l.class_type, l.lora_name, l.strength_model, l.strength_clip]),
      );
      assert.deepEqual([...g.checkpoints].sort(), facts.checkpoint_nodes.map((c: any) => c.ckpt_name).sort());
      for (const want of facts.sampler_nodes) {
        if (want.class_type === 'KSamplerSelect') {
          assert.ok(g.samplers.some((x) => x.sampler_name === want.sampler_name), `a sampler reads sampler_name ${want.sampler_name} through KSamplerSelect ${want.node}`);
          continue;
        }
        const got = only(g.samplers.filter((x) => x.node === want.node), `sampler ${want.node}`);
        assert.equal(got.class_type, want.class_type);
        assert.equal(got.seed, want.seed ?? want.noise_seed, `sampler ${want.node} seed`);
        assert.equal(got.cfg, want.cfg);
        for (const k of ['sampler_name', 'scheduler', 'steps', 'denoise'] as const) {
          if (want[k] !== undefined) assert.equal(got[k], want[k], `sampler ${want.node} ${k}`);
        }
      }
      assert.equal(g.samplers.length, facts.sampler_nodes.filter((n: any) => n.class_type !== 'KSamplerSelect').length);
      // Every encoder of these graphs feeds a sampler, so positive ∪ negative = all encoder texts.
      assert.deepEqual([...new Set([...g.positive, ...g.negative])].sort(), [...new Set(facts.text_encode_nodes.map((t: any) => t.text))].sort());
      const regions = REGION_CLASS_TYPES[im.file] ?? [];
      assert.deepEqual([...new Set(g.regionNodes.map((r) => r.class_type))], regions);
      assert.ok(g.regionNodes.every((r) => facts.class_types.includes(r.class_type)));
    });
  }

  test('positive / negative follow the KSampler links, latent size from EmptyLatentImage', () => {
    const lora = only(sourcesOf(readImageMetadata(readImage('png/comfyui_lora.png')), 'comfyui'), 'comfyui source');
    const g = summarizeComfyGraph(lora.prompt);
    assert.deepEqual([g.positive, g.negative], [['masterpiece best quality girl'], ['bad hands']]);
    const area = only(sourcesOf(readImageMetadata(readImage('png/comfyui_area_composition.png')), 'comfyui'), 'comfyui source');
    const a = summarizeComfyGraph(area.prompt);
    assert.deepEqual([a.width, a.height], [704, 1280]);
    // The first pass (node 3) sees the area prompts combined; the refining pass (24) only its own text.
    const first = only(a.samplers.filter((x) => x.node === '3'), 'sampler 3');
    assert.equal(first.positive.length, 5);
    assert.ok(first.positive.some((t) => t.includes('(night:1.3)')) && first.positive.some((t) => t.includes('morning sky')));
    assert.equal(only(a.samplers.filter((x) => x.node === '24'), 'sampler 24').positive.length, 1);
    assert.ok(a.regionNodes.length >= 4, `${a.regionNodes.length} ConditioningSetArea nodes`);
    const turbo = only(sourcesOf(readImageMetadata(readImage('png/comfyui_sdxl_turbo.png')), 'comfyui'), 'comfyui source');
    const t = only(summarizeComfyGraph(turbo.prompt).samplers, 'turbo sampler');
    assert.deepEqual([t.sampler_name, t.steps, t.cfg, t.seed], ['euler_ancestral', 1, 1, 0]);
  });
});

describe('PNG text chunks: write, then read back (sharp-encoded image)', () => {
  const RGB = { r: 200, g: 30, b: 90 };
  let png: Uint8Array;
  let pixels: Buffer;
  before(async () => {
    png = new Uint8Array(await sharp({ create: { width: 8, height: 8, channels: 3, background: RGB } }).png().toBuffer());
    pixels = await sharp(png).raw().toBuffer();
    assert.deepEqual([...pixels.subarray(0, 6)], [200, 30, 90, 200, 30, 90]);
  });

  const INFOTEXT = 'photo of a duck\nNegative prompt: monochrome\nSteps: 15, Sampler: UniPC, CFG scale: 5, Seed: 235284042, Size: 512x400';
  const JAPANESE = '1girl, 初音ミク, テスト\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512';
  const JOB = { version: 1, prompt: 'a castle, ミク', loras: [{ name: 'a', weight: 0.8 }], seed: 42 };

  async function assertPixelsUnchanged(out: Uint8Array): Promise<void> {
    const decoded = await sharp(out).raw().toBuffer({ resolveWithObject: true });
    assert.deepEqual([decoded.info.width, decoded.info.height, decoded.info.channels], [8, 8, 3]);
    assert.ok(decoded.data.equals(pixels), 'pixels changed');
  }

  test('ASCII parameters → tEXt, non-Latin-1 → iTXt, right after IHDR; sharp and our reader read them back exactly', async () => {
    const out = addPngTextChunks(png, [
      { keyword: 'parameters', text: INFOTEXT },
      { keyword: 'chorus', text: JSON.stringify(JOB) },
    ]);
    const chunks = parsePngChunks(out);
    assert.deepEqual(chunks.slice(0, 3).map((c) => c.type), ['IHDR', 'tEXt', 'iTXt']);
    await assertPixelsUnchanged(out);
    const md = readImageMetadata(out, 'roundtrip.png');
    assert.deepEqual(md.texts, { parameters: INFOTEXT, chorus: JSON.stringify(JOB) });
    assert.deepEqual(md.sources, [
      { kind: 'chorus', job: JOB },
      { kind: 'a1111', text: INFOTEXT, key: 'parameters' },
    ]);
    assert.deepEqual((await sharp(out).metadata()).comments, [
      { keyword: 'parameters', text: INFOTEXT },
      { keyword: 'chorus', text: JSON.stringify(JOB) },
    ]);

    const ja = addPngTextChunks(out, [{ keyword: 'parameters', text: JAPANESE }]);
    const [entry, ...others] = readPngTextChunks(ja);
    assert.deepEqual([entry!.chunkType, entry!.compressed, entry!.languageTag, entry!.translatedKeyword, entry!.text], ['iTXt', false, '', '', JAPANESE]);
    assert.deepEqual(others.map((o) => o.keyword), ['chorus'], 'the old parameters chunk is replaced, not kept');
    await assertPixelsUnchanged(ja);
    assert.deepEqual(readImageMetadata(ja).texts, { parameters: JAPANESE, chorus: JSON.stringify(JOB) });
  });

  test('Latin-1 text stays tEXt (as Pillow writes it); Latin-1 that reads as UTF-8 goes to iTXt', () => {
    const cafe = 'café ½ naïve';
    const mojibake = 'Ã© looks like UTF-8';
    const out = addPngTextChunks(png, [
      { keyword: 'a', text: cafe },
      { keyword: 'b', text: mojibake },
    ]);
    const read = readPngTextChunks(out);
    assert.deepEqual(read.map((t) => [t.keyword, t.chunkType, t.encoding, t.text]), [
      ['a', 'tEXt', 'latin-1', cafe],
      ['b', 'iTXt', 'utf-8', mojibake],
    ]);
  });

  test('replaces a same-keyword zTXt after IDAT and keeps the other chunks in place', async () => {
    const original = readImage('png/a1111_ztxt_after_idat.png');
    const out = addPngTextChunks(original, [{ keyword: 'parameters', text: 'new prompt\nSteps: 1' }]);
    const before = parsePngChunks(original).map((c) => c.type);
    const after = parsePngChunks(out).map((c) => c.type);
    assert.deepEqual(after, [before[0], 'tEXt', ...before.slice(1).filter((t) => t !== 'zTXt')]);
    const md = readImageMetadata(out);
    assert.equal(md.texts.parameters, 'new prompt\nSteps: 1');
    assert.equal(md.texts['date:create'], '2023-04-22T00:01:01+00:00');
    assert.ok((await sharp(out).raw().toBuffer()).equals(await sharp(original).raw().toBuffer()));
  });

  test('PNG eXIf chunk: the A1111 UserComment is read from it', () => {
    const tiff = findJpegExif(readImage('png/a1111_exif_usercomment.jpg'))!;
    const out = insertChunkAfterIhdr(png, 'eXIf', tiff);
    const md = readImageMetadata(out, 'exif.png');
    assert.equal(md.fields[0]!.where, 'PNG eXIf ExifIFD 0x9286');
    assert.equal(only(sourcesOf(md, 'a1111'), 'a1111 source').text.split('\n')[0], 'photo of a duck');
  });

  test('rejects invalid keywords and a keyword given twice (BAD_ARGUMENT)', () => {
    for (const [keyword, culprit] of [
      ['', 'must be 1-79'],
      ['k'.repeat(80), 'must be 1-79'],
      [' lead', 'space'],
      ['tab\there', 'printable'],
      ['ミク', 'printable'],
    ] as const) {
      assertPipelineError(() => addPngTextChunks(png, [{ keyword, text: 'x' }]), 'BAD_ARGUMENT', [JSON.stringify(keyword), culprit]);
    }
    assertPipelineError(
      () => addPngTextChunks(png, [
        { keyword: 'parameters', text: 'a' },
        { keyword: 'parameters', text: 'b' },
      ]),
      'BAD_ARGUMENT',
      ['"parameters"', 'twice'],
    );
  });
});

describe('EXIF UserComment decoding', () => {
  const utf16 = (s: string, le: boolean): Uint8Array => {
    const b = Buffer.from(s, 'utf16le');
    if (!le) b.swap16();
    return b;
  };
  const withPrefix = (prefix: string, body: Uint8Array): Uint8Array => new Uint8Array([...Buffer.from(prefix, 'latin1'), ...body]);

  test('UNICODE: the byte order comes from the content, not the TIFF header', () => {
    for (const text of ['Steps: 20, Sampler: Euler a', '初音ミク テスト', 'ab']) {
      for (const le of [true, false]) {
        for (const tiffLe of [true, false]) {
          const d = decodeUserComment(withPrefix('UNICODE\0', utf16(text, le)), tiffLe);
          assert.deepEqual([d.text, d.encoding, d.charset], [text, le ? 'utf-16le' : 'utf-16be', 'UNICODE'], `text ${text}, ${le ? 'LE' : 'BE'} in a ${tiffLe ? 'II' : 'MM'} TIFF`);
        }
      }
    }
    const bom = decodeUserComment(withPrefix('UNICODE\0', new Uint8Array([0xff, 0xfe, ...utf16('x', true)])), false);
    assert.deepEqual([bom.text, bom.encoding], ['x', 'utf-16le']);
  });

  test('ASCII (UTF-8 inside), undefined prefix, no prefix; trailing NULs dropped', () => {
    assert.deepEqual(decodeUserComment(withPrefix('ASCII\0\0\0', Buffer.from('テスト\0', 'utf-8')), false), { text: 'テスト', encoding: 'utf-8', charset: 'ASCII' });
    assert.deepEqual(decodeUserComment(withPrefix('\0'.repeat(8), Buffer.from('plain')), false), { text: 'plain', encoding: 'ascii', charset: 'undefined' });
    assert.deepEqual(decodeUserComment(Buffer.from('Steps: 1, Seed: 2'), false), { text: 'Steps: 1, Seed: 2', encoding: 'ascii', charset: 'none' });
  });
});

describe('image metadata rejects', () => {
  const MINIMAL = 'png/a1111_unipc_minimal.png';

  test('random bytes and an empty file: BAD_IMAGE naming the file', () => {
    assertPipelineError(() => readImageMetadata(seededBytes(1, 4096), 'noise.png'), 'BAD_IMAGE', ['noise.png', 'not a PNG, JPEG or WebP']);
    assertPipelineError(() => readImageMetadata(new Uint8Array(0), 'empty.png'), 'BAD_IMAGE', ['empty.png', 'empty']);
    assertPipelineError(() => parsePngChunks(seededBytes(2, 64), 'noise.png'), 'BAD_IMAGE', ['noise.png', 'PNG signature']);
  });

  test('a truncated PNG: names the chunk that runs past the end', () => {
    const bytes = readImage(MINIMAL).subarray(0, 200);
    assertPipelineError(() => readImageMetadata(bytes, 'cut.png'), 'BAD_IMAGE', ['cut.png', 'truncated tEXt chunk at offset 33', 'declares 191']);
    const noIend = readImage(MINIMAL).subarray(0, 260);
    assertPipelineError(() => readImageMetadata(noIend, 'cut.png'), 'BAD_IMAGE', ['cut.png', 'without an IEND']);
  });

  test('a chunk length beyond the file, and one beyond the PNG limit, fail before any allocation', () => {
    const bytes = Uint8Array.from(readImage(MINIMAL));
    new DataView(bytes.buffer).setUint32(33, 0x7ffffff0);
    assertPipelineError(() => readImageMetadata(bytes, 'long.png'), 'BAD_IMAGE', ['long.png', 'tEXt chunk at offset 33', `declares ${0x7ffffff0}`]);
    new DataView(bytes.buffer).setUint32(33, 0xfffffff0);
    assertPipelineError(() => readImageMetadata(bytes, 'long.png'), 'BAD_IMAGE', ['long.png', 'exceeds the PNG limit']);
  });

  test('CRC: wrong on IHDR is an error, wrong on a text chunk is a warning and the text is still read', () => {
    const ihdr = Uint8Array.from(readImage(MINIMAL));
    const ihdrCrc = 8 + 8 + 13;
    ihdr[ihdrCrc] = ihdr[ihdrCrc]! ^ 0xff;
    assertPipelineError(() => readImageMetadata(ihdr, 'crc.png'), 'BAD_IMAGE', ['crc.png', 'IHDR', 'CRC']);
    const text = Uint8Array.from(readImage(MINIMAL));
    const textCrc = 33 + 8 + 191;
    text[textCrc] = text[textCrc]! ^ 0xff;
    const md = readImageMetadata(text, 'crc.png');
    assert.deepEqual(md.warnings.map((w) => [w.code, w.details.chunk]), [['CRC_MISMATCH', 'tEXt']]);
    assert.ok(md.warnings[0]!.message.includes('crc.png'));
    assert.equal(only(sourcesOf(md, 'a1111'), 'a1111 source').text.slice(0, 15), 'photo of a duck');
  });

  test('malformed text chunks: BAD_METADATA naming chunk and keyword', () => {
    const png = readImage(MINIMAL);
    const zBad = insertChunkAfterIhdr(png, 'zTXt', new Uint8Array([...Buffer.from('parameters\0\0'), 1, 2, 3, 4]));
    assertPipelineError(() => readImageMetadata(zBad, 'z.png'), 'BAD_METADATA', ['z.png', 'zTXt', '"parameters"', 'zlib']);
    const method = insertChunkAfterIhdr(png, 'zTXt', new Uint8Array([...Buffer.from('k\0'), 7, ...zlib.deflateSync('x')]));
    assertPipelineError(() => readImageMetadata(method, 'z.png'), 'BAD_METADATA', ['z.png', 'compression method 7']);
    const noNul = insertChunkAfterIhdr(png, 'tEXt', Buffer.from('no separator'));
    assertPipelineError(() => readImageMetadata(noNul, 't.png'), 'BAD_METADATA', ['t.png', 'tEXt chunk at offset 33', 'no NUL']);
    const badUtf8 = insertChunkAfterIhdr(png, 'iTXt', new Uint8Array([...Buffer.from('parameters\0'), 0, 0, 0, 0, 0xc3, 0x28]));
    assertPipelineError(() => readImageMetadata(badUtf8, 'i.png'), 'BAD_METADATA', ['i.png', 'iTXt', 'UTF-8']);
    const cut = insertChunkAfterIhdr(png, 'iTXt', Buffer.from('parameters\0\0\0en'));
    assertPipelineError(() => readImageMetadata(cut, 'i.png'), 'BAD_METADATA', ['i.png', 'iTXt', 'missing the NUL']);
  });

  test('a zlib bomb in a zTXt chunk stops at the inflate cap', () => {
    const bomb = insertChunkAfterIhdr(readImage(MINIMAL), 'zTXt', new Uint8Array([...Buffer.from('parameters\0\0'), ...zlib.deflateSync(Buffer.alloc(2 << 20))]));
    const chunk = parsePngChunks(bomb).find((c) => c.type === 'zTXt')!;
    assertPipelineError(() => decodePngTextChunk(chunk, 'bomb.png', 1 << 20), 'BAD_METADATA', ['bomb.png', 'inflates to more than 1048576 bytes']);
  });

  test('a JPEG whose Exif IFD pointer or UserComment offset points outside the EXIF block: BAD_METADATA', () => {
    const jpeg = Uint8Array.from(readImage('png/a1111_exif_usercomment.jpg'));
    const tiffStart = Buffer.from(jpeg).indexOf('Exif\0\0') + 6;
    const tiff = new DataView(jpeg.buffer, tiffStart);
    const le = tiff.getUint8(0) === 0x49;
    const exifPointer = ifdEntryOffset(tiff, tiff.getUint32(4, le), 0x8769);
    const exifIfd = tiff.getUint32(exifPointer + 8, le);
    const userComment = ifdEntryOffset(tiff, exifIfd, 0x9286);

    const badPointer = Uint8Array.from(jpeg);
    new DataView(badPointer.buffer, tiffStart).setUint32(exifPointer + 8, 0x7fff0000, le);
    assertPipelineError(() => readImageMetadata(badPointer, 'broken.jpg'), 'BAD_METADATA', ['broken.jpg', 'JPEG APP1 segment', `ExifIFD offset ${0x7fff0000} is outside`]);

    const badValue = Uint8Array.from(jpeg);
    new DataView(badValue.buffer, tiffStart).setUint32(userComment + 8, 0xfffffff0, le);
    assertPipelineError(() => readImageMetadata(badValue, 'broken.jpg'), 'BAD_METADATA', ['broken.jpg', 'tag 0x9286', `offset ${0xfffffff0}`]);

    const badCount = Uint8Array.from(jpeg);
    new DataView(badCount.buffer, tiffStart).setUint32(userComment + 4, 0xffffffff, le);
    assertPipelineError(() => readImageMetadata(badCount, 'broken.jpg'), 'BAD_METADATA', ['broken.jpg', 'tag 0x9286', 'past the end']);

    assertPipelineError(() => parseExif(new Uint8Array([0x4d, 0x4d, 0, 42]), 'x.jpg', 'JPEG APP1 segment'), 'BAD_METADATA', ['x.jpg', 'shorter than the 8-byte TIFF header']);
    assertPipelineError(() => parseExif(new Uint8Array([0x49, 0x49, 43, 0, 8, 0, 0, 0]), 'x.jpg'), 'BAD_METADATA', ['x.jpg', 'has 43 where 42 belongs']);
  });

  test('JPEG and WebP containers: a segment or chunk running past the end is BAD_IMAGE', () => {
    const jpeg = Uint8Array.from(readImage('png/a1111_exif_usercomment.jpg'));
    new DataView(jpeg.buffer).setUint16(4, 0xfff0);
    assertPipelineError(() => readImageMetadata(jpeg, 'seg.jpg'), 'BAD_IMAGE', ['seg.jpg', 'segment FF', 'declares 65520']);
    assertPipelineError(() => readImageMetadata(readImage('png/forge_neo.jpeg').subarray(0, 40), 'cut.jpeg'), 'BAD_IMAGE', ['cut.jpeg']);
    const webp = Uint8Array.from(readImage('png/gimp_resaved_no_generation_metadata.webp'));
    new DataView(webp.buffer).setUint32(16, 0x7ffffff0, true);
    assertPipelineError(() => readImageMetadata(webp, 'big.webp'), 'BAD_IMAGE', ['big.webp', 'chunk "VP8X"', `declares ${0x7ffffff0}`]);
  });

  test('JSON that does not parse is a BAD_JSON warning; the text stays in `texts`', () => {
    const out = addPngTextChunks(readImage(MINIMAL), [
      { keyword: 'prompt', text: '{"3": {"inputs": ' },
      { keyword: 'chorus', text: '{"version": 1,' },
    ]);
    const md = readImageMetadata(out, 'json.png');
    assert.deepEqual(md.sources.map((s) => s.kind), ['a1111']);
    assert.deepEqual(md.warnings.map((w) => [w.code, w.details.key]).sort(), [['BAD_JSON', 'chorus'], ['BAD_JSON', 'prompt']]);
    assert.ok(md.warnings.every((w) => w.message.includes('json.png') && w.message.includes('not valid JSON')));
    assert.equal(md.texts.prompt, '{"3": {"inputs": ');
  });

  test('summarizeComfyGraph: not an API graph is BAD_METADATA naming the node', () => {
    assertPipelineError(() => summarizeComfyGraph([1, 2]), 'BAD_METADATA', ['an array']);
    assertPipelineError(() => summarizeComfyGraph({ '5': { inputs: {} } }), 'BAD_METADATA', ['node "5"']);
  });
});

function assertPipelineError(fn: () => unknown, code: string, culprits: readonly string[]): void {
  assert.throws(fn, (e: unknown) => {
    assert.ok(e instanceof PipelineError, `expected PipelineError, got ${String(e)}`);
    assert.equal(e.code, code, e.message);
    for (const c of culprits) assert.ok(e.message.includes(c), `message names ${JSON.stringify(c)}: ${e.message}`);
    return true;
  });
}

/** Deterministic bytes (mulberry32) for the random-input case. */
function seededBytes(seed: number, n: number): Uint8Array {
  const out = new Uint8Array(n);
  let a = seed >>> 0;
  for (let i = 0; i < n; i++) {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    out[i] = ((t ^ (t >>> 14)) >>> 0) & 0xff;
  }
  return out;
}

/** A PNG with one raw chunk (correct CRC) inserted after the 8-byte signature and the 25-byte IHDR. */
function insertChunkAfterIhdr(png: Uint8Array, type: string, data: Uint8Array): Uint8Array {
  const chunk = new Uint8Array(12 + data.length);
  const view = new DataView(chunk.buffer);
  view.setUint32(0, data.length);
  chunk.set(Buffer.from(type, 'latin1'), 4);
  chunk.set(data, 8);
  view.setUint32(8 + data.length, crc32(chunk.subarray(4, 8 + data.length)));
  const ihdrEnd = 8 + 25;
  return Buffer.concat([png.subarray(0, ihdrEnd), chunk, png.subarray(ihdrEnd)]);
}

/** Offset (in the TIFF) of the IFD entry for `tag`; the fixture's byte order is read from its header. */
function ifdEntryOffset(tiff: DataView, ifdOffset: number, tag: number): number {
  const le = tiff.getUint8(0) === 0x49;
  const count = tiff.getUint16(ifdOffset, le);
  for (let i = 0; i < count; i++) {
    const at = ifdOffset + 2 + i * 12;
    if (tiff.getUint16(at, le) === tag) return at;
  }
  return assert.fail(`tag 0x${tag.toString(16)} not in the IFD at ${ifdOffset}`);
}
