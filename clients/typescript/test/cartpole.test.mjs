// The Node DQN actor of examples/cartpole.ts: its CartPole is gymnasium's (checked against gymnasium run
// by the repository's Python), it learns through a real server, and several actors share one session in
// the asynchronous mode.
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { existsSync } from "node:fs";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { promisify } from "node:util";

import { Client } from "../dist/index.js";
import { CartPole, DEFAULTS, initParams, random, runActor } from "../dist-examples/cartpole.js";
import { REPO, startServer } from "./server.mjs";

let server;
before(async () => {
  server = await startServer();
});
after(async () => {
  await server.stop();
});

const ASYNC = { mode: "async", max_staleness: 8, staleness_lr: "inverse" };

async function createSession(seed) {
  const client = new Client({ url: server.url, apiKey: server.apiKey });
  return client.createSession({
    params: initParams(random(seed), 64),
    optimizer: { name: "adam", lr: 0.001 },
    clipGradNorm: 10,
    aggregation: ASYNC,
  });
}

test("the CartPole written in TypeScript steps as gymnasium's CartPole-v1", async () => {
  const venv = join(REPO, ".venv", "bin", "python");
  const python = process.env.OPTSERVE_PYTHON ?? (existsSync(venv) ? venv : "python3");
  const starts = [
    [0.01, -0.02, 0.03, 0.04],
    [-0.049, 0.012, -0.031, 0.0],
    [0.0, 0.0, 0.0, 0.0],
  ];
  const actions = Array.from({ length: 60 }, (_, t) => (t * 7 + (t >> 2)) % 3 === 0 ? 1 : 0);
  const script = `
import json, sys, gymnasium as gym
starts, actions = json.loads(sys.argv[1]), json.loads(sys.argv[2])
env, out = gym.make("CartPole-v1"), []
for start in starts:
    env.reset(seed=0)
    env.unwrapped.state = __import__("numpy").array(start, dtype="float64")
    path = []
    for a in actions:
        obs, reward, terminated, truncated, _ = env.step(a)
        path.append([[float(x) for x in obs], reward, terminated, truncated])
        if terminated or truncated:
            break
    out.append(path)
print(json.dumps(out))
`;
  const { stdout } = await promisify(execFile)(python, ["-c", script, JSON.stringify(starts), JSON.stringify(actions)]);
  const expected = JSON.parse(stdout);
  for (const [k, start] of starts.entries()) {
    const env = new CartPole(random(0));
    env.reset(start);
    const path = [];
    for (const a of actions) {
      const [obs, reward, terminated, truncated] = env.step(a);
      path.push([obs, reward, terminated, truncated]);
      if (terminated || truncated) break;
    }
    assert.equal(path.length, expected[k].length, `start ${k}: the episode's length`);
    for (const [t, [obs, reward, terminated, truncated]] of path.entries()) {
      const [want, wantReward, wantTerminated, wantTruncated] = expected[k][t];
      // the same float64 arithmetic in the same order; only cos and sin may differ in their last bit
      for (let i = 0; i < 4; i++) assert.ok(Math.abs(obs[i] - want[i]) <= 1e-6 * (1 + Math.abs(want[i])), `${k}/${t}/${i}`);
      assert.deepEqual([reward, terminated, truncated], [wantReward, wantTerminated, wantTruncated]);
    }
  }
});

test("a Node actor learns CartPole through a session, the same run every time", async () => {
  const session = await createSession(1);
  const options = { ...DEFAULTS, url: server.url, apiKey: server.apiKey, session: session.id, seed: 3, steps: 5000 };
  const run = await runActor(options);
  const returns = run.episodes.map((e) => e.return);
  const mean = (xs) => xs.reduce((a, b) => a + b, 0) / xs.length;
  const first = mean(returns.slice(0, 20));
  const last = mean(returns.slice(-20));
  assert.equal(run.dropped, 0); // one actor: never stale
  assert.equal(run.applied, Math.floor((5000 - DEFAULTS.learningStarts) / DEFAULTS.trainEvery));
  assert.equal((await session.refresh()).step, run.applied);
  // random play lasts ~20 steps; by the end of 5000 steps the greedy policy holds the pole about three times
  // longer (seeded: the server's steps are exact, so this is one fixed run, not a chance)
  assert.ok(last > 2 * first, `first 20 episodes ${first}, last 20 ${last}`);
  const again = await runActor({ ...options, session: (await createSession(1)).id });
  assert.deepEqual(
    again.episodes.map((e) => e.return),
    returns,
  );
});

test("two Node actors share one session in the asynchronous mode", async () => {
  const session = await createSession(2);
  const steps = 1500;
  const runs = await Promise.all(
    [5, 6].map((seed) =>
      runActor({ ...DEFAULTS, url: server.url, apiKey: server.apiKey, session: session.id, seed, steps, learningStarts: 300 }),
    ),
  );
  const sent = Math.floor((steps - 300) / DEFAULTS.trainEvery);
  for (const run of runs) {
    assert.equal(run.applied + run.dropped, sent);
    assert.ok(run.episodes.length > 10);
  }
  // every gradient the session took is one an actor counted as applied
  assert.equal((await session.refresh()).step, runs[0].applied + runs[1].applied);
  const history = await session.history();
  assert.ok(history.length > 0);
});
