/**
 * The models as the pipelines see them: small interfaces, passed in, never imported. The engine
 * adapter at the bottom implements them on `Sd15Engine`; tests implement them with fakes that
 * record their calls.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { PipelineError } from './errors.ts';
import { ClipTokenizer, ntXentFeeds, resolveLoraName, scanLoraFolders, type AdapterUse, type LoadedLora, type LoraLibraryEntry, type RegionInputs, type Sd15Engine, type Tensor, type UnetInput, type UnetVariant } from '../models/index.ts';

/** What prompt processing needs from the tokenizer. */
export interface PromptTokenizer {
  /** Content token ids of a text fragment (no BOS/EOS, no truncation). */
  encode(text: string): number[];
  readonly bosId: number;
  readonly eosId: number;
  readonly padId: number;
  /** Id of `,</w>` (A1111 moves text after a nearby comma to the next chunk). */
  readonly commaId: number | undefined;
}

export interface TextEncoderModel {
  readonly tokenizer: PromptTokenizer;
  /** Number of transformer layers (clip skip is 1…layers). */
  readonly layers: number;
  /** Token ids (B rows of 77) → hidden states (B, 77, D) at an A1111 clip skip, with LoRAs if given. */
  encode(ids: readonly (readonly number[])[], clipSkip: number, adapters?: AdapterUse): Promise<Tensor<'float32'>>;
}

/** One UNet evaluation. */
export interface DenoiseRequest {
  /** (B, C, h, w) */
  readonly sample: Tensor<'float32'>;
  /** One timestep for the whole batch. */
  readonly timestep: number;
  /** (B, S, D) text conditioning. */
  readonly context: Tensor<'float32'>;
  readonly adapters?: AdapterUse;
  /** Run the shallow pass on this cached deep feature (B, C₁, h, w) instead of the full UNet. */
  readonly deepFeature?: Tensor<'float32'>;
  /** Return the deep feature of this (full) pass for a later shallow pass. */
  readonly wantDeepFeature?: boolean;
  /** Region slots (the regions UNet variant). */
  readonly regions?: RegionInputs;
  /** With regions: LoRA-Composer's self-attention isolation between the regions. */
  readonly regionIsolation?: boolean;
  /** With regions and LoRAs: each slot's output through its own to_out.0 adapters (LoRA-Composer). */
  readonly regionOutputAdapters?: boolean;
  /** Also return the head- and layer-averaged attention maps of the 1/32 grid (UNet level 2). */
  readonly attentionMaps?: boolean;
}

/** The 1/32-grid attention maps of one call: xattn (B, N, S), selfattn (B, N, N), xattnRegion (B, R, N, S_r) with regions. */
export interface DenoiseMaps {
  readonly xattn: Tensor<'float32'>;
  readonly selfattn: Tensor<'float32'>;
  readonly xattnRegion?: Tensor<'float32'>;
}

export interface DenoiseResult {
  /** ε (B, C, h, w) */
  readonly noisePred: Tensor<'float32'>;
  readonly deepFeature?: Tensor<'float32'>;
  /** When asked for with `attentionMaps`. */
  readonly maps?: DenoiseMaps;
}

/** ∂L/∂(maps) of one call, shaped like its `DenoiseMaps`. */
export interface DenoiseCotangents {
  readonly xattn: Tensor<'float32'>;
  readonly selfattn: Tensor<'float32'>;
  readonly xattnRegion?: Tensor<'float32'>;
}

