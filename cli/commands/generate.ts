/**
 * `chorus generate`: text to image from the command line, with A1111 prompt syntax, a progress bar,
 * PNGs carrying A1111's `parameters` text and a `chorus` JSON chunk, and `--save-latents` /
 * `--init-latents` for comparing with other implementations.
 */
import { Sd15Engine, loraFoldersOf, openSafetensors, writeSafetensors, type Tensor } from '../../models/index.ts';
import {
  JOB_DEFAULTS,
  PipelineError,
  encodePng,
  engineModels,
  generate,
  imageMetadataTexts,
  installLoraFolders,
  outputNamer,
  normalizeJob,
  writeFileAtomic,
  STRATEGY_NAMES,
  type GenerateJob,
  type JobLora,
  type JobRegion,
  type StrategySpec,
  type LoraMode,
  type GenerateProgress,
} from '../../pipelines/index.ts';
import { MODEL_OPTIONS, UsageError, engineOptions, parse, requireValue } from '../args.ts';

export const GENERATE_HELP = `chorus generate — text to image

  chorus generate --model <dir-or-file> --prompt "<text>" [options]

  --prompt <text>          A1111 syntax: (word:1.2), (word), [word], [from:to:when], [a|b], BREAK, AND, <lora:name:w>
  --negative <text>        negative prompt (default empty)
  --steps <n>              sampling steps (default ${JOB_DEFAULTS.steps})
  --cfg <x>                CFG scale (default ${JOB_DEFAULTS.cfgScale})
  --sampler <name>         A1111 sampler: "DPM++ 2M" (default), "Euler a", "Euler", "LMS", "Heun", "DDIM", "PLMS", "UniPC";
                           the old combined names ("DPM++ 2M Karras") work too
  --schedule <type>        Automatic (default), Karras, Uniform
  --seed <n>               seed of the first image; image k uses seed + k (default -1: random)
  --rng cpu|nv             noise source: cpu = torch CPU generator (diffusers, ComfyUI; default), nv = A1111's GPU seeds
  --width <px>             multiple of 8 (default ${JOB_DEFAULTS.width})
  --height <px>            multiple of 8 (default ${JOB_DEFAULTS.height})
  --clip-skip <n>          A1111 clip skip (default 1)
  --batch-size <n>         images per batch (default 1)
  --batch-count <n>        batches (default 1)
  --lora <name[:w[:unet_w]]>  apply a LoRA by file stem, alias or path (repeatable; prompt tags <lora:name:w> work too)
  --lora-dir <folder>      where LoRAs are looked up by name (repeatable; an A1111 or ComfyUI install works;
                           also CHORUS_LORA_DIRS, and the install the checkpoint sits in)
  --strategy <name>        how several LoRAs are composed: plain (default), merge, switch, composite, cmlora, regions
  --switch-every <n>       switch: steps per LoRA (default 5)
  --cache-interval <c>     cmlora: 0 non-uniform refresh, 1 every step, ≥ 2 every c steps with feature caching (default 3)
  --frequency high,low,…   cmlora: frequency class per LoRA (measured from a probe image when omitted)
  --phase-rule <rule>      cmlora: offline (default), online, online-official
  --cmlora-official        cmlora: reproduce the official code's quirks (phase-2 refresh no-op)
  --region "x,y,w,h:prompt[:lora:weight[:unet_weight]]"
                           regions: a box in pixels with its prompt and LoRA (repeatable; implies --strategy regions)
  --region-mask "mask.png:prompt[:lora:weight]"   regions: a painted mask (white/opaque = inside)
  --lora-mode auto|bank|merged   LoRAs as runtime inputs (bank) or baked into the weights (merged); auto: bank
                           unless a LoRA is not low-rank (LoKr)
  --out <path>             a folder (default ./outputs; files NNNNN-<seed>.png) or a .png file name
  --save-latents <file>    write init_latents and final_latents (before decoding) to a safetensors file
  --init-latents <file>    start from init_latents in a safetensors file instead of the seeded noise
  --model, --device, --config, --tokenizer, --cache, --threads: see chorus --help
`;

