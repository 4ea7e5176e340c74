/**
 * Key conversion between the diffusers layout (canonical, STYLE §3) and the original LDM/CompVis
 * single-file checkpoint layout, for the UNet, the VAE and the CLIP text encoder.
 *
 * The maps are generated from the parsed model config (`models/networks/config.ts` validates the
 * `config.json` and fills the reference defaults) by walking its block structure (`ldm-unet.ts`,
 * `ldm-vae.ts`, `ldm-text-encoder.ts`): a module map (which diffusers module is which LDM module) and,
 * per module kind, a table of local layer names. `LdmKeyMap` expands those to every parameter key
 * and indexes them both ways, checking that no two keys collide.
 *
 * Key conventions of `LdmKeyMap`:
 * - diffusers keys are relative to their component folder, as in `unet/diffusion_pytorch_model.safetensors`
 *   (`down_blocks.0.resnets.0.conv1.weight`);
 * - LDM keys are full single-file keys, *including* `LDM_PREFIX[component]`
 *   (`model.diffusion_model.input_blocks.1.0.in_layers.2.weight`).
 * Module maps (`unetModuleMap`, …) give LDM paths *without* the prefix, the form kohya LoRA names use.
 */
import type { ClipTextConfig, UnetConfig, VaeConfig } from '../networks/config.ts';
import { textEncoderModuleMap } from './ldm-text-encoder.ts';
import { unetModuleMap } from './ldm-unet.ts';
import { vaeModuleMap } from './ldm-vae.ts';
import { joinKey, type ModuleMapping } from './module-map.ts';

export { unetModuleMap } from './ldm-unet.ts';
export { vaeModuleMap } from './ldm-vae.ts';
export { textEncoderModuleMap } from './ldm-text-encoder.ts';
export { moduleLayers } from './module-map.ts';
export type { LayerMapping, LayerPathMapping, ModuleKind, ModuleMapping, ParamName } from './module-map.ts';

export type Component = 'unet' | 'vae' | 'text_encoder';

/** Where each component lives in an SD 1.x single-file checkpoint. */
export const LDM_PREFIX = {
  unet: 'model.diffusion_model.',
  vae: 'first_stage_model.',
  text_encoder: 'cond_stage_model.transformer.',
} as const satisfies Record<Component, string>;

/** One parameter in both layouts. */
export interface KeyMapping {
  /** Canonical diffusers key, relative to the component (never a legacy alias). */
  readonly diffusers: string;
  /** Canonical single-file key, with `LDM_PREFIX` (never a legacy alias). */
  readonly ldm: string;
  /** Present when the diffusers tensor is Linear `[C_out, C_in]` and the LDM one `[C_out, C_in, 1, 1]`. */
  readonly reshape?: 'linear_to_conv1x1';
}

/**
 * The 12 DDPM schedule buffers LDM's `LatentDiffusion.register_schedule` stores at the top level of
 * a single file. Chorus computes schedules from the scheduler config instead.
 */
const DDPM_SCHEDULE_BUFFERS: ReadonlySet<string> = new Set([
  'betas',
  'alphas_cumprod',
  'alphas_cumprod_prev',
  'sqrt_alphas_cumprod',
  'sqrt_one_minus_alphas_cumprod',
  'log_one_minus_alphas_cumprod',
  'sqrt_recip_alphas_cumprod',
  'sqrt_recipm1_alphas_cumprod',
  'posterior_variance',
  'posterior_log_variance_clipped',
  'posterior_mean_coef1',
  'posterior_mean_coef2',
]);

/** EMA weights of non-pruned checkpoints (`model_ema.decay`, `model_ema.num_updates`, `model_ema.<flattened key>`). */
const EMA_PREFIX = 'model_ema.';

/**
 * CLIP's `position_ids` is `arange(77)`, a buffer that older transformers versions saved; it is
 * rebuilt, never loaded. Listed with and without the `text_model.` level.
 */
const POSITION_IDS_DIFFUSERS = 'text_model.embeddings.position_ids';
const POSITION_IDS_LDM: ReadonlySet<string> = new Set([
  `${LDM_PREFIX.text_encoder}${POSITION_IDS_DIFFUSERS}`,
  `${LDM_PREFIX.text_encoder}embeddings.position_ids`,
]);

/** True for single-file keys that carry no weights Chorus loads: DDPM buffers, `model_ema.*`, `position_ids`. */
export function isIgnorableLdmKey(key: string): boolean {
  return DDPM_SCHEDULE_BUFFERS.has(key) || key.startsWith(EMA_PREFIX) || POSITION_IDS_LDM.has(key);
}

