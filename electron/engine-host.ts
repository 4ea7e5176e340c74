/**
 * The engine host's entry: runs in an Electron utility process (inference never runs in main or in
 * the renderer). Main sends one `init` message carrying a MessagePort and where settings and caches
 * live; from then on every API call and event goes over that port (port-protocol.ts).
 *
 * Plain Node can import this module (it only wires when `process.parentPort` exists), and tests
 * call `startEngineHost` with a worker_threads port.
 */
import { EngineHost } from '../pipelines/index.ts';
import { servePort, type PortLike } from './port-protocol.ts';

export interface EngineInit {
  readonly kind: 'init';
  readonly settingsFile: string;
  readonly cacheDir?: string;
}

export function isEngineInit(data: unknown): data is EngineInit {
  const d = data as Partial<EngineInit> | null;
  return typeof d === 'object' && d !== null && d.kind === 'init' && typeof d.settingsFile === 'string' && (d.cacheDir === undefined || typeof d.cacheDir === 'string');
}

/** Serve the API on `port`. Resolves with the host once the last model is reopened. */
export async function startEngineHost(port: PortLike, init: EngineInit): Promise<EngineHost> {
  const host = new EngineHost({ settingsFile: init.settingsFile, ...(init.cacheDir === undefined ? {} : { cacheDir: init.cacheDir }) });
  servePort(port, host);
  await host.restore();
  return host;
}

/** Electron's utility-process side of `process.parentPort` (absent in plain Node). */
interface ParentPort {
  once(event: 'message', listener: (e: { data: unknown; ports: Array<{ on(event: 'message', l: (e: { data: unknown }) => void): void; postMessage(d: unknown): void; start(): void }> }) => void): void;
}

const parentPort = (process as unknown as { parentPort?: ParentPort }).parentPort;
if (parentPort !== undefined) {
  parentPort.once('message', (e) => {
    const port = e.ports[0];
    if (port === undefined || !isEngineInit(e.data)) throw new Error('engine host: the first message must be init with a MessagePort');
    const wrapped: PortLike = { onMessage: (l) => port.on('message', (m) => l(m.data)), postMessage: (d) => port.postMessage(d) };
    void startEngineHost(wrapped, e.data);
    port.start();
  });
}
