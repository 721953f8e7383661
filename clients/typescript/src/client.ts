/**
 * `Client` speaks optserve's v1 HTTP API over `fetch` (Node >= 18 and browsers); `Session` is one session.
 * Steps carry an Idempotency-Key, the same on every resend of one step, so that a step whose answer was
 * lost is answered again by the server rather than applied twice: steps, reads, parameter writes and
 * deletes are resent after a transport failure, a 503, or a 429 with Retry-After; a create only after an
 * answer that promises nothing was done (a resend after a lost answer could create two sessions).
 */

import { errorOf, TransportError, UnexpectedResponse } from "./errors.js";
import * as safetensors from "./safetensors.js";
import { numel, type Tensor, tensorFromJson, tensorJson, type Tensors, toTensors } from "./tensors.js";

export type Wire = "json" | "safetensors";
const JSON_TYPE = "application/json";
const SAFETENSORS = "application/vnd.safetensors";
/** Parameters of a create that go as JSON; larger ones go as safetensors (the spec in its metadata). */
export const JSON_CREATE_NUMBERS = 65_536;
const CREATE_KEY = "optserve.create";

export interface ClientOptions {
  /** The server, e.g. `http://127.0.0.1:8000`. */
  url: string;
  /** An API key, sent as `Authorization: Bearer <key>`. */
  apiKey?: string;
  /** How steps and parameter writes travel (default safetensors: exact and compact). */
  wire?: Wire;
  /** More tries after the first (default 5). */
  retries?: number;
  /** Seconds of the first backoff, doubling up to `maxBackoff` (defaults 0.2 and 10). */
  backoff?: number;
  maxBackoff?: number;
  /** A Retry-After longer than this many seconds is not waited for: the error is thrown (default 120). */
  maxRetryAfter?: number;
  /** Milliseconds one exchange may take (default 60,000 plus 500 per MiB carried). */
  timeoutMs?: number;
  /** The fetch to use (default the global one). */
  fetch?: typeof fetch;
}

/** The session as GET /v1/sessions/{id} describes it (the API's JSON, snake_case as in docs/api.md). */
export interface SessionInfo {
  id: string;
  step: number;
  lr: number[];
  optimizer: { name: string; [hyperparameter: string]: unknown };
  scheduler: { name: string; [argument: string]: unknown } | null;
  param_groups: { params: string[]; [hyperparameter: string]: unknown }[];
  params: Record<string, { shape: number[]; dtype: "float32" | "float64" }>;
  steps_per_epoch: number;
  clip_grad_norm: number | null;
  clip_grad_value: number | null;
  nonfinite: "error" | "skip" | "allow";
  aggregation:
    | { mode: "async"; max_staleness: number; staleness_lr: "none" | "inverse" }
    | { mode: "sync"; workers: number; reduce: "mean" | "sum" | "weighted_mean"; timeout: number; min_workers: number }
    | null;
  created_at: number;
  updated_at: number;
  metadata: Record<string, string>;
}

export interface SessionSummary {
  id: string;
  step: number;
  lr: number[];
  created_at: number;
  updated_at: number;
  metadata: Record<string, string>;
}

export interface StepResult {
  /** The session's step after this one. */
  step: number;
  /** The lr per group this step used. */
  lr: number[];
  skipped: boolean;
  /** The gradients' L2 norm before clipping; null when skipped. */
  gradNorm: number | null;
  /** The new parameters (empty with `returnParams: false`). */
  params: Record<string, Tensor>;
  /** The server answered a resend of this step from its first answer; nothing was applied again. */
  replayed: boolean;
  /** Steps the gradient was behind the session (0 unless the session aggregates asynchronously). */
  staleness: number;
  /** A synchronous round's contributors (sorted); empty otherwise. */
  workers: string[];
}

export interface HistoryRecord {
  step: number;
  lr: number[];
  loss: number | null;
  grad_norm: number | null;
  skipped: boolean;
  time: number;
}

