/**
 * Memory sizes as people write them (the CLI's `--memory`, the app's Memory setting): bytes, or a
 * number with K, M, G or T in binary units (16G = 16 GiB; KiB/MiB/GiB/TiB and KB/MB/GB/TB read the
 * same way). Pure: the renderer uses it too.
 */

/** The smallest plan worth making: below 1 GiB not even the tiny models' sessions fit. */
export const MIN_MEMORY_BYTES = 2 ** 30;

/** The size in bytes, or `undefined` when the text is not a size of at least 1 GiB. */
export function memorySizeBytes(value: string): number | undefined {
  const m = /^\s*(\d+(?:\.\d+)?)\s*(?:([KMGT])(?:i?B)?|B)?\s*$/i.exec(value);
  const bytes = m === null ? NaN : Number(m[1]) * 1024 ** (m[2] === undefined ? 0 : 'KMGT'.indexOf(m[2].toUpperCase()) + 1);
  return Number.isFinite(bytes) && bytes >= MIN_MEMORY_BYTES ? Math.floor(bytes) : undefined;
}

/** "12.0 GiB": a size for people. */
export function formatMemorySize(bytes: number): string {
  return `${(bytes / 2 ** 30).toFixed(1)} GiB`;
}
