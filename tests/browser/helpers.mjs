// Shared helpers for the node tests: condition waits, free ports, process handling.
import net from 'node:net';
import { spawn } from 'node:child_process';
import fs from 'node:fs';

/** Polls `check` until it returns something truthy; fails after `timeoutMs` with `what`. */
export async function waitFor(what, check, timeoutMs = 10000, everyMs = 25) {
  const deadline = Date.now() + timeoutMs;
  let last;
  for (;;) {
    try {
      const value = await check();
      if (value) return value;
    } catch (err) {
      last = err;
    }
    if (Date.now() >= deadline) {
      throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}${last ? `: ${last.message}` : ''}`);
    }
    await new Promise((r) => setTimeout(r, everyMs));
  }
}

/** A free TCP port on 127.0.0.1 (bound and released). */
export function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.unref();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

/** True when something accepts TCP connections on 127.0.0.1:port. */
export function canConnect(port) {
  return new Promise((resolve) => {
    const sock = net.connect({ port, host: '127.0.0.1' });
    sock.once('connect', () => { sock.destroy(); resolve(true); });
    sock.once('error', () => resolve(false));
  });
}

/**
 * Processes started by a test, stopped by their own pid (SIGKILL) in `stopAll()`, which the
 * tests call from `after` hooks so it runs on failure too. Output goes to log files.
 */
export class Procs {
  constructor(logDir) {
    this.logDir = logDir;
    this.list = [];
    fs.mkdirSync(logDir, { recursive: true });
  }

  spawn(name, cmd, args, opts = {}) {
    const log = fs.openSync(`${this.logDir}/${name}.log`, 'w');
    const child = spawn(cmd, args, { ...opts, stdio: ['ignore', log, log], detached: false });
    fs.closeSync(log);
    const entry = { name, child, pid: child.pid, exited: false, code: null };
    child.on('exit', (code, signal) => {
      entry.exited = true;
      entry.code = code ?? signal;
    });
    child.on('error', (err) => {
      entry.exited = true;
      entry.code = String(err);
    });
    this.list.push(entry);
    return entry;
  }

  /** SIGKILL by pid; resolves when the process has exited. */
  async kill(entry, signal = 'SIGKILL') {
    if (entry.exited) return;
    const gone = new Promise((resolve) => entry.child.once('exit', resolve));
    try { process.kill(entry.pid, signal); } catch { return; }
    await Promise.race([gone, new Promise((r) => setTimeout(r, 5000))]);
  }

  async stopAll() {
    for (const entry of [...this.list].reverse()) await this.kill(entry);
  }

  log(name) {
    try { return fs.readFileSync(`${this.logDir}/${name}.log`, 'utf8'); } catch { return ''; }
  }
}