function num(flag: string, value: string | undefined): number | undefined {
  if (value === undefined) return undefined;
  const n = Number(value);
  if (value.trim() === '' || !Number.isFinite(n)) throw new UsageError(`${flag} must be a number, got "${value}"`);
  return n;
}

function progressBar(total: number): (p: GenerateProgress) => void {
  const start = Date.now();
  const tty = process.stderr.isTTY === true;
  return (p) => {
    const done = p.evaluation + 1;
    const width = 30;
    const filled = Math.round((done / p.evaluations) * width);
    const elapsed = (Date.now() - start) / 1000;
    const line = `batch ${p.batch + 1}/${p.batches} [${'#'.repeat(filled)}${'-'.repeat(width - filled)}] step ${done}/${p.evaluations} ${elapsed.toFixed(1)}s (${total} image${total === 1 ? '' : 's'})`;
    if (tty) process.stderr.write(`\r${line}${done === p.evaluations ? '\n' : ''}`);
    else if (done === p.evaluations) process.stderr.write(`${line}\n`);
  };
}

/**
 * `--lora name_or_path[:weight[:unet_weight]]`: trailing numbers are strengths (A1111's te, unet),
 * so Windows paths with a drive colon still work.
 */
export function parseLoraFlag(value: string): JobLora {
  const parts = value.split(':');
  const numbers: number[] = [];
  while (parts.length > 1 && numbers.length < 2 && /^\s*-?(\d+\.?\d*|\.\d+)\s*$/.test(parts[parts.length - 1]!)) numbers.unshift(Number(parts.pop()));
  const name = parts.join(':');
  if (name === '') throw new UsageError(`--lora needs a name or path: "${value}"`);
  const te = numbers[0] ?? 1;
  return { name, te, unet: numbers[1] ?? te };
}

function strategyFromFlags(values: {
  strategy?: string | undefined;
  'switch-every'?: string | undefined;
  'cache-interval'?: string | undefined;
  frequency?: string | undefined;
  'phase-rule'?: string | undefined;
  'cmlora-official'?: boolean | undefined;
  region?: string[] | undefined;
  'region-mask'?: string[] | undefined;
}): StrategySpec {
  const hasRegions = (values.region?.length ?? 0) + (values['region-mask']?.length ?? 0) > 0;
  const name = values.strategy ?? (hasRegions ? 'regions' : 'plain');
  if (!(STRATEGY_NAMES as readonly string[]).includes(name)) throw new UsageError(`--strategy must be one of ${STRATEGY_NAMES.join(', ')}, got "${name}"`);
  const frequencyClasses = values.frequency?.split(',').map((f) => f.trim());
  if (frequencyClasses !== undefined && !frequencyClasses.every((f) => f === 'high' || f === 'low')) throw new UsageError(`--frequency takes high or low per LoRA, comma-separated, got "${values.frequency}"`);
  const phaseRule = values['phase-rule'];
  if (phaseRule !== undefined && !['offline', 'online', 'online-official'].includes(phaseRule)) throw new UsageError(`--phase-rule must be offline, online or online-official, got "${phaseRule}"`);
  return {
    name: name as StrategySpec['name'],
    ...(values['switch-every'] === undefined ? {} : { switchEvery: num('--switch-every', values['switch-every'])! }),
    ...(values['cache-interval'] === undefined ? {} : { cacheInterval: num('--cache-interval', values['cache-interval'])! }),
    ...(frequencyClasses === undefined ? {} : { frequencyClasses: frequencyClasses as Array<'high' | 'low'> }),
    ...(phaseRule === undefined ? {} : { phaseRule: phaseRule as 'offline' | 'online' | 'online-official' }),
    ...(values['cmlora-official'] === true ? { official: true } : {}),
  };
}

