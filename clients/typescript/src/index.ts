/** optserve's TypeScript client: `new Client({ url, apiKey })`, then sessions, steps, checkpoints. */

export {
  Client,
  type ClientOptions,
  type CreateOptions,
  type HistoryRecord,
  JSON_CREATE_NUMBERS,
  parseRetryAfter,
  Session,
  type SessionInfo,
  type SessionSummary,
  type StepOptions,
  type StepResult,
  type Wire,
} from "./client.js";
export {
  APIError,
  BadRequest,
  type FieldError,
  NotFound,
  OptserveError,
  PayloadTooLarge,
  type Problem,
  ServerError,
  ServiceUnavailable,
  StepConflict,
  TooManyRequests,
  TransportError,
  Unauthorized,
  UnexpectedResponse,
  UnsupportedMediaType,
  ValidationError,
} from "./errors.js";
export * as safetensors from "./safetensors.js";
export { Worker, type WorkerStepOptions } from "./worker.js";
export { type Dtype, halfToNumber, type Tensor, type TensorInput, type Tensors, type TypedData } from "./tensors.js";
