/**
 * Single-file checkpoints in the original LDM layout: what architecture a file holds (from its keys
 * and tensor shapes, never from metadata), and the configs of its components, taken from the
 * original inference YAML when one sits beside the file, else inferred from tensor shapes.
 *
 * Config facts (CompVis `v1-inference.yaml`, Stability `v2-inference.yaml`): `unet_config.params`
 * (model_channels, channel_mult, num_res_blocks, attention_resolutions, num_heads or
 * num_head_channels, transformer_depth, context_dim, use_linear_in_transformer),
 * `first_stage_config.params.ddconfig` (ch, ch_mult, num_res_blocks, z_channels), `scale_factor`,
 * `linear_start`/`linear_end`/`timesteps`, `parameterization`.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { parse as parseYaml } from 'yaml';
import { ModelError } from './errors.ts';
import { LDM_PREFIX } from './keys/ldm.ts';
import type { SafetensorsFile } from './safetensors.ts';

export type CheckpointKind = 'sd1' | 'sd2' | 'sdxl' | 'sdxl-refiner' | 'sd3' | 'flux' | 'lora' | 'vae-only' | 'unknown';

export interface CheckpointDetection {
  readonly kind: CheckpointKind;
  /** A key (or fact) that decided it, for messages. */
  readonly evidence: string;
}

const UNET = LDM_PREFIX.unet;
const CLIP_L_HEAD_DIM = 64;
/** SD 1.x UNets use 8 heads at every level (v1-inference.yaml `num_heads: 8`). */
const SD1_NUM_HEADS = 8;
/** SD 2.x UNets use 64-wide heads (v2-inference.yaml `num_head_channels: 64`). */
const SD2_HEAD_CHANNELS = 64;
const SD1_CONTEXT_DIM = 768;
const SD2_CONTEXT_DIM = 1024;

function firstKey(file: SafetensorsFile, test: (k: string) => boolean): string | undefined {
  for (const k of file.tensors.keys()) if (test(k)) return k;
  return undefined;
}

/** Decide what a single file holds, from its keys and shapes. */
export function detectCheckpoint(file: SafetensorsFile): CheckpointDetection {
  const k = (test: (k: string) => boolean) => firstKey(file, test);
  let e: string | undefined;
  if ((e = k((x) => x.startsWith('lora_unet_') || x.startsWith('lora_te') || x.includes('.lora_down.') || x.includes('.lora_A.') || x.includes('.lora.down.') || x.includes('_lora.down.') || x.includes('_lora.up.') || /^(unet|text_encoder):\d+:(up|down)$/.test(x))) !== undefined) return { kind: 'lora', evidence: e };
  if ((e = k((x) => x.startsWith('conditioner.embedders.1.') || x.startsWith(`${UNET}label_emb.`))) !== undefined) {
    const refiner = k((x) => x.startsWith('conditioner.embedders.0.model.')) !== undefined && k((x) => x.startsWith('conditioner.embedders.1.')) === undefined;
    return { kind: refiner ? 'sdxl-refiner' : 'sdxl', evidence: e };
  }
  if ((e = k((x) => x.includes('joint_blocks.'))) !== undefined) return { kind: 'sd3', evidence: e };
  if ((e = k((x) => x.includes('double_blocks.'))) !== undefined) return { kind: 'flux', evidence: e };
  if ((e = k((x) => x.startsWith('cond_stage_model.model.transformer.resblocks.'))) !== undefined) return { kind: 'sd2', evidence: e };
  const toK = k((x) => x.startsWith(UNET) && x.endsWith('.attn2.to_k.weight'));
  if (toK !== undefined) {
    const width = file.info(toK).shape[1];
    if (width === SD2_CONTEXT_DIM) return { kind: 'sd2', evidence: `${toK} takes ${width}-wide text embeddings` };
    return { kind: 'sd1', evidence: `${toK} takes ${width}-wide text embeddings` };
  }
  if ((e = k((x) => x.startsWith(UNET))) !== undefined) return { kind: 'sd1', evidence: e };
  if ((e = k((x) => x.startsWith('encoder.down.') || x.startsWith('decoder.up.') || x.startsWith('encoder.down_blocks.'))) !== undefined) return { kind: 'vae-only', evidence: e };
  return { kind: 'unknown', evidence: file.names().slice(0, 3).join(', ') };
}

