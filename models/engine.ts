/**
 * The SD engine: an opened model plus lazily created ONNX Runtime sessions for its four graphs
 * (text encoder, UNet, VAE decoder, VAE encoder), built from the model's own configs and weights and
 * cached on disk. This is what `pipelines/` receives (as interfaces) and what `chorus debug run` uses.
 *
 * Inputs are checked here, once, against the model's configs (shapes and dtypes), with typed errors
 * naming the input.
 */
import { ModelError } from './errors.ts';
import { defaultCacheDir, prepareModelFiles } from './cache.ts';
import { openModel, type OpenedModel, type OpenModelOptions } from './model.ts';
import { buildClipTextGraph } from './networks/clip-text.ts';
import { buildUnetGraph } from './networks/unet.ts';
import { buildVaeDecoderGraph, buildVaeEncoderGraph } from './networks/vae.ts';
import type { Graph } from './onnx/builder.ts';
import { OrtSession, type Device, type ProviderChoice } from './runtime.ts';
import type { Tensor } from './tensor.ts';
import { toFloat32 } from './tensor.ts';
import { bindWeights, type BindReport } from './weights.ts';
import type { Component } from './keys/ldm.ts';

export type GraphKind = 'text_encoder' | 'unet' | 'vae_decoder' | 'vae_encoder';

export interface EngineOptions extends OpenModelOptions {
  readonly device?: Device;
  readonly cacheDir?: string;
  readonly threads?: number;
}

export interface UnetVariant {
  /** Attention modules whose probabilities to output (`attn_probs.<module>`). */
  readonly attentionProbs?: readonly string[];
  readonly debugOutputs?: boolean;
}

export interface TextEncoderVariant {
  /** An A1111 clip skip ≥ 3 to output as `clip_skip_<k>` (1 and 2 are always there). */
  readonly clipSkip?: number;
}

export type GraphVariant = UnetVariant & TextEncoderVariant;

export interface TextEncoderOutput {
  readonly lastHiddenState: Tensor<'float32'>;
  readonly penultimateRaw: Tensor<'float32'>;
  readonly penultimateFinalLn: Tensor<'float32'>;
}

export interface UnetInput {
  /** (B, C_in, h, w) */
  readonly sample: Tensor;
  /** (), (1) or (B); integer or fractional values. */
  readonly timestep: Tensor;
  /** (B, 77·k, cross_attention_dim) */
  readonly encoderHiddenStates: Tensor;
}

const COMPONENT_OF: Readonly<Record<GraphKind, Component>> = { text_encoder: 'text_encoder', unet: 'unet', vae_decoder: 'vae', vae_encoder: 'vae' };

function f32(t: Tensor): Tensor<'float32'> {
  return t.dtype === 'float32' ? (t as Tensor<'float32'>) : { dtype: 'float32', shape: t.shape, data: toFloat32(t) };
}

export class Sd15Engine {
  readonly model: OpenedModel;
  readonly device: Device;
  readonly cacheDir: string;
  readonly #threads: number | undefined;
  readonly #sessions = new Map<string, Promise<OrtSession>>();
  readonly #reports = new Map<GraphKind, BindReport>();

  private constructor(model: OpenedModel, options: EngineOptions) {
    this.model = model;
    this.device = options.device ?? 'auto';
    this.cacheDir = options.cacheDir ?? defaultCacheDir();
    this.#threads = options.threads;
  }

  /** Open a model (diffusers folder or single file). Sessions are created on first use. */
  static open(modelPath: string, options: EngineOptions = {}): Sd15Engine {
    return new Sd15Engine(openModel(modelPath, options), options);
  }

  /** The binder's report for a graph that has been loaded (unexpected keys, dtype conversions). */
  bindReport(kind: GraphKind): BindReport | undefined {
    return this.#reports.get(kind);
  }

