/**
 * Opening an SD model from what users have on disk:
 *  (a) a diffusers folder (`model_index.json`, `unet/`, `text_encoder/`, `vae/`, `tokenizer/`,
 *      `scheduler/`), weights as `.safetensors` (plain, `.fp16` variant, or sharded with an index);
 *  (b) a single-file checkpoint in the original LDM layout (`model.diffusion_model.*`,
 *      `cond_stage_model.transformer.*`, `first_stage_model.*`), configs from the `<stem>.yaml`
 *      beside it or inferred from tensor shapes, or taken from a diffusers folder given as the
 *      config source.
 * Pickle files (`.ckpt`, `.pt`, `.bin`) are never executed; they are refused with a hint.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { ModelError } from './errors.ts';
import { LdmKeyMap, LDM_PREFIX, isIgnorableLdmKey, isIgnorableDiffusersKey, type Component } from './keys/ldm.ts';
import { parseClipTextConfig, parseUnetConfig, parseVaeConfig, type ClipTextConfig, type UnetConfig, type VaeConfig } from './networks/config.ts';
import { SafetensorsFile } from './safetensors.ts';
import { findCheckpointYaml, inferClipTextConfig, inferUnetConfig, inferVaeConfig, ldmSchedulerConfig, readLdmYaml, requireSd1Checkpoint } from './single-file.ts';
import { ClipTokenizer } from './tokenizer/clip.ts';
import type { ResolvedTensor, WeightSource } from './weights.ts';

export type ModelFormat = 'diffusers' | 'single-file';

export interface OpenModelOptions {
  /** A diffusers folder whose config files (and tokenizer) describe a single-file checkpoint. */
  readonly configDir?: string;
  /** A folder with the CLIP tokenizer (`vocab.json`, `merges.txt`). */
  readonly tokenizerDir?: string;
}

/** An opened model: parsed configs and weight sources. Call `close()` when done. */
export interface OpenedModel {
  readonly path: string;
  readonly format: ModelFormat;
  readonly unet: UnetConfig;
  readonly textEncoder: ClipTextConfig;
  readonly vae: VaeConfig;
  /** The scheduler config as diffusers would read it (raw JSON). */
  readonly schedulerConfig: Readonly<Record<string, unknown>>;
  /** Where each config came from, for `chorus inspect` and error reports. */
  readonly configSources: Readonly<Record<Component | 'scheduler', string>>;
  weights(component: Component): WeightSource;
  /** Every safetensors file this model reads (for cache fingerprints). */
  readonly files: readonly SafetensorsFile[];
  /** The CLIP tokenizer; throws MISSING_COMPONENT when none can be found. */
  loadTokenizer(): ClipTokenizer;
  close(): void;
}

const PICKLE_EXTENSIONS = new Set(['.ckpt', '.pt', '.pth', '.bin']);
const DIFFUSERS_WEIGHT_FILES: Readonly<Record<Component, readonly string[]>> = {
  unet: ['diffusion_pytorch_model.safetensors', 'diffusion_pytorch_model.fp16.safetensors'],
  vae: ['diffusion_pytorch_model.safetensors', 'diffusion_pytorch_model.fp16.safetensors'],
  text_encoder: ['model.safetensors', 'model.fp16.safetensors'],
};
const DIFFUSERS_PICKLE_FILES: Readonly<Record<Component, string>> = {
  unet: 'diffusion_pytorch_model.bin',
  vae: 'diffusion_pytorch_model.bin',
  text_encoder: 'pytorch_model.bin',
};
const PIPELINE_CLASSES_REFUSED: Readonly<Record<string, string>> = {
  StableDiffusionXLPipeline: 'an SDXL pipeline',
  StableDiffusionXLImg2ImgPipeline: 'an SDXL pipeline',
  StableDiffusion3Pipeline: 'a Stable Diffusion 3 pipeline',
  FluxPipeline: 'a FLUX pipeline',
};

function readJson(file: string, what: string): unknown {
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf-8');
  } catch {
    throw new ModelError('MISSING_COMPONENT', `${file}: ${what} is missing.`, { file });
  }
  try {
    return JSON.parse(text);
  } catch (e) {
    throw new ModelError('BAD_CONFIG', `${file}: not valid JSON (${(e as Error).message}).`, { file });
  }
}

