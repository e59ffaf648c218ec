// The REST API reference (/api/v1/docs) in Debian's headless Chromium, as a
// person sees it: Swagger UI renders every operation of the server's own
// OpenAPI document with no failed request and nothing from another host
// (its Content-Security-Policy would show as console errors), and "Try it
// out" on GET /api/v1/health shows the server's real answer. A screenshot
// is saved to target/docs.png.
//
//   STACYVM_URL=http://127.0.0.1:7423 node --test tests/browser/docs.test.mjs
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { openBrowser } from './harness.mjs';

const BASE = process.env.STACYVM_URL?.replace(/\/+$/, '');
const SCREENSHOT = fileURLToPath(new URL('../../target/docs.png', import.meta.url));

let browser;
let page;
let problems;

before(async () => {
  assert.ok(BASE, 'STACYVM_URL must be set');
  browser = await openBrowser(BASE, { viewport: { width: 1400, height: 1000 } });
  ({ page, problems } = browser);
});

after(async () => {
  await browser?.close();
});

test('the API reference lists every operation and runs one against the server', { timeout: 60_000 }, async () => {
  const doc = await (await fetch(`${BASE}/api/v1/openapi.json`)).json();
  const operations = Object.values(doc.paths)
    .flatMap((item) => ['get', 'put', 'post', 'delete'].filter((m) => item[m])).length;
  assert.ok(operations >= 45, `${operations} operations in the document`);

  await page.goto(`${BASE}/api/v1/docs`);
  await page.locator('.info .title').filter({ hasText: 'StacyVM' }).waitFor({ timeout: 20_000 });
  // Every tag's section is open by default: one block per operation.
  await page.waitForFunction((n) => document.querySelectorAll('.opblock').length >= n, operations,
    { timeout: 20_000 });
  assert.equal(await page.locator('.opblock').count(), operations);

  const health = page.locator('.opblock-get').filter({
    has: page.locator('.opblock-summary-path', { hasText: /^\/api\/v1\/health$/ }),
  });
  await health.locator('.opblock-summary').click();
  await health.locator('.try-out__btn').click();
  await health.locator('button.execute').click();
  const answer = health.locator('.live-responses-table td.response-col_description')
    .filter({ hasText: '"leader"' });
  await answer.waitFor({ timeout: 20_000 });
  const text = await answer.innerText();
  assert.match(text, /"status":\s*"ok"/, text);
  assert.match(text, /"replica_id":\s*"rp-/, text);

  await answer.scrollIntoViewIfNeeded();
  await page.screenshot({ path: SCREENSHOT, fullPage: false });
  assert.deepEqual(problems, []);
});
