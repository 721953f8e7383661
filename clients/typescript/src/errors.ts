/**
 * The errors a client throws, one class per way a call can fail:
 *
 * OptserveError
 * ├── TransportError          no answer: the connection failed or timed out
 * ├── UnexpectedResponse      a success status whose body is not what the API describes
 * └── APIError                an error status: status, title, detail, errors, problem
 *     ├── BadRequest          400: the body could not be parsed
 *     ├── Unauthorized        401: no valid API key
 *     ├── NotFound            404: no such session for this key
 *     ├── StepConflict        409: `expectedStep` is not the session's step (see currentStep)
 *     ├── PayloadTooLarge     413
 *     ├── UnsupportedMediaType 415
 *     ├── ValidationError     422: the spec, a name, a shape or a value is invalid (see errors)
 *     ├── TooManyRequests     429: the key's quota is full (retryAfter when it will pass)
 *     └── ServerError         5xx
 *         └── ServiceUnavailable 503: busy or the store is down; nothing was applied
 */

/** One invalid field of a 422, as `errors` in the problem lists it. */
export interface FieldError {
  field: string;
  message: string;
}

/** An RFC 9457 problem+json body. */
export interface Problem {
  type?: string;
  title?: string;
  status?: number;
  detail?: string;
  errors?: FieldError[];
  current_step?: number;
  [member: string]: unknown;
}

export class OptserveError extends Error {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = new.target.name;
  }
}

export class TransportError extends OptserveError {}

export class UnexpectedResponse extends OptserveError {}

export class APIError extends OptserveError {
  readonly status: number;
  readonly title: string;
  readonly detail: string;
  readonly errors: FieldError[];
  readonly problem: Problem;
  /** Seconds the server asked to wait (Retry-After), when it did. */
  readonly retryAfter: number | undefined;

  constructor(status: number, problem: Problem, retryAfter?: number) {
    const title = problem.title ?? "Error";
    const detail = problem.detail ?? "";
    super(detail ? `${status} ${title}: ${detail}` : `${status} ${title}`);
    this.status = status;
    this.title = title;
    this.detail = detail;
    this.errors = Array.isArray(problem.errors) ? problem.errors : [];
    this.problem = problem;
    this.retryAfter = retryAfter;
  }
}

export class BadRequest extends APIError {}
export class Unauthorized extends APIError {}
export class NotFound extends APIError {}
export class PayloadTooLarge extends APIError {}
export class UnsupportedMediaType extends APIError {}
export class ValidationError extends APIError {}
export class TooManyRequests extends APIError {}
export class ServerError extends APIError {}
export class ServiceUnavailable extends ServerError {}

export class StepConflict extends APIError {
  /** The session's step: send that as `expectedStep`, or leave it out. */
  readonly currentStep: number;

  constructor(status: number, problem: Problem, retryAfter?: number) {
    super(status, problem, retryAfter);
    this.currentStep = typeof problem.current_step === "number" ? problem.current_step : -1;
  }
}

const BY_STATUS: Record<number, typeof APIError> = {
  400: BadRequest,
  401: Unauthorized,
  404: NotFound,
  409: StepConflict,
  413: PayloadTooLarge,
  415: UnsupportedMediaType,
  422: ValidationError,
  429: TooManyRequests,
  503: ServiceUnavailable,
};

/** The typed error for an error answer: from its problem+json when the server sent one. */
export async function errorOf(response: Response, retryAfter?: number): Promise<APIError> {
  const text = await response.text();
  let problem: Problem = { title: response.statusText || "Error", detail: text.slice(0, 500).trim() };
  if ((response.headers.get("content-type") ?? "").includes("json")) {
    try {
      const parsed: unknown = JSON.parse(text);
      if (parsed && typeof parsed === "object" && !Array.isArray(parsed)) problem = parsed as Problem;
    } catch {
      // not JSON after all: the status line and the text say what there is
    }
  }
  const cls = BY_STATUS[response.status] ?? (response.status >= 500 ? ServerError : APIError);
  return new cls(response.status, problem, retryAfter);
}
