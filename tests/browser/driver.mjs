// A small driver of Debian's Chromium through playwright-core, for tests/e2e/test_ui.py:
// one JSON command a line on stdin, one JSON answer a line on stdout ({id, ok, value} or
// {id, ok: false, error}). Chromium runs headless with a fresh profile of its own.
//
//   node driver.mjs PROFILE_DIR [CHROMIUM]
import { createInterface } from "node:readline";
import { chromium } from "playwright-core";

const [profile, executable = "/usr/bin/chromium"] = process.argv.slice(2);
const ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
              "--disable-component-update", "--disable-sync", "--disable-quic", "--no-first-run"];

const context = await chromium.launchPersistentContext(profile, {
  executablePath: executable, headless: true, args: ARGS, viewport: { width: 1366, height: 900 },
  colorScheme: process.env.CISTATE_UI_COLOR_SCHEME || "light",
});
let page = context.pages()[0] ?? await context.newPage();
const consoleLines = [];
const watch = (p) => {
  p.on("console", (m) => consoleLines.push(`${m.type()}: ${m.text()}`));
  p.on("pageerror", (e) => consoleLines.push(`pageerror: ${e.message}`));
};
watch(page);

// A page function given as its source ("n => ..."): made a function here, so that
// playwright sends it as one (a string would be taken for an expression).
const fn = (source) => new Function("arg", `return (${source})(arg);`);

const ops = {
  async goto({ url }) { await page.goto(url, { waitUntil: "load" }); return page.url(); },
  async eval({ expr, arg }) { return await page.evaluate(fn(expr), arg ?? null); },
  async click({ selector }) { await page.click(selector); },
  async fill({ selector, value }) { await page.fill(selector, value); },
  async select({ selector, value }) { await page.selectOption(selector, value); },
  async press({ selector, key }) { await page.press(selector, key); },
  async wait({ selector, state = "visible", timeout = 30000 }) {
    await page.waitForSelector(selector, { state, timeout });
  },
  async waitFn({ expr, arg, timeout = 30000 }) {
    const handle = await page.waitForFunction(fn(expr), arg ?? null, { timeout, polling: 50 });
    return await handle.jsonValue();
  },
  async screenshot({ path, fullPage = true }) { await page.screenshot({ path, fullPage }); return path; },
  async download({ selector, path }) {  // click what starts a download; save it there
    const [file] = await Promise.all([page.waitForEvent("download"), page.click(selector)]);
    await file.saveAs(path);
    return file.suggestedFilename();
  },
  async media({ colorScheme }) { await page.emulateMedia({ colorScheme }); },
  async console() { return consoleLines.splice(0); },
  async newPage() {  // a new tab: its own session storage
    await page.close();
    page = await context.newPage();
    watch(page);
  },
  async close() { await context.close(); process.exit(0); },
};

const lines = createInterface({ input: process.stdin });
for await (const line of lines) {
  if (!line.trim()) continue;
  const { id, op, ...args } = JSON.parse(line);
  let answer;
  try {
    const fn = ops[op];
    if (!fn) throw new Error(`no such op ${op}`);
    answer = { id, ok: true, value: (await fn(args)) ?? null };
  } catch (error) {
    answer = { id, ok: false, error: String(error?.message ?? error) };
  }
  process.stdout.write(JSON.stringify(answer) + "\n");
}
await context.close();
