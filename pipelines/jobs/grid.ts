/**
 * X/Y/Z grids: any job field × any job field (LoRA weight × strategy, CFG × seed, …) expanded into
 * jobs, and the labelled grid image assembled from their outputs.
 *
 * Grid spec (the `--grid` argument): up to three axes separated by `;`, in X, Y, Z order, each
 * `field=value,value,…`:
 *
 *   cfgScale=5,7,9
 *   seed=1..4; loras[0].unet=0.4,0.8
 *   strategy=plain,"composite",{"name":"switch","switchEvery":2}; steps=10,20; prompt="a cat, red","a dog"
 *
 * - `field` is a path into the v1 job spec: a top-level field, `.key` into objects, `[n]` into arrays
 *   (`loras[1].te`, `strategy.switchEvery`). Array entries must exist in the job (a grid changes a
 *   job, it does not invent LoRAs); object keys are created.
 * - A value is JSON when it parses as JSON (numbers, "quoted text", [arrays], {objects}, true/false),
 *   `a..b` is every whole number from a to b, anything else is taken as text (`DPM++ 2M`). Commas
 *   and semicolons inside quotes or brackets do not split.
 *
 * Each job line × Z value gives one grid image: X values across, Y values down. Jobs are numbered
 * line by line, then Z, Y, X (X fastest). The image is sharp compositing the cells' PNGs and one SVG
 * of the labels (column headers, row headers, title lines naming the Z value and the axes).
 */
import * as path from 'node:path';
import sharp, { type OverlayOptions } from 'sharp';
import { PipelineError } from '../errors.ts';
import { JOB_SPEC_FIELDS } from './schema.ts';

export const MAX_GRID_AXES = 3;
/** Guard against a typo like `seed=1..100000` queueing a night's worth of jobs by accident. */
export const MAX_GRID_VALUES = 1000;
const AXIS_NAMES = ['x', 'y', 'z'] as const;

export interface GridAxis {
  /** The spec path, as written (`loras[0].unet`). */
  readonly field: string;
  readonly values: readonly unknown[];
  /** Short text per value, for the image and the `{x}` `{y}` `{z}` output tokens. */
  readonly labels: readonly string[];
}

export interface GridSpec {
  /** 1 to 3 axes: X, Y, Z. */
  readonly axes: readonly GridAxis[];
}

/** A job's place in a grid: 0-based value indexes (0 for an absent axis). */
export interface GridCell {
  readonly x: number;
  readonly y: number;
  readonly z: number;
}

type PathSegment = { readonly key: string } | { readonly index: number };

function gridError(message: string, details: Record<string, unknown> = {}): never {
  throw new PipelineError('BAD_ARGUMENT', `--grid: ${message}`, { field: 'grid', ...details });
}

/** Split on `sep` outside quotes and brackets. */
function splitTopLevel(text: string, sep: string): string[] {
  const parts: string[] = [];
  let depth = 0;
  let quoted = false;
  let start = 0;
  for (let i = 0; i < text.length; i++) {
    const ch = text[i]!;
    if (quoted) {
      if (ch === '\\') i++;
      else if (ch === '"') quoted = false;
    } else if (ch === '"') quoted = true;
    else if (ch === '[' || ch === '{') depth++;
    else if (ch === ']' || ch === '}') depth--;
    else if (ch === sep && depth === 0) {
      parts.push(text.slice(start, i));
      start = i + 1;
    }
  }
  if (quoted || depth !== 0) gridError(`unbalanced quotes or brackets in ${JSON.stringify(text)}.`);
  parts.push(text.slice(start));
  return parts;
}

export function parseFieldPath(field: string): PathSegment[] {
  if (!/^[A-Za-z_]\w*(\[\d+\]|\.[A-Za-z_]\w*)*$/.test(field)) gridError(`"${field}" is not a field path (write e.g. cfgScale, loras[0].unet, strategy.switchEvery).`);
  const segments: PathSegment[] = [];
  for (const m of field.matchAll(/([A-Za-z_]\w*)|\[(\d+)\]/g)) segments.push(m[1] !== undefined ? { key: m[1] } : { index: Number(m[2]) });
  const top = (segments[0] as { key: string }).key;
  if (!(top in JOB_SPEC_FIELDS) || top === 'version') {
    gridError(`"${top}" is not a job field; use one of ${Object.keys(JOB_SPEC_FIELDS).filter((k) => k !== 'version').join(', ')}.`, { axisField: field });
  }
  return segments;
}

