/**
 * AUTOMATIC1111's prompt syntax, behaving like stable-diffusion-webui v1.10
 * (`modules/prompt_parser.py`, `modules/extra_networks.py`,
 * `extensions-builtin/Lora/extra_networks_lora.py`), reimplemented from its documented behaviour,
 * doctests and observed outputs (no A1111 code is copied).
 *
 * A1111 applies the pieces to a prompt in this order, and so should callers:
 * 1. `extractExtraNetworks`: `<lora:name:0.8>`-style tags are cut out of the text.
 * 2. `parseComposable`: the rest is split at `AND` into weighted sub-prompts.
 * 3. `getPromptSchedule`: each sub-prompt becomes the texts to use over the sampling steps
 *    (`[from:to:when]`, `[to:when]`, `[from::when]`, `[a|b|c]`).
 * 4. `parsePromptAttention`: each of those texts becomes (fragment, weight) runs from `(x)`, `[x]`,
 *    `(x:1.5)`, with `BREAK` markers.
 */
import { PipelineError } from '../errors.ts';
import { isPyWordAt, PY_DIGIT, PY_SPACE, pyFloat, pyInt, pyRstrip } from './python-text.ts';

// ---------------------------------------------------------------------------------------------
// Emphasis: parse_prompt_attention
// ---------------------------------------------------------------------------------------------

export interface WeightedText {
  readonly text: string;
  readonly weight: number;
}

/**
 * A `BREAK` (start a new 75-token chunk) comes out of `parsePromptAttention` as the entry
 * `{ text: 'BREAK', weight: -1 }`, exactly as A1111 emits `["BREAK", -1]`, so consumers test
 * both fields (`isBreak`). A1111 multiplies that entry like any other when it sits inside brackets
 * (`(BREAK)` gives weight -1.1), and then it is no longer a break but the literal word; keeping
 * A1111's representation keeps that quirk.
 */
export const BREAK_TEXT = 'BREAK';
export const BREAK_WEIGHT = -1;

export function isBreak(part: WeightedText): boolean {
  return part.text === BREAK_TEXT && part.weight === BREAK_WEIGHT;
}

/** `(x)` multiplies by 1.1 and `[x]` by 1/1.1 (A1111 `round_bracket_multiplier`, `square_bracket_multiplier`). */
const ROUND_BRACKET_MULTIPLIER = 1.1;
const SQUARE_BRACKET_MULTIPLIER = 1 / 1.1;

/**
 * Bound on single weight multiplications (A1111's `multiply_range` touches every fragment after the
 * bracket, so `(a(a(a…` nested tens of thousands deep is quadratic). Real prompts use a few
 * thousand at most; past this the prompt is rejected instead of tying up the process.
 */
export const MAX_EMPHASIS_UPDATES = 50_000_000;

/**
 * A1111's `re_attention` tokens, in its alternation order: escapes `\( \) \[ \] \\` and a lone `\`,
 * `(`, `[`, a weight close `:1.5)`, `)`, `]`, plain text, `:`. Every character belongs to some
 * token, so matching from each token end walks the whole text.
 */
const ATTENTION_TOKEN = new RegExp(
  String.raw`\\\(|\\\)|\\\[|\\\]|\\\\|\\|\(|\[|:[${PY_SPACE}]*([+-]?[.${PY_DIGIT}]+)[${PY_SPACE}]*\)|\)|\]|[^\\()\[\]:]+|:`,
  'uy',
);

/**
 * `re.split(r"\s*\bBREAK\b\s*", token)` with Python's Unicode `\s`/`\b`, written out because the
 * regex form is quadratic on long runs of spaces.
 */
function splitAtBreak(token: string): string[] {
  if (!token.includes(BREAK_TEXT)) return [token];
  const parts: string[] = [];
  let partStart = 0;
  let from = 0;
  for (;;) {
    const at = token.indexOf(BREAK_TEXT, from);
    if (at === -1) break;
    const after = at + BREAK_TEXT.length;
    if (isPyWordAt(token, at - 1) || isPyWordAt(token, after)) {
      from = at + 1;
      continue;
    }
    let matchStart = at;
    while (matchStart > partStart && isSpaceAt(token, matchStart - 1)) matchStart--;
    let matchEnd = after;
    while (matchEnd < token.length && isSpaceAt(token, matchEnd)) matchEnd++;
    parts.push(token.slice(partStart, matchStart));
    partStart = matchEnd;
    from = matchEnd;
  }
  parts.push(token.slice(partStart));
  return parts;
}

