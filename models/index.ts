/**
 * The public surface of `models/`: what `pipelines/`, `cli/` and `electron/` may import.
 */
export { ModelError, isModelError, type ModelErrorCode } from './errors.ts';
export { type DType, type Tensor, numel, tensor, toFloat32 } from './tensor.ts';
export { SafetensorsFile, openSafetensors, writeSafetensors, encodeSafetensors, type TensorInfo } from './safetensors.ts';
export { ClipTokenizer } from './tokenizer/clip.ts';
export { openModel, type OpenedModel, type OpenModelOptions, type ModelFormat } from './model.ts';
export { detectCheckpoint, type CheckpointDetection, type CheckpointKind } from './single-file.ts';
export { Sd15Engine, AdapterStack, type AdapterUse, type StackEntry, type EngineOptions, type GraphKind, type UnetVariant, type RegionInputs, type TextEncoderVariant, type GraphVariant, type UnetInput, type TextEncoderOutput, type UnetCotangents, type UnetVjpVariant, type UnetVjpOutput } from './engine.ts';
export { DEVICES, providerCandidates, ortVersion, type Device, type ProviderChoice } from './runtime.ts';
export { defaultCacheDir } from './cache.ts';
export { dumpGraph } from './onnx/dump.ts';
export type { UnetConfig, ClipTextConfig, VaeConfig } from './networks/config.ts';
export { ntXentFeeds, type NtXentEntry } from './networks/ntxent-graph.ts';
export { KEEP_PROBS_BYTES, type AttentionBackward } from './networks/unet-vjp.ts';
export { type LoadedLora, type CoverageReport, type LoraFormat } from './lora/load.ts';
export type { LoraModule, LoraTarget, LoraComponent } from './lora/types.ts';
export { scanLoraFolders, loraFoldersOf, resolveLoraName, addnetShortHash, type LoraLibraryEntry, type ScanOptions } from './lora/library.ts';
