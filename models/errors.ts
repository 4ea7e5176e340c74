/**
 * Typed errors for everything that enters through `models/`: model files, LoRA files, configs.
 *
 * Every error carries a stable `code` (the UI maps it to text), a message that says what happened,
 * which file or key, what was expected, what was found and what to do, and the structured facts as
 * `details` so a UI can show them without parsing the message.
 */

export type ModelErrorCode =
  | 'NOT_SAFETENSORS'
  | 'TRUNCATED_FILE'
  | 'HEADER_OVERRUN'
  | 'BAD_HEADER'
  | 'OFFSETS_OUT_OF_RANGE'
  | 'OFFSETS_OVERLAP'
  | 'UNSUPPORTED_DTYPE'
  | 'MISSING_TENSOR'
  | 'SHAPE_MISMATCH'
  | 'MISSING_COMPONENT'
  | 'BAD_CONFIG'
  | 'UNSUPPORTED_ARCHITECTURE'
  | 'PICKLE_CHECKPOINT'
  | 'UNKNOWN_MODEL_FORMAT'
  | 'MODEL_NOT_FOUND'
  | 'AMBIGUOUS_LORA_NAME'
  | 'UNKNOWN_LORA_FORMAT'
  | 'UNSUPPORTED_LORA'
  | 'LORA_BASE_MISMATCH'
  | 'BAD_TOKENIZER'
  | 'GRAPH_BUILD'
  | 'RUNTIME'
  | 'DEVICE_LIMITS';

export class ModelError extends Error {
  readonly code: ModelErrorCode;
  readonly details: Readonly<Record<string, unknown>>;

  constructor(code: ModelErrorCode, message: string, details: Record<string, unknown> = {}) {
    super(message);
    this.name = 'ModelError';
    this.code = code;
    this.details = details;
  }

  /** The shape errors take when they cross a process boundary. */
  toJSON(): { code: ModelErrorCode; message: string; details: Readonly<Record<string, unknown>> } {
    return { code: this.code, message: this.message, details: this.details };
  }
}

export function isModelError(e: unknown): e is ModelError {
  return e instanceof ModelError;
}
