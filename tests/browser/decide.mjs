// Decides a held command in the Wicket console from a real browser:
// Debian's chromium, driven by playwright-core.
//
//   node decide.mjs CONSOLE_URL approve|deny COMMENT
//
// Opens the console (signing in through the identity provider), prints
// `ready` once the approvals page is up, then waits for an approval to
// arrive live, prints its card's text as JSON, and decides it with COMMENT.
// Exits non-zero on any failure, leaving a screenshot beside this script.
import { chromium } from "playwright-core";
import { fileURLToPath } from "node:url";
import path from "node:path";

const [url, verb, comment] = process.argv.slice(2);
if (!url || !["approve", "deny"].includes(verb)) {
  console.error("usage: node decide.mjs CONSOLE_URL approve|deny COMMENT");
  process.exit(2);
}
const here = path.dirname(fileURLToPath(import.meta.url));
const browser = await chromium.launch({
  executablePath: process.env.WICKET_TEST_CHROMIUM || "/usr/bin/chromium",
  headless: true,
  // The tests may run as root, where chromium's sandbox cannot start.
  args: ["--no-sandbox"],
});
const page = await browser.newPage();
try {
  await page.goto(url + "/approvals");
  await page.locator("#me", { hasText: "approver" }).waitFor({ timeout: 20000 });
  // Live: the event stream is connected (and the list read after it).
  await page.locator("body[data-live='1']").waitFor({ timeout: 20000 });
  await page.locator("#empty, article[data-approval]").first().waitFor({ timeout: 20000 });
  console.log("ready");
  const card = page.locator("article[data-approval]").first();
  await card.waitFor({ timeout: 30000 });
  console.log(JSON.stringify({ card: await card.innerText() }));
  await card.locator("input[name=comment]").fill(comment || "");
  await card.locator(verb === "approve" ? "button.approve" : "button.deny").click();
  await page.locator("#status", { hasText: verb === "approve" ? "Approved" : "Denied" })
    .waitFor({ timeout: 10000 });
  console.log("decided");
} catch (e) {
  await page.screenshot({ path: path.join(here, "failure.png") }).catch(() => {});
  console.error(String(e));
  process.exitCode = 1;
} finally {
  await browser.close();
}
