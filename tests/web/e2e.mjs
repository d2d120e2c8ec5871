// End-to-end test of the cim web client (cim-route/web) in headless Chromium, against a
// running route. tests/tests/web.rs starts a real cluster and runs this script; by hand:
//
//   node tests/web/e2e.mjs http://127.0.0.1:8080 [--screenshot docs/web-client.png]
//        [--phone-screenshot docs/web-client-phone.png] [--users alice,bob]
//        [--require-two-servers] [--control] [--api-key KEY] [--artifacts DIR]
//
// Two browser contexts (two people, separate storage): the first on a desktop-sized window,
// the second on a phone-sized one. They register through the page, chat privately (unread
// badge, "seen" once the other opened it, a typing indicator), in the group of everyone online,
// in a stored group created from the page (a member added, messages both ways, "seen by 1", acked by
// position) and in a channel; a message full of markup must show as text and never run; the
// second page reloads: its conversation list comes back in the same order and opening a
// conversation loads its newest history page, scrolling to the top the older ones; what was sent to it while away is replayed (marked as
// such) and nothing is shown twice.
//
// --control: the script asks the test that runs it to shut down the first person's server
// (a line `CONTROL shutdown-server <id>` on stdout, answered by a line `ok` on stdin) and
// checks that the page reconnects by itself through the route to another server.
// --api-key KEY (a key of the route's business API): an administrator kicks the second person,
// whose page must say so and not reconnect.
//
// Every wait is on a page condition, with a deadline; the exit status is 0 on success, 1 with
// a message naming the failed step otherwise (and, with --artifacts, a screenshot of each page
// as it was then: DIR/failure-<name>.png). Chromium: $CHROMIUM or /usr/bin/chromium.

import { chromium } from "playwright-core";
import { createInterface } from "node:readline";

const WAIT_MS = 15000;
/** The people-online list refreshes every 10 s. */
const LIST_WAIT_MS = 25000;
/** A login may wait for the previous connection's slot (up to 15 s), then connects. */
const LOGIN_WAIT_MS = 30000;
const RECONNECT_WAIT_MS = 45000;
const started = Date.now();

function log(text) {
  const seconds = ((Date.now() - started) / 1000).toFixed(1);
  process.stderr.write(`[e2e ${seconds}s] ${text}\n`);
}

function parseArgs(argv) {
  const args = { url: null, screenshot: null, phoneScreenshot: null, users: ["alice", "bob"] };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    const value = () => {
      if (i + 1 >= argv.length) throw new Error(`${arg} needs a value`);
      return argv[++i];
    };
    if (arg === "--screenshot") args.screenshot = value();
    else if (arg === "--phone-screenshot") args.phoneScreenshot = value();
    else if (arg === "--users") args.users = value().split(",");
    else if (arg === "--require-two-servers") args.requireTwoServers = true;
    else if (arg === "--control") args.control = true;
    else if (arg === "--api-key") args.apiKey = value();
    else if (arg === "--artifacts") args.artifacts = value();
    else if (arg.startsWith("--")) throw new Error(`unknown flag ${arg}`);
    else if (!args.url) args.url = arg.replace(/\/+$/, "");
    else throw new Error(`unexpected argument ${arg}`);
  }
  if (!args.url) throw new Error("usage: node e2e.mjs <route-url> [flags]");
  if (args.users.length !== 2) throw new Error("--users takes two names, e.g. alice,bob");
  return args;
}

// ---- talking to the test that runs us (--control) ----

const stdinLines = createInterface({ input: process.stdin })[Symbol.asyncIterator]();

async function control(command) {
  process.stdout.write(`CONTROL ${command}\n`);
  const { value, done } = await stdinLines.next();
  if (done || value.trim() !== "ok") throw new Error(`control "${command}" answered ${done ? "nothing" : value}`);
}

// ---- one person's page ----

/** A browser page of one person, with what it noticed: errors, frames it sent. */
async function openPerson(browser, name, contextOptions) {
  const context = await browser.newContext(contextOptions);
  const page = await context.newPage();
  page.setDefaultTimeout(WAIT_MS);
  const person = { name, password: `password-${name}`, context, page, errors: [], sent: [], logins: [] };
  watch(person, page);
  return person;
}

