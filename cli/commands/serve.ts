/**
 * `chorus serve`: the app's UI and API over HTTP + WebSocket on the loopback interface, for a
 * browser instead of the Electron window. A transport only: every operation goes to the engine
 * host's handlers (pipelines/api), exactly as the Electron IPC transport does.
 *
 * Security (ARCHITECTURE.md section 5):
 * - binds 127.0.0.1 (or another loopback address), never a public interface;
 * - a random per-launch token is required on every request and WebSocket: `?token=` on the first
 *   page load (answered with an HttpOnly SameSite=Strict cookie and a redirect that drops the token
 *   from the address bar), then the cookie or an `X-Chorus-Token` header; compared in constant time;
 * - `Host` must name a loopback address with our port (a DNS-rebinding page's Host is its own name);
 * - an `Origin` (browsers send it on POST and WebSocket) must be our loopback origin; WebSockets
 *   must send one;
 * - API calls are POST with `Content-Type: application/json`, bodies bounded; the HTML gets a strict CSP.
 */
import { createHash, randomBytes, timingSafeEqual } from 'node:crypto';
import * as fs from 'node:fs';
import * as http from 'node:http';
import type { AddressInfo, Socket } from 'node:net';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { WebSocketServer, type WebSocket } from 'ws';
import { DEVICES, type Device } from '../../models/index.ts';
import { EngineHost, defaultSettingsFile, type ApiEvent, type Settings } from '../../pipelines/index.ts';
import { UsageError, parse, parseMemorySize } from '../args.ts';

export const SERVE_HELP = `chorus serve — the Chorus app in your browser

  chorus serve [--port N] [--models <dir>] [--host 127.0.0.1]

  --port <n>          port (default: a free one)
  --host <addr>       loopback address to bind: 127.0.0.1 (default), localhost or ::1; never a public interface
  --models <dir>      folder to list models from (an A1111 or ComfyUI install works; read-only)
  --model <path>      open this model at start
  --out <dir>         where images are written (default: the saved setting, else ./outputs)
  --lora-dir <dir>    LoRA folder (repeatable)
  --device <ep>       ${DEVICES.join('|')} (default: the saved setting, else auto)
  --cache <dir>       converted weights and graphs (default ~/.cache/chorus)
  --memory <size>     the RAM to plan each job's batches and sessions for (e.g. 12G; default: the saved
                      setting, else all of this machine's); the app's Models screen sets it too

Prints one line, "Chorus is running at http://127.0.0.1:PORT/?token=TOKEN", and serves until stopped (Ctrl+C).
The token changes at every launch; requests without it are refused.
`;

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
/** Where `npm run build:renderer` writes the UI. */
export const RENDERER_DIST = path.join(ROOT, 'dist', 'renderer');

const TOKEN_BYTES = 24;
const COOKIE = 'chorus_token';
const TOKEN_HEADER = 'x-chorus-token';
/** API bodies: jobs are small; dropped PNGs and painted masks are the big ones. */
const MAX_BODY_BYTES = 96 * 1024 * 1024;
const LOOPBACK_HOSTS = ['127.0.0.1', 'localhost', '::1'];
const MIME: Readonly<Record<string, string>> = {
  '.html': 'text/html; charset=utf-8',
  '.js': 'text/javascript; charset=utf-8',
  '.css': 'text/css; charset=utf-8',
  '.svg': 'image/svg+xml',
  '.png': 'image/png',
  '.ico': 'image/x-icon',
  '.woff2': 'font/woff2',
  '.json': 'application/json',
};

export interface ServerOptions {
  readonly host: EngineHost;
  /** The built renderer (index.html + assets). */
  readonly rendererDir: string;
  readonly port?: number;
  /** Loopback address to bind (default 127.0.0.1). */
  readonly bindAddress?: string;
  /** Fixed token (tests); default: random per launch. */
  readonly token?: string;
}

export interface RunningServer {
  readonly url: string;
  readonly port: number;
  readonly token: string;
  close(): Promise<void>;
}

/** The one line `chorus serve` prints. */
export function runningLine(url: string): string {
  return `Chorus is running at ${url}`;
}

function sameToken(given: string | undefined, token: string): boolean {
  if (given === undefined) return false;
  // Hash both so the comparison has a fixed length and takes the same time for any input.
  const a = createHash('sha256').update(given).digest();
  const b = createHash('sha256').update(token).digest();
  return timingSafeEqual(a, b);
}