export interface DenoiserModel {
  predict(request: DenoiseRequest): Promise<DenoiseResult>;
  /** Free the memory of the gradient passes (VJP sessions); they are rebuilt on the next use. */
  releaseGradientPasses?(): Promise<void>;
  /** Free the memory of the forward passes (`predict`, `maps`); they are rebuilt on the next use. */
  releaseForwardPasses?(): Promise<void>;
  /**
   * The caller will release and rebuild passes in this process (`exclusivePasses`), or no longer
   * (`false`): make rebuilds cheap (the engine keeps ONNX Runtime's optimized copies of the sessions
   * it builds meanwhile).
   */
  expectRebuilds?(on: boolean): void;
  /** The 1/32-grid maps only, from the UNet truncated after its last 1/32-grid layer (gradient-guided strategies). */
  maps?(request: DenoiseRequest): Promise<DenoiseMaps>;
  /**
   * ∂L/∂sample for L = Σ ⟨cotangents, maps⟩, with the maps (gradient-guided strategies). Callers add
   * up `gradSample` over the elements that read the same sample: elements with equal sample and
   * LoRA mix may come back merged (the group's sum on one element, zeros on the others; the engine
   * then runs their layers before the first cross-attention once). Likewise `ntXentVjp`.
   */
  vjp?(request: DenoiseRequest, cotangents: DenoiseCotangents): Promise<{ maps: DenoiseMaps; gradSample: Tensor<'float32'> }>;
  /**
   * CLoRA's update in one pass: L = Σ_images NT-Xent of the xattn maps (computed in the graph from
   * `loss.feeds`, see `ntXentFeeds`), its per-image values, ∂L/∂sample and the xattn maps.
   * `noisePred`: through the whole-UNet graph, also returning ε; with `skipNoisePred` too, the same
   * graph (session) but ε is not needed this call (the engine skips the layers after the maps where
   * it can, and returns no ε).
   */
  ntXentVjp?(
    request: DenoiseRequest,
    loss: { readonly temperature: number; readonly feeds: Readonly<Record<string, Tensor>>; readonly noisePred?: boolean; readonly skipNoisePred?: boolean },
  ): Promise<{ xattn: Tensor<'float32'>; loss: Float32Array; gradSample: Tensor<'float32'>; noisePred?: Tensor<'float32'> }>;
  /**
   * A forward pass (ε, and the xattn maps when asked for; `maps.selfattn` is then empty) through the
   * session `ntXentVjp` uses with this temperature, its backward skipped: a machine that holds one
   * UNet session only keeps it for CLoRA's forward-only steps too (`exclusivePasses`). Undefined
   * when this denoiser cannot (no such graph on its device, or a request the graph has no inputs
   * for: regions, deep features).
   */
  ntXentForward?(request: DenoiseRequest, loss: { readonly temperature: number }): Promise<DenoiseResult | undefined>;
}

export interface LatentDecoderModel {
  /** UNet-space latents (B, C, h, w) → images in [0, 1] (B, 3, 8h, 8w). */
  decode(latents: Tensor<'float32'>): Promise<Tensor<'float32'>>;
}

/** A LoRA file found by name or path. */
export interface ResolvedLoraFile {
  readonly path: string;
  /** The name the infotext uses (A1111: the file stem, or the alias it was called by). */
  readonly name: string;
  /** A1111's short hash (12 hex of the sha256 after the header). */
  readonly shortHash: string;
}

export interface LoraProvider {
  /** Find a LoRA by file stem, `ss_output_name` alias or path. Throws when unknown or ambiguous. */
  resolve(nameOrPath: string): Promise<ResolvedLoraFile>;
  /** Read and match a LoRA file against the model. */
  load(path: string): LoadedLora;
}

export interface SdModels {
  readonly textEncoder: TextEncoderModel;
  readonly denoiser: DenoiserModel;
  readonly decoder: LatentDecoderModel;
  readonly latentChannels: number;
  /** Pixels per latent cell (8 for SD). */
  readonly vaeScale: number;
  /** UNet levels (resolutions): 4 for SD 1.5. */
  readonly unetLevels: number;
  readonly schedulerConfig: Readonly<Record<string, unknown>>;
  readonly loras: LoraProvider;
  /** Where pipelines may cache derived data (e.g. CMLoRA frequency scores). */
  readonly cacheDir?: string;
}

/** The VAE downsamples by 2 per level except the last. */
function vaeScaleOf(levels: number): number {
  return 2 ** (levels - 1);
}

/**
 * LoRAs by name from library folders (scanned on first use), or by path. Hashes are computed when a
 * LoRA is used, with the library's hash cache in the engine's cache folder.
 */