/** Refuse anything that is not an SD 1.x single-file checkpoint, saying what it is. */
export function requireSd1Checkpoint(file: SafetensorsFile): void {
  const d = detectCheckpoint(file);
  const name = path.basename(file.path);
  const refuse = (what: string, hint: string) => {
    throw new ModelError('UNSUPPORTED_ARCHITECTURE', `\`${name}\` is ${what} (keys like \`${d.evidence}\`); Chorus loads SD 1.5 checkpoints. ${hint}`, {
      file: file.path,
      detected: d.kind,
      evidence: d.evidence,
    });
  };
  switch (d.kind) {
    case 'sd1':
      return;
    case 'sdxl':
    case 'sdxl-refiner':
      refuse(d.kind === 'sdxl' ? 'an SDXL checkpoint' : 'an SDXL refiner checkpoint', 'Pick an SD 1.5 checkpoint instead.');
      break;
    case 'sd3':
      refuse('a Stable Diffusion 3 checkpoint', 'Pick an SD 1.5 checkpoint instead.');
      break;
    case 'flux':
      refuse('a FLUX checkpoint', 'Pick an SD 1.5 checkpoint instead.');
      break;
    case 'sd2':
      refuse('an SD 2.x checkpoint', 'SD 2.x models load from a diffusers folder (model_index.json, unet/, text_encoder/, …), not as a single file.');
      break;
    case 'lora':
      refuse('a LoRA, not a checkpoint', 'Put it in your LoRA folder and add it to the stack; pick a full SD 1.5 checkpoint as the model.');
      break;
    case 'vae-only':
      refuse('a standalone VAE, not a full checkpoint', 'Pick a full SD 1.5 checkpoint as the model.');
      break;
    case 'unknown':
      throw new ModelError('UNKNOWN_MODEL_FORMAT', `\`${name}\` does not look like a Stable Diffusion checkpoint (first keys: ${d.evidence}).`, { file: file.path });
  }
}

/** The original inference YAML for `file`: `<stem>.yaml` beside it, as A1111 looks for it. */
export function findCheckpointYaml(file: string): string | undefined {
  const candidate = path.join(path.dirname(file), `${path.basename(file, path.extname(file))}.yaml`);
  return fs.existsSync(candidate) ? candidate : undefined;
}

type Json = Record<string, unknown>;

function obj(v: unknown, where: string, source: string): Json {
  if (typeof v !== 'object' || v === null || Array.isArray(v)) throw new ModelError('BAD_CONFIG', `${source}: \`${where}\` is missing or not a mapping.`, { file: source, key: where });
  return v as Json;
}

function num(v: unknown, where: string, source: string): number {
  if (typeof v !== 'number') throw new ModelError('BAD_CONFIG', `${source}: \`${where}\` should be a number, found ${JSON.stringify(v)}.`, { file: source, key: where });
  return v;
}

export interface LdmYaml {
  readonly unet: Json;
  readonly vae: Json;
  /** `scale_factor` (VAE latent scale) when present. */
  readonly scaleFactor: number | undefined;
  readonly scheduler: Json;
}