function cookieToken(header: string | undefined): string | undefined {
  if (header === undefined) return undefined;
  for (const part of header.split(';')) {
    const [k, ...rest] = part.trim().split('=');
    if (k === COOKIE) return rest.join('=');
  }
  return undefined;
}

function hostName(hostHeader: string): { name: string; port: string } | undefined {
  const m = /^(\[[^\]]+\]|[^:]+)(?::(\d+))?$/.exec(hostHeader.trim().toLowerCase());
  if (m === null) return undefined;
  return { name: m[1]!.replace(/^\[|\]$/g, ''), port: m[2] ?? '80' };
}

function isLoopbackHost(hostHeader: string | undefined, port: number): boolean {
  if (hostHeader === undefined) return false;
  const h = hostName(hostHeader);
  return h !== undefined && LOOPBACK_HOSTS.includes(h.name) && h.port === String(port);
}

function isLoopbackOrigin(origin: string, port: number): boolean {
  let u: URL;
  try {
    u = new URL(origin);
  } catch {
    return false;
  }
  return u.protocol === 'http:' && isLoopbackHost(u.host, port);
}

type Verdict = { ok: true; via: 'query' | 'cookie' | 'header' } | { ok: false; status: 401 | 403; reason: string };

/** Host, Origin and token checks shared by HTTP requests and WebSocket upgrades. */
function admit(req: http.IncomingMessage, port: number, token: string, requireOrigin: boolean): Verdict {
  if (!isLoopbackHost(req.headers.host, port)) return { ok: false, status: 403, reason: `Host ${JSON.stringify(req.headers.host ?? '')} is not this loopback server` };
  const origin = req.headers.origin;
  if (origin !== undefined && !isLoopbackOrigin(origin, port)) return { ok: false, status: 403, reason: `Origin ${JSON.stringify(origin)} is not allowed` };
  if (origin === undefined && requireOrigin) return { ok: false, status: 403, reason: 'an Origin header is required' };
  if (req.headers['sec-fetch-site'] === 'cross-site') return { ok: false, status: 403, reason: 'cross-site requests are not allowed' };
  const url = new URL(req.url ?? '/', 'http://127.0.0.1');
  const header = req.headers[TOKEN_HEADER];
  // The most explicit one decides: a new launch's `?token=` must win over an old launch's cookie.
  const query = url.searchParams.get('token');
  const given: [string, 'query' | 'header' | 'cookie'] | undefined =
    query !== null ? [query, 'query'] : typeof header === 'string' ? [header, 'header'] : cookieToken(req.headers.cookie) !== undefined ? [cookieToken(req.headers.cookie)!, 'cookie'] : undefined;
  if (given === undefined) return { ok: false, status: 401, reason: 'the Chorus token is missing: open the URL chorus serve printed' };
  if (!sameToken(given[0], token)) return { ok: false, status: 401, reason: `wrong token (${given[1]}): open the URL this launch of chorus serve printed` };
  return { ok: true, via: given[1] };
}

function contentSecurityPolicy(port: number): string {
  // Chromium rejects IPv6 literals in CSP sources; a page served on [::1] still reaches its own origin via 'self'.
  const ws = LOOPBACK_HOSTS.filter((h) => !h.includes(':')).map((h) => `ws://${h}:${port}`).join(' ');
  return [
    "default-src 'self'",
    "script-src 'self'",
    // Svelte sets style attributes (positions of region boxes, progress widths).
    "style-src 'self' 'unsafe-inline'",
    "img-src 'self' data: blob:",
    `connect-src 'self' ${ws}`,
    "object-src 'none'",
    "base-uri 'none'",
    "frame-ancestors 'none'",
    "form-action 'none'",
  ].join('; ');
}

function send(res: http.ServerResponse, status: number, body: string | Buffer, type: string, extra: Record<string, string> = {}): void {
  res.writeHead(status, {
    'Content-Type': type,
    'X-Content-Type-Options': 'nosniff',
    'Referrer-Policy': 'no-referrer',
    'Cache-Control': 'no-store',
    'Cross-Origin-Resource-Policy': 'same-origin',
    ...extra,
  });
  res.end(body);
}

function readBody(req: http.IncomingMessage): Promise<string> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    let size = 0;
    req.on('data', (c: Buffer) => {
      size += c.length;
      if (size > MAX_BODY_BYTES) {
        reject(new Error(`request body over ${MAX_BODY_BYTES} bytes`));
        req.destroy();
        return;
      }
      chunks.push(c);
    });
    req.on('end', () => resolve(Buffer.concat(chunks).toString('utf-8')));
    req.on('error', reject);
  });
}