  buildGraph(kind: GraphKind, variant: GraphVariant = {}): Graph {
    switch (kind) {
      case 'text_encoder':
        return buildClipTextGraph(this.model.textEncoder, variant.clipSkip !== undefined && variant.clipSkip >= 3 ? { extraClipSkips: [variant.clipSkip] } : {});
      case 'unet':
        return buildUnetGraph(this.model.unet, variant);
      case 'vae_decoder':
        return buildVaeDecoderGraph(this.model.vae);
      case 'vae_encoder':
        return buildVaeEncoderGraph(this.model.vae);
    }
  }

  /** The session for a graph (and UNet variant), building and caching it on first use. */
  session(kind: GraphKind, variant: GraphVariant = {}): Promise<OrtSession> {
    const key = `${kind}|${JSON.stringify(variant)}`;
    let s = this.#sessions.get(key);
    if (s === undefined) {
      s = this.#createSession(kind, variant);
      this.#sessions.set(key, s);
      s.catch(() => this.#sessions.delete(key));
    }
    return s;
  }

  /** Which execution provider the sessions use and why (after the first session exists). */
  async providerChoice(): Promise<ProviderChoice | undefined> {
    const first = this.#sessions.values().next();
    return first.done === true ? undefined : (await first.value).choice;
  }

  async #createSession(kind: GraphKind, variant: GraphVariant): Promise<OrtSession> {
    const graph = this.buildGraph(kind, variant);
    const bound = bindWeights(graph.params, this.model.weights(COMPONENT_OF[kind]));
    this.#reports.set(kind, bound.report);
    const prepared = prepareModelFiles(graph, bound, { cacheDir: this.cacheDir, component: kind });
    return OrtSession.create(prepared.modelPath, { device: this.device, ...(this.#threads === undefined ? {} : { threads: this.#threads }) });
  }

  /** CLIP text encoder on token ids (B, S), S ≤ max_position_embeddings. */
  async encodeText(inputIds: Tensor): Promise<TextEncoderOutput> {
    const ids = this.#checkIds(inputIds);
    const out = await (await this.session('text_encoder')).run({ input_ids: ids });
    return {
      lastHiddenState: f32(out.last_hidden_state!),
      penultimateRaw: f32(out.penultimate_raw!),
      penultimateFinalLn: f32(out.penultimate_final_ln!),
    };
  }

  /**
   * The text conditioning at an A1111 clip skip: 1 = the last layer, N ≥ 2 = final_layer_norm of
   * hidden_states[−N]. Throws SHAPE_MISMATCH (input `clip_skip`) for N outside 1…layers.
   */
  async encodeTextAtClipSkip(inputIds: Tensor, clipSkip: number): Promise<Tensor<'float32'>> {
    const layers = this.model.textEncoder.numHiddenLayers;
    if (!Number.isInteger(clipSkip) || clipSkip < 1 || clipSkip > layers) {
      throw new ModelError('SHAPE_MISMATCH', `clip skip ${clipSkip} is outside 1…${layers} for this ${layers}-layer text encoder.`, { input: 'clip_skip', clipSkip });
    }
    const ids = this.#checkIds(inputIds);
    if (clipSkip <= 2) {
      const out = await this.encodeText(ids);
      return clipSkip === 1 ? out.lastHiddenState : out.penultimateFinalLn;
    }
    const out = await (await this.session('text_encoder', { clipSkip })).run({ input_ids: ids }, [`clip_skip_${clipSkip}`]);
    return f32(out[`clip_skip_${clipSkip}`]!);
  }

  #checkIds(inputIds: Tensor): Tensor<'int64'> {
    const c = this.model.textEncoder;
    if (inputIds.shape.length !== 2 || inputIds.shape[1]! > c.maxPositionEmbeddings || inputIds.shape[1]! < 1) {
      throw new ModelError('SHAPE_MISMATCH', `input_ids must be (batch, ≤${c.maxPositionEmbeddings}) token ids, got [${inputIds.shape.join(', ')}].`, { input: 'input_ids', shape: inputIds.shape });
    }
    const ids: Tensor<'int64'> =
      inputIds.dtype === 'int64' ? (inputIds as Tensor<'int64'>) : { dtype: 'int64', shape: inputIds.shape, data: BigInt64Array.from(toFloat32(inputIds), (v) => BigInt(Math.round(v))) };
    for (const id of ids.data) {
      if (id < 0n || id >= BigInt(c.vocabSize)) throw new ModelError('SHAPE_MISMATCH', `input_ids holds token id ${id}, outside the vocabulary (0…${c.vocabSize - 1}).`, { input: 'input_ids' });
    }
    return ids;
  }

  /** One UNet evaluation. Returns `noise_pred` and any requested taps / debug outputs by name. */
  async runUnet(input: UnetInput, variant: UnetVariant = {}): Promise<Record<string, Tensor<'float32'>>> {
    const c = this.model.unet;
    const { sample, encoderHiddenStates: ctx } = input;
    if (sample.shape.length !== 4 || sample.shape[1] !== c.inChannels) {
      throw new ModelError('SHAPE_MISMATCH', `sample must be (batch, ${c.inChannels}, height/8, width/8), got [${sample.shape.join(', ')}].`, { input: 'sample', shape: sample.shape });
    }
    const batch = sample.shape[0]!;
    if (ctx.shape.length !== 3 || ctx.shape[0] !== batch || ctx.shape[2] !== c.crossAttentionDim[0]) {
      throw new ModelError('SHAPE_MISMATCH', `encoder_hidden_states must be (${batch}, tokens, ${c.crossAttentionDim[0]}), got [${ctx.shape.join(', ')}].`, {
        input: 'encoder_hidden_states',
        shape: ctx.shape,
      });
    }
    const t = f32(input.timestep);
    if (t.data.length !== 1 && t.data.length !== batch) {
      throw new ModelError('SHAPE_MISMATCH', `timestep must hold 1 or ${batch} values, got ${t.data.length}.`, { input: 'timestep', shape: t.shape });
    }
    const session = await this.session('unet', variant);
    const out = await session.run({ sample: f32(sample), timestep: { dtype: 'float32', shape: [t.data.length], data: t.data }, encoder_hidden_states: f32(ctx) });
    const result: Record<string, Tensor<'float32'>> = {};
    for (const [k, v] of Object.entries(out)) result[k] = f32(v);
    return result;
  }

  /** VAE decoder on UNet-space latents (B, 4, h, w) → `decoder_output` and `image01` (B, 3, 8h, 8w). */
  async decodeLatents(latents: Tensor): Promise<{ decoderOutput: Tensor<'float32'>; image01: Tensor<'float32'> }> {
    const c = this.model.vae;
    if (latents.shape.length !== 4 || latents.shape[1] !== c.latentChannels) {
      throw new ModelError('SHAPE_MISMATCH', `latents must be (batch, ${c.latentChannels}, h, w), got [${latents.shape.join(', ')}].`, { input: 'latents_scaled', shape: latents.shape });
    }
    const out = await (await this.session('vae_decoder')).run({ latents_scaled: f32(latents) });
    return { decoderOutput: f32(out.decoder_output!), image01: f32(out.image01!) };
  }

  /** VAE encoder on images (B, 3, H, W) in [-1, 1]. */
  async encodeImage(image: Tensor): Promise<{ mean: Tensor<'float32'>; logvar: Tensor<'float32'>; std: Tensor<'float32'>; moments: Tensor<'float32'> }> {
    const c = this.model.vae;
    if (image.shape.length !== 4 || image.shape[1] !== c.inChannels) {
      throw new ModelError('SHAPE_MISMATCH', `image must be (batch, ${c.inChannels}, H, W), got [${image.shape.join(', ')}].`, { input: 'image', shape: image.shape });
    }
    const out = await (await this.session('vae_encoder')).run({ image: f32(image) });
    return { mean: f32(out.mean!), logvar: f32(out.logvar!), std: f32(out.std!), moments: f32(out.moments!) };
  }

  async dispose(): Promise<void> {
    const sessions = [...this.#sessions.values()];
    this.#sessions.clear();
    for (const s of sessions) {
      try {
        await (await s).dispose();
      } catch {
        // A session that failed to build has nothing to release.
      }
    }
    this.model.close();
  }
}