/** `prompt[:lora:weight[:unet_weight]]` after the area: trailing numbers are weights, the part before them the LoRA. */
function regionRest(rest: string, flag: string, value: string): Pick<JobRegion, 'prompt' | 'lora'> {
  const parts = rest.split(':');
  const weights: number[] = [];
  while (parts.length > 2 && weights.length < 2 && /^\s*-?(\d+\.?\d*|\.\d+)\s*$/.test(parts[parts.length - 1]!)) weights.unshift(Number(parts.pop()));
  if (weights.length === 0) return { prompt: rest };
  const lora = parts.pop()!.trim();
  if (lora === '') throw new UsageError(`${flag}: the LoRA name before the weight is empty in "${value}"`);
  return { prompt: parts.join(':'), lora: { name: lora, te: weights[0]!, unet: weights[1] ?? weights[0]! } };
}

/** `--region "x,y,w,h:prompt[:lora:weight[:unet_weight]]"` (pixels from the top-left). */
export function parseRegionFlag(value: string): JobRegion {
  const at = value.indexOf(':');
  const box = (at < 0 ? value : value.slice(0, at)).split(',').map((v) => Number(v.trim()));
  if (at < 0 || box.length !== 4 || !box.every(Number.isFinite)) throw new UsageError(`--region must be "x,y,w,h:prompt[:lora:weight]", got "${value}"`);
  return { box: box as [number, number, number, number], ...regionRest(value.slice(at + 1), '--region', value) };
}

/** `--region-mask "mask.png:prompt[:lora:weight[:unet_weight]]"` (white or opaque = inside). */
export function parseRegionMaskFlag(value: string): JobRegion {
  const at = value.toLowerCase().indexOf('.png:');
  if (at < 0) throw new UsageError(`--region-mask must be "mask.png:prompt[:lora:weight]", got "${value}"`);
  return { mask: value.slice(0, at + 4), ...regionRest(value.slice(at + 5), '--region-mask', value) };
}

function parseLoraMode(value: string): LoraMode {
  if (value !== 'auto' && value !== 'bank' && value !== 'merged') throw new UsageError(`--lora-mode must be auto, bank or merged, got "${value}"`);
  return value;
}

function readInitLatents(file: string): Tensor {
  const f = openSafetensors(file);
  try {
    if (!f.has('init_latents')) throw new PipelineError('BAD_LATENTS', `${file}: no tensor \`init_latents\` (write one with --save-latents).`, { file });
    return f.readFloat32('init_latents');
  } finally {
    f.close();
  }
}

function concat(tensors: readonly Tensor<'float32'>[]): Tensor<'float32'> {
  const [, ...rest] = tensors[0]!.shape;
  const data = new Float32Array(tensors.reduce((n, t) => n + t.data.length, 0));
  let o = 0;
  for (const t of tensors) {
    data.set(t.data, o);
    o += t.data.length;
  }
  return { dtype: 'float32', shape: [tensors.length, ...rest], data };
}