/** Open a diffusers folder or a single-file checkpoint. */
export function openModel(modelPath: string, options: OpenModelOptions = {}): OpenedModel {
  let stat: fs.Stats;
  try {
    stat = fs.statSync(modelPath);
  } catch {
    throw new ModelError('MODEL_NOT_FOUND', `${modelPath}: no such file or folder. Pass a diffusers model folder or a .safetensors checkpoint.`, { file: modelPath });
  }
  if (stat.isDirectory()) return openDiffusersFolder(path.resolve(modelPath), options);
  const ext = path.extname(modelPath).toLowerCase();
  if (PICKLE_EXTENSIONS.has(ext)) {
    throw new ModelError(
      'PICKLE_CHECKPOINT',
      `${path.basename(modelPath)} is a PyTorch pickle checkpoint (${ext}). Chorus never executes pickle files (they can run arbitrary code); download or convert the model as .safetensors and load that.`,
      { file: modelPath },
    );
  }
  return openSingleFile(path.resolve(modelPath), options);
}

// ---- diffusers folders ---------------------------------------------------------------------------

function openComponentFiles(root: string, component: Component): SafetensorsFile[] {
  const dir = path.join(root, component);
  if (!fs.existsSync(dir)) {
    throw new ModelError('MISSING_COMPONENT', `${root}: the ${component}/ folder is missing; a diffusers SD model needs unet/, text_encoder/, vae/, tokenizer/ and scheduler/.`, { file: root, component });
  }
  for (const name of DIFFUSERS_WEIGHT_FILES[component]) {
    const index = path.join(dir, `${name}.index.json`);
    if (fs.existsSync(index)) {
      const map = (readJson(index, 'the shard index') as { weight_map?: Record<string, string> }).weight_map;
      if (map === undefined || typeof map !== 'object') throw new ModelError('BAD_CONFIG', `${index}: no weight_map.`, { file: index });
      return [...new Set(Object.values(map))].sort().map((shard) => SafetensorsFile.open(path.join(dir, shard)));
    }
    const file = path.join(dir, name);
    if (fs.existsSync(file)) return [SafetensorsFile.open(file)];
  }
  const pickle = path.join(dir, DIFFUSERS_PICKLE_FILES[component]);
  if (fs.existsSync(pickle)) {
    throw new ModelError('PICKLE_CHECKPOINT', `${pickle}: the ${component} weights are only in pickle format. Chorus never executes pickle files; use a copy of the model saved with safetensors.`, { file: pickle, component });
  }
  throw new ModelError('MISSING_COMPONENT', `${dir}: no weights (expected ${DIFFUSERS_WEIGHT_FILES[component].join(' or ')}).`, { file: dir, component });
}

/** diffusers' pre-0.14 names for the VAE mid-block attention, still found in older SD 1.5 folders. */
const LEGACY_VAE_ATTENTION: Readonly<Record<string, string>> = { to_q: 'query', to_k: 'key', to_v: 'value', 'to_out.0': 'proj_attn' };

function legacyAliases(component: Component, name: string): string[] {
  if (component !== 'vae') return [];
  const m = /^((?:en|de)coder\.mid_block\.attentions\.\d+)\.(to_q|to_k|to_v|to_out\.0)\.(weight|bias)$/.exec(name);
  return m === null ? [] : [`${m[1]}.${LEGACY_VAE_ATTENTION[m[2]!]}.${m[3]}`];
}

function multiFileSource(label: string, files: readonly SafetensorsFile[], component: Component): WeightSource {
  const find = (key: string): ResolvedTensor | undefined => {
    for (const file of files) if (file.has(key)) return { file, key };
    return undefined;
  };
  return {
    label,
    resolve(name) {
      const direct = find(name);
      if (direct !== undefined) return direct;
      for (const alt of legacyAliases(component, name)) {
        const hit = find(alt);
        if (hit !== undefined) return hit;
      }
      return undefined;
    },
    componentKeys: () => files.flatMap((f) => f.names()).filter((k) => !isIgnorableDiffusersKey(component, k)),
  };
}