function staticFile(rendererDir: string, urlPath: string): string | undefined {
  let rel: string;
  try {
    rel = decodeURIComponent(urlPath);
  } catch {
    return undefined;
  }
  const file = path.resolve(rendererDir, `.${rel}`);
  if (file !== rendererDir && !file.startsWith(rendererDir + path.sep)) return undefined;
  return fs.existsSync(file) && fs.statSync(file).isFile() ? file : undefined;
}

/** Start the HTTP + WebSocket server. Resolves once it listens. */
export async function startServer(options: ServerOptions): Promise<RunningServer> {
  const bindAddress = options.bindAddress ?? '127.0.0.1';
  if (!LOOPBACK_HOSTS.includes(bindAddress)) throw new UsageError(`--host must be a loopback address (${LOOPBACK_HOSTS.join(', ')}); Chorus never serves on a public interface, got "${bindAddress}"`);
  const rendererDir = path.resolve(options.rendererDir);
  const token = options.token ?? randomBytes(TOKEN_BYTES).toString('base64url');
  const host = options.host;
  let port = 0;

  const server = http.createServer((req, res) => {
    void (async () => {
      const url = new URL(req.url ?? '/', 'http://127.0.0.1');
      const isApi = url.pathname.startsWith('/api/');
      const verdict = admit(req, port, token, false);
      if (!verdict.ok) {
        send(res, verdict.status, isApi ? JSON.stringify({ ok: false, error: { code: verdict.status === 401 ? 'UNAUTHORIZED' : 'FORBIDDEN', message: verdict.reason, details: {} } }) : `${verdict.reason}\n`, isApi ? 'application/json' : 'text/plain; charset=utf-8');
        return;
      }
      if (isApi) {
        const op = url.pathname.slice('/api/'.length);
        if (req.method !== 'POST') return send(res, 405, JSON.stringify({ ok: false, error: { code: 'METHOD_NOT_ALLOWED', message: 'API calls are POST', details: {} } }), 'application/json', { Allow: 'POST' });
        if (!(req.headers['content-type'] ?? '').startsWith('application/json')) {
          return send(res, 415, JSON.stringify({ ok: false, error: { code: 'BAD_PAYLOAD', message: 'API calls send JSON (Content-Type: application/json)', details: {} } }), 'application/json');
        }
        let payload: unknown;
        try {
          const body = await readBody(req);
          payload = body === '' ? {} : JSON.parse(body);
        } catch (e) {
          return send(res, 400, JSON.stringify({ ok: false, error: { code: 'BAD_PAYLOAD', message: `the request body is not JSON: ${(e as Error).message}`, details: { field: 'payload' } } }), 'application/json');
        }
        const answer = await host.handle(op, payload);
        return send(res, 200, JSON.stringify(answer), 'application/json');
      }
      if (req.method !== 'GET' && req.method !== 'HEAD') return send(res, 405, 'method not allowed\n', 'text/plain', { Allow: 'GET' });
      if (verdict.via === 'query') {
        // Trade the token in the address for a cookie, and drop it from the address bar and history.
        url.searchParams.delete('token');
        res.writeHead(303, {
          Location: `${url.pathname}${url.search}`,
          'Set-Cookie': `${COOKIE}=${token}; HttpOnly; SameSite=Strict; Path=/`,
          'Referrer-Policy': 'no-referrer',
          'Cache-Control': 'no-store',
        });
        res.end();
        return;
      }
      const file = staticFile(rendererDir, url.pathname) ?? (path.extname(url.pathname) === '' ? staticFile(rendererDir, '/index.html') : undefined);
      if (file === undefined) return send(res, 404, 'not found\n', 'text/plain; charset=utf-8');
      const type = MIME[path.extname(file)] ?? 'application/octet-stream';
      const headers: Record<string, string> = type.startsWith('text/html') ? { 'Content-Security-Policy': contentSecurityPolicy(port), 'X-Frame-Options': 'DENY' } : {};
      send(res, 200, fs.readFileSync(file), type, headers);
    })().catch((e: unknown) => {
      if (!res.headersSent) send(res, 500, `internal error: ${(e as Error).message}\n`, 'text/plain');
    });
  });

  const wss = new WebSocketServer({ noServer: true, maxPayload: 64 * 1024 });
  const clients = new Set<WebSocket>();
  server.on('upgrade', (req, socket: Socket, head) => {
    const url = new URL(req.url ?? '/', 'http://127.0.0.1');
    const verdict = url.pathname === '/api/events' ? admit(req, port, token, true) : ({ ok: false, status: 403, reason: 'no such WebSocket' } as const);
    if (!verdict.ok) {
      socket.end(`HTTP/1.1 ${verdict.status} ${verdict.status === 401 ? 'Unauthorized' : 'Forbidden'}\r\nConnection: close\r\nContent-Type: text/plain\r\n\r\n${verdict.reason}\n`);
      return;
    }
    wss.handleUpgrade(req, socket, head, (ws) => {
      clients.add(ws);
      ws.on('close', () => clients.delete(ws));
      // The socket only carries events to the page; anything sent to it is ignored.
      ws.on('message', () => undefined);
    });
  });
  const unsubscribe = host.subscribe((e: ApiEvent) => {
    const text = JSON.stringify(e);
    for (const ws of clients) ws.send(text);
  });

  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(options.port ?? 0, bindAddress, () => resolve());
  });
  port = (server.address() as AddressInfo).port;
  const shownHost = bindAddress.includes(':') ? `[${bindAddress}]` : bindAddress;
  return {
    url: `http://${shownHost}:${port}/?token=${token}`,
    port,
    token,
    async close() {
      unsubscribe();
      for (const ws of clients) ws.terminate();
      await new Promise<void>((resolve) => {
        server.close(() => resolve());
        server.closeAllConnections();
      });
    },
  };
}

