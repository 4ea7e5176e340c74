/**
 * Seeded noise: PyTorch's CPU generator against `shared/fixtures/rng/` (torch 1.13 draws), Philox4x32
 * against Random123's known-answer vectors, and A1111's NV generator against A1111's documented output.
 */
import { test, describe, after } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { openSafetensors } from '../models/index.ts';
import { PipelineError } from '../pipelines/errors.ts';
import { createGenerator, parseSeed, SEED_MAX } from '../pipelines/rng/index.ts';
import { Mt19937, TorchCpuGenerator } from '../pipelines/rng/torch-cpu.ts';
import { NvGenerator, philox4x32 } from '../pipelines/rng/philox.ts';
import { accurateLog, accurateSinCos } from '../pipelines/rng/accurate-math.ts';
import { FIXTURES, assertClose } from './fixtures.ts';

const RNG_DIR = path.join(FIXTURES, 'rng');
/** The manifest's stated tolerance: float32 transcendental functions may differ by 1–2 ulp. */
const TORCH_RANDN_ATOL = 1e-6;

interface RngCase {
  name: string;
  shape: number[];
}
const manifest = JSON.parse(fs.readFileSync(path.join(RNG_DIR, 'manifest.json'), 'utf-8')) as { file: string; cases: RngCase[] };
const fixture = openSafetensors(path.join(RNG_DIR, manifest.file));
after(() => fixture.close());

function readF32(key: string): Float32Array {
  const t = fixture.read(key);
  assert.equal(t.dtype, 'float32', `${key} is ${t.dtype}`);
  return t.data as Float32Array;
}
function readF64(key: string): Float64Array {
  const t = fixture.read(key);
  assert.equal(t.dtype, 'float64', `${key} is ${t.dtype}`);
  return t.data as Float64Array;
}

/** Indices where two arrays differ bitwise (NaN-safe via Object.is on the stored values). */
function bitwiseMismatches(actual: ArrayLike<number>, expected: ArrayLike<number>): number[] {
  const out: number[] = [];
  for (let i = 0; i < expected.length; i++) if (!Object.is(actual[i], expected[i])) out.push(i);
  return out;
}

/** Compare within the manifest tolerance first (for the diagnostics), then demand bitwise equality. */
function assertBitwise(actual: ArrayLike<number>, expected: ArrayLike<number>, atol: number, label: string): void {
  assertClose(actual, expected, atol, label);
  const bad = bitwiseMismatches(actual, expected);
  assert.equal(bad.length, 0, `${label}: ${bad.length} of ${expected.length} values within ${atol} but not bitwise equal (first at ${bad[0]}: got ${actual[bad[0]!]}, expected ${expected[bad[0]!]})`);
}

// Seeds above 2^53 do not survive JSON.parse as numbers; the case name carries the exact decimal seed.
const seededCases = manifest.cases
  .filter((c) => /^seed\d+_shape/.test(c.name))
  .map((c) => ({ ...c, seed: BigInt(/^seed(\d+)_/.exec(c.name)![1]!) }));

describe('torch CPU generator matches torch 1.13 draws', () => {
  test('the manifest lists the 54 single-draw cases over 6 seeds', () => {
    assert.equal(seededCases.length, 54);
    assert.deepEqual([...new Set(seededCases.map((c) => c.seed))], [0n, 1n, 42n, 1234567890n, 4294967295n, SEED_MAX]);
  });

  for (const c of seededCases) {
    test(`${c.name}: one randn(${JSON.stringify(c.shape)}) on a fresh generator`, () => {
      assertBitwise(new TorchCpuGenerator(c.seed).randn(c.shape), readF32(c.name), TORCH_RANDN_ATOL, c.name);
    });
  }

  test('four successive [1,4,32,32] draws from one generator (seed 42)', () => {
    const g = new TorchCpuGenerator(42);
    for (let k = 0; k < 4; k++) {
      const key = `sequence_seed42_draw${k}`;
      assertBitwise(g.randn([1, 4, 32, 32]), readF32(key), TORCH_RANDN_ATOL, key);
    }
  });

  test('batch_list_seeds_100_101: one [1,4,32,32] draw per seed, concatenated', () => {
    const expected = readF32('batch_list_seeds_100_101');
    const got = new Float32Array(expected.length);
    got.set(new TorchCpuGenerator(100).randn([1, 4, 32, 32]), 0);
    got.set(new TorchCpuGenerator(101).randn([1, 4, 32, 32]), expected.length / 2);
    assertBitwise(got, expected, TORCH_RANDN_ATOL, 'batch_list_seeds_100_101');
  });

  test('rand float64, seed 42, n 20 (two mt19937 words per value)', () => {
    assertBitwise(new TorchCpuGenerator(42).randFloat64([20]), readF64('rand_f64_seed42_n20'), 0, 'rand_f64_seed42_n20');
  });

  test('randn float64, seed 42, n 20 (double Box–Muller blocks with the tail redraw)', () => {
    assertBitwise(new TorchCpuGenerator(42).randnFloat64([20]), readF64('randn_f64_seed42_n20'), 0, 'randn_f64_seed42_n20');
  });

  test('rand float32 is (mt() & 0xFFFFFF)·2^-24 per element', () => {
    const mt = new Mt19937(42);
    const u = new TorchCpuGenerator(42).rand([16]);
    for (let i = 0; i < 16; i++) assert.equal(u[i], (mt.nextUint32() & 0xffffff) / 2 ** 24, `uniform ${i}`);
  });

  test('only the low 32 bits of the seed count: 2^32 draws what 0 draws', () => {
    assertBitwise(new TorchCpuGenerator(2n ** 32n).randn([2, 3]), readF32('seed0_shape2x3'), 0, 'seed 2^32, [2,3]');
    assertBitwise(new TorchCpuGenerator(2n ** 32n).randn([17]), readF32('seed0_shape17'), 0, 'seed 2^32, [17]');
  });

  test('a [17] draw does not start with the [16] draw (tail redraw)', () => {
    const d16 = readF32('seed0_shape16');
    const d17 = readF32('seed0_shape17');
    assert.notEqual(d17[1], d16[1]);
    // The first position is outside the redrawn tail, so it keeps the first block's value.
    assert.equal(d17[0], d16[0]);
  });
});

