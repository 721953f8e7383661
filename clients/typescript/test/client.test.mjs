// The TypeScript client against a real server: sessions, steps in either wire format, checkpoint and
// restore, typed errors, resends with the same Idempotency-Key, the large create, and the README example.
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { promisify } from "node:util";

import {
  Client,
  NotFound,
  StepConflict,
  TooManyRequests,
  TransportError,
  Unauthorized,
  ValidationError,
  safetensors,
  Worker,
} from "../dist/index.js";
import { REPO, startServer } from "./server.mjs";

let server;
before(async () => {
  server = await startServer();
});
after(async () => {
  await server.stop();
});

const connect = (options = {}) => new Client({ url: server.url, apiKey: server.apiKey, ...options });
const ADAM = { name: "adam", lr: 0.01, betas: [0.9, 0.99] };

function grads(seed) {
  const w = new Float32Array(6).map((_, i) => Math.sin(seed * 7 + i));
  return { w: { shape: [2, 3], dtype: "float32", data: w }, b: new Float64Array([Math.cos(seed), 0.5]) };
}

describe("sessions", () => {
  test("an SGD step is exactly w - lr * g, in either wire format", async () => {
    for (const wire of ["json", "safetensors"]) {
      const client = connect({ wire });
      const session = await client.createSession({ params: { w: [1, 2, 3] }, optimizer: { name: "sgd", lr: 0.5 } });
      assert.deepEqual(session.info.params.w, { shape: [3], dtype: "float32" });
      const result = await session.step({ w: [1, 1, 1] }, { loss: 0.25, expectedStep: 0 });
      assert.equal(result.step, 1);
      assert.deepEqual(result.lr, [0.5]);
      assert.equal(result.skipped, false);
      assert.equal(result.gradNorm, Math.fround(Math.sqrt(3))); // torch computes the norm in float32
      assert.equal(result.replayed, false);
      assert.ok(result.params.w.data instanceof Float32Array);
      assert.deepEqual(Array.from(result.params.w.data), [0.5, 1.5, 2.5]);
      assert.equal(session.info.step, 1);
      const history = await session.history();
      assert.deepEqual(history.map((r) => [r.step, r.loss]), [[1, 0.25]]);
      await session.delete();
      await assert.rejects(client.getSession(session.id), NotFound);
    }
  });

  test("both wire formats give bit-identical Adam parameters", async () => {
    const params = { w: { shape: [2, 3], dtype: "float32", data: new Float32Array([1, 2, 3, 4, 5, 6]) }, b: new Float64Array([0, 1]) };
    const [a, b] = await Promise.all(
      ["json", "safetensors"].map((wire) => connect({ wire }).createSession({ params, optimizer: ADAM })),
    );
    let last;
    for (let seed = 0; seed < 5; seed++) {
      const [x, y] = [await a.step(grads(seed)), await b.step(grads(seed))];
      assert.deepEqual(x.params.w.data, y.params.w.data);
      assert.deepEqual(x.params.b.data, y.params.b.data);
      assert.ok(x.params.b.data instanceof Float64Array);
      last = x;
    }
    assert.deepEqual(await a.params(), last.params);
    const list = await connect().listSessions();
    assert.ok([a.id, b.id].every((id) => list.some((s) => s.id === id)));
  });

  test("a checkpoint restores a session that continues exactly", async () => {
    const client = connect();
    const session = await client.createSession({
      params: { w: new Float32Array([1, -1, 2, -2, 3, -3]) },
      optimizer: ADAM,
      scheduler: { name: "step_lr", step_size: 2, gamma: 0.5 },
      metadata: { run: "ts" },
    });
    for (let seed = 0; seed < 3; seed++) await session.step({ w: grads(seed).w.data });
    const blob = await session.checkpoint();
    const { tensors, metadata } = safetensors.decode(blob);
    assert.equal(metadata.step, "3");
    assert.ok("params/w" in tensors);
    const restored = await client.restore(blob);
    assert.notEqual(restored.id, session.id);
    assert.equal(restored.info.step, 3);
    assert.deepEqual(restored.info.metadata, { run: "ts" });
    for (let seed = 3; seed < 6; seed++) {
      const [x, y] = [await session.step({ w: grads(seed).w.data }), await restored.step({ w: grads(seed).w.data })];
      assert.deepEqual([x.step, x.lr], [y.step, y.lr]);
      assert.deepEqual(x.params.w.data, y.params.w.data);
    }
  });

  test("setParams overwrites values and keeps the step; a large model is created as safetensors", async () => {
    const seen = [];
    const recording = (url, init) => {
      seen.push(init.headers["Content-Type"]);
      return fetch(url, init);
    };
    const client = connect({ fetch: recording });
    const w = new Float32Array(100_000).map((_, i) => i / 1000);
    const session = await client.createSession({ params: { w }, optimizer: { name: "sgd", lr: 0.1 } });
    assert.equal(seen[0], "application/vnd.safetensors");
    assert.deepEqual((await session.params()).w.data, w);
    await session.step({ w: new Float32Array(100_000).fill(1) });
    const info = await session.setParams({ w: new Float32Array(100_000) });
    assert.equal(info.step, 1);
    assert.ok((await session.params()).w.data.every((x) => x === 0));
  });

  test("the catalogue and a schedule preview", async () => {
    const client = connect();
    assert.ok((await client.optimizers()).some((o) => o.name === "adam"));
    assert.ok((await client.schedulers()).some((s) => s.name === "cosine_annealing_lr"));
    const lrs = await client.previewSchedule({ lr: 1, scheduler: { name: "step_lr", step_size: 2, gamma: 0.5 }, steps: 5 });
    assert.deepEqual(lrs, [[1, 1, 0.5, 0.5, 0.25]]);
  });
});

