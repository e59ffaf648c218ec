// The GraphQL playground in a real browser: Debian's headless Chromium,
// driven by playwright-core (which downloads no browser of its own).
//
//   STACYVM_URL=http://127.0.0.1:7423 STACYVM_TEST_IMAGE=stacyvm-test:busybox \
//     node --test tests/browser/playground.test.mjs
//
// Needs a running `stacyvm serve` (scripts/test.sh starts one) whose provider
// can run STACYVM_TEST_IMAGE. Checks what a person would see:
//   - GET /graphql renders GraphiQL with every request answered, none failed,
//     and none to a host other than the server (no CDN), no console errors;
//   - a query typed into the editor and run with the button shows its data;
//   - the preloaded "Exec" subscription streams a command's output into the
//     result pane while the command still runs (line 1 long before the exit);
//   - the preloaded "Events" subscription shows a sandbox being destroyed;
//   - a preloaded tab run the moment it is opened runs its own operation
//     (GraphiQL settles a tab's operation name 100 ms after its text changes).
// A screenshot is saved to target/playground.png.
//
// Knobs: CHROMIUM (default /usr/bin/chromium).
import assert from 'node:assert/strict';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { openBrowser } from './harness.mjs';

const BASE = process.env.STACYVM_URL?.replace(/\/+$/, '');
const IMAGE = process.env.STACYVM_TEST_IMAGE;
const SCREENSHOT = fileURLToPath(new URL('../../target/playground.png', import.meta.url));
const LOCAL_HOSTS = new Set(['127.0.0.1', 'localhost', '[::1]']);

let browser;
let page;
/** Every request the browser made ("METHOD URL"), and what went wrong. */
let requests;
let problems;
/** Sandboxes to destroy at the end. */
const sandboxes = new Set();

before(async () => {
  assert.ok(BASE, 'STACYVM_URL must point at a running stacyvm server');
  assert.ok(IMAGE, 'STACYVM_TEST_IMAGE must name an image the server can run');
  assert.ok(LOCAL_HOSTS.has(new URL(BASE).hostname), `STACYVM_URL must be on this machine: ${BASE}`);
  browser = await openBrowser(BASE);
  ({ page, requests, problems } = browser);
});

after(async () => {
  for (const id of sandboxes) {
    await fetch(`${BASE}/api/v1/sandboxes/${id}`, { method: 'DELETE' }).catch(() => {});
  }
  await browser?.close();
});

/** The result pane's text, as shown: its editor's rendered lines. */
async function resultText() {
  const lines = await page.locator('.graphiql-response .result-window .CodeMirror-line').allInnerTexts();
  return lines.join('\n').replace(/\u200b/g, '').replace(/\u00a0/g, ' ');
}

/** Waits until the result pane's text satisfies `pred`; returns that text. */
async function waitForResult(pred, what, timeoutMs = 30_000) {
  const deadline = Date.now() + timeoutMs;
  let text = '';
  while (Date.now() < deadline) {
    text = await resultText();
    if (pred(text)) return text;
    await page.waitForTimeout(50);
  }
  assert.fail(`result pane never showed ${what}; it shows:\n${text}`);
}

/** Replaces the content of a CodeMirror editor the way a person would. */
async function typeInto(editor, text) {
  await editor.locator('.CodeMirror').click();
  await page.keyboard.press('Control+A');
  await page.keyboard.press('Delete');
  // insertText types the characters as one input, like a paste: CodeMirror's
  // auto-closed brackets would double up with key-by-key typing.
  await page.keyboard.insertText(text);
}

function queryEditor() {
  return page.locator('.graphiql-query-editor');
}

function variablesEditor() {
  return page.locator('section.graphiql-editor-tool .graphiql-editor').first();
}

function runButton() {
  return page.locator('button.graphiql-execute-button');
}

async function selectTab(name) {
  await page.locator(`button.graphiql-tab-button[title="${name}"]`).click();
  await queryEditor().locator('.CodeMirror-line', { hasText: name }).first().waitFor({ timeout: 5_000 });
}

async function spawnSandbox() {
  const res = await fetch(`${BASE}/api/v1/sandboxes`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ image: IMAGE, ttl: '10m' }),
  });
  const body = await res.text();
  assert.equal(res.status, 201, `spawning a sandbox: ${body}`);
  const { id } = JSON.parse(body);
  sandboxes.add(id);
  return id;
}

test('GET /graphql renders GraphiQL from the server alone', { timeout: 60_000 }, async () => {
  const response = await page.goto(`${BASE}/graphql`, { waitUntil: 'load' });
  assert.equal(response.status(), 200);
  assert.match(response.headers()['content-type'], /^text\/html/);
  // The editor is up and the schema arrived (the docs button enables when it does).
  await page.locator('.graphiql-container .graphiql-query-editor .CodeMirror').waitFor({ timeout: 20_000 });
  // The preloaded examples are there, the first one open.
  for (const name of ['Spawn', 'Exec', 'Events', 'Health']) {
    await page.locator('.graphiql-tab', { hasText: name }).first().waitFor({ timeout: 5_000 });
  }
  assert.match(await queryEditor().innerText(), /spawnSandbox/);
  // Let the schema introspection and any late asset settle.
  await page.waitForLoadState('networkidle');
  const assets = requests.filter((u) => u.includes('/playground/assets/'));
  assert.ok(assets.length >= 7, `expected the vendored assets to load, saw: ${requests.join(', ')}`);
  assert.ok(
    requests.includes(`POST ${BASE}/graphql`),
    `expected the schema request (POST /graphql), saw: ${requests.join(', ')}`,
  );
  // The schema loaded: the Docs panel lists the root types, and a root
  // type's fields (the standard introspection query is not refused).
  await page.locator('.graphiql-sidebar button[aria-label*="Documentation Explorer"]').click();
  const docs = page.locator('section[aria-label="Documentation Explorer"]');
  await docs.getByText('Root Types').waitFor({ timeout: 10_000 });
  const shown = await docs.innerText();
  assert.doesNotMatch(shown, /Error fetching schema/, shown);
  assert.match(shown, /QueryRoot/, shown);
  assert.match(shown, /MutationRoot/, shown);
  assert.match(shown, /SubscriptionRoot/, shown);
  await docs.locator('a', { hasText: 'QueryRoot' }).first().click();
  await docs.getByText('sandboxes', { exact: true }).first().waitFor({ timeout: 5_000 });
  assert.deepEqual(problems, []);
});

