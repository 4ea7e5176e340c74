/** Error codes → what the UI says above the backend's message (which names file, field and fix). */
const TITLES: Readonly<Record<string, string>> = {
  BAD_PAYLOAD: 'Invalid setting',
  BAD_ARGUMENT: 'Invalid setting',
  BAD_STEPS: 'Invalid steps',
  BAD_SIZE: 'Invalid image size',
  BAD_SEED: 'Invalid seed',
  BAD_PROMPT: 'Invalid prompt',
  PROMPT_TOO_LONG: 'Prompt too long',
  UNKNOWN_SAMPLER: 'Unknown sampler',
  BAD_IMAGE: 'Not a readable image',
  BAD_METADATA: 'Damaged image metadata',
  JOB_CANCELLED: 'Cancelled',
  NO_MODEL: 'No model open',
  NOT_FOUND: 'Not found',
  MODEL_NOT_FOUND: 'Model not found',
  MISSING_COMPONENT: 'The model is incomplete',
  UNSUPPORTED_ARCHITECTURE: 'Not an SD 1.5 model',
  PICKLE_CHECKPOINT: 'Unsafe model format',
  UNKNOWN_MODEL_FORMAT: 'Unknown model format',
  NOT_SAFETENSORS: 'Not a safetensors file',
  TRUNCATED_FILE: 'Damaged file',
  HEADER_OVERRUN: 'Damaged file',
  BAD_HEADER: 'Damaged file',
  BAD_TOKENIZER: 'Tokenizer problem',
  UNKNOWN_LORA_FORMAT: 'Unknown LoRA format',
  UNSUPPORTED_LORA: 'Unsupported LoRA',
  LORA_BASE_MISMATCH: 'LoRA for another base model',
  AMBIGUOUS_LORA_NAME: 'Ambiguous LoRA name',
  RUNTIME: 'Inference failed',
  UNAUTHORIZED: 'Not authorised',
  INTERNAL: 'Something went wrong',
};

export function errorTitle(code: string): string {
  return TITLES[code] ?? 'Something went wrong';
}

/** "12.0 GiB": a memory size for people. */
export function memoryText(bytes: number): string {
  return `${(bytes / 2 ** 30).toFixed(1)} GiB`;
}
