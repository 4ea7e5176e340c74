/**
 * Device decisions that need no GPU: the weight precision for a device and its adapter features,
 * the adapter-limit check, the software-Vulkan detection that keeps `auto` off SwiftShader, the
 * provider order with a WebGPU probe result, and the numerics of fp16 weights (fp32 compute) on the
 * CPU provider against fp32 for the tiny model.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { choosePrecision, checkAdapterLimits, softwareVulkanDrivers } from '../models/device.ts';
import { providerCandidates, webgpuSkipReason, type WebGpuStatus } from '../models/runtime.ts';
import { Sd15Engine, openSafetensors, type Tensor } from '../models/index.ts';
import { FIXTURES, REF, assertClose, refCases } from './fixtures.ts';

const MIB = 1024 * 1024;

test('precision: shader-f16 gives fp16 weights on WebGPU, its absence fp32, the CPU always fp32', () => {
  const f16 = { features: ['shader-f16', 'timestamp-query'] };
  const none = { features: ['timestamp-query'] };
  assert.deepEqual(choosePrecision('webgpu', f16), { precision: 'fp16', reason: 'fp16: the WebGPU adapter has shader-f16' });
  assert.deepEqual(choosePrecision('webgpu', none), { precision: 'fp32', reason: 'fp32: the WebGPU adapter has no shader-f16' });
  // Asking for fp16 does not override a missing feature.
  assert.equal(choosePrecision('webgpu', none, 'fp16').precision, 'fp32');
  assert.equal(choosePrecision('webgpu', undefined).precision, 'fp32');
  assert.equal(choosePrecision('webgpu', f16, 'fp32').precision, 'fp32');
  assert.equal(choosePrecision('cpu', f16).precision, 'fp32');
  assert.equal(choosePrecision('cpu', f16, 'fp16').precision, 'fp32');
  assert.equal(choosePrecision('cuda', undefined).precision, 'fp16');
});

test('adapter limits: the largest tensor against maxStorageBufferBindingSize and maxBufferSize, with a clear error', () => {
  // SD 1.5's token embedding (49408 × 768 fp32) and a 512×512 level-0 attention score matrix per image.
  const tensors = [
    { name: 'text_model.embeddings.token_embedding.weight', bytes: 49408 * 768 * 4 },
    { name: 'down_blocks.0 attention scores', bytes: 8 * 4096 * 4096 * 4 },
  ];
  const spec = { features: [], limits: { maxStorageBufferBindingSize: 128 * MIB, maxBufferSize: 256 * MIB } };
  const err = checkAdapterLimits('the UNet', tensors, spec);
  assert.ok(err !== undefined);
  assert.equal(err.code, 'DEVICE_LIMITS');
  assert.equal(err.message, "the UNet does not fit this WebGPU adapter: down_blocks.0 attention scores needs 512.0 MiB in one buffer, over the adapter's maxStorageBufferBindingSize of 128.0 MiB; running on cpu instead.");
  const big = { features: [], limits: { maxStorageBufferBindingSize: 2048 * MIB, maxBufferSize: 4096 * MIB } };
  assert.equal(checkAdapterLimits('the UNet', tensors, big), undefined);
  // Binding limit fits, buffer limit does not.
  const odd = checkAdapterLimits('x', [{ name: 't', bytes: 300 * MIB }], { features: [], limits: { maxStorageBufferBindingSize: 1024 * MIB, maxBufferSize: 256 * MIB } });
  assert.match(odd?.message ?? '', /over the adapter's maxBufferSize of 256\.0 MiB/);
  // Unknown limits (ONNX Runtime's Node binding reports none): no verdict.
  assert.equal(checkAdapterLimits('the UNet', tensors, { features: [] }), undefined);
});

test('software Vulkan: SwiftShader or lavapipe alone is software, any hardware driver is not', () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'chorus-icd-'));
  try {
    const icd = (name: string, lib: string) => {
      const f = path.join(dir, name);
      fs.writeFileSync(f, JSON.stringify({ file_format_version: '1.0.0', ICD: { library_path: lib, api_version: '1.3.0' } }));
      return f;
    };
    const swift = icd('vk_swiftshader_icd.json', './libvk_swiftshader.so');
    const lvp = icd('lvp_icd.x86_64.json', '/usr/lib/x86_64-linux-gnu/libvulkan_lvp.so');
    const nv = icd('nvidia_icd.json', 'libGLX_nvidia.so.0');
    assert.equal(softwareVulkanDrivers({ VK_ICD_FILENAMES: swift }, []), 'SwiftShader');
    assert.equal(softwareVulkanDrivers({ VK_ICD_FILENAMES: [swift, lvp].join(path.delimiter) }, []), 'SwiftShader, lavapipe');
    assert.equal(softwareVulkanDrivers({ VK_ICD_FILENAMES: [swift, nv].join(path.delimiter) }, []), undefined);
    assert.equal(softwareVulkanDrivers({ VK_DRIVER_FILES: lvp }, []), 'lavapipe');
    // No variable: the standard folders (here: the temporary one with all three).
    assert.equal(softwareVulkanDrivers({}, [dir]), undefined);
    assert.equal(softwareVulkanDrivers({}, [path.join(dir, 'none')]), undefined);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('auto puts a hardware WebGPU adapter first, never a software one or a missing one', () => {
  const hw: WebGpuStatus = { available: true, software: false, shaderF16: true, reason: 'a WebGPU adapter, with shader-f16' };
  const sw: WebGpuStatus = { available: true, software: true, shaderF16: false, reason: 'only a software adapter (SwiftShader Vulkan driver), no shader-f16' };
  const none: WebGpuStatus = { available: false, software: false, shaderF16: false, reason: 'Failed to get a WebGPU adapter: No supported adapters' };
  assert.deepEqual(providerCandidates('auto', 'win32', hw), ['webgpu', 'dml', 'cpu']);
  assert.deepEqual(providerCandidates('auto', 'darwin', hw), ['webgpu', 'coreml', 'cpu']);
  assert.deepEqual(providerCandidates('auto', 'win32', sw), ['dml', 'cpu']);
  assert.deepEqual(providerCandidates('auto', 'darwin', none), ['coreml', 'cpu']);
  assert.deepEqual(providerCandidates('webgpu', 'linux', sw), ['webgpu', 'cpu']);
  assert.equal(webgpuSkipReason(hw), undefined);
  assert.equal(webgpuSkipReason(sw), 'webgpu skipped (only a software adapter (SwiftShader Vulkan driver), no shader-f16; far slower than the CPU provider, --device webgpu forces it)');
  assert.equal(webgpuSkipReason(none), 'webgpu unavailable (Failed to get a WebGPU adapter: No supported adapters)');
});

/**
 * fp16 weights with fp32 compute, on the CPU provider, against fp32: the tiny UNet (t999_b1) and
 * text encoder. Rounding a weight to fp16 changes it by at most 2^-11 relative (4.9e-4). Measured
 * here (2026-11-28, deterministic): noise_pred max |Δ| 1.39e-3 (|values| ≤ 1.26, so 0.11 % of the
 * range), text encoder last_hidden_state max |Δ| 9.77e-3 (|values| ≤ 7, 0.14 %), the CLIP stack
 * amplifying the rounding more than the UNet. The tolerances are ≈ 3× those: a regression (fp16
 * activations, a lost fp32 softmax/norm) would exceed them, while fp16 weights are expected to sit
 * 20–30× above the fp32 fixtures' atol (6e-5, 3e-4), which therefore do not apply to them.
 */