/** Read an LDM inference YAML and express it as diffusers-style configs. Throws BAD_CONFIG naming the key. */
export function readLdmYaml(yamlPath: string): LdmYaml {
  let doc: unknown;
  try {
    doc = parseYaml(fs.readFileSync(yamlPath, 'utf-8'));
  } catch (e) {
    throw new ModelError('BAD_CONFIG', `${yamlPath}: not a readable YAML file (${(e as Error).message}).`, { file: yamlPath });
  }
  const params = obj(obj(obj(doc, '(document)', yamlPath).model, 'model', yamlPath).params, 'model.params', yamlPath);
  const u = obj(obj(params.unet_config, 'model.params.unet_config', yamlPath).params, 'unet_config.params', yamlPath);
  const dd = obj(obj(obj(params.first_stage_config, 'first_stage_config', yamlPath).params, 'first_stage_config.params', yamlPath).ddconfig, 'ddconfig', yamlPath);

  const mc = num(u.model_channels, 'unet_config.params.model_channels', yamlPath);
  const mult = (u.channel_mult ?? [1, 2, 4, 4]) as unknown[];
  const channels = mult.map((m, i) => mc * num(m, `channel_mult[${i}]`, yamlPath));
  const attnRes = ((u.attention_resolutions ?? []) as unknown[]).map((r, i) => num(r, `attention_resolutions[${i}]`, yamlPath));
  const down = channels.map((_, i) => (attnRes.includes(2 ** i) ? 'CrossAttnDownBlock2D' : 'DownBlock2D'));
  const up = [...down].reverse().map((t) => (t === 'CrossAttnDownBlock2D' ? 'CrossAttnUpBlock2D' : 'UpBlock2D'));
  const numHeads = typeof u.num_heads === 'number' && u.num_heads > 0 ? u.num_heads : undefined;
  const headChannels = typeof u.num_head_channels === 'number' && u.num_head_channels > 0 ? u.num_head_channels : undefined;
  if (numHeads === undefined && headChannels === undefined) {
    throw new ModelError('BAD_CONFIG', `${yamlPath}: unet_config.params needs num_heads or num_head_channels.`, { file: yamlPath, key: 'num_heads' });
  }
  const unet: Json = {
    in_channels: u.in_channels ?? 4,
    out_channels: u.out_channels ?? 4,
    block_out_channels: channels,
    down_block_types: down,
    up_block_types: up,
    layers_per_block: u.num_res_blocks ?? 2,
    attention_head_dim: numHeads ?? channels.map((c) => c / headChannels!),
    cross_attention_dim: u.context_dim,
    transformer_layers_per_block: u.transformer_depth ?? 1,
    use_linear_projection: u.use_linear_in_transformer ?? false,
    sample_size: u.image_size ?? 64,
  };

  const ch = num(dd.ch, 'ddconfig.ch', yamlPath);
  const vae: Json = {
    in_channels: dd.in_channels ?? 3,
    out_channels: dd.out_ch ?? 3,
    latent_channels: dd.z_channels ?? 4,
    block_out_channels: ((dd.ch_mult ?? [1, 2, 4, 4]) as unknown[]).map((m, i) => ch * num(m, `ch_mult[${i}]`, yamlPath)),
    down_block_types: ((dd.ch_mult ?? [1, 2, 4, 4]) as unknown[]).map(() => 'DownEncoderBlock2D'),
    up_block_types: ((dd.ch_mult ?? [1, 2, 4, 4]) as unknown[]).map(() => 'UpDecoderBlock2D'),
    layers_per_block: dd.num_res_blocks ?? 2,
    ...(typeof params.scale_factor === 'number' ? { scaling_factor: params.scale_factor } : {}),
  };

  const scheduler = ldmSchedulerConfig(params);
  return { unet, vae, scaleFactor: typeof params.scale_factor === 'number' ? params.scale_factor : undefined, scheduler };
}

/** The scheduler config an SD checkpoint implies (diffusers' PNDM default for SD, with the YAML's betas). */
export function ldmSchedulerConfig(params: Json = {}): Json {
  return {
    _class_name: 'PNDMScheduler',
    beta_start: typeof params.linear_start === 'number' ? params.linear_start : 0.00085,
    beta_end: typeof params.linear_end === 'number' ? params.linear_end : 0.012,
    beta_schedule: 'scaled_linear',
    num_train_timesteps: typeof params.timesteps === 'number' ? params.timesteps : 1000,
    prediction_type: params.parameterization === 'v' ? 'v_prediction' : 'epsilon',
    set_alpha_to_one: false,
    skip_prk_steps: true,
    steps_offset: 1,
    clip_sample: false,
  };
}

function shapeOf(file: SafetensorsFile, key: string): readonly number[] {
  return file.info(key).shape;
}

/**
 * Infer a diffusers UNet config from LDM tensor shapes: levels are runs of resnets separated by
 * downsamplers; channels from each resnet's output conv; attention where a level has a
 * SpatialTransformer. Head counts are not in the shapes, so they follow the family (SD 1.x: 8).
 */
