/**
 * Window size and position remembered between launches, in a small JSON file. Pure Node (no
 * `electron`): the window manager passes the displays' work areas, so a window saved on a monitor
 * that is gone comes back on a visible one.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { DEFAULT_WINDOW, MIN_WINDOW, type WindowBounds } from './window-options.ts';

export interface WindowState {
  readonly bounds: WindowBounds;
  readonly maximized: boolean;
}

export interface WorkArea {
  readonly x: number;
  readonly y: number;
  readonly width: number;
  readonly height: number;
}

const DEFAULT_STATE: WindowState = { bounds: DEFAULT_WINDOW, maximized: false };
/** How much of the title bar must be on a display for the window to count as visible. */
const VISIBLE_PX = 64;

function isNumber(v: unknown): v is number {
  return typeof v === 'number' && Number.isFinite(v);
}

/** Read the saved state; anything unreadable or off-screen falls back to a centred default. */
export function loadWindowState(file: string, displays: readonly WorkArea[]): WindowState {
  let raw: unknown;
  try {
    raw = JSON.parse(fs.readFileSync(file, 'utf-8'));
  } catch {
    return DEFAULT_STATE;
  }
  const b = (raw as { bounds?: Record<string, unknown> } | null)?.bounds;
  if (b === undefined || !isNumber(b.width) || !isNumber(b.height)) return DEFAULT_STATE;
  const width = Math.max(MIN_WINDOW.width, Math.round(b.width));
  const height = Math.max(MIN_WINDOW.height, Math.round(b.height));
  const maximized = (raw as { maximized?: unknown }).maximized === true;
  if (!isNumber(b.x) || !isNumber(b.y)) return { bounds: { width, height }, maximized };
  const x = Math.round(b.x);
  const y = Math.round(b.y);
  const visible = displays.some((d) => x + width - VISIBLE_PX >= d.x && x + VISIBLE_PX <= d.x + d.width && y >= d.y && y + VISIBLE_PX <= d.y + d.height);
  return visible ? { bounds: { x, y, width, height }, maximized } : { bounds: { width, height }, maximized };
}

export function saveWindowState(file: string, state: WindowState): void {
  fs.mkdirSync(path.dirname(file), { recursive: true });
  const tmp = `${file}.tmp`;
  fs.writeFileSync(tmp, `${JSON.stringify(state)}\n`);
  fs.renameSync(tmp, file);
}
