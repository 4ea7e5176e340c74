/**
 * The CLIP text encoder (`CLIPTextModel`), as transformers writes it, driven by its config.
 * Scope paths are the transformers checkpoint keys (`text_model.encoder.layers.3.self_attn.q_proj`).
 *
 * Reference: transformers v4.33.3,
 * https://github.com/huggingface/transformers/blob/v4.33.3/src/transformers/models/clip/modeling_clip.py
 * (CLIPTextEmbeddings, CLIPAttention, CLIPMLP, CLIPEncoderLayer, CLIPTextTransformer).
 *
 * Graph input: `input_ids` (B, S) int64, S ≤ max_position_embeddings. No attention mask: SD feeds
 * none, so only the causal mask applies and padding tokens are encoded like any other token.
 * Outputs: `last_hidden_state` = final_layer_norm(h_L), `penultimate_raw` = h_{L−1},
 * `penultimate_final_ln` = final_layer_norm(h_{L−1}) (A1111 "Clip skip: 2"), and for each extra
 * clip skip k ≥ 3 asked for, `clip_skip_<k>` = final_layer_norm(h_{L−k+1}).
 */
import type { Graph, Value } from '../onnx/builder.ts';
import { Ops } from '../onnx/ops.ts';
import { ModelError } from '../errors.ts';
import { layerNorm, linear } from './layers.ts';
import { attachAdapterBank } from './adapter-bank.ts';
import type { ClipTextConfig } from './config.ts';

/** torch.finfo(torch.float32).min: what `_make_causal_mask` fills above the diagonal. */
const FLOAT32_MIN = -3.4028234663852886e38;

export interface ClipTextBuildOptions {
  /** Extra A1111 clip-skip values (≥ 3) to output as `clip_skip_<k>`. 1 and 2 are always there. */
  readonly extraClipSkips?: readonly number[];
  /** LoRA adapter-bank inputs on every linear of the encoder layers (see adapter-bank.ts). */
  readonly adapterBank?: boolean;
  /** With `adapterBank`: bank inputs only on the layers of these families (`bankFamily`; default all). */
  readonly bankFamilies?: readonly string[];
}

/** Where the text encoder's bank layers live: kohya's `lora_te_` targets (attention and MLP). */
export const TEXT_ENCODER_BANK_PREFIXES = ['text_model.encoder.'] as const;

/** `CLIPAttention` with the causal mask; q is scaled before the product. (B, S, H) → (B, S, H) */
function clipAttention(g: Ops, x: Value, causalMask: Value, c: ClipTextConfig): Value {
  const h = c.hiddenSize;
  const heads = c.numAttentionHeads;
  const dimHead = h / heads;
  const q = g.mul(linear(g, 'q_proj', x, h, h, { bias: true }), g.scalar(dimHead ** -0.5));
  const k = linear(g, 'k_proj', x, h, h, { bias: true });
  const v = linear(g, 'v_proj', x, h, h, { bias: true });
  const split = [0, 0, heads, dimHead];
  const qh = g.transpose(g.reshape(q, split), [0, 2, 1, 3]); // (B, S, H) → (B, h, S, d)
  const kt = g.transpose(g.reshape(k, split), [0, 2, 3, 1]); // (B, S, H) → (B, h, d, S)
  const vh = g.transpose(g.reshape(v, split), [0, 2, 1, 3]); // (B, S, H) → (B, h, S, d)
  const probs = g.softmax(g.add(g.matmul(qh, kt), causalMask), { dim: -1 }); // (B, h, S, S)
  const out = g.reshape(g.transpose(g.matmul(probs, vh), [0, 2, 1, 3]), [0, 0, h]); // (B, h, S, d) → (B, S, H)
  return linear(g, 'out_proj', out, h, h, { bias: true });
}

/** `CLIPMLP`: fc1 → activation → fc2. */
function clipMlp(g: Ops, x: Value, c: ClipTextConfig): Value {
  const h = linear(g, 'fc1', x, c.hiddenSize, c.intermediateSize, { bias: true });
  const act = c.hiddenAct === 'quick_gelu' ? g.quickGelu(h) : g.gelu(h);
  return linear(g, 'fc2', act, c.intermediateSize, c.hiddenSize, { bias: true });
}