function libraryLoraProvider(engine: Sd15Engine, loraDirs: readonly string[]): LoraProvider {
  let entries: Promise<LoraLibraryEntry[]> | undefined;
  const cache = path.join(engine.cacheDir, 'lora-hashes.json');
  return {
    async resolve(nameOrPath) {
      const isPath = nameOrPath.endsWith('.safetensors') && fs.existsSync(nameOrPath);
      const roots = isPath ? [path.dirname(path.resolve(nameOrPath))] : loraDirs;
      if (!isPath && roots.length === 0) {
        throw new PipelineError('BAD_ARGUMENT', `LoRA "${nameOrPath}": no LoRA folder is set. Pass --lora-dir <folder> (an A1111 or ComfyUI install works) or a path to the .safetensors file.`, { lora: nameOrPath });
      }
      const list = isPath ? await scanLoraFolders(roots, { hashes: true, cache }) : await (entries ??= scanLoraFolders(roots, { cache }));
      const entry = resolveLoraName(list, isPath ? path.resolve(nameOrPath) : nameOrPath);
      if (entry === undefined) {
        throw new PipelineError('BAD_ARGUMENT', `LoRA "${nameOrPath}" is not in ${roots.join(', ')} (looked for a file stem or ss_output_name alias).`, { lora: nameOrPath, folders: roots });
      }
      const hashed = entry.shortHash !== undefined ? entry : (await scanLoraFolders([entry.root], { hashes: true, cache })).find((e) => e.path === entry.path) ?? entry;
      return { path: entry.path, name: isPath ? entry.name : nameOrPath, shortHash: hashed.shortHash ?? '' };
    },
    load: (file) => engine.loadLora(file),
  };
}

/** The UNet level of the gradient-guided methods' maps: the 1/32 grid. */
const MAPS_LEVEL = 2;

function unetInput({ sample, timestep, context, deepFeature, regions }: DenoiseRequest): UnetInput {
  return {
    sample,
    timestep: { dtype: 'float32', shape: [1], data: new Float32Array([timestep]) },
    encoderHiddenStates: context,
    ...(deepFeature === undefined ? {} : { deepFeature }),
    ...(regions === undefined ? {} : { regions }),
  };
}

function regionVariant(request: DenoiseRequest): { regions: true; selfAttentionIsolation?: true; regionOutputAdapters?: true } {
  return { regions: true, ...(request.regionIsolation === true ? { selfAttentionIsolation: true } : {}), ...(request.regionOutputAdapters === true ? { regionOutputAdapters: true } : {}) };
}

function mapsOf(out: Record<string, Tensor<'float32'>>): DenoiseMaps {
  return { xattn: out.xattn!, selfattn: out.selfattn!, ...(out.xattn_region === undefined ? {} : { xattnRegion: out.xattn_region }) };
}

