/**
 * The installer configuration (build/electron-builder.yml), checked without building (the Electron
 * binary cannot be downloaded here): electron-builder's own schema accepts it, the targets are the
 * promised ones, native modules are unpacked from the asar (their real files match the globs,
 * DirectML's DLLs included), and the files it names exist after a build.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import { createRequire } from 'node:module';
import * as path from 'node:path';
import { parse } from 'yaml';
import { ROOT } from './e2e/harness.ts';

const CONFIG = path.join(ROOT, 'build', 'electron-builder.yml');
const config = parse(fs.readFileSync(CONFIG, 'utf-8')) as Record<string, any>;

/** Glob → RegExp for electron-builder's patterns: `**`, `*`, `{a,b}` (enough for this file). */
function globRegExp(glob: string): RegExp {
  let re = '';
  for (let i = 0; i < glob.length; i++) {
    const c = glob[i]!;
    if (c === '*' && glob[i + 1] === '*') {
      re += glob[i + 2] === '/' ? '(?:.*/)?' : '.*';
      i += glob[i + 2] === '/' ? 2 : 1;
    } else if (c === '*') re += '[^/]*';
    else if (c === '{') re += '(?:';
    else if (c === '}') re += ')';
    else if (c === ',') re += '|';
    else re += c.replace(/[.+?^$()|[\]\\]/g, '\\$&');
  }
  return new RegExp(`^${re}$`);
}

const unpacked = (file: string) => (config.asarUnpack as string[]).some((g) => globRegExp(g).test(file));

test('electron-builder accepts the configuration (its own schema), and rejects a misspelt key', async () => {
  const require = createRequire(path.join(ROOT, 'node_modules', 'electron-builder', 'package.json'));
  const { validateConfiguration } = require('app-builder-lib/out/util/config/config.js') as { validateConfiguration: (c: unknown, l: unknown) => Promise<void> };
  const { DebugLogger } = require('builder-util') as { DebugLogger: new (enabled: boolean) => unknown };
  await validateConfiguration(structuredClone(config), new DebugLogger(false));
  await assert.rejects(validateConfiguration({ ...structuredClone(config), nsis: { ...config.nsis, oneClik: false } }, new DebugLogger(false)), /configuration\.nsis/);
});

test('installers: Windows NSIS, macOS DMG, Linux AppImage and deb', () => {
  const targets = (platform: string) => (config[platform].target as Array<{ target: string }>).map((t) => t.target);
  assert.deepEqual(targets('win'), ['nsis']);
  assert.deepEqual(targets('mac'), ['dmg']);
  assert.deepEqual(targets('linux'), ['AppImage', 'deb']);
  assert.equal(config.nsis.oneClick, false);
  assert.equal(config.mac.hardenedRuntime, true);
  for (const p of ['win', 'mac', 'linux']) assert.ok(fs.existsSync(path.join(ROOT, config[p].icon)), `${p} icon`);
  assert.ok(fs.existsSync(path.join(ROOT, config.mac.entitlements)));
  assert.equal(config.publish, null, 'nothing is uploaded anywhere');
});

test('onnxruntime-node (with DirectML), sharp and better-sqlite3 are unpacked from the asar; app code is not', () => {
  assert.equal(config.asar, true);
  const ortBin = path.join(ROOT, 'node_modules', 'onnxruntime-node', 'bin');
  const native = fs
    .readdirSync(ortBin, { recursive: true, encoding: 'utf-8' })
    .filter((f) => /\.(node|dll|dylib)$|\.so(\.\d+)*$/.test(f))
    .map((f) => `node_modules/onnxruntime-node/bin/${f.split(path.sep).join('/')}`);
  assert.ok(native.some((f) => f.endsWith('win32/x64/DirectML.dll')), 'the installed onnxruntime-node carries DirectML');
  for (const f of native) assert.ok(unpacked(f), f);
  for (const f of ['node_modules/sharp/lib/index.js', 'node_modules/@img/sharp-win32-x64/lib/sharp-win32-x64.node', 'node_modules/@img/sharp-libvips-darwin-arm64/lib/libvips-cpp.42.dylib', 'node_modules/better-sqlite3/build/Release/better_sqlite3.node']) {
    assert.ok(unpacked(f), f);
  }
  for (const f of ['dist/electron/main.js', 'dist/electron/engine-host.js', 'dist/renderer/index.html', 'node_modules/yaml/dist/index.js']) assert.ok(!unpacked(f), f);
});

test('the packaged app starts from the bundled main and ships only the built code', () => {
  assert.equal(config.extraMetadata.main, 'dist/electron/main.js');
  assert.deepEqual(config.files.slice(0, 3), ['dist/electron/**', 'dist/renderer/**', 'package.json']);
  assert.equal(config.directories.output, 'dist/release');
  assert.ok(config.files.includes('!dist/release/**'), 'earlier installers are not packed into the next');
  const pkg = JSON.parse(fs.readFileSync(path.join(ROOT, 'package.json'), 'utf-8')) as { scripts: Record<string, string> };
  assert.match(pkg.scripts.dist ?? '', /electron-builder --config build\/electron-builder\.yml/);
  assert.equal(config.electronVersion, (JSON.parse(fs.readFileSync(path.join(ROOT, 'package.json'), 'utf-8')) as { optionalDependencies: Record<string, string> }).optionalDependencies.electron);
});
