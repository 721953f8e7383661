/**
 * The safetensors format (https://github.com/huggingface/safetensors), for float16/32/64 tensors: an 8-byte
 * little-endian header length, a JSON header (`{name: {dtype, shape, data_offsets}, __metadata__}`), then
 * the tensors' bytes, little-endian, tiling the data buffer.
 */

import type { Dtype, Tensor, TypedData } from "./tensors.js";

const CODES: Record<Dtype, string> = { float16: "F16", float32: "F32", float64: "F64" };
const DTYPES: Record<string, Dtype> = { F16: "float16", F32: "float32", F64: "float64" };
const SIZES: Record<Dtype, number> = { float16: 2, float32: 4, float64: 8 };
const LITTLE_ENDIAN = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;
const MAX_HEADER = 100 << 20;

function requireLittleEndian(): void {
  if (!LITTLE_ENDIAN) throw new Error("safetensors here needs a little-endian machine");
}

/** The body: header padded with spaces so that the data starts 8-byte aligned, then each tensor's bytes. */
export function encode(tensors: Record<string, Tensor>, metadata?: Record<string, string>): Uint8Array {
  requireLittleEndian();
  const header: Record<string, unknown> = {};
  if (metadata && Object.keys(metadata).length) header.__metadata__ = metadata;
  let offset = 0;
  for (const [name, t] of Object.entries(tensors)) {
    const size = t.data.length * SIZES[t.dtype];
    header[name] = { dtype: CODES[t.dtype], shape: t.shape, data_offsets: [offset, offset + size] };
    offset += size;
  }
  let json = new TextEncoder().encode(JSON.stringify(header));
  const padded = Math.ceil(json.length / 8) * 8;
  if (padded !== json.length) {
    const spaced = new Uint8Array(padded).fill(0x20);
    spaced.set(json);
    json = spaced;
  }
  const body = new Uint8Array(8 + json.length + offset);
  new DataView(body.buffer).setBigUint64(0, BigInt(json.length), true);
  body.set(json, 8);
  let at = 8 + json.length;
  for (const t of Object.values(tensors)) {
    body.set(new Uint8Array(t.data.buffer, t.data.byteOffset, t.data.byteLength), at);
    at += t.data.byteLength;
  }
  return body;
}

function typed(dtype: Dtype, buffer: ArrayBuffer, byteOffset: number, length: number): TypedData {
  if (dtype === "float64") return new Float64Array(buffer, byteOffset, length);
  if (dtype === "float32") return new Float32Array(buffer, byteOffset, length);
  return new Uint16Array(buffer, byteOffset, length);
}

/** Tensors (views of `body` where aligned, copies otherwise) and metadata; throws on a malformed body. */
export function decode(body: Uint8Array): { tensors: Record<string, Tensor>; metadata: Record<string, string> } {
  requireLittleEndian();
  if (body.length < 8) throw new Error(`safetensors: ${body.length} bytes, shorter than the length prefix`);
  const view = new DataView(body.buffer, body.byteOffset, body.byteLength);
  const headerLength = Number(view.getBigUint64(0, true));
  if (headerLength > MAX_HEADER || 8 + headerLength > body.length) {
    throw new Error(`safetensors: a header of ${headerLength} bytes does not fit a body of ${body.length}`);
  }
  const header = JSON.parse(new TextDecoder().decode(body.subarray(8, 8 + headerLength))) as Record<string, unknown>;
  const metadata = (header.__metadata__ ?? {}) as Record<string, string>;
  delete header.__metadata__;
  const start = 8 + headerLength;
  const tensors: Record<string, Tensor> = {};
  for (const [name, raw] of Object.entries(header)) {
    const entry = raw as { dtype: string; shape: number[]; data_offsets: [number, number] };
    const dtype = DTYPES[entry.dtype];
    if (!dtype) throw new Error(`safetensors: tensor ${name} has unsupported dtype ${entry.dtype}`);
    const [begin, end] = entry.data_offsets;
    const length = entry.shape.reduce((a, b) => a * b, 1);
    if (end - begin !== length * SIZES[dtype] || start + end > body.length) {
      throw new Error(`safetensors: tensor ${name}'s data_offsets do not match its shape`);
    }
    const at = body.byteOffset + start + begin;
    const data =
      at % SIZES[dtype] === 0
        ? typed(dtype, body.buffer as ArrayBuffer, at, length)
        : typed(dtype, body.slice(start + begin, start + end).buffer as ArrayBuffer, 0, length);
    tensors[name] = { shape: entry.shape, dtype, data };
  }
  return { tensors, metadata };
}