test('a query typed into the editor shows its data', { timeout: 60_000 }, async () => {
  const rest = await (await fetch(`${BASE}/api/v1/health`)).json();
  await page.locator('button[aria-label="New tab"]').click();
  await typeInto(queryEditor(), '{ health { status version } }');
  await runButton().click();
  const text = await waitForResult((t) => t.includes('"health"'), 'the health data');
  const shown = JSON.parse(text);
  assert.equal(shown.errors, undefined, text);
  assert.equal(shown.data.health.status, rest.status, text);
  assert.ok(shown.data.health.version, text);
  assert.deepEqual(problems, []);
});

test('the Exec subscription streams output live', { timeout: 90_000 }, async () => {
  const id = await spawnSandbox();
  await selectTab('Exec');
  await typeInto(variablesEditor(), JSON.stringify({ id }));
  await runButton().click();

  // GraphiQL shows the latest event of a subscription: watch them go by.
  const seen = {};
  const start = Date.now();
  let text = '';
  while (Date.now() - start < 60_000 && !seen.exit) {
    text = await resultText();
    for (const i of [1, 2, 3]) {
      if (!seen[`line${i}`] && text.includes(`line ${i}`)) seen[`line${i}`] = Date.now() - start;
    }
    if (text.includes('"ExecExit"')) seen.exit = Date.now() - start;
    if (seen.line1 !== undefined && !seen.shot) {
      mkdirSync(join(SCREENSHOT, '..'), { recursive: true });
      await page.screenshot({ path: SCREENSHOT });
      seen.shot = true;
    }
    await page.waitForTimeout(50);
  }
  assert.ok(seen.line1 !== undefined, `line 1 never appeared; result pane:\n${text}`);
  assert.ok(seen.exit !== undefined, `no ExecExit; result pane:\n${text}`);
  // The command prints a line a second: line 1 must show up about two
  // seconds before the command ends, not in one batch at the exit.
  assert.ok(seen.exit - seen.line1 >= 1_500, `output was not live: ${JSON.stringify(seen)}`);
  assert.ok(seen.line2 !== undefined && seen.line2 < seen.exit, `line 2 not shown live: ${JSON.stringify(seen)}`);
  const exit = JSON.parse(text);
  assert.equal(exit.data.execStream.__typename, 'ExecExit', text);
  assert.equal(exit.data.execStream.exitCode, 0, text);
  assert.equal(exit.data.execStream.timedOut, false, text);
  assert.deepEqual(problems, []);
});

test('the Events subscription shows a sandbox being destroyed', { timeout: 90_000 }, async () => {
  const id = await spawnSandbox();
  await selectTab('Events');
  await runButton().click();
  // Give the subscription a moment to be established before the event.
  await page.waitForTimeout(1_000);
  const res = await fetch(`${BASE}/api/v1/sandboxes/${id}`, { method: 'DELETE' });
  assert.ok(res.ok, `destroying ${id}: ${res.status} ${await res.text()}`);
  sandboxes.delete(id);
  const text = await waitForResult(
    (t) => t.includes(id) && /"state":\s*"(destroying|destroyed)"/i.test(t),
    `a destroy event for ${id}`,
  );
  assert.equal(JSON.parse(text).data.sandboxEvents.sandboxId, id, text);
  // Stop the subscription (the run button is a stop button while it runs).
  await runButton().click();
  assert.deepEqual(problems, []);
});

test('a tab run the moment it is opened runs its own operation', { timeout: 60_000 }, async () => {
  // From the Events tab (a subscription) to the Health tab (a query), Run
  // clicked as soon as the editor shows the new text, in the same turn of the
  // page: no time for GraphiQL's 100 ms re-read of the operation name.
  await selectTab('Events');
  await page.waitForTimeout(300);
  await page.evaluate(async () => {
    const editor = document.querySelector('.graphiql-query-editor .CodeMirror').CodeMirror;
    document.querySelector('button.graphiql-tab-button[title="Health"]').click();
    const deadline = Date.now() + 5_000;
    while (!/query Health/.test(editor.getValue())) {
      if (Date.now() > deadline) throw new Error(`the Health tab never opened: ${editor.getValue()}`);
      await new Promise((r) => setTimeout(r, 0));
    }
    document.querySelector('button.graphiql-execute-button').click();
  });
  const text = await waitForResult((t) => t.includes('"health"') || t.includes('"errors"'), 'the Health data');
  const shown = JSON.parse(text);
  assert.equal(shown.errors, undefined, text);
  assert.equal(shown.data.health.status, 'ok', text);
  assert.deepEqual(problems, []);
});
