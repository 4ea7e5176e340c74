/**
 * `chorus inspect <model>`: what a model folder or checkpoint holds — format, detected
 * architecture, where each config came from, the configs themselves — without running anything.
 */
import { SafetensorsFile, detectCheckpoint, openModel } from '../../models/index.ts';
import * as fs from 'node:fs';
import { MODEL_OPTIONS, UsageError, engineOptions, parse } from '../args.ts';

export async function runInspect(argv: readonly string[]): Promise<number> {
  const { values, positionals } = parse(argv, { ...MODEL_OPTIONS, json: { type: 'boolean' } });
  const target = positionals[0] ?? values.model;
  if (target === undefined) throw new UsageError('chorus inspect: which model? (chorus inspect <folder-or-file>)');
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
