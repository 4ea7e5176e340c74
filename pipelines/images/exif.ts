/**
 * EXIF text tags from JPEG (APP1 `Exif\0\0` segment), WebP (RIFF `EXIF` chunk) and PNG (`eXIf`).
 *
 * EXIF is a TIFF structure (TIFF 6.0 section 2; Exif 2.32, CIPA DC-008, 4.6): a header `II` or `MM`
 * (little / big endian), 42, the offset of IFD0; an IFD is a u16 entry count, then 12-byte entries
 * `tag u16 | type u16 | count u32 | value or offset u32` (values of up to 4 bytes sit in place).
 * IFD0 tag 0x8769 points at the Exif IFD, which holds UserComment (0x9286, type UNDEFINED, an
 * 8-byte character-code prefix then the text).
 *
 * What generation tools store here (see shared/realworld/README.md):
 * - A1111 / Forge / SD.Next / Civitai: the infotext in UserComment, `UNICODE\0` + UTF-16. piexif
 *   (A1111) always writes UTF-16BE; SwarmUI writes UTF-16LE; Civitai writes UTF-16BE inside a
 *   little-endian TIFF. The byte order is therefore decided from the content, not from the TIFF header.
 * - NovelAI (WebP): UserComment `ASCII\0\0\0` + JSON, Software "NovelAI …".
 * - ComfyUI (WebP): `prompt:`/`workflow:` JSON in IFD0 ASCII tags (Make, Model, ImageDescription).
 * ASCII-typed tags sometimes hold UTF-8 (GIMP) or start with NUL bytes (NovelAI); both are handled.
 *
 * Only the values that are read are bounds-checked; entries of other tags are skipped unread.
 * Errors: `BAD_IMAGE` when the JPEG or RIFF container is broken, `BAD_METADATA` when the EXIF block
 * is (header, IFD or a value running past its end). Nothing is allocated from a length in the file
 * before it is checked against the bytes present.
 */
import * as path from 'node:path';
import { PipelineError } from '../errors.ts';
import { decodeLatin1OrUtf8 } from './png-chunks.ts';

/** The APP1 payload prefix that marks EXIF (Exif 2.32, 4.5.4). */
const EXIF_HEADER: Readonly<Uint8Array> = Uint8Array.of(0x45, 0x78, 0x69, 0x66, 0x00, 0x00);
const TIFF_MAGIC = 42;
const IFD_ENTRY_BYTES = 12;
const TAG_EXIF_IFD_POINTER = 0x8769;
const TAG_USER_COMMENT = 0x9286;
/** TIFF field types (TIFF 6.0, section 2, "Types"; 13 = IFD from TIFF-EP). */
const TYPE_ASCII = 2;
const TYPE_LONG = 4;
const TYPE_UNDEFINED = 7;
const TYPE_IFD = 13;
const TYPE_BYTES: Readonly<Record<number, number>> = { 1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4 };
/** UserComment character-code prefixes (Exif 2.32, Table 9). */
const USER_COMMENT_PREFIX_BYTES = 8;

const JPEG_SOI = 0xd8;
const JPEG_EOI = 0xd9;
const JPEG_SOS = 0xda;
const JPEG_APP1 = 0xe1;
/** Markers without a length field: TEM, RST0-7 (ITU T.81, B.1.1.3). */
function isStandaloneMarker(m: number): boolean {
  return m === 0x01 || (m >= 0xd0 && m <= 0xd7);
}

/**
 * Names for the text tags generation tools use, spelled as the Exif spec does; any other text tag is
 * keyed `0x…` (lower-case hex, no padding).
 */
export const EXIF_TEXT_TAG_NAMES: Readonly<Record<number, string>> = {
  0x010d: 'DocumentName',
  0x010e: 'ImageDescription',
  0x010f: 'Make',
  0x0110: 'Model',
  0x0131: 'Software',
  0x013b: 'Artist',
  0x8298: 'Copyright',
  [TAG_USER_COMMENT]: 'UserComment',
};

