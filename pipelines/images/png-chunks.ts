/**
 * PNG chunks: read the chunk list and the text chunks, and add text chunks to an encoded PNG.
 *
 * Format (PNG specification, 3rd edition, sections 5.2-5.3 and 11.3.3): an 8-byte signature, then
 * chunks of `length (u32 BE) | type (4 ASCII letters) | data (length bytes) | CRC-32 of type+data`,
 * IHDR first, IEND last. Text chunks:
 * - `tEXt`: keyword (1-79 Latin-1 bytes) NUL text (Latin-1).
 * - `zTXt`: keyword NUL method(0 = zlib) zlib-compressed Latin-1 text.
 * - `iTXt`: keyword NUL flag(0|1) method(0) language-tag NUL translated-keyword(UTF-8) NUL text (UTF-8, zlib when flag = 1).
 * Text chunks may sit anywhere between IHDR and IEND, also after IDAT (ImageMagick writes them there).
 *
 * Images are untrusted input. Each chunk length is checked against the bytes left before anything is
 * read, chunk data are views into the input (no copies), and decompression is capped.
 *
 * Errors: `BAD_IMAGE` when the PNG structure itself is broken (signature, lengths, missing IHDR/IEND,
 * bad CRC on a critical chunk), `BAD_METADATA` when one text chunk's own layout is broken (no keyword
 * separator, bad compression, invalid UTF-8 in iTXt). A CRC mismatch on an ancillary chunk is not
 * an error: the chunk is still read and flagged `crcOk: false` for the caller to report, since the
 * data of a text chunk stays readable and most decoders (browsers, libpng's default for ancillary
 * chunks) accept such files.
 */
import * as path from 'node:path';
import * as zlib from 'node:zlib';
import { PipelineError } from '../errors.ts';

export const PNG_SIGNATURE: Readonly<Uint8Array> = Uint8Array.of(0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a);
/** length + type before the data, CRC after it. */
const CHUNK_HEADER_BYTES = 8;
const CHUNK_CRC_BYTES = 4;
/** Spec, 5.3: "limited to 2^31 - 1 bytes". */
const MAX_CHUNK_LENGTH = 0x7fffffff;
const IHDR_LENGTH = 13;
/** Spec, 11.3.3.2: keywords are 1-79 bytes. */
const MAX_KEYWORD_BYTES = 79;
/**
 * A compressed text chunk may not inflate past this. ComfyUI workflows run to a few MB; 64 MiB
 * leaves room while keeping a zlib bomb from taking the process down.
 */
export const MAX_INFLATED_TEXT_BYTES = 64 * 1024 * 1024;
const ZLIB_METHOD = 0;

export interface PngChunk {
  /** Four letters as the file spells them (`IHDR`, `tEXt`, …). */
  readonly type: string;
  /** Offset of the chunk's length field in the file. */
  readonly offset: number;
  /** Data length in bytes (without length, type and CRC). */
  readonly length: number;
  /** A view into the input, not a copy. */
  readonly data: Uint8Array;
  readonly crcOk: boolean;
  /** True for chunks that come after the first IDAT (and for IEND). */
  readonly afterIdat: boolean;
}

export type PngTextChunkType = 'tEXt' | 'zTXt' | 'iTXt';

export interface PngTextEntry {
  readonly keyword: string;
  readonly text: string;
  readonly chunkType: PngTextChunkType;
  /**
   * How the text bytes were decoded. `tEXt`/`zTXt` are Latin-1 by the spec, but some writers
   * (Stability Matrix) put UTF-8 there; bytes that are valid UTF-8 with non-ASCII sequences are read
   * as UTF-8 (`utf-8`), since Latin-1 text that happens to form valid multi-byte UTF-8 is rare.
   */
  readonly encoding: 'ascii' | 'latin-1' | 'utf-8';
  readonly compressed: boolean;
  /** iTXt only. */
  readonly languageTag?: string;
  /** iTXt only. */
  readonly translatedKeyword?: string;
  readonly offset: number;
  readonly afterIdat: boolean;
  readonly crcOk: boolean;
}

/** CRC-32 as PNG defines it (ISO 3309 / ITU-T V.42, polynomial 0xEDB88320 reflected), spec Annex D. */
const CRC_TABLE: Uint32Array = (() => {
  const table = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    table[n] = c >>> 0;
  }
  return table;
})();

