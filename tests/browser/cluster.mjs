// A local cluster for the browser tests: its own redis-server on a free port, N gateway nodes
// and nginx rendered from deploy/nginx/nginx.conf.template, all stopped by pid.
// (Never the Redis on 127.0.0.1:6379.)
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { Procs, freePort, canConnect, waitFor } from './helpers.mjs';

const here = path.dirname(fileURLToPath(import.meta.url));
export const ROOT = path.resolve(here, '../..');
export const ARTIFACTS = path.join(ROOT, 'artifacts', 'browser');

/** `$GATEWAY_BIN`, else target/{debug,release}/gateway (release when E2E_RELEASE=1). */
export function gatewayBin() {
  if (process.env.GATEWAY_BIN) return process.env.GATEWAY_BIN;
  const target = process.env.CARGO_TARGET_DIR || path.join(ROOT, 'target');
  return path.join(target, process.env.E2E_RELEASE === '1' ? 'release' : 'debug', 'gateway');
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

/** Fills deploy/nginx/nginx.conf.template: replaces exactly the ${NGINX_*} placeholders. */
export function renderNginx(vars) {
  const template = fs.readFileSync(path.join(ROOT, 'deploy/nginx/nginx.conf.template'), 'utf8');
  const out = template.replace(/\$\{(NGINX_[A-Z_]+)\}/g, (_, name) => {
    if (!(name in vars)) throw new Error(`nginx template: no value for ${name}`);
    return vars[name];
  });
  return out;
}

export class Cluster {
  constructor({ nodes = 2, env = {}, name = 'cluster' } = {}) {
    this.count = nodes;
    this.env = env;
    this.dir = fs.mkdtempSync(path.join(os.tmpdir(), `chat-${name}-`));
    this.procs = new Procs(path.join(ARTIFACTS, 'logs', name));
    this.nodes = [];
  }

  async start() {
    const bin = gatewayBin();
    if (!fs.existsSync(bin)) {
      throw new Error(`gateway binary not found at ${bin}: run \`cargo build -p gateway\` first (or set GATEWAY_BIN)`);
    }
    // Redis of our own, keeping nothing on disk.
    this.redisPort = await freePort();
    this.redis = this.procs.spawn('redis', 'redis-server', [
      '--port', String(this.redisPort), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no',
      '--daemonize', 'no', '--loglevel', 'warning',
    ]);
    await waitFor('redis-server accepting', () => canConnect(this.redisPort), 10000);

    for (let i = 0; i < this.count; i += 1) {
      const node = { id: `node-${String.fromCharCode(97 + i)}` };
      node.port = await freePort();
      node.adminPort = await freePort();
      this.nodes.push(node);
      this.spawnNode(node, bin);
    }
    for (const node of this.nodes) {
      await waitFor(`${node.id} /healthz`, async () => {
        if (node.proc.exited) throw new Error(`${node.id} exited (${node.proc.code}): ${this.procs.log(node.id).slice(-2000)}`);
        return (await httpGet(`http://127.0.0.1:${node.adminPort}/healthz`)).status === 200;
      }, 30000);
    }

    // nginx in front, from the deploy template.
    this.nginxPort = await freePort();
    const prefix = path.join(this.dir, 'nginx');
    fs.mkdirSync(prefix, { recursive: true });
    const conf = renderNginx({
      NGINX_LISTEN: `127.0.0.1:${this.nginxPort}`,
      NGINX_UPSTREAM_SERVERS: this.nodes.map((n) => `server 127.0.0.1:${n.port};`).join('\n        '),
      NGINX_WORKER_PROCESSES: '1',
      NGINX_WORKER_CONNECTIONS: '1024',
      NGINX_WORKER_RLIMIT_NOFILE: '4096',
      NGINX_PREFIX: prefix,
      NGINX_ACCESS_LOG: 'off',
      // Fixed loopback upstreams: nothing to re-resolve (as e2e::nginx::LOCAL_RESOLVER).
      NGINX_RESOLVER: '# no resolver: fixed upstream addresses',
    });
    const confPath = path.join(prefix, 'nginx.conf');
    fs.writeFileSync(confPath, conf);
    // One process (no master/worker split), so killing it by pid leaves no worker behind.
    this.nginx = this.procs.spawn('nginx', 'nginx', [
      '-e', 'stderr', '-p', prefix, '-c', confPath, '-g', 'master_process off;',
    ]);
    await waitFor('nginx /nginx-health', async () => {
      if (this.nginx.exited) throw new Error(`nginx exited: ${this.procs.log('nginx')}`);
      return (await httpGet(`${this.url}/nginx-health`)).status === 200;
    }, 10000);
    return this;
  }

  spawnNode(node, bin = gatewayBin()) {
    node.proc = this.procs.spawn(node.id, bin, [], {
      env: {
        PATH: process.env.PATH,
        RUST_LOG: process.env.E2E_LOG || 'warn',
        GATEWAY_LISTEN: `127.0.0.1:${node.port}`,
        GATEWAY_ADMIN_LISTEN: `127.0.0.1:${node.adminPort}`,
        GATEWAY_REDIS_URL: `redis://127.0.0.1:${this.redisPort}/`,
        GATEWAY_NODE_ID: node.id,
        // nginx connects from loopback: its X-Forwarded-For names the client.
        GATEWAY_TRUSTED_PROXIES: '127.0.0.1',
        ...this.env,
      },
    });
  }

  get url() {
    return `http://127.0.0.1:${this.nginxPort}`;
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

  /** Open WebSocket connections per live node: { 'node-a': 1, ... }. */
  async connections() {
    const out = {};
    for (const node of this.nodes) {
      if (node.proc.exited) continue;
      out[node.id] = await this.metric(node, 'gateway_connections_open');
    }
    return out;
  }

  node(id) {
    return this.nodes.find((n) => n.id === id);
  }

  /** SIGKILL one node by its pid. */
  async killNode(node) {
    await this.procs.kill(node.proc, 'SIGKILL');
  }

  /** SIGSTOP: the node stops answering but its sockets stay open. */
  freezeNode(node) {
    process.kill(node.proc.pid, 'SIGSTOP');
  }

  async stop() {
    await this.procs.stopAll();
    fs.rmSync(this.dir, { recursive: true, force: true });
  }
}
