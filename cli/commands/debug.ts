/**
 * `chorus debug run <graph>`: run one of the four graphs on tensors from a safetensors file and
 * write the outputs, with the tensor names of the fixture manifests:
 *   text-encoder  input_ids                                   → last_hidden_state, penultimate_raw, penultimate_final_ln
 *   unet          sample, timestep, encoder_hidden_states     → noise_pred (+ attn_probs.<module>, debug.*)
 *   vae-decoder   latents_scaled                              → decoder_output, image01
 *   vae-encoder   image                                       → mean, logvar, std, moments
 * Shapes and batch sizes come from the input file. `--prefix P` reads `P<name>` (a fixture case's
 * keys, e.g. `t999_b1.`).
 * `chorus debug graph <graph>`: print the graph as text (nodes, parameters, shapes).
 */
import * as path from 'node:path';
import { ModelError, Sd15Engine, dumpGraph, openSafetensors, writeSafetensors, type GraphKind, type Tensor } from '../../models/index.ts';
import { MODEL_OPTIONS, UsageError, engineOptions, parse, requireValue } from '../args.ts';

const GRAPH_NAMES: Readonly<Record<string, GraphKind>> = {
  'text-encoder': 'text_encoder',
  unet: 'unet',
  'vae-decoder': 'vae_decoder',
  'vae-encoder': 'vae_encoder',
};

function graphKind(name: string | undefined): GraphKind {
  const kind = name === undefined ? undefined : GRAPH_NAMES[name];
  if (kind === undefined) throw new UsageError(`graph must be one of ${Object.keys(GRAPH_NAMES).join(', ')}, got "${name ?? ''}"`);
  return kind;
}

export async function runDebug(argv: readonly string[]): Promise<number> {
  const [sub, ...rest] = argv;
  if (sub === 'run') return debugRun(rest);
  if (sub === 'graph') return debugGraph(rest);
  throw new UsageError(`chorus debug: expected "run" or "graph", got "${sub ?? ''}"`);
}

async function debugGraph(argv: readonly string[]): Promise<number> {
  const { values, positionals } = parse(argv, { ...MODEL_OPTIONS, 'attention-probs': { type: 'string' }, 'debug-outputs': { type: 'boolean' } });
  const kind = graphKind(positionals[0]);
  const engine = Sd15Engine.open(requireValue(values.model, '--model'), engineOptions(values));
  try {
    const taps = values['attention-probs']?.split(',').filter((s) => s !== '') ?? [];
    process.stdout.write(dumpGraph(engine.buildGraph(kind, { attentionProbs: taps, debugOutputs: values['debug-outputs'] === true })));
  } finally {
    await engine.dispose();
  }
  return 0;
}

async function debugRun(argv: readonly string[]): Promise<number> {
  const { values, positionals } = parse(argv, {
    ...MODEL_OPTIONS,
    inputs: { type: 'string' },
    out: { type: 'string' },
    prefix: { type: 'string' },
    'attention-probs': { type: 'string' },
    'debug-outputs': { type: 'boolean' },
  });
  const kind = graphKind(positionals[0]);
  const modelPath = requireValue(values.model, '--model');
  const inputsPath = requireValue(values.inputs, '--inputs');
  const outPath = requireValue(values.out, '--out');
  const prefix = values.prefix ?? '';
  const options = engineOptions(values);

  const inputs = openSafetensors(inputsPath);
  const engine = Sd15Engine.open(modelPath, options);
  try {
    const input = (name: string): Tensor => {
      const key = prefix + name;
      if (!inputs.has(key)) {
        throw new ModelError('MISSING_TENSOR', `${path.basename(inputsPath)}: no tensor \`${key}\`; the ${positionals[0]} graph needs ${INPUT_NAMES[kind].map((n) => prefix + n).join(', ')}.`, {
          file: inputsPath,
          key,
        });
      }
      return inputs.read(key);
    };
    let outputs: Record<string, Tensor>;
    switch (kind) {
      case 'text_encoder': {
        const r = await engine.encodeText(input('input_ids'));
        outputs = { last_hidden_state: r.lastHiddenState, penultimate_raw: r.penultimateRaw, penultimate_final_ln: r.penultimateFinalLn };
        break;
      }
      case 'unet': {
        const taps = values['attention-probs']?.split(',').filter((s) => s !== '') ?? [];
        outputs = await engine.runUnet(
          { sample: input('sample'), timestep: input('timestep'), encoderHiddenStates: input('encoder_hidden_states') },
          { attentionProbs: taps, debugOutputs: values['debug-outputs'] === true },
        );
        break;
      }
      case 'vae_decoder': {
        const r = await engine.decodeLatents(input('latents_scaled'));
        outputs = { decoder_output: r.decoderOutput, image01: r.image01 };
        break;
      }
      case 'vae_encoder': {
        const r = await engine.encodeImage(input('image'));
        outputs = { mean: r.mean, logvar: r.logvar, std: r.std, moments: r.moments };
        break;
      }
    }
    const choice = await engine.providerChoice();
    writeSafetensors(outPath, outputs, { chorus_graph: kind, model: engine.model.path, device: choice?.device ?? 'unknown' });
    const summary = Object.entries(outputs).map(([k, t]) => `${k} [${t.shape.join(', ')}]`).join(', ');
    process.stdout.write(`${positionals[0]} on ${choice?.device ?? '?'} (${choice?.reason ?? ''}): wrote ${summary} to ${outPath}\n`);
    return 0;
  } finally {
    inputs.close();
    await engine.dispose();
  }
}

const INPUT_NAMES: Readonly<Record<GraphKind, readonly string[]>> = {
  text_encoder: ['input_ids'],
  unet: ['sample', 'timestep', 'encoder_hidden_states'],
  vae_decoder: ['latents_scaled'],
  vae_encoder: ['image'],
};