/** Adapt an opened engine to the pipeline interfaces. */
export function engineModels(engine: Sd15Engine, options: { loraDirs?: readonly string[] } = {}): SdModels {
  let tokenizer: ClipTokenizer | undefined;
  const tok = (): ClipTokenizer => (tokenizer ??= engine.model.loadTokenizer());
  const promptTokenizer: PromptTokenizer = {
    encode: (text) => tok().encode(text),
    get bosId() {
      return tok().bosId;
    },
    get eosId() {
      return tok().eosId;
    },
    get padId() {
      return tok().padId;
    },
    get commaId() {
      const ids = tok().encode(',');
      return ids.length === 1 ? ids[0] : undefined;
    },
  };
  return {
    textEncoder: {
      tokenizer: promptTokenizer,
      layers: engine.model.textEncoder.numHiddenLayers,
      async encode(ids, clipSkip, adapters) {
        const rows = ids.length;
        const cols = ids[0]?.length ?? 0;
        const data = new BigInt64Array(rows * cols);
        ids.forEach((row, r) => row.forEach((id, c) => (data[r * cols + c] = BigInt(id))));
        return engine.encodeTextAtClipSkip({ dtype: 'int64', shape: [rows, cols], data }, clipSkip, adapters);
      },
    },
    denoiser: {
      async predict(request) {
        const { deepFeature, wantDeepFeature, regions, attentionMaps } = request;
        // A CFG pair's halves (same latent, LoRA mix and timestep) share the layers before the first cross-attention.
        const variant: UnetVariant = {
          ...(regions !== undefined ? regionVariant(request) : { sharedPrefix: true, ...(deepFeature !== undefined ? { shallow: true } : wantDeepFeature === true ? { deepFeature: true } : {}) }),
          ...(attentionMaps === true ? { attentionMaps: { level: MAPS_LEVEL } } : {}),
        };
        const out = await engine.runUnet(unetInput(request), variant, request.adapters);
        return {
          noisePred: out.noise_pred!,
          ...(out.deep_feature === undefined ? {} : { deepFeature: out.deep_feature }),
          ...(attentionMaps === true ? { maps: mapsOf(out) } : {}),
        };
      },
      async releaseGradientPasses() {
        await engine.releaseGradientSessions();
      },
      async releaseForwardPasses() {
        engine.releaseUnetSessions();
      },
      expectRebuilds(on) {
        engine.expectSessionRebuilds(on);
      },
      async maps(request) {
        const variant: UnetVariant = { ...(request.regions === undefined ? {} : regionVariant(request)), attentionMaps: { level: MAPS_LEVEL }, mapsOnly: true };
        return mapsOf(await engine.runUnet(unetInput(request), variant, request.adapters));
      },
      async vjp(request, cotangents) {
        const out = await engine.runUnetVjp(unetInput(request), cotangents, request.adapters, { level: MAPS_LEVEL, mergeDuplicateSamples: true, ...(request.regions === undefined ? {} : regionVariant(request)) });
        return { maps: { xattn: out.xattn, selfattn: out.selfattn, ...(out.xattnRegion === undefined ? {} : { xattnRegion: out.xattnRegion }) }, gradSample: out.gradSample };
      },
      async ntXentForward(request, loss) {
        if (request.regions !== undefined || request.deepFeature !== undefined || request.wantDeepFeature === true || !(await engine.gradientGraphSkipsBackward())) return undefined;
        const empty: Tensor<'float32'> = { dtype: 'float32', shape: [0], data: new Float32Array() };
        // The loss is computed and ignored: any valid picks do (row 0 of the maps).
        const feeds = ntXentFeeds([{ slot: 0, token: 0, label: 0 }], 1, request.context.shape[1]!, () => 0);
        const out = await engine.runUnetVjp(unetInput(request), { xattn: empty, selfattn: empty }, request.adapters, { level: MAPS_LEVEL, mergeDuplicateSamples: true, ntxent: { temperature: loss.temperature, feeds, noisePred: true, skipGradient: true } });
        return { noisePred: out.noisePred!, ...(request.attentionMaps === true ? { maps: { xattn: out.xattn, selfattn: empty } } : {}) };
      },
      async ntXentVjp(request, loss) {
        const empty: Tensor<'float32'> = { dtype: 'float32', shape: [0], data: new Float32Array() };
        const out = await engine.runUnetVjp(unetInput(request), { xattn: empty, selfattn: empty }, request.adapters, { level: MAPS_LEVEL, mergeDuplicateSamples: true, ntxent: loss });
        return { xattn: out.xattn, loss: out.ntxentLoss!.data, gradSample: out.gradSample, ...(out.noisePred === undefined ? {} : { noisePred: out.noisePred }) };
      },
    },
    decoder: {
      async decode(latents) {
        return (await engine.decodeLatents(latents)).image01;
      },
    },
    latentChannels: engine.model.unet.inChannels,
    vaeScale: vaeScaleOf(engine.model.vae.blockOutChannels.length),
    unetLevels: engine.model.unet.blockOutChannels.length,
    schedulerConfig: engine.model.schedulerConfig,
    loras: libraryLoraProvider(engine, options.loraDirs ?? []),
    cacheDir: engine.cacheDir,
  };
}
