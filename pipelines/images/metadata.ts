/**
 * Generation metadata of an image file: which tool made it and the settings it recorded.
 *
 * `readImageMetadata` finds the format by its magic bytes (PNG, JPEG, WebP), collects every text
 * field (PNG text chunks; EXIF ASCII tags and UserComment from JPEG APP1, WebP `EXIF`, PNG `eXIf`),
 * then recognises the generation metadata among them (CONVENTIONS.md 2.1 and
 * shared/realworld/README.md):
 *
 * | kind            | where                                                                                      |
 * |-----------------|--------------------------------------------------------------------------------------------|
 * | a1111           | PNG `parameters` (not JSON); EXIF UserComment holding an infotext (a `Steps: n` field)     |
 * | comfyui         | PNG `prompt` / `workflow` JSON; EXIF IFD0 text `prompt:{…}` / `workflow:{…}` (any case)     |
 * | chorus          | PNG `chorus` JSON (our own job record)                                                     |
 * | fooocus         | PNG `parameters` JSON with `fooocus_scheme: fooocus` or a `version: "Fooocus …"` field     |
 * | novelai         | `Software` "NovelAI…" with `Comment` JSON (PNG), or UserComment JSON wrapping `Comment`    |
 * | invokeai        | PNG `invokeai_metadata` / `sd-metadata` JSON, `invokeai_graph` JSON, `Dream` command        |
 * | swarmui         | `sui_image_params` in the JSON of PNG `parameters` or EXIF UserComment                     |
 * | stabilitymatrix | PNG `parameters-json` / `smproj` JSON (it also writes `parameters` and a ComfyUI `prompt`) |
 *
 * One image can carry several (Stability Matrix writes three). An image without any gets `sources: []`.
 *
 * Damaged input: a broken container or a malformed metadata block throws (see png-chunks.ts and
 * exif.ts: `BAD_IMAGE` / `BAD_METADATA`). Two cases are reported in `warnings` instead, because the
 * rest of the file stays fully readable and the text itself is still shown in `texts`:
 * - `CRC_MISMATCH`: an ancillary PNG chunk whose CRC is wrong (its data is still read).
 * - `BAD_JSON`: a field that must hold JSON does not parse; its source is left out.
 *
 * JSON numbers become JS numbers: a seed above 2^53 (ComfyUI allows up to 2^64-1) loses precision
 * in the parsed sources; the exact text stays in `texts`.
 */
import * as path from 'node:path';
import { PipelineError } from '../errors.ts';
import { findJpegExif, findWebpExif, isJpeg, isWebp, parseExif, tiffOfExifChunk, type ExifTextEncoding } from './exif.ts';
import { decodePngTextChunk, isPng, isPngTextChunk, parsePngChunks } from './png-chunks.ts';

export type ImageFormat = 'png' | 'jpeg' | 'webp';

export interface TextField {
  readonly key: string;
  readonly text: string;
  /** e.g. `tEXt chunk`, `zTXt chunk (after IDAT)`, `JPEG APP1 EXIF ExifIFD 0x9286`, `WebP EXIF IFD0 0x10e`. */
  readonly where: string;
  readonly encoding: ExifTextEncoding;
}

export type GenerationSource =
  | { readonly kind: 'a1111'; readonly text: string; readonly key: 'parameters' | 'UserComment' }
  | { readonly kind: 'comfyui'; readonly prompt?: unknown; readonly workflow?: unknown }
  | { readonly kind: 'chorus'; readonly job: unknown }
  | { readonly kind: 'fooocus'; readonly data: unknown }
  | { readonly kind: 'novelai'; readonly data: unknown; readonly software: string }
  | { readonly kind: 'invokeai'; readonly metadata?: unknown; readonly graph?: unknown; readonly dream?: string }
  /** `data` is the `sui_image_params` object, `document` the whole JSON (`sui_extra_data`, `sui_models`). */
  | { readonly kind: 'swarmui'; readonly data: unknown; readonly document: unknown }
  /** `data`: `parameters-json`; `project`: `smproj`. */
  | { readonly kind: 'stabilitymatrix'; readonly data?: unknown; readonly project?: unknown };