const SPACE_CHAR = new RegExp(`[${PY_SPACE}]`);
function isSpaceAt(text: string, index: number): boolean {
  return SPACE_CHAR.test(text[index] ?? '');
}

/**
 * Splits `text` into runs with their attention weights, like A1111 `parse_prompt_attention`:
 * `(x)` ×1.1, `[x]` ÷1.1, `(x:w)` ×w, nesting multiplies (in A1111's order of multiplication, so
 * the floats are bit-identical: `(((x:1.3)))` gives 1.5730000000000004), brackets left open apply to
 * the end of the text, an unmatched `)` or `]` is literal text, `\(` `\)` `\[` `\]` `\\` are
 * literal characters (a backslash before anything else is dropped), `BREAK` as a whole word becomes
 * a marker entry (see `BREAK_TEXT`), and adjacent runs of equal weight are merged.
 *
 * Throws `PipelineError('BAD_PROMPT')` for a weight Python's `float()` rejects, such as `(a:1.2.3)`
 * (A1111 fails the generation with a ValueError there), and when the brackets would need more than
 * `MAX_EMPHASIS_UPDATES` multiplications.
 */
export function parsePromptAttention(text: string): WeightedText[] {
  const texts: string[] = [];
  const weights: number[] = [];
  const roundBrackets: number[] = [];
  const squareBrackets: number[] = [];
  let updatesLeft = MAX_EMPHASIS_UPDATES;

  const spend = (updates: number): void => {
    updatesLeft -= updates;
    if (updatesLeft < 0) {
      throw new PipelineError(
        'BAD_PROMPT',
        `the prompt's brackets enclose too many separately weighted parts too deeply (more than ${MAX_EMPHASIS_UPDATES} weight multiplications); remove unneeded nested or unclosed brackets.`,
        { limit: MAX_EMPHASIS_UPDATES },
      );
    }
  };
  const multiplyRange = (start: number, multiplier: number): void => {
    spend(weights.length - start);
    for (let p = start; p < weights.length; p++) weights[p] = weights[p]! * multiplier;
  };

  let pos = 0;
  while (pos < text.length) {
    ATTENTION_TOKEN.lastIndex = pos;
    const m = ATTENTION_TOKEN.exec(text);
    if (m === null) throw new Error(`invariant: no attention token at ${pos}`);
    const token = m[0];
    const weightText = m[1];
    pos += token.length;

    if (token.startsWith('\\')) {
      texts.push(token.slice(1));
      weights.push(1);
    } else if (token === '(') {
      roundBrackets.push(texts.length);
    } else if (token === '[') {
      squareBrackets.push(texts.length);
    } else if (weightText !== undefined && roundBrackets.length > 0) {
      const weight = pyFloat(weightText);
      if (weight === undefined) {
        throw new PipelineError(
          'BAD_PROMPT',
          `the emphasis weight in "${token}" (at character ${pos - token.length}) is not a number; write e.g. (word:1.2).`,
          { token, position: pos - token.length },
        );
      }
      multiplyRange(roundBrackets.pop()!, weight);
    } else if (token === ')' && roundBrackets.length > 0) {
      multiplyRange(roundBrackets.pop()!, ROUND_BRACKET_MULTIPLIER);
    } else if (token === ']' && squareBrackets.length > 0) {
      multiplyRange(squareBrackets.pop()!, SQUARE_BRACKET_MULTIPLIER);
    } else {
      splitAtBreak(token).forEach((part, i) => {
        if (i > 0) {
          texts.push(BREAK_TEXT);
          weights.push(BREAK_WEIGHT);
        }
        texts.push(part);
        weights.push(1);
      });
    }
  }

  closeAtEnd(weights, roundBrackets, ROUND_BRACKET_MULTIPLIER, spend);
  closeAtEnd(weights, squareBrackets, SQUARE_BRACKET_MULTIPLIER, spend);

  if (texts.length === 0) return [{ text: '', weight: 1 }];
  const merged: WeightedText[] = [];
  let runText = texts[0]!;
  let runWeight = weights[0]!;
  for (let i = 1; i < texts.length; i++) {
    if (weights[i] === runWeight) {
      runText += texts[i]!;
    } else {
      merged.push({ text: runText, weight: runWeight });
      runText = texts[i]!;
      runWeight = weights[i]!;
    }
  }
  merged.push({ text: runText, weight: runWeight });
  return merged;
}

