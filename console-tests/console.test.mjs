// Browser tests of the ops console: headless Chromium (Debian's) driven by playwright-core.
// Run by scripts/console-test.sh, which starts the services and seeds one dead letter.
// Environment: CONSOLE_URL, OPS_TOKEN, OPS_READONLY_TOKEN, EVENT_ID, FOREIGN_PORT,
// SCREENSHOTS (directory for the page screenshots).
import assert from "node:assert/strict";
import { mkdtempSync, mkdirSync, readFileSync, rmSync } from "node:fs";
import http from "node:http";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";

const env = (name) => {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set`);
  return value;
};
const CONSOLE = env("CONSOLE_URL");
const TOKEN = env("OPS_TOKEN");
const READONLY = env("OPS_READONLY_TOKEN");
const EVENT = env("EVENT_ID");
const PURGE_EVENT = env("PURGE_EVENT_ID");
const FOREIGN_PORT = Number(env("FOREIGN_PORT"));
const SHOTS = env("SCREENSHOTS");
mkdirSync(SHOTS, { recursive: true });

const ARGS = [
  "--disable-gpu", "--disable-quic", "--no-first-run", "--no-sandbox",
  "--disable-background-networking", "--disable-component-update", "--disable-sync",
];
const profiles = [];
const foreignLoads = [];
// A browser of its own (fresh profile, no cookies) for each user in the test.
async function browser() {
  const dir = mkdtempSync(join(tmpdir(), "console-test-"));
  profiles.push(dir);
  const context = await chromium.launchPersistentContext(dir, {
    executablePath: "/usr/bin/chromium",
    headless: true,
    args: ARGS,
    viewport: { width: 1280, height: 900 },
    acceptDownloads: true,
  });
  // Nothing may be loaded from anywhere but the console (and the foreign test page).
  context.on("request", (request) => {
    const url = request.url();
    if (!url.startsWith(CONSOLE) && !url.startsWith(`http://127.0.0.1:${FOREIGN_PORT}`)) {
      foreignLoads.push(url);
    }
  });
  return context;
}

const shot = (page, name) => page.screenshot({ path: join(SHOTS, `${name}.png`), fullPage: true });

let passed = 0;
async function step(name, body) {
  process.stderr.write(`  ${name} … `);
  await body();
  passed += 1;
  process.stderr.write("ok\n");
}

async function login(page, token) {
  await page.goto(`${CONSOLE}/login`);
  await page.fill("#token", token);
  await Promise.all([page.waitForURL(`${CONSOLE}/`), page.click("button[type=submit]")]);
}

// A page on another port of the same host: another origin, the same site.
const foreign = http.createServer((req, res) => {
  res.writeHead(200, { "content-type": "text/html" });
  res.end(`<!doctype html><title>not the console</title>
    <form method="post" action="${CONSOLE}/dead-letters/replay" id="f">
      <input type="hidden" name="expected" value="1">
    </form>
    <script>document.getElementById("f").submit()</script>`);
});
await new Promise((resolve) => foreign.listen(FOREIGN_PORT, "127.0.0.1", resolve));