function parseValue(token: string): unknown[] {
  const text = token.trim();
  const range = /^(-?\d+)\.\.(-?\d+)$/.exec(text);
  if (range !== null) {
    const [from, to] = [Number(range[1]), Number(range[2])];
    const count = Math.abs(to - from) + 1;
    if (count > MAX_GRID_VALUES) gridError(`the range ${text} has ${count} values; at most ${MAX_GRID_VALUES} per axis.`);
    const step = to >= from ? 1 : -1;
    return Array.from({ length: count }, (_, i) => from + i * step);
  }
  if (text === '') gridError('an empty value (two commas in a row?).');
  try {
    return [JSON.parse(text)];
  } catch {
    return [text];
  }
}

/** A value's label: text as is, numbers as written, LoRA lists as `name:te/unet`. */
export function valueLabel(value: unknown): string {
  if (typeof value === 'string') return value;
  if (typeof value === 'number' || typeof value === 'boolean') return String(value);
  if (Array.isArray(value) && value.every((v) => typeof v === 'object' && v !== null && typeof (v as { name?: unknown }).name === 'string')) {
    if (value.length === 0) return 'none';
    return value
      .map((v: { name: string; te?: number; unet?: number }) => {
        const stem = path.basename(v.name).replace(/\.safetensors$/i, '');
        const w = v.te === undefined ? '' : v.unet === undefined || v.unet === v.te ? `:${v.te}` : `:${v.te}/${v.unet}`;
        return `${stem}${w}`;
      })
      .join(' + ');
  }
  if (typeof value === 'object' && value !== null && typeof (value as { name?: unknown }).name === 'string') {
    const { name, ...knobs } = value as Record<string, unknown>;
    const rest = Object.entries(knobs).map(([k, v]) => `${k}=${JSON.stringify(v)}`);
    return rest.length === 0 ? String(name) : `${String(name)} (${rest.join(', ')})`;
  }
  return JSON.stringify(value);
}

/** Parse a `--grid` spec. Throws `PipelineError('BAD_ARGUMENT')` naming the axis and what is wrong. */
export function parseGridSpec(text: string): GridSpec {
  const axesText = splitTopLevel(text, ';').map((a) => a.trim()).filter((a) => a !== '');
  if (axesText.length === 0) gridError('no axis; write e.g. "cfgScale=5,7,9; seed=1..3".');
  if (axesText.length > MAX_GRID_AXES) gridError(`${axesText.length} axes; a grid has at most ${MAX_GRID_AXES} (X, Y, Z).`);
  const axes = axesText.map((axisText, a): GridAxis => {
    const eq = axisText.indexOf('=');
    if (eq <= 0) gridError(`axis ${AXIS_NAMES[a]} "${axisText}" needs the form field=value,value,…`);
    const field = axisText.slice(0, eq).trim();
    parseFieldPath(field);
    const values = splitTopLevel(axisText.slice(eq + 1), ',').flatMap(parseValue);
    if (values.length > MAX_GRID_VALUES) gridError(`axis ${AXIS_NAMES[a]} has ${values.length} values; at most ${MAX_GRID_VALUES}.`);
    return { field, values, labels: values.map(valueLabel) };
  });
  const fields = axes.map((a) => a.field);
  const repeated = fields.find((f, i) => fields.indexOf(f) !== i);
  if (repeated !== undefined) gridError(`the field ${repeated} is on two axes.`);
  return { axes };
}

/**
 * A copy of `spec` with `field` set to `value`. A `strategy` given by name becomes `{name}` first so
 * its knobs can be set. Throws when the path runs through a missing array entry or a non-object.
 */
