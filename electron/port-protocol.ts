/**
 * The message protocol between Electron's main process and the engine host (a utility process),
 * over a MessagePort: calls with ids answered by response envelopes, and events pushed as they
 * happen. No `electron` import: both ends wrap their port in `PortLike`, and tests use Node's
 * worker_threads MessageChannel.
 */
import type { ApiEvent, ApiResponse } from '../pipelines/api/contract.ts';

export type HostRequest = { readonly kind: 'call'; readonly id: number; readonly op: string; readonly payload: unknown };
export type HostMessage = { readonly kind: 'result'; readonly id: number; readonly response: ApiResponse<unknown> } | { readonly kind: 'event'; readonly event: ApiEvent };

/** A message port as both ends see it. */
export interface PortLike {
  onMessage(listener: (data: unknown) => void): void;
  postMessage(data: unknown): void;
}

/** What the engine host answers calls with (EngineHost implements it). */
export interface CallHandler {
  handle(op: string, payload: unknown): Promise<ApiResponse<unknown>>;
  subscribe(listener: (e: ApiEvent) => void): () => void;
}

function isRequest(data: unknown): data is HostRequest {
  const d = data as Partial<HostRequest> | null;
  return typeof d === 'object' && d !== null && d.kind === 'call' && typeof d.id === 'number' && typeof d.op === 'string';
}

/** Engine side: answer every call on the port and forward every event. Returns a detach function. */
export function servePort(port: PortLike, handler: CallHandler): () => void {
  const unsubscribe = handler.subscribe((event) => port.postMessage({ kind: 'event', event } satisfies HostMessage));
  port.onMessage((data) => {
    if (!isRequest(data)) return;
    void handler.handle(data.op, data.payload).then((response) => port.postMessage({ kind: 'result', id: data.id, response } satisfies HostMessage));
  });
  return unsubscribe;
}

/** Main side: calls by id, events to subscribers. */
export class PortClient {
  #next = 1;
  readonly #pending = new Map<number, (r: ApiResponse<unknown>) => void>();
  readonly #listeners = new Set<(e: ApiEvent) => void>();
  readonly #port: PortLike;

  constructor(port: PortLike) {
    this.#port = port;
    port.onMessage((data) => {
      const m = data as HostMessage;
      if (m?.kind === 'result') {
        this.#pending.get(m.id)?.(m.response);
        this.#pending.delete(m.id);
      } else if (m?.kind === 'event') {
        for (const l of this.#listeners) l(m.event);
      }
    });
  }

  call(op: string, payload: unknown): Promise<ApiResponse<unknown>> {
    const id = this.#next++;
    return new Promise((resolve) => {
      this.#pending.set(id, resolve);
      this.#port.postMessage({ kind: 'call', id, op, payload } satisfies HostRequest);
    });
  }

  onEvent(listener: (e: ApiEvent) => void): () => void {
    this.#listeners.add(listener);
    return () => this.#listeners.delete(listener);
  }

  /** The engine process died: answer what is pending with a typed error instead of hanging. */
  failPending(message: string): void {
    for (const resolve of this.#pending.values()) resolve({ ok: false, error: { code: 'INTERNAL', message, details: {} } });
    this.#pending.clear();
  }
}
