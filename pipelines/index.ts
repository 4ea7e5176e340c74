/**
 * The public surface of `pipelines/`: what `cli/` and `electron/` may import.
 */
export { PipelineError, isPipelineError, type PipelineErrorCode } from './errors.ts';
export { engineModels, type SdModels, type TextEncoderModel, type DenoiserModel, type LatentDecoderModel, type PromptTokenizer } from './models.ts';
export { generate, lorasFromTags, type GeneratedImage, type GenerateProgress, type GenerateOptions, type GenerateResult, type AppliedLora, type RunInfo } from './text-to-image.ts';
export { normalizeJob, JOB_DEFAULTS, type GenerateJob, type JobInput, type JobLora, type LoraMode } from './job.ts';
export { encodePng, writeFileAtomic, toRgbBytes } from './images/save.ts';
export { imageMetadataTexts, chorusMetadata, imageInfotext, type ChorusImageMetadata } from './images/job-metadata.ts';
export { readImageMetadata, summarizeComfyGraph, type ImageMetadata } from './images/metadata.ts';
export { formatInfotext, parseInfotext, type InfotextParams, type ParsedInfotext } from './prompt/infotext.ts';
export { resolveSampler, A1111_SAMPLERS, A1111_SCHEDULE_TYPES } from './schedulers/index.ts';
