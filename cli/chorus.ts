/**
 * `chorus` — the command-line entry. Thin: parses arguments, calls handlers, prints results and
 * typed errors (`error [CODE]: message`). Exit codes: 0 ok, 1 a typed error (bad model, bad input),
 * 2 a usage error.
 */
import { isModelError } from '../models/index.ts';
import { isPipelineError, isQueueError } from '../pipelines/index.ts';
import { runDebug } from './commands/debug.ts';
import { runInspect } from './commands/inspect.ts';
import { runGenerate } from './commands/generate.ts';
import { runBatch } from './commands/batch.ts';
import { runQueueCommand } from './commands/queue.ts';
import { runServe } from './commands/serve.ts';
import { UsageError } from './args.ts';

const HELP = `chorus — compose several LoRAs in one Stable Diffusion 1.5 image, locally.

Usage:
  chorus generate --model <path> --prompt "<text>" [options]
                                            text to image (chorus generate --help for options)
  chorus serve [--port N] [--models <dir>]  the app in your browser, on 127.0.0.1 with a per-launch token
                                            (chorus serve --help for options)
  chorus inspect <model>                    what a model folder or checkpoint holds, and its configs
  chorus batch <jobs.jsonl> [--grid <spec>] [--out <dir>]
                                            render a job file through the durable queue; the same
                                            command again resumes it (chorus batch --help)
  chorus queue list|show|cancel|retry|pause|resume
                                            the batch queue (chorus queue --help)
  chorus debug run <graph> --model <path> --inputs <in.safetensors> --out <out.safetensors>
                                            run one graph on tensors (graph: text-encoder | unet |
                                            vae-decoder | vae-encoder); for checking Chorus against
                                            another implementation
  chorus debug graph <graph> --model <path> print the built ONNX graph as text

Common options:
  --device auto|cpu|cuda|dml|coreml|webgpu  execution provider (default auto: GPU when available)
  --config <dir>      diffusers folder whose configs/tokenizer describe a single-file checkpoint
  --tokenizer <dir>   folder with the CLIP tokenizer (vocab.json, merges.txt)
  --cache <dir>       where converted weights and graphs are cached (default ~/.cache/chorus)
`;

export async function main(argv: readonly string[]): Promise<number> {
  const [command, ...rest] = argv;
  try {
    switch (command) {
      case 'generate':
        return await runGenerate(rest);
      case 'inspect':
        return await runInspect(rest);
      case 'batch':
        return await runBatch(rest);
      case 'queue':
        return await runQueueCommand(rest);
      case 'serve':
        return await runServe(rest);
      case 'debug':
        return await runDebug(rest);
      case undefined:
      case 'help':
      case '--help':
      case '-h':
        process.stdout.write(HELP);
        return 0;
      default:
        throw new UsageError(`unknown command "${command}"`);
    }
  } catch (e) {
    if (e instanceof UsageError) {
      process.stderr.write(`error: ${e.message}\n\n${HELP}`);
      return 2;
    }
    if (isModelError(e) || isPipelineError(e) || isQueueError(e)) {
      process.stderr.write(`error [${e.code}]: ${e.message}\n`);
      return 1;
    }
    throw e;
  }
}
