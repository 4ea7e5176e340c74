/**
 * Typed errors of the batch queue (same shape as `pipelines/errors.ts`): a stable `code`, an
 * actionable message and structured `details`.
 */

export type QueueErrorCode =
  /** No job or batch with that id in this queue database. */
  | 'JOB_NOT_FOUND'
  /** The database was written by a newer Chorus (a schema this one does not know). */
  | 'QUEUE_DB_NEWER'
  /** The file is not a Chorus queue database, or cannot be opened. */
  | 'QUEUE_DB_UNREADABLE'
  /** A new batch would overwrite a file that exists, or one another queued job will write. */
  | 'OUTPUT_EXISTS';

export class QueueError extends Error {
  readonly code: QueueErrorCode;
  readonly details: Readonly<Record<string, unknown>>;

  constructor(code: QueueErrorCode, message: string, details: Record<string, unknown> = {}) {
    super(message);
    this.name = 'QueueError';
    this.code = code;
    this.details = details;
  }

  toJSON(): { code: QueueErrorCode; message: string; details: Readonly<Record<string, unknown>> } {
    return { code: this.code, message: this.message, details: this.details };
  }
}

export function isQueueError(e: unknown): e is QueueError {
  return e instanceof QueueError;
}