export type ExifIfdName = 'IFD0' | 'ExifIFD';
export type ExifTextEncoding = 'ascii' | 'latin-1' | 'utf-8' | 'utf-16le' | 'utf-16be' | 'shift_jis';
/** `none`: the UserComment had no recognised prefix and was read as plain bytes. */
export type UserCommentCharset = 'ASCII' | 'UNICODE' | 'JIS' | 'undefined' | 'none';

export interface ExifTextTag {
  readonly ifd: ExifIfdName;
  readonly tag: number;
  readonly name: string;
  readonly text: string;
  readonly encoding: ExifTextEncoding;
  /** UserComment only. */
  readonly charset?: UserCommentCharset;
}

export interface ExifData {
  readonly byteOrder: 'II' | 'MM';
  /** ASCII tags of IFD0 and the Exif IFD, and UserComment, in file order. */
  readonly tags: ExifTextTag[];
}

function displayName(fileName: string): string {
  return path.basename(fileName);
}

function badImage(fileName: string, message: string, details: Record<string, unknown> = {}): never {
  throw new PipelineError('BAD_IMAGE', `${displayName(fileName)}: ${message}`, { file: fileName, ...details });
}

function badExif(fileName: string, where: string, message: string, details: Record<string, unknown> = {}): never {
  throw new PipelineError('BAD_METADATA', `${displayName(fileName)}: corrupt EXIF in the ${where}: ${message}`, { file: fileName, where, ...details });
}

function startsWith(bytes: Uint8Array, prefix: Readonly<Uint8Array>, at = 0): boolean {
  if (bytes.length - at < prefix.length) return false;
  for (let i = 0; i < prefix.length; i++) if (bytes[at + i] !== prefix[i]) return false;
  return true;
}

const ascii = (s: string): Uint8Array => Uint8Array.from(s, (c) => c.charCodeAt(0));
const PREFIX_ASCII = ascii('ASCII\0\0\0');
const PREFIX_UNICODE = ascii('UNICODE\0');
const PREFIX_JIS = ascii('JIS\0\0\0\0\0');
const PREFIX_UNDEFINED = new Uint8Array(USER_COMMENT_PREFIX_BYTES);

function stripNuls(text: string): string {
  return text.replace(/^\0+|\0+$/g, '');
}

/**
 * Score of a byte order: printable ASCII and whitespace count 2, other "plausible" code units 1
 * (Latin-1 and Latin Extended, general punctuation, CJK symbols / kana / ideographs, Hangul,
 * fullwidth forms). Byte-swapped ASCII lands in CJK or Hangul, hence the higher weight for ASCII;
 * byte-swapped CJK mostly lands in unassigned, surrogate or private-use ranges.
 */
function utf16Score(bytes: Uint8Array, littleEndian: boolean): number {
  let score = 0;
  for (let i = 0; i + 1 < bytes.length; i += 2) {
    const u = littleEndian ? bytes[i]! | (bytes[i + 1]! << 8) : (bytes[i]! << 8) | bytes[i + 1]!;
    if ((u >= 0x20 && u <= 0x7e) || u === 0x09 || u === 0x0a || u === 0x0d) {
      score += 2;
    } else if (
      (u >= 0xa0 && u <= 0x24f) ||
      (u >= 0x2000 && u <= 0x206f) ||
      (u >= 0x3000 && u <= 0x9fff) ||
      (u >= 0xac00 && u <= 0xd7af) ||
      (u >= 0xff00 && u <= 0xffef)
    ) {
      score += 1;
    }
  }
  return score;
}