export function setSpecField(spec: unknown, field: string, value: unknown): unknown {
  const segments = parseFieldPath(field);
  const root: unknown = structuredClone(spec);
  if (typeof root !== 'object' || root === null || Array.isArray(root)) gridError('a job line is not an object.');
  let node = root as Record<string, unknown> | unknown[];
  let at = '';
  segments.forEach((seg, i) => {
    const last = i === segments.length - 1;
    if ('key' in seg) {
      at = at === '' ? seg.key : `${at}.${seg.key}`;
      if (Array.isArray(node)) gridError(`${field}: ${at.slice(0, at.lastIndexOf('.'))} is an array; index it with [n].`);
      const obj = node as Record<string, unknown>;
      if (last) {
        obj[seg.key] = value;
        return;
      }
      if (seg.key === 'strategy' && typeof obj[seg.key] === 'string') obj[seg.key] = { name: obj[seg.key] };
      if (obj[seg.key] === undefined) obj[seg.key] = segments[i + 1] !== undefined && 'index' in segments[i + 1]! ? [] : {};
      const next = obj[seg.key];
      if (typeof next !== 'object' || next === null) gridError(`${field}: ${at} is ${JSON.stringify(next)}, not an object or array.`);
      node = next as Record<string, unknown> | unknown[];
    } else {
      if (!Array.isArray(node)) gridError(`${field}: ${at} is not an array.`);
      if (seg.index >= node.length) gridError(`${field}: the job has ${node.length} entr${node.length === 1 ? 'y' : 'ies'} in ${at}; a grid changes existing entries (add the entry to the job line).`);
      at = `${at}[${seg.index}]`;
      if (last) {
        node[seg.index] = value;
        return;
      }
      const next = node[seg.index];
      if (typeof next !== 'object' || next === null) gridError(`${field}: ${at} is ${JSON.stringify(next)}, not an object or array.`);
      node = next as Record<string, unknown> | unknown[];
    }
  });
  return root;
}

/** One job of an expanded grid: the spec with the cell's values set. */
export interface GridJob {
  readonly spec: unknown;
  readonly cell: GridCell;
  /** The cell's value labels (x, y, z; '' for an absent axis). */
  readonly labels: { readonly x: string; readonly y: string; readonly z: string };
  /** `grid x=2 y=1` (1-based), for messages. */
  readonly note: string;
}

/** One grid image to assemble: which jobs (by their index in the expansion) fill which cell. */
export interface GridImagePlan {
  /** File name inside the output folder (`grid-001.png`). */
  readonly file: string;
  /** One line each: the Z value (with a Z axis), the X field, the Y field. */
  readonly title: readonly string[];
  readonly columns: readonly string[];
  readonly rows: readonly string[];
  /** Row-major job indexes into the expanded list (0-based). */
  readonly cells: readonly number[];
}

/**
 * Expand one base spec per job line into the grid's jobs (Z, then Y, then X; X fastest) and the grid
 * images. Errors in a path name the axis field; invalid values are the schema's to reject.
 */
export function expandGrid(bases: readonly unknown[], grid: GridSpec): { jobs: GridJob[]; images: GridImagePlan[] } {
  const [x, y, z] = grid.axes;
  const xs = x?.values.length ?? 1;
  const ys = y?.values.length ?? 1;
  const zs = z?.values.length ?? 1;
  const jobs: GridJob[] = [];
  const images: GridImagePlan[] = [];
  const axisTitle = grid.axes.slice(0, 2).map((a, i) => `${AXIS_NAMES[i]!.toUpperCase()}: ${a.field}`);
  bases.forEach((base) => {
    for (let zi = 0; zi < zs; zi++) {
      const cells: number[] = [];
      for (let yi = 0; yi < ys; yi++) {
        for (let xi = 0; xi < xs; xi++) {
          let spec = base;
          const picks: Array<[GridAxis | undefined, number]> = [[x, xi], [y, yi], [z, zi]];
          for (const [axis, i] of picks) if (axis !== undefined) spec = setSpecField(spec, axis.field, axis.values[i]);
          const note = picks
            .map(([axis, i], a) => (axis === undefined ? '' : `${AXIS_NAMES[a]}=${i + 1}`))
            .filter((s) => s !== '')
            .join(' ');
          cells.push(jobs.length);
          jobs.push({ spec, cell: { x: xi, y: yi, z: zi }, labels: { x: x?.labels[xi] ?? '', y: y?.labels[yi] ?? '', z: z?.labels[zi] ?? '' }, note: `grid ${note}` });
        }
      }
      images.push({
        file: `grid-${String(images.length + 1).padStart(3, '0')}.png`,
        title: z === undefined ? axisTitle : [`${z.field}: ${z.labels[zi]}`, ...axisTitle],
        columns: x?.labels ?? [''],
        rows: y === undefined ? [] : y.labels,
        cells,
      });
    }
  });
  return { jobs, images };
}

