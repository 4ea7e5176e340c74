/**
 * The preload bridge: `window.chorus` with one function per contract operation (never a generic
 * invoke) and an event subscription that returns its unsubscribe function. Bundled into one
 * CommonJS file (sandboxed preloads cannot load modules) whose only import is `electron`.
 */
import { contextBridge, ipcRenderer, type IpcRendererEvent } from 'electron';
import { OPERATIONS, type ApiEvent, type ChorusBridge } from '../pipelines/api/contract.ts';

const CHANNEL_PREFIX = 'chorus:';
const EVENT_CHANNEL = 'chorus:event';

const calls = Object.fromEntries(OPERATIONS.map((op) => [op, (payload: unknown) => ipcRenderer.invoke(`${CHANNEL_PREFIX}${op}`, payload)]));

const bridge = {
  ...calls,
  onEvent(listener: (event: ApiEvent) => void): () => void {
    const wrapped = (_e: IpcRendererEvent, event: ApiEvent) => listener(event);
    ipcRenderer.on(EVENT_CHANNEL, wrapped);
    return () => ipcRenderer.removeListener(EVENT_CHANNEL, wrapped);
  },
} as ChorusBridge;

contextBridge.exposeInMainWorld('chorus', bridge);