/** True for diffusers-layout keys that are buffers, not weights (the text encoder's `position_ids`). */
export function isIgnorableDiffusersKey(component: Component, key: string): boolean {
  return component === 'text_encoder' && key === POSITION_IDS_DIFFUSERS;
}

/** Which component a single-file key belongs to, by its prefix; undefined for anything else. */
export function ldmComponentOf(key: string): Component | undefined {
  for (const component of ['unet', 'vae', 'text_encoder'] as const) {
    if (key.startsWith(LDM_PREFIX[component])) return component;
  }
  return undefined;
}

/**
 * All parameter keys of one component, in both layouts, generated from its config. Build one per
 * component and config; lookups are exact-key map reads.
 */
export class LdmKeyMap {
  readonly component: Component;
  /** The module map the keys were generated from (LDM paths without prefix). */
  readonly modules: readonly ModuleMapping[];
  readonly #entries: KeyMapping[] = [];
  readonly #byDiffusers = new Map<string, KeyMapping>();
  readonly #byLdm = new Map<string, KeyMapping>();

  /** Expands `modules` to parameter keys. Throws `Error` if two keys collide (a generator bug). */
  constructor(component: Component, modules: readonly ModuleMapping[]) {
    this.component = component;
    this.modules = modules;
    const prefix = LDM_PREFIX[component];
    for (const module of modules) {
      for (const layer of module.layers) {
        for (const param of layer.params) {
          const reshape = param === 'weight' ? layer.weightReshape : undefined;
          const mapping: KeyMapping = {
            diffusers: joinKey(module.diffusers, layer.diffusers, param),
            ldm: prefix + joinKey(module.ldm, layer.ldm, param),
            ...(reshape === undefined ? {} : { reshape }),
          };
          this.#entries.push(mapping);
          this.#index(this.#byDiffusers, mapping.diffusers, mapping);
          this.#index(this.#byLdm, mapping.ldm, mapping);
          if (layer.legacyDiffusers !== undefined) {
            this.#index(this.#byDiffusers, joinKey(module.diffusers, layer.legacyDiffusers, param), mapping);
          }
          if (module.legacyLdm !== undefined) {
            this.#index(this.#byLdm, prefix + joinKey(module.legacyLdm, layer.ldm, param), mapping);
          }
        }
      }
    }
  }

  /** For a UNet config from `parseUnetConfig` (which rejects invalid or non-SD configs). */
  static forUnet(config: UnetConfig): LdmKeyMap {
    return new LdmKeyMap('unet', unetModuleMap(config));
  }

  /** For a VAE config from `parseVaeConfig`. */
  static forVae(config: VaeConfig): LdmKeyMap {
    return new LdmKeyMap('vae', vaeModuleMap(config));
  }

  /** For a CLIP text config from `parseClipTextConfig` (SD 1.x `FrozenCLIPEmbedder` layout only). */
  static forTextEncoder(config: ClipTextConfig): LdmKeyMap {
    return new LdmKeyMap('text_encoder', textEncoderModuleMap(config));
  }

  /** Number of parameter keys. */
  get size(): number {
    return this.#entries.length;
  }

  /** Every parameter key pair, canonical names only. */
  entries(): readonly KeyMapping[] {
    return this.#entries;
  }

  /**
   * The single-file key for a diffusers key (relative to the component). Also accepts the legacy
   * VAE attention names of diffusers < 0.14 (`query`, `key`, `value`, `proj_attn`); the result then
   * names the canonical diffusers key. Undefined for keys the model does not have.
   */
  toLdm(diffusersKey: string): KeyMapping | undefined {
    return this.#byDiffusers.get(diffusersKey);
  }

  /**
   * The diffusers key for a full single-file key (with `LDM_PREFIX`). Also accepts text-encoder keys
   * without the `text_model.` level; the result then names the canonical single-file key. Undefined
   * for keys of other components, ignorable keys (`isIgnorableLdmKey`) and unknown keys.
   */
  toDiffusers(ldmKey: string): KeyMapping | undefined {
    return this.#byLdm.get(ldmKey);
  }

  #index(index: Map<string, KeyMapping>, key: string, mapping: KeyMapping): void {
    const existing = index.get(key);
    if (existing !== undefined) {
      throw new Error(
        `LdmKeyMap(${this.component}): generated key "${key}" collides: ` +
          `${existing.diffusers} ↔ ${existing.ldm} and ${mapping.diffusers} ↔ ${mapping.ldm}`,
      );
    }
    index.set(key, mapping);
  }
}