describe('torch CPU generator: the cached Box–Muller half of the < 16 path', () => {
  for (const seed of [0, 1, 42]) {
    test(`seed ${seed}: two [7] draws continue one stream, equal to the first 14 of a [15] draw`, () => {
      const g = new TorchCpuGenerator(seed);
      const got = [...g.randn([7]), ...g.randn([7])];
      assertBitwise(got, readF32(`seed${seed}_shape15`).subarray(0, 14), 0, `seed ${seed}, [7]+[7]`);
    });
  }

  test('a ≥ 16 draw neither uses nor clears the cached value', () => {
    const g = new TorchCpuGenerator(0);
    g.randn([7]); // 4 pairs: 7 values out, the 8th cached
    g.randn([16]);
    const [next] = g.randn([1]);
    assert.equal(next, readF32('seed0_shape15')[7]);
  });

  test('manualSeed drops the cached value and restarts the stream', () => {
    const g = new TorchCpuGenerator(5);
    g.randn([7]);
    g.manualSeed(0);
    assertBitwise(g.randn([7]), readF32('seed0_shape7'), 0, 'after manualSeed(0)');
  });
});

describe('mt19937 and the double-double helpers', () => {
  test('mt19937 seeded 5489: first output 3499211612, 10000th 4123659995 (C++ [rand.predef])', () => {
    const mt = new Mt19937(5489);
    assert.equal(mt.nextUint32(), 3499211612);
    let v = 0;
    for (let i = 2; i <= 10000; i++) v = mt.nextUint32();
    assert.equal(v, 4123659995);
  });

  test('accurateLog / accurateSinCos: exact at exact points, within 1 ulp of V8 elsewhere', () => {
    assert.equal(accurateLog(1), 0);
    assert.equal(accurateLog(2), Math.LN2);
    assert.equal(accurateLog(0.5), -Math.LN2);
    const sc = new Float64Array(2);
    accurateSinCos(0, sc);
    assert.deepEqual([...sc], [0, 1]);
    for (let i = 1; i < 2000; i++) {
      const x = i / 2000;
      const theta = 2 * Math.PI * x;
      accurateSinCos(theta, sc);
      assert.ok(Math.abs(accurateLog(x) - Math.log(x)) <= 2 * Number.EPSILON * Math.abs(Math.log(x)) + Number.MIN_VALUE, `log ${x}`);
      assert.ok(Math.abs(sc[0]! - Math.sin(theta)) <= 2.3e-16 && Math.abs(sc[1]! - Math.cos(theta)) <= 2.3e-16, `sincos ${theta}`);
    }
  });
});

/** Random123 `tests/kat_vectors` (DEShawResearch/random123): counter[4], key[2] → output[4]. */
const PHILOX4X32_KAT: ReadonlyArray<{ rounds: number; counter: number[]; key: number[]; expected: number[] }> = [
  { rounds: 10, counter: [0, 0, 0, 0], key: [0, 0], expected: [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8] },
  { rounds: 10, counter: [0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff], key: [0xffffffff, 0xffffffff], expected: [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd] },
  { rounds: 10, counter: [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344], key: [0xa4093822, 0x299f31d0], expected: [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1] },
  { rounds: 7, counter: [0, 0, 0, 0], key: [0, 0], expected: [0x5f6fb709, 0x0d893f64, 0x4f121f81, 0x4f730a48] },
  { rounds: 7, counter: [0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff], key: [0xffffffff, 0xffffffff], expected: [0x5207ddc2, 0x45165e59, 0x4d8ee751, 0x8c52f662] },
  { rounds: 7, counter: [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344], key: [0xa4093822, 0x299f31d0], expected: [0x4dfccaba, 0x190a87f0, 0xc47362ba, 0xb6b5242a] },
];

