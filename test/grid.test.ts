/**
 * X/Y/Z grids: the `--grid` syntax, expansion into jobs (a 2×3 grid gives 6 valid jobs in X-fastest
 * order), and the labelled grid image: cells exactly where the layout says, ink in every label, on
 * synthetic cells and end to end on the tiny model.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import sharp from 'sharp';
import { PipelineError } from '../pipelines/errors.ts';
import { composeGridImage, expandGrid, gridLayout, parseGridSpec, setSpecField, type GridLayout } from '../pipelines/jobs/grid.ts';
import { parseJobSpec } from '../pipelines/jobs/schema.ts';
import { composeBatchGrids, openBatch, planBatch } from '../pipelines/queue/batch-file.ts';
import { engineModelSource, type ModelSource } from '../pipelines/queue/model-source.ts';
import { runQueue } from '../pipelines/queue/runner.ts';
import { JobQueue } from '../pipelines/queue/store.ts';
import { FIXTURES } from './fixtures.ts';

const MODEL = path.join(FIXTURES, 'tiny-sd15');
const LORA_DIR = path.join(FIXTURES, 'tiny-sd15-lora');
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'chorus-grid-'));
/** A pixel counts as label ink when its darkest channel is below this (labels are black on white). */
const INK = 128;

describe('the grid spec', () => {
  test('axes in X, Y, Z order; JSON values, ranges, text, quoted commas', () => {
    const spec = parseGridSpec('loras[0].unet=0.4, 0.8 ; strategy=plain,"composite",{"name":"switch","switchEvery":2}; prompt="a cat, red",a dog; ');
    assert.deepEqual(spec.axes.map((a) => a.field), ['loras[0].unet', 'strategy', 'prompt']);
    assert.deepEqual(spec.axes[0]!.values, [0.4, 0.8]);
    assert.deepEqual(spec.axes[1]!.values, ['plain', 'composite', { name: 'switch', switchEvery: 2 }]);
    assert.deepEqual(spec.axes[1]!.labels, ['plain', 'composite', 'switch (switchEvery=2)']);
    assert.deepEqual(spec.axes[2]!.values, ['a cat, red', 'a dog']);
    assert.deepEqual(parseGridSpec('seed=3..1').axes[0]!.values, [3, 2, 1]);
    assert.deepEqual(parseGridSpec('sampler=DPM++ 2M,Euler a').axes[0]!.values, ['DPM++ 2M', 'Euler a']);
    assert.deepEqual(parseGridSpec('loras=[],[{"name":"x/style.safetensors","te":0.5,"unet":1}]').axes[0]!.labels, ['none', 'style:0.5/1']);
  });

  const rejects: Array<[string, RegExp]> = [
    ['', /no axis/],
    ['colour=1,2', /"colour" is not a job field; use one of name, model, prompt/],
    ['version=1,2', /"version" is not a job field/],
    ['cfgScale', /axis x "cfgScale" needs the form field=value/],
    ['a=1;b=2;c=3;d=4', /4 axes; a grid has at most 3/],
    ['seed=1,2;seed=3', /the field seed is on two axes/],
    ['prompt="a cat', /unbalanced quotes or brackets/],
    ['seed=1,,2', /an empty value/],
    ['seed=1..5000', /has 5000 values; at most 1000/],
    ['loras[x].te=1', /"loras\[x\]\.te" is not a field path/],
  ];
  for (const [text, says] of rejects) {
    test(`rejects ${JSON.stringify(text)}`, () => {
      assert.throws(() => parseGridSpec(text), (e: unknown) => e instanceof PipelineError && e.code === 'BAD_ARGUMENT' && e.message.startsWith('--grid: ') && says.test(e.message));
    });
  }

  test('a path into a missing array entry or through text is rejected, naming the path', () => {
    const base = { model: 'm', prompt: 'p', loras: [{ name: 'a' }], strategy: 'switch' };
    assert.throws(() => setSpecField(base, 'loras[1].te', 1), /--grid: loras\[1\]\.te: the job has 1 entry in loras; a grid changes existing entries/);
    assert.throws(() => setSpecField(base, 'prompt.x', 1), /--grid: prompt\.x: prompt is "p", not an object or array/);
    assert.deepEqual(setSpecField(base, 'strategy.switchEvery', 3), { ...base, strategy: { name: 'switch', switchEvery: 3 } });
    assert.deepEqual(base.strategy, 'switch', 'the base spec is not modified');
  });
});

