/**
 * `chorus inspect <model | image>`:
 * - a model folder or checkpoint: format, detected architecture, where each config came from, the
 *   configs themselves — without running anything;
 * - an image (PNG, JPEG, WebP): the generation metadata it carries, from Chorus, A1111 (and tools
 *   writing its infotext), ComfyUI, Fooocus, NovelAI, InvokeAI, SwarmUI.
 */
import { SafetensorsFile, detectCheckpoint, openModel } from '../../models/index.ts';
import { parseInfotext, readImageMetadata, summarizeComfyGraph } from '../../pipelines/index.ts';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { MODEL_OPTIONS, UsageError, engineOptions, parse } from '../args.ts';

const IMAGE_EXTENSIONS = new Set(['.png', '.jpg', '.jpeg', '.webp']);

function inspectImage(file: string): Record<string, unknown> {
  const meta = readImageMetadata(new Uint8Array(fs.readFileSync(file)), path.basename(file));
  const sources = meta.sources.map((s) => {
    switch (s.kind) {
      case 'a1111': {
        const p = parseInfotext(s.text);
        return { kind: s.kind, prompt: p.prompt, negativePrompt: p.negativePrompt, parameters: Object.fromEntries(p.pairs) };
      }
      case 'comfyui':
        return { kind: s.kind, summary: summarizeComfyGraph(s.prompt) };
      default:
        return s;
    }
  });
  return { path: file, format: meta.format, sources, texts: Object.keys(meta.texts), warnings: meta.warnings };
}

export async function runInspect(argv: readonly string[]): Promise<number> {
  const { values, positionals } = parse(argv, { ...MODEL_OPTIONS, json: { type: 'boolean' } });
  const target = positionals[0] ?? values.model;
  if (target === undefined) throw new UsageError('chorus inspect: which model? (chorus inspect <folder-or-file>)');
  if (IMAGE_EXTENSIONS.has(path.extname(target).toLowerCase())) {
    process.stdout.write(JSON.stringify(inspectImage(target), null, values.json === true ? undefined : 2) + '\n');
    return 0;
  }
  const opts = engineOptions(values);
  const report: Record<string, unknown> = { path: target };
  if (fs.existsSync(target) && fs.statSync(target).isFile() && target.endsWith('.safetensors')) {
    const f = SafetensorsFile.open(target);
    try {
      report.detected = detectCheckpoint(f);
      report.tensors = f.tensors.size;
    } finally {
      f.close();
    }
  }
  const model = openModel(target, opts);
  try {
    report.format = model.format;
    report.configSources = model.configSources;
    report.unet = model.unet;
    report.textEncoder = model.textEncoder;
    report.vae = model.vae;
    report.scheduler = model.schedulerConfig;
  } finally {
    model.close();
  }
  process.stdout.write(JSON.stringify(report, null, values.json === true ? undefined : 2) + '\n');
  return 0;
}
