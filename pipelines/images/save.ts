/**
 * Saving generated images: float [0, 1] NCHW → 8-bit RGB → PNG (sharp) with A1111's `parameters`
 * text and a `chorus` JSON chunk (everything needed to reproduce the image), written atomically
 * (temporary file, then rename) so a crash never leaves a half-written PNG under the final name.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import sharp from 'sharp';
import type { Tensor } from '../../models/index.ts';
import { PipelineError } from '../errors.ts';
import { addPngTextChunks } from './png-chunks.ts';

/** Name of our PNG text chunk. */
export const CHORUS_CHUNK = 'chorus';
/** Name of A1111's PNG text chunk. */
export const A1111_CHUNK = 'parameters';

/**
 * (1, 3, H, W) in [0, 1] → interleaved RGB bytes, `round(x · 255)` with numpy's round-half-to-even
 * (diffusers' `numpy_to_pil`), clamped to [0, 255].
 */
export function toRgbBytes(image: Tensor<'float32'>): { width: number; height: number; rgb: Uint8Array } {
  const [n, ch, height, width] = image.shape as [number, number, number, number];
  if (n !== 1 || ch !== 3) throw new PipelineError('BAD_IMAGE', `expected one RGB image (1, 3, H, W), got [${image.shape.join(', ')}].`, { shape: image.shape });
  const plane = height * width;
  const rgb = new Uint8Array(plane * 3);
  for (let c = 0; c < 3; c++) {
    for (let p = 0; p < plane; p++) {
      const x = Math.fround(image.data[c * plane + p]! * 255);
      let r = Math.round(x);
      if (r - x === 0.5 && r % 2 !== 0) r -= 1; // half to even
      rgb[p * 3 + c] = r < 0 ? 0 : r > 255 ? 255 : r;
    }
  }
  return { width, height, rgb };
}

/** Encode as PNG with text chunks. */
export async function encodePng(image: Tensor<'float32'>, texts: ReadonlyArray<{ keyword: string; text: string }>): Promise<Uint8Array> {
  const { width, height, rgb } = toRgbBytes(image);
  const png = await sharp(rgb, { raw: { width, height, channels: 3 } }).png({ compressionLevel: 6 }).toBuffer();
  return addPngTextChunks(new Uint8Array(png.buffer, png.byteOffset, png.byteLength), texts);
}

/** Write bytes to `file` atomically; creates the folder. */
export function writeFileAtomic(file: string, bytes: Uint8Array): void {
  fs.mkdirSync(path.dirname(file), { recursive: true });
  const tmp = path.join(path.dirname(file), `.${path.basename(file)}.${process.pid}.tmp`);
  const fd = fs.openSync(tmp, 'w');
  try {
    fs.writeSync(fd, bytes);
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
  fs.renameSync(tmp, file);
}
