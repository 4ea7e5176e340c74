/**
 * Builds the renderer (Svelte 5) into dist/renderer, served by `chorus serve` and loaded by the
 * Electron window from the packaged app. Relative asset paths so both file:// and http:// work.
 */
import { svelte } from '@sveltejs/vite-plugin-svelte';
import { defineConfig } from 'vite';
import { fileURLToPath } from 'node:url';

const root = fileURLToPath(new URL('./renderer', import.meta.url));

export default defineConfig({
  root,
  base: './',
  plugins: [svelte()],
  build: {
    outDir: fileURLToPath(new URL('./dist/renderer', import.meta.url)),
    emptyOutDir: true,
    target: 'es2022',
    // One stylesheet and script; no inline scripts, so the CSP can forbid them.
    modulePreload: { polyfill: false },
    chunkSizeWarningLimit: 1024,
  },
});
