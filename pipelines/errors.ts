/**
 * Typed errors raised by `pipelines/`: generation settings, prompts, schedulers, images, jobs.
 * Same shape as `models/errors.ts`: a stable `code`, an actionable message (what, where, expected,
 * found, what to do) and structured `details` for the UI.
 */

export type PipelineErrorCode =
  | 'UNKNOWN_SAMPLER'
  | 'BAD_SCHEDULER_CONFIG'
  | 'BAD_STEPS'
  | 'BAD_SIZE'
  | 'BAD_SEED'
  | 'BAD_ARGUMENT'
  | 'BAD_PROMPT'
  | 'PROMPT_TOO_LONG'
  | 'BAD_IMAGE'
  | 'BAD_METADATA'
  | 'BAD_LATENTS'
  | 'JOB_CANCELLED';

export class PipelineError extends Error {
  readonly code: PipelineErrorCode;
  readonly details: Readonly<Record<string, unknown>>;

  constructor(code: PipelineErrorCode, message: string, details: Record<string, unknown> = {}) {
    super(message);
    this.name = 'PipelineError';
    this.code = code;
    this.details = details;
  }

  toJSON(): { code: PipelineErrorCode; message: string; details: Readonly<Record<string, unknown>> } {
    return { code: this.code, message: this.message, details: this.details };
  }
}

export function isPipelineError(e: unknown): e is PipelineError {
  return e instanceof PipelineError;
}
