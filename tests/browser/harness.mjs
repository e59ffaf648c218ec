// One headless Chromium (Debian's, driven by playwright-core) for a browser
// test, watching what a person's browser would: every request and
// WebSocket it opens, and as problems each one that failed, was answered
// with a status >= 400 or went anywhere but the server under test (no
// CDN, not even another port on this host), and every console or page
// error (a Content-Security-Policy violation is one).
//
// Knobs: CHROMIUM (default /usr/bin/chromium).
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { chromium } from 'playwright-core';

const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';

export async function openBrowser(base, { viewport = { width: 1400, height: 900 } } = {}) {
  const server = new URL(base).host;
  const own = (url) => {
    const u = new URL(url);
    return u.protocol === 'data:' || u.protocol === 'blob:' || u.host === server;
  };
  const userDataDir = await mkdtemp(join(tmpdir(), 'stacyvm-chromium-'));
  const context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: CHROMIUM,
    headless: true,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
    viewport,
  });
  /** Every request the browser made ("METHOD URL", "WS URL"), and what went wrong. */
  const requests = [];
  const problems = [];
  context.on('request', (r) => {
    requests.push(`${r.method()} ${r.url()}`);
    if (!own(r.url())) problems.push(`request to another origin: ${r.method()} ${r.url()}`);
  });
  context.on('requestfailed', (r) => {
    problems.push(`request failed: ${r.method()} ${r.url()}: ${r.failure()?.errorText}`);
  });
  context.on('response', (r) => {
    if (r.status() >= 400) problems.push(`HTTP ${r.status()}: ${r.request().method()} ${r.url()}`);
  });
  const page = context.pages()[0] ?? (await context.newPage());
  page.on('websocket', (ws) => {
    requests.push(`WS ${ws.url()}`);
    if (!own(ws.url())) problems.push(`websocket to another origin: ${ws.url()}`);
    ws.on('socketerror', (e) => problems.push(`websocket error on ${ws.url()}: ${e}`));
  });
  page.on('console', (msg) => {
    if (msg.type() === 'error') problems.push(`console error: ${msg.text()}`);
  });
  page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
  return {
    context,
    page,
    requests,
    problems,
    async close() {
      await context.close();
      await rm(userDataDir, { recursive: true, force: true });
    },
  };
}
