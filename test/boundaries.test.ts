/**
 * Module boundaries (STYLE.md section 2), checked by reading import statements: a violation fails
 * naming the file, the line and the rule.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const SOURCE = /\.(ts|mts|svelte)$/;

interface Import {
  file: string;
  line: number;
  spec: string;
  typeOnly: boolean;
}

function sources(dir: string): string[] {
  const abs = path.join(ROOT, dir);
  if (!fs.existsSync(abs)) return [];
  return fs.readdirSync(abs, { recursive: true, encoding: 'utf-8' }).filter((f) => SOURCE.test(f)).map((f) => path.join(dir, f));
}

function importsOf(file: string): Import[] {
  return parseImports(file, fs.readFileSync(path.join(ROOT, file), 'utf-8'));
}

function parseImports(file: string, text: string): Import[] {
  const out: Import[] = [];
  // `import … from '…'` / `export … from '…'` (possibly over several lines), `import '…'`, `import('…')`.
  const patterns = [/^\s*(?:import|export)\s+(type\s+)?[^;'"]*?\sfrom\s+['"]([^'"]+)['"]/gm, /^\s*import\s+()['"]([^'"]+)['"]/gm, /\bimport\(\s*()['"]([^'"]+)['"]\s*\)/g];
  for (const re of patterns) {
    for (const m of text.matchAll(re)) {
      const line = text.slice(0, m.index).split('\n').length + (m[0].match(/^\s*/)?.[0].split('\n').length ?? 1) - 1;
      out.push({ file, line, spec: m[2]!, typeOnly: m[1] !== undefined && m[1] !== '' });
    }
  }
  return out;
}

/** The repo-relative path an import resolves to ('' for packages). */
function target(imp: Import): string {
  if (!imp.spec.startsWith('.')) return '';
  return path.relative(ROOT, path.resolve(ROOT, path.dirname(imp.file), imp.spec));
}

function violations(dir: string, rule: (imp: Import, to: string) => string | undefined): string[] {
  const found: string[] = [];
  for (const file of sources(dir)) {
    for (const imp of importsOf(file)) {
      const why = rule(imp, target(imp));
      if (why !== undefined) found.push(`${imp.file}:${imp.line} imports ${imp.spec}: ${why}`);
    }
  }
  return found;
}

test('models/ imports only Node builtins, its own files and its few packages', () => {
  const v = violations('models', (imp, to) => {
    if (to !== '' && !to.startsWith('models')) return 'models/ never imports pipelines/, electron/, renderer/ or cli/';
    if (imp.spec === 'onnxruntime-node' && imp.file !== path.join('models', 'runtime.ts')) return 'onnxruntime-node is imported only by models/runtime.ts';
    if (to === '' && !imp.spec.startsWith('node:') && !['onnxruntime-node', 'yaml'].includes(imp.spec)) return 'unexpected package in models/';
    return undefined;
  });
  assert.deepEqual(v, []);
});

test('pipelines/ reaches models/ only through models/index.ts, never onnxruntime-node or electron', () => {
  const v = violations('pipelines', (imp, to) => {
    if (to.startsWith('models') && to !== path.join('models', 'index.ts')) return 'use the public surface models/index.ts';
    if (['onnxruntime-node', 'electron'].includes(imp.spec)) return 'not allowed in pipelines/';
    if (to.startsWith('electron') || to.startsWith('renderer') || to.startsWith('cli')) return 'pipelines/ never imports the shells';
    return undefined;
  });
  assert.deepEqual(v, []);
});

test('cli/ uses public surfaces only, never electron', () => {
  const v = violations('cli', (imp, to) => {
    if (imp.spec === 'electron' || to.startsWith('electron') || to.startsWith('renderer')) return 'cli/ never imports electron or the renderer';
    if (to.startsWith('models') && to !== path.join('models', 'index.ts')) return 'use models/index.ts';
    if (to.startsWith('pipelines') && to !== path.join('pipelines', 'index.ts')) return 'use pipelines/index.ts';
    if (imp.spec === 'onnxruntime-node') return 'only models/runtime.ts imports onnxruntime-node';
    return undefined;
  });
  assert.deepEqual(v, []);
});

test('renderer/ imports only types from outside renderer/', () => {
  const v = violations('renderer', (imp, to) => (to !== '' && !to.startsWith('renderer') && !imp.typeOnly ? 'the renderer only uses `import type` from the contract' : undefined));
  assert.deepEqual(v, []);
});

test('the boundary check itself sees a violation', () => {
  const imp: Import = { file: path.join('pipelines', 'x.ts'), line: 3, spec: '../models/runtime.ts', typeOnly: false };
  assert.equal(target(imp), path.join('models', 'runtime.ts'));
  assert.ok(importsOf(path.join('models', 'engine.ts')).some((i) => i.spec === './cache.ts'));
  const parsed = parseImports('x.ts', "// x\nimport {\n  a,\n  b,\n} from '../models/runtime.ts';\nimport type { T } from './t.ts';\n");
  assert.deepEqual(
    parsed.map((i) => [i.line, i.spec, i.typeOnly]),
    [
      [2, '../models/runtime.ts', false],
      [6, './t.ts', true],
    ],
  );
});
