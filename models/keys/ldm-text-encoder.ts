/**
 * Text encoder module map: transformers `CLIPTextModel` (diffusers `text_encoder/`) ↔ the SD 1.x
 * single file's `cond_stage_model.transformer.*`.
 *
 * LDM's `FrozenCLIPEmbedder` holds the same transformers `CLIPTextModel` as `self.transformer`, so
 * the LDM key is the diffusers key behind a prefix: every module has the same path in both layouts.
 * Old merges were saved from a transformers version whose `CLIPTextModel` had no `text_model` level;
 * their keys (`cond_stage_model.transformer.encoder.layers.0…`) are accepted as `legacyLdm`.
 * SD 2.x single files store OpenCLIP (`cond_stage_model.model.*`), a different layout not mapped here.
 *
 * Reference (read for the structure; no code taken): transformers v4.33.3
 * `src/transformers/models/clip/modeling_clip.py` (`CLIPTextEmbeddings`, `CLIPEncoderLayer`,
 * `CLIPTextTransformer`)
 * https://github.com/huggingface/transformers/blob/v4.33.3/src/transformers/models/clip/modeling_clip.py
 */
import type { ClipTextConfig } from '../networks/config.ts';
import { LEAF_LAYERS, WEIGHT_ONLY, sameLayer, type LayerMapping, type ModuleMapping } from './module-map.ts';

/** `CLIPTextEmbeddings`; its `position_ids` buffer is not a parameter (see `isIgnorableLdmKey`). */
const EMBEDDING_LAYERS: readonly LayerMapping[] = [
  sameLayer('token_embedding', WEIGHT_ONLY),
  sameLayer('position_embedding', WEIGHT_ONLY),
];

/** `CLIPEncoderLayer`: pre-LN attention then MLP. */
const ENCODER_LAYER_LAYERS: readonly LayerMapping[] = [
  sameLayer('self_attn.k_proj'),
  sameLayer('self_attn.v_proj'),
  sameLayer('self_attn.q_proj'),
  sameLayer('self_attn.out_proj'),
  sameLayer('layer_norm1'),
  sameLayer('mlp.fc1'),
  sameLayer('mlp.fc2'),
  sameLayer('layer_norm2'),
];

/**
 * The text encoder module map for a parsed CLIP text config (`parseClipTextConfig`). LDM paths are
 * without `cond_stage_model.transformer.`.
 */
export function textEncoderModuleMap(config: ClipTextConfig): ModuleMapping[] {
  const modules: ModuleMapping[] = [];
  const add = (path: string, kind: ModuleMapping['kind'], layers: readonly LayerMapping[]): void => {
    modules.push({ diffusers: `text_model.${path}`, ldm: `text_model.${path}`, kind, layers, legacyLdm: path });
  };
  add('embeddings', 'clip_embeddings', EMBEDDING_LAYERS);
  for (let i = 0; i < config.numHiddenLayers; i++) add(`encoder.layers.${i}`, 'clip_encoder_layer', ENCODER_LAYER_LAYERS);
  add('final_layer_norm', 'layer_norm', LEAF_LAYERS);
  return modules;
}