export type SourceKind = GenerationSource['kind'];

export interface MetadataWarning {
  readonly code: 'CRC_MISMATCH' | 'BAD_JSON';
  readonly message: string;
  readonly details: Readonly<Record<string, unknown>>;
}

export interface ImageMetadata {
  readonly format: ImageFormat;
  /** Every text field by key; when a key occurs twice the later one wins, as in Pillow's `info`. */
  readonly texts: Record<string, string>;
  /** The same fields in file order, with where each was found and how it was decoded. */
  readonly fields: TextField[];
  readonly sources: GenerationSource[];
  readonly warnings: MetadataWarning[];
}

/** Prefix of an EXIF text tag holding a ComfyUI graph (ComfyUI's WebP writer; save-image-extended capitalises it). */
const COMFY_EXIF_PREFIX = /^(prompt|workflow):\s*/i;
/** Every A1111-style infotext has a `Steps: n` parameter; a camera's UserComment does not. */
const INFOTEXT_STEPS = /(^|[\s,])Steps: \d+/;

export function detectImageFormat(bytes: Uint8Array): ImageFormat | undefined {
  if (isPng(bytes)) return 'png';
  if (isJpeg(bytes)) return 'jpeg';
  if (isWebp(bytes)) return 'webp';
  return undefined;
}

/**
 * Read all text metadata of a PNG, JPEG or WebP image and recognise the generation metadata in it.
 * `fileName` only names the file in errors and warnings.
 * Throws `BAD_IMAGE` for bytes that are not a PNG/JPEG/WebP or a broken container, `BAD_METADATA`
 * for a malformed text chunk or EXIF block (see the module comment for what is a warning instead).
 */
export function readImageMetadata(bytes: Uint8Array, fileName = 'image'): ImageMetadata {
  const format = detectImageFormat(bytes);
  const fields: TextField[] = [];
  const warnings: MetadataWarning[] = [];
  const name = path.basename(fileName);
  const addExif = (tiff: Uint8Array, label: string, blockName: string): void => {
    for (const t of parseExif(tiff, fileName, blockName).tags) {
      fields.push({ key: t.name, text: t.text, where: `${label} ${t.ifd} 0x${t.tag.toString(16)}`, encoding: t.encoding });
    }
  };
  switch (format) {
    case 'png':
      for (const chunk of parsePngChunks(bytes, fileName)) {
        if (!chunk.crcOk) {
          warnings.push({
            code: 'CRC_MISMATCH',
            message: `${name}: the ${chunk.type} chunk at offset ${chunk.offset} has a wrong CRC; it was read anyway, but its data may be damaged.`,
            details: { file: fileName, offset: chunk.offset, chunk: chunk.type },
          });
        }
        if (isPngTextChunk(chunk)) {
          const t = decodePngTextChunk(chunk, fileName);
          fields.push({ key: t.keyword, text: t.text, where: `${t.chunkType} chunk${t.afterIdat ? ' (after IDAT)' : ''}`, encoding: t.encoding });
        } else if (chunk.type === 'eXIf') {
          addExif(tiffOfExifChunk(chunk.data), 'PNG eXIf', 'PNG eXIf chunk');
        }
      }
      break;
    case 'jpeg': {
      const tiff = findJpegExif(bytes, fileName);
      if (tiff !== undefined) addExif(tiff, 'JPEG APP1 EXIF', 'JPEG APP1 segment');
      break;
    }
    case 'webp': {
      const tiff = findWebpExif(bytes, fileName);
      if (tiff !== undefined) addExif(tiff, 'WebP EXIF', 'WebP EXIF chunk');
      break;
    }
    case undefined: {
      const head = Array.from(bytes.subarray(0, 8), (b) => b.toString(16).padStart(2, '0')).join(' ');
      throw new PipelineError(
        'BAD_IMAGE',
        `${name}: not a PNG, JPEG or WebP image (${head === '' ? 'the file is empty' : `its first bytes are ${head}`}). Chorus reads generation metadata from those three formats.`,
        { file: fileName },
      );
    }
  }
  const texts: Record<string, string> = {};
  for (const f of fields) texts[f.key] = f.text;
  return { format, texts, fields, sources: recogniseSources(texts, fields, new JsonReader(fileName, warnings)), warnings };
}

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

