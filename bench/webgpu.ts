/**
 * WebGPU benchmark: one UNet step of the tiny fixture model (CFG batch 2, a LoRA in the adapter
 * bank) on the CPU provider and on WebGPU, the latter with every input copied from the host at
 * each call and with the reused inputs (text conditioning, the bank's LoRA tensors) kept on the
 * device (`residentInputs`). On a machine without a GPU, WebGPU runs on SwiftShader (set up as in
 * `.ci/run`): its speed says nothing about a real GPU; the point is the copy overhead ratio.
 *
 * ONNX Runtime 1.30's Node binding cannot download a `gpu-buffer` output (see models/runtime.ts),
 * so the latents (updated by the scheduler in JavaScript) and `noise_pred` cross the bus each step;
 * what stays resident is what is reused.
 *
 *   npm run bench:webgpu -- [--size 16] [--runs 3] [--warmup 1] [--lora lora_kohya_b_locon]
 *
 * Output: JSON lines on stdout (`conditions`, one `unet_step` per configuration, `summary`).
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { parseArgs } from 'node:util';
import { AdapterStack, Sd15Engine, type Tensor } from '../models/index.ts';
import { probeWebGpu, uploadToDevice } from '../models/runtime.ts';
import { bankLayersOf } from '../models/networks/adapter-bank.ts';
import { bankFeeds } from '../models/lora/bank.ts';
import { loadAvg1m, runConditions } from './run-conditions.ts';
import { timeRuns } from './timing-stats.ts';
import { TINY_MODEL_DIR } from './random-weights.ts';

const SWIFTSHADER_ICD = '/usr/lib/chromium/vk_swiftshader_icd.json';
if (process.env.VK_ICD_FILENAMES === undefined && fs.existsSync(SWIFTSHADER_ICD)) process.env.VK_ICD_FILENAMES = SWIFTSHADER_ICD;

const { values } = parseArgs({
  options: {
    size: { type: 'string', default: '16' },
    runs: { type: 'string', default: '3' },
    warmup: { type: 'string', default: '1' },
    lora: { type: 'string', default: 'lora_kohya_b_locon' },
  },
});
const size = Number(values.size);
const runs = Number(values.runs);
const warmup = Number(values.warmup);
const MODEL = TINY_MODEL_DIR;
const LORA = path.join(path.dirname(TINY_MODEL_DIR), 'tiny-sd15-lora', `${values.lora}.safetensors`);
const line = (o: object) => process.stdout.write(`${JSON.stringify(o)}\n`);

/** Deterministic inputs (the values do not matter for timing). */
const wave = (shape: number[], phase: number): Tensor<'float32'> => {
  const n = shape.reduce((a, b) => a * b, 1);
  return { dtype: 'float32', shape, data: Float32Array.from({ length: n }, (_, i) => Math.sin(i * 0.7311 + phase)) };
};

const webgpu = await probeWebGpu();
line({ record: 'conditions', ...runConditions(os.availableParallelism()), webgpu, loadAvg1m: loadAvg1m(), size, runs, warmup, lora: path.basename(LORA) });
if (!webgpu.available) {
  line({ record: 'error', message: `no WebGPU adapter: ${webgpu.reason}` });
  process.exit(1);
}

const cacheDir = fs.mkdtempSync(path.join(os.tmpdir(), 'chorus-bench-webgpu-'));
const ctx = wave([2, 77, 32], 1);
const results: Record<string, number> = {};
try {
  for (const config of [
    { name: 'cpu', device: 'cpu', resident: false },
    { name: 'webgpu_host_inputs', device: 'webgpu', resident: false },
    { name: 'webgpu_resident_inputs', device: 'webgpu', resident: true },
  ] as const) {
    const engine = Sd15Engine.open(MODEL, { device: config.device, cacheDir, residentInputs: config.resident });
    try {
      const lora = engine.loadLora(LORA);
      const stack = new AdapterStack([{ path: LORA, name: 'lora', modules: lora.modules, te: 1, unet: 1 }]);
      const sample = wave([2, 4, size, size], 2);
      const step = () => engine.runUnet({ sample, timestep: { dtype: 'float32', shape: [1], data: new Float32Array([500]) }, encoderHiddenStates: ctx }, {}, { mode: 'bank', stack, mix: [[1], [1]] });
      const t0 = performance.now();
      await step();
      const firstMs = performance.now() - t0;
      const { timing, cpuTime } = await timeRuns(warmup, runs, step);
      const choice = await engine.providerChoice();
      const feeds = bankFeeds(bankLayersOf(engine.buildGraph('unet', { adapterBank: true })), 'unet', stack.entries);
      const bankBytes = Object.values(feeds).reduce((a, t) => a + t.data.byteLength, 0);
      line({ record: 'unet_step', config: config.name, provider: choice?.device, reason: choice?.reason, batch: 2, latent: [size, size], bankInputs: Object.keys(feeds).length, bankBytes, contextBytes: ctx.data.byteLength, firstCallMs: Math.round(firstMs), timing, cpuTime });
      results[config.name] = timing.medianMs;
      if (config.name === 'webgpu_resident_inputs') {
        // The copy itself: uploading fresh copies of the reused inputs (what host inputs pay every call).
        const copies = Object.fromEntries(Object.entries({ ...feeds, encoder_hidden_states: ctx }).map(([k, t]) => [k, { ...t, data: t.data.slice() } as Tensor]));
        const u0 = performance.now();
        await uploadToDevice(copies);
        results.upload_ms = performance.now() - u0;
      }
    } finally {
      await engine.dispose();
    }
  }
  const host = results.webgpu_host_inputs!;
  const resident = results.webgpu_resident_inputs!;
  line({
    record: 'summary',
    cpuMedianMs: results.cpu,
    webgpuHostInputsMedianMs: host,
    webgpuResidentInputsMedianMs: resident,
    uploadReusedInputsMs: Math.round(results.upload_ms! * 10) / 10,
    copyOverheadRatio: Math.round((host / resident) * 1000) / 1000,
    webgpuVsCpu: Math.round((resident / results.cpu!) * 100) / 100,
    note: webgpu.software ? 'software adapter: the WebGPU times are a CPU emulation; only the copy overhead ratio carries over' : 'hardware adapter',
  });
} finally {
  fs.rmSync(cacheDir, { recursive: true, force: true });
}
