/**
 * The app end to end, as a user drives it: `chorus serve` on the tiny fixture model and LoRAs,
 * Debian's Chromium through playwright-core. Load the model (after a folder with no model fails
 * clearly), see a corrupt LoRA flagged, drag two LoRAs onto the stack and set weights, draw a region
 * per LoRA (a region without a LoRA is flagged), generate with the regions strategy and live progress
 * to 100 %, find the image in the gallery, drop the PNG back in and
 * reload its settings; compare two strategies; the queue lists the jobs. Each screen is saved to
 * docs/screenshots/ for the README.
 *
 * Skips, with the reason, where /usr/bin/chromium is missing (.ci/run installs it).
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import type { BrowserContext, Page } from 'playwright-core';
import sharp from 'sharp';
import { FIXTURES } from '../fixtures.ts';
import { NO_BROWSER, ROOT, buildRenderer, launchChromium, startServe, type ServeProcess } from './harness.ts';

const SHOTS = path.join(ROOT, 'docs', 'screenshots');
const MODEL = path.join(FIXTURES, 'tiny-sd15');
const LORAS = path.join(FIXTURES, 'tiny-sd15-lora');
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'chorus-e2e-'));
const out = path.join(tmp, 'out');
const badLoras = path.join(tmp, 'bad-loras');
const emptyFolder = path.join(tmp, 'no-model-here');
const PROMPT = 'a tiny fox in a meadow';

let serve: ServeProcess | undefined;
let browser: BrowserContext | undefined;
let page: Page;

/** A screenshot for the README: palette PNG (a few hundred colours suffice for the dark UI) to keep the repository small. */
async function shot(name: string): Promise<void> {
  fs.mkdirSync(SHOTS, { recursive: true });
  const png = await page.screenshot();
  await sharp(png).png({ palette: true, quality: 90, compressionLevel: 9, effort: 8 }).toFile(path.join(SHOTS, `${name}.png`));
}

async function screen(name: string): Promise<void> {
  await page.click(`[data-screen=${name}]`);
}

before(async () => {
  if (NO_BROWSER !== undefined) return;
  fs.mkdirSync(badLoras, { recursive: true });
  fs.mkdirSync(emptyFolder, { recursive: true });
  // A LoRA whose header length points past the end of the file.
  fs.writeFileSync(path.join(badLoras, 'broken_lora.safetensors'), Buffer.from([0xff, 0xff, 0, 0, 0, 0, 0, 0, 0x7b]));
  const renderer = await buildRenderer();
  serve = await startServe(
    ['--renderer', renderer, '--models', FIXTURES, '--lora-dir', LORAS, '--lora-dir', badLoras, '--out', out, '--device', 'cpu', '--cache', path.join(tmp, 'cache')],
    { CHORUS_CONFIG_DIR: path.join(tmp, 'config'), CHORUS_DATA_DIR: path.join(tmp, 'data') },
  );
  browser = await launchChromium();
  page = browser.pages()[0] ?? (await browser.newPage());
  page.setDefaultTimeout(30_000);
});

after(async () => {
  await browser?.close();
  await serve?.stop();
});

