// One real gateway node with its embedded broker (no Redis), for the browser tests that need
// the real server but no cluster; and `gateway token` to mint JWTs with the same binary.
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { promisify } from 'node:util';
import { ARTIFACTS, gatewayBin } from './cluster.mjs';
import { Procs, freePort, waitFor } from './helpers.mjs';

/** An HS256 secret for the tests (at least 32 bytes). */
export const TEST_SECRET = 'browser-tests-secret-0123456789abcdef';

/**
 * Starts target/debug/gateway (or $GATEWAY_BIN) on free ports with `env` added; resolves when
 * /healthz answers. `stop()` kills it by pid.
 */
export async function startGateway({ name = 'gateway', env = {} } = {}) {
  const bin = gatewayBin();
  if (!fs.existsSync(bin)) {
    throw new Error(`gateway binary not found at ${bin}: run \`cargo build -p gateway\` first (or set GATEWAY_BIN)`);
  }
  const procs = new Procs(path.join(ARTIFACTS, 'logs', name));
  const port = await freePort();
  const adminPort = await freePort();
  const proc = procs.spawn('gateway', bin, [], {
    env: {
      PATH: process.env.PATH,
      RUST_LOG: process.env.E2E_LOG || 'warn',
      GATEWAY_LISTEN: `127.0.0.1:${port}`,
      GATEWAY_ADMIN_LISTEN: `127.0.0.1:${adminPort}`,
      GATEWAY_NODE_ID: name,
      ...env,
    },
  });
  await waitFor(`${name} /healthz`, async () => {
    if (proc.exited) throw new Error(`${name} exited (${proc.code}): ${procs.log('gateway').slice(-2000)}`);
    const res = await fetch(`http://127.0.0.1:${adminPort}/healthz`).catch(() => null);
    return res?.status === 200;
  }, 30000);
  return {
    port,
    adminPort,
    url: `http://127.0.0.1:${port}`,
    wsUrl: `ws://127.0.0.1:${port}`,
    log: () => procs.log('gateway'),
    stop: () => procs.stopAll(),
  };
}

/** `gateway token --sub … --name … --ttl … [--rooms …]` with `secret`: the printed token. */
export async function mintToken({ sub, name, ttl = 3600, rooms, secret = TEST_SECRET }) {
  const args = ['token', '--sub', sub, '--ttl', String(ttl)];
  if (name !== undefined) args.push('--name', name);
  if (rooms !== undefined) args.push('--rooms', rooms);
  const { stdout } = await promisify(execFile)(gatewayBin(), args, {
    env: { PATH: process.env.PATH, GATEWAY_JWT_SECRET: secret },
  });
  return stdout.trim();
}
