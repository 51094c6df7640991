// Drives two chat pages (examples/chat) in Debian's headless Chromium and
// checks that herald.js resumes a dropped WebSocket without losing or
// repeating a message.
//
//   node spec/browser/chat.mjs http://127.0.0.1:PORT/    (the chat with CHAT_ADMIN=1)
//
// 1. alice joins a fresh room and says something; bob joins and sees it
//    (the room's history); they exchange messages, each sees the other's;
// 2. POST /admin/drop?nick=alice&hold=2500: the server closes alice's
//    WebSocket and refuses her reconnections for 2.5 s (herald.js retries
//    with backoff); meanwhile bob sends three messages;
// 3. alice's page reconnects with ?last_event_id=<the last id it saw> and
//    shows the three messages, each once; then she speaks again and bob sees it.
// Every id a page shows must be greater than the one before (one epoch),
// with no duplicate, and no duplicate may even have arrived.
//
// Prints one JSON line { ok, ... }; exits 0 only when ok. Never runs longer
// than CHAT_SPEC_TIMEOUT_MS (default 45 s). CHROMIUM overrides the browser.
import { chromium } from "playwright-core";

const base = new URL(process.argv[2] || "http://127.0.0.1:8080/");
const STEP_MS = 15000;
const HOLD_MS = 2500;
const result = { ok: false, url: base.href, steps: [], console: [], errors: [], sockets: {} };
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

const watchdog = setTimeout(() => finish(false, "timed out (whole run), after: " + result.steps.join(", ")),
  Number(process.env.CHAT_SPEC_TIMEOUT_MS || 45000));
watchdog.unref();

function step(name) {
  result.steps.push(name);
}

async function post(path) {
  const res = await fetch(new URL(path, base), { method: "POST", signal: AbortSignal.timeout(5000) });
  if (res.status !== 200) throw new Error(`POST ${path}: status ${res.status}`);
  return res.json();
}

// Checks that ids are "<epoch>-<seq>", of one epoch, each seq greater than
// the one before. Returns null when they are, or what is wrong.
export function checkIncreasing(ids) {
  let epoch = null, prev = null;
  for (let i = 0; i < ids.length; i++) {
    const m = /^([0-9a-f]{8})-(\d+)$/.exec(ids[i] || "");
    if (!m) return `id ${i} is not <epoch>-<seq>: ${JSON.stringify(ids[i])}`;
    const seq = Number(m[2]);
    if (epoch !== null && m[1] !== epoch) return `id ${i} (${ids[i]}) is of another epoch than ${epoch}`;
    if (prev !== null && seq <= prev) return `id ${i} (${ids[i]}) after ${ids[i - 1]}: a duplicate or out of order`;
    epoch = m[1];
    prev = seq;
  }
  return null;
}

const record = (page) => page.evaluate(() => JSON.parse(JSON.stringify(window.heraldChat)));

async function openPage(nick) {
  const context = await browser.newContext();
  const page = await context.newPage();
  page.setDefaultTimeout(STEP_MS);
  page.on("console", (m) => { if (result.console.length < 80) result.console.push(`${nick} ${m.type()}: ${m.text()}`); });
  page.on("pageerror", (e) => result.errors.push(`${nick}: ${e}`));
  const sockets = result.sockets[nick] = [];
  page.on("websocket", (ws) => { const u = new URL(ws.url()); sockets.push(u.pathname + u.search); });
  page.wait = (fn, arg) => page.waitForFunction(fn, arg, { timeout: STEP_MS, polling: 50 });
  const res = await page.goto(base.href, { timeout: STEP_MS });
  if (!res || res.status() !== 200) throw new Error(`GET /: status ${res && res.status()}`);
  return page;
}

async function join(page, nick, room) {
  await page.fill("#nick", nick);
  await page.fill("#roomname", room);
  await page.click("#join-button");
  await page.wait((n) => window.heraldChat.state === "open" && window.heraldChat.users.includes(n), nick);
}

async function say(page, text) {
  await page.fill("#text", text);
  await page.press("#text", "Enter");
}