/** Collects uncaught errors, CSP violations and the WebSocket frames the page sends. */
function watch(person, page) {
  page.on("pageerror", (e) => person.errors.push(`uncaught: ${e.message}`));
  page.on("console", (msg) => {
    if (msg.type() === "error" && /Content Security Policy/i.test(msg.text())) {
      person.errors.push(`CSP: ${msg.text()}`);
    }
  });
  page.on("request", (request) => {
    const url = request.url();
    if (url.endsWith("/api/login") || url.endsWith("/api/login/resume")) person.logins.push(Date.now());
  });
  page.on("websocket", (ws) => {
    ws.on("framesent", (frame) => {
      if (typeof frame.payload === "string") person.sent.push(frame.payload);
    });
  });
}

async function logIn(person, url, { register }) {
  const { page } = person;
  if (url) await page.goto(url);
  await page.locator("#login-name").fill(person.name);
  await page.locator("#login-password").fill(person.password);
  await page.locator(register ? "#register-button" : "#login-button").click();
  await page.locator('#status[data-state="online"]').waitFor({ timeout: LOGIN_WAIT_MS });
  person.server = await page.locator("#status").getAttribute("data-server");
  log(`${person.name} is online on ${person.server}`);
}

/** Opens a conversation from the sidebar (on a phone, the sidebar opens first). */
async function openConversation(person, key) {
  const { page } = person;
  const toggle = page.locator("#toggle-sidebar");
  if (await toggle.isVisible()) {
    if ((await toggle.getAttribute("aria-expanded")) !== "true") await toggle.click();
  }
  // The sidebar is redrawn on every presence change and message: a redraw between the
  // press and the release of a click swallows that click (they hit two different buttons).
  // Click again then, a few times at most; an error the page threw is still reported.
  const active = page.locator(`button.conv.active[data-conv="${key}"]`);
  for (let attempt = 1; ; attempt++) {
    await page.locator(`button.conv[data-conv="${key}"]`).click();
    try {
      await active.waitFor({ state: "attached", timeout: 3000 });
      return;
    } catch (e) {
      if (attempt === 3) throw e;
      log(`${person.name}: the click on ${key} did not open it; clicking again`);
    }
  }
}

function message(person, text, { mine } = {}) {
  const selector = mine ? "#messages li.msg.mine" : "#messages li.msg:not(.mine)";
  return person.page.locator(selector, { hasText: text });
}

/** Sends `text` in the open conversation; waits until the route accepted it. */
async function say(person, text, accepted = ["delivered"], timeout = WAIT_MS) {
  await person.page.locator("#message-input").fill(text);
  await person.page.locator("#message-input").press("Enter");
  const status = message(person, text, { mine: true }).last().locator(".status");
  const what = `${person.name}'s message ${JSON.stringify(text)} to show as ${accepted.join(" or ")}`;
  await context(what, async () => {
    await person.page.waitForFunction(
      ([el, wanted]) => wanted.includes(el.dataset.status),
      [await status.elementHandle(), accepted],
      { timeout },
    );
  });
  return status.getAttribute("data-status");
}

async function sees(person, text) {
  const what = `${JSON.stringify(text)} to appear on ${person.name}'s page`;
  await context(what, () => message(person, text).first().waitFor());
}

/** Runs `body`; a failure says what was being waited for. */
async function context(what, body) {
  try {
    return await body();
  } catch (e) {
    throw new Error(`waiting for ${what}: ${e.message}`);
  }
}

async function joinChannel(person, channel) {
  const { page } = person;
  const toggle = page.locator("#toggle-sidebar");
  if ((await toggle.isVisible()) && (await toggle.getAttribute("aria-expanded")) !== "true") {
    await toggle.click();
  }
  await page.locator("#join-name").fill(channel);
  await page.locator('#join-form button[type="submit"]').click();
  await page.locator("#conversation-title", { hasText: `# ${channel}` }).waitFor();
  await page.locator(`button.conv[data-conv="channel:${channel}"]`).waitFor({ state: "attached" });
}