// ---------------------------------------------------------------------------------------------
// The grid image.

/** Average glyph advance of a sans-serif font, as a fraction of the font size (for label widths). */
const GLYPH_WIDTH_EM = 0.6;
/** Column-header bar height as a multiple of the font size (one line with some air). */
const LINE_HEIGHT_EM = 1.8;
/** Title line spacing as a multiple of the font size. */
const TITLE_LINE_EM = 1.3;
const MIN_FONT_PX = 12;
const MAX_FONT_PX = 40;
/** Font size relative to the cell's shorter side: readable at 64 px cells and at 512 px. */
const FONT_PER_CELL = 1 / 12;

export interface GridLayout {
  readonly width: number;
  readonly height: number;
  readonly fontSize: number;
  /** Height of the title lines and of the column-header bar. */
  readonly titleHeight: number;
  readonly headerHeight: number;
  /** Width of the row-header column (0 without a Y axis). */
  readonly left: number;
  /** Top of the first row of cells. */
  readonly top: number;
  readonly cellWidth: number;
  readonly cellHeight: number;
}

/** Where everything goes: title lines, column headers, row headers (only with row labels), cells. */
export function gridLayout(columns: number, rowLabels: readonly string[], cellWidth: number, cellHeight: number, titleLines: number): GridLayout {
  const fontSize = Math.min(MAX_FONT_PX, Math.max(MIN_FONT_PX, Math.round(Math.min(cellWidth, cellHeight) * FONT_PER_CELL)));
  const headerHeight = Math.round(fontSize * LINE_HEIGHT_EM);
  const titleHeight = titleLines === 0 ? 0 : Math.round(fontSize * (TITLE_LINE_EM * titleLines + LINE_HEIGHT_EM - TITLE_LINE_EM));
  const longest = Math.max(0, ...rowLabels.map((l) => l.length));
  const left = rowLabels.length === 0 ? 0 : Math.min(Math.max(cellWidth, 10 * fontSize), Math.ceil(longest * fontSize * GLYPH_WIDTH_EM + fontSize));
  const rows = Math.max(1, rowLabels.length);
  const top = titleHeight + headerHeight;
  return { width: left + columns * cellWidth, height: top + rows * cellHeight, fontSize, titleHeight, headerHeight, left, top, cellWidth, cellHeight };
}