const sees = (page, texts) => page.wait((ts) => ts.every((t) => window.heraldChat.texts.includes(t)), texts);

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
  const room = "spec" + Math.floor(Math.random() * 1e9);
  result.room = room;

  // 1. history on arrival, then an exchange
  const alice = await openPage("alice");
  await join(alice, "alice", room);
  await say(alice, "hello from alice");
  await sees(alice, ["hello from alice"]);
  const bob = await openPage("bob");
  await join(bob, "bob", room);
  await sees(bob, ["hello from alice"]);
  step("history on arrival");
  await say(bob, "hi alice, bob here");
  await sees(alice, ["hi alice, bob here"]);
  await say(alice, "hi bob");
  await sees(bob, ["hi bob"]);
  await alice.wait(() => window.heraldChat.users.includes("bob"));
  step("exchange");

  // 2. alice is dropped and kept out a while; bob talks meanwhile
  const before = await record(alice);
  result.lastIdBeforeDrop = before.ids[before.ids.length - 1];
  result.drop = await post(`admin/drop?nick=alice&hold=${HOLD_MS}`);
  if (result.drop.dropped !== 1) throw new Error(`admin/drop: ${JSON.stringify(result.drop)}`);
  await alice.wait(() => window.heraldChat.state === "reconnecting");
  const missed = ["while you were away 1", "while you were away 2", "while you were away 3"];
  for (const text of missed) await say(bob, text);
  await sees(bob, missed);
  const stillAway = await record(alice);
  if (stillAway.opens !== before.opens) throw new Error("alice reconnected during the hold");
  step("dropped");

  // 3. alice comes back, sees what she missed once, and speaks again
  await alice.wait((n) => window.heraldChat.opens > n && window.heraldChat.state === "open", before.opens);
  await sees(alice, missed);
  await alice.wait(() => window.heraldChat.users.includes("alice") && window.heraldChat.users.includes("bob"));
  await say(alice, "back again");
  await sees(bob, ["back again"]);
  await sees(alice, ["back again"]);
  step("resumed");

  // the verdict
  const a = await record(alice), b = await record(bob);
  const divider = await alice.evaluate(() => [...document.querySelectorAll(".divider")].map((d) => d.textContent));
  Object.assign(result, { alice: a, bob: b, divider });
  if (process.env.CHAT_SCREENSHOT) await alice.screenshot({ path: process.env.CHAT_SCREENSHOT });
  const problems = [];
  const all = ["hello from alice", "hi alice, bob here", "hi bob", ...missed, "back again"];
  for (const [name, r] of [["alice", a], ["bob", b]]) {
    const bad = checkIncreasing(r.ids);
    if (bad) problems.push(`${name}: ${bad}`);
    if (new Set(r.ids).size !== r.ids.length) problems.push(`${name}: an id shown twice`);
    if (r.dups !== 0) problems.push(`${name}: ${r.dups} duplicate(s) arrived`);
    if (r.errors.length) problems.push(`${name}: errors from the server: ${r.errors.join("; ")}`);
    for (const text of all) {
      const n = r.texts.filter((t) => t === text).length;
      if (n !== 1) problems.push(`${name} shows ${JSON.stringify(text)} ${n} times`);
    }
    if (r.texts.length !== all.length) problems.push(`${name} shows ${r.texts.length} messages, not ${all.length}`);
  }
  if (a.opens !== 2) problems.push(`alice's socket opened ${a.opens} times, not 2`);
  if (b.opens !== 1) problems.push(`bob's socket opened ${b.opens} times, not 1`);
  if (a.gaps !== 0 || b.gaps !== 0) problems.push(`herald-gap: alice ${a.gaps}, bob ${b.gaps}`);
  // alice's sockets: the first without a resume point, then (refused while
  // held, then accepted) every one resuming from the last id she saw
  const urls = result.sockets.alice;
  const first = `/ws/${room}?nick=alice`;
  const resume = `${first}&last_event_id=${result.lastIdBeforeDrop}`;
  if (urls[0] !== first) problems.push(`alice's first socket: ${urls[0]}`);
  if (urls.length < 3) problems.push(`alice opened ${urls.length} sockets: no refused attempt during the hold?`);
  if (urls.slice(1).some((u) => u !== resume)) problems.push(`alice's reconnections: ${urls.slice(1).join(" ")}, not ${resume}`);
  if (!divider.some((d) => /reconnected · \d+ messages while away/.test(d))) problems.push(`divider: ${divider}`);
  if (result.errors.length) problems.push(`page errors: ${result.errors.join("; ")}`);
  if (problems.length) return finish(false, problems.join("; "));
  finish(true);
}

main().catch((e) => finish(false, String(e && e.stack || e)));