function openDiffusersFolder(root: string, options: OpenModelOptions): OpenedModel {
  const indexFile = path.join(root, 'model_index.json');
  if (fs.existsSync(indexFile)) {
    const index = readJson(indexFile, 'model_index.json') as { _class_name?: unknown };
    const cls = typeof index._class_name === 'string' ? index._class_name : '';
    const refused = PIPELINE_CLASSES_REFUSED[cls];
    if (refused !== undefined) {
      throw new ModelError('UNSUPPORTED_ARCHITECTURE', `${root} is ${refused} (model_index.json: ${cls}); Chorus loads SD 1.x/2.x models.`, { file: indexFile, detected: cls });
    }
  } else if (!fs.existsSync(path.join(root, 'unet', 'config.json'))) {
    throw new ModelError('UNKNOWN_MODEL_FORMAT', `${root} is not a diffusers model folder (no model_index.json or unet/config.json). Pass a diffusers folder or a .safetensors checkpoint.`, { file: root });
  }
  for (const component of ['unet', 'text_encoder', 'vae'] as const) {
    if (!fs.existsSync(path.join(root, component))) {
      throw new ModelError('MISSING_COMPONENT', `${path.join(root, component)} is missing; a diffusers SD model folder needs unet/, text_encoder/, vae/, tokenizer/ and scheduler/.`, { file: root, component });
    }
  }
  const cfg = (component: string) => path.join(root, component, 'config.json');
  const unet = parseUnetConfig(readJson(cfg('unet'), 'unet/config.json'), cfg('unet'));
  const textEncoder = parseClipTextConfig(readJson(cfg('text_encoder'), 'text_encoder/config.json'), cfg('text_encoder'));
  const vae = parseVaeConfig(readJson(cfg('vae'), 'vae/config.json'), cfg('vae'));
  const schedulerFile = path.join(root, 'scheduler', 'scheduler_config.json');
  const schedulerConfig = fs.existsSync(schedulerFile) ? (readJson(schedulerFile, 'scheduler config') as Record<string, unknown>) : ldmSchedulerConfig();

  const files: Partial<Record<Component, SafetensorsFile[]>> = {};
  const opened: SafetensorsFile[] = [];
  try {
    for (const c of ['unet', 'text_encoder', 'vae'] as const) {
      files[c] = openComponentFiles(root, c);
      opened.push(...files[c]!);
    }
  } catch (e) {
    for (const f of opened) f.close();
    throw e;
  }
  const sources: Record<Component, WeightSource> = {
    unet: multiFileSource(`${path.basename(root)}/unet`, files.unet!, 'unet'),
    text_encoder: multiFileSource(`${path.basename(root)}/text_encoder`, files.text_encoder!, 'text_encoder'),
    vae: multiFileSource(`${path.basename(root)}/vae`, files.vae!, 'vae'),
  };
  return {
    path: root,
    format: 'diffusers',
    unet,
    textEncoder,
    vae,
    schedulerConfig,
    configSources: { unet: cfg('unet'), text_encoder: cfg('text_encoder'), vae: cfg('vae'), scheduler: fs.existsSync(schedulerFile) ? schedulerFile : 'SD default' },
    weights: (c) => sources[c],
    files: opened,
    loadTokenizer: () => findTokenizer([options.tokenizerDir, path.join(root, 'tokenizer')], root),
    close: () => opened.forEach((f) => f.close()),
  };
}

// ---- single files ---------------------------------------------------------------------------------

function singleFileSource(file: SafetensorsFile, component: Component, map: LdmKeyMap): WeightSource {
  const prefix = LDM_PREFIX[component];
  return {
    label: `${path.basename(file.path)} [${component}]`,
    resolve(name) {
      const m = map.toLdm(name);
      if (m === undefined) return undefined;
      if (file.has(m.ldm)) return { file, key: m.ldm };
      // Old merges store the text encoder without the `text_model.` level.
      if (component === 'text_encoder') {
        const legacy = m.ldm.replace(`${prefix}text_model.`, prefix);
        if (file.has(legacy)) return { file, key: legacy };
      }
      return undefined;
    },
    componentKeys: () => file.names().filter((k) => k.startsWith(prefix) && !isIgnorableLdmKey(k)),
    sourceKey: (name) => map.toLdm(name)?.ldm,
  };
}