/** Build the renderer with Vite when the UI has not been built yet (a fresh clone). */
async function ensureRenderer(dir: string): Promise<void> {
  if (fs.existsSync(path.join(dir, 'index.html'))) return;
  if (dir !== RENDERER_DIST) throw new UsageError(`${dir} has no index.html (build the UI with npm run build:renderer)`);
  process.stderr.write('chorus: building the UI once (npm run build:renderer)…\n');
  // Vite is a development dependency: a packaged app ships the built UI and never gets here.
  const { build } = await import('vite');
  await build({ configFile: path.join(ROOT, 'vite.config.ts'), logLevel: 'warn' });
}

function parsePort(value: string | undefined): number {
  if (value === undefined) return 0;
  const n = Number(value);
  if (!Number.isInteger(n) || n < 0 || n > 65535) throw new UsageError(`--port must be a whole number from 0 to 65535, got "${value}"`);
  return n;
}

export async function runServe(argv: readonly string[]): Promise<number> {
  const { values } = parse(argv, {
    port: { type: 'string' },
    host: { type: 'string' },
    models: { type: 'string' },
    model: { type: 'string' },
    out: { type: 'string' },
    'lora-dir': { type: 'string', multiple: true },
    device: { type: 'string' },
    cache: { type: 'string' },
    memory: { type: 'string' },
    renderer: { type: 'string' },
    help: { type: 'boolean' },
  });
  if (values.help === true) {
    process.stdout.write(SERVE_HELP);
    return 0;
  }
  const port = parsePort(values.port);
  const bindAddress = values.host ?? '127.0.0.1';
  if (!LOOPBACK_HOSTS.includes(bindAddress)) throw new UsageError(`--host must be a loopback address (${LOOPBACK_HOSTS.join(', ')}); Chorus never serves on a public interface, got "${bindAddress}"`);
  if (values.device !== undefined && !(DEVICES as readonly string[]).includes(values.device)) throw new UsageError(`--device must be one of ${DEVICES.join(', ')}, got "${values.device}"`);
  const rendererDir = path.resolve(values.renderer ?? RENDERER_DIST);
  await ensureRenderer(rendererDir);

  const settings: Partial<Settings> = {
    ...(values.models === undefined ? {} : { modelsDir: path.resolve(values.models) }),
    ...(values.out === undefined ? {} : { outputDir: path.resolve(values.out) }),
    ...(values['lora-dir'] === undefined ? {} : { loraDirs: values['lora-dir'].map((d) => path.resolve(d)) }),
    ...(values.device === undefined ? {} : { device: values.device as Device }),
    ...(values.model === undefined ? {} : { lastModel: path.resolve(values.model) }),
    ...(values.memory === undefined ? {} : { memoryBytes: parseMemorySize('--memory', values.memory) }),
  };
  const host = new EngineHost({ settingsFile: defaultSettingsFile(), settings, ...(values.cache === undefined ? {} : { cacheDir: values.cache }) });
  await host.restore();
  const server = await startServer({ host, rendererDir, port, bindAddress });
  process.stdout.write(`${runningLine(server.url)}\n`);
  await new Promise<void>((resolve) => {
    const stop = () => resolve();
    process.once('SIGINT', stop);
    process.once('SIGTERM', stop);
  });
  await server.close();
  await host.dispose();
  return 0;
}
