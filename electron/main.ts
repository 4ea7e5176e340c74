/**
 * Electron main: composes the small modules (single instance, navigation rules, app protocol,
 * window manager, engine process, IPC). Only wiring: inference is in the engine utility process,
 * the API in pipelines/api.
 */
import { app } from 'electron';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { registerAppScheme, serveRenderer } from './app-protocol.ts';
import { EngineProcess } from './engine-process.ts';
import { registerIpc } from './ipc.ts';
import { enforceNavigationRules } from './navigation.ts';
import { WindowManager } from './window-manager.ts';

/** Bundled layout (electron/build.ts): dist/electron/{main,preload,engine-host}.js beside dist/renderer. */
const here = path.dirname(fileURLToPath(import.meta.url));
const RENDERER_DIR = path.join(here, '..', 'renderer');

if (!app.requestSingleInstanceLock()) {
  app.quit();
} else {
  registerAppScheme();
  enforceNavigationRules();
  const windows = new WindowManager(path.join(here, 'preload.cjs'), path.join(app.getPath('userData'), 'window-state.json'));
  const engine = new EngineProcess(path.join(here, 'engine-host.js'), { kind: 'init', settingsFile: path.join(app.getPath('userData'), 'settings.json') });
  app.on('second-instance', () => windows.focus());
  app.on('window-all-closed', () => {
    if (process.platform !== 'darwin') app.quit();
  });
  app.on('will-quit', () => engine.dispose());
  app.whenReady().then(() => {
    serveRenderer(RENDERER_DIR);
    registerIpc(engine);
    windows.open();
    app.on('activate', () => windows.focus());
  }, (e: unknown) => {
    console.error(e);
    app.quit();
  });
}
