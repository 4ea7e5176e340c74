import { test, describe } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { openSafetensors, encodeSafetensors, writeSafetensors } from '../models/safetensors.ts';
import { ModelError } from '../models/errors.ts';
import { FIXTURES } from './fixtures.ts';

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'chorus-st-'));
function tmpFile(name: string, bytes: Uint8Array): string {
  const p = path.join(tmp, name);
  fs.writeFileSync(p, bytes);
  return p;
}
function headerFile(name: string, header: unknown, dataBytes: number, lengthOverride?: bigint): string {
  const json = Buffer.from(JSON.stringify(header));
  const out = new Uint8Array(8 + json.length + dataBytes);
  new DataView(out.buffer).setBigUint64(0, lengthOverride ?? BigInt(json.length), true);
  out.set(json, 8);
  return tmpFile(name, out);
}
function rejects(file: string, code: string, culprit: string): void {
  assert.throws(
    () => openSafetensors(file),
    (e: unknown) => {
      assert.ok(e instanceof ModelError, `expected ModelError, got ${String(e)}`);
      assert.equal(e.code, code, e.message);
      assert.ok(e.message.includes(path.basename(file)), `message names the file: ${e.message}`);
      assert.ok(e.message.includes(culprit), `message names ${culprit}: ${e.message}`);
      return true;
    },
  );
}

describe('safetensors reader', () => {
  test('reads the fixture UNet lazily with shapes and values', () => {
    const f = openSafetensors(path.join(FIXTURES, 'tiny-sd15/unet/diffusion_pytorch_model.safetensors'));
    try {
      const info = f.info('conv_in.weight');
      assert.deepEqual(info.shape, [32, 4, 3, 3]);
      assert.equal(info.dtype, 'float32');
      const t = f.read('conv_in.bias');
      assert.equal(t.data.length, 32);
      assert.ok(Array.from(t.data as Float32Array).some((v) => v !== 0));
    } finally {
      f.close();
    }
  });

  test('round-trips every dtype through the writer, in the Rust layout', () => {
    const tensors = {
      b: { dtype: 'float16' as const, shape: [2], data: new Uint16Array([0x3c00, 0xc000]) },
      a: { dtype: 'float32' as const, shape: [1, 2], data: new Float32Array([1.5, -2]) },
      c: { dtype: 'int64' as const, shape: [1], data: new BigInt64Array([7n]) },
      d: { dtype: 'bfloat16' as const, shape: [1], data: new Uint16Array([0x3f80]) },
      e: { dtype: 'uint8' as const, shape: [3], data: new Uint8Array([1, 2, 3]) },
    };
    const bytes = encodeSafetensors(tensors, { note: 'x' });
    const headerLen = Number(new DataView(bytes.buffer).getBigUint64(0, true));
    assert.equal(headerLen % 8, 0, 'header padded to 8');
    const p = tmpFile('rt.safetensors', bytes);
    const f = openSafetensors(p);
    try {
      assert.deepEqual(f.metadata, { note: 'x' });
      // int64 and fp32 (8, 4 bytes) come before the 2-byte and 1-byte tensors.
      const order = [...f.tensors.values()].sort((x, y) => x.begin - y.begin).map((t) => t.name);
      assert.deepEqual(order, ['c', 'a', 'b', 'd', 'e']);
      assert.deepEqual(Array.from(f.readFloat32('b').data), [1, -2]);
      assert.deepEqual(Array.from(f.readFloat32('d').data), [1]);
      assert.deepEqual(Array.from(f.read('c').data as BigInt64Array), [7n]);
    } finally {
      f.close();
    }
  });
});

describe('safetensors reader rejects', () => {
  test('a file shorter than the length field', () => {
    rejects(tmpFile('tiny.safetensors', new Uint8Array([1, 2, 3])), 'TRUNCATED_FILE', 'too short');
  });

  test('a header longer than the file', () => {
    rejects(headerFile('overrun.safetensors', { a: { dtype: 'F32', shape: [1], data_offsets: [0, 4] } }, 4, 5000n), 'HEADER_OVERRUN', '5000');
  });

  test('a truncated data section, naming the first missing tensor', () => {
    const full = encodeSafetensors({
      w1: { dtype: 'float32', shape: [4], data: new Float32Array(4) },
      w2: { dtype: 'float32', shape: [4], data: new Float32Array(4) },
    });
    rejects(tmpFile('cut.safetensors', full.subarray(0, full.length - 6)), 'TRUNCATED_FILE', 'w2');
  });

  test('offsets that disagree with dtype and shape', () => {
    rejects(headerFile('span.safetensors', { w: { dtype: 'F32', shape: [2, 2], data_offsets: [0, 12] } }, 16), 'OFFSETS_OUT_OF_RANGE', 'w');
  });

  test('offsets beyond the data section', () => {
    rejects(
      headerFile('range.safetensors', { a: { dtype: 'F32', shape: [1], data_offsets: [0, 4] }, far: { dtype: 'F32', shape: [1], data_offsets: [100, 104] } }, 8),
      'OFFSETS_OUT_OF_RANGE',
      'far',
    );
  });

  test('overlapping tensors', () => {
    rejects(
      headerFile('overlap.safetensors', { a: { dtype: 'F32', shape: [2], data_offsets: [0, 8] }, b: { dtype: 'F32', shape: [2], data_offsets: [4, 12] } }, 12),
      'OFFSETS_OVERLAP',
      '`a`',
    );
  });

  test('an unknown dtype', () => {
    rejects(headerFile('dtype.safetensors', { q: { dtype: 'C64', shape: [1], data_offsets: [0, 8] } }, 8), 'UNSUPPORTED_DTYPE', 'C64');
  });

  test('a header that is not JSON', () => {
    const bytes = new Uint8Array(8 + 16);
    new DataView(bytes.buffer).setBigUint64(0, 16n, true);
    bytes.set(Buffer.from('{not json at all'), 8);
    rejects(tmpFile('json.safetensors', bytes), 'NOT_SAFETENSORS', 'not UTF-8 JSON');
  });

  test('a pickle checkpoint, without executing it', () => {
    // torch.save zip archives start with a local file header `PK\x03\x04`.
    rejects(tmpFile('model.ckpt', new Uint8Array([0x50, 0x4b, 0x03, 0x04, 0, 0, 0, 0, 0, 0])), 'PICKLE_CHECKPOINT', '.safetensors');
    rejects(tmpFile('old.pt', new Uint8Array([0x80, 0x02, 0x7d, 0x71, 0, 0, 0, 0, 0, 0])), 'PICKLE_CHECKPOINT', 'pickle');
  });

  test('a file that does not exist', () => {
    assert.throws(() => openSafetensors(path.join(tmp, 'missing.safetensors')), (e: unknown) => e instanceof ModelError && e.code === 'MODEL_NOT_FOUND');
  });
});

test('writeSafetensors writes a readable file', () => {
  const p = path.join(tmp, 'w.safetensors');
  writeSafetensors(p, { x: { dtype: 'float32', shape: [3], data: new Float32Array([1, 2, 3]) } });
  const f = openSafetensors(p);
  assert.deepEqual(Array.from(f.read('x').data as Float32Array), [1, 2, 3]);
  f.close();
});
