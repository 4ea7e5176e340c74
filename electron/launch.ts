/**
 * `npm start`: the desktop app when the Electron binary is installed, else the same app in the
 * browser (`chorus serve`), saying why. Electron is an optional dependency: its binary is a download
 * that fails on machines without access to it, and its npm package needs Node ≥ 22.12.
 * Starts either as a child process (stdio shared), so this file imports neither Electron nor the CLI.
 */
import { spawn, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import { createRequire } from 'node:module';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');

/** The Electron binary, or why there is none. */
export function findElectron(): { binary: string } | { missing: string } {
  let binary: unknown;
  try {
    // The electron package's main export is the path of the binary it downloaded.
    binary = createRequire(import.meta.url)('electron');
  } catch (e) {
    return { missing: (e as NodeJS.ErrnoException).code === 'MODULE_NOT_FOUND' ? 'the electron package is not installed (it is optional; its binary could not be downloaded, or Node is older than 22.12)' : (e as Error).message };
  }
  if (typeof binary !== 'string' || !fs.existsSync(binary)) return { missing: `the Electron binary is missing (${String(binary)})` };
  return { binary };
}

function run(args: readonly string[]): Promise<number> {
  return new Promise((resolve) => {
    const child = spawn(args[0]!, args.slice(1), { cwd: ROOT, stdio: 'inherit' });
    const forward = (signal: NodeJS.Signals) => child.kill(signal);
    process.on('SIGINT', forward);
    process.on('SIGTERM', forward);
    child.on('exit', (code) => resolve(code ?? 0));
  });
}

async function main(): Promise<number> {
  const extra = process.argv.slice(2);
  const electron = findElectron();
  if ('missing' in electron) {
    process.stderr.write(`Chorus: no desktop window here: ${electron.missing}. Starting the app in your browser instead; open the URL below.\n`);
    return run([process.execPath, path.join(ROOT, 'cli', 'bin', 'chorus.mjs'), 'serve', ...extra]);
  }
  for (const script of ['build:renderer', 'build:electron']) {
    const r = spawnSync(process.platform === 'win32' ? 'npm.cmd' : 'npm', ['run', '--silent', script], { cwd: ROOT, stdio: 'inherit' });
    if (r.status !== 0) return r.status ?? 1;
  }
  return run([electron.binary, path.join(ROOT, 'dist', 'electron', 'main.js'), ...extra]);
}

if (process.argv[1] !== undefined && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  process.exitCode = await main();
}