export function inferUnetConfig(file: SafetensorsFile): Json {
  const p = UNET;
  const need = (key: string) => {
    if (!file.has(key)) throw new ModelError('MISSING_TENSOR', `${path.basename(file.path)}: \`${key}\` is missing; the UNet in this checkpoint is incomplete.`, { file: file.path, key });
    return shapeOf(file, key);
  };
  const convIn = need(`${p}input_blocks.0.0.weight`);
  const out = need(`${p}out.2.weight`);
  const levels: { channels: number; layers: number; attention: boolean }[] = [{ channels: 0, layers: 0, attention: false }];
  let transformerDepth = 1;
  let linearProjection = false;
  let contextDim = 0;
  for (let i = 1; file.has(`${p}input_blocks.${i}.0.op.weight`) || file.has(`${p}input_blocks.${i}.0.out_layers.3.weight`); i++) {
    if (file.has(`${p}input_blocks.${i}.0.op.weight`)) {
      levels.push({ channels: 0, layers: 0, attention: false });
      continue;
    }
    const level = levels[levels.length - 1]!;
    level.channels = shapeOf(file, `${p}input_blocks.${i}.0.out_layers.3.weight`)[0]!;
    level.layers++;
    const projIn = `${p}input_blocks.${i}.1.proj_in.weight`;
    if (file.has(projIn)) {
      level.attention = true;
      linearProjection = shapeOf(file, projIn).length === 2;
      let depth = 0;
      while (file.has(`${p}input_blocks.${i}.1.transformer_blocks.${depth}.attn1.to_q.weight`)) depth++;
      transformerDepth = depth;
      contextDim = shapeOf(file, `${p}input_blocks.${i}.1.transformer_blocks.0.attn2.to_k.weight`)[1]!;
    }
  }
  if (contextDim === 0) {
    const midK = `${p}middle_block.1.transformer_blocks.0.attn2.to_k.weight`;
    contextDim = file.has(midK) ? shapeOf(file, midK)[1]! : SD1_CONTEXT_DIM;
  }
  const channels = levels.map((l) => l.channels);
  const heads = contextDim === SD2_CONTEXT_DIM ? channels.map((c) => c / SD2_HEAD_CHANNELS) : SD1_NUM_HEADS;
  const down = levels.map((l) => (l.attention ? 'CrossAttnDownBlock2D' : 'DownBlock2D'));
  return {
    in_channels: convIn[1],
    out_channels: out[0],
    block_out_channels: channels,
    down_block_types: down,
    up_block_types: [...down].reverse().map((t) => (t === 'CrossAttnDownBlock2D' ? 'CrossAttnUpBlock2D' : 'UpBlock2D')),
    layers_per_block: levels.map((l) => l.layers),
    attention_head_dim: heads,
    cross_attention_dim: contextDim,
    transformer_layers_per_block: transformerDepth,
    use_linear_projection: linearProjection,
  };
}

/** Infer a diffusers VAE config from LDM tensor shapes (`first_stage_model.encoder.down.N.block.M`). */
export function inferVaeConfig(file: SafetensorsFile): Json {
  const p = LDM_PREFIX.vae;
  const key = `${p}encoder.conv_in.weight`;
  if (!file.has(key)) throw new ModelError('MISSING_COMPONENT', `${path.basename(file.path)}: the checkpoint has no VAE (no \`${p}*\` keys). Use a checkpoint with a baked-in VAE.`, { file: file.path, component: 'vae' });
  const channels: number[] = [];
  let layers = 0;
  for (let i = 0; file.has(`${p}encoder.down.${i}.block.0.conv1.weight`); i++) {
    channels.push(shapeOf(file, `${p}encoder.down.${i}.block.0.conv1.weight`)[0]!);
    if (i === 0) while (file.has(`${p}encoder.down.0.block.${layers}.conv1.weight`)) layers++;
  }
  return {
    in_channels: shapeOf(file, key)[1],
    out_channels: shapeOf(file, `${p}decoder.conv_out.weight`)[0],
    latent_channels: shapeOf(file, `${p}decoder.conv_in.weight`)[1],
    block_out_channels: channels,
    down_block_types: channels.map(() => 'DownEncoderBlock2D'),
    up_block_types: channels.map(() => 'UpDecoderBlock2D'),
    layers_per_block: layers,
  };
}

/**
 * Infer a transformers CLIPTextModel config from tensor shapes. Head count is not in the shapes:
 * CLIP text towers use 64-wide heads, so a width that is not a multiple of 64 cannot be inferred.
 */
export function inferClipTextConfig(file: SafetensorsFile, prefix: string): Json {
  const tok = `${prefix}embeddings.token_embedding.weight`;
  if (!file.has(tok)) throw new ModelError('MISSING_COMPONENT', `${path.basename(file.path)}: the checkpoint has no CLIP text encoder (no \`${tok}\`).`, { file: file.path, component: 'text_encoder' });
  const [vocab, hidden] = shapeOf(file, tok) as [number, number];
  let layers = 0;
  while (file.has(`${prefix}encoder.layers.${layers}.self_attn.q_proj.weight`)) layers++;
  if (hidden % CLIP_L_HEAD_DIM !== 0) {
    throw new ModelError(
      'BAD_CONFIG',
      `${path.basename(file.path)}: cannot tell the attention head count of a ${hidden}-wide text encoder from its weights. Pass a diffusers folder with text_encoder/config.json as the config source (--config).`,
      { file: file.path, key: tok },
    );
  }
  return {
    vocab_size: vocab,
    hidden_size: hidden,
    intermediate_size: shapeOf(file, `${prefix}encoder.layers.0.mlp.fc1.weight`)[0],
    num_hidden_layers: layers,
    num_attention_heads: hidden / CLIP_L_HEAD_DIM,
    max_position_embeddings: shapeOf(file, `${prefix}embeddings.position_embedding.weight`)[0],
    hidden_act: 'quick_gelu',
  };
}
