// Trains y = 2x + 1 with openapi-fetch on the types openapi-typescript generated, unedited, from optserve's
// live OpenAPI document (out/schema.d.ts): an API key, an Idempotency-Key retry and a 409, then prints the
// fit. Run by tests/clients/test_generated.py: `node out/js/train_openapi_fetch.js <url> <key>`.
import createClient from "openapi-fetch";
import type { paths } from "./out/schema";

async function main(): Promise<void> {
  const [url, key] = process.argv.slice(2);
  const client = createClient<paths>({ baseUrl: url, headers: { Authorization: `Bearer ${key}` } });
  const created = await client.POST("/v1/sessions", {
    body: { optimizer: { name: "sgd", lr: 0.1 }, params: { w: [0], b: [0] } },
  });
  if (!created.data) throw new Error(JSON.stringify(created.error));
  const id = created.data.id;
  const xs = Array.from({ length: 21 }, (_, i) => (i - 10) / 10);
  let [w, b] = [0, 0];
  for (let t = 0; t < 300; t++) {
    let [gw, gb] = [0, 0];
    for (const x of xs) {
      const r = w * x + b - (2 * x + 1);
      gw += (2 * r * x) / xs.length;
      gb += (2 * r) / xs.length;
    }
    const answer = await client.POST("/v1/sessions/{session_id}/step", {
      params: { path: { session_id: id }, header: { "idempotency-key": `k-${t}` } },
      body: { grads: { w: [gw], b: [gb] }, step: t },
    });
    // the answer is JSON or safetensors (a string to the types), by Accept: JSON here
    if (!answer.data || typeof answer.data === "string") throw new Error(JSON.stringify(answer.error));
    if (t === 5) {
      // the answer was "lost": the same request again is answered again, and applies nothing
      const again = await client.POST("/v1/sessions/{session_id}/step", {
        params: { path: { session_id: id }, header: { "idempotency-key": `k-${t}` } },
        body: { grads: { w: [gw], b: [gb] }, step: t },
      });
      if (again.response.headers.get("idempotent-replayed") !== "true") throw new Error("the retry was applied");
    }
    w = answer.data.params!.w!.data[0]!;
    b = answer.data.params!.b!.data[0]!;
  }
  const stale = await client.POST("/v1/sessions/{session_id}/step", {
    params: { path: { session_id: id } },
    body: { grads: {}, step: 0 },
  });
  if (stale.response.status !== 409 || stale.error?.current_step !== 300) throw new Error("no 409");
  await client.DELETE("/v1/sessions/{session_id}", { params: { path: { session_id: id } } });
  console.log(JSON.stringify({ w, b, steps: 300 }));
}
main().catch((error: unknown) => {
  console.error(error);
  process.exit(1);
});
