// Drives the ticker page (examples/ticker) in Debian's headless Chromium
// and checks that its EventSource resumes after the server drops it, without
// losing or repeating a quote.
//
//   node spec/browser/ticker.mjs http://127.0.0.1:PORT/
//
// 1. open the page, wait for quotes;
// 2. POST /admin/drop: the browser reconnects by itself with Last-Event-ID;
// 3. POST /admin/drop again, and answer the browser's reconnection with 503:
//    the EventSource ends CLOSED and the page reopens it with
//    /ticker?last_event_id=<last id>.
// Then every id the page saw ("<epoch>-<seq>", one epoch, seq global to the
// hub, and "prices" is the only topic) must follow the one before by exactly 1.
//
// Prints one JSON line { ok, ... }; exits 0 only when ok. Never runs longer
// than TICKER_SPEC_TIMEOUT_MS (default 40 s). CHROMIUM overrides the browser.
import { chromium } from "playwright-core";

const base = new URL(process.argv[2] || "http://127.0.0.1:8080/");
const STEP_MS = 15000;
const result = { ok: false, url: base.href, steps: [], console: [], errors: [], requests: [] };
let browser;

function finish(ok, why) {
  result.ok = ok;
  if (why) result.failure = why;
  process.stdout.write(JSON.stringify(result) + "\n");
  const done = () => process.exit(ok ? 0 : 1);
  if (!browser) return done();
  // a browser that will not close must not hold us
  setTimeout(done, 3000).unref();
  browser.close().catch(() => {}).finally(done);
}

const watchdog = setTimeout(() => finish(false, "timed out (whole run)"),
  Number(process.env.TICKER_SPEC_TIMEOUT_MS || 40000));
watchdog.unref();

function step(name) {
  result.steps.push(name);
}

async function post(path) {
  const res = await fetch(new URL(path, base), { method: "POST", signal: AbortSignal.timeout(5000) });
  if (res.status !== 200) throw new Error(`POST ${path}: status ${res.status}`);
  return res.json();
}

// Checks that ids are "<epoch>-<seq>", of one epoch, each seq exactly one
// more than the one before. Returns null when they are, or what is wrong.
export function checkIds(ids) {
  let epoch = null, prev = null;
  for (let i = 0; i < ids.length; i++) {
    const m = /^([0-9a-f]{8})-(\d+)$/.exec(ids[i] || "");
    if (!m) return `id ${i} is not <epoch>-<seq>: ${JSON.stringify(ids[i])}`;
    const seq = Number(m[2]);
    if (epoch !== null && m[1] !== epoch) return `id ${i} (${ids[i]}) is of another epoch than ${epoch}`;
    if (prev !== null && seq !== prev + 1) {
      const what = seq <= prev ? "a duplicate or out of order" : `a gap of ${seq - prev - 1}`;
      return `id ${i} (${ids[i]}) after ${ids[i - 1]}: ${what}`;
    }
    epoch = m[1];
    prev = seq;
  }
  return null;
}

const state = (page) => page.evaluate(() => {
  const t = window.heraldTicker;
  return { ids: t.ids.length, opens: t.opens, gaps: t.gaps };
});

