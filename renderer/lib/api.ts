/**
 * The renderer's only way to the backend: one typed API object over the contract, with two
 * implementations picked at run time — the Electron preload bridge (`window.chorus`) or, in
 * `chorus serve` mode, fetch + WebSocket to the same origin (the session cookie carries the token).
 */
import type { ApiError, ApiEvent, ApiResponse, ChorusBridge, OpName, Payload, Result } from '../../pipelines/api/contract.ts';

export interface ChorusApi {
  call<K extends OpName>(op: K, payload: Payload<K>): Promise<Result<K>>;
  subscribe(listener: (event: ApiEvent) => void): () => void;
  readonly transport: 'electron' | 'http';
}

/** A failed call, carrying the `{ code, message, details }` the backend sent. */
export class ApiCallError extends Error implements ApiError {
  readonly code: string;
  readonly details: Readonly<Record<string, unknown>>;
  constructor(error: ApiError) {
    super(error.message);
    this.name = 'ApiCallError';
    this.code = error.code;
    this.details = error.details;
  }
}

function unwrap<T>(r: ApiResponse<T>): T {
  if (!r.ok) throw new ApiCallError(r.error);
  return r.result;
}

function bridgeApi(bridge: ChorusBridge): ChorusApi {
  return {
    transport: 'electron',
    async call(op, payload) {
      const fn = bridge[op] as (p: typeof payload) => Promise<ApiResponse<Result<typeof op>>>;
      return unwrap(await fn(payload));
    },
    subscribe: (listener) => bridge.onEvent(listener),
  };
}

/** Reconnect delay for the event socket after the server went away (it restarts with the app). */
const RECONNECT_MS = 1000;

function httpApi(): ChorusApi {
  const listeners = new Set<(e: ApiEvent) => void>();
  let socket: WebSocket | undefined;
  const connect = () => {
    const ws = new WebSocket(`${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}/api/events`);
    ws.onmessage = (m) => {
      const event = JSON.parse(String(m.data)) as ApiEvent;
      for (const l of listeners) l(event);
    };
    ws.onclose = () => {
      socket = undefined;
      if (listeners.size > 0) setTimeout(connect, RECONNECT_MS);
    };
    socket = ws;
  };
  return {
    transport: 'http',
    async call(op, payload) {
      const res = await fetch(`/api/${op}`, { method: 'POST', headers: { 'Content-Type': 'application/json' }, credentials: 'same-origin', body: JSON.stringify(payload) });
      const body = (await res.json()) as ApiResponse<Result<typeof op>>;
      return unwrap(body);
    },
    subscribe(listener) {
      listeners.add(listener);
      if (socket === undefined) connect();
      return () => {
        listeners.delete(listener);
        if (listeners.size === 0) socket?.close();
      };
    },
  };
}

export function createApi(): ChorusApi {
  const bridge = (globalThis as { chorus?: ChorusBridge }).chorus;
  return bridge !== undefined ? bridgeApi(bridge) : httpApi();
}

/** A caught value as the error shape the UI shows. */
export function asApiError(e: unknown): ApiError {
  if (e instanceof ApiCallError) return { code: e.code, message: e.message, details: e.details };
  return { code: 'INTERNAL', message: e instanceof Error ? e.message : String(e), details: {} };
}