export function crc32(bytes: Uint8Array, crc = 0): number {
  let c = ~crc >>> 0;
  for (let i = 0; i < bytes.length; i++) c = CRC_TABLE[(c ^ bytes[i]!) & 0xff]! ^ (c >>> 8);
  return ~c >>> 0;
}

function displayName(fileName: string): string {
  return path.basename(fileName);
}

function badImage(fileName: string, message: string, details: Record<string, unknown> = {}): never {
  throw new PipelineError('BAD_IMAGE', `${displayName(fileName)}: ${message}`, { file: fileName, ...details });
}

function badMetadata(fileName: string, message: string, details: Record<string, unknown> = {}): never {
  throw new PipelineError('BAD_METADATA', `${displayName(fileName)}: ${message}`, { file: fileName, ...details });
}

export function isPng(bytes: Uint8Array): boolean {
  return bytes.length >= PNG_SIGNATURE.length && PNG_SIGNATURE.every((b, i) => bytes[i] === b);
}

function isChunkTypeByte(b: number): boolean {
  return (b >= 0x41 && b <= 0x5a) || (b >= 0x61 && b <= 0x7a);
}

/** Spec, 5.4: bit 5 of the first type byte (lower case) marks an ancillary chunk. */
function isCritical(type: string): boolean {
  return (type.charCodeAt(0) & 0x20) === 0;
}

/**
 * Every chunk from IHDR to IEND, validated. Bytes after IEND are ignored.
 * Throws `BAD_IMAGE`: not a PNG, a chunk overrunning the file, a length over 2^31-1, a non-letter
 * chunk type, IHDR missing or the wrong size, no IEND, a CRC mismatch on a critical chunk.
 */
export function parsePngChunks(png: Uint8Array, fileName = 'image.png'): PngChunk[] {
  if (!isPng(png)) {
    badImage(fileName, `not a PNG file: it does not start with the 8-byte PNG signature (found ${hexBytes(png, 0, 8)}).`);
  }
  const view = new DataView(png.buffer, png.byteOffset, png.byteLength);
  const chunks: PngChunk[] = [];
  let offset = PNG_SIGNATURE.length;
  let seenIdat = false;
  for (;;) {
    const last = chunks[chunks.length - 1];
    const where = last === undefined ? 'after the signature' : `after the ${last.type} chunk at offset ${last.offset}`;
    if (png.length - offset < CHUNK_HEADER_BYTES + CHUNK_CRC_BYTES) {
      badImage(fileName, `truncated: the file ends ${where} (offset ${offset} of ${png.length}) without an IEND chunk. Part of the file is missing; get the original again.`, { offset });
    }
    const length = view.getUint32(offset);
    const typeBytes = png.subarray(offset + 4, offset + 8);
    if (!typeBytes.every(isChunkTypeByte)) {
      badImage(fileName, `corrupt chunk ${where}: the chunk type at offset ${offset + 4} is ${hexBytes(png, offset + 4, 4)}, not four ASCII letters.`, { offset });
    }
    const type = String.fromCharCode(...typeBytes);
    if (length > MAX_CHUNK_LENGTH) {
      badImage(fileName, `corrupt ${type} chunk at offset ${offset}: length ${length} exceeds the PNG limit of 2^31-1 bytes.`, { offset, chunk: type, length });
    }
    const available = png.length - offset - CHUNK_HEADER_BYTES - CHUNK_CRC_BYTES;
    if (length > available) {
      badImage(
        fileName,
        `truncated ${type} chunk at offset ${offset}: it declares ${length} data bytes but only ${Math.max(available, 0)} remain before the end of the file (plus its 4-byte CRC). Part of the file is missing; get the original again.`,
        { offset, chunk: type, length, available },
      );
    }
    if (chunks.length === 0 && (type !== 'IHDR' || length !== IHDR_LENGTH)) {
      badImage(fileName, `corrupt PNG: the first chunk must be a ${IHDR_LENGTH}-byte IHDR, found ${type} of ${length} bytes.`, { offset, chunk: type, length });
    }
    const dataStart = offset + CHUNK_HEADER_BYTES;
    const data = png.subarray(dataStart, dataStart + length);
    const stored = view.getUint32(dataStart + length);
    const crcOk = crc32(data, crc32(typeBytes)) === stored;
    if (!crcOk && isCritical(type)) {
      badImage(fileName, `corrupt ${type} chunk at offset ${offset}: its CRC does not match its data. The image data is damaged; get the original again.`, { offset, chunk: type });
    }
    if (type === 'IDAT') seenIdat = true;
    chunks.push({ type, offset, length, data, crcOk, afterIdat: seenIdat && type !== 'IDAT' });
    offset = dataStart + length + CHUNK_CRC_BYTES;
    if (type === 'IEND') return chunks;
  }
}

