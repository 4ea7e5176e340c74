/**
 * The window's security settings and navigation rules, as plain data and pure functions: no
 * `electron` import, so tests assert them in plain Node (the Electron binary is not available on
 * every machine) and `window-manager.ts` applies exactly these.
 */

/** The app's own origin: the renderer is served from this privileged custom scheme, never file://. */
export const APP_SCHEME = 'app';
export const APP_HOST = 'chorus';
export const APP_ORIGIN = `${APP_SCHEME}://${APP_HOST}`;
export const APP_ENTRY = `${APP_ORIGIN}/index.html`;

/** BrowserWindow `webPreferences` (STYLE.md section 6). */
export function webPreferences(preloadPath: string) {
  return {
    preload: preloadPath,
    contextIsolation: true,
    sandbox: true,
    nodeIntegration: false,
    nodeIntegrationInWorker: false,
    nodeIntegrationInSubFrames: false,
    webviewTag: false,
    webSecurity: true,
    allowRunningInsecureContent: false,
    experimentalFeatures: false,
    enableBlinkFeatures: '',
    navigateOnDragDrop: false,
    spellcheck: false,
    devTools: true,
  } as const;
}

export interface WindowBounds {
  readonly x?: number;
  readonly y?: number;
  readonly width: number;
  readonly height: number;
}

/** The app is laid out for 1280×800 and usable down to this. */
export const MIN_WINDOW = { width: 1024, height: 680 } as const;
export const DEFAULT_WINDOW = { width: 1280, height: 800 } as const;

/** BrowserWindow options for the main window. */
export function mainWindowOptions(preloadPath: string, bounds: WindowBounds = DEFAULT_WINDOW) {
  return {
    ...bounds,
    minWidth: MIN_WINDOW.width,
    minHeight: MIN_WINDOW.height,
    show: false,
    backgroundColor: '#101216',
    title: 'Chorus',
    autoHideMenuBar: true,
    webPreferences: webPreferences(preloadPath),
  };
}

/**
 * The CSP the app's pages are served with. No inline or eval'd script; styles inline only for
 * Svelte's style attributes; images from the app and data/blob URLs (previews, thumbnails);
 * nothing is fetched from anywhere else.
 */
export const CONTENT_SECURITY_POLICY = [
  "default-src 'self'",
  "script-src 'self'",
  "style-src 'self' 'unsafe-inline'",
  "img-src 'self' data: blob:",
  "connect-src 'self'",
  "font-src 'self'",
  "object-src 'none'",
  "base-uri 'none'",
  "form-action 'none'",
  "frame-ancestors 'none'",
].join('; ');

/** In-app navigation stays on the app's origin; everything else is refused. */
export function isAllowedNavigation(url: string): boolean {
  try {
    const u = new URL(url);
    return `${u.protocol}//${u.host}` === APP_ORIGIN;
  } catch {
    return false;
  }
}

/** Links users may open in their browser (never inside the app). */
export const EXTERNAL_ALLOWLIST: readonly string[] = ['https://github.com/', 'https://civitai.com/', 'https://huggingface.co/'];

/** What to do with a `window.open` or target=_blank link: never a new app window. */
export function windowOpenDecision(url: string): { action: 'deny'; openExternally: boolean } {
  let ok = false;
  try {
    const u = new URL(url);
    ok = u.protocol === 'https:' && EXTERNAL_ALLOWLIST.some((prefix) => u.href.startsWith(prefix));
  } catch {
    ok = false;
  }
  return { action: 'deny', openExternally: ok };
}

/** Whether an IPC call comes from the app's own top frame (not a frame that navigated elsewhere). */
export function isTrustedSender(frameUrl: string | undefined): boolean {
  return frameUrl !== undefined && isAllowedNavigation(frameUrl);
}