/** `CLIPEncoderLayer` (pre-LN): x + attn(LN1(x)), then x + mlp(LN2(x)). */
function clipEncoderLayer(g: Ops, x: Value, causalMask: Value, c: ClipTextConfig): Value {
  const eps = { eps: c.layerNormEps };
  const n1 = layerNorm(g, 'layer_norm1', x, c.hiddenSize, eps);
  const a = g.add(x, g.scope('self_attn', () => clipAttention(g, n1, causalMask, c)));
  const n2 = layerNorm(g, 'layer_norm2', a, c.hiddenSize, eps);
  return g.add(a, g.scope('mlp', () => clipMlp(g, n2, c)));
}

export function buildClipTextGraph(config: ClipTextConfig, options: ClipTextBuildOptions = {}): Graph {
  const c = config;
  const g = new Ops('text_encoder');
  if (options.adapterBank === true) attachAdapterBank(g, TEXT_ENCODER_BANK_PREFIXES, options.bankFamilies);
  const inputIds = g.input('input_ids', 'int64', ['batch', 'sequence']);
  const seqLen = g.shape(inputIds, { start: 1, end: 2 });
  const extra = [...new Set(options.extraClipSkips ?? [])].sort((a, b) => a - b);
  for (const k of extra) {
    if (!Number.isInteger(k) || k < 3 || k > c.numHiddenLayers) {
      throw new ModelError('GRAPH_BUILD', `clip skip ${k} is outside 3…${c.numHiddenLayers} for a ${c.numHiddenLayers}-layer text encoder`, { clipSkip: k });
    }
  }

  g.scope('text_model', () => {
    // 1. embeddings: token + position (positions 0…S−1).
    const hidden0 = g.scope('embeddings', () => {
      const tokenTable = g.scope('token_embedding', () => g.param('weight', [c.vocabSize, c.hiddenSize]));
      const positionTable = g.scope('position_embedding', () => g.param('weight', [c.maxPositionEmbeddings, c.hiddenSize]));
      const tokens = g.gather(tokenTable, inputIds, { dim: 0 }); // (B, S) → (B, S, H)
      const positions = g.slice(positionTable, { starts: [0], ends: seqLen, axes: [0] }); // (S, H)
      return g.add(tokens, positions);
    });

    // 2. causal mask (S, S): 0 on and below the diagonal, float32 min above.
    const p = c.maxPositionEmbeddings;
    const mask = new Float32Array(p * p);
    for (let i = 0; i < p; i++) for (let j = i + 1; j < p; j++) mask[i * p + j] = FLOAT32_MIN;
    const causalMask = g.slice(g.floats([p, p], mask), { starts: [0, 0], ends: g.concat([seqLen, seqLen], { dim: 0 }), axes: [0, 1] });

    // 3. encoder layers, keeping every hidden state.
    const hidden: Value[] = [hidden0];
    g.scope('encoder', () => {
      for (let i = 0; i < c.numHiddenLayers; i++) {
        const prev = hidden[hidden.length - 1]!;
        hidden.push(g.scope(`layers.${i}`, () => clipEncoderLayer(g, prev, causalMask, c)));
      }
    });

    // 4. final layer norm, on the last layer and on the clip-skip layers.
    const finalLn = (x: Value) => layerNorm(g, 'final_layer_norm', x, c.hiddenSize, { eps: c.layerNormEps });
    const L = c.numHiddenLayers;
    const shape = ['batch', 'sequence', c.hiddenSize];
    g.output(finalLn(hidden[L]!), 'last_hidden_state', 'float32', shape);
    g.output(g.identity(hidden[L - 1]!), 'penultimate_raw', 'float32', shape);
    g.output(finalLn(hidden[L - 1]!), 'penultimate_final_ln', 'float32', shape);
    for (const k of extra) g.output(finalLn(hidden[L - k + 1]!), `clip_skip_${k}`, 'float32', shape);
  });
  return g.finish();
}