export interface CreateOptions {
  params: Tensors;
  optimizer: { name: string; [hyperparameter: string]: unknown };
  scheduler?: { name: string; [argument: string]: unknown };
  paramGroups?: { params: string[]; [hyperparameter: string]: unknown }[];
  stepsPerEpoch?: number;
  clipGradNorm?: number;
  clipGradValue?: number;
  nonfinite?: "error" | "skip" | "allow";
  /** How several workers' steps combine: `{ mode: "async", max_staleness, staleness_lr }`. */
  aggregation?:
    | { mode: "async"; max_staleness: number; staleness_lr?: "none" | "inverse" }
    | { mode: "sync"; workers: number; reduce?: "mean" | "sum" | "weighted_mean"; timeout?: number; min_workers?: number };
  metadata?: Record<string, string>;
}

export interface StepOptions {
  /** The step the gradient was computed at: it must equal the session's step (else StepConflict, 409),
   * or, when the session aggregates asynchronously, be at most `max_staleness` behind it. */
  expectedStep?: number;
  /** Recorded in the history; the metric of reduce_lr_on_plateau. */
  loss?: number;
  /** false: the answer leaves the parameters out. */
  returnParams?: boolean;
  /** Synchronous rounds: this worker's id; the step is its contribution to round `expectedStep`, answered
   * once the round is applied. */
  worker?: string;
  /** Synchronous rounds with reduce weighted_mean: this contribution's weight (e.g. its batch size). */
  weight?: number;
  /** Resends a step made before (e.g. by a worker process that restarted): the same key and gradients are
   * answered again, never applied twice. One is made up when not given. */
  idempotencyKey?: string;
}

interface Call {
  method: string;
  path: string;
  body?: Uint8Array | string;
  contentType?: string;
  accept?: string;
  query?: Record<string, string>;
  idempotencyKey?: string;
  /** May be sent again after it may have reached the server. */
  resendable: boolean;
  /** A 404 after a resend means the first try did the work (a delete). */
  goneMeansDone?: boolean;
  /** Bytes expected in the answer, and seconds the server may hold it (a synchronous round), for the
   * timeout. */
  sizeHint?: number;
  waitSeconds?: number;
}

async function newIdempotencyKey(): Promise<string> {
  const webCrypto = (globalThis as { crypto?: Crypto }).crypto;
  if (webCrypto?.randomUUID) return webCrypto.randomUUID();
  if (webCrypto?.getRandomValues) {
    const b = webCrypto.getRandomValues(new Uint8Array(16));
    b[6] = (b[6]! & 0x0f) | 0x40;
    b[8] = (b[8]! & 0x3f) | 0x80;
    const hex = Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
    return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
  }
  return (await import("node:crypto")).randomUUID(); // Node 18 without the global
}

/** Seconds a Retry-After asks for (delay-seconds or an HTTP-date), undefined if absent or unreadable. */
export function parseRetryAfter(value: string | null, now = Date.now()): number | undefined {
  if (value === null) return undefined;
  const text = value.trim();
  if (/^\d+$/.test(text)) return Number(text);
  const when = Date.parse(text);
  return Number.isNaN(when) ? undefined : Math.max(0, (when - now) / 1000);
}

const sleep = (seconds: number) => new Promise((resolve) => setTimeout(resolve, seconds * 1000));

export class Client {
  readonly url: string;
  readonly wire: Wire;
  private readonly apiKey: string | undefined;
  private readonly retries: number;
  private readonly backoff: number;
  private readonly maxBackoff: number;
  private readonly maxRetryAfter: number;
  private readonly timeoutMs: number;
  private readonly fetchImpl: typeof fetch;

  constructor(options: ClientOptions) {
    this.url = options.url.replace(/\/+$/, "");
    this.apiKey = options.apiKey;
    this.wire = options.wire ?? "safetensors";
    this.retries = options.retries ?? 5;
    this.backoff = options.backoff ?? 0.2;
    this.maxBackoff = options.maxBackoff ?? 10;
    this.maxRetryAfter = options.maxRetryAfter ?? 120;
    this.timeoutMs = options.timeoutMs ?? 60_000;
    this.fetchImpl = options.fetch ?? globalThis.fetch.bind(globalThis);
  }

