/**
 * What the browser tests share: Debian's Chromium driven by playwright-core (never a downloaded
 * browser), the renderer built once per run into a temp folder, and `chorus serve` started as users
 * start it, its one printed line parsed.
 */
import { spawn, type ChildProcessWithoutNullStreams } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import type { BrowserContext } from 'playwright-core';

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
export const CHROMIUM = '/usr/bin/chromium';
/** Why browser tests are skipped here, or undefined when they can run. */
export const NO_BROWSER = fs.existsSync(CHROMIUM) ? undefined : `${CHROMIUM} is missing: install Debian's Chromium (apt-get install -y chromium; .ci/run does) to run the browser tests`;
export const RUNNING_LINE = /^Chorus is running at (http:\/\/127\.0\.0\.1:(\d+)\/\?token=([A-Za-z0-9_-]{20,}))$/;

/** Chromium with a fresh profile (Playwright takes the profile folder as `userDataDir`, not as a flag). */
export async function launchChromium(viewport = { width: 1280, height: 800 }): Promise<BrowserContext> {
  const { chromium } = await import('playwright-core');
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'chorus-chromium-'));
  return chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    headless: true,
    viewport,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
}

let built: Promise<string> | undefined;
/** Build the renderer into a temp folder (once per process). */
export function buildRenderer(): Promise<string> {
  built ??= (async () => {
    const out = fs.mkdtempSync(path.join(os.tmpdir(), 'chorus-renderer-'));
    const { build } = await import('vite');
    await build({ configFile: path.join(ROOT, 'vite.config.ts'), logLevel: 'error', build: { outDir: out, emptyOutDir: true } });
    return out;
  })();
  return built;
}

export interface ServeProcess {
  readonly url: string;
  readonly port: number;
  readonly token: string;
  readonly line: string;
  readonly child: ChildProcessWithoutNullStreams;
  stderr(): string;
  stop(): Promise<void>;
}

/** Start `chorus serve` with these arguments; resolves with its printed line (rejects if it exits first). */
export function startServe(args: readonly string[], env: Record<string, string> = {}, command: readonly string[] = [path.join(ROOT, 'cli', 'bin', 'chorus.mjs'), 'serve']): Promise<ServeProcess> {
  const child = spawn(process.execPath, [...command, ...args], { cwd: ROOT, env: { ...process.env, ...env } });
  let out = '';
  let err = '';
  child.stderr.on('data', (d: Buffer) => (err += d.toString()));
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`chorus serve printed nothing in 60 s; stderr:\n${err}`)), 60_000);
    child.on('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`chorus serve exited (${code}) before printing its line; stdout:\n${out}\nstderr:\n${err}`));
    });
    child.stdout.on('data', (d: Buffer) => {
      out += d.toString();
      const nl = out.indexOf('\n');
      if (nl < 0) return;
      clearTimeout(timer);
      const line = out.slice(0, nl);
      const m = RUNNING_LINE.exec(line);
      if (m === null) {
        reject(new Error(`unexpected first line from chorus serve: ${JSON.stringify(line)}`));
        return;
      }
      child.removeAllListeners('exit');
      resolve({
        url: m[1]!,
        port: Number(m[2]),
        token: m[3]!,
        line,
        child,
        stderr: () => err,
        stop: () =>
          new Promise<void>((done) => {
            if (child.exitCode !== null) return done();
            child.once('exit', () => done());
            child.kill('SIGTERM');
          }),
      });
    });
  });
}