/**
 * Brackets still open at the end: A1111 runs `multiply_range(pos, multiplier)` for each, outermost
 * first, so a fragment after k of them is multiplied k times in a row by the same factor. Those
 * chains are shared per starting weight, which keeps `:( :( :( …` (many unclosed brackets) linear.
 */
function closeAtEnd(weights: number[], openAt: readonly number[], multiplier: number, spend: (updates: number) => void): void {
  if (openAt.length === 0) return;
  const chains = new Map<number, number[]>();
  let open = 0;
  for (let p = 0; p < weights.length; p++) {
    while (open < openAt.length && openAt[open]! <= p) open++;
    const w = weights[p]!;
    // 0, ±inf and NaN are fixed points of multiplying by a positive finite factor (sign included).
    if (open === 0 || w === 0 || !Number.isFinite(w)) continue;
    let chain = chains.get(w);
    if (chain === undefined) {
      chain = [w];
      chains.set(w, chain);
    }
    if (chain.length <= open) spend(open + 1 - chain.length);
    while (chain.length <= open) chain.push(chain[chain.length - 1]! * multiplier);
    weights[p] = chain[open]!;
  }
}

// ---------------------------------------------------------------------------------------------
// Prompt editing: get_learned_conditioning_prompt_schedules
// ---------------------------------------------------------------------------------------------
//
// What A1111's grammar (lark, Earley parser) accepts, in words:
// - a prompt is a sequence of plain text (any character but `\ [ ] ( ) : |`, or a backslash
//   followed by any character but a newline), whitespace, and these constructs:
//   emphasis `(P)`, `(P:P)`, `[P]`; scheduling `[P:N]`, `[P:P:N]` (spaces allowed around the
//   number N, lark's SIGNED_NUMBER: `3`, `-2`, `.5`, `1.`, `1e3`); alternation `[P|P|…]` (any
//   option may be empty);
// - at the top level only, `[ ] ( ) :` may also stand alone as literal characters.
// Where the whole prompt has no parse (a `|` outside an alternation, a lone trailing backslash),
// A1111 returns it unchanged as a single entry.
//
// Inside a bracket construct the grammar is unambiguous: after `[`, the delimiters at that level
// (`]`, `|`, `:`) decide emphasis, alternation or scheduling, and every nested `(`/`[` must itself
// be a complete construct. Only the top level can also read brackets and colons as stray
// characters, and there lark's Earley parser picks among equally valid readings by iterating a
// hash set, so A1111's answer for prompts such as `[a:3]]` or `[a:3])` changes with Python's hash
// seed from one process to the next (checked with lark 1.1.5). This parser always makes the same
// choice: at the top level, every `(`/`[` that starts a complete construct is that construct
// (leftmost first); the others are literal characters. Whether a parse exists at all does not
// depend on that choice, so prompts A1111 leaves untouched are left untouched here too. On about
// 10,000 generated bracket-heavy prompts compared with A1111's code under lark 1.1.5, this choice
// was always one of the answers A1111 gives (trying up to 40 hash seeds), and the only one where
// A1111's answer does not depend on the seed.
//
// Each construct start is parsed once (memoised) with an explicit stack, so deep nesting cannot
// overflow the call stack and the whole parse is linear in the prompt length.

type ScheduleNode = string | ScheduleGroup | ScheduledNode | AlternateNode;

/** An emphasis construct: its brackets and colon are kept as text; only its content matters for scheduling. */
interface ScheduleGroup {
  readonly kind: 'group';
  readonly nodes: readonly ScheduleNode[];
}

interface ScheduledNode {
  readonly kind: 'scheduled';
  /** `null` for `[to:when]`, which shows nothing before the switch. */
  readonly before: readonly ScheduleNode[] | null;
  readonly after: readonly ScheduleNode[];
  /** The NUMBER token as written: whether it has a `.` decides fraction vs step. */
  readonly when: string;
  /** The construct as written, for error messages. */
  readonly source: string;
}

interface AlternateNode {
  readonly kind: 'alternate';
  readonly options: ReadonlyArray<readonly ScheduleNode[]>;
}

interface Construct {
  readonly end: number;
  readonly node: ScheduleNode;
}

/** Memo of construct starts: the parsed construct, or `null` where none starts. */
type ConstructMemo = Map<number, Construct | null>;

