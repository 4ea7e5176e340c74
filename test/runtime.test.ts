/**
 * Execution-provider choice: one place decides, `auto` prefers the platform's GPU provider, a
 * provider that cannot start falls back to the CPU and says why.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { providerCandidates } from '../models/index.ts';
import { OrtSession } from '../models/runtime.ts';
import { Ops } from '../models/onnx/ops.ts';
import { serializeModel } from '../models/onnx/serialize.ts';

function tinyModel(): Uint8Array {
  const g = new Ops('t');
  const x = g.input('x', 'float32', [2]);
  g.output(g.mul(x, g.scalar(3)), 'y', 'float32', [2]);
  return serializeModel(g.finish(), () => assert.fail('no parameters'));
}

test('auto picks DirectML on Windows, CoreML on macOS, the CPU last everywhere', () => {
  assert.deepEqual(providerCandidates('auto', 'win32'), ['dml', 'cpu']);
  assert.deepEqual(providerCandidates('auto', 'darwin'), ['coreml', 'cpu']);
  assert.equal(providerCandidates('auto', 'linux').at(-1), 'cpu');
  assert.deepEqual(providerCandidates('cpu', 'win32'), ['cpu']);
  assert.deepEqual(providerCandidates('webgpu', 'linux'), ['webgpu', 'cpu']);
});

test('a forced provider that is not available falls back to the CPU, with the reason', async () => {
  // CUDA's libraries are an opt-in install; on this machine they are absent.
  const s = await OrtSession.create(tinyModel(), { device: 'cuda' });
  try {
    assert.equal(s.choice.device, 'cpu');
    assert.equal(s.choice.tried[0]?.device, 'cuda');
    assert.match(s.choice.reason, /^cpu: cuda failed \(the CUDA provider is not installed \(npm run install-cuda\)\)/);
    const out = await s.run({ x: { dtype: 'float32', shape: [2], data: new Float32Array([1, 2]) } });
    assert.deepEqual([...(out.y!.data as Float32Array)], [3, 6]);
  } finally {
    await s.dispose();
  }
});

test('the CPU provider, when asked for, says so', async () => {
  const s = await OrtSession.create(tinyModel(), { device: 'cpu' });
  assert.equal(s.choice.reason, 'cpu: as requested');
  await s.dispose();
});