  /** A new session. Parameters of more than JSON_CREATE_NUMBERS numbers travel as safetensors. */
  async createSession(options: CreateOptions): Promise<Session> {
    const params = toTensors(options.params, "float32", "parameter");
    const spec: Record<string, unknown> = { optimizer: options.optimizer };
    const optional: [string, unknown][] = [
      ["scheduler", options.scheduler],
      ["param_groups", options.paramGroups],
      ["steps_per_epoch", options.stepsPerEpoch],
      ["clip_grad_norm", options.clipGradNorm],
      ["clip_grad_value", options.clipGradValue],
      ["nonfinite", options.nonfinite],
      ["aggregation", options.aggregation],
      ["metadata", options.metadata],
    ];
    for (const [key, value] of optional) if (value !== undefined) spec[key] = value;
    let call: Call;
    if (numel(params) > JSON_CREATE_NUMBERS) {
      const body = safetensors.encode(params, { [CREATE_KEY]: JSON.stringify(spec) });
      call = { method: "POST", path: "/v1/sessions", body, contentType: SAFETENSORS, resendable: false };
    } else {
      const json: Record<string, unknown> = { ...spec, params: {} };
      for (const [name, t] of Object.entries(params)) {
        (json.params as Record<string, unknown>)[name] = tensorJson(t, `parameter ${name}`);
      }
      call = { method: "POST", path: "/v1/sessions", body: JSON.stringify(json), contentType: JSON_TYPE, resendable: false };
    }
    return new Session(this, (await this.json(call)) as SessionInfo);
  }

  /** A new session from a checkpoint's bytes: it continues exactly where the checkpoint was. */
  async restore(checkpoint: Uint8Array): Promise<Session> {
    const call = { method: "POST", path: "/v1/sessions", body: checkpoint, contentType: SAFETENSORS, resendable: false };
    return new Session(this, (await this.json(call)) as SessionInfo);
  }

  async getSession(id: string): Promise<Session> {
    return new Session(this, await this.info(id));
  }

  async info(id: string): Promise<SessionInfo> {
    return (await this.json({ method: "GET", path: sessionPath(id), resendable: true })) as SessionInfo;
  }

  async listSessions(): Promise<SessionSummary[]> {
    const answer = (await this.json({ method: "GET", path: "/v1/sessions", resendable: true })) as {
      sessions: SessionSummary[];
    };
    return answer.sessions;
  }

  async optimizers(): Promise<unknown[]> {
    return ((await this.json({ method: "GET", path: "/v1/optimizers", resendable: true })) as { optimizers: unknown[] })
      .optimizers;
  }

  async schedulers(): Promise<unknown[]> {
    return ((await this.json({ method: "GET", path: "/v1/schedulers", resendable: true })) as { schedulers: unknown[] })
      .schedulers;
  }

  /** The lr before each of the next `steps` steps, per group. */
  async previewSchedule(preview: {
    lr: number | number[];
    scheduler: { name: string; [argument: string]: unknown };
    steps: number;
    steps_per_epoch?: number;
    losses?: number[];
    optimizer?: { name: string; [hyperparameter: string]: unknown };
  }): Promise<number[][]> {
    const call = {
      method: "POST",
      path: "/v1/schedules/preview",
      body: JSON.stringify(preview),
      contentType: JSON_TYPE,
      resendable: true,
    };
    return ((await this.json(call)) as { lr: number[][] }).lr;
  }

  /** @internal */
  async json(call: Call): Promise<unknown> {
    const response = await this.send({ ...call, accept: JSON_TYPE });
    if (response.status === 204) return undefined;
    const text = await response.text();
    try {
      return JSON.parse(text);
    } catch {
      throw new UnexpectedResponse(`${call.method} ${call.path}: the answer is not JSON: ${text.slice(0, 200)}`);
    }
  }