interface Frame {
  readonly open: '(' | '[';
  readonly start: number;
  /** `first`: before any `:`/`|`; `second`: after the first `:`; `options`: after a `|`. */
  phase: 'first' | 'second' | 'options';
  readonly parts: ScheduleNode[][];
  current: ScheduleNode[];
}

/** Text without any character the grammar treats specially. */
const PLAIN_RUN = /[^\\[\]():|]+/y;
/** lark's SIGNED_NUMBER (common.lark), in the same alternation order. */
const SIGNED_NUMBER = String.raw`[+-]?(?:[0-9]+[eE][+-]?[0-9]+|(?:[0-9]+\.(?:[0-9]+)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|[0-9]+)`;
/** What may follow the last `:` of a scheduled construct: `[WHITESPACE] NUMBER [WHITESPACE] "]"`. */
const WHEN_TAIL = new RegExp(`[${PY_SPACE}]*(${SIGNED_NUMBER})[${PY_SPACE}]*\\]`, 'y');

/** Length of the `\\.` escape at `pos` (backslash + one code point other than a newline), 0 when there is none. */
function escapeLength(text: string, pos: number): number {
  const next = text.codePointAt(pos + 1);
  if (next === undefined || next === 0x0a) return 0;
  return next > 0xffff ? 3 : 2;
}

function matchWhenTail(text: string, pos: number): { when: string; end: number } | undefined {
  WHEN_TAIL.lastIndex = pos;
  const m = WHEN_TAIL.exec(text);
  return m === null ? undefined : { when: m[1]!, end: WHEN_TAIL.lastIndex };
}

/**
 * What a delimiter does to the innermost frame: `next` = keep reading at that position, `done` =
 * the construct is complete, `fail` = no construct starts at the frame's bracket.
 */
type FrameStep = { readonly next: number } | { readonly done: Construct } | 'fail';

function stepFrame(text: string, frame: Frame, pos: number, ch: string): FrameStep {
  const { parts, current } = frame;
  if (frame.open === '(') {
    if (ch === ')') {
      const nodes = frame.phase === 'second' ? ['(', ...parts[0]!, ':', ...current, ')'] : ['(', ...current, ')'];
      return { done: { end: pos + 1, node: { kind: 'group', nodes } } };
    }
    if (ch === ':' && frame.phase === 'first') return startPart(frame, 'second', pos + 1);
    return 'fail';
  }
  switch (frame.phase) {
    case 'first':
      if (ch === ']') return { done: { end: pos + 1, node: { kind: 'group', nodes: ['[', ...current, ']'] } } };
      if (ch === '|') return startPart(frame, 'options', pos + 1);
      if (ch === ':') {
        const tail = matchWhenTail(text, pos + 1);
        if (tail !== undefined) return { done: scheduled(text, frame, null, current, tail) };
        return startPart(frame, 'second', pos + 1);
      }
      return 'fail';
    case 'second': {
      const tail = ch === ':' ? matchWhenTail(text, pos + 1) : undefined;
      return tail === undefined ? 'fail' : { done: scheduled(text, frame, parts[0]!, current, tail) };
    }
    case 'options':
      if (ch === '|') return startPart(frame, 'options', pos + 1);
      if (ch === ']') return { done: { end: pos + 1, node: { kind: 'alternate', options: [...parts, current] } } };
      return 'fail';
  }
}

function startPart(frame: Frame, phase: Frame['phase'], next: number): FrameStep {
  frame.parts.push(frame.current);
  frame.current = [];
  frame.phase = phase;
  return { next };
}

function scheduled(text: string, frame: Frame, before: ScheduleNode[] | null, after: ScheduleNode[], tail: { when: string; end: number }): Construct {
  return { end: tail.end, node: { kind: 'scheduled', before, after, when: tail.when, source: text.slice(frame.start, tail.end) } };
}