function hexBytes(bytes: Uint8Array, start: number, count: number): string {
  const shown = Array.from(bytes.subarray(start, start + count), (b) => b.toString(16).padStart(2, '0')).join(' ');
  return shown === '' ? 'no bytes' : shown;
}

const utf8Fatal = new TextDecoder('utf-8', { fatal: true });

/**
 * Bytes that should be Latin-1 (tEXt, zTXt, EXIF ASCII): pure ASCII as is, valid UTF-8 with
 * multi-byte sequences as UTF-8 (writers that ignore the spec), anything else as Latin-1.
 * Node's `latin1` is ISO-8859-1 proper (TextDecoder's 'latin1' would be windows-1252).
 */
export function decodeLatin1OrUtf8(bytes: Uint8Array): { text: string; encoding: 'ascii' | 'latin-1' | 'utf-8' } {
  if (bytes.every((b) => b < 0x80)) return { text: Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength).toString('latin1'), encoding: 'ascii' };
  try {
    return { text: utf8Fatal.decode(bytes), encoding: 'utf-8' };
  } catch (e) {
    if (!(e instanceof TypeError)) throw e;
    return { text: Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength).toString('latin1'), encoding: 'latin-1' };
  }
}

function inflateText(data: Uint8Array, fileName: string, chunk: PngChunk, keyword: string, maxBytes: number): Uint8Array {
  try {
    return zlib.inflateSync(data, { maxOutputLength: maxBytes });
  } catch (e) {
    const code = (e as { code?: unknown }).code;
    if (code === 'ERR_BUFFER_TOO_LARGE') {
      badMetadata(fileName, `${chunk.type} chunk "${keyword}" at offset ${chunk.offset} inflates to more than ${maxBytes} bytes; refusing to read it.`, { offset: chunk.offset, chunk: chunk.type, keyword, maxBytes });
    }
    if (typeof code === 'string' && code.startsWith('Z_')) {
      badMetadata(fileName, `${chunk.type} chunk "${keyword}" at offset ${chunk.offset}: its zlib data is corrupt (${(e as Error).message}).`, { offset: chunk.offset, chunk: chunk.type, keyword });
    }
    throw e;
  }
}

/** Index of the first NUL at or after `from`, or -1. */
function nulAt(data: Uint8Array, from: number): number {
  return data.indexOf(0, from);
}

/**
 * Decode one tEXt / zTXt / iTXt chunk.
 * Throws `BAD_METADATA` naming the chunk: no keyword terminator, empty or over-long keyword, unknown
 * compression method, corrupt zlib data or more than `maxInflatedBytes` of it, iTXt text that is not UTF-8.
 */