/** UTF-16 of unknown byte order: a BOM decides, else the content (see `utf16Score`), else the TIFF order. */
export function decodeUtf16ByContent(bytes: Uint8Array, tiffLittleEndian: boolean): { text: string; encoding: 'utf-16le' | 'utf-16be' } {
  let body = bytes;
  let littleEndian: boolean;
  if (bytes[0] === 0xfe && bytes[1] === 0xff) {
    littleEndian = false;
    body = bytes.subarray(2);
  } else if (bytes[0] === 0xff && bytes[1] === 0xfe) {
    littleEndian = true;
    body = bytes.subarray(2);
  } else {
    const le = utf16Score(bytes, true);
    const be = utf16Score(bytes, false);
    littleEndian = le === be ? tiffLittleEndian : le > be;
  }
  const text = new TextDecoder(littleEndian ? 'utf-16le' : 'utf-16be').decode(body.subarray(0, body.length & ~1));
  return { text, encoding: littleEndian ? 'utf-16le' : 'utf-16be' };
}

/** A UserComment value: the 8-byte character-code prefix, then the text in that code. */
export function decodeUserComment(value: Uint8Array, tiffLittleEndian: boolean): { text: string; encoding: ExifTextEncoding; charset: UserCommentCharset } {
  const body = value.subarray(USER_COMMENT_PREFIX_BYTES);
  if (startsWith(value, PREFIX_UNICODE)) {
    const { text, encoding } = decodeUtf16ByContent(body, tiffLittleEndian);
    return { text: stripNuls(text), encoding, charset: 'UNICODE' };
  }
  if (startsWith(value, PREFIX_JIS)) {
    return { text: stripNuls(new TextDecoder('shift_jis').decode(body)), encoding: 'shift_jis', charset: 'JIS' };
  }
  const charset: UserCommentCharset = startsWith(value, PREFIX_ASCII) ? 'ASCII' : startsWith(value, PREFIX_UNDEFINED) ? 'undefined' : 'none';
  const { text, encoding } = decodeLatin1OrUtf8(charset === 'none' ? value : body);
  return { text: stripNuls(text), encoding, charset };
}

class TiffReader {
  readonly view: DataView;
  readonly littleEndian: boolean;
  constructor(
    readonly tiff: Uint8Array,
    readonly fileName: string,
    readonly where: string,
  ) {
    this.view = new DataView(tiff.buffer, tiff.byteOffset, tiff.byteLength);
    if (tiff.length < 8) badExif(fileName, where, `the block is ${tiff.length} bytes, shorter than the 8-byte TIFF header.`, { bytes: tiff.length });
    const order = String.fromCharCode(tiff[0]!, tiff[1]!);
    if (order !== 'II' && order !== 'MM') badExif(fileName, where, `the TIFF header starts with ${JSON.stringify(order)}, not "II" or "MM".`);
    this.littleEndian = order === 'II';
    const magic = this.u16(2);
    if (magic !== TIFF_MAGIC) badExif(fileName, where, `the TIFF header has ${magic} where 42 belongs.`, { magic });
  }
  u16(at: number): number {
    return this.view.getUint16(at, this.littleEndian);
  }
  u32(at: number): number {
    return this.view.getUint32(at, this.littleEndian);
  }
}

interface IfdEntry {
  tag: number;
  type: number;
  count: number;
  /** The value bytes (in place or at the offset the entry points at), checked against the block. */
  value: () => Uint8Array;
  /** The raw 4-byte value field as a number (for LONG/IFD pointers). */
  field: number;
}