/** The construct starting with the bracket at `start`, or `null` when no complete one starts there. */
function parseConstruct(text: string, start: number, memo: ConstructMemo): Construct | null {
  const known = memo.get(start);
  if (known !== undefined) return known;
  const newFrame = (open: '(' | '[', at: number): Frame => ({ open, start: at, phase: 'first', parts: [], current: [] });
  const stack: Frame[] = [newFrame(text[start] === '(' ? '(' : '[', start)];
  // A nested construct that fails takes every enclosing one with it: inside brackets there is no
  // stray-character reading to fall back on.
  const failAll = (): null => {
    for (const f of stack) memo.set(f.start, null);
    return null;
  };
  let pos = start + 1;
  for (;;) {
    const frame = stack[stack.length - 1]!;
    PLAIN_RUN.lastIndex = pos;
    if (PLAIN_RUN.test(text)) {
      frame.current.push(text.slice(pos, PLAIN_RUN.lastIndex));
      pos = PLAIN_RUN.lastIndex;
      continue;
    }
    const ch = text[pos];
    if (ch === undefined) return failAll();
    if (ch === '\\') {
      const n = escapeLength(text, pos);
      if (n === 0) return failAll();
      frame.current.push(text.slice(pos, pos + n));
      pos += n;
      continue;
    }
    if (ch === '(' || ch === '[') {
      const nested = memo.get(pos);
      if (nested === null) return failAll();
      if (nested === undefined) {
        stack.push(newFrame(ch, pos));
        pos++;
      } else {
        frame.current.push(nested.node);
        pos = nested.end;
      }
      continue;
    }
    const step = stepFrame(text, frame, pos, ch);
    if (step === 'fail') return failAll();
    if ('next' in step) {
      pos = step.next;
      continue;
    }
    memo.set(frame.start, step.done);
    stack.pop();
    const parent = stack[stack.length - 1];
    if (parent === undefined) return step.done;
    parent.current.push(step.done.node);
    pos = step.done.end;
  }
}

/** The prompt as schedule nodes, or `null` where A1111's grammar has no parse. */
function parseScheduleTree(text: string): ScheduleNode[] | null {
  const memo: ConstructMemo = new Map();
  const nodes: ScheduleNode[] = [];
  let pos = 0;
  while (pos < text.length) {
    PLAIN_RUN.lastIndex = pos;
    if (PLAIN_RUN.test(text)) {
      nodes.push(text.slice(pos, PLAIN_RUN.lastIndex));
      pos = PLAIN_RUN.lastIndex;
      continue;
    }
    const ch = text[pos]!;
    if (ch === '\\') {
      const n = escapeLength(text, pos);
      if (n === 0) return null;
      nodes.push(text.slice(pos, pos + n));
      pos += n;
    } else if (ch === '|') {
      return null;
    } else if (ch === '(' || ch === '[') {
      const construct = parseConstruct(text, pos, memo);
      nodes.push(construct === null ? ch : construct.node);
      pos = construct === null ? pos + 1 : construct.end;
    } else {
      nodes.push(ch);
      pos++;
    }
  }
  return nodes;
}

function* walkNodes(roots: readonly ScheduleNode[]): Generator<ScheduledNode | AlternateNode> {
  const stack: Array<readonly ScheduleNode[]> = [roots];
  for (let nodes = stack.pop(); nodes !== undefined; nodes = stack.pop()) {
    for (const node of nodes) {
      if (typeof node === 'string') continue;
      switch (node.kind) {
        case 'group':
          stack.push(node.nodes);
          break;
        case 'scheduled':
          yield node;
          if (node.before !== null) stack.push(node.before);
          stack.push(node.after);
          break;
        case 'alternate':
          yield node;
          stack.push(...node.options);
          break;
      }
    }
  }
}

function renderAtStep(roots: readonly ScheduleNode[], step: number, switchStep: ReadonlyMap<ScheduledNode, number>): string {
  const out: string[] = [];
  const stack: Array<{ nodes: readonly ScheduleNode[]; i: number }> = [{ nodes: roots, i: 0 }];
  while (stack.length > 0) {
    const top = stack[stack.length - 1]!;
    const node = top.nodes[top.i++];
    if (node === undefined) {
      stack.pop();
    } else if (typeof node === 'string') {
      out.push(node);
    } else if (node.kind === 'group') {
      stack.push({ nodes: node.nodes, i: 0 });
    } else if (node.kind === 'scheduled') {
      const shown = step <= switchStep.get(node)! ? node.before : node.after;
      if (shown !== null) stack.push({ nodes: shown, i: 0 });
    } else {
      stack.push({ nodes: node.options[(step - 1) % node.options.length]!, i: 0 });
    }
  }
  return out.join('');
}

export interface ScheduleOptions {
  /**
   * Steps of the hires-fix pass. When set (and `useOldScheduling` is off), the schedule is for that
   * pass: whole numbers count on from the end of the first pass (step − `steps`) and fractions
   * from 1.0 (`[x:1.5]` switches halfway through the hires pass). A1111's default: unset.
   */
  readonly hiresSteps?: number;
  /**
   * A1111's "Old prompt editing timelines" (`use_old_scheduling`, default off, set by the infotext
   * back-compat for images before 1.6.0): a number below 1 is a fraction, anything else a step,
   * whatever its spelling.
   */
  readonly useOldScheduling?: boolean;
}