export function decodePngTextChunk(chunk: PngChunk, fileName = 'image.png', maxInflatedBytes = MAX_INFLATED_TEXT_BYTES): PngTextEntry {
  const { data } = chunk;
  const type = chunk.type;
  if (type !== 'tEXt' && type !== 'zTXt' && type !== 'iTXt') {
    throw new Error(`decodePngTextChunk called on a ${type} chunk`);
  }
  const where = `${type} chunk at offset ${chunk.offset}`;
  const keywordEnd = nulAt(data, 0);
  if (keywordEnd < 0) badMetadata(fileName, `${where} has no NUL after its keyword; the chunk is corrupt.`, { offset: chunk.offset, chunk: type });
  if (keywordEnd === 0 || keywordEnd > MAX_KEYWORD_BYTES) {
    badMetadata(fileName, `${where} has a ${keywordEnd}-byte keyword; PNG keywords are 1-${MAX_KEYWORD_BYTES} bytes.`, { offset: chunk.offset, chunk: type });
  }
  const keyword = Buffer.from(data.buffer, data.byteOffset, keywordEnd).toString('latin1');
  const base = { keyword, chunkType: type, offset: chunk.offset, afterIdat: chunk.afterIdat, crcOk: chunk.crcOk } as const;

  if (type === 'tEXt') {
    return { ...base, ...decodeLatin1OrUtf8(data.subarray(keywordEnd + 1)), compressed: false };
  }
  if (type === 'zTXt') {
    const method = data[keywordEnd + 1];
    if (method !== ZLIB_METHOD) {
      badMetadata(fileName, `${where} ("${keyword}") uses compression method ${method ?? 'none (chunk ends)'}; PNG defines only 0 (zlib).`, { offset: chunk.offset, chunk: type, keyword });
    }
    return { ...base, ...decodeLatin1OrUtf8(inflateText(data.subarray(keywordEnd + 2), fileName, chunk, keyword, maxInflatedBytes)), compressed: true };
  }

  // iTXt
  const flag = data[keywordEnd + 1];
  const method = data[keywordEnd + 2];
  if (flag === undefined || method === undefined || (flag !== 0 && flag !== 1)) {
    badMetadata(fileName, `${where} ("${keyword}") has a compression flag of ${flag ?? 'none (chunk ends)'}; it must be 0 or 1.`, { offset: chunk.offset, chunk: type, keyword });
  }
  if (flag === 1 && method !== ZLIB_METHOD) {
    badMetadata(fileName, `${where} ("${keyword}") uses compression method ${method}; PNG defines only 0 (zlib).`, { offset: chunk.offset, chunk: type, keyword });
  }
  const langStart = keywordEnd + 3;
  const langEnd = nulAt(data, langStart);
  const tkeyEnd = langEnd < 0 ? -1 : nulAt(data, langEnd + 1);
  if (tkeyEnd < 0) {
    badMetadata(fileName, `${where} ("${keyword}") is missing the NUL after its language tag or translated keyword; the chunk is corrupt.`, { offset: chunk.offset, chunk: type, keyword });
  }
  const raw = data.subarray(tkeyEnd + 1);
  const textBytes = flag === 1 ? inflateText(raw, fileName, chunk, keyword, maxInflatedBytes) : raw;
  let text: string;
  let translatedKeyword: string;
  try {
    translatedKeyword = utf8Fatal.decode(data.subarray(langEnd + 1, tkeyEnd));
    text = utf8Fatal.decode(textBytes);
  } catch (e) {
    if (!(e instanceof TypeError)) throw e;
    badMetadata(fileName, `${where} ("${keyword}") is not valid UTF-8, which iTXt requires.`, { offset: chunk.offset, chunk: type, keyword });
  }
  return {
    ...base,
    text,
    encoding: 'utf-8',
    compressed: flag === 1,
    languageTag: Buffer.from(data.buffer, data.byteOffset + langStart, langEnd - langStart).toString('latin1'),
    translatedKeyword,
  };
}

export function isPngTextChunk(chunk: PngChunk): boolean {
  return chunk.type === 'tEXt' || chunk.type === 'zTXt' || chunk.type === 'iTXt';
}

/** All text chunks of a PNG in file order (also those after IDAT). Throws as `parsePngChunks` and `decodePngTextChunk`. */
export function readPngTextChunks(png: Uint8Array, fileName = 'image.png'): PngTextEntry[] {
  return parsePngChunks(png, fileName).filter(isPngTextChunk).map((c) => decodePngTextChunk(c, fileName));
}

function encodeChunk(type: string, data: Uint8Array): Uint8Array {
  const out = new Uint8Array(CHUNK_HEADER_BYTES + data.length + CHUNK_CRC_BYTES);
  const view = new DataView(out.buffer);
  view.setUint32(0, data.length);
  for (let i = 0; i < 4; i++) out[4 + i] = type.charCodeAt(i);
  out.set(data, CHUNK_HEADER_BYTES);
  view.setUint32(CHUNK_HEADER_BYTES + data.length, crc32(out.subarray(4, CHUNK_HEADER_BYTES + data.length)));
  return out;
}