/** JSON of text fields; a failure becomes a `BAD_JSON` warning and `undefined`. */
class JsonReader {
  constructor(
    readonly fileName: string,
    readonly warnings: MetadataWarning[],
  ) {}

  static looksLikeJson(text: string): boolean {
    return /^\s*[{[]/.test(text);
  }

  /** Trailing NULs (some writers end JSON with one) and surrounding whitespace are ignored. */
  parse(key: string, text: string, expected: string): unknown {
    try {
      return JSON.parse(text.replace(/\0+$/, ''));
    } catch (e) {
      if (!(e instanceof SyntaxError)) throw e;
      this.warnings.push({
        code: 'BAD_JSON',
        message: `${path.basename(this.fileName)}: the "${key}" field should hold ${expected} but is not valid JSON (${e.message}); it was left out of the recognised metadata.`,
        details: { file: this.fileName, key },
      });
      return undefined;
    }
  }

  /** Parse only when the text looks like JSON; plain text is not an error for keys other tools use as text. */
  parseIfJson(key: string, text: string | undefined, expected: string): unknown {
    return text !== undefined && JsonReader.looksLikeJson(text) ? this.parse(key, text, expected) : undefined;
  }
}

function isFooocus(data: Record<string, unknown>, scheme: string | undefined): boolean {
  return scheme === 'fooocus' || (typeof data.version === 'string' && data.version.startsWith('Fooocus'));
}

function recogniseSources(texts: Record<string, string>, fields: readonly TextField[], json: JsonReader): GenerationSource[] {
  const sources: GenerationSource[] = [];
  const a1111Texts = new Set<string>();
  const addA1111 = (text: string, key: 'parameters' | 'UserComment'): void => {
    if (a1111Texts.has(text)) return;
    a1111Texts.add(text);
    sources.push({ kind: 'a1111', text, key });
  };

  // Our own record first: it is the most complete description of a Chorus image.
  if (texts.chorus !== undefined) {
    const job = json.parse('chorus', texts.chorus, 'a Chorus job (JSON)');
    if (job !== undefined) sources.push({ kind: 'chorus', job });
  }

  const parameters = texts.parameters;
  if (parameters !== undefined) {
    if (JsonReader.looksLikeJson(parameters)) {
      const data = json.parse('parameters', parameters, 'generation parameters');
      if (isObject(data) && isObject(data.sui_image_params)) sources.push({ kind: 'swarmui', data: data.sui_image_params, document: data });
      else if (isObject(data) && isFooocus(data, texts.fooocus_scheme)) sources.push({ kind: 'fooocus', data });
    } else {
      addA1111(parameters, 'parameters');
    }
  }

  const userComment = texts.UserComment;
  if (userComment !== undefined) {
    if (JsonReader.looksLikeJson(userComment)) {
      const data = json.parse('UserComment', userComment, 'generation parameters');
      const software = typeof texts.Software === 'string' ? texts.Software : isObject(data) && typeof data.Software === 'string' ? data.Software : '';
      if (isObject(data) && isObject(data.sui_image_params)) {
        sources.push({ kind: 'swarmui', data: data.sui_image_params, document: data });
      } else if (isObject(data) && typeof data.Comment === 'string' && software.startsWith('NovelAI')) {
        const comment = json.parse('UserComment.Comment', data.Comment, 'NovelAI generation settings');
        if (comment !== undefined) sources.push({ kind: 'novelai', data: comment, software });
      }
    } else if (INFOTEXT_STEPS.test(userComment)) {
      addA1111(userComment, 'UserComment');
    }
  }

  // ComfyUI: PNG chunks, or EXIF text tags with a `prompt:` / `workflow:` prefix.
  let prompt = json.parseIfJson('prompt', texts.prompt, 'a ComfyUI graph');
  let workflow = json.parseIfJson('workflow', texts.workflow, 'a ComfyUI workflow');
  for (const f of fields) {
    const m = f.where.includes('EXIF') ? COMFY_EXIF_PREFIX.exec(f.text) : null;
    if (m === null) continue;
    const body = f.text.slice(m[0].length);
    if (m[1]!.toLowerCase() === 'prompt') prompt ??= json.parse(f.key, body, 'a ComfyUI graph');
    else workflow ??= json.parse(f.key, body, 'a ComfyUI workflow');
  }
  if (!isObject(prompt)) prompt = undefined;
  if (!isObject(workflow)) workflow = undefined;
  if (prompt !== undefined || workflow !== undefined) {
    sources.push({ kind: 'comfyui', ...(prompt !== undefined && { prompt }), ...(workflow !== undefined && { workflow }) });
  }

  if (texts.Software?.startsWith('NovelAI') && texts.Comment !== undefined) {
    const data = json.parse('Comment', texts.Comment, 'NovelAI generation settings');
    if (data !== undefined) sources.push({ kind: 'novelai', data, software: texts.Software });
  }

  const invokeMetadataKey = texts.invokeai_metadata !== undefined ? 'invokeai_metadata' : texts['sd-metadata'] !== undefined ? 'sd-metadata' : undefined;
  const invokeMetadata = invokeMetadataKey === undefined ? undefined : json.parse(invokeMetadataKey, texts[invokeMetadataKey]!, 'InvokeAI metadata');
  const invokeGraph = texts.invokeai_graph === undefined ? undefined : json.parse('invokeai_graph', texts.invokeai_graph, 'an InvokeAI graph');
  if (invokeMetadata !== undefined || invokeGraph !== undefined || texts.Dream !== undefined) {
    sources.push({
      kind: 'invokeai',
      ...(invokeMetadata !== undefined && { metadata: invokeMetadata }),
      ...(invokeGraph !== undefined && { graph: invokeGraph }),
      ...(texts.Dream !== undefined && { dream: texts.Dream }),
    });
  }

  const smData = texts['parameters-json'] === undefined ? undefined : json.parse('parameters-json', texts['parameters-json'], 'Stability Matrix parameters');
  const smProject = texts.smproj === undefined ? undefined : json.parse('smproj', texts.smproj, 'a Stability Matrix project');
  if (smData !== undefined || smProject !== undefined) {
    sources.push({ kind: 'stabilitymatrix', ...(smData !== undefined && { data: smData }), ...(smProject !== undefined && { project: smProject }) });
  }
  return sources;
}

// ---------------------------------------------------------------------------------------------
// ComfyUI API graphs ("prompt"): { [nodeId]: { class_type, inputs: { name: value | [nodeId, outputIndex] } } }

export interface ComfyLora {
  readonly node: string;
  readonly class_type: string;
  readonly lora_name: string;
  readonly strength_model?: number;
  readonly strength_clip?: number;
}

export interface ComfySampler {
  readonly node: string;
  readonly class_type: string;
  readonly sampler_name?: string;
  readonly scheduler?: string;
  readonly steps?: number;
  readonly cfg?: number;
  /** `seed`, or `noise_seed` for the custom / advanced samplers. */
  readonly seed?: number;
  readonly denoise?: number;
  /** Texts of the encoders feeding its `positive` / `negative` inputs, through conditioning nodes. */
  readonly positive: string[];
  readonly negative: string[];
}

export interface ComfyGraphSummary {
  readonly nodeCount: number;
  /** Sorted, each once. */
  readonly classTypes: string[];
  /** `ckpt_name` of every node that has one, in graph order. */
  readonly checkpoints: string[];
  readonly loras: ComfyLora[];
  readonly samplers: ComfySampler[];
  /** Union over the samplers, first-seen order, each text once. */
  readonly positive: string[];
  readonly negative: string[];
  /** From the first `Empty…Latent…` node with numeric width/height. */
  readonly width?: number;
  readonly height?: number;
  /** Nodes that restrict conditioning to a region: `ConditioningSetArea*`, `ConditioningSetMask*`. */
  readonly regionNodes: Array<{ readonly node: string; readonly class_type: string }>;
}

interface ComfyNode {
  readonly class_type: string;
  readonly inputs: Record<string, unknown>;
}

type Link = readonly [string, number];

const SAMPLER_CLASS = /^(KSampler|KSamplerAdvanced|SamplerCustom|SamplerCustomAdvanced)$/;
const REGION_CLASS = /^ConditioningSet(Area|Mask)/;
/** Text-encoder inputs that hold prompt text (CLIPTextEncode: text; SDXL encoders: text_g / text_l). */
const TEXT_INPUTS = ['text', 'text_g', 'text_l'] as const;

/** ComfyUI writes links as `[nodeId, outputIndex]`, the id as a string (sometimes a number in old graphs). */
function asLink(v: unknown): Link | undefined {
  if (Array.isArray(v) && v.length === 2 && (typeof v[0] === 'string' || typeof v[0] === 'number') && typeof v[1] === 'number') return [String(v[0]), v[1]];
  return undefined;
}

function toGraph(prompt: unknown): Map<string, ComfyNode> {
  if (!isObject(prompt)) {
    throw new PipelineError('BAD_METADATA', `a ComfyUI graph must be a JSON object of nodes, found ${Array.isArray(prompt) ? 'an array' : typeof prompt}.`, {});
  }
  const graph = new Map<string, ComfyNode>();
  for (const [id, node] of Object.entries(prompt)) {
    if (!isObject(node) || typeof node.class_type !== 'string' || !isObject(node.inputs)) {
      throw new PipelineError('BAD_METADATA', `ComfyUI graph node "${id}" has no class_type string and inputs object; this is not an API-format graph.`, { node: id });
    }
    graph.set(id, { class_type: node.class_type, inputs: node.inputs });
  }
  return graph;
}

/** A literal input, or the input of that name on the node a link points at (KSamplerSelect, BasicScheduler, primitives). */
function resolveScalar(graph: Map<string, ComfyNode>, value: unknown, names: readonly string[]): unknown {
  const link = asLink(value);
  if (link === undefined) return value;
  const node = graph.get(link[0]);
  if (node === undefined) return undefined;
  for (const n of [...names, 'value']) {
    const v = node.inputs[n];
    if (v !== undefined && asLink(v) === undefined) return v;
  }
  return undefined;
}

function num(v: unknown): number | undefined {
  return typeof v === 'number' && Number.isFinite(v) ? v : undefined;
}
function str(v: unknown): string | undefined {
  return typeof v === 'string' ? v : undefined;
}

/** Encoder texts upstream of a conditioning link: through combine / area / controlnet nodes, stopping at encoders. */
function conditioningTexts(graph: Map<string, ComfyNode>, link: Link | undefined, seen = new Set<string>()): string[] {
  if (link === undefined || seen.has(`${link[0]}:${link[1]}`)) return [];
  seen.add(`${link[0]}:${link[1]}`);
  const node = graph.get(link[0]);
  if (node === undefined) return [];
  const texts = TEXT_INPUTS.map((k) => (k in node.inputs ? str(resolveScalar(graph, node.inputs[k], [k, 'string', 'prompt'])) : undefined)).filter(
    (t): t is string => t !== undefined,
  );
  if (texts.length > 0) return texts;
  // Nodes with both a positive and a negative input (ControlNetApplyAdvanced, …) pass them to outputs 0 and 1.
  const pos = asLink(node.inputs.positive);
  const neg = asLink(node.inputs.negative);
  if (pos !== undefined && neg !== undefined) return conditioningTexts(graph, link[1] === 1 ? neg : pos, seen);
  return Object.entries(node.inputs)
    .filter(([k]) => k.includes('conditioning'))
    .flatMap(([, v]) => conditioningTexts(graph, asLink(v), seen));
}

function pushUnique(into: string[], items: readonly string[]): void {
  for (const t of items) if (!into.includes(t)) into.push(t);
}

/**
 * Checkpoints, LoRAs, samplers with their prompt texts, latent size and region nodes of a ComfyUI
 * API graph (the PNG `prompt` chunk). Links are followed as `[nodeId, outputIndex]`.
 * Throws `BAD_METADATA` when `prompt` is not an object of `{ class_type, inputs }` nodes.
 */
export function summarizeComfyGraph(prompt: unknown): ComfyGraphSummary {
  const graph = toGraph(prompt);
  const checkpoints: string[] = [];
  const loras: ComfyLora[] = [];
  const samplers: ComfySampler[] = [];
  const regionNodes: Array<{ node: string; class_type: string }> = [];
  const positive: string[] = [];
  const negative: string[] = [];
  let size: { width: number; height: number } | undefined;

  for (const [id, node] of graph) {
    const { inputs, class_type } = node;
    const ckpt = str(inputs.ckpt_name);
    if (ckpt !== undefined) checkpoints.push(ckpt);
    const loraName = str(inputs.lora_name);
    if (loraName !== undefined) {
      const strengthModel = num(inputs.strength_model);
      const strengthClip = num(inputs.strength_clip);
      loras.push({
        node: id,
        class_type,
        lora_name: loraName,
        ...(strengthModel !== undefined && { strength_model: strengthModel }),
        ...(strengthClip !== undefined && { strength_clip: strengthClip }),
      });
    }
    if (REGION_CLASS.test(class_type)) regionNodes.push({ node: id, class_type });
    if (size === undefined && /^Empty.*Latent/.test(class_type)) {
      const width = num(resolveScalar(graph, inputs.width, ['width']));
      const height = num(resolveScalar(graph, inputs.height, ['height']));
      if (width !== undefined && height !== undefined) size = { width, height };
    }
    if (SAMPLER_CLASS.test(class_type)) {
      const sampler = { node: id, class_type, positive: conditioningTexts(graph, asLink(inputs.positive)), negative: conditioningTexts(graph, asLink(inputs.negative)) };
      const samplerName = str(resolveScalar(graph, inputs.sampler_name ?? inputs.sampler, ['sampler_name']));
      const scheduler = str(resolveScalar(graph, inputs.scheduler ?? inputs.sigmas, ['scheduler']));
      const steps = num(resolveScalar(graph, inputs.steps ?? inputs.sigmas, ['steps']));
      const cfg = num(resolveScalar(graph, inputs.cfg, ['cfg']));
      const seed = num(resolveScalar(graph, inputs.seed ?? inputs.noise_seed ?? inputs.noise, ['seed', 'noise_seed']));
      const denoise = num(resolveScalar(graph, inputs.denoise, ['denoise']));
      samplers.push({
        ...sampler,
        ...(samplerName !== undefined && { sampler_name: samplerName }),
        ...(scheduler !== undefined && { scheduler }),
        ...(steps !== undefined && { steps }),
        ...(cfg !== undefined && { cfg }),
        ...(seed !== undefined && { seed }),
        ...(denoise !== undefined && { denoise }),
      });
      pushUnique(positive, sampler.positive);
      pushUnique(negative, sampler.negative);
    }
  }
  return {
    nodeCount: graph.size,
    classTypes: [...new Set([...graph.values()].map((n) => n.class_type))].sort(),
    checkpoints,
    loras,
    samplers,
    positive,
    negative,
    ...size,
    regionNodes,
  };
}