const hex = (words: ArrayLike<number>): string => Array.from(words, (w) => w.toString(16).padStart(8, '0')).join(' ');

describe('Philox4x32 known answers (Random123 kat_vectors)', () => {
  for (const kat of PHILOX4X32_KAT) {
    test(`philox4x32-${kat.rounds} ${hex(kat.counter)} / ${hex(kat.key)}`, () => {
      assert.equal(hex(philox4x32(kat.counter, kat.key, undefined, kat.rounds)), hex(kat.expected));
    });
  }
});

/**
 * A1111 `modules/rng_philox.py` docstring: `Generator(seed=0).randn(shape=(3, 4))`. These printed
 * values are what the construction gives with the exact constants 2^-32 and 2π/2^32 (they agree to
 * 5e-9); the module's code itself rounds 2π/2^32 to float32 and returns values up to 2.1e-7 away
 * from them, which is what we follow, so the check is at 3e-7.
 */
const A1111_DOCSTRING_SEED0_3X4 = [
  -0.92466259, -0.42534415, -2.6438457, 0.14518388,
  -0.12086647, -0.57972564, -0.62285122, -0.32838709,
  -1.07454231, -0.36314407, -1.67105067, 2.26550497,
];
const A1111_DOCSTRING_ATOL = 3e-7;

/**
 * A1111's box_muller evaluated in numpy 2.4.6 (float32 constants, float64 math, float32 cast) on
 * Philox words from a separate pure-Python Philox4x32-10 (which passes the KATs above); written here
 * as the float32 values' shortest decimal forms, so they compare bitwise.
 */
const NV_NUMPY_DRAWS: ReadonlyArray<{ seed: bigint; call: number; values: number[] }> = [
  { seed: 0n, call: 0, values: [-0.9246624112129211, -0.42534396052360535, -2.643845796585083, 0.14518387615680695, -0.12086650729179382, -0.5797256827354431, -0.6228513121604919, -0.32838714122772217, -1.0745420455932617, -0.3631440997123718, -1.6710504293441772, 2.265505075454712] },
  { seed: 0n, call: 1, values: [0.18082588911056519, -0.5522627234458923, 0.9238134026527405] },
  { seed: 2n ** 32n + 7n, call: 0, values: [-0.2827352285385132, -1.0128042697906494, 0.009528825990855694, 0.44708487391471863] },
  { seed: SEED_MAX, call: 0, values: [0.6323022842407227, 0.03350096940994263, 0.8390876650810242, -2.0634682178497314] },
];

describe('A1111 NV generator', () => {
  test('seed 0, randn([3, 4]) matches the A1111 docstring within its printed precision', () => {
    assertClose(new NvGenerator(0).randn([3, 4]), A1111_DOCSTRING_SEED0_3X4, A1111_DOCSTRING_ATOL, 'NV seed 0 [3,4]');
  });

  for (const d of NV_NUMPY_DRAWS) {
    test(`seed ${d.seed}, call ${d.call}: bitwise equal to the numpy evaluation`, () => {
      const g = new NvGenerator(d.seed);
      for (let k = 0; k < d.call; k++) g.randn([d.values.length]);
      assertBitwise(g.randn([d.values.length]), Float32Array.from(d.values), 0, `NV seed ${d.seed} call ${d.call}`);
    });
  }

  test('element i depends on the seed, the call index and i only: shapes with one size agree, prefixes agree', () => {
    const a = new NvGenerator(1234).randn([2, 6]);
    assert.deepEqual([...a], [...new NvGenerator(1234).randn([12])]);
    assert.deepEqual([...new NvGenerator(1234).randn([5])], [...a.subarray(0, 5)]);
  });

  test('each call moves to the next offset; a fresh generator repeats the sequence', () => {
    const g = new NvGenerator(99);
    const first = g.randn([64]);
    const second = g.randn([64]);
    assert.notDeepEqual([...first], [...second]);
    const h = new NvGenerator(99);
    assert.deepEqual([...h.randn([64])], [...first]);
    assert.deepEqual([...h.randn([64])], [...second]);
  });

  test('a [1,4,64,64] draw looks standard normal (mean, variance, tails)', () => {
    const x = new NvGenerator(31337).randn([1, 4, 64, 64]);
    let sum = 0;
    let sumSq = 0;
    let beyond2 = 0;
    for (const v of x) {
      assert.ok(Number.isFinite(v));
      sum += v;
      sumSq += v * v;
      if (Math.abs(v) > 2) beyond2++;
    }
    const n = x.length;
    const mean = sum / n;
    const variance = sumSq / n - mean * mean;
    // 5 standard errors: sd(mean) = 1/√n ≈ 0.0078, sd(var) ≈ √(2/n) ≈ 0.011, sd(P(|z|>2)) ≈ 0.0017.
    assert.ok(Math.abs(mean) < 5 / Math.sqrt(n), `mean ${mean}`);
    assert.ok(Math.abs(variance - 1) < 5 * Math.sqrt(2 / n), `variance ${variance}`);
    assert.ok(Math.abs(beyond2 / n - 0.0455) < 0.0085, `P(|z| > 2) = ${beyond2 / n}`);
  });
});

