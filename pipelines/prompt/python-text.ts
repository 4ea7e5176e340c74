/**
 * The few Python text behaviours that A1111's prompt and infotext code relies on, so `a1111.ts` and
 * `infotext.ts` can match it character for character: what `re` means by `\s`, `\w` and `\d` in a
 * `str` pattern, `str.strip()`, `float()`, `int()` and `str(float)`.
 *
 * Checked against CPython 3.11 over every code point: `\s` is identical; `\w` and `\d` differ only
 * by characters added in Unicode versions newer than Python's tables (Node's are newer).
 */

/** Body of a character class matching what Python's `re` calls `\s` (= `str.isspace()`). JS `\s` differs: it has U+FEFF and lacks U+001C–U+001F and U+0085. */
export const PY_SPACE = '\\t\\n\\v\\f\\r\\x1c-\\x1f \\x85\\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000';
/** Body of a character class (for a `u` regex) matching Python's `\w`: `str.isalnum()` or `_`. JS `\w` is ASCII only. */
export const PY_WORD = '\\p{L}\\p{N}_';
/** Body of a character class (for a `u` regex) matching Python's `\d`: decimal digits of any script. */
export const PY_DIGIT = '\\p{Nd}';

const SPACE_RE = new RegExp(`[${PY_SPACE}]`);
const WORD_RE = new RegExp(`[${PY_WORD}]`, 'u');
const LEADING_SPACE = new RegExp(`^[${PY_SPACE}]+`);
const NON_ASCII_DIGIT = /(?![0-9])\p{Nd}/gu;
const DIGIT_RE = /^\p{Nd}$/u;

export function isPySpace(ch: string): boolean {
  return SPACE_RE.test(ch);
}

/** Whether the code point at `index` (a UTF-16 index; a low surrogate is looked up with its pair) is a Python `\w` character. */
export function isPyWordAt(text: string, index: number): boolean {
  if (index < 0 || index >= text.length) return false;
  let start = index;
  const unit = text.charCodeAt(index);
  if (unit >= 0xdc00 && unit <= 0xdfff && index > 0) {
    const prev = text.charCodeAt(index - 1);
    if (prev >= 0xd800 && prev <= 0xdbff) start = index - 1;
  }
  return WORD_RE.test(String.fromCodePoint(text.codePointAt(start)!));
}

/** Python `str.strip()` with no argument. */
export function pyStrip(text: string): string {
  return pyRstrip(text.replace(LEADING_SPACE, ''));
}

/** Python `str.rstrip()` with no argument, in linear time (a `\s+$` regex is quadratic on long inner runs of spaces). */
export function pyRstrip(text: string): string {
  let end = text.length;
  while (end > 0 && SPACE_RE.test(text[end - 1]!)) end--;
  return end === text.length ? text : text.slice(0, end);
}

/**
 * Value 0–9 of a Unicode decimal digit. Unicode encodes Nd digits in runs of ten, 0 to 9, and
 * adjacent runs (e.g. the mathematical digits U+1D7CE…U+1D7FF) each start on a 0, so the offset
 * from the first digit of the contiguous block, modulo ten, is the value.
 */
function digitValue(cp: number): number {
  let blockStart = cp;
  while (blockStart > 0 && DIGIT_RE.test(String.fromCodePoint(blockStart - 1))) blockStart--;
  return (cp - blockStart) % 10;
}

/** Replaces every non-ASCII decimal digit with its ASCII digit, as Python's `float()`/`int()` read them. */
export function asciiDigits(text: string): string {
  return text.replace(NON_ASCII_DIGIT, (d) => String(digitValue(d.codePointAt(0)!)));
}

const FLOAT_SYNTAX = /^[+-]?(?:(?:[0-9](?:_?[0-9])*)?\.[0-9](?:_?[0-9])*|[0-9](?:_?[0-9])*\.?)(?:[eE][+-]?[0-9](?:_?[0-9])*)?$/;
const FLOAT_SPECIAL = /^([+-]?)(inf|infinity|nan)$/i;
const INT_SYNTAX = /^[+-]?[0-9](?:_?[0-9])*$/;

/** Python `float(text)` for a `str`; `undefined` where Python raises `ValueError`. */
export function pyFloat(text: string): number | undefined {
  const s = asciiDigits(pyStrip(text));
  if (FLOAT_SYNTAX.test(s)) return Number(s.replaceAll('_', ''));
  const special = FLOAT_SPECIAL.exec(s);
  if (special === null) return undefined;
  if (special[2]!.toLowerCase() === 'nan') return Number.NaN;
  return special[1] === '-' ? -Infinity : Infinity;
}

/** Python `int(text)` for a `str` (base 10); `undefined` where Python raises `ValueError` or the value is not a safe JS integer. */
export function pyInt(text: string): number | undefined {
  const s = asciiDigits(pyStrip(text));
  if (!INT_SYNTAX.test(s)) return undefined;
  const n = Number(s.replaceAll('_', ''));
  return Number.isSafeInteger(n) ? n : undefined;
}

/**
 * Python's `str()` of a number as A1111 writes it: integers (Python `int`, and integral values, which
 * the UI hands over as `int`) in plain digits; other values like `repr(float)`: shortest round-trip
 * digits, in positional notation when the decimal exponent is in [-4, 16), else `1e-05` / `1.5e+16`.
 */
export function pyNumberText(x: number): string {
  if (Number.isNaN(x)) return 'nan';
  if (!Number.isFinite(x)) return x > 0 ? 'inf' : '-inf';
  if (Number.isInteger(x) && Math.abs(x) < 1e21) return BigInt(x).toString();
  const [mantissa, expText] = x.toExponential().split('e') as [string, string];
  const exp = Number(expText);
  if (exp >= -4 && exp < 16) return String(x);
  return `${mantissa}e${exp < 0 ? '-' : '+'}${String(Math.abs(exp)).padStart(2, '0')}`;
}