const FP16_UNET_ATOL = 4e-3;
const FP16_TE_ATOL = 3e-2;

describe('fp16 weights, fp32 compute (CPU provider) vs fp32', () => {
  const cacheDir = fs.mkdtempSync(path.join(os.tmpdir(), 'chorus-fp16-'));
  let fp32: Sd15Engine;
  let fp16: Sd15Engine;
  before(() => {
    fp32 = Sd15Engine.open(path.join(FIXTURES, 'tiny-sd15'), { device: 'cpu', cacheDir });
    fp16 = Sd15Engine.open(path.join(FIXTURES, 'tiny-sd15'), { device: 'cpu', cacheDir, precision: 'fp16' });
  });
  after(async () => {
    await fp32.dispose();
    await fp16.dispose();
    fs.rmSync(cacheDir, { recursive: true, force: true });
  });

  test('the plan: fp16 was asked for but the CPU provider computes in fp32', async () => {
    assert.equal((await fp16.plan()).precision.precision, 'fp32');
  });

  const maxDiff = (a: Float32Array, b: Float32Array) => a.reduce((m, x, i) => Math.max(m, Math.abs(x - b[i]!)), 0);
  const read = (file: string, key: string): Tensor => {
    const f = openSafetensors(path.join(REF, file));
    try {
      return f.read(key);
    } finally {
      f.close();
    }
  };

  test('UNet t999_b1 and text encoder: fp16-rounded weights stay within the stated tolerance of fp32', async () => {
    // The CPU plan keeps fp32; the fp16 numerics are those of the rounding patch the WebGPU fp16 plan uses.
    const half = Sd15Engine.open(path.join(FIXTURES, 'tiny-sd15'), { device: 'cpu', cacheDir, precision: 'fp16', forcePrecision: true });
    try {
      const c = refCases('unet').find((x) => x.id === 'unet/t999_b1')!;
      const input = { sample: read(c.file, c.inputs.sample!.key), timestep: read(c.file, c.inputs.timestep!.key), encoderHiddenStates: read(c.file, c.inputs.encoder_hidden_states!.key) };
      const a = (await fp32.runUnet(input)).noise_pred!.data;
      const b = (await half.runUnet(input)).noise_pred!.data;
      const dUnet = maxDiff(a, b);
      assert.ok(dUnet > 0, 'fp16 rounding changed the output');
      assertClose(b, a, FP16_UNET_ATOL, 'noise_pred fp16 weights vs fp32');
      const [t] = refCases('text_encoder');
      const ids = read(t!.file, t!.inputs.input_ids!.key);
      const ta = (await fp32.encodeText(ids)).lastHiddenState.data;
      const tb = (await half.encodeText(ids)).lastHiddenState.data;
      const dTe = maxDiff(ta, tb);
      assert.ok(dTe > 0, 'fp16 rounding changed the text encoder output');
      assertClose(tb, ta, FP16_TE_ATOL, 'text encoder fp16 weights vs fp32');
      console.log(`fp16 weights vs fp32: noise_pred max |diff| ${dUnet.toExponential(2)}, text encoder ${dTe.toExponential(2)}`);
    } finally {
      await half.dispose();
    }
  });
});