export async function runGenerate(argv: readonly string[]): Promise<number> {
  const { values } = parse(argv, {
    ...MODEL_OPTIONS,
    prompt: { type: 'string' },
    negative: { type: 'string' },
    steps: { type: 'string' },
    cfg: { type: 'string' },
    sampler: { type: 'string' },
    schedule: { type: 'string' },
    seed: { type: 'string' },
    rng: { type: 'string' },
    width: { type: 'string' },
    height: { type: 'string' },
    'clip-skip': { type: 'string' },
    'batch-size': { type: 'string' },
    'batch-count': { type: 'string' },
    out: { type: 'string' },
    'save-latents': { type: 'string' },
    'init-latents': { type: 'string' },
    lora: { type: 'string', multiple: true },
    'lora-dir': { type: 'string', multiple: true },
    'lora-mode': { type: 'string' },
    strategy: { type: 'string' },
    'switch-every': { type: 'string' },
    'cache-interval': { type: 'string' },
    frequency: { type: 'string' },
    'phase-rule': { type: 'string' },
    'cmlora-official': { type: 'boolean' },
    region: { type: 'string', multiple: true },
    'region-mask': { type: 'string', multiple: true },
    help: { type: 'boolean' },
  });
  if (values.help === true) {
    process.stdout.write(GENERATE_HELP);
    return 0;
  }
  const rng = values.rng;
  if (rng !== undefined && rng !== 'cpu' && rng !== 'nv') throw new UsageError(`--rng must be cpu or nv, got "${rng}"`);
  const options = engineOptions(values);
  const job: GenerateJob = normalizeJob({
    model: requireValue(values.model, '--model'),
    prompt: requireValue(values.prompt, '--prompt'),
    ...(values.negative === undefined ? {} : { negativePrompt: values.negative }),
    ...(values.steps === undefined ? {} : { steps: num('--steps', values.steps)! }),
    ...(values.cfg === undefined ? {} : { cfgScale: num('--cfg', values.cfg)! }),
    ...(values.sampler === undefined ? {} : { sampler: values.sampler }),
    ...(values.schedule === undefined ? {} : { scheduleType: values.schedule }),
    ...(values.seed === undefined ? {} : { seed: values.seed }),
    ...(rng === undefined ? {} : { rng }),
    ...(values.width === undefined ? {} : { width: num('--width', values.width)! }),
    ...(values.height === undefined ? {} : { height: num('--height', values.height)! }),
    ...(values['clip-skip'] === undefined ? {} : { clipSkip: num('--clip-skip', values['clip-skip'])! }),
    ...(values['batch-size'] === undefined ? {} : { batchSize: num('--batch-size', values['batch-size'])! }),
    ...(values['batch-count'] === undefined ? {} : { batchCount: num('--batch-count', values['batch-count'])! }),
    loras: (values.lora ?? []).map(parseLoraFlag),
    strategy: strategyFromFlags(values),
    regions: [...(values.region ?? []).map(parseRegionFlag), ...(values['region-mask'] ?? []).map(parseRegionMaskFlag)],
    ...(values['lora-mode'] === undefined ? {} : { loraMode: parseLoraMode(values['lora-mode']) }),
  });
  const initLatents = values['init-latents'] === undefined ? undefined : readInitLatents(values['init-latents']);
  const total = job.batchSize * job.batchCount;
  const nameOf = outputNamer(values.out ?? 'outputs', total);

  const engine = Sd15Engine.open(job.model, options);
  const loraDirs = [...(values['lora-dir'] ?? []).flatMap((d) => loraFoldersOf(d)), ...installLoraFolders(job.model)];
  const written: string[] = [];
  const inits: Tensor<'float32'>[] = [];
  const finals: Tensor<'float32'>[] = [];
  try {
    const models = engineModels(engine, { loraDirs });
    const result = await generate(job, models, {
      ...(initLatents === undefined ? {} : { initLatents }),
      onProgress: progressBar(total),
      onImage: async (img, run) => {
        const texts = imageMetadataTexts(job, img, engine.model, run);
        const file = nameOf(img);
        writeFileAtomic(file, await encodePng(img.image, texts));
        written.push(file);
        inits.push(img.initLatents);
        finals.push(img.finalLatents);
      },
    });
    if (values['save-latents'] !== undefined) {
      writeSafetensors(values['save-latents'], { init_latents: concat(inits), final_latents: concat(finals) }, { seed: String(job.seed), sampler: job.sampler });
    }
    for (const l of result.loras) {
      const miss = l.coverage.unmatched.length;
      process.stderr.write(`LoRA ${l.name} [${l.shortHash}] te ${l.te} unet ${l.unet}: ${l.coverage.matched}/${l.coverage.totalModulesInFile} modules applied (${result.loraMode})${miss > 0 ? `, ${miss} not applied: ${l.coverage.unmatched.slice(0, 3).map((u) => `${u.key} (${u.reason})`).join('; ')}${miss > 3 ? '…' : ''}` : ''}\n`);
    }
    const choice = await engine.providerChoice();
    process.stdout.write(`${written.join('\n')}\n`);
    process.stderr.write(`${total} image${total === 1 ? '' : 's'} on ${choice?.device ?? '?'}; seed ${job.seed}\n`);
    return 0;
  } finally {
    await engine.dispose();
  }
}
