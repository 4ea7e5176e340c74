/**
 * Regions on the image canvas, in image pixels (top-left origin), as pure functions the region
 * canvas calls (tested in Node). Boxes snap to the 8-pixel latent grid, since the regions strategy
 * masks latent cells, and always stay inside the canvas, at any aspect ratio.
 */
import type { RegionPayload } from '../../pipelines/api/contract.ts';

export type Box = readonly [x: number, y: number, width: number, height: number];

export interface Region {
  readonly id: string;
  readonly kind: 'box' | 'mask';
  /** For a box: its area. For a mask: the canvas (the mask image covers it). */
  readonly box: Box;
  readonly prompt: string;
  /** Stack key of the region's LoRA, or null. */
  readonly loraKey: string | null;
  readonly color: string;
}

/** Pixels per latent cell. */
export const GRID_PX = 8;
export const MIN_BOX_PX = GRID_PX * 2;
export const REGION_COLORS = ['#ff6b6b', '#4dabf7', '#51cf66', '#fcc419', '#cc5de8', '#ff922b', '#22b8cf', '#f06595'];

const snap = (v: number) => Math.round(v / GRID_PX) * GRID_PX;

/** The box spanned by a drag from (x0, y0) to (x1, y1), snapped and clamped; null when too small. */
export function boxFromDrag(x0: number, y0: number, x1: number, y1: number, width: number, height: number): Box | null {
  const left = snap(Math.max(0, Math.min(x0, x1)));
  const top = snap(Math.max(0, Math.min(y0, y1)));
  const right = snap(Math.min(width, Math.max(x0, x1)));
  const bottom = snap(Math.min(height, Math.max(y0, y1)));
  if (right - left < MIN_BOX_PX || bottom - top < MIN_BOX_PX) return null;
  return [left, top, right - left, bottom - top];
}

/** Move by (dx, dy), kept inside the canvas. */
export function moveBox(box: Box, dx: number, dy: number, width: number, height: number): Box {
  const [x, y, w, h] = box;
  return [Math.max(0, Math.min(width - w, snap(x + dx))), Math.max(0, Math.min(height - h, snap(y + dy))), w, h];
}

/** Resize handles: corners and edges by compass direction. */
export type Handle = 'n' | 's' | 'e' | 'w' | 'ne' | 'nw' | 'se' | 'sw';
export const HANDLES: readonly Handle[] = ['nw', 'n', 'ne', 'e', 'se', 's', 'sw', 'w'];

/** Drag a handle by (dx, dy); the opposite side stays put; never below the minimum size or outside the canvas. */
export function resizeBox(box: Box, handle: Handle, dx: number, dy: number, width: number, height: number): Box {
  let [x, y, w, h] = box;
  let right = x + w;
  let bottom = y + h;
  if (handle.includes('w')) x = Math.max(0, Math.min(right - MIN_BOX_PX, snap(x + dx)));
  if (handle.includes('e')) right = Math.min(width, Math.max(x + MIN_BOX_PX, snap(right + dx)));
  if (handle.includes('n')) y = Math.max(0, Math.min(bottom - MIN_BOX_PX, snap(y + dy)));
  if (handle.includes('s')) bottom = Math.min(height, Math.max(y + MIN_BOX_PX, snap(bottom + dy)));
  w = right - x;
  h = bottom - y;
  return [x, y, w, h];
}

/** Where a handle sits on a box. */
export function handlePoint(box: Box, handle: Handle): [number, number] {
  const [x, y, w, h] = box;
  const hx = handle.includes('w') ? x : handle.includes('e') ? x + w : x + w / 2;
  const hy = handle.includes('n') ? y : handle.includes('s') ? y + h : y + h / 2;
  return [hx, hy];
}

/** The topmost box region under a point (later regions are drawn on top). */
export function regionAt(regions: readonly Region[], px: number, py: number): Region | undefined {
  for (let i = regions.length - 1; i >= 0; i--) {
    const r = regions[i]!;
    if (r.kind !== 'box') continue;
    const [x, y, w, h] = r.box;
    if (px >= x && px <= x + w && py >= y && py <= y + h) return r;
  }
  return undefined;
}

/** Regions refitted to a new canvas size (the image size changed): scaled, snapped, clamped. */
export function refitRegions(regions: readonly Region[], fromW: number, fromH: number, toW: number, toH: number): Region[] {
  return regions.map((r) => {
    if (r.kind === 'mask') return { ...r, box: [0, 0, toW, toH] as Box };
    const [x, y, w, h] = r.box;
    const sx = toW / fromW;
    const sy = toH / fromH;
    const nw = Math.max(MIN_BOX_PX, Math.min(toW, snap(w * sx)));
    const nh = Math.max(MIN_BOX_PX, Math.min(toH, snap(h * sy)));
    return { ...r, box: [Math.max(0, Math.min(toW - nw, snap(x * sx))), Math.max(0, Math.min(toH - nh, snap(y * sy))), nw, nh] as Box };
  });
}

export function nextColor(regions: readonly Region[]): string {
  return REGION_COLORS[regions.length % REGION_COLORS.length]!;
}

/** What the user should know before generating: regions without a prompt or a LoRA. */
export function regionWarnings(regions: readonly Region[], stackKeys: readonly string[]): string[] {
  const out: string[] = [];
  regions.forEach((r, i) => {
    if (r.prompt.trim() === '') out.push(`Region ${i + 1} has no prompt: it will use the main prompt's look only.`);
    if (r.loraKey === null) out.push(`Region ${i + 1} has no LoRA: assign one from the stack, or it uses only its prompt.`);
    else if (!stackKeys.includes(r.loraKey)) out.push(`Region ${i + 1}'s LoRA was removed from the stack: assign another.`);
  });
  return out;
}

/**
 * Regions for the job. `masks` gives each mask region's PNG (base64); `loraOf` turns a stack key into
 * the job's LoRA (undefined when unassigned or gone).
 */
export function regionsPayload(
  regions: readonly Region[],
  loraOf: (key: string) => RegionPayload['lora'] | undefined,
  masks: Readonly<Record<string, string>>,
): RegionPayload[] {
  return regions.map((r) => {
    const lora = r.loraKey === null ? undefined : loraOf(r.loraKey);
    const area = r.kind === 'box' ? { box: r.box } : { maskPng: masks[r.id] ?? '' };
    return { ...area, prompt: r.prompt, ...(lora === undefined ? {} : { lora }) };
  });
}