const operator = await browser();
const reader = await browser();
const stranger = await browser();
try {
  const page = operator.pages()[0] ?? (await operator.newPage());

  await step("no token: 401 and the login form", async () => {
    const anon = stranger.pages()[0] ?? (await stranger.newPage());
    const response = await anon.goto(`${CONSOLE}/dead-letters`);
    assert.equal(response.status(), 401);
    assert.equal(await anon.locator("input[name=token]").count(), 1);
    const post = await anon.request.post(`${CONSOLE}/dead-letters/replay`, {
      form: { expected: "1" },
      headers: { origin: CONSOLE },
    });
    assert.equal(post.status(), 401);
    await shot(anon, "login");
  });

  await step("log in and see the overview", async () => {
    await login(page, TOKEN);
    await page.waitForSelector("svg.chart polyline", { state: "attached" });
    const dead = Number(await page.locator(".card .big").first().textContent());
    assert.ok(dead >= 1, `dead letters on the overview: ${dead}`);
    assert.ok((await page.textContent("main")).includes("permanent"));
    const cookies = await operator.cookies(CONSOLE);
    const session = cookies.find((c) => c.name === "ops_console");
    assert.ok(session && session.httpOnly && session.sameSite === "Strict", JSON.stringify(cookies));
    assert.ok(!session.value.includes(TOKEN));
    await shot(page, "overview");
  });

  await step("filter the dead letters and see why the event failed", async () => {
    await page.goto(`${CONSOLE}/dead-letters`);
    await page.selectOption("select[name=class]", "permanent");
    await page.fill("input[name=type]", "checkout.session.completed");
    await Promise.all([page.waitForURL(/class=permanent/), page.click("form.filters button")]);
    const row = page.locator("table.letters tbody tr", { hasText: EVENT });
    assert.equal(await row.count(), 1);
    assert.match(await row.locator("td.error").textContent(), /unknown|not found|no such/i);
    await shot(page, "dead-letters");
    // Another class: not listed.
    await page.goto(`${CONSOLE}/dead-letters?class=crash`);
    assert.equal(await page.locator("table.letters tbody tr", { hasText: EVENT }).count(), 0);
  });

  await step("the event page: dead-lettered, raw body masked", async () => {
    await page.goto(`${CONSOLE}/events/${EVENT}`);
    const timeline = await page.textContent("ol.timeline");
    assert.match(timeline, /received/);
    assert.match(timeline, /dead-lettered/);
    const raw = await page.textContent("#raw-body");
    assert.ok(raw.includes(EVENT));
    assert.ok(!raw.includes("4242 4242 4242 4242"), "card number shown unmasked");
    assert.ok(raw.includes("•••• •••• •••• 4242"), "card number not masked as expected");
    assert.ok(!(await page.content()).includes("4242 4242 4242 4242"));
    await shot(page, "event-dead");
  });

  await step("replay it: dry-run count, confirmation, progress, final count", async () => {
    await page.goto(`${CONSOLE}/dead-letters?type=checkout.session.completed`);
    await page.check(`input[name=event_id][value="${EVENT}"]`);
    await Promise.all([
      page.waitForURL(`${CONSOLE}/dead-letters/preview`),
      page.click("button[value='replay:selected']"),
    ]);
    assert.equal((await page.textContent(".dryrun .count")).trim(), "1");
    await shot(page, "replay-dry-run");
    await Promise.all([page.waitForURL(/\/jobs\//), page.click("#confirm")]);
    await page.waitForFunction(() => document.querySelector("#outcome")?.className === "ok", null, {
      timeout: 30_000,
    });
    assert.match(await page.textContent("#outcome"), /replayed 1 of 1 matching/);
    await shot(page, "replay-job");
  });

  await step("the event page: replayed, processed, with its purchase and access", async () => {
    let status = "";
    for (let i = 0; i < 100 && status !== "processed"; i += 1) {
      await page.goto(`${CONSOLE}/events/${EVENT}`);
      status = (await page.textContent("#event-status")).trim();
      if (status !== "processed") await page.waitForTimeout(200);
    }
    assert.equal(status, "processed");
    const timeline = await page.textContent("ol.timeline");
    assert.match(timeline, /dead-lettered \(permanent\) after 1 attempt\(s\): unknown content/);
    assert.match(timeline, /replayed by OPS_TOKEN \([0-9a-f]{8}\)/);
    assert.match(timeline, /processed/);
    const purchase = await page.textContent("table.purchases");
    assert.match(purchase, /completed/);
    assert.match(purchase, /granted/);
    await shot(page, "event-replayed");
  });

  await step("purge the other one, only after its JSON download", async () => {
    await page.goto(`${CONSOLE}/dead-letters`);
    await page.check(`input[name=event_id][value="${PURGE_EVENT}"]`);
    await Promise.all([
      page.waitForURL(`${CONSOLE}/dead-letters/preview`),
      page.click("button[value='purge:selected']"),
    ]);
    assert.equal((await page.textContent(".dryrun .count")).trim(), "1");
    assert.ok(await page.isDisabled("#confirm"), "purge enabled before the download");
    const [download] = await Promise.all([page.waitForEvent("download"), page.click("#download")]);
    const saved = await download.path();
    const text = readFileSync(saved, "utf8");
    const letters = JSON.parse(text);
    assert.equal(letters.length, 1);
    assert.equal(letters[0].summary.event_id, PURGE_EVENT);
    assert.equal(letters[0].payload.id, PURGE_EVENT);
    assert.ok(!text.includes("4242 4242 4242 4242"), "card number unmasked in the download");
    assert.ok(await page.isEnabled("#confirm"), "purge still disabled after the download");
    await shot(page, "purge-dry-run");
    await Promise.all([page.waitForURL(/\/jobs\//), page.click("#confirm")]);
    await page.waitForFunction(() => document.querySelector("#outcome")?.className === "ok", null, {
      timeout: 30_000,
    });
    assert.match(await page.textContent("#outcome"), /purged 1 message\(s\) of 1 event\(s\)/);
    await page.goto(`${CONSOLE}/events/${PURGE_EVENT}`);
    assert.equal((await page.textContent("#event-status")).trim(), "purged");
    assert.match(await page.textContent("ol.timeline"), /purged by OPS_TOKEN/);
    await shot(page, "event-purged");
  });

  await step("the audit lists the replay and the purge", async () => {
    await page.goto(`${CONSOLE}/audit`);
    const rows = page.locator("table.audit tbody tr");
    assert.equal(await rows.count(), 2);
    const [purge, replay] = [await rows.nth(0).textContent(), await rows.nth(1).textContent()];
    assert.match(purge, /purge/);
    assert.match(purge, new RegExp(PURGE_EVENT));
    assert.match(replay, /replay/);
    assert.match(replay, /OPS_TOKEN/);
    assert.match(replay, new RegExp(EVENT));
    await shot(page, "audit");
  });

  await step("lookups: the purchase by payment intent, and the access check", async () => {
    await page.goto(`${CONSOLE}/lookup?q=pi_3SampleA1b2C3d4E5f6G7h8`);
    assert.match(await page.textContent("table.purchases"), /completed/);
    await page.goto(
      `${CONSOLE}/lookup?user=3f1c2a6e-8d4b-4c1e-9a57-2b6d0e4f8a10&content=5d2e8f14-6b3a-4c9d-a1e7-93f0b4c2d6e8`,
    );
    assert.match(await page.textContent("#access"), /granted/);
    await page.goto(
      `${CONSOLE}/lookup?q=pi_3SampleA1b2C3d4E5f6G7h8&user=3f1c2a6e-8d4b-4c1e-9a57-2b6d0e4f8a10&content=5d2e8f14-6b3a-4c9d-a1e7-93f0b4c2d6e8`,
    );
    await shot(page, "lookup");
  });

  await step("a read-only token may look but every action is refused with 403", async () => {
    const look = reader.pages()[0] ?? (await reader.newPage());
    await login(look, READONLY);
    await look.goto(`${CONSOLE}/dead-letters`);
    assert.equal(await look.locator("button[value='replay:selected']").count(), 0);
    // The same form an operator would submit, from the console's own page.
    const response = await Promise.all([
      look.waitForResponse(`${CONSOLE}/dead-letters/preview`),
      look.evaluate(() => {
        const form = document.createElement("form");
        form.method = "post";
        form.action = "/dead-letters/preview";
        form.innerHTML = '<input name="op" value="replay:matching">';
        document.body.append(form);
        form.submit();
      }),
    ]).then(([r]) => r);
    assert.equal(response.status(), 403);
    await look.waitForLoadState();
    assert.match(await look.textContent("main"), /may only look/);
    await shot(look, "read-only-refused");
  });

  await step("a cross-site POST (a page on another port) is refused with 403", async () => {
    const [response] = await Promise.all([
      page.waitForResponse(`${CONSOLE}/dead-letters/replay`),
      page.goto(`http://127.0.0.1:${FOREIGN_PORT}/`),
    ]);
    assert.equal(response.status(), 403);
    await page.waitForURL(`${CONSOLE}/dead-letters/replay`);
    assert.match(await page.textContent("main"), /cross-origin/);
    await shot(page, "cross-site-refused");
    await page.goto(`${CONSOLE}/audit`);
    assert.equal(await page.locator("table.audit tbody tr").count(), 2, "the refused POST started nothing");
  });

  await step("no page loaded anything from elsewhere", async () => {
    assert.deepEqual(foreignLoads, []);
  });

  process.stderr.write(`console browser tests: ${passed} passed\n`);
} finally {
  await Promise.allSettled([operator.close(), reader.close(), stranger.close()]);
  foreign.close();
  for (const dir of profiles) rmSync(dir, { recursive: true, force: true });
}