async function main() {
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    headless: true,
    timeout: STEP_MS,
    // no sandbox as root; no background traffic to the closed network
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
  result.browser = browser.version();
  const page = await browser.newPage();
  page.setDefaultTimeout(STEP_MS);
  page.on("console", (m) => { if (result.console.length < 50) result.console.push(`${m.type()}: ${m.text()}`); });
  page.on("pageerror", (e) => result.errors.push(String(e)));
  page.on("request", async (r) => {
    if (!new URL(r.url()).pathname.startsWith("/ticker")) return;
    const entry = { url: r.url().slice(base.origin.length) };
    result.requests.push(entry);
    try { entry.lastEventId = (await r.allHeaders())["last-event-id"] || null; } catch { /* gone */ }
  });
  const wait = (fn, arg) => page.waitForFunction(fn, arg, { timeout: STEP_MS, polling: 50 });

  // 1. the page and its first quotes
  const res = await page.goto(base.href, { timeout: STEP_MS });
  if (!res || res.status() !== 200) throw new Error(`GET /: status ${res && res.status()}`);
  await wait(() => window.heraldTicker && window.heraldTicker.opens >= 1 && window.heraldTicker.ids.length >= 5);
  step("quotes");

  // 2. the server drops the stream; the browser resumes by itself
  let before = await state(page);
  result.drop1 = await post("admin/drop");
  if (!(result.drop1.dropped >= 1)) throw new Error(`admin/drop closed no stream: ${JSON.stringify(result.drop1)}`);
  await wait((n) => window.heraldTicker.opens >= n + 1, before.opens);
  let opened = await state(page);
  await wait((n) => window.heraldTicker.ids.length >= n + 10, opened.ids);
  step("resumed by EventSource");

  // 3. the reconnection is refused (503): EventSource ends CLOSED, and the
  // page reopens it with ?last_event_id=
  let refused = 0;
  await page.route((url) => url.pathname === "/ticker", async (route) => {
    if (refused++ === 0) return route.fulfill({ status: 503, contentType: "text/plain", body: "busy\n" });
    return route.fallback();
  });
  before = await state(page);
  result.drop2 = await post("admin/drop");
  await wait(() => document.getElementById("state").textContent === "reconnecting");
  await wait((n) => window.heraldTicker.opens >= n + 1, before.opens);
  await page.unrouteAll({ behavior: "ignoreErrors" });
  opened = await state(page);
  await wait((n) => window.heraldTicker.ids.length >= n + 10, opened.ids);
  step("reopened by the page");

  // the verdict
  const t = await page.evaluate(() => ({
    ids: window.heraldTicker.ids.slice(), opens: window.heraldTicker.opens, gaps: window.heraldTicker.gaps,
    rows: document.querySelectorAll("#rows tr[data-symbol]").length,
    sparklines: [...document.querySelectorAll("#rows polyline")].filter((p) => p.getAttribute("points")).length,
    state: document.getElementById("state").textContent,
  }));
  Object.assign(result, { events: t.ids.length, opens: t.opens, gaps: t.gaps, rows: t.rows,
    sparklines: t.sparklines, state: t.state, first: t.ids[0], last: t.ids[t.ids.length - 1] });
  if (process.env.TICKER_SCREENSHOT) await page.screenshot({ path: process.env.TICKER_SCREENSHOT });

  const problems = [];
  const bad = checkIds(t.ids);
  if (bad) problems.push(bad);
  if (t.gaps !== 0) problems.push(`${t.gaps} herald-gap event(s)`);
  if (t.opens < 3) problems.push(`the stream opened ${t.opens} times, not 3`);
  if (t.rows !== 12) problems.push(`${t.rows} rows in the table, not 12`);
  if (t.sparklines !== 12) problems.push(`${t.sparklines} sparklines drawn, not 12`);
  if (t.state !== "connected") problems.push(`the status says ${t.state}`);
  if (result.errors.length) problems.push(`page errors: ${result.errors.join("; ")}`);
  // the resumptions: a Last-Event-ID header, then the page's own query
  const tickers = result.requests;
  if (tickers.length < 4) problems.push(`${tickers.length} requests to /ticker, not 4`);
  else {
    if (tickers[0].url !== "/ticker" || tickers[0].lastEventId) problems.push(`first request: ${JSON.stringify(tickers[0])}`);
    if (!tickers[1].lastEventId) problems.push(`the browser's reconnection sent no Last-Event-ID: ${JSON.stringify(tickers[1])}`);
    const reopen = tickers[tickers.length - 1];
    if (!/^\/ticker\?last_event_id=[0-9a-f]{8}-\d+$/.test(reopen.url)) problems.push(`the page's reopen: ${JSON.stringify(reopen)}`);
  }
  if (problems.length) return finish(false, problems.join("; "));
  finish(true);
}

main().catch((e) => finish(false, String(e && e.stack || e)));