test('the app in serve mode: model, stack, region, generate, gallery, reload settings, compare, queue', { skip: NO_BROWSER, timeout: 240_000 }, async () => {
  const errors: string[] = [];
  page.on('pageerror', (e) => errors.push(e.message));
  await page.goto(serve!.url);
  // The token went into a cookie and out of the address bar.
  assert.ok(!page.url().includes('token='), page.url());

  // Models: no model yet, so the app starts here, with the --models folder scanned.
  await page.getByTestId('models-screen').waitFor();
  await page.getByTestId('model-candidate').first().waitFor();
  // A folder with no model: a clear typed error, and nothing else changes.
  await page.getByTestId('model-path').fill(emptyFolder);
  await page.getByTestId('model-path').press('Enter');
  const modelError = page.locator('.error-note[data-code]');
  await modelError.waitFor();
  assert.equal(await modelError.getAttribute('data-code'), 'UNKNOWN_MODEL_FORMAT');
  assert.match((await modelError.textContent()) ?? '', /no-model-here is not a diffusers model folder/);
  // Load the fixture model from the scan.
  const tiny = page.getByTestId('model-candidate').filter({ hasText: 'tiny-sd15' }).filter({ hasText: 'diffusers' });
  await tiny.getByTestId('open-model').click();
  await page.getByTestId('model-status').filter({ hasText: 'tiny-sd15' }).waitFor();
  // The status bar names the execution provider (forced to the CPU here) and why.
  const provider = page.getByTestId('provider');
  await provider.waitFor();
  assert.equal((await provider.textContent())?.trim(), 'cpu');
  assert.match((await provider.getAttribute('title')) ?? '', /^cpu: .+; weights fp32/);
  // Memory: unreadable sizes are refused in words; a size is kept and shown.
  const memoryNow = page.getByTestId('memory-now');
  assert.match((await memoryNow.textContent()) ?? '', /all of this machine's RAM \(\d+\.\d GiB\)/);
  await page.getByTestId('memory').fill('lots');
  await page.getByTestId('set-memory').click();
  const memoryError = page.locator('.error-note[data-code=BAD_PAYLOAD]');
  await memoryError.waitFor();
  assert.match((await memoryError.textContent()) ?? '', /memoryBytes: expected a memory size of at least 1G, such as 12G.*got "lots"/);
  await page.getByTestId('memory').fill('3G');
  await page.getByTestId('set-memory').click();
  await memoryNow.filter({ hasText: 'planned for 3.0 GiB' }).waitFor();
  await memoryError.waitFor({ state: 'detached' });
  await shot('models');

  // Create: the library lists the fixture LoRAs and flags the corrupt one.
  await screen('create');
  const broken = page.getByTestId('lora-card').filter({ hasText: 'broken_lora' });
  await broken.waitFor();
  assert.match((await broken.getAttribute('title')) ?? '', /broken_lora\.safetensors/);
  assert.equal(await broken.getAttribute('draggable'), 'false');

  await page.getByTestId('prompt').fill(PROMPT);
  await page.getByTestId('width').fill('64');
  await page.getByTestId('width').press('Tab');
  await page.getByTestId('height').fill('64');
  await page.getByTestId('height').press('Tab');
  await page.getByTestId('steps').fill('4');
  await page.getByTestId('seed-fixed').click();
  await page.getByTestId('seed').fill('1234');

  // Drag two LoRAs onto the stack, the second one dropped before the first.
  const stack = page.getByTestId('stack');
  await page.locator('[data-testid=lora-card][data-name=lora_kohya_a]').dragTo(stack);
  await page.getByTestId('stack-item').first().waitFor();
  await page.locator('[data-testid=lora-card][data-name=lora_peft]').dragTo(page.getByTestId('stack-item').first());
  await assertStack(['lora_peft', 'lora_kohya_a']);
  // kohya_a's trigger words joined the prompt, once.
  const withWords = await page.getByTestId('prompt').inputValue();
  assert.ok(withWords.startsWith(PROMPT), withWords);
  assert.match(withWords, /tinychar/);
  // Reorder by dragging, then set the weights.
  await page.locator('[data-testid=stack-item][data-name=lora_kohya_a] .grip').dragTo(page.locator('[data-testid=stack-item][data-name=lora_peft]'));
  await assertStack(['lora_kohya_a', 'lora_peft']);
  await setWeight('lora_kohya_a', '0.7');
  await setWeight('lora_peft', '0.4');

  // Draw two regions on the 64×64 canvas, one per LoRA. A region without a LoRA is flagged.
  const stage = page.getByTestId('region-stage');
  const drawBox = async (x0: number, y0: number, x1: number, y1: number) => {
    const b = (await stage.boundingBox())!;
    await page.mouse.move(b.x + b.width * x0, b.y + b.height * y0);
    await page.mouse.down();
    await page.mouse.move(b.x + b.width * x1, b.y + b.height * y1, { steps: 8 });
    await page.mouse.up();
  };
  await page.getByTestId('tool-box').click();
  await drawBox(0.05, 0.1, 0.5, 0.9);
  await page.getByTestId('region-box').first().waitFor();
  await page.getByText('Region 1 has no LoRA').waitFor();
  const rows = page.getByTestId('region-row');
  await rows.nth(0).locator('input').fill('a red scarf');
  const optionKey = async (name: string) => (await page.getByTestId('region-lora').first().locator('option', { hasText: name }).getAttribute('value'))!;
  await rows.nth(0).getByTestId('region-lora').selectOption(await optionKey('lora_kohya_a'));
  await drawBox(0.55, 0.1, 0.95, 0.9);
  await rows.nth(1).waitFor();
  await rows.nth(1).locator('input').fill('a blue hat');
  await rows.nth(1).getByTestId('region-lora').selectOption(await optionKey('lora_peft'));
  assert.equal(await page.getByTestId('region-box').count(), 2);
  assert.match((await page.getByTestId('region-box').first().textContent()) ?? '', /lora_kohya_a/);
  // Paint a mask region along the bottom and give it a LoRA too.
  await page.getByTestId('tool-mask').click();
  await drawBox(0.1, 0.93, 0.9, 0.97);
  await rows.nth(2).waitFor();
  assert.match((await rows.nth(2).textContent()) ?? '', /mask/);
  await rows.nth(2).locator('input').fill('grass');
  await rows.nth(2).getByTestId('region-lora').selectOption(await optionKey('lora_kohya_a'));
  assert.equal(await page.getByText(/has no LoRA/).count(), 0);

  // Generate with the regions strategy; Ctrl+Enter starts it; progress with step previews reaches 100 %.
  await page.getByTestId('strategy-select').selectOption('regions');
  await page.getByTestId('prompt').focus();
  await page.keyboard.press('Control+Enter');
  await page.getByTestId('cancel').waitFor();
  await page.getByTestId('progress-text').filter({ hasText: /· (done|failed|cancelled)$/ }).waitFor({ timeout: 120_000 });
  const outcome = (await page.getByTestId('progress-text').textContent()) ?? '';
  assert.match(outcome, /^100% · step 4\/4 · done$/, `${outcome}: ${(await page.getByTestId('generate-panel').locator('.error-note').allTextContents()).join(' ')}`);
  assert.equal(await page.getByTestId('progress').getAttribute('aria-valuenow'), '100');
  assert.match((await page.getByTestId('stage-image').getAttribute('src')) ?? '', /^data:image\/(png|jpeg);base64,/);
  await page.getByTestId('generate').waitFor();
  await shot('create');

  // Gallery: the image is there with its settings.
  await screen('gallery');
  const item = page.getByTestId('gallery-item').first();
  await item.waitFor();
  const file = (await item.getAttribute('data-file'))!;
  assert.match(file, /^\d{5}-1234\.png$/);
  await item.click();
  const detail = page.getByTestId('gallery-detail');
  await detail.locator('img.full').waitFor();
  assert.match((await detail.textContent()) ?? '', /tiny fox in a meadow/);
  await shot('gallery');

  // Change the form, then drop the PNG file into the gallery: its settings come back whole.
  await screen('create');
  await page.getByTestId('prompt').fill('something else');
  await page.getByTestId('seed').fill('99');
  await screen('gallery');
  const png = fs.readFileSync(path.join(out, file)).toString('base64');
  // Runs in the page: build a DataTransfer holding the file, as the OS drop would.
  const transfer = await page.evaluateHandle(`(() => {
    const bytes = Uint8Array.from(atob(${JSON.stringify(png)}), (c) => c.charCodeAt(0));
    const dt = new DataTransfer();
    dt.items.add(new File([bytes], ${JSON.stringify(file)}, { type: 'image/png' }));
    return dt;
  })()`);
  await page.dispatchEvent('[data-testid=gallery-screen]', 'drop', { dataTransfer: transfer });
  const loaded = page.getByTestId('loaded-settings');
  await loaded.waitFor();
  assert.match((await loaded.textContent()) ?? '', /Settings from chorus/);
  assert.match((await loaded.textContent()) ?? '', /a painted-mask region was not restored/);
  await page.getByTestId('apply-loaded').click();
  await page.getByTestId('prompt').waitFor();
  assert.equal(await page.getByTestId('prompt').inputValue(), withWords);
  assert.equal(await page.getByTestId('seed').inputValue(), '1234');
  assert.equal(await page.getByTestId('steps').inputValue(), '4');
  assert.equal(await page.getByTestId('width').inputValue(), '64');
  await assertStack(['lora_kohya_a', 'lora_peft']);
  assert.equal(await weightOf('lora_kohya_a'), '0.7');
  assert.equal(await weightOf('lora_peft'), '0.4');
  assert.equal(await page.getByTestId('region-box').count(), 2);
  assert.equal(await page.getByTestId('strategy-select').inputValue(), 'regions');

  // Compare: the same seed with two strategies, side by side (plain and merge ignore the regions).
  await page.locator('.toast').waitFor({ state: 'detached', timeout: 10_000 });
  await screen('compare');
  await page.getByTestId('run-compare').click();
  await page.getByTestId('compare-cell').locator('img').nth(1).waitFor({ timeout: 120_000 });
  assert.equal(await page.getByTestId('compare-cell').count(), 2);
  await shot('compare');

  // Queue: every job of the session with its outcome.
  await screen('queue');
  await page.getByTestId('queue-job').nth(2).waitFor();
  await page.getByText('No batch jobs.').waitFor();
  const statuses = await page.locator('[data-testid=queue-job] .job-status').allTextContents();
  assert.deepEqual(statuses, ['done', 'done', 'done']);
  // Each job was planned for the memory set on the Models screen.
  assert.equal(await page.getByTestId('queue-job').filter({ hasText: '3.0 GiB plan' }).count(), 3);
  await shot('queue');
  assert.deepEqual(errors, []);
});

async function assertStack(names: string[]): Promise<void> {
  const read = () => page.locator('[data-testid=stack-item]').evaluateAll((els) => els.map((e) => e.getAttribute('data-name')));
  // Svelte updates after the drop event; give it a few frames.
  for (let i = 0; i < 20 && (await read()).join() !== names.join(); i++) await page.waitForTimeout(100);
  assert.deepEqual(await read(), names);
}

async function setWeight(name: string, value: string): Promise<void> {
  const input = page.locator(`[data-testid=stack-item][data-name=${name}] [data-testid=weight-input]`);
  await input.fill(value);
  await input.press('Tab');
}

function weightOf(name: string): Promise<string> {
  return page.locator(`[data-testid=stack-item][data-name=${name}] [data-testid=weight-input]`).inputValue();
}
