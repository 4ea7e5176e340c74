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
  type GenerateOptions,
  type GenerateProgress,
  type MemoryPlan,
} from '../../pipelines/index.ts';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { MODEL_OPTIONS, UsageError, engineOptions, parse, parseMemorySize, requireValue } from '../args.ts';

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
  --strategy <name>        how several LoRAs are composed: plain (default), merge, switch, composite, cmlora, regions,
                           clora, lora-composer
  --switch-every <n>       switch: steps per LoRA (default 5)
  --cache-interval <c>     cmlora: 0 non-uniform refresh, 1 every step, ≥ 2 every c steps with feature caching (default 3)
  --frequency high,low,…   cmlora: frequency class per LoRA (measured from a probe image when omitted)
  --phase-rule <rule>      cmlora: offline (default), online, online-official
  --cmlora-official        cmlora: reproduce the official code's quirks (phase-2 refresh no-op)
  --region "x,y,w,h:prompt[:lora:weight[:unet_weight]]"
                           regions: a box in pixels with its prompt and LoRA (repeatable; implies --strategy regions)
  --region-mask "mask.png:prompt[:lora:weight]"   regions: a painted mask (white/opaque = inside)
  --concept "words[|other words]"
                           clora, lora-composer: concept k's words as its prompt spells them (repeatable, one per
                           --slot or --region); clora: after | the words naming it in the other slots' prompts
  --slot "prompt[:lora:weight[:unet_weight]]"
                           clora: concept k's prompt slot with its LoRA (repeatable; an empty prompt = --prompt);
                           the --prompt itself is slot 0, without concept LoRAs (--lora LoRAs apply to every slot)
  --clora-step-size <η>    clora: latent step size (default 20)
  --clora-update-until <i> clora: update the latents at steps i < this (default: 50 of 100 steps, scaled)
  --clora-refine-steps <i,j,…>   clora: steps with extra refinement rounds (default: 0,10,20 of 100, scaled)
  --clora-refine-rounds <n>      clora: extra rounds at those steps (default 20)
  --clora-mask-threshold <α>     clora: mask threshold relative to each map's max (default 0.4)
  --clora-mask-after <i>   clora: masks from step i on, before that plain averaging (default 0)
  --clora-morphology <ops> clora: 3×3 mask morphology, comma-separated: dilate, erode, opening, closing
  --clora-no-update        clora: masked fusion only, no latent updates
  --composer-step-size <η> lora-composer: base step size, φ_i = η·√(linspace(1, 0.5, T)[i]) (default 20)
  --composer-refine-until <i>    lora-composer: last refinement step (default: 25 of 50 steps, scaled)
  --composer-early-stop-from <i> lora-composer: stop refining when the loss rises, from step i (default: 5 of 50, scaled)
  --composer-weights <box,fill,region>  lora-composer: loss weights (default 8,2,10)
  --composer-top-k <ratio> lora-composer: top-k ratio of the box (default 0.2)
  --composer-no-isolation  lora-composer: no self-attention isolation between the boxes
  --composer-no-reinit     lora-composer: no latent re-initialisation
  --debug-masks <dir>      clora: each step's slot masks; lora-composer: the boxes and each refinement's attention
                           maps — written as PNGs into <dir>
  --lora-mode auto|bank|merged   LoRAs as runtime inputs (bank) or baked into the weights (merged); auto: bank
                           unless a LoRA is not low-rank (LoKr)
  --out <path>             a folder (default ./outputs; files NNNNN-<seed>.png) or a .png file name
  --save-latents <file>    write init_latents and final_latents (before decoding) to a safetensors file
  --init-latents <file>    start from init_latents in a safetensors file instead of the seeded noise
  --memory <size>          the RAM to plan batches and sessions for (e.g. 12G; default: all of this machine's):
                           less leaves room for other programs, and splits UNet calls sooner
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

/** `a,b,c` → numbers, or a usage error naming the flag. */
function numbers(flag: string, value: string | undefined): number[] | undefined {
  return value?.split(',').map((v) => num(flag, v)!);
}

type GradientFlags = {
  concept?: string[] | undefined;
  slot?: string[] | undefined;
  'clora-step-size'?: string | undefined;
  'clora-update-until'?: string | undefined;
  'clora-refine-steps'?: string | undefined;
  'clora-refine-rounds'?: string | undefined;
  'clora-mask-threshold'?: string | undefined;
  'clora-mask-after'?: string | undefined;
  'clora-morphology'?: string | undefined;
  'clora-no-update'?: boolean | undefined;
  'composer-step-size'?: string | undefined;
  'composer-refine-until'?: string | undefined;
  'composer-early-stop-from'?: string | undefined;
  'composer-weights'?: string | undefined;
  'composer-top-k'?: string | undefined;
  'composer-no-isolation'?: boolean | undefined;
  'composer-no-reinit'?: boolean | undefined;
};

/** `--slot "prompt[:lora:weight[:unet_weight]]"`: the prompt may be empty (the job's prompt). */
export function parseSlotFlag(value: string): { prompt: string; lora: JobLora } {
  const parts = value.split(':');
  const weights: number[] = [];
  while (parts.length > 2 && weights.length < 2 && /^\s*-?(\d+\.?\d*|\.\d+)\s*$/.test(parts[parts.length - 1]!)) weights.unshift(Number(parts.pop()));
  const lora = parts.length > 1 ? parts.pop()!.trim() : '';
  if (lora === '') throw new UsageError(`--slot must be "prompt:lora[:weight]" (a CLoRA slot binds a LoRA), got "${value}"`);
  const te = weights[0] ?? 1;
  return { prompt: parts.join(':'), lora: { name: lora, te, unet: weights[1] ?? te } };
}

/** The knobs and concepts of clora / lora-composer from the flags. */
function gradientFromFlags(name: string, values: GradientFlags): Partial<StrategySpec> {
  const concepts = (values.concept ?? []).map((c) => {
    const [words, other] = c.split('|');
    if (words === undefined || words.trim() === '') throw new UsageError(`--concept needs the concept's words, got "${c}"`);
    return { words: words.trim(), ...(other === undefined || other.trim() === '' ? {} : { otherWords: other.trim() }) };
  });
  const slots = (values.slot ?? []).map(parseSlotFlag);
  if (name === 'clora') {
    if (slots.length !== concepts.length) throw new UsageError(`clora binds concept k to slot k: give one --concept per --slot (got ${concepts.length} --concept, ${slots.length} --slot)`);
    const morphology = values['clora-morphology']?.split(',').map((m) => m.trim());
    if (morphology !== undefined && !morphology.every((m) => ['dilate', 'erode', 'opening', 'closing'].includes(m))) throw new UsageError(`--clora-morphology takes dilate, erode, opening, closing, got "${values['clora-morphology']}"`);
    const clora = {
      ...(values['clora-step-size'] === undefined ? {} : { stepSize: num('--clora-step-size', values['clora-step-size'])! }),
      ...(values['clora-update-until'] === undefined ? {} : { updateUntil: num('--clora-update-until', values['clora-update-until'])! }),
      ...(values['clora-refine-steps'] === undefined ? {} : { refineSteps: numbers('--clora-refine-steps', values['clora-refine-steps'])! }),
      ...(values['clora-refine-rounds'] === undefined ? {} : { refineRounds: num('--clora-refine-rounds', values['clora-refine-rounds'])! }),
      ...(values['clora-mask-threshold'] === undefined ? {} : { maskThreshold: num('--clora-mask-threshold', values['clora-mask-threshold'])! }),
      ...(values['clora-mask-after'] === undefined ? {} : { maskAfter: num('--clora-mask-after', values['clora-mask-after'])! }),
      ...(morphology === undefined ? {} : { morphology: morphology as Array<'dilate' | 'erode' | 'opening' | 'closing'> }),
      ...(values['clora-no-update'] === true ? { latentUpdate: false } : {}),
    };
    return {
      concepts: concepts.map((c, k) => ({ ...c, lora: slots[k]!.lora, ...(slots[k]!.prompt.trim() === '' ? {} : { prompt: slots[k]!.prompt }) })),
      ...(Object.keys(clora).length === 0 ? {} : { clora }),
    };
  }
  if (slots.length > 0) throw new UsageError('--slot is for --strategy clora');
  if (name !== 'lora-composer') {
    if (concepts.length > 0) throw new UsageError('--concept is for --strategy clora or lora-composer');
    return {};
  }
  if (concepts.some((c) => c.otherWords !== undefined)) throw new UsageError('--concept "words|other words": the other words are for clora; lora-composer takes the words of each region\'s prompt');
  const weights = numbers('--composer-weights', values['composer-weights']);
  if (weights !== undefined && weights.length !== 3) throw new UsageError(`--composer-weights takes box,fill,region, got "${values['composer-weights']}"`);
  const loraComposer = {
    ...(values['composer-step-size'] === undefined ? {} : { stepSize: num('--composer-step-size', values['composer-step-size'])! }),
    ...(values['composer-refine-until'] === undefined ? {} : { refineUntil: num('--composer-refine-until', values['composer-refine-until'])! }),
    ...(values['composer-early-stop-from'] === undefined ? {} : { earlyStopFrom: num('--composer-early-stop-from', values['composer-early-stop-from'])! }),
    ...(weights === undefined ? {} : { weights: { box: weights[0]!, fill: weights[1]!, region: weights[2]! } }),
    ...(values['composer-top-k'] === undefined ? {} : { topKRatio: num('--composer-top-k', values['composer-top-k'])! }),
    ...(values['composer-no-isolation'] === true ? { isolation: false } : {}),
    ...(values['composer-no-reinit'] === true ? { reinit: false } : {}),
  };
  return { concepts, ...(Object.keys(loraComposer).length === 0 ? {} : { loraComposer }) };
}

function strategyFromFlags(values: GradientFlags & {
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
    ...gradientFromFlags(name, values),
  };
}

type StrategyEvent = Parameters<NonNullable<GenerateOptions['onStrategyEvent']>>[0];

/**
 * `--debug-masks dir`: each mask (h × w on the latent grid, values in [0, 1]) as a grayscale PNG at
 * image size (nearest, `scale` pixels per cell): CLoRA's slot masks per step, LoRA-Composer's boxes
 * and each refinement's concept attention (min–max scaled).
 */
function debugMaskWriter(dir: string, latent: readonly [number, number], scale: number): (e: StrategyEvent, batch: number) => Promise<void> {
  fs.mkdirSync(dir, { recursive: true });
  const [H, W] = [latent[0] * scale, latent[1] * scale];
  const write = async (name: string, m: ArrayLike<number>, h: number, w: number) => {
    const plane = new Float32Array(H * W);
    for (let y = 0; y < H; y++) for (let x = 0; x < W; x++) plane[y * W + x] = m[Math.floor((y * h) / H) * w + Math.floor((x * w) / W)]!;
    const data = new Float32Array(3 * H * W);
    for (let c = 0; c < 3; c++) data.set(plane, c * H * W);
    writeFileAtomic(path.join(dir, `${name}.png`), await encodePng({ dtype: 'float32', shape: [1, 3, H, W], data }, []));
  };
  const scaled = (m: ArrayLike<number>) => {
    let lo = Infinity;
    let hi = -Infinity;
    for (let i = 0; i < m.length; i++) [lo, hi] = [Math.min(lo, m[i]!), Math.max(hi, m[i]!)];
    return Float32Array.from(m, (v) => (hi > lo ? (v - lo) / (hi - lo) : 0));
  };
  const pad = (n: number) => String(n).padStart(3, '0');
  const [lh, lw] = latent;
  return async (e, batch) => {
    const b = `b${batch}`;
    switch (e.kind) {
      case 'masks':
        for (const [p, m] of e.masks.entries()) await write(`${b}-step${pad(e.evaluation)}-slot${p}`, m.subarray(0, lh * lw), lh, lw);
        return;
      case 'boxes':
        for (const [r, m] of e.masks.entries()) await write(`${b}-box${r}`, m, lh, lw);
        return;
      case 'update':
        if ('smoothed' in e) {
          const [gh, gw] = e.grid;
          for (const [r, tokens] of e.smoothed.entries()) {
            const sum = new Float64Array(gh * gw);
            for (const t of tokens) t.forEach((v, q) => (sum[q] = sum[q]! + v));
            await write(`${b}-step${pad(e.evaluation)}-attention${r}`, scaled(sum), gh, gw);
          }
        }
        return;
      case 'reinit':
        return;
    }
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
    concept: { type: 'string', multiple: true },
    slot: { type: 'string', multiple: true },
    'clora-step-size': { type: 'string' },
    'clora-update-until': { type: 'string' },
    'clora-refine-steps': { type: 'string' },
    'clora-refine-rounds': { type: 'string' },
    'clora-mask-threshold': { type: 'string' },
    'clora-mask-after': { type: 'string' },
    'clora-morphology': { type: 'string' },
    'clora-no-update': { type: 'boolean' },
    'composer-step-size': { type: 'string' },
    'composer-refine-until': { type: 'string' },
    'composer-early-stop-from': { type: 'string' },
    'composer-weights': { type: 'string' },
    'composer-top-k': { type: 'string' },
    'composer-no-isolation': { type: 'boolean' },
    'composer-no-reinit': { type: 'boolean' },
    'debug-masks': { type: 'string' },
    memory: { type: 'string' },
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
  const memoryBytes = values.memory === undefined ? undefined : parseMemorySize('--memory', values.memory);
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
    const masksDir = values['debug-masks'];
    const writeMasks = masksDir === undefined ? undefined : debugMaskWriter(masksDir, [job.height / models.vaeScale, job.width / models.vaeScale], models.vaeScale);
    const pending: Promise<void>[] = [];
    const result = await generate(job, models, {
      ...(initLatents === undefined ? {} : { initLatents }),
      ...(memoryBytes === undefined
        ? {}
        : {
            memoryBytes,
            onPlan: (plan: MemoryPlan, batch: number) => {
              if (batch > 0) return;
              const gib = (plan.memoryBytes / 2 ** 30).toFixed(1);
              const gradient = plan.gradientBatch === undefined ? '' : `, ${plan.gradientBatch} per gradient call`;
              process.stderr.write(`memory plan for ${gib} GiB: ${plan.maxBatch} samples per UNet call${gradient}, ${plan.sessions} UNet session(s) at a time${plan.exclusive ? ' (the gradient session alone)' : ''}\n`);
            },
          }),
      ...(writeMasks === undefined ? {} : { onStrategyEvent: (e, batch) => void pending.push(writeMasks(e, batch)) }),
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
    await Promise.all(pending);
    if (masksDir !== undefined) process.stderr.write(`debug masks in ${masksDir}\n`);
    if (values['save-latents'] !== undefined) {
      writeSafetensors(values['save-latents'], { init_latents: concat(inits), final_latents: concat(finals) }, { seed: String(job.seed), sampler: job.sampler });
    }
    for (const l of result.loras) {
      const miss = l.coverage.unmatched.length;
      process.stderr.write(`LoRA ${l.name} [${l.shortHash}] te ${l.te} unet ${l.unet}: ${l.coverage.matched}/${l.coverage.totalModulesInFile} modules applied (${result.loraMode})${miss > 0 ? `, ${miss} not applied: ${l.coverage.unmatched.slice(0, 3).map((u) => `${u.key} (${u.reason})`).join('; ')}${miss > 3 ? '…' : ''}` : ''}\n`);
    }
    const choice = await engine.providerChoice();
    const plan = await engine.plan();
    process.stdout.write(`${written.join('\n')}\n`);
    process.stderr.write(`device: ${choice?.reason ?? plan.device}; weights ${plan.precision.reason}\n`);
    process.stderr.write(`${total} image${total === 1 ? '' : 's'} on ${choice?.device ?? '?'}; seed ${job.seed}\n`);
    return 0;
  } finally {
    await engine.dispose();
  }
}
