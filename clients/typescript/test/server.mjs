// A real optserve server for the tests: the one at OPTSERVE_URL (key in OPTSERVE_API_KEY) when set, else
// `optserve serve` started here on a free port (Python from OPTSERVE_PYTHON, else the repository's .venv).
import { spawn } from "node:child_process";
import { existsSync } from "node:fs";
import { createServer } from "node:net";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

export const REPO = resolve(dirname(fileURLToPath(import.meta.url)), "../../..");
const KEY = "typescript-client-key";

function freePort() {
  return new Promise((done, fail) => {
    const probe = createServer();
    probe.once("error", fail);
    probe.listen(0, "127.0.0.1", () => {
      const { port } = probe.address();
      probe.close(() => done(port));
    });
  });
}

export async function startServer() {
  if (process.env.OPTSERVE_URL) {
    return { url: process.env.OPTSERVE_URL, apiKey: process.env.OPTSERVE_API_KEY, stop: async () => {} };
  }
  const venv = join(REPO, ".venv", "bin", "python");
  const python = process.env.OPTSERVE_PYTHON ?? (existsSync(venv) ? venv : "python3");
  const port = await freePort();
  const child = spawn(python, ["-m", "app.cli", "serve", "--port", String(port), "--store", "memory://"], {
    cwd: REPO,
    env: { ...process.env, OPTSERVE_API_KEYS: KEY },
    stdio: ["ignore", "ignore", "pipe"],
  });
  let log = "";
  child.stderr.on("data", (chunk) => (log += chunk));
  const url = `http://127.0.0.1:${port}`;
  const deadline = Date.now() + 30_000;
  for (;;) {
    if (child.exitCode !== null) throw new Error(`the server exited (${child.exitCode}): ${log}`);
    try {
      if ((await fetch(`${url}/readyz`)).ok) break;
    } catch {
      // not listening yet
    }
    if (Date.now() > deadline) {
      child.kill("SIGKILL");
      throw new Error(`the server did not become ready: ${log}`);
    }
    await new Promise((r) => setTimeout(r, 100));
  }
  const stop = () =>
    new Promise((done) => {
      child.once("exit", done);
      child.kill("SIGTERM");
    });
  return { url, apiKey: KEY, stop };
}
