/**
 * The IPC transport in main: one `ipcMain.handle` channel per contract operation, each checking the
 * sender frame before forwarding the payload to the engine host (which validates it); events go to
 * every app window. Main never runs inference and never blocks on it.
 */
import { BrowserWindow, ipcMain } from 'electron';
import { OPERATIONS } from '../pipelines/api/contract.ts';
import type { EngineProcess } from './engine-process.ts';
import { isTrustedSender } from './window-options.ts';

export const CHANNEL_PREFIX = 'chorus:';
export const EVENT_CHANNEL = 'chorus:event';

export function registerIpc(engine: EngineProcess): void {
  for (const op of OPERATIONS) {
    ipcMain.handle(`${CHANNEL_PREFIX}${op}`, async (event, payload: unknown) => {
      if (!isTrustedSender(event.senderFrame?.url)) {
        return { ok: false, error: { code: 'FORBIDDEN', message: `IPC from ${event.senderFrame?.url ?? 'an unknown frame'} refused.`, details: {} } };
      }
      return engine.client().call(op, payload);
    });
  }
  engine.onEvent((e) => {
    for (const w of BrowserWindow.getAllWindows()) if (!w.isDestroyed()) w.webContents.send(EVENT_CHANNEL, e);
  });
}