export interface ScheduledPrompt {
  /** The text is used while the sampling step (1-based) is ≤ this. */
  readonly endAtStep: number;
  readonly prompt: string;
}

/**
 * The texts a prompt turns into over `steps` sampling steps, like A1111
 * `get_learned_conditioning_prompt_schedules([prompt], steps, hiresSteps, useOldScheduling)[0]`
 * with its current defaults (new scheduling, no hires pass).
 *
 * Switch points: a NUMBER written with a `.` is a fraction of the steps, otherwise a step number
 * (`[b:0.25]` at 10 steps switches after step `int(0.25·10)` = 2; `[b:3]` after step 3); the step is
 * truncated toward zero and capped at `steps`, and a switch point below 1 never shows `from`. With
 * an alternation anywhere, every step gets its own entry; `[a|b|c]` shows option
 * `(step − 1) mod count`. Text is returned verbatim (escapes and emphasis included) for
 * `parsePromptAttention`.
 *
 * Throws `PipelineError('BAD_STEPS')` unless `steps` (and `hiresSteps`) is a positive integer, and
 * `PipelineError('BAD_PROMPT')` for a switch point that overflows (`[a:1e999]`; A1111 crashes).
 */
export function getPromptSchedule(prompt: string, steps: number, options: ScheduleOptions = {}): ScheduledPrompt[] {
  checkSteps(steps, 'steps');
  const useOld = options.useOldScheduling ?? false;
  const hires = options.hiresSteps !== undefined && !useOld;
  if (options.hiresSteps !== undefined) checkSteps(options.hiresSteps, 'hiresSteps');
  const total = hires ? options.hiresSteps! : steps;
  const intOffset = hires ? steps : 0;
  const fractionOffset = hires ? 1 : 0;

  const tree = parseScheduleTree(prompt);
  if (tree === null) return [{ endAtStep: total, prompt }];

  const switchSteps = new Set<number>([total]);
  const switchStep = new Map<ScheduledNode, number>();
  for (const node of walkNodes(tree)) {
    if (node.kind === 'alternate') {
      for (let s = 1; s <= total; s++) switchSteps.add(s);
      continue;
    }
    let v = Number(node.when);
    if (useOld) v = v < 1 ? v * total : v;
    else v = node.when.includes('.') ? (v - fractionOffset) * total : v - intOffset;
    if (!Number.isFinite(v)) {
      throw new PipelineError('BAD_PROMPT', `"${node.source}": the switch point ${node.when} is out of range; write a step number or a fraction below 1.`, {
        construct: node.source,
      });
    }
    const at = Math.min(total, Math.trunc(v));
    switchStep.set(node, at);
    if (at >= 1) switchSteps.add(at);
  }
  return [...switchSteps].sort((a, b) => a - b).map((endAtStep) => ({ endAtStep, prompt: renderAtStep(tree, endAtStep, switchStep) }));
}

function checkSteps(value: number, field: string): void {
  if (!Number.isSafeInteger(value) || value < 1) {
    throw new PipelineError('BAD_STEPS', `${field} must be a positive whole number of sampling steps, got ${String(value)}.`, { field, value });
  }
}

// ---------------------------------------------------------------------------------------------
// Composable diffusion: get_multicond_prompt_list
// ---------------------------------------------------------------------------------------------

export interface ComposablePrompt {
  readonly prompt: string;
  readonly weight: number;
}

const AND_TEXT = 'AND';

/**
 * Splits a prompt at the word `AND` into weighted sub-prompts, like A1111 `get_multicond_prompt_list`:
 * `re.split(r"\bAND\b")` (Unicode word boundaries), then each part loses an optional trailing
 * `:weight` (`[-+]?(\d+\.?|\d*\.\d+)`, spaces allowed around the colon) and trailing whitespace;
 * leading whitespace stays (`"a AND b"` gives `"a"` and `" b"`). Weight defaults to 1. Duplicate
 * sub-prompts are kept (A1111 only shares their encoding).
 */