  /** @internal One exchange, resent as the call allows; throws the typed error of an error answer. */
  async send(call: Call): Promise<Response> {
    const headers: Record<string, string> = { Accept: call.accept ?? JSON_TYPE };
    if (call.contentType) headers["Content-Type"] = call.contentType;
    if (this.apiKey !== undefined) headers.Authorization = `Bearer ${this.apiKey}`;
    if (call.idempotencyKey) headers["Idempotency-Key"] = call.idempotencyKey;
    const query = call.query ? `?${new URLSearchParams(call.query)}` : "";
    const carried = Math.max(call.body?.length ?? 0, call.sizeHint ?? 0);
    const timeout = Math.ceil(this.timeoutMs + 1000 * (call.waitSeconds ?? 0) + (500 * carried) / (1 << 20));
    for (let attempt = 0; ; attempt++) {
      let response: Response;
      try {
        response = await this.fetchImpl(`${this.url}${call.path}${query}`, {
          method: call.method,
          headers,
          body: call.body as BodyInit | undefined,
          signal: AbortSignal.timeout(timeout),
        });
      } catch (cause) {
        if (call.resendable && attempt < this.retries) {
          await sleep(this.backoffDelay(attempt));
          continue;
        }
        throw new TransportError(`${call.method} ${call.path}: ${String((cause as Error)?.message ?? cause)}`, {
          cause,
        });
      }
      if (attempt > 0 && call.goneMeansDone && response.status === 404) return new Response(null, { status: 204 });
      if (response.ok) return response;
      const retryAfter = parseRetryAfter(response.headers.get("retry-after"));
      // 503 and 429 promise that nothing was done; a 429 without Retry-After is a quota: waiting will not lift it
      const again = response.status === 503 || (response.status === 429 && retryAfter !== undefined);
      if (again && attempt < this.retries && (retryAfter ?? 0) <= this.maxRetryAfter) {
        await response.arrayBuffer();
        await sleep(retryAfter ?? this.backoffDelay(attempt));
        continue;
      }
      throw await errorOf(response, retryAfter);
    }
  }

  private backoffDelay(attempt: number): number {
    return Math.min(this.maxBackoff, this.backoff * 2 ** attempt) * (0.5 + Math.random() / 2);
  }
}

function sessionPath(id: string, tail = ""): string {
  return `/v1/sessions/${encodeURIComponent(id)}${tail}`;
}

function isSafetensors(response: Response): boolean {
  return (response.headers.get("content-type") ?? "").split(";")[0]!.trim() === SAFETENSORS;
}

async function tensorsOf(response: Response): Promise<{ tensors: Record<string, Tensor>; metadata: Record<string, string> }> {
  if (isSafetensors(response)) return safetensors.decode(new Uint8Array(await response.arrayBuffer()));
  const body = (await response.json()) as { params?: Record<string, unknown>; step?: number };
  const tensors: Record<string, Tensor> = {};
  for (const [name, value] of Object.entries(body.params ?? {})) tensors[name] = tensorFromJson(value, `param ${name}`);
  return { tensors, metadata: body.step === undefined ? {} : { step: String(body.step) } };
}

export class Session {
  readonly client: Client;
  /** The session as last seen: refreshed by `refresh()`, `setParams()`; `info.step` follows each step. */
  info: SessionInfo;

  constructor(client: Client, info: SessionInfo) {
    this.client = client;
    this.info = info;
  }

  get id(): string {
    return this.info.id;
  }