describe("errors", () => {
  test("each error status is its own class, with the problem's members", async () => {
    const client = connect();
    await assert.rejects(client.getSession("s_nope"), (e) => e instanceof NotFound && e.status === 404);
    await assert.rejects(
      client.createSession({ params: { w: [1] }, optimizer: { name: "nope" } }),
      (e) => e instanceof ValidationError && e.errors.some((f) => f.field.startsWith("optimizer")),
    );
    const session = await client.createSession({ params: { w: [1] }, optimizer: { name: "sgd" } });
    await assert.rejects(
      session.step({ w: [1] }, { expectedStep: 7 }),
      (e) => e instanceof StepConflict && e.currentStep === 0,
    );
    await assert.rejects(
      new Client({ url: server.url, apiKey: "wrong" }).listSessions(),
      (e) => e instanceof Unauthorized && e.status === 401,
    );
    const overJson = await connect({ wire: "json" }).getSession(session.id);
    await assert.rejects(overJson.step({ w: [NaN] }), TypeError); // JSON has no NaN: refused before sending
    await assert.rejects(
      new Client({ url: "http://127.0.0.1:9", retries: 1, backoff: 0.01 }).listSessions(),
      TransportError,
    );
  });

  test("a 429 without Retry-After (a quota) is thrown at once, not retried", async () => {
    let calls = 0;
    const quota = async () => {
      calls++;
      return new Response(JSON.stringify({ title: "Quota exceeded", status: 429, detail: "full" }), {
        status: 429,
        headers: { "content-type": "application/problem+json" },
      });
    };
    await assert.rejects(connect({ fetch: quota }).listSessions(), TooManyRequests);
    assert.equal(calls, 1);
  });
});

describe("retries", () => {
  test("a step whose answer was lost is resent with the same key and applied once", async () => {
    const keys = [];
    let dropped = false;
    const losing = async (url, init) => {
      const response = await fetch(url, init);
      if (init.method === "POST" && url.endsWith("/step")) {
        keys.push(init.headers["Idempotency-Key"]);
        if (!dropped) {
          dropped = true;
          await response.arrayBuffer();
          throw new TypeError("fetch failed: the connection reset before the answer");
        }
      }
      return response;
    };
    const client = connect({ fetch: losing, backoff: 0.01 });
    const session = await client.createSession({ params: { w: [1, 2] }, optimizer: { name: "sgd", lr: 1 } });
    const result = await session.step({ w: [1, 1] });
    assert.equal(keys.length, 2);
    assert.equal(keys[0], keys[1]);
    assert.equal(result.replayed, true);
    assert.equal(result.step, 1);
    assert.deepEqual(Array.from(result.params.w.data), [0, 1]);
    assert.equal((await session.history()).length, 1);
    const next = await session.step({ w: [1, 1] });
    assert.notEqual(keys[2], keys[0]);
    assert.equal(next.step, 2);
  });

  test("a 503 with Retry-After is waited out and resent", async () => {
    let refused = 0;
    const busy = async (url, init) => {
      if (refused < 2) {
        refused++;
        return new Response(JSON.stringify({ title: "Busy", status: 503, detail: "retry" }), {
          status: 503,
          headers: { "content-type": "application/problem+json", "retry-after": "0" },
        });
      }
      return fetch(url, init);
    };
    const sessions = await connect({ fetch: busy }).listSessions();
    assert.equal(refused, 2);
    assert.ok(Array.isArray(sessions));
  });
});