describe('a 2×3 grid', () => {
  const base = { model: MODEL, prompt: 'a cat', seed: 1, steps: 2, width: 64, height: 64, loras: [{ name: 'lora_kohya_a', te: 1 }] };
  const grid = parseGridSpec('loras[0].unet=0.4,0.8; strategy=plain,merge,"composite"');

  test('expands into 6 valid jobs, X fastest, and one grid image plan', () => {
    const { jobs, images } = expandGrid([base], grid);
    assert.equal(jobs.length, 6);
    const parsed = jobs.map((j) => parseJobSpec(j.spec).job);
    assert.deepEqual(parsed.map((j) => [j.loras[0]!.unet, j.strategy.name]), [
      [0.4, 'plain'], [0.8, 'plain'],
      [0.4, 'merge'], [0.8, 'merge'],
      [0.4, 'composite'], [0.8, 'composite'],
    ]);
    assert.deepEqual(parsed.map((j) => j.loras[0]!.te), [1, 1, 1, 1, 1, 1], 'only the axis field changes');
    assert.deepEqual(jobs.map((j) => [j.cell.x, j.cell.y, j.note]), [[0, 0, 'grid x=1 y=1'], [1, 0, 'grid x=2 y=1'], [0, 1, 'grid x=1 y=2'], [1, 1, 'grid x=2 y=2'], [0, 2, 'grid x=1 y=3'], [1, 2, 'grid x=2 y=3']]);
    assert.deepEqual(images, [{ file: 'grid-001.png', title: ['X: loras[0].unet', 'Y: strategy'], columns: ['0.4', '0.8'], rows: ['plain', 'merge', 'composite'], cells: [0, 1, 2, 3, 4, 5] }]);
  });

  test('a Z axis makes one grid image per value, per job line', () => {
    const { jobs, images } = expandGrid([base, { ...base, prompt: 'a dog' }], parseGridSpec('cfgScale=5,7; seed=1,2; steps=2,3'));
    assert.equal(jobs.length, 16);
    assert.deepEqual(images.map((i) => [i.title[0], i.cells]), [
      ['steps: 2', [0, 1, 2, 3]],
      ['steps: 3', [4, 5, 6, 7]],
      ['steps: 2', [8, 9, 10, 11]],
      ['steps: 3', [12, 13, 14, 15]],
    ]);
  });
});

/** Whether any pixel in the box is label ink. */
function hasInk(rgb: Buffer, width: number, box: { x: number; y: number; w: number; h: number }): boolean {
  for (let y = box.y; y < box.y + box.h; y++) {
    for (let x = box.x; x < box.x + box.w; x++) {
      const i = (y * width + x) * 3;
      if (Math.min(rgb[i]!, rgb[i + 1]!, rgb[i + 2]!) < INK) return true;
    }
  }
  return false;
}

function checkLabels(rgb: Buffer, layout: GridLayout, columns: number, rows: number): void {
  const { width, left, top, cellWidth, cellHeight, titleHeight, headerHeight } = layout;
  assert.ok(hasInk(rgb, width, { x: 0, y: 0, w: width, h: titleHeight }), 'title');
  for (let c = 0; c < columns; c++) assert.ok(hasInk(rgb, width, { x: left + c * cellWidth, y: titleHeight, w: cellWidth, h: headerHeight }), `column header ${c}`);
  for (let r = 0; r < rows; r++) assert.ok(hasInk(rgb, width, { x: 0, y: top + r * cellHeight, w: left, h: cellHeight }), `row header ${r}`);
}

