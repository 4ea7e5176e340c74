/**
 * The regions UNet with LoRA-Composer's build options (networks/unet.ts `selfAttentionIsolation`,
 * `regionOutputAdapters`, the `xattn_region` map) and its VJP (networks/unet-vjp.ts through
 * `Sd15Engine.runUnetVjp`): the gradient against float32 finite differences of the same loss with
 * two LoRAs active per slot, isolation zeroing exactly the masked self-attention pairs, the maps-only
 * pass equal to the full pass's maps, VJP rules for every op, and bad cotangents refused.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { AdapterStack, Sd15Engine, type AdapterUse, type RegionInputs, type Tensor } from '../models/index.ts';
import { parseUnetConfig } from '../models/networks/config.ts';
import { buildUnetGraph } from '../models/networks/unet.ts';
import { vjpOpTypes } from '../models/onnx/vjp.ts';
import { NON_DIFFERENTIABLE } from '../models/onnx/vjp-rules.ts';
import { FIXTURES, assertClose } from './fixtures.ts';

const MODEL = path.join(FIXTURES, 'tiny-sd15');
const LORAS = path.join(FIXTURES, 'tiny-sd15-lora');
const cacheDir = fs.mkdtempSync(path.join(os.tmpdir(), 'chorus-regions-vjp-'));
/** As test/vjp.test.ts: ε = 1e-3 along seeded directions, float32 noise of L ≈ 1e-6 → 1e-2 relative. */
const FD_EPS = 1e-3;
const FD_REL_TOL = 1e-2;
const VARIANT = { regions: true, selfAttentionIsolation: true, regionOutputAdapters: true } as const;

const dot = (a: ArrayLike<number>, b: ArrayLike<number>) => {
  let s = 0;
  for (let i = 0; i < a.length; i++) s += a[i]! * b[i]!;
  return s;
};

function normals(seed: number): () => number {
  let s = seed >>> 0;
  const u = () => ((s = (Math.imul(s, 1103515245) + 12345) >>> 0) + 0.5) / 4294967296;
  return () => Math.sqrt(-2 * Math.log(u())) * Math.cos(2 * Math.PI * u());
}

const tensor = (shape: number[], f: () => number): Tensor<'float32'> => ({ dtype: 'float32', shape, data: Float32Array.from({ length: shape.reduce((a, b) => a * b, 1) }, f) });

