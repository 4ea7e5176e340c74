/**
 * A cheap step preview: SD latents → RGB by a fixed linear map, no VAE and no extra weights.
 *
 * Each pixel's 4 latent channels are multiplied by a 4×3 matrix, then mapped from [−1, 1] to [0, 1]:
 *   rgb = clamp((zᵀ · M + 1) / 2, 0, 1)
 * M are the published "latent2rgb" factors for SD 1.x latents in UNet space (the VAE latents times
 * 0.18215, which is what the sampler carries), as ComfyUI's `latent_formats.SD15.latent_rgb_factors`
 * lists them (comfy/latent_formats.py; a least-squares fit of VAE-decoded colours on latent values).
 * One pixel per latent cell (8×8 image pixels), upscaled with a smooth kernel for display.
 *
 * The previewed latents are x_t after each scheduler step, not the denoised x̂₀, so early previews
 * are noisy; the last one is the final latent.
 */
import sharp from 'sharp';

/** Rows: latent channel 0…3; columns: R, G, B. */
export const SD15_LATENT_RGB: ReadonlyArray<readonly [number, number, number]> = [
  [0.3512, 0.2297, 0.3227],
  [0.325, 0.4974, 0.235],
  [-0.2829, 0.1762, 0.2721],
  [-0.212, -0.2616, -0.7177],
];

const LATENT_CHANNELS = 4;

/** First image of a (B, 4, h, w) flat latent batch → h×w RGB bytes. */
export function latentToRgb(latents: Float32Array, latentHeight: number, latentWidth: number): Uint8Array {
  const plane = latentHeight * latentWidth;
  if (latents.length < LATENT_CHANNELS * plane) throw new Error(`latentToRgb: ${latents.length} values, need ${LATENT_CHANNELS * plane} for 4×${latentHeight}×${latentWidth}`);
  const rgb = new Uint8Array(plane * 3);
  for (let p = 0; p < plane; p++) {
    for (let c = 0; c < 3; c++) {
      let s = 0;
      for (let k = 0; k < LATENT_CHANNELS; k++) s += latents[k * plane + p]! * SD15_LATENT_RGB[k]![c]!;
      rgb[p * 3 + c] = Math.round(Math.min(1, Math.max(0, (s + 1) / 2)) * 255);
    }
  }
  return rgb;
}

/** Longest side of a preview image in pixels: enough to judge composition, small on the wire. */
export const PREVIEW_MAX_SIDE_PX = 256;

/** A PNG data URL of the preview, scaled to the image's aspect ratio (longest side ≤ 256 px). */
export async function latentPreviewDataUrl(latents: Float32Array, latentHeight: number, latentWidth: number): Promise<string> {
  const rgb = latentToRgb(latents, latentHeight, latentWidth);
  const scale = PREVIEW_MAX_SIDE_PX / Math.max(latentHeight, latentWidth);
  const png = await sharp(Buffer.from(rgb.buffer, rgb.byteOffset, rgb.byteLength), { raw: { width: latentWidth, height: latentHeight, channels: 3 } })
    .resize(Math.max(1, Math.round(latentWidth * scale)), Math.max(1, Math.round(latentHeight * scale)), { kernel: 'cubic' })
    .png({ compressionLevel: 3 })
    .toBuffer();
  return `data:image/png;base64,${png.toString('base64')}`;
}