export function parseComposable(prompt: string): ComposablePrompt[] {
  const result: ComposablePrompt[] = [];
  let partStart = 0;
  let from = 0;
  for (;;) {
    const at = prompt.indexOf(AND_TEXT, from);
    if (at === -1) break;
    from = at + 1;
    if (isPyWordAt(prompt, at - 1) || isPyWordAt(prompt, at + AND_TEXT.length)) continue;
    result.push(splitWeight(prompt.slice(partStart, at)));
    partStart = at + AND_TEXT.length;
    from = partStart;
  }
  result.push(splitWeight(prompt.slice(partStart)));
  return result;
}

const DIGIT_OR_DOT = new RegExp(`[.${PY_DIGIT}]`, 'u');

/**
 * A1111's `re_weight` (`^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$`), read from the end
 * in linear time: the weight is the maximal run of digits and dots at the end (if it has at most one
 * dot and a digit), an optional sign, optional spaces, then a colon; the text stops before the
 * spaces in front of that colon.
 */
function splitWeight(part: string): ComposablePrompt {
  const trimmed = pyRstrip(part);
  let numberStart = trimmed.length;
  while (numberStart > 0 && DIGIT_OR_DOT.test(charBefore(trimmed, numberStart))) numberStart -= charBefore(trimmed, numberStart).length;
  const digits = trimmed.slice(numberStart);
  const dots = digits.length - digits.replaceAll('.', '').length;
  if (digits.length === 0 || dots > 1 || dots === digits.length) return { prompt: trimmed, weight: 1 };
  let signStart = numberStart;
  if (trimmed[signStart - 1] === '+' || trimmed[signStart - 1] === '-') signStart--;
  let colon = signStart;
  while (colon > 0 && isSpaceAt(trimmed, colon - 1)) colon--;
  if (trimmed[colon - 1] !== ':') return { prompt: trimmed, weight: 1 };
  let textEnd = colon - 1;
  while (textEnd > 0 && isSpaceAt(trimmed, textEnd - 1)) textEnd--;
  return { prompt: trimmed.slice(0, textEnd), weight: pyFloat(trimmed.slice(signStart))! };
}

/** The code point (as a string of 1 or 2 units) ending right before UTF-16 index `end`. */
function charBefore(text: string, end: number): string {
  const low = text.charCodeAt(end - 1);
  if (low >= 0xdc00 && low <= 0xdfff && end >= 2) {
    const high = text.charCodeAt(end - 2);
    if (high >= 0xd800 && high <= 0xdbff) return text.slice(end - 2, end);
  }
  return text.slice(end - 1, end);
}

// ---------------------------------------------------------------------------------------------
// Extra networks: <type:arg:arg…> (modules/extra_networks.py, Lora extension)
// ---------------------------------------------------------------------------------------------

export interface ExtraNetworkTag {
  /** `lora`, `hypernet`, `lyco`, … exactly as written (A1111 matches `\w+`). */
  readonly type: string;
  /** First positional item; `''` when every item is `key=value`. */
  readonly name: string;
  /** Positional items after the name, as written (`<lora:x:0.8:0.5>` → `['0.8', '0.5']`). */
  readonly args: readonly string[];
  /** `key=value` items (`te=`, `unet=`, `dyn=`, or anything else); a later key wins. Keys are not trimmed. */
  readonly named: Readonly<Record<string, string>>;
  /** The tag as it appeared in the prompt, for messages. */
  readonly tag: string;
}

export interface ExtractedNetworks {
  /** The prompt with every tag removed (nothing else changes, spaces and commas around tags stay). */
  readonly prompt: string;
  readonly networks: readonly ExtraNetworkTag[];
}

/**
 * Cuts extra-network tags out of a prompt like A1111 `extra_networks.parse_prompt`:
 * `re.sub(r"<(\w+):([^>]+)>", "", prompt)` (a tag runs to the first `>`, and may contain `<`, `:`
 * and newlines), each tag's text after the type split at every `:`; an item with exactly one `=`
 * (`item.split('=', 2)` giving two parts) is named, every other item positional.
 */
