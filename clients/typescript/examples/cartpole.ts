/**
 * A DQN actor for CartPole-v1 in Node, training one optserve session beside the Python actors of
 * `optserve demo --task cartpole --actors N --node-actors M`: the same Q-network (4-H-H-2 MLP, ReLU,
 * parameters w1 b1 w2 b2 w3 b3), the same Huber loss on the one-step TD target, its own environment,
 * replay buffer, epsilon schedule and target network, and its gradients sent through the session's
 * asynchronous mode (bounded staleness) by this package's `Worker`. The environment is gymnasium's
 * CartPole-v1, written out here (the same equations, the same termination and the 500-step limit).
 *
 *   node dist-examples/cartpole.js --url http://127.0.0.1:8000 --session <id> [--api-key K] [--seed 7]
 *     [--steps 20000] [--batch 32] [--gamma 0.98] [--learning-starts 1000] [--train-every 2]
 *     [--target-every 250] [--eps-steps 10000] [--eps-end 0.01] [--buffer 50000]
 *
 * It prints one JSON line per finished episode ({"return", "env_steps", "seconds", "step"}) and a last
 * one with what it did ({"done": true, "applied", "dropped", "env_steps", "seconds"}).
 */

import { Client, Worker, type Tensor } from "optserve";

/** mulberry32: a small seeded generator, so that a run is the same run every time. */
export function random(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** gymnasium's CartPole-v1 (classic_control/cartpole.py): Euler steps of 20 ms, reward 1 per step, the
 * episode ends when the pole passes 12 degrees or the cart 2.4 from the centre, or after 500 steps. */
export class CartPole {
  static readonly MAX_STEPS = 500;
  private state = [0, 0, 0, 0];
  private steps = 0;
  constructor(private readonly rand: () => number) {}

  /** A new episode from a random state in [-0.05, 0.05)^4, or from `state` when given. */
  reset(state?: number[]): number[] {
    this.state = state ? [...state] : this.state.map(() => this.rand() * 0.1 - 0.05);
    this.steps = 0;
    return this.observation();
  }

  /** [observation, reward, terminated, truncated] */
  step(action: number): [number[], number, boolean, boolean] {
    const [gravity, massPole, totalMass, length, forceMag, tau] = [9.8, 0.1, 1.1, 0.5, 10.0, 0.02];
    const poleMassLength = massPole * length;
    let [x, xDot, theta, thetaDot] = this.state as [number, number, number, number];
    const force = action === 1 ? forceMag : -forceMag;
    const cos = Math.cos(theta);
    const sin = Math.sin(theta);
    const temp = (force + poleMassLength * (thetaDot * thetaDot) * sin) / totalMass; // numpy's order
    const thetaAcc = (gravity * sin - cos * temp) / (length * (4 / 3 - (massPole * (cos * cos)) / totalMass));
    const xAcc = temp - (poleMassLength * thetaAcc * cos) / totalMass;
    x += tau * xDot;
    xDot += tau * xAcc;
    theta += tau * thetaDot;
    thetaDot += tau * thetaAcc;
    this.state = [x, xDot, theta, thetaDot];
    this.steps += 1;
    const terminated = Math.abs(x) > 2.4 || Math.abs(theta) > (12 * 2 * Math.PI) / 360;
    return [this.observation(), 1, terminated, !terminated && this.steps >= CartPole.MAX_STEPS];
  }

  private observation(): number[] {
    return Array.from(Float32Array.from(this.state)); // the observation space is float32
  }
}

type Params = Record<string, Tensor>;
type Grads = Record<string, Tensor>;

/** A 4-hidden-hidden-2 Q-network's parameters, uniform in +-1/sqrt(fan_in) as torch's nn.Linear. */
export function initParams(rand: () => number, hidden: number): Params {
  const params: Params = {};
  const layers: [number, number][] = [
    [4, hidden],
    [hidden, hidden],
    [hidden, 2],
  ];
  layers.forEach(([fanIn, fanOut], i) => {
    const bound = 1 / Math.sqrt(fanIn);
    const uniform = (n: number): Float32Array => Float32Array.from({ length: n }, () => (rand() * 2 - 1) * bound);
    params[`w${i + 1}`] = { shape: [fanIn, fanOut], dtype: "float32", data: uniform(fanIn * fanOut) };
    params[`b${i + 1}`] = { shape: [fanOut], dtype: "float32", data: uniform(fanOut) };
  });
  return params;
}

/** rows x cols, row-major: out = a (n x k) @ b (k x m) */
function matmul(a: Float64Array, b: ArrayLike<number>, n: number, k: number, m: number): Float64Array {
  const out = new Float64Array(n * m);
  for (let i = 0; i < n; i++) {
    for (let p = 0; p < k; p++) {
      const av = a[i * k + p] as number;
      if (av === 0) continue;
      const row = p * m;
      const o = i * m;
      for (let j = 0; j < m; j++) out[o + j] = (out[o + j] as number) + av * (b[row + j] as number);
    }
  }
  return out;
}

function dense(x: Float64Array, p: Params, layer: number, n: number, relu: boolean): Float64Array {
  const w = p[`w${layer}`] as Tensor;
  const b = (p[`b${layer}`] as Tensor).data;
  const [k, m] = w.shape as [number, number];
  const out = matmul(x, w.data, n, k, m);
  for (let i = 0; i < n; i++) {
    for (let j = 0; j < m; j++) {
      const v = (out[i * m + j] as number) + (b[j] as number);
      out[i * m + j] = relu && v < 0 ? 0 : v;
    }
  }
  return out;
}

/** Q-values of n observations (n x 4) and the two hidden activations. */
export function forward(p: Params, obs: Float64Array, n: number): [Float64Array, Float64Array, Float64Array] {
  const h1 = dense(obs, p, 1, n, true);
  const h2 = dense(h1, p, 2, n, true);
  return [h1, h2, dense(h2, p, 3, n, false)];
}

/** The mean Huber loss of Q(s, a) against r + gamma * max Q_target(s', .) (0 after a terminal step) and
 * its gradients, float32 like the parameters. */
export function lossAndGrads(
  p: Params,
  target: Params,
  batch: { obs: Float64Array; act: Int32Array; rew: Float64Array; next: Float64Array; term: Float64Array },
  gamma: number,
): [number, Grads] {
  const n = batch.act.length;
  const [h1, h2, q] = forward(p, batch.obs, n);
  const nextQ = forward(target, batch.next, n)[2];
  const dq = new Float64Array(n * 2);
  let loss = 0;
  for (let i = 0; i < n; i++) {
    const best = Math.max(nextQ[2 * i] as number, nextQ[2 * i + 1] as number);
    const y = (batch.rew[i] as number) + gamma * best * (1 - (batch.term[i] as number));
    const d = (q[2 * i + (batch.act[i] as number)] as number) - y;
    const ad = Math.abs(d);
    loss += ad <= 1 ? 0.5 * d * d : ad - 0.5;
    dq[2 * i + (batch.act[i] as number)] = Math.max(-1, Math.min(1, d)) / n;
  }
  const hidden = (p.b1 as Tensor).data.length;
  const back = (dOut: Float64Array, w: Tensor, h: Float64Array, m: number): Float64Array => {
    // dh = (dOut @ w^T) * (h > 0), w is k x m
    const k = w.shape[0] as number;
    const dh = new Float64Array(n * k);
    for (let i = 0; i < n; i++) {
      for (let r = 0; r < k; r++) {
        if ((h[i * k + r] as number) <= 0) continue;
        let s = 0;
        for (let j = 0; j < m; j++) s += (dOut[i * m + j] as number) * (w.data[r * m + j] as number);
        dh[i * k + r] = s;
      }
    }
    return dh;
  };
  const weightGrad = (x: Float64Array, d: Float64Array, k: number, m: number): Tensor => {
    const g = new Float32Array(k * m);
    const acc = new Float64Array(k * m);
    for (let i = 0; i < n; i++) {
      for (let r = 0; r < k; r++) {
        const xv = x[i * k + r] as number;
        if (xv === 0) continue;
        for (let j = 0; j < m; j++) acc[r * m + j] = (acc[r * m + j] as number) + xv * (d[i * m + j] as number);
      }
    }
    g.set(acc);
    return { shape: [k, m], dtype: "float32", data: g };
  };
  const biasGrad = (d: Float64Array, m: number): Tensor => {
    const g = new Float64Array(m);
    for (let i = 0; i < n; i++) for (let j = 0; j < m; j++) g[j] = (g[j] as number) + (d[i * m + j] as number);
    return { shape: [m], dtype: "float32", data: Float32Array.from(g) };
  };
  const dh2 = back(dq, p.w3 as Tensor, h2, 2);
  const dh1 = back(dh2, p.w2 as Tensor, h1, hidden);
  return [
    loss / n,
    {
      w1: weightGrad(batch.obs, dh1, 4, hidden),
      b1: biasGrad(dh1, hidden),
      w2: weightGrad(h1, dh2, hidden, hidden),
      b2: biasGrad(dh2, hidden),
      w3: weightGrad(h2, dq, hidden, 2),
      b3: biasGrad(dq, 2),
    },
  ];
}

export interface ActorOptions {
  url: string;
  session: string;
  apiKey?: string;
  seed: number;
  steps: number;
  batch: number;
  gamma: number;
  learningStarts: number;
  trainEvery: number;
  targetEvery: number;
  epsSteps: number;
  epsEnd: number;
  buffer: number;
}

export const DEFAULTS: Omit<ActorOptions, "url" | "session"> = {
  seed: 0,
  steps: 20_000,
  batch: 32,
  gamma: 0.98,
  learningStarts: 1_000,
  trainEvery: 2,
  targetEvery: 250,
  epsSteps: 10_000,
  epsEnd: 0.01,
  buffer: 50_000,
};

export interface Episode {
  return: number;
  env_steps: number;
  seconds: number;
  step: number;
}

/** Plays `steps` environment steps, learning through the session; `onEpisode` hears each episode. */
export async function runActor(
  options: ActorOptions,
  onEpisode: (episode: Episode) => void = () => {},
): Promise<{ applied: number; dropped: number; episodes: Episode[]; seconds: number }> {
  const rand = random(options.seed);
  const client = new Client({ url: options.url, apiKey: options.apiKey });
  const session = await client.getSession(options.session);
  const worker = new Worker(session, `node-${options.seed}`);
  let params: Params = await session.params();
  let target = params;
  const env = new CartPole(rand);
  const cap = options.buffer;
  const obsBuf = new Float64Array(cap * 4);
  const nextBuf = new Float64Array(cap * 4);
  const actBuf = new Int32Array(cap);
  const rewBuf = new Float64Array(cap);
  const termBuf = new Float64Array(cap);
  let size = 0;
  let at = 0;
  let obs = env.reset();
  let ret = 0;
  let applied = 0;
  let lastStep = session.info.step;
  const episodes: Episode[] = [];
  const started = performance.now();
  for (let t = 0; t < options.steps; t++) {
    const eps = Math.max(options.epsEnd, 1 - ((1 - options.epsEnd) * t) / options.epsSteps);
    let action: number;
    if (t < options.learningStarts || rand() < eps) {
      action = rand() < 0.5 ? 0 : 1;
    } else {
      const q = forward(params, Float64Array.from(obs), 1)[2];
      action = (q[1] as number) > (q[0] as number) ? 1 : 0;
    }
    const [next, reward, terminated, truncated] = env.step(action);
    obsBuf.set(obs, at * 4);
    nextBuf.set(next, at * 4);
    actBuf[at] = action;
    rewBuf[at] = reward;
    termBuf[at] = terminated ? 1 : 0;
    at = (at + 1) % cap;
    size = Math.min(size + 1, cap);
    ret += reward;
    obs = next;
    if (terminated || truncated) {
      const episode = { return: ret, env_steps: t + 1, seconds: (performance.now() - started) / 1000, step: lastStep };
      episodes.push(episode);
      onEpisode(episode);
      ret = 0;
      obs = env.reset();
    }
    if (t >= options.learningStarts && t % options.trainEvery === 0) {
      const n = options.batch;
      const batch = {
        obs: new Float64Array(n * 4),
        act: new Int32Array(n),
        rew: new Float64Array(n),
        next: new Float64Array(n * 4),
        term: new Float64Array(n),
      };
      for (let i = 0; i < n; i++) {
        const j = Math.floor(rand() * size);
        batch.obs.set(obsBuf.subarray(j * 4, j * 4 + 4), i * 4);
        batch.next.set(nextBuf.subarray(j * 4, j * 4 + 4), i * 4);
        batch.act[i] = actBuf[j] as number;
        batch.rew[i] = rewBuf[j] as number;
        batch.term[i] = termBuf[j] as number;
      }
      const [loss, grads] = lossAndGrads(params, target, batch, options.gamma);
      const result = await worker.step(grads, { loss });
      if (result !== null) {
        applied += 1;
        params = result.params;
        lastStep = result.step;
        if (applied % options.targetEvery === 0) target = params;
      } else if (worker.params !== null) {
        params = worker.params; // too late: continue from the session's current parameters
      }
    }
  }
  return { applied, dropped: worker.dropped, episodes, seconds: (performance.now() - started) / 1000 };
}

function parseArgs(argv: string[]): ActorOptions {
  const flags = new Map<string, string>();
  for (let i = 0; i < argv.length; i += 2) {
    const name = argv[i] ?? "";
    const value = argv[i + 1];
    if (!name.startsWith("--") || value === undefined) throw new Error(`expected --name value pairs, got ${name}`);
    flags.set(name.slice(2), value);
  }
  const url = flags.get("url");
  const session = flags.get("session");
  if (!url || !session) throw new Error("--url and --session are required");
  const number = (name: string, fallback: number): number => {
    const raw = flags.get(name);
    if (raw === undefined) return fallback;
    const value = Number(raw);
    if (!Number.isFinite(value)) throw new Error(`--${name}: not a number: ${raw}`);
    return value;
  };
  return {
    url,
    session,
    apiKey: flags.get("api-key"),
    seed: number("seed", DEFAULTS.seed),
    steps: number("steps", DEFAULTS.steps),
    batch: number("batch", DEFAULTS.batch),
    gamma: number("gamma", DEFAULTS.gamma),
    learningStarts: number("learning-starts", DEFAULTS.learningStarts),
    trainEvery: number("train-every", DEFAULTS.trainEvery),
    targetEvery: number("target-every", DEFAULTS.targetEvery),
    epsSteps: number("eps-steps", DEFAULTS.epsSteps),
    epsEnd: number("eps-end", DEFAULTS.epsEnd),
    buffer: number("buffer", DEFAULTS.buffer),
  };
}

const isMain = process.argv[1] !== undefined && import.meta.url === new URL(`file://${process.argv[1]}`).href;
if (isMain) {
  const options = parseArgs(process.argv.slice(2));
  const print = (line: object): void => void process.stdout.write(`${JSON.stringify(line)}\n`);
  runActor(options, print).then(
    ({ applied, dropped, episodes, seconds }) =>
      print({ done: true, applied, dropped, env_steps: options.steps, episodes: episodes.length, seconds }),
    (error: unknown) => {
      process.stderr.write(`${error instanceof Error ? (error.stack ?? error.message) : String(error)}\n`);
      process.exit(1);
    },
  );
}