function isLatin1(text: string): boolean {
  for (let i = 0; i < text.length; i++) if (text.charCodeAt(i) > 0xff) return false;
  return true;
}

/** Spec, 11.3.3.2: printable Latin-1 (32-126, 161-255), no leading, trailing or double spaces. */
function checkKeyword(keyword: string): void {
  const problem =
    keyword.length === 0 || keyword.length > MAX_KEYWORD_BYTES
      ? `must be 1-${MAX_KEYWORD_BYTES} characters (it has ${keyword.length})`
      : [...keyword].some((ch) => {
            const c = ch.codePointAt(0)!;
            return !((c >= 32 && c <= 126) || (c >= 161 && c <= 255));
          })
        ? 'may only contain printable Latin-1 characters'
        : keyword.startsWith(' ') || keyword.endsWith(' ') || keyword.includes('  ')
          ? 'may not start or end with a space or contain two spaces in a row'
          : undefined;
  if (problem !== undefined) {
    throw new PipelineError('BAD_ARGUMENT', `PNG text keyword ${JSON.stringify(keyword)} ${problem} (PNG specification 11.3.3.2).`, { keyword });
  }
}

/**
 * One text chunk the way Pillow's `PngInfo.add_text` writes it (and so A1111): `tEXt` when the text
 * is Latin-1-encodable, else an uncompressed `iTXt` with empty language tag and translated keyword.
 * One deviation: Latin-1 text whose bytes happen to form UTF-8 multi-byte sequences ("Ã©") also
 * goes to iTXt, because readers that accept UTF-8 in tEXt (this one included) would misread it.
 */
export function encodePngTextChunk(keyword: string, text: string): Uint8Array {
  checkKeyword(keyword);
  const key = Buffer.from(keyword, 'latin1');
  const latin1 = isLatin1(text) ? Buffer.from(text, 'latin1') : undefined;
  if (latin1 !== undefined && decodeLatin1OrUtf8(latin1).text === text) {
    return encodeChunk('tEXt', Buffer.concat([key, Uint8Array.of(0), latin1]));
  }
  // keyword NUL, compression flag 0, method 0, empty language tag NUL, empty translated keyword NUL.
  return encodeChunk('iTXt', Buffer.concat([key, Uint8Array.of(0, 0, ZLIB_METHOD, 0, 0), Buffer.from(text, 'utf-8')]));
}

/**
 * A copy of `png` with one text chunk per entry inserted right after IHDR (in `entries` order), and
 * every existing tEXt/zTXt/iTXt chunk with one of those keywords removed wherever it was. Everything
 * else is copied byte for byte. Throws `BAD_IMAGE` for an invalid PNG (as `parsePngChunks`),
 * `BAD_ARGUMENT` for an invalid keyword or the same keyword twice in `entries`.
 */
export function addPngTextChunks(png: Uint8Array, entries: ReadonlyArray<{ keyword: string; text: string }>, fileName = 'image.png'): Uint8Array {
  const seen = new Set<string>();
  for (const { keyword } of entries) {
    if (seen.has(keyword)) throw new PipelineError('BAD_ARGUMENT', `PNG text keyword "${keyword}" is given twice; each keyword is written once.`, { keyword });
    seen.add(keyword);
  }
  const added = entries.map(({ keyword, text }) => encodePngTextChunk(keyword, text));
  const chunks = parsePngChunks(png, fileName);
  const replaced = (c: PngChunk): boolean => {
    if (!isPngTextChunk(c)) return false;
    const end = nulAt(c.data, 0);
    const keyword = Buffer.from(c.data.buffer, c.data.byteOffset, end < 0 ? c.data.length : end).toString('latin1');
    return seen.has(keyword);
  };
  const raw = (c: PngChunk): Uint8Array => png.subarray(c.offset, c.offset + CHUNK_HEADER_BYTES + c.length + CHUNK_CRC_BYTES);
  const [ihdr, ...rest] = chunks;
  const iend = chunks[chunks.length - 1]!;
  const trailing = png.subarray(iend.offset + CHUNK_HEADER_BYTES + iend.length + CHUNK_CRC_BYTES);
  return Buffer.concat([PNG_SIGNATURE, raw(ihdr!), ...added, ...rest.filter((c) => !replaced(c)).map(raw), trailing]);
}