describe('createGenerator', () => {
  test("'cpu' reproduces the torch fixture and continues the stream", () => {
    const g = createGenerator('cpu', 42);
    assert.equal(g.kind, 'cpu');
    assertBitwise(g.randn([1, 4, 32, 32]), readF32('sequence_seed42_draw0'), 0, 'cpu draw 0');
    assertBitwise(g.randn([1, 4, 32, 32]), readF32('sequence_seed42_draw1'), 0, 'cpu draw 1');
  });

  test("'cpu' takes 2^64 − 1 as a bigint", () => {
    assertBitwise(createGenerator('cpu', SEED_MAX).randn([7]), readF32('seed18446744073709551615_shape7'), 0, 'cpu 2^64-1');
  });

  test("'nv' is A1111's generator", () => {
    const g = createGenerator('nv', 0);
    assert.equal(g.kind, 'nv');
    assertBitwise(g.randn([12]), Float32Array.from(NV_NUMPY_DRAWS[0]!.values), 0, 'nv seed 0');
  });
});

describe('parseSeed', () => {
  test('accepts decimal text, safe integers and bigints from 0 to 2^64 − 1', () => {
    assert.equal(parseSeed('0'), 0n);
    assert.equal(parseSeed(' 42\n'), 42n);
    assert.equal(parseSeed('18446744073709551615'), 2n ** 64n - 1n);
    assert.equal(parseSeed(Number.MAX_SAFE_INTEGER), 2n ** 53n - 1n);
    assert.equal(parseSeed(1234567890), 1234567890n);
    assert.equal(parseSeed(2n ** 64n - 1n), SEED_MAX);
  });
});

describe('rejects bad seeds', () => {
  const cases: ReadonlyArray<{ value: string | number | bigint; shown: string }> = [
    { value: -1, shown: '-1' },
    { value: '-1', shown: '"-1"' },
    { value: -5n, shown: '-5' },
    { value: '18446744073709551616', shown: '"18446744073709551616"' },
    { value: 2n ** 64n, shown: '18446744073709551616' },
    { value: 1.5, shown: '1.5' },
    { value: '1.5', shown: '"1.5"' },
    { value: 'abc', shown: '"abc"' },
    { value: '', shown: '""' },
    { value: '0x10', shown: '"0x10"' },
    { value: '1e3', shown: '"1e3"' },
    { value: Number.NaN, shown: 'NaN' },
    { value: Number.POSITIVE_INFINITY, shown: 'Infinity' },
    { value: 2 ** 53, shown: '9007199254740992' },
  ];
  for (const c of cases) {
    test(`${typeof c.value} ${c.shown}`, () => {
      assert.throws(
        () => parseSeed(c.value),
        (e: unknown) => {
          assert.ok(e instanceof PipelineError, `expected PipelineError, got ${String(e)}`);
          assert.equal(e.code, 'BAD_SEED');
          assert.ok(e.message.includes(`seed ${c.shown} `), `message names the value: ${e.message}`);
          assert.equal(e.details.max, '18446744073709551615');
          return true;
        },
      );
    });
  }

  test('createGenerator rejects the same way', () => {
    assert.throws(() => createGenerator('nv', -3), (e: unknown) => e instanceof PipelineError && e.code === 'BAD_SEED' && e.message.includes('seed -3 '));
    assert.throws(() => createGenerator('cpu', 2n ** 64n), (e: unknown) => e instanceof PipelineError && e.code === 'BAD_SEED' && e.message.includes('18446744073709551616'));
  });

  test('long garbage is cut in the message but kept whole in details', () => {
    const junk = 'x'.repeat(500);
    assert.throws(
      () => parseSeed(junk),
      (e: unknown) => e instanceof PipelineError && e.message.length < 300 && e.message.includes('xxxx…') && e.details.value === junk,
    );
  });
});