  /** One optimizer step with these gradients (a parameter without one is left alone this step). */
  async step(grads: Tensors, options: StepOptions = {}): Promise<StepResult> {
    const tensors = toTensors(grads, "float64", "gradient");
    const wire = this.client.wire;
    let body: Uint8Array | string;
    if (wire === "safetensors") {
      const metadata: Record<string, string> = {};
      if (options.expectedStep !== undefined) metadata.step = String(options.expectedStep);
      if (options.loss !== undefined) metadata.loss = String(options.loss);
      if (options.worker !== undefined) metadata.worker = options.worker;
      if (options.weight !== undefined) metadata.weight = String(options.weight);
      body = safetensors.encode(tensors, metadata);
    } else {
      const json: Record<string, unknown> = { grads: {} };
      for (const [name, t] of Object.entries(tensors)) {
        (json.grads as Record<string, unknown>)[name] = tensorJson(t, `gradient ${name}`);
      }
      if (options.expectedStep !== undefined) json.step = options.expectedStep;
      if (options.loss !== undefined) json.loss = options.loss;
      if (options.worker !== undefined) json.worker = options.worker;
      if (options.weight !== undefined) json.weight = options.weight;
      body = JSON.stringify(json);
    }
    const type = wire === "safetensors" ? SAFETENSORS : JSON_TYPE;
    const returnParams = options.returnParams ?? true;
    const paramBytes = Object.values(this.info.params).reduce(
      (n, p) => n + p.shape.reduce((a, b) => a * b, 1) * (p.dtype === "float64" ? 8 : 4),
      0,
    );
    const response = await this.client.send({
      method: "POST",
      path: sessionPath(this.id, "/step"),
      body,
      contentType: type,
      accept: type,
      query: returnParams ? undefined : { return_params: "false" },
      idempotencyKey: options.idempotencyKey ?? (await newIdempotencyKey()),
      resendable: true,
      sizeHint: returnParams ? paramBytes : 0,
      waitSeconds: options.worker !== undefined && this.info.aggregation?.mode === "sync" ? this.info.aggregation.timeout : 0,
    });
    const step = Number(response.headers.get("optserve-step"));
    const lr = JSON.parse(response.headers.get("optserve-lr") ?? "null") as number[] | null;
    const gradNorm = response.headers.get("optserve-grad-norm");
    if (!Number.isInteger(step) || !Array.isArray(lr) || gradNorm === null) {
      throw new UnexpectedResponse("a step answer without its Optserve-Step, Optserve-Lr and Optserve-Grad-Norm headers");
    }
    const { tensors: params } = await tensorsOf(response);
    this.info = { ...this.info, step, lr };
    return {
      step,
      lr,
      skipped: response.headers.get("optserve-skipped") === "true",
      gradNorm: gradNorm === "null" ? null : Number(gradNorm),
      params,
      replayed: response.headers.get("idempotent-replayed") === "true",
      staleness: Number(response.headers.get("optserve-staleness") ?? "0"),
      workers: JSON.parse(response.headers.get("optserve-workers") ?? "[]") as string[],
    };
  }

  /** The current parameters. */
  async params(): Promise<Record<string, Tensor>> {
    const accept = this.client.wire === "safetensors" ? SAFETENSORS : JSON_TYPE;
    const response = await this.client.send({ method: "GET", path: sessionPath(this.id, "/params"), accept, resendable: true });
    return (await tensorsOf(response)).tensors;
  }

  /** Overwrites parameters (same names and shapes); the optimizer state and the step are kept. */
  async setParams(params: Tensors): Promise<SessionInfo> {
    const tensors = toTensors(params, "float32", "parameter");
    const json: Record<string, unknown> = { params: {} };
    if (this.client.wire === "json") {
      for (const [name, t] of Object.entries(tensors)) {
        (json.params as Record<string, unknown>)[name] = tensorJson(t, `parameter ${name}`);
      }
    }
    const safetensorsWire = this.client.wire === "safetensors";
    this.info = (await this.client.json({
      method: "PUT",
      path: sessionPath(this.id, "/params"),
      body: safetensorsWire ? safetensors.encode(tensors) : JSON.stringify(json),
      contentType: safetensorsWire ? SAFETENSORS : JSON_TYPE,
      resendable: true,
    })) as SessionInfo;
    return this.info;
  }

  /** The session's checkpoint (safetensors bytes): `client.restore(bytes)` continues from it. */
  async checkpoint(): Promise<Uint8Array> {
    const response = await this.client.send({
      method: "GET",
      path: sessionPath(this.id, "/checkpoint"),
      accept: SAFETENSORS,
      resendable: true,
    });
    return new Uint8Array(await response.arrayBuffer());
  }

  async history(limit = 1000): Promise<HistoryRecord[]> {
    const answer = (await this.client.json({
      method: "GET",
      path: sessionPath(this.id, "/history"),
      query: { limit: String(limit) },
      resendable: true,
    })) as { steps: HistoryRecord[] };
    return answer.steps;
  }

  async refresh(): Promise<SessionInfo> {
    this.info = await this.client.info(this.id);
    return this.info;
  }

  /** Deletes the session; afterwards it is NotFound. */
  async delete(): Promise<void> {
    await this.client.json({ method: "DELETE", path: sessionPath(this.id), resendable: true, goneMeansDone: true });
  }
}