function escapeXml(text: string): string {
  return text.replace(/[<>&'"]/g, (c) => ({ '<': '&lt;', '>': '&gt;', '&': '&amp;', "'": '&apos;', '"': '&quot;' })[c]!);
}

function fitText(text: string, widthPx: number, fontSize: number): string {
  const max = Math.max(1, Math.floor(widthPx / (fontSize * GLYPH_WIDTH_EM)));
  return text.length <= max ? text : `${text.slice(0, Math.max(1, max - 1))}…`;
}

export interface GridImageInput {
  readonly title: readonly string[];
  readonly columns: readonly string[];
  /** Row labels; empty for a grid without a Y axis (one row, no row headers). */
  readonly rows: readonly string[];
  /** Row-major PNG bytes per cell; `undefined` draws an empty cell (a failed or cancelled job). */
  readonly cells: readonly (Uint8Array | undefined)[];
}

/**
 * Assemble the labelled grid as PNG bytes. Cells are placed at their full size on a white canvas
 * (the largest cell sets the cell size; smaller ones are centred).
 */
export async function composeGridImage(input: GridImageInput): Promise<{ png: Uint8Array; layout: GridLayout }> {
  const rows = Math.max(1, input.rows.length);
  if (input.cells.length !== rows * input.columns.length) {
    throw new Error(`composeGridImage: ${input.cells.length} cells for ${input.columns.length} × ${rows}`);
  }
  const sizes = await Promise.all(input.cells.map(async (c) => (c === undefined ? undefined : await sharp(c).metadata())));
  const cellWidth = Math.max(1, ...sizes.map((s) => s?.width ?? 0));
  const cellHeight = Math.max(1, ...sizes.map((s) => s?.height ?? 0));
  const layout = gridLayout(input.columns.length, input.rows, cellWidth, cellHeight, input.title.length);
  const { fontSize: fs, left, top } = layout;
  const font = `font-family="DejaVu Sans, Liberation Sans, Arial, Helvetica, sans-serif" font-size="${fs}" fill="#000"`;
  const baseline = (barTop: number, barHeight: number) => Math.round(barTop + barHeight / 2 + fs * 0.35);
  const firstTitleBaseline = baseline(0, Math.round(fs * LINE_HEIGHT_EM));
  const texts = input.title.map((line, i) => `<text x="${Math.round(fs / 2)}" y="${Math.round(firstTitleBaseline + i * fs * TITLE_LINE_EM)}" ${font}>${escapeXml(fitText(line, layout.width - fs, fs))}</text>`);
  input.columns.forEach((label, c) => {
    const x = left + c * cellWidth + cellWidth / 2;
    texts.push(`<text x="${x}" y="${baseline(layout.titleHeight, layout.headerHeight)}" text-anchor="middle" ${font}>${escapeXml(fitText(label, cellWidth - fs / 2, fs))}</text>`);
  });
  input.rows.forEach((label, r) => {
    texts.push(`<text x="${left - Math.round(fs / 2)}" y="${baseline(top + r * cellHeight, cellHeight)}" text-anchor="end" ${font}>${escapeXml(fitText(label, left - fs, fs))}</text>`);
  });
  input.cells.forEach((c, i) => {
    if (c !== undefined) return;
    const x = left + (i % input.columns.length) * cellWidth;
    const y = top + Math.floor(i / input.columns.length) * cellHeight;
    texts.push(`<rect x="${x}" y="${y}" width="${cellWidth}" height="${cellHeight}" fill="#ddd"/>`);
  });
  const svg = `<svg xmlns="http://www.w3.org/2000/svg" width="${layout.width}" height="${layout.height}">${texts.join('')}</svg>`;
  const composites: OverlayOptions[] = [{ input: Buffer.from(svg), left: 0, top: 0 }];
  input.cells.forEach((c, i) => {
    if (c === undefined) return;
    const size = sizes[i]!;
    composites.push({
      input: Buffer.from(c.buffer, c.byteOffset, c.byteLength),
      left: left + (i % input.columns.length) * cellWidth + Math.floor((cellWidth - size.width!) / 2),
      top: top + Math.floor(i / input.columns.length) * cellHeight + Math.floor((cellHeight - size.height!) / 2),
    });
  });
  // Compositing the SVG adds an alpha channel; a second pass drops it (sharp composites last in a pipeline).
  const canvas = await sharp({ create: { width: layout.width, height: layout.height, channels: 3, background: '#ffffff' } })
    .composite(composites)
    .raw()
    .toBuffer({ resolveWithObject: true });
  const png = await sharp(canvas.data, { raw: { width: canvas.info.width, height: canvas.info.height, channels: canvas.info.channels } })
    .removeAlpha()
    .png({ compressionLevel: 6 })
    .toBuffer();
  return { png: new Uint8Array(png.buffer, png.byteOffset, png.byteLength), layout };
}
