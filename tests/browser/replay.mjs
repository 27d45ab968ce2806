// Plays a session's terminal recording in the Wicket console, in Debian's
// chromium driven by playwright-core.
//
//   node replay.mjs CONSOLE_URL SESSION_ID EXPECTED_TEXT
//
// Opens the session's page (signing in through the identity provider),
// presses Play at 8x, waits until the terminal shows EXPECTED_TEXT and the
// recording ends, and prints the screen's text as JSON.
import { chromium } from "playwright-core";
import { fileURLToPath } from "node:url";
import path from "node:path";

const [url, session, expected] = process.argv.slice(2);
if (!url || !session || !expected) {
  console.error("usage: node replay.mjs CONSOLE_URL SESSION_ID EXPECTED_TEXT");
  process.exit(2);
}
const here = path.dirname(fileURLToPath(import.meta.url));
const browser = await chromium.launch({
  executablePath: process.env.WICKET_TEST_CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: ["--no-sandbox"],
});
const page = await browser.newPage();
try {
  await page.goto(url + "/sessions/" + encodeURIComponent(session));
  const rec = page.locator(".recording").first();
  await rec.waitFor({ timeout: 20000 });
  await rec.locator("select").selectOption("8");
  await rec.locator("button.play").click();
  await rec.locator("pre.terminal", { hasText: expected }).waitFor({ timeout: 20000 });
  await rec.locator(".meta", { hasText: "ended" }).waitFor({ timeout: 20000 });
  console.log(JSON.stringify({ screen: await rec.locator("pre.terminal").innerText() }));
} catch (e) {
  await page.screenshot({ path: path.join(here, "failure.png") }).catch(() => {});
  console.error(String(e));
  process.exitCode = 1;
} finally {
  await browser.close();
}