describe('the regions UNet with isolation and per-slot output adapters, and its VJP', () => {
  let engine: Sd15Engine;
  let adapters: AdapterUse;
  const normal = normals(7);
  const R = 2;
  const sizes = [32, 16, 8, 4];
  // Region 0: the left 60 % below the top eighth; region 1: the right 60 % (they overlap in the middle).
  const masks = sizes.map((s): Tensor<'float32'> => {
    const d = new Float32Array(R * s * s);
    for (let i = 0; i < s; i++) {
      for (let j = 0; j < s; j++) {
        if (j < Math.floor(s * 0.6) && i >= Math.floor(s / 8)) d[i * s + j] = 1;
        if (j >= Math.floor(s * 0.4)) d[s * s + i * s + j] = 1;
      }
    }
    return { dtype: 'float32', shape: [1, R, s, s], data: d };
  });
  const regions: RegionInputs = {
    context: tensor([1, R, 77, 32], normal),
    masks,
    mix: { dtype: 'float32', shape: [1, R, 2], data: Float32Array.from([1, 0, 0, 1]) },
    mixMaps: sizes.map((s) => tensor([1, 2, s, s], () => 0)),
  };
  const unet = { sample: tensor([1, 4, 32, 32], normal), timestep: tensor([1], () => 500), encoderHiddenStates: tensor([1, 77, 32], normal), regions };
  const cot = { xattn: tensor([1, 64, 77], normal), selfattn: tensor([1, 64, 64], normal), xattnRegion: tensor([1, R, 64, 77], normal) };

  before(() => {
    engine = Sd15Engine.open(MODEL, { device: 'cpu', cacheDir });
    const loras = ['lora_kohya_a.safetensors', 'lora_kohya_b_locon.safetensors'].map((f) => engine.loadLora(path.join(LORAS, f)));
    const stack = new AdapterStack(loras.map((l) => ({ path: l.path, name: l.name, modules: l.modules, te: 1, unet: 1 })));
    adapters = { mode: 'bank', stack, mix: [[0, 0]] };
  });
  after(async () => {
    await engine.dispose();
    fs.rmSync(cacheDir, { recursive: true, force: true });
  });

  test('∂L/∂sample agrees with finite differences of L along random directions', async (t) => {
    const out = await engine.runUnetVjp(unet, cot, adapters, VARIANT);
    const loss = async (sample: Tensor<'float32'>) => {
      const m = await engine.runUnet({ ...unet, sample }, { attentionMaps: { level: 2 }, mapsOnly: true, ...VARIANT }, adapters);
      return dot(cot.xattn.data, m.xattn!.data) + dot(cot.selfattn.data, m.selfattn!.data) + dot(cot.xattnRegion.data, m.xattn_region!.data);
    };
    const fd: number[] = [];
    const an: number[] = [];
    for (let k = 0; k < 3; k++) {
      const v = Float32Array.from({ length: unet.sample.data.length }, normal);
      const plus = Float32Array.from(unet.sample.data, (x, i) => x + FD_EPS * v[i]!);
      const minus = Float32Array.from(unet.sample.data, (x, i) => x - FD_EPS * v[i]!);
      fd.push((await loss({ ...unet.sample, data: plus })) - (await loss({ ...unet.sample, data: minus })));
      an.push(dot(out.gradSample.data, Float32Array.from(plus, (p, i) => p - minus[i]!)));
    }
    const norm = (a: readonly number[]) => Math.sqrt(dot(a, a));
    const rel = norm(fd.map((d, k) => d - an[k]!)) / Math.max(norm(fd), norm(an));
    const list = (a: readonly number[]) => a.map((d) => d.toExponential(5)).join(', ');
    assert.ok(rel <= FD_REL_TOL, `finite differences [${list(fd)}] vs VJP [${list(an)}]: relative error ${rel.toExponential(2)}`);
    t.diagnostic(`finite differences [${list(fd)}], VJP [${list(an)}], relative error ${rel.toExponential(2)}`);
  });

  test('isolation zeroes exactly the pairs n_q·n_k − ⟨m_q, m_k⟩ > 0; the maps-only pass gives the full pass\'s maps', async () => {
    const full = await engine.runUnet(unet, { attentionMaps: { level: 2 }, ...VARIANT }, adapters);
    const only = await engine.runUnet(unet, { attentionMaps: { level: 2 }, mapsOnly: true, ...VARIANT }, adapters);
    assert.deepEqual(Object.keys(only).sort(), ['selfattn', 'xattn', 'xattn_region']);
    for (const k of ['xattn', 'selfattn', 'xattn_region']) assertClose(only[k]!.data, full[k]!.data, 1e-6, `maps-only ${k}`);
    const m = masks[2]!.data;
    const self = full.selfattn!.data;
    let masked = 0;
    let open = 0;
    for (let q = 0; q < 64; q++) {
      for (let k = 0; k < 64; k++) {
        const [a0, a1, b0, b1] = [m[q]!, m[64 + q]!, m[k]!, m[64 + k]!];
        if ((a0 + a1) * (b0 + b1) - (a0 * b0 + a1 * b1) > 0) {
          assert.equal(self[q * 64 + k], 0, `masked pair (${q}, ${k})`);
          masked++;
        } else if (self[q * 64 + k]! > 0) open++;
      }
    }
    assert.ok(masked > 0 && open > 0);
    // Without isolation the same pairs attend.
    const plain = await engine.runUnet(unet, { attentionMaps: { level: 2 }, mapsOnly: true, regions: true, regionOutputAdapters: true }, adapters);
    assert.ok(plain.selfattn!.data.every((v) => v > 0));
  });

  test('rejects a missing region cotangent, naming it', async () => {
    await assert.rejects(engine.runUnetVjp(unet, { xattn: cot.xattn, selfattn: cot.selfattn }, adapters, VARIANT), (e: Error & { code?: string }) => e.code === 'SHAPE_MISMATCH' && /xattn_region must be \[1, 2, 64, 77\]/.test(e.message));
    await assert.rejects(engine.runUnetVjp(unet, cot, adapters), (e: Error & { code?: string }) => e.code === 'SHAPE_MISMATCH' && /region inputs need the regions UNet variant/.test(e.message));
  });

  test('every op of the LoRA-Composer variant has a VJP rule or carries no gradient', () => {
    const config = parseUnetConfig(JSON.parse(fs.readFileSync(path.join(MODEL, 'unet/config.json'), 'utf-8')), 'unet/config.json');
    const covered = new Set([...vjpOpTypes(), ...NON_DIFFERENTIABLE]);
    const ops = new Set(buildUnetGraph(config, { ...VARIANT, adapterBank: true, attentionMaps: { level: 2 } }).nodes.map((n) => n.opType));
    assert.deepEqual([...ops].filter((op) => !covered.has(op)), []);
  });
});
