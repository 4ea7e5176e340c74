/**
 * Bundles the Electron side with Vite (already a dev dependency) into dist/electron:
 * - main.js (ESM): main process modules; `electron` and Node builtins external;
 * - preload.cjs (CommonJS, one file): sandboxed preloads cannot load modules, so its only
 *   import is `electron`;
 * - engine-host.js (ESM): the utility process; npm dependencies stay external (onnxruntime-node and
 *   sharp are native and unpacked from the asar, see build/electron-builder.yml).
 * Run: `npm run build:electron` (after `npm run build:renderer`).
 */
import { builtinModules } from 'node:module';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { build } from 'vite';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
export const ELECTRON_DIST = path.join(ROOT, 'dist', 'electron');
const NODE_BUILTINS = [...builtinModules, ...builtinModules.map((m) => `node:${m}`)];

export type BundleName = 'main' | 'preload' | 'engine-host';

const BUNDLES: Readonly<Record<BundleName, { entry: string; format: 'es' | 'cjs'; file: string; bundleDependencies: boolean }>> = {
  main: { entry: 'electron/main.ts', format: 'es', file: 'main.js', bundleDependencies: true },
  preload: { entry: 'electron/preload.ts', format: 'cjs', file: 'preload.cjs', bundleDependencies: true },
  'engine-host': { entry: 'electron/engine-host.ts', format: 'es', file: 'engine-host.js', bundleDependencies: false },
};

export async function buildElectron(names: readonly BundleName[] = ['main', 'preload', 'engine-host'], outDir = ELECTRON_DIST): Promise<void> {
  for (const name of names) {
    const b = BUNDLES[name];
    await build({
      configFile: false,
      root: ROOT,
      logLevel: 'warn',
      ssr: { noExternal: b.bundleDependencies ? true : [], target: 'node' },
      build: {
        ssr: path.join(ROOT, b.entry),
        outDir,
        emptyOutDir: false,
        target: 'node20',
        minify: false,
        rollupOptions: {
          external: ['electron', ...NODE_BUILTINS],
          output: { format: b.format, entryFileNames: b.file, inlineDynamicImports: true },
        },
      },
    });
  }
}

if (process.argv[1] !== undefined && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  await buildElectron();
}
