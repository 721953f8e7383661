// Trains y = 2x + 1 with the TypeScript client @hey-api/openapi-ts generated, unedited, from optserve's live
// OpenAPI document (into out/client): an API key, an Idempotency-Key retry and a 409, then prints the fit.
// Run by tests/clients/test_generated.py: `node out/js/train.js <url> <key>`.
import { client } from "./out/client/client.gen";
import { createSession, deleteSession, step } from "./out/client";

async function main(): Promise<void> {
  const [url, key] = process.argv.slice(2);
  client.setConfig({ baseUrl: url, auth: key });
  const xs = Array.from({ length: 21 }, (_, i) => (i - 10) / 10);
  const created = await createSession({
    body: { optimizer: { name: "sgd", lr: 0.1 }, params: { w: [0.0], b: [0.0] } },
  });
  if (created.error || !created.data) throw new Error(`create: ${JSON.stringify(created.error)}`);
  const id = created.data.id;
  let [w, b] = [0, 0];
  const steps = 300;
  for (let t = 0; t < steps; t++) {
    let gw = 0;
    let gb = 0;
    for (const x of xs) {
      const residual = w * x + b - (2 * x + 1);
      gw += (2 * residual * x) / xs.length;
      gb += (2 * residual) / xs.length;
    }
    const request = {
      path: { session_id: id },
      body: { grads: { w: [gw], b: [gb] }, step: t },
      headers: { "idempotency-key": `step-${id}-${t}` },
    };
    const answer = await step(request);
    if (answer.error || !answer.data) throw new Error(`step ${t}: ${JSON.stringify(answer.error)}`);
    if (t === 5) {
      // the answer was "lost": the same request again is answered again, and applies nothing
      const again = await step(request);
      if (again.response.headers.get("idempotent-replayed") !== "true" || again.data?.step !== t + 1) {
        throw new Error(`the retry was applied: ${JSON.stringify(again.data)}`);
      }
    }
    w = answer.data.params!.w.data[0]!;
    b = answer.data.params!.b.data[0]!;
  }
  const stale = await step({ path: { session_id: id }, body: { grads: { w: [0], b: [0] }, step: 0 } });
  if (stale.response.status !== 409 || stale.error?.current_step !== steps) {
    throw new Error(`a stale step was not a 409: ${JSON.stringify(stale.error)}`);
  }
  await deleteSession({ path: { session_id: id } });
  console.log(JSON.stringify({ w, b, steps }));
}

main().catch((error: unknown) => {
  console.error(error);
  process.exit(1);
});
