/** Tensors as this client takes and gives them, and their JSON form on the wire. */

export type Dtype = "float16" | "float32" | "float64";
/** float16 data travels as its raw bits (a Uint16Array): JavaScript has no float16 array everywhere. */
export type TypedData = Float32Array | Float64Array | Uint16Array;

/** A tensor: row-major data and its shape. */
export interface Tensor {
  shape: number[];
  dtype: Dtype;
  data: TypedData;
}

/**
 * What a call accepts for a tensor: a `Tensor`, a typed array (a vector of its dtype), an array of numbers
 * (a vector: float32 for parameters, float64 for gradients), or a number (a 0-d tensor).
 */
export type TensorInput = Tensor | Float32Array | Float64Array | number[] | number;
export type Tensors = Record<string, TensorInput>;

export function isTensor(value: unknown): value is Tensor {
  return typeof value === "object" && value !== null && "shape" in value && "data" in value;
}

export function toTensor(value: TensorInput, defaultDtype: "float32" | "float64", name: string): Tensor {
  if (isTensor(value)) {
    const expected = value.shape.reduce((a, b) => a * b, 1);
    if (value.data.length !== expected) {
      throw new TypeError(`${name}: shape [${value.shape}] holds ${expected} numbers, data has ${value.data.length}`);
    }
    const fits =
      (value.dtype === "float32" && value.data instanceof Float32Array) ||
      (value.dtype === "float64" && value.data instanceof Float64Array) ||
      (value.dtype === "float16" && value.data instanceof Uint16Array);
    if (!fits) throw new TypeError(`${name}: dtype ${value.dtype} does not match its ${value.data.constructor.name}`);
    return value;
  }
  if (value instanceof Float32Array) return { shape: [value.length], dtype: "float32", data: value };
  if (value instanceof Float64Array) return { shape: [value.length], dtype: "float64", data: value };
  const numbers = typeof value === "number" ? [value] : value;
  if (!Array.isArray(numbers) || numbers.some((x) => typeof x !== "number")) {
    throw new TypeError(`${name}: expected a Tensor, a Float32Array/Float64Array, numbers, or a number`);
  }
  const data = defaultDtype === "float32" ? Float32Array.from(numbers) : Float64Array.from(numbers);
  return { shape: typeof value === "number" ? [] : [numbers.length], dtype: defaultDtype, data };
}

export function toTensors(values: Tensors, defaultDtype: "float32" | "float64", what: string): Record<string, Tensor> {
  const out: Record<string, Tensor> = {};
  for (const [name, value] of Object.entries(values)) out[name] = toTensor(value, defaultDtype, `${what} ${name}`);
  return out;
}

export function numel(tensors: Record<string, Tensor>): number {
  return Object.values(tensors).reduce((n, t) => n + t.data.length, 0);
}

/** The number a float16's bits stand for. */
export function halfToNumber(bits: number): number {
  const sign = bits & 0x8000 ? -1 : 1;
  const exponent = (bits >> 10) & 0x1f;
  const fraction = bits & 0x3ff;
  if (exponent === 0) return sign * 2 ** -14 * (fraction / 1024);
  if (exponent === 0x1f) return fraction ? NaN : sign * Infinity;
  return sign * 2 ** (exponent - 15) * (1 + fraction / 1024);
}

/** The JSON object form, `{shape, dtype, data}`; NaN and Infinity are refused (JSON has neither). */
export function tensorJson(tensor: Tensor, name: string): { shape: number[]; dtype: Dtype; data: number[] } {
  const data = tensor.dtype === "float16" ? Array.from(tensor.data, halfToNumber) : Array.from(tensor.data);
  if (!data.every(Number.isFinite)) {
    throw new TypeError(`${name} holds NaN or Infinity, which JSON cannot carry: use wire "safetensors"`);
  }
  return { shape: tensor.shape, dtype: tensor.dtype, data };
}

/** A tensor of an answer's JSON: `null` (NaN or Infinity on the server) reads as NaN. */
export function tensorFromJson(value: unknown, name: string): Tensor {
  const t = value as { shape?: unknown; dtype?: unknown; data?: unknown };
  if (!Array.isArray(t?.shape) || !Array.isArray(t.data) || (t.dtype !== "float32" && t.dtype !== "float64")) {
    throw new TypeError(`${name} is not a tensor object`);
  }
  const numbers = (t.data as (number | null)[]).map((x) => (x === null ? NaN : x));
  const data = t.dtype === "float32" ? Float32Array.from(numbers) : Float64Array.from(numbers);
  return { shape: t.shape as number[], dtype: t.dtype, data };
}