function readIfd(r: TiffReader, offset: number, ifd: ExifIfdName): IfdEntry[] {
  if (offset < 8 || offset + 2 > r.tiff.length) {
    badExif(r.fileName, r.where, `${ifd} offset ${offset} is outside the ${r.tiff.length}-byte EXIF block.`, { ifd, offset });
  }
  const count = r.u16(offset);
  const end = offset + 2 + count * IFD_ENTRY_BYTES;
  if (end > r.tiff.length) {
    badExif(r.fileName, r.where, `${ifd} at offset ${offset} declares ${count} entries (${count * IFD_ENTRY_BYTES} bytes) but the block ends at ${r.tiff.length}.`, { ifd, offset, count });
  }
  const entries: IfdEntry[] = [];
  for (let i = 0; i < count; i++) {
    const at = offset + 2 + i * IFD_ENTRY_BYTES;
    const tag = r.u16(at);
    const type = r.u16(at + 2);
    const n = r.u32(at + 4);
    const field = r.u32(at + 8);
    entries.push({
      tag,
      type,
      count: n,
      field,
      value: () => {
        const unit = TYPE_BYTES[type];
        const tagName = `tag 0x${tag.toString(16)}`;
        if (unit === undefined) badExif(r.fileName, r.where, `${ifd} ${tagName} has unknown field type ${type}.`, { ifd, tag, type });
        const size = unit * n;
        if (size <= 4) return r.tiff.subarray(at + 8, at + 8 + size);
        if (field > r.tiff.length || size > r.tiff.length - field) {
          badExif(
            r.fileName,
            r.where,
            `${ifd} ${tagName} points at ${size} bytes at offset ${field}, past the end of the ${r.tiff.length}-byte EXIF block.`,
            { ifd, tag, offset: field, size },
          );
        }
        return r.tiff.subarray(field, field + size);
      },
    });
  }
  return entries;
}

/**
 * Text tags from a TIFF/EXIF block (the bytes after `Exif\0\0`): ASCII tags of IFD0 and the Exif
 * IFD, and UserComment. `where` names the block in messages ("JPEG APP1 segment").
 * Throws `BAD_METADATA`: short or unknown header, IFD or value outside the block.
 */
export function parseExif(tiff: Uint8Array, fileName = 'image', where = 'EXIF block'): ExifData {
  const r = new TiffReader(tiff, fileName, where);
  const tags: ExifTextTag[] = [];
  const collect = (entries: IfdEntry[], ifd: ExifIfdName): void => {
    for (const e of entries) {
      const name = EXIF_TEXT_TAG_NAMES[e.tag] ?? `0x${e.tag.toString(16)}`;
      if (e.tag === TAG_USER_COMMENT && (e.type === TYPE_UNDEFINED || e.type === TYPE_ASCII)) {
        tags.push({ ifd, tag: e.tag, name, ...decodeUserComment(e.value(), r.littleEndian) });
      } else if (e.type === TYPE_ASCII) {
        const { text, encoding } = decodeLatin1OrUtf8(e.value());
        tags.push({ ifd, tag: e.tag, name, text: stripNuls(text), encoding });
      }
    }
  };
  const ifd0 = readIfd(r, r.u32(4), 'IFD0');
  collect(ifd0, 'IFD0');
  const pointer = ifd0.find((e) => e.tag === TAG_EXIF_IFD_POINTER);
  if (pointer !== undefined) {
    if ((pointer.type !== TYPE_LONG && pointer.type !== TYPE_IFD) || pointer.count !== 1) {
      badExif(fileName, where, `the Exif IFD pointer (tag 0x8769) has type ${pointer.type} and count ${pointer.count}; expected one LONG.`, { type: pointer.type, count: pointer.count });
    }
    collect(readIfd(r, pointer.field, 'ExifIFD'), 'ExifIFD');
  }
  return { byteOrder: r.littleEndian ? 'II' : 'MM', tags };
}

export function isJpeg(bytes: Uint8Array): boolean {
  return bytes.length >= 3 && bytes[0] === 0xff && bytes[1] === JPEG_SOI && bytes[2] === 0xff;
}

export function isWebp(bytes: Uint8Array): boolean {
  return bytes.length >= 12 && startsWith(bytes, ascii('RIFF')) && startsWith(bytes, ascii('WEBP'), 8);
}