test("the README's example runs as written", async () => {
  const readme = readFileSync(join(REPO, "clients", "typescript", "README.md"), "utf8");
  const blocks = [...readme.matchAll(/```(?:js|javascript)\n([\s\S]*?)```/g)].map((m) => m[1]);
  assert.ok(blocks.length >= 1);
  // inside the package, so that `import ... from "optserve"` resolves to it (its own name)
  const dir = mkdtempSync(join(REPO, "clients", "typescript", "test", ".readme-"));
  try {
    for (const [i, code] of blocks.entries()) {
      const file = join(dir, `example-${i}.mjs`);
      writeFileSync(file, code);
      const env = { ...process.env, OPTSERVE_URL: server.url, OPTSERVE_API_KEY: server.apiKey };
      const { stdout } = await promisify(execFile)(process.execPath, [file], { env, timeout: 60_000 });
      assert.match(stdout, /\S/);
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

/** An SGD (lr 1) session on w = [0, 0] whose steps are rounds of two workers. */
const twoWorkerRounds = (client) =>
  client.createSession({
    params: { w: [0, 0] },
    optimizer: { name: "sgd", lr: 1 },
    aggregation: { mode: "sync", workers: 2, timeout: 30 },
  });

test("workers contribute to a synchronous round and all get its one step", async () => {
  const client = connect();
  const created = await twoWorkerRounds(client);
  const [a, b] = [created, await client.getSession(created.id)];
  const results = await Promise.all([
    a.step({ w: [1, 2] }, { expectedStep: 0, worker: "a" }),
    b.step({ w: [3, 4] }, { expectedStep: 0, worker: "b" }),
  ]);
  for (const r of results) {
    assert.equal(r.step, 1);
    assert.deepEqual(r.workers, ["a", "b"]);
    assert.deepEqual(Array.from(r.params.w.data), [-2, -3]);
  }
});

test("a Worker tracks its rounds, and catches up when its gradient came too late", async () => {
  const client = connect();
  const rounds = await twoWorkerRounds(client);
  const workers = [new Worker(rounds, "a"), new Worker(await client.getSession(rounds.id), "b")];
  for (let t = 0; t < 3; t++) {
    const results = await Promise.all(workers.map((w, i) => w.step({ w: [i + 1, i + 1] }, { loss: i })));
    for (const r of results) assert.deepEqual([r.step, r.workers], [t + 1, ["a", "b"]]);
  }
  assert.deepEqual(workers.map((w) => w.atStep), [3, 3]);
  assert.deepEqual(Array.from(workers[0].params.w.data), [-4.5, -4.5]); // three steps of the mean, 1.5
  const history = await rounds.history();
  assert.deepEqual(history.map((h) => [h.step, h.loss]), [[1, 0.5], [2, 0.5], [3, 0.5]]);

  const stale = await client.createSession({
    params: { w: [0] },
    optimizer: { name: "sgd", lr: 1 },
    aggregation: { mode: "async", max_staleness: 0 },
  });
  const [fast, slow] = [new Worker(stale, "fast"), new Worker(await client.getSession(stale.id), "slow")];
  assert.equal((await fast.step({ w: [1] })).step, 1);
  assert.equal(await slow.step({ w: [1] }), null); // computed at step 0, the session is at 1
  assert.deepEqual([slow.dropped, slow.atStep, Array.from(slow.params.w.data)], [1, 1, [-1]]);
  assert.equal((await slow.step({ w: [1] })).step, 2);
});

test("a resend with the same idempotencyKey is answered again, not applied twice", async () => {
  const session = await connect().createSession({ params: { w: [0] }, optimizer: { name: "sgd", lr: 1 } });
  const first = await session.step({ w: [1] }, { idempotencyKey: "restarted-worker-7" });
  const again = await session.step({ w: [1] }, { idempotencyKey: "restarted-worker-7" });
  assert.deepEqual([first.step, first.replayed, again.step, again.replayed], [1, false, 1, true]);
});
