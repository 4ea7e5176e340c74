/**
 * The public surface of `pipelines/`: what `cli/` and `electron/` may import.
 */
export { PipelineError, isPipelineError, type PipelineErrorCode } from './errors.ts';
export { engineModels, type SdModels, type TextEncoderModel, type DenoiserModel, type LatentDecoderModel, type PromptTokenizer } from './models.ts';
export { generate, lorasFromTags, type GeneratedImage, type GenerateProgress, type GenerateOptions, type GenerateResult, type AppliedLora, type RunInfo, type MemoryPlan } from './text-to-image.ts';
export { normalizeJob, JOB_DEFAULTS, type GenerateJob, type JobInput, type JobLora, type JobRegion, type LoraMode } from './job.ts';
export { encodePng, writeFileAtomic, toRgbBytes } from './images/save.ts';
export { imageMetadataTexts, chorusMetadata, imageInfotext, type ChorusImageMetadata } from './images/job-metadata.ts';
export { readImageMetadata, summarizeComfyGraph, type ImageMetadata } from './images/metadata.ts';
export { formatInfotext, parseInfotext, type InfotextParams, type ParsedInfotext } from './prompt/infotext.ts';
export { resolveSampler, A1111_SAMPLERS, A1111_SCHEDULE_TYPES } from './schedulers/index.ts';
export { installLoraFolders, outputNamer } from './api/output-files.ts';
export { EngineHost, defaultSettingsFile, toApiError, type EngineHostOptions } from './api/handlers.ts';
export { OPERATIONS, isOpName, validatePayload, memorySizeBytes, ApiFailure, type ApiError, type ApiEvent, type ApiResponse, type OpName, type Operations, type Settings } from './api/contract.ts';
export { parseJobSpec, serializeJobSpec, readJobsFile, JOB_SPEC_VERSION, type JobSpecV1, type JobEntry } from './jobs/schema.ts';
export { parseGridSpec, expandGrid, composeGridImage, type GridSpec } from './jobs/grid.ts';
export { generateBatched, batchKey } from './jobs/batched.ts';
export { JobQueue, JOB_STATES, defaultQueueFile, defaultDataDir, type JobState, type QueuedJob, type BatchRecord, type ControlResult } from './queue/store.ts';
export { runQueue, DEFAULT_MAX_BATCH, type RunnerEvent, type RunSummary } from './queue/runner.ts';
export { engineModelSource, type ModelSource } from './queue/model-source.ts';
export { planBatch, openBatch, composeBatchGrids, type BatchPlan } from './queue/batch-file.ts';
export { QueueError, isQueueError, type QueueErrorCode } from './queue/errors.ts';
export { STRATEGY_NAMES, STRATEGY_SUMMARIES, type StrategySpec, type StrategyName } from './strategies/index.ts';
