// A local cluster for the browser tests: the project's own cluster runner
// (`tests/src/bin/cluster.rs`, the e2e harness: its own redis-server on a free port, N gateway
// nodes and nginx from deploy/nginx/nginx.conf.template), driven as one process. Nodes are
// killed or frozen by their pids; stopping the runner stops everything it started.
// (Never the Redis on 127.0.0.1:6379.)
import fs from 'node:fs';
import path from 'node:path';
import { spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { canConnect, waitFor } from './helpers.mjs';

const here = path.dirname(fileURLToPath(import.meta.url));
export const ROOT = path.resolve(here, '../..');
export const ARTIFACTS = path.join(ROOT, 'artifacts', 'browser');

/** A binary of this workspace: target/{debug,release}/<name> (release when E2E_RELEASE=1). */
function workspaceBin(name) {
  const target = process.env.CARGO_TARGET_DIR || path.join(ROOT, 'target');
  return path.join(target, process.env.E2E_RELEASE === '1' ? 'release' : 'debug', name);
}

/** `$GATEWAY_BIN`, else the workspace's gateway binary. */
export function gatewayBin() {
  return process.env.GATEWAY_BIN || workspaceBin('gateway');
}

async function httpGet(url, timeoutMs = 2000) {
  const ctl = new AbortController();
  const timer = setTimeout(() => ctl.abort(), timeoutMs);
  try {
    const res = await fetch(url, { signal: ctl.signal, cache: 'no-store' });
    return { status: res.status, body: await res.text(), headers: res.headers };
  } finally {
    clearTimeout(timer);
  }
}

export class Cluster {
  constructor({ nodes = 2, env = {}, name = 'cluster' } = {}) {
    this.count = nodes;
    this.env = env;
    this.name = name;
    this.nodes = [];
  }

  async start() {
    const bin = workspaceBin('cluster');
    if (!fs.existsSync(bin)) {
      throw new Error(`cluster runner not found at ${bin}: run \`cargo build --workspace --bins\` first`);
    }
    const args = [
      '--nodes', String(this.count), '--port', '0', '--nginx-workers', '1',
      '--log', process.env.E2E_LOG || 'warn', '--ready-json',
    ];
    for (const [name, value] of Object.entries(this.env)) args.push('--env', `${name}=${value}`);
    const logDir = path.join(ARTIFACTS, 'logs', this.name);
    fs.mkdirSync(logDir, { recursive: true });
    const log = fs.openSync(path.join(logDir, 'cluster.log'), 'w');
    const env = { ...process.env };
    if (process.env.GATEWAY_BIN) env.GATEWAY_BIN = process.env.GATEWAY_BIN;
    this.proc = spawn(bin, args, { stdio: ['ignore', 'pipe', log], env });
    fs.closeSync(log);
    this.exited = new Promise((resolve) => this.proc.once('exit', resolve));
    // If the tests die without stop(), the runner still stops what it started (on SIGTERM).
    const proc = this.proc;
    process.once('exit', () => { try { proc.kill('SIGTERM'); } catch { /* gone */ } });
    const ready = await new Promise((resolve, reject) => {
      let buffered = '';
      const timer = setTimeout(() => reject(new Error(`cluster not ready within 60 s (log: ${logDir})`)), 60000);
      this.proc.stdout.on('data', (chunk) => {
        buffered += chunk;
        for (const line of buffered.split('\n')) {
          if (line.startsWith('READY ')) {
            clearTimeout(timer);
            resolve(JSON.parse(line.slice('READY '.length)));
          }
        }
        buffered = buffered.slice(buffered.lastIndexOf('\n') + 1);
      });
      this.proc.once('exit', (code, signal) => {
        clearTimeout(timer);
        reject(new Error(`cluster runner exited (${code ?? signal}) before it was ready (log: ${logDir})`));
      });
    });
    this.proc.stdout.resume();
    this.url = ready.url.replace(/\/$/, '');
    this.nodes = ready.nodes.map((n) => ({ ...n, exited: false, frozen: false }));
    return this;
  }

  /** Sum of a metric's samples on one node's /metrics (lines starting with `name`). */
  async metric(node, name) {
    const { body } = await httpGet(`http://127.0.0.1:${node.adminPort}/metrics`);
    let sum = 0;
    for (const line of body.split('\n')) {
      if (!line.startsWith(name) || !/^[a-z_]+(\{[^}]*\})? /.test(line)) continue;
      if (line.slice(name.length, name.length + 1).match(/[a-z_]/)) continue;
      sum += Number(line.slice(line.lastIndexOf(' ') + 1));
    }
    return sum;
  }

  /** Open WebSocket connections per live node: { 'node-1': 1, ... }. */
  async connections() {
    const out = {};
    for (const node of this.nodes) {
      if (node.exited) continue;
      out[node.id] = await this.metric(node, 'gateway_connections_open');
    }
    return out;
  }

  node(id) {
    return this.nodes.find((n) => n.id === id);
  }

  /** SIGKILL one node by its pid; resolves once its port is closed. */
  async killNode(node) {
    try { process.kill(node.pid, 'SIGKILL'); } catch { /* gone already */ }
    node.exited = true;
    await waitFor(`${node.id} gone`, async () => !(await canConnect(node.adminPort)), 5000);
  }

  /** SIGSTOP: the node stops answering but its sockets stay open. */
  freezeNode(node) {
    process.kill(node.pid, 'SIGSTOP');
    node.frozen = true;
  }

  /** Stops the runner (SIGTERM: it stops nginx, the nodes and Redis); a frozen node is killed first. */
  async stop() {
    if (!this.proc) return;
    for (const node of this.nodes) {
      if (node.frozen && !node.exited) {
        try { process.kill(node.pid, 'SIGKILL'); } catch { /* gone */ }
      }
    }
    if (this.proc.exitCode === null && this.proc.signalCode === null) {
      this.proc.kill('SIGTERM');
      const done = await Promise.race([this.exited.then(() => true), new Promise((r) => setTimeout(() => r(false), 20000))]);
      if (!done) this.proc.kill('SIGKILL');
    }
  }
}
