/**
 * The shape of a generated key map between the diffusers layout (canonical, STYLE §3) and another
 * checkpoint layout.
 *
 * A map is a list of *modules*: one entry per reference-class instance (a ResnetBlock2D, a
 * Transformer2DModel, a conv leaf), giving its path in both layouts. Each module lists its *layers*
 * (the parameter-holding children) by their local names in both layouts, and each layer lists the
 * parameters it holds. A full key is `module path + "." + layer path + "." + parameter`, so a
 * checkpoint key and a LoRA module name (module path + layer path) resolve through the same table.
 */

/** Parameter leaves of the layers we map. Buffers (`position_ids`, DDPM schedules) are not mapped. */
export type ParamName = 'weight' | 'bias';

/**
 * What a module is, named after the diffusers class (LDM class in the comment). A kind decides the
 * local layer table; the tables live with the component that uses them.
 */
export type ModuleKind =
  /** Conv2d leaf (`conv_in`, `conv_out`, `quant_conv`): same in both layouts. */
  | 'conv'
  /** GroupNorm leaf (`conv_norm_out` ↔ `out.0` / `norm_out`). */
  | 'group_norm'
  /** LayerNorm leaf (CLIP `final_layer_norm`). */
  | 'layer_norm'
  /** TimestepEmbedding ↔ the `time_embed` Sequential. */
  | 'timestep_embedding'
  /** UNet ResnetBlock2D ↔ openaimodel ResBlock. */
  | 'resnet'
  /** Transformer2DModel ↔ SpatialTransformer (same local names). */
  | 'transformer'
  /** UNet Downsample2D ↔ openaimodel Downsample (`conv` ↔ `op`). */
  | 'downsample'
  /** Upsample2D ↔ Upsample (UNet and VAE; `conv` ↔ `conv`). */
  | 'upsample'
  /** VAE ResnetBlock2D (no time embedding) ↔ ldm `model.py` ResnetBlock. */
  | 'vae_resnet'
  /** VAE mid-block Attention ↔ AttnBlock (1×1 convs in LDM). */
  | 'vae_attention'
  /** VAE Downsample2D ↔ ldm `model.py` Downsample (`conv` ↔ `conv`). */
  | 'vae_downsample'
  /** CLIPTextEmbeddings (same local names). */
  | 'clip_embeddings'
  /** CLIPEncoderLayer (same local names). */
  | 'clip_encoder_layer';

/** One parameter-holding layer inside a module, by its local path in each layout. */
export interface LayerMapping {
  /** Local path in the diffusers layout; `''` means the module is itself the layer (a leaf). */
  readonly diffusers: string;
  /** Local path in the LDM layout; `''` for a leaf. */
  readonly ldm: string;
  readonly params: readonly ParamName[];
  /** Set when the weight is a Linear `[out, in]` in diffusers and a 1×1 conv `[out, in, 1, 1]` in LDM. */
  readonly weightReshape?: 'linear_to_conv1x1';
  /** The layer's name in diffusers files written before diffusers 0.14 (VAE attention `query`, …). */
  readonly legacyDiffusers?: string;
}

/** One module (reference-class instance), by its path in each layout, without any file prefix. */
export interface ModuleMapping {
  /** Path in the diffusers layout, e.g. `down_blocks.0.resnets.1`. */
  readonly diffusers: string;
  /** Path in the LDM layout without `LDM_PREFIX`, e.g. `input_blocks.2.0`. */
  readonly ldm: string;
  readonly kind: ModuleKind;
  readonly layers: readonly LayerMapping[];
  /** LDM path in older single files that lack a level (CLIP keys without `text_model.`). */
  readonly legacyLdm?: string;
}

/** A layer by its full path in each layout (module path + local path), e.g. for LoRA module names. */
export interface LayerPathMapping {
  readonly diffusers: string;
  /** Without `LDM_PREFIX`, e.g. `input_blocks.1.0.in_layers.2`. */
  readonly ldm: string;
  /** The kind of the module that holds the layer. */
  readonly kind: ModuleKind;
  readonly weightReshape?: 'linear_to_conv1x1';
}

export const WEIGHT_AND_BIAS: readonly ParamName[] = ['weight', 'bias'];
export const WEIGHT_ONLY: readonly ParamName[] = ['weight'];

/** A layer renamed between the layouts. */
export function renamedLayer(
  diffusers: string,
  ldm: string,
  params: readonly ParamName[] = WEIGHT_AND_BIAS,
  extra: Pick<LayerMapping, 'weightReshape' | 'legacyDiffusers'> = {},
): LayerMapping {
  return { diffusers, ldm, params, ...extra };
}

/** A layer with the same local name in both layouts. */
export function sameLayer(name: string, params: readonly ParamName[] = WEIGHT_AND_BIAS): LayerMapping {
  return { diffusers: name, ldm: name, params };
}

/** The module is the layer (conv, norm): its parameters sit directly under the module path. */
export const LEAF_LAYERS: readonly LayerMapping[] = [sameLayer('')];

/** Join key segments with `.`, dropping empty ones (leaf layers have an empty local path). */
export function joinKey(...segments: readonly string[]): string {
  return segments.filter((s) => s !== '').join('.');
}

/** Flatten a module map to layer paths (module + local), the granularity of LoRA module names. */
export function moduleLayers(modules: readonly ModuleMapping[]): LayerPathMapping[] {
  const out: LayerPathMapping[] = [];
  for (const module of modules) {
    for (const layer of module.layers) {
      out.push({
        diffusers: joinKey(module.diffusers, layer.diffusers),
        ldm: joinKey(module.ldm, layer.ldm),
        kind: module.kind,
        ...(layer.weightReshape === undefined ? {} : { weightReshape: layer.weightReshape }),
      });
    }
  }
  return out;
}
