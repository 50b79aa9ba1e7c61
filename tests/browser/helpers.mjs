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
const allProcs = new Set();
function killAllSync() {
  for (const procs of allProcs) {
    for (const entry of procs.list) {
      if (!entry.exited) {
        try { process.kill(entry.pid, 'SIGKILL'); } catch { /* gone */ }
      }
    }
  }
}
// Also when the test process itself is stopped or dies: no process of ours outlives it.
process.once('exit', killAllSync);
for (const signal of ['SIGINT', 'SIGTERM', 'SIGHUP']) {
  process.once(signal, () => {
    killAllSync();
    process.exit(130);
  });
}

export class Procs {
  constructor(logDir) {
    this.logDir = logDir;
    this.list = [];
    fs.mkdirSync(logDir, { recursive: true });
    allProcs.add(this);
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

/** Debian's Chromium, headless, with a fresh temporary profile (Playwright makes one). */
export async function launchChromium() {
  const { chromium } = await import('playwright-core');
  return chromium.launch({
    executablePath: process.env.CHROMIUM_PATH || '/usr/bin/chromium',
    headless: true,
    args: [
      '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
    ],
  });
}

/** A phone-sized browser context (its own storage: its own userId). */
export async function phoneContext(browser) {
  return browser.newContext({
    viewport: { width: 390, height: 760 },
    deviceScaleFactor: 1,
    isMobile: false,
    hasTouch: true,
    locale: 'zh-CN',
  });
}

/**
 * Opens the chat page in a new phone-sized context, sets the nickname and waits until the
 * connection is up. Page errors are collected in `page.errors`; the connection states the
 * page went through in `window.__states`.
 */
export async function openChat(browser, baseUrl, nickname) {
  const context = await phoneContext(browser);
  const page = await context.newPage();
  page.errors = [];
  page.on('pageerror', (err) => page.errors.push(String(err)));
  page.on('console', (msg) => {
    if (msg.type() === 'error') page.errors.push(`console: ${msg.text()}`);
  });
  await page.goto(`${baseUrl}/`);
  await page.fill('#name-input', nickname);
  await page.press('#name-input', 'Enter');
  await page.waitForSelector('#conn-state[data-state="connected"]', { timeout: 15000 });
  await page.evaluate(() => {
    window.__states = [window.chatApp.client.state];
    window.chatApp.client.on('state', (s) => window.__states.push(s));
  });
  return page;
}

/** Clicks a room card and waits for the room view. */
export async function enterRoom(page, roomId) {
  await page.click(`.itemCard[data-room-id="${roomId}"]`, { timeout: 15000 });
  await page.waitForSelector('#room:not([hidden])');
}

/** Types a message and presses Enter. */
export async function say(page, text) {
  await page.fill('#msg-input', text);
  await page.press('#msg-input', 'Enter');
}

/** What the message list shows: [{kind, text, own, status, id, who}]. */
export function shown(page) {
  return page.$$eval('#msg-list > li', (items) => items.map((li) => ({
    kind: li.classList.contains('notice') ? 'notice' : 'message',
    text: (li.querySelector('.bubble') || li).textContent,
    own: li.classList.contains('selfItem'),
    status: li.dataset.status || null,
    id: li.dataset.id || null,
    who: li.querySelector('.who')?.textContent ?? null,
  })));
}

/** Waits until a message bubble with exactly `text` is shown (and, if given, has `status`). */
export async function waitMessage(page, text, { status = null, own = null, timeout = 15000 } = {}) {
  await page.waitForFunction(({ text, status, own }) => [...document.querySelectorAll('#msg-list .msgItem')]
    .some((li) => li.querySelector('.bubble').textContent === text
      && (status === null || li.dataset.status === status)
      && (own === null || li.classList.contains('selfItem') === own)), { text, status, own }, { timeout });
}

/** Waits until a notice with exactly `text` is shown. */
export async function waitNotice(page, text, timeout = 15000) {
  await page.waitForFunction((text) => [...document.querySelectorAll('#msg-list .notice')]
    .some((li) => li.textContent === text), text, { timeout });
}

/** Waits until the online count reads `n`. */
export async function waitOnline(page, n, timeout = 15000) {
  await page.waitForFunction((n) => document.getElementById('online-num').textContent === String(n), n, { timeout });
}
