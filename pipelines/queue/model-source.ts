/**
 * Where a queue runner gets models: an `Sd15Engine` per model path, opened on first use and kept
 * while consecutive jobs use the same model (one engine at a time, so a queue mixing checkpoints
 * holds one in memory).
 */
import { Sd15Engine, loraFoldersOf, type EngineOptions, type OpenedModel } from '../../models/index.ts';
import { installLoraFolders } from '../api/output-files.ts';
import { engineModels, type SdModels } from '../models.ts';

export interface OpenedModelSet {
  readonly models: SdModels;
  /** For the image metadata. */
  readonly model: Pick<OpenedModel, 'path' | 'format'>;
}

/** Models by path; owns what it opens until `dispose`. */
export interface ModelSource {
  open(modelPath: string): Promise<OpenedModelSet>;
  dispose(): Promise<void>;
}

export interface EngineModelSourceOptions {
  readonly engine: EngineOptions;
  /** LoRA folders (or A1111/ComfyUI installs) searched by name, besides the model's own install and CHORUS_LORA_DIRS. */
  readonly loraDirs?: readonly string[];
}

export function engineModelSource(options: EngineModelSourceOptions): ModelSource {
  let current: { path: string; engine: Sd15Engine; set: OpenedModelSet } | undefined;
  const folders = (options.loraDirs ?? []).flatMap((d) => loraFoldersOf(d));
  return {
    async open(modelPath) {
      if (current?.path === modelPath) return current.set;
      if (current !== undefined) {
        const old = current.engine;
        current = undefined;
        await old.dispose();
      }
      const engine = Sd15Engine.open(modelPath, options.engine);
      current = { path: modelPath, engine, set: { models: engineModels(engine, { loraDirs: [...folders, ...installLoraFolders(modelPath)] }), model: engine.model } };
      return current.set;
    },
    async dispose() {
      const engine = current?.engine;
      current = undefined;
      await engine?.dispose();
    },
  };
}
