// The dashboard (/dashboard) in Debian's headless Chromium, as a person sees
// it: the page loads with no failed request and nothing from another host;
// a sandbox spawned through REST appears in the table without a reload and
// leaves it when destroyed; a command started from the page shows its
// output line by line while it still runs, then its exit; the sandbox's
// files are listed; audit events arrive. A screenshot is saved to
// target/dashboard.png.
//
//   STACYVM_URL=http://127.0.0.1:7423 STACYVM_TEST_IMAGE=stacyvm-test:busybox \
//     node --test tests/browser/dashboard.test.mjs
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { openBrowser } from './harness.mjs';

const BASE = process.env.STACYVM_URL?.replace(/\/+$/, '');
const IMAGE = process.env.STACYVM_TEST_IMAGE;
const SCREENSHOT = fileURLToPath(new URL('../../target/dashboard.png', import.meta.url));

let browser;
let page;
let problems;
const sandboxes = new Set();

before(async () => {
  assert.ok(BASE && IMAGE, 'STACYVM_URL and STACYVM_TEST_IMAGE must be set');
  browser = await openBrowser(BASE);
  ({ page, problems } = browser);
});

after(async () => {
  for (const id of sandboxes) {
    await fetch(`${BASE}/api/v1/sandboxes/${id}`, { method: 'DELETE' }).catch(() => {});
  }
  await browser?.close();
});

async function waitFor(pred, what, timeoutMs = 30_000) {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    const value = await pred();
    if (value) return value;
    await page.waitForTimeout(50);
  }
  assert.fail(`the page never showed ${what}`);
}

const rowState = (id) => page.locator(`#sandboxes tr[data-id="${id}"] td:nth-child(2)`);

test('the dashboard follows sandboxes, runs a command live and lists files', { timeout: 120_000 }, async () => {
  await page.goto(`${BASE}/dashboard`);
  await waitFor(async () => (await page.locator('#connection').innerText()) === 'live', 'a live connection');

  // Spawned elsewhere (REST), shown here without a reload.
  const r = await fetch(`${BASE}/api/v1/sandboxes`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ image: IMAGE, ttl: '10m' }),
  });
  assert.equal(r.status, 201);
  const { id } = await r.json();
  sandboxes.add(id);
  await waitFor(async () => (await rowState(id).count()) > 0 && (await rowState(id).innerText()) === 'running',
    `${id} running in the table`);

  // A command's output as it comes: line 1 before the exit.
  await page.locator(`#sandboxes tr[data-id="${id}"]`).click();
  assert.equal(await page.locator('#selected').innerText(), id);
  await page.locator('#command').fill('for i in 1 2 3; do echo line$i; sleep 1; done; echo oops >&2');
  await page.locator('#run').click();
  const early = await waitFor(async () => {
    const t = await page.locator('#terminal').innerText();
    return t.includes('line1') ? t : null;
  }, 'the first line');
  assert.ok(!early.includes('[exit'), `the first line came before the end: ${early}`);
  const done = await waitFor(async () => {
    const t = await page.locator('#terminal').innerText();
    return t.includes('[exit 0') ? t : null;
  }, 'the exit');
  assert.match(done, /line1\s*line2\s*line3/);
  assert.equal(await page.locator('#terminal .stderr').innerText(), 'oops\n');

  // Its files, from the sandbox itself.
  await waitFor(async () => (await page.locator('#files li').allInnerTexts()).some((t) => t.startsWith('tmp/')),
    'the root directory listing');
  await waitFor(async () => (await page.locator('#audit li').count()) > 0, 'audit events');
  await page.screenshot({ path: SCREENSHOT, fullPage: true });

  // Destroyed elsewhere: gone from the table.
  const d = await fetch(`${BASE}/api/v1/sandboxes/${id}`, { method: 'DELETE' });
  assert.equal(d.status, 200);
  sandboxes.delete(id);
  await waitFor(async () => (await rowState(id).count()) === 0, `${id} leaving the table`);
  assert.equal(await page.locator('#selected').innerText(), 'none selected');
  assert.deepEqual(problems, []);
});