describe('the labelled grid image', () => {
  test('cells at their offsets, pixel for pixel; every label drawn; a missing cell grey', async () => {
    const colours = [[200, 30, 30], [30, 200, 30], [30, 30, 200], [200, 200, 30], [30, 200, 200]];
    const cells = await Promise.all(colours.map(async ([r, g, b]) => new Uint8Array(await sharp({ create: { width: 64, height: 64, channels: 3, background: { r: r!, g: g!, b: b! } } }).png().toBuffer())));
    const { png, layout } = await composeGridImage({ title: ['X: cfgScale', 'Y: seed'], columns: ['5', '7'], rows: ['1', '2', '3'], cells: [...cells, undefined] });
    const { data, info } = await sharp(png).raw().toBuffer({ resolveWithObject: true });
    assert.deepEqual([info.width, info.height, info.channels], [layout.width, layout.height, 3]);
    assert.ok(layout.left > 0 && layout.top > 0);
    assert.equal(layout.width - layout.left, 2 * 64);
    assert.equal(layout.height - layout.top, 3 * 64);
    for (let i = 0; i < 6; i++) {
      const expected = colours[i] ?? [0xdd, 0xdd, 0xdd];
      const x0 = layout.left + (i % 2) * 64;
      const y0 = layout.top + Math.floor(i / 2) * 64;
      for (const [dx, dy] of [[0, 0], [63, 0], [0, 63], [63, 63], [32, 32]]) {
        const p = ((y0 + dy!) * info.width + x0 + dx!) * 3;
        assert.deepEqual([...data.subarray(p, p + 3)], expected, `cell ${i} pixel (${dx}, ${dy})`);
      }
    }
    checkLabels(data, layout, 2, 3);
  });
});

describe('a 2×3 grid on the tiny model', () => {
  let source: ModelSource;
  before(() => {
    source = engineModelSource({ engine: { device: 'cpu', cacheDir: path.join(tmp, 'cache') }, loraDirs: [LORA_DIR] });
  });
  after(async () => source.dispose());

  test('6 jobs done and grid-001.png holding their images under the labels', async () => {
    const file = path.join(tmp, 'grid.jsonl');
    fs.writeFileSync(file, JSON.stringify({ model: MODEL, prompt: 'a cat', seed: 1, steps: 2, width: 64, height: 64, loras: [{ name: 'lora_kohya_a', te: 1 }] }));
    const q = JobQueue.open({ file: path.join(tmp, 'q.sqlite') });
    const plan = planBatch(file, { outDir: path.join(tmp, 'out'), grid: 'loras[0].unet=0.4,0.8; seed=1,2,3' });
    assert.equal(plan.jobs.length, 6);
    const { batch } = openBatch(q, plan);
    await runQueue({ queue: q, source, batchId: batch.id });
    const jobs = q.list({ batchId: batch.id });
    assert.deepEqual(jobs.map((j) => j.state), Array(6).fill('done'));
    assert.deepEqual(jobs.map((j) => [j.entry.job.loras[0]!.unet, String(j.entry.job.seed)]), [[0.4, '1'], [0.8, '1'], [0.4, '2'], [0.8, '2'], [0.4, '3'], [0.8, '3']]);
    const [gridFile] = await composeBatchGrids(q, batch.id);
    assert.equal(gridFile, path.join(plan.outDir, 'grid-001.png'));
    const { data, info } = await sharp(fs.readFileSync(gridFile!)).raw().toBuffer({ resolveWithObject: true });
    const layout = gridLayout(2, ['1', '2', '3'], 64, 64, 2);
    assert.deepEqual([info.width, info.height], [layout.width, layout.height]);
    assert.deepEqual([info.width - layout.left, info.height - layout.top], [128, 192]);
    for (const [i, job] of jobs.entries()) {
      const cell = await sharp(fs.readFileSync(job.outputs[0]!.path)).raw().toBuffer();
      const x0 = layout.left + (i % 2) * 64;
      const y0 = layout.top + Math.floor(i / 2) * 64;
      for (let y = 0; y < 64; y++) {
        const row = data.subarray(((y0 + y) * info.width + x0) * 3, ((y0 + y) * info.width + x0 + 64) * 3);
        assert.ok(row.equals(cell.subarray(y * 64 * 3, (y + 1) * 64 * 3)), `job ${i + 1} row ${y} in its cell`);
      }
    }
    checkLabels(data, layout, 2, 3);
    q.dispose();
  });
});