export function extractExtraNetworks(prompt: string): ExtractedNetworks {
  const networks: ExtraNetworkTag[] = [];
  const kept: string[] = [];
  let copiedTo = 0;
  let pos = 0;
  let nextGt = -1;
  for (;;) {
    const lt = prompt.indexOf('<', pos);
    if (lt === -1) break;
    let typeEnd = lt + 1;
    while (isPyWordAt(prompt, typeEnd)) typeEnd += prompt.codePointAt(typeEnd)! > 0xffff ? 2 : 1;
    if (typeEnd === lt + 1 || prompt[typeEnd] !== ':') {
      pos = lt + 1;
      continue;
    }
    // `[^>]+` then `>`: the first `>` after the colon, with at least one character before it.
    if (nextGt <= typeEnd) nextGt = prompt.indexOf('>', typeEnd + 1);
    if (nextGt === -1) break;
    if (nextGt === typeEnd + 1) {
      pos = lt + 1;
      continue;
    }
    networks.push(toTag(prompt.slice(lt + 1, typeEnd), prompt.slice(typeEnd + 1, nextGt), prompt.slice(lt, nextGt + 1)));
    kept.push(prompt.slice(copiedTo, lt));
    copiedTo = nextGt + 1;
    pos = nextGt + 1;
  }
  kept.push(prompt.slice(copiedTo));
  return { prompt: kept.join(''), networks };
}

function toTag(type: string, argText: string, tag: string): ExtraNetworkTag {
  const positional: string[] = [];
  const named: Record<string, string> = {};
  for (const item of argText.split(':')) {
    const parts = item.split('=');
    if (parts.length === 2) {
      // defineProperty, so a key such as `__proto__` is stored as data, not as the prototype.
      Object.defineProperty(named, parts[0]!, { value: parts[1]!, enumerable: true, writable: true, configurable: true });
    } else {
      positional.push(item);
    }
  }
  return { type, name: positional[0] ?? '', args: positional.slice(1), named, tag };
}

export interface LoraWeights {
  /** Text-encoder multiplier. */
  readonly te: number;
  /** UNet multiplier. */
  readonly unet: number;
  /** `dyn` (dynamic rank limit for some LyCORIS files), `null` when not given. */
  readonly dyn: number | null;
}

/**
 * The multipliers a `<lora:…>` tag asks for, like A1111's Lora extension (`ExtraNetworkLora.activate`):
 * TE = second positional item, else 1.0, overridden by `te=`; UNet = third positional item, else the
 * TE value, overridden by `unet=`; dyn = fourth positional item, overridden by `dyn=`. Numbers are
 * read as Python `float()`/`int()` read them (spaces, `_`, `1e-1`, non-ASCII digits).
 *
 * Throws `PipelineError('BAD_PROMPT')`, naming the tag, when the tag has no name or a multiplier is
 * not a finite number (A1111 then skips every LoRA of the prompt with a ValueError; `inf`/`nan`,
 * which Python accepts, are rejected here too) or `dyn` is not a whole number.
 */
export function loraWeights(network: ExtraNetworkTag): LoraWeights {
  if (network.name === '') {
    throw new PipelineError('BAD_PROMPT', `${network.tag} has no ${network.type} name; write <${network.type}:NAME:WEIGHT>.`, { tag: network.tag });
  }
  const [teArg, unetArg, dynArg] = network.args;
  const named = network.named;
  // A1111 converts the positional value before looking at te=, so a bad positional value fails even when te= is given.
  let te = teArg === undefined ? 1 : readMultiplier(network, 'text-encoder weight', teArg);
  if (Object.hasOwn(named, 'te')) te = readMultiplier(network, 'text-encoder weight (te=)', named['te']!);
  let unet = unetArg === undefined ? te : readMultiplier(network, 'UNet weight', unetArg);
  if (Object.hasOwn(named, 'unet')) unet = readMultiplier(network, 'UNet weight (unet=)', named['unet']!);
  let dyn = dynArg === undefined ? null : readDyn(network, dynArg);
  if (Object.hasOwn(named, 'dyn')) dyn = readDyn(network, named['dyn']!);
  return { te, unet, dyn };
}

function readMultiplier(network: ExtraNetworkTag, what: string, text: string): number {
  const value = pyFloat(text);
  if (value === undefined || !Number.isFinite(value)) {
    throw new PipelineError('BAD_PROMPT', `${network.tag}: the ${what} "${text}" is not a number; write e.g. <${network.type}:${network.name}:0.8>.`, {
      tag: network.tag,
      argument: what,
      value: text,
    });
  }
  return value;
}

function readDyn(network: ExtraNetworkTag, text: string): number {
  const value = pyInt(text);
  if (value === undefined) {
    throw new PipelineError('BAD_PROMPT', `${network.tag}: dyn "${text}" is not a whole number.`, { tag: network.tag, argument: 'dyn', value: text });
  }
  return value;
}