function openSingleFile(file: string, options: OpenModelOptions): OpenedModel {
  const st = SafetensorsFile.open(file);
  try {
    requireSd1Checkpoint(st);
    const yamlPath = findCheckpointYaml(file);
    const yaml = yamlPath === undefined ? undefined : readLdmYaml(yamlPath);
    const configDir = options.configDir;
    const fromDir = (component: string): unknown | undefined => {
      if (configDir === undefined) return undefined;
      const p = path.join(configDir, component, 'config.json');
      return fs.existsSync(p) ? readJson(p, `${component}/config.json`) : undefined;
    };
    // The checkpoint's own YAML wins, then the config folder, then what the tensor shapes say.
    const pick = (component: string, fromYaml: unknown, infer: () => unknown): { raw: unknown; source: string } => {
      if (fromYaml !== undefined) return { raw: fromYaml, source: yamlPath! };
      const dirCfg = fromDir(component);
      if (dirCfg !== undefined) return { raw: dirCfg, source: path.join(configDir!, component, 'config.json') };
      return { raw: infer(), source: `inferred from the tensor shapes of ${path.basename(file)}` };
    };
    const teKeyPrefix = st.has(`${LDM_PREFIX.text_encoder}text_model.embeddings.token_embedding.weight`) ? `${LDM_PREFIX.text_encoder}text_model.` : LDM_PREFIX.text_encoder;
    const unetCfg = pick('unet', yaml?.unet, () => inferUnetConfig(st));
    const vaeCfg = pick('vae', yaml?.vae, () => inferVaeConfig(st));
    const teCfg = pick('text_encoder', undefined, () => inferClipTextConfig(st, teKeyPrefix));
    const unet = parseUnetConfig(unetCfg.raw, unetCfg.source);
    const vae = parseVaeConfig(vaeCfg.raw, vaeCfg.source);
    const textEncoder = parseClipTextConfig(teCfg.raw, teCfg.source);
    const schedulerFile = configDir === undefined ? undefined : path.join(configDir, 'scheduler', 'scheduler_config.json');
    const schedulerConfig =
      schedulerFile !== undefined && fs.existsSync(schedulerFile) ? (readJson(schedulerFile, 'scheduler config') as Record<string, unknown>) : (yaml?.scheduler ?? ldmSchedulerConfig());
    for (const c of ['unet', 'vae', 'text_encoder'] as const) {
      if (!st.names().some((k) => k.startsWith(LDM_PREFIX[c]))) {
        throw new ModelError('MISSING_COMPONENT', `${path.basename(file)}: the checkpoint has no ${c} weights (no \`${LDM_PREFIX[c]}*\` keys).`, { file, component: c });
      }
    }
    const sources: Record<Component, WeightSource> = {
      unet: singleFileSource(st, 'unet', LdmKeyMap.forUnet(unet)),
      vae: singleFileSource(st, 'vae', LdmKeyMap.forVae(vae)),
      text_encoder: singleFileSource(st, 'text_encoder', LdmKeyMap.forTextEncoder(textEncoder)),
    };
    return {
      path: file,
      format: 'single-file',
      unet,
      textEncoder,
      vae,
      schedulerConfig,
      configSources: {
        unet: unetCfg.source,
        vae: vaeCfg.source,
        text_encoder: teCfg.source,
        scheduler: schedulerFile !== undefined && fs.existsSync(schedulerFile) ? schedulerFile : (yamlPath ?? 'SD default'),
      },
      weights: (c) => sources[c],
      files: [st],
      loadTokenizer: () =>
        findTokenizer([options.tokenizerDir, configDir === undefined ? undefined : path.join(configDir, 'tokenizer'), path.join(path.dirname(file), 'tokenizer'), ...hubTokenizerDirs()], file),
      close: () => st.close(),
    };
  } catch (e) {
    st.close();
    throw e;
  }
}

/** openai/clip-vit-large-patch14 snapshots in the Hugging Face cache (where A1111 keeps its tokenizer). */
function hubTokenizerDirs(): string[] {
  const home = process.env.HF_HOME ?? path.join(os.homedir(), '.cache', 'huggingface');
  const snapshots = path.join(home, 'hub', 'models--openai--clip-vit-large-patch14', 'snapshots');
  try {
    return fs.readdirSync(snapshots).map((s) => path.join(snapshots, s));
  } catch {
    return [];
  }
}

function findTokenizer(candidates: readonly (string | undefined)[], modelPath: string): ClipTokenizer {
  // An explicit --tokenizer comes first, then CHORUS_TOKENIZER, then the places beside the model.
  const [explicit, ...rest] = candidates;
  for (const dir of [explicit, process.env.CHORUS_TOKENIZER, ...rest]) {
    if (dir !== undefined && fs.existsSync(path.join(dir, 'vocab.json')) && fs.existsSync(path.join(dir, 'merges.txt'))) return ClipTokenizer.load(dir);
  }
  throw new ModelError(
    'MISSING_COMPONENT',
    `${path.basename(modelPath)}: no CLIP tokenizer found (single-file checkpoints do not include one). Point Chorus at a folder with vocab.json and merges.txt ` +
      '(--tokenizer DIR or CHORUS_TOKENIZER), for example the tokenizer/ folder of any SD 1.5 diffusers model or ComfyUI\'s comfy/sd1_tokenizer.',
    { file: modelPath, component: 'tokenizer' },
  );
}
