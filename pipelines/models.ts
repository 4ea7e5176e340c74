/**
 * The models as the pipelines see them: small interfaces, passed in, never imported. The engine
 * adapter at the bottom implements them on `Sd15Engine`; tests implement them with fakes that
 * record their calls.
 */
import { ClipTokenizer, type Sd15Engine, type Tensor } from '../models/index.ts';

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
  /** Token ids (B rows of 77) → hidden states (B, 77, D) at an A1111 clip skip. */
  encode(ids: readonly (readonly number[])[], clipSkip: number): Promise<Tensor<'float32'>>;
}

export interface DenoiserModel {
  /** One UNet evaluation: sample (B, C, h, w), one timestep for the batch, context (B, S, D) → ε (B, C, h, w). */
  predict(sample: Tensor<'float32'>, timestep: number, context: Tensor<'float32'>): Promise<Tensor<'float32'>>;
}

export interface LatentDecoderModel {
  /** UNet-space latents (B, C, h, w) → images in [0, 1] (B, 3, 8h, 8w). */
  decode(latents: Tensor<'float32'>): Promise<Tensor<'float32'>>;
}

export interface SdModels {
  readonly textEncoder: TextEncoderModel;
  readonly denoiser: DenoiserModel;
  readonly decoder: LatentDecoderModel;
  readonly latentChannels: number;
  /** Pixels per latent cell (8 for SD). */
  readonly vaeScale: number;
  readonly schedulerConfig: Readonly<Record<string, unknown>>;
}

/** The VAE downsamples by 2 per level except the last. */
function vaeScaleOf(levels: number): number {
  return 2 ** (levels - 1);
}

/** Adapt an opened engine to the pipeline interfaces. */
export function engineModels(engine: Sd15Engine): SdModels {
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
      async encode(ids, clipSkip) {
        const rows = ids.length;
        const cols = ids[0]?.length ?? 0;
        const data = new BigInt64Array(rows * cols);
        ids.forEach((row, r) => row.forEach((id, c) => (data[r * cols + c] = BigInt(id))));
        return engine.encodeTextAtClipSkip({ dtype: 'int64', shape: [rows, cols], data }, clipSkip);
      },
    },
    denoiser: {
      async predict(sample, timestep, context) {
        const out = await engine.runUnet({ sample, timestep: { dtype: 'float32', shape: [1], data: new Float32Array([timestep]) }, encoderHiddenStates: context });
        return out.noise_pred!;
      },
    },
    decoder: {
      async decode(latents) {
        return (await engine.decodeLatents(latents)).image01;
      },
    },
    latentChannels: engine.model.unet.inChannels,
    vaeScale: vaeScaleOf(engine.model.vae.blockOutChannels.length),
    schedulerConfig: engine.model.schedulerConfig,
  };
}