/**
 * The TIFF bytes of the first APP1 `Exif\0\0` segment, or undefined when there is none. Walks the
 * marker segments up to the first scan (SOS), where metadata ends.
 * Throws `BAD_IMAGE`: not a JPEG, a segment overrunning the file, no marker where one belongs.
 */
export function findJpegExif(jpeg: Uint8Array, fileName = 'image.jpg'): Uint8Array | undefined {
  if (!isJpeg(jpeg)) badImage(fileName, 'not a JPEG file: it does not start with the SOI marker FF D8 FF.');
  const view = new DataView(jpeg.buffer, jpeg.byteOffset, jpeg.byteLength);
  let at = 2;
  for (;;) {
    if (at >= jpeg.length) badImage(fileName, `truncated JPEG: the file ends at offset ${jpeg.length} before any image data (SOS).`, { offset: at });
    if (jpeg[at] !== 0xff) {
      badImage(fileName, `corrupt JPEG: expected a marker (FF xx) at offset ${at}, found ${jpeg[at]!.toString(16).padStart(2, '0')}.`, { offset: at });
    }
    // Any number of FF fill bytes may precede a marker (ITU T.81, B.1.1.2).
    while (jpeg[at] === 0xff) at++;
    const marker = jpeg[at];
    if (marker === undefined) badImage(fileName, `truncated JPEG: the file ends inside a marker at offset ${at}.`, { offset: at });
    at++;
    if (marker === JPEG_SOS || marker === JPEG_EOI) return undefined;
    if (isStandaloneMarker(marker)) continue;
    if (at + 2 > jpeg.length) badImage(fileName, `truncated JPEG: the segment FF ${marker.toString(16)} at offset ${at - 2} has no length field.`, { offset: at - 2 });
    const length = view.getUint16(at);
    if (length < 2 || at + length > jpeg.length) {
      badImage(
        fileName,
        `corrupt JPEG: segment FF ${marker.toString(16)} at offset ${at - 2} declares ${length} bytes but ${jpeg.length - at} remain.`,
        { offset: at - 2, marker, length },
      );
    }
    const payload = jpeg.subarray(at + 2, at + length);
    if (marker === JPEG_APP1 && startsWith(payload, EXIF_HEADER)) return payload.subarray(EXIF_HEADER.length);
    at += length;
  }
}

/**
 * The TIFF bytes of the RIFF `EXIF` chunk of a WebP (WebP container spec, "Metadata"), or undefined.
 * Throws `BAD_IMAGE`: not a WebP, a chunk overrunning the file.
 */
export function findWebpExif(webp: Uint8Array, fileName = 'image.webp'): Uint8Array | undefined {
  if (!isWebp(webp)) badImage(fileName, 'not a WebP file: it does not start with "RIFF" …. "WEBP".');
  const view = new DataView(webp.buffer, webp.byteOffset, webp.byteLength);
  const riffEnd = Math.min(8 + view.getUint32(4, true), webp.length);
  let at = 12;
  while (at + 8 <= riffEnd) {
    const fourcc = String.fromCharCode(...webp.subarray(at, at + 4));
    const size = view.getUint32(at + 4, true);
    if (size > webp.length - at - 8) {
      badImage(fileName, `truncated WebP: chunk "${fourcc}" at offset ${at} declares ${size} bytes but ${webp.length - at - 8} remain.`, { offset: at, chunk: fourcc, size });
    }
    if (fourcc === 'EXIF') return tiffOfExifChunk(webp.subarray(at + 8, at + 8 + size));
    at += 8 + size + (size & 1);
  }
  return undefined;
}

/**
 * The TIFF bytes of a WebP `EXIF` or PNG `eXIf` chunk. Both specs put the TIFF header first; some
 * writers copy the JPEG `Exif\0\0` prefix in as well, which is skipped.
 */
export function tiffOfExifChunk(data: Uint8Array): Uint8Array {
  return startsWith(data, EXIF_HEADER) ? data.subarray(EXIF_HEADER.length) : data;
}
