/** The main window: created with window-options.ts, its size and position remembered. */
import { BrowserWindow, screen } from 'electron';
import { APP_ENTRY, mainWindowOptions } from './window-options.ts';
import { loadWindowState, saveWindowState } from './window-state.ts';

export class WindowManager {
  #window: BrowserWindow | undefined;
  readonly #preload: string;
  readonly #stateFile: string;

  constructor(preload: string, stateFile: string) {
    this.#preload = preload;
    this.#stateFile = stateFile;
  }

  open(): BrowserWindow {
    if (this.#window !== undefined && !this.#window.isDestroyed()) return this.#window;
    const state = loadWindowState(this.#stateFile, screen.getAllDisplays().map((d) => d.workArea));
    const win = new BrowserWindow(mainWindowOptions(this.#preload, state.bounds));
    if (state.maximized) win.maximize();
    win.once('ready-to-show', () => win.show());
    win.on('close', () => saveWindowState(this.#stateFile, { bounds: win.getNormalBounds(), maximized: win.isMaximized() }));
    void win.loadURL(APP_ENTRY);
    this.#window = win;
    return win;
  }

  /** Bring the window forward (a second launch does this instead of opening another app). */
  focus(): void {
    const win = this.open();
    if (win.isMinimized()) win.restore();
    win.focus();
  }
}