/** Polls a condition of the test itself (not of a page) until it holds. */
async function until(what, condition, timeout = WAIT_MS) {
  const deadline = Date.now() + timeout;
  while (!(await condition())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

function framesOf(person, kind) {
  return person.sent.map((payload) => JSON.parse(payload)).filter((frame) => frame[kind]);
}

// ---- the scenario ----

const XSS = "<img src=x onerror=window.__xss=1>";

async function scenario(browser, args) {
  const [aliceName, bobName] = args.users;
  const alice = await openPerson(browser, aliceName, { viewport: { width: 1100, height: 720 } });
  const bob = await openPerson(browser, bobName, {
    viewport: { width: 390, height: 780 },
    deviceScaleFactor: 2,
    isMobile: true,
    hasTouch: true,
  });
  const people = [alice, bob];
  opened.push(...people);

  await step("the page is served and both register and connect", async () => {
    await logIn(alice, args.url, { register: true });
    await logIn(bob, args.url, { register: true });
    if (alice.server === bob.server) {
      const text = `both landed on ${alice.server}`;
      if (args.requireTwoServers) throw new Error(`${text}; round robin should spread them`);
      log(`note: ${text}`);
    }
  });

  await step("each sees the other online", async () => {
    for (const [person, other] of [[alice, bob], [bob, alice]]) {
      await person.page
        .locator(`button.conv.online[data-conv="user:${other.name}"]`)
        .waitFor({ state: "attached", timeout: LIST_WAIT_MS });
    }
  });

  await step("private messages both ways", async () => {
    await openConversation(alice, `user:${bob.name}`);
    await say(alice, `Hi ${bob.name}! Are you coming to the standup?`);
    const badge = bob.page.locator(`#recent button.conv[data-conv="user:${alice.name}"] .unread`);
    await context(`an unread badge on ${bob.name}'s conversation list`, () => badge.waitFor({ state: "attached" }));
    if ((await badge.textContent()) !== "1") throw new Error(`the unread badge says ${await badge.textContent()}`);
    const last = bob.page.locator(`#recent button.conv[data-conv="user:${alice.name}"] .detail`);
    if (!(await last.textContent()).includes("standup")) throw new Error(`the list shows ${await last.textContent()}`);
    await openConversation(bob, `user:${alice.name}`);
    await sees(bob, "Are you coming to the standup?");
    await context("the badge to clear", () => badge.waitFor({ state: "detached" }));
    await until(`${bob.name} sends a read mark`, () =>
      framesOf(bob, "readMark").some((f) => f.readMark.conversation.userId && Number(f.readMark.seq) >= 1),
    );
    await context(`"seen" under ${alice.name}'s message`, () =>
      message(alice, "Are you coming to the standup?", { mine: true }).locator(".seen").waitFor(),
    );
    await say(bob, "Yes, on my way. Two minutes.");
    await sees(alice, "Yes, on my way.");
    await until(`${bob.name} acks the private message`, () =>
      framesOf(bob, "ack").some((f) => (f.ack.messageIds || []).length > 0),
    );
  });

  await step("a typing indicator", async () => {
    await bob.page.locator("#message-input").fill("Let me che");
    await context(`"${bob.name} is typing…" on ${alice.name}'s page`, () =>
      alice.page.locator("#typing", { hasText: `${bob.name} is typing…` }).waitFor(),
    );
    const typing = framesOf(bob, "typing");
    if (!typing.length || !typing[0].typing.conversation.userId) {
      throw new Error(`typing frames sent: ${JSON.stringify(typing)}`);
    }
    await bob.page.locator("#message-input").fill("");
    // It goes away by itself (4 s after the last frame).
    await context("the typing indicator to go away", () => alice.page.locator("#typing").waitFor({ state: "hidden" }));
  });

  await step("markup in a message is shown as text and never runs", async () => {
    await say(alice, XSS);
    await sees(bob, XSS);
    for (const person of people) {
      const text = await message(person, XSS, { mine: person === alice }).first().locator(".body").textContent();
      if (text !== XSS) throw new Error(`${person.name} shows ${JSON.stringify(text)}`);
      if ((await person.page.evaluate(() => typeof window.__xss)) !== "undefined") {
        throw new Error(`the markup ran on ${person.name}'s page`);
      }
      const images = await person.page.locator("#messages img").count();
      if (images !== 0) throw new Error(`${images} img element(s) in ${person.name}'s message list`);
    }
  });

  await step("group chat reaches everyone online", async () => {
    await openConversation(bob, "group");
    await say(bob, "Morning everyone, the build is green again.");
    await alice.page.locator('button.conv[data-conv="group"] .unread').waitFor({ state: "attached" });
    await openConversation(alice, "group");
    await sees(alice, "the build is green again");
  });

  await step("a stored group: created from the page, a member added, messages both ways", async () => {
    const { page } = alice;
    await page.locator("#group-name").fill("Release crew");
    await page.locator("#group-members").fill("");
    await page.locator('#group-form button[type="submit"]').click();
    await page.locator("#conversation-title", { hasText: "Release crew" }).waitFor();
    const key = await page.locator("#recent button.conv.active").getAttribute("data-conv");
    if (!/^grp:[0-9]+$/.test(key)) throw new Error(`the new group's conversation is ${key}`);
    alice.groupKey = bob.groupKey = key;
    await page.locator("#messages li.event").first().waitFor();
    await page.locator("#members-button").click();
    await page.locator("#add-members").fill(bob.name);
    await page.locator('#add-form button[type="submit"]').click();
    await page.locator("#member-list li", { hasText: bob.name }).waitFor();
    await page.locator("#messages li.event", { hasText: bob.name }).waitFor();
    await say(alice, "Welcome to the release crew!");
    const groupButton = bob.page.locator(`#recent button.conv[data-conv="${key}"]`);
    await context(`the group in ${bob.name}'s list with an unread badge`, async () => {
      await groupButton.locator(".label", { hasText: "Release crew" }).waitFor({ state: "attached" });
      await groupButton.locator(".unread").waitFor({ state: "attached" });
    });
    await openConversation(bob, key);
    await sees(bob, "Welcome to the release crew!");
    // Alice has the group open, so she watches its read marks: bob's opening reads it.
    if (!framesOf(alice, "watchReads").some((f) => f.watchReads.groupId === key.slice("grp:".length) && !f.watchReads.stop))
      throw new Error(`${alice.name} did not watch the group's read marks`);
    await context(`"seen by 1" under ${alice.name}'s welcome once ${bob.name} read it`, () =>
      message(alice, "Welcome to the release crew!", { mine: true }).locator(".seen", { hasText: "seen by 1" }).waitFor(),
    );
    await say(bob, "Thanks, glad to be here.");
    await sees(alice, "glad to be here");
    const groupId = key.slice("grp:".length);
    await until(`${bob.name} acks the group by position`, () =>
      framesOf(bob, "ack").some((f) => (f.ack.groups || []).some((g) => g.groupId === groupId && Number(g.logSeq) > 0)),
    );
    const send = framesOf(alice, "send").find((f) => f.send.kind === "MESSAGE_KIND_GROUP_CHAT");
    if (!send || send.send.groupId !== groupId) throw new Error(`group send frame: ${JSON.stringify(send)}`);
    // The newest activity first: the group, then the private conversation.
    const order = await bob.page.locator("#recent button.conv").evaluateAll((b) => b.map((x) => x.dataset.conv));
    if (order[0] !== key || order[1] !== `user:${alice.name}`) throw new Error(`${bob.name}'s list: ${order}`);
    bob.recentOrder = order;
    // More than a history page (50) after the welcome: opening the group after the reload
    // shows the newest page, the welcome comes with an older one (scrolling to the top).
    const token = await page.evaluate(() => JSON.parse(sessionStorage.getItem("cim.session")).token);
    for (let i = 1; i <= 55; i++) {
      const resp = await fetch(`${args.url}/api/groups/${groupId}/messages`, {
        method: "POST",
        headers: { authorization: `Bearer ${token}`, "content-type": "application/json" },
        body: JSON.stringify({ body: `Checklist item ${i}` }),
      });
      if (!resp.ok) throw new Error(`group message over HTTP answered ${resp.status} ${await resp.text()}`);
    }
    await sees(bob, "Checklist item 55");
  });

  await step("channels: join, send, receive", async () => {
    await joinChannel(bob, "release-2.0");
    await joinChannel(alice, "release-2.0");
    await alice.page
      .locator('button.conv[data-conv="channel:release-2.0"] .detail', { hasText: "2 members" })
      .waitFor({ state: "attached" });
    await say(alice, "Release notes are ready for review.");
    await openConversation(bob, "channel:release-2.0");
    await sees(bob, "Release notes are ready for review.");
    await say(bob, "Reviewing them now.");
    await sees(alice, "Reviewing them now.");
  });

  await step(`${bob.name} reloads: the page resumes the session by itself, no password`, async () => {
    const pageUrl = bob.page.url();
    await bob.page.reload();
    await bob.page.locator('#status[data-state="online"]').waitFor({ timeout: LOGIN_WAIT_MS });
    if (await bob.page.locator("#login-view").isVisible()) throw new Error("the login form is shown after the reload");
    bob.server = await bob.page.locator("#status").getAttribute("data-server");
    log(`${bob.name} resumed on ${bob.server}`);
    bob.url = pageUrl;
    await context("the same conversation list after the reload", () =>
      bob.page.waitForFunction(
        (wanted) =>
          JSON.stringify([...document.querySelectorAll("#recent button.conv")].map((b) => b.dataset.conv)) ===
          JSON.stringify(wanted),
        bob.recentOrder,
      ),
    );
    await openConversation(bob, bob.groupKey);
    await context("the group's history after the reload", async () => {
      await message(bob, "Checklist item 55").waitFor();
      const shown = await bob.page.locator("#messages li.msg").count();
      if (shown > 50) throw new Error(`${shown} messages shown from one history page`);
      if ((await message(bob, "Welcome to the release crew!").count()) !== 0) {
        throw new Error("the welcome came with the newest page");
      }
    });
    await context("older history pages when scrolling to the top", async () => {
      // Each page loaded keeps the view where it was: scroll up again until the welcome shows.
      const welcome = message(bob, "Welcome to the release crew!");
      await bob.page.waitForFunction(() => {
        const list = document.getElementById("messages");
        const found = [...list.querySelectorAll("li.msg .body")].some((b) => b.textContent.startsWith("Welcome"));
        if (!found) list.scrollTop = 0;
        return found;
      });
      await welcome.waitFor();
      await message(bob, "glad to be here", { mine: true }).waitFor();
      await bob.page.locator("#messages li.event", { hasText: bob.name }).first().waitFor();
    });
  });

  await step(`${bob.name} leaves and comes back; what was sent meanwhile is replayed, nothing twice`, async () => {
    // Away: the connection closes with the page; the tab keeps its session token.
    await bob.page.goto("about:blank");
    await openConversation(alice, `user:${bob.name}`);
    const first = await say(alice, "Sent while you were away: the demo moved to 3 pm.", ["delivered", "stored"]);
    const second = await say(alice, "And bring the release checklist, please.", ["delivered", "stored"]);
    log(`sends while ${bob.name} was away: ${first}, ${second}`);
    await bob.page.goto(bob.url);
    await bob.page.locator('#status[data-state="online"]').waitFor({ timeout: LOGIN_WAIT_MS });
    await openConversation(bob, `user:${alice.name}`);
    for (const text of ["the demo moved to 3 pm", "bring the release checklist"]) {
      await message(bob, text).locator(".badge", { hasText: "offline" }).waitFor();
      if ((await message(bob, text).count()) !== 1) throw new Error(`"${text}" shown more than once`);
    }
    // The rest comes from the history (opening loaded it), once each, without the badge.
    await context("the private history", () => message(bob, "Are you coming to the standup?").waitFor());
    const texts = await bob.page.locator("#messages li.msg .body").allTextContents();
    if (new Set(texts).size !== texts.length) throw new Error(`a message is shown twice: ${JSON.stringify(texts)}`);
    const badges = await bob.page.locator("#messages li.msg .badge").count();
    if (badges !== 2) throw new Error(`${badges} messages marked as replayed, expected 2`);
  });

  if (args.control) {
    await step(`${alice.name}'s server shuts down; the page reconnects by itself`, async () => {
      const old = alice.server;
      await openConversation(alice, "group");
      await control(`shutdown-server ${old}`);
      // Sent as the connection goes: it waits for the next connection, or is sent again on
      // it (same id) if its result was lost; either way it is delivered, and shown once.
      await say(alice, "Posted while my server went away.", ["delivered"], RECONNECT_WAIT_MS);
      const posted = await message(alice, "Posted while my server went away.", { mine: true }).count();
      if (posted !== 1) throw new Error(`the group message is shown ${posted} times`);
      await alice.page
        .locator('#status[data-state="online"]:not([data-server="' + old + '"])')
        .waitFor({ timeout: RECONNECT_WAIT_MS });
      alice.server = await alice.page.locator("#status").getAttribute("data-server");
      log(`${alice.name} reconnected to ${alice.server}`);
      await bob.page.locator('#status[data-state="online"]').waitFor({ timeout: RECONNECT_WAIT_MS });
      // Stored if bob's page is still reconnecting (same server): then replayed to it.
      await openConversation(alice, `user:${bob.name}`);
      await say(alice, "Back again, my server restarted.", ["delivered", "stored"]);
      await sees(bob, "Back again, my server restarted.");
    });
  }

  await step("heartbeats were sent", async () => {
    await until(`a ping from ${alice.name}`, () => framesOf(alice, "ping").length > 0, RECONNECT_WAIT_MS);
  });

  await step("screenshots", async () => {
    await say(bob, "Got it, see you at 3.");
    await sees(alice, "see you at 3");
    await bob.page.locator("#message-input").fill("Sounds good");
    await alice.page.locator("#message-input").blur();
    if (args.screenshot) {
      await alice.page.screenshot({ path: args.screenshot });
      log(`screenshot: ${args.screenshot}`);
    }
    if (args.phoneScreenshot) {
      await bob.page.screenshot({ path: args.phoneScreenshot });
      log(`screenshot: ${args.phoneScreenshot}`);
    }
  });

  if (args.apiKey) {
    await step(`an administrator kicks ${bob.name}: the page says so and stays offline`, async () => {
      const id = await bob.page.locator("#me").getAttribute("data-user-id");
      const resp = await fetch(`${args.url}/api/admin/users/${id}/kick`, {
        method: "POST",
        headers: { "x-api-key": args.apiKey, "content-type": "application/json" },
        body: JSON.stringify({ reason: "maintenance window" }),
      });
      const answer = await resp.json();
      if (!resp.ok || answer.kicked !== true) throw new Error(`kick answered ${resp.status} ${JSON.stringify(answer)}`);
      const kickedAt = Date.now();
      await bob.page.locator("#status", { hasText: "disconnected by an administrator (maintenance window)" }).waitFor();
      await bob.page.locator('#status[data-state="offline"]').waitFor();
      await bob.page.locator("#login-notice", { hasText: "administrator" }).waitFor();
      bob.kickedAt = kickedAt;
    });
  }

  await step(`${alice.name} logs out; a reload then shows the login form`, async () => {
    await alice.page.locator("#logout").click();
    await alice.page.locator("#login-notice", { hasText: "you logged out" }).waitFor();
    await alice.page.locator('#status[data-state="offline"]').waitFor();
    await alice.page.reload();
    await alice.page.locator("#login-view").waitFor();
    await alice.page.locator('#status[data-state="offline"]').waitFor();
  });

  if (bob.kickedAt) {
    await step(`${bob.name}'s page did not try to reconnect after the kick`, async () => {
      const after = bob.logins.filter((t) => t >= bob.kickedAt).length;
      if (after) throw new Error(`${after} login request(s) after the kick`);
      if ((await bob.page.locator("#status").getAttribute("data-state")) !== "offline") {
        throw new Error("the page left the offline state after the kick");
      }
    });
  }

  for (const person of people) {
    if (person.errors.length) throw new Error(`${person.name}'s page: ${person.errors.join("; ")}`);
  }
}

let currentStep = "starting";
/** Every person's page, for the screenshots taken on failure. */
const opened = [];

async function failureScreenshots(dir) {
  for (const person of opened) {
    const path = `${dir}/failure-${person.name}.png`;
    await person.page.screenshot({ path }).then(
      () => log(`failure screenshot: ${path}`),
      (e) => log(`no failure screenshot of ${person.name}: ${e.message}`),
    );
  }
}

async function step(name, body) {
  currentStep = name;
  log(`step: ${name}`);
  await body();
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
  });
  try {
    await scenario(browser, args);
  } catch (e) {
    for (const person of opened) {
      if (person.errors.length) log(`${person.name}'s page reported: ${person.errors.join("; ")}`);
    }
    if (args.artifacts) await failureScreenshots(args.artifacts);
    throw e;
  } finally {
    await browser.close();
  }
  log("passed");
}

main().then(
  () => process.exit(0),
  (e) => {
    log(`FAILED at step "${currentStep}": ${e.stack || e}`);
    process.exit(1);
  },
);
