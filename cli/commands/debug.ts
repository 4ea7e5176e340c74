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
 * `chorus debug vjp`: the gradient of an attention-map loss through the UNet (the conformance
 * command of the gradient-guided strategies), with the definitions of the fixtures' `vjp/*` cases:
 *   inputs   sample (B, 4, h, w), timestep, encoder_hidden_states (B, S, D), cot_x (B, N, S), cot_s (B, N, N)
 *   outputs  xattn, selfattn (head- and layer-means of the 1/32-grid attention probabilities),
 *            grad_sample = ∂L/∂sample for L = Σ cot_x·xattn + Σ cot_s·selfattn
 * `--lora file[:scale]` (repeatable) makes LoRAs active in the forward and the backward pass.
 */
import * as path from 'node:path';
import { AdapterStack, ModelError, Sd15Engine, dumpGraph, openSafetensors, writeSafetensors, type GraphKind, type Tensor } from '../../models/index.ts';
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
  if (sub === 'vjp') return debugVjp(rest);
  throw new UsageError(`chorus debug: expected "run", "graph" or "vjp", got "${sub ?? ''}"`);
}

/** `--lora file[:scale]`: a trailing number is the strength (so Windows drive colons survive). */
function parseLoraFile(value: string): { file: string; scale: number } {
  const at = value.lastIndexOf(':');
  const tail = at < 0 ? '' : value.slice(at + 1);
  if (at > 0 && /^\s*-?(\d+\.?\d*|\.\d+)\s*$/.test(tail)) return { file: value.slice(0, at), scale: Number(tail) };
  if (value === '') throw new UsageError('--lora needs a file: --lora file.safetensors[:scale]');
  return { file: value, scale: 1 };
}

const VJP_INPUTS = ['sample', 'timestep', 'encoder_hidden_states', 'cot_x', 'cot_s'] as const;

async function debugVjp(argv: readonly string[]): Promise<number> {
  const { values } = parse(argv, { ...MODEL_OPTIONS, inputs: { type: 'string' }, out: { type: 'string' }, prefix: { type: 'string' }, lora: { type: 'string', multiple: true } });
  const modelPath = requireValue(values.model, '--model');
  const inputsPath = requireValue(values.inputs, '--inputs');
  const outPath = requireValue(values.out, '--out');
  const prefix = values.prefix ?? '';
  const loras = (values.lora ?? []).map(parseLoraFile);
  const inputs = openSafetensors(inputsPath);
  const engine = Sd15Engine.open(modelPath, engineOptions(values));
  try {
    const input = (name: string): Tensor => {
      const key = prefix + name;
      if (!inputs.has(key)) {
        throw new ModelError('MISSING_TENSOR', `${path.basename(inputsPath)}: no tensor \`${key}\`; chorus debug vjp needs ${VJP_INPUTS.map((n) => prefix + n).join(', ')}.`, { file: inputsPath, key });
      }
      return inputs.read(key);
    };
    const stack = new AdapterStack(
      loras.map(({ file, scale }) => {
        const lora = engine.loadLora(file);
        return { path: lora.path, name: lora.name, modules: lora.modules, te: scale, unet: scale };
      }),
    );
    const sample = input('sample');
    const adapters = stack.size === 0 ? undefined : { mode: 'bank' as const, stack, mix: Array.from({ length: sample.shape[0] ?? 1 }, () => stack.strengths('unet')) };
    const out = await engine.runUnetVjp(
      { sample, timestep: input('timestep'), encoderHiddenStates: input('encoder_hidden_states') },
      { xattn: input('cot_x'), selfattn: input('cot_s') },
      adapters,
    );
    const outputs = { xattn: out.xattn, selfattn: out.selfattn, grad_sample: out.gradSample };
    const choice = await engine.providerChoice();
    writeSafetensors(outPath, outputs, { chorus_graph: 'unet_vjp', model: engine.model.path, device: choice?.device ?? 'unknown', loras: loras.map((l) => `${path.basename(l.file)}:${l.scale}`).join(',') });
    const summary = Object.entries(outputs).map(([k, t]) => `${k} [${t.shape.join(', ')}]`).join(', ');
    process.stdout.write(`unet vjp on ${choice?.device ?? '?'}${loras.length === 0 ? '' : ` with ${loras.length} LoRA${loras.length === 1 ? '' : 's'}`}: wrote ${summary} to ${outPath}\n`);
    return 0;
  } finally {
    inputs.close();
    await engine.dispose();
  }
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
