/**
 * Navigation rules for every web contents the app creates: no navigation away from the app, no new
 * windows (allowlisted https links open in the user's browser), no <webview>, no permissions.
 */
import { app, session, shell } from 'electron';
import { isAllowedNavigation, windowOpenDecision } from './window-options.ts';

export function enforceNavigationRules(): void {
  app.on('web-contents-created', (_event, contents) => {
    contents.on('will-navigate', (event) => {
      if (!isAllowedNavigation(event.url)) event.preventDefault();
    });
    contents.on('will-redirect', (event) => {
      if (!isAllowedNavigation(event.url)) event.preventDefault();
    });
    contents.on('will-attach-webview', (event) => event.preventDefault());
    contents.setWindowOpenHandler(({ url }) => {
      const decision = windowOpenDecision(url);
      if (decision.openExternally) void shell.openExternal(url);
      return { action: decision.action };
    });
  });
  app.whenReady().then(() => {
    session.defaultSession.setPermissionRequestHandler((_contents, _permission, callback) => callback(false));
  }, () => undefined);
}
