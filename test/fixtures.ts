/**
 * Where the shared fixtures live (`../shared` beside the clone, in place; never copied), and helpers
 * to compare tensors against them with a stated tolerance.
 */
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
export const SHARED = process.env.CHORUS_SHARED ?? path.resolve(ROOT, '../shared');
export const FIXTURES = path.join(SHARED, 'fixtures');
export const REALWORLD = path.join(SHARED, 'realworld');
export const REF = path.join(FIXTURES, 'tiny-sd15-ref');
